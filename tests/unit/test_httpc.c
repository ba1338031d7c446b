/* The HTTP client against real sockets on localhost, one loop for both ends: duet's own server
 * (http.h) for well-behaved backends, and a raw TCP server that answers with scripted bytes for
 * the awkward ones (stale keep-alive, close-delimited and malformed responses, interim 1xx). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "net/http.h"
#include "net/httpc.h"
#include "net/httpc-impl.h"
#include "base/log.h"

static uv_loop_t g_loop;
static uv_timer_t g_wake; /* so that UV_RUN_ONCE returns by the deadline */

static void on_wake(uv_timer_t *t) {
    (void)t;
}

/* Runs the loop until *flag is set or timeout_ms passes; false on timeout. */
static bool run_until(const bool *flag, unsigned timeout_ms) {
    uv_update_time(&g_loop);
    uint64_t end = uv_now(&g_loop) + timeout_ms;
    uv_timer_start(&g_wake, on_wake, timeout_ms, 0);
    while (!*flag) {
        uv_update_time(&g_loop);
        if (uv_now(&g_loop) >= end) break;
        uv_run(&g_loop, UV_RUN_ONCE);
    }
    uv_timer_stop(&g_wake);
    return *flag;
}

/* Runs the loop for ms, whatever happens. */
static void run_for(unsigned ms) {
    bool never = false;
    run_until(&never, ms);
}

/* ---------------------------------------------------------------------------------------------
 * The well-behaved backend (http.h) */

static int g_server_closes; /* on_close notifications: the client went away */
static http_req *g_held;    /* a request the handler keeps unanswered */

typedef struct streamer {
    uv_timer_t timer;
    http_req *req;
    int n, total;
    bool gone;
} streamer;

static void streamer_closed(uv_handle_t *h) {
    free(h->data);
}

static void streamer_on_close(http_req *req, void *arg) {
    streamer *s = arg;
    (void)req;
    s->gone = true;
    g_server_closes++;
}

static void streamer_tick(uv_timer_t *t) {
    streamer *s = t->data;
    if (s->gone || s->n == s->total) {
        if (s->gone)
            http_req_release(s->req);
        else
            http_stream_end(s->req);
        uv_timer_stop(t);
        uv_close((uv_handle_t *)t, streamer_closed);
        return;
    }
    char line[64];
    int n = snprintf(line, sizeof line, "data: %d\n\n", s->n++);
    http_stream_write(s->req, line, (size_t)n);
}

static void held_on_close(http_req *req, void *arg) {
    (void)arg;
    g_server_closes++;
    http_req_release(req);
    g_held = NULL;
}

static void handler(http_req *req, void *user) {
    (void)user;
    if (!strcmp(req->path, "/hello")) {
        http_respond(req, 200, "text/plain", "hello", 5);
    } else if (!strcmp(req->path, "/echo")) {
        const char *xt = http_req_header(req, "x-test");
        http_header extra[] = {{"X-Echo", xt ? xt : "none"}, {NULL, NULL}};
        http_respond_headers(req, 201, "application/json", extra, req->body, req->body_len);
    } else if (!strcmp(req->path, "/stream") || !strcmp(req->path, "/slow")) {
        streamer *s = calloc(1, sizeof *s);
        s->req = req;
        s->total = !strcmp(req->path, "/stream") ? 5 : 1000;
        uv_timer_init(&g_loop, &s->timer);
        s->timer.data = s;
        http_req_on_close(req, streamer_on_close, s);
        http_stream_start(req, 200, "text/event-stream", NULL);
        unsigned every = !strcmp(req->path, "/stream") ? 5 : 20;
        uv_timer_start(&s->timer, streamer_tick, every, every);
    } else if (!strcmp(req->path, "/stall")) {
        /* Starts a stream, sends one piece, then nothing. */
        http_stream_start(req, 200, "text/event-stream", NULL);
        http_stream_write(req, "data: 0\n\n", 9);
        g_held = req;
        http_req_on_close(req, held_on_close, NULL);
    } else if (!strcmp(req->path, "/hang")) {
        g_held = req;
        http_req_on_close(req, held_on_close, NULL);
    } else {
        http_respond_error(req, 404, "NotFoundError", "no such route");
    }
}

