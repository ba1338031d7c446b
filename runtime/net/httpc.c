/* HTTP/1.1 client on libuv; see httpc.h. A connection carries one request at a time. Every
 * failure closes the connection and reports from its close callback, so on_end always comes
 * from the loop after the socket is gone, and the "stale pooled connection" retry happens in
 * one place. A request is freed right after on_end or at httpc_cancel; writes own copies of
 * their bytes, so nothing a pending write touches is freed under it. */
#include "net/httpc.h"
#include "net/httpc-impl.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "base/log.h"

enum {
    READ_BUF = 64 * 1024,
    HEADER_OVERHEAD = 4, /* ": " and CRLF, counted per header against the limit */
};

/* ---------------------------------------------------------------------------------------------
 * The response parser */

typedef enum hp_last { HP_NONE = 0, HP_FIELD, HP_VALUE } hp_last;

static int parse_fail(httpc_parse *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int parse_fail(httpc_parse *p, const char *fmt, ...) {
    if (!p->failed) {
        p->failed = true;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(p->err, sizeof p->err, fmt, ap);
        va_end(ap);
    }
    return -1;
}

static void parse_reset_head(httpc_parse *p) {
    p->hlen = 0;
    p->noffs = 0;
    p->header_bytes = 0;
    p->last = HP_NONE;
    p->head_done = false;
    free(p->headers);
    p->headers = NULL;
    memset(&p->resp, 0, sizeof p->resp);
}

static bool hp_append(httpc_parse *p, const char *at, size_t n) {
    if (p->hlen + n + 1 > p->hcap) {
        size_t cap = p->hcap ? p->hcap : 512;
        while (cap < p->hlen + n + 1) cap *= 2;
        char *nb = realloc(p->hbuf, cap);
        if (!nb) return false;
        p->hbuf = nb;
        p->hcap = cap;
    }
    memcpy(p->hbuf + p->hlen, at, n);
    p->hlen += n;
    return true;
}

static bool hp_push_off(httpc_parse *p, size_t off) {
    if (p->noffs == p->offs_cap) {
        size_t cap = p->offs_cap ? p->offs_cap * 2 : 32;
        size_t *no = realloc(p->offs, cap * sizeof *no);
        if (!no) return false;
        p->offs = no;
        p->offs_cap = cap;
    }
    p->offs[p->noffs++] = off;
    return true;
}

static int hp_count(httpc_parse *p, size_t n) {
    p->header_bytes += n;
    if (p->header_bytes > p->max_header_bytes)
        return parse_fail(p, "response headers larger than %zu bytes", p->max_header_bytes);
    return 0;
}

static int hp_on_message_begin(http_parser *hp) {
    parse_reset_head(hp->data);
    return 0;
}

static int hp_on_status(http_parser *hp, const char *at, size_t n) {
    (void)at;
    return hp_count(hp->data, n);
}

/* A piece of a name (field) or value; a change of kind starts a new string. */
static int hp_on_piece(httpc_parse *p, hp_last kind, const char *at, size_t n) {
    if (p->head_done) return hp_count(p, n); /* trailers: counted, not kept */
    if (p->last != (int)kind) {
        if (kind == HP_FIELD && hp_count(p, HEADER_OVERHEAD)) return -1;
        if ((p->hlen && !hp_append(p, "", 1)) || !hp_push_off(p, p->hlen))
            return parse_fail(p, "out of memory");
        p->last = kind;
    }
    if (hp_count(p, n)) return -1;
    return hp_append(p, at, n) ? 0 : parse_fail(p, "out of memory");
}

static int hp_on_header_field(http_parser *hp, const char *at, size_t n) {
    return hp_on_piece(hp->data, HP_FIELD, at, n);
}

static int hp_on_header_value(http_parser *hp, const char *at, size_t n) {
    return hp_on_piece(hp->data, HP_VALUE, at, n);
}

static int hp_on_headers_complete(http_parser *hp) {
    httpc_parse *p = hp->data;
    /* A name without a value (not reached with libhttp-parser, which always sends one). */
    if (p->last == HP_FIELD && !hp_push_off(p, p->hlen)) return parse_fail(p, "out of memory");
    if (!hp_append(p, "", 1)) return parse_fail(p, "out of memory");
    p->head_done = true;
    int status = (int)hp->status_code;
    if (status < 100) return parse_fail(p, "invalid status %d", status);
    if (status < 200) {
        /* Interim (100 Continue, 103 Early Hints): the real head follows. We never ask for an
         * upgrade, so 101 is an error. */
        if (status == 101) return parse_fail(p, "unexpected 101 Switching Protocols");
        return 1; /* no body, whatever Content-Length says */
    }
    if (hp->http_major != 1)
        return parse_fail(p, "HTTP/%u.%u response", hp->http_major, hp->http_minor);
    size_t nh = p->noffs / 2;
    p->headers = calloc(nh ? nh : 1, sizeof *p->headers);
    if (!p->headers) return parse_fail(p, "out of memory");
    for (size_t i = 0; i < nh; i++) {
        char *value = p->hbuf + p->offs[2 * i + 1];
        size_t vl = strlen(value);
        while (vl > 0 && (value[vl - 1] == ' ' || value[vl - 1] == '\t')) value[--vl] = '\0';
        p->headers[i].name = p->hbuf + p->offs[2 * i];
        p->headers[i].value = value;
    }
    p->resp.status = status;
    p->resp.version_minor = hp->http_minor;
    p->resp.headers = p->headers;
    p->resp.num_headers = nh;
    if (p->on_head && p->on_head(p)) return parse_fail(p, "stopped by the caller");
    /* 1 tells libhttp-parser that this response has no body. */
    return p->head_request ? 1 : 0;
}

static int hp_on_body(http_parser *hp, const char *at, size_t n) {
    httpc_parse *p = hp->data;
    if (p->on_body && p->on_body(p, at, n)) return parse_fail(p, "stopped by the caller");
    return 0;
}

static int hp_on_message_complete(http_parser *hp) {
    httpc_parse *p = hp->data;
    if (hp->status_code >= 100 && hp->status_code < 200) return 0; /* interim: go on */
    p->complete = true;
    p->keep_alive = http_should_keep_alive(hp);
    http_parser_pause(hp, 1); /* bytes after the response are not ours to parse */
    return 0;
}

static const http_parser_settings g_parse_settings = {
    .on_message_begin = hp_on_message_begin,
    .on_status = hp_on_status,
    .on_header_field = hp_on_header_field,
    .on_header_value = hp_on_header_value,
    .on_headers_complete = hp_on_headers_complete,
    .on_body = hp_on_body,
    .on_message_complete = hp_on_message_complete,
};

void httpc_parse_init(httpc_parse *p, size_t max_header_bytes, bool head_request) {
    memset(p, 0, sizeof *p);
    http_parser_init(&p->parser, HTTP_RESPONSE);
    p->parser.data = p;
    p->max_header_bytes = max_header_bytes;
    p->head_request = head_request;
}

void httpc_parse_cleanup(httpc_parse *p) {
    free(p->hbuf);
    free(p->offs);
    free(p->headers);
    p->hbuf = NULL;
    p->offs = NULL;
    p->headers = NULL;
    p->hcap = p->offs_cap = 0;
}

size_t httpc_parse_feed(httpc_parse *p, const char *data, size_t len) {
    if (p->failed || p->complete) return 0;
    size_t n = http_parser_execute(&p->parser, &g_parse_settings, data, len);
    enum http_errno e = HTTP_PARSER_ERRNO(&p->parser);
    if (e == HPE_PAUSED) {
        http_parser_pause(&p->parser, 0);
    } else if (e != HPE_OK) {
        parse_fail(p, "malformed response: %s", http_errno_description(e));
    } else if (len == 0 && !p->complete) {
        parse_fail(p, "connection closed before the response was complete");
    }
    return n < len ? n : len;
}

/* ---------------------------------------------------------------------------------------------
 * Pools, connections, requests */

typedef enum conn_state {
    CONN_CONNECTING = 0,
    CONN_WAITING, /* request written (or being written), no response byte yet */
    CONN_BODY,    /* response begun */
    CONN_IDLE,    /* in the pool */
    CONN_CLOSED,
} conn_state;

typedef struct hc_conn hc_conn;

struct httpc_pool {
    uv_loop_t *loop;
    httpc_pool_opts opts;
    struct sockaddr_storage addr;
    char name[300]; /* host:port for the Host header and logs */
    char host[256]; /* a name to look up again (httpc_pool_refresh), or "" for an address */
    int port;
    uv_getaddrinfo_t lookup; /* in flight while looking_up */
    bool looking_up;
    hc_conn *idle; /* most recently used first */
    unsigned n_idle;
    int refs; /* the owner's, one per connection */
    bool destroyed;
    httpc_pool_stats stats;
};

struct hc_conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_connect_t connect_req;
    httpc_pool *pool;     /* holds a reference */
    hc_conn *prev, *next; /* in pool->idle */
    httpc_req *req;       /* the request it carries; NULL while idle */
    httpc_parse parse;
    conn_state state;
    duet_status end_status; /* why it was closed, for the request still on it */
    char why[128];          /* the same in words */
    int handles_open;
    bool closing;
    bool in_parse; /* inside httpc_parse_feed: a cancel must not free req yet */
    bool reading;  /* uv_read_start in effect */
    bool reused;   /* carried a response before */
    bool idle_listed;
    char rbuf[READ_BUF];
};

