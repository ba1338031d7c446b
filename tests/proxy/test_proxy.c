/* duet-proxy against stub backends, all real processes on localhost: one scenario per run
 * (test_proxy SCENARIO STUB PROXY BENCH), each with a watchdog. The test side speaks HTTP over
 * blocking sockets with timeouts and decodes answers with httpc's response parser. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "check.h"
#include "net/httpc-impl.h"

static const char *g_stub_bin, *g_proxy_bin, *g_bench_bin;
static char g_tmp[256]; /* logs of this run */

/* ---------------------------------------------------------------------------------------------
 * Processes */

enum { MAX_PROCS = 32 };
static pid_t g_pids[MAX_PROCS];

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000LL + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void kill_all(void) {
    for (int i = 0; i < MAX_PROCS; i++)
        if (g_pids[i] > 0) {
            kill(g_pids[i], SIGKILL);
            waitpid(g_pids[i], NULL, 0);
            g_pids[i] = 0;
        }
}

static void on_alarm(int sig) {
    (void)sig;
    static const char msg[] = "test_proxy: watchdog expired\n";
    ssize_t n = write(2, msg, sizeof msg - 1);
    (void)n;
    for (int i = 0; i < MAX_PROCS; i++)
        if (g_pids[i] > 0) kill(g_pids[i], SIGKILL);
    _exit(1);
}

/* Starts argv with stdout and stderr appended to log (under g_tmp). extra_env: "K=V" or NULL. */
static pid_t spawn(char *const argv[], const char *log, const char *extra_env) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", g_tmp, log);
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        if (extra_env) putenv((char *)extra_env);
        execv(argv[0], argv);
        _exit(127);
    }
    for (int i = 0; i < MAX_PROCS; i++)
        if (g_pids[i] <= 0) {
            g_pids[i] = pid;
            break;
        }
    return pid;
}

static void forget(pid_t pid) {
    for (int i = 0; i < MAX_PROCS; i++)
        if (g_pids[i] == pid) g_pids[i] = 0;
}

/* Sends sig and reaps; the exit status, or -1. */
static int stop(pid_t pid, int sig) {
    if (pid <= 0) return -1;
    kill(pid, sig);
    int status = 0;
    waitpid(pid, &status, 0);
    forget(pid);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* Waits up to ms for pid to exit; its exit status, or -2 on timeout. */
static int wait_exit(pid_t pid, int ms) {
    long long end = now_ms() + ms;
    while (now_ms() < end) {
        int status;
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid) {
            forget(pid);
            return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        }
        sleep_ms(10);
    }
    return -2;
}

/* Evaluates its argument once, unlike CHECK_EQ_INT. */
static void expect_exit(int got, int want) {
    CHECK_MSG(got == want, "exit status %d, wanted %d", got, want);
}

static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) || getsockname(fd, (struct sockaddr *)&a, &len)) {
        close(fd);
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

static int connect_to(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(fd, (struct sockaddr *)&a, sizeof a)) {
        close(fd);
        return -1;
    }
    return fd;
}

static bool wait_listening(int port, int ms) {
    long long end = now_ms() + ms;
    while (now_ms() < end) {
        int fd = connect_to(port);
        if (fd >= 0) {
            close(fd);
            return true;
        }
        sleep_ms(10);
    }
    return false;
}

typedef struct stub_proc {
    pid_t pid;
    int port;
    char name[16];
} stub_proc;

/* A stub on port (0: a free one); extra flags end with NULL. */
static stub_proc stub_start(const char *name, const char *role, int port, ...) {
    stub_proc s = {.port = port ? port : free_port()};
    snprintf(s.name, sizeof s.name, "%s", name);
    char portbuf[16];
    snprintf(portbuf, sizeof portbuf, "%d", s.port);
    char *argv[32] = {(char *)g_stub_bin, "--port", portbuf,     "--name",
                      (char *)name,       "--role", (char *)role};
    int n = 7;
    va_list ap;
    va_start(ap, port);
    const char *a;
    while ((a = va_arg(ap, const char *)) && n < 30) argv[n++] = (char *)a;
    va_end(ap);
    argv[n] = NULL;
    char log[64];
    snprintf(log, sizeof log, "stub-%s.log", name);
    s.pid = spawn(argv, log, NULL);
    CHECK_MSG(wait_listening(s.port, 5000), "stub %s did not start", name);
    return s;
}

/* ---------------------------------------------------------------------------------------------
 * A blocking HTTP client */

typedef struct resp {
    int status;
    char *raw; /* everything read */
    size_t raw_len;
    char *body; /* decoded */
    size_t body_len;
    char rid[128];
    char ctype[128];
    bool complete;
} resp;

static void resp_free(resp *r) {
    free(r->raw);
    free(r->body);
    memset(r, 0, sizeof *r);
}

static int on_head_cb(httpc_parse *p) {
    resp *r = p->data;
    r->status = p->resp.status;
    for (size_t i = 0; i < p->resp.num_headers; i++) {
        if (!strcasecmp(p->resp.headers[i].name, "x-request-id"))
            snprintf(r->rid, sizeof r->rid, "%s", p->resp.headers[i].value);
        if (!strcasecmp(p->resp.headers[i].name, "content-type"))
            snprintf(r->ctype, sizeof r->ctype, "%s", p->resp.headers[i].value);
    }
    return 0;
}

static int on_body_cb(httpc_parse *p, const char *at, size_t n) {
    resp *r = p->data;
    r->body = realloc(r->body, r->body_len + n + 1);
    memcpy(r->body + r->body_len, at, n);
    r->body_len += n;
    r->body[r->body_len] = '\0';
    return 0;
}

/* Decodes what was read (status, headers, de-chunked body). */
static void resp_parse(resp *r) {
    httpc_parse p;
    httpc_parse_init(&p, 64 * 1024, false);
    p.on_head = on_head_cb;
    p.on_body = on_body_cb;
    p.data = r;
    free(r->body);
    r->body = calloc(1, 1);
    r->body_len = 0;
    size_t used = httpc_parse_feed(&p, r->raw ? r->raw : "", r->raw_len);
    (void)used;
    if (!p.complete && !p.failed) httpc_parse_feed(&p, NULL, 0);
    r->complete = p.complete;
    httpc_parse_cleanup(&p);
}

static void send_all(int fd, const char *data, size_t len) {
    while (len) {
        ssize_t n = send(fd, data, len, MSG_NOSIGNAL);
        if (n <= 0) return;
        data += n;
        len -= (size_t)n;
    }
}

static void send_request(int fd, const char *method, const char *path, const char *headers,
                         const char *body) {
    char head[4096];
    int n = snprintf(head, sizeof head,
                     "%s %s HTTP/1.1\r\nHost: test\r\nConnection: close\r\n%s"
                     "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n",
                     method, path, headers ? headers : "", body ? strlen(body) : 0);
    send_all(fd, head, (size_t)n);
    if (body) send_all(fd, body, strlen(body));
}

/* Reads into r until EOF, or until `until` appears in what was read, or timeout; false on
 * timeout. */
static bool read_some(int fd, resp *r, const char *until, int timeout_ms) {
    long long end = now_ms() + timeout_ms;
    for (;;) {
        if (until && r->raw && strstr(r->raw, until)) return true;
        int left = (int)(end - now_ms());
        if (left <= 0) return false;
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        if (poll(&pfd, 1, left) <= 0) continue;
        char buf[16384];
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n <= 0) return until == NULL;
        r->raw = realloc(r->raw, r->raw_len + (size_t)n + 1);
        memcpy(r->raw + r->raw_len, buf, (size_t)n);
        r->raw_len += (size_t)n;
        r->raw[r->raw_len] = '\0';
    }
}

/* One request on a fresh connection. headers: extra raw header lines ("K: V\r\n..."). */
static resp http_do(int port, const char *method, const char *path, const char *headers,
                    const char *body) {
    resp r;
    memset(&r, 0, sizeof r);
    int fd = connect_to(port);
    if (fd < 0) return r;
    send_request(fd, method, path, headers, body);
    CHECK_MSG(read_some(fd, &r, NULL, 10000), "%s %s: no complete answer in time", method, path);
    close(fd);
    resp_parse(&r);
    return r;
}

static cJSON *resp_json(const resp *r) {
    return r->body ? cJSON_Parse(r->body) : NULL;
}

/* The number under key in a stub's /stub/stats. */
static int stub_stat(const stub_proc *s, const char *key) {
    resp r = http_do(s->port, "GET", "/stub/stats", NULL, NULL);
    cJSON *j = resp_json(&r);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    int n = cJSON_IsNumber(v) ? v->valueint : -1;
    cJSON_Delete(j);
    resp_free(&r);
    return n;
}

/* A stub's stat as a double (the times in ms). */
static double stub_stat_f(const stub_proc *s, const char *key) {
    resp r = http_do(s->port, "GET", "/stub/stats", NULL, NULL);
    cJSON *j = resp_json(&r);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(j, key);
    double x = cJSON_IsNumber(v) ? v->valuedouble : -1;
    cJSON_Delete(j);
    resp_free(&r);
    return x;
}

static void stub_control(const stub_proc *s, const char *json) {
    resp r = http_do(s->port, "POST", "/stub/control", NULL, json);
    CHECK_EQ_INT(r.status, 200);
    resp_free(&r);
}

/* Checks vLLM's nested error object with the given status. */
static void check_error_body(const resp *r, int status, const char *needle) {
    CHECK_MSG(r->status == status, "status %d, wanted %d: %s", r->status, status,
              r->body ? r->body : "");
    cJSON *j = resp_json(r);
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error");
    CHECK_MSG(cJSON_IsString(cJSON_GetObjectItemCaseSensitive(e, "message")), "no error.message");
    CHECK(cJSON_IsString(cJSON_GetObjectItemCaseSensitive(e, "type")));
    CHECK(cJSON_HasObjectItem(e, "param"));
    const cJSON *code = cJSON_GetObjectItemCaseSensitive(e, "code");
    CHECK(cJSON_IsNumber(code) && code->valueint == status);
    if (needle) CHECK_MSG(r->body && strstr(r->body, needle), "'%s' not in %s", needle, r->body);
    cJSON_Delete(j);
}

