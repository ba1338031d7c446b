/* Internals of the model shared by model.c (forward), model_load.c (weights) and
 * model_parallel.c (TP/EP collectives). Not for other modules. */
#ifndef DUET_MODEL_IMPL_H
#define DUET_MODEL_IMPL_H

#include "model/model.h"

typedef struct mdl_layer {
    void *attn_norm, *ffn_norm; /* [D] float32 device vectors */
    be_weight *q_a, *q_b;       /* [q_lora, D], [H_l * qk, q_lora] (q LoRA) */
    void *q_a_norm;             /* [q_lora] */
    be_weight *q;               /* [H_l * qk, D] (plain q_proj, V2-Lite) */
    be_weight *kv_a;            /* [L + R, D] */
    void *kv_a_norm;            /* [L] */
    be_weight *kv_b;            /* [H_l * (nope + v), L] */
    be_weight *o;               /* [D, H_l * v] */
    bool moe;
    be_ffn dense;    /* dense MLP, intermediate split over TP */
    be_weight *gate; /* router [E, D], float32 */
    void *gate_bias; /* e_score_correction_bias [E] or NULL */
    be_ffn *experts; /* this rank's routed experts, [n_local_experts] */
    be_ffn shared;   /* shared experts fused, intermediate split over TP; gate_up NULL if none */
} mdl_layer;

/* Host-side arrays describing the step, reused across steps. */
typedef struct mdl_step {
    int32_t *tokens, *token_pos, *token_slot, *out_rows; /* [cap_tokens] */
    int32_t *seq_start, *seq_ctx;                        /* [cap_seqs + 1] */
    int32_t *block_table;                                /* [cap_table] */
    size_t cap_tokens, cap_seqs, cap_table;
} mdl_step;

/* Device activation buffers for up to cap_tokens tokens, and host routing results. */
typedef struct mdl_buffers {
    int cap_tokens, cap_out;
    void *h, *xn, *qa, *q, *kva, *attn, *o, *o2, *gu, *act, *logits;
    void *logits_all;   /* [tp * cap_out, vocab_local]: the vocab gather of device backends */
    int32_t *ids;       /* host [cap_tokens, K] */
    float *weights;     /* host [cap_tokens, K] */
    float *logits_host; /* host [(tp + 1) * cap_out, vocab_local]: local rows, then gathered */
} mdl_buffers;

/* Expert parallel dispatch state (model_parallel.c). */
typedef struct mdl_ep_state mdl_ep_state;

struct mdl_model {
    cfg_model cfg;
    be_backend *be;
    mdl_shard shard;
    int kv_dim;
    int n_heads_local;
    int vocab_local; /* rows of embed / lm_head on this rank (padded vocab / tp) */
    int vocab0;
    int inter_local, shared_inter_local, expert_inter_local;
    int expert0, n_local_experts;
    float softmax_scale;
    be_route_params route;
    be_weight *embed, *lm_head;
    void *final_norm;
    mdl_layer *layers;
    mdl_step step;
    mdl_buffers buf;
    mdl_ep_state *ep;
};

duet_status mdl_step_reserve(mdl_step *s, int n_tokens, int n_seqs, int max_blocks);
/* Grows activation buffers to hold T tokens and n_out logits rows. */
duet_status mdl_reserve(mdl_model *m, int T, int n_out);
void mdl_buffers_free(mdl_model *m);

static inline int mdl_weight_cols(const be_ffn *f) {
    return f->n_inter;
}

/* model.c */
duet_status mdl_moe(mdl_model *m, mdl_layer *ly, int T);
/* out[T, D] = routed experts held by this rank applied to x (zeroed first). */
duet_status mdl_moe_local(mdl_model *m, mdl_layer *ly, void *out, const void *x, int T,
                          const int32_t *ids, const float *w);

/* model_parallel.c */
duet_status mdl_comm_allreduce(mdl_model *m, void *buf, size_t n);
/* Routed experts over the EP group: buf.xn tokens with buf.ids / buf.weights in, buf.o out. */
duet_status mdl_moe_dispatch(mdl_model *m, mdl_layer *ly, int T);
/* Downloads buf.logits [n_out, vocab_local] (gathering the vocab over TP) into logits
 * [n_out, vocab_size]. */
duet_status mdl_logits_collect(mdl_model *m, int n_out, float *logits);
void mdl_ep_destroy(mdl_model *m);

#endif
