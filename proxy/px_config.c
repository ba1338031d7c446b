/* duet-proxy's settings as one option table (base/opt.h). The command line goes through
 * opt_parse and a --config JSON file through opt_set on the same table, so the two ways in cannot
 * drift apart; what the table cannot say (endpoint lists, the file under the flags) is here. */
#include "px_config.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/opt.h"

/* What the table writes besides px_config's own fields, for cli_finish to apply once every way
 * in has been read: the endpoint lists as given, --max-retries, and the file's name. */
typedef struct px_cli {
    px_config *cfg;
    opt_list prefill, decode, backend;
    opt_list prefiller_hosts, prefiller_ports, decoder_hosts, decoder_ports;
    unsigned max_retries;
    const char *config;
} px_cli;

static duet_status fail(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static duet_status fail(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return DUET_ERR_INVALID;
}

/* ---------------------------------------------------------------------------------------------
 * Value types the table needs beyond opt's own: they write px_config's field types. */

static duet_status parse_host(const opt_spec *s, const char *v, char *err, size_t len) {
    if (!*v || strlen(v) >= PX_HOST_MAX) return fail(err, len, "expected a host name or address");
    snprintf(s->dest, PX_HOST_MAX, "%s", v);
    return DUET_OK;
}

/* Seconds, fractions allowed, kept as unsigned milliseconds; the spec's min/max in seconds. */
static duet_status parse_seconds(const opt_spec *s, const char *v, char *err, size_t len) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (!*v || *end || errno || !isfinite(x) || x < s->min || x > s->max)
        return fail(err, len, "expected seconds in [%g, %.0f] (e.g. 2.5), got '%s'", s->min, s->max,
                    v);
    *(unsigned *)s->dest = (unsigned)llround(x * 1000.0);
    return DUET_OK;
}

/* An unsigned count in [min, max]. */
static duet_status parse_count(const opt_spec *s, const char *v, char *err, size_t len) {
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (!*v || *end || errno || x < s->min || x > s->max)
        return fail(err, len, "expected an integer in [%.0f, %.0f], got '%s'", s->min, s->max, v);
    *(unsigned *)s->dest = (unsigned)x;
    return DUET_OK;
}

static duet_status parse_bytes(const opt_spec *s, const char *v, char *err, size_t len) {
    long long x;
    if (opt_parse_size(v, &x) != DUET_OK || x < 1 || (unsigned long long)x > SIZE_MAX / 4)
        return fail(err, len, "expected a positive byte count (64k, 32M allowed), got '%s'", v);
    *(size_t *)s->dest = (size_t)x;
    return DUET_OK;
}

/* on/off; true/false too, as a JSON file's booleans arrive. */
static duet_status parse_on_off(const opt_spec *s, const char *v, char *err, size_t len) {
    bool on = !strcmp(v, "on") || !strcmp(v, "true");
    if (!on && strcmp(v, "off") && strcmp(v, "false"))
        return fail(err, len, "expected on or off, got '%s'", v);
    *(bool *)s->dest = on;
    return DUET_OK;
}

static duet_status parse_policy(const opt_spec *s, const char *v, char *err, size_t len) {
    if (px_policy_parse(v, s->dest) != DUET_OK)
        return fail(err, len, "expected least-load, round-robin or power-of-two, got '%s'", v);
    return DUET_OK;
}

/* Keys are copied: a value from the file does not outlive its parse. */
static duet_status store_copy(const opt_spec *s, const char *v, char *err, size_t len) {
    char *copy = strdup(v);
    if (!copy) return fail(err, len, "out of memory");
    free(*(char **)s->dest);
    *(char **)s->dest = copy;
    return DUET_OK;
}

static duet_status parse_client_key(const opt_spec *s, const char *v, char *err, size_t len) {
    if (!*v) return fail(err, len, "empty key");
    return store_copy(s, v, err, len);
}

/* It goes into a header line as it is. */
static duet_status parse_upstream_key(const opt_spec *s, const char *v, char *err, size_t len) {
    for (const char *k = v; *k; k++)
        if ((unsigned char)*k < 0x20 || *k == 0x7f)
            return fail(err, len, "control characters in the key");
    return store_copy(s, v, err, len);
}

/* ---------------------------------------------------------------------------------------------
 * The table */

/* An entry without a name starts a group; its help is the group's title in --help. */
#define GROUP(title)                                                                               \
    { .name = NULL, .help = title }
