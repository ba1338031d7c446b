/* A growable byte buffer for the proxy: buffered upstream answers and generated text
 * (/metrics, JSON). Once an allocation fails the buffer stays failed (oom) and appends are
 * no-ops, so callers check once at the end. Caller's storage; any thread. */
#ifndef DUET_PX_BUF_H
#define DUET_PX_BUF_H

#include <stdbool.h>
#include <stddef.h>

typedef struct px_buf {
    char *p; /* NUL-terminated when not NULL */
    size_t len, cap;
    bool oom;
} px_buf;

void px_buf_init(px_buf *b);
void px_buf_cleanup(px_buf *b);
void px_buf_add(px_buf *b, const void *data, size_t n);
void px_buf_str(px_buf *b, const char *s);
void px_buf_printf(px_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
