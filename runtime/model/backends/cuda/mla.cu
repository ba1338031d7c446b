/* MLA attention over the paged latent cache (be_ops.mla_attention; the CPU reference's
 * attend_absorbed / attend_expanded). Sequences with at most MLA_ABS_MAX_Q new tokens (decode,
 * speculative verify) take the absorbed form, longer prompt chunks the expanded one:
 *   absorbed, bf16 with DeepSeek's latent (L = 512, rope 64): q_nope and the result go through
 *     W_uk / W_uv as head-batched cuBLAS GEMMs; attention over the latents is a tensor-core
 *     kernel that reads each cached tile once for up to 64 (query row, head) pairs, split over
 *     the context so every SM has work, and a second kernel combines the splits;
 *   absorbed otherwise (float32, other shapes), and expanded: one block per (query token,
 *     head) on CUDA cores; the expanded form first rebuilds keys and values from the latents
 *     with kv_b (a cuBLAS GEMM).
 * Launch shapes depend only on the batch's shape (tokens and sequences, rows per sequence,
 * max_blocks), never on context lengths, which the kernels read on the device: the decode
 * path can be captured in a CUDA graph. Design and numbers: docs/kernels/mla.md. */
#include <math.h>
#include <stdlib.h>

#include "model/backends/cuda/cuda-impl.cuh"
#include "model/backends/cuda/mla-prefill.cuh"
#include "model/backends/cuda/mla-tc.cuh"

extern "C" {
#include "model/backends/cuda/backend_cuda.h"
}

#define MLA_ABS_MAX_Q 8 /* a sequence with more new tokens is a prompt chunk: expanded form */

/* ---- the CUDA-core kernel (float32, any shape; the expanded form) ---- */

#define MLA_TILE    64  /* context positions scored per round */
#define MLA_THREADS 128 /* 4 warps; MLA_TILE <= MLA_THREADS */

template <typename T> struct mla_args {
    T *out;         /* [T, H * v] */
    const T *q;     /* [T, H * (nope + rope)] */
    const T *cache; /* the pool: [block][layer][bs][kv_dim] */
    const int32_t *table, *pos, *start;
    int n_seqs, max_q; /* absorbed: the batch's sequences; ones with more tokens are skipped */
    int t0, seq0;      /* expanded: the chunk's first token and its sequence */
    const T *kvx;      /* expanded: [ctx, H * (nope + v)] keys and values */
    const T *wkvb;     /* absorbed: kv_b [H * (nope + v), L] */
    int H, nope, rope, v, L, kv_dim, n_layers, bs, max_blocks, layer;
    float scale;
};

/* The sequence holding token t: the last s with start[s] <= t (empty sequences share their
 * start with the next one, so the last such s is the one that holds t). */
