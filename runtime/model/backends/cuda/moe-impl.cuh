/* Internals of the CUDA MoE shared by moe.cu (routing, the device counting sort, combine, EP
 * packing) and moe_gemm.cu (the grouped GEMMs): the tile lists the sort writes and the GEMMs
 * read. Launch shapes depend only on host sizes; what routing decided lives on the device. */
#ifndef DUET_CUDA_MOE_IMPL_CUH
#define DUET_CUDA_MOE_IMPL_CUH

#include "model/backends/cuda/cuda-impl.cuh"

/* One problem of a grouped GEMM launch: for each row tile of the list (x = group, y = first
 * slot, z = rows; the list's length *n_tiles on the device) and each column tile,
 *   C[slot, :N] = epilogue(A[a_row(slot), :K] @ W_group^T)
 * with W_group = w[group] row-major, K contiguous. silu: W is [2N, K] (gate rows, then up
 * rows) and C = silu(gate) * up; else W is [N, K] and C the product. a_row(slot) is
 * a_rows[slot], or slot itself when a_rows is NULL. With s (FP8 weights), w[group] holds e4m3
 * bytes and s[group] their float32 128x128 block scales, rows [0, s_split) and the rest on
 * grids of their own (be_weight); every problem of a launch is FP8 or none is. */
struct gg_problem {
    const void *const *w;
    const int4 *tiles;
    const int *n_tiles;
    const int32_t *a_rows;
    const void *a;
    long long lda; /* elements */
    void *c;
    long long ldc;
    int N, K;
    int silu;
    int col_tiles; /* ceil(N / columns of one tile), set by moe_gemm_run */
    const float *const *s;
    int s_split;
};

/* Up to two problems share one launch (routed experts and the shared experts): their tiles
 * form one work list, so both read their weights at the same time. */
struct gg_args {
    gg_problem p[2];
    int n_problems;
};

/* Row-tile height of the launch shape moe_gemm_run picks for rows_per_expert (the mean rows
 * of a touched expert); the sort cuts each expert's rows into tiles of this height. */
int moe_gemm_tile_rows(const cuda_backend *c, double rows_per_expert, bool tensor_cores);
/* Whether the bf16 tensor-core kernels can take the problems (16-byte rows and K, N
 * multiples of 8; K a multiple of 16 for FP8 weights); otherwise the SIMT kernel runs. */
bool moe_gemm_mma_ok(const cuda_backend *c, const gg_args *a);
/* Launches the grouped GEMM over a's problems with row tiles of bm rows (from
 * moe_gemm_tile_rows with the same tensor_cores); max_tiles[i] bounds problem i's tile list
 * (the grid is sized for it, and blocks past the real list find no work). */
void moe_gemm_run(cuda_backend *c, gg_args *a, int bm, bool tensor_cores, const int *max_tiles);

#endif
