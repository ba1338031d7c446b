/* DeepSeek tool-call markup → OpenAI tool calls, streaming: a state machine over the answer text
 * (kept whole, for the fallback to plain content), that decides as early as the markup allows.
 * What the events become on the wire (SSE chunks, the final message) is the server's business,
 * with api_tool_event_json / api_tool_calls_json; see api.h for the rules. */
#include <stdlib.h>
#include <string.h>

#include "openai/api.h"

#define CALLS_BEGIN "<｜tool▁calls▁begin｜>"
#define CALLS_END   "<｜tool▁calls▁end｜>"
#define CALL_BEGIN  "<｜tool▁call▁begin｜>"
#define CALL_END    "<｜tool▁call▁end｜>"
#define SEP         "<｜tool▁sep｜>"
#define V3_HEAD     "function" SEP
#define V3_FENCE    "```json\n"
#define V3_CLOSE    "\n```" CALL_END
/* How the special tokens start: a name containing this is taken as broken markup. */
#define MARK           "<｜"
#define NAME_MAX_BYTES 256

typedef enum state {
    ST_TEXT,   /* content, watching for CALLS_BEGIN */
    ST_BLOCK,  /* inside the calls block, between calls */
    ST_HEADER, /* after CALL_BEGIN, before the arguments */
    ST_ARGS,   /* a call's arguments */
    ST_DONE,   /* after CALLS_END: dropped */
    ST_PLAIN,  /* fell back: everything is content */
} state;

typedef struct call {
    char id[48];
    char *name;
    strbuf args;
    bool complete;
} call;

struct api_tool_parser {
    api_tool_format fmt;
    state st;
    strbuf all;         /* every byte fed */
    size_t pos;         /* all[0..pos) is decided */
    size_t content_len; /* where CALLS_BEGIN started (all.len while none) */
    size_t hdr;         /* ST_HEADER: where the header starts */
    call *calls;
    int n_calls, cap_calls, n_complete;
    bool oom;
};

duet_status api_tool_format_parse(const char *name, api_tool_format *fmt_p) {
    if (name && !strcmp(name, "deepseek_v3")) {
        *fmt_p = API_TOOL_FORMAT_DEEPSEEK_V3;
        return DUET_OK;
    }
    if (name && !strcmp(name, "deepseek_v31")) {
        *fmt_p = API_TOOL_FORMAT_DEEPSEEK_V31;
        return DUET_OK;
    }
    return DUET_ERR_NOT_FOUND;
}

duet_status api_tool_parser_create(api_tool_format fmt, api_tool_parser **p_p) {
    if (!p_p || (fmt != API_TOOL_FORMAT_DEEPSEEK_V3 && fmt != API_TOOL_FORMAT_DEEPSEEK_V31))
        return DUET_ERR_INVALID;
    api_tool_parser *p = calloc(1, sizeof *p);
    if (!p) return DUET_ERR_NO_MEMORY;
    p->fmt = fmt;
    *p_p = p;
    return DUET_OK;
}

void api_tool_parser_destroy(api_tool_parser *p) {
    if (!p) return;
    for (int i = 0; i < p->n_calls; i++) {
        free(p->calls[i].name);
        strbuf_free(&p->calls[i].args);
    }
    free(p->calls);
    strbuf_free(&p->all);
    free(p);
}

/* ---- helpers ------------------------------------------------------------------------------ */

static bool starts(const char *s, size_t n, const char *lit) {
    size_t k = strlen(lit);
    return n >= k && !memcmp(s, lit, k);
}

/* s[0..n) is a proper prefix of lit (more text may complete it). */
static bool may_become(const char *s, size_t n, const char *lit) {
    size_t k = strlen(lit);
    return n < k && !memcmp(s, lit, n);
}

/* Longest suffix of s[0..n) that is a proper prefix of lit. */
static size_t partial_tail(const char *s, size_t n, const char *lit) {
    size_t k = strlen(lit);
    for (size_t t = k - 1; t > 0; t--)
        if (t <= n && !memcmp(s + n - t, lit, t)) return t;
    return 0;
}

static void emit(api_tool_cb cb, void *user, api_tool_event_kind kind, int index, const char *text,
                 size_t len) {
    if (!cb || !len) return;
    api_tool_event ev = {.kind = kind, .index = index, .text = text, .len = len};
    cb(user, &ev);
}

