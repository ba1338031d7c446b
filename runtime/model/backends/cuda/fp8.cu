/* FP8 e4m3 weights with 128x128 block scales kept as they are on the device (DeepSeek-V3's
 * checkpoint format), and the linear layer over them: up to 8 rows a one-pass kernel that
 * dequantizes in registers, more rows the grouped GEMM of moe_gemm.cu with one group, whose
 * tiles read e4m3 bytes and dequantize them in shared memory. Activations stay
 * bf16 (no activation quantization): the CPU reference with bf16 emulation computes the same
 * products. What the loader hands over is weights.c's; the GEMM kernels are moe_gemm.cu's. */
#include <cuda_fp8.h>
#include <stdio.h>
#include <stdlib.h>

#include "model/backends/cuda/moe-impl.cuh"

extern "C" {
#include "model/backends/cuda/backend_cuda.h"
}

/* up to this many rows of x take the one-pass kernel below, more the tensor-core tiles */
#define FP8_GEMV_MAX_M 8

duet_status cuda_weight_create_fp8(be_backend *be, const uint8_t *q, const float *scales, int n_out,
                                   int n_in, int split, be_weight **w_p) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return c->err;
    /* float32 activations (the reference path) keep dequantized float32 weights */
    if (c->act != DT_BF16) return DUET_ERR_UNSUPPORTED;
    if (n_out <= 0 || n_in <= 0 || n_in % 16 || split <= 0 || split > n_out) {
        LOG_ERROR("cuda backend: an FP8 weight [%d, %d] split at row %d (n_in must be a multiple "
                  "of 16)",
                  n_out, n_in, split);
        return DUET_ERR_INVALID;
    }
    size_t bytes = (size_t)n_out * (size_t)n_in;
    size_t cb = (size_t)(n_in + 127) / 128;
    size_t rb = (size_t)(split + 127) / 128 + (size_t)(n_out - split + 127) / 128;
    size_t sbytes = rb * cb * sizeof(float);
    be_weight *bw = (be_weight *)calloc(1, sizeof *bw);
    if (!bw) return DUET_ERR_NO_MEMORY;
    duet_status st = CUDA_CHECK(c, cudaMalloc(&bw->w, bytes));
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaMalloc((void **)&bw->scale, sbytes));
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaMalloc((void **)&bw->tab, 2 * sizeof(void *)));
    /* synchronous copies: the loader reuses its staging for the next weight */
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaMemcpy(bw->w, q, bytes, cudaMemcpyHostToDevice));
    if (st == DUET_OK)
        st = CUDA_CHECK(c, cudaMemcpy(bw->scale, scales, sbytes, cudaMemcpyHostToDevice));
    void *tab[2] = {bw->w, bw->scale};
    if (st == DUET_OK)
        st = CUDA_CHECK(c, cudaMemcpy(bw->tab, tab, sizeof tab, cudaMemcpyHostToDevice));
    if (st != DUET_OK) {
        cudaFree(bw->w);
        cudaFree(bw->scale);
        cudaFree(bw->tab);
        free(bw);
        return st;
    }
    bw->n_out = n_out;
    bw->n_in = n_in;
    bw->dtype = DT_F8_E4M3;
    bw->split = split;
    *w_p = bw;
    return DUET_OK;
}

/* ---- decode: M <= 8 rows of x, one pass over the weight ----
 * Each warp owns FP8_ROWS output rows; each lane reads 16 weight bytes of a row with one
 * 16-byte load, dequantizes them in registers with their block's scale (rounded to bf16, as the
 * tile path and the CPU emulation round the weight) and multiplies them with the M rows of x
 * held in shared memory a chunk of K at a time. Every weight byte is read once; x is read once
 * per block from L2. */

#define FP8_ROWS  2    /* output rows of a warp */
#define FP8_WARPS 8    /* warps of a block: FP8_ROWS * FP8_WARPS rows a block */
#define FP8_KC    2048 /* columns of x staged at a time */

__device__ __forceinline__ void fp8x16_dequant(uint4 q, float scale, float (&w)[16]) {
    const unsigned u[4] = {q.x, q.y, q.z, q.w};
    for (int i = 0; i < 4; i++)
        for (int h = 0; h < 2; h++) {
            __half2_raw r = __nv_cvt_fp8x2_to_halfraw2(
                (__nv_fp8x2_storage_t)((u[i] >> (16 * h)) & 0xffffu), __NV_E4M3);
            float2 f = __half22float2(__half2(r));
            __nv_bfloat162 b = __floats2bfloat162_rn(f.x * scale, f.y * scale);
            w[i * 4 + h * 2] = __low2float(b);
            w[i * 4 + h * 2 + 1] = __high2float(b);
        }
}

