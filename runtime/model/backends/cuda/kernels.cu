/* The elementwise and row ops of the CUDA backend: embedding, RMSNorm, residual add, SwiGLU,
 * interleaved RoPE, KV cache writes, row gather/scatter and type conversions. Each kernel is
 * templated on the activation type T (bf16 or float) and computes in float32, following the
 * CPU reference (cpu/backend_cpu.c) operation by operation. */
#include "model/backends/cuda/cuda-impl.cuh"

/* Runs `body` with T bound to the backend's activation type. */
#define ACT_DISPATCH(c, ...)                                                                       \
    do {                                                                                           \
        if ((c)->act == DT_BF16) {                                                                 \
            typedef bf16 T;                                                                        \
            __VA_ARGS__;                                                                           \
        } else {                                                                                   \
            typedef float T;                                                                       \
            __VA_ARGS__;                                                                           \
        }                                                                                          \
    } while (0)

static inline unsigned grid_for(size_t n, int block) {
    size_t g = (n + (size_t)block - 1) / (size_t)block;
    return (unsigned)(g > 65535u * 16u ? 65535u * 16u : (g ? g : 1)); /* grid-stride beyond */
}

/* ---- embedding: out[T, D] = table rows ids - row0, zero outside this shard ---- */
template <typename T, typename W>
__global__ void embed_kernel(T *out, const int32_t *ids, int n_tok, const W *table, int n_rows,
                             int D, int row0) {
    size_t n = (size_t)n_tok * D;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        int t = (int)(i / D), d = (int)(i % D);
        int r = ids[t] - row0;
        out[i] = from_f<T>(r >= 0 && r < n_rows ? to_f(table[(size_t)r * D + d]) : 0.0f);
    }
}

void cuda_embed(be_backend *be, void *out, const int32_t *ids, int T_, const be_weight *table,
                int row0) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK || T_ <= 0) return;
    const int32_t *d_ids = ids ? cuda_upload_idx(c, ids, (size_t)T_) : c->d_ids;
    if (!d_ids) return;
    int D = table->n_in;
    unsigned g = grid_for((size_t)T_ * D, 256);
    ACT_DISPATCH(c, if (table->dtype == DT_BF16) embed_kernel<T, bf16><<<g, 256, 0, c->stream>>>(
                        (T *)out, d_ids, T_, (const bf16 *)table->w, table->n_out, D, row0);
                 else embed_kernel<T, float><<<g, 256, 0, c->stream>>>(
                     (T *)out, d_ids, T_, (const float *)table->w, table->n_out, D, row0));
    CUDA_LAUNCHED(c, "embed_kernel");
}

/* ---- RMSNorm: one block per row; out may alias x (each thread rewrites what it read) ----
 * The scalar kernel serves rows whose width or alignment does not allow 16-byte vectors; the
 * vector kernel reads each row once into registers (NV vectors of 16 bytes a thread, a block
 * as wide as the row) so that one row costs one pass of loads, a shuffle + shared-memory sum
 * and one pass of stores. With ADD it first adds x into h (the residual), stores h rounded to
 * T, and normalizes that stored value, as add then rmsnorm would. */
template <typename T>
__global__ void rmsnorm_kernel(T *out, int out_stride, const T *x, int x_stride, const float *w,
                               int D, float eps) {
    __shared__ float red[32];
    const T *xr = x + (size_t)blockIdx.x * x_stride;
    T *orow = out + (size_t)blockIdx.x * out_stride;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float v = to_f(xr[i]);
        ss += v * v;
    }
    ss = block_sum(ss, red);
    float r = 1.0f / sqrtf(ss / (float)D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x) orow[i] = from_f<T>(w[i] * (to_f(xr[i]) * r));
}

