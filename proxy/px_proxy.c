/* The proxy's request handling. A generation request is a job that runs a prefill leg, then a
 * decode leg (streamed to the client as it arrives, or buffered when not streaming). With early
 * decode the prefill leg is streamed and the decode leg starts at its first event carrying
 * kv_transfer_params, while the prefill stream stays open to its end beside it (closing it would
 * abort the prefill and free the lease the decode reads); without it, or to a prefill endpoint
 * that once streamed a clean answer without any params (it puts them in whole answers only),
 * the prefill answer is buffered whole first. A leg that fails before any byte reached the
 * client is retried on another backend after a backoff (a prefill that fails under a started
 * decode leg retries the whole chain; a decode that fails while that prefill stream is open
 * waits for the stream's end to know which); after that, the client gets an SSE error event
 * and [DONE], never a silent end.
 * Forwarded routes (/v1/models, /tokenize, /detokenize) are one-leg jobs with the same retry
 * rules. A job ends when its client request is finished, no upstream request is open and
 * nothing is held; its memory goes in its timer's close callback. */
#include "px_proxy.h"

#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "net/http.h"
#include "net/httpc.h"
#include "base/log.h"
#include "base/rng.h"
#include "px_backend.h"
#include "px_body.h"
#include "base/strbuf.h"
#include "px_metrics.h"

enum {
    RID_MAX = 96,
    TAIL_MAX = 32,                        /* bytes of the stream remembered, to find [DONE] */
    MAX_UPSTREAM_BODY = 64 * 1024 * 1024, /* buffered answers beyond this fail the leg */
    PAUSE_BYTES = 1024 * 1024,            /* client write queue that pauses the upstream */
    RESUME_BYTES = 256 * 1024,
    PAUSE_POLL_MS = 10,
    MAX_TRIED = 16,
};

struct px_proxy {
    uv_loop_t *loop;
    const px_config *cfg;
    http_server *srv;
    px_backends backends;
    px_metrics m;
    px_hist leg_latency[PX_LEG_COUNT];
    char *auth_up;     /* "Bearer <upstream key>" or NULL */
    char *auth_expect; /* "Bearer <api key>" or NULL */
    rng_state rng;
    uint64_t rid_next;
    bool balancer; /* --backend: plain instances, one leg per request */
    unsigned jobs_open;
    struct px_job *lingering; /* jobs whose client has its answer, waiting for a prefill stream */
    int refs;                 /* the owner's, one per job, the drain timer's */
    uv_timer_t drain_timer;
    bool draining, destroyed, drained_called;
    px_drained_fn drained_cb;
    void *drained_arg;
};

typedef struct px_fan px_fan;

typedef struct px_job {
    px_proxy *px;
    http_req *req; /* NULL once finished; always NULL for a part of a fan */
    px_fan *fan;   /* a list of prompts split up: this job is prompt `part`'s chain */
    int part;
    px_route route;
    char rid[RID_MAX];
    char path[64]; /* upstream path */
    const char *method;
    uint64_t t0;
    uv_timer_t timer; /* retry backoff, backpressure polling */
    /* Generation. */
    px_gen gen;
    /* The prefill leg's body whole (sequential) and streamed (early decode), each built when a
     * picked endpoint first needs it; the decode leg's. cJSON_free. */
    char *prefill_body, *prefill_body_sse, *decode_body;
    size_t prefill_len, prefill_sse_len, decode_len;
    /* Forwarded: the body (copied) and the roles to try, in order. */
    char *fwd_body;
    size_t fwd_len;
    px_role fwd_roles[PX_ROLE_COUNT];
    size_t n_fwd_roles;
    /* The leg in progress. */
    px_leg leg;
    px_backend *b; /* picked and charged */
    uint64_t b_load;
    px_backend *tried[MAX_TRIED];
    size_t ntried;
    unsigned attempts;
    httpc_req *up;
    uint64_t leg_t0;
    int up_status;
    char up_ctype[128];
    bool up_body_seen;
    bool up_overflow;
    char up_why[128]; /* why the upstream request failed */
    strbuf buf;       /* a buffered answer */
    char last_err[512];
    /* The client side of a stream. */
    bool started;
    bool paused;
    char tail[TAIL_MAX];
    size_t tail_len;
    /* Early decode: the prefill leg streamed (pre_stream: this attempt's, decided by the
     * endpoint picked), its events read as they come (pre_buf holds the bytes of an event not
     * yet whole). The first event with kv_transfer_params moves the prefill request to pre_up
     * (its backend to pre_b, still charged, and its attempts and tried backends aside, for a
     * retry of the whole chain) and starts the decode leg. */
    bool pre_stream;
    strbuf pre_buf;
    bool pre_sse, pre_kv, pre_done, pre_error, pre_overflow;
    httpc_req *pre_up;
    px_backend *pre_b;
    uint64_t pre_load, pre_t0;
    unsigned pre_attempts;
    px_backend *pre_tried[MAX_TRIED];
    size_t pre_ntried;
    /* A decode leg that failed (nothing sent to the client) while pre_up was still open: its
     * backend, referenced but no longer charged, until the prefill stream's end decides between
     * a retry of the whole chain (the lease died: the decode was not at fault) and a decode
     * retry (reported as the decode's failure). */
    px_backend *wait_b;
    /* The client has its answer; the job waits for the prefill stream's end (px->lingering). */
    bool lingering;
    struct px_job *lnext, *lprev;
    bool ended;
} px_job;

/* A completions request with a list of prompts, split into one prefill -> decode chain per
 * prompt (each a px_job of its own, with the usual retries): the answers come back merged in
 * vLLM's shape, choices prompt-major, usage summed; streamed chunks as they come, re-indexed,
 * with one usage chunk and one [DONE] at the end. The first failure answers the client and
 * cancels the other chains. */
struct px_fan {
    px_proxy *px;
    http_req *req; /* NULL once answered or gone */
    px_route route;
    uint64_t t0;
    char rid[RID_MAX];
    char id[RID_MAX + 8]; /* the merged answer's id */
    bool stream, include_usage;
    int n;           /* choices per prompt */
    int n_parts;     /* prompts */
    int n_done;      /* parts answered (whole) or whose stream ended */
    px_job **parts;  /* [n_parts], NULL once ended */
    cJSON **answers; /* [n_parts] whole answers */
    strbuf *pending; /* [n_parts] streamed bytes not yet a whole event */
    cJSON *usage;    /* streamed usage chunks, summed */
    cJSON *head;     /* "object", "created", "model" of the first chunk, for the usage chunk */
    bool started;    /* the stream's headers went out */
    int refs;        /* the client side's, one per part */
};

/* ---------------------------------------------------------------------------------------------
 * Small helpers */

static double seconds_since(uint64_t t0) {
    return (double)(uv_hrtime() - t0) / 1e9;
}

static uint64_t px_rand(px_proxy *px) {
    return rng_next(&px->rng);
}

/* The client request a job answers (a fan's, for its parts); NULL once answered or gone. */
static http_req *job_client(const px_job *job) {
    return job->fan ? job->fan->req : job->req;
}

static void px_unref(px_proxy *px) {
    if (--px->refs > 0) return;
    px_backends_cleanup(&px->backends);
    free(px->auth_up);
    free(px->auth_expect);
    free(px);
}

static const char *error_type(int status) {
    switch (status) {
    case 400:
        return "BadRequestError";
    case 401:
        return "AuthenticationError";
    case 404:
        return "NotFoundError";
    case 405:
        return "MethodNotAllowedError";
    case 413:
        return "RequestEntityTooLargeError";
    case 502:
        return "BadGatewayError";
    case 503:
        return "ServiceUnavailableError";
    default:
        return status >= 500 ? "InternalServerError" : "BadRequestError";
    }
}

static void count_request(px_proxy *px, px_route route, int status, uint64_t t0) {
    if (status >= 0 && status < PX_STATUS_MAX) px->m.requests[route][status]++;
    px_hist_observe(&px->m.duration[route], seconds_since(t0));
}

/* Answers a request that has no job (the proxy's own routes and early errors). */
static void respond_simple(px_proxy *px, http_req *req, px_route route, uint64_t t0, int status,
                           const char *ctype, const char *body, size_t len) {
    http_respond(req, status, ctype, body, len);
    count_request(px, route, status, t0);
}

static void respond_error_simple(px_proxy *px, http_req *req, px_route route, uint64_t t0,
                                 int status, px_error_kind kind, const char *msg) {
    px->m.errors[route][kind]++;
    http_respond_error(req, status, error_type(status), msg);
    count_request(px, route, status, t0);
}

/* ---------------------------------------------------------------------------------------------
 * Jobs: lifetime */

static void fan_unref(px_fan *fan);
static void fan_part_answer(px_fan *fan, px_job *job, int status, const char *ctype,
                            const char *body, size_t len);
static void fan_part_failed(px_fan *fan, px_job *job, int status, const char *msg);
static void fan_part_data(px_fan *fan, px_job *job, const char *data, size_t len);
static void fan_part_stream_done(px_fan *fan, px_job *job);

static void job_free(uv_handle_t *h) {
    px_job *job = h->data;
    px_proxy *px = job->px;
    if (job->fan) fan_unref(job->fan);
    px_gen_cleanup(&job->gen);
    cJSON_free(job->prefill_body);
    cJSON_free(job->prefill_body_sse);
    cJSON_free(job->decode_body);
    free(job->fwd_body);
    strbuf_free(&job->buf);
    strbuf_free(&job->pre_buf);
    free(job);
    px_unref(px);
}

static void px_check_drained(px_proxy *px);

static void leg_release(px_job *job) {
    if (!job->b) return;
    px_backends_release(&job->px->backends, job->b, job->b_load);
    job->b = NULL;
}

/* The prefill backend of an early decode, charged until its stream ends. */
static void prefill_release(px_job *job) {
    if (!job->pre_b) return;
    px_backends_release(&job->px->backends, job->pre_b, job->pre_load);
    job->pre_b = NULL;
}

