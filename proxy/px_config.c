/* Command line and JSON settings of duet-proxy. One table lists every setting once, with its
 * flag name (also its JSON key, dashes as underscores), kind and field, so the two ways in
 * cannot drift apart. */
#include "px_config.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum opt_kind {
    OPT_HOST,     /* char[PX_HOST_MAX] */
    OPT_PORT,     /* int 1..65535 (0 allowed for --port: an ephemeral one) */
    OPT_STRING,   /* char *, owned */
    OPT_SECONDS,  /* unsigned ms, given in seconds (may be fractional) */
    OPT_COUNT,    /* unsigned */
    OPT_BYTES,    /* size_t */
    OPT_POLICY,   /* px_policy_kind */
    OPT_ENDPOINTS /* a list: --prefill / --decode */
} opt_kind;

typedef struct opt {
    const char *name;
    opt_kind kind;
    size_t off;
    const char *help;
} opt;

#define F(field) offsetof(px_config, field)

static const opt g_opts[] = {
    {"host", OPT_HOST, F(host), "address to listen on (default 0.0.0.0)"},
    {"port", OPT_PORT, F(port), "port to listen on (default 8000)"},
    {"prefill", OPT_ENDPOINTS, F(prefill), "prefill endpoints HOST:PORT ..."},
    {"decode", OPT_ENDPOINTS, F(decode), "decode endpoints HOST:PORT ..."},
    {"api-key", OPT_STRING, F(api_key), "key clients must send as Bearer (env DUET_API_KEY)"},
    {"upstream-api-key", OPT_STRING, F(upstream_api_key),
     "key sent to backends as Bearer (env DUET_UPSTREAM_API_KEY)"},
    {"policy", OPT_POLICY, F(policy), "least-load (default), round-robin, power-of-two"},
    {"connect-timeout", OPT_SECONDS, F(connect_timeout_ms), "seconds (default 5)"},
    {"prefill-timeout", OPT_SECONDS, F(prefill_timeout_ms),
     "seconds to the prefill answer's first byte (default 600)"},
    {"decode-timeout", OPT_SECONDS, F(decode_timeout_ms),
     "seconds to the decode answer's first byte (default 600)"},
    {"idle-timeout", OPT_SECONDS, F(idle_timeout_ms),
     "seconds between two reads of a backend answer (default 120)"},
    {"client-header-timeout", OPT_SECONDS, F(client_header_timeout_ms),
     "seconds for a client's request headers (default 10)"},
    {"client-idle-timeout", OPT_SECONDS, F(client_idle_timeout_ms),
     "seconds an idle client keep-alive connection stays open (default 60)"},
    {"drain-timeout", OPT_SECONDS, F(drain_timeout_ms),
     "seconds SIGTERM waits for requests in flight (default 30)"},
    {"health-interval", OPT_SECONDS, F(health_interval_ms),
     "seconds between health probes of each backend (default 2)"},
    {"health-timeout", OPT_SECONDS, F(health_timeout_ms), "seconds per probe (default 2)"},
    {"eject-after", OPT_COUNT, F(eject_after),
     "consecutive failures that eject a backend (default 3)"},
    {"readmit-after", OPT_COUNT, F(readmit_after),
     "consecutive good probes that re-admit it (default 2)"},
    {"prefill-retries", OPT_COUNT, F(prefill_retries),
     "further prefill attempts on other backends (default 3)"},
    {"decode-retries", OPT_COUNT, F(decode_retries),
     "further decode attempts before any byte reached the client (default 2)"},
    {"retry-backoff", OPT_SECONDS, F(retry_backoff_ms),
     "seconds before the first retry, doubling with jitter (default 0.02)"},
    {"retry-backoff-max", OPT_SECONDS, F(retry_backoff_max_ms),
     "cap on the retry delay (default 1)"},
    {"max-body-bytes", OPT_BYTES, F(max_body_bytes), "largest request body (default 33554432)"},
    {"max-connections", OPT_COUNT, F(max_connections),
     "client connections served at once (default 4096)"},
};

#undef F

