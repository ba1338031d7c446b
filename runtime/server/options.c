/* The worker's option table (see options.h): duet's flags, vLLM's flags with their meaning for
 * duet, and the JSON-valued ones (--kv-transfer-config, --speculative-config,
 * --compilation-config, the CORS lists) checked here so a bad value is one line naming the
 * flag, before MPI or the weights are touched. */
#include "server/options.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "openai/api.h"

static duet_status bad(char *err, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static duet_status bad(char *err, size_t len, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, len, fmt, ap);
    va_end(ap);
    return DUET_ERR_INVALID;
}

/* ---------------------------------------------------------------------------------------------
 * Value parsers */

static duet_status parse_reasoning(const opt_spec *spec, const char *v, char *err, size_t len) {
    oai_reasoning *r = spec->dest;
    if (!strcmp(v, "deepseek_r1"))
        *r = OAI_REASONING_R1;
    else if (!strcmp(v, "deepseek_v3"))
        *r = OAI_REASONING_V3;
    else
        return bad(err, len, "expected deepseek_r1 or deepseek_v3 (duet's parsers), got '%s'", v);
    return DUET_OK;
}

static duet_status parse_tool_parser(const opt_spec *spec, const char *v, char *err, size_t len) {
    api_tool_format f;
    if (api_tool_format_parse(v, &f) != DUET_OK)
        return bad(err, len, "expected deepseek_v3 (V3, R1) or deepseek_v31 (V3.1), got '%s'", v);
    *(int *)spec->dest = (int)f;
    return DUET_OK;
}

static duet_status parse_nonempty(const opt_spec *spec, const char *v, char *err, size_t len) {
    if (!*v) return bad(err, len, "expected a non-empty name");
    *(const char **)spec->dest = v;
    return DUET_OK;
}

static duet_status parse_fraction(const opt_spec *spec, const char *v, char *err, size_t len) {
    char *end;
    errno = 0;
    double x = strtod(v, &end);
    if (!*v || *end || errno || !(x > 0.0 && x <= 1.0))
        return bad(err, len, "expected a fraction in (0, 1], got '%s'", v);
    *(double *)spec->dest = x;
    return DUET_OK;
}

