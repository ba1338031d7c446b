/* The engine; see engine.h. One step: take the inbox, expire leases, schedule (running
 * requests first, in admission order, then waiting ones FCFS), run the model on the
 * scheduled tokens, sample where a request's tokens are all computed, detokenize and check
 * stop conditions, emit events.
 *
 * Sampling is one call of the backend's sampling op per step (model/backend.h: the rule of
 * be_sample_row), on the device where the backend has one: the logits stay where the forward
 * left them, the step's rows go up in one upload and the tokens (with the logprobs asked for)
 * come down in one download. Only prompt logprobs and the on_logits hook still take whole
 * rows to the host. */
#include "engine/engine.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/clock.h"
#include "engine/kv_pool.h"
#include "base/log.h"
#include "engine/parallel.h"
#include "engine/spec.h"
#include "text/tokenizer.h"

typedef enum req_state {
    RS_WAITING = 0,
    RS_RUNNING,
    RS_FETCHING, /* decode side: blocks being filled by a remote prefill */
    RS_FORKING,  /* decode side: waits for the remote KV of the request it forks */
} req_state;

/* Prefill side: a prompt's blocks kept for the decode side to read. A lease is made when its
 * request is admitted, with blocks for the whole prompt (a reference of its own on each), and
 * is readable while the prompt is computed: ready_tokens says how far (after each step, once
 * the step's KV is written). Its request finishing makes it whole (computing false, the
 * deadline running) or failed. Shared with the transfer layer's threads (pin, progress,
 * release) under lease_mu; the blocks are freed by the engine thread only, once released, or
 * expired and not read since, never while computing (the request points at it then). */
typedef struct lease {
    uint64_t id;
    int32_t *blocks;
    int n_blocks;
    int n_tokens;     /* the prompt's tokens */
    int ready_tokens; /* tokens [0, ready_tokens) have their KV written */
    int step_hi;      /* in_step: the step under way computes tokens [ready_tokens, step_hi) */
    bool in_step;
    double deadline; /* once not computing */
    bool computing;  /* its request is still computing the prompt */
    bool failed;     /* its request failed or was aborted before the prompt was computed */
    bool pinned;     /* a reader pinned it */
    bool released;
    struct lease *next;
} lease;

typedef struct ereq ereq;
struct ereq {
    uint64_t id;
    void *user;
    eng_sampling sp;
    eng_kv_role role;
    void *remote;
    uint64_t fork_of; /* ENG_KV_FORK */
    void (*on_logits)(void *user, int pos, const float *row, int V);
    void (*on_kv_ready)(void *user, const int32_t *blocks, int n_blocks);
    void (*on_draft)(void *user, int n_output, int32_t *draft, int n_draft);
    req_state state;
    ereq *prev, *next; /* in its queue */
    ereq *hnext;       /* id hash chain */

    int32_t *tokens; /* prompt then output, capacity n_prompt + max_tokens */
    int n_prompt, n_tokens, max_tokens;
    int n_computed; /* tokens whose KV is written */
    int32_t *blocks;
    int n_blocks, cap_blocks;
    int n_hashed; /* full blocks entered in the prefix cache */
    uint64_t last_hash;
    int n_cached_tokens;
    int prefix_queries, prefix_hits; /* of the last match_prefix, counted when admitted */
    int n_sched;                     /* tokens scheduled in the current step */
    int n_spec;                      /* of which MTP drafts to verify (after its last token) */
    spec_req spec;
    bool abort_pending, fetched;
    lease *lease; /* ENG_KV_LEASE once admitted, until it finishes */

    uint64_t seed; /* Philox key of its draws; the counter is the output token's index */
    int slot;      /* penalty slot of the sampler while it holds one, else -1 */
    tok_stream *detok;
    char *text; /* detokenized output not yet sent (stop strings held back) */
    size_t text_len, text_cap;
    eng_token_lp *prompt_lp;
    eng_token_lp last_lp;
};

typedef struct rqueue {
    ereq *head, *tail;
    int n;
} rqueue;

typedef enum cmd_kind { CMD_SUBMIT, CMD_ABORT, CMD_FETCHED } cmd_kind;

typedef struct cmd {
    cmd_kind kind;
    uint64_t id;
    ereq *req; /* CMD_SUBMIT */
    bool ok;
    char error[160];
    struct cmd *next;
} cmd;

struct eng_engine {
    eng_config cfg;
    par_instance *inst;
    mdl_model *model;
    const tok_tokenizer *tok;
    be_kv *kv;
    kv_pool *pool;
    int V, eos;
    rqueue waiting, running, fetching, forking;
    pthread_mutex_t lease_mu;
    lease *leases;
    int n_leases;
    ereq **table;
    size_t table_cap;

    pthread_mutex_t mu;
    pthread_cond_t cv;
    cmd *inbox_head, *inbox_tail;
    bool wake;

    /* per-step scratch, sized at create */
    ereq **sched;
    mdl_seq *seqs;
    int *row0;         /* [max_num_seqs]: each scheduled request's first logits row */
    int *sample_at;    /* [max_num_seqs]: its row among the sampler's, or -1 */
    int *tok0;         /* [max_num_seqs]: its first token among the step's */
    spec_engine *spec; /* MTP speculative decoding (cfg.spec_tokens > 0) */
    ereq **drafting;   /* [max_num_seqs]: the requests of the step's MTP batch */
    int n_drafting;
    float *logits; /* host rows: prompt logprobs and the on_logits hook only */
    int cap_logit_rows;
    int32_t *host_rows;
    smp_scratch smp; /* prompt logprobs */

    /* sampling on the backend: rows for up to max_num_seqs requests a step, and as many
     * penalty slots (a request holds one from its first penalized draw to its end) */
    be_backend *be;
    be_sampler *sampler;
    int32_t *free_slots;
    int n_free_slots;

    eng_stats stats;
    pthread_mutex_t stats_mu;
    eng_stats snapshot;
};

const char *eng_finish_name(eng_finish f) {
    switch (f) {
    case ENG_FINISH_LENGTH:
        return "length";
    case ENG_FINISH_STOP:
        return "stop";
    case ENG_FINISH_ABORT:
        return "abort";
    case ENG_FINISH_ERROR:
        return "error";
    default:
        return NULL;
    }
}

void eng_sampling_default(eng_sampling *s) {
    memset(s, 0, sizeof *s);
    smp_params_default(&s->smp);
    s->max_tokens = 16;
    s->skip_special_tokens = true;
    s->logprobs = -1;
    s->prompt_logprobs = -1;
}

void eng_config_default(eng_config *c) {
    memset(c, 0, sizeof *c);
    c->max_num_seqs = 256;
    c->max_num_batched_tokens = 2048;
    c->max_model_len = 4096;
    c->block_size = 64;
    c->n_blocks = 1024;
    c->prefix_caching = true;
    c->lease_timeout_s = 30.0;
}

/* ---- queues and the id table ---- */

static void q_push_back(rqueue *q, ereq *r) {
    r->prev = q->tail;
    r->next = NULL;
    if (q->tail)
        q->tail->next = r;
    else
        q->head = r;
    q->tail = r;
    q->n++;
}

static void q_push_front(rqueue *q, ereq *r) {
    r->next = q->head;
    r->prev = NULL;
    if (q->head)
        q->head->prev = r;
    else
        q->tail = r;
    q->head = r;
    q->n++;
}

static void q_remove(rqueue *q, ereq *r) {
    if (r->prev)
        r->prev->next = r->next;
    else
        q->head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        q->tail = r->prev;
    r->prev = r->next = NULL;
    q->n--;
}

static rqueue *queue_of(eng_engine *e, ereq *r) {
    switch (r->state) {
    case RS_WAITING:
        return &e->waiting;
    case RS_RUNNING:
        return &e->running;
    case RS_FORKING:
        return &e->forking;
    default:
        return &e->fetching;
    }
}

static size_t slot_of(const eng_engine *e, uint64_t id) {
    id ^= id >> 31;
    id *= 0x9e3779b97f4a7c15ull;
    return (size_t)(id >> 20) & (e->table_cap - 1);
}

static ereq *table_find(eng_engine *e, uint64_t id) {
    for (ereq *r = e->table[slot_of(e, id)]; r; r = r->hnext)
        if (r->id == id) return r;
    return NULL;
}

static void table_insert(eng_engine *e, ereq *r) {
    size_t k = slot_of(e, r->id);
    r->hnext = e->table[k];
    e->table[k] = r;
}