struct httpc_req {
    httpc_pool *pool;
    hc_conn *conn;
    httpc_callbacks cb;
    void *arg;
    char *wire; /* the request's bytes, kept until a response byte proves they arrived */
    size_t wire_len;
    unsigned first_byte_ms, idle_ms;
    bool head_request;
    bool got_bytes;
    bool retried;
    bool canceled;
    bool ending; /* inside on_end */
    bool paused;
    char why[128]; /* why it failed, for httpc_req_reason */
};

typedef struct hc_wbuf {
    uv_write_t req; /* first: the uv_write_t * converts back */
    hc_conn *conn;
    char data[];
} hc_wbuf;

static void conn_close(hc_conn *c, duet_status st);
static hc_conn *conn_new(void);
static void conn_start(httpc_pool *pool, httpc_req *r, hc_conn *c);

void httpc_pool_opts_init(httpc_pool_opts *opts) {
    opts->connect_timeout_ms = 5000;
    opts->keepalive_ms = 30000;
    opts->max_idle = 256;
    opts->max_header_bytes = 64 * 1024;
}

static void pool_unref(httpc_pool *pool) {
    if (--pool->refs == 0) free(pool);
}

static void idle_remove(hc_conn *c) {
    if (!c->idle_listed) return;
    httpc_pool *pool = c->pool;
    if (c->prev)
        c->prev->next = c->next;
    else
        pool->idle = c->next;
    if (c->next) c->next->prev = c->prev;
    c->prev = c->next = NULL;
    c->idle_listed = false;
    pool->n_idle--;
}

