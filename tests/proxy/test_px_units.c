/* Unit tests of duet-proxy's pure parts: the balancing policies (what each picks, how load is
 * charged and released), the command line and JSON settings, and the two legs' JSON bodies. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "px_body.h"
#include "px_config.h"
#include "px_policy.h"

static void test_policies(void) {
    px_policy_kind k;
    CHECK(px_policy_parse("least-load", &k) == DUET_OK && k == PX_POLICY_LEAST_LOAD);
    CHECK(px_policy_parse("round-robin", &k) == DUET_OK && k == PX_POLICY_ROUND_ROBIN);
    CHECK(px_policy_parse("power-of-two", &k) == DUET_OK && k == PX_POLICY_POWER_OF_TWO);
    CHECK(px_policy_parse("random", &k) == DUET_ERR_INVALID);
    CHECK(!strcmp(px_policy_kind_name(PX_POLICY_POWER_OF_TWO), "power-of-two"));

    px_target t[4];
    px_target *c[4] = {&t[0], &t[1], &t[2], &t[3]};
    memset(t, 0, sizeof t);

    /* Round-robin: in order, whatever the load; charges anyway (in-flight metrics). */
    px_policy *rr = NULL;
    CHECK(px_policy_create(PX_POLICY_ROUND_ROBIN, 1, &rr) == DUET_OK);
    t[0].load = 1000;
    for (int i = 0; i < 8; i++) CHECK(px_policy_pick(rr, c, 4, 5) == c[i % 4]);
    CHECK_EQ_INT(t[1].active, 2);
    CHECK_EQ_INT(t[1].load, 10);
    px_policy_release(rr, &t[1], 5);
    CHECK_EQ_INT(t[1].active, 1);
    CHECK_EQ_INT(t[1].load, 5);
    px_policy_release(rr, &t[1], 50); /* never below zero */
    CHECK_EQ_INT(t[1].load, 0);
    CHECK(px_policy_pick(rr, c, 0, 1) == NULL);
    px_policy_destroy(rr);

    /* Least-load: the smallest load; ties go round so a burst spreads. */
    memset(t, 0, sizeof t);
    px_policy *ll = NULL;
    CHECK(px_policy_create(PX_POLICY_LEAST_LOAD, 1, &ll) == DUET_OK);
    int hits[4] = {0};
    for (int i = 0; i < 400; i++) {
        px_target *p = px_policy_pick(ll, c, 4, 10);
        hits[p - t]++;
    }
    for (int i = 0; i < 4; i++) CHECK_EQ_INT(hits[i], 100); /* equal load kept equal */
    t[2].load -= 500;                                       /* a backend whose requests finished */
    CHECK(px_policy_pick(ll, c, 4, 10) == &t[2]);
    /* A long prompt weighs more than many short ones. */
    memset(t, 0, sizeof t);
    px_target *heavy = px_policy_pick(ll, c, 2, 10000);
    px_target *light = heavy == &t[0] ? &t[1] : &t[0];
    for (int i = 0; i < 50; i++) CHECK(px_policy_pick(ll, c, 2, 10) == light);
    /* Equal loads: fewer active requests wins. */
    memset(t, 0, sizeof t);
    t[0].load = t[1].load = 7;
    t[0].active = 3;
    t[1].active = 1;
    for (int i = 0; i < 4; i++) {
        CHECK(px_policy_pick(ll, c, 2, 0) == &t[1]);
        px_policy_release(ll, &t[1], 0);
    }
    px_policy_destroy(ll);

    /* Power of two: never the heaviest of 2 when it has a choice; spreads over all. */
    memset(t, 0, sizeof t);
    px_policy *p2 = NULL;
    CHECK(px_policy_create(PX_POLICY_POWER_OF_TWO, 42, &p2) == DUET_OK);
    t[3].load = 1000000;
    memset(hits, 0, sizeof hits);
    for (int i = 0; i < 1000; i++) {
        px_target *p = px_policy_pick(p2, c, 4, 1);
        hits[p - t]++;
        px_policy_release(p2, p, 1);
    }
    CHECK_EQ_INT(hits[3], 0);
    for (int i = 0; i < 3; i++) CHECK_MSG(hits[i] > 200, "target %d got %d", i, hits[i]);
    CHECK(px_policy_pick(p2, c, 1, 1) == c[0]); /* one candidate */
    px_policy_destroy(p2);
    px_policy_destroy(NULL);
}