static cJSON *parse_json_object(const char *v, char *err, size_t len) {
    cJSON *o = cJSON_Parse(v);
    if (!cJSON_IsObject(o)) {
        bad(err, len, "expected a JSON object ('{\"key\": value, ...}'), got '%.80s'", v);
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

/* A JSON integer, or a string holding one (vLLM configs write ports both ways). */
static bool json_int(const cJSON *x, long long lo, long long hi, long long *out) {
    long long n;
    if (cJSON_IsNumber(x)) {
        if (x->valuedouble != (double)(long long)x->valuedouble) return false;
        n = (long long)x->valuedouble;
    } else if (cJSON_IsString(x)) {
        char *end;
        errno = 0;
        n = strtoll(x->valuestring, &end, 10);
        if (!x->valuestring[0] || *end || errno) return false;
    } else {
        return false;
    }
    if (n < lo || n > hi) return false;
    *out = n;
    return true;
}

/* JSON list of strings ('["*"]', '["https://a.example"]') or one bare string. */
static duet_status parse_strings(const opt_spec *spec, const char *v, char *err, size_t len) {
    srv_strings *s = spec->dest;
    for (int i = 0; i < s->n; i++) free(s->v[i]);
    s->n = 0;
    cJSON *a = v[0] == '[' ? cJSON_Parse(v) : NULL;
    if (v[0] == '[' && !cJSON_IsArray(a)) {
        cJSON_Delete(a);
        return bad(err, len, "expected a JSON list of strings, got '%.80s'", v);
    }
    if (!a) {
        if (!*v) return bad(err, len, "expected a value");
        if (!(s->v[0] = strdup(v))) return bad(err, len, "out of memory");
        s->n = 1;
        return DUET_OK;
    }
    const cJSON *x;
    duet_status st = DUET_OK;
    cJSON_ArrayForEach(x, a) {
        if (!cJSON_IsString(x) || !x->valuestring[0] || !http_value_valid(x->valuestring)) {
            st = bad(err, len, "every entry must be a non-empty string without control characters");
            break;
        }
        if (s->n == SRV_LIST_MAX) {
            st = bad(err, len, "at most %d entries", SRV_LIST_MAX);
            break;
        }
        if (!(s->v[s->n] = strdup(x->valuestring))) {
            st = bad(err, len, "out of memory");
            break;
        }
        s->n++;
    }
    cJSON_Delete(a);
    return st;
}

duet_status srv_config_parse_spec(const char *json, char *method, size_t method_len, int *tokens_p,
                                  char *err, size_t len) {
    cJSON *o = parse_json_object(json, err, len);
    if (!o) return DUET_ERR_INVALID;
    duet_status st = DUET_OK;
    const cJSON *x;
    char m[32] = "";
    int k = 0;
    cJSON_ArrayForEach(x, o) {
        long long n;
        if (!strcmp(x->string, "method")) {
            if (!cJSON_IsString(x) || (strcmp(x->valuestring, "mtp") != 0 &&
                                       strcmp(x->valuestring, "deepseek_mtp") != 0)) {
                st = bad(err, len,
                         "method: duet's speculative decoding for DeepSeek is MTP (\"mtp\" or "
                         "\"deepseek_mtp\"), got %s",
                         cJSON_IsString(x) ? x->valuestring : "a non-string");
                break;
            }
            snprintf(m, sizeof m, "%s", x->valuestring);
        } else if (!strcmp(x->string, "num_speculative_tokens")) {
            if (!json_int(x, 0, MDL_MAX_DRAFT, &n)) {
                st = bad(err, len,
                         "num_speculative_tokens must be an integer in 0..%d (0: off; MTP "
                         "drafts 1..%d tokens a step)",
                         MDL_MAX_DRAFT, MDL_MAX_DRAFT);
                break;
            }
            k = (int)n;
        } else {
            st = bad(err, len, "unknown key '%s' (duet reads method and num_speculative_tokens)",
                     x->string);
            break;
        }
    }
    if (st == DUET_OK && k > 0 && !m[0]) st = bad(err, len, "method is required (\"mtp\")");
    cJSON_Delete(o);
    if (st != DUET_OK) return st;
    if (method && method_len) snprintf(method, method_len, "%s", m);
    *tokens_p = k;
    return DUET_OK;
}

/* --speculative-config '{"method": "mtp", "num_speculative_tokens": 1}' */
static duet_status parse_spec_config(const opt_spec *spec, const char *v, char *err, size_t len) {
    srv_config *c = spec->user;
    return srv_config_parse_spec(v, c->spec_method, sizeof c->spec_method, &c->spec_tokens, err,
                                 len);
}

/* --compilation-config '{"cudagraph_capture_sizes": [...], "cudagraph_mode": "..."}', or vLLM's
 * -O shorthand: a bare optimization level. */
static duet_status parse_compilation(const opt_spec *spec, const char *v, char *err, size_t len) {
    srv_config *c = spec->user;
    if (v[0] >= '0' && v[0] <= '9' && !v[1]) {
        LOG_INFO("--compilation-config %s: torch.compile's optimization level has no meaning "
                 "for duet (no Python); ignored",
                 v);
        return DUET_OK;
    }
    cJSON *o = parse_json_object(v, err, len);
    if (!o) return DUET_ERR_INVALID;
    static const char *const modes[] = {"NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY",
                                        "FULL_AND_PIECEWISE"};
    duet_status st = DUET_OK;
    const cJSON *x;
    c->n_capture_sizes = 0;
    cJSON_ArrayForEach(x, o) {
        if (!strcmp(x->string, "cudagraph_capture_sizes")) {
            const cJSON *e, *list = cJSON_IsArray(x) ? x : NULL;
            if (!list) st = bad(err, len, "cudagraph_capture_sizes must be a list");
            cJSON_ArrayForEach(e, list) {
                long long n;
                if (!json_int(e, 1, 1 << 16, &n)) {
                    st = bad(err, len,
                             "cudagraph_capture_sizes: entries must be integers in "
                             "1..65536");
                    break;
                }
                if (c->n_capture_sizes == SRV_CAPTURE_MAX) {
                    st =
                        bad(err, len, "cudagraph_capture_sizes: at most %d sizes", SRV_CAPTURE_MAX);
                    break;
                }
                c->capture_sizes[c->n_capture_sizes++] = (int)n;
            }
        } else if (!strcmp(x->string, "cudagraph_mode")) {
            size_t k = 0;
            while (k < sizeof modes / sizeof *modes &&
                   !(cJSON_IsString(x) && !strcmp(x->valuestring, modes[k])))
                k++;
            if (k == sizeof modes / sizeof *modes) {
                st = bad(err, len,
                         "cudagraph_mode must be NONE, PIECEWISE, FULL, FULL_DECODE_ONLY or "
                         "FULL_AND_PIECEWISE");
            } else if (k == 0) {
                c->po.eager = true;
                LOG_INFO("--compilation-config: cudagraph_mode NONE: no recorded steps, as "
                         "--enforce-eager");
            } else {
                LOG_INFO("--compilation-config: cudagraph_mode %s: duet records whole decode "
                         "steps (FULL_DECODE_ONLY's meaning) unless --enforce-eager",
                         modes[k]);
            }
        } else {
            LOG_INFO("--compilation-config: '%s' is a torch.compile setting with no meaning "
                     "for duet; ignored",
                     x->string);
        }
        if (st != DUET_OK) break;
    }
    if (st == DUET_OK && c->n_capture_sizes)
        LOG_INFO("--compilation-config: %d cudagraph_capture_sizes noted; the CUDA backend "
                 "records its own fixed batch sizes (see docs/cuda.md)",
                 c->n_capture_sizes);
    cJSON_Delete(o);
    return st;
}

/* vllm-ascend's --additional-config: Ascend scheduler and operator switches. */
static duet_status parse_additional(const opt_spec *spec, const char *v, char *err, size_t len) {
    (void)spec;
    cJSON *o = parse_json_object(v, err, len);
    if (!o) return DUET_ERR_INVALID;
    char keys[256] = "";
    size_t k = 0;
    const cJSON *x;
    cJSON_ArrayForEach(x, o) {
        int w = snprintf(keys + k, sizeof keys - k, "%s%s", k ? ", " : "", x->string);
        if (w > 0) k = k + (size_t)w < sizeof keys ? k + (size_t)w : sizeof keys - 1;
    }
    LOG_INFO("--additional-config: vllm-ascend's own switches (%s) have no meaning for duet; "
             "ignored",
             k ? keys : "none");
    cJSON_Delete(o);
    return DUET_OK;
}

/* --kv-transfer-config: the connector's settings, checked here for shape and later
 * (srv_config_parse) against the program's role. */
static duet_status parse_kv_transfer(const opt_spec *spec, const char *v, char *err, size_t len) {
    srv_config *c = spec->user;
    cJSON *o = parse_json_object(v, err, len);
    if (!o) return DUET_ERR_INVALID;
    static const char *const ignored[] = {"engine_id",
                                          "kv_rank",
                                          "kv_parallel_size",
                                          "kv_buffer_device",
                                          "kv_buffer_size",
                                          "kv_connector_module_path",
                                          "kv_load_failure_policy",
                                          "enable_permute_local_kv"};
    duet_status st = DUET_OK;
    const cJSON *x;
    c->kvt_given = true;
    c->kvt_role[0] = c->kvt_connector[0] = c->kvt_ip[0] = '\0';
    c->kvt_port = 0;
    cJSON_ArrayForEach(x, o) {
        long long n;
        const char *k = x->string;
        if (!strcmp(k, "kv_role")) {
            if (!cJSON_IsString(x) || (strcmp(x->valuestring, "kv_producer") != 0 &&
                                       strcmp(x->valuestring, "kv_consumer") != 0 &&
                                       strcmp(x->valuestring, "kv_both") != 0))
                st = bad(err, len, "kv_role must be kv_producer, kv_consumer or kv_both");
            else
                snprintf(c->kvt_role, sizeof c->kvt_role, "%s", x->valuestring);
        } else if (!strcmp(k, "kv_connector")) {
            if (!cJSON_IsString(x) || !x->valuestring[0])
                st = bad(err, len, "kv_connector must be a connector name");
            else
                snprintf(c->kvt_connector, sizeof c->kvt_connector, "%s", x->valuestring);
        } else if (!strcmp(k, "kv_port")) {
            if (!json_int(x, 1, 65535, &n))
                st = bad(err, len, "kv_port must be a port number");
            else
                c->kvt_port = (int)n;
        } else if (!strcmp(k, "kv_ip")) {
            if (!cJSON_IsString(x) || !x->valuestring[0] ||
                strlen(x->valuestring) >= sizeof c->kvt_ip)
                st = bad(err, len, "kv_ip must be a host name or address");
            else
                snprintf(c->kvt_ip, sizeof c->kvt_ip, "%s", x->valuestring);
        } else if (!strcmp(k, "kv_connector_extra_config")) {
            if (!cJSON_IsObject(x))
                st = bad(err, len, "kv_connector_extra_config must be an object");
        } else {
            size_t i = 0;
            while (i < sizeof ignored / sizeof *ignored && strcmp(k, ignored[i]) != 0) i++;
            if (i == sizeof ignored / sizeof *ignored)
                st = bad(err, len,
                         "unknown key '%s' (vLLM's KVTransferConfig keys: kv_connector, kv_role, "
                         "kv_port, kv_ip, engine_id, kv_connector_extra_config, ...)",
                         k);
        }
        if (st != DUET_OK) break;
    }
    if (st == DUET_OK && !c->kvt_role[0])
        st = bad(err, len,
                 "kv_role is required (kv_producer on duet-prefill, kv_consumer on "
                 "duet-decode)");
    cJSON_Delete(o);
    return st;
}

/* ---------------------------------------------------------------------------------------------
 * The table */

static duet_status server_options_add(opt_parser *p, srv_config *c) {
    const opt_spec specs[] = {
        {.name = "--model",
         .type = OPT_STRING,
         .dest = &c->model,
         .metavar = "DIR",
         .help = "checkpoint: config.json + safetensors (or the positional MODEL)"},
        {.name = "--tokenizer",
         .type = OPT_STRING,
         .dest = &c->tokenizer,
         .metavar = "DIR",
         .help = "tokenizer.json + tokenizer_config.json (default: --model)"},
        {.name = "--served-model-name",
         .type = OPT_CUSTOM,
         .parse = parse_nonempty,
         .dest = &c->served_name,
         .metavar = "NAME",
         .help = "the model name clients use (default: --model)"},
        {.name = "--host",
         .type = OPT_STRING,
         .dest = &c->host,
         .metavar = "ADDR",
         .help = "listen address (default: all IPv4)"},
        {.name = "--port",
         .type = OPT_INT,
         .dest = &c->port,
         .def = "8000",
         .min = 0,
         .max = 65535,
         .help = "HTTP port; DP rank r listens on N + r"},
        {.name = "--api-key",
         .type = OPT_STRING,
         .dest = &c->api_key,
         .metavar = "KEY",
         .env = "DUET_API_KEY|VLLM_API_KEY",
         .help = "bearer key for /v1/*"},
        {.name = "--max-model-len",
         .type = OPT_INT,
         .dest = &c->max_model_len,
         .min = 2,
         .max = 1 << 24,
         .help = "context length (default min(config, 8192))"},
        {.name = "--max-num-seqs",
         .type = OPT_INT,
         .dest = &c->max_num_seqs,
         .def = "256",
         .min = 1,
         .max = 1 << 16,
         .help = "sequences per step"},
        {.name = "--max-num-batched-tokens",
         .type = OPT_INT,
         .dest = &c->max_num_batched_tokens,
         .def = "2048",
         .min = 1,
         .max = 1 << 24,
         .help = "tokens per step"},
        {.name = "--max-waiting-requests",
         .type = OPT_INT,
         .dest = &c->max_waiting,
         .def = "1024",
         .min = 0,
         .max = 1 << 24,
         .help = "queued beyond --max-num-seqs before new requests get 503"},
        {.name = "--block-size",
         .type = OPT_INT,
         .dest = &c->block_size,
         .def = "64",
         .min = 1,
         .max = 1 << 16,
         .help = "tokens per KV block"},
        {.name = "--kv-cache-memory",
         .type = OPT_SIZE,
         .dest = &c->kv_cache_memory,
         .help = "KV cache budget, K/M/G suffixes (default 1G)"},
        {.name = "--num-gpu-blocks-override",
         .type = OPT_INT,
         .dest = &c->num_gpu_blocks_override,
         .min = 1,
         .max = INT_MAX / 2,
         .help = "KV cache size in blocks (overrides the budget)"},
        {.name = "--gpu-memory-utilization",
         .type = OPT_CUSTOM,
         .parse = parse_fraction,
         .dest = &c->gpu_memory_utilization,
         .metavar = "F",
         .def = "0.9",
         .help = "fraction of each device's memory for weights, activations and KV cache: the "
                 "KV cache gets what loading leaves of it (devices that report their memory; "
                 "--kv-cache-memory and --num-gpu-blocks-override win when given)"},
        {.name = "--print-memory-plan",
         .type = OPT_FLAG,
         .dest = &c->print_memory_plan,
         .help = "print the memory plan (weights by kind, activations, graphs, KV cache per "
                 "rank) at start-up"},
        {.name = "--enable-prefix-caching",
         .type = OPT_FLAG,
         .dest = &c->prefix_caching,
         .def = "true",
         .flags = OPT_NEGATABLE,
         .help = "reuse KV blocks of shared prefixes"},
        {.name = "--kv-lease-timeout",
         .type = OPT_DOUBLE,
         .dest = &c->lease_timeout_s,
         .def = "30",
         .min = 1e-3,
         .max = 1e7,
         .metavar = "S",
         .help = "prefill: KV leases unread after S seconds are freed"},
        {.name = "--kv-transfer-config",
         .type = OPT_CUSTOM,
         .parse = parse_kv_transfer,
         .dest = c,
         .user = c,
         .metavar = "JSON",
         .help = "vLLM's connector settings: kv_role must be this program's (kv_producer: "
                 "duet-prefill, kv_consumer: duet-decode); kv_port and kv_ip become --kv-port "
                 "and --kv-host; the connector is duet's UCX transfer whatever it names"},
        {.name = "--shutdown-timeout",
         .type = OPT_DOUBLE,
         .dest = &c->shutdown_timeout_s,
         .def = "30",
         .min = 0,
         .max = 1e7,
         .metavar = "S",
         .help = "SIGTERM: in-flight requests get S seconds before abort"},
        {.name = "--max-request-body",
         .type = OPT_SIZE,
         .dest = &c->max_request_body,
         .def = "32M",
         .help = "larger bodies are answered 413"},
        {.name = "--max-connections-per-client",
         .type = OPT_INT,
         .dest = &c->max_connections_per_client,
         .def = "0",
         .min = 0,
         .max = 1 << 20,
         .metavar = "N",
         .help = "connections open at once from one client address; the one beyond is "
                 "answered 429 and closed (0: no limit)"},
    };
    const opt_spec chat[] = {
        {.name = "--chat-template",
         .type = OPT_STRING,
         .dest = &c->chat_template,
         .metavar = "FILE|TEMPLATE",
         .help = "Jinja chat template (a file, or the template itself) instead of the "
                 "tokenizer's"},
        {.name = "--trust-request-chat-template",
         .type = OPT_FLAG,
         .dest = &c->trust_request_chat_template,
         .help = "render a chat request's own chat_template (refused with 400 otherwise; "
                 "/tokenize always renders one)"},
        {.name = "--reasoning-parser",
         .type = OPT_CUSTOM,
         .parse = parse_reasoning,
         .dest = &c->reasoning,
         .metavar = "{deepseek_r1,deepseek_v3}",
         .help = "split <think> reasoning into reasoning_content (deepseek_v3: only when "
                 "chat_template_kwargs.thinking is true, as for V3.1)"},
        {.name = "--tool-call-parser",
         .type = OPT_CUSTOM,
         .parse = parse_tool_parser,
         .dest = &c->tool_parser,
         .metavar = "{deepseek_v3,deepseek_v31}",
         .help = "read the model's tool-call markup into tool_calls"},
        {.name = "--enable-auto-tool-choice",
         .type = OPT_FLAG,
         .dest = &c->auto_tool_choice,
         .help = "allow tool_choice \"auto\" (needs --tool-call-parser)"},
        {.name = "--max-logprobs",
         .type = OPT_INT,
         .dest = &c->max_logprobs,
         .def = "20",
         .min = 0,
         .max = 20,
         .help = "the most logprobs (and top_logprobs) a request may ask; at most 20"},
        {.name = "--enable-log-requests",
         .type = OPT_FLAG,
         .dest = &c->log_requests,
         .help = "log one line per request received and finished"},
        {.name = "--disable-log-requests",
         .type = OPT_FLAG,
         .flags = OPT_HIDDEN,
         .help = "vLLM's older spelling: requests are not logged (the default)"},
        {.name = "--disable-log-stats", .type = OPT_FLAG, .help = "no periodic stats line"},
        {.name = "--log-stats-interval",
         .type = OPT_DOUBLE,
         .dest = &c->log_stats_interval_s,
         .def = "10",
         .min = 0.05,
         .max = 1e6,
         .env = "VLLM_LOG_STATS_INTERVAL",
         .metavar = "S",
         .help = "seconds between stats lines while busy (vLLM's VLLM_LOG_STATS_INTERVAL)"},
    };
    const opt_spec http[] = {
        {.name = "--allowed-origins",
         .type = OPT_CUSTOM,
         .parse = parse_strings,
         .dest = &c->cors_origins,
         .def = "[\"*\"]",
         .metavar = "JSON",
         .help = "CORS: origins browsers may call from"},
        {.name = "--allowed-methods",
         .type = OPT_CUSTOM,
         .parse = parse_strings,
         .dest = &c->cors_methods,
         .def = "[\"*\"]",
         .metavar = "JSON",
         .help = "CORS: methods"},
        {.name = "--allowed-headers",
         .type = OPT_CUSTOM,
         .parse = parse_strings,
         .dest = &c->cors_headers,
         .def = "[\"*\"]",
         .metavar = "JSON",
         .help = "CORS: request headers"},
        {.name = "--allow-credentials",
         .type = OPT_FLAG,
         .dest = &c->cors_credentials,
         .help = "CORS: allow credentials"},
        {.name = "--ssl-keyfile",
         .type = OPT_STRING,
         .dest = &c->ssl_keyfile,
         .metavar = "FILE",
         .help = "HTTPS: the private key (PEM)"},
        {.name = "--ssl-certfile",
         .type = OPT_STRING,
         .dest = &c->ssl_certfile,
         .metavar = "FILE",
         .help = "HTTPS: the certificate chain (PEM)"},
        {.name = "--ssl-ca-certs",
         .type = OPT_STRING,
         .dest = &c->ssl_ca_certs,
         .metavar = "FILE",
         .help = "HTTPS: CAs that sign client certificates"},
        {.name = "--ssl-cert-reqs",
         .type = OPT_INT,
         .dest = &c->ssl_cert_reqs,
         .def = "0",
         .min = 0,
         .max = 2,
         .help = "HTTPS: client certificates 0 not asked, 1 checked when sent, 2 required"},
    };
    const opt_spec vllm[] = {
        {.name = "--speculative-config",
         .type = OPT_CUSTOM,
         .parse = parse_spec_config,
         .dest = c,
         .user = c,
         .metavar = "JSON",
         .help = "{\"method\": \"deepseek_mtp\" (or \"mtp\"), \"num_speculative_tokens\": N}: "
                 "MTP speculative decoding with N = 1..3 drafts a step (0: off); the "
                 "checkpoint must have an MTP layer"},
        {.name = "--compilation-config",
         .alias = "-O",
         .type = OPT_CUSTOM,
         .parse = parse_compilation,
         .dest = c,
         .user = c,
         .metavar = "JSON",
         .help = "cudagraph_mode NONE is --enforce-eager; cudagraph_capture_sizes is noted "
                 "(the CUDA backend records fixed sizes); torch.compile keys have no meaning"},
        {.name = "--additional-config",
         .type = OPT_CUSTOM,
         .parse = parse_additional,
         .dest = c,
         .metavar = "JSON",
         .help = "vllm-ascend's switches: checked to be JSON, then ignored with a log line"},
        {.name = "--quantization",
         .alias = "-q",
         .type = OPT_STRING,
         .dest = NULL,
         .metavar = "NAME",
         .flags = OPT_IGNORED,
         .help = "duet reads the checkpoint's own quantization_config (bf16, or FP8 with "
                 "128x128 block scales) and never quantizes at load time"},
        {.name = "--pipeline-parallel-size",
         .alias = "-pp",
         .type = OPT_INT,
         .dest = &c->pp,
         .def = "1",
         .min = 1,
         .max = 64,
         .help = "duet has no pipeline stages: P > 1 makes the instance tensor parallel over P x "
                 "--tensor-parallel-size ranks instead (the same devices, every layer split)"},
        {.name = "--data-parallel-rank",
         .alias = "-dpn",
         .type = OPT_INT,
         .dest = &c->dp_rank,
         .def = "-1",
         .min = -1,
         .max = 4095,
         .help = "this process is DP rank R (one command line per DP rank: start them as one "
                 "mpirun job, 'mpirun -np T prog ... : -np T prog ...'); it listens on --port "
                 "itself"},
        {.name = "--data-parallel-start-rank",
         .alias = "-dpr",
         .type = OPT_INT,
         .dest = &c->dp_start_rank,
         .def = "-1",
         .min = -1,
         .max = 4095,
         .help = "this command line's first DP rank (with --data-parallel-size-local); its DP "
                 "ranks listen on --port + (rank - start)"},
        {.name = "--data-parallel-size-local",
         .alias = "-dpl",
         .type = OPT_INT,
         .dest = &c->dp_size_local,
         .min = 1,
         .max = 4096,
         .help = "DP ranks of this command line (checked against the MPI job)"},
        {.name = "--data-parallel-address",
         .alias = "-dpa",
         .type = OPT_STRING,
         .flags = OPT_IGNORED,
         .metavar = "ADDR",
         .help = "mpirun connects the ranks of an instance; no address is needed"},
        {.name = "--data-parallel-rpc-port",
         .alias = "-dpp",
         .type = OPT_INT,
         .flags = OPT_IGNORED,
         .help = "mpirun connects the ranks of an instance; no RPC port is needed"},
        {.name = "--data-parallel-backend",
         .alias = "-dpb",
         .type = OPT_STRING,
         .flags = OPT_IGNORED,
         .metavar = "{mp,ray}",
         .help = "an instance is one mpirun job"},
        {.name = "--headless",
         .type = OPT_FLAG,
         .flags = OPT_IGNORED,
         .help = "every duet DP rank serves its own port, these too (duet-proxy --backend gives "
                 "one endpoint for all of them)"},
        {.name = "--trust-remote-code",
         .type = OPT_FLAG,
         .flags = OPT_IGNORED | OPT_NEGATABLE,
         .help = "duet runs no code from the checkpoint"},
        {.name = "--enable-chunked-prefill",
         .type = OPT_FLAG,
         .flags = OPT_IGNORED | OPT_NEGATABLE,
         .help = "always on: long prompts run in --max-num-batched-tokens chunks beside the "
                 "decodes"},
        {.name = "--async-scheduling",
         .type = OPT_FLAG,
         .flags = OPT_IGNORED | OPT_NEGATABLE,
         .help = "not a switch in duet: overlapping scheduling with the device step is the "
                 "backend's business"},
        {.name = "--enable-expert-parallel-load-balancer",
         .alias = "--enable-eplb",
         .type = OPT_FLAG,
         .flags = OPT_IGNORED | OPT_NEGATABLE,
         .help = "experts stay where they are placed at load time"},
        {.name = "--disable-uvicorn-access-log",
         .type = OPT_FLAG,
         .flags = OPT_IGNORED,
         .help = "duet logs no access lines (see --enable-log-requests)"},
    };
    duet_status st = opt_add(p, "Server", specs, (int)(sizeof specs / sizeof specs[0]));
    if (st == DUET_OK)
        st = opt_add(p, "Chat, tools, logging", chat, (int)(sizeof chat / sizeof chat[0]));
    if (st == DUET_OK)
        st = opt_add(p, "HTTP: CORS and TLS", http, (int)(sizeof http / sizeof http[0]));
    if (st == DUET_OK)
        st = opt_add(p, "vLLM compatibility (docs/vllm-compat.md)", vllm,
                     (int)(sizeof vllm / sizeof vllm[0]));
    return st;
}

/* ---------------------------------------------------------------------------------------------
 * After the table: what depends on several flags or on the program's role */

/* kv_role against the program; kv_port / kv_ip onto the plug-in's flags. */
static int apply_kv_transfer(srv_config *c, const char *prog, srv_role role, opt_parser *p) {
    if (!c->kvt_given) return 0;
    bool producer = !strcmp(c->kvt_role, "kv_producer");
    bool consumer = !strcmp(c->kvt_role, "kv_consumer");
    if (!producer && !consumer) {
        fprintf(stderr,
                "%s: --kv-transfer-config: kv_role %s: duet splits the roles: kv_producer runs "
                "as duet-prefill, kv_consumer as duet-decode\n",
                prog, c->kvt_role);
        return 2;
    }
    if (producer != (role == SRV_ROLE_PREFILL)) {
        fprintf(stderr, "%s: --kv-transfer-config: kv_role %s belongs to %s, not to %s\n", prog,
                c->kvt_role, producer ? "duet-prefill" : "duet-decode", prog);
        return 2;
    }
    char err[300];
    char port[16];
    snprintf(port, sizeof port, "%d", c->kvt_port);
    const char *pv[1] = {port}, *iv[1] = {c->kvt_ip};
    if (c->kvt_port && producer && !opt_given(p, "--kv-port") &&
        opt_set(p, "--kv-port", pv, 1, err, sizeof err) != DUET_OK) {
        fprintf(stderr, "%s: --kv-transfer-config: kv_port: %s\n", prog, err);
        return 2;
    }
    if (c->kvt_ip[0] && producer && !opt_given(p, "--kv-host") &&
        opt_set(p, "--kv-host", iv, 1, err, sizeof err) != DUET_OK) {
        fprintf(stderr, "%s: --kv-transfer-config: kv_ip: %s\n", prog, err);
        return 2;
    }
    LOG_INFO("--kv-transfer-config: %s%s%s%s; KV moves by duet's UCX transfer (NIXL's "
             "protocol)%s",
             c->kvt_role, c->kvt_connector[0] ? " (" : "", c->kvt_connector,
             c->kvt_connector[0] ? " named)" : "",
             producer && c->kvt_port ? ", side channel on kv_port + DP rank"
             : consumer && (c->kvt_port || c->kvt_ip[0])
                 ? "; kv_port/kv_ip mean nothing to a decode worker (it connects out)"
                 : "");
    return 0;
}

int srv_config_parse(srv_config *c, int argc, char **argv, srv_role role,
                     const srv_kv_plugin *plugin, opt_parser **p_p) {
    const char *prog = strrchr(argv[0], '/') ? strrchr(argv[0], '/') + 1 : argv[0];
    memset(c, 0, sizeof *c);
    par_options_init(&c->po);
    c->tool_parser = -1;
    c->log_stats = true;
    opt_parser *p;
    *p_p = NULL;
    if (opt_parser_create(prog, "[serve] [options] [MODEL]",
                          "An OpenAI-compatible server for DeepSeek-architecture models. "
                          "`vllm serve` command lines work as they are: vLLM's flags keep their "
                          "meaning where duet has it and are accepted with a log line where it "
                          "does not (docs/vllm-compat.md).",
                          &p) != DUET_OK) {
        fprintf(stderr, "%s: out of memory\n", prog);
        return 2;
    }
    *p_p = p;
    opt_allow_positional(p, 2, "MODEL");
    if (server_options_add(p, c) != DUET_OK || par_options_add(p, &c->po) != DUET_OK ||
        (plugin && plugin->add_options && plugin->add_options(plugin->state, p) != DUET_OK)) {
        fprintf(stderr, "%s: internal error building the option table\n", prog);
        return 2;
    }
    int rc = opt_parse(p, argc, argv);
    if (rc) return rc;
    /* `vllm serve MODEL`: the sub-command word may stay in front */
    int np = opt_positional_count(p), first = 0;
    if (np > 0 && !strcmp(opt_positional(p, 0), "serve")) first = 1;
    if (np - first > 1) {
        fprintf(stderr, "%s: unexpected argument '%s' (one MODEL expected)\n", prog,
                opt_positional(p, np - 1));
        return 2;
    }
    if (np - first == 1) {
        if (c->model) {
            fprintf(stderr, "%s: the model is given twice (--model and %s)\n", prog,
                    opt_positional(p, first));
            return 2;
        }
        c->model = opt_positional(p, first);
    }
    if (c->kv_cache_memory < 0 || (opt_given(p, "--kv-cache-memory") && c->kv_cache_memory == 0)) {
        fprintf(stderr, "%s: --kv-cache-memory: expected a positive size\n", prog);
        return 2;
    }
    if (c->max_request_body < 1024) {
        fprintf(stderr, "%s: --max-request-body: expected at least 1024 bytes\n", prog);
        return 2;
    }
    if (!c->model) {
        fprintf(stderr, "%s: --model DIR is required (see --help)\n", prog);
        return 2;
    }
    if (c->auto_tool_choice && c->tool_parser < 0) {
        fprintf(stderr,
                "%s: --enable-auto-tool-choice needs --tool-call-parser (deepseek_v3 or "
                "deepseek_v31)\n",
                prog);
        return 2;
    }
    if ((c->ssl_keyfile != NULL) != (c->ssl_certfile != NULL)) {
        fprintf(stderr, "%s: --ssl-keyfile and --ssl-certfile go together\n", prog);
        return 2;
    }
    if ((c->ssl_ca_certs || c->ssl_cert_reqs) && !c->ssl_certfile) {
        fprintf(stderr, "%s: --ssl-ca-certs and --ssl-cert-reqs need --ssl-certfile\n", prog);
        return 2;
    }
    if (c->ssl_cert_reqs && !c->ssl_ca_certs) {
        fprintf(stderr,
                "%s: --ssl-cert-reqs %d needs --ssl-ca-certs to check client "
                "certificates with\n",
                prog, c->ssl_cert_reqs);
        return 2;
    }
    if (opt_given(p, "--disable-log-requests")) c->log_requests = false;
    if (opt_given(p, "--disable-log-stats")) c->log_stats = false;
    c->seed_given = opt_given(p, "--seed");
    if (c->pp > 1) {
        if ((long long)c->po.tp * c->pp > 4096) {
            fprintf(stderr,
                    "%s: --pipeline-parallel-size %d x --tensor-parallel-size %d is too "
                    "many ranks\n",
                    prog, c->pp, c->po.tp);
            return 2;
        }
        LOG_INFO("--pipeline-parallel-size %d: duet has no pipeline stages; running tensor "
                 "parallel over %d x %d = %d ranks per DP rank instead",
                 c->pp, c->pp, c->po.tp, c->pp * c->po.tp);
        c->po.tp *= c->pp;
    }
    if (c->dp_rank >= 0 && c->dp_start_rank >= 0) {
        fprintf(stderr,
                "%s: --data-parallel-rank and --data-parallel-start-rank exclude each "
                "other\n",
                prog);
        return 2;
    }
    if (c->dp_rank >= c->po.dp || c->dp_start_rank >= c->po.dp) {
        fprintf(stderr, "%s: --data-parallel-%s %d is not below --data-parallel-size %d\n", prog,
                c->dp_rank >= 0 ? "rank" : "start-rank",
                c->dp_rank >= 0 ? c->dp_rank : c->dp_start_rank, c->po.dp);
        return 2;
    }
    if (c->dp_size_local > c->po.dp) {
        fprintf(stderr,
                "%s: --data-parallel-size-local %d is larger than --data-parallel-size "
                "%d\n",
                prog, c->dp_size_local, c->po.dp);
        return 2;
    }
    c->po.spec_tokens = c->spec_tokens;
    return apply_kv_transfer(c, prog, role, p);
}

void srv_config_cleanup(srv_config *c) {
    srv_strings *lists[] = {&c->cors_origins, &c->cors_methods, &c->cors_headers};
    for (size_t k = 0; k < sizeof lists / sizeof *lists; k++) {
        for (int i = 0; i < lists[k]->n; i++) free(lists[k]->v[i]);
        lists[k]->n = 0;
    }
}

int srv_config_check_instance(const srv_config *c, const char *prog, int dp_rank, int dp_size) {
    (void)dp_size;
    if (c->dp_rank >= 0 && dp_rank != c->dp_rank) {
        fprintf(stderr,
                "%s: --data-parallel-rank %d, but this process is DP rank %d of the MPI job "
                "(give each command line of 'mpirun ... : ...' its own rank, in order)\n",
                prog, c->dp_rank, dp_rank);
        return 2;
    }
    int start = c->dp_start_rank >= 0 ? c->dp_start_rank : 0;
    if (c->dp_size_local > 0 && (dp_rank < start || dp_rank >= start + c->dp_size_local)) {
        fprintf(stderr,
                "%s: this process is DP rank %d, outside --data-parallel-start-rank %d + "
                "--data-parallel-size-local %d (one mpirun job: 'mpirun -np N prog <node 0 "
                "line> : -np N prog <node 1 line>')\n",
                prog, dp_rank, start, c->dp_size_local);
        return 2;
    }
    return 0;
}

int srv_config_http_port(const srv_config *c, int dp_rank) {
    if (!c->port) return 0;
    if (c->dp_rank >= 0) return c->port;
    if (c->dp_start_rank >= 0) return c->port + dp_rank - c->dp_start_rank;
    return c->port + dp_rank;
}

void srv_config_cors(const srv_config *c, http_cors *cors) {
    memset(cors, 0, sizeof *cors);
    cors->origins = (const char *const *)c->cors_origins.v;
    cors->n_origins = c->cors_origins.n;
    cors->methods = (const char *const *)c->cors_methods.v;
    cors->n_methods = c->cors_methods.n;
    cors->headers = (const char *const *)c->cors_headers.v;
    cors->n_headers = c->cors_headers.n;
    cors->credentials = c->cors_credentials;
}
