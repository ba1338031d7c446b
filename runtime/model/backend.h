/* The backend interface: where the model's tensors live and how its ops run. The model
 * (model.c) calls only these ops, so the CPU reference and the CUDA backend compute the same
 * graph. A backend instance drives one device for one rank; all calls come from the thread
 * that runs the engine step. Buffers ("be_buf") are device memory holding activations of the
 * backend's activation type (float32 on the CPU, bf16 on CUDA); host data crosses only through
 * be_upload / be_download. Shapes are written as [rows, cols], row-major.
 *
 * Optional slots may be NULL; the wrappers in backend.c apply the fallback once. */
#ifndef DUET_BACKEND_H
#define DUET_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model/config.h"
#include "model/dummy_rule.h"
#include "base/dtype.h"
#include "base/status.h"

typedef struct be_backend be_backend;
typedef struct comm_group comm_group;

#define BE_IPC_HANDLE_MAX 128

/* A linear layer's weight W [n_out, n_in]: y = x @ W^T. Created from host float32. */
typedef struct be_weight be_weight;

/* Paged KV cache of MLA latents: n_blocks blocks, each [n_layers][block_size][kv_dim] with
 * kv_dim = kv_lora_rank + qk_rope_head_dim. Block-major so one block of every layer is one
 * contiguous byte range: KV transfer moves a run of blocks with one read. */
typedef struct be_kv {
    int n_blocks, n_layers, block_size, kv_dim;
    /* one more block past n_blocks that nothing leases or transfers: padding rows of a step
     * (a batch rounded up to a captured size) write and read it */
    int pad_block;
    dt_dtype dtype; /* the activation type, or DT_F8_E4M3 (--kv-cache-dtype fp8) */
    /* DT_F8_E4M3 only: values are stored as e4m3(value / scale) and read back as code * scale
     * (vLLM's per-tensor k_scale; DeepSeek checkpoints carry none, so 1.0) */
    float scale;
    void *data;         /* device address of block 0 */
    size_t block_bytes; /* bytes of one block, all layers */
    bool on_device;     /* false: host memory, readable by the CPU directly */
} be_kv;

/* The current step's batch, flattened: tokens of sequence s are rows
 * [seq_start[s], seq_start[s+1]) and sit at positions pos0[s] .. pos0[s] + n - 1.
 * Each query token attends to positions 0 .. its own position of its sequence. */
typedef struct be_batch {
    int n_tokens, n_seqs;
    const int32_t *token_ids; /* [n_tokens] token ids (embed and gather_rows with NULL take */
    const int32_t *out_rows;  /* [n_out] the rows whose logits are wanted   them from here) */
    int n_out;
    const int32_t *token_pos;   /* [n_tokens] */
    const int32_t *token_slot;  /* [n_tokens] KV slot to write: block * block_size + offset */
    const int32_t *seq_start;   /* [n_seqs + 1] */
    const int32_t *seq_ctx;     /* [n_seqs] context length after this step (= last pos + 1) */
    const int32_t *block_table; /* [n_seqs][max_blocks] */
    int max_blocks;
} be_batch;

/* MoE routing parameters, from the config. */
typedef struct be_route_params {
    int n_experts, top_k, n_group, topk_group;
    cfg_scoring scoring;
    cfg_topk_method method;
    bool norm_topk_prob;
    /* DeepSeek-V3 normalizes (when norm_topk_prob) and then scales by routed_scaling_factor;
     * V2, as transformers implements it, only scales (its checkpoints set norm_topk_prob
     * false). */
    bool scale_after_norm;
    float routed_scaling_factor;
} be_route_params;

/* One expert's (or a dense MLP's) weights, intermediate dim possibly split over TP ranks:
 * gate_up [2*I, D] (gate rows then up rows), down [D, I]. */
typedef struct be_ffn {
    be_weight *gate_up;
    be_weight *down;
    int n_inter; /* I: this rank's intermediate width */
} be_ffn;

