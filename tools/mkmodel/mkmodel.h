/* Random-weight DeepSeek checkpoints in DeepSeek's own Hugging Face layout (config.json,
 * model.safetensors or shards + model.safetensors.index.json), so demos, benchmarks and tests
 * run without a download. Every value is a function of (seed, tensor name, element index):
 * the same seed gives the same tensors however the files are sharded. Used by duet-mkmodel
 * and the unit tests; one thread per call. */
#ifndef DUET_MKMODEL_H
#define DUET_MKMODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model/config.h"
#include "base/status.h"

/* Standard deviation of weights, as DeepSeek's initializer_range. */
#define MK_INIT_STD 0.02

typedef struct mk_spec {
    /* What config.json will say. cfg.fp8 stores linear weights as F8_E4M3 with 128x128
     * weight_scale_inv blocks (cfg.fp8_block); cfg.num_nextn_predict_layers > 0 also writes
     * that many MTP layers after the last one. */
    cfg_model cfg;
    uint64_t seed;
    int shards;                /* 1: model.safetensors; N: N shards + index */
    const char *tokenizer_dir; /* borrowed; tokenizer.json + tokenizer_config.json or NULL */
    bool force;                /* replace checkpoint files already in the output directory */
    bool config_only;          /* config.json (and the tokenizer) without tensors: for runs with
                                * --load-format dummy, which need the shapes only */
} mk_spec;

/* Fills *spec_p with "tiny" (V3-shaped, seconds on a CPU), "v2-lite" (DeepSeek-V2-Lite) or
 * "v3" (DeepSeek-V3, 4 layers). DUET_ERR_NOT_FOUND for another name. */
duet_status mk_preset(const char *name, mk_spec *spec_p);
/* Keeps a spec consistent after its fields were overridden: first_k_dense_replace is capped at
 * num_hidden_layers, bos/eos ids beyond the vocabulary become 0/1. Each change is logged. */
void mk_spec_fit(mk_spec *spec);
/* config.json's text as DeepSeek writes it (caller frees). A spec that config.c would refuse
 * is refused here with config.c's message, before anything is written. */
duet_status mk_config_json(const mk_spec *spec, char **json_p);
/* How many tensors and bytes of tensor data the checkpoint holds. */
duet_status mk_plan_size(const mk_spec *spec, size_t *n_tensors_p, uint64_t *bytes_p);
/* Writes the checkpoint into dir (created if missing). Tensors are generated and written in
 * pieces, so memory stays small at any model size. On failure the files written so far are
 * removed. */
duet_status mk_write(const mk_spec *spec, const char *dir);

#endif