template <typename T, bool ADD, int NV>
__global__ void __launch_bounds__(1024)
    rmsnorm_vec_kernel(T *out, int out_stride, T *h, int h_stride, const T *x, int x_stride,
                       const float *w, int D, float eps) {
    constexpr int V = 16 / sizeof(T); /* elements per 16-byte vector */
    __shared__ float red[32];
    int nvec = D / V;
    T *hr = h + (size_t)blockIdx.x * h_stride;
    T *orow = out + (size_t)blockIdx.x * out_stride;
    float v[NV][V];
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < NV; k++) {
        int i = threadIdx.x + k * blockDim.x;
        if (i >= nvec) continue;
        alignas(16) T e[V];
        *reinterpret_cast<uint4 *>(e) = *reinterpret_cast<const uint4 *>(hr + (size_t)i * V);
        if (ADD) {
            alignas(16) T a[V];
            *reinterpret_cast<uint4 *>(a) =
                *reinterpret_cast<const uint4 *>(x + (size_t)blockIdx.x * x_stride + (size_t)i * V);
#pragma unroll
            for (int j = 0; j < V; j++) e[j] = from_f<T>(to_f(e[j]) + to_f(a[j]));
            *reinterpret_cast<uint4 *>(hr + (size_t)i * V) = *reinterpret_cast<const uint4 *>(e);
        }
#pragma unroll
        for (int j = 0; j < V; j++) {
            v[k][j] = to_f(e[j]);
            ss += v[k][j] * v[k][j];
        }
    }
    ss = block_sum(ss, red);
    float r = 1.0f / sqrtf(ss / (float)D + eps);
#pragma unroll
    for (int k = 0; k < NV; k++) {
        int i = threadIdx.x + k * blockDim.x;
        if (i >= nvec) continue;
        alignas(16) float wv[V];
#pragma unroll
        for (int j = 0; j < V; j += 4)
            *reinterpret_cast<float4 *>(wv + j) =
                *reinterpret_cast<const float4 *>(w + (size_t)i * V + j);
        alignas(16) T e[V];
#pragma unroll
        for (int j = 0; j < V; j++) e[j] = from_f<T>(wv[j] * (v[k][j] * r));
        *reinterpret_cast<uint4 *>(orow + (size_t)i * V) = *reinterpret_cast<const uint4 *>(e);
    }
}

static inline bool aligned16(const void *p) {
    return ((uintptr_t)p & 15u) == 0;
}

/* Launches the vector kernel when rows allow it (D a multiple of the vector, every row start
 * 16-byte aligned, at most 8 vectors a thread); false: the caller takes another path. */
template <typename T, bool ADD>
static bool rmsnorm_vec_launch(cuda_backend *c, T *out, int out_stride, T *h, int h_stride,
                               const T *x, int x_stride, const float *w, int T_, int D, float eps) {
    const int V = 16 / (int)sizeof(T);
    size_t sz = sizeof(T);
    if (D % V || !aligned16(out) || !aligned16(h) || !aligned16(w) || (out_stride * sz) % 16 ||
        (h_stride * sz) % 16)
        return false;
    if (ADD && (!aligned16(x) || (x_stride * sz) % 16)) return false;
    int nvec = D / V, nv = 1;
    while (nv < 8 && nvec > nv * 1024) nv *= 2;
    if (nvec > nv * 1024) return false;
    int per = (nvec + nv - 1) / nv, block = (per + 31) / 32 * 32;
#define RMS_VEC(NV)                                                                                \
    rmsnorm_vec_kernel<T, ADD, NV>                                                                 \
        <<<T_, block, 0, c->stream>>>(out, out_stride, h, h_stride, x, x_stride, w, D, eps)
    if (nv == 1)
        RMS_VEC(1);
    else if (nv == 2)
        RMS_VEC(2);
    else if (nv == 4)
        RMS_VEC(4);
    else
        RMS_VEC(8);
#undef RMS_VEC
    return true;
}

void cuda_rmsnorm(be_backend *be, void *out, int out_stride, const void *x, int x_stride,
                  const void *w, int T_, int D, float eps) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK || T_ <= 0) return;
    int block = D >= 256 ? 256 : (D + 31) / 32 * 32;
    ACT_DISPATCH(
        c, if (!rmsnorm_vec_launch<T, false>(c, (T *)out, out_stride, (T *)x, x_stride,
                                             (const T *)NULL, 0, (const float *)w, T_, D, eps))
               rmsnorm_kernel<T><<<T_, block, 0, c->stream>>>((T *)out, out_stride, (const T *)x,
                                                              x_stride, (const float *)w, D, eps));
    CUDA_LAUNCHED(c, "rmsnorm_kernel");
}

