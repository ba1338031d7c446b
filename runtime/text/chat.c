/* The DeepSeek-V3 / R1 chat template as C; see chat.h. Each branch below is one branch of the
 * Jinja template in tokenizer_config.json, in the same order, with the same namespace flags
 * (ns.is_first, ns.is_tool, ns.is_output_first), so the two can be read side by side. */
#include "text/chat.h"

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/fileio.h"
#include "base/log.h"
#include "base/strbuf.h"

#define CHAT_CONFIG_MAX ((size_t)16 << 20)

struct chat_template {
    char *bos;
    bool r1;
};

/* ---- templates ---------------------------------------------------------------------------- */

duet_status chat_create(const char *bos_token, bool r1, chat_template **tpl_p) {
    if (!tpl_p) return DUET_ERR_INVALID;
    chat_template *t = calloc(1, sizeof *t);
    if (!t || !(t->bos = strdup(bos_token ? bos_token : ""))) {
        free(t);
        return DUET_ERR_NO_MEMORY;
    }
    t->r1 = r1;
    *tpl_p = t;
    return DUET_OK;
}

void chat_destroy(chat_template *t) {
    if (!t) return;
    free(t->bos);
    free(t);
}

chat_opts chat_default_opts(const chat_template *t) {
    return (chat_opts){
        .add_generation_prompt = true, .think_prefix = t->r1, .strip_reasoning = t->r1};
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

duet_status chat_load(const char *dir, chat_template **tpl_p) {
    if (!dir || !tpl_p) return DUET_ERR_INVALID;
    char path[PATH_MAX];
    if (snprintf(path, sizeof path, "%s/tokenizer_config.json", dir) >= (int)sizeof path) {
        LOG_ERROR("%s: tokenizer directory path is too long", dir);
        return DUET_ERR_INVALID;
    }
    char *text;
    duet_status st = fio_read_text(path, CHAT_CONFIG_MAX, &text);
    if (st != DUET_OK) return st;
    cJSON *cfg = cJSON_ParseWithLength(text, strlen(text));
    free(text);
    if (!cJSON_IsObject(cfg)) {
        LOG_ERROR("%s: not a valid JSON object", path);
        cJSON_Delete(cfg);
        return DUET_ERR_FORMAT;
    }
    const cJSON *bos = cJSON_GetObjectItemCaseSensitive(cfg, "bos_token");
    if (cJSON_IsObject(bos)) bos = cJSON_GetObjectItemCaseSensitive(bos, "content");
    if (bos && !cJSON_IsNull(bos) && !cJSON_IsString(bos)) {
        LOG_ERROR("%s: bos_token must be a string or an object with \"content\"", path);
        cJSON_Delete(cfg);
        return DUET_ERR_FORMAT;
    }
    const char *tpl = config_template(cfg);
    bool r1 = false;
    if (!tpl) {
        LOG_WARN("%s: no chat_template; rendering chats the DeepSeek-V3 way", path);
    } else {
        /* R1's template keeps only the answer of earlier turns and opens the reply with
         * "<think>\n" (written as an escape inside a Jinja string, or as a real newline). */
        r1 = strstr(tpl, "split('</think>')") || strstr(tpl, "split(\"</think>\")") ||
             strstr(tpl, "<think>\\n'") || strstr(tpl, "<think>\n'");
        if (!strstr(tpl, "<｜User｜>") || !strstr(tpl, "<｜Assistant｜>"))
            LOG_WARN("%s: chat_template does not look like DeepSeek's; rendering chats the "
                     "DeepSeek-V3 way all the same",
                     path);
    }
    st = chat_create(cJSON_IsString(bos) ? bos->valuestring : "", r1, tpl_p);
    cJSON_Delete(cfg);
    return st;
}

/* ---- rendering ---------------------------------------------------------------------------- */

typedef enum role {
    ROLE_SYSTEM,
    ROLE_USER,
    ROLE_ASSISTANT,
    ROLE_TOOL,
} role;

typedef struct render_ctx {
    strbuf out;
    char *err;
    size_t err_cap;
    duet_status st;
} render_ctx;

static duet_status fail(render_ctx *rc, duet_status st, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static duet_status fail(render_ctx *rc, duet_status st, const char *fmt, ...) {
    if (rc->st != DUET_OK) return rc->st;
    if (rc->err && rc->err_cap) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(rc->err, rc->err_cap, fmt, ap);
        va_end(ap);
    }
    rc->st = st;
    return st;
}

static const char *const ROLE_NAMES[] = {"system", "user", "assistant", "tool"};

static duet_status message_role(render_ctx *rc, const cJSON *m, size_t i, role *role_p) {
    if (!cJSON_IsObject(m)) return fail(rc, DUET_ERR_INVALID, "messages[%zu] is not an object", i);
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(m, "role");
    if (!r || cJSON_IsNull(r)) return fail(rc, DUET_ERR_INVALID, "messages[%zu] has no role", i);
    if (!cJSON_IsString(r))
        return fail(rc, DUET_ERR_INVALID, "messages[%zu].role must be a string", i);
    for (int k = 0; k < 4; k++) {
        if (!strcmp(r->valuestring, ROLE_NAMES[k])) {
            *role_p = (role)k;
            return DUET_OK;
        }
    }
    if (!strcmp(r->valuestring, "developer")) {
        *role_p = ROLE_SYSTEM;
        return DUET_OK;
    }
    return fail(rc, DUET_ERR_INVALID,
                "messages[%zu].role \"%.40s\" is not system, user, assistant or tool", i,
                r->valuestring);
}

/* A message's content as text. *text_p is NULL for null or missing content; *owned_p is a
 * heap string to free when content was an array of parts. */
static duet_status message_content(render_ctx *rc, const cJSON *m, size_t i, const char **text_p,
                                   char **owned_p) {
    *text_p = NULL;
    *owned_p = NULL;
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(m, "content");
    if (!c || cJSON_IsNull(c)) return DUET_OK;
    if (cJSON_IsString(c)) {
        *text_p = c->valuestring;
        return DUET_OK;
    }
    if (!cJSON_IsArray(c))
        return fail(rc, DUET_ERR_INVALID,
                    "messages[%zu].content must be a string, an array of parts or null", i);
    strbuf b = {0};
    size_t k = 0;
    const cJSON *part;
    cJSON_ArrayForEach(part, c) {
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(part, "type");
        const cJSON *text = cJSON_GetObjectItemCaseSensitive(part, "text");
        if (!cJSON_IsObject(part) || !cJSON_IsString(type)) {
            free(b.p);
            return fail(rc, DUET_ERR_INVALID,
                        "messages[%zu].content[%zu] must be an object with a \"type\"", i, k);
        }
        if (strcmp(type->valuestring, "text") != 0) {
            free(b.p);
            return fail(rc, DUET_ERR_UNSUPPORTED,
                        "messages[%zu].content[%zu]: part type \"%.40s\" is not supported (only "
                        "\"text\" is)",
                        i, k, type->valuestring);
        }
        if (!cJSON_IsString(text)) {
            free(b.p);
            return fail(rc, DUET_ERR_INVALID, "messages[%zu].content[%zu].text must be a string", i,
                        k);
        }
        if (k > 0) strbuf_add(&b, "\n", 1);
        strbuf_str(&b, text->valuestring);
        k++;
    }
    if (b.oom) {
        free(b.p);
        return fail(rc, DUET_ERR_NO_MEMORY, "out of memory");
    }
    *owned_p = b.p ? b.p : strdup("");
    if (!*owned_p) return fail(rc, DUET_ERR_NO_MEMORY, "out of memory");
    *text_p = *owned_p;
    return DUET_OK;
}

/* Content that the template concatenates, where null would make Jinja fail. */
static duet_status required_content(render_ctx *rc, const cJSON *m, size_t i, role r,
                                    const char **text_p, char **owned_p) {
    if (message_content(rc, m, i, text_p, owned_p) != DUET_OK) return rc->st;
    if (!*text_p)
        return fail(rc, DUET_ERR_INVALID, "messages[%zu] (%s) has no content", i, ROLE_NAMES[r]);
    return DUET_OK;
}

static const char *str_field(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* One tool call as the template writes it, without its opening. */
static duet_status tool_call_body(render_ctx *rc, const cJSON *call, size_t i, size_t k) {
    const cJSON *fn = cJSON_GetObjectItemCaseSensitive(call, "function");
    const char *type = str_field(call, "type");
    const char *name = str_field(fn, "name");
    const char *args = str_field(fn, "arguments");
    if (!cJSON_IsObject(call) || !type || !name || !args)
        return fail(rc, DUET_ERR_INVALID,
                    "messages[%zu].tool_calls[%zu] needs \"type\" and \"function\" with string "
                    "\"name\" and \"arguments\"",
                    i, k);
    strbuf *o = &rc->out;
    strbuf_str(o, "<｜tool▁call▁begin｜>");
    strbuf_str(o, type);
    strbuf_str(o, "<｜tool▁sep｜>");
    strbuf_str(o, name);
    strbuf_str(o, "\n```json\n");
    strbuf_str(o, args);
    strbuf_str(o, "\n```<｜tool▁call▁end｜>");
    return DUET_OK;
}

/* The part of an answer after its last "</think>" (R1 drops earlier turns' reasoning). */
static const char *after_reasoning(const char *s) {
    const char *p = s, *hit;
    while ((hit = strstr(p, "</think>"))) p = hit + strlen("</think>");
    return p;
}

duet_status chat_render(const chat_template *tpl, const cJSON *messages, const chat_opts *opts,
                        char **text_p, size_t *len_p, char *err, size_t err_cap) {
    render_ctx rc = {.err = err, .err_cap = err_cap, .st = DUET_OK};
    if (err && err_cap) err[0] = '\0';
    if (!tpl || !opts || !text_p || !len_p) return DUET_ERR_INVALID;
    if (!cJSON_IsArray(messages)) return fail(&rc, DUET_ERR_INVALID, "messages must be an array");
    strbuf *o = &rc.out;
    const cJSON *m;
    size_t i = 0;
    role r;

    /* Pass 1: check every role, and gather the system prompt, which goes right after BOS. */
    strbuf_str(o, tpl->bos);
    bool first_sp = true;
    cJSON_ArrayForEach(m, messages) {
        if (message_role(&rc, m, i, &r) != DUET_OK) goto out;
        if (r == ROLE_SYSTEM) {
            const char *text;
            char *owned;
            if (required_content(&rc, m, i, r, &text, &owned) != DUET_OK) goto out;
            if (!first_sp) strbuf_str(o, "\n\n");
            strbuf_str(o, text);
            free(owned);
            first_sp = false;
        }
        i++;
    }

    /* Pass 2: the conversation. */
    bool is_first = false, is_tool = false, is_output_first = true;
    i = 0;
    cJSON_ArrayForEach(m, messages) {
        message_role(&rc, m, i, &r);
        const char *text = NULL;
        char *owned = NULL;
        switch (r) {
        case ROLE_SYSTEM:
            break;
        case ROLE_USER:
            if (required_content(&rc, m, i, r, &text, &owned) != DUET_OK) break;
            is_tool = false;
            strbuf_str(o, "<｜User｜>");
            strbuf_str(o, text);
            break;
        case ROLE_ASSISTANT:
            if (message_content(&rc, m, i, &text, &owned) != DUET_OK) break;
            if (!text) {
                /* Content null: a tool-call turn. Note ns.is_first is never reset. */
                is_tool = false;
                const cJSON *calls = cJSON_GetObjectItemCaseSensitive(m, "tool_calls");
                if (calls && !cJSON_IsNull(calls) && !cJSON_IsArray(calls)) {
                    fail(&rc, DUET_ERR_INVALID, "messages[%zu].tool_calls must be an array", i);
                    break;
                }
                const cJSON *call, *list = cJSON_IsArray(calls) ? calls : NULL;
                size_t k = 0;
                cJSON_ArrayForEach(call, list) {
                    if (!is_first) {
                        strbuf_str(o, "<｜Assistant｜><｜tool▁calls▁begin｜>");
                        if (tool_call_body(&rc, call, i, k) != DUET_OK) break;
                        is_first = true;
                    } else {
                        strbuf_str(o, "\n");
                        if (tool_call_body(&rc, call, i, k) != DUET_OK) break;
                        strbuf_str(o, "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>");
                    }
                    k++;
                }
            } else if (is_tool) {
                strbuf_str(o, "<｜tool▁outputs▁end｜>");
                strbuf_str(o, text);
                strbuf_str(o, "<｜end▁of▁sentence｜>");
                is_tool = false;
            } else {
                strbuf_str(o, "<｜Assistant｜>");
                strbuf_str(o, opts->strip_reasoning ? after_reasoning(text) : text);
                strbuf_str(o, "<｜end▁of▁sentence｜>");
            }
            break;
        case ROLE_TOOL:
            if (required_content(&rc, m, i, r, &text, &owned) != DUET_OK) break;
            is_tool = true;
            if (is_output_first) {
                strbuf_str(o, "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>");
                is_output_first = false;
            } else {
                strbuf_str(o, "\n<｜tool▁output▁begin｜>");
            }
            strbuf_str(o, text);
            strbuf_str(o, "<｜tool▁output▁end｜>");
            break;
        }
        free(owned);
        if (rc.st != DUET_OK) goto out;
        i++;
    }
    if (is_tool) strbuf_str(o, "<｜tool▁outputs▁end｜>");
    if (opts->add_generation_prompt && !is_tool) {
        strbuf_str(o, "<｜Assistant｜>");
        if (opts->think_prefix) strbuf_str(o, "<think>\n");
    }
    if (o->oom) fail(&rc, DUET_ERR_NO_MEMORY, "out of memory");

out:
    if (rc.st != DUET_OK) {
        free(o->p);
        return rc.st;
    }
    *text_p = o->p;
    *len_p = o->len;
    return DUET_OK;
}
