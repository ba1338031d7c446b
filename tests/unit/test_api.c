/* The OpenAI HTTP helpers and metrics of libduet_base (linked without libduet: the proxy may use
 * them without MPI, UCX or CUDA): UTF-8 checks, the R1 reasoning split fed in every way a stream
 * can cut it, error JSON, field readers, bearer keys, request ids, Prometheus histograms, the
 * JSON writers of stream chunks (strings of every byte and numbers read back by cJSON). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "openai/api.h"
#include "check.h"
#include "openai/metrics.h"

static void test_utf8(void) {
    CHECK(api_utf8_valid("", 0));
    CHECK(api_utf8_valid("plain", 5));
    CHECK(api_utf8_valid("\xc3\xa9\xe4\xb8\x96\xf0\x9f\x99\x82", 9));
    CHECK(!api_utf8_valid("\xff", 1));
    CHECK(!api_utf8_valid("\xc0\x80", 2));         /* overlong NUL */
    CHECK(!api_utf8_valid("\xe0\x80\x80", 3));     /* overlong */
    CHECK(!api_utf8_valid("\xed\xa0\x80", 3));     /* surrogate */
    CHECK(!api_utf8_valid("\xf4\x90\x80\x80", 4)); /* past U+10FFFF */
    CHECK(!api_utf8_valid("\xe4\xb8", 2));         /* cut short */
    CHECK(!api_utf8_valid("a\x80", 2));
    CHECK_EQ_INT(api_utf8_prefix("ab\xe4\xb8", 4), 2);
    CHECK_EQ_INT(api_utf8_prefix("ab\xe4\xb8\x96", 5), 5);
    CHECK_EQ_INT(api_utf8_prefix("\xf0\x9f\x99", 3), 0);
    CHECK_EQ_INT(api_utf8_prefix("abc", 3), 3);
}

/* Feeds text cut at the given points and checks the two outputs. */
static void split_case(const char *text, const char *want_reason, const char *want_content,
                       const size_t *cuts, int n_cuts) {
    api_reasoner r;
    api_reasoner_init(&r);
    strbuf reason = {0}, content = {0};
    size_t at = 0, len = strlen(text);
    for (int i = 0; i <= n_cuts; i++) {
        size_t end = i < n_cuts ? cuts[i] : len;
        api_reasoner_feed(&r, text + at, end - at, &reason, &content);
        at = end;
    }
    api_reasoner_finish(&r, &reason, &content);
    CHECK_MSG(!strcmp(reason.p ? reason.p : "", want_reason), "'%s': reason '%s'", text,
              reason.p ? reason.p : "");
    CHECK_MSG(!strcmp(content.p ? content.p : "", want_content), "'%s': content '%s'", text,
              content.p ? content.p : "");
    strbuf_free(&reason);
    strbuf_free(&content);
}

static void reasoning_case(const char *text, const char *want_reason, const char *want_content) {
    size_t len = strlen(text);
    split_case(text, want_reason, want_content, NULL, 0);
    /* every single cut, every pair of cuts, and byte by byte */
    for (size_t a = 0; a <= len; a++) {
        split_case(text, want_reason, want_content, &a, 1);
        for (size_t b = a; b <= len; b++) {
            size_t cuts[2] = {a, b};
            split_case(text, want_reason, want_content, cuts, 2);
        }
    }
    size_t *all = malloc(len * sizeof *all);
    for (size_t i = 0; i < len; i++) all[i] = i;
    split_case(text, want_reason, want_content, all, (int)len);
    free(all);
}

static void test_reasoning(void) {
    reasoning_case("<think>\nweigh it</think>\n\nanswer", "\nweigh it", "\n\nanswer");
    reasoning_case("weigh it</think>answer", "weigh it", "answer");
    reasoning_case("no end tag at all", "no end tag at all", "");
    reasoning_case("<think>only reasoning", "only reasoning", "");
    reasoning_case("<thi", "<thi", "");
    reasoning_case("a</thin", "a</thin", "");
    reasoning_case("</think>", "", "");
    reasoning_case("x</think>y</think>z", "x", "y</think>z");
    reasoning_case("<<think>x</think>", "<<think>x", "");
    reasoning_case("", "", "");
}

