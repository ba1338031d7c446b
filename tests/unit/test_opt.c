/* The option table (base/opt.h): the spellings argparse accepts, values by type and range,
 * environment and defaults, lists, ignored flags, errors with suggestions, generated help. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/opt.h"
#include "check.h"

typedef struct cfg {
    int tp, port;
    long long mem;
    double util;
    const char *model, *key;
    bool ep, prefix;
    int dtype;
    opt_list hosts;
} cfg;

static duet_status parse_even(const opt_spec *s, const char *v, char *err, size_t len) {
    int x = atoi(v);
    if (x % 2) {
        snprintf(err, len, "must be even");
        return DUET_ERR_INVALID;
    }
    *(int *)s->dest = x;
    return DUET_OK;
}

static opt_parser *make(cfg *c, int *even) {
    memset(c, 0, sizeof *c);
    opt_parser *p;
    CHECK(opt_parser_create("prog", "[options] [MODEL]", "A test program.", &p) == DUET_OK);
    const opt_spec specs[] = {
        {.name = "--tensor-parallel-size",
         .alias = "-tp",
         .type = OPT_INT,
         .dest = &c->tp,
         .def = "1",
         .min = 1,
         .max = 64,
         .help = "TP ranks"},
        {.name = "--port",
         .type = OPT_INT,
         .dest = &c->port,
         .def = "8000",
         .min = 0,
         .max = 65535},
        {.name = "--kv-cache-memory", .type = OPT_SIZE, .dest = &c->mem, .def = "1G"},
        {.name = "--gpu-memory-utilization",
         .type = OPT_DOUBLE,
         .dest = &c->util,
         .def = "0.9",
         .min = 0.01,
         .max = 1},
        {.name = "--model", .type = OPT_STRING, .dest = &c->model, .env = "TEST_OPT_MODEL"},
        {.name = "--api-key", .type = OPT_STRING, .dest = &c->key, .env = "TEST_OPT_KEY"},
        {.name = "--enable-expert-parallel", .alias = "-ep", .type = OPT_FLAG, .dest = &c->ep},
        {.name = "--enable-prefix-caching",
         .type = OPT_FLAG,
         .dest = &c->prefix,
         .def = "true",
         .flags = OPT_NEGATABLE},
        {.name = "--dtype",
         .type = OPT_CHOICE,
         .dest = &c->dtype,
         .def = "auto",
         .choices = "auto|bfloat16|float32|bf16=bfloat16|float=float32"},
        {.name = "--hosts", .type = OPT_LIST, .dest = &c->hosts},
        {.name = "--trust-remote-code",
         .type = OPT_FLAG,
         .flags = OPT_IGNORED,
         .help = "duet runs no model code"},
        {.name = "--quantization", .type = OPT_STRING, .flags = OPT_IGNORED},
        {.name = "--even", .type = OPT_CUSTOM, .dest = even, .parse = parse_even},
        {.name = "--random-input-len", .type = OPT_INT, .dest = even},
        {.name = "--random-output-len", .type = OPT_INT, .dest = even},
    };
    CHECK(opt_add(p, "Test", specs, (int)(sizeof specs / sizeof specs[0])) == DUET_OK);
    opt_allow_positional(p, 1, "MODEL");
    return p;
}

static int run(cfg *c, int *even, opt_parser **p_p, int argc, const char **args) {
    char *argv[32];
    argv[0] = (char *)"prog";
    for (int i = 0; i < argc; i++) argv[i + 1] = (char *)args[i];
    opt_parser *p = make(c, even);
    int rc = opt_parse(p, argc + 1, argv);
    if (p_p)
        *p_p = p;
    else
        opt_parser_destroy(p);
    return rc;
}

#define RUN(...)                                                                                   \
    run(&c, &even, &p, (int)(sizeof((const char *[]){__VA_ARGS__}) / sizeof(const char *)),        \
        (const char *[]){__VA_ARGS__})

/* Runs a failing parse with stderr captured; returns the message. */
static void run_err(const char **args, int argc, char *out, size_t cap) {
    cfg c;
    int even;
    fflush(stderr);
    int saved = dup(2);
    FILE *tmp = tmpfile();
    dup2(fileno(tmp), 2);
    int rc = run(&c, &even, NULL, argc, args);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    CHECK_MSG(rc == 2, "rc %d for %s", rc, args[0]);
    rewind(tmp);
    size_t n = fread(out, 1, cap - 1, tmp);
    out[n] = '\0';
    fclose(tmp);
}

