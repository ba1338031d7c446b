/* Pieces the backend-op tests and benchmarks share (test_backend_ops, test_fused_ops,
 * test_moe_ops, bench_mla, bench_moe): a one-sequence batch over one block-table entry, the
 * dense be_moe_rows of T rows, DeepSeek's routers, a shuffle and random e4m3 codes drawn from
 * xorshift.h's stream (so a file defines XS_SEED, if it seeds statically, before including this).
 * Header-only. */
#ifndef DUET_TEST_OPTEST_H
#define DUET_TEST_OPTEST_H

#include <stddef.h>
#include <stdint.h>

#include "model/backend.h"
#include "xorshift.h"

/* A batch of one sequence: n_tokens at pos/slot (caller's arrays), seq_ctx ctx, the block
 * table {0}. The batch points into this struct, so keep it alive while the batch is used. */
typedef struct bt_seq1 {
    int32_t start[2], ctx[1], table[1];
    be_batch b;
} bt_seq1;

static inline const be_batch *bt_seq1_init(bt_seq1 *s, int n_tokens, const int32_t *pos,
                                           const int32_t *slot, int32_t ctx) {
    s->start[0] = 0;
    s->start[1] = n_tokens;
    s->ctx[0] = ctx;
    s->table[0] = 0;
    s->b = (be_batch){.n_tokens = n_tokens,
                      .n_seqs = 1,
                      .token_pos = pos,
                      .token_slot = slot,
                      .seq_start = s->start,
                      .seq_ctx = s->ctx,
                      .block_table = s->table,
                      .max_blocks = 1};
    return &s->b;
}

/* T contiguous rows of D activations, each with K expert ids and weights (rows K apart) */
static inline be_moe_rows bt_moe_rows(int T, int D, int K, const void *x, const int32_t *ids,
                                      const float *weights) {
    return (be_moe_rows){.n = T,
                         .D = D,
                         .K = K,
                         .x = x,
                         .x_stride = D,
                         .ids = ids,
                         .weights = weights,
                         .meta_stride = K};
}

/* DeepSeek-V3's router at a size: sigmoid scores, noaux_tc (with the correction bias), 8 groups
 * of which topk_group are kept, top_k weights normalized, then scaled by 2.5 */
static inline be_route_params bt_route_v3(int n_experts, int top_k, int topk_group) {
    return (be_route_params){.n_experts = n_experts,
                             .top_k = top_k,
                             .n_group = 8,
                             .topk_group = topk_group,
                             .scoring = CFG_SCORING_SIGMOID,
                             .method = CFG_TOPK_NOAUX_TC,
                             .norm_topk_prob = true,
                             .scale_after_norm = true,
                             .routed_scaling_factor = 2.5f};
}

/* DeepSeek-V2-Lite's router: softmax scores, greedy top-6 of 64 experts, weights as they are */
static inline be_route_params bt_route_v2_lite(void) {
    return (be_route_params){.n_experts = 64,
                             .top_k = 6,
                             .n_group = 1,
                             .topk_group = 1,
                             .scoring = CFG_SCORING_SOFTMAX,
                             .method = CFG_TOPK_GREEDY,
                             .routed_scaling_factor = 1.0f};
}

/* Fisher-Yates from the back: one draw for each of a[n-1] .. a[1] */
static inline void bt_shuffle(int32_t *a, int n) {
    for (int i = n - 1; i > 0; i--) {
        int j = (int)(xs_next() % (uint64_t)(i + 1));
        int32_t tmp = a[i];
        a[i] = a[j];
        a[j] = tmp;
    }
}

/* random e4m3 codes, never a NaN (0x7f / 0xff): one draw per code, redrawn on a NaN */
static inline void bt_rand_e4m3(uint8_t *q, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint8_t v;
        do v = (uint8_t)(xs_next() >> 32);
        while ((v & 0x7f) == 0x7f);
        q[i] = v;
    }
}

#endif
