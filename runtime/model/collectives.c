/* The collectives of a sharded forward pass: TP all-reduce of row-parallel outputs, vocabulary
 * all-gather of logits, and EP all-to-all dispatch/combine of routed experts' tokens.
 * Host-memory backends move activations through comm's MPI collectives; device backends
 * (be_ops.on_device) through the device communicator they attached to the group (NCCL).
 * Routing metadata (counts, expert ids, weights) is host data and always goes through MPI. */
#include "model/model-impl.h"

#include <stdlib.h>
#include <string.h>

#include "dist/comm.h"
#include "base/log.h"

duet_status mdl_comm_allreduce(mdl_model *m, void *buf, size_t n) {
    if (m->be->ops->on_device)
        return comm_dev_allreduce(m->shard.tp, buf, n, m->be->ops->act_dtype);
    if (m->be->ops->act_dtype != DT_F32) return DUET_ERR_UNSUPPORTED;
    return comm_allreduce_f32(m->shard.tp, buf, n);
}

/* all [tp][n_out][Vl] -> logits [n_out][vocab] (the padding past vocab_size dropped) */
static duet_status logits_reorder(mdl_model *m, int n_out, const float *all, float *logits) {
    const cfg_model *c = &m->cfg;
    int Vl = m->vocab_local, tp = m->shard.tp_size;
    for (int r = 0; r < n_out; r++)
        for (int k = 0; k < tp; k++) {
            int v0 = k * Vl, nv = v0 + Vl > c->vocab_size ? c->vocab_size - v0 : Vl;
            if (nv > 0)
                memcpy(logits + (size_t)r * c->vocab_size + v0, all + ((size_t)k * n_out + r) * Vl,
                       (size_t)nv * sizeof(float));
        }
    return DUET_OK;
}

/* Device memory: gathered on the device into buf.logits_all, then one download. */
static duet_status logits_collect_device(mdl_model *m, int n_out, float *logits) {
    const be_ops *o = m->be->ops;
    size_t n = (size_t)n_out * m->vocab_local;
    duet_status st = comm_dev_allgather(m->shard.tp, m->buf.logits, m->buf.logits_all,
                                        n * dt_size(o->act_dtype));
    float *all = m->buf.logits_host + n;
    if (st == DUET_OK)
        st = o->download(m->be, all, m->buf.logits_all, 0, n * (size_t)m->shard.tp_size);
    if (st != DUET_OK) return st;
    return logits_reorder(m, n_out, all, logits);
}

duet_status mdl_logits_collect(mdl_model *m, int n_out, float *logits) {
    const cfg_model *c = &m->cfg;
    int Vl = m->vocab_local, tp = m->shard.tp_size;
    float *host = m->buf.logits_host;
    if (tp > 1 && m->be->ops->on_device) return logits_collect_device(m, n_out, logits);
    duet_status st = m->be->ops->download(m->be, host, m->buf.logits, 0, (size_t)n_out * Vl);
    if (st != DUET_OK) return st;
    if (tp <= 1) {
        for (int r = 0; r < n_out; r++)
            memcpy(logits + (size_t)r * c->vocab_size, host + (size_t)r * Vl,
                   (size_t)c->vocab_size * sizeof(float));
        return DUET_OK;
    }
    /* gathered: [tp][n_out][Vl] -> logits [n_out][vocab]; logits_host holds tp * cap_out
     * rows of Vl, so the local part goes in slot 0 and the gather lands after it */
    float *all = host + (size_t)n_out * Vl;
    st = comm_allgather(m->shard.tp, host, all, (size_t)n_out * Vl * sizeof(float));
    if (st != DUET_OK) return st;
    return logits_reorder(m, n_out, all, logits);
}

/* Expert-parallel state: host index lists and device staging buffers, grown on demand. */
struct mdl_ep_state {
    int ep;
    int *send_counts, *recv_counts;          /* bytes per peer, for the current exchange */
    int *send_rows, *recv_rows;              /* rows per peer */
    int32_t *send_tok;                       /* [cap_send] token row of each sent record */
    int32_t *meta_send, *meta_recv;          /* per row: K expert ids, then K weights (bits) */
    int32_t *ids_recv;                       /* [cap_recv][K] */
    float *w_recv;                           /* [cap_recv][K] */
    size_t cap_send, cap_recv;               /* rows */
    void *x_send, *x_recv, *y_recv, *y_back; /* device activations, rows x D */
};

