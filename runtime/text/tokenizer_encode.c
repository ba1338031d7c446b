/* tok_encode: added tokens first, then the Split pre-tokenizers, then byte-level BPE, following
 * HF `tokenizers` (AddedVocabulary::extract_and_normalize, NormalizedString::split,
 * BPE Word::merge_all) so that ids match exactly. All state is per call: encoding is
 * thread-safe on a shared tokenizer. */
#include <stdlib.h>
#include <string.h>

#include "base/hash.h"
#include "base/log.h"
#include "text/tokenizer-impl.h"

typedef struct enc_span {
    size_t start, end;
    bool is_match;
} enc_span;

typedef struct enc_spans {
    enc_span *v;
    size_t n, cap;
} enc_spans;

/* One BPE symbol of the word being merged, in a doubly linked list over an array. */
typedef struct bpe_sym {
    int32_t id;
    int32_t prev, next; /* -1 none */
    int32_t len;        /* bytes covered; 0 once merged into its left neighbour */
} bpe_sym;

/* A candidate merge of sym[pos] with its right neighbour. */
typedef struct bpe_ent {
    int32_t rank, pos, id;
} bpe_ent;

/* Word cache for one call: a piece seen before reuses the ids it produced then, which are
 * already in the output. Long prompts repeat most of their words. */
typedef struct cache_ent {
    const uint8_t *key; /* NULL = empty slot */
    uint32_t len;
    uint32_t first, count; /* where its ids sit in the output */
} cache_ent;

typedef struct enc_ctx {
    const tok_tokenizer *t;
    int32_t *ids;
    size_t n, cap;
    pcre2_match_data *md;
    enc_spans *spans; /* one list per split stage: a stage recurses only into later ones */
    bpe_sym *sym;
    bpe_ent *heap;
    size_t word_cap; /* capacity of sym and heap */
    char *tmp;       /* byte-level spelling of a word, for ignore_merges */
    cache_ent *cache;
    size_t cache_mask, cache_used;
    duet_status st;
} enc_ctx;

static bool push_id(enc_ctx *c, int32_t id) {
    if (c->n == c->cap) {
        size_t cap = c->cap ? 2 * c->cap : 256;
        int32_t *p = realloc(c->ids, cap * sizeof *p);
        if (!p) {
            c->st = DUET_ERR_NO_MEMORY;
            return false;
        }
        c->ids = p;
        c->cap = cap;
    }
    c->ids[c->n++] = id;
    return true;
}

/* ---- BPE ---------------------------------------------------------------------------------- */

static bool ent_less(const bpe_ent *a, const bpe_ent *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(bpe_ent *h, size_t *n, bpe_ent e) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!ent_less(&e, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = e;
}

static bpe_ent heap_pop(bpe_ent *h, size_t *n) {
    bpe_ent top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, m = i;
        const bpe_ent *best = &last;
        if (l < *n && ent_less(&h[l], best)) {
            m = l;
            best = &h[l];
        }
        if (l + 1 < *n && ent_less(&h[l + 1], best)) m = l + 1;
        if (m == i) break;
        h[i] = h[m];
        i = m;
    }
    if (*n > 0) h[i] = last;
    return top;
}

static bool word_reserve(enc_ctx *c, size_t n) {
    if (n <= c->word_cap) return true;
    size_t cap = c->word_cap ? c->word_cap : 64;
    while (cap < n) cap *= 2;
    bpe_sym *s = realloc(c->sym, cap * sizeof *s);
    if (s) c->sym = s;
    /* A word of n symbols never holds more than 2n candidates: n-1 at first, and each merge
     * removes one symbol and queues at most two. */
    bpe_ent *h = realloc(c->heap, 2 * cap * sizeof *h);
    if (h) c->heap = h;
    char *tmp = realloc(c->tmp, 2 * cap);
    if (tmp) c->tmp = tmp;
    if (!s || !h || !tmp) {
        c->st = DUET_ERR_NO_MEMORY;
        return false;
    }
    c->word_cap = cap;
    return true;
}

