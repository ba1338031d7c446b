/* What Jinja values do, with Python's meaning: truth, equality, printing (str and repr), JSON
 * the way transformers' tojson writes it, attribute and item access, and the filters, tests,
 * string and dict methods and globals that chat templates call. Case mapping (lower, upper,
 * title, capitalize) covers ASCII only; other characters pass through unchanged. */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "text/jinja-impl.h"

/* ---- names of filters and tests ------------------------------------------------------------ */

enum {
    JFL_TOJSON,
    JFL_TRIM,
    JFL_LENGTH,
    JFL_STRING,
    JFL_LOWER,
    JFL_UPPER,
    JFL_TITLE,
    JFL_CAPITALIZE,
    JFL_DEFAULT,
    JFL_JOIN,
    JFL_FIRST,
    JFL_LAST,
    JFL_LIST,
    JFL_ITEMS,
    JFL_REPLACE,
    JFL_INT,
    JFL_FLOAT,
    JFL_ABS,
    JFL_SAFE,
    JFL_REVERSE,
    JFL_INDENT,
    JFL_MAP,
    JFL_SELECT,
    JFL_REJECT,
    JFL_SELECTATTR,
    JFL_REJECTATTR,
};

static const struct {
    const char *name;
    int id;
} FILTERS[] = {
    {"tojson", JFL_TOJSON},         {"trim", JFL_TRIM},       {"length", JFL_LENGTH},
    {"count", JFL_LENGTH},          {"string", JFL_STRING},   {"lower", JFL_LOWER},
    {"upper", JFL_UPPER},           {"title", JFL_TITLE},     {"capitalize", JFL_CAPITALIZE},
    {"default", JFL_DEFAULT},       {"d", JFL_DEFAULT},       {"join", JFL_JOIN},
    {"first", JFL_FIRST},           {"last", JFL_LAST},       {"list", JFL_LIST},
    {"items", JFL_ITEMS},           {"replace", JFL_REPLACE}, {"int", JFL_INT},
    {"float", JFL_FLOAT},           {"abs", JFL_ABS},         {"safe", JFL_SAFE},
    {"reverse", JFL_REVERSE},       {"indent", JFL_INDENT},   {"map", JFL_MAP},
    {"select", JFL_SELECT},         {"reject", JFL_REJECT},   {"selectattr", JFL_SELECTATTR},
    {"rejectattr", JFL_REJECTATTR},
};

enum {
    JT_DEFINED,
    JT_UNDEFINED,
    JT_NONE,
    JT_BOOLEAN,
    JT_TRUE,
    JT_FALSE,
    JT_INTEGER,
    JT_FLOAT,
    JT_NUMBER,
    JT_STRING,
    JT_MAPPING,
    JT_ITERABLE,
    JT_SEQUENCE,
    JT_CALLABLE,
    JT_EVEN,
    JT_ODD,
    JT_DIVISIBLEBY,
    JT_EQ,
    JT_NE,
    JT_LT,
    JT_LE,
    JT_GT,
    JT_GE,
    JT_IN,
};

static const struct {
    const char *name;
    int id;
} TESTS[] = {
    {"defined", JT_DEFINED},
    {"undefined", JT_UNDEFINED},
    {"none", JT_NONE},
    {"boolean", JT_BOOLEAN},
    {"true", JT_TRUE},
    {"false", JT_FALSE},
    {"integer", JT_INTEGER},
    {"float", JT_FLOAT},
    {"number", JT_NUMBER},
    {"string", JT_STRING},
    {"mapping", JT_MAPPING},
    {"iterable", JT_ITERABLE},
    {"sequence", JT_SEQUENCE},
    {"callable", JT_CALLABLE},
    {"even", JT_EVEN},
    {"odd", JT_ODD},
    {"divisibleby", JT_DIVISIBLEBY},
    {"eq", JT_EQ},
    {"equalto", JT_EQ},
    {"==", JT_EQ},
    {"ne", JT_NE},
    {"!=", JT_NE},
    {"lt", JT_LT},
    {"lessthan", JT_LT},
    {"le", JT_LE},
    {"gt", JT_GT},
    {"greaterthan", JT_GT},
    {"ge", JT_GE},
    {"in", JT_IN},
};

static bool jstr_is(jstr s, const char *lit) {
    size_t n = strlen(lit);
    return s.n == n && !memcmp(s.p, lit, n);
}

int jinja_filter_id(const char *name, size_t n) {
    for (size_t i = 0; i < sizeof FILTERS / sizeof *FILTERS; i++)
        if (jstr_is((jstr){name, n}, FILTERS[i].name)) return FILTERS[i].id;
    return -1;
}

int jinja_test_id(const char *name, size_t n) {
    for (size_t i = 0; i < sizeof TESTS / sizeof *TESTS; i++)
        if (jstr_is((jstr){name, n}, TESTS[i].name)) return TESTS[i].id;
    return -1;
}

/* ---- basic value operations ------------------------------------------------------------------ */

jv jv_from_json(const cJSON *j) {
    if (!j || cJSON_IsNull(j)) return (jv){.kind = JV_NONE};
    if (cJSON_IsBool(j)) return (jv){.kind = JV_BOOL, .b = cJSON_IsTrue(j)};
    if (cJSON_IsNumber(j)) {
        /* cJSON keeps no text: an integral value within ±2^53 is taken as an int (JSON from
         * Python or JS clients writes those without a fraction) */
        double d = j->valuedouble;
        if (d == floor(d) && fabs(d) <= 9007199254740992.0)
            return (jv){.kind = JV_INT, .i = (int64_t)d};
        return (jv){.kind = JV_FLOAT, .f = d};
    }
    if (cJSON_IsString(j) || cJSON_IsRaw(j))
        return (jv){.kind = JV_STR, .s = {j->valuestring, strlen(j->valuestring)}};
    return (jv){.kind = JV_JSON, .j = j};
}

static bool is_mapping(const jv *v) {
    return v->kind == JV_DICT || (v->kind == JV_JSON && cJSON_IsObject(v->j));
}
static bool is_list(const jv *v) {
    return v->kind == JV_LIST || (v->kind == JV_JSON && cJSON_IsArray(v->j));
}

bool jv_truthy(const jv *v) {
    switch (v->kind) {
    case JV_UNDEF:
    case JV_NONE:
        return false;
    case JV_BOOL:
        return v->b;
    case JV_INT:
        return v->i != 0;
    case JV_FLOAT:
        return v->f != 0;
    case JV_STR:
        return v->s.n != 0;
    case JV_LIST:
        return v->l->n != 0;
    case JV_DICT:
        return v->d->n != 0;
    case JV_JSON:
        return v->j->child != NULL;
    default:
        return true;
    }
}

const char *jv_type_name(const jv *v) {
    switch (v->kind) {
    case JV_UNDEF:
        return "undefined";
    case JV_NONE:
        return "none";
    case JV_BOOL:
        return "bool";
    case JV_INT:
        return "int";
    case JV_FLOAT:
        return "float";
    case JV_STR:
        return "str";
    case JV_LIST:
        return v->tuple ? "tuple" : "list";
    case JV_DICT:
        return "dict";
    case JV_JSON:
        return cJSON_IsArray(v->j) ? "list" : "dict";
    case JV_NS:
        return "namespace";
    case JV_LOOP:
        return "loop";
    case JV_MACRO:
        return "macro";
    default:
        return "function";
    }
}

static size_t utf8_len1(unsigned char b) {
    return b < 0xC0 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
}

/* Characters of a string: views into it. */
static bool str_chars(jctx *c, int line, jstr s, jv **items_p, size_t *n_p) {
    size_t n = 0;
    for (size_t i = 0; i < s.n; n++) {
        size_t k = utf8_len1((unsigned char)s.p[i]);
        i += k > s.n - i ? s.n - i : k;
    }
    jv *items = n ? jx_alloc(c, line, n * sizeof *items) : NULL;
    if (n && !items) return false;
    n = 0;
    for (size_t i = 0; i < s.n; n++) {
        size_t k = utf8_len1((unsigned char)s.p[i]);
        if (k > s.n - i) k = s.n - i;
        items[n] = (jv){.kind = JV_STR, .s = {s.p + i, k}};
        i += k;
    }
    *items_p = items;
    *n_p = n;
    return true;
}

bool jv_iterate(jctx *c, int line, const jv *v, jv **items_p, size_t *n_p) {
    *items_p = NULL;
    *n_p = 0;
    switch (v->kind) {
    case JV_UNDEF:
        return true;
    case JV_STR:
        return str_chars(c, line, v->s, items_p, n_p);
    case JV_LIST:
        *items_p = v->l->v;
        *n_p = v->l->n;
        return true;
    case JV_DICT:
        *items_p = v->d->k;
        *n_p = v->d->n;
        return true;
    case JV_JSON: {
        size_t n = (size_t)cJSON_GetArraySize(v->j), i = 0;
        jv *items = n ? jx_alloc(c, line, n * sizeof *items) : NULL;
        if (n && !items) return false;
        const cJSON *e;
        cJSON_ArrayForEach(e, v->j) {
            items[i++] = cJSON_IsObject(v->j)
                             ? (jv){.kind = JV_STR, .s = {e->string, strlen(e->string)}}
                             : jv_from_json(e);
        }
        *items_p = items;
        *n_p = i;
        return true;
    }
    default:
        return jx_fail(c, DUET_ERR_INVALID, line, "'%s' object is not iterable", jv_type_name(v));
    }
}