void px_config_init(px_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    snprintf(cfg->host, sizeof cfg->host, "0.0.0.0");
    cfg->port = 8000;
    cfg->policy = PX_POLICY_LEAST_LOAD;
    cfg->connect_timeout_ms = 5000;
    cfg->prefill_timeout_ms = 600000;
    cfg->decode_timeout_ms = 600000;
    cfg->idle_timeout_ms = 120000;
    cfg->client_header_timeout_ms = 10000;
    cfg->client_idle_timeout_ms = 60000;
    cfg->drain_timeout_ms = 30000;
    cfg->health_interval_ms = 2000;
    cfg->health_timeout_ms = 2000;
    cfg->retry_backoff_ms = 20;
    cfg->retry_backoff_max_ms = 1000;
    cfg->eject_after = 3;
    cfg->readmit_after = 2;
    cfg->prefill_retries = 3;
    cfg->decode_retries = 2;
    cfg->max_connections = 4096;
    cfg->max_body_bytes = 32 * 1024 * 1024;
}

void px_config_cleanup(px_config *cfg) {
    free(cfg->prefill);
    free(cfg->decode);
    free(cfg->api_key);
    free(cfg->upstream_api_key);
    cfg->prefill = cfg->decode = NULL;
    cfg->api_key = cfg->upstream_api_key = NULL;
    cfg->n_prefill = cfg->n_decode = 0;
}

static duet_status fail(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static duet_status fail(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return DUET_ERR_INVALID;
}

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

static duet_status add_endpoint(px_endpoint **list, size_t *n, const px_endpoint *ep) {
    px_endpoint *nl = realloc(*list, (*n + 1) * sizeof *nl);
    if (!nl) return DUET_ERR_NO_MEMORY;
    nl[*n] = *ep;
    *list = nl;
    (*n)++;
    return DUET_OK;
}

static const opt *find_opt(const char *name, size_t len) {
    for (size_t i = 0; i < sizeof g_opts / sizeof g_opts[0]; i++)
        if (strlen(g_opts[i].name) == len && !strncmp(g_opts[i].name, name, len)) return &g_opts[i];
    return NULL;
}

static duet_status parse_seconds(const char *s, unsigned *ms_p) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v < 0 || v * 1000.0 > (double)UINT_MAX)
        return DUET_ERR_INVALID;
    *ms_p = (unsigned)llround(v * 1000.0);
    return DUET_OK;
}

static duet_status parse_ull(const char *s, unsigned long long max, unsigned long long *v_p) {
    char *end;
    errno = 0;
    if (!*s || *s == '-') return DUET_ERR_INVALID;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || v > max) return DUET_ERR_INVALID;
    *v_p = v;
    return DUET_OK;
}

/* Sets one scalar setting from text. */
static duet_status set_value(px_config *cfg, const opt *o, const char *val, char *err,
                             size_t errlen) {
    char *field = (char *)cfg + o->off;
    unsigned long long v;
    switch (o->kind) {
    case OPT_HOST:
        if (!*val || strlen(val) >= PX_HOST_MAX)
            return fail(err, errlen, "--%s: expected a host name or address", o->name);
        snprintf(field, PX_HOST_MAX, "%s", val);
        return DUET_OK;
    case OPT_PORT:
        if (parse_ull(val, 65535, &v))
            return fail(err, errlen, "--%s: expected a port 0..65535, got '%s'", o->name, val);
        *(int *)field = (int)v;
        return DUET_OK;
    case OPT_STRING: {
        char **sp = (char **)field;
        char *copy = strdup(val);
        if (!copy) return DUET_ERR_NO_MEMORY;
        free(*sp);
        *sp = copy;
        return DUET_OK;
    }
    case OPT_SECONDS:
        if (parse_seconds(val, (unsigned *)field))
            return fail(err, errlen, "--%s: expected seconds (e.g. 2.5), got '%s'", o->name, val);
        return DUET_OK;
    case OPT_COUNT:
        if (parse_ull(val, 1000000000ULL, &v))
            return fail(err, errlen, "--%s: expected a count, got '%s'", o->name, val);
        *(unsigned *)field = (unsigned)v;
        return DUET_OK;
    case OPT_BYTES:
        if (parse_ull(val, (unsigned long long)SIZE_MAX / 4, &v) || v == 0)
            return fail(err, errlen, "--%s: expected a positive byte count, got '%s'", o->name,
                        val);
        *(size_t *)field = (size_t)v;
        return DUET_OK;
    case OPT_POLICY:
        if (px_policy_parse(val, (px_policy_kind *)field))
            return fail(err, errlen,
                        "--%s: expected least-load, round-robin or power-of-two, got '%s'", o->name,
                        val);
        return DUET_OK;
    case OPT_ENDPOINTS: {
        px_endpoint ep;
        if (px_endpoint_parse(val, &ep))
            return fail(err, errlen, "--%s: expected HOST:PORT, got '%s'", o->name, val);
        bool pre = o->off == offsetof(px_config, prefill);
        duet_status st = pre ? add_endpoint(&cfg->prefill, &cfg->n_prefill, &ep)
                             : add_endpoint(&cfg->decode, &cfg->n_decode, &ep);
        return st ? fail(err, errlen, "out of memory") : DUET_OK;
    }
    }
    return DUET_ERR_INVALID;
}