static void table_remove(eng_engine *e, ereq *r) {
    ereq **link = &e->table[slot_of(e, r->id)];
    while (*link && *link != r) link = &(*link)->hnext;
    if (*link) *link = r->hnext;
}

/* ---- request memory ---- */

static void req_free(ereq *r) {
    if (!r) return;
    for (int i = 0; i < r->sp.n_stop; i++) free(r->sp.stop[i]);
    tok_stream_destroy(r->detok);
    free(r->tokens);
    free(r->blocks);
    free(r->text);
    free(r->prompt_lp);
    free(r);
}

static void release_blocks(eng_engine *e, ereq *r) {
    /* last block first: the tail of a sequence is the least likely to be shared again */
    for (int i = r->n_blocks - 1; i >= 0; i--) kv_pool_release(e->pool, &r->blocks[i], 1);
    r->n_blocks = 0;
    r->n_hashed = 0;
    r->last_hash = 0;
}

static int text_append(ereq *r, const char *s, size_t n) {
    if (r->text_len + n + 1 > r->text_cap) {
        size_t cap = r->text_cap ? r->text_cap * 2 : 256;
        while (cap < r->text_len + n + 1) cap *= 2;
        char *t = realloc(r->text, cap);
        if (!t) return -1;
        r->text = t;
        r->text_cap = cap;
    }
    memcpy(r->text + r->text_len, s, n);
    r->text_len += n;
    r->text[r->text_len] = '\0';
    return 0;
}

/* ---- events ---- */

static void emit(eng_engine *e, ereq *r, const eng_event *ev) {
    if (e->cfg.on_event) e->cfg.on_event(e->cfg.event_user, ev);
    (void)r;
}

static void event_init(eng_event *ev, const ereq *r) {
    memset(ev, 0, sizeof *ev);
    ev->id = r->id;
    ev->user = r->user;
    ev->n_prompt = r->n_prompt;
    ev->n_output = r->n_tokens - r->n_prompt;
    ev->n_cached = r->n_cached_tokens;
    ev->stop_token = -1;
}

/* A request's penalty slot back to the pool (its counts are rebuilt from its tokens when it
 * samples again). */
static void slot_release(eng_engine *e, ereq *r) {
    if (r->slot < 0) return;
    e->free_slots[e->n_free_slots++] = r->slot;
    r->slot = -1;
}

/* Ends a request: its final event, its blocks (unless leased), its memory. */
static void finish(eng_engine *e, ereq *r, eng_finish why, const char *stop_reason,
                   int32_t stop_token, const char *error, const int32_t *new_tok,
                   const eng_token_lp *new_lp) {
    eng_event ev;
    event_init(&ev, r);
    ev.finish = why;
    ev.stop_reason = stop_reason;
    ev.stop_token = stop_token;
    ev.error = error;
    if (new_tok) {
        ev.tokens = new_tok;
        ev.n_tokens = 1;
        ev.logprobs = new_lp;
        /* finishing on the first output token: this is the event emit_token would have used */
        if (r->prompt_lp && r->n_tokens - r->n_prompt == 1) ev.prompt_logprobs = r->prompt_lp;
    }
    if (r->detok && why != ENG_FINISH_ABORT && why != ENG_FINISH_ERROR) {
        const char *t;
        size_t n;
        tok_stream_finish(r->detok, &t, &n);
        if (!stop_reason) text_append(r, t, n);
    }
    ev.text = r->text;
    ev.text_len = r->text_len;
    q_remove(queue_of(e, r), r);
    lease *l = r->lease;
    if (l) {
        /* the lease made at admission outlives the request: whole when the prompt was
         * computed, failed otherwise (a reader hears so and releases it) */
        bool whole =
            (why == ENG_FINISH_LENGTH || why == ENG_FINISH_STOP) && r->n_computed >= l->n_tokens;
        pthread_mutex_lock(&e->lease_mu);
        l->computing = false;
        l->failed = !whole;
        if (whole) l->ready_tokens = l->n_tokens;
        l->deadline = clock_now_s() + e->cfg.lease_timeout_s;
        if (!whole && !l->pinned) l->released = true; /* nobody reads it: freed now */
        pthread_mutex_unlock(&e->lease_mu);
        if (whole) {
            ev.lease_blocks = l->blocks;
            ev.n_lease_blocks = l->n_blocks;
        }
        r->lease = NULL;
    }
    emit(e, r, &ev);
    release_blocks(e, r);
    slot_release(e, r);
    table_remove(e, r);
    req_free(r);
}

duet_status eng_lease_for_test(eng_engine *e, uint64_t id, int n_tokens, int32_t *blocks, int cap,
                               int *n_p) {
    int n = (n_tokens + e->cfg.block_size - 1) / e->cfg.block_size;
    if (n <= 0 || n > cap) return DUET_ERR_INVALID;
    lease *l = calloc(1, sizeof *l);
    int32_t *ids = malloc((size_t)n * sizeof(int32_t));
    duet_status st = l && ids ? kv_pool_alloc(e->pool, n, ids) : DUET_ERR_NO_MEMORY;
    if (st != DUET_OK) {
        free(l);
        free(ids);
        return st;
    }
    memcpy(blocks, ids, (size_t)n * sizeof(int32_t));
    *n_p = n;
    l->id = id;
    l->blocks = ids;
    l->n_blocks = n;
    l->n_tokens = l->ready_tokens = n_tokens;
    l->deadline = clock_now_s() + e->cfg.lease_timeout_s;
    pthread_mutex_lock(&e->lease_mu);
    l->next = e->leases;
    e->leases = l;
    e->n_leases++;
    pthread_mutex_unlock(&e->lease_mu);
    return DUET_OK;
}

/* ---- inbox ---- */

static void post(eng_engine *e, cmd *c) {
    pthread_mutex_lock(&e->mu);
    if (e->inbox_tail)
        e->inbox_tail->next = c;
    else
        e->inbox_head = c;
    e->inbox_tail = c;
    e->wake = true;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

void eng_wake(eng_engine *e) {
    pthread_mutex_lock(&e->mu);
    e->wake = true;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

void eng_wait(eng_engine *e, int timeout_ms) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += timeout_ms / 1000;
    ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&e->mu);
    while (!e->wake && !e->inbox_head)
        if (pthread_cond_timedwait(&e->cv, &e->mu, &ts) != 0) break;
    e->wake = false;
    pthread_mutex_unlock(&e->mu);
}

static void post_simple(eng_engine *e, cmd_kind kind, uint64_t id, bool ok, const char *error) {
    cmd *c = calloc(1, sizeof *c);
    if (!c) {
        LOG_ERROR("engine: out of memory posting a command for request %llu",
                  (unsigned long long)id);
        return;
    }
    c->kind = kind;
    c->id = id;
    c->ok = ok;
    if (error) snprintf(c->error, sizeof c->error, "%s", error);
    post(e, c);
}

void eng_abort(eng_engine *e, uint64_t id) {
    post_simple(e, CMD_ABORT, id, false, NULL);
}

void eng_lease_release(eng_engine *e, uint64_t id) {
    pthread_mutex_lock(&e->lease_mu);
    for (lease *l = e->leases; l; l = l->next)
        if (l->id == id) l->released = true;
    pthread_mutex_unlock(&e->lease_mu);
    eng_wake(e);
}

/* How far l's KV is written (lease_mu held: the step range and the model's layer marks are
 * set under it, so the layers counted are this step's). */
static eng_lease_ready lease_ready(const eng_engine *e, const lease *l) {
    eng_lease_ready r = {0, 0, 0};
    if (!l->computing) {
        r.ready = r.partial = l->failed ? 0 : l->n_blocks;
        return r;
    }
    r.ready = r.partial = l->ready_tokens / e->cfg.block_size;
    if (l->in_step) {
        int layers = mdl_layers_done(e->model);
        if (layers > 0) {
            r.partial = l->step_hi / e->cfg.block_size;
            r.layers = layers;
        }
    }
    return r;
}

duet_status eng_lease_pin(eng_engine *e, uint64_t id, int32_t *blocks, int cap, int *n_p,
                          eng_lease_ready *ready_p) {
    duet_status st = DUET_ERR_NOT_FOUND;
    pthread_mutex_lock(&e->lease_mu);
    for (lease *l = e->leases; l; l = l->next) {
        if (l->id != id || l->released) continue;
        if (l->failed) {
            st = DUET_ERR_CANCELED;
            break;
        }
        if (l->n_blocks > cap) {
            st = DUET_ERR_TOO_LONG;
            break;
        }
        memcpy(blocks, l->blocks, (size_t)l->n_blocks * sizeof(int32_t));
        *n_p = l->n_blocks;
        *ready_p = lease_ready(e, l);
        l->pinned = true;
        /* the reader has this long to finish before the blocks may be reused */
        l->deadline = clock_now_s() + e->cfg.lease_timeout_s;
        st = DUET_OK;
        break;
    }
    pthread_mutex_unlock(&e->lease_mu);
    return st;
}

