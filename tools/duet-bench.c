/* duet-bench: a load generator for OpenAI-compatible model servers that measures what users of
 * `vllm bench serve` (benchmark_serving.py) measure, with the same flags, printed table and
 * result JSON: requests from a dataset (random, sharegpt, custom) sent at a Poisson/gamma rate
 * under a concurrency cap to /v1/completions or /v1/chat/completions on duet's libuv HTTP
 * client, streamed answers timed per chunk. The numbers are bench_stats.c's, the workloads
 * bench_data.c's; this file runs the requests and reads their answers. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "base/fileio.h"
#include "base/log.h"
#include "base/opt.h"
#include "base/strbuf.h"
#include "bench_data.h"
#include "bench_sse.h"
#include "bench_stats.h"
#include "net/httpc.h"
#include "text/chat.h"
#include "text/tokenizer.h"

enum { MAX_ERROR_BODY = 4096, MAX_HEADERS = 32 };

/* ---------------------------------------------------------------------------------------------
 * Options */

typedef enum backend_kind { BACKEND_OPENAI, BACKEND_VLLM, BACKEND_OPENAI_CHAT } backend_kind;
typedef enum dataset_kind { DATASET_RANDOM, DATASET_SHAREGPT, DATASET_CUSTOM } dataset_kind;

typedef struct bench_opts {
    int backend;
    const char *base_url, *host, *endpoint, *api_key, *label;
    int port;
    opt_list headers, metadata, goodput;
    const char *model, *served_name, *tokenizer;
    bool skip_tokenizer;
    int dataset;
    const char *dataset_path;
    int num_prompts, input_len, output_len;
    int random_input_len, random_output_len, random_prefix_len;
    double random_range_ratio;
    int sharegpt_output_len, custom_output_len;
    bool skip_chat_template, disable_shuffle, no_oversample;
    long long seed;
    double request_rate, burstiness;
    int max_concurrency, num_warmups;
    double temperature, top_p, min_p, frequency_penalty, presence_penalty, repetition_penalty;
    int top_k, logprobs;
    bool ignore_eos, stream;
    const char *extra_body;
    bool save_result, save_detailed, append_result;
    const char *result_dir, *result_filename;
    const char *percentile_metrics, *metric_percentiles;
    bool disable_tqdm, fail_on_error;
    const char *request_id_prefix;
    double request_timeout;
} bench_opts;

/* --request-rate and --burstiness accept "inf", as Python's float() does. */
static duet_status parse_rate(const opt_spec *spec, const char *v, char *err, size_t len) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (!*v || *end || errno || !(x > 0)) {
        snprintf(err, len, "'%s' is not a number above 0 (or inf)", v);
        return DUET_ERR_INVALID;
    }
    *(double *)spec->dest = x;
    return DUET_OK;
}

/* Python's str(float): "inf", "1.0", "0.5", "100.0" (the shortest digits that read back, in
 * positional notation for exponents -4..15 as Python's repr). */
static void py_float(double x, char *buf, size_t len) {
    if (isinf(x)) {
        snprintf(buf, len, x > 0 ? "inf" : "-inf");
        return;
    }
    int prec = 1;
    for (; prec < 17; prec++) {
        snprintf(buf, len, "%.*e", prec - 1, x);
        if (strtod(buf, NULL) == x) break;
    }
    int exp = atoi(strchr(buf, 'e') + 1);
    if (exp < -4 || exp >= 16) {
        snprintf(buf, len, "%.*g", prec, x);
        return;
    }
    int decimals = prec - 1 - exp;
    snprintf(buf, len, "%.*f", decimals > 1 ? decimals : 1, x);
}

/* ---------------------------------------------------------------------------------------------
 * The run */

typedef struct bench bench;
typedef struct phase phase;

typedef struct breq {
    phase *ph;
    int index;
    const bds_item *item;
    bst_request *out;
    httpc_req *http;
    int status;
    uint64_t t_arrive, t_send, t_last; /* uv_hrtime ns */
    bsse_reader sse;
    strbuf body; /* a whole (not streamed) answer, or an error answer */
    bool first_seen, done_seen, active, finished;
    char *stream_error;
} breq;

/* One batch of requests run to the end: the warm-up or the benchmark itself. */
struct phase {
    bench *b;
    const char *name;
    breq *reqs;
    bst_request *out;
    const double *arrival; /* [n] seconds from start, or NULL: all at once */
    int n, next_arrival, in_flight, finished, failed;
    int *queue, q_head, q_tail;
    uint64_t t0, t_end;
    bool warmup, dispatching, over;
};

struct bench {
    bench_opts o;
    uv_loop_t *loop;
    httpc_pool *pool;
    char host[256], path[1024], models_path[1024];
    int port;
    bool chat;
    const char *model_name; /* what requests name */
    char *model_id;         /* what the result calls the model (--model or the server's) */
    const char *tokenizer_id;
    tok_tokenizer *tok;
    cJSON *extra_body;
    http_header headers[MAX_HEADERS];
    int n_headers;
    char auth[1024];
    uv_timer_t arrival_timer, progress_timer;
    uv_signal_t sigint;
    bool tty, interrupted, running;
    phase *cur;
};

static void phase_dispatch(phase *ph);

static double ns_to_s(uint64_t ns) {
    return (double)ns / 1e9;
}

/* ---- progress ---- */

static void progress_draw(phase *ph, bool final) {
    bench *b = ph->b;
    if (!b->tty) return;
    double el = ns_to_s(uv_hrtime() - ph->t0);
    int width = 30, fill = ph->n ? (int)((double)ph->finished / ph->n * width) : width;
    char bar[64];
    for (int i = 0; i < width; i++) bar[i] = i < fill ? '#' : (i == fill ? '>' : ' ');
    bar[width] = '\0';
    double rate = el > 0 ? ph->finished / el : 0;
    double eta = rate > 0 ? (ph->n - ph->finished) / rate : 0;
    fprintf(stderr, "\r%s %3d%% |%s| %d/%d [%02d:%02d<%02d:%02d, %.2f req/s, %d failed]\033[K",
            ph->name, ph->n ? ph->finished * 100 / ph->n : 100, bar, ph->finished, ph->n,
            (int)el / 60, (int)el % 60, (int)eta / 60, (int)eta % 60, rate, ph->failed);
    if (final) fputc('\n', stderr);
    fflush(stderr);
}

static void on_progress(uv_timer_t *t) {
    bench *b = t->data;
    if (b->cur) progress_draw(b->cur, false);
}

/* ---- a request's end ---- */

static void phase_over(phase *ph) {
    bench *b = ph->b;
    ph->over = true;
    ph->t_end = uv_hrtime();
    uv_timer_stop(&b->arrival_timer);
    uv_timer_stop(&b->progress_timer);
    progress_draw(ph, true);
    /* outside uv_run a stop would end the next phase's run at once */
    if (b->running) uv_stop(b->loop);
}

