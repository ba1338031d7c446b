/* Loading tokenizer.json and tokenizer_config.json, lookups, decoding and the streaming
 * detokenizer; see tokenizer.h. Encoding (added tokens, pre-tokenizer, BPE) is in
 * tokenizer_encode.c. Behaviour follows HF `tokenizers` 0.2x, which made the goldens. */
#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/fileio.h"
#include "base/hash.h"
#include "base/log.h"
#include "text/tokenizer-impl.h"

/* DeepSeek's tokenizer.json is 7.8 MB; anything near this limit is not a tokenizer. */
#define TOK_JSON_MAX   ((size_t)256 << 20)
#define TOK_CONFIG_MAX ((size_t)16 << 20)
/* Ids are int32 everywhere; this bound keeps per-id tables small and rejects nonsense early. */
#define TOK_ID_LIMIT (1 << 24)

typedef struct load_ctx {
    const char *path;
    duet_status st;
} load_ctx;

static void lfail(load_ctx *lc, duet_status st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Logs the first problem only: later ones are usually consequences of it. */
static void lfail(load_ctx *lc, duet_status st, const char *fmt, ...) {
    if (lc->st != DUET_OK) return;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    LOG_ERROR("%s: %s", lc->path, msg);
    lc->st = st;
}

static void lfail_oom(load_ctx *lc) {
    lfail(lc, DUET_ERR_NO_MEMORY, "out of memory while loading");
}

/* ---- hash maps ---------------------------------------------------------------------------- */

static uint64_t hash_bytes(const char *s, size_t n) {
    uint64_t h = hash_fnv1a(HASH_FNV_BASIS, s, n);
    return h ^ (h >> 29);
}

static uint64_t mix64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}

static size_t pow2_at_least(size_t n) {
    size_t c = 16;
    while (c < n) c <<= 1;
    return c;
}

/* Sized for n keys at load factor 1/2 at most; callers insert no more than n. */
static bool strmap_init(tok_strmap *m, size_t n) {
    size_t cap = pow2_at_least(2 * n + 1);
    m->keys = calloc(cap, sizeof *m->keys);
    m->lens = malloc(cap * sizeof *m->lens);
    m->vals = malloc(cap * sizeof *m->vals);
    m->mask = cap - 1;
    return m->keys && m->lens && m->vals;
}

static void strmap_free(tok_strmap *m) {
    free(m->keys);
    free(m->lens);
    free(m->vals);
    memset(m, 0, sizeof *m);
}

/* Inserts or replaces (a later duplicate wins, as in the HashMaps HF builds). */
static void strmap_put(tok_strmap *m, const char *key, size_t len, int32_t val) {
    size_t i = hash_bytes(key, len) & m->mask;
    while (m->keys[i]) {
        if (m->lens[i] == len && !memcmp(m->keys[i], key, len)) break;
        i = (i + 1) & m->mask;
    }
    m->keys[i] = key;
    m->lens[i] = (uint32_t)len;
    m->vals[i] = val;
}

int32_t tok_strmap_get(const tok_strmap *m, const char *key, size_t len) {
    if (!m->keys) return -1;
    size_t i = hash_bytes(key, len) & m->mask;
    while (m->keys[i]) {
        if (m->lens[i] == len && !memcmp(m->keys[i], key, len)) return m->vals[i];
        i = (i + 1) & m->mask;
    }
    return -1;
}

static bool pairmap_init(tok_pairmap *m, size_t n) {
    size_t cap = pow2_at_least(2 * n + 1);
    m->keys = calloc(cap, sizeof *m->keys);
    m->ranks = malloc(cap * sizeof *m->ranks);
    m->ids = malloc(cap * sizeof *m->ids);
    m->mask = cap - 1;
    return m->keys && m->ranks && m->ids;
}

static void pairmap_free(tok_pairmap *m) {
    free(m->keys);
    free(m->ranks);
    free(m->ids);
    memset(m, 0, sizeof *m);
}

static void pairmap_put(tok_pairmap *m, int32_t left, int32_t right, int32_t rank, int32_t id) {
    uint64_t key = ((uint64_t)(uint32_t)left << 32 | (uint32_t)right) + 1;
    size_t i = mix64(key) & m->mask;
    while (m->keys[i] && m->keys[i] != key) i = (i + 1) & m->mask;
    m->keys[i] = key;
    m->ranks[i] = rank;
    m->ids[i] = id;
}

bool tok_pairmap_get(const tok_pairmap *m, int32_t left, int32_t right, int32_t *rank_p,
                     int32_t *id_p) {
    uint64_t key = ((uint64_t)(uint32_t)left << 32 | (uint32_t)right) + 1;
    size_t i = mix64(key) & m->mask;
    while (m->keys[i]) {
        if (m->keys[i] == key) {
            *rank_p = m->ranks[i];
            *id_p = m->ids[i];
            return true;
        }
        i = (i + 1) & m->mask;
    }
    return false;
}

/* ---- UTF-8 ----------------------------------------------------------------------------- */

