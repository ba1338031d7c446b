/* Microbenchmark of the FP8 weight GEMMs of the CUDA backend (bf16 activations): the linear
 * layer over FP8 weights (fp8.cu) at decode sizes (M = 1, 16, 64) on DeepSeek-V2-Lite and -V3
 * shapes, as GB/s of bytes read next to the device-copy bandwidth and to the same layer with
 * bf16 weights (cuBLAS); the grouped FP8 experts (moe_experts_dev) of one V3 EP rank; and at
 * prefill size (M = 4096) its TFLOP/s next to cuBLASLt's dense FP8 GEMM (per-tensor scales)
 * and, where the toolkit and device take it, cuBLASLt's block-scaled FP8 (1x128 activation,
 * 128x128 weight scales) on the same FLOPs (the layouts: tools/fp8-lt-probe); and the grouped
 * FP8 experts of a 4,096-token prefill, grouped kernel against per-expert cuBLASLt
 * (DUET_FP8_MOE_LT_ROWS) next to a dense FP8 GEMM of the same FLOPs, on one V3 EP rank of 8
 * (32 of 256 experts) and on one GPU holding all 256 (V3-12L). Exit 77 without a device.
 *   bench_fp8 [reps] */
#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/backend.h"
#include "model/backends/cuda/backend_cuda.h"
#include "base/dtype.h"
#define XS_SEED 0x9e3779b97f4a7c15ull
#include "cubench.h"
#include "xorshift.h"

static int g_reps = 20;

/* median milliseconds of g_reps runs of fn(arg) on stream s, after 3 warm-ups */
static float time_ms(cudaStream_t s, void (*fn)(void *), void *arg) {
    cudaEvent_t e0, e1;
    CU(cudaEventCreate(&e0));
    CU(cudaEventCreate(&e1));
    float *ms = calloc((size_t)g_reps, sizeof(float));
    for (int i = -3; i < g_reps; i++) {
        CU(cudaEventRecord(e0, s));
        fn(arg);
        CU(cudaEventRecord(e1, s));
        CU(cudaEventSynchronize(e1));
        if (i >= 0) CU(cudaEventElapsedTime(&ms[i], e0, e1));
    }
    qsort(ms, (size_t)g_reps, sizeof(float), cmp_f);
    float m = ms[g_reps / 2];
    free(ms);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return m;
}

static void copy_run(void *arg) {
    void **p = arg;
    CU(cudaMemcpyAsync(p[0], p[1], (size_t)1 << 31, cudaMemcpyDeviceToDevice, (cudaStream_t)p[2]));
}

static double copy_bandwidth(cudaStream_t s) {
    void *p[3] = {NULL, NULL, s};
    CU(cudaMalloc(&p[0], (size_t)1 << 31));
    CU(cudaMalloc(&p[1], (size_t)1 << 31));
    if (g_failed) return 0;
    float ms = time_ms(s, copy_run, p);
    cudaFree(p[0]);
    cudaFree(p[1]);
    return 2.0 * (double)((size_t)1 << 31) / (ms * 1e-3);
}

/* random e4m3 bytes (no NaN) and scales for an [n_out, n_in] weight, split at `split` */
static be_weight *fp8_weight(be_backend *be, int n_out, int n_in, int split) {
    size_t n = (size_t)n_out * n_in;
    int cb = (n_in + 127) / 128, rb = (split + 127) / 128 + (n_out - split + 127) / 128;
    uint8_t *q = malloc(n);
    float *s = malloc((size_t)rb * cb * sizeof(float));
    for (size_t i = 0; i < n; i += 8) {
        uint64_t r = xs_next() & 0x7676767676767676ull; /* never 0x7f / 0xff */
        memcpy(q + i, &r, n - i < 8 ? n - i : 8);
    }
    for (int i = 0; i < rb * cb; i++) s[i] = 1e-3f * (1.0f + (float)(xs_next() % 100) / 100.0f);
    be_weight *w = NULL;
    if (be->ops->weight_create_fp8(be, q, s, n_out, n_in, split, &w) != DUET_OK) g_failed = 1;
    free(q);
    free(s);
    return w;
}

