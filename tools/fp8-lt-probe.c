/* Which scale layouts cuBLASLt's block-scaled FP8 GEMM reads on this device and library, asked
 * two ways (docs/kernels/fp8.md):
 *  1. decode: the GEMM itself (A = W [N, K] transposed, BLK128x128_32F; B = x [T, K],
 *     VEC128_32F; bf16 out), with both operands 1.0 in one 128-column block and 0 elsewhere and
 *     a scale buffer whose every entry encodes its own index, so the output tells which entry
 *     the GEMM read for each (n block, k block) and (token, k block); printed against the
 *     candidate index formulas.
 *  2. the op: be_cuda_fp8_gemm_lt (the backend's own path: quantization kernel, scale copies,
 *     descriptor) under every DUET_FP8_LT_LAYOUT pair, against a host float64 reference of the
 *     same dequantized operands, on shapes with T, N, K multiples of 128 and not.
 * Prints "layout W,X agrees on every shape" for the pairs that pass (a shape cuBLASLt refuses,
 * T < 4, counts as agreeing). Exit 77 without a device.
 *   fp8-lt-probe [--quick] */
#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/dtype.h"
#include "model/backend.h"
#include "model/backends/cuda/backend_cuda.h"
#define XS_SEED 0x2545f4914f6cdd1dull
#include "cubench.h"
#include "xorshift.h"

enum { CODES = 64, SBUF = 8192 }; /* entry i holds (i % 64 + 1) or (i / 64 + 1) */

static int r4(int v) {
    return (v + 3) / 4 * 4;
}

/* y [T][N] bf16 = x [T][K] . W [N][K]^T through cuBLASLt, block-scaled; false: refused */
static bool lt_gemm(cublasLtHandle_t lt, cudaStream_t s, int T, int N, int K, const void *w,
                    const void *x, const float *sw, const float *sx, void *y, void *ws,
                    size_t ws_bytes) {
    cublasLtMatmulDesc_t op = NULL;
    cublasLtMatrixLayout_t la = NULL, lb = NULL, ld = NULL;
    cublasLtMatmulPreference_t pref = NULL;
    cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    int32_t ma = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
    int32_t mb = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    cublasLtMatmulHeuristicResult_t h;
    int found = 0;
    bool ok =
        cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F) == 0 &&
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta) == 0 &&
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb) == 0 &&
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &ma, sizeof ma) ==
            0 &&
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mb, sizeof mb) ==
            0 &&
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sw, sizeof sw) ==
            0 &&
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sx, sizeof sx) ==
            0 &&
        cublasLtMatrixLayoutCreate(&la, CUDA_R_8F_E4M3, K, N, K) == 0 &&
        cublasLtMatrixLayoutCreate(&lb, CUDA_R_8F_E4M3, K, T, K) == 0 &&
        cublasLtMatrixLayoutCreate(&ld, CUDA_R_16BF, N, T, N) == 0 &&
        cublasLtMatmulPreferenceCreate(&pref) == 0 &&
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                             &ws_bytes, sizeof ws_bytes) == 0 &&
        cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, ld, ld, pref, 1, &h, &found) == 0 &&
        found > 0;
    const float one = 1.0f, zero = 0.0f;
    ok = ok && cublasLtMatmul(lt, op, &one, w, la, x, lb, &zero, y, ld, y, ld, &h.algo, ws,
                              ws_bytes, s) == 0;
    ok = ok && cudaStreamSynchronize(s) == cudaSuccess;
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (ld) cublasLtMatrixLayoutDestroy(ld);
    if (op) cublasLtMatmulDescDestroy(op);
    (void)cudaGetLastError();
    return ok;
}

