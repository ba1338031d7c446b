/* memplan_check: the memory plan (model/memplan.h) against a real device. Starts an instance with
 * a plan as the workers do (--gpu-memory-utilization and the worker's limits), sizes the KV
 * cache from the device's readings (par_kv_budget), then runs the steps that reach the
 * activation peak: one sequence of max_model_len prefilled in chunks of max_num_batched_tokens
 * (the last chunk's attention over the whole context) and one step of max_num_seqs sequences.
 * Prints the plan next to what the device says, and passes when everything the instance took
 * (its CUDA context included) stays within total x utilization and, where the backend counts
 * its own allocations (be_ops.mem_used), that count agrees with the device's readings of the
 * load (within 2% + 128 MiB: the readings also see what libraries allocate themselves). Exit 77
 * (skipped) where the backend reports no device memory (the CPU). Usage: memplan_check --model DIR
 * --backend cuda [--load-format dummy] [--max-model-len N]
 *                      [--max-num-seqs N] [--max-num-batched-tokens N] [--block-size N]
 *                      [--gpu-memory-utilization F] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/opt.h"
#include "engine/parallel.h"
#include "model/model.h"
#include "plan_opts.h"

/* the CUDA backend's cuBLAS workspace: allocated when the backend is created, before the
 * first reading, so the readings do not see it */
#define CUBLAS_WORKSPACE (32LL << 20)

static double gib(long long b) {
    return (double)b / (double)(1LL << 30);
}

