/* The memory plan (see memplan.h). Weights are counted by walking the tensors weights.c loads,
 * in the same slices; activations follow model.c's reserve(), collectives.c's EP staging and
 * the CUDA backend's scratch areas, with the growth headroom those modules allocate with. The
 * weights and the buffers mdl_load allocates are compared with a real load in test_memplan, so
 * a change there that is not mirrored here fails a test rather than a deployment. */
#include "model/memplan.h"

#include <math.h>
#include <stdarg.h>
#include <string.h>

#define MIB (1LL << 20)
#define GIB (1LL << 30)

/* What the CUDA backend allocates for itself (backend_cuda.cu): its cuBLAS workspace. */
#define CUBLAS_WORKSPACE (32 * MIB)
/* NCCL's connection buffers for one communicator over several GPUs. NCCL sizes them by
 * topology (channels x peers x protocol buffers); this is an allowance, not a count. */
#define NCCL_ALLOWANCE (512 * MIB)
/* Recorded decode steps (CUDA graphs) keep their kernel parameters on the device: an
 * allowance for the buckets model.c records. */
#define GRAPHS_ALLOWANCE (256 * MIB)
/* cuda_scratch grows an area to 1.5x what an op asks; collectives.c's EP staging to 2x. */
#define SCRATCH_HEADROOM 1.5
#define EP_HEADROOM      2
/* Routing is taken as even over experts, except that the busiest rank may receive this many
 * times its even share of tokens: a step's routing is not balanced, and EP staging and the
 * experts' scratch must hold the busiest rank's rows. */
#define EP_SKEW 2.0
/* A sampler row's parameters, result and top logprobs on the device (be_sample_row,
 * be_sample_out, be_sample_top: 216 + 8 + 160 bytes). */
#define SAMPLE_ROW_BYTES 384

/* A size as people read it: "94.1 GiB", "416 MiB", "3.5 MiB", "12 KiB". Returned by value so
 * several can sit in one printf (a struct member of a call's result lives to the end of the
 * full expression). */
typedef struct size_str {
    char s[24];
} size_str;

static size_str sz(long long b);

/* How a fixed KV cache of b bytes was asked for: "--kv-cache-memory 4.0 GiB", or with a
 * flag "--num-gpu-blocks-override 5000 (4.0 GiB)". */
typedef struct asked_str {
    char s[112];
} asked_str;

static asked_str asked(const char *flag, long long b) {
    asked_str r;
    if (flag && *flag)
        snprintf(r.s, sizeof r.s, "%s (%s)", flag, sz(b).s);
    else
        snprintf(r.s, sizeof r.s, "--kv-cache-memory %s", sz(b).s);
    return r;
}

static size_str sz(long long b) {
    size_str r;
    double a = (double)(b < 0 ? -b : b);
    if (a < (double)MIB)
        snprintf(r.s, sizeof r.s, "%.0f KiB", (double)b / 1024.0);
    else if (a < 10.0 * (double)MIB)
        snprintf(r.s, sizeof r.s, "%.1f MiB", (double)b / (double)MIB);
    else if (a < (double)GIB)
        snprintf(r.s, sizeof r.s, "%.0f MiB", (double)b / (double)MIB);
    else
        snprintf(r.s, sizeof r.s, "%.1f GiB", (double)b / (double)GIB);
    return r;
}

static void fail(char *err, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void fail(char *err, size_t len, const char *fmt, ...) {
    if (!err || !len) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, len, fmt, ap);
    va_end(ap);
}

mplan_weight_format mplan_weight_format_auto(const cfg_model *c, dt_dtype act) {
    if (act == DT_F32) return MPLAN_WEIGHTS_F32;
    return c->fp8 ? MPLAN_WEIGHTS_FP8 : MPLAN_WEIGHTS_BF16;
}

bool mplan_fp8_resident(const cfg_model *c, long long r0, long long c0, long long ncols) {
    return c->fp8 && c->fp8_block[0] == 128 && c->fp8_block[1] == 128 && r0 % 128 == 0 &&
           c0 % 128 == 0 && ncols % 16 == 0;
}

bool mplan_fp8_ffn_resident(const cfg_model *c, long long i0, long long n) {
    return mplan_fp8_resident(c, i0, 0, c->hidden_size) && mplan_fp8_resident(c, 0, i0, n);
}

bool mplan_fp8_moe_resident(const cfg_model *c, const mdl_plan *pl) {
    long long ei0 =
        pl->shard.ep_size > 1 ? 0 : (long long)pl->shard.tp_rank * pl->expert_inter_local;
    bool ok = mplan_fp8_ffn_resident(c, ei0, pl->expert_inter_local);
    if (c->n_shared_experts > 0)
        ok = ok && mplan_fp8_ffn_resident(c, (long long)pl->shard.tp_rank * pl->shared_inter_local,
                                          pl->shared_inter_local);
    return ok;
}

const char *mplan_weight_format_name(mplan_weight_format f) {
    switch (f) {
    case MPLAN_WEIGHTS_F32:
        return "float32";
    case MPLAN_WEIGHTS_BF16:
        return "bf16";
    case MPLAN_WEIGHTS_FP8:
        return "fp8";
    }
    return "?";
}

const char *mplan_kind_name(mplan_kind k) {
    static const char *names[MPLAN_KIND_COUNT] = {
        "attention",           "dense MLP",      "shared experts", "routed experts",
        "embedding + lm_head", "norms + router", "MTP module",
    };
    return k >= 0 && k < MPLAN_KIND_COUNT ? names[k] : "?";
}

/* ---- weights: the loader's walk (weights.c), counted ---- */

typedef struct wwalk {
    const cfg_model *c;
    mplan_weight_format f;
    dt_dtype act;
    int bo, bi; /* FP8 scale block [out, in] */
    mplan_weights w;
} wwalk;