duet_status eng_lease_progress(eng_engine *e, uint64_t id, eng_lease_ready *ready_p) {
    duet_status st = DUET_ERR_NOT_FOUND;
    pthread_mutex_lock(&e->lease_mu);
    for (lease *l = e->leases; l; l = l->next) {
        if (l->id != id || l->released) continue;
        st = l->failed ? DUET_ERR_CANCELED : DUET_OK;
        *ready_p = lease_ready(e, l);
        break;
    }
    pthread_mutex_unlock(&e->lease_mu);
    return st;
}

void eng_kv_fetched(eng_engine *e, uint64_t id, bool ok, const char *error) {
    post_simple(e, CMD_FETCHED, id, ok, error);
}

static int fail(char *err, size_t err_len, const char *fmt, long long a, long long b) {
    if (err && err_len) snprintf(err, err_len, fmt, a, b);
    return -1;
}

duet_status eng_submit(eng_engine *e, const eng_request *req, char *err, size_t err_len) {
    const eng_sampling *sp = &req->sampling;
    int n = req->n_prompt;
    if (n < 1) return fail(err, err_len, "the prompt is empty%.0lld%.0lld", 0, 0), DUET_ERR_INVALID;
    if (n >= e->cfg.max_model_len)
        return fail(err, err_len,
                    "This model's maximum context length is %lld tokens and your request has "
                    "%lld input tokens",
                    e->cfg.max_model_len, n),
               DUET_ERR_TOO_LONG;
    for (int i = 0; i < n; i++)
        if (req->prompt[i] < 0 || req->prompt[i] >= e->V)
            return fail(err, err_len, "token id %lld is out of vocabulary (size %lld)",
                        req->prompt[i], e->V),
                   DUET_ERR_INVALID;
    if (smp_params_check(&sp->smp, err, err_len) != DUET_OK) return DUET_ERR_INVALID;
    if (sp->n_stop < 0 || sp->n_stop > ENG_MAX_STOP || sp->n_stop_ids < 0 ||
        sp->n_stop_ids > ENG_MAX_STOP_IDS)
        return fail(err, err_len, "at most %lld stop strings and %lld stop token ids", ENG_MAX_STOP,
                    ENG_MAX_STOP_IDS),
               DUET_ERR_INVALID;
    if (sp->logprobs > ENG_MAX_LOGPROBS || sp->prompt_logprobs > ENG_MAX_LOGPROBS)
        return fail(err, err_len, "logprobs must be at most %lld%.0lld", ENG_MAX_LOGPROBS, 0),
               DUET_ERR_INVALID;
    if (sp->min_tokens < 0 || (sp->max_tokens > 0 && sp->min_tokens > sp->max_tokens))
        return fail(err, err_len, "min_tokens (%lld) must be between 0 and max_tokens (%lld)",
                    sp->min_tokens, sp->max_tokens),
               DUET_ERR_INVALID;
    int room = e->cfg.max_model_len - n;
    int max_tokens = sp->max_tokens > 0 ? sp->max_tokens : room;
    if (max_tokens > room)
        return fail(err, err_len,
                    "This model's maximum context length is %lld tokens. However, you requested "
                    "more tokens in the completion than fit after the prompt (%lld)",
                    e->cfg.max_model_len, room),
               DUET_ERR_TOO_LONG;
    /* a prompt that cannot fit the whole pool would wait forever */
    long long need = ((long long)n + 1 + e->cfg.block_size - 1) / e->cfg.block_size;
    if (need > e->cfg.n_blocks)
        return fail(err, err_len, "the prompt needs %lld KV blocks but the cache holds only %lld",
                    need, e->cfg.n_blocks),
               DUET_ERR_TOO_LONG;
    if (req->kv_role == ENG_KV_REMOTE && !e->cfg.fetch)
        return fail(err, err_len, "this instance cannot receive remote KV%.0lld%.0lld", 0, 0),
               DUET_ERR_UNSUPPORTED;

    ereq *r = calloc(1, sizeof *r);
    if (!r) return DUET_ERR_NO_MEMORY;
    r->id = req->id;
    r->user = req->user;
    r->sp = *sp;
    r->role = req->kv_role;
    r->remote = req->remote;
    r->fork_of = req->kv_role == ENG_KV_FORK ? req->fork_of : 0;
    r->on_logits = req->on_logits;
    r->on_kv_ready = req->on_kv_ready;
    r->on_draft = req->on_draft;
    r->n_prompt = r->n_tokens = n;
    r->max_tokens = max_tokens;
    r->slot = -1;
    r->tokens = malloc((size_t)(n + max_tokens) * sizeof(int32_t));
    r->cap_blocks = (n + max_tokens + e->cfg.block_size - 1) / e->cfg.block_size + 1;
    r->blocks = malloc((size_t)r->cap_blocks * sizeof(int32_t));
    if (sp->prompt_logprobs >= 0) r->prompt_lp = calloc((size_t)n, sizeof *r->prompt_lp);
    bool oom = !r->tokens || !r->blocks || (sp->prompt_logprobs >= 0 && !r->prompt_lp);
    for (int i = 0; i < sp->n_stop; i++) {
        r->sp.stop[i] = strdup(sp->stop[i] ? sp->stop[i] : "");
        oom |= !r->sp.stop[i];
    }
    if (!oom && e->tok && tok_stream_create(e->tok, sp->skip_special_tokens, &r->detok) != DUET_OK)
        oom = true;
    if (oom) {
        req_free(r);
        return DUET_ERR_NO_MEMORY;
    }
    memcpy(r->tokens, req->prompt, (size_t)n * sizeof(int32_t));
    static uint64_t counter;
    uint64_t salt = __atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED);
    uint64_t seed = sp->has_seed
                        ? sp->seed
                        : (uint64_t)(clock_now_s() * 1e9) ^ (salt * 0x9e3779b97f4a7c15ull) ^ r->id;
    r->seed = seed;
    cmd *c = calloc(1, sizeof *c);
    if (!c) {
        req_free(r);
        return DUET_ERR_NO_MEMORY;
    }
    c->kind = CMD_SUBMIT;
    c->id = r->id;
    c->req = r;
    post(e, c);
    return DUET_OK;
}

/* Prefill side: r (ENG_KV_LEASE) was admitted with blocks for its whole prompt; they are
 * leased now, readable as the prompt is computed, and the lease is announced (an event with
 * lease_open) so that a decode worker can start pulling before the prompt is done. */
static duet_status lease_open(eng_engine *e, ereq *r) {
    int nb = (r->n_prompt + e->cfg.block_size - 1) / e->cfg.block_size;
    lease *l = calloc(1, sizeof *l);
    int32_t *ids = malloc((size_t)nb * sizeof(int32_t));
    if (!l || !ids || nb > r->n_blocks) {
        free(l);
        free(ids);
        return l && ids ? DUET_ERR_INTERNAL : DUET_ERR_NO_MEMORY;
    }
    memcpy(ids, r->blocks, (size_t)nb * sizeof(int32_t));
    for (int i = 0; i < nb; i++) kv_pool_ref(e->pool, ids[i]);
    l->id = r->id;
    l->blocks = ids;
    l->n_blocks = nb;
    l->n_tokens = r->n_prompt;
    l->ready_tokens = r->n_computed; /* prefix-cache hits are there already */
    l->computing = true;
    pthread_mutex_lock(&e->lease_mu);
    l->next = e->leases;
    e->leases = l;
    e->n_leases++;
    pthread_mutex_unlock(&e->lease_mu);
    r->lease = l;
    eng_event ev;
    event_init(&ev, r);
    ev.lease_open = true;
    ev.lease_blocks = ids;
    ev.n_lease_blocks = nb;
    emit(e, r, &ev);
    return DUET_OK;
}

/* After a step whose KV is written (eng_step synchronized with the backend before this): r's
 * lease is readable further. */
static void lease_advance(eng_engine *e, ereq *r) {
    lease *l = r->lease;
    pthread_mutex_lock(&e->lease_mu);
    l->ready_tokens = r->n_computed < l->n_tokens ? r->n_computed : l->n_tokens;
    l->in_step = false;
    pthread_mutex_unlock(&e->lease_mu);
}

