/* A stand-in OpenAI server for testing duet-bench: it streams completions or chat chunks on a
 * script of known timings (first chunk TTFT after the request, then gaps cycling through a
 * list), puts a known number of tokens in each chunk and says so in usage, and fails chosen
 * requests in chosen ways (HTTP 4xx/5xx, a connection cut mid-stream, an error event, no
 * [DONE], no chunk at all, no answer). GET /last shows the last request's headers and body.
 *   script_server [--port P] [--ttft-ms T] [--itl-ms A,B,...] [--chunks N]
 *     [--tokens-per-chunk K] [--prompt-tokens N] [--api-key KEY] [--expect-model NAME]
 *     [--fail ORDINAL:MODE,...]   MODE: 400 500 503 cut error nodone empty hang
 * Chunks due at request arrival + TTFT + the gaps so far are never sent early: a timer wakes
 * just before and the last fraction of a millisecond is waited out. */
#include <cjson/cJSON.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "base/log.h"
#include "net/http.h"

enum { MAX_GAPS = 64, MAX_FAILS = 64 };

typedef enum fail_mode {
    FAIL_NONE,
    FAIL_400,
    FAIL_500,
    FAIL_503,
    FAIL_CUT,    /* the connection closes after 2 chunks */
    FAIL_ERROR,  /* an error event after 2 chunks, then [DONE] */
    FAIL_NODONE, /* every chunk and the usage, then the end without [DONE] */
    FAIL_EMPTY,  /* 200 and [DONE] with no chunk */
    FAIL_HANG,   /* no answer */
} fail_mode;

static const char *const g_mode_names[] = {"none",  "400",    "500",   "503", "cut",
                                           "error", "nodone", "empty", "hang"};

static struct {
    uv_loop_t *loop;
    http_server *srv;
    double ttft_ms, gaps_ms[MAX_GAPS];
    int n_gaps, chunks, tokens_per_chunk, prompt_tokens;
    const char *api_key, *expect_model;
    int fail_at[MAX_FAILS];
    fail_mode fail_mode[MAX_FAILS];
    int n_fails, ordinal;
    char *last; /* JSON of the last request */
} g;

typedef struct job {
    uv_timer_t timer;
    http_req *req;
    bool chat, usage, started;
    int i, n, prompt_tokens;
    fail_mode fail;
    uint64_t t0, due; /* ns */
} job;

static void job_closed(uv_handle_t *h) {
    free(h->data);
}

static void job_end(job *j) {
    j->req = NULL;
    uv_timer_stop(&j->timer);
    uv_close((uv_handle_t *)&j->timer, job_closed);
}

static void job_gone(http_req *req, void *arg) {
    job *j = arg;
    http_req_release(req);
    job_end(j);
}

static void send_json(job *j, cJSON *o) {
    char *s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    http_stream_sse(j->req, s);
    cJSON_free(s);
}

static cJSON *chunk(const job *j, bool with_choice) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", "cmpl-script");
    cJSON_AddStringToObject(o, "object", j->chat ? "chat.completion.chunk" : "text_completion");
    cJSON_AddStringToObject(o, "model", "script-model");
    cJSON *cs = cJSON_AddArrayToObject(o, "choices");
    if (!with_choice) return o;
    cJSON *c = cJSON_CreateObject();
    cJSON_AddNumberToObject(c, "index", 0);
    char text[64];
    snprintf(text, sizeof text, "t%d ", j->i);
    if (j->chat) {
        cJSON *d = cJSON_AddObjectToObject(c, "delta");
        if (j->i == 0) cJSON_AddStringToObject(d, "role", "assistant");
        cJSON_AddStringToObject(d, "content", text);
    } else {
        cJSON_AddStringToObject(c, "text", text);
    }
    if (j->i == j->n - 1)
        cJSON_AddStringToObject(c, "finish_reason", "length");
    else
        cJSON_AddNullToObject(c, "finish_reason");
    cJSON_AddItemToArray(cs, c);
    return o;
}

/* The end of a stream: usage (when asked), [DONE] unless the script says otherwise. */
static void finish_stream(job *j) {
    if (j->usage) {
        cJSON *o = chunk(j, false);
        cJSON *u = cJSON_AddObjectToObject(o, "usage");
        int out = j->n * g.tokens_per_chunk;
        cJSON_AddNumberToObject(u, "prompt_tokens", j->prompt_tokens);
        cJSON_AddNumberToObject(u, "completion_tokens", out);
        cJSON_AddNumberToObject(u, "total_tokens", j->prompt_tokens + out);
        send_json(j, o);
    }
    if (j->fail != FAIL_NODONE) http_stream_write(j->req, "data: [DONE]\n\n", 14);
    http_stream_end(j->req);
    job_end(j);
}

static void arm(job *j);