/* Blocks of b that rows [start, start + n) touch. */
static long long blocks_over(long long start, long long n, int b) {
    return n <= 0 ? 0 : (start + n - 1) / b - start / b + 1;
}

/* Rows [r0, r0 + nr) and columns [c0, c0 + nc) of a linear weight; fp8: FP8 checkpoints store
 * the tensor as e4m3 (every projection of a layer, not the embedding, lm_head or router);
 * resident: the loader may keep it e4m3 (not kv_b_proj, see mplan_fp8_resident). */
static void count_linear_as(wwalk *ww, mplan_kind k, bool fp8, bool resident, long long r0,
                            long long nr, long long c0, long long nc) {
    long long n = nr * nc, bytes;
    if (ww->f == MPLAN_WEIGHTS_FP8 && fp8 && resident && mplan_fp8_resident(ww->c, r0, c0, nc))
        bytes = n + 4 * blocks_over(r0, nr, ww->bo) * blocks_over(c0, nc, ww->bi);
    else if (!fp8)
        bytes = n * (long long)dt_size(ww->act); /* kept in the activation type */
    else
        bytes = n * (ww->f == MPLAN_WEIGHTS_F32 ? 4 : 2);
    ww->w.bytes[k] += bytes;
    ww->w.tensors++;
}

static void count_linear(wwalk *ww, mplan_kind k, bool fp8, long long r0, long long nr,
                         long long c0, long long nc) {
    count_linear_as(ww, k, fp8, true, r0, nr, c0, nc);
}

/* A norm weight, router gate or bias: float32 in every format. */
static void count_f32(wwalk *ww, mplan_kind k, long long n) {
    ww->w.bytes[k] += 4 * n;
    ww->w.tensors++;
}

/* weights.c's load_ffn: gate_proj and up_proj rows [i0, i0 + n), down_proj columns; resident:
 * the layer's rule lets the MLP stay FP8 (mplan_fp8_ffn_resident, mplan_fp8_moe_resident) */
static void count_ffn(wwalk *ww, mplan_kind k, long long i0, long long n, bool resident) {
    long long D = ww->c->hidden_size;
    count_linear_as(ww, k, true, resident, i0, n, 0, D);
    count_linear_as(ww, k, true, resident, i0, n, 0, D);
    count_linear_as(ww, k, true, resident, 0, D, i0, n);
}

/* A decoder layer; moe: its MLP is the experts' */
static void count_layer(wwalk *ww, const mdl_plan *pl, bool moe) {
    const cfg_model *c = ww->c;
    long long D = c->hidden_size, L = c->kv_lora_rank, R = c->qk_rope_head_dim;
    long long qk = cfg_qk_head_dim(c), nv = c->qk_nope_head_dim + c->v_head_dim;
    long long Hl = pl->n_heads_local, h0 = (long long)pl->shard.tp_rank * Hl;
    count_f32(ww, MPLAN_NORMS_ROUTER, D); /* input_layernorm */
    count_f32(ww, MPLAN_NORMS_ROUTER, D); /* post_attention_layernorm */
    if (c->q_lora_rank) {
        long long q = c->q_lora_rank;
        count_linear(ww, MPLAN_ATTENTION, true, 0, q, 0, D);
        count_f32(ww, MPLAN_NORMS_ROUTER, q);
        count_linear(ww, MPLAN_ATTENTION, true, h0 * qk, Hl * qk, 0, q);
    } else {
        count_linear(ww, MPLAN_ATTENTION, true, h0 * qk, Hl * qk, 0, D);
    }
    count_linear(ww, MPLAN_ATTENTION, true, 0, L + R, 0, D); /* kv_a_proj_with_mqa */
    count_f32(ww, MPLAN_NORMS_ROUTER, L);
    count_linear_as(ww, MPLAN_ATTENTION, true, false, h0 * nv, Hl * nv, 0, L); /* kv_b: bf16 */
    count_linear(ww, MPLAN_ATTENTION, true, 0, D, h0 * c->v_head_dim, Hl * c->v_head_dim);
    if (!moe) {
        long long i0 = (long long)pl->shard.tp_rank * pl->inter_local;
        count_ffn(ww, MPLAN_DENSE_MLP, i0, pl->inter_local,
                  mplan_fp8_ffn_resident(c, i0, pl->inter_local));
        return;
    }
    const bool moe_fp8 = mplan_fp8_moe_resident(c, pl);
    count_f32(ww, MPLAN_NORMS_ROUTER, (long long)c->n_routed_experts * D); /* router gate */
    if (c->topk_method == CFG_TOPK_NOAUX_TC) count_f32(ww, MPLAN_NORMS_ROUTER, c->n_routed_experts);
    long long ei0 =
        pl->shard.ep_size > 1 ? 0 : (long long)pl->shard.tp_rank * pl->expert_inter_local;
    for (int e = 0; e < pl->n_local_experts; e++)
        count_ffn(ww, MPLAN_ROUTED_EXPERTS, ei0, pl->expert_inter_local, moe_fp8);
    if (c->n_shared_experts > 0)
        count_ffn(ww, MPLAN_SHARED_EXPERTS, (long long)pl->shard.tp_rank * pl->shared_inter_local,
                  pl->shared_inter_local, moe_fp8);
}

