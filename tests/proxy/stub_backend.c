/* A stand-in for a duet/vLLM worker, for testing and benchmarking duet-proxy without a model:
 * the prefill role answers one token plus kv_transfer_params (streamed: an event with the params
 * at once, as a duet prefill worker sends when it admits the request, then after the prefill
 * delay the token chunk with them again and [DONE]); the decode role checks that it got them
 * (with the same X-Request-Id as the prefill leg) and streams N SSE chunks or one JSON
 * completion. Delays and failures (500, 503, hang, empty answer, connection closed, process exit
 * or a stall mid-stream, an error event) come from flags or POST /stub/control; GET /stub/stats
 * counts what it saw and when the last prefill ended and the last decode request came. */
#include <cjson/cJSON.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "net/http.h"
#include "base/log.h"

typedef enum fail_mode {
    FAIL_NONE = 0,
    FAIL_500,
    FAIL_503,
    FAIL_HANG,  /* never answer */
    FAIL_EMPTY, /* 200 with no body (a stream with no event) */
    FAIL_CLOSE, /* close the connection after `after` chunks */
    FAIL_EXIT,  /* the process dies after `after` chunks */
    FAIL_STALL, /* a streamed prefill sends `after` events, then nothing (the connection open) */
    FAIL_ERROR, /* a streamed prefill sends an error event in place of its token chunk */
} fail_mode;

static const char *const g_fail_names[] = {"none",  "500",  "503",   "hang", "empty",
                                           "close", "exit", "stall", "error"};

/* Which events of a streamed prefill answer carry kv_transfer_params. */
typedef enum kv_events {
    KV_EVENTS_EARLY = 0, /* the first (before any token) and the last: a duet prefill worker */
    KV_EVENTS_FINAL,     /* the last only (no early event is sent) */
    KV_EVENTS_NONE,      /* none: a worker that does not do disaggregation */
} kv_events;

static const char *const g_kv_events_names[] = {"early", "final", "none"};

typedef struct stub {
    uv_loop_t *loop;
    http_server *srv;
    char name[64];
    char model[64];
    char role[16]; /* prefill, decode, both */
    char *auth;    /* "Bearer key" or NULL */
    int port;
    unsigned prefill_delay_ms, token_delay_ms, max_tokens_cap;
    fail_mode fail;
    int fail_after, fail_count; /* count -1: every request */
    int health_status;
    kv_events kv_events;
    /* Stats. */
    unsigned requests, prefills, prefills_streamed, decodes, plain, aborted, bad, in_flight,
        max_in_flight; /* plain: requests without kv_transfer_params (role both) */
    char last_rid[128];
    /* uv_hrtime in ms (CLOCK_MONOTONIC, comparable across the stubs of one host): when the
     * last prefill answer was finished, and when the last decode request came in. */
    double last_prefill_end_ms, last_decode_start_ms;
} stub;

static stub g_stub;

static void respond_json(http_req *req, int status, cJSON *root) {
    char *s = cJSON_PrintUnformatted(root);
    if (s)
        http_respond(req, status, "application/json", s, strlen(s));
    else
        http_req_release(req);
    cJSON_free(s);
    cJSON_Delete(root);
}

static void respond_err(http_req *req, int status, const char *msg) {
    g_stub.bad += status == 400;
    char body[512];
    snprintf(body, sizeof body,
             "{\"error\":{\"message\":\"stub %s: %s\",\"type\":\"%s\",\"param\":null,\"code\":%d}}",
             g_stub.name, msg, status == 400 ? "BadRequestError" : "InternalServerError", status);
    http_respond(req, status, "application/json", body, strlen(body));
}

/* The failure to apply to this request, counting it down. */
static fail_mode take_failure(void) {
    if (g_stub.fail == FAIL_NONE || g_stub.fail_count == 0) return FAIL_NONE;
    if (g_stub.fail_count > 0) g_stub.fail_count--;
    return g_stub.fail;
}

/* ---------------------------------------------------------------------------------------------
 * Answers that take time: a delayed prefill answer, a stream of tokens */