static void req_free(httpc_req *r) {
    free(r->wire);
    free(r);
}

static void req_end(httpc_req *r, duet_status st, const char *why) {
    snprintf(r->why, sizeof r->why, "%s",
             st == DUET_OK ? ""
             : why && *why ? why
                           : duet_strerror(st));
    r->pool->stats.active--;
    r->conn = NULL;
    r->ending = true;
    r->cb.on_end(r, st, r->arg);
    req_free(r);
}

static void conn_handle_closed(uv_handle_t *h) {
    hc_conn *c = h->data;
    if (--c->handles_open > 0) return;
    httpc_pool *pool = c->pool;
    httpc_req *r = c->req;
    c->req = NULL;
    httpc_parse_cleanup(&c->parse);
    if (r) {
        /* A pooled connection the server had closed: the request never reached it, so sending
         * it again is safe (what browsers and curl do). */
        if (c->reused && !r->got_bytes && !r->retried && c->end_status == DUET_ERR_PEER &&
            !pool->destroyed && r->wire) {
            r->retried = true;
            pool->stats.stale_retries++;
            hc_conn *fresh = conn_new();
            if (fresh)
                conn_start(pool, r, fresh);
            else
                req_end(r, DUET_ERR_NO_MEMORY, NULL);
        } else {
            req_end(r, c->end_status, c->why);
        }
    }
    free(c);
    pool_unref(pool);
}

