/* Dummy weights (--load-format dummy): the rule of model/dummy_rule.h and the loader's use of
 * be_ops.weight_create_dummy, on the CPU.
 *  - The rule gives the values the loader made before it moved into the header: a few
 *    literal values computed with the old formula, and the old formula (kept here) against
 *    the rule at many random points; its bf16 and e4m3 roundings against base/dtype.h's and
 *    the loader's old binary search over the e4m3 codes.
 *  - The plain CPU loader's embedding holds the old formula's values.
 *  - A CPU backend whose table gains weight_create_dummy / vec_create_dummy (made here from
 *    the rule and the slices the loader passes) loads, whole and as ranks of TP 2 and EP 2,
 *    bf16 and FP8 configs and the MTP module, weights that compute bit for bit what the host
 *    path loads, through the op for every tensor, with the bytes the memory plan counts. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/hash.h"
#include "check.h"
#include "model/backends/registry.h"
#include "model/config.h"
#include "model/dummy_rule.h"
#include "model/memplan.h"
#include "model/shard.h"
#include "model/weights.h"

/* ---- the rule against the loader's old code ---- */

/* weights.c's dummy_fill before the rule moved into model/dummy_rule.h, one value */
static float old_value(const char *name, uint64_t seed, int full_in, int row, int col) {
    size_t len = strlen(name);
    int is_norm = len > 11 && strstr(name, "norm.weight") != NULL;
    int is_bias = strstr(name, "e_score_correction_bias") != NULL;
    uint64_t h = hash_fnv1a_str(name) ^ hash_mix64(seed + 0x9e3779b97f4a7c15ull);
    const float a = 0.02f * 1.7320508f;
    if (is_norm) return 1.0f;
    if (is_bias) return 0.0f;
    uint64_t k = hash_mix64(h + (uint64_t)row * (uint64_t)(full_in ? full_in : 1) + (uint64_t)col);
    return ((float)(k >> 40) / 16777216.0f * 2.0f - 1.0f) * a;
}

/* weights.c's e4m3_quant before: a binary search over the codes */
static uint8_t old_e4m3(float f) {
    static float tab[127];
    static bool ready;
    if (!ready) {
        for (int i = 0; i < 127; i++) tab[i] = dt_e4m3_to_f32((uint8_t)i);
        ready = true;
    }
    uint8_t sign = signbit(f) ? 0x80 : 0;
    float a = fabsf(f);
    if (!(a < 448.0f)) return sign | 0x7e;
    int lo = 0, hi = 126;
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (tab[mid] <= a)
            lo = mid;
        else
            hi = mid;
    }
    float dl = a - tab[lo], dh = tab[hi] - a;
    int c = dl < dh || (dl == dh && (lo & 1) == 0) ? lo : hi;
    return sign | (uint8_t)c;
}

static uint32_t bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float of_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint64_t g_rng = 0x1234567887654321ull;
static uint64_t next64(void) {
    g_rng += 0x9e3779b97f4a7c15ull;
    return hash_mix64(g_rng);
}

