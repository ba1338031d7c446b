/* config.json parsing for DeepSeek V2/V3 checkpoints; see config.h. Defaults below are those of
 * transformers' DeepseekV2Config / DeepseekV3Config for fields the file may leave out. */
#include "model/config.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/fileio.h"
#include "base/log.h"

/* Reads an integer field; missing -> def (or an error when def == REQUIRED). */
#define REQUIRED (-0x7fffffff)

typedef struct parse_ctx {
    const char *path;
    duet_status st;
} parse_ctx;

static void fail(parse_ctx *px, duet_status st, const char *fmt, const char *field,
                 const char *detail) {
    if (px->st != DUET_OK) return; /* log once, at the first problem */
    char msg[256];
    snprintf(msg, sizeof msg, fmt, field, detail ? detail : "");
    LOG_ERROR("%s: %s", px->path, msg);
    px->st = st;
}

static int get_int(parse_ctx *px, const cJSON *o, const char *k, int def, int minv) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!v || cJSON_IsNull(v)) {
        if (def == REQUIRED) fail(px, DUET_ERR_FORMAT, "missing required field \"%s\"%s", k, NULL);
        return def == REQUIRED ? 0 : def;
    }
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) ||
        fabs(v->valuedouble) > 2147483647.0) {
        fail(px, DUET_ERR_FORMAT, "field \"%s\" must be an integer%s", k, NULL);
        return 0;
    }
    if (v->valueint < minv) {
        char d[32];
        snprintf(d, sizeof d, " (got %d, minimum %d)", v->valueint, minv);
        fail(px, DUET_ERR_FORMAT, "field \"%s\" is out of range%s", k, d);
        return 0;
    }
    return v->valueint;
}

static float get_float(parse_ctx *px, const cJSON *o, const char *k, double def, bool required) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!v || cJSON_IsNull(v)) {
        if (required) fail(px, DUET_ERR_FORMAT, "missing required field \"%s\"%s", k, NULL);
        return (float)def;
    }
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble)) {
        fail(px, DUET_ERR_FORMAT, "field \"%s\" must be a number%s", k, NULL);
        return (float)def;
    }
    return (float)v->valuedouble;
}

static bool get_bool(parse_ctx *px, const cJSON *o, const char *k, bool def) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!v || cJSON_IsNull(v)) return def;
    if (!cJSON_IsBool(v)) {
        fail(px, DUET_ERR_FORMAT, "field \"%s\" must be true or false%s", k, NULL);
        return def;
    }
    return cJSON_IsTrue(v);
}

/* Returns the string value, def when missing, NULL (and an error) when of another type. */
static const char *get_str(parse_ctx *px, const cJSON *o, const char *k, const char *def) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    if (!v || cJSON_IsNull(v)) return def;
    if (!cJSON_IsString(v)) {
        fail(px, DUET_ERR_FORMAT, "field \"%s\" must be a string%s", k, NULL);
        return NULL;
    }
    return v->valuestring;
}

static void parse_rope_scaling(parse_ctx *px, const cJSON *rs, cfg_model *c) {
    if (!rs || cJSON_IsNull(rs)) return;
    if (!cJSON_IsObject(rs)) {
        fail(px, DUET_ERR_FORMAT, "field \"%s\" must be an object or null%s", "rope_scaling", NULL);
        return;
    }
    const char *type = get_str(px, rs, "type", NULL);
    if (!type) type = get_str(px, rs, "rope_type", NULL);
    if (!type) {
        fail(px, DUET_ERR_FORMAT, "field \"%s\" has no \"type\"%s", "rope_scaling", NULL);
        return;
    }
    if (!strcmp(type, "default")) return;
    if (strcmp(type, "yarn") != 0) {
        char d[64];
        snprintf(d, sizeof d, " \"%.40s\" (only \"yarn\" is)", type);
        fail(px, DUET_ERR_UNSUPPORTED, "%s type is not supported:%s", "rope_scaling", d);
        return;
    }
    c->rope_yarn = true;
    c->rope_factor = get_float(px, rs, "factor", 1.0, true);
    c->rope_beta_fast = get_float(px, rs, "beta_fast", 32.0, false);
    c->rope_beta_slow = get_float(px, rs, "beta_slow", 1.0, false);
    c->rope_mscale = get_float(px, rs, "mscale", 1.0, false);
    c->rope_mscale_all_dim = get_float(px, rs, "mscale_all_dim", 0.0, false);
    c->rope_original_max_position =
        get_int(px, rs, "original_max_position_embeddings", c->max_position_embeddings, 1);
    if (cJSON_GetObjectItemCaseSensitive(rs, "attention_factor"))
        fail(px, DUET_ERR_UNSUPPORTED, "rope_scaling.%s is not supported%s", "attention_factor",
             NULL);
    if (px->st == DUET_OK && c->rope_factor < 1.0f)
        fail(px, DUET_ERR_FORMAT, "rope_scaling.%s must be >= 1%s", "factor", NULL);
}

