/* duet-mkmodel's writer (tools/mkmodel): presets carry DeepSeek's published dimensions (checked
 * against the published parameter counts), config.json reads back through config.c, values
 * are deterministic per (seed, tensor) whatever the sharding, their statistics are what the
 * header promises (std 0.02, norms 1, FP8 block scales), and misuse fails cleanly. */
#include <math.h>
#include <string.h>

#include "check.h"
#include "base/dtype.h"
#include "base/log.h"
#include "mkmodel.h"
#include "model/safetensors.h"
#include "testutil.h"

static char *g_root;

static const char *at(const char *name) {
    static char bufs[4][4096];
    static int k;
    char *b = bufs[k++ & 3];
    snprintf(b, 4096, "%s/%s", g_root, name);
    return b;
}

static cfg_model parse_back(const mk_spec *s, char **text_p) {
    cfg_model c;
    memset(&c, 0, sizeof c);
    char *text = NULL;
    CHECK(mk_config_json(s, &text) == DUET_OK);
    if (text) CHECK(cfg_parse(text, "mk.json", &c) == DUET_OK);
    if (text_p)
        *text_p = text;
    else
        free(text);
    return c;
}

/* Bytes of a [o, i] linear weight as DeepSeek stores it. */
static double lin(const cfg_model *c, double o, double i) {
    if (!c->fp8) return 2 * o * i;
    return o * i + 4 * ceil(o / 128) * ceil(i / 128);
}

/* The checkpoint's size from the architecture, written independently of mkmodel.c. */
static double expected_bytes(const cfg_model *c) {
    double D = c->hidden_size, V = c->vocab_size, H = c->num_attention_heads;
    double qk = c->qk_nope_head_dim + c->qk_rope_head_dim, L = c->kv_lora_rank;
    double attn = lin(c, L + c->qk_rope_head_dim, D) +
                  lin(c, H * (c->qk_nope_head_dim + c->v_head_dim), L) +
                  lin(c, D, H * c->v_head_dim) + 2 * (2 * D + L);
    if (c->q_lora_rank)
        attn += lin(c, c->q_lora_rank, D) + lin(c, H * qk, c->q_lora_rank) + 2 * c->q_lora_rank;
    else
        attn += lin(c, H * qk, D);
    double mlp = 3 * lin(c, c->intermediate_size, D);
    double moe =
        (c->n_routed_experts + c->n_shared_experts) * 3 * lin(c, c->moe_intermediate_size, D) +
        2 * c->n_routed_experts * D +
        (c->topk_method == CFG_TOPK_NOAUX_TC ? 4 * c->n_routed_experts : 0);
    double total = 2 * 2 * V * D + 2 * D;
    int dense = c->first_k_dense_replace;
    total += c->num_hidden_layers * attn + dense * mlp + (c->num_hidden_layers - dense) * moe;
    /* MTP: a MoE layer plus embed, head, eh_proj and three norms, all BF16 but the layer */
    total += c->num_nextn_predict_layers * (attn + moe + 2 * 2 * V * D + 2 * 2 * D * D + 3 * 2 * D);
    return total;
}

