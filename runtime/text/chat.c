/* Chat templates on the Jinja interpreter: finding the template (tokenizer_config.json,
 * chat_template.jinja, --chat-template), preparing messages the way vLLM does before it calls
 * the template, and the template variables transformers passes. See chat.h. */
#include "text/chat.h"

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "base/fileio.h"
#include "base/log.h"
#include "base/strbuf.h"
#include "text/jinja.h"

#define CHAT_CONFIG_MAX   ((size_t)16 << 20)
#define CHAT_TEMPLATE_MAX ((size_t)4 << 20)

struct chat_template {
    jinja_template *jinja;
    cJSON *tokens; /* {"bos_token": "...", "eos_token": "..."}: template variables */
};

/* ---- loading ------------------------------------------------------------------------------- */

/* Parses source; a refusal is logged with where the template came from. */
static duet_status create(const char *source, const char *origin, cJSON *tokens,
                          chat_template **tpl_p) {
    chat_template *t = calloc(1, sizeof *t);
    if (!t) {
        cJSON_Delete(tokens);
        return DUET_ERR_NO_MEMORY;
    }
    t->tokens = tokens;
    char err[256];
    duet_status st = jinja_parse(source, strlen(source), &t->jinja, err, sizeof err);
    if (st != DUET_OK) {
        LOG_ERROR("%s: chat template %s", origin, err[0] ? err : duet_strerror(st));
        chat_destroy(t);
        return st;
    }
    *tpl_p = t;
    return DUET_OK;
}

duet_status chat_create(const char *source, const char *bos, const char *eos,
                        chat_template **tpl_p) {
    if (!source || !tpl_p) return DUET_ERR_INVALID;
    cJSON *tokens = cJSON_CreateObject();
    if (!tokens || !cJSON_AddStringToObject(tokens, "bos_token", bos ? bos : "") ||
        !cJSON_AddStringToObject(tokens, "eos_token", eos ? eos : "")) {
        cJSON_Delete(tokens);
        return DUET_ERR_NO_MEMORY;
    }
    return create(source, "chat_create", tokens, tpl_p);
}

duet_status chat_derive(const chat_template *like, const char *source, chat_template **tpl_p,
                        char *err, size_t err_cap) {
    if (err && err_cap) err[0] = '\0';
    if (!source || !tpl_p) return DUET_ERR_INVALID;
    chat_template *t = calloc(1, sizeof *t);
    if (!t) return DUET_ERR_NO_MEMORY;
    t->tokens = like ? cJSON_Duplicate(like->tokens, true) : cJSON_CreateObject();
    duet_status st = t->tokens ? DUET_OK : DUET_ERR_NO_MEMORY;
    if (st == DUET_OK && !like &&
        (!cJSON_AddStringToObject(t->tokens, "bos_token", "") ||
         !cJSON_AddStringToObject(t->tokens, "eos_token", "")))
        st = DUET_ERR_NO_MEMORY;
    if (st == DUET_OK) st = jinja_parse(source, strlen(source), &t->jinja, err, err_cap);
    if (st != DUET_OK) {
        chat_destroy(t);
        return st;
    }
    *tpl_p = t;
    return DUET_OK;
}

void chat_destroy(chat_template *t) {
    if (!t) return;
    jinja_destroy(t->jinja);
    cJSON_Delete(t->tokens);
    free(t);
}

chat_opts chat_default_opts(const chat_template *t) {
    (void)t;
    return (chat_opts){.add_generation_prompt = true};
}

/* chat_template is a string, or a list of {name, template} where "default" is the one used. */
static const char *config_template(const cJSON *cfg) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, "chat_template");
    if (cJSON_IsString(v)) return v->valuestring;
    const cJSON *e;
    const cJSON *list = cJSON_IsArray(v) ? v : NULL;
    cJSON_ArrayForEach(e, list) {
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(e, "name");
        const cJSON *tpl = cJSON_GetObjectItemCaseSensitive(e, "template");
        if (cJSON_IsString(name) && !strcmp(name->valuestring, "default") && cJSON_IsString(tpl))
            return tpl->valuestring;
    }
    return NULL;
}

