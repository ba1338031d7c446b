/* Fuzz driver for the DeepSeek tool-call parser (model output, which clients steer): the first
 * byte picks the format and the size of the pieces the rest is fed in. Checks that the streamed
 * content and arguments never exceed what was fed. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "openai/api.h"

static void count(void *user, const api_tool_event *ev) {
    size_t *n = user;
    *n += ev->len;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    api_tool_format fmt = data[0] & 1 ? API_TOOL_FORMAT_DEEPSEEK_V31 : API_TOOL_FORMAT_DEEPSEEK_V3;
    size_t piece = (size_t)(data[0] >> 1) + 1, streamed = 0;
    const char *text = (const char *)data + 1;
    size_t len = size - 1;
    api_tool_parser *p = NULL;
    if (api_tool_parser_create(fmt, &p) != DUET_OK) return 0;
    for (size_t at = 0; at < len; at += piece)
        api_tool_parser_feed(p, text + at, len - at < piece ? len - at : piece, count, &streamed);
    api_tool_parser_finish(p, count, &streamed);
    size_t n;
    api_tool_parser_content(p, &n);
    if (streamed > len || n > len) abort();
    cJSON_Delete(api_tool_calls_json(p));
    api_tool_parser_destroy(p);
    return 0;
}