#define SECONDS(flag, field, def_, help_)                                                          \
    {                                                                                              \
        .name = flag, .type = OPT_CUSTOM, .parse = parse_seconds, .dest = &c->field, .def = def_,  \
        .min = 0, .max = UINT_MAX / 1000, .metavar = "S", .help = help_                            \
    }
#define COUNT(flag, field, def_, min_, help_)                                                      \
    {                                                                                              \
        .name = flag, .type = OPT_CUSTOM, .parse = parse_count, .dest = &c->field, .def = def_,    \
        .min = min_, .max = 1e9, .metavar = "N", .help = help_                                     \
    }

enum { TABLE_MAX = 48 };

static int cli_table(px_cli *cli, opt_spec out[TABLE_MAX]) {
    px_config *c = cli->cfg;
    const opt_spec t[] = {
        GROUP("Listening and backends"),
        {.name = "--host",
         .type = OPT_CUSTOM,
         .parse = parse_host,
         .dest = c->host,
         .def = "0.0.0.0",
         .metavar = "ADDR",
         .help = "address to listen on"},
        {.name = "--port",
         .type = OPT_INT,
         .dest = &c->port,
         .def = "8000",
         .min = 0,
         .max = 65535,
         .help = "port to listen on; 0 takes any free one"},
        {.name = "--prefill",
         .type = OPT_LIST,
         .dest = &cli->prefill,
         .metavar = "HOST:PORT...",
         .help = "prefill endpoints, up to the next flag ([ADDR]:PORT for IPv6)"},
        {.name = "--decode",
         .type = OPT_LIST,
         .dest = &cli->decode,
         .metavar = "HOST:PORT...",
         .help = "decode endpoints"},
        {.name = "--backend",
         .type = OPT_LIST,
         .dest = &cli->backend,
         .metavar = "HOST:PORT...",
         .help = "balancer mode: plain instances (every DP rank of one, or colocated ones) that "
                 "serve whole requests; instead of --prefill/--decode"},
        {.name = "--prefiller-hosts",
         .type = OPT_LIST,
         .dest = &cli->prefiller_hosts,
         .metavar = "HOST...",
         .help = "vllm-ascend's spelling of --prefill: the hosts, and their ports in the same "
                 "order in --prefiller-ports"},
        {.name = "--prefiller-ports",
         .type = OPT_LIST,
         .dest = &cli->prefiller_ports,
         .metavar = "PORT...",
         .help = "their ports"},
        {.name = "--decoder-hosts",
         .type = OPT_LIST,
         .dest = &cli->decoder_hosts,
         .metavar = "HOST...",
         .help = "the same for --decode"},
        {.name = "--decoder-ports",
         .type = OPT_LIST,
         .dest = &cli->decoder_ports,
         .metavar = "PORT...",
         .help = "their ports"},
        {.name = "--policy",
         .type = OPT_CUSTOM,
         .parse = parse_policy,
         .dest = &c->policy,
         .def = "least-load",
         .metavar = "{least-load,round-robin,power-of-two}",
         .help = "how a request's backend is picked"},
        {.name = "--early-decode",
         .type = OPT_CUSTOM,
         .parse = parse_on_off,
         .dest = &c->early_decode,
         .def = "on",
         .metavar = "{on,off}",
         .help = "stream the prefill leg and start the decode leg at its first event carrying "
                 "kv_transfer_params, while the prefill still computes; off: the decode leg "
                 "after the whole prefill answer"},
        {.name = "--api-key",
         .type = OPT_CUSTOM,
         .parse = parse_client_key,
         .dest = &c->api_key,
         .env = "DUET_API_KEY",
         .metavar = "KEY",
         .help = "key clients must send as Bearer on /v1/* and /instances/*"},
        {.name = "--upstream-api-key",
         .type = OPT_CUSTOM,
         .parse = parse_upstream_key,
         .dest = &c->upstream_api_key,
         .env = "DUET_UPSTREAM_API_KEY",
         .metavar = "KEY",
         .help = "key sent to the backends as Bearer"},
        {.name = "--config",
         .type = OPT_STRING,
         .dest = &cli->config,
         .metavar = "FILE",
         .help = "JSON settings, keys as the flags' names with underscores; flags override "
                 "them"},
        {.name = "--version", .type = OPT_FLAG, .dest = &c->version, .help = "print the version"},

        GROUP("Timeouts (seconds, fractions allowed)"),
        SECONDS("--connect-timeout", connect_timeout_ms, "5", "TCP connect to a backend"),
        SECONDS("--prefill-timeout", prefill_timeout_ms, "600",
                "prefill request sent to the first byte of its answer"),
        SECONDS("--decode-timeout", decode_timeout_ms, "600",
                "decode request sent to the first byte of its answer"),
        SECONDS("--idle-timeout", idle_timeout_ms, "120", "between two reads of a backend answer"),
        SECONDS("--client-header-timeout", client_header_timeout_ms, "10",
                "for a client's request headers"),
        SECONDS("--client-idle-timeout", client_idle_timeout_ms, "60",
                "an idle client keep-alive connection stays open"),
        SECONDS("--drain-timeout", drain_timeout_ms, "30", "SIGTERM waits for requests in flight"),

        GROUP("Health and retries"),
        {.name = "--health-interval",
         .type = OPT_CUSTOM,
         .parse = parse_seconds,
         .dest = &c->health_interval_ms,
         .def = "2",
         .min = 0.001,
         .max = UINT_MAX / 1000,
         .metavar = "S",
         .help = "seconds between health probes of each backend"},
        {.name = "--health-timeout",
         .type = OPT_CUSTOM,
         .parse = parse_seconds,
         .dest = &c->health_timeout_ms,
         .def = "2",
         .min = 0.001,
         .max = UINT_MAX / 1000,
         .metavar = "S",
         .help = "seconds per probe"},
        COUNT("--eject-after", eject_after, "3", 1,
              "consecutive failures (requests or probes) that eject a backend"),
        COUNT("--readmit-after", readmit_after, "2", 1,
              "consecutive good probes that admit it again"),
        COUNT("--prefill-retries", prefill_retries, "3", 0,
              "further prefill attempts on other backends"),
        COUNT("--decode-retries", decode_retries, "2", 0,
              "further decode attempts before any byte reached the client"),
        {.name = "--max-retries",
         .type = OPT_CUSTOM,
         .parse = parse_count,
         .dest = &cli->max_retries,
         .min = 0,
         .max = 1e9,
         .metavar = "N",
         .help = "both retry counts where not given themselves (vllm-ascend's flag)"},
        {.name = "--retry-backoff",
         .alias = "--retry-delay",
         .type = OPT_CUSTOM,
         .parse = parse_seconds,
         .dest = &c->retry_backoff_ms,
         .def = "0.02",
         .min = 0,
         .max = UINT_MAX / 1000,
         .metavar = "S",
         .help = "seconds before the first retry, doubling with jitter"},
        SECONDS("--retry-backoff-max", retry_backoff_max_ms, "1", "cap on the retry delay"),

        GROUP("Limits"),
        {.name = "--max-body-bytes",
         .type = OPT_CUSTOM,
         .parse = parse_bytes,
         .dest = &c->max_body_bytes,
         .def = "33554432",
         .metavar = "BYTES",
         .help = "larger request bodies are answered 413"},
        COUNT("--max-connections", max_connections, "4096", 0,
              "client connections served at once; more are answered 503"),
        COUNT("--max-connections-per-client", max_connections_per_client, "0", 0,
              "connections open at once from one client address; the one beyond is answered "
              "429 and closed (0: no limit)"),
    };
    _Static_assert(sizeof t / sizeof t[0] <= TABLE_MAX, "raise TABLE_MAX");
    memcpy(out, t, sizeof t);
    return (int)(sizeof t / sizeof t[0]);
}