/* The special tokens transformers hands every template (special_tokens_map), as strings. */
static duet_status config_tokens(const cJSON *cfg, const char *path, cJSON **tokens_p) {
    static const char *const names[] = {"bos_token", "eos_token", "unk_token", "pad_token"};
    cJSON *tokens = cJSON_CreateObject();
    if (!tokens) return DUET_ERR_NO_MEMORY;
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, names[i]);
        if (cJSON_IsObject(v)) v = cJSON_GetObjectItemCaseSensitive(v, "content");
        if (v && !cJSON_IsNull(v) && !cJSON_IsString(v)) {
            LOG_ERROR("%s: %s must be a string or an object with \"content\"", path, names[i]);
            cJSON_Delete(tokens);
            return DUET_ERR_FORMAT;
        }
        /* bos and eos are always defined (empty when the file names none), as the old C
         * renderer treated them; the others only when present */
        if ((cJSON_IsString(v) || i < 2) &&
            !cJSON_AddStringToObject(tokens, names[i], cJSON_IsString(v) ? v->valuestring : "")) {
            cJSON_Delete(tokens);
            return DUET_ERR_NO_MEMORY;
        }
    }
    *tokens_p = tokens;
    return DUET_OK;
}

static bool file_exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

duet_status chat_load_template(const char *dir, const char *override, chat_template **tpl_p) {
    if (!dir || !tpl_p) return DUET_ERR_INVALID;
    char path[PATH_MAX], alt[PATH_MAX];
    if (snprintf(path, sizeof path, "%s/tokenizer_config.json", dir) >= (int)sizeof path ||
        snprintf(alt, sizeof alt, "%s/chat_template.jinja", dir) >= (int)sizeof alt) {
        LOG_ERROR("%s: tokenizer directory path is too long", dir);
        return DUET_ERR_INVALID;
    }
    cJSON *cfg = NULL;
    if (file_exists(path) || !override) {
        char *text;
        duet_status st = fio_read_text(path, CHAT_CONFIG_MAX, &text);
        if (st != DUET_OK) return st;
        cfg = cJSON_ParseWithLength(text, strlen(text));
        free(text);
        if (!cJSON_IsObject(cfg)) {
            LOG_ERROR("%s: not a valid JSON object", path);
            cJSON_Delete(cfg);
            return DUET_ERR_FORMAT;
        }
    }
    cJSON *tokens;
    duet_status st = config_tokens(cfg, path, &tokens);
    if (st != DUET_OK) {
        cJSON_Delete(cfg);
        return st;
    }
    char *source = NULL;
    const char *origin = path;
    if (override) {
        if (file_exists(override)) {
            st = fio_read_text(override, CHAT_TEMPLATE_MAX, &source);
            origin = override;
        } else if (strpbrk(override, "{}\n")) {
            source = strdup(override);
            st = source ? DUET_OK : DUET_ERR_NO_MEMORY;
            origin = "--chat-template";
        } else {
            LOG_ERROR("--chat-template %s: no such file (and it does not look like a template)",
                      override);
            st = DUET_ERR_NOT_FOUND;
        }
    } else if (config_template(cfg)) {
        source = strdup(config_template(cfg));
        st = source ? DUET_OK : DUET_ERR_NO_MEMORY;
    } else if (file_exists(alt)) {
        st = fio_read_text(alt, CHAT_TEMPLATE_MAX, &source);
        origin = alt;
    } else {
        LOG_ERROR("%s: no chat_template (and no %s); give one with --chat-template", path, alt);
        st = DUET_ERR_NOT_FOUND;
    }
    cJSON_Delete(cfg);
    if (st != DUET_OK) {
        cJSON_Delete(tokens);
        return st;
    }
    st = create(source, origin, tokens, tpl_p);
    free(source);
    return st;
}

duet_status chat_load(const char *dir, chat_template **tpl_p) {
    return chat_load_template(dir, NULL, tpl_p);
}

/* ---- preparing messages -------------------------------------------------------------------- */

