/* Linear layers through cuBLAS (FP8 weights through fp8.cu): y = x @ W^T with row-major x
 * [T, n_in] and W [n_out, n_in],
 * which column-major cuBLAS sees as y^T [n_out, T] = W [n_in, n_out]^T * x^T [n_in, T].
 * bf16 operands accumulate in float32 (CUBLAS_COMPUTE_32F); float32 operands stay float32. */
#include "model/backends/cuda/cuda-impl.cuh"

extern "C" {
#include "model/backends/cuda/backend_cuda.h"
}

/* y (ctype, ldc) [m, n] column-major = op(A) [m, k] * B [k, n] */
static void gemm_raw(cuda_backend *c, void *y, cudaDataType_t yt, int ldc, const void *w,
                     cudaDataType_t wt, int n_out, int k, const void *x, cudaDataType_t xt,
                     int x_stride, int T) {
    if (c->err != DUET_OK || T <= 0 || n_out <= 0) return;
    const float alpha = 1.0f, beta = 0.0f;
    CUBLAS_CHECK(c, cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, n_out, T, k, &alpha, w, wt, k,
                                 x, xt, x_stride, &beta, y, yt, ldc, CUBLAS_COMPUTE_32F,
                                 CUBLAS_GEMM_DEFAULT));
}

void cuda_gemm_act(cuda_backend *c, void *y, int y_stride, const void *x, int x_stride, int m,
                   const void *w, int n_out, int k) {
    cudaDataType_t t = cuda_type(c->act);
    gemm_raw(c, y, t, y_stride, w, t, n_out, k, x, t, x_stride, m);
}

void cuda_linear_f32out(cuda_backend *c, float *y32, const void *x, int x_stride, int T,
                        const be_weight *w) {
    if (c->err != DUET_OK || T <= 0) return;
    if (w->dtype == c->act) {
        /* operands of one type, a float32 result: cuBLAS takes this mix directly */
        gemm_raw(c, y32, CUDA_R_32F, w->n_out, w->w, cuda_type(w->dtype), w->n_out, w->n_in, x,
                 cuda_type(c->act), x_stride, T);
        return;
    }
    /* a float32 weight on a bf16 backend: x as float32 too, both operands must match */
    float *x32 = (float *)cuda_scratch(c, SCR_GEMM, (size_t)T * w->n_in * sizeof(float));
    if (!x32) return;
    cuda_act_to_f32_rows(c, x32, x, T, w->n_in, x_stride);
    gemm_raw(c, y32, CUDA_R_32F, w->n_out, w->w, CUDA_R_32F, w->n_out, w->n_in, x32, CUDA_R_32F,
             w->n_in, T);
}

void cuda_gemm_w(cuda_backend *c, void *y, int y_stride, const void *x, int x_stride, int m,
                 const be_weight *w) {
    if (w->dtype == DT_F8_E4M3)
        cuda_linear_fp8(c, y, y_stride, x, x_stride, m, w);
    else
        cuda_gemm_act(c, y, y_stride, x, x_stride, m, w->w, w->n_out, w->n_in);
}

void cuda_linear(be_backend *be, void *y, const void *x, int x_stride, int T, const be_weight *w) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK || T <= 0) return;
    if (w->dtype == DT_F8_E4M3) {
        /* opt-in FP8 tensor cores for prefill-sized T (backend.h, be_fp8_prefill_rows): not
         * inside a recorded step (its first call on a weight allocates) */
        int rows = be_fp8_prefill_rows();
        if (rows > 0 && T >= rows && !c->capturing &&
            be_fp8_prefill_eligible(w->n_out, w->n_in, w->split)) {
            duet_status st = be_cuda_fp8_gemm_lt(be, y, w->n_out, x, x_stride, T, w);
            if (st == DUET_OK || st != DUET_ERR_UNSUPPORTED) return; /* errors: c->err */
            static bool told;
            if (!told)
                LOG_WARN("cuda: cuBLASLt has no block-scaled FP8 GEMM for [%d, %d]: the FP8 "
                         "prefill GEMMs fall back to the bf16 tensor-core kernel",
                         w->n_out, w->n_in);
            told = true;
        }
        cuda_linear_fp8(c, y, w->n_out, x, x_stride, T, w);
        return;
    }
    if (w->dtype == c->act) {
        cuda_gemm_act(c, y, w->n_out, x, x_stride, T, w->w, w->n_out, w->n_in);
        return;
    }
    /* a float32 weight on a bf16 backend: compute in float32, then round the result */
    float *y32 = (float *)cuda_scratch(c, SCR_ROUTE, (size_t)T * w->n_out * sizeof(float));
    if (!y32) return;
    cuda_linear_f32out(c, y32, x, x_stride, T, w);
    cuda_f32_to_act(c, y, y32, (size_t)T * w->n_out);
}
