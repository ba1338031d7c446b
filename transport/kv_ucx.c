/* UCX wrapper for KV transfer; see kv_ucx.h. Status conversion happens in one macro, which
 * logs where the failure is first seen. */
#include "kv_ucx.h"

#include <stdlib.h>
#include <string.h>
#include <ucp/api/ucp.h>

#include "base/log.h"

#define UCS_CHECK(call, what)                                                                      \
    do {                                                                                           \
        ucs_status_t us_ = (call);                                                                 \
        if (us_ != UCS_OK) {                                                                       \
            LOG_ERROR("ucx: %s: %s", what, ucs_status_string(us_));                                \
            return from_ucs(us_);                                                                  \
        }                                                                                          \
    } while (0)

static duet_status from_ucs(ucs_status_t s) {
    switch (s) {
    case UCS_OK:
        return DUET_OK;
    case UCS_ERR_NO_MEMORY:
        return DUET_ERR_NO_MEMORY;
    case UCS_ERR_TIMED_OUT:
        return DUET_ERR_TIMEOUT;
    case UCS_ERR_CANCELED:
        return DUET_ERR_CANCELED;
    case UCS_ERR_UNSUPPORTED:
        return DUET_ERR_UNSUPPORTED;
    default:
        return DUET_ERR_PEER;
    }
}

struct kvu_ctx {
    ucp_context_h ucp;
    ucp_worker_h worker;
    ucp_address_t *addr;
    size_t addr_len;
    bool cuda;
};

struct kvu_region {
    ucp_mem_h memh;
    void *rkey;
    size_t rkey_len;
};

struct kvu_peer {
    kvu_ctx *ctx;
    ucp_ep_h ep;
    ucp_rkey_h rkey;
    uint64_t base;
    int in_flight;
};

typedef struct get_op {
    kvu_peer *peer;
    kvu_done_fn done;
    void *arg;
} get_op;

duet_status kvu_create(kvu_ctx **ctx_p) {
    kvu_ctx *c = calloc(1, sizeof *c);
    if (!c) return DUET_ERR_NO_MEMORY;
    ucp_config_t *cfg;
    ucs_status_t s = ucp_config_read(NULL, NULL, &cfg);
    if (s != UCS_OK) {
        LOG_ERROR("ucx: reading configuration: %s", ucs_status_string(s));
        free(c);
        return from_ucs(s);
    }
    ucp_params_t p = {
        .field_mask = UCP_PARAM_FIELD_FEATURES,
        .features = UCP_FEATURE_RMA,
    };
    s = ucp_init(&p, cfg, &c->ucp);
    ucp_config_release(cfg);
    if (s != UCS_OK) {
        LOG_ERROR("ucx: ucp_init: %s", ucs_status_string(s));
        free(c);
        return from_ucs(s);
    }
    ucp_context_attr_t ca = {.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES};
    if (ucp_context_query(c->ucp, &ca) == UCS_OK)
        c->cuda = (ca.memory_types & UCS_BIT(UCS_MEMORY_TYPE_CUDA)) != 0;
    ucp_worker_params_t wp = {
        .field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE,
        .thread_mode = UCS_THREAD_MODE_SINGLE,
    };
    s = ucp_worker_create(c->ucp, &wp, &c->worker);
    if (s == UCS_OK) s = ucp_worker_get_address(c->worker, &c->addr, &c->addr_len);
    if (s != UCS_OK) {
        LOG_ERROR("ucx: creating the worker: %s", ucs_status_string(s));
        kvu_destroy(c);
        return from_ucs(s);
    }
    kvu_progress(c);
    *ctx_p = c;
    return DUET_OK;
}

void kvu_destroy(kvu_ctx *c) {
    if (!c) return;
    if (c->addr) ucp_worker_release_address(c->worker, c->addr);
    if (c->worker) ucp_worker_destroy(c->worker);
    if (c->ucp) ucp_cleanup(c->ucp);
    free(c);
}

unsigned kvu_progress(kvu_ctx *c) {
    unsigned total = 0, n;
    while ((n = ucp_worker_progress(c->worker)) != 0) total += n;
    return total;
}

void kvu_address(kvu_ctx *c, const void **addr_p, size_t *len_p) {
    *addr_p = c->addr;
    *len_p = c->addr_len;
}

bool kvu_supports_device_memory(kvu_ctx *c) {
    return c->cuda;
}

duet_status kvu_register(kvu_ctx *c, void *base, size_t len, bool on_device, kvu_region **reg_p) {
    if (on_device && !c->cuda) {
        LOG_ERROR("ucx: this UCX build cannot register device memory");
        return DUET_ERR_UNSUPPORTED;
    }
    kvu_region *r = calloc(1, sizeof *r);
    if (!r) return DUET_ERR_NO_MEMORY;
    ucp_mem_map_params_t mp = {
        .field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                      UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE,
        .address = base,
        .length = len,
        .memory_type = on_device ? UCS_MEMORY_TYPE_CUDA : UCS_MEMORY_TYPE_HOST,
    };
    ucs_status_t s = ucp_mem_map(c->ucp, &mp, &r->memh);
    if (s == UCS_OK) s = ucp_rkey_pack(c->ucp, r->memh, &r->rkey, &r->rkey_len);
    if (s != UCS_OK) {
        LOG_ERROR("ucx: registering %zu bytes of KV memory: %s", len, ucs_status_string(s));
        if (r->memh) ucp_mem_unmap(c->ucp, r->memh);
        free(r);
        return from_ucs(s);
    }
    *reg_p = r;
    return DUET_OK;
}

