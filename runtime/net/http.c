/* HTTP/1.1 server on libuv; see http.h. A connection parses one request at a time: the parser
 * pauses when a request is complete and resumes only once its response has been queued, so
 * pipelined requests are answered in order with no reorder buffer. Lifetimes: a connection is
 * freed once both its handles are closed and its request is finished; a request is freed only by
 * its finishing call, so a handler holding one after a disconnect never touches freed memory. */
#include "net/http.h"
#include "net/http-impl.h"

#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <limits.h>
#include <netdb.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "base/log.h"

enum {
    HTTP_BACKLOG = 1024,
    IN_CHUNK = 16 * 1024,        /* read buffer size and growth step */
    IN_PAUSE_BYTES = 256 * 1024, /* buffered pipelined input that stops reading */
    LINGER_MS = 2000,            /* after our last byte: how long to wait for the client's FIN */
    URL_MAX = 65535,             /* http_parser_parse_url keeps 16-bit offsets */
    HEADER_OVERHEAD = 4,         /* ": " and CRLF, counted per header against the limit */
};

/* ---------------------------------------------------------------------------------------------
 * Requests and the reader */

typedef enum req_state {
    REQ_PARSING = 0, /* headers or body still arriving */
    REQ_HANDLER,     /* handed to the handler, nothing sent yet */
    REQ_STREAMING,   /* http_stream_start done */
} req_state;

typedef enum hb_last { HB_URL = 0, HB_FIELD, HB_VALUE } hb_last;

struct http_conn;

struct http_req_impl {
    http_req pub;           /* first: an http_req * converts back */
    struct http_conn *conn; /* set when dispatched; holds a reference on it */
    req_state state;
    bool headers_done;
    bool keep_alive;
    bool expect_continue;
    bool continue_sent;
    bool head;               /* HEAD: headers only */
    bool chunked_out;        /* the stream is chunked (HTTP/1.1) rather than close-delimited */
    bool gone;               /* the connection closed before the request was finished */
    const char *cors_origin; /* Access-Control-Allow-Origin of the answer, or NULL */
    bool cors_vary;          /* the origin is echoed: caches must key on it */
    http_close_fn on_close;
    void *on_close_arg;
    size_t header_bytes; /* counted against max_header_bytes */
    size_t url_len;
    hb_last last; /* which kind of piece the parser sent last */
    /* The URL, then each header name and value, NUL-separated; then path and query. */
    char *hbuf;
    size_t hlen, hcap;
    size_t *offs; /* name, value offsets into hbuf, pairwise */
    size_t noffs, offs_cap;
    http_header *headers;
    char *body;
    size_t body_cap;
};

#define REQ(p) ((struct http_req_impl *)(p))

static void req_free(struct http_req_impl *q);

static bool hb_reserve(struct http_req_impl *q, size_t n) {
    if (q->hlen + n + 1 <= q->hcap) return true;
    size_t cap = q->hcap ? q->hcap : 256;
    while (cap < q->hlen + n + 1) cap *= 2;
    char *nb = realloc(q->hbuf, cap);
    if (!nb) return false;
    q->hbuf = nb;
    q->hcap = cap;
    return true;
}

/* p must not point into q->hbuf, which may move (see hb_append_own). */
static bool hb_append(struct http_req_impl *q, const char *p, size_t n) {
    if (!hb_reserve(q, n)) return false;
    memcpy(q->hbuf + q->hlen, p, n);
    q->hlen += n;
    return true;
}

/* Appends hbuf[off, off + n) plus a NUL: offsets, because reserving may move hbuf. */
static bool hb_append_own(struct http_req_impl *q, size_t off, size_t n) {
    if (!hb_reserve(q, n + 1)) return false;
    memcpy(q->hbuf + q->hlen, q->hbuf + off, n);
    q->hbuf[q->hlen + n] = '\0';
    q->hlen += n + 1;
    return true;
}

static bool offs_push(struct http_req_impl *q, size_t off) {
    if (q->noffs == q->offs_cap) {
        size_t cap = q->offs_cap ? q->offs_cap * 2 : 32;
        size_t *no = realloc(q->offs, cap * sizeof *no);
        if (!no) return false;
        q->offs = no;
        q->offs_cap = cap;
    }
    q->offs[q->noffs++] = off;
    return true;
}

