/* duet-mkmodel: writes a random-weight checkpoint in DeepSeek's Hugging Face layout from a preset
 * (tiny, v2-lite, v3) and overrides, so demos and benchmarks run without downloads. The work is
 * in tools/mkmodel/mkmodel.c; this file only turns arguments (base/opt.h) into an mk_spec. */
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/opt.h"
#include "mkmodel.h"

/* One line, exit status 2: what a script calling us needs to see. */
static int bad_arg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int bad_arg(const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "duet-mkmodel: %s (see --help)\n", msg);
    return 2;
}

static duet_status parse_seed(const opt_spec *s, const char *v, char *err, size_t len) {
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 10);
    if (!*v || *end || errno || v[0] == '-') {
        snprintf(err, len, "expected a non-negative integer, got '%s'", v);
        return DUET_ERR_INVALID;
    }
    *(uint64_t *)s->dest = x;
    return DUET_OK;
}

/* Integers that override the preset's (and --shards); -1 until given. */
enum {
    F_LAYERS,
    F_SHARDS,
    F_VOCAB,
    F_HIDDEN,
    F_INTER,
    F_MOE_INTER,
    F_HEADS,
    F_Q_LORA,
    F_KV_LORA,
    F_EXPERTS,
    F_TOPK,
    F_SHARED,
    F_N_GROUP,
    F_TOPK_GROUP,
    F_FIRST_DENSE,
    F_COUNT
};

#define DIM(flag, i, lo, hi, help_)                                                                \
    { .name = flag, .type = OPT_INT, .dest = &dims[i], .min = lo, .max = hi, .help = help_ }