/* The text from CALLS_BEGIN on was not markup after all: it is content. */
static void fall_back(api_tool_parser *p, api_tool_cb cb, void *user) {
    emit(cb, user, API_TOOL_EVENT_CONTENT, 0, p->all.p + p->content_len,
         p->all.len - p->content_len);
    p->pos = p->all.len;
    p->st = ST_PLAIN;
}

/* A header that cannot be one: fall back before the first call, else skip it. */
static void bad_header(api_tool_parser *p, api_tool_cb cb, void *user) {
    if (p->n_calls == 0) {
        fall_back(p, cb, user);
    } else {
        p->pos = p->hdr; /* rescan after CALL_BEGIN for the next call */
        p->st = ST_BLOCK;
    }
}

static bool start_call(api_tool_parser *p, const char *name, size_t n, api_tool_cb cb, void *user) {
    if (p->n_calls == p->cap_calls) {
        int cap = p->cap_calls ? p->cap_calls * 2 : 4;
        call *c = realloc(p->calls, (size_t)cap * sizeof *c);
        if (!c) return false;
        p->calls = c;
        p->cap_calls = cap;
    }
    call *c = &p->calls[p->n_calls];
    memset(c, 0, sizeof *c);
    if (!(c->name = malloc(n + 1))) return false;
    memcpy(c->name, name, n);
    c->name[n] = '\0';
    memcpy(c->id, "chatcmpl-tool-", 14);
    api_random_hex(c->id + 14, sizeof c->id - 14, 32);
    p->n_calls++;
    if (cb) {
        api_tool_event ev = {
            .kind = API_TOOL_EVENT_CALL, .index = p->n_calls - 1, .id = c->id, .name = c->name};
        cb(user, &ev);
    }
    return true;
}

static bool name_ok(const char *s, size_t n) {
    return n > 0 && n <= NAME_MAX_BYTES && !memchr(s, '\n', n) &&
           !memmem(s, n, MARK, sizeof MARK - 1);
}

/* ---- the states ----------------------------------------------------------------------------- */

/* Each step decides what it can from all[pos..] and returns false when it needs more text. */

static bool step_text(api_tool_parser *p, api_tool_cb cb, void *user) {
    const char *s = p->all.p + p->pos;
    size_t n = p->all.len - p->pos;
    const char *hit = n ? memmem(s, n, CALLS_BEGIN, sizeof CALLS_BEGIN - 1) : NULL;
    if (hit) {
        size_t k = (size_t)(hit - s);
        emit(cb, user, API_TOOL_EVENT_CONTENT, 0, s, k);
        p->content_len = p->pos + k;
        p->pos += k + sizeof CALLS_BEGIN - 1;
        p->st = ST_BLOCK;
        return true;
    }
    size_t keep = partial_tail(s, n, CALLS_BEGIN);
    emit(cb, user, API_TOOL_EVENT_CONTENT, 0, s, n - keep);
    p->pos += n - keep;
    return false;
}

static bool step_block(api_tool_parser *p, api_tool_cb cb, void *user) {
    const char *s = p->all.p + p->pos;
    size_t n = p->all.len - p->pos, k = 0;
    while (k < n && (s[k] == ' ' || s[k] == '\n' || s[k] == '\t' || s[k] == '\r')) k++;
    p->pos += k;
    s += k;
    n -= k;
    if (!n) return false;
    if (starts(s, n, CALL_BEGIN)) {
        p->pos += sizeof CALL_BEGIN - 1;
        p->hdr = p->pos;
        p->st = ST_HEADER;
        return true;
    }
    if (starts(s, n, CALLS_END)) {
        p->pos += sizeof CALLS_END - 1;
        p->st = ST_DONE;
        return true;
    }
    if (may_become(s, n, CALL_BEGIN) || may_become(s, n, CALLS_END)) return false;
    if (p->n_calls == 0) {
        fall_back(p, cb, user);
        return false;
    }
    /* stray text between calls: skip to the next possible marker */
    const char *lt = n > 1 ? memchr(s + 1, '<', n - 1) : NULL;
    p->pos += lt ? (size_t)(lt - s) : n;
    return true;
}