template <int MT>
__global__ void __launch_bounds__(FP8_WARPS * 32)
    fp8_gemv_kernel(bf16 *__restrict__ y, int ldy, const bf16 *__restrict__ x, int ldx, int M,
                    const uint8_t *__restrict__ wq, const float *__restrict__ sc, int N, int K,
                    int split) {
    __shared__ __align__(16) bf16 xs[MT][FP8_KC];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row0 = (blockIdx.x * FP8_WARPS + warp) * FP8_ROWS;
    const int cb = (K + 127) / 128, rb0 = (split + 127) / 128;
    const uint8_t *wrow[FP8_ROWS];
    const float *srow[FP8_ROWS];
    for (int r = 0; r < FP8_ROWS; r++) {
        int n = row0 + r < N ? row0 + r : N - 1; /* rows past N compute a copy, not stored */
        wrow[r] = wq + (long long)n * K;
        srow[r] = sc + (long long)(n < split ? n / 128 : rb0 + (n - split) / 128) * cb;
    }
    float acc[FP8_ROWS][MT];
    for (int r = 0; r < FP8_ROWS; r++)
        for (int m = 0; m < MT; m++) acc[r][m] = 0.0f;

    for (int kc = 0; kc < K; kc += FP8_KC) {
        const int kn = K - kc < FP8_KC ? K - kc : FP8_KC;
        __syncthreads(); /* the previous chunk is no longer read */
        for (int i = threadIdx.x; i < MT * (FP8_KC / 8); i += blockDim.x) {
            int m = i / (FP8_KC / 8), k8 = (i % (FP8_KC / 8)) * 8;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (m < M && k8 < kn) {
                const bf16 *src = x + (long long)m * ldx + kc + k8;
                if ((((uintptr_t)src) & 15) == 0) {
                    v = *reinterpret_cast<const uint4 *>(src);
                } else { /* rows of x at a stride that breaks 16-byte alignment */
                    unsigned short t[8];
                    for (int j = 0; j < 8; j++)
                        t[j] = reinterpret_cast<const unsigned short *>(src)[j];
                    v = make_uint4(t[0] | (unsigned)t[1] << 16, t[2] | (unsigned)t[3] << 16,
                                   t[4] | (unsigned)t[5] << 16, t[6] | (unsigned)t[7] << 16);
                }
            }
            *reinterpret_cast<uint4 *>(&xs[m][k8]) = v;
        }
        __syncthreads();
        for (int k = lane * 16; k < kn; k += 32 * 16) {
            for (int r = 0; r < FP8_ROWS; r++) {
                uint4 q = __ldg(reinterpret_cast<const uint4 *>(wrow[r] + kc + k));
                float w[16];
                fp8x16_dequant(q, __ldg(srow[r] + (kc + k) / 128), w);
                for (int m = 0; m < MT; m++) {
                    const uint4 *xv = reinterpret_cast<const uint4 *>(&xs[m][k]);
                    float a = acc[r][m];
                    for (int h = 0; h < 2; h++) {
                        uint4 xx = xv[h];
                        const unsigned u[4] = {xx.x, xx.y, xx.z, xx.w};
                        for (int j = 0; j < 4; j++) {
                            __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162 *>(&u[j]);
                            a += __low2float(b) * w[h * 8 + j * 2];
                            a += __high2float(b) * w[h * 8 + j * 2 + 1];
                        }
                    }
                    acc[r][m] = a;
                }
            }
        }
    }
    for (int r = 0; r < FP8_ROWS; r++)
        for (int m = 0; m < MT; m++) {
            float v = warp_sum(acc[r][m]);
            if (lane == 0 && m < M && row0 + r < N)
                y[(long long)m * ldy + row0 + r] = __float2bfloat16_rn(v);
        }
}

