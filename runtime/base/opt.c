/* The table-driven command-line parser (opt.h). Matching order for an argument: an exact name
 * or alias (underscores read as dashes), "--no-" before a negatable flag, then a unique prefix
 * of the long names. Values are applied as they are met; environment variables and defaults
 * afterwards, for the options not given. */
#include "base/opt.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"

#define OPT_NAME_MAX 128

typedef struct opt_item {
    opt_spec spec;
    int group;
    bool given;        /* by the command line or opt_set */
    const char **list; /* OPT_LIST values, [list_n] */
    int list_n, list_cap;
} opt_item;

struct opt_parser {
    const char *prog, *usage, *about;
    opt_item *items;
    int n, cap;
    const char **titles;
    int n_groups;
    int max_pos;
    const char *pos_name;
    const char **pos;
    int n_pos;
    bool abbrev;
};

duet_status opt_parser_create(const char *prog, const char *usage, const char *about,
                              opt_parser **p_p) {
    opt_parser *p = calloc(1, sizeof *p);
    if (!p) return DUET_ERR_NO_MEMORY;
    p->prog = prog ? prog : "duet";
    p->usage = usage ? usage : "[options]";
    p->about = about;
    p->abbrev = true;
    *p_p = p;
    return DUET_OK;
}

void opt_parser_destroy(opt_parser *p) {
    if (!p) return;
    for (int i = 0; i < p->n; i++) free(p->items[i].list);
    free(p->items);
    free(p->titles);
    free(p->pos);
    free(p);
}

/* --a_b → --a-b (the part after the leading dashes only). */
static void normalize(const char *in, size_t len, char *out, size_t cap) {
    size_t i = 0, k = 0;
    while (i < len && in[i] == '-' && k + 1 < cap) out[k++] = in[i++];
    for (; i < len && k + 1 < cap; i++) out[k++] = in[i] == '_' ? '-' : in[i];
    out[k] = '\0';
}

/* Calls f for each '|'-separated spelling in the spec (name first). Stops when f returns true. */
static bool each_spelling(const opt_spec *s, bool (*f)(const char *w, size_t n, void *arg),
                          void *arg) {
    if (f(s->name, strlen(s->name), arg)) return true;
    const char *a = s->alias;
    while (a && *a) {
        const char *bar = strchr(a, '|');
        size_t n = bar ? (size_t)(bar - a) : strlen(a);
        if (n && f(a, n, arg)) return true;
        a = bar ? bar + 1 : NULL;
    }
    return false;
}

typedef struct eq_arg {
    const char *want;
} eq_arg;

static bool spelling_eq(const char *w, size_t n, void *arg) {
    char buf[OPT_NAME_MAX];
    normalize(w, n, buf, sizeof buf);
    return !strcmp(buf, ((eq_arg *)arg)->want);
}

static opt_item *find_exact(opt_parser *p, const char *norm) {
    eq_arg a = {norm};
    for (int i = 0; i < p->n; i++)
        if (each_spelling(&p->items[i].spec, spelling_eq, &a)) return &p->items[i];
    return NULL;
}

duet_status opt_add(opt_parser *p, const char *title, const opt_spec *specs, int n) {
    if (p->n + n > p->cap) {
        int cap = p->cap ? p->cap : 32;
        while (cap < p->n + n) cap *= 2;
        opt_item *items = realloc(p->items, (size_t)cap * sizeof *items);
        if (!items) return DUET_ERR_NO_MEMORY;
        p->items = items;
        p->cap = cap;
    }
    const char **titles = realloc(p->titles, (size_t)(p->n_groups + 1) * sizeof *titles);
    if (!titles) return DUET_ERR_NO_MEMORY;
    p->titles = titles;
    p->titles[p->n_groups] = title;
    for (int i = 0; i < n; i++) {
        char norm[OPT_NAME_MAX];
        normalize(specs[i].name, strlen(specs[i].name), norm, sizeof norm);
        if (specs[i].name[0] != '-' || find_exact(p, norm)) {
            LOG_ERROR("opt: option %s declared twice or without a dash", specs[i].name);
            return DUET_ERR_INTERNAL;
        }
        opt_item *it = &p->items[p->n++];
        memset(it, 0, sizeof *it);
        it->spec = specs[i];
        it->group = p->n_groups;
    }
    p->n_groups++;
    return DUET_OK;
}

