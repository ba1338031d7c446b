/* duet-bench as a program, against script_server (scripted timings and failures), one scenario
 * per run (test_bench SCENARIO SCRIPT_SERVER DUET_BENCH TOKENIZER_DIR), with a watchdog:
 *   timing    TTFT, TPOT, ITL, E2EL and throughput computed from chunks whose times are known
 *             (to 1%), for /v1/completions and /v1/chat/completions;
 *   failures  4xx, 5xx, a cut stream, an error event, no [DONE], no chunk, no answer in time and
 *             an unreachable server each counted as a failed request with its reason, never as
 *             a success, and the result written all the same;
 *   cli       the benchmark lines of ../shared/seed-commands.md, as written but for the program
 *             name and paths, and what they send. */
#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "testutil.h"

static const char *g_server_bin, *g_bench_bin, *g_tok_dir;
static char *g_tmp;
static pid_t g_server;

static void on_alarm(int sig) {
    (void)sig;
    static const char msg[] = "test_bench: watchdog expired\n";
    ssize_t n = write(2, msg, sizeof msg - 1);
    (void)n;
    if (g_server > 0) kill(g_server, SIGKILL);
    _exit(1);
}

/* script_server with the given flags (NULL-terminated); its port. */
static int server_start(const char *first, ...) {
    const char *argv[40] = {g_server_bin, "--port", "0"};
    int n = 3;
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a && n < 38; a = va_arg(ap, const char *)) argv[n++] = a;
    va_end(ap);
    argv[n] = NULL;
    int fds[2];
    if (pipe(fds)) return -1;
    g_server = fork();
    if (g_server == 0) {
        dup2(fds[1], 1);
        close(fds[0]);
        close(fds[1]);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(fds[1]);
    char line[128] = "";
    FILE *f = fdopen(fds[0], "r");
    int port = -1;
    if (f && fgets(line, sizeof line, f)) sscanf(line, "script_server listening on port %d", &port);
    if (f) fclose(f);
    CHECK_MSG(port > 0, "script_server did not start: '%s'", line);
    return port;
}

static void server_stop(void) {
    if (g_server <= 0) return;
    kill(g_server, SIGTERM);
    waitpid(g_server, NULL, 0);
    g_server = 0;
}

/* Runs duet-bench with the arguments (NULL-terminated) in dir, output to dir/log; its exit
 * status. */
static int bench(const char *dir, const char *log, const char *first, ...) {
    const char *argv[80] = {g_bench_bin};
    int n = 1;
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a && n < 78; a = va_arg(ap, const char *)) argv[n++] = a;
    va_end(ap);
    argv[n] = NULL;
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, log);
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        dup2(fd, 1);
        dup2(fd, 2);
        if (chdir(dir)) _exit(126);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static cJSON *load(const char *dir, const char *name) {
    char path[1024];
    unsigned char *buf;
    size_t len;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (tu_read(path, &buf, &len)) {
        CHECK_MSG(false, "no result file %s", path);
        return cJSON_CreateObject();
    }
    cJSON *root = cJSON_ParseWithLength((const char *)buf, len);
    free(buf);
    CHECK_MSG(cJSON_IsObject(root), "%s is not a JSON object", path);
    return root ? root : cJSON_CreateObject();
}

static double num(const cJSON *root, const char *key) {
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(root, key);
    CHECK_MSG(cJSON_IsNumber(x), "no number %s", key);
    return cJSON_IsNumber(x) ? x->valuedouble : NAN;
}

/* got within 0.5% of want, plus slack (the metric's share of how late a busy machine can
 * deliver one scripted chunk) */
#define CHECK_TIMED(root, key, want, slack)                                                        \
    do {                                                                                           \
        double got_ = num(root, key), want_ = (want), slack_ = (slack);                            \
        CHECK_MSG(fabs(got_ - want_) <= 0.005 * fabs(want_) + slack_,                              \
                  "%s = %.4f, known %.4f (+- 0.5%% + %.4f)", key, got_, want_, slack_);            \
    } while (0)

static const char *str(const cJSON *root, const char *key) {
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(root, key);
    return cJSON_IsString(x) ? x->valuestring : "";
}

