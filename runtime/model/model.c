/* DeepSeek V2/V3 forward pass over the backend ops (see model.h). The layer structure follows
 * DeepSeek's reference inference/model.py: MLA with the latent KV cache, dense MLP for the
 * first layers, routed + shared experts after. Loading lives in model_load.c. */
#include "model/model-impl.h"

#include <stdlib.h>
#include <string.h>

#include "base/log.h"

const cfg_model *mdl_config(const mdl_model *m) {
    return &m->cfg;
}

be_backend *mdl_backend(const mdl_model *m) {
    return m->be;
}

size_t mdl_kv_bytes_per_token(const mdl_model *m) {
    return (size_t)m->cfg.num_hidden_layers * (size_t)m->kv_dim * dt_size(m->be->ops->act_dtype);
}

duet_status mdl_kv_create(mdl_model *m, int n_blocks, int block_size, be_kv **kv_p) {
    if (n_blocks <= 0 || block_size <= 0) return DUET_ERR_INVALID;
    return m->be->ops->kv_create(m->be, n_blocks, m->cfg.num_hidden_layers, block_size, m->kv_dim,
                                 kv_p);
}

void mdl_kv_destroy(mdl_model *m, be_kv *kv) {
    if (kv) m->be->ops->kv_destroy(m->be, kv);
}

/* Sums partial results over the TP group (row-parallel layers). */
static duet_status tp_allreduce(mdl_model *m, void *buf, size_t n) {
    if (m->shard.tp_size <= 1) return DUET_OK;
    return mdl_comm_allreduce(m, buf, n);
}

/* Fills the host-side batch description and hands it to the backend. */
static duet_status prepare_batch(mdl_model *m, be_kv *kv, const mdl_seq *seqs, int n_seqs, int T) {
    mdl_step *s = &m->step;
    int bs = kv->block_size, max_blocks = 1;
    for (int i = 0; i < n_seqs; i++)
        max_blocks = seqs[i].n_blocks > max_blocks ? seqs[i].n_blocks : max_blocks;
    duet_status st = mdl_step_reserve(s, T, n_seqs, max_blocks);
    if (st != DUET_OK) return st;
    int t = 0;
    s->seq_start[0] = 0;
    for (int i = 0; i < n_seqs; i++) {
        const mdl_seq *q = &seqs[i];
        if (q->n_tokens < 0 || q->pos0 < 0 || q->n_logits < 0 || q->n_logits > q->n_tokens ||
            (int64_t)q->pos0 + q->n_tokens > (int64_t)q->n_blocks * bs) {
            LOG_ERROR("model: sequence %d of the step is malformed (pos0 %d, %d tokens, %d "
                      "blocks of %d)",
                      i, q->pos0, q->n_tokens, q->n_blocks, bs);
            return DUET_ERR_INVALID;
        }
        for (int j = 0; j < q->n_blocks; j++) {
            if (q->block_table[j] < 0 || q->block_table[j] >= kv->n_blocks) {
                LOG_ERROR("model: block id %d is outside the pool of %d", q->block_table[j],
                          kv->n_blocks);
                return DUET_ERR_INVALID;
            }
        }
        for (int j = 0; j < q->n_tokens; j++, t++) {
            int32_t tok = q->tokens[j];
            if (tok < 0 || tok >= m->cfg.vocab_size) {
                LOG_ERROR("model: token id %d is outside the vocabulary (%d)", tok,
                          m->cfg.vocab_size);
                return DUET_ERR_INVALID;
            }
            int pos = q->pos0 + j;
            s->tokens[t] = tok;
            s->token_pos[t] = pos;
            s->token_slot[t] = q->block_table[pos / bs] * bs + pos % bs;
        }
        s->seq_start[i + 1] = t;
        s->seq_ctx[i] = q->pos0 + q->n_tokens;
        memcpy(s->block_table + (size_t)i * max_blocks, q->block_table,
               (size_t)q->n_blocks * sizeof(int32_t));
    }
    be_batch b = {
        .n_tokens = T,
        .n_seqs = n_seqs,
        .token_pos = s->token_pos,
        .token_slot = s->token_slot,
        .seq_start = s->seq_start,
        .seq_ctx = s->seq_ctx,
        .block_table = s->block_table,
        .max_blocks = max_blocks,
    };
    return m->be->ops->set_batch(m->be, &b);
}

