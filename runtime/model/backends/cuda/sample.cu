/* Token sampling on the GPU (the sampling ops of backend.h): one block per row runs the rule
 * that be_sample_host_row states on the host (backend_sample.c), with the same arithmetic
 * (sample_rule.h), so both choose the same token. Thresholds come from radix selection over
 * order keys, three histogram passes of 11/11/10 bits in shared memory (top-k and the top-N
 * logprobs count, top-p sums fixed-point masses: integer atomics, so the result does not
 * depend on their order), never from a sort; the draw is one pass of per-thread segment sums,
 * a block scan and one segment walked again. docs/kernels/sample.md gives the costs.
 *
 * One call is one upload of the rows (from page-locked memory), one launch of n blocks and
 * one download of the results, no host synchronisation and no allocation: the launch depends
 * on n and V only, so a step captured as a CUDA graph per batch size can hold it. */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "model/backends/cuda/cuda-impl.cuh"
#include "model/sample_rule.h"

extern "C" {
#include "base/philox.h"
}

#define SMP_THREADS 512
#define SMP_WARPS   (SMP_THREADS / 32)
static_assert(SMP_RADIX_BINS % SMP_THREADS == 0 && 1024 % SMP_THREADS == 0,
              "each thread owns whole bins of every digit");

/* The sampler: device copies of one call's rows and results, the probabilities of each row
 * (written once, read by the threshold passes and the draw) and the penalty slots. */
struct cuda_sampler {
    be_sampler pub;
    be_sample_row *d_rows; /* [max_rows] */
    be_sample_out *d_out;  /* [max_rows] */
    be_sample_top *d_top;  /* [max_rows] */
    float *d_prob;         /* [max_rows][V] */
    int32_t *d_counts;     /* [n_slots][V] output-token counts */
    uint32_t *d_bits;      /* [n_slots][words] prompt tokens */
    int words;             /* (V + 31) / 32 */
    size_t smem;           /* dynamic shared memory of a block */
};

template <typename T> struct smp_args {
    const T *logits; /* [n_logits][stride] */
    int stride, n_logits, V, words, n_slots;
    const be_sample_row *rows;
    be_sample_out *out;
    be_sample_top *top;
    float *prob; /* written and read again by the same block: no read-only cache path */
    int32_t *counts;
    const uint32_t *bits;
};

/* Block-wide scalars and reduction space (static shared memory). */
struct smp_shared {
    unsigned long long red[SMP_WARPS];
    double dred[SMP_WARPS];
    float fval[SMP_WARPS];
    int ival[SMP_WARPS];
    float zmax, rawmax;
    int zarg;
    double rawsum;
    int sel, cmin;
    unsigned long long sel_above;
    int token;
    int list[BE_SAMPLE_MAX_TOP];
};

/* Exclusive scan of v over the block in thread order; *total gets the sum. Starts with a
 * barrier, so sh.red may be reused call after call. */
__device__ unsigned long long block_exscan(unsigned long long v, smp_shared &sh,
                                           unsigned long long *total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned long long x = v;
    for (int o = 1; o < 32; o <<= 1) {
        unsigned long long y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();
    if (lane == 31) sh.red[warp] = x;
    __syncthreads();
    unsigned long long base = 0, tot = 0;
    for (int w = 0; w < SMP_WARPS; w++) {
        unsigned long long t = sh.red[w];
        if (w < warp) base += t;
        tot += t;
    }
    *total = tot;
    return base + x - v;
}

/* Block sum of doubles in a fixed order (deterministic); every thread gets it. */
__device__ double block_dsum(double v, smp_shared &sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) sh.dred[warp] = v;
    __syncthreads();
    double s = 0;
    for (int w = 0; w < SMP_WARPS; w++) s += sh.dred[w];
    return s;
}

/* Block max of floats; every thread gets it. */
__device__ float block_fmax(float v, smp_shared &sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) sh.fval[warp] = v;
    __syncthreads();
    float m = sh.fval[0];
    for (int w = 1; w < SMP_WARPS; w++) m = fmaxf(m, sh.fval[w]);
    return m;
}

