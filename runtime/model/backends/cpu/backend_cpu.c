/* The CPU reference backend: float32 everywhere, GEMMs through OpenBLAS, the rest in plain
 * loops parallelized with OpenMP. It is the readable statement of every op that faster
 * backends must match (tests/unit/test_backend_ops.c compares them).
 *
 * bf16 emulation (be_cpu_create_bf16): the same ops with every value the CUDA backend stores in
 * bf16 rounded to bf16 (round to nearest even) where it stores it: weights but the router's,
 * uploads, and each op's output; what CUDA keeps in float32 stays float32 here (router logits
 * and weights, norm weights, attention scores and its latent query, the accumulation of a
 * token's experts). It is the reference for what bf16 costs (duet-check golden --compare-to). */
#include <cblas.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "model/backends/cpu/backend_cpu.h"
#include "model/dummy_rule.h"
#include "base/dtype.h"
#include "base/log.h"

#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_max_threads(void) {
    return 1;
}
static int omp_get_thread_num(void) {
    return 0;
}
#endif

/* Below this many multiply-adds a loop runs on one thread: waking a team costs more. */
#define PAR_MIN_WORK 65536

struct be_weight {
    int n_out, n_in;
    float *w; /* [n_out, n_in] */
    /* FP8 weights (bf16 emulation with DUET_FP8_PREFILL_ROWS only): e4m3 x block scale
     * unrounded, the form the FP8 prefill GEMM multiplies; w holds it rounded to bf16 */
    float *raw;
    int split;
};

typedef struct cpu_backend {
    be_backend base;
    /* batch metadata, copied from be_batch */
    int n_tokens, n_seqs, max_blocks;
    int32_t *token_ids, *out_rows, *token_pos, *token_slot, *seq_start, *seq_ctx, *block_table;
    size_t cap_ids, cap_out, cap_pos, cap_slot, cap_start, cap_ctx, cap_table;
    int n_out;
    float inv_freq[256];
    int rope_half;
    float rope_attn;
    /* scratch grown on demand, reused across steps */
    float *scratch;
    size_t scratch_cap;
    duet_status err; /* first op failure since the last sync */
    bool bf16;       /* emulate the CUDA backend's bf16 storage */
    int marks;       /* layers of the current forward done (ops run at once here) */
} cpu_backend;

static cpu_backend *cpu(be_backend *be) {
    return (cpu_backend *)be;
}

/* x[n] rounded to the nearest bf16 in place (the emulated store), when emulating. */
static void store_bf16(const cpu_backend *c, float *x, size_t n) {
    if (!c->bf16) return;
    for (size_t i = 0; i < n; i++) x[i] = dt_bf16_to_f32(dt_f32_to_bf16(x[i]));
}

/* The same for rows [T, cols] of a matrix whose rows are stride elements apart. */
static void store_bf16_rows(const cpu_backend *c, float *x, int T, int cols, int stride) {
    if (!c->bf16) return;
    for (int t = 0; t < T; t++) store_bf16(c, x + (size_t)t * stride, (size_t)cols);
}

static float *scratch_get(cpu_backend *c, size_t n) {
    if (n > c->scratch_cap) {
        free(c->scratch);
        c->scratch = malloc(n * sizeof(float));
        c->scratch_cap = c->scratch ? n : 0;
        if (!c->scratch && c->err == DUET_OK) {
            LOG_ERROR("cpu backend: cannot allocate %zu bytes of scratch", n * sizeof(float));
            c->err = DUET_ERR_NO_MEMORY;
        }
    }
    return c->scratch;
}

static void cpu_destroy(be_backend *be) {
    cpu_backend *c = cpu(be);
    free(c->token_ids);
    free(c->out_rows);
    free(c->token_pos);
    free(c->token_slot);
    free(c->seq_start);
    free(c->seq_ctx);
    free(c->block_table);
    free(c->scratch);
    free(c);
}

static void *cpu_buf_alloc(be_backend *be, size_t n) {
    (void)be;
    return calloc(n ? n : 1, sizeof(float));
}

static void cpu_buf_free(be_backend *be, void *buf) {
    (void)be;
    free(buf);
}

static duet_status cpu_upload(be_backend *be, void *dst, size_t off, const float *src, size_t n) {
    memcpy((float *)dst + off, src, n * sizeof(float));
    store_bf16(cpu(be), (float *)dst + off, n);
    return DUET_OK;
}

static duet_status cpu_download(be_backend *be, float *dst, const void *src, size_t off, size_t n) {
    (void)be;
    memcpy(dst, (const float *)src + off, n * sizeof(float));
    return DUET_OK;
}

static duet_status cpu_sync(be_backend *be) {
    cpu_backend *c = cpu(be);
    duet_status st = c->err;
    c->err = DUET_OK;
    return st;
}

static duet_status cpu_weight_create(be_backend *be, const float *w, int n_out, int n_in,
                                     bool keep_f32, be_weight **w_p) {
    be_weight *bw = malloc(sizeof *bw);
    float *data = malloc((size_t)n_out * (size_t)n_in * sizeof(float));
    if (!bw || !data) {
        free(bw);
        free(data);
        return DUET_ERR_NO_MEMORY;
    }
    memcpy(data, w, (size_t)n_out * (size_t)n_in * sizeof(float));
    /* CUDA keeps keep_f32 weights (the router) in float32 and the rest in bf16 */
    if (!keep_f32) store_bf16(cpu(be), data, (size_t)n_out * (size_t)n_in);
    bw->n_out = n_out;
    bw->n_in = n_in;
    bw->w = data;
    bw->raw = NULL;
    bw->split = n_out;
    *w_p = bw;
    return DUET_OK;
}