static float bf16_at(const uint16_t *d, size_t i) {
    uint32_t u = (uint32_t)d[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* candidate index formulas: W (nb, kb), X (t, kb) */
static int w_index(int f, int nb, int kb, int NB, int KB) {
    switch (f) {
    case 0:
        return kb * NB + nb;
    case 1:
        return nb * KB + kb;
    case 2:
        return nb * r4(KB) + kb;
    default:
        return kb * r4(NB) + nb;
    }
}
static const char *w_name[4] = {"W0 [KB][NB]", "W1 [NB][KB]", "W2 [NB][r4(KB)]", "W3 [KB][r4(NB)]"};
static int x_index(int f, int t, int kb, int T, int KB) {
    switch (f) {
    case 0:
        return kb * T + t;
    case 1:
        return t * KB + kb;
    default:
        return kb * r4(T) + t;
    }
}
static const char *x_name[3] = {"X0 [KB][T]", "X1 [T][KB]", "X2 [KB][r4(T)]"};

/* Part 1 on one shape: which scale entry the GEMM reads for each block */
static void decode_shape(cublasLtHandle_t lt, cudaStream_t s, int T, int N, int K) {
    const int NB = (N + 127) / 128, KB = K / 128;
    printf("decode T %d, N %d, K %d (NB %d, KB %d):", T, N, K, NB, KB);
    if (T * KB > SBUF || NB * KB > SBUF) {
        printf(" too big for the scale buffers\n");
        return;
    }
    uint8_t *hw = malloc((size_t)N * K), *hx = malloc((size_t)T * K);
    float *code[2], *ones = malloc(SBUF * sizeof(float));
    for (int h = 0; h < 2; h++) {
        code[h] = malloc(SBUF * sizeof(float));
        for (int i = 0; i < SBUF; i++) code[h][i] = (float)(h ? i / CODES + 1 : i % CODES + 1);
    }
    for (int i = 0; i < SBUF; i++) ones[i] = 1.0f;
    void *dw = NULL, *dx = NULL, *dy = NULL, *dsw = NULL, *dsx = NULL, *ws = NULL;
    size_t ws_bytes = (size_t)32 << 20;
    CU(cudaMalloc(&dw, (size_t)N * K));
    CU(cudaMalloc(&dx, (size_t)T * K));
    CU(cudaMalloc(&dy, (size_t)T * N * 2));
    CU(cudaMalloc(&dsw, SBUF * sizeof(float)));
    CU(cudaMalloc(&dsx, SBUF * sizeof(float)));
    CU(cudaMalloc(&ws, ws_bytes));
    uint16_t *y = malloc((size_t)T * N * 2);
    int *wi = malloc((size_t)NB * KB * sizeof(int)), *xi = malloc((size_t)T * KB * sizeof(int));
    bool ran = !g_failed;
    for (int kb = 0; kb < KB && ran; kb++) {
        for (int n = 0; n < N; n++)
            for (int k = 0; k < K; k++) hw[(size_t)n * K + k] = k / 128 == kb ? 0x38 : 0;
        for (int t = 0; t < T; t++)
            for (int k = 0; k < K; k++) hx[(size_t)t * K + k] = k / 128 == kb ? 0x38 : 0;
        CU(cudaMemcpy(dw, hw, (size_t)N * K, cudaMemcpyHostToDevice));
        CU(cudaMemcpy(dx, hx, (size_t)T * K, cudaMemcpyHostToDevice));
        for (int which = 0; which < 2 && ran; which++) /* 0: W's entries, 1: x's */
            for (int h = 0; h < 2 && ran; h++) {
                CU(cudaMemcpy(dsw, which == 0 ? code[h] : ones, SBUF * 4, cudaMemcpyHostToDevice));
                CU(cudaMemcpy(dsx, which == 1 ? code[h] : ones, SBUF * 4, cudaMemcpyHostToDevice));
                ran = lt_gemm(lt, s, T, N, K, dw, dx, dsw, dsx, dy, ws, ws_bytes);
                if (!ran) break;
                CU(cudaMemcpy(y, dy, (size_t)T * N * 2, cudaMemcpyDeviceToHost));
                /* y = 128 * entry: W's from row n's block, x's from token t */
                int rows = which == 0 ? NB : T;
                for (int r = 0; r < rows; r++) {
                    int t = which == 0 ? 0 : r, n = which == 0 ? r * 128 : 0;
                    float v = bf16_at(y, (size_t)t * N + n) / 128.0f;
                    int c = (int)lrintf(v);
                    int *dst = which == 0 ? &wi[r * KB + kb] : &xi[r * KB + kb];
                    if (!isfinite(v) || fabsf(v - (float)c) > 1e-3f || c < 1 || c > CODES)
                        c = -100000;
                    if (h == 0)
                        *dst = c - 1;
                    else
                        *dst += (c - 1) * CODES;
                }
            }
    }
    if (!ran) {
        printf(" cuBLASLt refused the shape (no algorithm)\n");
    } else {
        bool any = false;
        for (int f = 0; f < 4; f++) {
            bool m = true;
            for (int nb = 0; nb < NB && m; nb++)
                for (int kb = 0; kb < KB && m; kb++)
                    m = wi[nb * KB + kb] == w_index(f, nb, kb, NB, KB);
            if (m) printf(" %s", w_name[f]);
            any |= m;
        }
        if (!any) {
            printf(" W: no candidate; entries read for (nb, kb):");
            for (int nb = 0; nb < NB && nb < 3; nb++)
                for (int kb = 0; kb < KB && kb < 6; kb++)
                    printf(" (%d,%d)->%d", nb, kb, wi[nb * KB + kb]);
        }
        any = false;
        for (int f = 0; f < 3; f++) {
            bool m = true;
            for (int t = 0; t < T && m; t++)
                for (int kb = 0; kb < KB && m; kb++)
                    m = xi[t * KB + kb] == x_index(f, t, kb, T, KB);
            if (m) printf(" %s", x_name[f]);
            any |= m;
        }
        if (!any) {
            printf(" X: no candidate; entries read for (t, kb):");
            for (int t = 0; t < T && t < 3; t++)
                for (int kb = 0; kb < KB && kb < 4; kb++)
                    printf(" (%d,%d)->%d", t, kb, xi[t * KB + kb]);
        }
        printf("\n");
    }
    cudaFree(dw);
    cudaFree(dx);
    cudaFree(dy);
    cudaFree(dsw);
    cudaFree(dsx);
    cudaFree(ws);
    free(hw);
    free(hx);
    free(code[0]);
    free(code[1]);
    free(ones);
    free(y);
    free(wi);
    free(xi);
}

/* Part 2: the backend's op under every layout pair; rel L2 per shape and pair */
typedef struct op_case {
    int T, N, K;
    uint8_t *q;
    float *s, *x;
    double *ref;
} op_case;

static void op_case_make(op_case *c) {
    const int rb = (c->N + 127) / 128, cb = c->K / 128, N = c->N, K = c->K, T = c->T;
    c->q = malloc((size_t)N * K);
    c->s = malloc((size_t)rb * cb * sizeof(float));
    c->x = malloc((size_t)T * K * sizeof(float));
    c->ref = malloc((size_t)T * N * sizeof(double));
    for (size_t i = 0; i < (size_t)N * K; i++) {
        uint8_t v;
        do v = (uint8_t)(xs_next() >> 32);
        while ((v & 0x7f) == 0x7f);
        c->q[i] = v;
    }
    for (int i = 0; i < rb * cb; i++)
        c->s[i] = 0.01f * (0.5f + (float)(xs_next() % 1000) / 1000.0f);
    for (size_t i = 0; i < (size_t)T * K; i++)
        c->x[i] = dt_bf16_to_f32(dt_f32_to_bf16(xs_uniform(1.0f)));
    /* the reference: x quantized as the kernel does, W dequantized, float64 sums */
    float lut[256];
    for (int i = 0; i < 256; i++) lut[i] = dt_e4m3_to_f32((uint8_t)i);
    double *xq = malloc((size_t)K * sizeof(double));
    for (int t = 0; t < T; t++) {
        const float *xr = c->x + (size_t)t * K;
        for (int kb = 0; kb < cb; kb++) {
            float a = 0;
            for (int k = kb * 128; k < kb * 128 + 128; k++) a = fmaxf(a, fabsf(xr[k]));
            float sc = a > 0 ? a / 448.0f : 1.0f;
            for (int k = kb * 128; k < kb * 128 + 128; k++)
                xq[k] = (double)lut[dt_f32_to_e4m3(xr[k] / sc)] * sc;
        }
        for (int n = 0; n < N; n++) {
            const uint8_t *wr = c->q + (size_t)n * K;
            double acc = 0;
            for (int kb = 0; kb < cb; kb++) {
                double part = 0;
                for (int k = kb * 128; k < kb * 128 + 128; k++) part += xq[k] * lut[wr[k]];
                acc += part * c->s[(n / 128) * cb + kb];
            }
            c->ref[(size_t)t * N + n] = acc;
        }
    }
    free(xq);
}

static void op_case_free(op_case *c) {
    free(c->q);
    free(c->s);
    free(c->x);
    free(c->ref);
}

/* rel L2 of the op on this case under the current DUET_FP8_LT_LAYOUT; < 0: not run */
static double op_run(be_backend *be, const op_case *c, duet_status *st_p) {
    const be_ops *o = be->ops;
    be_weight *w = NULL;
    *st_p = o->weight_create_fp8(be, c->q, c->s, c->N, c->K, c->N, &w);
    if (*st_p != DUET_OK) return -1;
    void *x = o->buf_alloc(be, (size_t)c->T * c->K), *y = o->buf_alloc(be, (size_t)c->T * c->N);
    o->upload(be, x, 0, c->x, (size_t)c->T * c->K);
    *st_p = be_cuda_fp8_gemm_lt(be, y, c->N, x, c->K, c->T, w);
    double err = -1;
    if (*st_p == DUET_OK) {
        float *got = malloc((size_t)c->T * c->N * sizeof(float));
        *st_p = o->download(be, got, y, 0, (size_t)c->T * c->N);
        if (*st_p == DUET_OK) {
            double num = 0, den = 0;
            for (size_t i = 0; i < (size_t)c->T * c->N; i++) {
                double d = isfinite(got[i]) ? got[i] - c->ref[i] : 1e30;
                num += d * d;
                den += c->ref[i] * c->ref[i];
            }
            err = sqrt(num / den);
        }
        free(got);
    }
    o->buf_free(be, x);
    o->buf_free(be, y);
    o->weight_destroy(be, w);
    return err;
}

int main(int argc, char **argv) {
    bool quick = argc > 1 && strcmp(argv[1], "--quick") == 0;
    if (be_cuda_device_count() < 1) {
        fprintf(stderr, "no CUDA device: skipped\n");
        return 77;
    }
    be_backend *be = NULL;
    if (be_cuda_create(0, DT_BF16, &be) != DUET_OK) return 1;
    cudaStream_t s = (cudaStream_t)be_cuda_stream(be);
    int ver = (int)cublasLtGetVersion();
    printf("cuBLASLt %d\n", ver);

    /* 1. what the GEMM reads */
    cublasLtHandle_t lt = NULL;
    if (cublasLtCreate(&lt) != CUBLAS_STATUS_SUCCESS) return 1;
    static const int dshape[][3] = {{256, 256, 512}, {300, 256, 1024}, {64, 576, 2048},
                                    {32, 384, 512},  {48, 640, 640},   {16, 208, 768},
                                    {1, 128, 512},   {8, 256, 512},    {200, 1024, 1280}};
    for (size_t i = 0; i < sizeof dshape / sizeof *dshape && !g_failed; i++)
        decode_shape(lt, s, dshape[i][0], dshape[i][1], dshape[i][2]);
    cublasLtDestroy(lt);

    /* 2. the op under every layout pair */
    static const int oshape[][3] = {{256, 256, 512},   {300, 256, 1024}, {64, 576, 7168},
                                    {128, 384, 1536},  {100, 208, 640},  {33, 1536, 2048},
                                    {512, 2048, 7168}, {4099, 256, 512}};
    const int n_op = quick ? 3 : (int)(sizeof oshape / sizeof *oshape);
    op_case cases[sizeof oshape / sizeof *oshape];
    for (int i = 0; i < n_op; i++) {
        cases[i] = (op_case){oshape[i][0], oshape[i][1], oshape[i][2], NULL, NULL, NULL, NULL};
        op_case_make(&cases[i]);
    }
    printf("\nbe_cuda_fp8_gemm_lt, rel L2 against the host reference (tol 1e-2):\n%-8s", "W,X");
    for (int i = 0; i < n_op; i++) printf("  %4dx%4dx%4d", cases[i].T, cases[i].N, cases[i].K);
    printf("\n");
    int agree = 0;
    for (int wl = 0; wl < 4; wl++)
        for (int xl = 0; xl < 3; xl++) {
            char v[8];
            snprintf(v, sizeof v, "%d,%d", wl, xl);
            setenv("DUET_FP8_LT_LAYOUT", v, 1);
            printf("%-8s", v);
            bool all = true;
            for (int i = 0; i < n_op; i++) {
                duet_status st;
                double e = op_run(be, &cases[i], &st);
                if (e < 0)
                    printf("  %14s", duet_strerror(st));
                else
                    printf("  %14.3e", e);
                all &= (e >= 0 && e < 1e-2) || (e < 0 && cases[i].T < 4);
            }
            printf("\n");
            if (all) {
                printf("layout %s agrees on every shape\n", v);
                agree++;
            }
        }
    if (!agree) printf("no layout pair agrees on every shape\n");
    for (int i = 0; i < n_op; i++) op_case_free(&cases[i]);
    if (be->ops->sync(be) != DUET_OK) g_failed = 1;
    be_destroy(be);
    return g_failed ? 1 : 0;
}
