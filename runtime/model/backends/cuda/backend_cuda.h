/* The CUDA backend's public face: its constructor and a device count for tests and tools.
 * Plain C: nothing of the CUDA headers leaks out. The ops themselves are reached only through
 * be_ops (backend.h); runtime/cuda/cuda-impl.cuh holds the internals. */
#ifndef DUET_BACKEND_CUDA_H
#define DUET_BACKEND_CUDA_H

#include "model/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A backend on CUDA device `device` (a local index). dtype: DT_BF16 (bf16 weights and
 * activations, float32 accumulation; DT_COUNT picks it) or DT_F32 (float32 throughout: the
 * precision of the CPU reference, at twice the memory). DUET_ERR_NOT_FOUND when no usable
 * device or driver is present. */
duet_status be_cuda_create(int device, dt_dtype dtype, be_backend **be_p);

/* CUDA devices visible to this process; 0 when there is no driver or device. */
int be_cuda_device_count(void);

/* ---- for tests and benchmarks (tests/gpu), not for the serving path ---- */

/* The backend's stream (a cudaStream_t): every op is ordered on it, so a benchmark can time
 * ops with events on it or capture them into a CUDA graph. */
void *be_cuda_stream(be_backend *be);

/* A weight as the backend holds it, for tests that compare weights bit for bit: its element
 * type (DT_BF16, DT_F32 or DT_F8_E4M3), device addresses of its [n_out, n_in] elements and,
 * FP8 only (else NULL, 0), of its block scales and their count; read them with
 * be_ops.mem_download. */
typedef struct be_cuda_weight_view {
    dt_dtype dtype;
    int n_out, n_in, split;
    const void *data;
    const float *scales;
    size_t n_scales;
} be_cuda_weight_view;
void be_cuda_weight_view_of(const be_weight *w, be_cuda_weight_view *v_p);

/* The FP8 tensor-core GEMM for prefill, which the linear op takes with DUET_FP8_PREFILL_ROWS
 * (docs/kernels/fp8.md): y [T, n_out] (bf16, y_stride) = q(x) @ W^T for an FP8 weight w, x
 * [T, n_in] (bf16, rows x_stride apart) quantized per token and 128 columns to e4m3 (scale =
 * amax / 448, the quotient rounded to nearest), W with its 128x128 block scales, through
 * cuBLASLt's block-scaled FP8 mode (1x128 and 128x128 float32 scales, in the layouts
 * tools/fp8-lt-probe measured; DUET_FP8_LT_LAYOUT overrides them for the probe), float32
 * accumulation. Queued on the stream; DUET_ERR_UNSUPPORTED where the shapes or the library do
 * not allow it (T >= 4, n_in a multiple of 128, one block grid, n_out a multiple of 16);
 * DUET_ERR_INVALID for a malformed DUET_FP8_LT_LAYOUT. Not for a recorded step. */
duet_status be_cuda_fp8_gemm_lt(be_backend *be, void *y, int y_stride, const void *x, int x_stride,
                                int T, const be_weight *w);

/* How many moe_experts_dev calls of this process ran their FP8 experts through per-expert
 * cuBLASLt GEMMs (DUET_FP8_MOE_LT_ROWS, docs/kernels/fp8.md) instead of the grouped kernel. */
long long be_cuda_fp8_moe_lt_runs(void);

/* Phases of the MLA path that be_cuda_mla_tune can leave out. A run with any left out computes
 * garbage: the mask exists to time the phases by difference (and to time the CUDA-core prefill
 * kernel against the tensor-core one). */
enum {
    BE_CUDA_MLA_SKIP_QABS = 1,     /* q_nope @ W_uk (cuBLAS) */
    BE_CUDA_MLA_SKIP_ATTN = 2,     /* the tensor-core attention kernel */
    BE_CUDA_MLA_SKIP_COMBINE = 4,  /* the split-KV combine kernel */
    BE_CUDA_MLA_SKIP_OUTABS = 8,   /* o_lat @ W_uv (cuBLAS) */
    BE_CUDA_MLA_SKIP_EXPAND = 16,  /* prompt chunks: latents gathered and expanded by kv_b */
    BE_CUDA_MLA_SKIP_PREFILL = 32, /* prompt chunks: the tensor-core attention kernel */
    BE_CUDA_MLA_PREFILL_CC = 64,   /* not a skip: prompt chunks on the CUDA-core kernel */
};

/* What the last mla_attention call did on its absorbed (decode) sequences, and on its prompt
 * chunks. */
typedef struct be_cuda_mla_info {
    bool tensor_cores;    /* the bf16 tensor-core kernel ran (false: the CUDA-core kernel) */
    int n_split;          /* KV splits per sequence */
    int rows_per_block;   /* (query row, head) pairs one block computes: 16, 32 or 64 */
    int n_groups;         /* blocks per sequence and split: ceil(rows / rows_per_block) */
    int n_blocks;         /* blocks of the attention launch */
    bool prefill_tc;      /* prompt chunks ran on the tensor-core prefill kernel */
    int prefill_launches; /* its launches (groups of sequences) */
    int prefill_blocks;   /* its blocks, all launches */
    int variant;          /* the decode variant asked for (be_cuda_mla_variant) */
    int kernel_variant;   /* the variant whose kernel ran: the lowest with the same shape for
                             these rows (a variant that does not fit runs variant 0's) */
    int tile;             /* its positions per tile */
    int stages;           /* its cp.async ring depth (tiles) */
    int blocks_per_sm;    /* its occupancy, which the split count was sized by */
} be_cuda_mla_info;

/* Decode variants of the tensor-core MLA kernel (docs/kernels/mla.md, "Decode variants"), for
 * benchmarks to time side by side; the default is the one the H200 sweep measured fastest. */
#define BE_CUDA_MLA_VARIANTS        5
#define BE_CUDA_MLA_DEFAULT_VARIANT 1

/* n_split > 0 forces the KV split count of later mla_attention calls (0: the backend
 * chooses); skip is a mask of BE_CUDA_MLA_SKIP_*. DUET_ERR_INVALID for n_split outside [0, 4096].
 */
duet_status be_cuda_mla_tune(be_backend *be, int n_split, unsigned skip);
/* The decode variant of later mla_attention calls, 0 .. BE_CUDA_MLA_VARIANTS - 1
 * (DUET_ERR_INVALID otherwise). The environment variable DUET_MLA_DECODE_VARIANT sets the
 * starting value for a whole program (a value outside that range fails the first MLA op). */
duet_status be_cuda_mla_variant(be_backend *be, int variant);
duet_status be_cuda_mla_last(be_backend *be, be_cuda_mla_info *info_p);

#ifdef __cplusplus
}
#endif

#endif
