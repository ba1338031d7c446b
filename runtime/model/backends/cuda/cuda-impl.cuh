/* Internals of the CUDA backend shared by its .cu files: the backend object, the one macro per
 * foreign status (CUDA, cuBLAS) that converts and logs at first detection, growable scratch,
 * element conversions, and the entry points each file gives the ops table. Not for other
 * modules: the public face is backend_cuda.h. */
#ifndef DUET_CUDA_IMPL_CUH
#define DUET_CUDA_IMPL_CUH

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
#include "model/backend.h"
#include "base/log.h"
}

typedef __nv_bfloat16 bf16;

/* ---- device memory the backend holds ----
 * Every cudaMalloc and cudaFree in the files that include this header goes through the two
 * functions below (the macros at the end of this block), so the backend knows the bytes it
 * holds on each device without asking the device, whose free memory also moves with every
 * other process on it (be_ops.mem_used, model/memplan.h). Counted per device (the calling
 * thread's current one at cudaMalloc), for the whole process; any thread. A cudaFree of a
 * pointer not allocated here counts nothing. */
cudaError_t cuda_counted_malloc(void **p, size_t bytes);
cudaError_t cuda_counted_free(void *p);
template <typename T> static inline cudaError_t cuda_counted_malloc(T **p, size_t bytes) {
    return cuda_counted_malloc((void **)p, bytes);
}
/* Bytes allocated through cuda_counted_malloc on device and not freed yet, each allocation
 * as the device holds it (rounded up to the driver's pages: backend_cuda.cu's mem_taken). */
long long cuda_counted_bytes(int device);
#define cudaMalloc(p, bytes) cuda_counted_malloc((p), (bytes))
#define cudaFree(p)          cuda_counted_free(p)

/* A weight [n_out, n_in] row-major in device memory: bf16, or float32 (keep_f32 weights, and
 * every weight of a float32 backend), or FP8 e4m3 (DT_F8_E4M3, fp8.cu) with float32 scales
 * per 128x128 block: rows [0, split) and [split, n_out) have their own block grids (gate and
 * up fused), scale [ceil(split / 128) + ceil((n_out - split) / 128)][ceil(n_in / 128)]. */
struct be_weight {
    int n_out, n_in;
    dt_dtype dtype;
    void *w;
    float *scale; /* FP8 only */
    int split;    /* FP8 only */
    void **tab;   /* FP8 only: device {w, scale}, the one-group table the grouped GEMM reads */
    /* FP8 only, NULL until be_cuda_fp8_gemm_lt first runs on the weight: the scales laid out
     * as the cuBLASLt block-scaled GEMM reads them (fp8.cu, DUET_FP8_LT_LAYOUT), and which
     * layout that was (remade when it changes) */
    float *scale_lt;
    int scale_lt_layout;
};

/* Scratch areas: each op family owns one, so an op never reuses memory an op it calls is
 * still using. Grown on demand; reused across steps. */
enum cuda_scratch {
    SCR_OP = 0, /* attention, MoE and sampling intermediates */
    SCR_GEMM,   /* float32 staging of linear layers with float32 weights */
    SCR_XFER,   /* float32 staging of upload / download */
    SCR_IDX,    /* host index arrays copied for one op */
    SCR_ROUTE,  /* routing logits and results */
    SCR_FP8LT,  /* fp8.cu's prefill experts through cuBLASLt: gathered rows and outputs */
    SCR_COUNT
};

#define CUDA_MAX_MARKS 256 /* layers a forward can mark */