/* Before a step that computes chunks of leased prompts: their leases learn the step's range
 * and the model notes each layer as its KV is written, so a reader can take a chunk's first
 * layers before the step ends (under lease_mu: a reader's view of the marks is this step's). */
static void leases_step_begin(eng_engine *e, int n) {
    bool any = false;
    for (int i = 0; i < n && !any; i++) {
        const ereq *r = e->sched[i];
        any = r->lease && r->n_computed < r->lease->n_tokens;
    }
    if (!any) return;
    pthread_mutex_lock(&e->lease_mu);
    for (int i = 0; i < n; i++) {
        const ereq *r = e->sched[i];
        lease *l = r->lease;
        if (!l || r->n_computed >= l->n_tokens) continue;
        int hi = r->n_computed + r->n_sched;
        l->step_hi = hi < l->n_tokens ? hi : l->n_tokens;
        l->in_step = true;
    }
    mdl_layer_marks(e->model, true);
    pthread_mutex_unlock(&e->lease_mu);
}

/* Abort by id, wherever the request is. A fetch in flight keeps its blocks until the transfer
 * layer reports back: it may still be writing into them. */
static void abort_req(eng_engine *e, ereq *r) {
    if (r->state == RS_FETCHING) {
        r->abort_pending = true;
        return;
    }
    finish(e, r, ENG_FINISH_ABORT, NULL, -1, NULL, NULL, NULL);
}

/* ---- n > 1 of a remote prompt: forks of its pulled KV ---- */

/* Whether child can wait for the KV of the request it forks: that one must be a remote
 * request of the same prompt whose transfer has not landed yet. Otherwise the child computes
 * its prompt itself (the same answer, only slower). */
static bool fork_pending(eng_engine *e, const ereq *child) {
    const ereq *p = table_find(e, child->fork_of);
    bool ok = p && p != child && p->role == ENG_KV_REMOTE && !p->fetched &&
              p->n_prompt == child->n_prompt &&
              !memcmp(p->tokens, child->tokens, (size_t)p->n_prompt * sizeof(int32_t));
    if (!ok)
        LOG_DEBUG("engine: request %llu cannot fork request %llu's KV; computing its prompt",
                  (unsigned long long)child->id, (unsigned long long)child->fork_of);
    return ok;
}

/* Copies one block's KV (every layer) on this rank and its TP followers. */
static duet_status kv_block_copy(eng_engine *e, int32_t src, int32_t dst) {
    be_kv *kv = e->kv;
    duet_status st = DUET_OK;
    if (!kv->on_device) {
        memcpy((char *)kv->data + (size_t)dst * kv->block_bytes,
               (const char *)kv->data + (size_t)src * kv->block_bytes, kv->block_bytes);
    } else {
        be_backend *be = mdl_backend(e->model);
        void *tmp = be->ops->kv_copy_host ? malloc(kv->block_bytes) : NULL;
        if (!tmp) return be->ops->kv_copy_host ? DUET_ERR_NO_MEMORY : DUET_ERR_UNSUPPORTED;
        st = be->ops->kv_copy_host(be, kv, &src, 1, tmp, true);
        if (st == DUET_OK) st = be->ops->kv_copy_host(be, kv, &dst, 1, tmp, false);
        free(tmp);
    }
    if (st == DUET_OK) st = par_kv_replicate(e->inst, kv, &dst, 1);
    return st;
}

/* p's KV landed: each request forking it shares p's full prompt blocks and gets a copy of the
 * partly filled one (it will write its own tokens there), then queues like a request whose
 * prefix is computed: its next step computes the last prompt token, as p's does. A fork that
 * finds no free block falls back to computing its prompt. Forks keep their order at the
 * front of the waiting queue: p was admitted before anything waiting now. */
static void forks_start(eng_engine *e, ereq *p) {
    int bs = e->cfg.block_size;
    int filled = p->n_prompt - 1; /* positions whose KV is in place */
    int n_full = filled / bs;
    bool tail = filled % bs != 0;
    for (ereq *c = e->forking.tail, *prev; c; c = prev) {
        prev = c->prev;
        if (c->fork_of != p->id) continue;
        q_remove(&e->forking, c);
        for (int b = 0; b < n_full; b++) {
            kv_pool_ref(e->pool, p->blocks[b]);
            c->blocks[c->n_blocks++] = p->blocks[b];
        }
        bool ok = true;
        if (tail) {
            int32_t id;
            ok = kv_pool_alloc(e->pool, 1, &id) == DUET_OK;
            if (ok) c->blocks[c->n_blocks++] = id; /* released with the rest on failure */
            ok = ok && kv_block_copy(e, p->blocks[n_full], id) == DUET_OK;
        }
        if (ok) {
            c->n_computed = filled;
            c->fetched = true;
            c->n_cached_tokens = p->n_cached_tokens;
        } else {
            LOG_DEBUG("engine: request %llu could not fork request %llu's KV; computing its "
                      "prompt",
                      (unsigned long long)c->id, (unsigned long long)p->id);
            release_blocks(e, c);
        }
        c->state = RS_WAITING;
        q_push_front(&e->waiting, c);
    }
}

/* p's transfer failed or p was aborted while it ran: the requests forking it end alike. */
static void forks_end(eng_engine *e, uint64_t parent, eng_finish f, const char *why) {
    for (ereq *c = e->forking.head, *next; c; c = next) {
        next = c->next;
        if (c->fork_of == parent) finish(e, c, f, NULL, -1, why, NULL, NULL);
    }
}

static void drain_inbox(eng_engine *e) {
    pthread_mutex_lock(&e->mu);
    cmd *c = e->inbox_head;
    e->inbox_head = e->inbox_tail = NULL;
    pthread_mutex_unlock(&e->mu);
    while (c) {
        cmd *next = c->next;
        ereq *r = c->kind == CMD_SUBMIT ? NULL : table_find(e, c->id);
        switch (c->kind) {
        case CMD_SUBMIT:
            if (table_find(e, c->id)) {
                /* ids are unique among live requests; a duplicate is refused at once */
                eng_event ev;
                event_init(&ev, c->req);
                ev.finish = ENG_FINISH_ERROR;
                ev.error = "duplicate request id";
                emit(e, c->req, &ev);
                req_free(c->req);
                break;
            }
            table_insert(e, c->req);
            e->stats.prompt_tokens += (uint64_t)c->req->n_prompt;
            if (c->req->role == ENG_KV_FORK && fork_pending(e, c->req)) {
                c->req->state = RS_FORKING;
                q_push_back(&e->forking, c->req);
                break;
            }
            c->req->state = RS_WAITING;
            q_push_back(&e->waiting, c->req);
            break;
        case CMD_ABORT:
            if (r) abort_req(e, r);
            break;
        case CMD_FETCHED:
            if (!r || r->state != RS_FETCHING) break;
            q_remove(&e->fetching, r);
            if (!c->ok || r->abort_pending) {
                const char *why = c->ok ? NULL : (c->error[0] ? c->error : "KV transfer failed");
                eng_finish f = r->abort_pending ? ENG_FINISH_ABORT : ENG_FINISH_ERROR;
                forks_end(e, r->id, f, why);
                r->state = RS_RUNNING; /* so finish() finds it in a queue */
                q_push_back(&e->running, r);
                finish(e, r, f, NULL, -1, why, NULL, NULL);
                break;
            }
            /* the prompt but its last token is in place: decode computes that one itself; TP
             * followers hold their own copy of the latents and get the blocks from here */
            if (par_kv_replicate(e->inst, e->kv, r->blocks, r->n_blocks) != DUET_OK) {
                forks_end(e, r->id, ENG_FINISH_ERROR, "KV replication to TP ranks failed");
                r->state = RS_RUNNING;
                q_push_back(&e->running, r);
                finish(e, r, ENG_FINISH_ERROR, NULL, -1, "KV replication to TP ranks failed", NULL,
                       NULL);
                break;
            }
            r->n_computed = r->n_prompt - 1;
            r->fetched = true;
            if (r->on_kv_ready) r->on_kv_ready(r->user, r->blocks, r->n_blocks);
            r->state = RS_RUNNING;
            q_push_back(&e->running, r);
            forks_start(e, r);
            break;
        }
        free(c);
        c = next;
    }
}

