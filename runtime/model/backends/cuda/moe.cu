/* MoE on the GPU: routing (scores, group limits, top-k and weights exactly as cpu_moe_route
 * states them) and the routed experts, in two forms. Host routing (moe_route / moe_experts):
 * the host orders the (token, expert) pairs by expert, runs each expert's GEMMs through cuBLAS
 * and a combine kernel adds each token's results. Device routing (moe_route_dev /
 * moe_experts_dev, the path the forward takes): ids stay on the device, a counting sort there
 * groups the pairs by expert into tiles, two grouped GEMM launches (moe_gemm.cu) run every
 * touched expert and the shared experts together, and the combine adds each token's results in
 * expert order (no atomics: deterministic). EP dispatch packing lives here too. */
#include <stdlib.h>
#include <string.h>

#include "model/backends/cuda/moe-impl.cuh"

#define ROUTE_WARPS 4

/* The best of (v, i) pairs: larger value, then lower index (the CPU's topk_indices order). */
__device__ __forceinline__ void argmax_merge(float &bv, int &bi, float v, int i) {
    if (v > bv || (v == bv && i < bi)) {
        bv = v;
        bi = i;
    }
}

__device__ __forceinline__ int warp_argmax(float bv, int bi) {
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        argmax_merge(bv, bi, ov, oi);
    }
    return bi;
}

/* The routing of token t by one warp, from its float32 logits (read through L2: the fused
 * kernel reads what other blocks wrote). Shared for the warp: s [E], choice [E], taken [E],
 * gscore [G], gkeep [G]. */
__device__ void route_token(const float *logits, float *sh, int t, int E, int K, int G,
                            int topk_group, int softmax, int grouped, int noaux, const float *bias,
                            int norm, float scale, int32_t *ids, float *weights) {
    const int lane = threadIdx.x & 31;
    float *s = sh, *ch = s + E, *taken = ch + E;
    float *gs = taken + E, *gk = gs + G;
    const float *lg = logits + (size_t)t * E;

    if (softmax) {
        float m = -INFINITY;
        for (int e = lane; e < E; e += 32) m = fmaxf(m, __ldcg(lg + e));
        m = warp_max(m);
        float sum = 0.0f;
        for (int e = lane; e < E; e += 32) {
            s[e] = expf(__ldcg(lg + e) - m);
            sum += s[e];
        }
        sum = warp_sum(sum);
        for (int e = lane; e < E; e += 32) s[e] /= sum;
    } else {
        for (int e = lane; e < E; e += 32) s[e] = 1.0f / (1.0f + expf(-__ldcg(lg + e)));
    }
    for (int e = lane; e < E; e += 32) {
        ch[e] = s[e] + (bias ? bias[e] : 0.0f); /* the bias steers the choice only */
        taken[e] = 0.0f;
    }
    __syncwarp();
    if (grouped) {
        const int per = E / G;
        for (int g = lane; g < G; g += 32) {
            const float *cg = ch + g * per;
            float m1 = -INFINITY, m2 = -INFINITY;
            for (int i = 0; i < per; i++) {
                float v = cg[i];
                if (v > m1) {
                    m2 = m1;
                    m1 = v;
                } else if (v > m2) {
                    m2 = v;
                }
            }
            gs[g] = noaux ? m1 + m2 : m1; /* V3: top-2 sum; V2: the best expert */
            gk[g] = 0.0f;
        }
        __syncwarp();
        for (int r = 0; r < topk_group; r++) {
            float bv = -INFINITY;
            int bi = 0x7fffffff;
            for (int g = lane; g < G; g += 32)
                if (gk[g] == 0.0f) argmax_merge(bv, bi, gs[g], g);
            bi = warp_argmax(bv, bi);
            if (lane == 0) gk[bi] = 1.0f;
            __syncwarp();
        }
        for (int e = lane; e < E; e += 32)
            if (gk[e / per] == 0.0f) ch[e] = -INFINITY;
        __syncwarp();
    }
    float wsum = 0.0f;
    for (int k = 0; k < K; k++) {
        float bv = -INFINITY;
        int bi = 0x7fffffff;
        for (int e = lane; e < E; e += 32)
            if (taken[e] == 0.0f) argmax_merge(bv, bi, ch[e], e);
        bi = warp_argmax(bv, bi);
        if (lane == 0) {
            taken[bi] = 1.0f;
            ids[(size_t)t * K + k] = bi;
            weights[(size_t)t * K + k] = s[bi];
        }
        wsum += s[bi];
        __syncwarp();
    }
    if (lane == 0)
        for (int k = 0; k < K; k++) {
            float w = weights[(size_t)t * K + k];
            if (norm) w /= wsum + 1e-20f;
            weights[(size_t)t * K + k] = w * scale;
        }
}

/* One warp per token. */
__global__ void route_kernel(const float *logits, int n_tok, int E, int K, int G, int topk_group,
                             int softmax, int grouped, int noaux, const float *bias, int norm,
                             float scale, int32_t *ids, float *weights) {
    extern __shared__ float sh[];
    const int warp = threadIdx.x >> 5;
    const int t = blockIdx.x * (blockDim.x >> 5) + warp;
    if (t >= n_tok) return; /* whole warps leave: only warp-level sync inside */
    route_token(logits, sh + (size_t)warp * (3 * E + 2 * G), t, E, K, G, topk_group, softmax,
                grouped, noaux, bias, norm, scale, ids, weights);
}

/* ---- the router in one launch for a few tokens (T <= ROUTE_FUSED_MAX_T) ----
 * Block (bx, by): warp w computes the float32 logits of expert bx * ROUTE_GEMV_WARPS + w for
 * the ROUTE_TOK tokens from by * ROUTE_TOK (the gate row read once for them in 16-byte loads,
 * float32 products of the exact values, a warp-shuffle sum); the last block of row by to
 * finish (a device counter per row, back to zero when it is done, so a replayed graph finds
 * it zeroed) routes those tokens with route_token, a warp each. Replaces the conversion of x
 * to float32, cuBLAS's GEMV and its reduction, and route_kernel. */
#define ROUTE_FUSED_MAX_T 8 /* measured: one warp per expert loses to cuBLAS past a few tokens */
#define ROUTE_GEMV_WARPS  4
#define ROUTE_TOK         8
#define ROUTE_ROWS        (ROUTE_FUSED_MAX_T / ROUTE_TOK)