static void queue_pair(enc_ctx *c, size_t *nh, int32_t pos) {
    const bpe_sym *sym = c->sym;
    int32_t next = sym[pos].next, rank, id;
    if (next >= 0 && tok_pairmap_get(&c->t->merges, sym[pos].id, sym[next].id, &rank, &id))
        heap_push(c->heap, nh, (bpe_ent){rank, pos, id});
}

/* BPE over one pre-tokenized piece: the lowest-ranked adjacent pair is merged first, the
 * leftmost among equals, until no pair has a merge. O(n log n) in the piece's length. */
static void bpe_word(enc_ctx *c, const uint8_t *s, size_t n) {
    const tok_tokenizer *t = c->t;
    if (!word_reserve(c, n)) return;
    if (t->ignore_merges) {
        /* HF: a whole word that is a vocabulary entry is taken as is. */
        size_t l = 0;
        for (size_t i = 0; i < n; i++) {
            uint16_t cp = t->byte_cp[s[i]];
            if (cp < 0x80) {
                c->tmp[l++] = (char)cp;
            } else {
                c->tmp[l++] = (char)(0xc0 | cp >> 6);
                c->tmp[l++] = (char)(0x80 | (cp & 0x3f));
            }
        }
        int32_t id = tok_strmap_get(&t->vocab, c->tmp, l);
        if (id >= 0) {
            push_id(c, id);
            return;
        }
    }
    bpe_sym *sym = c->sym;
    int32_t m = 0;
    bool last_unk = false;
    for (size_t i = 0; i < n; i++) {
        int32_t id = t->byte_id[s[i]];
        if (id < 0) {
            /* No token for this byte: HF BPE drops it, or uses unk (fused if asked). */
            if (t->unk_id < 0) continue;
            if (t->fuse_unk && last_unk) {
                sym[m - 1].len++;
                continue;
            }
            id = t->unk_id;
            last_unk = true;
        } else {
            last_unk = false;
        }
        sym[m] = (bpe_sym){id, m - 1, m + 1, 1};
        m++;
    }
    if (m == 0) return;
    sym[m - 1].next = -1;

    size_t nh = 0;
    for (int32_t i = 0; i + 1 < m; i++) queue_pair(c, &nh, i);
    while (nh > 0) {
        bpe_ent top = heap_pop(c->heap, &nh);
        bpe_sym *cur = &sym[top.pos];
        /* Skip candidates made stale by an earlier merge. */
        if (cur->len == 0 || cur->next < 0) continue;
        int32_t rank, id;
        if (!tok_pairmap_get(&t->merges, cur->id, sym[cur->next].id, &rank, &id) || id != top.id)
            continue;
        bpe_sym *right = &sym[cur->next];
        cur->id = top.id;
        cur->len += right->len;
        right->len = 0;
        cur->next = right->next;
        if (cur->next >= 0) sym[cur->next].prev = top.pos;
        if (cur->prev >= 0) queue_pair(c, &nh, cur->prev);
        queue_pair(c, &nh, top.pos);
    }
    for (int32_t i = 0; i >= 0; i = sym[i].next)
        if (!push_id(c, sym[i].id)) return;
}

static uint64_t hash_piece(const uint8_t *s, size_t n) {
    uint64_t h = hash_fnv1a(HASH_FNV_BASIS, s, n);
    return h ^ (h >> 32);
}

/* Pieces longer than this are rarely repeated and not worth hashing. */
#define CACHE_MAX_PIECE 64

/* cacheable: s points into the caller's text, which outlives the call. */
static void enc_word(enc_ctx *c, const uint8_t *s, size_t n, bool cacheable) {
    if (n > CACHE_MAX_PIECE || !cacheable) {
        bpe_word(c, s, n);
        return;
    }
    if (c->cache_used * 2 >= c->cache_mask) {
        /* Grow; the old entries are simply dropped (the cache is only an accelerator). */
        size_t cap = c->cache ? 2 * (c->cache_mask + 1) : 1024;
        cache_ent *p = calloc(cap, sizeof *p);
        if (p) {
            free(c->cache);
            c->cache = p;
            c->cache_mask = cap - 1;
            c->cache_used = 0;
        } else if (!c->cache) {
            bpe_word(c, s, n);
            return;
        }
    }
    size_t i = hash_piece(s, n) & c->cache_mask;
    while (c->cache[i].key) {
        cache_ent *e = &c->cache[i];
        if (e->len == n && !memcmp(e->key, s, n)) {
            for (uint32_t k = 0; k < e->count; k++)
                if (!push_id(c, c->ids[e->first + k])) return;
            return;
        }
        i = (i + 1) & c->cache_mask;
    }
    size_t first = c->n;
    bpe_word(c, s, n);
    if (c->st != DUET_OK || c->n - first > UINT32_MAX || first > UINT32_MAX) return;
    c->cache[i] = (cache_ent){s, (uint32_t)n, (uint32_t)first, (uint32_t)(c->n - first)};
    c->cache_used++;
}

