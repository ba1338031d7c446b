/* Deployment descriptions for deploy/launch: parsing with its checks, the model check and the
 * plan (mpirun and proxy command lines); see desc.h and docs/deployment.md for the format.
 * Strings of a dl_desc point into the cJSON tree it keeps. */
#include "desc.h"

#include <cjson/cJSON.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/strbuf.h"

enum { DL_MAX_HOSTS = 4096, DL_MAX_INSTANCES = 1024, DL_MAX_RANKS = 65536 };
#define REQUIRED_INT (-0x7fffffff) /* rd_int: no default */

static duet_status fail(char *err, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static duet_status fail(char *err, size_t len, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, len, fmt, ap);
    va_end(ap);
    return DUET_ERR_INVALID;
}

/* ---- typed field readers: `where` names the object in messages ("instances[1]") ---- */

typedef struct rd {
    char *err;
    size_t err_len;
    duet_status st;
} rd;

static bool rd_ok(rd *r) {
    return r->st == DUET_OK;
}

static void rd_fail(rd *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void rd_fail(rd *r, const char *fmt, ...) {
    if (r->st != DUET_OK) return; /* the first error is the one reported */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->err, r->err_len, fmt, ap);
    va_end(ap);
    r->st = DUET_ERR_INVALID;
}

/* Every key of o must be among the '|'-separated names: a typo is an error, not a default. */
static void rd_keys(rd *r, const cJSON *o, const char *where, const char *names) {
    for (const cJSON *it = o->child; it && rd_ok(r); it = it->next) {
        for (const cJSON *prev = o->child; prev != it; prev = prev->next)
            if (!strcmp(prev->string, it->string)) {
                rd_fail(r, "%s: \"%s\" is given twice", where, it->string);
                return;
            }
        size_t n = strlen(it->string);
        bool found = false;
        for (const char *p = names; *p && !found;) {
            const char *e = strchr(p, '|');
            size_t k = e ? (size_t)(e - p) : strlen(p);
            found = k == n && !strncmp(p, it->string, n);
            p += k + (e ? 1 : 0);
        }
        if (!found) rd_fail(r, "%s: unknown key \"%s\" (known: %s)", where, it->string, names);
    }
}

static const char *rd_str(rd *r, const cJSON *o, const char *where, const char *key,
                          bool required) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v) {
        if (required) rd_fail(r, "%s: \"%s\" is required", where, key);
        return NULL;
    }
    if (!cJSON_IsString(v) || !v->valuestring[0]) {
        rd_fail(r, "%s: \"%s\" must be a non-empty string", where, key);
        return NULL;
    }
    return v->valuestring;
}

static int rd_int(rd *r, const cJSON *o, const char *where, const char *key, int def, int min,
                  int max) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v) {
        if (def == REQUIRED_INT) rd_fail(r, "%s: \"%s\" is required", where, key);
        return def;
    }
    /* the range first: converting a double beyond long long's range is undefined */
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= min && v->valuedouble <= max) ||
        v->valuedouble != (double)(long long)v->valuedouble) {
        rd_fail(r, "%s: \"%s\" must be an integer from %d to %d", where, key, min, max);
        return def;
    }
    return (int)v->valuedouble;
}

static bool rd_bool(rd *r, const cJSON *o, const char *where, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v) return false;
    if (!cJSON_IsBool(v)) rd_fail(r, "%s: \"%s\" must be true or false", where, key);
    return cJSON_IsTrue(v);
}

/* An array of non-empty strings (NULL and 0 when absent); the array is malloc'ed. */
static const char **rd_strs(rd *r, const cJSON *o, const char *where, const char *key, int *n_p) {
    *n_p = 0;
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!v) return NULL;
    int n = cJSON_IsArray(v) ? cJSON_GetArraySize(v) : -1;
    if (n < 0 || n > 4096) {
        rd_fail(r, "%s: \"%s\" must be an array of strings", where, key);
        return NULL;
    }
    const char **a = calloc((size_t)n + 1, sizeof *a);
    if (!a) {
        rd_fail(r, "out of memory");
        return NULL;
    }
    int i = 0;
    for (const cJSON *it = v->child; it; it = it->next, i++) {
        if (!cJSON_IsString(it) || !it->valuestring[0]) {
            rd_fail(r, "%s: \"%s\"[%d] must be a non-empty string", where, key, i);
            free(a);
            return NULL;
        }
        a[i] = it->valuestring;
    }
    *n_p = n;
    return a;
}

static const cJSON *rd_obj(rd *r, const cJSON *o, const char *where, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (v && !cJSON_IsObject(v)) {
        rd_fail(r, "%s: \"%s\" must be an object", where, key);
        return NULL;
    }
    return v;
}

