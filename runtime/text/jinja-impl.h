/* Internals of the Jinja interpreter shared by its parser (jinja_parse.c), evaluator
 * (jinja_render.c) and built-ins (jinja_builtins.c): the syntax tree, runtime values, arenas.
 * Nothing here is for other modules; jinja.h is the interface. */
#ifndef DUET_JINJA_IMPL_H
#define DUET_JINJA_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/strbuf.h"
#include "text/jinja.h"

/* ---- arenas: bump allocation in chunks, released all at once or back to a mark ---------- */

typedef struct ja_chunk ja_chunk;
typedef struct ja_arena {
    ja_chunk *head;
    size_t total;  /* bytes held in chunks */
    size_t *meter; /* optional shared counter of bytes held, checked against limit */
    size_t limit;  /* 0 = none */
    bool refused;  /* the last failed allocation was refused for the limit, not by malloc */
} ja_arena;
typedef struct ja_mark {
    ja_chunk *chunk;
    size_t used;
} ja_mark;

/* NULL when out of memory or past the arena's limit. Memory is 8-byte aligned and zeroed. */
void *ja_alloc(ja_arena *a, size_t n);
ja_mark ja_save(const ja_arena *a);
void ja_release(ja_arena *a, ja_mark m);
void ja_free(ja_arena *a);

/* ---- values ----------------------------------------------------------------------------- */

typedef struct jstr {
    const char *p;
    size_t n;
} jstr;

typedef enum jv_kind {
    JV_UNDEF, /* s: the name that was looked up, for messages */
    JV_NONE,
    JV_BOOL,
    JV_INT,
    JV_FLOAT,
    JV_STR,
    JV_LIST, /* l; tuple set for tuples (only printing differs) */
    JV_DICT, /* d: made by the template, keys in insertion order */
    JV_JSON, /* j: an input array or object, read in place */
    JV_NS,   /* a namespace(): the one mutable object */
    JV_LOOP, /* the loop variable of a running for */
    JV_MACRO,
    JV_FUNC, /* a built-in global, or a method bound to self */
} jv_kind;

struct jlist;
struct jdict;
struct jns;
struct jloop;
struct jnode;

typedef struct jv {
    uint8_t kind;
    uint8_t tuple;
    uint16_t fn; /* JV_FUNC: a JF_* id */
    union {
        bool b;
        int64_t i;
        double f;
        jstr s;
        struct jlist *l;
        struct jdict *d;
        const cJSON *j;
        struct jns *ns;
        struct jloop *loop;
        const struct jnode *macro;
        const struct jv *self;
    };
} jv;

typedef struct jlist {
    size_t n;
    jv *v;
} jlist;

typedef struct jdict {
    size_t n;
    jv *k, *v;
} jdict;

/* A variable or namespace attribute. A string value lives in buf (the slot's own storage, reused
 * by later assignments) and is copied out on every read, so no other value ever points into
 * buf. */
typedef struct jslot {
    jstr name;
    jv val;
    bool live; /* false: unset (a loop frame between iterations) */
    char *buf;
    size_t cap;
} jslot;

typedef struct jns {
    jslot *slots;
    size_t n, cap;
} jns;

typedef struct jloop {
    size_t i, n;
    const jv *items;
} jloop;

/* Built-in callables: globals, then methods (bound to a receiver). */
enum {
    JF_RANGE,
    JF_NAMESPACE,
    JF_DICT,
    JF_RAISE,
    JF_STRFTIME,
    JF_LOOP_CYCLE,
    /* str methods */
    JF_SPLIT,
    JF_RSPLIT,
    JF_STRIP,
    JF_LSTRIP,
    JF_RSTRIP,
    JF_STARTSWITH,
    JF_ENDSWITH,
    JF_LOWER,
    JF_UPPER,
    JF_TITLE,
    JF_CAPITALIZE,
    JF_REPLACE,
    JF_FIND,
    JF_COUNT,
    /* dict methods */
    JF_ITEMS,
    JF_KEYS,
    JF_VALUES,
    JF_GET,
};

/* ---- the syntax tree ---------------------------------------------------------------------- */

typedef enum jn_kind {
    /* statements */
    JN_DATA,      /* name: the text */
    JN_OUTPUT,    /* {{ a }} */
    JN_IF,        /* if a: body, else orelse (an elif is an IF alone in orelse) */
    JN_FOR,       /* for names in a [if b]: body, else orelse */
    JN_SET,       /* names = c; or, with op set, names[0].name = c */
    JN_SET_BLOCK, /* names[0] = the text body renders */
    JN_MACRO,     /* name(names = kwvals defaults): body */
    JN_BREAK,
    JN_CONTINUE,
    JN_BLOCK, /* a body with no effect of its own (transformers' {% generation %}) */
    /* expressions */
    JN_LIT,    /* lit */
    JN_NAME,   /* name */
    JN_ATTR,   /* a.name */
    JN_ITEM,   /* a[b] */
    JN_SLICE,  /* a[b:c:d], each may be NULL */
    JN_CALL,   /* a(args, kwnames=kwvals) */
    JN_FILTER, /* a | name(args, kw): op is the JFL_* id */
    JN_TEST,   /* a is [not] name(args): op is the JT_* id, negated */
    JN_NOT,
    JN_NEG,
    JN_POS,
    JN_BIN, /* a op b, op a JOP_* arithmetic operator */
    JN_CMP, /* a op b, op a JOP_* comparison */
    JN_AND,
    JN_OR,
    JN_CONCAT, /* args joined by ~ */
    JN_COND,   /* b if a else c (c may be NULL) */
    JN_LIST,   /* args */
    JN_TUPLE,  /* args */
    JN_DICT,   /* args: keys, kwvals: values */
} jn_kind;

