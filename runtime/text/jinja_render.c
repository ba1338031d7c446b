/* Runs a parsed Jinja template: statements, expressions, scopes (a frame per loop iteration and
 * per macro call, as in jinja2), and the limits that keep a hostile template or input from
 * taking the process down. Filters, tests, methods and value printing are jinja_builtins.c's. */
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "text/jinja-impl.h"

#define DEFAULT_MAX_OUTPUT ((size_t)64 << 20)
#define DEFAULT_MAX_MEMORY ((size_t)512 << 20)
#define DEFAULT_MAX_STEPS  ((uint64_t)10 * 1000 * 1000)
#define DEFAULT_MAX_DEPTH  64
/* Values nested deeper than this (lists in lists built by a loop) are refused before the
 * recursive copy or print could exhaust the C stack. */
#define VALUE_MAX_DEPTH 512

/* ---- errors and memory ---------------------------------------------------------------------- */

bool jx_fail(jctx *c, duet_status st, int line, const char *fmt, ...) {
    if (c->st != DUET_OK) return false;
    c->st = st;
    if (c->err && c->err_cap) {
        int k = line > 0 ? snprintf(c->err, c->err_cap, "line %d: ", line) : 0;
        if (k >= 0 && (size_t)k < c->err_cap) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(c->err + k, c->err_cap - (size_t)k, fmt, ap);
            va_end(ap);
        }
    }
    return false;
}

static bool out_of_memory(jctx *c, int line) {
    if (c->tmp.refused || c->keep.refused)
        return jx_fail(c, DUET_ERR_TOO_LONG, line,
                       "the template needs more than %zu MiB of working memory",
                       c->tmp.limit >> 20);
    return jx_fail(c, DUET_ERR_NO_MEMORY, line, "out of memory");
}

void *jx_alloc(jctx *c, int line, size_t n) {
    void *p = ja_alloc(&c->tmp, n);
    if (!p) out_of_memory(c, line);
    return p;
}

static void *keep_alloc(jctx *c, int line, size_t n) {
    void *p = ja_alloc(&c->keep, n);
    if (!p) out_of_memory(c, line);
    return p;
}

bool jx_step(jctx *c, int line, uint64_t n) {
    c->steps += n;
    if (c->steps > c->max_steps)
        return jx_fail(c, DUET_ERR_TOO_LONG, line,
                       "the template ran more than %" PRIu64 " loop iterations and calls",
                       c->max_steps);
    return true;
}

bool jx_str(jctx *c, int line, const char *p, size_t n, jv *out) {
    char *s = jx_alloc(c, line, n + 1);
    if (!s) return false;
    if (n) memcpy(s, p, n);
    *out = (jv){.kind = JV_STR, .s = {s, n}};
    return true;
}

static bool emit(jctx *c, int line, const char *p, size_t n) {
    if (c->out->len - c->out_base + n > c->max_output)
        return jx_fail(c, DUET_ERR_TOO_LONG, line, "the rendered text exceeds %zu bytes",
                       c->max_output);
    strbuf_add(c->out, p, n);
    if (c->out->oom) return jx_fail(c, DUET_ERR_NO_MEMORY, line, "out of memory");
    return true;
}

/* ---- values that outlive a statement -------------------------------------------------------- */

static bool persist(jctx *c, int line, const jv *v, jv *out, int depth) {
    if (depth > VALUE_MAX_DEPTH)
        return jx_fail(c, DUET_ERR_TOO_LONG, line, "a value is nested more than %d deep",
                       VALUE_MAX_DEPTH);
    *out = *v;
    switch (v->kind) {
    case JV_STR: {
        char *s = keep_alloc(c, line, v->s.n + 1);
        if (!s) return false;
        if (v->s.n) memcpy(s, v->s.p, v->s.n);
        out->s.p = s;
        return true;
    }
    case JV_LIST: {
        jlist *l = keep_alloc(c, line, sizeof *l);
        if (!l || (v->l->n && !(l->v = keep_alloc(c, line, v->l->n * sizeof *l->v)))) return false;
        for (size_t i = 0; i < v->l->n; i++)
            if (!persist(c, line, &v->l->v[i], &l->v[i], depth + 1)) return false;
        l->n = v->l->n;
        out->l = l;
        return true;
    }
    case JV_DICT: {
        jdict *d = keep_alloc(c, line, sizeof *d);
        size_t n = v->d->n;
        if (!d || (n && (!(d->k = keep_alloc(c, line, n * sizeof *d->k)) ||
                         !(d->v = keep_alloc(c, line, n * sizeof *d->v)))))
            return false;
        for (size_t i = 0; i < n; i++)
            if (!persist(c, line, &v->d->k[i], &d->k[i], depth + 1) ||
                !persist(c, line, &v->d->v[i], &d->v[i], depth + 1))
                return false;
        d->n = n;
        out->d = d;
        return true;
    }
    case JV_LOOP: {
        /* a snapshot: the running loop's items live only as long as the loop */
        jloop *l = keep_alloc(c, line, sizeof *l);
        jv *items = v->loop->n ? keep_alloc(c, line, v->loop->n * sizeof *items) : NULL;
        if (!l || (v->loop->n && !items)) return false;
        for (size_t i = 0; i < v->loop->n; i++)
            if (!persist(c, line, &v->loop->items[i], &items[i], depth + 1)) return false;
        *l = (jloop){v->loop->i, v->loop->n, items};
        out->loop = l;
        return true;
    }
    case JV_FUNC:
        if (v->self) {
            jv *self = keep_alloc(c, line, sizeof *self);
            if (!self || !persist(c, line, v->self, self, depth + 1)) return false;
            out->self = self;
        }
        return true;
    case JV_UNDEF:
        out->s = (jstr){0}; /* the name may live in the tmp arena */
        return true;
    default:
        return true; /* scalars; JSON inputs, namespaces and macros are stable already */
    }
}