void opt_allow_positional(opt_parser *p, int max, const char *name) {
    p->max_pos = max;
    p->pos_name = name;
}

void opt_disable_abbrev(opt_parser *p) {
    p->abbrev = false;
}

int opt_positional_count(const opt_parser *p) {
    return p->n_pos;
}

const char *opt_positional(const opt_parser *p, int i) {
    return i >= 0 && i < p->n_pos ? p->pos[i] : NULL;
}

duet_status opt_parse_size(const char *v, long long *out) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (!*v || end == v || errno || !(x >= 0)) return DUET_ERR_INVALID;
    double mul = 1;
    if (*end) {
        char u = (char)tolower((unsigned char)*end);
        mul = u == 'k'   ? 1024.0
              : u == 'm' ? 1048576.0
              : u == 'g' ? 1073741824.0
              : u == 't' ? 1099511627776.0
                         : 0;
        if (mul == 0) return DUET_ERR_INVALID;
        end++;
        if (!strcmp(end, "iB") || !strcmp(end, "ib") || !strcmp(end, "B") || !strcmp(end, "b"))
            end += strlen(end);
        if (*end) return DUET_ERR_INVALID;
    }
    x *= mul;
    if (x > 9.0e18) return DUET_ERR_INVALID;
    *out = (long long)x;
    return DUET_OK;
}

static bool is_number(const char *s) {
    if (!s || !*s) return false;
    char *end;
    errno = 0;
    (void)strtod(s, &end);
    return *end == '\0';
}

static duet_status bad(char *err, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static duet_status bad(char *err, size_t len, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, len, fmt, ap);
    va_end(ap);
    return DUET_ERR_INVALID;
}

static bool has_range(const opt_spec *s) {
    return s->min != 0 || s->max != 0;
}

/* The index of v among the canonical names of choices ("a|b|x=a"), or -1. */
static int choice_index(const char *choices, const char *v) {
    int idx = 0;
    size_t vl = strlen(v);
    /* first pass: canonical names get indices in order */
    const char *c = choices;
    while (c && *c) {
        const char *bar = strchr(c, '|');
        size_t n = bar ? (size_t)(bar - c) : strlen(c);
        const char *eq = memchr(c, '=', n);
        if (!eq) {
            if (n == vl && !memcmp(c, v, n)) return idx;
            idx++;
        }
        c = bar ? bar + 1 : NULL;
    }
    /* second pass: spellings x=y */
    c = choices;
    while (c && *c) {
        const char *bar = strchr(c, '|');
        size_t n = bar ? (size_t)(bar - c) : strlen(c);
        const char *eq = memchr(c, '=', n);
        if (eq && (size_t)(eq - c) == vl && !memcmp(c, v, vl)) {
            char target[OPT_NAME_MAX];
            size_t tl = n - (size_t)(eq - c) - 1;
            if (tl >= sizeof target) return -1;
            memcpy(target, eq + 1, tl);
            target[tl] = '\0';
            return choice_index(choices, target);
        }
        c = bar ? bar + 1 : NULL;
    }
    return -1;
}

/* "a, b, c": the canonical names, for messages and help. */
static void choice_names(const char *choices, char *out, size_t cap) {
    size_t k = 0;
    out[0] = '\0';
    const char *c = choices;
    while (c && *c) {
        const char *bar = strchr(c, '|');
        size_t n = bar ? (size_t)(bar - c) : strlen(c);
        if (!memchr(c, '=', n)) {
            int w = snprintf(out + k, cap - k, "%s%.*s", k ? ", " : "", (int)n, c);
            if (w < 0 || (size_t)w >= cap - k) break;
            k += (size_t)w;
        }
        c = bar ? bar + 1 : NULL;
    }
}