/* Block argmax (larger value, then lower index); every thread gets the index, *v the value. */
__device__ int block_argmax(float bv, int bi, smp_shared &sh, float *v) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) {
            bv = ov;
            bi = oi;
        }
    }
    __syncthreads();
    if (lane == 0) {
        sh.fval[warp] = bv;
        sh.ival[warp] = bi;
    }
    __syncthreads();
    bv = sh.fval[0];
    bi = sh.ival[0];
    for (int w = 1; w < SMP_WARPS; w++)
        if (sh.fval[w] > bv || (sh.fval[w] == bv && sh.ival[w] < bi)) {
            bv = sh.fval[w];
            bi = sh.ival[w];
        }
    *v = bv;
    return bi;
}

/* The values a selection walks: probabilities of the row, or its raw logits. */
struct prob_src {
    const float *p;
    __device__ float at(int i) const {
        return p[i];
    }
};
template <typename T> struct raw_src {
    const T *l;
    __device__ float at(int i) const {
        return smp_clean(to_f(l[i]));
    }
};

/* The radix selection of backend_sample.c (radix_select), block-wide: the same digits, the
 * same counts and masses (integer sums), the same choice of bin. hcnt [2048], hmass [2048]. */
template <bool MASS, typename SRC>
__device__ uint32_t radix_select(const SRC &src, int V, uint32_t floor_key, unsigned long long want,
                                 unsigned int *hcnt, unsigned long long *hmass, smp_shared &sh) {
    const int tid = threadIdx.x;
    uint32_t pmask = 0, pval = 0;
    unsigned long long above = 0;
    for (int pass = 0; pass < 3; pass++) {
        const int shift = smp_digit_shift(pass);
        const uint32_t dmask = smp_digit_mask(pass);
        const int nb = (int)dmask + 1, bpt = nb / SMP_THREADS;
        for (int b = tid; b < nb; b += SMP_THREADS) {
            hcnt[b] = 0;
            if (MASS) hmass[b] = 0;
        }
        __syncthreads();
        for (int i = tid; i < V; i += SMP_THREADS) {
            const float x = src.at(i);
            const uint32_t key = smp_key(x);
            if (key < floor_key || (key & pmask) != pval) continue;
            const uint32_t d = (key >> shift) & dmask;
            atomicAdd(&hcnt[d], 1u);
            if (MASS) atomicAdd(&hmass[d], (unsigned long long)smp_mass(x));
        }
        __syncthreads();
        /* thread t owns bins hi, hi - 1, .. hi - bpt + 1: thread order is bin order from the
         * top, so the exclusive scan gives what lies above each thread's first bin */
        const int hi = nb - 1 - tid * bpt;
        unsigned long long mine = 0, tot;
        for (int j = 0; j < bpt; j++) mine += MASS ? hmass[hi - j] : hcnt[hi - j];
        unsigned long long run = above + block_exscan(mine, sh, &tot);
        if (tid == 0) {
            sh.sel = 0;
            sh.sel_above = above;
            sh.cmin = INT_MAX;
        }
        __syncthreads();
        if (!MASS) {
            /* the bin where the count from the top reaches want: one thread finds it */
            for (int j = 0; j < bpt; j++) {
                const unsigned long long c = hcnt[hi - j];
                if (run < want && run + c >= want) {
                    sh.sel = hi - j;
                    sh.sel_above = run;
                }
                run += c;
            }
        } else {
            /* the lowest non-empty bin whose mass above is below want */
            int cand = -1;
            unsigned long long cand_above = 0;
            for (int j = 0; j < bpt && run < want; j++) {
                if (hcnt[hi - j]) {
                    cand = hi - j;
                    cand_above = run;
                }
                run += hmass[hi - j];
            }
            if (cand >= 0) atomicMin(&sh.cmin, cand);
            __syncthreads();
            if (cand >= 0 && cand == sh.cmin) {
                sh.sel = cand;
                sh.sel_above = cand_above;
            }
        }
        __syncthreads();
        above = sh.sel_above;
        pval |= (uint32_t)sh.sel << shift;
        pmask |= dmask << shift;
    }
    return pval;
}

