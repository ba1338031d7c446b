/* MLA microbenchmark: times the CUDA backend's be_ops.mla_attention on decode batches (one or
 * a few new tokens per sequence, absorbed form) at DeepSeek-V2-Lite and V3 shapes, and the
 * device copy bandwidth it is measured against. Each timing is the median over replays of a
 * CUDA graph holding the op once per layer of a cache large enough not to sit in L2; phases
 * are timed by difference (be_cuda_mla_tune leaves them out). Then prompt chunks (the expanded
 * form: latents gathered and expanded by kv_b, then the tensor-core prefill kernel), timed
 * eagerly, next to a large dense bf16 GEMM (the backend's linear op, 8192^3) measured in the
 * same run. No engine, no model. The sweep mode times every decode variant of the kernel (and
 * a few forced split counts) on issue 12's cases, checks each one's output against variant
 * 0's, and names the fastest per case.
 * Usage: bench_mla [replays] [decode|prefill|sweep]   (exit 77 without a device).
 * docs/kernels/mla.md reads the tables. */
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/backend.h"
#include "model/backends/cuda/backend_cuda.h"
#define XS_SEED 0x9e3779b97f4a7c15ull
#include "optest.h"

#define BS   64 /* the engine's default block size */
#define L_   512
#define R_   64
#define NOPE 128
#define V_   128

static int g_fail;

static int cuda_ok(cudaError_t e, const char *what) {
    if (e == cudaSuccess) return 1;
    fprintf(stderr, "bench_mla: %s: %s\n", what, cudaGetErrorString(e));
    g_fail = 1;
    return 0;
}

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

static float median(float *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_float);
    return n % 2 ? v[n / 2] : 0.5f * (v[n / 2 - 1] + v[n / 2]);
}

/* Device copy: median over 10 copies of 4 GiB, bytes read plus written, in GB/s. */
static double copy_bandwidth(void) {
    size_t bytes = (size_t)4 << 30;
    void *a = NULL, *b = NULL;
    cudaEvent_t e0, e1;
    double gbs = 0;
    if (!cuda_ok(cudaMalloc(&a, bytes), "cudaMalloc (copy source)")) return 0;
    if (!cuda_ok(cudaMalloc(&b, bytes), "cudaMalloc (copy target)")) {
        cudaFree(a);
        return 0;
    }
    cuda_ok(cudaMemset(a, 0x5a, bytes), "cudaMemset");
    cuda_ok(cudaEventCreate(&e0), "cudaEventCreate");
    cuda_ok(cudaEventCreate(&e1), "cudaEventCreate");
    float ms[10];
    for (int i = -2; i < 10; i++) {
        cuda_ok(cudaEventRecord(e0, 0), "cudaEventRecord");
        cuda_ok(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, 0), "cudaMemcpyAsync");
        cuda_ok(cudaEventRecord(e1, 0), "cudaEventRecord");
        cuda_ok(cudaEventSynchronize(e1), "cudaEventSynchronize");
        if (i >= 0) cuda_ok(cudaEventElapsedTime(&ms[i], e0, e1), "cudaEventElapsedTime");
    }
    float med = median(ms, 10);
    if (!g_fail && med > 0) gbs = 2.0 * (double)bytes / (med * 1e-3) / 1e9;
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaFree(a);
    cudaFree(b);
    return gbs;
}

typedef struct bench_cfg {
    const char *name;
    int H, B, ctx, nq;
} bench_cfg;

typedef struct bench_res {
    bench_cfg c;
    be_cuda_mla_info info;
    int layers;
    double us_full, us_attn, us_comb; /* per op: everything; attention kernel alone; + combine */
    double kv_bytes, all_bytes, attn_flops;
    int ok;
} bench_res;

typedef struct setup {
    be_backend *be;
    be_kv *kv;
    be_weight *kv_b;
    void *q, *out;
    int layers, T, H;
    float scale;
} setup;

/* The step's inputs: query rows (qn uniform draws in [-1, 1)) and kv_b (wn in [-w_amp, w_amp))
 * on the device, with the output buffer; the host copies in *qh_p and *wh_p (the caller frees
 * them, also after a failure). 0, or -1 with g_fail set. */