static duet_status list_push(opt_item *it, const char *v) {
    if (it->list_n == it->list_cap) {
        int cap = it->list_cap ? it->list_cap * 2 : 4;
        const char **l = realloc(it->list, (size_t)cap * sizeof *l);
        if (!l) return DUET_ERR_NO_MEMORY;
        it->list = l;
        it->list_cap = cap;
    }
    it->list[it->list_n++] = v;
    opt_list *dst = it->spec.dest;
    if (dst) {
        dst->v = it->list;
        dst->n = it->list_n;
    }
    return DUET_OK;
}

/* Applies one value (NULL for a flag without one). */
static duet_status apply(opt_item *it, const char *v, char *err, size_t len) {
    const opt_spec *s = &it->spec;
    if (s->flags & OPT_IGNORED) return DUET_OK;
    switch (s->type) {
    case OPT_FLAG: {
        bool b = true;
        if (v) {
            if (!strcmp(v, "1") || !strcasecmp(v, "true") || !strcasecmp(v, "yes") ||
                !strcasecmp(v, "on"))
                b = true;
            else if (!strcmp(v, "0") || !strcasecmp(v, "false") || !strcasecmp(v, "no") ||
                     !strcasecmp(v, "off"))
                b = false;
            else
                return bad(err, len, "expected true or false, got '%s'", v);
        }
        if (s->dest) *(bool *)s->dest = b;
        return DUET_OK;
    }
    case OPT_INT:
    case OPT_LONG: {
        char *end;
        errno = 0;
        long long x = strtoll(v, &end, 10);
        double lo = has_range(s) ? s->min : (s->type == OPT_INT ? INT_MIN : (double)LLONG_MIN);
        double hi = has_range(s) ? s->max : (s->type == OPT_INT ? INT_MAX : (double)LLONG_MAX);
        if (!*v || *end || errno || (double)x < lo || (double)x > hi) {
            if (has_range(s))
                return bad(err, len, "expected an integer in [%.0f, %.0f], got '%s'", lo, hi, v);
            return bad(err, len, "expected an integer, got '%s'", v);
        }
        if (s->type == OPT_INT)
            *(int *)s->dest = (int)x;
        else
            *(long long *)s->dest = x;
        return DUET_OK;
    }
    case OPT_DOUBLE: {
        char *end;
        errno = 0;
        double x = strtod(v, &end);
        if (!*v || *end || errno || !isfinite(x) || (has_range(s) && (x < s->min || x > s->max))) {
            if (has_range(s))
                return bad(err, len, "expected a number in [%g, %g], got '%s'", s->min, s->max, v);
            return bad(err, len, "expected a number, got '%s'", v);
        }
        *(double *)s->dest = x;
        return DUET_OK;
    }
    case OPT_STRING:
        *(const char **)s->dest = v;
        return DUET_OK;
    case OPT_CHOICE: {
        int idx = choice_index(s->choices, v);
        if (idx < 0) {
            char names[512];
            choice_names(s->choices, names, sizeof names);
            return bad(err, len, "expected one of %s, got '%s'", names, v);
        }
        *(int *)s->dest = idx;
        return DUET_OK;
    }
    case OPT_SIZE: {
        long long x;
        if (opt_parse_size(v, &x) != DUET_OK)
            return bad(err, len, "expected a size in bytes (e.g. 1073741824, 64k, 8GiB), got '%s'",
                       v);
        *(long long *)s->dest = x;
        return DUET_OK;
    }
    case OPT_LIST:
        if (list_push(it, v) != DUET_OK) return bad(err, len, "out of memory");
        return DUET_OK;
    case OPT_CUSTOM: {
        err[0] = '\0';
        duet_status st = s->parse(s, v, err, len);
        if (st != DUET_OK && !err[0]) snprintf(err, len, "bad value '%s'", v);
        return st;
    }
    }
    return bad(err, len, "internal: unknown option type");
}

static bool takes_value(const opt_spec *s) {
    return s->type != OPT_FLAG;
}

typedef struct lev_arg {
    const char *want; /* without leading dashes */
    int best;
    const char *best_name;
    const opt_spec *spec;
} lev_arg;

