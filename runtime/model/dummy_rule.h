/* The values of dummy weights (--load-format dummy) in one place, compiled by the C compiler
 * for the loader's host fill (weights.c) and by nvcc for the CUDA backend's kernels
 * (backends/cuda/dummy.cu), so a weight made on the device holds the same bits as one filled on
 * the host and uploaded. Header-only; which tensors exist and how they are sliced is the
 * loader's business, not this file's.
 *
 * The rule: a tensor named `name` [full_out, full_in] ([full_out] for a vector: full_in 0)
 * with seed `seed` holds, at (row, col):
 *   - 1 for norms (names with "norm.weight"), 0 for the router's e_score_correction_bias;
 *   - else ((k >> 40) / 2^24 * 2 - 1) * a with a = 0.02 * 1.7320508 (uniform in [-a, a): std
 *     0.02), k = mix64(key + row * max(full_in, 1) + col), key = fnv1a(name) ^ mix64(seed +
 *     golden ratio), mix64 the splitmix64 finalizer (base/hash.h);
 *   - 0 on rows at or past full_out (a vocabulary padded for TP).
 * FP8-resident weights hold e4m3 codes of value / s (nearest code, ties to the even code,
 * saturating at 448) with every 128x128 block's scale s = a / 448.
 *
 * Why bit-identical: every step is an exact operation or one correctly rounded float
 * operation; on the device the products are the _rn intrinsics (nvcc would otherwise fuse a
 * multiply and an add into one rounding), on the host C11 does not contract and x86-64's
 * baseline has no FMA. The bf16 and e4m3 roundings are integer code, not library calls. */
#ifndef DUET_DUMMY_RULE_H
#define DUET_DUMMY_RULE_H

#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define DUMMY_FN __host__ __device__ static inline
#else
#define DUMMY_FN static inline
#endif

#if defined(__CUDA_ARCH__)
#define DUMMY_MUL(a, b) __fmul_rn((a), (b))
#define DUMMY_DIV(a, b) __fdiv_rn((a), (b))
#else
#define DUMMY_MUL(a, b) ((a) * (b))
#define DUMMY_DIV(a, b) ((a) / (b))
#endif

typedef enum dummy_kind {
    DUMMY_KIND_UNIFORM = 0,
    DUMMY_KIND_ONES = 1,  /* norms */
    DUMMY_KIND_ZEROS = 2, /* the router's e_score_correction_bias */
} dummy_kind;

/* One tensor's part of the rule, plus the slice a caller wants: rows [r0, r0 + n) and columns
 * [c0, c0 + m) of the tensor [full_out, full_in] (full_in 0: a vector, column 0). */
typedef struct dummy_slice {
    uint64_t key; /* dummy_key(name, seed) */
    int kind;     /* dummy_kind_of(name) */
    int full_out, full_in;
    int r0, c0;
} dummy_slice;

/* Host only (names are host strings). */
static inline uint64_t dummy_fnv1a(const char *s) {
    uint64_t h = 1469598103934665603ull; /* = base/hash.h's hash_fnv1a_str */
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

DUMMY_FN uint64_t dummy_mix64(uint64_t x) { /* = base/hash.h's hash_mix64 */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static inline uint64_t dummy_key(const char *name, uint64_t seed) {
    return dummy_fnv1a(name) ^ dummy_mix64(seed + 0x9e3779b97f4a7c15ull);
}

static inline int dummy_kind_of(const char *name) {
    if (strlen(name) > 11 && strstr(name, "norm.weight")) return DUMMY_KIND_ONES;
    if (strstr(name, "e_score_correction_bias")) return DUMMY_KIND_ZEROS;
    return DUMMY_KIND_UNIFORM;
}

/* The whole rule of a slice: the fields above for tensor name with seed. */
static inline dummy_slice dummy_slice_of(const char *name, uint64_t seed, int full_out, int full_in,
                                         int r0, int c0) {
    dummy_slice s;
    s.key = dummy_key(name, seed);
    s.kind = dummy_kind_of(name);
    s.full_out = full_out;
    s.full_in = full_in;
    s.r0 = r0;
    s.c0 = c0;
    return s;
}

/* a: the half width of the uniform values (std 0.02) */
DUMMY_FN float dummy_amp(void) {
    return DUMMY_MUL(0.02f, 1.7320508f);
}
/* the scale of every FP8 block, and its inverse the values are multiplied with */
DUMMY_FN float dummy_fp8_scale(void) {
    return DUMMY_DIV(dummy_amp(), 448.0f);
}
DUMMY_FN float dummy_fp8_inv(void) {
    return DUMMY_DIV(1.0f, dummy_fp8_scale());
}

/* The value at (i, j) of slice s: row s->r0 + i, column s->c0 + j of its tensor. */
DUMMY_FN float dummy_at(const dummy_slice *s, int i, int j) {
    long long row = (long long)s->r0 + i;
    if (row >= s->full_out) return 0.0f;
    if (s->kind == DUMMY_KIND_ONES) return 1.0f;
    if (s->kind == DUMMY_KIND_ZEROS) return 0.0f;
    uint64_t k = dummy_mix64(s->key + (uint64_t)row * (uint64_t)(s->full_in ? s->full_in : 1) +
                             (uint64_t)((long long)s->c0 + j));
    /* (k >> 40) < 2^24 converts exactly; * 2^-24, * 2 and - 1 are exact: one rounding, at a */
    float u = (float)(k >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
    return DUMMY_MUL(u, dummy_amp());
}

DUMMY_FN uint32_t dummy_f2u(float f) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
#endif
}

/* float32 -> bf16, nearest even (= base/dtype.h's dt_f32_to_bf16 and torch's .to(bfloat16)) */
DUMMY_FN uint16_t dummy_bf16(float f) {
    uint32_t u = dummy_f2u(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* float32 -> e4m3 code, nearest (ties to the even code), |f| >= 448 and NaN saturating to
 * +-448 (0x7e): the loader's quantization of dummy weights. Integer rounding on the float's
 * bits: normals (|f| >= 2^-6) keep 3 of 23 mantissa bits, a carry moving into the exponent as
 * it does between codes; subnormals are multiples of 2^-9. */
DUMMY_FN uint8_t dummy_e4m3(float f) {
    uint32_t u = dummy_f2u(f);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80u);
    uint32_t a = u & 0x7fffffffu;
    if (!(a < 0x43e00000u)) return sign | 0x7e; /* 448 = 0x43e00000; NaN's bits are above */
    int e = (int)(a >> 23) - 127;
    if (e >= -6) {
        uint32_t r = a + 0x7ffffu + ((a >> 20) & 1u);
        return sign | (uint8_t)((r >> 20) - (120u << 3));
    }
    if (e < -11) return sign; /* below 2^-11: under half of the smallest subnormal 2^-9 */
    /* |f| = m * 2^(e - 23) with m = 1.mantissa (24 bits); in units of 2^-9: m >> s, s = -e + 14 */
    uint32_t m = (a & 0x7fffffu) | 0x800000u;
    int s = 14 - e; /* 21 .. 25 */
    uint32_t q = m >> s, rem = m & ((1u << s) - 1u), half = 1u << (s - 1);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return sign | (uint8_t)q;
}

#endif
