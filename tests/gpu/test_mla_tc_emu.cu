/* The tensor-core MLA decode kernels (runtime/model/backends/cuda/mla-tc.cuh) run on the CPU
 * under an emulation of their warp primitives: 256 fibers per block (ucontext), ldmatrix and
 * mma.sync computed from the PTX fragment layouts, shuffles, barriers that detect deadlock,
 * cp.async as an immediate copy checked against the buffers it may read. Shared memory starts
 * as NaN, outputs too. Checks the kernels' own indexing (rows and heads, pages, layers, splits,
 * causal limits, the combine) against a float64 reference, with no GPU: suite 'unit'. What it
 * cannot check is the hardware's side (real layouts, async copies, timing): the GPU op test.
 * Usage: test_mla_tc_emu [variant]: the decode cases over one decode variant (each MT that has
 * a shape of its own in it; 0, the default, also runs the prefill cases), or all of them. */
#define MLA_TC_EMULATE
#include "model/backends/cuda/mla-prefill.cuh"
#include "model/backends/cuda/mla-tc.cuh"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <vector>

#define XS_SEED 88172645463325252ull
#include "xorshift.h"

static int g_failures;
#define EXPECT(cond, ...)                                                                          \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            g_failures++;                                                                          \
            fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);                                        \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
        }                                                                                          \
    } while (0)

[[noreturn]] static void emu_abort(const char *what) {
    fprintf(stderr, "emulator: %s\n", what);
    exit(1);
}

/* ---- fibers and barriers ---- */

enum { N_THREADS = TC_THREADS, N_WARPS = TC_THREADS / 32, STACK = 64 * 1024 };

static ucontext_t g_main;
static ucontext_t g_ctx[N_THREADS];
static bool g_done[N_THREADS];
static char *g_stacks;
static int g_cur;
static long g_progress; /* arrivals and departures at barriers: a round without any is a
                           deadlock */
static void (*g_body)(int tid);

static void yield_to_main(void) {
    if (swapcontext(&g_ctx[g_cur], &g_main) != 0) emu_abort("swapcontext");
}

struct barrier {
    int arrived, gen;
};
static barrier g_block_bar, g_warp_bar[N_WARPS];

static void barrier_wait(barrier *b, int n) {
    int gen = b->gen;
    g_progress++;
    if (++b->arrived == n) {
        b->arrived = 0;
        b->gen++;
        return;
    }
    while (b->gen == gen) yield_to_main();
    g_progress++;
}

void tc_sync_block(void) {
    barrier_wait(&g_block_bar, N_THREADS);
}
void tc_sync_warp(void) {
    barrier_wait(&g_warp_bar[g_cur / 32], 32);
}

static void fiber_entry(void) {
    g_body(g_cur);
    g_done[g_cur] = true;
    g_progress++;
    yield_to_main(); /* never resumed */
}

/* Runs body(tid) for tid in [0, 256) as one block. */
static void run_block(void (*body)(int)) {
    g_body = body;
    memset(&g_block_bar, 0, sizeof g_block_bar);
    memset(g_warp_bar, 0, sizeof g_warp_bar);
    for (int t = 0; t < N_THREADS; t++) {
        g_done[t] = false;
        if (getcontext(&g_ctx[t]) != 0) emu_abort("getcontext");
        g_ctx[t].uc_stack.ss_sp = g_stacks + (size_t)t * STACK;
        g_ctx[t].uc_stack.ss_size = STACK;
        g_ctx[t].uc_link = NULL;
        makecontext(&g_ctx[t], fiber_entry, 0);
    }
    for (;;) {
        long before = g_progress;
        int live = 0;
        for (int t = 0; t < N_THREADS; t++) {
            if (g_done[t]) continue;
            live++;
            g_cur = t;
            if (swapcontext(&g_main, &g_ctx[t]) != 0) emu_abort("swapcontext");
        }
        if (!live) break;
        if (g_progress == before) emu_abort("deadlock: threads wait at different barriers");
    }
    /* a block ends with every thread at the same point: barriers empty */
    if (g_block_bar.arrived) emu_abort("a block barrier was left half-crossed");
}

