/* The DeepSeek tool-call parser on the token streams the real tokenizer makes of tool-call
 * markup (V3/R1 and V3.1 formats), fed token by token through the streaming detokenizer as the
 * engine streams them, and on the same text cut at every byte. The expected results are those of
 * vLLM's deepseek_v3 / deepseek_v31 parsers (their extract_tool_calls regexes) for well-formed
 * markup, and the documented fallback to plain content for malformed markup (see api.h). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "base/log.h"
#include "check.h"
#include "openai/api.h"
#include "text/tokenizer.h"

#define CB                  "<｜tool▁calls▁begin｜>"
#define CBE                 "<｜tool▁calls▁end｜>"
#define C1                  "<｜tool▁call▁begin｜>"
#define CE                  "<｜tool▁call▁end｜>"
#define SEP                 "<｜tool▁sep｜>"
#define V3CALL(name, args)  C1 "function" SEP name "\n```json\n" args "\n```" CE
#define V31CALL(name, args) C1 name SEP args CE

#define V3  API_TOOL_FORMAT_DEEPSEEK_V3
#define V31 API_TOOL_FORMAT_DEEPSEEK_V31

/* Arguments with non-ASCII text, JSON escapes, a backslash and an emoji. */
#define UNI_ARGS                                                                                   \
    "{\"city\": \"東京\", \"note\": \"say \\\"hi\\\"\\n\\u00e9 \\\\ 😀\", \"n\": [1, 2.5, null]}"
#define UNI_ARGS_JSON                                                                              \
    "{\\\"city\\\": \\\"東京\\\", \\\"note\\\": \\\"say \\\\\\\"hi\\\\\\\"\\\\n\\\\u00e9 "       \
    "\\\\\\\\ 😀\\\", \\\"n\\\": [1, 2.5, null]}"

typedef struct tcase {
    const char *name;
    api_tool_format fmt;
    const char *text;
    /* the non-streamed answer: {"content": string or null, "calls": [[name, arguments], ...]} */
    const char *want;
    /* the streamed events, concatenated: {"content": string, "calls": [[name, arguments]]};
     * NULL: the same as want (null content as "") */
    const char *stream;
} tcase;