static void test_rule(void) {
    /* printed by the loader's code before this change (old_value, compiled alone) */
    static const struct {
        const char *name;
        uint64_t seed;
        int full_in, row, col;
        uint32_t bits;
    } gold[] = {
        {"model.embed_tokens.weight", 0, 7168, 0, 0, 0xbc8f539eu},
        {"model.embed_tokens.weight", 0, 7168, 129279, 7167, 0x396a78d8u},
        {"model.layers.3.mlp.experts.17.gate_proj.weight", 1, 7168, 2047, 4000, 0xbc869b82u},
        {"model.layers.0.self_attn.q_b_proj.weight", 42, 1536, 12345, 77, 0x3ced5229u},
        {"model.layers.61.eh_proj.weight", 7, 14336, 100, 9000, 0x3cdd71c6u},
        {"lm_head.weight", 123456789, 2048, 5, 3, 0xbd034993u},
    };
    for (size_t i = 0; i < sizeof gold / sizeof gold[0]; i++) {
        /* as a slice that starts elsewhere: (r0 + i, c0 + j) is the same element */
        dummy_slice s = dummy_slice_of(gold[i].name, gold[i].seed, gold[i].row + 1, gold[i].full_in,
                                       gold[i].row / 2, gold[i].col / 3);
        float v = dummy_at(&s, gold[i].row - gold[i].row / 2, gold[i].col - gold[i].col / 3);
        CHECK_MSG(bits(v) == gold[i].bits, "%s (%d, %d): %08x, the loader made %08x", gold[i].name,
                  gold[i].row, gold[i].col, bits(v), gold[i].bits);
        CHECK(bits(old_value(gold[i].name, gold[i].seed, gold[i].full_in, gold[i].row,
                             gold[i].col)) == gold[i].bits);
    }
    static const char *names[] = {"model.layers.1.mlp.experts.3.down_proj.weight",
                                  "model.norm.weight",
                                  "model.layers.0.input_layernorm.weight",
                                  "model.layers.2.mlp.gate.e_score_correction_bias",
                                  "model.layers.5.self_attn.kv_a_proj_with_mqa.weight",
                                  "x.norm.weight",
                                  "enorm.weight",
                                  "model.layers.4.hnorm.weight"};
    int bad = 0;
    for (int t = 0; t < 200000; t++) {
        const char *name = names[next64() % 8];
        uint64_t seed = next64() % 5 == 0 ? 0 : next64();
        int full_in = (int)(next64() % 20000), row = (int)(next64() % 200000);
        int col = full_in ? (int)(next64() % (uint64_t)full_in) : 0;
        dummy_slice s = dummy_slice_of(name, seed, row + 1, full_in, 0, 0);
        bad += bits(dummy_at(&s, row, col)) != bits(old_value(name, seed, full_in, row, col));
    }
    CHECK_EQ_INT(bad, 0);
    /* the header's own copies of base/hash.h's functions */
    for (int t = 0; t < 1000; t++) {
        uint64_t x = next64();
        CHECK(dummy_mix64(x) == hash_mix64(x));
    }
    for (int t = 0; t < 8; t++) CHECK(dummy_fnv1a(names[t]) == hash_fnv1a_str(names[t]));
    /* rows at or past full_out are zero (a vocabulary padded over TP ranks) */
    dummy_slice s = dummy_slice_of("lm_head.weight", 3, 100, 64, 96, 0);
    CHECK(dummy_at(&s, 3, 5) != 0.0f && dummy_at(&s, 4, 5) == 0.0f && dummy_at(&s, 9, 0) == 0.0f);
    CHECK(bits(dummy_fp8_scale()) == bits(0.02f * 1.7320508f / 448.0f));
    CHECK(bits(dummy_fp8_inv()) == bits(1.0f / (0.02f * 1.7320508f / 448.0f)));
}

static void test_roundings(void) {
    int bad_bf16 = 0, bad_old = 0, bad_dt = 0;
    /* every 4099th bit pattern (both signs, NaNs and infinities among them) */
    for (uint64_t u = 0; u <= 0xffffffffull; u += 4099) {
        float f = of_bits((uint32_t)u);
        bad_bf16 += dummy_bf16(f) != dt_f32_to_bf16(f);
        bad_old += dummy_e4m3(f) != old_e4m3(f);
        if (isnan(f)) continue;
        /* dt_f32_to_e4m3 scans every code; same result except NaN (0x7f there) */
        if (fabsf(f) < 1e-3f || fabsf(f) > 100.0f || u % 7 == 0)
            bad_dt += dummy_e4m3(f) != dt_f32_to_e4m3(f);
    }
    /* the exact midpoints between neighbouring codes (ties: the even code) and an ulp either
     * side, with both signs */
    for (int c = 0; c < 126; c++) {
        float lo = dt_e4m3_to_f32((uint8_t)c), hi = dt_e4m3_to_f32((uint8_t)(c + 1));
        float mid = lo + (hi - lo) / 2;
        for (int d = -1; d <= 1; d++)
            for (int sg = 0; sg < 2; sg++) {
                float f = of_bits(bits(mid) + (uint32_t)d);
                if (sg) f = -f;
                bad_old += dummy_e4m3(f) != old_e4m3(f);
                bad_dt += dummy_e4m3(f) != dt_f32_to_e4m3(f);
            }
        CHECK_EQ_INT(dummy_e4m3(mid), (c & 1) ? c + 1 : c);
    }
    CHECK_EQ_INT(dummy_e4m3(448.0f), 0x7e);
    CHECK_EQ_INT(dummy_e4m3(-1e9f), 0xfe);
    CHECK_EQ_INT(dummy_e4m3(-0.0f), 0x80);
    CHECK_EQ_INT(bad_bf16, 0);
    CHECK_EQ_INT(bad_old, 0);
    CHECK_EQ_INT(bad_dt, 0);
}

