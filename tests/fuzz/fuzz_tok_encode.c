/* libFuzzer driver for encoding arbitrary bytes with the DeepSeek-V3 tokenizer (the golden
 * tokenizer.json, loaded once): the pieces of the ids give back the input exactly (tokenizer.h
 * promises it for any bytes, valid UTF-8 or not), tok_decode accepts every id, and the
 * streaming detokenizer fed id by id says what tok_decode says. The first byte chooses
 * add_special and skip_special. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "fuzz_tok.h"
#include "text/tokenizer.h"

#ifndef GOLDEN_DIR
#error "GOLDEN_DIR must name ../shared/golden"
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static tok_tokenizer *tok;
    if (!tok) {
        log_set_level(LOG_LEVEL_ERROR + 1);
        if (tok_load(GOLDEN_DIR "/tokenizer", &tok) != DUET_OK) {
            fprintf(stderr, "fuzz_tok_encode: cannot load %s/tokenizer\n", GOLDEN_DIR);
            abort();
        }
    }
    if (size == 0 || size > 8192) return 0;
    bool add_special = data[0] & 1, skip_special = data[0] & 2;
    const char *text = (const char *)data + 1;
    size_t len = size - 1;
    int32_t *ids = NULL;
    size_t n = 0;
    if (tok_encode(tok, text, len, add_special, &ids, &n) != DUET_OK) abort();
    fuzz_tok_check_pieces(tok, ids, n, text, len);
    char *whole = NULL;
    size_t whole_len = 0;
    fuzz_tok_check_decode(tok, ids, n, skip_special, &whole, &whole_len);
    if (whole[whole_len] != '\0') abort(); /* NUL-terminated; the text itself may hold NULs */
    free(whole);
    free(ids);
    return 0;
}