/* Closes the connection; a request still on it ends with st from the close callback. */
static void conn_close(hc_conn *c, duet_status st) {
    if (c->closing) return;
    c->closing = true;
    c->end_status = st;
    c->state = CONN_CLOSED;
    idle_remove(c);
    uv_close((uv_handle_t *)&c->timer, conn_handle_closed);
    uv_close((uv_handle_t *)&c->tcp, conn_handle_closed);
}

static void conn_fail(hc_conn *c, duet_status st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Closes with an error, in words for the request's owner (who decides whether to log it). */
static void conn_fail(hc_conn *c, duet_status st, const char *fmt, ...) {
    if (c->closing) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->why, sizeof c->why, fmt, ap);
    va_end(ap);
    LOG_DEBUG("httpc: %s: %s", c->pool->name, c->why);
    conn_close(c, st);
}

static void on_conn_timer(uv_timer_t *t) {
    hc_conn *c = t->data;
    if (c->closing) return;
    if (c->state == CONN_IDLE) {
        conn_close(c, DUET_OK);
        return;
    }
    static const char *what[] = {"connect timed out", "no answer in time",
                                 "answer stalled (no data in time)"};
    conn_fail(c, DUET_ERR_TIMEOUT, "%s", what[c->state <= CONN_BODY ? c->state : 2]);
}

static void conn_arm(hc_conn *c, unsigned ms) {
    uv_timer_stop(&c->timer);
    if (ms) uv_timer_start(&c->timer, on_conn_timer, ms, 0);
}

static void on_write(uv_write_t *w, int status) {
    hc_wbuf *b = (hc_wbuf *)w;
    hc_conn *c = b->conn; /* alive: write callbacks run before close callbacks */
    free(b);
    if (status < 0 && !c->closing) {
        conn_fail(c, DUET_ERR_PEER, "write failed: %s", uv_strerror(status));
    }
}

/* Sends the request's bytes: directly when the socket takes them, the rest copied. */
static void conn_write_req(hc_conn *c) {
    httpc_req *r = c->req;
    uv_stream_t *s = (uv_stream_t *)&c->tcp;
    uv_buf_t buf = {.base = r->wire, .len = r->wire_len};
    size_t sent = 0;
    int n = uv_try_write(s, &buf, 1);
    if (n >= 0) {
        sent = (size_t)n;
    } else if (n != UV_EAGAIN) {
        conn_fail(c, DUET_ERR_PEER, "write failed: %s", uv_strerror(n));
        return;
    }
    if (sent == r->wire_len) return;
    hc_wbuf *b = malloc(sizeof *b + (r->wire_len - sent));
    if (!b) {
        LOG_ERROR("httpc: out of memory writing a request");
        conn_fail(c, DUET_ERR_NO_MEMORY, "out of memory");
        return;
    }
    b->conn = c;
    memcpy(b->data, r->wire + sent, r->wire_len - sent);
    uv_buf_t rest = {.base = b->data, .len = r->wire_len - sent};
    int e = uv_write(&b->req, s, &rest, 1, on_write);
    if (e) {
        free(b);
        conn_fail(c, DUET_ERR_PEER, "write failed: %s", uv_strerror(e));
    }
}

static int conn_on_head(httpc_parse *p) {
    hc_conn *c = p->data;
    httpc_req *r = c->req;
    if (!r || r->canceled) return -1;
    if (r->cb.on_head) r->cb.on_head(r, &p->resp, r->arg);
    return r->canceled ? -1 : 0;
}

static int conn_on_body(httpc_parse *p, const char *at, size_t n) {
    hc_conn *c = p->data;
    httpc_req *r = c->req;
    if (!r || r->canceled) return -1;
    if (r->cb.on_body) r->cb.on_body(r, at, n, r->arg);
    return r->canceled ? -1 : 0;
}