__device__ __forceinline__ void load4(const float *p, float *v) {
    float4 q = *reinterpret_cast<const float4 *>(p);
    v[0] = q.x;
    v[1] = q.y;
    v[2] = q.z;
    v[3] = q.w;
}
__device__ __forceinline__ void load4(const bf16 *p, float *v) {
    alignas(8) bf16 e[4];
    *reinterpret_cast<uint2 *>(e) = *reinterpret_cast<const uint2 *>(p);
    for (int j = 0; j < 4; j++) v[j] = __bfloat162float(e[j]);
}

template <typename X, typename W>
__global__ void route_fused_kernel(const X *x, int x_stride, const W *gate, int D, float *logits,
                                   int n_tok, int E, int K, int G, int topk_group, int softmax,
                                   int grouped, int noaux, const float *bias, int norm, float scale,
                                   int32_t *ids, float *weights, unsigned *done) {
    extern __shared__ float sh[];
    __shared__ bool last;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int e = blockIdx.x * nw + warp, t0 = blockIdx.y * ROUTE_TOK;
    if (e < E) {
        const W *wr = gate + (size_t)e * D;
        float acc[ROUTE_TOK];
#pragma unroll
        for (int j = 0; j < ROUTE_TOK; j++) acc[j] = 0.0f;
        for (int d = lane * 4; d < D; d += 128) {
            float wv[4];
            load4(wr + d, wv);
#pragma unroll
            for (int j = 0; j < ROUTE_TOK; j++) {
                if (t0 + j >= n_tok) break;
                float xv[4];
                load4(x + (size_t)(t0 + j) * x_stride + d, xv);
                acc[j] += xv[0] * wv[0] + xv[1] * wv[1] + xv[2] * wv[2] + xv[3] * wv[3];
            }
        }
#pragma unroll
        for (int j = 0; j < ROUTE_TOK; j++) {
            if (t0 + j >= n_tok) break;
            float v = warp_sum(acc[j]);
            if (lane == 0) logits[(size_t)(t0 + j) * E + e] = v;
        }
    }
    __threadfence(); /* the logits are visible before the counter says so */
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(done + blockIdx.y, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    int t_end = min(t0 + ROUTE_TOK, n_tok);
    for (int t = t0 + warp; t < t_end; t += nw)
        route_token(logits, sh + (size_t)warp * (3 * E + 2 * G), t, E, K, G, topk_group, softmax,
                    grouped, noaux, bias, norm, scale, ids, weights);
    if (threadIdx.x == 0) done[blockIdx.y] = 0u;
}

static bool route_supported(const be_route_params *p, const be_weight *gate) {
    const int E = p->n_experts, K = p->top_k, G = p->n_group > 0 ? p->n_group : 1;
    /* the CPU reference's limits */
    return E <= 1024 && G <= 256 && K <= 64 && K <= E && E % G == 0 && gate->n_out == E;
}

/* The fused router's launch, when T, the gate's type and the alignment allow it (false: the
 * caller runs the four-kernel path). */
static bool route_fused(cuda_backend *c, float *logits, const void *x, int T_,
                        const be_weight *gate, const void *bias, const be_route_params *p,
                        int32_t *d_ids, float *d_w) {
    const int E = p->n_experts, K = p->top_k, G = p->n_group > 0 ? p->n_group : 1, D = gate->n_in;
    bool gate_f32 = gate->dtype == DT_F32, x_f32 = c->act == DT_F32;
    if (T_ > ROUTE_FUSED_MAX_T || D % 4 || (!gate_f32 && gate->dtype != c->act) ||
        ((uintptr_t)x & 15u) || ((uintptr_t)gate->w & 15u))
        return false;
    if (!c->route_done) {
        /* the counter: allocated by an eager step, never inside a recording */
        if (c->capturing) return false;
        size_t bytes = ROUTE_ROWS * sizeof(unsigned);
        if (CUDA_CHECK(c, cudaMalloc(&c->route_done, bytes)) != DUET_OK ||
            CUDA_CHECK(c, cudaMemsetAsync(c->route_done, 0, bytes, c->stream)) != DUET_OK) {
            cudaFree(c->route_done);
            c->route_done = NULL;
            return false;
        }
    }
    size_t shm = (size_t)ROUTE_GEMV_WARPS * (3 * E + 2 * G) * sizeof(float);
    if (shm > 40 * 1024) return false; /* route_kernel's limit; it runs fewer warps a block */
    dim3 grid((unsigned)((E + ROUTE_GEMV_WARPS - 1) / ROUTE_GEMV_WARPS),
              (unsigned)((T_ + ROUTE_TOK - 1) / ROUTE_TOK));
    bool grouped = p->method != CFG_TOPK_GREEDY && G > 1;
#define ROUTE_FUSED(X, W)                                                                          \
    route_fused_kernel<X, W><<<grid, ROUTE_GEMV_WARPS * 32, shm, c->stream>>>(                     \
        (const X *)x, D, (const W *)gate->w, D, logits, T_, E, K, G, grouped ? p->topk_group : 0,  \
        p->scoring == CFG_SCORING_SOFTMAX, grouped, p->method == CFG_TOPK_NOAUX_TC,                \
        (const float *)bias, p->norm_topk_prob && p->scale_after_norm, p->routed_scaling_factor,   \
        d_ids, d_w, c->route_done)
    if (x_f32)
        ROUTE_FUSED(float, float);
    else if (gate_f32)
        ROUTE_FUSED(bf16, float);
    else
        ROUTE_FUSED(bf16, bf16);
#undef ROUTE_FUSED
    CUDA_LAUNCHED(c, "route_fused_kernel");
    return true;
}

/* logits [T, E] (float32 scratch), then scores and the top-k into device ids [T, K] and
 * weights [T, K]; on the stream. x rows are the gate's n_in apart. */
static duet_status route_to_device(cuda_backend *c, float *logits, const void *x, int T_,
                                   const be_weight *gate, const void *bias,
                                   const be_route_params *p, int32_t *d_ids, float *d_w) {
    const int E = p->n_experts, K = p->top_k, G = p->n_group > 0 ? p->n_group : 1;
    if (route_fused(c, logits, x, T_, gate, bias, p, d_ids, d_w)) return c->err;
    /* logits[T, E] = x @ gate^T in float32 */
    cuda_linear_f32out(c, logits, x, gate->n_in, T_, gate);
    size_t per_warp = (size_t)(3 * E + 2 * G) * sizeof(float);
    int warps = ROUTE_WARPS;
    while (warps > 1 && per_warp * warps > 40 * 1024) warps--;
    bool grouped = p->method != CFG_TOPK_GREEDY && G > 1;
    route_kernel<<<(T_ + warps - 1) / warps, warps * 32, per_warp * warps, c->stream>>>(
        logits, T_, E, K, G, grouped ? p->topk_group : 0, p->scoring == CFG_SCORING_SOFTMAX,
        grouped, p->method == CFG_TOPK_NOAUX_TC, (const float *)bias,
        p->norm_topk_prob && p->scale_after_norm, p->routed_scaling_factor, d_ids, d_w);
    return CUDA_LAUNCHED(c, "route_kernel");
}

duet_status cuda_moe_route(be_backend *be, const void *x, int T_, const be_weight *gate,
                           const void *bias, const be_route_params *p, int32_t *ids,
                           float *weights) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return c->err;
    if (T_ <= 0) return DUET_OK;
    if (!route_supported(p, gate)) return DUET_ERR_UNSUPPORTED;
    size_t nl = (size_t)T_ * p->n_experts, nk = (size_t)T_ * p->top_k;
    float *logits = (float *)cuda_scratch(c, SCR_ROUTE, (nl + 2 * nk) * sizeof(float));
    if (!logits) return c->err;
    int32_t *d_ids = (int32_t *)(logits + nl);
    float *d_w = logits + nl + nk;
    duet_status st = route_to_device(c, logits, x, T_, gate, bias, p, d_ids, d_w);
    if (st == DUET_OK)
        st = CUDA_CHECK(c, cudaMemcpyAsync(ids, d_ids, nk * sizeof(int32_t), cudaMemcpyDeviceToHost,
                                           c->stream));
    if (st == DUET_OK)
        st = CUDA_CHECK(c, cudaMemcpyAsync(weights, d_w, nk * sizeof(float), cudaMemcpyDeviceToHost,
                                           c->stream));
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaStreamSynchronize(c->stream));
    return st != DUET_OK ? st : c->err;
}