typedef struct prep {
    char *err;
    size_t err_cap;
    duet_status st;
} prep;

static duet_status fail(prep *p, duet_status st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static duet_status fail(prep *p, duet_status st, const char *fmt, ...) {
    if (p->st != DUET_OK) return p->st;
    if (p->err && p->err_cap) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(p->err, p->err_cap, fmt, ap);
        va_end(ap);
    }
    p->st = st;
    return st;
}

/* The text parts vLLM reads, and the field that holds each one's text. */
static const char *part_text_field(const char *type) {
    static const char *const types[][2] = {
        {"text", "text"},       {"input_text", "text"},   {"output_text", "text"},
        {"refusal", "refusal"}, {"thinking", "thinking"},
    };
    for (size_t i = 0; i < sizeof types / sizeof *types; i++)
        if (!strcmp(type, types[i][0])) return types[i][1];
    return NULL;
}

/* A message's content as one string: *out_p is a new cJSON string. */
static duet_status prep_content(prep *p, const cJSON *m, size_t i, cJSON **out_p) {
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(m, "content");
    if (cJSON_IsString(c)) {
        *out_p = cJSON_CreateString(c->valuestring);
        return *out_p ? DUET_OK : fail(p, DUET_ERR_NO_MEMORY, "out of memory");
    }
    if (c && !cJSON_IsNull(c) && !cJSON_IsArray(c))
        return fail(p, DUET_ERR_INVALID,
                    "messages[%zu].content must be a string, an array of parts or null", i);
    strbuf b = {0};
    size_t k = 0, n_text = 0;
    const cJSON *part;
    const cJSON *parts = cJSON_IsArray(c) ? c : NULL;
    cJSON_ArrayForEach(part, parts) {
        const char *text = NULL;
        if (cJSON_IsString(part)) {
            text = part->valuestring;
        } else {
            const cJSON *type = cJSON_GetObjectItemCaseSensitive(part, "type");
            if (!cJSON_IsObject(part) || !cJSON_IsString(type)) {
                strbuf_free(&b);
                return fail(p, DUET_ERR_INVALID,
                            "messages[%zu].content[%zu] must be a string or an object with a "
                            "\"type\"",
                            i, k);
            }
            const char *field = part_text_field(type->valuestring);
            if (!field) {
                strbuf_free(&b);
                return fail(p, DUET_ERR_UNSUPPORTED,
                            "messages[%zu].content[%zu]: part type \"%.40s\" is not supported "
                            "(only text is)",
                            i, k, type->valuestring);
            }
            const cJSON *t = cJSON_GetObjectItemCaseSensitive(part, field);
            if (t && !cJSON_IsNull(t) && !cJSON_IsString(t)) {
                strbuf_free(&b);
                return fail(p, DUET_ERR_INVALID, "messages[%zu].content[%zu].%s must be a string",
                            i, k, field);
            }
            text = cJSON_IsString(t) ? t->valuestring : NULL; /* vLLM skips an empty part */
        }
        if (text) {
            if (n_text++) strbuf_add(&b, "\n", 1);
            strbuf_str(&b, text);
        }
        k++;
    }
    *out_p = b.oom ? NULL : cJSON_CreateString(b.p ? b.p : "");
    strbuf_free(&b);
    return *out_p ? DUET_OK : fail(p, DUET_ERR_NO_MEMORY, "out of memory");
}

