/* libFuzzer driver for the HTTP client's response parser (what a backend, or anything posing as
 * one, sends the proxy). The first byte picks how the rest is split into reads and whether the
 * request was a HEAD; the end of input is fed as the connection closing. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "net/httpc-impl.h"

typedef struct sink {
    int heads;
    size_t body;
} sink;

static int on_head(httpc_parse *p) {
    sink *s = p->data;
    const httpc_response *r = &p->resp;
    if (s->heads++ || r->status < 100 || r->status > 999 || (r->num_headers && !r->headers))
        abort();
    if (r->status < 200 && r->status != 101) abort(); /* interim answers are not heads */
    for (size_t i = 0; i < r->num_headers; i++)
        if (!r->headers[i].name || !r->headers[i].value) abort();
    return 0;
}

static int on_body(httpc_parse *p, const char *at, size_t n) {
    sink *s = p->data;
    if (!s->heads || !at || !n || p->head_request) abort();
    s->body += n;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0;
    size_t step = (size_t)(data[0] % 32) + 1;
    bool head = data[0] & 0x80;
    const char *in = (const char *)data + 1;
    size_t len = size - 1;
    sink s = {0};
    httpc_parse p;
    httpc_parse_init(&p, 1024, head); /* small: the header limit is reachable */
    p.on_head = on_head;
    p.on_body = on_body;
    p.data = &s;
    size_t pos = 0;
    while (pos < len && !p.complete && !p.failed) {
        size_t n = len - pos < step ? len - pos : step;
        size_t used = httpc_parse_feed(&p, in + pos, n);
        if (used > n) abort();
        if (used < n && !p.complete && !p.failed) abort(); /* stopped for no reason */
        pos += used;
    }
    if (!p.complete && !p.failed) httpc_parse_feed(&p, NULL, 0); /* the connection ends */
    if (p.complete && p.failed) abort();
    if (!p.complete && !p.failed) abort(); /* after the end it must have decided */
    if (p.complete && !s.heads) abort();
    if (s.body > len) abort(); /* de-chunking only removes bytes */
    if (p.complete) {          /* nothing more is parsed after a complete response */
        size_t before = s.body;
        if (httpc_parse_feed(&p, "HTTP/1.1 200 OK\r\n\r\n", 19) != 0 || s.body != before) abort();
    }
    httpc_parse_cleanup(&p);
    return 0;
}