static int levenshtein(const char *a, size_t an, const char *b, size_t bn) {
    if (an > 64 || bn > 64) return 99;
    int prev[65], cur[65];
    for (size_t j = 0; j <= bn; j++) prev[j] = (int)j;
    for (size_t i = 1; i <= an; i++) {
        cur[0] = (int)i;
        for (size_t j = 1; j <= bn; j++) {
            int c = prev[j - 1] + (a[i - 1] != b[j - 1]);
            if (prev[j] + 1 < c) c = prev[j] + 1;
            if (cur[j - 1] + 1 < c) c = cur[j - 1] + 1;
            cur[j] = c;
        }
        memcpy(prev, cur, sizeof(int) * (bn + 1));
    }
    return prev[bn];
}

static bool lev_visit(const char *w, size_t n, void *arg) {
    lev_arg *a = arg;
    char buf[OPT_NAME_MAX];
    normalize(w, n, buf, sizeof buf);
    const char *bare = buf;
    while (*bare == '-') bare++;
    int d = levenshtein(a->want, strlen(a->want), bare, strlen(bare));
    if (d < a->best) {
        a->best = d;
        a->best_name = a->spec->name;
    }
    return false;
}

/* The closest long name to an unknown option, if close enough to be a likely typo. */
static const char *suggest(const opt_parser *p, const char *norm) {
    const char *bare = norm;
    while (*bare == '-') bare++;
    lev_arg a = {bare, 1 << 30, NULL, NULL};
    for (int i = 0; i < p->n; i++) {
        if (p->items[i].spec.flags & OPT_HIDDEN) continue;
        a.spec = &p->items[i].spec;
        each_spelling(a.spec, lev_visit, &a);
    }
    int limit = (int)strlen(bare) / 3;
    if (limit < 2) limit = 2;
    if (!strcmp(bare, "help") || !strcmp(bare, "h")) return NULL;
    return a.best <= limit ? a.best_name : NULL;
}

typedef enum match_kind { MATCH_NONE, MATCH_ONE, MATCH_NEGATED, MATCH_AMBIGUOUS } match_kind;

/* Resolves an option spelling (already normalized). */
static match_kind resolve(opt_parser *p, const char *norm, opt_item **it_p, char *amb,
                          size_t amb_len) {
    opt_item *it = find_exact(p, norm);
    if (it) {
        *it_p = it;
        return MATCH_ONE;
    }
    if (!strncmp(norm, "--no-", 5)) {
        char pos[OPT_NAME_MAX];
        snprintf(pos, sizeof pos, "--%s", norm + 5);
        it = find_exact(p, pos);
        if (it && it->spec.type == OPT_FLAG && (it->spec.flags & OPT_NEGATABLE)) {
            *it_p = it;
            return MATCH_NEGATED;
        }
    }
    if (!p->abbrev || strncmp(norm, "--", 2) != 0 || strlen(norm) < 3) return MATCH_NONE;
    /* unique prefix of a long name (or of "--no-<name>" for negatable flags) */
    size_t nl = strlen(norm);
    opt_item *hit = NULL;
    bool neg = false;
    int count = 0;
    size_t k = 0;
    amb[0] = '\0';
    for (int i = 0; i < p->n; i++) {
        opt_item *c = &p->items[i];
        char full[OPT_NAME_MAX];
        normalize(c->spec.name, strlen(c->spec.name), full, sizeof full);
        bool m = !strncmp(full, norm, nl), mn = false;
        if (!m && c->spec.type == OPT_FLAG && (c->spec.flags & OPT_NEGATABLE)) {
            char nf[OPT_NAME_MAX + 4];
            snprintf(nf, sizeof nf, "--no-%s", full + 2);
            mn = !strncmp(nf, norm, nl);
        }
        if (m || mn) {
            count++;
            hit = c;
            neg = mn;
            if (k + 2 < amb_len) {
                int w = snprintf(amb + k, amb_len - k, "%s%s%s", count > 1 ? ", " : "",
                                 mn ? "--no-" : "", mn ? full + 2 : full);
                if (w > 0) k += (size_t)w < amb_len - k ? (size_t)w : amb_len - k - 1;
            }
        }
    }
    if (count == 1) {
        *it_p = hit;
        return neg ? MATCH_NEGATED : MATCH_ONE;
    }
    return count > 1 ? MATCH_AMBIGUOUS : MATCH_NONE;
}

