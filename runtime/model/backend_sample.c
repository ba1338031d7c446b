/* The host rule of be_ops.sample (see be_sample_row in backend.h) and the be_sample wrapper
 * that falls back to it for backends without a sampling op. The CUDA kernel implements the
 * same rule; tests/gpu/test_sample.c holds the two against each other. */
#include <math.h>
#include <stdlib.h>

#include "model/backend.h"
#include "base/philox.h"

static int cmp_desc(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x > y ? -1 : x < y ? 1 : 0;
}

int32_t be_sample_host(const float *logits, int V, const be_sample_row *row, float *scratch) {
    int best = 0;
    for (int i = 1; i < V; i++)
        if (logits[i] > logits[best]) best = i;
    if (!(row->temperature >= 1e-5f)) return best;

    /* p[V]: unnormalized probabilities at temperature; 0 marks a dropped token */
    float *p = scratch, *sorted = scratch + V;
    float mx = logits[best], inv_t = 1.0f / row->temperature;
    for (int i = 0; i < V; i++) p[i] = expf((logits[i] - mx) * inv_t);
    if (row->top_k > 0 && row->top_k < V) {
        for (int i = 0; i < V; i++) sorted[i] = logits[i];
        qsort(sorted, (size_t)V, sizeof *sorted, cmp_desc);
        float kth = sorted[row->top_k - 1];
        for (int i = 0; i < V; i++)
            if (logits[i] < kth) p[i] = 0.0f;
    }
    if (row->top_p < 1.0f) {
        double total = 0;
        int n = 0;
        for (int i = 0; i < V; i++)
            if (p[i] > 0.0f) {
                total += p[i];
                sorted[n++] = p[i];
            }
        qsort(sorted, (size_t)n, sizeof *sorted, cmp_desc);
        /* walk groups of equal values, most likely first: a group stays while the mass
         * strictly above it is below top_p */
        double above = 0, limit = (double)row->top_p * total;
        float keep_from = sorted[0];
        for (int j = 0; j < n;) {
            if (!(above < limit)) break;
            keep_from = sorted[j];
            int k = j;
            while (k < n && sorted[k] == sorted[j]) above += sorted[k++];
            j = k;
        }
        for (int i = 0; i < V; i++)
            if (p[i] < keep_from) p[i] = 0.0f;
    }
    if (row->min_p > 0.0f) {
        /* the most likely token has p = exp(0) = 1 and survives top-k and top-p */
        for (int i = 0; i < V; i++)
            if (p[i] < row->min_p) p[i] = 0.0f;
    }
    double total = 0;
    for (int i = 0; i < V; i++) total += p[i];
    double target = philox_uniform(row->seed, row->offset) * total, acc = 0;
    int last = best;
    for (int i = 0; i < V; i++) {
        if (p[i] <= 0.0f) continue;
        acc += p[i];
        last = i;
        if (acc > target) return i;
    }
    return last; /* rounding left target at the very top */
}