__device__ __forceinline__ int seq_of(const int32_t *start, int n_seqs, int t) {
    int lo = 0, hi = n_seqs - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (start[mid] <= t)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

template <typename T, bool ABS>
__global__ void __launch_bounds__(MLA_THREADS) mla_kernel(mla_args<T> a) {
    extern __shared__ float sh[];
    const int A = ABS ? a.L : a.nope, Vd = ABS ? a.L : a.v;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    /* qa [A] (latent-space or nope query), qr [rope], acc [Vd], sc [TILE], rowoff [TILE] */
    float *qa = sh, *qr = qa + A, *acc = qr + a.rope, *sc = acc + Vd;
    size_t *rowoff = (size_t *)(sh + ((A + a.rope + Vd + MLA_TILE + 1) & ~1));
    const int h = blockIdx.y;
    const int t = ABS ? (int)blockIdx.x : a.t0 + (int)blockIdx.x;
    const int s = ABS ? seq_of(a.start, a.n_seqs, t) : a.seq0;
    if (ABS && a.start[s + 1] - a.start[s] > a.max_q) return; /* the expanded form's token */
    const int upto = a.pos[t] + 1;                            /* causal: positions 0 .. own */
    const int hw = a.nope + a.v, kvw = a.H * hw;
    const T *qh = a.q + (size_t)t * a.H * (a.nope + a.rope) + (size_t)h * (a.nope + a.rope);

    for (int r = tid; r < a.rope; r += blockDim.x) qr[r] = to_f(qh[a.nope + r]);
    if (ABS) {
        /* q_lat[l] = sum_i q_nope[i] * W_uk[h][i][l] */
        const T *wh = a.wkvb + (size_t)h * hw * a.L;
        for (int l = tid; l < a.L; l += blockDim.x) {
            float d = 0.0f;
            for (int i = 0; i < a.nope; i++) d += to_f(qh[i]) * to_f(wh[(size_t)i * a.L + l]);
            qa[l] = d;
        }
    } else {
        for (int e = tid; e < a.nope; e += blockDim.x) qa[e] = to_f(qh[e]);
    }
    for (int e = tid; e < Vd; e += blockDim.x) acc[e] = 0.0f;
    __syncthreads();

    float m = -INFINITY, sum = 0.0f; /* identical in every thread */
    for (int j0 = 0; j0 < upto; j0 += MLA_TILE) {
        const int nj = min(MLA_TILE, upto - j0);
        for (int jj = warp; jj < nj; jj += nw) {
            const int j = j0 + jj;
            const int blk = a.table[(size_t)s * a.max_blocks + j / a.bs];
            const size_t row =
                (((size_t)blk * a.n_layers + a.layer) * a.bs + (size_t)(j % a.bs)) * a.kv_dim;
            const T *key = ABS ? a.cache + row : a.kvx + (size_t)j * kvw + (size_t)h * hw;
            const T *kr = a.cache + row + a.L;
            float d = 0.0f;
            for (int e = lane; e < A; e += 32) d += qa[e] * to_f(key[e]);
            for (int r = lane; r < a.rope; r += 32) d += qr[r] * to_f(kr[r]);
            d = warp_sum(d);
            if (lane == 0) {
                sc[jj] = d * a.scale;
                rowoff[jj] = row;
            }
        }
        __syncthreads();
        float tmax = -INFINITY;
        for (int jj = 0; jj < nj; jj++) tmax = fmaxf(tmax, sc[jj]);
        const float mn = fmaxf(m, tmax), corr = expf(m - mn); /* first tile: exp(-inf) = 0 */
        __syncthreads();                                      /* every thread has read the scores */
        if (tid < nj) sc[tid] = expf(sc[tid] - mn);
        __syncthreads();
        float ts = 0.0f;
        for (int jj = 0; jj < nj; jj++) ts += sc[jj];
        sum = sum * corr + ts;
        for (int e = tid; e < Vd; e += blockDim.x) {
            float o = acc[e] * corr;
            for (int jj = 0; jj < nj; jj++) {
                const T *val = ABS ? a.cache + rowoff[jj]
                                   : a.kvx + (size_t)(j0 + jj) * kvw + (size_t)h * hw + a.nope;
                o += sc[jj] * to_f(val[e]);
            }
            acc[e] = o;
        }
        m = mn;
        __syncthreads(); /* the next tile overwrites sc and rowoff */
    }

    const float inv = 1.0f / sum;
    T *o = a.out + (size_t)t * a.H * a.v + (size_t)h * a.v;
    if (ABS) {
        for (int e = tid; e < Vd; e += blockDim.x) acc[e] *= inv;
        __syncthreads();
        /* out[i] = W_uv[h][i] . o_lat */
        const T *wv = a.wkvb + ((size_t)h * hw + a.nope) * a.L;
        for (int e = warp; e < a.v; e += nw) {
            float d = 0.0f;
            for (int l = lane; l < a.L; l += 32) d += to_f(wv[(size_t)e * a.L + l]) * acc[l];
            d = warp_sum(d);
            if (lane == 0) o[e] = from_f<T>(d);
        }
    } else {
        for (int e = tid; e < Vd; e += blockDim.x) o[e] = from_f<T>(acc[e] * inv);
    }
}

/* lat[j, :L] = latent of position j of sequence s, j < ctx */
template <typename T>
__global__ void gather_latents(T *lat, const T *cache, const int32_t *table, int s, int ctx, int L,
                               int kv_dim, int n_layers, int bs, int max_blocks, int layer) {
    size_t n = (size_t)ctx * L;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n;
         k += (size_t)gridDim.x * blockDim.x) {
        int j = (int)(k / L), l = (int)(k % L);
        int blk = table[(size_t)s * max_blocks + j / bs];
        size_t row = (((size_t)blk * n_layers + layer) * bs + (size_t)(j % bs)) * kv_dim;
        lat[k] = cache[row + l];
    }
}

/* Queues gather_latents for sequence s's ctx positions of layer into lat; the launch status. */
template <typename T>
static duet_status gather_launch(cuda_backend *c, T *lat, const be_kv *kv, int s, int ctx, int L,
                                 int layer) {
    const size_t cnt = (size_t)ctx * L;
    const unsigned g = (unsigned)((cnt + 255) / 256 < 65535 * 16 ? (cnt + 255) / 256 : 65535 * 16);
    gather_latents<T><<<g, 256, 0, c->stream>>>(lat, (const T *)kv->data, c->d_table, s, ctx, L,
                                                kv->kv_dim, kv->n_layers, kv->block_size,
                                                c->max_blocks, layer);
    return CUDA_LAUNCHED(c, "gather_latents");
}