static int setup_q_kvb(setup *s, size_t qn, size_t wn, float w_amp, float **qh_p, float **wh_p) {
    const be_ops *o = s->be->ops;
    float *qh = malloc(qn * sizeof *qh), *wh = malloc(wn * sizeof *wh);
    *qh_p = qh;
    *wh_p = wh;
    for (size_t i = 0; i < qn; i++) qh[i] = xs_uniform(1.0f);
    for (size_t i = 0; i < wn; i++) wh[i] = xs_uniform(w_amp);
    s->q = o->buf_alloc(s->be, qn);
    s->out = o->buf_alloc(s->be, (size_t)s->T * s->H * V_);
    if (!s->q || !s->out || o->upload(s->be, s->q, 0, qh, qn) != DUET_OK ||
        o->weight_create(s->be, wh, s->H * (NOPE + V_), L_, false, &s->kv_b) != DUET_OK) {
        g_fail = 1;
        return -1;
    }
    return 0;
}

/* frees what setup_q_kvb and the caller's kv_create made, and the host copies */
static void setup_free(setup *s, float *qh, float *wh) {
    const be_ops *o = s->be->ops;
    if (s->kv_b) o->weight_destroy(s->be, s->kv_b);
    o->buf_free(s->be, s->q);
    o->buf_free(s->be, s->out);
    o->kv_destroy(s->be, s->kv);
    free(qh);
    free(wh);
}

static void run_layers(setup *s) {
    for (int l = 0; l < s->layers; l++)
        s->be->ops->mla_attention(s->be, s->out, s->q, s->kv, l, s->kv_b, s->H, NOPE, R_, V_,
                                  s->scale);
}

/* Median microseconds of one op (a graph of `layers` ops, replayed), with `split` KV splits
 * (0: the backend's choice) and phases `skip` left out; -1 on failure. */
static double time_variant(setup *s, int split, unsigned skip, int reps) {
    cudaStream_t st = (cudaStream_t)be_cuda_stream(s->be);
    if (be_cuda_mla_tune(s->be, split, skip) != DUET_OK) return -1;
    run_layers(s); /* eager first: scratch grows outside the capture */
    if (s->be->ops->sync(s->be) != DUET_OK) return -1;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    if (!cuda_ok(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal), "begin capture"))
        return -1;
    run_layers(s);
    cudaError_t ce = cudaStreamEndCapture(st, &graph);
    if (!cuda_ok(ce, "end capture (is the decode path graph-capturable?)")) return -1;
    if (s->be->ops->sync(s->be) != DUET_OK) {
        fprintf(stderr, "bench_mla: an op failed during capture\n");
        g_fail = 1;
        cudaGraphDestroy(graph);
        return -1;
    }
    if (!cuda_ok(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate")) {
        cudaGraphDestroy(graph);
        return -1;
    }
    cudaEvent_t *ev = malloc(2 * (size_t)reps * sizeof *ev);
    float *ms = malloc((size_t)reps * sizeof *ms);
    for (int i = 0; i < 2 * reps; i++) cuda_ok(cudaEventCreate(&ev[i]), "cudaEventCreate");
    for (int i = 0; i < 3; i++) cuda_ok(cudaGraphLaunch(exec, st), "cudaGraphLaunch (warm-up)");
    for (int i = 0; i < reps; i++) {
        cuda_ok(cudaEventRecord(ev[2 * i], st), "cudaEventRecord");
        cuda_ok(cudaGraphLaunch(exec, st), "cudaGraphLaunch");
        cuda_ok(cudaEventRecord(ev[2 * i + 1], st), "cudaEventRecord");
    }
    cuda_ok(cudaStreamSynchronize(st), "cudaStreamSynchronize");
    for (int i = 0; i < reps; i++)
        cuda_ok(cudaEventElapsedTime(&ms[i], ev[2 * i], ev[2 * i + 1]), "cudaEventElapsedTime");
    double us = g_fail ? -1 : median(ms, reps) * 1e3 / s->layers;
    for (int i = 0; i < 2 * reps; i++) cudaEventDestroy(ev[i]);
    free(ev);
    free(ms);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    be_cuda_mla_tune(s->be, 0, 0);
    return us;
}

/* Random latents in every block of kv (never time on zeros), 16M values at a time, shifted
 * so chunks differ. */
static void fill_latents(be_backend *be, be_kv *kv, int n_blocks) {
    size_t total = (size_t)n_blocks * kv->block_bytes / 2, chunk = (size_t)1 << 24;
    float *h = malloc((chunk + 8) * sizeof *h);
    for (size_t i = 0; i < chunk + 8; i++) h[i] = xs_uniform(1.0f);
    for (size_t off = 0; off < total; off += chunk) {
        size_t n = total - off < chunk ? total - off : chunk;
        if (be->ops->upload(be, kv->data, off, h + (off / chunk) % 8, n) != DUET_OK) break;
    }
    free(h);
}