static be_weight *bf16_weight(be_backend *be, int n_out, int n_in) {
    size_t n = (size_t)n_out * n_in;
    float *h = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) h[i] = ((float)(xs_next() % 2001) - 1000.0f) * 1e-5f;
    be_weight *w = NULL;
    if (be->ops->weight_create(be, h, n_out, n_in, false, &w) != DUET_OK) g_failed = 1;
    free(h);
    return w;
}

typedef struct lin_arg {
    be_backend *be;
    void *y, *x;
    int T, n_in;
    be_weight *w;
    int n_out; /* be_cuda_fp8_gemm_lt's row stride of y */
} lin_arg;

static void lin_run(void *arg) {
    lin_arg *a = arg;
    a->be->ops->linear(a->be, a->y, a->x, a->n_in, a->T, a->w);
}

static void lt_gemm_run(void *arg) {
    lin_arg *a = arg;
    duet_status st = be_cuda_fp8_gemm_lt(a->be, a->y, a->n_out, a->x, a->n_in, a->T, a->w);
    (void)st; /* checked once before timing */
}

typedef struct dshape {
    const char *name;
    int n_out, n_in, split;
} dshape;

/* ---- cuBLASLt FP8 at prefill size ---- */

typedef struct lt_arg {
    cublasLtHandle_t lt;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t la, lb, ld;
    cublasLtMatmulAlgo_t algo;
    const void *A, *B;
    void *D, *ws;
    size_t ws_bytes;
    cudaStream_t s;
} lt_arg;

static void lt_run(void *arg) {
    lt_arg *a = arg;
    const float one = 1.0f, zero = 0.0f;
    if (cublasLtMatmul(a->lt, a->op, &one, a->A, a->la, a->B, a->lb, &zero, a->D, a->ld, a->D,
                       a->ld, &a->algo, a->ws, a->ws_bytes, a->s) != CUBLAS_STATUS_SUCCESS)
        g_failed = 1;
}

/* TFLOP/s of D [M, N] (bf16) = X [M, K] (e4m3) @ W [N, K]^T (e4m3) through cuBLASLt, per-tensor
 * scales (block = false) or 1x128 / 128x128 block scales (block = true); 0: not available */
static double lt_fp8_tflops(cudaStream_t s, int M, int N, int K, bool block) {
    lt_arg a = {.s = s, .ws_bytes = (size_t)64 << 20};
    void *A = NULL, *B = NULL, *D = NULL, *sa = NULL, *sb = NULL;
    CU(cudaMalloc(&A, (size_t)N * K));
    CU(cudaMalloc(&B, (size_t)M * K));
    CU(cudaMalloc(&D, (size_t)M * N * 2));
    CU(cudaMalloc(&a.ws, a.ws_bytes));
    CU(cudaMalloc(&sa, (size_t)((N + 127) / 128) * ((K + 127) / 128) * 4 + 16));
    CU(cudaMalloc(&sb, (size_t)M * ((K + 127) / 128) * 4 + 16));
    if (g_failed) return 0;
    CU(cudaMemset(A, 0x30, (size_t)N * K));
    CU(cudaMemset(B, 0x30, (size_t)M * K));
    CU(cudaMemset(sa, 0, 16)); /* scales: values do not change the time */
    double tflops = 0;
    cublasLtMatmulPreference_t pref = NULL;
    bool ok =
        cublasLtCreate(&a.lt) == CUBLAS_STATUS_SUCCESS &&
        cublasLtMatmulDescCreate(&a.op, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS;
    cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    ok = ok &&
         cublasLtMatmulDescSetAttribute(a.op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta) == 0 &&
         cublasLtMatmulDescSetAttribute(a.op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb) == 0;
    if (ok && block) {
        /* A (the weight) 128x128 blocks, B (the activations) 1x128 along K */
        int32_t ma = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
        int32_t mb = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
        ok = cublasLtMatmulDescSetAttribute(a.op, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &ma,
                                            sizeof ma) == 0 &&
             cublasLtMatmulDescSetAttribute(a.op, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mb,
                                            sizeof mb) == 0 &&
             cublasLtMatmulDescSetAttribute(a.op, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sa,
                                            sizeof sa) == 0 &&
             cublasLtMatmulDescSetAttribute(a.op, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sb,
                                            sizeof sb) == 0;
    }
    /* column-major: D^T [N, M] = W [K, N]^T * X^T [K, M] */
    ok = ok && cublasLtMatrixLayoutCreate(&a.la, CUDA_R_8F_E4M3, K, N, K) == 0 &&
         cublasLtMatrixLayoutCreate(&a.lb, CUDA_R_8F_E4M3, K, M, K) == 0 &&
         cublasLtMatrixLayoutCreate(&a.ld, CUDA_R_16BF, N, M, N) == 0 &&
         cublasLtMatmulPreferenceCreate(&pref) == 0 &&
         cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                              &a.ws_bytes, sizeof a.ws_bytes) == 0;
    cublasLtMatmulHeuristicResult_t h;
    int found = 0;
    ok = ok &&
         cublasLtMatmulAlgoGetHeuristic(a.lt, a.op, a.la, a.lb, a.ld, a.ld, pref, 1, &h, &found) ==
             0 &&
         found > 0;
    if (ok) {
        a.algo = h.algo;
        a.A = A;
        a.B = B;
        a.D = D;
        int before = g_failed;
        float ms = time_ms(s, lt_run, &a);
        if (g_failed == before) tflops = 2.0 * M * (double)N * K / (ms * 1e-3) / 1e12;
        g_failed = before; /* an unsupported mode is a result, not a failure */
    }
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (a.la) cublasLtMatrixLayoutDestroy(a.la);
    if (a.lb) cublasLtMatrixLayoutDestroy(a.lb);
    if (a.ld) cublasLtMatrixLayoutDestroy(a.ld);
    if (a.op) cublasLtMatmulDescDestroy(a.op);
    if (a.lt) cublasLtDestroy(a.lt);
    cudaFree(A);
    cudaFree(B);
    cudaFree(D);
    cudaFree(a.ws);
    cudaFree(sa);
    cudaFree(sb);
    (void)cudaGetLastError();
    return tflops;
}