static void parse_quant(parse_ctx *px, const cJSON *q, cfg_model *c) {
    if (!q || cJSON_IsNull(q)) return;
    const char *method = get_str(px, q, "quant_method", "");
    if (!method) return;
    if (strcmp(method, "fp8") != 0) {
        char d[64];
        snprintf(d, sizeof d, " \"%.40s\" (only \"fp8\" is)", method);
        fail(px, DUET_ERR_UNSUPPORTED, "quantization_config.%s is not supported:%s", "quant_method",
             d);
        return;
    }
    const char *fmt = get_str(px, q, "fmt", "e4m3");
    if (fmt && strcmp(fmt, "e4m3") != 0)
        fail(px, DUET_ERR_UNSUPPORTED, "quantization_config.%s \"%s\" is not supported", "fmt",
             fmt);
    const char *act = get_str(px, q, "activation_scheme", "dynamic");
    if (act && strcmp(act, "dynamic") != 0)
        fail(px, DUET_ERR_UNSUPPORTED, "quantization_config.%s \"%s\" is not supported",
             "activation_scheme", act);
    const cJSON *bs = cJSON_GetObjectItemCaseSensitive(q, "weight_block_size");
    if (!cJSON_IsArray(bs) || cJSON_GetArraySize(bs) != 2 ||
        !cJSON_IsNumber(cJSON_GetArrayItem(bs, 0)) || !cJSON_IsNumber(cJSON_GetArrayItem(bs, 1))) {
        fail(px, DUET_ERR_FORMAT,
             "quantization_config.%s must be a list of two integers (per-tensor fp8 is not "
             "supported)%s",
             "weight_block_size", NULL);
        return;
    }
    c->fp8 = true;
    c->fp8_block[0] = cJSON_GetArrayItem(bs, 0)->valueint;
    c->fp8_block[1] = cJSON_GetArrayItem(bs, 1)->valueint;
    if (c->fp8_block[0] <= 0 || c->fp8_block[1] <= 0)
        fail(px, DUET_ERR_FORMAT, "quantization_config.%s must be positive%s", "weight_block_size",
             NULL);
}

