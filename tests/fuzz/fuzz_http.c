/* libFuzzer driver for the HTTP request reader (libhttp-parser plus duet's limits and request
 * building) and the JSON error body. The first byte picks how the rest is split into reads, so
 * requests cut at every possible point are exercised like a slow or chunky client sends them. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "net/http-impl.h"

/* What a handler may rely on for every request the reader hands out. */
static void check_req(const http_req *req) {
    if (!req->method || !req->path || !req->query || !req->body || !req->client_addr) abort();
    if (req->body[req->body_len] != '\0') abort();
    if (req->body_len > 4096) abort();
    size_t bytes = strlen(req->path) + strlen(req->query);
    for (size_t i = 0; i < req->num_headers; i++) {
        const http_header *h = &req->headers[i];
        if (!h->name || !h->value || !*h->name) abort();
        bytes += strlen(h->name) + strlen(h->value);
        if (http_req_header(req, h->name) == NULL) abort();
    }
    if (bytes > 2048) abort();
    (void)http_req_header(req, "content-type");
}

/* The message must survive JSON escaping unchanged, whatever bytes it holds. */
static void check_error_body(const uint8_t *data, size_t size) {
    char msg[256];
    size_t n = size < sizeof msg - 1 ? size : sizeof msg - 1;
    memcpy(msg, data, n);
    msg[n] = '\0';
    size_t len = 0;
    char *body = http_error_body(400, "BadRequestError", msg, &len);
    if (!body) return;
    cJSON *root = cJSON_Parse(body);
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(root, "error");
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(err, "message");
    const cJSON *code = cJSON_GetObjectItemCaseSensitive(err, "code");
    if (!cJSON_IsString(m) || strcmp(m->valuestring, msg) || !cJSON_IsNumber(code) ||
        code->valueint != 400 || strlen(body) != len)
        abort();
    cJSON_Delete(root);
    cJSON_free(body);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0;
    size_t step = (size_t)(data[0] % 32) + 1;
    const char *in = (const char *)data + 1;
    size_t len = size - 1;

    /* Small limits so that the 413/414/431 paths are reachable from short inputs. */
    http_reader r;
    http_reader_init(&r, 2048, 4096);
    size_t pos = 0;
    while (pos < len) {
        size_t n = len - pos < step ? len - pos : step;
        size_t used = http_reader_feed(&r, in + pos, n);
        if (used > n) abort();
        pos += used;
        http_req *req = http_reader_take(&r);
        if (req) {
            check_req(req);
            bool keep = http_reader_req_keep_alive(req);
            http_reader_req_free(req);
            if (!keep) break; /* a connection would stop reading here */
            continue;
        }
        if (r.err_status) {
            if (r.err_status < 400 || r.err_status > 599 || !r.err_type) abort();
            break;
        }
        if (used < n) abort(); /* stopped for no reason: a connection would spin */
    }
    http_reader_cleanup(&r);
    check_error_body(data, size);
    return 0;
}