static void linger_unlink(px_job *job) {
    if (!job->lingering) return;
    job->lingering = false;
    if (job->lprev)
        job->lprev->lnext = job->lnext;
    else
        job->px->lingering = job->lnext;
    if (job->lnext) job->lnext->lprev = job->lprev;
    job->lnext = job->lprev = NULL;
}

/* Everything let go: the request finished, the upstreams closed, the backends released. */
static void job_end(px_job *job) {
    px_proxy *px = job->px;
    if (job->ended) return;
    job->ended = true;
    if (job->fan) job->fan->parts[job->part] = NULL;
    if (job->up) {
        httpc_cancel(job->up);
        job->up = NULL;
    }
    if (job->pre_up) {
        httpc_cancel(job->pre_up);
        job->pre_up = NULL;
    }
    leg_release(job);
    prefill_release(job);
    px_backend_unref(job->wait_b);
    job->wait_b = NULL;
    linger_unlink(job);
    uv_timer_stop(&job->timer);
    uv_close((uv_handle_t *)&job->timer, job_free);
    px->jobs_open--;
    px_check_drained(px);
}

static void job_finished(px_job *job, int status) {
    if (!job->fan) count_request(job->px, job->route, status, job->t0); /* a fan counts once */
    job->req = NULL;
    job_end(job);
}

/* The client has its whole, good answer. With an early decode's prefill stream still open the
 * job stays, holding only that stream, until it ends (closing it would abort the prefill
 * request on its worker); otherwise it ends now. */
static void job_succeeded(px_job *job, int status) {
    if (!job->pre_up) {
        job_finished(job, status);
        return;
    }
    px_proxy *px = job->px;
    if (!job->fan) count_request(px, job->route, status, job->t0);
    job->req = NULL;
    leg_release(job);
    uv_timer_stop(&job->timer);
    /* Out of the fan's list: the fan's end cancels the parts it lists, not this one. */
    if (job->fan) job->fan->parts[job->part] = NULL;
    LOG_DEBUG("proxy: %s: answered; waiting for the prefill stream to end", job->rid);
    job->lingering = true;
    job->lprev = NULL;
    job->lnext = px->lingering;
    if (px->lingering) px->lingering->lprev = job;
    px->lingering = job;
}

static void job_fail(px_job *job, int status, px_error_kind kind, const char *msg) {
    px_proxy *px = job->px;
    px->m.errors[job->route][kind]++;
    if (kind != PX_ERROR_NO_BACKEND || job->attempts)
        LOG_WARN("proxy: %s %s: %d %s", job->rid, job->path, status, msg);
    if (job->fan) {
        fan_part_failed(job->fan, job, status, msg);
        job_finished(job, status);
        return;
    }
    size_t len = 0;
    char *body = http_error_body(status, error_type(status), msg, &len);
    http_header extra[] = {{"X-Request-Id", job->rid}, {NULL, NULL}};
    if (body)
        http_respond_headers(job->req, status, "application/json", extra, body, len);
    else
        http_req_release(job->req);
    cJSON_free(body);
    job_finished(job, status);
}

static void job_on_client_close(http_req *req, void *arg) {
    px_job *job = arg;
    px_proxy *px = job->px;
    /* Closing the upstream connection is what tells a decode worker to abort the request and
     * free its KV blocks. */
    if (job->up)
        LOG_DEBUG("proxy: %s: client gone, canceling %s leg", job->rid, px_leg_name(job->leg));
    px->m.errors[job->route][PX_ERROR_CLIENT_GONE]++;
    http_req_release(req);
    job_finished(job, 499); /* nginx's "client closed request" */
}

static px_job *job_new(px_proxy *px, http_req *req, px_route route, uint64_t t0) {
    px_job *job = calloc(1, sizeof *job);
    if (!job) return NULL;
    job->px = px;
    job->req = req;
    job->route = route;
    job->t0 = t0;
    strbuf_init(&job->buf);
    strbuf_init(&job->pre_buf);
    uv_timer_init(px->loop, &job->timer);
    job->timer.data = job;
    px->refs++;
    px->jobs_open++;
    snprintf(job->path, sizeof job->path, "%s", req->path);
    return job;
}

/* The client's X-Request-Id when it is a sane token, else a new one. */
static void job_set_rid(px_job *job) {
    const char *id = http_req_header(job->req, "x-request-id");
    size_t n = id ? strlen(id) : 0;
    bool ok = n > 0 && n < RID_MAX;
    for (size_t i = 0; ok && i < n; i++) {
        char c = id[i];
        ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
             strchr("-_.:", c);
    }
    px_proxy *px = job->px;
    if (ok)
        snprintf(job->rid, sizeof job->rid, "%s", id);
    else
        snprintf(job->rid, sizeof job->rid, "px-%016llx-%llu", (unsigned long long)px_rand(px),
                 (unsigned long long)++px->rid_next);
}

/* ---------------------------------------------------------------------------------------------
 * Fans: a list of prompts as one chain per prompt */

static void fan_unref(px_fan *fan) {
    if (--fan->refs > 0) return;
    for (int p = 0; p < fan->n_parts; p++) {
        if (fan->answers) cJSON_Delete(fan->answers[p]);
        if (fan->pending) strbuf_free(&fan->pending[p]);
    }
    free(fan->parts);
    free(fan->answers);
    free(fan->pending);
    cJSON_Delete(fan->usage);
    cJSON_Delete(fan->head);
    free(fan);
}

/* The client has its answer (or left): the other chains stop, their legs canceled; the
 * client side's reference goes (each part still holds its own until its memory goes). */
static void fan_close(px_fan *fan, px_job *except, int status) {
    if (!fan->req) return;
    fan->req = NULL;
    count_request(fan->px, fan->route, status, fan->t0);
    for (int p = 0; p < fan->n_parts; p++)
        if (fan->parts[p] && fan->parts[p] != except) job_end(fan->parts[p]);
    fan_unref(fan);
}

static void fan_write(px_fan *fan, const char *data, size_t len) {
    if (fan->req) http_stream_write(fan->req, data, len);
}

static bool fan_start_stream(px_fan *fan) {
    if (fan->started) return true;
    http_header extra[] = {{"X-Request-Id", fan->rid}, {"Cache-Control", "no-cache"}, {NULL, NULL}};
    if (http_stream_start(fan->req, 200, "text/event-stream", extra)) return false;
    fan->started = true;
    return true;
}

/* An error for the client: a whole answer before the stream started, an SSE error event and
 * [DONE] after. */
static void fan_error(px_fan *fan, px_job *job, int status, const char *msg) {
    if (!fan->req) return;
    size_t len = 0;
    char *body = http_error_body(status, error_type(status), msg, &len);
    if (fan->started) {
        strbuf e;
        strbuf_init(&e);
        if (body) {
            strbuf_str(&e, "data: ");
            strbuf_add(&e, body, len);
            strbuf_str(&e, "\n\n");
        }
        strbuf_str(&e, "data: [DONE]\n\n");
        if (!e.oom) fan_write(fan, e.p, e.len);
        strbuf_free(&e);
        http_stream_end(fan->req);
        fan_close(fan, job, 200);
    } else {
        http_header extra[] = {{"X-Request-Id", fan->rid}, {NULL, NULL}};
        if (body)
            http_respond_headers(fan->req, status, "application/json", extra, body, len);
        else
            http_req_release(fan->req);
        fan_close(fan, job, status);
    }
    cJSON_free(body);
}

static void fan_part_failed(px_fan *fan, px_job *job, int status, const char *msg) {
    char m[640];
    snprintf(m, sizeof m, "prompt %d: %s", job->part, msg);
    fan_error(fan, job, status, m);
}

/* A part's whole answer: kept until every part has one (then merged), or, when it is not a
 * 200, passed to the client as it is. */
static void fan_part_answer(px_fan *fan, px_job *job, int status, const char *ctype,
                            const char *body, size_t len) {
    if (!fan->req) return;
    if (status != 200 || fan->stream) {
        if (fan->started) {
            fan_error(fan, job, status >= 400 ? status : 502, "the backend answered out of turn");
            return;
        }
        http_header extra[] = {{"X-Request-Id", fan->rid}, {NULL, NULL}};
        http_respond_headers(fan->req, status, ctype && ctype[0] ? ctype : "application/json",
                             extra, body, len);
        fan_close(fan, job, status);
        return;
    }
    cJSON *a = cJSON_ParseWithLength(body, len);
    if (!cJSON_IsObject(a)) {
        cJSON_Delete(a);
        fan_part_failed(fan, job, 502, "the decode answer is not JSON");
        return;
    }
    fan->answers[job->part] = a;
    if (++fan->n_done < fan->n_parts) return;
    cJSON *all = px_merge_answers(fan->answers, fan->n_parts, fan->n, fan->id);
    char *text = all ? cJSON_PrintUnformatted(all) : NULL;
    cJSON_Delete(all);
    if (!text) {
        fan_error(fan, job, 500, "out of memory");
        return;
    }
    http_header extra[] = {{"X-Request-Id", fan->rid}, {NULL, NULL}};
    http_respond_headers(fan->req, 200, "application/json", extra, text, strlen(text));
    cJSON_free(text);
    fan_close(fan, job, 200);
}

