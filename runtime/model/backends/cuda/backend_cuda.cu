/* The CUDA backend: the ops table of backend.h on one GPU. This file holds the object, memory
 * (activations, weights, KV cache, scratch), host transfers and the batch; the ops live in
 * gemm.cu, kernels.cu, mla.cu, moe.cu and sample.cu. All work is ordered on one stream; only
 * the calls that return host data or a status wait for it. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "model/backends/cuda/cuda-impl.cuh"

extern "C" {
#include "model/backends/cuda/backend_cuda.h"
#include "dist/comm.h"
}

/* ---- device memory the backend holds (cuda-impl.cuh) ----
 * An open-addressing table of live allocations (address -> bytes, device), so a free knows
 * what it gives back, and one counter per device. Calls inside this block name the CUDA
 * functions in parentheses, past the counting macros. */

enum { MEM_MAX_DEVICES = 64 };
typedef struct mem_rec {
    uintptr_t p; /* 0: empty */
    size_t bytes;
    int device;
} mem_rec;
static pthread_mutex_t g_mem_lock = PTHREAD_MUTEX_INITIALIZER;
static mem_rec *g_mem_tab;
static size_t g_mem_cap, g_mem_n; /* capacity a power of two, at most half full */
static long long g_mem_bytes[MEM_MAX_DEVICES];

static size_t mem_home(uintptr_t p, size_t cap) {
    uint64_t h = (uint64_t)p * 0x9E3779B97F4A7C15ull;
    return (size_t)(h ^ (h >> 29)) & (cap - 1);
}

static void mem_put(mem_rec *tab, size_t cap, mem_rec r) {
    size_t i = mem_home(r.p, cap);
    while (tab[i].p) i = (i + 1) & (cap - 1);
    tab[i] = r;
}

/* Room for one more record; false when the host is out of memory. Under g_mem_lock. */
static bool mem_reserve(void) {
    if ((g_mem_n + 1) * 2 <= g_mem_cap) return true;
    size_t cap = g_mem_cap ? g_mem_cap * 2 : 1024;
    mem_rec *tab = (mem_rec *)calloc(cap, sizeof *tab);
    if (!tab) return false;
    for (size_t i = 0; i < g_mem_cap; i++)
        if (g_mem_tab[i].p) mem_put(tab, cap, g_mem_tab[i]);
    free(g_mem_tab);
    g_mem_tab = tab;
    g_mem_cap = cap;
    return true;
}

/* Removes p's record into *r_p; false when p was not allocated here. Under g_mem_lock.
 * Later records of the same probe run move back into the hole (no tombstones). */
static bool mem_take(uintptr_t p, mem_rec *r_p) {
    if (!g_mem_cap) return false;
    size_t mask = g_mem_cap - 1, i = mem_home(p, g_mem_cap);
    while (g_mem_tab[i].p != p) {
        if (!g_mem_tab[i].p) return false;
        i = (i + 1) & mask;
    }
    *r_p = g_mem_tab[i];
    for (size_t j = (i + 1) & mask; g_mem_tab[j].p; j = (j + 1) & mask) {
        size_t k = mem_home(g_mem_tab[j].p, g_mem_cap);
        /* j's record may fill the hole at i when its home is not in (i, j] (cyclically) */
        bool stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
        if (stays) continue;
        g_mem_tab[i] = g_mem_tab[j];
        i = j;
    }
    g_mem_tab[i].p = 0;
    g_mem_n--;
    return true;
}

/* What an allocation of bytes takes of the device: from 1 MiB on the driver hands out whole
 * 2 MiB pages; smaller ones share pages, 512-byte aligned. Per-expert weights of a few MiB each
 * would otherwise be undercounted by up to a page apiece (memplan_check compares the count with
 * the device's readings). */
static size_t mem_taken(size_t bytes) {
    const size_t page = 2u << 20, small = 512;
    if (bytes >= (1u << 20)) return (bytes + page - 1) / page * page;
    return (bytes + small - 1) / small * small;
}

cudaError_t cuda_counted_malloc(void **p, size_t bytes) {
    int device = 0;
    cudaError_t e = (cudaGetDevice)(&device);
    if (e != cudaSuccess) return e;
    e = (cudaMalloc)(p, bytes);
    if (e != cudaSuccess) return e;
    pthread_mutex_lock(&g_mem_lock);
    bool ok = device >= 0 && device < MEM_MAX_DEVICES && mem_reserve();
    if (ok) {
        size_t taken = mem_taken(bytes);
        mem_put(g_mem_tab, g_mem_cap, (mem_rec){(uintptr_t)*p, taken, device});
        g_mem_n++;
        g_mem_bytes[device] += (long long)taken;
    }
    pthread_mutex_unlock(&g_mem_lock);
    if (!ok) {
        /* an allocation the count cannot hold would make the plan undercount: refuse it */
        (cudaFree)(*p);
        *p = NULL;
        return cudaErrorMemoryAllocation;
    }
    return cudaSuccess;
}

cudaError_t cuda_counted_free(void *p) {
    if (p) {
        mem_rec r;
        pthread_mutex_lock(&g_mem_lock);
        if (mem_take((uintptr_t)p, &r)) g_mem_bytes[r.device] -= (long long)r.bytes;
        pthread_mutex_unlock(&g_mem_lock);
    }
    return (cudaFree)(p);
}

long long cuda_counted_bytes(int device) {
    if (device < 0 || device >= MEM_MAX_DEVICES) return 0;
    pthread_mutex_lock(&g_mem_lock);
    long long n = g_mem_bytes[device];
    pthread_mutex_unlock(&g_mem_lock);
    return n;
}