static void test_errors(void) {
    char *s = api_error_json(400, "bad \"n\"", "n");
    cJSON *o = cJSON_Parse(s);
    cJSON *e = cJSON_GetObjectItem(o, "error");
    CHECK(e != NULL);
    CHECK(!strcmp(cJSON_GetObjectItem(e, "message")->valuestring, "bad \"n\""));
    CHECK(!strcmp(cJSON_GetObjectItem(e, "type")->valuestring, "BadRequestError"));
    CHECK(!strcmp(cJSON_GetObjectItem(e, "param")->valuestring, "n"));
    CHECK_EQ_INT(cJSON_GetObjectItem(e, "code")->valueint, 400);
    cJSON_Delete(o);
    cJSON_free(s);
    s = api_error_json(503, "busy", NULL);
    o = cJSON_Parse(s);
    e = cJSON_GetObjectItem(o, "error");
    CHECK(cJSON_IsNull(cJSON_GetObjectItem(e, "param")));
    CHECK(!strcmp(cJSON_GetObjectItem(e, "type")->valuestring, "ServiceUnavailableError"));
    cJSON_Delete(o);
    cJSON_free(s);
}

static void test_fields(void) {
    cJSON *b = cJSON_Parse("{\"n\": 2, \"x\": 1.5, \"s\": \"str\", \"t\": true, \"z\": null, "
                           "\"big\": 1e300, \"neg\": -3}");
    api_err e = {0};
    long long n = 7;
    CHECK(api_get_int(b, "n", 1, 10, &n, &e) == DUET_OK && n == 2);
    CHECK(api_get_int(b, "absent", 1, 10, &n, &e) == DUET_OK && n == 2);
    CHECK(api_get_int(b, "z", 1, 10, &n, &e) == DUET_OK && n == 2); /* null: the default */
    CHECK(api_get_int(b, "x", 1, 10, &n, &e) != DUET_OK);
    CHECK_EQ_INT(e.status, 400);
    CHECK(!strcmp(e.param, "x"));
    CHECK(strstr(e.message, "integer") != NULL);
    api_err e2 = {0};
    CHECK(api_get_int(b, "neg", 0, 10, &n, &e2) != DUET_OK && !strcmp(e2.param, "neg"));
    api_err e3 = {0};
    CHECK(api_get_int(b, "big", 0, 10, &n, &e3) != DUET_OK);
    api_err e4 = {0};
    double d = 0;
    CHECK(api_get_float(b, "x", 0, 2, &d, &e4) == DUET_OK && d == 1.5);
    CHECK(api_get_float(b, "s", 0, 2, &d, &e4) != DUET_OK && strstr(e4.message, "string"));
    api_err e5 = {0};
    bool t = false;
    CHECK(api_get_bool(b, "t", &t, &e5) == DUET_OK && t);
    CHECK(api_get_bool(b, "n", &t, &e5) != DUET_OK);
    api_err e6 = {0};
    const char *str = NULL;
    CHECK(api_get_string(b, "s", &str, &e6) == DUET_OK && !strcmp(str, "str"));
    CHECK(api_get_string(b, "n", &str, &e6) != DUET_OK);
    /* the first error wins */
    api_err e7 = {0};
    api_err_set(&e7, 404, "model", "first");
    api_err_set(&e7, 400, "n", "second");
    CHECK(e7.status == 404 && !strcmp(e7.message, "first"));
    cJSON_Delete(b);
}

