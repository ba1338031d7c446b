/* Request and response bodies of the two legs; see px_body.h. Estimates are cheap on purpose:
 * the balancer needs relative weights, not a tokenizer. */
#include "px_body.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
    BYTES_PER_TOKEN = 4,
    PER_MESSAGE_TOKENS = 4,        /* chat template around each message */
    DEFAULT_MAX_TOKENS = 16,       /* vLLM's default for completions */
    DEFAULT_CHAT_MAX_TOKENS = 256, /* chat has no fixed default; a typical answer */
};

static uint64_t text_tokens(const cJSON *s) {
    return cJSON_IsString(s) ? (strlen(s->valuestring) + BYTES_PER_TOKEN - 1) / BYTES_PER_TOKEN : 0;
}

/* "prompt": a string, token ids, a list of strings or a list of token-id lists. */
static uint64_t prompt_tokens(const cJSON *p) {
    if (cJSON_IsString(p)) return text_tokens(p);
    if (!cJSON_IsArray(p)) return 0;
    uint64_t n = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, p) {
        if (cJSON_IsNumber(e))
            n++;
        else if (cJSON_IsString(e))
            n += text_tokens(e);
        else if (cJSON_IsArray(e))
            n += (uint64_t)cJSON_GetArraySize(e);
    }
    return n;
}

/* "messages": content as a string or a list of parts with "text". */
static uint64_t messages_tokens(const cJSON *msgs) {
    uint64_t n = 0;
    const cJSON *m;
    cJSON_ArrayForEach(m, msgs) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(m, "content");
        n += PER_MESSAGE_TOKENS + text_tokens(c);
        const cJSON *part;
        if (cJSON_IsArray(c))
            cJSON_ArrayForEach(part, c) n +=
                text_tokens(cJSON_GetObjectItemCaseSensitive(part, "text"));
    }
    return n;
}

duet_status px_gen_parse(const char *body, size_t len, px_gen *g, char *err, size_t errlen) {
    memset(g, 0, sizeof *g);
    cJSON *root = cJSON_ParseWithLength(body, len);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        snprintf(err, errlen,
                 root ? "the request body must be a JSON object"
                      : "the request body is not valid JSON");
        return DUET_ERR_INVALID;
    }
    const cJSON *stream = cJSON_GetObjectItemCaseSensitive(root, "stream");
    if (stream && !cJSON_IsBool(stream) && !cJSON_IsNull(stream)) {
        cJSON_Delete(root);
        snprintf(err, errlen, "'stream' must be a boolean");
        return DUET_ERR_INVALID;
    }
    g->root = root;
    g->stream = cJSON_IsTrue(stream);
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(root, "messages");
    g->prompt_tokens = cJSON_IsArray(msgs)
                           ? messages_tokens(msgs)
                           : prompt_tokens(cJSON_GetObjectItemCaseSensitive(root, "prompt"));
    if (g->prompt_tokens == 0) g->prompt_tokens = 1;
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(root, "max_completion_tokens");
    if (!cJSON_IsNumber(mt)) mt = cJSON_GetObjectItemCaseSensitive(root, "max_tokens");
    if (cJSON_IsNumber(mt) && mt->valuedouble >= 1 && mt->valuedouble < 1e9)
        g->max_tokens = (uint64_t)mt->valuedouble;
    else
        g->max_tokens = cJSON_IsArray(msgs) ? DEFAULT_CHAT_MAX_TOKENS : DEFAULT_MAX_TOKENS;
    return DUET_OK;
}

void px_gen_cleanup(px_gen *g) {
    cJSON_Delete(g->root);
    g->root = NULL;
}

uint64_t px_gen_prefill_load(const px_gen *g) {
    return g->prompt_tokens;
}

uint64_t px_gen_decode_load(const px_gen *g) {
    return g->prompt_tokens + g->max_tokens;
}

/* Removes every member named key: a client may send a name twice, cJSON keeps both and the
 * worker reads the first. */
