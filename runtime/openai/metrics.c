/* Prometheus text rendering and histograms; see metrics.h. Bucket bounds are vLLM's, so
 * dashboards built for vLLM read these the same way. */
#include "openai/metrics.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "openai/api.h"

typedef struct met_histogram {
    double bounds[40];
    int n_bounds;
    uint64_t counts[41]; /* per bucket (not cumulative); last = above every bound */
    double sum;
    uint64_t count;
} met_histogram;

enum { FIN_STOP = 0, FIN_LENGTH, FIN_ABORT, FIN_ERROR, FIN_COUNT };
static const char *const k_fin[FIN_COUNT] = {"stop", "length", "abort", "error"};

struct met_registry {
    char label[512]; /* model_name="..." escaped */
    met_histogram hist[MET_HIST_COUNT];
    uint64_t finished[FIN_COUNT];
    uint64_t http[6]; /* by status / 100 */
};

static const double k_ttft[] = {0.001, 0.005, 0.01, 0.02,  0.04,  0.06,  0.08, 0.1,
                                0.25,  0.5,   0.75, 1.0,   2.5,   5.0,   7.5,  10.0,
                                20.0,  40.0,  80.0, 160.0, 640.0, 2560.0};
static const double k_itl[] = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,  0.3,  0.4, 0.5,
                               0.75, 1.0,   2.5,  5.0,   7.5, 10.0, 20.0, 40.0, 80.0};
static const double k_e2e[] = {0.3,  0.5,   0.8,   1.0,   1.5,   2.0,    2.5,
                               5.0,  10.0,  15.0,  20.0,  30.0,  40.0,   50.0,
                               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};

static void hist_set(met_histogram *h, const double *b, int n) {
    memcpy(h->bounds, b, (size_t)n * sizeof *b);
    h->n_bounds = n;
}

/* 1, 2, 5, 10, 20, 50, ... up to max (vLLM's build_1_2_5_buckets). */
static void hist_125(met_histogram *h, int max) {
    static const int m[3] = {1, 2, 5};
    int n = 0;
    for (double e = 1; n < 39; e *= 10) {
        int k;
        for (k = 0; k < 3 && n < 39; k++) {
            double v = m[k] * e;
            if (v > max) break;
            h->bounds[n++] = v;
        }
        if (k < 3) break;
    }
    h->n_bounds = n;
}

duet_status met_create(const char *model_name, int max_model_len, met_registry **reg_p) {
    met_registry *r = calloc(1, sizeof *r);
    if (!r) return DUET_ERR_NO_MEMORY;
    /* label value escaping: backslash, double quote and newline */
    size_t o = 0;
    o += (size_t)snprintf(r->label, sizeof r->label, "model_name=\"");
    for (const char *p = model_name; *p && o + 4 < sizeof r->label; p++) {
        if (*p == '\\' || *p == '"') r->label[o++] = '\\';
        if (*p == '\n') {
            r->label[o++] = '\\';
            r->label[o++] = 'n';
            continue;
        }
        r->label[o++] = *p;
    }
    r->label[o++] = '"';
    r->label[o] = '\0';
    hist_set(&r->hist[MET_HIST_TTFT], k_ttft, (int)(sizeof k_ttft / sizeof *k_ttft));
    hist_set(&r->hist[MET_HIST_ITL], k_itl, (int)(sizeof k_itl / sizeof *k_itl));
    hist_set(&r->hist[MET_HIST_E2E], k_e2e, (int)(sizeof k_e2e / sizeof *k_e2e));
    hist_125(&r->hist[MET_HIST_PROMPT_TOKENS], max_model_len);
    hist_125(&r->hist[MET_HIST_GENERATION_TOKENS], max_model_len);
    *reg_p = r;
    return DUET_OK;
}

void met_destroy(met_registry *reg) {
    free(reg);
}

void met_observe(met_registry *reg, met_hist which, double v) {
    if (!reg || which < 0 || which >= MET_HIST_COUNT) return;
    met_histogram *h = &reg->hist[which];
    int i = 0;
    while (i < h->n_bounds && v > h->bounds[i]) i++;
    h->counts[i]++;
    h->sum += v;
    h->count++;
}

void met_count_finish(met_registry *reg, const char *reason) {
    if (!reg || !reason) return;
    for (int i = 0; i < FIN_COUNT; i++)
        if (!strcmp(reason, k_fin[i])) reg->finished[i]++;
}

void met_count_http(met_registry *reg, int status) {
    if (reg && status >= 100 && status < 600) reg->http[status / 100]++;
}