static void test_auth_and_ids(void) {
    http_header h[2] = {{"Authorization", "Bearer sk-1"}, {"X-Request-Id", "req-42"}};
    http_req req = {.method = "GET", .path = "/", .headers = h, .num_headers = 2};
    CHECK(api_auth_ok(&req, NULL));
    CHECK(api_auth_ok(&req, "sk-1"));
    CHECK(!api_auth_ok(&req, "sk-2"));
    CHECK(!api_auth_ok(&req, "sk-10"));
    CHECK(!api_auth_ok(&req, "sk-"));
    char id[129];
    api_request_id(&req, id, sizeof id);
    CHECK(!strcmp(id, "req-42"));
    h[1].value = "bad\"id";
    api_request_id(&req, id, sizeof id);
    CHECK_EQ_INT(strlen(id), 32);
    char other[129];
    api_request_id(&req, other, sizeof other);
    CHECK(strcmp(id, other) != 0);
    req.num_headers = 0;
    CHECK(!api_auth_ok(&req, "sk-1"));
}

static void test_metrics(void) {
    met_registry *m = NULL;
    CHECK(met_create("my \"model\"", 100, &m) == DUET_OK);
    met_observe(m, MET_HIST_TTFT, 0.003);
    met_observe(m, MET_HIST_TTFT, 0.003);
    met_observe(m, MET_HIST_TTFT, 5000);
    met_observe(m, MET_HIST_PROMPT_TOKENS, 7);
    met_count_finish(m, "length");
    met_count_http(m, 200);
    met_gauges g = {.num_requests_running = 3, .kv_cache_usage = 0.25};
    char *text = NULL;
    size_t len = 0;
    CHECK(met_render(m, &g, &text, &len) == DUET_OK);
    CHECK(strlen(text) == len);
    const char *lab = "model_name=\"my \\\"model\\\"\"";
    char want[256];
    snprintf(want, sizeof want, "vllm:time_to_first_token_seconds_bucket{%s,le=\"0.001\"} 0\n",
             lab);
    CHECK(strstr(text, want) != NULL);
    snprintf(want, sizeof want, "vllm:time_to_first_token_seconds_bucket{%s,le=\"0.005\"} 2\n",
             lab);
    CHECK(strstr(text, want) != NULL);
    snprintf(want, sizeof want, "vllm:time_to_first_token_seconds_bucket{%s,le=\"+Inf\"} 3\n", lab);
    CHECK(strstr(text, want) != NULL);
    snprintf(want, sizeof want, "vllm:time_to_first_token_seconds_count{%s} 3\n", lab);
    CHECK(strstr(text, want) != NULL);
    /* 1-2-5 buckets up to max_model_len 100 */
    snprintf(want, sizeof want, "vllm:request_prompt_tokens_bucket{%s,le=\"100.0\"} 1\n", lab);
    CHECK(strstr(text, want) != NULL);
    snprintf(want, sizeof want, "vllm:request_prompt_tokens_bucket{%s,le=\"5.0\"} 0\n", lab);
    CHECK(strstr(text, want) != NULL);
    CHECK(strstr(text, "le=\"200.0\"") == NULL);
    snprintf(want, sizeof want, "vllm:request_success_total{%s,finished_reason=\"length\"} 1\n",
             lab);
    CHECK(strstr(text, want) != NULL);
    snprintf(want, sizeof want, "vllm:kv_cache_usage_perc{%s} 0.25\n", lab);
    CHECK(strstr(text, want) != NULL);
    CHECK(strstr(text, "# TYPE vllm:e2e_request_latency_seconds histogram\n") != NULL);
    /* without speculative decoding no spec_decode lines */
    CHECK(strstr(text, "spec_decode") == NULL);
    free(text);
    /* with MTP (k = 2): vLLM's spec_decode counters, one per-position line per draft */
    g.spec_k = 2;
    g.spec_num_drafts = 10;
    g.spec_num_draft_tokens = 20;
    g.spec_num_accepted_tokens = 13;
    g.spec_accepted_per_pos[0] = 8;
    g.spec_accepted_per_pos[1] = 5;
    CHECK(met_render(m, &g, &text, &len) == DUET_OK);
    const char *spec[] = {
        "vllm:spec_decode_num_drafts_total{%s} 10\n",
        "vllm:spec_decode_num_draft_tokens_total{%s} 20\n",
        "vllm:spec_decode_num_accepted_tokens_total{%s} 13\n",
        "vllm:spec_decode_num_accepted_tokens_per_pos_total{%s,position=\"0\"} 8\n",
        "vllm:spec_decode_num_accepted_tokens_per_pos_total{%s,position=\"1\"} 5\n"};
    for (size_t i = 0; i < sizeof spec / sizeof spec[0]; i++) {
        snprintf(want, sizeof want, spec[i], lab);
        CHECK_MSG(strstr(text, want) != NULL, "missing %s", want);
    }
    CHECK(strstr(text, "position=\"2\"") == NULL);
    free(text);
    met_destroy(m);
}

