/* HTTP/1.1 server on libuv, shared by the worker programs and the proxy: keep-alive, pipelining
 * (answered in request order), chunked/SSE streaming, backpressure, and protocol-level limits
 * answered with small JSON errors. Routing and OpenAI semantics belong to the layers above.
 * Threads: every function here must be called on the thread running the server's loop. */
#ifndef DUET_HTTP_H
#define DUET_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "base/status.h"

typedef struct http_server http_server;

/* Cross-origin requests from browsers, answered as vLLM's CORS middleware answers them: a
 * request with an Origin header that is allowed gets Access-Control-Allow-Origin (and -Allow-
 * Credentials); a preflight (OPTIONS with Access-Control-Request-Method) is answered here, 200
 * when origin, method and headers are allowed, else 400. "*" in a list allows anything. The
 * strings must outlive the server. */
typedef struct http_cors {
    const char *const *origins;
    int n_origins;
    const char *const *methods;
    int n_methods;
    const char *const *headers;
    int n_headers;
    bool credentials;
} http_cors;

/* HTTPS (OpenSSL): PEM files read once at http_server_create; NULL tls = plain HTTP. */
typedef struct http_tls {
    const char *cert_file; /* certificate chain */
    const char *key_file;  /* its private key */
    const char *ca_file;   /* CAs for client certificates, or NULL */
    int verify_client;     /* 0: none, 1: checked when offered, 2: required */
} http_tls;

typedef struct http_server_opts {
    /* Request line plus headers, counted as the bytes of the URL, names and values plus 4 per
     * header; beyond it the request is answered 431 (414 while still in the URL) and the
     * connection closed. Default 64 KiB; at most 80 KiB, libhttp-parser's compiled-in bound. */
    size_t max_header_bytes;
    /* Body beyond it is answered 413 and the connection closed; a Content-Length above it is
     * refused before any of the body is read. Default 32 MiB. */
    size_t max_body_bytes;
    /* From a request's first byte to the end of its headers (slowloris); 408 then close.
     * Default 10 s, 0 = none. */
    unsigned header_timeout_ms;
    /* A keep-alive connection with no request in progress is closed after this long; a body
     * that stops arriving for this long is answered 408. Default 60 s, 0 = none. */
    unsigned idle_timeout_ms;
    /* Connections beyond this many are accepted, answered 503 at once (their request is not
     * read) and closed; beyond twice this many, closed without an answer. Default 4096,
     * 0 = no limit. */
    unsigned max_connections;
    /* Connections open at once from one client address (the IP, any port; an IPv4-mapped IPv6
     * address counts as its IPv4 one). The one beyond it is answered 429 at once (its request
     * is not read) and closed, before max_connections is looked at. Default 0 = no limit: a
     * proxy or load balancer in front is one address for all its users. */
    unsigned max_connections_per_client;
    /* A stream whose unsent bytes exceed this is closed as a stuck client (its on_close fires).
     * Applies to http_stream_write/_sse only. Default 16 MiB, 0 = no limit. */
    size_t max_write_queue_bytes;
    /* NULL: no CORS headers, OPTIONS is an ordinary request. Copied by pointer. */
    const http_cors *cors;
    /* NULL: plain HTTP. Copied by pointer. */
    const http_tls *tls;
} http_server_opts;

/* One request header, NUL-terminated; the value without surrounding whitespace. */
typedef struct http_header {
    const char *name;
    const char *value;
} http_header;

/* A complete request as the handler sees it. The server owns every pointer in it; they stay
 * valid until the handler finishes the request (see "Finishing" below). Read-only except user. */
typedef struct http_req {
    const char *method; /* "GET", "POST", ... */
    const char *path;   /* "/v1/completions": without the query, still %-encoded */
    const char *query;  /* raw, after '?'; "" when none */
    int version_minor;  /* HTTP/1.<version_minor>: 0 or 1 */
    const http_header *headers;
    size_t num_headers; /* in arrival order; duplicates kept; chunked trailers dropped */
    const char *body;   /* whole body; NUL-terminated (not counted), "" when none */
    size_t body_len;
    const char *client_addr; /* "127.0.0.1:53422" or "[::1]:53422" */
    void *user;              /* the handler's own slot; NULL at first */
} http_req;

/* Called on the loop thread for each complete request, one at a time per connection. user is
 * the pointer given to http_server_create. The handler must finish req, now or later. */
typedef void (*http_handler_fn)(http_req *req, void *user);
/* The client went away (or the connection was closed as stuck, or the server destroyed)
 * before req was finished. Called at most once, from the loop, never inside a call made by
 * the handler. The handler still has to finish req (http_req_release will do, also from
 * here). */
typedef void (*http_close_fn)(http_req *req, void *arg);
/* http_server_close is done: the listening socket and every connection are closed. */
typedef void (*http_drained_fn)(http_server *srv, void *arg);

typedef struct http_server_stats {
    uint64_t connections_open;            /* accepted, not yet closed (503-rejected not counted) */
    uint64_t connections_total;           /* accepted and served (rejected not counted) */
    uint64_t connections_rejected;        /* answered 503 for max_connections */
    uint64_t connections_rejected_client; /* answered 429 for max_connections_per_client */
    uint64_t requests_total;              /* handed to the handler */
    uint64_t requests_active;             /* handed to the handler and not yet finished */
    uint64_t responses_total;             /* finished with a complete response queued */
    uint64_t clients_gone;                /* on_close notifications */
    uint64_t protocol_errors;             /* 400/408/413/414/417/431/505 answered by this layer */
} http_server_stats;