static void set_error(bst_request *out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_error(bst_request *out, const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    free(out->error);
    out->error = strdup(buf);
}

static void req_finish(breq *r, bool ok) {
    phase *ph = r->ph;
    if (r->finished) return;
    r->finished = true;
    r->out->success = ok;
    if (ok) {
        free(r->out->error);
        r->out->error = NULL;
    } else {
        ph->failed++;
        if (!r->out->error) set_error(r->out, "failed");
    }
    bsse_cleanup(&r->sse);
    strbuf_free(&r->body);
    free(r->stream_error);
    r->stream_error = NULL;
    r->http = NULL;
    if (r->active) ph->in_flight--;
    r->active = false;
    ph->finished++;
    if (ph->finished == ph->n)
        phase_over(ph);
    else
        phase_dispatch(ph);
}

/* The "message" of an OpenAI error answer, else the start of the body. */
static void error_of_body(const char *body, size_t len, char *buf, size_t cap) {
    cJSON *root = cJSON_ParseWithLength(body, len);
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(root, "error");
    const cJSON *m = cJSON_IsObject(e) ? cJSON_GetObjectItemCaseSensitive(e, "message") : e;
    if (cJSON_IsString(m))
        snprintf(buf, cap, "%s", m->valuestring);
    else
        snprintf(buf, cap, "%.*s", (int)(len < 200 ? len : 200), body ? body : "");
    cJSON_Delete(root);
    for (char *p = buf; *p; p++)
        if (*p == '\n' || *p == '\r') *p = ' ';
}

/* Text of choices[0]: completions' text, or chat's delta/message content and reasoning. */
static void add_choice_text(bst_request *out, const cJSON *choice) {
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(choice, "text");
    if (cJSON_IsString(t)) bst_request_add_text(out, t->valuestring, strlen(t->valuestring));
    const cJSON *d = cJSON_GetObjectItemCaseSensitive(choice, "delta");
    if (!d) d = cJSON_GetObjectItemCaseSensitive(choice, "message");
    static const char *const keys[2] = {"reasoning_content", "content"};
    for (int k = 0; k < 2; k++) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(d, keys[k]);
        if (cJSON_IsString(c)) bst_request_add_text(out, c->valuestring, strlen(c->valuestring));
    }
}

static void take_usage(bst_request *out, const cJSON *root) {
    const cJSON *u = cJSON_GetObjectItemCaseSensitive(root, "usage");
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(u, "completion_tokens");
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(u, "prompt_tokens");
    if (cJSON_IsNumber(c) && c->valuedouble >= 0) out->output_tokens = c->valueint;
    if (cJSON_IsNumber(p) && p->valuedouble >= 0) out->prompt_len = p->valueint;
}

typedef struct event_ctx {
    breq *r;
    uint64_t now;
} event_ctx;

/* One SSE event of a streamed answer. Non-zero: the answer is a failure (stream_error set). */
static int on_event(void *arg, const char *data, size_t len) {
    event_ctx *ec = arg;
    breq *r = ec->r;
    if (r->done_seen) return 0;
    if (!strcmp(data, "[DONE]")) {
        r->done_seen = true;
        return 0;
    }
    cJSON *root = cJSON_ParseWithLength(data, len);
    char buf[512];
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        snprintf(buf, sizeof buf, "malformed event: %.100s", data);
        r->stream_error = strdup(buf);
        return 1;
    }
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(root, "error");
    if (err && !cJSON_IsNull(err)) {
        error_of_body(data, len, buf, sizeof buf);
        char msg[600];
        snprintf(msg, sizeof msg, "error event after %d chunks: %s", r->out->n_chunks, buf);
        r->stream_error = strdup(msg);
        cJSON_Delete(root);
        return 1;
    }
    /* TTFT and ITL are stamped on chunks that carry a choice, whatever its text (a token whose
     * text is held back still came); the usage chunk has "choices": [] */
    const cJSON *choices = cJSON_GetObjectItemCaseSensitive(root, "choices");
    if (cJSON_IsArray(choices) && cJSON_GetArraySize(choices) > 0) {
        bst_request *out = r->out;
        if (!r->first_seen) {
            r->first_seen = true;
            out->ttft = ns_to_s(ec->now - r->t_send);
        } else {
            bst_request_add_itl(out, ns_to_s(ec->now - r->t_last));
        }
        r->t_last = ec->now;
        out->n_chunks++;
        add_choice_text(out, cJSON_GetArrayItem(choices, 0));
    }
    take_usage(r->out, root);
    cJSON_Delete(root);
    return 0;
}

static void on_head(httpc_req *req, const httpc_response *resp, void *arg) {
    breq *r = arg;
    (void)req;
    r->status = resp->status;
}

static void on_body(httpc_req *req, const char *data, size_t len, void *arg) {
    breq *r = arg;
    bench *b = r->ph->b;
    if (r->status == 200 && b->o.stream) {
        event_ctx ec = {r, uv_hrtime()};
        int rc = bsse_feed(&r->sse, data, len, on_event, &ec);
        if (rc) {
            if (rc < 0)
                set_error(r->out, "out of memory reading the stream");
            else
                set_error(r->out, "%s", r->stream_error ? r->stream_error : "bad stream");
            httpc_cancel(req);
            req_finish(r, false);
        }
        return;
    }
    /* an error answer's start is enough to say what it was */
    if (r->status != 200 && r->body.len >= MAX_ERROR_BODY) return;
    strbuf_add(&r->body, data, len);
}

static void on_end(httpc_req *req, duet_status st, void *arg) {
    breq *r = arg;
    bench *b = r->ph->b;
    bst_request *out = r->out;
    uint64_t now = uv_hrtime();
    r->http = NULL;
    char buf[600];
    if (st != DUET_OK) {
        const char *why = httpc_req_reason(req);
        if (!why || !*why) why = duet_strerror(st);
        if (r->status == 200 && b->o.stream)
            set_error(out, "stream cut after %d chunks: %s", out->n_chunks, why);
        else if (r->status)
            set_error(out, "HTTP %d, then: %s", r->status, why);
        else
            set_error(out, "%s", why);
        req_finish(r, false);
        return;
    }
    if (r->status != 200) {
        error_of_body(r->body.p, r->body.len, buf, sizeof buf);
        set_error(out, "HTTP %d: %s", r->status, buf);
        req_finish(r, false);
        return;
    }
    if (b->o.stream) {
        event_ctx ec = {r, now};
        int rc = bsse_finish(&r->sse, on_event, &ec);
        if (rc) {
            set_error(out, "%s", r->stream_error ? r->stream_error : "out of memory");
        } else if (!r->first_seen) {
            set_error(out, "the stream had no chunk with a choice (nothing to time)");
            rc = 1;
        } else if (!r->done_seen) {
            set_error(out, "the stream ended after %d chunks without data: [DONE]", out->n_chunks);
            rc = 1;
        }
        if (!rc) out->latency = ns_to_s(r->t_last - r->t_send);
        req_finish(r, rc == 0);
        return;
    }
    /* a whole answer: only its end is seen, so TTFT, TPOT and ITL are not measured */
    cJSON *root = cJSON_ParseWithLength(r->body.p ? r->body.p : "", r->body.len);
    const cJSON *choices = cJSON_GetObjectItemCaseSensitive(root, "choices");
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(root, "error");
    bool ok =
        cJSON_IsArray(choices) && cJSON_GetArraySize(choices) > 0 && (!err || cJSON_IsNull(err));
    if (ok) {
        out->latency = out->ttft = ns_to_s(now - r->t_send);
        out->n_chunks = 1;
        add_choice_text(out, cJSON_GetArrayItem(choices, 0));
        take_usage(out, root);
    } else {
        error_of_body(r->body.p, r->body.len, buf, sizeof buf);
        set_error(out, "200 without choices: %s", buf);
    }
    cJSON_Delete(root);
    req_finish(r, ok);
}

/* ---- sending ---- */