static size_t utf8_put(uint32_t cp, char *out) {
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xc0 | cp >> 6);
        out[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xe0 | cp >> 12);
        out[1] = (char)(0x80 | (cp >> 6 & 0x3f));
        out[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | cp >> 18);
    out[1] = (char)(0x80 | (cp >> 12 & 0x3f));
    out[2] = (char)(0x80 | (cp >> 6 & 0x3f));
    out[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

tok_utf8_kind tok_utf8_classify(const uint8_t *s, size_t n, size_t *len_p, uint32_t *cp_p) {
    uint8_t b = s[0];
    if (b < 0x80) {
        *len_p = 1;
        *cp_p = b;
        return TOK_UTF8_VALID;
    }
    size_t need;
    uint8_t lo = 0x80, hi = 0xbf;
    uint32_t cp;
    if (b >= 0xc2 && b <= 0xdf) {
        need = 2;
        cp = b & 0x1f;
    } else if (b >= 0xe0 && b <= 0xef) {
        need = 3;
        cp = b & 0x0f;
        if (b == 0xe0) lo = 0xa0;
        if (b == 0xed) hi = 0x9f; /* no surrogates */
    } else if (b >= 0xf0 && b <= 0xf4) {
        need = 4;
        cp = b & 0x07;
        if (b == 0xf0) lo = 0x90;
        if (b == 0xf4) hi = 0x8f;
    } else {
        *len_p = 1;
        return TOK_UTF8_INVALID;
    }
    for (size_t i = 1; i < need; i++) {
        if (i >= n) {
            *len_p = i;
            return TOK_UTF8_INCOMPLETE;
        }
        uint8_t c = s[i];
        if (c < (i == 1 ? lo : 0x80) || c > (i == 1 ? hi : 0xbf)) {
            *len_p = i;
            return TOK_UTF8_INVALID;
        }
        cp = cp << 6 | (c & 0x3f);
    }
    *len_p = need;
    *cp_p = cp;
    return TOK_UTF8_VALID;
}

/* Appends in[0..n) to out as valid UTF-8, each maximal invalid subpart becoming U+FFFD
 * (out needs 3 * n bytes). When !final an incomplete sequence at the end is left unconsumed
 * (3 bytes at most). Returns the number of input bytes consumed. */
static size_t utf8_lossy(const uint8_t *in, size_t n, bool final, char *out, size_t *out_len) {
    size_t i = 0, o = *out_len;
    while (i < n) {
        size_t len;
        uint32_t cp;
        tok_utf8_kind k = tok_utf8_classify(in + i, n - i, &len, &cp);
        if (k == TOK_UTF8_VALID) {
            memcpy(out + o, in + i, len);
            o += len;
        } else if (k == TOK_UTF8_INCOMPLETE && !final) {
            break;
        } else {
            memcpy(out + o, "\xef\xbf\xbd", 3);
            o += 3;
        }
        i += len;
    }
    *out_len = o;
    return i;
}

/* ---- GPT-2 byte alphabet --------------------------------------------------------------- */

static bool bl_printable(unsigned b) {
    return (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
}

static void bytelevel_init(tok_tokenizer *t) {
    unsigned n = 0;
    for (size_t i = 0; i < 324; i++) t->cp_byte[i] = -1;
    for (unsigned b = 0; b < 256; b++) {
        t->byte_cp[b] = (uint16_t)(bl_printable(b) ? b : 256 + n++);
        t->cp_byte[t->byte_cp[b]] = (int16_t)b;
    }
}

/* The bytes a vocabulary string stands for. HF's ByteLevel decoder maps every character back
 * to its byte, and keeps a token's own UTF-8 when any character is outside the alphabet (so
 * "<｜User｜>" decodes to itself). out needs len bytes. */
static size_t bytelevel_decode(const tok_tokenizer *t, const char *s, size_t len, char *out) {
    size_t i = 0, o = 0;
    while (i < len) {
        size_t l;
        uint32_t cp;
        if (tok_utf8_classify((const uint8_t *)s + i, len - i, &l, &cp) != TOK_UTF8_VALID ||
            cp >= 324 || t->cp_byte[cp] < 0) {
            memcpy(out, s, len);
            return len;
        }
        out[o++] = (char)t->cp_byte[cp];
        i += l;
    }
    return o;
}

/* ---- tokenizer.json ----------------------------------------------------------------------- */

static const cJSON *get(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNull(v) ? NULL : v;
}

static bool get_bool(load_ctx *lc, const cJSON *o, const char *where, const char *k, bool def) {
    const cJSON *v = get(o, k);
    if (!v) return def;
    if (!cJSON_IsBool(v)) {
        lfail(lc, DUET_ERR_FORMAT, "%s.%s must be true or false", where, k);
        return def;
    }
    return cJSON_IsTrue(v);
}

/* An integer id in [0, TOK_ID_LIMIT), or -1 after logging. */
static int32_t get_id(load_ctx *lc, const cJSON *v, const char *what, const char *name) {
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 0 ||
        v->valuedouble >= TOK_ID_LIMIT) {
        lfail(lc, DUET_ERR_FORMAT, "%s \"%.60s\" has no valid id (an integer below %d)", what, name,
              TOK_ID_LIMIT);
        return -1;
    }
    return (int32_t)v->valuedouble;
}

static int32_t trie_new_node(tok_trie *tr, uint8_t byte) {
    if (tr->n == tr->cap) {
        size_t cap = tr->cap ? 2 * tr->cap : 64;
        tok_trie_node *p = realloc(tr->nodes, cap * sizeof *p);
        if (!p) return -1;
        tr->nodes = p;
        tr->cap = cap;
    }
    tok_trie_node *nd = &tr->nodes[tr->n];
    nd->child = nd->sibling = nd->added = -1;
    nd->byte = byte;
    return (int32_t)tr->n++;
}

static bool trie_insert(tok_trie *tr, const char *s, size_t len, int32_t added) {
    if (tr->n == 0) {
        for (size_t i = 0; i < 256; i++) tr->root_child[i] = -1;
        if (trie_new_node(tr, 0) < 0) return false;
    }
    int32_t cur = 0;
    for (size_t i = 0; i < len; i++) {
        uint8_t b = (uint8_t)s[i];
        int32_t c = tr->nodes[cur].child;
        while (c >= 0 && tr->nodes[c].byte != b) c = tr->nodes[c].sibling;
        if (c < 0) {
            c = trie_new_node(tr, b);
            if (c < 0) return false;
            tr->nodes[c].sibling = tr->nodes[cur].child;
            tr->nodes[cur].child = c;
            if (cur == 0) tr->root_child[b] = c;
        }
        cur = c;
    }
    tr->nodes[cur].added = added;
    return true;
}

static void load_vocab(load_ctx *lc, tok_tokenizer *t, const cJSON *vocab, const char **id_str) {
    size_t n = 0, bytes = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, vocab) {
        n++;
        bytes += strlen(e->string) + 1;
    }
    t->names = malloc(bytes ? bytes : 1);
    if (!t->names || !strmap_init(&t->vocab, n)) {
        lfail_oom(lc);
        return;
    }
    char *p = t->names;
    cJSON_ArrayForEach(e, vocab) {
        int32_t id = get_id(lc, e, "model.vocab entry", e->string);
        if (id < 0) return;
        if (id_str[id]) {
            lfail(lc, DUET_ERR_FORMAT, "model.vocab gives id %d to both \"%.60s\" and \"%.60s\"",
                  id, id_str[id], e->string);
            return;
        }
        size_t len = strlen(e->string);
        memcpy(p, e->string, len + 1);
        strmap_put(&t->vocab, p, len, id);
        id_str[id] = p;
        t->id_flags[id] |= TOK_ID_PRESENT;
        p += len + 1;
    }
}

