/* Random-weight checkpoint writer; see mkmodel.h. The tensor list mirrors what DeepSeek ships
 * (and what model_load.c reads): per-expert tensors, q_proj or q_a/q_b by q_lora_rank, the
 * router bias for noaux_tc, FP8 weights followed by their weight_scale_inv, MTP layers last. */
#include "mkmodel.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "base/dtype.h"
#include "base/fileio.h"
#include "base/hash.h"
#include "base/log.h"
#include "safetensors_write.h"

/* FP8 weights are drawn in e4m3 units with this standard deviation (the largest draw, 4.33
 * sigma, stays below e4m3's 448), and their block scales bring them back to MK_INIT_STD. */
#define MK_FP8_SIGMA 100.0
/* e_score_correction_bias is uniform in [-MK_BIAS_RANGE, MK_BIAS_RANGE]: small next to the
 * spread of sigmoid router scores, so it steers some choices without deciding them all. */
#define MK_BIAS_RANGE 0.01
/* Elements generated per write. */
#define MK_CHUNK (1u << 20)

/* ---- presets ---------------------------------------------------------------------------- */

/* What V2 and V3 share: the norm's epsilon, the context, YaRN RoPE (factor 40 over 4,096
 * positions; mscale differs) and 128x128 FP8 blocks. */
static void preset_deepseek_common(cfg_model *c, float rope_mscale) {
    c->rms_norm_eps = 1e-6f;
    c->max_position_embeddings = 163840;
    c->rope_theta = 10000.0f;
    c->rope_yarn = true;
    c->rope_factor = 40.0f;
    c->rope_beta_fast = 32.0f;
    c->rope_beta_slow = 1.0f;
    c->rope_mscale = rope_mscale;
    c->rope_mscale_all_dim = rope_mscale;
    c->rope_original_max_position = 4096;
    c->fp8_block[0] = c->fp8_block[1] = 128;
}

static void preset_v3_common(cfg_model *c) {
    snprintf(c->model_type, sizeof c->model_type, "deepseek_v3");
    c->vocab_size = 129280;
    c->n_shared_experts = 1;
    c->n_group = 8;
    c->topk_group = 4;
    c->moe_layer_freq = 1;
    c->routed_scaling_factor = 2.5f;
    c->norm_topk_prob = true;
    c->scoring_func = CFG_SCORING_SIGMOID;
    c->topk_method = CFG_TOPK_NOAUX_TC;
    c->bos_token_id = 0;
    c->eos_token_id = 1;
    preset_deepseek_common(c, 1.0f);
}

duet_status mk_preset(const char *name, mk_spec *spec_p) {
    mk_spec s;
    memset(&s, 0, sizeof s);
    s.shards = 1;
    cfg_model *c = &s.cfg;
    if (!strcmp(name, "tiny")) {
        /* DeepSeek-V3's structure and vocabulary (its tokenizer's ids are all valid) at widths
         * a CPU runs in milliseconds per token. q_lora_rank 192 and rope 16 leave partial
         * 128x128 FP8 blocks, as real checkpoints have at some edges. */
        preset_v3_common(c);
        c->hidden_size = 256;
        c->intermediate_size = 512;
        c->moe_intermediate_size = 128;
        c->num_hidden_layers = 4;
        c->num_attention_heads = 4;
        c->q_lora_rank = 192;
        c->kv_lora_rank = 64;
        c->qk_nope_head_dim = 32;
        c->qk_rope_head_dim = 16;
        c->v_head_dim = 32;
        c->n_routed_experts = 16;
        c->num_experts_per_tok = 4;
        c->n_group = 4;
        c->topk_group = 2;
        c->first_k_dense_replace = 1;
    } else if (!strcmp(name, "v3")) {
        /* DeepSeek-V3 (and R1) as published, cut to 4 layers: 3 dense and 1 MoE. */
        preset_v3_common(c);
        c->hidden_size = 7168;
        c->intermediate_size = 18432;
        c->moe_intermediate_size = 2048;
        c->num_hidden_layers = 4;
        c->num_attention_heads = 128;
        c->q_lora_rank = 1536;
        c->kv_lora_rank = 512;
        c->qk_nope_head_dim = 128;
        c->qk_rope_head_dim = 64;
        c->v_head_dim = 128;
        c->n_routed_experts = 256;
        c->num_experts_per_tok = 8;
        c->first_k_dense_replace = 3;
        c->fp8 = true; /* DeepSeek ships V3 in FP8 */
    } else if (!strcmp(name, "v2-lite")) {
        /* DeepSeek-V2-Lite as published: plain q_proj, softmax scores, greedy top-6 of 64. */
        snprintf(c->model_type, sizeof c->model_type, "deepseek_v2");
        c->vocab_size = 102400;
        c->hidden_size = 2048;
        c->intermediate_size = 10944;
        c->moe_intermediate_size = 1408;
        c->num_hidden_layers = 27;
        c->num_attention_heads = 16;
        c->q_lora_rank = 0;
        c->kv_lora_rank = 512;
        c->qk_nope_head_dim = 128;
        c->qk_rope_head_dim = 64;
        c->v_head_dim = 128;
        c->n_routed_experts = 64;
        c->n_shared_experts = 2;
        c->num_experts_per_tok = 6;
        c->n_group = 1;
        c->topk_group = 1;
        c->first_k_dense_replace = 1;
        c->moe_layer_freq = 1;
        c->routed_scaling_factor = 1.0f;
        c->norm_topk_prob = false;
        c->scoring_func = CFG_SCORING_SOFTMAX;
        c->topk_method = CFG_TOPK_GREEDY;
        c->bos_token_id = 100000;
        c->eos_token_id = 100001;
        preset_deepseek_common(c, 0.707f);
    } else {
        return DUET_ERR_NOT_FOUND;
    }
    *spec_p = s;
    return DUET_OK;
}