static char *request_body(bench *b, const bds_item *it) {
    const bench_opts *o = &b->o;
    cJSON *root = cJSON_CreateObject();
    if (b->model_name && *b->model_name) cJSON_AddStringToObject(root, "model", b->model_name);
    if (b->chat) {
        cJSON *msgs = cJSON_AddArrayToObject(root, "messages");
        cJSON *m = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "role", "user");
        cJSON_AddStringToObject(m, "content", it->text ? it->text : "");
        cJSON_AddItemToArray(msgs, m);
        cJSON_AddNumberToObject(root, "max_completion_tokens", it->output_len);
    } else {
        if (it->ids)
            cJSON_AddItemToObject(root, "prompt", cJSON_CreateIntArray(it->ids, it->n_ids));
        else
            cJSON_AddStringToObject(root, "prompt", it->text ? it->text : "");
        cJSON_AddNumberToObject(root, "max_tokens", it->output_len);
        if (o->logprobs >= 0) cJSON_AddNumberToObject(root, "logprobs", o->logprobs);
    }
    cJSON_AddBoolToObject(root, "stream", o->stream);
    if (o->stream)
        cJSON_AddTrueToObject(cJSON_AddObjectToObject(root, "stream_options"), "include_usage");
    if (o->ignore_eos) cJSON_AddTrueToObject(root, "ignore_eos");
    /* sampling parameters given on the command line, then --extra-body on top */
    const cJSON *x;
    cJSON_ArrayForEach(x, b->extra_body) {
        cJSON_DeleteItemFromObjectCaseSensitive(root, x->string);
        cJSON_AddItemToObject(root, x->string, cJSON_Duplicate(x, true));
    }
    char *s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return s;
}

static void req_start(breq *r) {
    phase *ph = r->ph;
    bench *b = ph->b;
    r->active = true;
    ph->in_flight++;
    r->t_send = uv_hrtime();
    r->out->start_time = ns_to_s(r->t_send - ph->t0);
    r->out->queue_time = ns_to_s(r->t_send - r->t_arrive);
    r->out->prompt_len = r->item->prompt_len;
    bsse_init(&r->sse);
    char rid[256];
    snprintf(rid, sizeof rid, "%s%s%d", b->o.request_id_prefix, ph->warmup ? "warmup-" : "",
             r->index);
    http_header hs[MAX_HEADERS + 2];
    int nh = 0;
    for (int i = 0; i < b->n_headers; i++) hs[nh++] = b->headers[i];
    hs[nh++] = (http_header){"X-Request-Id", rid};
    hs[nh] = (http_header){NULL, NULL};
    char *body = request_body(b, r->item);
    unsigned tmo =
        (unsigned)(b->o.request_timeout * 1000 > 4e9 ? 4e9 : b->o.request_timeout * 1000);
    httpc_request rq = {.method = "POST",
                        .path = b->path,
                        .headers = hs,
                        .body = body,
                        .body_len = body ? strlen(body) : 0,
                        .first_byte_timeout_ms = tmo,
                        .idle_timeout_ms = tmo};
    static const httpc_callbacks cb = {on_head, on_body, on_end};
    duet_status st = body ? httpc_send(b->pool, &rq, &cb, r, &r->http) : DUET_ERR_NO_MEMORY;
    cJSON_free(body);
    if (st != DUET_OK) {
        set_error(r->out, "could not send the request: %s", duet_strerror(st));
        req_finish(r, false);
    }
}

static void phase_dispatch(phase *ph) {
    bench *b = ph->b;
    if (ph->dispatching) return; /* a request that fails at once ends inside req_start */
    ph->dispatching = true;
    while (!ph->over && ph->q_head < ph->q_tail &&
           (b->o.max_concurrency <= 0 || ph->in_flight < b->o.max_concurrency))
        req_start(&ph->reqs[ph->queue[ph->q_head++]]);
    ph->dispatching = false;
}

static void on_arrival(uv_timer_t *t) {
    bench *b = t->data;
    phase *ph = b->cur;
    uint64_t now = uv_hrtime();
    while (ph->next_arrival < ph->n &&
           (!ph->arrival ||
            ph->t0 + (uint64_t)(ph->arrival[ph->next_arrival] * 1e9) <= now + 500000)) {
        breq *r = &ph->reqs[ph->next_arrival];
        r->t_arrive = now;
        ph->queue[ph->q_tail++] = ph->next_arrival++;
    }
    phase_dispatch(ph);
    if (!ph->over && ph->next_arrival < ph->n) {
        uint64_t due = ph->t0 + (uint64_t)(ph->arrival[ph->next_arrival] * 1e9);
        uint64_t ms = due > now ? (due - now + 999999) / 1000000 : 0;
        uv_timer_start(&b->arrival_timer, on_arrival, ms, 0);
    }
}

/* Ctrl-C: what is in flight is abandoned, what was not sent is not; all count as failed, and
 * the result is written as usual. */
static void on_sigint(uv_signal_t *s, int signum) {
    bench *b = s->data;
    phase *ph = b->cur;
    (void)signum;
    if (!ph || ph->over) return;
    b->interrupted = true;
    fprintf(stderr, "\nduet-bench: interrupted: stopping\n");
    for (int i = 0; i < ph->n && !ph->over; i++) {
        breq *r = &ph->reqs[i];
        if (r->finished) continue;
        if (r->http) httpc_cancel(r->http);
        set_error(r->out, r->active ? "interrupted" : "not sent: interrupted");
        ph->dispatching = true; /* nothing new starts */
        req_finish(r, false);
    }
}

/* Runs n requests (items[index % n_items]) to their end. arrival NULL: all at once. */
static void phase_run(bench *b, phase *ph, const char *name, const bds_set *set, int n,
                      const double *arrival, bst_request *out) {
    memset(ph, 0, sizeof *ph);
    ph->b = b;
    ph->name = name;
    ph->warmup = !strcmp(name, "warmup");
    ph->n = n;
    ph->arrival = arrival;
    ph->out = out;
    ph->reqs = calloc((size_t)(n > 0 ? n : 1), sizeof *ph->reqs);
    ph->queue = calloc((size_t)(n > 0 ? n : 1), sizeof *ph->queue);
    if (!ph->reqs || !ph->queue) {
        fprintf(stderr, "duet-bench: out of memory\n");
        exit(1);
    }
    for (int i = 0; i < n; i++) {
        ph->reqs[i].ph = ph;
        ph->reqs[i].index = i;
        ph->reqs[i].item = &set->items[i % set->n];
        ph->reqs[i].out = &out[i];
    }
    b->cur = ph;
    ph->t0 = uv_hrtime();
    if (n == 0) return;
    if (b->tty) uv_timer_start(&b->progress_timer, on_progress, 250, 250);
    on_arrival(&b->arrival_timer);
    while (!ph->over) {
        b->running = true;
        int alive = uv_run(b->loop, UV_RUN_DEFAULT);
        b->running = false;
        if (!ph->over && !alive) {
            /* nothing left that could end the rest: an internal error, said as one */
            for (int i = 0; i < n && !ph->over; i++) {
                if (ph->reqs[i].finished) continue;
                set_error(&out[i], "internal: the request was lost");
                ph->dispatching = true;
                req_finish(&ph->reqs[i], false);
            }
        }
    }
    b->cur = NULL;
}

static void phase_cleanup(phase *ph) {
    free(ph->reqs);
    free(ph->queue);
}

/* ---------------------------------------------------------------------------------------------
 * Set-up: the server's address, its model, the tokenizer */

