/* HTTP/1.1 client on libuv for talking to backends (the proxy's upstream legs, health probes,
 * load generators): one pool of keep-alive connections per host:port, a request with a body,
 * the response streamed to callbacks (chunked coding removed), timeouts and cancellation.
 * No TLS, no redirects, no pipelining. Threads: call everything on the loop's thread. */
#ifndef DUET_HTTPC_H
#define DUET_HTTPC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "net/http.h"
#include "base/status.h"

typedef struct httpc_pool httpc_pool;
typedef struct httpc_req httpc_req;

typedef struct httpc_pool_opts {
    /* TCP connect, 0 = none. Default 5 s. */
    unsigned connect_timeout_ms;
    /* An idle pooled connection is closed after this long. Default 30 s, 0 = never. */
    unsigned keepalive_ms;
    /* Idle connections kept for reuse; more are closed. Default 256. */
    unsigned max_idle;
    /* Status line plus headers of a response; beyond it the request fails (DUET_ERR_PEER).
     * Default 64 KiB, at most 80 KiB (libhttp-parser's bound). */
    size_t max_header_bytes;
} httpc_pool_opts;

/* What to send. Every pointer need only live for the httpc_send call: the bytes are copied. */
typedef struct httpc_request {
    const char *method; /* "GET", "POST", ... */
    const char *path;   /* with the query, already %-encoded: "/v1/completions" */
    /* Further headers, ended by an entry with name NULL (or NULL for none). Host,
     * Content-Length, Transfer-Encoding and Connection are this layer's. */
    const http_header *headers;
    const void *body; /* Content-Length is sent when body_len > 0 or the method is POST/PUT */
    size_t body_len;
    /* From the request written to the first response byte (a prefill of a long prompt lives
     * here), 0 = none. */
    unsigned first_byte_timeout_ms;
    /* Between two reads once the response has begun (a stalled stream), 0 = none. */
    unsigned idle_timeout_ms;
} httpc_request;

/* The response head; valid during the on_head call only. */
typedef struct httpc_response {
    int status;
    int version_minor;
    const http_header *headers; /* in arrival order, duplicates kept */
    size_t num_headers;
} httpc_response;

/* Called from the loop, never from inside httpc_send. Any callback may call httpc_cancel on its
 * own request (then nothing more is called) and httpc_send for new ones. */
typedef struct httpc_callbacks {
    /* The response head (1xx interim responses are skipped). Optional. */
    void (*on_head)(httpc_req *req, const httpc_response *resp, void *arg);
    /* A piece of the body as it arrives, chunked coding removed. Optional. */
    void (*on_body)(httpc_req *req, const char *data, size_t len, void *arg);
    /* Required; exactly once unless canceled. DUET_OK: the response is complete. Otherwise
     * DUET_ERR_PEER (refused, reset, closed early, malformed response), DUET_ERR_TIMEOUT or
     * DUET_ERR_NO_MEMORY. req is freed after the call returns. */
    void (*on_end)(httpc_req *req, duet_status st, void *arg);
} httpc_callbacks;

typedef struct httpc_pool_stats {
    uint64_t connects;      /* TCP connections opened */
    uint64_t reuses;        /* requests sent on an idle pooled connection */
    uint64_t stale_retries; /* requests re-sent after a pooled connection turned out closed */
    unsigned idle;          /* pooled connections now */
    unsigned active;        /* requests in flight now */
} httpc_pool_stats;

void httpc_pool_opts_init(httpc_pool_opts *opts);

/* host: IPv4/IPv6 literal (brackets allowed) or a name, resolved here once (blocking). opts may
 * be NULL for the defaults. DUET_ERR_NOT_FOUND when the name does not resolve. */
duet_status httpc_pool_create(uv_loop_t *loop, const char *host, int port,
                              const httpc_pool_opts *opts, httpc_pool **pool_p);

/* Closes the idle connections; requests in flight go on to their end (cancel them to stop them),
 * then their connections close. Memory is freed from close callbacks: keep running the loop.
 * Accepts NULL. pool is invalid after this call (httpc_send on it is not allowed). */
void httpc_pool_destroy(httpc_pool *pool);

void httpc_pool_get_stats(const httpc_pool *pool, httpc_pool_stats *stats_p);

/* A pool made from a host name looks the name up again, without blocking the loop; new
 * connections go to the address found (idle ones to the old one are closed). For backends
 * whose address changes when they restart (Kubernetes pods): call it when they fail. No-op
 * for an address, or while a lookup is already running. */
void httpc_pool_refresh(httpc_pool *pool);

/* Starts a request: reuses an idle connection or opens one. On an error return (invalid
 * request, no memory) nothing was started and no callback will be called. A request sent on a
 * reused connection that the server had already closed (no response byte received) is sent
 * once more on a fresh connection. *req_p (may be NULL) is valid until on_end returns or
 * httpc_cancel. */
duet_status httpc_send(httpc_pool *pool, const httpc_request *rq, const httpc_callbacks *cb,
                       void *arg, httpc_req **req_p);

/* Abandons req: its connection is closed (the server sees the client go away) and no callback
 * is called any more. Safe inside req's own callbacks except on_end. */
void httpc_cancel(httpc_req *req);

/* Inside on_end with an error: what went wrong in words ("connect failed: connection refused",
 * "no answer in time", "malformed response: ..."); "" otherwise. For the caller's log lines and
 * error messages: httpc itself logs failures at debug level only. */
const char *httpc_req_reason(const httpc_req *req);

/* Stops (true) or resumes (false) reading req's response: backpressure for a caller relaying it
 * to a slower reader. The idle timeout does not run while paused. */
void httpc_req_pause(httpc_req *req, bool paused);

/* "host:port" of the pool, as used in the Host header. */
const char *httpc_pool_name(const httpc_pool *pool);

#endif
