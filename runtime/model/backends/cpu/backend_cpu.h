/* The CPU reference backend: float32 throughout, OpenBLAS for the GEMMs, OpenMP across rows.
 * Every other backend is checked against it (tests/gpu/test_backend_ops.c). */
#ifndef DUET_BACKEND_CPU_H
#define DUET_BACKEND_CPU_H

#include "model/backend.h"

duet_status be_cpu_create(be_backend **be_p);

#endif
