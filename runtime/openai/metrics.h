/* Prometheus metrics of a server in vLLM's names (vllm:*, label model_name), rendered as text
 * exposition format 0.0.4: request counters and latency/size histograms kept here, engine and
 * HTTP gauges handed in at render time. In libduet_base (the proxy may use it).
 * Threads: one thread (the HTTP loop) updates and renders a registry. */
#ifndef DUET_METRICS_H
#define DUET_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

typedef struct met_registry met_registry;

typedef enum met_hist {
    MET_HIST_TTFT = 0,          /* vllm:time_to_first_token_seconds */
    MET_HIST_ITL,               /* vllm:inter_token_latency_seconds */
    MET_HIST_E2E,               /* vllm:e2e_request_latency_seconds */
    MET_HIST_PROMPT_TOKENS,     /* vllm:request_prompt_tokens */
    MET_HIST_GENERATION_TOKENS, /* vllm:request_generation_tokens */
    MET_HIST_COUNT,
} met_hist;

/* Values owned by others, read when /metrics is asked for. */
typedef struct met_gauges {
    int num_requests_running;
    int num_requests_waiting;
    double kv_cache_usage; /* 0..1 */
    uint64_t prompt_tokens, generation_tokens;
    uint64_t num_preemptions;
    uint64_t prefix_cache_queries, prefix_cache_hits; /* tokens */
    uint64_t http_connections_open;
    /* speculative decoding (vLLM's spec_decode counters), rendered when spec_k > 0: verify
     * steps with drafts, drafts verified, drafts accepted, accepted at positions 0..spec_k-1 */
    int spec_k;
    uint64_t spec_num_drafts, spec_num_draft_tokens, spec_num_accepted_tokens;
    uint64_t spec_accepted_per_pos[8];
} met_gauges;

/* max_model_len sizes the token-count histograms' 1-2-5 buckets. model_name is copied. */
duet_status met_create(const char *model_name, int max_model_len, met_registry **reg_p);
void met_destroy(met_registry *reg);

void met_observe(met_registry *reg, met_hist h, double value);
/* A finished request by its OpenAI finish reason: "stop", "length", "abort" or "error". */
void met_count_finish(met_registry *reg, const char *reason);
/* A response by status code (counted per class 2xx..5xx). */
void met_count_http(met_registry *reg, int status);

/* The exposition text in *text_p (heap, caller frees). */
duet_status met_render(const met_registry *reg, const met_gauges *g, char **text_p, size_t *len_p);

#endif