/* x[T, D] -> out[T, D] through a SwiGLU MLP (possibly this rank's slice of it). */
static void ffn(mdl_model *m, void *out, const void *x, int T, const be_ffn *f) {
    const be_ops *o = m->be->ops;
    int I = f->n_inter;
    o->linear(m->be, m->buf.gu, x, m->cfg.hidden_size, T, f->gate_up);
    o->silu_mul(m->be, m->buf.act, m->buf.gu, T, I);
    o->linear(m->be, out, m->buf.act, I, T, f->down);
}

static duet_status attention(mdl_model *m, be_kv *kv, int l, int T) {
    const be_ops *o = m->be->ops;
    const cfg_model *c = &m->cfg;
    mdl_layer *ly = &m->layers[l];
    int D = c->hidden_size, L = c->kv_lora_rank, R = c->qk_rope_head_dim;
    int nope = c->qk_nope_head_dim, qk = nope + R, H = m->n_heads_local;
    be_backend *be = m->be;

    o->rmsnorm(be, m->buf.xn, D, m->buf.h, D, ly->attn_norm, T, D, c->rms_norm_eps);
    if (c->q_lora_rank) {
        o->linear(be, m->buf.qa, m->buf.xn, D, T, ly->q_a);
        o->rmsnorm(be, m->buf.qa, c->q_lora_rank, m->buf.qa, c->q_lora_rank, ly->q_a_norm, T,
                   c->q_lora_rank, c->rms_norm_eps);
        o->linear(be, m->buf.q, m->buf.qa, c->q_lora_rank, T, ly->q_b);
    } else {
        o->linear(be, m->buf.q, m->buf.xn, D, T, ly->q);
    }
    /* kva[T, L + R]: the latent (normalized) and the shared rope key */
    o->linear(be, m->buf.kva, m->buf.xn, D, T, ly->kv_a);
    o->rmsnorm(be, m->buf.kva, L + R, m->buf.kva, L + R, ly->kv_a_norm, T, L, c->rms_norm_eps);
    o->rope(be, m->buf.q, T, H * qk, H, qk, nope, R);
    o->rope(be, m->buf.kva, T, L + R, 1, 0, L, R);
    o->kv_write(be, kv, l, m->buf.kva, L + R);
    o->mla_attention(be, m->buf.attn, m->buf.q, kv, l, ly->kv_b, H, nope, R, c->v_head_dim,
                     m->softmax_scale);
    o->linear(be, m->buf.o, m->buf.attn, H * c->v_head_dim, T, ly->o);
    duet_status st = tp_allreduce(m, m->buf.o, (size_t)T * D);
    if (st != DUET_OK) return st;
    o->add(be, m->buf.h, m->buf.o, (size_t)T * D);
    return DUET_OK;
}

static duet_status mlp(mdl_model *m, int l, int T) {
    const be_ops *o = m->be->ops;
    const cfg_model *c = &m->cfg;
    mdl_layer *ly = &m->layers[l];
    int D = c->hidden_size;
    be_backend *be = m->be;
    duet_status st;

    o->rmsnorm(be, m->buf.xn, D, m->buf.h, D, ly->ffn_norm, T, D, c->rms_norm_eps);
    if (!ly->moe) {
        ffn(m, m->buf.o, m->buf.xn, T, &ly->dense);
    } else {
        st = mdl_moe(m, ly, T);
        if (st != DUET_OK) return st;
    }
    st = tp_allreduce(m, m->buf.o, (size_t)T * D);
    if (st != DUET_OK) return st;
    o->add(be, m->buf.h, m->buf.o, (size_t)T * D);
    return DUET_OK;
}