static void load_merges(load_ctx *lc, tok_tokenizer *t, const cJSON *merges) {
    size_t n = (size_t)cJSON_GetArraySize(merges);
    if (!pairmap_init(&t->merges, n)) {
        lfail_oom(lc);
        return;
    }
    char buf[512];
    int32_t rank = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, merges) {
        const char *a = NULL, *b = NULL;
        size_t la = 0, lb = 0;
        if (cJSON_IsString(m)) {
            /* "a b": tokens never contain a space in byte-level spelling (it is "Ġ") */
            const char *sp = strchr(m->valuestring, ' ');
            if (sp && !strchr(sp + 1, ' ')) {
                a = m->valuestring;
                la = (size_t)(sp - a);
                b = sp + 1;
                lb = strlen(b);
            }
        } else if (cJSON_IsArray(m) && cJSON_GetArraySize(m) == 2 &&
                   cJSON_IsString(cJSON_GetArrayItem(m, 0)) &&
                   cJSON_IsString(cJSON_GetArrayItem(m, 1))) {
            a = cJSON_GetArrayItem(m, 0)->valuestring;
            b = cJSON_GetArrayItem(m, 1)->valuestring;
            la = strlen(a);
            lb = strlen(b);
        }
        if (!a) {
            lfail(lc, DUET_ERR_FORMAT, "model.merges[%d] is neither \"a b\" nor [\"a\", \"b\"]",
                  rank);
            return;
        }
        int32_t ia = tok_strmap_get(&t->vocab, a, la);
        int32_t ib = tok_strmap_get(&t->vocab, b, lb);
        int32_t io = -1;
        if (la + lb <= sizeof buf) {
            memcpy(buf, a, la);
            memcpy(buf + la, b, lb);
            io = tok_strmap_get(&t->vocab, buf, la + lb);
        }
        if (ia < 0 || ib < 0 || io < 0) {
            lfail(lc, DUET_ERR_FORMAT,
                  "model.merges[%d] (\"%.*s\" + \"%.*s\") uses or makes a token not in model.vocab",
                  rank, (int)(la > 60 ? 60 : la), a, (int)(lb > 60 ? 60 : lb), b);
            return;
        }
        pairmap_put(&t->merges, ia, ib, rank, io);
        rank++;
    }
}

