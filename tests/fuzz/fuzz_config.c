/* Fuzz driver for config.json parsing: any bytes give a model config or one error line. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "model/config.h"
#include "base/log.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int quiet;
    if (!quiet) {
        log_set_level(LOG_LEVEL_ERROR + 1);
        quiet = 1;
    }
    char *text = malloc(size + 1);
    if (!text) return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    cfg_model c;
    if (cfg_parse(text, "fuzz.json", &c) == DUET_OK) {
        float inv[256];
        if (c.qk_rope_head_dim / 2 <= 256) cfg_rope_inv_freq(&c, inv, NULL);
        (void)cfg_softmax_scale(&c);
    }
    free(text);
    return 0;
}
