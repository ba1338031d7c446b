/* This rank's share of the model: its place in the instance's TP/EP grid (mdl_shard) and the
 * slice of every sharded dimension that follows from config.json (mdl_plan). The bottom of
 * runtime/model's own modules, so the weights (which slices to load), the collectives (which
 * groups to join) and the forward (how big its activations are) agree on one plan; it holds
 * no tensors and talks to no peer. */
#ifndef DUET_SHARD_H
#define DUET_SHARD_H

#include <stddef.h>

#include "model/config.h"
#include "base/status.h"

typedef struct comm_group comm_group;

/* This rank's share of the model. tp splits attention heads, MLP/shared-expert intermediate
 * dims and the vocabulary; ep (when ep_size > 1) places whole routed experts on ranks, the EP
 * group spanning every rank of the instance. Groups are NULL for size 1. */
typedef struct mdl_shard {
    int tp_rank, tp_size;
    int ep_rank, ep_size;
    comm_group *tp;
    comm_group *ep;
} mdl_shard;

/* The slices this rank holds. Heads, the dense MLP, the shared experts and the (padded)
 * vocabulary are split over TP; routed experts are split over TP by their intermediate dim
 * without EP, and placed whole on EP ranks with it. */
typedef struct mdl_plan {
    mdl_shard shard;              /* as given, tp_size and ep_size at least 1 */
    int n_heads_local;            /* attention heads [tp_rank * n_heads_local, +n_heads_local) */
    int vocab_local;              /* rows of embed / lm_head: padded vocabulary / tp */
    int vocab0;                   /* first of them */
    int inter_local;              /* dense MLP intermediate width */
    int shared_inter_local;       /* shared experts' (fused) intermediate width; 0 without them */
    int expert_inter_local;       /* each routed expert's intermediate width */
    int expert0, n_local_experts; /* routed experts [expert0, expert0 + n_local_experts) */
} mdl_plan;

/* Whether c divides over tp_size TP ranks and ep_size EP ranks (1: no EP); on DUET_ERR_INVALID
 * err holds one line naming the config field and the flag. Logs nothing: for callers that
 * report the reason their own way (the memory plan). */
duet_status mdl_shard_check(const cfg_model *c, int tp_size, int ep_size, char *err,
                            size_t err_len);
/* Checks that c divides over shard (mdl_shard_check's line, logged) and fills *plan_p. */
duet_status mdl_shard_plan(const cfg_model *c, const mdl_shard *shard, mdl_plan *plan_p);

#endif