void mk_spec_fit(mk_spec *spec) {
    cfg_model *c = &spec->cfg;
    if (c->first_k_dense_replace > c->num_hidden_layers) {
        LOG_INFO("first_k_dense_replace %d capped at num_hidden_layers %d",
                 c->first_k_dense_replace, c->num_hidden_layers);
        c->first_k_dense_replace = c->num_hidden_layers;
    }
    if (c->bos_token_id >= c->vocab_size || c->eos_token_id >= c->vocab_size) {
        LOG_INFO("bos/eos ids %d/%d do not fit vocab_size %d; using 0/1", c->bos_token_id,
                 c->eos_token_id, c->vocab_size);
        c->bos_token_id = 0;
        c->eos_token_id = c->vocab_size > 1 ? 1 : 0;
    }
}

/* ---- JSON as Python's json.dumps(indent=2) prints it ------------------------------------ */

typedef struct jbuf {
    char *p;
    size_t len, cap;
    int oom;
    int depth;
    int nonempty[16];
} jbuf;

static void jb_put(jbuf *j, const char *s, size_t n) {
    if (j->oom) return;
    if (j->len + n + 1 > j->cap) {
        size_t cap = j->cap ? j->cap : 4096;
        while (j->len + n + 1 > cap) cap *= 2;
        char *p = realloc(j->p, cap);
        if (!p) {
            j->oom = 1;
            return;
        }
        j->p = p;
        j->cap = cap;
    }
    memcpy(j->p + j->len, s, n);
    j->len += n;
    j->p[j->len] = '\0';
}

static void jb_str(jbuf *j, const char *s) {
    jb_put(j, s, strlen(s));
}

/* Starts an item at the current depth: comma, newline, indent, "key": . Keys and string
 * values here are our own names, which need no escaping. */
static void jb_item(jbuf *j, const char *key) {
    if (j->nonempty[j->depth]) jb_str(j, ",");
    j->nonempty[j->depth] = 1;
    if (j->depth > 0) {
        jb_str(j, "\n");
        for (int i = 0; i < j->depth; i++) jb_str(j, "  ");
    }
    if (key) {
        jb_str(j, "\"");
        jb_str(j, key);
        jb_str(j, "\": ");
    }
}

static void jb_open(jbuf *j, const char *key, char bracket) {
    jb_item(j, key);
    jb_put(j, &bracket, 1);
    if (j->depth < 15) j->depth++;
    j->nonempty[j->depth] = 0;
}

static void jb_close(jbuf *j, char bracket) {
    int had = j->nonempty[j->depth];
    if (j->depth > 0) j->depth--;
    if (had) {
        jb_str(j, "\n");
        for (int i = 0; i < j->depth; i++) jb_str(j, "  ");
    }
    jb_put(j, &bracket, 1);
}

static void jb_raw(jbuf *j, const char *key, const char *raw) {
    jb_item(j, key);
    jb_str(j, raw);
}

static void jb_string(jbuf *j, const char *key, const char *v) {
    jb_item(j, key);
    jb_str(j, "\"");
    jb_str(j, v);
    jb_str(j, "\"");
}

static void jb_int(jbuf *j, const char *key, long long v) {
    char b[32];
    snprintf(b, sizeof b, "%lld", v);
    jb_raw(j, key, b);
}

static void jb_bool(jbuf *j, const char *key, bool v) {
    jb_raw(j, key, v ? "true" : "false");
}

/* The shortest decimal that reads back as the same float, with Python's ".0" on integral
 * values (0.707f prints 0.707, not 0.70700001716613770). as_int prints integral values bare,
 * as DeepSeek's files have rope_theta 10000 and factor 40. */
static void jb_float(jbuf *j, const char *key, float v, bool as_int) {
    char b[48];
    if (as_int && v == floorf(v) && fabsf(v) < 1e9f) {
        snprintf(b, sizeof b, "%lld", (long long)v);
    } else {
        for (int p = 1; p <= 9; p++) {
            snprintf(b, sizeof b, "%.*g", p, (double)v);
            if (strtof(b, NULL) == v) break;
        }
        if (!strpbrk(b, ".eni")) strcat(b, ".0");
    }
    jb_raw(j, key, b);
}

static const char *scoring_name(cfg_scoring s) {
    return s == CFG_SCORING_SIGMOID ? "sigmoid" : "softmax";
}

static const char *topk_name(cfg_topk_method m) {
    switch (m) {
    case CFG_TOPK_GROUP_LIMITED_GREEDY:
        return "group_limited_greedy";
    case CFG_TOPK_NOAUX_TC:
        return "noaux_tc";
    default:
        return "greedy";
    }
}