static size_t mla_smem(int A, int rope, int Vd) {
    return (size_t)((A + rope + Vd + MLA_TILE + 1) & ~1) * sizeof(float) +
           MLA_TILE * sizeof(size_t);
}

/* ---- the tensor-core decode kernels (bodies in mla-tc.cuh) ---- */

constexpr int MLA_MIN_SPLIT = 128; /* fewest positions worth a split of their own (rounded up
                                      to the kernel's whole tiles) */
constexpr int MLA_MAX_SPLIT = 128;
static_assert(TC_N_VARIANTS == BE_CUDA_MLA_VARIANTS, "backend_cuda.h counts the variants");

template <int MT, int V>
__global__ void __launch_bounds__(TC_THREADS, tc_cfg<MT, V>::MINB) mla_decode_tc(tc_args a) {
    extern __shared__ __align__(16) unsigned char smem[];
    tc_block<MT, V>(a, smem, (int)threadIdx.x, (int)blockIdx.x);
}

/* One decode kernel as the host sees it: variant v's kernel for 16 * MT rows (only the
 * variants with a shape of their own are instantiated: tc_canon). */
struct tc_kernel {
    const void *fn;
    int smem, tn, nstage, minb, canon;
};
#define TC_KERNEL(MT, V)                                                                           \
    {                                                                                              \
        (const void *)mla_decode_tc<MT, tc_canon(V, MT)>, (int)tc_cfg<MT, tc_canon(V, MT)>::SMEM,  \
            tc_cfg<MT, tc_canon(V, MT)>::TN, tc_cfg<MT, tc_canon(V, MT)>::NSTAGE,                  \
            tc_cfg<MT, tc_canon(V, MT)>::MINB, tc_canon(V, MT)                                     \
    }
#define TC_KERNELS(MT)                                                                             \
    { TC_KERNEL(MT, 0), TC_KERNEL(MT, 1), TC_KERNEL(MT, 2), TC_KERNEL(MT, 3), TC_KERNEL(MT, 4) }
static_assert(TC_N_VARIANTS == 5, "TC_KERNELS lists every variant");
static const tc_kernel k_tc_kernels[3][TC_N_VARIANTS] = {TC_KERNELS(1), TC_KERNELS(2),
                                                         TC_KERNELS(4)};
#undef TC_KERNELS
#undef TC_KERNEL

__global__ void __launch_bounds__(TC_COMBINE_THREADS) mla_combine(tc_combine_args a) {
    tc_combine(a, (int)threadIdx.x, (int)blockIdx.x, (int)blockIdx.y);
}

/* ---- the tensor-core prefill kernel (body in mla-prefill.cuh) ---- */

__global__ void __launch_bounds__(FP_THREADS, 1) mla_prefill_tc(fp_args a) {
    extern __shared__ __align__(16) unsigned char smem[];
    fp_block(a, smem, (int)threadIdx.x, (int)blockIdx.x);
}

/* ---- host side ---- */

struct cuda_mla {
    int n_sm;
    int occ[3][TC_N_VARIANTS]; /* blocks per SM of each decode kernel; 0 until first used */
    int variant;   /* the decode variant (DUET_MLA_DECODE_VARIANT, be_cuda_mla_variant) */
    bool fp_ready; /* mla_prefill_tc's shared-memory opt-in done */
    int force_split;
    unsigned skip;
    be_cuda_mla_info last;
};

static cuda_mla *mla_state(cuda_backend *c) {
    if (c->mla) return c->mla;
    cuda_mla *m = (cuda_mla *)calloc(1, sizeof *m);
    if (!m) {
        LOG_ERROR("cuda backend: no memory for the MLA state");
        c->err = DUET_ERR_NO_MEMORY;
        return NULL;
    }
    if (CUDA_CHECK(c, cudaDeviceGetAttribute(&m->n_sm, cudaDevAttrMultiProcessorCount,
                                             c->device)) != DUET_OK) {
        free(m);
        return NULL;
    }
    /* variant 1 (64-position tiles) measured fastest on every V2-Lite case of the sweep
     * (docs/kernels/mla.md, "Decode variants"); V3's 128 heads run variant 0's kernel under
     * any choice. The environment is a benchmark's choice for whole programs. */
    m->variant = BE_CUDA_MLA_DEFAULT_VARIANT;
    const char *e = getenv("DUET_MLA_DECODE_VARIANT");
    if (e && *e) {
        char *end = NULL;
        long v = strtol(e, &end, 10);
        if (*end || v < 0 || v >= TC_N_VARIANTS) {
            LOG_ERROR("cuda backend: DUET_MLA_DECODE_VARIANT=%s: want a variant 0 .. %d", e,
                      TC_N_VARIANTS - 1);
            c->err = DUET_ERR_INVALID;
            free(m);
            return NULL;
        }
        m->variant = (int)v;
    }
    c->mla = m;
    return m;
}

