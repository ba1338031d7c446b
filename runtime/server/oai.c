/* The OpenAI endpoints of a worker over its engine: /v1/completions, /v1/chat/completions,
 * /tokenize and /detokenize, with vLLM's request fields, defaults, validation messages and
 * response shapes (streaming included). Requests become "jobs" of one engine request per
 * choice; engine events arrive here on the loop thread (server.c copies them over). */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/clock.h"
#include "base/log.h"
#include "base/rng.h"
#include "base/strbuf.h"
#include "openai/api.h"
#include "server/oai.h"

enum {
    MAX_PROMPTS = 256, /* prompts in one completions request */
    MAX_N = 128,       /* choices per prompt */
    MAX_CHOICES = 1024,
};

typedef struct oai_job oai_job;

/* An engine event copied for the loop thread. */
typedef struct oai_msg {
    struct oai_msg *next;
    void *user; /* the oai_choice */
    bool has_token;
    int32_t token;
    bool has_lp;
    eng_token_lp lp;
    eng_token_lp *prompt_lp; /* [n_prompt], heap, or NULL */
    char *text;              /* text_in or heap, NUL-terminated, or NULL */
    size_t text_len;
    char text_in[48]; /* a token's text usually fits: no allocation for it */
    eng_finish finish;
    char *stop_reason;
    int32_t stop_token;
    char *error;
    int n_prompt, n_output, n_cached;
    int32_t *lease_blocks;
    int n_lease_blocks;
    bool lease_open; /* the engine's lease_open event (prefill side) */
    double t;        /* seconds, CLOCK_MONOTONIC */
} oai_msg;

/* One engine request: a choice of a completion or chat response. */
typedef struct oai_choice {
    oai_job *job;
    int index;  /* in the response */
    int prompt; /* which prompt of the request */
    uint64_t eng_id;
    bool live; /* submitted and not finished */
    bool done;
    srv_kv_params *remote; /* decode side: where its KV comes from; freed when done */
    strbuf text;           /* all output text (non-stream), or unused */
    int32_t *ids;          /* output token ids */
    int n_ids, cap_ids;
    eng_token_lp *lps; /* per output token, when logprobs were asked */
    int n_lps, cap_lps;
    eng_token_lp *prompt_lp; /* echo with logprobs */
    eng_finish finish;
    char *stop_reason;
    int32_t stop_token;
    char *error;
    int n_prompt, n_output, n_cached;
    api_reasoner reasoner;
    strbuf reason, content;    /* chat: split text */
    api_tool_parser *tools;    /* chat with tool_choice "auto": the model's tool calls */
    const char *finish_reason; /* overrides finish's name ("tool_calls"), or NULL */
    bool sent_first;           /* stream: the first chunk (role, prompt ids) went out */
    size_t text_offset;        /* completions logprobs: bytes of token strings so far */
    double t_first, t_last;
} oai_choice;

typedef enum oai_job_kind {
    OAI_JOB_COMPLETION = 0,
    OAI_JOB_CHAT = 1,
} oai_job_kind;

struct oai_job {
    oai_frontend *fe;
    oai_job *prev, *next; /* in srv->jobs */
    http_req *req;        /* NULL once the response is finished (or the client left) */
    oai_job_kind kind;
    char id[160];         /* "cmpl-..." / "chatcmpl-..." */
    char request_id[129]; /* X-Request-Id, echoed */
    http_header extra[2];
    long long created;
    double t_arrival;
    bool stream, include_usage, continuous_usage;
    bool echo, return_token_ids, want_logprobs;
    int logprobs; /* completions: legacy top-N; chat: top_logprobs */
    bool kv_lease;
    cJSON *kv_params_out; /* prefill side: the answer's kv_transfer_params */
    bool split_reasoning; /* chat: <think> text goes to reasoning_content */
    bool parse_tools;     /* chat: tool-call markup becomes tool_calls */
    bool logged;          /* --enable-log-requests: the arrival line went out */
    bool preparing;       /* its prompt is being tokenized on the worker pool: not freed */
    bool gone;            /* the client left before the answer was complete */
    int n_prompts;
    int32_t **prompts; /* [n_prompts] token ids */
    int *n_prompt_ids;
    char **prompt_text; /* echo: the prompts as text */
    int n_choices;
    oai_choice *choices;
    int n_live;
    bool failed;  /* a choice ended in error: answer 500 / an error event */
    bool aborted; /* ended by the server (shutdown): answer 503 */
    int err_status;
    char err_msg[256];
    bool stream_started;
};

struct oai_frontend {
    oai_config cfg;
    tok_tokenizer *tok;
    const chat_template *tpl; /* NULL: no chat template (chat answers 400) */
    met_registry *met;
    eng_engine *eng;
    const srv_kv_plugin *plugin;
    int vocab;
    int max_model_len;
    int max_live;
    bool draining;
    uint64_t next_id;
    int live_requests; /* engine requests submitted and not finished */
    oai_job *jobs;
    rng_state seeds;    /* --seed: seeds of unseeded requests */
    pthread_mutex_t mu; /* the event queue, filled by the engine thread */
    oai_msg *q_head, *q_tail;
    oai_msg *spare; /* delivered messages kept for the next events (under mu) */
    int n_spare;
    /* stream chunks: the event being written, and the reasoning split's and tool parser's
     * pieces of it; reused chunk after chunk (loop thread only) */
    strbuf sse, sse_reason, sse_text, sse_content;
    uv_loop_t *loop; /* tokenization and chat rendering on its worker pool; NULL: inline */
};

/* ---------------------------------------------------------------------------------------------
 * Jobs */

static void on_client_gone(http_req *req, void *arg);
static const char *finish_str(eng_finish f);

static oai_job *job_create(oai_frontend *s, http_req *req, oai_job_kind kind) {
    oai_job *j = calloc(1, sizeof *j);
    if (!j) return NULL;
    j->fe = s;
    j->req = req;
    j->kind = kind;
    j->created = (long long)time(NULL);
    j->t_arrival = clock_now_s();
    api_request_id(req, j->request_id, sizeof j->request_id);
    snprintf(j->id, sizeof j->id, "%s-%s", kind == OAI_JOB_CHAT ? "chatcmpl" : "cmpl",
             j->request_id);
    j->extra[0] = (http_header){"X-Request-Id", j->request_id};
    j->extra[1] = (http_header){NULL, NULL};
    j->next = s->jobs;
    if (s->jobs) s->jobs->prev = j;
    s->jobs = j;
    return j;
}

static void job_free(oai_job *j) {
    oai_frontend *s = j->fe;
    if (j->logged) {
        int out = 0;
        for (int i = 0; i < j->n_choices; i++) out += j->choices[i].n_output;
        const char *f = j->n_choices ? finish_str(j->choices[0].finish) : NULL;
        LOG_INFO("request %s finished: %s, %d output tokens in %.3f s", j->id,
                 j->failed    ? "failed"
                 : j->aborted ? "aborted"
                 : j->gone    ? "client gone"
                 : f          ? f
                              : "not run",
                 out, clock_now_s() - j->t_arrival);
    }
    if (j->prev)
        j->prev->next = j->next;
    else
        s->jobs = j->next;
    if (j->next) j->next->prev = j->prev;
    for (int i = 0; i < j->n_choices; i++) {
        oai_choice *c = &j->choices[i];
        free(c->remote);
        strbuf_free(&c->text);
        strbuf_free(&c->reason);
        strbuf_free(&c->content);
        api_tool_parser_destroy(c->tools);
        free(c->ids);
        free(c->lps);
        free(c->prompt_lp);
        free(c->stop_reason);
        free(c->error);
    }
    for (int i = 0; i < j->n_prompts; i++) {
        if (j->prompts) free(j->prompts[i]);
        if (j->prompt_text) free(j->prompt_text[i]);
    }
    free(j->prompts);
    free(j->n_prompt_ids);
    free(j->prompt_text);
    free(j->choices);
    cJSON_Delete(j->kv_params_out);
    free(j);
}

static void job_maybe_free(oai_job *j) {
    if (!j->req && j->n_live == 0 && !j->preparing) job_free(j);
}

static void job_abort_live(oai_job *j) {
    for (int i = 0; i < j->n_choices; i++)
        if (j->choices[i].live) eng_abort(j->fe->eng, j->choices[i].eng_id);
}

/* Ends the HTTP side with an error (before streaming started). */
static void job_respond_error(oai_job *j, int status, const char *msg, const char *param) {
    if (!j->req) return;
    http_req *req = j->req;
    j->req = NULL;
    met_count_http(j->fe->met, status);
    api_respond_error(req, status, msg, param, j->extra);
}

static void job_fail(oai_job *j, const api_err *e) {
    job_respond_error(j, e->status ? e->status : 500, e->message, e->param);
    job_abort_live(j);
    job_maybe_free(j);
}

static void on_client_gone(http_req *req, void *arg) {
    oai_job *j = arg;
    (void)req;
    if (!j->req) return;
    LOG_DEBUG("api: %s: client left; aborting its %d engine requests", j->id, j->n_live);
    j->gone = true;
    http_req_release(j->req);
    j->req = NULL;
    job_abort_live(j);
    job_maybe_free(j);
}

/* ---------------------------------------------------------------------------------------------
 * Request fields */

static duet_status check_model(oai_frontend *s, const cJSON *body, api_err *e) {
    const char *model = NULL;
    if (api_get_string(body, "model", &model, e)) return DUET_ERR_INVALID;
    if (model && strcmp(model, s->cfg.served_name) != 0)
        return api_err_set(e, 404, "model", "The model `%s` does not exist.", model);
    return DUET_OK;
}

static bool present(const cJSON *obj, const char *name) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, name);
    return it && !cJSON_IsNull(it);
}