/* Loads tls's files as http_server_create will (one error line naming the file otherwise), so
 * a program can refuse them before its slow start-up. */
duet_status http_tls_check(const http_tls *tls);

/* Fills opts with the defaults above. */
void http_server_opts_init(http_server_opts *opts);

/* Creates a server on loop (not yet listening). opts may be NULL for the defaults; it is
 * copied. on_request is required. Sets SIGPIPE to ignored if it has its default action: a
 * server writing to sockets whose peers vanish cannot live with it. */
duet_status http_server_create(uv_loop_t *loop, const http_server_opts *opts,
                               http_handler_fn on_request, void *user, http_server **srv_p);

/* Listens on host (IPv4 or IPv6 literal, "[::1]", or a name resolved here, blocking; NULL or ""
 * = all IPv4 addresses) and port (0 = an ephemeral one; see http_server_port). Binds the first
 * address that works. Once per server. */
duet_status http_server_listen(http_server *srv, const char *host, int port);

/* The bound port, or 0 when not listening. */
int http_server_port(const http_server *srv);

/* Starts draining (SIGTERM): closes the listening socket, closes idle connections and those
 * with a partly received request, and answers in-flight requests with "Connection: close".
 * cb (may be NULL) runs from the loop once nothing is open any more; never before this returns.
 * The server must still be destroyed. */
void http_server_close(http_server *srv, http_drained_fn cb, void *arg);

/* Closes everything now; requests still held by the handler get their on_close and must still
 * be finished. Memory is freed from close callbacks: keep running the loop until it has no
 * handles left. Accepts NULL. srv is invalid after this call. */
void http_server_destroy(http_server *srv);

void http_server_get_stats(const http_server *srv, http_server_stats *stats_p);

/* Whether s is an RFC 9110 token (a method or header name), and a header value free of control
 * characters (CR and LF included, so nothing can be smuggled in). NULL is invalid. */
bool http_token_valid(const char *s);
bool http_value_valid(const char *s);

/* First header named name (case-insensitive), or NULL. */
const char *http_req_header(const http_req *req, const char *name);

/* Registers cb for the client going away before req is finished (replacing an earlier one).
 * DUET_ERR_IO if it is already gone: then cb will never be called. */
duet_status http_req_on_close(http_req *req, http_close_fn cb, void *arg);

/* False once the client is gone: then every call below is a no-op returning DUET_ERR_IO. */
bool http_req_connected(const http_req *req);

/* Bytes queued on the connection but not yet accepted by the kernel (0 once gone): lets a
 * streaming caller slow down before max_write_queue_bytes closes the connection. */
size_t http_req_write_queue_size(const http_req *req);

/* Finishing. Every request handed to the handler is finished exactly once, by one of
 * http_respond, http_respond_headers, http_respond_error, http_stream_end or
 * http_req_release; req is invalid afterwards, whatever the call returned. A finishing call
 * on a request whose client is gone just frees it and returns DUET_ERR_IO.
 *
 * extra: further response headers, an array ended by an entry with name NULL (or NULL for
 * none). Names must be tokens, values free of control characters; Content-Length,
 * Transfer-Encoding and Connection are this layer's. content_type may be NULL (no header).
 * Date and Connection are added here. */

/* A whole response with Content-Length. Invalid arguments (status outside 200..599, a bad
 * header) answer 500 instead and return DUET_ERR_INVALID. Calling it after http_stream_start
 * closes the connection (a started response cannot be replaced). */
duet_status http_respond(http_req *req, int status, const char *content_type, const void *body,
                         size_t len);
duet_status http_respond_headers(http_req *req, int status, const char *content_type,
                                 const http_header *extra, const void *body, size_t len);

/* {"error":{"message":message,"type":type,"param":null,"code":status}} (vLLM's and OpenAI's
 * shape) as application/json. */
duet_status http_respond_error(http_req *req, int status, const char *type, const char *message);

/* That error object as text, for callers that send it otherwise (with extra headers, inside an
 * event stream); *len_p its length. Free with cJSON_free. NULL only when out of memory. */
char *http_error_body(int status, const char *type, const char *message, size_t *len_p);

/* Starts a streamed response: chunked for HTTP/1.1, delimited by closing the connection for
 * HTTP/1.0. Does not finish req; on DUET_ERR_INVALID nothing was sent and req may still be
 * answered otherwise. */
duet_status http_stream_start(http_req *req, int status, const char *content_type,
                              const http_header *extra);

/* One chunk (data is copied if it cannot be sent at once; len 0 sends nothing). DUET_ERR_IO
 * when the client is gone or the write queue passed max_write_queue_bytes (the connection is
 * then closed and on_close will fire); req must still be finished. */
duet_status http_stream_write(http_req *req, const void *data, size_t len);

/* One server-sent event: every line of data (NUL-terminated) as "data: line\n", then "\n". */
duet_status http_stream_sse(http_req *req, const char *data);

/* Ends the stream (the terminating 0-length chunk) and finishes req. */
duet_status http_stream_end(http_req *req);

/* Finishes req without (the rest of) a response: if the client is still there and the response
 * is not complete, the connection is closed, since nothing else tells the client it is over. */
void http_req_release(http_req *req);

#endif