/* One whole SSE event of a part: rewritten and forwarded, summed (usage), or the end. */
static void fan_event(px_fan *fan, px_job *job, const char *ev, size_t len) {
    static const char data[] = "data: ";
    if (len < sizeof data - 1 || memcmp(ev, data, sizeof data - 1) != 0) return;
    const char *payload = ev + sizeof data - 1;
    size_t n = len - (sizeof data - 1);
    if (n == 6 && !memcmp(payload, "[DONE]", 6)) return; /* the end comes with the leg's end */
    cJSON *chunk = cJSON_ParseWithLength(payload, n);
    px_chunk_kind kind = px_merge_chunk(chunk, job->part * fan->n, fan->id, fan->usage);
    if (kind == PX_CHUNK_ERROR) {
        /* the backend's own error event ends the merged stream */
        cJSON *err = cJSON_GetObjectItemCaseSensitive(chunk, "error");
        const cJSON *msg = cJSON_GetObjectItemCaseSensitive(err, "message");
        const cJSON *code = cJSON_GetObjectItemCaseSensitive(err, "code");
        int status = cJSON_IsNumber(code) && code->valueint >= 400 && code->valueint < 600
                         ? code->valueint
                         : 502;
        fan_part_failed(fan, job, status,
                        cJSON_IsString(msg) ? msg->valuestring : "the decode stream failed");
        cJSON_Delete(chunk);
        return;
    }
    if (kind == PX_CHUNK_DATA) {
        if (!fan->head) {
            fan->head = cJSON_CreateObject();
            static const char *const keys[] = {"object", "created", "model"};
            for (size_t k = 0; fan->head && k < sizeof keys / sizeof *keys; k++) {
                const cJSON *v = cJSON_GetObjectItemCaseSensitive(chunk, keys[k]);
                if (v) cJSON_AddItemToObject(fan->head, keys[k], cJSON_Duplicate(v, 1));
            }
        }
        char *text = cJSON_PrintUnformatted(chunk);
        if (text) {
            strbuf e;
            strbuf_init(&e);
            strbuf_str(&e, "data: ");
            strbuf_str(&e, text);
            strbuf_str(&e, "\n\n");
            if (!e.oom) fan_write(fan, e.p, e.len);
            strbuf_free(&e);
            cJSON_free(text);
        }
    }
    cJSON_Delete(chunk);
}

static void fan_part_data(px_fan *fan, px_job *job, const char *data, size_t len) {
    if (!fan->req || !fan_start_stream(fan)) return;
    strbuf *b = &fan->pending[job->part];
    /* what was pending holds no event end: the search starts where the new bytes could make
     * one, so an event arriving in many small reads costs linear time */
    size_t from = b->len ? b->len - 1 : 0;
    strbuf_add(b, data, len);
    if (b->oom) {
        fan_part_failed(fan, job, 500, "out of memory");
        return;
    }
    /* events end with an empty line */
    size_t at = 0;
    for (;;) {
        size_t s0 = at > from ? at : from;
        char *end = b->len > s0 ? memmem(b->p + s0, b->len - s0, "\n\n", 2) : NULL;
        if (!end) break;
        size_t n = (size_t)(end - (b->p + at));
        fan_event(fan, job, b->p + at, n);
        if (!fan->req) return;
        at += n + 2;
    }
    memmove(b->p, b->p + at, b->len - at);
    b->len -= at;
}

static void fan_part_stream_done(px_fan *fan, px_job *job) {
    if (!fan->req) return;
    if (!fan_start_stream(fan)) return;
    if (++fan->n_done < fan->n_parts) return;
    strbuf e;
    strbuf_init(&e);
    if (fan->include_usage) {
        cJSON *u = cJSON_CreateObject();
        cJSON_AddStringToObject(u, "id", fan->id);
        const char *keys[] = {"object", "created", "model"};
        for (size_t k = 0; k < sizeof keys / sizeof *keys; k++) {
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(fan->head, keys[k]);
            if (v) cJSON_AddItemToObject(u, keys[k], cJSON_Duplicate(v, 1));
        }
        cJSON_AddArrayToObject(u, "choices");
        cJSON *usage = cJSON_Duplicate(fan->usage, 1);
        if (usage) cJSON_AddNullToObject(usage, "prompt_tokens_details");
        cJSON_AddItemToObject(u, "usage", usage);
        char *text = cJSON_PrintUnformatted(u);
        if (text) {
            strbuf_str(&e, "data: ");
            strbuf_str(&e, text);
            strbuf_str(&e, "\n\n");
        }
        cJSON_free(text);
        cJSON_Delete(u);
    }
    strbuf_str(&e, "data: [DONE]\n\n");
    if (!e.oom) fan_write(fan, e.p, e.len);
    strbuf_free(&e);
    http_stream_end(fan->req);
    fan_close(fan, job, 200);
}

static void fan_on_client_close(http_req *req, void *arg) {
    px_fan *fan = arg;
    fan->px->m.errors[fan->route][PX_ERROR_CLIENT_GONE]++;
    LOG_DEBUG("proxy: %s: client gone, canceling %d prompts' legs", fan->rid, fan->n_parts);
    http_req_release(req);
    fan_close(fan, NULL, 499);
}

/* ---------------------------------------------------------------------------------------------
 * Legs */

static void leg_attempt(px_job *job);

static void on_backoff(uv_timer_t *t) {
    px_job *job = t->data;
    leg_attempt(job);
}

/* Exponential backoff with equal jitter: half the delay fixed, half random. */
static unsigned backoff_ms(px_job *job) {
    const px_config *cfg = job->px->cfg;
    uint64_t d = cfg->retry_backoff_ms;
    for (unsigned i = 1; i < job->attempts && d < cfg->retry_backoff_max_ms; i++) d *= 2;
    if (d > cfg->retry_backoff_max_ms) d = cfg->retry_backoff_max_ms;
    uint64_t half = d / 2;
    return (unsigned)(d - half + (half ? px_rand(job->px) % (half + 1) : 0));
}

static px_error_kind leg_error_kind(const px_job *job) {
    return job->leg == PX_LEG_PREFILL  ? PX_ERROR_PREFILL
           : job->leg == PX_LEG_DECODE ? PX_ERROR_DECODE
                                       : PX_ERROR_UPSTREAM;
}

/* The leg failed before any byte reached the client: again elsewhere, or a 502. */
static void leg_retry_or_fail(px_job *job) {
    px_proxy *px = job->px;
    unsigned max = job->leg == PX_LEG_PREFILL ? px->cfg->prefill_retries : px->cfg->decode_retries;
    if (job->attempts > max) {
        job_fail(job, 502, leg_error_kind(job), job->last_err);
        return;
    }
    px->m.retries[job->leg]++;
    LOG_INFO("proxy: %s: %s; retrying (%u of %u)", job->rid, job->last_err, job->attempts, max);
    uv_timer_start(&job->timer, on_backoff, backoff_ms(job), 0);
}

/* The upstream answer as it is: status, content type, body. */
static void pass_through(px_job *job) {
    int status = job->up_status;
    if (status < 200 || status > 599) {
        job_fail(job, 502, leg_error_kind(job), "backend answered an invalid status");
        return;
    }
    if (status >= 400 && status < 500) job->px->m.errors[job->route][PX_ERROR_BACKEND_4XX]++;
    bool ok = status >= 200 && status < 300;
    if (job->fan) {
        fan_part_answer(job->fan, job, status, job->up_ctype, job->buf.p ? job->buf.p : "",
                        job->buf.len);
        if (ok)
            job_succeeded(job, status);
        else
            job_finished(job, status);
        return;
    }
    http_header extra[] = {{"X-Request-Id", job->rid}, {NULL, NULL}};
    http_respond_headers(job->req, status, job->up_ctype[0] ? job->up_ctype : "application/json",
                         extra, job->buf.p ? job->buf.p : "", job->buf.len);
    if (ok)
        job_succeeded(job, status);
    else
        job_finished(job, status);
}

static void tail_add(px_job *job, const char *data, size_t len) {
    if (len >= TAIL_MAX) {
        memcpy(job->tail, data + len - TAIL_MAX, TAIL_MAX);
        job->tail_len = TAIL_MAX;
        return;
    }
    size_t keep = job->tail_len + len > TAIL_MAX ? TAIL_MAX - len : job->tail_len;
    memmove(job->tail, job->tail + job->tail_len - keep, keep);
    memcpy(job->tail + keep, data, len);
    job->tail_len = keep + len;
}

/* Whether the stream ended with vLLM's last event. */
static bool tail_is_done(const px_job *job) {
    static const char done[] = "data: [DONE]";
    char t[TAIL_MAX + 1];
    size_t n = job->tail_len;
    memcpy(t, job->tail, n);
    while (n && (t[n - 1] == '\n' || t[n - 1] == '\r')) n--;
    t[n] = '\0';
    return n >= sizeof done - 1 && !strcmp(t + n - (sizeof done - 1), done);
}

static void on_resume_poll(uv_timer_t *t) {
    px_job *job = t->data;
    if (!job_client(job) || !job->up) return;
    if (http_req_write_queue_size(job_client(job)) > RESUME_BYTES) return; /* polls again */
    uv_timer_stop(t);
    job->paused = false;
    httpc_req_pause(job->up, false);
}

/* Decode bytes on their way to a streaming client. */
static void stream_forward(px_job *job, const char *data, size_t len) {
    if (job->fan) {
        job->started = true; /* bytes reached the client: no retry from here */
        tail_add(job, data, len);
        fan_part_data(job->fan, job, data, len);
        http_req *client = job_client(job);
        if (!client) { /* another prompt's failure answered the client: stop this one too */
            job_end(job);
            return;
        }
        if (client && job->up && !job->paused && http_req_write_queue_size(client) > PAUSE_BYTES) {
            job->paused = true;
            httpc_req_pause(job->up, true);
            uv_timer_start(&job->timer, on_resume_poll, PAUSE_POLL_MS, PAUSE_POLL_MS);
        }
        return;
    }
    if (!job->started) {
        const char *ct = job->up_ctype[0] ? job->up_ctype : "text/event-stream";
        http_header extra[] = {
            {"X-Request-Id", job->rid}, {"Cache-Control", "no-cache"}, {NULL, NULL}};
        if (http_stream_start(job->req, 200, ct, extra)) return; /* gone: on_close follows */
        job->started = true;
    }
    if (http_stream_write(job->req, data, len)) return;
    tail_add(job, data, len);
    /* A slow reader: stop reading the decode until the client catches up (TCP then slows the
     * backend down) instead of buffering the whole answer here. */
    if (!job->paused && http_req_write_queue_size(job->req) > PAUSE_BYTES) {
        job->paused = true;
        httpc_req_pause(job->up, true);
        uv_timer_start(&job->timer, on_resume_poll, PAUSE_POLL_MS, PAUSE_POLL_MS);
    }
}

