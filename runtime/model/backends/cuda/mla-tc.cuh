/* The tensor-core MLA decode kernels' bodies (mla.cu launches them): attention over the paged
 * latent cache for up to 64 (query row, head) pairs per block, and the split-KV combine.
 * Written once for the device and for a host emulation of their warp primitives: a file that
 * defines MLA_TC_EMULATE before including this supplies the tc_* primitives below
 * (tests/gpu/test_mla_tc_emu.cu), so the CPU suite runs the kernel's own indexing. */
#ifndef DUET_MLA_TC_CUH
#define DUET_MLA_TC_CUH

#include <cuda_bf16.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* One block: one sequence, one KV split, RT = 16 * MT (query row, head) pairs; row r of a
 * sequence is (query row r / H, head r % H), so up to 64 rows share every cached byte read.
 * Per tile of TN positions, copied into shared memory with cp.async NSTAGE - 1 tiles ahead:
 * S = Q K^T (mma.sync m16n8k16: M = rows, N = positions, K = 576), an online softmax in
 * float32 (base 2, one warp per row, TN / 32 positions per lane), O = diag(alpha) O + P V with
 * V the tile's first 512 dims (M = rows, N = 512: 64 per warp, K = positions).
 *
 * Decode variants (docs/kernels/mla.md, "Decode variants"): the same body over other tile
 * widths, ring depths and warp splits, so that one GPU run can time them side by side.
 * Variant 0 is the default. A variant whose shape does not fit a block's shared memory for
 * some MT (or, for a two-blocks-per-SM variant, half an SM's) runs variant 0's shape there:
 * tc_canon names the variant whose kernel actually runs. */

constexpr int TC_L = 512, TC_R = 64, TC_D = TC_L + TC_R; /* latent, rope, cached row */
constexpr int TC_LDK = TC_D + 8; /* shared row pitch of tiles and queries, in elements: 16
                                    bytes of padding put the 8 rows one ldmatrix reads in 8
                                    different bank groups */
constexpr int TC_THREADS = 256;  /* 8 warps */
constexpr int TC_KSTEPS = TC_D / 16;
constexpr int TC_COMBINE_THREADS = TC_L / 4; /* 4 dims each */
constexpr int TC_N_VARIANTS = 5;
constexpr size_t TC_SMEM_MAX = 227 * 1024;  /* one block's opt-in shared memory (sm_90) */
constexpr size_t TC_SMEM_HALF = 113 * 1024; /* each of two blocks on one SM (228 KB, 1 KB
                                               reserved per block) */

/* A kernel's shape: positions per tile, cp.async ring depth, halves of the 576 dims the S warps
 * split (2: partial scores summed in the softmax), Q fragments kept in registers for the
 * block's life (MT 1 only), and the blocks per SM asked of the compiler (launch bounds). */
struct tc_shape {
    int tn, nstage, ksplit, qreg, minb;
};

constexpr bool tc_shape_eq(tc_shape a, tc_shape b) {
    return a.tn == b.tn && a.nstage == b.nstage && a.ksplit == b.ksplit && a.qreg == b.qreg &&
           a.minb == b.minb;
}

/* shared bytes of a shape for 16 * MT rows: the ring, Q, scores, P, per-row state */
constexpr size_t tc_shape_smem(tc_shape sh, int MT) {
    return (size_t)sh.nstage * sh.tn * TC_LDK * 2 + (size_t)16 * MT * TC_LDK * 2 +
           (size_t)sh.ksplit * 16 * MT * (sh.tn + 8) * 4 + (size_t)16 * MT * (sh.tn + 8) * 2 +
           (size_t)4 * 16 * MT * 4;
}

/* the shape variant v asks for with 16 * MT rows */
constexpr tc_shape tc_shape_want(int v, int MT) {
    const tc_shape v0 = {32, MT == 4 ? 3 : 4, MT == 1 ? 2 : 1, MT == 1, 1};
    switch (v) {
    case 1: /* 64-position tiles, two stages (one tile in flight): half the barriers and
               softmax rounds per position */
        return {64, 2, MT == 1 ? 2 : 1, MT == 1, 1};
    case 2: /* 64-position tiles, S split over positions only: 8 warps x 8 positions over all
               576 dims, no partial-score sum; Q read from shared memory */
        return {64, 2, 1, 0, 1};
    case 3: /* two blocks per SM: 32-position tiles, two stages, Q from shared memory; one
               block's barriers and softmax overlap the other's copies and MMAs */
        return {32, 2, MT == 1 ? 2 : 1, 0, 2};
    case 4: /* a deeper ring: five stages of 32 positions (four tiles in flight) */
        return {32, 5, MT == 1 ? 2 : 1, MT == 1, 1};
    default:
        return v0;
    }
}

constexpr bool tc_shape_fits(tc_shape sh, int MT) {
    const int warps_s = sh.ksplit * MT; /* warps over rows and k halves; the rest over n */
    return TC_THREADS / 32 % warps_s == 0 && sh.tn / 8 % (TC_THREADS / 32 / warps_s) == 0 &&
           TC_KSTEPS / sh.ksplit % 2 == 0 && (!sh.qreg || MT == 1) && sh.nstage >= 2 &&
           tc_shape_smem(sh, MT) <= (sh.minb >= 2 ? TC_SMEM_HALF : TC_SMEM_MAX);
}

/* the shape variant v runs with 16 * MT rows: its own where it fits, variant 0's otherwise */
constexpr tc_shape tc_shape_of(int v, int MT) {
    return tc_shape_fits(tc_shape_want(v, MT), MT) ? tc_shape_want(v, MT) : tc_shape_want(0, MT);
}

/* the lowest variant with the same shape as v for MT: the kernel instance that runs */
constexpr int tc_canon(int v, int MT) {
    for (int u = 0; u < v; u++)
        if (tc_shape_eq(tc_shape_of(u, MT), tc_shape_of(v, MT))) return u;
    return v;
}

template <int MT, int V = 0> struct tc_cfg {
    static constexpr tc_shape SH = tc_shape_of(V, MT);
    static constexpr int RT = 16 * MT;
    static constexpr int TN = SH.tn;         /* positions per tile */
    static constexpr int NPL = TN / 32;      /* positions per lane in the softmax */
    static constexpr int NSTAGE = SH.nstage; /* ring of NSTAGE tiles: NSTAGE - 1 in flight */
    static constexpr int MINB = SH.minb;
    static constexpr int LDS = TN + 8; /* scores (float) */
    static constexpr int LDP = TN + 8; /* probabilities (bf16): rows an odd multiple of 16
                                          bytes apart, no ldmatrix bank conflicts */
    /* the 8 warps over S [RT, TN]: KSPLIT halves of the 576 dims (partial scores summed in
     * the softmax), NWN slices of NTW n8 tiles along the positions, MT m16 tiles of rows */
    static constexpr int KSPLIT = SH.ksplit;
    static constexpr int NWN = TC_THREADS / 32 / (KSPLIT * MT);
    static constexpr int NTW = TN / 8 / NWN;
    static constexpr int KSW = TC_KSTEPS / KSPLIT; /* k16 steps per warp */
    /* with 16 rows a warp's share of Q (18 k16 steps) can stay in 72 registers for the block's
     * life instead of being re-read from shared memory every tile */
    static constexpr bool QREG = SH.qreg != 0;
    static constexpr size_t STAGE_B = (size_t)TN * TC_LDK * 2;
    static constexpr size_t OFF_Q = NSTAGE * STAGE_B;
    static constexpr size_t OFF_S = OFF_Q + (size_t)RT * TC_LDK * 2;
    static constexpr size_t OFF_P = OFF_S + (size_t)KSPLIT * RT * LDS * 4;
    static constexpr size_t OFF_ROW = OFF_P + (size_t)RT * LDP * 2; /* alpha, m, l, lim */
    static constexpr size_t SMEM = OFF_ROW + (size_t)4 * RT * 4;
    static_assert(SMEM == tc_shape_smem(SH, MT), "the carving is the shape's size");
    static_assert(tc_shape_fits(SH, MT), "a shape that fits");
    static_assert(KSPLIT * NWN * MT == TC_THREADS / 32, "one (k half, n slice, m tile) per warp");
    static_assert(NWN * NTW * 8 == TN && TN % 32 == 0, "n8 tiles cover the tile; whole lanes");
    static_assert(KSW % 2 == 0, "k16 steps go in pairs");
    static_assert(STAGE_B % 16 == 0 && OFF_S % 16 == 0 && OFF_P % 16 == 0 && OFF_ROW % 16 == 0,
                  "16-byte aligned carving");
};

struct tc_args {
    const __nv_bfloat16 *qlat;  /* [T, H, 512]: q_nope @ W_uk */
    const __nv_bfloat16 *q;     /* [T, H, qw]: the rope part at column nope of each head */
    const __nv_bfloat16 *cache; /* the pool: [block][layer][bs][576] */
    const int32_t *start, *pos, *table;
    float *opart;        /* [n_seqs][n_split][rows_pad][512] normalized partial outputs */
    float *lse;          /* [n_seqs][n_split][rows_pad] log2 of the partial sums (-inf: none) */
    __nv_bfloat16 *olat; /* [T, H, 512]: written here directly when n_split == 1 */
    int H, qw, nope, n_layers, bs, max_blocks, n_blocks, layer, n_split, n_groups, max_q;
    float scale_log2; /* softmax scale * log2(e) */
};

/* ---- primitives ---- */
#ifdef MLA_TC_EMULATE
#define TC_FN static inline
#define TC_UNROLL
uint32_t tc_smem_u32(const void *p);
void tc_cp_async16(uint32_t dst, const void *src, bool full);
void tc_ldsm_x4(uint32_t (&r)[4], uint32_t addr);
void tc_ldsm_x4_t(uint32_t (&r)[4], uint32_t addr);
void tc_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
float tc_shfl_xor(float v, int lane_mask);
void tc_sync_block(void);
void tc_sync_warp(void);
TC_FN void tc_cp_async_commit(void) {}
template <int N> TC_FN void tc_cp_async_wait(void) {} /* emulated copies land at once */
#else
#define TC_FN     __device__ __forceinline__
#define TC_UNROLL _Pragma("unroll")
TC_FN uint32_t tc_smem_u32(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}
/* 16 bytes global -> shared, bypassing L1; zeros when !full (src is then not read) */
TC_FN void tc_cp_async16(uint32_t dst, const void *src, bool full) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(full ? 16 : 0)
                 : "memory");
}
TC_FN void tc_cp_async_commit(void) {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N> TC_FN void tc_cp_async_wait(void) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
TC_FN void tc_ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
TC_FN void tc_ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
/* d += a (16x16 row-major) * b (16x8 column-major), bf16 in, float32 accumulate */
TC_FN void tc_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
TC_FN float tc_shfl_xor(float v, int lane_mask) {
    return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}
TC_FN void tc_sync_block(void) {
    __syncthreads();
}
TC_FN void tc_sync_warp(void) {
    __syncwarp();
}
#endif

TC_FN int tc_imin(int a, int b) {
    return a < b ? a : b;
}
TC_FN int tc_imax(int a, int b) {
    return a > b ? a : b;
}
TC_FN float tc_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, tc_shfl_xor(v, o));
    return v;
}
TC_FN float tc_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += tc_shfl_xor(v, o);
    return v;
}

