/* duet-proxy's settings: one option table (base/opt.h) read from the command line (duet's own
 * flags and vllm-ascend's --prefiller-hosts/--prefiller-ports style), a JSON file (--config, set
 * through the same table) and environment variables. Parsing only; nothing here opens sockets.
 * Not thread-safe (start-up). */
#ifndef DUET_PX_CONFIG_H
#define DUET_PX_CONFIG_H

#include <stdbool.h>
#include <stddef.h>

#include "px_policy.h"
#include "base/status.h"

enum { PX_HOST_MAX = 256 };

typedef struct px_endpoint {
    char host[PX_HOST_MAX]; /* without IPv6 brackets */
    int port;
} px_endpoint;

typedef struct px_config {
    char host[PX_HOST_MAX];
    int port;
    px_endpoint *prefill, *decode; /* owned */
    size_t n_prefill, n_decode;
    /* Balancer mode (--backend): plain instances that answer whole requests themselves (DP
     * ranks of one instance, or colocated instances); no prefill -> decode flow. */
    px_endpoint *backend; /* owned */
    size_t n_backend;
    char *api_key;          /* clients must send it (NULL: open); owned */
    char *upstream_api_key; /* sent to backends (NULL: none); owned */
    px_policy_kind policy;
    /* Milliseconds. */
    unsigned connect_timeout_ms;
    unsigned prefill_timeout_ms; /* request sent to prefill response's first byte */
    unsigned decode_timeout_ms;  /* request sent to decode response's first byte */
    unsigned idle_timeout_ms;    /* between two reads of an upstream response */
    unsigned client_header_timeout_ms;
    unsigned client_idle_timeout_ms;
    unsigned drain_timeout_ms;
    unsigned health_interval_ms;
    unsigned health_timeout_ms;
    unsigned retry_backoff_ms;     /* first retry's delay; doubles, with jitter */
    unsigned retry_backoff_max_ms; /* cap */
    unsigned eject_after;          /* consecutive failures that eject a backend */
    unsigned readmit_after;        /* consecutive good probes that bring it back */
    unsigned prefill_retries;      /* further attempts after the first */
    unsigned decode_retries;
    unsigned max_connections;
    unsigned max_connections_per_client; /* 0: no limit */
    size_t max_body_bytes;
    /* The prefill leg streamed and the decode leg started at the prefill's first event that
     * carries kv_transfer_params, while the prefill still computes (--early-decode on). */
    bool early_decode;
    bool version;
} px_config;

/* The option table's defaults. */
void px_config_init(px_config *cfg);
void px_config_cleanup(px_config *cfg);

/* Applies argv (argv[0] is the program) to cfg fresh from px_config_init: a --config file first
 * wherever it appears, then the flags, then DUET_API_KEY / DUET_UPSTREAM_API_KEY where neither set
 * the keys; checks the result (unless --version). Returns 0 to go on, 1 after --help was printed on
 * stdout (exit 0), 2 after one line "duet-proxy: what is wrong" on stderr (exit 2). A list given
 * both in the file and as a flag gets both's entries. */
int px_config_parse_args(px_config *cfg, int argc, char **argv);

/* Applies a JSON object whose keys are the flags' names, dashes or underscores ("prefill":
 * ["h:p", ...], "connect_timeout": 3), over what cfg holds. Values: strings, numbers, booleans,
 * or lists of strings and numbers. On DUET_ERR_INVALID err holds one line. */
duet_status px_config_parse_json(px_config *cfg, const char *json, size_t len, char *err,
                                 size_t errlen);

/* "host:port", "[v6]:port". */
duet_status px_endpoint_parse(const char *s, px_endpoint *ep_p);
/* "host:port" with brackets for IPv6; out must hold PX_HOST_MAX + 8. */
void px_endpoint_format(const px_endpoint *ep, char *out, size_t cap);

#endif
