/* Backend registry: picks the implementation by name. */
#include "backend.h"

#include <string.h>

#include "log.h"

#ifdef DUET_HAVE_CUDA
duet_status be_cuda_create(int device, be_backend **be_p);
#endif

bool be_available(const char *name) {
    if (!strcmp(name, "cpu")) return true;
#ifdef DUET_HAVE_CUDA
    if (!strcmp(name, "cuda")) return true;
#endif
    return false;
}

duet_status be_create(const char *name, int device, be_backend **be_p) {
    (void)device;
    if (!strcmp(name, "cpu")) return be_cpu_create(be_p);
#ifdef DUET_HAVE_CUDA
    if (!strcmp(name, "cuda")) return be_cuda_create(device, be_p);
#endif
    LOG_ERROR("backend \"%s\" is not %s", name,
              !strcmp(name, "cuda") ? "in this build (configure with -Dcuda=enabled)"
                                    : "known (cpu, cuda)");
    return DUET_ERR_UNSUPPORTED;
}

void be_destroy(be_backend *be) {
    if (be) be->ops->destroy(be);
}