bool jv_length(jctx *c, int line, const jv *v, int64_t *n_p) {
    switch (v->kind) {
    case JV_UNDEF:
        *n_p = 0;
        return true;
    case JV_STR: {
        int64_t n = 0;
        for (size_t i = 0; i < v->s.n; i++) n += ((unsigned char)v->s.p[i] & 0xC0) != 0x80;
        *n_p = n;
        return true;
    }
    case JV_LIST:
        *n_p = (int64_t)v->l->n;
        return true;
    case JV_DICT:
        *n_p = (int64_t)v->d->n;
        return true;
    case JV_JSON:
        *n_p = cJSON_GetArraySize(v->j);
        return true;
    default:
        return jx_fail(c, DUET_ERR_INVALID, line, "object of type '%s' has no len()",
                       jv_type_name(v));
    }
}

/* Item i of a list value (JSON or not), or NULL. */
static bool list_at(const jv *v, size_t i, jv *out) {
    if (v->kind == JV_LIST) {
        if (i >= v->l->n) return false;
        *out = v->l->v[i];
        return true;
    }
    const cJSON *e = cJSON_GetArrayItem(v->j, (int)i);
    if (!e) return false;
    *out = jv_from_json(e);
    return true;
}

static size_t list_len(const jv *v) {
    return v->kind == JV_LIST ? v->l->n : (size_t)cJSON_GetArraySize(v->j);
}

/* A mapping's value for a key, false when absent. */
static bool map_get(const jv *m, const jv *key, jv *out) {
    if (m->kind == JV_DICT) {
        for (size_t i = 0; i < m->d->n; i++)
            if (jv_equal(&m->d->k[i], key)) {
                *out = m->d->v[i];
                return true;
            }
        return false;
    }
    if (key->kind != JV_STR) return false;
    const cJSON *e;
    cJSON_ArrayForEach(e, m->j) {
        if (strlen(e->string) == key->s.n && !memcmp(e->string, key->s.p, key->s.n)) {
            *out = jv_from_json(e);
            return true;
        }
    }
    return false;
}

static bool equal_depth(const jv *a, const jv *b, int depth);

static bool equal_depth(const jv *a, const jv *b, int depth) {
    if (depth > 512) return false;
    bool na = a->kind == JV_BOOL || a->kind == JV_INT || a->kind == JV_FLOAT;
    bool nb = b->kind == JV_BOOL || b->kind == JV_INT || b->kind == JV_FLOAT;
    if (na && nb) {
        if (a->kind != JV_FLOAT && b->kind != JV_FLOAT)
            return (a->kind == JV_BOOL ? a->b : a->i) == (b->kind == JV_BOOL ? b->b : b->i);
        double x = a->kind == JV_FLOAT ? a->f : a->kind == JV_BOOL ? a->b : (double)a->i;
        double y = b->kind == JV_FLOAT ? b->f : b->kind == JV_BOOL ? b->b : (double)b->i;
        return x == y;
    }
    if (a->kind == JV_STR && b->kind == JV_STR)
        return a->s.n == b->s.n && (!a->s.n || !memcmp(a->s.p, b->s.p, a->s.n));
    if (is_list(a) && is_list(b)) {
        size_t n = list_len(a);
        if (n != list_len(b)) return false;
        for (size_t i = 0; i < n; i++) {
            jv x, y;
            if (!list_at(a, i, &x) || !list_at(b, i, &y) || !equal_depth(&x, &y, depth + 1))
                return false;
        }
        return true;
    }
    if (is_mapping(a) && is_mapping(b)) {
        size_t n = a->kind == JV_DICT ? a->d->n : (size_t)cJSON_GetArraySize(a->j);
        size_t m = b->kind == JV_DICT ? b->d->n : (size_t)cJSON_GetArraySize(b->j);
        if (n != m) return false;
        if (a->kind == JV_DICT) {
            for (size_t i = 0; i < n; i++) {
                jv y;
                if (!map_get(b, &a->d->k[i], &y) || !equal_depth(&a->d->v[i], &y, depth + 1))
                    return false;
            }
            return true;
        }
        const cJSON *e;
        cJSON_ArrayForEach(e, a->j) {
            jv k = {.kind = JV_STR, .s = {e->string, strlen(e->string)}}, x = jv_from_json(e), y;
            if (!map_get(b, &k, &y) || !equal_depth(&x, &y, depth + 1)) return false;
        }
        return true;
    }
    if (a->kind != b->kind) return false;
    switch (a->kind) {
    case JV_UNDEF:
    case JV_NONE:
        return true;
    case JV_NS:
        return a->ns == b->ns;
    case JV_MACRO:
        return a->macro == b->macro;
    case JV_LOOP:
        return a->loop == b->loop;
    default:
        return a->fn == b->fn && a->self == b->self;
    }
}

bool jv_equal(const jv *a, const jv *b) {
    return equal_depth(a, b, 0);
}

/* ---- printing -------------------------------------------------------------------------------- */

/* Python's repr(float): the shortest digits that read back to the same double. */
static void py_float(double f, bool json, char *buf, size_t cap) {
    if (isnan(f)) {
        snprintf(buf, cap, json ? "NaN" : "nan");
        return;
    }
    if (isinf(f)) {
        snprintf(buf, cap, "%s%s", f < 0 ? "-" : "", json ? "Infinity" : "inf");
        return;
    }
    if (f == 0) {
        snprintf(buf, cap, signbit(f) ? "-0.0" : "0.0");
        return;
    }
    char tmp[40];
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*e", prec - 1, f);
        if (strtod(tmp, NULL) == f) break;
    }
    /* tmp is [-]d[.ddd]e±XX */
    char digits[24];
    size_t nd = 0;
    const char *p = tmp;
    bool neg = *p == '-';
    if (neg) p++;
    for (; *p && *p != 'e'; p++)
        if (*p != '.') digits[nd++] = *p;
    int exp = atoi(p + 1);
    while (nd > 1 && digits[nd - 1] == '0') nd--;
    digits[nd] = '\0';
    size_t o = 0;
    if (neg) buf[o++] = '-';
    if (exp >= -5 && exp < 16) {
        if (exp < 0) {
            o += (size_t)snprintf(buf + o, cap - o, "0.");
            for (int k = 0; k < -exp - 1; k++) buf[o++] = '0';
            o += (size_t)snprintf(buf + o, cap - o, "%s", digits);
        } else {
            for (int k = 0; k <= exp; k++) buf[o++] = (size_t)k < nd ? digits[k] : '0';
            buf[o++] = '.';
            if ((size_t)exp + 1 < nd)
                o += (size_t)snprintf(buf + o, cap - o, "%s", digits + exp + 1);
            else
                buf[o++] = '0';
        }
        buf[o] = '\0';
    } else {
        buf[o++] = digits[0];
        if (nd > 1) {
            buf[o++] = '.';
            memcpy(buf + o, digits + 1, nd - 1);
            o += nd - 1;
        }
        snprintf(buf + o, cap - o, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    }
}

/* Is a code point one Python's repr() escapes (not printable)? Covers the controls, the
 * separators and the format characters chat text may meet. */
static bool repr_escapes(uint32_t c) {
    return c < 0x20 || (c >= 0x7F && c <= 0xA0) || c == 0xAD || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200F) || (c >= 0x2028 && c <= 0x202F) ||
           (c >= 0x205F && c <= 0x206F) || c == 0x3000 || c == 0xFEFF;
}

static uint32_t decode_utf8(const char *s, size_t n, size_t *k_p) {
    const unsigned char *u = (const unsigned char *)s;
    size_t k = utf8_len1(u[0]);
    if (u[0] < 0x80 || k > n) {
        *k_p = 1;
        return u[0];
    }
    uint32_t c = u[0] & (0x7F >> k);
    for (size_t i = 1; i < k; i++) c = c << 6 | (u[i] & 0x3F);
    *k_p = k;
    return c;
}

static void write_repr_str(jstr s, strbuf *b) {
    bool has_sq = s.n && memchr(s.p, '\'', s.n), has_dq = s.n && memchr(s.p, '"', s.n);
    char q = has_sq && !has_dq ? '"' : '\'';
    strbuf_add(b, &q, 1);
    for (size_t i = 0; i < s.n;) {
        size_t k;
        uint32_t c = decode_utf8(s.p + i, s.n - i, &k);
        if (c == '\\' || c == (uint32_t)q) {
            strbuf_add(b, "\\", 1);
            strbuf_add(b, s.p + i, 1);
        } else if (c == '\n') {
            strbuf_str(b, "\\n");
        } else if (c == '\r') {
            strbuf_str(b, "\\r");
        } else if (c == '\t') {
            strbuf_str(b, "\\t");
        } else if (repr_escapes(c)) {
            if (c <= 0xFF)
                strbuf_printf(b, "\\x%02x", (unsigned)c);
            else
                strbuf_printf(b, "\\u%04x", (unsigned)c);
        } else {
            strbuf_add(b, s.p + i, k);
        }
        i += k;
    }
    strbuf_add(b, &q, 1);
}

static bool write_value(jctx *c, int line, const jv *v, strbuf *b, bool repr, int depth);

static bool write_items(jctx *c, int line, const jv *v, strbuf *b, int depth) {
    jv *items;
    size_t n;
    if (!jv_iterate(c, line, v, &items, &n)) return false;
    bool tuple = v->kind == JV_LIST && v->tuple;
    strbuf_str(b, tuple ? "(" : "[");
    for (size_t i = 0; i < n; i++) {
        if (i) strbuf_str(b, ", ");
        if (!write_value(c, line, &items[i], b, true, depth + 1)) return false;
    }
    strbuf_str(b, tuple ? (n == 1 ? ",)" : ")") : "]");
    return true;
}