bool jx_persist(jctx *c, int line, const jv *v, jv *out) {
    return persist(c, line, v, out, 0);
}

bool jx_slot_get(jctx *c, int line, const jslot *s, jv *out) {
    if (s->val.kind == JV_STR) return jx_str(c, line, s->val.s.p, s->val.s.n, out);
    *out = s->val;
    return true;
}

static bool slot_store(jctx *c, int line, jslot *s, const jv *v) {
    if (v->kind == JV_STR) {
        if (v->s.n + 1 > s->cap) {
            size_t cap = s->cap ? s->cap : 32;
            while (cap < v->s.n + 1) cap *= 2;
            char *buf = keep_alloc(c, line, cap);
            if (!buf) return false;
            s->buf = buf;
            s->cap = cap;
        }
        if (v->s.n) memmove(s->buf, v->s.p, v->s.n);
        s->buf[v->s.n] = '\0';
        s->val = (jv){.kind = JV_STR, .s = {s->buf, v->s.n}};
    } else if (!persist(c, line, v, &s->val, 0)) {
        return false;
    }
    s->live = true;
    return true;
}

static jslot *slot_find(jslot *slots, size_t n, jstr name) {
    for (size_t i = 0; i < n; i++)
        if (slots[i].name.n == name.n && !memcmp(slots[i].name.p, name.p, name.n)) return &slots[i];
    return NULL;
}

bool jx_slot_set(jctx *c, int line, jslot **slots, size_t *n, size_t *cap, jstr name, const jv *v) {
    jslot *s = slot_find(*slots, *n, name);
    if (!s) {
        if (*n == *cap) {
            size_t nc = *cap ? *cap * 2 : 8;
            jslot *ns = keep_alloc(c, line, nc * sizeof *ns);
            if (!ns) return false;
            if (*n) memcpy(ns, *slots, *n * sizeof *ns);
            *slots = ns;
            *cap = nc;
        }
        s = &(*slots)[(*n)++];
        *s = (jslot){.name = name};
    }
    return slot_store(c, line, s, v);
}

static bool frame_set(jctx *c, int line, jframe *f, jstr name, const jv *v) {
    return jx_slot_set(c, line, &f->slots, &f->n, &f->cap, name, v);
}

/* ---- names ---------------------------------------------------------------------------------- */

static const struct {
    const char *name;
    int fn;
} GLOBALS[] = {
    {"range", JF_RANGE},           {"namespace", JF_NAMESPACE},   {"dict", JF_DICT},
    {"raise_exception", JF_RAISE}, {"strftime_now", JF_STRFTIME},
};

static bool lookup(jctx *c, int line, jstr name, jv *out) {
    for (jframe *f = c->frame; f; f = f->parent) {
        jslot *s = slot_find(f->slots, f->n, name);
        if (s && s->live) return jx_slot_get(c, line, s, out);
    }
    for (size_t i = c->n_vars; i-- > 0;) {
        const char *vn = c->vars[i].name;
        if (vn && strlen(vn) == name.n && !memcmp(vn, name.p, name.n)) {
            *out = jv_from_json(c->vars[i].value);
            return true;
        }
    }
    for (size_t i = 0; i < sizeof GLOBALS / sizeof *GLOBALS; i++)
        if (strlen(GLOBALS[i].name) == name.n && !memcmp(GLOBALS[i].name, name.p, name.n)) {
            *out = (jv){.kind = JV_FUNC, .fn = (uint16_t)GLOBALS[i].fn};
            return true;
        }
    *out = (jv){.kind = JV_UNDEF, .s = name};
    return true;
}

/* ---- expressions ---------------------------------------------------------------------------- */

static bool eval(jctx *c, const jnode *n, jv *out);
static bool exec_body(jctx *c, jnode *const *body, size_t n);

static bool as_number(const jv *v, double *f, int64_t *i, bool *is_int) {
    switch (v->kind) {
    case JV_BOOL:
        *i = v->b;
        *is_int = true;
        return true;
    case JV_INT:
        *i = v->i;
        *is_int = true;
        return true;
    case JV_FLOAT:
        *f = v->f;
        *is_int = false;
        return true;
    default:
        return false;
    }
}

static const char *const OP_NAMES[] = {"+", "-", "*", "/", "//", "%", "**"};

static bool undefined_error(jctx *c, int line, const jv *v) {
    if (v->s.n)
        return jx_fail(c, DUET_ERR_INVALID, line, "'%.*s' is undefined",
                       (int)(v->s.n > 60 ? 60 : v->s.n), v->s.p);
    return jx_fail(c, DUET_ERR_INVALID, line, "an undefined value was used");
}