/* ---------------------------------------------------------------------------------------------
 * The proxy */

typedef struct proxy_proc {
    pid_t pid;
    int port;
} proxy_proc;

/* Starts duet-proxy with the given flags (NULL-terminated) and waits for it to listen. */
static proxy_proc proxy_start_env(const char *env, const char *const *flags) {
    proxy_proc p = {.port = free_port()};
    char portbuf[16];
    snprintf(portbuf, sizeof portbuf, "%d", p.port);
    char *argv[72];
    int n = 0;
    /* TEST_PROXY_VALGRIND=path: the proxy runs under valgrind; leaks or memory errors make it
     * exit 99 instead of 0 at SIGTERM. */
    const char *vg = getenv("TEST_PROXY_VALGRIND");
    if (vg && *vg) {
        static const char *const vgargs[] = {"--quiet", "--leak-check=full",
                                             "--errors-for-leak-kinds=definite,indirect",
                                             "--error-exitcode=99"};
        argv[n++] = (char *)vg;
        for (size_t i = 0; i < sizeof vgargs / sizeof vgargs[0]; i++) argv[n++] = (char *)vgargs[i];
    }
    argv[n++] = (char *)g_proxy_bin;
    argv[n++] = "--host";
    argv[n++] = "127.0.0.1";
    argv[n++] = "--port";
    argv[n++] = portbuf;
    for (; flags && *flags && n < 70; flags++) argv[n++] = (char *)*flags;
    argv[n] = NULL;
    p.pid = spawn(argv, "proxy.log", env);
    CHECK_MSG(wait_listening(p.port, vg && *vg ? 20000 : 5000), "proxy did not start");
    return p;
}

static proxy_proc proxy_start(const char *const *flags) {
    return proxy_start_env(NULL, flags);
}

static char *endpoint(const stub_proc *s) {
    static char bufs[8][32];
    static int k;
    char *b = bufs[k++ % 8];
    snprintf(b, 32, "127.0.0.1:%d", s->port);
    return b;
}

/* Fast health checks so the scenarios take seconds. */
#define FAST_HEALTH                                                                                \
    "--health-interval", "0.1", "--health-timeout", "0.5", "--eject-after", "2",                   \
        "--readmit-after", "2", "--retry-backoff", "0.005", "--retry-backoff-max", "0.05"

static bool proxy_health_counts(const proxy_proc *p, int prefill_healthy, int decode_healthy,
                                int ms) {
    long long end = now_ms() + ms;
    while (now_ms() < end) {
        resp r = http_do(p->port, "GET", "/health", NULL, NULL);
        cJSON *j = resp_json(&r);
        const cJSON *ph = cJSON_GetObjectItemCaseSensitive(
            cJSON_GetObjectItemCaseSensitive(j, "prefill"), "healthy");
        const cJSON *dh = cJSON_GetObjectItemCaseSensitive(
            cJSON_GetObjectItemCaseSensitive(j, "decode"), "healthy");
        bool ok = cJSON_IsNumber(ph) && ph->valueint == prefill_healthy && cJSON_IsNumber(dh) &&
                  dh->valueint == decode_healthy;
        cJSON_Delete(j);
        resp_free(&r);
        if (ok) return true;
        sleep_ms(50);
    }
    return false;
}