/* Names become file names, log tags and mpirun host names: keep them to a safe alphabet. */
static bool name_ok(const char *s) {
    if (!s[0] || strlen(s) > 253 || s[0] == '-' || s[0] == '.') return false;
    for (const char *p = s; *p; p++)
        if (!(*p >= 'a' && *p <= 'z') && !(*p >= 'A' && *p <= 'Z') && !(*p >= '0' && *p <= '9') &&
            *p != '-' && *p != '.' && *p != '_' && *p != ':')
            return false;
    return true;
}

static bool env_name_ok(const char *s) {
    if (!s[0] || (s[0] >= '0' && s[0] <= '9')) return false;
    for (const char *p = s; *p; p++)
        if (!(*p >= 'A' && *p <= 'Z') && !(*p >= 'a' && *p <= 'z') && !(*p >= '0' && *p <= '9') &&
            *p != '_')
            return false;
    return true;
}

static int host_index(const dl_desc *d, const char *name) {
    for (int i = 0; i < d->n_hosts; i++)
        if (!strcmp(d->hosts[i].name, name)) return i;
    return -1;
}

/* ---- parsing ---- */

static void parse_hosts(rd *r, dl_desc *d, const cJSON *root) {
    const cJSON *hs = cJSON_GetObjectItemCaseSensitive(root, "hosts");
    if (!cJSON_IsArray(hs) || cJSON_GetArraySize(hs) < 1 || cJSON_GetArraySize(hs) > DL_MAX_HOSTS) {
        rd_fail(r, "\"hosts\" must be a non-empty array of {\"name\", \"gpus\"} objects");
        return;
    }
    d->hosts = calloc((size_t)cJSON_GetArraySize(hs), sizeof *d->hosts);
    if (!d->hosts) {
        rd_fail(r, "out of memory");
        return;
    }
    char where[64];
    for (const cJSON *h = hs->child; h && rd_ok(r); h = h->next) {
        snprintf(where, sizeof where, "hosts[%d]", d->n_hosts);
        if (!cJSON_IsObject(h)) {
            rd_fail(r, "%s must be an object", where);
            return;
        }
        rd_keys(r, h, where, "name|address|listen|gpus");
        dl_host *x = &d->hosts[d->n_hosts];
        x->name = rd_str(r, h, where, "name", true);
        x->address = rd_str(r, h, where, "address", false);
        x->listen = rd_str(r, h, where, "listen", false);
        x->gpus = rd_int(r, h, where, "gpus", REQUIRED_INT, 1, 4096);
        if (!rd_ok(r)) return;
        /* mpirun reads --host NAME:SLOTS, so a name has no colon; an address may (IPv6) */
        if (!name_ok(x->name) || strchr(x->name, ':')) {
            rd_fail(r, "%s: \"%s\" is not a host name", where, x->name);
            return;
        }
        if (x->address && !name_ok(x->address)) {
            rd_fail(r, "%s: \"%s\" is not a host name or address", where, x->address);
            return;
        }
        if (x->listen && !name_ok(x->listen)) {
            rd_fail(r, "%s: \"listen\" must be an address, not \"%s\"", where, x->listen);
            return;
        }
        if (!x->address) x->address = x->name;
        if (!x->listen) x->listen = "0.0.0.0";
        if (host_index(d, x->name) >= 0) {
            rd_fail(r, "%s: host \"%s\" is listed twice", where, x->name);
            return;
        }
        d->n_hosts++;
    }
}