static bool arith(jctx *c, int line, int op, const jv *a, const jv *b, jv *out) {
    if (a->kind == JV_UNDEF) return undefined_error(c, line, a);
    if (b->kind == JV_UNDEF) return undefined_error(c, line, b);
    double fa = 0, fb = 0;
    int64_t ia = 0, ib = 0;
    bool inta, intb;
    if (op == JOP_ADD && a->kind == JV_STR && b->kind == JV_STR) {
        char *s = jx_alloc(c, line, a->s.n + b->s.n + 1);
        if (!s) return false;
        memcpy(s, a->s.p, a->s.n);
        memcpy(s + a->s.n, b->s.p, b->s.n);
        *out = (jv){.kind = JV_STR, .s = {s, a->s.n + b->s.n}};
        return true;
    }
    if (op == JOP_ADD && (a->kind == JV_LIST || (a->kind == JV_JSON && cJSON_IsArray(a->j))) &&
        (b->kind == JV_LIST || (b->kind == JV_JSON && cJSON_IsArray(b->j)))) {
        jv *xa, *xb;
        size_t na, nb;
        if (!jv_iterate(c, line, a, &xa, &na) || !jv_iterate(c, line, b, &xb, &nb)) return false;
        jlist *l = jx_alloc(c, line, sizeof *l);
        if (!l || (na + nb && !(l->v = jx_alloc(c, line, (na + nb) * sizeof *l->v)))) return false;
        if (na) memcpy(l->v, xa, na * sizeof *xa);
        if (nb) memcpy(l->v + na, xb, nb * sizeof *xb);
        l->n = na + nb;
        *out = (jv){.kind = JV_LIST, .l = l};
        return true;
    }
    if (op == JOP_MUL &&
        ((a->kind == JV_STR && b->kind == JV_INT) || (a->kind == JV_INT && b->kind == JV_STR))) {
        const jv *s = a->kind == JV_STR ? a : b;
        int64_t k = a->kind == JV_INT ? a->i : b->i;
        if (k <= 0 || !s->s.n) return jx_str(c, line, "", 0, out);
        if ((uint64_t)k > c->max_output / s->s.n)
            return jx_fail(c, DUET_ERR_TOO_LONG, line, "a repeated string exceeds %zu bytes",
                           c->max_output);
        size_t total = s->s.n * (size_t)k;
        char *p = jx_alloc(c, line, total + 1);
        if (!p) return false;
        for (int64_t i = 0; i < k; i++) memcpy(p + (size_t)i * s->s.n, s->s.p, s->s.n);
        *out = (jv){.kind = JV_STR, .s = {p, total}};
        return true;
    }
    if (!as_number(a, &fa, &ia, &inta) || !as_number(b, &fb, &ib, &intb))
        return jx_fail(c, DUET_ERR_INVALID, line, "unsupported operand types for %s: '%s' and '%s'",
                       OP_NAMES[op], jv_type_name(a), jv_type_name(b));
    if (inta && intb && op != JOP_DIV) {
        int64_t r;
        bool overflow = false;
        switch (op) {
        case JOP_ADD:
            overflow = __builtin_add_overflow(ia, ib, &r);
            break;
        case JOP_SUB:
            overflow = __builtin_sub_overflow(ia, ib, &r);
            break;
        case JOP_MUL:
            overflow = __builtin_mul_overflow(ia, ib, &r);
            break;
        case JOP_FLOORDIV:
        case JOP_MOD:
            if (ib == 0) return jx_fail(c, DUET_ERR_INVALID, line, "division by zero");
            if (ia == INT64_MIN && ib == -1) {
                overflow = true;
                break;
            }
            r = op == JOP_FLOORDIV ? ia / ib : ia % ib;
            /* Python rounds toward minus infinity */
            if ((ia % ib != 0) && ((ia < 0) != (ib < 0))) r = op == JOP_FLOORDIV ? r - 1 : r + ib;
            break;
        default: /* JOP_POW */
            if (ib < 0) {
                *out = (jv){.kind = JV_FLOAT, .f = pow((double)ia, (double)ib)};
                return true;
            }
            r = 1;
            for (int64_t k = 0; k < ib && !overflow; k++) {
                overflow = __builtin_mul_overflow(r, ia, &r);
                if (r == 0 || r == 1) break;
            }
            if (ia == -1) r = ib % 2 ? -1 : 1;
        }
        if (overflow)
            return jx_fail(c, DUET_ERR_UNSUPPORTED, line,
                           "integer result of %s does not fit in 64 bits", OP_NAMES[op]);
        *out = (jv){.kind = JV_INT, .i = r};
        return true;
    }
    if (inta) fa = (double)ia;
    if (intb) fb = (double)ib;
    double r;
    switch (op) {
    case JOP_ADD:
        r = fa + fb;
        break;
    case JOP_SUB:
        r = fa - fb;
        break;
    case JOP_MUL:
        r = fa * fb;
        break;
    case JOP_DIV:
        if (fb == 0) return jx_fail(c, DUET_ERR_INVALID, line, "division by zero");
        r = fa / fb;
        break;
    case JOP_FLOORDIV:
        if (fb == 0) return jx_fail(c, DUET_ERR_INVALID, line, "division by zero");
        r = floor(fa / fb);
        break;
    case JOP_MOD:
        if (fb == 0) return jx_fail(c, DUET_ERR_INVALID, line, "division by zero");
        r = fmod(fa, fb);
        if (r != 0 && ((r < 0) != (fb < 0))) r += fb;
        break;
    default:
        r = pow(fa, fb);
    }
    *out = (jv){.kind = JV_FLOAT, .f = r};
    return true;
}

/* a + b + c + ...: operands first, then one allocation when they are all strings (a template
 * that grows a prompt piece by piece would otherwise copy it once per "+"). */