duet_status cuda_status(cuda_backend *c, cudaError_t e, const char *what, const char *file,
                        int line) {
    if (e == cudaSuccess) return DUET_OK;
    duet_status st = e == cudaErrorMemoryAllocation ? DUET_ERR_NO_MEMORY : DUET_ERR_DEVICE;
    if (c && c->err != DUET_OK) return c->err; /* logged when first seen */
    LOG_ERROR("cuda: %s failed at %s:%d: %s (%s)", what, file, line, cudaGetErrorName(e),
              cudaGetErrorString(e));
    if (st == DUET_ERR_NO_MEMORY) {
        (void)cudaGetLastError(); /* not sticky for CUDA either: clear it */
        return st;
    }
    if (c) c->err = st;
    return st;
}

duet_status cublas_status(cuda_backend *c, cublasStatus_t e, const char *what, const char *file,
                          int line) {
    if (e == CUBLAS_STATUS_SUCCESS) return DUET_OK;
    if (c && c->err != DUET_OK) return c->err;
    LOG_ERROR("cublas: %s failed at %s:%d: %s (%s)", what, file, line, cublasGetStatusName(e),
              cublasGetStatusString(e));
    duet_status st = e == CUBLAS_STATUS_ALLOC_FAILED ? DUET_ERR_NO_MEMORY : DUET_ERR_DEVICE;
    if (c) c->err = st;
    return st;
}

void *cuda_scratch(cuda_backend *c, int which, size_t bytes) {
    if (bytes <= c->scr_bytes[which]) return c->scr[which];
    if (c->capturing) {
        /* a recorded op must find its memory in place: the caller runs the step eagerly
         * once before recording it */
        LOG_WARN("cuda: scratch %d would grow to %zu bytes while recording a step", which, bytes);
        if (c->err == DUET_OK) c->err = DUET_ERR_INTERNAL;
        return NULL;
    }
    c->mem_gen++; /* recordings that refer to the old area are void */
    /* work queued on the stream may still read the old area */
    if (CUDA_CHECK(c, cudaStreamSynchronize(c->stream)) != DUET_OK) return NULL;
    CUDA_CHECK(c, cudaFree(c->scr[which]));
    c->scr[which] = NULL;
    c->scr_bytes[which] = 0;
    size_t want = bytes + bytes / 2; /* headroom: fewer regrowths while sizes creep up */
    if (CUDA_CHECK(c, cudaMalloc(&c->scr[which], want)) != DUET_OK) {
        c->scr[which] = NULL;
        if (c->err == DUET_OK) c->err = DUET_ERR_NO_MEMORY; /* the op cannot run */
        return NULL;
    }
    c->scr_bytes[which] = want;
    return c->scr[which];
}

int32_t *cuda_upload_idx(cuda_backend *c, const int32_t *src, size_t n) {
    int32_t *d = (int32_t *)cuda_scratch(c, SCR_IDX, (n ? n : 1) * sizeof(int32_t));
    if (!d) return NULL;
    /* from pageable memory the copy is staged before the call returns: src may change after */
    if (n && CUDA_CHECK(c, cudaMemcpyAsync(d, src, n * sizeof(int32_t), cudaMemcpyHostToDevice,
                                           c->stream)) != DUET_OK)
        return NULL;
    return d;
}

void *cuda_host_tmp(cuda_backend *c, size_t bytes) {
    if (bytes <= c->host_tmp_bytes) return c->host_tmp;
    free(c->host_tmp);
    c->host_tmp = malloc(bytes);
    c->host_tmp_bytes = c->host_tmp ? bytes : 0;
    if (!c->host_tmp && c->err == DUET_OK) {
        LOG_ERROR("cuda: cannot allocate %zu bytes of host staging", bytes);
        c->err = DUET_ERR_NO_MEMORY;
    }
    return c->host_tmp;
}

/* ---- recorded steps (CUDA graphs) ---- */

struct cuda_graph_rec {
    uint64_t key, gen;
    cudaGraphExec_t exec;
};

static void graph_drop(cuda_graph_rec *g) {
    if (g->exec) cudaGraphExecDestroy(g->exec);
    g->exec = NULL;
}

static cuda_graph_rec *graph_find(cuda_backend *c, uint64_t key) {
    for (int i = 0; i < c->n_graphs; i++)
        if (c->graphs[i].key == key) return &c->graphs[i];
    return NULL;
}

static duet_status cuda_graph_begin(be_backend *be) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return c->err;
    if (c->capturing) return DUET_ERR_INTERNAL;
    /* thread-local: the KV transfer thread's copies on other streams stay legal meanwhile */
    duet_status st =
        CUDA_CHECK(c, cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal));
    if (st == DUET_OK) c->capturing = true;
    return st;
}

static duet_status cuda_graph_end(be_backend *be, uint64_t key) {
    cuda_backend *c = cuda_be(be);
    if (!c->capturing) return DUET_ERR_INTERNAL;
    c->capturing = false;
    cudaGraph_t graph = NULL;
    cudaError_t e = cudaStreamEndCapture(c->stream, &graph);
    cudaGraphExec_t exec = NULL;
    if (e == cudaSuccess && c->err == DUET_OK) e = cudaGraphInstantiate(&exec, graph, 0);
    if (graph) cudaGraphDestroy(graph);
    if (e != cudaSuccess || c->err != DUET_OK) {
        /* an op that cannot be recorded: the step runs eagerly, the backend stays usable */
        LOG_WARN("cuda: recording a step as a graph failed (%s); running it eagerly",
                 e != cudaSuccess ? cudaGetErrorString(e) : duet_strerror(c->err));
        if (exec) cudaGraphExecDestroy(exec);
        (void)cudaGetLastError();
        c->err = DUET_OK;
        return DUET_ERR_UNSUPPORTED;
    }
    cuda_graph_rec *g = graph_find(c, key);
    if (!g) {
        if (c->n_graphs == c->cap_graphs) {
            int cap = c->cap_graphs ? 2 * c->cap_graphs : 16;
            cuda_graph_rec *ng = (cuda_graph_rec *)realloc(c->graphs, (size_t)cap * sizeof *ng);
            if (!ng) {
                cudaGraphExecDestroy(exec);
                return DUET_ERR_NO_MEMORY;
            }
            c->graphs = ng;
            c->cap_graphs = cap;
        }
        g = &c->graphs[c->n_graphs++];
        g->exec = NULL;
    }
    graph_drop(g);
    g->key = key;
    g->gen = c->mem_gen;
    g->exec = exec;
    return DUET_OK;
}