/* The decode failed after bytes reached the client: say so inside the stream, then end it. */
static void stream_fail(px_job *job, const char *msg) {
    px_proxy *px = job->px;
    px->m.errors[job->route][PX_ERROR_MIDSTREAM]++;
    LOG_WARN("proxy: %s: stream cut: %s", job->rid, msg);
    if (job->fan) {
        fan_part_failed(job->fan, job, 502, msg);
        job_finished(job, 200);
        return;
    }
    strbuf e;
    strbuf_init(&e);
    /* Finish the event the backend was in the middle of, so ours parses on its own. */
    if (job->tail_len && job->tail[job->tail_len - 1] != '\n')
        strbuf_str(&e, "\n\n");
    else if (job->tail_len >= 2 && job->tail[job->tail_len - 2] != '\n')
        strbuf_str(&e, "\n");
    size_t len = 0;
    char *body = http_error_body(502, "BadGatewayError", msg, &len);
    if (body) {
        strbuf_str(&e, "data: ");
        strbuf_add(&e, body, len);
        strbuf_str(&e, "\n\n");
    }
    cJSON_free(body);
    strbuf_str(&e, "data: [DONE]\n\n");
    if (!e.oom) http_stream_write(job->req, e.p, e.len);
    strbuf_free(&e);
    http_stream_end(job->req);
    job_finished(job, 200);
}

/* The decode leg, with the prefill's kv_transfer_params (NULL: without them, and the decode
 * worker computes the prompt itself). */
static void decode_start(px_job *job, const cJSON *kv) {
    cJSON_free(job->decode_body); /* an earlier chain's, when the whole chain was retried */
    job->decode_body = px_gen_decode_body(&job->gen, kv, &job->decode_len);
    if (!job->decode_body) {
        job_fail(job, 500, PX_ERROR_DECODE, "out of memory");
        return;
    }
    job->leg = PX_LEG_DECODE;
    job->attempts = 0;
    job->ntried = 0;
    leg_attempt(job);
}

/* Early decode: the prefill's first event with kv_transfer_params. The prefill request becomes
 * pre_up (its backend stays charged: it is still computing) and the decode leg starts beside
 * it; the stream is read on to its end. */
static void early_start(px_job *job, cJSON *kv) {
    LOG_DEBUG("proxy: %s: prefill %s sent kv_transfer_params; starting the decode leg", job->rid,
              job->b->name);
    job->pre_up = job->up;
    job->up = NULL;
    job->pre_b = job->b;
    job->b = NULL;
    job->pre_load = job->b_load;
    job->pre_t0 = job->leg_t0;
    job->pre_attempts = job->attempts;
    memcpy(job->pre_tried, job->tried, sizeof job->tried);
    job->pre_ntried = job->ntried;
    decode_start(job, kv);
    cJSON_Delete(kv);
}

/* Bytes of a streamed prefill answer, before or after the decode leg started: whole events are
 * looked at (the first with kv_transfer_params starts the decode leg; [DONE] and error events
 * are noted for the stream's end) and dropped. */
static void prefill_stream_read(px_job *job, const char *data, size_t len) {
    strbuf *b = &job->pre_buf;
    if (job->pre_overflow) return;
    size_t old_len = b->len; /* held no whole event */
    strbuf_add(b, data, len);
    if (b->oom || b->len > MAX_UPSTREAM_BODY) { /* no event end in sight */
        job->pre_overflow = true;
        strbuf_free(b);
        return;
    }
    /* A large event in small reads: only the new bytes are looked at until it is whole. */
    if (!px_sse_may_be_whole(b->p, b->len, old_len)) return;
    size_t at = 0;
    while (!job->ended) {
        size_t ev_len = 0;
        size_t used = px_sse_next(b->p + at, b->len - at, &ev_len);
        if (!used) break;
        const char *ev = b->p + at;
        at += used;
        cJSON *kv = NULL;
        px_sse_kind kind = px_sse_prefill_event(ev, ev_len, job->pre_kv ? NULL : &kv);
        if (kind == PX_SSE_DONE) {
            job->pre_done = true;
        } else if (kind == PX_SSE_ERROR) {
            job->pre_error = true;
        } else if (kind == PX_SSE_KV && !job->pre_kv) {
            job->pre_kv = true;
            early_start(job, kv); /* may end the job (no decode endpoint) */
        }
    }
    if (job->ended) return;
    memmove(b->p, b->p + at, b->len - at);
    b->len -= at;
}

/* The prefill leg ended before any decode leg started: its whole answer (not streamed, or a
 * stream that never carried kv_transfer_params) or a failure. */
static void prefill_done(px_job *job, duet_status st) {
    px_backend *b = job->b;
    if (st == DUET_OK && job->up_status >= 400 && job->up_status < 500) {
        px_backend_report(b, true); /* the request was wrong, not the backend */
        leg_release(job);
        pass_through(job);
        return;
    }
    cJSON *kv = NULL;
    if (st == DUET_OK && job->up_status == 200 && job->pre_sse) {
        if (job->pre_done && !job->pre_overflow) {
            /* A whole stream without params (a prefill worker that does not send them, or an
             * error event): as a JSON answer without them. A clean one marks the endpoint:
             * vLLM's prefill workers, for one, put the params in whole answers only, so its
             * prefill legs go whole from now on and their decodes get the params again. */
            if (!job->pre_error && !b->no_early_kv) {
                b->no_early_kv = true;
                LOG_WARN("proxy: prefill %s answered a streamed request without "
                         "kv_transfer_params: its prefill legs are sent whole (not streamed) "
                         "from now on; this request's decode computes the prompt again",
                         b->name);
            }
            px_backend_report(b, true);
            leg_release(job);
            LOG_DEBUG("proxy: %s: prefill stream without kv_transfer_params%s; decode will "
                      "compute the prompt itself",
                      job->rid, job->pre_error ? " (it carried an error event)" : "");
            decode_start(job, NULL);
            return;
        }
        snprintf(job->last_err, sizeof job->last_err,
                 "prefill %s: the stream ended before its kv_transfer_params%s", b->name,
                 job->pre_overflow ? " (an event too large)" : " (no data: [DONE])");
    } else if (st == DUET_OK && job->up_status == 200 && !job->up_overflow) {
        if (px_prefill_kv_params(job->buf.p ? job->buf.p : "", job->buf.len, &kv) == DUET_OK) {
            px_backend_report(b, true);
            leg_release(job);
            if (!kv)
                LOG_DEBUG("proxy: %s: prefill answer without kv_transfer_params; decode will "
                          "compute the prompt itself",
                          job->rid);
            decode_start(job, kv);
            cJSON_Delete(kv);
            return;
        }
        snprintf(job->last_err, sizeof job->last_err, "prefill %s: answer is not JSON", b->name);
    } else if (st) {
        snprintf(job->last_err, sizeof job->last_err, "prefill %s: %s", b->name, job->up_why);
    } else {
        snprintf(job->last_err, sizeof job->last_err, "prefill %s answered HTTP %d%s", b->name,
                 job->up_status, job->up_overflow ? " with an oversized body" : "");
    }
    px_backend_report(b, false);
    leg_release(job);
    leg_retry_or_fail(job);
}

/* The end of an early decode's prefill stream (pre_up). A good end is a stream with [DONE] and
 * no error event. A failure with nothing sent to the client yet takes the decode leg down (the
 * lease it reads is gone) and retries the whole chain on another prefill endpoint; once bytes
 * reached the client, the decode leg goes on, and its own end decides. */
static void prefill_stream_end(px_job *job, httpc_req *req, duet_status st) {
    px_proxy *px = job->px;
    px_backend *b = job->pre_b;
    job->pre_up = NULL;
    double secs = seconds_since(job->pre_t0);
    px_hist_observe(&px->leg_latency[PX_LEG_PREFILL], secs);
    px_hist_observe(&b->latency, secs);
    bool ok = st == DUET_OK && job->pre_done && !job->pre_error && !job->pre_overflow;
    char msg[sizeof job->last_err];
    snprintf(msg, sizeof msg, "prefill %s failed after the decode leg started: %s", b->name,
             st                  ? httpc_req_reason(req)
             : job->pre_error    ? "an error event"
             : job->pre_overflow ? "an event too large"
                                 : "the stream ended without data: [DONE]");
    px_backend_report(b, ok);
    prefill_release(job);
    px_backend *waited = job->wait_b; /* a decode failure waiting for this end */
    job->wait_b = NULL;
    if (job->lingering) {         /* the client has its answer: nothing else to wait for */
        px_backend_unref(waited); /* none: an answered job has no failed decode */
        job_end(job);
        return;
    }
    if (ok) {
        if (waited) { /* the prefill was fine: the decode failed on its own */
            px_backend_report(waited, false);
            px_backend_unref(waited);
            leg_retry_or_fail(job);
        }
        return;
    }
    /* The decode that waited is not at fault: its lease died with the prefill. */
    px_backend_unref(waited);
    if (job->started) {
        LOG_WARN("proxy: %s: %s; bytes reached the client, the decode leg goes on", job->rid, msg);
        return;
    }
    LOG_INFO("proxy: %s: %s; canceling the decode leg", job->rid, msg);
    snprintf(job->last_err, sizeof job->last_err, "%s", msg);
    if (job->up) {
        httpc_cancel(job->up);
        job->up = NULL;
    }
    uv_timer_stop(&job->timer); /* a decode retry's backoff */
    leg_release(job);           /* the decode backend is not at fault */
    strbuf_free(&job->buf);
    job->leg = PX_LEG_PREFILL;
    job->attempts = job->pre_attempts;
    memcpy(job->tried, job->pre_tried, sizeof job->tried);
    job->ntried = job->pre_ntried;
    leg_retry_or_fail(job);
}