static void load_model(load_ctx *lc, tok_tokenizer *t, const cJSON *model, const char **id_str) {
    const cJSON *type = get(model, "type");
    if (type && (!cJSON_IsString(type) || strcmp(type->valuestring, "BPE") != 0)) {
        lfail(lc, DUET_ERR_UNSUPPORTED, "model.type %.40s is not supported (only BPE is)",
              cJSON_IsString(type) ? type->valuestring : "(not a string)");
        return;
    }
    const cJSON *dropout = get(model, "dropout");
    if (dropout && (!cJSON_IsNumber(dropout) || dropout->valuedouble != 0.0)) {
        lfail(lc, DUET_ERR_UNSUPPORTED, "model.dropout is not supported (a training feature)");
        return;
    }
    static const char *const affixes[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (size_t i = 0; i < 2; i++) {
        const cJSON *v = get(model, affixes[i]);
        if (v && !(cJSON_IsString(v) && v->valuestring[0] == '\0')) {
            lfail(lc, DUET_ERR_UNSUPPORTED, "model.%s is not supported", affixes[i]);
            return;
        }
    }
    if (get_bool(lc, model, "model", "byte_fallback", false)) {
        lfail(lc, DUET_ERR_UNSUPPORTED, "model.byte_fallback is not supported (byte-level only)");
        return;
    }
    t->fuse_unk = get_bool(lc, model, "model", "fuse_unk", false);
    t->ignore_merges = get_bool(lc, model, "model", "ignore_merges", false);

    load_vocab(lc, t, get(model, "vocab"), id_str);
    if (lc->st != DUET_OK) return;
    load_merges(lc, t, get(model, "merges"));

    t->unk_id = -1;
    const cJSON *unk = get(model, "unk_token");
    if (unk) {
        if (cJSON_IsString(unk))
            t->unk_id = tok_strmap_get(&t->vocab, unk->valuestring, strlen(unk->valuestring));
        if (t->unk_id < 0)
            lfail(lc, DUET_ERR_FORMAT, "model.unk_token is not a token of model.vocab");
    }
}

static void load_added(load_ctx *lc, tok_tokenizer *t, const cJSON *arr, const char **id_str) {
    size_t n = (size_t)cJSON_GetArraySize(arr), bytes = 0, i = 0;
    const cJSON *a;
    cJSON_ArrayForEach(a, arr) {
        const cJSON *c = get(a, "content");
        bytes += (cJSON_IsString(c) ? strlen(c->valuestring) : 0) + 1;
    }
    t->added = calloc(n ? n : 1, sizeof *t->added);
    t->added_text = malloc(bytes ? bytes : 1);
    if (!t->added || !t->added_text || !strmap_init(&t->added_map, n)) {
        lfail_oom(lc);
        return;
    }
    char *p = t->added_text;
    cJSON_ArrayForEach(a, arr) {
        const cJSON *c = get(a, "content");
        if (!cJSON_IsObject(a) || !cJSON_IsString(c) || c->valuestring[0] == '\0') {
            lfail(lc, DUET_ERR_FORMAT, "added_tokens[%zu] has no \"content\" string", i);
            return;
        }
        const cJSON *idv = cJSON_GetObjectItemCaseSensitive(a, "id");
        int32_t id = get_id(lc, idv, "added token", c->valuestring);
        if (id < 0) return;
        tok_added *ad = &t->added[i];
        ad->id = id;
        ad->special = get_bool(lc, a, "added_tokens[]", "special", false);
        ad->lstrip = get_bool(lc, a, "added_tokens[]", "lstrip", false);
        ad->rstrip = get_bool(lc, a, "added_tokens[]", "rstrip", false);
        ad->single_word = get_bool(lc, a, "added_tokens[]", "single_word", false);
        ad->normalized = get_bool(lc, a, "added_tokens[]", "normalized", !ad->special);
        size_t len = strlen(c->valuestring);
        memcpy(p, c->valuestring, len + 1);
        strmap_put(&t->added_map, p, len, id);
        id_str[id] = p;
        t->id_flags[id] |= TOK_ID_PRESENT | TOK_ID_ADDED;
        if (ad->special) t->id_flags[id] |= TOK_ID_SPECIAL;
        if (!trie_insert(ad->normalized ? &t->trie_norm : &t->trie_raw, p, len, (int32_t)i)) {
            lfail_oom(lc);
            return;
        }
        p += len + 1;
        i++;
    }
    t->n_added = i;
}

static void build_pieces(load_ctx *lc, tok_tokenizer *t, const char **id_str) {
    size_t total = 0;
    for (int32_t id = 0; id < t->n_ids; id++)
        if (id_str[id]) total += strlen(id_str[id]);
    t->pieces = malloc(total + 1);
    t->piece_off = calloc((size_t)t->n_ids, sizeof *t->piece_off);
    t->piece_len = calloc((size_t)t->n_ids, sizeof *t->piece_len);
    if (!t->pieces || !t->piece_off || !t->piece_len) {
        lfail_oom(lc);
        return;
    }
    if (total > UINT32_MAX) {
        lfail(lc, DUET_ERR_FORMAT, "tokens add up to more than 4 GB");
        return;
    }
    size_t off = 0;
    for (int32_t id = 0; id < t->n_ids; id++) {
        if (!id_str[id]) continue;
        size_t len = bytelevel_decode(t, id_str[id], strlen(id_str[id]), t->pieces + off);
        t->piece_off[id] = (uint32_t)off;
        t->piece_len[id] = (uint32_t)len;
        if (len > t->max_piece) t->max_piece = len;
        off += len;
        /* HF decides "special" by the token's string, so a vocabulary entry spelled like a
         * special added token is skipped too. */
        if (!(t->id_flags[id] & TOK_ID_ADDED)) {
            int32_t aid = tok_strmap_get(&t->added_map, id_str[id], strlen(id_str[id]));
            if (aid >= 0 && (t->id_flags[aid] & TOK_ID_SPECIAL)) t->id_flags[id] |= TOK_ID_SPECIAL;
        }
    }
    for (unsigned b = 0; b < 256; b++) {
        char u[4];
        size_t l = utf8_put(t->byte_cp[b], u);
        t->byte_id[b] = tok_strmap_get(&t->vocab, u, l);
    }
}

/* Oniguruma, which HF `tokenizers` matches with, counts U+0085 (NEL) as \s; PCRE2 with UCP
 * does not. Rewrites \s and \S outside classes, and \s inside them, to include it. (Onig's \w
 * and \h differ from PCRE2's too; no DeepSeek pattern uses them.) */
static char *onig_to_pcre2(const char *pat, size_t len) {
    char *out = malloc(len * 12 + 1);
    if (!out) return NULL;
    size_t o = 0;
    bool in_class = false;
    for (size_t i = 0; i < len; i++) {
        char c = pat[i];
        if (c == '\\' && i + 1 < len) {
            char d = pat[++i];
            const char *rep = NULL;
            if (d == 's') rep = in_class ? "\\s\\x{85}" : "[\\s\\x{85}]";
            if (d == 'S' && !in_class) rep = "[^\\s\\x{85}]";
            if (rep) {
                memcpy(out + o, rep, strlen(rep));
                o += strlen(rep);
            } else {
                out[o++] = c;
                out[o++] = d;
            }
            continue;
        }
        out[o++] = c;
        if (!in_class && c == '[') {
            in_class = true;
            if (i + 1 < len && pat[i + 1] == '^') out[o++] = pat[++i];
            if (i + 1 < len && pat[i + 1] == ']') out[o++] = pat[++i]; /* literal ']' */
        } else if (in_class && c == '[' && i + 1 < len && pat[i + 1] == ':') {
            const char *end = strstr(pat + i, ":]");
            if (end) {
                size_t l = (size_t)(end + 2 - (pat + i)) - 1;
                memcpy(out + o, pat + i + 1, l);
                o += l;
                i += l;
            }
        } else if (in_class && c == ']') {
            in_class = false;
        }
    }
    out[o] = '\0';
    return out;
}

static pcre2_code *compile_re(load_ctx *lc, const char *pat, size_t len, bool literal,
                              const char *where) {
    uint32_t opts = PCRE2_UTF | PCRE2_MATCH_INVALID_UTF;
    char *tr = NULL;
    if (literal) {
        opts |= PCRE2_LITERAL;
    } else {
        opts |= PCRE2_UCP;
        tr = onig_to_pcre2(pat, len);
        if (!tr) {
            lfail_oom(lc);
            return NULL;
        }
        pat = tr;
        len = strlen(tr);
    }
    int err;
    PCRE2_SIZE erroff;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, len, opts, &err, &erroff, NULL);
    free(tr);
    if (!re) {
        PCRE2_UCHAR msg[160];
        pcre2_get_error_message(err, msg, sizeof msg);
        lfail(lc, DUET_ERR_UNSUPPORTED, "%s: regex does not compile: %s", where, (char *)msg);
        return NULL;
    }
    /* Without JIT (e.g. a platform PCRE2 lacks it for) matching is slower but the same. */
    (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);
    return re;
}

