/* duet-proxy-bench: a closed-loop HTTP load generator for OpenAI completion endpoints (the proxy,
 * nginx, or a worker directly), on libuv and duet's HTTP client. C connections each send their
 * next request when the last one ends; it reports the rate, latency and time-to-first-byte
 * percentiles, and counts as errors any non-200, transport failure, SSE error event or stream
 * without [DONE]. --pd does the two legs of disaggregated serving itself (prefill with
 * max_tokens 1, then decode with its kv_transfer_params): the baseline a proxy is measured on. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "net/httpc.h"
#include "base/log.h"
#include "base/opt.h"
#include "px_body.h"
#include "base/strbuf.h"

typedef struct bench_opts {
    char host[256];
    int port;
    char path[256];
    unsigned requests, concurrency;
    double duration_s; /* 0: until `requests` are done */
    bool stream, chat, pd, json, fail_on_error;
    unsigned max_tokens, prompt_bytes;
    const char *api_key;
} bench_opts;

typedef struct bench bench;

typedef struct slot {
    bench *b;
    unsigned id;
    httpc_req *req;
    uint64_t t0, t_first;
    int status;
    bool prefill_leg;
    strbuf body;
    char rid[48];
} slot;

struct bench {
    uv_loop_t *loop;
    bench_opts o;
    httpc_pool *pool;
    char *body, *prefill_body;
    size_t body_len, prefill_len;
    px_gen gen; /* for --pd's decode bodies */
    slot *slots;
    unsigned started, done, ok, errors, active;
    unsigned err_status, err_transport, err_stream;
    double *lat, *ttfb;
    uint64_t t_start, t_end, deadline;
    char first_error[256];
};

static void slot_next(slot *s);

static void note_error(bench *b, const char *fmt, const char *what) {
    if (!b->first_error[0]) snprintf(b->first_error, sizeof b->first_error, fmt, what);
}

static void on_head(httpc_req *req, const httpc_response *resp, void *arg) {
    slot *s = arg;
    (void)req;
    s->status = resp->status;
}

static void on_body(httpc_req *req, const char *data, size_t len, void *arg) {
    slot *s = arg;
    (void)req;
    if (!s->t_first) s->t_first = uv_hrtime();
    strbuf_add(&s->body, data, len);
}

static bool send_leg(slot *s, const char *body, size_t len);

/* --pd: the prefill answer's kv_transfer_params into the decode leg. */
static bool start_decode_leg(slot *s) {
    bench *b = s->b;
    cJSON *kv = NULL;
    if (px_prefill_kv_params(s->body.p ? s->body.p : "", s->body.len, &kv)) return false;
    size_t len = 0;
    char *body = px_gen_decode_body(&b->gen, kv, &len);
    cJSON_Delete(kv);
    if (!body) return false;
    s->prefill_leg = false;
    strbuf_free(&s->body);
    bool ok = send_leg(s, body, len);
    cJSON_free(body);
    return ok;
}

static void on_end(httpc_req *req, duet_status st, void *arg) {
    slot *s = arg;
    bench *b = s->b;
    (void)req;
    s->req = NULL;
    if (st == DUET_OK && s->status == 200 && s->prefill_leg) {
        if (start_decode_leg(s)) return;
        st = DUET_ERR_FORMAT;
    }
    uint64_t now = uv_hrtime();
    bool good = st == DUET_OK && s->status == 200;
    if (st) {
        b->err_transport++;
        note_error(b, "transport: %s", duet_strerror(st));
    } else if (s->status != 200) {
        b->err_status++;
        char what[64];
        snprintf(what, sizeof what, "%d", s->status);
        note_error(b, "HTTP %s", what);
    } else if (b->o.stream) {
        const char *p = s->body.p ? s->body.p : "";
        if (strstr(p, "data: {\"error\"") || !strstr(p, "data: [DONE]")) {
            good = false;
            b->err_stream++;
            note_error(b, "stream: %.200s", p + (s->body.len > 200 ? s->body.len - 200 : 0));
        }
    } else if (!s->body.len) {
        good = false;
        b->err_stream++;
        note_error(b, "%s", "empty 200 body");
    }
    if (good) {
        b->lat[b->ok] = (double)(now - s->t0) / 1e6;
        b->ttfb[b->ok] = (double)((s->t_first ? s->t_first : now) - s->t0) / 1e6;
        b->ok++;
    } else {
        b->errors++;
    }
    b->done++;
    b->active--;
    b->t_end = now;
    slot_next(s);
}

