/* The OpenAI endpoints of a worker over its engine: /v1/completions, /v1/chat/completions,
 * /tokenize and /detokenize with vLLM's fields, defaults, messages and response shapes, and the
 * kv_transfer_params of disaggregated serving (through the KV plug-in). The worker process
 * around it (command line, threads, listening, routing, shutdown) is server.c's: this module
 * never calls back into it.
 * Threads: oai_on_engine_event on the engine thread; everything else on the loop thread, but
 * for the prompts' tokenization and chat rendering, which run on the loop's worker pool
 * (uv_queue_work) once oai_set_loop gave it one. */
#ifndef DUET_OAI_H
#define DUET_OAI_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "base/status.h"
#include "engine/engine.h"
#include "net/http.h"
#include "openai/metrics.h"
#include "server/kv_plugin.h"
#include "text/chat.h"
#include "text/tokenizer.h"

/* How chat answers split <think> reasoning into reasoning_content. */
typedef enum oai_reasoning {
    OAI_REASONING_NONE = 0,
    OAI_REASONING_R1, /* deepseek_r1: always */
    OAI_REASONING_V3, /* deepseek_v3 (V3.1): when chat_template_kwargs.thinking is true */
} oai_reasoning;

typedef struct oai_config {
    const char *served_name; /* the model name requests must use */
    oai_reasoning reasoning;
    int tool_parser;                  /* an api_tool_format, or -1: tool-call markup stays text */
    bool auto_tool_choice;            /* tool_choice "auto" is served (--enable-auto-tool-choice) */
    bool trust_request_chat_template; /* a chat request's own chat_template is rendered */
    int max_logprobs;                 /* the most logprobs / top_logprobs a request may ask */
    bool log_requests;                /* a line per request received and finished */
    bool seeded;                      /* --seed: unseeded requests draw their seeds from seed */
    uint64_t seed;
    int max_model_len;
    int vocab;    /* the model's vocabulary size (token ids are checked against it) */
    int max_live; /* engine requests in flight beyond which new requests are answered 503 */
    const srv_kv_plugin *plugin; /* NULL: kv_transfer_params are ignored, as vLLM without a
                                  * connector does */
    /* Engine thread: events are waiting for oai_process_events. */
    void (*wake)(void *arg);
    void *wake_arg;
} oai_config;

typedef struct oai_frontend oai_frontend;

/* tok, tpl (may be NULL: chat answers 400) and met stay the caller's and must outlive fe. */
duet_status oai_create(const oai_config *cfg, tok_tokenizer *tok, const chat_template *tpl,
                       met_registry *met, oai_frontend **fe_p);
/* After every job ended (their final events processed). Accepts NULL. */
void oai_destroy(oai_frontend *fe);
/* The engine requests go to eng (set once, before the first request). */
void oai_set_engine(oai_frontend *fe, eng_engine *eng);

/* Tokenization and chat rendering of generation requests go to loop's worker pool (set once,
 * before the first request; without it they run inline, on the calling thread). The loop must
 * run until oai_jobs_count is 0: a request being tokenized counts. */
void oai_set_loop(oai_frontend *fe, uv_loop_t *loop);

/* The handlers take over req: they finish it now or later. The tokenizing ones take over body
 * too (it lives while the prompt is tokenized); /detokenize leaves it the caller's. */
void oai_handle_completions(oai_frontend *fe, http_req *req, cJSON *body);
void oai_handle_chat(oai_frontend *fe, http_req *req, cJSON *body);
void oai_handle_tokenize(oai_frontend *fe, http_req *req, cJSON *body);
void oai_handle_detokenize(oai_frontend *fe, http_req *req, const cJSON *body);

/* The engine's on_event (eng_config.on_event with event_user = fe): copies the event for the
 * loop thread and calls cfg->wake. Also called on the main thread by eng_destroy. */
void oai_on_engine_event(void *fe, const eng_event *ev);
/* Loop thread: delivers the copied events to their responses. */
void oai_process_events(oai_frontend *fe);

/* From now on new generation requests get 503. */
void oai_set_draining(oai_frontend *fe);
/* Responses not yet finished. */
int oai_jobs_count(const oai_frontend *fe);
/* Shutdown deadline: aborts every live engine request; the responses end as aborted. */
void oai_abort_all(oai_frontend *fe);

#endif