duet_status cfg_parse(const char *json, const char *path, cfg_model *cfg_p) {
    parse_ctx px = {.path = path, .st = DUET_OK};
    cJSON *root = cJSON_Parse(json);
    if (!root || !cJSON_IsObject(root)) {
        const char *at = cJSON_GetErrorPtr();
        LOG_ERROR("%s: malformed JSON%s%.20s", path, at ? " near: " : "", at ? at : "");
        cJSON_Delete(root);
        return DUET_ERR_FORMAT;
    }
    cfg_model c;
    memset(&c, 0, sizeof c);

    const char *mt = get_str(&px, root, "model_type", NULL);
    if (!mt) {
        if (px.st == DUET_OK) fail(&px, DUET_ERR_FORMAT, "missing field \"%s\"%s", "model_type", 0);
    } else if (strcmp(mt, "deepseek_v2") != 0 && strcmp(mt, "deepseek_v3") != 0) {
        char d[80];
        snprintf(d, sizeof d, " \"%.40s\" (deepseek_v2 and deepseek_v3 are)", mt);
        fail(&px, DUET_ERR_UNSUPPORTED, "%s is not supported:%s", "model_type", d);
    } else {
        snprintf(c.model_type, sizeof c.model_type, "%s", mt);
    }
    bool v3 = mt && !strcmp(mt, "deepseek_v3");

    c.vocab_size = get_int(&px, root, "vocab_size", REQUIRED, 1);
    c.hidden_size = get_int(&px, root, "hidden_size", REQUIRED, 1);
    c.intermediate_size = get_int(&px, root, "intermediate_size", REQUIRED, 1);
    c.num_hidden_layers = get_int(&px, root, "num_hidden_layers", REQUIRED, 1);
    c.num_attention_heads = get_int(&px, root, "num_attention_heads", REQUIRED, 1);
    c.num_nextn_predict_layers = get_int(&px, root, "num_nextn_predict_layers", 0, 0);
    c.q_lora_rank = get_int(&px, root, "q_lora_rank", 0, 0);
    c.kv_lora_rank = get_int(&px, root, "kv_lora_rank", REQUIRED, 1);
    c.qk_nope_head_dim = get_int(&px, root, "qk_nope_head_dim", REQUIRED, 1);
    c.qk_rope_head_dim = get_int(&px, root, "qk_rope_head_dim", REQUIRED, 2);
    c.v_head_dim = get_int(&px, root, "v_head_dim", REQUIRED, 1);
    c.n_routed_experts = get_int(&px, root, "n_routed_experts", 0, 0);
    c.n_shared_experts = get_int(&px, root, "n_shared_experts", 0, 0);
    c.moe_intermediate_size =
        get_int(&px, root, "moe_intermediate_size", c.n_routed_experts ? REQUIRED : 0, 0);
    c.num_experts_per_tok =
        get_int(&px, root, "num_experts_per_tok", c.n_routed_experts ? REQUIRED : 0, 0);
    c.n_group = get_int(&px, root, "n_group", 1, 1);
    c.topk_group = get_int(&px, root, "topk_group", 1, 1);
    c.first_k_dense_replace = get_int(&px, root, "first_k_dense_replace", 0, 0);
    c.moe_layer_freq = get_int(&px, root, "moe_layer_freq", 1, 1);
    c.routed_scaling_factor = get_float(&px, root, "routed_scaling_factor", 1.0, false);
    c.norm_topk_prob = get_bool(&px, root, "norm_topk_prob", v3);
    c.rms_norm_eps = get_float(&px, root, "rms_norm_eps", 1e-6, false);
    c.tie_word_embeddings = get_bool(&px, root, "tie_word_embeddings", false);
    c.max_position_embeddings = get_int(&px, root, "max_position_embeddings", 4096, 1);
    c.rope_theta = get_float(&px, root, "rope_theta", 10000.0, false);
    c.bos_token_id = get_int(&px, root, "bos_token_id", 0, 0);
    /* eos_token_id may be a list; DeepSeek ships an integer. Take the first. */
    const cJSON *eos = cJSON_GetObjectItemCaseSensitive(root, "eos_token_id");
    if (cJSON_IsArray(eos) && cJSON_GetArraySize(eos) > 0 &&
        cJSON_IsNumber(cJSON_GetArrayItem(eos, 0)))
        c.eos_token_id = cJSON_GetArrayItem(eos, 0)->valueint;
    else
        c.eos_token_id = get_int(&px, root, "eos_token_id", 1, 0);

    const char *sf = get_str(&px, root, "scoring_func", v3 ? "sigmoid" : "softmax");
    if (sf && !strcmp(sf, "softmax"))
        c.scoring_func = CFG_SCORING_SOFTMAX;
    else if (sf && !strcmp(sf, "sigmoid"))
        c.scoring_func = CFG_SCORING_SIGMOID;
    else if (sf)
        fail(&px, DUET_ERR_UNSUPPORTED, "scoring_func \"%s\" is not supported%s", sf, 0);

    const char *tm = get_str(&px, root, "topk_method", v3 ? "noaux_tc" : "greedy");
    if (tm && !strcmp(tm, "greedy"))
        c.topk_method = CFG_TOPK_GREEDY;
    else if (tm && !strcmp(tm, "group_limited_greedy"))
        c.topk_method = CFG_TOPK_GROUP_LIMITED_GREEDY;
    else if (tm && !strcmp(tm, "noaux_tc"))
        c.topk_method = CFG_TOPK_NOAUX_TC;
    else if (tm)
        fail(&px, DUET_ERR_UNSUPPORTED, "topk_method \"%s\" is not supported%s", tm, 0);

    const char *act = get_str(&px, root, "hidden_act", "silu");
    if (act && strcmp(act, "silu") != 0)
        fail(&px, DUET_ERR_UNSUPPORTED, "hidden_act \"%s\" is not supported (only silu is)%s", act,
             0);
    if (get_bool(&px, root, "attention_bias", false))
        fail(&px, DUET_ERR_UNSUPPORTED, "%s true is not supported%s", "attention_bias", 0);

    parse_rope_scaling(&px, cJSON_GetObjectItemCaseSensitive(root, "rope_scaling"), &c);
    parse_quant(&px, cJSON_GetObjectItemCaseSensitive(root, "quantization_config"), &c);

    /* Cross-field checks: the file is self-consistent or it is refused. */
    if (px.st == DUET_OK && c.n_routed_experts > 0) {
        char d[96];
        if (c.n_routed_experts % c.n_group != 0) {
            snprintf(d, sizeof d, " (n_routed_experts %d, n_group %d)", c.n_routed_experts,
                     c.n_group);
            fail(&px, DUET_ERR_FORMAT, "%s must divide n_routed_experts%s", "n_group", d);
        } else if (c.topk_group > c.n_group) {
            snprintf(d, sizeof d, " (%d > %d)", c.topk_group, c.n_group);
            fail(&px, DUET_ERR_FORMAT, "%s exceeds n_group%s", "topk_group", d);
        } else if (c.num_experts_per_tok < 1 ||
                   c.num_experts_per_tok > c.topk_group * (c.n_routed_experts / c.n_group)) {
            snprintf(d, sizeof d, " (%d of %d selectable)", c.num_experts_per_tok,
                     c.topk_group * (c.n_routed_experts / c.n_group));
            fail(&px, DUET_ERR_FORMAT, "%s is out of range%s", "num_experts_per_tok", d);
        } else if (c.topk_method == CFG_TOPK_NOAUX_TC && c.n_routed_experts / c.n_group < 2) {
            fail(&px, DUET_ERR_FORMAT, "%s needs at least 2 experts per group%s", "noaux_tc", 0);
        }
    }
    if (px.st == DUET_OK && c.qk_rope_head_dim % 2 != 0)
        fail(&px, DUET_ERR_FORMAT, "%s must be even%s", "qk_rope_head_dim", 0);
    if (px.st == DUET_OK && c.first_k_dense_replace > c.num_hidden_layers)
        fail(&px, DUET_ERR_FORMAT, "%s exceeds num_hidden_layers%s", "first_k_dense_replace", 0);

    cJSON_Delete(root);
    if (px.st != DUET_OK) return px.st;
    *cfg_p = c;
    return DUET_OK;
}