/* ---- sampling ----
 * The rule of one row (be_sample_row), stated in plain C by be_sample_host_row and run on the
 * device by backends with the sampling ops; model/sample_rule.h holds the arithmetic both
 * share, so a seeded row gives the same token on every backend given the same logits:
 *  1. penalties (slot >= 0: the output-token counts and prompt tokens of the row's penalty
 *     slot): repetition, then frequency * count + presence (sample_rule.h, smp_penalize);
 *  2. bans: the ban list's tokens get -inf (min_tokens holding back EOS and stop ids);
 *  3. temperature below 1e-5: greedy, the argmax (lowest id among ties); else probabilities
 *     p = exp((z - max) / temperature), so the most likely token has p = 1;
 *  4. top-k keeps p >= the k-th largest p (ties kept); top-p keeps a group of equal p while
 *     the mass of the tokens strictly more likely, among those top-k kept, is below
 *     top_p * their total; min-p keeps p >= min_p;
 *  5. the draw: u = philox_uniform(seed, offset) picks the kept token where the cumulative
 *     mass, in token id order, first exceeds u * total. Masses are p * 2^40 as integers.
 *  6. the chosen token's count in the penalty slot goes up by one.
 * With n_logprobs >= 0 the token's logprob and the n_logprobs most likely tokens (ties: lower
 * id first) come from the log-softmax of the raw row, before penalties and temperature. */
#define BE_SAMPLE_MAX_BAN 40 /* EOS and up to 32 stop token ids, with room */
#define BE_SAMPLE_MAX_TOP 20

/* Rows of tokens for the device MoE ops (be_ops.moe_experts_dev), everything in device memory:
 * row r's activations are x + r * x_stride (D elements of the activation type), its K expert
 * ids and K routing weights are ids + r * meta_stride and weights + r * meta_stride (int32 and
 * float32; meta_stride counts 4-byte words). An id outside the experts a call covers (-1, or
 * another rank's expert) selects nothing there. */
typedef struct be_moe_rows {
    int n, D, K;
    const void *x;
    int x_stride;
    const int32_t *ids;
    const float *weights;
    int meta_stride;
    /* the (row, id) pairs a call typically finds here, for picking launch shapes (a host
     * value fixed per batch size, never a count of this step); 0: n * K */
    int pairs_hint;
} be_moe_rows;

/* The fixed-capacity layout of EP dispatch (be_ops.moe_ep_pack): this rank sends its tokens
 * t = tp_rank, tp_rank + tp, ... (local index i = t / tp) to the ranks owning their experts
 * (expert e on rank e / experts_per_rank), each rank its own block of cap rows: send is
 * [ep][cap] rows of be_ep_row_bytes bytes, a token's row holding its D activations, then (at
 * byte be_ep_meta_offset) its K ids and K weights, with ids -1 in the rows a block leaves
 * unused. cap is the same on every rank of the EP group and at least every rank's count of
 * tokens, so nothing overflows and no count has to reach the host. */
typedef struct be_ep_layout {
    int ep, cap;
    int tp, tp_rank;
    int experts_per_rank;
    int D, K;
} be_ep_layout;

/* Byte offset of the ids in a packed row, and the row's bytes: both multiples of 16 so rows
 * stay aligned for vector loads. */
static inline size_t be_ep_meta_offset(int D, size_t act_size) {
    return ((size_t)D * act_size + 15) / 16 * 16;
}
static inline size_t be_ep_row_bytes(int D, int K, size_t act_size) {
    return be_ep_meta_offset(D, act_size) + ((size_t)K * 8 + 15) / 16 * 16;
}

typedef struct be_sample_row {
    uint64_t seed;            /* Philox key: the request's seed */
    uint64_t offset;          /* Philox counter: the request's output token index */
    int32_t logits_row;       /* the row of the step's logits to sample */
    float temperature;        /* below 1e-5: greedy */
    int32_t top_k;            /* <= 0 or >= V: off */
    float top_p;              /* >= 1: off */
    float min_p;              /* <= 0: off */
    float repetition_penalty; /* 1 (or <= 0): off */
    float presence_penalty;   /* 0: off */
    float frequency_penalty;  /* 0: off */
    int32_t slot;       /* penalty state (be_sampler_slot_init), -1: none; at most one row of a
                           call may name a slot */
    int32_t n_logprobs; /* -1: none; else the token's logprob and this many top ones (<= 20) */
    int32_t n_ban;
    int32_t ban[BE_SAMPLE_MAX_BAN];
} be_sample_row;