duet_status mplan_weights_count(const cfg_model *c, const mdl_plan *plan, mplan_weight_format f,
                                dt_dtype act, mplan_weights *w_p) {
    if (f == MPLAN_WEIGHTS_FP8 && !c->fp8) return DUET_ERR_INVALID;
    if (act != DT_F32 && act != DT_BF16) return DUET_ERR_INVALID;
    wwalk ww = {.c = c,
                .f = f,
                .act = act,
                .bo = c->fp8 ? c->fp8_block[0] : 128,
                .bi = c->fp8 ? c->fp8_block[1] : 128};
    long long D = c->hidden_size;
    /* embed_tokens and lm_head: rows [vocab0, vocab0 + vocab_local), padding rows included */
    count_linear(&ww, MPLAN_EMBED_HEAD, false, plan->vocab0, plan->vocab_local, 0, D);
    count_linear(&ww, MPLAN_EMBED_HEAD, false, plan->vocab0, plan->vocab_local, 0, D);
    count_f32(&ww, MPLAN_NORMS_ROUTER, D); /* model.norm */
    for (int l = 0; l < c->num_hidden_layers; l++) count_layer(&ww, plan, cfg_layer_is_moe(c, l));
    for (int k = 0; k < MPLAN_KIND_COUNT; k++) ww.w.total += ww.w.bytes[k];
    *w_p = ww.w;
    return DUET_OK;
}

duet_status mplan_mtp_weights_count(const cfg_model *c, const mdl_plan *plan, mplan_weight_format f,
                                    dt_dtype act, mplan_weights *w_p) {
    if (f == MPLAN_WEIGHTS_FP8 && !c->fp8) return DUET_ERR_INVALID;
    if (act != DT_F32 && act != DT_BF16) return DUET_ERR_INVALID;
    if (c->num_nextn_predict_layers < 1) return DUET_ERR_INVALID;
    /* weights.c's MTP loader offers nothing to the FP8 path: every projection is dequantized */
    wwalk ww = {.c = c,
                .f = f == MPLAN_WEIGHTS_FP8 ? MPLAN_WEIGHTS_BF16 : f,
                .act = act,
                .bo = c->fp8 ? c->fp8_block[0] : 128,
                .bi = c->fp8 ? c->fp8_block[1] : 128};
    long long D = c->hidden_size;
    /* embed_tokens and shared_head.head: this rank's vocabulary rows, as the main ones; these
     * and eh_proj are uploaded in the activation type */
    count_linear(&ww, MPLAN_EMBED_HEAD, false, plan->vocab0, plan->vocab_local, 0, D);
    count_linear(&ww, MPLAN_EMBED_HEAD, false, plan->vocab0, plan->vocab_local, 0, D);
    count_f32(&ww, MPLAN_NORMS_ROUTER, D); /* enorm */
    count_f32(&ww, MPLAN_NORMS_ROUTER, D); /* hnorm */
    count_f32(&ww, MPLAN_NORMS_ROUTER, D); /* shared_head.norm */
    /* eh_proj [D, 2D], whole on every rank, as its two column halves */
    count_linear(&ww, MPLAN_MTP, false, 0, D, 0, D);
    count_linear(&ww, MPLAN_MTP, false, 0, D, D, D);
    count_layer(&ww, plan, c->n_routed_experts > 0);
    for (int k = 0; k < MPLAN_KIND_COUNT; k++) ww.w.total += ww.w.bytes[k];
    *w_p = ww.w;
    return DUET_OK;
}

/* ---- the plan ---- */

void mplan_inputs_default(mplan_inputs *in) {
    memset(in, 0, sizeof *in);
    in->tp = in->dp = 1;
    in->gpu_memory_utilization = 0.9;
    in->weights = MPLAN_WEIGHTS_BF16;
    in->act_dtype = DT_BF16;
    in->kv_dtype = DT_BF16;
    in->max_num_seqs = 256;
    in->max_num_batched_tokens = 2048;
    in->block_size = 64;
    in->graphs = true;
}

static duet_status check_inputs(const cfg_model *c, const mplan_inputs *in, char *err, size_t len) {
    if (!(in->gpu_memory_utilization > 0.0 && in->gpu_memory_utilization <= 1.0)) {
        fail(err, len,
             "--gpu-memory-utilization must be a fraction of the device's memory in (0, 1], "
             "got %g",
             in->gpu_memory_utilization);
        return DUET_ERR_INVALID;
    }
    if (in->gpu_memory <= 0) {
        fail(err, len, "the device's memory must be known (got %lld bytes)", in->gpu_memory);
        return DUET_ERR_INVALID;
    }
    if (in->tp < 1 || in->dp < 1 || in->gpus_per_node < 0) {
        fail(err, len,
             "--tensor-parallel-size (%d) and --data-parallel-size (%d) must be at least 1", in->tp,
             in->dp);
        return DUET_ERR_INVALID;
    }
    if (in->max_num_seqs < 1 || in->max_num_batched_tokens < 1 || in->block_size < 1 ||
        in->max_model_len < 0 || in->kv_cache_memory < 0) {
        fail(err, len,
             "--max-num-seqs (%d), --max-num-batched-tokens (%d) and --block-size (%d) must be "
             "at least 1, --max-model-len (%d) and --kv-cache-memory (%lld) not negative",
             in->max_num_seqs, in->max_num_batched_tokens, in->block_size, in->max_model_len,
             in->kv_cache_memory);
        return DUET_ERR_INVALID;
    }
    if (in->max_model_len > c->max_position_embeddings) {
        fail(err, len, "--max-model-len %d is longer than the model's max_position_embeddings (%d)",
             in->max_model_len, c->max_position_embeddings);
        return DUET_ERR_INVALID;
    }
    if (in->act_dtype != DT_BF16 && in->act_dtype != DT_F32) {
        fail(err, len, "activations can be bf16 or float32, not %s", dt_name(in->act_dtype));
        return DUET_ERR_INVALID;
    }
    if (in->kv_dtype != DT_BF16 && in->kv_dtype != DT_F32 && in->kv_dtype != DT_F8_E4M3) {
        fail(err, len, "the KV cache can be bf16, fp8 or float32, not %s", dt_name(in->kv_dtype));
        return DUET_ERR_INVALID;
    }
    if (in->weights == MPLAN_WEIGHTS_FP8 && !c->fp8) {
        fail(err, len,
             "fp8 weights need an FP8 checkpoint (config.json has no quantization_config of "
             "block-scaled e4m3)");
        return DUET_ERR_INVALID;
    }
    if (in->spec_tokens < 0) {
        fail(err, len, "num_speculative_tokens must not be negative (got %d; 0: no MTP)",
             in->spec_tokens);
        return DUET_ERR_INVALID;
    }
    if (in->spec_tokens > 0 && c->num_nextn_predict_layers < 1) {
        fail(err, len,
             "MTP speculative decoding needs the checkpoint's MTP layer, and config.json's "
             "num_nextn_predict_layers is 0: leave --speculative-config out");
        return DUET_ERR_INVALID;
    }
    if ((long long)in->tp * in->dp > 1 << 20) {
        fail(err, len, "an instance of %d x %d ranks is beyond duet's limits", in->tp, in->dp);
        return DUET_ERR_INVALID;
    }
    return DUET_OK;
}