static bool write_mapping(jctx *c, int line, const jv *v, strbuf *b, int depth) {
    strbuf_str(b, "{");
    if (v->kind == JV_DICT) {
        for (size_t i = 0; i < v->d->n; i++) {
            if (i) strbuf_str(b, ", ");
            if (!write_value(c, line, &v->d->k[i], b, true, depth + 1)) return false;
            strbuf_str(b, ": ");
            if (!write_value(c, line, &v->d->v[i], b, true, depth + 1)) return false;
        }
    } else {
        const cJSON *e;
        bool first = true;
        cJSON_ArrayForEach(e, v->j) {
            if (!first) strbuf_str(b, ", ");
            first = false;
            write_repr_str((jstr){e->string, strlen(e->string)}, b);
            strbuf_str(b, ": ");
            jv x = jv_from_json(e);
            if (!write_value(c, line, &x, b, true, depth + 1)) return false;
        }
    }
    strbuf_str(b, "}");
    return true;
}

static bool write_value(jctx *c, int line, const jv *v, strbuf *b, bool repr, int depth) {
    if (depth > 512)
        return jx_fail(c, DUET_ERR_TOO_LONG, line, "a value is nested more than 512 deep");
    char num[40];
    switch (v->kind) {
    case JV_UNDEF:
        return true;
    case JV_NONE:
        strbuf_str(b, "None");
        return true;
    case JV_BOOL:
        strbuf_str(b, v->b ? "True" : "False");
        return true;
    case JV_INT:
        strbuf_printf(b, "%" PRId64, v->i);
        return true;
    case JV_FLOAT:
        py_float(v->f, false, num, sizeof num);
        strbuf_str(b, num);
        return true;
    case JV_STR:
        if (repr)
            write_repr_str(v->s, b);
        else
            strbuf_add(b, v->s.p, v->s.n);
        return true;
    case JV_LIST:
        return write_items(c, line, v, b, depth);
    case JV_DICT:
        return write_mapping(c, line, v, b, depth);
    case JV_JSON:
        return cJSON_IsArray(v->j) ? write_items(c, line, v, b, depth)
                                   : write_mapping(c, line, v, b, depth);
    case JV_NS: {
        strbuf_str(b, "<Namespace {");
        for (size_t i = 0; i < v->ns->n; i++) {
            if (i) strbuf_str(b, ", ");
            write_repr_str(v->ns->slots[i].name, b);
            strbuf_str(b, ": ");
            if (!write_value(c, line, &v->ns->slots[i].val, b, true, depth + 1)) return false;
        }
        strbuf_str(b, "}>");
        return true;
    }
    case JV_LOOP:
        strbuf_printf(b, "<LoopContext %zu/%zu>", v->loop->i + 1, v->loop->n);
        return true;
    case JV_MACRO:
        strbuf_printf(b, "<Macro '%.*s'>", (int)v->macro->name.n, v->macro->name.p);
        return true;
    default:
        strbuf_str(b, "<built-in function>");
        return true;
    }
}

bool jv_write_str(jctx *c, int line, const jv *v, strbuf *b) {
    return write_value(c, line, v, b, false, 0);
}

bool jv_to_str(jctx *c, int line, const jv *v, jv *out) {
    if (v->kind == JV_STR) {
        *out = *v;
        return true;
    }
    strbuf b = {0};
    bool ok = jv_write_str(c, line, v, &b) &&
              (!b.oom || jx_fail(c, DUET_ERR_NO_MEMORY, line, "out of memory")) &&
              jx_str(c, line, b.p ? b.p : "", b.len, out);
    strbuf_free(&b);
    return ok;
}

/* ---- JSON as Python's json.dumps writes it ----------------------------------------------------
 */

static void json_string(jstr s, bool ensure_ascii, strbuf *b) {
    strbuf_add(b, "\"", 1);
    for (size_t i = 0; i < s.n;) {
        unsigned char ch = (unsigned char)s.p[i];
        size_t k = 1;
        switch (ch) {
        case '"':
            strbuf_str(b, "\\\"");
            break;
        case '\\':
            strbuf_str(b, "\\\\");
            break;
        case '\n':
            strbuf_str(b, "\\n");
            break;
        case '\r':
            strbuf_str(b, "\\r");
            break;
        case '\t':
            strbuf_str(b, "\\t");
            break;
        case '\b':
            strbuf_str(b, "\\b");
            break;
        case '\f':
            strbuf_str(b, "\\f");
            break;
        default:
            if (ch < 0x20) {
                strbuf_printf(b, "\\u%04x", ch);
            } else if (ch >= 0x80 && ensure_ascii) {
                uint32_t c = decode_utf8(s.p + i, s.n - i, &k);
                if (c >= 0x10000) {
                    c -= 0x10000;
                    strbuf_printf(b, "\\u%04x\\u%04x", 0xD800 + (c >> 10), 0xDC00 + (c & 0x3FF));
                } else {
                    strbuf_printf(b, "\\u%04x", c);
                }
            } else {
                strbuf_add(b, s.p + i, 1);
            }
        }
        i += k;
    }
    strbuf_add(b, "\"", 1);
}

static void json_newline(const jjson_opts *o, int level, strbuf *b) {
    strbuf_add(b, "\n", 1);
    for (int i = 0; i < level; i++) strbuf_add(b, o->indent_str.p, o->indent_str.n);
}

typedef struct kv {
    jstr key;
    jv val;
} kv;

static int kv_cmp(const void *a, const void *b) {
    const kv *x = a, *y = b;
    size_t m = x->key.n < y->key.n ? x->key.n : y->key.n;
    int r = m ? memcmp(x->key.p, y->key.p, m) : 0;
    return r ? r : (x->key.n > y->key.n) - (x->key.n < y->key.n);
}

static bool json_value(jctx *c, int line, const jv *v, const jjson_opts *o, strbuf *b, int level);

static bool json_key(jctx *c, int line, const jv *k, jstr *out) {
    char num[40];
    switch (k->kind) {
    case JV_STR:
        *out = k->s;
        return true;
    case JV_INT:
        snprintf(num, sizeof num, "%" PRId64, k->i);
        break;
    case JV_FLOAT:
        py_float(k->f, true, num, sizeof num);
        break;
    case JV_BOOL:
        snprintf(num, sizeof num, "%s", k->b ? "true" : "false");
        break;
    case JV_NONE:
        snprintf(num, sizeof num, "null");
        break;
    default:
        return jx_fail(c, DUET_ERR_INVALID, line,
                       "keys must be str, int, float, bool or None, "
                       "not %s",
                       jv_type_name(k));
    }
    jv s;
    if (!jx_str(c, line, num, strlen(num), &s)) return false;
    *out = s.s;
    return true;
}

static bool json_object(jctx *c, int line, const jv *v, const jjson_opts *o, strbuf *b, int level) {
    size_t n = v->kind == JV_DICT ? v->d->n : (size_t)cJSON_GetArraySize(v->j);
    if (!n) {
        strbuf_str(b, "{}");
        return true;
    }
    kv *items = jx_alloc(c, line, n * sizeof *items);
    if (!items) return false;
    if (v->kind == JV_DICT) {
        for (size_t i = 0; i < n; i++) {
            if (!json_key(c, line, &v->d->k[i], &items[i].key)) return false;
            items[i].val = v->d->v[i];
        }
    } else {
        size_t i = 0;
        const cJSON *e;
        cJSON_ArrayForEach(e, v->j) {
            items[i].key = (jstr){e->string, strlen(e->string)};
            items[i++].val = jv_from_json(e);
        }
    }
    if (o->sort_keys) qsort(items, n, sizeof *items, kv_cmp);
    strbuf_add(b, "{", 1);
    for (size_t i = 0; i < n; i++) {
        if (i) strbuf_add(b, o->item_sep.p, o->item_sep.n);
        if (o->indent >= 0) json_newline(o, level + 1, b);
        json_string(items[i].key, o->ensure_ascii, b);
        strbuf_add(b, o->key_sep.p, o->key_sep.n);
        if (!json_value(c, line, &items[i].val, o, b, level + 1)) return false;
    }
    if (o->indent >= 0) json_newline(o, level, b);
    strbuf_add(b, "}", 1);
    return true;
}

static bool json_value(jctx *c, int line, const jv *v, const jjson_opts *o, strbuf *b, int level) {
    if (level > 512)
        return jx_fail(c, DUET_ERR_TOO_LONG, line, "a value is nested more than 512 deep");
    char num[40];
    switch (v->kind) {
    case JV_NONE:
        strbuf_str(b, "null");
        return true;
    case JV_BOOL:
        strbuf_str(b, v->b ? "true" : "false");
        return true;
    case JV_INT:
        strbuf_printf(b, "%" PRId64, v->i);
        return true;
    case JV_FLOAT:
        py_float(v->f, true, num, sizeof num);
        strbuf_str(b, num);
        return true;
    case JV_STR:
        json_string(v->s, o->ensure_ascii, b);
        return true;
    case JV_LIST:
    case JV_JSON:
        if (is_mapping(v)) return json_object(c, line, v, o, b, level);
        {
            size_t n = list_len(v);
            if (!n) {
                strbuf_str(b, "[]");
                return true;
            }
            strbuf_add(b, "[", 1);
            for (size_t i = 0; i < n; i++) {
                jv x;
                list_at(v, i, &x);
                if (i) strbuf_add(b, o->item_sep.p, o->item_sep.n);
                if (o->indent >= 0) json_newline(o, level + 1, b);
                if (!json_value(c, line, &x, o, b, level + 1)) return false;
            }
            if (o->indent >= 0) json_newline(o, level, b);
            strbuf_add(b, "]", 1);
            return true;
        }
    case JV_DICT:
        return json_object(c, line, v, o, b, level);
    default:
        return jx_fail(c, DUET_ERR_INVALID, line, "Object of type %s is not JSON serializable",
                       v->kind == JV_UNDEF ? "Undefined" : jv_type_name(v));
    }
}

