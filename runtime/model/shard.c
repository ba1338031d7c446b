/* The shard plan (see shard.h): which slice of each sharded dimension this rank holds, and the
 * divisibility checks that make the slices exact. What to do with the slices is the weights'
 * and the forward's business. */
#include "model/shard.h"

#include <stdio.h>

#include "base/log.h"

static duet_status check_divisible(const char *what, int n, int by, const char *flag, char *err,
                                   size_t err_len) {
    if (by > 0 && n % by == 0) return DUET_OK;
    snprintf(err, err_len, "config.json: %s (%d) is not divisible by %s (%d)", what, n, flag, by);
    return DUET_ERR_INVALID;
}

duet_status mdl_shard_check(const cfg_model *c, int tp_size, int ep_size, char *err,
                            size_t err_len) {
    int tp = tp_size < 1 ? 1 : tp_size, ep = ep_size < 1 ? 1 : ep_size;
    duet_status st = check_divisible("num_attention_heads", c->num_attention_heads, tp,
                                     "--tensor-parallel-size", err, err_len);
    if (st == DUET_OK)
        st = check_divisible("intermediate_size", c->intermediate_size, tp,
                             "--tensor-parallel-size", err, err_len);
    if (st == DUET_OK && c->n_shared_experts)
        st = check_divisible("shared experts' intermediate size",
                             c->n_shared_experts * c->moe_intermediate_size, tp,
                             "--tensor-parallel-size", err, err_len);
    if (st == DUET_OK && c->n_routed_experts && ep > 1)
        st = check_divisible("n_routed_experts", c->n_routed_experts, ep,
                             "the expert-parallel size (all ranks of the instance)", err, err_len);
    if (st == DUET_OK && c->n_routed_experts && ep <= 1)
        st = check_divisible("moe_intermediate_size", c->moe_intermediate_size, tp,
                             "--tensor-parallel-size", err, err_len);
    return st;
}

duet_status mdl_shard_plan(const cfg_model *c, const mdl_shard *shard, mdl_plan *plan_p) {
    mdl_plan p = {.shard = *shard};
    mdl_shard *s = &p.shard;
    if (s->tp_size < 1) s->tp_size = 1;
    if (s->ep_size < 1) s->ep_size = 1;
    int tp = s->tp_size;
    char err[256];
    duet_status st = mdl_shard_check(c, s->tp_size, s->ep_size, err, sizeof err);
    if (st != DUET_OK) {
        LOG_ERROR("%s", err);
        return st;
    }
    p.n_heads_local = c->num_attention_heads / tp;
    p.inter_local = c->intermediate_size / tp;
    p.shared_inter_local = c->n_shared_experts * c->moe_intermediate_size / tp;
    p.vocab_local = (c->vocab_size + tp - 1) / tp;
    p.vocab0 = s->tp_rank * p.vocab_local;
    if (s->ep_size > 1) {
        p.n_local_experts = c->n_routed_experts / s->ep_size;
        p.expert0 = s->ep_rank * p.n_local_experts;
        p.expert_inter_local = c->moe_intermediate_size;
    } else {
        p.n_local_experts = c->n_routed_experts;
        p.expert0 = 0;
        p.expert_inter_local = c->moe_intermediate_size / tp;
    }
    *plan_p = p;
    return DUET_OK;
}