typedef struct work {
    uv_timer_t timer;
    http_req *req; /* NULL once finished */
    bool prefill, stream, chat, usage, gone;
    bool pstream; /* a streamed prefill answer */
    int i, n;
    fail_mode fail;
    char rid[128];
    cJSON *kv; /* the prefill answer's params */
} work;

static void work_closed(uv_handle_t *h) {
    work *w = h->data;
    cJSON_Delete(w->kv);
    free(w);
}

static void work_done(work *w) {
    g_stub.in_flight--;
    uv_timer_stop(&w->timer);
    uv_close((uv_handle_t *)&w->timer, work_closed);
}

static void work_on_close(http_req *req, void *arg) {
    work *w = arg;
    g_stub.aborted++;
    http_req_release(req);
    w->req = NULL;
    work_done(w);
}

static cJSON *choice(const work *w, int i, bool last) {
    cJSON *c = cJSON_CreateObject();
    char tok[32];
    snprintf(tok, sizeof tok, "tok%d ", i);
    cJSON_AddNumberToObject(c, "index", 0);
    if (w->chat) {
        cJSON *d = cJSON_AddObjectToObject(c, w->stream ? "delta" : "message");
        if (!w->stream || i == 0) cJSON_AddStringToObject(d, "role", "assistant");
        cJSON_AddStringToObject(d, "content", tok);
    } else {
        cJSON_AddStringToObject(c, "text", tok);
        cJSON_AddNullToObject(c, "logprobs");
    }
    if (last)
        cJSON_AddStringToObject(c, "finish_reason", "length");
    else
        cJSON_AddNullToObject(c, "finish_reason");
    return c;
}

static cJSON *envelope(const work *w, const char *object) {
    cJSON *o = cJSON_CreateObject();
    char id[160];
    snprintf(id, sizeof id, "%s-%s", w->chat ? "chatcmpl" : "cmpl", w->rid);
    cJSON_AddStringToObject(o, "id", id);
    cJSON_AddStringToObject(o, "object", object);
    cJSON_AddNumberToObject(o, "created", 1700000000);
    cJSON_AddStringToObject(o, "model", g_stub.model);
    return o;
}

static void add_usage(cJSON *o, int completion) {
    cJSON *u = cJSON_AddObjectToObject(o, "usage");
    cJSON_AddNumberToObject(u, "prompt_tokens", 8);
    cJSON_AddNumberToObject(u, "completion_tokens", completion);
    cJSON_AddNumberToObject(u, "total_tokens", 8 + completion);
}

static void send_event(work *w, cJSON *o) {
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    if (!s) return;
    size_t n = strlen(s);
    char *ev = malloc(n + 9);
    memcpy(ev, "data: ", 6);
    memcpy(ev + 6, s, n);
    memcpy(ev + 6 + n, "\n\n", 2);
    http_stream_write(w->req, ev, n + 8);
    free(ev);
    cJSON_free(s);
}

/* Cuts the answer off as the failure mode says; true when it did. */
static bool maybe_cut(work *w) {
    if ((w->fail != FAIL_CLOSE && w->fail != FAIL_EXIT) || w->i < g_stub.fail_after) return false;
    if (w->fail == FAIL_EXIT) {
        fprintf(stderr, "stub %s: exiting mid-answer as asked\n", g_stub.name);
        _exit(3);
    }
    http_req_release(w->req); /* closes the connection */
    w->req = NULL;
    work_done(w);
    return true;
}

static double now_ms(void) {
    return (double)uv_hrtime() / 1e6;
}

static void prefill_answer(work *w) {
    g_stub.last_prefill_end_ms = now_ms();
    cJSON *o = envelope(w, w->chat ? "chat.completion" : "text_completion");
    cJSON *cs = cJSON_AddArrayToObject(o, "choices");
    cJSON_AddItemToArray(cs, choice(w, 0, true));
    add_usage(o, 1);
    cJSON_AddItemToObject(o, "kv_transfer_params", w->kv);
    w->kv = NULL;
    respond_json(w->req, 200, o);
    w->req = NULL;
    work_done(w);
}

