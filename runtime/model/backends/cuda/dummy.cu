/* Dummy weights (--load-format dummy) made on the device: be_ops.weight_create_dummy and
 * vec_create_dummy compute the rule of model/dummy_rule.h in a kernel that writes straight
 * into the weight's memory, so nothing is filled on the host or copied. The weights are the
 * ones weight_create / weight_create_fp8 (fp8.cu) make of the host rule's values, bit for bit
 * (tests/gpu/test_dummy_weights.c); which tensors to make is the loader's (weights.c). */
#include "model/backends/cuda/cuda-impl.cuh"

enum { DUMMY_OUT_F32 = 0, DUMMY_OUT_BF16 = 1, DUMMY_OUT_E4M3 = 2 };

/* dst [n_parts * n_rows, n_in] (row-major, out's type): row r is row r % n_rows of part
 * r / n_rows (s0 or s1). One block per row, its threads across the columns. inv: the FP8
 * values' multiplier (dummy_fp8_inv, computed on the host and passed as is). */
template <int OUT>
__global__ void dummy_fill_kernel(void *dst, dummy_slice s0, dummy_slice s1, int n_rows, int n_in,
                                  float inv) {
    long long r = blockIdx.x;
    const bool second = r >= n_rows;
    const dummy_slice s = second ? s1 : s0;
    const int i = (int)(second ? r - n_rows : r);
    size_t o = (size_t)r * (size_t)n_in;
    for (int j = threadIdx.x; j < n_in; j += blockDim.x) {
        float v = dummy_at(&s, i, j);
        if (OUT == DUMMY_OUT_F32)
            ((float *)dst)[o + j] = v;
        else if (OUT == DUMMY_OUT_BF16)
            ((uint16_t *)dst)[o + j] = dummy_bf16(v);
        else
            ((uint8_t *)dst)[o + j] = dummy_e4m3(__fmul_rn(v, inv));
    }
}

/* v[n] float32 = rows [0, n) of a dummy vector */
__global__ void dummy_vec_kernel(float *v, dummy_slice s, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) v[i] = dummy_at(&s, i, 0);
}

__global__ void dummy_const_kernel(float *dst, float v, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = v;
}

/* an FP8 weight's one-group table {w, scale} (a kernel, not a copy from the host stack: a copy
 * from pageable memory would wait for the stream) */
__global__ void dummy_tab_kernel(void **tab, void *w, float *scale) {
    tab[0] = w;
    tab[1] = scale;
}

static duet_status fill(cuda_backend *c, void *dst, int out, const dummy_slice *parts, int n_parts,
                        int n_rows, int n_in) {
    int rows = n_parts * n_rows;
    if (rows == 0 || n_in == 0) return DUET_OK;
    const dummy_slice &s1 = parts[n_parts > 1 ? 1 : 0];
    const int threads = n_in >= 256 ? 256 : (n_in + 31) / 32 * 32;
    const float inv = dummy_fp8_inv();
    if (out == DUMMY_OUT_F32)
        dummy_fill_kernel<DUMMY_OUT_F32>
            <<<rows, threads, 0, c->stream>>>(dst, parts[0], s1, n_rows, n_in, inv);
    else if (out == DUMMY_OUT_BF16)
        dummy_fill_kernel<DUMMY_OUT_BF16>
            <<<rows, threads, 0, c->stream>>>(dst, parts[0], s1, n_rows, n_in, inv);
    else
        dummy_fill_kernel<DUMMY_OUT_E4M3>
            <<<rows, threads, 0, c->stream>>>(dst, parts[0], s1, n_rows, n_in, inv);
    return CUDA_LAUNCHED(c, "dummy_fill_kernel");
}

/* The FP8 weight weight_create_fp8 (fp8.cu) makes, with its fields set the same way: codes
 * [n_out, n_in], scales of the two parts' block grids, the one-group table {w, scale}. */
