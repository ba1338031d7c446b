/* srv_main: a worker process (duet-prefill / duet-decode). The MPI instance, one engine thread
 * stepping the engine (TP followers run par_follow instead), the libuv loop with the HTTP
 * server and routing, engine events carried to the loop through a mutex queue and a uv_async_t,
 * the periodic stats line and the SIGTERM drain. The command line is options.c's, the OpenAI
 * endpoints themselves oai.c's. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "dist/comm.h"
#include "base/clock.h"
#include "model/config.h"
#include "base/log.h"
#include "base/opt.h"
#include "openai/api.h"
#include "server/oai.h"
#include "server/options.h"
#include "server/server.h"

#ifndef DUET_VERSION
#define DUET_VERSION "0.0.0"
#endif

typedef struct srv_server {
    srv_config cfg;
    srv_role role;
    const srv_kv_plugin *plugin;
    bool plugin_started;
    par_instance *inst;
    eng_engine *eng;
    tok_tokenizer *tok;
    chat_template *tpl; /* NULL: no chat template (chat answers 400) */
    int vocab;          /* the model's */
    int max_model_len;
    int n_blocks;
    long long created;
    met_registry *met;

    uv_loop_t *loop;
    http_server *http;
    uv_async_t async;
    uv_signal_t sig_term, sig_int;
    uv_timer_t drain_timer;
    uv_timer_t stats_timer; /* the periodic stats line */
    eng_stats stats_last;
    double stats_t;
    bool draining;
    bool aborted_all;
    bool drained;
    int drain_phase;

    pthread_t engine_thread;
    bool engine_started;
    pthread_mutex_t mu; /* engine_started, read by the engine thread's wake-ups */
    atomic_bool stop_engine;
    atomic_bool engine_failed;
    comm_group *leaders; /* lockstep: the DP leaders' quit vote */

    oai_frontend *fe; /* the OpenAI endpoints */
    int exit_code;
} srv_server;

/* ---------------------------------------------------------------------------------------------
 * Engine thread and its events */

/* Engine thread: events wait in the frontend; the loop picks them up. */
static void wake_loop(void *arg) {
    srv_server *s = arg;
    pthread_mutex_lock(&s->mu);
    bool send = s->engine_started;
    pthread_mutex_unlock(&s->mu);
    if (send) uv_async_send(&s->async);
}

static void *engine_main(void *arg) {
    srv_server *s = arg;
    bool lock = par_lockstep(s->inst);
    /* Under DP lockstep every idle group must join the busy ones' steps quickly; otherwise the
     * wait only bounds how late lease expiry and TP heartbeats run (eng_wait wakes on work). */
    int idle_ms = lock ? 2 : 100;
    for (;;) {
        bool busy = false;
        duet_status st = eng_step(s->eng, &busy);
        if (st != DUET_OK) {
            LOG_ERROR("server: the engine failed (%s); shutting down", duet_strerror(st));
            atomic_store(&s->engine_failed, true);
            uv_async_send(&s->async);
            break;
        }
        bool stop = atomic_load(&s->stop_engine);
        if (lock) {
            /* every DP leader leaves together, or the others would wait in a collective */
            long long v = stop && !busy ? 0 : 1;
            if (comm_allreduce_i64(s->leaders, &v, 1, true) != DUET_OK) {
                atomic_store(&s->engine_failed, true);
                uv_async_send(&s->async);
                break;
            }
            if (v == 0) break;
        } else if (stop) {
            break;
        }
        if (!busy) eng_wait(s->eng, idle_ms);
    }
    return NULL;
}

/* vLLM's periodic line: throughput over the interval, queues, KV usage (leases count as used),
 * the prefix cache's hit rate over the interval's lookups. Quiet while nothing happens. */
