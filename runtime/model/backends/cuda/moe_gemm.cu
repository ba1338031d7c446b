/* Grouped GEMMs of the MoE experts: every touched expert's rows in one launch, tiles read from
 * the list the device counting sort wrote (moe.cu), so untouched experts cost nothing and no
 * count reaches the host. bf16 runs on tensor cores (mma.sync m16n8k16, ldmatrix, a cp.async
 * pipeline); float32, and shapes the tensor-core path cannot take, run a plain SIMT kernel.
 * FP8 weights (gg_problem.s) travel the same pipeline as e4m3 bytes, half the bytes of bf16,
 * and are dequantized with their block scale into a bf16 tile in shared memory before the
 * tensor cores read it (docs/kernels/fp8.md). */
#include <cuda_fp8.h>

#include "model/backends/cuda/moe-impl.cuh"

/* ---- shared pieces ---- */

/* A work item of a launch: problem, row tile (its list entry) and column tile. Items run
 * column tile fastest, so the blocks running at once share A rows and an expert's weights. */
struct gg_item {
    const gg_problem *p;
    int4 tile;
    int col_tile;
};

__device__ __forceinline__ int gg_items(const gg_args &a, int i) {
    return i < a.n_problems ? *a.p[i].n_tiles * a.p[i].col_tiles : 0;
}

__device__ __forceinline__ gg_item gg_item_at(const gg_args &a, int item, int n0) {
    const int pi = item < n0 ? 0 : 1;
    const gg_problem *p = &a.p[pi];
    const int it = pi ? item - n0 : item;
    return gg_item{p, p->tiles[it / p->col_tiles], it % p->col_tiles};
}

__device__ __forceinline__ float silu_f(float g) {
    return g / (1.0f + expf(-g));
}

/* FP8 weights: the block-scale row of weight row wrow (two grids when split < rows) */
__device__ __forceinline__ const float *fp8_scale_row(const gg_problem &P, const float *S,
                                                      int wrow) {
    const int cb = (P.K + 127) / 128;
    const int br =
        wrow < P.s_split ? wrow / 128 : (P.s_split + 127) / 128 + (wrow - P.s_split) / 128;
    return S + (long long)br * cb;
}

__device__ __forceinline__ float fp8_to_f(uint8_t v) {
    __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)v, __NV_E4M3);
    return __half2float(__half(h));
}

/* 16 e4m3 bytes times scale, rounded to 16 bf16 (as the CPU reference rounds the dequantized
 * weight when it stores it in bf16) */
__device__ __forceinline__ void fp8x16_to_bf16(bf16 *dst, uint4 q, float scale) {
    const unsigned w[4] = {q.x, q.y, q.z, q.w};
    unsigned out[8];
    for (int i = 0; i < 4; i++)
        for (int h = 0; h < 2; h++) {
            __half2_raw r = __nv_cvt_fp8x2_to_halfraw2(
                (__nv_fp8x2_storage_t)((w[i] >> (16 * h)) & 0xffffu), __NV_E4M3);
            float2 f = __half22float2(__half2(r));
            __nv_bfloat162 b = __floats2bfloat162_rn(f.x * scale, f.y * scale);
            out[i * 2 + h] = *reinterpret_cast<unsigned *>(&b);
        }
    reinterpret_cast<uint4 *>(dst)[0] = make_uint4(out[0], out[1], out[2], out[3]);
    reinterpret_cast<uint4 *>(dst)[1] = make_uint4(out[4], out[5], out[6], out[7]);
}

/* ---- tensor cores: bf16 in, float32 accumulate, bf16 out ----
 * Block tile BM x BN x BK, warps of WM x WN. The B tile's rows for a silu problem interleave
 * 8 gate rows and the 8 matching up rows, so every warp holds gate and up of the same output
 * elements in its accumulators and the epilogue needs no shared memory. */

