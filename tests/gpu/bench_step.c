/* bench_step: the decode step of the model on one rank, timed next to its memory floor. Fills
 * B sequences with ctx tokens of context (prompt chunks), then times decode steps of one new
 * token per sequence as the engine runs them (mdl_forward leaving the logits on the device, then
 * greedy sampling on the device and one download of the ids), B from --batch. The floor is
 * the bytes the step must read (every weight it touches once, plus the KV it attends to) over
 * the device-copy bandwidth, which this program measures itself (cudaMemcpy device to device,
 * bytes read + written) unless --copy-gbps gives it.
 * With --spec K (an MTP checkpoint, e.g. duet-mkmodel --mtp --config-only with --load-format
 * dummy) it also times the verify step of MTP speculative decoding (K + 1 tokens per sequence,
 * a logits row each, sampled on the device as the engine does) and the K drafts after it
 * (mdl_draft), both after warm-up steps, so with graphs on they are timed as replays of their
 * recordings, and prints the speed-up they give at given acceptance rates: random weights
 * accept nearly nothing, so acceptance is an input. The last lines count the recordings and
 * replays, also by use (one-token decode, verify, draft passes).
 * Usage: bench_step --model DIR [--load-format dummy] [--backend cuda] [--batch 1,16,64]
 *                   [--ctx 1024] [--steps 50] [--enforce-eager] [--dtype bfloat16]
 *                   [--spec K] [--profile]
 * --profile brackets one more step of each batch size with cudaProfilerStart/Stop, for
 * `ncu --profile-from-start off` or `nsys --capture-range=cudaProfilerApi`.
 * --prefill P,P,... times prompts instead (what TTFT is made of): one sequence's P tokens in
 * chunks of --chunk, a logits row and the device's sampled id at the end, next to the compute
 * floor: the prompt's FLOPs (each token through the weights it touches, causal attention over
 * its prefix) over a dense bf16 GEMM's TFLOP/s measured in the same run (the backend's linear
 * op, 8192^3). With --profile the last prompt runs once more between cudaProfilerStart/Stop. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifdef DUET_HAVE_CUDA
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>
#endif

#include "base/clock.h"
#include "base/log.h"
#include "base/opt.h"
#include "engine/parallel.h"
#include "model/model.h"

/* Device-to-device copy bandwidth in GB/s, counting bytes read plus written; 0 when unknown. */
static double copy_gbps(void) {
#ifdef DUET_HAVE_CUDA
    size_t n = (size_t)2 << 30;
    void *a = NULL, *b = NULL;
    if (cudaMalloc(&a, n) != cudaSuccess || cudaMalloc(&b, n) != cudaSuccess) {
        cudaFree(a);
        (void)cudaGetLastError();
        return 0;
    }
    cudaMemset(a, 1, n);
    cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice); /* warm-up */
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    float best = 1e30f;
    for (int r = 0; r < 10; r++) {
        cudaEventRecord(e0, 0);
        cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice);
        cudaEventRecord(e1, 0);
        cudaEventSynchronize(e1);
        float ms = 0;
        cudaEventElapsedTime(&ms, e0, e1);
        if (ms < best) best = ms;
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    cudaFree(a);
    cudaFree(b);
    return 2.0 * (double)n / (best * 1e-3) / 1e9;
#else
    return 0;
#endif
}

/* Bytes of weights one decode step of B tokens reads (each once), activation dtype es. Routed
 * experts: the expected number of distinct ones B tokens pick, with routing taken as uniform
 * (dummy weights route nearly so; trained models' skew only lowers it). */