/* "DP8+EP8", "TP2xDP4+EP8", "TP8", "TP1" */
static void layout_text(const mplan *p, char *buf, size_t len) {
    const mplan_inputs *in = &p->in;
    int n = 0;
    if (in->tp > 1 && in->dp > 1)
        n = snprintf(buf, len, "TP%dxDP%d", in->tp, in->dp);
    else if (in->dp > 1)
        n = snprintf(buf, len, "DP%d", in->dp);
    else
        n = snprintf(buf, len, "TP%d", in->tp);
    if (p->ep_size > 1 && n >= 0 && (size_t)n < len)
        snprintf(buf + n, len - (size_t)n, "+EP%d", p->ep_size);
}

/* "DeepSeek-V3 on 8 GPUs of 80.0 GiB with DP8+EP8" */
static void setting_text(const mplan *p, char *buf, size_t len) {
    char lay[64];
    layout_text(p, lay, sizeof lay);
    int k = p->in.spec_tokens;
    char mtp[48] = "";
    if (k > 0) snprintf(mtp, sizeof mtp, " and MTP (%d draft%s a step)", k, k == 1 ? "" : "s");
    snprintf(buf, len, "%s on %d GPU%s of %s with %s%s", p->name, p->ranks,
             p->ranks == 1 ? "" : "s", sz(p->in.gpu_memory).s, lay, mtp);
}

/* Probability that one token's top-k (k of E experts, distinct) hits at least one of the El
 * experts a given rank holds, routing being uniform. */
static double hit_probability(int E, int El, int K) {
    double miss = 1.0;
    for (int i = 0; i < K; i++) {
        if (E - i <= 0) return 1.0;
        miss *= (double)(E - El - i) / (double)(E - i);
        if (miss <= 0.0) return 1.0;
    }
    return 1.0 - miss;
}

static long long llmax(long long a, long long b) {
    return a > b ? a : b;
}

static long long llmin(long long a, long long b) {
    return a < b ? a : b;
}