int main(int argc, char **argv) {
    par_options po;
    par_options_init(&po);
    const char *model = NULL;
    int max_model_len = 8192, max_num_seqs = 256, block_size = 64;
    double util = 0.9;
    const opt_spec specs[] = {
        {.name = "--model", .type = OPT_STRING, .dest = &model, .metavar = "DIR", .help = "model"},
        {.name = "--max-model-len",
         .type = OPT_INT,
         .dest = &max_model_len,
         .def = "8192",
         .min = 2,
         .max = 1 << 24,
         .help = "context length"},
        plan_spec_max_num_seqs(&max_num_seqs),
        plan_spec_max_num_batched_tokens(&po.max_tokens),
        plan_spec_block_size(&block_size),
        {.name = "--gpu-memory-utilization",
         .type = OPT_DOUBLE,
         .dest = &util,
         .def = "0.9",
         .help = "share of the device"},
    };
    opt_parser *op;
    if (opt_parser_create("memplan_check", "--model DIR [options]",
                          "The memory plan against a real device (see the source's header).",
                          &op) != DUET_OK)
        return 1;
    int prc = 2;
    if (opt_add(op, "Memory check", specs, (int)(sizeof specs / sizeof specs[0])) == DUET_OK &&
        par_options_add(op, &po) == DUET_OK)
        prc = opt_parse(op, argc, argv);
    opt_parser_destroy(op);
    if (prc) return prc == 1 ? 0 : 2;
    if (!model) {
        fprintf(stderr, "memplan_check: --model is required\n");
        return 2;
    }
    /* only a device backend reads its memory; skip before loading anything */
    if (strcmp(po.backend, "cpu") == 0) {
        printf("memplan_check: the cpu backend reports no device memory: skipped\n");
        return 77;
    }
    po.mem = (par_memory){.utilization = util,
                          .max_model_len = max_model_len,
                          .max_num_seqs = max_num_seqs,
                          .block_size = block_size,
                          .print_plan = true};
    par_instance *inst;
    if (par_instance_create(&po, model, &argc, &argv, &inst) != DUET_OK) return 1;
    const mplan *plan = par_memory_plan(inst);
    mplan_measured rd;
    if (!plan || !par_memory_readings(inst, &rd)) {
        printf("memplan_check: the %s backend reports no device memory: skipped\n", po.backend);
        par_instance_destroy(inst);
        return 77;
    }
    mdl_model *m = par_model(inst);
    int rc = 1;
    long long kv_bytes = 0;
    be_kv *kv = NULL;
    int32_t *tokens = NULL, *table = NULL;
    mdl_seq *seqs = NULL;
    float *logits = NULL;
    if (par_kv_budget(inst, &kv_bytes) != DUET_OK) goto out;
    long long per_block = (long long)mdl_kv_bytes_per_token(m) * block_size;
    int n_blocks = (int)(kv_bytes / per_block);
    int need = (max_model_len + block_size - 1) / block_size;
    if (mdl_kv_create(m, n_blocks, block_size, &kv) != DUET_OK) goto out;
    printf("KV cache: %d blocks = %lld tokens (%.1f GiB)\n", n_blocks,
           (long long)n_blocks * block_size, gib(n_blocks * per_block));

    int V = mdl_config(m)->vocab_size, T = po.max_tokens;
    int rows = max_num_seqs > 1 ? max_num_seqs : 1;
    tokens = malloc((size_t)max_model_len * sizeof *tokens);
    table = malloc((size_t)(need > rows ? need : rows) * sizeof *table);
    seqs = calloc((size_t)rows, sizeof *seqs);
    logits = malloc((size_t)rows * V * sizeof *logits);
    if (!tokens || !table || !seqs || !logits) goto out;
    uint32_t x = 12345;
    for (int i = 0; i < max_model_len; i++)
        tokens[i] = (int32_t)((x = x * 1664525u + 1013904223u) % (uint32_t)V);
    for (int i = 0; i < need || i < rows; i++) table[i] = i % n_blocks;
    /* one sequence of max_model_len in chunks of T: the last one attends over all of it */
    for (int pos = 0; pos < max_model_len; pos += T) {
        int n = max_model_len - pos < T ? max_model_len - pos : T;
        seqs[0] = (mdl_seq){.tokens = tokens + pos,
                            .n_tokens = n,
                            .pos0 = pos,
                            .block_table = table,
                            .n_blocks = need,
                            .n_logits = 1};
        if (par_forward(inst, kv, seqs, 1, logits) != DUET_OK) goto out;
    }
    /* max_num_seqs sequences of one token each, a logits row each */
    for (int i = 0; i < rows; i++)
        seqs[i] = (mdl_seq){.tokens = tokens + i,
                            .n_tokens = 1,
                            .pos0 = 0,
                            .block_table = table + i,
                            .n_blocks = 1,
                            .n_logits = 1};
    if (par_forward(inst, kv, seqs, rows, logits) != DUET_OK) goto out;

    long long total = 0, free_end = 0;
    if (be_mem_info(mdl_backend(m), &total, &free_end) != DUET_OK) goto out;
    long long loaded = rd.free_at_start - rd.free_after_load;
    long long kv_taken = (long long)(n_blocks + 1) * per_block;
    long long steps = rd.free_after_load - free_end - kv_taken;
    long long used = rd.free_at_start - free_end + CUBLAS_WORKSPACE;
    long long allowed = (long long)((double)total * util);
    printf("loading took %.2f GiB; the plan: %.2f GiB of weights + %.2f GiB of buffers\n",
           gib(loaded), gib(plan->w.total), gib(plan->act_at_load));
    printf("the steps took %.2f GiB more; the plan: %.2f GiB (scratch, EP staging, logits, "
           "metadata, allowances)\n",
           gib(steps), gib(plan->act_late));
    bool count_ok = true;
    if (rd.counted) {
        /* alone on the device, the backend's own count must see what the readings see of the
         * load: an allocation it missed would let a sharing instance take too much */
        long long counted = rd.own_after_load - rd.own_at_start;
        long long off = counted > loaded ? counted - loaded : loaded - counted;
        count_ok = off <= loaded / 50 + (128LL << 20);
        long long ctx = rd.context < MPLAN_CONTEXT_MAX ? rd.context : MPLAN_CONTEXT_MAX;
        printf("the backend counted %.2f GiB of its own allocations while loading (the readings: "
               "%.2f GiB): %s; context read as %.2f GiB\n",
               gib(counted), gib(loaded), count_ok ? "agree" : "DIFFER", gib(rd.context));
        used += ctx; /* the context is inside the utilization's share */
    }
    printf("the instance uses %.2f GiB of %.2f GiB allowed (%.2f of %.2f GiB): %s\n", gib(used),
           gib(allowed), util, gib(total), used <= allowed ? "within" : "OVER");
    rc = used <= allowed && count_ok ? 0 : 1;
out:
    free(tokens);
    free(table);
    free(seqs);
    free(logits);
    mdl_kv_destroy(m, kv);
    par_instance_destroy(inst);
    return rc;
}