static void cpu_weight_destroy(be_backend *be, be_weight *w) {
    (void)be;
    if (!w) return;
    free(w->w);
    free(w->raw);
    free(w);
}

/* FP8 weights only where the emulation has to tell them apart: bf16 emulation with the FP8
 * prefill GEMMs on (be_fp8_prefill_rows); otherwise the loader dequantizes, as before. */
static duet_status cpu_weight_create_fp8(be_backend *be, const uint8_t *q, const float *scales,
                                         int n_out, int n_in, int split, be_weight **w_p) {
    if (!cpu(be)->bf16 || be_fp8_prefill_rows() <= 0) return DUET_ERR_UNSUPPORTED;
    if (n_out <= 0 || n_in <= 0 || n_in % 16 || split <= 0 || split > n_out) {
        LOG_ERROR("cpu backend: an FP8 weight [%d, %d] split at row %d", n_out, n_in, split);
        return DUET_ERR_INVALID;
    }
    size_t n = (size_t)n_out * (size_t)n_in;
    int cb = (n_in + 127) / 128, rb0 = (split + 127) / 128;
    float *raw = malloc(n * sizeof(float));
    if (!raw) return DUET_ERR_NO_MEMORY;
    for (int r = 0; r < n_out; r++) {
        const float *srow = scales + (size_t)(r < split ? r / 128 : rb0 + (r - split) / 128) * cb;
        for (int k = 0; k < n_in; k++)
            raw[(size_t)r * n_in + k] = dt_e4m3_to_f32(q[(size_t)r * n_in + k]) * srow[k / 128];
    }
    duet_status st = cpu_weight_create(be, raw, n_out, n_in, false, w_p);
    if (st != DUET_OK) {
        free(raw);
        return st;
    }
    (*w_p)->raw = raw;
    (*w_p)->split = split;
    return DUET_OK;
}

static duet_status cpu_vec_create(be_backend *be, const float *v, int n, void **dev_p) {
    (void)be;
    float *d = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    if (!d) return DUET_ERR_NO_MEMORY;
    memcpy(d, v, (size_t)n * sizeof(float));
    *dev_p = d;
    return DUET_OK;
}

/* The ops run when called: a layer is done once its mark is called. */
static void cpu_layer_marks_reset(be_backend *be) {
    __atomic_store_n(&((cpu_backend *)be)->marks, 0, __ATOMIC_RELEASE);
}

static void cpu_layer_mark(be_backend *be, int layer) {
    __atomic_store_n(&((cpu_backend *)be)->marks, layer + 1, __ATOMIC_RELEASE);
}

static int cpu_layers_done(be_backend *be) {
    return __atomic_load_n(&((cpu_backend *)be)->marks, __ATOMIC_ACQUIRE);
}

/* e4m3 code -> float, built once (dt_e4m3_to_f32 per value would cost more than the dot) */
static float e4m3_lut[256];
static pthread_once_t e4m3_once = PTHREAD_ONCE_INIT;

static void e4m3_lut_fill(void) {
    for (int i = 0; i < 256; i++) e4m3_lut[i] = dt_e4m3_to_f32((uint8_t)i);
}

static duet_status cpu_kv_create(be_backend *be, int n_blocks, int n_layers, int block_size,
                                 int kv_dim, dt_dtype dtype, be_kv **kv_p) {
    if (dtype != be->ops->act_dtype && dtype != DT_F8_E4M3) {
        LOG_ERROR("cpu backend: a KV cache of %s: float32 or e4m3 (fp8) only", dt_name(dtype));
        return DUET_ERR_UNSUPPORTED;
    }
    if (dtype == DT_F8_E4M3) pthread_once(&e4m3_once, e4m3_lut_fill);
    be_kv *kv = calloc(1, sizeof *kv);
    size_t block_bytes = (size_t)n_layers * (size_t)block_size * (size_t)kv_dim * dt_size(dtype);
    /* page-aligned so the region registers cleanly with UCX */
    void *data = NULL;
    /* one padding block past the pool (be_kv.pad_block) */
    if (!kv || posix_memalign(&data, 4096, block_bytes * ((size_t)n_blocks + 1)) != 0) {
        free(kv);
        LOG_ERROR("cpu backend: cannot allocate a KV cache of %zu bytes",
                  block_bytes * (size_t)n_blocks);
        return DUET_ERR_NO_MEMORY;
    }
    memset(data, 0, block_bytes * ((size_t)n_blocks + 1));
    kv->n_blocks = n_blocks;
    kv->pad_block = n_blocks;
    kv->n_layers = n_layers;
    kv->block_size = block_size;
    kv->kv_dim = kv_dim;
    kv->dtype = dtype;
    kv->scale = 1.0f;
    kv->data = data;
    kv->block_bytes = block_bytes;
    kv->on_device = false;
    *kv_p = kv;
    return DUET_OK;
}

static void cpu_kv_destroy(be_backend *be, be_kv *kv) {
    (void)be;
    if (!kv) return;
    free(kv->data);
    free(kv);
}

static int grow_i32(int32_t **p, size_t *cap, size_t n) {
    if (n <= *cap) return 0;
    int32_t *np = realloc(*p, n * sizeof **p);
    if (!np) return -1;
    *p = np;
    *cap = n;
    return 0;
}