static void on_stats_timer(uv_timer_t *t) {
    srv_server *s = t->data;
    eng_stats st;
    eng_get_stats(s->eng, &st);
    double now = clock_now_s(), dt = now - s->stats_t;
    const eng_stats *o = &s->stats_last;
    uint64_t dp = st.prompt_tokens - o->prompt_tokens;
    uint64_t dg = st.generation_tokens - o->generation_tokens;
    uint64_t dq = st.prefix_queries - o->prefix_queries, dh = st.prefix_hits - o->prefix_hits;
    if ((st.n_running + st.n_waiting > 0 || dp || dg) && dt > 0)
        LOG_INFO("stats: prompt throughput %.1f tokens/s, generation throughput %.1f tokens/s, "
                 "running %d reqs, waiting %d reqs, KV cache usage %.1f%%, prefix cache hit "
                 "rate %.1f%%",
                 (double)dp / dt, (double)dg / dt, st.n_running, st.n_waiting,
                 st.n_blocks > 0 ? 100.0 * (st.n_blocks - st.n_free_blocks) / st.n_blocks : 0.0,
                 dq ? 100.0 * (double)dh / (double)dq : 0.0);
    uint64_t dd = st.spec_drafts - o->spec_drafts,
             dt_ = st.spec_draft_tokens - o->spec_draft_tokens;
    uint64_t da = st.spec_accepted - o->spec_accepted;
    if (dd > 0) {
        /* vLLM's SpecDecoding line: mean acceptance length counts the target's own token */
        char per[96] = "";
        size_t at = 0;
        for (int i = 0; i < s->cfg.spec_tokens && i < MDL_MAX_DRAFT; i++)
            at += (size_t)snprintf(
                per + at, sizeof per - at, "%s%.3f", i ? ", " : "",
                (double)(st.spec_accepted_per_pos[i] - o->spec_accepted_per_pos[i]) / (double)dd);
        LOG_INFO("SpecDecoding metrics: mean acceptance length %.2f, accepted throughput %.2f "
                 "tokens/s, drafted throughput %.2f tokens/s, accepted %llu tokens, drafted %llu "
                 "tokens, per-position acceptance rate: %s, avg draft acceptance rate %.1f%%",
                 1.0 + (double)da / (double)dd, dt > 0 ? (double)da / dt : 0.0,
                 dt > 0 ? (double)dt_ / dt : 0.0, (unsigned long long)da, (unsigned long long)dt_,
                 per, dt_ ? 100.0 * (double)da / (double)dt_ : 0.0);
    }
    s->stats_last = st;
    s->stats_t = now;
}

/* ---------------------------------------------------------------------------------------------
 * Shutdown */

static void close_handle(uv_handle_t *h) {
    if (!uv_is_closing(h)) uv_close(h, NULL);
}

/* After the drain (or its hard deadline): plug-in, engine thread, handles. The loop then ends;
 * srv_main destroys the engine and delivers its last events. */
static void finish_shutdown(srv_server *s) {
    if (s->drained) return;
    s->drained = true;
    uv_timer_stop(&s->drain_timer);
    if (s->plugin_started && s->plugin->stop) s->plugin->stop(s->plugin->state);
    s->plugin_started = false;
    if (s->engine_started) {
        atomic_store(&s->stop_engine, true);
        eng_wake(s->eng);
        pthread_join(s->engine_thread, NULL);
        pthread_mutex_lock(&s->mu);
        s->engine_started = false;
        pthread_mutex_unlock(&s->mu);
    }
    oai_process_events(s->fe);
    http_server_destroy(s->http); /* requests still held get on_close: their jobs let go */
    s->http = NULL;
    close_handle((uv_handle_t *)&s->async);
    close_handle((uv_handle_t *)&s->sig_term);
    close_handle((uv_handle_t *)&s->sig_int);
    close_handle((uv_handle_t *)&s->drain_timer);
    close_handle((uv_handle_t *)&s->stats_timer);
}

static void on_drained(http_server *http, void *arg) {
    (void)http;
    srv_server *s = arg;
    LOG_INFO("server: drained; stopping");
    finish_shutdown(s);
}

static void on_drain_timer(uv_timer_t *t) {
    srv_server *s = t->data;
    if (s->drain_phase == 0) {
        int n = oai_jobs_count(s->fe);
        if (n) LOG_WARN("server: shutdown timeout: aborting %d requests still running", n);
        s->drain_phase = 1;
        oai_abort_all(s->fe);
        /* the aborted responses end within a few steps; a client that does not read them
         * does not keep the process */
        uv_timer_start(&s->drain_timer, on_drain_timer, 5000, 0);
        return;
    }
    LOG_WARN("server: connections still open 5 s after the abort; closing them");
    finish_shutdown(s);
}