static void on_due(uv_timer_t *t) {
    job *j = t->data;
    if (!j->req) return;
    /* the timer's millisecond clock may wake us a little early: wait out the rest */
    while (uv_hrtime() < j->due) {
    }
    if (!j->started) {
        j->started = true;
        http_stream_start(j->req, 200, "text/event-stream", NULL);
        if (j->fail == FAIL_EMPTY) {
            http_stream_write(j->req, "data: [DONE]\n\n", 14);
            http_stream_end(j->req);
            job_end(j);
            return;
        }
    }
    if (j->i == 2 && j->fail == FAIL_CUT) {
        http_req_release(j->req); /* a started response: the connection closes */
        job_end(j);
        return;
    }
    if (j->i == 2 && j->fail == FAIL_ERROR) {
        size_t len;
        char *e = http_error_body(500, "InternalServerError", "the engine failed", &len);
        http_stream_sse(j->req, e);
        cJSON_free(e);
        http_stream_write(j->req, "data: [DONE]\n\n", 14);
        http_stream_end(j->req);
        job_end(j);
        return;
    }
    send_json(j, chunk(j, true));
    if (++j->i == j->n) {
        finish_stream(j);
        return;
    }
    j->due += (uint64_t)(g.gaps_ms[(j->i - 1) % g.n_gaps] * 1e6);
    arm(j);
}

static void arm(job *j) {
    uv_update_time(g.loop);
    uint64_t now = uv_hrtime();
    uint64_t ms = j->due > now + 1000000 ? (j->due - now) / 1000000 - 1 : 0;
    uv_timer_start(&j->timer, on_due, ms, 0);
}

/* The prompt's length: --prompt-tokens, else the ids of a token prompt, else words. */
static int prompt_len(const cJSON *root) {
    if (g.prompt_tokens > 0) return g.prompt_tokens;
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(root, "prompt");
    if (cJSON_IsArray(p)) return cJSON_GetArraySize(p);
    const char *text = cJSON_IsString(p) ? p->valuestring : "";
    const cJSON *m = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(root, "messages"), 0);
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(m, "content");
    if (cJSON_IsString(c)) text = c->valuestring;
    int n = 0;
    for (const char *s = text; *s; s++) n += (s == text || s[-1] == ' ') && *s != ' ';
    return n;
}

static void remember(http_req *req) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "path", req->path);
    const char *a = http_req_header(req, "authorization");
    const char *rid = http_req_header(req, "x-request-id");
    cJSON_AddStringToObject(o, "authorization", a ? a : "");
    cJSON_AddStringToObject(o, "x_request_id", rid ? rid : "");
    cJSON *body = cJSON_ParseWithLength(req->body, req->body_len);
    cJSON_AddItemToObject(o, "body", body ? body : cJSON_CreateNull());
    free(g.last);
    g.last = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
}

static void generate(http_req *req, bool chat) {
    remember(req);
    int ordinal = ++g.ordinal;
    if (g.api_key) {
        const char *a = http_req_header(req, "authorization");
        char want[512];
        snprintf(want, sizeof want, "Bearer %s", g.api_key);
        if (!a || strcmp(a, want)) {
            http_respond_error(req, 401, "AuthenticationError", "bad or missing api key");
            return;
        }
    }
    cJSON *root = cJSON_ParseWithLength(req->body, req->body_len);
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (!cJSON_IsObject(root) || (g.expect_model && (!cJSON_IsString(model) ||
                                                     strcmp(model->valuestring, g.expect_model)))) {
        cJSON_Delete(root);
        http_respond_error(req, 404, "NotFoundError", "no such model");
        return;
    }
    fail_mode f = FAIL_NONE;
    for (int i = 0; i < g.n_fails; i++)
        if (g.fail_at[i] == ordinal) f = g.fail_mode[i];
    if (f == FAIL_400 || f == FAIL_500 || f == FAIL_503) {
        cJSON_Delete(root);
        int st = f == FAIL_400 ? 400 : f == FAIL_500 ? 500 : 503;
        http_respond_error(req, st, st == 400 ? "BadRequestError" : "ServiceUnavailableError",
                           "failing as scripted");
        return;
    }
    job *j = calloc(1, sizeof *j);
    j->req = req;
    j->chat = chat;
    j->fail = f;
    j->prompt_tokens = prompt_len(root);
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(root, "stream_options");
    j->usage = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(so, "include_usage"));
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, "max_completion_tokens");
    if (!cJSON_IsNumber(mt)) mt = cJSON_GetObjectItemCaseSensitive(root, "max_tokens");
    int max_tokens = cJSON_IsNumber(mt) && mt->valuedouble >= 1 ? mt->valueint : 16;
    j->n = g.chunks > 0 ? g.chunks : (max_tokens + g.tokens_per_chunk - 1) / g.tokens_per_chunk;
    bool stream = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "stream"));
    cJSON_Delete(root);
    if (!stream) {
        /* a whole answer after the whole script's time */
        cJSON *o = chunk(j, true);
        cJSON *u = cJSON_AddObjectToObject(o, "usage");
        cJSON_AddNumberToObject(u, "prompt_tokens", j->prompt_tokens);
        cJSON_AddNumberToObject(u, "completion_tokens", j->n * g.tokens_per_chunk);
        char *s = cJSON_PrintUnformatted(o);
        cJSON_Delete(o);
        http_respond(req, 200, "application/json", s, strlen(s));
        cJSON_free(s);
        free(j);
        return;
    }
    uv_timer_init(g.loop, &j->timer);
    j->timer.data = j;
    http_req_on_close(req, job_gone, j);
    if (f == FAIL_HANG) return;
    j->t0 = uv_hrtime();
    j->due = j->t0 + (uint64_t)(g.ttft_ms * 1e6);
    arm(j);
}

