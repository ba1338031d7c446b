/* Scalar dtype conversions; see dtype.h. */
#include "base/dtype.h"

#include <math.h>
#include <pthread.h>
#include <string.h>

static const struct {
    const char *name;
    size_t size;
} g_types[DT_COUNT] = {
    [DT_F32] = {"F32", 4},         [DT_BF16] = {"BF16", 2}, [DT_F16] = {"F16", 2},
    [DT_F8_E4M3] = {"F8_E4M3", 1}, [DT_I32] = {"I32", 4},   [DT_I64] = {"I64", 8},
};

size_t dt_size(dt_dtype t) {
    return (unsigned)t < DT_COUNT ? g_types[t].size : 0;
}

const char *dt_name(dt_dtype t) {
    return (unsigned)t < DT_COUNT ? g_types[t].name : "?";
}

int dt_from_name(const char *name) {
    for (int i = 0; i < DT_COUNT; i++)
        if (!strcmp(name, g_types[i].name)) return i;
    return -1;
}

float dt_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    union {
        uint32_t u;
        float f;
    } v;
    if (exp == 0) {
        /* zero or subnormal: man * 2^-24 */
        float f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    if (exp == 31)
        v.u = sign | 0x7f800000u | (man << 13);
    else
        v.u = sign | ((exp + 112) << 23) | (man << 13);
    return v.f;
}

uint16_t dt_f32_to_f16(float f) {
    union {
        float f;
        uint32_t u;
    } v = {.f = f};
    uint16_t sign = (uint16_t)((v.u >> 16) & 0x8000);
    float a = fabsf(f);
    if (isnan(f)) return sign | 0x7e00;
    if (a >= 65520.0f) return sign | 0x7c00;
    if (a < 6.103515625e-05f) { /* subnormal range: quantize to multiples of 2^-24 */
        return sign | (uint16_t)lrintf(a * 16777216.0f);
    }
    uint32_t u = v.u & 0x7fffffffu;
    uint32_t exp = (u >> 23) - 112, man = u & 0x7fffff;
    uint32_t h = (exp << 10) | (man >> 13);
    uint32_t rest = man & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return sign | (uint16_t)h;
}

float dt_e4m3_to_f32(uint8_t v) {
    int sign = v >> 7, exp = (v >> 3) & 0xf, man = v & 7;
    float f;
    if (exp == 0xf && man == 7) return NAN;
    if (exp == 0)
        f = ldexpf((float)man, -9); /* subnormal: man/8 * 2^-6 */
    else
        f = ldexpf(1.0f + (float)man / 8.0f, exp - 7);
    return sign ? -f : f;
}

uint8_t dt_f32_to_e4m3(float f) {
    if (isnan(f)) return 0x7f;
    uint8_t sign = signbit(f) ? 0x80 : 0;
    float a = fabsf(f);
    if (a >= 448.0f) return sign | 0x7e;
    /* Find the nearest representable value by scanning the 127 non-negative codes; cheap
     * enough for checkpoint writing, which is the only caller that needs it. */
    uint8_t best = 0;
    float bestd = INFINITY;
    for (int c = 0; c < 0x7f; c++) {
        float d = fabsf(dt_e4m3_to_f32((uint8_t)c) - a);
        if (d < bestd || (d == bestd && (c & 1) == 0)) {
            bestd = d;
            best = (uint8_t)c;
        }
    }
    return sign | best;
}

static float g_e4m3_lut[256];
static pthread_once_t g_e4m3_once = PTHREAD_ONCE_INIT;

static void e4m3_lut_init(void) {
    for (int i = 0; i < 256; i++) g_e4m3_lut[i] = dt_e4m3_to_f32((uint8_t)i);
}

void dt_to_f32(dt_dtype t, const void *src, float *dst, size_t n) {
    switch (t) {
    case DT_F32:
        memcpy(dst, src, n * 4);
        break;
    case DT_BF16: {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++) dst[i] = dt_bf16_to_f32(s[i]);
        break;
    }
    case DT_F16: {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++) dst[i] = dt_f16_to_f32(s[i]);
        break;
    }
    case DT_F8_E4M3: {
        pthread_once(&g_e4m3_once, e4m3_lut_init);
        const uint8_t *s = src;
        for (size_t i = 0; i < n; i++) dst[i] = g_e4m3_lut[s[i]];
        break;
    }
    case DT_I32: {
        const int32_t *s = src;
        for (size_t i = 0; i < n; i++) dst[i] = (float)s[i];
        break;
    }
    case DT_I64: {
        const int64_t *s = src;
        for (size_t i = 0; i < n; i++) dst[i] = (float)s[i];
        break;
    }
    default:
        break;
    }
}