/* ---- the attention block ---- */
template <int MT, int V = 0>
TC_FN void tc_block(const tc_args &a, unsigned char *smem, const int tid, const int block) {
    using C = tc_cfg<MT, V>;
    constexpr int RT = C::RT, TN = C::TN;
    __nv_bfloat16 *sQ = (__nv_bfloat16 *)(smem + C::OFF_Q); /* [RT][TC_LDK] */
    float *sS = (float *)(smem + C::OFF_S);                 /* [KSPLIT][RT][LDS] */
    __nv_bfloat16 *sP = (__nv_bfloat16 *)(smem + C::OFF_P); /* [RT][LDP] */
    float *sAlpha = (float *)(smem + C::OFF_ROW);           /* per row: this tile's rescale, */
    float *sM = sAlpha + RT, *sL = sM + RT;                 /* running max (base 2), sum, */
    int *sLim = (int *)(sL + RT); /* and the end of its causal range in the split */

    const int lane = tid & 31, warp = tid >> 5;
    const int g = block % a.n_groups;
    const int sp = block / a.n_groups % a.n_split;
    const int s = block / (a.n_groups * a.n_split);
    const int t0 = a.start[s], nq = a.start[s + 1] - t0;
    if (nq <= 0 || nq > a.max_q) return; /* no tokens, or a prompt chunk (expanded form) */
    const int rows = nq * a.H, r0 = g * RT;
    if (r0 >= rows) return; /* fewer rows than this launch has groups for */

    /* the sequence's context ends at its last token; this split's share of it, whole tiles */
    int kv_end = 0;
    for (int i = 0; i < nq; i++) kv_end = tc_imax(kv_end, a.pos[t0 + i] + 1);
    kv_end = tc_imin(kv_end, a.max_blocks * a.bs); /* never past the block table */
    const int chunk = ((kv_end + a.n_split - 1) / a.n_split + TN - 1) / TN * TN;
    const int begin = sp * chunk, end = tc_imin(kv_end, begin + chunk);
    const int n_tiles = end > begin ? (end - begin + TN - 1) / TN : 0;

    if (tid < RT) {
        const int rg = r0 + tid;
        sLim[tid] = rg < rows ? tc_imin(a.pos[t0 + rg / a.H] + 1, end) : 0;
        sM[tid] = -INFINITY;
        sL[tid] = 0.0f;
    }

    /* Q [RT, 576] = q_lat | q_rope of each row; rows past the sequence's are zeros */
    const uint32_t sQa = tc_smem_u32(sQ);
    for (int c = tid; c < RT * (TC_D / 8); c += TC_THREADS) {
        const int r = c / (TC_D / 8), k = c % (TC_D / 8), rg = r0 + r;
        const bool ok = rg < rows;
        const size_t th = ok ? (size_t)(t0 + rg / a.H) * a.H + (size_t)(rg % a.H) : 0;
        const __nv_bfloat16 *src = k < TC_L / 8 ? a.qlat + th * TC_L + k * 8
                                                : a.q + th * a.qw + a.nope + (k - TC_L / 8) * 8;
        tc_cp_async16(sQa + (uint32_t)(r * TC_LDK + k * 8) * 2, src, ok);
    }
    tc_cp_async_commit();

    /* tile `it`: 8 threads per position (32 positions a pass, TN / 32 passes), 9 16-byte
     * pieces each; positions past the split, or in a block id outside the pool, become zeros
     * (their scores are masked) */
    const __nv_bfloat16 *lay = a.cache + (size_t)a.layer * a.bs * TC_D;
    const size_t blk_elems = (size_t)a.n_layers * a.bs * TC_D;
    const int32_t *tab = a.table + (size_t)s * a.max_blocks;
    auto load_tile = [&](int it) {
        const uint32_t stage = tc_smem_u32(smem + (size_t)(it % C::NSTAGE) * C::STAGE_B);
        TC_UNROLL
        for (int pass = 0; pass < TN / 32; pass++) {
            const int pp = (tid >> 3) + 32 * pass, j = begin + it * TN + pp;
            const uint32_t dst = stage + (uint32_t)(pp * TC_LDK * 2);
            const __nv_bfloat16 *src = a.cache;
            bool ok = j < end;
            if (ok) {
                const int blk = tab[j / a.bs];
                ok = blk >= 0 && blk < a.n_blocks;
                if (ok) src = lay + (size_t)blk * blk_elems + (size_t)(j % a.bs) * TC_D;
            }
            TC_UNROLL
            for (int k = 0; k < TC_D / 64; k++) {
                const int piece = (tid & 7) + 8 * k;
                tc_cp_async16(dst + piece * 16, src + piece * 8, ok);
            }
        }
    };
    TC_UNROLL
    for (int i = 0; i < C::NSTAGE - 1; i++) {
        if (i < n_tiles) load_tile(i);
        tc_cp_async_commit(); /* empty groups keep the count uniform */
    }

    /* warp roles; lane offsets of ldmatrix: A and trans-V (4 8x8 blocks as a 16x16), B
     * (4 k8 blocks of the same 8 positions) */
    const int kh = warp / (C::NWN * MT), wr = warp % (C::NWN * MT);
    const int wm = wr / C::NWN, wn = wr % C::NWN;
    const int gq = lane >> 2, qq = lane & 3;
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
    const int b_row = lane & 7, b_col = (lane >> 3) * 8;

    uint32_t qf[C::QREG ? C::KSW : 1][4];
    float o[MT][8][4];
    TC_UNROLL
    for (int m = 0; m < MT; m++) TC_UNROLL
    for (int n = 0; n < 8; n++) TC_UNROLL
    for (int e = 0; e < 4; e++) o[m][n][e] = 0.0f;

    for (int it = 0; it < n_tiles; it++) {
        tc_cp_async_wait<C::NSTAGE - 2>(); /* tile it (and Q) landed, for this thread */
        tc_sync_block();                   /* ... for every thread; tile it - 1 fully read */
        if (it + C::NSTAGE - 1 < n_tiles) load_tile(it + C::NSTAGE - 1);
        tc_cp_async_commit();
        const uint32_t tile = tc_smem_u32(smem + (size_t)(it % C::NSTAGE) * C::STAGE_B);

        if constexpr (C::QREG) {
            if (it == 0) {
                TC_UNROLL
                for (int k = 0; k < C::KSW; k++)
                    tc_ldsm_x4(qf[k], sQa + (uint32_t)((wm * 16 + a_row) * TC_LDK +
                                                       (kh * C::KSW + k) * 16 + a_col) *
                                                2);
            }
        }

        /* S: this warp's 16 rows x NTW * 8 positions over KSW k16 steps, alternating two
         * accumulators so consecutive mma do not wait on each other */
        float sacc[C::NTW][2][4];
        TC_UNROLL
        for (int n = 0; n < C::NTW; n++) TC_UNROLL
        for (int e = 0; e < 4; e++) sacc[n][0][e] = sacc[n][1][e] = 0.0f;
        TC_UNROLL
        for (int k = 0; k < C::KSW; k += 2) {
            const int kk = kh * C::KSW + k;
            uint32_t af[2][4];
            if constexpr (C::QREG) {
                TC_UNROLL
                for (int e = 0; e < 4; e++) {
                    af[0][e] = qf[k][e];
                    af[1][e] = qf[k + 1][e];
                }
            } else {
                tc_ldsm_x4(af[0],
                           sQa + (uint32_t)((wm * 16 + a_row) * TC_LDK + kk * 16 + a_col) * 2);
                tc_ldsm_x4(af[1],
                           sQa + (uint32_t)((wm * 16 + a_row) * TC_LDK + kk * 16 + 16 + a_col) * 2);
            }
            TC_UNROLL
            for (int n = 0; n < C::NTW; n++) {
                const int p8 = (wn * C::NTW + n) * 8;
                uint32_t b[4];
                tc_ldsm_x4(b, tile + (uint32_t)((p8 + b_row) * TC_LDK + kk * 16 + b_col) * 2);
                tc_mma(sacc[n][0], af[0], b[0], b[1]);
                tc_mma(sacc[n][1], af[1], b[2], b[3]);
            }
        }
        {
            float *ss = sS + (size_t)kh * RT * C::LDS;
            const int row = wm * 16 + gq;
            TC_UNROLL
            for (int n = 0; n < C::NTW; n++) {
                const int col = (wn * C::NTW + n) * 8 + 2 * qq;
                *(float2 *)&ss[row * C::LDS + col] =
                    make_float2(sacc[n][0][0] + sacc[n][1][0], sacc[n][0][1] + sacc[n][1][1]);
                *(float2 *)&ss[(row + 8) * C::LDS + col] =
                    make_float2(sacc[n][0][2] + sacc[n][1][2], sacc[n][0][3] + sacc[n][1][3]);
            }
        }
        tc_sync_block();

        /* online softmax, base 2: warp w owns rows w, w + 8, ...; lane owns positions lane,
         * lane + 32, ... of the tile */
        const int j = begin + it * TN + lane;
        TC_UNROLL
        for (int i = 0; i < RT / 8; i++) {
            const int r = warp + 8 * i;
            float x[C::NPL];
            bool ok[C::NPL];
            float xmax = -INFINITY;
            TC_UNROLL
            for (int c = 0; c < C::NPL; c++) {
                x[c] = sS[r * C::LDS + lane + 32 * c];
                if constexpr (C::KSPLIT == 2) x[c] += sS[(RT + r) * C::LDS + lane + 32 * c];
                ok[c] = j + 32 * c < sLim[r];
                x[c] = ok[c] ? x[c] * a.scale_log2 : -INFINITY;
                xmax = fmaxf(xmax, x[c]);
            }
            const float m_old = sM[r];
            const float m_new = fmaxf(m_old, tc_warp_max(xmax));
            const float m_use = m_new == -INFINITY ? 0.0f : m_new; /* nothing seen yet */
            float pl = 0.0f;
            TC_UNROLL
            for (int c = 0; c < C::NPL; c++) {
                const __nv_bfloat16 p = __float2bfloat16_rn(ok[c] ? exp2f(x[c] - m_use) : 0.0f);
                pl += __bfloat162float(p);
                sP[r * C::LDP + lane + 32 * c] = p;
            }
            const float alpha = exp2f(m_old - m_use); /* first scores: exp2(-inf) = 0 */
            const float psum = tc_warp_sum(pl);       /* what P V adds */
            tc_sync_warp();                           /* every lane has read sM[r] */
            if (lane == 0) {
                sAlpha[r] = alpha;
                sM[r] = m_new;
                sL[r] = sL[r] * alpha + psum;
            }
        }
        tc_sync_block();

        /* O [RT, this warp's 64 dims] = diag(alpha) O + P [RT, TN] V [TN, 64] */
        TC_UNROLL
        for (int m = 0; m < MT; m++) {
            const float lo = sAlpha[m * 16 + gq], hi = sAlpha[m * 16 + gq + 8];
            TC_UNROLL
            for (int n = 0; n < 8; n++) {
                o[m][n][0] *= lo;
                o[m][n][1] *= lo;
                o[m][n][2] *= hi;
                o[m][n][3] *= hi;
            }
        }
        const uint32_t sPa = tc_smem_u32(sP);
        TC_UNROLL
        for (int kk = 0; kk < TN / 16; kk++) {
            uint32_t pf[MT][4];
            TC_UNROLL
            for (int m = 0; m < MT; m++)
                tc_ldsm_x4(pf[m],
                           sPa + (uint32_t)((m * 16 + a_row) * C::LDP + kk * 16 + a_col) * 2);
            TC_UNROLL
            for (int np = 0; np < 4; np++) {
                uint32_t b[4];
                tc_ldsm_x4_t(
                    b, tile + (uint32_t)((kk * 16 + a_row) * TC_LDK + warp * 64 + np * 16 + a_col) *
                                  2);
                TC_UNROLL
                for (int m = 0; m < MT; m++) {
                    tc_mma(o[m][2 * np], pf[m], b[0], b[1]);
                    tc_mma(o[m][2 * np + 1], pf[m], b[2], b[3]);
                }
            }
        }
    }
    tc_cp_async_wait<0>();
    tc_sync_block(); /* sL / sM final (also when there were no tiles) */

    /* rows [prow, prow + RT) of this block's partials */
    const size_t prow = ((size_t)s * a.n_split + sp) * a.n_groups * RT + (size_t)g * RT;
    TC_UNROLL
    for (int m = 0; m < MT; m++) {
        TC_UNROLL
        for (int hf = 0; hf < 2; hf++) {
            const int r = m * 16 + gq + 8 * hf, rg = r0 + r;
            if (rg >= rows) continue;
            const float l = sL[r], inv = l > 0.0f ? 1.0f / l : 0.0f;
            if (a.n_split == 1) {
                const size_t th = (size_t)(t0 + rg / a.H) * a.H + (size_t)(rg % a.H);
                __nv_bfloat16 *dst = a.olat + th * TC_L + warp * 64 + 2 * qq;
                TC_UNROLL
                for (int n = 0; n < 8; n++)
                    *(__nv_bfloat162 *)(dst + n * 8) =
                        __floats2bfloat162_rn(o[m][n][2 * hf] * inv, o[m][n][2 * hf + 1] * inv);
            } else if (l > 0.0f) {
                float *dst = a.opart + (prow + r) * TC_L + warp * 64 + 2 * qq;
                TC_UNROLL
                for (int n = 0; n < 8; n++)
                    *(float2 *)(dst + n * 8) =
                        make_float2(o[m][n][2 * hf] * inv, o[m][n][2 * hf + 1] * inv);
            }
        }
    }
    if (a.n_split > 1 && tid < RT && r0 + tid < rows) {
        const float l = sL[tid];
        a.lse[prow + tid] = l > 0.0f ? sM[tid] + log2f(l) : -INFINITY;
    }
}