/* The penalized, banned logit of token i. */
template <typename T>
__device__ __forceinline__ float zval(const T *lg, int i, const be_sample_row &r,
                                      const int32_t *cnt, const uint32_t *pb, const uint32_t *ban) {
    float l = smp_clean(to_f(lg[i]));
    if (cnt)
        l = smp_penalize(l, cnt[i], (pb[i >> 5] >> (i & 31)) & 1u, r.repetition_penalty,
                         r.presence_penalty, r.frequency_penalty);
    if ((ban[i >> 5] >> (i & 31)) & 1u) l = -INFINITY;
    return l;
}

template <typename T> __global__ void __launch_bounds__(SMP_THREADS) sample_kernel(smp_args<T> a) {
    extern __shared__ unsigned long long dyn[];
    __shared__ smp_shared sh;
    unsigned long long *hmass = dyn;                             /* [2048] */
    unsigned int *hcnt = (unsigned int *)(dyn + SMP_RADIX_BINS); /* [2048] */
    uint32_t *ban = (uint32_t *)(hcnt + SMP_RADIX_BINS);         /* [words] */
    const int tid = threadIdx.x, V = a.V, row = blockIdx.x;
    const be_sample_row &r = a.rows[row];
    be_sample_out *out = a.out + row;
    if (r.logits_row < 0 || r.logits_row >= a.n_logits) { /* the host checked; stay in bounds */
        if (tid == 0) {
            out->token = 0;
            out->logprob = 0.0f;
        }
        return;
    }
    const T *lg = a.logits + (size_t)r.logits_row * a.stride;
    float *prob = a.prob + (size_t)row * V;

    /* bans as a bitmap of the vocabulary */
    for (int w = tid; w < a.words; w += SMP_THREADS) ban[w] = 0;
    __syncthreads();
    const int n_ban = min(max(r.n_ban, 0), BE_SAMPLE_MAX_BAN);
    for (int j = tid; j < n_ban; j += SMP_THREADS) {
        const int b = r.ban[j];
        if (b >= 0 && b < V) atomicOr(&ban[b >> 5], 1u << (b & 31));
    }
    __syncthreads();
    const bool has_slot = r.slot >= 0 && r.slot < a.n_slots;
    const bool pen = has_slot && (r.presence_penalty != 0.0f || r.frequency_penalty != 0.0f ||
                                  (r.repetition_penalty > 0.0f && r.repetition_penalty != 1.0f));
    int32_t *slot_counts = has_slot ? a.counts + (size_t)r.slot * V : nullptr;
    const int32_t *cnt = pen ? slot_counts : nullptr;
    const uint32_t *pb = pen ? a.bits + (size_t)r.slot * a.words : nullptr;

    /* 1-3. the penalized maximum (the greedy token) and the raw one (logprobs) */
    float bv = -INFINITY, rm = -INFINITY;
    int bi = INT_MAX;
    for (int i = tid; i < V; i += SMP_THREADS) {
        const float z = zval(lg, i, r, cnt, pb, ban);
        if (z > bv) { /* ids rise within a thread: strictly greater keeps the lowest */
            bv = z;
            bi = i;
        }
        rm = fmaxf(rm, smp_clean(to_f(lg[i])));
    }
    float zmax;
    int zarg = block_argmax(bv, bi, sh, &zmax);
    if (zarg == INT_MAX) zarg = 0; /* no finite logit: token 0, as the host rule */
    const float rawmax = block_fmax(rm, sh);

    int tok = zarg;
    if (r.temperature >= 1e-5f && zmax > -INFINITY) {
        const float inv_t = 1.0f / r.temperature;
        for (int i = tid; i < V; i += SMP_THREADS)
            prob[i] = smp_exp_neg(SMP_MUL(SMP_SUB(zval(lg, i, r, cnt, pb, ban), zmax), inv_t));
        __syncthreads(); /* the block's writes of prob are visible to the block */
        const prob_src ps = {prob};
        /* 4. thresholds as keys: keep p with key >= thr */
        uint32_t thr = smp_key(0.0f) + 1;
        if (r.top_k > 0 && r.top_k < V) {
            const uint32_t k =
                radix_select<false>(ps, V, 0, (unsigned long long)r.top_k, hcnt, hmass, sh);
            thr = max(thr, k);
        }
        if (r.top_p < 1.0f) {
            unsigned long long m = 0, total;
            for (int i = tid; i < V; i += SMP_THREADS) {
                const float p = prob[i];
                if (smp_key(p) >= thr) m += smp_mass(p);
            }
            (void)block_exscan(m, sh, &total);
            const uint32_t k =
                radix_select<true>(ps, V, thr, smp_top_p_limit(r.top_p, total), hcnt, hmass, sh);
            thr = max(thr, k);
        }
        if (r.min_p > 0.0f) thr = max(thr, smp_key(r.min_p));

        /* 5. the draw: each thread sums its contiguous segment of ids, the scan places the
         * segments in id order, the thread whose segment holds the target walks it again */
        const int seg = (V + SMP_THREADS - 1) / SMP_THREADS;
        const int i0 = min(V, tid * seg), i1 = min(V, i0 + seg);
        unsigned long long mine = 0, total;
        for (int i = i0; i < i1; i++) {
            const float p = prob[i];
            if (smp_key(p) >= thr) mine += smp_mass(p);
        }
        const unsigned long long before = block_exscan(mine, sh, &total);
        if (tid == 0) sh.token = zarg;
        __syncthreads();
        if (total > 0) {
            const unsigned long long target = smp_target(philox_uniform(r.seed, r.offset), total);
            if (mine > 0 && before <= target && target < before + mine) {
                unsigned long long acc = before;
                for (int i = i0; i < i1; i++) {
                    const float p = prob[i];
                    if (smp_key(p) < thr) continue;
                    acc += smp_mass(p);
                    if (acc > target) {
                        sh.token = i;
                        break;
                    }
                }
            }
        }
        __syncthreads();
        tok = sh.token;
    }
    /* 6. the slot counts the token (this block is the only one using the slot) */
    if (tid == 0) {
        if (slot_counts) slot_counts[tok] += 1;
        out->token = tok;
        out->logprob = 0.0f;
    }
    if (r.n_logprobs < 0) return;

    /* logprobs of the raw row */
    double s = 0;
    if (rawmax > -INFINITY)
        for (int i = tid; i < V; i += SMP_THREADS)
            s += (double)expf(smp_clean(to_f(lg[i])) - rawmax);
    s = block_dsum(s, sh);
    const float lse = rawmax > -INFINITY ? rawmax + (float)log(s) : 0.0f;
    if (tid == 0) out->logprob = smp_clean(to_f(lg[tok])) - lse;
    const int n_top = min(min(r.n_logprobs, BE_SAMPLE_MAX_TOP), V);
    if (n_top <= 0) return;
    const raw_src<T> rs = {lg};
    const uint32_t t = radix_select<false>(rs, V, 0, (unsigned long long)n_top, hcnt, hmass, sh);
    /* every key above t (fewer than n_top of them), then the lowest ids equal to t: counts per
     * contiguous segment, packed (above << 32 | equal), scanned in id order */
    const int seg = (V + SMP_THREADS - 1) / SMP_THREADS;
    const int i0 = min(V, tid * seg), i1 = min(V, i0 + seg);
    unsigned long long packed = 0, tot;
    for (int i = i0; i < i1; i++) {
        const uint32_t k = smp_key(rs.at(i));
        packed += k > t ? (1ull << 32) : (k == t ? 1ull : 0ull);
    }
    const unsigned long long before = block_exscan(packed, sh, &tot);
    const int n_gt = (int)(tot >> 32), need = n_top - n_gt;
    int at_gt = (int)(before >> 32), rank_eq = (int)(before & 0xffffffffull);
    for (int i = i0; i < i1; i++) {
        const uint32_t k = smp_key(rs.at(i));
        if (k > t) {
            if (at_gt < BE_SAMPLE_MAX_TOP) sh.list[at_gt] = i;
            at_gt++;
        } else if (k == t) {
            if (rank_eq < need && n_gt + rank_eq < BE_SAMPLE_MAX_TOP) sh.list[n_gt + rank_eq] = i;
            rank_eq++;
        }
    }
    __syncthreads();
    if (tid == 0) {
        /* insertion sort of at most 20: value descending, then id ascending */
        for (int x = 1; x < n_top; x++) {
            const int id = sh.list[x];
            const float xv = rs.at(id);
            int y = x;
            while (y > 0) {
                const int o = sh.list[y - 1];
                const float ov = rs.at(o);
                if (ov > xv || (ov == xv && o < id)) break;
                sh.list[y] = o;
                y--;
            }
            sh.list[y] = id;
        }
        be_sample_top *top = a.top + row;
        for (int x = 0; x < n_top; x++) {
            top->token[x] = sh.list[x];
            top->logprob[x] = rs.at(sh.list[x]) - lse;
        }
    }
}

