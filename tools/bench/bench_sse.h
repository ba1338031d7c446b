/* duet-bench's reader of server-sent events: the body of a streamed answer, fed in pieces as
 * they arrive, handed back one event's data at a time ("data:" lines joined, comments and other
 * fields skipped). Knows nothing of what the data means. Caller's storage; one thread. */
#ifndef DUET_BENCH_SSE_H
#define DUET_BENCH_SSE_H

#include <stdbool.h>
#include <stddef.h>

#include "base/status.h"
#include "base/strbuf.h"

typedef struct bsse_reader {
    strbuf in;   /* bytes not yet part of a whole event */
    strbuf data; /* the data of the event being read */
    bool has_data;
} bsse_reader;

/* Called for each event that has data; data is NUL-terminated and lives until the call returns.
 * A non-zero return stops the reader (bsse_feed returns it). */
typedef int (*bsse_event_fn)(void *arg, const char *data, size_t len);

void bsse_init(bsse_reader *r);
void bsse_cleanup(bsse_reader *r);

/* Feeds n bytes; calls fn for every event they complete (an event ends at an empty line; lines
 * end with LF, CRLF or CR). Returns 0, fn's first non-zero return, or -1 when out of memory. */
int bsse_feed(bsse_reader *r, const char *p, size_t n, bsse_event_fn fn, void *arg);

/* At the end of the body: an event whose closing empty line never came is delivered all the
 * same (servers are seen to end "data: [DONE]" with a single newline). Returns as bsse_feed. */
int bsse_finish(bsse_reader *r, bsse_event_fn fn, void *arg);

#endif