static int reader_fail(http_reader *r, int status, const char *type, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Records the first error; returning -1 from a callback makes the parser stop. */
static int reader_fail(http_reader *r, int status, const char *type, const char *fmt, ...) {
    if (!r->err_status) {
        r->err_status = status;
        r->err_type = type;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(r->err_msg, sizeof r->err_msg, fmt, ap);
        va_end(ap);
    }
    return -1;
}

static int reader_oom(http_reader *r) {
    LOG_ERROR("http: out of memory parsing a request");
    return reader_fail(r, 500, "InternalServerError", "out of memory");
}

static int count_header_bytes(http_reader *r, size_t n) {
    struct http_req_impl *q = r->cur;
    q->header_bytes += n;
    if (q->header_bytes <= r->max_header_bytes) return 0;
    if (q->last == HB_URL)
        return reader_fail(r, 414, "URITooLongError", "request URL longer than %zu bytes",
                           r->max_header_bytes);
    return reader_fail(r, 431, "RequestHeaderFieldsTooLargeError",
                       "request headers larger than %zu bytes", r->max_header_bytes);
}

static int on_message_begin(http_parser *p) {
    http_reader *r = p->data;
    if (r->cur) req_free(r->cur); /* not reached: the previous request completed or failed */
    r->cur = calloc(1, sizeof *r->cur);
    if (!r->cur) return reader_oom(r);
    r->cur->pub.query = "";
    r->cur->pub.body = "";
    r->cur->pub.client_addr = "";
    return 0;
}

static int on_url(http_parser *p, const char *at, size_t n) {
    http_reader *r = p->data;
    struct http_req_impl *q = r->cur;
    if (!q) return reader_oom(r);
    if (count_header_bytes(r, n)) return -1;
    q->url_len += n;
    if (q->url_len > URL_MAX)
        return reader_fail(r, 414, "URITooLongError", "request URL longer than %d bytes", URL_MAX);
    return hb_append(q, at, n) ? 0 : reader_oom(r);
}

static int on_header_field(http_parser *p, const char *at, size_t n) {
    http_reader *r = p->data;
    struct http_req_impl *q = r->cur;
    if (!q) return reader_oom(r);
    if (q->headers_done) return count_header_bytes(r, n); /* trailers: counted, not kept */
    if (q->last != HB_FIELD) {
        /* A new name; the NUL ends the URL or the previous value. */
        if (count_header_bytes(r, HEADER_OVERHEAD)) return -1;
        if (!hb_append(q, "", 1) || !offs_push(q, q->hlen)) return reader_oom(r);
        q->last = HB_FIELD;
    }
    if (count_header_bytes(r, n)) return -1;
    return hb_append(q, at, n) ? 0 : reader_oom(r);
}

static int on_header_value(http_parser *p, const char *at, size_t n) {
    http_reader *r = p->data;
    struct http_req_impl *q = r->cur;
    if (!q) return reader_oom(r);
    if (q->headers_done) return count_header_bytes(r, n);
    if (q->last != HB_VALUE) {
        if (!hb_append(q, "", 1) || !offs_push(q, q->hlen)) return reader_oom(r);
        q->last = HB_VALUE;
    }
    if (count_header_bytes(r, n)) return -1;
    return hb_append(q, at, n) ? 0 : reader_oom(r);
}

/* All headers are in: fix the strings, split the URL, and refuse what can be refused before
 * reading the body (oversized Content-Length, unknown expectations, other HTTP versions). */
static int on_headers_complete(http_parser *p) {
    http_reader *r = p->data;
    struct http_req_impl *q = r->cur;
    if (!q) return reader_oom(r);
    if (!hb_append(q, "", 1)) return reader_oom(r);
    if (q->last == HB_FIELD && !offs_push(q, q->hlen - 1)) return reader_oom(r);
    q->headers_done = true;
    if (p->http_major != 1)
        return reader_fail(r, 505, "HTTPVersionNotSupportedError", "HTTP/%u.%u is not supported",
                           p->http_major, p->http_minor);

    struct http_parser_url u;
    http_parser_url_init(&u);
    if (http_parser_parse_url(q->hbuf, q->url_len, p->method == HTTP_CONNECT, &u))
        return reader_fail(r, 400, "BadRequestError", "malformed request URL");
    bool has_path = u.field_set & (1u << UF_PATH), has_query = u.field_set & (1u << UF_QUERY);
    size_t path_off = q->hlen;
    if (!hb_append_own(q, u.field_data[UF_PATH].off, has_path ? u.field_data[UF_PATH].len : 0))
        return reader_oom(r);
    size_t query_off = q->hlen;
    if (!hb_append_own(q, u.field_data[UF_QUERY].off, has_query ? u.field_data[UF_QUERY].len : 0))
        return reader_oom(r);

    /* hbuf no longer moves: pointers into it are safe from here on. */
    size_t nh = q->noffs / 2;
    q->headers = calloc(nh ? nh : 1, sizeof *q->headers);
    if (!q->headers) return reader_oom(r);
    for (size_t i = 0; i < nh; i++) {
        char *value = q->hbuf + q->offs[2 * i + 1];
        size_t vl = strlen(value);
        while (vl > 0 && (value[vl - 1] == ' ' || value[vl - 1] == '\t')) value[--vl] = '\0';
        q->headers[i].name = q->hbuf + q->offs[2 * i];
        q->headers[i].value = value;
    }
    q->pub.method = http_method_str((enum http_method)p->method);
    q->pub.path = q->hbuf + path_off;
    q->pub.query = q->hbuf + query_off;
    q->pub.version_minor = p->http_minor;
    q->pub.headers = q->headers;
    q->pub.num_headers = nh;
    q->keep_alive = http_should_keep_alive(p);
    q->head = p->method == HTTP_HEAD;

    const char *expect = http_req_header(&q->pub, "expect");
    if (expect && p->http_minor >= 1) {
        if (strcasecmp(expect, "100-continue"))
            return reader_fail(r, 417, "ExpectationFailedError", "unsupported expectation");
        q->expect_continue = true;
    }
    if (p->content_length != ULLONG_MAX && !(p->flags & F_CHUNKED)) {
        if (p->content_length > r->max_body_bytes)
            return reader_fail(r, 413, "RequestEntityTooLargeError",
                               "request body of %llu bytes is larger than the limit of %zu",
                               (unsigned long long)p->content_length, r->max_body_bytes);
        if (p->content_length > 0) {
            q->body_cap = (size_t)p->content_length + 1;
            q->body = malloc(q->body_cap);
            if (!q->body) return reader_oom(r);
        }
    }
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t n) {
    http_reader *r = p->data;
    struct http_req_impl *q = r->cur;
    if (!q) return reader_oom(r);
    if (n > r->max_body_bytes - q->pub.body_len)
        return reader_fail(r, 413, "RequestEntityTooLargeError",
                           "request body is larger than the limit of %zu bytes", r->max_body_bytes);
    size_t need = q->pub.body_len + n + 1;
    if (need > q->body_cap) { /* chunked: grow geometrically, up to the limit */
        size_t cap = q->body_cap ? q->body_cap : 4096;
        while (cap < need) cap *= 2;
        if (cap > r->max_body_bytes + 1) cap = r->max_body_bytes + 1;
        char *nb = realloc(q->body, cap);
        if (!nb) return reader_oom(r);
        q->body = nb;
        q->body_cap = cap;
    }
    memcpy(q->body + q->pub.body_len, at, n);
    q->pub.body_len += n;
    return 0;
}

static int on_message_complete(http_parser *p) {
    http_reader *r = p->data;
    struct http_req_impl *q = r->cur;
    if (!q) return reader_oom(r);
    if (q->body) {
        q->body[q->pub.body_len] = '\0';
        q->pub.body = q->body;
    }
    /* After an Upgrade the bytes that follow are another protocol: answer, then close. */
    q->keep_alive = q->keep_alive && http_should_keep_alive(p) && !p->upgrade;
    r->done = q;
    r->cur = NULL;
    http_parser_pause(p, 1); /* one request at a time: execute returns here */
    return 0;
}

static const http_parser_settings g_reader_settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

void http_reader_init(http_reader *r, size_t max_header_bytes, size_t max_body_bytes) {
    memset(r, 0, sizeof *r);
    http_parser_init(&r->parser, HTTP_REQUEST);
    r->parser.data = r;
    r->max_header_bytes = max_header_bytes;
    r->max_body_bytes = max_body_bytes;
}

void http_reader_cleanup(http_reader *r) {
    if (r->cur) req_free(r->cur);
    if (r->done) req_free(r->done);
    r->cur = r->done = NULL;
}

size_t http_reader_feed(http_reader *r, const char *data, size_t len) {
    /* len 0 would tell the parser the stream ended; we never do that. */
    if (r->err_status || r->done || len == 0) return 0;
    size_t n = http_parser_execute(&r->parser, &g_reader_settings, data, len);
    enum http_errno e = HTTP_PARSER_ERRNO(&r->parser);
    if (e == HPE_PAUSED) {
        http_parser_pause(&r->parser, 0);
    } else if (e == HPE_HEADER_OVERFLOW) {
        reader_fail(r, 431, "RequestHeaderFieldsTooLargeError", "request headers too large");
    } else if (e != HPE_OK) {
        reader_fail(r, 400, "BadRequestError", "malformed request: %s", http_errno_description(e));
    }
    return n < len ? n : len;
}

http_req *http_reader_take(http_reader *r) {
    struct http_req_impl *q = r->done;
    r->done = NULL;
    return q ? &q->pub : NULL;
}

bool http_reader_req_keep_alive(const http_req *req) {
    return req && REQ(req)->keep_alive;
}

void http_reader_req_free(http_req *req) {
    if (req) req_free(REQ(req));
}

char *http_error_body(int status, const char *type, const char *message, size_t *len_p) {
    cJSON *root = cJSON_CreateObject();
    cJSON *err = root ? cJSON_AddObjectToObject(root, "error") : NULL;
    char *s = NULL;
    if (err && cJSON_AddStringToObject(err, "message", message ? message : "") &&
        cJSON_AddStringToObject(err, "type", type ? type : "Error") &&
        cJSON_AddNullToObject(err, "param") && cJSON_AddNumberToObject(err, "code", status))
        s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    if (s && len_p) *len_p = strlen(s);
    return s;
}

/* ---------------------------------------------------------------------------------------------
 * Server and connections */

typedef enum conn_phase {
    PHASE_IDLE = 0, /* between requests: idle_timeout_ms */
    PHASE_HEADERS,  /* a request began: header_timeout_ms, not renewed by reads */
    PHASE_BODY,     /* reading a body: idle_timeout_ms, renewed by every read */
    PHASE_ACTIVE,   /* the handler has the request: no timer */
    PHASE_RESUME,   /* response queued: parse what follows from the loop (0 ms) */
    PHASE_LINGER,   /* last response queued, write side shut down: read and drop */
    PHASE_CLOSED,
} conn_phase;

typedef struct http_conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_shutdown_t shutdown_req;
    http_server *srv; /* holds a reference */
    struct http_conn *prev, *next;
    http_reader reader;
    char *in; /* unparsed input is in[in_off, in_len) */
    size_t in_off, in_len, in_cap;
    struct http_req_impl *active; /* dispatched and not finished; at most one */
    conn_phase phase;
    size_t last_queue; /* write queue size when the timer was armed */
    int refs;          /* one for the open handles, one for a dispatched request */
    int handles_open;
    bool counted;          /* in srv->n_open */
    bool rejected;         /* over a connection limit: answered 503/429, in srv->n_rejected_open */
    bool keyed;            /* counted in srv->clients under client_ip */
    uint8_t client_ip[16]; /* the peer's IPv6 address, IPv4 as ::ffff:a.b.c.d */
    bool reading;          /* uv_read_start in effect */
    bool processing;       /* inside conn_process */
    bool shutting;         /* uv_shutdown pending */
    bool eof_seen;
    bool closing;
    char addr[64];
    /* HTTPS: OpenSSL on memory BIOs; the socket carries ciphertext, in[] holds plaintext */
    SSL *ssl;
    BIO *rbio, *wbio; /* owned by ssl */
    char *raw;        /* ciphertext read buffer, IN_CHUNK */
} http_conn;

struct http_server {
    uv_loop_t *loop;
    http_server_opts opts;
    http_handler_fn on_request;
    void *user;
    uv_tcp_t *listener; /* until its close callback */
    bool listener_closing;
    uv_timer_t kick; /* defers the drained callback out of http_server_close */
    int port;
    http_conn *conns;
    unsigned n_open, n_rejected_open;
    /* open connections per client address (max_connections_per_client): linear probing,
     * count 0 = empty slot, cap a power of two or 0 */
    struct client_slot {
        uint8_t ip[16];
        unsigned count;
    } * clients;
    size_t clients_cap, clients_used;
    http_server_stats stats;
    int refs; /* the owner's, the listener's, the kick timer's, one per connection */
    bool draining;
    bool destroyed;
    http_drained_fn drained_cb;
    void *drained_arg;
    time_t date_sec;
    char date[40];
    SSL_CTX *tls; /* NULL: plain HTTP */
};