/* xs[i] = x[rows[i]], rows of D */
template <typename T>
__global__ void moe_gather(T *xs, const T *x, const int32_t *rows, int n, int D) {
    size_t total = (size_t)n * D;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < total;
         k += (size_t)gridDim.x * blockDim.x)
        xs[k] = x[(size_t)rows[k / D] * D + k % D];
}

/* out[t] += sum over the token's slots (in expert order) of w[slot] * y[slot] */
template <typename T>
__global__ void moe_combine(T *out, const T *y, const int32_t *tok_slots, const float *slot_w,
                            int n_tok, int K, int D) {
    size_t total = (size_t)n_tok * D;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < total;
         k += (size_t)gridDim.x * blockDim.x) {
        size_t t = k / D, d = k % D;
        const int32_t *sl = tok_slots + t * K;
        float acc = to_f(out[k]);
        for (int j = 0; j < K && sl[j] >= 0; j++)
            acc += slot_w[sl[j]] * to_f(y[(size_t)sl[j] * D + d]);
        out[k] = from_f<T>(acc);
    }
}

static unsigned grid_of(size_t n) {
    size_t g = (n + 255) / 256;
    return (unsigned)(g > 65535u * 16u ? 65535u * 16u : (g ? g : 1));
}

template <typename T>
static void experts_run(cuda_backend *c, void *out, const void *x, int T_, int D,
                        const int32_t *ids, const float *weights, int K, const be_ffn *experts,
                        int e0, int n_local) {
    const int I = experts[0].n_inter;
    /* host tables, one upload: rows [nk] (token of each slot), tok_slots [nk] (each token's
     * slots in ascending expert order, -1 after the last), slot_w [nk]; plus off [n_local + 1]
     * (each expert's first slot) which stays on the host */
    const size_t nk = (size_t)T_ * K;
    int32_t *h = (int32_t *)cuda_host_tmp(c, (3 * nk + (size_t)n_local + 1) * sizeof(int32_t));
    if (!h) return;
    int32_t *rows = h, *tok_slots = h + nk, *off = h + 3 * nk;
    float *slot_w = (float *)(h + 2 * nk);
    memset(off, 0, ((size_t)n_local + 1) * sizeof(int32_t));
    for (size_t i = 0; i < nk; i++) {
        int e = ids[i] - e0;
        if (e >= 0 && e < n_local) off[e + 1]++;
    }
    for (int e = 0; e < n_local; e++) off[e + 1] += off[e];
    const int N = off[n_local];
    if (N == 0) return;
    /* counting sort by expert; tokens stay ascending within an expert, as the CPU walks them */
    int32_t *cursor = tok_slots; /* borrowed for n_local counters, rebuilt just below */
    if ((size_t)n_local > nk) {
        cursor = (int32_t *)malloc((size_t)n_local * sizeof(int32_t));
        if (!cursor) {
            c->err = DUET_ERR_NO_MEMORY;
            return;
        }
    }
    memcpy(cursor, off, (size_t)n_local * sizeof(int32_t));
    for (int t = 0; t < T_; t++)
        for (int k = 0; k < K; k++) {
            int e = ids[(size_t)t * K + k] - e0;
            if (e < 0 || e >= n_local) continue;
            int at = cursor[e]++;
            rows[at] = t;
            slot_w[at] = weights[(size_t)t * K + k];
        }
    if (cursor != tok_slots) free(cursor);
    for (size_t i = 0; i < nk; i++) tok_slots[i] = -1;
    for (int e = 0; e < n_local; e++)
        for (int at = off[e]; at < off[e + 1]; at++) {
            int32_t *ts = tok_slots + (size_t)rows[at] * K;
            int j = 0;
            while (ts[j] >= 0) j++;
            ts[j] = at; /* experts visited in order: slots land in expert order */
        }
    int32_t *d = cuda_upload_idx(c, h, 3 * nk);
    if (!d) return;
    const int32_t *d_rows = d, *d_tok = d + nk;
    const float *d_w = (const float *)(d + 2 * nk);

    /* xs [N, D], gu [N, 2I], act [N, I], y [N, D] */
    size_t n_xs = (size_t)N * D, n_gu = (size_t)N * 2 * I, n_act = (size_t)N * I;
    T *xs = (T *)cuda_scratch(c, SCR_OP, (2 * n_xs + n_gu + n_act) * sizeof(T));
    if (!xs) return;
    T *gu = xs + n_xs, *act = gu + n_gu, *y = act + n_act;
    moe_gather<T><<<grid_of(n_xs), 256, 0, c->stream>>>(xs, (const T *)x, d_rows, N, D);
    if (CUDA_LAUNCHED(c, "moe_gather") != DUET_OK) return;
    for (int e = 0; e < n_local; e++) {
        int n = off[e + 1] - off[e];
        if (!n) continue;
        const be_ffn *f = &experts[e];
        cuda_gemm_w(c, gu + (size_t)off[e] * 2 * I, 2 * I, xs + (size_t)off[e] * D, D, n,
                    f->gate_up);
    }
    cuda_silu_mul(&c->base, act, gu, N, I);
    for (int e = 0; e < n_local; e++) {
        int n = off[e + 1] - off[e];
        if (!n) continue;
        const be_ffn *f = &experts[e];
        cuda_gemm_w(c, y + (size_t)off[e] * D, D, act + (size_t)off[e] * I, I, n, f->down);
    }
    moe_combine<T>
        <<<grid_of((size_t)T_ * D), 256, 0, c->stream>>>((T *)out, y, d_tok, d_w, T_, K, D);
    CUDA_LAUNCHED(c, "moe_combine");
}