template <int MT>
static void gemv_launch(cuda_backend *c, void *y, int ldy, const void *x, int ldx, int M,
                        const be_weight *w) {
    const int rows = FP8_ROWS * FP8_WARPS;
    fp8_gemv_kernel<MT><<<(w->n_out + rows - 1) / rows, FP8_WARPS * 32, 0, c->stream>>>(
        (bf16 *)y, ldy, (const bf16 *)x, ldx, M, (const uint8_t *)w->w, w->scale, w->n_out, w->n_in,
        w->split);
    CUDA_LAUNCHED(c, "fp8_gemv_kernel");
}

/* The tile list of T rows in tiles of bm: (group 0, first row, rows); its length in *n. Written
 * on the device so a recorded step replays it without a host copy. */
__global__ void fp8_tiles_kernel(int4 *tiles, int *n, int T, int bm) {
    const int nt = (T + bm - 1) / bm;
    for (int i = threadIdx.x; i < nt; i += blockDim.x) {
        int r0 = i * bm;
        tiles[i] = make_int4(0, r0, T - r0 < bm ? T - r0 : bm, 0);
    }
    if (threadIdx.x == 0) *n = nt;
}

void cuda_linear_fp8(cuda_backend *c, void *y, int y_stride, const void *x, int x_stride, int T,
                     const be_weight *w) {
    if (c->err != DUET_OK || T <= 0) return;
    if (w->dtype != DT_F8_E4M3 || c->act != DT_BF16) {
        LOG_ERROR("cuda backend: the FP8 GEMM got a weight that is not FP8 or float32 activations");
        c->err = DUET_ERR_INTERNAL;
        return;
    }
    if (T <= FP8_GEMV_MAX_M) {
        if (T == 1)
            gemv_launch<1>(c, y, y_stride, x, x_stride, T, w);
        else if (T == 2)
            gemv_launch<2>(c, y, y_stride, x, x_stride, T, w);
        else if (T <= 4)
            gemv_launch<4>(c, y, y_stride, x, x_stride, T, w);
        else
            gemv_launch<8>(c, y, y_stride, x, x_stride, T, w);
        return;
    }
    gg_args a = {};
    a.n_problems = 1;
    gg_problem &p = a.p[0];
    p.w = (const void *const *)w->tab;
    p.s = (const float *const *)(w->tab + 1);
    p.s_split = w->split;
    p.a = x;
    p.lda = x_stride;
    p.c = y;
    p.ldc = y_stride;
    p.N = w->n_out;
    p.K = w->n_in;
    const bool tc = moe_gemm_mma_ok(c, &a);
    const int bm = moe_gemm_tile_rows(c, (double)T, tc);
    const int nt = (T + bm - 1) / bm;
    int4 *tiles = (int4 *)cuda_scratch(c, SCR_GEMM, (size_t)(nt + 1) * sizeof(int4));
    if (!tiles) return;
    int *count = (int *)(tiles + nt);
    fp8_tiles_kernel<<<1, 256, 0, c->stream>>>(tiles, count, T, bm);
    if (CUDA_LAUNCHED(c, "fp8_tiles_kernel") != DUET_OK) return;
    p.tiles = tiles;
    p.n_tiles = count;
    moe_gemm_run(c, &a, bm, tc, &nt);
}

/* ---- prefill: FP8 tensor cores through cuBLASLt's block-scaled mode ----
 * cuBLASLt computes column-major y^T [N, T] = A^T B with A = W as [K, N] column-major (the
 * weight's rows as they are, transposed by the op) and B = q(x) as [K, T] column-major (x's
 * rows as they are), W's scales per 128x128 block (A, BLK128x128_32F) and x's per token and 128
 * columns (B, VEC128_32F). The scale tensors' layouts, as tools/fp8-lt-probe read them back
 * from the GEMM on an H200 (cuBLASLt 13.1.0; kb = k / 128, nb = n / 128, KB = K / 128,
 * NB = ceil(N / 128)):
 *   W 2: [NB][roundup(KB, 4)]  the checkpoint's own order, rows padded to 16 bytes (measured)
 *   X 0: [KB][T]               token-contiguous (measured; T is a multiple of 4 here)
 * The other candidates stay selectable for the probe (DUET_FP8_LT_LAYOUT="W,X", read at every
 * call; a weight's scales are laid out again when it changes):
 *   W 0: [KB][NB]  W 1: [NB][KB]  W 3: [KB][roundup(NB, 4)]  X 1: [T][KB]
 *   X 2: [KB][roundup(T, 4)]
 * cuBLASLt takes no T that is not a multiple of 4 (no algorithm at T = 1 or 33): T rounded down
 * to a multiple of 4 runs first, then the last 4 rows again with their own scale tensor
 * [KB][4] (the rows they share with the first GEMM get the same values). */