/* The batch: B sequences of ctx positions, sequence b on blocks perm[b * nb ..] of n_blocks
 * scrambled ones, its nq rows at the last nq positions; set on the backend. */
static duet_status set_tail_batch(be_backend *be, int B, int nq, int ctx_len, int n_blocks) {
    int nb = (ctx_len + BS - 1) / BS, T = B * nq;
    int32_t *perm = malloc((size_t)n_blocks * sizeof *perm);
    int32_t *pos = malloc((size_t)T * sizeof *pos), *slot = malloc((size_t)T * sizeof *slot);
    int32_t *start = malloc((size_t)(B + 1) * sizeof *start), *ctx = malloc(B * sizeof *ctx);
    duet_status st = DUET_ERR_NO_MEMORY;
    if (perm && pos && slot && start && ctx) {
        for (int i = 0; i < n_blocks; i++) perm[i] = i;
        bt_shuffle(perm, n_blocks);
        for (int b = 0, t = 0; b < B; b++) {
            start[b] = t;
            ctx[b] = ctx_len;
            for (int i = 0; i < nq; i++, t++) {
                pos[t] = ctx_len - nq + i;
                slot[t] = perm[b * nb + pos[t] / BS] * BS + pos[t] % BS;
            }
        }
        start[B] = T;
        be_batch batch = {.n_tokens = T,
                          .n_seqs = B,
                          .token_pos = pos,
                          .token_slot = slot,
                          .seq_start = start,
                          .seq_ctx = ctx,
                          .block_table = perm,
                          .max_blocks = nb};
        st = be->ops->set_batch(be, &batch);
    }
    free(pos);
    free(slot);
    free(start);
    free(ctx);
    free(perm);
    return st;
}

/* A case's cache (enough layers that one replay reads >= 512 MB: the cache cannot answer from
 * L2), queries, kv_b and batch on the backend; s->kv NULL when even the cache failed. 0, or -1
 * with g_fail set (setup_free undoes what was made). */
static int case_setup(be_backend *be, bench_cfg c, setup *s, float **qh_p, float **wh_p) {
    const be_ops *o = be->ops;
    int nb = (c.ctx + BS - 1) / BS, T = c.B * c.nq, H = c.H;
    double set_bytes = (double)c.B * nb * BS * (L_ + R_) * 2;
    int layers = (int)ceil(512e6 / set_bytes);
    layers = layers < 1 ? 1 : layers > 64 ? 64 : layers;
    int n_blocks = c.B * nb + 1;
    *s = (setup){.be = be, .layers = layers, .T = T, .H = H, .scale = 1.0f / sqrtf(NOPE + R_)};
    *qh_p = *wh_p = NULL;
    if (o->kv_create(be, n_blocks, layers, BS, L_ + R_, o->act_dtype, &s->kv) != DUET_OK) {
        s->kv = NULL;
        g_fail = 1;
        return -1;
    }
    fill_latents(be, s->kv, n_blocks);
    size_t qn = (size_t)T * H * (NOPE + R_), wn = (size_t)H * (NOPE + V_) * L_;
    if (setup_q_kvb(s, qn, wn, 0.1f, qh_p, wh_p) != 0) return -1;
    if (set_tail_batch(be, c.B, c.nq, c.ctx, n_blocks) != DUET_OK) {
        g_fail = 1;
        return -1;
    }
    return 0;
}

/* One (variant, split) of a set-up case: the op once eagerly (its output into out_h, T * H *
 * V_ floats, which must be finite), then the three timings. r->ok on success. */