static const tcase CASES[] = {
    {"v3 one call after content", V3,
     "Let me check." CB V3CALL("get_weather", "{\"city\": \"Paris\"}") CBE,
     "{\"content\":\"Let me check.\",\"calls\":[[\"get_weather\",\"{\\\"city\\\": "
     "\\\"Paris\\\"}\"]]}",
     NULL},
    {"v3 two calls", V3, CB V3CALL("f", "{\"a\": 1}") "\n" V3CALL("g", "{}") CBE,
     "{\"content\":null,\"calls\":[[\"f\",\"{\\\"a\\\": 1}\"],[\"g\",\"{}\"]]}", NULL},
    {"v3 unicode and escapes", V3, "Ok " CB V3CALL("lookup", UNI_ARGS) CBE,
     "{\"content\":\"Ok \",\"calls\":[[\"lookup\",\"" UNI_ARGS_JSON "\"]]}", NULL},
    {"v3 r1 answer after reasoning", V3, "\n\n" CB V3CALL("f", "{}") CBE,
     "{\"content\":\"\\n\\n\",\"calls\":[[\"f\",\"{}\"]]}", NULL},
    {"v3 text after the calls is dropped", V3, CB V3CALL("f", "{}") CBE "\nThat is all.",
     "{\"content\":null,\"calls\":[[\"f\",\"{}\"]]}", NULL},
    {"v3 second call malformed", V3, CB V3CALL("f", "{}") "\n" C1 "function" SEP "g\n{}" CE CBE,
     "{\"content\":null,\"calls\":[[\"f\",\"{}\"]]}", NULL},
    {"v3 wrong type", V3, "x" CB C1 "tool" SEP "f\n```json\n{}\n```" CE CBE,
     "{\"content\":\"x" CB C1 "tool" SEP "f\\n```json\\n{}\\n```" CE CBE "\",\"calls\":[]}", NULL},
    {"v3 no fence", V3, CB C1 "function" SEP "f\n{\"a\": 1}" CE CBE,
     "{\"content\":\"" CB C1 "function" SEP "f\\n{\\\"a\\\": 1}" CE CBE "\",\"calls\":[]}", NULL},
    {"v3 cut short in the arguments", V3, "ok" CB C1 "function" SEP "f\n```json\n{\"a\": \"unfin",
     "{\"content\":\"ok" CB C1 "function" SEP "f\\n```json\\n{\\\"a\\\": \\\"unfin\",\"calls\":[]}",
     "{\"content\":\"ok\",\"calls\":[[\"f\",\"{\\\"a\\\": \\\"unfin\"]]}"},
    {"v3 lookalikes", V3, "a <｜tool b <b>c</b> <｜tool▁calls",
     "{\"content\":\"a <｜tool b <b>c</b> <｜tool▁calls\",\"calls\":[]}", NULL},
    {"v3 block never closed", V3, "hi " CB, "{\"content\":\"hi " CB "\",\"calls\":[]}", NULL},
    {"v31 one call", V31, CB V31CALL("get_weather", "{\"city\": \"Paris\"}") CBE,
     "{\"content\":null,\"calls\":[[\"get_weather\",\"{\\\"city\\\": \\\"Paris\\\"}\"]]}", NULL},
    {"v31 two calls after content", V31,
     "Sure." CB V31CALL("f", "{\"a\":1}") V31CALL("g", "{}") CBE,
     "{\"content\":\"Sure.\",\"calls\":[[\"f\",\"{\\\"a\\\":1}\"],[\"g\",\"{}\"]]}", NULL},
    {"v31 unicode and escapes", V31, CB V31CALL("lookup", UNI_ARGS) CBE,
     "{\"content\":null,\"calls\":[[\"lookup\",\"" UNI_ARGS_JSON "\"]]}", NULL},
    {"v31 name over two lines", V31, CB C1 "get\nweather" SEP "{}" CE CBE,
     "{\"content\":\"" CB C1 "get\\nweather" SEP "{}" CE CBE "\",\"calls\":[]}", NULL},
    {"v31 no separator", V31, CB C1 "get_weather{}" CE CBE,
     "{\"content\":\"" CB C1 "get_weather{}" CE CBE "\",\"calls\":[]}", NULL},
    {"v31 call closed by the block end", V31, CB C1 "f" SEP "{\"a\":1}" CBE,
     "{\"content\":\"" CB C1 "f" SEP "{\\\"a\\\":1}" CBE "\",\"calls\":[]}",
     "{\"content\":\"\",\"calls\":[[\"f\",\"{\\\"a\\\":1}\"]]}"},
    {"v31 plain text", V31, "Hello <b>world</b> ｜ ▁ done",
     "{\"content\":\"Hello <b>world</b> ｜ ▁ done\",\"calls\":[]}", NULL},
};

static tok_tokenizer *g_tok;

/* The events of one run, concatenated per kind. */
typedef struct collect {
    strbuf content;
    char names[8][64], ids[8][48];
    strbuf args[8];
    int n_calls, n_args_events;
    bool order_ok;
} collect;

static void on_event(void *user, const api_tool_event *ev) {
    collect *c = user;
    CHECK(ev->kind == API_TOOL_EVENT_CALL || ev->len > 0); /* no empty deltas */
    switch (ev->kind) {
    case API_TOOL_EVENT_CONTENT:
        /* content comes before any call */
        if (c->n_calls) c->order_ok = false;
        strbuf_add(&c->content, ev->text, ev->len);
        break;
    case API_TOOL_EVENT_CALL:
        if (ev->index != c->n_calls || c->n_calls >= 8) {
            c->order_ok = false;
            break;
        }
        snprintf(c->names[c->n_calls], sizeof c->names[0], "%s", ev->name);
        snprintf(c->ids[c->n_calls], sizeof c->ids[0], "%s", ev->id);
        c->n_calls++;
        break;
    case API_TOOL_EVENT_ARGS:
        /* arguments belong to the call last started */
        if (ev->index != c->n_calls - 1 || ev->index < 0) {
            c->order_ok = false;
            break;
        }
        strbuf_add(&c->args[ev->index], ev->text, ev->len);
        c->n_args_events++;
        break;
    }
}