/* Keys in alphabetical order, as DeepSeek's config.json files have them. auto_map is left out:
 * it names Python files this checkpoint does not ship. */
static void config_emit(jbuf *j, const cfg_model *c) {
    bool v3 = !strcmp(c->model_type, "deepseek_v3");
    jb_open(j, NULL, '{');
    jb_open(j, "architectures", '[');
    jb_string(j, NULL, v3 ? "DeepseekV3ForCausalLM" : "DeepseekV2ForCausalLM");
    jb_close(j, ']');
    jb_bool(j, "attention_bias", false);
    jb_float(j, "attention_dropout", 0.0f, false);
    jb_float(j, "aux_loss_alpha", 0.001f, false);
    jb_int(j, "bos_token_id", c->bos_token_id);
    jb_int(j, "eos_token_id", c->eos_token_id);
    jb_int(j, "ep_size", 1);
    jb_int(j, "first_k_dense_replace", c->first_k_dense_replace);
    jb_string(j, "hidden_act", "silu");
    jb_int(j, "hidden_size", c->hidden_size);
    jb_float(j, "initializer_range", (float)MK_INIT_STD, false);
    jb_int(j, "intermediate_size", c->intermediate_size);
    jb_int(j, "kv_lora_rank", c->kv_lora_rank);
    jb_int(j, "max_position_embeddings", c->max_position_embeddings);
    jb_string(j, "model_type", c->model_type);
    jb_int(j, "moe_intermediate_size", c->moe_intermediate_size);
    jb_int(j, "moe_layer_freq", c->moe_layer_freq);
    jb_int(j, "n_group", c->n_group);
    jb_int(j, "n_routed_experts", c->n_routed_experts);
    jb_int(j, "n_shared_experts", c->n_shared_experts);
    jb_bool(j, "norm_topk_prob", c->norm_topk_prob);
    jb_int(j, "num_attention_heads", c->num_attention_heads);
    jb_int(j, "num_experts_per_tok", c->num_experts_per_tok);
    jb_int(j, "num_hidden_layers", c->num_hidden_layers);
    jb_int(j, "num_key_value_heads", c->num_attention_heads);
    if (v3 || c->num_nextn_predict_layers > 0)
        jb_int(j, "num_nextn_predict_layers", c->num_nextn_predict_layers);
    jb_int(j, "pretraining_tp", 1);
    if (c->q_lora_rank > 0)
        jb_int(j, "q_lora_rank", c->q_lora_rank);
    else
        jb_raw(j, "q_lora_rank", "null");
    jb_int(j, "qk_nope_head_dim", c->qk_nope_head_dim);
    jb_int(j, "qk_rope_head_dim", c->qk_rope_head_dim);
    if (c->fp8) {
        jb_open(j, "quantization_config", '{');
        jb_string(j, "activation_scheme", "dynamic");
        jb_string(j, "fmt", "e4m3");
        jb_string(j, "quant_method", "fp8");
        jb_open(j, "weight_block_size", '[');
        jb_int(j, NULL, c->fp8_block[0]);
        jb_int(j, NULL, c->fp8_block[1]);
        jb_close(j, ']');
        jb_close(j, '}');
    }
    jb_float(j, "rms_norm_eps", c->rms_norm_eps, false);
    if (c->rope_yarn) {
        jb_open(j, "rope_scaling", '{');
        jb_float(j, "beta_fast", c->rope_beta_fast, true);
        jb_float(j, "beta_slow", c->rope_beta_slow, true);
        jb_float(j, "factor", c->rope_factor, true);
        jb_float(j, "mscale", c->rope_mscale, false);
        jb_float(j, "mscale_all_dim", c->rope_mscale_all_dim, false);
        jb_int(j, "original_max_position_embeddings", c->rope_original_max_position);
        jb_string(j, "type", "yarn");
        jb_close(j, '}');
    } else {
        jb_raw(j, "rope_scaling", "null");
    }
    jb_float(j, "rope_theta", c->rope_theta, true);
    jb_float(j, "routed_scaling_factor", c->routed_scaling_factor, false);
    jb_string(j, "scoring_func", scoring_name(c->scoring_func));
    jb_bool(j, "seq_aux", true);
    jb_bool(j, "tie_word_embeddings", c->tie_word_embeddings);
    jb_int(j, "topk_group", c->topk_group);
    jb_string(j, "topk_method", topk_name(c->topk_method));
    jb_string(j, "torch_dtype", "bfloat16");
    jb_bool(j, "use_cache", true);
    jb_int(j, "v_head_dim", c->v_head_dim);
    jb_int(j, "vocab_size", c->vocab_size);
    jb_close(j, '}');
    jb_str(j, "\n");
}

duet_status mk_config_json(const mk_spec *spec, char **json_p) {
    jbuf j = {0};
    config_emit(&j, &spec->cfg);
    if (j.oom) {
        free(j.p);
        return DUET_ERR_NO_MEMORY;
    }
    /* The file must say exactly what the spec says and pass the loader's own checks. */
    cfg_model back;
    duet_status st = cfg_parse(j.p, "config.json", &back);
    if (st != DUET_OK) {
        free(j.p);
        return st;
    }
    *json_p = j.p;
    return DUET_OK;
}

