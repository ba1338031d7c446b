/* The JSON side of the disaggregated flow: reading a client's completion request, the prefill
 * leg's body (vLLM's NIXL-connector protocol: max_tokens 1, do_remote_decode; streamed or not),
 * the events of a streamed prefill answer, the decode leg's body (the original plus the
 * prefill's kv_transfer_params), and the load estimates the balancer weighs. Pure functions
 * over cJSON; any thread. */
#ifndef DUET_PX_BODY_H
#define DUET_PX_BODY_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

typedef struct px_gen {
    cJSON *root;            /* the client's body; owned */
    bool stream;            /* the client wants server-sent events */
    uint64_t prompt_tokens; /* estimate: token ids counted, text as bytes / 4 */
    uint64_t max_tokens;    /* max_completion_tokens or max_tokens, else a default */
} px_gen;

/* DUET_ERR_INVALID with err set (answered 400) for a body that is not a JSON object or whose
 * "stream" is not a boolean. Deeper checks are the backend's (its 400 is passed through). */
duet_status px_gen_parse(const char *body, size_t len, px_gen *g, char *err, size_t errlen);
void px_gen_cleanup(px_gen *g);

/* Load units charged to the prefill backend (prompt tokens still to compute) and the decode
 * backend (tokens its KV cache will hold: prompt plus the most it may generate). */
uint64_t px_gen_prefill_load(const px_gen *g);
uint64_t px_gen_decode_load(const px_gen *g);

/* The prefill leg's body: stream false, no stream_options, max_tokens 1 (and
 * max_completion_tokens 1 when present), no min_tokens, kv_transfer_params
 * {"do_remote_decode": true}. Free with cJSON_free. NULL when out of memory. */
char *px_gen_prefill_body(const px_gen *g, size_t *len_p);
/* The same with stream true (still no stream_options), for early decode: a duet prefill worker
 * then sends kv_transfer_params in its first event, as soon as it admits the request. */
char *px_gen_prefill_body_streamed(const px_gen *g, size_t *len_p);

/* The decode leg's body: the original with kv_transfer_params replaced by kv (dropped when kv
 * is NULL). Free with cJSON_free. NULL when out of memory. */
char *px_gen_decode_body(px_gen *g, const cJSON *kv, size_t *len_p);

/* The kv_transfer_params object of a prefill answer, detached for the caller (cJSON_Delete);
 * *kv_p is NULL when the answer has none. DUET_ERR_FORMAT when the answer is not a JSON object. */
duet_status px_prefill_kv_params(const char *body, size_t len, cJSON **kv_p);

/* ---- a streamed prefill answer (server-sent events) ---- */

typedef enum px_sse_kind {
    PX_SSE_OTHER = 0, /* a chunk without params, a comment, an empty event, not JSON */
    PX_SSE_KV,        /* a JSON object with a top-level kv_transfer_params object */
    PX_SSE_ERROR,     /* a JSON object with "error", or a JSON value that is not an object */
    PX_SSE_DONE,      /* data: [DONE] */
} px_sse_kind;

/* The first whole event of buf[0, len): returns the bytes it takes with the empty line that ends
 * it ("\n\n" or "\r\n\r\n" after its last line), 0 while none is whole; *ev_len_p gets its
 * length up to that empty line (its last line's line end included). */
size_t px_sse_next(const char *buf, size_t len, size_t *ev_len_p);
/* Whether buf[0, len) may hold a whole event when buf[0, old_len) held none (px_sse_next
 * returned 0 on it): false means it holds none. Looks at the bytes after old_len (and the two
 * before), so a reader of a large event that arrives in small reads stays linear. */
bool px_sse_may_be_whole(const char *buf, size_t len, size_t old_len);

/* What an event (as px_sse_next cut it) of a prefill stream is: its data lines joined, then
 * read as JSON. For PX_SSE_KV, *kv_p (when kv_p is not NULL) gets the kv_transfer_params object
 * (cJSON_Delete); otherwise it is set to NULL. */
px_sse_kind px_sse_prefill_event(const char *ev, size_t len, cJSON **kv_p);

/* ---- a list of prompts split into one prefill -> decode chain per prompt ---- */

/* How many prompts the request holds (1 unless "prompt" is a list of strings or of token-id
 * lists). */
int px_gen_prompt_count(const px_gen *g);
/* The request's n (choices per prompt), 1 when absent or not a number. */
int px_gen_n(const px_gen *g);
/* stream_options.include_usage */
bool px_gen_include_usage(const px_gen *g);
/* The request for prompt i alone ("prompt" replaced, everything else kept). */
duet_status px_gen_part(const px_gen *g, int i, px_gen *out);

typedef enum px_chunk_kind {
    PX_CHUNK_DATA = 0, /* forward it (rewritten) */
    PX_CHUNK_USAGE,    /* the final usage chunk: summed into usage_sum, not forwarded */
    PX_CHUNK_ERROR,    /* an error event (or not an object): the merged stream ends with it */
} px_chunk_kind;

/* One streamed chunk of part p: its choices' indexes moved by offset (p * n), its id set to
 * id (NULL: kept). */
px_chunk_kind px_merge_chunk(cJSON *chunk, int offset, const char *id, cJSON *usage_sum);
/* The whole answer from every part's answer: choices in prompt-major order, usage summed, id
 * set (NULL: the first part's), kv_transfer_params null. NULL when out of memory or the first
 * answer is not an object. */
cJSON *px_merge_answers(cJSON *const *answers, int n_parts, int n, const char *id);

#endif