static void delete_all(cJSON *obj, const char *key) {
    while (cJSON_GetObjectItemCaseSensitive(obj, key))
        cJSON_DeleteItemFromObjectCaseSensitive(obj, key);
}

/* Sets key to item (taking it), replacing any earlier value in the first one's place (clients
 * read JSON, but people read "id" first) and dropping later duplicates. */
static bool set_item(cJSON *obj, const char *key, cJSON *item) {
    if (!item) return false;
    cJSON *first = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (first) {
        for (cJSON *it = first->next, *next; it; it = next) {
            next = it->next;
            if (it->string && strcmp(it->string, key) == 0)
                cJSON_Delete(cJSON_DetachItemViaPointer(obj, it));
        }
        return cJSON_ReplaceItemInObjectCaseSensitive(obj, key, item);
    }
    if (!cJSON_AddItemToObject(obj, key, item)) {
        cJSON_Delete(item);
        return false;
    }
    return true;
}

static char *print(const cJSON *root, size_t *len_p) {
    char *s = cJSON_PrintUnformatted(root);
    if (s && len_p) *len_p = strlen(s);
    return s;
}

static char *prefill_body(const px_gen *g, bool stream, size_t *len_p) {
    cJSON *p = cJSON_Duplicate(g->root, 1);
    if (!p) return NULL;
    cJSON *kv = cJSON_CreateObject();
    bool ok = kv && cJSON_AddTrueToObject(kv, "do_remote_decode");
    if (!ok) cJSON_Delete(kv);
    ok = ok && set_item(p, "kv_transfer_params", kv);
    ok = ok && set_item(p, "stream", cJSON_CreateBool(stream));
    ok = ok && set_item(p, "max_tokens", cJSON_CreateNumber(1));
    if (ok && cJSON_HasObjectItem(p, "max_completion_tokens"))
        ok = set_item(p, "max_completion_tokens", cJSON_CreateNumber(1));
    delete_all(p, "stream_options");
    /* min_tokens > 1 with max_tokens 1 is a validation error in vLLM. */
    delete_all(p, "min_tokens");
    /* One prompt's KV is computed once: the decode worker makes the n choices from it. */
    if (ok && cJSON_HasObjectItem(p, "n")) ok = set_item(p, "n", cJSON_CreateNumber(1));
    delete_all(p, "best_of");
    char *s = ok ? print(p, len_p) : NULL;
    cJSON_Delete(p);
    return s;
}

char *px_gen_prefill_body(const px_gen *g, size_t *len_p) {
    return prefill_body(g, false, len_p);
}

char *px_gen_prefill_body_streamed(const px_gen *g, size_t *len_p) {
    return prefill_body(g, true, len_p);
}

char *px_gen_decode_body(px_gen *g, const cJSON *kv, size_t *len_p) {
    if (!kv) {
        delete_all(g->root, "kv_transfer_params");
        return print(g->root, len_p);
    }
    if (!set_item(g->root, "kv_transfer_params", cJSON_Duplicate(kv, 1))) return NULL;
    return print(g->root, len_p);
}

duet_status px_prefill_kv_params(const char *body, size_t len, cJSON **kv_p) {
    *kv_p = NULL;
    cJSON *root = cJSON_ParseWithLength(body, len);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return DUET_ERR_FORMAT;
    }
    cJSON *kv = cJSON_DetachItemFromObjectCaseSensitive(root, "kv_transfer_params");
    cJSON_Delete(root);
    if (kv && !cJSON_IsObject(kv)) {
        cJSON_Delete(kv);
        kv = NULL;
    }
    *kv_p = kv;
    return DUET_OK;
}

/* ---- a streamed prefill answer ---- */

