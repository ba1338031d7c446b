/* The memory plan (model/memplan.h) on DeepSeek-V3's and DeepSeek-V2-Lite's published
 * config.json (tests/data): the layouts fit or are refused naming what does not fit, with
 * byte counts worked out by hand in the comments; bad inputs get one clear line; the KV cache
 * after loading follows the instance's own memory, whatever a neighbour on the device loads
 * meanwhile (and the device's readings where the backend does not count); and the plan's weights
 * and load-time buffers equal what mdl_load really creates, counted through a backend that wraps
 * the CPU one, on every layout (TP, EP, TP x EP) of a V3-shaped and a V2-shaped model. An instance
 * refuses a layout that does not fit before it loads a single weight. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "base/log.h"
#include "mkmodel.h"
#include "model/backends/registry.h"
#include "model/memplan.h"
#include "engine/parallel.h"
#include "model/model.h"
#include "testutil.h"

#define MIB  (1LL << 20)
#define GIB  (1LL << 30)
#define H200 (143771 * MIB) /* as nvidia-smi reports an H200 */
#define H100 (80 * GIB)

static cfg_model g_v3, g_lite;

static mplan_inputs inputs(int tp, int dp, bool ep, long long gpu, mplan_weight_format f) {
    mplan_inputs in;
    mplan_inputs_default(&in);
    in.tp = tp;
    in.dp = dp;
    in.ep = ep;
    in.gpus_per_node = 8;
    in.gpu_memory = gpu;
    in.weights = f;
    return in;
}

static bool plan(const cfg_model *c, const mplan_inputs *in, mplan *p) {
    char err[512] = "";
    duet_status st = mplan_compute(c, in, p, err, sizeof err);
    CHECK_MSG(st == DUET_OK, "%s", err);
    return st == DUET_OK;
}

static void check_has(const char *text, const char *want) {
    CHECK_MSG(strstr(text, want) != NULL, "expected \"%s\" in: %s", want, text);
}

/* DeepSeek-V3 on one node of 8 H200s, DP8 + EP8, FP8 weights (TP 1: every rank holds whole
 * attention, dense MLP and shared experts, and 256 / 8 = 32 routed experts per MoE layer).
 * By hand, fp8(o, i) = o * i + 4 * ceil(o / 128) * ceil(i / 128) bytes:
 *   attention per layer: q_a fp8(1536, 7168) = 11,010,048 + 2,688; q_b fp8(128 * 192, 1536) =
 *     37,748,736 + 9,216; kv_a fp8(576, 7168) = 4,128,768 + 1,120; kv_b bf16 (the MLA kernels
 *     read it as bf16) 128 * 256 * 512 * 2 = 33,554,432; o fp8(7168, 16384) = 117,440,512 +
 *     28,672: 203,924,192; x 61 layers = 12,439,375,712
 *   dense MLP: 3 layers x (2 fp8(18432, 7168) + fp8(7168, 18432)) = 3 x 396,458,496
 *     = 1,189,375,488
 *   one expert: 3 x fp8(2048, 7168) (or transposed) = 3 x (14,680,064 + 3,584) = 44,050,944;
 *     routed: 32 x 58 MoE layers x 44,050,944 = 81,758,552,064; shared: 58 x 44,050,944 =
 *     2,554,954,752
 *   embedding + lm_head: 2 x 129,280 x 7168 x 2 (bf16) = 3,706,716,160
 *   norms and router, float32: 61 x (2 x 7168 + 1536 + 512) + 7168 = 1,006,592 floats, and
 *     58 x (256 x 7168 + 256) = 106,445,312 router floats: 4 x 107,451,904 = 429,807,616 bytes
 *   total 102,078,781,792 bytes = 95.1 GiB; tensors: 3 + 61 x 9 + 3 x 3 + 58 x 101 = 6,419 */
static void test_v3_8xh200_dp8_ep8_fp8(void) {
    mplan_inputs in = inputs(1, 8, true, H200, MPLAN_WEIGHTS_FP8);
    in.model_name = "DeepSeek-V3";
    mplan p;
    if (!plan(&g_v3, &in, &p)) return;
    CHECK_EQ_INT(p.ep_size, 8);
    CHECK_EQ_INT(p.shard.n_local_experts, 32);
    CHECK_EQ_INT(p.w.bytes[MPLAN_ATTENTION], 12439375712LL);
    CHECK_EQ_INT(p.w.bytes[MPLAN_DENSE_MLP], 1189375488LL);
    CHECK_EQ_INT(p.w.bytes[MPLAN_ROUTED_EXPERTS], 81758552064LL);
    CHECK_EQ_INT(p.w.bytes[MPLAN_SHARED_EXPERTS], 2554954752LL);
    CHECK_EQ_INT(p.w.bytes[MPLAN_EMBED_HEAD], 3706716160LL);
    CHECK_EQ_INT(p.w.bytes[MPLAN_NORMS_ROUTER], 429807616LL);
    CHECK_EQ_INT(p.w.total, 102078781792LL);
    CHECK_EQ_INT(p.w.tensors, 6419);
    /* 61 layers x (512 + 64) x 2 bytes */
    CHECK_EQ_INT(p.kv_bytes_per_token, 70272);
    CHECK_EQ_INT(p.budget, (long long)(0.9 * (double)H200));
    CHECK_MSG(p.fits, "%s", p.verdict);
    CHECK(p.kv_budget == p.budget - p.w.total - p.act_total);
    /* well over one sequence of the default max_model_len 8192 */
    CHECK(p.kv_tokens >= 8 * 8192);
    check_has(p.verdict, "KV cache: ");
}

/* --kv-cache-dtype fp8 on the same layout: 61 x 576 bytes a token, and with the CUDA backend's
 * decoded layer (one layer of 576 bf16 values a token) 35,136 + 1,152 = 36,288; the tokens
 * follow: about 70272 / 36288 = 1.94 times bf16's */
static void test_v3_kv_fp8(void) {
    mplan_inputs in = inputs(1, 8, true, H200, MPLAN_WEIGHTS_FP8);
    mplan bf, f8, f8d;
    if (!plan(&g_v3, &in, &bf)) return;
    in.kv_dtype = DT_F8_E4M3;
    if (!plan(&g_v3, &in, &f8)) return;
    in.kv_decoded_layer = true;
    if (!plan(&g_v3, &in, &f8d)) return;
    CHECK_EQ_INT(f8.kv_bytes_per_token, 35136);
    CHECK_EQ_INT(f8d.kv_bytes_per_token, 36288);
    CHECK(f8.kv_budget == bf.kv_budget && f8d.kv_budget == bf.kv_budget);
    CHECK(f8.kv_blocks >= 2 * bf.kv_blocks && f8.kv_blocks <= 2 * bf.kv_blocks + 2);
    CHECK(f8d.kv_blocks < f8.kv_blocks && f8d.kv_blocks >= bf.kv_blocks * 70272 / 36288 - 1);
    /* bf16 caches keep no decoded layer, whatever the backend says */
    in.kv_dtype = DT_BF16;
    mplan b2;
    if (!plan(&g_v3, &in, &b2)) return;
    CHECK_EQ_INT(b2.kv_bytes_per_token, 70272);
}

