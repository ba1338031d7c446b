/* OpenAI-style HTTP helpers shared by every server; see api.h. Messages follow vLLM's wording
 * where clients (and tests written against vLLM) look at them. */
#include "openai/api.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "base/rng.h"
#include "base/log.h"

duet_status api_err_set(api_err *e, int status, const char *param, const char *fmt, ...) {
    if (e && !e->status) {
        e->status = status;
        snprintf(e->param, sizeof e->param, "%s", param ? param : "");
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->message, sizeof e->message, fmt, ap);
        va_end(ap);
    }
    return DUET_ERR_INVALID;
}

const char *api_error_type(int status) {
    switch (status) {
    case 400:
        return "BadRequestError";
    case 401:
        return "AuthenticationError";
    case 403:
        return "PermissionDeniedError";
    case 404:
        return "NotFoundError";
    case 405:
        return "MethodNotAllowedError";
    case 408:
        return "RequestTimeoutError";
    case 413:
        return "PayloadTooLargeError";
    case 415:
        return "UnsupportedMediaTypeError";
    case 422:
        return "UnprocessableEntityError";
    case 429:
        return "RateLimitError";
    case 503:
        return "ServiceUnavailableError";
    default:
        return status >= 500 ? "InternalServerError" : "BadRequestError";
    }
}

char *api_error_json(int status, const char *message, const char *param) {
    cJSON *root = cJSON_CreateObject();
    cJSON *err = root ? cJSON_AddObjectToObject(root, "error") : NULL;
    char *s = NULL;
    if (err && cJSON_AddStringToObject(err, "message", message ? message : "") &&
        cJSON_AddStringToObject(err, "type", api_error_type(status)) &&
        (param && *param ? cJSON_AddStringToObject(err, "param", param)
                         : cJSON_AddNullToObject(err, "param")) &&
        cJSON_AddNumberToObject(err, "code", status))
        s = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    return s;
}

duet_status api_respond_error(http_req *req, int status, const char *message, const char *param,
                              const http_header *extra) {
    char *body = api_error_json(status, message, param);
    if (!body) {
        LOG_ERROR("api: out of memory building an error body");
        http_req_release(req);
        return DUET_ERR_NO_MEMORY;
    }
    duet_status st =
        http_respond_headers(req, status, "application/json", extra, body, strlen(body));
    cJSON_free(body);
    return st;
}

duet_status api_respond_err(http_req *req, const api_err *e, const http_header *extra) {
    return api_respond_error(req, e->status ? e->status : 500, e->message, e->param, extra);
}

duet_status api_respond_json(http_req *req, int status, const cJSON *root,
                             const http_header *extra) {
    char *s = root ? cJSON_PrintUnformatted(root) : NULL;
    if (!s) {
        LOG_ERROR("api: out of memory printing a response");
        return api_respond_error(req, 500, "out of memory", NULL, extra);
    }
    duet_status st = http_respond_headers(req, status, "application/json", extra, s, strlen(s));
    cJSON_free(s);
    return st;
}

/* Length of the well-formed UTF-8 character at s (1..4), or 0 if there is none (yet). */
static size_t utf8_char(const unsigned char *s, size_t len) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    size_t n;
    unsigned lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF)
        n = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F; /* no surrogates */
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else
        return 0;
    if (len < n) return 0;
    if (s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < n; i++)
        if (s[i] < 0x80 || s[i] > 0xBF) return 0;
    return n;
}

bool api_utf8_valid(const char *s, size_t len) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        size_t n = utf8_char(p + i, len - i);
        if (!n) return false;
        i += n;
    }
    return true;
}

size_t api_utf8_prefix(const char *s, size_t len) {
    /* at most the last 3 bytes can belong to an unfinished character */
    size_t cut = len;
    for (size_t back = 1; back <= 3 && back <= len; back++) {
        unsigned char c = (unsigned char)s[len - back];
        if ((c & 0xC0) == 0x80) continue; /* continuation byte: look further back */
        size_t need = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
        if (need > back) cut = len - back;
        break;
    }
    return cut;
}

static bool json_content_type(const char *ct) {
    if (!ct) return true; /* no header: read it as JSON, as FastAPI does */
    size_t n = strcspn(ct, ";");
    while (n && (ct[n - 1] == ' ' || ct[n - 1] == '\t')) n--;
    if (n == 16 && !strncasecmp(ct, "application/json", 16)) return true;
    /* application/<something>+json */
    return n > 17 && !strncasecmp(ct, "application/", 12) && !strncasecmp(ct + n - 5, "+json", 5);
}