static void case_measure(setup *s, bench_cfg c, int variant, int split, int reps, bench_res *r,
                         float *out_h) {
    const be_ops *o = s->be->ops;
    *r = (bench_res){.c = c, .layers = s->layers};
    if (be_cuda_mla_variant(s->be, variant) != DUET_OK ||
        be_cuda_mla_tune(s->be, split, 0) != DUET_OK) {
        g_fail = 1;
        return;
    }
    run_layers(s);
    size_t on = (size_t)s->T * s->H * V_;
    if (o->sync(s->be) != DUET_OK || be_cuda_mla_last(s->be, &r->info) != DUET_OK ||
        o->download(s->be, out_h, s->out, 0, on) != DUET_OK) {
        g_fail = 1;
        goto done;
    }
    for (size_t i = 0; i < on; i++)
        if (!isfinite(out_h[i])) {
            fprintf(stderr, "bench_mla: %s H=%d B=%d ctx=%d, variant %d: non-finite output\n",
                    c.name, c.H, c.B, c.ctx, variant);
            g_fail = 1;
            goto done;
        }
    r->us_full = time_variant(s, split, 0, reps);
    r->us_attn = time_variant(
        s, split, BE_CUDA_MLA_SKIP_QABS | BE_CUDA_MLA_SKIP_COMBINE | BE_CUDA_MLA_SKIP_OUTABS, reps);
    r->us_comb = r->info.n_split > 1
                     ? time_variant(s, split, BE_CUDA_MLA_SKIP_QABS | BE_CUDA_MLA_SKIP_OUTABS, reps)
                     : r->us_attn;
    r->ok = r->us_full > 0 && r->us_attn > 0 && r->us_comb > 0;

    /* bytes: each cached latent once; q, q_lat and o_lat written and read, the split
     * partials written and read, kv_b read twice (W_uk, W_uv), out written */
    size_t qn = (size_t)s->T * s->H * (NOPE + R_), wn = (size_t)s->H * (NOPE + V_) * L_;
    r->kv_bytes = (double)c.B * c.ctx * (L_ + R_) * 2;
    double lat = (double)s->T * s->H * L_ * 2;
    double part = r->info.n_split > 1 ? 2.0 * c.B * r->info.n_split * r->info.n_groups *
                                            r->info.rows_per_block * (L_ + 1) * 4
                                      : 0;
    r->all_bytes =
        r->kv_bytes + (double)qn * 2 + 4 * lat + part + 2.0 * wn * 2 + (double)s->T * s->H * V_ * 2;
    /* scores over 576 dims and P V over 512, for every (row, head) and visible position */
    double vis = 0;
    for (int i = 0; i < c.nq; i++) vis += c.ctx - c.nq + i + 1;
    r->attn_flops = (double)c.B * c.H * vis * (L_ + R_ + L_) * 2;
done:
    be_cuda_mla_variant(s->be, BE_CUDA_MLA_DEFAULT_VARIANT);
    be_cuda_mla_tune(s->be, 0, 0);
}

static bench_res bench_one(be_backend *be, bench_cfg c, int reps) {
    bench_res r = {.c = c};
    setup s;
    float *qh = NULL, *wh = NULL;
    if (case_setup(be, c, &s, &qh, &wh) == 0) {
        float *oh = malloc((size_t)s.T * s.H * V_ * sizeof *oh);
        if (oh) case_measure(&s, c, 0, 0, reps, &r, oh);
        free(oh);
    }
    if (s.kv) setup_free(&s, qh, wh);
    return r;
}

/* ---- the decode variants, side by side ---- */

/* max |a - b| over n values, and the relative L2 of a - b against b */
static void diff_of(const float *a, const float *b, size_t n, double *max_abs, double *rel_l2) {
    double mx = 0, num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        mx = d > mx ? d : mx;
        num += d * d;
        den += (double)b[i] * b[i];
    }
    *max_abs = mx;
    *rel_l2 = sqrt(num / (den > 0 ? den : 1));
}

typedef struct sweep_best {
    int variant, split, n_split;
    double us_attn, us_comb, us_full, pct;
} sweep_best;

/* Every variant with the backend's split count and a few forced ones on one case; rows of the
 * table, and the fastest (attention with its combine: what the op pays for it) into *best. */