/* Sampling fields common to both endpoints. */
static duet_status parse_sampling(const cJSON *b, eng_sampling *sp, api_err *e) {
    double temperature = 1.0, top_p = 1.0, min_p = 0.0, rep = 1.0, pres = 0.0, freq = 0.0;
    long long top_k = 0, seed = 0, min_tokens = 0;
    bool has_seed = false;
    if (api_get_float(b, "temperature", 0.0, 1e6, &temperature, e) ||
        api_get_float(b, "top_p", 0.0, 1.0, &top_p, e) ||
        api_get_int(b, "top_k", -1, 1 << 30, &top_k, e) ||
        api_get_float(b, "min_p", 0.0, 1.0, &min_p, e) ||
        api_get_float(b, "repetition_penalty", 0.0, 1e6, &rep, e) ||
        api_get_float(b, "presence_penalty", -2.0, 2.0, &pres, e) ||
        api_get_float(b, "frequency_penalty", -2.0, 2.0, &freq, e) ||
        api_get_int(b, "min_tokens", 0, 1 << 30, &min_tokens, e) ||
        api_get_bool(b, "ignore_eos", &sp->ignore_eos, e) ||
        api_get_bool(b, "skip_special_tokens", &sp->skip_special_tokens, e) ||
        api_get_bool(b, "include_stop_str_in_output", &sp->include_stop_str_in_output, e))
        return DUET_ERR_INVALID;
    if (present(b, "top_p") && top_p <= 0.0)
        return api_err_set(e, 400, "top_p", "top_p must be in (0, 1], got %g", top_p);
    if (present(b, "repetition_penalty") && rep <= 0.0)
        return api_err_set(e, 400, "repetition_penalty",
                           "repetition_penalty must be greater than zero, got %g", rep);
    if (present(b, "seed")) {
        if (api_get_int(b, "seed", -(1LL << 53), 1LL << 53, &seed, e)) return DUET_ERR_INVALID;
        has_seed = true;
    }
    sp->smp.temperature = (float)temperature;
    sp->smp.top_p = (float)top_p;
    sp->smp.top_k = (int)top_k;
    sp->smp.min_p = (float)min_p;
    sp->smp.repetition_penalty = (float)rep;
    sp->smp.presence_penalty = (float)pres;
    sp->smp.frequency_penalty = (float)freq;
    sp->min_tokens = (int)min_tokens;
    sp->has_seed = has_seed;
    sp->seed = (uint64_t)seed;

    const cJSON *stop = cJSON_GetObjectItemCaseSensitive(b, "stop");
    if (stop && !cJSON_IsNull(stop)) {
        if (cJSON_IsString(stop)) {
            if (stop->valuestring[0]) sp->stop[sp->n_stop++] = stop->valuestring;
        } else if (cJSON_IsArray(stop)) {
            const cJSON *x;
            cJSON_ArrayForEach(x, stop) {
                if (!cJSON_IsString(x))
                    return api_err_set(e, 400, "stop",
                                       "'stop' must be a string or a list of "
                                       "strings");
                if (!x->valuestring[0]) continue;
                if (sp->n_stop == ENG_MAX_STOP)
                    return api_err_set(e, 400, "stop", "at most %d stop strings are supported",
                                       ENG_MAX_STOP);
                sp->stop[sp->n_stop++] = x->valuestring;
            }
        } else {
            return api_err_set(e, 400, "stop", "'stop' must be a string or a list of strings");
        }
    }
    const cJSON *ids = cJSON_GetObjectItemCaseSensitive(b, "stop_token_ids");
    if (ids && !cJSON_IsNull(ids)) {
        if (!cJSON_IsArray(ids))
            return api_err_set(e, 400, "stop_token_ids",
                               "'stop_token_ids' must be a list of "
                               "integers");
        const cJSON *x;
        cJSON_ArrayForEach(x, ids) {
            double v = cJSON_IsNumber(x) ? x->valuedouble : -1;
            if (!cJSON_IsNumber(x) || v != floor(v) || v < 0 || v > 2147483647.0)
                return api_err_set(e, 400, "stop_token_ids",
                                   "'stop_token_ids' must be a list of non-negative integers");
            if (sp->n_stop_ids == ENG_MAX_STOP_IDS)
                return api_err_set(e, 400, "stop_token_ids", "at most %d stop token ids",
                                   ENG_MAX_STOP_IDS);
            sp->stop_ids[sp->n_stop_ids++] = (int32_t)v;
        }
    }
    const cJSON *bias = cJSON_GetObjectItemCaseSensitive(b, "logit_bias");
    if (bias && !cJSON_IsNull(bias) && !(cJSON_IsObject(bias) && !bias->child))
        return api_err_set(e, 400, "logit_bias", "logit_bias is not supported");
    const cJSON *rf = cJSON_GetObjectItemCaseSensitive(b, "response_format");
    if (rf && !cJSON_IsNull(rf)) {
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(rf, "type");
        if (!cJSON_IsObject(rf) || !cJSON_IsString(t) || strcmp(t->valuestring, "text") != 0)
            return api_err_set(e, 400, "response_format",
                               "response_format other than {\"type\": \"text\"} (structured "
                               "output) is not supported");
    }
    static const char *const unsupported[] = {"guided_json",        "guided_regex",
                                              "guided_choice",      "guided_grammar",
                                              "structured_outputs", "suffix"};
    for (size_t i = 0; i < sizeof unsupported / sizeof *unsupported; i++)
        if (present(b, unsupported[i]))
            return api_err_set(e, 400, unsupported[i], "'%s' is not supported", unsupported[i]);
    return DUET_OK;
}

static duet_status parse_stream(oai_job *j, const cJSON *b, api_err *e) {
    if (api_get_bool(b, "stream", &j->stream, e)) return DUET_ERR_INVALID;
    const cJSON *so = cJSON_GetObjectItemCaseSensitive(b, "stream_options");
    if (so && !cJSON_IsNull(so)) {
        if (!cJSON_IsObject(so))
            return api_err_set(e, 400, "stream_options", "'stream_options' must be an object");
        if (!j->stream)
            return api_err_set(e, 400, "stream_options",
                               "Stream options can only be defined when `stream=True`.");
        if (api_get_bool(so, "include_usage", &j->include_usage, e) ||
            api_get_bool(so, "continuous_usage_stats", &j->continuous_usage, e))
            return DUET_ERR_INVALID;
    }
    return DUET_OK;
}

/* Context-length checks with vLLM's wording, before anything is submitted. */
static duet_status check_lengths(oai_frontend *s, oai_job *j, long long max_tokens, api_err *e) {
    for (int p = 0; p < j->n_prompts; p++) {
        int n = j->n_prompt_ids[p];
        if (n < 1) return api_err_set(e, 400, "prompt", "The prompt cannot be empty");
        if (n >= s->max_model_len)
            return api_err_set(e, 400, NULL,
                               "This model's maximum context length is %d tokens. However, your "
                               "request has %d input tokens. Please reduce the length of the "
                               "input messages.",
                               s->max_model_len, n);
        if (max_tokens > 0 && max_tokens > s->max_model_len - n)
            return api_err_set(e, 400, "max_tokens",
                               "'max_tokens' or 'max_completion_tokens' is too large: %lld. This "
                               "model's maximum context length is %d tokens and your request "
                               "has %d input tokens (%lld > %d - %d).",
                               max_tokens, s->max_model_len, n, max_tokens, s->max_model_len, n);
        for (int i = 0; i < n; i++)
            if (j->prompts[p][i] < 0 || j->prompts[p][i] >= s->vocab)
                return api_err_set(e, 400, NULL,
                                   "Token id %d is out of vocabulary (the model has %d tokens)",
                                   j->prompts[p][i], s->vocab);
    }
    return DUET_OK;
}

static duet_status add_prompt(oai_job *j, int32_t *ids, int n, char *text) {
    int k = j->n_prompts;
    int32_t **p = realloc(j->prompts, (size_t)(k + 1) * sizeof *p);
    if (p) j->prompts = p;
    int *np = realloc(j->n_prompt_ids, (size_t)(k + 1) * sizeof *np);
    if (np) j->n_prompt_ids = np;
    char **pt = realloc(j->prompt_text, (size_t)(k + 1) * sizeof *pt);
    if (pt) j->prompt_text = pt;
    if (!p || !np || !pt) {
        free(ids);
        free(text);
        return DUET_ERR_NO_MEMORY;
    }
    j->prompts[k] = ids;
    j->n_prompt_ids[k] = n;
    j->prompt_text[k] = text;
    j->n_prompts++;
    return DUET_OK;
}

/* Text to ids, with BOS in front when asked and the tokenizer says so. */
static duet_status encode_text(oai_frontend *s, const char *text, size_t len, bool add_special,
                               int32_t **ids_p, int *n_p) {
    int32_t *ids = NULL;
    size_t n = 0;
    duet_status st = tok_encode(s->tok, text, len, false, &ids, &n);
    if (st != DUET_OK) return st;
    bool bos = add_special && tok_add_bos(s->tok) && tok_bos_id(s->tok) >= 0;
    int32_t *out = malloc((n + 1) * sizeof *out);
    if (!out) {
        free(ids);
        return DUET_ERR_NO_MEMORY;
    }
    size_t k = 0;
    if (bos) out[k++] = tok_bos_id(s->tok);
    if (n) memcpy(out + k, ids, n * sizeof *ids);
    free(ids);
    *ids_p = out;
    *n_p = (int)(k + n);
    return DUET_OK;
}

static char *decode_ids(oai_frontend *s, const int32_t *ids, int n, bool skip_special) {
    char *text = NULL;
    size_t len = 0;
    if (n == 0) return strdup("");
    if (tok_decode(s->tok, ids, (size_t)n, skip_special, &text, &len) != DUET_OK) return NULL;
    return text;
}

static duet_status token_array(const cJSON *arr, int32_t **ids_p, int *n_p, api_err *e) {
    int n = cJSON_GetArraySize(arr);
    int32_t *ids = malloc((size_t)(n > 0 ? n : 1) * sizeof *ids);
    if (!ids) return api_err_set(e, 500, NULL, "out of memory");
    int k = 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, arr) {
        double v = cJSON_IsNumber(x) ? x->valuedouble : -1;
        if (!cJSON_IsNumber(x) || v != floor(v) || v < 0 || v > 2147483647.0) {
            free(ids);
            return api_err_set(e, 400, "prompt",
                               "'prompt' must be a string, a list of strings, a list of token ids "
                               "or a list of lists of token ids");
        }
        ids[k++] = (int32_t)v;
    }
    *ids_p = ids;
    *n_p = k;
    return DUET_OK;
}

static duet_status parse_prompts(oai_frontend *s, oai_job *j, const cJSON *b, bool add_special,
                                 api_err *e) {
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(b, "prompt");
    static const char shape[] = "'prompt' must be a string, a list of strings, a list of token "
                                "ids or a list of lists of token ids";
    if (!p || cJSON_IsNull(p)) return api_err_set(e, 400, "prompt", "'prompt' is required");
    if (cJSON_IsString(p)) {
        int32_t *ids;
        int n;
        if (encode_text(s, p->valuestring, strlen(p->valuestring), add_special, &ids, &n))
            return api_err_set(e, 500, NULL, "tokenization failed");
        return add_prompt(j, ids, n, strdup(p->valuestring)) ? api_err_set(e, 500, NULL, "oom")
                                                             : DUET_OK;
    }
    if (!cJSON_IsArray(p)) return api_err_set(e, 400, "prompt", "%s", shape);
    if (!p->child) return api_err_set(e, 400, "prompt", "'prompt' cannot be an empty list");
    if (cJSON_IsNumber(p->child)) {
        int32_t *ids;
        int n;
        if (token_array(p, &ids, &n, e)) return DUET_ERR_INVALID;
        return add_prompt(j, ids, n, NULL) ? api_err_set(e, 500, NULL, "oom") : DUET_OK;
    }
    if (cJSON_GetArraySize(p) > MAX_PROMPTS)
        return api_err_set(e, 400, "prompt", "at most %d prompts per request", MAX_PROMPTS);
    const cJSON *x;
    cJSON_ArrayForEach(x, p) {
        int32_t *ids;
        int n;
        if (cJSON_IsString(x)) {
            if (encode_text(s, x->valuestring, strlen(x->valuestring), add_special, &ids, &n))
                return api_err_set(e, 500, NULL, "tokenization failed");
            if (add_prompt(j, ids, n, strdup(x->valuestring)))
                return api_err_set(e, 500, NULL, "oom");
        } else if (cJSON_IsArray(x)) {
            if (!x->child) return api_err_set(e, 400, "prompt", "a prompt cannot be an empty list");
            if (token_array(x, &ids, &n, e)) return DUET_ERR_INVALID;
            if (add_prompt(j, ids, n, NULL)) return api_err_set(e, 500, NULL, "oom");
        } else {
            return api_err_set(e, 400, "prompt", "%s", shape);
        }
    }
    return DUET_OK;
}

/* What a chat request asks of its answer, beside the prompt. */
typedef struct chat_req {
    bool parse_tools; /* tool_choice "auto": the answer's tool-call markup becomes tool_calls */
    bool thinking;    /* chat_template_kwargs.thinking (or enable_thinking) is true */
} chat_req;

/* tools: [{"type": "function", "function": {"name": ..., ...}}, ...]; the first missing piece
 * is named. Returns the list when it has entries, else NULL (none given, null or []). */