/* ---------------------------------------------------------------------------------------------
 * The raw backend: each connection answers its n-th request (counted by blank lines) with
 * script[n], a NULL entry closing the connection instead. */

typedef struct raw_server {
    uv_tcp_t tcp;
    int port;
    const char *const *script;
    int connections;
} raw_server;

typedef struct raw_conn {
    uv_tcp_t tcp;
    raw_server *srv;
    int nreq;
    char last[4];
    char buf[4096];
} raw_conn;

static void raw_conn_closed(uv_handle_t *h) {
    free(h->data);
}

static void raw_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    raw_conn *c = h->data;
    (void)suggested;
    buf->base = c->buf;
    buf->len = sizeof c->buf;
}

static void raw_write_done(uv_write_t *w, int status) {
    (void)status;
    free(w);
}

static void raw_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
    raw_conn *c = s->data;
    if (nread < 0) {
        uv_close((uv_handle_t *)s, raw_conn_closed);
        return;
    }
    for (ssize_t i = 0; i < nread; i++) {
        memmove(c->last, c->last + 1, 3);
        c->last[3] = buf->base[i];
        if (memcmp(c->last, "\r\n\r\n", 4)) continue;
        const char *answer = c->srv->script[c->nreq++];
        if (!answer) {
            uv_close((uv_handle_t *)s, raw_conn_closed);
            return;
        }
        if (!*answer) continue; /* "": say nothing */
        uv_write_t *w = malloc(sizeof *w);
        uv_buf_t b = {.base = (char *)answer, .len = strlen(answer)};
        uv_write(w, s, &b, 1, raw_write_done);
        if (strstr(answer, "Connection: close")) {
            uv_close((uv_handle_t *)s, raw_conn_closed);
            return;
        }
    }
}

static void raw_accept(uv_stream_t *ls, int status) {
    raw_server *srv = ls->data;
    if (status < 0) return;
    raw_conn *c = calloc(1, sizeof *c);
    c->srv = srv;
    uv_tcp_init(&g_loop, &c->tcp);
    c->tcp.data = c;
    if (uv_accept(ls, (uv_stream_t *)&c->tcp)) {
        uv_close((uv_handle_t *)&c->tcp, raw_conn_closed);
        return;
    }
    srv->connections++;
    uv_read_start((uv_stream_t *)&c->tcp, raw_alloc, raw_read);
}

static void raw_start(raw_server *srv, const char *const *script) {
    memset(srv, 0, sizeof *srv);
    srv->script = script;
    uv_tcp_init(&g_loop, &srv->tcp);
    srv->tcp.data = srv;
    struct sockaddr_in a;
    uv_ip4_addr("127.0.0.1", 0, &a);
    uv_tcp_bind(&srv->tcp, (const struct sockaddr *)&a, 0);
    uv_listen((uv_stream_t *)&srv->tcp, 16, raw_accept);
    struct sockaddr_in b;
    int len = sizeof b;
    uv_tcp_getsockname(&srv->tcp, (struct sockaddr *)&b, &len);
    srv->port = ntohs(b.sin_port);
}

static bool g_raw_closed;

static void raw_listener_closed(uv_handle_t *h) {
    (void)h;
    g_raw_closed = true;
}

/* Closes the listener and waits for it: srv may be reused right after. */
static void raw_stop(raw_server *srv) {
    g_raw_closed = false;
    uv_close((uv_handle_t *)&srv->tcp, raw_listener_closed);
    run_until(&g_raw_closed, 1000);
}

/* ---------------------------------------------------------------------------------------------
 * A recording client */

typedef struct result {
    char why[128];
    bool done;
    duet_status st;
    int status;
    int heads, bodies;
    char xecho[32];
    char body[8192];
    size_t body_len;
    bool cancel_in_body; /* cancel at the first body piece */
    bool canceled;
    bool pause_at_first;
    httpc_req *req;
} result;

static void on_head(httpc_req *req, const httpc_response *resp, void *arg) {
    result *r = arg;
    (void)req;
    r->heads++;
    r->status = resp->status;
    for (size_t i = 0; i < resp->num_headers; i++)
        if (!strcasecmp(resp->headers[i].name, "x-echo"))
            snprintf(r->xecho, sizeof r->xecho, "%s", resp->headers[i].value);
}