bool jv_write_json(jctx *c, int line, const jv *v, const jjson_opts *o, strbuf *b) {
    return json_value(c, line, v, o, b, 0);
}

/* ---- attributes and items ------------------------------------------------------------------- */

static const struct {
    const char *name;
    int fn;
    bool on_str;
} METHODS[] = {
    {"split", JF_SPLIT, true},
    {"rsplit", JF_RSPLIT, true},
    {"strip", JF_STRIP, true},
    {"lstrip", JF_LSTRIP, true},
    {"rstrip", JF_RSTRIP, true},
    {"startswith", JF_STARTSWITH, true},
    {"endswith", JF_ENDSWITH, true},
    {"lower", JF_LOWER, true},
    {"upper", JF_UPPER, true},
    {"title", JF_TITLE, true},
    {"capitalize", JF_CAPITALIZE, true},
    {"replace", JF_REPLACE, true},
    {"find", JF_FIND, true},
    {"count", JF_COUNT, true},
    {"items", JF_ITEMS, false},
    {"keys", JF_KEYS, false},
    {"values", JF_VALUES, false},
    {"get", JF_GET, false},
};

static bool bind_method(jctx *c, int line, const jv *obj, jstr name, bool on_str, jv *out,
                        bool *found) {
    *found = false;
    for (size_t i = 0; i < sizeof METHODS / sizeof *METHODS; i++) {
        if (METHODS[i].on_str != on_str || !jstr_is(name, METHODS[i].name)) continue;
        jv *self = jx_alloc(c, line, sizeof *self);
        if (!self) return false;
        *self = *obj;
        *out = (jv){.kind = JV_FUNC, .fn = (uint16_t)METHODS[i].fn, .self = self};
        *found = true;
        return true;
    }
    return true;
}

static bool undefined_use(jctx *c, int line, const jv *v) {
    if (v->s.n)
        return jx_fail(c, DUET_ERR_INVALID, line, "'%.*s' is undefined",
                       (int)(v->s.n > 60 ? 60 : v->s.n), v->s.p);
    return jx_fail(c, DUET_ERR_INVALID, line, "an undefined value was used");
}

static bool loop_attr(jctx *c, int line, const jloop *l, jstr name, jv *out) {
    size_t i = l->i, n = l->n;
    if (jstr_is(name, "index"))
        *out = (jv){.kind = JV_INT, .i = (int64_t)i + 1};
    else if (jstr_is(name, "index0"))
        *out = (jv){.kind = JV_INT, .i = (int64_t)i};
    else if (jstr_is(name, "revindex"))
        *out = (jv){.kind = JV_INT, .i = (int64_t)(n - i)};
    else if (jstr_is(name, "revindex0"))
        *out = (jv){.kind = JV_INT, .i = (int64_t)(n - i - 1)};
    else if (jstr_is(name, "first"))
        *out = (jv){.kind = JV_BOOL, .b = i == 0};
    else if (jstr_is(name, "last"))
        *out = (jv){.kind = JV_BOOL, .b = i + 1 == n};
    else if (jstr_is(name, "length"))
        *out = (jv){.kind = JV_INT, .i = (int64_t)n};
    else if (jstr_is(name, "depth"))
        *out = (jv){.kind = JV_INT, .i = 1};
    else if (jstr_is(name, "depth0"))
        *out = (jv){.kind = JV_INT, .i = 0};
    else if (jstr_is(name, "previtem"))
        *out = i > 0 ? l->items[i - 1] : (jv){.kind = JV_UNDEF, .s = name};
    else if (jstr_is(name, "nextitem"))
        *out = i + 1 < n ? l->items[i + 1] : (jv){.kind = JV_UNDEF, .s = name};
    else if (jstr_is(name, "cycle")) {
        jv *self = jx_alloc(c, line, sizeof *self);
        if (!self) return false;
        *self = (jv){.kind = JV_LOOP, .loop = (jloop *)l};
        *out = (jv){.kind = JV_FUNC, .fn = JF_LOOP_CYCLE, .self = self};
    } else
        *out = (jv){.kind = JV_UNDEF, .s = name};
    return true;
}

bool jv_getattr(jctx *c, int line, const jv *obj, jstr name, jv *out) {
    bool found;
    switch (obj->kind) {
    case JV_UNDEF:
        return undefined_use(c, line, obj);
    case JV_STR:
        if (!bind_method(c, line, obj, name, true, out, &found)) return false;
        if (!found) *out = (jv){.kind = JV_UNDEF, .s = name};
        return true;
    case JV_DICT:
    case JV_JSON:
        if (is_mapping(obj)) {
            if (!bind_method(c, line, obj, name, false, out, &found)) return false;
            if (found) return true;
            jv key = {.kind = JV_STR, .s = name};
            if (!map_get(obj, &key, out)) *out = (jv){.kind = JV_UNDEF, .s = name};
            return true;
        }
        *out = (jv){.kind = JV_UNDEF, .s = name};
        return true;
    case JV_NS:
        for (size_t i = 0; i < obj->ns->n; i++)
            if (obj->ns->slots[i].name.n == name.n &&
                !memcmp(obj->ns->slots[i].name.p, name.p, name.n))
                return jx_slot_get(c, line, &obj->ns->slots[i], out);
        *out = (jv){.kind = JV_UNDEF, .s = name};
        return true;
    case JV_LOOP:
        return loop_attr(c, line, obj->loop, name, out);
    default:
        *out = (jv){.kind = JV_UNDEF, .s = name};
        return true;
    }
}

bool jv_getitem(jctx *c, int line, const jv *obj, const jv *key, jv *out) {
    if (obj->kind == JV_UNDEF) return undefined_use(c, line, obj);
    jstr kname = key->kind == JV_STR ? key->s : (jstr){0};
    if (is_mapping(obj)) {
        if (!map_get(obj, key, out)) *out = (jv){.kind = JV_UNDEF, .s = kname};
        return true;
    }
    if (obj->kind == JV_NS || obj->kind == JV_LOOP) {
        if (key->kind == JV_STR) return jv_getattr(c, line, obj, key->s, out);
        *out = (jv){.kind = JV_UNDEF};
        return true;
    }
    bool idx = key->kind == JV_INT || key->kind == JV_BOOL;
    int64_t i = key->kind == JV_INT ? key->i : key->kind == JV_BOOL ? key->b : 0;
    if (idx && (is_list(obj) || obj->kind == JV_STR)) {
        jv *chars = NULL;
        size_t n;
        if (obj->kind == JV_STR) {
            if (!str_chars(c, line, obj->s, &chars, &n)) return false;
        } else {
            n = list_len(obj);
        }
        if (i < 0) i += (int64_t)n;
        if (i < 0 || (size_t)i >= n) {
            *out = (jv){.kind = JV_UNDEF};
            return true;
        }
        if (chars)
            *out = chars[i];
        else
            list_at(obj, (size_t)i, out);
        return true;
    }
    *out = (jv){.kind = JV_UNDEF, .s = kname};
    return true;
}

/* ---- argument helpers ------------------------------------------------------------------------ */

/* Positional argument i, else the keyword argument name, else NULL. */
static const jv *arg(const jv *args, size_t n_args, const jstr *kwnames, const jv *kwvals,
                     size_t n_kw, size_t i, const char *name) {
    if (i < n_args) return &args[i];
    for (size_t k = 0; k < n_kw; k++)
        if (jstr_is(kwnames[k], name)) return &kwvals[k];
    return NULL;
}

static bool want_str(jctx *c, int line, const jv *v, const char *what) {
    if (v->kind == JV_STR) return true;
    return jx_fail(c, DUET_ERR_INVALID, line, "%s must be a string, not %s", what, jv_type_name(v));
}

static bool want_int(jctx *c, int line, const jv *v, const char *what, int64_t *out) {
    if (v->kind == JV_INT || v->kind == JV_BOOL) {
        *out = v->kind == JV_INT ? v->i : v->b;
        return true;
    }
    return jx_fail(c, DUET_ERR_INVALID, line, "%s must be an integer, not %s", what,
                   jv_type_name(v));
}

static bool make_list(jctx *c, int line, size_t n, jv *out) {
    jlist *l = jx_alloc(c, line, sizeof *l);
    if (!l || (n && !(l->v = jx_alloc(c, line, n * sizeof *l->v)))) return false;
    l->n = n;
    *out = (jv){.kind = JV_LIST, .l = l};
    return true;
}

/* ---- string methods -------------------------------------------------------------------------- */

static bool in_chars(uint32_t ch, const jv *chars) {
    for (size_t i = 0; i < chars->s.n;) {
        size_t k;
        if (decode_utf8(chars->s.p + i, chars->s.n - i, &k) == ch) return true;
        i += k;
    }
    return false;
}