/* Activations at the peak of a step: p->shard, p->in and c give the shapes. */
static void plan_activations(const cfg_model *c, mplan *p) {
    const mplan_inputs *in = &p->in;
    const mdl_plan *pl = &p->shard;
    long long a = (long long)dt_size(in->act_dtype);
    long long T = in->max_num_batched_tokens, S = in->max_num_seqs;
    /* logits rows of a step: one per sequence (prompt_logprobs can ask for more); with MTP a
     * verify step has one after the last token and after each draft, the drafts counting
     * against the step's tokens */
    long long k = in->spec_tokens;
    long long O = llmin(S * (1 + k), T);
    long long D = c->hidden_size, Hl = pl->n_heads_local, qk = cfg_qk_head_dim(c);
    long long kvd = (long long)c->kv_lora_rank + c->qk_rope_head_dim;
    long long Vl = pl->vocab_local, tp = in->tp;
    long long I = llmax(pl->inter_local, llmax(pl->shared_inter_local, pl->expert_inter_local));
    long long qa = c->q_lora_rank ? c->q_lora_rank : 1;
    bool moe = c->n_routed_experts > 0;
    long long K = moe ? c->num_experts_per_tok : 0, E = c->n_routed_experts;

    /* model.c reserve(): h, xn, o, o2 [T, D]; qa; q [T, Hl * qk]; kva; attn [T, Hl * v];
     * gu [T, 2I]; act [T, I]; logits [O, Vl]; and collectives.c's device gather [tp * O, Vl]
     * with its copy in row order for sampling (logits_rows, same size) */
    long long per_token = 4 * D + qa + Hl * qk + kvd + Hl * c->v_head_dim + 3 * I;
    long long gather_rows = tp > 1 ? 2 * tp : 0;
    p->act_at_load = a * (T * per_token + Vl + gather_rows * Vl);
    p->act_model = a * (T * per_token + O * Vl + gather_rows * O * Vl);

    /* collectives.c EP staging: x_send and y_back for this TP rank's tokens to each rank they
     * route to; x_recv and y_recv for what every DP group's tokens bring here */
    long long slots = T * K; /* (token, local expert) pairs the experts run */
    long long rows = T;      /* tokens the experts see */
    p->act_ep = 0;
    if (moe && p->ep_size > 1) {
        long long ep = p->ep_size, El = E / ep, dp = in->dp;
        long long mine = (T + tp - 1) / tp;
        long long send = mine * llmin(K, ep) + 1;
        long long all = dp * T; /* tokens of the instance in one step */
        double hit = hit_probability((int)E, (int)El, (int)K);
        long long recv = llmin(all, (long long)ceil(EP_SKEW * (double)all * hit));
        p->act_ep = a * D * (2 * EP_HEADROOM * send + 2 * EP_HEADROOM * recv);
        rows = recv;
        slots = llmin(recv * llmin(K, El), (long long)ceil(EP_SKEW * (double)all * K / ep));
    }

    /* the CUDA backend's scratch areas, each grown to 1.5x its largest request:
     * op: the expanded MLA of a prompt chunk over a context of max_model_len (latents and the
     * keys/values of this rank's heads), the experts' gathered rows (xs, gu, act, y), or the
     * sampler's probabilities; route: router logits and top-k; gemm: the router's input in
     * float32; xfer: logits downloaded as float32; idx: the experts' index lists */
    long long ctx = in->max_model_len;
    long long mla = ctx * (c->kv_lora_rank + Hl * (c->qk_nope_head_dim + c->v_head_dim)) * a;
    long long experts = moe ? slots * (2 * D + 3 * pl->expert_inter_local) * a : 0;
    long long sample = O * c->vocab_size * 4 + O * 64;
    long long op = llmax(mla, llmax(experts, sample));
    long long route = moe ? T * (E + 2 * K) * 4 : 0;
    long long gemm = moe && in->act_dtype != DT_F32 ? T * D * 4 : 0;
    long long xfer = in->act_dtype != DT_F32 ? O * Vl * tp * 4 : 0;
    long long idx = moe ? 3 * llmax(slots, rows * K) * 4 : 0;
    p->act_scratch = (long long)(SCRATCH_HEADROOM * (double)(op + route + gemm + xfer + idx));

    /* fixed: cuBLAS workspace; the step's metadata (ids, positions, slots, out rows, starts,
     * contexts, block tables) on the device, allocated at twice its size; NCCL; graphs */
    long long max_blocks = (in->max_model_len + in->block_size - 1) / in->block_size;
    long long batch = 2 * (3 * T + O + 2 * S + 1 + S * max_blocks) * 4;
    long long comms = (tp > 1 ? 1 : 0) + (p->ep_size > 1 ? 1 : 0);
    p->act_fixed =
        CUBLAS_WORKSPACE + batch + comms * NCCL_ALLOWANCE + (in->graphs ? GRAPHS_ALLOWANCE : 0);

    /* MTP: model.c keeps every token's final-normed hidden state and the module's output rows
     * (hid, mtp_prev [T, D], allocated with the other buffers at load); the draft sampler
     * (be_sampler_create, at the first draft) holds float32 probabilities of the logits rows
     * (O) and one penalty slot. The module's passes run over the step's tokens in the same
     * buffers, scratch and EP staging as a forward (one decoder layer of the same shapes). */
    p->act_mtp = 0;
    if (k > 0) {
        long long V = c->vocab_size, hidden = 2 * T * D * a;
        p->act_mtp = hidden + O * V * 4 + V * 4 + (V + 31) / 32 * 4 + O * SAMPLE_ROW_BYTES;
        p->act_at_load += hidden;
    }

    p->act_total = p->act_model + p->act_ep + p->act_scratch + p->act_fixed + p->act_mtp;
    p->act_late = p->act_total - p->act_at_load - CUBLAS_WORKSPACE;
}

/* The rank with the most weight bytes (FP8 scale blocks can differ by a block between TP
 * ranks; everything else is the same on every rank). */
static duet_status plan_weights(const cfg_model *c, mplan *p) {
    const mplan_inputs *in = &p->in;
    p->w.total = -1;
    for (int r = 0; r < in->tp; r++) {
        mdl_shard sh = {.tp_rank = r, .tp_size = in->tp, .ep_rank = 0, .ep_size = p->ep_size};
        mdl_plan pl;
        mplan_weights w;
        duet_status st = mdl_shard_plan(c, &sh, &pl);
        if (st == DUET_OK) st = mplan_weights_count(c, &pl, in->weights, in->act_dtype, &w);
        mplan_weights mtp = {0};
        if (st == DUET_OK && in->spec_tokens > 0)
            st = mplan_mtp_weights_count(c, &pl, in->weights, in->act_dtype, &mtp);
        if (st != DUET_OK) return st;
        w.bytes[MPLAN_MTP] = mtp.total;
        w.total += mtp.total;
        w.tensors += mtp.tensors;
        if (w.total > p->w.total) {
            p->w = w;
            p->mtp = mtp;
            p->shard = pl;
        }
        /* without FP8 every rank holds the same bytes */
        if (in->weights != MPLAN_WEIGHTS_FP8) break;
    }
    return DUET_OK;
}

static void plan_verdict(mplan *p) {
    const mplan_inputs *in = &p->in;
    char who[192];
    setting_text(p, who, sizeof who);
    char budget[96];
    if (in->kv_cache_memory > 0)
        snprintf(budget, sizeof budget, "%s (the whole device: --kv-cache-memory is set)",
                 sz(p->budget).s);
    else
        snprintf(budget, sizeof budget, "%s (%.2f of %s)", sz(p->budget).s,
                 in->gpu_memory_utilization, sz(in->gpu_memory).s);
    long long need_blocks = (in->max_model_len + in->block_size - 1) / in->block_size;
    p->fits = false;
    char mtp[64] = "";
    if (in->spec_tokens > 0)
        snprintf(mtp, sizeof mtp, " (the MTP module's %s included)", sz(p->w.bytes[MPLAN_MTP]).s);
    if (p->w.total > p->budget) {
        snprintf(p->verdict, sizeof p->verdict, "%s: %s of weights per rank%s exceed %s", who,
                 sz(p->w.total).s, mtp, budget);
    } else if (p->w.total + p->act_total > p->budget) {
        snprintf(p->verdict, sizeof p->verdict,
                 "%s: %s of weights and %s of activations per rank exceed %s by %s "
                 "(lower --max-num-batched-tokens or --max-model-len)",
                 who, sz(p->w.total).s, sz(p->act_total).s, budget,
                 sz(p->w.total + p->act_total - p->budget).s);
    } else if (p->kv_blocks < need_blocks) {
        snprintf(p->verdict, sizeof p->verdict,
                 "%s: no room for one sequence of max_model_len %d: %s left after %s of "
                 "weights and %s of activations holds %lld tokens of KV cache, one sequence "
                 "needs %lld blocks of %d (%s)",
                 who, in->max_model_len, sz(p->kv_budget).s, sz(p->w.total).s, sz(p->act_total).s,
                 p->kv_tokens, need_blocks, in->block_size, sz(need_blocks * p->kv_block_bytes).s);
    } else {
        p->fits = true;
        snprintf(p->verdict, sizeof p->verdict,
                 "KV cache: %lld blocks = %lld tokens (%s), %lld sequence%s of max_model_len %d",
                 p->kv_blocks, p->kv_tokens, sz(p->kv_blocks * p->kv_block_bytes).s,
                 p->kv_tokens / in->max_model_len, p->kv_tokens / in->max_model_len == 1 ? "" : "s",
                 in->max_model_len);
    }
}