/* Runs the load generator against the proxy; its exit status. out gets its stdout. */
static int run_bench(int port, const char *const *flags, char *out, size_t cap) {
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/completions", port);
    char cmd[2048];
    int n = snprintf(cmd, sizeof cmd, "%s --url %s", g_bench_bin, url);
    for (; flags && *flags; flags++) n += snprintf(cmd + n, sizeof cmd - (size_t)n, " %s", *flags);
    snprintf(cmd + n, sizeof cmd - (size_t)n, " 2>&1");
    FILE *f = popen(cmd, "r");
    if (!f) return -1;
    size_t got = fread(out, 1, cap - 1, f);
    out[got] = '\0';
    int st = pclose(f);
    fprintf(stderr, "bench: %s", out);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static int count_str(const char *hay, const char *needle) {
    int n = 0;
    for (const char *p = hay; p && (p = strstr(p, needle)); p += strlen(needle)) n++;
    return n;
}

/* ---------------------------------------------------------------------------------------------
 * Scenarios */

static void scenario_basic(void) {
    stub_proc p = stub_start("p1", "prefill", 0, NULL);
    stub_proc d = stub_start("d1", "decode", 0, NULL);
    const char *flags[] = {"--prefill",        endpoint(&p), "--decode", endpoint(&d),
                           "--max-body-bytes", "4096",       NULL};
    proxy_proc px = proxy_start(flags);

    /* Non-streaming completion: the decode's JSON relayed, an id generated and echoed. */
    resp r = http_do(px.port, "POST", "/v1/completions", NULL,
                     "{\"model\":\"m\",\"prompt\":\"hello\",\"max_tokens\":3,\"min_tokens\":2}");
    CHECK_MSG(r.status == 200, "status %d: %s", r.status, r.body ? r.body : "");
    CHECK(r.body && strstr(r.body, "\"text\":\"tok0 tok1 tok2 \""));
    CHECK(strlen(r.rid) > 0);
    CHECK(!strncmp(r.ctype, "application/json", 16));
    resp_free(&r);
    CHECK_EQ_INT(stub_stat(&p, "prefill"), 1);
    CHECK_EQ_INT(stub_stat(&d, "decode"), 1);

    /* The client's id is used on both legs and echoed. */
    r = http_do(px.port, "POST", "/v1/completions", "X-Request-Id: my-req-1\r\n",
                "{\"prompt\":[1,2,3],\"max_tokens\":2}");
    CHECK_EQ_INT(r.status, 200);
    CHECK(!strcmp(r.rid, "my-req-1"));
    resp_free(&r);

    /* Streaming chat with everything that breaks a naive prefill: stream, stream_options,
     * min_tokens, max_completion_tokens. The stubs answer 400 if the prefill leg kept them. */
    r = http_do(
        px.port, "POST", "/v1/chat/completions", NULL,
        "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_completion_tokens\":4,"
        "\"min_tokens\":3,\"stream\":true,\"stream_options\":{\"include_usage\":true}}");
    CHECK_MSG(r.status == 200, "status %d: %s", r.status, r.body ? r.body : "");
    CHECK(r.complete);
    CHECK(!strncmp(r.ctype, "text/event-stream", 17));
    CHECK_EQ_INT(count_str(r.body, "chat.completion.chunk"), 5); /* 4 tokens + usage */
    CHECK(r.body && strstr(r.body, "\"usage\""));
    CHECK(r.body && strstr(r.body, "data: [DONE]\n\n"));
    resp_free(&r);
    CHECK_EQ_INT(stub_stat(&p, "bad"), 0);
    CHECK_EQ_INT(stub_stat(&d, "bad"), 0);

    /* The proxy's own 4xx. */
    r = http_do(px.port, "POST", "/v1/completions", NULL, "{\"prompt\": ");
    check_error_body(&r, 400, "not valid JSON");
    resp_free(&r);
    r = http_do(px.port, "POST", "/v1/completions", NULL, "[1,2]");
    check_error_body(&r, 400, "JSON object");
    resp_free(&r);
    r = http_do(px.port, "POST", "/v1/completions", NULL, "{\"prompt\":\"x\",\"stream\":\"yes\"}");
    check_error_body(&r, 400, "stream");
    resp_free(&r);
    r = http_do(px.port, "GET", "/v2/nothing", NULL, NULL);
    check_error_body(&r, 404, NULL);
    resp_free(&r);
    r = http_do(px.port, "GET", "/v1/completions", NULL, NULL);
    check_error_body(&r, 405, NULL);
    resp_free(&r);
    char big[6000];
    memset(big, 'a', sizeof big);
    memcpy(big, "{\"prompt\":\"", 11);
    memcpy(big + sizeof big - 3, "\"}", 3);
    r = http_do(px.port, "POST", "/v1/completions", NULL, big);
    check_error_body(&r, 413, "larger than the limit");
    resp_free(&r);

    /* A backend's validation error comes back as it is, and is not retried. */
    int before = stub_stat(&p, "requests");
    r = http_do(px.port, "POST", "/v1/completions", NULL, "{\"max_tokens\":3}");
    check_error_body(&r, 400, "'prompt' is required");
    resp_free(&r);
    CHECK_EQ_INT(stub_stat(&p, "requests"), before + 1);

    /* Forwarded routes. */
    r = http_do(px.port, "GET", "/v1/models", NULL, NULL);
    CHECK_EQ_INT(r.status, 200);
    CHECK(r.body && strstr(r.body, "\"duet-stub\""));
    resp_free(&r);
    r = http_do(px.port, "POST", "/tokenize", NULL, "{\"prompt\":\"a b c\"}");
    CHECK_EQ_INT(r.status, 200);
    CHECK(r.body && strstr(r.body, "\"served_by\":\"d1\""));
    resp_free(&r);
    r = http_do(px.port, "POST", "/detokenize", NULL, "{\"tokens\":[1,2,3]}");
    CHECK_EQ_INT(r.status, 200);
    resp_free(&r);

    /* The proxy's health, and its metrics through promtool. */
    r = http_do(px.port, "GET", "/health", NULL, NULL);
    CHECK_EQ_INT(r.status, 200);
    CHECK(r.body && strstr(r.body, "\"status\":\"ok\""));
    resp_free(&r);
    r = http_do(px.port, "GET", "/metrics", NULL, NULL);
    CHECK_EQ_INT(r.status, 200);
    CHECK(r.body &&
          strstr(r.body, "duet_proxy_requests_total{route=\"completions\",code=\"200\"}"));
    CHECK(r.body && strstr(r.body, "duet_proxy_backend_request_duration_seconds_bucket{role="));
    CHECK(r.body &&
          strstr(r.body, "duet_proxy_errors_total{route=\"completions\",kind=\"backend_4xx\"} 1"));
    char path[512], cmd[700];
    snprintf(path, sizeof path, "%s/metrics.txt", g_tmp);
    FILE *f = fopen(path, "w");
    if (f && r.body) fwrite(r.body, 1, r.body_len, f);
    if (f) fclose(f);
    if (system("command -v promtool >/dev/null 2>&1") == 0) {
        snprintf(cmd, sizeof cmd, "promtool check metrics < %s", path);
        int rc = system(cmd);
        CHECK_MSG(rc == 0, "promtool check metrics failed on %s", path);
    } else {
        fprintf(stderr, "promtool not found: metrics format not checked\n");
    }
    resp_free(&r);
    expect_exit(stop(px.pid, SIGTERM), 0);
}

static void scenario_auth(void) {
    stub_proc p = stub_start("p1", "prefill", 0, "--api-key", "up-key", NULL);
    stub_proc d = stub_start("d1", "decode", 0, "--api-key", "up-key", NULL);
    const char *flags[] = {"--prefill", endpoint(&p),         "--decode", endpoint(&d), "--api-key",
                           "secret",    "--upstream-api-key", "up-key",   NULL};
    proxy_proc px = proxy_start(flags);
    const char *body = "{\"prompt\":\"x\",\"max_tokens\":2}";
    resp r = http_do(px.port, "POST", "/v1/completions", NULL, body);
    check_error_body(&r, 401, "API key");
    resp_free(&r);
    r = http_do(px.port, "POST", "/v1/completions", "Authorization: Bearer wrong\r\n", body);
    check_error_body(&r, 401, NULL);
    resp_free(&r);
    r = http_do(px.port, "GET", "/v1/models", NULL, NULL);
    CHECK_EQ_INT(r.status, 401);
    resp_free(&r);
    r = http_do(px.port, "POST", "/instances/add", NULL,
                "{\"type\":\"prefill\",\"instance\":\"127.0.0.1:1\"}");
    CHECK_EQ_INT(r.status, 401);
    resp_free(&r);
    /* The right key; the stubs answer 401 unless the proxy sends the upstream key. */
    r = http_do(px.port, "POST", "/v1/completions", "Authorization: Bearer secret\r\n", body);
    CHECK_MSG(r.status == 200, "status %d: %s", r.status, r.body ? r.body : "");
    resp_free(&r);
    r = http_do(px.port, "GET", "/health", NULL, NULL); /* probes carry the key too */
    CHECK_EQ_INT(r.status, 200);
    resp_free(&r);
    r = http_do(px.port, "GET", "/metrics", NULL, NULL);
    CHECK_EQ_INT(r.status, 200);
    resp_free(&r);
    expect_exit(stop(px.pid, SIGTERM), 0);

    /* The key from the environment. */
    const char *flags2[] = {"--prefill",          endpoint(&p), "--decode", endpoint(&d),
                            "--upstream-api-key", "up-key",     NULL};
    px = proxy_start_env("DUET_API_KEY=env-secret", flags2);
    r = http_do(px.port, "POST", "/v1/completions", NULL, body);
    CHECK_EQ_INT(r.status, 401);
    resp_free(&r);
    r = http_do(px.port, "POST", "/v1/completions", "Authorization: Bearer env-secret\r\n", body);
    CHECK_EQ_INT(r.status, 200);
    resp_free(&r);
    expect_exit(stop(px.pid, SIGTERM), 0);
}

/* A prefill backend killed under load: requests keep succeeding (retries, then ejection), and
 * it is admitted again once it is back. */
static void scenario_failover(void) {
    stub_proc p1 = stub_start("p1", "prefill", 0, "--prefill-delay-ms", "2", NULL);
    stub_proc p2 = stub_start("p2", "prefill", 0, "--prefill-delay-ms", "2", NULL);
    stub_proc d = stub_start("d1", "decode", 0, NULL);
    const char *flags[] = {"--prefill",  endpoint(&p1), endpoint(&p2), "--decode",
                           endpoint(&d), FAST_HEALTH,   NULL};
    proxy_proc px = proxy_start(flags);
    char bench_out[4096];
    char url[128];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/completions", px.port);
    /* The load generator in the background for 3 s, 20 streams at a time. */
    char *bargv[] = {
        (char *)g_bench_bin, "--url",        url, "--duration", "3", "--concurrency", "20",
        "--stream",          "--max-tokens", "8", NULL};
    pid_t bench = spawn(bargv, "bench-failover.log", NULL);
    sleep_ms(700);
    int p2_port = p2.port;
    stop(p2.pid, SIGKILL);
    CHECK_MSG(proxy_health_counts(&px, 1, 1, 2000), "p2 not ejected");
    sleep_ms(500);
    p2 = stub_start("p2", "prefill", p2_port, "--prefill-delay-ms", "2", NULL);
    CHECK_MSG(proxy_health_counts(&px, 2, 1, 3000), "p2 not admitted again");
    int rc = wait_exit(bench, 10000);
    CHECK_EQ_INT(rc, 0);
    char path[512];
    snprintf(path, sizeof path, "%s/bench-failover.log", g_tmp);
    FILE *f = fopen(path, "r");
    size_t n = f ? fread(bench_out, 1, sizeof bench_out - 1, f) : 0;
    bench_out[n] = '\0';
    if (f) fclose(f);
    fprintf(stderr, "bench: %s", bench_out);
    CHECK_MSG(strstr(bench_out, " errors 0 ") != NULL, "requests failed during failover");
    CHECK(strstr(bench_out, "ok 0 ") == NULL);
    /* Traffic reaches the restarted backend again. */
    const char *more[] = {"--requests", "200", "--concurrency", "10", "--fail-on-error", NULL};
    CHECK_EQ_INT(run_bench(px.port, more, bench_out, sizeof bench_out), 0);
    CHECK_MSG(stub_stat(&p2, "prefill") > 0, "restarted p2 gets no requests");
    resp r = http_do(px.port, "GET", "/metrics", NULL, NULL);
    char needle[128];
    snprintf(needle, sizeof needle,
             "duet_proxy_ejections_total{role=\"prefill\",backend=\"127.0.0.1:%d\"} 1", p2_port);
    CHECK_MSG(r.body && strstr(r.body, needle), "no ejection counted");
    snprintf(needle, sizeof needle,
             "duet_proxy_readmissions_total{role=\"prefill\",backend=\"127.0.0.1:%d\"} 1", p2_port);
    CHECK_MSG(r.body && strstr(r.body, needle), "no re-admission counted");
    resp_free(&r);
    expect_exit(stop(px.pid, SIGTERM), 0);
}

/* Reads a stream up to `until`; the open socket, or -1. */
static int stream_open(int port, const char *body, resp *r, const char *until) {
    memset(r, 0, sizeof *r);
    int fd = connect_to(port);
    if (fd < 0) return -1;
    send_request(fd, "POST", "/v1/completions", NULL, body);
    CHECK_MSG(read_some(fd, r, until, 5000), "'%s' not seen in time", until);
    return fd;
}

static void scenario_midstream(void) {
    stub_proc p = stub_start("p1", "prefill", 0, NULL);
    stub_proc d1 = stub_start("d1", "decode", 0, "--token-delay-ms", "30", NULL);
    stub_proc d2 = stub_start("d2", "decode", 0, "--token-delay-ms", "30", NULL);
    const char *flags[] = {"--prefill",   endpoint(&p), "--decode",    endpoint(&d1),
                           endpoint(&d2), "--policy",   "round-robin", "--prefill-timeout",
                           "0.5",         FAST_HEALTH,  NULL};
    proxy_proc px = proxy_start(flags);
    const char *stream_body = "{\"prompt\":\"x\",\"max_tokens\":40,\"stream\":true}";

    /* A decode worker dies mid-stream: an SSE error event, then [DONE], then the end. */
    resp r;
    int fd = stream_open(px.port, stream_body, &r, "tok1 ");
    int d1_streams = stub_stat(&d1, "in_flight"), d2_streams = stub_stat(&d2, "in_flight");
    CHECK_EQ_INT(d1_streams + d2_streams, 1);
    stub_proc *dead = d1_streams ? &d1 : &d2;
    stop(dead->pid, SIGKILL);
    CHECK(read_some(fd, &r, NULL, 5000));
    close(fd);
    resp_parse(&r);
    CHECK_EQ_INT(r.status, 200);
    CHECK(r.complete); /* the chunked body ended properly */
    const char *err = r.body ? strstr(r.body, "data: {\"error\":") : NULL;
    CHECK_MSG(err != NULL, "no SSE error event in: %s", r.body ? r.body : "");
    CHECK(err && strstr(err, "\"code\":502"));
    CHECK(err && strstr(err, "data: [DONE]\n\n"));
    resp_free(&r);

    /* The proxy is still up; the other decode serves, also for a request whose first pick is
     * the dead one (refused: retried before any byte). */
    stub_proc *alive = dead == &d1 ? &d2 : &d1;
    for (int i = 0; i < 4; i++) {
        r = http_do(px.port, "POST", "/v1/completions", NULL,
                    "{\"prompt\":\"x\",\"max_tokens\":2}");
        CHECK_MSG(r.status == 200, "after the kill: %d %s", r.status, r.body ? r.body : "");
        resp_free(&r);
    }
    CHECK(proxy_health_counts(&px, 1, 1, 2000));
    stub_control(alive, "{\"token_delay_ms\":0}");

    /* Decode failures before any byte: 500, an empty stream, a connection closed before the
     * first chunk: each retried (same kv_transfer_params), the client sees a clean stream. */
    const char *modes[] = {"{\"fail\":\"500\",\"count\":1}", "{\"fail\":\"empty\",\"count\":1}",
                           "{\"fail\":\"close\",\"after\":0,\"count\":1}"};
    *dead = stub_start(dead->name, "decode", dead->port, NULL);
    CHECK(proxy_health_counts(&px, 1, 2, 3000));
    for (size_t m = 0; m < 3; m++) {
        stub_control(&d1, modes[m]);
        stub_control(&d2, modes[m]);
        r = http_do(px.port, "POST", "/v1/completions", NULL, stream_body);
        CHECK_MSG(r.status == 200 && r.body && strstr(r.body, "data: [DONE]") &&
                      !strstr(r.body, "\"error\""),
                  "mode %zu: %d %s", m, r.status, r.body ? r.body : "");
        resp_free(&r);
        stub_control(&d1, "{\"fail\":\"none\"}");
        stub_control(&d2, "{\"fail\":\"none\"}");
    }
    /* A non-streamed answer cut after its head: nothing reached the client, but the decode
     * worker had begun: 502, not a truncated 200. */
    stub_control(&d1, "{\"fail\":\"close\",\"after\":1}");
    stub_control(&d2, "{\"fail\":\"close\",\"after\":1}");
    r = http_do(px.port, "POST", "/v1/completions", NULL, "{\"prompt\":\"x\",\"max_tokens\":2}");
    check_error_body(&r, 502, "decode");
    resp_free(&r);
    stub_control(&d1, "{\"fail\":\"none\"}");
    stub_control(&d2, "{\"fail\":\"none\"}");
    CHECK(proxy_health_counts(&px, 1, 2, 3000));

    /* Every decode failing: a clean 502, not a 200 with an empty body. */
    stub_control(&d1, "{\"fail\":\"503\"}");
    stub_control(&d2, "{\"fail\":\"503\"}");
    r = http_do(px.port, "POST", "/v1/completions", NULL, stream_body);
    check_error_body(&r, 502, "decode");
    resp_free(&r);
    r = http_do(px.port, "POST", "/v1/completions", NULL, "{\"prompt\":\"x\"}");
    CHECK(r.status == 502 || r.status == 503);
    resp_free(&r);
    stub_control(&d1, "{\"fail\":\"none\"}");
    stub_control(&d2, "{\"fail\":\"none\"}");
    CHECK(proxy_health_counts(&px, 1, 2, 3000));

    /* Prefill failures: a 500 and a hang (past --prefill-timeout) are retried. */
    stub_control(&p, "{\"fail\":\"500\",\"count\":1}");
    r = http_do(px.port, "POST", "/v1/completions", NULL, "{\"prompt\":\"x\",\"max_tokens\":2}");
    CHECK_MSG(r.status == 200, "prefill 500 not retried: %d", r.status);
    resp_free(&r);
    stub_control(&p, "{\"fail\":\"hang\",\"count\":1}");
    r = http_do(px.port, "POST", "/v1/completions", NULL, "{\"prompt\":\"x\",\"max_tokens\":2}");
    CHECK_MSG(r.status == 200, "prefill hang not retried: %d", r.status);
    resp_free(&r);

    /* A client that leaves mid-stream cancels the decode leg: the worker sees it go. */
    stub_control(&d1, "{\"token_delay_ms\":30}");
    stub_control(&d2, "{\"token_delay_ms\":30}");
    int aborted = stub_stat(&d1, "aborted") + stub_stat(&d2, "aborted");
    fd = stream_open(px.port, stream_body, &r, "tok1 ");
    close(fd);
    resp_free(&r);
    long long end = now_ms() + 3000;
    while (stub_stat(&d1, "aborted") + stub_stat(&d2, "aborted") == aborted && now_ms() < end)
        sleep_ms(20);
    CHECK_EQ_INT(stub_stat(&d1, "aborted") + stub_stat(&d2, "aborted"), aborted + 1);
    CHECK_EQ_INT(stub_stat(&d1, "in_flight") + stub_stat(&d2, "in_flight"), 0);
    r = http_do(px.port, "GET", "/metrics", NULL, NULL);
    CHECK(r.body && strstr(r.body, "kind=\"midstream\"} 1"));
    CHECK(r.body && strstr(r.body, "kind=\"client_gone\"} 1"));
    CHECK(r.body && strstr(r.body, "duet_proxy_retries_total{leg=\"decode\"}"));
    resp_free(&r);
    expect_exit(stop(px.pid, SIGTERM), 0);
}

/* Waits until the stubs' in_flight add up to 0. */
static bool stubs_idle(const stub_proc *a, const stub_proc *b, int ms) {
    long long end = now_ms() + ms;
    while (now_ms() < end) {
        if (stub_stat(a, "in_flight") + (b ? stub_stat(b, "in_flight") : 0) == 0) return true;
        sleep_ms(20);
    }
    return false;
}

/* A streamed answer that ended well: [DONE], no error event, n tokens. */
static void check_clean_stream(const resp *r, int n, const char *what) {
    CHECK_MSG(r->status == 200 && r->complete && r->body && strstr(r->body, "data: [DONE]\n\n") &&
                  !strstr(r->body, "\"error\""),
              "%s: %d %s", what, r->status, r->body ? r->body : "");
    char tok[32];
    snprintf(tok, sizeof tok, "tok%d ", n - 1);
    CHECK_MSG(r->body && strstr(r->body, tok) && count_str(r->body, "data: {") == n, "%s: %s", what,
              r->body ? r->body : "");
}

static int metric_value(const proxy_proc *px, const char *line_start) {
    resp r = http_do(px->port, "GET", "/metrics", NULL, NULL);
    const char *at = r.body ? strstr(r.body, line_start) : NULL;
    int v = at ? atoi(at + strlen(line_start)) : -1;
    resp_free(&r);
    return v;
}

/* The "early_decode" field of prefill endpoint s in the proxy's GET /health: 1, 0, or -1 when
 * the endpoint or the field is missing. */
static int health_early(const proxy_proc *px, const stub_proc *s) {
    resp r = http_do(px->port, "GET", "/health", NULL, NULL);
    cJSON *j = resp_json(&r);
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(
        cJSON_GetObjectItemCaseSensitive(j, "prefill"), "instances");
    int v = -1;
    const cJSON *it;
    cJSON_ArrayForEach(it, list) {
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(it, "instance");
        const cJSON *e = cJSON_GetObjectItemCaseSensitive(it, "early_decode");
        if (cJSON_IsString(name) && !strcmp(name->valuestring, endpoint(s)) && cJSON_IsBool(e))
            v = cJSON_IsTrue(e);
    }
    cJSON_Delete(j);
    resp_free(&r);
    return v;
}

/* How many times needle occurs in the file under g_tmp. */
static int log_count(const char *name, const char *needle) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", g_tmp, name);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    static char buf[1 << 20];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    buf[n] = '\0';
    fclose(f);
    return count_str(buf, needle);
}