/* ---- the combine block ----
 * o_lat[t, h, :] = the splits' partial outputs of row (t - start[s]) * H + h weighted by their
 * shares of the softmax sum; splits that saw no position (lse -inf) are skipped unread. One
 * block per (row r, sequence s), 4 dims per thread. */
struct tc_combine_args {
    const float *opart, *lse;
    __nv_bfloat16 *olat;
    const int32_t *start;
    int H, n_split, rows_pad, max_q;
};

TC_FN void tc_combine(const tc_combine_args &a, const int tid, const int r, const int s) {
    const int t0 = a.start[s], nq = a.start[s + 1] - t0;
    if (nq <= 0 || nq > a.max_q || r >= nq * a.H) return;
    const size_t row0 = (size_t)s * a.n_split * a.rows_pad + (size_t)r; /* split k: + k * pad */
    float mx = -INFINITY;
    for (int k = 0; k < a.n_split; k++) mx = fmaxf(mx, a.lse[row0 + (size_t)k * a.rows_pad]);
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float wsum = 0.0f;
    if (mx != -INFINITY) {
        for (int k = 0; k < a.n_split; k++) {
            const float e = a.lse[row0 + (size_t)k * a.rows_pad];
            if (e == -INFINITY) continue;
            const float w = exp2f(e - mx);
            const float4 x =
                *(const float4 *)(a.opart + (row0 + (size_t)k * a.rows_pad) * TC_L + tid * 4);
            wsum += w;
            acc.x += w * x.x;
            acc.y += w * x.y;
            acc.z += w * x.z;
            acc.w += w * x.w;
        }
    }
    const float inv = wsum > 0.0f ? 1.0f / wsum : 0.0f;
    __nv_bfloat16 *dst =
        a.olat + ((size_t)(t0 + r / a.H) * a.H + (size_t)(r % a.H)) * TC_L + tid * 4;
    *(__nv_bfloat162 *)dst = __floats2bfloat162_rn(acc.x * inv, acc.y * inv);
    *(__nv_bfloat162 *)(dst + 2) = __floats2bfloat162_rn(acc.z * inv, acc.w * inv);
}

#endif