static duet_status cpu_set_batch(be_backend *be, const be_batch *b) {
    cpu_backend *c = cpu(be);
    size_t nt = (size_t)b->n_tokens, ns = (size_t)b->n_seqs;
    size_t table = ns * (size_t)b->max_blocks;
    size_t no = (size_t)b->n_out;
    if (grow_i32(&c->token_ids, &c->cap_ids, nt) || grow_i32(&c->out_rows, &c->cap_out, no) ||
        grow_i32(&c->token_pos, &c->cap_pos, nt) || grow_i32(&c->token_slot, &c->cap_slot, nt) ||
        grow_i32(&c->seq_start, &c->cap_start, ns + 1) ||
        grow_i32(&c->seq_ctx, &c->cap_ctx, ns + 1) ||
        grow_i32(&c->block_table, &c->cap_table, table))
        return DUET_ERR_NO_MEMORY;
    if (b->token_ids) memcpy(c->token_ids, b->token_ids, nt * sizeof(int32_t));
    if (b->out_rows && no) memcpy(c->out_rows, b->out_rows, no * sizeof(int32_t));
    c->n_out = b->n_out;
    memcpy(c->token_pos, b->token_pos, nt * sizeof(int32_t));
    memcpy(c->token_slot, b->token_slot, nt * sizeof(int32_t));
    memcpy(c->seq_start, b->seq_start, (ns + 1) * sizeof(int32_t));
    memcpy(c->seq_ctx, b->seq_ctx, ns * sizeof(int32_t));
    if (table) memcpy(c->block_table, b->block_table, table * sizeof(int32_t));
    c->n_tokens = b->n_tokens;
    c->n_seqs = b->n_seqs;
    c->max_blocks = b->max_blocks;
    return DUET_OK;
}

static duet_status cpu_rope_setup(be_backend *be, const float *inv_freq, int half,
                                  float attn_factor) {
    cpu_backend *c = cpu(be);
    if (half <= 0 || half > 256) return DUET_ERR_UNSUPPORTED;
    memcpy(c->inv_freq, inv_freq, (size_t)half * sizeof(float));
    c->rope_half = half;
    c->rope_attn = attn_factor;
    return DUET_OK;
}

static void cpu_embed(be_backend *be, void *out, const int32_t *ids, int T, const be_weight *table,
                      int row0) {
    if (!ids) ids = cpu(be)->token_ids;
    int D = table->n_in;
    float *o = out;
    for (int t = 0; t < T; t++) {
        int r = ids[t] - row0;
        if (r >= 0 && r < table->n_out)
            memcpy(o + (size_t)t * D, table->w + (size_t)r * D, (size_t)D * sizeof(float));
        else
            memset(o + (size_t)t * D, 0, (size_t)D * sizeof(float));
    }
    store_bf16(cpu(be), o, (size_t)T * D); /* a float32 table is rounded on the way out */
}

/* y[T, n_out] = x[T, n_in] @ W[n_out, n_in]^T in float32 */
static void linear_f32(float *y, const void *x, int x_stride, int T, const be_weight *w) {
    if (T <= 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, w->n_out, w->n_in, 1.0f, x, x_stride,
                w->w, w->n_in, 0.0f, y, w->n_out);
}

static void cpu_linear(be_backend *be, void *y, const void *x, int x_stride, int T,
                       const be_weight *w) {
    linear_f32(y, x, x_stride, T, w);
    if (T > 0) store_bf16(cpu(be), y, (size_t)T * w->n_out);
}

/* The linear op: cpu_linear, or for an FP8 weight over enough rows (be_fp8_prefill_rows) what
 * CUDA's FP8 prefill GEMM computes: x quantized per row and 128 columns to e4m3 (scale =
 * amax / 448, x / scale rounded to nearest), times the unrounded FP8 weight, in float32. */
static void cpu_linear_layer(be_backend *be, void *y, const void *x, int x_stride, int T,
                             const be_weight *w) {
    cpu_backend *c = cpu(be);
    int rows = be_fp8_prefill_rows();
    if (!w->raw || !c->bf16 || rows <= 0 || T < rows ||
        !be_fp8_prefill_eligible(w->n_out, w->n_in, w->split)) {
        cpu_linear(be, y, x, x_stride, T, w);
        return;
    }
    const int K = w->n_in;
    float *xq = scratch_get(c, (size_t)T * K);
    if (!xq) {
        if (c->err == DUET_OK) c->err = DUET_ERR_NO_MEMORY;
        return;
    }
#pragma omp parallel for if ((size_t)T * K > PAR_MIN_WORK)
    for (int t = 0; t < T; t++)
        for (int k0 = 0; k0 < K; k0 += 128) {
            const float *xr = (const float *)x + (size_t)t * x_stride + k0;
            float a = 0.0f;
            for (int k = 0; k < 128; k++) a = fmaxf(a, fabsf(xr[k]));
            float sc = a > 0.0f ? a / 448.0f : 1.0f;
            for (int k = 0; k < 128; k++)
                xq[(size_t)t * K + k0 + k] = dt_e4m3_to_f32(dt_f32_to_e4m3(xr[k] / sc)) * sc;
        }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, w->n_out, K, 1.0f, xq, K, w->raw, K,
                0.0f, y, w->n_out);
    store_bf16(c, y, (size_t)T * w->n_out);
}