/* ---- pre-tokenizer -------------------------------------------------------------------------- */

static bool spans_push(enc_ctx *c, enc_spans *l, size_t start, size_t end, bool is_match) {
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 64;
        enc_span *p = realloc(l->v, cap * sizeof *p);
        if (!p) {
            c->st = DUET_ERR_NO_MEMORY;
            return false;
        }
        l->v = p;
        l->cap = cap;
    }
    l->v[l->n++] = (enc_span){start, end, is_match};
    return true;
}

static size_t char_len(const uint8_t *s, size_t n) {
    size_t len;
    uint32_t cp;
    tok_utf8_kind k = tok_utf8_classify(s, n, &len, &cp);
    return k == TOK_UTF8_VALID ? len : 1;
}

static int re_match(enc_ctx *c, const pcre2_code *re, const uint8_t *s, size_t n, size_t off,
                    uint32_t opts) {
    int rc = pcre2_match(re, s, n, off, opts, c->md, NULL);
    /* The JIT's default stack is small; the interpreter keeps its backtracking on the heap. */
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT)
        rc = pcre2_match(re, s, n, off, opts | PCRE2_NO_JIT, c->md, NULL);
    if (rc < 0 && rc != PCRE2_ERROR_NOMATCH && c->st == DUET_OK) {
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(rc, msg, sizeof msg);
        LOG_WARN("tok_encode: pre-tokenizer regex failed on a %zu-byte piece: %s", n, (char *)msg);
        c->st = rc == PCRE2_ERROR_NOMEMORY ? DUET_ERR_NO_MEMORY : DUET_ERR_TOO_LONG;
    }
    return rc;
}

/* Every match of re in s and the gaps between them, in order, like HF's Pattern::find_matches
 * (an empty match moves the search on by one character). */
static bool find_matches(enc_ctx *c, const pcre2_code *re, const uint8_t *s, size_t n,
                         enc_spans *l) {
    l->n = 0;
    size_t off = 0, prev = 0;
    while (off <= n) {
        int rc = re_match(c, re, s, n, off, 0);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) return false;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(c->md);
        size_t ms = ov[0], me = ov[1];
        if (me < ms || ms < prev) { /* \K tricks; nothing HF patterns use */
            c->st = DUET_ERR_UNSUPPORTED;
            return false;
        }
        if (ms > prev && !spans_push(c, l, prev, ms, false)) return false;
        if (!spans_push(c, l, ms, me, true)) return false;
        prev = me;
        if (me == ms) {
            if (me >= n) break;
            off = me + char_len(s + me, n - me);
        } else {
            off = me;
        }
    }
    if (prev < n && !spans_push(c, l, prev, n, false)) return false;
    return true;
}

/* Applies a Split behaviour in place; afterwards every span in l is a piece to keep, except
 * those with is_match set (the Removed ones). Mirrors NormalizedString::split. */