/* Every byte value, and random byte strings, written as a JSON string by api_json_str: cJSON
 * reads back exactly the input (up to the first NUL, where a C string ends), and no raw line
 * end reaches the event. Numbers read back as the value they were. */
static void test_json_writers(void) {
    strbuf b = {0};
    char in[256];
    for (int i = 0; i < 255; i++) in[i] = (char)(i + 1); /* 1..255: no NUL inside */
    in[255] = 0;
    uint64_t x = 88172645463325252ull;
    for (int round = 0; round < 200; round++) {
        size_t n = 255;
        if (round) { /* random strings weighted to the bytes that need escapes */
            n = (size_t)(x % 64);
            for (size_t i = 0; i < n; i++) {
                x ^= x << 13, x ^= x >> 7, x ^= x << 17;
                const char pick[] = "\"\\\n\r\t\b\f\x01\x1f\x7f/a\xc3\xa9";
                in[i] = x & 1 ? pick[(x >> 1) % (sizeof pick - 1)] : (char)(1 + (x >> 8) % 255);
            }
            in[n] = 0;
        }
        strbuf_clear(&b);
        strbuf_add(&b, "[", 1);
        api_json_str(&b, in, n);
        strbuf_add(&b, "]", 1);
        CHECK(!b.oom && !memchr(b.p, '\n', b.len) && !memchr(b.p, '\r', b.len));
        cJSON *a = cJSON_Parse(b.p);
        cJSON *str = cJSON_GetArrayItem(a, 0);
        CHECK_MSG(cJSON_IsString(str) && strlen(str->valuestring) == n &&
                      !memcmp(str->valuestring, in, n),
                  "round %d: %s", round, b.p);
        cJSON_Delete(a);
    }
    /* a NUL inside is escaped, not a cut */
    strbuf_clear(&b);
    api_json_str(&b, "a\0b", 3);
    CHECK_MSG(!strcmp(b.p, "\"a\\u0000b\""), "%s", b.p);
    const double nums[] = {0,
                           1,
                           -1,
                           42,
                           1e14,
                           -123456789012345.0,
                           0.5,
                           -0.125,
                           1.0 / 3,
                           -9999.0,
                           3.14159265358979,
                           1e-300,
                           2.5e20,
                           -7.1e-5};
    for (size_t i = 0; i < sizeof nums / sizeof nums[0]; i++) {
        strbuf_clear(&b);
        api_json_number(&b, nums[i]);
        cJSON *v = cJSON_Parse(b.p);
        CHECK_MSG(cJSON_IsNumber(v) && v->valuedouble == nums[i], "%.17g printed %s", nums[i], b.p);
        cJSON_Delete(v);
    }
    strbuf_clear(&b);
    api_json_number(&b, NAN);
    api_json_number(&b, -INFINITY);
    CHECK(!strcmp(b.p, "nullnull"));
    /* an event: "data: " + object + blank line, the buffer's memory kept */
    api_sse_begin(&b);
    strbuf_str(&b, "{}");
    char *mem = b.p;
    api_sse_begin(&b);
    CHECK(b.p == mem && b.len == 6 && !strcmp(b.p, "data: "));
    strbuf_free(&b);
}

int main(void) {
    test_json_writers();
    test_utf8();
    test_reasoning();
    test_errors();
    test_fields();
    test_auth_and_ids();
    test_metrics();
    CHECK_DONE();
}
