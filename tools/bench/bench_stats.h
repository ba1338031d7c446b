/* duet-bench's numbers: per-request outcomes in, the metrics `vllm bench serve` reports out
 * (TTFT, TPOT, ITL, E2EL with mean/median/std/percentiles; request, output and total token
 * throughput; goodput; peak output rate and concurrency), the table it prints and its result
 * JSON keys. No I/O of its own beyond the FILE it is given; one thread. */
#ifndef DUET_BENCH_STATS_H
#define DUET_BENCH_STATS_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "base/status.h"

/* One request as the client saw it. Times in seconds. */
typedef struct bst_request {
    bool success;
    char *error;       /* heap, why it failed ("" or NULL when it did not) */
    int prompt_len;    /* the server's usage.prompt_tokens, else the dataset's count */
    int output_tokens; /* the server's usage.completion_tokens; 0: not reported */
    double ttft;       /* request sent → first chunk with a choice */
    double latency;    /* request sent → last chunk with a choice (E2EL) */
    double start_time; /* when it was sent, from the benchmark's start */
    double queue_time; /* arrival → sent: waiting for a --max-concurrency slot */
    double *itl;       /* [n_itl] gaps between consecutive chunks with a choice */
    int n_itl, cap_itl;
    int n_chunks; /* chunks with a choice: the output count when there is no usage */
    char *text;   /* generated text (heap, NUL-terminated) or NULL */
    size_t text_len, text_cap;
} bst_request;

void bst_request_cleanup(bst_request *r);
/* Appends to r->itl / r->text; false when out of memory. */
bool bst_request_add_itl(bst_request *r, double gap);
bool bst_request_add_text(bst_request *r, const char *s, size_t n);

/* The metrics that have a mean/median/std/percentiles block, in the order they print. */
typedef enum bst_metric {
    BST_METRIC_TTFT,
    BST_METRIC_TPOT,
    BST_METRIC_ITL,
    BST_METRIC_E2EL,
    BST_METRIC_QUEUE, /* "client_queue_time" */
    BST_METRIC_COUNT,
} bst_metric;

enum { BST_MAX_PERCENTILES = 16 };

typedef struct bst_config {
    unsigned metrics; /* 1u << bst_metric for each block to report */
    double percentiles[BST_MAX_PERCENTILES];
    int n_percentiles;
    /* --goodput: a request is good when every given bound holds (milliseconds). */
    bool goodput;
    bool slo_set[3]; /* ttft, tpot, e2el */
    double slo_ms[3];
} bst_config;

typedef struct bst_summary {
    double mean, median, std; /* milliseconds */
    double pct[BST_MAX_PERCENTILES];
} bst_summary;

typedef struct bst_result {
    int completed, failed;
    long long total_input, total_output;
    double duration;
    double request_throughput, request_goodput, output_throughput, total_token_throughput;
    bst_summary s[BST_METRIC_COUNT];
    double max_output_tokens_per_s;
    int max_concurrent_requests;
    int *output_lens; /* [n requests]: the counted output of each success, 0 for a failure */
    int n;
} bst_result;

/* What the printed header and the JSON say about the run itself. */
typedef struct bst_run_info {
    int max_concurrency; /* 0: none */
    double request_rate; /* INFINITY: all at once */
} bst_run_info;

/* "ttft,tpot,itl" → cfg->metrics. DUET_ERR_INVALID naming the unknown name in err. */
duet_status bst_parse_metrics(const char *list, bst_config *cfg, char *err, size_t err_len);
/* "25,50,99.9" → cfg->percentiles (each in [0, 100]). */
duet_status bst_parse_percentiles(const char *list, bst_config *cfg, char *err, size_t err_len);
/* One "KEY:VALUE" of --goodput (ttft, tpot or e2el; milliseconds, not negative). */
duet_status bst_parse_goodput(const char *pair, bst_config *cfg, char *err, size_t err_len);

/* The value at percentile p (0..100) of n sorted values, interpolated linearly between the two
 * nearest ranks (numpy.percentile's default). 0 for n = 0. */
double bst_percentile(const double *sorted, int n, double p);

/* Mean, median, population standard deviation and cfg's percentiles of v[n] (seconds) in
 * milliseconds; all 0 when n is 0. v is left as it was. */
duet_status bst_summarize(const double *v, int n, const bst_config *cfg, bst_summary *out);

/* The metrics of n requests over duration seconds. Counted over successful requests only:
 * output tokens come from each request's output_tokens (its chunk count when the server sent no
 * usage); TPOT = (latency - ttft) / (output tokens - 1) for requests with more than one token.
 * out->output_lens is heap (bst_result_cleanup). */
duet_status bst_compute(const bst_request *r, int n, double duration, const bst_config *cfg,
                        bst_result *out);
void bst_result_cleanup(bst_result *res);

/* The "Serving Benchmark Result" table, as vLLM prints it. */
void bst_print(FILE *f, const bst_result *res, const bst_config *cfg, const bst_run_info *info);

/* vLLM's result keys for res (duration, completed, failed, total_*_tokens, *_throughput,
 * request_goodput, max_output_tokens_per_s, max_concurrent_requests, latencies, queue_times,
 * errors, and mean_/median_/std_/pNN_<metric>_ms for each reported metric) added to root;
 * detailed adds input_lens, output_lens, start_times, ttfts, itls and generated_texts. */
void bst_json_add(cJSON *root, const bst_request *r, int n, const bst_result *res,
                  const bst_config *cfg, bool detailed);

/* The metric's key part ("ttft", "client_queue_time"). */
const char *bst_metric_key(bst_metric m);
/* "99" for 99, "99.9" for 99.9: how a percentile is written in keys and labels. */
void bst_percentile_word(double p, char *buf, size_t len);

#endif