static bool add_split(load_ctx *lc, tok_tokenizer *t, pcre2_code *re, tok_split_behavior b,
                      bool invert) {
    tok_split *p = realloc(t->splits, (t->n_splits + 1) * sizeof *p);
    if (!p) {
        pcre2_code_free(re);
        lfail_oom(lc);
        return false;
    }
    t->splits = p;
    t->splits[t->n_splits++] = (tok_split){re, b, invert};
    return true;
}

/* GPT-2's pattern, which ByteLevel applies when use_regex is true. */
static const char GPT2_PATTERN[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static void load_pretok_one(load_ctx *lc, tok_tokenizer *t, const cJSON *p, bool *bytelevel) {
    const cJSON *type = get(p, "type");
    const char *ty = cJSON_IsString(type) ? type->valuestring : "";
    if (*bytelevel) {
        lfail(lc, DUET_ERR_UNSUPPORTED, "pre_tokenizer: %.40s after ByteLevel is not supported",
              ty);
        return;
    }
    if (!strcmp(ty, "ByteLevel")) {
        *bytelevel = true;
        t->bl_stage = t->n_splits;
        t->bl_prefix_space = get_bool(lc, p, "pre_tokenizer", "add_prefix_space", true);
        if (get_bool(lc, p, "pre_tokenizer", "use_regex", true)) {
            pcre2_code *re = compile_re(lc, GPT2_PATTERN, strlen(GPT2_PATTERN), false, "ByteLevel");
            if (re) add_split(lc, t, re, TOK_SPLIT_ISOLATED, false);
        }
        return;
    }
    if (strcmp(ty, "Split") != 0) {
        lfail(lc, DUET_ERR_UNSUPPORTED,
              "pre_tokenizer type \"%.40s\" is not supported (Split and ByteLevel are)", ty);
        return;
    }
    const cJSON *pat = get(p, "pattern");
    const cJSON *rx = get(pat, "Regex"), *lit = get(pat, "String");
    const cJSON *ps = cJSON_IsString(rx) ? rx : cJSON_IsString(lit) ? lit : NULL;
    if (!ps) {
        lfail(lc, DUET_ERR_FORMAT,
              "pre_tokenizer Split has no pattern {\"Regex\"|\"String\": ...}");
        return;
    }
    static const char *const names[] = {"Removed", "Isolated", "MergedWithPrevious",
                                        "MergedWithNext", "Contiguous"};
    const cJSON *bh = get(p, "behavior");
    int b = -1;
    for (int i = 0; i < 5 && cJSON_IsString(bh); i++)
        if (!strcmp(bh->valuestring, names[i])) b = i;
    if (b < 0) {
        lfail(lc, DUET_ERR_UNSUPPORTED, "pre_tokenizer Split behavior \"%.40s\" is not supported",
              cJSON_IsString(bh) ? bh->valuestring : "(missing)");
        return;
    }
    bool invert = get_bool(lc, p, "pre_tokenizer", "invert", false);
    pcre2_code *re =
        compile_re(lc, ps->valuestring, strlen(ps->valuestring), ps == lit, "pre_tokenizer Split");
    if (re) add_split(lc, t, re, (tok_split_behavior)b, invert);
}

static void load_pipeline(load_ctx *lc, tok_tokenizer *t, const cJSON *root) {
    const cJSON *norm = get(root, "normalizer");
    if (norm) {
        const cJSON *type = get(norm, "type");
        const cJSON *list = get(norm, "normalizers");
        bool empty_seq = cJSON_IsString(type) && !strcmp(type->valuestring, "Sequence") &&
                         cJSON_IsArray(list) && cJSON_GetArraySize(list) == 0;
        if (!empty_seq) {
            lfail(lc, DUET_ERR_UNSUPPORTED, "normalizer \"%.40s\" is not supported (none is)",
                  cJSON_IsString(type) ? type->valuestring : "?");
            return;
        }
    }

    const cJSON *pre = get(root, "pre_tokenizer");
    bool bytelevel = false;
    const cJSON *type = get(pre, "type");
    if (cJSON_IsString(type) && !strcmp(type->valuestring, "Sequence")) {
        const cJSON *p;
        cJSON_ArrayForEach(p, get(pre, "pretokenizers")) {
            load_pretok_one(lc, t, p, &bytelevel);
            if (lc->st != DUET_OK) return;
        }
    } else if (pre) {
        load_pretok_one(lc, t, pre, &bytelevel);
    }
    if (lc->st == DUET_OK && !bytelevel)
        lfail(lc, DUET_ERR_UNSUPPORTED,
              "pre_tokenizer has no ByteLevel step (only byte-level "
              "BPE is supported)");
    if (lc->st != DUET_OK) return;

    /* Decoder: ByteLevel, alone or as the only step of a Sequence. */
    const cJSON *dec = get(root, "decoder");
    const cJSON *dtype = get(dec, "type");
    if (cJSON_IsString(dtype) && !strcmp(dtype->valuestring, "Sequence")) {
        const cJSON *list = get(dec, "decoders");
        dec = cJSON_GetArraySize(list) == 1 ? cJSON_GetArrayItem(list, 0) : NULL;
        dtype = get(dec, "type");
    }
    if (!cJSON_IsString(dtype) || strcmp(dtype->valuestring, "ByteLevel") != 0) {
        lfail(lc, DUET_ERR_UNSUPPORTED, "decoder \"%.40s\" is not supported (ByteLevel is)",
              cJSON_IsString(dtype) ? dtype->valuestring : "?");
        return;
    }

    /* Post-processor: what add_special_tokens adds. */
    const cJSON *post = get(root, "post_processor");
    const cJSON *list = NULL;
    const cJSON *ptype = get(post, "type");
    if (cJSON_IsString(ptype) && !strcmp(ptype->valuestring, "Sequence"))
        list = get(post, "processors");
    int32_t pre_ids[64], suf_ids[64];
    size_t npre = 0, nsuf = 0;
    for (const cJSON *pp = list ? list->child : post; pp; pp = list ? pp->next : NULL) {
        const cJSON *ty = get(pp, "type");
        const char *tys = cJSON_IsString(ty) ? ty->valuestring : "?";
        int32_t mpre[32], msuf[32];
        size_t mnpre = 0, mnsuf = 0;
        if (!strcmp(tys, "ByteLevel")) {
            /* offsets only */
        } else if (!strcmp(tys, "TemplateProcessing")) {
            bool seen_a = false;
            const cJSON *it;
            cJSON_ArrayForEach(it, get(pp, "single")) {
                if (get(it, "Sequence")) {
                    seen_a = true;
                    continue;
                }
                const cJSON *sp = get(get(it, "SpecialToken"), "id");
                if (!cJSON_IsString(sp)) {
                    lfail(lc, DUET_ERR_FORMAT,
                          "post_processor TemplateProcessing item is neither "
                          "Sequence nor SpecialToken");
                    return;
                }
                const cJSON *ids = get(get(get(pp, "special_tokens"), sp->valuestring), "ids");
                const cJSON *idv;
                if (!cJSON_IsArray(ids)) {
                    lfail(lc, DUET_ERR_FORMAT,
                          "post_processor TemplateProcessing names an unknown special token");
                    return;
                }
                cJSON_ArrayForEach(idv, ids) {
                    int32_t id = get_id(lc, idv, "post_processor token", sp->valuestring);
                    if (id < 0) return;
                    if (mnpre >= 32 || mnsuf >= 32) {
                        lfail(lc, DUET_ERR_UNSUPPORTED, "post_processor adds too many tokens");
                        return;
                    }
                    if (seen_a)
                        msuf[mnsuf++] = id;
                    else
                        mpre[mnpre++] = id;
                }
            }
        } else if (!strcmp(tys, "RobertaProcessing") || !strcmp(tys, "BertProcessing")) {
            const cJSON *cls = get(pp, "cls"), *sep = get(pp, "sep");
            int32_t ic = get_id(lc, cJSON_GetArrayItem(cls, 1), "post_processor cls", "cls");
            int32_t is = get_id(lc, cJSON_GetArrayItem(sep, 1), "post_processor sep", "sep");
            if (ic < 0 || is < 0) return;
            mpre[mnpre++] = ic;
            msuf[mnsuf++] = is;
        } else {
            lfail(lc, DUET_ERR_UNSUPPORTED, "post_processor \"%.40s\" is not supported", tys);
            return;
        }
        /* A later processor wraps the output of the earlier ones. */
        if (npre + mnpre > 64 || nsuf + mnsuf > 64) {
            lfail(lc, DUET_ERR_UNSUPPORTED, "post_processor adds too many tokens");
            return;
        }
        memmove(pre_ids + mnpre, pre_ids, npre * sizeof *pre_ids);
        memcpy(pre_ids, mpre, mnpre * sizeof *pre_ids);
        npre += mnpre;
        memcpy(suf_ids + nsuf, msuf, mnsuf * sizeof *suf_ids);
        nsuf += mnsuf;
    }
    t->n_post_pre = npre;
    t->n_post = npre + nsuf;
    t->post_ids = malloc((t->n_post ? t->n_post : 1) * sizeof *t->post_ids);
    if (!t->post_ids) {
        lfail_oom(lc);
        return;
    }
    memcpy(t->post_ids, pre_ids, npre * sizeof *pre_ids);
    memcpy(t->post_ids + npre, suf_ids, nsuf * sizeof *suf_ids);
    for (size_t i = 0; i < t->n_post; i++)
        if (t->post_ids[i] >= t->n_ids || !(t->id_flags[t->post_ids[i]] & TOK_ID_PRESENT))
            lfail(lc, DUET_ERR_FORMAT, "post_processor adds id %d, which no token has",
                  t->post_ids[i]);
}

static void load_tokenizer_json(load_ctx *lc, tok_tokenizer *t, const cJSON *root) {
    const cJSON *model = get(root, "model");
    const cJSON *vocab = get(model, "vocab");
    const cJSON *merges = get(model, "merges");
    const cJSON *added = get(root, "added_tokens");
    if (!cJSON_IsObject(root) || !cJSON_IsObject(model) || !cJSON_IsObject(vocab) ||
        !cJSON_IsArray(merges)) {
        lfail(lc, DUET_ERR_FORMAT,
              "not a tokenizer: needs model.vocab (object) and model.merges "
              "(array)");
        return;
    }
    if (added && !cJSON_IsArray(added)) {
        lfail(lc, DUET_ERR_FORMAT, "added_tokens must be an array");
        return;
    }
    /* One pass for the id space, so per-id tables can be allocated once. */
    int32_t max_id = -1;
    const cJSON *e;
    cJSON_ArrayForEach(e, vocab) {
        int32_t id = get_id(lc, e, "model.vocab entry", e->string);
        if (id > max_id) max_id = id;
    }
    cJSON_ArrayForEach(e, added) {
        const cJSON *c = get(e, "content");
        int32_t id =
            get_id(lc, get(e, "id"), "added token", cJSON_IsString(c) ? c->valuestring : "?");
        if (id > max_id) max_id = id;
    }
    if (lc->st != DUET_OK) return;
    if (max_id < 0) {
        lfail(lc, DUET_ERR_FORMAT, "the vocabulary is empty");
        return;
    }
    t->n_ids = max_id + 1;
    t->id_flags = calloc((size_t)t->n_ids, 1);
    const char **id_str = calloc((size_t)t->n_ids, sizeof *id_str);
    if (!t->id_flags || !id_str) {
        free(id_str);
        lfail_oom(lc);
        return;
    }
    load_model(lc, t, model, id_str);
    if (lc->st == DUET_OK) load_added(lc, t, added, id_str);
    if (lc->st == DUET_OK) build_pieces(lc, t, id_str);
    free(id_str);
    if (lc->st == DUET_OK) load_pipeline(lc, t, root);
    if (lc->st != DUET_OK) return;

    for (size_t i = 0; i < t->n_added; i++) {
        if (!t->added[i].single_word) continue;
        /* Rust's char::is_alphanumeric or '_', what HF calls a word character */
        static const char W[] = "[\\p{Alphabetic}\\p{N}_]";
        t->word_re = compile_re(lc, W, strlen(W), false, "single_word");
        break;
    }
}

/* ---- tokenizer_config.json ----------------------------------------------------------------- */

/* bos_token / eos_token: a string, an AddedToken object, or null. */
static int32_t config_token(load_ctx *lc, const tok_tokenizer *t, const cJSON *cfg,
                            const char *key) {
    const cJSON *v = get(cfg, key);
    if (!v) return -1;
    if (cJSON_IsObject(v)) v = get(v, "content");
    if (!cJSON_IsString(v)) {
        lfail(lc, DUET_ERR_FORMAT, "%s must be a string or an object with \"content\"", key);
        return -1;
    }
    int32_t id = tok_token_to_id(t, v->valuestring);
    if (id < 0)
        lfail(lc, DUET_ERR_FORMAT, "%s \"%.60s\" is not a token of tokenizer.json", key,
              v->valuestring);
    return id;
}

static void load_config(load_ctx *lc, tok_tokenizer *t, const cJSON *cfg) {
    if (!cJSON_IsObject(cfg)) {
        lfail(lc, DUET_ERR_FORMAT, "not a JSON object");
        return;
    }
    t->add_bos = get_bool(lc, cfg, "tokenizer_config", "add_bos_token", false);
    t->add_eos = get_bool(lc, cfg, "tokenizer_config", "add_eos_token", false);
    t->bos_id = config_token(lc, t, cfg, "bos_token");
    t->eos_id = config_token(lc, t, cfg, "eos_token");
}

static cJSON *read_json(load_ctx *lc, size_t max) {
    char *text;
    duet_status st = fio_read_text(lc->path, max, &text);
    if (st != DUET_OK) {
        lc->st = st; /* fio_read_text logged it */
        return NULL;
    }
    cJSON *root = cJSON_ParseWithLength(text, strlen(text));
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        lfail(lc, DUET_ERR_FORMAT, "not valid JSON (near byte %lld)",
              at ? (long long)(at - text) : -1LL);
    }
    free(text);
    return root;
}