/* Once per kernel: the shared-memory opt-in, and how many blocks fit on one SM (what the
 * split count is sized by). */
static int tc_prepare(cuda_backend *c, cuda_mla *m, int mt_idx, int v) {
    const tc_kernel &k = k_tc_kernels[mt_idx][v];
    int *occ = &m->occ[mt_idx][k.canon];
    if (*occ) return *occ;
    /* all of L1 as shared memory: the carve-out is otherwise the driver's choice, which need
     * not fit two blocks of a two-blocks-per-SM variant */
    if (CUDA_CHECK(c, cudaFuncSetAttribute(k.fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           k.smem)) != DUET_OK ||
        CUDA_CHECK(c, cudaFuncSetAttribute(k.fn, cudaFuncAttributePreferredSharedMemoryCarveout,
                                           (int)cudaSharedmemCarveoutMaxShared)) != DUET_OK)
        return 0;
    int n = 0;
    if (CUDA_CHECK(c, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k.fn, TC_THREADS,
                                                                    (size_t)k.smem)) != DUET_OK)
        return 0;
    if (n < 1) {
        LOG_ERROR("cuda backend: mla_decode_tc<%d, %d> (%d bytes of shared memory) fits no SM",
                  16 << mt_idx, k.canon, k.smem);
        c->err = DUET_ERR_DEVICE;
        return 0;
    }
    *occ = n;
    return n;
}

static char *carve(char **p, size_t bytes) {
    char *r = *p;
    *p += (bytes + 255) & ~(size_t)255;
    return r;
}

/* The absorbed form on tensor cores for sequences of 1 .. MLA_ABS_MAX_Q tokens; qmax is the
 * most any of them has, [t_lo, t_hi) the token rows they span (rows of prompt chunks in that
 * range get garbage here and are rewritten by the expanded form afterwards). */