static void start_drain(srv_server *s, const char *why) {
    if (s->draining) return;
    s->draining = true;
    oai_set_draining(s->fe);
    int n = oai_jobs_count(s->fe);
    LOG_INFO("server: %s: no new requests; %d in flight get up to %.0f s", why, n,
             s->cfg.shutdown_timeout_s);
    http_server_close(s->http, on_drained, s);
    uv_timer_start(&s->drain_timer, on_drain_timer, (uint64_t)(s->cfg.shutdown_timeout_s * 1000),
                   0);
}

static void on_signal(uv_signal_t *h, int signum) {
    srv_server *s = h->data;
    if (s->draining) {
        if (s->drain_phase == 0) {
            LOG_WARN("server: second signal: aborting in-flight requests now");
            uv_timer_stop(&s->drain_timer);
            on_drain_timer(&s->drain_timer);
        }
        return;
    }
    start_drain(s, signum == SIGINT ? "SIGINT" : "SIGTERM");
}

static void on_async(uv_async_t *a) {
    srv_server *s = a->data;
    oai_process_events(s->fe);
    if (atomic_load(&s->engine_failed) && !s->drained) {
        s->exit_code = 1;
        s->draining = true;
        pthread_join(s->engine_thread, NULL);
        pthread_mutex_lock(&s->mu);
        s->engine_started = false;
        pthread_mutex_unlock(&s->mu);
        finish_shutdown(s);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Routes */

static void respond_error(srv_server *s, http_req *req, int status, const char *msg) {
    met_count_http(s->met, status);
    api_respond_error(req, status, msg, NULL, NULL);
}

static void handle_models(srv_server *s, http_req *req) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "object", "list");
    cJSON *data = cJSON_AddArrayToObject(o, "data");
    cJSON *m = cJSON_CreateObject();
    cJSON_AddItemToArray(data, m);
    cJSON_AddStringToObject(m, "id", s->cfg.served_name);
    cJSON_AddStringToObject(m, "object", "model");
    cJSON_AddNumberToObject(m, "created", (double)s->created);
    cJSON_AddStringToObject(m, "owned_by", "duet");
    cJSON_AddStringToObject(m, "root", s->cfg.model);
    cJSON_AddNullToObject(m, "parent");
    cJSON_AddNumberToObject(m, "max_model_len", s->max_model_len);
    cJSON *perms = cJSON_AddArrayToObject(m, "permission");
    cJSON *p = cJSON_CreateObject();
    cJSON_AddItemToArray(perms, p);
    char id[48] = "modelperm-";
    api_random_hex(id + 10, sizeof id - 10, 32);
    cJSON_AddStringToObject(p, "id", id);
    cJSON_AddStringToObject(p, "object", "model_permission");
    cJSON_AddNumberToObject(p, "created", (double)s->created);
    cJSON_AddFalseToObject(p, "allow_create_engine");
    cJSON_AddTrueToObject(p, "allow_sampling");
    cJSON_AddTrueToObject(p, "allow_logprobs");
    cJSON_AddFalseToObject(p, "allow_search_indices");
    cJSON_AddTrueToObject(p, "allow_view");
    cJSON_AddFalseToObject(p, "allow_fine_tuning");
    cJSON_AddStringToObject(p, "organization", "*");
    cJSON_AddNullToObject(p, "group");
    cJSON_AddFalseToObject(p, "is_blocking");
    met_count_http(s->met, 200);
    api_respond_json(req, 200, o, NULL);
    cJSON_Delete(o);
}