/* Frees leases that were released, or that nobody read before their deadline. */
static void expire_leases(eng_engine *e) {
    double t = clock_now_s();
    lease *done = NULL;
    pthread_mutex_lock(&e->lease_mu);
    for (lease **link = &e->leases; *link;) {
        lease *l = *link;
        /* a lease whose prompt is still computed ends with its request (finish) */
        if (!l->computing && (l->released || t >= l->deadline)) {
            *link = l->next;
            l->next = done;
            done = l;
            e->n_leases--;
        } else {
            link = &l->next;
        }
    }
    pthread_mutex_unlock(&e->lease_mu);
    while (done) {
        lease *l = done;
        done = l->next;
        if (!l->released)
            LOG_WARN("engine: lease of request %llu expired after %.0f s unread; freeing its %d "
                     "KV blocks",
                     (unsigned long long)l->id, e->cfg.lease_timeout_s, l->n_blocks);
        for (int i = l->n_blocks - 1; i >= 0; i--) kv_pool_release(e->pool, &l->blocks[i], 1);
        free(l->blocks);
        free(l);
    }
}

/* ---- scheduling ---- */

/* Makes r's block table cover `upto` tokens. */
static duet_status ensure_blocks(eng_engine *e, ereq *r, int upto) {
    int need = (upto + e->cfg.block_size - 1) / e->cfg.block_size - r->n_blocks;
    if (need <= 0) return DUET_OK;
    if (r->n_blocks + need > r->cap_blocks) return DUET_ERR_INTERNAL;
    duet_status st = kv_pool_alloc(e->pool, need, r->blocks + r->n_blocks);
    if (st == DUET_OK) r->n_blocks += need;
    return st;
}

/* Frees everything a request holds and sends it back to the front of the waiting queue; it
 * recomputes its tokens (prompt and output so far) when rescheduled. */
static void preempt(eng_engine *e, ereq *r) {
    q_remove(&e->running, r);
    release_blocks(e, r);
    slot_release(e, r); /* while it waits, others may run: max_num_seqs slots must do */
    r->n_computed = 0;
    r->n_sched = 0;
    r->state = RS_WAITING;
    q_push_front(&e->waiting, r);
    e->stats.n_preemptions++;
    LOG_DEBUG("engine: preempted request %llu (%d tokens) to free KV blocks",
              (unsigned long long)r->id, r->n_tokens);
}

/* Prefix-cache hits for a request starting from nothing: full blocks of its tokens, but never
 * the last token (its logits must be computed). */
static void match_prefix(eng_engine *e, ereq *r) {
    int bs = e->cfg.block_size;
    int full = (r->n_tokens - 1) / bs;
    uint64_t parent = 0;
    r->prefix_queries = r->prefix_hits = 0;
    for (int b = 0; b < full; b++) {
        uint64_t h = kv_pool_hash(parent, r->tokens + (size_t)b * bs, bs);
        int32_t id = kv_pool_lookup(e->pool, h, parent, r->tokens + (size_t)b * bs);
        r->prefix_queries++;
        if (id < 0) break;
        r->prefix_hits++;
        r->blocks[r->n_blocks++] = id;
        r->n_hashed = b + 1;
        r->last_hash = h;
        parent = h;
    }
    r->n_computed = r->n_blocks * bs;
}

/* r leaves the waiting queue: its prefix lookup counts now, once, however many steps it waited
 * (each wait gave the hits back and looked them up again). */
static void count_admission(eng_engine *e, ereq *r) {
    kv_pool_count_lookups(e->pool, r->prefix_queries, r->prefix_hits);
    r->prefix_queries = r->prefix_hits = 0;
}

/* Enters r's newly completed full blocks into the prefix cache. */
static void commit_blocks(eng_engine *e, ereq *r) {
    int bs = e->cfg.block_size;
    while ((r->n_hashed + 1) * bs <= r->n_computed) {
        const int32_t *t = r->tokens + (size_t)r->n_hashed * bs;
        uint64_t h = kv_pool_hash(r->last_hash, t, bs);
        kv_pool_commit(e->pool, r->blocks[r->n_hashed], h, r->last_hash, t);
        r->last_hash = h;
        r->n_hashed++;
    }
}

/* The request to preempt so that r can grow: the newest running one not yet scheduled this
 * step (r itself when there is none). */
static ereq *pick_victim(eng_engine *e, ereq *r) {
    for (ereq *v = e->running.tail; v; v = v->prev)
        if (v != r && v->n_sched == 0 && !v->lease) return v; /* a lease may be being read */
    return r;
}

/* Gives r up to `want` tokens of this step; false if r had to be dropped (preempted, or
 * finished because it can never fit). */
static bool schedule_running(eng_engine *e, ereq *r, int want, int *budget, int *n,
                             bool *preempted) {
    while (ensure_blocks(e, r, r->n_computed + want) != DUET_OK) {
        if (r == e->running.head && r == e->running.tail && e->fetching.n == 0 &&
            e->n_leases == 0) {
            /* alone and still out of room: the pool is smaller than this sequence */
            finish(e, r, ENG_FINISH_LENGTH, NULL, -1, NULL, NULL, NULL);
            return false;
        }
        /* out of blocks: the newest running request gives its blocks back */
        ereq *victim = pick_victim(e, r);
        if (victim == r && r->lease) {
            /* a leased request is never preempted (its lease may be being read); it only
             * grows past its prompt, whose blocks it has had since admission: it stops here */
            finish(e, r, ENG_FINISH_LENGTH, NULL, -1, NULL, NULL, NULL);
            return false;
        }
        *preempted = true;
        preempt(e, victim);
        if (victim == r) return false;
    }
    r->n_sched = want;
    *budget -= want;
    e->sched[(*n)++] = r;
    return true;
}

static int schedule(eng_engine *e) {
    int budget = e->cfg.max_num_batched_tokens, n = 0;
    bool preempted = false;
    /* Decodes first (one token each, the latency-critical part), then the chunks of prompts
     * already under way, in admission order, with what is left of the budget. */
    for (int pass = 0; pass < 2; pass++) {
        for (ereq *r = e->running.head, *next; r && budget > 0; r = next) {
            next = r->next;
            int want = r->n_tokens - r->n_computed;
            if (r->n_sched || want <= 0 || (pass == 0) != (want == 1)) continue;
            r->n_spec = pass == 0 ? r->spec.n_draft : 0; /* a decode verifies its drafts */
            want += r->n_spec;
            if (want > budget) want = budget;
            if (pass == 0) r->n_spec = want - 1;
            if (!schedule_running(e, r, want, &budget, &n, &preempted)) {
                /* r is gone from the running queue; so may be others: restart the walk */
                next = e->running.head;
            }
        }
    }
    /* New admissions only when nothing had to be preempted this step. */
    while (!preempted && budget > 0 && e->waiting.head &&
           e->running.n + e->fetching.n < e->cfg.max_num_seqs) {
        ereq *r = e->waiting.head;
        /* prompt logprobs need every prompt row's logits, which cached blocks do not have */
        if (r->n_computed == 0 && r->n_blocks == 0 && !r->prompt_lp) {
            match_prefix(e, r);
            if (r->n_prompt == r->n_tokens) r->n_cached_tokens = r->n_computed;
        }
        if (r->role == ENG_KV_REMOTE && !r->fetched) {
            /* decode side: blocks for the whole prompt, then the transfer fills them */
            int skip = r->n_blocks;
            if (ensure_blocks(e, r, r->n_prompt) != DUET_OK) {
                release_blocks(e, r);
                r->n_computed = 0;
                break;
            }
            q_remove(&e->waiting, r);
            count_admission(e, r);
            int need_tokens = r->n_prompt - 1;
            int fetch_blocks = (need_tokens + e->cfg.block_size - 1) / e->cfg.block_size - skip;
            /* with nothing to read (all in the prefix cache, or a one-token prompt) the fetch
             * still runs: it is what releases the prefill side's lease */
            if (fetch_blocks < 0) fetch_blocks = 0;
            r->state = RS_FETCHING;
            q_push_back(&e->fetching, r);
            duet_status st = e->cfg.fetch(e->cfg.fetch_user, r->id, r->remote, r->blocks + skip,
                                          fetch_blocks, skip, need_tokens);
            if (st != DUET_OK) {
                q_remove(&e->fetching, r);
                r->state = RS_RUNNING;
                q_push_back(&e->running, r);
                finish(e, r, ENG_FINISH_ERROR, NULL, -1, "KV transfer could not start", NULL, NULL);
            }
            continue;
        }
        int want = r->n_tokens - r->n_computed;
        if (want > budget) want = budget;
        /* a leased prompt gets all its blocks now: the lease made below covers them */
        bool leased = r->role == ENG_KV_LEASE && !r->lease && r->n_tokens == r->n_prompt;
        if (ensure_blocks(e, r, leased ? r->n_prompt : r->n_computed + want) != DUET_OK) {
            /* not enough room yet: give back the prefix hits and wait for blocks to free */
            release_blocks(e, r);
            r->n_computed = 0;
            break;
        }
        q_remove(&e->waiting, r);
        count_admission(e, r);
        r->state = RS_RUNNING;
        q_push_back(&e->running, r);
        if (leased && lease_open(e, r) != DUET_OK)
            LOG_WARN("engine: request %llu: its lease could not be made at admission (out of "
                     "memory); it is computed without one",
                     (unsigned long long)r->id);
        r->n_spec = 0;
        r->n_sched = want;
        budget -= want;
        e->sched[n++] = r;
    }
    return n;
}