static bool eval_add_chain(jctx *c, const jnode *n, jv *out) {
    size_t k = 1;
    for (const jnode *x = n; x->kind == JN_BIN && x->op == JOP_ADD; x = x->a) k++;
    jv *vals = jx_alloc(c, n->line, k * sizeof *vals);
    const jnode **lines = jx_alloc(c, n->line, k * sizeof *lines);
    if (!vals || !lines) return false;
    size_t i = k;
    const jnode *x = n;
    for (; x->kind == JN_BIN && x->op == JOP_ADD; x = x->a) lines[--i] = x;
    lines[0] = x;
    if (!eval(c, x, &vals[0])) return false;
    bool all_str = vals[0].kind == JV_STR;
    size_t total = vals[0].kind == JV_STR ? vals[0].s.n : 0;
    for (i = 1; i < k; i++) {
        if (!eval(c, lines[i]->b, &vals[i])) return false;
        all_str &= vals[i].kind == JV_STR;
        if (vals[i].kind == JV_STR) total += vals[i].s.n;
    }
    if (all_str) {
        char *s = jx_alloc(c, n->line, total + 1);
        if (!s) return false;
        size_t off = 0;
        for (i = 0; i < k; i++) {
            if (vals[i].s.n) memcpy(s + off, vals[i].s.p, vals[i].s.n);
            off += vals[i].s.n;
        }
        *out = (jv){.kind = JV_STR, .s = {s, total}};
        return true;
    }
    jv acc = vals[0];
    for (i = 1; i < k; i++)
        if (!arith(c, lines[i]->line, JOP_ADD, &acc, &vals[i], &acc)) return false;
    *out = acc;
    return true;
}

static int compare_values(const jv *a, const jv *b, bool *ok) {
    double fa = 0, fb = 0;
    int64_t ia = 0, ib = 0;
    bool inta, intb;
    *ok = true;
    if (as_number(a, &fa, &ia, &inta) && as_number(b, &fb, &ib, &intb)) {
        if (inta && intb) return ia < ib ? -1 : ia > ib;
        if (inta) fa = (double)ia;
        if (intb) fb = (double)ib;
        return fa < fb ? -1 : fa > fb;
    }
    if (a->kind == JV_STR && b->kind == JV_STR) {
        size_t m = a->s.n < b->s.n ? a->s.n : b->s.n;
        int r = m ? memcmp(a->s.p, b->s.p, m) : 0;
        if (r) return r < 0 ? -1 : 1;
        return a->s.n < b->s.n ? -1 : a->s.n > b->s.n;
    }
    *ok = false;
    return 0;
}

static bool contains(jctx *c, int line, const jv *item, const jv *seq, bool *out) {
    *out = false;
    if (seq->kind == JV_STR) {
        if (item->kind != JV_STR)
            return jx_fail(c, DUET_ERR_INVALID, line,
                           "'in <string>' requires a string as left operand, not '%s'",
                           jv_type_name(item));
        *out = item->s.n == 0 || (seq->s.n && memmem(seq->s.p, seq->s.n, item->s.p, item->s.n));
        return true;
    }
    if (seq->kind == JV_UNDEF) return true;
    if (seq->kind == JV_NS || seq->kind == JV_LOOP || seq->kind == JV_NONE ||
        seq->kind == JV_BOOL || seq->kind == JV_INT || seq->kind == JV_FLOAT ||
        seq->kind == JV_MACRO || seq->kind == JV_FUNC)
        return jx_fail(c, DUET_ERR_INVALID, line, "argument of type '%s' is not iterable",
                       jv_type_name(seq));
    jv *items;
    size_t n;
    if (!jv_iterate(c, line, seq, &items, &n)) return false;
    for (size_t i = 0; i < n && !*out; i++) *out = jv_equal(item, &items[i]);
    return true;
}

static bool eval_cmp(jctx *c, const jnode *n, jv *out) {
    jv a, b;
    if (!eval(c, n->a, &a) || !eval(c, n->b, &b)) return false;
    bool r;
    switch (n->op) {
    case JOP_EQ:
        r = jv_equal(&a, &b);
        break;
    case JOP_NE:
        r = !jv_equal(&a, &b);
        break;
    case JOP_IN:
    case JOP_NOTIN:
        if (!contains(c, n->line, &a, &b, &r)) return false;
        if (n->op == JOP_NOTIN) r = !r;
        break;
    default: {
        bool ok;
        if (a.kind == JV_UNDEF) return undefined_error(c, n->line, &a);
        if (b.kind == JV_UNDEF) return undefined_error(c, n->line, &b);
        int k = compare_values(&a, &b, &ok);
        if (!ok) {
            static const char *const names[] = {"<", "<=", ">", ">="};
            return jx_fail(c, DUET_ERR_INVALID, n->line, "'%s' not supported between '%s' and '%s'",
                           names[n->op - JOP_LT], jv_type_name(&a), jv_type_name(&b));
        }
        r = n->op == JOP_LT ? k < 0 : n->op == JOP_LE ? k <= 0 : n->op == JOP_GT ? k > 0 : k >= 0;
    }
    }
    *out = (jv){.kind = JV_BOOL, .b = r};
    return true;
}