duet_status kvu_alloc(kvu_ctx *c, size_t len, void **ptr_p, kvu_region **reg_p) {
    kvu_region *r = calloc(1, sizeof *r);
    if (!r) return DUET_ERR_NO_MEMORY;
    ucp_mem_map_params_t mp = {
        .field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                      UCP_MEM_MAP_PARAM_FIELD_FLAGS,
        .address = NULL,
        .length = len,
        .flags = UCP_MEM_MAP_ALLOCATE,
    };
    ucs_status_t s = ucp_mem_map(c->ucp, &mp, &r->memh);
    ucp_mem_attr_t attr = {.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS};
    if (s == UCS_OK) s = ucp_mem_query(r->memh, &attr);
    if (s == UCS_OK) s = ucp_rkey_pack(c->ucp, r->memh, &r->rkey, &r->rkey_len);
    if (s != UCS_OK) {
        LOG_ERROR("ucx: allocating %zu bytes of KV staging: %s", len, ucs_status_string(s));
        if (r->memh) ucp_mem_unmap(c->ucp, r->memh);
        free(r);
        return from_ucs(s);
    }
    *ptr_p = attr.address;
    *reg_p = r;
    return DUET_OK;
}

void kvu_region_destroy(kvu_ctx *c, kvu_region *r) {
    if (!r) return;
    if (r->rkey) ucp_rkey_buffer_release(r->rkey);
    if (r->memh) ucp_mem_unmap(c->ucp, r->memh);
    free(r);
}

void kvu_region_rkey(kvu_region *r, const void **rkey_p, size_t *len_p) {
    *rkey_p = r->rkey;
    *len_p = r->rkey_len;
}

duet_status kvu_peer_create(kvu_ctx *c, const void *addr, size_t addr_len, const void *rkey,
                            size_t rkey_len, uint64_t remote_base, kvu_peer **peer_p) {
    (void)addr_len;
    (void)rkey_len;
    kvu_peer *p = calloc(1, sizeof *p);
    if (!p) return DUET_ERR_NO_MEMORY;
    p->ctx = c;
    p->base = remote_base;
    /* No UCX-level peer-failure handling: asking for it rules out the shared-memory transports
     * (they cannot report a dead peer), the fast path between workers on one host. A dead or
     * hung peer is caught by the side channel and the transfer deadline instead, which close
     * the endpoint forcibly and so complete every read still in flight. */
    ucp_ep_params_t ep = {
        .field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE,
        .address = addr,
        .err_mode = UCP_ERR_HANDLING_MODE_NONE,
    };
    ucs_status_t s = ucp_ep_create(c->worker, &ep, &p->ep);
    if (s == UCS_OK) s = ucp_ep_rkey_unpack(p->ep, rkey, &p->rkey);
    if (s != UCS_OK) {
        LOG_ERROR("ucx: connecting to a KV peer: %s", ucs_status_string(s));
        kvu_peer_destroy(c, p);
        return from_ucs(s);
    }
    *peer_p = p;
    return DUET_OK;
}

void kvu_peer_destroy(kvu_ctx *c, kvu_peer *p) {
    if (!p) return;
    if (p->rkey) ucp_rkey_destroy(p->rkey);
    if (p->ep) {
        ucp_request_param_t rp = {.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS,
                                  .flags = UCP_EP_CLOSE_FLAG_FORCE};
        ucs_status_ptr_t req = ucp_ep_close_nbx(p->ep, &rp);
        if (UCS_PTR_IS_PTR(req)) {
            while (ucp_request_check_status(req) == UCS_INPROGRESS) ucp_worker_progress(c->worker);
            ucp_request_free(req);
        }
    }
    /* a forced close completes the gets still in flight; wait for their callbacks */
    while (p->in_flight > 0) ucp_worker_progress(c->worker);
    free(p);
}

static void get_done(void *request, ucs_status_t status, void *user_data) {
    get_op *op = user_data;
    op->peer->in_flight--;
    op->done(op->arg, from_ucs(status));
    free(op);
    ucp_request_free(request);
}

duet_status kvu_get(kvu_peer *p, kvu_region *region, void *local, size_t len, uint64_t roff,
                    kvu_done_fn done, void *arg) {
    get_op *op = malloc(sizeof *op);
    if (!op) return DUET_ERR_NO_MEMORY;
    *op = (get_op){p, done, arg};
    ucp_request_param_t rp = {
        .op_attr_mask =
            UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_MEMH,
        .cb = {.send = get_done},
        .user_data = op,
        .memh = region->memh,
    };
    ucs_status_ptr_t req = ucp_get_nbx(p->ep, local, len, p->base + roff, p->rkey, &rp);
    if (UCS_PTR_IS_ERR(req)) {
        LOG_WARN("ucx: get of %zu bytes failed: %s", len, ucs_status_string(UCS_PTR_STATUS(req)));
        free(op);
        return from_ucs(UCS_PTR_STATUS(req));
    }
    if (req == NULL) { /* completed in place */
        done(arg, DUET_OK);
        free(op);
        return DUET_OK;
    }
    p->in_flight++;
    return DUET_OK;
}