void cuda_add_rmsnorm(be_backend *be, void *out, void *h, const void *x, const void *w, int T_,
                      int D, float eps) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK || T_ <= 0) return;
    bool done = false;
    ACT_DISPATCH(c, done = rmsnorm_vec_launch<T, true>(c, (T *)out, D, (T *)h, D, (const T *)x, D,
                                                       (const float *)w, T_, D, eps));
    if (done) {
        CUDA_LAUNCHED(c, "rmsnorm_vec_kernel (add)");
        return;
    }
    cuda_add(be, h, x, (size_t)T_ * D); /* rows the vectors cannot take: the two ops */
    cuda_rmsnorm(be, out, D, h, D, w, T_, D, eps);
}

/* ---- y += x ---- */
template <typename T> __global__ void add_kernel(T *y, const T *x, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = from_f<T>(to_f(y[i]) + to_f(x[i]));
}

void cuda_add(be_backend *be, void *y, const void *x, size_t n) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK || n == 0) return;
    ACT_DISPATCH(c,
                 add_kernel<T><<<grid_for(n, 256), 256, 0, c->stream>>>((T *)y, (const T *)x, n));
    CUDA_LAUNCHED(c, "add_kernel");
}

/* ---- out[T, I] = silu(gu[T, :I]) * gu[T, I:] ---- */
template <typename T> __global__ void silu_mul_kernel(T *out, const T *gu, int n_tok, int inter) {
    size_t n = (size_t)n_tok * inter;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t t = i / inter, k = i % inter;
        float g = to_f(gu[t * 2 * inter + k]), u = to_f(gu[t * 2 * inter + inter + k]);
        out[i] = from_f<T>(g / (1.0f + expf(-g)) * u);
    }
}

void cuda_silu_mul(be_backend *be, void *out, const void *gu, int T_, int inter) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK || T_ <= 0) return;
    size_t n = (size_t)T_ * inter;
    ACT_DISPATCH(c, silu_mul_kernel<T>
                 <<<grid_for(n, 256), 256, 0, c->stream>>>((T *)out, (const T *)gu, T_, inter));
    CUDA_LAUNCHED(c, "silu_mul_kernel");
}

/* ---- RoPE on interleaved pairs: angle pos * inv_freq[i], magnitude attn (YaRN) ---- */
template <typename T>
__global__ void rope_kernel(T *x, const int32_t *pos, int n_tok, int row_stride, int n_heads,
                            int head_stride, int col0, int half, const float *inv_freq,
                            float attn) {
    size_t n = (size_t)n_tok * n_heads * half;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n;
         k += (size_t)gridDim.x * blockDim.x) {
        int i = (int)(k % half), h = (int)(k / half % n_heads), t = (int)(k / half / n_heads);
        float a = (float)pos[t] * inv_freq[i], sn, cs;
        sincosf(a, &sn, &cs); /* full-range accuracy: positions reach the thousands */
        cs *= attn;
        sn *= attn;
        T *p = x + (size_t)t * row_stride + (size_t)h * head_stride + col0 + 2 * i;
        float x0 = to_f(p[0]), x1 = to_f(p[1]);
        p[0] = from_f<T>(x0 * cs - x1 * sn);
        p[1] = from_f<T>(x0 * sn + x1 * cs);
    }
}

void cuda_rope(be_backend *be, void *x, int T_, int row_stride, int n_heads, int head_stride,
               int col0, int rope_dim) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK || T_ <= 0) return;
    int half = rope_dim / 2;
    size_t n = (size_t)T_ * n_heads * half;
    ACT_DISPATCH(c, rope_kernel<T><<<grid_for(n, 256), 256, 0, c->stream>>>(
                        (T *)x, c->d_pos, T_, row_stride, n_heads, head_stride, col0, half,
                        c->d_inv_freq, c->rope_attn));
    CUDA_LAUNCHED(c, "rope_kernel");
}

/* ---- KV cache: row of (layer, slot) at ((block * n_layers + layer) * bs + off) * kv_dim ---- */
/* a cache element: the value itself (C = T), or e4m3 of value * inv (C = uint8_t, fp8 caches;
 * inv = 1 / be_kv.scale) */
template <typename T> __device__ __forceinline__ void kv_put(T *dst, T v, float) {
    *dst = v;
}
template <typename T> __device__ __forceinline__ void kv_put(uint8_t *dst, T v, float inv) {
    *dst = kv_to_e4m3(to_f(v) * inv);
}

