/* The tensor-core MLA prefill kernel's body (mla.cu launches it): causal attention of prompt
 * chunks in the expanded form, flash style, for DeepSeek's head shape (nope 128, rope 64, v 128).
 * Written once for the device and for the host emulation of mla-tc.cuh's warp primitives
 * (tests/gpu/test_mla_tc_emu.cu defines MLA_TC_EMULATE), so the CPU suite runs its indexing.
 *
 * Keys and values come expanded: kvx [ctx, H * (nope + v)] holds each context position's
 * k_nope and v for every head (the latents times kv_b, a GEMM before the launch), the rope part
 * of the key is shared by the heads and read from the paged cache. One block: 128 query rows
 * (16 per warp) of one head of one sequence, Q kept in registers; per tile of 64 positions,
 * copied to shared memory one tile ahead with cp.async: S = Q K^T (mma.sync m16n8k16, K = 192),
 * the causal mask, an online softmax in float32 (base 2) on the accumulators, and
 * O = diag(alpha) O + P V with P taken from the accumulators as the A operand (no trip through
 * shared memory). Tiles wholly past a warp's last row are skipped by that warp. A launch holds
 * up to FP_MAX_SEQS sequences; blocks start with the query tiles farthest into their prompts
 * (the longest ones). */
#ifndef DUET_MLA_PREFILL_CUH
#define DUET_MLA_PREFILL_CUH

#include <string.h>

#include "model/backends/cuda/mla-tc.cuh"

constexpr int FP_NOPE = 128, FP_R = 64, FP_QK = FP_NOPE + FP_R, FP_V = 128;
constexpr int FP_HW = FP_NOPE + FP_V; /* one head's columns of kvx */
constexpr int FP_BM = 128;            /* query rows per block */
constexpr int FP_BN = 64;             /* positions per tile */
constexpr int FP_THREADS = 256;       /* 8 warps of 16 rows */
constexpr int FP_LDQ = FP_QK + 8;     /* 400-byte rows: an ldmatrix's 8 rows in 8 bank groups */
constexpr int FP_LDV = FP_V + 8;      /* 272-byte rows, likewise */
constexpr int FP_MAX_SEQS = 16;
constexpr size_t FP_K_B = (size_t)FP_BN * FP_LDQ * 2;
constexpr size_t FP_STAGE_B = FP_K_B + (size_t)FP_BN * FP_LDV * 2;
constexpr size_t FP_OFF_Q = 2 * FP_STAGE_B; /* two stages */
constexpr size_t FP_OFF_POS = FP_OFF_Q + (size_t)FP_BM * FP_LDQ * 2;
constexpr size_t FP_SMEM = FP_OFF_POS + 16 * 4;
static_assert(FP_K_B % 16 == 0 && FP_STAGE_B % 16 == 0 && FP_OFF_Q % 16 == 0 &&
                  FP_OFF_POS % 16 == 0,
              "16-byte aligned carving");

struct fp_args {
    const __nv_bfloat16 *q;     /* [T, H, qw]: each head's nope then rope columns, roped */
    const __nv_bfloat16 *kvx;   /* sequence i's positions from row kvx_row[i]: [., H * 256] */
    const __nv_bfloat16 *cache; /* the pool: [block][layer][bs][kv_dim], rope at column L */
    const int32_t *pos;         /* the batch's token positions */
    const int32_t *table;       /* the batch's block table [n_seqs][max_blocks] */
    __nv_bfloat16 *out;         /* [T, H * v] */
    int n_seqs;                 /* sequences in this launch */
    int seq[FP_MAX_SEQS];       /* their index in the batch (the block table's row) */
    int t0[FP_MAX_SEQS];        /* first token of the chunk */
    int nq[FP_MAX_SEQS];        /* the chunk's tokens (query rows) */
    int ctx[FP_MAX_SEQS];       /* positions 0 .. ctx - 1 are in kvx and the cache */
    int kvx_row[FP_MAX_SEQS];
    int H, qw, L, kv_dim, n_layers, bs, max_blocks, n_blocks, layer;
    float scale_log2; /* softmax scale * log2(e) */
};

/* Query tiles of the launch (blocks = this * H). */
static inline int fp_tiles(const fp_args &a) {
    int n = 0;
    for (int i = 0; i < a.n_seqs; i++) n += (a.nq[i] + FP_BM - 1) / FP_BM;
    return n;
}