typedef struct conn_wbuf {
    uv_write_t req; /* first: the uv_write_t * converts back */
    http_conn *conn;
    char data[];
} conn_wbuf;

static void conn_close(http_conn *c);
static void client_remove(http_server *srv, const uint8_t ip[16]);
static void conn_shutdown(http_conn *c);
static void conn_process(http_conn *c);
static void on_timer(uv_timer_t *t);

static duet_status from_uv(int r) {
    switch (r) {
    case UV_EADDRINUSE:
        return DUET_ERR_BUSY;
    case UV_EACCES:
    case UV_EPERM:
        return DUET_ERR_AUTH;
    case UV_ENOMEM:
        return DUET_ERR_NO_MEMORY;
    case UV_EADDRNOTAVAIL:
    case UV_EAI_NONAME:
        return DUET_ERR_NOT_FOUND;
    default:
        return DUET_ERR_IO;
    }
}

static void srv_unref(http_server *srv) {
    if (--srv->refs > 0) return;
    SSL_CTX_free(srv->tls);
    free(srv->clients);
    free(srv);
}

/* Calls the drained callback once nothing is open. The callback may destroy srv: callers that
 * touch srv afterwards hold a reference. */
static void srv_check_drained(http_server *srv) {
    if (!srv->draining || !srv->drained_cb || srv->listener || srv->n_open || srv->n_rejected_open)
        return;
    http_drained_fn cb = srv->drained_cb;
    srv->drained_cb = NULL;
    cb(srv, srv->drained_arg);
}

/* RFC 7231 IMF-fixdate, computed once a second; by hand because strftime follows the locale. */
static const char *srv_date(http_server *srv) {
    static const char days[7][4] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char months[12][4] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                       "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    time_t now = time(NULL);
    if (now != srv->date_sec || !srv->date[0]) {
        struct tm tm;
        gmtime_r(&now, &tm);
        snprintf(srv->date, sizeof srv->date, "%s, %02d %s %04d %02d:%02d:%02d GMT",
                 days[tm.tm_wday % 7], tm.tm_mday, months[tm.tm_mon % 12], tm.tm_year + 1900,
                 tm.tm_hour, tm.tm_min, tm.tm_sec);
        srv->date_sec = now;
    }
    return srv->date;
}

static void conn_unref(http_conn *c) {
    if (--c->refs > 0) return;
    http_server *srv = c->srv;
    if (c->prev)
        c->prev->next = c->next;
    else
        srv->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    http_reader_cleanup(&c->reader);
    SSL_free(c->ssl);
    free(c->raw);
    free(c->in);
    free(c);
    srv_unref(srv);
}

static void conn_handle_closed(http_conn *c) {
    if (--c->handles_open == 0) conn_unref(c);
}

static void on_timer_closed(uv_handle_t *h) {
    conn_handle_closed(h->data);
}

/* The socket is closed: tell the handler about its unfinished request, if any. */
static void on_tcp_closed(uv_handle_t *h) {
    http_conn *c = h->data;
    http_server *srv = c->srv;
    srv->refs++;
    c->refs++;
    if (c->rejected) {
        srv->n_rejected_open--;
    } else if (c->counted) {
        srv->n_open--;
        srv->stats.connections_open--;
    }
    if (c->keyed) {
        client_remove(srv, c->client_ip);
        c->keyed = false;
    }
    struct http_req_impl *q = c->active;
    if (q) {
        srv->stats.clients_gone++;
        http_close_fn cb = q->on_close;
        q->on_close = NULL;
        if (cb) cb(&q->pub, q->on_close_arg); /* may finish q */
    }
    /* the socket's handle reference goes (never the last: ours is held), then ours */
    if (--c->handles_open == 0) c->refs--;
    conn_unref(c);
    srv_check_drained(srv);
    srv_unref(srv);
}

/* Closes at once; queued writes are dropped. on_close fires later, from the close callback, so
 * never inside a call the handler is making. */
static void conn_close(http_conn *c) {
    if (c->closing) return;
    c->closing = true;
    c->phase = PHASE_CLOSED;
    c->reading = false;
    if (c->active) c->active->gone = true;
    uv_close((uv_handle_t *)&c->timer, on_timer_closed);
    uv_close((uv_handle_t *)&c->tcp, on_tcp_closed);
}

static void conn_set_phase(http_conn *c, conn_phase phase) {
    if (c->closing) return;
    /* Only a body's inactivity timer is renewed by further reads. */
    if (c->phase == phase && phase != PHASE_BODY) return;
    c->phase = phase;
    uv_timer_stop(&c->timer);
    const http_server_opts *o = &c->srv->opts;
    unsigned ms = 0;
    switch (phase) {
    case PHASE_IDLE:
    case PHASE_BODY:
        ms = o->idle_timeout_ms;
        break;
    case PHASE_HEADERS:
        ms = o->header_timeout_ms;
        break;
    case PHASE_RESUME:
        uv_timer_start(&c->timer, on_timer, 0, 0);
        return;
    default:
        return;
    }
    c->last_queue = uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp);
    if (ms) uv_timer_start(&c->timer, on_timer, ms, 0);
}

static void on_write(uv_write_t *req, int status) {
    conn_wbuf *w = (conn_wbuf *)req;
    http_conn *c = w->conn; /* alive: write callbacks run before the close callback */
    free(w);
    if (status < 0 && status != UV_ECANCELED) {
        LOG_DEBUG("http: %s: write failed: %s", c->addr, uv_strerror(status));
        conn_close(c);
    }
}

/* Sends bufs, directly when nothing is queued, else copied behind what is. capped: apply
 * max_write_queue_bytes. Errors close the connection. */
static duet_status conn_write_raw(http_conn *c, const uv_buf_t *bufs, unsigned n, bool capped) {
    if (c->closing || c->phase == PHASE_LINGER) return DUET_ERR_IO;
    uv_stream_t *s = (uv_stream_t *)&c->tcp;
    size_t total = 0;
    for (unsigned i = 0; i < n; i++) total += bufs[i].len;
    size_t sent = 0;
    if (uv_stream_get_write_queue_size(s) == 0) {
        int r = uv_try_write(s, bufs, n);
        if (r >= 0) {
            sent = (size_t)r;
        } else if (r != UV_EAGAIN) {
            LOG_DEBUG("http: %s: write failed: %s", c->addr, uv_strerror(r));
            conn_close(c);
            return DUET_ERR_IO;
        }
    }
    if (sent == total) return DUET_OK;
    conn_wbuf *w = malloc(sizeof *w + (total - sent));
    if (!w) {
        LOG_ERROR("http: %s: out of memory queueing %zu bytes", c->addr, total - sent);
        conn_close(c);
        return DUET_ERR_NO_MEMORY;
    }
    size_t skip = sent, off = 0;
    for (unsigned i = 0; i < n; i++) {
        if (skip >= bufs[i].len) {
            skip -= bufs[i].len;
            continue;
        }
        memcpy(w->data + off, bufs[i].base + skip, bufs[i].len - skip);
        off += bufs[i].len - skip;
        skip = 0;
    }
    w->conn = c;
    uv_buf_t one = {.base = w->data, .len = off};
    int r = uv_write(&w->req, s, &one, 1, on_write);
    if (r) {
        free(w);
        LOG_DEBUG("http: %s: write failed: %s", c->addr, uv_strerror(r));
        conn_close(c);
        return DUET_ERR_IO;
    }
    size_t queued = uv_stream_get_write_queue_size(s);
    size_t cap = c->srv->opts.max_write_queue_bytes;
    if (capped && cap && queued > cap) {
        LOG_WARN("http: %s: client reads too slowly (%zu bytes unsent), closing", c->addr, queued);
        conn_close(c);
        return DUET_ERR_IO;
    }
    return DUET_OK;
}

/* HTTPS: what OpenSSL has written (records, handshake messages, alerts) goes to the socket. */
static duet_status tls_flush(http_conn *c, bool capped) {
    char chunk[16 * 1024];
    duet_status st = DUET_OK;
    int n;
    while (st == DUET_OK && (n = BIO_read(c->wbio, chunk, sizeof chunk)) > 0) {
        uv_buf_t b = {.base = chunk, .len = (size_t)n};
        st = conn_write_raw(c, &b, 1, capped);
    }
    return st;
}

/* Plain bytes out: as they are, or through TLS (a memory BIO never refuses a write once the
 * handshake is done, and nothing is answered before a whole request arrived). */
