/* The collectives of a sharded forward pass over this rank's groups (dist/comm.h): TP
 * all-reduce of row-parallel outputs, the vocabulary gather of logits, and EP dispatch/combine
 * of routed experts' tokens. A module of its own under the forward that moves activations and
 * computes nothing: EP is split into dispatch and combine so the forward runs its experts on
 * the rows in between, and nothing here needs the weights or calls back up. What goes where
 * comes from the shard plan alone. Not thread-safe: one per model, called from the engine
 * thread, every rank of a group making the same calls in the same order. */
#ifndef DUET_COLLECTIVES_H
#define DUET_COLLECTIVES_H

#include <stddef.h>
#include <stdint.h>

#include "model/backend.h"
#include "model/config.h"
#include "model/shard.h"
#include "base/status.h"

typedef struct mdl_coll mdl_coll;

/* The rows EP dispatch brought to this rank, valid until the next combine. */
typedef struct mdl_ep_rows {
    int n;                /* rows */
    const void *x;        /* [n, D] backend buffer: the tokens */
    const int32_t *ids;   /* host [n, K]: their expert ids (other ranks' experts among them) */
    const float *weights; /* host [n, K] */
    void *y;              /* [n, D] backend buffer: the caller's expert output, sent back */
} mdl_ep_rows;

/* For the model c sharded by plan (both copied from) on be (borrowed; must outlive it).
 * Logits staging is sized by mdl_coll_reserve; EP staging grows on demand. */
duet_status mdl_coll_create(be_backend *be, const cfg_model *c, const mdl_plan *plan,
                            mdl_coll **coll_p);
void mdl_coll_destroy(mdl_coll *coll);
/* Makes room to collect up to n_out rows of logits; the forward calls it when it grows its
 * own activations, so steps that fit allocate nothing. */
duet_status mdl_coll_reserve(mdl_coll *coll, int n_out);

/* buf [n] (backend buffer, activation type) = its sum over the TP group; nothing for tp 1. */
duet_status mdl_coll_allreduce(mdl_coll *coll, void *buf, size_t n);
/* logits_dev [n_out, vocab_local], this rank's vocabulary slice in a backend buffer, into
 * logits [n_out, vocab_size] host float32 (gathered over TP, the padding dropped). n_out is at
 * most what mdl_coll_reserve made room for. */
duet_status mdl_coll_logits(mdl_coll *coll, const void *logits_dev, int n_out, float *logits);

/* The same gather left in backend memory (the step's logits for the sampling op): *rows_p
 * [n_out, *stride_p] with vocab_size valid columns: logits_dev itself at tp 1, a buffer of the
 * collectives (valid until the next gather) otherwise. Every TP rank calls. */
duet_status mdl_coll_logits_gather(mdl_coll *coll, const void *logits_dev, int n_out,
                                   const void **rows_p, int *stride_p);

/* EP dispatch: of x [T, D] (the same tokens on every TP rank) this TP rank sends every tp-th
 * token, from its tp_rank, with its routing (ids / weights host [T, K], as be_ops.moe_route
 * gives them) to the ranks owning its experts; *rows_p receives what came to this rank. Every
 * rank of the EP group calls, T = 0 included (an empty step), then fills rows_p->y and calls
 * mdl_coll_combine. */
duet_status mdl_coll_dispatch(mdl_coll *coll, const void *x, const int32_t *ids,
                              const float *weights, int T, mdl_ep_rows *rows_p);
/* EP combine: the rows' y goes back the way the tokens came; out [T, D] = for each token this
 * rank sent, the sum of what came back for it, and zero for the other TP ranks' tokens (the TP
 * all-reduce after the MoE layer completes them). */
duet_status mdl_coll_combine(mdl_coll *coll, void *out, int T);

/* ---- EP with device routing (the backend has be_ops.moe_ep_pack and the other device MoE
 * ops): the same exchange in fixed-capacity blocks, [ep][cap] rows each way, routing packed
 * into the rows; no count, id or weight reaches the host, and on a device communicator the
 * all-to-alls are only enqueued. Every rank of the EP group makes the same calls: begin once
 * per step (T = 0 for an empty step), dispatch/combine per MoE layer, end once per step. ---- */

/* Agrees on this step's block capacity, the most tokens any rank sends (one host all-reduce
 * per step, not per layer), and makes room for it. */
duet_status mdl_coll_ep_begin(mdl_coll *coll, int T);
/* Dispatch: x [T, D] with device routing ids / weights [T, K] (be_ops.moe_route_dev). *rows_p
 * receives the ep * cap rows that arrived (unused ones select no expert) and *y_p the buffer
 * [ep * cap, D] the caller fills with their results (be_ops.moe_experts_dev), valid until the
 * next combine. */
duet_status mdl_coll_dispatch_dev(mdl_coll *coll, const void *x, const int32_t *ids,
                                  const float *weights, int T, be_moe_rows *rows_p, void **y_p);
/* Combine: out [T, D] as mdl_coll_combine gives it. */
duet_status mdl_coll_combine_dev(mdl_coll *coll, void *out, int T);
/* Waits, under the deadline, for the all-to-alls enqueued since begin. */
duet_status mdl_coll_ep_end(mdl_coll *coll);

#endif
