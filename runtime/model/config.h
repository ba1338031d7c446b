/* The model's shape and routing as DeepSeek's config.json states them (V2, V2-Lite, V3, R1).
 * Parsing refuses unknown or unsupported values with one line naming the file and the field;
 * it never falls back to a silent default for a field that changes the computation. */
#ifndef DUET_CONFIG_H
#define DUET_CONFIG_H

#include <stdbool.h>

#include "base/status.h"

typedef enum cfg_scoring {
    CFG_SCORING_SOFTMAX = 0,
    CFG_SCORING_SIGMOID = 1,
} cfg_scoring;

typedef enum cfg_topk_method {
    CFG_TOPK_GREEDY = 0,               /* V2-Lite: plain top-k over all experts */
    CFG_TOPK_GROUP_LIMITED_GREEDY = 1, /* V2: groups ranked by their best expert */
    CFG_TOPK_NOAUX_TC = 2,             /* V3/R1: groups ranked by top-2 sum of biased scores */
} cfg_topk_method;

typedef struct cfg_model {
    char model_type[32]; /* "deepseek_v2" or "deepseek_v3" */
    int vocab_size;
    int hidden_size;
    int intermediate_size;     /* dense MLP */
    int moe_intermediate_size; /* per routed / shared expert */
    int num_hidden_layers;
    int num_attention_heads;
    int num_nextn_predict_layers; /* MTP layers stored after the last layer; not run */

    /* MLA */
    int q_lora_rank; /* 0 = plain q_proj (V2-Lite) */
    int kv_lora_rank;
    int qk_nope_head_dim;
    int qk_rope_head_dim;
    int v_head_dim;

    /* MoE; n_routed_experts == 0 means a dense model */
    int n_routed_experts;
    int n_shared_experts;
    int num_experts_per_tok;
    int n_group;
    int topk_group;
    int first_k_dense_replace;
    int moe_layer_freq;
    float routed_scaling_factor;
    bool norm_topk_prob;
    cfg_scoring scoring_func;
    cfg_topk_method topk_method;

    float rms_norm_eps;
    bool tie_word_embeddings;
    int bos_token_id;
    int eos_token_id;
    int max_position_embeddings;

    /* RoPE (interleaved pairs, as DeepSeek stores q_pe / k_pe) with optional YaRN */
    float rope_theta;
    bool rope_yarn;
    float rope_factor;
    float rope_beta_fast;
    float rope_beta_slow;
    float rope_mscale;
    float rope_mscale_all_dim;
    int rope_original_max_position;

    /* FP8 block quantization of linear weights (quantization_config) */
    bool fp8;
    int fp8_block[2]; /* [out, in] block, 128x128 for DeepSeek-V3 */
} cfg_model;

/* Parses dir/config.json into *cfg_p. On error logs one line naming the file and field. */
duet_status cfg_load(const char *dir, cfg_model *cfg_p);
/* Same, from JSON text; path is used in messages only. */
duet_status cfg_parse(const char *json, const char *path, cfg_model *cfg_p);

static inline int cfg_qk_head_dim(const cfg_model *c) {
    return c->qk_nope_head_dim + c->qk_rope_head_dim;
}
/* Whether layer i runs routed experts (else the dense MLP). */
static inline bool cfg_layer_is_moe(const cfg_model *c, int i) {
    return c->n_routed_experts > 0 && i >= c->first_k_dense_replace &&
           i % (c->moe_layer_freq > 0 ? c->moe_layer_freq : 1) == 0;
}
/* Softmax scale of attention: qk_head_dim^-0.5, times the YaRN mscale^2 correction for V3. */
float cfg_softmax_scale(const cfg_model *c);
/* YaRN inverse frequencies, rope_dim/2 of them, as transformers computes them; *attn_factor_p
 * receives the cos/sin magnitude factor. */
void cfg_rope_inv_freq(const cfg_model *c, float *inv_freq, float *attn_factor_p);

#endif
