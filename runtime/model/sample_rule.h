/* The arithmetic of the sampling rule (be_sample_row, backend.h) that the host rule
 * (backend_sample.c) and the CUDA kernel (backends/cuda/sample.cu) share, so both compute the
 * same bits from the same logits: penalties, the probability at temperature, the order keys
 * of the thresholds and the fixed-point masses of top-p and the draw. Header-only; compiled by
 * the C compiler and by nvcc.
 *
 * Why bit-identical: a seeded request must give the same tokens on every backend. Library
 * expf differs between glibc and CUDA by an ulp, float sums depend on their order, and nvcc
 * fuses a * b + c into one rounding where the host rounds twice. So the exponential is
 * written out here with plain correctly rounded operations (SMP_MUL / SMP_ADD never fuse: on
 * the device they are the _rn intrinsics, on the host C11 does not contract and x86-64's
 * baseline has no FMA), and every mass is an integer (p * 2^40 rounded), whose sums are exact
 * in any order. */
#ifndef DUET_SAMPLE_RULE_H
#define DUET_SAMPLE_RULE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define SMP_FN __host__ __device__ static inline
#else
#define SMP_FN static inline
#endif
#define SMP_INF INFINITY

#if defined(__CUDA_ARCH__)
#define SMP_MUL(a, b)  __fmul_rn((a), (b))
#define SMP_ADD(a, b)  __fadd_rn((a), (b))
#define SMP_SUB(a, b)  __fsub_rn((a), (b))
#define SMP_DMUL(a, b) __dmul_rn((a), (b))
#define SMP_DADD(a, b) __dadd_rn((a), (b))
#else
#define SMP_MUL(a, b)  ((a) * (b))
#define SMP_ADD(a, b)  ((a) + (b))
#define SMP_SUB(a, b)  ((a) - (b))
#define SMP_DMUL(a, b) ((a) * (b))
#define SMP_DADD(a, b) ((a) + (b))
#endif

/* Fixed-point scale of masses: a probability p in [0, 1] weighs round(p * 2^40); a row of up
 * to 2^17 tokens sums below 2^57. Tokens with p < 2^-41 weigh nothing and are never drawn. */
#define SMP_MASS_ONE 1099511627776.0

SMP_FN uint32_t smp_f2u(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
#endif
}

SMP_FN float smp_u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

/* NaN logits count as -inf (never chosen, weigh nothing). */
SMP_FN float smp_clean(float x) {
    return x == x ? x : -SMP_INF;
}

/* Order-preserving map of a float to an unsigned key (for any sign). */
SMP_FN uint32_t smp_key(float f) {
    uint32_t u = smp_f2u(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* e^x for x <= 0 (0 below -87, where float's normal range ends): Cody-Waite reduction by
 * ln 2 (ln2_hi has few enough bits that n * ln2_hi is exact) and the degree-7 Taylor
 * polynomial on |r| <= ln2 / 2 (truncation below 5e-9, under an ulp). NaN gives 0. */
SMP_FN float smp_exp_neg(float x) {
    if (!(x > -87.0f)) return 0.0f;
    if (x >= 0.0f) return 1.0f;
    float n = rintf(SMP_MUL(x, 1.44269504088896341f));
    float r = SMP_SUB(x, SMP_MUL(n, 0.693145751953125f));
    r = SMP_SUB(r, SMP_MUL(n, 1.42860682030941723212e-6f));
    float p = 1.98412698412698413e-4f; /* 1/5040 */
    p = SMP_ADD(SMP_MUL(p, r), 1.38888888888888889e-3f);
    p = SMP_ADD(SMP_MUL(p, r), 8.33333333333333333e-3f);
    p = SMP_ADD(SMP_MUL(p, r), 4.16666666666666667e-2f);
    p = SMP_ADD(SMP_MUL(p, r), 1.66666666666666667e-1f);
    p = SMP_ADD(SMP_MUL(p, r), 0.5f);
    p = SMP_ADD(SMP_MUL(p, r), 1.0f);
    p = SMP_ADD(SMP_MUL(p, r), 1.0f);
    int e = (int)n + 127; /* n >= -126: 2^n is a normal float */
    return SMP_MUL(p, smp_u2f((uint32_t)e << 23));
}

/* The penalties of one token, as vLLM applies them: repetition (prompt or output token:
 * positive logits divided, negative multiplied), then frequency * count + presence for
 * output tokens. rep <= 0 or 1: off. */
SMP_FN float smp_penalize(float l, int32_t count, int in_prompt, float rep, float presence,
                          float frequency) {
    if (rep > 0.0f && rep != 1.0f && (count > 0 || in_prompt)) l = l > 0.0f ? l / rep : l * rep;
    if (count > 0) l = SMP_SUB(l, SMP_ADD(SMP_MUL(frequency, (float)count), presence));
    return l;
}

/* The fixed-point mass of a probability. p * 2^40 is exact, so the sum rounds once. */
SMP_FN uint64_t smp_mass(float p) {
    return (uint64_t)SMP_DADD(SMP_DMUL((double)p, SMP_MASS_ONE), 0.5);
}

/* The top-p bound: a group of equal probabilities is kept while the mass strictly above it is
 * below this; at least 1, so the most likely group always stays. */
SMP_FN uint64_t smp_top_p_limit(float top_p, uint64_t total) {
    uint64_t l = (uint64_t)SMP_DMUL((double)top_p, (double)total);
    return l ? l : 1;
}

/* The draw's position in [0, total): u in [0, 1) scaled, clamped against rounding. */
SMP_FN uint64_t smp_target(double u, uint64_t total) {
    uint64_t t = (uint64_t)SMP_DMUL(u, (double)total);
    return t < total ? t : total - 1;
}

/* Radix selection walks 32-bit keys in three digits, most significant first. */
#define SMP_RADIX_BINS 2048
SMP_FN int smp_digit_shift(int pass) {
    return pass == 0 ? 21 : pass == 1 ? 10 : 0;
}
SMP_FN uint32_t smp_digit_mask(int pass) {
    return pass == 2 ? 0x3ffu : 0x7ffu;
}

#endif
