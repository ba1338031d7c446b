/* The DeepSeek model (V2/V3 family: MLA attention + MoE) over the backend interface: loading
 * a checkpoint into a backend (sharded for this rank's place in the TP/EP grid) and the forward
 * pass of one engine step. The top of runtime/model: it puts together the shard plan
 * (shard.h), the weights (weights.h) and the TP/EP collectives (collectives.h), none of which
 * knows of it. Not thread-safe: one engine thread owns a model. */
#ifndef DUET_MODEL_H
#define DUET_MODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "model/backend.h"
#include "model/config.h"
#include "model/shard.h"   /* mdl_shard */
#include "model/weights.h" /* mdl_weights_source */
#include "base/status.h"

typedef struct mdl_load_opts {
    mdl_weights_source source;
    uint64_t dummy_seed;
    int max_tokens; /* most tokens in one forward (activation buffers are sized for it) */
    bool eager;     /* never record steps as graphs (--enforce-eager) */
    /* MTP speculative decoding: drafts per step, 0..MDL_MAX_DRAFT; > 0 loads the checkpoint's
     * MTP module (refused with one clear line when it has none) and gives the KV cache one
     * more layer, the module's own */
    int spec_tokens;
} mdl_load_opts;

#define MDL_MAX_DRAFT 3

typedef struct mdl_model mdl_model;

/* Loads dir (config.json + safetensors) onto be. be is borrowed and must outlive the model. */
duet_status mdl_load(const char *dir, be_backend *be, const mdl_shard *shard,
                     const mdl_load_opts *opts, mdl_model **model_p);
void mdl_destroy(mdl_model *m);

const cfg_model *mdl_config(const mdl_model *m);
be_backend *mdl_backend(const mdl_model *m);
/* The KV cache's element type for mdl_kv_create and mdl_kv_bytes_per_token (--kv-cache-dtype):
 * DT_COUNT (auto, the default) is the backend's activation type; DT_F8_E4M3 stores e4m3 with a
 * per-tensor scale of 1.0. Anything else is DUET_ERR_INVALID. The backend's kv_create answers
 * whether it can hold the type. Call before the first mdl_kv_create. */
duet_status mdl_set_kv_dtype(mdl_model *m, dt_dtype t);
dt_dtype mdl_kv_dtype(const mdl_model *m);
/* Bytes of KV cache per token over all layers, in the KV dtype (with fp8, plus one layer in the
 * activation type where the backend keeps one decoded: be_ops.kv_fp8_decoded_layer). */
size_t mdl_kv_bytes_per_token(const mdl_model *m);
/* Allocates a KV cache of n_blocks blocks of block_size tokens for this model. */
duet_status mdl_kv_create(mdl_model *m, int n_blocks, int block_size, be_kv **kv_p);
void mdl_kv_destroy(mdl_model *m, be_kv *kv);

/* One sequence's share of a step: n_tokens new tokens at positions pos0.., appended to the
 * KV cache through its block table (covering at least pos0 + n_tokens positions). The last
 * n_logits of its tokens get a row of logits (0: none, 1: next-token, n_tokens: all). */
typedef struct mdl_seq {
    const int32_t *tokens;
    int n_tokens;
    int pos0;
    const int32_t *block_table;
    int n_blocks;
    int n_logits;
} mdl_seq;

/* Runs one step over n_seqs sequences (n_seqs may be 0: an empty step that still joins the
 * collectives of expert parallelism). logits receives sum(n_logits) rows of vocab_size
 * float32, in sequence order; with logits NULL they stay in backend memory (gathered over TP)
 * for mdl_sample and mdl_logits_rows, and nothing is downloaded. Tokens outside
 * [0, vocab_size) are refused with DUET_ERR_INVALID before anything runs. */
duet_status mdl_forward(mdl_model *m, be_kv *kv, const mdl_seq *seqs, int n_seqs, float *logits);

/* Whether steps are recorded and replayed (CUDA graphs), and how many recordings and
 * replays happened so far. Recorded (per batch bucket, tokens per sequence and block-table
 * width) are the steps where every sequence has the same n_tokens == n_logits == w, 1 <= w <=
 * MDL_GRAPH_MAX_W (one-token decode steps and MTP verify steps), and the MTP module's draft
 * passes where every sequence runs the same number of positions (see mdl_graph_shape_of). */
bool mdl_graphs_on(const mdl_model *m);
/* Layer-wise progress (the KV transfer reads a prompt's layers as they are written), where the
 * backend can tell (be_ops.layer_mark): mdl_layer_marks(m, true) before a forward (engine
 * thread) makes that forward note each layer as its KV is written, unless it is replayed as a
 * graph; mdl_layers_done (any thread) is how many layers, from the first, are written since
 * then (0 without marks). The MTP module's layer is never counted. */
void mdl_layer_marks(mdl_model *m, bool on);
int mdl_layers_done(const mdl_model *m);
void mdl_graph_counts(const mdl_model *m, uint64_t *recorded, uint64_t *launched);