typedef struct cuda_backend {
    be_backend base;
    int device;
    dt_dtype act; /* activations, KV cache and weights: DT_BF16 or DT_F32 */
    cudaStream_t stream;
    cudaStream_t xfer[2]; /* KV transfer copies: [0] device->host, [1] host->device */
    cublasHandle_t blas;
    duet_status err; /* sticky: the first failure inside a void op, returned by the next call
                        that returns a status */

    /* the step's batch, the same layout on both sides: ids [n_tokens], pos [n_tokens],
     * slot [n_tokens], out rows [n_out], start [n_seqs + 1], ctx [n_seqs], table
     * [n_seqs][max_blocks]; the host copy plans launches, kernels read the device copy. The
     * device area only grows (a recorded graph keeps its addresses). */
    int n_tokens, n_seqs, max_blocks, n_out;
    int32_t *h_batch, *d_batch;
    size_t cap_h_batch, cap_d_batch;
    int32_t *h_ids, *h_pos, *h_slot, *h_out, *h_start, *h_ctx, *h_table;
    int32_t *d_ids, *d_pos, *d_slot, *d_out, *d_start, *d_ctx, *d_table;

    /* fp8 KV caches (--kv-cache-dtype fp8): one layer of the pool in the activation type,
     * [n_blocks + 1][bs][kv_dim], that mla_attention decodes the batch's blocks of a layer into
     * before the attention kernels read it (mla.cu); sized by the largest fp8 cache made */
    void *kv_shadow;
    size_t kv_shadow_bytes;

    /* recorded steps (CUDA graphs): a recording is valid while mem_gen (bumped whenever memory
     * an op refers to moves: scratch or the batch area regrown) equals the one it saw */
    uint64_t mem_gen;
    bool capturing;
    struct cuda_graph_rec *graphs;
    int n_graphs, cap_graphs;
    void *blas_ws; /* cuBLAS workspace, fixed so recorded GEMMs allocate nothing */
    size_t blas_ws_bytes;
    cublasLtHandle_t lt; /* cuBLASLt (fp8.cu's prefill GEMM), made at first use */

    float *d_inv_freq; /* [rope_half] */
    int rope_half;
    float rope_attn;

    /* what the device used right after this backend was created beyond the backend's own
     * allocations: its CUDA context and cuBLAS handle, and whatever other processes held at
     * that moment (one reading cannot tell them apart; model/memplan.h caps it) */
    size_t context_bytes;

    void *scr[SCR_COUNT];
    size_t scr_bytes[SCR_COUNT];
    void *host_tmp; /* host staging for index tables, grown on demand */
    size_t host_tmp_bytes;
    /* host staging of weight uploads (weight_create): page-locked (cudaHostAlloc) unless the
     * host refused, then malloc'ed; grown to at most a chunk, freed by destroy */
    void *wstage;
    size_t wstage_bytes;
    bool wstage_pinned;
    /* layer-wise progress of the current forward (backend.h layer_mark): an event recorded
     * on the stream after each marked layer's ops; n_marked, set after the record, says how
     * many of them belong to this forward */
    cudaEvent_t mark_ev[CUDA_MAX_MARKS];
    int n_marked;

    struct cuda_mla *mla; /* mla.cu's state (host memory, made at first use; freed by destroy) */
    /* moe.cu: device tables of expert weight pointers, one per expert set (layer) seen */
    struct moe_wtab *moe_tabs;
    int n_moe_tabs;
    /* moe.cu: the fused router's counts of finished blocks per row of tokens (zero between
     * launches) */
    unsigned *route_done;
} cuda_backend;

static inline cuda_backend *cuda_be(be_backend *be) {
    return (cuda_backend *)be;
}

/* Converts a CUDA status; logs the first failure with what was called and where. Allocation
 * failures leave the backend usable; any other failure makes it sticky. */
duet_status cuda_status(cuda_backend *c, cudaError_t e, const char *what, const char *file,
                        int line);
duet_status cublas_status(cuda_backend *c, cublasStatus_t e, const char *what, const char *file,
                          int line);
#define CUDA_CHECK(c, call)   cuda_status((c), (call), #call, __FILE__, __LINE__)
#define CUBLAS_CHECK(c, call) cublas_status((c), (call), #call, __FILE__, __LINE__)
/* after a kernel launch: a bad configuration shows here, a fault at the next sync */
#define CUDA_LAUNCHED(c, name) cuda_status((c), cudaGetLastError(), name, __FILE__, __LINE__)

/* At least bytes of scratch area `which`, or NULL (error recorded). */
void *cuda_scratch(cuda_backend *c, int which, size_t bytes);
/* Copies n host int32 into scratch SCR_IDX (an op uploads all its indices at once); returns
 * the device copy, or NULL (error recorded). */
int32_t *cuda_upload_idx(cuda_backend *c, const int32_t *src, size_t n);
/* Host staging of at least bytes, or NULL. */
void *cuda_host_tmp(cuda_backend *c, size_t bytes);