duet_status cfg_load(const char *dir, cfg_model *cfg_p) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    char *text = NULL;
    duet_status st = fio_read_text(path, 1 << 20, &text);
    if (st != DUET_OK) return st;
    st = cfg_parse(text, path, cfg_p);
    free(text);
    return st;
}

static float yarn_mscale(float scale, float mscale) {
    return scale <= 1.0f ? 1.0f : 0.1f * mscale * logf(scale) + 1.0f;
}

float cfg_softmax_scale(const cfg_model *c) {
    float s = 1.0f / sqrtf((float)cfg_qk_head_dim(c));
    /* DeepSeek-V3 multiplies by the YaRN mscale squared. transformers' DeepseekV2 port, the
     * reference duet is checked against, leaves the scale plain for deepseek_v2 checkpoints
     * (DeepSeek's own V2 code and vLLM apply mscale there too); duet follows the reference. */
    if (strcmp(c->model_type, "deepseek_v3") != 0) return s;
    if (c->rope_yarn && c->rope_mscale_all_dim != 0.0f) {
        float m = yarn_mscale(c->rope_factor, c->rope_mscale_all_dim);
        s *= m * m;
    }
    return s;
}

static float correction_dim(float rotations, int dim, float base, int max_pos) {
    return ((float)dim * logf((float)max_pos / (rotations * 2.0f * (float)M_PI))) /
           (2.0f * logf(base));
}

void cfg_rope_inv_freq(const cfg_model *c, float *inv_freq, float *attn_factor_p) {
    int dim = c->qk_rope_head_dim, half = dim / 2;
    float base = c->rope_theta;
    for (int i = 0; i < half; i++) inv_freq[i] = 1.0f / powf(base, (float)(2 * i) / (float)dim);
    float attn = 1.0f;
    if (c->rope_yarn) {
        float f = c->rope_factor;
        if (c->rope_mscale != 0.0f && c->rope_mscale_all_dim != 0.0f)
            attn = yarn_mscale(f, c->rope_mscale) / yarn_mscale(f, c->rope_mscale_all_dim);
        else
            attn = yarn_mscale(f, 1.0f);
        int orig = c->rope_original_max_position;
        float low = floorf(correction_dim(c->rope_beta_fast, dim, base, orig));
        float high = ceilf(correction_dim(c->rope_beta_slow, dim, base, orig));
        if (low < 0) low = 0;
        if (high > (float)(dim - 1)) high = (float)(dim - 1);
        if (low == high) high += 0.001f;
        for (int i = 0; i < half; i++) {
            float ramp = ((float)i - low) / (high - low);
            ramp = ramp < 0 ? 0 : ramp > 1 ? 1 : ramp;
            float extra = 1.0f - ramp; /* weight of the unscaled (extrapolated) frequency */
            inv_freq[i] = inv_freq[i] / f * (1.0f - extra) + inv_freq[i] * extra;
        }
    }
    if (attn_factor_p) *attn_factor_p = attn;
}