enum { FP8_LT_W_LAYOUTS = 4, FP8_LT_X_LAYOUTS = 3 };
#define FP8_LT_DEFAULT_W 2
#define FP8_LT_DEFAULT_X 0

static int round4(int v) {
    return (v + 3) / 4 * 4;
}

/* DUET_FP8_LT_LAYOUT as w * 16 + x; -1 (logged once) when it is not "W,X" in range */
static int fp8_lt_layout(void) {
    const char *e = getenv("DUET_FP8_LT_LAYOUT");
    if (!e || !*e) return FP8_LT_DEFAULT_W * 16 + FP8_LT_DEFAULT_X;
    int wl = -1, xl = -1;
    char tail = 0;
    if (sscanf(e, "%d,%d%c", &wl, &xl, &tail) != 2 || wl < 0 || wl >= FP8_LT_W_LAYOUTS || xl < 0 ||
        xl >= FP8_LT_X_LAYOUTS) {
        static bool told;
        if (!told)
            LOG_ERROR("DUET_FP8_LT_LAYOUT=%s: expected \"W,X\" with W in 0..%d and X in 0..%d "
                      "(docs/kernels/fp8.md)",
                      e, FP8_LT_W_LAYOUTS - 1, FP8_LT_X_LAYOUTS - 1);
        told = true;
        return -1;
    }
    return wl * 16 + xl;
}

/* x's scale for (t, kb) of a T-row GEMM in layout xl */
__device__ __forceinline__ long long fp8_xs_index(int xl, int t, int kb, int T, int kbn) {
    return xl == 1 ? (long long)t * kbn + kb : (long long)kb * (xl == 2 ? (T + 3) / 4 * 4 : T) + t;
}

/* One warp per (row, 128 columns): amax, scale = amax / 448 (1 for an all-zero block), e4m3 of
 * x / scale rounded to nearest (saturating). xq [T][K]; xs: the scales of rows [0, T4) in layout
 * xl for a T4-row GEMM; xs_tail (T4 < T): those of rows [T - 4, T) for a 4-row GEMM. */
__global__ void fp8_quant_1x128_kernel(uint8_t *xq, float *xs, float *xs_tail, const bf16 *x,
                                       int ldx, int T, int T4, int K, int xl) {
    const int lane = threadIdx.x & 31;
    const long long wid = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int kbn = K / 128;
    if (wid >= (long long)T * kbn) return;
    const int t = (int)(wid / kbn), kb = (int)(wid % kbn);
    const bf16 *src = x + (long long)t * ldx + kb * 128 + lane * 4;
    float v[4], a = 0.0f;
    for (int j = 0; j < 4; j++) {
        v[j] = __bfloat162float(src[j]);
        a = fmaxf(a, fabsf(v[j]));
    }
    a = warp_max(a);
    const float sc = a > 0.0f ? a / 448.0f : 1.0f;
    uint8_t *dst = xq + (long long)t * K + kb * 128 + lane * 4;
    for (int j = 0; j < 4; j++)
        dst[j] = (uint8_t)__nv_cvt_float_to_fp8(v[j] / sc, __NV_SATFINITE, __NV_E4M3);
    if (lane == 0) {
        if (t < T4) xs[fp8_xs_index(xl, t, kb, T4, kbn)] = sc;
        if (T4 < T && t >= T - 4) xs_tail[fp8_xs_index(xl, t - (T - 4), kb, 4, kbn)] = sc;
    }
}

#define LT_CHECK(c, call) cublas_status((c), (call), #call, __FILE__, __LINE__)

/* src [rb][cb] (the weight's scales, one block grid) into dst in layout wl (above); padding
 * stays as the caller cleared it */
__global__ void fp8_scales_lt_kernel(float *dst, const float *src, int rb, int cb, int wl) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rb * cb) return;
    const int r = i / cb, k = i % cb;
    int o;
    switch (wl) {
    case 0:
        o = k * rb + r;
        break;
    case 1:
        o = r * cb + k;
        break;
    case 2:
        o = r * ((cb + 3) / 4 * 4) + k;
        break;
    default:
        o = k * ((rb + 3) / 4 * 4) + r;
        break;
    }
    dst[o] = src[i];
}