static void ignored_note(const opt_spec *s) {
    LOG_INFO("%s: accepted for vLLM compatibility and ignored: %s", s->name,
             s->help ? s->help : "it has no meaning for duet");
}

/* The first non-empty variable of a '|'-separated list; its name in name. */
static const char *env_value(const char *list, char *name, size_t cap) {
    const char *e = list;
    while (e && *e) {
        const char *bar = strchr(e, '|');
        size_t n = bar ? (size_t)(bar - e) : strlen(e);
        if (n < cap) {
            memcpy(name, e, n);
            name[n] = '\0';
            const char *v = getenv(name);
            if (v && *v) return v;
        }
        e = bar ? bar + 1 : NULL;
    }
    return NULL;
}

int opt_parse(opt_parser *p, int argc, char **argv) {
    char err[600];
    bool only_pos = false;
    free(p->pos);
    p->pos = calloc((size_t)(argc > 0 ? argc : 1), sizeof *p->pos);
    p->n_pos = 0;
    if (!p->pos) {
        fprintf(stderr, "%s: out of memory\n", p->prog);
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (only_pos || a[0] != '-' || !strcmp(a, "-") || (is_number(a) && !find_exact(p, a))) {
            if (p->n_pos >= p->max_pos) {
                if (p->max_pos == 0)
                    fprintf(stderr, "%s: unexpected argument '%s' (options start with --)\n",
                            p->prog, a);
                else
                    fprintf(stderr, "%s: unexpected argument '%s' (only %d %s expected)\n", p->prog,
                            a, p->max_pos, p->pos_name ? p->pos_name : "arguments");
                return 2;
            }
            p->pos[p->n_pos++] = a;
            continue;
        }
        if (!strcmp(a, "--")) {
            only_pos = true;
            continue;
        }
        const char *eq = strchr(a, '=');
        size_t nlen = eq ? (size_t)(eq - a) : strlen(a);
        char norm[OPT_NAME_MAX];
        if (nlen >= sizeof norm) {
            fprintf(stderr, "%s: unknown option %.40s...\n", p->prog, a);
            return 2;
        }
        normalize(a, nlen, norm, sizeof norm);
        opt_item *it = NULL;
        char amb[400];
        match_kind mk = resolve(p, norm, &it, amb, sizeof amb);
        if (mk == MATCH_NONE && (!strcmp(norm, "--help") || !strcmp(norm, "-h"))) {
            opt_print_help(p, stdout);
            return 1;
        }
        if (mk == MATCH_AMBIGUOUS) {
            fprintf(stderr, "%s: ambiguous option %s could match %s\n", p->prog, norm, amb);
            return 2;
        }
        if (mk == MATCH_NONE) {
            const char *s = suggest(p, norm);
            if (s)
                fprintf(stderr, "%s: unknown option %s (did you mean %s?)\n", p->prog, norm, s);
            else
                fprintf(stderr, "%s: unknown option %s (see %s --help)\n", p->prog, norm, p->prog);
            return 2;
        }
        const opt_spec *s = &it->spec;
        if (mk == MATCH_NEGATED) {
            if (eq) {
                fprintf(stderr, "%s: %s takes no value\n", p->prog, norm);
                return 2;
            }
            if (s->flags & OPT_IGNORED)
                ignored_note(s);
            else if (s->dest)
                *(bool *)s->dest = false;
            it->given = true;
            continue;
        }
        if (s->flags & OPT_IGNORED) ignored_note(s);
        if (!takes_value(s)) {
            if (apply(it, eq ? eq + 1 : NULL, err, sizeof err) != DUET_OK) {
                fprintf(stderr, "%s: %s: %s\n", p->prog, s->name, err);
                return 2;
            }
            it->given = true;
            continue;
        }
        if (s->type == OPT_LIST && !it->given) {
            it->list_n = 0; /* the first use starts the list; repeats and opt_set add to it */
        }
        const char *v = eq ? eq + 1 : NULL;
        if (!v) {
            if (i + 1 >= argc) {
                fprintf(stderr, "%s: %s needs a value\n", p->prog, s->name);
                return 2;
            }
            const char *next = argv[i + 1];
            if (next[0] == '-' && next[1] && !is_number(next)) {
                char nn[OPT_NAME_MAX];
                normalize(next, strcspn(next, "="), nn, sizeof nn);
                opt_item *other = NULL;
                char amb2[8];
                if (resolve(p, nn, &other, amb2, sizeof amb2) != MATCH_NONE ||
                    !strcmp(nn, "--help")) {
                    fprintf(stderr, "%s: %s needs a value\n", p->prog, s->name);
                    return 2;
                }
            }
            v = argv[++i];
        }
        if (apply(it, v, err, sizeof err) != DUET_OK) {
            fprintf(stderr, "%s: %s: %s\n", p->prog, s->name, err);
            return 2;
        }
        it->given = true;
        if (s->type == OPT_LIST && !eq) {
            /* nargs="+": every following argument up to the next option */
            while (i + 1 < argc && (argv[i + 1][0] != '-' || is_number(argv[i + 1]))) {
                if (apply(it, argv[++i], err, sizeof err) != DUET_OK) {
                    fprintf(stderr, "%s: %s: %s\n", p->prog, s->name, err);
                    return 2;
                }
            }
        }
    }
    /* environment, then defaults, for what the command line left alone */
    for (int i = 0; i < p->n; i++) {
        opt_item *it = &p->items[i];
        const opt_spec *s = &it->spec;
        if (it->given || (s->flags & OPT_IGNORED) || !s->dest) continue;
        char ename[OPT_NAME_MAX];
        const char *ev = env_value(s->env, ename, sizeof ename);
        if (ev) {
            it->list_n = 0;
            if (apply(it, ev, err, sizeof err) != DUET_OK) {
                fprintf(stderr, "%s: %s (for %s): %s\n", p->prog, ename, s->name, err);
                return 2;
            }
            continue;
        }
        if (s->def && !(s->type == OPT_LIST && it->list_n > 0)) {
            if (apply(it, s->def, err, sizeof err) != DUET_OK) {
                fprintf(stderr, "%s: internal: default of %s: %s\n", p->prog, s->name, err);
                return 2;
            }
        }
    }
    return 0;
}

