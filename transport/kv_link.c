/* The transfer thread both KV roles share; see kv_link.h. The thread owns the libuv loop, the
 * UCX worker and every handle the roles open; the main thread only creates, wakes and stops it.
 * UCX has no event fd here (kv_ucx.h says why): a 1 ms timer polls it while idle, and once a poll
 * finds work every loop turn polls until 50 ms pass without any. */
#include "kv_link.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "base/clock.h"
#include "base/log.h"
#include "model/model.h"

struct kvl_link {
    kvl_options opt;
    kvl_role role;
    srv_kv_context ctx;
    char secret[512];
    char model[256];
    char dtype[8];
    char engine_id[33];
    Duet__Kv__PoolInfo pool;

    uv_loop_t loop;
    bool loop_ready;
    uv_thread_t thread;
    bool thread_started;
    uv_async_t async;
    uv_timer_t ucx_tick; /* progresses the UCX worker every millisecond */
    uv_idle_t ucx_hot;   /* ... and on every loop turn while traffic flows */
    double hot_last;     /* when progress last found work */
    uv_timer_t tick;
    pthread_mutex_t mu;
    bool stopping;

    kvu_ctx *ucx;
    kvu_region *region; /* the pool, when read directly */
    be_backend *be;
    bool staged; /* reads and serves through the staging area, not the cache itself */
    uint8_t *stage_base;
    int stage_slots;
    uint8_t *stage_used; /* [stage_slots] */
    kvu_region *stage_reg;
    bool stage_pinned;
    uint8_t ipc_handle[BE_IPC_HANDLE_MAX];
    size_t ipc_len;
    char boot_id[64];
};

static duet_status parse_secret(const opt_spec *s, const char *v, char *err, size_t len) {
    if (strlen(v) >= 512) {
        snprintf(err, len, "at most 511 bytes");
        return DUET_ERR_INVALID;
    }
    *(const char **)s->dest = v;
    return DUET_OK;
}

duet_status kvl_options_add(opt_parser *p, kvl_options *o) {
    const opt_spec specs[] = {
        {.name = "--kv-secret",
         .type = OPT_CUSTOM,
         .parse = parse_secret,
         .dest = &o->secret,
         .metavar = "S",
         .env = "DUET_KV_SECRET",
         .help = "shared secret of the KV side channel (the same on every prefill and decode "
                 "worker)"},
        {.name = "--kv-staging",
         .type = OPT_CHOICE,
         .dest = &o->staging_mode,
         .def = "auto",
         .choices = "auto|on|off",
         .help = "move KV through a host staging area (auto: when the cache is in device "
                 "memory UCX cannot read; on: also for host caches, which lets same-host peers "
                 "use UCX's shared-memory reads)"},
        {.name = "--kv-staging-bytes",
         .type = OPT_SIZE,
         .dest = &o->staging_bytes,
         .def = "0",
         .help = "size of the staging area, where a prefill holds each staged lease whole "
                 "(0: room for one prompt of --max-model-len, at least 256M)"},
        {.name = "--kv-chunk-bytes",
         .type = OPT_SIZE,
         .dest = &o->chunk_bytes,
         .def = "16M",
         .help = "staged transfers move the KV in chunks of this size, each chunk's "
                 "device->host copy, network read and host->device copy overlapping the other "
                 "chunks' (rounded to whole blocks)"},
        {.name = "--kv-cuda-ipc",
         .type = OPT_FLAG,
         .dest = &o->cuda_ipc,
         .def = "true",
         .flags = OPT_NEGATABLE,
         .help = "between workers on one host with CUDA caches: the decode maps the prefill's "
                 "cache (CUDA IPC) and copies device to device, no UCX and no staging (both "
                 "sides need it; a cache that cannot be mapped falls back to UCX; "
                 "--no-kv-cuda-ipc: UCX, direct or staged, always)"},
        {.name = "--kv-chunks-in-flight",
         .type = OPT_INT,
         .dest = &o->chunks_in_flight,
         .def = "3",
         .min = 1,
         .max = KVL_MAX_CHUNKS_IN_FLIGHT,
         .help = "chunks one staged transfer keeps in flight (3: triple buffering)"},
    };
    return opt_add(p, "KV transfer", specs, (int)(sizeof specs / sizeof specs[0]));
}