static bool cuda_graph_ready(be_backend *be, uint64_t key) {
    cuda_backend *c = cuda_be(be);
    cuda_graph_rec *g = graph_find(c, key);
    return g && g->exec && g->gen == c->mem_gen;
}

static duet_status cuda_graph_launch(be_backend *be, uint64_t key) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return c->err;
    cuda_graph_rec *g = graph_find(c, key);
    if (!g || !g->exec || g->gen != c->mem_gen) return DUET_ERR_NOT_FOUND;
    return CUDA_CHECK(c, cudaGraphLaunch(g->exec, c->stream));
}

static void cuda_destroy(be_backend *be) {
    cuda_backend *c = cuda_be(be);
    cudaSetDevice(c->device);
    cudaStreamSynchronize(c->stream);
    for (int i = 0; i < c->n_graphs; i++) graph_drop(&c->graphs[i]);
    free(c->graphs);
    cudaFree(c->blas_ws);
    for (int i = 0; i < SCR_COUNT; i++) cudaFree(c->scr[i]);
    cuda_moe_cleanup(c);
    for (int i = 0; i < CUDA_MAX_MARKS; i++)
        if (c->mark_ev[i]) cudaEventDestroy(c->mark_ev[i]);
    cudaFree(c->d_batch);
    cudaFree(c->d_inv_freq);
    cudaFree(c->kv_shadow);
    if (c->blas) cublasDestroy(c->blas);
    if (c->lt) cublasLtDestroy(c->lt);
    if (c->stream) cudaStreamDestroy(c->stream);
    for (int i = 0; i < 2; i++)
        if (c->xfer[i]) cudaStreamDestroy(c->xfer[i]);
    free(c->h_batch);
    free(c->host_tmp);
    if (c->wstage_pinned)
        cudaFreeHost(c->wstage);
    else
        free(c->wstage);
    free(c->mla);
    free(c);
}

static void *cuda_buf_alloc(be_backend *be, size_t n) {
    cuda_backend *c = cuda_be(be);
    void *p = NULL;
    if (CUDA_CHECK(c, cudaMalloc(&p, (n ? n : 1) * act_size(c))) != DUET_OK) return NULL;
    return p;
}

static void cuda_buf_free(be_backend *be, void *buf) {
    cuda_backend *c = cuda_be(be);
    if (!buf) return;
    /* cudaFree waits for the device; the stream's work on buf is done by then */
    CUDA_CHECK(c, cudaFree(buf));
}

static duet_status cuda_upload(be_backend *be, void *dst, size_t off, const float *src, size_t n) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return c->err;
    if (n == 0) return DUET_OK;
    char *d = (char *)dst + off * act_size(c);
    if (c->act == DT_F32)
        return CUDA_CHECK(
            c, cudaMemcpyAsync(d, src, n * sizeof(float), cudaMemcpyHostToDevice, c->stream));
    float *stage = (float *)cuda_scratch(c, SCR_XFER, n * sizeof(float));
    if (!stage) return c->err;
    duet_status st = CUDA_CHECK(
        c, cudaMemcpyAsync(stage, src, n * sizeof(float), cudaMemcpyHostToDevice, c->stream));
    if (st == DUET_OK) cuda_f32_to_act(c, d, stage, n);
    return c->err;
}

static duet_status cuda_download(be_backend *be, float *dst, const void *src, size_t off,
                                 size_t n) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return c->err;
    if (n == 0) return DUET_OK;
    const char *s = (const char *)src + off * act_size(c);
    const float *from = (const float *)s;
    if (c->act != DT_F32) {
        float *stage = (float *)cuda_scratch(c, SCR_XFER, n * sizeof(float));
        if (!stage) return c->err;
        cuda_act_to_f32(c, stage, s, n);
        from = stage;
    }
    duet_status st = CUDA_CHECK(
        c, cudaMemcpyAsync(dst, from, n * sizeof(float), cudaMemcpyDeviceToHost, c->stream));
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaStreamSynchronize(c->stream));
    return st != DUET_OK ? st : c->err;
}

static duet_status cuda_sync(be_backend *be) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return c->err;
    return CUDA_CHECK(c, cudaStreamSynchronize(c->stream));
}

/* Weight uploads go through one host staging area of at most this many bytes, a chunk at a
 * time: big enough that each copy runs at the link's speed, small enough to page-lock on every
 * rank of a host (a V3 embedding is 1.8 GB in bf16). */
#define WSTAGE_MAX ((size_t)64 << 20)

/* The weight staging area of at least bytes (<= WSTAGE_MAX), or NULL (out of host memory).
 * Grown at least twofold each time, so weights of slowly growing sizes page-lock few times. */
static void *weight_stage(cuda_backend *c, size_t bytes) {
    if (bytes <= c->wstage_bytes) return c->wstage;
    if (bytes < 2 * c->wstage_bytes) bytes = 2 * c->wstage_bytes;
    if (bytes > WSTAGE_MAX) bytes = WSTAGE_MAX;
    if (c->wstage_pinned)
        cudaFreeHost(c->wstage);
    else
        free(c->wstage);
    c->wstage = NULL;
    c->wstage_bytes = 0;
    c->wstage_pinned = cudaHostAlloc(&c->wstage, bytes, cudaHostAllocDefault) == cudaSuccess;
    if (!c->wstage_pinned) {
        (void)cudaGetLastError(); /* not sticky: pageable memory does the same, slower */
        c->wstage = malloc(bytes);
        LOG_WARN("cuda backend: cannot page-lock %zu bytes of host staging; weights are "
                 "copied from pageable memory",
                 bytes);
    }
    c->wstage_bytes = c->wstage ? bytes : 0;
    if (!c->wstage) LOG_ERROR("cuda backend: cannot allocate %zu bytes of host staging", bytes);
    return c->wstage;
}

