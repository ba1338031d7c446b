/* Jinja source → syntax tree: the lexer with jinja2's whitespace rules as transformers sets them
 * (trim_blocks, lstrip_blocks, no trailing newline kept, "-"/"+" markers), and a recursive-
 * descent parser with jinja2's operator precedence. Evaluation is jinja_render.c's business. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "text/jinja-impl.h"

/* Deeper nesting than this (brackets, operators, blocks) is refused before the C stack is. */
#define PARSE_MAX_DEPTH 200

/* ---- arenas ----------------------------------------------------------------------------- */

struct ja_chunk {
    ja_chunk *prev;
    size_t used, cap;
    max_align_t data[];
};

#define JA_CHUNK ((size_t)64 << 10)

void *ja_alloc(ja_arena *a, size_t n) {
    n = (n + 7) & ~(size_t)7;
    if (!n) n = 8;
    ja_chunk *h = a->head;
    if (!h || h->cap - h->used < n) {
        size_t cap = n > JA_CHUNK ? n : JA_CHUNK;
        a->refused = a->limit && a->meter && *a->meter + cap + sizeof *h > a->limit;
        if (a->refused) return NULL;
        h = malloc(sizeof *h + cap);
        if (!h) return NULL;
        h->prev = a->head;
        h->used = 0;
        h->cap = cap;
        a->head = h;
        a->total += cap + sizeof *h;
        if (a->meter) *a->meter += cap + sizeof *h;
    }
    void *p = (char *)h->data + h->used;
    h->used += n;
    memset(p, 0, n);
    return p;
}

ja_mark ja_save(const ja_arena *a) {
    return (ja_mark){a->head, a->head ? a->head->used : 0};
}

void ja_release(ja_arena *a, ja_mark m) {
    while (a->head && a->head != m.chunk) {
        ja_chunk *h = a->head;
        a->head = h->prev;
        a->total -= h->cap + sizeof *h;
        if (a->meter) *a->meter -= h->cap + sizeof *h;
        free(h);
    }
    if (a->head) a->head->used = m.used;
}

void ja_free(ja_arena *a) {
    ja_release(a, (ja_mark){NULL, 0});
}

/* ---- Python's whitespace -------------------------------------------------------------------- */

static uint32_t utf8_at(const unsigned char *s, size_t n, size_t *len_p) {
    *len_p = 1;
    if (s[0] < 0x80) return s[0];
    size_t k = s[0] >= 0xF0 ? 4 : s[0] >= 0xE0 ? 3 : s[0] >= 0xC0 ? 2 : 1;
    if (k == 1 || k > n) return 0xFFFD;
    uint32_t c = s[0] & (0x7F >> k);
    for (size_t i = 1; i < k; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0xFFFD;
        c = c << 6 | (s[i] & 0x3F);
    }
    *len_p = k;
    return c;
}

static bool is_py_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
           c == 0x202F || c == 0x205F || c == 0x3000;
}

size_t jinja_space_len(const char *s, size_t n) {
    if (!n) return 0;
    size_t k;
    uint32_t c = utf8_at((const unsigned char *)s, n, &k);
    return is_py_space(c) ? k : 0;
}

size_t jinja_space_len_back(const char *s, size_t n) {
    for (size_t k = 1; k <= 3 && k <= n; k++) {
        unsigned char b = (unsigned char)s[n - k];
        if (k == 1 && b < 0x80) return is_py_space(b) ? 1 : 0;
        if ((b & 0xC0) != 0x80) {
            size_t len;
            uint32_t c = utf8_at((const unsigned char *)s + n - k, k, &len);
            return len == k && is_py_space(c) ? k : 0;
        }
    }
    return 0;
}

/* ---- lexer ---------------------------------------------------------------------------------- */

typedef enum tk_type {
    TK_DATA,
    TK_VAR_BEGIN,
    TK_VAR_END,
    TK_BLOCK_BEGIN,
    TK_BLOCK_END,
    TK_NAME,
    TK_STRING,
    TK_INT,
    TK_FLOAT,
    TK_OP,
    TK_EOF,
} tk_type;

enum {
    OP_ADD,
    OP_SUB,
    OP_MUL,
    OP_DIV,
    OP_FLOORDIV,
    OP_MOD,
    OP_POW,
    OP_TILDE,
    OP_LBRACKET,
    OP_RBRACKET,
    OP_LPAREN,
    OP_RPAREN,
    OP_LBRACE,
    OP_RBRACE,
    OP_EQ,
    OP_NE,
    OP_GT,
    OP_GE,
    OP_LT,
    OP_LE,
    OP_ASSIGN,
    OP_DOT,
    OP_COLON,
    OP_PIPE,
    OP_COMMA,
    OP_SEMI,
};

static const char *const OP_TEXT[] = {
    "+", "-",  "*",  "/", "//", "%", "**", "~", "[", "]", "(", ")", "{",
    "}", "==", "!=", ">", ">=", "<", "<=", "=", ".", ":", "|", ",", ";"};

typedef struct tok {
    uint8_t type, op;
    int line;
    jstr s; /* DATA, NAME, STRING (decoded) */
    int64_t i;
    double f;
} tok;

typedef struct lexer {
    ja_arena *arena;
    const char *src;
    size_t len, pos;
    int line;
    bool line_starting;
    tok *toks;
    size_t n, cap;
    duet_status st;
    char *err;
    size_t err_cap;
} lexer;

typedef struct parser {
    ja_arena *arena;
    tok *toks;
    size_t pos;
    int depth;
    duet_status st;
    char *err;
    size_t err_cap;
} parser;

static void set_err(duet_status *st, char *err, size_t cap, duet_status code, int line,
                    const char *fmt, va_list ap) {
    if (*st != DUET_OK) return;
    *st = code;
    if (!err || !cap) return;
    int k = snprintf(err, cap, "line %d: ", line);
    if (k >= 0 && (size_t)k < cap) vsnprintf(err + k, cap - (size_t)k, fmt, ap);
}