static void handle_metrics(srv_server *s, http_req *req) {
    eng_stats st;
    eng_get_stats(s->eng, &st);
    http_server_stats hs;
    http_server_get_stats(s->http, &hs);
    met_gauges g = {
        .num_requests_running = st.n_running,
        .num_requests_waiting = st.n_waiting,
        .kv_cache_usage =
            st.n_blocks > 0 ? (double)(st.n_blocks - st.n_free_blocks) / st.n_blocks : 0.0,
        .prompt_tokens = st.prompt_tokens,
        .generation_tokens = st.generation_tokens,
        .num_preemptions = st.n_preemptions,
        .prefix_cache_queries = st.prefix_queries * (uint64_t)s->cfg.block_size,
        .prefix_cache_hits = st.prefix_hits * (uint64_t)s->cfg.block_size,
        .http_connections_open = hs.connections_open,
        .spec_k = s->cfg.spec_tokens,
        .spec_num_drafts = st.spec_drafts,
        .spec_num_draft_tokens = st.spec_draft_tokens,
        .spec_num_accepted_tokens = st.spec_accepted,
    };
    for (int i = 0; i < MDL_MAX_DRAFT; i++)
        g.spec_accepted_per_pos[i] = st.spec_accepted_per_pos[i];
    char *text = NULL;
    size_t len = 0;
    met_count_http(s->met, 200);
    if (met_render(s->met, &g, &text, &len) != DUET_OK) {
        respond_error(s, req, 500, "out of memory");
        return;
    }
    if (s->plugin && s->plugin->metrics_text) {
        char label[300];
        snprintf(label, sizeof label, "model_name=\"%.250s\"", s->cfg.served_name);
        char *more = s->plugin->metrics_text(s->plugin->state, label);
        char *both = more ? realloc(text, len + strlen(more) + 1) : NULL;
        if (both) {
            memcpy(both + len, more, strlen(more) + 1);
            len += strlen(more);
            text = both;
        }
        free(more);
    }
    http_respond(req, 200, "text/plain; version=0.0.4; charset=utf-8", text, len);
    free(text);
}

typedef enum route_kind {
    R_COMPLETIONS,
    R_CHAT,
    R_MODELS,
    R_HEALTH,
    R_VERSION,
    R_METRICS,
    R_TOKENIZE,
    R_DETOKENIZE,
} route_kind;

static const struct route {
    const char *path;
    const char *method; /* GET routes also answer HEAD */
    route_kind kind;
} k_routes[] = {
    {"/v1/completions", "POST", R_COMPLETIONS},
    {"/v1/chat/completions", "POST", R_CHAT},
    {"/v1/models", "GET", R_MODELS},
    {"/health", "GET", R_HEALTH},
    {"/version", "GET", R_VERSION},
    {"/metrics", "GET", R_METRICS},
    {"/tokenize", "POST", R_TOKENIZE},
    {"/detokenize", "POST", R_DETOKENIZE},
};

static void on_request(http_req *req, void *user) {
    srv_server *s = user;
    const struct route *r = NULL;
    for (size_t i = 0; i < sizeof k_routes / sizeof *k_routes; i++)
        if (!strcmp(req->path, k_routes[i].path)) r = &k_routes[i];
    if (!r) {
        respond_error(s, req, 404, "Not Found");
        return;
    }
    bool get_ok = !strcmp(r->method, "GET") && !strcmp(req->method, "HEAD");
    if (strcmp(req->method, r->method) != 0 && !get_ok) {
        http_header allow[2] = {{"Allow", !strcmp(r->method, "GET") ? "GET, HEAD" : r->method},
                                {NULL, NULL}};
        met_count_http(s->met, 405);
        api_respond_error(req, 405, "Method Not Allowed", NULL, allow);
        return;
    }
    if (!strncmp(req->path, "/v1/", 4) && !api_auth_ok(req, s->cfg.api_key)) {
        respond_error(s, req, 401,
                      "Unauthorized: a valid API key is required (Authorization: "
                      "Bearer KEY)");
        return;
    }
    switch (r->kind) {
    case R_HEALTH:
        if (s->draining) {
            respond_error(s, req, 503, "The server is shutting down");
            return;
        }
        met_count_http(s->met, 200);
        http_respond(req, 200, NULL, "", 0);
        return;
    case R_VERSION: {
        static const char v[] = "{\"version\":\"" DUET_VERSION "\"}";
        met_count_http(s->met, 200);
        http_respond(req, 200, "application/json", v, sizeof v - 1);
        return;
    }
    case R_METRICS:
        handle_metrics(s, req);
        return;
    case R_MODELS:
        handle_models(s, req);
        return;
    default:
        break;
    }
    if (s->draining) {
        respond_error(s, req, 503, "The server is shutting down");
        return;
    }
    cJSON *body = NULL;
    api_err e = {0};
    if (api_parse_body(req, &body, &e) != DUET_OK) {
        met_count_http(s->met, e.status);
        api_respond_err(req, &e, NULL);
        return;
    }
    switch (r->kind) {
    case R_COMPLETIONS:
        oai_handle_completions(s->fe, req, body); /* takes body over */
        return;
    case R_CHAT:
        oai_handle_chat(s->fe, req, body);
        return;
    case R_TOKENIZE:
        oai_handle_tokenize(s->fe, req, body);
        return;
    default:
        oai_handle_detokenize(s->fe, req, body);
        break;
    }
    cJSON_Delete(body);
}