static duet_status cuda_weight_create(be_backend *be, const float *w, int n_out, int n_in,
                                      bool keep_f32, be_weight **w_p) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return c->err;
    size_t n = (size_t)n_out * (size_t)n_in;
    dt_dtype t = keep_f32 ? DT_F32 : c->act;
    size_t es = dt_size(t), bytes = n * es;
    be_weight *bw = (be_weight *)calloc(1, sizeof *bw);
    if (!bw) return DUET_ERR_NO_MEMORY;
    duet_status st = CUDA_CHECK(c, cudaMalloc(&bw->w, bytes ? bytes : 1));
    /* chunks of whole elements through the staging area: converted there (bf16: nearest even,
     * as torch's .to(bfloat16)), then a synchronous copy, so the area and the loader's buffer
     * are free again when the call returns */
    size_t chunk = bytes < WSTAGE_MAX ? bytes : WSTAGE_MAX;
    void *stage = st == DUET_OK && bytes ? weight_stage(c, chunk) : NULL;
    if (st == DUET_OK && bytes && !stage) st = DUET_ERR_NO_MEMORY;
    for (size_t i0 = 0; st == DUET_OK && i0 < n; i0 += chunk / es) {
        size_t m = n - i0 < chunk / es ? n - i0 : chunk / es;
        if (t == DT_BF16) {
            uint16_t *h = (uint16_t *)stage;
            /* in parallel: loading is otherwise bound by this loop */
#pragma omp parallel for schedule(static) if (m > (1u << 20))
            for (size_t i = 0; i < m; i++) h[i] = dt_f32_to_bf16(w[i0 + i]);
        } else {
            memcpy(stage, w + i0, m * es);
        }
        st = CUDA_CHECK(c,
                        cudaMemcpy((char *)bw->w + i0 * es, stage, m * es, cudaMemcpyHostToDevice));
    }
    if (st != DUET_OK) {
        if (bw->w) cudaFree(bw->w);
        free(bw);
        return st;
    }
    bw->n_out = n_out;
    bw->n_in = n_in;
    bw->dtype = t;
    *w_p = bw;
    return DUET_OK;
}

extern "C" void be_cuda_weight_view_of(const be_weight *w, be_cuda_weight_view *v_p) {
    be_cuda_weight_view v = {w->dtype, w->n_out, w->n_in, w->split, w->w, NULL, 0};
    if (w->dtype == DT_F8_E4M3) {
        v.scales = w->scale;
        v.n_scales = (size_t)((w->split + 127) / 128 + (w->n_out - w->split + 127) / 128) *
                     (size_t)((w->n_in + 127) / 128);
    }
    *v_p = v;
}

static void cuda_weight_destroy(be_backend *be, be_weight *w) {
    if (!w) return;
    CUDA_CHECK(cuda_be(be), cudaFree(w->w));
    if (w->scale) CUDA_CHECK(cuda_be(be), cudaFree(w->scale));
    if (w->tab) CUDA_CHECK(cuda_be(be), cudaFree(w->tab));
    if (w->scale_lt) CUDA_CHECK(cuda_be(be), cudaFree(w->scale_lt));
    free(w);
}

static duet_status cuda_vec_create(be_backend *be, const float *v, int n, void **dev_p) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return c->err;
    void *d = NULL;
    size_t bytes = (size_t)(n > 0 ? n : 1) * sizeof(float);
    duet_status st = CUDA_CHECK(c, cudaMalloc(&d, bytes));
    if (st == DUET_OK && n > 0)
        st = CUDA_CHECK(c, cudaMemcpy(d, v, (size_t)n * sizeof(float), cudaMemcpyHostToDevice));
    if (st != DUET_OK) {
        cudaFree(d);
        return st;
    }
    *dev_p = d;
    return DUET_OK;
}

static duet_status cuda_kv_create(be_backend *be, int n_blocks, int n_layers, int block_size,
                                  int kv_dim, dt_dtype dtype, be_kv **kv_p) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return c->err;
    if (dtype != c->act && dtype != DT_F8_E4M3) {
        LOG_ERROR("cuda backend: a KV cache of %s: %s or e4m3 (fp8) only", dt_name(dtype),
                  dt_name(c->act));
        return DUET_ERR_UNSUPPORTED;
    }
    if (dtype == DT_F8_E4M3) {
        /* mla_attention decodes a layer's blocks into one layer of the activation type
         * (mla.cu, kv_decoded_view): grown here, never during a step (a recording keeps the
         * address; growing voids recordings) */
        size_t need = ((size_t)n_blocks + 1) * block_size * kv_dim * act_size(c);
        if (need > c->kv_shadow_bytes) {
            void *p = NULL;
            duet_status st = CUDA_CHECK(c, cudaMalloc(&p, need));
            if (st != DUET_OK) {
                LOG_ERROR("cuda backend: cannot allocate the decoded layer of an fp8 KV cache "
                          "(%zu bytes)",
                          need);
                return st;
            }
            if (c->kv_shadow) {
                CUDA_CHECK(c, cudaStreamSynchronize(c->stream));
                cudaFree(c->kv_shadow);
            }
            c->kv_shadow = p;
            c->kv_shadow_bytes = need;
            c->mem_gen++;
        }
    }
    be_kv *kv = (be_kv *)calloc(1, sizeof *kv);
    if (!kv) return DUET_ERR_NO_MEMORY;
    size_t block_bytes = (size_t)n_layers * (size_t)block_size * (size_t)kv_dim * dt_size(dtype);
    size_t bytes = block_bytes * ((size_t)n_blocks + 1); /* + the padding block */
    duet_status st = CUDA_CHECK(c, cudaMalloc(&kv->data, bytes ? bytes : 1));
    /* zeros, so a block read before it is written holds numbers, not garbage */
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaMemset(kv->data, 0, bytes));
    if (st != DUET_OK) {
        LOG_ERROR("cuda backend: cannot allocate a KV cache of %zu bytes", bytes);
        if (kv->data) cudaFree(kv->data);
        free(kv);
        return st;
    }
    kv->n_blocks = n_blocks;
    kv->pad_block = n_blocks;
    kv->n_layers = n_layers;
    kv->block_size = block_size;
    kv->kv_dim = kv_dim;
    kv->dtype = dtype;
    kv->scale = 1.0f;
    kv->block_bytes = block_bytes;
    kv->on_device = true;
    *kv_p = kv;
    return DUET_OK;
}