/* The same on 8 H100s: 95.1 GiB of weights per rank cannot fit 0.9 x 80 GiB = 72 GiB. */
static void test_v3_8xh100_refused(void) {
    mplan_inputs in = inputs(1, 8, true, H100, MPLAN_WEIGHTS_FP8);
    in.model_name = "DeepSeek-V3";
    mplan p;
    if (!plan(&g_v3, &in, &p)) return;
    CHECK(!p.fits);
    CHECK_EQ_INT(p.kv_blocks, 0);
    check_has(p.verdict, "DeepSeek-V3 on 8 GPUs of 80.0 GiB with DP8+EP8: 95.1 GiB of weights "
                         "per rank exceed 72.0 GiB (0.90 of 80.0 GiB)");
}

/* Two nodes of 8 H100s, DP16 + EP16: 16 routed experts per layer. By hand: routed 16 x 58 x
 * 44,050,944 = 40,879,276,032, the rest as on 8 GPUs: 61,199,505,760 bytes = 57.0 GiB. */
static void test_v3_16xh100_dp16_ep16_fp8(void) {
    mplan_inputs in = inputs(1, 16, true, H100, MPLAN_WEIGHTS_FP8);
    mplan p;
    if (!plan(&g_v3, &in, &p)) return;
    CHECK_EQ_INT(p.nodes, 2);
    CHECK_EQ_INT(p.w.bytes[MPLAN_ROUTED_EXPERTS], 40879276032LL);
    CHECK_EQ_INT(p.w.total, 61199505760LL);
    CHECK_MSG(p.fits, "%s", p.verdict);
    CHECK(p.act_ep > 0);
}

/* bf16 weights (FP8 dequantized at load) on 8 H200s: by hand 2 bytes per element
 *   attention 61 x 2 x 187,105,280 = 22,826,844,160; dense 3 x 2 x 396,361,728 = 2,378,170,368;
 *   experts (32 + 1) x 58 x 2 x 44,040,192 = 168,585,854,976; embedding 3,706,716,160; norms
 *   and router 429,807,616: 197,927,393,280 bytes = 184.3 GiB > 126.4 GiB. */
static void test_v3_bf16_refused(void) {
    /* the loader keeps an FP8 checkpoint FP8 with bf16 activations, dequantizes for float32 */
    CHECK_EQ_INT(mplan_weight_format_auto(&g_v3, DT_BF16), MPLAN_WEIGHTS_FP8);
    CHECK_EQ_INT(mplan_weight_format_auto(&g_v3, DT_F32), MPLAN_WEIGHTS_F32);
    CHECK_EQ_INT(mplan_weight_format_auto(&g_lite, DT_BF16), MPLAN_WEIGHTS_BF16);
    mplan_inputs in = inputs(1, 8, true, H200, MPLAN_WEIGHTS_BF16);
    mplan p;
    if (!plan(&g_v3, &in, &p)) return;
    CHECK_EQ_INT(p.w.total, 197927393280LL);
    CHECK(!p.fits);
    check_has(p.verdict, "184.3 GiB of weights per rank exceed 126.4 GiB (0.90 of 140.4 GiB)");
}

/* DeepSeek-V2-Lite (bf16 checkpoint) on one H200 with the worker's defaults (2048 batched
 * tokens, 256 sequences, max_model_len 8192, blocks of 64, graphs on). By hand:
 *   weights, bf16: attention 27 x 2 x (3072 x 2048 + 576 x 2048 + 4096 x 512 + 2048 x 2048) =
 *     743,178,240; dense 2 x 3 x 10944 x 2048 = 134,479,872; routed 26 x 64 x 2 x 3 x 1408 x
 *     2048 = 28,789,702,656; shared 26 x 2 x 3 x 2816 x 2048 = 899,678,208; embedding + lm_head
 *     2 x 2 x 102400 x 2048 = 838,860,800; norms and router 4 x (27 x (2 x 2048 + 512) + 2048 +
 *     26 x 64 x 2048) = 14,137,344: total 31,420,037,120
 *   model buffers, bf16, T = 2048 tokens, I = max(10944, 2816, 1408): T x (4 x 2048 + 1 +
 *     16 x 192 + 576 + 16 x 128 + 3 x 10944) = 95,684,608 elements, plus 256 logits rows x
 *     102400: 121,899,008 elements = 243,798,016 bytes
 *   scratch: max(MLA 8192 x (512 + 16 x 256) x 2 = 75,497,472; experts 2048 x 6 slots x
 *     (2 x 2048 + 3 x 1408) x 2 = 204,472,320; sampling 256 x 102400 x 4 + 256 x 64 =
 *     104,873,984) = 204,472,320; routing 2048 x (64 + 12) x 4 = 622,592; router input 2048 x
 *     2048 x 4 = 16,777,216; logits download 256 x 102400 x 4 = 104,857,600; indices 3 x 12288
 *     x 4 = 147,456; sum 326,877,184 x 1.5 = 490,315,776
 *   fixed: cuBLAS 33,554,432 + step metadata 2 x (3 x 2048 + 256 + 2 x 256 + 1 + 256 x 128) x 4
 *     = 317,448 + graphs 268,435,456 = 302,307,336
 *   activations 1,036,421,128; budget 0.9 x 143771 MiB = 135,679,338,086; left for the KV
 *   cache 135,679,338,086 - 31,420,037,120 - 1,036,421,128 = 103,222,879,838; a block is
 *   27 x 576 x 2 x 64 = 1,990,656 bytes: 51,853 whole blocks, less the padding block = 51,852
 *   blocks = 3,318,528 tokens. */
static void test_v2_lite_1xh200(void) {
    mplan_inputs in = inputs(1, 1, false, H200, mplan_weight_format_auto(&g_lite, DT_BF16));
    mplan p;
    if (!plan(&g_lite, &in, &p)) return;
    CHECK_EQ_INT(p.in.max_model_len, 8192);
    CHECK_EQ_INT(p.w.total, 31420037120LL);
    CHECK_EQ_INT(p.act_model, 243798016LL);
    CHECK_EQ_INT(p.act_scratch, 490315776LL);
    CHECK_EQ_INT(p.act_fixed, 302307336LL);
    CHECK_EQ_INT(p.act_ep, 0);
    CHECK_EQ_INT(p.kv_bytes_per_token, 31104);
    CHECK_EQ_INT(p.kv_blocks, 51852);
    CHECK_EQ_INT(p.kv_tokens, 3318528);
    CHECK_MSG(p.fits, "%s", p.verdict);
    check_has(p.verdict, "KV cache: 51852 blocks = 3318528 tokens");
}