/* Greedy, no filters, no penalties, no logprobs, seed 0: the fields to change from. */
void be_sample_row_init(be_sample_row *r);

/* One row's result. */
typedef struct be_sample_out {
    int32_t token;
    float logprob; /* of token (n_logprobs >= 0) */
} be_sample_out;

/* The n_logprobs most likely tokens of a row, most likely first. */
typedef struct be_sample_top {
    int32_t token[BE_SAMPLE_MAX_TOP];
    float logprob[BE_SAMPLE_MAX_TOP];
} be_sample_top;

/* A backend's sampling state for up to max_rows rows a call over a vocabulary of V: the
 * penalty slots (n_slots of them, each a request's output counts and prompt tokens) and the
 * host side of one call. A backend embeds it first in its own object. Engine thread only. */
typedef struct be_sampler {
    int max_rows, V, n_slots;
    /* host [max_rows], page-locked where the backend can: the caller fills rows[0..n) before
     * be_sample_queue and leaves them alone until be_sample_wait (one upload per call) */
    be_sample_row *rows;
    /* host [max_rows]: results, valid after be_sample_wait (one download per call; top only
     * when a row asked for more than the token's own logprob) */
    be_sample_out *out;
    be_sample_top *top;
} be_sampler;

typedef struct be_ops {
    const char *name;
    dt_dtype act_dtype;
    /* buffers, weights and the KV cache live in device memory the host cannot address: host
     * collectives (MPI) cannot move them, the device communicator attached by comm_attach must */
    bool on_device;
    /* fp8 KV caches: the backend also keeps one layer of the pool decoded in act_dtype, (n_blocks
     * + 1) x block_size x kv_dim elements beside the cache (the CUDA backend's attention reads
     * that); mdl_kv_bytes_per_token and the memory plan count it as part of each block */
    bool kv_fp8_decoded_layer;

    void (*destroy)(be_backend *be);

    /* memory */
    void *(*buf_alloc)(be_backend *be, size_t n_elems); /* activation elements */
    void (*buf_free)(be_backend *be, void *buf);
    /* host float32 <-> device activations, n elements at element offset off (a be_kv cache
     * holds the same type: download reads it too) */
    duet_status (*upload)(be_backend *be, void *dst, size_t off, const float *src, size_t n);
    duet_status (*download)(be_backend *be, float *dst, const void *src, size_t off, size_t n);
    /* Waits for queued work; returns (and clears) the first error any op met since the last
     * sync: ops return nothing, so a failed scratch allocation or launch is reported here. */
    duet_status (*sync)(be_backend *be);

    duet_status (*weight_create)(be_backend *be, const float *w, int n_out, int n_in, bool keep_f32,
                                 be_weight **w_p);
    void (*weight_destroy)(be_backend *be, be_weight *w);
    /* optional: a linear weight kept as FP8 e4m3 (DeepSeek-V3's format) instead of created
     * from float32: q [n_out, n_in] bytes (n_in a multiple of 16), scales float32 with
     * W[r][c] = e4m3(q[r][c]) * scale of (r, c)'s 128x128 block. Rows [0, split) and
     * [split, n_out) are two parts with their own block grids (gate and up fused; split =
     * n_out for one part): scales [ceil(split / 128) + ceil((n_out - split) / 128)]
     * [ceil(n_in / 128)], the first part's block rows first. DUET_ERR_UNSUPPORTED: this
     * backend (its activation type) does not compute with FP8 weights; the caller dequantizes
     * and uses weight_create. Every op taking a weight takes it, except embed and
     * mla_attention's kv_b. */
    duet_status (*weight_create_fp8)(be_backend *be, const uint8_t *q, const float *scales,
                                     int n_out, int n_in, int split, be_weight **w_p);
    duet_status (*vec_create)(be_backend *be, const float *v, int n, void **dev_p); /* f32 */
    /* optional: dummy weights (--load-format dummy) made where they live, from the rule of
     * model/dummy_rule.h instead of host data: n_parts (1, or 2 for gate and up fused) parts
     * of n_rows rows each, part p rows [parts[p].r0, + n_rows) and columns [parts[p].c0, +
     * n_in) of its tensor (rows at or past its full_out zero), stacked [n_parts * n_rows,
     * n_in]. fp8 false: bit for bit what weight_create (with keep_f32) makes of the rule's
     * float32 values; fp8 true: what weight_create_fp8 makes of the codes dummy_e4m3(value *
     * dummy_fp8_inv()) with every block's scale dummy_fp8_scale() and split n_rows, and
     * DUET_ERR_UNSUPPORTED where weight_create_fp8 would answer that. NULL: the loader fills
     * host memory and calls those. */
    duet_status (*weight_create_dummy)(be_backend *be, const dummy_slice *parts, int n_parts,
                                       int n_rows, int n_in, bool keep_f32, bool fp8,
                                       be_weight **w_p);
    /* optional, with weight_create_dummy: vec_create of rows [0, n) of a dummy vector (the
     * slice's full_in 0, r0 and c0 0), the same float32 bits */
    duet_status (*vec_create_dummy)(be_backend *be, const dummy_slice *s, int n, void **dev_p);

    /* dtype: the backend's act_dtype, or DT_F8_E4M3 where the backend stores e4m3 latents
     * (DUET_ERR_UNSUPPORTED, with a line saying so, where it does not) */
    duet_status (*kv_create)(be_backend *be, int n_blocks, int n_layers, int block_size, int kv_dim,
                             dt_dtype dtype, be_kv **kv_p);
    void (*kv_destroy)(be_backend *be, be_kv *kv);
    /* Optional; ANY thread (the KV transfer thread calls it): copies whole blocks between the
     * cache and host memory, block blocks[i] to or from host + i * block_bytes, and returns when
     * done. Only for blocks no step is using (leased, or being filled by a transfer). NULL for
     * host caches: the caller copies with memcpy. */
    duet_status (*kv_copy_host)(be_backend *be, be_kv *kv, const int32_t *blocks, int n, void *host,
                                bool to_host);
    /* Optional; any thread (the KV transfer thread): starts the copy kv_copy_host does on a
     * copy stream of its direction and returns at once, so device->host copies, host->device
     * copies and network reads of other chunks overlap; *ticket_p is polled with kv_copy_poll.
     * host should be page-locked (host_pin), else the copy may run synchronously. NULL: the
     * wrapper be_kv_copy_start copies at once and hands back a NULL ticket (done). */
    duet_status (*kv_copy_start)(be_backend *be, be_kv *kv, const int32_t *blocks, int n,
                                 void *host, bool to_host, void **ticket_p);
    /* With kv_copy_start: DUET_ERR_BUSY while the copy runs (wait: blocks until it ends);
     * otherwise DUET_OK or the copy's error, and the ticket is freed. */
    duet_status (*kv_copy_poll)(be_backend *be, void *ticket, bool wait);
    /* Optional (CUDA); any thread: another process on this host reads the cache directly.
     * ipc_export writes an IPC handle of the cache's allocation (kv->data, at most
     * BE_IPC_HANDLE_MAX bytes) into handle; ipc_open maps a peer's handle here (*ptr_p: its
     * kv->data), ipc_close unmaps it. kv_copy_device_start copies blocks src_blocks[i] of such a
     * mapped peer cache (block_bytes each, from src) into blocks[i] of kv on the host->device
     * copy stream, consecutive runs as one copy; the ticket is kv_copy_poll's. */
    duet_status (*ipc_export)(be_backend *be, be_kv *kv, void *handle, size_t *len_p);
    duet_status (*ipc_open)(be_backend *be, const void *handle, size_t len, void **ptr_p);
    void (*ipc_close)(be_backend *be, void *ptr);
    duet_status (*kv_copy_device_start)(be_backend *be, be_kv *kv, const int32_t *blocks, int n,
                                        const void *src, const uint32_t *src_blocks,
                                        void **ticket_p);
    /* Optional; any thread: page-locks host memory for fast copies with kv_copy_host (NULL
     * where that means nothing). */
    duet_status (*host_pin)(be_backend *be, void *ptr, size_t bytes);
    void (*host_unpin)(be_backend *be, void *ptr);
    /* Optional, all three or none: how far the current forward has come, for the KV transfer's
     * layer-wise progress (a decode reads a prompt's layers as the prefill writes them).
     * layer_marks_reset (engine thread, before a forward) starts over; layer_mark (engine
     * thread) is called after the ops of layer `layer` are queued and notes "layer `layer`'s KV
     * is written" once they have run; layers_done (any thread) says how many layers, from the
     * first, have been noted so since the reset. */
    void (*layer_marks_reset)(be_backend *be);
    void (*layer_mark)(be_backend *be, int layer);
    int (*layers_done)(be_backend *be);

    /* RoPE frequencies (half = rope_dim / 2 of them) and the cos/sin magnitude; once */
    duet_status (*rope_setup)(be_backend *be, const float *inv_freq, int half, float attn_factor);
    /* the step's batch metadata; pointers in b are host memory, copied */
    duet_status (*set_batch)(be_backend *be, const be_batch *b);

    /* ops; x, y, out are device buffers of activations */
    /* out[T, D] = table rows ids - row0 for ids in [row0, row0 + n_rows), zero otherwise;
     * ids is host memory, or NULL for the batch's token_ids (already on the device) */
    void (*embed)(be_backend *be, void *out, const int32_t *ids, int T, const be_weight *table,
                  int row0);
    /* y[T, n_out] = x[T, n_in] @ W^T; x rows are x_stride elements apart */
    void (*linear)(be_backend *be, void *y, const void *x, int x_stride, int T, const be_weight *w);
    /* out[T, D] (out_stride) = rmsnorm(x[T, D] (x_stride)) * w; out may be x */
    void (*rmsnorm)(be_backend *be, void *out, int out_stride, const void *x, int x_stride,
                    const void *w, int T, int D, float eps);
    /* y += x, n elements */
    void (*add)(be_backend *be, void *y, const void *x, size_t n);
    /* optional: h[T, D] += x[T, D], then out[T, D] = rmsnorm(h) * w (all rows D apart; out
     * apart from h and x): the residual add and the next norm in one pass. h is stored in the
     * activation type before the norm reads it, so the results equal add then rmsnorm. NULL:
     * be_add_rmsnorm runs those two. */
    void (*add_rmsnorm)(be_backend *be, void *out, void *h, const void *x, const void *w, int T,
                        int D, float eps);
    /* out[T, I] = silu(gu[T, :I]) * gu[T, I:] */
    void (*silu_mul)(be_backend *be, void *out, const void *gu, int T, int inter);
    /* In place on each of n_heads slices of width rope_dim at column col0 + h * head_stride of
     * rows x[t] (row_stride): rotate interleaved pairs by the batch's token positions. */
    void (*rope)(be_backend *be, void *x, int T, int row_stride, int n_heads, int head_stride,
                 int col0, int rope_dim);
    /* writes kva[T, kv_dim] (row stride kv_stride) of layer into the batch's token slots */
    void (*kv_write)(be_backend *be, be_kv *kv, int layer, const void *kva, int kv_stride);
    /* optional: rope (one head) on columns [col0, col0 + rope_dim) of kva[T] (rows kv_stride
     * apart, T the batch's tokens) in place, then kv_write of those rows into layer: the two in
     * one pass, the same results. NULL: be_rope_kv_write runs rope then kv_write. */
    void (*rope_kv_write)(be_backend *be, be_kv *kv, int layer, void *kva, int T, int kv_stride,
                          int col0, int rope_dim);
    /* MLA attention for the batch: q[T, H, nope + rope] (roped), cache of layer, kv_b
     * weight [H * (nope + v), L] of the same H heads; out[T, H * v]. The backend chooses the
     * absorbed form (attention over latents) or the expanded one per sequence. */
    void (*mla_attention)(be_backend *be, void *out, const void *q, be_kv *kv, int layer,
                          const be_weight *kv_b, int H, int nope, int rope, int v, float scale);
    /* routing: logits = x[T, D] @ gate^T in float32, then scores, groups and top-k as the
     * config says; bias (float32 device vector, or NULL) only steers the choice. Results go to
     * host arrays ids[T, K], weights[T, K]. */
    duet_status (*moe_route)(be_backend *be, const void *x, int T, const be_weight *gate,
                             const void *bias, const be_route_params *p, int32_t *ids,
                             float *weights);
    /* out[T, D] += sum over k with ids[t, k] in [e0, e0 + n_local) of weights[t, k] *
     * ffn_{ids[t,k]}(x[t]); ids/weights are host arrays [T, K]; experts[e - e0] */
    void (*moe_experts)(be_backend *be, void *out, const void *x, int T, int D, const int32_t *ids,
                        const float *weights, int K, const be_ffn *experts, int e0, int n_local);
    /* dst[i] = src[idx[i]] rows of D elements (idx host, or NULL for the batch's out_rows with
     * n = its n_out) */
    void (*gather_rows)(be_backend *be, void *dst, const void *src, const int32_t *idx, int n,
                        int D);
    /* dst[idx[i]] += src[i] (idx host, distinct) */
    void (*scatter_add_rows)(be_backend *be, void *dst, const void *src, const int32_t *idx, int n,
                             int D);
    void (*zero)(be_backend *be, void *buf, size_t n);

    /* optional: the device's total memory and what is free now, in bytes (CUDA:
     * cudaMemGetInfo), for sizing the KV cache from what loading left (model/memplan.h). NULL
     * where memory is the host's: be_mem_info answers DUET_ERR_UNSUPPORTED. */
    duet_status (*mem_info)(be_backend *be, size_t *total_p, size_t *free_p);
    /* optional, with mem_info: the device memory this process's backend holds now (every
     * allocation it made and has not freed: weights, buffers, scratch, KV caches), and what the
     * device used right after the backend was created beyond that (its CUDA context, plus any
     * other process's memory at that moment: one reading cannot tell them apart). Memory that
     * libraries allocate themselves (NCCL, graphs, lazily loaded kernels) is in neither. Lets
     * the memory plan count this instance's own use while a neighbour on the same device
     * loads at the same time. */
    duet_status (*mem_used)(be_backend *be, size_t *own_p, size_t *context_p);
    /* optional, all four or none: the sampling rule on the device (NULL: the host rule
     * through be_ops.download, see be_sample_queue). sample queues one call: rows
     * s->rows[0..n) of logits (activations, rows stride elements apart, V valid columns, at
     * most n_logits rows) with one upload of the rows and one download of the results, no
     * host synchronisation; its launch configuration depends on n and V only, so a step
     * replayed as a graph per batch size can hold it. */
    duet_status (*sampler_create)(be_backend *be, int max_rows, int V, int n_slots,
                                  be_sampler **s_p);
    void (*sampler_destroy)(be_backend *be, be_sampler *s);
    duet_status (*sampler_slot_init)(be_backend *be, be_sampler *s, int slot, const int32_t *prompt,
                                     int n_prompt, const int32_t *output, int n_output);
    duet_status (*sample)(be_backend *be, be_sampler *s, const void *logits, int stride,
                          int n_logits, int n);
    /* optional: attaches a device communicator (NCCL) for this backend's memory to group g;
     * collective over g's ranks. NULL: the backend's memory is host memory (MPI moves it). */
    duet_status (*comm_attach)(be_backend *be, comm_group *g);

    /* optional, all four or none: record the ops called between graph_begin and graph_end
     * under key, instead of running them, and replay them later with graph_launch (CUDA
     * graphs). Recorded ops must take every per-step input from device memory at fixed
     * addresses (the batch of set_batch, buffers allocated before), so a replay after the next
     * set_batch computes the next step. A recording is dropped when the backend had to move
     * memory it refers to (scratch grown): graph_ready then says false and the caller records
     * again. graph_end's error drops the recording, and the caller runs the step eagerly. */
    duet_status (*graph_begin)(be_backend *be);
    duet_status (*graph_end)(be_backend *be, uint64_t key);
    bool (*graph_ready)(be_backend *be, uint64_t key);
    duet_status (*graph_launch)(be_backend *be, uint64_t key);
    /* ---- optional: MoE on the device. All of these or none: with them the forward keeps
     * routing results in device memory and never waits for them (no host copy, no per-layer
     * synchronization), so a step can be captured and replayed; without them it uses
     * moe_route / moe_experts and host routing. ---- */
    /* bytes of device memory for int32 / float32 tables (not activations); free takes NULL */
    void *(*mem_alloc)(be_backend *be, size_t bytes);
    void (*mem_free)(be_backend *be, void *p);
    /* host <-> device bytes; download waits for queued work */
    duet_status (*mem_upload)(be_backend *be, void *dst, const void *src, size_t bytes);
    duet_status (*mem_download)(be_backend *be, void *dst, const void *src, size_t bytes);
    /* moe_route with its results in device memory: ids [T, K] int32, weights [T, K] float32 */
    void (*moe_route_dev)(be_backend *be, const void *x, int T, const be_weight *gate,
                          const void *bias, const be_route_params *p, int32_t *ids, float *weights);
    /* out[n, D] = for each row, the sum in ascending expert order over its ids in
     * [e0, e0 + n_local) of weight * ffn_id(x row), plus shared(x row) when shared is not NULL
     * (added last); out is overwritten, rows with nothing here get zeros (or shared alone).
     * experts[e - e0], one intermediate width for all. */
    void (*moe_experts_dev)(be_backend *be, void *out, const be_moe_rows *rows,
                            const be_ffn *experts, int e0, int n_local, const be_ffn *shared);
    /* EP dispatch, first half: send [ep][cap] packed rows (be_ep_layout) from x [T, D] and its
     * routing ids / weights [T, K] (device); slot [cap][ep] (device int32) = the row of block
     * r that local token i went to, or -1. Tokens of a block keep their order. */
    void (*moe_ep_pack)(be_backend *be, void *send, const void *x, int T, const int32_t *ids,
                        const float *weights, const be_ep_layout *l, int32_t *slot);
    /* EP combine, last half: out[T, D] = for this rank's tokens the sum over r = 0..ep-1 of
     * back[r][slot[i][r]] (back [ep][cap][D], the experts' results returned), zero for the
     * tokens other TP ranks send */
    void (*moe_ep_unpack)(be_backend *be, void *out, const void *back, int T, const be_ep_layout *l,
                          const int32_t *slot);
} be_ops;

