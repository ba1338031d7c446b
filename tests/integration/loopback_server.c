/* duet-loopback-server: a worker whose KV transfer plug-in "transfers" inside one process, so
 * every call site of srv_kv_plugin is exercised without UCX: a request with do_remote_decode
 * leases its KV (lease fills the params), one with do_remote_prefill gets those blocks copied
 * into its own (fetch: eng_lease_pin, eng_lease_release, eng_kv_fetched). Test-only; the real
 * plug-ins are prefill/kv_lease.c and decode/kv_pull.c. Driven by tests/node/plugin.test.mjs. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "server/server.h"

typedef struct loopback {
    char tag[64];
    eng_engine *eng;
    be_kv *kv;
    int port;
    int n_leases, n_fetches;
} loopback;

static duet_status lb_tag(const opt_spec *spec, const char *v, char *err, size_t len) {
    loopback *lb = spec->user;
    if (!*v) {
        snprintf(err, len, "expected a non-empty tag");
        return DUET_ERR_INVALID;
    }
    snprintf(lb->tag, sizeof lb->tag, "%s", v);
    return DUET_OK;
}

static duet_status lb_add_options(void *state, opt_parser *p) {
    const opt_spec specs[] = {
        {.name = "--loopback-tag",
         .type = OPT_CUSTOM,
         .parse = lb_tag,
         .user = state,
         .dest = state,
         .metavar = "S",
         .help = "(test plug-in) remote_engine_id to report"},
    };
    return opt_add(p, "Loopback plug-in", specs, 1);
}

static duet_status lb_start(void *state, const srv_kv_context *ctx) {
    loopback *lb = state;
    lb->eng = ctx->engine;
    lb->kv = ctx->kv;
    lb->port = ctx->http_port;
    if (lb->kv->on_device) return DUET_ERR_UNSUPPORTED;
    LOG_INFO("loopback: started for %s on port %d", ctx->served_model_name, ctx->http_port);
    return DUET_OK;
}

static void lb_stop(void *state) {
    loopback *lb = state;
    LOG_INFO("loopback: %d leases, %d fetches", lb->n_leases, lb->n_fetches);
}

static duet_status lb_lease(void *state, uint64_t lease, const char *request_id,
                            srv_kv_params *out) {
    loopback *lb = state;
    (void)lease;
    if (!strncmp(request_id, "fail-", 5)) return DUET_ERR_IO; /* the server must release it */
    lb->n_leases++;
    snprintf(out->engine_id, sizeof out->engine_id, "%s", lb->tag);
    snprintf(out->host, sizeof out->host, "127.0.0.1");
    out->port = lb->port;
    out->tp_size = 1;
    return DUET_OK;
}

/* Engine thread: "reads" the leased blocks by copying them inside this process (the pool is
 * both sides' here), then releases the lease and reports, as a real pull would. */
static duet_status lb_fetch(void *user, uint64_t id, void *remote, const int32_t *blocks,
                            int n_blocks, int skip_blocks, int n_tokens) {
    loopback *lb = user;
    const srv_kv_params *rem = remote;
    (void)n_tokens;
    int32_t *src = malloc((size_t)lb->kv->n_blocks * sizeof(int32_t));
    int n = 0;
    eng_lease_ready ready = {0, 0, 0};
    if (!src) return DUET_ERR_NO_MEMORY;
    duet_status st = strcmp(rem->engine_id, lb->tag) != 0
                         ? DUET_ERR_NOT_FOUND
                         : eng_lease_pin(lb->eng, rem->lease, src, lb->kv->n_blocks, &n, &ready);
    /* this copy is synchronous: a prompt still being computed counts as not there */
    if (st != DUET_OK || skip_blocks + n_blocks > ready.ready) {
        free(src);
        eng_lease_release(lb->eng, rem->lease);
        eng_kv_fetched(lb->eng, id, false, "loopback: no such lease, or too short");
        return DUET_OK;
    }
    char *base = lb->kv->data;
    for (int i = 0; i < n_blocks; i++)
        memcpy(base + (size_t)blocks[i] * lb->kv->block_bytes,
               base + (size_t)src[skip_blocks + i] * lb->kv->block_bytes, lb->kv->block_bytes);
    free(src);
    lb->n_fetches++;
    eng_lease_release(lb->eng, rem->lease);
    eng_kv_fetched(lb->eng, id, true, NULL);
    return DUET_OK;
}

int main(int argc, char **argv) {
    static loopback lb = {.tag = "loopback"};
    srv_kv_plugin plugin = {
        .state = &lb,
        .add_options = lb_add_options,
        .start = lb_start,
        .stop = lb_stop,
        .lease = lb_lease,
        .fetch = lb_fetch,
    };
    return srv_main(argc, argv, SRV_ROLE_PREFILL, &plugin);
}
