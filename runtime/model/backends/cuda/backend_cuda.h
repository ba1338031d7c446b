/* The CUDA backend's public face: its constructor and a device count for tests and tools.
 * Plain C: nothing of the CUDA headers leaks out. The ops themselves are reached only through
 * be_ops (backend.h); runtime/cuda/cuda-impl.cuh holds the internals. */
#ifndef DUET_BACKEND_CUDA_H
#define DUET_BACKEND_CUDA_H

#include "model/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A backend on CUDA device `device` (a local index). dtype: DT_BF16 (bf16 weights and
 * activations, float32 accumulation; DT_COUNT picks it) or DT_F32 (float32 throughout: the
 * precision of the CPU reference, at twice the memory). DUET_ERR_NOT_FOUND when no usable
 * device or driver is present. */
duet_status be_cuda_create(int device, dt_dtype dtype, be_backend **be_p);

/* CUDA devices visible to this process; 0 when there is no driver or device. */
int be_cuda_device_count(void);

/* The cudaStream_t (as void *) every op of be is ordered on: for tests and tools that time ops
 * with events or capture them into a graph. */
void *be_cuda_stream(be_backend *be);

#ifdef __cplusplus
}
#endif

#endif