static bool step_header(api_tool_parser *p, api_tool_cb cb, void *user) {
    const char *h = p->all.p + p->hdr;
    size_t n = p->all.len - p->hdr;
    const char *name;
    size_t name_len, after;
    if (p->fmt == API_TOOL_FORMAT_DEEPSEEK_V3) {
        /* function<sep>NAME\n```json\n */
        size_t head = sizeof V3_HEAD - 1;
        if (n < head) {
            if (may_become(h, n, V3_HEAD)) return false;
            bad_header(p, cb, user);
            return true;
        }
        if (!starts(h, n, V3_HEAD)) {
            bad_header(p, cb, user);
            return true;
        }
        name = h + head;
        const char *nl = memchr(name, '\n', n - head);
        if (!nl) {
            if (n - head > NAME_MAX_BYTES || memmem(name, n - head, MARK, sizeof MARK - 1))
                bad_header(p, cb, user);
            return p->st != ST_HEADER;
        }
        name_len = (size_t)(nl - name);
        const char *fence = nl + 1;
        size_t rest = n - head - name_len - 1;
        if (may_become(fence, rest, V3_FENCE)) return false;
        if (!starts(fence, rest, V3_FENCE) || !name_ok(name, name_len)) {
            bad_header(p, cb, user);
            return true;
        }
        after = head + name_len + 1 + sizeof V3_FENCE - 1;
    } else {
        /* NAME<sep> */
        name = h;
        const char *sep = n ? memmem(h, n, SEP, sizeof SEP - 1) : NULL;
        if (!sep) {
            /* still a name, or a name ending in the start of <sep> */
            size_t keep = partial_tail(h, n, SEP);
            if (n - keep > NAME_MAX_BYTES || memchr(h, '\n', n - keep) ||
                memmem(h, n - keep, MARK, sizeof MARK - 1))
                bad_header(p, cb, user);
            return p->st != ST_HEADER;
        }
        name_len = (size_t)(sep - h);
        if (!name_ok(name, name_len)) {
            bad_header(p, cb, user);
            return true;
        }
        after = name_len + sizeof SEP - 1;
    }
    if (!start_call(p, name, name_len, cb, user)) {
        p->oom = true;
        return false;
    }
    p->pos = p->hdr + after;
    p->st = ST_ARGS;
    return true;
}

static bool step_args(api_tool_parser *p, api_tool_cb cb, void *user) {
    const char *s = p->all.p + p->pos;
    size_t n = p->all.len - p->pos;
    const char *ends[3] = {CALL_END, CALLS_END,
                           p->fmt == API_TOOL_FORMAT_DEEPSEEK_V3 ? V3_CLOSE : NULL};
    const char *first = NULL;
    int which = -1;
    for (int k = 0; k < 3; k++) {
        if (!ends[k] || !n) continue;
        const char *hit = memmem(s, n, ends[k], strlen(ends[k]));
        if (hit && (!first || hit < first)) {
            first = hit;
            which = k;
        }
    }
    call *c = &p->calls[p->n_calls - 1];
    size_t k = first ? (size_t)(first - s) : n;
    if (!first) {
        size_t keep = 0;
        for (int e = 0; e < 3; e++) {
            size_t t = ends[e] ? partial_tail(s, n, ends[e]) : 0;
            if (t > keep) keep = t;
        }
        k = n - keep;
    }
    strbuf_add(&c->args, s, k);
    if (c->args.oom) {
        p->oom = true;
        return false;
    }
    emit(cb, user, API_TOOL_EVENT_ARGS, p->n_calls - 1, s, k);
    p->pos += k;
    if (!first) return false;
    p->pos += strlen(ends[which]);
    if (which == 1) {
        p->st = ST_DONE; /* the block closed with the call still open */
    } else {
        c->complete = true;
        p->n_complete++;
        p->st = ST_BLOCK;
    }
    return true;
}

static void run(api_tool_parser *p, api_tool_cb cb, void *user) {
    bool more = true;
    while (more && !p->oom) {
        switch (p->st) {
        case ST_TEXT:
            more = step_text(p, cb, user);
            break;
        case ST_BLOCK:
            more = step_block(p, cb, user);
            break;
        case ST_HEADER:
            more = step_header(p, cb, user);
            break;
        case ST_ARGS:
            more = step_args(p, cb, user);
            break;
        case ST_DONE:
            p->pos = p->all.len;
            more = false;
            break;
        case ST_PLAIN:
            emit(cb, user, API_TOOL_EVENT_CONTENT, 0, p->all.p + p->pos, p->all.len - p->pos);
            p->pos = p->all.len;
            more = false;
            break;
        }
    }
}