TC_FN uint32_t fp_pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &v, 4);
    return r;
}

TC_FN float fp_bf_lo(uint32_t x) { /* the bf16 in the low half, as float */
    const uint32_t b = x << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}
TC_FN float fp_bf_hi(uint32_t x) {
    const uint32_t b = x & 0xffff0000u;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

TC_FN void fp_block(const fp_args &a, unsigned char *smem, const int tid, const int block) {
    __nv_bfloat16 *sQ = (__nv_bfloat16 *)(smem + FP_OFF_Q);
    int *sPos = (int *)(smem + FP_OFF_POS); /* per warp: its last visible position */
    const int lane = tid & 31, warp = tid >> 5, gq = lane >> 2, qq = lane & 3;

    /* unit u (a query tile) of head h; units in order of their distance k from their
     * prompt's last tile, so the tiles that see the most positions start first */
    const int h = block % a.H;
    int u = block / a.H, i = -1, qt = 0;
    for (int k = 0; i < 0; k++) {
        int left = 0;
        for (int s = 0; s < a.n_seqs; s++) {
            const int nt = (a.nq[s] + FP_BM - 1) / FP_BM;
            if (nt <= k) continue;
            left++;
            if (u == 0) {
                i = s;
                qt = nt - 1 - k;
                break;
            }
            u--;
        }
        if (!left) return; /* past the launch's tiles */
    }
    const int t_first = a.t0[i] + qt * FP_BM, nrow = tc_imin(FP_BM, a.nq[i] - qt * FP_BM);
    const int ctx = tc_imin(a.ctx[i], a.max_blocks * a.bs); /* never past the block table */
    const int32_t *tab = a.table + (size_t)a.seq[i] * a.max_blocks;
    const int kvw = a.H * FP_HW;

    /* Q [128, 192]: rows past the chunk are zeros */
    const uint32_t sQa = tc_smem_u32(sQ);
    for (int c = tid; c < FP_BM * (FP_QK / 8); c += FP_THREADS) {
        const int r = c / (FP_QK / 8), k = c % (FP_QK / 8);
        const bool ok = r < nrow;
        const __nv_bfloat16 *src =
            ok ? a.q + ((size_t)(t_first + r) * a.H + h) * a.qw + k * 8 : a.q;
        tc_cp_async16(sQa + (uint32_t)(r * FP_LDQ + k * 8) * 2, src, ok);
    }
    tc_cp_async_commit();

    /* this thread's rows (gq and gq + 8 of its warp): the last position each may see, -1 for
     * rows past the chunk; the warp's last, and the block's */
    const int r_lo = warp * 16 + gq, r_hi = r_lo + 8;
    const int p_lo = r_lo < nrow ? tc_imin(a.pos[t_first + r_lo], ctx - 1) : -1;
    const int p_hi = r_hi < nrow ? tc_imin(a.pos[t_first + r_hi], ctx - 1) : -1;
    const float pw = tc_warp_max((float)tc_imax(p_lo, p_hi)); /* exact: positions < 2^24 */
    const int p_warp = (int)pw;
    if (lane == 0) sPos[warp] = p_warp;
    tc_sync_block();
    int kv_end = 0;
    for (int w = 0; w < FP_THREADS / 32; w++) kv_end = tc_imax(kv_end, sPos[w] + 1);
    const int n_tiles = (kv_end + FP_BN - 1) / FP_BN;

    /* tile `it` into stage it % 2: 4 threads per position, 6 of its 24 key pieces and 4 of its
     * 16 value pieces each; positions past kv_end, or in a block outside the pool, are zeros */
    const size_t kvx0 = (size_t)a.kvx_row[i] * kvw + (size_t)h * FP_HW;
    const __nv_bfloat16 *lay = a.cache + (size_t)a.layer * a.bs * a.kv_dim + a.L;
    const size_t blk_elems = (size_t)a.n_layers * a.bs * a.kv_dim;
    auto load_tile = [&](int it) {
        const int kr = tid >> 2, part = tid & 3, j = it * FP_BN + kr;
        const uint32_t st = tc_smem_u32(smem + (size_t)(it & 1) * FP_STAGE_B);
        const uint32_t dk = st + (uint32_t)(kr * FP_LDQ) * 2;
        const uint32_t dv = st + (uint32_t)FP_K_B + (uint32_t)(kr * FP_LDV) * 2;
        const bool ok = j < kv_end;
        const __nv_bfloat16 *row = ok ? a.kvx + kvx0 + (size_t)j * kvw : a.kvx;
        const __nv_bfloat16 *rope = a.cache;
        bool rok = ok;
        if (ok) {
            const int blk = tab[j / a.bs];
            rok = blk >= 0 && blk < a.n_blocks;
            if (rok) rope = lay + (size_t)blk * blk_elems + (size_t)(j % a.bs) * a.kv_dim;
        }
        TC_UNROLL
        for (int k = 0; k < FP_QK / 32; k++) {
            const int p = part + 4 * k; /* 16-byte piece of the key row */
            if (p < FP_NOPE / 8)
                tc_cp_async16(dk + p * 16, ok ? row + p * 8 : row, ok);
            else
                tc_cp_async16(dk + p * 16, rok ? rope + (p - FP_NOPE / 8) * 8 : rope, rok);
        }
        TC_UNROLL
        for (int k = 0; k < FP_V / 32; k++) {
            const int p = part + 4 * k;
            tc_cp_async16(dv + p * 16, ok ? row + FP_NOPE + p * 8 : row, ok);
        }
    };
    if (n_tiles > 0) load_tile(0);
    tc_cp_async_commit();

    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
    const int b_row = lane & 7, b_col = (lane >> 3) * 8;
    uint32_t qf[FP_QK / 16][4];
    float o[FP_V / 8][4];
    TC_UNROLL
    for (int n = 0; n < FP_V / 8; n++) TC_UNROLL
    for (int e = 0; e < 4; e++) o[n][e] = 0.0f;
    float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.0f, l_hi = 0.0f; /* l: this lane's part */

    for (int it = 0; it < n_tiles; it++) {
        tc_cp_async_wait<0>(); /* Q and tile it landed, for this thread */
        tc_sync_block();       /* ... for every thread; the other stage fully read */
        if (it == 0) {
            TC_UNROLL
            for (int k = 0; k < FP_QK / 16; k++)
                tc_ldsm_x4(qf[k],
                           sQa + (uint32_t)((warp * 16 + a_row) * FP_LDQ + k * 16 + a_col) * 2);
        }
        if (it + 1 < n_tiles) load_tile(it + 1);
        tc_cp_async_commit();
        const int j0 = it * FP_BN;
        if (j0 > p_warp) continue; /* every position of the tile is after this warp's rows */
        const uint32_t kt = tc_smem_u32(smem + (size_t)(it & 1) * FP_STAGE_B);
        const uint32_t vt = kt + (uint32_t)FP_K_B;

        /* S [16, 64] = Q K^T: per pair of k16 steps, the 8 position tiles' B fragments first */
        float s[FP_BN / 8][4];
        TC_UNROLL
        for (int n = 0; n < FP_BN / 8; n++) TC_UNROLL
        for (int e = 0; e < 4; e++) s[n][e] = 0.0f;
        TC_UNROLL
        for (int k2 = 0; k2 < FP_QK / 32; k2++) {
            uint32_t b[FP_BN / 8][4];
            TC_UNROLL
            for (int n = 0; n < FP_BN / 8; n++)
                tc_ldsm_x4(b[n], kt + (uint32_t)((n * 8 + b_row) * FP_LDQ + k2 * 32 + b_col) * 2);
            TC_UNROLL
            for (int n = 0; n < FP_BN / 8; n++) tc_mma(s[n], qf[2 * k2], b[n][0], b[n][1]);
            TC_UNROLL
            for (int n = 0; n < FP_BN / 8; n++) tc_mma(s[n], qf[2 * k2 + 1], b[n][2], b[n][3]);
        }

        /* causal mask and the online softmax; a row's 64 scores are spread over its quad */
        float mx_lo = -INFINITY, mx_hi = -INFINITY;
        TC_UNROLL
        for (int n = 0; n < FP_BN / 8; n++) {
            TC_UNROLL
            for (int e = 0; e < 2; e++) {
                const int j = j0 + n * 8 + 2 * qq + e;
                s[n][e] = j <= p_lo ? s[n][e] * a.scale_log2 : -INFINITY;
                s[n][2 + e] = j <= p_hi ? s[n][2 + e] * a.scale_log2 : -INFINITY;
                mx_lo = fmaxf(mx_lo, s[n][e]);
                mx_hi = fmaxf(mx_hi, s[n][2 + e]);
            }
        }
        mx_lo = fmaxf(mx_lo, tc_shfl_xor(mx_lo, 1));
        mx_lo = fmaxf(mx_lo, tc_shfl_xor(mx_lo, 2));
        mx_hi = fmaxf(mx_hi, tc_shfl_xor(mx_hi, 1));
        mx_hi = fmaxf(mx_hi, tc_shfl_xor(mx_hi, 2));
        const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
        const float mu_lo = mn_lo == -INFINITY ? 0.0f : mn_lo; /* nothing seen yet */
        const float mu_hi = mn_hi == -INFINITY ? 0.0f : mn_hi;
        const float al_lo = exp2f(m_lo - mu_lo), al_hi = exp2f(m_hi - mu_hi);
        m_lo = mn_lo;
        m_hi = mn_hi;
        uint32_t pf[FP_BN / 16][4];
        float sum_lo = 0.0f, sum_hi = 0.0f;
        TC_UNROLL
        for (int n = 0; n < FP_BN / 8; n++) {
            /* P in bf16, as P V uses it; the sums add the rounded values */
            const uint32_t lo = fp_pack(exp2f(s[n][0] - mu_lo), exp2f(s[n][1] - mu_lo));
            const uint32_t hi = fp_pack(exp2f(s[n][2] - mu_hi), exp2f(s[n][3] - mu_hi));
            sum_lo += fp_bf_lo(lo) + fp_bf_hi(lo);
            sum_hi += fp_bf_lo(hi) + fp_bf_hi(hi);
            /* A fragment of k16 step n / 2: rows gq / gq + 8, positions 2qq (+8 for odd n) */
            pf[n / 2][(n & 1) * 2] = lo;
            pf[n / 2][(n & 1) * 2 + 1] = hi;
        }
        l_lo = l_lo * al_lo + sum_lo;
        l_hi = l_hi * al_hi + sum_hi;
        TC_UNROLL
        for (int n = 0; n < FP_V / 8; n++) {
            o[n][0] *= al_lo;
            o[n][1] *= al_lo;
            o[n][2] *= al_hi;
            o[n][3] *= al_hi;
        }

        /* O [16, 128] += P [16, 64] V [64, 128] */
        TC_UNROLL
        for (int kk = 0; kk < FP_BN / 16; kk++) {
            TC_UNROLL
            for (int np = 0; np < FP_V / 16; np++) {
                uint32_t b[4];
                tc_ldsm_x4_t(b, vt + (uint32_t)((kk * 16 + a_row) * FP_LDV + np * 16 + a_col) * 2);
                tc_mma(o[2 * np], pf[kk], b[0], b[1]);
                tc_mma(o[2 * np + 1], pf[kk], b[2], b[3]);
            }
        }
    }
    tc_cp_async_wait<0>();

    /* the quad's partial sums, then rows gq and gq + 8 of the warp, normalized */
    l_lo += tc_shfl_xor(l_lo, 1);
    l_lo += tc_shfl_xor(l_lo, 2);
    l_hi += tc_shfl_xor(l_hi, 1);
    l_hi += tc_shfl_xor(l_hi, 2);
    TC_UNROLL
    for (int hf = 0; hf < 2; hf++) {
        const int r = hf ? r_hi : r_lo;
        if (r >= nrow) continue;
        const float l = hf ? l_hi : l_lo, inv = l > 0.0f ? 1.0f / l : 0.0f;
        __nv_bfloat16 *dst = a.out + (size_t)(t_first + r) * a.H * FP_V + (size_t)h * FP_V + 2 * qq;
        TC_UNROLL
        for (int n = 0; n < FP_V / 8; n++)
            *(__nv_bfloat162 *)(dst + n * 8) =
                __floats2bfloat162_rn(o[n][2 * hf] * inv, o[n][2 * hf + 1] * inv);
    }
}

#endif