duet_status mplan_compute(const cfg_model *c, const mplan_inputs *in, mplan *plan_p, char *err,
                          size_t err_len) {
    duet_status st = check_inputs(c, in, err, err_len);
    if (st != DUET_OK) return st;
    mplan p;
    memset(&p, 0, sizeof p);
    p.in = *in;
    if (p.in.max_model_len == 0)
        p.in.max_model_len = c->max_position_embeddings < 8192 ? c->max_position_embeddings : 8192;
    snprintf(p.name, sizeof p.name, "%s", in->model_name ? in->model_name : c->model_type);
    p.ranks = in->tp * in->dp;
    int per_node = in->gpus_per_node > 0 ? in->gpus_per_node : p.ranks;
    p.nodes = (p.ranks + per_node - 1) / per_node;
    /* EP spans every rank of the instance (parallel.c) */
    p.ep_size = in->ep && p.ranks > 1 && c->n_routed_experts > 0 ? p.ranks : 1;
    st = mdl_shard_check(c, in->tp, p.ep_size, err, err_len);
    if (st != DUET_OK) return st;
    st = plan_weights(c, &p);
    if (st != DUET_OK) {
        fail(err, err_len, "cannot plan the weights of this layout (%s)", duet_strerror(st));
        return st;
    }
    for (int l = 0; l < c->num_hidden_layers; l++) p.moe_layers += cfg_layer_is_moe(c, l);
    p.n_layers = c->num_hidden_layers;
    p.n_heads = c->num_attention_heads;
    p.vocab_size = c->vocab_size;
    p.fp8_block[0] = c->fp8 ? c->fp8_block[0] : 128;
    p.fp8_block[1] = c->fp8 ? c->fp8_block[1] : 128;
    plan_activations(c, &p);

    /* with MTP every block holds the module's layer too (model.c: n_kv_layers) */
    p.kv_layers = c->num_hidden_layers + (in->spec_tokens > 0 ? 1 : 0);
    p.kv_bytes_per_token = (long long)p.kv_layers * (c->kv_lora_rank + c->qk_rope_head_dim) *
                           (long long)dt_size(in->kv_dtype);
    if (in->kv_dtype == DT_F8_E4M3 && in->kv_decoded_layer) /* mdl_kv_bytes_per_token's rule */
        p.kv_bytes_per_token +=
            (long long)(c->kv_lora_rank + c->qk_rope_head_dim) * (long long)dt_size(in->act_dtype);
    p.kv_block_bytes = p.kv_bytes_per_token * in->block_size;
    /* the backend adds one padding block to the blocks it is asked for */
    if (in->kv_cache_memory > 0) {
        /* a fixed cache: vLLM then sets the utilization aside, the whole device is the limit.
         * The workers ask for kv_cache_memory / block bytes blocks, the padding block on top
         * (server.c, mplan_kv_after_load) */
        p.budget = in->gpu_memory;
        p.kv_budget =
            llmin(in->kv_cache_memory, p.budget - p.w.total - p.act_total - p.kv_block_bytes);
        p.kv_blocks = p.kv_budget > 0 ? p.kv_budget / p.kv_block_bytes : 0;
    } else {
        p.budget = (long long)((double)in->gpu_memory * in->gpu_memory_utilization);
        p.kv_budget = p.budget - p.w.total - p.act_total;
        p.kv_blocks = p.kv_budget > 0 ? p.kv_budget / p.kv_block_bytes - 1 : 0;
    }
    if (p.kv_blocks < 0) p.kv_blocks = 0;
    p.kv_tokens = p.kv_blocks * in->block_size;
    plan_verdict(&p);
    *plan_p = p;
    return DUET_OK;
}