static bool lex_fail(lexer *lx, duet_status code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static bool lex_fail(lexer *lx, duet_status code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    set_err(&lx->st, lx->err, lx->err_cap, code, lx->line, fmt, ap);
    va_end(ap);
    return false;
}

static tok *lex_push(lexer *lx, uint8_t type, int line) {
    if (lx->n == lx->cap) {
        size_t cap = lx->cap ? lx->cap * 2 : 256;
        tok *t = realloc(lx->toks, cap * sizeof *t);
        if (!t) {
            lex_fail(lx, DUET_ERR_NO_MEMORY, "out of memory");
            return NULL;
        }
        lx->toks = t;
        lx->cap = cap;
    }
    tok *t = &lx->toks[lx->n++];
    memset(t, 0, sizeof *t);
    t->type = type;
    t->line = line;
    return t;
}

/* Moves the cursor to q, counting lines. */
static void lex_advance(lexer *lx, size_t q) {
    for (size_t i = lx->pos; i < q; i++)
        if (lx->src[i] == '\n') lx->line++;
    if (q > lx->pos) lx->line_starting = lx->src[q - 1] == '\n';
    lx->pos = q;
}

/* Text before a tag, with the whitespace rules for that tag applied. */
static bool lex_data(lexer *lx, size_t start, size_t end, char sign, bool is_var) {
    const char *s = lx->src + start;
    size_t n = end - start;
    if (sign == '-') {
        size_t k;
        while (n && (k = jinja_space_len_back(s, n))) n -= k;
    } else if (sign != '+' && !is_var) {
        /* lstrip_blocks: a block or comment tag alone after indentation takes it away */
        size_t l = n;
        while (l && s[l - 1] != '\n') l--;
        if (l > 0 || lx->line_starting) {
            size_t k = l;
            while (k < n && (s[k] == ' ' || s[k] == '\t')) k++;
            if (k == n) n = l;
        }
    }
    if (!n) return true;
    tok *t = lex_push(lx, TK_DATA, lx->line);
    if (!t) return false;
    t->s = (jstr){s, n};
    return true;
}

static size_t skip_py_space(const char *s, size_t pos, size_t len) {
    size_t k;
    while (pos < len && (k = jinja_space_len(s + pos, len - pos))) pos += k;
    return pos;
}

/* After a closing marker: "-" eats all whitespace, a plain block or comment end one newline. */
static size_t after_end(lexer *lx, size_t q, char sign, bool trim) {
    if (sign == '-') return skip_py_space(lx->src, q, lx->len);
    if (sign != '+' && trim && q < lx->len && lx->src[q] == '\n') return q + 1;
    return q;
}

static void utf8_put(char *out, size_t *n, uint32_t c) {
    if (c < 0x80) {
        out[(*n)++] = (char)c;
    } else if (c < 0x800) {
        out[(*n)++] = (char)(0xC0 | c >> 6);
        out[(*n)++] = (char)(0x80 | (c & 0x3F));
    } else if (c < 0x10000) {
        out[(*n)++] = (char)(0xE0 | c >> 12);
        out[(*n)++] = (char)(0x80 | (c >> 6 & 0x3F));
        out[(*n)++] = (char)(0x80 | (c & 0x3F));
    } else {
        out[(*n)++] = (char)(0xF0 | c >> 18);
        out[(*n)++] = (char)(0x80 | (c >> 12 & 0x3F));
        out[(*n)++] = (char)(0x80 | (c >> 6 & 0x3F));
        out[(*n)++] = (char)(0x80 | (c & 0x3F));
    }
}

static int hexval(char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* A string literal from its opening quote, decoded as Python's unicode-escape does (unknown
 * escapes stay as written, as in Python). */
static bool lex_string(lexer *lx, size_t *pos_p) {
    size_t p = *pos_p;
    char q = lx->src[p++];
    size_t start = p;
    while (p < lx->len && lx->src[p] != q) p += lx->src[p] == '\\' ? 2 : 1;
    if (p >= lx->len) return lex_fail(lx, DUET_ERR_FORMAT, "unterminated string");
    size_t raw = p - start;
    char *out = ja_alloc(lx->arena, raw + 1);
    if (!out) return lex_fail(lx, DUET_ERR_NO_MEMORY, "out of memory");
    const char *s = lx->src + start;
    size_t n = 0;
    for (size_t i = 0; i < raw; i++) {
        if (s[i] != '\\' || i + 1 >= raw) {
            out[n++] = s[i];
            continue;
        }
        char e = s[++i];
        int digits = 0;
        switch (e) {
        case '\n':
            break; /* line continuation */
        case '\\':
        case '\'':
        case '"':
            out[n++] = e;
            break;
        case 'n':
            out[n++] = '\n';
            break;
        case 't':
            out[n++] = '\t';
            break;
        case 'r':
            out[n++] = '\r';
            break;
        case 'a':
            out[n++] = '\a';
            break;
        case 'b':
            out[n++] = '\b';
            break;
        case 'f':
            out[n++] = '\f';
            break;
        case 'v':
            out[n++] = '\v';
            break;
        case 'x':
            digits = 2;
            break;
        case 'u':
            digits = 4;
            break;
        case 'U':
            digits = 8;
            break;
        case 'N':
            return lex_fail(lx, DUET_ERR_UNSUPPORTED, "unsupported construct '\\N{...}'");
        default:
            if (e >= '0' && e <= '7') {
                uint32_t c = 0;
                int k = 0;
                while (k < 3 && i < raw && s[i] >= '0' && s[i] <= '7')
                    c = c * 8 + (uint32_t)(s[i++] - '0'), k++;
                i--;
                utf8_put(out, &n, c);
            } else {
                out[n++] = '\\';
                out[n++] = e;
            }
        }
        if (digits) {
            uint32_t c = 0;
            for (int k = 0; k < digits; k++) {
                int h = i + 1 < raw ? hexval(s[i + 1]) : -1;
                if (h < 0)
                    return lex_fail(lx, DUET_ERR_FORMAT, "truncated \\%c escape in a string", e);
                c = c << 4 | (uint32_t)h;
                i++;
            }
            if (c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF))
                return lex_fail(lx, DUET_ERR_FORMAT, "escape \\%c%0*X is not a character", e,
                                digits, (unsigned)c);
            utf8_put(out, &n, c);
        }
    }
    tok *t = lex_push(lx, TK_STRING, lx->line);
    if (!t) return false;
    t->s = (jstr){out, n};
    lex_advance(lx, p + 1);
    *pos_p = p + 1;
    return true;
}

static bool is_digit(char ch) {
    return ch >= '0' && ch <= '9';
}
static bool is_name_start(char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || ch == '_';
}

/* Digits with single underscores between them, as jinja2 reads them. */
static size_t scan_digits(const char *s, size_t p, size_t len) {
    if (p >= len || !is_digit(s[p])) return p;
    while (p < len && (is_digit(s[p]) || (s[p] == '_' && p + 1 < len && is_digit(s[p + 1])))) p++;
    return p;
}

static bool lex_number(lexer *lx, size_t *pos_p) {
    const char *s = lx->src;
    size_t p = *pos_p, end = scan_digits(s, p, lx->len);
    bool is_float = false;
    if (end + 1 < lx->len && s[end] == '.' && is_digit(s[end + 1])) {
        end = scan_digits(s, end + 1, lx->len);
        is_float = true;
    }
    if (end < lx->len && (s[end] == 'e' || s[end] == 'E')) {
        size_t e = end + 1;
        if (e < lx->len && (s[e] == '+' || s[e] == '-')) e++;
        size_t d = scan_digits(s, e, lx->len);
        if (d > e) {
            end = d;
            is_float = true;
        }
    }
    char buf[64];
    size_t n = 0;
    for (size_t i = p; i < end; i++)
        if (s[i] != '_') {
            if (n + 1 >= sizeof buf) return lex_fail(lx, DUET_ERR_FORMAT, "number too long");
            buf[n++] = s[i];
        }
    buf[n] = '\0';
    tok *t = lex_push(lx, is_float ? TK_FLOAT : TK_INT, lx->line);
    if (!t) return false;
    if (is_float) {
        t->f = strtod(buf, NULL);
    } else {
        char *e;
        unsigned long long v = strtoull(buf, &e, 10);
        if (v > INT64_MAX || n > 19)
            return lex_fail(lx, DUET_ERR_UNSUPPORTED,
                            "unsupported construct '%s' (integer beyond 64 bits)", buf);
        t->i = (int64_t)v;
    }
    lex_advance(lx, end);
    *pos_p = end;
    return true;
}

