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
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        const char *piece;
        size_t plen;
        if (ids[i] < 0 || ids[i] >= tok_vocab_size(tok)) abort();
        if (tok_id_to_piece(tok, ids[i], &piece, &plen) != DUET_OK) abort();
        if (plen > len - at || memcmp(text + at, piece, plen)) abort();
        at += plen;
    }
    if (at != len) abort();

    char *whole = NULL;
    size_t whole_len = 0;
    if (tok_decode(tok, ids, n, skip_special, &whole, &whole_len) != DUET_OK) abort();
    if (whole[whole_len] != '\0') abort(); /* NUL-terminated; the text itself may hold NULs */
    tok_stream *s = NULL;
    if (tok_stream_create(tok, skip_special, &s) != DUET_OK) abort();
    size_t got = 0;
    for (size_t i = 0; i <= n; i++) {
        const char *t;
        size_t tl;
        if (i < n) {
            if (tok_stream_put(s, ids[i], &t, &tl) != DUET_OK) abort();
        } else {
            tok_stream_finish(s, &t, &tl);
        }
        if (tl > whole_len - got || memcmp(whole + got, t, tl)) abort();
        got += tl;
    }
    if (got != whole_len) abort();
    tok_stream_destroy(s);
    free(whole);
    free(ids);
    return 0;
}