static void collect_free(collect *c) {
    strbuf_free(&c->content);
    for (int i = 0; i < 8; i++) strbuf_free(&c->args[i]);
}

static bool id_ok(const char *id) {
    if (strncmp(id, "chatcmpl-tool-", 14) != 0 || strlen(id) != 14 + 32) return false;
    for (const char *p = id + 14; *p; p++)
        if (!strchr("0123456789abcdef", *p)) return false;
    return true;
}

/* Checks the streamed events against stream (or want) and the final answer against want. */
static void verify(const tcase *t, const char *how, api_tool_parser *p, collect *c, int started) {
    cJSON *want = cJSON_Parse(t->want), *stream = cJSON_Parse(t->stream ? t->stream : t->want);
    CHECK_MSG(want && stream, "%s: bad expectation JSON", t->name);
    if (!want || !stream) goto out;
    CHECK_MSG(c->order_ok, "%s (%s): events out of order", t->name, how);
    /* streamed */
    const cJSON *sc = cJSON_GetObjectItem(stream, "content");
    const char *want_content = cJSON_IsString(sc) ? sc->valuestring : "";
    const char *got = c->content.p ? c->content.p : "";
    CHECK_MSG(c->content.len == strlen(want_content) && !strcmp(got, want_content),
              "%s (%s): streamed content\n got  [%s]\n want [%s]", t->name, how, got, want_content);
    const cJSON *calls = cJSON_GetObjectItem(stream, "calls");
    CHECK_MSG(c->n_calls == cJSON_GetArraySize(calls) && started == c->n_calls,
              "%s (%s): %d calls streamed, want %d", t->name, how, c->n_calls,
              cJSON_GetArraySize(calls));
    for (int i = 0; i < c->n_calls && i < cJSON_GetArraySize(calls); i++) {
        const cJSON *w = cJSON_GetArrayItem(calls, i);
        const char *wn = cJSON_GetArrayItem(w, 0)->valuestring;
        const char *wa = cJSON_GetArrayItem(w, 1)->valuestring;
        const char *ga = c->args[i].p ? c->args[i].p : "";
        CHECK_MSG(!strcmp(c->names[i], wn), "%s (%s): call %d name [%s]", t->name, how, i,
                  c->names[i]);
        CHECK_MSG(c->args[i].len == strlen(wa) && !strcmp(ga, wa),
                  "%s (%s): call %d arguments\n got  [%s]\n want [%s]", t->name, how, i, ga, wa);
        CHECK_MSG(id_ok(c->ids[i]), "%s: id %s", t->name, c->ids[i]);
        for (int j = 0; j < i; j++) CHECK(strcmp(c->ids[i], c->ids[j]) != 0);
    }
    /* non-streamed */
    size_t len;
    const char *content = api_tool_parser_content(p, &len);
    const cJSON *wc = cJSON_GetObjectItem(want, "content");
    if (cJSON_IsNull(wc)) {
        CHECK_MSG(content == NULL && len == 0, "%s (%s): content should be null", t->name, how);
    } else {
        CHECK_MSG(content && len == strlen(wc->valuestring) &&
                      !memcmp(content, wc->valuestring, len),
                  "%s (%s): content\n got  [%.*s]\n want [%s]", t->name, how, (int)len,
                  content ? content : "", wc->valuestring);
    }
    calls = cJSON_GetObjectItem(want, "calls");
    CHECK_MSG(api_tool_parser_n_calls(p) == cJSON_GetArraySize(calls), "%s (%s): %d calls", t->name,
              how, api_tool_parser_n_calls(p));
    cJSON *json = api_tool_calls_json(p);
    CHECK(cJSON_GetArraySize(json) == cJSON_GetArraySize(calls));
    for (int i = 0; i < cJSON_GetArraySize(json) && i < cJSON_GetArraySize(calls); i++) {
        const cJSON *g = cJSON_GetArrayItem(json, i), *w = cJSON_GetArrayItem(calls, i);
        const cJSON *fn = cJSON_GetObjectItem(g, "function");
        CHECK(!strcmp(cJSON_GetObjectItem(g, "type")->valuestring, "function"));
        CHECK(id_ok(cJSON_GetObjectItem(g, "id")->valuestring));
        /* the same call, id included, as streamed */
        CHECK(!strcmp(cJSON_GetObjectItem(g, "id")->valuestring, c->ids[i]));
        CHECK(!strcmp(cJSON_GetObjectItem(fn, "name")->valuestring,
                      cJSON_GetArrayItem(w, 0)->valuestring));
        CHECK_MSG(!strcmp(cJSON_GetObjectItem(fn, "arguments")->valuestring,
                          cJSON_GetArrayItem(w, 1)->valuestring),
                  "%s (%s): final arguments %s", t->name, how,
                  cJSON_GetObjectItem(fn, "arguments")->valuestring);
    }
    cJSON_Delete(json);
out:
    cJSON_Delete(want);
    cJSON_Delete(stream);
}