/* ---- after the forward: sampling, text, stop conditions ---- */

static bool in_stop_ids(const ereq *r, int32_t t) {
    for (int i = 0; i < r->sp.n_stop_ids; i++)
        if (r->sp.stop_ids[i] == t) return true;
    return false;
}

/* Longest stop string, to know how much text must be held back while streaming. */
static size_t max_stop_len(const ereq *r) {
    size_t m = 0;
    for (int i = 0; i < r->sp.n_stop; i++) {
        size_t l = strlen(r->sp.stop[i]);
        m = l > m ? l : m;
    }
    return m;
}

/* Looks for a stop string in r->text, where it could only have appeared with the new text
 * (its last new_len bytes). Returns the index of the string found, -1 if none; cuts the
 * text at the match (keeping the string when asked). */
static int find_stop(ereq *r, size_t new_len) {
    int found = -1;
    size_t at = (size_t)-1;
    for (int i = 0; i < r->sp.n_stop; i++) {
        size_t l = strlen(r->sp.stop[i]);
        if (!l) continue;
        size_t from = r->text_len > new_len + l - 1 ? r->text_len - new_len - (l - 1) : 0;
        char *p = memmem(r->text + from, r->text_len - from, r->sp.stop[i], l);
        if (p && (size_t)(p - r->text) < at) {
            at = (size_t)(p - r->text);
            found = i;
        }
    }
    if (found >= 0) {
        r->text_len = at + (r->sp.include_stop_str_in_output ? strlen(r->sp.stop[found]) : 0);
        r->text[r->text_len] = '\0';
    }
    return found;
}

static void emit_token(eng_engine *e, ereq *r, int32_t tok, const eng_token_lp *lp) {
    size_t hold = max_stop_len(r);
    hold = hold ? hold - 1 : 0;
    size_t send = r->text_len > hold ? r->text_len - hold : 0;
    eng_event ev;
    event_init(&ev, r);
    ev.tokens = &tok;
    ev.n_tokens = 1;
    ev.logprobs = lp;
    ev.text = r->text;
    ev.text_len = send;
    if (r->prompt_lp && r->n_tokens - r->n_prompt == 1) ev.prompt_logprobs = r->prompt_lp;
    emit(e, r, &ev);
    if (r->text) { /* NULL for a request without text (no tokenizer): nothing to move */
        memmove(r->text, r->text + send, r->text_len - send);
        r->text[r->text_len - send] = '\0';
    }
    r->text_len -= send;
}

static void fill_lp(eng_engine *e, const float *row, int32_t tok, int n, eng_token_lp *lp) {
    lp->token = tok;
    lp->n_top = n > 0 ? n : 0;
    smp_logprobs(row, e->V, tok, lp->n_top, &lp->logprob, lp->top, &e->smp);
}

static bool has_penalties(const smp_params *p) {
    return p->repetition_penalty != 1.0f || p->presence_penalty != 0.0f ||
           p->frequency_penalty != 0.0f;
}

/* r's parameters for this step's draw from logits row `row` (its penalty slot set up first
 * when it has none yet). */
static duet_status sample_row(eng_engine *e, ereq *r, int row, int j, be_sample_row *p) {
    const smp_params *sp = &r->sp.smp;
    int n_out = r->n_tokens - r->n_prompt + j; /* j: the j-th draft's row of a verify step */
    be_sample_row_init(p);
    p->logits_row = row;
    p->temperature = sp->temperature;
    p->top_k = sp->top_k;
    p->top_p = sp->top_p;
    p->min_p = sp->min_p;
    p->repetition_penalty = sp->repetition_penalty;
    p->presence_penalty = sp->presence_penalty;
    p->frequency_penalty = sp->frequency_penalty;
    p->seed = r->seed;
    p->offset = (uint64_t)n_out;
    p->n_logprobs = r->sp.logprobs;
    if (n_out < r->sp.min_tokens) {
        /* min_tokens: EOS and the stop tokens may not end the answer yet */
        if (!r->sp.ignore_eos) p->ban[p->n_ban++] = e->eos;
        for (int i = 0; i < r->sp.n_stop_ids; i++) p->ban[p->n_ban++] = r->sp.stop_ids[i];
    }
    if (has_penalties(sp)) {
        if (r->slot < 0) {
            if (e->n_free_slots == 0) return DUET_ERR_INTERNAL; /* one per request: cannot be */
            int slot = e->free_slots[e->n_free_slots - 1];
            duet_status st = be_sampler_slot_init(e->be, e->sampler, slot, r->tokens, r->n_prompt,
                                                  r->tokens + r->n_prompt, n_out);
            if (st != DUET_OK) return st;
            e->n_free_slots--;
            r->slot = slot;
        }
        p->slot = r->slot;
    }
    return DUET_OK;
}

/* r's new token from its row of the sampler's results: text, stop conditions, events. True
 * when r finished (and is freed). */
static bool take_token(eng_engine *e, ereq *r, int k) {
    int n_out = r->n_tokens - r->n_prompt;
    int32_t tok = e->sampler->out[k].token;
    eng_token_lp *lp = NULL;
    if (r->sp.logprobs >= 0) {
        lp = &r->last_lp;
        lp->token = tok;
        lp->logprob = e->sampler->out[k].logprob;
        lp->n_top = r->sp.logprobs < e->V ? r->sp.logprobs : e->V;
        for (int j = 0; j < lp->n_top; j++) {
            lp->top[j].token = e->sampler->top[k].token[j];
            lp->top[j].logprob = e->sampler->top[k].logprob[j];
        }
    }
    r->tokens[r->n_tokens++] = tok;
    n_out++;
    e->stats.generation_tokens++;

    size_t new_len = 0;
    if (r->detok) {
        const char *t;
        size_t n;
        if (tok_stream_put(r->detok, tok, &t, &n) == DUET_OK) {
            text_append(r, t, n);
            new_len = n;
        }
    }
    bool can_stop = n_out >= r->sp.min_tokens;
    bool is_eos = !r->sp.ignore_eos && tok == e->eos;
    if (can_stop && (is_eos || in_stop_ids(r, tok))) {
        /* the stopping token's own text is not part of the answer (vLLM drops it too) */
        if (!r->sp.include_stop_str_in_output) {
            r->text_len -= new_len;
            if (r->text) r->text[r->text_len] = '\0';
        }
        finish(e, r, ENG_FINISH_STOP, NULL, is_eos ? -1 : tok, NULL, &tok, lp);
        return true;
    }
    if (can_stop && r->sp.n_stop) {
        int s = find_stop(r, new_len);
        if (s >= 0) {
            finish(e, r, ENG_FINISH_STOP, r->sp.stop[s], -1, NULL, &tok, lp);
            return true;
        }
    }
    if (n_out >= r->max_tokens || r->n_tokens >= e->cfg.max_model_len) {
        finish(e, r, ENG_FINISH_LENGTH, NULL, -1, NULL, &tok, lp);
        return true;
    }
    emit_token(e, r, tok, lp);
    return false;
}

static duet_status reserve_logits(eng_engine *e, int rows) {
    if (rows + 1 <= e->cap_logit_rows) return DUET_OK;
    int cap = rows + 1 > 2 * e->cap_logit_rows ? rows + 1 : 2 * e->cap_logit_rows;
    float *l = realloc(e->logits, (size_t)cap * e->V * sizeof(float));
    if (!l) return DUET_ERR_NO_MEMORY;
    e->logits = l;
    e->cap_logit_rows = cap;
    return DUET_OK;
}