static void mla_decode_tc_run(cuda_backend *c, bf16 *out, const bf16 *q, const be_kv *kv, int layer,
                              const be_weight *kv_b, int H, int nope, int v, float scale, int qmax,
                              int t_lo, int t_hi) {
    cuda_mla *m = mla_state(c);
    if (!m) return;
    const int rows = qmax * H;
    const int MT = rows <= 16 ? 1 : rows <= 32 ? 2 : 4, RT = 16 * MT;
    const int mt_idx = MT == 1 ? 0 : MT == 2 ? 1 : 2;
    const int n_groups = (rows + RT - 1) / RT, rows_pad = n_groups * RT;
    const tc_kernel &kern = k_tc_kernels[mt_idx][m->variant];
    const int occ = tc_prepare(c, m, mt_idx, m->variant);
    if (!occ) return;

    /* splits: enough blocks for one full wave of this kernel (its blocks per SM), none
     * shorter than MLA_MIN_SPLIT positions in its whole tiles of the longest context the block
     * table can hold; host values fixed for a batch shape */
    const int per_split = c->n_seqs * n_groups;
    int n_split = m->n_sm * occ / per_split;
    const int longest = c->max_blocks * kv->block_size;
    const int min_split = (MLA_MIN_SPLIT + kern.tn - 1) / kern.tn * kern.tn;
    n_split = min(n_split, (longest + min_split - 1) / min_split);
    n_split = max(1, min(n_split, MLA_MAX_SPLIT));
    if (m->force_split > 0) n_split = m->force_split;

    const int T = c->n_tokens, qw = nope + TC_R;
    const size_t lat_b = (size_t)T * H * TC_L * sizeof(bf16);
    const size_t part_rows = n_split > 1 ? (size_t)c->n_seqs * n_split * rows_pad : 0;
    char *p = (char *)cuda_scratch(
        c, SCR_OP, 2 * (lat_b + 256) + part_rows * (TC_L + 1) * sizeof(float) + 512);
    if (!p) return;
    bf16 *qlat = (bf16 *)carve(&p, lat_b), *olat = (bf16 *)carve(&p, lat_b);
    float *opart = (float *)carve(&p, part_rows * TC_L * sizeof(float));
    float *lse = (float *)carve(&p, part_rows * sizeof(float));

    const bf16 *w = (const bf16 *)kv_b->w;
    const long long w_stride = (long long)(nope + v) * TC_L; /* one head's rows of kv_b */
    const int nt = t_hi - t_lo;
    const float one = 1.0f, zero = 0.0f;
    /* q_lat[t, h, :] = q_nope[t, h, :] @ W_uk[h]: per head, column-major,
     * C [L, nt] = W_uk[h] ([nope, L] row-major = [L, nope] column-major) * q_nope [nope, nt] */
    if (!(m->skip & BE_CUDA_MLA_SKIP_QABS) &&
        CUBLAS_CHECK(c, cublasGemmStridedBatchedEx(
                            c->blas, CUBLAS_OP_N, CUBLAS_OP_N, TC_L, nt, nope, &one, w, CUDA_R_16BF,
                            TC_L, w_stride, q + (size_t)t_lo * H * qw, CUDA_R_16BF, H * qw, qw,
                            &zero, qlat + (size_t)t_lo * H * TC_L, CUDA_R_16BF, H * TC_L, TC_L, H,
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)) != DUET_OK)
        return;

    tc_args a;
    a.qlat = qlat;
    a.q = q;
    a.cache = (const bf16 *)kv->data;
    a.start = c->d_start;
    a.pos = c->d_pos;
    a.table = c->d_table;
    a.opart = opart;
    a.lse = lse;
    a.olat = olat;
    a.H = H;
    a.qw = qw;
    a.nope = nope;
    a.n_layers = kv->n_layers;
    a.bs = kv->block_size;
    a.max_blocks = c->max_blocks;
    a.n_blocks = kv->n_blocks;
    a.layer = layer;
    a.n_split = n_split;
    a.n_groups = n_groups;
    a.max_q = MLA_ABS_MAX_Q;
    a.scale_log2 = scale * 1.4426950408889634f;
    const int n_blocks = c->n_seqs * n_split * n_groups;
    if (!(m->skip & BE_CUDA_MLA_SKIP_ATTN)) {
        void *args[] = {&a};
        if (CUDA_CHECK(c, cudaLaunchKernel(kern.fn, dim3((unsigned)n_blocks), dim3(TC_THREADS),
                                           args, (size_t)kern.smem, c->stream)) != DUET_OK)
            return;
    }
    if (n_split > 1 && !(m->skip & BE_CUDA_MLA_SKIP_COMBINE)) {
        const tc_combine_args ca = {opart, lse,     olat,     c->d_start,
                                    H,     n_split, rows_pad, MLA_ABS_MAX_Q};
        mla_combine<<<dim3(rows_pad, c->n_seqs), TC_COMBINE_THREADS, 0, c->stream>>>(ca);
        if (CUDA_LAUNCHED(c, "mla_combine") != DUET_OK) return;
    }
    /* out[t, h * v + :] = W_uv[h] o_lat[t, h, :]: per head, column-major,
     * C [v, nt] = W_uv[h]^T ([v, L] row-major = [L, v] column-major, transposed) * o_lat */
    if (!(m->skip & BE_CUDA_MLA_SKIP_OUTABS) &&
        CUBLAS_CHECK(c, cublasGemmStridedBatchedEx(
                            c->blas, CUBLAS_OP_T, CUBLAS_OP_N, v, nt, TC_L, &one,
                            w + (size_t)nope * TC_L, CUDA_R_16BF, TC_L, w_stride,
                            olat + (size_t)t_lo * H * TC_L, CUDA_R_16BF, H * TC_L, TC_L, &zero,
                            out + (size_t)t_lo * H * v, CUDA_R_16BF, H * v, v, H,
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT)) != DUET_OK)
        return;

    m->last.tensor_cores = true;
    m->last.n_split = n_split;
    m->last.rows_per_block = RT;
    m->last.n_groups = n_groups;
    m->last.n_blocks = n_blocks;
    m->last.variant = m->variant;
    m->last.kernel_variant = kern.canon;
    m->last.tile = kern.tn;
    m->last.stages = kern.nstage;
    m->last.blocks_per_sm = occ;
}

/* The expanded form on tensor cores for the batch's prompt chunks (more than MLA_ABS_MAX_Q
 * tokens), bf16 with nope 128, rope 64, v 128: per group of sequences, their latents gathered
 * from the pages and expanded through kv_b in one GEMM (kvx), then one mla_prefill_tc launch
 * for all of the group's query tiles and heads. A group is at most FP_MAX_SEQS sequences and
 * as many context rows as fit in ~256 MB of scratch (at least the longest context). */