static void on_request(http_req *req, void *user) {
    (void)user;
    if (!strcmp(req->path, "/v1/completions") || !strcmp(req->path, "/v1/chat/completions")) {
        generate(req, !strcmp(req->path, "/v1/chat/completions"));
    } else if (!strcmp(req->path, "/v1/models")) {
        const char *body = "{\"object\":\"list\",\"data\":[{\"id\":\"script-model\","
                           "\"object\":\"model\",\"root\":\"script-model\"}]}";
        http_respond(req, 200, "application/json", body, strlen(body));
    } else if (!strcmp(req->path, "/last")) {
        const char *body = g.last ? g.last : "null";
        http_respond(req, 200, "application/json", body, strlen(body));
    } else {
        http_respond_error(req, 404, "NotFoundError", "no such route");
    }
}

static void on_signal(uv_signal_t *s, int signum) {
    (void)signum;
    uv_signal_stop(s);
    uv_stop(s->loop);
}

static int usage(const char *why) {
    fprintf(stderr, "script_server: %s (see the comment at the top of script_server.c)\n", why);
    return 2;
}

int main(int argc, char **argv) {
    log_set_level(LOG_LEVEL_WARN);
    int port = 0;
    g.tokens_per_chunk = 1;
    g.n_gaps = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) return usage("every option takes a value");
        i++;
        if (!strcmp(a, "--port")) {
            port = atoi(v);
        } else if (!strcmp(a, "--ttft-ms")) {
            g.ttft_ms = atof(v);
        } else if (!strcmp(a, "--itl-ms")) {
            g.n_gaps = 0;
            for (const char *p = v; p && *p && g.n_gaps < MAX_GAPS;
                 p = strchr(p, ','), p = p ? p + 1 : p)
                g.gaps_ms[g.n_gaps++] = atof(p);
        } else if (!strcmp(a, "--chunks")) {
            g.chunks = atoi(v);
        } else if (!strcmp(a, "--tokens-per-chunk")) {
            g.tokens_per_chunk = atoi(v) > 0 ? atoi(v) : 1;
        } else if (!strcmp(a, "--prompt-tokens")) {
            g.prompt_tokens = atoi(v);
        } else if (!strcmp(a, "--api-key")) {
            g.api_key = v;
        } else if (!strcmp(a, "--expect-model")) {
            g.expect_model = v;
        } else if (!strcmp(a, "--fail")) {
            for (const char *p = v; p && *p && g.n_fails < MAX_FAILS;
                 p = strchr(p, ','), p = p ? p + 1 : p) {
                const char *colon = strchr(p, ':');
                if (!colon) return usage("--fail takes ORDINAL:MODE,...");
                size_t n = strcspn(colon + 1, ",");
                int found = -1;
                for (int m = 0; m < (int)(sizeof g_mode_names / sizeof g_mode_names[0]); m++)
                    if (strlen(g_mode_names[m]) == n && !strncmp(g_mode_names[m], colon + 1, n))
                        found = m;
                if (found < 0) return usage("unknown failure mode");
                g.fail_at[g.n_fails] = atoi(p);
                g.fail_mode[g.n_fails++] = (fail_mode)found;
            }
        } else {
            return usage("unknown option");
        }
    }
    signal(SIGPIPE, SIG_IGN);
    g.loop = uv_default_loop();
    http_server_opts o;
    http_server_opts_init(&o);
    o.max_connections = 0;
    o.idle_timeout_ms = 0;
    if (http_server_create(g.loop, &o, on_request, NULL, &g.srv) ||
        http_server_listen(g.srv, "127.0.0.1", port))
        return 1;
    printf("script_server listening on port %d\n", http_server_port(g.srv));
    fflush(stdout);
    uv_signal_t sigterm, sigint;
    uv_signal_init(g.loop, &sigterm);
    uv_signal_init(g.loop, &sigint);
    uv_signal_start(&sigterm, on_signal, SIGTERM);
    uv_signal_start(&sigint, on_signal, SIGINT);
    uv_run(g.loop, UV_RUN_DEFAULT);
    http_server_destroy(g.srv);
    free(g.last);
    return 0;
}