static void test_presets(void) {
    mk_spec s;
    CHECK(mk_preset("gpt5", &s) == DUET_ERR_NOT_FOUND);

    char *text = NULL;
    CHECK(mk_preset("v3", &s) == DUET_OK);
    cfg_model c = parse_back(&s, &text);
    CHECK(!strcmp(c.model_type, "deepseek_v3") && c.hidden_size == 7168 &&
          c.num_attention_heads == 128 && c.q_lora_rank == 1536 && c.kv_lora_rank == 512);
    CHECK(c.qk_rope_head_dim == 64 && c.qk_nope_head_dim == 128 && c.v_head_dim == 128);
    CHECK(c.n_routed_experts == 256 && c.num_experts_per_tok == 8 && c.n_group == 8 &&
          c.topk_group == 4 && c.n_shared_experts == 1);
    CHECK(c.topk_method == CFG_TOPK_NOAUX_TC && c.scoring_func == CFG_SCORING_SIGMOID &&
          c.norm_topk_prob && c.routed_scaling_factor == 2.5f);
    CHECK(c.moe_intermediate_size == 2048 && c.intermediate_size == 18432 &&
          c.vocab_size == 129280 && c.first_k_dense_replace == 3 && c.num_hidden_layers == 4);
    CHECK(c.rope_yarn && c.rope_factor == 40.0f && c.rope_mscale_all_dim == 1.0f &&
          c.rope_original_max_position == 4096 && c.max_position_embeddings == 163840);
    CHECK(c.fp8 && c.fp8_block[0] == 128 && c.fp8_block[1] == 128);
    CHECK(text && strstr(text, "\"weight_block_size\": [\n      128,\n      128\n    ]") &&
          strstr(text, "\"architectures\": [\n    \"DeepseekV3ForCausalLM\"\n  ],") &&
          strstr(text, "\"rope_theta\": 10000,") && strstr(text, "\"rms_norm_eps\": 1e-06,") &&
          strstr(text, "\"mscale\": 1.0,") && strstr(text, "\"num_nextn_predict_layers\": 0"));
    free(text);
    size_t n;
    uint64_t bytes;
    CHECK(mk_plan_size(&s, &n, &bytes) == DUET_OK);
    CHECK_NEAR((double)bytes, expected_bytes(&s.cfg), 0.5);
    /* all of DeepSeek-V3 in bf16: 671B parameters and 14B of MTP module are published, i.e.
     * "685B" on Hugging Face (the e_score_correction_bias F32s are negligible) */
    s.cfg.num_hidden_layers = 61;
    s.cfg.num_nextn_predict_layers = 1;
    s.cfg.fp8 = false;
    CHECK(mk_plan_size(&s, &n, &bytes) == DUET_OK);
    CHECK_NEAR((double)bytes, expected_bytes(&s.cfg), 0.5);
    CHECK_MSG(fabs(bytes / 2.0 - 684.5e9) < 1.0e9, "V3 + MTP has %.2fB parameters", bytes / 2e9);
    s.cfg.num_nextn_predict_layers = 0;
    CHECK(mk_plan_size(&s, &n, &bytes) == DUET_OK);
    CHECK_MSG(fabs(bytes / 2.0 - 671.0e9) < 1.0e9, "V3 has %.2fB parameters", bytes / 2e9);

    CHECK(mk_preset("v2-lite", &s) == DUET_OK);
    c = parse_back(&s, &text);
    CHECK(!strcmp(c.model_type, "deepseek_v2") && c.q_lora_rank == 0 && c.hidden_size == 2048 &&
          c.num_hidden_layers == 27 && c.num_attention_heads == 16);
    CHECK(c.topk_method == CFG_TOPK_GREEDY && c.scoring_func == CFG_SCORING_SOFTMAX &&
          !c.norm_topk_prob && c.n_routed_experts == 64 && c.num_experts_per_tok == 6 &&
          c.n_shared_experts == 2 && c.first_k_dense_replace == 1);
    CHECK(c.moe_intermediate_size == 1408 && c.intermediate_size == 10944 &&
          c.vocab_size == 102400 && c.bos_token_id == 100000 && c.eos_token_id == 100001);
    CHECK(c.rope_factor == 40.0f && fabsf(c.rope_mscale - 0.707f) < 1e-7f &&
          fabsf(c.rope_mscale_all_dim - 0.707f) < 1e-7f && !c.fp8);
    CHECK(text && strstr(text, "\"q_lora_rank\": null,") && strstr(text, "\"mscale\": 0.707,") &&
          !strstr(text, "num_nextn_predict_layers") && !strstr(text, "quantization_config"));
    free(text);
    /* DeepSeek-V2-Lite: 15.7B parameters */
    CHECK(mk_plan_size(&s, &n, &bytes) == DUET_OK);
    CHECK_NEAR((double)bytes, expected_bytes(&s.cfg), 0.5);
    CHECK_MSG(fabs(bytes / 2.0 - 15.7e9) < 0.05e9, "V2-Lite has %.2fB parameters", bytes / 2e9);

    CHECK(mk_preset("tiny", &s) == DUET_OK);
    c = parse_back(&s, NULL);
    CHECK(!strcmp(c.model_type, "deepseek_v3") && c.vocab_size == 129280 && c.hidden_size == 256 &&
          c.num_hidden_layers == 4 && c.n_routed_experts == 16 && !c.fp8);
    s.cfg.fp8 = true;
    CHECK(mk_plan_size(&s, &n, &bytes) == DUET_OK);
    CHECK_NEAR((double)bytes, expected_bytes(&s.cfg), 0.5);
}