static double step_weight_bytes(const cfg_model *c, int B, double es) {
    double D = c->hidden_size, H = c->num_attention_heads, L = c->kv_lora_rank;
    double R = c->qk_rope_head_dim, nope = c->qk_nope_head_dim, v = c->v_head_dim;
    double qk = nope + R;
    double attn = 0;
    if (c->q_lora_rank)
        attn += D * c->q_lora_rank + (double)c->q_lora_rank * H * qk;
    else
        attn += D * H * qk;
    attn += D * (L + R) + L * H * (nope + v) + H * v * D;
    double dense = 3.0 * D * c->intermediate_size;
    double expert = 3.0 * D * c->moe_intermediate_size;
    double shared = c->n_shared_experts * expert;
    double E = c->n_routed_experts, K = c->num_experts_per_tok;
    double touched = E > 0 ? E * (1.0 - pow(1.0 - K / E, B)) : 0;
    double router = E * D * 4.0 / es; /* the gate stays float32 */
    int n_dense = c->first_k_dense_replace < c->num_hidden_layers ? c->first_k_dense_replace
                                                                  : c->num_hidden_layers;
    int n_moe = E > 0 ? c->num_hidden_layers - n_dense : 0;
    if (!(E > 0)) n_dense = c->num_hidden_layers;
    double elems = c->num_hidden_layers * attn + n_dense * dense +
                   n_moe * (shared + touched * expert + router) + (double)c->vocab_size * D;
    return elems * es;
}

static int parse_list(const char *s, int *out, int cap, long most) {
    int n = 0;
    while (*s && n < cap) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 1 || v > most) return -1;
        out[n++] = (int)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') return -1;
    }
    return n;
}

/* Dense bf16 GEMM TFLOP/s of the backend's linear op, [n, n] x [n, n]^T; 0 on failure. */
static double dense_tflops(be_backend *be, int n) {
    const be_ops *o = be->ops;
    size_t nn = (size_t)n * n;
    float *h = malloc(nn * sizeof *h);
    void *x = o->buf_alloc(be, nn), *y = o->buf_alloc(be, nn);
    be_weight *w = NULL;
    double best = 0;
    if (h && x && y) {
        uint64_t r = 99;
        for (size_t i = 0; i < nn; i++) {
            r = r * 6364136223846793005ull + 1442695040888963407ull;
            h[i] = (float)((double)(r >> 40) / 16777216.0 - 0.5);
        }
        if (o->upload(be, x, 0, h, nn) == DUET_OK &&
            o->weight_create(be, h, n, n, false, &w) == DUET_OK) {
            for (int it = 0; it < 12; it++) {
                double t0 = clock_now_s();
                o->linear(be, y, x, n, n, w);
                if (o->sync(be) != DUET_OK) break;
                double tf = 2.0 * n * (double)nn / (clock_now_s() - t0) / 1e12;
                if (it >= 2 && tf > best) best = tf;
            }
        }
    }
    if (w) o->weight_destroy(be, w);
    o->buf_free(be, x);
    o->buf_free(be, y);
    free(h);
    return best;
}