/* strip/lstrip/rstrip: whitespace, or any of the characters in chars. */
static jstr strip(jstr s, const jv *chars, bool left, bool right) {
    if (left) {
        while (s.n) {
            size_t k;
            uint32_t ch = decode_utf8(s.p, s.n, &k);
            if (chars ? !in_chars(ch, chars) : !jinja_space_len(s.p, s.n)) break;
            s.p += k;
            s.n -= k;
        }
    }
    if (right) {
        while (s.n) {
            size_t k = 1;
            while (k < s.n && k < 4 && ((unsigned char)s.p[s.n - k] & 0xC0) == 0x80) k++;
            size_t kk;
            uint32_t ch = decode_utf8(s.p + s.n - k, k, &kk);
            if (chars ? !in_chars(ch, chars) : !jinja_space_len_back(s.p, s.n)) break;
            s.n -= chars ? k : jinja_space_len_back(s.p, s.n);
        }
    }
    return s;
}

/* The pieces split finds, in the order found. */
typedef struct pieces {
    jstr *v;
    size_t n, cap;
} pieces;

static bool piece_add(jctx *c, int line, pieces *ps, const char *p, size_t n) {
    if (ps->n == ps->cap) {
        size_t cap = ps->cap ? ps->cap * 2 : 8;
        jstr *v = jx_alloc(c, line, cap * sizeof *v);
        if (!v) return false;
        if (ps->n) memcpy(v, ps->v, ps->n * sizeof *v);
        ps->v = v;
        ps->cap = cap;
    }
    ps->v[ps->n++] = (jstr){p, n};
    return jx_step(c, line, 1);
}

/* str.split / str.rsplit: on sep, or on runs of whitespace when sep is none. */
static bool split(jctx *c, int line, jstr s, const jv *sep, int64_t maxsplit, bool from_right,
                  jv *out) {
    if (sep && sep->kind == JV_NONE) sep = NULL;
    if (sep && !want_str(c, line, sep, "the separator")) return false;
    if (sep && !sep->s.n) return jx_fail(c, DUET_ERR_INVALID, line, "empty separator");
    pieces ps = {0};
    int64_t k = 0;
    bool more = true;
    if (sep && !from_right) {
        size_t i = 0;
        while (more) {
            const char *hit = (maxsplit < 0 || k < maxsplit) && s.n - i >= sep->s.n
                                  ? memmem(s.p + i, s.n - i, sep->s.p, sep->s.n)
                                  : NULL;
            size_t end = hit ? (size_t)(hit - s.p) : s.n;
            if (!piece_add(c, line, &ps, s.p + i, end - i)) return false;
            more = hit != NULL;
            i = end + sep->s.n;
            k++;
        }
    } else if (sep) {
        size_t e = s.n;
        while (more) {
            size_t h = e;
            bool found = false;
            /* h: where the last separator before e ends */
            if (maxsplit < 0 || k < maxsplit) {
                for (h = e; h >= sep->s.n && !found; h--) {
                    if (!memcmp(s.p + h - sep->s.n, sep->s.p, sep->s.n)) {
                        found = true;
                        break;
                    }
                }
            }
            size_t start = found ? h : 0;
            if (!piece_add(c, line, &ps, s.p + start, e - start)) return false;
            more = found;
            e = found ? h - sep->s.n : 0;
            k++;
        }
    } else if (!from_right) {
        size_t i = 0, w;
        for (;;) {
            while (i < s.n && (w = jinja_space_len(s.p + i, s.n - i))) i += w;
            if (i == s.n) break;
            if (maxsplit >= 0 && k >= maxsplit) {
                if (!piece_add(c, line, &ps, s.p + i, s.n - i)) return false;
                break;
            }
            size_t j = i;
            while (j < s.n && !jinja_space_len(s.p + j, s.n - j))
                j += utf8_len1((unsigned char)s.p[j]);
            if (j > s.n) j = s.n;
            if (!piece_add(c, line, &ps, s.p + i, j - i)) return false;
            i = j;
            k++;
        }
    } else {
        size_t e = s.n, w;
        for (;;) {
            while (e > 0 && (w = jinja_space_len_back(s.p, e))) e -= w;
            if (e == 0) break;
            if (maxsplit >= 0 && k >= maxsplit) {
                if (!piece_add(c, line, &ps, s.p, e)) return false;
                break;
            }
            size_t j = e;
            while (j > 0 && !jinja_space_len_back(s.p, j)) {
                j--;
                while (j > 0 && ((unsigned char)s.p[j] & 0xC0) == 0x80) j--;
            }
            if (!piece_add(c, line, &ps, s.p + j, e - j)) return false;
            e = j;
            k++;
        }
    }
    if (!make_list(c, line, ps.n, out)) return false;
    for (size_t i = 0; i < ps.n; i++)
        out->l->v[i] = (jv){.kind = JV_STR, .s = ps.v[from_right ? ps.n - 1 - i : i]};
    return true;
}

static bool map_ascii(jctx *c, int line, jstr s, int mode, jv *out) {
    if (!jx_str(c, line, s.p, s.n, out)) return false;
    char *p = (char *)out->s.p;
    bool word_start = true;
    for (size_t i = 0; i < s.n; i++) {
        char ch = p[i];
        bool alpha = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z');
        bool up;
        if (mode == JF_LOWER)
            up = false;
        else if (mode == JF_UPPER)
            up = true;
        else if (mode == JF_TITLE)
            up = word_start;
        else
            up = i == 0;
        if (alpha) p[i] = up ? (char)(ch & ~0x20) : (char)(ch | 0x20);
        word_start = !alpha;
    }
    return true;
}

static bool replace(jctx *c, int line, jstr s, const jv *old, const jv *new, int64_t count,
                    jv *out) {
    if (!want_str(c, line, old, "replace's old") || !want_str(c, line, new, "replace's new"))
        return false;
    strbuf b = {0};
    size_t i = 0;
    int64_t done = 0;
    if (!old->s.n) {
        /* Python inserts new around every character */
        for (; i <= s.n && (count < 0 || done < count); done++) {
            strbuf_add(&b, new->s.p, new->s.n);
            if (i == s.n) {
                i++;
                break;
            }
            size_t k = utf8_len1((unsigned char)s.p[i]);
            if (k > s.n - i) k = s.n - i;
            strbuf_add(&b, s.p + i, k);
            i += k;
        }
        if (i < s.n) strbuf_add(&b, s.p + i, s.n - i);
    } else {
        while (i < s.n && (count < 0 || done < count)) {
            const char *hit = memmem(s.p + i, s.n - i, old->s.p, old->s.n);
            if (!hit) break;
            strbuf_add(&b, s.p + i, (size_t)(hit - s.p) - i);
            strbuf_add(&b, new->s.p, new->s.n);
            i = (size_t)(hit - s.p) + old->s.n;
            done++;
        }
        if (i < s.n) strbuf_add(&b, s.p + i, s.n - i);
    }
    bool ok = (!b.oom || jx_fail(c, DUET_ERR_NO_MEMORY, line, "out of memory")) &&
              jx_str(c, line, b.p ? b.p : "", b.len, out);
    strbuf_free(&b);
    return ok;
}

static bool affix(jctx *c, int line, jstr s, const jv *a, bool end, jv *out) {
    jv *opts = (jv *)a;
    size_t n = 1;
    if (a->kind == JV_LIST || (a->kind == JV_JSON && cJSON_IsArray(a->j))) {
        if (!jv_iterate(c, line, a, &opts, &n)) return false;
    }
    bool hit = false;
    for (size_t i = 0; i < n && !hit; i++) {
        if (!want_str(c, line, &opts[i], end ? "endswith's argument" : "startswith's argument"))
            return false;
        jstr x = opts[i].s;
        hit = x.n <= s.n && (!x.n || !memcmp(end ? s.p + s.n - x.n : s.p, x.p, x.n));
    }
    *out = (jv){.kind = JV_BOOL, .b = hit};
    return true;
}

/* ---- calls ----------------------------------------------------------------------------------- */

static bool items_of(jctx *c, int line, const jv *m, int what, jv *out) {
    if (!is_mapping(m))
        return jx_fail(c, DUET_ERR_INVALID, line,
                       "'%s' object has no method items, keys or "
                       "values",
                       jv_type_name(m));
    jv *keys;
    size_t n;
    if (!jv_iterate(c, line, m, &keys, &n) || !make_list(c, line, n, out)) return false;
    for (size_t i = 0; i < n; i++) {
        jv val;
        map_get(m, &keys[i], &val);
        if (what == JF_KEYS) {
            out->l->v[i] = keys[i];
        } else if (what == JF_VALUES) {
            out->l->v[i] = val;
        } else {
            jv pair;
            if (!make_list(c, line, 2, &pair)) return false;
            pair.tuple = 1;
            pair.l->v[0] = keys[i];
            pair.l->v[1] = val;
            out->l->v[i] = pair;
        }
    }
    return true;
}