/* Penalty slot set-up: prompt tokens' bits, output tokens counted. ids [n_prompt + n_output]. */
__global__ void slot_init_kernel(const int32_t *ids, int n_prompt, int n_total, int V,
                                 int32_t *counts, uint32_t *bits) {
    for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < n_total; k += gridDim.x * blockDim.x) {
        const int t = ids[k];
        if (t < 0 || t >= V) continue;
        if (k < n_prompt)
            atomicOr(&bits[t >> 5], 1u << (t & 31));
        else
            atomicAdd(&counts[t], 1);
    }
}

static cuda_sampler *cs_of(be_sampler *s) {
    return (cuda_sampler *)s;
}

void cuda_sampler_destroy(be_backend *be, be_sampler *s) {
    if (!s) return;
    cuda_backend *c = cuda_be(be);
    cuda_sampler *x = cs_of(s);
    (void)cudaStreamSynchronize(c->stream); /* a queued call may still use the memory */
    cudaFree(x->d_rows);
    cudaFree(x->d_out);
    cudaFree(x->d_top);
    cudaFree(x->d_prob);
    cudaFree(x->d_counts);
    cudaFree(x->d_bits);
    cudaFreeHost(s->rows);
    cudaFreeHost(s->out);
    cudaFreeHost(s->top);
    (void)cudaGetLastError();
    free(x);
}