static duet_status check_tools(const cJSON *b, const cJSON **tools_p, api_err *e) {
    *tools_p = NULL;
    const cJSON *tools = cJSON_GetObjectItemCaseSensitive(b, "tools");
    if (!tools || cJSON_IsNull(tools)) return DUET_OK;
    if (!cJSON_IsArray(tools))
        return api_err_set(e, 400, "tools", "'tools' must be a list of function tools");
    int i = 0;
    const cJSON *t;
    cJSON_ArrayForEach(t, tools) {
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(t, "type");
        const cJSON *fn = cJSON_GetObjectItemCaseSensitive(t, "function");
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(fn, "name");
        if (!cJSON_IsObject(t) || !cJSON_IsString(type) || strcmp(type->valuestring, "function"))
            return api_err_set(e, 400, "tools", "tools[%d]: 'type' must be \"function\"", i);
        if (!cJSON_IsObject(fn) || !cJSON_IsString(name) || !name->valuestring[0])
            return api_err_set(e, 400, "tools", "tools[%d]: 'function' needs a 'name'", i);
        i++;
    }
    if (i) *tools_p = tools;
    return DUET_OK;
}

/* tool_choice as vLLM reads it: "none", "auto" (the default when tools are given; needs a
 * parser), "required" or a named function. The last two need constrained decoding, which duet
 * does not have: they are refused rather than answered without the guarantee they ask for. */
static duet_status check_tool_choice(oai_frontend *s, const cJSON *b, const cJSON *tools,
                                     chat_req *cr, api_err *e) {
    const cJSON *tc = cJSON_GetObjectItemCaseSensitive(b, "tool_choice");
    const char *p = "tool_choice";
    if (!tc || cJSON_IsNull(tc)) {
        if (!tools) return DUET_OK;
    } else if (cJSON_IsString(tc) && !strcmp(tc->valuestring, "none")) {
        return DUET_OK; /* the tools are rendered; the answer is plain text */
    } else if (!tools) {
        return api_err_set(e, 400, p, "When using `tool_choice`, `tools` must be set.");
    }
    if (!tc || cJSON_IsNull(tc) || (cJSON_IsString(tc) && !strcmp(tc->valuestring, "auto"))) {
        if (!s->cfg.auto_tool_choice || s->cfg.tool_parser < 0)
            return api_err_set(e, 400, p,
                               "\"auto\" tool choice requires --enable-auto-tool-choice and "
                               "--tool-call-parser to be set");
        cr->parse_tools = true;
        return DUET_OK;
    }
    if (cJSON_IsString(tc) && !strcmp(tc->valuestring, "required"))
        return api_err_set(e, 400, p,
                           "tool_choice \"required\" needs constrained decoding, which duet does "
                           "not have; use \"auto\" (the model decides whether to call)");
    const cJSON *fn = cJSON_GetObjectItemCaseSensitive(tc, "function");
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(fn, "name");
    if (!cJSON_IsObject(tc) || !cJSON_IsString(name))
        return api_err_set(e, 400, p,
                           "'tool_choice' must be \"none\", \"auto\", \"required\" or "
                           "{\"type\": \"function\", \"function\": {\"name\": ...}}");
    const cJSON *t;
    bool found = false;
    cJSON_ArrayForEach(t, tools) {
        const cJSON *n = cJSON_GetObjectItemCaseSensitive(
            cJSON_GetObjectItemCaseSensitive(t, "function"), "name");
        found = found || !strcmp(n->valuestring, name->valuestring);
    }
    if (!found)
        return api_err_set(e, 400, p, "Tool choice function name '%s' not found in tools.",
                           name->valuestring);
    return api_err_set(e, 400, p,
                       "a named tool_choice needs constrained decoding, which duet does not "
                       "have; use \"auto\" (the model decides whether to call)");
}

static bool kwarg_true(const cJSON *kw, const char *name) {
    return cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(kw, name));
}

/* messages (with tools, chat_template_kwargs, a request's own chat_template) → ids through
 * the chat template. tokenize: /tokenize's form (no tool_choice; its own chat_template always
 * allowed). */
static duet_status render_chat(oai_frontend *s, const cJSON *b, bool tokenize, int32_t **ids_p,
                               int *n_p, chat_req *cr, api_err *e) {
    memset(cr, 0, sizeof *cr);
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(b, "messages");
    if (!msgs || cJSON_IsNull(msgs))
        return api_err_set(e, 400, "messages", "'messages' is required");
    if (!cJSON_IsArray(msgs) || !msgs->child)
        return api_err_set(e, 400, "messages", "'messages' must be a non-empty list");
    bool add_gen = true, cont = false, add_special = false;
    if (api_get_bool(b, "add_generation_prompt", &add_gen, e) ||
        api_get_bool(b, "continue_final_message", &cont, e) ||
        api_get_bool(b, "add_special_tokens", &add_special, e))
        return DUET_ERR_INVALID;
    if (cont && add_gen && present(b, "add_generation_prompt"))
        return api_err_set(e, 400, "continue_final_message",
                           "Cannot set both `continue_final_message` and "
                           "`add_generation_prompt` to True.");
    const cJSON *kw = cJSON_GetObjectItemCaseSensitive(b, "chat_template_kwargs");
    if (kw && !cJSON_IsNull(kw) && !cJSON_IsObject(kw))
        return api_err_set(e, 400, "chat_template_kwargs",
                           "'chat_template_kwargs' must be an object");
    const cJSON *tools;
    if (check_tools(b, &tools, e)) return DUET_ERR_INVALID;
    if (!tokenize && check_tool_choice(s, b, tools, cr, e)) return DUET_ERR_INVALID;
    cr->thinking = kwarg_true(kw, "thinking") || kwarg_true(kw, "enable_thinking");
    const chat_template *tpl = s->tpl;
    chat_template *own = NULL;
    const cJSON *ct = cJSON_GetObjectItemCaseSensitive(b, "chat_template");
    if (ct && !cJSON_IsNull(ct)) {
        char err[256];
        if (!cJSON_IsString(ct))
            return api_err_set(e, 400, "chat_template", "'chat_template' must be a string");
        if (!tokenize && !s->cfg.trust_request_chat_template)
            return api_err_set(e, 400, "chat_template",
                               "Chat template is passed with request, but "
                               "--trust-request-chat-template is not set. Refused request with "
                               "untrusted chat template.");
        duet_status st = chat_derive(s->tpl, ct->valuestring, &own, err, sizeof err);
        if (st == DUET_ERR_NO_MEMORY) return api_err_set(e, 500, NULL, "out of memory");
        if (st != DUET_OK)
            return api_err_set(e, 400, "chat_template", "chat_template: %s",
                               err[0] ? err : duet_strerror(st));
        tpl = own;
    }
    if (!tpl)
        return api_err_set(e, 400, NULL,
                           "this model has no chat template (start the server with "
                           "--chat-template, or send chat_template to /tokenize)");
    chat_opts o = chat_default_opts(tpl);
    o.add_generation_prompt = add_gen && !cont;
    o.tools = tools;
    o.kwargs = cJSON_IsObject(kw) ? kw : NULL;
    char *text = NULL;
    size_t len = 0;
    char err[256] = "";
    duet_status st = chat_render(tpl, msgs, &o, &text, &len, err, sizeof err);
    chat_destroy(own);
    if (st == DUET_ERR_UNSUPPORTED || st == DUET_ERR_INVALID || st == DUET_ERR_TOO_LONG)
        return api_err_set(e, 400, "messages", "%s", err[0] ? err : "invalid messages");
    if (st != DUET_OK) return api_err_set(e, 500, NULL, "rendering the chat template failed");
    if (cont) {
        /* vLLM: keep the rendered text only up to the final message's own content, so the
         * model continues it rather than starting a new turn */
        const cJSON *last = cJSON_GetArrayItem(msgs, cJSON_GetArraySize(msgs) - 1);
        const cJSON *role = cJSON_GetObjectItemCaseSensitive(last, "role");
        const cJSON *content = cJSON_GetObjectItemCaseSensitive(last, "content");
        char *hit = NULL;
        if (cJSON_IsString(role) && !strcmp(role->valuestring, "assistant") &&
            cJSON_IsString(content)) {
            size_t cl = strlen(content->valuestring);
            for (char *q = text; (q = strstr(q, content->valuestring)); q++) hit = q + cl;
            if (cl == 0) hit = NULL;
        }
        if (!hit) {
            free(text);
            return api_err_set(e, 400, "continue_final_message",
                               "continue_final_message needs a final assistant message with "
                               "non-empty string content");
        }
        *hit = '\0';
        len = (size_t)(hit - text);
    }
    st = encode_text(s, text, len, add_special, ids_p, n_p);
    free(text);
    if (st != DUET_OK) return api_err_set(e, 500, NULL, "tokenization failed");
    return DUET_OK;
}

/* kv_transfer_params of a decode worker's request (vLLM NIXL names) into C. */
static duet_status kv_params_parse(const cJSON *kv, srv_kv_params *out, api_err *e) {
    const cJSON *host = cJSON_GetObjectItemCaseSensitive(kv, "remote_host");
    const cJSON *port = cJSON_GetObjectItemCaseSensitive(kv, "remote_port");
    const cJSON *eng = cJSON_GetObjectItemCaseSensitive(kv, "remote_engine_id");
    const cJSON *rid = cJSON_GetObjectItemCaseSensitive(kv, "remote_request_id");
    const cJSON *tp = cJSON_GetObjectItemCaseSensitive(kv, "tp_size");
    const char *p = "kv_transfer_params";
    if (!cJSON_IsString(host) || !host->valuestring[0] ||
        strlen(host->valuestring) >= sizeof out->host)
        return api_err_set(e, 400, p, "kv_transfer_params: remote_host must be a host name");
    if (!cJSON_IsNumber(port) || port->valuedouble < 1 || port->valuedouble > 65535 ||
        port->valuedouble != (int)port->valuedouble)
        return api_err_set(e, 400, p, "kv_transfer_params: remote_port must be a port number");
    if (!cJSON_IsString(eng) || strlen(eng->valuestring) >= sizeof out->engine_id)
        return api_err_set(e, 400, p, "kv_transfer_params: remote_engine_id must be a string");
    char *end = NULL;
    errno = 0;
    unsigned long long lease = cJSON_IsString(rid) ? strtoull(rid->valuestring, &end, 10) : 0;
    if (!cJSON_IsString(rid) || !rid->valuestring[0] || *end || errno || rid->valuestring[0] == '-')
        return api_err_set(e, 400, p,
                           "kv_transfer_params: remote_request_id must be the prefill worker's "
                           "lease id");
    if (tp && !cJSON_IsNull(tp) &&
        (!cJSON_IsNumber(tp) || tp->valuedouble < 1 || tp->valuedouble > 65536 ||
         tp->valuedouble != (int)tp->valuedouble))
        return api_err_set(e, 400, p, "kv_transfer_params: tp_size must be a positive integer");
    memset(out, 0, sizeof *out);
    snprintf(out->host, sizeof out->host, "%s", host->valuestring);
    out->port = port->valueint;
    snprintf(out->engine_id, sizeof out->engine_id, "%s", eng->valuestring);
    out->lease = lease;
    out->tp_size = cJSON_IsNumber(tp) ? tp->valueint : 1;
    return DUET_OK;
}