static void parse_instance(rd *r, dl_desc *d, const cJSON *o, int idx) {
    char where[300];
    snprintf(where, sizeof where, "instances[%d]", idx);
    if (!cJSON_IsObject(o)) {
        rd_fail(r, "%s must be an object", where);
        return;
    }
    rd_keys(r, o, where, "name|role|hosts|dp|tp|ep|port|kv_port|args");
    dl_instance *in = &d->inst[idx];
    in->name = rd_str(r, o, where, "name", true);
    const char *role = rd_str(r, o, where, "role", true);
    if (!rd_ok(r)) return;
    snprintf(where, sizeof where, "instance \"%s\"", in->name);
    if (!name_ok(in->name)) {
        rd_fail(r, "%s: the name may use letters, digits, - . _", where);
        return;
    }
    for (int i = 0; i < idx; i++)
        if (!strcmp(d->inst[i].name, in->name)) {
            rd_fail(r, "%s is listed twice", where);
            return;
        }
    if (!strcmp(role, "prefill"))
        in->role = DL_ROLE_PREFILL;
    else if (!strcmp(role, "decode"))
        in->role = DL_ROLE_DECODE;
    else {
        rd_fail(r, "%s: role \"%s\" is neither \"prefill\" nor \"decode\"", where, role);
        return;
    }
    in->dp = rd_int(r, o, where, "dp", 1, 1, 4096);
    in->tp = rd_int(r, o, where, "tp", 1, 1, 4096);
    in->ep = rd_bool(r, o, where, "ep");
    in->port = rd_int(r, o, where, "port", REQUIRED_INT, 1, 65535);
    in->kv_port = rd_int(r, o, where, "kv_port", 0, 1, 65535);
    in->args = rd_strs(r, o, where, "args", &in->n_args);
    if (!rd_ok(r)) return;
    if (in->kv_port && in->role != DL_ROLE_PREFILL) {
        rd_fail(r, "%s: \"kv_port\" is a prefill setting (decode workers only connect)", where);
        return;
    }
    if ((long)in->dp * in->tp > DL_MAX_RANKS) {
        rd_fail(r, "%s: dp x tp is more than %d ranks", where, DL_MAX_RANKS);
        return;
    }
    if (in->port + in->dp - 1 > 65535) {
        rd_fail(r, "%s: DP ranks' ports %d..%d go past 65535", where, in->port,
                in->port + in->dp - 1);
        return;
    }
    int kv = in->kv_port ? in->kv_port : in->port + 1000;
    if (in->role == DL_ROLE_PREFILL && kv + in->dp - 1 > 65535) {
        rd_fail(r, "%s: KV side-channel ports %d..%d go past 65535 (set \"kv_port\")", where, kv,
                kv + in->dp - 1);
        return;
    }

    const cJSON *hs = cJSON_GetObjectItemCaseSensitive(o, "hosts");
    int n = cJSON_IsArray(hs) ? cJSON_GetArraySize(hs) : 0;
    if (n < 1) {
        rd_fail(r, "%s: \"hosts\" must be a non-empty array of host names", where);
        return;
    }
    in->hosts = calloc((size_t)n, sizeof *in->hosts);
    if (!in->hosts) {
        rd_fail(r, "out of memory");
        return;
    }
    for (const cJSON *h = hs->child; h; h = h->next) {
        if (!cJSON_IsString(h)) {
            rd_fail(r, "%s: \"hosts\" must be an array of host names", where);
            return;
        }
        int k = host_index(d, h->valuestring);
        if (k < 0) {
            rd_fail(r, "%s: host \"%s\" is not in \"hosts\"", where, h->valuestring);
            return;
        }
        for (int i = 0; i < in->n_hosts; i++)
            if (in->hosts[i] == k) {
                rd_fail(r, "%s: host \"%s\" is listed twice", where, h->valuestring);
                return;
            }
        in->hosts[in->n_hosts++] = k;
    }
    int ranks = in->dp * in->tp;
    if (ranks % in->n_hosts) {
        rd_fail(r, "%s: its %d ranks (dp %d x tp %d) do not split evenly over its %d hosts", where,
                ranks, in->dp, in->tp, in->n_hosts);
        return;
    }
}

static void parse_proxy(rd *r, dl_desc *d, const cJSON *p) {
    d->proxy_host = -1;
    if (!p) return;
    const char *where = "proxy";
    if (!cJSON_IsObject(p)) {
        rd_fail(r, "\"proxy\" must be an object");
        return;
    }
    rd_keys(r, p, where, "port|listen|host|args");
    d->has_proxy = true;
    d->proxy_port = rd_int(r, p, where, "port", REQUIRED_INT, 1, 65535);
    d->proxy_listen = rd_str(r, p, where, "listen", false);
    const char *host = rd_str(r, p, where, "host", false);
    d->proxy_args = rd_strs(r, p, where, "args", &d->n_proxy_args);
    if (!rd_ok(r)) return;
    if (!d->proxy_listen) d->proxy_listen = "0.0.0.0";
    if (!name_ok(d->proxy_listen)) {
        rd_fail(r, "proxy: \"listen\" must be an address, not \"%s\"", d->proxy_listen);
        return;
    }
    if (host && (d->proxy_host = host_index(d, host)) < 0) {
        rd_fail(r, "proxy: host \"%s\" is not in \"hosts\"", host);
        return;
    }
}