/* What does not fit besides the weights: activations of a long context, and a KV cache too
 * small for one sequence of max_model_len. */
static void test_other_refusals(void) {
    mplan p;
    /* V3 over 16 H100s with max_model_len 163840: the expanded MLA of a prompt chunk needs
     * 163840 x (512 + 128 x 256) x 2 x 1.5 bytes = 15.2 GiB of scratch on top of 57 GiB */
    mplan_inputs in = inputs(1, 16, true, H100, MPLAN_WEIGHTS_FP8);
    in.max_model_len = 163840;
    if (plan(&g_v3, &in, &p)) {
        CHECK(!p.fits);
        check_has(p.verdict, "57.0 GiB of weights and ");
        check_has(p.verdict, "GiB of activations per rank exceed 72.0 GiB");
    }
    /* V2-Lite with its whole 163840 context on a 40 GiB device: 36 GiB less 29.3 GiB of
     * weights and 2.6 GiB of activations leaves ~4 GiB, one sequence needs 163840 x 31104
     * bytes = 4.7 GiB */
    in = inputs(1, 1, false, 40 * GIB, MPLAN_WEIGHTS_BF16);
    in.max_model_len = 163840;
    if (plan(&g_lite, &in, &p)) {
        CHECK(!p.fits);
        check_has(p.verdict, "no room for one sequence of max_model_len 163840");
        CHECK(p.kv_tokens < 163840 && p.kv_budget > 0);
    }
    /* a fixed --kv-cache-memory: the whole device is the budget, the cache is what was asked */
    in = inputs(1, 1, false, H200, MPLAN_WEIGHTS_BF16);
    in.kv_cache_memory = 10 * GIB;
    if (plan(&g_lite, &in, &p)) {
        CHECK_EQ_INT(p.budget, H200);
        /* the workers ask for that many blocks, the backend's padding block on top */
        CHECK_EQ_INT(p.kv_blocks, 10 * GIB / 1990656);
        CHECK(p.fits);
    }
}

/* Bad inputs: one line saying which, and the plan left alone. */
static void expect_invalid(const cfg_model *c, const mplan_inputs *in, const char *want) {
    mplan p;
    memset(&p, 0x5a, sizeof p);
    char err[512] = "";
    duet_status st = mplan_compute(c, in, &p, err, sizeof err);
    CHECK_EQ_INT(st, DUET_ERR_INVALID);
    check_has(err, want);
    CHECK(strchr(err, '\n') == NULL);
    CHECK(((unsigned char *)&p)[0] == 0x5a && ((unsigned char *)&p)[sizeof p - 1] == 0x5a);
}

static void test_bad_inputs(void) {
    mplan_inputs in = inputs(1, 8, true, H200, MPLAN_WEIGHTS_FP8);
    in.gpu_memory_utilization = 0;
    expect_invalid(&g_v3, &in,
                   "--gpu-memory-utilization must be a fraction of the device's "
                   "memory in (0, 1], got 0");
    in.gpu_memory_utilization = 1.2;
    expect_invalid(&g_v3, &in, "got 1.2");
    in.gpu_memory_utilization = -0.5;
    expect_invalid(&g_v3, &in, "got -0.5");
    in.gpu_memory_utilization = 1.0; /* the whole device is allowed */
    mplan p;
    CHECK(plan(&g_v3, &in, &p));

    in = inputs(3, 1, false, H200, MPLAN_WEIGHTS_FP8);
    expect_invalid(&g_v3, &in,
                   "config.json: num_attention_heads (128) is not divisible by "
                   "--tensor-parallel-size (3)");
    in = inputs(1, 3, true, H200, MPLAN_WEIGHTS_FP8);
    expect_invalid(&g_v3, &in,
                   "config.json: n_routed_experts (256) is not divisible by the expert-parallel "
                   "size (all ranks of the instance) (3)");
    in = inputs(2, 3, true, H200, MPLAN_WEIGHTS_FP8); /* EP over 6 ranks */
    expect_invalid(&g_v3, &in, "n_routed_experts (256) is not divisible");
    in = inputs(1, 3, false, H200, MPLAN_WEIGHTS_FP8); /* without EP nothing is split by DP */
    CHECK(plan(&g_v3, &in, &p));

    in = inputs(1, 1, false, H200, MPLAN_WEIGHTS_FP8);
    expect_invalid(&g_lite, &in, "fp8 weights need an FP8 checkpoint");
    in = inputs(1, 1, false, 0, MPLAN_WEIGHTS_BF16);
    expect_invalid(&g_lite, &in, "the device's memory must be known");
    in = inputs(1, 1, false, H200, MPLAN_WEIGHTS_BF16);
    in.max_model_len = 200000;
    expect_invalid(&g_lite, &in,
                   "--max-model-len 200000 is longer than the model's max_position_embeddings "
                   "(163840)");
    in.max_model_len = 0;
    in.block_size = 0;
    expect_invalid(&g_lite, &in, "--block-size (0) must be at least 1");
    in.block_size = 64;
    in.kv_dtype = DT_I32;
    expect_invalid(&g_lite, &in, "the KV cache can be bf16, fp8 or float32");
}