static duet_status prep_tool_calls(prep *p, const cJSON *calls, size_t i, cJSON *out) {
    if (!cJSON_IsArray(calls))
        return fail(p, DUET_ERR_INVALID, "messages[%zu].tool_calls must be an array", i);
    if (!calls->child) return DUET_OK; /* vLLM drops an empty list */
    cJSON *list = cJSON_AddArrayToObject(out, "tool_calls");
    if (!list) return fail(p, DUET_ERR_NO_MEMORY, "out of memory");
    const cJSON *call;
    size_t k = 0;
    cJSON_ArrayForEach(call, calls) {
        const cJSON *fn = cJSON_GetObjectItemCaseSensitive(call, "function");
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(fn, "name");
        if (!cJSON_IsObject(call) || !cJSON_IsObject(fn) || !cJSON_IsString(name))
            return fail(p, DUET_ERR_INVALID,
                        "messages[%zu].tool_calls[%zu] needs \"function\" with a string \"name\"",
                        i, k);
        cJSON *copy = cJSON_Duplicate(call, true);
        if (!copy || !cJSON_AddItemToArray(list, copy)) {
            cJSON_Delete(copy);
            return fail(p, DUET_ERR_NO_MEMORY, "out of memory");
        }
        /* arguments arrive as JSON text; templates expect the value (and tojson it) */
        cJSON *cfn = cJSON_GetObjectItemCaseSensitive(copy, "function");
        const cJSON *args = cJSON_GetObjectItemCaseSensitive(cfn, "arguments");
        cJSON *value = NULL;
        if (cJSON_IsString(args)) value = cJSON_Parse(args->valuestring);
        if (!value && (cJSON_IsObject(args) || cJSON_IsArray(args)))
            value = cJSON_Duplicate(args, true);
        if (!value) value = cJSON_CreateObject();
        if (!value) return fail(p, DUET_ERR_NO_MEMORY, "out of memory");
        cJSON_DeleteItemFromObjectCaseSensitive(cfn, "arguments");
        if (!cJSON_AddItemToObject(cfn, "arguments", value)) {
            cJSON_Delete(value);
            return fail(p, DUET_ERR_NO_MEMORY, "out of memory");
        }
        k++;
    }
    return DUET_OK;
}

static bool copy_string_field(const cJSON *from, const char *name, const char *as, cJSON *to) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(from, name);
    return !cJSON_IsString(v) || cJSON_AddStringToObject(to, as, v->valuestring);
}

static bool known_role(const char *role) {
    static const char *const roles[] = {"system", "developer", "user", "assistant", "tool"};
    for (size_t i = 0; i < sizeof roles / sizeof *roles; i++)
        if (!strcmp(role, roles[i])) return true;
    return false;
}

static duet_status prep_messages(prep *p, const cJSON *messages, cJSON **out_p) {
    if (!cJSON_IsArray(messages)) return fail(p, DUET_ERR_INVALID, "messages must be an array");
    cJSON *list = cJSON_CreateArray();
    if (!list) return fail(p, DUET_ERR_NO_MEMORY, "out of memory");
    const cJSON *m;
    size_t i = 0;
    cJSON_ArrayForEach(m, messages) {
        const cJSON *r = cJSON_GetObjectItemCaseSensitive(m, "role");
        if (!cJSON_IsObject(m)) {
            fail(p, DUET_ERR_INVALID, "messages[%zu] is not an object", i);
        } else if (!r || cJSON_IsNull(r)) {
            fail(p, DUET_ERR_INVALID, "messages[%zu] has no role", i);
        } else if (!cJSON_IsString(r)) {
            fail(p, DUET_ERR_INVALID, "messages[%zu].role must be a string", i);
        } else if (!known_role(r->valuestring))
            /* vLLM would pass it on, and DeepSeek's templates drop such a message silently */
            fail(p, DUET_ERR_INVALID,
                 "messages[%zu].role \"%.40s\" is not system, developer, user, assistant or tool",
                 i, r->valuestring);
        if (p->st != DUET_OK) break;
        const char *role = !strcmp(r->valuestring, "developer") ? "system" : r->valuestring;
        cJSON *out = cJSON_CreateObject(), *content = NULL;
        if (!out || !cJSON_AddItemToArray(list, out)) {
            cJSON_Delete(out);
            fail(p, DUET_ERR_NO_MEMORY, "out of memory");
            break;
        }
        if (!cJSON_AddStringToObject(out, "role", role)) {
            fail(p, DUET_ERR_NO_MEMORY, "out of memory");
            break;
        }
        if (prep_content(p, m, i, &content) != DUET_OK) break;
        cJSON_AddItemToObject(out, "content", content);
        const cJSON *calls = cJSON_GetObjectItemCaseSensitive(m, "tool_calls");
        if (!strcmp(role, "assistant") && calls && !cJSON_IsNull(calls) &&
            prep_tool_calls(p, calls, i, out) != DUET_OK)
            break;
        bool ok = copy_string_field(m, "name", "name", out);
        if (!strcmp(role, "tool"))
            ok = ok && copy_string_field(m, "tool_call_id", "tool_call_id", out);
        if (!strcmp(role, "assistant"))
            ok = ok && copy_string_field(m, "reasoning", "reasoning", out) &&
                 copy_string_field(m, "reasoning", "reasoning_content", out);
        if (!ok) {
            fail(p, DUET_ERR_NO_MEMORY, "out of memory");
            break;
        }
        i++;
    }
    if (p->st != DUET_OK) {
        cJSON_Delete(list);
        return p->st;
    }
    *out_p = list;
    return DUET_OK;
}