/* ---- UCX progress ---- */

static void ucx_hot(uv_idle_t *h) {
    kvl_link *l = h->data;
    double t = clock_now_s();
    unsigned n = kvu_progress(l->ucx);
    if (l->role.progress && l->role.progress(l->role.arg)) n++;
    if (n)
        l->hot_last = t;
    else if (t - l->hot_last > 0.05)
        uv_idle_stop(&l->ucx_hot);
}

void kvl_ucx_heat(kvl_link *l) {
    l->hot_last = clock_now_s();
    if (!uv_is_active((uv_handle_t *)&l->ucx_hot)) uv_idle_start(&l->ucx_hot, ucx_hot);
}

static void ucx_tick(uv_timer_t *t) {
    kvl_link *l = t->data;
    unsigned n = kvu_progress(l->ucx);
    if (l->role.progress && l->role.progress(l->role.arg)) n++;
    if (n) kvl_ucx_heat(l);
}

/* ---- the side channel ---- */

typedef struct write_req {
    uv_write_t w;
    uint8_t *buf;
} write_req;

static void write_done(uv_write_t *w, int status) {
    (void)status; /* a failed write shows up as a read error / close on the same stream */
    write_req *wr = (write_req *)w;
    free(wr->buf);
    free(wr);
}

duet_status kvl_send(uv_tcp_t *tcp, const Duet__Kv__Envelope *env) {
    uint8_t *buf;
    size_t len;
    duet_status st = kvw_encode(env, &buf, &len);
    if (st != DUET_OK) return st;
    write_req *wr = malloc(sizeof *wr);
    if (!wr) {
        free(buf);
        return DUET_ERR_NO_MEMORY;
    }
    wr->buf = buf;
    uv_buf_t b = uv_buf_init((char *)buf, (unsigned)len);
    int rc = uv_write(&wr->w, (uv_stream_t *)tcp, &b, 1, write_done);
    if (rc != 0) {
        free(buf);
        free(wr);
        return DUET_ERR_IO;
    }
    return DUET_OK;
}

void kvl_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    (void)h;
    buf->base = malloc(suggested);
    buf->len = buf->base ? suggested : 0;
}

/* ---- staging ---- */

int kvl_stage_alloc(kvl_link *l, int n, int32_t *out) {
    if (n > l->stage_slots) return -2;
    int run = 0, n_free = 0;
    for (int i = 0; i < l->stage_slots; i++) {
        run = l->stage_used[i] ? 0 : run + 1;
        n_free += !l->stage_used[i];
        if (run == n) {
            for (int k = 0; k < n; k++) {
                out[k] = i - n + 1 + k;
                l->stage_used[out[k]] = 1;
            }
            return 0;
        }
    }
    if (n_free < n) return -1;
    for (int i = 0, k = 0; k < n; i++)
        if (!l->stage_used[i]) {
            l->stage_used[i] = 1;
            out[k++] = i;
        }
    return 0;
}

int kvl_stage_alloc_run(kvl_link *l, int n) {
    if (n < 1 || n > l->stage_slots) return -2;
    for (int i = 0, run = 0; i < l->stage_slots; i++) {
        run = l->stage_used[i] ? 0 : run + 1;
        if (run == n) {
            memset(l->stage_used + i - n + 1, 1, (size_t)n);
            return i - n + 1;
        }
    }
    return -1;
}

void kvl_stage_free(kvl_link *l, const int32_t *slots, int n) {
    for (int i = 0; i < n; i++)
        if (slots[i] >= 0 && slots[i] < l->stage_slots) l->stage_used[slots[i]] = 0;
}