static void sweep_case(be_backend *be, bench_cfg c, int reps, double copy, sweep_best *best) {
    setup s;
    float *qh = NULL, *wh = NULL;
    best->variant = -1;
    if (case_setup(be, c, &s, &qh, &wh) != 0) {
        printf("%-8s %4d %4d %5d | setup failed\n", c.name, c.H, c.B, c.ctx);
        if (s.kv) setup_free(&s, qh, wh);
        return;
    }
    size_t on = (size_t)s.T * s.H * V_;
    float *ref = malloc(on * sizeof *ref), *got = malloc(on * sizeof *got);
    /* forced splits around what the backend picks: 2 to 4 at batch 64+, 8 at batch 1 x 1k */
    const int forced_big[] = {1, 2, 4, 8}, forced_one[] = {8, 16, 64};
    const int *forced = c.B >= 64 ? forced_big : forced_one;
    const int n_forced = c.B >= 64 ? 4 : 3;
    /* (kernel variant, split count) pairs already timed: a variant that runs another's
     * kernel at the same split is that one's row */
    int seen_k[BE_CUDA_MLA_VARIANTS * 8], seen_s[BE_CUDA_MLA_VARIANTS * 8], n_seen = 0;
    bool have_ref = false; /* variant 0 with the backend's split ran */
    for (int v = 0; v < BE_CUDA_MLA_VARIANTS && ref && got; v++) {
        for (int f = -1; f < n_forced; f++) {
            const int split = f < 0 ? 0 : forced[f];
            bench_res r;
            case_measure(&s, c, v, split, reps, &r, v == 0 && f < 0 ? ref : got);
            if (v == 0 && f < 0) have_ref = r.ok;
            if (!r.ok) {
                printf("%-8s %4d %4d %5d | v%d %-5s | failed\n", c.name, c.H, c.B, c.ctx, v,
                       split ? "forced" : "auto");
                continue;
            }
            int dup = -1;
            for (int i = 0; i < n_seen; i++)
                if (seen_k[i] == r.info.kernel_variant && seen_s[i] == r.info.n_split) dup = i;
            if (dup >= 0 && r.info.kernel_variant != v) continue; /* v runs another's kernel */
            if (n_seen < BE_CUDA_MLA_VARIANTS * 8) {
                seen_k[n_seen] = r.info.kernel_variant;
                seen_s[n_seen++] = r.info.n_split;
            }
            double mx = 0, rel = 0;
            if (!(v == 0 && f < 0)) {
                if (have_ref)
                    diff_of(got, ref, on, &mx, &rel);
                else
                    mx = rel = NAN; /* nothing to compare with: printed as nan */
            }
            const bool wrong = rel > 1e-2; /* false for nan: no reference, said so below */
            if (wrong) g_fail = 1;
            double attn_gbs = r.kv_bytes / (r.us_attn * 1e-6) / 1e9;
            double full_gbs = r.kv_bytes / (r.us_full * 1e-6) / 1e9;
            double pct = copy > 0 ? 100 * attn_gbs / copy : 0;
            printf("%-8s %4d %4d %5d | v%d k%d %3d %d %d | %-6s %3d | %8.1f %8.1f %8.1f | %9.0f "
                   "%5.1f | %9.0f %5.1f | %8.2e %8.2e %s\n",
                   c.name, c.H, c.B, c.ctx, v, r.info.kernel_variant, r.info.tile, r.info.stages,
                   r.info.blocks_per_sm, split ? "forced" : "auto", r.info.n_split, r.us_attn,
                   r.us_comb, r.us_full, attn_gbs, pct, full_gbs,
                   copy > 0 ? 100 * full_gbs / copy : 0, mx, rel,
                   wrong        ? "WRONG"
                   : isnan(rel) ? "unchecked"
                                : "ok");
            fflush(stdout);
            if (!wrong && (best->variant < 0 || r.us_comb < best->us_comb)) {
                best->variant = v;
                best->split = split;
                best->n_split = r.info.n_split;
                best->us_attn = r.us_attn;
                best->us_comb = r.us_comb;
                best->us_full = r.us_full;
                best->pct = pct;
            }
        }
    }
    free(ref);
    free(got);
    setup_free(&s, qh, wh);
}

static void sweep_section(be_backend *be, int reps, double copy) {
    bench_cfg cfgs[] = {
        {"V2-Lite", 16, 1, 1024, 1},   {"V2-Lite", 16, 64, 1024, 1}, {"V2-Lite", 16, 64, 4096, 1},
        {"V2-Lite", 16, 128, 4096, 1}, {"V3", 128, 64, 4096, 1},
    };
    const int n = (int)(sizeof cfgs / sizeof cfgs[0]);
    sweep_best best[8];
    printf(
        "\ndecode variants (docs/kernels/mla.md), per op (one layer), median of %d graph "
        "replays; v = variant asked for, k = the variant whose kernel ran (k < v: v does not fit "
        "these rows and runs k's; rows identical to k's are left out), tile positions, "
        "stages, blocks per SM; diff = the output against v0 auto (max abs, rel L2)\n",
        reps);
    printf("%-8s %4s %4s %5s | %-2s %-2s %3s %s %s | %-6s %3s | %8s %8s %8s | %9s %5s | %9s %5s | "
           "%8s %8s\n",
           "model", "H", "B", "ctx", "v", "k", "til", "s", "o", "split", "n", "attn_us", "+comb_us",
           "full_us", "attn_GB/s", "%copy", "full_GB/s", "%copy", "max_abs", "rel_l2");
    for (int i = 0; i < n; i++) {
        sweep_case(be, cfgs[i], reps, copy, &best[i]);
        fprintf(stderr, "swept %s H=%d B=%d ctx=%d\n", cfgs[i].name, cfgs[i].H, cfgs[i].B,
                cfgs[i].ctx);
    }
    printf("best per case (attention + combine; %%copy of the kernel alone):");
    for (int i = 0; i < n; i++) {
        if (best[i].variant < 0) {
            printf(" | %s H%d %dx%d: none", cfgs[i].name, cfgs[i].H, cfgs[i].B, cfgs[i].ctx);
            continue;
        }
        printf(" | %s H%d %dx%d: v%d %s %d splits, attn %.1f us (%.1f%% copy), +comb %.1f us, "
               "full %.1f us",
               cfgs[i].name, cfgs[i].H, cfgs[i].B, cfgs[i].ctx, best[i].variant,
               best[i].split ? "forced" : "auto", best[i].n_split, best[i].us_attn, best[i].pct,
               best[i].us_comb, best[i].us_full);
    }
    printf("\n");
}