static bool call_range(jctx *c, int line, const jv *args, size_t n, jv *out) {
    int64_t a = 0, b = 0, st = 1;
    if (n < 1 || n > 3)
        return jx_fail(c, DUET_ERR_INVALID, line, "range expected 1 to 3 arguments, got %zu", n);
    if (n == 1 ? !want_int(c, line, &args[0], "range's argument", &b)
               : !want_int(c, line, &args[0], "range's start", &a) ||
                     !want_int(c, line, &args[1], "range's stop", &b) ||
                     (n == 3 && !want_int(c, line, &args[2], "range's step", &st)))
        return false;
    if (st == 0) return jx_fail(c, DUET_ERR_INVALID, line, "range() arg 3 must not be zero");
    uint64_t k = 0;
    if (st > 0 && b > a) k = ((uint64_t)b - (uint64_t)a + (uint64_t)st - 1) / (uint64_t)st;
    if (st < 0 && a > b) k = ((uint64_t)a - (uint64_t)b + (uint64_t)(-st) - 1) / (uint64_t)(-st);
    if (!jx_step(c, line, k) || !make_list(c, line, (size_t)k, out)) return false;
    for (uint64_t i = 0; i < k; i++) out->l->v[i] = (jv){.kind = JV_INT, .i = a + (int64_t)i * st};
    return true;
}

static bool call_namespace(jctx *c, int line, const jv *args, size_t n_args, const jstr *kwnames,
                           const jv *kwvals, size_t n_kw, int fn, jv *out) {
    if (n_args > 1 || (n_args == 1 && !is_mapping(&args[0])))
        return jx_fail(c, DUET_ERR_INVALID, line, "%s() takes keyword arguments or one mapping",
                       fn == JF_DICT ? "dict" : "namespace");
    /* the pairs, mapping first, then keywords (a later one wins) */
    jv *keys = NULL;
    size_t nk = 0;
    if (n_args && !jv_iterate(c, line, &args[0], &keys, &nk)) return false;
    if (fn == JF_DICT) {
        jdict *d = jx_alloc(c, line, sizeof *d);
        size_t cap = nk + n_kw;
        if (!d || (cap && (!(d->k = jx_alloc(c, line, cap * sizeof *d->k)) ||
                           !(d->v = jx_alloc(c, line, cap * sizeof *d->v)))))
            return false;
        for (size_t i = 0; i < nk + n_kw; i++) {
            jv k = i < nk ? keys[i] : (jv){.kind = JV_STR, .s = kwnames[i - nk]}, v;
            if (i < nk)
                map_get(&args[0], &keys[i], &v);
            else
                v = kwvals[i - nk];
            size_t j;
            for (j = 0; j < d->n && !jv_equal(&d->k[j], &k); j++) {
            }
            d->k[j] = j < d->n ? d->k[j] : k;
            d->v[j] = v;
            if (j == d->n) d->n++;
        }
        *out = (jv){.kind = JV_DICT, .d = d};
        return true;
    }
    /* namespaces live until the render ends: their attributes outlive statements */
    jns *ns = ja_alloc(&c->keep, sizeof *ns);
    if (!ns) return jx_fail(c, DUET_ERR_NO_MEMORY, line, "out of memory");
    for (size_t i = 0; i < nk + n_kw; i++) {
        jv v;
        jstr name;
        if (i < nk) {
            if (keys[i].kind != JV_STR)
                return jx_fail(c, DUET_ERR_INVALID, line, "namespace keys must be strings");
            map_get(&args[0], &keys[i], &v);
            jv kept;
            if (!jx_persist(c, line, &keys[i], &kept)) return false;
            name = kept.s;
        } else {
            v = kwvals[i - nk];
            name = kwnames[i - nk];
        }
        if (!jx_slot_set(c, line, &ns->slots, &ns->n, &ns->cap, name, &v)) return false;
    }
    *out = (jv){.kind = JV_NS, .ns = ns};
    return true;
}

static bool call_strftime(jctx *c, int line, const jv *args, size_t n, jv *out) {
    if (n != 1 || !want_str(c, line, &args[0], "strftime_now's format")) return false;
    char fmt[128], buf[256];
    if (args[0].s.n >= sizeof fmt)
        return jx_fail(c, DUET_ERR_INVALID, line, "strftime_now's format is too long");
    memcpy(fmt, args[0].s.p, args[0].s.n);
    fmt[args[0].s.n] = '\0';
    time_t now = time(NULL);
    struct tm tm;
    localtime_r(&now, &tm);
    size_t k = strftime(buf, sizeof buf, fmt, &tm);
    return jx_str(c, line, buf, k, out);
}

bool jinja_call_builtin(jctx *c, int line, const jv *fn, const jv *args, size_t n_args,
                        const jstr *kwnames, const jv *kwvals, size_t n_kw, jv *out) {
    const jv *self = fn->self;
#define ARG(i, name) arg(args, n_args, kwnames, kwvals, n_kw, i, name)
    switch (fn->fn) {
    case JF_RANGE:
        return call_range(c, line, args, n_args, out);
    case JF_NAMESPACE:
    case JF_DICT:
        return call_namespace(c, line, args, n_args, kwnames, kwvals, n_kw, fn->fn, out);
    case JF_RAISE: {
        jv msg = {.kind = JV_STR, .s = {"", 0}};
        if (n_args && !jv_to_str(c, line, &args[0], &msg)) return false;
        /* the template's own words, as transformers and vLLM report them */
        return jx_fail(c, DUET_ERR_INVALID, 0, "%.*s", (int)(msg.s.n > 400 ? 400 : msg.s.n),
                       msg.s.p);
    }
    case JF_STRFTIME:
        return call_strftime(c, line, args, n_args, out);
    case JF_LOOP_CYCLE:
        if (!n_args) return jx_fail(c, DUET_ERR_INVALID, line, "no items for cycling given");
        *out = args[self->loop->i % n_args];
        return true;
    case JF_ITEMS:
    case JF_KEYS:
    case JF_VALUES:
        return items_of(c, line, self, fn->fn, out);
    case JF_GET: {
        const jv *k = ARG(0, "key"), *d = ARG(1, "default");
        if (!k) return jx_fail(c, DUET_ERR_INVALID, line, "get() needs a key");
        if (!map_get(self, k, out)) *out = d ? *d : (jv){.kind = JV_NONE};
        return true;
    }
    default:
        break;
    }
    /* string methods */
    jstr s = self->s;
    switch (fn->fn) {
    case JF_SPLIT:
    case JF_RSPLIT: {
        const jv *sep = ARG(0, "sep"), *max = ARG(1, "maxsplit");
        int64_t m = -1;
        if (max && !want_int(c, line, max, "maxsplit", &m)) return false;
        return split(c, line, s, sep, m, fn->fn == JF_RSPLIT, out);
    }
    case JF_STRIP:
    case JF_LSTRIP:
    case JF_RSTRIP: {
        const jv *chars = ARG(0, "chars");
        if (chars && chars->kind == JV_NONE) chars = NULL;
        if (chars && !want_str(c, line, chars, "strip's argument")) return false;
        *out = (jv){.kind = JV_STR, .s = strip(s, chars, fn->fn != JF_RSTRIP, fn->fn != JF_LSTRIP)};
        return true;
    }
    case JF_STARTSWITH:
    case JF_ENDSWITH: {
        const jv *a = ARG(0, "prefix");
        if (!a) return jx_fail(c, DUET_ERR_INVALID, line, "startswith/endswith need an argument");
        return affix(c, line, s, a, fn->fn == JF_ENDSWITH, out);
    }
    case JF_LOWER:
    case JF_UPPER:
    case JF_TITLE:
    case JF_CAPITALIZE:
        if (fn->fn == JF_CAPITALIZE && !map_ascii(c, line, s, JF_LOWER, out)) return false;
        return map_ascii(c, line, fn->fn == JF_CAPITALIZE ? out->s : s, fn->fn, out);
    case JF_REPLACE: {
        const jv *o = ARG(0, "old"), *n = ARG(1, "new"), *k = ARG(2, "count");
        int64_t count = -1;
        if (!o || !n) return jx_fail(c, DUET_ERR_INVALID, line, "replace() needs old and new");
        if (k && !want_int(c, line, k, "replace's count", &count)) return false;
        return replace(c, line, s, o, n, count, out);
    }
    case JF_FIND:
    case JF_COUNT: {
        const jv *sub = ARG(0, "sub");
        if (!sub || !want_str(c, line, sub, "the substring")) return false;
        if (fn->fn == JF_FIND) {
            const char *hit = !sub->s.n ? s.p : s.n ? memmem(s.p, s.n, sub->s.p, sub->s.n) : NULL;
            int64_t at = -1;
            if (hit) {
                at = 0;
                for (const char *p = s.p; p < hit; p++) at += ((unsigned char)*p & 0xC0) != 0x80;
            }
            *out = (jv){.kind = JV_INT, .i = at};
            return true;
        }
        int64_t k = 0;
        if (!sub->s.n) {
            jv len = {.kind = JV_STR, .s = s};
            if (!jv_length(c, line, &len, &k)) return false;
            k++;
        } else {
            for (size_t i = 0; i + sub->s.n <= s.n;) {
                const char *hit = memmem(s.p + i, s.n - i, sub->s.p, sub->s.n);
                if (!hit) break;
                k++;
                i = (size_t)(hit - s.p) + sub->s.n;
            }
        }
        *out = (jv){.kind = JV_INT, .i = k};
        return true;
    }
    default:
        return jx_fail(c, DUET_ERR_INTERNAL, line, "unknown built-in %d", fn->fn);
    }
#undef ARG
}

/* ---- filters --------------------------------------------------------------------------------- */

