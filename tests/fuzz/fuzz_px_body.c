/* libFuzzer driver for the proxy's JSON legs: bytes before the first NUL are a client's
 * generation request (px_gen_parse), the rest a prefill worker's answer, read both as a whole
 * answer (px_prefill_kv_params) and as a streamed one (px_sse_next, px_sse_prefill_event).
 * Whatever a client sends, the prefill leg's body must say what the protocol needs to the
 * worker, which reads the first member of a name: one stream (false; true in the streamed
 * body, which differs from the whole one in nothing else), one max_tokens (1), one
 * kv_transfer_params with do_remote_decode, no min_tokens or stream_options; the decode leg's
 * body carries exactly the prefill's kv_transfer_params, or none. Whatever a worker streams,
 * the events are cut the same whatever the reads' sizes (px_sse_may_be_whole never skips a
 * whole one), each cut ends at its empty line, and an event's kind and params do not depend on
 * its line ends or on how its JSON is spread over data lines. */
#include <stdbool.h>
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

/* The whole (stream false) or the streamed prefill body; the parsed body, NULL when out of
 * memory. */
static cJSON *check_prefill_body(const px_gen *g, bool streamed) {
    size_t len = 0;
    char *text = streamed ? px_gen_prefill_body_streamed(g, &len) : px_gen_prefill_body(g, &len);
    cJSON *p = parse_printed(text, len);
    if (!p) return NULL;
    const cJSON *kv = cJSON_GetObjectItemCaseSensitive(p, "kv_transfer_params");
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(p, "max_tokens");
    const cJSON *stream = cJSON_GetObjectItemCaseSensitive(p, "stream");
    if (count(p, "stream") != 1 || !cJSON_IsBool(stream) || cJSON_IsTrue(stream) != streamed)
        abort();
    if (count(p, "max_tokens") != 1 || !cJSON_IsNumber(mt) || mt->valuedouble != 1) abort();
    if (count(p, "kv_transfer_params") != 1 ||
        !cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(kv, "do_remote_decode")))
        abort();
    if (count(p, "min_tokens") || count(p, "stream_options")) abort();
    int mct = count(p, "max_completion_tokens");
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(p, "max_completion_tokens");
    if (mct > 1 || (mct == 1 && (!cJSON_IsNumber(m) || m->valuedouble != 1))) abort();
    return p;
}

/* The two prefill bodies differ in "stream" only (a prefill endpoint without early params gets
 * the whole one, as with --early-decode off). */
static void check_prefill_bodies(const px_gen *g) {
    cJSON *whole = check_prefill_body(g, false);
    cJSON *streamed = check_prefill_body(g, true);
    if (whole && streamed) {
        cJSON_ReplaceItemInObjectCaseSensitive(streamed, "stream", cJSON_CreateFalse());
        char *a = cJSON_PrintUnformatted(whole);
        char *b = cJSON_PrintUnformatted(streamed);
        if (a && b && strcmp(a, b)) abort();
        cJSON_free(a);
        cJSON_free(b);
    }
    cJSON_Delete(whole);
    cJSON_Delete(streamed);
}

/* ---- a streamed prefill answer ---- */

enum { MAX_EVENTS = 4096 };

typedef struct cut {
    size_t at, len; /* an event: its offset in the stream and its length to its empty line */
} cut;

/* Cuts stream[0, len) into events as the proxy does (a buffer of the bytes not yet cut, fed
 * `step` bytes at a time); returns how many; *rest_p gets the bytes left uncut. */
static size_t cut_events(const char *stream, size_t len, size_t step, cut *out, size_t *rest_p) {
    size_t n = 0, start = 0; /* the buffer is stream[start, fed) */
    for (size_t fed = 0; fed < len;) {
        size_t before = fed - start; /* bytes held, no whole event among them */
        fed += len - fed < step ? len - fed : step;
        /* the proxy cuts only where the new bytes may have made an event whole */
        bool may = px_sse_may_be_whole(stream + start, fed - start, before);
        for (bool first = true;; first = false) {
            size_t ev_len = (size_t)-1;
            size_t used = px_sse_next(stream + start, fed - start, &ev_len);
            if (used && first && !may) abort();
            if (!used) break;
            /* The cut ends with its empty line, "\n" or "\r\n", and holds no other. */
            if (used > fed - start || ev_len >= used) abort();
            const char *end = stream + start + ev_len;
            size_t blank = used - ev_len;
            if (!(blank == 1 && end[0] == '\n') && !(blank == 2 && !memcmp(end, "\r\n", 2)))
                abort();
            if (ev_len && end[-1] != '\n') abort();
            if (n == MAX_EVENTS) abort();
            out[n++] = (cut){start, ev_len};
            start += used;
        }
    }
    *rest_p = len - start;
    return n;
}