static inline size_t act_size(const cuda_backend *c) {
    return c->act == DT_BF16 ? 2 : 4;
}
static inline cudaDataType_t cuda_type(dt_dtype t) {
    return t == DT_BF16 ? CUDA_R_16BF : CUDA_R_32F;
}

/* Element conversions used by templated kernels. */
__device__ __forceinline__ float to_f(float x) {
    return x;
}
__device__ __forceinline__ float to_f(bf16 x) {
    return __bfloat162float(x);
}
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) {
    return x;
}
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) {
    return __float2bfloat16_rn(x);
}

/* e4m3 <-> float for fp8 KV caches: saturating at +-448, round to nearest even, as the CPU's
 * dt_f32_to_e4m3 / dt_e4m3_to_f32 */
__device__ __forceinline__ uint8_t kv_to_e4m3(float x) {
    return (uint8_t)__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
}
__device__ __forceinline__ float kv_from_e4m3(uint8_t v) {
    __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)v, __NV_E4M3);
    return __half2float(__half(h));
}

/* Block-wide sum of v over blockDim.x threads (a multiple of 32, at most 1024); every thread
 * gets the result. red holds 32 floats; the call ends with the block synchronized. */
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float block_sum(float v, float *red) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads(); /* red may still be read by a previous call */
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : 0.0f;
    v = warp_sum(v);
    return v;
}

/* ---- entry points of the op files ---- */

/* gemm.cu: y[T, n_out] (act) = x[T, n_in] (act, rows x_stride apart) @ W^T */
void cuda_linear(be_backend *be, void *y, const void *x, int x_stride, int T, const be_weight *w);
/* y32[T, n_out] float32 = x @ W^T: a float32 W (the router) in float32 throughout, a W of the
 * activation type with float32 accumulation */
void cuda_linear_f32out(cuda_backend *c, float *y32, const void *x, int x_stride, int T,
                        const be_weight *w);
/* Raw GEMM on activations: y[m, n_out] = x[m, k] (x_stride) @ W[n_out, k]^T (W act-typed). */
void cuda_gemm_act(cuda_backend *c, void *y, int y_stride, const void *x, int x_stride, int m,
                   const void *w, int n_out, int k);
/* y[m, n_out] (y_stride) = x[m, n_in] (x_stride) @ W^T for W of the activation type or FP8 */
void cuda_gemm_w(cuda_backend *c, void *y, int y_stride, const void *x, int x_stride, int m,
                 const be_weight *w);

/* fp8.cu: FP8 weights (be_ops.weight_create_fp8) and their GEMM: y[T, n_out] (act, y_stride)
 * = x[T, n_in] (bf16) @ dequant(W)^T through the grouped GEMM with one group (weights
 * dequantized in registers, bf16 tensor cores, float32 accumulation) */
duet_status cuda_weight_create_fp8(be_backend *be, const uint8_t *q, const float *scales, int n_out,
                                   int n_in, int split, be_weight **w_p);
void cuda_linear_fp8(cuda_backend *c, void *y, int y_stride, const void *x, int x_stride, int T,
                     const be_weight *w);
/* fp8.cu, for moe.cu: whether n rows of FP8 experts [2I, D] / [D, I] (shared: [2Is, D]) take
 * per-expert cuBLASLt GEMMs (DUET_FP8_MOE_LT_ROWS=N set and n >= N, bf16 activations, not
 * recording, D, I, Is multiples of 128; docs/kernels/fp8.md), and the run: the routed experts'
 * gate_up, SiLU x up and down for the pairs moe_sort_kernel sorted (slot_row [pairs]: each
 * slot's row of x; expert e's slots at the prefix sum of the counts before it) into y [pairs][D]
 * by slot, and with shared the shared expert over all n rows into y_s [n][D]. Reads the routing
 * ids back to the host (a stream sync). DUET_OK, or a status with nothing promised about y
 * (DUET_ERR_UNSUPPORTED: the caller runs the grouped kernel instead). */
bool cuda_moe_fp8_lt_wanted(const cuda_backend *c, int n, int D, int I, int Is);
duet_status cuda_moe_fp8_lt_run(cuda_backend *c, const be_moe_rows *rows, const be_ffn *experts,
                                int e0, int n_local, const be_ffn *shared, const int32_t *slot_row,
                                void *y, void *y_s);