static bool tojson(jctx *c, const jnode *n, const jv *v, const jv *args, size_t n_args,
                   const jv *kwvals, jv *out) {
    int line = n->line;
    jjson_opts o = {
        .indent = -1, .item_sep = {", ", 2}, .key_sep = {": ", 2}, .indent_str = {"", 0}};
#define ARG(i, name) arg(args, n_args, n->kwnames, kwvals, n->n_kw, i, name)
    const jv *ea = ARG(0, "ensure_ascii"), *ind = ARG(1, "indent"), *seps = ARG(2, "separators"),
             *sk = ARG(3, "sort_keys");
#undef ARG
    o.ensure_ascii = ea && jv_truthy(ea);
    o.sort_keys = sk && jv_truthy(sk);
    char spaces[64];
    if (ind && ind->kind != JV_NONE) {
        if (ind->kind == JV_INT) {
            int64_t k = ind->i < 0 ? 0 : ind->i > 32 ? 32 : ind->i;
            memset(spaces, ' ', (size_t)k);
            o.indent_str = (jstr){spaces, (size_t)k};
        } else if (ind->kind == JV_STR) {
            o.indent_str = ind->s;
        } else {
            return jx_fail(c, DUET_ERR_INVALID, line,
                           "tojson's indent must be an int or a "
                           "string");
        }
        o.indent = 1;
        o.item_sep = (jstr){",", 1};
    }
    if (seps && seps->kind != JV_NONE) {
        jv *items;
        size_t k;
        if (!jv_iterate(c, line, seps, &items, &k)) return false;
        if (k != 2 || items[0].kind != JV_STR || items[1].kind != JV_STR)
            return jx_fail(c, DUET_ERR_INVALID, line, "tojson's separators must be two strings");
        o.item_sep = items[0].s;
        o.key_sep = items[1].s;
    }
    strbuf b = {0};
    bool ok = jv_write_json(c, line, v, &o, &b) &&
              (!b.oom || jx_fail(c, DUET_ERR_NO_MEMORY, line, "out of memory")) &&
              jx_str(c, line, b.p ? b.p : "", b.len, out);
    strbuf_free(&b);
    return ok;
}

static bool join(jctx *c, int line, const jv *v, const jv *sep, const jv *attr, jv *out) {
    jv *items;
    size_t n;
    if (!jv_iterate(c, line, v, &items, &n) || !jx_step(c, line, n)) return false;
    strbuf b = {0};
    bool ok = true;
    for (size_t i = 0; ok && i < n; i++) {
        if (i && sep) ok = jv_write_str(c, line, sep, &b);
        jv x = items[i];
        if (ok && attr) ok = jv_getitem(c, line, &items[i], attr, &x);
        ok = ok && jv_write_str(c, line, &x, &b);
    }
    ok = ok && (!b.oom || jx_fail(c, DUET_ERR_NO_MEMORY, line, "out of memory")) &&
         jx_str(c, line, b.p ? b.p : "", b.len, out);
    strbuf_free(&b);
    return ok;
}

static bool indent(jctx *c, int line, jstr s, const jv *width, const jv *first, const jv *blank,
                   jv *out) {
    jstr pad = {"    ", 4};
    char spaces[64];
    if (width && width->kind == JV_INT) {
        int64_t k = width->i < 0 ? 0 : width->i > 64 ? 64 : width->i;
        memset(spaces, ' ', (size_t)k);
        pad = (jstr){spaces, (size_t)k};
    } else if (width && width->kind == JV_STR) {
        pad = width->s;
    }
    strbuf b = {0};
    bool at_start = true, first_line = true;
    for (size_t i = 0; i <= s.n; i++) {
        if (at_start && i < s.n) {
            size_t e = i;
            while (e < s.n && s.p[e] != '\n') e++;
            bool empty = e == i;
            if ((!first_line || (first && jv_truthy(first))) &&
                (!empty || (blank && jv_truthy(blank))))
                strbuf_add(&b, pad.p, pad.n);
            at_start = false;
        }
        if (i == s.n) break;
        strbuf_add(&b, s.p + i, 1);
        if (s.p[i] == '\n') {
            at_start = true;
            first_line = false;
        }
    }
    bool ok = (!b.oom || jx_fail(c, DUET_ERR_NO_MEMORY, line, "out of memory")) &&
              jx_str(c, line, b.p ? b.p : "", b.len, out);
    strbuf_free(&b);
    return ok;
}

/* select/reject/selectattr/rejectattr/map over a sequence. */
static bool filter_seq(jctx *c, const jnode *n, const jv *v, const jv *args, size_t n_args,
                       const jv *kwvals, jv *out) {
    int line = n->line;
    jv *items;
    size_t k;
    if (!jv_iterate(c, line, v, &items, &k) || !jx_step(c, line, k) || !make_list(c, line, k, out))
        return false;
    size_t kept = 0;
    bool attr = n->op == JFL_SELECTATTR || n->op == JFL_REJECTATTR;
    if (n->op == JFL_MAP) {
        const jv *a = arg(NULL, 0, n->kwnames, kwvals, n->n_kw, 0, "attribute");
        const jv *dflt = arg(NULL, 0, n->kwnames, kwvals, n->n_kw, 0, "default");
        if (!a && (n_args < 1 || args[0].kind != JV_STR))
            return jx_fail(c, DUET_ERR_INVALID, line,
                           "map needs attribute=... or the name of a filter");
        for (size_t i = 0; i < k; i++) {
            jv x;
            if (a) {
                if (!jv_getitem(c, line, &items[i], a, &x)) return false;
                if (x.kind == JV_UNDEF && dflt) x = *dflt;
            } else if (!jinja_filter_by_name(c, line, args[0].s, &items[i], &x)) {
                return false;
            }
            out->l->v[kept++] = x;
        }
        out->l->n = kept;
        return true;
    }
    size_t first = attr ? 1 : 0;
    if (attr && (n_args < 1 || args[0].kind != JV_STR))
        return jx_fail(c, DUET_ERR_INVALID, line, "%.*s needs an attribute name", (int)n->name.n,
                       n->name.p);
    bool keep_if = n->op == JFL_SELECT || n->op == JFL_SELECTATTR;
    for (size_t i = 0; i < k; i++) {
        jv x = items[i];
        if (attr && !jv_getitem(c, line, &items[i], &args[0], &x)) return false;
        bool r;
        if (n_args > first) {
            if (args[first].kind != JV_STR)
                return jx_fail(c, DUET_ERR_INVALID, line, "the test name must be a string");
            if (!jinja_test_by_name(c, line, args[first].s, &x, args + first + 1,
                                    n_args - first - 1, &r))
                return false;
        } else {
            r = jv_truthy(&x);
        }
        if (r == keep_if) out->l->v[kept++] = items[i];
    }
    out->l->n = kept;
    return true;
}