/* ---- the loader through the op ---- */

static const be_ops *g_cpu;  /* the CPU backend's own table */
static be_ops g_host, g_dev; /* + FP8 weights; + the dummy ops too */
static long long g_bytes, g_dummy_calls, g_bad;
static long long g_outside; /* host-path creations the loader called itself, not the op */
static int g_in_op;

static duet_status t_weight_create(be_backend *be, const float *w, int n_out, int n_in,
                                   bool keep_f32, be_weight **w_p) {
    g_outside += !g_in_op;
    g_bytes += (long long)n_out * n_in * (keep_f32 ? 4 : 2); /* as a bf16 device keeps them */
    return g_cpu->weight_create(be, w, n_out, n_in, keep_f32, w_p);
}

static duet_status t_vec_create(be_backend *be, const float *v, int n, void **dev_p) {
    g_outside += !g_in_op;
    g_bytes += 4LL * n;
    return g_cpu->vec_create(be, v, n, dev_p);
}

/* FP8 kept by dequantizing it into a CPU weight (backend.h's block grids) */
static duet_status t_weight_create_fp8(be_backend *be, const uint8_t *q, const float *scales,
                                       int n_out, int n_in, int split, be_weight **w_p) {
    g_outside += !g_in_op;
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
    g_bytes += (long long)n_out * n_in + 4LL * rb * cb;
    duet_status st = g_cpu->weight_create(be, w, n_out, n_in, false, w_p);
    free(w);
    return st;
}

/* backend.h's contract of weight_create_dummy, made from the rule on the host */
static duet_status t_weight_create_dummy(be_backend *be, const dummy_slice *parts, int n_parts,
                                         int n_rows, int n_in, bool keep_f32, bool fp8,
                                         be_weight **w_p) {
    g_dummy_calls++;
    if (n_parts < 1 || n_parts > 2 || n_rows < 0 || n_in < 0 || (fp8 && keep_f32)) {
        g_bad++;
        return DUET_ERR_INVALID;
    }
    size_t n = (size_t)n_parts * n_rows * n_in;
    float *w = malloc((n ? n : 1) * sizeof(float));
    for (int p = 0; p < n_parts; p++)
        for (int i = 0; i < n_rows; i++)
            for (int j = 0; j < n_in; j++)
                w[((size_t)p * n_rows + i) * n_in + j] = dummy_at(&parts[p], i, j);
    duet_status st;
    g_in_op = 1;
    if (fp8) {
        int cb = (n_in + 127) / 128, rb = n_parts * ((n_rows + 127) / 128);
        uint8_t *q = malloc(n ? n : 1);
        float *s = malloc((size_t)rb * cb * sizeof(float));
        for (size_t i = 0; i < n; i++) q[i] = dummy_e4m3(w[i] * dummy_fp8_inv());
        for (int i = 0; i < rb * cb; i++) s[i] = dummy_fp8_scale();
        st = t_weight_create_fp8(be, q, s, n_parts * n_rows, n_in, n_rows, w_p);
        free(q);
        free(s);
    } else {
        st = t_weight_create(be, w, n_parts * n_rows, n_in, keep_f32, w_p);
    }
    g_in_op = 0;
    free(w);
    return st;
}

