/* The loader's FP8-resident path (weights.c with be_ops.weight_create_fp8) on the CPU: a CPU
 * backend whose table gains a weight_create_fp8 that checks the arguments, dequantizes the
 * bytes with the split block grids as backend.h states them and counts what it was given.
 * Loading the golden tiny-v3-fp8 checkpoint through it, whole and as both ranks of TP 2 (where
 * some slices do not start on a 128 boundary and must be dequantized by the loader instead),
 * every linear layer must compute bit for bit what the plain CPU backend loads, and the bytes
 * created must be what the memory plan counts for the FP8 format. Dummy weights of the same
 * config go FP8 too: e4m3 of the dummy values, within e4m3's rounding of them. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "model/backends/registry.h"
#include "model/config.h"
#include "model/memplan.h"
#include "model/shard.h"
#include "model/weights.h"

static const be_ops *g_cpu; /* the CPU backend's own table */
static be_ops g_ops;        /* the same with weight_create_fp8 */
static long long g_fp8, g_bytes, g_bad;
static double g_tol; /* 0: bit for bit; else relative L2 of y allowed (dummy weights) */

static duet_status t_weight_create(be_backend *be, const float *w, int n_out, int n_in,
                                   bool keep_f32, be_weight **w_p) {
    /* what the CUDA backend keeps: float32 router gates, bf16 for the rest */
    g_bytes += (long long)n_out * n_in * (keep_f32 ? 4 : 2);
    return g_cpu->weight_create(be, w, n_out, n_in, keep_f32, w_p);
}

static duet_status t_vec_create(be_backend *be, const float *v, int n, void **dev_p) {
    g_bytes += 4LL * n;
    return g_cpu->vec_create(be, v, n, dev_p);
}

static duet_status t_weight_create_fp8(be_backend *be, const uint8_t *q, const float *scales,
                                       int n_out, int n_in, int split, be_weight **w_p) {
    if (n_in % 16 || split <= 0 || split > n_out) {
        g_bad++;
        return DUET_ERR_INVALID;
    }
    int cb = (n_in + 127) / 128, rb0 = (split + 127) / 128;
    int rb = rb0 + (n_out - split + 127) / 128;
    float *w = malloc((size_t)n_out * n_in * sizeof(float));
    for (int r = 0; r < n_out; r++) {
        int br = r < split ? r / 128 : rb0 + (r - split) / 128;
        for (int c = 0; c < n_in; c++)
            w[(size_t)r * n_in + c] =
                dt_e4m3_to_f32(q[(size_t)r * n_in + c]) * scales[(size_t)br * cb + c / 128];
    }
    g_fp8++;
    g_bytes += (long long)n_out * n_in + 4LL * rb * cb;
    duet_status st = g_cpu->weight_create(be, w, n_out, n_in, false, w_p);
    free(w);
    return st;
}

/* y = x @ W^T on each backend for a random x [3, n_in]: identical, bit for bit */
static void same_linear(be_backend *a, be_backend *b, const be_weight *wa, const be_weight *wb,
                        int n_out, int n_in, const char *what, int layer) {
    if (!wa || !wb) {
        CHECK_MSG(!wa && !wb, "%s of layer %d: loaded on one side only", what, layer);
        return;
    }
    int T = 3;
    float *x = malloc((size_t)T * n_in * sizeof(float));
    for (int i = 0; i < T * n_in; i++) x[i] = sinf(0.37f * (float)i + (float)layer);
    float *y[2];
    be_backend *be[2] = {a, b};
    const be_weight *w[2] = {wa, wb};
    for (int k = 0; k < 2; k++) {
        void *dx = be[k]->ops->buf_alloc(be[k], (size_t)T * n_in);
        void *dy = be[k]->ops->buf_alloc(be[k], (size_t)T * n_out);
        be[k]->ops->upload(be[k], dx, 0, x, (size_t)T * n_in);
        be[k]->ops->linear(be[k], dy, dx, n_in, T, w[k]);
        y[k] = malloc((size_t)T * n_out * sizeof(float));
        CHECK(be[k]->ops->download(be[k], y[k], dy, 0, (size_t)T * n_out) == DUET_OK);
        be[k]->ops->buf_free(be[k], dx);
        be[k]->ops->buf_free(be[k], dy);
    }
    if (g_tol == 0) {
        CHECK_MSG(memcmp(y[0], y[1], (size_t)T * n_out * sizeof(float)) == 0,
                  "%s of layer %d: the FP8-loaded weight computes something else", what, layer);
    } else {
        double num = 0, den = 0;
        for (int i = 0; i < T * n_out; i++) {
            double d = (double)y[1][i] - y[0][i];
            num += d * d;
            den += (double)y[0][i] * y[0][i];
        }
        double err = den > 0 ? sqrt(num / den) : 1.0;
        CHECK_MSG(err < g_tol && err > 0, "%s of layer %d: dummy FP8 rel L2 %.3g (want (0, %.3g))",
                  what, layer, err, g_tol);
    }
    free(x);
    free(y[0]);
    free(y[1]);
}