/* Python's slice indices for a sequence of n items. */
static size_t slice_indices(int64_t n, const jv *lo, const jv *hi, int64_t step, int64_t *start,
                            int64_t *stop) {
    bool has_lo = lo->kind == JV_INT, has_hi = hi->kind == JV_INT;
    int64_t a = has_lo ? lo->i : 0, b = has_hi ? hi->i : 0;
    if (step > 0) {
        a = !has_lo ? 0 : a < 0 ? (a + n < 0 ? 0 : a + n) : (a > n ? n : a);
        b = !has_hi ? n : b < 0 ? (b + n < 0 ? 0 : b + n) : (b > n ? n : b);
        *start = a;
        *stop = b;
        return b > a ? (size_t)((b - a + step - 1) / step) : 0;
    }
    a = !has_lo ? n - 1 : a < 0 ? (a + n < -1 ? -1 : a + n) : (a >= n ? n - 1 : a);
    b = !has_hi ? -1 : b < 0 ? (b + n < -1 ? -1 : b + n) : (b >= n ? n - 1 : b);
    *start = a;
    *stop = b;
    return a > b ? (size_t)((a - b - step - 1) / -step) : 0;
}

static bool slice_arg(jctx *c, const jnode *x, jv *v) {
    if (!x) {
        *v = (jv){.kind = JV_NONE};
        return true;
    }
    if (!eval(c, x, v)) return false;
    if (v->kind == JV_BOOL) *v = (jv){.kind = JV_INT, .i = v->b};
    if (v->kind != JV_INT && v->kind != JV_NONE)
        return jx_fail(c, DUET_ERR_INVALID, x->line,
                       "slice indices must be integers or none, not '%s'", jv_type_name(v));
    return true;
}

static bool eval_slice(jctx *c, const jnode *n, jv *out) {
    jv obj, lo, hi, st;
    if (!eval(c, n->a, &obj) || !slice_arg(c, n->b, &lo) || !slice_arg(c, n->c, &hi) ||
        !slice_arg(c, n->d, &st))
        return false;
    int64_t step = st.kind == JV_INT ? st.i : 1;
    if (step == 0) return jx_fail(c, DUET_ERR_INVALID, n->line, "slice step cannot be zero");
    if (obj.kind == JV_UNDEF) return undefined_error(c, n->line, &obj);
    if (obj.kind != JV_STR && obj.kind != JV_LIST &&
        !(obj.kind == JV_JSON && cJSON_IsArray(obj.j))) {
        *out = (jv){.kind = JV_UNDEF};
        return true;
    }
    jv *items;
    size_t len;
    if (!jv_iterate(c, n->line, &obj, &items, &len)) return false;
    int64_t a, b;
    size_t k = slice_indices((int64_t)len, &lo, &hi, step, &a, &b);
    if (obj.kind == JV_STR) {
        if (step == 1) {
            /* characters are views into the string: one substring */
            const char *p = k ? items[a].s.p : obj.s.p;
            size_t bytes = k ? (size_t)(items[b - 1].s.p + items[b - 1].s.n - p) : 0;
            *out = (jv){.kind = JV_STR, .s = {p, bytes}};
            return true;
        }
        size_t bytes = 0;
        for (size_t i = 0; i < k; i++) bytes += items[a + (int64_t)i * step].s.n;
        char *s = jx_alloc(c, n->line, bytes + 1);
        if (!s) return false;
        size_t off = 0;
        for (size_t i = 0; i < k; i++) {
            const jv *ch = &items[a + (int64_t)i * step];
            memcpy(s + off, ch->s.p, ch->s.n);
            off += ch->s.n;
        }
        *out = (jv){.kind = JV_STR, .s = {s, bytes}};
        return true;
    }
    jlist *l = jx_alloc(c, n->line, sizeof *l);
    if (!l || (k && !(l->v = jx_alloc(c, n->line, k * sizeof *l->v)))) return false;
    for (size_t i = 0; i < k; i++) l->v[i] = items[a + (int64_t)i * step];
    l->n = k;
    *out = (jv){.kind = JV_LIST, .l = l};
    return true;
}

static bool call_macro(jctx *c, const jnode *call, const jnode *m, const jv *args, const jv *kwvals,
                       jv *out);

static bool eval_args(jctx *c, const jnode *n, jv **args, jv **kwvals) {
    *args = *kwvals = NULL;
    if (n->n_args && !(*args = jx_alloc(c, n->line, n->n_args * sizeof **args))) return false;
    if (n->n_kw && !(*kwvals = jx_alloc(c, n->line, n->n_kw * sizeof **kwvals))) return false;
    for (size_t i = 0; i < n->n_args; i++)
        if (!eval(c, n->args[i], &(*args)[i])) return false;
    for (size_t i = 0; i < n->n_kw; i++)
        if (!eval(c, n->kwvals[i], &(*kwvals)[i])) return false;
    return true;
}

static bool eval_call(jctx *c, const jnode *n, jv *out) {
    jv fn, *args, *kwvals;
    if (!eval(c, n->a, &fn) || !eval_args(c, n, &args, &kwvals)) return false;
    if (fn.kind == JV_MACRO) return call_macro(c, n, fn.macro, args, kwvals, out);
    if (fn.kind == JV_FUNC)
        return jinja_call_builtin(c, n->line, &fn, args, n->n_args, n->kwnames, kwvals, n->n_kw,
                                  out);
    if (fn.kind == JV_UNDEF) return undefined_error(c, n->line, &fn);
    return jx_fail(c, DUET_ERR_INVALID, n->line, "'%s' object is not callable", jv_type_name(&fn));
}