/* ---- shared memory and the buffers cp.async may read ---- */

static unsigned char *g_smem;
static size_t g_smem_bytes;
struct range {
    const char *lo, *hi;
};
static std::vector<range> g_readable;

uint32_t tc_smem_u32(const void *p) {
    const unsigned char *c = (const unsigned char *)p;
    if (c < g_smem || c > g_smem + g_smem_bytes) emu_abort("smem_u32 of a non-shared pointer");
    return (uint32_t)(c - g_smem);
}

static void check_smem(uint32_t addr, size_t n, const char *what) {
    if (addr % 16 || (size_t)addr + n > g_smem_bytes) {
        fprintf(stderr, "emulator: %s at shared offset %u (%zu bytes of %zu)\n", what, addr, n,
                g_smem_bytes);
        exit(1);
    }
}

void tc_cp_async16(uint32_t dst, const void *src, bool full) {
    check_smem(dst, 16, "cp.async target");
    if (!full) {
        memset(g_smem + dst, 0, 16);
        return;
    }
    const char *s = (const char *)src;
    bool ok = (uintptr_t)s % 16 == 0;
    bool inside = false;
    for (const range &r : g_readable) inside |= s >= r.lo && s + 16 <= r.hi;
    if (!ok || !inside) emu_abort("cp.async from outside the kernel's inputs, or misaligned");
    memcpy(g_smem + dst, s, 16);
}

/* ---- warp primitives: lanes deposit, meet, read each other, meet again ---- */

struct warp_slots {
    uint32_t u[32][6];
    float f[32];
};
static warp_slots g_ws[N_WARPS];

static uint16_t smem16(uint32_t byte_addr) {
    uint16_t v;
    memcpy(&v, g_smem + byte_addr, 2);
    return v;
}

static void ldsm(uint32_t (&r)[4], uint32_t addr, bool trans) {
    int w = g_cur / 32, lane = g_cur % 32;
    check_smem(addr, 16, "ldmatrix row");
    g_ws[w].u[lane][0] = addr;
    tc_sync_warp();
    /* matrix i's 8 rows come from lanes 8i .. 8i + 7; this lane gets, of each, row lane / 4
     * elements 2 (lane % 4) and + 1 (trans: column lane / 4 of rows 2 (lane % 4) and + 1) */
    int g = lane / 4, q = lane % 4;
    for (int i = 0; i < 4; i++) {
        uint16_t lo, hi;
        if (!trans) {
            uint32_t row = g_ws[w].u[8 * i + g][0];
            lo = smem16(row + 2 * (2 * q));
            hi = smem16(row + 2 * (2 * q + 1));
        } else {
            lo = smem16(g_ws[w].u[8 * i + 2 * q][0] + 2 * g);
            hi = smem16(g_ws[w].u[8 * i + 2 * q + 1][0] + 2 * g);
        }
        r[i] = (uint32_t)lo | (uint32_t)hi << 16;
    }
    tc_sync_warp();
}

void tc_ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
    ldsm(r, addr, false);
}
void tc_ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
    ldsm(r, addr, true);
}

static float bf_lo(uint32_t x) {
    uint32_t b = (x & 0xffffu) << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}