/* The inside of {{ }} or {% %} after its opener, up to and including its end marker. */
static bool lex_tag(lexer *lx, bool is_var) {
    const char *s = lx->src;
    int depth = 0;
    for (;;) {
        size_t p = skip_py_space(s, lx->pos, lx->len);
        lex_advance(lx, p);
        if (p >= lx->len)
            return lex_fail(lx, DUET_ERR_FORMAT, "unexpected end of template, expected '%s'",
                            is_var ? "}}" : "%}");
        const char *end = is_var ? "}}" : "%}";
        if (depth == 0) {
            char sign = 0;
            size_t q = p;
            if ((s[q] == '-' || (s[q] == '+' && !is_var)) && q + 3 <= lx->len &&
                !strncmp(s + q + 1, end, 2)) {
                sign = s[q];
                q++;
            }
            if (q + 2 <= lx->len && !strncmp(s + q, end, 2)) {
                if (!lex_push(lx, is_var ? TK_VAR_END : TK_BLOCK_END, lx->line)) return false;
                lex_advance(lx, q + 2);
                lex_advance(lx, after_end(lx, q + 2, sign, !is_var));
                return true;
            }
        }
        char ch = s[p];
        if (ch == '\'' || ch == '"') {
            if (!lex_string(lx, &p)) return false;
        } else if (is_digit(ch)) {
            if (!lex_number(lx, &p)) return false;
        } else if (is_name_start(ch)) {
            size_t e = p;
            while (e < lx->len && (is_name_start(s[e]) || is_digit(s[e]))) e++;
            tok *t = lex_push(lx, TK_NAME, lx->line);
            if (!t) return false;
            t->s = (jstr){s + p, e - p};
            lex_advance(lx, e);
        } else {
            int op = -1;
            size_t best = 0;
            for (int k = 0; k < (int)(sizeof OP_TEXT / sizeof *OP_TEXT); k++) {
                size_t l = strlen(OP_TEXT[k]);
                if (l > best && p + l <= lx->len && !strncmp(s + p, OP_TEXT[k], l)) {
                    op = k;
                    best = l;
                }
            }
            if (op < 0) {
                if ((unsigned char)ch < 0x20 || (unsigned char)ch >= 0x7F)
                    return lex_fail(lx, DUET_ERR_FORMAT, "unexpected byte 0x%02X in a tag",
                                    (unsigned char)ch);
                return lex_fail(lx, DUET_ERR_FORMAT, "unexpected character '%c' in a tag", ch);
            }
            if (op == OP_LPAREN || op == OP_LBRACKET || op == OP_LBRACE) depth++;
            if ((op == OP_RPAREN || op == OP_RBRACKET || op == OP_RBRACE) && depth > 0) depth--;
            tok *t = lex_push(lx, TK_OP, lx->line);
            if (!t) return false;
            t->op = (uint8_t)op;
            lex_advance(lx, p + best);
        }
    }
}

/* {% raw %}: from the cursor (after the opening tag) to {% endraw %}, as one text. */
static bool lex_raw(lexer *lx) {
    const char *s = lx->src;
    for (size_t q = lx->pos; q + 1 < lx->len; q++) {
        if (s[q] != '{' || s[q + 1] != '%') continue;
        size_t p = q + 2;
        char sign = 0;
        if (p < lx->len && (s[p] == '-' || s[p] == '+')) sign = s[p++];
        p = skip_py_space(s, p, lx->len);
        if (p + 6 > lx->len || strncmp(s + p, "endraw", 6) != 0) continue;
        p = skip_py_space(s, p + 6, lx->len);
        char esign = 0;
        if (p < lx->len && (s[p] == '-' || s[p] == '+')) esign = s[p++];
        if (p + 2 > lx->len || strncmp(s + p, "%}", 2) != 0) continue;
        if (!lex_data(lx, lx->pos, q, sign, false)) return false;
        lex_advance(lx, p + 2);
        lex_advance(lx, after_end(lx, p + 2, esign, true));
        return true;
    }
    return lex_fail(lx, DUET_ERR_FORMAT, "missing end of raw directive");
}

/* Is s[p..] "raw" then the end of its tag? Returns the position after the tag, or 0. */
static size_t raw_open(const lexer *lx, size_t p, char *sign_p) {
    const char *s = lx->src;
    p = skip_py_space(s, p, lx->len);
    if (p + 3 > lx->len || strncmp(s + p, "raw", 3) != 0) return 0;
    p = skip_py_space(s, p + 3, lx->len);
    *sign_p = 0;
    if (p < lx->len && s[p] == '-') *sign_p = s[p++];
    if (p + 2 > lx->len || strncmp(s + p, "%}", 2) != 0) return 0;
    return p + 2;
}

static bool lex_all(lexer *lx) {
    const char *s = lx->src;
    lx->line = 1;
    lx->line_starting = true;
    for (;;) {
        size_t q = lx->pos;
        while (q + 1 < lx->len &&
               !(s[q] == '{' && (s[q + 1] == '{' || s[q + 1] == '%' || s[q + 1] == '#')))
            q++;
        if (q + 1 >= lx->len) {
            if (!lex_data(lx, lx->pos, lx->len, '+', true)) return false;
            lex_advance(lx, lx->len);
            return lex_push(lx, TK_EOF, lx->line) != NULL;
        }
        char kind = s[q + 1];
        size_t p = q + 2;
        char sign = 0;
        if (p < lx->len && (s[p] == '-' || s[p] == '+')) sign = s[p++];
        if (!lex_data(lx, lx->pos, q, sign, kind == '{')) return false;
        lex_advance(lx, p);
        if (kind == '#') {
            size_t e = p;
            while (e + 1 < lx->len && !(s[e] == '#' && s[e + 1] == '}')) e++;
            if (e + 1 >= lx->len) return lex_fail(lx, DUET_ERR_FORMAT, "missing end of comment");
            char esign = e > p && (s[e - 1] == '-' || s[e - 1] == '+') ? s[e - 1] : 0;
            lex_advance(lx, e + 2);
            lex_advance(lx, after_end(lx, e + 2, esign, true));
        } else if (kind == '%') {
            char rsign;
            size_t after = raw_open(lx, p, &rsign);
            if (after) {
                lex_advance(lx, after);
                lex_advance(lx, after_end(lx, after, rsign, false));
                if (!lex_raw(lx)) return false;
                continue;
            }
            if (!lex_push(lx, TK_BLOCK_BEGIN, lx->line) || !lex_tag(lx, false)) return false;
        } else {
            if (!lex_push(lx, TK_VAR_BEGIN, lx->line) || !lex_tag(lx, true)) return false;
        }
    }
}