/* A shape's matmul descriptor, layouts and the heuristic's algorithm, made once and kept (the
 * per-expert calls of a prefill step repeat shapes; making them costs more than a small expert's
 * GEMM). The scale pointers are set on the descriptor at each call. Engine thread only. */
struct lt_plan {
    const cuda_backend *c;
    int N, K, T, ldy;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t la, lb, ld;
    cublasLtMatmulAlgo_t algo;
};

static void lt_plan_drop(lt_plan *p) {
    if (p->la) cublasLtMatrixLayoutDestroy(p->la);
    if (p->lb) cublasLtMatrixLayoutDestroy(p->lb);
    if (p->ld) cublasLtMatrixLayoutDestroy(p->ld);
    if (p->op) cublasLtMatmulDescDestroy(p->op);
    *p = lt_plan{};
}

/* the plan of this shape, made if new (with this call's scale pointers set: the heuristic
 * finds no algorithm for block-scaled modes without them); NULL: cuBLASLt has no algorithm */
static lt_plan *lt_plan_get(cuda_backend *c, int N, int K, int T, int y_stride, const void *sa,
                            const void *sb) {
    enum { PLANS = 256 };
    static lt_plan plans[PLANS];
    static unsigned n_plans;
    for (unsigned i = 0; i < n_plans && i < PLANS; i++)
        if (plans[i].c == c && plans[i].N == N && plans[i].K == K && plans[i].T == T &&
            plans[i].ldy == y_stride)
            return &plans[i];
    lt_plan p = {c, N, K, T, y_stride, NULL, NULL, NULL, NULL, {}};
    cublasLtMatmulPreference_t pref = NULL;
    cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    int32_t ma = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
    int32_t mb = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    cublasLtMatmulHeuristicResult_t h;
    int found = 0;
    bool ok =
        cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta) == 0 &&
        cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb) == 0 &&
        cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &ma, sizeof ma) ==
            0 &&
        cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mb, sizeof mb) ==
            0 &&
        cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sa,
                                       sizeof sa) == 0 &&
        cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sb,
                                       sizeof sb) == 0 &&
        cublasLtMatrixLayoutCreate(&p.la, CUDA_R_8F_E4M3, K, N, K) == 0 &&
        cublasLtMatrixLayoutCreate(&p.lb, CUDA_R_8F_E4M3, K, T, K) == 0 &&
        cublasLtMatrixLayoutCreate(&p.ld, CUDA_R_16BF, N, T, y_stride) == 0 &&
        cublasLtMatmulPreferenceCreate(&pref) == 0 &&
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                             &c->blas_ws_bytes, sizeof c->blas_ws_bytes) == 0 &&
        cublasLtMatmulAlgoGetHeuristic(c->lt, p.op, p.la, p.lb, p.ld, p.ld, pref, 1, &h, &found) ==
            CUBLAS_STATUS_SUCCESS &&
        found > 0;
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (!ok) {
        lt_plan_drop(&p);
        return NULL;
    }
    p.algo = h.algo;
    lt_plan *slot = &plans[n_plans++ % PLANS];
    lt_plan_drop(slot);
    *slot = p;
    return slot;
}

/* y [T][N] (y_stride) = xq [T][K] (e4m3, scales xs) . W^T through cuBLASLt; T a multiple of 4.
 * DUET_ERR_UNSUPPORTED: no algorithm for it here. */
static duet_status fp8_lt_matmul(cuda_backend *c, void *y, int y_stride, const uint8_t *xq,
                                 const float *xs, int T, const be_weight *w) {
    const void *sa = w->scale_lt, *sb = xs;
    lt_plan *p = lt_plan_get(c, w->n_out, w->n_in, T, y_stride, sa, sb);
    if (!p) return DUET_ERR_UNSUPPORTED; /* this library or device has no such GEMM */
    if (cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sa,
                                       sizeof sa) != 0 ||
        cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sb,
                                       sizeof sb) != 0)
        return DUET_ERR_UNSUPPORTED;
    const float one = 1.0f, zero = 0.0f;
    return LT_CHECK(c, cublasLtMatmul(c->lt, p->op, &one, w->w, p->la, xq, p->lb, &zero, y, p->ld,
                                      y, p->ld, &p->algo, c->blas_ws, c->blas_ws_bytes, c->stream));
}