bool jinja_apply_filter(jctx *c, const jnode *n, const jv *v, const jv *args, size_t n_args,
                        const jv *kwvals, jv *out) {
    int line = n->line;
#define ARG(i, name) arg(args, n_args, n->kwnames, kwvals, n->n_kw, i, name)
    switch (n->op) {
    case JFL_TOJSON:
        return tojson(c, n, v, args, n_args, kwvals, out);
    case JFL_DEFAULT: {
        const jv *d = ARG(0, "default_value"), *b = ARG(1, "boolean");
        bool use = v->kind == JV_UNDEF || (b && jv_truthy(b) && !jv_truthy(v));
        *out = use ? (d ? *d : (jv){.kind = JV_STR, .s = {"", 0}}) : *v;
        return true;
    }
    case JFL_LENGTH: {
        int64_t k;
        if (!jv_length(c, line, v, &k)) return false;
        *out = (jv){.kind = JV_INT, .i = k};
        return true;
    }
    case JFL_SAFE:
        *out = *v;
        return true;
    case JFL_FIRST:
    case JFL_LAST:
    case JFL_LIST:
    case JFL_REVERSE: {
        jv *items;
        size_t k;
        if (v->kind == JV_UNDEF && n->op != JFL_LIST && n->op != JFL_REVERSE) {
            *out = (jv){.kind = JV_UNDEF};
            return true;
        }
        if (!jv_iterate(c, line, v, &items, &k)) return false;
        if (n->op == JFL_FIRST || n->op == JFL_LAST) {
            *out = k ? items[n->op == JFL_FIRST ? 0 : k - 1] : (jv){.kind = JV_UNDEF};
            return true;
        }
        if (n->op == JFL_REVERSE && v->kind == JV_STR) {
            size_t bytes = v->s.n, off = 0;
            char *s = jx_alloc(c, line, bytes + 1);
            if (!s) return false;
            for (size_t i = k; i-- > 0;) {
                memcpy(s + off, items[i].s.p, items[i].s.n);
                off += items[i].s.n;
            }
            *out = (jv){.kind = JV_STR, .s = {s, bytes}};
            return true;
        }
        if (!make_list(c, line, k, out)) return false;
        for (size_t i = 0; i < k; i++) out->l->v[i] = items[n->op == JFL_REVERSE ? k - 1 - i : i];
        return true;
    }
    case JFL_ITEMS:
        if (v->kind == JV_UNDEF) return make_list(c, line, 0, out);
        return items_of(c, line, v, JF_ITEMS, out);
    case JFL_JOIN:
        return join(c, line, v, ARG(0, "d"), ARG(1, "attribute"), out);
    case JFL_MAP:
    case JFL_SELECT:
    case JFL_REJECT:
    case JFL_SELECTATTR:
    case JFL_REJECTATTR:
        return filter_seq(c, n, v, args, n_args, kwvals, out);
    case JFL_INT:
    case JFL_FLOAT: {
        const jv *d = ARG(0, "default");
        double f = 0;
        bool ok = true;
        if (v->kind == JV_INT || v->kind == JV_BOOL)
            f = v->kind == JV_INT ? (double)v->i : v->b;
        else if (v->kind == JV_FLOAT)
            f = v->f;
        else if (v->kind == JV_STR) {
            char buf[64];
            jstr t = strip(v->s, NULL, true, true);
            char *end = NULL;
            if (t.n && t.n < sizeof buf) {
                memcpy(buf, t.p, t.n);
                buf[t.n] = '\0';
                f = strtod(buf, &end);
            }
            ok = end && *end == '\0';
        } else {
            ok = false;
        }
        if (n->op == JFL_INT) {
            if (ok && v->kind == JV_INT) {
                *out = *v;
            } else if (ok && fabs(f) < 9.2e18) {
                *out = (jv){.kind = JV_INT, .i = (int64_t)f};
            } else {
                *out = d ? *d : (jv){.kind = JV_INT, .i = 0};
            }
        } else {
            *out = ok ? (jv){.kind = JV_FLOAT, .f = f} : d ? *d : (jv){.kind = JV_FLOAT, .f = 0};
        }
        return true;
    }
    case JFL_ABS:
        if (v->kind == JV_INT && v->i != INT64_MIN) {
            *out = (jv){.kind = JV_INT, .i = v->i < 0 ? -v->i : v->i};
            return true;
        }
        if (v->kind == JV_FLOAT) {
            *out = (jv){.kind = JV_FLOAT, .f = fabs(v->f)};
            return true;
        }
        return jx_fail(c, DUET_ERR_INVALID, line, "bad operand type for abs(): '%s'",
                       jv_type_name(v));
    default:
        break;
    }
    /* the string filters work on str(v) */
    jv s;
    if (!jv_to_str(c, line, v, &s)) return false;
    switch (n->op) {
    case JFL_STRING:
        *out = s;
        return true;
    case JFL_TRIM: {
        const jv *chars = ARG(0, "chars");
        if (chars && chars->kind == JV_NONE) chars = NULL;
        if (chars && !want_str(c, line, chars, "trim's argument")) return false;
        *out = (jv){.kind = JV_STR, .s = strip(s.s, chars, true, true)};
        return true;
    }
    case JFL_LOWER:
        return map_ascii(c, line, s.s, JF_LOWER, out);
    case JFL_UPPER:
        return map_ascii(c, line, s.s, JF_UPPER, out);
    case JFL_TITLE:
        return map_ascii(c, line, s.s, JF_TITLE, out);
    case JFL_CAPITALIZE:
        return map_ascii(c, line, s.s, JF_LOWER, out) &&
               map_ascii(c, line, out->s, JF_CAPITALIZE, out);
    case JFL_REPLACE: {
        const jv *o = ARG(0, "old"), *nw = ARG(1, "new"), *k = ARG(2, "count");
        int64_t count = -1;
        if (!o || !nw) return jx_fail(c, DUET_ERR_INVALID, line, "replace needs old and new");
        if (k && k->kind != JV_NONE && !want_int(c, line, k, "replace's count", &count))
            return false;
        return replace(c, line, s.s, o, nw, count, out);
    }
    case JFL_INDENT:
        return indent(c, line, s.s, ARG(0, "width"), ARG(1, "first"), ARG(2, "blank"), out);
    default:
        return jx_fail(c, DUET_ERR_INTERNAL, line, "unknown filter %d", n->op);
    }
#undef ARG
}

bool jinja_filter_by_name(jctx *c, int line, jstr name, const jv *v, jv *out) {
    int id = jinja_filter_id(name.p, name.n);
    if (id < 0 || id == JFL_MAP || id == JFL_SELECT || id == JFL_REJECT || id == JFL_SELECTATTR ||
        id == JFL_REJECTATTR)
        return jx_fail(c, DUET_ERR_UNSUPPORTED, line, "unsupported construct 'map(\"%.*s\")'",
                       (int)(name.n > 40 ? 40 : name.n), name.p);
    jnode n = {.kind = JN_FILTER, .op = (uint8_t)id, .line = line, .name = name};
    return jinja_apply_filter(c, &n, v, NULL, 0, NULL, out);
}

/* ---- tests ----------------------------------------------------------------------------------- */

static bool run_test(jctx *c, int line, int id, const jv *v, const jv *args, size_t n_args,
                     bool *out) {
    const jv *a = n_args ? &args[0] : NULL;
    switch (id) {
    case JT_DEFINED:
        *out = v->kind != JV_UNDEF;
        return true;
    case JT_UNDEFINED:
        *out = v->kind == JV_UNDEF;
        return true;
    case JT_NONE:
        *out = v->kind == JV_NONE;
        return true;
    case JT_BOOLEAN:
        *out = v->kind == JV_BOOL;
        return true;
    case JT_TRUE:
        *out = v->kind == JV_BOOL && v->b;
        return true;
    case JT_FALSE:
        *out = v->kind == JV_BOOL && !v->b;
        return true;
    case JT_INTEGER:
        *out = v->kind == JV_INT;
        return true;
    case JT_FLOAT:
        *out = v->kind == JV_FLOAT;
        return true;
    case JT_NUMBER:
        *out = v->kind == JV_INT || v->kind == JV_FLOAT || v->kind == JV_BOOL;
        return true;
    case JT_STRING:
        *out = v->kind == JV_STR;
        return true;
    case JT_MAPPING:
        *out = is_mapping(v);
        return true;
    case JT_ITERABLE:
        *out = v->kind == JV_STR || v->kind == JV_LIST || v->kind == JV_DICT ||
               v->kind == JV_JSON || v->kind == JV_UNDEF;
        return true;
    case JT_SEQUENCE:
        *out = v->kind == JV_STR || v->kind == JV_LIST || v->kind == JV_DICT || v->kind == JV_JSON;
        return true;
    case JT_CALLABLE:
        *out = v->kind == JV_FUNC || v->kind == JV_MACRO;
        return true;
    case JT_EVEN:
    case JT_ODD:
    case JT_DIVISIBLEBY: {
        int64_t x = 0, d = id == JT_DIVISIBLEBY ? 0 : 2;
        if (!want_int(c, line, v, "the tested value", &x)) return false;
        if (id == JT_DIVISIBLEBY && (!a || !want_int(c, line, a, "divisibleby's argument", &d)))
            return a ? false : jx_fail(c, DUET_ERR_INVALID, line, "divisibleby needs a number");
        if (d == 0) return jx_fail(c, DUET_ERR_INVALID, line, "division by zero");
        *out = id == JT_ODD ? x % 2 != 0 : x % d == 0;
        return true;
    }
    case JT_IN:
    case JT_EQ:
    case JT_NE:
    case JT_LT:
    case JT_LE:
    case JT_GT:
    case JT_GE:
        if (!a) return jx_fail(c, DUET_ERR_INVALID, line, "this test needs an argument");
        if (id == JT_EQ || id == JT_NE) {
            *out = jv_equal(v, a) == (id == JT_EQ);
            return true;
        }
        if (id == JT_IN) {
            jv *items;
            size_t n;
            if (a->kind == JV_STR) {
                *out = v->kind == JV_STR &&
                       (!v->s.n || (a->s.n && memmem(a->s.p, a->s.n, v->s.p, v->s.n)));
                return true;
            }
            if (!jv_iterate(c, line, a, &items, &n)) return false;
            *out = false;
            for (size_t i = 0; i < n && !*out; i++) *out = jv_equal(v, &items[i]);
            return true;
        }
        {
            bool num = (v->kind == JV_INT || v->kind == JV_FLOAT || v->kind == JV_BOOL) &&
                       (a->kind == JV_INT || a->kind == JV_FLOAT || a->kind == JV_BOOL);
            int k;
            if (num) {
                double x = v->kind == JV_FLOAT ? v->f : v->kind == JV_INT ? (double)v->i : v->b;
                double y = a->kind == JV_FLOAT ? a->f : a->kind == JV_INT ? (double)a->i : a->b;
                k = x < y ? -1 : x > y;
            } else if (v->kind == JV_STR && a->kind == JV_STR) {
                size_t m = v->s.n < a->s.n ? v->s.n : a->s.n;
                k = m ? memcmp(v->s.p, a->s.p, m) : 0;
                if (!k) k = (v->s.n > a->s.n) - (v->s.n < a->s.n);
            } else {
                return jx_fail(c, DUET_ERR_INVALID, line, "cannot order '%s' and '%s'",
                               jv_type_name(v), jv_type_name(a));
            }
            *out = id == JT_LT ? k < 0 : id == JT_LE ? k <= 0 : id == JT_GT ? k > 0 : k >= 0;
            return true;
        }
    default:
        return jx_fail(c, DUET_ERR_INTERNAL, line, "unknown test %d", id);
    }
}

bool jinja_apply_test(jctx *c, const jnode *n, const jv *v, const jv *args, size_t n_args,
                      bool *out) {
    return run_test(c, n->line, n->op, v, args, n_args, out);
}

bool jinja_test_by_name(jctx *c, int line, jstr name, const jv *v, const jv *args, size_t n_args,
                        bool *out) {
    int id = jinja_test_id(name.p, name.n);
    if (id < 0)
        return jx_fail(c, DUET_ERR_UNSUPPORTED, line, "unsupported construct 'is %.*s' (test)",
                       (int)(name.n > 40 ? 40 : name.n), name.p);
    return run_test(c, line, id, v, args, n_args, out);
}