static void on_body(httpc_req *req, const char *data, size_t len, void *arg) {
    result *r = arg;
    r->bodies++;
    if (r->body_len + len < sizeof r->body) {
        memcpy(r->body + r->body_len, data, len);
        r->body_len += len;
        r->body[r->body_len] = '\0';
    }
    if (r->cancel_in_body) {
        httpc_cancel(req);
        r->canceled = true;
        r->done = true;
    } else if (r->pause_at_first && r->bodies == 1) {
        httpc_req_pause(req, true);
        r->done = true; /* lets the test look while paused */
    }
}

static void on_end(httpc_req *req, duet_status st, void *arg) {
    result *r = arg;
    r->st = st;
    snprintf(r->why, sizeof r->why, "%s", httpc_req_reason(req));
    r->done = true;
}

static const httpc_callbacks g_cb = {on_head, on_body, on_end};

static duet_status do_send(httpc_pool *pool, const char *method, const char *path, const char *body,
                           unsigned first_byte_ms, unsigned idle_ms, result *r) {
    memset(r, 0, sizeof *r);
    r->st = DUET_ERR_INTERNAL;
    http_header hs[] = {{"X-Test", "t1"}, {"Content-Type", "application/json"}, {NULL, NULL}};
    httpc_request rq = {.method = method,
                        .path = path,
                        .headers = hs,
                        .body = body,
                        .body_len = body ? strlen(body) : 0,
                        .first_byte_timeout_ms = first_byte_ms,
                        .idle_timeout_ms = idle_ms};
    return httpc_send(pool, &rq, &g_cb, r, &r->req);
}

/* ---------------------------------------------------------------------------------------------
 * Tests */

static void test_basic(httpc_pool *pool) {
    result r;
    CHECK(do_send(pool, "GET", "/hello", NULL, 1000, 1000, &r) == DUET_OK);
    CHECK(run_until(&r.done, 3000));
    CHECK_EQ_INT(r.st, DUET_OK);
    CHECK(!strcmp(r.why, ""));
    CHECK_EQ_INT(r.status, 200);
    CHECK(!strcmp(r.body, "hello"));
    CHECK_EQ_INT(r.heads, 1);

    /* A POST on the same (reused) connection; a header and the body come back. */
    const char *json = "{\"a\": [1, 2, 3]}";
    CHECK(do_send(pool, "POST", "/echo", json, 1000, 1000, &r) == DUET_OK);
    CHECK(run_until(&r.done, 3000));
    CHECK_EQ_INT(r.st, DUET_OK);
    CHECK_EQ_INT(r.status, 201);
    CHECK(!strcmp(r.body, json));
    CHECK(!strcmp(r.xecho, "t1"));
    httpc_pool_stats ps;
    httpc_pool_get_stats(pool, &ps);
    CHECK_EQ_INT(ps.connects, 1);
    CHECK_EQ_INT(ps.reuses, 1);
    CHECK_EQ_INT(ps.idle, 1);
    CHECK_EQ_INT(ps.active, 0);

    /* An empty POST still carries Content-Length: 0 (the server would otherwise wait). */
    CHECK(do_send(pool, "POST", "/echo", NULL, 1000, 1000, &r) == DUET_OK);
    CHECK(run_until(&r.done, 3000));
    CHECK_EQ_INT(r.st, DUET_OK);
    CHECK_EQ_INT(r.body_len, 0);

    /* 404 is a response like any other. */
    CHECK(do_send(pool, "GET", "/nope", NULL, 1000, 1000, &r) == DUET_OK);
    CHECK(run_until(&r.done, 3000));
    CHECK_EQ_INT(r.st, DUET_OK);
    CHECK_EQ_INT(r.status, 404);
    CHECK(strstr(r.body, "NotFoundError") != NULL);

    /* HEAD: no body whatever Content-Length says. */
    CHECK(do_send(pool, "HEAD", "/hello", NULL, 1000, 1000, &r) == DUET_OK);
    CHECK(run_until(&r.done, 3000));
    CHECK_EQ_INT(r.st, DUET_OK);
    CHECK_EQ_INT(r.body_len, 0);
}

