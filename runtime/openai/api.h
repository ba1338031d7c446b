/* OpenAI-compatible HTTP pieces every server shares (workers and, later, the proxy): vLLM's
 * nested error JSON, request body checks (content type, UTF-8, JSON object), typed field
 * readers that answer vLLM-like 400 messages, bearer-key checks, request ids, SSE helpers, the
 * DeepSeek-R1 reasoning splitter and the DeepSeek tool-call parser. In libduet_base: no engine,
 * MPI, UCX or CUDA here. Threads: the http_req functions on the loop thread (see http.h); the rest
 * anywhere. */
#ifndef DUET_API_H
#define DUET_API_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "net/http.h"
#include "base/strbuf.h"
#include "base/status.h"

/* A client error being built: the status to answer, a message and the offending field. */
typedef struct api_err {
    int status; /* 0 = no error */
    char message[512];
    char param[64]; /* "" = null */
} api_err;

/* Records an error (the first one wins) and returns DUET_ERR_INVALID. */
duet_status api_err_set(api_err *e, int status, const char *param, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* vLLM's/OpenAI's error type for a status: "BadRequestError", "NotFoundError", ... */
const char *api_error_type(int status);

/* {"error":{"message","type","param","code"}} as a heap string (cJSON_free), NULL on OOM. */
char *api_error_json(int status, const char *message, const char *param);

/* Answers an error with extra headers (may be NULL); finishes req. */
duet_status api_respond_error(http_req *req, int status, const char *message, const char *param,
                              const http_header *extra);
duet_status api_respond_err(http_req *req, const api_err *e, const http_header *extra);

/* Answers a JSON document (printed unformatted); finishes req. root stays the caller's. */
duet_status api_respond_json(http_req *req, int status, const cJSON *root,
                             const http_header *extra);

/* Whether len bytes are well-formed UTF-8 (no overlongs, surrogates or values past U+10FFFF). */
bool api_utf8_valid(const char *s, size_t len);

/* Bytes of the longest prefix of s[0..len) that ends on a UTF-8 character boundary. */
size_t api_utf8_prefix(const char *s, size_t len);

/* Checks a POST body: JSON content type (415 otherwise; a missing header is accepted), valid
 * UTF-8, a JSON object (400). On success *root_p is the caller's (cJSON_Delete). */
duet_status api_parse_body(const http_req *req, cJSON **root_p, api_err *e);

/* Field readers. Absent and null fields leave *out alone (the caller's default) and return
 * DUET_OK; a present field of the wrong type or out of [min, max] sets a 400 naming it. */
duet_status api_get_bool(const cJSON *obj, const char *name, bool *out, api_err *e);
duet_status api_get_int(const cJSON *obj, const char *name, long long min, long long max,
                        long long *out, api_err *e);
duet_status api_get_float(const cJSON *obj, const char *name, double min, double max, double *out,
                          api_err *e);
/* *out points into obj. */
duet_status api_get_string(const cJSON *obj, const char *name, const char **out, api_err *e);
/* A field's JSON type as OpenAPI names it, for messages ("string", "integer", ...). */
const char *api_json_type(const cJSON *item);

/* Authorization: "Bearer <key>" compared in constant time. key NULL or "" = no key needed. */
bool api_auth_ok(const http_req *req, const char *key);

/* The request's X-Request-Id when it is 1..128 visible ASCII characters without quotes or
 * backslashes, else a fresh random 32-hex-digit id. out must hold 129 bytes. */
void api_request_id(const http_req *req, char *out, size_t cap);

/* A fresh random id of n hex digits (n < cap) for objects ("cmpl-..."). Any thread. */
void api_random_hex(char *out, size_t cap, int n);

/* One SSE event carrying root, unformatted. DUET_ERR_IO when the client is gone. */
duet_status api_sse_json(http_req *req, const cJSON *root);
/* "data: [DONE]" */
duet_status api_sse_done(http_req *req);
/* An error inside a started stream: data: {"error":{...}} (as vLLM streams it). */
duet_status api_sse_error(http_req *req, int status, const char *message);

/* ---- SSE chunks written without a JSON tree (the per-token path) ----
 * b is the caller's buffer, reused from chunk to chunk: api_sse_begin empties it (keeping its
 * memory) and starts an event, the caller appends one JSON object with the writers below (no
 * raw line end may appear in it: the escaper guarantees that for strings), api_sse_send ends
 * the event and writes it. Once b has grown to a chunk's size nothing is allocated (the HTTP
 * layer copies only what the socket does not take at once). DUET_ERR_IO: the client is gone. */
void api_sse_begin(strbuf *b);
duet_status api_sse_send(http_req *req, strbuf *b);
/* s[0..n) as a JSON string, quotes included: '"', '\\' and control characters escaped
 * (\n, \t, ... or \u00XX), every other byte as it is (cJSON does the same). */
void api_json_str(strbuf *b, const char *s, size_t n);
/* The same without the quotes, to build one string from pieces. */
void api_json_escape(strbuf *b, const char *s, size_t n);
/* A number as cJSON prints it: an integer without fraction, else 15 significant digits, or 17
 * when 15 do not read back as x; null for NaN and infinities. */
void api_json_number(strbuf *b, double x);

/* ---- DeepSeek-R1 reasoning split (--reasoning-parser deepseek_r1) ----
 * Text fed in pieces (stream deltas) comes out as reasoning (up to "</think>") and content
 * (after it). A leading "<think>" is dropped, so it works whether the prompt ended with
 * "<think>\n" or the model writes the tag itself; a tag split across pieces is held back
 * until it is decided. Without any "</think>" everything is reasoning, as in vLLM. */
typedef struct api_reasoner {
    int state;     /* 0: at the start, 1: reasoning, 2: content */
    char hold[16]; /* undecided tail: a possible prefix of a tag */
    size_t hold_len;
} api_reasoner;

void api_reasoner_init(api_reasoner *r);
/* Appends the decided parts of text to reason and content. */
void api_reasoner_feed(api_reasoner *r, const char *text, size_t len, strbuf *reason,
                       strbuf *content);
/* End of output: releases what was held back. */
void api_reasoner_finish(api_reasoner *r, strbuf *reason, strbuf *content);

/* ---- DeepSeek tool calls (--tool-call-parser deepseek_v3 | deepseek_v31) ----
 * The model's tool-call markup in the answer text (after the reasoning split, when there is one)
 * becomes OpenAI tool calls, as vLLM's deepseek_v3 / deepseek_v31 parsers read it:
 *   V3/R1: content<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\n
 *          ARGS\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>...<｜tool▁calls▁end｜>
 *   V3.1:  content<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS
 *          <｜tool▁call▁end｜><｜tool▁call▁begin｜>...<｜tool▁calls▁end｜>
 * Fed text deltas as the detokenizer yields them, it reports content, then for each call its
 * start (index, id, name) once the call's header is complete, then its arguments as they come
 * (ARGS verbatim: a JSON string in OpenAI's "arguments"). Text that may still become markup is
 * held back until decided, so any split of the text gives the same events, concatenated.
 * - Content is the text before <｜tool▁calls▁begin｜>; text after <｜tool▁calls▁end｜> is dropped
 *   (as vLLM's non-streaming parser does); whitespace or stray text between calls is skipped.
 * - Malformed markup before any call has started (another type than "function", a missing
 *   "```json" fence or <｜tool▁sep｜>, an empty or multi-line name, a name over 256 bytes, or
 *   the end of the text) falls back to plain content: the whole text, markup included. A
 *   malformed call after a good one is skipped.
 * - A call ends at <｜tool▁call▁end｜> (after "\n```" in V3, which is not part of ARGS). A call
 *   the text cut short, or closed by <｜tool▁calls▁end｜> alone, is incomplete: streamed as far
 *   as it went, but left out of the non-streamed result, as vLLM's regexes leave it out.
 * Beyond vLLM: ARGS may span lines (vLLM's regexes, without DOTALL, lose such a call).
 * One parser per choice of a response; one thread at a time. */
typedef enum api_tool_format {
    API_TOOL_FORMAT_DEEPSEEK_V3,  /* V3 and R1 */
    API_TOOL_FORMAT_DEEPSEEK_V31, /* V3.1 */
} api_tool_format;

/* vLLM's parser names: "deepseek_v3", "deepseek_v31". DUET_ERR_NOT_FOUND for others. */
duet_status api_tool_format_parse(const char *name, api_tool_format *fmt_p);

typedef enum api_tool_event_kind {
    API_TOOL_EVENT_CONTENT, /* text: content */
    API_TOOL_EVENT_CALL,    /* a call starts: index, id, name */
    API_TOOL_EVENT_ARGS,    /* more arguments of call index: text */
} api_tool_event_kind;

typedef struct api_tool_event {
    api_tool_event_kind kind;
    int index;
    const char *id, *name; /* NUL-terminated */
    const char *text;      /* len bytes, not NUL-terminated */
    size_t len;
} api_tool_event;

/* Called for each event; the pointers are valid during the call only. */
typedef void (*api_tool_cb)(void *user, const api_tool_event *ev);

typedef struct api_tool_parser api_tool_parser;

duet_status api_tool_parser_create(api_tool_format fmt, api_tool_parser **p_p);
void api_tool_parser_destroy(api_tool_parser *p);
/* Feeds a text delta; cb (may be NULL) sees the decided events. DUET_ERR_NO_MEMORY leaves the
 * parser unusable. */
duet_status api_tool_parser_feed(api_tool_parser *p, const char *text, size_t len, api_tool_cb cb,
                                 void *user);
/* End of the answer: releases what was held back. Returns how many calls were started (the
 * streamed finish_reason is "tool_calls" when that is not 0). */
int api_tool_parser_finish(api_tool_parser *p, api_tool_cb cb, void *user);

/* The non-streamed answer, after finish. Content is the text before the calls (NULL when
 * empty), or the whole text when no call was complete; *len_p its length. */
const char *api_tool_parser_content(const api_tool_parser *p, size_t *len_p);
/* The complete calls (finish_reason "tool_calls" when not 0), and as the message's
 * "tool_calls": [{"id","type":"function","function":{"name","arguments"}}] (caller deletes;
 * NULL when there is none or out of memory). */
int api_tool_parser_n_calls(const api_tool_parser *p);
cJSON *api_tool_calls_json(const api_tool_parser *p);
/* A CALL or ARGS event as one entry of a stream chunk's delta.tool_calls, as vLLM sends them:
 * {"index","id","type":"function","function":{"name"}} then {"index","function":{"arguments"}}.
 * NULL for CONTENT or out of memory. */
cJSON *api_tool_event_json(const api_tool_event *ev);

#endif