duet_status api_parse_body(const http_req *req, cJSON **root_p, api_err *e) {
    if (!json_content_type(http_req_header(req, "Content-Type")))
        return api_err_set(e, 415, NULL,
                           "Unsupported Media Type: Only 'application/json' is "
                           "allowed");
    if (!api_utf8_valid(req->body, req->body_len))
        return api_err_set(e, 400, NULL, "The request body is not valid UTF-8");
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(req->body, req->body_len, &end, false);
    if (!root) {
        size_t at = end && end >= req->body ? (size_t)(end - req->body) : 0;
        return api_err_set(e, 400, NULL, "JSON decode error at byte %zu of the request body", at);
    }
    /* only whitespace may follow the document */
    for (const char *p = end; p && p < req->body + req->body_len; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            cJSON_Delete(root);
            return api_err_set(e, 400, NULL, "JSON decode error: extra data after the document");
        }
    }
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return api_err_set(e, 400, NULL, "The request body must be a JSON object");
    }
    *root_p = root;
    return DUET_OK;
}

const char *api_json_type(const cJSON *it) {
    if (!it) return "missing";
    if (cJSON_IsNull(it)) return "null";
    if (cJSON_IsBool(it)) return "boolean";
    if (cJSON_IsNumber(it))
        return it->valuedouble == floor(it->valuedouble) && fabs(it->valuedouble) < 9.0e15
                   ? "integer"
                   : "number";
    if (cJSON_IsString(it)) return "string";
    if (cJSON_IsArray(it)) return "array";
    return "object";
}

static const cJSON *field(const cJSON *obj, const char *name) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, name);
    return it && !cJSON_IsNull(it) ? it : NULL;
}

duet_status api_get_bool(const cJSON *obj, const char *name, bool *out, api_err *e) {
    const cJSON *it = field(obj, name);
    if (!it) return DUET_OK;
    if (!cJSON_IsBool(it))
        return api_err_set(e, 400, name, "'%s' must be a boolean, got %s", name, api_json_type(it));
    *out = cJSON_IsTrue(it);
    return DUET_OK;
}

duet_status api_get_int(const cJSON *obj, const char *name, long long min, long long max,
                        long long *out, api_err *e) {
    const cJSON *it = field(obj, name);
    if (!it) return DUET_OK;
    double v = cJSON_IsNumber(it) ? it->valuedouble : NAN;
    if (!cJSON_IsNumber(it) || v != floor(v) || fabs(v) > 9.0e15)
        return api_err_set(e, 400, name, "'%s' must be an integer, got %s", name,
                           api_json_type(it));
    if (v < (double)min || v > (double)max) {
        if (max >= (long long)1 << 53)
            return api_err_set(e, 400, name, "'%s' must be at least %lld, got %.0f", name, min, v);
        return api_err_set(e, 400, name, "'%s' must be between %lld and %lld, got %.0f", name, min,
                           max, v);
    }
    *out = (long long)v;
    return DUET_OK;
}

duet_status api_get_float(const cJSON *obj, const char *name, double min, double max, double *out,
                          api_err *e) {
    const cJSON *it = field(obj, name);
    if (!it) return DUET_OK;
    if (!cJSON_IsNumber(it) || !isfinite(it->valuedouble))
        return api_err_set(e, 400, name, "'%s' must be a number, got %s", name, api_json_type(it));
    if (it->valuedouble < min || it->valuedouble > max)
        return api_err_set(e, 400, name, "'%s' must be between %g and %g, got %g", name, min, max,
                           it->valuedouble);
    *out = it->valuedouble;
    return DUET_OK;
}

duet_status api_get_string(const cJSON *obj, const char *name, const char **out, api_err *e) {
    const cJSON *it = field(obj, name);
    if (!it) return DUET_OK;
    if (!cJSON_IsString(it))
        return api_err_set(e, 400, name, "'%s' must be a string, got %s", name, api_json_type(it));
    *out = it->valuestring;
    return DUET_OK;
}

bool api_auth_ok(const http_req *req, const char *key) {
    if (!key || !*key) return true;
    const char *h = http_req_header(req, "Authorization");
    if (!h || strncasecmp(h, "Bearer ", 7) != 0) return false;
    h += 7;
    while (*h == ' ') h++;
    size_t a = strlen(h), b = strlen(key);
    /* constant time in the key's length: no early exit on the first differing byte */
    unsigned diff = (unsigned)(a != b);
    for (size_t i = 0; i < b; i++)
        diff |= (unsigned char)(i < a ? h[i] : 0) ^ (unsigned char)key[i];
    return diff == 0;
}