template <int BM, int BN, int BK, int WM, int WN, int STAGES> struct mma_cfg {
    static constexpr int WARPS = (BM / WM) * (BN / WN);
    static constexpr int THREADS = WARPS * 32;
    static constexpr int LDS = BK + 8; /* padded rows: ldmatrix reads hit 8 distinct banks */
    static constexpr int A_CHUNKS = BM * BK / 8 / THREADS; /* 16-byte chunks per thread */
    static constexpr int B_CHUNKS = BN * BK / 8 / THREADS;
    static constexpr int MF = WM / 16, NF = WN / 8;
    static constexpr size_t SMEM = (size_t)STAGES * (BM + BN) * LDS * sizeof(bf16);
    /* FP8 weights: the stages hold e4m3 B tiles [BN][BK] (16-byte chunks), dequantized into
     * one bf16 tile [BN][LDS] per k step */
    static constexpr int Q_CHUNKS = BN * BK / 16 / THREADS;
    static constexpr size_t SMEM_F8 = (size_t)STAGES * (BM * LDS * sizeof(bf16) + (size_t)BN * BK) +
                                      (size_t)BN * LDS * sizeof(bf16);
    static_assert(BM * BK / 8 % THREADS == 0 && BN * BK / 8 % THREADS == 0, "whole chunks");
    static_assert(BN * BK / 16 % THREADS == 0 && 128 % BK == 0, "whole FP8 chunks, one scale");
    static_assert(WM % 16 == 0 && WN % 16 == 0 && BK % 16 == 0, "mma shapes");
};

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool valid) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    int n = valid ? 16 : 0; /* 0: nothing read, the 16 bytes zero-filled */
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::);
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void *smem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