/* One step of a decode answer: a chunk, or (not streaming) the whole thing. */
static void decode_step(work *w) {
    if (!w->stream) {
        if (w->fail == FAIL_CLOSE && g_stub.fail_after > 0) {
            /* A JSON answer cut in the middle: head and part of the body, then the end. */
            http_stream_start(w->req, 200, "application/json", NULL);
            http_stream_write(w->req, "{\"id\":\"cmpl-", 13);
            http_req_release(w->req);
            w->req = NULL;
            work_done(w);
            return;
        }
        if (maybe_cut(w)) return;
        if (w->fail == FAIL_EMPTY) {
            http_respond(w->req, 200, "application/json", "", 0);
            w->req = NULL;
            work_done(w);
            return;
        }
        cJSON *o = envelope(w, w->chat ? "chat.completion" : "text_completion");
        cJSON *c = choice(w, 0, true);
        char *text = calloc((size_t)w->n, 12);
        for (int i = 0; i < w->n; i++) sprintf(text + strlen(text), "tok%d ", i);
        cJSON_ReplaceItemInObject(w->chat ? cJSON_GetObjectItem(c, "message") : c,
                                  w->chat ? "content" : "text", cJSON_CreateString(text));
        free(text);
        cJSON_AddItemToArray(cJSON_AddArrayToObject(o, "choices"), c);
        add_usage(o, w->n);
        respond_json(w->req, 200, o);
        w->req = NULL;
        work_done(w);
        return;
    }
    if (w->i == 0 && http_stream_start(w->req, 200, "text/event-stream", NULL)) return;
    if (w->fail == FAIL_EMPTY) {
        http_stream_end(w->req);
        w->req = NULL;
        work_done(w);
        return;
    }
    if (maybe_cut(w)) return;
    if (w->i < w->n) {
        cJSON *o = envelope(w, w->chat ? "chat.completion.chunk" : "text_completion");
        cJSON_AddItemToArray(cJSON_AddArrayToObject(o, "choices"),
                             choice(w, w->i, w->i == w->n - 1));
        send_event(w, o);
        w->i++;
        return;
    }
    if (w->usage) {
        cJSON *o = envelope(w, w->chat ? "chat.completion.chunk" : "text_completion");
        cJSON_AddArrayToObject(o, "choices");
        add_usage(o, w->n);
        send_event(w, o);
    }
    http_stream_write(w->req, "data: [DONE]\n\n", 14);
    http_stream_end(w->req);
    w->req = NULL;
    work_done(w);
}

static void on_work_timer(uv_timer_t *t);

/* One step of a streamed prefill answer: step 0 the head and (kv events "early") the event with
 * the params; step 1, after the prefill delay, the token chunk (the params again unless "none")
 * or an error event, then [DONE]. A cut or a stall comes before step `after`; "empty" ends the
 * stream at step 0 with no event. */
static void prefill_stream_step(work *w) {
    if (maybe_cut(w)) return; /* at step 0: the connection closes without an answer */
    if (w->fail == FAIL_STALL && w->i >= g_stub.fail_after) return; /* until the client goes */
    const char *object = w->chat ? "chat.completion.chunk" : "text_completion";
    if (w->i == 0) {
        if (http_stream_start(w->req, 200, "text/event-stream", NULL)) return;
        if (w->fail == FAIL_EMPTY) { /* a stream with no event at all */
            http_stream_end(w->req);
            w->req = NULL;
            work_done(w);
            return;
        }
        if (g_stub.kv_events == KV_EVENTS_EARLY) {
            cJSON *o = envelope(w, object);
            cJSON_AddArrayToObject(o, "choices");
            cJSON_AddItemToObject(o, "kv_transfer_params", cJSON_Duplicate(w->kv, 1));
            send_event(w, o);
        }
        w->i = 1;
        uv_timer_start(&w->timer, on_work_timer, g_stub.prefill_delay_ms, 0);
        return;
    }
    if (w->fail == FAIL_ERROR) {
        static const char err[] = "data: {\"error\":{\"message\":\"stub prefill failed as "
                                  "asked\",\"type\":\"InternalServerError\",\"param\":null,"
                                  "\"code\":500}}\n\n";
        http_stream_write(w->req, err, sizeof err - 1);
    } else {
        cJSON *o = envelope(w, object);
        cJSON_AddItemToArray(cJSON_AddArrayToObject(o, "choices"), choice(w, 0, true));
        if (g_stub.kv_events != KV_EVENTS_NONE) {
            cJSON_AddItemToObject(o, "kv_transfer_params", w->kv);
            w->kv = NULL;
        }
        send_event(w, o);
    }
    http_stream_write(w->req, "data: [DONE]\n\n", 14);
    http_stream_end(w->req);
    g_stub.last_prefill_end_ms = now_ms();
    w->req = NULL;
    work_done(w);
}