/* ---- the tensor plan -------------------------------------------------------------------- */

typedef enum mk_fill {
    MK_FILL_NORMAL = 0, /* N(0, MK_INIT_STD), or N(0, MK_FP8_SIGMA) in e4m3 units for FP8 */
    MK_FILL_ONES = 1,   /* RMSNorm weights */
    MK_FILL_BIAS = 2,   /* e_score_correction_bias */
    MK_FILL_SCALE = 3,  /* weight_scale_inv of an FP8 weight */
} mk_fill;

typedef struct mk_tensor {
    char name[128];
    dt_dtype dtype;
    int ndim;
    int64_t shape[2];
    mk_fill fill;
    int group; /* an FP8 weight and its scale share a group, and so a shard */
    uint64_t nbytes;
} mk_tensor;

typedef struct mk_plan {
    mk_tensor *t;
    size_t n, cap;
    int n_groups;
    uint64_t bytes;
    duet_status st;
} mk_plan;

/* Tensor names are built in fixed buffers: one that does not fit is a defect of the plan, never
 * written cut short (two cut names could collide in the checkpoint). Returns out. */
__attribute__((format(printf, 4, 5))) static const char *
plan_name(mk_plan *p, char *out, size_t cap, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out, cap, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= cap) {
        LOG_ERROR("mkmodel: tensor name too long: %s...", out);
        if (p->st == DUET_OK) p->st = DUET_ERR_INTERNAL;
    }
    return out;
}

static mk_tensor *plan_add(mk_plan *p, const char *name, dt_dtype dt, int64_t rows, int64_t cols,
                           mk_fill fill, int new_group) {
    if (p->st != DUET_OK) return NULL;
    size_t name_len = strlen(name);
    if (name_len >= sizeof p->t[0].name) {
        LOG_ERROR("mkmodel: tensor name too long: %s", name);
        p->st = DUET_ERR_INTERNAL;
        return NULL;
    }
    if (p->n == p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 256;
        mk_tensor *t = realloc(p->t, cap * sizeof *t);
        if (!t) {
            p->st = DUET_ERR_NO_MEMORY;
            return NULL;
        }
        p->t = t;
        p->cap = cap;
    }
    mk_tensor *t = &p->t[p->n++];
    memset(t, 0, sizeof *t);
    memcpy(t->name, name, name_len + 1);
    t->dtype = dt;
    t->ndim = cols > 0 ? 2 : 1;
    t->shape[0] = rows;
    t->shape[1] = cols;
    t->fill = fill;
    if (new_group) p->n_groups++;
    t->group = p->n_groups - 1;
    t->nbytes = (uint64_t)rows * (uint64_t)(cols > 0 ? cols : 1) * dt_size(dt);
    p->bytes += t->nbytes;
    return t;
}

static void add_norm(mk_plan *p, const char *name, int n) {
    plan_add(p, name, DT_BF16, n, 0, MK_FILL_ONES, 1);
}

/* A linear weight [rows, cols]: BF16, or F8_E4M3 followed by its F32 block scales. */
static void add_linear(mk_plan *p, const cfg_model *c, const char *name, int rows, int cols) {
    if (!c->fp8) {
        plan_add(p, name, DT_BF16, rows, cols, MK_FILL_NORMAL, 1);
        return;
    }
    plan_add(p, name, DT_F8_E4M3, rows, cols, MK_FILL_NORMAL, 1);
    char sname[160];
    plan_name(p, sname, sizeof sname, "%s_scale_inv", name);
    int bo = c->fp8_block[0], bi = c->fp8_block[1];
    plan_add(p, sname, DT_F32, (rows + bo - 1) / bo, (cols + bi - 1) / bi, MK_FILL_SCALE, 0);
}

static void add_ffn(mk_plan *p, const cfg_model *c, const char *prefix, int inter) {
    char n[160];
    int D = c->hidden_size;
    plan_name(p, n, sizeof n, "%s.gate_proj.weight", prefix);
    add_linear(p, c, n, inter, D);
    plan_name(p, n, sizeof n, "%s.up_proj.weight", prefix);
    add_linear(p, c, n, inter, D);
    plan_name(p, n, sizeof n, "%s.down_proj.weight", prefix);
    add_linear(p, c, n, D, inter);
}

