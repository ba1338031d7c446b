/* The collectives of a sharded forward pass (see collectives.h): TP all-reduce of row-parallel
 * outputs, vocabulary all-gather of logits, and EP all-to-all dispatch/combine of routed
 * experts' tokens. Host-memory backends move activations through comm's MPI collectives;
 * device backends (be_ops.on_device) through the device communicator they attached to the
 * group (NCCL). EP has two forms: with host routing (moe_route) the counts, expert ids and
 * weights go through MPI and the rows through exact-size all-to-alls; with device routing
 * (moe_route_dev) the rows travel in fixed-capacity blocks with their routing packed in, so
 * nothing waits for the host. The experts themselves run in the forward, between dispatch and
 * combine. */
#include "model/collectives.h"

#include <stdlib.h>
#include <string.h>

#include "dist/comm.h"

/* Expert-parallel state: host index lists and device staging buffers, grown on demand. */
typedef struct ep_state {
    int ep;
    int *send_counts, *recv_counts;          /* bytes per peer, for the current exchange */
    int *send_rows, *recv_rows;              /* rows per peer */
    int32_t *send_tok;                       /* [cap_send] token row of each sent record */
    int32_t *meta_send, *meta_recv;          /* per row: K expert ids, then K weights (bits) */
    int32_t *ids_recv;                       /* [cap_recv][K] */
    float *w_recv;                           /* [cap_recv][K] */
    size_t cap_send, cap_recv;               /* rows */
    void *x_send, *x_recv, *y_recv, *y_back; /* device activations, rows x D */
    /* device routing: this step's capacity, and blocks for dev_rows rows per peer */
    int cap;
    size_t dev_rows;
    void *d_send, *d_recv; /* [ep][cap] packed rows (be_ep_row_bytes) */
    void *d_y, *d_back;    /* [ep][cap][D] activations */
    int32_t *d_slot;       /* [cap][ep] (be_ops.moe_ep_pack) */
    bool dev_pending;      /* device all-to-alls enqueued since begin */
} ep_state;

struct mdl_coll {
    be_backend *be;
    mdl_plan plan;
    int D, K, vocab_size; /* hidden size, experts per token, unpadded vocabulary */
    int cap_out;
    void *logits_all;   /* [tp * cap_out, vocab_local]: the vocab gather of device backends */
    float *logits_host; /* host [(tp + 1) * cap_out, vocab_local]: local rows, then gathered */
    void *logits_rows;  /* tp > 1: [cap_out, tp * vocab_local], the gather in row order, left in
                           backend memory for sampling */
    int32_t *row_order; /* [tp * cap_out]: the gather's rows in that order */
    ep_state *ep;       /* NULL without EP */
};

static void logits_free(mdl_coll *c) {
    if (c->logits_all) c->be->ops->buf_free(c->be, c->logits_all);
    if (c->logits_rows) c->be->ops->buf_free(c->be, c->logits_rows);
    free(c->logits_host);
    free(c->row_order);
    c->logits_all = NULL;
    c->logits_rows = NULL;
    c->logits_host = NULL;
    c->row_order = NULL;
    c->cap_out = 0;
}

duet_status mdl_coll_reserve(mdl_coll *c, int n_out) {
    if (n_out <= c->cap_out) return DUET_OK;
    logits_free(c);
    int tp = c->plan.shard.tp_size;
    size_t rows = (size_t)n_out * c->plan.vocab_local;
    bool gather_dev = tp > 1 && c->be->ops->on_device;
    c->logits_all = gather_dev ? c->be->ops->buf_alloc(c->be, rows * tp) : NULL;
    c->logits_rows = tp > 1 ? c->be->ops->buf_alloc(c->be, rows * tp) : NULL;
    c->row_order = tp > 1 ? malloc((size_t)n_out * tp * sizeof(int32_t)) : NULL;
    c->logits_host = malloc(rows * (tp + 1) * sizeof(float));
    if ((gather_dev && !c->logits_all) || (tp > 1 && (!c->logits_rows || !c->row_order)) ||
        !c->logits_host) {
        logits_free(c);
        return DUET_ERR_NO_MEMORY;
    }
    c->cap_out = n_out;
    return DUET_OK;
}

duet_status mdl_coll_allreduce(mdl_coll *c, void *buf, size_t n) {
    const be_ops *o = c->be->ops;
    if (c->plan.shard.tp_size <= 1) return DUET_OK;
    if (o->on_device) return comm_dev_allreduce(c->plan.shard.tp, buf, n, o->act_dtype);
    if (o->act_dtype != DT_F32) return DUET_ERR_UNSUPPORTED;
    return comm_allreduce_f32(c->plan.shard.tp, buf, n);
}