/* After loading: the KV cache is what the device has left of total x utilization. */
static void test_kv_after_load(void) {
    mplan_inputs in = inputs(1, 1, false, H200, MPLAN_WEIGHTS_BF16);
    mplan p;
    if (!plan(&g_lite, &in, &p)) return;
    char err[512] = "";
    long long want = (long long)(0.9 * (double)H200);
    /* the context took 600 MiB, loading took the planned weights and buffers and 200 MiB of
     * NCCL and allocator slack the plan does not know about */
    long long start = H200 - 600 * MIB - 32 * MIB;
    long long loaded = p.w.total + p.act_at_load + 200 * MIB;
    mplan_measured m = {.total = H200, .free_at_start = start, .free_after_load = start - loaded};
    long long kv = -1;
    CHECK_EQ_INT(mplan_kv_after_load(&p, &m, &kv, err, sizeof err), DUET_OK);
    /* everything the instance uses adds up to the utilization's share: what loading took, the
     * cuBLAS workspace taken before the first reading, what the first steps will take, the
     * padding block and the cache */
    CHECK_EQ_INT(kv + loaded + 32 * MIB + p.act_late + p.kv_block_bytes, want);
    /* 200 MiB of slack the estimate did not have: the cache is that much smaller */
    CHECK_EQ_INT(kv, p.kv_blocks * p.kv_block_bytes +
                         (p.kv_budget - (p.kv_blocks + 1) * p.kv_block_bytes) - 200 * MIB);

    /* another process holds half the device: refused, as vLLM refuses it */
    mplan_measured busy = {
        .total = H200, .free_at_start = H200 / 2, .free_after_load = H200 / 2 - loaded};
    CHECK_EQ_INT(mplan_kv_after_load(&p, &busy, &kv, err, sizeof err), DUET_ERR_NO_MEMORY);
    check_has(err, "less than --gpu-memory-utilization 0.90 asks for");
    check_has(err, "another process holds");
    CHECK_EQ_INT(mplan_check_start(&p, &busy, err, sizeof err), DUET_ERR_NO_MEMORY);
    CHECK_EQ_INT(mplan_check_start(&p, &m, err, sizeof err), DUET_OK);

    /* loading took far more than planned: no room left for one sequence */
    mplan_measured full = {.total = H200, .free_at_start = start, .free_after_load = 4 * GIB};
    CHECK_EQ_INT(mplan_kv_after_load(&p, &full, &kv, err, sizeof err), DUET_ERR_NO_MEMORY);
    check_has(err, "no room for one sequence of max_model_len 8192");

    /* a fixed cache that fits is taken as asked; one that does not is refused */
    in.kv_cache_memory = 20 * GIB;
    if (!plan(&g_lite, &in, &p)) return;
    CHECK_EQ_INT(mplan_kv_after_load(&p, &m, &kv, err, sizeof err), DUET_OK);
    CHECK_EQ_INT(kv, 20 * GIB);
    in.kv_cache_memory = 120 * GIB;
    if (!plan(&g_lite, &in, &p)) return;
    CHECK_EQ_INT(mplan_kv_after_load(&p, &m, &kv, err, sizeof err), DUET_ERR_NO_MEMORY);
    check_has(err, "--kv-cache-memory 120.0 GiB does not fit");
}

/* Two instances of V2-Lite on one H200 at 0.45 each, started at the same moment (the bug
 * docs/memory.md used to carry: each measured its load as the device's free memory before
 * minus after, so the other's load counted against it). With the backend's count of its own
 * allocations, what a neighbour loads meanwhile leaves this instance's KV cache as it is
 * while the device has room; a neighbour that takes more than the rest of the device
 * shrinks it, said in a warning, or refuses it, naming both numbers. */
static void test_kv_neighbours(void) {
    mplan_inputs in = inputs(1, 1, false, H200, MPLAN_WEIGHTS_BF16);
    in.gpu_memory_utilization = 0.45;
    mplan p;
    if (!plan(&g_lite, &in, &p)) return;
    char err[512] = "";
    long long want = (long long)(0.45 * (double)H200);
    const long long ctx = 600 * MIB, ws = 32 * MIB;
    /* after loading: the workspace, the weights, the buffers and 200 MiB the plan does not know */
    long long own = ws + p.w.total + p.act_at_load + 200 * MIB;
    mplan_measured alone = {.total = H200,
                            .free_at_start = H200 - ctx - ws,
                            .free_after_load = H200 - ctx - own,
                            .counted = true,
                            .own_at_start = ws,
                            .own_after_load = own,
                            .context = ctx};
    long long kv_alone = -1;
    CHECK_EQ_INT(mplan_kv_after_load(&p, &alone, &kv_alone, err, sizeof err), DUET_OK);
    CHECK_MSG(err[0] == '\0', "a warning alone on the device: %s", err);
    /* the instance's own memory, its context, the first steps, the padding block and the cache
     * add up to its share */
    CHECK_EQ_INT(kv_alone + own + ctx + p.act_late + p.kv_block_bytes, want);
    /* by hand: 0.45 x 140.4 GiB = 63.2 GiB, less 29.3 GiB of weights, ~1.5 GiB of buffers,
     * workspace and slack, 0.6 GiB of context and the first steps' share: ~31 GiB */
    CHECK(kv_alone > 30 * GIB && kv_alone < 33 * GIB);

    /* the neighbour created its context just after this one's, and had loaded 20 GiB of its
     * weights when this one finished loading: the same cache */
    mplan_measured shared = alone;
    shared.free_at_start -= ctx + ws;
    shared.free_after_load -= ctx + ws + 20 * GIB;
    long long kv = -1;
    CHECK_EQ_INT(mplan_kv_after_load(&p, &shared, &kv, err, sizeof err), DUET_OK);
    CHECK_EQ_INT(kv, kv_alone);
    CHECK_MSG(err[0] == '\0', "a warning with a neighbour in its share: %s", err);
    /* the neighbour's readings, taken a moment later: it holds what this one does, the same
     * cache, and the two fit the device together */
    mplan_measured other = shared;
    other.free_after_load = H200 - 2 * (ctx + own);
    long long kv_other = -1;
    CHECK_EQ_INT(mplan_kv_after_load(&p, &other, &kv_other, err, sizeof err), DUET_OK);
    CHECK_EQ_INT(kv_other, kv_alone);
    CHECK(2 * (kv_alone + own + ctx + p.act_late + p.kv_block_bytes) <= H200);
    /* what the readings alone would have said (the old way): the neighbour's 20 GiB counted
     * against this instance */
    mplan_measured uncounted = shared;
    uncounted.counted = false;
    CHECK_EQ_INT(mplan_kv_after_load(&p, &uncounted, &kv, err, sizeof err), DUET_OK);
    CHECK(kv < kv_alone - 19 * GIB);

    /* the context reading caught the neighbour's weights too: taken as at most 1 GiB */
    mplan_measured early = shared;
    early.context = ctx + 20 * GIB;
    CHECK_EQ_INT(mplan_kv_after_load(&p, &early, &kv, err, sizeof err), DUET_OK);
    CHECK_EQ_INT(kv, kv_alone - (MPLAN_CONTEXT_MAX - ctx));

    /* the neighbour took 90 GiB, more than the 0.55 of the device this one leaves: the cache
     * takes what is free, and a warning names both numbers */
    mplan_measured greedy = alone;
    greedy.free_after_load -= 90 * GIB;
    CHECK_EQ_INT(mplan_kv_after_load(&p, &greedy, &kv, err, sizeof err), DUET_OK);
    CHECK_EQ_INT(kv, greedy.free_after_load - p.act_late - p.kv_block_bytes);
    CHECK(kv < kv_alone);
    check_has(err, "--gpu-memory-utilization 0.45 leaves ");
    check_has(err, "other processes hold 90.0 GiB");
    check_has(err, "the KV cache takes the ");
    /* ... and left less than one sequence: refused, naming both numbers */
    greedy.free_after_load = p.act_late + 100 * MIB;
    CHECK_EQ_INT(mplan_kv_after_load(&p, &greedy, &kv, err, sizeof err), DUET_ERR_NO_MEMORY);
    check_has(err, "no room for one sequence of max_model_len 8192: --gpu-memory-utilization "
                   "0.45 leaves ");
    check_has(err, "but the device has only ");

    /* at start another process holds 100 GiB: refused before loading, the number its own */
    mplan_measured busy = alone;
    busy.free_at_start -= 100 * GIB;
    CHECK_EQ_INT(mplan_check_start(&p, &busy, err, sizeof err), DUET_ERR_NO_MEMORY);
    check_has(err, "another process holds 100.0 GiB of it");
    CHECK_EQ_INT(mplan_check_start(&p, &shared, err, sizeof err), DUET_OK);

    /* --kv-cache-memory: taken as asked while the device has it free, refused when not */
    in.kv_cache_memory = 20 * GIB;
    if (!plan(&g_lite, &in, &p)) return;
    CHECK_EQ_INT(mplan_kv_after_load(&p, &shared, &kv, err, sizeof err), DUET_OK);
    CHECK_EQ_INT(kv, 20 * GIB);
    mplan_measured full = alone;
    full.free_after_load = 10 * GIB;
    CHECK_EQ_INT(mplan_kv_after_load(&p, &full, &kv, err, sizeof err), DUET_ERR_NO_MEMORY);
    check_has(err, "--kv-cache-memory 20.0 GiB does not fit: the device has 10.0 GiB free after "
                   "loading");
}