/* a weight the expert GEMMs take: the activation type, or FP8 with bf16 activations */
static bool weight_usable(const cuda_backend *c, const be_weight *w) {
    return w->dtype == c->act || (w->dtype == DT_F8_E4M3 && c->act == DT_BF16);
}

void cuda_moe_experts(be_backend *be, void *out, const void *x, int T_, int D, const int32_t *ids,
                      const float *weights, int K, const be_ffn *experts, int e0, int n_local) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK || T_ <= 0 || n_local <= 0) return;
    for (int e = 0; e < n_local; e++)
        if (!weight_usable(c, experts[e].gate_up) || !weight_usable(c, experts[e].down) ||
            experts[e].n_inter != experts[0].n_inter) {
            LOG_ERROR("cuda backend: experts need weights of the activation type (or FP8) and one "
                      "width");
            c->err = DUET_ERR_INTERNAL;
            return;
        }
    if (c->act == DT_BF16)
        experts_run<bf16>(c, out, x, T_, D, ids, weights, K, experts, e0, n_local);
    else
        experts_run<float>(c, out, x, T_, D, ids, weights, K, experts, e0, n_local);
}

/* ======== device routing: nothing below waits for the host or depends on routing results
 * for its launch shapes ======== */

void cuda_moe_route_dev(be_backend *be, const void *x, int T_, const be_weight *gate,
                        const void *bias, const be_route_params *p, int32_t *ids, float *weights) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK || T_ <= 0) return;
    if (!route_supported(p, gate)) {
        LOG_ERROR("cuda backend: routing of %d experts, top-%d, %d groups is not supported",
                  p->n_experts, p->top_k, p->n_group);
        c->err = DUET_ERR_UNSUPPORTED;
        return;
    }
    float *logits = (float *)cuda_scratch(c, SCR_ROUTE, (size_t)T_ * p->n_experts * sizeof(float));
    if (logits) route_to_device(c, logits, x, T_, gate, bias, p, ids, weights);
}

/* ---- expert weight tables: the grouped GEMMs find each expert's weights through a device
 * array of pointers, built once per expert set (a layer's experts) and checked on every use
 * against the weights it was built from ---- */

struct moe_wtab {
    const be_ffn *experts, *shared;
    int n_local;
    /* [2 * (2 * n_local + 2)]: gate_up of each, down of each, shared gate_up, down; then the
     * same weights' FP8 scales (NULL for bf16) */
    const void **host;
    void **dev;
};

static bool wtab_set(const void **slot, const void *v, bool check) {
    bool same = *slot == v;
    if (!check) *slot = v;
    return same;
}

static bool wtab_fill(const moe_wtab *t, const be_ffn *experts, const be_ffn *shared, bool check) {
    const int n = t->n_local, ns = 2 * n + 2;
    bool same = true;
    for (int e = 0; e < n; e++) {
        same = wtab_set(&t->host[e], experts[e].gate_up->w, check) && same;
        same = wtab_set(&t->host[n + e], experts[e].down->w, check) && same;
        same = wtab_set(&t->host[ns + e], experts[e].gate_up->scale, check) && same;
        same = wtab_set(&t->host[ns + n + e], experts[e].down->scale, check) && same;
    }
    const be_weight *sg = shared ? shared->gate_up : NULL, *sd = shared ? shared->down : NULL;
    same = wtab_set(&t->host[2 * n], sg ? sg->w : NULL, check) && same;
    same = wtab_set(&t->host[2 * n + 1], sd ? sd->w : NULL, check) && same;
    same = wtab_set(&t->host[ns + 2 * n], sg ? sg->scale : NULL, check) && same;
    same = wtab_set(&t->host[ns + 2 * n + 1], sd ? sd->scale : NULL, check) && same;
    return same;
}

/* The device table of (experts, shared), or NULL (error recorded). */
static void *const *wtab_get(cuda_backend *c, const be_ffn *experts, int n_local,
                             const be_ffn *shared) {
    moe_wtab *t = NULL;
    for (int i = 0; i < c->n_moe_tabs && !t; i++) {
        moe_wtab *u = &c->moe_tabs[i];
        if (u->experts == experts && u->shared == shared && u->n_local == n_local) t = u;
    }
    if (t && wtab_fill(t, experts, shared, true)) return t->dev;
    if (!t) {
        moe_wtab *grown =
            (moe_wtab *)realloc(c->moe_tabs, (size_t)(c->n_moe_tabs + 1) * sizeof(moe_wtab));
        if (!grown) {
            c->err = DUET_ERR_NO_MEMORY;
            return NULL;
        }
        c->moe_tabs = grown;
        t = &c->moe_tabs[c->n_moe_tabs];
        memset(t, 0, sizeof *t);
        size_t n = 2 * (2 * (size_t)n_local + 2);
        t->host = (const void **)calloc(n, sizeof(void *));
        if (!t->host || CUDA_CHECK(c, cudaMalloc(&t->dev, n * sizeof(void *))) != DUET_OK) {
            free(t->host);
            if (c->err == DUET_OK) c->err = DUET_ERR_NO_MEMORY;
            return NULL;
        }
        t->experts = experts;
        t->shared = shared;
        t->n_local = n_local;
        c->n_moe_tabs++;
    }
    /* new, or the weights behind it changed: (re)built before any step is captured */
    wtab_fill(t, experts, shared, false);
    if (CUDA_CHECK(c,
                   cudaMemcpyAsync(t->dev, t->host, 2 * (2 * (size_t)n_local + 2) * sizeof(void *),
                                   cudaMemcpyHostToDevice, c->stream)) != DUET_OK)
        return NULL;
    return t->dev;
}

void cuda_moe_cleanup(cuda_backend *c) {
    cudaFree(c->route_done);
    c->route_done = NULL;
    for (int i = 0; i < c->n_moe_tabs; i++) {
        cudaFree(c->moe_tabs[i].dev);
        free(c->moe_tabs[i].host);
    }
    free(c->moe_tabs);
    c->moe_tabs = NULL;
    c->n_moe_tabs = 0;
}

/* ---- block-wide helpers ---- */