static void parse_top(rd *r, dl_desc *d, const cJSON *root) {
    const char *w = "the description";
    rd_keys(r, root, w,
            "model|tokenizer|served_model_name|backend|bin|network|secrets|env|mpirun_args|"
            "worker_args|hosts|instances|proxy");
    d->model = rd_str(r, root, w, "model", true);
    d->tokenizer = rd_str(r, root, w, "tokenizer", false);
    d->served_name = rd_str(r, root, w, "served_model_name", false);
    d->backend = rd_str(r, root, w, "backend", false);
    d->bin = rd_str(r, root, w, "bin", false);
    d->mpirun_args = rd_strs(r, root, w, "mpirun_args", &d->n_mpirun_args);
    d->worker_args = rd_strs(r, root, w, "worker_args", &d->n_worker_args);
    const cJSON *net = rd_obj(r, root, w, "network");
    if (net && rd_ok(r)) {
        rd_keys(r, net, "network", "nic|rdma");
        d->nic = rd_str(r, net, "network", "nic", false);
        d->rdma = rd_strs(r, net, "network", "rdma", &d->n_rdma);
        if (rd_ok(r) && d->nic && !name_ok(d->nic))
            rd_fail(r, "network: \"nic\" must be an interface name, not \"%s\"", d->nic);
    }
    const cJSON *sec = rd_obj(r, root, w, "secrets");
    d->kv_secret_env = "DUET_KV_SECRET";
    if (sec && rd_ok(r)) {
        rd_keys(r, sec, "secrets", "kv_secret_env|api_key_env");
        const char *kv = rd_str(r, sec, "secrets", "kv_secret_env", false);
        d->api_key_env = rd_str(r, sec, "secrets", "api_key_env", false);
        if (kv) d->kv_secret_env = kv;
        if (rd_ok(r) &&
            (!env_name_ok(d->kv_secret_env) || (d->api_key_env && !env_name_ok(d->api_key_env))))
            rd_fail(r, "secrets: values are names of environment variables, like "
                       "\"DUET_KV_SECRET\" (the secrets themselves never go in this file)");
    }
    const cJSON *env = rd_obj(r, root, w, "env");
    if (env && rd_ok(r)) {
        int n = cJSON_GetArraySize(env);
        d->env_names = calloc((size_t)n + 1, sizeof *d->env_names);
        d->env_values = calloc((size_t)n + 1, sizeof *d->env_values);
        if (!d->env_names || !d->env_values) {
            rd_fail(r, "out of memory");
            return;
        }
        for (const cJSON *it = env->child; it && rd_ok(r); it = it->next) {
            if (!env_name_ok(it->string) || !cJSON_IsString(it)) {
                rd_fail(r, "env: \"%s\" must be a variable name with a string value", it->string);
                return;
            }
            d->env_names[d->n_env] = it->string;
            d->env_values[d->n_env++] = it->valuestring;
        }
    }
    if (!rd_ok(r)) return;
    parse_hosts(r, d, root);
    if (!rd_ok(r)) return;
    const cJSON *is = cJSON_GetObjectItemCaseSensitive(root, "instances");
    int n = cJSON_IsArray(is) ? cJSON_GetArraySize(is) : 0;
    if (n < 1 || n > DL_MAX_INSTANCES) {
        rd_fail(r, "\"instances\" must be a non-empty array of instances");
        return;
    }
    d->inst = calloc((size_t)n, sizeof *d->inst);
    if (!d->inst) {
        rd_fail(r, "out of memory");
        return;
    }
    for (const cJSON *o = is->child; o && rd_ok(r); o = o->next) {
        parse_instance(r, d, o, d->n_inst);
        d->n_inst++; /* counted even on failure: destroy frees what it allocated */
    }
    if (rd_ok(r)) parse_proxy(r, d, cJSON_GetObjectItemCaseSensitive(root, "proxy"));
}

/* ---- checks across the description ---- */

static int ranks_per_host(const dl_instance *in) {
    return in->dp * in->tp / in->n_hosts;
}

/* The host running world rank k of an instance. */
static int rank_host(const dl_instance *in, int k) {
    return in->hosts[k / ranks_per_host(in)];
}

static duet_status check_roles(const dl_desc *d, char *err, size_t len) {
    int np = 0, nd = 0;
    for (int i = 0; i < d->n_inst; i++) {
        if (d->inst[i].role == DL_ROLE_PREFILL)
            np++;
        else
            nd++;
    }
    if (np && !nd)
        return fail(err, len, "prefill instances need a decode instance to send their KV cache to");
    if (d->has_proxy && (!np || !nd))
        return fail(err, len,
                    "the proxy needs at least one prefill and one decode instance (a single "
                    "instance is itself an OpenAI server: leave \"proxy\" out)");
    if (np && !d->has_proxy)
        return fail(err, len,
                    "a disaggregated deployment needs \"proxy\": clients reach the "
                    "prefill and decode instances through it");
    return DUET_OK;
}

static duet_status check_gpus(const dl_desc *d, char *err, size_t len) {
    for (int h = 0; h < d->n_hosts; h++) {
        int used = 0;
        strbuf who;
        strbuf_init(&who);
        for (int i = 0; i < d->n_inst; i++) {
            const dl_instance *in = &d->inst[i];
            for (int k = 0; k < in->n_hosts; k++)
                if (in->hosts[k] == h) {
                    used += ranks_per_host(in);
                    strbuf_printf(&who, "%s%s %d", who.len ? ", " : "", in->name,
                                  ranks_per_host(in));
                }
        }
        if (used > d->hosts[h].gpus) {
            duet_status st =
                fail(err, len, "host \"%s\" has %d GPUs but %d ranks are placed on it (%s)",
                     d->hosts[h].name, d->hosts[h].gpus, used, who.p ? who.p : "");
            strbuf_free(&who);
            return st;
        }
        strbuf_free(&who);
    }
    return DUET_OK;
}

typedef struct port_use {
    int host, port;
    char what[160];
} port_use;