/* What mplan_print writes for p (heap text, or NULL without memory). */
static char *printed(const mplan *p) {
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) return NULL;
    mplan_print(p, f);
    fclose(f);
    return text;
}

static void test_print(void) {
    mplan_inputs in = inputs(1, 8, true, H200, MPLAN_WEIGHTS_FP8);
    in.model_name = "DeepSeek-V3";
    mplan p;
    if (!plan(&g_v3, &in, &p)) return;
    char *text = printed(&p);
    check_has(text, "Memory plan: DeepSeek-V3 on 8 GPUs of 140.4 GiB with DP8+EP8");
    check_has(text, "0.90 of 140.4 GiB = 126.4 GiB");
    check_has(text, "routed experts");
    check_has(text, "76.1 GiB   32 experts x 58 MoE layers");
    check_has(text, "95.1 GiB   6419 tensors");
    check_has(text, "EP staging");
    check_has(text, "fits: KV cache: ");
    free(text);
}

/* ---- MTP (--speculative-config) ---- */

/* DeepSeek-V3's MTP module (layer 61) as mdl_weights_load_mtp creates it, worked out from the
 * tensor shapes of DeepSeek's checkpoint; the loader keeps none of it FP8 (bf16, router and
 * norms float32). tp: heads 128 / tp, vocabulary 129280 / tp rows, shared expert 2048 / tp; ep:
 * 256 / ep whole experts, otherwise all 256 with their intermediate 2048 / tp. By hand:
 *   embed_tokens + shared_head.head: 2 x vocab_local x 7168 x 2
 *   enorm, hnorm, shared_head.norm: 3 x 7168 x 4 = 86,016
 *   eh_proj [7168, 14336]: 205,520,896
 *   layer norms 2 x 7168 x 4; q_a 1536 x 7168 x 2 + its norm 1536 x 4; q_b H x 192 x 1536 x 2;
 *     kv_a 576 x 7168 x 2 + its norm 512 x 4; kv_b H x 256 x 512 x 2; o 7168 x H x 128 x 2
 *   router gate 256 x 7168 x 4 + bias 256 x 4 = 7,341,056
 *   experts n x 3 x 7168 x inter x 2; shared expert 3 x 7168 x (2048 / tp) x 2
 * DP8+EP8 (tp 1): 3,706,716,160 + 86,016 + 205,520,896 + 374,276,096 (attention) + 7,341,056
 *   + 32 x 88,080,384 = 2,818,572,288 + 88,080,384 = 7,200,592,896 bytes, 117 tensors
 * TP8: 463,339,520 + 86,016 + 205,520,896 + 73,334,784 + 7,341,056 + 256 x 11,010,048 =
 *   2,818,572,288 + 11,010,048 = 3,579,204,608 bytes, 789 tensors */
static long long v3_mtp_bytes(int tp, int ep, long long *tensors_p) {
    const long long D = 7168, V = 129280, H = 128 / tp;
    long long vocab_local = (V + tp - 1) / tp;
    long long n_experts = ep > 1 ? 256 / ep : 256, inter = ep > 1 ? 2048 : 2048 / tp;
    long long attn = 2 * D * 4 + 1536 * D * 2 + 1536 * 4 + H * 192 * 1536 * 2 + 576 * D * 2 +
                     512 * 4 + H * 256 * 512 * 2 + D * H * 128 * 2;
    *tensors_p = 2 + 3 + 2 + 9 + 2 + 3 * n_experts + 3;
    return 2 * vocab_local * D * 2 + 3 * D * 4 + D * 2 * D * 2 + attn + 256 * D * 4 + 256 * 4 +
           n_experts * 3 * D * inter * 2 + 3 * D * (2048 / tp) * 2;
}

/* The module adds exactly its bytes to every rank, in DP8+EP8 and TP8 on 8 H200s (FP8), and the
 * KV cache one layer of 61: 62 / 61 the bytes per token. */
static void test_v3_mtp_weights_kv(void) {
    const int layouts[2][3] = {{1, 8, 1}, {8, 1, 0}}; /* tp, dp, ep */
    for (int i = 0; i < 2; i++) {
        int tp = layouts[i][0], dp = layouts[i][1];
        bool ep = layouts[i][2];
        mplan_inputs in = inputs(tp, dp, ep, H200, MPLAN_WEIGHTS_FP8);
        mplan p0, p1;
        if (!plan(&g_v3, &in, &p0)) return;
        in.spec_tokens = 1;
        if (!plan(&g_v3, &in, &p1)) return;
        long long tensors;
        long long want = v3_mtp_bytes(tp, ep ? tp * dp : 1, &tensors);
        CHECK_EQ_INT(want, i == 0 ? 7200592896LL : 3579204608LL);
        CHECK_EQ_INT(p0.w.bytes[MPLAN_MTP], 0);
        CHECK_EQ_INT(p1.w.bytes[MPLAN_MTP], want);
        CHECK_EQ_INT(p1.w.total - p0.w.total, want);
        CHECK_EQ_INT(p1.w.tensors - p0.w.tensors, tensors);
        for (int k = 0; k < MPLAN_KIND_COUNT; k++)
            if (k != MPLAN_MTP) CHECK_EQ_INT(p1.w.bytes[k], p0.w.bytes[k]);
        /* 61 layers x 576 x 2 = 70,272 bytes a token; with the module's layer 71,424 */
        CHECK_EQ_INT(p0.kv_bytes_per_token, 70272);
        CHECK_EQ_INT(p1.kv_bytes_per_token, 71424);
        CHECK_EQ_INT(p1.kv_bytes_per_token * 61, p0.kv_bytes_per_token * 62);
        CHECK_EQ_INT(p1.kv_layers, 62);
        CHECK_EQ_INT(p1.kv_block_bytes, 71424LL * 64);
        /* the verify step's rows: 256 sequences x 2 logits rows, and the drafting buffers */
        CHECK(p1.act_mtp > 0 && p0.act_mtp == 0);
        CHECK(p1.act_model > p0.act_model);
        CHECK(p1.act_total > p0.act_total + p1.act_mtp);
        CHECK(p1.act_at_load == p0.act_at_load + 2LL * 2048 * 7168 * 2); /* hid, mtp_prev */
        CHECK(p1.fits && p1.kv_blocks < p0.kv_blocks);
        /* the KV budget is what weights and activations leave, in blocks of 62 layers */
        CHECK_EQ_INT(p1.kv_budget, p1.budget - p1.w.total - p1.act_total);
        CHECK_EQ_INT(p1.kv_blocks, p1.kv_budget / p1.kv_block_bytes - 1);
    }
}

