/* The wrappers that apply an optional op's fallback once, for every backend (the registry that
 * picks a backend by name sits above the backends: backends/registry.c). */
#include "model/backend.h"

#include <stdlib.h>
#include <string.h>

#include "base/log.h"

void be_destroy(be_backend *be) {
    if (be) be->ops->destroy(be);
}

duet_status be_mem_info(be_backend *be, long long *total_p, long long *free_p) {
    if (!be->ops->mem_info) return DUET_ERR_UNSUPPORTED;
    size_t total = 0, free_b = 0;
    duet_status st = be->ops->mem_info(be, &total, &free_b);
    if (st != DUET_OK) return st;
    *total_p = (long long)total;
    *free_p = (long long)free_b;
    return DUET_OK;
}

duet_status be_sample(be_backend *be, const void *logits, int n, int V, const be_sample_row *rows,
                      int32_t *ids) {
    if (n <= 0) return DUET_OK;
    if (V <= 0) return DUET_ERR_INVALID;
    if (be->ops->sample) return be->ops->sample(be, logits, n, V, rows, ids);
    /* fallback: one row at a time through host memory */
    float *buf = malloc((size_t)V * 3 * sizeof(float));
    if (!buf) return DUET_ERR_NO_MEMORY;
    duet_status st = DUET_OK;
    for (int r = 0; r < n && st == DUET_OK; r++) {
        st = be->ops->download(be, buf, logits, (size_t)r * V, (size_t)V);
        if (st == DUET_OK) ids[r] = be_sample_host(buf, V, &rows[r], buf + V);
    }
    free(buf);
    return st;
}