/* ---- rendering ----------------------------------------------------------------------------- */

static bool reserved(const char *name) {
    return !strcmp(name, "messages");
}

duet_status chat_render(const chat_template *tpl, const cJSON *messages, const chat_opts *opts,
                        char **text_p, size_t *len_p, char *err, size_t err_cap) {
    prep p = {.err = err, .err_cap = err_cap};
    if (err && err_cap) err[0] = '\0';
    if (!tpl || !opts || !text_p || !len_p) return DUET_ERR_INVALID;
    if (opts->tools && !cJSON_IsNull(opts->tools) && !cJSON_IsArray(opts->tools))
        return fail(&p, DUET_ERR_INVALID, "tools must be an array");
    if (opts->kwargs && !cJSON_IsNull(opts->kwargs) && !cJSON_IsObject(opts->kwargs))
        return fail(&p, DUET_ERR_INVALID, "chat_template_kwargs must be an object");
    cJSON *msgs = NULL;
    if (prep_messages(&p, messages, &msgs) != DUET_OK) return p.st;
    cJSON *flag = cJSON_CreateBool(opts->add_generation_prompt);
    /* transformers' variables, then chat_template_kwargs over them (later ones win) */
    size_t n_kw = (size_t)cJSON_GetArraySize(opts->kwargs);
    size_t cap = 8 + n_kw, n = 0;
    jinja_var *vars = malloc(cap * sizeof *vars);
    if (!flag || !vars) {
        cJSON_Delete(flag);
        cJSON_Delete(msgs);
        free(vars);
        return fail(&p, DUET_ERR_NO_MEMORY, "out of memory");
    }
    const cJSON *k;
    cJSON_ArrayForEach(k, tpl->tokens) vars[n++] = (jinja_var){k->string, k};
    vars[n++] = (jinja_var){"messages", msgs};
    vars[n++] = (jinja_var){"tools", opts->tools}; /* NULL: none, as transformers passes */
    vars[n++] = (jinja_var){"documents", NULL};
    vars[n++] = (jinja_var){"add_generation_prompt", flag};
    if (cJSON_IsObject(opts->kwargs)) {
        cJSON_ArrayForEach(k, opts->kwargs) {
            if (k->string && !reserved(k->string)) vars[n++] = (jinja_var){k->string, k};
        }
    }
    strbuf out = {0};
    char jerr[400];
    duet_status st = jinja_render(tpl->jinja, vars, n, NULL, &out, jerr, sizeof jerr);
    free(vars);
    cJSON_Delete(flag);
    cJSON_Delete(msgs);
    if (st == DUET_OK && out.oom) st = DUET_ERR_NO_MEMORY;
    if (st != DUET_OK) {
        strbuf_free(&out);
        /* "line N: ..." is the template failing on this conversation; anything else is the
         * template's own raise_exception message, passed on as written */
        if (!strncmp(jerr, "line ", 5)) return fail(&p, st, "chat template %s", jerr);
        return fail(&p, st, "%s", jerr[0] ? jerr : duet_strerror(st));
    }
    if (!out.p && !(out.p = strdup(""))) return fail(&p, DUET_ERR_NO_MEMORY, "out of memory");
    *text_p = out.p;
    *len_p = out.len;
    return DUET_OK;
}