struct be_backend {
    const be_ops *ops;
};

/* ---- FP8 prefill GEMMs: opt-in until a device run confirms them (docs/kernels/fp8.md) ----
 * With DUET_FP8_PREFILL_ROWS=N (N > 0), the linear op over an FP8 weight (weight_create_fp8)
 * with at least N rows of x quantizes x per row and 128 columns to e4m3 (scale = amax / 448,
 * x / scale rounded to nearest) and multiplies it with the FP8 weight unrounded (e4m3 x block
 * scale), where be_fp8_prefill_eligible says the shapes allow it: CUDA through cuBLASLt's
 * block-scaled FP8 GEMM (outside recorded steps), the CPU backend's bf16 emulation with the same
 * rounding, so --compare-to bf16-emulated holds it to what that rounding costs. Unset or 0:
 * off. Experts keep the other kernels. Read once. */
int be_fp8_prefill_rows(void);
static inline bool be_fp8_prefill_eligible(int n_out, int n_in, int split) {
    return n_in % 128 == 0 && n_out % 16 == 0 && (split % 128 == 0 || split == n_out);
}

/* ---- fused ops: the backend's op where it has one, else the unfused sequence ---- */

/* h[T, D] += x[T, D]; out[T, D] = rmsnorm(h) * w (be_ops.add_rmsnorm, or add then rmsnorm) */
void be_add_rmsnorm(be_backend *be, void *out, void *h, const void *x, const void *w, int T, int D,
                    float eps);