/* --prefill: each prompt length in p_list, as one sequence's chunks, timed. */
static int prefill_main(par_options *po, const char *model, int *argc, char ***argv,
                        const int *p_list, int n_p, int chunk, int block_size, bool profile) {
    int max_p = 1;
    for (int i = 0; i < n_p; i++) max_p = p_list[i] > max_p ? p_list[i] : max_p;
    if (po->max_tokens < chunk) po->max_tokens = chunk;
    par_instance *inst;
    if (par_instance_create(po, model, argc, argv, &inst) != DUET_OK) return 1;
    mdl_model *m = par_model(inst);
    const cfg_model *c = mdl_config(m);
    be_backend *be = mdl_backend(m);
    int per_seq = max_p / block_size + 2;
    be_kv *kv = NULL;
    if (mdl_kv_create(m, per_seq + 1, block_size, &kv) != DUET_OK) return 1;
    int32_t *table = malloc((size_t)per_seq * sizeof *table);
    int32_t *tokens = malloc((size_t)max_p * sizeof *tokens);
    be_sampler *smp = NULL;
    if (!table || !tokens || be_sampler_create(be, 1, c->vocab_size, 0, &smp) != DUET_OK) return 1;
    be_sample_row_init(&smp->rows[0]);
    smp->rows[0].logits_row = 0;
    for (int i = 0; i < per_seq; i++) table[i] = i;
    uint64_t x = 777;
    for (int i = 0; i < max_p; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        tokens[i] = (int32_t)((x >> 33) % (uint64_t)c->vocab_size);
    }
    double tflops = dense_tflops(be, 8192);
    /* per token: every weight it touches once (bench_step's byte count at one byte an element,
     * the float32 router counted once, the lm_head left out: one row a prompt) */
    double E = c->n_routed_experts;
    int n_dense = c->first_k_dense_replace < c->num_hidden_layers ? c->first_k_dense_replace
                                                                  : c->num_hidden_layers;
    int n_moe = E > 0 ? c->num_hidden_layers - n_dense : 0;
    double params = step_weight_bytes(c, 1, 1.0) - (double)c->vocab_size * c->hidden_size -
                    n_moe * E * c->hidden_size * 3.0;
    double qkv = (double)c->num_attention_heads *
                 (c->qk_nope_head_dim + c->qk_rope_head_dim + c->v_head_dim);
    printf("model %s: %d layers, hidden %d, %d experts top-%d; %s; dense bf16 GEMM %.1f TFLOP/s; "
           "chunks of %d; %.3g weight FLOPs a token\n",
           model, c->num_hidden_layers, c->hidden_size, c->n_routed_experts, c->num_experts_per_tok,
           dt_name(be->ops->act_dtype), tflops, chunk, 2 * params);
    printf("%8s %10s %10s %10s %8s %10s\n", "prompt", "ms", "tok/s", "floor_ms", "ratio",
           "TFLOP/s");
    int rc = 0;
    for (int pi = 0; pi < n_p && !rc; pi++) {
        int P = p_list[pi];
        double best = 1e30;
        int runs = 3 + (profile && pi == n_p - 1 ? 1 : 0);
        for (int it = 0; it <= runs && !rc; it++) { /* run 0 warms up */
#ifdef DUET_HAVE_CUDA
            if (it == 4) cudaProfilerStart();
#endif
            double t0 = clock_now_s();
            for (int p0 = 0; p0 < P && !rc; p0 += chunk) {
                int n = P - p0 < chunk ? P - p0 : chunk;
                mdl_seq q = {.tokens = tokens + p0,
                             .n_tokens = n,
                             .pos0 = p0,
                             .block_table = table,
                             .n_blocks = per_seq,
                             .n_logits = p0 + n == P};
                if (mdl_forward(m, kv, &q, 1, NULL) != DUET_OK) rc = 1;
            }
            if (!rc &&
                (mdl_sample_queue(m, smp, 1) != DUET_OK || be_sample_wait(be, smp) != DUET_OK))
                rc = 1;
            double ms = (clock_now_s() - t0) * 1e3;
#ifdef DUET_HAVE_CUDA
            if (it == 4) cudaProfilerStop();
#endif
            if (it >= 1 && it <= 3 && ms < best) best = ms;
        }
        if (rc) break;
        double flops =
            2.0 * params * P + (double)c->num_hidden_layers * 2.0 * qkv * P * (P + 1) / 2;
        double floor_ms = tflops > 0 ? flops / (tflops * 1e12) * 1e3 : 0;
        printf("%8d %10.2f %10.0f %10.2f %8.2f %10.1f\n", P, best, P / (best * 1e-3), floor_ms,
               floor_ms > 0 ? best / floor_ms : 0, flops / (best * 1e-3) / 1e12);
        fflush(stdout);
    }
    free(table);
    free(tokens);
    be_sampler_destroy(be, smp);
    mdl_kv_destroy(m, kv);
    par_instance_destroy(inst);
    return rc;
}