duet_status tok_load(const char *dir, tok_tokenizer **tok_p) {
    if (!dir || !tok_p) return DUET_ERR_INVALID;
    char path[PATH_MAX];
    if (snprintf(path, sizeof path, "%s/tokenizer_config.json", dir) >= (int)sizeof path) {
        LOG_ERROR("%s: tokenizer directory path is too long", dir);
        return DUET_ERR_INVALID;
    }
    tok_tokenizer *t = calloc(1, sizeof *t);
    if (!t) return DUET_ERR_NO_MEMORY;
    t->bos_id = t->eos_id = t->unk_id = -1;
    bytelevel_init(t);

    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    load_ctx lc = {path, DUET_OK};
    cJSON *root = read_json(&lc, TOK_JSON_MAX);
    if (root) load_tokenizer_json(&lc, t, root);
    cJSON_Delete(root);
    if (lc.st == DUET_OK) {
        snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
        cJSON *cfg = read_json(&lc, TOK_CONFIG_MAX);
        if (cfg) load_config(&lc, t, cfg);
        cJSON_Delete(cfg);
    }
    if (lc.st != DUET_OK) {
        tok_destroy(t);
        return lc.st;
    }
    *tok_p = t;
    return DUET_OK;
}

void tok_destroy(tok_tokenizer *t) {
    if (!t) return;
    free(t->id_flags);
    free(t->piece_off);
    free(t->piece_len);
    free(t->pieces);
    free(t->names);
    strmap_free(&t->vocab);
    strmap_free(&t->added_map);
    pairmap_free(&t->merges);
    free(t->added);
    free(t->added_text);
    free(t->trie_raw.nodes);
    free(t->trie_norm.nodes);
    pcre2_code_free(t->word_re);
    for (size_t i = 0; i < t->n_splits; i++) pcre2_code_free(t->splits[i].re);
    free(t->splits);
    free(t->post_ids);
    free(t);
}