static duet_status conn_write(http_conn *c, const uv_buf_t *bufs, unsigned n, bool capped) {
    if (!c->ssl) return conn_write_raw(c, bufs, n, capped);
    if (c->closing || c->phase == PHASE_LINGER) return DUET_ERR_IO;
    for (unsigned i = 0; i < n; i++) {
        if (!bufs[i].len) continue;
        int r = SSL_write(c->ssl, bufs[i].base, (int)bufs[i].len);
        if (r <= 0) {
            LOG_DEBUG("http: %s: TLS write failed: %s", c->addr,
                      ERR_error_string(ERR_get_error(), NULL));
            ERR_clear_error();
            conn_close(c);
            return DUET_ERR_IO;
        }
    }
    return tls_flush(c, capped);
}

/* Makes room for at least IN_CHUNK / 4 more bytes in in[]. */
static bool in_reserve(http_conn *c) {
    if (c->in_off > 0) {
        memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
        c->in_len -= c->in_off;
        c->in_off = 0;
    }
    if (c->in_cap - c->in_len >= IN_CHUNK / 4) return true;
    size_t cap = c->in_cap ? c->in_cap : IN_CHUNK;
    while (cap - c->in_len < IN_CHUNK / 4) cap *= 2;
    char *p = realloc(c->in, cap);
    if (!p) return false;
    c->in = p;
    c->in_cap = cap;
    return true;
}

/* HTTPS: ciphertext in, plaintext appended to in[]. False when the connection was closed (a
 * failed handshake, a bad record, no memory); *eof_p when the client sent close_notify. */
static bool tls_on_read(http_conn *c, const char *data, size_t n, bool *eof_p) {
    *eof_p = false;
    if (BIO_write(c->rbio, data, (int)n) != (int)n) {
        conn_close(c);
        return false;
    }
    for (;;) {
        if (!in_reserve(c)) {
            LOG_ERROR("http: %s: out of memory reading a request", c->addr);
            conn_close(c);
            return false;
        }
        int r = SSL_read(c->ssl, c->in + c->in_len, (int)(c->in_cap - c->in_len));
        if (r > 0) {
            c->in_len += (size_t)r;
            continue;
        }
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ) break;
        if (e == SSL_ERROR_ZERO_RETURN) {
            *eof_p = true;
            break;
        }
        LOG_DEBUG("http: %s: TLS: %s", c->addr, ERR_error_string(ERR_get_error(), NULL));
        ERR_clear_error();
        tls_flush(c, false); /* the alert, if any */
        conn_close(c);
        return false;
    }
    return tls_flush(c, false) == DUET_OK;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    http_conn *c = h->data;
    (void)suggested;
    if (c->ssl) { /* ciphertext goes to its own buffer, decrypted into in[] */
        if (!c->raw) c->raw = malloc(IN_CHUNK);
        buf->base = c->raw;
        buf->len = c->raw ? IN_CHUNK : 0;
        return;
    }
    if (c->in_off > 0) {
        memmove(c->in, c->in + c->in_off, c->in_len - c->in_off);
        c->in_len -= c->in_off;
        c->in_off = 0;
    }
    if (c->phase == PHASE_LINGER) c->in_len = 0; /* reads are dropped */
    if (c->in_cap - c->in_len < IN_CHUNK / 4) {
        size_t cap = c->in_cap ? c->in_cap : IN_CHUNK;
        while (cap - c->in_len < IN_CHUNK / 4) cap *= 2;
        char *p = realloc(c->in, cap);
        if (!p) { /* libuv reports UV_ENOBUFS to on_read */
            buf->base = NULL;
            buf->len = 0;
            return;
        }
        c->in = p;
        c->in_cap = cap;
    }
    buf->base = c->in + c->in_len;
    buf->len = c->in_cap - c->in_len;
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

static void conn_read_start(http_conn *c) {
    if (c->reading || c->closing || c->eof_seen) return;
    int r = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    if (r) {
        LOG_DEBUG("http: %s: read failed: %s", c->addr, uv_strerror(r));
        conn_close(c);
        return;
    }
    c->reading = true;
}

static void conn_read_stop(http_conn *c) {
    if (!c->reading || c->closing) return;
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = false;
}

static void on_shutdown(uv_shutdown_t *req, int status) {
    http_conn *c = req->data;
    c->shutting = false;
    if (c->closing) return;
    if (status < 0 || c->eof_seen) {
        conn_close(c);
        return;
    }
    uv_timer_stop(&c->timer);
    uv_timer_start(&c->timer, on_timer, LINGER_MS, 0);
}

/* Ends the connection after what is queued: FIN once the queue is flushed, then read and drop
 * whatever the client still sends until it closes too (or LINGER_MS), so that our last response
 * is not destroyed by the reset that closing with unread input would cause. */
static void conn_shutdown(http_conn *c) {
    if (c->closing || c->phase == PHASE_LINGER) return;
    if (c->ssl && SSL_is_init_finished(c->ssl)) { /* close_notify before the FIN */
        SSL_shutdown(c->ssl);
        tls_flush(c, false);
        if (c->closing) return;
    }
    c->phase = PHASE_LINGER;
    c->in_off = c->in_len = 0;
    uv_timer_stop(&c->timer);
    int r = uv_shutdown(&c->shutdown_req, (uv_stream_t *)&c->tcp, on_shutdown);
    if (r) {
        conn_close(c);
        return;
    }
    c->shutting = true;
    /* A client that stops reading our last response must not hold the connection forever. */
    c->last_queue = uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp);
    if (c->srv->opts.idle_timeout_ms)
        uv_timer_start(&c->timer, on_timer, c->srv->opts.idle_timeout_ms, 0);
    conn_read_start(c);
}

/* A small growable string; starts on the stack, which covers every header block we build
 * unless the caller adds long extra headers. */
typedef struct sbuf {
    char *p;
    size_t len, cap;
    bool oom;
    char stack[512];
} sbuf;

static void sb_init(sbuf *b) {
    b->p = b->stack;
    b->len = 0;
    b->cap = sizeof b->stack;
    b->oom = false;
}

static void sb_free(sbuf *b) {
    if (b->p != b->stack) free(b->p);
}

static void sb_add(sbuf *b, const char *s, size_t n) {
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap * 2;
        while (cap < b->len + n + 1) cap *= 2;
        char *np = b->p == b->stack ? malloc(cap) : realloc(b->p, cap);
        if (!np) {
            b->oom = true;
            return;
        }
        if (b->p == b->stack) memcpy(np, b->stack, b->len);
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_str(sbuf *b, const char *s) {
    sb_add(b, s, strlen(s));
}

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void sb_printf(sbuf *b, const char *fmt, ...) {
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof tmp) {
        b->oom = true; /* only short fixed formats go through here */
        return;
    }
    sb_add(b, tmp, (size_t)n);
}

bool http_token_valid(const char *s) {
    if (!s || !*s) return false;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              strchr("!#$%&'*+-.^_`|~", *p)))
            return false;
    return true;
}

bool http_value_valid(const char *s) {
    if (!s) return false;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if ((*p < 0x20 && *p != '\t') || *p == 0x7f) return false;
    return true;
}

static bool valid_extra(const http_header *extra) {
    for (; extra && extra->name; extra++) {
        if (!http_token_valid(extra->name) || !http_value_valid(extra->value)) return false;
        if (!strcasecmp(extra->name, "content-length") ||
            !strcasecmp(extra->name, "transfer-encoding") || !strcasecmp(extra->name, "connection"))
            return false;
    }
    return true;
}

/* content_length < 0: none (chunked, close-delimited, or a status without a body). q (may be
 * NULL) brings its CORS headers. */
static void build_head(sbuf *b, http_server *srv, const struct http_req_impl *q, int status,
                       const char *content_type, const http_header *extra, long long content_length,
                       bool chunked, bool keep_alive, bool http10) {
    const char *reason = http_status_str((enum http_status)status);
    if (!strcmp(reason, "<unknown>")) reason = "";
    sb_printf(b, "HTTP/1.1 %d %s\r\nDate: %s\r\n", status, reason, srv_date(srv));
    if (content_type) {
        sb_str(b, "Content-Type: ");
        sb_str(b, content_type);
        sb_str(b, "\r\n");
    }
    if (content_length >= 0) sb_printf(b, "Content-Length: %lld\r\n", content_length);
    if (chunked) sb_str(b, "Transfer-Encoding: chunked\r\n");
    if (!keep_alive)
        sb_str(b, "Connection: close\r\n");
    else if (http10)
        sb_str(b, "Connection: keep-alive\r\n");
    for (; extra && extra->name; extra++) {
        sb_str(b, extra->name);
        sb_str(b, ": ");
        sb_str(b, extra->value);
        sb_str(b, "\r\n");
    }
    if (q && q->cors_origin) {
        sb_str(b, "Access-Control-Allow-Origin: ");
        sb_str(b, q->cors_origin);
        sb_str(b, "\r\n");
        if (srv->opts.cors->credentials) sb_str(b, "Access-Control-Allow-Credentials: true\r\n");
        if (q->cors_vary) sb_str(b, "Vary: Origin\r\n");
    }
    sb_str(b, "\r\n");
}