static duet_status t_vec_create_dummy(be_backend *be, const dummy_slice *s, int n, void **dev_p) {
    g_dummy_calls++;
    if (s->full_in != 0 || s->r0 != 0 || s->c0 != 0) g_bad++;
    float *v = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    for (int i = 0; i < n; i++) v[i] = dummy_at(s, i, 0);
    g_in_op = 1;
    duet_status st = t_vec_create(be, v, n, dev_p);
    g_in_op = 0;
    free(v);
    return st;
}

/* y = x @ W^T for a fixed x [3, n_in] on each backend: identical, bit for bit */
static void same_linear(be_backend *a, be_backend *b, const be_weight *wa, const be_weight *wb,
                        int n_out, int n_in, const char *what, int layer) {
    if (!wa || !wb) {
        CHECK_MSG(!wa && !wb, "%s of layer %d: loaded on one side only", what, layer);
        return;
    }
    int T = 3;
    float *x = malloc((size_t)T * n_in * sizeof(float)), *y[2];
    for (int i = 0; i < T * n_in; i++) x[i] = sinf(0.37f * (float)i + (float)layer);
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
    CHECK_MSG(!memcmp(y[0], y[1], (size_t)T * n_out * sizeof(float)),
              "%s of layer %d: the weight made through the op differs", what, layer);
    free(x);
    free(y[0]);
    free(y[1]);
}

static void same_vec(const void *a, const void *b, int n, const char *what, int layer) {
    CHECK_MSG((!a) == (!b), "%s of layer %d: on one side only", what, layer);
    if (a && b) /* CPU vectors are host float32 */
        CHECK_MSG(!memcmp(a, b, (size_t)n * sizeof(float)), "%s of layer %d differs", what, layer);
}

static void same_ffn(be_backend *a, be_backend *b, const be_ffn *fa, const be_ffn *fb, int D,
                     const char *what, int layer) {
    CHECK_EQ_INT(fa->n_inter, fb->n_inter);
    same_linear(a, b, fa->gate_up, fb->gate_up, 2 * fa->n_inter, D, what, layer);
    same_linear(a, b, fa->down, fb->down, D, fa->n_inter, what, layer);
}

static void same_layer(be_backend *a, be_backend *b, const cfg_model *c, const mdl_plan *pl,
                       const mdl_layer *x, const mdl_layer *y, int l) {
    int D = c->hidden_size, L = c->kv_lora_rank, R = c->qk_rope_head_dim;
    int Hl = pl->n_heads_local, qk = cfg_qk_head_dim(c), nv = c->qk_nope_head_dim + c->v_head_dim;
    same_vec(x->attn_norm, y->attn_norm, D, "attn_norm", l);
    same_vec(x->ffn_norm, y->ffn_norm, D, "ffn_norm", l);
    same_vec(x->q_a_norm, y->q_a_norm, c->q_lora_rank, "q_a_norm", l);
    same_vec(x->kv_a_norm, y->kv_a_norm, L, "kv_a_norm", l);
    same_vec(x->gate_bias, y->gate_bias, c->n_routed_experts, "gate_bias", l);
    same_linear(a, b, x->q_a, y->q_a, c->q_lora_rank, D, "q_a", l);
    same_linear(a, b, x->q_b, y->q_b, Hl * qk, c->q_lora_rank, "q_b", l);
    same_linear(a, b, x->kv_a, y->kv_a, L + R, D, "kv_a", l);
    same_linear(a, b, x->kv_b, y->kv_b, Hl * nv, L, "kv_b", l);
    same_linear(a, b, x->o, y->o, D, Hl * c->v_head_dim, "o", l);
    if (!x->moe) {
        same_ffn(a, b, &x->dense, &y->dense, D, "dense", l);
        return;
    }
    same_linear(a, b, x->gate, y->gate, c->n_routed_experts, D, "gate", l);
    for (int e = 0; e < pl->n_local_experts; e++)
        same_ffn(a, b, &x->experts[e], &y->experts[e], D, "expert", l);
    if (x->shared.gate_up) same_ffn(a, b, &x->shared, &y->shared, D, "shared", l);
}

