/* Microbenchmark of one MoE layer on the CUDA backend (bf16): device routing + grouped experts
 * + combine (moe_route_dev, moe_experts_dev with the shared experts), timed with CUDA events
 * eagerly and as CUDA graph replays, next to the host-routing path it replaces (moe_route,
 * moe_experts, the shared FFN) and to the two ceilings it measures itself: device-copy
 * bandwidth and a large cuBLAS bf16 GEMM. Prints bytes of expert weights touched / time and
 * TFLOP/s for DeepSeek-V2-Lite and -V3 shapes. Exit 77 without a device.
 *   bench_moe [--shapes lite,v3] [--tokens 1,16,64,256,4096] [--reps N] [--v3-experts N] */
#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model/backend.h"
#include "model/backends/cuda/backend_cuda.h"
#define XS_SEED 0x9e3779b97f4a7c15ull
#include "cubench.h"
#include "optest.h"

#define SETS 8 /* input sets rotated so routing, and the experts touched, change every run */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static float median(float *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_f);
    return n ? v[n / 2] : 0.0f;
}

/* ---- the two ceilings ---- */

static double copy_bandwidth(void *stream) {
    size_t bytes = (size_t)2 << 30;
    void *a = NULL, *b = NULL;
    CU(cudaMalloc(&a, bytes));
    CU(cudaMalloc(&b, bytes));
    if (g_failed) return 0;
    CU(cudaMemsetAsync(a, 1, bytes, (cudaStream_t)stream));
    cudaEvent_t e0, e1;
    CU(cudaEventCreate(&e0));
    CU(cudaEventCreate(&e1));
    float ms[10];
    for (int i = -2; i < 10; i++) {
        CU(cudaEventRecord(e0, (cudaStream_t)stream));
        CU(cudaMemcpyAsync(i & 1 ? a : b, i & 1 ? b : a, bytes, cudaMemcpyDeviceToDevice,
                           (cudaStream_t)stream));
        CU(cudaEventRecord(e1, (cudaStream_t)stream));
        CU(cudaEventSynchronize(e1));
        if (i >= 0) CU(cudaEventElapsedTime(&ms[i], e0, e1));
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaFree(a);
    cudaFree(b);
    return 2.0 * (double)bytes / (median(ms, 10) * 1e-3); /* read + write */
}

static double gemm_tflops(be_backend *be) {
    const be_ops *o = be->ops;
    int n = 8192;
    size_t nn = (size_t)n * n;
    float *h = malloc(nn * sizeof(float));
    xs_fill(h, nn, 0.05f);
    be_weight *w = NULL;
    if (o->weight_create(be, h, n, n, false, &w) != DUET_OK) {
        free(h);
        return 0;
    }
    void *x = o->buf_alloc(be, nn), *y = o->buf_alloc(be, nn);
    o->upload(be, x, 0, h, nn);
    free(h);
    cudaStream_t s = (cudaStream_t)be_cuda_stream(be);
    cudaEvent_t e0, e1;
    CU(cudaEventCreate(&e0));
    CU(cudaEventCreate(&e1));
    float ms[10];
    for (int i = -3; i < 10; i++) {
        CU(cudaEventRecord(e0, s));
        o->linear(be, y, x, n, n, w);
        CU(cudaEventRecord(e1, s));
        CU(cudaEventSynchronize(e1));
        if (i >= 0) CU(cudaEventElapsedTime(&ms[i], e0, e1));
    }
    if (o->sync(be) != DUET_OK) g_failed = 1;
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    o->buf_free(be, x);
    o->buf_free(be, y);
    o->weight_destroy(be, w);
    return 2.0 * n * (double)n * n / (median(ms, 10) * 1e-3) / 1e12;
}

/* ---- one MoE layer ---- */

typedef struct shape {
    const char *name;
    int E, K, D, I, Is, n_group, topk_group;
    be_route_params route;
} shape;

typedef struct layer {
    be_weight *gate;
    void *bias;
    be_ffn *experts, shared;
} layer;

/* Weights from one random pool (a window at a random offset for each tensor): distinct
 * values per expert without drawing billions of numbers. */
static float *g_pool;
static size_t g_pool_n;

static be_weight *pool_weight(be_backend *be, int n_out, int n_in, bool keep_f32) {
    size_t n = (size_t)n_out * n_in,
           off = (size_t)((xs_uniform(1.0f) + 1.0f) * 0.5f * (float)(g_pool_n - n));
    be_weight *w = NULL;
    if (be->ops->weight_create(be, g_pool + off, n_out, n_in, keep_f32, &w) != DUET_OK) {
        g_failed = 1;
        return NULL;
    }
    return w;
}

static int layer_make(be_backend *be, const shape *s, layer *l) {
    memset(l, 0, sizeof *l);
    l->experts = calloc((size_t)s->E, sizeof(be_ffn));
    l->gate = pool_weight(be, s->E, s->D, true);
    for (int e = 0; e < s->E && !g_failed; e++)
        l->experts[e] = (be_ffn){pool_weight(be, 2 * s->I, s->D, false),
                                 pool_weight(be, s->D, s->I, false), s->I};
    l->shared = (be_ffn){pool_weight(be, 2 * s->Is, s->D, false),
                         pool_weight(be, s->D, s->Is, false), s->Is};
    if (s->route.method == CFG_TOPK_NOAUX_TC) {
        float *b = malloc((size_t)s->E * sizeof(float));
        xs_fill(b, (size_t)s->E, 0.02f);
        if (be->ops->vec_create(be, b, s->E, &l->bias) != DUET_OK) g_failed = 1;
        free(b);
    }
    return g_failed ? -1 : 0;
}

static void layer_free(be_backend *be, const shape *s, layer *l) {
    for (int e = 0; e < s->E; e++) {
        be->ops->weight_destroy(be, l->experts[e].gate_up);
        be->ops->weight_destroy(be, l->experts[e].down);
    }
    be->ops->weight_destroy(be, l->shared.gate_up);
    be->ops->weight_destroy(be, l->shared.down);
    be->ops->weight_destroy(be, l->gate);
    if (l->bias) be->ops->buf_free(be, l->bias);
    free(l->experts);
}

typedef struct result {
    const char *shape;
    int T;
    double touched, bytes, flops;      /* experts touched, bytes of weights read, FLOPs */
    float us_eager, us_graph, us_host; /* medians; host: the host-routing path */
    double err;                        /* rel L2 of the device path against the host path */
    const char *note;
} result;

static double rel_l2(const float *a, const float *b, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : INFINITY;
}

static void bench_one(be_backend *be, const shape *s, layer *l, int T, int reps, result *r) {
    const be_ops *o = be->ops;
    cudaStream_t st = (cudaStream_t)be_cuda_stream(be);
    int D = s->D, K = s->K;
    size_t td = (size_t)T * D, tk = (size_t)T * K;
    memset(r, 0, sizeof *r);
    r->shape = s->name;
    r->T = T;
    void *x[SETS], *out = o->buf_alloc(be, td), *ref = o->buf_alloc(be, td);
    void *gu = o->buf_alloc(be, (size_t)T * 2 * s->Is), *act = o->buf_alloc(be, (size_t)T * s->Is);
    void *sh_out = o->buf_alloc(be, td);
    int32_t *d_ids = o->mem_alloc(be, tk * 4), *h_ids = malloc(tk * 4);
    float *d_w = o->mem_alloc(be, tk * 4), *h_w = malloc(tk * 4);
    float *hx = malloc(td * sizeof(float));
    for (int i = 0; i < SETS; i++) {
        x[i] = o->buf_alloc(be, td);
        xs_fill(hx, td, 1.0f);
        o->upload(be, x[i], 0, hx, td);
    }
    be_moe_rows rows = bt_moe_rows(T, D, K, NULL, d_ids, d_w);
#define LAYER(i)                                                                                   \
    do {                                                                                           \
        rows.x = x[i];                                                                             \
        o->moe_route_dev(be, x[i], T, l->gate, l->bias, &s->route, d_ids, d_w);                    \
        o->moe_experts_dev(be, out, &rows, l->experts, 0, s->E, &l->shared);                       \
    } while (0)

    /* warm-up (scratch, expert tables, kernel attributes), and the experts each set touches */
    char *seen = calloc((size_t)s->E, 1);
    for (int i = 0; i < SETS; i++) {
        LAYER(i);
        if (o->mem_download(be, h_ids, d_ids, tk * 4) != DUET_OK) g_failed = 1;
        memset(seen, 0, (size_t)s->E);
        int n = 0;
        for (size_t j = 0; j < tk; j++)
            if (h_ids[j] >= 0 && h_ids[j] < s->E && !seen[h_ids[j]]) seen[h_ids[j]] = 1, n++;
        r->touched += (double)n / SETS;
    }
    free(seen);
    double per_expert = 3.0 * s->I * D * 2, shared = 3.0 * s->Is * D * 2;
    r->bytes = r->touched * per_expert + shared + (double)s->E * D * 4;
    r->flops = 2.0 * T * (K * 3.0 * s->I * D + 3.0 * s->Is * D + (double)s->E * D);

    /* the host-routing path on set 0, for agreement, then timed on the host clock */
    LAYER(0);
    o->moe_route(be, x[0], T, l->gate, l->bias, &s->route, h_ids, h_w);
    o->zero(be, ref, td);
    o->moe_experts(be, ref, x[0], T, D, h_ids, h_w, K, l->experts, 0, s->E);
    o->linear(be, gu, x[0], D, T, l->shared.gate_up);
    o->silu_mul(be, act, gu, T, s->Is);
    o->linear(be, sh_out, act, s->Is, T, l->shared.down);
    o->add(be, ref, sh_out, td);
    float *a = malloc(td * sizeof(float)), *b = malloc(td * sizeof(float));
    if (o->download(be, a, out, 0, td) != DUET_OK || o->download(be, b, ref, 0, td) != DUET_OK)
        g_failed = 1;
    r->err = rel_l2(a, b, td);
    free(a);
    free(b);

    int n_host = reps < 20 ? reps : 20;
    float *t_host = malloc((size_t)n_host * sizeof(float));
    for (int i = 0; i < n_host; i++) {
        double t0 = now_s();
        o->moe_route(be, x[i % SETS], T, l->gate, l->bias, &s->route, h_ids, h_w);
        o->zero(be, ref, td);
        o->moe_experts(be, ref, x[i % SETS], T, D, h_ids, h_w, K, l->experts, 0, s->E);
        o->linear(be, gu, x[i % SETS], D, T, l->shared.gate_up);
        o->silu_mul(be, act, gu, T, s->Is);
        o->linear(be, sh_out, act, s->Is, T, l->shared.down);
        o->add(be, ref, sh_out, td);
        if (o->sync(be) != DUET_OK) g_failed = 1;
        t_host[i] = (float)((now_s() - t0) * 1e6);
    }
    r->us_host = median(t_host, n_host);
    free(t_host);

    /* eager: events around each layer */
    cudaEvent_t *ev = malloc((size_t)(reps + 1) * sizeof(cudaEvent_t));
    for (int i = 0; i <= reps; i++) CU(cudaEventCreate(&ev[i]));
    CU(cudaEventRecord(ev[0], st));
    for (int i = 0; i < reps; i++) {
        LAYER(i % SETS);
        CU(cudaEventRecord(ev[i + 1], st));
    }
    if (o->sync(be) != DUET_OK) g_failed = 1;
    float *t_ev = malloc((size_t)reps * sizeof(float));
    for (int i = 0; i < reps; i++) {
        CU(cudaEventElapsedTime(&t_ev[i], ev[i], ev[i + 1]));
        t_ev[i] *= 1000.0f;
    }
    r->us_eager = median(t_ev, reps);

    /* graphs: one capture per input set, each replay timed */
    cudaGraphExec_t exec[SETS];
    int n_exec = 0;
    for (int i = 0; i < SETS; i++) {
        cudaGraph_t g = NULL;
        if (cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal) != cudaSuccess) break;
        LAYER(i);
        cudaError_t e = cudaStreamEndCapture(st, &g);
        if (e == cudaSuccess) e = cudaGraphInstantiate(&exec[n_exec], g, 0);
        if (g) cudaGraphDestroy(g);
        if (e != cudaSuccess) {
            r->note = cudaGetErrorString(e);
            (void)cudaGetLastError();
            break;
        }
        n_exec++;
    }
    if (n_exec == SETS) {
        CU(cudaEventRecord(ev[0], st));
        for (int i = 0; i < reps; i++) {
            CU(cudaGraphLaunch(exec[i % SETS], st));
            CU(cudaEventRecord(ev[i + 1], st));
        }
        CU(cudaStreamSynchronize(st));
        for (int i = 0; i < reps; i++) {
            CU(cudaEventElapsedTime(&t_ev[i], ev[i], ev[i + 1]));
            t_ev[i] *= 1000.0f;
        }
        r->us_graph = median(t_ev, reps);
    } else if (!r->note) {
        r->note = "capture failed";
    }
    for (int i = 0; i < n_exec; i++) cudaGraphExecDestroy(exec[i]);
    for (int i = 0; i <= reps; i++) cudaEventDestroy(ev[i]);
    free(ev);
    free(t_ev);
#undef LAYER
    for (int i = 0; i < SETS; i++) o->buf_free(be, x[i]);
    o->buf_free(be, out);
    o->buf_free(be, ref);
    o->buf_free(be, gu);
    o->buf_free(be, act);
    o->buf_free(be, sh_out);
    o->mem_free(be, d_ids);
    o->mem_free(be, d_w);
    free(h_ids);
    free(h_w);
    free(hx);
}