void mplan_print(const mplan *p, FILE *f) {
    const mplan_inputs *in = &p->in;
    char who[192];
    setting_text(p, who, sizeof who);
    fprintf(f, "Memory plan: %s", who);
    if (p->nodes > 1) fprintf(f, " (%d nodes)", p->nodes);
    fprintf(f, "\n");
    if (in->kv_cache_memory > 0)
        fprintf(f, "  budget per rank: the whole device, %s (--kv-cache-memory %s)\n",
                sz(p->budget).s, sz(in->kv_cache_memory).s);
    else
        fprintf(f, "  budget per rank: %.2f of %s = %s (the CUDA context outside it)\n",
                in->gpu_memory_utilization, sz(in->gpu_memory).s, sz(p->budget).s);

    const char *act = in->act_dtype == DT_F32 ? "float32" : "bf16";
    if (in->weights == MPLAN_WEIGHTS_FP8)
        fprintf(
            f,
            "  weights per rank (fp8 e4m3 + %dx%d float32 scales; kv_b_proj, embedding, lm_head "
            "%s):\n",
            p->fp8_block[0], p->fp8_block[1], act);
    else
        fprintf(f, "  weights per rank (%s, router and norms float32):\n",
                mplan_weight_format_name(in->weights));
    const mdl_plan *s = &p->shard;
    for (int k = 0; k < MPLAN_KIND_COUNT; k++) {
        if (k == MPLAN_MTP && in->spec_tokens <= 0) continue;
        fprintf(f, "    %-22s %10s", mplan_kind_name((mplan_kind)k), sz(p->w.bytes[k]).s);
        switch (k) {
        case MPLAN_ATTENTION:
            fprintf(f, "   %d of %d heads x %d layers", s->n_heads_local, p->n_heads, p->n_layers);
            break;
        case MPLAN_DENSE_MLP:
            if (p->n_layers > p->moe_layers)
                fprintf(f, "   %d layer%s, intermediate %d", p->n_layers - p->moe_layers,
                        p->n_layers - p->moe_layers == 1 ? "" : "s", s->inter_local);
            break;
        case MPLAN_SHARED_EXPERTS:
            if (s->shared_inter_local)
                fprintf(f, "   %d MoE layers, intermediate %d", p->moe_layers,
                        s->shared_inter_local);
            break;
        case MPLAN_ROUTED_EXPERTS:
            if (p->moe_layers)
                fprintf(f, "   %d experts x %d MoE layers, intermediate %d", s->n_local_experts,
                        p->moe_layers, s->expert_inter_local);
            break;
        case MPLAN_EMBED_HEAD:
            fprintf(f, "   %d of %d vocabulary rows, twice", s->vocab_local, p->vocab_size);
            break;
        case MPLAN_MTP:
            /* the module's own layer, with the main layers' slices, none of it FP8 */
            fprintf(f, "   layer %d, %s: embedding + head %s, eh_proj %s, layer + norms %s",
                    p->n_layers, in->weights == MPLAN_WEIGHTS_F32 ? "float32" : act,
                    sz(p->mtp.bytes[MPLAN_EMBED_HEAD]).s, sz(p->mtp.bytes[MPLAN_MTP]).s,
                    sz(p->mtp.total - p->mtp.bytes[MPLAN_EMBED_HEAD] - p->mtp.bytes[MPLAN_MTP]).s);
            break;
        default:
            break;
        }
        fprintf(f, "\n");
    }
    fprintf(f, "    %-22s %10s   %lld tensors\n", "total", sz(p->w.total).s, p->w.tensors);

    fprintf(f, "  activations at the peak of a step (%d tokens, %d sequences, %s):\n",
            in->max_num_batched_tokens, in->max_num_seqs, act);
    fprintf(f, "    %-22s %10s\n", "model buffers", sz(p->act_model).s);
    if (p->ep_size > 1)
        fprintf(f, "    %-22s %10s   routing even but %.0fx on the busiest rank\n", "EP staging",
                sz(p->act_ep).s, EP_SKEW);
    fprintf(f, "    %-22s %10s   prefill attention over %d tokens, experts, routing\n",
            "backend scratch", sz(p->act_scratch).s, in->max_model_len);
    fprintf(f, "    %-22s %10s   cuBLAS, step metadata%s\n", "fixed", sz(p->act_fixed).s,
            in->tp > 1 || p->ep_size > 1
                ? (in->graphs ? ", NCCL and graphs (allowances)" : ", NCCL (allowance)")
                : (in->graphs ? ", graphs (allowance)" : ""));
    if (in->spec_tokens > 0)
        fprintf(
            f, "    %-22s %10s   hidden rows kept for it, draft sampler; %lld logits rows\n", "MTP",
            sz(p->act_mtp).s,
            llmin((long long)in->max_num_seqs * (1 + in->spec_tokens), in->max_num_batched_tokens));
    fprintf(f, "    %-22s %10s\n", "total", sz(p->act_total).s);

    fprintf(f, "  KV cache (%s, %lld bytes per token, blocks of %d tokens, %d layers%s):\n",
            in->kv_dtype == DT_F8_E4M3 ? "fp8"
            : in->kv_dtype == DT_F32   ? "float32"
                                       : "bf16",
            p->kv_bytes_per_token, in->block_size, p->kv_layers,
            in->spec_tokens > 0 ? " with the MTP module's" : "");
    fprintf(f, "    %-22s %10s\n", "left for it", sz(p->kv_budget).s);
    long long seqs = p->kv_tokens / in->max_model_len;
    fprintf(f, "    %-22s %10lld   = %lld tokens, %lld sequence%s of max_model_len %d\n", "blocks",
            p->kv_blocks, p->kv_tokens, seqs, seqs == 1 ? "" : "s", in->max_model_len);
    fprintf(f, "  %s: %s\n", p->fits ? "fits" : "does not fit", p->verdict);
}

void mplan_summary(const mplan *p, char *buf, size_t len) {
    char budget[64];
    if (p->in.kv_cache_memory > 0)
        snprintf(budget, sizeof budget, "the whole %s", sz(p->budget).s);
    else
        snprintf(budget, sizeof budget, "%s (%.2f of %s)", sz(p->budget).s,
                 p->in.gpu_memory_utilization, sz(p->in.gpu_memory).s);
    snprintf(buf, len,
             "%s of weights, %s of activations and %lld tokens (%s) of KV cache per rank, in %s",
             sz(p->w.total).s, sz(p->act_total).s, p->kv_tokens,
             sz(p->kv_blocks * p->kv_block_bytes).s, budget);
}

/* ---- after loading ---- */

/* The instance's CUDA context, as far as one reading at start can tell it from others'. */
static long long context_taken(const mplan_measured *m) {
    long long ctx = m->context < MPLAN_CONTEXT_MAX ? m->context : MPLAN_CONTEXT_MAX;
    return ctx > 0 ? ctx : 0;
}

