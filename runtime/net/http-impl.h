/* Internals of http.c that tests and the fuzz driver reach without a socket: the request reader
 * (libhttp-parser plus our limits, building http_req objects).
 * Not for other modules. Any thread, one reader per thread at a time. */
#ifndef DUET_HTTP_IMPL_H
#define DUET_HTTP_IMPL_H

#include <http_parser.h>

#include "net/http.h"

struct http_req_impl;

/* Turns bytes into requests, one at a time: http_reader_feed stops after each complete
 * request, which stays in `done` until taken. Owns `cur` and `done`. */
typedef struct http_reader {
    http_parser parser;
    size_t max_header_bytes;
    size_t max_body_bytes;
    struct http_req_impl *cur;  /* being parsed */
    struct http_req_impl *done; /* complete, not yet taken */
    int err_status;             /* 0, or the status to answer; the reader is then dead */
    const char *err_type;
    char err_msg[128];
} http_reader;

void http_reader_init(http_reader *r, size_t max_header_bytes, size_t max_body_bytes);
/* Frees cur and done. */
void http_reader_cleanup(http_reader *r);

/* Parses up to len bytes; returns how many were used. Returns early when a request is complete
 * (take it) or on an error (err_status set). A return of len with neither means "more". */
size_t http_reader_feed(http_reader *r, const char *data, size_t len);

/* The complete request, or NULL; the caller owns it (free with http_reader_req_free unless
 * handed to a connection). */
http_req *http_reader_take(http_reader *r);

/* Whether the connection may carry another request after this one. */
bool http_reader_req_keep_alive(const http_req *req);

/* Frees a request that was never handed to a connection. Accepts NULL. */
void http_reader_req_free(http_req *req);

#endif