static void mla_prefill_tc_run(cuda_backend *c, bf16 *out, const bf16 *q, const be_kv *kv,
                               int layer, const be_weight *kv_b, int H, int qw, float scale) {
    cuda_mla *m = mla_state(c);
    if (!m) return;
    if (!m->fp_ready) {
        if (CUDA_CHECK(c, cudaFuncSetAttribute(mla_prefill_tc,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               (int)FP_SMEM)) != DUET_OK)
            return;
        m->fp_ready = true;
    }
    const int L = kv->kv_dim - FP_R, kvw = H * FP_HW;
    const size_t row_b = (size_t)(L + kvw) * sizeof(bf16);
    size_t need = 0, longest = 0;
    for (int s = 0; s < c->n_seqs; s++) {
        if (c->h_start[s + 1] - c->h_start[s] <= MLA_ABS_MAX_Q) continue;
        need += (size_t)c->h_ctx[s];
        longest = (size_t)c->h_ctx[s] > longest ? (size_t)c->h_ctx[s] : longest;
    }
    size_t budget = ((size_t)256 << 20) / row_b;
    budget = budget < longest ? longest : budget;
    budget = budget > need ? need : budget;
    if (!budget) return;
    bf16 *lat = (bf16 *)cuda_scratch(c, SCR_OP, budget * row_b);
    if (!lat) return;
    bf16 *kvx = lat + budget * L;

    fp_args a = {};
    a.q = q;
    a.kvx = kvx;
    a.cache = (const bf16 *)kv->data;
    a.pos = c->d_pos;
    a.table = c->d_table;
    a.out = out;
    a.H = H;
    a.qw = qw;
    a.L = L;
    a.kv_dim = kv->kv_dim;
    a.n_layers = kv->n_layers;
    a.bs = kv->block_size;
    a.max_blocks = c->max_blocks;
    a.n_blocks = kv->n_blocks;
    a.layer = layer;
    a.scale_log2 = scale * 1.4426950408889634f;
    int launches = 0, blocks = 0;
    for (int s = 0; s < c->n_seqs;) {
        a.n_seqs = 0;
        size_t rows = 0;
        for (; s < c->n_seqs; s++) {
            const int t0 = c->h_start[s], n = c->h_start[s + 1] - t0, ctx = c->h_ctx[s];
            if (n <= MLA_ABS_MAX_Q) continue;
            if (a.n_seqs == FP_MAX_SEQS || rows + (size_t)ctx > budget) break;
            if (!(m->skip & BE_CUDA_MLA_SKIP_EXPAND) &&
                gather_launch(c, lat + rows * L, kv, s, ctx, L, layer) != DUET_OK)
                return;
            a.seq[a.n_seqs] = s;
            a.t0[a.n_seqs] = t0;
            a.nq[a.n_seqs] = n;
            a.ctx[a.n_seqs] = ctx;
            a.kvx_row[a.n_seqs] = (int)rows;
            a.n_seqs++;
            rows += (size_t)ctx;
        }
        if (!a.n_seqs) break;
        /* kvx[rows, H * (nope + v)] = lat[rows, L] @ kv_b^T */
        if (!(m->skip & BE_CUDA_MLA_SKIP_EXPAND))
            cuda_gemm_act(c, kvx, kvw, lat, L, (int)rows, kv_b->w, kvw, L);
        const int n_blocks = fp_tiles(a) * H;
        if (!(m->skip & BE_CUDA_MLA_SKIP_PREFILL)) {
            mla_prefill_tc<<<n_blocks, FP_THREADS, FP_SMEM, c->stream>>>(a);
            if (CUDA_LAUNCHED(c, "mla_prefill_tc") != DUET_OK) return;
        }
        launches++;
        blocks += n_blocks;
    }
    m->last.prefill_tc = true;
    m->last.prefill_launches = launches;
    m->last.prefill_blocks = blocks;
}