/* all [tp][n_out][Vl] -> logits [n_out][vocab] (the padding past vocab_size dropped) */
static duet_status logits_reorder(mdl_coll *c, int n_out, const float *all, float *logits) {
    int Vl = c->plan.vocab_local, tp = c->plan.shard.tp_size, V = c->vocab_size;
    for (int r = 0; r < n_out; r++)
        for (int k = 0; k < tp; k++) {
            int v0 = k * Vl, nv = v0 + Vl > V ? V - v0 : Vl;
            if (nv > 0)
                memcpy(logits + (size_t)r * V + v0, all + ((size_t)k * n_out + r) * Vl,
                       (size_t)nv * sizeof(float));
        }
    return DUET_OK;
}

/* Device memory: gathered on the device into logits_all, then one download. */
static duet_status logits_collect_device(mdl_coll *c, const void *logits_dev, int n_out,
                                         float *logits) {
    const be_ops *o = c->be->ops;
    size_t n = (size_t)n_out * c->plan.vocab_local;
    duet_status st =
        comm_dev_allgather(c->plan.shard.tp, logits_dev, c->logits_all, n * dt_size(o->act_dtype));
    float *all = c->logits_host + n;
    if (st == DUET_OK)
        st = o->download(c->be, all, c->logits_all, 0, n * (size_t)c->plan.shard.tp_size);
    if (st != DUET_OK) return st;
    return logits_reorder(c, n_out, all, logits);
}

duet_status mdl_coll_logits(mdl_coll *c, const void *logits_dev, int n_out, float *logits) {
    int Vl = c->plan.vocab_local, tp = c->plan.shard.tp_size, V = c->vocab_size;
    float *host = c->logits_host;
    if (tp > 1 && c->be->ops->on_device) return logits_collect_device(c, logits_dev, n_out, logits);
    duet_status st = c->be->ops->download(c->be, host, logits_dev, 0, (size_t)n_out * Vl);
    if (st != DUET_OK) return st;
    if (tp <= 1) {
        for (int r = 0; r < n_out; r++)
            memcpy(logits + (size_t)r * V, host + (size_t)r * Vl, (size_t)V * sizeof(float));
        return DUET_OK;
    }
    /* gathered: [tp][n_out][Vl] -> logits [n_out][vocab]; logits_host holds tp * cap_out
     * rows of Vl, so the local part goes in slot 0 and the gather lands after it */
    float *all = host + (size_t)n_out * Vl;
    st = comm_allgather(c->plan.shard.tp, host, all, (size_t)n_out * Vl * sizeof(float));
    if (st != DUET_OK) return st;
    return logits_reorder(c, n_out, all, logits);
}

/* Sampling reads the logits where they are: the gather stays in backend memory. Device
 * memory: NCCL all-gather, then one row gather reorders [tp][n_out][Vl] into rows of
 * tp * Vl (the padding of the last slice stays, past vocab_size). Host memory: the MPI
 * gather as mdl_coll_logits does it, reordered into rows of vocab_size. */
duet_status mdl_coll_logits_gather(mdl_coll *c, const void *logits_dev, int n_out,
                                   const void **rows_p, int *stride_p) {
    const be_ops *o = c->be->ops;
    int Vl = c->plan.vocab_local, tp = c->plan.shard.tp_size;
    if (n_out > c->cap_out) return DUET_ERR_INVALID;
    if (tp <= 1) {
        *rows_p = logits_dev;
        *stride_p = Vl;
        return DUET_OK;
    }
    size_t n = (size_t)n_out * Vl;
    duet_status st;
    if (o->on_device) {
        st = comm_dev_allgather(c->plan.shard.tp, logits_dev, c->logits_all,
                                n * dt_size(o->act_dtype));
        if (st != DUET_OK) return st;
        for (int r = 0; r < n_out; r++)
            for (int k = 0; k < tp; k++) c->row_order[r * tp + k] = k * n_out + r;
        o->gather_rows(c->be, c->logits_rows, c->logits_all, c->row_order, n_out * tp, Vl);
        *rows_p = c->logits_rows;
        *stride_p = tp * Vl;
        return DUET_OK;
    }
    if (o->act_dtype != DT_F32) return DUET_ERR_UNSUPPORTED; /* host buffers hold float32 */
    float *host = c->logits_host, *all = host + n;
    st = o->download(c->be, host, logits_dev, 0, n);
    if (st == DUET_OK) st = comm_allgather(c->plan.shard.tp, host, all, n * sizeof(float));
    if (st == DUET_OK) st = logits_reorder(c, n_out, all, c->logits_rows);
    if (st != DUET_OK) return st;
    *rows_p = c->logits_rows;
    *stride_p = c->vocab_size;
    return DUET_OK;
}