enum {
    JOP_ADD,
    JOP_SUB,
    JOP_MUL,
    JOP_DIV,
    JOP_FLOORDIV,
    JOP_MOD,
    JOP_POW,
    JOP_EQ,
    JOP_NE,
    JOP_LT,
    JOP_LE,
    JOP_GT,
    JOP_GE,
    JOP_IN,
    JOP_NOTIN,
};

typedef struct jnode jnode;
struct jnode {
    uint8_t kind;
    uint8_t op;
    bool negated;
    int line;
    jv lit;
    jstr name;
    jnode *a, *b, *c, *d;
    jnode **args;
    size_t n_args;
    jstr *kwnames;
    jnode **kwvals;
    size_t n_kw;
    jstr *names;
    size_t n_names;
    jnode **body;
    size_t n_body;
    jnode **orelse;
    size_t n_orelse;
};

struct jinja_template {
    ja_arena arena; /* every node and literal */
    jnode **body;
    size_t n_body;
};

/* ---- built-ins (jinja_builtins.c) --------------------------------------------------------- */

/* Filter and test ids by name; -1 when unknown (the parser refuses those). */
int jinja_filter_id(const char *name, size_t n);
int jinja_test_id(const char *name, size_t n);

typedef struct jframe {
    jslot *slots;
    size_t n, cap;
    struct jframe *parent;
} jframe;

/* One render's state (jinja_render.c). */
typedef struct jctx {
    const jinja_template *t;
    strbuf *out;     /* where text goes: the caller's buffer, or a macro's capture */
    size_t out_base; /* out->len when this buffer started receiving this render's text */
    ja_arena tmp;    /* values of the statement being run, released after it */
    ja_arena keep;   /* values stored in variables, until the render ends */
    size_t mem;      /* bytes held by both arenas */
    size_t max_output;
    uint64_t steps, max_steps;
    int depth, max_depth;
    const jinja_var *vars;
    size_t n_vars;
    jframe *top, *frame;
    int ctl; /* a break or continue on its way to its loop */
    duet_status st;
    char *err;
    size_t err_cap;
} jctx;

/* Records an error (the first one wins) and returns false. */
bool jx_fail(jctx *c, duet_status st, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void *jx_alloc(jctx *c, int line, size_t n);
bool jx_step(jctx *c, int line, uint64_t n);
/* A string in the working arena. */
bool jx_str(jctx *c, int line, const char *p, size_t n, jv *out);
/* A value that outlives the statement (arena keep), and a namespace attribute set to it. */
bool jx_persist(jctx *c, int line, const jv *v, jv *out);
bool jx_slot_set(jctx *c, int line, jslot **slots, size_t *n, size_t *cap, jstr name, const jv *v);
/* A slot's value as an expression sees it (strings copied out of the slot). */
bool jx_slot_get(jctx *c, int line, const jslot *s, jv *out);

/* Conversions and operations with Python's meaning. */
bool jv_truthy(const jv *v);
const char *jv_type_name(const jv *v);
jv jv_from_json(const cJSON *j);
/* Items of a sequence or keys of a mapping, materialized; false if not iterable. */
bool jv_iterate(jctx *c, int line, const jv *v, jv **items_p, size_t *n_p);
bool jv_length(jctx *c, int line, const jv *v, int64_t *n_p);
bool jv_equal(const jv *a, const jv *b);
/* Python str(v) appended to b (repr for the items of containers). */
bool jv_write_str(jctx *c, int line, const jv *v, strbuf *b);
bool jv_to_str(jctx *c, int line, const jv *v, jv *out);
/* transformers' tojson: json.dumps(v, ensure_ascii, indent, separators, sort_keys). */
typedef struct jjson_opts {
    bool ensure_ascii, sort_keys;
    int indent; /* -1 = none */
    jstr indent_str;
    jstr item_sep, key_sep;
} jjson_opts;
bool jv_write_json(jctx *c, int line, const jv *v, const jjson_opts *o, strbuf *b);
bool jv_getattr(jctx *c, int line, const jv *obj, jstr name, jv *out);
bool jv_getitem(jctx *c, int line, const jv *obj, const jv *key, jv *out);

/* Calls a built-in function or method with evaluated arguments. */
bool jinja_call_builtin(jctx *c, int line, const jv *fn, const jv *args, size_t n_args,
                        const jstr *kwnames, const jv *kwvals, size_t n_kw, jv *out);
bool jinja_apply_filter(jctx *c, const jnode *n, const jv *subject, const jv *args, size_t n_args,
                        const jv *kwvals, jv *out);
bool jinja_apply_test(jctx *c, const jnode *n, const jv *subject, const jv *args, size_t n_args,
                      bool *out);
/* Applies a filter or test by name to one value (for map, select, selectattr). */
bool jinja_filter_by_name(jctx *c, int line, jstr name, const jv *subject, jv *out);
bool jinja_test_by_name(jctx *c, int line, jstr name, const jv *subject, const jv *args,
                        size_t n_args, bool *out);

/* Python's str.isspace for the UTF-8 character at s[0..n): its byte length, or 0. */
size_t jinja_space_len(const char *s, size_t n);
/* The same for the character that ends s[0..n). */
size_t jinja_space_len_back(const char *s, size_t n);

#endif
