/* Helpers for tests that run the model on the CPU backend: load a checkpoint directory, run a
 * prompt in one step, compare logits rows. Header-only; one thread. */
#ifndef DUET_TEST_MODEL_H
#define DUET_TEST_MODEL_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "model/backends/registry.h"
#include "model/backend.h"
#include "model/model.h"

typedef struct tm_model {
    be_backend *be;
    mdl_model *m;
} tm_model;

static inline duet_status tm_load(const char *dir, mdl_weights_source source, uint64_t seed,
                                  tm_model *tm) {
    tm->be = NULL;
    tm->m = NULL;
    duet_status st = be_create("cpu", 0, &tm->be);
    if (st != DUET_OK) return st;
    mdl_shard shard = {.tp_rank = 0, .tp_size = 1, .ep_rank = 0, .ep_size = 1};
    mdl_load_opts lo = {.source = source, .dummy_seed = seed, .max_tokens = 64};
    st = mdl_load(dir, tm->be, &shard, &lo, &tm->m);
    if (st != DUET_OK) {
        be_destroy(tm->be);
        tm->be = NULL;
    }
    return st;
}

static inline void tm_unload(tm_model *tm) {
    mdl_destroy(tm->m);
    be_destroy(tm->be);
    tm->m = NULL;
    tm->be = NULL;
}

/* The whole prompt in one step on a fresh KV cache; every row of logits into out [n, V]. */
static inline duet_status tm_prefill(tm_model *tm, const int32_t *tokens, int n, float *out) {
    const int bs = 16, nb = (n + bs - 1) / bs;
    be_kv *kv = NULL;
    duet_status st = mdl_kv_create(tm->m, nb, bs, &kv);
    if (st != DUET_OK) return st;
    int32_t *table = malloc((size_t)nb * sizeof *table);
    if (!table) {
        mdl_kv_destroy(tm->m, kv);
        return DUET_ERR_NO_MEMORY;
    }
    for (int i = 0; i < nb; i++) table[i] = nb - 1 - i;
    mdl_seq s = {.tokens = tokens,
                 .n_tokens = n,
                 .pos0 = 0,
                 .block_table = table,
                 .n_blocks = nb,
                 .n_logits = n};
    st = mdl_forward(tm->m, kv, &s, 1, out);
    free(table);
    mdl_kv_destroy(tm->m, kv);
    return st;
}

/* n token ids in [0, vocab), a fixed function of seed. */
static inline void tm_prompt(int32_t *ids, int n, int vocab, uint32_t seed) {
    uint32_t x = seed * 2654435761u + 12345u;
    for (int i = 0; i < n; i++) {
        x = x * 1664525u + 1013904223u;
        ids[i] = (int32_t)((x >> 8) % (uint32_t)vocab);
    }
}

/* ||a - ref|| / ||ref|| */
static inline double tm_rel_l2(const float *a, const float *ref, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

static inline int tm_all_finite(const float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return 0;
    return 1;
}

static inline int tm_argmax(const float *x, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

#endif
