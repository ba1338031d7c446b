/* Internals of the worker server shared by server.c (process, threads, routing, shutdown) and
 * api_openai.c (the OpenAI endpoints over the engine). Not for other modules.
 * Threads: everything here belongs to the loop thread, except the message queue (mu) that the
 * engine thread fills and the flags marked atomic. */
#ifndef DUET_SERVER_IMPL_H
#define DUET_SERVER_IMPL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "openai/api.h"
#include "text/chat.h"
#include "engine/engine.h"
#include "net/http.h"
#include "openai/metrics.h"
#include "engine/parallel.h"
#include "server/server.h"
#include "text/tokenizer.h"

typedef struct srv_config {
    const char *model;
    const char *tokenizer;   /* default: model */
    const char *served_name; /* default: model */
    const char *host;
    const char *api_key;
    int port;
    int max_model_len; /* 0: min(max_position_embeddings, 8192) */
    int max_num_seqs;
    int max_num_batched_tokens;
    int max_waiting; /* engine requests beyond max_num_seqs before new ones get 503 */
    int block_size;
    long long kv_cache_memory; /* bytes; 0: default */
    int num_gpu_blocks_override;
    bool prefix_caching;
    bool reasoning_r1;
    double lease_timeout_s;
    double shutdown_timeout_s;
    long long max_request_body;
    par_options po;
} srv_config;

/* An engine event copied for the loop thread. */
typedef struct srv_msg {
    struct srv_msg *next;
    void *user; /* the srv_choice */
    bool has_token;
    int32_t token;
    bool has_lp;
    eng_token_lp lp;
    eng_token_lp *prompt_lp; /* [n_prompt], heap, or NULL */
    char *text;              /* heap, NUL-terminated, or NULL */
    size_t text_len;
    eng_finish finish;
    char *stop_reason;
    int32_t stop_token;
    char *error;
    int n_prompt, n_output, n_cached;
    int32_t *lease_blocks;
    int n_lease_blocks;
    double t; /* seconds, CLOCK_MONOTONIC */
} srv_msg;

typedef struct srv_job srv_job;

/* One engine request: a choice of a completion or chat response. */
typedef struct srv_choice {
    srv_job *job;
    int index;  /* in the response */
    int prompt; /* which prompt of the request */
    uint64_t eng_id;
    bool live; /* submitted and not finished */
    bool done;
    void *remote; /* plug-in transfer descriptor (decode side), freed when done */
    strbuf text;  /* all output text (non-stream), or unused */
    int32_t *ids; /* output token ids */
    int n_ids, cap_ids;
    eng_token_lp *lps; /* per output token, when logprobs were asked */
    int n_lps, cap_lps;
    eng_token_lp *prompt_lp; /* echo with logprobs */
    eng_finish finish;
    char *stop_reason;
    int32_t stop_token;
    char *error;
    int n_prompt, n_output, n_cached;
    api_reasoner reasoner;
    strbuf reason, content; /* chat: split text */
    bool sent_first;        /* stream: the first chunk (role, prompt ids) went out */
    size_t text_offset;     /* completions logprobs: bytes of token strings so far */
    double t_first, t_last;
} srv_choice;

typedef enum srv_job_kind {
    SRV_JOB_COMPLETION = 0,
    SRV_JOB_CHAT = 1,
} srv_job_kind;

struct srv_job {
    struct srv_server *srv;
    srv_job *prev, *next; /* in srv->jobs */
    http_req *req;        /* NULL once the response is finished (or the client left) */
    srv_job_kind kind;
    char id[160];         /* "cmpl-..." / "chatcmpl-..." */
    char request_id[129]; /* X-Request-Id, echoed */
    http_header extra[2];
    long long created;
    double t_arrival;
    bool stream, include_usage, continuous_usage;
    bool echo, return_token_ids, want_logprobs;
    int logprobs; /* completions: legacy top-N; chat: top_logprobs */
    bool kv_lease;
    cJSON *kv_params_out; /* from the plug-in's lease_params */
    int n_prompts;
    int32_t **prompts; /* [n_prompts] token ids */
    int *n_prompt_ids;
    char **prompt_text; /* echo: the prompts as text */
    int n_choices;
    srv_choice *choices;
    int n_live;
    bool failed;  /* a choice ended in error: answer 500 / an error event */
    bool aborted; /* ended by the server (shutdown): answer 503 */
    int err_status;
    char err_msg[256];
    bool stream_started;
};

typedef struct srv_server {
    srv_config cfg;
    srv_role role;
    const srv_kv_plugin *plugin;
    bool plugin_started;
    par_instance *inst;
    eng_engine *eng;
    tok_tokenizer *tok;
    chat_template *tpl; /* NULL: no chat template (chat answers 400) */
    int vocab;          /* the model's */
    int max_model_len;
    int n_blocks;
    long long created;
    met_registry *met;

    uv_loop_t *loop;
    http_server *http;
    uv_async_t async;
    uv_signal_t sig_term, sig_int;
    uv_timer_t drain_timer;
    bool draining;
    bool aborted_all;
    bool drained;
    int drain_phase;

    pthread_t engine_thread;
    bool engine_started;
    pthread_mutex_t mu;
    srv_msg *q_head, *q_tail;
    atomic_bool stop_engine;
    atomic_bool engine_failed;
    comm_group *leaders; /* lockstep: the DP leaders' quit vote */

    uint64_t next_id;
    int live_requests; /* engine requests submitted and not finished */
    int max_live;      /* beyond it new requests are answered 503 */
    srv_job *jobs;
    int exit_code;
} srv_server;

/* api_openai.c: the endpoints. Each takes over req (finishes it now or later). */
void api_handle_completions(srv_server *s, http_req *req, cJSON *body);
void api_handle_chat(srv_server *s, http_req *req, cJSON *body);
void api_handle_tokenize(srv_server *s, http_req *req, cJSON *body);
void api_handle_detokenize(srv_server *s, http_req *req, cJSON *body);
/* An engine event for a job's choice (loop thread). Frees nothing of m. */
void api_job_event(srv_server *s, const srv_msg *m);
/* Shutdown deadline: aborts every live engine request; responses end as aborted. */
void api_jobs_abort_all(srv_server *s);

/* server.c: counts a response for the metrics and sends it. */
void srv_count_status(srv_server *s, int status);

#endif
