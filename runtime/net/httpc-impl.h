/* Internals of httpc.c that tests and the fuzz driver reach without a socket: the response
 * parser (libhttp-parser in response mode plus our header limit and header collection).
 * Not for other modules. Any thread, one parser per thread at a time. */
#ifndef DUET_HTTPC_IMPL_H
#define DUET_HTTPC_IMPL_H

#include <http_parser.h>

#include "net/httpc.h"

typedef struct httpc_parse httpc_parse;

/* Turns the bytes of one response into a head, body pieces and an end. The sink callbacks
 * return 0 to go on, anything else to stop parsing (the parse is then failed). */
struct httpc_parse {
    http_parser parser;
    size_t max_header_bytes;
    bool head_request; /* the response to a HEAD has no body whatever its headers say */
    int (*on_head)(httpc_parse *p); /* head in p->resp */
    int (*on_body)(httpc_parse *p, const char *at, size_t n);
    void *data; /* the sink's */

    httpc_response resp; /* valid from on_head to the next reset */
    bool head_done;
    bool complete;   /* the whole response was read */
    bool keep_alive; /* when complete: the connection may carry another request */
    bool failed;     /* err says why; nothing more is parsed */
    char err[96];

    /* The status line's reason is skipped; header names and values, NUL-separated. */
    char *hbuf;
    size_t hlen, hcap;
    size_t *offs; /* name, value offsets into hbuf, pairwise */
    size_t noffs, offs_cap;
    http_header *headers;
    size_t header_bytes;
    int last; /* which kind of piece the parser sent last */
};

void httpc_parse_init(httpc_parse *p, size_t max_header_bytes, bool head_request);
void httpc_parse_cleanup(httpc_parse *p);

/* Parses up to len bytes and returns how many were used: stops after a complete response
 * (bytes after it are not part of it) or an error. len 0 tells it the connection ended, which
 * completes a response delimited by the end of the connection. */
size_t httpc_parse_feed(httpc_parse *p, const char *data, size_t len);

#endif