/* dummy.cu: be_ops.weight_create_dummy / vec_create_dummy (the rule of model/dummy_rule.h
 * computed on the device, straight into the weight's memory) */
duet_status cuda_weight_create_dummy(be_backend *be, const dummy_slice *parts, int n_parts,
                                     int n_rows, int n_in, bool keep_f32, bool fp8,
                                     be_weight **w_p);
duet_status cuda_vec_create_dummy(be_backend *be, const dummy_slice *s, int n, void **dev_p);

/* kernels.cu */
void cuda_embed(be_backend *be, void *out, const int32_t *ids, int T, const be_weight *table,
                int row0);
void cuda_rmsnorm(be_backend *be, void *out, int out_stride, const void *x, int x_stride,
                  const void *w, int T, int D, float eps);
void cuda_add(be_backend *be, void *y, const void *x, size_t n);
void cuda_add_rmsnorm(be_backend *be, void *out, void *h, const void *x, const void *w, int T,
                      int D, float eps);
void cuda_silu_mul(be_backend *be, void *out, const void *gu, int T, int inter);
void cuda_rope(be_backend *be, void *x, int T, int row_stride, int n_heads, int head_stride,
               int col0, int rope_dim);
void cuda_kv_write(be_backend *be, be_kv *kv, int layer, const void *kva, int kv_stride);
void cuda_rope_kv_write(be_backend *be, be_kv *kv, int layer, void *kva, int T, int kv_stride,
                        int col0, int rope_dim);
void cuda_gather_rows(be_backend *be, void *dst, const void *src, const int32_t *idx, int n, int D);
void cuda_scatter_add_rows(be_backend *be, void *dst, const void *src, const int32_t *idx, int n,
                           int D);
/* dst[n] float32 <-> src[n] activations, on the stream */
void cuda_act_to_f32(cuda_backend *c, float *dst, const void *src, size_t n);
void cuda_f32_to_act(cuda_backend *c, void *dst, const float *src, size_t n);
/* dst[rows, cols] float32 (contiguous) = src rows (src_stride apart) of activations */
void cuda_act_to_f32_rows(cuda_backend *c, float *dst, const void *src, int rows, int cols,
                          int src_stride);

/* mla.cu */
void cuda_mla_attention(be_backend *be, void *out, const void *q, be_kv *kv, int layer,
                        const be_weight *kv_b, int H, int nope, int rope, int v, float scale);

/* moe.cu */
duet_status cuda_moe_route(be_backend *be, const void *x, int T, const be_weight *gate,
                           const void *bias, const be_route_params *p, int32_t *ids,
                           float *weights);
void cuda_moe_experts(be_backend *be, void *out, const void *x, int T, int D, const int32_t *ids,
                      const float *weights, int K, const be_ffn *experts, int e0, int n_local);
void cuda_moe_route_dev(be_backend *be, const void *x, int T, const be_weight *gate,
                        const void *bias, const be_route_params *p, int32_t *ids, float *weights);
void cuda_moe_experts_dev(be_backend *be, void *out, const be_moe_rows *rows, const be_ffn *experts,
                          int e0, int n_local, const be_ffn *shared);
void cuda_moe_ep_pack(be_backend *be, void *send, const void *x, int T, const int32_t *ids,
                      const float *weights, const be_ep_layout *l, int32_t *slot);
void cuda_moe_ep_unpack(be_backend *be, void *out, const void *back, int T, const be_ep_layout *l,
                        const int32_t *slot);
/* frees the expert tables (backend destruction) */
void cuda_moe_cleanup(cuda_backend *c);

/* sample.cu: the sampling ops */
duet_status cuda_sampler_create(be_backend *be, int max_rows, int V, int n_slots, be_sampler **s_p);
void cuda_sampler_destroy(be_backend *be, be_sampler *s);
duet_status cuda_sampler_slot_init(be_backend *be, be_sampler *s, int slot, const int32_t *prompt,
                                   int n_prompt, const int32_t *output, int n_output);
duet_status cuda_sample(be_backend *be, be_sampler *s, const void *logits, int stride, int n_logits,
                        int n);

#endif