static void add_layer(mk_plan *p, const cfg_model *c, int l) {
    int D = c->hidden_size, H = c->num_attention_heads, qk = cfg_qk_head_dim(c);
    int L = c->kv_lora_rank, R = c->qk_rope_head_dim;
    bool mtp = l >= c->num_hidden_layers;
    char pre[64], n[160];
    snprintf(pre, sizeof pre, "model.layers.%d", l);
#define N(suffix) plan_name(p, n, sizeof n, "%s.%s", pre, suffix)
    if (mtp) {
        /* DeepSeek-V3's multi-token-prediction module: its own embedding and head copies, two
         * norms and eh_proj (BF16 in DeepSeek's files) around a full decoder layer. */
        plan_add(p, N("embed_tokens.weight"), DT_BF16, c->vocab_size, D, MK_FILL_NORMAL, 1);
        add_norm(p, N("enorm.weight"), D);
        add_norm(p, N("hnorm.weight"), D);
        plan_add(p, N("eh_proj.weight"), DT_BF16, D, 2 * D, MK_FILL_NORMAL, 1);
        add_norm(p, N("shared_head.norm.weight"), D);
        plan_add(p, N("shared_head.head.weight"), DT_BF16, c->vocab_size, D, MK_FILL_NORMAL, 1);
    }
    add_norm(p, N("input_layernorm.weight"), D);
    add_norm(p, N("post_attention_layernorm.weight"), D);
    if (c->q_lora_rank > 0) {
        add_linear(p, c, N("self_attn.q_a_proj.weight"), c->q_lora_rank, D);
        add_norm(p, N("self_attn.q_a_layernorm.weight"), c->q_lora_rank);
        add_linear(p, c, N("self_attn.q_b_proj.weight"), H * qk, c->q_lora_rank);
    } else {
        add_linear(p, c, N("self_attn.q_proj.weight"), H * qk, D);
    }
    add_linear(p, c, N("self_attn.kv_a_proj_with_mqa.weight"), L + R, D);
    add_norm(p, N("self_attn.kv_a_layernorm.weight"), L);
    add_linear(p, c, N("self_attn.kv_b_proj.weight"), H * (c->qk_nope_head_dim + c->v_head_dim), L);
    add_linear(p, c, N("self_attn.o_proj.weight"), D, H * c->v_head_dim);
    /* The MTP layer is a MoE layer whenever the model has experts. */
    bool moe = mtp ? c->n_routed_experts > 0 : cfg_layer_is_moe(c, l);
    if (!moe) {
        add_ffn(p, c, N("mlp"), c->intermediate_size);
    } else {
        int E = c->n_routed_experts;
        plan_add(p, N("mlp.gate.weight"), DT_BF16, E, D, MK_FILL_NORMAL, 1);
        if (c->topk_method == CFG_TOPK_NOAUX_TC)
            plan_add(p, N("mlp.gate.e_score_correction_bias"), DT_F32, E, 0, MK_FILL_BIAS, 1);
        for (int e = 0; e < E; e++) {
            char ep[96];
            plan_name(p, ep, sizeof ep, "%s.mlp.experts.%d", pre, e);
            add_ffn(p, c, ep, c->moe_intermediate_size);
        }
        if (c->n_shared_experts > 0)
            add_ffn(p, c, N("mlp.shared_experts"), c->n_shared_experts * c->moe_intermediate_size);
    }
#undef N
}

static duet_status plan_build(const cfg_model *c, mk_plan *p) {
    memset(p, 0, sizeof *p);
    plan_add(p, "model.embed_tokens.weight", DT_BF16, c->vocab_size, c->hidden_size, MK_FILL_NORMAL,
             1);
    for (int l = 0; l < c->num_hidden_layers; l++) add_layer(p, c, l);
    add_norm(p, "model.norm.weight", c->hidden_size);
    if (!c->tie_word_embeddings)
        plan_add(p, "lm_head.weight", DT_BF16, c->vocab_size, c->hidden_size, MK_FILL_NORMAL, 1);
    for (int k = 0; k < c->num_nextn_predict_layers; k++) add_layer(p, c, c->num_hidden_layers + k);
    if (p->st != DUET_OK) {
        free(p->t);
        p->t = NULL;
    }
    return p->st;
}

duet_status mk_plan_size(const mk_spec *spec, size_t *n_tensors_p, uint64_t *bytes_p) {
    mk_plan p;
    duet_status st = plan_build(&spec->cfg, &p);
    if (st != DUET_OK) return st;
    *n_tensors_p = p.n;
    *bytes_p = p.bytes;
    free(p.t);
    return DUET_OK;
}

/* Shard of each group: contiguous runs of about total / N bytes, every shard non-empty. A
 * shard index advances by at most one per group, and early enough that the groups left can
 * still give every remaining shard one. */
static void plan_shard(const mk_plan *p, int n_shards, int *shard_of_group) {
    uint64_t cum = 0;
    int prev = 0, gi = 0;
    for (size_t i = 0; i < p->n; i++) {
        if (i > 0 && p->t[i].group == p->t[i - 1].group) {
            cum += p->t[i].nbytes;
            continue;
        }
        int want = p->bytes ? (int)((double)cum * n_shards / (double)p->bytes) : 0;
        int least = n_shards - (p->n_groups - gi);
        int s = want > prev + 1 ? prev + 1 : want < prev ? prev : want;
        if (s < least) s = least;
        if (gi == 0) s = 0;
        shard_of_group[gi++] = s;
        prev = s;
        cum += p->t[i].nbytes;
    }
}

/* ---- values ----------------------------------------------------------------------------- */

typedef struct mk_tables {
    uint16_t bf16[65536]; /* N(0, MK_INIT_STD) quantiles as bf16 */
    uint8_t e4m3[65536];  /* N(0, MK_FP8_SIGMA) quantiles as e4m3 */
} mk_tables;

#define MK_GOLDEN 0x9e3779b97f4a7c15ull

/* z with Phi(z) = q, by bisection on erfc: exact quantiles, no approximation constants. */
static double normal_quantile(double q) {
    double lo = -10.0, hi = 10.0;
    for (int i = 0; i < 56; i++) {
        double mid = 0.5 * (lo + hi);
        if (0.5 * erfc(-mid / M_SQRT2) < q)
            lo = mid;
        else
            hi = mid;
    }
    return 0.5 * (lo + hi);
}