/* d += a (16x16, row) * b (16x8, col) */
__device__ __forceinline__ void mma_bf16(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                         unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void store_bf16x2(bf16 *p, float x, float y) {
    *reinterpret_cast<__nv_bfloat162 *>(p) = __floats2bfloat162_rn(x, y);
}

template <int BM, int BN, int BK, int WM, int WN, int STAGES, bool FP8>
__global__ void __launch_bounds__(mma_cfg<BM, BN, BK, WM, WN, STAGES>::THREADS, 2)
    gg_mma_kernel(const __grid_constant__ gg_args args) {
    using C = mma_cfg<BM, BN, BK, WM, WN, STAGES>;
    extern __shared__ uint4 smem_raw[];
    bf16 *As = reinterpret_cast<bf16 *>(smem_raw); /* [STAGES][BM][LDS] */
    bf16 *Bs = As + (size_t)STAGES * BM * C::LDS;  /* [STAGES][BN][LDS]; FP8: [BN][LDS] */
    uint8_t *Bq = reinterpret_cast<uint8_t *>(Bs + (size_t)BN * C::LDS); /* [STAGES][BN][BK] */
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_m = warp / (BN / WN), warp_n = warp % (BN / WN);
    const int n0 = gg_items(args, 0), total = n0 + gg_items(args, 1);

    for (int item = blockIdx.x; item < total; item += gridDim.x) {
        const gg_item w = gg_item_at(args, item, n0);
        const gg_problem &P = *w.p;
        const bf16 *W = reinterpret_cast<const bf16 *>(P.w[w.tile.x]);
        const bf16 *A = reinterpret_cast<const bf16 *>(P.a);
        const int slot0 = w.tile.y, rows = w.tile.z, K = P.K, N = P.N;
        /* output columns of this tile: silu tiles cover BN / 2 of them (gate and up rows) */
        const int j0 = w.col_tile * (P.silu ? BN / 2 : BN);

        /* each thread's chunks: fixed rows, columns advancing by BK per k tile */
        const bf16 *a_src[C::A_CHUNKS];
        int a_dst[C::A_CHUNKS], a_k[C::A_CHUNKS];
        for (int i = 0; i < C::A_CHUNKS; i++) {
            int ch = tid + i * C::THREADS, r = ch / (BK / 8), c8 = ch % (BK / 8);
            a_dst[i] = r * C::LDS + c8 * 8;
            a_k[i] = c8 * 8;
            a_src[i] = nullptr;
            if (r < rows) {
                long long ar = P.a_rows ? P.a_rows[slot0 + r] : slot0 + r;
                a_src[i] = A + ar * P.lda + c8 * 8;
            }
        }
        const bf16 *b_src[C::B_CHUNKS];
        int b_dst[C::B_CHUNKS], b_k[C::B_CHUNKS];
        for (int i = 0; i < C::B_CHUNKS; i++) {
            int ch = tid + i * C::THREADS, r = ch / (BK / 8), c8 = ch % (BK / 8);
            b_dst[i] = r * C::LDS + c8 * 8;
            b_k[i] = c8 * 8;
            int col = P.silu ? j0 + (r / 16) * 8 + (r & 7) : j0 + r;
            int wrow = P.silu && (r & 15) >= 8 ? N + col : col;
            b_src[i] = col < N ? W + (long long)wrow * K + c8 * 8 : nullptr;
        }
        /* FP8: each thread loads and later dequantizes the same 16-byte chunks */
        const uint8_t *q_src[FP8 ? C::Q_CHUNKS : 1];
        const float *q_scale[FP8 ? C::Q_CHUNKS : 1];
        int q_row[FP8 ? C::Q_CHUNKS : 1], q_k[FP8 ? C::Q_CHUNKS : 1];
        if constexpr (FP8) {
            const uint8_t *Wq = reinterpret_cast<const uint8_t *>(P.w[w.tile.x]);
            const float *S = P.s[w.tile.x];
            for (int i = 0; i < C::Q_CHUNKS; i++) {
                int ch = tid + i * C::THREADS, r = ch / (BK / 16), c16 = ch % (BK / 16);
                q_row[i] = r;
                q_k[i] = c16 * 16;
                int col = P.silu ? j0 + (r / 16) * 8 + (r & 7) : j0 + r;
                int wrow = P.silu && (r & 15) >= 8 ? N + col : col;
                q_src[i] = col < N ? Wq + (long long)wrow * K + c16 * 16 : nullptr;
                q_scale[i] = col < N ? fp8_scale_row(P, S, wrow) : nullptr;
            }
        }
        const int KT = (K + BK - 1) / BK;
        auto load_stage = [&](int stage, int kt) {
            const int k0 = kt * BK;
            bf16 *as = As + (size_t)stage * BM * C::LDS, *bs = Bs + (size_t)stage * BN * C::LDS;
            for (int i = 0; i < C::A_CHUNKS; i++) {
                bool ok = a_src[i] && k0 + a_k[i] < K;
                cp_async16(as + a_dst[i], ok ? a_src[i] + k0 : A, ok);
            }
            if constexpr (FP8) {
                uint8_t *bq = Bq + (size_t)stage * BN * BK;
                for (int i = 0; i < C::Q_CHUNKS; i++) {
                    bool ok = q_src[i] && k0 + q_k[i] < K;
                    cp_async16(bq + q_row[i] * BK + q_k[i], ok ? q_src[i] + k0 : (const void *)A,
                               ok);
                }
            } else {
                for (int i = 0; i < C::B_CHUNKS; i++) {
                    bool ok = b_src[i] && k0 + b_k[i] < K;
                    cp_async16(bs + b_dst[i], ok ? b_src[i] + k0 : W, ok);
                }
            }
        };

        float acc[C::MF][C::NF][4];
        for (int i = 0; i < C::MF; i++)
            for (int j = 0; j < C::NF; j++)
                for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

        for (int s = 0; s < STAGES - 1; s++) {
            if (s < KT) load_stage(s, s);
            cp_async_commit(); /* empty groups keep the wait counts uniform */
        }
        for (int kt = 0; kt < KT; kt++) {
            cp_async_wait<STAGES - 2>();
            __syncthreads(); /* stage kt landed for everyone; stage kt - 1 is free again */
            if (kt + STAGES - 1 < KT) load_stage((kt + STAGES - 1) % STAGES, kt + STAGES - 1);
            cp_async_commit();
            const bf16 *as = As + (size_t)(kt % STAGES) * BM * C::LDS;
            const bf16 *bs = Bs + (size_t)(kt % STAGES) * BN * C::LDS;
            if constexpr (FP8) {
                /* every warp finished the previous k step's tile (the barrier above) */
                const uint8_t *bq = Bq + (size_t)(kt % STAGES) * BN * BK;
                const int k0 = kt * BK;
                for (int i = 0; i < C::Q_CHUNKS; i++) {
                    bool ok = q_src[i] && k0 + q_k[i] < K;
                    float sc = ok ? q_scale[i][(k0 + q_k[i]) / 128] : 0.0f;
                    uint4 q = *reinterpret_cast<const uint4 *>(bq + q_row[i] * BK + q_k[i]);
                    fp8x16_to_bf16(Bs + q_row[i] * C::LDS + q_k[i], q, sc);
                }
                __syncthreads();
                bs = Bs;
            }
            for (int ks = 0; ks < BK; ks += 16) {
                unsigned af[C::MF][4], bfr[C::NF][2];
                for (int i = 0; i < C::MF; i++) {
                    int r = warp_m * WM + i * 16 + (lane & 15), col = ks + (lane >> 4) * 8;
                    ldmatrix_x4(af[i], as + r * C::LDS + col);
                }
                for (int j = 0; j < C::NF; j += 2) {
                    unsigned t[4];
                    int r = warp_n * WN + j * 8 + (lane & 7) + (lane >> 4) * 8;
                    int col = ks + ((lane >> 3) & 1) * 8;
                    ldmatrix_x4(t, bs + r * C::LDS + col);
                    bfr[j][0] = t[0];
                    bfr[j][1] = t[1];
                    bfr[j + 1][0] = t[2];
                    bfr[j + 1][1] = t[3];
                }
                for (int i = 0; i < C::MF; i++)
                    for (int j = 0; j < C::NF; j++)
                        mma_bf16(acc[i][j], af[i], bfr[j][0], bfr[j][1]);
            }
        }
        cp_async_wait<0>();
        __syncthreads(); /* the next item's loads reuse the stages */

        /* epilogue: lane holds rows g, g + 8 and columns 2t, 2t + 1 of each 16 x 8 fragment */
        bf16 *Cout = reinterpret_cast<bf16 *>(P.c);
        const int g = lane >> 2, t2 = (lane & 3) * 2;
        for (int i = 0; i < C::MF; i++) {
            for (int h = 0; h < 2; h++) {
                int r = warp_m * WM + i * 16 + g + h * 8;
                if (r >= rows) continue;
                bf16 *crow = Cout + (long long)(slot0 + r) * P.ldc;
                if (P.silu) {
                    for (int j = 0; j < C::NF; j += 2) {
                        /* fragment j: gate rows of pair p, fragment j + 1: its up rows */
                        int p = (warp_n * WN + j * 8) / 16;
                        int col = j0 + p * 8 + t2;
                        if (col >= N) continue;
                        float v0 = silu_f(acc[i][j][h * 2]) * acc[i][j + 1][h * 2];
                        float v1 = silu_f(acc[i][j][h * 2 + 1]) * acc[i][j + 1][h * 2 + 1];
                        store_bf16x2(crow + col, v0, v1);
                    }
                } else {
                    for (int j = 0; j < C::NF; j++) {
                        int col = j0 + warp_n * WN + j * 8 + t2;
                        if (col >= N) continue;
                        store_bf16x2(crow + col, acc[i][j][h * 2], acc[i][j][h * 2 + 1]);
                    }
                }
            }
        }
    }
}

/* ---- SIMT: any type, any shape (the float32 backend, and shapes the tensor cores cannot
 * take). 256 threads, a BM x 64 tile, BK = 16; thread (tr, tc) owns rows tr * BM / 16 + i and
 * columns tc + 16 j; for silu, columns 0..31 of the tile are gate and 32..63 the matching up. */

template <typename T, int BM>
__global__ void __launch_bounds__(256) gg_simt_kernel(const __grid_constant__ gg_args args) {
    constexpr int BN = 64, BK = 16, RM = BM / 16;
    __shared__ float As[BK][BM + 1], Bs[BK][BN + 1];
    const int tid = threadIdx.x, tr = tid / 16, tc = tid % 16;
    const int n0 = gg_items(args, 0), total = n0 + gg_items(args, 1);

    for (int item = blockIdx.x; item < total; item += gridDim.x) {
        const gg_item w = gg_item_at(args, item, n0);
        const gg_problem &P = *w.p;
        const T *W = reinterpret_cast<const T *>(P.w[w.tile.x]);
        const T *A = reinterpret_cast<const T *>(P.a);
        const int slot0 = w.tile.y, rows = w.tile.z, K = P.K, N = P.N;
        const int j0 = w.col_tile * (P.silu ? BN / 2 : BN);
        float acc[RM][4];
        for (int i = 0; i < RM; i++)
            for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
        for (int k0 = 0; k0 < K; k0 += BK) {
            for (int e = tid; e < BM * BK; e += 256) {
                int r = e / BK, k = e % BK;
                float v = 0.0f;
                if (r < rows && k0 + k < K) {
                    long long ar = P.a_rows ? P.a_rows[slot0 + r] : slot0 + r;
                    v = to_f(A[ar * P.lda + k0 + k]);
                }
                As[k][r] = v;
            }
            for (int e = tid; e < BN * BK; e += 256) {
                int cidx = e / BK, k = e % BK;
                int col = P.silu ? j0 + cidx % 32 : j0 + cidx;
                int wrow = P.silu && cidx >= 32 ? N + col : col;
                float v = 0.0f;
                if (col < N && k0 + k < K) {
                    if (P.s) { /* FP8: rounded to bf16 like the tensor-core path's tile */
                        const uint8_t *Wq = reinterpret_cast<const uint8_t *>(W);
                        float sc = fp8_scale_row(P, P.s[w.tile.x], wrow)[(k0 + k) / 128];
                        v = __bfloat162float(
                            __float2bfloat16_rn(fp8_to_f(Wq[(long long)wrow * K + k0 + k]) * sc));
                    } else {
                        v = to_f(W[(long long)wrow * K + k0 + k]);
                    }
                }
                Bs[k][cidx] = v;
            }
            __syncthreads();
            /* a partial sum per k tile, then added: rounding grows with sqrt(BK) + sqrt(K / BK)
             * instead of sqrt(K), which keeps long float32 rows (K = 7168) near the reference */
            float part[RM][4];
            for (int i = 0; i < RM; i++)
                for (int j = 0; j < 4; j++) part[i][j] = 0.0f;
            for (int k = 0; k < BK; k++) {
                float b[4];
                for (int j = 0; j < 4; j++) b[j] = Bs[k][tc + 16 * j];
                for (int i = 0; i < RM; i++) {
                    float a = As[k][tr * RM + i];
                    for (int j = 0; j < 4; j++) part[i][j] += a * b[j];
                }
            }
            for (int i = 0; i < RM; i++)
                for (int j = 0; j < 4; j++) acc[i][j] += part[i][j];
            __syncthreads();
        }
        T *Cout = reinterpret_cast<T *>(P.c);
        for (int i = 0; i < RM; i++) {
            int r = tr * RM + i;
            if (r >= rows) continue;
            T *crow = Cout + (long long)(slot0 + r) * P.ldc;
            if (P.silu) {
                for (int j = 0; j < 2; j++) {
                    int col = j0 + tc + 16 * j;
                    if (col < N) crow[col] = from_f<T>(silu_f(acc[i][j]) * acc[i][j + 2]);
                }
            } else {
                for (int j = 0; j < 4; j++) {
                    int col = j0 + tc + 16 * j;
                    if (col < N) crow[col] = from_f<T>(acc[i][j]);
                }
            }
        }
    }
}

/* ---- launch shapes ---- */

/* S: decode (a handful of rows per expert): one 16-row mma tile, narrow columns for many
 * blocks, a deep pipeline to keep enough weight bytes in flight.
 * M, L: prefill, 64 or 128 rows, classic 8-warp tiles. */
#define GG_S 16, 64, 64, 16, 16, 6
#define GG_M 64, 128, 32, 32, 32, 4
#define GG_L 128, 128, 32, 64, 32, 4

int moe_gemm_tile_rows(const cuda_backend *c, double rows_per_expert, bool tensor_cores) {
    (void)c;
    if (!tensor_cores) return rows_per_expert <= 24 ? 16 : 64;
    if (rows_per_expert <= 24) return 16;
    return rows_per_expert <= 96 ? 64 : 128;
}

bool moe_gemm_mma_ok(const cuda_backend *c, const gg_args *a) {
    if (c->act != DT_BF16) return false;
    for (int i = 0; i < a->n_problems; i++) {
        const gg_problem &p = a->p[i];
        if (p.K % 8 || p.N % 8 || p.lda % 8 || p.ldc % 2 || ((uintptr_t)p.a & 15)) return false;
        if (p.s && p.K % 16) return false;
    }
    return true;
}

/* Blocks a launch needs: the items of the worst-case tile lists, at most what fits the
 * device at once (the kernel loops over the rest). */
static unsigned grid_for_items(const cuda_backend *c, const gg_args *a, const int *max_tiles,
                               int per_sm) {
    long long items = 0;
    for (int i = 0; i < a->n_problems; i++) items += (long long)max_tiles[i] * a->p[i].col_tiles;
    static int n_sm = 0; /* read once (one device per process), never inside a capture */
    if (!n_sm &&
        cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, c->device) != cudaSuccess) {
        (void)cudaGetLastError();
        n_sm = 132;
    }
    long long cap = (long long)n_sm * (per_sm > 0 ? per_sm : 1);
    if (items > cap) items = cap;
    return (unsigned)(items > 0 ? items : 1);
}