/* Called from the KV transfer thread: its own device binding, plain synchronous copies (on
 * the legacy stream, which the engine's non-blocking stream does not wait for: the blocks are
 * not in any step), and errors reported without touching the engine's sticky error. */
static duet_status copy_error(cudaError_t e, const char *what) {
    LOG_ERROR("cuda: %s failed: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
    (void)cudaGetLastError();
    return e == cudaErrorMemoryAllocation ? DUET_ERR_NO_MEMORY : DUET_ERR_DEVICE;
}

static duet_status cuda_kv_copy_host(be_backend *be, be_kv *kv, const int32_t *blocks, int n,
                                     void *host, bool to_host) {
    cuda_backend *c = cuda_be(be);
    cudaError_t e = cudaSetDevice(c->device);
    if (e != cudaSuccess) return copy_error(e, "cudaSetDevice for a KV copy");
    size_t bb = kv->block_bytes;
    for (int i = 0; i < n;) {
        int k = i + 1; /* a run of consecutive block ids is one copy */
        while (k < n && blocks[k] == blocks[k - 1] + 1) k++;
        if (blocks[i] < 0 || blocks[k - 1] >= kv->n_blocks) return DUET_ERR_INVALID;
        char *dev = (char *)kv->data + (size_t)blocks[i] * bb;
        char *h = (char *)host + (size_t)i * bb;
        size_t len = (size_t)(k - i) * bb;
        e = to_host ? cudaMemcpy(h, dev, len, cudaMemcpyDeviceToHost)
                    : cudaMemcpy(dev, h, len, cudaMemcpyHostToDevice);
        if (e != cudaSuccess) return copy_error(e, "cudaMemcpy of KV blocks");
        i = k;
    }
    return DUET_OK;
}

/* The end of a queued KV copy on stream s (e: how queueing went): an event recorded after it is
 * the ticket kv_copy_poll waits on; on any error what was queued is over before returning, so
 * the caller may reuse the memory. */
static duet_status copy_ticket(cudaError_t e, cudaStream_t s, const char *what, void **ticket_p) {
    cudaEvent_t ev = NULL;
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    if (e == cudaSuccess) e = cudaEventRecord(ev, s);
    if (e != cudaSuccess) {
        (void)cudaStreamSynchronize(s);
        if (ev) cudaEventDestroy(ev);
        return copy_error(e, what);
    }
    *ticket_p = (void *)ev;
    return DUET_OK;
}

/* The pipelined form (KV transfer thread): the runs are queued on the stream of their
 * direction, so a chunk's device->host copy, another chunk's host->device copy and network
 * reads overlap; the ticket is an event recorded after them. */
static duet_status cuda_kv_copy_start(be_backend *be, be_kv *kv, const int32_t *blocks, int n,
                                      void *host, bool to_host, void **ticket_p) {
    cuda_backend *c = cuda_be(be);
    cudaError_t e = cudaSetDevice(c->device);
    if (e != cudaSuccess) return copy_error(e, "cudaSetDevice for a KV copy");
    cudaStream_t s = c->xfer[to_host ? 0 : 1];
    size_t bb = kv->block_bytes;
    for (int i = 0; i < n && e == cudaSuccess;) {
        int k = i + 1; /* a run of consecutive block ids is one copy */
        while (k < n && blocks[k] == blocks[k - 1] + 1) k++;
        char *dev = (char *)kv->data + (size_t)blocks[i] * bb;
        char *h = (char *)host + (size_t)i * bb;
        size_t len = (size_t)(k - i) * bb;
        e = to_host ? cudaMemcpyAsync(h, dev, len, cudaMemcpyDeviceToHost, s)
                    : cudaMemcpyAsync(dev, h, len, cudaMemcpyHostToDevice, s);
        i = k;
    }
    return copy_ticket(e, s, "queueing a KV copy", ticket_p);
}

static duet_status cuda_kv_copy_poll(be_backend *be, void *ticket, bool wait) {
    cuda_backend *c = cuda_be(be);
    cudaEvent_t ev = (cudaEvent_t)ticket;
    cudaError_t e = cudaSetDevice(c->device);
    if (e == cudaSuccess) e = wait ? cudaEventSynchronize(ev) : cudaEventQuery(ev);
    if (e == cudaErrorNotReady) {
        (void)cudaGetLastError();
        return DUET_ERR_BUSY;
    }
    cudaEventDestroy(ev);
    return e == cudaSuccess ? DUET_OK : copy_error(e, "a KV copy");
}

/* Same-host KV transfer without staging: the prefill exports its cache's allocation, the
 * decode maps it and copies device to device (the same GPU, or peer access between two). */
static duet_status cuda_ipc_export(be_backend *be, be_kv *kv, void *handle, size_t *len_p) {
    cuda_backend *c = cuda_be(be);
    static_assert(sizeof(cudaIpcMemHandle_t) <= BE_IPC_HANDLE_MAX, "IPC handle size");
    cudaIpcMemHandle_t h;
    cudaError_t e = cudaSetDevice(c->device);
    if (e == cudaSuccess) e = cudaIpcGetMemHandle(&h, kv->data);
    if (e != cudaSuccess) return copy_error(e, "cudaIpcGetMemHandle of the KV cache");
    memcpy(handle, &h, sizeof h);
    *len_p = sizeof h;
    return DUET_OK;
}

static duet_status cuda_ipc_open(be_backend *be, const void *handle, size_t len, void **ptr_p) {
    cuda_backend *c = cuda_be(be);
    if (len != sizeof(cudaIpcMemHandle_t)) return DUET_ERR_INVALID;
    cudaIpcMemHandle_t h;
    memcpy(&h, handle, sizeof h);
    void *p = NULL;
    cudaError_t e = cudaSetDevice(c->device);
    if (e == cudaSuccess) e = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
    if (e != cudaSuccess) return copy_error(e, "cudaIpcOpenMemHandle of a peer's KV cache");
    *ptr_p = p;
    return DUET_OK;
}

static void cuda_ipc_close(be_backend *be, void *ptr) {
    cuda_backend *c = cuda_be(be);
    if (cudaSetDevice(c->device) == cudaSuccess) (void)cudaIpcCloseMemHandle(ptr);
    (void)cudaGetLastError();
}

static duet_status cuda_kv_copy_device_start(be_backend *be, be_kv *kv, const int32_t *blocks,
                                             int n, const void *src, const uint32_t *src_blocks,
                                             void **ticket_p) {
    cuda_backend *c = cuda_be(be);
    cudaError_t e = cudaSetDevice(c->device);
    if (e != cudaSuccess) return copy_error(e, "cudaSetDevice for a KV copy");
    cudaStream_t s = c->xfer[1];
    size_t bb = kv->block_bytes;
    for (int i = 0; i < n && e == cudaSuccess;) {
        int k = i + 1; /* both sides consecutive: one copy */
        while (k < n && blocks[k] == blocks[k - 1] + 1 && src_blocks[k] == src_blocks[k - 1] + 1)
            k++;
        char *dst = (char *)kv->data + (size_t)blocks[i] * bb;
        const char *from = (const char *)src + (size_t)src_blocks[i] * bb;
        e = cudaMemcpyAsync(dst, from, (size_t)(k - i) * bb, cudaMemcpyDeviceToDevice, s);
        i = k;
    }
    return copy_ticket(e, s, "queueing a KV device copy", ticket_p);
}

/* Layer-wise progress: an event after each marked layer; the last one found complete (in
 * stream order, so every earlier one is too) says how far the forward has come. */
static void cuda_layer_marks_reset(be_backend *be) {
    __atomic_store_n(&cuda_be(be)->n_marked, 0, __ATOMIC_RELEASE);
}

static void cuda_layer_mark(be_backend *be, int layer) {
    cuda_backend *c = cuda_be(be);
    if (layer < 0 || layer >= CUDA_MAX_MARKS || layer != c->n_marked) return;
    if (!c->mark_ev[layer] &&
        CUDA_CHECK(c, cudaEventCreateWithFlags(&c->mark_ev[layer], cudaEventDisableTiming)) !=
            DUET_OK)
        return;
    if (CUDA_CHECK(c, cudaEventRecord(c->mark_ev[layer], c->stream)) != DUET_OK) return;
    __atomic_store_n(&c->n_marked, layer + 1, __ATOMIC_RELEASE);
}

static int cuda_layers_done(be_backend *be) {
    cuda_backend *c = cuda_be(be);
    int n = __atomic_load_n(&c->n_marked, __ATOMIC_ACQUIRE);
    if (n == 0 || cudaSetDevice(c->device) != cudaSuccess) return 0;
    for (int j = n - 1; j >= 0; j--) {
        cudaError_t e = cudaEventQuery(c->mark_ev[j]);
        if (e == cudaSuccess) return j + 1;
        (void)cudaGetLastError(); /* not ready (or failed): an earlier one may be done */
    }
    return 0;
}

static duet_status cuda_host_pin(be_backend *be, void *ptr, size_t bytes) {
    cuda_backend *c = cuda_be(be);
    cudaError_t e = cudaSetDevice(c->device);
    if (e == cudaSuccess) e = cudaHostRegister(ptr, bytes, cudaHostRegisterPortable);
    return e == cudaSuccess ? DUET_OK : copy_error(e, "cudaHostRegister of KV staging");
}

static void cuda_host_unpin(be_backend *be, void *ptr) {
    cuda_backend *c = cuda_be(be);
    if (cudaSetDevice(c->device) == cudaSuccess) (void)cudaHostUnregister(ptr);
    (void)cudaGetLastError();
}

static void cuda_kv_destroy(be_backend *be, be_kv *kv) {
    if (!kv) return;
    CUDA_CHECK(cuda_be(be), cudaFree(kv->data));
    free(kv);
}

static duet_status cuda_rope_setup(be_backend *be, const float *inv_freq, int half,
                                   float attn_factor) {
    cuda_backend *c = cuda_be(be);
    if (half <= 0 || half > 256) return DUET_ERR_UNSUPPORTED;
    if (!c->d_inv_freq) {
        duet_status st = CUDA_CHECK(c, cudaMalloc(&c->d_inv_freq, 256 * sizeof(float)));
        if (st != DUET_OK) return st;
    }
    duet_status st = CUDA_CHECK(c, cudaMemcpy(c->d_inv_freq, inv_freq, (size_t)half * sizeof(float),
                                              cudaMemcpyHostToDevice));
    if (st != DUET_OK) return st;
    c->rope_half = half;
    c->rope_attn = attn_factor;
    return DUET_OK;
}

static duet_status cuda_set_batch(be_backend *be, const be_batch *b) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return c->err;
    size_t nt = (size_t)b->n_tokens, ns = (size_t)b->n_seqs, no = (size_t)b->n_out;
    size_t table = ns * (size_t)b->max_blocks;
    /* one layout on both sides: ids, pos, slot [nt], out [no], start [ns + 1], ctx [ns], table */
    size_t total = 3 * nt + no + (ns + 1) + ns + table;
    if (total > c->cap_h_batch) {
        int32_t *h = (int32_t *)realloc(c->h_batch, total * 2 * sizeof(int32_t));
        if (!h) return DUET_ERR_NO_MEMORY;
        c->h_batch = h;
        c->cap_h_batch = total * 2;
    }
    if (total > c->cap_d_batch) {
        CUDA_CHECK(c, cudaStreamSynchronize(c->stream)); /* queued ops may read the old copy */
        CUDA_CHECK(c, cudaFree(c->d_batch));
        c->d_batch = NULL;
        c->cap_d_batch = 0;
        c->mem_gen++;
        duet_status st = CUDA_CHECK(c, cudaMalloc(&c->d_batch, total * 2 * sizeof(int32_t)));
        if (st != DUET_OK) return st;
        c->cap_d_batch = total * 2;
    }
    int32_t *h = c->h_batch, *d = c->d_batch;
    c->h_ids = h;
    c->h_pos = h + nt;
    c->h_slot = h + 2 * nt;
    c->h_out = h + 3 * nt;
    c->h_start = c->h_out + no;
    c->h_ctx = c->h_start + ns + 1;
    c->h_table = c->h_ctx + ns;
    c->d_ids = d;
    c->d_pos = d + nt;
    c->d_slot = d + 2 * nt;
    c->d_out = d + 3 * nt;
    c->d_start = c->d_out + no;
    c->d_ctx = c->d_start + ns + 1;
    c->d_table = c->d_ctx + ns;
    if (b->token_ids)
        memcpy(c->h_ids, b->token_ids, nt * sizeof(int32_t));
    else
        memset(c->h_ids, 0, nt * sizeof(int32_t));
    memcpy(c->h_pos, b->token_pos, nt * sizeof(int32_t));
    memcpy(c->h_slot, b->token_slot, nt * sizeof(int32_t));
    if (no) memcpy(c->h_out, b->out_rows, no * sizeof(int32_t));
    memcpy(c->h_start, b->seq_start, (ns + 1) * sizeof(int32_t));
    memcpy(c->h_ctx, b->seq_ctx, ns * sizeof(int32_t));
    if (table) memcpy(c->h_table, b->block_table, table * sizeof(int32_t));
    c->n_tokens = b->n_tokens;
    c->n_seqs = b->n_seqs;
    c->n_out = b->n_out;
    c->max_blocks = b->max_blocks;
    /* from pageable memory the copy is staged before the call returns, so the next step may
     * overwrite h_batch while this one still runs */
    return CUDA_CHECK(
        c, cudaMemcpyAsync(d, h, total * sizeof(int32_t), cudaMemcpyHostToDevice, c->stream));
}