/* Feeds text in pieces ending at cuts[0..n_cuts) (then the rest). */
static void run_pieces(const tcase *t, const size_t *cuts, int n_cuts, const char *how) {
    api_tool_parser *p = NULL;
    CHECK(api_tool_parser_create(t->fmt, &p) == DUET_OK);
    if (!p) return;
    collect c = {.order_ok = true};
    size_t len = strlen(t->text), at = 0;
    for (int i = 0; i <= n_cuts; i++) {
        size_t end = i < n_cuts ? cuts[i] : len;
        CHECK(api_tool_parser_feed(p, t->text + at, end - at, on_event, &c) == DUET_OK);
        at = end;
    }
    int started = api_tool_parser_finish(p, on_event, &c);
    verify(t, how, p, &c, started);
    collect_free(&c);
    api_tool_parser_destroy(p);
}

/* Token by token, as the engine streams: ids from the real tokenizer, text from the streaming
 * detokenizer (special tokens skipped, as the server does: the markup tokens are not special). */
static int run_tokens(const tcase *t) {
    int32_t *ids = NULL;
    size_t n = 0;
    CHECK(tok_encode(g_tok, t->text, strlen(t->text), false, &ids, &n) == DUET_OK);
    tok_stream *s = NULL;
    api_tool_parser *p = NULL;
    CHECK(tok_stream_create(g_tok, true, &s) == DUET_OK);
    CHECK(api_tool_parser_create(t->fmt, &p) == DUET_OK);
    collect c = {.order_ok = true};
    for (size_t i = 0; s && p && i < n; i++) {
        const char *text;
        size_t len;
        CHECK(tok_stream_put(s, ids[i], &text, &len) == DUET_OK);
        CHECK(api_tool_parser_feed(p, text, len, on_event, &c) == DUET_OK);
    }
    int events = 0;
    if (s && p) {
        const char *text;
        size_t len;
        tok_stream_finish(s, &text, &len);
        CHECK(api_tool_parser_feed(p, text, len, on_event, &c) == DUET_OK);
        int started = api_tool_parser_finish(p, on_event, &c);
        verify(t, "token by token", p, &c, started);
        events = c.n_args_events;
    }
    collect_free(&c);
    api_tool_parser_destroy(p);
    tok_stream_destroy(s);
    free(ids);
    return events;
}

