/* duet-bench's modules on their own: the metric definitions against values worked out by hand
 * (numpy's percentile and std conventions), the printed table's layout, the result keys, the
 * SSE reader fed in awkward pieces, the datasets' lengths and id ranges, and the arrival
 * process's rate and spread. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_data.h"
#include "bench_sse.h"
#include "bench_stats.h"
#include "check.h"
#include "testutil.h"

static void test_percentiles(void) {
    const double v[4] = {1, 2, 3, 4};
    CHECK_NEAR(bst_percentile(v, 4, 50), 2.5, 1e-12);
    CHECK_NEAR(bst_percentile(v, 4, 99), 3.97, 1e-12);
    CHECK_NEAR(bst_percentile(v, 4, 0), 1, 1e-12);
    CHECK_NEAR(bst_percentile(v, 4, 100), 4, 1e-12);
    CHECK_NEAR(bst_percentile(v, 1, 90), 1, 1e-12);
    CHECK_NEAR(bst_percentile(v, 0, 90), 0, 1e-12);

    bst_config cfg = {0};
    char err[256];
    CHECK(bst_parse_percentiles("25,99.9", &cfg, err, sizeof err) == DUET_OK);
    CHECK_EQ_INT(cfg.n_percentiles, 2);
    const double s[4] = {0.4, 0.1, 0.3, 0.2}; /* unsorted on purpose */
    bst_summary sum;
    CHECK(bst_summarize(s, 4, &cfg, &sum) == DUET_OK);
    CHECK_NEAR(sum.mean, 250, 1e-9);
    CHECK_NEAR(sum.median, 250, 1e-9);
    CHECK_NEAR(sum.std, sqrt(0.0125) * 1000, 1e-9); /* population std, as numpy.std */
    CHECK_NEAR(sum.pct[0], 175, 1e-9);
    CHECK_NEAR(sum.pct[1], 399.7, 1e-9);
    CHECK(s[0] == 0.4); /* input untouched */
    CHECK(bst_summarize(s, 0, &cfg, &sum) == DUET_OK);
    CHECK(sum.mean == 0 && sum.median == 0 && sum.pct[1] == 0);

    char w[32];
    bst_percentile_word(99, w, sizeof w);
    CHECK(!strcmp(w, "99"));
    bst_percentile_word(99.9, w, sizeof w);
    CHECK(!strcmp(w, "99.9"));
    bst_percentile_word(0.1, w, sizeof w);
    CHECK(!strcmp(w, "0.1"));
}

static void test_parse(void) {
    bst_config cfg = {0};
    char err[256];
    CHECK(bst_parse_metrics("ttft,e2el", &cfg, err, sizeof err) == DUET_OK);
    CHECK(cfg.metrics == ((1u << BST_METRIC_TTFT) | (1u << BST_METRIC_E2EL)));
    CHECK(bst_parse_metrics("ttft,latency", &cfg, err, sizeof err) == DUET_ERR_INVALID);
    CHECK(strstr(err, "latency") != NULL);
    CHECK(bst_parse_metrics("client_queue_time", &cfg, err, sizeof err) == DUET_OK);
    CHECK(bst_parse_percentiles("101", &cfg, err, sizeof err) == DUET_ERR_INVALID);
    CHECK(bst_parse_percentiles("50,x", &cfg, err, sizeof err) == DUET_ERR_INVALID);
    CHECK(bst_parse_goodput("ttft:100", &cfg, err, sizeof err) == DUET_OK);
    CHECK(cfg.goodput && cfg.slo_set[0] && cfg.slo_ms[0] == 100 && !cfg.slo_set[1]);
    CHECK(bst_parse_goodput("e2el:2500.5", &cfg, err, sizeof err) == DUET_OK);
    CHECK(cfg.slo_set[2] && cfg.slo_ms[2] == 2500.5);
    CHECK(bst_parse_goodput("tpot:-1", &cfg, err, sizeof err) == DUET_ERR_INVALID);
    CHECK(bst_parse_goodput("itl:5", &cfg, err, sizeof err) == DUET_ERR_INVALID);
    CHECK(bst_parse_goodput("ttft", &cfg, err, sizeof err) == DUET_ERR_INVALID);
    CHECK(bst_parse_goodput("ttft:", &cfg, err, sizeof err) == DUET_ERR_INVALID);
}

