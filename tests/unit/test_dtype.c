/* dtype conversions against values worked out by hand from the format definitions. */
#include <stdint.h>
#include <string.h>

#include "check.h"
#include "base/dtype.h"

int main(void) {
    /* bf16: top 16 bits of the float; round to nearest even */
    CHECK(dt_bf16_to_f32(0x3f80) == 1.0f);
    CHECK(dt_bf16_to_f32(0xc000) == -2.0f);
    CHECK(dt_f32_to_bf16(1.0f) == 0x3f80);
    CHECK(dt_f32_to_bf16(1.00390625f) == 0x3f80); /* exactly half way, even stays */
    CHECK(dt_f32_to_bf16(1.01171875f) == 0x3f82); /* half way above odd rounds up */
    CHECK(dt_f32_to_bf16(1.0078125f) == 0x3f81);
    for (int i = 0; i < 65536; i++) {
        uint16_t h = (uint16_t)i;
        float f = dt_bf16_to_f32(h);
        if (f == f) CHECK_MSG(dt_f32_to_bf16(f) == h, "bf16 round trip 0x%04x", i);
    }
    /* f16 */
    CHECK(dt_f16_to_f32(0x3c00) == 1.0f);
    CHECK(dt_f16_to_f32(0xc000) == -2.0f);
    CHECK(dt_f16_to_f32(0x0001) == 5.9604644775390625e-08f); /* smallest subnormal */
    CHECK(dt_f16_to_f32(0x7bff) == 65504.0f);
    for (int i = 0; i < 0x7c00; i++) {
        float f = dt_f16_to_f32((uint16_t)i);
        CHECK_MSG(dt_f32_to_f16(f) == i, "f16 round trip 0x%04x", i);
    }
    /* e4m3fn: bias 7, 3 mantissa bits, max 448, 0x7f NaN */
    CHECK(dt_e4m3_to_f32(0x38) == 1.0f);
    CHECK(dt_e4m3_to_f32(0x7e) == 448.0f);
    CHECK(dt_e4m3_to_f32(0xfe) == -448.0f);
    CHECK(dt_e4m3_to_f32(0x01) == 0.001953125f); /* 2^-9 */
    CHECK(dt_e4m3_to_f32(0x7f) != dt_e4m3_to_f32(0x7f));
    CHECK(dt_f32_to_e4m3(1000.0f) == 0x7e);
    for (int i = 0; i < 0x7f; i++) {
        float f = dt_e4m3_to_f32((uint8_t)i);
        CHECK_MSG(dt_f32_to_e4m3(f) == i, "e4m3 round trip 0x%02x", i);
        CHECK_MSG(dt_f32_to_e4m3(-f) == (i ? (0x80 | i) : 0x80), "e4m3 neg 0x%02x", i);
    }
    uint8_t raw[3] = {0x38, 0x40, 0xb8};
    float out[3];
    dt_to_f32(DT_F8_E4M3, raw, out, 3);
    CHECK(out[0] == 1.0f && out[1] == 2.0f && out[2] == -1.0f);
    CHECK(dt_from_name("F8_E4M3") == DT_F8_E4M3);
    CHECK(dt_from_name("F64") == -1);
    CHECK(dt_size(DT_BF16) == 2);
    CHECK_DONE();
}