static void on_work_timer(uv_timer_t *t) {
    work *w = t->data;
    if (!w->req) return;
    if (w->pstream) {
        prefill_stream_step(w);
        return;
    }
    if (w->prefill) {
        if (w->fail == FAIL_EMPTY) {
            http_respond(w->req, 200, "application/json", "", 0);
            w->req = NULL;
            work_done(w);
        } else if (!maybe_cut(w)) {
            prefill_answer(w);
        }
        return;
    }
    /* Without a delay the whole answer goes out now; with one, a chunk per tick. */
    do decode_step(w);
    while (w->req && !g_stub.token_delay_ms);
}

/* ---------------------------------------------------------------------------------------------
 * Routes */

static bool num_is(const cJSON *o, const char *key, double v) {
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(x) && x->valuedouble == v;
}

static void handle_generate(http_req *req, bool chat) {
    g_stub.requests++;
    cJSON *root = cJSON_ParseWithLength(req->body, req->body_len);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        respond_err(req, 400, "body is not a JSON object");
        return;
    }
    const char *rid = http_req_header(req, "x-request-id");
    if (!rid) {
        cJSON_Delete(root);
        respond_err(req, 400, "no X-Request-Id");
        return;
    }
    snprintf(g_stub.last_rid, sizeof g_stub.last_rid, "%s", rid);
    const cJSON *kv = cJSON_GetObjectItemCaseSensitive(root, "kv_transfer_params");
    bool is_prefill = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(kv, "do_remote_decode"));
    bool is_decode = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(kv, "do_remote_prefill"));
    const char *bad = NULL;
    if (chat && !cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(root, "messages")))
        bad = "'messages' is required";
    else if (!chat && !cJSON_GetObjectItemCaseSensitive(root, "prompt"))
        bad = "'prompt' is required";
    else if (is_prefill && strcmp(g_stub.role, "decode")) {
        /* What vLLM's prefill side needs from the proxy. */
        if (!cJSON_IsBool(cJSON_GetObjectItemCaseSensitive(root, "stream")))
            bad = "prefill: stream must be true or false";
        else if (!num_is(root, "max_tokens", 1))
            bad = "prefill: max_tokens must be 1";
        else if (cJSON_GetObjectItemCaseSensitive(root, "max_completion_tokens") &&
                 !num_is(root, "max_completion_tokens", 1))
            bad = "prefill: max_completion_tokens must be 1";
        else if (cJSON_GetObjectItemCaseSensitive(root, "min_tokens"))
            bad = "prefill: min_tokens must be removed";
        else if (cJSON_GetObjectItemCaseSensitive(root, "stream_options"))
            bad = "prefill: stream_options must be removed";
    } else if (is_decode && strcmp(g_stub.role, "prefill")) {
        const cJSON *rr = cJSON_GetObjectItemCaseSensitive(kv, "remote_request_id");
        if (!cJSON_IsString(rr) || strcmp(rr->valuestring, rid))
            bad = "decode: kv_transfer_params.remote_request_id differs from X-Request-Id";
        else if (!cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(kv, "remote_block_ids")))
            bad = "decode: no remote_block_ids";
    } else if (strcmp(g_stub.role, "both")) {
        bad = !strcmp(g_stub.role, "prefill") ? "prefill role: no do_remote_decode"
                                              : "decode role: no kv_transfer_params from prefill";
    } /* role both: a plain request is answered like a non-disaggregated worker does */
    if (!bad) {
        const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, "min_tokens");
        if (mt && (!cJSON_IsNumber(mt) || mt->valuedouble < 0)) bad = "min_tokens must be >= 0";
    }
    if (bad) {
        cJSON_Delete(root);
        respond_err(req, 400, bad);
        return;
    }
    fail_mode f = take_failure();
    if (f == FAIL_500 || f == FAIL_503) {
        cJSON_Delete(root);
        respond_err(req, f == FAIL_500 ? 500 : 503, "failing as asked");
        return;
    }
    work *w = calloc(1, sizeof *w);
    w->req = req;
    w->prefill = is_prefill;
    w->chat = chat;
    w->fail = f;
    w->stream = !is_prefill && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "stream"));
    w->pstream = is_prefill && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "stream"));
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(root, "stream_options");
    w->usage = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(so, "include_usage"));
    snprintf(w->rid, sizeof w->rid, "%s", rid);
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, "max_completion_tokens");
    if (!cJSON_IsNumber(mt)) mt = cJSON_GetObjectItemCaseSensitive(root, "max_tokens");
    w->n = cJSON_IsNumber(mt) && mt->valuedouble >= 1 ? (int)mt->valuedouble : 16;
    if (w->n > (int)g_stub.max_tokens_cap) w->n = (int)g_stub.max_tokens_cap;
    cJSON_Delete(root);
    if (is_prefill) {
        g_stub.prefills++;
        g_stub.prefills_streamed += w->pstream;
        w->kv = cJSON_CreateObject();
        char engine[96];
        snprintf(engine, sizeof engine, "stub-%s", g_stub.name);
        cJSON_AddTrueToObject(w->kv, "do_remote_prefill");
        cJSON_AddFalseToObject(w->kv, "do_remote_decode");
        cJSON_AddStringToObject(w->kv, "remote_engine_id", engine);
        int blocks[3] = {1, 2, 3};
        cJSON_AddItemToObject(w->kv, "remote_block_ids", cJSON_CreateIntArray(blocks, 3));
        cJSON_AddStringToObject(w->kv, "remote_host", "127.0.0.1");
        cJSON_AddNumberToObject(w->kv, "remote_port", g_stub.port);
        cJSON_AddStringToObject(w->kv, "remote_request_id", rid);
        cJSON_AddNumberToObject(w->kv, "tp_size", 1);
    } else {
        g_stub.decodes++;
        g_stub.plain += !is_decode;
        g_stub.last_decode_start_ms = now_ms();
    }
    g_stub.in_flight++;
    if (g_stub.in_flight > g_stub.max_in_flight) g_stub.max_in_flight = g_stub.in_flight;
    uv_timer_init(g_stub.loop, &w->timer);
    w->timer.data = w;
    http_req_on_close(req, work_on_close, w);
    if (f == FAIL_HANG) return; /* until the client goes */
    if (w->pstream) {           /* the first event at once: the request is admitted */
        uv_timer_start(&w->timer, on_work_timer, 0, 0);
        return;
    }
    unsigned first = is_prefill ? g_stub.prefill_delay_ms : g_stub.token_delay_ms;
    unsigned every = is_prefill ? 0 : g_stub.token_delay_ms;
    uv_timer_start(&w->timer, on_work_timer, first, every);
}

