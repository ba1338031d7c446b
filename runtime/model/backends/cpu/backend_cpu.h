/* The CPU reference backend: float32 throughout, OpenBLAS for the GEMMs, OpenMP across rows.
 * Every other backend is checked against it (tests/gpu/test_backend_ops.c). */
#ifndef DUET_BACKEND_CPU_H
#define DUET_BACKEND_CPU_H

#include "model/backend.h"

duet_status be_cpu_create(be_backend **be_p);
/* The same arithmetic with every value the CUDA backend stores as bf16 rounded to bf16 where it
 * stores it (see backend_cpu.c): the reference for the cost of bf16. Buffers stay float32. */
duet_status be_cpu_create_bf16(be_backend **be_p);

#endif