static void decode_done(px_job *job, duet_status st) {
    px_backend *b = job->b;
    if (job->started) { /* bytes reached the client: no retry possible */
        /* Once [DONE] went out the client has everything, even if the connection then broke. */
        bool ok = tail_is_done(job);
        px_backend_report(b, st == DUET_OK);
        char msg[512];
        if (st)
            snprintf(msg, sizeof msg, "decode %s failed mid-stream: %s", b->name, job->up_why);
        else
            snprintf(msg, sizeof msg, "decode %s ended the stream without [DONE]", b->name);
        leg_release(job);
        if (ok && job->fan) {
            fan_part_stream_done(job->fan, job);
            job_succeeded(job, 200);
        } else if (ok) {
            http_stream_end(job->req);
            job_succeeded(job, 200);
        } else {
            stream_fail(job, msg);
        }
        return;
    }
    if (st == DUET_OK && job->up_status >= 400 && job->up_status < 500) {
        px_backend_report(b, true);
        leg_release(job);
        pass_through(job);
        return;
    }
    if (st == DUET_OK && job->up_status == 200 && job->buf.len > 0 && !job->up_overflow) {
        px_backend_report(b, true);
        leg_release(job);
        pass_through(job);
        return;
    }
    if (st)
        snprintf(job->last_err, sizeof job->last_err, "decode %s: %s", b->name, job->up_why);
    else
        snprintf(job->last_err, sizeof job->last_err, "decode %s answered HTTP %d%s", b->name,
                 job->up_status,
                 job->up_status == 200
                     ? (job->up_overflow ? " with an oversized body" : " with an empty body")
                     : "");
    if (job->pre_up && !(st && job->up_body_seen)) {
        /* The early decode's prefill stream is still open. A decode worker whose pull failed
         * because the prefill died (its lease gone) often says so before the prefill stream
         * does; retrying it now would try the same dead params again. The stream's end decides
         * (prefill_stream_end), within its own timeouts. */
        LOG_INFO("proxy: %s: %s; waiting for the prefill stream's end before a retry", job->rid,
                 job->last_err);
        px_backend_ref(b);
        job->wait_b = b;
        leg_release(job);
        return;
    }
    px_backend_report(b, false);
    leg_release(job);
    if (st && job->up_body_seen) { /* a buffered answer cut in the middle */
        job_fail(job, 502, PX_ERROR_DECODE, job->last_err);
        return;
    }
    leg_retry_or_fail(job);
}

static void forward_done(px_job *job, duet_status st) {
    px_backend *b = job->b;
    if (st == DUET_OK && job->up_status < 500 && !job->up_overflow) {
        px_backend_report(b, true);
        leg_release(job);
        pass_through(job);
        return;
    }
    if (st)
        snprintf(job->last_err, sizeof job->last_err, "%s %s: %s", job->path, b->name, job->up_why);
    else
        snprintf(job->last_err, sizeof job->last_err, "%s %s answered HTTP %d", job->path, b->name,
                 job->up_status);
    px_backend_report(b, false);
    leg_release(job);
    leg_retry_or_fail(job);
}

static void up_on_head(httpc_req *req, const httpc_response *resp, void *arg) {
    px_job *job = arg;
    if (job->pre_up && req == job->pre_up) return; /* its head came while it was job->up */
    job->up_status = resp->status;
    for (size_t i = 0; i < resp->num_headers; i++)
        if (!strcasecmp(resp->headers[i].name, "content-type"))
            snprintf(job->up_ctype, sizeof job->up_ctype, "%s", resp->headers[i].value);
    if (job->leg == PX_LEG_PREFILL && job->pre_stream)
        job->pre_sse = resp->status == 200 && !strncasecmp(job->up_ctype, "text/event-stream", 17);
}

static void up_on_body(httpc_req *req, const char *data, size_t len, void *arg) {
    px_job *job = arg;
    if (job->pre_up && req == job->pre_up) {
        prefill_stream_read(job, data, len);
        return;
    }
    job->up_body_seen = true;
    if (job->leg == PX_LEG_PREFILL && job->pre_sse) {
        prefill_stream_read(job, data, len);
        return;
    }
    if (job->leg == PX_LEG_DECODE && job->gen.stream && job->up_status == 200) {
        stream_forward(job, data, len);
        return;
    }
    if (job->up_overflow || job->buf.len + len > MAX_UPSTREAM_BODY) {
        job->up_overflow = true;
        return;
    }
    strbuf_add(&job->buf, data, len);
    if (job->buf.oom) job->up_overflow = true;
}

static void up_on_end(httpc_req *req, duet_status st, void *arg) {
    px_job *job = arg;
    if (job->pre_up && req == job->pre_up) {
        prefill_stream_end(job, req, st);
        return;
    }
    job->up = NULL;
    snprintf(job->up_why, sizeof job->up_why, "%s", httpc_req_reason(req));
    double secs = seconds_since(job->leg_t0);
    px_hist_observe(&job->px->leg_latency[job->leg], secs);
    px_hist_observe(&job->b->latency, secs);
    if (job->paused) {
        uv_timer_stop(&job->timer);
        job->paused = false;
    }
    if (job->leg == PX_LEG_PREFILL)
        prefill_done(job, st);
    else if (job->leg == PX_LEG_DECODE)
        decode_done(job, st);
    else
        forward_done(job, st);
}

/* The prefill body this attempt sends (streamed or whole, as job->pre_stream says), built the
 * first time it is needed; false when out of memory. */
static bool job_prefill_body(px_job *job, const char **body_p, size_t *len_p) {
    char **text = job->pre_stream ? &job->prefill_body_sse : &job->prefill_body;
    size_t *len = job->pre_stream ? &job->prefill_sse_len : &job->prefill_len;
    if (!*text)
        *text = job->pre_stream ? px_gen_prefill_body_streamed(&job->gen, len)
                                : px_gen_prefill_body(&job->gen, len);
    if (!*text) return false;
    *body_p = *text;
    *len_p = *len;
    return true;
}

/* Picks a backend for the current leg and sends its request. */
static void leg_attempt(px_job *job) {
    px_proxy *px = job->px;
    const px_config *cfg = px->cfg;
    px_role roles[PX_ROLE_COUNT];
    size_t nroles = 0;
    uint64_t load = 1;
    const char *body = NULL;
    size_t body_len = 0;
    unsigned first_byte = cfg->decode_timeout_ms, idle = cfg->idle_timeout_ms;
    if (job->leg == PX_LEG_PREFILL) {
        roles[nroles++] = PX_ROLE_PREFILL;
        load = px_gen_prefill_load(&job->gen);
        first_byte = cfg->prefill_timeout_ms; /* the body comes with the endpoint, below */
        job->pre_sse = job->pre_kv = job->pre_done = job->pre_error = job->pre_overflow = false;
        strbuf_free(&job->pre_buf);
    } else if (job->leg == PX_LEG_DECODE) {
        roles[nroles++] = px->balancer ? PX_ROLE_BACKEND : PX_ROLE_DECODE;
        load = px_gen_decode_load(&job->gen);
        body = job->decode_body;
        body_len = job->decode_len;
    } else {
        for (size_t i = 0; i < job->n_fwd_roles; i++) roles[nroles++] = job->fwd_roles[i];
        body = job->fwd_body;
        body_len = job->fwd_len;
    }
    px_backend *b = NULL;
    for (size_t i = 0; i < nroles && !b; i++)
        b = px_backends_pick(&px->backends, roles[i], load, job->tried, job->ntried);
    if (!b) {
        char msg[640];
        if (job->attempts)
            snprintf(msg, sizeof msg, "no healthy %s endpoint left (last error: %s)",
                     px_role_name(roles[0]), job->last_err);
        else
            snprintf(msg, sizeof msg, "no healthy %s endpoint", px_role_name(roles[0]));
        job_fail(job, job->attempts ? 502 : 503, PX_ERROR_NO_BACKEND, msg);
        return;
    }
    if (job->leg == PX_LEG_PREFILL) {
        /* Streamed for early decode, unless this endpoint answered one without params. */
        job->pre_stream = cfg->early_decode && !b->no_early_kv;
        if (!job_prefill_body(job, &body, &body_len)) {
            px_backends_release(&px->backends, b, load);
            job_fail(job, 500, PX_ERROR_PREFILL, "out of memory");
            return;
        }
        /* A streamed prefill's first event comes at admission; the prompt's computation lies
         * between it and the next, so the gaps get the prefill's time, not a stall's. */
        if (job->pre_stream && idle && idle < first_byte) idle = first_byte;
    }
    job->b = b;
    job->b_load = load;
    if (job->ntried < MAX_TRIED) job->tried[job->ntried++] = b;
    job->attempts++;
    job->up_status = 0;
    job->up_ctype[0] = '\0';
    job->up_body_seen = false;
    job->up_overflow = false;
    strbuf_free(&job->buf);

    http_header hs[5];
    size_t nh = 0;
    if (body) hs[nh++] = (http_header){"Content-Type", "application/json"};
    if (job->rid[0]) hs[nh++] = (http_header){"X-Request-Id", job->rid};
    const char *client_auth = http_req_header(job_client(job), "authorization");
    if (px->auth_up)
        hs[nh++] = (http_header){"Authorization", px->auth_up};
    else if (!px->auth_expect && client_auth) /* a transparent proxy passes the client's key */
        hs[nh++] = (http_header){"Authorization", client_auth};
    hs[nh] = (http_header){NULL, NULL};
    httpc_request rq = {.method = job->method,
                        .path = job->path,
                        .headers = hs,
                        .body = body,
                        .body_len = body_len,
                        .first_byte_timeout_ms = first_byte,
                        .idle_timeout_ms = idle};
    static const httpc_callbacks cb = {up_on_head, up_on_body, up_on_end};
    job->leg_t0 = uv_hrtime();
    duet_status st = httpc_send(b->pool, &rq, &cb, job, &job->up);
    if (st) {
        job->up = NULL;
        leg_release(job);
        job_fail(job, 500, leg_error_kind(job), "cannot send the backend request");
    }
}