/* Layouts that fit without MTP and not with it: the module's weights, then its KV layer. */
static void test_v3_mtp_verdict(void) {
    mplan_inputs in = inputs(1, 8, true, H200, MPLAN_WEIGHTS_FP8);
    in.model_name = "DeepSeek-V3";
    mplan p0, p1;
    if (!plan(&g_v3, &in, &p0)) return;
    /* a device whose 0.9 holds the weights, the activations and two sequences of 8192 tokens
     * without MTP (two blocks more: the padding block and rounding); the module's 6.7 GiB do
     * not fit */
    long long need = 8192 / 64 * p0.kv_block_bytes;
    in.gpu_memory =
        (long long)((double)(p0.w.total + p0.act_total + 2 * need + 2 * p0.kv_block_bytes) / 0.9) +
        1;
    if (!plan(&g_v3, &in, &p0)) return;
    CHECK_MSG(p0.fits, "%s", p0.verdict);
    in.spec_tokens = 1;
    if (!plan(&g_v3, &in, &p1)) return;
    CHECK(!p1.fits);
    check_has(p1.verdict, "DeepSeek-V3 on 8 GPUs of 112.6 GiB");
    check_has(p1.verdict, "with DP8+EP8 and MTP (1 draft a step): 101.8 GiB of weights per rank "
                          "(the MTP module's 6.7 GiB included) exceed 101.4 GiB");
    /* a fixed cache of exactly one sequence of 8192 tokens without MTP: with the module's
     * layer the same bytes hold 61/62 of it */
    in = inputs(1, 8, true, H200, MPLAN_WEIGHTS_FP8);
    in.kv_cache_memory = need;
    if (!plan(&g_v3, &in, &p0)) return;
    CHECK_MSG(p0.fits && p0.kv_blocks == 128, "%lld blocks: %s", p0.kv_blocks, p0.verdict);
    in.spec_tokens = 3;
    if (!plan(&g_v3, &in, &p1)) return;
    CHECK(!p1.fits);
    CHECK_EQ_INT(p1.kv_blocks, need / (71424LL * 64)); /* 125 */
    check_has(p1.verdict, "no room for one sequence of max_model_len 8192");
    check_has(p1.verdict, "MTP (3 drafts a step)");
    /* no MTP layer in V2-Lite's checkpoint; a negative count */
    in = inputs(1, 1, false, H200, MPLAN_WEIGHTS_BF16);
    in.spec_tokens = 1;
    expect_invalid(&g_lite, &in, "num_nextn_predict_layers is 0: leave --speculative-config out");
    in.spec_tokens = -1;
    expect_invalid(&g_lite, &in, "num_speculative_tokens must not be negative");
}

static void test_mtp_print(void) {
    mplan_inputs in = inputs(1, 8, true, H200, MPLAN_WEIGHTS_FP8);
    in.model_name = "DeepSeek-V3";
    in.spec_tokens = 1;
    mplan p;
    if (!plan(&g_v3, &in, &p)) return;
    char *text = printed(&p);
    check_has(text, "with DP8+EP8 and MTP (1 draft a step)");
    check_has(text, "MTP module                6.7 GiB   layer 61, bf16: embedding + head 3.5 GiB, "
                    "eh_proj 196 MiB, layer + norms 3.1 GiB");
    check_has(text, "101.8 GiB   6536 tensors");
    check_has(text, "512 logits rows");
    check_has(text, "71424 bytes per token, blocks of 64 tokens, 62 layers with the MTP module's");
    free(text);
    /* without MTP no such line */
    in.spec_tokens = 0;
    if (!plan(&g_v3, &in, &p)) return;
    text = printed(&p);
    CHECK(text && !strstr(text, "MTP"));
    check_has(text, "61 layers):");
    free(text);
}

/* An instance with MTP plans what it loads: the module in the weights, its layer in the KV
 * cache's bytes per token (par_instance_create passes spec_tokens to the plan). */
static void test_instance_mtp(const char *dir) {
    par_options po;
    par_options_init(&po);
    po.max_tokens = 64;
    po.load_format = MDL_WEIGHTS_DUMMY;
    po.spec_tokens = 1;
    po.mem = (par_memory){.utilization = 0.9,
                          .max_model_len = 256,
                          .max_num_seqs = 16,
                          .block_size = 16,
                          .device_memory = 1LL << 40};
    int argc = 0;
    char **argv = NULL;
    par_instance *inst = NULL;
    CHECK(par_instance_create(&po, dir, &argc, &argv, &inst) == DUET_OK);
    const mplan *p = inst ? par_memory_plan(inst) : NULL;
    CHECK(p != NULL);
    if (p) {
        CHECK_EQ_INT(p->in.spec_tokens, 1);
        CHECK(p->w.bytes[MPLAN_MTP] > 0);
        CHECK_EQ_INT(p->kv_bytes_per_token, (long long)mdl_kv_bytes_per_token(par_model(inst)));
    }
    par_instance_destroy(inst);
}

/* ---- the plan against a real load ---- */

/* The CPU backend with every weight, vector and buffer it is asked for counted: a device
 * backend's view (on_device, so the TP logits gather is allocated as on a GPU). */
typedef struct counting {
    be_backend base;
    be_ops ops;
    be_backend *inner;
    long long f32_bytes;  /* weights and vectors as float32 (the CPU, --dtype float32) */
    long long bf16_bytes; /* as the CUDA backend keeps them with bf16 activations */
    long long buf_elems;  /* activation elements */
    int kv_layers, kv_block_size, kv_dim; /* of the last KV cache created */
} counting;