static void check_layout(const char *dir, cfg_model *c, int tp, int rank, bool ep) {
    mdl_shard sh = {
        .tp_rank = rank, .tp_size = tp, .ep_rank = ep ? rank : 0, .ep_size = ep ? tp : 1};
    mdl_plan plan;
    if (mdl_shard_plan(c, &sh, &plan) != DUET_OK) {
        CHECK_MSG(0, "no shard plan for tp %d", tp);
        return;
    }
    be_backend *host = NULL, *dev = NULL;
    CHECK(be_create("cpu", 0, &host) == DUET_OK);
    CHECK(be_create("cpu", 0, &dev) == DUET_OK);
    if (!host || !dev) return;
    g_cpu = host->ops;
    g_host = *host->ops;
    g_host.weight_create = t_weight_create;
    g_host.vec_create = t_vec_create;
    g_host.weight_create_fp8 = t_weight_create_fp8;
    g_host.act_dtype = DT_BF16; /* FP8 is offered to bf16 backends (the CPU ops stay float32) */
    g_dev = g_host;
    g_dev.weight_create_dummy = t_weight_create_dummy;
    g_dev.vec_create_dummy = t_vec_create_dummy;
    host->ops = &g_host;
    dev->ops = &g_dev;

    mdl_weights *wh = NULL, *wd = NULL;
    long long bytes[2];
    g_bytes = g_bad = g_dummy_calls = 0;
    CHECK(mdl_weights_load(dir, c, &plan, host, MDL_WEIGHTS_DUMMY, 9, &wh) == DUET_OK);
    CHECK_EQ_INT(g_dummy_calls, 0);
    bytes[0] = g_bytes;
    g_bytes = g_outside = 0;
    CHECK(mdl_weights_load(dir, c, &plan, dev, MDL_WEIGHTS_DUMMY, 9, &wd) == DUET_OK);
    bytes[1] = g_bytes;
    long long calls = g_dummy_calls;
    /* every tensor went through the op: the host path's weight_create/_fp8/vec_create were
     * called by the op only */
    CHECK_EQ_INT(g_outside, 0);
    CHECK(calls > 0);
    CHECK_EQ_INT(bytes[1], bytes[0]);
    mplan_weights mw;
    CHECK(mplan_weights_count(c, &plan, mplan_weight_format_auto(c, DT_BF16), DT_BF16, &mw) ==
          DUET_OK);
    CHECK_EQ_INT(bytes[0], mw.total);
    int mtp_ok = c->num_nextn_predict_layers > 0;
    if (mtp_ok && wh && wd) {
        CHECK(mdl_weights_load_mtp(dir, c, &plan, MDL_WEIGHTS_DUMMY, 9, wh) == DUET_OK);
        g_dummy_calls = 0;
        g_outside = 0;
        CHECK(mdl_weights_load_mtp(dir, c, &plan, MDL_WEIGHTS_DUMMY, 9, wd) == DUET_OK);
        CHECK(g_dummy_calls > 0);
        CHECK_EQ_INT(g_outside, 0);
    }
    CHECK_EQ_INT(g_bad, 0);
    if (wh && wd) {
        int D = c->hidden_size;
        same_linear(host, dev, wh->embed, wd->embed, plan.vocab_local, D, "embed", -1);
        same_linear(host, dev, wh->lm_head, wd->lm_head, plan.vocab_local, D, "lm_head", -1);
        same_vec(wh->final_norm, wd->final_norm, D, "final_norm", -1);
        for (int l = 0; l < c->num_hidden_layers; l++)
            same_layer(host, dev, c, &plan, &wh->layers[l], &wd->layers[l], l);
        if (mtp_ok && wh->mtp && wd->mtp) {
            const mdl_mtp *a = wh->mtp, *b = wd->mtp;
            int l = c->num_hidden_layers;
            same_linear(host, dev, a->embed, b->embed, plan.vocab_local, D, "mtp embed", l);
            same_linear(host, dev, a->head, b->head, plan.vocab_local, D, "mtp head", l);
            same_linear(host, dev, a->eh_e, b->eh_e, D, D, "eh_e", l);
            same_linear(host, dev, a->eh_h, b->eh_h, D, D, "eh_h", l);
            same_vec(a->enorm, b->enorm, D, "enorm", l);
            same_vec(a->hnorm, b->hnorm, D, "hnorm", l);
            same_vec(a->head_norm, b->head_norm, D, "head_norm", l);
            same_layer(host, dev, c, &plan, &a->layer, &b->layer, l);
        }
    }
    printf("%s tp %d%s rank %d: %lld tensors made through the op, %lld bytes (plan %lld)\n",
           c->fp8 ? "fp8" : "bf16", tp, ep ? " ep" : "", rank, calls, bytes[1], mw.total);
    mdl_weights_destroy(wh);
    mdl_weights_destroy(wd);
    host->ops = g_cpu;
    dev->ops = g_cpu;
    be_destroy(host);
    be_destroy(dev);
}