static void test_fit_and_refusals(void) {
    mk_spec s;
    mk_preset("v3", &s);
    s.cfg.num_hidden_layers = 2;
    mk_spec_fit(&s);
    CHECK(s.cfg.first_k_dense_replace == 2);
    mk_preset("v2-lite", &s);
    s.cfg.vocab_size = 1000;
    mk_spec_fit(&s);
    CHECK(s.cfg.bos_token_id == 0 && s.cfg.eos_token_id == 1);

    char *text = NULL;
    mk_preset("v3", &s);
    s.cfg.n_routed_experts = 12; /* n_group 8 does not divide it */
    tu_capture_begin();
    duet_status st = mk_config_json(&s, &text);
    char *log = tu_capture_end();
    CHECK(st == DUET_ERR_FORMAT && !text);
    CHECK_MSG(tu_count_lines(log) == 1 && strstr(log, "n_group must divide n_routed_experts"), "%s",
              log);
    free(log);
    mk_preset("tiny", &s);
    s.cfg.n_group = 8; /* noaux_tc needs two experts per group; 16 / 8 leaves two: fine */
    s.cfg.topk_group = 9;
    tu_capture_begin();
    st = mk_config_json(&s, &text);
    log = tu_capture_end();
    CHECK(st == DUET_ERR_FORMAT && strstr(log, "topk_group exceeds n_group"));
    free(log);
}

static mk_spec small_spec(bool fp8, int shards, uint64_t seed) {
    mk_spec s;
    mk_preset("tiny", &s);
    s.cfg.vocab_size = 300; /* not a multiple of anything, on purpose */
    s.cfg.n_routed_experts = 8;
    s.cfg.moe_intermediate_size = 64;
    s.cfg.fp8 = fp8;
    s.shards = shards;
    s.seed = seed;
    mk_spec_fit(&s);
    return s;
}

static int same_file(const char *a, const char *b) {
    unsigned char *x, *y;
    size_t nx, ny;
    if (tu_read(a, &x, &nx) != 0) return -1;
    if (tu_read(b, &y, &ny) != 0) {
        free(x);
        return -1;
    }
    int same = nx == ny && !memcmp(x, y, nx);
    free(x);
    free(y);
    return same;
}

static void test_determinism_and_shards(void) {
    mk_spec a = small_spec(true, 1, 5), b = small_spec(true, 1, 6), sh = small_spec(true, 5, 5);
    CHECK(mk_write(&a, at("s5")) == DUET_OK);
    CHECK(mk_write(&a, at("s5-again")) == DUET_OK);
    CHECK(mk_write(&b, at("s6")) == DUET_OK);
    CHECK(mk_write(&sh, at("s5-sharded")) == DUET_OK);
    char p1[4096], p2[4096];
    snprintf(p1, sizeof p1, "%s/model.safetensors", at("s5"));
    snprintf(p2, sizeof p2, "%s/model.safetensors", at("s5-again"));
    CHECK(same_file(p1, p2) == 1);
    snprintf(p2, sizeof p2, "%s/model.safetensors", at("s6"));
    CHECK(same_file(p1, p2) == 0);
    snprintf(p2, sizeof p2, "%s/model.safetensors", at("s5-sharded"));
    CHECK(access(p2, F_OK) != 0);

    /* every tensor of the sharded copy holds the single file's bytes, each FP8 weight sits
     * in the shard of its scale, every shard holds something, and total_size adds up */
    st_set *one = NULL, *many = NULL;
    CHECK(st_open_dir(at("s5"), &one) == DUET_OK);
    CHECK(st_open_dir(at("s5-sharded"), &many) == DUET_OK);
    if (!one || !many) return;
    CHECK(st_count(one) == st_count(many));
    size_t total = 0, per_shard[5] = {0};
    for (size_t i = 0; i < st_count(one); i++) {
        const st_tensor *t = st_at(one, i), *u = st_find(many, t->name);
        CHECK_MSG(u && u->nbytes == t->nbytes && !memcmp(u->data, t->data, t->nbytes), "%s",
                  t->name);
        total += t->nbytes;
        if (!u) continue;
        const char *f = strrchr(u->file, '/');
        int k = 0;
        CHECK(f && sscanf(f, "/model-%05d-of-00005.safetensors", &k) == 1 && k >= 1 && k <= 5);
        if (k >= 1 && k <= 5) per_shard[k - 1]++;
        size_t l = strlen(t->name);
        if (l > 10 && !strcmp(t->name + l - 10, "_scale_inv")) {
            char w[256];
            snprintf(w, sizeof w, "%.*s", (int)(l - 10), t->name);
            const st_tensor *wt = st_find(many, w);
            CHECK_MSG(wt && !strcmp(wt->file, u->file), "%s is not beside its scale", w);
        }
    }
    for (int k = 0; k < 5; k++) CHECK_MSG(per_shard[k] > 0, "shard %d is empty", k + 1);
    char *idx = NULL;
    unsigned char *ib;
    size_t in;
    snprintf(p1, sizeof p1, "%s/model.safetensors.index.json", at("s5-sharded"));
    if (tu_read(p1, &ib, &in) == 0) idx = (char *)ib;
    char want[64];
    snprintf(want, sizeof want, "\"total_size\": %zu", total);
    CHECK_MSG(idx && strstr(idx, want), "index lacks %s", want);
    free(idx);
    st_close(one);
    st_close(many);
}