static counting *cnt(be_backend *be) {
    return (counting *)be;
}

static duet_status c_weight_create(be_backend *be, const float *w, int n_out, int n_in,
                                   bool keep_f32, be_weight **w_p) {
    counting *c = cnt(be);
    duet_status st = c->inner->ops->weight_create(c->inner, w, n_out, n_in, keep_f32, w_p);
    long long n = (long long)n_out * n_in;
    c->f32_bytes += 4 * n;
    c->bf16_bytes += (keep_f32 ? 4 : 2) * n;
    return st;
}

static void c_weight_destroy(be_backend *be, be_weight *w) {
    cnt(be)->inner->ops->weight_destroy(cnt(be)->inner, w);
}

static duet_status c_vec_create(be_backend *be, const float *v, int n, void **dev_p) {
    counting *c = cnt(be);
    c->f32_bytes += 4LL * n;
    c->bf16_bytes += 4LL * n;
    return c->inner->ops->vec_create(c->inner, v, n, dev_p);
}

static void *c_buf_alloc(be_backend *be, size_t n) {
    cnt(be)->buf_elems += (long long)n;
    return cnt(be)->inner->ops->buf_alloc(cnt(be)->inner, n);
}

static void c_buf_free(be_backend *be, void *buf) {
    cnt(be)->inner->ops->buf_free(cnt(be)->inner, buf);
}

static duet_status c_rope_setup(be_backend *be, const float *inv_freq, int half, float attn) {
    return cnt(be)->inner->ops->rope_setup(cnt(be)->inner, inv_freq, half, attn);
}

static duet_status c_kv_create(be_backend *be, int n_blocks, int n_layers, int block_size,
                               int kv_dim, dt_dtype dtype, be_kv **kv_p) {
    counting *c = cnt(be);
    c->kv_layers = n_layers;
    c->kv_block_size = block_size;
    c->kv_dim = kv_dim;
    return c->inner->ops->kv_create(c->inner, n_blocks, n_layers, block_size, kv_dim, dtype, kv_p);
}

static void c_kv_destroy(be_backend *be, be_kv *kv) {
    cnt(be)->inner->ops->kv_destroy(cnt(be)->inner, kv);
}

static void c_destroy(be_backend *be) {
    be_destroy(cnt(be)->inner);
    free(be);
}

static counting *counting_create(void) {
    counting *c = calloc(1, sizeof *c);
    if (!c || be_create("cpu", 0, &c->inner) != DUET_OK) {
        free(c);
        return NULL;
    }
    c->ops = (be_ops){.name = "counting",
                      .act_dtype = c->inner->ops->act_dtype,
                      .on_device = true,
                      .destroy = c_destroy,
                      .buf_alloc = c_buf_alloc,
                      .buf_free = c_buf_free,
                      .weight_create = c_weight_create,
                      .weight_destroy = c_weight_destroy,
                      .vec_create = c_vec_create,
                      .kv_create = c_kv_create,
                      .kv_destroy = c_kv_destroy,
                      .rope_setup = c_rope_setup};
    c->base.ops = &c->ops;
    return c;
}

/* Loads dir's dummy weights as rank (tp_rank, ep_rank) of tp x dp (EP over all when ep), with
 * the MTP module for spec > 0 drafts, and compares what was created with the plan of that
 * layout: weights, load-time buffers, and the KV cache's bytes per token and per block. */
static void compare_load(const char *what, const char *dir, int tp, int dp, bool ep, int tp_rank,
                         int ep_rank, int spec) {
    cfg_model c;
    if (cfg_load(dir, &c) != DUET_OK) {
        CHECK_MSG(0, "%s: config", what);
        return;
    }
    const int T = 48;
    mplan_inputs in = inputs(tp, dp, ep, 1LL << 40, MPLAN_WEIGHTS_F32);
    in.act_dtype = DT_F32;
    in.kv_dtype = DT_F32; /* the backends keep the cache in the activation type */
    in.max_num_batched_tokens = T;
    in.spec_tokens = spec;
    mplan p;
    if (!plan(&c, &in, &p)) return;
    counting *cb = counting_create();
    if (!cb) return;
    int ep_size = ep ? tp * dp : 1;
    mdl_shard shard = {.tp_rank = tp_rank, .tp_size = tp, .ep_rank = ep_rank, .ep_size = ep_size};
    mdl_load_opts lo = {
        .source = MDL_WEIGHTS_DUMMY, .dummy_seed = 1, .max_tokens = T, .spec_tokens = spec};
    mdl_model *m = NULL;
    duet_status st = mdl_load(dir, &cb->base, &shard, &lo, &m);
    CHECK_MSG(st == DUET_OK, "%s: load: %s", what, duet_strerror(st));
    if (st == DUET_OK) {
        CHECK_MSG(cb->f32_bytes == p.w.total, "%s: loaded %lld bytes of float32 weights, plan %lld",
                  what, cb->f32_bytes, p.w.total);
        /* bf16 storage, counted for this very rank's slices */
        mdl_plan pl;
        mplan_weights wb, wm = {0};
        if (mdl_shard_plan(&c, &shard, &pl) == DUET_OK &&
            mplan_weights_count(&c, &pl, MPLAN_WEIGHTS_BF16, DT_BF16, &wb) == DUET_OK &&
            (spec == 0 ||
             mplan_mtp_weights_count(&c, &pl, MPLAN_WEIGHTS_BF16, DT_BF16, &wm) == DUET_OK))
            CHECK_MSG(cb->bf16_bytes == wb.total + wm.total, "%s: bf16 %lld, plan %lld", what,
                      cb->bf16_bytes, wb.total + wm.total);
        else
            CHECK_MSG(0, "%s: bf16 count", what);
        CHECK_MSG(cb->buf_elems * 4 == p.act_at_load,
                  "%s: mdl_load allocated %lld bytes of activations, plan %lld", what,
                  cb->buf_elems * 4, p.act_at_load);
        CHECK(p.act_at_load <= p.act_model + p.act_mtp);
        CHECK_MSG(spec == 0 || p.w.bytes[MPLAN_MTP] > 0, "%s: no MTP module planned", what);
        /* the KV cache the model creates: as many layers and bytes per block as planned */
        CHECK_MSG((long long)mdl_kv_bytes_per_token(m) == p.kv_bytes_per_token,
                  "%s: the model's KV holds %zu bytes a token, plan %lld", what,
                  mdl_kv_bytes_per_token(m), p.kv_bytes_per_token);
        be_kv *kv = NULL;
        CHECK(mdl_kv_create(m, 4, in.block_size, &kv) == DUET_OK);
        CHECK_EQ_INT(cb->kv_layers, c.num_hidden_layers + (spec > 0));
        CHECK_MSG((long long)cb->kv_layers * cb->kv_block_size * cb->kv_dim * 4 == p.kv_block_bytes,
                  "%s: a KV block of %d layers x %d tokens x %d is not the plan's %lld bytes", what,
                  cb->kv_layers, cb->kv_block_size, cb->kv_dim, p.kv_block_bytes);
        mdl_kv_destroy(m, kv);
    }
    mdl_destroy(m);
    be_destroy(&cb->base);
}