static bool eval(jctx *c, const jnode *n, jv *out) {
    switch (n->kind) {
    case JN_LIT:
        *out = n->lit;
        return true;
    case JN_NAME:
        return lookup(c, n->line, n->name, out);
    case JN_ATTR: {
        jv obj;
        return eval(c, n->a, &obj) && jv_getattr(c, n->line, &obj, n->name, out);
    }
    case JN_ITEM: {
        jv obj, key;
        return eval(c, n->a, &obj) && eval(c, n->b, &key) &&
               jv_getitem(c, n->line, &obj, &key, out);
    }
    case JN_SLICE:
        return eval_slice(c, n, out);
    case JN_CALL:
        return eval_call(c, n, out);
    case JN_FILTER: {
        jv subject, *args, *kwvals;
        return eval(c, n->a, &subject) && eval_args(c, n, &args, &kwvals) &&
               jinja_apply_filter(c, n, &subject, args, n->n_args, kwvals, out);
    }
    case JN_TEST: {
        jv subject, *args, *kwvals;
        bool r;
        if (!eval(c, n->a, &subject) || !eval_args(c, n, &args, &kwvals) ||
            !jinja_apply_test(c, n, &subject, args, n->n_args, &r))
            return false;
        *out = (jv){.kind = JV_BOOL, .b = r != n->negated};
        return true;
    }
    case JN_NOT: {
        jv v;
        if (!eval(c, n->a, &v)) return false;
        *out = (jv){.kind = JV_BOOL, .b = !jv_truthy(&v)};
        return true;
    }
    case JN_NEG:
    case JN_POS: {
        jv v;
        if (!eval(c, n->a, &v)) return false;
        if (v.kind == JV_BOOL) v = (jv){.kind = JV_INT, .i = v.b};
        if (v.kind == JV_INT && n->kind == JN_NEG) {
            if (v.i == INT64_MIN)
                return jx_fail(c, DUET_ERR_UNSUPPORTED, n->line,
                               "integer result of - does not fit in 64 bits");
            v.i = -v.i;
        } else if (v.kind == JV_FLOAT && n->kind == JN_NEG) {
            v.f = -v.f;
        } else if (v.kind == JV_UNDEF) {
            return undefined_error(c, n->line, &v);
        } else if (v.kind != JV_INT && v.kind != JV_FLOAT) {
            return jx_fail(c, DUET_ERR_INVALID, n->line, "bad operand type for unary %s: '%s'",
                           n->kind == JN_NEG ? "-" : "+", jv_type_name(&v));
        }
        *out = v;
        return true;
    }
    case JN_BIN: {
        if (n->op == JOP_ADD) return eval_add_chain(c, n, out);
        jv a, b;
        return eval(c, n->a, &a) && eval(c, n->b, &b) && arith(c, n->line, n->op, &a, &b, out);
    }
    case JN_CMP:
        return eval_cmp(c, n, out);
    case JN_AND:
    case JN_OR:
        /* Python returns the deciding operand itself */
        if (!eval(c, n->a, out)) return false;
        if (jv_truthy(out) == (n->kind == JN_OR)) return true;
        return eval(c, n->b, out);
    case JN_CONCAT: {
        strbuf b = {0};
        bool ok = true;
        for (size_t i = 0; ok && i < n->n_args; i++) {
            jv v;
            ok = eval(c, n->args[i], &v) && jv_write_str(c, n->line, &v, &b);
        }
        ok = ok && (!b.oom || jx_fail(c, DUET_ERR_NO_MEMORY, n->line, "out of memory")) &&
             jx_str(c, n->line, b.p ? b.p : "", b.len, out);
        strbuf_free(&b);
        return ok;
    }
    case JN_COND: {
        jv cond;
        if (!eval(c, n->a, &cond)) return false;
        if (jv_truthy(&cond)) return eval(c, n->b, out);
        if (n->c) return eval(c, n->c, out);
        *out = (jv){.kind = JV_UNDEF};
        return true;
    }
    case JN_LIST:
    case JN_TUPLE: {
        jlist *l = jx_alloc(c, n->line, sizeof *l);
        if (!l || (n->n_args && !(l->v = jx_alloc(c, n->line, n->n_args * sizeof *l->v))))
            return false;
        for (size_t i = 0; i < n->n_args; i++)
            if (!eval(c, n->args[i], &l->v[i])) return false;
        l->n = n->n_args;
        *out = (jv){.kind = JV_LIST, .tuple = n->kind == JN_TUPLE, .l = l};
        return true;
    }
    case JN_DICT: {
        jdict *d = jx_alloc(c, n->line, sizeof *d);
        size_t k = n->n_args;
        if (!d || (k && (!(d->k = jx_alloc(c, n->line, k * sizeof *d->k)) ||
                         !(d->v = jx_alloc(c, n->line, k * sizeof *d->v)))))
            return false;
        for (size_t i = 0; i < k; i++) {
            jv key, val;
            if (!eval(c, n->args[i], &key) || !eval(c, n->kwvals[i], &val)) return false;
            /* a repeated key keeps its first place and takes the last value, as in Python */
            size_t j;
            for (j = 0; j < d->n && !jv_equal(&d->k[j], &key); j++) {
            }
            d->k[j] = j < d->n ? d->k[j] : key;
            d->v[j] = val;
            if (j == d->n) d->n++;
        }
        *out = (jv){.kind = JV_DICT, .d = d};
        return true;
    }
    default:
        return jx_fail(c, DUET_ERR_INTERNAL, n->line, "node %d is not an expression", n->kind);
    }
}