/* A normal draw is one of 65536 equally likely quantiles, picked by 16 random bits: a table
 * lookup per element keeps a multi-GB checkpoint I/O-bound. */
static void tables_init(mk_tables *tb) {
    for (int i = 32768; i < 65536; i++) {
        double z = normal_quantile(((double)i + 0.5) / 65536.0);
        tb->bf16[i] = dt_f32_to_bf16((float)(z * MK_INIT_STD));
        tb->bf16[65535 - i] = dt_f32_to_bf16((float)(-z * MK_INIT_STD));
        tb->e4m3[i] = dt_f32_to_e4m3((float)(z * MK_FP8_SIGMA));
        tb->e4m3[65535 - i] = dt_f32_to_e4m3((float)(-z * MK_FP8_SIGMA));
    }
}

/* Elements [i0, i0 + n) of tensor t into dst. Element i depends only on (key, i). An FP8
 * weight draws the same quantile as the BF16 weight of the same name and seed, so an fp8
 * checkpoint is roughly the bf16 one quantized (up to its block scales), as real releases are. */
static void fill_chunk(const mk_tables *tb, const mk_tensor *t, uint64_t key, uint64_t i0, size_t n,
                       void *dst) {
    if (t->dtype == DT_BF16) {
        uint16_t *o = dst;
        for (size_t k = 0; k < n; k++) {
            uint64_t i = i0 + k;
            if (t->fill == MK_FILL_ONES) {
                o[k] = 0x3f80; /* 1.0 */
            } else {
                uint64_t r = hash_mix64(key + (i >> 2) * MK_GOLDEN);
                o[k] = tb->bf16[(r >> (16 * (i & 3))) & 0xffff];
            }
        }
    } else if (t->dtype == DT_F8_E4M3) {
        uint8_t *o = dst;
        for (size_t k = 0; k < n; k++) {
            uint64_t i = i0 + k;
            uint64_t r = hash_mix64(key + (i >> 2) * MK_GOLDEN);
            o[k] = tb->e4m3[(r >> (16 * (i & 3))) & 0xffff];
        }
    } else { /* DT_F32: bias or scale */
        float *o = dst;
        for (size_t k = 0; k < n; k++) {
            double u = (double)(hash_mix64(key + (i0 + k) * MK_GOLDEN) >> 40) / 16777216.0;
            if (t->fill == MK_FILL_BIAS)
                o[k] = (float)((2.0 * u - 1.0) * MK_BIAS_RANGE);
            else /* block scales vary by +-25% so a misplaced block changes the result */
                o[k] = (float)(MK_INIT_STD / MK_FP8_SIGMA * (0.75 + 0.5 * u));
        }
    }
}

/* ---- files ------------------------------------------------------------------------------ */

typedef struct mk_files {
    char **paths; /* created so far, removed again on failure */
    size_t n;
} mk_files;

static duet_status files_note(mk_files *f, const char *path) {
    char **np = realloc(f->paths, (f->n + 1) * sizeof *np);
    if (!np) return DUET_ERR_NO_MEMORY;
    f->paths = np;
    f->paths[f->n] = strdup(path);
    if (!f->paths[f->n]) return DUET_ERR_NO_MEMORY;
    f->n++;
    return DUET_OK;
}

static void files_free(mk_files *f, bool remove) {
    for (size_t i = 0; i < f->n; i++) {
        if (remove) unlink(f->paths[i]);
        free(f->paths[i]);
    }
    free(f->paths);
}

static duet_status make_dir(const char *dir) {
    char path[4096];
    snprintf(path, sizeof path, "%s", dir);
    /* mkdir -p: every prefix ending at a slash, then the whole path */
    for (char *s = path + 1;; s++) {
        if (*s != '/' && *s != '\0') continue;
        char saved = *s;
        *s = '\0';
        if (mkdir(path, 0755) != 0 && errno != EEXIST) {
            LOG_ERROR("%s: cannot create directory: %s", path, strerror(errno));
            return DUET_ERR_IO;
        }
        *s = saved;
        if (saved == '\0') break;
    }
    struct stat sb;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode)) {
        LOG_ERROR("%s: not a directory", dir);
        return DUET_ERR_IO;
    }
    return DUET_OK;
}

static bool is_checkpoint_file(const char *name) {
    size_t l = strlen(name);
    return (l > 12 && !strcmp(name + l - 12, ".safetensors")) ||
           !strcmp(name, "model.safetensors.index.json") || !strcmp(name, "config.json");
}

/* A stale shard or index beside the new files would be read as part of the checkpoint, so
 * the directory must hold none, unless force says to remove them. */
static duet_status clear_dir(const char *dir, bool force) {
    DIR *d = opendir(dir);
    if (!d) {
        LOG_ERROR("%s: cannot open directory: %s", dir, strerror(errno));
        return DUET_ERR_IO;
    }
    duet_status st = DUET_OK;
    struct dirent *de;
    while (st == DUET_OK && (de = readdir(d))) {
        if (!is_checkpoint_file(de->d_name)) continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        if (!force) {
            LOG_ERROR("%s already holds a checkpoint (%s); use --force to replace it", dir,
                      de->d_name);
            st = DUET_ERR_INVALID;
        } else if (unlink(path) != 0) {
            LOG_ERROR("%s: cannot remove: %s", path, strerror(errno));
            st = DUET_ERR_IO;
        }
    }
    closedir(d);
    return st;
}