#undef GROUP
#undef SECONDS
#undef COUNT

/* A parser with the table bound to cli and cfg. */
static duet_status cli_parser_create(px_cli *cli, px_config *cfg, opt_parser **p_p) {
    memset(cli, 0, sizeof *cli);
    cli->cfg = cfg;
    opt_spec t[TABLE_MAX];
    int n = cli_table(cli, t);
    opt_parser *p;
    duet_status st = opt_parser_create(
        "duet-proxy",
        "--prefill HOST:PORT... --decode HOST:PORT... | --backend HOST:PORT... [options]",
        "The OpenAI-compatible front door of a prefill/decode deployment: each request goes to a "
        "prefill endpoint, then with the KV cache's whereabouts to a decode endpoint; a list of "
        "prompts goes as one such chain per prompt. With --backend instead, one endpoint for "
        "plain instances (the DP ranks of one): each request goes whole to one of them. The "
        "endpoints may also come as vllm-ascend's lists (--prefiller-hosts H... "
        "--prefiller-ports P... --decoder-hosts H... --decoder-ports P...) or from --config "
        "FILE.json ({\"prefill\": [\"h:8100\"], \"decode\": \"h:8200\", \"connect_timeout\": 3}).",
        &p);
    if (st != DUET_OK) return st;
    for (int i = 0; i < n && st == DUET_OK;) {
        int k = i + 1;
        while (k < n && t[k].name) k++;
        st = opt_add(p, t[i].help, t + i + 1, k - i - 1);
        i = k;
    }
    if (st != DUET_OK) {
        opt_parser_destroy(p);
        return st;
    }
    *p_p = p;
    return DUET_OK;
}