static duet_status ep_reserve(mdl_coll *c, size_t n_send, size_t n_recv) {
    ep_state *s = c->ep;
    be_backend *be = c->be;
    size_t D = (size_t)c->D, K = (size_t)c->K;
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

static duet_status ep_init(mdl_coll *c) {
    int ep = c->plan.shard.ep_size;
    ep_state *s = calloc(1, sizeof *s);
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
    c->ep = s;
    return DUET_OK;
}

static void ep_dev_free(mdl_coll *c) {
    ep_state *s = c->ep;
    be_backend *be = c->be;
    void *bufs[4] = {s->d_send, s->d_recv, s->d_y, s->d_back};
    for (int i = 0; i < 4; i++)
        if (bufs[i]) be->ops->buf_free(be, bufs[i]);
    if (s->d_slot) be->ops->mem_free(be, s->d_slot);
    s->d_send = s->d_recv = s->d_y = s->d_back = NULL;
    s->d_slot = NULL;
    s->dev_rows = 0;
}

static void ep_destroy(mdl_coll *c) {
    ep_state *s = c->ep;
    if (!s) return;
    be_backend *be = c->be;
    ep_dev_free(c);
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
    c->ep = NULL;
}

duet_status mdl_coll_create(be_backend *be, const cfg_model *cfg, const mdl_plan *plan,
                            mdl_coll **coll_p) {
    mdl_coll *c = calloc(1, sizeof *c);
    if (!c) return DUET_ERR_NO_MEMORY;
    c->be = be;
    c->plan = *plan;
    c->D = cfg->hidden_size;
    c->K = cfg->num_experts_per_tok;
    c->vocab_size = cfg->vocab_size;
    duet_status st = plan->shard.ep_size > 1 ? ep_init(c) : DUET_OK;
    if (st != DUET_OK) {
        free(c);
        return st;
    }
    *coll_p = c;
    return DUET_OK;
}

void mdl_coll_destroy(mdl_coll *c) {
    if (!c) return;
    logits_free(c);
    ep_destroy(c);
    free(c);
}

/* Activations through the EP group's all-to-all: NCCL for device memory, MPI for host
 * memory (where the CPU backend keeps activations). */
static duet_status ep_alltoallv_act(mdl_coll *c, const void *send, const int *send_rows, void *recv,
                                    const int *recv_rows) {
    ep_state *s = c->ep;
    size_t row = (size_t)c->D * dt_size(c->be->ops->act_dtype);
    for (int r = 0; r < s->ep; r++) {
        s->send_counts[r] = (int)(send_rows[r] * row);
        s->recv_counts[r] = (int)(recv_rows[r] * row);
    }
    if (c->be->ops->on_device)
        return comm_dev_alltoallv(c->plan.shard.ep, send, s->send_counts, recv, s->recv_counts);
    if (c->be->ops->act_dtype != DT_F32) return DUET_ERR_UNSUPPORTED;
    return comm_alltoallv(c->plan.shard.ep, send, s->send_counts, recv, s->recv_counts);
}

/* Routed experts over the EP group, first half. This TP rank sends the tokens it is
 * responsible for (every tp-th one: all TP ranks hold the same tokens) to the ranks owning
 * their experts; the caller runs the tokens it receives through its own experts; combine sums
 * what comes back. Tokens of other TP ranks stay zero here: the TP all-reduce after the MoE
 * layer completes them. Every rank joins every exchange, with zero rows if it has none. */
duet_status mdl_coll_dispatch(mdl_coll *c, const void *x, const int32_t *ids_in, const float *w_in,
                              int T, mdl_ep_rows *rows_p) {
    ep_state *s = c->ep;
    if (!s) return DUET_ERR_INTERNAL; /* created without EP: the forward never calls then */
    const be_ops *o = c->be->ops;
    be_backend *be = c->be;
    int ep = s->ep, K = c->K, D = c->D;
    int per_rank = c->plan.n_local_experts, tp = c->plan.shard.tp_size;
    int tpr = c->plan.shard.tp_rank;
    int mine = T > tpr ? (T - tpr + tp - 1) / tp : 0;
    duet_status st = ep_reserve(c, (size_t)mine * (size_t)(K < ep ? K : ep) + 1, 1);
    if (st != DUET_OK) return st;

    /* records grouped by destination rank, in token order within a group */
    int n_send = 0;
    for (int r = 0; r < ep; r++) {
        s->send_rows[r] = 0;
        for (int t = tpr; t < T; t += tp) {
            const int32_t *ids = ids_in + (size_t)t * K;
            int hit = 0;
            for (int k = 0; k < K && !hit; k++) hit = ids[k] / per_rank == r;
            if (!hit) continue;
            s->send_tok[n_send] = t;
            int32_t *meta = s->meta_send + (size_t)n_send * 2 * K;
            memcpy(meta, ids, (size_t)K * sizeof(int32_t));
            memcpy(meta + K, w_in + (size_t)t * K, (size_t)K * sizeof(float));
            n_send++;
            s->send_rows[r]++;
        }
    }
    for (int r = 0; r < ep; r++) s->send_counts[r] = s->send_rows[r];
    st = comm_alltoall_counts(c->plan.shard.ep, s->send_counts, s->recv_rows);
    if (st != DUET_OK) return st;
    int n_recv = 0;
    for (int r = 0; r < ep; r++) n_recv += s->recv_rows[r];
    st = ep_reserve(c, (size_t)n_send, (size_t)n_recv);
    if (st != DUET_OK) return st;

    if (n_send) o->gather_rows(be, s->x_send, x, s->send_tok, n_send, D);
    st = ep_alltoallv_act(c, s->x_send, s->send_rows, s->x_recv, s->recv_rows);
    if (st != DUET_OK) return st;
    for (int r = 0; r < ep; r++) {
        s->send_counts[r] = s->send_rows[r] * 2 * K * (int)sizeof(int32_t);
        s->recv_counts[r] = s->recv_rows[r] * 2 * K * (int)sizeof(int32_t);
    }
    st = comm_alltoallv(c->plan.shard.ep, s->meta_send, s->send_counts, s->meta_recv,
                        s->recv_counts);
    if (st != DUET_OK) return st;

    /* meta rows are [ids K][weights K]; split into the two arrays moe_experts reads */
    for (int i = 0; i < n_recv; i++) {
        memcpy(s->ids_recv + (size_t)i * K, s->meta_recv + (size_t)i * 2 * K, (size_t)K * 4);
        memcpy(s->w_recv + (size_t)i * K, s->meta_recv + (size_t)i * 2 * K + K, (size_t)K * 4);
    }
    *rows_p = (mdl_ep_rows){
        .n = n_recv, .x = s->x_recv, .ids = s->ids_recv, .weights = s->w_recv, .y = s->y_recv};
    return DUET_OK;
}

/* Second half: the experts' output goes back the way the tokens came and is summed per token
 * into out. */
duet_status mdl_coll_combine(mdl_coll *c, void *out, int T) {
    ep_state *s = c->ep;
    if (!s) return DUET_ERR_INTERNAL;
    const be_ops *o = c->be->ops;
    be_backend *be = c->be;
    int ep = s->ep, D = c->D;
    duet_status st = ep_alltoallv_act(c, s->y_recv, s->recv_rows, s->y_back, s->send_rows);
    if (st != DUET_OK) return st;
    if (T > 0) o->zero(be, out, (size_t)T * D);
    for (int r = 0, at = 0; r < ep; r++) {
        /* within one destination a token appears once: scatter indices are distinct */
        if (s->send_rows[r])
            o->scatter_add_rows(be, out,
                                (const char *)s->y_back + (size_t)at * D * dt_size(o->act_dtype),
                                s->send_tok + at, s->send_rows[r], D);
        at += s->send_rows[r];
    }
    return DUET_OK;
}

/* ---- EP with device routing ---- */

static be_ep_layout ep_layout(const mdl_coll *c) {
    return (be_ep_layout){.ep = c->ep->ep,
                          .cap = c->ep->cap,
                          .tp = c->plan.shard.tp_size,
                          .tp_rank = c->plan.shard.tp_rank,
                          .experts_per_rank = c->plan.n_local_experts,
                          .D = c->D,
                          .K = c->K};
}

static size_t act_bytes(const mdl_coll *c) {
    return dt_size(c->be->ops->act_dtype);
}

duet_status mdl_coll_ep_begin(mdl_coll *c, int T) {
    ep_state *s = c->ep;
    if (!s) return DUET_ERR_INTERNAL;
    const be_ops *o = c->be->ops;
    be_backend *be = c->be;
    int tp = c->plan.shard.tp_size, tpr = c->plan.shard.tp_rank;
    long long most = T > tpr ? (T - tpr + tp - 1) / tp : 0;
    duet_status st = comm_allreduce_i64(c->plan.shard.ep, &most, 1, true);
    if (st != DUET_OK) return st;
    size_t row = be_ep_row_bytes(c->D, c->K, act_bytes(c));
    /* the host all-to-all counts bytes in int */
    if (most > (long long)(0x7fffffff / row / 2)) return DUET_ERR_UNSUPPORTED;
    s->cap = most > 0 ? (int)most : 1;
    s->dev_pending = false;
    if ((size_t)s->cap <= s->dev_rows) return DUET_OK;
    /* grown to a power of two: buckets of a growing batch reuse one allocation */
    size_t rows = 16;
    while (rows < (size_t)s->cap) rows *= 2;
    ep_dev_free(c);
    size_t blocks = rows * (size_t)s->ep, elems = row / act_bytes(c);
    s->d_send = o->buf_alloc(be, blocks * elems);
    s->d_recv = o->buf_alloc(be, blocks * elems);
    s->d_y = o->buf_alloc(be, blocks * (size_t)c->D);
    s->d_back = o->buf_alloc(be, blocks * (size_t)c->D);
    s->d_slot = o->mem_alloc(be, blocks * sizeof(int32_t));
    if (!s->d_send || !s->d_recv || !s->d_y || !s->d_back || !s->d_slot) {
        ep_dev_free(c);
        return DUET_ERR_NO_MEMORY;
    }
    s->dev_rows = rows;
    return DUET_OK;
}

/* [ep][bytes_each] blocks each way: the device communicator (enqueued only) or MPI. */
static duet_status ep_exchange(mdl_coll *c, const void *send, void *recv, size_t bytes_each) {
    ep_state *s = c->ep;
    if (c->be->ops->on_device) {
        s->dev_pending = true;
        return comm_dev_alltoall_async(c->plan.shard.ep, send, recv, bytes_each);
    }
    for (int r = 0; r < s->ep; r++) s->send_counts[r] = s->recv_counts[r] = (int)bytes_each;
    return comm_alltoallv(c->plan.shard.ep, send, s->send_counts, recv, s->recv_counts);
}

duet_status mdl_coll_dispatch_dev(mdl_coll *c, const void *x, const int32_t *ids,
                                  const float *weights, int T, be_moe_rows *rows_p, void **y_p) {
    ep_state *s = c->ep;
    if (!s || !s->dev_rows) return DUET_ERR_INTERNAL; /* begin first */
    const be_ops *o = c->be->ops;
    be_ep_layout l = ep_layout(c);
    size_t act = act_bytes(c), row = be_ep_row_bytes(c->D, c->K, act);
    o->moe_ep_pack(c->be, s->d_send, x, T, ids, weights, &l, s->d_slot);
    duet_status st = ep_exchange(c, s->d_send, s->d_recv, (size_t)s->cap * row);
    if (st != DUET_OK) return st;
    const int32_t *meta = (const int32_t *)((const char *)s->d_recv + be_ep_meta_offset(c->D, act));
    *rows_p = (be_moe_rows){.n = s->ep * s->cap,
                            .D = c->D,
                            .K = c->K,
                            .x = s->d_recv,
                            .x_stride = (int)(row / act),
                            .ids = meta,
                            .weights = (const float *)(meta + c->K),
                            .meta_stride = (int)(row / 4),
                            /* the tokens of all ranks spread over ep ranks' experts */
                            .pairs_hint = s->cap * c->K};
    *y_p = s->d_y;
    return DUET_OK;
}

duet_status mdl_coll_combine_dev(mdl_coll *c, void *out, int T) {
    ep_state *s = c->ep;
    if (!s || !s->dev_rows) return DUET_ERR_INTERNAL;
    be_ep_layout l = ep_layout(c);
    duet_status st = ep_exchange(c, s->d_y, s->d_back, (size_t)s->cap * c->D * act_bytes(c));
    if (st != DUET_OK) return st;
    c->be->ops->moe_ep_unpack(c->be, out, s->d_back, T, &l, s->d_slot);
    return DUET_OK;
}

duet_status mdl_coll_ep_end(mdl_coll *c) {
    ep_state *s = c->ep;
    if (!s || !s->dev_pending) return DUET_OK;
    s->dev_pending = false;
    return comm_dev_wait(c->plan.shard.ep);
}