/* Raw device bytes for the device MoE's tables (routing ids and weights, EP slots). */
static void *cuda_mem_alloc(be_backend *be, size_t bytes) {
    cuda_backend *c = cuda_be(be);
    void *p = NULL;
    if (CUDA_CHECK(c, cudaMalloc(&p, bytes ? bytes : 1)) != DUET_OK) return NULL;
    return p;
}

static void cuda_mem_free(be_backend *be, void *p) {
    if (p) CUDA_CHECK(cuda_be(be), cudaFree(p));
}

static duet_status cuda_mem_upload(be_backend *be, void *dst, const void *src, size_t bytes) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return c->err;
    if (!bytes) return DUET_OK;
    return CUDA_CHECK(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream));
}

static duet_status cuda_mem_download(be_backend *be, void *dst, const void *src, size_t bytes) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return c->err;
    duet_status st = DUET_OK;
    if (bytes)
        st = CUDA_CHECK(c, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->stream));
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaStreamSynchronize(c->stream));
    return st != DUET_OK ? st : c->err;
}

static void cuda_zero(be_backend *be, void *buf, size_t n) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK || n == 0) return;
    CUDA_CHECK(c, cudaMemsetAsync(buf, 0, n * act_size(c), c->stream));
}

static duet_status cuda_mem_info(be_backend *be, size_t *total_p, size_t *free_p) {
    cuda_backend *c = cuda_be(be);
    size_t free_b = 0, total = 0;
    /* the calling thread's device: be_cuda_create set it on the engine thread */
    duet_status st = CUDA_CHECK(c, cudaMemGetInfo(&free_b, &total));
    if (st != DUET_OK) return st;
    *total_p = total;
    *free_p = free_b;
    return DUET_OK;
}