static void conn_begin_parse(hc_conn *c, httpc_req *r) {
    httpc_parse_init(&c->parse, c->pool->opts.max_header_bytes, r->head_request);
    c->parse.on_head = conn_on_head;
    c->parse.on_body = conn_on_body;
    c->parse.data = c;
}

static void conn_to_idle(hc_conn *c) {
    httpc_pool *pool = c->pool;
    c->state = CONN_IDLE;
    c->reused = true;
    httpc_parse_cleanup(&c->parse);
    if (pool->n_idle >= pool->opts.max_idle) {
        conn_close(c, DUET_OK);
        return;
    }
    c->next = pool->idle;
    if (pool->idle) pool->idle->prev = c;
    pool->idle = c;
    c->idle_listed = true;
    pool->n_idle++;
    conn_arm(c, pool->opts.keepalive_ms);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    hc_conn *c = h->data;
    (void)suggested;
    buf->base = c->rbuf;
    buf->len = sizeof c->rbuf;
}

/* Feeds bytes (len 0: the end of the connection) and acts on what the parser found. */
static void conn_feed(hc_conn *c, const char *data, size_t len) {
    httpc_req *r = c->req;
    c->in_parse = true;
    size_t used = httpc_parse_feed(&c->parse, data, len);
    c->in_parse = false;
    if (r->canceled) { /* from inside a callback: now it can go */
        c->req = NULL;
        req_free(r);
        return;
    }
    if (c->parse.complete) {
        bool reuse =
            c->parse.keep_alive && used == len && len > 0 && !c->pool->destroyed && !c->closing;
        c->req = NULL;
        if (reuse)
            conn_to_idle(c);
        else
            conn_close(c, DUET_OK);
        req_end(r, DUET_OK, NULL);
        return;
    }
    if (c->parse.failed) {
        conn_fail(c, DUET_ERR_PEER, "%s", c->parse.err);
    }
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    hc_conn *c = s->data;
    (void)buf;
    if (c->closing || nread == 0) return;
    httpc_req *r = c->req;
    if (!r) { /* idle: the server closed it, or sent bytes nobody asked for */
        conn_close(c, DUET_OK);
        return;
    }
    if (nread < 0) {
        if (nread == UV_EOF && r->got_bytes) {
            conn_feed(c, NULL, 0); /* completes a close-delimited body, else fails */
            if (c->req) conn_fail(c, DUET_ERR_PEER, "closed before the answer was complete");
            return;
        }
        if (nread == UV_EOF)
            conn_fail(c, DUET_ERR_PEER, "closed by the server before answering");
        else
            conn_fail(c, DUET_ERR_PEER, "read failed: %s", uv_strerror((int)nread));
        return;
    }
    if (!r->got_bytes) {
        r->got_bytes = true;
        free(r->wire); /* it arrived: no resend from here on */
        r->wire = NULL;
        c->state = CONN_BODY;
    }
    conn_arm(c, r->idle_ms);
    conn_feed(c, c->rbuf, (size_t)nread);
}

/* Starts or stops reading; false when starting failed (the connection is then closed). */
static bool conn_set_reading(hc_conn *c, bool on) {
    if (c->reading == on || c->closing) return true;
    if (!on) {
        uv_read_stop((uv_stream_t *)&c->tcp);
        c->reading = false;
        return true;
    }
    int e = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    if (e) {
        conn_fail(c, DUET_ERR_PEER, "read failed: %s", uv_strerror(e));
        return false;
    }
    c->reading = true;
    return true;
}

static void conn_send_on(hc_conn *c) {
    httpc_req *r = c->req;
    c->state = CONN_WAITING;
    conn_begin_parse(c, r);
    /* An idle connection keeps reading to notice the server closing it. */
    if (!conn_set_reading(c, !r->paused)) return;
    conn_arm(c, r->first_byte_ms);
    conn_write_req(c);
}