/* Early decode: the prefill leg streamed, the decode leg started at its first event with
 * kv_transfer_params while the prefill still computes, and the failure rules around it. */
static void scenario_early(void) {
    stub_proc p1 = stub_start("p1", "prefill", 0, "--prefill-delay-ms", "400", NULL);
    stub_proc d = stub_start("d1", "both", 0, NULL);
    const char *flags[] = {
        "--prefill", endpoint(&p1),   "--decode", endpoint(&d), "--retry-backoff",
        "0.005",     "--eject-after", "100",      NULL};
    proxy_proc px = proxy_start(flags);
    const char *body3 = "{\"prompt\":\"x\",\"max_tokens\":3,\"stream\":true}";

    /* The decode request comes while the prefill still computes (its answer ends 400 ms after
     * its first event); the client has its answer, and the prefill stream is read to its end,
     * never closed early (the worker would abort it and free the lease). */
    resp r = http_do(px.port, "POST", "/v1/completions", NULL, body3);
    check_clean_stream(&r, 3, "early");
    resp_free(&r);
    CHECK(stubs_idle(&p1, &d, 3000));
    double pe = stub_stat_f(&p1, "last_prefill_end_ms"),
           ds = stub_stat_f(&d, "last_decode_start_ms");
    CHECK_MSG(pe > 0 && ds > 0 && ds + 250 < pe, "decode came at %.0f, prefill ended at %.0f", ds,
              pe);
    CHECK_EQ_INT(stub_stat(&p1, "prefill_streamed"), 1);
    r = http_do(px.port, "POST", "/v1/completions", NULL, "{\"prompt\":\"x\",\"max_tokens\":3}");
    CHECK_MSG(r.status == 200 && r.body && strstr(r.body, "\"text\":\"tok0 tok1 tok2 \""),
              "not streamed: %d %s", r.status, r.body ? r.body : "");
    resp_free(&r);
    CHECK(stubs_idle(&p1, &d, 3000));
    CHECK_EQ_INT(stub_stat(&p1, "aborted"), 0);
    CHECK_EQ_INT(stub_stat(&p1, "bad") + stub_stat(&d, "bad") + stub_stat(&d, "plain"), 0);
    /* The prefill leg's duration is its stream's, to the end (>= 0.4 s each). */
    CHECK_EQ_INT(metric_value(&px, "duet_proxy_leg_duration_seconds_count{leg=\"prefill\"} "), 2);
    CHECK_EQ_INT(
        metric_value(&px, "duet_proxy_leg_duration_seconds_bucket{leg=\"prefill\",le=\"0.25\"} "),
        0);
    CHECK_EQ_INT(metric_value(&px, "duet_proxy_requests_in_flight "), 0);
    stub_control(&p1, "{\"prefill_delay_ms\":0}");

    /* (a) The prefill fails before its event with the params: retried as before. */
    int retries = metric_value(&px, "duet_proxy_retries_total{leg=\"prefill\"} ");
    stub_control(&p1, "{\"fail\":\"empty\",\"count\":1}");
    r = http_do(px.port, "POST", "/v1/completions", NULL, body3);
    check_clean_stream(&r, 3, "(a) a stream cut before the params");
    resp_free(&r);
    stub_control(&p1, "{\"fail\":\"500\",\"count\":1}");
    r = http_do(px.port, "POST", "/v1/completions", NULL, body3);
    check_clean_stream(&r, 3, "(a) 500");
    resp_free(&r);
    CHECK_EQ_INT(metric_value(&px, "duet_proxy_retries_total{leg=\"prefill\"} "), retries + 2);
    CHECK_EQ_INT(stub_stat(&d, "decode"), 4);

    /* (b) A stream without params in its first event: the final event's are taken; with none
     * at all and an error event instead of the token, the decode computes the prompt, and the
     * endpoint's legs stay streamed (a clean stream without params: scenario fallback). */
    stub_control(&p1, "{\"kv_events\":\"final\",\"prefill_delay_ms\":200}");
    r = http_do(px.port, "POST", "/v1/completions", NULL, body3);
    check_clean_stream(&r, 3, "(b) final event");
    resp_free(&r);
    pe = stub_stat_f(&p1, "last_prefill_end_ms");
    ds = stub_stat_f(&d, "last_decode_start_ms");
    CHECK_MSG(ds >= pe, "decode at %.0f before the prefill's final event at %.0f", ds, pe);
    CHECK_EQ_INT(stub_stat(&d, "plain"), 0);
    CHECK_EQ_INT(health_early(&px, &p1), 1);
    stub_control(&p1, "{\"kv_events\":\"none\",\"prefill_delay_ms\":0,\"fail\":\"error\","
                      "\"count\":1}");
    r = http_do(px.port, "POST", "/v1/completions", NULL, body3);
    check_clean_stream(&r, 3, "(b) error event");
    resp_free(&r);
    CHECK_EQ_INT(stub_stat(&d, "plain"), 1);
    CHECK_EQ_INT(metric_value(&px, "duet_proxy_retries_total{leg=\"prefill\"} "), retries + 2);
    CHECK_EQ_INT(health_early(&px, &p1), 1);
    stub_control(&p1, "{\"kv_events\":\"early\"}");

    /* A list of prompts: one chain per prompt, each with its early decode. */
    stub_control(&p1, "{\"prefill_delay_ms\":300}");
    int prefills = stub_stat(&p1, "prefill_streamed");
    r = http_do(px.port, "POST", "/v1/completions", NULL,
                "{\"prompt\":[\"a\",\"b\"],\"max_tokens\":2,\"stream\":true}");
    CHECK_MSG(r.status == 200 && r.body && strstr(r.body, "\"index\":1") &&
                  count_str(r.body, "data: [DONE]") == 1 && !strstr(r.body, "\"error\""),
              "list streamed: %d %s", r.status, r.body ? r.body : "");
    resp_free(&r);
    r = http_do(px.port, "POST", "/v1/completions", NULL,
                "{\"prompt\":[\"a\",\"b\"],\"max_tokens\":2}");
    cJSON *j = resp_json(&r);
    CHECK_MSG(r.status == 200 &&
                  cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(j, "choices")) == 2,
              "list: %d %s", r.status, r.body ? r.body : "");
    cJSON_Delete(j);
    resp_free(&r);
    CHECK(stubs_idle(&p1, &d, 3000));
    CHECK_EQ_INT(stub_stat(&p1, "prefill_streamed"), prefills + 4);
    CHECK_EQ_INT(stub_stat(&p1, "aborted"), 0);

    /* SIGTERM with a request answered but its prefill stream still open: the drain waits for
     * the stream's end (the prefill is not aborted), then the proxy exits 0. */
    stub_control(&p1, "{\"prefill_delay_ms\":800}");
    r = http_do(px.port, "POST", "/v1/completions", NULL, "{\"prompt\":\"x\",\"max_tokens\":2}");
    CHECK_EQ_INT(r.status, 200);
    resp_free(&r);
    long long t0 = now_ms();
    kill(px.pid, SIGTERM);
    expect_exit(wait_exit(px.pid, 5000), 0);
    CHECK_MSG(now_ms() - t0 >= 400, "exited after %lld ms, before the prefill stream's end",
              now_ms() - t0);
    CHECK_EQ_INT(stub_stat(&p1, "aborted"), 0);
    /* ... unless --drain-timeout comes first: then the stream is cut. */
    const char *flags_dt[] = {"--prefill",       endpoint(&p1), "--decode", endpoint(&d),
                              "--drain-timeout", "0.2",         NULL};
    px = proxy_start(flags_dt);
    r = http_do(px.port, "POST", "/v1/completions", NULL, "{\"prompt\":\"x\",\"max_tokens\":2}");
    CHECK_EQ_INT(r.status, 200);
    resp_free(&r);
    t0 = now_ms();
    kill(px.pid, SIGTERM);
    expect_exit(wait_exit(px.pid, 5000), 0);
    CHECK_MSG(now_ms() - t0 < 700, "drain took %lld ms", now_ms() - t0);
    CHECK(stubs_idle(&p1, NULL, 2000));
    CHECK_EQ_INT(stub_stat(&p1, "aborted"), 1);
    stub_control(&p1, "{\"prefill_delay_ms\":0}");

    /* (c) The prefill fails after the decode leg started. Two prefills, each failing once. */
    stub_proc p2 = stub_start("p2", "prefill", 0, NULL);
    const char *flags2[] = {"--prefill",  endpoint(&p1),   endpoint(&p2), "--decode",
                            endpoint(&d), "--policy",      "round-robin", "--retry-backoff",
                            "0.005",      "--eject-after", "100",         NULL};
    px = proxy_start(flags2);
    /* Nothing reached the client yet (the decode's first token comes after 300 ms): the decode
     * leg is canceled and the whole chain runs again on the other prefill, which fails too,
     * then on the first once more. A cut stream, then an error event. */
    stub_control(&d, "{\"token_delay_ms\":300}");
    const char *cuts[] = {"{\"fail\":\"close\",\"after\":1,\"count\":1,\"prefill_delay_ms\":50}",
                          "{\"fail\":\"error\",\"count\":1,\"prefill_delay_ms\":50}"};
    for (int k = 0; k < 2; k++) {
        stub_control(&p1, cuts[k]);
        stub_control(&p2, cuts[k]);
        int pre = stub_stat(&p1, "prefill") + stub_stat(&p2, "prefill");
        int aborted = stub_stat(&d, "aborted"), decodes = stub_stat(&d, "decode");
        retries = metric_value(&px, "duet_proxy_retries_total{leg=\"prefill\"} ");
        r = http_do(px.port, "POST", "/v1/completions", NULL, body3);
        check_clean_stream(&r, 3, k ? "(c) error event" : "(c) cut");
        resp_free(&r);
        CHECK_EQ_INT(stub_stat(&p1, "prefill") + stub_stat(&p2, "prefill"), pre + 3);
        CHECK_EQ_INT(stub_stat(&d, "aborted"), aborted + 2);
        CHECK_EQ_INT(stub_stat(&d, "decode"), decodes + 3);
        CHECK_EQ_INT(metric_value(&px, "duet_proxy_retries_total{leg=\"prefill\"} "), retries + 2);
    }
    /* A prefill stream that stalls after its first event times out (its gaps get
     * max(--idle-timeout, --prefill-timeout)): the same. A client not streaming, so nothing
     * reaches it before the decode answer's end, 1 s after its request. */
    expect_exit(stop(px.pid, SIGTERM), 0);
    const char *flags_t[] = {"--prefill",  endpoint(&p1),       endpoint(&p2), "--decode",
                             endpoint(&d), "--policy",          "round-robin", "--retry-backoff",
                             "0.005",      "--eject-after",     "100",         "--idle-timeout",
                             "0.2",        "--prefill-timeout", "0.3",         NULL};
    px = proxy_start(flags_t);
    stub_control(&p1, "{\"fail\":\"stall\",\"after\":1,\"count\":1}");
    stub_control(&p2, "{\"fail\":\"stall\",\"after\":1,\"count\":1}");
    stub_control(&d, "{\"token_delay_ms\":1000}");
    int aborted = stub_stat(&d, "aborted");
    int p_aborted = stub_stat(&p1, "aborted") + stub_stat(&p2, "aborted");
    t0 = now_ms();
    r = http_do(px.port, "POST", "/v1/completions", NULL, "{\"prompt\":\"x\",\"max_tokens\":2}");
    CHECK_MSG(r.status == 200 && r.body && strstr(r.body, "\"text\":\"tok0 tok1 \""),
              "(c) stall: %d %s", r.status, r.body ? r.body : "");
    resp_free(&r);
    CHECK_MSG(now_ms() - t0 >= 1500, "(c) stall answered after %lld ms", now_ms() - t0);
    CHECK_EQ_INT(stub_stat(&d, "aborted"), aborted + 2);
    CHECK(stubs_idle(&p1, &p2, 2000));
    CHECK_EQ_INT(stub_stat(&p1, "aborted") + stub_stat(&p2, "aborted"), p_aborted + 2);
    expect_exit(stop(px.pid, SIGTERM), 0);
    px = proxy_start(flags2);

    /* Every prefill failing so: 502 once the prefill retries are spent. */
    stub_control(&p1, "{\"fail\":\"close\",\"after\":1}");
    stub_control(&p2, "{\"fail\":\"close\",\"after\":1}");
    r = http_do(px.port, "POST", "/v1/completions", NULL, body3);
    check_error_body(&r, 502, "after the decode leg started");
    resp_free(&r);
    /* Bytes already reached the client (tokens every 20 ms, the prefill cut at 300 ms): the
     * decode leg goes on to its end; no retry. */
    stub_control(&p1, "{\"fail\":\"close\",\"after\":1,\"count\":1,\"prefill_delay_ms\":300}");
    stub_control(&p2, "{\"fail\":\"close\",\"after\":1,\"count\":1,\"prefill_delay_ms\":300}");
    stub_control(&d, "{\"token_delay_ms\":20}");
    int pre = stub_stat(&p1, "prefill") + stub_stat(&p2, "prefill");
    aborted = stub_stat(&d, "aborted");
    r = http_do(px.port, "POST", "/v1/completions", NULL,
                "{\"prompt\":\"x\",\"max_tokens\":30,\"stream\":true}");
    check_clean_stream(&r, 30, "(c) after bytes");
    resp_free(&r);
    CHECK_EQ_INT(stub_stat(&p1, "prefill") + stub_stat(&p2, "prefill"), pre + 1);
    CHECK_EQ_INT(stub_stat(&d, "aborted"), aborted);
    stub_control(&p1, "{\"fail\":\"none\"}");
    stub_control(&p2, "{\"fail\":\"none\"}");

    /* (d) The client leaves while both legs are open: both upstreams are closed. */
    stub_control(&p1, "{\"prefill_delay_ms\":2000}");
    stub_control(&p2, "{\"prefill_delay_ms\":2000}");
    p_aborted = stub_stat(&p1, "aborted") + stub_stat(&p2, "aborted");
    aborted = stub_stat(&d, "aborted");
    int fd =
        stream_open(px.port, "{\"prompt\":\"x\",\"max_tokens\":50,\"stream\":true}", &r, "tok1 ");
    CHECK_EQ_INT(stub_stat(&p1, "in_flight") + stub_stat(&p2, "in_flight"), 1);
    close(fd);
    resp_free(&r);
    CHECK(stubs_idle(&p1, &p2, 1500) && stubs_idle(&d, NULL, 1500));
    CHECK_EQ_INT(stub_stat(&p1, "aborted") + stub_stat(&p2, "aborted"), p_aborted + 1);
    CHECK_EQ_INT(stub_stat(&d, "aborted"), aborted + 1);
    CHECK_EQ_INT(metric_value(&px, "duet_proxy_requests_in_flight "), 0);
    expect_exit(stop(px.pid, SIGTERM), 0);

    /* --early-decode off: as before, the decode leg after the whole prefill answer. */
    stub_control(&p1, "{\"prefill_delay_ms\":200}");
    const char *flags3[] = {"--prefill",      endpoint(&p1), "--decode", endpoint(&d),
                            "--early-decode", "off",         NULL};
    px = proxy_start(flags3);
    int streamed = stub_stat(&p1, "prefill_streamed");
    r = http_do(px.port, "POST", "/v1/completions", NULL, body3);
    check_clean_stream(&r, 3, "off");
    resp_free(&r);
    CHECK_EQ_INT(stub_stat(&p1, "prefill_streamed"), streamed);
    pe = stub_stat_f(&p1, "last_prefill_end_ms");
    ds = stub_stat_f(&d, "last_decode_start_ms");
    CHECK_MSG(ds >= pe, "off: decode at %.0f, prefill ended at %.0f", ds, pe);
    CHECK_EQ_INT(metric_value(&px, "duet_proxy_leg_duration_seconds_count{leg=\"prefill\"} "), 1);
    CHECK_EQ_INT(stub_stat(&p1, "bad") + stub_stat(&p2, "bad") + stub_stat(&d, "bad"), 0);
    CHECK_EQ_INT(health_early(&px, &p1), 0);
    expect_exit(stop(px.pid, SIGTERM), 0);
}