/* ---- prompt chunks ---- */

typedef struct prefill_cfg {
    const char *name;
    int H, B, nq, ctx; /* B sequences, each a chunk of nq tokens ending its ctx positions */
} prefill_cfg;

/* Median milliseconds of `calls` eager calls of fn(arg) on the backend's stream. */
static double time_eager(be_backend *be, void (*fn)(void *), void *arg, int reps) {
    cudaStream_t st = (cudaStream_t)be_cuda_stream(be);
    cudaEvent_t e0, e1;
    cuda_ok(cudaEventCreate(&e0), "cudaEventCreate");
    cuda_ok(cudaEventCreate(&e1), "cudaEventCreate");
    float *ms = malloc((size_t)reps * sizeof *ms);
    fn(arg); /* warm-up: scratch grows here */
    for (int i = 0; i < reps; i++) {
        cuda_ok(cudaEventRecord(e0, st), "cudaEventRecord");
        fn(arg);
        cuda_ok(cudaEventRecord(e1, st), "cudaEventRecord");
        cuda_ok(cudaEventSynchronize(e1), "cudaEventSynchronize");
        cuda_ok(cudaEventElapsedTime(&ms[i], e0, e1), "cudaEventElapsedTime");
    }
    double r = be->ops->sync(be) == DUET_OK && !g_fail ? median(ms, reps) : -1;
    free(ms);
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return r;
}

static void run_one_layer(void *arg) {
    setup *s = arg;
    s->be->ops->mla_attention(s->be, s->out, s->q, s->kv, 0, s->kv_b, s->H, NOPE, R_, V_, s->scale);
}

typedef struct gemm_arg {
    be_backend *be;
    void *y, *x;
    be_weight *w;
    int n;
} gemm_arg;

static void run_gemm(void *arg) {
    gemm_arg *g = arg;
    g->be->ops->linear(g->be, g->y, g->x, g->n, g->n, g->w);
}

/* Dense bf16 GEMM TFLOP/s of the backend's linear op, [n, n] x [n, n]^T. */
static double dense_tflops(be_backend *be, int n, int reps) {
    const be_ops *o = be->ops;
    size_t nn = (size_t)n * n;
    float *h = malloc(nn * sizeof *h);
    for (size_t i = 0; i < nn; i++) h[i] = xs_uniform(1.0f);
    gemm_arg g = {.be = be, .n = n};
    g.x = o->buf_alloc(be, nn);
    g.y = o->buf_alloc(be, nn);
    double r = -1;
    if (g.x && g.y && o->upload(be, g.x, 0, h, nn) == DUET_OK &&
        o->weight_create(be, h, n, n, false, &g.w) == DUET_OK) {
        double ms = time_eager(be, run_gemm, &g, reps);
        if (ms > 0) r = 2.0 * n * (double)nn / (ms * 1e-3) / 1e12;
        o->weight_destroy(be, g.w);
    }
    o->buf_free(be, g.x);
    o->buf_free(be, g.y);
    free(h);
    return r;
}