size_t px_sse_next(const char *buf, size_t len, size_t *ev_len_p) {
    /* Lines end with \n (a \r before it is dropped); an empty line ends the event. */
    size_t at = 0;
    while (at < len) {
        const char *nl = memchr(buf + at, '\n', len - at);
        if (!nl) return 0;
        size_t end = (size_t)(nl - buf);
        size_t line = end - at;
        if (line && buf[end - 1] == '\r') line--;
        if (line == 0) {
            *ev_len_p = at;
            return end + 1;
        }
        at = end + 1;
    }
    return 0;
}

bool px_sse_may_be_whole(const char *buf, size_t len, size_t old_len) {
    /* An event ends at an empty line: "\n" or "\r\n" at the start, else after a "\n". The old
     * bytes held none, so a new one ends in the new bytes. */
    if (len == 0) return false;
    if (old_len > len) old_len = 0; /* not the same buffer: look at all of it */
    size_t from = old_len > 2 ? old_len - 2 : 0;
    if (from == 0 && (buf[0] == '\n' || (len > 1 && buf[0] == '\r' && buf[1] == '\n'))) return true;
    return memmem(buf + from, len - from, "\n\n", 2) || memmem(buf + from, len - from, "\n\r\n", 3);
}

px_sse_kind px_sse_prefill_event(const char *ev, size_t len, cJSON **kv_p) {
    if (kv_p) *kv_p = NULL;
    /* The data lines' values joined with \n (the SSE rule), "data:" and one space dropped. */
    char *data = malloc(len + 1);
    if (!data) return PX_SSE_OTHER;
    size_t n = 0;
    bool any = false;
    for (size_t at = 0; at < len;) {
        const char *nl = memchr(ev + at, '\n', len - at);
        size_t end = nl ? (size_t)(nl - ev) : len;
        size_t ll = end - at;
        if (ll && ev[at + ll - 1] == '\r') ll--;
        const char *line = ev + at;
        if (ll >= 5 && !memcmp(line, "data:", 5)) {
            size_t skip = ll > 5 && line[5] == ' ' ? 6 : 5;
            if (any) data[n++] = '\n';
            memcpy(data + n, line + skip, ll - skip);
            n += ll - skip;
            any = true;
        }
        at = end + 1;
    }
    px_sse_kind kind = PX_SSE_OTHER;
    if (any && n == 6 && !memcmp(data, "[DONE]", 6)) {
        kind = PX_SSE_DONE;
    } else if (any) {
        cJSON *root = cJSON_ParseWithLength(data, n);
        cJSON *kv = cJSON_GetObjectItemCaseSensitive(root, "kv_transfer_params");
        if (root && (!cJSON_IsObject(root) || cJSON_HasObjectItem(root, "error"))) {
            kind = PX_SSE_ERROR;
        } else if (cJSON_IsObject(kv)) {
            kind = PX_SSE_KV;
            if (kv_p) *kv_p = cJSON_DetachItemViaPointer(root, kv);
        }
        cJSON_Delete(root);
    }
    free(data);
    return kind;
}

/* A list of prompts: strings or token-id lists (a list of numbers is one prompt). */
int px_gen_prompt_count(const px_gen *g) {
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(g->root, "prompt");
    if (!cJSON_IsArray(p) || !p->child || cJSON_IsNumber(p->child)) return 1;
    return cJSON_GetArraySize(p);
}

int px_gen_n(const px_gen *g) {
    const cJSON *n = cJSON_GetObjectItemCaseSensitive(g->root, "n");
    return cJSON_IsNumber(n) && n->valuedouble >= 1 && n->valuedouble <= 1e6 ? (int)n->valuedouble
                                                                             : 1;
}

bool px_gen_include_usage(const px_gen *g) {
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(g->root, "stream_options");
    return cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(so, "include_usage"));
}