static void publish_stats(eng_engine *e) {
    kv_pool_stats ps;
    kv_pool_get_stats(e->pool, &ps);
    e->stats.n_running = e->running.n + e->fetching.n + e->forking.n;
    e->stats.n_waiting = e->waiting.n;
    pthread_mutex_lock(&e->lease_mu);
    e->stats.n_leased = e->n_leases;
    pthread_mutex_unlock(&e->lease_mu);
    e->stats.n_blocks = ps.n_blocks;
    e->stats.n_free_blocks = ps.n_free;
    e->stats.prefix_queries = ps.queries;
    e->stats.prefix_hits = ps.hits;
    pthread_mutex_lock(&e->stats_mu);
    e->snapshot = e->stats;
    pthread_mutex_unlock(&e->stats_mu);
}

/* Fails every scheduled request of a step that went wrong. */
static duet_status step_failed(eng_engine *e, int n, duet_status st, const char *what) {
    LOG_ERROR("engine: %s: %s", what, duet_strerror(st));
    for (int i = 0; i < n; i++)
        finish(e, e->sched[i], ENG_FINISH_ERROR, NULL, -1, "model step failed", NULL, NULL);
    publish_stats(e);
    return st;
}

/* Rows of the step's logits some request needs on the host: prompt logprobs (all its rows)
 * and the test hook. */
static duet_status host_rows(eng_engine *e, int n) {
    int k = 0;
    for (int i = 0; i < n; i++) {
        ereq *r = e->sched[i];
        /* (n_computed is still where this step began) */
        if (!r->on_logits && !(r->prompt_lp && r->n_computed < r->n_prompt)) continue;
        for (int j = 0; j < e->seqs[i].n_logits; j++) e->host_rows[k++] = e->row0[i] + j;
    }
    if (!k) return DUET_OK;
    duet_status st = reserve_logits(e, e->row0[n]);
    /* downloaded in place: row x of the step lands in e->logits row x */
    for (int j = 0; j < k && st == DUET_OK; j++)
        st = mdl_logits_rows(e->model, &e->host_rows[j], 1,
                             e->logits + (size_t)e->host_rows[j] * e->V);
    return st;
}

/* r's MTP work after the step (i its place in it, pos0 where its tokens began): the module
 * over the positions whose KV the step kept, and drafts when r just got a token it can
 * follow with more (no penalties, room under max_tokens and the context).
 *
 * Acceptance is exact match against the target's own draw for each row, greedy or not. For
 * the module's one-hot draft d this is rejection sampling: d stands with probability p(d),
 * and after a rejection the token is p's draw given it is not d, i.e. from (p - q)+
 * renormalized. Each emitted token is the draw of its own output index (Philox counter), so
 * the output is the target's distribution, and with a seed the same tokens as without MTP.
 * Penalties would need the drafts in the counts of the rows after them: those requests do not
 * draft. */
static void spec_add(eng_engine *e, ereq *r, int i, int pos0) {
    int k = spec_k(e->spec), n_out = r->n_tokens - r->n_prompt;
    int nd = 0;
    bool sampled = e->sample_at[i] >= 0;
    if (sampled && !has_penalties(&r->sp.smp) && r->role != ENG_KV_LEASE) {
        nd = k;
        if (nd > r->max_tokens - n_out - 1) nd = r->max_tokens - n_out - 1;
        if (nd > e->cfg.max_model_len - r->n_tokens - 1)
            nd = e->cfg.max_model_len - r->n_tokens - 1;
        if (nd < 0) nd = 0;
        /* the chain's further drafts write the module's KV one position further each; without
         * a free block for them, one draft */
        if (nd > 1 && ensure_blocks(e, r, r->n_computed + nd - 1) != DUET_OK) nd = 1;
    }
    mdl_draft_seq q = {.tokens = r->tokens + pos0 + 1,
                       .n_tokens = r->n_computed - pos0,
                       .pos0 = pos0,
                       .hid0 = e->tok0[i],
                       .block_table = r->blocks,
                       .n_blocks = r->n_blocks,
                       .n_draft = nd};
    spec_batch_add(e->spec, &r->spec, &q);
    e->drafting[e->n_drafting++] = r;
}

duet_status eng_step(eng_engine *e, bool *busy_p) {
    drain_inbox(e);
    expire_leases(e);
    int n = schedule(e);
    *busy_p = false;
    duet_status st = DUET_OK;
    if (n == 0) {
        bool stepped;
        st = par_idle(e->inst, e->kv, &stepped);
        publish_stats(e);
        return st;
    }
    const double t_step = clock_now_s();
    int rows = 0, toks = 0, n_chunks = 0, chunk_toks = 0;
    for (int i = 0; i < n; i++) {
        ereq *r = e->sched[i];
        if (r->n_computed < r->n_prompt) {
            n_chunks++;
            chunk_toks += r->n_sched;
        }
        bool last = r->n_computed + r->n_sched - r->n_spec == r->n_tokens;
        bool prompt_rows = r->prompt_lp && r->n_computed < r->n_prompt;
        /* a verify step: a row for the last token and one after each draft */
        int nl = prompt_rows ? r->n_sched : (last ? 1 + r->n_spec : 0);
        /* the drafts ride after the request's tokens (its array has room up to max_tokens) */
        memcpy(r->tokens + r->n_tokens, r->spec.draft, (size_t)r->n_spec * sizeof(int32_t));
        e->tok0[i] = toks;
        toks += r->n_sched;
        e->seqs[i] = (mdl_seq){.tokens = r->tokens + r->n_computed,
                               .n_tokens = r->n_sched,
                               .pos0 = r->n_computed,
                               .block_table = r->blocks,
                               .n_blocks = r->n_blocks,
                               .n_logits = nl};
        e->row0[i] = rows;
        rows += nl;
    }
    e->row0[n] = rows;
    leases_step_begin(e, n);
    /* the logits stay in backend memory: mdl_sample and mdl_logits_rows read them there */
    st = par_step(e->inst, e->kv, e->seqs, n, NULL);
    if (st != DUET_OK) return step_failed(e, n, st, "step failed");
    e->stats.n_steps++;

    /* one sampling call for every request whose tokens are all computed */
    double t0 = clock_now_s();
    int ns = 0;
    for (int i = 0; i < n && st == DUET_OK; i++) {
        ereq *r = e->sched[i];
        e->sample_at[i] = -1;
        if (r->n_computed + r->n_sched - r->n_spec != r->n_tokens) continue;
        e->sample_at[i] = ns;
        for (int j = 0; j <= r->n_spec && st == DUET_OK; j++)
            st = sample_row(e, r, e->row0[i] + e->seqs[i].n_logits - 1 - r->n_spec + j, j,
                            &e->sampler->rows[ns++]);
    }
    if (st == DUET_OK) st = mdl_sample_queue(e->model, e->sampler, ns);
    double t1 = clock_now_s();
    if (st == DUET_OK) st = be_sample_wait(e->be, e->sampler);
    double t2 = clock_now_s();
    if (st != DUET_OK) return step_failed(e, n, st, "sampling failed");
    st = host_rows(e, n);
    if (st != DUET_OK) return step_failed(e, n, st, "logits download failed");

    if (e->spec) spec_batch_begin(e->spec);
    e->n_drafting = 0;
    for (int i = 0; i < n; i++) {
        ereq *r = e->sched[i];
        int pos0 = r->n_computed, nl = e->seqs[i].n_logits, nd = r->n_spec, acc = 0;
        if (nd > 0) {
            /* drafts stand while they equal the target's own choices (greedy) */
            int32_t target[MDL_MAX_DRAFT + 1];
            for (int j = 0; j <= nd; j++) target[j] = e->sampler->out[e->sample_at[i] + j].token;
            acc = spec_accept(r->spec.draft, nd, target);
            spec_count(e->spec, nd, acc);
        }
        /* the KV of rejected drafts stays behind n_computed, to be overwritten */
        r->n_computed += r->n_sched - nd + acc;
        r->n_sched = 0;
        r->n_spec = 0;
        commit_blocks(e, r);
        /* be_sample_wait above synchronized with the backend: this step's KV is written */
        if (r->lease) lease_advance(e, r);
        const float *rows_r = e->logits + (size_t)e->row0[i] * e->V;
        bool on_host = r->on_logits || (r->prompt_lp && pos0 < r->n_prompt);
        for (int k = 0; on_host && k < nl - nd + acc; k++) {
            int pos = pos0 + e->seqs[i].n_tokens - nl + k;
            if (r->on_logits) r->on_logits(r->user, pos, rows_r + (size_t)k * e->V, e->V);
            /* prompt logprobs: row at pos predicts prompt token pos + 1 */
            if (r->prompt_lp && pos + 1 < r->n_prompt)
                fill_lp(e, rows_r + (size_t)k * e->V, r->tokens[pos + 1], r->sp.prompt_logprobs,
                        &r->prompt_lp[pos + 1]);
        }
        bool gone = false;
        if (e->sample_at[i] >= 0) {
            if (r->prompt_lp && r->n_tokens == r->n_prompt) r->prompt_lp[0].token = r->tokens[0];
            /* the accepted drafts, then the target's token after them; each one may end r */
            for (int j = 0; j <= acc && !gone; j++) gone = take_token(e, r, e->sample_at[i] + j);
        }
        if (!gone && e->spec) spec_add(e, r, i, pos0);
    }
    if (e->spec) {
        /* drafts only speed things up: without them the next step decodes one token */
        st = spec_batch_run(e->spec, e->kv);
        if (st != DUET_OK) LOG_WARN("engine: MTP drafts failed: %s", duet_strerror(st));
        st = DUET_OK;
        for (int i = 0; i < e->n_drafting; i++) {
            ereq *r = e->drafting[i];
            if (r->on_draft && r->spec.n_draft > 0)
                r->on_draft(r->user, r->n_tokens - r->n_prompt, r->spec.draft, r->spec.n_draft);
        }
    }
    e->stats.sample_rows += (uint64_t)ns;
    if (e->spec) {
        const spec_stats *ss = spec_get_stats(e->spec);
        e->stats.spec_drafts = ss->n_drafts;
        e->stats.spec_draft_tokens = ss->n_draft_tokens;
        e->stats.spec_accepted = ss->n_accepted;
        memcpy(e->stats.spec_accepted_per_pos, ss->accepted_per_pos,
               sizeof e->stats.spec_accepted_per_pos);
    }
    e->stats.sample_host_s += (t1 - t0) + (clock_now_s() - t2);
    e->stats.sample_wait_s += t2 - t1;
    publish_stats(e);
    /* DUET_LOG=debug: one line a step, what a serving benchmark's steps were made of */
    LOG_DEBUG("engine: step %llu: %d requests, %d tokens (%d prompt chunks of %d tokens), "
              "%.2f ms (forward queued in %.2f, sampling waited %.2f)",
              (unsigned long long)e->stats.n_steps, n, toks, n_chunks, chunk_toks,
              (clock_now_s() - t_step) * 1e3, (t0 - t_step) * 1e3, (t2 - t1) * 1e3);
    *busy_p = true;
    return DUET_OK;
}