int main(int argc, char **argv) {
    log_set_tag("duet-mkmodel");
    int dims[F_COUNT];
    for (int k = 0; k < F_COUNT; k++) dims[k] = -1;
    const char *preset = NULL, *out = NULL, *tokenizer = NULL;
    int dtype = -1; /* 0 bf16, 1 fp8; -1: the preset's */
    bool mtp = false, force = false, config_only = false;
    uint64_t seed = 0;
    const opt_spec specs[] = {
        {.name = "--preset",
         .type = OPT_STRING,
         .dest = &preset,
         .metavar = "{tiny,v2-lite,v3}",
         .help = "tiny: V3-shaped, hidden 256, 4 layers, 16 experts, vocab 129280; v2-lite: "
                 "DeepSeek-V2-Lite (27 layers, bf16); v3: DeepSeek-V3 cut to 4 layers (fp8)"},
        {.name = "--out",
         .type = OPT_STRING,
         .dest = &out,
         .metavar = "DIR",
         .help = "output directory (created if missing)"},
        {.name = "--dtype",
         .type = OPT_CHOICE,
         .dest = &dtype,
         .choices = "bf16|fp8",
         .help = "fp8: linear weights F8_E4M3 with 128x128 weight_scale_inv (default: the "
                 "preset's)"},
        DIM("--shards", F_SHARDS, 1, 99999, "split into N files + index (default 1)"),
        {.name = "--seed",
         .type = OPT_CUSTOM,
         .parse = parse_seed,
         .dest = &seed,
         .def = "0",
         .metavar = "S",
         .help = "values are a function of seed and tensor name"},
        {.name = "--mtp",
         .type = OPT_FLAG,
         .dest = &mtp,
         .help = "also write an MTP layer (num_nextn_predict_layers 1)"},
        {.name = "--tokenizer",
         .type = OPT_STRING,
         .dest = &tokenizer,
         .metavar = "DIR",
         .help = "copy DIR/tokenizer.json and tokenizer_config.json"},
        {.name = "--force",
         .type = OPT_FLAG,
         .dest = &force,
         .help = "replace a checkpoint already in DIR"},
        {.name = "--config-only",
         .type = OPT_FLAG,
         .dest = &config_only,
         .help = "write config.json (and the tokenizer) without weights, for servers and "
                 "benchmarks run with --load-format dummy at any size"},
    };
    const opt_spec dim_specs[] = {
        DIM("--layers", F_LAYERS, 1, 4096,
            "num_hidden_layers (first_k_dense_replace is capped at it)"),
        DIM("--vocab-size", F_VOCAB, 2, 1 << 24,
            "vocabulary (bos/eos move to 0/1 if they do not fit)"),
        DIM("--hidden-size", F_HIDDEN, 1, 1 << 20, "hidden_size"),
        DIM("--intermediate-size", F_INTER, 1, 1 << 22, "intermediate_size (dense MLPs)"),
        DIM("--moe-intermediate-size", F_MOE_INTER, 1, 1 << 22,
            "moe_intermediate_size (per expert)"),
        DIM("--heads", F_HEADS, 1, 4096, "num_attention_heads"),
        DIM("--q-lora-rank", F_Q_LORA, 0, 1 << 20, "q_lora_rank (0: plain q_proj)"),
        DIM("--kv-lora-rank", F_KV_LORA, 1, 1 << 20, "kv_lora_rank"),
        DIM("--experts", F_EXPERTS, 0, 1 << 16, "n_routed_experts (0: dense)"),
        DIM("--experts-per-tok", F_TOPK, 1, 1 << 16, "num_experts_per_tok"),
        DIM("--shared-experts", F_SHARED, 0, 1 << 10, "n_shared_experts"),
        DIM("--n-group", F_N_GROUP, 1, 1 << 16, "n_group"),
        DIM("--topk-group", F_TOPK_GROUP, 1, 1 << 16, "topk_group"),
        DIM("--first-dense", F_FIRST_DENSE, 0, 4096, "first_k_dense_replace"),
    };
    opt_parser *op;
    if (opt_parser_create("duet-mkmodel", "--preset {tiny,v2-lite,v3} --out DIR [options]",
                          "Writes DIR/config.json and model.safetensors (or shards + "
                          "model.safetensors.index.json) with random weights, as DeepSeek lays "
                          "out its checkpoints.",
                          &op) != DUET_OK)
        return 1;
    int prc = 2;
    if (opt_add(op, "Checkpoint", specs, (int)(sizeof specs / sizeof specs[0])) == DUET_OK &&
        opt_add(op, "Dimensions (override the preset's)", dim_specs,
                (int)(sizeof dim_specs / sizeof dim_specs[0])) == DUET_OK)
        prc = opt_parse(op, argc, argv);
    opt_parser_destroy(op);
    if (prc) return prc == 1 ? 0 : 2;
    if (!preset) return bad_arg("--preset is required (tiny, v2-lite or v3)");
    if (!out || !out[0]) return bad_arg("--out DIR is required");

    mk_spec spec;
    if (mk_preset(preset, &spec) != DUET_OK)
        return bad_arg("unknown preset '%s' (tiny, v2-lite or v3)", preset);
    cfg_model *c = &spec.cfg;
    if (dtype >= 0) c->fp8 = dtype == 1;
    spec.seed = seed;
    int *dst[F_COUNT] = {
        [F_LAYERS] = &c->num_hidden_layers,
        [F_SHARDS] = &spec.shards,
        [F_VOCAB] = &c->vocab_size,
        [F_HIDDEN] = &c->hidden_size,
        [F_INTER] = &c->intermediate_size,
        [F_MOE_INTER] = &c->moe_intermediate_size,
        [F_HEADS] = &c->num_attention_heads,
        [F_Q_LORA] = &c->q_lora_rank,
        [F_KV_LORA] = &c->kv_lora_rank,
        [F_EXPERTS] = &c->n_routed_experts,
        [F_TOPK] = &c->num_experts_per_tok,
        [F_SHARED] = &c->n_shared_experts,
        [F_N_GROUP] = &c->n_group,
        [F_TOPK_GROUP] = &c->topk_group,
        [F_FIRST_DENSE] = &c->first_k_dense_replace,
    };
    for (int k = 0; k < F_COUNT; k++)
        if (dims[k] >= 0) *dst[k] = dims[k];
    if (mtp) c->num_nextn_predict_layers = 1;
    spec.tokenizer_dir = tokenizer;
    spec.force = force;
    spec.config_only = config_only;
    mk_spec_fit(&spec);

    /* A combination config.json would not allow is an argument error: refuse it before
     * anything is written (config.c logs which field). */
    char *json = NULL;
    if (mk_config_json(&spec, &json) != DUET_OK) return 2;
    free(json);
    size_t n_tensors = 0;
    uint64_t bytes = 0;
    if (mk_plan_size(&spec, &n_tensors, &bytes) != DUET_OK) return 1;
    if (config_only) bytes = n_tensors = 0;
    if (bytes > (4ull << 30))
        LOG_WARN("this checkpoint is %.1f GiB (%zu tensors); --layers, --experts or "
                 "--vocab-size make it smaller",
                 (double)bytes / (1u << 30), n_tensors);
    if (mk_write(&spec, out) != DUET_OK) return 1;
    if (config_only) {
        printf("%s: %s config.json, %d layers (no weights: serve it with --load-format dummy)\n",
               out, preset, c->num_hidden_layers);
        return 0;
    }
    printf("%s: %s checkpoint, %d layers, %s, %zu tensors, %.1f MiB in %d file%s\n", out, preset,
           c->num_hidden_layers, c->fp8 ? "fp8" : "bf16", n_tensors, (double)bytes / (1u << 20),
           spec.shards, spec.shards > 1 ? "s" : "");
    return 0;
}
