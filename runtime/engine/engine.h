/* The engine: requests in, tokens out. It owns the KV block pool, the scheduler (FCFS waiting
 * queue, continuous batching of decodes with chunked prefills under a token budget,
 * preemption by recompute when blocks run out, prefix caching) and sampling, and drives the
 * model one step at a time.
 *
 * Threads: eng_submit, eng_abort and eng_lease_release may be called from any thread (they
 * post to an inbox); eng_step and everything else run on the engine thread, which is also the
 * thread the event callback is called on. Under tensor parallelism only the TP leader has an
 * engine; followers run par_follow (parallel.h) with the plans the engine broadcasts. */
#ifndef DUET_ENGINE_H
#define DUET_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model/model.h"
#include "engine/sampler.h"
#include "base/status.h"

typedef struct tok_tokenizer tok_tokenizer;
typedef struct par_instance par_instance;
typedef struct eng_engine eng_engine;

typedef enum eng_finish {
    ENG_FINISH_NONE = 0,
    ENG_FINISH_LENGTH, /* max_tokens or the model's context */
    ENG_FINISH_STOP,   /* EOS, a stop token or a stop string */
    ENG_FINISH_ABORT,  /* eng_abort, or the engine shutting down */
    ENG_FINISH_ERROR,  /* e.g. a failed KV transfer */
} eng_finish;

const char *eng_finish_name(eng_finish f); /* "length", "stop", "abort", "error" */

#define ENG_MAX_STOP     8
#define ENG_MAX_STOP_IDS 32
#define ENG_MAX_LOGPROBS 20

typedef struct eng_sampling {
    smp_params smp;
    uint64_t seed;
    bool has_seed;
    int max_tokens; /* <= 0: up to the context length */
    int min_tokens;
    bool ignore_eos;
    int n_stop;
    char *stop[ENG_MAX_STOP]; /* copied on submit */
    int n_stop_ids;
    int32_t stop_ids[ENG_MAX_STOP_IDS];
    bool include_stop_str_in_output;
    bool skip_special_tokens;
    int logprobs;        /* -1: none; else top-N alternatives with each token */
    int prompt_logprobs; /* -1: none; else logprobs of every prompt token (echo) */
} eng_sampling;

void eng_sampling_default(eng_sampling *s);

/* Disaggregation roles of a request. */
typedef enum eng_kv_role {
    ENG_KV_LOCAL = 0,
    /* prefill side: keep the prompt's blocks after finishing, under a lease the transfer
     * layer releases (or that expires) */
    ENG_KV_LEASE = 1,
    /* decode side: the prompt's KV (but its last token) comes from a remote prefill; the
     * engine allocates blocks and asks the fetch hook to fill them */
    ENG_KV_REMOTE = 2,
    /* decode side, n > 1 choices of one remote prompt: the prompt's KV is that of request
     * fork_of (ENG_KV_REMOTE, same prompt, submitted before this one). When its transfer lands
     * the full blocks are shared (reference counts) and the partly filled one is copied, so
     * this request computes the last prompt token itself as fork_of does, then samples on its
     * own. If fork_of is gone or not a pending remote request, the prompt is computed here;
     * if its transfer fails, this request fails (or is aborted) with it. */
    ENG_KV_FORK = 3,
} eng_kv_role;

typedef struct eng_request {
    uint64_t id; /* unique among live requests, chosen by the caller */
    const int32_t *prompt;
    int n_prompt;
    eng_sampling sampling;
    eng_kv_role kv_role;
    void *remote;     /* ENG_KV_REMOTE: opaque transfer descriptor for the fetch hook */
    uint64_t fork_of; /* ENG_KV_FORK: the ENG_KV_REMOTE request whose KV this one shares */
    void *user;       /* handed back in events */
    /* test hook: every logits row computed for this request (prompt rows when
     * prompt_logprobs >= 0, then one per generated token), before sampling */
    void (*on_logits)(void *user, int pos, const float *row, int V);
    /* test hook (ENG_KV_REMOTE): the prompt's blocks right after the remote KV landed, before
     * anything is computed into them */
    void (*on_kv_ready)(void *user, const int32_t *blocks, int n_blocks);
    /* test hook (MTP): the n_draft drafts the request will verify next, after n_output output
     * tokens; it may change them (tests steer acceptance with it) */
    void (*on_draft)(void *user, int n_output, int32_t *draft, int n_draft);
} eng_request;