/* ---- parser --------------------------------------------------------------------------------- */

static bool fail(parser *ps, duet_status code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static bool fail(parser *ps, duet_status code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    set_err(&ps->st, ps->err, ps->err_cap, code, ps->toks[ps->pos].line, fmt, ap);
    va_end(ap);
    return false;
}

static const tok *cur(const parser *ps) {
    return &ps->toks[ps->pos];
}
static const tok *peek(const parser *ps, size_t k) {
    size_t i = ps->pos;
    for (size_t j = 0; j < k && ps->toks[i].type != TK_EOF; j++) i++;
    return &ps->toks[i];
}
static void next(parser *ps) {
    if (ps->toks[ps->pos].type != TK_EOF) ps->pos++;
}

static bool is_op(const tok *t, int op) {
    return t->type == TK_OP && t->op == op;
}
static bool is_name(const tok *t, const char *name) {
    return t->type == TK_NAME && t->s.n == strlen(name) && !memcmp(t->s.p, name, t->s.n);
}

static void describe(const tok *t, char *buf, size_t cap) {
    switch (t->type) {
    case TK_NAME:
        snprintf(buf, cap, "'%.*s'", (int)(t->s.n > 40 ? 40 : t->s.n), t->s.p);
        break;
    case TK_OP:
        snprintf(buf, cap, "'%s'", OP_TEXT[t->op]);
        break;
    case TK_STRING:
        snprintf(buf, cap, "a string");
        break;
    case TK_INT:
    case TK_FLOAT:
        snprintf(buf, cap, "a number");
        break;
    case TK_VAR_END:
        snprintf(buf, cap, "'}}'");
        break;
    case TK_BLOCK_END:
        snprintf(buf, cap, "'%%}'");
        break;
    case TK_EOF:
        snprintf(buf, cap, "the end of the template");
        break;
    default:
        snprintf(buf, cap, "text");
    }
}

static bool expected(parser *ps, const char *what) {
    char got[64];
    describe(cur(ps), got, sizeof got);
    return fail(ps, DUET_ERR_FORMAT, "expected %s, got %s", what, got);
}

static bool expect_op(parser *ps, int op) {
    if (!is_op(cur(ps), op)) {
        char want[16];
        snprintf(want, sizeof want, "'%s'", OP_TEXT[op]);
        return expected(ps, want);
    }
    next(ps);
    return true;
}

static bool expect_block_end(parser *ps) {
    if (cur(ps)->type != TK_BLOCK_END) return expected(ps, "'%}'");
    next(ps);
    return true;
}

static jnode *node(parser *ps, jn_kind kind, int line) {
    jnode *n = ja_alloc(ps->arena, sizeof *n);
    if (!n) {
        fail(ps, DUET_ERR_NO_MEMORY, "out of memory");
        return NULL;
    }
    n->kind = (uint8_t)kind;
    n->line = line;
    return n;
}

/* A growable array of node pointers, copied into the arena when done. */
typedef struct nvec {
    jnode **v;
    jstr *names;
    size_t n, cap;
} nvec;

static bool nvec_push(parser *ps, nvec *v, jnode *x, jstr name) {
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 8;
        jnode **nv = realloc(v->v, cap * sizeof *nv);
        if (nv) v->v = nv;
        jstr *nn = nv ? realloc(v->names, cap * sizeof *nn) : NULL;
        if (nn) v->names = nn;
        if (!nv || !nn) return fail(ps, DUET_ERR_NO_MEMORY, "out of memory");
        v->cap = cap;
    }
    v->v[v->n] = x;
    v->names[v->n] = name;
    v->n++;
    return true;
}

static void nvec_free(nvec *v) {
    free(v->v);
    free(v->names);
    memset(v, 0, sizeof *v);
}

static bool nvec_nodes(parser *ps, nvec *v, jnode ***out, size_t *n) {
    *n = v->n;
    *out = NULL;
    if (v->n) {
        *out = ja_alloc(ps->arena, v->n * sizeof **out);
        if (!*out) return fail(ps, DUET_ERR_NO_MEMORY, "out of memory");
        memcpy(*out, v->v, v->n * sizeof **out);
    }
    return true;
}

static bool nvec_names(parser *ps, nvec *v, jstr **out) {
    *out = NULL;
    if (v->n) {
        *out = ja_alloc(ps->arena, v->n * sizeof **out);
        if (!*out) return fail(ps, DUET_ERR_NO_MEMORY, "out of memory");
        memcpy(*out, v->names, v->n * sizeof **out);
    }
    return true;
}

static jnode *parse_expr(parser *ps, bool with_condexpr);
static jnode *parse_unary(parser *ps, bool with_filter);
static jnode *parse_or(parser *ps);

static bool enter(parser *ps) {
    if (++ps->depth > PARSE_MAX_DEPTH) {
        fail(ps, DUET_ERR_UNSUPPORTED, "unsupported construct: nesting deeper than %d",
             PARSE_MAX_DEPTH);
        return false;
    }
    return true;
}

/* Call arguments after "(": positional, then name=value. */
static bool parse_args(parser *ps, jnode *n) {
    nvec pos = {0}, kw = {0};
    bool ok = expect_op(ps, OP_LPAREN);
    while (ok && !is_op(cur(ps), OP_RPAREN)) {
        if (pos.n + kw.n > 0 && !(ok = expect_op(ps, OP_COMMA))) break;
        if (is_op(cur(ps), OP_RPAREN)) break;
        if (is_op(cur(ps), OP_MUL) || is_op(cur(ps), OP_POW)) {
            ok = fail(ps, DUET_ERR_UNSUPPORTED, "unsupported construct '%s' in a call",
                      OP_TEXT[cur(ps)->op]);
            break;
        }
        if (cur(ps)->type == TK_NAME && is_op(peek(ps, 1), OP_ASSIGN)) {
            jstr name = cur(ps)->s;
            next(ps);
            next(ps);
            jnode *v = parse_expr(ps, true);
            ok = v && nvec_push(ps, &kw, v, name);
        } else {
            if (kw.n) {
                ok = fail(ps, DUET_ERR_FORMAT, "positional argument after a keyword argument");
                break;
            }
            jnode *v = parse_expr(ps, true);
            ok = v && nvec_push(ps, &pos, v, (jstr){0});
        }
    }
    ok = ok && expect_op(ps, OP_RPAREN) && nvec_nodes(ps, &pos, &n->args, &n->n_args) &&
         nvec_nodes(ps, &kw, &n->kwvals, &n->n_kw) && nvec_names(ps, &kw, &n->kwnames);
    nvec_free(&pos);
    nvec_free(&kw);
    return ok;
}

