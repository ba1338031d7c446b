/* A worker program (duet-prefill, duet-decode): command line, MPI instance, engine thread,
 * OpenAI-compatible HTTP API on libuv, metrics, graceful shutdown. The programs' mains are
 * thin: they hand srv_main a role and, for disaggregation, the KV transfer plug-in that
 * transport/ provides (runtime does not depend on transport; the plug-in is a table of hooks).
 *
 * Threads: the main thread runs the HTTP loop, one engine thread steps the engine; TP
 * followers run par_follow instead. The plug-in's hooks say which thread calls them. */
#ifndef DUET_SERVER_H
#define DUET_SERVER_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "base/opt.h"
#include "engine/engine.h"
#include "engine/parallel.h"
#include "base/status.h"

typedef enum srv_role {
    SRV_ROLE_DECODE = 0,  /* a complete server; with a plug-in, also pulls remote prefills' KV */
    SRV_ROLE_PREFILL = 1, /* a complete server; with a plug-in, also leases KV to decoders */
} srv_role;

/* What the plug-in learns when the worker has started (TP leader ranks only). */
typedef struct srv_kv_context {
    srv_role role;
    eng_engine *engine;
    be_kv *kv;
    par_instance *inst;
    const char *host; /* --host the HTTP API listens on */
    int http_port;    /* this DP rank's HTTP port */
    int dp_rank, dp_size;
    int tp_size;
    const char *served_model_name;
} srv_kv_context;

/* KV transfer plug-in. All hooks optional (NULL). state is the plug-in's own. */
typedef struct srv_kv_plugin {
    void *state;
    /* Command line: adds the plug-in's options to the worker's table (they write into the
     * plug-in's state). Main thread, before anything starts. */
    duet_status (*add_options)(void *state, opt_parser *p);
    /* After the engine exists, before the HTTP server listens (main thread). An error ends
     * the program. */
    duet_status (*start)(void *state, const srv_kv_context *ctx);
    /* At shutdown, after the HTTP server drained and before the engine is destroyed. */
    void (*stop)(void *state);

    /* Prefill side. A request finished with ENG_KV_LEASE (its kv_transfer_params had
     * "do_remote_decode": true): returns the kv_transfer_params object for the response
     * (vLLM's names: do_remote_prefill, remote_engine_id, remote_block_ids, remote_host,
     * remote_port, remote_request_id, tp_size), or NULL on failure (the lease is then
     * released by the server). Loop thread. */
    cJSON *(*lease_params)(void *state, uint64_t engine_id, const char *request_id,
                           const int32_t *blocks, int n_blocks, int n_prompt);

    /* Decode side. An incoming request's kv_transfer_params with "do_remote_prefill": true:
     * turns them into the opaque descriptor the engine hands to fetch (eng_request.remote).
     * DUET_ERR_INVALID with a client message in err for malformed params (answered 400).
     * Loop thread. */
    duet_status (*parse_remote)(void *state, const cJSON *params, int n_prompt, void **remote_p,
                                char *err, size_t err_len);
    /* Frees a descriptor once the request is over (loop thread). */
    void (*free_remote)(void *state, void *remote);
    /* The engine's fetch hook (engine thread); see eng_fetch_fn. */
    eng_fetch_fn fetch;
    /* Prometheus text of the plug-in's own counters, each sample labelled with label (e.g.
     * model_name="x"), appended to /metrics; heap string the server frees, or NULL. Loop
     * thread. */
    char *(*metrics_text)(void *state, const char *label);
} srv_kv_plugin;

/* Runs a worker until SIGTERM/SIGINT (then drains within --shutdown-timeout, exit 0).
 * plugin may be NULL. Returns the process exit status. */
int srv_main(int argc, char **argv, srv_role role, const srv_kv_plugin *plugin);

#endif