/* ---- macros ---------------------------------------------------------------------------------- */

/* Runs body with its output captured into a string value. */
static bool capture(jctx *c, int line, jnode *const *body, size_t n, jv *out) {
    strbuf b = {0}, *saved = c->out;
    size_t saved_base = c->out_base;
    c->out = &b;
    c->out_base = 0;
    bool ok = exec_body(c, body, n);
    c->out = saved;
    c->out_base = saved_base;
    ok = ok && jx_str(c, line, b.p ? b.p : "", b.len, out);
    strbuf_free(&b);
    return ok;
}

/* A macro runs in its own frame over the template's top level (jinja2 macros see the
 * template's variables as they are when called, not the caller's locals). */
static bool call_macro(jctx *c, const jnode *call, const jnode *m, const jv *args, const jv *kwvals,
                       jv *out) {
    int line = call->line;
    if (call->n_args > m->n_names)
        return jx_fail(c, DUET_ERR_INVALID, line, "macro '%.*s' takes at most %zu argument(s)",
                       (int)m->name.n, m->name.p, m->n_names);
    if (c->depth >= c->max_depth)
        return jx_fail(c, DUET_ERR_TOO_LONG, line, "macro calls nested more than %d deep",
                       c->max_depth);
    if (!jx_step(c, line, 1)) return false;
    jframe f = {.parent = c->top}, *saved = c->frame;
    c->frame = &f;
    c->depth++;
    bool ok = true;
    for (size_t k = 0; ok && k < call->n_kw; k++) {
        size_t p;
        for (p = 0; p < m->n_names; p++)
            if (m->names[p].n == call->kwnames[k].n &&
                !memcmp(m->names[p].p, call->kwnames[k].p, m->names[p].n))
                break;
        if (p == m->n_names)
            ok = jx_fail(c, DUET_ERR_INVALID, line, "macro '%.*s' has no argument '%.*s'",
                         (int)m->name.n, m->name.p, (int)call->kwnames[k].n, call->kwnames[k].p);
        else if (p < call->n_args)
            ok = jx_fail(c, DUET_ERR_INVALID, line, "macro '%.*s' got argument '%.*s' twice",
                         (int)m->name.n, m->name.p, (int)call->kwnames[k].n, call->kwnames[k].p);
    }
    for (size_t p = 0; ok && p < m->n_names; p++) {
        jv v = {.kind = JV_UNDEF, .s = m->names[p]};
        if (p < call->n_args) {
            v = args[p];
        } else {
            size_t k;
            for (k = 0; k < call->n_kw; k++)
                if (m->names[p].n == call->kwnames[k].n &&
                    !memcmp(m->names[p].p, call->kwnames[k].p, m->names[p].n))
                    break;
            if (k < call->n_kw)
                v = kwvals[k];
            else if (m->kwvals[p])
                ok = eval(c, m->kwvals[p], &v);
        }
        ok = ok && frame_set(c, line, &f, m->names[p], &v);
    }
    ok = ok && capture(c, line, m->body, m->n_body, out);
    c->ctl = 0;
    c->depth--;
    c->frame = saved;
    return ok;
}

/* ---- statements ---------------------------------------------------------------------------- */

/* Binds a value that lives as long as the frame does (a loop's items) without copying it. */
static bool frame_bind(jctx *c, int line, jframe *f, jstr name, const jv *v) {
    jslot *s = slot_find(f->slots, f->n, name);
    if (!s) {
        jv none = {.kind = JV_NONE};
        if (!frame_set(c, line, f, name, &none)) return false;
        s = slot_find(f->slots, f->n, name);
    }
    s->val = *v;
    s->live = true;
    return true;
}

static bool assign_targets(jctx *c, int line, jframe *f, const jstr *names, size_t n, const jv *v,
                           bool bind) {
    if (n == 1)
        return bind ? frame_bind(c, line, f, names[0], v) : frame_set(c, line, f, names[0], v);
    jv *items;
    size_t k;
    if (v->kind == JV_UNDEF) return undefined_error(c, line, v);
    if (!jv_iterate(c, line, v, &items, &k)) return false;
    if (k != n)
        return jx_fail(c, DUET_ERR_INVALID, line, "cannot unpack %zu value(s) into %zu names", k,
                       n);
    for (size_t i = 0; i < n; i++)
        if (!(bind ? frame_bind(c, line, f, names[i], &items[i])
                   : frame_set(c, line, f, names[i], &items[i])))
            return false;
    return true;
}