/* ---- grouped FP8 experts (moe_experts_dev) ---- */

typedef struct moe_arg {
    be_backend *be;
    void *out;
    be_moe_rows rows;
    be_ffn *f, shared;
    int n;
} moe_arg;

static void moe_run(void *arg) {
    moe_arg *a = arg;
    a->be->ops->moe_experts_dev(a->be, a->out, &a->rows, a->f, 0, a->n, &a->shared);
}

/* The prefill target: FP8 grouped MoE GEMMs of T tokens (top-8 over n_total experts,
 * the first E local, + the shared expert) at >= 60% of a dense FP8 GEMM's TFLOP/s on the same
 * FLOPs. Times moe_experts_dev with the grouped kernel and with per-expert cuBLASLt calls
 * (DUET_FP8_MOE_LT_ROWS=1), and be_cuda_fp8_gemm_lt (block-scaled, with its quantization) and
 * cuBLASLt per-tensor on the dense gate_up + down of M = routed pairs + T rows. */
static void moe_prefill_compare(be_backend *be, cudaStream_t s, void *x, void *y, const char *name,
                                int E, int n_total, int T) {
    const be_ops *o = be->ops;
    const int D = 7168, I = 2048, K = 8;
    be_ffn *f = calloc((size_t)E, sizeof *f);
    for (int e = 0; e < E && !g_failed; e++)
        f[e] = (be_ffn){fp8_weight(be, 2 * I, D, I), fp8_weight(be, D, I, D), I};
    be_ffn sh = {fp8_weight(be, 2 * I, D, I), fp8_weight(be, D, I, D), I};
    int32_t *ids = malloc((size_t)T * K * sizeof(int32_t));
    float *wt = malloc((size_t)T * K * sizeof(float));
    long long pairs = 0;
    for (int t = 0; t < T; t++) {
        int chosen[8], nc = 0;
        while (nc < K) { /* K distinct experts a token */
            int id = (int)(xs_next() % (uint64_t)n_total), dup = 0;
            for (int j = 0; j < nc; j++) dup |= chosen[j] == id;
            if (!dup) chosen[nc++] = id;
        }
        for (int k = 0; k < K; k++) {
            ids[t * K + k] = chosen[k] < E ? chosen[k] : -1;
            pairs += chosen[k] < E;
            wt[t * K + k] = 0.1f;
        }
    }
    void *di = o->mem_alloc(be, (size_t)T * K * 4), *dw = o->mem_alloc(be, (size_t)T * K * 4);
    o->mem_upload(be, di, ids, (size_t)T * K * 4);
    o->mem_upload(be, dw, wt, (size_t)T * K * 4);
    moe_arg a = {
        be,
        y,
        {.n = T, .D = D, .K = K, .x = x, .x_stride = D, .ids = di, .weights = dw, .meta_stride = K},
        f,
        sh,
        E};
    const double fl = 2.0 * 3.0 * I * D * (double)(pairs + T);
    unsetenv("DUET_FP8_MOE_LT_ROWS");
    float mg = g_failed ? 0 : time_ms(s, moe_run, &a);
    setenv("DUET_FP8_MOE_LT_ROWS", "1", 1);
    float ml = g_failed ? 0 : time_ms(s, moe_run, &a);
    unsetenv("DUET_FP8_MOE_LT_ROWS");
    /* dense: M rows through expert 0's gate_up and down */
    const int M = (int)(pairs + T);
    void *xd = o->buf_alloc(be, (size_t)M * D), *hd = o->buf_alloc(be, (size_t)M * 2 * I);
    void *yd = o->buf_alloc(be, (size_t)M * D);
    o->zero(be, xd, (size_t)M * D);
    o->zero(be, hd, (size_t)M * 2 * I);
    lin_arg ag = {be, hd, xd, M, D, f[0].gate_up, 2 * I}, ad = {be, yd, hd, M, I, f[0].down, D};
    float mdg = 0, mdd = 0;
    if (!g_failed && be_cuda_fp8_gemm_lt(be, hd, 2 * I, xd, D, M, f[0].gate_up) == DUET_OK &&
        be_cuda_fp8_gemm_lt(be, yd, D, hd, I, M, f[0].down) == DUET_OK) {
        mdg = time_ms(s, lt_gemm_run, &ag);
        mdd = time_ms(s, lt_gemm_run, &ad);
    }
    double tg = fl / (mg * 1e-3) / 1e12, tl = fl / (ml * 1e-3) / 1e12;
    double td = mdg > 0 ? fl / ((mdg + mdd) * 1e-3) / 1e12 : 0;
    double pt_g = lt_fp8_tflops(s, M, 2 * I, D, false), pt_d = lt_fp8_tflops(s, M, D, I, false);
    /* per-tensor dense: the two GEMMs' times from their TFLOP/s */
    double tp =
        pt_g > 0 && pt_d > 0
            ? fl / ((2.0 * M * 2 * I * D / (pt_g * 1e12)) + (2.0 * M * D * I / (pt_d * 1e12))) /
                  1e12
            : 0;
    printf("%-24s %5d %7lld %9.0f %9.0f %9.0f %9.0f %7.0f%% %7.0f%%\n", name, T, pairs, tg, tl, td,
           tp, td > 0 ? 100.0 * tl / td : 0, tp > 0 ? 100.0 * tl / tp : 0);
    o->buf_free(be, xd);
    o->buf_free(be, hd);
    o->buf_free(be, yd);
    o->mem_free(be, di);
    o->mem_free(be, dw);
    free(ids);
    free(wt);
    for (int e = 0; e < E; e++) {
        o->weight_destroy(be, f[e].gate_up);
        o->weight_destroy(be, f[e].down);
    }
    o->weight_destroy(be, sh.gate_up);
    o->weight_destroy(be, sh.down);
    free(f);
}