#define ERR_HAS(msg, ...)                                                                          \
    do {                                                                                           \
        const char *a_[] = {__VA_ARGS__};                                                          \
        char m_[1024];                                                                             \
        run_err(a_, (int)(sizeof a_ / sizeof a_[0]), m_, sizeof m_);                               \
        CHECK_MSG(strstr(m_, msg) != NULL, "wanted '%s' in '%s'", msg, m_);                        \
    } while (0)

int main(void) {
    cfg c;
    int even = 0;
    opt_parser *p;
    unsetenv("TEST_OPT_MODEL");
    unsetenv("TEST_OPT_KEY");

    /* defaults */
    CHECK(RUN("--port", "9000") == 0);
    CHECK(c.tp == 1 && c.port == 9000 && c.mem == 1073741824LL && c.util == 0.9);
    CHECK(c.prefix && !c.ep && c.dtype == 0 && c.model == NULL && c.hosts.n == 0);
    CHECK(opt_given(p, "--port") && !opt_given(p, "--tensor-parallel-size"));
    opt_parser_destroy(p);

    /* every spelling */
    CHECK(RUN("-tp", "4", "--port=1", "--kv_cache_memory", "512MiB", "--gpu-memory-util=0.5", "-ep",
              "--no-enable-prefix-caching", "--dtype", "bf16", "/models/R1") == 0);
    CHECK(c.tp == 4 && c.port == 1 && c.mem == 512LL * 1048576 && c.util == 0.5);
    CHECK(c.ep && !c.prefix && c.dtype == 1);
    CHECK(opt_positional_count(p) == 1 && !strcmp(opt_positional(p, 0), "/models/R1"));
    CHECK(opt_given(p, "-tp") && opt_given(p, "--tensor_parallel_size"));
    opt_parser_destroy(p);

    CHECK(RUN("--tensor-parallel-size=2", "--dtype=float", "--enable-expert-parallel=false") == 0);
    CHECK(c.tp == 2 && c.dtype == 2 && !c.ep);
    opt_parser_destroy(p);

    /* lists: nargs=+, repeated, stops at the next option; negative numbers are values */
    CHECK(RUN("--hosts", "a:1", "b:2", "--port", "5", "--hosts", "c:3") == 0);
    CHECK(c.hosts.n == 3 && !strcmp(c.hosts.v[2], "c:3") && c.port == 5);
    opt_parser_destroy(p);

    /* ignored flags take their value (if typed with one) and store nothing */
    CHECK(RUN("--trust-remote-code", "--quantization", "ascend", "--port", "7") == 0);
    CHECK(c.port == 7 && opt_positional_count(p) == 0);
    opt_parser_destroy(p);

    /* custom */
    CHECK(RUN("--even", "4") == 0 && even == 4);
    opt_parser_destroy(p);

    /* environment, and the command line over it */
    setenv("TEST_OPT_MODEL", "/env/model", 1);
    CHECK(RUN("--port", "1") == 0 && c.model && !strcmp(c.model, "/env/model"));
    CHECK(!opt_given(p, "--model"));
    opt_parser_destroy(p);
    CHECK(RUN("--model", "/cli") == 0 && !strcmp(c.model, "/cli"));
    opt_parser_destroy(p);
    unsetenv("TEST_OPT_MODEL");

    /* opt_set (configuration files) */
    CHECK(RUN("--port", "1") == 0);
    char err[256];
    const char *v[] = {"x:1", "y:2"};
    CHECK(opt_set(p, "hosts", v, 2, err, sizeof err) == DUET_OK && c.hosts.n == 2);
    const char *bad[] = {"abc"};
    CHECK(opt_set(p, "port", bad, 1, err, sizeof err) == DUET_ERR_INVALID);
    CHECK(strstr(err, "port") && strstr(err, "abc"));
    CHECK(opt_set(p, "nope", bad, 1, err, sizeof err) == DUET_ERR_NOT_FOUND);
    CHECK(opt_set(p, "hosts", NULL, 0, err, sizeof err) == DUET_OK && c.hosts.n == 0);
    CHECK(opt_set(p, "port", NULL, 0, err, sizeof err) == DUET_ERR_INVALID);
    const char *one[] = {"64k"};
    CHECK(opt_set(p, "kv_cache_memory", one, 1, err, sizeof err) == DUET_OK && c.mem == 65536);
    opt_parser_destroy(p);

    /* errors: one line each, naming the option */
    ERR_HAS("unknown option --tensor-paralel-size (did you mean --tensor-parallel-size?)",
            "--tensor-paralel-size", "2");
    ERR_HAS("unknown option --frobnicate (see prog --help)", "--frobnicate");
    ERR_HAS("--tensor-parallel-size: expected an integer in [1, 64], got '0'", "-tp", "0");
    ERR_HAS("--port: expected an integer in [0, 65535], got 'x'", "--port", "x");
    ERR_HAS("--port needs a value", "--port");
    ERR_HAS("--port needs a value", "--port", "--model", "m");
    ERR_HAS("--dtype: expected one of auto, bfloat16, float32, got 'f16'", "--dtype", "f16");
    ERR_HAS("--kv-cache-memory: expected a size", "--kv-cache-memory", "lots");
    ERR_HAS("--even: must be even", "--even", "3");
    ERR_HAS("ambiguous option --random could match --random-input-len, --random-output-len",
            "--random", "3");
    ERR_HAS("unexpected argument 'b'", "a", "b");
    ERR_HAS("--enable-expert-parallel: expected true or false", "-ep=maybe");
    setenv("TEST_OPT_KEY", "", 1); /* empty: as if unset */
    CHECK(RUN() == 0 && c.key == NULL);
    opt_parser_destroy(p);
    unsetenv("TEST_OPT_KEY");

    /* prefixes, like argparse: unique ones resolve */
    CHECK(RUN("--random-in", "3", "--gpu-mem", "0.2") == 0 && even == 3 && c.util == 0.2);
    opt_parser_destroy(p);

    /* --help from the table */
    {
        fflush(stdout);
        int saved = dup(1);
        FILE *tmp = tmpfile();
        dup2(fileno(tmp), 1);
        int rc = RUN("--help");
        fflush(stdout);
        dup2(saved, 1);
        close(saved);
        CHECK(rc == 1);
        char buf[8192];
        rewind(tmp);
        size_t n = fread(buf, 1, sizeof buf - 1, tmp);
        buf[n] = '\0';
        fclose(tmp);
        CHECK(strstr(buf, "usage: prog [options] [MODEL]") != NULL);
        CHECK(strstr(buf, "-tp, --tensor-parallel-size N") != NULL);
        CHECK(strstr(buf, "TP ranks (default 1)") != NULL);
        CHECK(strstr(buf, "--[no-]enable-prefix-caching") != NULL);
        CHECK(strstr(buf, "--dtype {auto,bfloat16,float32}") != NULL);
        CHECK(strstr(buf, "[env TEST_OPT_MODEL]") != NULL);
        CHECK(strstr(buf, "[accepted, ignored]") != NULL);
        opt_parser_destroy(p);
    }
    CHECK_DONE();
}