duet_status be_cuda_fp8_gemm_lt(be_backend *be, void *y, int y_stride, const void *x, int x_stride,
                                int T, const be_weight *w) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return c->err;
    if (T <= 0) return DUET_OK;
    const int N = w->n_out, K = w->n_in;
    if (w->dtype != DT_F8_E4M3 || c->act != DT_BF16 || K % 128 || N % 16 || y_stride % 8 ||
        (w->split % 128 && w->split != N) || T < 4)
        return DUET_ERR_UNSUPPORTED; /* (two block grids are not one 128x128 grid) */
    const int layout = fp8_lt_layout();
    if (layout < 0) return DUET_ERR_INVALID;
    const int wl = layout / 16, xl = layout % 16;
    duet_status st = DUET_OK;
    const int rb = (N + 127) / 128, cb = K / 128;
    if (!w->scale_lt || w->scale_lt_layout != wl) {
        /* the scales in the layout cuBLASLt reads, made at first use (room for every layout,
         * padding zero): the opt-in path's own copy, which the memory plan does not count */
        be_weight *mw = (be_weight *)w;
        const size_t sbytes = (size_t)round4(rb) * round4(cb) * sizeof(float);
        if (!w->scale_lt) {
            st = CUDA_CHECK(c, cudaMalloc((void **)&mw->scale_lt, sbytes));
            if (st != DUET_OK) return st;
        }
        st = CUDA_CHECK(c, cudaMemsetAsync(mw->scale_lt, 0, sbytes, c->stream));
        if (st != DUET_OK) return st;
        fp8_scales_lt_kernel<<<(rb * cb + 255) / 256, 256, 0, c->stream>>>(mw->scale_lt, w->scale,
                                                                           rb, cb, wl);
        st = CUDA_LAUNCHED(c, "fp8_scales_lt_kernel");
        if (st != DUET_OK) return st;
        mw->scale_lt_layout = wl;
    }
    /* scratch: xq [T][K] | xs [KB][round4(T)] | xs_tail [KB][4] */
    const int T4 = T / 4 * 4;
    const size_t qbytes = ((size_t)T * K + 255) / 256 * 256;
    const size_t xsbytes = (size_t)round4(T) * cb * sizeof(float);
    const size_t tbytes = (size_t)4 * cb * sizeof(float);
    uint8_t *xq = (uint8_t *)cuda_scratch(c, SCR_GEMM, qbytes + xsbytes + tbytes);
    if (!xq) return c->err != DUET_OK ? c->err : DUET_ERR_NO_MEMORY;
    float *xs = (float *)(xq + qbytes), *xs_tail = (float *)(xq + qbytes + xsbytes);
    if (xl == 2) { /* the padding rows read as zero, never as a stale scale */
        st = CUDA_CHECK(c, cudaMemsetAsync(xs, 0, xsbytes, c->stream));
        if (st != DUET_OK) return st;
    }
    long long warps = (long long)T * cb;
    fp8_quant_1x128_kernel<<<(unsigned)((warps * 32 + 255) / 256), 256, 0, c->stream>>>(
        xq, xs, xs_tail, (const bf16 *)x, x_stride, T, T4, K, xl);
    st = CUDA_LAUNCHED(c, "fp8_quant_1x128_kernel");
    if (st == DUET_OK && !c->lt) st = LT_CHECK(c, cublasLtCreate(&c->lt));
    if (st == DUET_OK) st = fp8_lt_matmul(c, y, y_stride, xq, xs, T4, w);
    if (st == DUET_OK && T4 < T)
        st = fp8_lt_matmul(c, (bf16 *)y + (size_t)(T - 4) * y_stride, y_stride,
                           xq + (size_t)(T - 4) * K, xs_tail, 4, w);
    return st;
}

/* ---- prefill experts through cuBLASLt (DUET_FP8_MOE_LT_ROWS) ----
 * The grouped kernel (moe_gemm.cu) dequantizes FP8 tiles to bf16 for mma.sync (~214 TFLOP/s at
 * 4,096 tokens on a V3 EP rank); in an eager prefill step the host may read the routing back,
 * so each expert's rows can go through be_cuda_fp8_gemm_lt instead: the rows gathered expert
 * by expert, each expert's block padded to a multiple of 4 rows (cuBLASLt's granularity; pad
 * rows are zero and never read back), gate_up, SiLU x up, down, and the outputs put back where
 * the grouped kernel would have written them, so moe.cu's combine is unchanged. */