static duet_status cuda_mem_used(be_backend *be, size_t *own_p, size_t *context_p) {
    cuda_backend *c = cuda_be(be);
    long long own = cuda_counted_bytes(c->device);
    *own_p = own > 0 ? (size_t)own : 0;
    *context_p = c->context_bytes;
    return DUET_OK;
}

static duet_status cuda_comm_attach(be_backend *be, comm_group *g) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return c->err;
    return comm_nccl_attach(g, c->device, c->stream);
}

#define CUDA_OPS(act_type)                                                                         \
    {                                                                                              \
        .name = "cuda", .act_dtype = act_type, .on_device = true, .kv_fp8_decoded_layer = true,    \
        .destroy = cuda_destroy, .buf_alloc = cuda_buf_alloc, .buf_free = cuda_buf_free,           \
        .upload = cuda_upload, .download = cuda_download, .sync = cuda_sync,                       \
        .weight_create = cuda_weight_create, .weight_destroy = cuda_weight_destroy,                \
        .weight_create_fp8 = cuda_weight_create_fp8, .vec_create = cuda_vec_create,                \
        .weight_create_dummy = cuda_weight_create_dummy,                                           \
        .vec_create_dummy = cuda_vec_create_dummy, .kv_create = cuda_kv_create,                    \
        .kv_destroy = cuda_kv_destroy, .kv_copy_host = cuda_kv_copy_host,                          \
        .kv_copy_start = cuda_kv_copy_start, .kv_copy_poll = cuda_kv_copy_poll,                    \
        .ipc_export = cuda_ipc_export, .ipc_open = cuda_ipc_open, .ipc_close = cuda_ipc_close,     \
        .kv_copy_device_start = cuda_kv_copy_device_start, .host_pin = cuda_host_pin,              \
        .host_unpin = cuda_host_unpin, .layer_marks_reset = cuda_layer_marks_reset,                \
        .layer_mark = cuda_layer_mark, .layers_done = cuda_layers_done,                            \
        .rope_setup = cuda_rope_setup, .set_batch = cuda_set_batch, .embed = cuda_embed,           \
        .linear = cuda_linear, .rmsnorm = cuda_rmsnorm, .add = cuda_add,                           \
        .add_rmsnorm = cuda_add_rmsnorm, .silu_mul = cuda_silu_mul, .rope = cuda_rope,             \
        .kv_write = cuda_kv_write, .rope_kv_write = cuda_rope_kv_write,                            \
        .mla_attention = cuda_mla_attention, .moe_route = cuda_moe_route,                          \
        .moe_experts = cuda_moe_experts, .gather_rows = cuda_gather_rows,                          \
        .scatter_add_rows = cuda_scatter_add_rows, .zero = cuda_zero, .mem_info = cuda_mem_info,   \
        .mem_used = cuda_mem_used, .sampler_create = cuda_sampler_create,                          \
        .sampler_destroy = cuda_sampler_destroy, .sampler_slot_init = cuda_sampler_slot_init,      \
        .sample = cuda_sample, .comm_attach = cuda_comm_attach, .graph_begin = cuda_graph_begin,   \
        .graph_end = cuda_graph_end, .graph_ready = cuda_graph_ready,                              \
        .graph_launch = cuda_graph_launch, .mem_alloc = cuda_mem_alloc, .mem_free = cuda_mem_free, \
        .mem_upload = cuda_mem_upload, .mem_download = cuda_mem_download,                          \
        .moe_route_dev = cuda_moe_route_dev, .moe_experts_dev = cuda_moe_experts_dev,              \
        .moe_ep_pack = cuda_moe_ep_pack, .moe_ep_unpack = cuda_moe_ep_unpack,                      \
    }