/* Exclusive prefix sum of v over the block (blockDim.x a multiple of 32); *total = the sum.
 * wsum holds 32 ints. Every thread must call. */
__device__ int block_scan(int v, int *wsum, int *total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int x = v;
    for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) wsum[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int s = lane < nw ? wsum[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            int y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += y;
        }
        wsum[lane] = s; /* inclusive sums of the warps */
    }
    __syncthreads();
    int base = warp > 0 ? wsum[warp - 1] : 0;
    *total = wsum[nw - 1];
    __syncthreads(); /* wsum is free for the next call */
    return base + x - v;
}

/* VEC elements as float, through one 16-byte access when VEC elements fill it. */
template <typename T, int VEC> __device__ __forceinline__ void ld_vec(const T *p, float (&v)[VEC]) {
    if constexpr (VEC * sizeof(T) == 16) {
        uint4 u = *reinterpret_cast<const uint4 *>(p);
        const T *e = reinterpret_cast<const T *>(&u);
        for (int i = 0; i < VEC; i++) v[i] = to_f(e[i]);
    } else {
        for (int i = 0; i < VEC; i++) v[i] = to_f(p[i]);
    }
}
template <typename T, int VEC> __device__ __forceinline__ void st_vec(T *p, const float (&v)[VEC]) {
    if constexpr (VEC * sizeof(T) == 16) {
        uint4 u;
        T *e = reinterpret_cast<T *>(&u);
        for (int i = 0; i < VEC; i++) e[i] = from_f<T>(v[i]);
        *reinterpret_cast<uint4 *>(p) = u;
    } else {
        for (int i = 0; i < VEC; i++) p[i] = from_f<T>(v[i]);
    }
}

/* ---- the counting sort: (row, k) pairs of the local experts grouped by expert ----
 * One block. counts[0] = routed row tiles, counts[1] = shared row tiles. Within an expert the
 * rows land in any order (shared-memory atomics): every output row is computed the same way
 * wherever it sits, so results do not depend on it. */
