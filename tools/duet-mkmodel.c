/* duet-mkmodel: writes a random-weight checkpoint in DeepSeek's Hugging Face layout from a preset
 * (tiny, v2-lite, v3) and overrides, so demos and benchmarks run without downloads. The work is
 * in tools/mkmodel/mkmodel.c; this file only turns arguments into an mk_spec. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "mkmodel.h"

static void usage(FILE *f) {
    fprintf(f, "usage: duet-mkmodel --preset tiny|v2-lite|v3 --out DIR [options]\n"
               "Writes DIR/config.json and model.safetensors (or shards + "
               "model.safetensors.index.json)\nwith random weights, as DeepSeek lays out its "
               "checkpoints.\n"
               "  --preset NAME            tiny: V3-shaped, hidden 256, 4 layers, 16 experts, "
               "vocab 129280\n"
               "                           v2-lite: DeepSeek-V2-Lite (27 layers, bf16)\n"
               "                           v3: DeepSeek-V3 cut to 4 layers (fp8)\n"
               "  --out DIR                output directory (created if missing)\n"
               "  --layers N               num_hidden_layers (first_k_dense_replace is capped at "
               "it)\n"
               "  --dtype bf16|fp8         fp8: linear weights F8_E4M3 with 128x128 "
               "weight_scale_inv\n"
               "  --shards N               split into N files + index (default 1)\n"
               "  --seed S                 values are a function of seed and tensor name (default "
               "0)\n"
               "  --vocab-size V           vocabulary (bos/eos move to 0/1 if they do not fit)\n"
               "  --hidden-size N, --intermediate-size N, --moe-intermediate-size N, --heads N,\n"
               "  --q-lora-rank N (0: plain q_proj), --kv-lora-rank N, --experts N (0: dense),\n"
               "  --experts-per-tok N, --shared-experts N, --n-group N, --topk-group N,\n"
               "  --first-dense N          override the preset's dimensions\n"
               "  --mtp                    also write an MTP layer (num_nextn_predict_layers 1)\n"
               "  --tokenizer DIR          copy DIR/tokenizer.json and tokenizer_config.json\n"
               "  --force                  replace a checkpoint already in DIR\n");
}

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

typedef struct int_flag {
    const char *flag;
    int min, max;
    int value; /* -1: not given */
} int_flag;

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

static int parse_int(const char *v, int min, int max, int *out) {
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (*v == '\0' || *end != '\0' || errno || x < min || x > max) return -1;
    *out = (int)x;
    return 0;
}