static int parse_list(const char *s, int *v, int max) {
    int n = 0;
    while (*s && n < max) {
        v[n++] = atoi(s);
        s = strchr(s, ',');
        if (!s) break;
        s++;
    }
    return n;
}

int main(int argc, char **argv) {
    if (be_cuda_device_count() < 1) {
        fprintf(stderr, "no CUDA device: skipped\n");
        return 77;
    }
    const char *shapes = "lite,v3";
    int tokens[16] = {1, 16, 64, 256, 4096}, n_tokens = 5, reps = 50, v3_experts = 256;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--shapes"))
            shapes = argv[i + 1];
        else if (!strcmp(argv[i], "--tokens"))
            n_tokens = parse_list(argv[i + 1], tokens, 16);
        else if (!strcmp(argv[i], "--reps"))
            reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--v3-experts"))
            v3_experts = atoi(argv[i + 1]);
        else {
            fprintf(stderr,
                    "usage: %s [--shapes lite,v3] [--tokens 1,16,...] [--reps N] "
                    "[--v3-experts N]\n",
                    argv[0]);
            return 2;
        }
    }
    if (reps < 3) reps = 3;

    be_backend *be = NULL;
    if (be_cuda_create(0, DT_BF16, &be) != DUET_OK) return 1;
    double bw = copy_bandwidth(be_cuda_stream(be));
    double tf = gemm_tflops(be);
    be_destroy(be);
    printf("ceilings: device copy %.0f GB/s (read + write), cuBLAS bf16 8192^3 GEMM %.0f TFLOP/s\n",
           bw / 1e9, tf);

    shape all[2] = {
        {.name = "V2-Lite",
         .E = 64,
         .K = 6,
         .D = 2048,
         .I = 1408,
         .Is = 2816,
         .route = bt_route_v2_lite()},
        {.name = "V3",
         .E = v3_experts,
         .K = 8,
         .D = 7168,
         .I = 2048,
         .Is = 2048,
         .route = bt_route_v3(v3_experts, 8, 4)},
    };
    result res[32];
    int n_res = 0;
    /* one pool big enough for the largest tensor of any shape */
    g_pool_n = (size_t)2 * 2048 * 7168 + (1 << 20);
    g_pool = malloc(g_pool_n * sizeof(float));
    xs_fill(g_pool, g_pool_n, 0.03f);
    for (int si = 0; si < 2; si++) {
        const shape *s = &all[si];
        if (!strstr(shapes, si == 0 ? "lite" : "v3")) continue;
        if (be_cuda_create(0, DT_BF16, &be) != DUET_OK) return 1;
        layer l;
        double t0 = now_s();
        if (layer_make(be, s, &l) != 0) {
            fprintf(stderr, "%s: cannot create the layer's weights\n", s->name);
            return 1;
        }
        fprintf(stderr, "%s: %d experts made in %.1f s\n", s->name, s->E, now_s() - t0);
        for (int i = 0; i < n_tokens && n_res < 32; i++) {
            int T = tokens[i], rp = T >= 1024 ? (reps < 10 ? reps : 10) : reps;
            bench_one(be, s, &l, T, rp, &res[n_res]);
            duet_status st = be->ops->sync(be);
            if (st != DUET_OK) {
                fprintf(stderr, "%s T=%d: the backend failed: %s\n", s->name, T, duet_strerror(st));
                g_failed = 1;
                break;
            }
            n_res++;
        }
        layer_free(be, s, &l);
        be_destroy(be);
    }
    free(g_pool);

    printf("\n%-8s %5s %8s %9s %9s %9s %9s %8s %7s %9s %7s %9s\n", "shape", "T", "experts",
           "MB read", "host us", "eager us", "graph us", "GB/s", "TFLOP/s", "floor us", "of flr",
           "err");
    for (int i = 0; i < n_res; i++) {
        const result *r = &res[i];
        float us = r->us_graph > 0 ? r->us_graph : r->us_eager;
        double floor_us = fmax(r->bytes / bw, r->flops / (tf * 1e12)) * 1e6;
        printf("%-8s %5d %8.1f %9.1f %9.1f %9.1f %9.1f %8.0f %7.1f %9.1f %6.0f%% %9.2e %s\n",
               r->shape, r->T, r->touched, r->bytes / 1e6, r->us_host, r->us_eager, r->us_graph,
               r->bytes / (us * 1e-6) / 1e9, r->flops / (us * 1e-6) / 1e12, floor_us,
               100.0 * floor_us / us, r->err, r->note ? r->note : "");
    }
    printf("(host: moe_route + per-expert cuBLAS + shared FFN, host clock; eager/graph: device "
           "path, CUDA events, medians; GB/s and TFLOP/s over graph time; err: device vs host "
           "path, bf16)\n");
    /* a wrong result, or no time at all, fails the run: numbers of a broken kernel mean nothing */
    int bad = g_failed;
    for (int i = 0; i < n_res; i++) bad |= !(res[i].err < 3e-2) || !(res[i].us_eager > 0);
    printf("%s\n", bad ? "FAIL" : "PASS");
    return bad ? 1 : 0;
}