/* rope on kva's shared key columns [col0, col0 + rope_dim), then kv_write of kva[T] into
 * layer (be_ops.rope_kv_write, or rope then kv_write); T is the batch's token count */
void be_rope_kv_write(be_backend *be, be_kv *kv, int layer, void *kva, int T, int kv_stride,
                      int col0, int rope_dim);

/* (Backends are created by name through model/backends/registry.h.) */
void be_destroy(be_backend *be);

/* The device's total and free memory (be_ops.mem_info); DUET_ERR_UNSUPPORTED for backends
 * whose memory is the host's. Outputs set only on success. */
duet_status be_mem_info(be_backend *be, long long *total_p, long long *free_p);
/* KV blocks to or from host memory without waiting (see kv_copy_start): backends without the
 * op copy at once (kv_copy_host, or memcpy for host caches) and set *ticket_p to NULL.
 * be_kv_copy_poll(NULL) is DUET_OK. */
duet_status be_kv_copy_start(be_backend *be, be_kv *kv, const int32_t *blocks, int n, void *host,
                             bool to_host, void **ticket_p);
duet_status be_kv_copy_poll(be_backend *be, void *ticket, bool wait);

/* ---- sampling through the ops, or the host rule where a backend has none ---- */

/* State for max_rows rows a call, vocabulary V, n_slots penalty slots (0: no penalties). */
duet_status be_sampler_create(be_backend *be, int max_rows, int V, int n_slots, be_sampler **s_p);
void be_sampler_destroy(be_backend *be, be_sampler *s);
/* Sets penalty slot `slot` from a request's tokens so far: prompt tokens (repetition) and
 * output tokens (counted). Queued before the call that samples the request (host arrays are
 * copied before it returns). Tokens outside [0, V) are ignored. */