static jnode *parse_primary(parser *ps) {
    const tok *t = cur(ps);
    int line = t->line;
    jnode *n = NULL;
    if (t->type == TK_NAME) {
        n = node(ps, JN_LIT, line);
        if (!n) return NULL;
        if (is_name(t, "true") || is_name(t, "True")) {
            n->lit = (jv){.kind = JV_BOOL, .b = true};
        } else if (is_name(t, "false") || is_name(t, "False")) {
            n->lit = (jv){.kind = JV_BOOL, .b = false};
        } else if (is_name(t, "none") || is_name(t, "None")) {
            n->lit = (jv){.kind = JV_NONE};
        } else {
            n->kind = JN_NAME;
            n->name = t->s;
        }
        next(ps);
        return n;
    }
    if (t->type == TK_STRING) {
        /* adjacent literals are one string, as in Python */
        size_t total = 0, k = ps->pos;
        while (ps->toks[k].type == TK_STRING) total += ps->toks[k++].s.n;
        char *buf = ja_alloc(ps->arena, total + 1);
        if (!buf || !(n = node(ps, JN_LIT, line))) {
            if (!buf) fail(ps, DUET_ERR_NO_MEMORY, "out of memory");
            return NULL;
        }
        size_t off = 0;
        while (cur(ps)->type == TK_STRING) {
            memcpy(buf + off, cur(ps)->s.p, cur(ps)->s.n);
            off += cur(ps)->s.n;
            next(ps);
        }
        n->lit = (jv){.kind = JV_STR, .s = {buf, total}};
        return n;
    }
    if (t->type == TK_INT || t->type == TK_FLOAT) {
        if (!(n = node(ps, JN_LIT, line))) return NULL;
        n->lit =
            t->type == TK_INT ? (jv){.kind = JV_INT, .i = t->i} : (jv){.kind = JV_FLOAT, .f = t->f};
        next(ps);
        return n;
    }
    if (is_op(t, OP_LPAREN)) {
        next(ps);
        if (is_op(cur(ps), OP_RPAREN)) {
            next(ps);
            return node(ps, JN_TUPLE, line);
        }
        jnode *e = parse_expr(ps, true);
        if (!e) return NULL;
        if (is_op(cur(ps), OP_COMMA)) {
            nvec items = {0};
            bool ok = nvec_push(ps, &items, e, (jstr){0});
            while (ok && is_op(cur(ps), OP_COMMA)) {
                next(ps);
                if (is_op(cur(ps), OP_RPAREN)) break;
                jnode *x = parse_expr(ps, true);
                ok = x && nvec_push(ps, &items, x, (jstr){0});
            }
            ok = ok && (n = node(ps, JN_TUPLE, line)) &&
                 nvec_nodes(ps, &items, &n->args, &n->n_args);
            nvec_free(&items);
            if (!ok) return NULL;
            e = n;
        }
        return expect_op(ps, OP_RPAREN) ? e : NULL;
    }
    if (is_op(t, OP_LBRACKET) || is_op(t, OP_LBRACE)) {
        bool dict = is_op(t, OP_LBRACE);
        int close = dict ? OP_RBRACE : OP_RBRACKET;
        next(ps);
        nvec keys = {0}, vals = {0};
        bool ok = true;
        while (ok && !is_op(cur(ps), close)) {
            if (keys.n && !(ok = expect_op(ps, OP_COMMA))) break;
            if (is_op(cur(ps), close)) break;
            jnode *k = parse_expr(ps, true);
            ok = k && nvec_push(ps, &keys, k, (jstr){0});
            if (ok && dict) {
                jnode *v = NULL;
                ok = expect_op(ps, OP_COLON) && (v = parse_expr(ps, true)) &&
                     nvec_push(ps, &vals, v, (jstr){0});
            }
        }
        ok = ok && expect_op(ps, close) && (n = node(ps, dict ? JN_DICT : JN_LIST, line)) &&
             nvec_nodes(ps, &keys, &n->args, &n->n_args) &&
             (!dict || nvec_nodes(ps, &vals, &n->kwvals, &n->n_kw));
        nvec_free(&keys);
        nvec_free(&vals);
        return ok ? n : NULL;
    }
    expected(ps, "an expression");
    return NULL;
}

/* After "[": an index or a slice. */
static jnode *parse_subscript(parser *ps, jnode *obj) {
    int line = cur(ps)->line;
    next(ps);
    jnode *parts[3] = {NULL, NULL, NULL};
    int colons = 0;
    for (;;) {
        if (is_op(cur(ps), OP_COLON)) {
            if (++colons > 2) {
                expected(ps, "']'");
                return NULL;
            }
            next(ps);
            continue;
        }
        if (is_op(cur(ps), OP_RBRACKET)) break;
        if (parts[colons]) {
            expected(ps, "']'");
            return NULL;
        }
        if (!(parts[colons] = parse_expr(ps, true))) return NULL;
    }
    next(ps);
    jnode *n = node(ps, colons ? JN_SLICE : JN_ITEM, line);
    if (!n) return NULL;
    n->a = obj;
    n->b = parts[0];
    n->c = parts[1];
    n->d = parts[2];
    if (!colons && !n->b) {
        fail(ps, DUET_ERR_FORMAT, "empty subscript");
        return NULL;
    }
    return n;
}

static jnode *parse_postfix(parser *ps, jnode *n) {
    for (;;) {
        const tok *t = cur(ps);
        if (is_op(t, OP_DOT)) {
            next(ps);
            const tok *a = cur(ps);
            jnode *m = node(ps, JN_ATTR, a->line);
            if (!m) return NULL;
            m->a = n;
            if (a->type == TK_NAME) {
                m->name = a->s;
            } else if (a->type == TK_INT) {
                jnode *k = node(ps, JN_LIT, a->line);
                if (!k) return NULL;
                k->lit = (jv){.kind = JV_INT, .i = a->i};
                m->kind = JN_ITEM;
                m->b = k;
            } else {
                expected(ps, "an attribute name");
                return NULL;
            }
            next(ps);
            n = m;
        } else if (is_op(t, OP_LBRACKET)) {
            if (!(n = parse_subscript(ps, n))) return NULL;
        } else if (is_op(t, OP_LPAREN)) {
            jnode *m = node(ps, JN_CALL, t->line);
            if (!m) return NULL;
            m->a = n;
            if (!parse_args(ps, m)) return NULL;
            n = m;
        } else {
            return n;
        }
    }
}