template <int BM, int BN, int BK, int WM, int WN, int STAGES, bool FP8>
static void launch_mma_t(cuda_backend *c, gg_args *a, const int *max_tiles) {
    using C = mma_cfg<BM, BN, BK, WM, WN, STAGES>;
    auto kern = gg_mma_kernel<BM, BN, BK, WM, WN, STAGES, FP8>;
    const size_t smem = FP8 ? C::SMEM_F8 : C::SMEM;
    static int per_sm = 0; /* once per process: one device per process */
    if (!per_sm) {
        if (CUDA_CHECK(c, cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               (int)smem)) != DUET_OK)
            return;
        if (CUDA_CHECK(c, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, C::THREADS,
                                                                        smem)) != DUET_OK)
            return;
        if (per_sm < 1) {
            LOG_ERROR("cuda: the MoE GEMM tile (%zu bytes of shared memory) fits no SM", smem);
            c->err = DUET_ERR_DEVICE;
            return;
        }
    }
    for (int i = 0; i < a->n_problems; i++)
        a->p[i].col_tiles =
            (a->p[i].N + (a->p[i].silu ? BN / 2 : BN) - 1) / (a->p[i].silu ? BN / 2 : BN);
    kern<<<grid_for_items(c, a, max_tiles, per_sm), C::THREADS, smem, c->stream>>>(*a);
    CUDA_LAUNCHED(c, FP8 ? "gg_mma_kernel (fp8)" : "gg_mma_kernel");
}