static const be_ops g_cuda_ops_bf16 = CUDA_OPS(DT_BF16);
static const be_ops g_cuda_ops_f32 = CUDA_OPS(DT_F32);

extern "C" void *be_cuda_stream(be_backend *be) {
    return cuda_be(be)->stream;
}

extern "C" int be_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return n;
}

extern "C" duet_status be_cuda_create(int device, dt_dtype dtype, be_backend **be_p) {
    if (dtype == DT_COUNT) dtype = DT_BF16;
    if (dtype != DT_BF16 && dtype != DT_F32) {
        LOG_ERROR("cuda backend: activations can be bf16 or float32, not %s", dt_name(dtype));
        return DUET_ERR_UNSUPPORTED;
    }
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        LOG_ERROR("cuda backend: no CUDA device (%s)",
                  e != cudaSuccess ? cudaGetErrorString(e) : "none visible");
        (void)cudaGetLastError();
        return DUET_ERR_NOT_FOUND;
    }
    if (device < 0 || device >= n) {
        LOG_ERROR("cuda backend: device %d asked for, %d visible (one rank per GPU: start at "
                  "most %d ranks per host)",
                  device, n, n);
        return DUET_ERR_NOT_FOUND;
    }
    cuda_backend *c = (cuda_backend *)calloc(1, sizeof *c);
    if (!c) return DUET_ERR_NO_MEMORY;
    c->base.ops = dtype == DT_BF16 ? &g_cuda_ops_bf16 : &g_cuda_ops_f32;
    c->device = device;
    c->act = dtype;
    duet_status st = CUDA_CHECK(c, cudaSetDevice(device));
    if (st == DUET_OK)
        st = CUDA_CHECK(c, cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    for (int i = 0; st == DUET_OK && i < 2; i++)
        st = CUDA_CHECK(c, cudaStreamCreateWithFlags(&c->xfer[i], cudaStreamNonBlocking));
    if (st == DUET_OK) st = CUBLAS_CHECK(c, cublasCreate(&c->blas));
    if (st == DUET_OK) st = CUBLAS_CHECK(c, cublasSetStream(c->blas, c->stream));
    /* float32 stays float32: no TF32 shortcuts behind the reference precision */
    if (st == DUET_OK) st = CUBLAS_CHECK(c, cublasSetMathMode(c->blas, CUBLAS_DEFAULT_MATH));
    /* a workspace of its own, so GEMMs recorded in a graph allocate nothing */
    const size_t ws = 32u << 20;
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaMalloc(&c->blas_ws, ws));
    c->blas_ws_bytes = ws;
    if (st == DUET_OK) st = CUBLAS_CHECK(c, cublasSetWorkspace(c->blas, c->blas_ws, ws));
    /* the context's cost, read once while nothing else of this backend exists: what the device
     * uses beyond this process's own allocations (a neighbour's memory reads the same) */
    size_t free_b = 0, total_b = 0;
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaMemGetInfo(&free_b, &total_b));
    if (st == DUET_OK) {
        long long other = (long long)total_b - (long long)free_b - cuda_counted_bytes(device);
        c->context_bytes = other > 0 ? (size_t)other : 0;
    }
    if (st != DUET_OK) {
        cuda_destroy(&c->base);
        return st;
    }
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, device) == cudaSuccess)
        LOG_INFO("cuda backend: device %d (%s, sm_%d%d, %.0f GiB), %s activations", device,
                 prop.name, prop.major, prop.minor, (double)prop.totalGlobalMem / (1 << 30),
                 dtype == DT_BF16 ? "bf16" : "float32");
    *be_p = &c->base;
    return DUET_OK;
}