duet_status api_tool_parser_feed(api_tool_parser *p, const char *text, size_t len, api_tool_cb cb,
                                 void *user) {
    if (!p || (len && !text)) return DUET_ERR_INVALID;
    if (p->oom) return DUET_ERR_NO_MEMORY;
    strbuf_add(&p->all, text, len);
    if (p->all.oom) p->oom = true;
    if (!p->oom) run(p, cb, user);
    return p->oom ? DUET_ERR_NO_MEMORY : DUET_OK;
}

int api_tool_parser_finish(api_tool_parser *p, api_tool_cb cb, void *user) {
    if (!p || p->oom) return p ? p->n_calls : 0;
    const char *rest = p->all.p ? p->all.p + p->pos : "";
    size_t n = p->all.len - p->pos;
    switch (p->st) {
    case ST_TEXT:
    case ST_PLAIN:
        emit(cb, user, API_TOOL_EVENT_CONTENT, 0, rest, n);
        break;
    case ST_BLOCK:
    case ST_HEADER:
        if (p->n_calls == 0) fall_back(p, cb, user);
        break;
    case ST_ARGS: {
        /* the held tail was arguments after all; the call stays incomplete */
        call *c = &p->calls[p->n_calls - 1];
        strbuf_add(&c->args, rest, n);
        emit(cb, user, API_TOOL_EVENT_ARGS, p->n_calls - 1, rest, n);
        break;
    }
    case ST_DONE:
        break;
    }
    p->pos = p->all.len;
    p->st = p->st == ST_TEXT || p->st == ST_PLAIN ? p->st : ST_DONE;
    return p->n_calls;
}

const char *api_tool_parser_content(const api_tool_parser *p, size_t *len_p) {
    size_t n = p->n_complete ? p->content_len : p->all.len;
    *len_p = n;
    return n ? p->all.p : NULL;
}

int api_tool_parser_n_calls(const api_tool_parser *p) {
    return p->n_complete;
}

/* {"id","type":"function","function":{"name","arguments"}} */
static cJSON *call_json(const call *c) {
    cJSON *o = cJSON_CreateObject(), *fn = NULL;
    char *args = malloc(c->args.len + 1);
    if (args) {
        if (c->args.len) memcpy(args, c->args.p, c->args.len);
        args[c->args.len] = '\0';
    }
    bool ok = o && args && cJSON_AddStringToObject(o, "id", c->id) &&
              cJSON_AddStringToObject(o, "type", "function") &&
              (fn = cJSON_AddObjectToObject(o, "function")) &&
              cJSON_AddStringToObject(fn, "name", c->name) &&
              cJSON_AddStringToObject(fn, "arguments", args);
    free(args);
    if (ok) return o;
    cJSON_Delete(o);
    return NULL;
}

cJSON *api_tool_calls_json(const api_tool_parser *p) {
    if (!p->n_complete) return NULL;
    cJSON *list = cJSON_CreateArray();
    for (int i = 0; list && i < p->n_calls; i++) {
        if (!p->calls[i].complete) continue;
        cJSON *o = call_json(&p->calls[i]);
        if (!o || !cJSON_AddItemToArray(list, o)) {
            cJSON_Delete(o);
            cJSON_Delete(list);
            return NULL;
        }
    }
    return list;
}

cJSON *api_tool_event_json(const api_tool_event *ev) {
    if (!ev || ev->kind == API_TOOL_EVENT_CONTENT) return NULL;
    cJSON *o = cJSON_CreateObject(), *fn = NULL;
    bool ok = o && cJSON_AddNumberToObject(o, "index", ev->index);
    if (ok && ev->kind == API_TOOL_EVENT_CALL) {
        ok = cJSON_AddStringToObject(o, "id", ev->id) &&
             cJSON_AddStringToObject(o, "type", "function") &&
             (fn = cJSON_AddObjectToObject(o, "function")) &&
             cJSON_AddStringToObject(fn, "name", ev->name);
    } else if (ok) {
        char *args = malloc(ev->len + 1);
        ok = args && (fn = cJSON_AddObjectToObject(o, "function"));
        if (ok) {
            if (ev->len) memcpy(args, ev->text, ev->len);
            args[ev->len] = '\0';
            ok = cJSON_AddStringToObject(fn, "arguments", args) != NULL;
        }
        free(args);
    }
    if (ok) return o;
    cJSON_Delete(o);
    return NULL;
}