/* True when buf[0, len) holds an empty line: at its start, or after a line end. */
static bool has_empty_line(const char *buf, size_t len) {
    for (size_t i = 0; i < len; i++) {
        if (i && buf[i - 1] != '\n') continue;
        if (buf[i] == '\n' || (buf[i] == '\r' && i + 1 < len && buf[i + 1] == '\n')) return true;
    }
    return false;
}

static char *print_kv(const cJSON *kv) {
    return kv ? cJSON_PrintUnformatted(kv) : NULL;
}

/* The kind of an event and its params printed (NULL: none), the same with kv_p NULL. */
static px_sse_kind event_kind(const char *ev, size_t len, char **kv_text_p) {
    cJSON *kv = (cJSON *)1;
    px_sse_kind kind = px_sse_prefill_event(ev, len, &kv);
    if ((kind == PX_SSE_KV) != (kv != NULL)) abort();
    if (kv && !cJSON_IsObject(kv)) abort();
    if (px_sse_prefill_event(ev, len, NULL) != kind) abort();
    *kv_text_p = print_kv(kv);
    cJSON_Delete(kv);
    return kind;
}

static bool same_text(const char *a, const char *b) {
    return (!a && !b) || (a && b && !strcmp(a, b));
}

/* The same event with every line end "\r\n" (when it has no CR of its own) must read the same;
 * so must its params sent back as one event, or spread over data lines one per printed line. */
static void check_event(const char *ev, size_t len) {
    char *kv_text = NULL;
    px_sse_kind kind = event_kind(ev, len, &kv_text);
    if (!memchr(ev, '\r', len)) {
        char *crlf = malloc(2 * len + 1);
        if (crlf) {
            size_t n = 0;
            for (size_t i = 0; i < len; i++) {
                if (ev[i] == '\n') crlf[n++] = '\r';
                crlf[n++] = ev[i];
            }
            char *kv2 = NULL;
            if (event_kind(crlf, n, &kv2) != kind || !same_text(kv_text, kv2)) abort();
            cJSON_free(kv2);
            free(crlf);
        }
    }
    if (kind == PX_SSE_KV && kv_text) {
        cJSON *o = cJSON_CreateObject();
        cJSON *kv = cJSON_Parse(kv_text);
        if (o && kv && cJSON_AddItemToObject(o, "kv_transfer_params", kv)) {
            kv = NULL;
            char *pretty = cJSON_Print(o); /* lines end with \n: one data line each */
            size_t plen = pretty ? strlen(pretty) : 0;
            char *re = pretty ? malloc(plen * 7 + 8) : NULL;
            if (re) {
                size_t n = 0;
                bool line_start = true;
                for (size_t i = 0; i < plen; i++) {
                    if (line_start) {
                        memcpy(re + n, "data: ", 6);
                        n += 6;
                    }
                    re[n++] = pretty[i];
                    line_start = pretty[i] == '\n';
                }
                re[n++] = '\n';
                char *kv2 = NULL;
                if (event_kind(re, n, &kv2) != PX_SSE_KV || !same_text(kv_text, kv2)) abort();
                cJSON_free(kv2);
                free(re);
            }
            cJSON_free(pretty);
        }
        cJSON_Delete(kv);
        cJSON_Delete(o);
    }
    cJSON_free(kv_text);
}

static void check_stream(const char *stream, size_t len, size_t step) {
    static cut whole[MAX_EVENTS], parts[MAX_EVENTS];
    size_t rest = 0, rest2 = 0;
    size_t n = cut_events(stream, len, len ? len : 1, whole, &rest);
    /* Nothing after the last cut holds an empty line: no event is left behind. */
    if (has_empty_line(stream + len - rest, rest)) abort();
    size_t n2 = cut_events(stream, len, step, parts, &rest2);
    if (n2 != n || rest2 != rest || memcmp(whole, parts, n * sizeof *whole)) abort();
    for (size_t i = 0; i < n; i++) check_event(stream + whole[i].at, whole[i].len);
    /* What is left when the stream ends is no event, but is read as one all the same. */
    char *kv_text = NULL;
    event_kind(stream + len - rest, rest, &kv_text);
    cJSON_free(kv_text);
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
        check_prefill_bodies(&g);
        check_decode_body(&g, kv);
        check_decode_body(&g, NULL);
        px_gen_cleanup(&g);
    }
    cJSON_Delete(kv);
    check_stream(answer, answer_len, req_len % 13 + 1);
    return 0;
}
