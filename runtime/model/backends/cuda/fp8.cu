/* FP8 e4m3 weights with 128x128 block scales kept as they are on the device (DeepSeek-V3's
 * checkpoint format), and the linear layer over them: the grouped GEMM of moe_gemm.cu with one
 * group, whose tiles read e4m3 bytes and dequantize them in shared memory. Activations stay
 * bf16 (no activation quantization): the CPU reference with bf16 emulation computes the same
 * products. What the loader hands over is weights.c's; the GEMM kernels are moe_gemm.cu's. */
#include "model/backends/cuda/moe-impl.cuh"

duet_status cuda_weight_create_fp8(be_backend *be, const uint8_t *q, const float *scales,
                                   int n_out, int n_in, int split, be_weight **w_p) {
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
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaMemcpy(bw->tab, tab, sizeof tab, cudaMemcpyHostToDevice));
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
