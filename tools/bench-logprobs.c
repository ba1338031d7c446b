/* bench-logprobs: prompt logprobs of one chunk's rows on the host, the way the engine computes
 * them (smp_logprobs per prompt row), against the implementation before it (kept here as
 * `before_logprobs`: a double exp per vocabulary entry, the top n by quickselect over an index
 * array and qsort). Prints ms per row and per 2,048-row chunk for each, and the largest
 * difference between their answers. Times are this thread's CPU time. Numbers are in
 * docs/hardening.md. Usage: bench-logprobs [--vocab V] [--rows R] [--top N] [--reps K] */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/rng.h"
#include "engine/sampler.h"

/* the implementation smp_logprobs replaced */
static void before_logprobs(const float *logits, int V, int32_t token, int n, float *token_lp,
                            smp_logprob *top, int32_t *idx) {
    float mx = -INFINITY;
    for (int i = 0; i < V; i++) mx = logits[i] > mx ? logits[i] : mx;
    double sum = 0;
    for (int i = 0; i < V; i++) sum += exp((double)(logits[i] - mx));
    float lse = mx + (float)log(sum);
    *token_lp = logits[token] - lse;
    if (n <= 0) return;
    /* its top n: quickselect over an index array and a sort of the front, which the sampler
     * still uses for top-k */
    for (int i = 0; i < V; i++) idx[i] = i;
    smp_top_candidates(logits, idx, V, n);
    for (int i = 0; i < n; i++) {
        top[i].token = idx[i];
        top[i].logprob = logits[idx[i]] - lse;
    }
}

/* CPU time of this thread: on a machine shared with other work, wall time measures the others */
static double cpu_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int arg_int(int argc, char **argv, const char *name, int def) {
    for (int i = 1; i + 1 < argc; i++)
        if (!strcmp(argv[i], name)) return atoi(argv[i + 1]);
    return def;
}

int main(int argc, char **argv) {
    int V = arg_int(argc, argv, "--vocab", 129280); /* DeepSeek-V3's vocabulary */
    int R = arg_int(argc, argv, "--rows", 64);
    int n = arg_int(argc, argv, "--top", 20);
    int reps = arg_int(argc, argv, "--reps", 3);
    if (V < 1 || R < 1 || n < 0 || n > 20 || reps < 1) {
        fprintf(stderr, "bench-logprobs: --vocab >= 1, --rows >= 1, --top 0..20, --reps >= 1\n");
        return 2;
    }
    if (n > V) n = V;
    float *rows = malloc((size_t)R * (size_t)V * sizeof *rows);
    int32_t *idx = malloc((size_t)V * sizeof *idx);
    if (!rows || !idx) {
        fprintf(stderr, "bench-logprobs: out of memory for %d rows of %d\n", R, V);
        return 1;
    }
    rng_state rng;
    rng_seed(&rng, 1);
    /* logits like a model's: most mass on a few, a long tail */
    for (size_t i = 0; i < (size_t)R * V; i++) {
        double u = rng_uniform(&rng);
        rows[i] = (float)(u * u * u * 24.0 - 8.0);
    }
    smp_scratch scr = {0};
    smp_logprob a[20], b[20];
    float la = 0, lb = 0;
    double worst = 0;
    int mismatch = 0;
    for (int r = 0; r < R; r++) {
        const float *x = rows + (size_t)r * V;
        int32_t tok = (int32_t)((unsigned)r * 2654435761u % (unsigned)V);
        before_logprobs(x, V, tok, n, &la, a, idx);
        smp_logprobs(x, V, tok, n, &lb, b, &scr);
        worst = fmax(worst, fabs((double)la - lb));
        for (int i = 0; i < n; i++) {
            mismatch += a[i].token != b[i].token;
            worst = fmax(worst, fabs((double)a[i].logprob - b[i].logprob));
        }
    }
    double best_before = INFINITY, best_after = INFINITY;
    for (int k = 0; k < reps; k++) {
        double t0 = cpu_now_s();
        for (int r = 0; r < R; r++) before_logprobs(rows + (size_t)r * V, V, r % V, n, &la, a, idx);
        double t1 = cpu_now_s();
        for (int r = 0; r < R; r++) smp_logprobs(rows + (size_t)r * V, V, r % V, n, &lb, b, &scr);
        double t2 = cpu_now_s();
        best_before = fmin(best_before, (t1 - t0) / R);
        best_after = fmin(best_after, (t2 - t1) / R);
    }
    printf("bench-logprobs: vocab %d, top %d, %d rows x %d reps (thread CPU time, best rep)\n", V,
           n, R, reps);
    printf("  before: %.3f ms/row, %.0f ms per 2048-row chunk\n", best_before * 1e3,
           best_before * 2048 * 1e3);
    printf("  after:  %.3f ms/row, %.0f ms per 2048-row chunk (%.1fx)\n", best_after * 1e3,
           best_after * 2048 * 1e3, best_before / best_after);
    printf("  largest logprob difference %.3g, top-%d token mismatches %d\n", worst, n, mismatch);
    smp_scratch_free(&scr);
    free(rows);
    free(idx);
    /* the two must agree: a benchmark of a wrong answer measures nothing */
    return worst < 1e-4 && mismatch == 0 ? 0 : 1;
}