/* An error this layer answers itself (no handler involved), then the connection ends. */
static void conn_send_error(http_conn *c, int status, const char *type, const char *message) {
    if (status != 503 && status != 429) c->srv->stats.protocol_errors++;
    LOG_DEBUG("http: %s: %d %s", c->addr, status, message);
    size_t len = 0;
    char *body = http_error_body(status, type, message, &len);
    sbuf head;
    sb_init(&head);
    build_head(&head, c->srv, NULL, status, "application/json", NULL, (long long)len, false, false,
               false);
    if (body && !head.oom) {
        uv_buf_t bufs[2] = {{.base = head.p, .len = head.len}, {.base = body, .len = len}};
        conn_write(c, bufs, 2, false);
    }
    sb_free(&head);
    cJSON_free(body);
    conn_shutdown(c);
}

/* ---- CORS (as Starlette's middleware behind vLLM answers) ---- */

static bool cors_list_has(const char *const *v, int n, const char *s, bool fold) {
    for (int i = 0; i < n; i++)
        if (!strcmp(v[i], "*") || !(fold ? strcasecmp(v[i], s) : strcmp(v[i], s))) return true;
    return false;
}

static bool cors_list_any(const char *const *v, int n) {
    for (int i = 0; i < n; i++)
        if (!strcmp(v[i], "*")) return true;
    return false;
}

/* The request headers a preflight asks for, each allowed (browsers always may send the
 * CORS-safelisted ones). */
static bool cors_headers_ok(const http_cors *k, const char *list) {
    static const char *const safe[] = {"accept", "accept-language", "content-language",
                                       "content-type"};
    if (cors_list_any(k->headers, k->n_headers)) return true;
    while (list && *list) {
        while (*list == ' ' || *list == ',' || *list == '\t') list++;
        size_t n = strcspn(list, ",");
        while (n && (list[n - 1] == ' ' || list[n - 1] == '\t')) n--;
        if (n) {
            char h[128];
            if (n >= sizeof h) return false;
            memcpy(h, list, n);
            h[n] = '\0';
            bool ok = cors_list_has(k->headers, k->n_headers, h, true);
            for (size_t i = 0; !ok && i < sizeof safe / sizeof *safe; i++)
                ok = !strcasecmp(h, safe[i]);
            if (!ok) return false;
        }
        list += strcspn(list, ",");
    }
    return true;
}

static void cors_join(sbuf *b, const char *const *v, int n) {
    for (int i = 0; i < n; i++) {
        if (i) sb_str(b, ", ");
        sb_str(b, v[i]);
    }
}

/* Notes the CORS answer of q (an allowed Origin); answers a preflight itself. True when q was
 * answered here. */
static bool cors_dispatch(http_server *srv, struct http_req_impl *q) {
    const http_cors *k = srv->opts.cors;
    const char *origin = http_req_header(&q->pub, "origin");
    if (!k || !origin) return false;
    bool any = cors_list_any(k->origins, k->n_origins);
    bool allowed = cors_list_has(k->origins, k->n_origins, origin, false);
    if (allowed) {
        q->cors_origin = any && !k->credentials ? "*" : origin;
        q->cors_vary = !(any && !k->credentials);
    }
    const char *want = http_req_header(&q->pub, "access-control-request-method");
    if (strcmp(q->pub.method, "OPTIONS") != 0 || !want) return false;
    const char *want_headers = http_req_header(&q->pub, "access-control-request-headers");
    bool method_ok = cors_list_has(k->methods, k->n_methods, want, false);
    bool headers_ok = cors_headers_ok(k, want_headers);
    if (!allowed || !method_ok || !headers_ok) {
        char msg[96];
        snprintf(msg, sizeof msg, "Disallowed CORS %s%s%s", !allowed ? "origin" : "",
                 !method_ok ? (!allowed ? ", method" : "method") : "",
                 !headers_ok ? (!allowed || !method_ok ? ", headers" : "headers") : "");
        q->cors_origin = NULL;
        http_respond(&q->pub, 400, "text/plain; charset=utf-8", msg, strlen(msg));
        return true;
    }
    sbuf methods, headers;
    sb_init(&methods);
    sb_init(&headers);
    if (cors_list_any(k->methods, k->n_methods))
        sb_str(&methods, "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT");
    else
        cors_join(&methods, k->methods, k->n_methods);
    if (cors_list_any(k->headers, k->n_headers))
        sb_str(&headers, want_headers && http_value_valid(want_headers) ? want_headers : "");
    else
        cors_join(&headers, k->headers, k->n_headers);
    http_header extra[] = {{"Access-Control-Allow-Methods", methods.oom ? "" : methods.p},
                           {"Access-Control-Allow-Headers", headers.oom ? "" : headers.p},
                           {"Access-Control-Max-Age", "600"},
                           {NULL, NULL}};
    if (!headers.len) extra[1] = extra[2], extra[2] = (http_header){NULL, NULL};
    http_respond_headers(&q->pub, 200, "text/plain; charset=utf-8", extra, "OK", 2);
    sb_free(&methods);
    sb_free(&headers);
    return true;
}

static void conn_dispatch(http_conn *c, struct http_req_impl *q) {
    http_server *srv = c->srv;
    q->conn = c;
    c->refs++;
    q->state = REQ_HANDLER;
    q->pub.client_addr = c->addr;
    c->active = q;
    srv->stats.requests_total++;
    srv->stats.requests_active++;
    conn_set_phase(c, PHASE_ACTIVE);
    if (cors_dispatch(srv, q)) return;
    srv->on_request(&q->pub, srv->user);
}

/* Parses buffered input while no request is in flight, dispatching each complete one. A
 * handler answering synchronously lets the loop go on to the next pipelined request. */
static void conn_process(http_conn *c) {
    if (c->processing) return;
    c->processing = true;
    while (!c->closing && !c->active && c->phase != PHASE_LINGER && c->in_len > c->in_off) {
        size_t avail = c->in_len - c->in_off;
        size_t n = http_reader_feed(&c->reader, c->in + c->in_off, avail);
        c->in_off += n;
        http_req *req = http_reader_take(&c->reader);
        if (req) {
            conn_dispatch(c, REQ(req));
            continue;
        }
        if (c->reader.err_status) {
            conn_send_error(c, c->reader.err_status, c->reader.err_type, c->reader.err_msg);
            break;
        }
        if (n < avail) { /* not reached: the parser stops only for a request or an error */
            conn_send_error(c, 400, "BadRequestError", "malformed request");
            break;
        }
    }
    if (!c->closing && !c->active && c->phase != PHASE_LINGER) {
        struct http_req_impl *cur = c->reader.cur;
        if (!cur) {
            conn_set_phase(c, PHASE_IDLE);
        } else if (!cur->headers_done) {
            conn_set_phase(c, PHASE_HEADERS);
        } else {
            conn_set_phase(c, PHASE_BODY);
            if (cur->expect_continue && !cur->continue_sent) {
                static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
                uv_buf_t b = {.base = (char *)cont, .len = sizeof cont - 1};
                cur->continue_sent = true;
                conn_write(c, &b, 1, false);
            }
        }
        conn_read_start(c);
    }
    c->processing = false;
}

static void conn_on_read_end(http_conn *c, ssize_t err) {
    /* With a request in flight, EOF means the client is gone (as uvicorn treats it): its
     * on_close lets the engine drop the work. Otherwise flush what we owe, then close. */
    if (err != UV_EOF || c->active) {
        if (err != UV_EOF && err != UV_ECONNRESET)
            LOG_DEBUG("http: %s: read failed: %s", c->addr, uv_strerror((int)err));
        conn_close(c);
        return;
    }
    conn_read_stop(c);
    c->eof_seen = true;
    if (c->phase == PHASE_LINGER) {
        if (!c->shutting) conn_close(c);
        return;
    }
    conn_shutdown(c);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    http_conn *c = s->data;
    (void)buf;
    if (c->closing || nread == 0) return;
    if (nread < 0) {
        conn_on_read_end(c, nread);
        return;
    }
    if (c->phase == PHASE_LINGER) return; /* dropped: nothing more will be answered */
    if (c->ssl) {
        bool eof;
        if (!tls_on_read(c, buf->base, (size_t)nread, &eof)) return;
        conn_process(c);
        if (eof && !c->closing) conn_on_read_end(c, UV_EOF);
        return;
    }
    c->in_len += (size_t)nread;
    conn_process(c);
    /* Pipelined input beyond the request in flight: let TCP push back on the client. */
    if (!c->closing && c->active && c->in_len - c->in_off >= IN_PAUSE_BYTES) conn_read_stop(c);
}