/* ---- lookups ------------------------------------------------------------------------------ */

static bool id_ok(const tok_tokenizer *t, int32_t id) {
    return id >= 0 && id < t->n_ids && (t->id_flags[id] & TOK_ID_PRESENT);
}

int32_t tok_vocab_size(const tok_tokenizer *t) {
    return t->n_ids;
}

int32_t tok_token_to_id(const tok_tokenizer *t, const char *token) {
    if (!token) return -1;
    size_t len = strlen(token);
    int32_t id = tok_strmap_get(&t->added_map, token, len);
    return id >= 0 ? id : tok_strmap_get(&t->vocab, token, len);
}

duet_status tok_id_to_piece(const tok_tokenizer *t, int32_t id, const char **bytes_p,
                            size_t *len_p) {
    if (!id_ok(t, id)) return DUET_ERR_INVALID;
    *bytes_p = t->pieces + t->piece_off[id];
    *len_p = t->piece_len[id];
    return DUET_OK;
}

bool tok_is_special(const tok_tokenizer *t, int32_t id) {
    return id_ok(t, id) && (t->id_flags[id] & TOK_ID_SPECIAL);
}

int32_t tok_bos_id(const tok_tokenizer *t) {
    return t->bos_id;
}

int32_t tok_eos_id(const tok_tokenizer *t) {
    return t->eos_id;
}