template <typename T, typename C>
__global__ void kv_write_kernel(C *cache, const int32_t *slot, int n_tok, int n_layers, int bs,
                                int kv_dim, int layer, const T *kva, int kv_stride, float inv) {
    size_t n = (size_t)n_tok * kv_dim;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n;
         k += (size_t)gridDim.x * blockDim.x) {
        int t = (int)(k / kv_dim), d = (int)(k % kv_dim);
        int s = slot[t], blk = s / bs, off = s % bs;
        size_t row = ((size_t)blk * n_layers + layer) * bs + off;
        kv_put(cache + row * kv_dim + d, kva[(size_t)t * kv_stride + d], inv);
    }
}

void cuda_kv_write(be_backend *be, be_kv *kv, int layer, const void *kva, int kv_stride) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK || c->n_tokens <= 0) return;
    size_t n = (size_t)c->n_tokens * kv->kv_dim;
    if (kv->dtype == DT_F8_E4M3)
        ACT_DISPATCH(c,
                     kv_write_kernel<T, uint8_t><<<grid_for(n, 256), 256, 0, c->stream>>>(
                         (uint8_t *)kv->data, c->d_slot, c->n_tokens, kv->n_layers, kv->block_size,
                         kv->kv_dim, layer, (const T *)kva, kv_stride, 1.0f / kv->scale));
    else
        ACT_DISPATCH(c, kv_write_kernel<T, T><<<grid_for(n, 256), 256, 0, c->stream>>>(
                            (T *)kv->data, c->d_slot, c->n_tokens, kv->n_layers, kv->block_size,
                            kv->kv_dim, layer, (const T *)kva, kv_stride, 1.0f));
    CUDA_LAUNCHED(c, "kv_write_kernel");
}

/* ---- RoPE + KV write: one thread per column pair of a token's row; the pairs in the rope
 * columns rotate (the same arithmetic as rope_kernel) and go back to kva too, every pair goes
 * to the token's cache row ---- */
template <typename T, typename C>
__global__ void rope_kv_write_kernel(C *cache, const int32_t *slot, const int32_t *pos, int n_tok,
                                     int n_layers, int bs, int kv_dim, int layer, T *kva,
                                     int kv_stride, int col0, int half, const float *inv_freq,
                                     float attn, float inv) {
    int npair = kv_dim / 2;
    size_t n = (size_t)n_tok * npair;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n;
         k += (size_t)gridDim.x * blockDim.x) {
        int t = (int)(k / npair), p = (int)(k % npair);
        T *src = kva + (size_t)t * kv_stride + 2 * p;
        T o0 = src[0], o1 = src[1];
        int i = p - col0 / 2;
        if (i >= 0 && i < half) {
            float a = (float)pos[t] * inv_freq[i], sn, cs;
            sincosf(a, &sn, &cs);
            cs *= attn;
            sn *= attn;
            float x0 = to_f(o0), x1 = to_f(o1);
            o0 = from_f<T>(x0 * cs - x1 * sn);
            o1 = from_f<T>(x0 * sn + x1 * cs);
            src[0] = o0;
            src[1] = o1;
        }
        int s = slot[t], blk = s / bs, off = s % bs;
        C *dst = cache + (((size_t)blk * n_layers + layer) * bs + off) * kv_dim + 2 * p;
        kv_put(dst, o0, inv);
        kv_put(dst + 1, o1, inv);
    }
}

void cuda_rope_kv_write(be_backend *be, be_kv *kv, int layer, void *kva, int T_, int kv_stride,
                        int col0, int rope_dim) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK || T_ <= 0) return;
    if (kv->kv_dim % 2 || col0 % 2 || T_ != c->n_tokens) { /* pairs would straddle: two ops */
        cuda_rope(be, kva, T_, kv_stride, 1, 0, col0, rope_dim);
        cuda_kv_write(be, kv, layer, kva, kv_stride);
        return;
    }
    size_t n = (size_t)T_ * (kv->kv_dim / 2);
    if (kv->dtype == DT_F8_E4M3)
        ACT_DISPATCH(c, rope_kv_write_kernel<T, uint8_t><<<grid_for(n, 256), 256, 0, c->stream>>>(
                            (uint8_t *)kv->data, c->d_slot, c->d_pos, T_, kv->n_layers,
                            kv->block_size, kv->kv_dim, layer, (T *)kva, kv_stride, col0,
                            rope_dim / 2, c->d_inv_freq, c->rope_attn, 1.0f / kv->scale));
    else
        ACT_DISPATCH(c, rope_kv_write_kernel<T, T><<<grid_for(n, 256), 256, 0, c->stream>>>(
                            (T *)kv->data, c->d_slot, c->d_pos, T_, kv->n_layers, kv->block_size,
                            kv->kv_dim, layer, (T *)kva, kv_stride, col0, rope_dim / 2,
                            c->d_inv_freq, c->rope_attn, 1.0f));
    CUDA_LAUNCHED(c, "rope_kv_write_kernel");
}