/* GET path from the server; the body as JSON. */
static cJSON *http_get_json(int port, const char *path) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    char buf[1 << 16];
    size_t len = 0;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0) {
        char rq[256];
        int n = snprintf(rq, sizeof rq, "GET %s HTTP/1.0\r\n\r\n", path);
        if (write(fd, rq, (size_t)n) == n) {
            ssize_t r;
            while (len < sizeof buf - 1 && (r = read(fd, buf + len, sizeof buf - 1 - len)) > 0)
                len += (size_t)r;
        }
    }
    close(fd);
    buf[len] = '\0';
    const char *body = strstr(buf, "\r\n\r\n");
    cJSON *root = body ? cJSON_Parse(body + 4) : NULL;
    CHECK_MSG(root != NULL, "GET %s: no JSON answer", path);
    return root ? root : cJSON_CreateObject();
}

static char *write_prompts(int n) {
    char *path = malloc(1024);
    snprintf(path, 1024, "%s/prompts.jsonl", g_tmp);
    FILE *f = fopen(path, "w");
    for (int i = 0; i < n; i++) fprintf(f, "{\"prompt\": \"prompt number %d\"}\n", i);
    fclose(f);
    return path;
}

/* ---------------------------------------------------------------------------------------------
 * timing */

/* The script: first chunk 1000 ms after the request, then gaps of 80 and 240 ms in turn, 9
 * chunks of 2 tokens: E2EL 1000 + 4 * 80 + 4 * 240 = 2280 ms; 18 output tokens, so TPOT is
 * 1280 / 17 ms (counting chunks instead would give 160); ITL mean 160, median (80 + 240) / 2.
 * The server sends each chunk at its due time from the request's arrival, never early, but a
 * busy machine (CI's two cores under parallel tests) can deliver one late: up to LATE_MS is
 * allowed per chunk, which moves TTFT and E2EL by up to LATE_MS, TPOT by LATE_MS / 17 and the
 * mean gap by LATE_MS / 8 (only the first and last chunks' lateness survives the differences).
 * A wrong definition is off by far more (chunks for tokens: 2x TPOT). */
#define LATE_MS 50.0
static void check_timing(const cJSON *r, int n, int conc, const char *label) {
    fprintf(stderr, "-- %s\n", label);
    CHECK_EQ_INT(num(r, "completed"), n);
    CHECK_EQ_INT(num(r, "failed"), 0);
    CHECK_EQ_INT(num(r, "total_output_tokens"), 18 * n);
    CHECK_EQ_INT(num(r, "total_input_tokens"), 100 * n); /* usage.prompt_tokens */
    CHECK_TIMED(r, "mean_ttft_ms", 1000, LATE_MS);
    CHECK_TIMED(r, "median_ttft_ms", 1000, LATE_MS);
    CHECK_TIMED(r, "mean_tpot_ms", 1280.0 / 17, LATE_MS / 17);
    CHECK_TIMED(r, "p99_tpot_ms", 1280.0 / 17, LATE_MS / 17);
    CHECK_TIMED(r, "mean_itl_ms", 160, LATE_MS / 8);
    CHECK_TIMED(r, "median_itl_ms", 160, LATE_MS);
    CHECK_TIMED(r, "mean_e2el_ms", 2280, LATE_MS);
    /* one late chunk moves P99 of single gaps by its whole delay: a looser bound there */
    double p99 = num(r, "p99_itl_ms");
    CHECK_MSG(p99 >= 0.99 * 240 && p99 <= 240 + 15, "p99_itl_ms = %.3f, known 240", p99);
    /* requests back to back in conc slots */
    double rounds = (double)((n + conc - 1) / conc);
    /* each round can end up to LATE_MS late: the duration's share, and the rates' */
    const double late = LATE_MS / 2280.0;
    CHECK_TIMED(r, "duration", rounds * 2.280, rounds * LATE_MS / 1000);
    CHECK_TIMED(r, "request_throughput", n / (rounds * 2.280), late * n / (rounds * 2.280));
    CHECK_TIMED(r, "output_throughput", 18.0 * n / (rounds * 2.280),
                late * 18.0 * n / (rounds * 2.280));
    CHECK_TIMED(r, "total_token_throughput", 118.0 * n / (rounds * 2.280),
                late * 118.0 * n / (rounds * 2.280));
    CHECK_EQ_INT(num(r, "max_concurrent_requests"), conc);
    /* the peak counts chunks in one-second buckets: at least 3 of a stream share one */
    CHECK(num(r, "max_output_tokens_per_s") >= 3 * conc);
    const cJSON *itls = cJSON_GetObjectItemCaseSensitive(r, "itls");
    CHECK_EQ_INT(cJSON_GetArraySize(itls), n);
    for (int i = 0; i < cJSON_GetArraySize(itls); i++)
        CHECK_EQ_INT(cJSON_GetArraySize(cJSON_GetArrayItem(itls, i)), 8);
}