int main(int argc, char **argv) {
    log_set_tag("bench_step");
    par_options po;
    par_options_init(&po);
    const char *model = NULL, *batches = "1,16,64";
    int ctx = 1024, steps = 50, block_size = 64, spec = 0, chunk = 8192;
    const char *prefill = NULL;
    double gbps = 0;
    bool profile = false;
    const opt_spec specs[] = {
        {.name = "--model",
         .type = OPT_STRING,
         .dest = &model,
         .metavar = "DIR",
         .help = "checkpoint folder (config.json alone with --load-format dummy)"},
        {.name = "--batch",
         .type = OPT_STRING,
         .dest = &batches,
         .metavar = "B,B,...",
         .help = "batch sizes (default 1,16,64)"},
        {.name = "--ctx",
         .type = OPT_INT,
         .dest = &ctx,
         .min = 1,
         .max = 1 << 20,
         .def = "1024",
         .help = "context tokens per sequence before the timed steps"},
        {.name = "--steps",
         .type = OPT_INT,
         .dest = &steps,
         .min = 1,
         .max = 100000,
         .def = "50",
         .help = "timed decode steps per batch size"},
        {.name = "--block-size",
         .type = OPT_INT,
         .dest = &block_size,
         .min = 1,
         .max = 4096,
         .def = "64"},
        {.name = "--spec",
         .type = OPT_INT,
         .dest = &spec,
         .min = 0,
         .max = MDL_MAX_DRAFT,
         .def = "0",
         .help = "also time MTP's verify step of K + 1 tokens and its K drafts"},
        {.name = "--copy-gbps",
         .type = OPT_DOUBLE,
         .dest = &gbps,
         .min = 0,
         .max = 1e6,
         .help = "device-copy bandwidth for the floor (default: measured here)"},
        {.name = "--prefill",
         .type = OPT_STRING,
         .dest = &prefill,
         .metavar = "P,P,...",
         .help = "time prompts of P tokens (TTFT's work) instead of decode steps"},
        {.name = "--chunk",
         .type = OPT_INT,
         .dest = &chunk,
         .min = 1,
         .max = 1 << 20,
         .def = "8192",
         .help = "--prefill: tokens per forward (the server's --max-num-batched-tokens)"},
        {.name = "--profile",
         .type = OPT_FLAG,
         .dest = &profile,
         .help = "one more step per batch size between cudaProfilerStart and cudaProfilerStop"},
    };
    opt_parser *op;
    if (opt_parser_create("bench_step", "--model DIR [options]",
                          "Times decode steps of one token per sequence next to the step's "
                          "memory floor.",
                          &op) != DUET_OK)
        return 1;
    int prc = 2;
    if (opt_add(op, "Benchmark", specs, (int)(sizeof specs / sizeof specs[0])) == DUET_OK &&
        par_options_add(op, &po) == DUET_OK)
        prc = opt_parse(op, argc, argv);
    int bs_list[32];
    int n_b = prc == 0 ? parse_list(batches, bs_list, 32, 4096) : 0;
    int p_list[16];
    int n_p = prc == 0 && prefill ? parse_list(prefill, p_list, 16, 1 << 20) : 0;
    opt_parser_destroy(op);
    if (prc) return prc == 1 ? 0 : 2;
    if (!model || n_b <= 0 || n_p < 0) {
        fprintf(stderr, "bench_step: --model and valid --batch / --prefill lists are required\n");
        return 2;
    }
    if (n_p > 0)
        return prefill_main(&po, model, &argc, &argv, p_list, n_p, chunk, block_size, profile);
    int max_b = 1;
    for (int i = 0; i < n_b; i++) max_b = bs_list[i] > max_b ? bs_list[i] : max_b;
    po.max_tokens = 2048 > max_b * (spec + 1) ? 2048 : max_b * (spec + 1);
    po.spec_tokens = spec;

    par_instance *inst;
    if (par_instance_create(&po, model, &argc, &argv, &inst) != DUET_OK) return 1;
    mdl_model *m = par_model(inst);
    const cfg_model *c = mdl_config(m);
    /* the timed steps: 3 + steps one-token ones, then as many verify steps of spec + 1 */
    int per_seq = (ctx + (steps + 3) * (spec + 2) + 8) / block_size + 1;
    be_kv *kv = NULL;
    if (mdl_kv_create(m, max_b * per_seq + 1, block_size, &kv) != DUET_OK) return 1;
    if (gbps <= 0) gbps = copy_gbps();

    int32_t *tables = malloc((size_t)max_b * per_seq * sizeof(int32_t));
    int32_t *tokens = malloc((size_t)(ctx > max_b ? ctx : max_b) * sizeof(int32_t));
    mdl_draft_seq *dseqs = calloc((size_t)max_b, sizeof *dseqs);
    int32_t *drafts = calloc((size_t)max_b * MDL_MAX_DRAFT, sizeof *drafts);
    if (!dseqs || !drafts) return 1;
    mdl_seq *seqs = calloc((size_t)max_b, sizeof *seqs);
    be_sampler *smp = NULL;
    /* rows: a one-token step's, or a verify step's spec + 1 a sequence */
    int max_rows = max_b * (spec + 1);
    if (!tables || !tokens || !seqs ||
        be_sampler_create(mdl_backend(m), max_rows, c->vocab_size, 0, &smp) != DUET_OK)
        return 1;
    for (int i = 0; i < max_rows; i++) {
        be_sample_row_init(&smp->rows[i]);
        smp->rows[i].logits_row = i;
    }
    for (int i = 0; i < max_b * per_seq; i++) tables[i] = i;
    uint64_t x = 12345;
    for (int i = 0; i < ctx; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        tokens[i] = (int32_t)((x >> 33) % (uint64_t)c->vocab_size);
    }
    double es = dt_size(mdl_backend(m)->ops->act_dtype);
    double kv_tok = (double)mdl_kv_bytes_per_token(m);
    printf("model %s: %d layers, hidden %d, %d experts top-%d, vocab %d; %s; copy %.0f GB/s; "
           "ctx %d; graphs %s\n",
           model, c->num_hidden_layers, c->hidden_size, c->n_routed_experts, c->num_experts_per_tok,
           c->vocab_size, dt_name(mdl_backend(m)->ops->act_dtype), gbps, ctx,
           mdl_graphs_on(m) ? "on" : "off");
    printf("%6s %10s %10s %10s %8s %12s\n", "batch", "ms/step", "floor_ms", "ratio", "GB/s",
           "bytes/step");
    int rc = 0;
    for (int bi = 0; bi < n_b && !rc; bi++) {
        int B = bs_list[bi];
        /* context: each sequence's prompt in chunks, one sequence at a time */
        for (int s = 0; s < B && !rc; s++) {
            for (int p0 = 0; p0 < ctx && !rc; p0 += 2048) {
                int n = ctx - p0 < 2048 ? ctx - p0 : 2048;
                mdl_seq q = {.tokens = tokens + p0,
                             .n_tokens = n,
                             .pos0 = p0,
                             .block_table = tables + (size_t)s * per_seq,
                             .n_blocks = per_seq,
                             .n_logits = 0};
                if (mdl_forward(m, kv, &q, 1, NULL) != DUET_OK) rc = 1;
            }
        }
        int warm = 3;
        double t0 = 0, t1 = 0;
        for (int it = 0; it < warm + steps + (profile ? 1 : 0) && !rc; it++) {
            if (it == warm) t0 = clock_now_s();
            if (it == warm + steps) {
                t1 = clock_now_s();
#ifdef DUET_HAVE_CUDA
                cudaProfilerStart();
#endif
            }
            for (int s = 0; s < B; s++)
                seqs[s] = (mdl_seq){.tokens = tokens + (s + it) % ctx,
                                    .n_tokens = 1,
                                    .pos0 = ctx + it,
                                    .block_table = tables + (size_t)s * per_seq,
                                    .n_blocks = per_seq,
                                    .n_logits = 1};
            /* the engine's step: logits stay on the device, the ids come back */
            if (mdl_forward(m, kv, seqs, B, NULL) != DUET_OK ||
                mdl_sample_queue(m, smp, B) != DUET_OK ||
                be_sample_wait(mdl_backend(m), smp) != DUET_OK)
                rc = 1;
        }
#ifdef DUET_HAVE_CUDA
        if (profile) cudaProfilerStop();
#endif
        if (rc) break;
        double ms = ((profile ? t1 : clock_now_s()) - t0) * 1e3 / steps;
        double bytes = step_weight_bytes(c, B, es) + (double)B * (ctx + warm + steps / 2) * kv_tok;
        double floor_ms = gbps > 0 ? bytes / (gbps * 1e9) * 1e3 : 0;
        printf("%6d %10.3f %10.3f %10.2f %8.0f %12.3e\n", B, ms, floor_ms,
               floor_ms > 0 ? ms / floor_ms : 0, bytes / (ms * 1e-3) / 1e9, bytes);
        fflush(stdout);
        if (spec > 0) {
            /* MTP: verify steps of spec + 1 tokens, each followed by the module's catch-up on
             * one position and its spec drafts (what a step that accepted nothing runs) */
            int pos = ctx + warm + steps;
            double tv = 0, td = 0;
            for (int it = 0; it < warm + steps && !rc; it++) {
                for (int s = 0; s < B; s++)
                    seqs[s] = (mdl_seq){.tokens = tokens + (s + it) % (ctx - spec),
                                        .n_tokens = spec + 1,
                                        .pos0 = pos,
                                        .block_table = tables + (size_t)s * per_seq,
                                        .n_blocks = per_seq,
                                        .n_logits = spec + 1};
                /* the engine's verify: logits stay on the device, every row sampled there */
                double a = clock_now_s();
                if (mdl_forward(m, kv, seqs, B, NULL) != DUET_OK ||
                    mdl_sample_queue(m, smp, B * (spec + 1)) != DUET_OK ||
                    be_sample_wait(mdl_backend(m), smp) != DUET_OK)
                    rc = 1;
                double b = clock_now_s();
                for (int s = 0; s < B; s++)
                    dseqs[s] = (mdl_draft_seq){.tokens = tokens + (s + it + 1) % (ctx - spec),
                                               .n_tokens = 1,
                                               .pos0 = pos,
                                               .hid0 = s * (spec + 1),
                                               .block_table = tables + (size_t)s * per_seq,
                                               .n_blocks = per_seq,
                                               .n_draft = spec};
                if (!rc && mdl_draft(m, kv, dseqs, B, drafts) != DUET_OK) rc = 1;
                double d = clock_now_s();
                if (it >= warm) {
                    tv += b - a;
                    td += d - b;
                }
                pos += 1;
            }
            if (rc) break;
            double v_ms = tv * 1e3 / steps, d_ms = td * 1e3 / steps;
            printf("  MTP k=%d: verify %.3f ms (%.2fx a one-token step), drafts %.3f ms; "
                   "speed-up at acceptance",
                   spec, v_ms, v_ms / ms, d_ms);
            static const double acc[] = {0.7, 0.8, 0.85, 0.9};
            for (int i = 0; i < 4; i++) {
                /* tokens per step with each further draft accepted at the same rate */
                double tok = 1, pa = 1;
                for (int j = 0; j < spec; j++) tok += (pa *= acc[i]);
                printf(" %.2f: %.2fx", acc[i], tok * ms / (v_ms + d_ms));
            }
            printf(" (random weights: acceptance not measured)\n");
            fflush(stdout);
        }
    }
    uint64_t rec = 0, launched = 0;
    mdl_graph_counts(m, &rec, &launched);
    printf("graphs: %llu recorded, %llu replays\n", (unsigned long long)rec,
           (unsigned long long)launched);
    static const char *const uses[MDL_GRAPH_USES] = {"decode", "verify", "drafts"};
    printf("graphs by use (recorded/replays):");
    for (int u = 0; u < MDL_GRAPH_USES; u++) {
        mdl_graph_counts_of(m, (mdl_graph_use)u, &rec, &launched);
        printf(" %s %llu/%llu", uses[u], (unsigned long long)rec, (unsigned long long)launched);
    }
    printf("\n");
    free(tables);
    free(tokens);
    be_sampler_destroy(mdl_backend(m), smp);
    free(seqs);
    free(dseqs);
    free(drafts);
    mdl_kv_destroy(m, kv);
    par_instance_destroy(inst);
    return rc;
}