duet_status cuda_sampler_create(be_backend *be, int max_rows, int V, int n_slots,
                                be_sampler **s_p) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return c->err;
    if (max_rows < 1 || V < 1 || n_slots < 0) return DUET_ERR_INVALID;
    cuda_sampler *x = (cuda_sampler *)calloc(1, sizeof *x);
    if (!x) return DUET_ERR_NO_MEMORY;
    be_sampler *s = &x->pub;
    s->max_rows = max_rows;
    s->V = V;
    s->n_slots = n_slots;
    x->words = (V + 31) / 32;
    x->smem = SMP_RADIX_BINS * (sizeof(unsigned long long) + sizeof(unsigned int)) +
              (size_t)x->words * sizeof(uint32_t);
    const size_t rows = (size_t)max_rows, ns = (size_t)(n_slots ? n_slots : 1);
    int optin = 0;
    duet_status st = CUDA_CHECK(
        c, cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, c->device));
    if (st == DUET_OK && x->smem + sizeof(smp_shared) > (size_t)optin) {
        LOG_ERROR("cuda sampling: a vocabulary of %d needs %zu bytes of shared memory, the "
                  "device has %d",
                  V, x->smem, optin);
        st = DUET_ERR_UNSUPPORTED;
    }
    if (st == DUET_OK && x->smem > 48 * 1024) {
        st = CUDA_CHECK(c, cudaFuncSetAttribute(sample_kernel<bf16>,
                                                cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                (int)x->smem));
        if (st == DUET_OK)
            st = CUDA_CHECK(c, cudaFuncSetAttribute(sample_kernel<float>,
                                                    cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                    (int)x->smem));
    }
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaMalloc(&x->d_rows, rows * sizeof(be_sample_row)));
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaMalloc(&x->d_out, rows * sizeof(be_sample_out)));
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaMalloc(&x->d_top, rows * sizeof(be_sample_top)));
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaMalloc(&x->d_prob, rows * V * sizeof(float)));
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaMalloc(&x->d_counts, ns * V * sizeof(int32_t)));
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaMalloc(&x->d_bits, ns * x->words * sizeof(uint32_t)));
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaMemset(x->d_counts, 0, ns * V * sizeof(int32_t)));
    if (st == DUET_OK)
        st = CUDA_CHECK(c, cudaMemset(x->d_bits, 0, ns * x->words * sizeof(uint32_t)));
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaMallocHost(&s->rows, rows * sizeof(be_sample_row)));
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaMallocHost(&s->out, rows * sizeof(be_sample_out)));
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaMallocHost(&s->top, rows * sizeof(be_sample_top)));
    if (st != DUET_OK) {
        cuda_sampler_destroy(be, s);
        return st;
    }
    for (int i = 0; i < max_rows; i++) be_sample_row_init(&s->rows[i]);
    *s_p = s;
    return DUET_OK;
}