__global__ void moe_sort_kernel(const int32_t *ids, int ms, int n, int K, int e0, int n_local,
                                int bm, int n_shared, int32_t *slot_row, int32_t *slot_of,
                                int4 *tiles, int4 *tiles_s, int *counts) {
    extern __shared__ int sh_sort[];
    int *cnt = sh_sort, *cursor = cnt + n_local, *wsum = cnt + 2 * n_local; /* wsum: 32 */
    const int tid = threadIdx.x, pairs = n * K;
    for (int e = tid; e < n_local; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (int i = tid; i < pairs; i += blockDim.x) {
        int r = i / K, e = ids[(long long)r * ms + (i - r * K)] - e0;
        if ((unsigned)e < (unsigned)n_local) atomicAdd(&cnt[e], 1);
    }
    __syncthreads();
    /* one expert per thread (n_local <= blockDim.x): slot offsets and row-tile offsets */
    int v = tid < n_local ? cnt[tid] : 0, tv = (v + bm - 1) / bm, tot, ttot;
    int off = block_scan(v, wsum, &tot), toff = block_scan(tv, wsum, &ttot);
    if (tid < n_local) {
        cursor[tid] = off;
        for (int j = 0; j < tv; j++)
            tiles[toff + j] = make_int4(tid, off + j * bm, min(bm, v - j * bm), 0);
    }
    const int ns = (n_shared + bm - 1) / bm;
    for (int j = tid; j < ns; j += blockDim.x)
        tiles_s[j] = make_int4(0, j * bm, min(bm, n_shared - j * bm), 0);
    if (tid == 0) {
        counts[0] = ttot;
        counts[1] = ns;
    }
    __syncthreads();
    for (int i = tid; i < pairs; i += blockDim.x) {
        int r = i / K, e = ids[(long long)r * ms + (i - r * K)] - e0;
        if ((unsigned)e < (unsigned)n_local) {
            int p = atomicAdd(&cursor[e], 1);
            slot_row[p] = r;
            slot_of[i] = p;
        } else {
            slot_of[i] = -1;
        }
    }
}

/* out[r] = sum over the row's local pairs in ascending expert order of w * y[slot] (+ ys[r]).
 * One block per row (grid-stride) and per chunk of `chunk` columns (blockIdx.y: a few rows
 * spread over several blocks instead of queueing on one), VEC columns per thread. The row's K
 * (slot, id, weight) triples are read by K threads at once, then put in expert order by one. */
template <typename T, int VEC>
__global__ void moe_combine_dev_kernel(T *out, int n, int D, int K, const int32_t *ids,
                                       const float *w, int ms, const int32_t *slot_of, const T *y,
                                       const T *ys, int chunk) {
    __shared__ int s_id[64], s_slot[64], s_cnt, r_id[64], r_slot[64];
    __shared__ float s_w[64], r_w[64];
    const int d0 = blockIdx.y * chunk, d1 = min(D, d0 + chunk);
    for (int r = blockIdx.x; r < n; r += gridDim.x) {
        for (int k = threadIdx.x; k < K; k += blockDim.x) {
            int p = slot_of[(long long)r * K + k];
            r_slot[k] = p;
            r_id[k] = p < 0 ? 0 : ids[(long long)r * ms + k];
            r_w[k] = p < 0 ? 0.0f : w[(long long)r * ms + k];
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int cnt = 0;
            for (int k = 0; k < K; k++) {
                int p = r_slot[k];
                if (p < 0) continue;
                int id = r_id[k], j = cnt++;
                float wt = r_w[k];
                for (; j > 0 && s_id[j - 1] > id; j--) { /* insertion: ascending expert */
                    s_id[j] = s_id[j - 1];
                    s_slot[j] = s_slot[j - 1];
                    s_w[j] = s_w[j - 1];
                }
                s_id[j] = id;
                s_slot[j] = p;
                s_w[j] = wt;
            }
            s_cnt = cnt;
        }
        __syncthreads();
        const int cnt = s_cnt;
        for (int d = d0 + threadIdx.x * VEC; d < d1; d += blockDim.x * VEC) {
            float acc[VEC], v[VEC];
            for (int i = 0; i < VEC; i++) acc[i] = 0.0f;
            for (int j = 0; j < cnt; j++) {
                ld_vec<T, VEC>(y + (long long)s_slot[j] * D + d, v);
                for (int i = 0; i < VEC; i++) acc[i] += s_w[j] * v[i];
            }
            if (ys) {
                ld_vec<T, VEC>(ys + (long long)r * D + d, v);
                for (int i = 0; i < VEC; i++) acc[i] += v[i];
            }
            st_vec<T, VEC>(out + (long long)r * D + d, acc);
        }
        __syncthreads(); /* the lists are rebuilt for the next row */
    }
}

/* The combine's grid: rows, and for fewer rows than SMs to keep busy, the columns split into
 * chunks of one pass of the block (chunk: a multiple of vec). */
static dim3 combine_grid(long long n, int D, int vec, int *chunk_p) {
    const int pass = 128 * vec;
    int ny = n < 32 ? (D + pass - 1) / pass : 1;
    *chunk_p = ny > 1 ? pass : D;
    return dim3(n < 1 ? 1u : n > 65535 ? 65535u : (unsigned)n, (unsigned)(ny > 1 ? ny : 1));
}

static unsigned rows_grid(long long n) {
    return (unsigned)(n < 1 ? 1 : n > 65535 ? 65535 : n);
}

static size_t align256(size_t b) {
    return (b + 255) / 256 * 256;
}

/* The carving of SCR_OP for one moe_experts_dev call: int4 tiles [max_tiles + max_tiles_s],
 * slot_row [pairs], slot_of [pairs], counts [4], then act [pairs, I], y [pairs, D],
 * act_s [n, Is], y_s [n, D] of the activation type. */
struct moe_carve {
    int4 *tiles, *tiles_s;
    int32_t *slot_row, *slot_of;
    int *counts;
    void *act, *y, *act_s, *y_s;
};

static size_t moe_carve_at(char *base, long long pairs, long long max_tiles, long long max_tiles_s,
                           int n, int D, int I, int Is, size_t ts, moe_carve *cv) {
    size_t b_tiles = align256((size_t)(max_tiles + max_tiles_s) * sizeof(int4));
    size_t b_idx = align256((size_t)(2 * pairs + 4) * sizeof(int32_t));
    size_t b_act = align256((size_t)pairs * I * ts), b_y = align256((size_t)pairs * D * ts);
    size_t b_act_s = align256((size_t)n * Is * ts), b_y_s = Is ? align256((size_t)n * D * ts) : 0;
    if (base) {
        cv->tiles = (int4 *)base;
        cv->tiles_s = cv->tiles + max_tiles;
        cv->slot_row = (int32_t *)(base + b_tiles);
        cv->slot_of = cv->slot_row + pairs;
        cv->counts = cv->slot_of + pairs;
        cv->act = base + b_tiles + b_idx;
        cv->y = (char *)cv->act + b_act;
        cv->act_s = (char *)cv->y + b_y;
        cv->y_s = (char *)cv->act_s + b_act_s;
    }
    return b_tiles + b_idx + b_act + b_y + b_act_s + b_y_s;
}

/* The two grouped GEMMs' problems over a carving (all NULL when only checking shapes). */
static void moe_problems(const be_moe_rows *rows, void *const *tab, int n_local, int I, int Is,
                         bool fp8, const moe_carve *cv, gg_args *up, gg_args *down) {
    const int D = rows->D;
    /* FP8: the scales' table follows the weights' (wtab), entry for entry */
    const float *const *stab = fp8 && tab ? (const float *const *)(tab + 2 * n_local + 2) : NULL;
    *up = gg_args{};
    *down = gg_args{};
    up->n_problems = down->n_problems = Is ? 2 : 1;
    /* gate_up with SiLU x up fused: act[slot] = silu(x[row] Wg^T) * (x[row] Wu^T) */
    gg_problem &u = up->p[0];
    u.w = tab;
    u.tiles = cv->tiles;
    u.n_tiles = cv->counts;
    u.a_rows = cv->slot_row;
    u.a = rows->x;
    u.lda = rows->x_stride;
    u.c = cv->act;
    u.ldc = I;
    u.N = I;
    u.K = D;
    u.silu = 1;
    u.s = stab;
    u.s_split = I;
    /* down: y[slot] = act[slot] Wd^T */
    gg_problem &d = down->p[0];
    d.w = tab ? tab + n_local : NULL;
    d.tiles = cv->tiles;
    d.n_tiles = cv->counts;
    d.a = cv->act;
    d.lda = I;
    d.c = cv->y;
    d.ldc = D;
    d.N = D;
    d.K = I;
    d.s = stab ? stab + n_local : NULL;
    d.s_split = D;
    if (!Is) return;
    /* the shared experts: every row, in row order */
    up->p[1] = u;
    up->p[1].w = tab ? tab + 2 * n_local : NULL;
    up->p[1].tiles = cv->tiles_s;
    up->p[1].n_tiles = cv->counts ? cv->counts + 1 : NULL;
    up->p[1].a_rows = NULL;
    up->p[1].c = cv->act_s;
    up->p[1].ldc = up->p[1].N = up->p[1].s_split = Is;
    up->p[1].s = stab ? stab + 2 * n_local : NULL;
    down->p[1] = d;
    down->p[1].w = tab ? tab + 2 * n_local + 1 : NULL;
    down->p[1].tiles = cv->tiles_s;
    down->p[1].n_tiles = up->p[1].n_tiles;
    down->p[1].a = cv->act_s;
    down->p[1].lda = down->p[1].K = Is;
    down->p[1].c = cv->y_s;
    down->p[1].s = stab ? stab + 2 * n_local + 1 : NULL;
}

template <typename T>
static void experts_dev_run(cuda_backend *c, void *out, const be_moe_rows *rows,
                            const be_ffn *experts, int e0, int n_local, const be_ffn *shared) {
    const int n = rows->n, D = rows->D, K = rows->K, I = experts[0].n_inter;
    const int Is = shared ? shared->n_inter : 0;
    /* launch shapes from host sizes only: pairs bounds the (row, k) pairs routed here, hint
     * is what a layer typically sees (the mean rows of a touched expert picks the tile) */
    const long long pairs = (long long)n * K;
    long long hint =
        rows->pairs_hint > 0 ? rows->pairs_hint : (long long)n * (K < n_local ? K : n_local);
    if (hint > pairs) hint = pairs;
    long long touched = hint < n_local ? hint : n_local;
    moe_carve none = {};
    gg_args up, down;
    const bool fp8 = experts[0].gate_up->dtype == DT_F8_E4M3;
    moe_problems(rows, NULL, n_local, I, Is, fp8, &none, &up, &down);
    const bool tc = moe_gemm_mma_ok(c, &up) && moe_gemm_mma_ok(c, &down);
    const int bm = moe_gemm_tile_rows(c, touched > 0 ? (double)hint / (double)touched : 1.0, tc);
    const long long max_tiles = (pairs < n_local ? pairs : n_local) + pairs / bm;
    const long long max_tiles_s = shared ? (n + bm - 1) / bm : 0;

    void *const *tab = wtab_get(c, experts, n_local, shared);
    if (!tab) return;
    size_t bytes = moe_carve_at(NULL, pairs, max_tiles, max_tiles_s, n, D, I, Is, sizeof(T), NULL);
    char *base = (char *)cuda_scratch(c, SCR_OP, bytes);
    if (!base) return;
    moe_carve cv;
    moe_carve_at(base, pairs, max_tiles, max_tiles_s, n, D, I, Is, sizeof(T), &cv);
    moe_problems(rows, tab, n_local, I, Is, fp8, &cv, &up, &down);

    int threads = pairs > 4096 || n_local > 256 ? 1024 : 256;
    size_t sh = (size_t)(2 * n_local + 32) * sizeof(int);
    moe_sort_kernel<<<1, threads, sh, c->stream>>>(rows->ids, rows->meta_stride, n, K, e0, n_local,
                                                   bm, shared ? n : 0, cv.slot_row, cv.slot_of,
                                                   cv.tiles, cv.tiles_s, cv.counts);
    if (CUDA_LAUNCHED(c, "moe_sort_kernel") != DUET_OK) return;
    const int mt[2] = {(int)max_tiles, (int)max_tiles_s};
    /* FP8 experts of a big eager step: per-expert cuBLASLt calls (fp8.cu), else grouped */
    bool done = false;
    if (fp8 && sizeof(T) == 2 && cuda_moe_fp8_lt_wanted(c, n, D, I, Is))
        done = cuda_moe_fp8_lt_run(c, rows, experts, e0, n_local, shared, cv.slot_row, cv.y,
                                   cv.y_s) == DUET_OK;
    if (c->err != DUET_OK) return;
    if (!done) {
        moe_gemm_run(c, &up, bm, tc, mt);
        moe_gemm_run(c, &down, bm, tc, mt);
    }
    if (c->err != DUET_OK) return;
    const T *y = (const T *)cv.y, *ys = shared ? (const T *)cv.y_s : NULL;
    const bool aligned = ((uintptr_t)out & 15) == 0;
    const int vec = aligned && sizeof(T) == 2 && D % 8 == 0   ? 8
                    : aligned && sizeof(T) == 4 && D % 4 == 0 ? 4
                                                              : 1;
    int chunk;
    const dim3 grid = combine_grid(n, D, vec, &chunk);
    if (vec == 8)
        moe_combine_dev_kernel<T, 8><<<grid, 128, 0, c->stream>>>((T *)out, n, D, K, rows->ids,
                                                                  rows->weights, rows->meta_stride,
                                                                  cv.slot_of, y, ys, chunk);
    else if (vec == 4)
        moe_combine_dev_kernel<T, 4><<<grid, 128, 0, c->stream>>>((T *)out, n, D, K, rows->ids,
                                                                  rows->weights, rows->meta_stride,
                                                                  cv.slot_of, y, ys, chunk);
    else
        moe_combine_dev_kernel<T, 1><<<grid, 128, 0, c->stream>>>((T *)out, n, D, K, rows->ids,
                                                                  rows->weights, rows->meta_stride,
                                                                  cv.slot_of, y, ys, chunk);
    CUDA_LAUNCHED(c, "moe_combine_dev_kernel");
}

/* f's weights of type t (the activation type, or FP8 with bf16 activations; FP8 gate_up split
 * between its gate and up rows) and shapes [2I, D], [D, I] */
static bool ffn_fits(const cuda_backend *c, const be_ffn *f, int D, int I, dt_dtype t) {
    if (t != c->act && !(t == DT_F8_E4M3 && c->act == DT_BF16)) return false;
    if (t == DT_F8_E4M3 && f->gate_up->split != I) return false;
    return f->gate_up->dtype == t && f->down->dtype == t && f->n_inter == I &&
           f->gate_up->n_out == 2 * I && f->gate_up->n_in == D && f->down->n_out == D &&
           f->down->n_in == I;
}

void cuda_moe_experts_dev(be_backend *be, void *out, const be_moe_rows *rows, const be_ffn *experts,
                          int e0, int n_local, const be_ffn *shared) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK || rows->n <= 0) return;
    if (shared && !shared->gate_up) shared = NULL;
    bool ok = n_local >= 1 && n_local <= 1024 && rows->K > 0 && rows->K <= 64;
    const dt_dtype t = n_local >= 1 ? experts[0].gate_up->dtype : c->act;
    for (int e = 0; ok && e < n_local; e++)
        ok = ffn_fits(c, &experts[e], rows->D, experts[0].n_inter, t);
    if (ok && shared) ok = ffn_fits(c, shared, rows->D, shared->n_inter, t);
    if (!ok) {
        LOG_ERROR("cuda backend: device MoE needs 1..64 experts a token, at most 1024 local "
                  "experts, weights of one type (the activation type, or FP8 for routed and "
                  "shared experts alike) and one width");
        c->err = DUET_ERR_INTERNAL;
        return;
    }
    if (c->act == DT_BF16)
        experts_dev_run<bf16>(c, out, rows, experts, e0, n_local, shared);
    else
        experts_dev_run<float>(c, out, rows, experts, e0, n_local, shared);
}

