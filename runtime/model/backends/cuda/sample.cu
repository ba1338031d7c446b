/* Token sampling on the GPU (be_ops.sample): one block per row runs the rule of
 * be_sample_row (backend.h) that be_sample_host states on the host. Thresholds are found by
 * bisection over the float bit patterns (32 counting passes for top-k, 31 summing passes for
 * top-p) instead of a sort; the draw scans the kept probabilities in token id order. */
#include <cub/block/block_scan.cuh>

#include "model/backends/cuda/cuda-impl.cuh"

extern "C" {
#include "base/philox.h"
}

#define SAMPLE_THREADS 512

/* Order-preserving map of a float to an unsigned key. */
__device__ __forceinline__ uint32_t float_key(float f) {
    uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <typename R> __device__ R block_total(R v, R *red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : (R)0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename T>
__global__ void __launch_bounds__(SAMPLE_THREADS)
    sample_kernel(const T *logits, int V, const be_sample_row *rows, float *prob, int32_t *out) {
    typedef cub::BlockScan<double, SAMPLE_THREADS> scan_t;
    __shared__ typename scan_t::TempStorage scan_tmp;
    __shared__ double red_d[32];
    __shared__ int red_i[32];
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    __shared__ int found;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    const T *lg = logits + (size_t)blockIdx.x * V;
    float *p = prob + (size_t)blockIdx.x * V;
    const be_sample_row r = rows[blockIdx.x];

    /* argmax, the lowest id among ties */
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = tid; i < V; i += blockDim.x) {
        float v = to_f(lg[i]);
        if (v > bv) { /* ids rise within a thread: strictly greater keeps the lowest */
            bv = v;
            bi = i;
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) {
            bv = ov;
            bi = oi;
        }
    }
    if (lane == 0) {
        best_v[warp] = bv;
        best_i[warp] = bi;
    }
    __syncthreads();
    bv = best_v[0];
    bi = best_i[0];
    for (int w = 1; w < nw; w++)
        if (best_v[w] > bv || (best_v[w] == bv && best_i[w] < bi)) {
            bv = best_v[w];
            bi = best_i[w];
        }
    if (bi == 0x7fffffff) bi = 0; /* every logit NaN: any id will do */
    if (!(r.temperature >= 1e-5f)) {
        if (tid == 0) out[blockIdx.x] = bi;
        return;
    }
    const float mx = bv, inv_t = 1.0f / r.temperature;
    for (int i = tid; i < V; i += blockDim.x) p[i] = expf((to_f(lg[i]) - mx) * inv_t);

    if (r.top_k > 0 && r.top_k < V) {
        /* the largest key tau with count(key >= tau) >= k is the k-th largest logit's */
        uint64_t lo = 0, hi = 0xffffffffull;
        while (lo < hi) {
            uint64_t mid = lo + (hi - lo + 1) / 2;
            int cnt = 0;
            for (int i = tid; i < V; i += blockDim.x) cnt += float_key(to_f(lg[i])) >= mid;
            cnt = block_total<int>(cnt, red_i);
            if (cnt >= r.top_k)
                lo = mid;
            else
                hi = mid - 1;
        }
        for (int i = tid; i < V; i += blockDim.x)
            if (float_key(to_f(lg[i])) < lo) p[i] = 0.0f;
    }
    __syncthreads();
    if (r.top_p < 1.0f) {
        double total = 0;
        for (int i = tid; i < V; i += blockDim.x) total += p[i];
        total = block_total<double>(total, red_d);
        const double limit = (double)r.top_p * total;
        /* the smallest kappa with mass(p > kappa) < limit; keep p >= kappa. p <= 1 = 0x3f800000 */
        uint32_t lo = 0, hi = 0x3f800000u;
        while (lo < hi) {
            uint32_t mid = lo + (hi - lo) / 2;
            float kappa = __uint_as_float(mid);
            double above = 0;
            for (int i = tid; i < V; i += blockDim.x)
                if (p[i] > kappa) above += p[i];
            above = block_total<double>(above, red_d);
            if (above < limit)
                hi = mid;
            else
                lo = mid + 1;
        }
        const float kappa = __uint_as_float(lo);
        __syncthreads();
        for (int i = tid; i < V; i += blockDim.x)
            if (p[i] < kappa) p[i] = 0.0f;
    }
    if (r.min_p > 0.0f) {
        /* the most likely token has p = exp(0) = 1 and survives top-k and top-p */
        for (int i = tid; i < V; i += blockDim.x)
            if (p[i] < r.min_p) p[i] = 0.0f;
    }
    __syncthreads();
    double total = 0;
    int last = -1;
    for (int i = tid; i < V; i += blockDim.x) {
        total += p[i];
        if (p[i] > 0.0f) last = i;
    }
    total = block_total<double>(total, red_d);
    for (int o = 16; o > 0; o >>= 1) last = max(last, __shfl_xor_sync(0xffffffffu, last, o));
    __syncthreads();
    if (lane == 0) red_i[warp] = last;
    if (tid == 0) found = 0x7fffffff;
    __syncthreads();
    last = -1;
    for (int w = 0; w < nw; w++) last = max(last, red_i[w]);
    const double target = philox_uniform(r.seed, r.offset) * total;

    /* inclusive scan in id order, a block-wide chunk at a time */
    double base = 0;
    for (int c0 = 0; c0 < V; c0 += blockDim.x) {
        const int i = c0 + tid;
        const float pi = i < V ? p[i] : 0.0f;
        double incl, chunk;
        scan_t(scan_tmp).InclusiveSum((double)pi, incl, chunk);
        if (pi > 0.0f && base + incl > target) atomicMin(&found, i);
        __syncthreads();
        if (found != 0x7fffffff) break;
        base += chunk;
    }
    if (tid == 0) out[blockIdx.x] = found != 0x7fffffff ? found : (last >= 0 ? last : bi);
}

duet_status cuda_sample(be_backend *be, const void *logits, int n, int V, const be_sample_row *rows,
                        int32_t *ids) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return c->err;
    if (n <= 0) return DUET_OK;
    if (V <= 0) return DUET_ERR_INVALID;
    /* prob [n, V] float, then rows [n], then ids [n] */
    size_t pb = (size_t)n * V * sizeof(float), rb = (size_t)n * sizeof(be_sample_row);
    pb = (pb + 15) / 16 * 16;
    char *scr = (char *)cuda_scratch(c, SCR_OP, pb + rb + (size_t)n * sizeof(int32_t));
    if (!scr) return c->err;
    be_sample_row *d_rows = (be_sample_row *)(scr + pb);
    int32_t *d_ids = (int32_t *)(scr + pb + rb);
    duet_status st =
        CUDA_CHECK(c, cudaMemcpyAsync(d_rows, rows, rb, cudaMemcpyHostToDevice, c->stream));
    if (st != DUET_OK) return st;
    if (c->act == DT_BF16)
        sample_kernel<bf16><<<n, SAMPLE_THREADS, 0, c->stream>>>((const bf16 *)logits, V, d_rows,
                                                                 (float *)scr, d_ids);
    else
        sample_kernel<float><<<n, SAMPLE_THREADS, 0, c->stream>>>((const float *)logits, V, d_rows,
                                                                  (float *)scr, d_ids);
    st = CUDA_LAUNCHED(c, "sample_kernel");
    if (st == DUET_OK)
        st = CUDA_CHECK(c, cudaMemcpyAsync(ids, d_ids, (size_t)n * sizeof(int32_t),
                                           cudaMemcpyDeviceToHost, c->stream));
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaStreamSynchronize(c->stream));
    return st != DUET_OK ? st : c->err;
}