static duet_status ep_reserve(mdl_model *m, size_t n_send, size_t n_recv) {
    mdl_ep_state *s = m->ep;
    be_backend *be = m->be;
    size_t D = (size_t)m->cfg.hidden_size, K = (size_t)m->cfg.num_experts_per_tok;
    if (n_send > s->cap_send) {
        size_t cap = n_send * 2;
        be->ops->buf_free(be, s->x_send);
        be->ops->buf_free(be, s->y_back);
        free(s->send_tok);
        free(s->meta_send);
        s->x_send = be->ops->buf_alloc(be, cap * D);
        s->y_back = be->ops->buf_alloc(be, cap * D);
        s->send_tok = malloc(cap * sizeof(int32_t));
        s->meta_send = malloc(cap * K * 2 * sizeof(int32_t));
        s->cap_send = cap;
        if (!s->x_send || !s->y_back || !s->send_tok || !s->meta_send) {
            s->cap_send = 0;
            return DUET_ERR_NO_MEMORY;
        }
    }
    if (n_recv > s->cap_recv) {
        size_t cap = n_recv * 2;
        be->ops->buf_free(be, s->x_recv);
        be->ops->buf_free(be, s->y_recv);
        free(s->meta_recv);
        free(s->ids_recv);
        free(s->w_recv);
        s->x_recv = be->ops->buf_alloc(be, cap * D);
        s->y_recv = be->ops->buf_alloc(be, cap * D);
        s->meta_recv = malloc(cap * K * 2 * sizeof(int32_t));
        s->ids_recv = malloc(cap * K * sizeof(int32_t));
        s->w_recv = malloc(cap * K * sizeof(float));
        s->cap_recv = cap;
        if (!s->x_recv || !s->y_recv || !s->meta_recv || !s->ids_recv || !s->w_recv) {
            s->cap_recv = 0;
            return DUET_ERR_NO_MEMORY;
        }
    }
    return DUET_OK;
}

static duet_status ep_init(mdl_model *m) {
    if (m->ep) return DUET_OK;
    int ep = m->shard.ep_size;
    mdl_ep_state *s = calloc(1, sizeof *s);
    if (!s) return DUET_ERR_NO_MEMORY;
    s->ep = ep;
    s->send_counts = calloc((size_t)ep * 4, sizeof(int));
    if (!s->send_counts) {
        free(s);
        return DUET_ERR_NO_MEMORY;
    }
    s->recv_counts = s->send_counts + ep;
    s->send_rows = s->recv_counts + ep;
    s->recv_rows = s->send_rows + ep;
    m->ep = s;
    return DUET_OK;
}

void mdl_ep_destroy(mdl_model *m) {
    mdl_ep_state *s = m->ep;
    if (!s) return;
    be_backend *be = m->be;
    void *bufs[4] = {s->x_send, s->x_recv, s->y_recv, s->y_back};
    for (int i = 0; i < 4; i++)
        if (bufs[i]) be->ops->buf_free(be, bufs[i]);
    free(s->send_counts);
    free(s->send_tok);
    free(s->meta_send);
    free(s->meta_recv);
    free(s->ids_recv);
    free(s->w_recv);
    free(s);
    m->ep = NULL;
}

/* Activations through the EP group's all-to-all: NCCL for device memory, MPI for host
 * memory (where the CPU backend keeps activations). */
static duet_status ep_alltoallv_act(mdl_model *m, const void *send, const int *send_rows,
                                    void *recv, const int *recv_rows) {
    mdl_ep_state *s = m->ep;
    size_t row = (size_t)m->cfg.hidden_size * dt_size(m->be->ops->act_dtype);
    for (int r = 0; r < s->ep; r++) {
        s->send_counts[r] = (int)(send_rows[r] * row);
        s->recv_counts[r] = (int)(recv_rows[r] * row);
    }
    if (m->be->ops->on_device)
        return comm_dev_alltoallv(m->shard.ep, send, s->send_counts, recv, s->recv_counts);
    if (m->be->ops->act_dtype != DT_F32) return DUET_ERR_UNSUPPORTED;
    return comm_alltoallv(m->shard.ep, send, s->send_counts, recv, s->recv_counts);
}