void px_config_init(px_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    /* The table's defaults, set through it; not opt_parse, which would read the environment. */
    px_cli cli;
    opt_parser *p;
    if (cli_parser_create(&cli, cfg, &p) != DUET_OK) return; /* px_config_parse_args sets them */
    opt_spec t[TABLE_MAX];
    int n = cli_table(&cli, t);
    char err[256];
    for (int i = 0; i < n; i++)
        if (t[i].name && t[i].def) (void)opt_set(p, t[i].name, &t[i].def, 1, err, sizeof err);
    opt_parser_destroy(p);
}

void px_config_cleanup(px_config *cfg) {
    free(cfg->prefill);
    free(cfg->decode);
    free(cfg->backend);
    cfg->backend = NULL;
    cfg->n_backend = 0;
    free(cfg->api_key);
    free(cfg->upstream_api_key);
    cfg->prefill = cfg->decode = NULL;
    cfg->api_key = cfg->upstream_api_key = NULL;
    cfg->n_prefill = cfg->n_decode = 0;
}

/* ---------------------------------------------------------------------------------------------
 * Endpoints */

duet_status px_endpoint_parse(const char *s, px_endpoint *ep_p) {
    if (!s) return DUET_ERR_INVALID;
    const char *colon = strrchr(s, ':');
    if (!colon || colon == s) return DUET_ERR_INVALID;
    const char *h = s;
    size_t hl = (size_t)(colon - s);
    if (s[0] == '[') { /* [v6]:port */
        if (hl < 3 || s[hl - 1] != ']') return DUET_ERR_INVALID;
        h++;
        hl -= 2;
    } else if (memchr(s, ':', hl)) {
        return DUET_ERR_INVALID; /* a bare IPv6 address is ambiguous */
    }
    if (hl == 0 || hl >= PX_HOST_MAX) return DUET_ERR_INVALID;
    for (size_t i = 0; i < hl; i++)
        if ((unsigned char)h[i] <= ' ' || h[i] == '/' || h[i] == '[' || h[i] == ']')
            return DUET_ERR_INVALID;
    char *end;
    errno = 0;
    long port = strtol(colon + 1, &end, 10);
    if (errno || end == colon + 1 || *end || port < 1 || port > 65535) return DUET_ERR_INVALID;
    memcpy(ep_p->host, h, hl);
    ep_p->host[hl] = '\0';
    ep_p->port = (int)port;
    return DUET_OK;
}

void px_endpoint_format(const px_endpoint *ep, char *out, size_t cap) {
    snprintf(out, cap, strchr(ep->host, ':') ? "[%s]:%d" : "%s:%d", ep->host, ep->port);
}

static duet_status push_endpoint(px_endpoint **list, size_t *n, const px_endpoint *ep, char *err,
                                 size_t errlen) {
    px_endpoint *nl = realloc(*list, (*n + 1) * sizeof *nl);
    if (!nl) return fail(err, errlen, "out of memory");
    nl[*n] = *ep;
    *list = nl;
    (*n)++;
    return DUET_OK;
}

static duet_status add_endpoints(px_endpoint **list, size_t *n, const opt_list *texts,
                                 const char *flag, char *err, size_t errlen) {
    for (int i = 0; i < texts->n; i++) {
        px_endpoint ep;
        if (px_endpoint_parse(texts->v[i], &ep) != DUET_OK)
            return fail(err, errlen, "%s: expected HOST:PORT, got '%s'", flag, texts->v[i]);
        duet_status st = push_endpoint(list, n, &ep, err, errlen);
        if (st) return st;
    }
    return DUET_OK;
}

