/* What the CUDA microbenchmarks (bench_moe, bench_fp8) share: CU(call) prints a failed CUDA
 * runtime call (file:line, the call, the error) and sets g_failed, which the program turns into
 * its exit status at the end; cmp_f orders floats for qsort (medians of timings). Header-only. */
#ifndef DUET_TEST_CUBENCH_H
#define DUET_TEST_CUBENCH_H

#include <cuda_runtime_api.h>
#include <stdio.h>

static int g_failed;

#define CU(call)                                                                                   \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) {                                                                   \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            g_failed = 1;                                                                          \
        }                                                                                          \
    } while (0)

static inline int cmp_f(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x < y ? -1 : x > y;
}

#endif