static long long g_moe_lt_runs; /* calls that took the path (be_cuda_fp8_moe_lt_runs) */

static int fp8_moe_lt_rows(void) {
    const char *e = getenv("DUET_FP8_MOE_LT_ROWS");
    if (!e || !*e) return 0;
    char *end = NULL;
    long v = strtol(e, &end, 10);
    if (*end || v < 0 || v > (1L << 30)) {
        static bool told;
        if (!told) LOG_WARN("DUET_FP8_MOE_LT_ROWS=%s is not a row count: experts stay grouped", e);
        told = true;
        return 0;
    }
    return (int)v;
}

bool cuda_moe_fp8_lt_wanted(const cuda_backend *c, int n, int D, int I, int Is) {
    const int rows = fp8_moe_lt_rows();
    return rows > 0 && n >= rows && c->act == DT_BF16 && !c->capturing && D % 128 == 0 &&
           I % 128 == 0 && Is % 128 == 0;
}

/* xg [P][D]: row p = x's row of slot src_of[p] (zero where src_of[p] < 0) */
__global__ void fp8_lt_gather_kernel(bf16 *xg, const bf16 *x, int ldx, const int32_t *slot_row,
                                     const int32_t *src_of, int P, int D) {
    for (int p = blockIdx.x; p < P; p += gridDim.x) {
        const int s = src_of[p];
        bf16 *dst = xg + (long long)p * D;
        const bf16 *src = s < 0 ? NULL : x + (long long)slot_row[s] * ldx;
        for (int d = threadIdx.x; d < D; d += blockDim.x)
            dst[d] = src ? src[d] : __float2bfloat16_rn(0.0f);
    }
}

/* act [rows][I] = silu(h[:, :I]) * h[:, I:] (h [rows][2I]) */
__global__ void fp8_lt_silu_kernel(bf16 *act, const bf16 *h, long long rows, int I) {
    const long long n = rows * I;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / I, j = i - r * I;
        const float g = __bfloat162float(h[r * 2 * I + j]),
                    u = __bfloat162float(h[r * 2 * I + I + j]);
        act[i] = __float2bfloat16_rn(g / (1.0f + __expf(-g)) * u);
    }
}

/* y [slot] = yp [p] for every p with src_of[p] = slot >= 0 */
__global__ void fp8_lt_scatter_kernel(bf16 *y, const bf16 *yp, const int32_t *src_of, int P,
                                      int D) {
    for (int p = blockIdx.x; p < P; p += gridDim.x) {
        const int s = src_of[p];
        if (s < 0) continue;
        for (int d = threadIdx.x; d < D; d += blockDim.x)
            y[(long long)s * D + d] = yp[(long long)p * D + d];
    }
}

static unsigned fp8_lt_grid(long long n, int per) {
    long long b = (n + per - 1) / per;
    return (unsigned)(b < 1 ? 1 : b > 65535 ? 65535 : b);
}

