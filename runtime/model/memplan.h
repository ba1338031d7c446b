/* The memory plan of one rank: what its weights, activations and KV cache take on the device
 * for a config.json, a parallel layout (TP, DP, EP) and the serving limits, and whether that fits
 * the share of the device --gpu-memory-utilization grants it (vLLM's meaning: a fraction of the
 * device's whole memory for this instance; after loading, its CUDA context counts in it too).
 * Pure arithmetic from the config and the shard plan, so a layout that cannot fit is refused
 * before anything loads.
 * Measuring the device is the backend's (be_mem_info); choosing the KV cache size from those
 * measurements after loading is here too (mplan_kv_after_load). Any thread. */
#ifndef DUET_MEMPLAN_H
#define DUET_MEMPLAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "model/config.h"
#include "model/shard.h"
#include "base/dtype.h"
#include "base/status.h"

/* How the loader stores linear weights on the device. Router weights and norms are float32 in
 * every format; the embedding and lm_head are kept in the activation type. */
typedef enum mplan_weight_format {
    MPLAN_WEIGHTS_F32 = 0,  /* float32 (--dtype float32, the CPU backend) */
    MPLAN_WEIGHTS_BF16 = 1, /* bf16; FP8 checkpoints dequantized at load */
    /* the linear weights an FP8 checkpoint stores as e4m3 stay e4m3, each with its float32
     * weight_scale_inv blocks, where mplan_fp8_resident says so (the rest bf16); needs an FP8
     * checkpoint */
    MPLAN_WEIGHTS_FP8 = 2,
} mplan_weight_format;

/* Whether the loader keeps rows [r0, r0 + nrows) and columns [c0, c0 + ncols) of an FP8
 * projection as e4m3 with its scales (format MPLAN_WEIGHTS_FP8): 128x128 scale blocks, a slice
 * starting on a block boundary (its scales are a sub-grid of the checkpoint's), columns a
 * multiple of 16 (the GEMMs read 16 bytes at a time). Otherwise it is dequantized to bf16.
 * kv_b_proj is always dequantized: the MLA kernels read it as bf16. */
bool mplan_fp8_resident(const cfg_model *c, long long r0, long long c0, long long ncols);
/* An MLP (gate and up rows [i0, i0 + n), down columns the same) stays FP8 only whole: both
 * weights resident. An MoE layer's routed and shared experts stay FP8 only all together (the
 * grouped GEMM runs them in one launch): mplan_fp8_moe_resident. */
bool mplan_fp8_ffn_resident(const cfg_model *c, long long i0, long long n);
bool mplan_fp8_moe_resident(const cfg_model *c, const mdl_plan *plan);

/* What the loader does for c with activations of type act: the one place that choice is
 * written down (weights.c counts its progress with it, the server plans with it). FP8 for an
 * FP8 checkpoint with bf16 activations (the CUDA backend; the CPU backend's activations are
 * float32 and it dequantizes). */
mplan_weight_format mplan_weight_format_auto(const cfg_model *c, dt_dtype act);
const char *mplan_weight_format_name(mplan_weight_format f); /* "float32", "bf16", "fp8" */

/* Weight kinds, as the plan reports them. */
typedef enum mplan_kind {
    MPLAN_ATTENTION = 0,  /* MLA projections of every layer */
    MPLAN_DENSE_MLP,      /* the first_k_dense_replace layers' MLP */
    MPLAN_SHARED_EXPERTS, /* MoE layers' shared experts */
    MPLAN_ROUTED_EXPERTS, /* this rank's routed experts */
    MPLAN_EMBED_HEAD,     /* embedding and lm_head rows of this rank's vocabulary slice */
    MPLAN_NORMS_ROUTER,   /* RMSNorm weights, router gates and their score-correction bias */
    MPLAN_MTP,            /* the MTP module, whole (mplan_inputs.spec_tokens > 0) */
    MPLAN_KIND_COUNT
} mplan_kind;
const char *mplan_kind_name(mplan_kind k);

/* This rank's weights as the loader creates them for plan's slices. */
typedef struct mplan_weights {
    long long bytes[MPLAN_KIND_COUNT];
    long long total;   /* sum of bytes */
    long long tensors; /* checkpoint tensors read (an FP8 scale counts with its weight) */
} mplan_weights;

/* Bytes of plan's slices of c stored as format f with activations of type act (DT_F32 or
 * DT_BF16): the model without its MTP module (bytes[MPLAN_MTP] is 0), what mdl_weights_load
 * creates. DUET_ERR_INVALID when f is FP8 and c is not an FP8 checkpoint. */
duet_status mplan_weights_count(const cfg_model *c, const mdl_plan *plan, mplan_weight_format f,
                                dt_dtype act, mplan_weights *w_p);