int main(int argc, char **argv) {
    if (be_cuda_device_count() < 1) {
        fprintf(stderr, "no CUDA device: skipped\n");
        return 77;
    }
    if (argc > 1) g_reps = atoi(argv[1]) > 0 ? atoi(argv[1]) : g_reps;
    be_backend *be = NULL;
    if (be_cuda_create(0, DT_BF16, &be) != DUET_OK) return 1;
    const be_ops *o = be->ops;
    cudaStream_t s = (cudaStream_t)be_cuda_stream(be);
    double copy = copy_bandwidth(s);
    printf("ceilings: device copy %.0f GB/s (read + write)\n", copy / 1e9);
    printf("(the block-scale layouts: tools/fp8-lt-probe)\n");

    static const dshape shapes[] = {
        {"V2-Lite o_proj 2048x2048", 2048, 2048, 2048},
        {"V2-Lite shared gate_up 5632x2048", 5632, 2048, 2816},
        {"V3 q_b 24576x1536", 24576, 1536, 24576},
        {"V3 o_proj 7168x16384", 7168, 16384, 7168},
        {"V3 dense gate_up 36864x7168", 36864, 7168, 18432},
        {"V3 dense down 7168x18432", 7168, 18432, 7168},
    };
    static const int Ms[3] = {1, 16, 64};
    printf("\ndecode: y[M, N] = x[M, K] @ W^T, FP8 W (bytes: W + scales + x + y) vs bf16 W "
           "(cuBLAS)\n");
    printf("%-34s %4s %10s %9s %6s %10s %9s\n", "shape", "M", "fp8 us", "GB/s", "%copy", "bf16 us",
           "GB/s");
    size_t max_x = (size_t)4096 * 18432, max_y = (size_t)4096 * 36864;
    void *x = o->buf_alloc(be, max_x), *y = o->buf_alloc(be, max_y);
    o->zero(be, x, max_x);
    for (size_t i = 0; i < sizeof shapes / sizeof *shapes && !g_failed; i++) {
        const dshape *d = &shapes[i];
        be_weight *wf = fp8_weight(be, d->n_out, d->n_in, d->split);
        be_weight *wb = bf16_weight(be, d->n_out, d->n_in);
        if (g_failed) break;
        double sbytes = 4.0 * ((d->split + 127) / 128 + (d->n_out - d->split + 127) / 128) *
                        ((d->n_in + 127) / 128);
        for (int m = 0; m < 3; m++) {
            int M = Ms[m];
            lin_arg af = {be, y, x, M, d->n_in, wf, d->n_out},
                    ab = {be, y, x, M, d->n_in, wb, d->n_out};
            float mf = time_ms(s, lin_run, &af), mb = time_ms(s, lin_run, &ab);
            double act = 2.0 * M * (d->n_in + d->n_out);
            double bf = (double)d->n_out * d->n_in + sbytes + act;
            double bb = 2.0 * d->n_out * d->n_in + act;
            printf("%-34s %4d %10.1f %9.0f %5.0f%% %10.1f %9.0f\n", d->name, M, mf * 1e3,
                   bf / (mf * 1e-3) / 1e9, 100.0 * bf / (mf * 1e-3) / copy, mb * 1e3,
                   bb / (mb * 1e-3) / 1e9);
        }
        /* prefill size on the biggest shapes */
        if (d->n_in >= 7168) {
            int M = 4096;
            lin_arg af = {be, y, x, M, d->n_in, wf, d->n_out},
                    ab = {be, y, x, M, d->n_in, wb, d->n_out};
            float mf = time_ms(s, lin_run, &af), mb = time_ms(s, lin_run, &ab);
            double fl = 2.0 * M * (double)d->n_out * d->n_in;
            double lt = lt_fp8_tflops(s, M, d->n_out, d->n_in, false);
            double ltb = lt_fp8_tflops(s, M, d->n_out, d->n_in, true);
            printf("prefill %-26s %4d fp8 weights %.0f TFLOP/s, bf16 cuBLAS %.0f, cuBLASLt fp8 "
                   "per-tensor %.0f, block-scaled %s%.0f (fp8 weights at %.0f%% of cuBLASLt "
                   "fp8)\n",
                   d->name, M, fl / (mf * 1e-3) / 1e12, fl / (mb * 1e-3) / 1e12, lt,
                   ltb > 0 ? "" : "n/a ", ltb, lt > 0 ? 100.0 * fl / (mf * 1e-3) / 1e12 / lt : 0);
            /* the backend's block-scaled GEMM with its activation quantization */
            lin_arg al = {be, y, x, M, d->n_in, wf, d->n_out};
            duet_status st = be_cuda_fp8_gemm_lt(be, y, d->n_out, x, d->n_in, M, wf);
            if (st == DUET_OK) {
                float ml = time_ms(s, lt_gemm_run, &al);
                printf("        be_cuda_fp8_gemm_lt (quantize + cuBLASLt block-scaled): %.0f "
                       "TFLOP/s, %.0f%% of cuBLASLt fp8 per-tensor\n",
                       fl / (ml * 1e-3) / 1e12, lt > 0 ? 100.0 * fl / (ml * 1e-3) / 1e12 / lt : 0);
            } else {
                printf("        be_cuda_fp8_gemm_lt: %s\n", duet_strerror(st));
            }
        }
        o->weight_destroy(be, wf);
        o->weight_destroy(be, wb);
    }

    /* one EP rank of V3 (DP8+EP8): 32 routed experts of D 7168, I 2048, and the shared one */
    const int E = 32, D = 7168, I = 2048, K = 8;
    be_ffn *f = calloc(E, sizeof *f);
    for (int e = 0; e < E && !g_failed; e++)
        f[e] = (be_ffn){fp8_weight(be, 2 * I, D, I), fp8_weight(be, D, I, D), I};
    be_ffn sh = {fp8_weight(be, 2 * I, D, I), fp8_weight(be, D, I, D), I};
    printf("\ngrouped FP8 experts, V3 EP rank (%d experts, D %d, I %d, + shared; tokens' %d ids "
           "spread over 256, those here routed)\n",
           E, D, I, K);
    printf("%6s %9s %10s %9s %6s\n", "tokens", "touched", "us", "GB/s", "%copy");
    static const int Ts[4] = {1, 16, 64, 4096};
    for (int i = 0; i < 4 && !g_failed; i++) {
        int T = Ts[i];
        int32_t *ids = malloc((size_t)T * K * sizeof(int32_t));
        float *wt = malloc((size_t)T * K * sizeof(float));
        bool touched[32] = {false};
        for (int t = 0; t < T; t++)
            for (int k = 0; k < K; k++) {
                int id = (int)(xs_next() % 256); /* 1 in 8 land on this rank's experts 0..31 */
                ids[t * K + k] = id < E ? id : -1;
                if (id < E) touched[id] = true;
                wt[t * K + k] = 0.1f;
            }
        int nt = 0;
        for (int e = 0; e < E; e++) nt += touched[e];
        void *di = o->mem_alloc(be, (size_t)T * K * 4), *dw = o->mem_alloc(be, (size_t)T * K * 4);
        o->mem_upload(be, di, ids, (size_t)T * K * 4);
        o->mem_upload(be, dw, wt, (size_t)T * K * 4);
        moe_arg a = {
            be,
            y,
            {.n = T, .D = D, .K = K, .x = x, .x_stride = D, .ids = di, .weights = dw, .meta_stride = K},
            f,
            sh,
            E};
        float ms = time_ms(s, moe_run, &a);
        double bytes = (double)(nt + 1) * 3.0 * I * D + 2.0 * T * D * 2;
        printf("%6d %9d %10.1f %9.0f %5.0f%%\n", T, nt, ms * 1e3, bytes / (ms * 1e-3) / 1e9,
               100.0 * bytes / (ms * 1e-3) / copy);
        if (T == 4096)
            printf("       prefill: %.0f TFLOP/s (routed + shared FLOPs)\n",
                   2.0 * 3.0 * I * D * ((double)T * K / 8.0 + T) / (ms * 1e-3) / 1e12);
        o->mem_free(be, di);
        o->mem_free(be, dw);
        free(ids);
        free(wt);
    }
    for (int e = 0; e < E; e++) {
        o->weight_destroy(be, f[e].gate_up);
        o->weight_destroy(be, f[e].down);
    }
    o->weight_destroy(be, sh.gate_up);
    o->weight_destroy(be, sh.down);
    free(f);
    printf(
        "\nprefill MoE (TFLOP/s on routed + shared FLOPs; dense: the same FLOPs as one GEMM pair "
        "of M = pairs + T rows; target: per-expert >= 60%% of dense)\n");
    printf("%-24s %5s %7s %9s %9s %9s %9s %8s %8s\n", "case", "T", "pairs", "grouped", "per-exp",
           "dense-blk", "dense-pt", "vs blk", "vs pt");
    if (!g_failed) moe_prefill_compare(be, s, x, y, "V3 EP rank (32 of 256)", 32, 256, 4096);
    if (!g_failed) moe_prefill_compare(be, s, x, y, "V3-12L one GPU (256)", 256, 256, 4096);
    o->buf_free(be, x);
    o->buf_free(be, y);
    if (o->sync(be) != DUET_OK) g_failed = 1;
    be_destroy(be);
    printf("%s\n", g_failed ? "FAIL" : "PASS");
    return g_failed ? 1 : 0;
}