static float bf_hi(uint32_t x) {
    uint32_t b = x & 0xffff0000u;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* m16n8k16: lane (g = lane / 4, q = lane % 4) holds A rows g and g + 8, columns 2q, 2q + 1
 * (a0, a1) and 2q + 8, 2q + 9 (a2, a3); B column g, rows 2q, 2q + 1 (b0) and 2q + 8, 2q + 9
 * (b1); C rows g (c0, c1) and g + 8 (c2, c3), columns 2q, 2q + 1. */
void tc_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    int w = g_cur / 32, lane = g_cur % 32;
    for (int i = 0; i < 4; i++) g_ws[w].u[lane][i] = a[i];
    g_ws[w].u[lane][4] = b0;
    g_ws[w].u[lane][5] = b1;
    tc_sync_warp();
    int g = lane / 4, q = lane % 4;
    float A[2][16], B[16][2];
    for (int qq = 0; qq < 4; qq++) {
        const uint32_t *s = g_ws[w].u[g * 4 + qq];
        for (int h = 0; h < 2; h++) { /* rows g, g + 8 */
            A[h][2 * qq] = bf_lo(s[h]);
            A[h][2 * qq + 1] = bf_hi(s[h]);
            A[h][2 * qq + 8] = bf_lo(s[2 + h]);
            A[h][2 * qq + 9] = bf_hi(s[2 + h]);
        }
        for (int c = 0; c < 2; c++) { /* columns 2q, 2q + 1 */
            const uint32_t *t = g_ws[w].u[(2 * q + c) * 4 + qq];
            B[2 * qq][c] = bf_lo(t[4]);
            B[2 * qq + 1][c] = bf_hi(t[4]);
            B[2 * qq + 8][c] = bf_lo(t[5]);
            B[2 * qq + 9][c] = bf_hi(t[5]);
        }
    }
    for (int h = 0; h < 2; h++)
        for (int c = 0; c < 2; c++) {
            float acc = d[2 * h + c];
            for (int k = 0; k < 16; k++) acc += A[h][k] * B[k][c];
            d[2 * h + c] = acc;
        }
    tc_sync_warp();
}

float tc_shfl_xor(float v, int lane_mask) {
    int w = g_cur / 32, lane = g_cur % 32;
    g_ws[w].f[lane] = v;
    tc_sync_warp();
    float r = g_ws[w].f[lane ^ lane_mask];
    tc_sync_warp();
    return r;
}

/* ---- the cases ---- */

static __nv_bfloat16 nan_bf(void) {
    return __float2bfloat16_rn(NAN);
}

/* ---- what both kernels' cases share ---- */

/* bf16 of uniform draws in [-a, a), in order */
static void fill_bf(std::vector<__nv_bfloat16> &v, float a) {
    for (auto &x : v) x = __float2bfloat16_rn(xs_uniform(a));
}

/* Blocks 0 .. n_blocks-1 handed out in a scrambled order: sequence s's context (ctx[s]
 * positions, bs a block) takes the next ones into block-table row row0 + s (max_blocks entries a
 * row, -1 where unused). */
static std::vector<int32_t> scrambled_table(const std::vector<int> &ctx, int bs, int n_blocks,
                                            int max_blocks, int row0) {
    const int ns = (int)ctx.size();
    std::vector<int32_t> perm(n_blocks), table((size_t)(ns + row0) * max_blocks, -1);
    for (int i = 0; i < n_blocks; i++) perm[i] = i;
    for (int i = n_blocks - 1; i > 0; i--) {
        int j = (int)(xs_next() % (uint64_t)(i + 1));
        std::swap(perm[i], perm[j]);
    }
    for (int s = 0, at = 0; s < ns; s++)
        for (int b = 0; b < (ctx[s] + bs - 1) / bs; b++)
            table[(size_t)(s + row0) * max_blocks + b] = perm[at++];
    return table;
}

/* sc[0..n) -> exp(sc - max sc), in place; returns their sum (the softmax's denominator) */
static double exp_scores(std::vector<double> &sc, int n) {
    double mx = -INFINITY;
    for (int j = 0; j < n; j++) mx = sc[j] > mx ? sc[j] : mx;
    double sum = 0;
    for (int j = 0; j < n; j++) sum += sc[j] = exp(sc[j] - mx);
    return sum;
}

/* The float64 reference's verdict over a case's rows: relative L2 error overall (<= 5e-3) and
 * of the worst row (<= 2e-2), no output left unwritten (non-finite), none written that must
 * not be (stray). */
struct ref_check {
    double num = 0, den = 0, worst = 0;
    long unwritten = 0, stray = 0;