static duet_status create_fp8(cuda_backend *c, const dummy_slice *parts, int n_parts, int n_rows,
                              int n_in, be_weight **w_p) {
    /* float32 activations (the reference path) keep dequantized float32 weights */
    if (c->act != DT_BF16) return DUET_ERR_UNSUPPORTED;
    int n_out = n_parts * n_rows;
    if (n_rows <= 0 || n_in <= 0 || n_in % 16) {
        LOG_ERROR("cuda backend: a dummy FP8 weight [%d, %d] split at row %d (n_in must be a "
                  "multiple of 16)",
                  n_out, n_in, n_rows);
        return DUET_ERR_INVALID;
    }
    size_t bytes = (size_t)n_out * (size_t)n_in;
    size_t cb = (size_t)(n_in + 127) / 128, rb = (size_t)n_parts * (size_t)((n_rows + 127) / 128);
    be_weight *bw = (be_weight *)calloc(1, sizeof *bw);
    if (!bw) return DUET_ERR_NO_MEMORY;
    duet_status st = CUDA_CHECK(c, cudaMalloc(&bw->w, bytes));
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaMalloc((void **)&bw->scale, rb * cb * sizeof(float)));
    if (st == DUET_OK) st = CUDA_CHECK(c, cudaMalloc((void **)&bw->tab, 2 * sizeof(void *)));
    if (st == DUET_OK) st = fill(c, bw->w, DUMMY_OUT_E4M3, parts, n_parts, n_rows, n_in);
    if (st == DUET_OK) {
        int ns = (int)(rb * cb);
        dummy_const_kernel<<<(ns + 255) / 256, 256, 0, c->stream>>>(bw->scale, dummy_fp8_scale(),
                                                                    ns);
        st = CUDA_LAUNCHED(c, "dummy_const_kernel");
    }
    if (st == DUET_OK) {
        dummy_tab_kernel<<<1, 1, 0, c->stream>>>(bw->tab, bw->w, bw->scale);
        st = CUDA_LAUNCHED(c, "dummy_tab_kernel");
    }
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
    bw->split = n_rows;
    *w_p = bw;
    return DUET_OK;
}

duet_status cuda_weight_create_dummy(be_backend *be, const dummy_slice *parts, int n_parts,
                                     int n_rows, int n_in, bool keep_f32, bool fp8,
                                     be_weight **w_p) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return c->err;
    if (!parts || n_parts < 1 || n_parts > 2 || n_rows < 0 || n_in < 0 ||
        (long long)n_parts * n_rows > 0x7fffffffLL) {
        LOG_ERROR("cuda backend: a dummy weight of %d parts of [%d, %d] (1 or 2 parts, sizes "
                  "not negative)",
                  n_parts, n_rows, n_in);
        return DUET_ERR_INVALID;
    }
    if (fp8) return create_fp8(c, parts, n_parts, n_rows, n_in, w_p);
    dt_dtype t = keep_f32 ? DT_F32 : c->act;
    size_t bytes = (size_t)n_parts * (size_t)n_rows * (size_t)n_in * dt_size(t);
    be_weight *bw = (be_weight *)calloc(1, sizeof *bw);
    if (!bw) return DUET_ERR_NO_MEMORY;
    duet_status st = CUDA_CHECK(c, cudaMalloc(&bw->w, bytes ? bytes : 1));
    if (st == DUET_OK)
        st = fill(c, bw->w, t == DT_BF16 ? DUMMY_OUT_BF16 : DUMMY_OUT_F32, parts, n_parts, n_rows,
                  n_in);
    if (st != DUET_OK) {
        cudaFree(bw->w);
        free(bw);
        return st;
    }
    bw->n_out = n_parts * n_rows;
    bw->n_in = n_in;
    bw->dtype = t;
    *w_p = bw;
    return DUET_OK;
}

duet_status cuda_vec_create_dummy(be_backend *be, const dummy_slice *s, int n, void **dev_p) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK) return c->err;
    if (!s || n < 0) return DUET_ERR_INVALID;
    float *d = NULL;
    duet_status st = CUDA_CHECK(c, cudaMalloc(&d, (size_t)(n > 0 ? n : 1) * sizeof(float)));
    if (st == DUET_OK && n > 0) {
        dummy_vec_kernel<<<(n + 255) / 256, 256, 0, c->stream>>>(d, *s, n);
        st = CUDA_LAUNCHED(c, "dummy_vec_kernel");
    }
    if (st != DUET_OK) {
        cudaFree(d);
        return st;
    }
    *dev_p = d;
    return DUET_OK;
}