/* A timer ran out while our own bytes are still queued: the client reads slowly or not at all.
 * Keep waiting while the queue shrinks. */
static bool conn_write_progressing(http_conn *c) {
    size_t queued = uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp);
    bool moving = queued > 0 && queued < c->last_queue;
    c->last_queue = queued;
    return moving;
}

static void on_timer(uv_timer_t *t) {
    http_conn *c = t->data;
    if (c->closing) return;
    unsigned idle = c->srv->opts.idle_timeout_ms;
    switch (c->phase) {
    case PHASE_IDLE:
        if (conn_write_progressing(c)) {
            uv_timer_start(&c->timer, on_timer, idle, 0);
            return;
        }
        LOG_DEBUG("http: %s: idle, closing", c->addr);
        conn_close(c);
        return;
    case PHASE_HEADERS:
        conn_send_error(c, 408, "RequestTimeoutError", "request headers not received in time");
        return;
    case PHASE_BODY:
        conn_send_error(c, 408, "RequestTimeoutError", "request body not received in time");
        return;
    case PHASE_RESUME:
        conn_process(c);
        return;
    case PHASE_LINGER:
        if (c->shutting && idle && conn_write_progressing(c)) {
            uv_timer_start(&c->timer, on_timer, idle, 0);
            return;
        }
        conn_close(c);
        return;
    case PHASE_ACTIVE:
    case PHASE_CLOSED:
        return;
    }
}

/* ---- connections per client address ---- */

static size_t client_hash(const uint8_t ip[16], size_t cap) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (int i = 0; i < 16; i++) h = (h ^ ip[i]) * 1099511628211ull;
    return (size_t)(h ^ (h >> 29)) & (cap - 1);
}

/* The slot of ip, or the empty slot where it would go. cap must be > used. */
static struct client_slot *client_find(struct client_slot *t, size_t cap, const uint8_t ip[16]) {
    size_t i = client_hash(ip, cap);
    while (t[i].count && memcmp(t[i].ip, ip, 16)) i = (i + 1) & (cap - 1);
    return &t[i];
}

/* The open-connection count of ip after adding one, or 0 when out of memory. */
static unsigned client_add(http_server *srv, const uint8_t ip[16]) {
    if ((srv->clients_used + 1) * 2 > srv->clients_cap) {
        size_t cap = srv->clients_cap ? srv->clients_cap * 2 : 64;
        struct client_slot *t = calloc(cap, sizeof *t);
        if (!t) return 0;
        for (size_t i = 0; i < srv->clients_cap; i++)
            if (srv->clients[i].count) *client_find(t, cap, srv->clients[i].ip) = srv->clients[i];
        free(srv->clients);
        srv->clients = t;
        srv->clients_cap = cap;
    }
    struct client_slot *e = client_find(srv->clients, srv->clients_cap, ip);
    if (!e->count) {
        memcpy(e->ip, ip, 16);
        srv->clients_used++;
    }
    return ++e->count;
}

/* Takes one connection of ip off; an emptied slot is removed by shifting back the entries of
 * its probe run, so lookups never need tombstones. */
static void client_remove(http_server *srv, const uint8_t ip[16]) {
    size_t cap = srv->clients_cap;
    struct client_slot *t = srv->clients;
    struct client_slot *e = client_find(t, cap, ip);
    if (!e->count || --e->count) return;
    srv->clients_used--;
    size_t hole = (size_t)(e - t);
    for (size_t j = (hole + 1) & (cap - 1); t[j].count; j = (j + 1) & (cap - 1)) {
        size_t home = client_hash(t[j].ip, cap);
        /* t[j] may move into the hole when its home is not cyclically in (hole, j] */
        bool stays = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
        if (stays) continue;
        t[hole] = t[j];
        t[j].count = 0;
        hole = j;
    }
}

static void conn_fill_addr(http_conn *c) {
    struct sockaddr_storage ss;
    int len = sizeof ss;
    char ip[INET6_ADDRSTRLEN];
    snprintf(c->addr, sizeof c->addr, "unknown");
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &len)) return;
    if (ss.ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)&ss;
        static const uint8_t v4mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
        memcpy(c->client_ip, v4mapped, 12);
        memcpy(c->client_ip + 12, &a->sin_addr, 4);
        if (!uv_ip4_name(a, ip, sizeof ip))
            snprintf(c->addr, sizeof c->addr, "%s:%u", ip, (unsigned)ntohs(a->sin_port));
    } else if (ss.ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)&ss;
        memcpy(c->client_ip, &a->sin6_addr, 16);
        if (!uv_ip6_name(a, ip, sizeof ip))
            snprintf(c->addr, sizeof c->addr, "[%s]:%u", ip, (unsigned)ntohs(a->sin6_port));
    }
}

static void on_connection(uv_stream_t *ls, int status) {
    http_server *srv = ls->data;
    if (status < 0) {
        LOG_WARN("http: accept failed: %s", uv_strerror(status));
        return;
    }
    http_conn *c = calloc(1, sizeof *c);
    if (!c) {
        LOG_ERROR("http: out of memory accepting a connection");
        return;
    }
    /* Neither init can fail for a plain TCP handle and a timer. */
    uv_tcp_init(srv->loop, &c->tcp);
    uv_timer_init(srv->loop, &c->timer);
    c->tcp.data = c;
    c->timer.data = c;
    c->shutdown_req.data = c;
    c->handles_open = 2;
    c->refs = 1;
    c->srv = srv;
    srv->refs++;
    c->next = srv->conns;
    if (srv->conns) srv->conns->prev = c;
    srv->conns = c;
    http_reader_init(&c->reader, srv->opts.max_header_bytes, srv->opts.max_body_bytes);
    snprintf(c->addr, sizeof c->addr, "unknown");

    int r = uv_accept(ls, (uv_stream_t *)&c->tcp);
    if (r) {
        LOG_WARN("http: accept failed: %s", uv_strerror(r));
        conn_close(c);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1); /* tokens leave as soon as they are written */
    conn_fill_addr(c);
    unsigned max = srv->opts.max_connections;
    unsigned per_client = srv->opts.max_connections_per_client;
    if (per_client) {
        unsigned n = client_add(srv, c->client_ip);
        if (!n) {
            LOG_ERROR("http: %s: out of memory counting its connections", c->addr);
            conn_close(c);
            return;
        }
        c->keyed = true;
        if (n > per_client) {
            c->rejected = true;
            srv->n_rejected_open++;
            srv->stats.connections_rejected_client++;
            LOG_DEBUG("http: %s: over %u connections from this client, answering 429", c->addr,
                      per_client);
            /* a flood: closed unanswered, as for max_connections */
            if (srv->n_rejected_open > (max ? max : 4096u) || srv->tls) {
                conn_close(c);
                return;
            }
            char msg[96];
            snprintf(msg, sizeof msg,
                     "too many connections from this client (at most %u open at once)", per_client);
            conn_send_error(c, 429, "TooManyRequestsError", msg);
            return;
        }
    }
    if (max && srv->n_open >= max) {
        c->rejected = true;
        srv->n_rejected_open++;
        srv->stats.connections_rejected++;
        LOG_DEBUG("http: %s: over %u connections, answering 503", c->addr, max);
        if (srv->n_rejected_open > max || srv->tls) { /* a flood: do not spend memory answering
                                                       * it; over TLS, no handshake either */
            conn_close(c);
            return;
        }
        conn_send_error(c, 503, "ServiceUnavailableError", "too many connections");
        return;
    }
    if (srv->tls) {
        c->ssl = SSL_new(srv->tls);
        c->rbio = BIO_new(BIO_s_mem());
        c->wbio = BIO_new(BIO_s_mem());
        if (!c->ssl || !c->rbio || !c->wbio) {
            LOG_ERROR("http: %s: out of memory starting TLS", c->addr);
            BIO_free(c->rbio);
            BIO_free(c->wbio);
            c->rbio = c->wbio = NULL;
            conn_close(c);
            return;
        }
        SSL_set_bio(c->ssl, c->rbio, c->wbio);
        SSL_set_accept_state(c->ssl);
    }
    c->counted = true;
    srv->n_open++;
    srv->stats.connections_open++;
    srv->stats.connections_total++;
    c->phase = PHASE_CLOSED; /* so that the next line arms the idle timer */
    conn_set_phase(c, PHASE_IDLE);
    conn_read_start(c);
}

/* ---------------------------------------------------------------------------------------------
 * Public API: server */

void http_server_opts_init(http_server_opts *opts) {
    memset(opts, 0, sizeof *opts);
    opts->max_header_bytes = 64 * 1024;
    opts->max_body_bytes = 32 * 1024 * 1024;
    opts->header_timeout_ms = 10 * 1000;
    opts->idle_timeout_ms = 60 * 1000;
    opts->max_connections = 4096;
    opts->max_write_queue_bytes = 16 * 1024 * 1024;
}