static void scenario_timing(void) {
    int port = server_start("--ttft-ms", "1000", "--itl-ms", "80,240", "--chunks", "9",
                            "--tokens-per-chunk", "2", "--prompt-tokens", "100", NULL);
    char p[16];
    snprintf(p, sizeof p, "%d", port);
    char *prompts = write_prompts(4);
    int rc = bench(g_tmp, "timing.log", "--port", p, "--model", "script-model", "--dataset-name",
                   "custom", "--dataset-path", prompts, "--custom-output-len", "18",
                   "--num-prompts", "4", "--max-concurrency", "2", "--percentile-metrics",
                   "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--save-result",
                   "--save-detailed", "--result-filename", "timing.json", NULL);
    CHECK_EQ_INT(rc, 0);
    cJSON *r = load(g_tmp, "timing.json");
    check_timing(r, 4, 2, "completions, 4 requests, 2 at a time");
    CHECK(!strcmp(str(r, "endpoint_type"), "openai"));
    cJSON_Delete(r);

    rc = bench(g_tmp, "timing-chat.log", "--base-url", "http://127.0.0.1:%s", "--port", p, NULL);
    CHECK(rc == 1 || rc == 2); /* not an address: refused before anything is sent */
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%d", port);
    rc = bench(g_tmp, "timing-chat.log", "--base-url", url, "--backend", "openai-chat",
               "--dataset-name", "custom", "--dataset-path", prompts, "--custom-output-len", "18",
               "--num-prompts", "2", "--max-concurrency", "1", "--percentile-metrics",
               "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--save-result",
               "--save-detailed", "--result-filename", "chat.json", NULL);
    CHECK_EQ_INT(rc, 0);
    r = load(g_tmp, "chat.json");
    check_timing(r, 2, 1, "chat, 2 requests, one at a time, model from /v1/models");
    CHECK(!strcmp(str(r, "endpoint_type"), "openai-chat"));
    CHECK(!strcmp(str(r, "model_id"), "script-model"));
    cJSON_Delete(r);
    cJSON *last = http_get_json(port, "/last");
    const cJSON *body = cJSON_GetObjectItemCaseSensitive(last, "body");
    CHECK(!strcmp(str(last, "path"), "/v1/chat/completions"));
    CHECK(cJSON_IsArray(cJSON_GetObjectItemCaseSensitive(body, "messages")));
    CHECK_EQ_INT(num(body, "max_completion_tokens"), 18);
    CHECK(!strcmp(str(body, "model"), "script-model"));
    CHECK(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(
        cJSON_GetObjectItemCaseSensitive(body, "stream_options"), "include_usage")));
    cJSON_Delete(last);
    free(prompts);
    server_stop();
}

/* ---------------------------------------------------------------------------------------------
 * failures */

static void check_error(const cJSON *r, int i, const char *want) {
    const cJSON *e = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(r, "errors"), i);
    const char *got = cJSON_IsString(e) ? e->valuestring : "(none)";
    if (!*want)
        CHECK_MSG(!*got, "request %d: error '%s', wanted none", i, got);
    else
        CHECK_MSG(strstr(got, want) != NULL, "request %d: error '%s', wanted '%s'", i, got, want);
}