/* vllm-ascend's spelling: hosts and ports as two parallel lists. */
static duet_status zip_lists(px_endpoint **list, size_t *n, const opt_list *hosts,
                             const opt_list *ports, const char *what, char *err, size_t errlen) {
    if (hosts->n != ports->n)
        return fail(err, errlen, "--%s-hosts has %d entries but --%s-ports has %d", what, hosts->n,
                    what, ports->n);
    for (int i = 0; i < hosts->n; i++) {
        char text[PX_HOST_MAX + 16];
        const char *h = hosts->v[i];
        if (strchr(h, ':') && h[0] != '[')
            snprintf(text, sizeof text, "[%s]:%s", h, ports->v[i]);
        else
            snprintf(text, sizeof text, "%s:%s", h, ports->v[i]);
        px_endpoint ep;
        if (px_endpoint_parse(text, &ep) != DUET_OK)
            return fail(err, errlen, "--%s-hosts/--%s-ports: bad endpoint %s:%s", what, what, h,
                        ports->v[i]);
        duet_status st = push_endpoint(list, n, &ep, err, errlen);
        if (st) return st;
    }
    return DUET_OK;
}

/* The lists into endpoints, once every way in has added to them: --prefill/--decode as given,
 * then vllm-ascend's lists. --max-retries after the defaults, which opt_parse applies last. */
static duet_status cli_finish(px_cli *cli, const opt_parser *p, char *err, size_t errlen) {
    px_config *c = cli->cfg;
    if (opt_given(p, "--max-retries")) {
        if (!opt_given(p, "--prefill-retries")) c->prefill_retries = cli->max_retries;
        if (!opt_given(p, "--decode-retries")) c->decode_retries = cli->max_retries;
    }
    duet_status st =
        add_endpoints(&c->prefill, &c->n_prefill, &cli->prefill, "--prefill", err, errlen);
    if (!st) st = add_endpoints(&c->decode, &c->n_decode, &cli->decode, "--decode", err, errlen);
    if (!st)
        st = add_endpoints(&c->backend, &c->n_backend, &cli->backend, "--backend", err, errlen);
    if (!st)
        st = zip_lists(&c->prefill, &c->n_prefill, &cli->prefiller_hosts, &cli->prefiller_ports,
                       "prefiller", err, errlen);
    if (!st)
        st = zip_lists(&c->decode, &c->n_decode, &cli->decoder_hosts, &cli->decoder_ports,
                       "decoder", err, errlen);
    return st;
}

/* ---------------------------------------------------------------------------------------------
 * The JSON file */

/* A JSON scalar as the text a flag would carry. Numbers and booleans are printed into texts, a
 * JSON array that lives as long as the document: lists keep pointers to their values. */
static const char *json_text(const cJSON *v, cJSON *texts) {
    if (cJSON_IsString(v)) return v->valuestring;
    char buf[64];
    if (cJSON_IsNumber(v))
        snprintf(buf, sizeof buf, "%.15g", v->valuedouble);
    else
        snprintf(buf, sizeof buf, "%s", cJSON_IsTrue(v) ? "true" : "false");
    cJSON *s = cJSON_CreateString(buf);
    if (!s || !cJSON_AddItemToArray(texts, s)) {
        cJSON_Delete(s);
        return NULL;
    }
    return s->valuestring;
}

static bool json_scalar(const cJSON *v) {
    return cJSON_IsString(v) || cJSON_IsNumber(v) || cJSON_IsBool(v);
}

/* Sets every member of root through p (opt_set), as if given as flags. where names the source
 * in messages. */
static duet_status apply_json(opt_parser *p, const cJSON *root, cJSON *texts, const char *where,
                              char *err, size_t errlen) {
    if (!cJSON_IsObject(root)) return fail(err, errlen, "%s: not a JSON object", where);
    const cJSON *it;
    cJSON_ArrayForEach(it, root) {
        const char *key = it->string;
        if (!strcmp(key, "config") || !strcmp(key, "version"))
            return fail(err, errlen, "%s: '%s' is a command-line flag only", where, key);
        int n = cJSON_IsArray(it) ? cJSON_GetArraySize(it) : 1;
        const char **vals = malloc((size_t)(n ? n : 1) * sizeof *vals);
        if (!vals) return fail(err, errlen, "out of memory");
        duet_status st = DUET_OK;
        if (!cJSON_IsArray(it)) {
            if (!json_scalar(it))
                st = fail(err, errlen, "%s: '%s' must be a string, a number, a boolean or a list",
                          where, key);
            else if (!(vals[0] = json_text(it, texts)))
                st = fail(err, errlen, "out of memory");
        } else {
            int i = 0;
            const cJSON *e;
            cJSON_ArrayForEach(e, it) {
                if (!cJSON_IsString(e) && !cJSON_IsNumber(e)) {
                    st = fail(err, errlen, "%s: '%s' must hold strings or numbers", where, key);
                    break;
                }
                if (!(vals[i++] = json_text(e, texts))) {
                    st = fail(err, errlen, "out of memory");
                    break;
                }
            }
        }
        char why[400];
        if (!st && opt_set(p, key, vals, n, why, sizeof why) != DUET_OK)
            st = fail(err, errlen, "%s: %s", where, why);
        free(vals);
        if (st) return st;
    }
    return DUET_OK;
}

