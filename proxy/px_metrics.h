/* The proxy's own Prometheus metrics: counters and latency histograms kept in plain structs on
 * the loop thread, and helpers writing them in the text exposition format (what promtool
 * checks). Which families exist and their labels is decided in px_proxy.c's renderer. */
#ifndef DUET_PX_METRICS_H
#define DUET_PX_METRICS_H

#include <stdint.h>

#include "base/strbuf.h"

typedef enum px_route {
    PX_ROUTE_COMPLETIONS = 0,
    PX_ROUTE_CHAT_COMPLETIONS,
    PX_ROUTE_MODELS,
    PX_ROUTE_TOKENIZE,
    PX_ROUTE_DETOKENIZE,
    PX_ROUTE_HEALTH,
    PX_ROUTE_METRICS,
    PX_ROUTE_INSTANCES_ADD,
    PX_ROUTE_INSTANCES_REMOVE,
    PX_ROUTE_OTHER,
    PX_ROUTE_COUNT,
} px_route;

/* Why a request did not end well. */
typedef enum px_error_kind {
    PX_ERROR_BAD_REQUEST = 0, /* invalid JSON or fields (400 from the proxy) */
    PX_ERROR_AUTH,            /* missing or wrong api key */
    PX_ERROR_NOT_FOUND,       /* unknown route */
    PX_ERROR_NO_BACKEND,      /* no healthy endpoint of a role */
    PX_ERROR_PREFILL,         /* prefill failed after its retries */
    PX_ERROR_DECODE,          /* decode failed before streaming, after its retries */
    PX_ERROR_UPSTREAM,        /* another forwarded request failed */
    PX_ERROR_MIDSTREAM,       /* decode failed after bytes reached the client */
    PX_ERROR_CLIENT_GONE,     /* the client left before the answer was complete */
    PX_ERROR_BACKEND_4XX,     /* a backend's 4xx passed through */
    PX_ERROR_COUNT,
} px_error_kind;

typedef enum px_leg { PX_LEG_PREFILL = 0, PX_LEG_DECODE, PX_LEG_OTHER, PX_LEG_COUNT } px_leg;

enum { PX_HIST_BUCKETS = 15, PX_STATUS_MAX = 600 };

typedef struct px_hist {
    uint64_t counts[PX_HIST_BUCKETS + 1]; /* per bucket (not cumulative); the last is +Inf */
    double sum;
    uint64_t count;
} px_hist;

typedef struct px_metrics {
    uint64_t requests[PX_ROUTE_COUNT][PX_STATUS_MAX];
    uint64_t errors[PX_ROUTE_COUNT][PX_ERROR_COUNT];
    px_hist duration[PX_ROUTE_COUNT];
    uint64_t retries[PX_LEG_COUNT];
} px_metrics;

const char *px_route_name(px_route r);
const char *px_error_kind_name(px_error_kind k);
const char *px_leg_name(px_leg l);

void px_hist_observe(px_hist *h, double seconds);

/* "# HELP name help\n# TYPE name type\n". */
void px_metrics_family(strbuf *b, const char *name, const char *type, const char *help);
/* The _bucket, _sum and _count lines of one histogram; labels like `leg="prefill"` or "". */
void px_metrics_hist(strbuf *b, const char *name, const char *labels, const px_hist *h);
/* A label value with \, " and newlines escaped. */
void px_metrics_label_value(strbuf *b, const char *v);

#endif