static bool send_leg(slot *s, const char *body, size_t len) {
    bench *b = s->b;
    char auth[300];
    http_header hs[4] = {{"Content-Type", "application/json"}, {"X-Request-Id", s->rid}};
    size_t nh = 2;
    if (b->o.api_key) {
        snprintf(auth, sizeof auth, "Bearer %s", b->o.api_key);
        hs[nh++] = (http_header){"Authorization", auth};
    }
    hs[nh] = (http_header){NULL, NULL};
    httpc_request rq = {.method = "POST",
                        .path = b->o.path,
                        .headers = hs,
                        .body = body,
                        .body_len = len,
                        .first_byte_timeout_ms = 120000,
                        .idle_timeout_ms = 120000};
    static const httpc_callbacks cb = {on_head, on_body, on_end};
    s->status = 0;
    return httpc_send(b->pool, &rq, &cb, s, &s->req) == DUET_OK;
}

static void slot_next(slot *s) {
    bench *b = s->b;
    bool more = b->o.duration_s > 0 ? uv_hrtime() < b->deadline : b->started < b->o.requests;
    if (!more || b->started >= b->o.requests) {
        if (b->active == 0 && b->pool) { /* the last one: idle connections would keep the loop */
            httpc_pool_destroy(b->pool);
            b->pool = NULL;
        }
        return;
    }
    b->started++;
    b->active++;
    strbuf_free(&s->body);
    s->t0 = uv_hrtime();
    s->t_first = 0;
    snprintf(s->rid, sizeof s->rid, "bench-%u-%u", s->id, b->started);
    s->prefill_leg = b->o.pd;
    bool ok =
        b->o.pd ? send_leg(s, b->prefill_body, b->prefill_len) : send_leg(s, b->body, b->body_len);
    if (!ok) {
        b->errors++;
        b->err_transport++;
        b->done++;
        b->active--;
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(const double *v, unsigned n, double p) {
    if (!n) return 0;
    size_t i = (size_t)(p / 100.0 * (n - 1) + 0.5);
    return v[i < n ? i : n - 1];
}

/* --url http://HOST:PORT[/PATH] into bench_opts. */
static duet_status parse_url(const opt_spec *s, const char *url, char *err, size_t len) {
    bench_opts *o = s->dest;
    const char *hp = strncmp(url, "http://", 7) ? NULL : url + 7;
    const char *slash = hp ? strchr(hp, '/') : NULL;
    size_t hl = !hp ? 0 : slash ? (size_t)(slash - hp) : strlen(hp);
    const char *colon = hp ? memrchr(hp, ':', hl) : NULL;
    char *end = NULL;
    long port = colon ? strtol(colon + 1, &end, 10) : 0;
    if (!colon || colon == hp || (size_t)(colon - hp) >= sizeof o->host || end != hp + hl ||
        port < 1 || port > 65535 || (slash && strlen(slash) >= sizeof o->path)) {
        snprintf(err, len, "expected http://HOST:PORT/PATH, got '%s'", url);
        return DUET_ERR_INVALID;
    }
    snprintf(o->host, sizeof o->host, "%.*s", (int)(colon - hp), hp);
    o->port = (int)port;
    snprintf(o->path, sizeof o->path, "%s", slash ? slash : "/v1/completions");
    return DUET_OK;
}

static char *make_body(const bench_opts *o) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "model", "duet-stub");
    char *prompt = malloc(o->prompt_bytes + 1);
    for (unsigned i = 0; i < o->prompt_bytes; i++) prompt[i] = "abcdefgh "[i % 9];
    prompt[o->prompt_bytes] = '\0';
    if (o->chat) {
        cJSON *m = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "role", "user");
        cJSON_AddStringToObject(m, "content", prompt);
        cJSON_AddItemToArray(cJSON_AddArrayToObject(root, "messages"), m);
    } else {
        cJSON_AddStringToObject(root, "prompt", prompt);
    }
    free(prompt);
    cJSON_AddNumberToObject(root, "max_tokens", o->max_tokens);
    cJSON_AddBoolToObject(root, "stream", o->stream);
    char *s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return s;
}

