/* Fuzz driver for chat templates (an operator's file, rendered over clients' messages): the
 * bytes are a template, optionally followed by a NUL byte and a JSON object of variables (else a
 * small conversation with tools). Any input gives a refusal with a reason or a bounded render. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "text/jinja.h"

static const char DEFAULT_VARS[] =
    "{\"bos_token\":\"<s>\",\"eos_token\":\"</s>\",\"add_generation_prompt\":true,"
    "\"messages\":[{\"role\":\"system\",\"content\":\"S\"},{\"role\":\"user\",\"content\":\"q\"},"
    "{\"role\":\"assistant\",\"content\":\"\",\"tool_calls\":[{\"id\":\"c\",\"type\":\"function\","
    "\"function\":{\"name\":\"f\",\"arguments\":{\"x\":[1,2.5,null,\"\\u00e9\"]}}}]},"
    "{\"role\":\"tool\",\"content\":\"r\"},{\"role\":\"assistant\",\"content\":\"<think>a</"
    "think>b\"}],"
    "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"description\":\"d\","
    "\"parameters\":{\"type\":\"object\"}}}],\"thinking\":true}";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *src = (const char *)data;
    const uint8_t *nul = memchr(data, 0, size);
    size_t src_len = nul ? (size_t)(nul - data) : size;
    cJSON *vars = NULL;
    if (nul) vars = cJSON_ParseWithLength((const char *)nul + 1, size - src_len - 1);
    if (!cJSON_IsObject(vars)) {
        cJSON_Delete(vars);
        vars = cJSON_Parse(DEFAULT_VARS);
    }
    jinja_template *t = NULL;
    char err[256];
    if (jinja_parse(src, src_len, &t, err, sizeof err) == DUET_OK) {
        jinja_var v[32];
        size_t n = 0;
        const cJSON *k;
        cJSON_ArrayForEach(k, vars) {
            if (n < 32) v[n++] = (jinja_var){k->string, k};
        }
        /* small limits keep each run fast; the limits themselves are under test */
        jinja_limits lim = {
            .max_output = 1 << 20, .max_memory = 64 << 20, .max_steps = 100000, .max_depth = 16};
        strbuf out = {0};
        jinja_render(t, v, n, &lim, &out, err, sizeof err);
        strbuf_free(&out);
        jinja_destroy(t);
    }
    cJSON_Delete(vars);
    return 0;
}
