/* A worker's command line: duet's own flags and the `vllm serve` flags its users paste, in one
 * option table (base/opt.h). Each vLLM flag is implemented, mapped onto duet's own, accepted
 * with one log line saying it has no meaning here, or refused with one line naming it; the
 * table of all of them is docs/vllm-compat.md. Checks that need the MPI world (the DP rank
 * flags) are srv_config_check_instance's. Main thread, at start-up. */
#ifndef DUET_SRV_OPTIONS_H
#define DUET_SRV_OPTIONS_H

#include <stdbool.h>

#include "base/opt.h"
#include "engine/parallel.h"
#include "net/http.h"
#include "server/kv_plugin.h"
#include "server/oai.h"

enum { SRV_LIST_MAX = 32, SRV_CAPTURE_MAX = 64 };

/* A list of strings given as JSON (vLLM's '["a", "b"]') or as a single bare value. */
typedef struct srv_strings {
    char *v[SRV_LIST_MAX]; /* heap, freed by srv_config_cleanup */
    int n;
} srv_strings;

typedef struct srv_config {
    const char *model;
    const char *tokenizer;   /* default: model */
    const char *served_name; /* default: model */
    const char *host;
    const char *api_key;
    int port;
    int max_model_len; /* 0: min(max_position_embeddings, 8192) */
    int max_num_seqs;
    int max_num_batched_tokens;
    int max_waiting; /* engine requests beyond max_num_seqs before new ones get 503 */
    int block_size;
    long long kv_cache_memory; /* bytes; 0: default */
    int num_gpu_blocks_override;
    bool prefix_caching;
    oai_reasoning reasoning;
    double lease_timeout_s;
    double shutdown_timeout_s;
    long long max_request_body;
    int max_connections_per_client; /* 0: no limit */
    par_options po;

    /* Chat and tools */
    const char *chat_template;        /* --chat-template FILE|STRING, or NULL */
    bool trust_request_chat_template; /* a request's own chat_template is rendered */
    int tool_parser;                  /* an api_tool_format, or -1 (none) */
    bool auto_tool_choice;            /* --enable-auto-tool-choice */
    int max_logprobs;                 /* the most logprobs a request may ask */

    /* Logging */
    bool log_requests; /* one line per request received and finished */
    bool log_stats;    /* the periodic stats line (--disable-log-stats turns it off) */
    double log_stats_interval_s;
    bool seed_given; /* --seed: unseeded requests draw their seeds from it */

    /* HTTP */
    srv_strings cors_origins, cors_methods, cors_headers;
    bool cors_credentials;
    const char *ssl_keyfile, *ssl_certfile, *ssl_ca_certs;
    int ssl_cert_reqs; /* 0 none, 1 optional, 2 required (Python's ssl.CERT_*) */

    /* Memory: the fraction of device memory for weights, activations and KV cache (default
     * 0.9); the KV cache gets what loading leaves of it on devices that report their memory
     * (engine/parallel.h: par_kv_budget). */
    double gpu_memory_utilization;
    bool print_memory_plan; /* --print-memory-plan: the plan's table on stdout at start-up */

    /* --speculative-config: MTP's method ("mtp" or "deepseek_mtp") and drafts per step
     * (0..MDL_MAX_DRAFT); copied to po.spec_tokens, which loads the MTP module. */
    char spec_method[32];
    int spec_tokens;

    /* --compilation-config: the capture sizes the user asked for (the CUDA backend records
     * fixed sizes today; logged), cudagraph_mode NONE sets po.eager. */
    int capture_sizes[SRV_CAPTURE_MAX];
    int n_capture_sizes;

    /* --kv-transfer-config, checked against the program's role and mapped onto the plug-in's
     * flags (--kv-port, --kv-host) */
    bool kvt_given;
    char kvt_role[16];
    char kvt_connector[64];
    int kvt_port; /* 0: not given */
    char kvt_ip[256];

    /* vLLM's data parallel flags, checked against the MPI world once it exists */
    int pp;            /* --pipeline-parallel-size: folded into TP (see the .c) */
    int dp_rank;       /* --data-parallel-rank, -1 = not given */
    int dp_start_rank; /* --data-parallel-start-rank, -1 = not given */
    int dp_size_local; /* --data-parallel-size-local, 0 = not given */
} srv_config;

/* Parses argv for a worker of role (the plug-in's options are added beside the server's and
 * the instance's). Returns 0 to go on, 1 after --help (exit 0), 2 after one line on stderr
 * (exit 2). *p_p is the parser (destroy it after start-up: string options point into argv or
 * into it) even on failure. */
int srv_config_parse(srv_config *c, int argc, char **argv, srv_role role,
                     const srv_kv_plugin *plugin, opt_parser **p_p);
void srv_config_cleanup(srv_config *c);

/* After the MPI world exists: the vLLM DP rank flags against this rank's place. 0, or 2 after
 * one line on stderr. */
int srv_config_check_instance(const srv_config *c, const char *prog, int dp_rank, int dp_size);

/* This DP rank's HTTP port: --port + dp_rank, or --port itself for one process per DP rank
 * (--data-parallel-rank), or --port + (dp_rank - --data-parallel-start-rank). 0 stays 0. */
int srv_config_http_port(const srv_config *c, int dp_rank);

/* --speculative-config's JSON as the workers read it ({"method": "deepseek_mtp" or "mtp",
 * "num_speculative_tokens": 0..MDL_MAX_DRAFT}), for every program that takes the flag (the
 * workers, duet-check plan): *tokens_p the drafts a step (0: off) and method (method_len bytes,
 * may be NULL) the method, both set only on success; DUET_ERR_INVALID with one line in err
 * otherwise. Any thread. */
duet_status srv_config_parse_spec(const char *json, char *method, size_t method_len, int *tokens_p,
                                  char *err, size_t err_len);

/* The CORS settings for the HTTP server (pointers into c). */
void srv_config_cors(const srv_config *c, http_cors *cors);

#endif