template <int BM, int BN, int BK, int WM, int WN, int STAGES>
static void launch_mma(cuda_backend *c, gg_args *a, const int *max_tiles) {
    if (a->p[0].s)
        launch_mma_t<BM, BN, BK, WM, WN, STAGES, true>(c, a, max_tiles);
    else
        launch_mma_t<BM, BN, BK, WM, WN, STAGES, false>(c, a, max_tiles);
}

template <typename T, int BM>
static void launch_simt(cuda_backend *c, gg_args *a, const int *max_tiles) {
    for (int i = 0; i < a->n_problems; i++)
        a->p[i].col_tiles = (a->p[i].N + (a->p[i].silu ? 32 : 64) - 1) / (a->p[i].silu ? 32 : 64);
    gg_simt_kernel<T, BM><<<grid_for_items(c, a, max_tiles, 4), 256, 0, c->stream>>>(*a);
    CUDA_LAUNCHED(c, "gg_simt_kernel");
}

void moe_gemm_run(cuda_backend *c, gg_args *a, int bm, bool tensor_cores, const int *max_tiles) {
    if (c->err != DUET_OK) return;
    if (a->n_problems == 2 && !a->p[0].s != !a->p[1].s) {
        LOG_ERROR("cuda: a grouped GEMM launch mixes FP8 and bf16 weights (routed and shared "
                  "experts stored differently)");
        c->err = DUET_ERR_INTERNAL;
        return;
    }
    if (tensor_cores) {
        if (bm == 16)
            launch_mma<GG_S>(c, a, max_tiles);
        else if (bm == 64)
            launch_mma<GG_M>(c, a, max_tiles);
        else
            launch_mma<GG_L>(c, a, max_tiles);
    } else if (c->act == DT_BF16) {
        if (bm == 16)
            launch_simt<bf16, 16>(c, a, max_tiles);
        else
            launch_simt<bf16, 64>(c, a, max_tiles);
    } else {
        if (bm == 16)
            launch_simt<float, 16>(c, a, max_tiles);
        else
            launch_simt<float, 64>(c, a, max_tiles);
    }
}
