/* The device MoE ops of the CPU backend against its host-routing ops: moe_route_dev gives
 * moe_route's ids and weights; moe_experts_dev gives moe_experts plus the shared experts'
 * FFN, also over strided rows; and EP in fixed-capacity blocks (moe_ep_pack, an all-to-all
 * simulated by copying blocks, moe_experts_dev on each rank's arrivals, the blocks returned,
 * moe_ep_unpack, the TP ranks' outputs summed) gives what one rank holding every expert gives.
 * tests/gpu/test_backend_ops.c holds the CUDA ops to these. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#define XS_SEED 88172645463325252ull
#include "optest.h"
#include "testmodel.h"
#include "model/backend.h"
#include "model/backends/registry.h"

static be_weight *weight(be_backend *be, int n_out, int n_in, float a) {
    float *h = xs_vec((size_t)n_out * n_in, a);
    be_weight *w = NULL;
    CHECK(be->ops->weight_create(be, h, n_out, n_in, false, &w) == DUET_OK);
    free(h);
    return w;
}

/* Random routing of T tokens: K distinct experts of E each, weights in (0.1, 1.1); experts
 * at or above `unused` are never picked (so some local experts see no token). */
static void route_random(int32_t *ids, float *w, int T, int K, int E, int unused) {
    for (int t = 0; t < T; t++)
        for (int k = 0; k < K; k++) {
            int e, dup;
            do {
                e = (int)((xs_uniform(1.0f) + 1.0f) * 0.5f * (float)unused) % unused;
                dup = 0;
                for (int j = 0; j < k; j++) dup |= ids[t * K + j] == e;
            } while (dup);
            ids[t * K + k] = e;
            w[t * K + k] = 0.6f + xs_uniform(0.5f);
        }
    (void)E;
}

static void test_route(be_backend *be) {
    int T = 37, D = 48;
    be_route_params ps[2] = {bt_route_v3(64, 6, 3), bt_route_v2_lite()};
    for (int i = 0; i < 2; i++) {
        const be_route_params *p = &ps[i];
        int E = p->n_experts, K = p->top_k;
        float *x = xs_vec((size_t)T * D, 1.0f), *bias = xs_vec((size_t)E, 0.05f);
        be_weight *gate = weight(be, E, D, 0.2f);
        int32_t ids[37 * 6], *d_ids = be->ops->mem_alloc(be, sizeof ids);
        float w[37 * 6], *d_w = be->ops->mem_alloc(be, sizeof w);
        CHECK(be->ops->moe_route(be, x, T, gate, i == 0 ? bias : NULL, p, ids, w) == DUET_OK);
        be->ops->moe_route_dev(be, x, T, gate, i == 0 ? bias : NULL, p, d_ids, d_w);
        CHECK(be->ops->sync(be) == DUET_OK);
        int32_t got_ids[37 * 6];
        float got_w[37 * 6];
        CHECK(be->ops->mem_download(be, got_ids, d_ids, sizeof got_ids) == DUET_OK);
        CHECK(be->ops->mem_download(be, got_w, d_w, sizeof got_w) == DUET_OK);
        CHECK(memcmp(got_ids, ids, (size_t)T * K * sizeof(int32_t)) == 0);
        CHECK(memcmp(got_w, w, (size_t)T * K * sizeof(float)) == 0);
        be->ops->mem_free(be, d_ids);
        be->ops->mem_free(be, d_w);
        be->ops->weight_destroy(be, gate);
        free(x);
        free(bias);
    }
}

typedef struct moe_case {
    int T, D, K, E, I, Is; /* Is: shared experts' width, 0 for none */
} moe_case;

typedef struct moe_model {
    be_ffn *experts; /* [E] */
    be_ffn shared;
} moe_model;

static moe_model model_new(be_backend *be, const moe_case *mc) {
    moe_model m = {calloc((size_t)mc->E, sizeof(be_ffn)), {0}};
    for (int e = 0; e < mc->E; e++)
        m.experts[e] =
            (be_ffn){weight(be, 2 * mc->I, mc->D, 0.2f), weight(be, mc->D, mc->I, 0.2f), mc->I};
    if (mc->Is)
        m.shared =
            (be_ffn){weight(be, 2 * mc->Is, mc->D, 0.2f), weight(be, mc->D, mc->Is, 0.2f), mc->Is};
    return m;
}

static void model_free(be_backend *be, moe_model *m, const moe_case *mc) {
    for (int e = 0; e < mc->E; e++) {
        be->ops->weight_destroy(be, m->experts[e].gate_up);
        be->ops->weight_destroy(be, m->experts[e].down);
    }
    if (m->shared.gate_up) {
        be->ops->weight_destroy(be, m->shared.gate_up);
        be->ops->weight_destroy(be, m->shared.down);
    }
    free(m->experts);
}