/* One prompt-chunk configuration: prints its row. */
static void bench_prefill(be_backend *be, prefill_cfg c, int reps, double dense) {
    const be_ops *o = be->ops;
    int nb = (c.ctx + BS - 1) / BS, T = c.B * c.nq, H = c.H, n_blocks = c.B * nb + 1;
    setup s = {.be = be, .layers = 1, .T = T, .H = H, .scale = 1.0f / sqrtf(NOPE + R_)};
    float *qh = NULL, *wh = NULL;
    if (o->kv_create(be, n_blocks, 1, BS, L_ + R_, o->act_dtype, &s.kv) != DUET_OK) {
        g_fail = 1;
        return;
    }
    fill_latents(be, s.kv, n_blocks);
    size_t qn = (size_t)T * H * (NOPE + R_), wn = (size_t)H * (NOPE + V_) * L_;
    if (setup_q_kvb(&s, qn, wn, 0.05f, &qh, &wh) != 0) goto done;
    if (set_tail_batch(be, c.B, c.nq, c.ctx, n_blocks) != DUET_OK) {
        g_fail = 1;
        goto done;
    }
    be_cuda_mla_info info = {0};
    run_one_layer(&s);
    if (o->sync(be) != DUET_OK || be_cuda_mla_last(be, &info) != DUET_OK) {
        g_fail = 1;
        goto done;
    }
    double full = time_eager(be, run_one_layer, &s, reps);
    /* the CUDA-core kernel it replaced, where it takes less than a few seconds */
    double cc = -1;
    if ((double)H * c.nq * c.ctx <= 16.0 * 4096 * 4096) {
        be_cuda_mla_tune(be, 0, BE_CUDA_MLA_PREFILL_CC);
        cc = time_eager(be, run_one_layer, &s, 3);
    }
    be_cuda_mla_tune(be, 0, BE_CUDA_MLA_SKIP_PREFILL);
    double expand = time_eager(be, run_one_layer, &s, reps);
    be_cuda_mla_tune(be, 0, BE_CUDA_MLA_SKIP_EXPAND);
    double attn = time_eager(be, run_one_layer, &s, reps);
    be_cuda_mla_tune(be, 0, 0);
    /* causal: query i of a chunk sees ctx - nq + i + 1 positions; QK^T over 192 dims, PV 128 */
    double vis = 0;
    for (int i = 0; i < c.nq; i++) vis += c.ctx - c.nq + i + 1;
    double flops = (double)c.B * H * vis * 2.0 * (NOPE + R_ + V_);
    double exp_flops = 2.0 * c.B * c.ctx * (double)L_ * H * (NOPE + V_);
    double tf = attn > 0 ? flops / (attn * 1e-3) / 1e12 : 0;
    printf("%-8s %4d %3d %6d %6d | %-3s %5d | %9.3f %9.3f %9.3f | %8.1f %6.1f%% | %8.1f | %9.3f\n",
           c.name, H, c.B, c.nq, c.ctx, info.prefill_tc ? "tc" : "cc", info.prefill_blocks, full,
           expand, attn, tf, dense > 0 ? 100 * tf / dense : 0,
           expand > 0 ? exp_flops / (expand * 1e-3) / 1e12 : 0, cc);
    fflush(stdout);
done:
    setup_free(&s, qh, wh);
}

static void prefill_section(be_backend *be, int reps) {
    double dense = dense_tflops(be, 8192, reps);
    printf("\nprompt chunks (expanded form), one layer, median of %d eager calls; dense bf16 GEMM "
           "(linear op, 8192^3): %.1f TFLOP/s\n",
           reps, dense);
    printf("%-8s %4s %3s %6s %6s | %-3s %5s | %9s %9s %9s | %8s %7s | %8s | %9s\n", "model", "H",
           "B", "chunk", "ctx", "krn", "blks", "full_ms", "expand_ms", "attn_ms", "attn_TF",
           "%dense", "exp_TF", "old_ms");
    prefill_cfg cfgs[] = {
        {"V2-Lite", 16, 1, 1024, 1024}, {"V2-Lite", 16, 8, 1024, 1024},
        {"V2-Lite", 16, 1, 4096, 4096}, {"V2-Lite", 16, 1, 8192, 8192},
        {"V2-Lite", 16, 1, 2048, 8192}, {"V2-Lite", 16, 1, 16384, 16384},
        {"V3", 128, 1, 4096, 4096},     {"V3", 128, 1, 8192, 8192},
        {"V3 TP8", 16, 1, 8192, 8192},
    };
    for (size_t i = 0; i < sizeof cfgs / sizeof cfgs[0]; i++)
        bench_prefill(be, cfgs[i], reps, dense);
    printf("(attn_TF: causal attention FLOPs, 2 x H x (192 + 128) per visible (query, position) "
           "pair, over attn_ms, the prefill kernel alone; %%dense: of the GEMM above; exp_TF: the "
           "expansion's GEMM FLOPs over expand_ms, gather included; old_ms: the whole op with the "
           "CUDA-core kernel it replaced, -1 where not run)\n");
}

