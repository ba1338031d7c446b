/* A growable byte string for text the servers and tools build (JSON, SSE, metrics, prompts):
 * NUL-terminated once anything is in it; once an allocation fails, oom sticks and appends do
 * nothing, so a caller checks once at the end. Caller's storage; one thread at a time. */
#ifndef DUET_STRBUF_H
#define DUET_STRBUF_H

#include <stdbool.h>
#include <stddef.h>

typedef struct strbuf {
    char *p;
    size_t len, cap;
    bool oom;
} strbuf;

void strbuf_init(strbuf *b);
/* Frees the text and leaves b empty (reusable). */
void strbuf_free(strbuf *b);
/* Empties b but keeps its memory, for a buffer reused call after call; clears oom. */
void strbuf_clear(strbuf *b);
void strbuf_add(strbuf *b, const void *data, size_t n);
void strbuf_str(strbuf *b, const char *s);
void strbuf_printf(strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
