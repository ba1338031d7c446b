/* This rank's weights of a DeepSeek checkpoint on a backend: the slices the shard plan names,
 * read from safetensors (FP8 blocks dequantized, every shape checked against config.json) or
 * made up (--load-format dummy), and freed. A module of its own so loading knows nothing of
 * the forward or of collectives: the forward (model.c) reads these structs, nothing here calls
 * back into it. Not thread-safe; the weights belong to one model. */
#ifndef DUET_WEIGHTS_H
#define DUET_WEIGHTS_H

#include <stdbool.h>
#include <stdint.h>

#include "model/backend.h"
#include "model/config.h"
#include "model/shard.h"
#include "base/status.h"

typedef enum mdl_weights_source {
    MDL_WEIGHTS_CHECKPOINT = 0, /* safetensors files in the model directory */
    MDL_WEIGHTS_DUMMY = 1,      /* random weights of the config's shapes (--load-format dummy) */
} mdl_weights_source;

/* One decoder layer's weights, in this rank's slice (H_l = plan.n_heads_local). */
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
    be_ffn *experts; /* this rank's routed experts, [plan.n_local_experts] */
    be_ffn shared;   /* shared experts fused, intermediate split over TP; gate_up NULL if none */
} mdl_layer;

/* DeepSeek-V3's multi-token-prediction module, in this rank's slice: the draft of token
 * i + 2 from the main model's hidden state at i and the embedding of token i + 1. */
typedef struct mdl_mtp {
    be_weight *embed, *head;         /* its own copies, [plan.vocab_local, D] from plan.vocab0 */
    void *enorm, *hnorm, *head_norm; /* [D]; head_norm is shared_head.norm */
    be_weight *eh_e, *eh_h;          /* eh_proj [D, 2D] as its halves: x = eh_e enorm(embed)
                                      * + eh_h hnorm(hidden) (no concatenation on the device) */
    mdl_layer layer;                 /* one decoder layer (experts when the model has them) */
} mdl_mtp;

typedef struct mdl_weights {
    be_backend *be;                /* borrowed: what the tensors live on */
    int n_layers, n_local_experts; /* what destroy walks */
    be_weight *embed, *lm_head;    /* [plan.vocab_local, D] rows from plan.vocab0 */
    void *final_norm;              /* [D] */
    mdl_layer *layers;             /* [n_layers] */
    mdl_mtp *mtp;                  /* NULL unless mdl_weights_load_mtp ran */
} mdl_weights;

/* Loads this rank's slices (plan) of the checkpoint in dir whose config.json is c, or dummy
 * values from dummy_seed, onto be. c and plan are read during the call only; be is borrowed
 * and must outlive the weights. On error frees what it had loaded and sets nothing. */
duet_status mdl_weights_load(const char *dir, const cfg_model *c, const mdl_plan *plan,
                             be_backend *be, mdl_weights_source source, uint64_t dummy_seed,
                             mdl_weights **w_p);
void mdl_weights_destroy(mdl_weights *w);
/* Loads the checkpoint's first MTP module (layer num_hidden_layers) into w->mtp, with the same
 * slicing as the rest. DUET_ERR_UNSUPPORTED with one clear line when config.json has no MTP
 * layer (num_nextn_predict_layers 0). On error w is as before. */
duet_status mdl_weights_load_mtp(const char *dir, const cfg_model *c, const mdl_plan *plan,
                                 mdl_weights_source source, uint64_t dummy_seed, mdl_weights *w);
/* Frees w->mtp (none: nothing). */
void mdl_weights_drop_mtp(mdl_weights *w);

#endif