duet_status eng_create(const eng_config *cfg, par_instance *inst, const tok_tokenizer *tok,
                       eng_engine **eng_p) {
    eng_engine *e = calloc(1, sizeof *e);
    if (!e) return DUET_ERR_NO_MEMORY;
    e->cfg = *cfg;
    e->inst = inst;
    e->model = par_model(inst);
    e->tok = tok;
    const cfg_model *mc = mdl_config(e->model);
    e->V = mc->vocab_size;
    e->eos = mc->eos_token_id;
    if (e->cfg.max_num_batched_tokens < 1 || e->cfg.max_num_seqs < 1 || e->cfg.block_size < 1 ||
        e->cfg.max_model_len < 2) {
        LOG_ERROR("engine: max_num_seqs, max_num_batched_tokens, block_size and max_model_len "
                  "must be positive");
        free(e);
        return DUET_ERR_INVALID;
    }
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    pthread_mutex_init(&e->stats_mu, NULL);
    pthread_mutex_init(&e->lease_mu, NULL);
    e->table_cap = 1024;
    e->table = calloc(e->table_cap, sizeof *e->table);
    size_t ms = (size_t)e->cfg.max_num_seqs;
    e->sched = calloc(ms, sizeof *e->sched);
    e->seqs = calloc(ms, sizeof *e->seqs);
    e->row0 = calloc(ms + 1, sizeof *e->row0);
    e->sample_at = calloc(ms, sizeof *e->sample_at);
    e->tok0 = calloc(ms, sizeof *e->tok0);
    e->free_slots = calloc(ms, sizeof *e->free_slots);
    e->host_rows = calloc((size_t)e->cfg.max_num_batched_tokens + ms, sizeof *e->host_rows);
    duet_status st = (!e->table || !e->sched || !e->seqs || !e->row0 || !e->sample_at || !e->tok0 ||
                      !e->free_slots || !e->host_rows)
                         ? DUET_ERR_NO_MEMORY
                         : DUET_OK;
    e->be = mdl_backend(e->model);
    int k = e->cfg.spec_tokens;
    if (st == DUET_OK && (k < 0 || k > mdl_spec_tokens(e->model))) {
        LOG_ERROR("engine: %d speculative tokens, but the model was loaded for %d (its MTP "
                  "module drafts that many at most)",
                  k, mdl_spec_tokens(e->model));
        st = DUET_ERR_INVALID;
    }
    if (st == DUET_OK && k > 0) st = spec_create(e->inst, e->cfg.max_num_seqs, k, &e->spec);
    e->drafting = calloc(ms, sizeof *e->drafting);
    if (st == DUET_OK && !e->drafting) st = DUET_ERR_NO_MEMORY;
    /* a verify step samples a row after the last token and after each draft */
    if (st == DUET_OK)
        st = be_sampler_create(e->be, e->cfg.max_num_seqs * (k + 1), e->V, e->cfg.max_num_seqs,
                               &e->sampler);
    /* slots handed out from the top, so the first request takes slot 0 */
    for (int i = 0; i < e->cfg.max_num_seqs && e->free_slots; i++)
        e->free_slots[i] = e->cfg.max_num_seqs - 1 - i;
    e->n_free_slots = e->free_slots ? e->cfg.max_num_seqs : 0;
    if (st == DUET_OK) st = par_kv_agree(inst, &e->cfg.n_blocks, e->cfg.block_size);
    if (st == DUET_OK) st = mdl_kv_create(e->model, e->cfg.n_blocks, e->cfg.block_size, &e->kv);
    if (st == DUET_OK)
        st = kv_pool_create(e->cfg.n_blocks, e->cfg.block_size, e->cfg.prefix_caching, &e->pool);
    if (st == DUET_OK) st = reserve_logits(e, 16);
    if (st != DUET_OK) {
        eng_destroy(e);
        return st;
    }
    publish_stats(e);
    *eng_p = e;
    return DUET_OK;
}

void eng_destroy(eng_engine *e) {
    if (!e) return;
    if (e->pool) {
        drain_inbox(e);
        while (e->fetching.head) {
            /* nobody will report these transfers any more */
            ereq *r = e->fetching.head;
            q_remove(&e->fetching, r);
            r->state = RS_RUNNING;
            q_push_back(&e->running, r);
        }
        while (e->running.head) abort_req(e, e->running.head);
        while (e->waiting.head) abort_req(e, e->waiting.head);
        while (e->forking.head) abort_req(e, e->forking.head);
        pthread_mutex_lock(&e->lease_mu);
        for (lease *l = e->leases; l; l = l->next) l->released = true;
        pthread_mutex_unlock(&e->lease_mu);
        expire_leases(e);
    }
    /* commands posted after the drain (none should be) are dropped */
    for (cmd *c = e->inbox_head, *n; c; c = n) {
        n = c->next;
        req_free(c->req);
        free(c);
    }
    kv_pool_destroy(e->pool);
    if (e->kv) mdl_kv_destroy(e->model, e->kv);
    smp_scratch_free(&e->smp);
    if (e->sampler) be_sampler_destroy(e->be, e->sampler);
    free(e->logits);
    free(e->sched);
    free(e->seqs);
    free(e->row0);
    free(e->sample_at);
    free(e->tok0);
    free(e->drafting);
    spec_destroy(e->spec);
    free(e->free_slots);
    free(e->host_rows);
    free(e->table);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    pthread_mutex_destroy(&e->stats_mu);
    pthread_mutex_destroy(&e->lease_mu);
    free(e);
}

void eng_get_stats(eng_engine *e, eng_stats *st) {
    pthread_mutex_lock(&e->stats_mu);
    *st = e->snapshot;
    pthread_mutex_unlock(&e->stats_mu);
}

be_kv *eng_kv(eng_engine *e) {
    return e->kv;
}

int eng_vocab_size(const eng_engine *e) {
    return e->V;
}