duet_status cuda_moe_fp8_lt_run(cuda_backend *c, const be_moe_rows *rows, const be_ffn *experts,
                                int e0, int n_local, const be_ffn *shared, const int32_t *slot_row,
                                void *y, void *y_s) {
    be_backend *be = &c->base;
    const int n = rows->n, D = rows->D, K = rows->K, I = experts[0].n_inter;
    const int Is = shared ? shared->n_inter : 0, ms = rows->meta_stride;
    const long long pairs = (long long)n * K, cap = pairs + 3LL * n_local;
    if (cap > (1LL << 30)) return DUET_ERR_UNSUPPORTED;
    /* host: ids [n][ms] | count [n_local] | src_of [cap] */
    int32_t *hid = (int32_t *)cuda_host_tmp(c, ((size_t)n * ms + (size_t)n_local + (size_t)cap) *
                                                   sizeof(int32_t));
    if (!hid) return c->err;
    int32_t *cnt = hid + (size_t)n * ms, *src_of = cnt + n_local;
    duet_status st = CUDA_CHECK(c, cudaMemcpyAsync(hid, rows->ids, (size_t)n * ms * sizeof(int32_t),
                                                   cudaMemcpyDeviceToHost, c->stream));
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaStreamSynchronize(c->stream));
    if (st != DUET_OK) return st;
    for (int e = 0; e < n_local; e++) cnt[e] = 0;
    for (int r = 0; r < n; r++)
        for (int k = 0; k < K; k++) {
            int e = hid[(size_t)r * ms + k] - e0;
            if ((unsigned)e < (unsigned)n_local) cnt[e]++;
        }
    /* slots of expert e start at the prefix sum of the counts (moe_sort_kernel's order); its
     * padded block at the prefix sum of the counts rounded up to 4 */
    int P = 0;
    for (int e = 0, off = 0; e < n_local; off += cnt[e], e++) {
        for (int j = 0; j < round4(cnt[e]); j++) src_of[P + j] = j < cnt[e] ? off + j : -1;
        P += round4(cnt[e]);
    }
    const size_t b_x = (size_t)P * D, b_h = (size_t)(P > n ? P : n) * 2 * (I > Is ? I : Is);
    const size_t b_a = (size_t)(P > n ? P : n) * (I > Is ? I : Is), b_y = (size_t)P * D;
    /* scratch: xg [P][D] | h [rows][2I] | act [rows][I] | yp [P][D] | src_of [P] (its own
     * copy: SCR_IDX may hold what the caller's ids came in) */
    const size_t b_all = (b_x + b_h + b_a + b_y) * sizeof(bf16);
    bf16 *xg = (bf16 *)cuda_scratch(c, SCR_FP8LT, b_all + (size_t)P * sizeof(int32_t) + 16);
    if (!xg) return c->err != DUET_OK ? c->err : DUET_ERR_NO_MEMORY;
    bf16 *h = xg + b_x, *act = h + b_h, *yp = act + b_a;
    int32_t *d_src = (int32_t *)((char *)xg + (b_all + 15) / 16 * 16);
    if (shared) { /* every row, in row order, straight from x */
        st = be_cuda_fp8_gemm_lt(be, h, 2 * Is, rows->x, rows->x_stride, n, shared->gate_up);
        if (st != DUET_OK) return st;
        fp8_lt_silu_kernel<<<fp8_lt_grid((long long)n * Is, 256), 256, 0, c->stream>>>(act, h, n,
                                                                                       Is);
        st = CUDA_LAUNCHED(c, "fp8_lt_silu_kernel");
        if (st == DUET_OK) st = be_cuda_fp8_gemm_lt(be, y_s, D, act, Is, n, shared->down);
        if (st != DUET_OK) return st;
    }
    if (P == 0) return DUET_OK;
    st = CUDA_CHECK(c, cudaMemcpyAsync(d_src, src_of, (size_t)P * sizeof(int32_t),
                                       cudaMemcpyHostToDevice, c->stream));
    if (st != DUET_OK) return st;
    fp8_lt_gather_kernel<<<fp8_lt_grid(P, 1), 256, 0, c->stream>>>(
        xg, (const bf16 *)rows->x, rows->x_stride, slot_row, d_src, P, D);
    st = CUDA_LAUNCHED(c, "fp8_lt_gather_kernel");
    for (int e = 0, p = 0; st == DUET_OK && e < n_local; p += round4(cnt[e]), e++)
        if (cnt[e])
            st = be_cuda_fp8_gemm_lt(be, h + (size_t)p * 2 * I, 2 * I, xg + (size_t)p * D, D,
                                     round4(cnt[e]), experts[e].gate_up);
    if (st != DUET_OK) return st;
    fp8_lt_silu_kernel<<<fp8_lt_grid((long long)P * I, 256), 256, 0, c->stream>>>(act, h, P, I);
    st = CUDA_LAUNCHED(c, "fp8_lt_silu_kernel");
    for (int e = 0, p = 0; st == DUET_OK && e < n_local; p += round4(cnt[e]), e++)
        if (cnt[e])
            st = be_cuda_fp8_gemm_lt(be, yp + (size_t)p * D, D, act + (size_t)p * I, I,
                                     round4(cnt[e]), experts[e].down);
    if (st != DUET_OK) return st;
    fp8_lt_scatter_kernel<<<fp8_lt_grid(P, 1), 256, 0, c->stream>>>((bf16 *)y, yp, d_src, P, D);
    st = CUDA_LAUNCHED(c, "fp8_lt_scatter_kernel");
    if (st == DUET_OK) g_moe_lt_runs++;
    return st;
}

long long be_cuda_fp8_moe_lt_runs(void) {
    return g_moe_lt_runs;
}