/* The recordings by use: one-token decode steps, verify steps (w > 1), MTP draft passes. */
typedef enum mdl_graph_use {
    MDL_GRAPH_USE_DECODE,
    MDL_GRAPH_USE_VERIFY,
    MDL_GRAPH_USE_DRAFT,
    MDL_GRAPH_USES
} mdl_graph_use;
void mdl_graph_counts_of(const mdl_model *m, mdl_graph_use use, uint64_t *recorded,
                         uint64_t *launched);

/* What a recording is keyed by; a pure function of the batch, for the model and its tests. A
 * step (MDL_GRAPH_STEP) qualifies when every sequence has n_tokens == n_logits == w; a draft
 * pass (MDL_GRAPH_DRAFT: the MTP module's batch, one logits row a sequence) when every
 * sequence has n_tokens == w and n_logits == 1. Either needs n >= 1, 1 <= w <=
 * MDL_GRAPH_MAX_W (within what the CUDA MLA's absorbed form takes per sequence, 8), w <=
 * block_size (the padding sequences' w positions lie in the cache's one padding block) and
 * rows * w <= cap_rows (the activation rows and logits rows reserved at load: padding rows get
 * logits too). rows is the smallest batch bucket >= n (1, 2, 4, 8, 16, 24, 32, 48, 64, 96,
 * 128, 160, 192, 224, 256), wlog the log2 of the block table's width rounded up to a power
 * of two. False (nothing set) when the batch is not recorded: it then runs op by op. */
#define MDL_GRAPH_MAX_W (MDL_MAX_DRAFT + 1)
typedef enum mdl_graph_kind { MDL_GRAPH_STEP, MDL_GRAPH_DRAFT } mdl_graph_kind;
typedef struct mdl_graph_shape {
    int bucket;   /* index of rows among the bucket sizes */
    int rows;     /* sequences after padding */
    int w;        /* tokens per sequence */
    int wlog;     /* block table width 1 << wlog */
    uint64_t key; /* the backend's recording key: kind, w, rows, wlog */
} mdl_graph_shape;
bool mdl_graph_shape_of(mdl_graph_kind kind, const mdl_seq *seqs, int n, int cap_rows,
                        int block_size, mdl_graph_shape *shape_p);
/* After mdl_forward(..., NULL), on the rank that samples (the TP leader): queues the sampling
 * of s->rows[0..n) (each naming its row of the step's logits, in the order above) with the
 * backend's sampling op (model/backend.h: be_sample_queue); after be_sample_wait s->out and
 * s->top hold the results. */
duet_status mdl_sample_queue(mdl_model *m, be_sampler *s, int n);
/* After mdl_forward(..., NULL): rows[i] of the step's logits into out[i][vocab_size] (host
 * float32), for what still needs whole rows on the host (prompt logprobs, test hooks). */
duet_status mdl_logits_rows(mdl_model *m, const int32_t *rows, int n, float *out);

/* ---- MTP speculative decoding (mdl_load_opts.spec_tokens > 0) ---- */

/* The drafts per step the model was loaded for (0: no MTP module). */
int mdl_spec_tokens(const mdl_model *m);

/* One sequence's MTP work after the last mdl_forward: the module runs at positions
 * pos0..pos0+n_tokens-1, whose main-model hidden states are rows hid0.. of that forward's
 * tokens (in its order), with tokens[j] = the token at position pos0 + j + 1 (accepted or
 * sampled). This writes the module's own KV there (keeping its cache in step with the main
 * one). With n_draft > 0 the last position's prediction is draft 0, and each further draft d
 * runs the module once more at the next position on draft d - 1 and its own output. The
 * block table must cover pos0 + n_tokens - 1 + n_draft - 1. */
typedef struct mdl_draft_seq {
    const int32_t *tokens;
    int n_tokens;
    int pos0;
    int hid0;
    const int32_t *block_table;
    int n_blocks;
    int n_draft;
} mdl_draft_seq;

/* Runs the MTP module for n_seqs sequences (after mdl_forward, whose logits it overwrites:
 * sample them first); drafts[i * MDL_MAX_DRAFT + d] gets draft d of sequence i (greedy: the
 * module's argmax). DUET_ERR_INVALID without an MTP module or for rows outside the last
 * forward. */
duet_status mdl_draft(mdl_model *m, be_kv *kv, const mdl_draft_seq *seqs, int n_seqs,
                      int32_t *drafts);
/* How many passes of the MTP module mdl_draft runs for these sequences: 0 without tokens,
 * else the most drafts any of them asks for (at least 1: the pass that writes the KV). */
int mdl_draft_passes(const mdl_draft_seq *seqs, int n_seqs);
/* mdl_draft under expert parallelism with DP groups in lockstep: n_passes passes (at least
 * this rank's own mdl_draft_passes; the most any rank of the EP group runs), the passes past
 * this rank's own joining the MTP layer's all-to-alls with no tokens, as empty steps do. Every
 * rank of the EP group calls it with the same n_passes; n_seqs 0 (kv and drafts may be NULL)
 * only joins. */
duet_status mdl_draft_joined(mdl_model *m, be_kv *kv, const mdl_draft_seq *seqs, int n_seqs,
                             int32_t *drafts, int n_passes);

#endif