static bool exec_for(jctx *c, const jnode *n) {
    jv seq, *items;
    size_t len;
    if (!eval(c, n->a, &seq)) return false;
    if (!jv_iterate(c, n->line, &seq, &items, &len)) return false;
    jframe f = {.parent = c->frame}, *saved = c->frame;
    static const jstr LOOP = {"loop", 4};
    bool ok = true;
    if (n->b) {
        /* "for x in xs if cond": the loop runs over the items that pass (loop.length counts
         * those only) */
        size_t kept = 0;
        c->frame = &f;
        for (size_t i = 0; ok && i < len; i++) {
            jv cond;
            for (size_t s = 0; s < f.n; s++) f.slots[s].live = false;
            ok = jx_step(c, n->line, 1) &&
                 assign_targets(c, n->line, &f, n->names, n->n_names, &items[i], true) &&
                 eval(c, n->b, &cond);
            if (ok && jv_truthy(&cond)) items[kept++] = items[i];
        }
        c->frame = saved;
        len = kept;
    }
    if (!ok) return false;
    if (len == 0) return exec_body(c, n->orelse, n->n_orelse);
    jloop loop = {0, len, items};
    jv loop_v = {.kind = JV_LOOP, .loop = &loop};
    c->frame = &f;
    for (size_t i = 0; ok && i < len; i++) {
        loop.i = i;
        for (size_t s = 0; s < f.n; s++) f.slots[s].live = false;
        ok = jx_step(c, n->line, 1) &&
             assign_targets(c, n->line, &f, n->names, n->n_names, &items[i], true) &&
             frame_bind(c, n->line, &f, LOOP, &loop_v) && exec_body(c, n->body, n->n_body);
        if (c->ctl == JN_BREAK) {
            c->ctl = 0;
            break;
        }
        c->ctl = 0;
    }
    c->frame = saved;
    return ok;
}

static bool exec_set(jctx *c, const jnode *n) {
    jv v;
    if (n->kind == JN_SET_BLOCK) {
        if (!capture(c, n->line, n->body, n->n_body, &v)) return false;
    } else if (!eval(c, n->c, &v)) {
        return false;
    }
    if (!n->op) return assign_targets(c, n->line, c->frame, n->names, n->n_names, &v, false);
    jv ns;
    if (!lookup(c, n->line, n->names[0], &ns)) return false;
    if (ns.kind != JV_NS)
        return jx_fail(c, DUET_ERR_INVALID, n->line,
                       "cannot assign attribute on non-namespace object '%.*s' (%s)",
                       (int)n->names[0].n, n->names[0].p, jv_type_name(&ns));
    return jx_slot_set(c, n->line, &ns.ns->slots, &ns.ns->n, &ns.ns->cap, n->name, &v);
}

static bool exec(jctx *c, const jnode *n) {
    ja_mark mark = ja_save(&c->tmp);
    bool ok = true;
    switch (n->kind) {
    case JN_DATA:
        ok = emit(c, n->line, n->name.p, n->name.n);
        break;
    case JN_OUTPUT: {
        jv v;
        strbuf b = {0};
        ok = eval(c, n->a, &v);
        if (ok && v.kind == JV_STR) {
            ok = emit(c, n->line, v.s.p, v.s.n);
        } else if (ok) {
            ok = jv_write_str(c, n->line, &v, &b) &&
                 (!b.oom || jx_fail(c, DUET_ERR_NO_MEMORY, n->line, "out of memory")) &&
                 emit(c, n->line, b.p ? b.p : "", b.len);
            strbuf_free(&b);
        }
        break;
    }
    case JN_IF: {
        jv cond;
        ok = eval(c, n->a, &cond);
        bool yes = ok && jv_truthy(&cond);
        ja_release(&c->tmp, mark);
        if (ok) ok = yes ? exec_body(c, n->body, n->n_body) : exec_body(c, n->orelse, n->n_orelse);
        break;
    }
    case JN_FOR:
        ok = exec_for(c, n);
        break;
    case JN_SET:
    case JN_SET_BLOCK:
        ok = exec_set(c, n);
        break;
    case JN_MACRO: {
        jv m = {.kind = JV_MACRO, .macro = n};
        ok = frame_set(c, n->line, c->frame, n->name, &m);
        break;
    }
    case JN_BREAK:
    case JN_CONTINUE:
        c->ctl = n->kind;
        break;
    case JN_BLOCK:
        ok = exec_body(c, n->body, n->n_body);
        break;
    default:
        ok = jx_fail(c, DUET_ERR_INTERNAL, n->line, "node %d is not a statement", n->kind);
    }
    ja_release(&c->tmp, mark);
    return ok;
}

static bool exec_body(jctx *c, jnode *const *body, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (!exec(c, body[i])) return false;
        if (c->ctl) return true;
    }
    return true;
}

duet_status jinja_render(const jinja_template *t, const jinja_var *vars, size_t n_vars,
                         const jinja_limits *limits, strbuf *out, char *err, size_t err_cap) {
    if (err && err_cap) err[0] = '\0';
    if (!t || !out || (n_vars && !vars)) return DUET_ERR_INVALID;
    jinja_limits lim = limits ? *limits : (jinja_limits){0};
    jctx c = {
        .t = t,
        .out = out,
        .out_base = out->len,
        .max_output = lim.max_output ? lim.max_output : DEFAULT_MAX_OUTPUT,
        .max_steps = lim.max_steps ? lim.max_steps : DEFAULT_MAX_STEPS,
        .max_depth = lim.max_depth ? lim.max_depth : DEFAULT_MAX_DEPTH,
        .vars = vars,
        .n_vars = n_vars,
        .err = err,
        .err_cap = err_cap,
    };
    size_t max_memory = lim.max_memory ? lim.max_memory : DEFAULT_MAX_MEMORY;
    c.tmp = (ja_arena){.meter = &c.mem, .limit = max_memory};
    c.keep = (ja_arena){.meter = &c.mem, .limit = max_memory};
    jframe top = {0};
    c.top = c.frame = &top;
    exec_body(&c, t->body, t->n_body);
    ja_free(&c.tmp);
    ja_free(&c.keep);
    return c.st;
}