static void cpu_rmsnorm(be_backend *be, void *out, int out_stride, const void *x, int x_stride,
                        const void *w, int T, int D, float eps) {
    const float *wf = w;
#pragma omp parallel for if ((size_t)T * D > PAR_MIN_WORK)
    for (int t = 0; t < T; t++) {
        const float *xr = (const float *)x + (size_t)t * x_stride;
        float *orow = (float *)out + (size_t)t * out_stride;
        float ss = 0.0f;
        for (int i = 0; i < D; i++) ss += xr[i] * xr[i];
        float r = 1.0f / sqrtf(ss / (float)D + eps);
        for (int i = 0; i < D; i++) orow[i] = wf[i] * (xr[i] * r);
    }
    store_bf16_rows(cpu(be), out, T, D, out_stride);
}

static void cpu_add(be_backend *be, void *y, const void *x, size_t n) {
    float *yf = y;
    const float *xf = x;
    for (size_t i = 0; i < n; i++) yf[i] += xf[i];
    store_bf16(cpu(be), yf, n);
}

/* add then rmsnorm row by row, the same arithmetic and the same bf16 stores (h after the add,
 * out after the norm) as the two ops */
static void cpu_add_rmsnorm(be_backend *be, void *out, void *h, const void *x, const void *w, int T,
                            int D, float eps) {
    const cpu_backend *c = cpu(be);
    const float *wf = w;
#pragma omp parallel for if ((size_t)T * D > PAR_MIN_WORK)
    for (int t = 0; t < T; t++) {
        float *hr = (float *)h + (size_t)t * D, *orow = (float *)out + (size_t)t * D;
        const float *xr = (const float *)x + (size_t)t * D;
        for (int i = 0; i < D; i++) hr[i] += xr[i];
        store_bf16(c, hr, (size_t)D);
        float ss = 0.0f;
        for (int i = 0; i < D; i++) ss += hr[i] * hr[i];
        float r = 1.0f / sqrtf(ss / (float)D + eps);
        for (int i = 0; i < D; i++) orow[i] = wf[i] * (hr[i] * r);
        store_bf16(c, orow, (size_t)D);
    }
}