static pthread_mutex_t g_rng_mu = PTHREAD_MUTEX_INITIALIZER;
static rng_state g_rng;
static bool g_rng_seeded;

/* Seeded from the clock and pid: ids need to be unique, not secret. */
static uint64_t id_random(void) {
    pthread_mutex_lock(&g_rng_mu);
    if (!g_rng_seeded) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        rng_seed(&g_rng, ((uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec) ^
                             ((uint64_t)getpid() << 40));
        g_rng_seeded = true;
    }
    uint64_t r = rng_next(&g_rng);
    pthread_mutex_unlock(&g_rng_mu);
    return r;
}

void api_random_hex(char *out, size_t cap, int n) {
    static const char hex[] = "0123456789abcdef";
    if (!cap) return;
    if ((size_t)n >= cap) n = (int)cap - 1;
    uint64_t r = 0;
    for (int i = 0; i < n; i++) {
        if (i % 16 == 0) r = id_random();
        out[i] = hex[r & 15];
        r >>= 4;
    }
    out[n] = '\0';
}

void api_request_id(const http_req *req, char *out, size_t cap) {
    const char *h = req ? http_req_header(req, "X-Request-Id") : NULL;
    size_t n = h ? strlen(h) : 0;
    bool ok = n >= 1 && n <= 128 && n < cap;
    for (size_t i = 0; ok && i < n; i++) {
        unsigned char c = (unsigned char)h[i];
        ok = c > 0x20 && c < 0x7f && c != '"' && c != '\\';
    }
    if (ok)
        memcpy(out, h, n + 1);
    else
        api_random_hex(out, cap, 32);
}

duet_status api_sse_json(http_req *req, const cJSON *root) {
    char *s = cJSON_PrintUnformatted(root);
    if (!s) {
        LOG_ERROR("api: out of memory printing a stream chunk");
        return DUET_ERR_NO_MEMORY;
    }
    duet_status st = http_stream_sse(req, s);
    cJSON_free(s);
    return st;
}

void api_sse_begin(strbuf *b) {
    strbuf_clear(b);
    strbuf_add(b, "data: ", 6);
}

duet_status api_sse_send(http_req *req, strbuf *b) {
    strbuf_add(b, "\n\n", 2);
    if (b->oom) {
        LOG_ERROR("api: out of memory writing a stream chunk");
        return DUET_ERR_NO_MEMORY;
    }
    return http_stream_write(req, b->p, b->len);
}

void api_json_escape(strbuf *b, const char *s, size_t n) {
    static const char hex[] = "0123456789abcdef";
    size_t run = 0; /* bytes s[i - run, i) need no escape */
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch >= 0x20 && ch != '"' && ch != '\\') {
            run++;
            continue;
        }
        strbuf_add(b, s + i - run, run);
        run = 0;
        char e[6] = {'\\', 0};
        size_t len = 2;
        switch (ch) {
        case '"':
        case '\\':
            e[1] = (char)ch;
            break;
        case '\b':
            e[1] = 'b';
            break;
        case '\f':
            e[1] = 'f';
            break;
        case '\n':
            e[1] = 'n';
            break;
        case '\r':
            e[1] = 'r';
            break;
        case '\t':
            e[1] = 't';
            break;
        default:
            memcpy(e + 1, "u00", 3);
            e[4] = hex[ch >> 4];
            e[5] = hex[ch & 15];
            len = 6;
        }
        strbuf_add(b, e, len);
    }
    strbuf_add(b, s + n - run, run);
}

void api_json_str(strbuf *b, const char *s, size_t n) {
    strbuf_add(b, "\"", 1);
    api_json_escape(b, s, n);
    strbuf_add(b, "\"", 1);
}

void api_json_number(strbuf *b, double x) {
    char t[32];
    if (!isfinite(x)) {
        strbuf_add(b, "null", 4);
        return;
    }
    if (fabs(x) < 1e15 && x == (double)(long long)x) {
        snprintf(t, sizeof t, "%lld", (long long)x);
    } else {
        snprintf(t, sizeof t, "%1.15g", x);
        if (strtod(t, NULL) != x) snprintf(t, sizeof t, "%1.17g", x);
    }
    strbuf_str(b, t);
}

duet_status api_sse_done(http_req *req) {
    return http_stream_sse(req, "[DONE]");
}

duet_status api_sse_error(http_req *req, int status, const char *message) {
    char *s = api_error_json(status, message, NULL);
    if (!s) return DUET_ERR_NO_MEMORY;
    duet_status st = http_stream_sse(req, s);
    cJSON_free(s);
    return st;
}