/* A prefill worker's answer: where the lease's blocks can be pulled. NULL without memory. */
static cJSON *kv_params_json(const srv_kv_params *kp, const int32_t *blocks, int n_blocks) {
    cJSON *o = cJSON_CreateObject();
    cJSON *ids = cJSON_CreateArray();
    if (!o || !ids) {
        cJSON_Delete(o);
        cJSON_Delete(ids);
        return NULL;
    }
    for (int i = 0; i < n_blocks; i++) cJSON_AddItemToArray(ids, cJSON_CreateNumber(blocks[i]));
    char lease[32];
    snprintf(lease, sizeof lease, "%llu", (unsigned long long)kp->lease);
    cJSON_AddBoolToObject(o, "do_remote_prefill", 1);
    cJSON_AddBoolToObject(o, "do_remote_decode", 0);
    cJSON_AddStringToObject(o, "remote_engine_id", kp->engine_id);
    cJSON_AddItemToObject(o, "remote_block_ids", ids);
    cJSON_AddStringToObject(o, "remote_host", kp->host);
    cJSON_AddNumberToObject(o, "remote_port", kp->port);
    cJSON_AddStringToObject(o, "remote_request_id", lease);
    cJSON_AddNumberToObject(o, "tp_size", kp->tp_size);
    return o;
}

