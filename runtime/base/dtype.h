/* Element types found in checkpoints and KV caches, and scalar conversions to and from float.
 * Pure functions; any thread. */
#ifndef DUET_DTYPE_H
#define DUET_DTYPE_H

#include <stddef.h>
#include <stdint.h>

typedef enum dt_dtype {
    DT_F32 = 0,
    DT_BF16 = 1,
    DT_F16 = 2,
    DT_F8_E4M3 = 3,
    DT_I32 = 4,
    DT_I64 = 5,
    DT_COUNT
} dt_dtype;

size_t dt_size(dt_dtype t);
const char *dt_name(dt_dtype t); /* safetensors spelling: "F32", "BF16", ... */
/* Parses the safetensors spelling; returns -1 when unknown. */
int dt_from_name(const char *name);

static inline float dt_bf16_to_f32(uint16_t h) {
    union {
        uint32_t u;
        float f;
    } v = {.u = (uint32_t)h << 16};
    return v.f;
}

/* Round to nearest even, as torch does; NaN stays NaN. */
static inline uint16_t dt_f32_to_bf16(float f) {
    union {
        float f;
        uint32_t u;
    } v = {.f = f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
    uint32_t rounding = 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)((v.u + rounding) >> 16);
}

float dt_f16_to_f32(uint16_t h);
uint16_t dt_f32_to_f16(float f);
/* OCP FP8 E4M3 (the "fn" variant: no infinities, 0x7f/0xff are NaN, max 448). */
float dt_e4m3_to_f32(uint8_t v);
uint8_t dt_f32_to_e4m3(float f); /* saturating, round to nearest even */

/* Converts n elements of type t at src to float. */
void dt_to_f32(dt_dtype t, const void *src, float *dst, size_t n);

#endif
