/* config.json parsing: the shipped V3 layout, a V2-Lite layout, and refusals with clear errors. */
#include <math.h>
#include <string.h>

#include "check.h"
#include "model/config.h"
#include "base/log.h"

static const char *V2_LITE =
    "{\"model_type\":\"deepseek_v2\",\"vocab_size\":102400,\"hidden_size\":2048,"
    "\"intermediate_size\":10944,\"moe_intermediate_size\":1408,\"num_hidden_layers\":27,"
    "\"num_attention_heads\":16,\"q_lora_rank\":null,\"kv_lora_rank\":512,"
    "\"qk_nope_head_dim\":128,\"qk_rope_head_dim\":64,\"v_head_dim\":128,"
    "\"n_routed_experts\":64,\"n_shared_experts\":2,\"num_experts_per_tok\":6,"
    "\"n_group\":1,\"topk_group\":1,\"topk_method\":\"greedy\",\"scoring_func\":\"softmax\","
    "\"norm_topk_prob\":false,\"routed_scaling_factor\":1.0,\"first_k_dense_replace\":1,"
    "\"moe_layer_freq\":1,\"rms_norm_eps\":1e-06,\"max_position_embeddings\":163840,"
    "\"rope_theta\":10000,\"rope_scaling\":{\"beta_fast\":32,\"beta_slow\":1,\"factor\":40,"
    "\"mscale\":0.707,\"mscale_all_dim\":0.707,\"original_max_position_embeddings\":4096,"
    "\"type\":\"yarn\"},\"bos_token_id\":100000,\"eos_token_id\":100001}";

static int parse_with(const char *from, const char *to) {
    char buf[4096];
    const char *p = strstr(V2_LITE, from);
    if (!p) return 999;
    size_t pre = (size_t)(p - V2_LITE);
    snprintf(buf, sizeof buf, "%.*s%s%s", (int)pre, V2_LITE, to, p + strlen(from));
    cfg_model c;
    return cfg_parse(buf, "test.json", &c);
}

int main(void) {
    cfg_model c;
    CHECK(cfg_load(GOLDEN_DIR "/tiny-v3/model", &c) == DUET_OK);
    CHECK(!strcmp(c.model_type, "deepseek_v3"));
    CHECK(c.hidden_size == 128 && c.num_hidden_layers == 4 && c.q_lora_rank == 64);
    CHECK(c.topk_method == CFG_TOPK_NOAUX_TC && c.scoring_func == CFG_SCORING_SIGMOID);
    CHECK(c.n_group == 4 && c.topk_group == 2 && c.num_experts_per_tok == 4);
    CHECK(c.rope_yarn && c.rope_factor == 4.0f && c.rope_original_max_position == 64);
    CHECK(!c.fp8);
    CHECK(cfg_layer_is_moe(&c, 1) && !cfg_layer_is_moe(&c, 0));
    /* qk_head_dim 24: 24^-0.5 * (0.1 ln 4 + 1)^2 */
    double m = 0.1 * log(4.0) + 1.0;
    CHECK_NEAR(cfg_softmax_scale(&c), m * m / sqrt(24.0), 1e-6);
    float inv[4], attn;
    cfg_rope_inv_freq(&c, inv, &attn);
    CHECK_NEAR(attn, 1.0, 1e-7);
    /* dim 8, base 1e4, original 64: correction dims are 8 ln(64 / (beta 2 pi)) / (2 ln 1e4),
     * -0.50 for beta_fast 32 and 1.008 for beta_slow 1, so the ramp runs from 0 to 2: index 0
     * keeps its frequency, index 1 mixes half and half, indices 2 and 3 are divided by 4. */
    CHECK_NEAR(inv[0], 1.0, 1e-7);
    CHECK_NEAR(inv[1], 0.5 * 0.1 + 0.5 * 0.1 / 4, 1e-7);
    CHECK_NEAR(inv[2], 0.01 / 4, 1e-9);
    CHECK_NEAR(inv[3], 0.001 / 4, 1e-10);

    CHECK(cfg_load(GOLDEN_DIR "/tiny-v3-fp8/model", &c) == DUET_OK);
    CHECK(c.fp8 && c.fp8_block[0] == 128 && c.fp8_block[1] == 128);

    CHECK(cfg_parse(V2_LITE, "v2lite.json", &c) == DUET_OK);
    CHECK(c.q_lora_rank == 0 && c.topk_method == CFG_TOPK_GREEDY);
    CHECK(c.scoring_func == CFG_SCORING_SOFTMAX && !c.norm_topk_prob);
    CHECK(c.rope_mscale_all_dim > 0.7f && c.bos_token_id == 100000);
    /* transformers' DeepseekV2 leaves the softmax scale without the YaRN mscale^2 */
    CHECK_NEAR(cfg_softmax_scale(&c), 1.0 / sqrt(192.0), 1e-7);

    log_set_level(LOG_LEVEL_ERROR + 1); /* the refusals below log; keep the output readable */
    CHECK(parse_with("\"deepseek_v2\"", "\"llama\"") == DUET_ERR_UNSUPPORTED);
    CHECK(parse_with("\"type\":\"yarn\"", "\"type\":\"linear\"") == DUET_ERR_UNSUPPORTED);
    CHECK(parse_with("\"hidden_size\":2048,", "") == DUET_ERR_FORMAT);
    CHECK(parse_with("\"hidden_size\":2048", "\"hidden_size\":\"big\"") == DUET_ERR_FORMAT);
    CHECK(parse_with("\"hidden_size\":2048", "\"hidden_size\":2048.5") == DUET_ERR_FORMAT);
    CHECK(parse_with("\"topk_method\":\"greedy\"", "\"topk_method\":\"best\"") ==
          DUET_ERR_UNSUPPORTED);
    CHECK(parse_with("\"scoring_func\":\"softmax\"", "\"scoring_func\":\"relu\"") ==
          DUET_ERR_UNSUPPORTED);
    CHECK(parse_with("\"n_group\":1", "\"n_group\":5") == DUET_ERR_FORMAT);
    CHECK(parse_with("\"num_experts_per_tok\":6", "\"num_experts_per_tok\":65") == DUET_ERR_FORMAT);
    CHECK(parse_with("\"eos_token_id\":100001",
                     "\"eos_token_id\":1,\"quantization_config\":{\"quant_method\":\"awq\"}") ==
          DUET_ERR_UNSUPPORTED);
    CHECK(parse_with("\"eos_token_id\":100001",
                     "\"eos_token_id\":1,\"quantization_config\":{\"quant_method\":\"fp8\"}") ==
          DUET_ERR_FORMAT);
    CHECK(parse_with("\"eos_token_id\":100001", "\"eos_token_id\":[7,8]") == DUET_OK);
    CHECK(cfg_parse("{\"model_type\":", "trunc.json", &c) == DUET_ERR_FORMAT);
    CHECK(cfg_parse("[]", "array.json", &c) == DUET_ERR_FORMAT);
    CHECK(cfg_load("/nonexistent-dir", &c) == DUET_ERR_NOT_FOUND);
    CHECK_DONE();
}
