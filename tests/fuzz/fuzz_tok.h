/* Checks the tokenizer fuzz drivers (fuzz_tok_encode.c, fuzz_tok_load.c) share: every id of an
 * encoding has a piece (spelling the input where it is given), and the streaming detokenizer
 * fed id by id says what tok_decode says. A failed check aborts, as libFuzzer wants. Header-only.
 */
#ifndef DUET_FUZZ_TOK_H
#define DUET_FUZZ_TOK_H

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "text/tokenizer.h"

/* Every id is inside the vocabulary and has a piece; with text (not NULL) the pieces, joined,
 * are text[0..len) exactly. */
static inline void fuzz_tok_check_pieces(const tok_tokenizer *tok, const int32_t *ids, size_t n,
                                         const char *text, size_t len) {
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        const char *piece;
        size_t plen;
        if (ids[i] < 0 || ids[i] >= tok_vocab_size(tok)) abort();
        if (tok_id_to_piece(tok, ids[i], &piece, &plen) != DUET_OK) abort();
        if (!text) continue;
        if (plen > len - at || memcmp(text + at, piece, plen)) abort();
        at += plen;
    }
    if (text && at != len) abort();
}

/* Decodes ids whole into *whole_p (*whole_len_p bytes; the caller frees) and through a stream,
 * one id at a time and then its finish; the stream's pieces must join to the whole text. */
static inline void fuzz_tok_check_decode(const tok_tokenizer *tok, const int32_t *ids, size_t n,
                                         bool skip_special, char **whole_p, size_t *whole_len_p) {
    char *whole = NULL;
    size_t whole_len = 0;
    if (tok_decode(tok, ids, n, skip_special, &whole, &whole_len) != DUET_OK) abort();
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
    *whole_p = whole;
    *whole_len_p = whole_len;
}

#endif