static void test_parallel(httpc_pool *pool) {
    enum { N = 20 };
    result rs[N];
    for (int i = 0; i < N; i++)
        CHECK(do_send(pool, "GET", "/hello", NULL, 1000, 1000, &rs[i]) == 0);
    for (int i = 0; i < N; i++) {
        CHECK(run_until(&rs[i].done, 3000));
        CHECK_EQ_INT(rs[i].st, DUET_OK);
        CHECK(!strcmp(rs[i].body, "hello"));
    }
    httpc_pool_stats ps;
    httpc_pool_get_stats(pool, &ps);
    CHECK(ps.idle >= 1 && ps.idle <= N);
}

static void test_stream(httpc_pool *pool) {
    result r;
    CHECK(do_send(pool, "GET", "/stream", NULL, 1000, 1000, &r) == DUET_OK);
    CHECK(run_until(&r.done, 3000));
    CHECK_EQ_INT(r.st, DUET_OK);
    CHECK(!strcmp(r.body, "data: 0\n\ndata: 1\n\ndata: 2\n\ndata: 3\n\ndata: 4\n\n"));
    CHECK(r.bodies >= 2); /* arrived in pieces, not buffered */
}

static void test_timeouts(httpc_pool *pool) {
    result r;
    int closes = g_server_closes;
    CHECK(do_send(pool, "GET", "/hang", NULL, 100, 1000, &r) == DUET_OK);
    CHECK(run_until(&r.done, 3000));
    CHECK_EQ_INT(r.st, DUET_ERR_TIMEOUT);
    CHECK(!strcmp(r.why, "no answer in time"));
    CHECK_EQ_INT(r.heads, 0);
    run_for(50);
    CHECK_EQ_INT(g_server_closes, closes + 1); /* the backend saw us go */

    CHECK(do_send(pool, "GET", "/stall", NULL, 1000, 100, &r) == DUET_OK);
    CHECK(run_until(&r.done, 3000));
    CHECK_EQ_INT(r.st, DUET_ERR_TIMEOUT);
    CHECK_EQ_INT(r.heads, 1);
    CHECK(!strcmp(r.body, "data: 0\n\n"));
    run_for(50);
    CHECK_EQ_INT(g_server_closes, closes + 2);
}

static void test_cancel(httpc_pool *pool) {
    result r;
    int closes = g_server_closes;
    /* From outside any callback, while waiting for the head. */
    CHECK(do_send(pool, "GET", "/hang", NULL, 0, 0, &r) == DUET_OK);
    run_for(30);
    httpc_cancel(r.req);
    run_for(50);
    CHECK(!r.done);
    CHECK_EQ_INT(g_server_closes, closes + 1);

    /* From inside on_body, mid-stream. */
    CHECK(do_send(pool, "GET", "/slow", NULL, 0, 0, &r) == DUET_OK);
    r.cancel_in_body = true;
    CHECK(run_until(&r.done, 3000));
    CHECK(r.canceled);
    run_for(100);
    CHECK_EQ_INT(r.st, DUET_ERR_INTERNAL); /* on_end never called */
    CHECK_EQ_INT(g_server_closes, closes + 2);
    httpc_pool_stats ps;
    httpc_pool_get_stats(pool, &ps);
    CHECK_EQ_INT(ps.active, 0);
}

static void test_pause(httpc_pool *pool) {
    result r;
    CHECK(do_send(pool, "GET", "/stream", NULL, 1000, 50, &r) == DUET_OK);
    r.pause_at_first = true;
    CHECK(run_until(&r.done, 3000));
    int bodies = r.bodies;
    run_for(200); /* longer than the idle timeout: paused, so no timeout either */
    CHECK_EQ_INT(r.bodies, bodies);
    r.done = false;
    r.pause_at_first = false;
    httpc_req_pause(r.req, false);
    CHECK(run_until(&r.done, 3000));
    CHECK_EQ_INT(r.st, DUET_OK);
    CHECK(strstr(r.body, "data: 4\n\n") != NULL);
}