/* ---------------------------------------------------------------------------------------------
 * Routes */

enum { MAX_FAN_PROMPTS = 256 }; /* as many as a worker takes in one request */

/* A list of prompts: one chain per prompt, answers merged (see px_fan). */
static void handle_fanout(px_proxy *px, http_req *req, px_route route, uint64_t t0, px_gen *gen,
                          int n_prompts) {
    px_fan *fan = calloc(1, sizeof *fan);
    if (fan) {
        fan->parts = calloc((size_t)n_prompts, sizeof *fan->parts);
        fan->answers = calloc((size_t)n_prompts, sizeof *fan->answers);
        fan->pending = calloc((size_t)n_prompts, sizeof *fan->pending);
        fan->usage = cJSON_CreateObject();
    }
    if (!fan || !fan->parts || !fan->answers || !fan->pending || !fan->usage) {
        if (fan) {
            free(fan->parts);
            free(fan->answers);
            free(fan->pending);
            cJSON_Delete(fan->usage);
            free(fan);
        }
        px_gen_cleanup(gen);
        respond_error_simple(px, req, route, t0, 500, PX_ERROR_UPSTREAM, "out of memory");
        return;
    }
    fan->px = px;
    fan->req = req;
    fan->route = route;
    fan->t0 = t0;
    fan->refs = 1;
    fan->stream = gen->stream;
    fan->include_usage = px_gen_include_usage(gen);
    fan->n = px_gen_n(gen);
    fan->n_parts = n_prompts;
    /* the request id the client gave (or a new one) for the whole; each chain adds its index */
    px_job probe = {.px = px, .req = req};
    job_set_rid(&probe);
    snprintf(fan->rid, sizeof fan->rid, "%s", probe.rid);
    snprintf(fan->id, sizeof fan->id, "cmpl-%s", fan->rid);
    bool ok = true;
    for (int p = 0; p < n_prompts && ok; p++) {
        px_job *job = calloc(1, sizeof *job);
        ok = job != NULL;
        if (!ok) break;
        job->px = px;
        job->fan = fan;
        job->part = p;
        job->route = route;
        job->t0 = t0;
        job->method = "POST";
        strbuf_init(&job->buf);
        strbuf_init(&job->pre_buf);
        snprintf(job->path, sizeof job->path, "%s", req->path);
        snprintf(job->rid, sizeof job->rid, "%.*s-%d", RID_MAX - 8, fan->rid, p);
        ok = px_gen_part(gen, p, &job->gen) == DUET_OK;
        if (!ok) {
            px_gen_cleanup(&job->gen);
            free(job);
            break;
        }
        uv_timer_init(px->loop, &job->timer);
        job->timer.data = job;
        px->refs++;
        px->jobs_open++;
        fan->refs++;
        fan->parts[p] = job;
        job->leg = PX_LEG_PREFILL;
    }
    px_gen_cleanup(gen);
    if (!ok) {
        fan_error(fan, NULL, 500, "out of memory");
        return;
    }
    http_req_on_close(req, fan_on_client_close, fan);
    /* a chain that fails at once answers the client and ends the others */
    for (int p = 0; p < n_prompts && fan->req; p++)
        if (fan->parts[p]) leg_attempt(fan->parts[p]);
}

static void handle_generate(px_proxy *px, http_req *req, px_route route, uint64_t t0) {
    char err[160];
    px_gen gen;
    if (px_gen_parse(req->body, req->body_len, &gen, err, sizeof err)) {
        respond_error_simple(px, req, route, t0, 400, PX_ERROR_BAD_REQUEST, err);
        return;
    }
    int n_prompts = route == PX_ROUTE_COMPLETIONS && !px->balancer ? px_gen_prompt_count(&gen) : 1;
    if (n_prompts > MAX_FAN_PROMPTS) {
        px_gen_cleanup(&gen);
        snprintf(err, sizeof err, "at most %d prompts per request", MAX_FAN_PROMPTS);
        respond_error_simple(px, req, route, t0, 400, PX_ERROR_BAD_REQUEST, err);
        return;
    }
    if (n_prompts > 1) {
        handle_fanout(px, req, route, t0, &gen, n_prompts);
        return;
    }
    px_job *job = job_new(px, req, route, t0);
    if (!job) {
        px_gen_cleanup(&gen);
        respond_error_simple(px, req, route, t0, 500, PX_ERROR_UPSTREAM, "out of memory");
        return;
    }
    job->gen = gen;
    job->method = "POST";
    job_set_rid(job);
    if (px->balancer) { /* a plain instance answers the request as it came */
        job->decode_body = cJSON_PrintUnformatted(job->gen.root);
        job->decode_len = job->decode_body ? strlen(job->decode_body) : 0;
        if (!job->decode_body) {
            job_fail(job, 500, PX_ERROR_DECODE, "out of memory");
            return;
        }
        http_req_on_close(req, job_on_client_close, job);
        job->leg = PX_LEG_DECODE;
        leg_attempt(job);
        return;
    }
    http_req_on_close(req, job_on_client_close, job);
    job->leg = PX_LEG_PREFILL;
    leg_attempt(job);
}

static void handle_forward(px_proxy *px, http_req *req, px_route route, uint64_t t0,
                           const px_role *roles, size_t nroles) {
    px_job *job = job_new(px, req, route, t0);
    if (job && req->body_len) {
        job->fwd_body = malloc(req->body_len);
        if (job->fwd_body) memcpy(job->fwd_body, req->body, req->body_len);
        job->fwd_len = req->body_len;
    }
    if (!job || (req->body_len && !job->fwd_body)) {
        if (job) {
            job_fail(job, 500, PX_ERROR_UPSTREAM, "out of memory");
            return;
        }
        respond_error_simple(px, req, route, t0, 500, PX_ERROR_UPSTREAM, "out of memory");
        return;
    }
    job->method = !strcmp(req->method, "GET") ? "GET" : "POST";
    job_set_rid(job);
    memcpy(job->fwd_roles, roles, nroles * sizeof *roles);
    job->n_fwd_roles = nroles;
    job->leg = PX_LEG_OTHER;
    http_req_on_close(req, job_on_client_close, job);
    leg_attempt(job);
}

/* Every endpoint of a role; a prefill endpoint also says whether its prefill legs are streamed
 * for early decode (not with --early-decode off, nor once it answered one without params). */
static void add_instances(strbuf *b, const px_proxy *px, px_role role) {
    bool first = true;
    for (const px_backend *be = px->backends.list[role]; be; be = be->next) {
        strbuf_printf(b, "%s{\"instance\":\"%s\",\"healthy\":%s,\"in_flight\":%u", first ? "" : ",",
                      be->name, be->healthy ? "true" : "false", be->target.active);
        if (role == PX_ROLE_PREFILL)
            strbuf_printf(b, ",\"early_decode\":%s",
                          px->cfg->early_decode && !be->no_early_kv ? "true" : "false");
        strbuf_str(b, "}");
        first = false;
    }
}

static void handle_health(px_proxy *px, http_req *req, uint64_t t0) {
    if (px->balancer) {
        size_t hb = px_backends_count(&px->backends, PX_ROLE_BACKEND, true);
        bool ok = hb > 0 && !px->draining;
        strbuf b;
        strbuf_init(&b);
        strbuf_printf(&b,
                      "{\"status\":\"%s\",\"backend\":{\"healthy\":%zu,\"total\":%zu,"
                      "\"instances\":[",
                      ok ? "ok" : (px->draining ? "draining" : "unavailable"), hb,
                      px_backends_count(&px->backends, PX_ROLE_BACKEND, false));
        add_instances(&b, px, PX_ROLE_BACKEND);
        strbuf_str(&b, "]}}");
        if (b.oom)
            respond_error_simple(px, req, PX_ROUTE_HEALTH, t0, 500, PX_ERROR_UPSTREAM,
                                 "out of memory");
        else
            respond_simple(px, req, PX_ROUTE_HEALTH, t0, ok ? 200 : 503, "application/json", b.p,
                           b.len);
        strbuf_free(&b);
        return;
    }
    size_t hp = px_backends_count(&px->backends, PX_ROLE_PREFILL, true);
    size_t hd = px_backends_count(&px->backends, PX_ROLE_DECODE, true);
    bool ok = hp > 0 && hd > 0 && !px->draining;
    strbuf b;
    strbuf_init(&b);
    strbuf_printf(&b,
                  "{\"status\":\"%s\",\"prefill\":{\"healthy\":%zu,\"total\":%zu,\"instances\":[",
                  ok ? "ok" : (px->draining ? "draining" : "unavailable"), hp,
                  px_backends_count(&px->backends, PX_ROLE_PREFILL, false));
    add_instances(&b, px, PX_ROLE_PREFILL);
    strbuf_printf(&b, "]},\"decode\":{\"healthy\":%zu,\"total\":%zu,\"instances\":[", hd,
                  px_backends_count(&px->backends, PX_ROLE_DECODE, false));
    add_instances(&b, px, PX_ROLE_DECODE);
    strbuf_str(&b, "]}}");
    if (b.oom) {
        respond_error_simple(px, req, PX_ROUTE_HEALTH, t0, 500, PX_ERROR_UPSTREAM, "out of memory");
    } else {
        respond_simple(px, req, PX_ROUTE_HEALTH, t0, ok ? 200 : 503, "application/json", b.p,
                       b.len);
    }
    strbuf_free(&b);
}