typedef struct eng_token_lp {
    int32_t token;
    float logprob;
    int n_top;
    smp_logprob top[ENG_MAX_LOGPROBS];
} eng_token_lp;

/* What one step produced for one request. Pointers are valid during the callback only. */
typedef struct eng_event {
    uint64_t id;
    void *user;
    const int32_t *tokens; /* new output tokens (0 or 1) */
    int n_tokens;
    const eng_token_lp *logprobs;        /* per new token, when asked */
    const eng_token_lp *prompt_logprobs; /* once, [n_prompt] (first has no logprob), if asked */
    const char *text; /* new detokenized text, with stop strings held back until decided */
    size_t text_len;
    eng_finish finish;                /* set on the last event of a request */
    const char *stop_reason;          /* matched stop string, or NULL */
    int32_t stop_token;               /* matched stop token id, or -1 */
    const char *error;                /* ENG_FINISH_ERROR: what went wrong */
    int n_prompt, n_output, n_cached; /* usage; n_cached: prompt tokens from prefix cache */
    /* ENG_KV_LEASE: the leased blocks holding the prompt's KV, on the finishing event (when
     * the prompt was computed) and on the lease_open event */
    const int32_t *lease_blocks;
    int n_lease_blocks;
    /* ENG_KV_LEASE: the request was admitted and its lease made (no tokens, not finishing): a
     * decode worker may pin it now and read its blocks as the prompt is computed */
    bool lease_open;
} eng_event;

typedef void (*eng_event_fn)(void *user, const eng_event *ev);

/* Decode side of disaggregation: asked to fill blocks[0..n) (this engine's block ids, n may be
 * 0) with the KV of blocks skip_blocks.. of the prompt described by remote (the first
 * skip_blocks are in this engine's prefix cache); n_tokens prompt tokens come from remote in
 * all. It must also let the remote side free its lease, even when n is 0. It later calls
 * eng_kv_fetched from any thread. Returning an error fails the request at once. */
typedef duet_status (*eng_fetch_fn)(void *user, uint64_t id, void *remote, const int32_t *blocks,
                                    int n_blocks, int skip_blocks, int n_tokens);

typedef struct eng_config {
    int max_num_seqs;
    int max_num_batched_tokens;
    int max_model_len;
    int block_size;
    int n_blocks;
    bool prefix_caching;
    double lease_timeout_s; /* prefill leases expire after this (default 30) */
    eng_event_fn on_event;
    void *event_user;
    eng_fetch_fn fetch;
    void *fetch_user;
    /* MTP speculative decoding: drafts per step, 0 (off, the default) up to the model's
     * mdl_spec_tokens (the module must be loaded: mdl_load_opts.spec_tokens). Greedy requests
     * without penalties draft; the others decode one token a step. */
    int spec_tokens;
} eng_config;

void eng_config_default(eng_config *c);

/* The engine runs the model of inst (TP leader rank) on a KV cache it allocates. tok may be
 * NULL (no text, no stop strings). */
duet_status eng_create(const eng_config *cfg, par_instance *inst, const tok_tokenizer *tok,
                       eng_engine **eng_p);
/* Aborts every request (their final events are delivered) and frees everything. */
void eng_destroy(eng_engine *e);

/* Any thread. The request is validated here (prompt length, token ids, sampling) and copied;
 * on error err gets a message fit for a client and nothing is queued. */
duet_status eng_submit(eng_engine *e, const eng_request *req, char *err, size_t err_len);
/* Any thread; unknown ids are ignored. The request finishes with ENG_FINISH_ABORT and its
 * blocks are freed at the next step. */