duet_status kvl_stage_copy(kvl_link *l, const int32_t *blocks, const int32_t *slots, int n,
                           bool to_host) {
    for (int i = 0; i < n;) {
        int k = i + 1;
        while (k < n && slots[k] == slots[k - 1] + 1) k++;
        void *ticket = NULL;
        duet_status st = kvl_stage_copy_start(l, blocks + i, slots[i], k - i, to_host, &ticket);
        if (st == DUET_OK) st = kvl_copy_poll(l, ticket, true);
        if (st != DUET_OK) return st;
        i = k;
    }
    return DUET_OK;
}

duet_status kvl_stage_copy_start(kvl_link *l, const int32_t *blocks, int slot0, int n, bool to_host,
                                 void **ticket_p) {
    if (slot0 < 0 || n < 0 || slot0 + n > l->stage_slots) return DUET_ERR_INVALID;
    uint8_t *h = l->stage_base + (size_t)slot0 * l->ctx.kv->block_bytes;
    return be_kv_copy_start(l->be, l->ctx.kv, blocks, n, h, to_host, ticket_p);
}

duet_status kvl_copy_poll(kvl_link *l, void *ticket, bool wait) {
    return be_kv_copy_poll(l->be, ticket, wait);
}

int kvl_chunk_blocks(const kvl_link *l) {
    long long per = l->opt.chunk_bytes / (long long)l->ctx.kv->block_bytes;
    long long cap = l->stage_slots / kvl_chunks_in_flight(l);
    if (per > cap) per = cap;
    return per < 1 ? 1 : (int)per;
}

int kvl_chunks_in_flight(const kvl_link *l) {
    int n = l->opt.chunks_in_flight;
    return n < 1 ? 1 : n > KVL_MAX_CHUNKS_IN_FLIGHT ? KVL_MAX_CHUNKS_IN_FLIGHT : n;
}

/* ---- same-host device copies (CUDA IPC) ---- */

static void ipc_setup(kvl_link *l) {
    FILE *f = fopen("/proc/sys/kernel/random/boot_id", "r");
    if (f) {
        if (!fgets(l->boot_id, sizeof l->boot_id, f)) l->boot_id[0] = 0;
        l->boot_id[strcspn(l->boot_id, "\n")] = 0;
        fclose(f);
    }
    if (kvl_ipc_usable(l) && l->boot_id[0] && l->ctx.role == SRV_ROLE_DECODE) {
        LOG_INFO("kv: KV path from prefill workers on this host that offer it: CUDA IPC, device "
                 "to device (--kv-cuda-ipc)");
        return;
    }
    if (!kvl_ipc_usable(l) || !l->boot_id[0]) {
        /* on by default: a host cache (the CPU backend) declines without a word */
        if (l->opt.cuda_ipc && l->ctx.kv->on_device)
            LOG_INFO("kv: --kv-cuda-ipc: not offered (%s)",
                     !l->ctx.kv->on_device ? "the cache is in host memory"
                     : !l->boot_id[0]      ? "no boot id"
                                           : "the backend has no IPC");
        return;
    }
    if (l->be->ops->ipc_export(l->be, l->ctx.kv, l->ipc_handle, &l->ipc_len) != DUET_OK) {
        l->ipc_len = 0;
        LOG_WARN("kv: --kv-cuda-ipc: the cache cannot be exported; peers use UCX");
        return;
    }
    LOG_INFO("kv: KV path for readers on this host: CUDA IPC, device to device (--kv-cuda-ipc)");
}

void kvl_ipc_handle(const kvl_link *l, const void **handle_p, size_t *len_p) {
    *handle_p = l->ipc_handle;
    *len_p = l->ipc_len;
}

const char *kvl_boot_id(const kvl_link *l) {
    return l->boot_id;
}