int main(int argc, char **argv) {
    int reps = argc > 1 ? atoi(argv[1]) : 30;
    if (reps < 3) reps = 3;
    const char *only = argc > 2 ? argv[2] : NULL;
    if (only && strcmp(only, "decode") && strcmp(only, "prefill") && strcmp(only, "sweep")) {
        fprintf(stderr, "usage: bench_mla [replays] [decode|prefill|sweep]\n");
        return 2;
    }
    if (be_cuda_device_count() < 1) {
        fprintf(stderr, "no CUDA device: skipped\n");
        return 77;
    }
    double copy = copy_bandwidth();
    printf("device copy (4 GiB, read + write): %.0f GB/s\n", copy);
    be_backend *be = NULL;
    if (be_cuda_create(0, DT_BF16, &be) != DUET_OK) return 1;
    if (only && !strcmp(only, "prefill")) {
        prefill_section(be, reps);
        be_destroy(be);
        return g_fail;
    }
    if (only && !strcmp(only, "sweep")) {
        sweep_section(be, reps, copy);
        be_destroy(be);
        if (g_fail) printf("FAIL: a variant failed or its output differs from variant 0's\n");
        return g_fail;
    }
    bench_cfg cfgs[] = {
        {"V2-Lite", 16, 1, 1024, 1},  {"V2-Lite", 16, 1, 4096, 1},   {"V2-Lite", 16, 64, 1024, 1},
        {"V2-Lite", 16, 64, 4096, 1}, {"V2-Lite", 16, 128, 4096, 1}, {"V2-Lite", 16, 64, 4096, 3},
        {"V3", 128, 1, 4096, 1},      {"V3", 128, 64, 1024, 1},      {"V3", 128, 64, 4096, 1},
        {"V3 TP8", 16, 64, 4096, 1},
    };
    int n = (int)(sizeof cfgs / sizeof cfgs[0]);
    bench_res res[16];
    for (int i = 0; i < n; i++) {
        res[i] = bench_one(be, cfgs[i], reps);
        fprintf(stderr, "done %s H=%d B=%d ctx=%d q=%d\n", cfgs[i].name, cfgs[i].H, cfgs[i].B,
                cfgs[i].ctx, cfgs[i].nq);
    }
    printf("\nper op (one layer), median of %d graph replays; attn = the attention kernel alone, "
           "+comb = with the split combine, full = the whole op (absorptions included)\n",
           reps);
    printf("%-8s %4s %4s %5s %2s | %3s %3s %2s | %8s %8s %8s | %7s | %9s %5s | %9s %5s | "
           "%7s\n",
           "model", "H", "B", "ctx", "q", "spl", "row", "gr", "attn_us", "+comb_us", "full_us",
           "KV_MB", "attn_GB/s", "%copy", "full_GB/s", "%copy", "attn_TF");
    for (int i = 0; i < n; i++) {
        bench_res *r = &res[i];
        if (!r->ok) {
            printf("%-8s %4d %4d %5d %2d | failed\n", r->c.name, r->c.H, r->c.B, r->c.ctx, r->c.nq);
            continue;
        }
        double attn_gbs = r->kv_bytes / (r->us_attn * 1e-6) / 1e9;
        double full_gbs = r->kv_bytes / (r->us_full * 1e-6) / 1e9;
        printf("%-8s %4d %4d %5d %2d | %3d %3d %2d | %8.1f %8.1f %8.1f | %7.1f | %9.0f %5.1f | "
               "%9.0f %5.1f | %7.1f\n",
               r->c.name, r->c.H, r->c.B, r->c.ctx, r->c.nq, r->info.n_split,
               r->info.rows_per_block, r->info.n_groups, r->us_attn, r->us_comb, r->us_full,
               r->kv_bytes / 1e6, attn_gbs, copy > 0 ? 100 * attn_gbs / copy : 0, full_gbs,
               copy > 0 ? 100 * full_gbs / copy : 0, r->attn_flops / (r->us_attn * 1e-6) / 1e12);
    }
    printf("(GB/s count the cached latents only; all bytes of the full op, q/q_lat/o_lat/partials/"
           "kv_b/out included, add:");
    for (int i = 0; i < n; i++)
        if (res[i].ok) printf(" %.0f%%", 100 * (res[i].all_bytes / res[i].kv_bytes - 1));
    printf(")\n");
    int tc = 1;
    for (int i = 0; i < n; i++) tc &= res[i].ok && res[i].info.tensor_cores;
    if (!only) prefill_section(be, reps < 10 ? reps : 10);
    be_destroy(be);
    if (!tc) printf("FAIL: a configuration failed or did not run the tensor-core kernel\n");
    return g_fail || !tc ? 1 : 0;
}
