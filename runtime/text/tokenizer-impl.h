/* Internals of the tokenizer shared by tokenizer.c (loading, decoding, streaming) and
 * tokenizer_encode.c (added tokens, pre-tokenizer, BPE). Not for use outside those two files. */
#ifndef DUET_TOKENIZER_IMPL_H
#define DUET_TOKENIZER_IMPL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "text/tokenizer.h"

/* String -> id, open addressing; keys point into memory the tokenizer owns. */
typedef struct tok_strmap {
    const char **keys; /* NULL = empty slot */
    uint32_t *lens;
    int32_t *vals;
    size_t mask; /* capacity - 1, capacity a power of two */
} tok_strmap;

/* (left id, right id) -> merge rank and merged id, open addressing. */
typedef struct tok_pairmap {
    uint64_t *keys; /* (left << 32 | right) + 1; 0 = empty slot */
    int32_t *ranks;
    int32_t *ids;
    size_t mask;
} tok_pairmap;

/* Byte trie of added-token contents for leftmost-longest matching. */
typedef struct tok_trie_node {
    int32_t child;   /* first child, -1 none */
    int32_t sibling; /* next sibling, -1 none */
    int32_t added;   /* index into tok->added of the token ending here, -1 none */
    uint8_t byte;
} tok_trie_node;

typedef struct tok_trie {
    tok_trie_node *nodes; /* nodes[0] is the root */
    size_t n, cap;
    int32_t root_child[256]; /* the root's children by byte, for a fast skip */
} tok_trie;

typedef struct tok_added {
    int32_t id;
    bool special, lstrip, rstrip, single_word, normalized;
} tok_added;

typedef enum tok_split_behavior {
    TOK_SPLIT_REMOVED = 0,
    TOK_SPLIT_ISOLATED = 1,
    TOK_SPLIT_MERGED_WITH_PREVIOUS = 2,
    TOK_SPLIT_MERGED_WITH_NEXT = 3,
    TOK_SPLIT_CONTIGUOUS = 4,
} tok_split_behavior;

/* One Split pre-tokenizer. ByteLevel's own regex (use_regex) is one of these too. */
typedef struct tok_split {
    pcre2_code *re;
    tok_split_behavior behavior;
    bool invert;
} tok_split;

enum {
    TOK_ID_PRESENT = 1, /* some token has this id */
    TOK_ID_SPECIAL = 2, /* HF skips it when decoding with skip_special_tokens */
    TOK_ID_ADDED = 4,
};

struct tok_tokenizer {
    int32_t n_ids; /* one past the largest id */
    uint8_t *id_flags;
    uint32_t *piece_off; /* [n_ids] into pieces */
    uint32_t *piece_len;
    char *pieces;
    size_t max_piece;

    char *names;          /* vocabulary strings as written in tokenizer.json, NUL-separated */
    tok_strmap vocab;     /* the BPE model's vocabulary */
    tok_strmap added_map; /* added-token contents */
    int32_t byte_id[256]; /* the id of each byte's one-character token, -1 none */
    tok_pairmap merges;

    tok_added *added;
    size_t n_added;
    char *added_text;    /* contents, NUL-separated */
    tok_trie trie_raw;   /* tokens with normalized=false, matched first, on the raw text */
    tok_trie trie_norm;  /* normalized=true, matched in what is left (the normalizer is none) */
    pcre2_code *word_re; /* a word character, for single_word tokens; NULL when none has it */

    tok_split *splits; /* the Split pre-tokenizers in order, then ByteLevel's regex if any */
    size_t n_splits;
    size_t bl_stage;      /* index in splits where ByteLevel starts (its regex, if any) */
    bool bl_prefix_space; /* ByteLevel add_prefix_space */
    bool ignore_merges;
    int32_t unk_id; /* -1: bytes without a token are dropped, as HF BPE does without unk */
    bool fuse_unk;

    int32_t *post_ids; /* post-processor: post_ids[0..n_post_pre) before the text, the rest after */
    size_t n_post_pre, n_post;

    int32_t bos_id, eos_id;
    bool add_bos, add_eos;

    /* GPT-2's byte alphabet: byte b is written as code point byte_cp[b] (b itself for printable
     * Latin-1, 256 + n for the n-th other byte); cp_byte inverts it over 0..323, -1 elsewhere. */
    uint16_t byte_cp[256];
    int16_t cp_byte[324];
};

typedef enum tok_utf8_kind {
    TOK_UTF8_VALID,
    TOK_UTF8_INVALID,
    TOK_UTF8_INCOMPLETE,
} tok_utf8_kind;

/* In tokenizer.c. */
/* Classifies the sequence starting at s[0] (n >= 1) by the Unicode rules that Rust's
 * from_utf8_lossy applies: *len_p is the sequence's length (and *cp_p its code point) when
 * VALID, the length of the maximal invalid subpart (replaced by one U+FFFD) when INVALID, and
 * the bytes seen when INCOMPLETE (a valid prefix cut by the end of the buffer). */
tok_utf8_kind tok_utf8_classify(const uint8_t *s, size_t n, size_t *len_p, uint32_t *cp_p);
int32_t tok_strmap_get(const tok_strmap *m, const char *key, size_t len);
bool tok_pairmap_get(const tok_pairmap *m, int32_t left, int32_t right, int32_t *rank_p,
                     int32_t *id_p);

#endif
