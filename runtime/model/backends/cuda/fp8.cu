/* FP8 e4m3 weights with 128x128 block scales kept as they are on the device (DeepSeek-V3's
 * checkpoint format), and the linear layer over them: up to 8 rows a one-pass kernel that
 * dequantizes in registers, more rows the grouped GEMM of moe_gemm.cu with one group, whose
 * tiles read e4m3 bytes and dequantize them in shared memory. Activations stay
 * bf16 (no activation quantization): the CPU reference with bf16 emulation computes the same
 * products. What the loader hands over is weights.c's; the GEMM kernels are moe_gemm.cu's. */
#include <cuda_fp8.h>

#include "model/backends/cuda/moe-impl.cuh"

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