/* The MTP module (layer num_hidden_layers) as mdl_weights_load_mtp creates it for plan's slices:
 * its embedding and head copies (the vocabulary split over TP), enorm, hnorm, eh_proj,
 * shared_head.norm and one decoder layer (experts whenever the model has them, placed and split
 * like the main layers'), by kind (bytes[MPLAN_MTP]: eh_proj, which only the module has). The
 * loader keeps none of it FP8: its linear weights are in the activation type (bf16 for format
 * FP8), router and norms float32.
 * DUET_ERR_INVALID as mplan_weights_count, and when c has no MTP layer. */
duet_status mplan_mtp_weights_count(const cfg_model *c, const mdl_plan *plan, mplan_weight_format f,
                                    dt_dtype act, mplan_weights *w_p);

/* ---- the plan of an instance ---- */

typedef struct mplan_inputs {
    const char *model_name; /* for messages ("DeepSeek-V3"); NULL: config's model_type */
    /* layout: an instance of tp * dp ranks, one device each */
    int tp, dp;
    bool ep;           /* --enable-expert-parallel: routed experts placed over all ranks */
    int gpus_per_node; /* for the summary only; 0: all ranks on one node */
    /* the device */
    long long gpu_memory;          /* bytes of one device, as the backend (or nvidia-smi) says */
    double gpu_memory_utilization; /* (0, 1]: the share of gpu_memory this rank may use */
    /* storage */
    mplan_weight_format weights;
    dt_dtype act_dtype; /* DT_BF16 or DT_F32 */
    dt_dtype kv_dtype;  /* DT_BF16, DT_F32 or DT_F8_E4M3 */
    /* with DT_F8_E4M3: the backend keeps one layer decoded in act_dtype beside the cache
     * (be_ops.kv_fp8_decoded_layer; the CUDA backend): counted in each block's bytes */
    bool kv_decoded_layer;
    /* serving limits (the worker's flags of the same names) */
    int max_model_len; /* 0: min(max_position_embeddings, 8192), the worker's default */
    int max_num_seqs, max_num_batched_tokens, block_size;
    bool graphs; /* decode steps may be recorded as CUDA graphs (not --enforce-eager) */
    /* MTP speculative decoding: drafts a step (--speculative-config's num_speculative_tokens,
     * duet-run's --num-speculative-tokens); 0: off. Above 0 the plan counts the MTP module's
     * weights, its KV layer (every block holds num_hidden_layers + 1 layers), the verify step's
     * logits rows (one after the last token and after each draft) and the drafting buffers. */
    int spec_tokens;
    /* --kv-cache-memory: > 0 fixes the KV cache at this many bytes and, as in vLLM, sets the
     * utilization aside: the budget is then the whole device */
    long long kv_cache_memory;
    /* how kv_cache_memory was asked for, for messages: "" is --kv-cache-memory; a worker
     * given --num-gpu-blocks-override N sets "--num-gpu-blocks-override N" (the refusal then
     * names that flag and the bytes its blocks take) */
    char kv_flag[64];
} mplan_inputs;

/* The worker's defaults: one rank, utilization 0.9, bf16 weights/activations/KV, 256
 * sequences, 2048 batched tokens, blocks of 64, graphs on. gpu_memory is left 0: the caller
 * must say what the device has. */
void mplan_inputs_default(mplan_inputs *in);

typedef struct mplan {
    mplan_inputs in; /* as given, max_model_len resolved */
    char name[64];   /* model_name, or config's model_type */
    int ranks, nodes;
    int ep_size;              /* ranks the experts are spread over (1 without EP) */
    mdl_plan shard;           /* the slices of the rank with the most weight bytes */
    mplan_weights w;          /* that rank's weights (the MTP module's in bytes[MPLAN_MTP]) */
    mplan_weights mtp;        /* the MTP module on that rank by kind (spec_tokens > 0) */
    int n_layers, moe_layers; /* layers, and those with routed experts */
    int n_heads, vocab_size;  /* of the whole model */
    int fp8_block[2];         /* the checkpoint's FP8 scale block (128x128 without one) */
    /* activations at the peak of a step of max_num_batched_tokens tokens */
    long long act_model;   /* model.c's buffers (and the device logits gather of TP) */
    long long act_ep;      /* EP dispatch/combine staging (0 without EP) */
    long long act_scratch; /* the backend's scratch: prefill attention, experts, routing */
    long long act_fixed;   /* cuBLAS workspace, step metadata, NCCL buffers, CUDA graphs */
    /* MTP (spec_tokens > 0): the hidden rows every forward keeps for the module (buf.hid,
     * buf.mtp_prev) and the draft sampler over the logits rows; 0 without */
    long long act_mtp;
    long long act_total;
    /* of act_model and act_mtp: what mdl_load allocates (buffers, one logits row, MTP's
     * hidden rows) */
    long long act_at_load;
    /* of act_total: what only the first steps allocate (logits rows, EP staging, scratch,
     * step metadata, NCCL, graphs, the draft sampler), so a reading of the device after
     * loading misses it */
    long long act_late;
    /* KV cache */
    long long kv_bytes_per_token; /* all layers, the MTP module's own with spec_tokens > 0 */
    int kv_layers;                /* num_hidden_layers (+ 1 with spec_tokens > 0) */
    long long kv_block_bytes;
    long long budget; /* gpu_memory * gpu_memory_utilization (gpu_memory with kv_cache_memory) */
    /* budget - weights - activations, negative when they do not fit; with kv_cache_memory
     * that size, or what the device has left for it beside the padding block where less */
    long long kv_budget;
    /* whole blocks in kv_budget, the backend's padding block left out (with kv_cache_memory
     * on top, as the workers ask for kv_cache_memory / kv_block_bytes blocks) */
    long long kv_blocks;
    long long kv_tokens; /* kv_blocks * block_size */
    bool fits;
    /* "KV cache: N blocks = M tokens (X GiB), S sequences of max_model_len L" when it fits;
     * otherwise what does not fit, by how much */
    char verdict[768];
} mplan;