static void render_backend_family(strbuf *b, const px_backends *s, const char *name,
                                  const char *type, const char *help, int which) {
    px_metrics_family(b, name, type, help);
    for (int r = 0; r < PX_ROLE_COUNT; r++)
        for (const px_backend *be = s->list[r]; be; be = be->next) {
            uint64_t v = which == 0   ? be->target.active
                         : which == 1 ? be->target.load
                         : which == 2 ? (uint64_t)be->healthy
                         : which == 3 ? be->failures
                         : which == 4 ? be->ejections
                                      : be->readmissions;
            strbuf_printf(b, "%s{role=\"%s\",backend=\"", name, px_role_name(be->role));
            px_metrics_label_value(b, be->name);
            strbuf_printf(b, "\"} %llu\n", (unsigned long long)v);
        }
}

static void handle_metrics(px_proxy *px, http_req *req, uint64_t t0) {
    /* Counted before rendering, so a scrape sees itself. */
    px->m.requests[PX_ROUTE_METRICS][200]++;
    strbuf b;
    strbuf_init(&b);
    const px_metrics *m = &px->m;
    px_metrics_family(&b, "duet_proxy_requests_total", "counter",
                      "Requests answered by the proxy, by route and HTTP status.");
    for (int r = 0; r < PX_ROUTE_COUNT; r++)
        for (int c = 0; c < PX_STATUS_MAX; c++)
            if (m->requests[r][c])
                strbuf_printf(&b, "duet_proxy_requests_total{route=\"%s\",code=\"%d\"} %llu\n",
                              px_route_name((px_route)r), c, (unsigned long long)m->requests[r][c]);
    px_metrics_family(&b, "duet_proxy_errors_total", "counter",
                      "Requests that did not end well, by route and kind.");
    for (int r = 0; r < PX_ROUTE_COUNT; r++)
        for (int k = 0; k < PX_ERROR_COUNT; k++)
            if (m->errors[r][k])
                strbuf_printf(&b, "duet_proxy_errors_total{route=\"%s\",kind=\"%s\"} %llu\n",
                              px_route_name((px_route)r), px_error_kind_name((px_error_kind)k),
                              (unsigned long long)m->errors[r][k]);
    px_metrics_family(&b, "duet_proxy_request_duration_seconds", "histogram",
                      "Time from a request's arrival to its answer's end, by route.");
    for (int r = 0; r < PX_ROUTE_COUNT; r++) {
        if (!m->duration[r].count) continue;
        char labels[64];
        snprintf(labels, sizeof labels, "route=\"%s\"", px_route_name((px_route)r));
        px_metrics_hist(&b, "duet_proxy_request_duration_seconds", labels, &m->duration[r]);
    }
    px_metrics_family(&b, "duet_proxy_leg_duration_seconds", "histogram",
                      "Time of one backend request (a leg), sent to answer end, by leg.");
    for (int l = 0; l < PX_LEG_COUNT; l++) {
        char labels[64];
        snprintf(labels, sizeof labels, "leg=\"%s\"", px_leg_name((px_leg)l));
        px_metrics_hist(&b, "duet_proxy_leg_duration_seconds", labels, &px->leg_latency[l]);
    }
    px_metrics_family(&b, "duet_proxy_backend_request_duration_seconds", "histogram",
                      "Time of the requests sent to one backend, sent to answer end.");
    for (int r = 0; r < PX_ROLE_COUNT; r++)
        for (const px_backend *be = px->backends.list[r]; be; be = be->next) {
            strbuf labels;
            strbuf_init(&labels);
            strbuf_printf(&labels, "role=\"%s\",backend=\"", px_role_name(be->role));
            px_metrics_label_value(&labels, be->name);
            strbuf_str(&labels, "\"");
            if (!labels.oom)
                px_metrics_hist(&b, "duet_proxy_backend_request_duration_seconds", labels.p,
                                &be->latency);
            strbuf_free(&labels);
        }
    render_backend_family(&b, &px->backends, "duet_proxy_backend_in_flight", "gauge",
                          "Requests the proxy has open on a backend.", 0);
    render_backend_family(&b, &px->backends, "duet_proxy_backend_load", "gauge",
                          "Outstanding load charged to a backend (estimated tokens).", 1);
    render_backend_family(&b, &px->backends, "duet_proxy_backend_healthy", "gauge",
                          "1 while a backend is eligible, 0 while ejected.", 2);
    render_backend_family(&b, &px->backends, "duet_proxy_backend_failures_total", "counter",
                          "Requests to a backend that failed (refused, reset, timeout, 5xx).", 3);
    render_backend_family(&b, &px->backends, "duet_proxy_ejections_total", "counter",
                          "Times a backend was ejected for consecutive failures.", 4);
    render_backend_family(&b, &px->backends, "duet_proxy_readmissions_total", "counter",
                          "Times an ejected or added backend was admitted by health probes.", 5);
    px_metrics_family(&b, "duet_proxy_retries_total", "counter",
                      "Backend requests retried on another backend, by leg.");
    for (int l = 0; l < PX_LEG_COUNT; l++)
        strbuf_printf(&b, "duet_proxy_retries_total{leg=\"%s\"} %llu\n", px_leg_name((px_leg)l),
                      (unsigned long long)m->retries[l]);
    http_server_stats hs;
    http_server_get_stats(px->srv, &hs);
    px_metrics_family(&b, "duet_proxy_client_connections", "gauge", "Client connections open.");
    strbuf_printf(&b, "duet_proxy_client_connections %llu\n",
                  (unsigned long long)hs.connections_open);
    px_metrics_family(&b, "duet_proxy_client_connections_rejected_total", "counter",
                      "Client connections answered 503 for --max-connections.");
    strbuf_printf(&b, "duet_proxy_client_connections_rejected_total %llu\n",
                  (unsigned long long)hs.connections_rejected);
    px_metrics_family(&b, "duet_proxy_client_connections_rejected_per_client_total", "counter",
                      "Client connections answered 429 for --max-connections-per-client.");
    strbuf_printf(&b, "duet_proxy_client_connections_rejected_per_client_total %llu\n",
                  (unsigned long long)hs.connections_rejected_client);
    px_metrics_family(&b, "duet_proxy_requests_in_flight", "gauge",
                      "Requests the proxy is working on.");
    strbuf_printf(&b, "duet_proxy_requests_in_flight %u\n", px->jobs_open);
    if (b.oom) {
        http_respond_error(req, 500, "InternalServerError", "out of memory");
    } else {
        http_respond(req, 200, "text/plain; version=0.0.4; charset=utf-8", b.p, b.len);
    }
    px_hist_observe(&px->m.duration[PX_ROUTE_METRICS], seconds_since(t0));
    strbuf_free(&b);
}

/* vllm-ascend's admin body: {"type": "prefill"|"decode", "instance": "h:p"} or "instances":
 * "h:p" | ["h:p", ...]. */
static void handle_instances(px_proxy *px, http_req *req, px_route route, uint64_t t0) {
    bool add = route == PX_ROUTE_INSTANCES_ADD;
    cJSON *root = cJSON_ParseWithLength(req->body, req->body_len);
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(root, "type");
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(root, "instances");
    if (!list) list = cJSON_GetObjectItemCaseSensitive(root, "instance");
    px_role role;
    const char *bad = NULL;
    if (!cJSON_IsObject(root))
        bad = "the request body must be a JSON object";
    else if (!cJSON_IsString(type) || px_role_parse(type->valuestring, &role) ||
             (role == PX_ROLE_BACKEND) != px->balancer)
        bad = px->balancer ? "'type' must be \"backend\" (the proxy balances plain instances)"
                           : "'type' must be \"prefill\" or \"decode\"";
    else if (!cJSON_IsString(list) && !cJSON_IsArray(list))
        bad = "'instances' must be \"host:port\" or a list of them";
    px_endpoint eps[64];
    size_t n = 0;
    if (!bad) {
        const cJSON *one = list, *e = NULL;
        if (cJSON_IsArray(list)) e = list->child;
        for (; !bad && (cJSON_IsArray(list) ? e != NULL : one != NULL);
             e = e ? e->next : NULL, one = NULL) {
            const cJSON *it = cJSON_IsArray(list) ? e : one;
            if (n == sizeof eps / sizeof eps[0])
                bad = "at most 64 instances per request";
            else if (!cJSON_IsString(it) || px_endpoint_parse(it->valuestring, &eps[n]))
                bad = "every instance must be \"host:port\"";
            else
                n++;
        }
        if (!bad && n == 0) bad = "no instance given";
    }
    if (bad) {
        cJSON_Delete(root);
        respond_error_simple(px, req, route, t0, 400, PX_ERROR_BAD_REQUEST, bad);
        return;
    }
    cJSON_Delete(root);
    size_t changed = 0;
    int status = 200;
    const char *why = NULL;
    for (size_t i = 0; i < n; i++) {
        char name[PX_HOST_MAX + 8];
        px_endpoint_format(&eps[i], name, sizeof name);
        duet_status st = add ? px_backends_add(&px->backends, role, &eps[i], false)
                             : px_backends_remove(&px->backends, role, name);
        if (st == DUET_OK) {
            changed++;
        } else if (st != DUET_ERR_BUSY && st != DUET_ERR_NOT_FOUND) {
            status = 400;
            why = add ? "cannot add the instance (does its host resolve?)" : "cannot remove it";
        }
    }
    if (!add && changed == 0 && status == 200) {
        status = 404;
        why = "no such instance";
    }
    if (why) {
        respond_error_simple(px, req, route, t0, status,
                             status == 404 ? PX_ERROR_NOT_FOUND : PX_ERROR_BAD_REQUEST, why);
        return;
    }
    strbuf b;
    strbuf_init(&b);
    strbuf_printf(&b, "{\"message\":\"%s %zu %s instance(s)%s\",\"current_%s_instances\":[",
                  add ? "added" : "removed", changed, px_role_name(role),
                  add ? "; each serves once its health probes pass" : "",
                  px->balancer ? "backend" : "prefill");
    for (int r = 0; r < PX_ROLE_COUNT; r++) {
        if ((r == PX_ROLE_BACKEND) != px->balancer) continue;
        if (r == PX_ROLE_DECODE) strbuf_str(&b, "],\"current_decode_instances\":[");
        for (const px_backend *be = px->backends.list[r]; be; be = be->next)
            strbuf_printf(&b, "%s\"%s\"", be == px->backends.list[r] ? "" : ",", be->name);
    }
    strbuf_str(&b, "]}");
    if (b.oom)
        respond_error_simple(px, req, route, t0, 500, PX_ERROR_UPSTREAM, "out of memory");
    else
        respond_simple(px, req, route, t0, 200, "application/json", b.p, b.len);
    strbuf_free(&b);
}