duet_status cuda_sampler_slot_init(be_backend *be, be_sampler *s, int slot, const int32_t *prompt,
                                   int n_prompt, const int32_t *output, int n_output) {
    cuda_backend *c = cuda_be(be);
    cuda_sampler *x = cs_of(s);
    if (c->err != DUET_OK) return c->err;
    if (slot < 0 || slot >= s->n_slots || n_prompt < 0 || n_output < 0) return DUET_ERR_INVALID;
    int32_t *counts = x->d_counts + (size_t)slot * s->V;
    uint32_t *bits = x->d_bits + (size_t)slot * x->words;
    duet_status st =
        CUDA_CHECK(c, cudaMemsetAsync(counts, 0, (size_t)s->V * sizeof(int32_t), c->stream));
    if (st == DUET_OK)
        st =
            CUDA_CHECK(c, cudaMemsetAsync(bits, 0, (size_t)x->words * sizeof(uint32_t), c->stream));
    const int n = n_prompt + n_output;
    if (st != DUET_OK || n == 0) return st;
    int32_t *h = (int32_t *)cuda_host_tmp(c, (size_t)n * sizeof(int32_t));
    if (!h) return c->err;
    if (n_prompt) memcpy(h, prompt, (size_t)n_prompt * sizeof(int32_t));
    if (n_output) memcpy(h + n_prompt, output, (size_t)n_output * sizeof(int32_t));
    int32_t *d = cuda_upload_idx(c, h, (size_t)n);
    if (!d) return c->err;
    const int g = min((n + 255) / 256, 1024);
    slot_init_kernel<<<g, 256, 0, c->stream>>>(d, n_prompt, n, s->V, counts, bits);
    return CUDA_LAUNCHED(c, "slot_init_kernel");
}

template <typename T>
static void launch(cuda_backend *c, cuda_sampler *x, const void *logits, int stride, int n_logits,
                   int n) {
    smp_args<T> a;
    a.logits = (const T *)logits;
    a.stride = stride;
    a.n_logits = n_logits;
    a.V = x->pub.V;
    a.words = x->words;
    a.n_slots = x->pub.n_slots;
    a.rows = x->d_rows;
    a.out = x->d_out;
    a.top = x->d_top;
    a.prob = x->d_prob;
    a.counts = x->d_counts;
    a.bits = x->d_bits;
    sample_kernel<T><<<n, SMP_THREADS, x->smem, c->stream>>>(a);
}

duet_status cuda_sample(be_backend *be, be_sampler *s, const void *logits, int stride, int n_logits,
                        int n) {
    cuda_backend *c = cuda_be(be);
    cuda_sampler *x = cs_of(s);
    if (c->err != DUET_OK) return c->err;
    if (n <= 0) return DUET_OK;
    if (n > s->max_rows) return DUET_ERR_INVALID;
    bool want_top = false;
    for (int i = 0; i < n; i++) want_top |= s->rows[i].n_logprobs > 0;
    duet_status st =
        CUDA_CHECK(c, cudaMemcpyAsync(x->d_rows, s->rows, (size_t)n * sizeof(be_sample_row),
                                      cudaMemcpyHostToDevice, c->stream));
    if (st != DUET_OK) return st;
    if (c->act == DT_BF16)
        launch<bf16>(c, x, logits, stride, n_logits, n);
    else
        launch<float>(c, x, logits, stride, n_logits, n);
    st = CUDA_LAUNCHED(c, "sample_kernel");
    if (st == DUET_OK)
        st = CUDA_CHECK(c, cudaMemcpyAsync(s->out, x->d_out, (size_t)n * sizeof(be_sample_out),
                                           cudaMemcpyDeviceToHost, c->stream));
    /* the alternatives only when asked: 160 bytes a row otherwise left on the device */
    if (st == DUET_OK && want_top)
        st = CUDA_CHECK(c, cudaMemcpyAsync(s->top, x->d_top, (size_t)n * sizeof(be_sample_top),
                                           cudaMemcpyDeviceToHost, c->stream));
    return st;
}