/* ref[T, D] = the host-routing path the forward takes without device routing */
static void reference(be_backend *be, float *ref, const float *x, const int32_t *ids,
                      const float *w, const moe_case *mc, const moe_model *m) {
    int T = mc->T, D = mc->D;
    memset(ref, 0, (size_t)T * D * sizeof(float));
    be->ops->moe_experts(be, ref, x, T, D, ids, w, mc->K, m->experts, 0, mc->E);
    if (!mc->Is) return;
    float *gu = malloc((size_t)T * 2 * mc->Is * sizeof(float));
    float *act = malloc((size_t)T * mc->Is * sizeof(float));
    float *y = malloc((size_t)T * D * sizeof(float));
    be->ops->linear(be, gu, x, D, T, m->shared.gate_up);
    be->ops->silu_mul(be, act, gu, T, mc->Is);
    be->ops->linear(be, y, act, mc->Is, T, m->shared.down);
    be->ops->add(be, ref, y, (size_t)T * D);
    free(gu);
    free(act);
    free(y);
}

static void test_experts(be_backend *be, const moe_case *mc) {
    int T = mc->T, D = mc->D, K = mc->K;
    moe_model m = model_new(be, mc);
    float *x = xs_vec((size_t)T * D, 1.0f), *w = malloc((size_t)T * K * sizeof(float));
    int32_t *ids = malloc((size_t)T * K * sizeof(int32_t));
    route_random(ids, w, T, K, mc->E, mc->E - 3);
    float *ref = malloc((size_t)T * D * sizeof(float));
    reference(be, ref, x, ids, w, mc, &m);

    /* contiguous rows, as the forward passes them without EP */
    float *out = xs_vec((size_t)T * D, 9.0f); /* overwritten, not accumulated */
    be_moe_rows rows = bt_moe_rows(T, D, K, x, ids, w);
    be->ops->moe_experts_dev(be, out, &rows, m.experts, 0, mc->E, mc->Is ? &m.shared : NULL);
    CHECK(be->ops->sync(be) == DUET_OK);
    CHECK_MSG(memcmp(out, ref, (size_t)T * D * sizeof(float)) == 0, "T %d: rel_l2 %.3e", T,
              tm_rel_l2(out, ref, (size_t)T * D));

    /* packed rows: activations, then ids and weights, in one strided row */
    int stride = D + 2 * K + 4;
    float *packed = calloc((size_t)T * stride, sizeof(float));
    for (int t = 0; t < T; t++) {
        memcpy(packed + (size_t)t * stride, x + (size_t)t * D, (size_t)D * sizeof(float));
        memcpy(packed + (size_t)t * stride + D, ids + (size_t)t * K, (size_t)K * 4);
        memcpy(packed + (size_t)t * stride + D + K, w + (size_t)t * K, (size_t)K * 4);
    }
    rows = (be_moe_rows){.n = T,
                         .D = D,
                         .K = K,
                         .x = packed,
                         .x_stride = stride,
                         .ids = (const int32_t *)(packed + D),
                         .weights = packed + D + K,
                         .meta_stride = stride};
    be->ops->moe_experts_dev(be, out, &rows, m.experts, 0, mc->E, mc->Is ? &m.shared : NULL);
    CHECK(be->ops->sync(be) == DUET_OK);
    CHECK_MSG(memcmp(out, ref, (size_t)T * D * sizeof(float)) == 0, "packed rows, T %d", T);

    free(packed);
    free(out);
    free(ref);
    free(x);
    free(w);
    free(ids);
    model_free(be, &m, mc);
}

/* EP over ep ranks x tp TP ranks, simulated in one process: every (EP rank) holds E / ep
 * experts; TP rank q of the instance sends tokens q, q + tp, ... */