typedef struct mk_text {
    const char *name;
    char *text;
} mk_text;

/* tokenizer.json and tokenizer_config.json, read before any weight is written so a wrong
 * path fails in a second, not after gigabytes. */
static duet_status read_tokenizer(const mk_spec *spec, mk_text *files) {
    files[0].name = "tokenizer.json";
    files[1].name = "tokenizer_config.json";
    if (!spec->tokenizer_dir) return DUET_OK;
    for (int i = 0; i < 2; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", spec->tokenizer_dir, files[i].name);
        duet_status st = fio_read_text(path, 256u << 20, &files[i].text);
        if (st != DUET_OK) return st;
    }
    return DUET_OK;
}

/* The largest token id of tokenizer.json (its model vocabulary and added tokens), or -1. */
static long max_token_id(const cJSON *root) {
    long max = -1;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    const cJSON *vocab = model ? cJSON_GetObjectItemCaseSensitive(model, "vocab") : NULL;
    const cJSON *e, *tokens = cJSON_IsObject(vocab) ? vocab : NULL;
    cJSON_ArrayForEach(e, tokens) {
        if (cJSON_IsNumber(e) && e->valuedouble > (double)max) max = (long)e->valuedouble;
    }
    cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(root, "added_tokens")) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
        if (cJSON_IsNumber(id) && id->valuedouble > (double)max) max = (long)id->valuedouble;
    }
    return max;
}

/* A tokenizer whose ids reach past vocab_size makes the model refuse some prompts; that is
 * allowed (a small --vocab-size is useful) but worth a warning. */
static void tokenizer_check_vocab(const mk_spec *spec, const char *text) {
    cJSON *root = cJSON_Parse(text);
    long max = root ? max_token_id(root) : -1;
    cJSON_Delete(root);
    if (!root)
        LOG_WARN("%s/tokenizer.json is not valid JSON; copied as it is", spec->tokenizer_dir);
    else if (max >= spec->cfg.vocab_size)
        LOG_WARN("%s/tokenizer.json has ids up to %ld but vocab_size is %d: prompts with larger "
                 "ids will be refused",
                 spec->tokenizer_dir, max, spec->cfg.vocab_size);
}

static duet_status check_space(const char *dir, uint64_t need) {
    struct statvfs sv;
    if (statvfs(dir, &sv) != 0) return DUET_OK; /* unknown: let the writes tell */
    uint64_t avail = (uint64_t)sv.f_bavail * (uint64_t)sv.f_frsize;
    if (avail < need) {
        LOG_ERROR("%s: the checkpoint needs %.2f GiB but only %.2f GiB are free", dir,
                  (double)need / (1u << 30), (double)avail / (1u << 30));
        return DUET_ERR_IO;
    }
    return DUET_OK;
}

typedef struct mk_progress {
    uint64_t done, total, next_report;
} mk_progress;

static duet_status write_shard(const mk_spec *spec, const mk_plan *p, const int *shard_of_group,
                               int shard, const char *path, const mk_tables *tb, void *buf,
                               mk_progress *pr) {
    char meta[96];
    snprintf(meta, sizeof meta, "duet-mkmodel: random weights, seed %llu",
             (unsigned long long)spec->seed);
    st_writer *w = NULL;
    duet_status st = st_writer_create(path, meta, &w);
    for (size_t i = 0; st == DUET_OK && i < p->n; i++)
        if (shard_of_group[p->t[i].group] == shard)
            st = st_writer_declare(w, p->t[i].name, p->t[i].dtype, p->t[i].ndim, p->t[i].shape);
    if (st == DUET_OK) st = st_writer_begin(w);
    uint64_t seed_key = hash_mix64(spec->seed + MK_GOLDEN);
    for (size_t i = 0; st == DUET_OK && i < p->n; i++) {
        const mk_tensor *t = &p->t[i];
        if (shard_of_group[t->group] != shard) continue;
        uint64_t key = hash_mix64(hash_fnv1a_str(t->name) ^ seed_key);
        uint64_t numel = t->nbytes / dt_size(t->dtype);
        size_t es = dt_size(t->dtype);
        for (uint64_t i0 = 0; st == DUET_OK && i0 < numel; i0 += MK_CHUNK) {
            size_t n = numel - i0 < MK_CHUNK ? (size_t)(numel - i0) : MK_CHUNK;
            fill_chunk(tb, t, key, i0, n, buf);
            st = st_writer_write(w, buf, n * es);
            pr->done += n * es;
            if (pr->done >= pr->next_report) {
                LOG_INFO("written %.1f of %.1f GiB", (double)pr->done / (1u << 30),
                         (double)pr->total / (1u << 30));
                pr->next_report += 1ull << 30;
            }
        }
    }
    if (st == DUET_OK) st = st_writer_finish(w);
    st_writer_destroy(w);
    return st;
}

