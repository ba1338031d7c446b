/* duet-check plan: the memory plan of a deployment without a GPU (model/memplan.h). Reads only
 * config.json, takes the layout and the device size as flags (the workers' own spellings), prints
 * the plan and exits 0 when it fits, 1 when it does not (the reason on stderr), 2 on bad input. */
#include <stdio.h>
#include <string.h>

#include "check.h"
#include "base/opt.h"
#include "plan_opts.h"
#include "model/config.h"
#include "model/memplan.h"
#include "server/options.h"

/* the model's name in messages: the directory's last component */
static const char *dir_name(const char *dir, char *buf, size_t len) {
    size_t n = strlen(dir);
    while (n > 1 && dir[n - 1] == '/') n--;
    size_t s = n;
    while (s > 0 && dir[s - 1] != '/') s--;
    snprintf(buf, len, "%.*s", (int)(n - s), dir + s);
    return buf;
}

/* --speculative-config, read by the workers' own parser */
static duet_status parse_spec(const opt_spec *spec, const char *v, char *err, size_t len) {
    return srv_config_parse_spec(v, NULL, 0, (int *)spec->dest, err, len);
}

int check_plan_main(int argc, char **argv) {
    mplan_inputs in;
    mplan_inputs_default(&in);
    const char *model = NULL;
    int weights = 0, dtype = 0, kv_dtype = 0, backend = 0;
    bool eager = false;
    opt_parser *op;
    if (opt_parser_create("duet-check plan", "--model DIR --gpu-memory SIZE [options]",
                          "Prints what one rank of an instance needs on its device (weights by "
                          "kind, activations, KV cache) for config.json in DIR and says whether "
                          "it fits the share --gpu-memory-utilization grants (exit 0) or what "
                          "does not fit by how much (exit 1). Example: DeepSeek-V3 on one node "
                          "of 8 H200s: duet-check plan --model V3 -dp 8 --enable-expert-parallel "
                          "--gpu-memory 143771M --weights fp8",
                          &op) != DUET_OK)
        return 1;
    const opt_spec specs[] = {
        {.name = "--model",
         .type = OPT_STRING,
         .dest = &model,
         .metavar = "DIR",
         .help = "the checkpoint's directory (only config.json is read), or the positional DIR"},
        {.name = "--tensor-parallel-size",
         .alias = "-tp",
         .type = OPT_INT,
         .dest = &in.tp,
         .def = "1",
         .min = 1,
         .max = 4096,
         .help = "ranks sharing each layer"},
        {.name = "--data-parallel-size",
         .alias = "-dp",
         .type = OPT_INT,
         .dest = &in.dp,
         .def = "1",
         .min = 1,
         .max = 4096,
         .help = "replicas in the instance"},
        {.name = "--enable-expert-parallel",
         .alias = "-ep",
         .type = OPT_FLAG,
         .dest = &in.ep,
         .help = "place routed experts across all tp * dp ranks"},
        {.name = "--gpus-per-node",
         .type = OPT_INT,
         .dest = &in.gpus_per_node,
         .def = "8",
         .min = 1,
         .max = 4096,
         .help = "GPUs of one node (for the node count)"},
        {.name = "--gpu-memory",
         .type = OPT_SIZE,
         .dest = &in.gpu_memory,
         .metavar = "SIZE",
         .help = "memory of one GPU, K/M/G powers of 1024 (H200: 143771M, H100: 80G)"},
        {.name = "--gpu-memory-utilization",
         .type = OPT_DOUBLE,
         .dest = &in.gpu_memory_utilization,
         .def = "0.9",
         .metavar = "F",
         .help = "share of each GPU's memory the instance may use, in (0, 1]"},
        {.name = "--weights",
         .type = OPT_CHOICE,
         .dest = &weights,
         .def = "auto",
         .choices = "auto|bf16|fp8|float32|bfloat16=bf16",
         .help = "how linear weights are stored: auto is what the loader does today (bf16, FP8 "
                 "checkpoints dequantized); fp8 keeps an FP8 checkpoint's weights e4m3"},
        {.name = "--dtype",
         .type = OPT_CHOICE,
         .dest = &dtype,
         .def = "bfloat16",
         .choices = "bfloat16|float32|bf16=bfloat16|float=float32",
         .help = "activations (the CUDA backend's default is bfloat16)"},
        {.name = "--backend",
         .type = OPT_CHOICE,
         .dest = &backend,
         .def = "cuda",
         .choices = "cuda|cpu",
         .help = "whose KV cache: cuda keeps a decoded layer beside an fp8 cache (counted), cpu "
                 "none"},
        {.name = "--kv-cache-dtype",
         .type = OPT_CHOICE,
         .dest = &kv_dtype,
         .def = "auto",
         .choices = "auto|bfloat16|fp8|float32|bf16=bfloat16|fp8_e4m3=fp8",
         .help = "KV cache elements (auto: the activation type)"},
        {.name = "--max-model-len",
         .type = OPT_INT,
         .dest = &in.max_model_len,
         .min = 1,
         .max = 1 << 24,
         .help = "context length (default min(config, 8192), as the workers)"},
        plan_spec_max_num_seqs(&in.max_num_seqs),
        plan_spec_max_num_batched_tokens(&in.max_num_batched_tokens),
        plan_spec_block_size(&in.block_size),
        {.name = "--kv-cache-memory",
         .type = OPT_SIZE,
         .dest = &in.kv_cache_memory,
         .help = "a fixed KV cache per GPU (the utilization is then set aside, as in vLLM)"},
        {.name = "--enforce-eager",
         .type = OPT_FLAG,
         .dest = &eager,
         .help = "no CUDA graphs (no allowance for them)"},
        {.name = "--speculative-config",
         .type = OPT_CUSTOM,
         .parse = parse_spec,
         .dest = &in.spec_tokens,
         .metavar = "JSON",
         .help = "as the workers take it, {\"method\": \"deepseek_mtp\", "
                 "\"num_speculative_tokens\": N}: plans the MTP module, its KV layer and the "
                 "verify step's rows"},
    };
    opt_allow_positional(op, 1, "DIR");
    int rc = 2;
    if (opt_add(op, "Memory plan", specs, (int)(sizeof specs / sizeof specs[0])) == DUET_OK)
        rc = opt_parse(op, argc, argv);
    if (!model)
        model = opt_positional(op, 0);
    else if (opt_positional(op, 0)) {
        fprintf(stderr, "duet-check plan: give the model once (--model or DIR)\n");
        rc = 2;
    }
    opt_parser_destroy(op);
    if (rc) return rc == 1 ? 0 : 2;
    if (!model) {
        fprintf(stderr, "duet-check plan: --model DIR is required (see --help)\n");
        return 2;
    }
    if (in.gpu_memory <= 0) {
        fprintf(stderr, "duet-check plan: --gpu-memory is required: the memory of one GPU "
                        "(H200: 143771M, H100: 80G)\n");
        return 2;
    }
    cfg_model c;
    if (cfg_load(model, &c) != DUET_OK) return 2; /* cfg_load said why */
    in.act_dtype = dtype == 1 ? DT_F32 : DT_BF16;
    static const dt_dtype kv_types[] = {DT_COUNT, DT_BF16, DT_F8_E4M3, DT_F32};
    in.kv_dtype = kv_dtype == 0 ? in.act_dtype : kv_types[kv_dtype];
    in.kv_decoded_layer = backend == 0; /* be_ops.kv_fp8_decoded_layer of the CUDA backend */
    static const mplan_weight_format formats[] = {MPLAN_WEIGHTS_BF16, MPLAN_WEIGHTS_BF16,
                                                  MPLAN_WEIGHTS_FP8, MPLAN_WEIGHTS_F32};
    in.weights = weights == 0 ? mplan_weight_format_auto(&c, in.act_dtype) : formats[weights];
    in.graphs = !eager;
    char name[256];
    in.model_name = dir_name(model, name, sizeof name);

    mplan p;
    char err[512];
    if (mplan_compute(&c, &in, &p, err, sizeof err) != DUET_OK) {
        fprintf(stderr, "duet-check plan: %s\n", err);
        return 2;
    }
    mplan_print(&p, stdout);
    if (!p.fits) {
        fprintf(stderr, "duet-check plan: does not fit: %s\n", p.verdict);
        return 1;
    }
    return 0;
}