static void apply_behavior(enc_spans *l, tok_split_behavior b, bool invert) {
    if (invert)
        for (size_t i = 0; i < l->n; i++) l->v[i].is_match = !l->v[i].is_match;
    size_t w = 0;
    bool prev = false;
    switch (b) {
    case TOK_SPLIT_REMOVED:
        return;
    case TOK_SPLIT_ISOLATED:
        for (size_t i = 0; i < l->n; i++) l->v[i].is_match = false;
        return;
    case TOK_SPLIT_CONTIGUOUS:
        for (size_t i = 0; i < l->n; i++) {
            enc_span e = l->v[i];
            if (e.is_match == prev && w > 0)
                l->v[w - 1].end = e.end;
            else
                l->v[w++] = (enc_span){e.start, e.end, false};
            prev = e.is_match;
        }
        break;
    case TOK_SPLIT_MERGED_WITH_PREVIOUS:
        for (size_t i = 0; i < l->n; i++) {
            enc_span e = l->v[i];
            if (e.is_match && !prev && w > 0)
                l->v[w - 1].end = e.end;
            else
                l->v[w++] = (enc_span){e.start, e.end, false};
            prev = e.is_match;
        }
        break;
    case TOK_SPLIT_MERGED_WITH_NEXT: {
        /* Walk backwards, writing from the end, so the result stays in order. */
        size_t r = l->n;
        for (size_t i = l->n; i-- > 0;) {
            enc_span e = l->v[i];
            if (e.is_match && !prev && r < l->n)
                l->v[r].start = e.start;
            else
                l->v[--r] = (enc_span){e.start, e.end, false};
            prev = e.is_match;
        }
        memmove(l->v, l->v + r, (l->n - r) * sizeof *l->v);
        w = l->n - r;
        break;
    }
    }
    l->n = w;
}

static void enc_pretok(enc_ctx *c, size_t k, const uint8_t *s, size_t n, bool prefixed) {
    const tok_tokenizer *t = c->t;
    if (n == 0 || c->st != DUET_OK) return;
    if (k == t->bl_stage && t->bl_prefix_space && !prefixed && s[0] != ' ') {
        /* ByteLevel add_prefix_space: HF prepends a space to every piece that lacks one. */
        uint8_t *buf = malloc(n + 1);
        if (!buf) {
            c->st = DUET_ERR_NO_MEMORY;
            return;
        }
        buf[0] = ' ';
        memcpy(buf + 1, s, n);
        enc_pretok(c, k, buf, n + 1, true);
        free(buf);
        return;
    }
    if (k == t->n_splits) {
        enc_word(c, s, n, !prefixed);
        return;
    }
    const tok_split *sp = &t->splits[k];
    enc_spans *l = &c->spans[k];
    if (!find_matches(c, sp->re, s, n, l)) return;
    apply_behavior(l, sp->behavior, sp->invert);
    for (size_t i = 0; i < l->n && c->st == DUET_OK; i++) {
        enc_span e = l->v[i];
        if (!e.is_match && e.end > e.start)
            enc_pretok(c, k + 1, s + e.start, e.end - e.start, prefixed);
    }
}

/* ---- added tokens --------------------------------------------------------------------------- */

