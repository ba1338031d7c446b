/* libFuzzer driver for a worker's OpenAI request bodies: any bytes as the body of
 * /v1/completions, /v1/chat/completions, /tokenize or /detokenize go through the server's body
 * check and the endpoint's validation (sampling fields, prompts as text or ids, chat rendering
 * with the real DeepSeek-V3 template and tokenizer, kv_transfer_params) up to the engine's door.
 * The frontend admits no engine request (max_live 0), so a request that passes validation is
 * answered 503 there: every input must end as an answered request, no job left behind. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "base/log.h"
#include "net/http-impl.h"
#include "openai/api.h"
#include "openai/metrics.h"
#include "server/oai.h"
#include "text/chat.h"
#include "text/tokenizer.h"

#ifndef GOLDEN_DIR
#error "GOLDEN_DIR must name ../shared/golden"
#endif

static tok_tokenizer *g_tok;
static chat_template *g_tpl;
static met_registry *g_met;
static oai_frontend *g_fe[2]; /* without and with a KV plug-in */

/* Never called: nothing reaches the engine. */
static duet_status fetch_never(void *user, uint64_t id, void *remote, const int32_t *blocks,
                               int n_blocks, int skip_blocks, int n_tokens) {
    (void)user, (void)id, (void)remote, (void)blocks, (void)n_blocks, (void)skip_blocks;
    (void)n_tokens;
    abort();
}

static duet_status lease_never(void *state, uint64_t lease, const char *rid, srv_kv_params *out) {
    (void)state;
    (void)lease;
    (void)rid;
    (void)out;
    abort();
}

static const srv_kv_plugin g_plugin = {.lease = lease_never, .fetch = fetch_never};

static void setup(void) {
    log_set_level(LOG_LEVEL_ERROR + 1);
    const char *dir = GOLDEN_DIR "/tokenizer";
    if (tok_load(dir, &g_tok) != DUET_OK || chat_load(dir, &g_tpl) != DUET_OK ||
        met_create("fuzz", 4096, &g_met) != DUET_OK) {
        fprintf(stderr, "fuzz_oai_request: cannot load the tokenizer and template of %s\n", dir);
        abort();
    }
    for (int i = 0; i < 2; i++) {
        oai_config cfg = {.served_name = "fuzz",
                          .reasoning = i ? OAI_REASONING_R1 : OAI_REASONING_NONE,
                          .tool_parser = i ? API_TOOL_FORMAT_DEEPSEEK_V3 : -1,
                          .auto_tool_choice = i == 1,
                          .max_logprobs = 20,
                          .max_model_len = 4096,
                          .vocab = 129280,
                          .max_live = 0,
                          .plugin = i ? &g_plugin : NULL};
        if (oai_create(&cfg, g_tok, g_tpl, g_met, &g_fe[i]) != DUET_OK) abort();
    }
}

static const char *const PATHS[4] = {"/v1/completions", "/v1/chat/completions", "/tokenize",
                                     "/detokenize"};

/* The request as the HTTP reader hands it to the server: first byte = endpoint and frontend,
 * the rest the JSON body. */
static http_req *make_request(const uint8_t *data, size_t size, int *which_p, int *fe_p) {
    *which_p = data[0] & 3;
    *fe_p = (data[0] >> 2) & 1;
    const char *body = (const char *)data + 1;
    size_t len = size - 1;
    char head[256];
    int n = snprintf(head, sizeof head,
                     "POST %s HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\n\r\n",
                     PATHS[*which_p], len);
    http_reader r;
    http_reader_init(&r, 4096, 1 << 20);
    size_t used = http_reader_feed(&r, head, (size_t)n);
    if (used == (size_t)n && len) used = http_reader_feed(&r, body, len);
    http_req *req = http_reader_take(&r);
    http_reader_cleanup(&r);
    if (!req || req->body_len != len || memcmp(req->body, body, len)) abort();
    return req;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!g_tok) setup();
    if (size < 1 || size > (1 << 20)) return 0;
    int which, f;
    http_req *req = make_request(data, size, &which, &f);
    oai_frontend *fe = g_fe[f];
    cJSON *body = NULL;
    api_err e = {0};
    if (api_parse_body(req, &body, &e) != DUET_OK) {
        if (e.status < 400 || e.status > 499) abort();
        api_respond_err(req, &e, NULL); /* frees req: it has no connection */
        return 0;
    }
    switch (which) {
    case 0:
        oai_handle_completions(fe, req, body); /* takes body over; no loop: prepared inline */
        break;
    case 1:
        oai_handle_chat(fe, req, body);
        break;
    case 2:
        oai_handle_tokenize(fe, req, body);
        break;
    default:
        oai_handle_detokenize(fe, req, body);
        cJSON_Delete(body);
        break;
    }
    /* Without an engine every request is answered at once: a job left means a request that
     * neither failed nor started. */
    if (oai_jobs_count(fe) != 0) abort();
    return 0;
}