/* ---- EP dispatch packing and combine (the fixed-capacity layout of be_ep_layout) ---- */

/* One block per destination rank r: which local tokens go to r, in token order (a block scan
 * per chunk of tokens), their slots, the ids / weights into the rows' metadata, and the
 * source token of every row of r's block (-1 for unused rows, whose ids become -1). */
__global__ void ep_pack_index_kernel(const int32_t *ids, const float *w, int T, int K, int tp,
                                     int tp_rank, int ep, int per_rank, int cap, char *send,
                                     size_t row_bytes, size_t meta_off, int32_t *slot,
                                     int32_t *src_tok) {
    __shared__ int wsum[32];
    const int r = blockIdx.x, tid = threadIdx.x;
    const int mine = T > tp_rank ? (T - tp_rank + tp - 1) / tp : 0;
    int base = 0;
    for (int i0 = 0; i0 < mine; i0 += blockDim.x) {
        const int i = i0 + tid, t = tp_rank + i * tp;
        int hit = 0;
        if (i < mine)
            for (int k = 0; k < K; k++) {
                int id = ids[(long long)t * K + k];
                hit |= id >= 0 && id / per_rank == r;
            }
        int tot, pos = block_scan(hit, wsum, &tot);
        if (i < mine) {
            int p = base + pos;
            slot[(long long)i * ep + r] = hit ? p : -1;
            if (hit) {
                src_tok[(long long)r * cap + p] = t;
                char *meta = send + ((long long)r * cap + p) * row_bytes + meta_off;
                int32_t *mid = reinterpret_cast<int32_t *>(meta);
                float *mw = reinterpret_cast<float *>(meta + (size_t)K * 4);
                for (int k = 0; k < K; k++) {
                    mid[k] = ids[(long long)t * K + k];
                    mw[k] = w[(long long)t * K + k];
                }
            }
        }
        base += tot;
    }
    for (int p = base + tid; p < cap; p += blockDim.x) {
        src_tok[(long long)r * cap + p] = -1;
        char *meta = send + ((long long)r * cap + p) * row_bytes + meta_off;
        for (int k = 0; k < K; k++) {
            reinterpret_cast<int32_t *>(meta)[k] = -1;
            reinterpret_cast<float *>(meta + (size_t)K * 4)[k] = 0.0f;
        }
    }
}