/* Constant time in the length of the expected value: no early exit on the first difference. */
static bool auth_ok(const px_proxy *px, const http_req *req) {
    if (!px->auth_expect) return true;
    const char *got = http_req_header(req, "authorization");
    if (!got) return false;
    size_t n = strlen(px->auth_expect), m = strlen(got);
    unsigned char diff = (unsigned char)(n != m);
    for (size_t i = 0; i < n; i++)
        diff |= (unsigned char)(px->auth_expect[i] ^ (i < m ? got[i] : 0));
    return diff == 0;
}

static void on_request(http_req *req, void *user) {
    px_proxy *px = user;
    uint64_t t0 = uv_hrtime();
    const char *p = req->path;
    bool post = !strcmp(req->method, "POST"), get = !strcmp(req->method, "GET");
    px_route route = PX_ROUTE_OTHER;
    if (!strcmp(p, "/v1/completions"))
        route = PX_ROUTE_COMPLETIONS;
    else if (!strcmp(p, "/v1/chat/completions"))
        route = PX_ROUTE_CHAT_COMPLETIONS;
    else if (!strcmp(p, "/v1/models"))
        route = PX_ROUTE_MODELS;
    else if (!strcmp(p, "/tokenize"))
        route = PX_ROUTE_TOKENIZE;
    else if (!strcmp(p, "/detokenize"))
        route = PX_ROUTE_DETOKENIZE;
    else if (!strcmp(p, "/health"))
        route = PX_ROUTE_HEALTH;
    else if (!strcmp(p, "/metrics"))
        route = PX_ROUTE_METRICS;
    else if (!strcmp(p, "/instances/add"))
        route = PX_ROUTE_INSTANCES_ADD;
    else if (!strcmp(p, "/instances/remove"))
        route = PX_ROUTE_INSTANCES_REMOVE;
    if (route == PX_ROUTE_OTHER) {
        respond_error_simple(px, req, route, t0, 404, PX_ERROR_NOT_FOUND, "no such route");
        return;
    }
    bool guarded = !strncmp(p, "/v1/", 4) || !strncmp(p, "/instances/", 11);
    if (guarded && !auth_ok(px, req)) {
        respond_error_simple(px, req, route, t0, 401, PX_ERROR_AUTH,
                             "missing or invalid API key (Authorization: Bearer ...)");
        return;
    }
    bool want_get =
        route == PX_ROUTE_MODELS || route == PX_ROUTE_HEALTH || route == PX_ROUTE_METRICS;
    if (want_get ? !(get || !strcmp(req->method, "HEAD")) : !post) {
        respond_error_simple(px, req, route, t0, 405, PX_ERROR_NOT_FOUND,
                             want_get ? "use GET" : "use POST");
        return;
    }
    static const px_role decode_first[] = {PX_ROLE_DECODE, PX_ROLE_PREFILL};
    static const px_role plain[] = {PX_ROLE_BACKEND};
    switch (route) {
    case PX_ROUTE_COMPLETIONS:
    case PX_ROUTE_CHAT_COMPLETIONS:
        handle_generate(px, req, route, t0);
        return;
    case PX_ROUTE_MODELS:
        handle_forward(px, req, route, t0, px->balancer ? plain : decode_first,
                       px->balancer ? 1 : 2);
        return;
    case PX_ROUTE_TOKENIZE:
    case PX_ROUTE_DETOKENIZE:
        handle_forward(px, req, route, t0, px->balancer ? plain : decode_first, 1);
        return;
    case PX_ROUTE_HEALTH:
        handle_health(px, req, t0);
        return;
    case PX_ROUTE_METRICS:
        handle_metrics(px, req, t0);
        return;
    default:
        handle_instances(px, req, route, t0);
        return;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Life cycle */

static char *bearer(const char *key) {
    if (!key) return NULL;
    size_t n = strlen(key) + 8;
    char *s = malloc(n);
    if (s) snprintf(s, n, "Bearer %s", key);
    return s;
}

duet_status px_proxy_create(uv_loop_t *loop, const px_config *cfg, px_proxy **px_p) {
    px_proxy *px = calloc(1, sizeof *px);
    if (!px) return DUET_ERR_NO_MEMORY;
    px->loop = loop;
    px->cfg = cfg;
    px->refs = 1;
    rng_seed(&px->rng, uv_hrtime() ^ ((uint64_t)(uintptr_t)px << 16));
    px->auth_up = bearer(cfg->upstream_api_key);
    px->auth_expect = bearer(cfg->api_key);
    if ((cfg->upstream_api_key && !px->auth_up) || (cfg->api_key && !px->auth_expect)) {
        px_unref(px);
        return DUET_ERR_NO_MEMORY;
    }
    px_backends_opts bo = {
        .health_interval_ms = cfg->health_interval_ms,
        .health_timeout_ms = cfg->health_timeout_ms,
        .eject_after = cfg->eject_after,
        .readmit_after = cfg->readmit_after,
        .connect_timeout_ms = cfg->connect_timeout_ms,
        .auth = px->auth_up,
        .policy = cfg->policy,
    };
    duet_status st = px_backends_init(&px->backends, loop, &bo);
    if (st) {
        free(px->auth_up);
        free(px->auth_expect);
        free(px);
        return st;
    }
    uv_timer_init(loop, &px->drain_timer);
    px->drain_timer.data = px;
    px->refs++;
    /* Backends start eligible: the proxy serves at once, and probes or failed requests eject
     * the ones that are not there. */
    px->balancer = cfg->n_backend > 0;
    for (size_t i = 0; i < cfg->n_prefill + cfg->n_decode && !st; i++) {
        bool pre = i < cfg->n_prefill;
        const px_endpoint *ep = pre ? &cfg->prefill[i] : &cfg->decode[i - cfg->n_prefill];
        st = px_backends_add(&px->backends, pre ? PX_ROLE_PREFILL : PX_ROLE_DECODE, ep, true);
        if (st == DUET_ERR_BUSY) st = DUET_OK; /* listed twice: once is enough */
    }
    for (size_t i = 0; i < cfg->n_backend && !st; i++) {
        st = px_backends_add(&px->backends, PX_ROLE_BACKEND, &cfg->backend[i], true);
        if (st == DUET_ERR_BUSY) st = DUET_OK;
    }
    http_server_opts so;
    http_server_opts_init(&so);
    so.max_body_bytes = cfg->max_body_bytes;
    so.max_connections = cfg->max_connections;
    so.max_connections_per_client = cfg->max_connections_per_client;
    so.header_timeout_ms = cfg->client_header_timeout_ms;
    so.idle_timeout_ms = cfg->client_idle_timeout_ms;
    if (!st) st = http_server_create(loop, &so, on_request, px, &px->srv);
    if (!st) st = http_server_listen(px->srv, cfg->host, cfg->port);
    if (st) {
        px_proxy_destroy(px);
        return st;
    }
    *px_p = px;
    return DUET_OK;
}

int px_proxy_port(const px_proxy *px) {
    return px ? http_server_port(px->srv) : 0;
}

static void px_check_drained(px_proxy *px) {
    if (!px->draining || px->drained_called || px->jobs_open || px->srv) return;
    px->drained_called = true;
    uv_timer_stop(&px->drain_timer);
    if (px->drained_cb) px->drained_cb(px, px->drained_arg);
}

static void on_server_drained(http_server *srv, void *arg) {
    px_proxy *px = arg;
    http_server_destroy(srv);
    px->srv = NULL;
    px_check_drained(px);
}

/* Jobs whose client has its answer but whose prefill stream is still open: cut off. */
static void px_end_lingering(px_proxy *px) {
    while (px->lingering) job_end(px->lingering);
}

static void on_drain_deadline(uv_timer_t *t) {
    px_proxy *px = t->data;
    if (!px->srv && !px->lingering) return;
    LOG_WARN("proxy: drain deadline passed with %u requests in flight; closing them",
             px->jobs_open);
    /* Their on_close cancels the upstream legs. */
    http_server_destroy(px->srv);
    px->srv = NULL;
    px_end_lingering(px);
    px_check_drained(px);
}

void px_proxy_drain(px_proxy *px, unsigned deadline_ms, px_drained_fn cb, void *arg) {
    if (!px || px->draining) return;
    px->draining = true;
    px->drained_cb = cb;
    px->drained_arg = arg;
    LOG_INFO("proxy: draining %u requests in flight", px->jobs_open);
    http_server_close(px->srv, on_server_drained, px);
    if (deadline_ms) uv_timer_start(&px->drain_timer, on_drain_deadline, deadline_ms, 0);
}

static void on_drain_timer_closed(uv_handle_t *h) {
    px_unref(h->data);
}

static void on_backends_closed(px_backends *s) {
    px_unref((px_proxy *)((char *)s - offsetof(px_proxy, backends)));
}

void px_proxy_destroy(px_proxy *px) {
    if (!px || px->destroyed) return;
    px->destroyed = true;
    px->drained_cb = NULL;
    http_server_destroy(px->srv); /* jobs still open end through their on_close */
    px->srv = NULL;
    px_end_lingering(px);
    px->refs++; /* the probe timer's, inside px */
    px_backends_close(&px->backends, on_backends_closed);
    uv_close((uv_handle_t *)&px->drain_timer, on_drain_timer_closed);
    px_unref(px);
}