static void handle_control(http_req *req) {
    cJSON *root = cJSON_ParseWithLength(req->body, req->body_len);
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(root, "fail");
    if (cJSON_IsString(f)) {
        g_stub.fail = FAIL_NONE;
        for (size_t i = 0; i < sizeof g_fail_names / sizeof g_fail_names[0]; i++)
            if (!strcmp(f->valuestring, g_fail_names[i])) g_stub.fail = (fail_mode)i;
        g_stub.fail_count = -1;
    }
    const cJSON *x;
    if (cJSON_IsNumber(x = cJSON_GetObjectItemCaseSensitive(root, "after")))
        g_stub.fail_after = x->valueint;
    if (cJSON_IsNumber(x = cJSON_GetObjectItemCaseSensitive(root, "count")))
        g_stub.fail_count = x->valueint;
    if (cJSON_IsNumber(x = cJSON_GetObjectItemCaseSensitive(root, "token_delay_ms")))
        g_stub.token_delay_ms = (unsigned)x->valueint;
    if (cJSON_IsNumber(x = cJSON_GetObjectItemCaseSensitive(root, "prefill_delay_ms")))
        g_stub.prefill_delay_ms = (unsigned)x->valueint;
    if (cJSON_IsNumber(x = cJSON_GetObjectItemCaseSensitive(root, "health")))
        g_stub.health_status = x->valueint;
    if (cJSON_IsString(x = cJSON_GetObjectItemCaseSensitive(root, "kv_events")))
        for (size_t i = 0; i < sizeof g_kv_events_names / sizeof g_kv_events_names[0]; i++)
            if (!strcmp(x->valuestring, g_kv_events_names[i])) g_stub.kv_events = (kv_events)i;
    cJSON_Delete(root);
    http_respond(req, 200, "application/json", "{\"ok\":true}", 11);
}