static double std_of(const float *x, size_t n, double *mean_p) {
    double s = 0, s2 = 0;
    for (size_t i = 0; i < n; i++) {
        s += x[i];
        s2 += (double)x[i] * x[i];
    }
    double m = s / n;
    if (mean_p) *mean_p = m;
    return sqrt(s2 / n - m * m);
}

static void test_values(void) {
    mk_spec bf = small_spec(false, 1, 9);
    CHECK(mk_write(&bf, at("values")) == DUET_OK);
    st_set *s = NULL;
    CHECK(st_open_dir(at("values"), &s) == DUET_OK);
    if (!s) return;
    static float buf[300 * 256];
    const st_tensor *t = st_find(s, "model.embed_tokens.weight");
    CHECK(t && t->dtype == DT_BF16 && t->shape[0] == 300 && t->shape[1] == 256);
    if (t) {
        dt_to_f32(DT_BF16, t->data, buf, 300 * 256);
        double mean, sd = std_of(buf, 300 * 256, &mean);
        CHECK_MSG(fabs(sd - MK_INIT_STD) < 0.001 && fabs(mean) < 0.0005, "std %g mean %g", sd,
                  mean);
    }
    int norms = 0;
    for (size_t i = 0; i < st_count(s); i++) {
        const st_tensor *n = st_at(s, i);
        if (!strstr(n->name, "norm.weight")) continue;
        norms++;
        dt_to_f32(DT_BF16, n->data, buf, (size_t)st_numel(n));
        for (int64_t k = 0; k < st_numel(n); k++) CHECK(buf[k] == 1.0f);
    }
    CHECK(norms == 4 * 4 + 1); /* 4 per layer with q LoRA, and the final one */
    t = st_find(s, "model.layers.2.mlp.gate.e_score_correction_bias");
    CHECK(t && t->dtype == DT_F32 && st_numel(t) == 8);
    if (t) {
        const float *b = t->data;
        int nonzero = 0;
        for (int k = 0; k < 8; k++) {
            CHECK(fabsf(b[k]) <= 0.01f);
            nonzero += b[k] != 0.0f;
        }
        CHECK(nonzero > 0);
    }
    st_close(s);

    mk_spec f8 = small_spec(true, 1, 9);
    CHECK(mk_write(&f8, at("values-fp8")) == DUET_OK);
    CHECK(st_open_dir(at("values-fp8"), &s) == DUET_OK);
    if (!s) return;
    /* q_b_proj is [4 * 48 = 192, 192]: scales [2, 2], the last block row and column partial */
    t = st_find(s, "model.layers.0.self_attn.q_b_proj.weight");
    const st_tensor *sc = st_find(s, "model.layers.0.self_attn.q_b_proj.weight_scale_inv");
    CHECK(t && sc && t->dtype == DT_F8_E4M3 && sc->dtype == DT_F32);
    CHECK(sc && sc->ndim == 2 && sc->shape[0] == 2 && sc->shape[1] == 2);
    CHECK(!st_find(s, "model.embed_tokens.weight_scale_inv") &&
          !st_find(s, "model.layers.1.mlp.gate.weight_scale_inv"));
    const st_tensor *g = st_find(s, "model.layers.1.mlp.gate.weight");
    CHECK(g && g->dtype == DT_BF16);
    if (t && sc && sc->shape[0] == 2 && sc->shape[1] == 2) {
        const unsigned char *q = t->data;
        const float *sv = sc->data;
        for (int k = 0; k < 4; k++)
            CHECK(sv[k] >= 0.75 * MK_INIT_STD / 100 && sv[k] <= 1.25 * MK_INIT_STD / 100);
        int nan = 0;
        for (int r = 0; r < 192; r++)
            for (int k = 0; k < 192; k++) {
                nan += (q[r * 192 + k] & 0x7f) == 0x7f;
                buf[r * 192 + k] = dt_e4m3_to_f32(q[r * 192 + k]) * sv[(r / 128) * 2 + k / 128];
            }
        CHECK(nan == 0);
        double sd = std_of(buf, 192 * 192, NULL);
        CHECK_MSG(fabs(sd - MK_INIT_STD) < 0.004, "dequantized std %g", sd);
    }
    st_close(s);
}