static void test_against_load(const char *root) {
    /* V3-shaped (q LoRA, sigmoid noaux_tc with its bias, one shared expert) with a vocabulary
     * TP does not divide (padding rows), and V2-shaped (plain q_proj, softmax greedy, two
     * shared experts) */
    mk_spec v3;
    mk_preset("tiny", &v3);
    v3.cfg.vocab_size = 1001;
    v3.cfg.num_hidden_layers = 3;
    v3.config_only = true;
    mk_spec v2 = v3;
    snprintf(v2.cfg.model_type, sizeof v2.cfg.model_type, "deepseek_v2");
    v2.cfg.q_lora_rank = 0;
    v2.cfg.n_shared_experts = 2;
    v2.cfg.scoring_func = CFG_SCORING_SOFTMAX;
    v2.cfg.topk_method = CFG_TOPK_GREEDY;
    v2.cfg.n_group = 1;
    v2.cfg.topk_group = 1;
    v2.cfg.norm_topk_prob = false;
    v2.cfg.routed_scaling_factor = 1.0f;
    char d3[4096], d2[4096];
    snprintf(d3, sizeof d3, "%s/v3", root);
    snprintf(d2, sizeof d2, "%s/v2", root);
    /* both with an MTP layer (duet-mkmodel --mtp), loaded with and without the module */
    v3.cfg.num_nextn_predict_layers = 1;
    v2.cfg.num_nextn_predict_layers = 1;
    mk_spec_fit(&v3);
    mk_spec_fit(&v2);
    CHECK(mk_write(&v3, d3) == DUET_OK);
    CHECK(mk_write(&v2, d2) == DUET_OK);
    const char *dirs[2] = {d3, d2};
    for (int i = 0; i < 2; i++)
        for (int k = 0; k <= 2; k += 2) {
            compare_load("TP1", dirs[i], 1, 1, false, 0, 0, k);
            compare_load("TP2 rank 1", dirs[i], 2, 1, false, 1, 0, k);
            compare_load("DP4+EP4 rank 2", dirs[i], 1, 4, true, 0, 2, k);
            compare_load("TP2xDP2+EP4 rank 3", dirs[i], 2, 2, true, 1, 3, k);
        }
    test_instance_mtp(d3);
}

/* par_instance_create with a plan (the CPU backend reports no device memory: the test gives
 * one): a device too small is refused before loading, one that is big enough loads; without
 * device readings the KV cache keeps the caller's default (par_kv_budget: unsupported). */
static duet_status instance(long long device, double util, char **log_p) {
    par_options po;
    par_options_init(&po);
    po.max_tokens = 256;
    po.mem = (par_memory){.utilization = util,
                          .max_model_len = 1024,
                          .max_num_seqs = 16,
                          .block_size = 16,
                          .device_memory = device};
    int argc = 0;
    char **argv = NULL;
    par_instance *inst = NULL;
    log_set_level(LOG_LEVEL_INFO);
    tu_capture_begin();
    duet_status st = par_instance_create(&po, GOLDEN_DIR "/tiny-v3/model", &argc, &argv, &inst);
    long long kv = 0;
    if (st == DUET_OK) CHECK_EQ_INT(par_kv_budget(inst, &kv), DUET_ERR_UNSUPPORTED);
    par_instance_destroy(inst);
    *log_p = tu_capture_end();
    log_set_level(LOG_LEVEL_WARN);
    return st;
}

static void test_instance(void) {
    char *log = NULL;
    /* 8 MiB of float32 weights and ~40 MiB of activations do not fit 0.9 x 32 MiB */
    CHECK_EQ_INT(instance(32 * MIB, 0.9, &log), DUET_ERR_NO_MEMORY);
    check_has(log, "memory plan: model on 1 GPU of 32 MiB with TP1: ");
    check_has(log, "per rank exceed 29 MiB (0.90 of 32 MiB)");
    CHECK_MSG(!strstr(log, "weights: loading"), "loading started: %s", log);
    free(log);
    CHECK_EQ_INT(instance(4 * GIB, 0.9, &log), DUET_OK);
    check_has(log, "memory plan: 8.0 MiB of weights, ");
    check_has(log, "weights: loaded 201 tensors");
    free(log);
    /* no plan asked for, and none possible on the CPU without a device size: as before */
    CHECK_EQ_INT(instance(0, 0.9, &log), DUET_OK);
    CHECK(!strstr(log, "memory plan"));
    check_has(log, "weights: loaded 201 tensors");
    free(log);
    CHECK_EQ_INT(instance(4 * GIB, 1.5, &log), DUET_ERR_INVALID);
    check_has(log, "memory plan: --gpu-memory-utilization must be a fraction");
    free(log);
}

int main(void) {
    log_set_level(LOG_LEVEL_WARN);
    if (cfg_load(TEST_DATA_DIR "/deepseek-v3", &g_v3) != DUET_OK ||
        cfg_load(TEST_DATA_DIR "/deepseek-v2-lite", &g_lite) != DUET_OK) {
        fprintf(stderr, "cannot read the config.json files under %s\n", TEST_DATA_DIR);
        return 1;
    }
    /* the test data is what DeepSeek publishes */
    CHECK(g_v3.num_hidden_layers == 61 && g_v3.fp8 && g_v3.fp8_block[0] == 128 &&
          g_v3.n_routed_experts == 256 && g_v3.num_experts_per_tok == 8);
    CHECK(g_lite.num_hidden_layers == 27 && !g_lite.fp8 && g_lite.q_lora_rank == 0);
    test_v3_8xh200_dp8_ep8_fp8();
    test_v3_kv_fp8();
    test_v3_8xh100_refused();
    test_v3_16xh100_dp16_ep16_fp8();
    test_v3_bf16_refused();
    test_v2_lite_1xh200();
    test_other_refusals();
    test_bad_inputs();
    test_kv_after_load();
    test_kv_neighbours();
    test_print();
    test_v3_mtp_weights_kv();
    test_v3_mtp_verdict();
    test_mtp_print();
    test_instance();
    char *root = tu_mkdtemp("memplan");
    if (root) {
        test_against_load(root);
        tu_rmtree(root);
        free(root);
    }
    CHECK_DONE();
}