/* ---- rows: dst[i] = src[idx[i]]; dst[idx[i]] += src[i] (idx distinct) ---- */
template <typename T>
__global__ void gather_kernel(T *dst, const T *src, const int32_t *idx, int n, int D) {
    size_t total = (size_t)n * D;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < total;
         k += (size_t)gridDim.x * blockDim.x) {
        size_t i = k / D, d = k % D;
        dst[k] = src[(size_t)idx[i] * D + d];
    }
}

template <typename T>
__global__ void scatter_add_kernel(T *dst, const T *src, const int32_t *idx, int n, int D) {
    size_t total = (size_t)n * D;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < total;
         k += (size_t)gridDim.x * blockDim.x) {
        size_t i = k / D, d = k % D;
        T *p = dst + (size_t)idx[i] * D + d;
        *p = from_f<T>(to_f(*p) + to_f(src[k]));
    }
}

void cuda_gather_rows(be_backend *be, void *dst, const void *src, const int32_t *idx, int n,
                      int D) {
    cuda_backend *c = cuda_be(be);
    if (!idx) n = c->n_out;
    if (c->err != DUET_OK || n <= 0) return;
    const int32_t *d_idx = idx ? cuda_upload_idx(c, idx, (size_t)n) : c->d_out;
    if (!d_idx) return;
    size_t total = (size_t)n * D;
    ACT_DISPATCH(c, gather_kernel<T><<<grid_for(total, 256), 256, 0, c->stream>>>(
                        (T *)dst, (const T *)src, d_idx, n, D));
    CUDA_LAUNCHED(c, "gather_kernel");
}

void cuda_scatter_add_rows(be_backend *be, void *dst, const void *src, const int32_t *idx, int n,
                           int D) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK || n <= 0) return;
    int32_t *d_idx = cuda_upload_idx(c, idx, (size_t)n);
    if (!d_idx) return;
    size_t total = (size_t)n * D;
    ACT_DISPATCH(c, scatter_add_kernel<T><<<grid_for(total, 256), 256, 0, c->stream>>>(
                        (T *)dst, (const T *)src, d_idx, n, D));
    CUDA_LAUNCHED(c, "scatter_add_kernel");
}

/* ---- conversions ---- */
template <typename S, typename D> __global__ void convert_kernel(D *dst, const S *src, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = from_f<D>(to_f(src[i]));
}

template <typename S>
__global__ void convert_rows_kernel(float *dst, const S *src, int rows, int cols, int stride) {
    size_t n = (size_t)rows * cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = to_f(src[i / cols * (size_t)stride + i % cols]);
}

void cuda_act_to_f32(cuda_backend *c, float *dst, const void *src, size_t n) {
    if (c->err != DUET_OK || n == 0) return;
    ACT_DISPATCH(c, convert_kernel<T, float>
                 <<<grid_for(n, 256), 256, 0, c->stream>>>(dst, (const T *)src, n));
    CUDA_LAUNCHED(c, "convert_kernel");
}

void cuda_f32_to_act(cuda_backend *c, void *dst, const float *src, size_t n) {
    if (c->err != DUET_OK || n == 0) return;
    ACT_DISPATCH(c, convert_kernel<float, T>
                 <<<grid_for(n, 256), 256, 0, c->stream>>>((T *)dst, src, n));
    CUDA_LAUNCHED(c, "convert_kernel");
}

void cuda_act_to_f32_rows(cuda_backend *c, float *dst, const void *src, int rows, int cols,
                          int src_stride) {
    if (c->err != DUET_OK || rows <= 0) return;
    size_t n = (size_t)rows * cols;
    ACT_DISPATCH(c, convert_rows_kernel<T><<<grid_for(n, 256), 256, 0, c->stream>>>(
                        dst, (const T *)src, rows, cols, src_stride));
    CUDA_LAUNCHED(c, "convert_rows_kernel");
}