duet_status px_config_parse_json(px_config *cfg, const char *json, size_t len, char *err,
                                 size_t errlen) {
    cJSON *root = cJSON_ParseWithLength(json, len);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return fail(err, errlen, "config: not a JSON object");
    }
    duet_status st = DUET_OK;
    const cJSON *it;
    cJSON_ArrayForEach(it, root) {
        char key[64];
        snprintf(key, sizeof key, "%s", it->string ? it->string : "");
        for (char *p = key; *p; p++)
            if (*p == '_') *p = '-';
        const opt *o = find_opt(key, strlen(key));
        if (!o) {
            st = fail(err, errlen, "config: unknown setting '%s'", it->string);
            break;
        }
        if (o->kind == OPT_ENDPOINTS) {
            if (!cJSON_IsArray(it) && !cJSON_IsString(it)) {
                st = fail(err, errlen, "config: '%s' must be a list of \"host:port\"", it->string);
                break;
            }
            const cJSON *e;
            if (cJSON_IsString(it)) {
                st = set_value(cfg, o, it->valuestring, err, errlen);
            } else {
                cJSON_ArrayForEach(e, it) {
                    if (!cJSON_IsString(e)) {
                        st = fail(err, errlen, "config: '%s' must hold strings", it->string);
                        break;
                    }
                    if ((st = set_value(cfg, o, e->valuestring, err, errlen))) break;
                }
            }
            if (st) break;
            continue;
        }
        char buf[64];
        const char *val = NULL;
        if (cJSON_IsString(it)) {
            val = it->valuestring;
        } else if (cJSON_IsNumber(it)) {
            snprintf(buf, sizeof buf, "%.17g", it->valuedouble);
            val = buf;
        } else {
            st = fail(err, errlen, "config: '%s' must be a string or a number", it->string);
            break;
        }
        if ((st = set_value(cfg, o, val, err, errlen))) break;
    }
    cJSON_Delete(root);
    return st;
}

/* Plain stdio rather than fileio.h: that one logs, and a bad flag must be one line on stderr. */
static duet_status load_file(px_config *cfg, const char *path, char *err, size_t errlen) {
    enum { MAX_CONFIG = 1 << 20 };
    FILE *f = fopen(path, "rb");
    int e = errno;
    char *text = f ? malloc(MAX_CONFIG + 1) : NULL;
    size_t n = text ? fread(text, 1, MAX_CONFIG + 1, f) : 0;
    bool bad = !f || !text || ferror(f) || n > MAX_CONFIG;
    if (f) fclose(f);
    duet_status st = bad ? fail(err, errlen, "--config: cannot read %s: %s", path,
                                n > MAX_CONFIG ? "larger than 1 MiB" : strerror(f ? EIO : e))
                         : px_config_parse_json(cfg, text, n, err, errlen);
    free(text);
    return st;
}