/* The plan of c on in's layout. DUET_OK when the plan was computed, whether it fits or not
 * (plan_p->fits); DUET_ERR_INVALID when the inputs make no sense for c (utilization outside
 * (0, 1], a layout c does not divide over, ...), with one line in err and *plan_p untouched. */
duet_status mplan_compute(const cfg_model *c, const mplan_inputs *in, mplan *plan_p, char *err,
                          size_t err_len);

/* The plan as a table: layout, weights by kind, activations by part, KV cache, verdict. */
void mplan_print(const mplan *p, FILE *f);
/* The plan in one line: "94.1 GiB of weights, 5.2 GiB of activations and 412800 tokens
 * (27.0 GiB) of KV cache per rank, in 126.4 GiB (0.90 of 140.4 GiB)". */
void mplan_summary(const mplan *p, char *buf, size_t len);

/* ---- after loading: the KV cache from what the device has left ---- */

/* Measured on the rank's device: total memory; free memory when the backend was created (its
 * CUDA context and cuBLAS workspace taken, nothing of the model yet) and after the model
 * loaded (be_mem_info); and, where the backend counts it (be_ops.mem_used), what this instance
 * holds itself. Free memory moves with every process on the device, so with the count the
 * plan charges the instance only for its own memory, and a neighbour loading at the same time
 * no longer counts against it; without it (counted false) the readings' difference stands in. */
typedef struct mplan_measured {
    long long total, free_at_start, free_after_load;
    bool counted;
    long long own_at_start, own_after_load; /* the backend's own allocations */
    /* what the device used right after the backend was created beyond its own allocations:
     * the CUDA context, plus whatever other processes held then (taken as at most
     * MPLAN_CONTEXT_MAX: more than that is a neighbour's) */
    long long context;
} mplan_measured;

/* The most of mplan_measured.context taken as this instance's CUDA context (1 GiB: more than a
 * context alone typically takes, so a larger reading holds a neighbour's memory). */
#define MPLAN_CONTEXT_MAX (1LL << 30)

/* Refuses (DUET_ERR_NO_MEMORY, one line in err) a device whose free memory at start, with
 * what the instance held then, is below what the utilization asks for: another process holds
 * the difference. As vLLM does. */
duet_status mplan_check_start(const mplan *p, const mplan_measured *m, char *err, size_t err_len);

/* KV cache bytes for the device as measured: total * utilization, less what the instance uses
 * (counted: its own allocations and its context; otherwise what loading took of the device's
 * free memory), less what the plan expects the first steps to allocate still (backend
 * scratch, EP staging, graphs), less the backend's padding block. When the device has less
 * free than that (a neighbour holds more than the rest of the device), the cache takes what is
 * free and err holds a warning line naming both numbers (DUET_OK; err is "" otherwise).
 * Refuses (DUET_ERR_NO_MEMORY, one line in err) what mplan_check_start refuses, a
 * --kv-cache-memory that does not fit, and a cache that would not hold one sequence of
 * max_model_len. */
duet_status mplan_kv_after_load(const mplan *p, const mplan_measured *m, long long *kv_bytes_p,
                                char *err, size_t err_len);

/* A fixed KV cache (--kv-cache-memory) of asked_b bytes per rank where there is no plan with
 * device readings to hold it to (mplan_kv_after_load does that): n_ranks ranks that each
 * allocate one share memory with available bytes left (the CPU backend: the instance's ranks
 * on one host and the host's available memory; a device: 1 and its free memory). where names
 * the memory ("the host", "the device") and available_what how it was read ("available
 * (MemAvailable)", "free"). Refuses (DUET_ERR_NO_MEMORY, one line in err naming the flag, the
 * size asked and what is there) when n_ranks * asked exceeds available. flag: how the size
 * was asked for, as mplan_inputs.kv_flag (NULL or "": --kv-cache-memory). Arithmetic only. */
duet_status mplan_check_kv_fixed(long long asked_b, int n_ranks, long long available,
                                 const char *where, const char *available_what, const char *flag,
                                 char *err, size_t err_len);

#endif