static void on_connect(uv_connect_t *cr, int status) {
    hc_conn *c = cr->data;
    if (c->closing) return;
    if (status < 0) {
        conn_fail(c, DUET_ERR_PEER, "connect failed: %s", uv_strerror(status));
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    conn_send_on(c);
}

static hc_conn *conn_new(void) {
    hc_conn *c = calloc(1, sizeof *c);
    if (!c) LOG_ERROR("httpc: out of memory opening a connection");
    return c;
}

/* Opens connection c (from conn_new) for r. Failures end r from the close callback. */
static void conn_start(httpc_pool *pool, httpc_req *r, hc_conn *c) {
    uv_tcp_init(pool->loop, &c->tcp);
    uv_timer_init(pool->loop, &c->timer);
    c->tcp.data = c;
    c->timer.data = c;
    c->connect_req.data = c;
    c->handles_open = 2;
    c->pool = pool;
    pool->refs++;
    c->req = r;
    r->conn = c;
    pool->stats.connects++;
    c->state = CONN_CONNECTING;
    int e =
        uv_tcp_connect(&c->connect_req, &c->tcp, (const struct sockaddr *)&pool->addr, on_connect);
    if (e) {
        conn_fail(c, DUET_ERR_PEER, "connect failed: %s", uv_strerror(e));
        return;
    }
    conn_arm(c, pool->opts.connect_timeout_ms);
}

/* Resolves host once, IPv4 first: "localhost" usually means the IPv4 listener. */
static duet_status resolve(const char *host, int port, struct sockaddr_storage *ss) {
    memset(ss, 0, sizeof *ss);
    if (uv_ip4_addr(host, port, (struct sockaddr_in *)ss) == 0) return DUET_OK;
    if (uv_ip6_addr(host, port, (struct sockaddr_in6 *)ss) == 0) return DUET_OK;
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int e = getaddrinfo(host, NULL, &hints, &res);
    if (e || !res) {
        LOG_ERROR("httpc: cannot resolve %s: %s", host, gai_strerror(e));
        return DUET_ERR_NOT_FOUND;
    }
    const struct addrinfo *pick = res;
    for (const struct addrinfo *ai = res; ai; ai = ai->ai_next)
        if (ai->ai_family == AF_INET) {
            pick = ai;
            break;
        }
    memcpy(ss, pick->ai_addr, pick->ai_addrlen);
    if (ss->ss_family == AF_INET)
        ((struct sockaddr_in *)ss)->sin_port = htons((uint16_t)port);
    else
        ((struct sockaddr_in6 *)ss)->sin6_port = htons((uint16_t)port);
    freeaddrinfo(res);
    return DUET_OK;
}

duet_status httpc_pool_create(uv_loop_t *loop, const char *host, int port,
                              const httpc_pool_opts *opts, httpc_pool **pool_p) {
    if (!loop || !host || !*host || port <= 0 || port > 65535 || !pool_p) {
        LOG_ERROR("httpc: invalid pool arguments (host %s, port %d)", host ? host : "(null)", port);
        return DUET_ERR_INVALID;
    }
    char bare[256];
    size_t hl = strlen(host);
    if (hl >= sizeof bare) {
        LOG_ERROR("httpc: host name too long");
        return DUET_ERR_INVALID;
    }
    if (hl >= 2 && host[0] == '[' && host[hl - 1] == ']')
        snprintf(bare, sizeof bare, "%.*s", (int)(hl - 2), host + 1);
    else
        snprintf(bare, sizeof bare, "%s", host);
    httpc_pool *pool = calloc(1, sizeof *pool);
    if (!pool) {
        LOG_ERROR("httpc: out of memory creating a pool");
        return DUET_ERR_NO_MEMORY;
    }
    if (opts)
        pool->opts = *opts;
    else
        httpc_pool_opts_init(&pool->opts);
    if (pool->opts.max_header_bytes < 256 || pool->opts.max_header_bytes > HTTP_MAX_HEADER_SIZE)
        pool->opts.max_header_bytes = 64 * 1024;
    duet_status st = resolve(bare, port, &pool->addr);
    if (st) {
        free(pool);
        return st;
    }
    struct sockaddr_in6 probe6;
    struct sockaddr_in probe4;
    if (uv_ip4_addr(bare, port, &probe4) != 0 && uv_ip6_addr(bare, port, &probe6) != 0)
        snprintf(pool->host, sizeof pool->host, "%s", bare);
    pool->port = port;
    if (strchr(bare, ':'))
        snprintf(pool->name, sizeof pool->name, "[%s]:%d", bare, port);
    else
        snprintf(pool->name, sizeof pool->name, "%s:%d", bare, port);
    pool->loop = loop;
    pool->refs = 1;
    *pool_p = pool;
    return DUET_OK;
}

static void on_lookup(uv_getaddrinfo_t *req, int status, struct addrinfo *res) {
    httpc_pool *pool = req->data;
    pool->looking_up = false;
    if (!pool->destroyed && status == 0 && res) {
        const struct addrinfo *pick = res;
        for (const struct addrinfo *ai = res; ai; ai = ai->ai_next)
            if (ai->ai_family == AF_INET) {
                pick = ai;
                break;
            }
        struct sockaddr_storage ss;
        memset(&ss, 0, sizeof ss);
        memcpy(&ss, pick->ai_addr, pick->ai_addrlen);
        if (ss.ss_family == AF_INET)
            ((struct sockaddr_in *)&ss)->sin_port = htons((uint16_t)pool->port);
        else
            ((struct sockaddr_in6 *)&ss)->sin6_port = htons((uint16_t)pool->port);
        if (memcmp(&ss, &pool->addr, sizeof ss) != 0) {
            char ip[INET6_ADDRSTRLEN] = "?";
            if (ss.ss_family == AF_INET)
                uv_ip4_name((const struct sockaddr_in *)&ss, ip, sizeof ip);
            else
                uv_ip6_name((const struct sockaddr_in6 *)&ss, ip, sizeof ip);
            LOG_INFO("httpc: %s now resolves to %s", pool->name, ip);
            pool->addr = ss;
            /* pooled connections go to the old address: new requests use the new one */
            while (pool->idle) conn_close(pool->idle, DUET_OK);
        }
    } else if (!pool->destroyed) {
        LOG_DEBUG("httpc: looking up %s again failed: %s", pool->host,
                  status ? uv_strerror(status) : "no address");
    }
    if (res) uv_freeaddrinfo(res);
    pool_unref(pool);
}

void httpc_pool_refresh(httpc_pool *pool) {
    if (!pool || pool->destroyed || pool->looking_up || !pool->host[0]) return;
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    pool->lookup.data = pool;
    if (uv_getaddrinfo(pool->loop, &pool->lookup, on_lookup, pool->host, NULL, &hints) != 0) return;
    pool->looking_up = true;
    pool->refs++;
}

void httpc_pool_destroy(httpc_pool *pool) {
    if (!pool || pool->destroyed) return;
    pool->destroyed = true;
    while (pool->idle) conn_close(pool->idle, DUET_OK);
    /* Busy connections hold references: they finish their requests, then close. */
    pool_unref(pool);
}

void httpc_pool_get_stats(const httpc_pool *pool, httpc_pool_stats *stats_p) {
    if (!pool || !stats_p) return;
    *stats_p = pool->stats;
    stats_p->idle = pool->n_idle;
}

const char *httpc_pool_name(const httpc_pool *pool) {
    return pool ? pool->name : "";
}

static bool path_ok(const char *s) {
    if (!s || s[0] != '/') return false;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if (*p <= 0x20 || *p == 0x7f) return false;
    return true;
}

static bool reserved_header(const char *name) {
    return !strcasecmp(name, "host") || !strcasecmp(name, "content-length") ||
           !strcasecmp(name, "transfer-encoding") || !strcasecmp(name, "connection");
}

/* The request line, headers and body in one buffer. */
static char *build_wire(const httpc_pool *pool, const httpc_request *rq, size_t *len_p) {
    bool has_len = rq->body_len > 0 || !strcmp(rq->method, "POST") || !strcmp(rq->method, "PUT");
    size_t n = strlen(rq->method) + strlen(rq->path) + strlen(pool->name) + 64 + rq->body_len;
    for (const http_header *h = rq->headers; h && h->name; h++)
        n += strlen(h->name) + strlen(h->value) + 4;
    char *w = malloc(n);
    if (!w) return NULL;
    size_t off =
        (size_t)snprintf(w, n, "%s %s HTTP/1.1\r\nHost: %s\r\n", rq->method, rq->path, pool->name);
    for (const http_header *h = rq->headers; h && h->name; h++)
        off += (size_t)snprintf(w + off, n - off, "%s: %s\r\n", h->name, h->value);
    if (has_len) off += (size_t)snprintf(w + off, n - off, "Content-Length: %zu\r\n", rq->body_len);
    memcpy(w + off, "\r\n", 2);
    off += 2;
    if (rq->body_len) memcpy(w + off, rq->body, rq->body_len);
    *len_p = off + rq->body_len;
    return w;
}

duet_status httpc_send(httpc_pool *pool, const httpc_request *rq, const httpc_callbacks *cb,
                       void *arg, httpc_req **req_p) {
    if (!pool || !rq || !cb || !cb->on_end || !http_token_valid(rq->method) || !path_ok(rq->path) ||
        (rq->body_len && !rq->body)) {
        LOG_ERROR("httpc: invalid request (method, path, body or callbacks)");
        return DUET_ERR_INVALID;
    }
    for (const http_header *h = rq->headers; h && h->name; h++) {
        if (!http_token_valid(h->name) || !http_value_valid(h->value) || reserved_header(h->name)) {
            LOG_ERROR("httpc: invalid request header %s", h->name);
            return DUET_ERR_INVALID;
        }
    }
    if (pool->destroyed) return DUET_ERR_CANCELED;
    httpc_req *r = calloc(1, sizeof *r);
    if (r) r->wire = build_wire(pool, rq, &r->wire_len);
    if (!r || !r->wire) {
        free(r);
        LOG_ERROR("httpc: out of memory building a request");
        return DUET_ERR_NO_MEMORY;
    }
    r->pool = pool;
    r->cb = *cb;
    r->arg = arg;
    r->first_byte_ms = rq->first_byte_timeout_ms;
    r->idle_ms = rq->idle_timeout_ms;
    r->head_request = !strcmp(rq->method, "HEAD");
    pool->stats.active++;
    if (req_p) *req_p = r;
    hc_conn *c = pool->idle;
    if (c) {
        idle_remove(c);
        pool->stats.reuses++;
        c->req = r;
        r->conn = c;
        conn_send_on(c);
        return DUET_OK;
    }
    /* Allocated here so that running out of memory is an error return, not a callback. */
    c = conn_new();
    if (!c) {
        pool->stats.active--;
        req_free(r);
        return DUET_ERR_NO_MEMORY;
    }
    conn_start(pool, r, c);
    return DUET_OK;
}

void httpc_cancel(httpc_req *r) {
    if (!r || r->canceled || r->ending) return;
    r->canceled = true;
    httpc_pool *pool = r->pool;
    pool->stats.active--;
    hc_conn *c = r->conn;
    if (!c) { /* not reached: a live request always has a connection */
        req_free(r);
        return;
    }
    conn_close(c, DUET_ERR_CANCELED);
    if (c->in_parse) return; /* conn_feed frees it once the parser has returned */
    c->req = NULL;
    req_free(r);
}

const char *httpc_req_reason(const httpc_req *r) {
    return r && r->why[0] ? r->why : "";
}

void httpc_req_pause(httpc_req *r, bool paused) {
    if (!r || r->canceled || r->ending || r->paused == paused) return;
    r->paused = paused;
    hc_conn *c = r->conn;
    if (!c || c->closing || c->state == CONN_CONNECTING) return;
    if (paused) {
        conn_set_reading(c, false);
        uv_timer_stop(&c->timer);
        return;
    }
    if (!conn_set_reading(c, true)) return;
    conn_arm(c, c->state == CONN_WAITING ? r->first_byte_ms : r->idle_ms);
}