/* Early decode's fallback, per prefill endpoint: one that streams a clean answer without any
 * kv_transfer_params (as vLLM's prefill workers do) gets its prefill legs whole from then on,
 * and their decode legs the params of the whole answers; an endpoint added (again) starts
 * streamed. */
static void scenario_fallback(void) {
    static const char warning[] = "answered a streamed request without kv_transfer_params";
    stub_proc p1 = stub_start("p1", "prefill", 0, "--kv-events", "none", NULL);
    stub_proc p2 = stub_start("p2", "prefill", 0, NULL);
    stub_proc d = stub_start("d1", "both", 0, NULL);
    const char *flags[] = {"--prefill", endpoint(&p1), "--decode",  endpoint(&d),
                           "--policy",  "round-robin", FAST_HEALTH, NULL};
    proxy_proc px = proxy_start(flags);
    const char *body3 = "{\"prompt\":\"x\",\"max_tokens\":3,\"stream\":true}";
    CHECK_EQ_INT(health_early(&px, &p1), 1);
    /* The request that finds out: a streamed prefill leg, no params anywhere in it; its decode
     * computes the prompt (no params), and p1 is marked. */
    resp r = http_do(px.port, "POST", "/v1/completions", NULL, body3);
    check_clean_stream(&r, 3, "first");
    resp_free(&r);
    CHECK_EQ_INT(stub_stat(&p1, "prefill_streamed"), 1);
    CHECK_EQ_INT(stub_stat(&d, "plain"), 1);
    CHECK_EQ_INT(health_early(&px, &p1), 0);
    /* From then on p1's legs go whole, as with --early-decode off, and carry params again. */
    r = http_do(px.port, "POST", "/v1/completions", NULL, body3);
    check_clean_stream(&r, 3, "second");
    resp_free(&r);
    r = http_do(px.port, "POST", "/v1/chat/completions", NULL,
                "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":2}");
    CHECK_MSG(r.status == 200 && r.body && strstr(r.body, "tok0 tok1 "), "chat: %d %s", r.status,
              r.body ? r.body : "");
    resp_free(&r);
    r = http_do(px.port, "POST", "/v1/completions", NULL,
                "{\"prompt\":[\"a\",\"b\"],\"max_tokens\":2,\"stream\":true}");
    CHECK_MSG(r.status == 200 && r.body && strstr(r.body, "\"index\":1") &&
                  count_str(r.body, "data: [DONE]") == 1 && !strstr(r.body, "\"error\""),
              "list: %d %s", r.status, r.body ? r.body : "");
    resp_free(&r);
    CHECK(stubs_idle(&p1, &d, 3000));
    CHECK_EQ_INT(stub_stat(&p1, "prefill"), 5);
    CHECK_EQ_INT(stub_stat(&p1, "prefill_streamed"), 1);
    CHECK_EQ_INT(stub_stat(&d, "decode"), 5);
    CHECK_EQ_INT(stub_stat(&d, "plain"), 1);
    CHECK_EQ_INT(stub_stat(&p1, "bad") + stub_stat(&d, "bad") + stub_stat(&p1, "aborted"), 0);
    CHECK_EQ_INT(log_count("proxy.log", warning), 1);
    /* Other endpoints keep early decode: p2 (sending params early) added beside p1. */
    char body[256];
    snprintf(body, sizeof body, "{\"type\":\"prefill\",\"instance\":\"%s\"}", endpoint(&p2));
    r = http_do(px.port, "POST", "/instances/add", NULL, body);
    CHECK_EQ_INT(r.status, 200);
    resp_free(&r);
    CHECK_MSG(proxy_health_counts(&px, 2, 1, 3000), "p2 not admitted");
    CHECK_EQ_INT(health_early(&px, &p2), 1);
    for (int i = 0; i < 4; i++) {
        r = http_do(px.port, "POST", "/v1/completions", NULL, body3);
        check_clean_stream(&r, 3, "p1 and p2");
        resp_free(&r);
    }
    CHECK_EQ_INT(stub_stat(&p2, "prefill_streamed"), 2);
    CHECK_EQ_INT(stub_stat(&p1, "prefill"), 7);
    CHECK_EQ_INT(stub_stat(&p1, "prefill_streamed"), 1);
    CHECK_EQ_INT(stub_stat(&d, "plain"), 1);
    /* p1 removed and added again: a new endpoint, streamed until it answers without params. */
    snprintf(body, sizeof body, "{\"type\":\"prefill\",\"instance\":\"%s\"}", endpoint(&p1));
    r = http_do(px.port, "POST", "/instances/remove", NULL, body);
    CHECK_EQ_INT(r.status, 200);
    resp_free(&r);
    r = http_do(px.port, "POST", "/instances/add", NULL, body);
    CHECK_EQ_INT(r.status, 200);
    resp_free(&r);
    CHECK_EQ_INT(health_early(&px, &p1), 1);
    CHECK_MSG(proxy_health_counts(&px, 2, 1, 3000), "p1 not admitted again");
    for (int i = 0; i < 4; i++) {
        r = http_do(px.port, "POST", "/v1/completions", NULL, body3);
        check_clean_stream(&r, 3, "p1 again");
        resp_free(&r);
    }
    CHECK_EQ_INT(stub_stat(&p1, "prefill"), 9);
    CHECK_EQ_INT(stub_stat(&p1, "prefill_streamed"), 2);
    CHECK_EQ_INT(stub_stat(&d, "plain"), 2);
    CHECK_EQ_INT(health_early(&px, &p1), 0);
    CHECK_EQ_INT(health_early(&px, &p2), 1);
    CHECK_EQ_INT(log_count("proxy.log", warning), 2);
    CHECK_EQ_INT(stub_stat(&p1, "bad") + stub_stat(&p2, "bad") + stub_stat(&d, "bad"), 0);
    expect_exit(stop(px.pid, SIGTERM), 0);
}