int main(int argc, char **argv) {
    log_set_level(LOG_LEVEL_ERROR);
    bench b;
    memset(&b, 0, sizeof b);
    bench_opts *o = &b.o;
    int requests = 1000, concurrency = 50, max_tokens = 16, prompt_bytes = 64;
    const opt_spec specs[] = {
        {.name = "--url",
         .type = OPT_CUSTOM,
         .parse = parse_url,
         .dest = o,
         .metavar = "URL",
         .help = "http://HOST:PORT/v1/completions (or another completion route)"},
        {.name = "--requests",
         .type = OPT_INT,
         .dest = &requests,
         .def = "1000",
         .min = 1,
         .max = 1 << 30,
         .help = "requests in all (with --duration: its cap, unlimited if not given)"},
        {.name = "--concurrency",
         .type = OPT_INT,
         .dest = &concurrency,
         .def = "50",
         .min = 1,
         .max = 1 << 20,
         .help = "connections, each sending its next request when the last one ends"},
        {.name = "--duration",
         .type = OPT_DOUBLE,
         .dest = &o->duration_s,
         .min = 0,
         .max = 1e6,
         .metavar = "S",
         .help = "run for S seconds rather than a number of requests"},
        {.name = "--stream", .type = OPT_FLAG, .dest = &o->stream, .help = "streamed answers"},
        {.name = "--chat",
         .type = OPT_FLAG,
         .dest = &o->chat,
         .help = "chat messages rather than a prompt"},
        {.name = "--pd",
         .type = OPT_FLAG,
         .dest = &o->pd,
         .help = "do both legs of disaggregated serving (prefill, then decode with its "
                 "kv_transfer_params): the baseline for a proxy"},
        {.name = "--max-tokens",
         .type = OPT_INT,
         .dest = &max_tokens,
         .def = "16",
         .min = 1,
         .max = 1 << 24,
         .help = "max_tokens of each request"},
        {.name = "--prompt-bytes",
         .type = OPT_INT,
         .dest = &prompt_bytes,
         .def = "64",
         .min = 0,
         .max = 1 << 26,
         .help = "length of the prompt"},
        {.name = "--api-key",
         .type = OPT_STRING,
         .dest = &o->api_key,
         .metavar = "KEY",
         .help = "sent as Bearer"},
        {.name = "--json", .type = OPT_FLAG, .dest = &o->json, .help = "one JSON line of results"},
        {.name = "--fail-on-error",
         .type = OPT_FLAG,
         .dest = &o->fail_on_error,
         .help = "exit 1 if any request failed"},
    };
    opt_parser *op;
    if (opt_parser_create("duet-proxy-bench", "--url http://HOST:PORT/v1/completions [options]",
                          "A closed-loop load generator for OpenAI completion endpoints: reports "
                          "the rate and the latency and time-to-first-byte percentiles, and counts "
                          "non-200 answers, transport failures and broken streams as errors.",
                          &op) != DUET_OK)
        return 1;
    int prc = opt_add(op, "Load", specs, (int)(sizeof specs / sizeof specs[0])) == DUET_OK
                  ? opt_parse(op, argc, argv)
                  : 2;
    bool requests_given = prc == 0 && opt_given(op, "--requests");
    opt_parser_destroy(op);
    if (prc) return prc == 1 ? 0 : 2;
    if (!o->port) {
        fprintf(stderr, "duet-proxy-bench: --url is required (see --help)\n");
        return 2;
    }
    o->requests = (unsigned)requests;
    o->concurrency = (unsigned)concurrency;
    o->max_tokens = (unsigned)max_tokens;
    o->prompt_bytes = (unsigned)prompt_bytes;
    if (o->duration_s > 0 && !requests_given) o->requests = 100000000; /* the clock decides */

    uv_loop_t loop;
    uv_loop_init(&loop);
    b.loop = &loop;
    httpc_pool_opts po;
    httpc_pool_opts_init(&po);
    po.max_idle = o->concurrency;
    if (httpc_pool_create(&loop, o->host, o->port, &po, &b.pool)) return 1;
    b.body = make_body(o);
    b.body_len = strlen(b.body);
    if (o->pd) {
        char err[128];
        if (px_gen_parse(b.body, b.body_len, &b.gen, err, sizeof err)) return 1;
        b.prefill_body = px_gen_prefill_body(&b.gen, &b.prefill_len);
    }
    size_t cap = o->requests < 10000000 ? o->requests : 10000000;
    b.lat = calloc(cap, sizeof *b.lat);
    b.ttfb = calloc(cap, sizeof *b.ttfb);
    b.slots = calloc(o->concurrency, sizeof *b.slots);
    if (!b.lat || !b.ttfb || !b.slots) return 1;
    b.t_start = uv_hrtime();
    b.deadline = b.t_start + (uint64_t)(o->duration_s * 1e9);
    if (o->duration_s > 0 && o->requests > cap) o->requests = (unsigned)cap;
    for (unsigned i = 0; i < o->concurrency; i++) {
        b.slots[i].b = &b;
        b.slots[i].id = i;
        slot_next(&b.slots[i]);
    }
    uv_run(&loop, UV_RUN_DEFAULT); /* ends when every slot stopped and idle conns expire */
    double secs = (double)(b.t_end - b.t_start) / 1e9;
    qsort(b.lat, b.ok, sizeof *b.lat, cmp_double);
    qsort(b.ttfb, b.ok, sizeof *b.ttfb, cmp_double);
    double rate = secs > 0 ? b.ok / secs : 0;
    if (o->json) {
        printf("{\"requests\":%u,\"ok\":%u,\"errors\":%u,\"errors_status\":%u,"
               "\"errors_transport\":%u,\"errors_stream\":%u,\"seconds\":%.3f,\"rate\":%.1f,"
               "\"latency_ms\":{\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,\"max\":%.3f},"
               "\"ttfb_ms\":{\"p50\":%.3f,\"p99\":%.3f}}\n",
               b.done, b.ok, b.errors, b.err_status, b.err_transport, b.err_stream, secs, rate,
               pct(b.lat, b.ok, 50), pct(b.lat, b.ok, 90), pct(b.lat, b.ok, 99),
               b.ok ? b.lat[b.ok - 1] : 0, pct(b.ttfb, b.ok, 50), pct(b.ttfb, b.ok, 99));
    } else {
        printf("requests %u  ok %u  errors %u (status %u, transport %u, stream %u)\n", b.done, b.ok,
               b.errors, b.err_status, b.err_transport, b.err_stream);
        printf("time %.3f s  rate %.1f req/s\n", secs, rate);
        printf("latency ms  p50 %.3f  p90 %.3f  p99 %.3f  max %.3f\n", pct(b.lat, b.ok, 50),
               pct(b.lat, b.ok, 90), pct(b.lat, b.ok, 99), b.ok ? b.lat[b.ok - 1] : 0);
        printf("ttfb ms     p50 %.3f  p99 %.3f\n", pct(b.ttfb, b.ok, 50), pct(b.ttfb, b.ok, 99));
    }
    if (b.first_error[0]) fprintf(stderr, "first error: %s\n", b.first_error);
    httpc_pool_destroy(b.pool);
    uv_run(&loop, UV_RUN_DEFAULT);
    for (unsigned i = 0; i < o->concurrency; i++) strbuf_free(&b.slots[i].body);
    px_gen_cleanup(&b.gen);
    cJSON_free(b.body);
    cJSON_free(b.prefill_body);
    free(b.lat);
    free(b.ttfb);
    free(b.slots);
    uv_loop_close(&loop);
    return o->fail_on_error && b.errors ? 1 : 0;
}