/* kv_transfer_params: which role the plug-in plays for this request. */
static duet_status parse_kv_params(oai_frontend *s, oai_job *j, const cJSON *b, eng_kv_role *role,
                                   srv_kv_params **remote, api_err *e) {
    *role = ENG_KV_LOCAL;
    *remote = NULL;
    const cJSON *kv = cJSON_GetObjectItemCaseSensitive(b, "kv_transfer_params");
    if (!kv || cJSON_IsNull(kv)) return DUET_OK;
    if (!cJSON_IsObject(kv))
        return api_err_set(e, 400, "kv_transfer_params", "'kv_transfer_params' must be an object");
    if (!s->plugin) return DUET_OK; /* no connector: ignored, as vLLM without one */
    bool remote_decode = false, remote_prefill = false;
    if (api_get_bool(kv, "do_remote_decode", &remote_decode, e) ||
        api_get_bool(kv, "do_remote_prefill", &remote_prefill, e))
        return DUET_ERR_INVALID;
    if (remote_decode && remote_prefill)
        return api_err_set(e, 400, "kv_transfer_params",
                           "do_remote_decode and do_remote_prefill exclude each other");
    if (remote_decode && s->plugin->lease && j->n_choices != 1)
        return api_err_set(e, 400, "kv_transfer_params",
                           "do_remote_decode (a prefill leg) needs one prompt and n = 1: send "
                           "one per prompt (duet-proxy does); the decode worker makes the n "
                           "choices");
    if (remote_prefill && s->plugin->fetch && j->n_prompts != 1)
        return api_err_set(e, 400, "kv_transfer_params",
                           "do_remote_prefill: kv_transfer_params describe one prompt's KV; send "
                           "one request per prompt (duet-proxy does)");
    if (remote_decode && s->plugin->lease) {
        *role = ENG_KV_LEASE;
        j->kv_lease = true;
    } else if (remote_prefill && s->plugin->fetch) {
        srv_kv_params kp;
        if (kv_params_parse(kv, &kp, e) != DUET_OK) return DUET_ERR_INVALID;
        *remote = malloc(sizeof **remote);
        if (!*remote) return api_err_set(e, 500, NULL, "out of memory");
        **remote = kp;
        *role = ENG_KV_REMOTE;
    }
    return DUET_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Submission */

static int status_of(duet_status st) {
    switch (st) {
    case DUET_ERR_INVALID:
    case DUET_ERR_TOO_LONG:
    case DUET_ERR_UNSUPPORTED:
        return 400;
    case DUET_ERR_BUSY:
        return 503;
    default:
        return 500;
    }
}

static duet_status job_setup_choices(oai_job *j, int n) {
    j->n_choices = j->n_prompts * n;
    j->choices = calloc((size_t)j->n_choices, sizeof *j->choices);
    if (!j->choices) return DUET_ERR_NO_MEMORY;
    for (int p = 0; p < j->n_prompts; p++)
        for (int k = 0; k < n; k++) {
            oai_choice *c = &j->choices[p * n + k];
            c->job = j;
            c->index = p * n + k;
            c->prompt = p;
            c->stop_token = -1;
            c->n_prompt = j->n_prompt_ids[p];
            api_reasoner_init(&c->reasoner);
            if (j->parse_tools &&
                api_tool_parser_create((api_tool_format)j->fe->cfg.tool_parser, &c->tools))
                return DUET_ERR_NO_MEMORY;
        }
    return DUET_OK;
}

static void job_start(oai_job *j, const eng_sampling *sp, int n, eng_kv_role role,
                      srv_kv_params *remote);

/* Submits every choice; on a failure aborts the ones already in and answers the error. */
static void job_submit(oai_job *j, const eng_sampling *sp, int n, eng_kv_role role,
                       srv_kv_params *remote) {
    oai_frontend *s = j->fe;
    if (s->draining) {
        api_err e = {0};
        api_err_set(&e, 503, NULL, "The server is shutting down");
        free(remote);
        job_fail(j, &e);
        return;
    }
    if (s->live_requests + j->n_choices > s->max_live) {
        api_err e = {0};
        api_err_set(&e, 503, NULL,
                    "The server is overloaded (%d requests in progress); retry later",
                    s->live_requests);
        free(remote);
        job_fail(j, &e);
        return;
    }
    job_start(j, sp, n, role, remote);
}

static void job_start(oai_job *j, const eng_sampling *sp, int n, eng_kv_role role,
                      srv_kv_params *remote) {
    oai_frontend *s = j->fe;
    for (int i = 0; i < j->n_choices; i++) {
        oai_choice *c = &j->choices[i];
        eng_request r = {.id = ++s->next_id,
                         .prompt = j->prompts[c->prompt],
                         .n_prompt = j->n_prompt_ids[c->prompt],
                         .sampling = *sp,
                         .kv_role = role,
                         .remote = i == 0 ? remote : NULL,
                         .user = c};
        /* n > 1 of a remote prompt: choice 0 pulls the KV, the others fork it */
        if (role == ENG_KV_REMOTE && i > 0) {
            r.kv_role = ENG_KV_FORK;
            r.fork_of = j->choices[0].eng_id;
        }
        /* n > 1 with a seed: each choice its own stream (vLLM: seed + index) */
        if (sp->has_seed) r.sampling.seed = sp->seed + (uint64_t)(i % n);
        char err[256] = "";
        duet_status st = eng_submit(s->eng, &r, err, sizeof err);
        if (st != DUET_OK) {
            if (i == 0) free(remote);
            api_err e = {0};
            api_err_set(&e, status_of(st), NULL, "%s", err[0] ? err : duet_strerror(st));
            job_fail(j, &e);
            return;
        }
        if (i == 0) c->remote = remote;
        c->eng_id = r.id;
        c->live = true;
        j->n_live++;
        s->live_requests++;
    }
    if (http_req_on_close(j->req, on_client_gone, j) != DUET_OK) {
        on_client_gone(j->req, j);
        return;
    }
    if (j->stream) {
        if (http_stream_start(j->req, 200, "text/event-stream", j->extra) != DUET_OK) {
            /* the client went away meanwhile; on_close will come */
            return;
        }
        j->stream_started = true;
        met_count_http(s->met, 200);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Response pieces */

static double clamp_lp(float lp) {
    return isfinite(lp) ? (double)lp : -9999.0;
}

/* A token's text as the client sees it in logprobs (decoded alone; invalid bytes U+FFFD). */
static char *token_str(oai_frontend *s, int32_t id) {
    char *t = decode_ids(s, &id, 1, false);
    return t ? t : strdup("");
}

static cJSON *usage_json(int prompt, int completion) {
    cJSON *u = cJSON_CreateObject();
    cJSON_AddNumberToObject(u, "prompt_tokens", prompt);
    cJSON_AddNumberToObject(u, "total_tokens", prompt + completion);
    cJSON_AddNumberToObject(u, "completion_tokens", completion);
    cJSON_AddNullToObject(u, "prompt_tokens_details");
    return u;
}

static cJSON *job_usage(const oai_job *j) {
    int prompt = 0, completion = 0;
    for (int p = 0; p < j->n_prompts; p++) prompt += j->n_prompt_ids[p];
    for (int i = 0; i < j->n_choices; i++) completion += j->choices[i].n_output;
    return usage_json(prompt, completion);
}

/* A JSON string of n bytes that need not end in NUL. */
static cJSON *json_string_n(const char *t, size_t n) {
    char *d = malloc(n + 1);
    if (!d) return NULL;
    memcpy(d, t, n);
    d[n] = '\0';
    cJSON *x = cJSON_CreateString(d);
    free(d);
    return x;
}

static cJSON *ids_json(const int32_t *ids, int n) {
    cJSON *a = cJSON_CreateArray();
    for (int i = 0; i < n; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(ids[i]));
    return a;
}

static const char *finish_str(eng_finish f) {
    switch (f) {
    case ENG_FINISH_STOP:
        return "stop";
    case ENG_FINISH_LENGTH:
        return "length";
    case ENG_FINISH_ABORT:
        return "abort";
    case ENG_FINISH_ERROR:
        return "error";
    default:
        return NULL;
    }
}

static void add_finish(cJSON *o, const oai_choice *c, bool final) {
    const char *f = !final ? NULL : c->finish_reason ? c->finish_reason : finish_str(c->finish);
    if (f)
        cJSON_AddStringToObject(o, "finish_reason", f);
    else
        cJSON_AddNullToObject(o, "finish_reason");
    if (final && c->stop_reason)
        cJSON_AddStringToObject(o, "stop_reason", c->stop_reason);
    else if (final && c->stop_token >= 0)
        cJSON_AddNumberToObject(o, "stop_reason", c->stop_token);
    else
        cJSON_AddNullToObject(o, "stop_reason");
}

/* Legacy completions logprobs: parallel arrays. */
typedef struct legacy_lp {
    cJSON *obj, *tokens, *token_logprobs, *top_logprobs, *text_offset;
} legacy_lp;

static void legacy_init(legacy_lp *l) {
    l->obj = cJSON_CreateObject();
    l->text_offset = cJSON_AddArrayToObject(l->obj, "text_offset");
    l->token_logprobs = cJSON_AddArrayToObject(l->obj, "token_logprobs");
    l->tokens = cJSON_AddArrayToObject(l->obj, "tokens");
    l->top_logprobs = cJSON_AddArrayToObject(l->obj, "top_logprobs");
}

static void legacy_add(oai_frontend *s, legacy_lp *l, int32_t tok, const eng_token_lp *lp,
                       size_t *offset) {
    char *str = token_str(s, tok);
    cJSON_AddItemToArray(l->text_offset, cJSON_CreateNumber((double)*offset));
    *offset += strlen(str);
    cJSON_AddItemToArray(l->tokens, cJSON_CreateString(str));
    if (!lp) {
        cJSON_AddItemToArray(l->token_logprobs, cJSON_CreateNull());
        cJSON_AddItemToArray(l->top_logprobs, cJSON_CreateNull());
        free(str);
        return;
    }
    cJSON_AddItemToArray(l->token_logprobs, cJSON_CreateNumber(clamp_lp(lp->logprob)));
    /* the top alternatives plus the chosen token, as vLLM lists them */
    cJSON *top = cJSON_CreateObject();
    for (int k = 0; k < lp->n_top; k++) {
        char *t = token_str(s, lp->top[k].token);
        if (!cJSON_GetObjectItemCaseSensitive(top, t))
            cJSON_AddNumberToObject(top, t, clamp_lp(lp->top[k].logprob));
        free(t);
    }
    if (!cJSON_GetObjectItemCaseSensitive(top, str))
        cJSON_AddNumberToObject(top, str, clamp_lp(lp->logprob));
    cJSON_AddItemToArray(l->top_logprobs, top);
    free(str);
}

/* Chat logprobs entries: {"token","logprob","bytes","top_logprobs":[...]} */
static cJSON *chat_lp_entry(oai_frontend *s, int32_t tok, float logprob) {
    cJSON *o = cJSON_CreateObject();
    char *str = token_str(s, tok);
    cJSON_AddStringToObject(o, "token", str);
    cJSON_AddNumberToObject(o, "logprob", clamp_lp(logprob));
    cJSON *bytes = cJSON_AddArrayToObject(o, "bytes");
    for (const unsigned char *p = (const unsigned char *)str; *p; p++)
        cJSON_AddItemToArray(bytes, cJSON_CreateNumber(*p));
    free(str);
    return o;
}

static void chat_lp_add(oai_frontend *s, cJSON *content, const eng_token_lp *lp, int n_top) {
    cJSON *o = chat_lp_entry(s, lp->token, lp->logprob);
    cJSON *top = cJSON_AddArrayToObject(o, "top_logprobs");
    for (int k = 0; k < lp->n_top && k < n_top; k++)
        cJSON_AddItemToArray(top, chat_lp_entry(s, lp->top[k].token, lp->top[k].logprob));
    cJSON_AddItemToArray(content, o);
}

static cJSON *chunk_head(const oai_job *j, const char *object) {
    oai_frontend *s = j->fe;
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "id", j->id);
    cJSON_AddStringToObject(o, "object", object);
    cJSON_AddNumberToObject(o, "created", (double)j->created);
    cJSON_AddStringToObject(o, "model", s->cfg.served_name);
    return o;
}

/* ---------------------------------------------------------------------------------------------
 * Streaming */

/* Stream chunks are written straight into the frontend's reused buffer (api_sse_begin/_send):
 * no JSON tree and, once the buffer has grown, no allocation for a chunk of text. The parts a
 * token rarely carries (logprobs, tool calls, kv_transfer_params) are still built with cJSON
 * and printed into it. Keys come in the order the trees had them. */

/* ,"key": */
static void w_key(strbuf *b, const char *key) {
    strbuf_add(b, ",\"", 2);
    strbuf_str(b, key);
    strbuf_add(b, "\":", 2);
}

static void w_cstr(strbuf *b, const char *t) {
    api_json_str(b, t, strlen(t));
}

static void w_int(strbuf *b, long long x) {
    char t[24];
    int n = snprintf(t, sizeof t, "%lld", x);
    strbuf_add(b, t, (size_t)n);
}

/* a subtree printed unformatted; x is not freed */
static void w_tree(strbuf *b, const cJSON *x) {
    char *t = x ? cJSON_PrintUnformatted(x) : NULL;
    if (!t) {
        b->oom = true;
        return;
    }
    strbuf_str(b, t);
    cJSON_free(t);
}

static void w_ids(strbuf *b, const int32_t *ids, int n) {
    strbuf_add(b, "[", 1);
    for (int i = 0; i < n; i++) {
        if (i) strbuf_add(b, ",", 1);
        w_int(b, ids[i]);
    }
    strbuf_add(b, "]", 1);
}

static void w_usage(strbuf *b, int prompt, int completion) {
    strbuf_str(b, "{\"prompt_tokens\":");
    w_int(b, prompt);
    w_key(b, "total_tokens");
    w_int(b, (long long)prompt + completion);
    w_key(b, "completion_tokens");
    w_int(b, completion);
    strbuf_str(b, ",\"prompt_tokens_details\":null}");
}

/* {"id":..,"object":..,"created":..,"model":.. (left open) */
static void w_head(strbuf *b, const oai_job *j, const char *object) {
    strbuf_str(b, "{\"id\":");
    w_cstr(b, j->id);
    w_key(b, "object");
    w_cstr(b, object);
    w_key(b, "created");
    w_int(b, j->created);
    w_key(b, "model");
    w_cstr(b, j->fe->cfg.served_name);
}

/* ,"finish_reason":..,"stop_reason":.. as add_finish */
static void w_finish(strbuf *b, const oai_choice *c, bool final) {
    const char *f = !final ? NULL : c->finish_reason ? c->finish_reason : finish_str(c->finish);
    w_key(b, "finish_reason");
    if (f)
        w_cstr(b, f);
    else
        strbuf_add(b, "null", 4);
    w_key(b, "stop_reason");
    if (final && c->stop_reason)
        w_cstr(b, c->stop_reason);
    else if (final && c->stop_token >= 0)
        w_int(b, c->stop_token);
    else
        strbuf_add(b, "null", 4);
}

/* the chunk's tail: the choice closed, usage, kv_transfer_params, the object closed; sent */
static void stream_finish_chunk(oai_job *j, oai_choice *c, bool final) {
    strbuf *b = &j->fe->sse;
    strbuf_add(b, "}]", 2);
    if (j->continuous_usage) {
        w_key(b, "usage");
        w_usage(b, c->n_prompt, c->n_output);
    }
    if (final && j->kv_params_out) {
        w_key(b, "kv_transfer_params");
        w_tree(b, j->kv_params_out);
    }
    strbuf_add(b, "}", 1);
    c->sent_first = true;
    if (j->req && api_sse_send(j->req, b) != DUET_OK) {
        /* gone or stuck: on_close follows and aborts the rest */
    }
}

/* One chunk for one engine event of a completions stream. */
static void stream_completion(oai_job *j, oai_choice *c, const oai_msg *m) {
    oai_frontend *s = j->fe;
    strbuf *b = &s->sse;
    bool first = !c->sent_first, final = m->finish != ENG_FINISH_NONE;
    api_sse_begin(b);
    w_head(b, j, "text_completion");
    strbuf_str(b, ",\"choices\":[{\"index\":");
    w_int(b, c->index);
    strbuf_str(b, ",\"text\":\"");
    if (first && j->echo) {
        const char *pt = j->prompt_text[c->prompt];
        if (pt) api_json_escape(b, pt, strlen(pt));
    }
    api_json_escape(b, m->text ? m->text : "", m->text_len);
    strbuf_add(b, "\"", 1);
    w_key(b, "logprobs");
    if (j->want_logprobs) {
        legacy_lp l = {0};
        legacy_init(&l);
        if (first && j->echo)
            for (int i = 0; i < c->n_prompt; i++)
                legacy_add(s, &l, j->prompts[c->prompt][i],
                           c->prompt_lp && i > 0 ? &c->prompt_lp[i] : NULL, &c->text_offset);
        if (m->has_token && m->has_lp) legacy_add(s, &l, m->token, &m->lp, &c->text_offset);
        w_tree(b, l.obj);
        cJSON_Delete(l.obj);
    } else {
        strbuf_add(b, "null", 4);
    }
    w_finish(b, c, final);
    if (j->return_token_ids) {
        if (first) {
            w_key(b, "prompt_token_ids");
            w_ids(b, j->prompts[c->prompt], c->n_prompt);
        }
        w_key(b, "token_ids");
        w_ids(b, &m->token, m->has_token ? 1 : 0);
    }
    stream_finish_chunk(j, c, final);
}

/* Where a choice's tool parser puts its events: content text, and the entries of a delta's
 * tool_calls (a call's start, then its argument pieces). */
typedef struct tool_sink {
    strbuf *content;
    cJSON *calls; /* NULL until the first entry */
} tool_sink;

static void on_tool_event(void *user, const api_tool_event *ev) {
    tool_sink *t = user;
    if (ev->kind == API_TOOL_EVENT_CONTENT) {
        strbuf_add(t->content, ev->text, ev->len);
        return;
    }
    cJSON *x = api_tool_event_json(ev);
    if (x && !t->calls) t->calls = cJSON_CreateArray();
    if (x && !cJSON_AddItemToArray(t->calls, x)) cJSON_Delete(x);
}

static void stream_chat(oai_job *j, oai_choice *c, const oai_msg *m) {
    oai_frontend *s = j->fe;
    strbuf *b = &s->sse;
    bool first = !c->sent_first, final = m->finish != ENG_FINISH_NONE;
    api_sse_begin(b);
    w_head(b, j, "chat.completion.chunk");
    if (first && j->return_token_ids) {
        w_key(b, "prompt_token_ids");
        w_ids(b, j->prompts[c->prompt], c->n_prompt);
    }
    strbuf_str(b, ",\"choices\":[{\"index\":");
    w_int(b, c->index);
    strbuf_str(b, ",\"delta\":{");
    bool any = false;
    if (first) {
        strbuf_str(b, "\"role\":\"assistant\"");
        any = true;
    }
    /* this event's text: split off the reasoning, then through the tool parser (this token's
     * events, all in this one chunk) */
    strbuf *reason = &s->sse_reason, *content = &s->sse_content;
    strbuf_clear(reason);
    strbuf_clear(content);
    const char *text = m->text ? m->text : "";
    size_t text_len = m->text_len;
    if (j->split_reasoning) {
        strbuf *t = &s->sse_text;
        strbuf_clear(t);
        api_reasoner_feed(&c->reasoner, text, text_len, reason, t);
        if (final) api_reasoner_finish(&c->reasoner, reason, t);
        text = t->p ? t->p : "";
        text_len = t->len;
    }
    tool_sink ts = {content, NULL};
    if (c->tools) {
        api_tool_parser_feed(c->tools, text, text_len, on_tool_event, &ts);
        if (final && api_tool_parser_finish(c->tools, on_tool_event, &ts) > 0)
            c->finish_reason = "tool_calls";
        text = content->p ? content->p : "";
        text_len = content->len;
    }
    if (reason->len) {
        strbuf_str(b, any ? ",\"reasoning_content\":" : "\"reasoning_content\":");
        api_json_str(b, reason->p, reason->len);
        any = true;
    }
    if (text_len || (!reason->len && !ts.calls)) {
        strbuf_str(b, any ? ",\"content\":" : "\"content\":");
        api_json_str(b, text, text_len);
        any = true;
    }
    if (ts.calls) {
        strbuf_str(b, any ? ",\"tool_calls\":" : "\"tool_calls\":");
        w_tree(b, ts.calls);
        cJSON_Delete(ts.calls);
    }
    strbuf_add(b, "}", 1);
    w_key(b, "logprobs");
    if (j->want_logprobs) {
        strbuf_str(b, "{\"content\":");
        cJSON *arr = cJSON_CreateArray();
        if (arr && m->has_token && m->has_lp) chat_lp_add(s, arr, &m->lp, j->logprobs);
        w_tree(b, arr);
        cJSON_Delete(arr);
        strbuf_add(b, "}", 1);
    } else {
        strbuf_add(b, "null", 4);
    }
    w_finish(b, c, final);
    if (j->return_token_ids) {
        w_key(b, "token_ids");
        w_ids(b, &m->token, m->has_token ? 1 : 0);
    }
    stream_finish_chunk(j, c, final);
}

static void stream_end(oai_job *j) {
    if (!j->req) return;
    if (j->failed || j->aborted) {
        api_sse_error(j->req, j->aborted ? 503 : (j->err_status ? j->err_status : 500),
                      j->err_msg[0] ? j->err_msg : "the request failed");
    } else if (j->include_usage) {
        cJSON *o =
            chunk_head(j, j->kind == OAI_JOB_CHAT ? "chat.completion.chunk" : "text_completion");
        cJSON_AddArrayToObject(o, "choices");
        cJSON_AddItemToObject(o, "usage", job_usage(j));
        api_sse_json(j->req, o);
        cJSON_Delete(o);
    }
    api_sse_done(j->req);
    http_req *req = j->req;
    j->req = NULL;
    http_stream_end(req);
}

/* ---------------------------------------------------------------------------------------------
 * Whole responses */

/* The end every whole (not streamed) answer shares: kv_transfer_params, then the response;
 * frees o. */
static void respond_whole(oai_job *j, cJSON *o) {
    if (j->kv_params_out)
        cJSON_AddItemToObject(o, "kv_transfer_params", cJSON_Duplicate(j->kv_params_out, true));
    else
        cJSON_AddNullToObject(o, "kv_transfer_params");
    http_req *req = j->req;
    j->req = NULL;
    met_count_http(j->fe->met, 200);
    api_respond_json(req, 200, o, j->extra);
    cJSON_Delete(o);
}

static void respond_completion(oai_job *j) {
    oai_frontend *s = j->fe;
    cJSON *o = chunk_head(j, "text_completion");
    cJSON *choices = cJSON_AddArrayToObject(o, "choices");
    for (int i = 0; i < j->n_choices; i++) {
        oai_choice *c = &j->choices[i];
        cJSON *ch = cJSON_CreateObject();
        cJSON_AddItemToArray(choices, ch);
        cJSON_AddNumberToObject(ch, "index", c->index);
        strbuf text = {0};
        if (j->echo) strbuf_str(&text, j->prompt_text[c->prompt] ? j->prompt_text[c->prompt] : "");
        strbuf_add(&text, c->text.p ? c->text.p : "", c->text.len);
        cJSON_AddStringToObject(ch, "text", text.p ? text.p : "");
        strbuf_free(&text);
        if (j->want_logprobs) {
            legacy_lp l;
            legacy_init(&l);
            size_t off = 0;
            if (j->echo)
                for (int k = 0; k < c->n_prompt; k++)
                    legacy_add(s, &l, j->prompts[c->prompt][k],
                               c->prompt_lp && k > 0 ? &c->prompt_lp[k] : NULL, &off);
            for (int k = 0; k < c->n_lps; k++) legacy_add(s, &l, c->lps[k].token, &c->lps[k], &off);
            cJSON_AddItemToObject(ch, "logprobs", l.obj);
        } else {
            cJSON_AddNullToObject(ch, "logprobs");
        }
        add_finish(ch, c, true);
        cJSON_AddNullToObject(ch, "prompt_logprobs");
        if (j->return_token_ids) {
            cJSON_AddItemToObject(ch, "prompt_token_ids",
                                  ids_json(j->prompts[c->prompt], c->n_prompt));
            cJSON_AddItemToObject(ch, "token_ids", ids_json(c->ids, c->n_ids));
        }
    }
    cJSON_AddItemToObject(o, "usage", job_usage(j));
    respond_whole(j, o);
}

static void respond_chat(oai_job *j) {
    oai_frontend *s = j->fe;
    cJSON *o = chunk_head(j, "chat.completion");
    cJSON *choices = cJSON_AddArrayToObject(o, "choices");
    for (int i = 0; i < j->n_choices; i++) {
        oai_choice *c = &j->choices[i];
        cJSON *ch = cJSON_CreateObject();
        cJSON_AddItemToArray(choices, ch);
        cJSON_AddNumberToObject(ch, "index", c->index);
        cJSON *msg = cJSON_AddObjectToObject(ch, "message");
        cJSON_AddStringToObject(msg, "role", "assistant");
        strbuf reason = {0}, content = {0};
        if (j->split_reasoning) {
            api_reasoner_feed(&c->reasoner, c->text.p ? c->text.p : "", c->text.len, &reason,
                              &content);
            api_reasoner_finish(&c->reasoner, &reason, &content);
        } else {
            strbuf_add(&content, c->text.p ? c->text.p : "", c->text.len);
        }
        cJSON *calls = NULL;
        if (c->tools) {
            /* the text before the calls is the content (null when empty), or all of it when
             * no call was complete; incomplete calls are left out, as vLLM's parser does */
            api_tool_parser_feed(c->tools, content.p ? content.p : "", content.len, NULL, NULL);
            api_tool_parser_finish(c->tools, NULL, NULL);
            size_t n = 0;
            const char *t = api_tool_parser_content(c->tools, &n);
            if (t)
                cJSON_AddItemToObject(msg, "content", json_string_n(t, n));
            else
                cJSON_AddNullToObject(msg, "content");
            if (api_tool_parser_n_calls(c->tools) > 0) {
                calls = api_tool_calls_json(c->tools);
                c->finish_reason = "tool_calls";
            }
        } else if (content.len || !j->split_reasoning) {
            cJSON_AddStringToObject(msg, "content", content.p ? content.p : "");
        } else {
            cJSON_AddNullToObject(msg, "content"); /* vLLM: nothing followed the reasoning */
        }
        if (j->split_reasoning)
            cJSON_AddStringToObject(msg, "reasoning_content", reason.p ? reason.p : "");
        else
            cJSON_AddNullToObject(msg, "reasoning_content");
        strbuf_free(&reason);
        strbuf_free(&content);
        if (calls)
            cJSON_AddItemToObject(msg, "tool_calls", calls);
        else
            cJSON_AddArrayToObject(msg, "tool_calls");
        if (j->want_logprobs) {
            cJSON *lp = cJSON_AddObjectToObject(ch, "logprobs");
            cJSON *arr = cJSON_AddArrayToObject(lp, "content");
            for (int k = 0; k < c->n_lps; k++) chat_lp_add(s, arr, &c->lps[k], j->logprobs);
        } else {
            cJSON_AddNullToObject(ch, "logprobs");
        }
        add_finish(ch, c, true);
        if (j->return_token_ids) cJSON_AddItemToObject(ch, "token_ids", ids_json(c->ids, c->n_ids));
    }
    cJSON_AddItemToObject(o, "usage", job_usage(j));
    if (j->return_token_ids)
        cJSON_AddItemToObject(o, "prompt_token_ids", ids_json(j->prompts[0], j->n_prompt_ids[0]));
    cJSON_AddNullToObject(o, "prompt_logprobs");
    respond_whole(j, o);
}

static void job_complete(oai_job *j) {
    if (!j->req) return;
    if (j->stream_started) {
        stream_end(j);
        return;
    }
    if (j->failed || j->aborted) {
        job_respond_error(j, j->aborted ? 503 : (j->err_status ? j->err_status : 500),
                          j->err_msg[0] ? j->err_msg : "the request failed", NULL);
        return;
    }
    if (j->kind == OAI_JOB_CHAT)
        respond_chat(j);
    else
        respond_completion(j);
}

/* ---------------------------------------------------------------------------------------------
 * Engine events */

static bool grow(void **p, int *cap, int need, size_t elem) {
    if (need <= *cap) return true;
    int c = *cap ? *cap * 2 : 16;
    while (c < need) c *= 2;
    void *q = realloc(*p, (size_t)c * elem);
    if (!q) return false;
    *p = q;
    *cap = c;
    return true;
}

static void choice_finish(oai_job *j, oai_choice *c, oai_msg *m) {
    oai_frontend *s = j->fe;
    c->done = true;
    c->live = false;
    j->n_live--;
    s->live_requests--;
    c->finish = m->finish;
    c->stop_token = m->stop_token;
    if (m->stop_reason) c->stop_reason = strdup(m->stop_reason);
    const char *fs = finish_str(m->finish);
    met_count_finish(s->met, fs);
    met_observe(s->met, MET_HIST_E2E, m->t - j->t_arrival);
    met_observe(s->met, MET_HIST_PROMPT_TOKENS, m->n_prompt);
    met_observe(s->met, MET_HIST_GENERATION_TOKENS, m->n_output);
    free(c->remote);
    c->remote = NULL;
    if (m->finish == ENG_FINISH_ERROR && !j->failed && !j->aborted) {
        j->failed = true;
        j->err_status = 500;
        snprintf(j->err_msg, sizeof j->err_msg, "%s", m->error ? m->error : "the request failed");
        LOG_WARN("api: %s: engine request %llu failed: %s", j->id, (unsigned long long)c->eng_id,
                 j->err_msg);
        job_abort_live(j);
    } else if (m->finish == ENG_FINISH_ABORT && j->req && !j->failed && !j->aborted) {
        /* only the server aborts a request whose client is still there: shutdown */
        j->aborted = true;
        snprintf(j->err_msg, sizeof j->err_msg,
                 "The request was aborted: the server is shutting "
                 "down");
        job_abort_live(j);
    }
    if (m->n_lease_blocks > 0) {
        cJSON *params = NULL;
        srv_kv_params kp = {.lease = c->eng_id};
        if (j->req && !j->failed && !j->aborted && s->plugin && s->plugin->lease &&
            s->plugin->lease(s->plugin->state, c->eng_id, j->request_id, &kp) == DUET_OK) {
            kp.lease = c->eng_id;
            params = kv_params_json(&kp, m->lease_blocks, m->n_lease_blocks);
        }
        if (params) {
            cJSON_Delete(j->kv_params_out);
            j->kv_params_out = params;
        } else {
            eng_lease_release(s->eng, c->eng_id);
            if (j->req && !j->failed && !j->aborted) {
                j->failed = true;
                j->err_status = 500;
                snprintf(j->err_msg, sizeof j->err_msg,
                         "the KV transfer parameters for this request could not be produced");
            }
        }
    }
}

/* Prefill side, a streamed request with do_remote_decode: its lease exists as soon as the
 * engine admitted it, so the stream's first event says where to pull the KV (the same
 * kv_transfer_params as the answer's end), with no choices: a decode worker given them pins
 * the lease and reads the prompt's blocks as they are computed. Non-streamed answers carry
 * the params at their end only. */
static void lease_announce(oai_job *j, const oai_msg *m) {
    oai_frontend *s = j->fe;
    oai_choice *c = m->user;
    if (!j->req || j->failed || j->aborted || !j->stream_started || m->n_lease_blocks <= 0 ||
        !s->plugin || !s->plugin->lease)
        return;
    srv_kv_params kp = {.lease = c->eng_id};
    if (s->plugin->lease(s->plugin->state, c->eng_id, j->request_id, &kp) != DUET_OK)
        return; /* the finishing event tries again, and fails the request if it cannot */
    kp.lease = c->eng_id;
    cJSON *params = kv_params_json(&kp, m->lease_blocks, m->n_lease_blocks);
    if (!params) return;
    cJSON_Delete(j->kv_params_out);
    j->kv_params_out = params;
    strbuf *b = &s->sse;
    api_sse_begin(b);
    w_head(b, j, j->kind == OAI_JOB_CHAT ? "chat.completion.chunk" : "text_completion");
    strbuf_str(b, ",\"choices\":[]");
    w_key(b, "kv_transfer_params");
    w_tree(b, params);
    strbuf_add(b, "}", 1);
    if (api_sse_send(j->req, b) != DUET_OK) {
        /* gone or stuck: on_close follows and aborts the rest */
    }
}

static void job_event(oai_frontend *s, const oai_msg *m) {
    oai_choice *c = m->user;
    oai_job *j = c->job;
    (void)s;
    if (m->lease_open) {
        lease_announce(j, m);
        job_maybe_free(j);
        return;
    }
    if (m->has_token) {
        if (grow((void **)&c->ids, &c->cap_ids, c->n_ids + 1, sizeof *c->ids))
            c->ids[c->n_ids++] = m->token;
        if (m->has_lp && grow((void **)&c->lps, &c->cap_lps, c->n_lps + 1, sizeof *c->lps))
            c->lps[c->n_lps++] = m->lp;
        if (c->t_first == 0) {
            c->t_first = m->t;
            met_observe(j->fe->met, MET_HIST_TTFT, m->t - j->t_arrival);
        } else {
            met_observe(j->fe->met, MET_HIST_ITL, m->t - c->t_last);
        }
        c->t_last = m->t;
    }
    if (m->prompt_lp && !c->prompt_lp) {
        c->prompt_lp = malloc((size_t)m->n_prompt * sizeof *c->prompt_lp);
        if (c->prompt_lp)
            memcpy(c->prompt_lp, m->prompt_lp, (size_t)m->n_prompt * sizeof *c->prompt_lp);
    }
    c->n_prompt = m->n_prompt;
    c->n_output = m->n_output;
    c->n_cached = m->n_cached;
    bool final = m->finish != ENG_FINISH_NONE;
    if (final) choice_finish(j, c, (oai_msg *)m);
    if (j->req && !j->failed && !j->aborted) {
        if (j->stream_started) {
            /* aborted/failed choices end the stream with an error event instead */
            if (j->kind == OAI_JOB_CHAT)
                stream_chat(j, c, m);
            else
                stream_completion(j, c, m);
        } else {
            strbuf_add(&c->text, m->text ? m->text : "", m->text_len);
        }
    }
    if (j->n_live == 0 && j->req) job_complete(j);
    job_maybe_free(j);
}

void oai_abort_all(oai_frontend *s) {
    for (oai_job *j = s->jobs; j; j = j->next) job_abort_live(j);
}

/* ---------------------------------------------------------------------------------------------
 * Endpoints */

static oai_job *job_begin(oai_frontend *s, http_req *req, oai_job_kind kind) {
    oai_job *j = job_create(s, req, kind);
    if (!j) {
        LOG_ERROR("api: out of memory starting a request");
        met_count_http(s->met, 500);
        api_respond_error(req, 500, "out of memory", NULL, NULL);
    }
    return j;
}

/* The end both generation handlers share: n choices, the disaggregation role from
 * kv_transfer_params, then the engine requests. Returns nonzero with e set on failure. */
static int job_launch(oai_frontend *s, oai_job *j, const cJSON *body, eng_sampling *sp, int n,
                      api_err *e) {
    eng_kv_role role = ENG_KV_LOCAL;
    srv_kv_params *remote = NULL;
    if (job_setup_choices(j, n) != DUET_OK) {
        api_err_set(e, 500, NULL, "out of memory");
        return 1;
    }
    if (parse_kv_params(s, j, body, &role, &remote, e)) return 1;
    /* vLLM's --seed: a restarted server replays the same seeds for the same request order */
    if (s->cfg.seeded && !sp->has_seed) {
        sp->has_seed = true;
        sp->seed = rng_next(&s->seeds) >> 11;
    }
    if (s->cfg.log_requests) {
        int tokens = 0;
        for (int p = 0; p < j->n_prompts; p++) tokens += j->n_prompt_ids[p];
        char seed[24] = "none";
        if (sp->has_seed) snprintf(seed, sizeof seed, "%llu", (unsigned long long)sp->seed);
        LOG_INFO("request %s: %d prompt(s) of %d tokens, n %d, max_tokens %d, temperature %g, "
                 "top_p %g, top_k %d, seed %s, stream %s%s",
                 j->id, j->n_prompts, tokens, n, sp->max_tokens, (double)sp->smp.temperature,
                 (double)sp->smp.top_p, sp->smp.top_k, seed, j->stream ? "yes" : "no",
                 role == ENG_KV_LEASE    ? ", KV leased after"
                 : role == ENG_KV_REMOTE ? ", KV pulled from a prefill"
                                         : "");
        j->logged = true;
    }
    job_submit(j, sp, n, role, remote);
    return 0;
}

/* A generation request between its checks on the loop thread and its engine requests: the
 * prompt's tokenization (a chat's rendering first) runs on libuv's worker pool in between, so
 * a large prompt stalls no stream of this worker. While it runs the job is `preparing`: a
 * client that leaves meanwhile releases its request at once, and the job (with everything the
 * preparation made) is freed when the preparation is back. The worker thread touches only the
 * job's prompt fields, which the loop thread leaves alone until then. */
typedef struct oai_prep oai_prep;
struct oai_prep {
    uv_work_t work; /* first: a uv_work_t * converts back */
    oai_job *j;
    cJSON *body;                  /* the request's, owned */
    void (*prepare)(oai_prep *p); /* worker pool: sets failed and e */
    void (*finish)(oai_prep *p);  /* loop thread, when prepare succeeded and the client is there */
    api_err e;
    bool failed;
    eng_sampling sp;
    long long n, max_tokens, logprobs;
    bool add_special, chat_logprobs;
    chat_req cr;
    bool token_strs; /* /tokenize: return_token_strs */
    cJSON *out;      /* /tokenize: the answer, made on the pool */
};

static void prep_free(oai_prep *p) {
    cJSON_Delete(p->body);
    cJSON_Delete(p->out);
    free(p);
}

static void prep_done(oai_prep *p) {
    oai_job *j = p->j;
    j->preparing = false;
    if (!j->req || p->failed)
        job_fail(j, &p->e); /* or, the client gone, frees the job */
    else
        p->finish(p);
    prep_free(p);
}

static void on_prep_work(uv_work_t *w) {
    oai_prep *p = (oai_prep *)w;
    p->prepare(p);
}

static void on_prep_done(uv_work_t *w, int status) {
    oai_prep *p = (oai_prep *)w;
    if (status) { /* cancelled: never prepared */
        p->failed = true;
        api_err_set(&p->e, 503, NULL, "The server is shutting down");
    }
    prep_done(p);
}

static void prep_run(oai_prep *p) {
    oai_frontend *s = p->j->fe;
    if (s->loop) {
        p->j->preparing = true;
        if (uv_queue_work(s->loop, &p->work, on_prep_work, on_prep_done) == 0) return;
        p->j->preparing = false; /* not queued: prepared here instead */
    }
    p->prepare(p);
    prep_done(p);
}

/* A job and its preparation record, or NULL (answered 500, body freed). */
static oai_prep *prep_begin(oai_frontend *s, http_req *req, oai_job_kind kind, cJSON *body) {
    oai_job *j = job_begin(s, req, kind);
    oai_prep *p = j ? calloc(1, sizeof *p) : NULL;
    if (j && !p) {
        api_err e = {0};
        api_err_set(&e, 500, NULL, "out of memory");
        job_fail(j, &e);
    }
    if (!p) {
        cJSON_Delete(body);
        return NULL;
    }
    p->j = j;
    p->body = body;
    eng_sampling_default(&p->sp);
    return p;
}

/* A preparation that failed before it was queued: the job answers the error. */
static void prep_fail(oai_prep *p) {
    job_fail(p->j, &p->e);
    prep_free(p);
}

static void completion_prepare(oai_prep *p) {
    oai_job *j = p->j;
    oai_frontend *s = j->fe;
    if (parse_prompts(s, j, p->body, p->add_special, &p->e)) {
        p->failed = true;
        return;
    }
    if (j->echo) /* prompt text for ids given as ids */
        for (int i = 0; i < j->n_prompts; i++)
            if (!j->prompt_text[i])
                j->prompt_text[i] = decode_ids(s, j->prompts[i], j->n_prompt_ids[i], false);
}

static void completion_finish(oai_prep *p) {
    oai_job *j = p->j;
    oai_frontend *s = j->fe;
    api_err *e = &p->e;
    eng_sampling *sp = &p->sp;
    if (check_lengths(s, j, p->max_tokens, e)) goto fail;
    if ((long long)j->n_prompts * p->n > MAX_CHOICES) {
        api_err_set(e, 400, "n", "at most %d choices per request", MAX_CHOICES);
        goto fail;
    }
    if (sp->min_tokens > 0 && p->max_tokens > 0 && sp->min_tokens > p->max_tokens) {
        api_err_set(e, 400, "min_tokens", "min_tokens (%d) must be at most max_tokens (%lld)",
                    sp->min_tokens, p->max_tokens);
        goto fail;
    }
    sp->max_tokens = p->max_tokens > 0 ? (int)p->max_tokens : 0; /* 0: up to the context */
    sp->logprobs = (int)p->logprobs;
    j->want_logprobs = p->logprobs >= 0;
    j->logprobs = (int)p->logprobs;
    if (j->echo && p->logprobs >= 0) sp->prompt_logprobs = (int)p->logprobs;
    if (job_launch(s, j, p->body, sp, (int)p->n, e)) goto fail;
    return;
fail:
    job_fail(j, e);
}

void oai_handle_completions(oai_frontend *s, http_req *req, cJSON *body) {
    oai_prep *p = prep_begin(s, req, OAI_JOB_COMPLETION, body);
    if (!p) return;
    oai_job *j = p->j;
    api_err *e = &p->e;
    long long best_of = 0;
    p->n = 1;
    p->max_tokens = 16;
    p->logprobs = -1;
    p->add_special = true;
    if (check_model(s, body, e) || parse_stream(j, body, e) ||
        api_get_int(body, "n", 1, MAX_N, &p->n, e) ||
        api_get_int(body, "best_of", 1, MAX_N, &best_of, e) ||
        api_get_int(body, "logprobs", 0, s->cfg.max_logprobs, &p->logprobs, e) ||
        api_get_bool(body, "echo", &j->echo, e) ||
        api_get_bool(body, "return_token_ids", &j->return_token_ids, e) ||
        api_get_bool(body, "add_special_tokens", &p->add_special, e) ||
        parse_sampling(body, &p->sp, e))
        goto fail;
    if (best_of && best_of != p->n) {
        api_err_set(e, 400, "best_of", "best_of other than n is not supported");
        goto fail;
    }
    const cJSON *mt = cJSON_GetObjectItemCaseSensitive(body, "max_tokens");
    if (mt && cJSON_IsNull(mt))
        p->max_tokens = 0; /* null: up to the context length */
    else if (api_get_int(body, "max_tokens", 1, 1LL << 53, &p->max_tokens, e))
        goto fail;
    const char *user = NULL;
    if (api_get_string(body, "user", &user, e)) goto fail;
    p->prepare = completion_prepare;
    p->finish = completion_finish;
    prep_run(p);
    return;
fail:
    prep_fail(p);
}

static void chat_prepare(oai_prep *p) {
    oai_job *j = p->j;
    int32_t *ids = NULL;
    int n_ids = 0;
    if (render_chat(j->fe, p->body, false, &ids, &n_ids, &p->cr, &p->e)) {
        p->failed = true;
        return;
    }
    if (add_prompt(j, ids, n_ids, NULL)) {
        api_err_set(&p->e, 500, NULL, "out of memory");
        p->failed = true;
    }
}

static void chat_finish(oai_prep *p) {
    oai_job *j = p->j;
    oai_frontend *s = j->fe;
    api_err *e = &p->e;
    eng_sampling *sp = &p->sp;
    j->split_reasoning = s->cfg.reasoning == OAI_REASONING_R1 ||
                         (s->cfg.reasoning == OAI_REASONING_V3 && p->cr.thinking);
    j->parse_tools = p->cr.parse_tools;
    if (check_lengths(s, j, p->max_tokens, e)) goto fail;
    if (sp->min_tokens > 0 && p->max_tokens > 0 && sp->min_tokens > p->max_tokens) {
        api_err_set(e, 400, "min_tokens", "min_tokens (%d) must be at most max_tokens (%lld)",
                    sp->min_tokens, p->max_tokens);
        goto fail;
    }
    sp->max_tokens = (int)p->max_tokens; /* 0: up to the context length */
    sp->logprobs = p->chat_logprobs ? (int)p->logprobs : -1;
    j->want_logprobs = p->chat_logprobs;
    j->logprobs = (int)p->logprobs;
    if (job_launch(s, j, p->body, sp, (int)p->n, e)) goto fail;
    return;
fail:
    job_fail(j, e);
}

void oai_handle_chat(oai_frontend *s, http_req *req, cJSON *body) {
    oai_prep *p = prep_begin(s, req, OAI_JOB_CHAT, body);
    if (!p) return;
    oai_job *j = p->j;
    api_err *e = &p->e;
    p->n = 1;
    p->max_tokens = 0;
    p->logprobs = 0; /* top_logprobs */
    if (check_model(s, body, e) || parse_stream(j, body, e) ||
        api_get_int(body, "n", 1, MAX_N, &p->n, e) ||
        api_get_bool(body, "logprobs", &p->chat_logprobs, e) ||
        api_get_int(body, "top_logprobs", 0, s->cfg.max_logprobs, &p->logprobs, e) ||
        api_get_bool(body, "return_token_ids", &j->return_token_ids, e) ||
        api_get_int(body, "max_tokens", 1, 1LL << 53, &p->max_tokens, e) ||
        api_get_int(body, "max_completion_tokens", 1, 1LL << 53, &p->max_tokens, e) ||
        parse_sampling(body, &p->sp, e))
        goto fail;
    if (present(body, "top_logprobs") && p->logprobs > 0 && !p->chat_logprobs) {
        api_err_set(e, 400, "top_logprobs",
                    "when using `top_logprobs`, `logprobs` must be set "
                    "to true.");
        goto fail;
    }
    const char *user = NULL;
    if (api_get_string(body, "user", &user, e)) goto fail;
    p->prepare = chat_prepare;
    p->finish = chat_finish;
    prep_run(p);
    return;
fail:
    prep_fail(p);
}

/* /tokenize as a job too, so that its tokenization (or chat rendering) runs on the pool and a
 * client leaving meanwhile is handled the same way; the answer is built there as well. */
static void tokenize_prepare(oai_prep *p) {
    oai_frontend *s = p->j->fe;
    const cJSON *body = p->body;
    api_err *e = &p->e;
    int32_t *ids = NULL;
    int n = 0;
    p->failed = true;
    if (present(body, "messages")) {
        chat_req cr;
        if (render_chat(s, body, true, &ids, &n, &cr, e)) return;
    } else {
        const char *prompt = NULL;
        bool add_special = true;
        if (api_get_string(body, "prompt", &prompt, e) ||
            api_get_bool(body, "add_special_tokens", &add_special, e))
            return;
        if (!prompt) {
            api_err_set(e, 400, "prompt", "'prompt' (a string) or 'messages' is required");
            return;
        }
        if (encode_text(s, prompt, strlen(prompt), add_special, &ids, &n)) {
            api_err_set(e, 500, NULL, "tokenization failed");
            return;
        }
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "count", n);
    cJSON_AddNumberToObject(o, "max_model_len", s->max_model_len);
    cJSON_AddItemToObject(o, "tokens", ids_json(ids, n));
    if (p->token_strs) {
        cJSON *a = cJSON_AddArrayToObject(o, "token_strs");
        for (int i = 0; i < n; i++) {
            char *t = token_str(s, ids[i]);
            cJSON_AddItemToArray(a, cJSON_CreateString(t));
            free(t);
        }
    } else {
        cJSON_AddNullToObject(o, "token_strs");
    }
    free(ids);
    p->out = o;
    p->failed = !o;
    if (!o) api_err_set(e, 500, NULL, "out of memory");
}

static void tokenize_finish(oai_prep *p) {
    oai_job *j = p->j;
    http_req *req = j->req;
    j->req = NULL;
    met_count_http(j->fe->met, 200);
    api_respond_json(req, 200, p->out, NULL);
    job_maybe_free(j);
}

void oai_handle_tokenize(oai_frontend *s, http_req *req, cJSON *body) {
    oai_prep *p = prep_begin(s, req, OAI_JOB_COMPLETION, body);
    if (!p) return;
    if (check_model(s, body, &p->e) ||
        api_get_bool(body, "return_token_strs", &p->token_strs, &p->e)) {
        prep_fail(p);
        return;
    }
    p->prepare = tokenize_prepare;
    p->finish = tokenize_finish;
    prep_run(p);
}

void oai_handle_detokenize(oai_frontend *s, http_req *req, const cJSON *body) {
    api_err e = {0};
    int32_t *ids = NULL;
    int n = 0;
    if (check_model(s, body, &e)) goto fail;
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(body, "tokens");
    if (!cJSON_IsArray(t)) {
        api_err_set(&e, 400, "tokens", "'tokens' must be a list of token ids");
        goto fail;
    }
    if (token_array(t, &ids, &n, &e)) {
        api_err_set(&e, 400, "tokens", "'tokens' must be a list of token ids");
        goto fail;
    }
    for (int i = 0; i < n; i++)
        if (ids[i] >= tok_vocab_size(s->tok)) {
            api_err_set(&e, 400, "tokens", "token id %d is out of vocabulary", ids[i]);
            goto fail;
        }
    char *text = decode_ids(s, ids, n, false);
    if (!text) {
        api_err_set(&e, 400, "tokens", "these token ids cannot be decoded");
        goto fail;
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "prompt", text);
    free(text);
    free(ids);
    met_count_http(s->met, 200);
    api_respond_json(req, 200, o, NULL);
    cJSON_Delete(o);
    return;
fail:
    free(ids);
    met_count_http(s->met, e.status);
    api_respond_err(req, &e, NULL);
}

/* ---------------------------------------------------------------------------------------------
 * Engine events */

static char *dup_n(const char *s, size_t n) {
    char *d = malloc(n + 1);
    if (d) {
        if (n) memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

/* What a message holds beyond itself: freed, so it can be reused for the next event. */
static void msg_clear(oai_msg *m) {
    free(m->prompt_lp);
    if (m->text != m->text_in) free(m->text);
    free(m->stop_reason);
    free(m->error);
    free(m->lease_blocks);
}

/* Messages delivered are kept for the next events, up to this many (the most a step of
 * --max-num-seqs requests makes at once, roughly): once warm, a token's event allocates
 * nothing when its text fits text_in. */
enum { MSG_SPARE_MAX = 1024 };

/* Engine thread (or the main thread inside eng_destroy): copy and hand to the loop. */
void oai_on_engine_event(void *user, const eng_event *ev) {
    oai_frontend *s = user;
    pthread_mutex_lock(&s->mu);
    oai_msg *m = s->spare;
    if (m) {
        s->spare = m->next;
        s->n_spare--;
    }
    pthread_mutex_unlock(&s->mu);
    if (m)
        memset(m, 0, sizeof *m);
    else
        m = calloc(1, sizeof *m);
    bool oom = !m;
    if (m) {
        m->user = ev->user;
        m->t = clock_now_s();
        if (ev->n_tokens > 0) {
            m->has_token = true;
            m->token = ev->tokens[0];
            if (ev->logprobs) {
                m->has_lp = true;
                m->lp = ev->logprobs[0];
            }
        }
        if (ev->prompt_logprobs && ev->n_prompt > 0) {
            m->prompt_lp = malloc((size_t)ev->n_prompt * sizeof *m->prompt_lp);
            if (m->prompt_lp)
                memcpy(m->prompt_lp, ev->prompt_logprobs,
                       (size_t)ev->n_prompt * sizeof *m->prompt_lp);
        }
        if (ev->text_len < sizeof m->text_in) {
            if (ev->text_len) memcpy(m->text_in, ev->text, ev->text_len);
            m->text_in[ev->text_len] = '\0';
            m->text = m->text_in;
            m->text_len = ev->text_len;
        } else {
            m->text = dup_n(ev->text, ev->text_len);
            m->text_len = m->text ? ev->text_len : 0;
        }
        m->finish = ev->finish;
        if (ev->stop_reason) m->stop_reason = strdup(ev->stop_reason);
        m->stop_token = ev->stop_token;
        if (ev->error) m->error = strdup(ev->error);
        m->n_prompt = ev->n_prompt;
        m->n_output = ev->n_output;
        m->n_cached = ev->n_cached;
        m->lease_open = ev->lease_open;
        if (ev->n_lease_blocks > 0) {
            m->lease_blocks = malloc((size_t)ev->n_lease_blocks * sizeof *m->lease_blocks);
            if (m->lease_blocks) {
                memcpy(m->lease_blocks, ev->lease_blocks,
                       (size_t)ev->n_lease_blocks * sizeof *m->lease_blocks);
                m->n_lease_blocks = ev->n_lease_blocks;
            }
        }
    }
    if (oom) {
        /* A lost final event would leave its response hanging for good; nothing better can be
         * done without memory than to say so once. */
        LOG_ERROR("server: out of memory passing an engine event to the HTTP loop");
        return;
    }
    pthread_mutex_lock(&s->mu);
    if (s->q_tail)
        s->q_tail->next = m;
    else
        s->q_head = m;
    s->q_tail = m;
    pthread_mutex_unlock(&s->mu);
    if (s->cfg.wake) s->cfg.wake(s->cfg.wake_arg);
}

void oai_process_events(oai_frontend *s) {
    pthread_mutex_lock(&s->mu);
    oai_msg *m = s->q_head;
    s->q_head = s->q_tail = NULL;
    pthread_mutex_unlock(&s->mu);
    oai_msg *done = NULL, *done_tail = NULL;
    int n_done = 0;
    while (m) {
        oai_msg *next = m->next;
        job_event(s, m);
        msg_clear(m);
        m->next = done;
        done = m;
        if (!done_tail) done_tail = m;
        n_done++;
        m = next;
    }
    if (!done) return;
    pthread_mutex_lock(&s->mu);
    while (done && s->n_spare + n_done > MSG_SPARE_MAX) { /* beyond the bound: freed */
        oai_msg *x = done;
        done = x->next;
        n_done--;
        free(x);
    }
    if (done) {
        done_tail->next = s->spare;
        s->spare = done;
        s->n_spare += n_done;
    }
    pthread_mutex_unlock(&s->mu);
}

/* ---------------------------------------------------------------------------------------------
 * The frontend */

duet_status oai_create(const oai_config *cfg, tok_tokenizer *tok, const chat_template *tpl,
                       met_registry *met, oai_frontend **fe_p) {
    oai_frontend *fe = calloc(1, sizeof *fe);
    if (!fe) return DUET_ERR_NO_MEMORY;
    fe->cfg = *cfg;
    fe->tok = tok;
    fe->tpl = tpl;
    fe->met = met;
    fe->plugin = cfg->plugin;
    fe->vocab = cfg->vocab;
    fe->max_model_len = cfg->max_model_len;
    fe->max_live = cfg->max_live;
    rng_seed(&fe->seeds, cfg->seed);
    pthread_mutex_init(&fe->mu, NULL);
    *fe_p = fe;
    return DUET_OK;
}

void oai_destroy(oai_frontend *fe) {
    if (!fe) return;
    oai_process_events(fe);
    while (fe->jobs) {
        /* not reached: every job ended with its requests' final events */
        oai_job *j = fe->jobs;
        fe->jobs = j->next;
        free(j);
    }
    pthread_mutex_destroy(&fe->mu);
    while (fe->spare) {
        oai_msg *m = fe->spare;
        fe->spare = m->next;
        free(m);
    }
    strbuf_free(&fe->sse);
    strbuf_free(&fe->sse_reason);
    strbuf_free(&fe->sse_text);
    strbuf_free(&fe->sse_content);
    free(fe);
}

void oai_set_engine(oai_frontend *fe, eng_engine *eng) {
    fe->eng = eng;
}

void oai_set_loop(oai_frontend *fe, uv_loop_t *loop) {
    fe->loop = loop;
}

void oai_set_draining(oai_frontend *fe) {
    fe->draining = true;
}

int oai_jobs_count(const oai_frontend *fe) {
    int n = 0;
    for (const oai_job *j = fe->jobs; j; j = j->next) n++;
    return n;
}