bool kvl_ipc_usable(const kvl_link *l) {
    const be_ops *o = l->be->ops;
    return l->opt.cuda_ipc && l->ctx.kv->on_device && o->ipc_export && o->ipc_open &&
           o->ipc_close && o->kv_copy_device_start && o->kv_copy_poll;
}

duet_status kvl_ipc_open(kvl_link *l, const void *handle, size_t len, void **ptr_p) {
    if (!kvl_ipc_usable(l)) return DUET_ERR_UNSUPPORTED;
    return l->be->ops->ipc_open(l->be, handle, len, ptr_p);
}

void kvl_ipc_close(kvl_link *l, void *ptr) {
    if (ptr) l->be->ops->ipc_close(l->be, ptr);
}

duet_status kvl_ipc_copy_start(kvl_link *l, const int32_t *blocks, int n, const void *src,
                               const uint32_t *src_blocks, void **ticket_p) {
    for (int i = 0; i < n; i++)
        if (blocks[i] < 0 || blocks[i] >= l->ctx.kv->n_blocks) return DUET_ERR_INVALID;
    return l->be->ops->kv_copy_device_start(l->be, l->ctx.kv, blocks, n, src, src_blocks, ticket_p);
}

/* ---- the thread ---- */

static void on_tick(uv_timer_t *t) {
    kvl_link *l = t->data;
    if (l->role.tick) l->role.tick(l->role.arg, clock_now_s());
}

static void on_async(uv_async_t *a) {
    kvl_link *l = a->data;
    pthread_mutex_lock(&l->mu);
    bool stop = l->stopping;
    pthread_mutex_unlock(&l->mu);
    if (stop) {
        if (l->role.close) l->role.close(l->role.arg);
        uv_close((uv_handle_t *)&l->async, NULL);
        uv_close((uv_handle_t *)&l->ucx_tick, NULL);
        uv_close((uv_handle_t *)&l->ucx_hot, NULL);
        uv_close((uv_handle_t *)&l->tick, NULL);
        return;
    }
    if (l->role.woken) l->role.woken(l->role.arg);
}

/* Runs until every handle is closed (and pending resolutions have returned). */
static void thread_main(void *arg) {
    kvl_link *l = arg;
    uv_run(&l->loop, UV_RUN_DEFAULT);
}

size_t kvl_staging_blocks(long long asked, int max_model_len, int block_size, size_t block_bytes,
                          int n_blocks, bool *short_p) {
    size_t lease = max_model_len > 0 && block_size > 0
                       ? ((size_t)max_model_len + (size_t)block_size - 1) / (size_t)block_size
                       : 0;
    size_t slots;
    if (asked > 0) {
        slots = block_bytes ? (size_t)asked / block_bytes : 0;
    } else {
        slots = block_bytes ? (size_t)KVL_STAGING_MIN / block_bytes : 0;
        if (slots < lease) slots = lease;
    }
    if (n_blocks > 0 && slots > (size_t)n_blocks) slots = (size_t)n_blocks;
    if (slots < 1) slots = 1;
    /* short only where the pool itself could hold such a lease */
    *short_p = slots < lease && (n_blocks <= 0 || slots < (size_t)n_blocks);
    return slots;
}