static void same_ffn(be_backend *a, be_backend *b, const be_ffn *fa, const be_ffn *fb, int D,
                     const char *what, int layer) {
    CHECK_EQ_INT(fa->n_inter, fb->n_inter);
    same_linear(a, b, fa->gate_up, fb->gate_up, 2 * fa->n_inter, D, what, layer);
    same_linear(a, b, fa->down, fb->down, D, fa->n_inter, what, layer);
}

/* ep: routed experts placed whole over the tp ranks (EP 2 with TP 2) */
static void check_layout(const char *dir, const cfg_model *c, int tp, int rank, bool ep,
                         mdl_weights_source src) {
    mdl_shard sh = {
        .tp_rank = rank, .tp_size = tp, .ep_rank = ep ? rank : 0, .ep_size = ep ? tp : 1};
    mdl_plan plan;
    if (mdl_shard_plan(c, &sh, &plan) != DUET_OK) {
        CHECK_MSG(0, "no shard plan for tp %d", tp);
        return;
    }
    be_backend *ref = NULL, *f8 = NULL;
    CHECK(be_create("cpu", 0, &ref) == DUET_OK);
    CHECK(be_create("cpu", 0, &f8) == DUET_OK);
    if (!ref || !f8) return;
    g_cpu = f8->ops;
    g_ops = *f8->ops;
    g_ops.weight_create = t_weight_create;
    g_ops.vec_create = t_vec_create;
    g_ops.weight_create_fp8 = t_weight_create_fp8;
    /* the loader offers FP8 to backends with bf16 activations (what it reads act_dtype for:
     * that and the bytes it logs); the CPU ops themselves keep computing in float32 */
    g_ops.act_dtype = DT_BF16;
    f8->ops = &g_ops;
    g_fp8 = g_bytes = g_bad = 0;

    mdl_weights *wr = NULL, *wf = NULL;
    /* dummy values are uniform: e4m3 keeps each within 1/16 of itself (3 mantissa bits) */
    g_tol = src == MDL_WEIGHTS_DUMMY ? 0.05 : 0.0;
    CHECK(mdl_weights_load(dir, c, &plan, ref, src, 5, &wr) == DUET_OK);
    CHECK(mdl_weights_load(dir, c, &plan, f8, src, 5, &wf) == DUET_OK);
    if (wr && wf) {
        int D = c->hidden_size, L = c->kv_lora_rank, R = c->qk_rope_head_dim;
        int Hl = plan.n_heads_local, qk = cfg_qk_head_dim(c);
        int nv = c->qk_nope_head_dim + c->v_head_dim;
        for (int l = 0; l < c->num_hidden_layers; l++) {
            const mdl_layer *a = &wr->layers[l], *b = &wf->layers[l];
            same_linear(ref, f8, a->q_a, b->q_a, c->q_lora_rank, D, "q_a", l);
            same_linear(ref, f8, a->q_b, b->q_b, Hl * qk, c->q_lora_rank, "q_b", l);
            same_linear(ref, f8, a->kv_a, b->kv_a, L + R, D, "kv_a", l);
            double tol = g_tol;
            g_tol = 0; /* kv_b is never FP8: the same float values either way */
            same_linear(ref, f8, a->kv_b, b->kv_b, Hl * nv, L, "kv_b", l);
            g_tol = tol;
            same_linear(ref, f8, a->o, b->o, D, Hl * c->v_head_dim, "o", l);
            if (!a->moe) {
                same_ffn(ref, f8, &a->dense, &b->dense, D, "dense", l);
                continue;
            }
            for (int e = 0; e < plan.n_local_experts; e++)
                same_ffn(ref, f8, &a->experts[e], &b->experts[e], D, "expert", l);
            if (a->shared.gate_up) same_ffn(ref, f8, &a->shared, &b->shared, D, "shared", l);
        }
    }
    /* the memory plan's FP8 count is what was created */
    mplan_weights mw;
    CHECK(mplan_weights_count(c, &plan, MPLAN_WEIGHTS_FP8, DT_BF16, &mw) == DUET_OK);
    CHECK_EQ_INT(g_bytes, mw.total);
    CHECK_EQ_INT(g_bad, 0);
    printf("%s tp %d%s rank %d: %lld FP8 weights, %lld bytes (plan %lld)\n",
           src == MDL_WEIGHTS_DUMMY ? "dummy" : "checkpoint", tp, ep ? " ep" : "", rank, g_fp8,
           g_bytes, mw.total);
    /* whole layers go FP8 (kv_b never: the MLA kernels read it as bf16); TP 2's rank 1
     * slices start mid-block for q_b, o and the MLPs, which stay dequantized; with EP its
     * routed experts are whole, but its shared expert's slice is not, and a layer's experts
     * stay FP8 only all together */
    int moe_layers = 0;
    for (int l = 0; l < c->num_hidden_layers; l++) moe_layers += cfg_layer_is_moe(c, l);
    long long whole = 4LL * c->num_hidden_layers + 2LL * (c->num_hidden_layers - moe_layers) +
                      2LL * moe_layers * (plan.n_local_experts + (c->n_shared_experts > 0));
    if (rank == 0) CHECK_EQ_INT(g_fp8, whole);
    if (rank == 1) CHECK_EQ_INT(g_fp8, 2LL * c->num_hidden_layers); /* q_a, kv_a */
    mdl_weights_destroy(wr);
    mdl_weights_destroy(wf);
    be_destroy(ref);
    f8->ops = g_cpu;
    be_destroy(f8);
}