static void ignore_sigpipe(void) {
    struct sigaction sa;
    if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL) {
        sa.sa_handler = SIG_IGN;
        sigaction(SIGPIPE, &sa, NULL);
    }
}

/* The one OpenSSL error line for a file that would not load. */
static duet_status tls_fail(const char *what, const char *file) {
    unsigned long e = ERR_get_error();
    LOG_ERROR("http: TLS: cannot use %s %s: %s", what, file ? file : "(none)",
              e ? ERR_error_string(e, NULL) : "unknown error");
    ERR_clear_error();
    return DUET_ERR_INVALID;
}

/* A server context from the PEM files: TLS 1.2 and later, the certificate chain and its key
 * (checked to match), and client certificates when asked. */
static duet_status tls_context(const http_tls *t, SSL_CTX **ctx_p) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx) return tls_fail("a new context", NULL);
    duet_status st = DUET_OK;
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (SSL_CTX_use_certificate_chain_file(ctx, t->cert_file) != 1)
        st = tls_fail("the certificate file", t->cert_file);
    else if (SSL_CTX_use_PrivateKey_file(ctx, t->key_file, SSL_FILETYPE_PEM) != 1)
        st = tls_fail("the key file", t->key_file);
    else if (SSL_CTX_check_private_key(ctx) != 1)
        st = tls_fail("the key (it does not match the certificate)", t->key_file);
    else if (t->ca_file && SSL_CTX_load_verify_locations(ctx, t->ca_file, NULL) != 1)
        st = tls_fail("the CA file", t->ca_file);
    if (st != DUET_OK) {
        SSL_CTX_free(ctx);
        return st;
    }
    if (t->verify_client)
        SSL_CTX_set_verify(
            ctx, SSL_VERIFY_PEER | (t->verify_client >= 2 ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0),
            NULL);
    *ctx_p = ctx;
    return DUET_OK;
}

duet_status http_tls_check(const http_tls *tls) {
    SSL_CTX *ctx = NULL;
    if (!tls) return DUET_ERR_INVALID;
    duet_status st = tls_context(tls, &ctx);
    SSL_CTX_free(ctx);
    return st;
}

static void on_kick_closed(uv_handle_t *h) {
    srv_unref(h->data);
}

duet_status http_server_create(uv_loop_t *loop, const http_server_opts *opts,
                               http_handler_fn on_request, void *user, http_server **srv_p) {
    if (!loop || !on_request || !srv_p) {
        LOG_ERROR("http_server_create: loop, handler and srv_p are required");
        return DUET_ERR_INVALID;
    }
    http_server_opts o;
    if (opts)
        o = *opts;
    else
        http_server_opts_init(&o);
    if (o.max_header_bytes < 256 || o.max_header_bytes > HTTP_MAX_HEADER_SIZE) {
        LOG_ERROR("http: max_header_bytes %zu is outside 256..%d", o.max_header_bytes,
                  HTTP_MAX_HEADER_SIZE);
        return DUET_ERR_INVALID;
    }
    if (o.max_body_bytes == 0 || o.max_body_bytes > SIZE_MAX / 4) {
        LOG_ERROR("http: max_body_bytes %zu is out of range", o.max_body_bytes);
        return DUET_ERR_INVALID;
    }
    SSL_CTX *tls = NULL;
    if (o.tls && tls_context(o.tls, &tls) != DUET_OK) return DUET_ERR_INVALID;
    http_server *srv = calloc(1, sizeof *srv);
    if (!srv) {
        LOG_ERROR("http: out of memory creating a server");
        SSL_CTX_free(tls);
        return DUET_ERR_NO_MEMORY;
    }
    srv->tls = tls;
    ignore_sigpipe();
    srv->loop = loop;
    srv->opts = o;
    srv->on_request = on_request;
    srv->user = user;
    srv->refs = 2; /* the owner's and the kick timer's */
    uv_timer_init(loop, &srv->kick);
    srv->kick.data = srv;
    *srv_p = srv;
    return DUET_OK;
}

static void on_listener_closed(uv_handle_t *h) {
    http_server *srv = h->data;
    free(h);
    srv->listener = NULL;
    srv->listener_closing = false;
    srv_check_drained(srv);
    srv_unref(srv);
}

static void free_handle(uv_handle_t *h) {
    free(h);
}

duet_status http_server_listen(http_server *srv, const char *host, int port) {
    if (!srv || port < 0 || port > 65535) {
        LOG_ERROR("http: cannot listen on port %d", port);
        return DUET_ERR_INVALID;
    }
    if (srv->listener || srv->draining) {
        LOG_ERROR("http: server already listening or closed");
        return DUET_ERR_INVALID;
    }
    if (!host || !*host) host = "0.0.0.0";
    char name[256];
    size_t hl = strlen(host);
    if (hl >= sizeof name) {
        LOG_ERROR("http: host name too long");
        return DUET_ERR_INVALID;
    }
    if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']')
        snprintf(name, sizeof name, "%.*s", (int)(hl - 2), host + 1);
    else
        snprintf(name, sizeof name, "%s", host);
    char service[8];
    snprintf(service, sizeof service, "%d", port);

    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    uv_getaddrinfo_t gai;
    int r = uv_getaddrinfo(srv->loop, &gai, NULL, name, service, &hints); /* synchronous */
    if (r) {
        LOG_ERROR("http: cannot resolve %s: %s", name, uv_strerror(r));
        return DUET_ERR_NOT_FOUND;
    }
    int last = UV_EADDRNOTAVAIL;
    for (struct addrinfo *ai = gai.addrinfo; ai && !srv->listener; ai = ai->ai_next) {
        uv_tcp_t *t = malloc(sizeof *t);
        if (!t) {
            last = UV_ENOMEM;
            break;
        }
        uv_tcp_init(srv->loop, t);
        t->data = srv;
        r = uv_tcp_bind(t, ai->ai_addr, 0);
        if (!r) r = uv_listen((uv_stream_t *)t, HTTP_BACKLOG, on_connection);
        if (r) {
            last = r;
            uv_close((uv_handle_t *)t, free_handle);
            continue;
        }
        srv->listener = t;
        srv->refs++;
    }
    uv_freeaddrinfo(gai.addrinfo);
    if (!srv->listener) {
        LOG_ERROR("http: cannot listen on %s port %d: %s", name, port, uv_strerror(last));
        return from_uv(last);
    }
    struct sockaddr_storage ss;
    int len = sizeof ss;
    srv->port = port;
    if (uv_tcp_getsockname(srv->listener, (struct sockaddr *)&ss, &len) == 0)
        srv->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                   : ((struct sockaddr_in *)&ss)->sin_port);
    LOG_INFO("http: listening on %s port %d", name, srv->port);
    return DUET_OK;
}

int http_server_port(const http_server *srv) {
    return srv && srv->listener && !srv->listener_closing ? srv->port : 0;
}

static void srv_close_listener(http_server *srv) {
    if (!srv->listener || srv->listener_closing) return;
    srv->listener_closing = true;
    uv_close((uv_handle_t *)srv->listener, on_listener_closed);
}

static void on_kick(uv_timer_t *t) {
    srv_check_drained(t->data);
}

void http_server_close(http_server *srv, http_drained_fn cb, void *arg) {
    if (!srv || srv->destroyed) return;
    srv->draining = true;
    srv->drained_cb = cb;
    srv->drained_arg = arg;
    srv_close_listener(srv);
    /* Like uvicorn: what is not in the handler's hands is closed now; the rest ends after its
     * response, which says "Connection: close". */
    for (http_conn *c = srv->conns; c; c = c->next)
        if (!c->closing && !c->active && c->phase != PHASE_LINGER) conn_shutdown(c);
    uv_timer_start(&srv->kick, on_kick, 0, 0);
}

void http_server_destroy(http_server *srv) {
    if (!srv || srv->destroyed) return;
    srv->destroyed = true;
    srv->draining = true;
    srv->drained_cb = NULL;
    srv_close_listener(srv);
    for (http_conn *c = srv->conns; c; c = c->next) conn_close(c);
    uv_close((uv_handle_t *)&srv->kick, on_kick_closed);
    srv_unref(srv);
}

void http_server_get_stats(const http_server *srv, http_server_stats *stats_p) {
    if (srv && stats_p) *stats_p = srv->stats;
}

/* ---------------------------------------------------------------------------------------------
 * Public API: requests */

static void req_free(struct http_req_impl *q) {
    http_conn *c = q->conn;
    free(q->hbuf);
    free(q->offs);
    free(q->headers);
    free(q->body);
    free(q);
    if (c) {
        if (c->active == q) c->active = NULL;
        c->srv->stats.requests_active--;
        conn_unref(c);
    }
}