static void out(strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void out(strbuf *b, const char *fmt, ...) {
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n > 0) strbuf_add(b, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

/* The shortest text that reads back as v ("0.005", not "0.0050000000000000001"); whole
 * numbers as "100.0", the way Python's prometheus_client (and so vLLM) writes them. */
static const char *num(char *buf, size_t cap, double v) {
    if (v == (double)(long long)v && v > -1e15 && v < 1e15) {
        snprintf(buf, cap, "%.1f", v);
        return buf;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, cap, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) break;
    }
    return buf;
}

static void head(strbuf *b, const char *name, const char *type, const char *help) {
    out(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void gauge(strbuf *b, const met_registry *r, const char *name, const char *help, double v) {
    char n[32];
    head(b, name, "gauge", help);
    out(b, "%s{%s} %s\n", name, r->label, num(n, sizeof n, v));
}

static void counter(strbuf *b, const met_registry *r, const char *name, const char *help,
                    uint64_t v) {
    head(b, name, "counter", help);
    out(b, "%s{%s} %llu\n", name, r->label, (unsigned long long)v);
}

static void histogram(strbuf *b, const met_registry *r, const char *name, const char *help,
                      const met_histogram *h) {
    char n[32];
    head(b, name, "histogram", help);
    uint64_t cum = 0;
    for (int i = 0; i < h->n_bounds; i++) {
        cum += h->counts[i];
        out(b, "%s_bucket{%s,le=\"%s\"} %llu\n", name, r->label, num(n, sizeof n, h->bounds[i]),
            (unsigned long long)cum);
    }
    cum += h->counts[h->n_bounds];
    out(b, "%s_bucket{%s,le=\"+Inf\"} %llu\n", name, r->label, (unsigned long long)cum);
    out(b, "%s_sum{%s} %s\n", name, r->label, num(n, sizeof n, h->sum));
    out(b, "%s_count{%s} %llu\n", name, r->label, (unsigned long long)h->count);
}

duet_status met_render(const met_registry *r, const met_gauges *g, char **text_p, size_t *len_p) {
    strbuf b = {0};
    gauge(&b, r, "vllm:num_requests_running", "Number of requests in model execution batches.",
          g->num_requests_running);
    gauge(&b, r, "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
          g->num_requests_waiting);
    gauge(&b, r, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
          g->kv_cache_usage);
    counter(&b, r, "vllm:prompt_tokens_total", "Number of prefill tokens processed.",
            g->prompt_tokens);
    counter(&b, r, "vllm:generation_tokens_total", "Number of generation tokens processed.",
            g->generation_tokens);
    head(&b, "vllm:request_success_total", "counter", "Count of successfully processed requests.");
    for (int i = 0; i < FIN_COUNT; i++)
        out(&b, "vllm:request_success_total{%s,finished_reason=\"%s\"} %llu\n", r->label, k_fin[i],
            (unsigned long long)r->finished[i]);
    counter(&b, r, "vllm:num_preemptions_total",
            "Cumulative number of preemptions from the engine.", g->num_preemptions);
    counter(&b, r, "vllm:prefix_cache_queries_total",
            "Prefix cache queries, in terms of number of queried tokens.", g->prefix_cache_queries);
    counter(&b, r, "vllm:prefix_cache_hits_total",
            "Prefix cache hits, in terms of number of cached tokens.", g->prefix_cache_hits);
    if (g->spec_k > 0) {
        counter(&b, r, "vllm:spec_decode_num_drafts_total", "Number of spec decoding drafts.",
                g->spec_num_drafts);
        counter(&b, r, "vllm:spec_decode_num_draft_tokens_total", "Number of draft tokens.",
                g->spec_num_draft_tokens);
        counter(&b, r, "vllm:spec_decode_num_accepted_tokens_total", "Number of accepted tokens.",
                g->spec_num_accepted_tokens);
        head(&b, "vllm:spec_decode_num_accepted_tokens_per_pos_total", "counter",
             "Accepted tokens per draft position.");
        for (int i = 0; i < g->spec_k && i < 8; i++)
            out(&b, "vllm:spec_decode_num_accepted_tokens_per_pos_total{%s,position=\"%d\"} %llu\n",
                r->label, i, (unsigned long long)g->spec_accepted_per_pos[i]);
    }
    static const char *const names[MET_HIST_COUNT][2] = {
        {"vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds."},
        {"vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds."},
        {"vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds."},
        {"vllm:request_prompt_tokens", "Number of prefill tokens processed."},
        {"vllm:request_generation_tokens", "Number of generation tokens processed."},
    };
    for (int i = 0; i < MET_HIST_COUNT; i++)
        histogram(&b, r, names[i][0], names[i][1], &r->hist[i]);
    head(&b, "duet_http_responses_total", "counter", "HTTP responses by status class.");
    for (int i = 1; i < 6; i++)
        out(&b, "duet_http_responses_total{%s,code=\"%dxx\"} %llu\n", r->label, i,
            (unsigned long long)r->http[i]);
    head(&b, "duet_http_connections_open", "gauge", "Open HTTP connections.");
    out(&b, "duet_http_connections_open{%s} %llu\n", r->label,
        (unsigned long long)g->http_connections_open);
    if (b.oom) {
        strbuf_free(&b);
        return DUET_ERR_NO_MEMORY;
    }
    *text_p = b.p;
    *len_p = b.len;
    return DUET_OK;
}