/* px_config_parse_args on args (NULL-terminated) with stdout and stderr captured in out. */
static int parse(px_config *cfg, const char *const *args, char *out, size_t cap) {
    char *argv[64] = {"duet-proxy"};
    int argc = 1;
    for (; *args; args++) argv[argc++] = (char *)*args;
    px_config_init(cfg);
    fflush(stdout);
    fflush(stderr);
    int saved_out = dup(1), saved_err = dup(2);
    FILE *tmp = tmpfile();
    dup2(fileno(tmp), 1);
    dup2(fileno(tmp), 2);
    int rc = px_config_parse_args(cfg, argc, argv);
    fflush(stdout);
    fflush(stderr);
    dup2(saved_out, 1);
    dup2(saved_err, 2);
    close(saved_out);
    close(saved_err);
    rewind(tmp);
    size_t n = fread(out, 1, cap - 1, tmp);
    out[n] = '\0';
    fclose(tmp);
    return rc;
}

static int count_lines(const char *s) {
    int n = 0;
    for (; *s; s++) n += *s == '\n';
    return n;
}

static void test_config(void) {
    px_config cfg;
    char out[8192];
    unsetenv("DUET_API_KEY");
    unsetenv("DUET_UPSTREAM_API_KEY");

    /* The defaults are the table's. */
    px_config_init(&cfg);
    CHECK(!strcmp(cfg.host, "0.0.0.0") && cfg.port == 8000 && cfg.policy == PX_POLICY_LEAST_LOAD);
    CHECK(cfg.connect_timeout_ms == 5000 && cfg.prefill_timeout_ms == 600000);
    CHECK(cfg.retry_backoff_ms == 20 && cfg.retry_backoff_max_ms == 1000);
    CHECK(cfg.eject_after == 3 && cfg.decode_retries == 2 && cfg.max_connections == 4096);
    CHECK(cfg.max_body_bytes == 32 * 1024 * 1024 && !cfg.api_key && !cfg.n_prefill);
    CHECK(cfg.early_decode);
    px_config_cleanup(&cfg);

    /* --early-decode on|off, and the file's booleans or words. */
    const char *e1[] = {"--prefill", "a:1", "--decode", "b:2", "--early-decode", "off", NULL};
    CHECK(parse(&cfg, e1, out, sizeof out) == 0 && !cfg.early_decode);
    px_config_cleanup(&cfg);
    const char *e2[] = {"--prefill", "a:1", "--decode", "b:2", "--early-decode=on", NULL};
    CHECK(parse(&cfg, e2, out, sizeof out) == 0 && cfg.early_decode);
    px_config_cleanup(&cfg);
    const char *ej[] = {"{\"early_decode\":false}", "{\"early_decode\":\"off\"}",
                        "{\"early-decode\":\"on\"}"};
    for (size_t i = 0; i < 3; i++) {
        char e[256];
        px_config_init(&cfg);
        CHECK_MSG(px_config_parse_json(&cfg, ej[i], strlen(ej[i]), e, sizeof e) == DUET_OK, "%s",
                  ej[i]);
        CHECK_MSG(cfg.early_decode == (i == 2), "%s", ej[i]);
        px_config_cleanup(&cfg);
    }

    const char *a1[] = {"--host",
                        "127.0.0.1",
                        "--port",
                        "9000",
                        "--prefill",
                        "a:1",
                        "[::1]:2",
                        "--decode=b:3",
                        "--policy",
                        "power-of-two",
                        "--connect-timeout",
                        "1.5",
                        "--max-retries",
                        "5",
                        "--retry-delay",
                        "0.2",
                        "--max-body-bytes",
                        "1000",
                        NULL};
    CHECK(parse(&cfg, a1, out, sizeof out) == 0);
    CHECK(!strcmp(cfg.host, "127.0.0.1") && cfg.port == 9000);
    CHECK_EQ_INT(cfg.n_prefill, 2);
    CHECK(!strcmp(cfg.prefill[0].host, "a") && cfg.prefill[0].port == 1);
    CHECK(!strcmp(cfg.prefill[1].host, "::1") && cfg.prefill[1].port == 2);
    CHECK(cfg.n_decode == 1 && cfg.decode[0].port == 3);
    CHECK(cfg.policy == PX_POLICY_POWER_OF_TWO);
    CHECK_EQ_INT(cfg.connect_timeout_ms, 1500);
    CHECK(cfg.prefill_retries == 5 && cfg.decode_retries == 5);
    CHECK_EQ_INT(cfg.retry_backoff_ms, 200);
    CHECK_EQ_INT(cfg.max_body_bytes, 1000);
    char ep[300];
    px_endpoint_format(&cfg.prefill[1], ep, sizeof ep);
    CHECK(!strcmp(ep, "[::1]:2"));
    px_config_cleanup(&cfg);

    /* --flag=value, underscores, unique prefixes and size suffixes, as the workers take them. */
    const char *a3[] = {"--prefill=a:1",
                        "--decode",
                        "b:2",
                        "--policy=round-robin",
                        "--idle_timeout=7",
                        "--max-connections", /* exact, also a prefix of the next */
                        "10",
                        "--max-connections-per",
                        "3",
                        "--max-body-bytes",
                        "64k",
                        "--drain",
                        "0.25",
                        NULL};
    CHECK(parse(&cfg, a3, out, sizeof out) == 0);
    CHECK(cfg.policy == PX_POLICY_ROUND_ROBIN && cfg.idle_timeout_ms == 7000);
    CHECK(cfg.max_connections == 10 && cfg.max_body_bytes == 65536 && cfg.drain_timeout_ms == 250);
    CHECK(cfg.max_connections_per_client == 3);
    px_config_cleanup(&cfg);

    /* --max-retries sets what the two flags of their own leave alone, in any order. */
    const char *a7[] = {
        "--decode-retries", "1", "--max-retries", "5", "--prefill", "a:1", "--decode", "b:2", NULL};
    CHECK(parse(&cfg, a7, out, sizeof out) == 0);
    CHECK(cfg.prefill_retries == 5 && cfg.decode_retries == 1);
    px_config_cleanup(&cfg);

    /* vllm-ascend's spelling, and the key from the environment. */
    setenv("DUET_API_KEY", "k1", 1);
    const char *a2[] = {
        "--prefiller-hosts", "h1", "h2", "--prefiller-ports", "1", "2", "--decoder-hosts", "h3",
        "--decoder-ports",   "3",  NULL};
    CHECK(parse(&cfg, a2, out, sizeof out) == 0);
    CHECK(cfg.n_prefill == 2 && !strcmp(cfg.prefill[1].host, "h2") && cfg.prefill[1].port == 2);
    CHECK(cfg.n_decode == 1 && !strcmp(cfg.decode[0].host, "h3"));
    CHECK(cfg.api_key && !strcmp(cfg.api_key, "k1"));
    CHECK(cfg.policy == PX_POLICY_LEAST_LOAD); /* the default */
    px_config_cleanup(&cfg);
    unsetenv("DUET_API_KEY");

    /* Each mistake is one line naming the flag, and exit status 2. */
    struct {
        const char *args[12];
        const char *needle;
    } bad[] = {
        {{"--port", "x", "--prefill", "a:1", "--decode", "b:2"}, "--port"},
        {{"--port", "70000", "--prefill", "a:1", "--decode", "b:2"}, "--port"},
        {{"--prefill", "a:1", "--decode", "b:2", "--what"}, "--what"},
        {{"--prefill", "a", "--decode", "b:2"}, "--prefill"},
        {{"--prefill", "a:0", "--decode", "b:2"}, "--prefill"},
        {{"--prefill", "::1:2", "--decode", "b:2"}, "--prefill"},
        {{"--prefill", "a:1"}, "no decode"},
        {{"--decode", "a:1"}, "no prefill"},
        {{"--prefill", "--decode", "a:1"}, "--prefill"},
        {{"--prefill", "a:1", "--decode", "b:2", "--policy", "fifo"}, "--policy"},
        {{"--prefill", "a:1", "--decode", "b:2", "--connect-timeout", "-1"}, "--connect-timeout"},
        {{"--prefill", "a:1", "--decode", "b:2", "--eject-after", "0"}, "--eject-after"},
        {{"--prefill", "a:1", "--decode", "b:2", "--health-interval", "0"}, "--health-interval"},
        {{"--prefiller-hosts", "a", "--prefiller-ports", "1", "2", "--decode", "b:2"}, "prefiller"},
        {{"--prefill", "a:1", "--decode", "b:2", "--port"}, "--port"},
        {{"stray", "--prefill", "a:1", "--decode", "b:2"}, "stray"},
        {{"--prefill", "a:1", "--decode", "b:2", "--api-key="}, "--api-key: empty key"},
        {{"--prefill", "a:1", "--decode", "b:2", "--decod-timeout", "3"},
         "unknown option --decod-timeout (did you mean --decode-timeout?)"},
        {{"--prefill", "a:1", "--decode", "b:2", "--retry", "1"}, "ambiguous option --retry"},
        {{"--config", "/nonexistent.json"}, "--config: cannot read /nonexistent.json"},
        {{"--prefill", "a:1", "--decode", "b:2", "--early-decode", "maybe"},
         "--early-decode: expected on or off, got 'maybe'"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        out[0] = '\0';
        CHECK_MSG(parse(&cfg, bad[i].args, out, sizeof out) == 2, "case %zu accepted", i);
        CHECK_MSG(!strncmp(out, "duet-proxy: ", 12) && strstr(out, bad[i].needle) &&
                      count_lines(out) == 1,
                  "case %zu: '%s'", i, out);
        px_config_cleanup(&cfg);
    }
    setenv("DUET_UPSTREAM_API_KEY", "a\nb", 1);
    const char *a4[] = {"--prefill", "a:1", "--decode", "b:2", NULL};
    CHECK(parse(&cfg, a4, out, sizeof out) == 2);
    CHECK_MSG(strstr(out, "DUET_UPSTREAM_API_KEY (for --upstream-api-key): control characters") &&
                  count_lines(out) == 1,
              "%s", out);
    px_config_cleanup(&cfg);
    unsetenv("DUET_UPSTREAM_API_KEY");

    /* --help comes from the table: every flag, its default and its variable. */
    const char *help[] = {"--help", NULL};
    CHECK(parse(&cfg, help, out, sizeof out) == 1);
    CHECK(strstr(out, "usage: duet-proxy --prefill HOST:PORT...") != NULL);
    CHECK(strstr(out, "--prefill-timeout S") && strstr(out, "(default 600)"));
    CHECK(strstr(out, "--prefiller-hosts HOST...") && strstr(out, "--max-retries N"));
    CHECK(strstr(out, "--retry-delay, --retry-backoff S") != NULL);
    CHECK(strstr(out, "DUET_API_KEY]") != NULL);
    CHECK(strstr(out, "--early-decode {on,off}") && strstr(out, "(default on)"));
    px_config_cleanup(&cfg);
    const char *version[] = {"--version", NULL}; /* needs no endpoints */
    CHECK(parse(&cfg, version, out, sizeof out) == 0 && cfg.version);
    px_config_cleanup(&cfg);

    /* JSON settings, through the same table: keys with underscores, lists, numbers. */
    char err[256];
    px_config_init(&cfg);
    const char *json = "{\"prefill\":[\"a:1\",\"b:2\"],\"decode\":\"c:3\",\"api_key\":\"s\","
                       "\"health_interval\":0.5,\"eject_after\":4,\"port\":0,"
                       "\"decoder_hosts\":[\"d\"],\"decoder_ports\":[4],\"max_retries\":1}";
    CHECK(px_config_parse_json(&cfg, json, strlen(json), err, sizeof err) == DUET_OK);
    CHECK(cfg.n_prefill == 2 && cfg.n_decode == 2 && cfg.port == 0);
    CHECK(!strcmp(cfg.decode[1].host, "d") && cfg.decode[1].port == 4);
    CHECK(cfg.health_interval_ms == 500 && cfg.eject_after == 4);
    CHECK(cfg.prefill_retries == 1 && cfg.decode_retries == 1);
    CHECK(cfg.api_key && !strcmp(cfg.api_key, "s"));
    CHECK(cfg.connect_timeout_ms == 5000); /* untouched */
    px_config_cleanup(&cfg);
    px_config_init(&cfg);
    const char *empty = "{\"prefill\":[],\"decode\":[\"a:1\"]}"; /* an empty list is one */
    CHECK(px_config_parse_json(&cfg, empty, strlen(empty), err, sizeof err) == DUET_OK);
    CHECK(cfg.n_prefill == 0 && cfg.n_decode == 1);
    px_config_cleanup(&cfg);
    const char *bad_json[] = {"[]",
                              "{\"nope\":1}",
                              "{\"prefill\":[1]}",
                              "{\"port\":true}",
                              "{\"decode\":\"x\"}",
                              "{",
                              "{\"eject_after\":0}",
                              "{\"port\":{}}",
                              "{\"prefill\":[[\"a:1\"]]}",
                              "{\"config\":\"other.json\"}",
                              "{\"port\":[]}"};
    for (size_t i = 0; i < sizeof bad_json / sizeof bad_json[0]; i++) {
        px_config_init(&cfg);
        err[0] = '\0';
        CHECK_MSG(px_config_parse_json(&cfg, bad_json[i], strlen(bad_json[i]), err, sizeof err) ==
                      DUET_ERR_INVALID,
                  "%s accepted", bad_json[i]);
        CHECK_MSG(!strncmp(err, "config: ", 8) || !strncmp(err, "--", 2), "%s: '%s'", bad_json[i],
                  err);
        px_config_cleanup(&cfg);
    }

    /* The file goes under the flags wherever --config stands; lists get both's entries. */
    char path[] = "/tmp/duet-px-units-XXXXXX";
    int fd = mkstemp(path);
    const char *file = "{\"prefill\":[\"f:1\"],\"decode\":\"f:2\",\"connect_timeout\":3,"
                       "\"idle_timeout\":9,\"policy\":\"round-robin\"}";
    CHECK(fd >= 0 && write(fd, file, strlen(file)) == (ssize_t)strlen(file));
    close(fd);
    const char *a5[] = {"--connect-timeout", "4", "--config", path, "--prefill", "g:1", NULL};
    CHECK(parse(&cfg, a5, out, sizeof out) == 0);
    CHECK(cfg.connect_timeout_ms == 4000 && cfg.idle_timeout_ms == 9000);
    CHECK(cfg.policy == PX_POLICY_ROUND_ROBIN && cfg.n_decode == 1);
    CHECK(cfg.n_prefill == 2 && !strcmp(cfg.prefill[0].host, "f") &&
          !strcmp(cfg.prefill[1].host, "g"));
    px_config_cleanup(&cfg);
    fd = open(path, O_WRONLY | O_TRUNC);
    const char *broken = "{\"prefill\":[\"f:1\"],\"decode\":\"f:2\",\"idle_timeout\":\"soon\"}";
    CHECK(fd >= 0 && write(fd, broken, strlen(broken)) == (ssize_t)strlen(broken));
    close(fd);
    const char *a6[] = {"--config", path, NULL};
    CHECK(parse(&cfg, a6, out, sizeof out) == 2);
    CHECK_MSG(strstr(out, path) && strstr(out, "idle_timeout: expected seconds") &&
                  count_lines(out) == 1,
              "%s", out);
    px_config_cleanup(&cfg);
    unlink(path);
}

static const cJSON *get(const cJSON *o, const char *k) {
    return cJSON_GetObjectItemCaseSensitive(o, k);
}

static void test_bodies(void) {
    char err[128];
    px_gen g;
    const char *req =
        "{\"model\":\"m\",\"prompt\":\"0123456789abcdef\",\"max_tokens\":50,"
        "\"min_tokens\":5,\"stream\":true,\"stream_options\":{\"include_usage\":true},"
        "\"kv_transfer_params\":{\"junk\":1},\"temperature\":0.5}";
    CHECK(px_gen_parse(req, strlen(req), &g, err, sizeof err) == DUET_OK);
    CHECK(g.stream);
    CHECK_EQ_INT(g.prompt_tokens, 4);
    CHECK_EQ_INT(g.max_tokens, 50);
    CHECK_EQ_INT(px_gen_prefill_load(&g), 4);
    CHECK_EQ_INT(px_gen_decode_load(&g), 54);

    size_t len = 0;
    char *pb = px_gen_prefill_body(&g, &len);
    cJSON *p = cJSON_Parse(pb);
    CHECK(cJSON_IsFalse(get(p, "stream")));
    CHECK(get(p, "stream_options") == NULL);
    CHECK(get(p, "min_tokens") == NULL);
    CHECK(get(p, "max_completion_tokens") == NULL); /* only set when the client had it */
    CHECK(cJSON_IsNumber(get(p, "max_tokens")) && get(p, "max_tokens")->valueint == 1);
    const cJSON *kv = get(p, "kv_transfer_params");
    CHECK(cJSON_IsTrue(get(kv, "do_remote_decode")) && cJSON_GetArraySize(kv) == 1);
    CHECK(cJSON_IsNumber(get(p, "temperature"))); /* the rest untouched */
    CHECK(strlen(pb) == len);
    cJSON_Delete(p);
    cJSON_free(pb);

    /* The prefill's params into the original body. */
    const char *answer = "{\"choices\":[],\"kv_transfer_params\":{\"do_remote_prefill\":true,"
                         "\"remote_block_ids\":[1,2],\"remote_request_id\":\"r\"}}";
    cJSON *kvp = NULL;
    CHECK(px_prefill_kv_params(answer, strlen(answer), &kvp) == DUET_OK && kvp);
    char *db = px_gen_decode_body(&g, kvp, &len);
    cJSON *d = cJSON_Parse(db);
    CHECK(cJSON_IsTrue(get(d, "stream")));
    CHECK(get(d, "min_tokens")->valueint == 5);
    CHECK(get(d, "max_tokens")->valueint == 50);
    CHECK(get(d, "stream_options") != NULL);
    kv = get(d, "kv_transfer_params");
    CHECK(cJSON_IsTrue(get(kv, "do_remote_prefill")) && get(kv, "junk") == NULL);
    cJSON_Delete(d);
    cJSON_free(db);
    cJSON_Delete(kvp);
    /* An answer without params: the decode leg goes without them. */
    CHECK(px_prefill_kv_params("{\"choices\":[]}", 14, &kvp) == DUET_OK && kvp == NULL);
    db = px_gen_decode_body(&g, NULL, &len);
    d = cJSON_Parse(db);
    CHECK(get(d, "kv_transfer_params") == NULL);
    cJSON_Delete(d);
    cJSON_free(db);
    CHECK(px_prefill_kv_params("<html>", 6, &kvp) == DUET_ERR_FORMAT && kvp == NULL);
    CHECK(px_prefill_kv_params("{\"kv_transfer_params\":3}", 24, &kvp) == DUET_OK && !kvp);
    px_gen_cleanup(&g);

    /* Chat: max_completion_tokens follows to the prefill as 1; messages weigh by content. */
    req = "{\"messages\":[{\"role\":\"user\",\"content\":\"12345678\"},"
          "{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"abcd\"}]}],"
          "\"max_completion_tokens\":7}";
    CHECK(px_gen_parse(req, strlen(req), &g, err, sizeof err) == DUET_OK);
    CHECK(!g.stream);
    CHECK_EQ_INT(g.prompt_tokens, 2 + 4 + 1 + 4);
    CHECK_EQ_INT(g.max_tokens, 7);
    pb = px_gen_prefill_body(&g, &len);
    p = cJSON_Parse(pb);
    CHECK(get(p, "max_completion_tokens")->valueint == 1 && get(p, "max_tokens")->valueint == 1);
    cJSON_Delete(p);
    cJSON_free(pb);
    px_gen_cleanup(&g);

    /* Token ids count one each; defaults when max_tokens is absent. */
    req = "{\"prompt\":[[1,2,3],[4,5]]}";
    CHECK(px_gen_parse(req, strlen(req), &g, err, sizeof err) == DUET_OK);
    CHECK_EQ_INT(g.prompt_tokens, 5);
    CHECK_EQ_INT(g.max_tokens, 16);
    px_gen_cleanup(&g);

    const char *bad[] = {"", "nope", "[1]", "\"s\"", "{\"stream\":1}", "{\"stream\":\"true\"}"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = '\0';
        CHECK_MSG(px_gen_parse(bad[i], strlen(bad[i]), &g, err, sizeof err) == DUET_ERR_INVALID,
                  "%s accepted", bad[i]);
        CHECK(err[0] != '\0');
        CHECK(g.root == NULL);
    }
}

/* Early decode: the streamed prefill body, and the events of a prefill stream. */
static void test_prefill_stream(void) {
    char err[128];
    px_gen g;
    const char *req = "{\"prompt\":\"abcd\",\"max_tokens\":9,\"min_tokens\":2,\"stream\":false,"
                      "\"stream_options\":{\"include_usage\":true},\"n\":3}";
    CHECK(px_gen_parse(req, strlen(req), &g, err, sizeof err) == DUET_OK);
    size_t len = 0;
    char *pb = px_gen_prefill_body_streamed(&g, &len);
    cJSON *p = cJSON_Parse(pb);
    CHECK(cJSON_IsTrue(get(p, "stream"))); /* streamed whatever the client asked */
    CHECK(get(p, "stream_options") == NULL && get(p, "min_tokens") == NULL);
    CHECK(get(p, "max_tokens")->valueint == 1 && get(p, "n")->valueint == 1);
    CHECK(cJSON_IsTrue(get(get(p, "kv_transfer_params"), "do_remote_decode")));
    CHECK(strlen(pb) == len);
    cJSON_Delete(p);
    cJSON_free(pb);
    pb = px_gen_prefill_body(&g, &len); /* the other one is unchanged */
    p = cJSON_Parse(pb);
    CHECK(cJSON_IsFalse(get(p, "stream")));
    cJSON_Delete(p);
    cJSON_free(pb);
    px_gen_cleanup(&g);

    /* Cutting events: \n\n or \r\n\r\n ends one; nothing until one is whole. */
    const char *sse = "data: {\"a\":1}\n\ndata: x\r\n\r\n: comment\ndata: [DONE]\n\ndata: part";
    size_t n = strlen(sse), ev = 0, at = 0, used;
    used = px_sse_next(sse, n, &ev);
    CHECK_EQ_INT(used, 15);
    CHECK_EQ_INT(ev, 14); /* its last line's newline included */
    at += used;
    used = px_sse_next(sse + at, n - at, &ev);
    CHECK(used == 11 && ev == 9 && !memcmp(sse + at, "data: x\r\n", ev));
    at += used;
    used = px_sse_next(sse + at, n - at, &ev);
    CHECK(used == 24 && px_sse_prefill_event(sse + at, ev, NULL) == PX_SSE_DONE);
    at += used;
    CHECK_EQ_INT(px_sse_next(sse + at, n - at, &ev), 0);
    CHECK_EQ_INT(px_sse_next("data: {}\n", 9, &ev), 0);
    CHECK_EQ_INT(px_sse_next("", 0, &ev), 0);
    /* Whether new bytes may have made an event whole (the old ones held none). */
    CHECK(!px_sse_may_be_whole("", 0, 0));
    CHECK(!px_sse_may_be_whole("data: {}", 8, 0));
    CHECK(px_sse_may_be_whole("\n", 1, 0) && px_sse_may_be_whole("\r\n", 2, 1));
    CHECK(px_sse_may_be_whole("data: {}\n\n", 10, 9));
    CHECK(px_sse_may_be_whole("data: {}\n\r\n", 11, 9));
    CHECK(px_sse_may_be_whole("data: {}\n\r\n", 11, 10));
    CHECK(!px_sse_may_be_whole("data: {}\ndata: {", 16, 9));
    CHECK(!px_sse_may_be_whole("data: {}\n\r", 10, 9));
    /* only the new bytes (and two before) are looked at: old ones held no event */
    CHECK(!px_sse_may_be_whole("\n\n  data", 8, 6));

    /* What an event is. */
    const char *early = "data: {\"id\":\"cmpl-1\",\"object\":\"text_completion\",\"choices\":[],"
                        "\"kv_transfer_params\":{\"do_remote_prefill\":true,"
                        "\"remote_block_ids\":[4,5],\"remote_request_id\":\"r\"}}";
    cJSON *kv = NULL;
    CHECK(px_sse_prefill_event(early, strlen(early), &kv) == PX_SSE_KV);
    CHECK(cJSON_IsObject(kv) && cJSON_GetArraySize(get(kv, "remote_block_ids")) == 2);
    cJSON_Delete(kv);
    CHECK(px_sse_prefill_event(early, strlen(early), NULL) == PX_SSE_KV);
    /* data split over two lines is joined with a newline (valid JSON whitespace here) */
    const char *two = "data: {\"kv_transfer_params\":\ndata: {\"remote_block_ids\":[1]}}\r";
    CHECK(px_sse_prefill_event(two, strlen(two), &kv) == PX_SSE_KV && kv);
    cJSON_Delete(kv);
    const char *cases[][2] = {
        {"data: {\"choices\":[{\"text\":\"a\"}]}", "other"},
        {"data:{\"kv_transfer_params\":null}", "other"},
        {"data: {\"kv_transfer_params\":[1]}", "other"},
        {": keep-alive", "other"},
        {"event: x", "other"},
        {"data: not json", "other"},
        {"", "other"},
        {"data: [DONE]", "done"},
        {"data:[DONE]\r", "done"},
        {"data: {\"error\":{\"message\":\"m\",\"code\":500}}", "error"},
        {"data: {\"error\":{},\"kv_transfer_params\":{}}", "error"},
        {"data: 42", "error"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        kv = (cJSON *)1;
        px_sse_kind k = px_sse_prefill_event(cases[i][0], strlen(cases[i][0]), &kv);
        const char *name = k == PX_SSE_OTHER   ? "other"
                           : k == PX_SSE_DONE  ? "done"
                           : k == PX_SSE_ERROR ? "error"
                                               : "kv";
        CHECK_MSG(!strcmp(name, cases[i][1]), "'%s': %s, wanted %s", cases[i][0], name,
                  cases[i][1]);
        CHECK(kv == NULL);
    }
}

/* Balancer mode's flag: plain backends alone, never with the prefill/decode lists. */
static void test_balancer_config(void) {
    px_config cfg;
    char out[4096];
    const char *ok[] = {"--backend", "h:1", "h:2", NULL};
    px_config_init(&cfg);
    CHECK(parse(&cfg, ok, out, sizeof out) == 0);
    CHECK(cfg.n_backend == 2 && cfg.backend[1].port == 2 && cfg.n_prefill == 0 &&
          cfg.n_decode == 0);
    px_config_cleanup(&cfg);
    const char *mixed[] = {"--backend", "h:1", "--prefill", "h:2", "--decode", "h:3", NULL};
    px_config_init(&cfg);
    CHECK(parse(&cfg, mixed, out, sizeof out) == 2);
    CHECK(strstr(out, "exclude each other") && count_lines(out) == 1);
    px_config_cleanup(&cfg);
    const char *none[] = {"--port", "1", NULL};
    px_config_init(&cfg);
    CHECK(parse(&cfg, none, out, sizeof out) == 2 && strstr(out, "--backend HOST:PORT"));
    px_config_cleanup(&cfg);
}

/* A list of prompts split into parts, and their answers merged back (vLLM's shape). */
static void test_split_merge(void) {
    char err[128];
    px_gen g, part;
    const char *req = "{\"prompt\":[\"ab\",[7,8,9]],\"n\":2,\"best_of\":2,\"stream\":true,"
                      "\"stream_options\":{\"include_usage\":true},\"max_tokens\":5}";
    CHECK(px_gen_parse(req, strlen(req), &g, err, sizeof err) == DUET_OK);
    CHECK_EQ_INT(px_gen_prompt_count(&g), 2);
    CHECK_EQ_INT(px_gen_n(&g), 2);
    CHECK(px_gen_include_usage(&g));
    CHECK(px_gen_part(&g, 1, &part) == DUET_OK);
    CHECK_EQ_INT(cJSON_GetArraySize(get(part.root, "prompt")), 3);
    CHECK_EQ_INT(part.prompt_tokens, 3);
    CHECK(part.stream && part.max_tokens == 5);
    size_t len;
    char *pb = px_gen_prefill_body(&part, &len);
    cJSON *p = cJSON_Parse(pb);
    CHECK(get(p, "n")->valueint == 1 && get(p, "best_of") == NULL); /* decode makes the n */
    cJSON_Delete(p);
    cJSON_free(pb);
    px_gen_cleanup(&part);
    CHECK(px_gen_part(&g, 2, &part) == DUET_ERR_INVALID && part.root == NULL);
    px_gen_cleanup(&g);
    /* one prompt: a list of token ids, or a list of one */
    const char *one[] = {"{\"prompt\":[1,2,3]}", "{\"prompt\":\"x\"}", "{\"messages\":[]}"};
    for (size_t i = 0; i < 3; i++) {
        CHECK(px_gen_parse(one[i], strlen(one[i]), &g, err, sizeof err) == DUET_OK);
        CHECK_EQ_INT(px_gen_prompt_count(&g), 1);
        CHECK_EQ_INT(px_gen_n(&g), 1);
        px_gen_cleanup(&g);
    }

    /* streamed chunks: indexes moved, id set, usage summed and kept back, errors seen */
    cJSON *usage = cJSON_CreateObject();
    cJSON *c = cJSON_Parse("{\"id\":\"cmpl-x-1\",\"choices\":[{\"index\":1,\"text\":\"a\"}]}");
    CHECK(px_merge_chunk(c, 4, "cmpl-x", usage) == PX_CHUNK_DATA);
    CHECK(get(cJSON_GetArrayItem(get(c, "choices"), 0), "index")->valueint == 5);
    CHECK(!strcmp(get(c, "id")->valuestring, "cmpl-x"));
    cJSON_Delete(c);
    for (int k = 0; k < 2; k++) {
        c = cJSON_Parse("{\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":"
                        "4,\"total_tokens\":7}}");
        CHECK(px_merge_chunk(c, 0, NULL, usage) == PX_CHUNK_USAGE);
        cJSON_Delete(c);
    }
    CHECK(get(usage, "prompt_tokens")->valueint == 6 && get(usage, "total_tokens")->valueint == 14);
    cJSON_Delete(usage);
    c = cJSON_Parse("{\"error\":{\"message\":\"m\",\"code\":500}}");
    CHECK(px_merge_chunk(c, 0, NULL, NULL) == PX_CHUNK_ERROR);
    cJSON_Delete(c);

    /* whole answers: prompt-major choices, usage summed, kv_transfer_params null */
    cJSON *a[2] = {
        cJSON_Parse("{\"id\":\"cmpl-p0\",\"choices\":[{\"index\":0,\"text\":\"a\"},"
                    "{\"index\":1,\"text\":\"b\"}],\"usage\":{\"prompt_tokens\":2,"
                    "\"completion_tokens\":2,\"total_tokens\":4},\"kv_transfer_params\":{}}"),
        cJSON_Parse("{\"id\":\"cmpl-p1\",\"choices\":[{\"index\":0,\"text\":\"c\"},"
                    "{\"index\":1,\"text\":\"d\"}],\"usage\":{\"prompt_tokens\":3,"
                    "\"completion_tokens\":2,\"total_tokens\":5}}")};
    cJSON *m = px_merge_answers(a, 2, 2, "cmpl-all");
    const cJSON *ch = get(m, "choices");
    CHECK_EQ_INT(cJSON_GetArraySize(ch), 4);
    for (int i = 0; i < 4; i++) {
        const cJSON *x = cJSON_GetArrayItem(ch, i);
        CHECK(get(x, "index")->valueint == i && get(x, "text")->valuestring[0] == "abcd"[i]);
    }
    CHECK(get(get(m, "usage"), "prompt_tokens")->valueint == 5);
    CHECK(get(get(m, "usage"), "completion_tokens")->valueint == 4);
    CHECK(cJSON_IsNull(get(m, "kv_transfer_params")));
    CHECK(!strcmp(get(m, "id")->valuestring, "cmpl-all"));
    cJSON_Delete(m);
    cJSON_Delete(a[0]);
    cJSON_Delete(a[1]);
}

int main(void) {
    test_policies();
    test_config();
    test_split_merge();
    test_balancer_config();
    test_bodies();
    test_prefill_stream();
    CHECK_DONE();
}