static void scenario_failures(void) {
    int port =
        server_start("--itl-ms", "1", "--chunks", "4", "--fail",
                     "2:400,3:500,4:cut,5:error,6:nodone,7:empty,8:503,10:500,11:hang", NULL);
    char p[16];
    snprintf(p, sizeof p, "%d", port);
    char *prompts = write_prompts(9);
    int rc =
        bench(g_tmp, "fail.log", "--port", p, "--model", "m", "--dataset-name", "custom",
              "--dataset-path", prompts, "--disable-shuffle", "--num-prompts", "9",
              "--max-concurrency", "1", "--save-result", "--result-filename", "fail.json", NULL);
    CHECK_EQ_INT(rc, 0); /* failures are results, not errors of the tool */
    cJSON *r = load(g_tmp, "fail.json");
    CHECK_EQ_INT(num(r, "completed"), 2);
    CHECK_EQ_INT(num(r, "failed"), 7);
    CHECK_EQ_INT(num(r, "total_output_tokens"), 8); /* only the two good answers */
    check_error(r, 0, "");
    check_error(r, 1, "HTTP 400: failing as scripted");
    check_error(r, 2, "HTTP 500");
    check_error(r, 3, "stream cut after 2 chunks");
    check_error(r, 4, "error event after 2 chunks: the engine failed");
    check_error(r, 5, "without data: [DONE]");
    check_error(r, 6, "no chunk with a choice");
    check_error(r, 7, "HTTP 503");
    check_error(r, 8, "");
    cJSON_Delete(r);

    /* --fail-on-error: exit 1, result written */
    rc = bench(g_tmp, "fail2.log", "--port", p, "--model", "m", "--dataset-name", "custom",
               "--dataset-path", prompts, "--num-prompts", "1", "--fail-on-error", "--save-result",
               "--result-filename", "fail2.json", NULL);
    CHECK_EQ_INT(rc, 1);
    r = load(g_tmp, "fail2.json");
    CHECK_EQ_INT(num(r, "failed"), 1);
    cJSON_Delete(r);

    /* no answer: the request timeout ends it */
    rc = bench(g_tmp, "fail3.log", "--port", p, "--model", "m", "--dataset-name", "custom",
               "--dataset-path", prompts, "--num-prompts", "1", "--request-timeout", "0.5",
               "--save-result", "--result-filename", "fail3.json", NULL);
    CHECK_EQ_INT(rc, 0);
    r = load(g_tmp, "fail3.json");
    CHECK_EQ_INT(num(r, "failed"), 1);
    CHECK_EQ_INT(num(r, "completed"), 0);
    check_error(r, 0, "time");
    cJSON_Delete(r);
    server_stop();

    /* nobody listening */
    rc = bench(g_tmp, "fail4.log", "--port", p, "--model", "m", "--dataset-name", "custom",
               "--dataset-path", prompts, "--num-prompts", "3", "--save-result",
               "--result-filename", "fail4.json", NULL);
    CHECK_EQ_INT(rc, 0);
    r = load(g_tmp, "fail4.json");
    CHECK_EQ_INT(num(r, "completed"), 0);
    CHECK_EQ_INT(num(r, "failed"), 3);
    CHECK_EQ_INT(num(r, "total_output_tokens"), 0);
    for (int i = 0; i < 3; i++) check_error(r, i, "refused");
    cJSON_Delete(r);
    free(prompts);
}

/* ---------------------------------------------------------------------------------------------
 * cli */

static bool find_result(const char *dir, const char *prefix, char *name, size_t len) {
    DIR *d = opendir(dir);
    struct dirent *e;
    bool found = false;
    while (d && (e = readdir(d)))
        if (!strncmp(e->d_name, prefix, strlen(prefix))) {
            snprintf(name, len, "%s", e->d_name);
            found = true;
        }
    if (d) closedir(d);
    return found;
}