static jnode *parse_filter_expr(parser *ps, jnode *n) {
    for (;;) {
        const tok *t = cur(ps);
        if (is_op(t, OP_PIPE)) {
            next(ps);
            const tok *f = cur(ps);
            if (f->type != TK_NAME) {
                expected(ps, "a filter name");
                return NULL;
            }
            int id = jinja_filter_id(f->s.p, f->s.n);
            if (id < 0) {
                fail(ps, DUET_ERR_UNSUPPORTED, "unsupported construct '|%.*s' (filter)",
                     (int)(f->s.n > 40 ? 40 : f->s.n), f->s.p);
                return NULL;
            }
            jnode *m = node(ps, JN_FILTER, f->line);
            if (!m) return NULL;
            m->a = n;
            m->op = (uint8_t)id;
            m->name = f->s;
            next(ps);
            if (is_op(cur(ps), OP_LPAREN) && !parse_args(ps, m)) return NULL;
            n = m;
        } else if (is_name(t, "is")) {
            next(ps);
            jnode *m = node(ps, JN_TEST, t->line);
            if (!m) return NULL;
            m->a = n;
            if (is_name(cur(ps), "not")) {
                m->negated = true;
                next(ps);
            }
            const tok *f = cur(ps);
            if (f->type != TK_NAME) {
                expected(ps, "a test name");
                return NULL;
            }
            int id = jinja_test_id(f->s.p, f->s.n);
            if (id < 0) {
                fail(ps, DUET_ERR_UNSUPPORTED, "unsupported construct 'is %.*s' (test)",
                     (int)(f->s.n > 40 ? 40 : f->s.n), f->s.p);
                return NULL;
            }
            m->op = (uint8_t)id;
            m->name = f->s;
            next(ps);
            const tok *a = cur(ps);
            if (is_op(a, OP_LPAREN)) {
                if (!parse_args(ps, m)) return NULL;
            } else if ((a->type == TK_NAME && !is_name(a, "else") && !is_name(a, "or") &&
                        !is_name(a, "and") && !is_name(a, "if") && !is_name(a, "in") &&
                        !is_name(a, "not") && !is_name(a, "is")) ||
                       a->type == TK_STRING || a->type == TK_INT || a->type == TK_FLOAT ||
                       is_op(a, OP_LBRACKET) || is_op(a, OP_LBRACE)) {
                /* "is divisibleby 3": one argument without parentheses */
                jnode *arg = parse_primary(ps);
                if (!arg || !(arg = parse_postfix(ps, arg))) return NULL;
                if (!(m->args = ja_alloc(ps->arena, sizeof *m->args))) {
                    fail(ps, DUET_ERR_NO_MEMORY, "out of memory");
                    return NULL;
                }
                m->args[0] = arg;
                m->n_args = 1;
            }
            n = m;
        } else if (is_op(t, OP_LPAREN)) {
            jnode *m = node(ps, JN_CALL, t->line);
            if (!m) return NULL;
            m->a = n;
            if (!parse_args(ps, m)) return NULL;
            n = m;
        } else {
            return n;
        }
    }
}

static jnode *parse_unary(parser *ps, bool with_filter) {
    if (!enter(ps)) return NULL;
    const tok *t = cur(ps);
    jnode *n;
    if (is_op(t, OP_SUB) || is_op(t, OP_ADD)) {
        next(ps);
        n = node(ps, is_op(t, OP_SUB) ? JN_NEG : JN_POS, t->line);
        if (n && !(n->a = parse_unary(ps, false))) n = NULL;
    } else {
        n = parse_primary(ps);
    }
    if (n) n = parse_postfix(ps, n);
    if (n && with_filter) n = parse_filter_expr(ps, n);
    ps->depth--;
    return n;
}

static jnode *binary(parser *ps, jn_kind kind, int op, int line, jnode *a, jnode *b) {
    if (!a || !b) return NULL;
    jnode *n = node(ps, kind, line);
    if (!n) return NULL;
    n->op = (uint8_t)op;
    n->a = a;
    n->b = b;
    return n;
}

static jnode *parse_pow(parser *ps) {
    jnode *n = parse_unary(ps, true);
    while (n && is_op(cur(ps), OP_POW)) {
        int line = cur(ps)->line;
        next(ps);
        n = binary(ps, JN_BIN, JOP_POW, line, n, parse_unary(ps, true));
    }
    return n;
}

static jnode *parse_math2(parser *ps) {
    jnode *n = parse_pow(ps);
    for (;;) {
        const tok *t = cur(ps);
        int op = is_op(t, OP_MUL)        ? JOP_MUL
                 : is_op(t, OP_DIV)      ? JOP_DIV
                 : is_op(t, OP_FLOORDIV) ? JOP_FLOORDIV
                 : is_op(t, OP_MOD)      ? JOP_MOD
                                         : -1;
        if (!n || op < 0) return n;
        next(ps);
        n = binary(ps, JN_BIN, op, t->line, n, parse_pow(ps));
    }
}

static jnode *parse_concat(parser *ps) {
    jnode *n = parse_math2(ps);
    if (!n || !is_op(cur(ps), OP_TILDE)) return n;
    nvec parts = {0};
    int line = cur(ps)->line;
    bool ok = nvec_push(ps, &parts, n, (jstr){0});
    while (ok && is_op(cur(ps), OP_TILDE)) {
        next(ps);
        jnode *x = parse_math2(ps);
        ok = x && nvec_push(ps, &parts, x, (jstr){0});
    }
    n = NULL;
    ok = ok && (n = node(ps, JN_CONCAT, line)) && nvec_nodes(ps, &parts, &n->args, &n->n_args);
    nvec_free(&parts);
    return ok ? n : NULL;
}

static jnode *parse_math1(parser *ps) {
    jnode *n = parse_concat(ps);
    for (;;) {
        const tok *t = cur(ps);
        int op = is_op(t, OP_ADD) ? JOP_ADD : is_op(t, OP_SUB) ? JOP_SUB : -1;
        if (!n || op < 0) return n;
        next(ps);
        n = binary(ps, JN_BIN, op, t->line, n, parse_concat(ps));
    }
}

static jnode *parse_compare(parser *ps) {
    jnode *n = parse_math1(ps), *prev = n, *chain = NULL;
    for (;;) {
        const tok *t = cur(ps);
        int op = is_op(t, OP_EQ)                                     ? JOP_EQ
                 : is_op(t, OP_NE)                                   ? JOP_NE
                 : is_op(t, OP_LT)                                   ? JOP_LT
                 : is_op(t, OP_LE)                                   ? JOP_LE
                 : is_op(t, OP_GT)                                   ? JOP_GT
                 : is_op(t, OP_GE)                                   ? JOP_GE
                 : is_name(t, "in")                                  ? JOP_IN
                 : (is_name(t, "not") && is_name(peek(ps, 1), "in")) ? JOP_NOTIN
                                                                     : -1;
        if (!prev || op < 0) return chain ? chain : prev;
        next(ps);
        if (op == JOP_NOTIN) next(ps);
        jnode *rhs = parse_math1(ps);
        jnode *cmp = binary(ps, JN_CMP, op, t->line, prev, rhs);
        if (!cmp) return NULL;
        /* a < b < c is (a < b) and (b < c), as in Python */
        chain = chain ? binary(ps, JN_AND, 0, t->line, chain, cmp) : cmp;
        if (!chain) return NULL;
        prev = rhs;
    }
}

static jnode *parse_not(parser *ps) {
    if (is_name(cur(ps), "not")) {
        if (!enter(ps)) return NULL;
        int line = cur(ps)->line;
        next(ps);
        jnode *n = node(ps, JN_NOT, line);
        if (n && !(n->a = parse_not(ps))) n = NULL;
        ps->depth--;
        return n;
    }
    return parse_compare(ps);
}

