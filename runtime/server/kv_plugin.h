/* The KV transfer plug-in interface of a worker: what the prefill program (prefill/) and the
 * decode program (decode/) plug into the shared server to lease KV to decode workers or pull it
 * from prefill workers. Plain C structs only: the server turns the OpenAI-side
 * kv_transfer_params JSON into srv_kv_params and back; the plug-ins never see JSON.
 * runtime does not depend on transport/, prefill/ or decode/: this table of hooks is the seam. */
#ifndef DUET_KV_PLUGIN_H
#define DUET_KV_PLUGIN_H

#include <stdbool.h>
#include <stdint.h>

#include "base/opt.h"
#include "base/status.h"
#include "engine/engine.h"
#include "engine/parallel.h"

typedef enum srv_role {
    SRV_ROLE_DECODE = 0,  /* a complete server; with a plug-in, also pulls remote prefills' KV */
    SRV_ROLE_PREFILL = 1, /* a complete server; with a plug-in, also leases KV to decoders */
} srv_role;

#define SRV_KV_HOST_MAX      256
#define SRV_KV_ENGINE_ID_MAX 64

/* kv_transfer_params of vLLM's NIXL connector, in C. On a prefill worker's answer they say where
 * a lease's blocks can be read; on a decode worker's request they say where to read them. */
typedef struct srv_kv_params {
    char engine_id[SRV_KV_ENGINE_ID_MAX]; /* remote_engine_id: the prefill process's id */
    char host[SRV_KV_HOST_MAX];           /* remote_host: its side channel */
    int port;                             /* remote_port */
    uint64_t lease;                       /* remote_request_id: the lease (prefill's request) */
    int tp_size;                          /* tp_size of the prefill instance */
} srv_kv_params;

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
    int max_model_len; /* the longest prompt a lease may hold (0: unknown) */
} srv_kv_context;

/* All hooks optional (NULL). state is the plug-in's own. */
typedef struct srv_kv_plugin {
    void *state;
    /* Adds the plug-in's options to the worker's table (they write into state). Main thread,
     * before anything starts. */
    duet_status (*add_options)(void *state, opt_parser *p);
    /* After the engine exists, before the HTTP server listens (main thread). An error ends
     * the program. */
    duet_status (*start)(void *state, const srv_kv_context *ctx);
    /* At shutdown, after the HTTP server drained and before the engine is destroyed. */
    void (*stop)(void *state);

    /* Prefill role. A request finished with ENG_KV_LEASE (its kv_transfer_params had
     * "do_remote_decode": true) and its blocks are leased under lease: fills *out (every field
     * but lease, which the server sets) so a decode worker can pull them. request_id is the
     * client's X-Request-Id (for logs). An error fails the request and the server releases the
     * lease. Loop thread. */
    duet_status (*lease)(void *state, uint64_t lease, const char *request_id, srv_kv_params *out);

    /* Decode role. The engine's fetch hook (engine thread; see eng_fetch_fn): remote is the
     * request's const srv_kv_params, owned by the server until the request ends. */
    eng_fetch_fn fetch;

    /* Prometheus text of the plug-in's own counters, each sample labelled with label (e.g.
     * model_name="x"), appended to /metrics; heap string the server frees, or NULL. Loop
     * thread. */
    char *(*metrics_text)(void *state, const char *label);
} srv_kv_plugin;

#endif