template <typename T>
static void mla_run(cuda_backend *c, void *out, const void *q, be_kv *kv, int layer,
                    const be_weight *kv_b, int H, int nope, int rope, int v, float scale) {
    const int L = kv->kv_dim - rope;
    mla_args<T> a = {};
    a.out = (T *)out;
    a.q = (const T *)q;
    a.cache = (const T *)kv->data;
    a.table = c->d_table;
    a.pos = c->d_pos;
    a.start = c->d_start;
    a.n_seqs = c->n_seqs;
    a.max_q = MLA_ABS_MAX_Q;
    a.wkvb = (const T *)kv_b->w;
    a.H = H;
    a.nope = nope;
    a.rope = rope;
    a.v = v;
    a.L = L;
    a.kv_dim = kv->kv_dim;
    a.n_layers = kv->n_layers;
    a.bs = kv->block_size;
    a.max_blocks = c->max_blocks;
    a.layer = layer;
    a.scale = scale;

    /* the batch's shape: sequences short enough for the absorbed form, and prompt chunks */
    int qmax = 0, t_lo = c->n_tokens, t_hi = 0, max_ctx = 0;
    for (int s = 0; s < c->n_seqs; s++) {
        int n = c->h_start[s + 1] - c->h_start[s];
        if (n >= 1 && n <= MLA_ABS_MAX_Q) {
            qmax = n > qmax ? n : qmax;
            t_lo = c->h_start[s] < t_lo ? c->h_start[s] : t_lo;
            t_hi = c->h_start[s + 1] > t_hi ? c->h_start[s + 1] : t_hi;
        }
        if (n > MLA_ABS_MAX_Q && c->h_ctx[s] > max_ctx) max_ctx = c->h_ctx[s];
    }
    if (c->mla) c->mla->last = be_cuda_mla_info{};
    if (qmax) {
        const bool tc = c->act == DT_BF16 && L == TC_L && rope == TC_R && nope % 8 == 0 &&
                        (uintptr_t)q % 16 == 0 && (uintptr_t)kv->data % 16 == 0;
        if (tc) {
            mla_decode_tc_run(c, (bf16 *)out, (const bf16 *)q, kv, layer, kv_b, H, nope, v, scale,
                              qmax, t_lo, t_hi);
        } else {
            /* every token's block; those of prompt chunks return at once */
            mla_kernel<T, true>
                <<<dim3(c->n_tokens, H), MLA_THREADS, mla_smem(L, rope, L), c->stream>>>(a);
            CUDA_LAUNCHED(c, "mla_kernel (absorbed)");
        }
        if (c->err != DUET_OK) return;
    }
    if (!max_ctx) return;
    if (c->act == DT_BF16 && !(c->mla && (c->mla->skip & BE_CUDA_MLA_PREFILL_CC)) &&
        nope == FP_NOPE && rope == FP_R && v == FP_V && kv->kv_dim - rope > 0 &&
        (kv->kv_dim - rope) % 8 == 0 && kv->kv_dim % 8 == 0 && (uintptr_t)q % 16 == 0 &&
        (uintptr_t)kv->data % 16 == 0) {
        mla_prefill_tc_run(c, (bf16 *)out, (const bf16 *)q, kv, layer, kv_b, H, nope + rope, scale);
        return;
    }

    /* prompt chunks on CUDA cores (float32, other shapes): per sequence, latents -> keys/values of
     * every head, then attention */
    const int kvw = H * (nope + v);
    size_t lat_n = (size_t)max_ctx * L, kvx_n = (size_t)max_ctx * kvw;
    T *lat = (T *)cuda_scratch(c, SCR_OP, (lat_n + kvx_n) * sizeof(T));
    if (!lat) return;
    T *kvx = lat + lat_n;
    a.kvx = kvx;
    for (int s = 0; s < c->n_seqs; s++) {
        int t0 = c->h_start[s], n = c->h_start[s + 1] - t0, ctx = c->h_ctx[s];
        if (n <= MLA_ABS_MAX_Q) continue;
        if (gather_launch(c, lat, kv, s, ctx, L, layer) != DUET_OK) return;
        /* kvx[ctx, H * (nope + v)] = lat[ctx, L] @ kv_b^T */
        cuda_gemm_act(c, kvx, kvw, lat, L, ctx, kv_b->w, kvw, L);
        a.t0 = t0;
        a.seq0 = s;
        mla_kernel<T, false><<<dim3(n, H), MLA_THREADS, mla_smem(nope, rope, v), c->stream>>>(a);
        if (CUDA_LAUNCHED(c, "mla_kernel (expanded)") != DUET_OK) return;
    }
}

/* ---- fp8 caches: the batch's blocks of one layer decoded into the shadow ---- */

/* One block per (sequence, block-table entry), s * max_blocks + jb in a 1-D grid (either count
 * alone can pass a grid's y limit): entry jb of sequence s, when it holds positions
 * below the sequence's context, is decoded whole (code * scale) into the shadow's copy of that
 * block id; entries past the context and ids outside the pool (padding block included: it
 * is the shadow's last block) are left alone. Launch shape: the batch's, never the contexts. */
template <typename T>
__global__ void kv_decode_layer(T *shadow, const uint8_t *cache, const int32_t *table,
                                const int32_t *ctx, int max_blocks, int n_layers, int bs,
                                int kv_dim, int layer, int n_ids, float scale) {
    const int s = (int)(blockIdx.x / (unsigned)max_blocks),
              jb = (int)(blockIdx.x % (unsigned)max_blocks);
    if ((long long)jb * bs >= ctx[s]) return;
    const int blk = table[(size_t)s * max_blocks + jb];
    if (blk < 0 || blk >= n_ids) return;
    const size_t n = (size_t)bs * kv_dim;
    const uint8_t *src = cache + ((size_t)blk * n_layers + layer) * n;
    T *dst = shadow + (size_t)blk * n;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x)
        dst[i] = from_f<T>(kv_from_e4m3(src[i]) * scale);
}

