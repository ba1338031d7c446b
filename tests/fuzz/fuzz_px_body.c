/* libFuzzer driver for the proxy's JSON legs: bytes before the first NUL are a client's
 * generation request (px_gen_parse), the rest a prefill worker's answer (px_prefill_kv_params).
 * Whatever a client sends, the prefill leg's body must say what the protocol needs to the
 * worker, which reads the first member of a name: one stream (false), one max_tokens (1), one
 * kv_transfer_params with do_remote_decode, no min_tokens or stream_options; the decode leg's
 * body carries exactly the prefill's kv_transfer_params, or none. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "px_body.h"

/* Members of obj named exactly key (cJSON keeps duplicates). */
static int count(const cJSON *obj, const char *key) {
    int n = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, obj) n += it->string && !strcmp(it->string, key);
    return n;
}

static cJSON *parse_printed(char *s, size_t len) {
    if (!s) return NULL; /* out of memory only */
    if (strlen(s) != len) abort();
    cJSON *root = cJSON_Parse(s);
    cJSON_free(s);
    if (!cJSON_IsObject(root)) abort();
    return root;
}

static void check_prefill_body(const px_gen *g) {
    size_t len = 0;
    char *text = px_gen_prefill_body(g, &len);
    cJSON *p = parse_printed(text, len);
    if (!p) return;
    const cJSON *kv = cJSON_GetObjectItemCaseSensitive(p, "kv_transfer_params");
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(p, "max_tokens");
    if (count(p, "stream") != 1 || !cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(p, "stream")))
        abort();
    if (count(p, "max_tokens") != 1 || !cJSON_IsNumber(mt) || mt->valuedouble != 1) abort();
    if (count(p, "kv_transfer_params") != 1 ||
        !cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(kv, "do_remote_decode")))
        abort();
    if (count(p, "min_tokens") || count(p, "stream_options")) abort();
    int mct = count(p, "max_completion_tokens");
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(p, "max_completion_tokens");
    if (mct > 1 || (mct == 1 && (!cJSON_IsNumber(m) || m->valuedouble != 1))) abort();
    cJSON_Delete(p);
}

static void check_decode_body(px_gen *g, const cJSON *kv) {
    size_t len = 0;
    char *text = px_gen_decode_body(g, kv, &len);
    cJSON *d = parse_printed(text, len);
    if (!d) return;
    int n = count(d, "kv_transfer_params");
    if (kv) {
        /* compared as printed text: cJSON_Compare matches duplicate names to the first one */
        char *want = cJSON_PrintUnformatted(kv);
        char *got =
            cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(d, "kv_transfer_params"));
        if (n != 1 || (want && got && strcmp(want, got))) abort();
        cJSON_free(want);
        cJSON_free(got);
    } else if (n != 0) {
        abort();
    }
    cJSON_Delete(d);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *in = (const char *)data;
    const char *nul = memchr(in, '\0', size);
    size_t req_len = nul ? (size_t)(nul - in) : size;
    const char *answer = nul ? nul + 1 : "";
    size_t answer_len = nul ? size - req_len - 1 : 0;

    cJSON *kv = NULL;
    duet_status kst = px_prefill_kv_params(answer, answer_len, &kv);
    if (kst != DUET_OK && kst != DUET_ERR_FORMAT) abort();
    if (kv && !cJSON_IsObject(kv)) abort();

    px_gen g;
    char err[128];
    err[0] = '\0';
    if (px_gen_parse(in, req_len, &g, err, sizeof err) != DUET_OK) {
        if (!err[0] || g.root) abort();
    } else {
        if (!cJSON_IsObject(g.root) || g.prompt_tokens == 0 || g.max_tokens == 0) abort();
        if (px_gen_decode_load(&g) < px_gen_prefill_load(&g)) abort();
        check_prefill_body(&g);
        check_decode_body(&g, kv);
        check_decode_body(&g, NULL);
        px_gen_cleanup(&g);
    }
    cJSON_Delete(kv);
    return 0;
}