static jnode *parse_and(parser *ps) {
    jnode *n = parse_not(ps);
    while (n && is_name(cur(ps), "and")) {
        int line = cur(ps)->line;
        next(ps);
        n = binary(ps, JN_AND, 0, line, n, parse_not(ps));
    }
    return n;
}

static jnode *parse_or(parser *ps) {
    jnode *n = parse_and(ps);
    while (n && is_name(cur(ps), "or")) {
        int line = cur(ps)->line;
        next(ps);
        n = binary(ps, JN_OR, 0, line, n, parse_and(ps));
    }
    return n;
}

static jnode *parse_expr(parser *ps, bool with_condexpr) {
    if (!enter(ps)) return NULL;
    jnode *n = parse_or(ps);
    while (n && with_condexpr && is_name(cur(ps), "if")) {
        int line = cur(ps)->line;
        next(ps);
        jnode *c = node(ps, JN_COND, line);
        if (!c || !(c->a = parse_or(ps))) {
            n = NULL;
            break;
        }
        c->b = n;
        if (is_name(cur(ps), "else")) {
            next(ps);
            if (!(c->c = parse_expr(ps, true))) {
                n = NULL;
                break;
            }
        }
        n = c;
    }
    ps->depth--;
    return n;
}

/* ---- statements ----------------------------------------------------------------------------- */

static bool parse_body(parser *ps, const char *const *ends, jnode ***body, size_t *n_body,
                       int *which);

static bool parse_name(parser *ps, jstr *out) {
    if (cur(ps)->type != TK_NAME) return expected(ps, "a name");
    *out = cur(ps)->s;
    next(ps);
    return true;
}

/* Target names: a, b, c (for loops and set). */
static bool parse_targets(parser *ps, jnode *n) {
    nvec names = {0};
    bool ok = true;
    do {
        jstr name = {0};
        if (names.n) next(ps);
        ok = parse_name(ps, &name) && nvec_push(ps, &names, NULL, name);
    } while (ok && is_op(cur(ps), OP_COMMA));
    n->n_names = names.n;
    ok = ok && nvec_names(ps, &names, &n->names);
    nvec_free(&names);
    return ok;
}

static jnode *parse_if(parser *ps, int line) {
    static const char *const ends[] = {"elif", "else", "endif", NULL};
    jnode *n = node(ps, JN_IF, line);
    int which;
    if (!n || !(n->a = parse_expr(ps, true)) || !expect_block_end(ps) ||
        !parse_body(ps, ends, &n->body, &n->n_body, &which))
        return NULL;
    if (which == 0) {
        jnode *elif = parse_if(ps, cur(ps)->line);
        if (!elif || !(n->orelse = ja_alloc(ps->arena, sizeof *n->orelse))) {
            if (elif) fail(ps, DUET_ERR_NO_MEMORY, "out of memory");
            return NULL;
        }
        n->orelse[0] = elif;
        n->n_orelse = 1;
        return n;
    }
    if (which == 1) {
        static const char *const end_only[] = {"endif", NULL};
        if (!expect_block_end(ps) || !parse_body(ps, end_only, &n->orelse, &n->n_orelse, &which))
            return NULL;
    }
    return expect_block_end(ps) ? n : NULL;
}

static jnode *parse_for(parser *ps, int line) {
    static const char *const ends[] = {"else", "endfor", NULL};
    jnode *n = node(ps, JN_FOR, line);
    if (!n || !parse_targets(ps, n)) return NULL;
    if (!is_name(cur(ps), "in")) {
        expected(ps, "'in'");
        return NULL;
    }
    next(ps);
    if (!(n->a = parse_or(ps))) return NULL;
    if (is_name(cur(ps), "if") && !(next(ps), n->b = parse_or(ps))) return NULL;
    if (is_name(cur(ps), "recursive")) {
        fail(ps, DUET_ERR_UNSUPPORTED, "unsupported construct 'for ... recursive'");
        return NULL;
    }
    int which;
    if (!expect_block_end(ps) || !parse_body(ps, ends, &n->body, &n->n_body, &which)) return NULL;
    if (which == 0) {
        static const char *const end_only[] = {"endfor", NULL};
        if (!expect_block_end(ps) || !parse_body(ps, end_only, &n->orelse, &n->n_orelse, &which))
            return NULL;
    }
    return expect_block_end(ps) ? n : NULL;
}

static jnode *parse_set(parser *ps, int line) {
    jnode *n = node(ps, JN_SET, line);
    if (!n) return NULL;
    if (cur(ps)->type == TK_NAME && is_op(peek(ps, 1), OP_DOT)) {
        /* set ns.attr = value */
        if (!(n->names = ja_alloc(ps->arena, sizeof *n->names))) {
            fail(ps, DUET_ERR_NO_MEMORY, "out of memory");
            return NULL;
        }
        n->n_names = 1;
        n->op = 1;
        if (!parse_name(ps, &n->names[0])) return NULL;
        next(ps);
        if (!parse_name(ps, &n->name)) return NULL;
        if (is_op(cur(ps), OP_DOT)) {
            fail(ps, DUET_ERR_UNSUPPORTED,
                 "unsupported construct 'set a.b.c' (only a "
                 "namespace's own attributes can be set)");
            return NULL;
        }
    } else if (!parse_targets(ps, n)) {
        return NULL;
    }
    if (is_op(cur(ps), OP_ASSIGN)) {
        next(ps);
        jnode *v = parse_expr(ps, true);
        if (!v) return NULL;
        if (is_op(cur(ps), OP_COMMA)) {
            nvec items = {0};
            bool ok = nvec_push(ps, &items, v, (jstr){0});
            while (ok && is_op(cur(ps), OP_COMMA)) {
                next(ps);
                if (cur(ps)->type == TK_BLOCK_END) break;
                jnode *x = parse_expr(ps, true);
                ok = x && nvec_push(ps, &items, x, (jstr){0});
            }
            ok = ok && (v = node(ps, JN_TUPLE, line)) &&
                 nvec_nodes(ps, &items, &v->args, &v->n_args);
            nvec_free(&items);
            if (!ok) return NULL;
        }
        n->c = v;
        return expect_block_end(ps) ? n : NULL;
    }
    if (n->op || n->n_names != 1) {
        expected(ps, "'='");
        return NULL;
    }
    if (is_op(cur(ps), OP_PIPE)) {
        fail(ps, DUET_ERR_UNSUPPORTED,
             "unsupported construct 'set ... | filter' (block set "
             "with a filter)");
        return NULL;
    }
    static const char *const ends[] = {"endset", NULL};
    int which;
    n->kind = JN_SET_BLOCK;
    if (!expect_block_end(ps) || !parse_body(ps, ends, &n->body, &n->n_body, &which)) return NULL;
    return expect_block_end(ps) ? n : NULL;
}

