/* A growable byte buffer for the proxy: buffered upstream answers and generated text
 * (/metrics, JSON). Once an allocation fails the buffer stays failed (oom) and appends are
 * no-ops, so callers check once at the end. Caller's storage; any thread. */
#ifndef DUET_PX_BUF_H
#define DUET_PX_BUF_H

#include <stdbool.h>
#include <stddef.h>

typedef struct strbuf {
    char *p; /* NUL-terminated when not NULL */
    size_t len, cap;
    bool oom;
} strbuf;

void strbuf_init(strbuf *b);
void strbuf_free(strbuf *b);
void strbuf_add(strbuf *b, const void *data, size_t n);
void strbuf_str(strbuf *b, const char *s);
void strbuf_printf(strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