static duet_status check_ports(const dl_desc *d, char *err, size_t len) {
    size_t cap = 1, n = 0;
    for (int i = 0; i < d->n_inst; i++) cap += 2 * (size_t)d->inst[i].dp;
    port_use *u = calloc(cap, sizeof *u);
    if (!u) return fail(err, len, "out of memory");
    for (int i = 0; i < d->n_inst; i++) {
        const dl_instance *in = &d->inst[i];
        int kv = in->kv_port ? in->kv_port : in->port + 1000;
        for (int r = 0; r < in->dp; r++) {
            int h = rank_host(in, r * in->tp);
            u[n++] = (port_use){.host = h, .port = in->port + r};
            snprintf(u[n - 1].what, sizeof u[n - 1].what, "the HTTP port of %s's DP rank %d",
                     in->name, r);
            if (in->role == DL_ROLE_PREFILL) {
                u[n++] = (port_use){.host = h, .port = kv + r};
                snprintf(u[n - 1].what, sizeof u[n - 1].what,
                         "the KV side-channel port of %s's DP rank %d", in->name, r);
            }
        }
    }
    if (d->has_proxy && d->proxy_host >= 0) {
        u[n++] = (port_use){.host = d->proxy_host, .port = d->proxy_port};
        snprintf(u[n - 1].what, sizeof u[n - 1].what, "the proxy's port");
    }
    duet_status st = DUET_OK;
    for (size_t a = 0; a < n && st == DUET_OK; a++)
        for (size_t b = 0; b < a && st == DUET_OK; b++)
            if (u[a].host == u[b].host && u[a].port == u[b].port)
                st = fail(err, len, "port %d on host \"%s\" is both %s and %s", u[a].port,
                          d->hosts[u[a].host].name, u[b].what, u[a].what);
    free(u);
    return st;
}

duet_status dl_desc_parse(const char *text, size_t len, dl_desc **desc_p, char *err,
                          size_t err_len) {
    if (len > (64u << 20)) return fail(err, err_len, "the description is larger than 64 MiB");
    char *copy = malloc(len + 1);
    if (!copy) return fail(err, err_len, "out of memory");
    memcpy(copy, text, len);
    copy[len] = '\0';
    cJSON_Minify(copy); /* drops // and block comments */
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(copy, &end, true);
    free(copy);
    if (!root) return fail(err, err_len, "the description is not valid JSON");
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return fail(err, err_len, "the description must be a JSON object");
    }
    dl_desc *d = calloc(1, sizeof *d);
    if (!d) {
        cJSON_Delete(root);
        return fail(err, err_len, "out of memory");
    }
    d->priv = root;
    rd r = {.err = err, .err_len = err_len};
    parse_top(&r, d, root);
    duet_status st = r.st;
    if (st == DUET_OK) st = check_roles(d, err, err_len);
    if (st == DUET_OK) st = check_gpus(d, err, err_len);
    if (st == DUET_OK) st = check_ports(d, err, err_len);
    if (st != DUET_OK) {
        dl_desc_destroy(d);
        return st;
    }
    *desc_p = d;
    return DUET_OK;
}

void dl_desc_destroy(dl_desc *d) {
    if (!d) return;
    for (int i = 0; i < d->n_inst; i++) {
        free(d->inst[i].hosts);
        free(d->inst[i].args);
    }
    free(d->inst);
    free(d->hosts);
    free(d->rdma);
    free(d->env_names);
    free(d->env_values);
    free(d->mpirun_args);
    free(d->worker_args);
    free(d->proxy_args);
    cJSON_Delete(d->priv);
    free(d);
}

static duet_status divides(char *err, size_t len, const dl_instance *in, const char *config,
                           const char *what, int n, const char *by_what, int by) {
    if (n % by == 0) return DUET_OK;
    return fail(err, len, "instance \"%s\": %s %d does not divide %s %d of %s", in->name, by_what,
                by, what, n, config);
}

duet_status dl_desc_check_model(const dl_desc *d, const dl_model_shape *m, const char *config,
                                char *err, size_t err_len) {
    for (int i = 0; i < d->n_inst; i++) {
        const dl_instance *in = &d->inst[i];
        int ep = in->ep ? in->dp * in->tp : 1;
        duet_status st = divides(err, err_len, in, config, "num_attention_heads", m->heads,
                                 "tensor parallelism (tp)", in->tp);
        if (st == DUET_OK)
            st = divides(err, err_len, in, config, "intermediate_size", m->intermediate,
                         "tensor parallelism (tp)", in->tp);
        if (st == DUET_OK && m->shared_experts)
            st =
                divides(err, err_len, in, config, "the shared experts' intermediate size",
                        m->shared_experts * m->moe_intermediate, "tensor parallelism (tp)", in->tp);
        if (st == DUET_OK && m->routed_experts && ep > 1)
            st = divides(err, err_len, in, config, "n_routed_experts", m->routed_experts,
                         "expert parallelism over dp x tp ranks", ep);
        if (st == DUET_OK && m->routed_experts && ep <= 1)
            st = divides(err, err_len, in, config, "moe_intermediate_size", m->moe_intermediate,
                         "tensor parallelism (tp)", in->tp);
        if (st != DUET_OK) return st;
    }
    return DUET_OK;
}