/* The response is queued (or the connection is gone): free q and go on with the connection. */
static void req_finish(struct http_req_impl *q, bool ok) {
    http_conn *c = q->conn;
    if (!c || q->gone || c->closing) {
        req_free(q);
        return;
    }
    bool keep = q->keep_alive && !c->srv->draining;
    if (ok) c->srv->stats.responses_total++;
    req_free(q); /* c stays: its handles hold a reference */
    if (!keep)
        conn_shutdown(c);
    else if (!c->processing)
        conn_set_phase(c, PHASE_RESUME); /* the next request is dispatched from the loop */
}

static bool req_live(const struct http_req_impl *q) {
    return q->conn && !q->gone && !q->conn->closing;
}

const char *http_req_header(const http_req *req, const char *name) {
    if (!req || !name) return NULL;
    for (size_t i = 0; i < req->num_headers; i++)
        if (!strcasecmp(req->headers[i].name, name)) return req->headers[i].value;
    return NULL;
}

duet_status http_req_on_close(http_req *req, http_close_fn cb, void *arg) {
    if (!req) return DUET_ERR_INVALID;
    struct http_req_impl *q = REQ(req);
    if (!req_live(q)) return DUET_ERR_IO;
    q->on_close = cb;
    q->on_close_arg = arg;
    return DUET_OK;
}

bool http_req_connected(const http_req *req) {
    return req && req_live(REQ(req));
}

size_t http_req_write_queue_size(const http_req *req) {
    if (!req || !req_live(REQ(req))) return 0;
    return uv_stream_get_write_queue_size((const uv_stream_t *)&REQ(req)->conn->tcp);
}

static const char g_internal_error[] =
    "{\"error\":{\"message\":\"invalid response\",\"type\":\"InternalServerError\",\"code\":500}}";

duet_status http_respond_headers(http_req *req, int status, const char *content_type,
                                 const http_header *extra, const void *body, size_t len) {
    if (!req) return DUET_ERR_INVALID;
    struct http_req_impl *q = REQ(req);
    http_conn *c = q->conn;
    if (!req_live(q)) {
        req_free(q);
        return DUET_ERR_IO;
    }
    if (q->state == REQ_STREAMING) {
        LOG_ERROR("http: %s %s: whole response after the stream started; closing", req->method,
                  req->path);
        conn_close(c);
        req_free(q);
        return DUET_ERR_INVALID;
    }
    duet_status bad = DUET_OK;
    if (status < 200 || status > 599 || (content_type && !http_value_valid(content_type)) ||
        !valid_extra(extra) || (len && !body)) {
        LOG_ERROR("http: %s %s: invalid response (status %d, or a header); answering 500",
                  req->method, req->path, status);
        status = 500;
        content_type = "application/json";
        extra = NULL;
        body = g_internal_error;
        len = sizeof g_internal_error - 1;
        bad = DUET_ERR_INVALID;
    }
    bool no_body = status == 204 || status == 304;
    sbuf head;
    sb_init(&head);
    build_head(&head, c->srv, q, status, content_type, extra, no_body ? -1 : (long long)len, false,
               q->keep_alive && !c->srv->draining, req->version_minor == 0);
    duet_status st = DUET_ERR_NO_MEMORY;
    if (head.oom) {
        LOG_ERROR("http: out of memory building a response");
        conn_close(c);
    } else {
        uv_buf_t bufs[2] = {{.base = head.p, .len = head.len}, {.base = (char *)body, .len = len}};
        st = conn_write(c, bufs, q->head || no_body || !len ? 1 : 2, false);
    }
    sb_free(&head);
    req_finish(q, st == DUET_OK);
    return st ? st : bad;
}

duet_status http_respond(http_req *req, int status, const char *content_type, const void *body,
                         size_t len) {
    return http_respond_headers(req, status, content_type, NULL, body, len);
}

duet_status http_respond_error(http_req *req, int status, const char *type, const char *message) {
    size_t len = 0;
    char *body = http_error_body(status, type, message, &len);
    if (!body) {
        LOG_ERROR("http: out of memory building an error body");
        http_req_release(req);
        return DUET_ERR_NO_MEMORY;
    }
    duet_status st = http_respond(req, status, "application/json", body, len);
    cJSON_free(body);
    return st;
}

duet_status http_stream_start(http_req *req, int status, const char *content_type,
                              const http_header *extra) {
    if (!req) return DUET_ERR_INVALID;
    struct http_req_impl *q = REQ(req);
    if (!req_live(q)) return DUET_ERR_IO;
    if (q->state != REQ_HANDLER || status < 200 || status > 599 || status == 204 || status == 304 ||
        (content_type && !http_value_valid(content_type)) || !valid_extra(extra)) {
        LOG_ERROR("http: %s %s: invalid stream start (status %d, a header, or started twice)",
                  req->method, req->path, status);
        return DUET_ERR_INVALID;
    }
    http_conn *c = q->conn;
    /* HTTP/1.0 has no chunked coding: the end of the connection ends the body. */
    q->chunked_out = req->version_minor >= 1;
    if (!q->chunked_out) q->keep_alive = false;
    sbuf head;
    sb_init(&head);
    build_head(&head, c->srv, q, status, content_type, extra, -1, q->chunked_out,
               q->keep_alive && !c->srv->draining, req->version_minor == 0);
    duet_status st = DUET_ERR_NO_MEMORY;
    if (head.oom) {
        LOG_ERROR("http: out of memory building a response");
    } else {
        uv_buf_t b = {.base = head.p, .len = head.len};
        st = conn_write(c, &b, 1, false);
        if (st == DUET_OK) q->state = REQ_STREAMING;
    }
    sb_free(&head);
    return st;
}

duet_status http_stream_write(http_req *req, const void *data, size_t len) {
    if (!req) return DUET_ERR_INVALID;
    struct http_req_impl *q = REQ(req);
    if (!req_live(q)) return DUET_ERR_IO;
    if (q->state != REQ_STREAMING) {
        LOG_ERROR("http: %s %s: stream write before http_stream_start", req->method, req->path);
        return DUET_ERR_INVALID;
    }
    if (len == 0 || q->head) return DUET_OK; /* an empty chunk would end the body */
    if (!data) return DUET_ERR_INVALID;
    if (!q->chunked_out) {
        uv_buf_t b = {.base = (char *)data, .len = len};
        return conn_write(q->conn, &b, 1, true);
    }
    char size_line[24];
    int n = snprintf(size_line, sizeof size_line, "%zx\r\n", len);
    uv_buf_t bufs[3] = {{.base = size_line, .len = (size_t)n},
                        {.base = (char *)data, .len = len},
                        {.base = (char *)"\r\n", .len = 2}};
    return conn_write(q->conn, bufs, 3, true);
}

duet_status http_stream_sse(http_req *req, const char *data) {
    if (!req) return DUET_ERR_INVALID;
    if (!http_req_connected(req)) return DUET_ERR_IO;
    if (!data) data = "";
    /* Any of CRLF, LF, CR ends a line in SSE: each line becomes its own data field. */
    sbuf b;
    sb_init(&b);
    const char *p = data;
    for (;;) {
        size_t n = strcspn(p, "\r\n");
        sb_add(&b, "data: ", 6);
        sb_add(&b, p, n);
        sb_add(&b, "\n", 1);
        p += n;
        if (!*p) break;
        p += (p[0] == '\r' && p[1] == '\n') ? 2 : 1;
    }
    sb_add(&b, "\n", 1);
    duet_status st = DUET_ERR_NO_MEMORY;
    if (b.oom)
        LOG_ERROR("http: out of memory building an event");
    else
        st = http_stream_write(req, b.p, b.len);
    sb_free(&b);
    return st;
}

duet_status http_stream_end(http_req *req) {
    if (!req) return DUET_ERR_INVALID;
    struct http_req_impl *q = REQ(req);
    if (!req_live(q)) {
        req_free(q);
        return DUET_ERR_IO;
    }
    if (q->state != REQ_STREAMING) {
        LOG_ERROR("http: %s %s: stream end before http_stream_start; closing", req->method,
                  req->path);
        conn_close(q->conn);
        req_free(q);
        return DUET_ERR_INVALID;
    }
    duet_status st = DUET_OK;
    if (q->chunked_out && !q->head) {
        uv_buf_t b = {.base = (char *)"0\r\n\r\n", .len = 5};
        st = conn_write(q->conn, &b, 1, false);
    }
    req_finish(q, st == DUET_OK);
    return st;
}

void http_req_release(http_req *req) {
    if (!req) return;
    struct http_req_impl *q = REQ(req);
    if (req_live(q)) {
        q->on_close = NULL; /* the handler knows: it is the one letting go */
        conn_close(q->conn);
    }
    req_free(q);
}