/* ---------------------------------------------------------------------------------------------
 * Start-up */

/* A TP follower: the leader's steps until it says stop. Signals are the leader's business:
 * mpirun delivers them to every rank, and a follower that died would break the drain. */
static int run_follower(srv_server *s) {
    signal(SIGTERM, SIG_IGN);
    signal(SIGINT, SIG_IGN);
    be_kv *kv = NULL;
    int nb = s->n_blocks;
    duet_status st = par_kv_agree(s->inst, &nb, s->cfg.block_size);
    if (st == DUET_OK) st = mdl_kv_create(par_model(s->inst), nb, s->cfg.block_size, &kv);
    if (st == DUET_OK) st = par_follow(s->inst, kv);
    if (kv) mdl_kv_destroy(par_model(s->inst), kv);
    return st == DUET_OK ? 0 : 1;
}

static duet_status size_kv(srv_server *s) {
    const cfg_model *mc = mdl_config(par_model(s->inst));
    size_t per_token = mdl_kv_bytes_per_token(par_model(s->inst));
    if (s->cfg.num_gpu_blocks_override > 0) {
        /* held to what the device (or the host) has, as a --kv-cache-memory of its bytes */
        char flag[64];
        snprintf(flag, sizeof flag, "--num-gpu-blocks-override %d", s->cfg.num_gpu_blocks_override);
        duet_status st = par_kv_fixed_check(s->inst,
                                            (long long)s->cfg.num_gpu_blocks_override *
                                                s->cfg.block_size * (long long)per_token,
                                            flag);
        if (st != DUET_OK) return st;
        s->n_blocks = s->cfg.num_gpu_blocks_override;
    } else {
        /* --kv-cache-memory; else what --gpu-memory-utilization of the device leaves after
         * loading (the memory plan's readings); else, on host memory, 1 GiB */
        long long budget = s->cfg.kv_cache_memory;
        if (budget > 0) {
            /* the size asked, held to what the device (or the host) has, as below */
            duet_status st = par_kv_fixed_check(s->inst, budget, NULL);
            if (st != DUET_OK) return st;
        } else {
            duet_status st = par_kv_budget(s->inst, &budget);
            if (st == DUET_ERR_UNSUPPORTED)
                budget = 1LL << 30;
            else if (st != DUET_OK)
                return st;
        }
        long long per_block = (long long)per_token * s->cfg.block_size;
        long long nb = per_block > 0 ? budget / per_block : 0;
        if (nb > INT_MAX / 2) nb = INT_MAX / 2;
        s->n_blocks = (int)nb;
    }
    if (s->n_blocks < 1) {
        LOG_ERROR("server: --kv-cache-memory %lld bytes holds no block of %d tokens (%zu bytes "
                  "per token)",
                  s->cfg.kv_cache_memory, s->cfg.block_size, per_token);
        return DUET_ERR_INVALID;
    }
    if ((long long)s->n_blocks * s->cfg.block_size < s->max_model_len)
        LOG_WARN("server: the KV cache (%d blocks of %d tokens) is smaller than one sequence of "
                 "--max-model-len %d",
                 s->n_blocks, s->cfg.block_size, s->max_model_len);
    (void)mc;
    long long tokens = (long long)s->n_blocks * s->cfg.block_size;
    LOG_INFO("KV cache: %d blocks = %lld tokens (%.2f GiB per rank), %.1fx max-model-len",
             s->n_blocks, tokens, (double)tokens * (double)per_token / (1 << 30),
             (double)tokens / s->max_model_len);
    return DUET_OK;
}