/* vllm-ascend's spelling: hosts and ports as two parallel lists. */
typedef struct host_port_lists {
    char **hosts, **ports;
    size_t nh, np;
} host_port_lists;

static duet_status zip_lists(px_config *cfg, host_port_lists *l, bool prefill, char *err,
                             size_t errlen) {
    const char *what = prefill ? "prefiller" : "decoder";
    if (l->nh != l->np)
        return fail(err, errlen, "--%s-hosts has %zu entries but --%s-ports has %zu", what, l->nh,
                    what, l->np);
    for (size_t i = 0; i < l->nh; i++) {
        char ep[PX_HOST_MAX + 16];
        const char *h = l->hosts[i];
        if (strchr(h, ':') && h[0] != '[')
            snprintf(ep, sizeof ep, "[%s]:%s", h, l->ports[i]);
        else
            snprintf(ep, sizeof ep, "%s:%s", h, l->ports[i]);
        duet_status st = set_value(cfg, find_opt(prefill ? "prefill" : "decode", prefill ? 7 : 6),
                                   ep, err, errlen);
        if (st)
            return fail(err, errlen, "--%s-hosts/--%s-ports: bad endpoint %s:%s", what, what, h,
                        l->ports[i]);
    }
    return DUET_OK;
}

duet_status px_config_parse_args(px_config *cfg, int argc, char **argv, char *err, size_t errlen) {
    /* --config first, wherever it is: flags override the file. */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *path = NULL;
        if (!strcmp(a, "--config")) {
            if (i + 1 >= argc) return fail(err, errlen, "--config: expected a file");
            path = argv[++i];
        } else if (!strncmp(a, "--config=", 9)) {
            path = a + 9;
        }
        if (path) {
            duet_status st = load_file(cfg, path, err, errlen);
            if (st) return st;
        }
    }
    host_port_lists pl = {0}, dl = {0};
    char **scratch = calloc((size_t)argc * 4 + 1, sizeof *scratch);
    if (!scratch) return fail(err, errlen, "out of memory");
    pl.hosts = scratch;
    pl.ports = scratch + argc;
    dl.hosts = scratch + 2 * argc;
    dl.ports = scratch + 3 * argc;
    duet_status st = DUET_OK;
    for (int i = 1; i < argc && !st; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            cfg->help = true;
            continue;
        }
        if (!strcmp(a, "--version")) {
            cfg->version = true;
            continue;
        }
        if (!strcmp(a, "--config")) {
            i++;
            continue;
        }
        if (!strncmp(a, "--config=", 9)) continue;
        if (strncmp(a, "--", 2)) {
            st = fail(err, errlen, "unexpected argument '%s' (see --help)", a);
            break;
        }
        const char *name = a + 2, *eq = strchr(name, '=');
        size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
        /* Multi-valued: every following word up to the next flag. */
        char **list = NULL;
        size_t *count = NULL;
        if (nlen == 15 && !strncmp(name, "prefiller-hosts", nlen)) list = pl.hosts, count = &pl.nh;
        if (nlen == 15 && !strncmp(name, "prefiller-ports", nlen)) list = pl.ports, count = &pl.np;
        if (nlen == 13 && !strncmp(name, "decoder-hosts", nlen)) list = dl.hosts, count = &dl.nh;
        if (nlen == 13 && !strncmp(name, "decoder-ports", nlen)) list = dl.ports, count = &dl.np;
        const opt *o = list ? NULL : find_opt(name, nlen);
        bool both_retries = false;
        if (!list && !o && nlen == 11 && !strncmp(name, "retry-delay", nlen))
            o = find_opt("retry-backoff", 13);
        if (!list && !o && nlen == 11 && !strncmp(name, "max-retries", nlen)) {
            o = find_opt("prefill-retries", 15);
            both_retries = true;
        }
        if (!list && !o) {
            st = fail(err, errlen, "unknown flag '%.*s' (see --help)", (int)(nlen + 2), a);
            break;
        }
        if (list || o->kind == OPT_ENDPOINTS) {
            int got = 0;
            if (eq) {
                if (list)
                    list[(*count)++] = (char *)eq + 1;
                else
                    st = set_value(cfg, o, eq + 1, err, errlen);
                got++;
            }
            while (!st && i + 1 < argc && strncmp(argv[i + 1], "--", 2)) {
                const char *v = argv[++i];
                if (list)
                    list[(*count)++] = (char *)v;
                else
                    st = set_value(cfg, o, v, err, errlen);
                got++;
            }
            if (!st && !got)
                st = fail(err, errlen, "%.*s: expected one or more values", (int)(nlen + 2), a);
            continue;
        }
        const char *val = eq ? eq + 1 : NULL;
        if (!val) {
            if (i + 1 >= argc) {
                st = fail(err, errlen, "--%s: expected a value", o->name);
                break;
            }
            val = argv[++i];
        }
        st = set_value(cfg, o, val, err, errlen);
        if (both_retries) cfg->decode_retries = cfg->prefill_retries;
    }
    if (!st) st = zip_lists(cfg, &pl, true, err, errlen);
    if (!st) st = zip_lists(cfg, &dl, false, err, errlen);
    free(scratch);
    if (st || cfg->help || cfg->version) return st;

    const char *env = getenv("DUET_API_KEY");
    if (!cfg->api_key && env && *env && !(cfg->api_key = strdup(env)))
        return fail(err, errlen, "out of memory");
    env = getenv("DUET_UPSTREAM_API_KEY");
    if (!cfg->upstream_api_key && env && *env && !(cfg->upstream_api_key = strdup(env)))
        return fail(err, errlen, "out of memory");
    if (cfg->api_key && !*cfg->api_key) return fail(err, errlen, "--api-key: empty key");
    for (const char *k = cfg->upstream_api_key; k && *k; k++)
        if ((unsigned char)*k < 0x20 || *k == 0x7f)
            return fail(err, errlen, "--upstream-api-key: control characters in the key");
    if (!cfg->n_prefill) return fail(err, errlen, "no prefill endpoint (--prefill HOST:PORT ...)");
    if (!cfg->n_decode) return fail(err, errlen, "no decode endpoint (--decode HOST:PORT ...)");
    if (!cfg->eject_after) return fail(err, errlen, "--eject-after: must be at least 1");
    if (!cfg->readmit_after) return fail(err, errlen, "--readmit-after: must be at least 1");
    if (!cfg->health_interval_ms) return fail(err, errlen, "--health-interval: must be positive");
    if (!cfg->health_timeout_ms) return fail(err, errlen, "--health-timeout: must be positive");
    if (cfg->retry_backoff_max_ms < cfg->retry_backoff_ms)
        cfg->retry_backoff_max_ms = cfg->retry_backoff_ms;
    return DUET_OK;
}

const char *px_config_usage(void) {
    static char text[4096];
    if (text[0]) return text;
    size_t off = (size_t)snprintf(
        text, sizeof text,
        "usage: duet-proxy --prefill HOST:PORT [HOST:PORT ...] --decode HOST:PORT [...] "
        "[options]\n"
        "       duet-proxy --prefiller-hosts H [H ...] --prefiller-ports P [P ...]\n"
        "                  --decoder-hosts H [H ...] --decoder-ports P [P ...] [options]\n"
        "       duet-proxy --config FILE.json [options]\n\noptions (--name VALUE or "
        "--name=VALUE; in FILE.json as \"name_with_underscores\": value):\n");
    for (size_t i = 0; i < sizeof g_opts / sizeof g_opts[0] && off < sizeof text; i++)
        off += (size_t)snprintf(text + off, sizeof text - off, "  --%-22s %s\n", g_opts[i].name,
                                g_opts[i].help);
    if (off < sizeof text)
        snprintf(text + off, sizeof text - off,
                 "  --max-retries N          both retry counts (vllm-ascend's flag)\n"
                 "  --retry-delay SECONDS    same as --retry-backoff\n"
                 "  --config FILE            JSON settings, overridden by flags\n"
                 "  --help, --version\n");
    return text;
}