bool tok_add_bos(const tok_tokenizer *t) {
    return t->add_bos;
}

bool tok_add_eos(const tok_tokenizer *t) {
    return t->add_eos;
}

size_t tok_max_piece_len(const tok_tokenizer *t) {
    return t->max_piece;
}

/* ---- decoding ----------------------------------------------------------------------------- */

duet_status tok_decode(const tok_tokenizer *t, const int32_t *ids, size_t n, bool skip_special,
                       char **text_p, size_t *len_p) {
    if (!t || (!ids && n) || !text_p || !len_p) return DUET_ERR_INVALID;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        if (!id_ok(t, ids[i])) {
            /* Ids come from clients (prompt token ids) or the sampler; the caller reports it,
             * so this is not an error of the server's. */
            LOG_DEBUG("tok_decode: id %d at position %zu is not a token", ids[i], i);
            return DUET_ERR_INVALID;
        }
        total += t->piece_len[ids[i]];
    }
    uint8_t *raw = malloc(total ? total : 1);
    char *out = malloc(3 * total + 1);
    if (!raw || !out) {
        free(raw);
        free(out);
        return DUET_ERR_NO_MEMORY;
    }
    size_t r = 0;
    for (size_t i = 0; i < n; i++) {
        if (skip_special && (t->id_flags[ids[i]] & TOK_ID_SPECIAL)) continue;
        memcpy(raw + r, t->pieces + t->piece_off[ids[i]], t->piece_len[ids[i]]);
        r += t->piece_len[ids[i]];
    }
    size_t o = 0;
    utf8_lossy(raw, r, true, out, &o);
    free(raw);
    out[o] = '\0';
    *text_p = out;
    *len_p = o;
    return DUET_OK;
}

struct tok_stream {
    const tok_tokenizer *tok;
    bool skip_special;
    size_t npend; /* bytes of an incomplete sequence held from earlier tokens (3 at most) */
    uint8_t *in;  /* [3 + max piece]: held bytes + the new piece */
    char *out;    /* [3 * (3 + max piece)] */
};

duet_status tok_stream_create(const tok_tokenizer *tok, bool skip_special, tok_stream **s_p) {
    if (!tok || !s_p) return DUET_ERR_INVALID;
    tok_stream *s = calloc(1, sizeof *s);
    size_t cap = tok->max_piece + 4;
    if (s) {
        s->in = malloc(cap);
        s->out = malloc(3 * cap);
    }
    if (!s || !s->in || !s->out) {
        tok_stream_destroy(s);
        return DUET_ERR_NO_MEMORY;
    }
    s->tok = tok;
    s->skip_special = skip_special;
    *s_p = s;
    return DUET_OK;
}

void tok_stream_destroy(tok_stream *s) {
    if (!s) return;
    free(s->in);
    free(s->out);
    free(s);
}

duet_status tok_stream_put(tok_stream *s, int32_t id, const char **text_p, size_t *len_p) {
    const tok_tokenizer *t = s->tok;
    if (!id_ok(t, id)) {
        LOG_DEBUG("tok_stream_put: id %d is not a token", id);
        return DUET_ERR_INVALID;
    }
    size_t o = 0;
    if (!(s->skip_special && (t->id_flags[id] & TOK_ID_SPECIAL))) {
        size_t n = s->npend + t->piece_len[id];
        memcpy(s->in + s->npend, t->pieces + t->piece_off[id], t->piece_len[id]);
        size_t used = utf8_lossy(s->in, n, false, s->out, &o);
        s->npend = n - used;
        memmove(s->in, s->in + used, s->npend);
    }
    *text_p = s->out;
    *len_p = o;
    return DUET_OK;
}

void tok_stream_finish(tok_stream *s, const char **text_p, size_t *len_p) {
    size_t o = 0;
    utf8_lossy(s->in, s->npend, true, s->out, &o);
    s->npend = 0;
    *text_p = s->out;
    *len_p = o;
}