static void scenario_cli(void) {
    /* benchmark_serving.py's line with OPENAI_API_KEY, the server checking key and model */
    setenv("OPENAI_API_KEY", "token-abc123", 1);
    int port =
        server_start("--api-key", "token-abc123", "--expect-model", "DeepSeek-R1-0528", NULL);
    char p[16], dir[1024];
    snprintf(p, sizeof p, "%d", port);
    snprintf(dir, sizeof dir, "%s/benchmark_result", g_tmp);
    int rc = bench(g_tmp, "cli1.log", "--host", "127.0.0.1", "--port", p, "--model", g_tok_dir,
                   "--dataset-name", "random", "--num-prompts", "5", "--random-input-len", "128",
                   "--ignore-eos", "--random-output-len", "1024", "--max-concurrency", "1",
                   "--served_model_name", "DeepSeek-R1-0528", "--save-result", "--result-dir",
                   "./benchmark_result", "--result-filename", "result.json", NULL);
    CHECK_EQ_INT(rc, 0);
    cJSON *r = load(dir, "result.json");
    CHECK_EQ_INT(num(r, "completed"), 5);
    CHECK_EQ_INT(num(r, "total_input_tokens"), 5 * 128);
    CHECK_EQ_INT(num(r, "total_output_tokens"), 5 * 1024);
    CHECK_EQ_INT(num(r, "num_prompts"), 5);
    CHECK_EQ_INT(num(r, "max_concurrency"), 1);
    CHECK(!strcmp(str(r, "model_id"), g_tok_dir));
    CHECK(!strcmp(str(r, "request_rate"), "inf"));
    cJSON_Delete(r);
    cJSON *last = http_get_json(port, "/last");
    const cJSON *body = cJSON_GetObjectItemCaseSensitive(last, "body");
    CHECK(!strcmp(str(last, "authorization"), "Bearer token-abc123"));
    CHECK(!strncmp(str(last, "x_request_id"), "bench-", 6));
    CHECK_EQ_INT(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(body, "prompt")), 128);
    CHECK_EQ_INT(num(body, "max_tokens"), 1024);
    CHECK(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(body, "ignore_eos")));
    CHECK(cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(body, "stream")));
    CHECK(!cJSON_HasObjectItem(body, "temperature")); /* the server's default, as vLLM now */
    cJSON_Delete(last);
    server_stop();
    unsetenv("OPENAI_API_KEY");

    /* vllm bench serve's line; its 200 requests at 1/s would take 200 s, so a later
     * --request-rate (argparse: the last one counts) runs them at 100/s */
    port = server_start("--chunks", "2", NULL);
    snprintf(p, sizeof p, "%d", port);
    rc = bench(g_tmp, "cli2.log", "--port", p, "--model", g_tok_dir, "--dataset-name", "random",
               "--random-input", "200", "--num-prompt", "200", "--request-rate", "1",
               "--save-result", "--result-dir", "./", "--request-rate", "100", NULL);
    CHECK_EQ_INT(rc, 0);
    char name[512];
    const char *base = strrchr(g_tok_dir, '/') ? strrchr(g_tok_dir, '/') + 1 : g_tok_dir;
    char prefix[300];
    snprintf(prefix, sizeof prefix, "openai-100.0qps-%s-", base);
    CHECK_MSG(find_result(g_tmp, prefix, name, sizeof name), "no %s*.json", prefix);
    r = load(g_tmp, name);
    CHECK_EQ_INT(num(r, "completed"), 200);
    CHECK_EQ_INT(num(r, "total_input_tokens"), 200 * 200);
    CHECK_EQ_INT(num(r, "total_output_tokens"), 200 * 2);
    CHECK_EQ_INT(num(r, "request_rate"), 100);
    CHECK(cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(r, "max_concurrency")));
    /* the last of 200 arrivals at 100/s goes at exactly 2 s */
    double d = num(r, "duration");
    CHECK_MSG(d >= 2.0 && d < 2.5, "duration %.3f", d);
    cJSON_Delete(r);
    last = http_get_json(port, "/last");
    CHECK(!strcmp(str(cJSON_GetObjectItemCaseSensitive(last, "body"), "model"), g_tok_dir));
    cJSON_Delete(last);
    server_stop();

    /* argparse's rules: --help, an unknown option, an ambiguous prefix */
    CHECK_EQ_INT(bench(g_tmp, "help.log", "--help", NULL), 0);
    CHECK_EQ_INT(bench(g_tmp, "bad.log", "--num-prompt", "3", "--max-concurency", "2", NULL), 2);
    unsigned char *log;
    size_t len;
    char path[1024];
    snprintf(path, sizeof path, "%s/bad.log", g_tmp);
    CHECK(tu_read(path, &log, &len) == 0 && strstr((char *)log, "--max-concurrency"));
    free(log);
    CHECK_EQ_INT(bench(g_tmp, "amb.log", "--random", "3", NULL), 2);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: test_bench timing|failures|cli SCRIPT_SERVER DUET_BENCH TOKDIR\n");
        return 2;
    }
    /* duet-bench runs in the scratch folder: every path absolute */
    static char server[4096], bench_bin[4096], tok[4096];
    if (!realpath(argv[2], server) || !realpath(argv[3], bench_bin) || !realpath(argv[4], tok)) {
        perror("test_bench: realpath");
        return 1;
    }
    g_server_bin = server;
    g_bench_bin = bench_bin;
    g_tok_dir = tok;
    g_tmp = tu_mkdtemp("test-bench");
    signal(SIGALRM, on_alarm);
    alarm(100);
    signal(SIGPIPE, SIG_IGN);
    if (!strcmp(argv[1], "timing"))
        scenario_timing();
    else if (!strcmp(argv[1], "failures"))
        scenario_failures();
    else if (!strcmp(argv[1], "cli"))
        scenario_cli();
    else
        return 2;
    server_stop();
    if (g_check_failures)
        fprintf(stderr, "logs kept in %s\n", g_tmp);
    else
        tu_rmtree(g_tmp);
    free(g_tmp);
    CHECK_DONE();
}