    /* one output row of n values against the reference o */
    void row(const __nv_bfloat16 *got, const std::vector<double> &o, int n) {
        double rn = 0, rd = 0;
        for (int e = 0; e < n; e++) {
            double g = __bfloat162float(got[e]);
            if (!isfinite(g)) {
                unwritten++;
                continue;
            }
            rn += (g - o[e]) * (g - o[e]);
            rd += o[e] * o[e];
        }
        num += rn;
        den += rd;
        double re = sqrt(rn / (rd > 0 ? rd : 1));
        worst = re > worst ? re : worst;
    }

    /* n outputs the kernel must leave alone (NaN) */
    void untouched(const __nv_bfloat16 *got, int n) {
        for (int e = 0; e < n; e++) stray += !isnan(__bfloat162float(got[e]));
    }

    void verdict(const char *name) {
        double err = sqrt(num / (den > 0 ? den : 1));
        bool ok = unwritten == 0 && stray == 0 && err <= 5e-3 && worst <= 2e-2;
        printf("  %-44s rel_l2 %.2e, worst row %.2e, %ld unwritten, %ld stray  %s\n", name, err,
               worst, unwritten, stray, ok ? "PASS" : "FAIL");
        EXPECT(ok, "%s", name);
    }
};

struct emu_case {
    const char *name;
    int H, MT, n_split, bs, n_layers, layer;
    std::vector<int> nq, ctx; /* per sequence: new tokens (query rows) and context length */
};

static tc_args g_args;
static tc_combine_args g_cargs;
static int g_block, g_row, g_seq;

template <int MT, int V> static void block_body(int tid) {
    tc_block<MT, tc_canon(V, MT)>(g_args, g_smem, tid, g_block);
}

/* each decode variant's block body and shared bytes, by MT (1, 2, 4) */
struct emu_kernel {
    void (*body)(int);
    size_t smem;
};
#define EMU_K(MT, V)                                                                               \
    { block_body<MT, V>, tc_cfg<MT, V>::SMEM }
#define EMU_KS(MT)                                                                                 \
    { EMU_K(MT, 0), EMU_K(MT, 1), EMU_K(MT, 2), EMU_K(MT, 3), EMU_K(MT, 4) }
static_assert(TC_N_VARIANTS == 5, "EMU_KS lists every variant");
static const emu_kernel k_emu[3][TC_N_VARIANTS] = {EMU_KS(1), EMU_KS(2), EMU_KS(4)};
/* the kernels each variant runs, as docs/kernels/mla.md's table says: every variant has its
 * own for 16 rows; for 32, v2 is v1's shape and v3 (two blocks per SM) does not fit; for 64,
 * none but v0 fits */
static_assert(tc_canon(1, 1) == 1 && tc_canon(2, 1) == 2 && tc_canon(3, 1) == 3 &&
                  tc_canon(4, 1) == 4,
              "MT 1");
static_assert(tc_canon(1, 2) == 1 && tc_canon(2, 2) == 1 && tc_canon(3, 2) == 0 &&
                  tc_canon(4, 2) == 4,
              "MT 2");
static_assert(tc_canon(1, 4) == 0 && tc_canon(2, 4) == 0 && tc_canon(3, 4) == 0 &&
                  tc_canon(4, 4) == 0,
              "MT 4");
static_assert(tc_cfg<1, 3>::MINB == 2 && 2 * tc_cfg<1, 3>::SMEM + 2048 <= 228 * 1024,
              "two blocks of v3 on one SM");

static int mt_index(int MT) {
    return MT == 1 ? 0 : MT == 2 ? 1 : 2;
}