static bool is_white_space(uint32_t cp) {
    /* Rust's char::is_whitespace: the Unicode White_Space property */
    return (cp >= 0x09 && cp <= 0x0d) || cp == 0x20 || cp == 0x85 || cp == 0xa0 || cp == 0x1680 ||
           (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 || cp == 0x202f ||
           cp == 0x205f || cp == 0x3000;
}

/* Start of the last character of s[0..n). */
static size_t last_char(const uint8_t *s, size_t n) {
    size_t i = n - 1;
    for (size_t k = 0; k < 3 && i > 0 && (s[i] & 0xc0) == 0x80; k++) i--;
    return i;
}

static uint32_t cp_at(const uint8_t *s, size_t n, size_t *len_p) {
    uint32_t cp = 0xfffd;
    if (tok_utf8_classify(s, n, len_p, &cp) != TOK_UTF8_VALID) {
        *len_p = 1;
        return 0xfffd;
    }
    return cp;
}

static bool word_char_at(enc_ctx *c, const uint8_t *s, size_t n, size_t at) {
    return re_match(c, c->t->word_re, s, n, at, PCRE2_ANCHORED) >= 0;
}

/* Leftmost-longest match of the trie in s at or after from. */
static bool trie_find(const tok_trie *tr, const uint8_t *s, size_t n, size_t from, size_t *ms_p,
                      size_t *me_p, int32_t *added_p) {
    for (size_t p = from; p < n; p++) {
        int32_t node = tr->root_child[s[p]];
        if (node < 0) continue;
        int32_t best = -1;
        size_t best_end = 0;
        for (size_t q = p + 1;; q++) {
            if (tr->nodes[node].added >= 0) {
                best = tr->nodes[node].added;
                best_end = q;
            }
            if (q >= n) break;
            int32_t ch = tr->nodes[node].child;
            while (ch >= 0 && tr->nodes[ch].byte != s[q]) ch = tr->nodes[ch].sibling;
            if (ch < 0) break;
            node = ch;
        }
        if (best >= 0) {
            *ms_p = p;
            *me_p = best_end;
            *added_p = best;
            return true;
        }
    }
    return false;
}

/* Splits s on the added tokens of one trie (pass 0: normalized=false, pass 1: normalized=true)
 * with their single_word / lstrip / rstrip rules, as AddedVocabulary::find_matches does. */
static void enc_added(enc_ctx *c, int pass, const uint8_t *s, size_t n) {
    const tok_tokenizer *t = c->t;
    const tok_trie *tr = pass == 0 ? &t->trie_raw : &t->trie_norm;
    size_t done = 0, pos = 0, ms, me;
    int32_t ai;
    while (c->st == DUET_OK && tr->n > 0 && trie_find(tr, s, n, pos, &ms, &me, &ai)) {
        const tok_added *ad = &t->added[ai];
        size_t start = ms, stop = me;
        pos = me;
        if (ad->single_word) {
            bool word_before = ms > 0 && word_char_at(c, s, ms, last_char(s, ms));
            bool word_after = me < n && word_char_at(c, s + me, n - me, 0);
            if (word_before || word_after) continue;
        }
        if (ad->lstrip) {
            size_t ns = start;
            while (ns > 0) {
                size_t b = last_char(s, ns), l;
                if (!is_white_space(cp_at(s + b, ns - b, &l))) break;
                ns = b;
            }
            start = ns > done ? ns : done;
        }
        if (ad->rstrip) {
            size_t l;
            while (stop < n && is_white_space(cp_at(s + stop, n - stop, &l))) stop += l;
            pos = stop;
        }
        if (done < start) {
            if (pass == 0)
                enc_added(c, 1, s + done, start - done);
            else
                enc_pretok(c, 0, s + done, start - done, false);
        }
        push_id(c, ad->id);
        done = stop;
    }
    if (done < n) {
        if (pass == 0)
            enc_added(c, 1, s + done, n - done);
        else
            enc_pretok(c, 0, s + done, n - done, false);
    }
}

duet_status tok_encode(const tok_tokenizer *t, const char *text, size_t len, bool add_special,
                       int32_t **ids_p, size_t *n_p) {
    if (!t || (!text && len) || !ids_p || !n_p) return DUET_ERR_INVALID;
    /* BPE positions are int32 */
    if (len > INT32_MAX / 2) return DUET_ERR_TOO_LONG;
    enc_ctx c = {.t = t, .st = DUET_OK};
    c.md = pcre2_match_data_create(16, NULL);
    c.spans = calloc(t->n_splits + 1, sizeof *c.spans);
    if (!c.md || !c.spans) c.st = DUET_ERR_NO_MEMORY;
    if (add_special)
        for (size_t i = 0; i < t->n_post_pre && c.st == DUET_OK; i++) push_id(&c, t->post_ids[i]);
    if (c.st == DUET_OK) enc_added(&c, 0, (const uint8_t *)text, len);
    if (add_special)
        for (size_t i = t->n_post_pre; i < t->n_post && c.st == DUET_OK; i++)
            push_id(&c, t->post_ids[i]);

    pcre2_match_data_free(c.md);
    for (size_t i = 0; c.spans && i < t->n_splits; i++) free(c.spans[i].v);
    free(c.spans);
    free(c.sym);
    free(c.heap);
    free(c.tmp);
    free(c.cache);
    if (c.st != DUET_OK) {
        free(c.ids);
        return c.st;
    }
    if (c.n == 0) {
        free(c.ids);
        c.ids = NULL;
    }
    *ids_p = c.ids;
    *n_p = c.n;
    return DUET_OK;
}
