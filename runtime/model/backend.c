/* Backend registry: picks the implementation by name, and the wrappers that apply an optional
 * op's fallback. */
#include "model/backend.h"

#include <stdlib.h>
#include <string.h>

#include "base/log.h"

#ifdef DUET_HAVE_CUDA
#include "model/backends/cuda/backend_cuda.h"
#endif

bool be_available(const char *name) {
    if (!strcmp(name, "cpu")) return true;
#ifdef DUET_HAVE_CUDA
    if (!strcmp(name, "cuda")) return true;
#endif
    return false;
}

duet_status be_create(const char *name, int device, be_backend **be_p) {
    return be_create_dtype(name, device, DT_COUNT, be_p);
}

duet_status be_create_dtype(const char *name, int device, dt_dtype dtype, be_backend **be_p) {
    (void)device;
    if (!strcmp(name, "cpu")) {
        if (dtype != DT_COUNT && dtype != DT_F32) {
            LOG_ERROR("the cpu backend computes in float32 only (asked for %s)", dt_name(dtype));
            return DUET_ERR_UNSUPPORTED;
        }
        return be_cpu_create(be_p);
    }
#ifdef DUET_HAVE_CUDA
    if (!strcmp(name, "cuda")) return be_cuda_create(device, dtype, be_p);
#endif
    LOG_ERROR("backend \"%s\" is not %s", name,
              !strcmp(name, "cuda") ? "in this build (configure with -Dcuda=enabled)"
                                    : "known (cpu, cuda)");
    return DUET_ERR_UNSUPPORTED;
}

void be_destroy(be_backend *be) {
    if (be) be->ops->destroy(be);
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
