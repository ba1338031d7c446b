/* duet-proxy's settings: defaults, the command line (duet's own flags and vllm-ascend's
 * --prefiller-hosts/--prefiller-ports style), a JSON file (--config), environment variables.
 * Parsing only; nothing here opens sockets. Not thread-safe (start-up). */
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
    size_t max_body_bytes;
    bool help;
    bool version;
} px_config;

void px_config_init(px_config *cfg);
void px_config_cleanup(px_config *cfg);

/* Applies argv (argv[0] is the program) over the defaults, a --config file first wherever it
 * appears, and DUET_API_KEY / DUET_UPSTREAM_API_KEY where the flags leave them unset; checks the
 * result. On DUET_ERR_INVALID err holds one line saying what is wrong. */
duet_status px_config_parse_args(px_config *cfg, int argc, char **argv, char *err, size_t errlen);

/* A JSON object with the flags' names as keys ("prefill": ["h:p", ...], "connect_timeout": 3). */
duet_status px_config_parse_json(px_config *cfg, const char *json, size_t len, char *err,
                                 size_t errlen);

/* "host:port", "[v6]:port". */
duet_status px_endpoint_parse(const char *s, px_endpoint *ep_p);
/* "host:port" with brackets for IPv6; out must hold PX_HOST_MAX + 8. */
void px_endpoint_format(const px_endpoint *ep, char *out, size_t cap);

/* The --help text. */
const char *px_config_usage(void);

#endif