/* variant: the decode variant whose kernel body runs the case */
static void run_case(const emu_case &ec, int variant) {
    const int H = ec.H, ns = (int)ec.nq.size(), bs = ec.bs, RT = 16 * ec.MT;
    const int qw = 128 + TC_R;
    /* batch layout and scrambled blocks */
    std::vector<int32_t> start(ns + 1), pos;
    int max_blocks = 1, n_blocks = 2, qmax = 0;
    for (int s = 0; s < ns; s++) {
        start[s] = (int)pos.size();
        for (int i = 0; i < ec.nq[s]; i++) pos.push_back(ec.ctx[s] - ec.nq[s] + i);
        int nb = (ec.ctx[s] + bs - 1) / bs;
        max_blocks = nb > max_blocks ? nb : max_blocks;
        n_blocks += nb;
        if (ec.nq[s] <= 8 && ec.nq[s] > qmax) qmax = ec.nq[s];
    }
    start[ns] = (int)pos.size();
    const int T = (int)pos.size();
    std::vector<int32_t> table = scrambled_table(ec.ctx, bs, n_blocks, max_blocks, 0);

    size_t cache_n = (size_t)n_blocks * ec.n_layers * bs * TC_D;
    std::vector<__nv_bfloat16> cache(cache_n), qlat((size_t)T * H * TC_L), q((size_t)T * H * qw),
        olat((size_t)T * H * TC_L, nan_bf());
    fill_bf(cache, 1.0f);
    fill_bf(qlat, 3.0f);
    fill_bf(q, 1.0f);
    const int n_groups = (qmax * H + RT - 1) / RT, rows_pad = n_groups * RT;
    const size_t part_rows = (size_t)ns * ec.n_split * rows_pad;
    std::vector<float> opart(part_rows * TC_L, NAN), lse(part_rows, NAN);
    const float scale = 1.0f / sqrtf(192.0f);

    tc_args &a = g_args;
    a.qlat = qlat.data();
    a.q = q.data();
    a.cache = cache.data();
    a.start = start.data();
    a.pos = pos.data();
    a.table = table.data();
    a.opart = opart.data();
    a.lse = lse.data();
    a.olat = olat.data();
    a.H = H;
    a.qw = qw;
    a.nope = 128;
    a.n_layers = ec.n_layers;
    a.bs = bs;
    a.max_blocks = max_blocks;
    a.n_blocks = n_blocks;
    a.layer = ec.layer;
    a.n_split = ec.n_split;
    a.n_groups = n_groups;
    a.max_q = 8;
    a.scale_log2 = scale * 1.4426950408889634f;
    g_readable = {{(const char *)cache.data(), (const char *)(cache.data() + cache.size())},
                  {(const char *)qlat.data(), (const char *)(qlat.data() + qlat.size())},
                  {(const char *)q.data(), (const char *)(q.data() + q.size())}};

    const emu_kernel &k = k_emu[mt_index(ec.MT)][variant];
    g_smem_bytes = k.smem;
    for (int b = 0; b < ns * ec.n_split * n_groups; b++) {
        memset(g_smem, 0xff, g_smem_bytes); /* NaN in bf16 and float */
        g_block = b;
        run_block(k.body);
    }
    if (ec.n_split > 1) {
        g_cargs = {opart.data(), lse.data(), olat.data(), start.data(), H, ec.n_split, rows_pad, 8};
        for (g_seq = 0; g_seq < ns; g_seq++)
            for (g_row = 0; g_row < rows_pad; g_row++)
                for (int tid = 0; tid < TC_COMBINE_THREADS; tid++)
                    tc_combine(g_cargs, tid, g_row, g_seq);
    }

    /* float64 reference over the same bf16 inputs */
    ref_check rc;
    std::vector<double> sc, o(TC_L);
    for (int s = 0; s < ns; s++) {
        bool absorbed = ec.nq[s] >= 1 && ec.nq[s] <= 8;
        for (int i = 0; i < ec.nq[s]; i++) {
            int t = start[s] + i, upto = pos[t] + 1;
            for (int h = 0; h < H; h++) {
                const __nv_bfloat16 *got = &olat[((size_t)t * H + h) * TC_L];
                if (!absorbed) {
                    rc.untouched(got, TC_L);
                    continue;
                }
                const __nv_bfloat16 *ql = &qlat[((size_t)t * H + h) * TC_L];
                const __nv_bfloat16 *qr = &q[((size_t)t * H + h) * qw + 128];
                sc.assign(upto, 0.0);
                for (int j = 0; j < upto; j++) {
                    int blk = table[(size_t)s * max_blocks + j / bs];
                    const __nv_bfloat16 *row =
                        &cache[(((size_t)blk * ec.n_layers + ec.layer) * bs + j % bs) * TC_D];
                    double d = 0;
                    for (int e = 0; e < TC_L; e++)
                        d += (double)__bfloat162float(ql[e]) * __bfloat162float(row[e]);
                    for (int e = 0; e < TC_R; e++)
                        d += (double)__bfloat162float(qr[e]) * __bfloat162float(row[TC_L + e]);
                    sc[j] = d * scale;
                }
                double sum = exp_scores(sc, upto);
                std::fill(o.begin(), o.end(), 0.0);
                for (int j = 0; j < upto; j++) {
                    int blk = table[(size_t)s * max_blocks + j / bs];
                    const __nv_bfloat16 *row =
                        &cache[(((size_t)blk * ec.n_layers + ec.layer) * bs + j % bs) * TC_D];
                    for (int e = 0; e < TC_L; e++) o[e] += sc[j] / sum * __bfloat162float(row[e]);
                }
                rc.row(got, o, TC_L);
            }
        }
    }
    char name[96];
    snprintf(name, sizeof name, "v%d %s", variant, ec.name);
    rc.verdict(name);
}

