/* duet-loopback-server: a worker whose KV transfer plug-in "transfers" inside one process, so
 * every call site of srv_kv_plugin is exercised without UCX: a request with do_remote_decode
 * leases its KV (lease_params answers block ids), one with do_remote_prefill gets those blocks
 * copied into its own (parse_remote, fetch, eng_kv_fetched, eng_lease_release, free_remote).
 * Test-only; the real plug-in lives in transport/. Driven by tests/node/plugin.test.mjs. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "server/server.h"

typedef struct loopback {
    char tag[64];
    eng_engine *eng;
    be_kv *kv;
    int n_leases, n_fetches, n_live_remotes;
} loopback;

typedef struct remote_desc {
    uint64_t lease;
    int n_blocks;
    int32_t blocks[];
} remote_desc;

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
    if (lb->kv->on_device) return DUET_ERR_UNSUPPORTED;
    LOG_INFO("loopback: started for %s on port %d", ctx->served_model_name, ctx->http_port);
    return DUET_OK;
}

static void lb_stop(void *state) {
    loopback *lb = state;
    LOG_INFO("loopback: %d leases, %d fetches, %d remote descriptors still live", lb->n_leases,
             lb->n_fetches, lb->n_live_remotes);
}

static cJSON *lb_lease_params(void *state, uint64_t engine_id, const char *request_id,
                              const int32_t *blocks, int n_blocks, int n_prompt) {
    loopback *lb = state;
    if (!strncmp(request_id, "fail-", 5)) return NULL; /* the server must release the lease */
    lb->n_leases++;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddFalseToObject(o, "do_remote_decode");
    cJSON_AddTrueToObject(o, "do_remote_prefill");
    cJSON_AddStringToObject(o, "remote_engine_id", lb->tag);
    cJSON *ids = cJSON_AddArrayToObject(o, "remote_block_ids");
    for (int i = 0; i < n_blocks; i++) cJSON_AddItemToArray(ids, cJSON_CreateNumber(blocks[i]));
    cJSON_AddStringToObject(o, "remote_host", "127.0.0.1");
    cJSON_AddNumberToObject(o, "remote_port", 0);
    cJSON_AddStringToObject(o, "remote_request_id", request_id);
    cJSON_AddNumberToObject(o, "tp_size", 1);
    cJSON_AddNumberToObject(o, "lease_id", (double)engine_id);
    cJSON_AddNumberToObject(o, "n_prompt", n_prompt);
    return o;
}

static duet_status lb_parse_remote(void *state, const cJSON *params, int n_prompt, void **remote_p,
                                   char *err, size_t err_len) {
    loopback *lb = state;
    const cJSON *ids = cJSON_GetObjectItem(params, "remote_block_ids");
    const cJSON *lease = cJSON_GetObjectItem(params, "lease_id");
    if (!cJSON_IsArray(ids) || !cJSON_IsNumber(lease)) {
        snprintf(err, err_len, "remote_block_ids and lease_id are required");
        return DUET_ERR_INVALID;
    }
    int n = cJSON_GetArraySize(ids);
    int need = (n_prompt - 1 + lb->kv->block_size - 1) / lb->kv->block_size;
    if (n < need) {
        snprintf(err, err_len, "%d remote blocks cannot hold %d prompt tokens", n, n_prompt);
        return DUET_ERR_INVALID;
    }
    remote_desc *d = malloc(sizeof *d + (size_t)n * sizeof(int32_t));
    if (!d) return DUET_ERR_NO_MEMORY;
    d->lease = (uint64_t)lease->valuedouble;
    d->n_blocks = 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, ids) {
        if (!cJSON_IsNumber(x) || x->valueint < 0 || x->valueint >= lb->kv->n_blocks) {
            free(d);
            snprintf(err, err_len, "bad remote block id");
            return DUET_ERR_INVALID;
        }
        d->blocks[d->n_blocks++] = x->valueint;
    }
    lb->n_live_remotes++;
    *remote_p = d;
    return DUET_OK;
}

static void lb_free_remote(void *state, void *remote) {
    loopback *lb = state;
    lb->n_live_remotes--;
    free(remote);
}

/* Engine thread: "reads" the leased blocks by copying them, then tells both sides. */
static duet_status lb_fetch(void *user, uint64_t id, void *remote, const int32_t *blocks,
                            int n_blocks, int skip_blocks, int n_tokens) {
    loopback *lb = user;
    remote_desc *d = remote;
    (void)n_tokens;
    if (skip_blocks + n_blocks > d->n_blocks) return DUET_ERR_INVALID;
    char *base = lb->kv->data;
    for (int i = 0; i < n_blocks; i++)
        memcpy(base + (size_t)blocks[i] * lb->kv->block_bytes,
               base + (size_t)d->blocks[skip_blocks + i] * lb->kv->block_bytes,
               lb->kv->block_bytes);
    lb->n_fetches++;
    eng_lease_release(lb->eng, d->lease);
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
        .lease_params = lb_lease_params,
        .parse_remote = lb_parse_remote,
        .free_remote = lb_free_remote,
        .fetch = lb_fetch,
    };
    return srv_main(argc, argv, SRV_ROLE_PREFILL, &plugin);
}