/* Routed experts over the EP group. This TP rank sends the tokens it is responsible for
 * (every tp-th one: all TP ranks hold the same tokens) to the ranks owning their experts,
 * runs the tokens it receives through its own experts, and sums what comes back into
 * buf.o. Tokens of other TP ranks stay zero here: the TP all-reduce after the MoE layer
 * completes them. Every rank joins every exchange, with zero rows if it has none. */
duet_status mdl_moe_dispatch(mdl_model *m, mdl_layer *ly, int T) {
    duet_status st = ep_init(m);
    if (st != DUET_OK) return st;
    mdl_ep_state *s = m->ep;
    const be_ops *o = m->be->ops;
    be_backend *be = m->be;
    int ep = s->ep, K = m->cfg.num_experts_per_tok, D = m->cfg.hidden_size;
    int per_rank = m->n_local_experts, tp = m->shard.tp_size, tpr = m->shard.tp_rank;
    int mine = T > tpr ? (T - tpr + tp - 1) / tp : 0;
    st = ep_reserve(m, (size_t)mine * (size_t)(K < ep ? K : ep) + 1, 1);
    if (st != DUET_OK) return st;

    /* records grouped by destination rank, in token order within a group */
    int n_send = 0;
    for (int r = 0; r < ep; r++) {
        s->send_rows[r] = 0;
        for (int t = tpr; t < T; t += tp) {
            const int32_t *ids = m->buf.ids + (size_t)t * K;
            int hit = 0;
            for (int k = 0; k < K && !hit; k++) hit = ids[k] / per_rank == r;
            if (!hit) continue;
            s->send_tok[n_send] = t;
            int32_t *meta = s->meta_send + (size_t)n_send * 2 * K;
            memcpy(meta, ids, (size_t)K * sizeof(int32_t));
            memcpy(meta + K, m->buf.weights + (size_t)t * K, (size_t)K * sizeof(float));
            n_send++;
            s->send_rows[r]++;
        }
    }
    for (int r = 0; r < ep; r++) s->send_counts[r] = s->send_rows[r];
    st = comm_alltoall_counts(m->shard.ep, s->send_counts, s->recv_rows);
    if (st != DUET_OK) return st;
    int n_recv = 0;
    for (int r = 0; r < ep; r++) n_recv += s->recv_rows[r];
    st = ep_reserve(m, (size_t)n_send, (size_t)n_recv);
    if (st != DUET_OK) return st;

    if (n_send) o->gather_rows(be, s->x_send, m->buf.xn, s->send_tok, n_send, D);
    st = ep_alltoallv_act(m, s->x_send, s->send_rows, s->x_recv, s->recv_rows);
    if (st != DUET_OK) return st;
    for (int r = 0; r < ep; r++) {
        s->send_counts[r] = s->send_rows[r] * 2 * K * (int)sizeof(int32_t);
        s->recv_counts[r] = s->recv_rows[r] * 2 * K * (int)sizeof(int32_t);
    }
    st = comm_alltoallv(m->shard.ep, s->meta_send, s->send_counts, s->meta_recv, s->recv_counts);
    if (st != DUET_OK) return st;

    /* this rank's experts over what it received; ids of other ranks' experts are skipped */
    if (n_recv) {
        /* meta rows are [ids K][weights K]; split into the two arrays moe_experts reads */
        for (int i = 0; i < n_recv; i++) {
            memcpy(s->ids_recv + (size_t)i * K, s->meta_recv + (size_t)i * 2 * K, (size_t)K * 4);
            memcpy(s->w_recv + (size_t)i * K, s->meta_recv + (size_t)i * 2 * K + K, (size_t)K * 4);
        }
        st = mdl_moe_local(m, ly, s->y_recv, s->x_recv, n_recv, s->ids_recv, s->w_recv);
        if (st != DUET_OK) return st;
    }
    /* results go back the way the tokens came */
    st = ep_alltoallv_act(m, s->y_recv, s->recv_rows, s->y_back, s->send_rows);
    if (st != DUET_OK) return st;
    if (T > 0) o->zero(be, m->buf.o, (size_t)T * D);
    for (int r = 0, at = 0; r < ep; r++) {
        /* within one destination a token appears once: scatter indices are distinct */
        if (s->send_rows[r])
            o->scatter_add_rows(be, m->buf.o,
                                (const char *)s->y_back + (size_t)at * D * dt_size(o->act_dtype),
                                s->send_tok + at, s->send_rows[r], D);
        at += s->send_rows[r];
    }
    return DUET_OK;
}
