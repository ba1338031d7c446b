/* A Jinja interpreter for chat templates: the subset of jinja2 that Hugging Face chat templates
 * use, with transformers' settings (trim_blocks, lstrip_blocks, loop controls, its tojson,
 * raise_exception). Parsed once into a tree, rendered many times over cJSON inputs.
 * What the messages mean (roles, tools, kwargs) is chat.h's business; this module knows none. */
#ifndef DUET_JINJA_H
#define DUET_JINJA_H

#include <cjson/cJSON.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"
#include "base/strbuf.h"

/* Read-only after jinja_parse: any number of threads may render one template at once. */
typedef struct jinja_template jinja_template;

/* Parses len bytes of template source. Anything outside the supported subset (include,
 * extends, call blocks, an unknown filter or test, ...) is refused here, never at render time:
 * DUET_ERR_UNSUPPORTED with "line N: unsupported construct '...'" in err; a syntax error is
 * DUET_ERR_FORMAT with "line N: ...". err (err_cap bytes) may be NULL. Nothing is logged. */
duet_status jinja_parse(const char *src, size_t len, jinja_template **tpl_p, char *err,
                        size_t err_cap);
void jinja_destroy(jinja_template *tpl);

/* A template variable: name → a JSON value (any type; NULL = JSON null). The values are
 * borrowed for the duration of the render and never modified. */
typedef struct jinja_var {
    const char *name;
    const cJSON *value;
} jinja_var;

/* Bounds on one render, against hostile templates and inputs; 0 = the default. */
typedef struct jinja_limits {
    size_t max_output;  /* bytes of rendered text (default 64 MiB) */
    size_t max_memory;  /* bytes of working memory (default 512 MiB) */
    uint64_t max_steps; /* loop iterations + macro calls + filter items (default 10 million) */
    int max_depth;      /* nested macro calls (default 64) */
} jinja_limits;

/* Renders the template with vars (later entries win over earlier ones of the same name) and
 * the globals transformers defines (range, namespace, dict, raise_exception, strftime_now),
 * appending the text to out. limits may be NULL.
 * Errors, with a one-line reason in err (err_cap bytes, may be NULL):
 * - DUET_ERR_INVALID: the template failed on these inputs ("line N: ..."), or called
 *   raise_exception (err is then the template's own message, as vLLM reports it);
 * - DUET_ERR_TOO_LONG: a limit was reached;
 * - DUET_ERR_NO_MEMORY.
 * On error out holds a partial text the caller should drop. Nothing is logged. */
duet_status jinja_render(const jinja_template *tpl, const jinja_var *vars, size_t n_vars,
                         const jinja_limits *limits, strbuf *out, char *err, size_t err_cap);

#endif
