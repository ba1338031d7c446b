/* MoE on the GPU: routing (scores, group limits, top-k and weights exactly as cpu_moe_route
 * states them) and the routed experts. Experts run as a permutation: the host orders the
 * (token, expert) pairs by expert from the routing it already holds, the GPU gathers those
 * rows once, runs each expert's two GEMMs on its contiguous slice, and a combine kernel adds
 * each token's weighted results in expert order (no atomics: deterministic). */
#include <stdlib.h>
#include <string.h>

#include "model/backends/cuda/cuda-impl.cuh"

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

/* One warp per token. Shared per warp: s [E], choice [E], taken [E], gscore [G], gkeep [G]. */
__global__ void route_kernel(const float *logits, int n_tok, int E, int K, int G, int topk_group,
                             int softmax, int grouped, int noaux, const float *bias, int norm,
                             float scale, int32_t *ids, float *weights) {
    extern __shared__ float sh[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t = blockIdx.x * (blockDim.x >> 5) + warp;
    if (t >= n_tok) return; /* whole warps leave: only warp-level sync below */
    float *s = sh + (size_t)warp * (3 * E + 2 * G), *ch = s + E, *taken = ch + E;
    float *gs = taken + E, *gk = gs + G;
    const float *lg = logits + (size_t)t * E;

    if (softmax) {
        float m = -INFINITY;
        for (int e = lane; e < E; e += 32) m = fmaxf(m, lg[e]);
        m = warp_max(m);
        float sum = 0.0f;
        for (int e = lane; e < E; e += 32) {
            s[e] = expf(lg[e] - m);
            sum += s[e];
        }
        sum = warp_sum(sum);
        for (int e = lane; e < E; e += 32) s[e] /= sum;
    } else {
        for (int e = lane; e < E; e += 32) s[e] = 1.0f / (1.0f + expf(-lg[e]));
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

duet_status cuda_moe_route(be_backend *be, const void *x, int T_, const be_weight *gate,
                           const void *bias, const be_route_params *p, int32_t *ids,
                           float *weights) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return c->err;
    if (T_ <= 0) return DUET_OK;
    const int E = p->n_experts, K = p->top_k, G = p->n_group > 0 ? p->n_group : 1;
    if (E > 1024 || G > 256 || K > 64 || K > E || E % G != 0 || gate->n_out != E)
        return DUET_ERR_UNSUPPORTED; /* the CPU reference's limits */
    size_t nl = (size_t)T_ * E, nk = (size_t)T_ * K;
    float *logits = (float *)cuda_scratch(c, SCR_ROUTE, (nl + 2 * nk) * sizeof(float));
    if (!logits) return c->err;
    int32_t *d_ids = (int32_t *)(logits + nl);
    float *d_w = logits + nl + nk;
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
    duet_status st = CUDA_LAUNCHED(c, "route_kernel");
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
        cuda_gemm_act(c, gu + (size_t)off[e] * 2 * I, 2 * I, xs + (size_t)off[e] * D, D, n,
                      f->gate_up->w, 2 * I, D);
    }
    cuda_silu_mul(&c->base, act, gu, N, I);
    for (int e = 0; e < n_local; e++) {
        int n = off[e + 1] - off[e];
        if (!n) continue;
        const be_ffn *f = &experts[e];
        cuda_gemm_act(c, y + (size_t)off[e] * D, D, act + (size_t)off[e] * I, I, n, f->down->w, D,
                      I);
    }
    moe_combine<T>
        <<<grid_of((size_t)T_ * D), 256, 0, c->stream>>>((T *)out, y, d_tok, d_w, T_, K, D);
    CUDA_LAUNCHED(c, "moe_combine");
}

void cuda_moe_experts(be_backend *be, void *out, const void *x, int T_, int D, const int32_t *ids,
                      const float *weights, int K, const be_ffn *experts, int e0, int n_local) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK || T_ <= 0 || n_local <= 0) return;
    for (int e = 0; e < n_local; e++)
        if (experts[e].gate_up->dtype != c->act || experts[e].down->dtype != c->act ||
            experts[e].n_inter != experts[0].n_inter) {
            LOG_ERROR("cuda backend: experts need weights of the activation type and one width");
            c->err = DUET_ERR_INTERNAL;
            return;
        }
    if (c->act == DT_BF16)
        experts_run<bf16>(c, out, x, T_, D, ids, weights, K, experts, e0, n_local);
    else
        experts_run<float>(c, out, x, T_, D, ids, weights, K, experts, e0, n_local);
}