duet_status be_sampler_slot_init(be_backend *be, be_sampler *s, int slot, const int32_t *prompt,
                                 int n_prompt, const int32_t *output, int n_output);
/* Queues sampling of s->rows[0..n) from logits [n_logits, stride] (a backend buffer, V valid
 * columns); checks the rows first (DUET_ERR_INVALID: a row outside n_logits, a slot outside
 * n_slots or named twice, more than BE_SAMPLE_MAX_BAN bans or BE_SAMPLE_MAX_TOP logprobs). */
duet_status be_sample_queue(be_backend *be, be_sampler *s, const void *logits, int stride,
                            int n_logits, int n);
/* Waits for the queued call: s->out (and s->top) hold its results. */
duet_status be_sample_wait(be_backend *be, be_sampler *s);
/* be_sample_queue then be_sample_wait. */
duet_status be_sample(be_backend *be, be_sampler *s, const void *logits, int stride, int n_logits,
                      int n);

/* The host rule of one row: logits[V] float32 (raw; not modified), the row's penalty slot
 * (counts[V] output counts, updated with the chosen token, and prompt_bits[(V + 31) / 32]; both
 * NULL without a slot), scratch of be_sample_host_scratch(V) bytes. */
size_t be_sample_host_scratch(int V);
void be_sample_host_row(const float *logits, int V, const be_sample_row *row, int32_t *counts,
                        const uint32_t *prompt_bits, void *scratch, be_sample_out *out,
                        be_sample_top *top);

/* The sampling ops implemented on the host with be_sample_host_row, for host-memory backends
 * (the CPU backend's table names them) and as the fallback of backends without the ops. */
duet_status be_host_sampler_create(be_backend *be, int max_rows, int V, int n_slots,
                                   be_sampler **s_p);
void be_host_sampler_destroy(be_backend *be, be_sampler *s);
duet_status be_host_sampler_slot_init(be_backend *be, be_sampler *s, int slot,
                                      const int32_t *prompt, int n_prompt, const int32_t *output,
                                      int n_output);
duet_status be_host_sample(be_backend *be, be_sampler *s, const void *logits, int stride,
                           int n_logits, int n);

#endif