static void test_cases(void) {
    /* the markup is one token each in the real vocabulary */
    const char *marks[] = {CB, CBE, C1, CE, SEP};
    for (int i = 0; i < 5; i++) {
        int32_t *ids = NULL;
        size_t n = 0;
        CHECK(tok_encode(g_tok, marks[i], strlen(marks[i]), false, &ids, &n) == DUET_OK);
        CHECK_MSG(n == 1 && ids[0] >= 128806 && ids[0] <= 128814 && !tok_is_special(g_tok, ids[0]),
                  "%s", marks[i]);
        free(ids);
    }
    for (size_t k = 0; k < sizeof CASES / sizeof *CASES; k++) {
        const tcase *t = &CASES[k];
        run_pieces(t, NULL, 0, "whole");
        int args_events = run_tokens(t);
        /* arguments stream as they come, not at the end */
        if (strstr(t->name, "unicode")) CHECK_MSG(args_events >= 5, "%s: %d", t->name, args_events);
        size_t len = strlen(t->text);
        for (size_t cut = 1; cut < len; cut++) {
            char how[32];
            snprintf(how, sizeof how, "split at %zu", cut);
            run_pieces(t, &cut, 1, how);
        }
        size_t *every = malloc(len * sizeof *every);
        if (every) {
            for (size_t i = 0; i + 1 < len; i++) every[i] = i + 1;
            run_pieces(t, every, (int)len - 1, "byte by byte");
            free(every);
        }
    }
}

static void test_json_shapes(void) {
    api_tool_event call = {
        .kind = API_TOOL_EVENT_CALL, .index = 1, .id = "chatcmpl-tool-x", .name = "f"};
    api_tool_event args = {.kind = API_TOOL_EVENT_ARGS, .index = 1, .text = "{\"a\"", .len = 4};
    api_tool_event content = {.kind = API_TOOL_EVENT_CONTENT, .text = "x", .len = 1};
    cJSON *a = api_tool_event_json(&call), *b = api_tool_event_json(&args);
    char *sa = cJSON_PrintUnformatted(a), *sb = cJSON_PrintUnformatted(b);
    CHECK_MSG(sa && !strcmp(sa, "{\"index\":1,\"id\":\"chatcmpl-tool-x\",\"type\":\"function\","
                                "\"function\":{\"name\":\"f\"}}"),
              "%s", sa);
    CHECK_MSG(sb && !strcmp(sb, "{\"index\":1,\"function\":{\"arguments\":\"{\\\"a\\\"\"}}"), "%s",
              sb);
    CHECK(api_tool_event_json(&content) == NULL);
    cJSON_free(sa);
    cJSON_free(sb);
    cJSON_Delete(a);
    cJSON_Delete(b);

    api_tool_format f;
    CHECK(api_tool_format_parse("deepseek_v3", &f) == DUET_OK && f == V3);
    CHECK(api_tool_format_parse("deepseek_v31", &f) == DUET_OK && f == V31);
    CHECK(api_tool_format_parse("hermes", &f) == DUET_ERR_NOT_FOUND);
    api_tool_parser *p = NULL;
    CHECK(api_tool_parser_create((api_tool_format)7, &p) == DUET_ERR_INVALID && !p);
    api_tool_parser_destroy(NULL);
    /* no callback: the non-streamed answer alone */
    CHECK(api_tool_parser_create(V31, &p) == DUET_OK);
    const char *text = CB V31CALL("f", "{}") CBE;
    CHECK(api_tool_parser_feed(p, text, strlen(text), NULL, NULL) == DUET_OK);
    CHECK(api_tool_parser_finish(p, NULL, NULL) == 1);
    cJSON *calls = api_tool_calls_json(p);
    char *s = cJSON_PrintUnformatted(calls);
    CHECK_MSG(s && strstr(s, "\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":"
                             "\"{}\"}}]"),
              "%s", s);
    cJSON_free(s);
    cJSON_Delete(calls);
    api_tool_parser_destroy(p);
}

int main(void) {
    log_set_level(LOG_LEVEL_ERROR);
    if (tok_load(GOLDEN_DIR "/tokenizer", &g_tok) != DUET_OK) {
        fprintf(stderr, "cannot load the golden tokenizer\n");
        return 1;
    }
    test_cases();
    test_json_shapes();
    tok_destroy(g_tok);
    CHECK_DONE();
}