static int cmp_tensor_name(const void *a, const void *b) {
    return strcmp((*(const mk_tensor *const *)a)->name, (*(const mk_tensor *const *)b)->name);
}

static void shard_name(char *buf, size_t len, int k, int n) {
    snprintf(buf, len, "model-%05d-of-%05d.safetensors", k + 1, n);
}

/* model.safetensors.index.json: {"metadata": {"total_size"}, "weight_map": {name: file}},
 * names sorted as transformers writes them. */
static duet_status index_json(const mk_plan *p, const int *shard_of_group, int n_shards,
                              char **json_p) {
    const mk_tensor **sorted = malloc(p->n * sizeof *sorted);
    if (!sorted) return DUET_ERR_NO_MEMORY;
    for (size_t i = 0; i < p->n; i++) sorted[i] = &p->t[i];
    qsort(sorted, p->n, sizeof *sorted, cmp_tensor_name);
    jbuf j = {0};
    jb_open(&j, NULL, '{');
    jb_open(&j, "metadata", '{');
    jb_int(&j, "total_size", (long long)p->bytes);
    jb_close(&j, '}');
    jb_open(&j, "weight_map", '{');
    for (size_t i = 0; i < p->n; i++) {
        char f[64];
        shard_name(f, sizeof f, shard_of_group[sorted[i]->group], n_shards);
        jb_string(&j, sorted[i]->name, f);
    }
    jb_close(&j, '}');
    jb_close(&j, '}');
    jb_str(&j, "\n");
    free(sorted);
    if (j.oom) {
        free(j.p);
        return DUET_ERR_NO_MEMORY;
    }
    *json_p = j.p;
    return DUET_OK;
}

duet_status mk_write(const mk_spec *spec, const char *dir) {
    char *config = NULL, *index = NULL;
    mk_text tok[2] = {{0}};
    mk_plan p = {0};
    mk_files made = {0};
    int *shard_of_group = NULL;
    mk_tables *tb = NULL;
    void *buf = NULL;
    char path[4096];

    duet_status st = mk_config_json(spec, &config);
    if (st == DUET_OK) st = plan_build(&spec->cfg, &p);
    int n_shards = spec->shards > 0 ? spec->shards : 1;
    if (st == DUET_OK && n_shards > p.n_groups) {
        LOG_ERROR("%d shards asked for, but the checkpoint has only %d tensors to spread", n_shards,
                  p.n_groups);
        st = DUET_ERR_INVALID;
    }
    if (st == DUET_OK) st = read_tokenizer(spec, tok);
    if (st == DUET_OK && tok[0].text) tokenizer_check_vocab(spec, tok[0].text);
    if (st == DUET_OK) st = make_dir(dir);
    if (st == DUET_OK) st = clear_dir(dir, spec->force);
    /* --config-only writes no weights: a 100 GB model's config fits anywhere */
    if (st == DUET_OK && !spec->config_only) st = check_space(dir, p.bytes + (1u << 20));
    if (st == DUET_OK) {
        shard_of_group = calloc((size_t)p.n_groups, sizeof *shard_of_group);
        tb = malloc(sizeof *tb);
        buf = malloc((size_t)MK_CHUNK * sizeof(float));
        if (!shard_of_group || !tb || !buf) st = DUET_ERR_NO_MEMORY;
    }
    if (st == DUET_OK) {
        tables_init(tb);
        if (n_shards > 1) plan_shard(&p, n_shards, shard_of_group);
        if (!spec->config_only)
            LOG_INFO("%s: writing %zu tensors, %.2f GiB in %d file%s", dir, p.n,
                     (double)p.bytes / (1u << 30), n_shards, n_shards > 1 ? "s" : "");
    }
    mk_progress pr = {0, p.bytes, 1ull << 30};
    for (int k = 0; st == DUET_OK && !spec->config_only && k < n_shards; k++) {
        if (n_shards == 1) {
            snprintf(path, sizeof path, "%s/model.safetensors", dir);
        } else {
            char f[64];
            shard_name(f, sizeof f, k, n_shards);
            snprintf(path, sizeof path, "%s/%s", dir, f);
        }
        st = files_note(&made, path);
        if (st == DUET_OK) st = write_shard(spec, &p, shard_of_group, k, path, tb, buf, &pr);
    }
    if (st == DUET_OK && n_shards > 1 && !spec->config_only) {
        st = index_json(&p, shard_of_group, n_shards, &index);
        snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
        if (st == DUET_OK) st = files_note(&made, path);
        if (st == DUET_OK) st = fio_write_file(path, index, strlen(index));
    }
    for (int i = 0; st == DUET_OK && spec->tokenizer_dir && i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, tok[i].name);
        st = files_note(&made, path);
        if (st == DUET_OK) st = fio_write_file(path, tok[i].text, strlen(tok[i].text));
    }
    /* config.json last: a directory without it is visibly unfinished */
    if (st == DUET_OK) {
        snprintf(path, sizeof path, "%s/config.json", dir);
        st = files_note(&made, path);
        if (st == DUET_OK) st = fio_write_file(path, config, strlen(config));
    }
    files_free(&made, st != DUET_OK);
    free(tok[0].text);
    free(tok[1].text);
    free(config);
    free(index);
    free(p.t);
    free(shard_of_group);
    free(tb);
    free(buf);
    return st;
}