duet_status opt_set(opt_parser *p, const char *name, const char *const *values, int n_values,
                    char *err, size_t err_len) {
    char full[OPT_NAME_MAX], norm[OPT_NAME_MAX];
    snprintf(full, sizeof full, "%s%s", name[0] == '-' ? "" : "--", name);
    normalize(full, strlen(full), norm, sizeof norm);
    opt_item *it = find_exact(p, norm);
    if (!it) {
        snprintf(err, err_len, "unknown setting '%s'", name);
        return DUET_ERR_NOT_FOUND;
    }
    const opt_spec *s = &it->spec;
    if (s->type != OPT_LIST && n_values != 1 && !(s->type == OPT_FLAG && n_values == 0)) {
        snprintf(err, err_len, "%s takes one value", name);
        return DUET_ERR_INVALID;
    }
    if (s->flags & OPT_IGNORED) ignored_note(s);
    if (s->type == OPT_LIST) { /* no values: an empty list (a file's "key": []) */
        it->list_n = 0;
        if (s->dest) ((opt_list *)s->dest)->n = 0;
    }
    char why[500];
    for (int i = 0; i < n_values || (i == 0 && n_values == 0 && s->type == OPT_FLAG); i++) {
        if (apply(it, n_values ? values[i] : NULL, why, sizeof why) != DUET_OK) {
            snprintf(err, err_len, "%s: %s", name, why);
            return DUET_ERR_INVALID;
        }
    }
    it->given = true;
    return DUET_OK;
}

bool opt_given(const opt_parser *p, const char *name) {
    char norm[OPT_NAME_MAX];
    normalize(name, strlen(name), norm, sizeof norm);
    opt_item *it = find_exact((opt_parser *)p, norm);
    return it && it->given;
}

