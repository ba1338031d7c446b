/* The xorshift64 generator the op tests and benchmarks draw their inputs from (C and CUDA C++):
 * one stream per program in g_xs, seeded by XS_SEED where the including file defines it before
 * the #include (else 0: the file seeds g_xs itself before the first draw, e.g. from
 * DUET_TEST_SEED). Uniform floats take the top 24 bits. Header-only; one thread. */
#ifndef DUET_TEST_XORSHIFT_H
#define DUET_TEST_XORSHIFT_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#ifndef XS_SEED
#define XS_SEED 0
#endif

static uint64_t g_xs = XS_SEED;

static inline uint64_t xs_next(void) {
    g_xs ^= g_xs << 13;
    g_xs ^= g_xs >> 7;
    g_xs ^= g_xs << 17;
    return g_xs;
}

/* uniform in [-a, a) */
static inline float xs_uniform(float a) {
    return ((float)(xs_next() >> 40) / 16777216.0f * 2.0f - 1.0f) * a;
}

static inline void xs_fill(float *v, size_t n, float a) {
    for (size_t i = 0; i < n; i++) v[i] = xs_uniform(a);
}

/* n draws in a new heap array (never NULL-sized: n = 0 gives one element, unset) */
static inline float *xs_vec(size_t n, float a) {
    float *v = (float *)malloc((n ? n : 1) * sizeof(float));
    if (v) xs_fill(v, n, a);
    return v;
}

#endif
