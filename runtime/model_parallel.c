/* The collectives of a sharded forward pass: TP all-reduce of row-parallel outputs, vocabulary
 * all-gather of logits, and EP all-to-all dispatch/combine of routed experts' tokens.
 * Host-memory backends move activations through comm (MPI); device backends will route the
 * same calls to NCCL. */
#include "model-impl.h"

#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "log.h"

duet_status mdl_comm_allreduce(mdl_model *m, void *buf, size_t n) {
    if (m->be->ops->act_dtype != DT_F32) return DUET_ERR_UNSUPPORTED;
    return comm_allreduce_f32(m->shard.tp, buf, n);
}

duet_status mdl_logits_collect(mdl_model *m, int n_out, float *logits) {
    const cfg_model *c = &m->cfg;
    int Vl = m->vocab_local, tp = m->shard.tp_size;
    float *host = m->buf.logits_host;
    duet_status st = m->be->ops->download(m->be, host, m->buf.logits, 0, (size_t)n_out * Vl);
    if (st != DUET_OK) return st;
    if (tp <= 1) {
        for (int r = 0; r < n_out; r++)
            memcpy(logits + (size_t)r * c->vocab_size, host + (size_t)r * Vl,
                   (size_t)c->vocab_size * sizeof(float));
        return DUET_OK;
    }
    /* gathered: [tp][n_out][Vl] -> logits [n_out][vocab] */
    float *all = malloc((size_t)tp * n_out * Vl * sizeof(float));
    if (!all) return DUET_ERR_NO_MEMORY;
    st = comm_allgather(m->shard.tp, host, all, (size_t)n_out * Vl * sizeof(float));
    if (st == DUET_OK) {
        for (int r = 0; r < n_out; r++)
            for (int k = 0; k < tp; k++) {
                int v0 = k * Vl, nv = v0 + Vl > c->vocab_size ? c->vocab_size - v0 : Vl;
                if (nv > 0)
                    memcpy(logits + (size_t)r * c->vocab_size + v0,
                           all + ((size_t)k * n_out + r) * Vl, (size_t)nv * sizeof(float));
            }
    }
    free(all);
    return st;
}

duet_status mdl_moe_dispatch(mdl_model *m, mdl_layer *ly, int T) {
    (void)m;
    (void)ly;
    (void)T;
    return DUET_ERR_UNSUPPORTED;
}

void mdl_ep_destroy(mdl_model *m) {
    (void)m;
}