static const char *default_metavar(const opt_spec *s) {
    if (s->metavar) return s->metavar;
    switch (s->type) {
    case OPT_INT:
    case OPT_LONG:
        return "N";
    case OPT_DOUBLE:
        return "X";
    case OPT_SIZE:
        return "BYTES";
    case OPT_LIST:
        return "VALUE...";
    case OPT_CHOICE:
        return "{...}";
    default:
        return "VALUE";
    }
}

/* Writes text wrapped at 100 columns, continuation lines indented by indent. */
static void wrap(FILE *f, const char *text, int col, int indent) {
    const char *w = text;
    while (*w) {
        while (*w == ' ') w++;
        size_t n = strcspn(w, " ");
        if (!n) break;
        if (col + 1 + (int)n > 100 && col > indent) {
            fprintf(f, "\n%*s", indent, "");
            col = indent;
        } else if (col > indent) {
            fputc(' ', f);
            col++;
        }
        fwrite(w, 1, n, f);
        col += (int)n;
        w += n;
    }
}

void opt_print_help(const opt_parser *p, FILE *f) {
    fprintf(f, "usage: %s %s\n", p->prog, p->usage);
    if (p->about) {
        fputc('\n', f);
        wrap(f, p->about, 0, 0);
        fputc('\n', f);
    }
    for (int g = 0; g < p->n_groups; g++) {
        bool any = false;
        for (int i = 0; i < p->n; i++) {
            const opt_item *it = &p->items[i];
            const opt_spec *s = &it->spec;
            if (it->group != g || (s->flags & OPT_HIDDEN)) continue;
            if (!any) fprintf(f, "\n%s:\n", p->titles[g] ? p->titles[g] : "options");
            any = true;
            char left[256];
            int k = snprintf(left, sizeof left, "  ");
            const char *a = s->alias;
            while (a && *a) {
                const char *bar = strchr(a, '|');
                int n = bar ? (int)(bar - a) : (int)strlen(a);
                k += snprintf(left + k, sizeof left - (size_t)k, "%.*s, ", n, a);
                a = bar ? bar + 1 : NULL;
            }
            if (s->type == OPT_FLAG && (s->flags & OPT_NEGATABLE))
                k += snprintf(left + k, sizeof left - (size_t)k, "--[no-]%s", s->name + 2);
            else
                k += snprintf(left + k, sizeof left - (size_t)k, "%s", s->name);
            if (s->type == OPT_CHOICE && !s->metavar) {
                char names[200];
                choice_names(s->choices, names, sizeof names);
                for (char *c = names; *c; c++)
                    if (*c == ' ') memmove(c, c + 1, strlen(c));
                snprintf(left + k, sizeof left - (size_t)k, " {%s}", names);
            } else if (takes_value(s)) {
                snprintf(left + k, sizeof left - (size_t)k, " %s", default_metavar(s));
            }
            char extra[400] = "";
            if (s->help) snprintf(extra, sizeof extra, "%s", s->help);
            size_t el = strlen(extra);
            if (s->def && takes_value(s))
                el += (size_t)snprintf(extra + el, sizeof extra - el, " (default %s)", s->def);
            if (s->env) {
                char envs[200];
                snprintf(envs, sizeof envs, "%s", s->env);
                for (char *c = envs; *c; c++)
                    if (*c == '|') *c = ',';
                el += (size_t)snprintf(extra + el, sizeof extra - el, " [env %s]", envs);
            }
            if (s->flags & OPT_IGNORED)
                snprintf(extra + el, sizeof extra - el, " [accepted, ignored]");
            fputs(left, f);
            int col = (int)strlen(left);
            if (!extra[0]) {
                fputc('\n', f);
                continue;
            }
            if (col >= 30) {
                fprintf(f, "\n%*s", 32, "");
                col = 32;
            } else {
                fprintf(f, "%*s", 32 - col, "");
                col = 32;
            }
            wrap(f, extra, col - 1, 32);
            fputc('\n', f);
        }
    }
    fprintf(f, "\n  -h, --help%*sshow this help and exit\n", 20, "");
}