/* A decode leg that fails fast (its pull failed: the lease died with the prefill) while its
 * early prefill stream is still open waits for that stream's end: a failed prefill retries the
 * whole chain, a good one the decode. */
static void scenario_race(void) {
    stub_proc p1 = stub_start("p1", "prefill", 0, NULL);
    stub_proc p2 = stub_start("p2", "prefill", 0, NULL);
    stub_proc d = stub_start("d1", "decode", 0, NULL);
    const char *flags[] = {"--prefill",   endpoint(&p1),
                           endpoint(&p2), "--decode",
                           endpoint(&d),  "--policy",
                           "round-robin", "--retry-backoff",
                           "0.005",       "--eject-after",
                           "100",         "--decode-retries",
                           "1",           NULL};
    proxy_proc px = proxy_start(flags);
    const char *body3 = "{\"prompt\":\"x\",\"max_tokens\":3,\"stream\":true}";
    char dfail[160];
    snprintf(dfail, sizeof dfail,
             "duet_proxy_backend_failures_total{role=\"decode\",backend=\"%s\"} ", endpoint(&d));

    /* (a) Each prefill is cut 300 ms after its first event, once; the decode answers 500 at
     * once, twice. Retried at once, the two decode failures would spend --decode-retries 1 and
     * answer 502; waiting, each prefill failure retries the whole chain, and the third chain
     * succeeds. The decode endpoint is not blamed. */
    const char *cut = "{\"fail\":\"close\",\"after\":1,\"count\":1,\"prefill_delay_ms\":300}";
    stub_control(&p1, cut);
    stub_control(&p2, cut);
    stub_control(&d, "{\"fail\":\"500\",\"count\":2}");
    resp r = http_do(px.port, "POST", "/v1/completions", NULL, body3);
    check_clean_stream(&r, 3, "(a) prefill failing after the decode");
    resp_free(&r);
    CHECK_EQ_INT(stub_stat(&p1, "prefill") + stub_stat(&p2, "prefill"), 3);
    CHECK_EQ_INT(stub_stat(&d, "requests"), 3);
    CHECK_EQ_INT(stub_stat(&d, "aborted"), 0);
    CHECK_EQ_INT(metric_value(&px, "duet_proxy_retries_total{leg=\"prefill\"} "), 2);
    CHECK_EQ_INT(metric_value(&px, "duet_proxy_retries_total{leg=\"decode\"} "), 0);
    CHECK_EQ_INT(metric_value(&px, dfail), 0);

    /* (b) The prefill ends well 300 ms after its first event; the decode fails once at once:
     * retried after the prefill's end, as a decode retry, and blamed. */
    stub_control(&p1, "{\"prefill_delay_ms\":300}");
    stub_control(&p2, "{\"prefill_delay_ms\":300}");
    stub_control(&d, "{\"fail\":\"500\",\"count\":1}");
    r = http_do(px.port, "POST", "/v1/completions", NULL, "{\"prompt\":\"x\",\"max_tokens\":2}");
    CHECK_MSG(r.status == 200 && r.body && strstr(r.body, "\"text\":\"tok0 tok1 \""), "(b): %d %s",
              r.status, r.body ? r.body : "");
    resp_free(&r);
    CHECK(stubs_idle(&p1, &p2, 2000));
    double pe = stub_stat_f(&p1, "last_prefill_end_ms");
    double pe2 = stub_stat_f(&p2, "last_prefill_end_ms");
    if (pe2 > pe) pe = pe2;
    double ds = stub_stat_f(&d, "last_decode_start_ms");
    CHECK_MSG(ds >= pe, "(b) decode retried at %.0f, before the prefill's end at %.0f", ds, pe);
    CHECK_EQ_INT(stub_stat(&d, "requests"), 5);
    CHECK_EQ_INT(metric_value(&px, "duet_proxy_retries_total{leg=\"prefill\"} "), 2);
    CHECK_EQ_INT(metric_value(&px, "duet_proxy_retries_total{leg=\"decode\"} "), 1);
    CHECK_EQ_INT(metric_value(&px, dfail), 1);

    /* (c) The client leaves while a failed decode waits for the prefill stream: the stream is
     * closed (the prefill aborted) and nothing is left behind. */
    stub_control(&p1, "{\"prefill_delay_ms\":3000}");
    stub_control(&p2, "{\"prefill_delay_ms\":3000}");
    stub_control(&d, "{\"fail\":\"500\",\"count\":1}");
    int p_aborted = stub_stat(&p1, "aborted") + stub_stat(&p2, "aborted");
    int fd = connect_to(px.port);
    CHECK(fd >= 0);
    send_request(fd, "POST", "/v1/completions", NULL, body3);
    long long end = now_ms() + 3000;
    while (stub_stat(&d, "requests") < 6 && now_ms() < end) sleep_ms(10);
    CHECK_EQ_INT(stub_stat(&d, "requests"), 6);
    sleep_ms(50);
    CHECK_EQ_INT(stub_stat(&p1, "in_flight") + stub_stat(&p2, "in_flight"), 1);
    close(fd);
    CHECK(stubs_idle(&p1, &p2, 1500));
    CHECK_EQ_INT(stub_stat(&p1, "aborted") + stub_stat(&p2, "aborted"), p_aborted + 1);
    end = now_ms() + 1000;
    while (metric_value(&px, "duet_proxy_requests_in_flight ") != 0 && now_ms() < end) sleep_ms(10);
    CHECK_EQ_INT(metric_value(&px, "duet_proxy_requests_in_flight "), 0);
    CHECK_EQ_INT(stub_stat(&d, "requests"), 6);
    CHECK_EQ_INT(stub_stat(&p1, "bad") + stub_stat(&p2, "bad") + stub_stat(&d, "bad"), 0);
    expect_exit(stop(px.pid, SIGTERM), 0);
}