/* The activations of each used row: one block per row (grid-stride), VEC per thread. */
template <typename T, int VEC>
__global__ void ep_pack_rows_kernel(char *send, size_t row_bytes, const T *x, int D, int n_rows,
                                    const int32_t *src_tok) {
    for (int row = blockIdx.x; row < n_rows; row += gridDim.x) {
        int t = src_tok[row];
        if (t < 0) continue;
        T *dst = reinterpret_cast<T *>(send + (long long)row * row_bytes);
        const T *src = x + (long long)t * D;
        for (int d = threadIdx.x * VEC; d < D; d += blockDim.x * VEC) {
            float v[VEC];
            ld_vec<T, VEC>(src + d, v);
            st_vec<T, VEC>(dst + d, v);
        }
    }
}

/* out[t] = sum over r of back[r][slot[i][r]] for this rank's tokens, zeros for the others */
template <typename T, int VEC>
__global__ void ep_unpack_kernel(T *out, const T *back, int T_, int D, int tp, int tp_rank, int ep,
                                 int cap, const int32_t *slot) {
    for (int t = blockIdx.x; t < T_; t += gridDim.x) {
        const bool mine = t % tp == tp_rank;
        const long long i = t / tp;
        for (int d = threadIdx.x * VEC; d < D; d += blockDim.x * VEC) {
            float acc[VEC], v[VEC];
            for (int j = 0; j < VEC; j++) acc[j] = 0.0f;
            for (int r = 0; mine && r < ep; r++) {
                int p = slot[i * ep + r];
                if (p < 0) continue;
                ld_vec<T, VEC>(back + ((long long)r * cap + p) * D + d, v);
                for (int j = 0; j < VEC; j++) acc[j] += v[j];
            }
            st_vec<T, VEC>(out + (long long)t * D + d, acc);
        }
    }
}

void cuda_moe_ep_pack(be_backend *be, void *send, const void *x, int T_, const int32_t *ids,
                      const float *weights, const be_ep_layout *l, int32_t *slot) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return;
    const int mine = T_ > l->tp_rank ? (T_ - l->tp_rank + l->tp - 1) / l->tp : 0;
    if (mine > l->cap || l->K > 64 || l->ep < 1 || l->experts_per_rank < 1) {
        LOG_ERROR("cuda backend: EP dispatch of %d tokens into blocks of %d rows", mine, l->cap);
        c->err = DUET_ERR_INTERNAL;
        return;
    }
    const size_t act = act_size(c), row = be_ep_row_bytes(l->D, l->K, act);
    const int n_rows = l->ep * l->cap;
    int32_t *src_tok = (int32_t *)cuda_scratch(c, SCR_IDX, (size_t)n_rows * sizeof(int32_t));
    if (!src_tok) return;
    ep_pack_index_kernel<<<l->ep, 256, 0, c->stream>>>(
        ids, weights, T_, l->K, l->tp, l->tp_rank, l->ep, l->experts_per_rank, l->cap, (char *)send,
        row, be_ep_meta_offset(l->D, act), slot, src_tok);
    if (CUDA_LAUNCHED(c, "ep_pack_index_kernel") != DUET_OK || mine == 0) return;
    /* packed rows are 16-byte aligned (be_ep_row_bytes); x rows are when D fills 16 bytes */
    bool vec = ((uintptr_t)x & 15) == 0 && (l->D * act) % 16 == 0;
    if (c->act == DT_BF16) {
        if (vec)
            ep_pack_rows_kernel<bf16, 8><<<rows_grid(n_rows), 128, 0, c->stream>>>(
                (char *)send, row, (const bf16 *)x, l->D, n_rows, src_tok);
        else
            ep_pack_rows_kernel<bf16, 1><<<rows_grid(n_rows), 128, 0, c->stream>>>(
                (char *)send, row, (const bf16 *)x, l->D, n_rows, src_tok);
    } else {
        if (vec)
            ep_pack_rows_kernel<float, 4><<<rows_grid(n_rows), 128, 0, c->stream>>>(
                (char *)send, row, (const float *)x, l->D, n_rows, src_tok);
        else
            ep_pack_rows_kernel<float, 1><<<rows_grid(n_rows), 128, 0, c->stream>>>(
                (char *)send, row, (const float *)x, l->D, n_rows, src_tok);
    }
    CUDA_LAUNCHED(c, "ep_pack_rows_kernel");
}

void cuda_moe_ep_unpack(be_backend *be, void *out, const void *back, int T_, const be_ep_layout *l,
                        const int32_t *slot) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK || T_ <= 0) return;
    const size_t act = act_size(c);
    bool vec = ((uintptr_t)out & 15) == 0 && ((uintptr_t)back & 15) == 0 && (l->D * act) % 16 == 0;
    if (c->act == DT_BF16) {
        if (vec)
            ep_unpack_kernel<bf16, 8><<<rows_grid(T_), 128, 0, c->stream>>>(
                (bf16 *)out, (const bf16 *)back, T_, l->D, l->tp, l->tp_rank, l->ep, l->cap, slot);
        else
            ep_unpack_kernel<bf16, 1><<<rows_grid(T_), 128, 0, c->stream>>>(
                (bf16 *)out, (const bf16 *)back, T_, l->D, l->tp, l->tp_rank, l->ep, l->cap, slot);
    } else {
        if (vec)
            ep_unpack_kernel<float, 4>
                <<<rows_grid(T_), 128, 0, c->stream>>>((float *)out, (const float *)back, T_, l->D,
                                                       l->tp, l->tp_rank, l->ep, l->cap, slot);
        else
            ep_unpack_kernel<float, 1>
                <<<rows_grid(T_), 128, 0, c->stream>>>((float *)out, (const float *)back, T_, l->D,
                                                       l->tp, l->tp_rank, l->ep, l->cap, slot);
    }
    CUDA_LAUNCHED(c, "ep_unpack_kernel");
}