static void handle_stats(http_req *req) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "name", g_stub.name);
    cJSON_AddNumberToObject(o, "requests", g_stub.requests);
    cJSON_AddNumberToObject(o, "prefill", g_stub.prefills);
    cJSON_AddNumberToObject(o, "prefill_streamed", g_stub.prefills_streamed);
    cJSON_AddNumberToObject(o, "last_prefill_end_ms", g_stub.last_prefill_end_ms);
    cJSON_AddNumberToObject(o, "last_decode_start_ms", g_stub.last_decode_start_ms);
    cJSON_AddNumberToObject(o, "decode", g_stub.decodes);
    cJSON_AddNumberToObject(o, "plain", g_stub.plain);
    cJSON_AddNumberToObject(o, "aborted", g_stub.aborted);
    cJSON_AddNumberToObject(o, "bad", g_stub.bad);
    cJSON_AddNumberToObject(o, "in_flight", g_stub.in_flight);
    cJSON_AddNumberToObject(o, "max_in_flight", g_stub.max_in_flight);
    cJSON_AddStringToObject(o, "last_rid", g_stub.last_rid);
    http_server_stats hs;
    http_server_get_stats(g_stub.srv, &hs);
    cJSON_AddNumberToObject(o, "connections", (double)hs.connections_total);
    respond_json(req, 200, o);
}

static void on_request(http_req *req, void *user) {
    (void)user;
    const char *p = req->path;
    if (!strcmp(p, "/health")) {
        if (g_stub.health_status == 200)
            http_respond(req, 200, "application/json", "{\"status\":\"ok\"}", 15);
        else
            respond_err(req, g_stub.health_status, "unhealthy as asked");
        return;
    }
    if (!strcmp(p, "/stub/control")) {
        handle_control(req);
        return;
    }
    if (!strcmp(p, "/stub/stats")) {
        handle_stats(req);
        return;
    }
    if (g_stub.auth && !strncmp(p, "/v1/", 4)) {
        const char *a = http_req_header(req, "authorization");
        if (!a || strcmp(a, g_stub.auth)) {
            respond_err(req, 401, "bad or missing upstream api key");
            return;
        }
    }
    if (!strcmp(p, "/v1/completions") || !strcmp(p, "/v1/chat/completions")) {
        handle_generate(req, !strcmp(p, "/v1/chat/completions"));
    } else if (!strcmp(p, "/v1/models")) {
        char body[256];
        snprintf(body, sizeof body,
                 "{\"object\":\"list\",\"data\":[{\"id\":\"%s\",\"object\":\"model\","
                 "\"owned_by\":\"duet\",\"root\":\"%s\"}]}",
                 g_stub.model, g_stub.name);
        http_respond(req, 200, "application/json", body, strlen(body));
    } else if (!strcmp(p, "/tokenize")) {
        char body[256];
        snprintf(body, sizeof body,
                 "{\"count\":3,\"max_model_len\":4096,\"tokens\":[1,2,3],\"served_by\":\"%s\"}",
                 g_stub.name);
        http_respond(req, 200, "application/json", body, strlen(body));
    } else if (!strcmp(p, "/detokenize")) {
        http_respond(req, 200, "application/json", "{\"prompt\":\"a b c\"}", 18);
    } else {
        respond_err(req, 404, "no such route");
    }
}