static void test_refused(void) {
    /* A port nobody listens on: bind one, note it, close it. */
    raw_server rs;
    static const char *const none[] = {NULL};
    raw_start(&rs, none);
    int port = rs.port;
    raw_stop(&rs);
    run_for(10);
    httpc_pool *pool = NULL;
    CHECK(httpc_pool_create(&g_loop, "127.0.0.1", port, NULL, &pool) == DUET_OK);
    result r;
    CHECK(do_send(pool, "GET", "/hello", NULL, 1000, 1000, &r) == DUET_OK);
    CHECK(!r.done); /* never from inside httpc_send */
    CHECK(run_until(&r.done, 3000));
    CHECK_EQ_INT(r.st, DUET_ERR_PEER);
    CHECK_MSG(strstr(r.why, "connect failed") != NULL, "%s", r.why);
    CHECK_EQ_INT(r.heads, 0);
    httpc_pool_destroy(pool);
}

static void test_raw(void) {
    /* Answers one request, then closes the connection on reading the second: the client must
     * resend that one on a fresh connection. */
    static const char *const stale[] = {"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", NULL,
                                        NULL};
    raw_server rs;
    raw_start(&rs, stale);
    httpc_pool *pool = NULL;
    CHECK(httpc_pool_create(&g_loop, "localhost", rs.port, NULL, &pool) == DUET_OK);
    result r;
    CHECK(do_send(pool, "GET", "/a", NULL, 1000, 1000, &r) == DUET_OK);
    CHECK(run_until(&r.done, 3000));
    CHECK_EQ_INT(r.st, DUET_OK);
    CHECK(do_send(pool, "POST", "/b", "{}", 1000, 1000, &r) == DUET_OK);
    CHECK(run_until(&r.done, 3000));
    CHECK_EQ_INT(r.st, DUET_OK);
    CHECK(!strcmp(r.body, "ok"));
    httpc_pool_stats ps;
    httpc_pool_get_stats(pool, &ps);
    CHECK_EQ_INT(ps.stale_retries, 1);
    CHECK_EQ_INT(rs.connections, 2);
    httpc_pool_destroy(pool);
    raw_stop(&rs);

    /* Body delimited by the end of the connection; an interim 100 before the real head; a
     * chunked body with a trailer; garbage. */
    static const char *const odd[][2] = {
        {"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", "until the end"},
        {"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", "abc"},
        {"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n"
         "X-Trailer: 1\r\n\r\n",
         "abcde"},
        {"SMTP ready\r\n\r\n", NULL},
        {"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\nshort", NULL},
    };
    for (size_t i = 0; i < sizeof odd / sizeof odd[0]; i++) {
        const char *script[] = {odd[i][0], NULL};
        raw_start(&rs, script);
        CHECK(httpc_pool_create(&g_loop, "127.0.0.1", rs.port, NULL, &pool) == DUET_OK);
        CHECK(do_send(pool, "GET", "/x", NULL, 1000, 1000, &r) == DUET_OK);
        CHECK(run_until(&r.done, 3000));
        if (odd[i][1]) {
            CHECK_MSG(r.st == DUET_OK, "case %zu: %s", i, duet_strerror(r.st));
            CHECK_MSG(!strcmp(r.body, odd[i][1]), "case %zu: body '%s'", i, r.body);
            CHECK_EQ_INT(r.heads, 1);
        } else {
            CHECK_MSG(r.st == DUET_ERR_PEER && r.why[0], "case %zu: %s", i, duet_strerror(r.st));
        }
        httpc_pool_destroy(pool);
        raw_stop(&rs);
    }
}

static void test_invalid(httpc_pool *pool) {
    result r;
    CHECK(do_send(pool, "GET", "no-slash", NULL, 0, 0, &r) == DUET_ERR_INVALID);
    CHECK(do_send(pool, "G T", "/x", NULL, 0, 0, &r) == DUET_ERR_INVALID);
    CHECK(do_send(pool, "GET", "/x y", NULL, 0, 0, &r) == DUET_ERR_INVALID);
    http_header bad[] = {{"Host", "evil"}, {NULL, NULL}};
    httpc_request rq = {.method = "GET", .path = "/x", .headers = bad};
    CHECK(httpc_send(pool, &rq, &g_cb, &r, NULL) == DUET_ERR_INVALID);
    http_header crlf[] = {{"X-A", "a\r\nX-B: b"}, {NULL, NULL}};
    rq.headers = crlf;
    CHECK(httpc_send(pool, &rq, &g_cb, &r, NULL) == DUET_ERR_INVALID);
    httpc_pool *p2 = NULL;
    CHECK(httpc_pool_create(&g_loop, "127.0.0.1", 0, NULL, &p2) == DUET_ERR_INVALID);
    CHECK(httpc_pool_create(&g_loop, "no-such-host.invalid", 80, NULL, &p2) == DUET_ERR_NOT_FOUND);
    CHECK(p2 == NULL);
}