/* "http://host:port/prefix" → host, port and the prefix the endpoint is appended to. */
static bool parse_base_url(const char *url, char *host, size_t host_len, int *port, char *prefix,
                           size_t prefix_len) {
    if (!strncmp(url, "https://", 8)) {
        fprintf(stderr, "duet-bench: https is not supported (duet's client speaks plain HTTP)\n");
        return false;
    }
    if (strncmp(url, "http://", 7)) return false;
    const char *hp = url + 7, *slash = strchr(hp, '/');
    size_t hl = slash ? (size_t)(slash - hp) : strlen(hp);
    const char *colon = NULL;
    if (hl && hp[0] == '[') { /* [v6]:port */
        const char *close = memchr(hp, ']', hl);
        if (!close) return false;
        colon = close + 1 < hp + hl && close[1] == ':' ? close + 1 : NULL;
    } else {
        colon = memchr(hp, ':', hl);
    }
    size_t name_len = colon ? (size_t)(colon - hp) : hl;
    if (!name_len || name_len >= host_len) return false;
    snprintf(host, host_len, "%.*s", (int)name_len, hp);
    *port = 80;
    if (colon) {
        char *end;
        long p = strtol(colon + 1, &end, 10);
        if (end != hp + hl || p <= 0 || p > 65535) return false;
        *port = (int)p;
    }
    snprintf(prefix, prefix_len, "%s", slash ? slash : "");
    size_t pl = strlen(prefix);
    if (pl && prefix[pl - 1] == '/') prefix[pl - 1] = '\0';
    return true;
}

typedef struct get_ctx {
    bench *b;
    int status;
    strbuf body;
    duet_status st;
    bool done;
    char reason[256];
} get_ctx;

static void get_head(httpc_req *req, const httpc_response *resp, void *arg) {
    (void)req;
    ((get_ctx *)arg)->status = resp->status;
}

static void get_body(httpc_req *req, const char *data, size_t len, void *arg) {
    (void)req;
    strbuf_add(&((get_ctx *)arg)->body, data, len);
}

static void get_end(httpc_req *req, duet_status st, void *arg) {
    get_ctx *g = arg;
    g->st = st;
    g->done = true;
    if (st) snprintf(g->reason, sizeof g->reason, "%s", httpc_req_reason(req));
    if (g->b->running) uv_stop(g->b->loop);
}

/* GET /v1/models: the first model's id, as vLLM does without --model. */
static char *fetch_model(bench *b, const char *prefix, char *err, size_t err_len) {
    if (!b->pool) {
        snprintf(err, err_len, "cannot resolve %s", b->host);
        return NULL;
    }
    get_ctx g = {.b = b};
    snprintf(b->models_path, sizeof b->models_path, "%s/v1/models", prefix);
    http_header hs[MAX_HEADERS + 1];
    int nh = 0;
    for (int i = 0; i < b->n_headers; i++) hs[nh++] = b->headers[i];
    hs[nh] = (http_header){NULL, NULL};
    httpc_request rq = {.method = "GET",
                        .path = b->models_path,
                        .headers = hs,
                        .first_byte_timeout_ms = 30000,
                        .idle_timeout_ms = 30000};
    static const httpc_callbacks cb = {get_head, get_body, get_end};
    if (httpc_send(b->pool, &rq, &cb, &g, NULL) != DUET_OK) {
        snprintf(err, err_len, "could not send GET %.200s", b->models_path);
        return NULL;
    }
    while (!g.done) {
        b->running = true;
        uv_run(b->loop, UV_RUN_DEFAULT);
        b->running = false;
    }
    char *id = NULL;
    cJSON *root = g.st == DUET_OK && g.status == 200
                      ? cJSON_ParseWithLength(g.body.p ? g.body.p : "", g.body.len)
                      : NULL;
    const cJSON *first = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(root, "data"), 0);
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(first, "id");
    if (cJSON_IsString(x)) id = strdup(x->valuestring);
    if (!id) {
        if (g.st != DUET_OK)
            snprintf(err, err_len, "GET %.200s: %s", b->models_path, g.reason);
        else
            snprintf(err, err_len, "GET %.200s: HTTP %d, no model listed", b->models_path,
                     g.status);
    }
    cJSON_Delete(root);
    strbuf_free(&g.body);
    return id;
}

static bool is_file(const char *dir, const char *name) {
    char path[4096];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* config.json's vocab_size in dir, or 0: random ids must stay below the model's embedding. */
static int model_vocab(const char *dir) {
    char path[4096], *text = NULL;
    if (!dir || !is_file(dir, "config.json")) return 0;
    snprintf(path, sizeof path, "%s/config.json", dir);
    if (fio_read_text(path, 1 << 20, &text) != DUET_OK) return 0;
    cJSON *root = cJSON_Parse(text);
    free(text);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, "vocab_size");
    int n = cJSON_IsNumber(v) && v->valuedouble > 0 ? v->valueint : 0;
    cJSON_Delete(root);
    return n;
}