void eng_abort(eng_engine *e, uint64_t id);
/* How far a leased prompt's KV is written: blocks [0, ready) of the lease hold all of it; while
 * an engine step computes the prompt's next chunk, blocks [ready, partial) (those the chunk
 * fills to their end) already hold their first `layers` layers (the model's, never the MTP
 * module's, which is written after the step), where the backend can tell (mdl_layers_done);
 * partial == ready and layers == 0 otherwise. */
typedef struct eng_lease_ready {
    int ready, partial, layers;
} eng_lease_ready;

/* Any thread (prefill side): the decode side is about to read lease id. Copies its block ids
 * (at most cap) and restarts its deadline, so the blocks stay put while the reader works;
 * *ready_p: blocks [0, ready) hold their whole KV now (all of them once the prompt is
 * computed; fewer while it is: eng_lease_progress tells how far it has come since).
 * DUET_ERR_NOT_FOUND when the lease is gone (released or expired), DUET_ERR_CANCELED when its
 * request failed or was aborted before the prompt was computed: the reader must fail (and
 * release a lease it pinned). A lease exists from its request's admission (the lease_open
 * event) on. */
duet_status eng_lease_pin(eng_engine *e, uint64_t id, int32_t *blocks, int cap, int *n_p,
                          eng_lease_ready *ready_p);
/* Any thread (prefill side): how far a pinned lease's prompt has come (as in eng_lease_pin);
 * the same errors. */
duet_status eng_lease_progress(eng_engine *e, uint64_t id, eng_lease_ready *ready_p);
/* Engine thread; benchmarks and tests of the transfer path only: takes blocks for n_tokens
 * and leases them under id as if a prefill of that length had just finished (their contents
 * are whatever the pool held: callers fill them). The ids go to blocks (at most cap). */
duet_status eng_lease_for_test(eng_engine *e, uint64_t id, int n_tokens, int32_t *blocks, int cap,
                               int *n_p);
/* Any thread: the decode side finished (or gave up) reading a lease's blocks; they are
 * freed at the next step. */
void eng_lease_release(eng_engine *e, uint64_t id);
/* Any thread (decode side): the fetch for request id completed. */
void eng_kv_fetched(eng_engine *e, uint64_t id, bool ok, const char *error);

/* Engine thread: takes the inbox, schedules and runs one step. *busy_p tells whether there is
 * more work (running or waiting requests). */
duet_status eng_step(eng_engine *e, bool *busy_p);
/* Engine thread: blocks until the inbox has something or timeout_ms passes. */
void eng_wait(eng_engine *e, int timeout_ms);
/* Wakes eng_wait (any thread). */
void eng_wake(eng_engine *e);

typedef struct eng_stats {
    int n_running, n_waiting, n_leased;
    int n_blocks, n_free_blocks;
    uint64_t prefix_queries, prefix_hits; /* in blocks */
    uint64_t n_preemptions;
    uint64_t prompt_tokens, generation_tokens;
    uint64_t n_steps;
    /* sampling: rows drawn; engine-thread seconds spent on it (filling the rows, queueing,
     * taking the results: the host's part) and waiting for the device's part */
    uint64_t sample_rows;
    double sample_host_s, sample_wait_s;
    /* MTP speculative decoding (vLLM's spec_decode counters): verify steps with drafts,
     * drafts verified, drafts accepted, and accepted at each draft position */
    uint64_t spec_drafts, spec_draft_tokens, spec_accepted;
    uint64_t spec_accepted_per_pos[MDL_MAX_DRAFT];
} eng_stats;

/* Any thread: a snapshot, updated once per step. */
void eng_get_stats(eng_engine *e, eng_stats *st);
/* Engine thread: the KV cache (for the transfer layer's registration). */
be_kv *eng_kv(eng_engine *e);
int eng_vocab_size(const eng_engine *e);

#endif