static void scenario_load(void) {
    stub_proc p1 = stub_start("p1", "prefill", 0, NULL);
    stub_proc p2 = stub_start("p2", "prefill", 0, NULL);
    stub_proc d1 = stub_start("d1", "decode", 0, "--token-delay-ms", "1", NULL);
    stub_proc d2 = stub_start("d2", "decode", 0, "--token-delay-ms", "1", NULL);
    const char *flags[] = {"--prefill",   endpoint(&p1), endpoint(&p2), "--decode",
                           endpoint(&d1), endpoint(&d2), NULL};
    proxy_proc px = proxy_start(flags);
    char out[4096];
    const char *bench[] = {"--requests",   "1000", "--concurrency",   "50", "--stream",
                           "--max-tokens", "16",   "--fail-on-error", NULL};
    CHECK_EQ_INT(run_bench(px.port, bench, out, sizeof out), 0);
    CHECK(strstr(out, "ok 1000 ") != NULL);
    CHECK_EQ_INT(stub_stat(&p1, "prefill") + stub_stat(&p2, "prefill"), 1000);
    CHECK_EQ_INT(stub_stat(&d1, "decode") + stub_stat(&d2, "decode"), 1000);
    /* Least-load spreads: neither decode idles. */
    CHECK(stub_stat(&d1, "decode") > 200 && stub_stat(&d2, "decode") > 200);
    CHECK_EQ_INT(stub_stat(&p1, "bad") + stub_stat(&d1, "bad") + stub_stat(&d2, "bad"), 0);
    CHECK(stub_stat(&d1, "max_in_flight") > 1);
    /* Keep-alive pools: connections are reused, not opened per request. */
    int conns = stub_stat(&p1, "connections") + stub_stat(&p2, "connections") +
                stub_stat(&d1, "connections") + stub_stat(&d2, "connections");
    CHECK_MSG(conns < 400, "%d upstream connections for 2000 upstream requests", conns);
    expect_exit(stop(px.pid, SIGTERM), 0);
}

static void scenario_drain(void) {
    stub_proc p = stub_start("p1", "prefill", 0, NULL);
    stub_proc d = stub_start("d1", "decode", 0, "--token-delay-ms", "20", NULL);
    const char *flags[] = {"--prefill", endpoint(&p), "--decode", endpoint(&d), NULL};
    proxy_proc px = proxy_start(flags);
    resp r;
    int fd =
        stream_open(px.port, "{\"prompt\":\"x\",\"max_tokens\":30,\"stream\":true}", &r, "tok1 ");
    kill(px.pid, SIGTERM);
    sleep_ms(100);
    CHECK_MSG(connect_to(px.port) < 0, "still accepting while draining");
    CHECK(read_some(fd, &r, NULL, 5000));
    close(fd);
    resp_parse(&r);
    CHECK(r.complete);
    CHECK(r.body && strstr(r.body, "tok29 ") && strstr(r.body, "data: [DONE]"));
    CHECK(r.body && !strstr(r.body, "\"error\""));
    resp_free(&r);
    expect_exit(wait_exit(px.pid, 3000), 0);

    /* A stream longer than --drain-timeout is cut off at the deadline; exit 0 all the same. */
    const char *flags2[] = {"--prefill",       endpoint(&p), "--decode", endpoint(&d),
                            "--drain-timeout", "0.3",        NULL};
    px = proxy_start(flags2);
    fd = stream_open(px.port, "{\"prompt\":\"x\",\"max_tokens\":500,\"stream\":true}", &r, "tok1 ");
    long long t0 = now_ms();
    kill(px.pid, SIGTERM);
    expect_exit(wait_exit(px.pid, 3000), 0);
    CHECK(now_ms() - t0 < 2000);
    close(fd);
    resp_free(&r);
    long long end = now_ms() + 2000;
    while (stub_stat(&d, "in_flight") != 0 && now_ms() < end) sleep_ms(20);
    CHECK_EQ_INT(stub_stat(&d, "in_flight"), 0); /* the decode leg was canceled */
}

