/* The backend registry: picks the implementation by name. It sits above the backends (which
 * know only backend.h), so adding one touches this file and its meson entry, nothing else. */
#include "model/backends/registry.h"

#include <string.h>

#include "base/log.h"
#include "model/backends/cpu/backend_cpu.h"
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
        if (dtype == DT_BF16) return be_cpu_create_bf16(be_p); /* emulated, see backend_cpu.c */
        if (dtype != DT_COUNT && dtype != DT_F32) {
            LOG_ERROR("the cpu backend computes in float32 (or emulates bf16), not %s",
                      dt_name(dtype));
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