/* What the instance held on the device at start: its own allocations and its context. */
static long long own_at_start(const mplan_measured *m) {
    if (!m->counted) return CUBLAS_WORKSPACE; /* the backend took it before the reading */
    return m->own_at_start + context_taken(m);
}

duet_status mplan_check_start(const mplan *p, const mplan_measured *m, char *err, size_t err_len) {
    if (p->in.kv_cache_memory > 0) return DUET_OK; /* the utilization is set aside */
    long long want = (long long)((double)m->total * p->in.gpu_memory_utilization);
    long long ours = own_at_start(m);
    if (m->free_at_start + ours >= want) return DUET_OK;
    fail(err, err_len,
         "the device had %s free at start, less than --gpu-memory-utilization %.2f asks "
         "for (%s of %s): another process holds %s of it; lower "
         "--gpu-memory-utilization or free the device",
         sz(m->free_at_start).s, p->in.gpu_memory_utilization, sz(want).s, sz(m->total).s,
         sz(m->total - m->free_at_start - ours).s);
    return DUET_ERR_NO_MEMORY;
}

duet_status mplan_kv_after_load(const mplan *p, const mplan_measured *m, long long *kv_bytes_p,
                                char *err, size_t err_len) {
    if (err_len) err[0] = '\0';
    duet_status st = mplan_check_start(p, m, err, err_len);
    if (st != DUET_OK) return st;
    long long want = p->in.kv_cache_memory > 0
                         ? m->total
                         : (long long)((double)m->total * p->in.gpu_memory_utilization);
    /* what the instance uses after loading */
    long long used;
    if (m->counted)
        used = m->own_after_load + context_taken(m);
    else
        used = m->free_at_start - m->free_after_load + CUBLAS_WORKSPACE;
    const char *took = m->counted ? "the instance holds" : "loading took";
    long long kv = want - used - p->act_late - p->kv_block_bytes;
    /* what the device really has for the cache now; other processes hold the rest */
    long long room = m->free_after_load - p->act_late - p->kv_block_bytes;
    long long others = m->total - m->free_after_load - used; /* said only when counted */
    if (p->in.kv_cache_memory > 0) {
        if (p->in.kv_cache_memory > kv) {
            fail(err, err_len,
                 "%s does not fit: of the device's %s, %s %s and the first steps need %s more",
                 asked(p->in.kv_flag, p->in.kv_cache_memory).s, sz(m->total).s, took, sz(used).s,
                 sz(p->act_late).s);
            return DUET_ERR_NO_MEMORY;
        }
        if (p->in.kv_cache_memory > room) {
            fail(err, err_len,
                 "%s does not fit: the device has %s free after loading (other processes hold "
                 "%s) and the first steps need %s of it",
                 asked(p->in.kv_flag, p->in.kv_cache_memory).s, sz(m->free_after_load).s,
                 sz(others).s, sz(p->act_late).s);
            return DUET_ERR_NO_MEMORY;
        }
        kv = p->in.kv_cache_memory;
    }
    long long need_blocks = (p->in.max_model_len + p->in.block_size - 1) / p->in.block_size;
    long long need = need_blocks * p->kv_block_bytes;
    if (kv < need) {
        fail(err, err_len,
             "no room for one sequence of max_model_len %d: of %s, %s %s "
             "and the first steps need %s more, leaving %s for the KV cache; one sequence needs "
             "%s",
             p->in.max_model_len, sz(want).s, took, sz(used).s, sz(p->act_late).s,
             sz(kv > 0 ? kv : 0).s, sz(need).s);
        return DUET_ERR_NO_MEMORY;
    }
    if (kv > room) {
        /* a neighbour holds more than the rest of the device: the share cannot be had */
        if (room < need) {
            fail(err, err_len,
                 "no room for one sequence of max_model_len %d: --gpu-memory-utilization %.2f "
                 "leaves %s for the KV cache, but the device has only %s free after loading "
                 "(other processes hold %s) and the first steps need %s of it; one sequence "
                 "needs %s",
                 p->in.max_model_len, p->in.gpu_memory_utilization, sz(kv).s,
                 sz(m->free_after_load).s, sz(others).s, sz(p->act_late).s, sz(need).s);
            return DUET_ERR_NO_MEMORY;
        }
        fail(err, err_len,
             "--gpu-memory-utilization %.2f leaves %s for the KV cache, but the device has only "
             "%s free after loading (other processes hold %s, more than the rest of the "
             "device) and the first steps need %s of it: the KV cache takes the %s that is free",
             p->in.gpu_memory_utilization, sz(kv).s, sz(m->free_after_load).s, sz(others).s,
             sz(p->act_late).s, sz(room).s);
        kv = room;
    }
    *kv_bytes_p = kv;
    return DUET_OK;
}

duet_status mplan_check_kv_fixed(long long asked_b, int n_ranks, long long available,
                                 const char *where, const char *available_what, const char *flag,
                                 char *err, size_t err_len) {
    if (err_len) err[0] = '\0';
    if (n_ranks < 1) n_ranks = 1;
    /* asked_b is at most 9e18 (opt_parse_size): in double the product cannot wrap */
    double need = (double)asked_b * n_ranks;
    if (need <= (double)available) return DUET_OK;
    if (n_ranks == 1)
        fail(err, err_len, "%s does not fit: %s has %s %s", asked(flag, asked_b).s, where,
             sz(available).s, available_what);
    else
        fail(err, err_len,
             "%s does not fit: the %d ranks on %s need %s for their KV caches, %s has %s %s",
             asked(flag, asked_b).s, n_ranks, where,
             sz(need < 9e18 ? (long long)need : (long long)9e18).s, where, sz(available).s,
             available_what);
    return DUET_ERR_NO_MEMORY;
}
