/* Backends by name ("cpu", "cuda"): what this build has and a constructor. The ops table
 * itself is model/backend.h; each backend's own header says what it needs. */
#ifndef DUET_BACKEND_REGISTRY_H
#define DUET_BACKEND_REGISTRY_H

#include <stdbool.h>

#include "model/backend.h"

/* Creates a backend by name ("cpu", "cuda"); device is the local device index. */
duet_status be_create(const char *name, int device, be_backend **be_p);
/* The same with the activation and weight type: DT_F32 or DT_BF16, DT_COUNT for the backend's
 * default (float32 on the CPU; bf16 on CUDA). DT_BF16 on the CPU emulates CUDA's bf16 storage
 * in float32 buffers (be_cpu_create_bf16). Router weights created keep_f32 stay float32 either
 * way. */
duet_status be_create_dtype(const char *name, int device, dt_dtype dtype, be_backend **be_p);
/* Whether this build has the named backend. */
bool be_available(const char *name);

#endif
