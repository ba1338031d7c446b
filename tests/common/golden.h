/* Reads a golden case directory (cases.json + logits.f32, see ../shared/golden/README.md) for
 * tests. Header-only; test programs only. */
#ifndef DUET_TEST_GOLDEN_H
#define DUET_TEST_GOLDEN_H

#include <cjson/cJSON.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/fileio.h"

typedef struct golden_case {
    char name[64];
    int32_t prompt[512];
    int n_prompt;
    int32_t greedy[64];
    int n_greedy;
    const float *prefill; /* [n_prompt][V] */
    const float *decode;  /* [n_greedy - 1][V] */
} golden_case;

typedef struct golden_set {
    golden_case cases[32];
    int n;
    int V;
    fio_map map;
} golden_set;

static inline int golden_load(const char *dir, int V, golden_set *g) {
    char path[4096];
    char *text = NULL;
    memset(g, 0, sizeof *g);
    g->V = V;
    snprintf(path, sizeof path, "%s/cases.json", dir);
    if (fio_read_text(path, 1 << 24, &text) != DUET_OK) return -1;
    cJSON *root = cJSON_Parse(text);
    free(text);
    snprintf(path, sizeof path, "%s/logits.f32", dir);
    if (!root || fio_map_file(path, &g->map) != DUET_OK) return -1;
    const cJSON *c;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(root, "cases")) {
        golden_case *k = &g->cases[g->n++];
        snprintf(k->name, sizeof k->name, "%s", cJSON_GetObjectItem(c, "name")->valuestring);
        const cJSON *x;
        cJSON_ArrayForEach(x, cJSON_GetObjectItem(c, "prompt_ids")) k->prompt[k->n_prompt++] =
            x->valueint;
        cJSON_ArrayForEach(x, cJSON_GetObjectItem(c, "greedy_ids")) k->greedy[k->n_greedy++] =
            x->valueint;
        size_t po = (size_t)cJSON_GetObjectItem(cJSON_GetObjectItem(c, "prefill_logits"), "offset")
                        ->valuedouble;
        size_t dof = (size_t)cJSON_GetObjectItem(cJSON_GetObjectItem(c, "decode_logits"), "offset")
                         ->valuedouble;
        k->prefill = (const float *)((const char *)g->map.data + po);
        k->decode = (const float *)((const char *)g->map.data + dof);
    }
    cJSON_Delete(root);
    return 0;
}

static inline double golden_rel_l2(const float *a, const float *ref, int n) {
    double num = 0, den = 0;
    for (int i = 0; i < n; i++) {
        double d = (double)a[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

/* The reference row after the token at position pos of case k (prompt rows, then decode
 * rows after each fed greedy token), or NULL past the end. */
static inline const float *golden_row(const golden_set *g, const golden_case *k, int pos) {
    if (pos < k->n_prompt) return k->prefill + (size_t)pos * g->V;
    int s = pos - k->n_prompt;
    return s < k->n_greedy - 1 ? k->decode + (size_t)s * g->V : NULL;
}

#endif
