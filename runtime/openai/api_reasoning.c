/* DeepSeek-R1 reasoning split on text, the way vLLM's deepseek_r1 parser reads an answer:
 * "<think>" (optional) reasoning "</think>" content. Works on text rather than token ids so it
 * also serves tokenizers where the tags are not single tokens; see api.h. */
#include <string.h>

#include "openai/api.h"

static const char k_open[] = "<think>";
static const char k_close[] = "</think>";

enum { ST_START = 0, ST_REASON = 1, ST_CONTENT = 2 };

void api_reasoner_init(api_reasoner *r) {
    memset(r, 0, sizeof *r);
}

/* Longest suffix of s[0..n) that is a proper prefix of tag. */
static size_t partial_tail(const char *s, size_t n, const char *tag) {
    size_t t = strlen(tag);
    for (size_t k = t - 1; k > 0; k--)
        if (k <= n && !memcmp(s + n - k, tag, k)) return k;
    return 0;
}

void api_reasoner_feed(api_reasoner *r, const char *text, size_t len, strbuf *reason,
                       strbuf *content) {
    strbuf all = {0};
    strbuf_add(&all, r->hold, r->hold_len);
    strbuf_add(&all, text, len);
    r->hold_len = 0;
    if (all.oom) {
        reason->oom = true;
        strbuf_free(&all);
        return;
    }
    const char *p = all.p ? all.p : "";
    size_t n = all.len;
    if (r->state == ST_START) {
        size_t ol = sizeof k_open - 1;
        if (n >= ol && !memcmp(p, k_open, ol)) {
            p += ol;
            n -= ol;
            r->state = ST_REASON;
        } else if (n < ol && !memcmp(p, k_open, n)) {
            memcpy(r->hold, p, n); /* could still become "<think>" */
            r->hold_len = n;
            strbuf_free(&all);
            return;
        } else {
            r->state = ST_REASON;
        }
    }
    if (r->state == ST_REASON) {
        const char *end = n ? memmem(p, n, k_close, sizeof k_close - 1) : NULL;
        if (end) {
            strbuf_add(reason, p, (size_t)(end - p));
            size_t used = (size_t)(end - p) + sizeof k_close - 1;
            p += used;
            n -= used;
            r->state = ST_CONTENT;
        } else {
            size_t keep = partial_tail(p, n, k_close);
            strbuf_add(reason, p, n - keep);
            memcpy(r->hold, p + n - keep, keep);
            r->hold_len = keep;
            n = 0;
        }
    }
    if (r->state == ST_CONTENT) strbuf_add(content, p, n);
    strbuf_free(&all);
}

void api_reasoner_finish(api_reasoner *r, strbuf *reason, strbuf *content) {
    if (r->hold_len) {
        if (r->state == ST_CONTENT)
            strbuf_add(content, r->hold, r->hold_len);
        else
            strbuf_add(reason, r->hold, r->hold_len);
    }
    r->hold_len = 0;
    if (r->state == ST_START) r->state = ST_REASON;
}
