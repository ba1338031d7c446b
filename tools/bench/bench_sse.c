/* Server-sent events for duet-bench (bench_sse.h), after the WHATWG event-stream grammar: a
 * field line "name: value" (one space after the colon dropped), "data" lines joined with "\n",
 * lines starting with ':' are comments, an empty line dispatches the event. */
#include "bench_sse.h"

#include <string.h>

void bsse_init(bsse_reader *r) {
    memset(r, 0, sizeof *r);
}

void bsse_cleanup(bsse_reader *r) {
    strbuf_free(&r->in);
    strbuf_free(&r->data);
    r->has_data = false;
}

/* One line (without its end). */
static int take_line(bsse_reader *r, const char *line, size_t n, bsse_event_fn fn, void *arg) {
    if (n == 0) {
        if (!r->has_data) return 0;
        int rc = fn(arg, r->data.p ? r->data.p : "", r->data.len);
        r->data.len = 0;
        if (r->data.p) r->data.p[0] = '\0';
        r->has_data = false;
        return rc;
    }
    if (line[0] == ':') return 0;
    const char *colon = memchr(line, ':', n);
    size_t name_len = colon ? (size_t)(colon - line) : n;
    if (name_len != 4 || memcmp(line, "data", 4)) return 0; /* event, id, retry: not needed */
    const char *v = colon ? colon + 1 : line + n;
    size_t vn = (size_t)(line + n - v);
    if (vn && *v == ' ') v++, vn--;
    if (r->has_data) strbuf_add(&r->data, "\n", 1);
    strbuf_add(&r->data, v, vn);
    if (!r->data.p) strbuf_add(&r->data, "", 0);
    r->has_data = true;
    return r->data.oom ? -1 : 0;
}

int bsse_feed(bsse_reader *r, const char *p, size_t n, bsse_event_fn fn, void *arg) {
    strbuf_add(&r->in, p, n);
    if (r->in.oom) return -1;
    size_t start = 0, len = r->in.len;
    const char *b = r->in.p;
    int rc = 0;
    for (size_t i = 0; i < len && rc == 0; i++) {
        if (b[i] != '\n' && b[i] != '\r') continue;
        /* a CR at the very end may be the first half of CRLF: wait for the next byte */
        if (b[i] == '\r' && i + 1 == len) break;
        rc = take_line(r, b + start, i - start, fn, arg);
        if (b[i] == '\r' && b[i + 1] == '\n') i++;
        start = i + 1;
    }
    memmove(r->in.p, r->in.p + start, len - start);
    r->in.len = len - start;
    r->in.p[r->in.len] = '\0';
    return rc;
}

int bsse_finish(bsse_reader *r, bsse_event_fn fn, void *arg) {
    int rc = 0;
    if (r->in.len) {
        size_t n = r->in.len;
        if (r->in.p[n - 1] == '\r') n--;
        rc = take_line(r, r->in.p, n, fn, arg);
        r->in.len = 0;
    }
    if (rc == 0) rc = take_line(r, "", 0, fn, arg);
    return rc;
}