static duet_status setup_memory(kvl_link *l) {
    be_kv *kv = l->ctx.kv;
    bool direct = !kv->on_device || kvu_supports_device_memory(l->ucx);
    l->staged =
        l->opt.staging_mode == KVL_STAGE_ON || (l->opt.staging_mode == KVL_STAGE_AUTO && !direct);
    if (!l->staged && !direct) {
        LOG_ERROR("kv: the KV cache is in device memory, this UCX build cannot read it and "
                  "--kv-staging is off");
        return DUET_ERR_UNSUPPORTED;
    }
    if (!l->staged) {
        duet_status st = kvu_register(l->ucx, kv->data, kv->block_bytes * (size_t)kv->n_blocks,
                                      kv->on_device, &l->region);
        if (st == DUET_OK)
            LOG_INFO("kv: KV path: direct, UCX reads and writes the %s cache itself (no staging)%s",
                     kv->on_device ? "device-memory" : "host-memory",
                     kv->on_device ? "; UCX reports CUDA memory support" : "");
        return st;
    }
    /* a prefill holds staged leases whole; a decode stages chunks in flight only */
    bool too_short = false;
    int lease_len = l->ctx.role == SRV_ROLE_PREFILL ? l->ctx.max_model_len : 0;
    size_t slots = kvl_staging_blocks(l->opt.staging_bytes, lease_len, kv->block_size,
                                      kv->block_bytes, kv->n_blocks, &too_short);
    if (too_short)
        LOG_WARN("kv: --kv-staging-bytes %lld holds %zu blocks, fewer than one prompt of "
                 "--max-model-len %d: longer prompts' leases are refused on the staged path",
                 l->opt.staging_bytes, slots, l->ctx.max_model_len);
    l->stage_slots = (int)slots;
    l->stage_used = calloc(slots, 1);
    void *base = NULL;
    duet_status st = l->stage_used
                         ? kvu_alloc(l->ucx, slots * kv->block_bytes, &base, &l->stage_reg)
                         : DUET_ERR_NO_MEMORY;
    if (st != DUET_OK) return st;
    l->stage_base = base;
    if (l->be->ops->host_pin &&
        l->be->ops->host_pin(l->be, base, slots * kv->block_bytes) == DUET_OK)
        l->stage_pinned = true;
    LOG_INFO("kv: KV path: staged (%s), a %zu MiB host staging area (%zu blocks)%s, chunks of "
             "%d blocks, %d in flight",
             l->opt.staging_mode == KVL_STAGE_ON ? "--kv-staging on"
             : kv->on_device                     ? "this UCX build reports no CUDA memory support"
                                                 : "host cache",
             (slots * kv->block_bytes) >> 20, slots, l->stage_pinned ? ", page-locked" : "",
             kvl_chunk_blocks(l), kvl_chunks_in_flight(l));
    return DUET_OK;
}

duet_status kvl_create(const kvl_options *o, const srv_kv_context *ctx, const kvl_role *role,
                       kvl_link **l_p) {
    kvl_link *l = calloc(1, sizeof *l);
    if (!l) return DUET_ERR_NO_MEMORY;
    l->opt = *o;
    l->role = *role;
    l->ctx = *ctx;
    pthread_mutex_init(&l->mu, NULL);
    duet__kv__pool_info__init(&l->pool);
    snprintf(l->model, sizeof l->model, "%s", ctx->served_model_name ? ctx->served_model_name : "");
    if (o->secret) snprintf(l->secret, sizeof l->secret, "%s", o->secret);
    if (!l->secret[0])
        LOG_WARN("kv: no --kv-secret (or DUET_KV_SECRET): the KV side channel accepts any peer "
                 "that can reach it; set one shared secret on every prefill and decode worker");
    be_kv *kv = ctx->kv;
    snprintf(l->dtype, sizeof l->dtype, "%s", dt_name(kv->dtype));
    l->pool.block_size = (uint32_t)kv->block_size;
    l->pool.n_layers = (uint32_t)kv->n_layers;
    l->pool.kv_dim = (uint32_t)kv->kv_dim;
    l->pool.dtype = l->dtype;
    l->pool.block_bytes = kv->block_bytes;
    l->pool.n_blocks = (uint32_t)kv->n_blocks;
    l->pool.model = l->model;
    uint8_t rnd[KVW_NONCE_LEN];
    duet_status st = kvw_nonce(rnd);
    for (int i = 0; st == DUET_OK && i < 16; i++) snprintf(l->engine_id + 2 * i, 3, "%02x", rnd[i]);
    l->be = mdl_backend(par_model(ctx->inst));
    if (st == DUET_OK) st = kvu_create(&l->ucx);
    if (st == DUET_OK) st = setup_memory(l);
    if (st == DUET_OK) ipc_setup(l);
    if (st == DUET_OK && uv_loop_init(&l->loop) != 0) st = DUET_ERR_INTERNAL;
    if (st != DUET_OK) {
        kvl_destroy(l);
        return st;
    }
    l->loop_ready = true;
    uv_async_init(&l->loop, &l->async, on_async);
    l->async.data = l;
    uv_timer_init(&l->loop, &l->ucx_tick);
    l->ucx_tick.data = l;
    uv_timer_start(&l->ucx_tick, ucx_tick, 1, 1);
    uv_idle_init(&l->loop, &l->ucx_hot);
    l->ucx_hot.data = l;
    uv_timer_init(&l->loop, &l->tick);
    l->tick.data = l;
    uv_timer_start(&l->tick, on_tick, 5, 5);
    if (role->open) st = role->open(role->arg, l);
    if (st == DUET_OK && uv_thread_create(&l->thread, thread_main, l) != 0) st = DUET_ERR_INTERNAL;
    if (st != DUET_OK) {
        /* the thread never ran: close the handles here, on the loop they belong to */
        l->stopping = true;
        on_async(&l->async);
        uv_run(&l->loop, UV_RUN_DEFAULT);
        kvl_destroy(l);
        return st;
    }
    l->thread_started = true;
    *l_p = l;
    return DUET_OK;
}