/* Destroying the pool lets the request in flight finish. */
static void test_destroy_in_flight(int port) {
    httpc_pool *pool = NULL;
    CHECK(httpc_pool_create(&g_loop, "127.0.0.1", port, NULL, &pool) == DUET_OK);
    result r;
    CHECK(do_send(pool, "GET", "/stream", NULL, 1000, 1000, &r) == DUET_OK);
    run_for(10);
    httpc_pool_destroy(pool);
    CHECK(run_until(&r.done, 3000));
    CHECK_EQ_INT(r.st, DUET_OK);
    CHECK(strstr(r.body, "data: 4") != NULL);
}

static int count_head(httpc_parse *p) {
    (void)p;
    return 0;
}

/* Headers as the parser hands them out: empty values, folded whitespace, duplicates. */
static void test_parse_headers(void) {
    static const char resp[] = "HTTP/1.1 200 OK\r\nX-Empty:\r\nX-A:  a b  \r\nX-A: second\r\n"
                               "Content-Length: 0\r\n\r\n";
    httpc_parse p;
    httpc_parse_init(&p, 1024, false);
    p.on_head = count_head;
    CHECK_EQ_INT(httpc_parse_feed(&p, resp, sizeof resp - 1), sizeof resp - 1);
    CHECK(p.complete && !p.failed);
    CHECK_EQ_INT(p.resp.num_headers, 4);
    if (p.resp.num_headers == 4) {
        CHECK(!strcmp(p.resp.headers[0].name, "X-Empty") && !strcmp(p.resp.headers[0].value, ""));
        CHECK(!strcmp(p.resp.headers[1].name, "X-A") && !strcmp(p.resp.headers[1].value, "a b"));
        CHECK(!strcmp(p.resp.headers[2].value, "second"));
        CHECK(!strcmp(p.resp.headers[3].name, "Content-Length"));
    }
    CHECK(p.keep_alive);
    httpc_parse_cleanup(&p);
    /* Over the header limit. */
    httpc_parse_init(&p, 256, false);
    char big[600];
    int n = snprintf(big, sizeof big, "HTTP/1.1 200 OK\r\nX-Big: %0300d\r\n\r\n", 7);
    httpc_parse_feed(&p, big, (size_t)n);
    CHECK(p.failed && strstr(p.err, "larger than"));
    httpc_parse_cleanup(&p);
}

static void on_walk_close(uv_handle_t *h, void *arg) {
    (void)arg;
    if (!uv_is_closing(h)) uv_close(h, NULL);
}

int main(void) {
    log_set_level(LOG_LEVEL_WARN);
    uv_loop_init(&g_loop);
    uv_timer_init(&g_loop, &g_wake);
    http_server *srv = NULL;
    CHECK(http_server_create(&g_loop, NULL, handler, NULL, &srv) == DUET_OK);
    CHECK(http_server_listen(srv, "127.0.0.1", 0) == DUET_OK);
    int port = http_server_port(srv);
    httpc_pool *pool = NULL;
    CHECK(httpc_pool_create(&g_loop, "127.0.0.1", port, NULL, &pool) == DUET_OK);
    CHECK(!strncmp(httpc_pool_name(pool), "127.0.0.1:", 10));

    test_basic(pool);
    test_parallel(pool);
    test_stream(pool);
    test_timeouts(pool);
    test_cancel(pool);
    test_pause(pool);
    test_invalid(pool);
    test_refused();
    test_raw();
    test_destroy_in_flight(port);
    test_parse_headers();

    httpc_pool_destroy(pool);
    http_server_destroy(srv);
    run_for(100);
    uv_walk(&g_loop, on_walk_close, NULL);
    uv_run(&g_loop, UV_RUN_DEFAULT);
    CHECK(uv_loop_close(&g_loop) == 0);
    CHECK_DONE();
}