/* The view the attention kernels read for layer of an fp8 cache: the shadow as a one-layer
 * cache in the activation type, the batch's blocks of layer decoded into it. Two sequences
 * sharing a prefix block decode it twice, to the same values. */
static duet_status kv_decoded_view(cuda_backend *c, const be_kv *kv, int layer, be_kv *view_p) {
    const size_t es = c->act == DT_BF16 ? 2 : 4;
    const size_t need = ((size_t)kv->n_blocks + 1) * kv->block_size * kv->kv_dim * es;
    if (!c->kv_shadow || c->kv_shadow_bytes < need) {
        LOG_ERROR("cuda backend: no decoded layer for this fp8 KV cache (%zu bytes wanted, %zu "
                  "held)",
                  need, c->kv_shadow_bytes);
        return c->err = DUET_ERR_INTERNAL;
    }
    if (c->n_seqs > 0 && c->max_blocks > 0) {
        const unsigned g = (unsigned)c->max_blocks * (unsigned)c->n_seqs;
        if (c->act == DT_BF16)
            kv_decode_layer<bf16><<<g, 256, 0, c->stream>>>(
                (bf16 *)c->kv_shadow, (const uint8_t *)kv->data, c->d_table, c->d_ctx,
                c->max_blocks, kv->n_layers, kv->block_size, kv->kv_dim, layer, kv->n_blocks + 1,
                kv->scale);
        else
            kv_decode_layer<float><<<g, 256, 0, c->stream>>>(
                (float *)c->kv_shadow, (const uint8_t *)kv->data, c->d_table, c->d_ctx,
                c->max_blocks, kv->n_layers, kv->block_size, kv->kv_dim, layer, kv->n_blocks + 1,
                kv->scale);
        duet_status st = CUDA_LAUNCHED(c, "kv_decode_layer");
        if (st != DUET_OK) return st;
    }
    *view_p = *kv;
    view_p->n_layers = 1;
    view_p->dtype = c->act;
    view_p->scale = 1.0f;
    view_p->data = c->kv_shadow;
    view_p->block_bytes = (size_t)kv->block_size * kv->kv_dim * es;
    return DUET_OK;
}

void cuda_mla_attention(be_backend *be, void *out, const void *q, be_kv *kv, int layer,
                        const be_weight *kv_b, int H, int nope, int rope, int v, float scale) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK || c->n_tokens <= 0 || H <= 0) return;
    be_kv view;
    if (kv->dtype == DT_F8_E4M3) {
        /* decoded first, then every path below as for a cache in the activation type */
        if (kv_decoded_view(c, kv, layer, &view) != DUET_OK) return;
        kv = &view;
        layer = 0;
    }
    if (kv_b->dtype != c->act || kv->dtype != c->act) {
        LOG_ERROR("cuda backend: MLA needs kv_b and the KV cache in the activation type");
        c->err = DUET_ERR_INTERNAL;
        return;
    }
    if (c->act == DT_BF16)
        mla_run<bf16>(c, out, q, kv, layer, kv_b, H, nope, rope, v, scale);
    else
        mla_run<float>(c, out, q, kv, layer, kv_b, H, nope, rope, v, scale);
}

extern "C" duet_status be_cuda_mla_tune(be_backend *be, int n_split, unsigned skip) {
    cuda_backend *c = cuda_be(be);
    if (n_split < 0 || n_split > 4096) return DUET_ERR_INVALID;
    cuda_mla *m = mla_state(c);
    if (!m) return c->err;
    m->force_split = n_split;
    m->skip = skip;
    return DUET_OK;
}

extern "C" duet_status be_cuda_mla_variant(be_backend *be, int variant) {
    cuda_backend *c = cuda_be(be);
    if (variant < 0 || variant >= TC_N_VARIANTS) return DUET_ERR_INVALID;
    cuda_mla *m = mla_state(c);
    if (!m) return c->err;
    m->variant = variant;
    return DUET_OK;
}

extern "C" duet_status be_cuda_mla_last(be_backend *be, be_cuda_mla_info *info_p) {
    cuda_backend *c = cuda_be(be);
    cuda_mla *m = mla_state(c);
    if (!m) return c->err;
    *info_p = m->last;
    return DUET_OK;
}