static void on_signal(uv_signal_t *s, int signum) {
    (void)signum;
    uv_signal_stop(s);
    uv_stop(s->loop);
}

static int usage(void) {
    fputs("usage: stub_backend --port P [--role prefill|decode|both] [--name N] [--model M]\n"
          "  [--prefill-delay-ms D] [--token-delay-ms D] [--max-tokens-cap N]\n"
          "  [--fail none|500|503|hang|empty|close|exit|stall|error] [--fail-after K]\n"
          "  [--fail-count C] [--kv-events early|final|none] [--api-key KEY]\n",
          stderr);
    return 2;
}

int main(int argc, char **argv) {
    log_set_tag("stub");
    log_set_level(LOG_LEVEL_WARN);
    stub *s = &g_stub;
    snprintf(s->name, sizeof s->name, "stub");
    snprintf(s->model, sizeof s->model, "duet-stub");
    snprintf(s->role, sizeof s->role, "both");
    s->port = -1;
    s->max_tokens_cap = 1024;
    s->fail_count = -1;
    s->health_status = 200;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) return usage();
        i++;
        if (!strcmp(a, "--port"))
            s->port = atoi(v);
        else if (!strcmp(a, "--role"))
            snprintf(s->role, sizeof s->role, "%s", v);
        else if (!strcmp(a, "--name"))
            snprintf(s->name, sizeof s->name, "%s", v);
        else if (!strcmp(a, "--model"))
            snprintf(s->model, sizeof s->model, "%s", v);
        else if (!strcmp(a, "--prefill-delay-ms"))
            s->prefill_delay_ms = (unsigned)atoi(v);
        else if (!strcmp(a, "--token-delay-ms"))
            s->token_delay_ms = (unsigned)atoi(v);
        else if (!strcmp(a, "--max-tokens-cap"))
            s->max_tokens_cap = (unsigned)atoi(v);
        else if (!strcmp(a, "--fail-after"))
            s->fail_after = atoi(v);
        else if (!strcmp(a, "--fail-count"))
            s->fail_count = atoi(v);
        else if (!strcmp(a, "--api-key")) {
            s->auth = malloc(strlen(v) + 8);
            sprintf(s->auth, "Bearer %s", v);
        } else if (!strcmp(a, "--kv-events")) {
            bool found = false;
            for (size_t k = 0; k < sizeof g_kv_events_names / sizeof g_kv_events_names[0]; k++)
                if (!strcmp(v, g_kv_events_names[k])) s->kv_events = (kv_events)k, found = true;
            if (!found) return usage();
        } else if (!strcmp(a, "--fail")) {
            bool found = false;
            for (size_t k = 0; k < sizeof g_fail_names / sizeof g_fail_names[0]; k++)
                if (!strcmp(v, g_fail_names[k])) s->fail = (fail_mode)k, found = true;
            if (!found) return usage();
        } else
            return usage();
    }
    if (s->port < 0 ||
        (strcmp(s->role, "prefill") && strcmp(s->role, "decode") && strcmp(s->role, "both")))
        return usage();
    s->loop = uv_default_loop();
    http_server_opts o;
    http_server_opts_init(&o);
    o.max_connections = 0;
    if (http_server_create(s->loop, &o, on_request, NULL, &s->srv) ||
        http_server_listen(s->srv, "127.0.0.1", s->port))
        return 1;
    s->port = http_server_port(s->srv);
    printf("stub %s listening on port %d\n", s->name, s->port);
    fflush(stdout);
    uv_signal_t sigterm, sigint;
    uv_signal_init(s->loop, &sigterm);
    uv_signal_init(s->loop, &sigint);
    uv_signal_start(&sigterm, on_signal, SIGTERM);
    uv_signal_start(&sigint, on_signal, SIGINT);
    uv_run(s->loop, UV_RUN_DEFAULT);
    http_server_destroy(s->srv);
    free(s->auth);
    return 0;
}