static void scenario_admin(void) {
    stub_proc p1 = stub_start("p1", "prefill", 0, NULL);
    stub_proc p2 = stub_start("p2", "prefill", 0, NULL);
    stub_proc d = stub_start("d1", "decode", 0, NULL);
    const char *flags[] = {"--prefill", endpoint(&p1), "--decode",  endpoint(&d),
                           "--policy",  "round-robin", FAST_HEALTH, NULL};
    proxy_proc px = proxy_start(flags);
    char body[256];
    snprintf(body, sizeof body, "{\"type\":\"prefill\",\"instances\":[\"%s\"]}", endpoint(&p2));
    resp r = http_do(px.port, "POST", "/instances/add", NULL, body);
    CHECK_EQ_INT(r.status, 200);
    CHECK(r.body && strstr(r.body, "current_prefill_instances") && strstr(r.body, endpoint(&p2)));
    resp_free(&r);
    CHECK_MSG(proxy_health_counts(&px, 2, 1, 3000), "added instance not admitted");
    for (int i = 0; i < 6; i++) {
        r = http_do(px.port, "POST", "/v1/completions", NULL,
                    "{\"prompt\":\"x\",\"max_tokens\":1}");
        CHECK_EQ_INT(r.status, 200);
        resp_free(&r);
    }
    CHECK_EQ_INT(stub_stat(&p1, "prefill"), 3);
    CHECK_EQ_INT(stub_stat(&p2, "prefill"), 3);
    /* vllm-ascend's singular spelling; then everything goes to p2. */
    snprintf(body, sizeof body, "{\"type\":\"prefill\",\"instance\":\"%s\"}", endpoint(&p1));
    r = http_do(px.port, "POST", "/instances/remove", NULL, body);
    CHECK_EQ_INT(r.status, 200);
    CHECK(r.body && !strstr(r.body, endpoint(&p1)));
    resp_free(&r);
    for (int i = 0; i < 4; i++) {
        r = http_do(px.port, "POST", "/v1/completions", NULL,
                    "{\"prompt\":\"x\",\"max_tokens\":1}");
        CHECK_EQ_INT(r.status, 200);
        resp_free(&r);
    }
    CHECK_EQ_INT(stub_stat(&p1, "prefill"), 3);
    CHECK_EQ_INT(stub_stat(&p2, "prefill"), 7);
    r = http_do(px.port, "POST", "/instances/remove", NULL, body);
    check_error_body(&r, 404, NULL);
    resp_free(&r);
    const char *bad[] = {"{\"type\":\"gpu\",\"instance\":\"127.0.0.1:1\"}",
                         "{\"type\":\"decode\",\"instance\":\"nohostport\"}",
                         "{\"type\":\"decode\"}", "not json",
                         "{\"type\":\"decode\",\"instances\":[]}"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        r = http_do(px.port, "POST", "/instances/add", NULL, bad[i]);
        check_error_body(&r, 400, NULL);
        resp_free(&r);
    }
    /* An added instance nobody listens on never becomes eligible. */
    int dead_port = free_port();
    snprintf(body, sizeof body, "{\"type\":\"decode\",\"instance\":\"127.0.0.1:%d\"}", dead_port);
    r = http_do(px.port, "POST", "/instances/add", NULL, body);
    CHECK_EQ_INT(r.status, 200);
    resp_free(&r);
    sleep_ms(500);
    CHECK(proxy_health_counts(&px, 1, 1, 500));
    for (int i = 0; i < 4; i++) {
        r = http_do(px.port, "POST", "/v1/completions", NULL,
                    "{\"prompt\":\"x\",\"max_tokens\":1}");
        CHECK_EQ_INT(r.status, 200);
        resp_free(&r);
    }
    expect_exit(stop(px.pid, SIGTERM), 0);
}

/* Runs duet-proxy with args (one shell word each, NULL-terminated); its stdout and stderr in
 * out; returns its exit status (-1 if it did not exit). */
static int proxy_run(const char *const *args, char *out, size_t cap) {
    char cmd[1024];
    int n = snprintf(cmd, sizeof cmd, "%s", g_proxy_bin);
    for (size_t k = 0; args[k]; k++) n += snprintf(cmd + n, sizeof cmd - (size_t)n, " %s", args[k]);
    snprintf(cmd + n, sizeof cmd - (size_t)n, " 2>&1");
    FILE *f = popen(cmd, "r");
    out[0] = '\0';
    if (!f) return -1;
    size_t got = fread(out, 1, cap - 1, f);
    out[got] = '\0';
    int st = pclose(f);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* The command line: bad flags are one clear line and exit 2; vllm-ascend's flags and a JSON
 * file both start a working proxy; --help is the option table's. */
static void scenario_cli(void) {
    const char *bad[][8] = {
        {"--port", "abc", "--prefill", "127.0.0.1:1", "--decode", "127.0.0.1:2", NULL},
        {"--bogus", NULL},
        {"--prefill", "127.0.0.1:1", NULL},
        {"--prefill", "127.0.0.1", "--decode", "127.0.0.1:2", NULL},
        {"--prefiller-hosts", "a", "b", "--prefiller-ports", "1", "--decode", "h:2", NULL},
        {"--policy", "random", "--prefill", "h:1", "--decode", "h:2", NULL},
        {"--config", "/nonexistent.json", NULL},
        {"--prefill", "h:1", "--decode", "h:2", "--helth-interval", "1", NULL},
    };
    char out[8192];
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int st = proxy_run(bad[i], out, sizeof out);
        CHECK_MSG(st == 2, "case %zu: exit %d", i, st);
        CHECK_MSG(!strncmp(out, "duet-proxy: ", 12) && count_str(out, "\n") == 1,
                  "case %zu: not one clear line: %s", i, out);
    }
    const char *typo[] = {"--prefill", "h:1", "--decode", "h:2", "--helth-interval", "1", NULL};
    proxy_run(typo, out, sizeof out);
    CHECK_MSG(strstr(out, "unknown option --helth-interval (did you mean --health-interval?)"),
              "%s", out);
    const char *help[] = {"--help", NULL};
    CHECK_EQ_INT(proxy_run(help, out, sizeof out), 0);
    CHECK(!strncmp(out, "usage: duet-proxy ", 18) && strstr(out, "--prefiller-hosts HOST...") &&
          strstr(out, "--drain-timeout S") && strstr(out, "(default 30)"));
    stub_proc p = stub_start("p1", "prefill", 0, NULL);
    stub_proc d = stub_start("d1", "decode", 0, NULL);
    char pport[16], dport[16];
    snprintf(pport, sizeof pport, "%d", p.port);
    snprintf(dport, sizeof dport, "%d", d.port);
    const char *vflags[] = {"--health-int=0.5", /* a prefix, and =value */
                            "--prefiller-hosts",
                            "127.0.0.1",
                            "--prefiller-ports",
                            pport,
                            "--decoder-hosts",
                            "localhost",
                            "--decoder-ports",
                            dport,
                            NULL};
    proxy_proc px = proxy_start(vflags);
    resp r =
        http_do(px.port, "POST", "/v1/completions", NULL, "{\"prompt\":\"x\",\"max_tokens\":2}");
    CHECK_EQ_INT(r.status, 200);
    resp_free(&r);
    expect_exit(stop(px.pid, SIGTERM), 0);

    char path[512];
    snprintf(path, sizeof path, "%s/proxy.json", g_tmp);
    FILE *f = fopen(path, "w");
    fprintf(
        f,
        "{\"prefill\":[\"127.0.0.1:%d\"],\"decode\":\"127.0.0.1:%d\",\"policy\":\"power-of-two\","
        "\"api_key\":\"k\",\"connect_timeout\":1.5}\n",
        p.port, d.port);
    fclose(f);
    const char *cflags[] = {"--config", path, NULL};
    px = proxy_start(cflags);
    r = http_do(px.port, "POST", "/v1/completions", "Authorization: Bearer k\r\n",
                "{\"prompt\":\"x\",\"max_tokens\":2}");
    CHECK_EQ_INT(r.status, 200);
    resp_free(&r);
    expect_exit(stop(px.pid, SIGTERM), 0);
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: test_proxy SCENARIO STUB PROXY BENCH\n");
        return 2;
    }
    g_stub_bin = argv[2];
    g_proxy_bin = argv[3];
    g_bench_bin = argv[4];
    snprintf(g_tmp, sizeof g_tmp, "/tmp/duet-proxy-test-%s-%d", argv[1], (int)getpid());
    mkdir(g_tmp, 0755);
    fprintf(stderr, "logs in %s\n", g_tmp);
    signal(SIGALRM, on_alarm);
    signal(SIGPIPE, SIG_IGN);
    alarm(60);
    atexit(kill_all);
    const char *s = argv[1];
    if (!strcmp(s, "basic"))
        scenario_basic();
    else if (!strcmp(s, "auth"))
        scenario_auth();
    else if (!strcmp(s, "failover"))
        scenario_failover();
    else if (!strcmp(s, "midstream"))
        scenario_midstream();
    else if (!strcmp(s, "load"))
        scenario_load();
    else if (!strcmp(s, "drain"))
        scenario_drain();
    else if (!strcmp(s, "admin"))
        scenario_admin();
    else if (!strcmp(s, "cli"))
        scenario_cli();
    else if (!strcmp(s, "early"))
        scenario_early();
    else if (!strcmp(s, "fallback"))
        scenario_fallback();
    else if (!strcmp(s, "race"))
        scenario_race();
    else {
        fprintf(stderr, "unknown scenario %s\n", s);
        return 2;
    }
    kill_all();
    if (!g_check_failures) {
        char cmd[300];
        snprintf(cmd, sizeof cmd, "rm -rf %s", g_tmp);
        if (system(cmd)) fprintf(stderr, "could not remove %s\n", g_tmp);
    }
    CHECK_DONE();
}