/* Before MPI: a bad command line or file ends every rank alike. */
static int early_exit(srv_server *s, opt_parser *op, int code) {
    chat_destroy(s->tpl);
    tok_destroy(s->tok);
    srv_config_cleanup(&s->cfg);
    opt_parser_destroy(op);
    pthread_mutex_destroy(&s->mu);
    free(s);
    return code;
}

/* The checkpoint's chat template (or --chat-template's). A template that cannot be read or
 * interpreted ends the program (never a silent fallback); a tokenizer without any template
 * only makes chat requests fail, as a base model has none. */
static duet_status load_template(srv_server *s) {
    const srv_config *c = &s->cfg;
    duet_status st = chat_load_template(c->tokenizer, c->chat_template, &s->tpl);
    if (st == DUET_ERR_NOT_FOUND && !c->chat_template) {
        LOG_WARN("server: no chat template in %s; /v1/chat/completions answers 400 (give one "
                 "with --chat-template)",
                 c->tokenizer);
        s->tpl = NULL;
        return DUET_OK;
    }
    if (st != DUET_OK) LOG_ERROR("server: cannot use the chat template; stopping");
    return st;
}

int srv_main(int argc, char **argv, srv_role role, const srv_kv_plugin *plugin) {
    const char *name = role == SRV_ROLE_PREFILL ? "duet-prefill" : "duet-decode";
    log_set_tag(name);
    srv_server *s = calloc(1, sizeof *s);
    if (!s) return 1;
    s->role = role;
    s->plugin = plugin;
    pthread_mutex_init(&s->mu, NULL);
    srv_config *c = &s->cfg;
    opt_parser *op = NULL;
    int pr = srv_config_parse(c, argc, argv, role, plugin, &op);
    if (pr) return early_exit(s, op, pr == 1 ? 0 : 2);
    if (!c->tokenizer) c->tokenizer = c->model;
    if (!c->served_name) c->served_name = c->model;
    if (c->api_key && !*c->api_key) c->api_key = NULL;
    c->po.max_tokens = c->max_num_batched_tokens;

    /* the certificate and key are read again by the HTTP server: a bad one stops us here,
     * before MPI and the weights */
    http_tls tls_files = {.cert_file = c->ssl_certfile,
                          .key_file = c->ssl_keyfile,
                          .ca_file = c->ssl_ca_certs,
                          .verify_client = c->ssl_cert_reqs};
    if (c->ssl_certfile && http_tls_check(&tls_files) != DUET_OK) return early_exit(s, op, 1);

    /* values that depend on the model, checked before MPI and the weights */
    cfg_model mc;
    if (cfg_load(c->model, &mc) != DUET_OK) return early_exit(s, op, 1);
    if (c->max_model_len > mc.max_position_embeddings) {
        fprintf(stderr,
                "%s: --max-model-len %d is longer than the model's max_position_embeddings "
                "(%d)\n",
                name, c->max_model_len, mc.max_position_embeddings);
        return early_exit(s, op, 2);
    }
    s->max_model_len =
        c->max_model_len ? c->max_model_len
                         : (mc.max_position_embeddings < 8192 ? mc.max_position_embeddings : 8192);
    if (srv_config_http_port(c, c->po.dp - 1) > 65535) {
        fprintf(stderr, "%s: --port %d + %d DP ranks passes 65535\n", name, c->port, c->po.dp);
        return early_exit(s, op, 2);
    }
    /* the memory plan runs before any weight loads: a layout that does not fit is refused */
    c->po.mem = (par_memory){.utilization = c->gpu_memory_utilization,
                             .kv_cache_memory = c->kv_cache_memory,
                             .max_model_len = s->max_model_len,
                             .max_num_seqs = c->max_num_seqs,
                             .block_size = c->block_size,
                             .print_plan = c->print_memory_plan};
    /* every rank reads the tokenizer and the chat template before any collective: a bad file
     * fails all alike */
    if (tok_load(c->tokenizer, &s->tok) != DUET_OK || load_template(s) != DUET_OK)
        return early_exit(s, op, 1);

    int rc = 1;
    if (par_instance_create(&c->po, c->model, &argc, &argv, &s->inst) != DUET_OK)
        return early_exit(s, op, 1);
    const comm_world *w = par_world(s->inst);
    if (srv_config_check_instance(c, name, par_dp_rank(s->inst), par_dp_size(s->inst))) {
        /* the other ranks may have passed: they would wait for this one in a collective */
        if (w->size > 1) comm_abort(2);
        rc = 2;
        goto out_inst;
    }
    if (par_lockstep(s->inst) && comm_group_create("leaders", par_tp_rank(s->inst) == 0 ? 0 : 1,
                                                   w->rank, &s->leaders) != DUET_OK)
        goto out_inst;
    if (size_kv(s) != DUET_OK) goto out_inst;
    s->vocab = mdl_config(par_model(s->inst))->vocab_size;
    if (par_tp_rank(s->inst) != 0) {
        tok_destroy(s->tok);
        s->tok = NULL;
        chat_destroy(s->tpl);
        s->tpl = NULL;
        rc = run_follower(s);
        goto out_inst;
    }
    /* vLLM queues without bound; a bound turns a flood into quick 503s instead of timeouts */
    oai_config oc = {.served_name = c->served_name,
                     .reasoning = c->reasoning,
                     .tool_parser = c->tool_parser,
                     .auto_tool_choice = c->auto_tool_choice,
                     .trust_request_chat_template = c->trust_request_chat_template,
                     .max_logprobs = c->max_logprobs,
                     .log_requests = c->log_requests,
                     .seeded = c->seed_given,
                     .seed = c->po.seed,
                     .max_model_len = s->max_model_len,
                     .vocab = s->vocab,
                     .max_live = c->max_num_seqs + c->max_waiting,
                     .plugin = plugin,
                     .wake = wake_loop,
                     .wake_arg = s};
    if (met_create(c->served_name, s->max_model_len, &s->met) != DUET_OK ||
        oai_create(&oc, s->tok, s->tpl, s->met, &s->fe) != DUET_OK) {
        par_stop_followers(s->inst);
        goto out_inst;
    }
    eng_config ec;
    eng_config_default(&ec);
    ec.max_num_seqs = c->max_num_seqs;
    ec.max_num_batched_tokens = c->max_num_batched_tokens;
    ec.max_model_len = s->max_model_len;
    ec.block_size = c->block_size;
    ec.n_blocks = s->n_blocks;
    ec.prefix_caching = c->prefix_caching;
    ec.lease_timeout_s = c->lease_timeout_s;
    ec.spec_tokens = c->spec_tokens;
    ec.on_event = oai_on_engine_event;
    ec.event_user = s->fe;
    if (plugin && plugin->fetch) {
        ec.fetch = plugin->fetch;
        ec.fetch_user = plugin->state;
    }
    if (eng_create(&ec, s->inst, s->tok, &s->eng) != DUET_OK) {
        par_stop_followers(s->inst);
        goto out_inst;
    }
    s->n_blocks = ec.n_blocks;
    s->created = (long long)time(NULL);
    oai_set_engine(s->fe, s->eng);
    int port = srv_config_http_port(c, par_dp_rank(s->inst));

    uv_loop_t loop;
    uv_loop_init(&loop);
    s->loop = &loop;
    oai_set_loop(s->fe, &loop);
    uv_async_init(&loop, &s->async, on_async);
    s->async.data = s;
    uv_signal_init(&loop, &s->sig_term);
    uv_signal_init(&loop, &s->sig_int);
    s->sig_term.data = s->sig_int.data = s;
    uv_timer_init(&loop, &s->drain_timer);
    s->drain_timer.data = s;
    uv_timer_init(&loop, &s->stats_timer);
    s->stats_timer.data = s;
    http_server_opts ho;
    http_server_opts_init(&ho);
    ho.max_body_bytes = (size_t)c->max_request_body;
    ho.max_connections_per_client = (unsigned)c->max_connections_per_client;
    http_cors cors;
    srv_config_cors(c, &cors);
    ho.cors = &cors;
    http_tls tls = {.cert_file = c->ssl_certfile,
                    .key_file = c->ssl_keyfile,
                    .ca_file = c->ssl_ca_certs,
                    .verify_client = c->ssl_cert_reqs};
    if (c->ssl_certfile) ho.tls = &tls;
    bool ok = http_server_create(&loop, &ho, on_request, s, &s->http) == DUET_OK;
    if (ok && plugin && plugin->start) {
        srv_kv_context ctx = {.role = role,
                              .engine = s->eng,
                              .kv = eng_kv(s->eng),
                              .inst = s->inst,
                              .host = c->host,
                              .http_port = port,
                              .dp_rank = par_dp_rank(s->inst),
                              .dp_size = par_dp_size(s->inst),
                              .tp_size = par_tp_size(s->inst),
                              .served_model_name = c->served_name,
                              .max_model_len = s->max_model_len};
        ok = plugin->start(plugin->state, &ctx) == DUET_OK;
        s->plugin_started = ok;
        if (!ok) LOG_ERROR("server: the KV transfer plug-in did not start");
    }
    if (ok && http_server_listen(s->http, c->host, port) != DUET_OK) ok = false;
    if (ok) {
        uv_signal_start(&s->sig_term, on_signal, SIGTERM);
        uv_signal_start(&s->sig_int, on_signal, SIGINT);
        if (c->log_stats) {
            uint64_t ms = (uint64_t)(c->log_stats_interval_s * 1000);
            eng_get_stats(s->eng, &s->stats_last);
            s->stats_t = clock_now_s();
            uv_timer_start(&s->stats_timer, on_stats_timer, ms, ms);
        }
        s->engine_started = true;
        if (pthread_create(&s->engine_thread, NULL, engine_main, s) != 0) {
            LOG_ERROR("server: cannot start the engine thread");
            s->engine_started = false;
            ok = false;
        }
    }
    if (ok) {
        LOG_INFO("%s serving %s as '%s' on %s://%s:%d (DP rank %d of %d, TP %d), "
                 "max_model_len %d, KV cache %d blocks of %d tokens",
                 name, c->model, c->served_name, c->ssl_certfile ? "https" : "http",
                 c->host && *c->host ? c->host : "0.0.0.0", http_server_port(s->http),
                 par_dp_rank(s->inst), par_dp_size(s->inst), par_tp_size(s->inst), s->max_model_len,
                 s->n_blocks, c->block_size);
        rc = 0;
    } else {
        s->exit_code = 1;
        s->draining = true;
        if (par_lockstep(s->inst)) {
            /* the other DP groups would wait for this one in every step until the collective
             * deadline: end the instance now, as a bad checkpoint does */
            LOG_ERROR("server: DP rank %d could not start; stopping the instance",
                      par_dp_rank(s->inst));
            comm_abort(1);
        }
        finish_shutdown(s);
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    if (s->exit_code) rc = s->exit_code;

    /* the engine thread is gone: the last events (aborts) come from eng_destroy, here */
    eng_destroy(s->eng);
    s->eng = NULL;
    oai_process_events(s->fe);
    uv_run(&loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&loop) != 0) LOG_WARN("server: handles left open at exit");
    par_stop_followers(s->inst);
    if (!rc) LOG_INFO("%s: stopped", name);

out_inst:
    oai_destroy(s->fe);
    met_destroy(s->met);
    pthread_mutex_destroy(&s->mu);
    comm_group_destroy(s->leaders);
    chat_destroy(s->tpl);
    tok_destroy(s->tok);
    par_instance_destroy(s->inst);
    srv_config_cleanup(c);
    opt_parser_destroy(op);
    free(s);
    return rc;
}