duet_status mdl_moe_local(mdl_model *m, mdl_layer *ly, void *out, const void *x, int T,
                          const int32_t *ids, const float *w) {
    const be_ops *o = m->be->ops;
    o->zero(m->be, out, (size_t)T * m->cfg.hidden_size);
    o->moe_experts(m->be, out, x, T, m->cfg.hidden_size, ids, w, m->cfg.num_experts_per_tok,
                   ly->experts, m->expert0, m->n_local_experts);
    return DUET_OK;
}

duet_status mdl_moe(mdl_model *m, mdl_layer *ly, int T) {
    const be_ops *o = m->be->ops;
    be_backend *be = m->be;
    duet_status st;
    if (T > 0) {
        st = o->moe_route(be, m->buf.xn, T, ly->gate, ly->gate_bias, &m->route, m->buf.ids,
                          m->buf.weights);
        if (st != DUET_OK) return st;
    }
    if (m->shard.ep_size > 1) {
        st = mdl_moe_dispatch(m, ly, T); /* routed experts over the EP group into buf.o */
    } else {
        st = mdl_moe_local(m, ly, m->buf.o, m->buf.xn, T, m->buf.ids, m->buf.weights);
    }
    if (st != DUET_OK) return st;
    if (ly->shared.gate_up && T > 0) {
        ffn(m, m->buf.o2, m->buf.xn, T, &ly->shared);
        o->add(be, m->buf.o, m->buf.o2, (size_t)T * m->cfg.hidden_size);
    }
    return DUET_OK;
}

duet_status mdl_forward(mdl_model *m, be_kv *kv, const mdl_seq *seqs, int n_seqs, float *logits) {
    const be_ops *o = m->be->ops;
    const cfg_model *c = &m->cfg;
    be_backend *be = m->be;
    int D = c->hidden_size;
    int T = 0, n_out = 0;
    for (int i = 0; i < n_seqs; i++) {
        T += seqs[i].n_tokens;
        n_out += seqs[i].n_logits;
    }
    duet_status st = mdl_reserve(m, T, n_out);
    if (st != DUET_OK) return st;
    if (T == 0) {
        /* an empty step: nothing to compute, but expert parallelism's all-to-alls of every
         * MoE layer must still be joined so the other DP groups can step */
        for (int l = 0; l < c->num_hidden_layers && st == DUET_OK; l++)
            if (m->layers[l].moe && m->shard.ep_size > 1)
                st = mdl_moe_dispatch(m, &m->layers[l], 0);
        return st;
    }
    st = prepare_batch(m, kv, seqs, n_seqs, T);
    if (st != DUET_OK) return st;

    o->embed(be, m->buf.h, m->step.tokens, T, m->embed, m->vocab0);
    st = tp_allreduce(m, m->buf.h, (size_t)T * D);
    for (int l = 0; l < c->num_hidden_layers && st == DUET_OK; l++) {
        st = attention(m, kv, l, T);
        if (st == DUET_OK) st = mlp(m, l, T);
    }
    if (st != DUET_OK) return st;
    if (n_out == 0) return o->sync(be);

    /* final norm and lm_head only on the rows that want logits */
    int r = 0;
    for (int i = 0; i < n_seqs; i++) {
        int last = m->step.seq_start[i + 1];
        for (int k = seqs[i].n_logits; k > 0; k--) m->step.out_rows[r++] = last - k;
    }
    o->gather_rows(be, m->buf.xn, m->buf.h, m->step.out_rows, n_out, D);
    o->rmsnorm(be, m->buf.xn, D, m->buf.xn, D, m->final_norm, n_out, D, c->rms_norm_eps);
    o->linear(be, m->buf.logits, m->buf.xn, D, n_out, m->lm_head);
    /* ops cannot return errors one by one; the backend keeps the first and reports it here */
    st = o->sync(be);
    if (st != DUET_OK) return st;
    return mdl_logits_collect(m, n_out, logits);
}