static void cpu_silu_mul(be_backend *be, void *out, const void *gu, int T, int inter) {
#pragma omp parallel for if ((size_t)T * inter > PAR_MIN_WORK)
    for (int t = 0; t < T; t++) {
        const float *g = (const float *)gu + (size_t)t * 2 * inter, *u = g + inter;
        float *o = (float *)out + (size_t)t * inter;
        for (int i = 0; i < inter; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
    store_bf16(cpu(be), out, (size_t)T * inter);
}

static void cpu_rope(be_backend *be, void *x, int T, int row_stride, int n_heads, int head_stride,
                     int col0, int rope_dim) {
    cpu_backend *c = cpu(be);
    int half = rope_dim / 2;
#pragma omp parallel for if ((size_t)T * n_heads * rope_dim > PAR_MIN_WORK)
    for (int t = 0; t < T; t++) {
        float pos = (float)c->token_pos[t];
        float cs[128], sn[128];
        for (int i = 0; i < half; i++) {
            float a = pos * c->inv_freq[i];
            cs[i] = cosf(a) * c->rope_attn;
            sn[i] = sinf(a) * c->rope_attn;
        }
        for (int h = 0; h < n_heads; h++) {
            float *p = (float *)x + (size_t)t * row_stride + (size_t)h * head_stride + col0;
            for (int i = 0; i < half; i++) {
                float x0 = p[2 * i], x1 = p[2 * i + 1];
                p[2 * i] = x0 * cs[i] - x1 * sn[i];
                p[2 * i + 1] = x0 * sn[i] + x1 * cs[i];
            }
            store_bf16(c, p, (size_t)rope_dim);
        }
    }
}

/* The cache row of (layer, slot): kv_dim floats, or kv_dim e4m3 codes in an fp8 cache. */
static void *kv_row(const be_kv *kv, int layer, int slot) {
    int blk = slot / kv->block_size, off = slot % kv->block_size;
    return (char *)kv->data +
           (((size_t)blk * kv->n_layers + (size_t)layer) * kv->block_size + (size_t)off) *
               kv->kv_dim * dt_size(kv->dtype);
}

static void cpu_kv_write(be_backend *be, be_kv *kv, int layer, const void *kva, int kv_stride) {
    cpu_backend *c = cpu(be);
    for (int t = 0; t < c->n_tokens; t++) {
        const float *x = (const float *)kva + (size_t)t * kv_stride;
        if (kv->dtype != DT_F8_E4M3) {
            memcpy(kv_row(kv, layer, c->token_slot[t]), x, (size_t)kv->kv_dim * sizeof(float));
            continue;
        }
        /* e4m3(x / scale): round to nearest even, saturating at +-448 (dummy_rule.h's integer
         * rounding, dt_f32_to_e4m3's codes); NaN stays NaN, as CUDA's satfinite conversion */
        uint8_t *q = kv_row(kv, layer, c->token_slot[t]);
        float inv = 1.0f / kv->scale;
        for (int i = 0; i < kv->kv_dim; i++) {
            float v = x[i] * inv;
            q[i] = isnan(v) ? 0x7f : dummy_e4m3(v);
        }
    }
}

/* The reference of the fused op is the two ops themselves. */
static void cpu_rope_kv_write(be_backend *be, be_kv *kv, int layer, void *kva, int T, int kv_stride,
                              int col0, int rope_dim) {
    cpu_rope(be, kva, T, kv_stride, 1, 0, col0, rope_dim);
    cpu_kv_write(be, kv, layer, kva, kv_stride);
}

/* Row j of sequence s's context in the cache as kv_dim floats: the row itself in a float32
 * cache, else its e4m3 codes times the scale written into buf (kv_dim floats). */
static const float *ctx_row(const cpu_backend *c, const be_kv *kv, int layer, int s, int j,
                            float *buf) {
    int blk = c->block_table[(size_t)s * c->max_blocks + j / kv->block_size];
    const void *row = kv_row(kv, layer, blk * kv->block_size + j % kv->block_size);
    if (kv->dtype != DT_F8_E4M3) return row;
    const uint8_t *q = row;
    for (int i = 0; i < kv->kv_dim; i++) buf[i] = e4m3_lut[q[i]] * kv->scale;
    return buf;
}

static void softmax_inplace(float *x, int n) {
    float m = -INFINITY;
    for (int i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - m);
        sum += x[i];
    }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

/* Absorbed MLA for one query token and head: q_nope is folded into the latent space through
 * W_uk, attention runs over cached latents, W_uv maps the result back. Cost O(ctx * L). */
static void attend_absorbed(const cpu_backend *c, const be_kv *kv, int layer, int s, int ctx,
                            const float *q, const float *wkvb_h, int nope, int rope, int v,
                            float scale, float *out, float *tmp) {
    int L = kv->kv_dim - rope;
    /* tmp: q_lat[L], o_lat[L], row[kv_dim] (an fp8 row decoded), sc[ctx] */
    float *q_lat = tmp, *o_lat = tmp + L, *rbuf = tmp + 2 * L, *sc = rbuf + kv->kv_dim;
    /* q_lat[l] = sum_i q_nope[i] * W_uk[i][l] */
    for (int l = 0; l < L; l++) q_lat[l] = 0.0f;
    for (int i = 0; i < nope; i++) {
        const float *wr = wkvb_h + (size_t)i * L;
        for (int l = 0; l < L; l++) q_lat[l] += q[i] * wr[l];
    }
    for (int j = 0; j < ctx; j++) {
        const float *row = ctx_row(c, kv, layer, s, j, rbuf);
        float d = 0.0f;
        for (int l = 0; l < L; l++) d += q_lat[l] * row[l];
        for (int r = 0; r < rope; r++) d += q[nope + r] * row[L + r];
        sc[j] = d * scale;
    }
    softmax_inplace(sc, ctx);
    for (int l = 0; l < L; l++) o_lat[l] = 0.0f;
    for (int j = 0; j < ctx; j++) {
        const float *row = ctx_row(c, kv, layer, s, j, rbuf);
        for (int l = 0; l < L; l++) o_lat[l] += sc[j] * row[l];
    }
    for (int i = 0; i < v; i++) {
        const float *wr = wkvb_h + (size_t)(nope + i) * L;
        float d = 0.0f;
        for (int l = 0; l < L; l++) d += wr[l] * o_lat[l];
        out[i] = d;
    }
}

/* Expanded MLA for a chunk of query tokens of one sequence: keys and values of every context
 * position are rebuilt from the latents through kv_b (one GEMM), then ordinary causal attention
 * per head. Cost O(ctx * H * (nope + v) * L) once, shared by all the chunk's queries. */
static void attend_expanded(cpu_backend *c, const be_kv *kv, int layer, int s, float *out,
                            const float *q, const be_weight *kv_b, int H, int nope, int rope, int v,
                            float scale) {
    int L = kv->kv_dim - rope, ctx = c->seq_ctx[s];
    int t0 = c->seq_start[s], n = c->seq_start[s + 1] - t0;
    int kvw = H * (nope + v), qw = H * (nope + rope);
    int D = kv->kv_dim;
    size_t need = (size_t)ctx * D + (size_t)ctx * kvw + (size_t)omp_get_max_threads() * ctx;
    float *lat = scratch_get(c, need);
    if (!lat) return;
    float *kvx = lat + (size_t)ctx * D, *scores = kvx + (size_t)ctx * kvw;
    /* lat[ctx, D]: the context's rows as floats (fp8 rows decoded once here) */
    for (int j = 0; j < ctx; j++) {
        float *dst = lat + (size_t)j * D;
        const float *row = ctx_row(c, kv, layer, s, j, dst);
        if (row != dst) memcpy(dst, row, (size_t)D * sizeof(float));
    }
    /* kvx[ctx, H * (nope + v)] = lat[ctx, :L] @ kv_b^T */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, ctx, kvw, L, 1.0f, lat, D, kv_b->w, L,
                0.0f, kvx, kvw);
    store_bf16(c, kvx, (size_t)ctx * kvw); /* CUDA's GEMM writes keys and values in bf16 */
#pragma omp parallel for collapse(2) if ((size_t)n * H * ctx * (nope + rope) > PAR_MIN_WORK)
    for (int i = 0; i < n; i++) {
        for (int h = 0; h < H; h++) {
            float *sc = scores + (size_t)omp_get_thread_num() * ctx;
            const float *qh = q + (size_t)(t0 + i) * qw + (size_t)h * (nope + rope);
            int upto = c->token_pos[t0 + i] + 1; /* causal */
            for (int j = 0; j < upto; j++) {
                const float *k = kvx + (size_t)j * kvw + (size_t)h * (nope + v);
                const float *pe = lat + (size_t)j * D + L;
                float d = 0.0f;
                for (int e = 0; e < nope; e++) d += qh[e] * k[e];
                for (int e = 0; e < rope; e++) d += qh[nope + e] * pe[e];
                sc[j] = d * scale;
            }
            softmax_inplace(sc, upto);
            float *o = out + (size_t)(t0 + i) * H * v + (size_t)h * v;
            for (int e = 0; e < v; e++) o[e] = 0.0f;
            for (int j = 0; j < upto; j++) {
                const float *vv = kvx + (size_t)j * kvw + (size_t)h * (nope + v) + nope;
                for (int e = 0; e < v; e++) o[e] += sc[j] * vv[e];
            }
        }
    }
}

static void cpu_mla_attention(be_backend *be, void *out, const void *q, be_kv *kv, int layer,
                              const be_weight *kv_b, int H, int nope, int rope, int v,
                              float scale) {
    cpu_backend *c = cpu(be);
    int L = kv->kv_dim - rope, qw = H * (nope + rope);
    int max_ctx = 0;
    for (int s = 0; s < c->n_seqs; s++) max_ctx = c->seq_ctx[s] > max_ctx ? c->seq_ctx[s] : max_ctx;
    for (int s = 0; s < c->n_seqs; s++) {
        int t0 = c->seq_start[s], n = c->seq_start[s + 1] - t0;
        if (n > 1) {
            /* a prompt chunk: expanded form, as prefill kernels do */
            attend_expanded(c, kv, layer, s, out, q, kv_b, H, nope, rope, v, scale);
            continue;
        }
        if (n == 0) continue;
        size_t per = (size_t)2 * L + (size_t)kv->kv_dim + (size_t)max_ctx;
        float *tmp = scratch_get(c, per * (size_t)omp_get_max_threads());
        if (!tmp) return;
        int ctx = c->token_pos[t0] + 1;
#pragma omp parallel for if ((size_t)H * ctx * L > PAR_MIN_WORK)
        for (int h = 0; h < H; h++) {
            attend_absorbed(c, kv, layer, s, ctx,
                            (const float *)q + (size_t)t0 * qw + (size_t)h * (nope + rope),
                            kv_b->w + (size_t)h * (nope + v) * L, nope, rope, v, scale,
                            (float *)out + (size_t)t0 * H * v + (size_t)h * v,
                            tmp + per * (size_t)omp_get_thread_num());
        }
    }
    /* scores, softmax and the latent query stay float32, as in CUDA's kernel; the output is
     * stored */
    store_bf16(c, out, (size_t)c->n_tokens * H * v);
}

/* Indices of the k largest of x[0..n) into idx, largest first; ties keep the lower index. */
static void topk_indices(const float *x, int n, int k, int *idx) {
    for (int i = 0; i < k; i++) idx[i] = -1;
    for (int e = 0; e < n; e++) {
        int p = k;
        while (p > 0 && (idx[p - 1] < 0 || x[e] > x[idx[p - 1]])) p--;
        if (p >= k) continue;
        for (int q = k - 1; q > p; q--) idx[q] = idx[q - 1];
        idx[p] = e;
    }
}

static duet_status cpu_moe_route(be_backend *be, const void *x, int T, const be_weight *gate,
                                 const void *bias, const be_route_params *p, int32_t *ids,
                                 float *weights) {
    cpu_backend *c = cpu(be);
    int E = p->n_experts, K = p->top_k, G = p->n_group, per = E / G;
    float *logits = scratch_get(c, (size_t)T * E);
    if (!logits) return DUET_ERR_NO_MEMORY;
    linear_f32(logits, x, gate->n_in, T, gate); /* router logits stay float32 */
    const float *b = bias;
    for (int t = 0; t < T; t++) {
        float *s = logits + (size_t)t * E;
        float choice[1024], gscore[256];
        int gidx[256], eidx[64];
        if (E > 1024 || G > 256 || K > 64) return DUET_ERR_UNSUPPORTED;
        if (p->scoring == CFG_SCORING_SOFTMAX)
            softmax_inplace(s, E);
        else
            for (int e = 0; e < E; e++) s[e] = 1.0f / (1.0f + expf(-s[e]));
        for (int e = 0; e < E; e++) choice[e] = s[e] + (b ? b[e] : 0.0f);
        if (p->method != CFG_TOPK_GREEDY && G > 1) {
            for (int g = 0; g < G; g++) {
                const float *cg = choice + g * per;
                if (p->method == CFG_TOPK_NOAUX_TC) {
                    int two[2];
                    topk_indices(cg, per, 2, two);
                    gscore[g] = cg[two[0]] + cg[two[1]];
                } else {
                    float m = -INFINITY;
                    for (int i = 0; i < per; i++) m = cg[i] > m ? cg[i] : m;
                    gscore[g] = m;
                }
            }
            topk_indices(gscore, G, p->topk_group, gidx);
            char keep[256] = {0};
            for (int i = 0; i < p->topk_group; i++) keep[gidx[i]] = 1;
            for (int g = 0; g < G; g++)
                if (!keep[g])
                    for (int i = 0; i < per; i++) choice[g * per + i] = -INFINITY;
        }
        topk_indices(choice, E, K, eidx);
        float sum = 0.0f;
        for (int k = 0; k < K; k++) {
            ids[(size_t)t * K + k] = eidx[k];
            weights[(size_t)t * K + k] = s[eidx[k]];
            sum += s[eidx[k]];
        }
        bool norm = p->norm_topk_prob && p->scale_after_norm;
        for (int k = 0; k < K; k++) {
            float w = weights[(size_t)t * K + k];
            if (norm) w /= sum + 1e-20f;
            weights[(size_t)t * K + k] = w * p->routed_scaling_factor;
        }
    }
    return DUET_OK;
}

/* out[T, D] += the routed experts [e0, e0 + n_local) of rows x[t] (x_stride apart) whose ids
 * and weights sit meta_stride words apart; experts visited in ascending order, each over its
 * rows in token order. */
static void experts_accumulate(cpu_backend *c, float *out, const float *x, int x_stride, int T,
                               int D, const int32_t *ids, const float *weights, int meta_stride,
                               int K, const be_ffn *experts, int e0, int n_local) {
    be_backend *be = &c->base;
    if (T <= 0 || n_local <= 0) return;
    int inter = experts[0].n_inter;
    /* per expert: rows [n, D] gathered, gate_up [n, 2I], act [n, I], y [n, D] */
    size_t need = (size_t)T * (D + 3 * (size_t)inter + D) + (size_t)T * 2;
    float *buf = scratch_get(c, need);
    if (!buf) return;
    float *xs = buf, *gu = xs + (size_t)T * D, *act = gu + (size_t)T * 2 * inter,
          *y = act + (size_t)T * inter, *wt = y + (size_t)T * D;
    int *rows = (int *)(wt + T);
    for (int e = 0; e < n_local; e++) {
        int n = 0;
        for (int t = 0; t < T; t++)
            for (int k = 0; k < K; k++)
                if (ids[(size_t)t * meta_stride + k] == e0 + e) {
                    rows[n] = t;
                    wt[n] = weights[(size_t)t * meta_stride + k];
                    memcpy(xs + (size_t)n * D, x + (size_t)t * x_stride, (size_t)D * sizeof(float));
                    n++;
                }
        if (!n) continue;
        cpu_linear(be, gu, xs, D, n, experts[e].gate_up);
        cpu_silu_mul(be, act, gu, n, inter);
        cpu_linear(be, y, act, inter, n, experts[e].down);
        for (int i = 0; i < n; i++) {
            float *o = out + (size_t)rows[i] * D;
            const float *yr = y + (size_t)i * D;
            for (int d = 0; d < D; d++) o[d] += wt[i] * yr[d];
        }
    }
    /* CUDA sums a token's experts in float32 and stores once */
    store_bf16(c, out, (size_t)T * D);
}

static void cpu_moe_experts(be_backend *be, void *out, const void *x, int T, int D,
                            const int32_t *ids, const float *weights, int K, const be_ffn *experts,
                            int e0, int n_local) {
    experts_accumulate(cpu(be), out, x, D, T, D, ids, weights, K, K, experts, e0, n_local);
}

/* ---- MoE on the "device": host memory plays device memory, so these are the plain statement
 * of the device ops (the CUDA backend must match them) ---- */

static void *cpu_mem_alloc(be_backend *be, size_t bytes) {
    (void)be;
    return calloc(bytes ? bytes : 1, 1);
}

static void cpu_mem_free(be_backend *be, void *p) {
    (void)be;
    free(p);
}

static duet_status cpu_mem_copy(be_backend *be, void *dst, const void *src, size_t bytes) {
    (void)be;
    if (bytes) memcpy(dst, src, bytes);
    return DUET_OK;
}

static void cpu_moe_route_dev(be_backend *be, const void *x, int T, const be_weight *gate,
                              const void *bias, const be_route_params *p, int32_t *ids,
                              float *weights) {
    cpu_backend *c = cpu(be);
    if (T <= 0) return;
    duet_status st = cpu_moe_route(be, x, T, gate, bias, p, ids, weights);
    if (st != DUET_OK && c->err == DUET_OK) c->err = st;
}

static void cpu_moe_experts_dev(be_backend *be, void *out, const be_moe_rows *r,
                                const be_ffn *experts, int e0, int n_local, const be_ffn *shared) {
    cpu_backend *c = cpu(be);
    if (r->n <= 0) return;
    float *o = out;
    const float *x = r->x;
    memset(o, 0, (size_t)r->n * r->D * sizeof(float));
    experts_accumulate(c, o, x, r->x_stride, r->n, r->D, r->ids, r->weights, r->meta_stride, r->K,
                       experts, e0, n_local);
    if (!shared || !shared->gate_up) return;
    /* the shared experts last, as the forward adds them after the routed sum */
    int n = r->n, D = r->D, inter = shared->n_inter;
    float *buf = scratch_get(c, (size_t)n * (3 * (size_t)inter + D));
    if (!buf) return;
    float *gu = buf, *act = gu + (size_t)n * 2 * inter, *y = act + (size_t)n * inter;
    cpu_linear(be, gu, x, r->x_stride, n, shared->gate_up);
    cpu_silu_mul(be, act, gu, n, inter);
    cpu_linear(be, y, act, inter, n, shared->down);
    cpu_add(be, o, y, (size_t)n * D);
}

static void cpu_moe_ep_pack(be_backend *be, void *send, const void *x, int T, const int32_t *ids,
                            const float *weights, const be_ep_layout *l, int32_t *slot) {
    cpu_backend *c = cpu(be);
    int D = l->D, K = l->K, ep = l->ep, cap = l->cap;
    size_t row = be_ep_row_bytes(D, K, sizeof(float)), meta = be_ep_meta_offset(D, sizeof(float));
    int mine = T > l->tp_rank ? (T - l->tp_rank + l->tp - 1) / l->tp : 0;
    if (mine > cap) {
        LOG_ERROR("cpu backend: EP dispatch of %d tokens into blocks of %d rows", mine, cap);
        if (c->err == DUET_OK) c->err = DUET_ERR_INTERNAL;
        return;
    }
    for (int r = 0; r < ep; r++) {
        char *blk = (char *)send + (size_t)r * cap * row;
        int p = 0;
        for (int i = 0; i < mine; i++) {
            int t = l->tp_rank + i * l->tp;
            const int32_t *id = ids + (size_t)t * K;
            int hit = 0;
            for (int k = 0; k < K && !hit; k++)
                hit = id[k] >= 0 && id[k] / l->experts_per_rank == r;
            slot[(size_t)i * ep + r] = hit ? p : -1;
            if (!hit) continue;
            char *dst = blk + (size_t)p * row;
            memcpy(dst, (const float *)x + (size_t)t * D, (size_t)D * sizeof(float));
            memcpy(dst + meta, id, (size_t)K * sizeof(int32_t));
            memcpy(dst + meta + (size_t)K * 4, weights + (size_t)t * K, (size_t)K * sizeof(float));
            p++;
        }
        for (; p < cap; p++) { /* unused rows: defined bytes, ids that select nothing */
            char *dst = blk + (size_t)p * row;
            memset(dst, 0, row);
            int32_t *id = (int32_t *)(dst + meta);
            for (int k = 0; k < K; k++) id[k] = -1;
        }
    }
}

static void cpu_moe_ep_unpack(be_backend *be, void *out, const void *back, int T,
                              const be_ep_layout *l, const int32_t *slot) {
    (void)be;
    int D = l->D, ep = l->ep, cap = l->cap;
    float *o = out;
    if (T <= 0) return;
    memset(o, 0, (size_t)T * D * sizeof(float));
    for (int t = l->tp_rank, i = 0; t < T; t += l->tp, i++) {
        float *dst = o + (size_t)t * D;
        for (int r = 0; r < ep; r++) {
            int p = slot[(size_t)i * ep + r];
            if (p < 0) continue;
            const float *src = (const float *)back + ((size_t)r * cap + p) * D;
            for (int d = 0; d < D; d++) dst[d] += src[d];
        }
    }
}

static void cpu_gather_rows(be_backend *be, void *dst, const void *src, const int32_t *idx, int n,
                            int D) {
    if (!idx) {
        idx = cpu(be)->out_rows;
        n = cpu(be)->n_out;
    }
    for (int i = 0; i < n; i++)
        memcpy((float *)dst + (size_t)i * D, (const float *)src + (size_t)idx[i] * D,
               (size_t)D * sizeof(float));
}

static void cpu_scatter_add_rows(be_backend *be, void *dst, const void *src, const int32_t *idx,
                                 int n, int D) {
    for (int i = 0; i < n; i++) {
        float *d = (float *)dst + (size_t)idx[i] * D;
        const float *s = (const float *)src + (size_t)i * D;
        for (int j = 0; j < D; j++) d[j] += s[j];
        store_bf16(cpu(be), d, (size_t)D);
    }
}

static void cpu_zero(be_backend *be, void *buf, size_t n) {
    (void)be;
    memset(buf, 0, n * sizeof(float));
}

static const be_ops g_cpu_ops = {
    .name = "cpu",
    .act_dtype = DT_F32,
    .destroy = cpu_destroy,
    .buf_alloc = cpu_buf_alloc,
    .buf_free = cpu_buf_free,
    .upload = cpu_upload,
    .download = cpu_download,
    .sync = cpu_sync,
    .weight_create = cpu_weight_create,
    .weight_destroy = cpu_weight_destroy,
    .weight_create_fp8 = cpu_weight_create_fp8,
    .vec_create = cpu_vec_create,
    .kv_create = cpu_kv_create,
    .kv_destroy = cpu_kv_destroy,
    .layer_marks_reset = cpu_layer_marks_reset,
    .layer_mark = cpu_layer_mark,
    .layers_done = cpu_layers_done,
    .rope_setup = cpu_rope_setup,
    .set_batch = cpu_set_batch,
    .embed = cpu_embed,
    .linear = cpu_linear_layer,
    .rmsnorm = cpu_rmsnorm,
    .add = cpu_add,
    .add_rmsnorm = cpu_add_rmsnorm,
    .silu_mul = cpu_silu_mul,
    .rope = cpu_rope,
    .kv_write = cpu_kv_write,
    .rope_kv_write = cpu_rope_kv_write,
    .mla_attention = cpu_mla_attention,
    .moe_route = cpu_moe_route,
    .moe_experts = cpu_moe_experts,
    .gather_rows = cpu_gather_rows,
    .scatter_add_rows = cpu_scatter_add_rows,
    .zero = cpu_zero,
    /* sampling: the host rule itself (backend_sample.c), reading the logits in place */
    .sampler_create = be_host_sampler_create,
    .sampler_destroy = be_host_sampler_destroy,
    .sampler_slot_init = be_host_sampler_slot_init,
    .sample = be_host_sample,
    .mem_alloc = cpu_mem_alloc,
    .mem_free = cpu_mem_free,
    .mem_upload = cpu_mem_copy,
    .mem_download = cpu_mem_copy,
    .moe_route_dev = cpu_moe_route_dev,
    .moe_experts_dev = cpu_moe_experts_dev,
    .moe_ep_pack = cpu_moe_ep_pack,
    .moe_ep_unpack = cpu_moe_ep_unpack,
};

static duet_status create(bool bf16, be_backend **be_p) {
    cpu_backend *c = calloc(1, sizeof *c);
    if (!c) return DUET_ERR_NO_MEMORY;
    c->base.ops = &g_cpu_ops;
    c->bf16 = bf16;
    *be_p = &c->base;
    return DUET_OK;
}

duet_status be_cpu_create(be_backend **be_p) {
    return create(false, be_p);
}

duet_status be_cpu_create_bf16(be_backend **be_p) {
    LOG_INFO("cpu backend: float32 arithmetic with bf16 storage emulated as on CUDA");
    return create(true, be_p);
}