static int mkdirs(const char *dir) {
    char p[4096];
    snprintf(p, sizeof p, "%s", dir);
    for (char *s = p + 1; *s; s++) {
        if (*s != '/') continue;
        *s = '\0';
        if (mkdir(p, 0777) && errno != EEXIST) return -1;
        *s = '/';
    }
    return mkdir(p, 0777) && errno != EEXIST ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------
 * Main */

static int usage_error(const char *fmt, const char *what) {
    fprintf(stderr, "duet-bench: ");
    fprintf(stderr, fmt, what);
    fputc('\n', stderr);
    return 2;
}

int main(int argc, char **argv) {
    log_set_tag("duet-bench");
    log_set_level(LOG_LEVEL_WARN);
    static bench b;
    bench_opts *o = &b.o;
    o->logprobs = -1;
    const opt_spec conn[] = {
        {.name = "--backend",
         .alias = "--endpoint-type",
         .type = OPT_CHOICE,
         .dest = &o->backend,
         .choices = "openai|vllm|openai-chat",
         .def = "openai",
         .help = "openai and vllm: /v1/completions; openai-chat: /v1/chat/completions (also "
                 "chosen by an --endpoint ending in chat/completions)"},
        {.name = "--base-url",
         .type = OPT_STRING,
         .dest = &o->base_url,
         .metavar = "URL",
         .help = "http://HOST:PORT[/PREFIX], instead of --host and --port"},
        {.name = "--host", .type = OPT_STRING, .dest = &o->host, .def = "127.0.0.1"},
        {.name = "--port",
         .type = OPT_INT,
         .dest = &o->port,
         .def = "8000",
         .min = 1,
         .max = 65535},
        {.name = "--endpoint",
         .type = OPT_STRING,
         .dest = &o->endpoint,
         .metavar = "PATH",
         .help = "the API route (default /v1/completions, /v1/chat/completions for "
                 "openai-chat)"},
        {.name = "--header",
         .type = OPT_LIST,
         .dest = &o->headers,
         .metavar = "KEY=VALUE...",
         .help = "headers sent with every request"},
        {.name = "--api-key",
         .type = OPT_STRING,
         .dest = &o->api_key,
         .env = "OPENAI_API_KEY",
         .metavar = "KEY",
         .help = "sent as 'Authorization: Bearer KEY'"},
        {.name = "--request-timeout",
         .type = OPT_DOUBLE,
         .dest = &o->request_timeout,
         .def = "21600",
         .min = 0.001,
         .max = 1e7,
         .metavar = "S",
         .help = "a request that waits this long for its first byte, or between two reads, "
                 "fails (default 6 h, vLLM's)"},
        {.name = "--ready-check-timeout-sec",
         .type = OPT_INT,
         .flags = OPT_IGNORED,
         .help = "duet-bench sends at once; failures are counted, not waited out"},
        {.name = "--insecure", .type = OPT_FLAG, .flags = OPT_IGNORED, .help = "no TLS here"},
    };
    const opt_spec model[] = {
        {.name = "--model",
         .type = OPT_STRING,
         .dest = &o->model,
         .metavar = "NAME|DIR",
         .help = "the model (a checkpoint folder also gives the tokenizer and vocabulary size); "
                 "default: the server's first in /v1/models"},
        {.name = "--served-model-name",
         .type = OPT_STRING,
         .dest = &o->served_name,
         .metavar = "NAME",
         .help = "the name requests carry (default: --model)"},
        {.name = "--tokenizer",
         .type = OPT_STRING,
         .dest = &o->tokenizer,
         .metavar = "DIR",
         .help = "tokenizer.json + tokenizer_config.json (default: --model)"},
        {.name = "--skip-tokenizer-init",
         .type = OPT_FLAG,
         .dest = &o->skip_tokenizer,
         .help = "do not load a tokenizer"},
        {.name = "--tokenizer-mode",
         .type = OPT_STRING,
         .flags = OPT_IGNORED,
         .help = "duet has one tokenizer"},
        {.name = "--trust-remote-code",
         .type = OPT_FLAG,
         .flags = OPT_IGNORED,
         .help = "no remote code runs here"},
    };
    const opt_spec data[] = {
        {.name = "--dataset-name",
         .type = OPT_CHOICE,
         .dest = &o->dataset,
         .choices = "random|sharegpt|custom",
         .def = "random"},
        {.name = "--dataset-path",
         .type = OPT_STRING,
         .dest = &o->dataset_path,
         .metavar = "FILE",
         .help = "ShareGPT JSON, or JSONL of {\"prompt\": ...} for custom"},
        {.name = "--num-prompts",
         .type = OPT_INT,
         .dest = &o->num_prompts,
         .def = "1000",
         .min = 1,
         .max = 1 << 24},
        {.name = "--input-len",
         .type = OPT_INT,
         .dest = &o->input_len,
         .min = 1,
         .max = 1 << 24,
         .help = "sets --random-input-len"},
        {.name = "--output-len",
         .type = OPT_INT,
         .dest = &o->output_len,
         .min = 1,
         .max = 1 << 24,
         .help = "sets every dataset's output length"},
        {.name = "--random-input-len",
         .type = OPT_INT,
         .dest = &o->random_input_len,
         .def = "1024",
         .min = 1,
         .max = 1 << 24},
        {.name = "--random-output-len",
         .type = OPT_INT,
         .dest = &o->random_output_len,
         .def = "128",
         .min = 1,
         .max = 1 << 24},
        {.name = "--random-range-ratio",
         .type = OPT_DOUBLE,
         .dest = &o->random_range_ratio,
         .def = "0",
         .help = "lengths uniform in [len*(1-r), len*(1+r)], 0 <= r < 1"},
        {.name = "--random-prefix-len",
         .type = OPT_INT,
         .dest = &o->random_prefix_len,
         .def = "0",
         .min = 0,
         .max = 1 << 24,
         .help = "random tokens before every prompt, the same for all"},
        {.name = "--sharegpt-output-len",
         .type = OPT_INT,
         .dest = &o->sharegpt_output_len,
         .min = 1,
         .max = 1 << 24,
         .help = "instead of each answer's own length"},
        {.name = "--custom-output-len",
         .type = OPT_INT,
         .dest = &o->custom_output_len,
         .def = "256",
         .min = 1,
         .max = 1 << 24},
        {.name = "--skip-chat-template",
         .type = OPT_FLAG,
         .dest = &o->skip_chat_template,
         .help = "custom: send prompts as they are (default: as a chat turn for "
                 "/v1/completions)"},
        {.name = "--disable-shuffle", .type = OPT_FLAG, .dest = &o->disable_shuffle},
        {.name = "--no-oversample",
         .type = OPT_FLAG,
         .dest = &o->no_oversample,
         .help = "fewer usable prompts than --num-prompts: run with fewer"},
        {.name = "--seed", .type = OPT_LONG, .dest = &o->seed, .def = "0", .min = 0, .max = 9e18},
    };
    const opt_spec traffic[] = {
        {.name = "--request-rate",
         .type = OPT_CUSTOM,
         .dest = &o->request_rate,
         .parse = parse_rate,
         .def = "inf",
         .metavar = "R",
         .help = "requests per second; inf sends all at once"},
        {.name = "--burstiness",
         .type = OPT_CUSTOM,
         .dest = &o->burstiness,
         .parse = parse_rate,
         .def = "1",
         .metavar = "B",
         .help = "gamma shape of the gaps: 1 is Poisson, < 1 burstier, > 1 more even"},
        {.name = "--max-concurrency",
         .type = OPT_INT,
         .dest = &o->max_concurrency,
         .min = 1,
         .max = 1 << 24,
         .help = "requests in flight at most (default: no limit)"},
        {.name = "--num-warmups",
         .type = OPT_INT,
         .dest = &o->num_warmups,
         .def = "0",
         .min = 0,
         .max = 1 << 20,
         .help = "requests (the first prompt) sent before, not measured"},
        {.name = "--request-id-prefix",
         .type = OPT_STRING,
         .dest = &o->request_id_prefix,
         .def = "bench-",
         .help = "X-Request-Id is this plus the request's index"},
    };
    const opt_spec sampling[] = {
        {.name = "--temperature",
         .type = OPT_DOUBLE,
         .dest = &o->temperature,
         .min = 0,
         .max = 1e6},
        {.name = "--top-p", .type = OPT_DOUBLE, .dest = &o->top_p, .min = 0, .max = 1},
        {.name = "--top-k", .type = OPT_INT, .dest = &o->top_k, .min = -1, .max = 1 << 30},
        {.name = "--min-p", .type = OPT_DOUBLE, .dest = &o->min_p, .min = 0, .max = 1},
        {.name = "--frequency-penalty",
         .type = OPT_DOUBLE,
         .dest = &o->frequency_penalty,
         .min = -2,
         .max = 2},
        {.name = "--presence-penalty",
         .type = OPT_DOUBLE,
         .dest = &o->presence_penalty,
         .min = -2,
         .max = 2},
        {.name = "--repetition-penalty",
         .type = OPT_DOUBLE,
         .dest = &o->repetition_penalty,
         .min = 1e-6,
         .max = 1e6},
        {.name = "--ignore-eos",
         .type = OPT_FLAG,
         .dest = &o->ignore_eos,
         .help = "generate to the output length (always on for the random dataset, as in vLLM)"},
        {.name = "--logprobs", .type = OPT_INT, .dest = &o->logprobs, .min = 0, .max = 20},
        {.name = "--extra-body",
         .type = OPT_STRING,
         .dest = &o->extra_body,
         .metavar = "JSON",
         .help = "fields merged into every request body"},
        {.name = "--stream",
         .type = OPT_FLAG,
         .dest = &o->stream,
         .def = "true",
         .flags = OPT_NEGATABLE,
         .help = "stream answers (--no-stream: whole answers, only E2EL and throughput)"},
    };
    const opt_spec results[] = {
        {.name = "--save-result",
         .type = OPT_FLAG,
         .dest = &o->save_result,
         .help = "write the result JSON"},
        {.name = "--save-detailed",
         .type = OPT_FLAG,
         .dest = &o->save_detailed,
         .help = "with per-request lengths, times and texts"},
        {.name = "--append-result",
         .type = OPT_FLAG,
         .dest = &o->append_result,
         .help = "append a line to the result file"},
        {.name = "--result-dir", .type = OPT_STRING, .dest = &o->result_dir, .metavar = "DIR"},
        {.name = "--result-filename",
         .type = OPT_STRING,
         .dest = &o->result_filename,
         .metavar = "FILE",
         .help = "default LABEL-RATEqps[-concurrencyN]-MODEL-DATE.json"},
        {.name = "--label",
         .type = OPT_STRING,
         .dest = &o->label,
         .help = "names the result (default: --backend)"},
        {.name = "--metadata",
         .type = OPT_LIST,
         .dest = &o->metadata,
         .metavar = "KEY=VALUE...",
         .help = "stored in the result JSON"},
        {.name = "--percentile-metrics",
         .type = OPT_STRING,
         .dest = &o->percentile_metrics,
         .metavar = "LIST",
         .help = "of ttft,tpot,itl,e2el,client_queue_time (default ttft,tpot,itl; e2el "
                 "without streaming)"},
        {.name = "--metric-percentiles",
         .type = OPT_STRING,
         .dest = &o->metric_percentiles,
         .def = "99",
         .metavar = "LIST",
         .help = "e.g. 50,90,99"},
        {.name = "--goodput",
         .type = OPT_LIST,
         .dest = &o->goodput,
         .metavar = "KEY:MS...",
         .help = "service level objectives (ttft, tpot, e2el) a good request meets"},
        {.name = "--disable-tqdm",
         .type = OPT_FLAG,
         .dest = &o->disable_tqdm,
         .help = "no progress bar (there is none when stderr is not a terminal)"},
        {.name = "--fail-on-error",
         .type = OPT_FLAG,
         .dest = &o->fail_on_error,
         .help = "exit 1 when any request failed (the result is written all the same)"},
        {.name = "--profile",
         .type = OPT_FLAG,
         .flags = OPT_IGNORED,
         .help = "duet has no profiler endpoint"},
        {.name = "--use-beam-search",
         .type = OPT_FLAG,
         .flags = OPT_IGNORED,
         .help = "duet does not do beam search"},
    };
    opt_parser *op;
    if (opt_parser_create("duet-bench", "[options]",
                          "Benchmarks an OpenAI-compatible server as `vllm bench serve` does: "
                          "same flags, table and result JSON.",
                          &op) != DUET_OK)
        return 1;
#define ADD(title, specs) opt_add(op, title, specs, (int)(sizeof specs / sizeof specs[0]))
    int prc = 2;
    if (ADD("Server", conn) == DUET_OK && ADD("Model", model) == DUET_OK &&
        ADD("Dataset", data) == DUET_OK && ADD("Traffic", traffic) == DUET_OK &&
        ADD("Sampling", sampling) == DUET_OK && ADD("Results", results) == DUET_OK)
        prc = opt_parse(op, argc, argv);
#undef ADD
    bool has_temp = opt_given(op, "--temperature"), has_top_p = opt_given(op, "--top-p"),
         has_top_k = opt_given(op, "--top-k"), has_min_p = opt_given(op, "--min-p"),
         has_freq = opt_given(op, "--frequency-penalty"),
         has_pres = opt_given(op, "--presence-penalty"),
         has_rep = opt_given(op, "--repetition-penalty"),
         has_endpoint = opt_given(op, "--endpoint"),
         has_share_len = opt_given(op, "--sharegpt-output-len"),
         has_conc = opt_given(op, "--max-concurrency");
    /* the parser owns the arrays of the list options (--header, --metadata, --goodput): it
     * lives until the end */
    if (prc) {
        opt_parser_destroy(op);
        return prc == 1 ? 0 : 2;
    }
    if (!has_conc) o->max_concurrency = 0;
    /* ids unique across runs, as vLLM's bench-<uuid>-, so a server's logs tell runs apart */
    static char rid_prefix[32];
    if (!o->request_id_prefix) {
        snprintf(rid_prefix, sizeof rid_prefix, "bench-%08x-",
                 (unsigned)(uv_hrtime() ^ ((uint64_t)getpid() << 16)));
        o->request_id_prefix = rid_prefix;
    }
    if (!has_share_len) o->sharegpt_output_len = 0;

    /* vLLM's general lengths map onto each dataset's */
    if (o->input_len) o->random_input_len = o->input_len;
    if (o->output_len)
        o->random_output_len = o->sharegpt_output_len = o->custom_output_len = o->output_len;
    if (!(o->random_range_ratio >= 0 && o->random_range_ratio < 1))
        return usage_error("--random-range-ratio must be in [0, 1), not %s", "that");
    if (o->dataset == DATASET_RANDOM && o->dataset_path)
        return usage_error("%s", "the random dataset takes no --dataset-path");
    if (o->dataset != DATASET_RANDOM && !o->dataset_path)
        return usage_error("%s", "sharegpt and custom need --dataset-path");
    /* vLLM: a random workload runs to its output length */
    if (o->dataset == DATASET_RANDOM) o->ignore_eos = true;

    bst_config cfg = {0};
    char err[1024];
    b.chat = o->backend == BACKEND_OPENAI_CHAT;
    if (!has_endpoint) o->endpoint = b.chat ? "/v1/chat/completions" : "/v1/completions";
    size_t el = strlen(o->endpoint);
    if (el >= 16 && !strcmp(o->endpoint + el - 16, "chat/completions")) b.chat = true;
    if (!o->percentile_metrics) o->percentile_metrics = o->stream ? "ttft,tpot,itl" : "e2el";
    if (bst_parse_metrics(o->percentile_metrics, &cfg, err, sizeof err) ||
        bst_parse_percentiles(o->metric_percentiles, &cfg, err, sizeof err))
        return usage_error("%s", err);
    for (int i = 0; i < o->goodput.n; i++)
        if (bst_parse_goodput(o->goodput.v[i], &cfg, err, sizeof err))
            return usage_error("%s", err);
    if (!o->stream) {
        unsigned timed = (1u << BST_METRIC_TTFT) | (1u << BST_METRIC_TPOT) | (1u << BST_METRIC_ITL);
        if (cfg.metrics & timed)
            fprintf(stderr, "duet-bench: without streaming only the end of an answer is seen: "
                            "TTFT, TPOT and ITL are not reported\n");
        cfg.metrics &= ~timed;
        if (!cfg.metrics) cfg.metrics = 1u << BST_METRIC_E2EL;
        if (cfg.slo_set[0] || cfg.slo_set[1])
            return usage_error("%s", "--goodput ttft/tpot needs streaming");
    }

    /* request bodies: sampling parameters given, then --extra-body */
    b.extra_body = cJSON_CreateObject();
    if (has_temp) cJSON_AddNumberToObject(b.extra_body, "temperature", o->temperature);
    if (has_top_p) cJSON_AddNumberToObject(b.extra_body, "top_p", o->top_p);
    if (has_top_k) cJSON_AddNumberToObject(b.extra_body, "top_k", o->top_k);
    if (has_min_p) cJSON_AddNumberToObject(b.extra_body, "min_p", o->min_p);
    if (has_freq) cJSON_AddNumberToObject(b.extra_body, "frequency_penalty", o->frequency_penalty);
    if (has_pres) cJSON_AddNumberToObject(b.extra_body, "presence_penalty", o->presence_penalty);
    if (has_rep) cJSON_AddNumberToObject(b.extra_body, "repetition_penalty", o->repetition_penalty);
    if (o->extra_body) {
        cJSON *x = cJSON_Parse(o->extra_body), *e;
        if (!cJSON_IsObject(x)) {
            cJSON_Delete(x);
            return usage_error("--extra-body: '%s' is not a JSON object", o->extra_body);
        }
        cJSON_ArrayForEach(e, x) {
            cJSON_DeleteItemFromObjectCaseSensitive(b.extra_body, e->string);
            cJSON_AddItemToObject(b.extra_body, e->string, cJSON_Duplicate(e, true));
        }
        cJSON_Delete(x);
    }
    if (!has_temp)
        fprintf(stderr, "duet-bench: no --temperature: the server's default applies (as in "
                        "vllm bench serve); --temperature=0 for greedy decoding\n");

    /* headers */
    b.headers[b.n_headers++] = (http_header){"Content-Type", "application/json"};
    if (o->api_key && *o->api_key) {
        snprintf(b.auth, sizeof b.auth, "Bearer %s", o->api_key);
        b.headers[b.n_headers++] = (http_header){"Authorization", b.auth};
    }
    for (int i = 0; i < o->headers.n; i++) {
        static char kv[MAX_HEADERS][1024];
        char *eq = strchr(o->headers.v[i], '=');
        if (!eq || b.n_headers >= MAX_HEADERS - 1 || strlen(o->headers.v[i]) >= sizeof kv[0])
            return usage_error("--header: '%s' is not KEY=VALUE", o->headers.v[i]);
        snprintf(kv[b.n_headers], sizeof kv[0], "%.*s", (int)(eq - o->headers.v[i]),
                 o->headers.v[i]);
        b.headers[b.n_headers] = (http_header){kv[b.n_headers], eq + 1};
        b.n_headers++;
    }
    for (int i = 0; i < o->metadata.n; i++)
        if (!strchr(o->metadata.v[i], '='))
            return usage_error("--metadata: '%s' is not KEY=VALUE", o->metadata.v[i]);

    /* the server */
    char base[1200], prefix[1024];
    if (o->base_url)
        snprintf(base, sizeof base, "%s", o->base_url);
    else if (strchr(o->host, ':') && o->host[0] != '[')
        snprintf(base, sizeof base, "http://[%s]:%d", o->host, o->port);
    else
        snprintf(base, sizeof base, "http://%s:%d", o->host, o->port);
    if (!parse_base_url(base, b.host, sizeof b.host, &b.port, prefix, sizeof prefix))
        return usage_error("'%s' is not an http://HOST:PORT address", base);
    snprintf(b.path, sizeof b.path, "%s%s", prefix, o->endpoint);
    signal(SIGPIPE, SIG_IGN);
    /* a connection per request in flight: allow as many descriptors as the system lets us */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    uv_loop_t loop;
    uv_loop_init(&loop);
    b.loop = &loop;
    uv_timer_init(&loop, &b.arrival_timer);
    uv_timer_init(&loop, &b.progress_timer);
    b.arrival_timer.data = b.progress_timer.data = &b;
    uv_signal_init(&loop, &b.sigint);
    b.sigint.data = &b;
    uv_unref((uv_handle_t *)&b.sigint);
    httpc_pool_opts po;
    httpc_pool_opts_init(&po);
    po.max_idle = (unsigned)(o->max_concurrency > 0 ? o->max_concurrency : o->num_prompts);
    if (po.max_idle > 4096) po.max_idle = 4096;
    char pool_err[512] = "";
    if (httpc_pool_create(&loop, b.host, b.port, &po, &b.pool) != DUET_OK) {
        b.pool = NULL;
        snprintf(pool_err, sizeof pool_err, "cannot resolve the host '%s'", b.host);
        fprintf(stderr, "duet-bench: %s: every request will fail\n", pool_err);
    }

    /* the model: named, or the server's first */
    if (o->model) {
        b.model_id = strdup(o->model);
    } else {
        printf("Model not specified, fetching first model from server...\n");
        b.model_id = fetch_model(&b, prefix, err, sizeof err);
        if (b.model_id)
            printf("First model name: %s\n", b.model_id);
        else
            fprintf(stderr, "duet-bench: %s\n", err);
    }
    b.model_name = o->served_name ? o->served_name : b.model_id;

    /* the tokenizer: --tokenizer, else the model's folder when it has one */
    const char *tok_dir = o->tokenizer ? o->tokenizer : b.model_id;
    if (!o->skip_tokenizer && tok_dir && (o->tokenizer || is_file(tok_dir, "tokenizer.json"))) {
        if (tok_load(tok_dir, &b.tok) != DUET_OK) {
            fprintf(stderr, "duet-bench: cannot load the tokenizer in %s\n", tok_dir);
            return 1;
        }
        b.tokenizer_id = tok_dir;
    }
    int vocab = model_vocab(b.model_id);
    if (!vocab && o->tokenizer) vocab = model_vocab(o->tokenizer);

    /* the workload */
    bds_set set = {0};
    duet_status st;
    if (o->dataset == DATASET_RANDOM) {
        bds_random_opts ro = {.input_len = o->random_input_len,
                              .output_len = o->random_output_len,
                              .prefix_len = o->random_prefix_len,
                              .range_ratio = o->random_range_ratio,
                              .as_text = b.chat};
        st =
            bds_random(b.tok, vocab, &ro, o->num_prompts, (uint64_t)o->seed, &set, err, sizeof err);
        if (st && !b.tok)
            strncat(err, " (pass --tokenizer DIR, or --model as the checkpoint folder)",
                    sizeof err - strlen(err) - 1);
    } else if (o->dataset == DATASET_SHAREGPT) {
        st = bds_sharegpt(o->dataset_path, b.tok, o->sharegpt_output_len, o->num_prompts,
                          (uint64_t)o->seed, o->disable_shuffle, o->no_oversample, &set, err,
                          sizeof err);
    } else {
        chat_template *tpl = NULL;
        if (!b.chat && !o->skip_chat_template && b.tok && chat_load(tok_dir, &tpl) != DUET_OK) {
            fprintf(stderr, "duet-bench: no chat template in %s: prompts are sent as they are\n",
                    tok_dir);
            tpl = NULL;
        }
        st = bds_custom(o->dataset_path, b.tok, tpl, o->custom_output_len, o->num_prompts,
                        (uint64_t)o->seed, o->disable_shuffle, o->no_oversample, &set, err,
                        sizeof err);
        chat_destroy(tpl);
    }
    if (st != DUET_OK) {
        fprintf(stderr, "duet-bench: %s\n", err);
        return 1;
    }
    int n = set.n;
    double *arrival = calloc((size_t)(n > 0 ? n : 1), sizeof *arrival);
    bst_request *out = calloc((size_t)(n > 0 ? n : 1), sizeof *out);
    if (!arrival || !out ||
        bds_arrivals(n, o->request_rate, o->burstiness, (uint64_t)o->seed, arrival) != DUET_OK) {
        fprintf(stderr, "duet-bench: out of memory\n");
        return 1;
    }
    b.tty = isatty(2) && !o->disable_tqdm;
    if (!b.pool) {
        /* nothing can be sent: every request fails with the reason, the result is written */
        for (int i = 0; i < n; i++) {
            out[i].prompt_len = set.items[i].prompt_len;
            set_error(&out[i], "%s", pool_err);
        }
    }

    /* from here Ctrl-C ends the run and still reports it */
    uv_signal_start(&b.sigint, on_sigint, SIGINT);

    /* warm-up: the first prompt, not measured */
    if (o->num_warmups > 0 && b.pool) {
        printf("Warming up with %d requests...\n", o->num_warmups);
        fflush(stdout);
        bst_request *w = calloc((size_t)o->num_warmups, sizeof *w);
        bds_set first = {set.items, 1};
        phase ph;
        phase_run(&b, &ph, "warmup", &first, o->num_warmups, NULL, w);
        int wf = 0;
        for (int i = 0; i < o->num_warmups; i++) {
            wf += !w[i].success;
            bst_request_cleanup(&w[i]);
        }
        free(w);
        phase_cleanup(&ph);
        printf("Warmup run completed%s.\n", wf ? " (some warm-up requests failed)" : "");
    }

    char rate_s[32], burst_s[32];
    py_float(o->request_rate, rate_s, sizeof rate_s);
    py_float(o->burstiness, burst_s, sizeof burst_s);
    printf("Starting main benchmark run...\n");
    printf("Traffic request rate: %s\n", rate_s);
    printf("Burstiness factor: %s (%s)\n", burst_s,
           o->burstiness == 1.0 ? "Poisson process" : "Gamma distribution");
    if (o->max_concurrency > 0)
        printf("Maximum request concurrency: %d\n", o->max_concurrency);
    else
        printf("Maximum request concurrency: None\n");
    fflush(stdout);
    phase ph;
    memset(&ph, 0, sizeof ph);
    double duration = 0;
    if (b.pool && !b.interrupted) {
        phase_run(&b, &ph, "bench", &set, n, isinf(o->request_rate) ? NULL : arrival, out);
        duration = ns_to_s(ph.t_end - ph.t0);
    }
    uv_signal_stop(&b.sigint);

    /* outputs the server did not count: count their text, as vLLM does, when a tokenizer is here */
    int uncounted = 0;
    for (int i = 0; i < n; i++) {
        if (!out[i].success || out[i].output_tokens > 0) continue;
        uncounted++;
        int32_t *ids = NULL;
        size_t nid = 0;
        if (b.tok && out[i].text &&
            tok_encode(b.tok, out[i].text, out[i].text_len, false, &ids, &nid) == DUET_OK &&
            nid > 0)
            out[i].output_tokens = (int)nid;
        free(ids);
    }
    if (uncounted)
        fprintf(stderr,
                "duet-bench: %d answers carried no usage: their output tokens are counted from "
                "%s\n",
                uncounted, b.tok ? "their text" : "their chunks");

    bst_result res;
    if (bst_compute(out, n, duration, &cfg, &res) != DUET_OK) {
        fprintf(stderr, "duet-bench: out of memory\n");
        return 1;
    }
    if (res.failed) {
        printf("Failed requests during benchmark run detected (capping to 10):\n");
        for (int i = 0, k = 0; i < n && k < 10; i++)
            if (!out[i].success) printf("Error %d: %s\n", k++, out[i].error ? out[i].error : "");
    }
    bst_run_info info = {.max_concurrency = o->max_concurrency, .request_rate = o->request_rate};
    bst_print(stdout, &res, &cfg, &info);
    fflush(stdout);

    int rc = 0;
    if (o->save_result || o->append_result) {
        char date[32];
        time_t now = time(NULL);
        strftime(date, sizeof date, "%Y%m%d-%H%M%S", localtime(&now));
        static const char *const backends[] = {"openai", "vllm", "openai-chat"};
        const char *label = o->label ? o->label : backends[o->backend];
        cJSON *root = cJSON_CreateObject();
        cJSON_AddStringToObject(root, "date", date);
        cJSON_AddStringToObject(root, "endpoint_type", backends[o->backend]);
        cJSON_AddStringToObject(root, "backend", backends[o->backend]);
        if (o->label)
            cJSON_AddStringToObject(root, "label", o->label);
        else
            cJSON_AddNullToObject(root, "label");
        cJSON_AddStringToObject(root, "model_id", b.model_id ? b.model_id : "");
        if (b.tokenizer_id)
            cJSON_AddStringToObject(root, "tokenizer_id", b.tokenizer_id);
        else
            cJSON_AddNullToObject(root, "tokenizer_id");
        cJSON_AddNumberToObject(root, "num_prompts", o->num_prompts);
        for (int i = 0; i < o->metadata.n; i++) {
            char *kv = strdup(o->metadata.v[i]), *eq = strchr(kv, '=');
            *eq = '\0';
            cJSON_DeleteItemFromObjectCaseSensitive(root, kv);
            cJSON_AddStringToObject(root, kv, eq + 1);
            free(kv);
        }
        if (isinf(o->request_rate))
            cJSON_AddStringToObject(root, "request_rate", "inf");
        else
            cJSON_AddNumberToObject(root, "request_rate", o->request_rate);
        cJSON_AddNumberToObject(root, "burstiness", o->burstiness);
        if (o->max_concurrency > 0)
            cJSON_AddNumberToObject(root, "max_concurrency", o->max_concurrency);
        else
            cJSON_AddNullToObject(root, "max_concurrency");
        bst_json_add(root, out, n, &res, &cfg, o->save_detailed);

        char name[2048], path[4096];
        const char *base_model = b.model_id ? strrchr(b.model_id, '/') : NULL;
        base_model = base_model ? base_model + 1 : (b.model_id ? b.model_id : "");
        char conc[32] = "";
        if (o->max_concurrency > 0)
            snprintf(conc, sizeof conc, "-concurrency%d", o->max_concurrency);
        if (o->result_filename)
            snprintf(name, sizeof name, "%s", o->result_filename);
        else
            snprintf(name, sizeof name, "%s-%sqps%s-%s-%s.json", label, rate_s, conc, base_model,
                     date);
        if (o->result_dir) {
            if (mkdirs(o->result_dir)) {
                fprintf(stderr, "duet-bench: cannot create %s: %s\n", o->result_dir,
                        strerror(errno));
                rc = 1;
            }
            size_t dl = strlen(o->result_dir);
            snprintf(path, sizeof path, "%s%s%s", o->result_dir,
                     dl && o->result_dir[dl - 1] == '/' ? "" : "/", name);
        } else {
            snprintf(path, sizeof path, "%s", name);
        }
        char *text = cJSON_PrintUnformatted(root);
        FILE *f = rc ? NULL : fopen(path, o->append_result ? "a" : "w");
        if (f && text) {
            if (o->append_result && ftell(f) > 0) fputc('\n', f);
            fputs(text, f);
        }
        if (!f || !text || fclose(f)) {
            fprintf(stderr, "duet-bench: cannot write %s\n", path);
            rc = 1;
        } else {
            fprintf(stderr, "duet-bench: result written to %s\n", path);
        }
        cJSON_free(text);
        cJSON_Delete(root);
    }

    /* close everything the loop holds */
    httpc_pool_destroy(b.pool);
    uv_close((uv_handle_t *)&b.arrival_timer, NULL);
    uv_close((uv_handle_t *)&b.progress_timer, NULL);
    uv_close((uv_handle_t *)&b.sigint, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    phase_cleanup(&ph);
    bst_result_cleanup(&res);
    for (int i = 0; i < n; i++) bst_request_cleanup(&out[i]);
    free(out);
    free(arrival);
    bds_set_cleanup(&set);
    cJSON_Delete(b.extra_body);
    tok_destroy(b.tok);
    free(b.model_id);
    opt_parser_destroy(op);
    if (rc) return rc;
    if (b.interrupted) return 130;
    return o->fail_on_error && res.failed ? 1 : 0;
}