int main(int argc, char **argv) {
    log_set_tag("duet-mkmodel");
    int_flag ints[F_COUNT] = {
        [F_LAYERS] = {"--layers", 1, 4096, -1},
        [F_SHARDS] = {"--shards", 1, 99999, -1},
        [F_VOCAB] = {"--vocab-size", 2, 1 << 24, -1},
        [F_HIDDEN] = {"--hidden-size", 1, 1 << 20, -1},
        [F_INTER] = {"--intermediate-size", 1, 1 << 22, -1},
        [F_MOE_INTER] = {"--moe-intermediate-size", 1, 1 << 22, -1},
        [F_HEADS] = {"--heads", 1, 4096, -1},
        [F_Q_LORA] = {"--q-lora-rank", 0, 1 << 20, -1},
        [F_KV_LORA] = {"--kv-lora-rank", 1, 1 << 20, -1},
        [F_EXPERTS] = {"--experts", 0, 1 << 16, -1},
        [F_TOPK] = {"--experts-per-tok", 1, 1 << 16, -1},
        [F_SHARED] = {"--shared-experts", 0, 1 << 10, -1},
        [F_N_GROUP] = {"--n-group", 1, 1 << 16, -1},
        [F_TOPK_GROUP] = {"--topk-group", 1, 1 << 16, -1},
        [F_FIRST_DENSE] = {"--first-dense", 0, 4096, -1},
    };
    const char *preset = NULL, *out = NULL, *dtype = NULL, *tokenizer = NULL, *seed = NULL;
    int mtp = 0, force = 0;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(a, "--mtp")) {
            mtp = 1;
            continue;
        }
        if (!strcmp(a, "--force")) {
            force = 1;
            continue;
        }
        /* every other option takes a value: "--flag VALUE" or "--flag=VALUE" */
        char flag[64];
        const char *v = NULL, *eq = strchr(a, '=');
        if (eq && eq - a < (int)sizeof flag) {
            snprintf(flag, sizeof flag, "%.*s", (int)(eq - a), a);
            v = eq + 1;
        } else {
            snprintf(flag, sizeof flag, "%s", a);
        }
        const char **str_dst = !strcmp(flag, "--preset")      ? &preset
                               : !strcmp(flag, "--out")       ? &out
                               : !strcmp(flag, "--dtype")     ? &dtype
                               : !strcmp(flag, "--tokenizer") ? &tokenizer
                               : !strcmp(flag, "--seed")      ? &seed
                                                              : NULL;
        int_flag *f = NULL;
        for (int k = 0; k < F_COUNT && !str_dst; k++)
            if (!strcmp(flag, ints[k].flag)) f = &ints[k];
        if (!str_dst && !f) return bad_arg("unknown option %s", a);
        if (!v) {
            if (i + 1 >= argc) return bad_arg("%s needs a value", flag);
            v = argv[++i];
        }
        if (str_dst) {
            *str_dst = v;
        } else if (parse_int(v, f->min, f->max, &f->value) != 0) {
            return bad_arg("%s needs an integer in [%d, %d], got '%s'", flag, f->min, f->max, v);
        }
    }
    if (!preset) return bad_arg("--preset is required (tiny, v2-lite or v3)");
    if (!out || !out[0]) return bad_arg("--out DIR is required");

    mk_spec spec;
    if (mk_preset(preset, &spec) != DUET_OK)
        return bad_arg("unknown preset '%s' (tiny, v2-lite or v3)", preset);
    cfg_model *c = &spec.cfg;
    if (dtype) {
        if (!strcmp(dtype, "fp8"))
            c->fp8 = true;
        else if (!strcmp(dtype, "bf16"))
            c->fp8 = false;
        else
            return bad_arg("--dtype must be bf16 or fp8, got '%s'", dtype);
    }
    if (seed) {
        char *end;
        errno = 0;
        unsigned long long s = strtoull(seed, &end, 10);
        if (!seed[0] || *end || errno || seed[0] == '-')
            return bad_arg("--seed needs a non-negative integer, got '%s'", seed);
        spec.seed = s;
    }
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
        if (ints[k].value >= 0) *dst[k] = ints[k].value;
    if (mtp) c->num_nextn_predict_layers = 1;
    spec.tokenizer_dir = tokenizer;
    spec.force = force;
    mk_spec_fit(&spec);

    /* A combination config.json would not allow is an argument error: refuse it before
     * anything is written (config.c logs which field). */
    char *json = NULL;
    if (mk_config_json(&spec, &json) != DUET_OK) return 2;
    free(json);
    size_t n_tensors = 0;
    uint64_t bytes = 0;
    if (mk_plan_size(&spec, &n_tensors, &bytes) != DUET_OK) return 1;
    if (bytes > (4ull << 30))
        LOG_WARN("this checkpoint is %.1f GiB (%zu tensors); --layers, --experts or "
                 "--vocab-size make it smaller",
                 (double)bytes / (1u << 30), n_tensors);
    if (mk_write(&spec, out) != DUET_OK) return 1;
    printf("%s: %s checkpoint, %d layers, %s, %zu tensors, %.1f MiB in %d file%s\n", out, preset,
           c->num_hidden_layers, c->fp8 ? "fp8" : "bf16", n_tensors, (double)bytes / (1u << 20),
           spec.shards, spec.shards > 1 ? "s" : "");
    return 0;
}