static void test_dirs_and_tokenizer(void) {
    mk_spec s = small_spec(false, 3, 1);
    CHECK(mk_write(&s, at("reuse/deeper")) == DUET_OK); /* parents are created */
    tu_capture_begin();
    s.shards = 1;
    duet_status st = mk_write(&s, at("reuse/deeper"));
    char *log = tu_capture_end();
    CHECK(st == DUET_ERR_INVALID);
    CHECK_MSG(tu_count_lines(log) == 1 && strstr(log, "already holds a checkpoint") &&
                  strstr(log, "--force"),
              "%s", log);
    free(log);
    s.force = true;
    CHECK(mk_write(&s, at("reuse/deeper")) == DUET_OK);
    char p[4096];
    snprintf(p, sizeof p, "%s/model-00001-of-00003.safetensors", at("reuse/deeper"));
    CHECK(access(p, F_OK) != 0); /* stale shards would be read as part of the checkpoint */
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", at("reuse/deeper"));
    CHECK(access(p, F_OK) != 0);

    s = small_spec(false, 1, 1);
    s.tokenizer_dir = GOLDEN_DIR "/tokenizer";
    log_set_level(LOG_LEVEL_WARN);
    tu_capture_begin();
    st = mk_write(&s, at("tok"));
    log = tu_capture_end();
    CHECK(st == DUET_OK);
    /* vocab 300 is far below the tokenizer's ids: allowed, with a warning */
    CHECK_MSG(strstr(log, "has ids up to 128814 but vocab_size is 300"), "%s", log);
    free(log);
    char q[4096];
    snprintf(p, sizeof p, "%s/tokenizer.json", at("tok"));
    CHECK(same_file(p, GOLDEN_DIR "/tokenizer/tokenizer.json") == 1);
    snprintf(p, sizeof p, "%s/tokenizer_config.json", at("tok"));
    CHECK(same_file(p, GOLDEN_DIR "/tokenizer/tokenizer_config.json") == 1);

    /* a wrong tokenizer path fails before anything is written */
    s.tokenizer_dir = "/nonexistent-tokenizer";
    tu_capture_begin();
    st = mk_write(&s, at("tok-missing"));
    log = tu_capture_end();
    CHECK(st == DUET_ERR_NOT_FOUND && tu_count_lines(log) == 1 &&
          strstr(log, "/nonexistent-tokenizer/tokenizer.json"));
    free(log);
    snprintf(q, sizeof q, "%s/model.safetensors", at("tok-missing"));
    CHECK(access(q, F_OK) != 0);

    s = small_spec(false, 100000, 1);
    tu_capture_begin();
    st = mk_write(&s, at("too-many-shards"));
    log = tu_capture_end();
    CHECK(st == DUET_ERR_INVALID && strstr(log, "100000 shards"));
    free(log);
}

int main(void) {
    g_root = tu_mkdtemp("mk");
    if (!g_root) return 1;
    log_set_level(LOG_LEVEL_WARN);
    test_presets();
    test_fit_and_refusals();
    test_determinism_and_shards();
    test_values();
    test_dirs_and_tokenizer();
    tu_rmtree(g_root);
    free(g_root);
    CHECK_DONE();
}