/* Three requests: one with usage, one without (its chunks count), one failed. */
static void make_requests(bst_request r[3]) {
    memset(r, 0, 3 * sizeof *r);
    r[0] = (bst_request){.success = true,
                         .prompt_len = 10,
                         .output_tokens = 5,
                         .ttft = 0.1,
                         .latency = 0.5,
                         .start_time = 0.0,
                         .n_chunks = 5};
    for (int i = 0; i < 4; i++) bst_request_add_itl(&r[0], 0.1);
    r[1] = (bst_request){.success = true,
                         .prompt_len = 20,
                         .ttft = 0.2,
                         .latency = 0.4,
                         .start_time = 0.3,
                         .n_chunks = 3};
    for (int i = 0; i < 2; i++) bst_request_add_itl(&r[1], 0.1);
    bst_request_add_text(&r[1], "ab", 2);
    bst_request_add_text(&r[1], "c", 1);
    r[2] = (bst_request){.success = false, .prompt_len = 7, .start_time = 0.1};
    r[2].error = strdup("HTTP 500: boom");
}

static void test_compute(void) {
    bst_request r[3];
    make_requests(r);
    CHECK(r[1].text && !strcmp(r[1].text, "abc"));
    bst_config cfg = {0};
    char err[256];
    CHECK(bst_parse_metrics("ttft,tpot,itl,e2el", &cfg, err, sizeof err) == DUET_OK);
    CHECK(bst_parse_percentiles("50,99", &cfg, err, sizeof err) == DUET_OK);
    CHECK(bst_parse_goodput("ttft:120", &cfg, err, sizeof err) == DUET_OK);
    bst_result res;
    CHECK(bst_compute(r, 3, 2.0, &cfg, &res) == DUET_OK);
    CHECK_EQ_INT(res.completed, 2);
    CHECK_EQ_INT(res.failed, 1);
    CHECK_EQ_INT(res.total_input, 30); /* the failed request's prompt does not count */
    CHECK_EQ_INT(res.total_output, 8); /* 5 from usage + 3 chunks */
    CHECK_EQ_INT(res.output_lens[0], 5);
    CHECK_EQ_INT(res.output_lens[1], 3);
    CHECK_EQ_INT(res.output_lens[2], 0);
    CHECK_NEAR(res.request_throughput, 1.0, 1e-12);
    CHECK_NEAR(res.output_throughput, 4.0, 1e-12);
    CHECK_NEAR(res.total_token_throughput, 19.0, 1e-12);
    CHECK_NEAR(res.request_goodput, 0.5, 1e-12); /* only r0 has TTFT <= 120 ms */
    /* TPOT: (0.5 - 0.1) / 4 and (0.4 - 0.2) / 2 */
    CHECK_NEAR(res.s[BST_METRIC_TPOT].mean, 100, 1e-9);
    CHECK_NEAR(res.s[BST_METRIC_TTFT].mean, 150, 1e-9);
    CHECK_NEAR(res.s[BST_METRIC_TTFT].pct[1], 199, 1e-9);
    CHECK_NEAR(res.s[BST_METRIC_E2EL].median, 450, 1e-9);
    CHECK_NEAR(res.s[BST_METRIC_ITL].mean, 100, 1e-9);
    CHECK_NEAR(res.s[BST_METRIC_ITL].std, 0, 1e-9);
    /* chunk times 0.1..0.5 and 0.5..0.7 all fall in the first second; [0, 0.5) and [0.3, 0.7)
     * overlap */
    CHECK_NEAR(res.max_output_tokens_per_s, 8, 1e-12);
    CHECK_EQ_INT(res.max_concurrent_requests, 2);

    /* a request starting exactly when another ends does not overlap it */
    r[1].start_time = 0.5;
    bst_result res2;
    CHECK(bst_compute(r, 3, 2.0, &cfg, &res2) == DUET_OK);
    CHECK_EQ_INT(res2.max_concurrent_requests, 1);
    bst_result_cleanup(&res2);

    /* a one-token answer has no TPOT but counts as TPOT 0 against a bound */
    bst_request one = {
        .success = true, .output_tokens = 1, .ttft = 0.05, .latency = 0.05, .n_chunks = 1};
    bst_config c2 = cfg;
    c2.slo_set[0] = false;
    CHECK(bst_parse_goodput("tpot:1", &c2, err, sizeof err) == DUET_OK);
    CHECK(bst_compute(&one, 1, 1.0, &c2, &res2) == DUET_OK);
    CHECK_NEAR(res2.s[BST_METRIC_TPOT].mean, 0, 1e-12);
    CHECK_NEAR(res2.request_goodput, 1, 1e-12);
    bst_result_cleanup(&res2);

    /* the table */
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    bst_run_info info = {.max_concurrency = 4, .request_rate = INFINITY};
    bst_print(f, &res, &cfg, &info);
    fclose(f);
    const char *head = "============ Serving Benchmark Result ============\n"
                       "Successful requests:                     2         \n"
                       "Failed requests:                         1         \n"
                       "Maximum request concurrency:             4         \n"
                       "Benchmark duration (s):                  2.00      \n"
                       "Total input tokens:                      30        \n"
                       "Total generated tokens:                  8         \n"
                       "Request throughput (req/s):              1.00      \n"
                       "Request goodput (req/s):                 0.50      \n"
                       "Output token throughput (tok/s):         4.00      \n";
    CHECK(!strncmp(buf, head, strlen(head)));
    CHECK(strstr(buf, "---------------Time to First Token----------------\n"
                      "Mean TTFT (ms):                          150.00    \n"
                      "Median TTFT (ms):                        150.00    \n"
                      "P50 TTFT (ms):                           150.00    \n"
                      "P99 TTFT (ms):                           199.00    \n") != NULL);
    CHECK(strstr(buf, "-----Time per Output Token (excl. 1st token)------\n") != NULL);
    CHECK(strstr(buf, "----------------End-to-end Latency----------------\n") != NULL);
    CHECK(strstr(buf, "Request rate configured") == NULL); /* inf is not printed */
    CHECK(strstr(buf, "\n==================================================\n") != NULL);
    free(buf);

    /* the JSON */
    cJSON *root = cJSON_CreateObject();
    bst_json_add(root, r, 3, &res, &cfg, true);
    static const char *const keys[] = {"duration",
                                       "completed",
                                       "failed",
                                       "total_input_tokens",
                                       "total_output_tokens",
                                       "request_throughput",
                                       "request_goodput",
                                       "output_throughput",
                                       "total_token_throughput",
                                       "latencies",
                                       "queue_times",
                                       "errors",
                                       "input_lens",
                                       "output_lens",
                                       "start_times",
                                       "ttfts",
                                       "itls",
                                       "generated_texts",
                                       "max_output_tokens_per_s",
                                       "max_concurrent_requests",
                                       "mean_ttft_ms",
                                       "median_ttft_ms",
                                       "std_ttft_ms",
                                       "p50_ttft_ms",
                                       "p99_ttft_ms",
                                       "mean_tpot_ms",
                                       "p99_itl_ms",
                                       "std_e2el_ms"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        CHECK_MSG(cJSON_HasObjectItem(root, keys[i]), "key %s", keys[i]);
    CHECK(!cJSON_HasObjectItem(root, "mean_client_queue_time_ms"));
    CHECK_NEAR(cJSON_GetObjectItem(root, "request_goodput")->valuedouble, 0.5, 1e-12);
    CHECK(!strcmp(cJSON_GetArrayItem(cJSON_GetObjectItem(root, "errors"), 2)->valuestring,
                  "HTTP 500: boom"));
    CHECK_EQ_INT(cJSON_GetArraySize(cJSON_GetArrayItem(cJSON_GetObjectItem(root, "itls"), 0)), 4);
    CHECK(!strcmp(cJSON_GetArrayItem(cJSON_GetObjectItem(root, "generated_texts"), 1)->valuestring,
                  "abc"));
    cJSON_Delete(root);
    /* not detailed: the per-request lists that vLLM drops are not there */
    root = cJSON_CreateObject();
    cfg.goodput = false;
    bst_json_add(root, r, 3, &res, &cfg, false);
    CHECK(!cJSON_HasObjectItem(root, "itls") && !cJSON_HasObjectItem(root, "ttfts"));
    CHECK(cJSON_IsNull(cJSON_GetObjectItem(root, "request_goodput")));
    CHECK(cJSON_HasObjectItem(root, "errors"));
    cJSON_Delete(root);
    bst_result_cleanup(&res);
    for (int i = 0; i < 3; i++) bst_request_cleanup(&r[i]);
}

typedef struct events {
    char got[8][128];
    int n;
} events;

static int collect(void *arg, const char *data, size_t len) {
    events *e = arg;
    CHECK(strlen(data) == len);
    if (e->n < 8) snprintf(e->got[e->n++], sizeof e->got[0], "%s", data);
    return !strcmp(data, "stop") ? 7 : 0;
}

static void test_sse(void) {
    const char *stream = "data: {\"a\":1}\n\n: a comment\n\nevent: x\r\ndata: two\r\n"
                         "data:lines\r\n\r\nid: 3\n\ndata: [DONE]\n";
    /* every split of the stream into two pieces gives the same events */
    for (size_t cut = 0; cut <= strlen(stream); cut++) {
        bsse_reader r;
        bsse_init(&r);
        events e = {0};
        CHECK(bsse_feed(&r, stream, cut, collect, &e) == 0);
        CHECK(bsse_feed(&r, stream + cut, strlen(stream) - cut, collect, &e) == 0);
        CHECK_EQ_INT(e.n, 2);
        CHECK(bsse_finish(&r, collect, &e) == 0); /* the last event had no empty line */
        CHECK_EQ_INT(e.n, 3);
        CHECK(!strcmp(e.got[0], "{\"a\":1}"));
        CHECK(!strcmp(e.got[1], "two\nlines"));
        CHECK(!strcmp(e.got[2], "[DONE]"));
        bsse_cleanup(&r);
    }
    /* byte by byte, and a callback that stops the reader */
    bsse_reader r;
    bsse_init(&r);
    events e = {0};
    const char *s2 = "data: x\n\ndata: stop\n\ndata: y\n\n";
    int rc = 0;
    for (size_t i = 0; i < strlen(s2) && !rc; i++) rc = bsse_feed(&r, s2 + i, 1, collect, &e);
    CHECK_EQ_INT(rc, 7);
    CHECK_EQ_INT(e.n, 2);
    bsse_cleanup(&r);
    /* nothing but a partial line at the end: no event */
    bsse_init(&r);
    e.n = 0;
    CHECK(bsse_feed(&r, ": ping\n\n", 8, collect, &e) == 0);
    CHECK(bsse_finish(&r, collect, &e) == 0);
    CHECK_EQ_INT(e.n, 0);
    bsse_cleanup(&r);
}

static void test_random(void) {
    char err[256];
    bds_random_opts o = {.input_len = 100, .output_len = 20, .prefix_len = 7, .range_ratio = 0.5};
    bds_set a, b2;
    CHECK(bds_random(NULL, 0, &o, 10, 1, &a, err, sizeof err) == DUET_ERR_INVALID);
    CHECK(bds_random(NULL, 1000, &o, 200, 1, &a, err, sizeof err) == DUET_OK);
    CHECK(bds_random(NULL, 1000, &o, 200, 1, &b2, err, sizeof err) == DUET_OK);
    CHECK_EQ_INT(a.n, 200);
    int min_in = 1 << 30, max_in = 0, min_out = 1 << 30, max_out = 0;
    bool same = true;
    for (int i = 0; i < a.n; i++) {
        const bds_item *it = &a.items[i];
        int inner = it->n_ids - 7;
        if (inner < min_in) min_in = inner;
        if (inner > max_in) max_in = inner;
        if (it->output_len < min_out) min_out = it->output_len;
        if (it->output_len > max_out) max_out = it->output_len;
        CHECK(it->prompt_len == it->n_ids && it->text == NULL);
        for (int k = 0; k < it->n_ids; k++) CHECK(it->ids[k] >= 0 && it->ids[k] < 1000);
        /* the prefix is the same for all */
        CHECK(!memcmp(it->ids, a.items[0].ids, 7 * sizeof(int32_t)));
        same = same && it->n_ids == b2.items[i].n_ids &&
               !memcmp(it->ids, b2.items[i].ids, (size_t)it->n_ids * sizeof(int32_t));
    }
    CHECK(same); /* the seed decides everything */
    CHECK(min_in >= 50 && max_in <= 150 && min_in < 60 && max_in > 140);
    CHECK(min_out >= 10 && max_out <= 30 && min_out < 13 && max_out > 27);
    bds_set_cleanup(&b2);
    CHECK(bds_random(NULL, 1000, &o, 200, 2, &b2, err, sizeof err) == DUET_OK);
    CHECK(memcmp(a.items[0].ids, b2.items[0].ids, 7 * sizeof(int32_t)) != 0);
    bds_set_cleanup(&a);
    bds_set_cleanup(&b2);
    o.range_ratio = 1.0;
    CHECK(bds_random(NULL, 1000, &o, 2, 1, &a, err, sizeof err) == DUET_ERR_INVALID);
    o.range_ratio = 0;
    o.prefix_len = 0;
    CHECK(bds_random(NULL, 1000, &o, 3, 1, &a, err, sizeof err) == DUET_OK);
    for (int i = 0; i < a.n; i++) CHECK_EQ_INT(a.items[i].n_ids, 100);
    bds_set_cleanup(&a);

    /* with DeepSeek's tokenizer: BOS first, no special token after, lengths exact; text for
     * chat decodes the same ids */
    tok_tokenizer *tok = NULL;
    if (tok_load(GOLDEN_DIR "/tokenizer", &tok) != DUET_OK) {
        fprintf(stderr, "no golden tokenizer in %s: tokenizer cases skipped\n", GOLDEN_DIR);
        return;
    }
    o = (bds_random_opts){.input_len = 64, .output_len = 8};
    CHECK(bds_random(tok, 2048, &o, 20, 3, &a, err, sizeof err) == DUET_OK);
    for (int i = 0; i < a.n; i++) {
        CHECK_EQ_INT(a.items[i].n_ids, 64);
        CHECK_EQ_INT(a.items[i].ids[0], tok_bos_id(tok));
        for (int k = 1; k < 64; k++)
            CHECK(a.items[i].ids[k] < 2048 && !tok_is_special(tok, a.items[i].ids[k]));
    }
    bds_set_cleanup(&a);
    o.as_text = true;
    CHECK(bds_random(tok, 0, &o, 5, 3, &a, err, sizeof err) == DUET_OK);
    for (int i = 0; i < a.n; i++) CHECK(a.items[i].text && a.items[i].text[0] && !a.items[i].ids);
    bds_set_cleanup(&a);
    tok_destroy(tok);
}

static void test_files(void) {
    char *dir = tu_mkdtemp("bench");
    char path[512], err[256];
    snprintf(path, sizeof path, "%s/share.json", dir);
    tu_write_str(path, "[{\"conversations\": [{\"from\": \"human\", \"value\": \"p one\"},"
                       "{\"from\": \"gpt\", \"value\": \"a one\"}]},"
                       "{\"conversations\": [{\"from\": \"human\", \"value\": \"only\"}]},"
                       "{\"id\": 3},"
                       "{\"conversations\": [{\"from\": \"human\", \"value\": \"p two\"},"
                       "{\"from\": \"gpt\", \"value\": \"a two\"}]}]");
    bds_set s;
    CHECK(bds_sharegpt(path, NULL, 0, 4, 1, false, false, &s, err, sizeof err) ==
          DUET_ERR_INVALID); /* lengths unknown without a tokenizer */
    CHECK(bds_sharegpt(path, NULL, 32, 2, 1, true, false, &s, err, sizeof err) == DUET_OK);
    CHECK_EQ_INT(s.n, 2);
    CHECK(!strcmp(s.items[0].text, "p one") && !strcmp(s.items[1].text, "p two"));
    CHECK(s.items[0].output_len == 32 && s.items[0].prompt_len == 0);
    bds_set_cleanup(&s);
    CHECK(bds_sharegpt(path, NULL, 32, 5, 1, false, false, &s, err, sizeof err) == DUET_OK);
    CHECK_EQ_INT(s.n, 5); /* topped up from the two usable pairs */
    for (int i = 0; i < s.n; i++) CHECK(!strncmp(s.items[i].text, "p ", 2));
    bds_set_cleanup(&s);
    CHECK(bds_sharegpt(path, NULL, 32, 5, 1, false, true, &s, err, sizeof err) == DUET_OK);
    CHECK_EQ_INT(s.n, 2);
    bds_set_cleanup(&s);

    snprintf(path, sizeof path, "%s/custom.jsonl", dir);
    tu_write_str(path,
                 "{\"prompt\": \"first\"}\n\n{\"prompt\": \"second\"}\n{\"prompt\": \"third\"}");
    CHECK(bds_custom(path, NULL, NULL, 16, 3, 1, true, false, &s, err, sizeof err) == DUET_OK);
    CHECK_EQ_INT(s.n, 3);
    CHECK(!strcmp(s.items[0].text, "first") && !strcmp(s.items[2].text, "third"));
    CHECK(s.items[1].output_len == 16);
    bds_set_cleanup(&s);
    tu_write_str(path, "{\"prompt\": \"first\"}\n{\"text\": \"no prompt\"}\n");
    CHECK(bds_custom(path, NULL, NULL, 16, 3, 1, true, false, &s, err, sizeof err) ==
          DUET_ERR_FORMAT);
    CHECK(strstr(err, ":2:") != NULL);
    snprintf(path, sizeof path, "%s/missing.jsonl", dir);
    CHECK(bds_custom(path, NULL, NULL, 16, 3, 1, true, false, &s, err, sizeof err) ==
          DUET_ERR_NOT_FOUND);
    tu_rmtree(dir);
    free(dir);
}

static void test_arrivals(void) {
    enum { N = 4000 };
    static double t[N];
    CHECK(bds_arrivals(N, INFINITY, 1, 0, t) == DUET_OK);
    CHECK(t[0] == 0 && t[N - 1] == 0);
    CHECK(bds_arrivals(N, 0, 1, 0, t) == DUET_ERR_INVALID);
    /* burstiness 1: exponential gaps (coefficient of variation 1); 4: gamma(4), CV 1/2 */
    const double shapes[3] = {1, 4, 0.25};
    for (int s = 0; s < 3; s++) {
        CHECK(bds_arrivals(N, 10, shapes[s], 7, t) == DUET_OK);
        CHECK_NEAR(t[N - 1], N / 10.0, 1e-9); /* rescaled: the last goes at n / rate */
        double sum = 0, sq = 0, prev = 0;
        bool ascending = true;
        for (int i = 0; i < N; i++) {
            double g = t[i] - prev;
            ascending = ascending && g >= 0;
            sum += g;
            sq += g * g;
            prev = t[i];
        }
        double mean = sum / N, cv = sqrt(sq / N - mean * mean) / mean;
        CHECK(ascending);
        CHECK_NEAR(mean, 0.1, 1e-9);
        CHECK_NEAR(cv, 1 / sqrt(shapes[s]), 0.08 / sqrt(shapes[s]));
    }
    CHECK(bds_arrivals(4, 2, INFINITY, 0, t) == DUET_OK);
    CHECK_NEAR(t[0], 0.5, 1e-12);
    CHECK_NEAR(t[3], 2.0, 1e-12);
}

int main(void) {
    test_percentiles();
    test_parse();
    test_compute();
    test_sse();
    test_random();
    test_files();
    test_arrivals();
    CHECK_DONE();
}