/* ---- the prefill kernel (mla-prefill.cuh) ---- */

struct fp_case {
    const char *name;
    int H, bs, n_layers, layer, extra_blocks;
    std::vector<int> nq, ctx; /* per sequence: the chunk's tokens, context after it */
};

static fp_args g_fargs;
static void fp_body(int tid) {
    fp_block(g_fargs, g_smem, tid, g_block);
}

static void run_fp_case(const fp_case &fc) {
    const int H = fc.H, ns = (int)fc.nq.size(), bs = fc.bs, kv_dim = TC_D, L = TC_L;
    const int qw = FP_QK, kvw = H * FP_HW;
    /* a decode token before the chunks (the kernel must leave its rows alone) */
    std::vector<int32_t> pos(1, 7), t0(ns), kvx_row(ns);
    int max_blocks = 1, n_blocks = 2, rows = 5; /* kvx starts 5 rows in */
    for (int s = 0; s < ns; s++) {
        t0[s] = (int)pos.size();
        for (int i = 0; i < fc.nq[s]; i++) pos.push_back(fc.ctx[s] - fc.nq[s] + i);
        int nb = (fc.ctx[s] + bs - 1) / bs;
        max_blocks = nb > max_blocks ? nb : max_blocks;
        n_blocks += nb;
        kvx_row[s] = rows;
        rows += fc.ctx[s] + 3;
    }
    const int T = (int)pos.size();
    /* table row 0 is the decode sequence's; the chunks' rows follow */
    std::vector<int32_t> table = scrambled_table(fc.ctx, bs, n_blocks, max_blocks, 1);

    std::vector<__nv_bfloat16> cache((size_t)n_blocks * fc.n_layers * bs * kv_dim),
        kvx((size_t)rows * kvw), q((size_t)T * H * qw), out((size_t)T * H * FP_V, nan_bf());
    fill_bf(cache, 1.0f);
    fill_bf(kvx, 1.0f);
    fill_bf(q, 1.5f);
    const float scale = 1.0f / sqrtf(192.0f);

    fp_args &a = g_fargs;
    a = fp_args{};
    a.q = q.data();
    a.kvx = kvx.data();
    a.cache = cache.data();
    a.pos = pos.data();
    a.table = table.data();
    a.out = out.data();
    a.n_seqs = ns;
    for (int s = 0; s < ns; s++) {
        a.seq[s] = s + 1;
        a.t0[s] = t0[s];
        a.nq[s] = fc.nq[s];
        a.ctx[s] = fc.ctx[s];
        a.kvx_row[s] = kvx_row[s];
    }
    a.H = H;
    a.qw = qw;
    a.L = L;
    a.kv_dim = kv_dim;
    a.n_layers = fc.n_layers;
    a.bs = bs;
    a.max_blocks = max_blocks;
    a.n_blocks = n_blocks;
    a.layer = fc.layer;
    a.scale_log2 = scale * 1.4426950408889634f;
    g_readable = {{(const char *)cache.data(), (const char *)(cache.data() + cache.size())},
                  {(const char *)kvx.data(), (const char *)(kvx.data() + kvx.size())},
                  {(const char *)q.data(), (const char *)(q.data() + q.size())}};
    g_smem_bytes = FP_SMEM;
    const int n_launch = (fp_tiles(a) + fc.extra_blocks) * H;
    for (int b = 0; b < n_launch; b++) {
        memset(g_smem, 0xff, g_smem_bytes);
        g_block = b;
        run_block(fp_body);
    }

    ref_check rc;
    rc.untouched(out.data(), H * FP_V); /* token 0 */
    std::vector<double> sc, o(FP_V);
    for (int s = 0; s < ns; s++) {
        for (int i = 0; i < fc.nq[s]; i++) {
            const int t = t0[s] + i, upto = pos[t] + 1;
            for (int h = 0; h < H; h++) {
                const __nv_bfloat16 *qh = &q[((size_t)t * H + h) * qw];
                sc.assign(upto, 0.0);
                for (int j = 0; j < upto; j++) {
                    const __nv_bfloat16 *kn = &kvx[(size_t)(kvx_row[s] + j) * kvw + h * FP_HW];
                    int blk = table[(size_t)(s + 1) * max_blocks + j / bs];
                    const __nv_bfloat16 *kr =
                        &cache[(((size_t)blk * fc.n_layers + fc.layer) * bs + j % bs) * kv_dim + L];
                    double d = 0;
                    for (int e = 0; e < FP_NOPE; e++)
                        d += (double)__bfloat162float(qh[e]) * __bfloat162float(kn[e]);
                    for (int e = 0; e < FP_R; e++)
                        d += (double)__bfloat162float(qh[FP_NOPE + e]) * __bfloat162float(kr[e]);
                    sc[j] = d * scale;
                }
                double sum = exp_scores(sc, upto);
                std::fill(o.begin(), o.end(), 0.0);
                for (int j = 0; j < upto; j++) {
                    const __nv_bfloat16 *vv =
                        &kvx[(size_t)(kvx_row[s] + j) * kvw + h * FP_HW + FP_NOPE];
                    for (int e = 0; e < FP_V; e++) o[e] += sc[j] / sum * __bfloat162float(vv[e]);
                }
                rc.row(&out[((size_t)t * H + h) * FP_V], o, FP_V);
            }
        }
    }
    rc.verdict(fc.name);
}