static void test_ep(be_backend *be, const moe_case *mc, int ep, int tp, int cap_extra) {
    int T = mc->T, D = mc->D, K = mc->K, E = mc->E, per = E / ep;
    moe_case nosh = *mc;
    nosh.Is = 0;
    moe_model m = model_new(be, &nosh);
    float *x = xs_vec((size_t)T * D, 1.0f), *w = malloc((size_t)T * K * sizeof(float));
    int32_t *ids = malloc((size_t)T * K * sizeof(int32_t));
    route_random(ids, w, T, K, E, E);
    float *ref = malloc((size_t)T * D * sizeof(float));
    reference(be, ref, x, ids, w, &nosh, &m);

    /* ep ranks; rank r is TP rank r % tp of its DP group and all hold the same T tokens here
     * (DP groups differ in practice; the layout does not care) */
    int mine_max = (T + tp - 1) / tp, cap = mine_max + cap_extra;
    size_t row = be_ep_row_bytes(D, K, sizeof(float)) / sizeof(float);
    size_t blk = (size_t)cap * row;
    float *send = malloc((size_t)ep * ep * blk * sizeof(float));
    float *recv = malloc((size_t)ep * ep * blk * sizeof(float));
    float *y = malloc((size_t)ep * ep * cap * D * sizeof(float));
    float *back = malloc((size_t)ep * ep * cap * D * sizeof(float));
    int32_t *slot = malloc((size_t)ep * cap * ep * sizeof(int32_t));
    float *sum = calloc((size_t)T * D, sizeof(float)), *out = malloc((size_t)T * D * sizeof(float));
    be_ep_layout l = {.ep = ep, .cap = cap, .tp = tp, .experts_per_rank = per, .D = D, .K = K};
    for (int r = 0; r < ep; r++) {
        l.tp_rank = r % tp;
        be->ops->moe_ep_pack(be, send + (size_t)r * ep * blk, x, T, ids, w, &l,
                             slot + (size_t)r * cap * ep);
    }
    /* the all-to-all: block d of rank s lands as block s of rank d */
    for (int s = 0; s < ep; s++)
        for (int d = 0; d < ep; d++)
            memcpy(recv + ((size_t)d * ep + s) * blk, send + ((size_t)s * ep + d) * blk,
                   blk * sizeof(float));
    size_t meta = be_ep_meta_offset(D, sizeof(float)) / sizeof(float);
    for (int r = 0; r < ep; r++) {
        const float *rr = recv + (size_t)r * ep * blk;
        be_moe_rows rows = {.n = ep * cap,
                            .D = D,
                            .K = K,
                            .x = rr,
                            .x_stride = (int)row,
                            .ids = (const int32_t *)(rr + meta),
                            .weights = rr + meta + K,
                            .meta_stride = (int)row,
                            .pairs_hint = cap * K};
        be->ops->moe_experts_dev(be, y + (size_t)r * ep * cap * D, &rows, m.experts + r * per,
                                 r * per, per, NULL);
    }
    size_t yb = (size_t)cap * D;
    for (int s = 0; s < ep; s++)
        for (int d = 0; d < ep; d++)
            memcpy(back + ((size_t)d * ep + s) * yb, y + ((size_t)s * ep + d) * yb,
                   yb * sizeof(float));
    /* TP ranks 0..tp-1 of DP group 0 (ranks 0..tp-1) complete each other: the TP all-reduce */
    for (int r = 0; r < tp; r++) {
        l.tp_rank = r;
        be->ops->moe_ep_unpack(be, out, back + (size_t)r * ep * yb, T, &l,
                               slot + (size_t)r * cap * ep);
        for (size_t i = 0; i < (size_t)T * D; i++) sum[i] += out[i];
    }
    CHECK(be->ops->sync(be) == DUET_OK);
    double err = tm_rel_l2(sum, ref, (size_t)T * D);
    CHECK_MSG(err < 1e-6, "EP %d x TP %d, T %d, cap %d: rel_l2 %.3e", ep, tp, T, cap, err);
    /* unused rows of every block select nothing */
    for (int r = 0; r < ep; r++)
        for (int d = 0; d < ep; d++) {
            int used = 0;
            l.tp_rank = r % tp;
            for (int t = l.tp_rank, i = 0; t < T; t += tp, i++)
                used += slot[(size_t)r * cap * ep + (size_t)i * ep + d] >= 0;
            for (int p = used; p < cap; p++) {
                const int32_t *id =
                    (const int32_t *)(send + ((size_t)r * ep + d) * blk + (size_t)p * row + meta);
                for (int k = 0; k < K; k++) CHECK(id[k] == -1);
            }
        }
    free(send);
    free(recv);
    free(y);
    free(back);
    free(slot);
    free(sum);
    free(out);
    free(ref);
    free(x);
    free(w);
    free(ids);
    model_free(be, &m, &nosh);
}

int main(void) {
    be_backend *be = NULL;
    CHECK(be_create("cpu", 0, &be) == DUET_OK);
    const be_ops *o = be->ops;
    CHECK(o->mem_alloc && o->moe_route_dev && o->moe_experts_dev && o->moe_ep_pack &&
          o->moe_ep_unpack);
    test_route(be);
    moe_case cases[] = {{1, 64, 6, 16, 24, 48}, {7, 64, 6, 16, 24, 0}, {40, 40, 4, 12, 20, 40}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) test_experts(be, &cases[i]);
    moe_case ep_case = {29, 32, 4, 16, 16, 0};
    test_ep(be, &ep_case, 4, 1, 0);
    test_ep(be, &ep_case, 4, 2, 3);
    ep_case.T = 1;
    test_ep(be, &ep_case, 2, 2, 0);
    be_destroy(be);
    CHECK_DONE();
}