static jnode *parse_macro(parser *ps, int line) {
    static const char *const ends[] = {"endmacro", NULL};
    jnode *n = node(ps, JN_MACRO, line);
    if (!n || !parse_name(ps, &n->name) || !expect_op(ps, OP_LPAREN)) return NULL;
    nvec params = {0};
    bool ok = true, defaults = false;
    while (ok && !is_op(cur(ps), OP_RPAREN)) {
        if (params.n && !(ok = expect_op(ps, OP_COMMA))) break;
        if (is_op(cur(ps), OP_RPAREN)) break;
        jstr name;
        jnode *def = NULL;
        if (!(ok = parse_name(ps, &name))) break;
        if (is_op(cur(ps), OP_ASSIGN)) {
            next(ps);
            ok = (def = parse_expr(ps, true)) != NULL;
            defaults = true;
        } else if (defaults) {
            ok = fail(ps, DUET_ERR_FORMAT, "non-default argument follows default argument");
        }
        ok = ok && nvec_push(ps, &params, def, name);
    }
    int which;
    ok = ok && expect_op(ps, OP_RPAREN) && nvec_names(ps, &params, &n->names) &&
         nvec_nodes(ps, &params, &n->kwvals, &n->n_names) && expect_block_end(ps) &&
         parse_body(ps, ends, &n->body, &n->n_body, &which) && expect_block_end(ps);
    n->n_kw = n->n_names;
    nvec_free(&params);
    return ok ? n : NULL;
}

static jnode *parse_statement(parser *ps) {
    const tok *t = cur(ps);
    int line = t->line;
    if (t->type != TK_NAME) {
        expected(ps, "a statement name");
        return NULL;
    }
    if (!enter(ps)) return NULL;
    jnode *n = NULL;
    if (is_name(t, "if")) {
        next(ps);
        n = parse_if(ps, line);
    } else if (is_name(t, "for")) {
        next(ps);
        n = parse_for(ps, line);
    } else if (is_name(t, "set")) {
        next(ps);
        n = parse_set(ps, line);
    } else if (is_name(t, "macro")) {
        next(ps);
        n = parse_macro(ps, line);
    } else if (is_name(t, "break") || is_name(t, "continue")) {
        next(ps);
        n = node(ps, is_name(t, "break") ? JN_BREAK : JN_CONTINUE, line);
        if (n && !expect_block_end(ps)) n = NULL;
    } else if (is_name(t, "generation")) {
        static const char *const ends[] = {"endgeneration", NULL};
        int which;
        next(ps);
        n = node(ps, JN_BLOCK, line);
        if (n && (!expect_block_end(ps) || !parse_body(ps, ends, &n->body, &n->n_body, &which) ||
                  !expect_block_end(ps)))
            n = NULL;
    } else {
        fail(ps, DUET_ERR_UNSUPPORTED, "unsupported construct '%.*s'",
             (int)(t->s.n > 40 ? 40 : t->s.n), t->s.p);
    }
    ps->depth--;
    return n;
}

/* Statements up to a {% name %} whose name is in ends (its index in *which, the cursor after the
 * name) or, with ends NULL, to the end of the template. */
static bool parse_body(parser *ps, const char *const *ends, jnode ***body, size_t *n_body,
                       int *which) {
    nvec v = {0};
    bool ok = true;
    int open_line = cur(ps)->line;
    for (;;) {
        const tok *t = cur(ps);
        jnode *n = NULL;
        if (t->type == TK_EOF) {
            if (ends) {
                const char *last = ends[0];
                for (int k = 1; ends[k]; k++) last = ends[k];
                ok = fail(ps, DUET_ERR_FORMAT,
                          "unexpected end of template: the block opened near line %d needs "
                          "'%s'",
                          open_line, last);
            }
            break;
        }
        if (t->type == TK_DATA) {
            if ((n = node(ps, JN_DATA, t->line))) n->name = t->s;
            next(ps);
        } else if (t->type == TK_VAR_BEGIN) {
            next(ps);
            if ((n = node(ps, JN_OUTPUT, t->line)) && (n->a = parse_expr(ps, true)) &&
                cur(ps)->type != TK_VAR_END) {
                expected(ps, "'}}'");
                n = NULL;
            }
            if (n && !n->a) n = NULL;
            next(ps);
        } else if (t->type == TK_BLOCK_BEGIN) {
            next(ps);
            const tok *name = cur(ps);
            if (ends) {
                int k;
                for (k = 0; ends[k] && !is_name(name, ends[k]); k++) {
                }
                if (ends[k]) {
                    next(ps);
                    *which = k;
                    break;
                }
            }
            if (name->type == TK_NAME && (is_name(name, "elif") || is_name(name, "else") ||
                                          (name->s.n > 3 && !memcmp(name->s.p, "end", 3)))) {
                ok = fail(ps, DUET_ERR_FORMAT, "unexpected '%.*s'",
                          (int)(name->s.n > 40 ? 40 : name->s.n), name->s.p);
                break;
            }
            n = parse_statement(ps);
        } else {
            ok = expected(ps, "text or a tag");
            break;
        }
        if (!n || !nvec_push(ps, &v, n, (jstr){0})) {
            ok = false;
            break;
        }
    }
    ok = ok && ps->st == DUET_OK && nvec_nodes(ps, &v, body, n_body);
    nvec_free(&v);
    return ok;
}

duet_status jinja_parse(const char *src, size_t len, jinja_template **tpl_p, char *err,
                        size_t err_cap) {
    if (err && err_cap) err[0] = '\0';
    if (!src || !tpl_p) return DUET_ERR_INVALID;
    jinja_template *t = calloc(1, sizeof *t);
    if (!t) return DUET_ERR_NO_MEMORY;
    /* Newlines are \n everywhere (jinja2's newline_sequence), and one trailing newline goes
     * (keep_trailing_newline is off). */
    char *text = ja_alloc(&t->arena, len + 1);
    if (!text) {
        jinja_destroy(t);
        return DUET_ERR_NO_MEMORY;
    }
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (src[i] == '\r') {
            text[n++] = '\n';
            if (i + 1 < len && src[i + 1] == '\n') i++;
        } else {
            text[n++] = src[i];
        }
    }
    if (n && text[n - 1] == '\n') n--;
    lexer lx = {.arena = &t->arena, .src = text, .len = n, .err = err, .err_cap = err_cap};
    duet_status st = DUET_OK;
    if (!lex_all(&lx)) {
        st = lx.st;
    } else {
        parser ps = {.arena = &t->arena, .toks = lx.toks, .err = err, .err_cap = err_cap};
        int which;
        if (!parse_body(&ps, NULL, &t->body, &t->n_body, &which)) st = ps.st;
    }
    free(lx.toks);
    if (st != DUET_OK) {
        jinja_destroy(t);
        return st;
    }
    *tpl_p = t;
    return DUET_OK;
}

void jinja_destroy(jinja_template *t) {
    if (!t) return;
    ja_free(&t->arena);
    free(t);
}
