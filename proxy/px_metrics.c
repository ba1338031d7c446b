/* Histogram buckets and text-format writers for the proxy's /metrics; see px_metrics.h. */
#include "px_metrics.h"

#include <string.h>

/* Seconds: a prefill leg of a short prompt is milliseconds; a long stream, minutes. */
static const double g_bounds[PX_HIST_BUCKETS] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                 0.5,   1,      2.5,   5,    10,    30,   120};

static const char *const g_routes[PX_ROUTE_COUNT] = {
    "completions", "chat_completions", "models",        "tokenize",         "detokenize",
    "health",      "metrics",          "instances_add", "instances_remove", "other"};

static const char *const g_errors[PX_ERROR_COUNT] = {
    "bad_request", "auth",     "not_found", "no_backend",  "prefill",
    "decode",      "upstream", "midstream", "client_gone", "backend_4xx"};

static const char *const g_legs[PX_LEG_COUNT] = {"prefill", "decode", "other"};

const char *px_route_name(px_route r) {
    return (unsigned)r < PX_ROUTE_COUNT ? g_routes[r] : "other";
}

const char *px_error_kind_name(px_error_kind k) {
    return (unsigned)k < PX_ERROR_COUNT ? g_errors[k] : "other";
}

const char *px_leg_name(px_leg l) {
    return (unsigned)l < PX_LEG_COUNT ? g_legs[l] : "other";
}

void px_hist_observe(px_hist *h, double seconds) {
    size_t i = 0;
    while (i < PX_HIST_BUCKETS && seconds > g_bounds[i]) i++;
    h->counts[i]++;
    h->sum += seconds;
    h->count++;
}

void px_metrics_family(strbuf *b, const char *name, const char *type, const char *help) {
    strbuf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void px_metrics_hist(strbuf *b, const char *name, const char *labels, const px_hist *h) {
    const char *sep = labels && *labels ? "," : "";
    if (!labels) labels = "";
    uint64_t cum = 0;
    for (size_t i = 0; i < PX_HIST_BUCKETS; i++) {
        cum += h->counts[i];
        strbuf_printf(b, "%s_bucket{%s%sle=\"%g\"} %llu\n", name, labels, sep, g_bounds[i],
                      (unsigned long long)cum);
    }
    cum += h->counts[PX_HIST_BUCKETS];
    strbuf_printf(b, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, sep,
                  (unsigned long long)cum);
    if (*labels) {
        strbuf_printf(b, "%s_sum{%s} %.9g\n%s_count{%s} %llu\n", name, labels, h->sum, name, labels,
                      (unsigned long long)h->count);
    } else {
        strbuf_printf(b, "%s_sum %.9g\n%s_count %llu\n", name, h->sum, name,
                      (unsigned long long)h->count);
    }
}

void px_metrics_label_value(strbuf *b, const char *v) {
    for (; *v; v++) {
        if (*v == '\\')
            strbuf_str(b, "\\\\");
        else if (*v == '"')
            strbuf_str(b, "\\\"");
        else if (*v == '\n')
            strbuf_str(b, "\\n");
        else
            strbuf_add(b, v, 1);
    }
}
