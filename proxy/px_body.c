/* Request and response bodies of the two legs; see px_body.h. Estimates are cheap on purpose:
 * the balancer needs relative weights, not a tokenizer. */
#include "px_body.h"

#include <stdio.h>
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

/* Sets key to item (taking it), replacing any earlier value. */
static bool set_item(cJSON *obj, const char *key, cJSON *item) {
    if (!item) return false;
    delete_all(obj, key);
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

char *px_gen_prefill_body(const px_gen *g, size_t *len_p) {
    cJSON *p = cJSON_Duplicate(g->root, 1);
    if (!p) return NULL;
    cJSON *kv = cJSON_CreateObject();
    bool ok = kv && cJSON_AddTrueToObject(kv, "do_remote_decode");
    if (!ok) cJSON_Delete(kv);
    ok = ok && set_item(p, "kv_transfer_params", kv);
    ok = ok && set_item(p, "stream", cJSON_CreateFalse());
    ok = ok && set_item(p, "max_tokens", cJSON_CreateNumber(1));
    if (ok && cJSON_HasObjectItem(p, "max_completion_tokens"))
        ok = set_item(p, "max_completion_tokens", cJSON_CreateNumber(1));
    delete_all(p, "stream_options");
    /* min_tokens > 1 with max_tokens 1 is a validation error in vLLM. */
    delete_all(p, "min_tokens");
    char *s = ok ? print(p, len_p) : NULL;
    cJSON_Delete(p);
    return s;
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