/* The plain CPU loader (host path) holds the old formula's values: embedding rows read back
 * through the embed op, rows of TP rank 1's vocabulary slice. */
static void check_cpu_embedding(const char *dir, const cfg_model *c) {
    mdl_shard sh = {.tp_rank = 1, .tp_size = 2, .ep_rank = 0, .ep_size = 1};
    mdl_plan plan;
    CHECK(mdl_shard_plan(c, &sh, &plan) == DUET_OK);
    be_backend *be = NULL;
    CHECK(be_create("cpu", 0, &be) == DUET_OK);
    mdl_weights *w = NULL;
    CHECK(mdl_weights_load(dir, c, &plan, be, MDL_WEIGHTS_DUMMY, 11, &w) == DUET_OK);
    if (!w) return;
    int D = c->hidden_size, T = 4;
    int32_t ids[4] = {plan.vocab0, plan.vocab0 + 1, plan.vocab0 + 77, c->vocab_size - 1};
    void *out = be->ops->buf_alloc(be, (size_t)T * D);
    be->ops->embed(be, out, ids, T, w->embed, plan.vocab0);
    float *y = malloc((size_t)T * D * sizeof(float));
    CHECK(be->ops->download(be, y, out, 0, (size_t)T * D) == DUET_OK);
    int bad = 0;
    for (int t = 0; t < T; t++)
        for (int j = 0; j < D; j++)
            bad += bits(y[t * D + j]) !=
                   bits(old_value("model.embed_tokens.weight", 11, D, ids[t], j));
    CHECK_EQ_INT(bad, 0);
    free(y);
    be->ops->buf_free(be, out);
    mdl_weights_destroy(w);
    be_destroy(be);
}

int main(void) {
    test_rule();
    test_roundings();
    const char *cases[] = {"tiny-v3", "tiny-v3-fp8"};
    for (int k = 0; k < 2; k++) {
        char dir[4096];
        snprintf(dir, sizeof dir, "%s/%s/model", GOLDEN_DIR, cases[k]);
        cfg_model c;
        if (cfg_load(dir, &c) != DUET_OK) {
            fprintf(stderr, "no golden %s at %s: skipped\n", cases[k], dir);
            return 77;
        }
        if (k == 0) check_cpu_embedding(dir, &c);
        c.num_nextn_predict_layers = 1; /* an MTP module too (dummy: config only) */
        check_layout(dir, &c, 1, 0, false);
        check_layout(dir, &c, 2, 0, false);
        check_layout(dir, &c, 2, 1, false);
        check_layout(dir, &c, 2, 1, true);
    }
    CHECK_DONE();
}