void kvl_wake(kvl_link *l) {
    uv_async_send(&l->async);
}

bool kvl_stopping(kvl_link *l) {
    pthread_mutex_lock(&l->mu);
    bool s = l->stopping;
    pthread_mutex_unlock(&l->mu);
    return s;
}

void kvl_stop(kvl_link *l) {
    if (!l || !l->thread_started) return;
    pthread_mutex_lock(&l->mu);
    l->stopping = true;
    pthread_mutex_unlock(&l->mu);
    uv_async_send(&l->async);
    uv_thread_join(&l->thread);
    l->thread_started = false;
    /* the backend goes with the engine, right after this: nothing of it may be used later */
    if (l->stage_pinned) l->be->ops->host_unpin(l->be, l->stage_base);
    l->stage_pinned = false;
}

void kvl_destroy(kvl_link *l) {
    if (!l) return;
    kvl_stop(l);
    if (l->loop_ready) uv_loop_close(&l->loop);
    if (l->stage_pinned) l->be->ops->host_unpin(l->be, l->stage_base);
    kvu_region_destroy(l->ucx, l->stage_reg); /* unmapping frees UCX-allocated memory */
    free(l->stage_used);
    kvu_region_destroy(l->ucx, l->region);
    kvu_destroy(l->ucx);
    pthread_mutex_destroy(&l->mu);
    free(l);
}

uv_loop_t *kvl_loop(kvl_link *l) {
    return &l->loop;
}
const srv_kv_context *kvl_context(const kvl_link *l) {
    return &l->ctx;
}
kvu_ctx *kvl_ucx(kvl_link *l) {
    return l->ucx;
}
const char *kvl_secret(const kvl_link *l) {
    return l->secret;
}
const char *kvl_engine_id(const kvl_link *l) {
    return l->engine_id;
}
const Duet__Kv__PoolInfo *kvl_pool(const kvl_link *l) {
    return &l->pool;
}
bool kvl_staged(const kvl_link *l) {
    return l->staged;
}
kvu_region *kvl_region(kvl_link *l) {
    return l->staged ? l->stage_reg : l->region;
}

uint8_t *kvl_base(kvl_link *l) {
    return l->staged ? l->stage_base : (uint8_t *)l->ctx.kv->data;
}

int kvl_n_slots(const kvl_link *l) {
    return l->staged ? l->stage_slots : l->ctx.kv->n_blocks;
}