/* ---- the plan ---- */

typedef struct argv_b {
    char **v;
    int n, cap;
    bool oom;
} argv_b;

static void av_add(argv_b *a, const char *s) {
    if (a->oom) return;
    if (a->n + 2 > a->cap) {
        int cap = a->cap ? a->cap * 2 : 32;
        char **v = realloc(a->v, (size_t)cap * sizeof *v);
        if (!v) {
            a->oom = true;
            return;
        }
        a->v = v;
        a->cap = cap;
    }
    char *c = strdup(s);
    if (!c) {
        a->oom = true;
        return;
    }
    a->v[a->n++] = c;
    a->v[a->n] = NULL;
}

static void av_addf(argv_b *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void av_addf(argv_b *a, const char *fmt, ...) {
    char buf[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    av_add(a, buf);
}

static void av_free(char **v) {
    if (!v) return;
    for (char **p = v; *p; p++) free(*p);
    free(v);
}

static char *path_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* Whether the instance's DP replicas stand alone: no EP all-to-all ties them together and no
 * TP group spans two hosts. Then mpirun is told to let the replicas on other hosts go on when
 * a rank or a whole host is lost (--enable-recovery with duet-mpi-agent), and the proxy stops
 * sending to the lost ones. Otherwise the loss ends the instance at once. */
static bool survives_lost_host(const dl_instance *in) {
    return !in->ep && in->dp > 1 && ranks_per_host(in) % in->tp == 0;
}

/* Device slots given to each instance on each host, in description order. */
static int first_gpu(const dl_desc *d, int inst, int host) {
    int g = 0;
    for (int i = 0; i < inst; i++)
        for (int k = 0; k < d->inst[i].n_hosts; k++)
            if (d->inst[i].hosts[k] == host) g += ranks_per_host(&d->inst[i]);
    return g;
}

/* The environment of one app context: Open MPI's -x applies to the context it is given in,
 * so every context repeats it. Secrets go by name: mpirun copies the launcher's value and no
 * command line shows it. */
static void context_env(const dl_desc *d, argv_b *a) {
    bool has_kv = false;
    for (int i = 0; i < d->n_inst; i++) has_kv |= d->inst[i].role == DL_ROLE_PREFILL;
    if (has_kv) {
        av_add(a, "-x");
        av_add(a, "DUET_KV_SECRET");
    }
    if (d->api_key_env) {
        av_add(a, "-x");
        av_add(a, "DUET_API_KEY");
    }
    if (d->nic) {
        av_add(a, "-x");
        av_addf(a, "NCCL_SOCKET_IFNAME=%s", d->nic);
    }
    if (d->n_rdma || d->nic) {
        strbuf dev;
        strbuf_init(&dev);
        for (int i = 0; i < d->n_rdma; i++) strbuf_printf(&dev, "%s%s", i ? "," : "", d->rdma[i]);
        av_add(a, "-x");
        av_addf(a, "UCX_NET_DEVICES=%s", d->n_rdma ? dev.p : d->nic);
        if (d->n_rdma) {
            av_add(a, "-x");
            av_addf(a, "NCCL_IB_HCA=%s", dev.p);
        }
        strbuf_free(&dev);
    }
    for (int i = 0; i < d->n_env; i++) {
        av_add(a, "-x");
        av_addf(a, "%s=%s", d->env_names[i], d->env_values[i]);
    }
}

static void instance_cmd(const dl_desc *d, int idx, const dl_paths *paths, argv_b *a, strbuf *sum) {
    const dl_instance *in = &d->inst[idx];
    int per = ranks_per_host(in);
    const char *prog = in->role == DL_ROLE_PREFILL ? paths->prefill : paths->decode;
    av_add(a, "mpirun");
    if (survives_lost_host(in)) {
        av_add(a, "--enable-recovery");
        av_add(a, "--mca");
        av_add(a, "plm_rsh_agent");
        av_add(a, paths->agent);
    }
    if (d->nic) {
        av_add(a, "--mca");
        av_add(a, "btl_tcp_if_include");
        av_add(a, d->nic);
        av_add(a, "--mca");
        av_add(a, "oob_tcp_if_include");
        av_add(a, d->nic);
    }
    for (int i = 0; i < d->n_mpirun_args; i++) av_add(a, d->mpirun_args[i]);
    bool cuda = d->backend && strcmp(d->backend, "cpu") != 0;
    for (int k = 0; k < in->n_hosts; k++) {
        const dl_host *h = &d->hosts[in->hosts[k]];
        if (k) av_add(a, ":");
        av_add(a, "-np");
        av_addf(a, "%d", per);
        av_add(a, "--host");
        av_addf(a, "%s:%d", h->name, per);
        context_env(d, a);
        if (cuda) {
            /* this instance's share of the host's devices; ranks pick theirs by local rank */
            strbuf dev;
            strbuf_init(&dev);
            int g0 = first_gpu(d, idx, in->hosts[k]);
            for (int g = 0; g < per; g++) strbuf_printf(&dev, "%s%d", g ? "," : "", g0 + g);
            av_add(a, "-x");
            av_addf(a, "CUDA_VISIBLE_DEVICES=%s", dev.p ? dev.p : "");
            strbuf_free(&dev);
        }
        av_add(a, prog);
        av_add(a, "--model");
        av_add(a, d->model);
        if (d->tokenizer) {
            av_add(a, "--tokenizer");
            av_add(a, d->tokenizer);
        }
        if (d->served_name) {
            av_add(a, "--served-model-name");
            av_add(a, d->served_name);
        }
        if (d->backend) {
            av_add(a, "--backend");
            av_add(a, d->backend);
        }
        if (in->dp > 1) {
            av_add(a, "--data-parallel-size");
            av_addf(a, "%d", in->dp);
        }
        if (in->tp > 1) {
            av_add(a, "--tensor-parallel-size");
            av_addf(a, "%d", in->tp);
        }
        if (in->ep) av_add(a, "--enable-expert-parallel");
        av_add(a, "--host");
        av_add(a, h->listen);
        av_add(a, "--port");
        av_addf(a, "%d", in->port);
        if (in->role == DL_ROLE_PREFILL) {
            av_add(a, "--kv-host");
            av_add(a, h->address);
            if (in->kv_port) {
                av_add(a, "--kv-port");
                av_addf(a, "%d", in->kv_port);
            }
        }
        for (int i = 0; i < d->n_worker_args; i++) av_add(a, d->worker_args[i]);
        for (int i = 0; i < in->n_args; i++) av_add(a, in->args[i]);
    }

    strbuf_printf(sum, "%s: %s, dp %d x tp %d%s, %d rank%s on ", in->name,
                  in->role == DL_ROLE_PREFILL ? "prefill" : "decode", in->dp, in->tp,
                  in->ep ? " + ep" : "", in->dp * in->tp, in->dp * in->tp > 1 ? "s" : "");
    for (int k = 0; k < in->n_hosts; k++)
        strbuf_printf(sum, "%s%s (%d)", k ? ", " : "", d->hosts[in->hosts[k]].name, per);
    int kv = in->kv_port ? in->kv_port : in->port + 1000;
    if (in->dp == 1)
        strbuf_printf(sum, "; HTTP port %d", in->port);
    else
        strbuf_printf(sum, "; HTTP ports %d..%d", in->port, in->port + in->dp - 1);
    if (in->role == DL_ROLE_PREFILL && in->dp == 1)
        strbuf_printf(sum, ", KV side channel %d", kv);
    else if (in->role == DL_ROLE_PREFILL)
        strbuf_printf(sum, ", KV side channel %d..%d", kv, kv + in->dp - 1);
    if (survives_lost_host(in))
        strbuf_printf(sum, "; a lost DP replica (rank or host) leaves the others serving");
}

static void proxy_cmd(const dl_desc *d, const dl_plan *p, const char *prog, argv_b *a, argv_b *env,
                      strbuf *sum) {
    av_add(a, prog);
    av_add(a, "--host");
    av_add(a, d->proxy_listen);
    av_add(a, "--port");
    av_addf(a, "%d", d->proxy_port);
    for (int role = 0; role < 2; role++) {
        av_add(a, role == DL_ROLE_PREFILL ? "--prefill" : "--decode");
        for (int i = 0; i < p->n_endpoints; i++)
            if ((int)p->endpoints[i].role == role) av_add(a, p->endpoints[i].host_port);
    }
    for (int i = 0; i < d->n_proxy_args; i++) av_add(a, d->proxy_args[i]);
    if (d->api_key_env) av_add(env, "DUET_UPSTREAM_API_KEY=$DUET_API_KEY");
    strbuf_printf(sum, "proxy: %s:%d in front of every DP endpoint", d->proxy_listen,
                  d->proxy_port);
}

duet_status dl_plan_create(const dl_desc *d, const dl_paths *bin_paths, dl_plan **plan_p) {
    dl_plan *p = calloc(1, sizeof *p);
    if (!p) return DUET_ERR_NO_MEMORY;
    dl_paths own = {0};
    char *owned[4] = {0};
    const dl_paths *paths = bin_paths;
    if (d->bin) {
        own.prefill = owned[0] = path_join(d->bin, "duet-prefill");
        own.decode = owned[1] = path_join(d->bin, "duet-decode");
        own.proxy = owned[2] = path_join(d->bin, "duet-proxy");
        own.agent = owned[3] = path_join(d->bin, "duet-mpi-agent");
        paths = &own;
    }
    bool oom = !paths->prefill || !paths->decode || !paths->proxy || !paths->agent;
    int n_ep = 0;
    for (int i = 0; i < d->n_inst; i++) n_ep += d->inst[i].dp;
    p->endpoints = calloc((size_t)n_ep + 1, sizeof *p->endpoints);
    p->cmds = calloc((size_t)d->n_inst + 1, sizeof *p->cmds);
    oom |= !p->endpoints || !p->cmds;
    for (int i = 0; i < d->n_inst && !oom; i++) {
        const dl_instance *in = &d->inst[i];
        for (int r = 0; r < in->dp && !oom; r++) {
            dl_endpoint *e = &p->endpoints[p->n_endpoints++];
            const dl_host *h = &d->hosts[rank_host(in, r * in->tp)];
            size_t n = strlen(h->address) + 16;
            e->host_port = malloc(n);
            oom |= !e->host_port;
            if (e->host_port)
                snprintf(e->host_port, n, strchr(h->address, ':') ? "[%s]:%d" : "%s:%d", h->address,
                         in->port + r);
            e->instance = i;
            e->role = in->role;
        }
    }
    for (int i = 0; i <= d->n_inst && !oom; i++) {
        if (i == d->n_inst && !d->has_proxy) break;
        argv_b a = {0}, env = {0};
        strbuf sum;
        strbuf_init(&sum);
        if (i < d->n_inst)
            instance_cmd(d, i, paths, &a, &sum);
        else
            proxy_cmd(d, p, paths->proxy, &a, &env, &sum);
        dl_cmd *c = &p->cmds[p->n_cmds++];
        c->name = strdup(i < d->n_inst ? d->inst[i].name : "proxy");
        c->summary = sum.p ? sum.p : strdup("");
        c->argv = a.v;
        c->env = env.v;
        c->instance = i < d->n_inst ? i : -1;
        oom |= a.oom || env.oom || sum.oom || !c->name || !c->summary;
    }
    if (!oom && d->has_proxy) {
        const char *l = d->proxy_listen;
        const char *host = !strcmp(l, "0.0.0.0") ? "127.0.0.1" : !strcmp(l, "::") ? "::1" : l;
        size_t n = strlen(host) + 32;
        p->proxy_url = malloc(n);
        oom |= !p->proxy_url;
        if (p->proxy_url)
            snprintf(p->proxy_url, n, strchr(host, ':') ? "http://[%s]:%d" : "http://%s:%d", host,
                     d->proxy_port);
    }
    for (int i = 0; i < 4; i++) free(owned[i]);
    if (oom) {
        dl_plan_destroy(p);
        return DUET_ERR_NO_MEMORY;
    }
    *plan_p = p;
    return DUET_OK;
}

void dl_plan_destroy(dl_plan *p) {
    if (!p) return;
    for (int i = 0; i < p->n_cmds; i++) {
        free(p->cmds[i].name);
        free(p->cmds[i].summary);
        av_free(p->cmds[i].argv);
        av_free(p->cmds[i].env);
    }
    free(p->cmds);
    for (int i = 0; i < p->n_endpoints; i++) free(p->endpoints[i].host_port);
    free(p->endpoints);
    free(p->proxy_url);
    free(p);
}

/* Single quotes unless the word is plainly safe; "$VAR" values of env stay expandable. */
static void quote(strbuf *b, const char *s, bool allow_var) {
    bool plain = s[0] != '\0';
    for (const char *q = s; *q && plain; q++)
        plain = strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.,/:=@+%",
                       *q) != NULL;
    if (plain) {
        strbuf_str(b, s);
        return;
    }
    const char *eq = allow_var ? strchr(s, '=') : NULL;
    if (eq && eq[1] == '$') {
        strbuf_add(b, s, (size_t)(eq - s) + 1);
        strbuf_printf(b, "\"%s\"", eq + 1);
        return;
    }
    strbuf_str(b, "'");
    for (const char *q = s; *q; q++)
        if (*q == '\'')
            strbuf_str(b, "'\\''");
        else
            strbuf_add(b, q, 1);
    strbuf_str(b, "'");
}

char *dl_cmd_line(const dl_cmd *c) {
    strbuf b;
    strbuf_init(&b);
    for (char **e = c->env; e && *e; e++) {
        quote(&b, *e, true);
        strbuf_str(&b, " ");
    }
    for (char **a = c->argv; *a; a++) {
        /* one line per app context (and per endpoint list) keeps long commands readable */
        bool brk = a != c->argv &&
                   (!strcmp(*a, ":") || !strcmp(*a, "--prefill") || !strcmp(*a, "--decode") ||
                    (!strcmp(*a, "-np") && strcmp(a[-1], ":") != 0));
        if (a != c->argv) strbuf_str(&b, brk ? " \\\n    " : " ");
        quote(&b, *a, false);
    }
    if (b.oom) {
        strbuf_free(&b);
        return NULL;
    }
    return b.p;
}