/* Which MT a variant's kernel body runs: tc_canon(v, MT) == v (the others run a lower
 * variant's body, tested under that variant). */
static bool variant_has(int v, int MT) {
    return MT == 1 ? tc_canon(v, 1) == v : MT == 2 ? tc_canon(v, 2) == v : tc_canon(v, 4) == v;
}

int main(int argc, char **argv) {
    int v_lo = 0, v_hi = TC_N_VARIANTS - 1;
    if (argc > 1) {
        char *end = NULL;
        long v = strtol(argv[1], &end, 10);
        if (*end || v < 0 || v >= TC_N_VARIANTS) {
            fprintf(stderr, "usage: test_mla_tc_emu [variant 0 .. %d]\n", TC_N_VARIANTS - 1);
            return 2;
        }
        v_lo = v_hi = (int)v;
    }
    size_t most = FP_SMEM;
    for (int m = 0; m < 3; m++)
        for (int v = 0; v < TC_N_VARIANTS; v++)
            most = k_emu[m][v].smem > most ? k_emu[m][v].smem : most;
    g_stacks = (char *)malloc((size_t)N_THREADS * STACK);
    g_smem = (unsigned char *)malloc(most);
    if (!g_stacks || !g_smem) return 1;
    const emu_case cases[] = {
        /* 16 heads, one row: 16-row blocks, Q in registers; direct write and split + combine;
         * an empty sequence and a prompt chunk (left to the expanded form) among them */
        {"16 heads, 1 row, 1 split", 16, 1, 1, 64, 1, 0, {1, 1, 1, 1}, {1, 17, 100, 300}},
        {"16 heads, 1 row, 3 splits, empty + chunk",
         16,
         1,
         3,
         64,
         2,
         1,
         {1, 0, 12, 1, 1},
         {33, 5, 40, 130, 64}},
        /* pages of 16 inside every tile; 5 splits of a short context: splits with a partial
         * tile, splits with none (a 64-position tile makes more of them empty) */
        {"16 heads, 1 row, 5 splits, bs 16", 16, 1, 5, 16, 1, 0, {1, 1, 1}, {65, 200, 7}},
        /* 2 rows of 16 heads: 32-row blocks; 16-position blocks, tiles straddle them */
        {"16 heads, 2 rows, 2 splits, bs 16", 16, 2, 2, 16, 1, 0, {2, 2, 1}, {2, 40, 129}},
        /* 3 rows: 48 of 64 rows used */
        {"16 heads, 3 rows, 4 splits", 16, 4, 4, 64, 1, 0, {3, 3, 3}, {3, 70, 200}},
        /* MLA_ABS_MAX_Q = 8 rows of 16 heads: two 64-row groups */
        {"16 heads, 8 rows, 2 splits, bs 32", 16, 4, 2, 32, 1, 0, {8, 1}, {140, 9}},
        /* 128 heads: two 64-row groups per sequence */
        {"128 heads, 1 row, 2 splits", 128, 4, 2, 64, 1, 0, {1, 1, 1}, {1, 65, 150}},
        /* 32 heads x 3 rows = 96 rows: the second group half used */
        {"32 heads, 3 rows, 1 split", 32, 4, 1, 32, 2, 0, {3, 2}, {5, 90}},
    };
    for (int v = v_lo; v <= v_hi; v++) {
        printf("tensor-core MLA decode kernels, variant %d, emulated on the CPU:\n", v);
        int ran = 0;
        for (const emu_case &ec : cases)
            if (variant_has(v, ec.MT)) {
                run_case(ec, v);
                ran++;
            }
        EXPECT(ran > 0, "variant %d has no kernel of its own", v);
    }
    if (v_lo != 0) {
        free(g_stacks);
        free(g_smem);
        printf("%s\n", g_failures ? "FAIL" : "PASS");
        return g_failures ? 1 : 0;
    }
    printf("tensor-core MLA prefill kernel, emulated on the CPU:\n");
    /* one partial query tile, one partial position tile */
    run_fp_case({"2 heads, one chunk of 20", 2, 16, 1, 0, 0, {20}, {20}});
    /* two query tiles (the second with 2 rows); a chunk after a 260-position prefix (chunked
     * prefill); a 9-token prompt; 2 layers, the second; blocks past the launch's tiles */
    run_fp_case({"3 heads, 130 + chunk after prefix + 9, layer 1",
                 3,
                 64,
                 2,
                 1,
                 2,
                 {130, 40, 9},
                 {130, 300, 9}});
    /* positions cross 16-position pages inside every tile; a second tile of 128 rows whose
     * warps see different numbers of tiles */
    run_fp_case({"1 head, 256 after 100, pages of 16", 1, 16, 1, 0, 0, {256}, {356}});
    free(g_stacks);
    free(g_smem);
    printf("%s\n", g_failures ? "FAIL" : "PASS");
    return g_failures ? 1 : 0;
}