duet_status px_config_parse_json(px_config *cfg, const char *json, size_t len, char *err,
                                 size_t errlen) {
    px_cli cli;
    opt_parser *p;
    if (cli_parser_create(&cli, cfg, &p) != DUET_OK) return fail(err, errlen, "out of memory");
    cJSON *root = cJSON_ParseWithLength(json, len), *texts = cJSON_CreateArray();
    duet_status st = texts ? apply_json(p, root, texts, "config", err, errlen)
                           : fail(err, errlen, "out of memory");
    if (!st) st = cli_finish(&cli, p, err, errlen);
    cJSON_Delete(root);
    cJSON_Delete(texts);
    opt_parser_destroy(p);
    return st;
}

/* Plain stdio rather than fileio.h: that one logs, and a bad flag must be one line on stderr. */
static duet_status load_file(const char *path, cJSON **root_p, char *err, size_t errlen) {
    enum { MAX_CONFIG = 1 << 20 };
    FILE *f = fopen(path, "rb");
    int e = errno;
    char *text = f ? malloc(MAX_CONFIG + 1) : NULL;
    size_t n = text ? fread(text, 1, MAX_CONFIG + 1, f) : 0;
    bool bad = !f || !text || ferror(f) || n > MAX_CONFIG;
    if (f) fclose(f);
    duet_status st = DUET_OK;
    if (bad)
        st = fail(err, errlen, "--config: cannot read %s: %s", path,
                  n > MAX_CONFIG ? "larger than 1 MiB" : strerror(f ? EIO : e));
    else
        *root_p = cJSON_ParseWithLength(text, n);
    free(text);
    return st;
}

int px_config_parse_args(px_config *cfg, int argc, char **argv) {
    px_cli cli;
    opt_parser *p = NULL;
    cJSON *file = NULL, *texts = NULL;
    char err[600];
    int rc = 2;
    if (cli_parser_create(&cli, cfg, &p) != DUET_OK) goto no_memory;
    rc = opt_parse(p, argc, argv);
    if (rc || cfg->version) goto out;
    if (cli.config) {
        /* The file goes under the flags wherever --config stands: from the defaults again, the
         * file, then the same command line once more (it parsed once, so it parses again). */
        const char *path = cli.config;
        opt_parser_destroy(p);
        p = NULL;
        px_config_cleanup(cfg);
        px_config_init(cfg);
        if (cli_parser_create(&cli, cfg, &p) != DUET_OK || !(texts = cJSON_CreateArray()))
            goto no_memory;
        if (load_file(path, &file, err, sizeof err) != DUET_OK ||
            apply_json(p, file, texts, path, err, sizeof err) != DUET_OK)
            goto bad;
        rc = opt_parse(p, argc, argv);
        if (rc) goto out;
    }
    if (cli_finish(&cli, p, err, sizeof err) != DUET_OK) goto bad;
    if (cfg->n_backend && (cfg->n_prefill || cfg->n_decode)) {
        fail(err, sizeof err,
             "--backend (balancer mode: plain instances) and --prefill/--decode (prefill -> "
             "decode) exclude each other");
        goto bad;
    }
    if (!cfg->n_backend && !cfg->n_prefill) {
        fail(err, sizeof err,
             "no prefill endpoint (--prefill HOST:PORT ...), or --backend HOST:PORT ... for "
             "plain instances");
        goto bad;
    }
    if (!cfg->n_backend && !cfg->n_decode) {
        fail(err, sizeof err, "no decode endpoint (--decode HOST:PORT ...)");
        goto bad;
    }
    if (cfg->retry_backoff_max_ms < cfg->retry_backoff_ms)
        cfg->retry_backoff_max_ms = cfg->retry_backoff_ms;
    rc = 0;
    goto out;
no_memory:
    snprintf(err, sizeof err, "out of memory");
bad:
    fprintf(stderr, "duet-proxy: %s\n", err);
    rc = 2;
out:
    cJSON_Delete(file);
    cJSON_Delete(texts);
    opt_parser_destroy(p);
    return rc;
}