duet_status px_gen_part(const px_gen *g, int i, px_gen *out) {
    memset(out, 0, sizeof *out);
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(g->root, "prompt");
    const cJSON *one = cJSON_GetArrayItem(list, i);
    if (!one) return DUET_ERR_INVALID;
    cJSON *root = cJSON_Duplicate(g->root, 1);
    if (!root || !set_item(root, "prompt", cJSON_Duplicate(one, 1))) {
        cJSON_Delete(root);
        return DUET_ERR_NO_MEMORY;
    }
    out->root = root;
    out->stream = g->stream;
    out->prompt_tokens = prompt_tokens(one);
    if (out->prompt_tokens == 0) out->prompt_tokens = 1;
    out->max_tokens = g->max_tokens;
    return DUET_OK;
}

/* ---- merging the parts of a split request ---- */

static void usage_add(cJSON *sum, const cJSON *u) {
    static const char *const keys[] = {"prompt_tokens", "completion_tokens", "total_tokens"};
    for (size_t k = 0; k < sizeof keys / sizeof *keys; k++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(u, keys[k]);
        cJSON *s = cJSON_GetObjectItemCaseSensitive(sum, keys[k]);
        if (!cJSON_IsNumber(v)) continue;
        if (s)
            cJSON_SetNumberValue(s, s->valuedouble + v->valuedouble);
        else
            cJSON_AddNumberToObject(sum, keys[k], v->valuedouble);
    }
}

/* Choice i of part p is choice p * n + i of the whole: vLLM's prompt-major order. */
static void reindex(cJSON *choices, int offset) {
    cJSON *c;
    cJSON_ArrayForEach(c, choices) {
        cJSON *idx = cJSON_GetObjectItemCaseSensitive(c, "index");
        if (cJSON_IsNumber(idx)) cJSON_SetNumberValue(idx, idx->valuedouble + offset);
    }
}

px_chunk_kind px_merge_chunk(cJSON *chunk, int offset, const char *id, cJSON *usage_sum) {
    if (!cJSON_IsObject(chunk)) return PX_CHUNK_ERROR;
    if (cJSON_GetObjectItemCaseSensitive(chunk, "error")) return PX_CHUNK_ERROR;
    cJSON *choices = cJSON_GetObjectItemCaseSensitive(chunk, "choices");
    const cJSON *usage = cJSON_GetObjectItemCaseSensitive(chunk, "usage");
    if (cJSON_IsArray(choices) && !choices->child && cJSON_IsObject(usage)) {
        usage_add(usage_sum, usage);
        return PX_CHUNK_USAGE;
    }
    reindex(choices, offset);
    if (id && cJSON_HasObjectItem(chunk, "id")) set_item(chunk, "id", cJSON_CreateString(id));
    return PX_CHUNK_DATA;
}

cJSON *px_merge_answers(cJSON *const *answers, int n_parts, int n, const char *id) {
    if (n_parts < 1 || !cJSON_IsObject(answers[0])) return NULL;
    cJSON *out = cJSON_Duplicate(answers[0], 1);
    cJSON *choices = cJSON_CreateArray();
    cJSON *usage = cJSON_CreateObject();
    if (!out || !choices || !usage) {
        cJSON_Delete(out);
        cJSON_Delete(choices);
        cJSON_Delete(usage);
        return NULL;
    }
    for (int p = 0; p < n_parts; p++) {
        cJSON *part = cJSON_Duplicate(cJSON_GetObjectItemCaseSensitive(answers[p], "choices"), 1);
        reindex(part, p * n);
        while (part && part->child)
            cJSON_AddItemToArray(choices, cJSON_DetachItemViaPointer(part, part->child));
        cJSON_Delete(part);
        usage_add(usage, cJSON_GetObjectItemCaseSensitive(answers[p], "usage"));
    }
    cJSON_AddNullToObject(usage, "prompt_tokens_details");
    set_item(out, "choices", choices);
    set_item(out, "usage", usage);
    if (id) set_item(out, "id", cJSON_CreateString(id));
    if (cJSON_HasObjectItem(out, "kv_transfer_params"))
        set_item(out, "kv_transfer_params", cJSON_CreateNull());
    return out;
}
