/* The command-line parser every duet program uses: each option is declared once in a table
 * (name, short forms, type, default, environment variable, help line) and the parser does the
 * rest the way Python's argparse does for vLLM's users: "--flag value" and "--flag=value",
 * short forms ("-tp 2"), underscores for dashes ("--served_model_name"), unambiguous prefixes
 * ("--num-prompt"), lists of values ("--prefill A B"), "--no-x" for negatable flags, and a
 * generated --help. An unknown option gets "unknown option --x (did you mean --y?)".
 *
 * Precedence for each option: the command line, then its environment variable, then its
 * default. Values given as text are checked by type and range; a bad one is an error naming the
 * option. Not thread-safe: one thread parses at start-up. */
#ifndef DUET_OPT_H
#define DUET_OPT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "base/status.h"

typedef enum opt_type {
    OPT_FLAG,   /* bool: present = true ("--x=false" and, with OPT_NEGATABLE, "--no-x" too) */
    OPT_INT,    /* int in [min, max] */
    OPT_LONG,   /* long long in [min, max] */
    OPT_DOUBLE, /* double in [min, max] */
    OPT_STRING, /* const char *: points into argv, the environment or the default */
    OPT_CHOICE, /* int: the index of the value among choices' names ("auto|bf16|f32" → 0, 1,
                 * 2); an entry "x=y" accepts x as a spelling of the name y */
    OPT_SIZE,   /* long long bytes: "1073741824", "64k", "1G", "512MiB" (powers of 1024) */
    OPT_LIST,   /* opt_list: one or more values (argparse nargs="+"); repeating the option adds */
    OPT_CUSTOM, /* parse(spec, value, err, err_len) stores into spec->dest itself */
} opt_type;

/* spec->flags */
enum {
    OPT_NEGATABLE = 1u << 0, /* OPT_FLAG: "--no-<name>" sets false */
    OPT_IGNORED = 1u << 1,   /* accepted for compatibility; using it logs one line (help says
                              * why) and stores nothing */
    OPT_HIDDEN = 1u << 2,    /* not shown by --help */
};

typedef struct opt_list {
    const char **v; /* [n], pointers into argv (the parser owns the array) */
    int n;
} opt_list;

typedef struct opt_spec opt_spec;
struct opt_spec {
    const char *name;  /* "--tensor-parallel-size" */
    const char *alias; /* other spellings, '|'-separated: "-tp"; NULL for none */
    opt_type type;
    void *dest;          /* where the value goes (type as above); NULL for OPT_IGNORED, whose
                          * type says whether it takes a value (OPT_FLAG: none) */
    const char *def;     /* default, as text parsed like a value; NULL: dest is left alone */
    const char *env;     /* environment variable read when the option is not given (the first
                          * non-empty of a '|'-separated list); or NULL */
    const char *metavar; /* "N", "DIR" in --help; NULL: from the type */
    const char *help;
    const char *choices; /* OPT_CHOICE */
    double min, max;     /* OPT_INT, OPT_LONG, OPT_DOUBLE: both 0 = no range check */
    unsigned flags;
    /* OPT_CUSTOM: parse value into dest; DUET_ERR_INVALID with a reason in err otherwise
     * (the parser adds the option's name). */
    duet_status (*parse)(const opt_spec *spec, const char *value, char *err, size_t err_len);
    void *user; /* for parse */
};

typedef struct opt_parser opt_parser;

/* prog: the program's name for messages; usage: what follows "usage: prog " (e.g.
 * "[options] [MODEL]"); about: one paragraph shown by --help. Strings must outlive p. */
duet_status opt_parser_create(const char *prog, const char *usage, const char *about,
                              opt_parser **p_p);
void opt_parser_destroy(opt_parser *p);

/* Adds a group of options (shown under title in --help). The specs are copied; their dest
 * pointers must stay valid while p is used. A name already present is an internal error. */
duet_status opt_add(opt_parser *p, const char *title, const opt_spec *specs, int n);

/* Positional arguments: allowed up to max (0 = none, the default); after parsing, read them
 * with opt_positional. name is shown in messages ("MODEL"). */
void opt_allow_positional(opt_parser *p, int max, const char *name);
/* Turns off prefix matching (on by default, as in argparse). */
void opt_disable_abbrev(opt_parser *p);

/* Parses argv[1..argc), applies environment variables and defaults. Returns 0 when the
 * program should go on, 1 after --help was printed on stdout (exit 0), 2 after one error line
 * on stderr (exit 2, as argparse does). */
int opt_parse(opt_parser *p, int argc, char **argv);

/* Sets one option by name ("port", "--port", "max_body_bytes") from values, as if given on
 * the command line (for configuration files): one value, none for a flag, any number for a list
 * (which they replace; none empties it). DUET_ERR_NOT_FOUND or DUET_ERR_INVALID with a reason in
 * err. Counts as given. */
duet_status opt_set(opt_parser *p, const char *name, const char *const *values, int n_values,
                    char *err, size_t err_len);

/* Whether the option (any spelling) was set by the command line or opt_set (not by its
 * environment variable or default). */
bool opt_given(const opt_parser *p, const char *name);

int opt_positional_count(const opt_parser *p);
const char *opt_positional(const opt_parser *p, int i);

/* The generated help text. */
void opt_print_help(const opt_parser *p, FILE *f);

/* "1G" → 1073741824; DUET_ERR_INVALID for anything else. Exposed for other text formats. */
duet_status opt_parse_size(const char *s, long long *out);

#endif