/* The CPU backend's bf16 emulation of the FP8 prefill GEMMs (DUET_FP8_PREFILL_ROWS, set to 4
 * by main): loaded through it, an eligible FP8 layer over T >= 4 rows computes x quantized per
 * row and 128 columns to e4m3 times the unrounded weight, rounded to bf16: here x is quantized
 * by hand and multiplied on the plain CPU backend (whose weights are the same unrounded
 * values), bit for bit; T < 4 rows and ineligible layers keep the bf16 path, which differs. */
static float bf16r(float v) {
    return dt_bf16_to_f32(dt_f32_to_bf16(v));
}

static void linear_of(be_backend *be, const be_weight *w, const float *x, int T, int n_in,
                      int n_out, float *y) {
    void *dx = be->ops->buf_alloc(be, (size_t)T * n_in),
         *dy = be->ops->buf_alloc(be, (size_t)T * n_out);
    be->ops->upload(be, dx, 0, x, (size_t)T * n_in);
    be->ops->linear(be, dy, dx, n_in, T, w);
    CHECK(be->ops->download(be, y, dy, 0, (size_t)T * n_out) == DUET_OK);
    be->ops->buf_free(be, dx);
    be->ops->buf_free(be, dy);
}

static void check_emulation(const char *dir, const cfg_model *c) {
    mdl_shard sh = {.tp_rank = 0, .tp_size = 1, .ep_rank = 0, .ep_size = 1};
    mdl_plan plan;
    CHECK(mdl_shard_plan(c, &sh, &plan) == DUET_OK);
    be_backend *ref = NULL, *emu = NULL;
    CHECK(be_create("cpu", 0, &ref) == DUET_OK);
    CHECK(be_create_dtype("cpu", 0, DT_BF16, &emu) == DUET_OK);
    mdl_weights *wr = NULL, *we = NULL;
    CHECK(mdl_weights_load(dir, c, &plan, ref, MDL_WEIGHTS_CHECKPOINT, 0, &wr) == DUET_OK);
    CHECK(mdl_weights_load(dir, c, &plan, emu, MDL_WEIGHTS_CHECKPOINT, 0, &we) == DUET_OK);
    if (!wr || !we) return;
    int D = c->hidden_size, L = c->kv_lora_rank, R = c->qk_rope_head_dim;
    /* kv_a_proj_with_mqa of layer 1: [L + R, D], D a multiple of 128, rows a multiple of 16 */
    const be_weight *a = wr->layers[1].kv_a, *b = we->layers[1].kv_a;
    int n_out = L + R, T = 5;
    CHECK(be_fp8_prefill_eligible(n_out, D, n_out));
    float *x = malloc((size_t)T * D * sizeof(float)), *xq = malloc((size_t)T * D * sizeof(float));
    float *y0 = malloc((size_t)T * n_out * sizeof(float)),
          *y1 = malloc((size_t)T * n_out * sizeof(float));
    for (int i = 0; i < T * D; i++) x[i] = bf16r(sinf(0.71f * (float)i) * (1.0f + (float)(i % 7)));
    for (int t = 0; t < T; t++)
        for (int k0 = 0; k0 < D; k0 += 128) {
            float amax = 0;
            for (int k = 0; k < 128; k++) amax = fmaxf(amax, fabsf(x[t * D + k0 + k]));
            float sc = amax > 0 ? amax / 448.0f : 1.0f;
            for (int k = 0; k < 128; k++)
                xq[t * D + k0 + k] = dt_e4m3_to_f32(dt_f32_to_e4m3(x[t * D + k0 + k] / sc)) * sc;
        }
    linear_of(ref, a, xq, T, D, n_out, y0);
    linear_of(emu, b, x, T, D, n_out, y1);
    int same = 0;
    for (int i = 0; i < T * n_out; i++) same += bf16r(y0[i]) == y1[i];
    CHECK_EQ_INT(same, T * n_out);
    /* below the row count: the bf16 path (weights rounded, x not quantized), not the above */
    linear_of(ref, a, xq, 3, D, n_out, y0);
    linear_of(emu, b, x, 3, D, n_out, y1);
    same = 0;
    for (int i = 0; i < 3 * n_out; i++) same += bf16r(y0[i]) == y1[i];
    CHECK(same < 3 * n_out);
    printf("emulated FP8 prefill GEMM: kv_a [%d, %d], %d rows bit for bit\n", n_out, D, T);
    free(x);
    free(xq);
    free(y0);
    free(y1);
    mdl_weights_destroy(wr);
    mdl_weights_destroy(we);
    be_destroy(ref);
    be_destroy(emu);
}

int main(void) {
    setenv("DUET_FP8_PREFILL_ROWS", "4", 1); /* before anything reads it */
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/tiny-v3-fp8/model", GOLDEN_DIR);
    cfg_model c;
    if (cfg_load(dir, &c) != DUET_OK) {
        fprintf(stderr, "no golden tiny-v3-fp8 at %s: skipped\n", dir);
        return 77;
    }
    CHECK(c.fp8 && c.fp8_block[0] == 128 && c.fp8_block[1] == 128);
    check_layout(dir, &c, 1, 0, false, MDL_WEIGHTS_CHECKPOINT);
    check_layout(dir, &c, 2, 0, false, MDL_WEIGHTS_CHECKPOINT);
    check_layout(dir, &c, 2, 1, false, MDL_WEIGHTS_CHECKPOINT);
    check_layout(dir, &c, 2, 0, true, MDL_WEIGHTS_CHECKPOINT);
    check_layout(dir, &c, 2, 1, true, MDL_WEIGHTS_CHECKPOINT);
    check_layout(dir, &c, 1, 0, false, MDL_WEIGHTS_DUMMY);
    check_emulation(dir, &c);
    CHECK_DONE();
}
