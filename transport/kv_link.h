/* KV transfer for disaggregated serving (vLLM NIXL-connector protocol, "prefill first, decode
 * pulls"): the server plug-in (server.h) that duet-prefill and duet-decode load. Prefill side:
 * finished prompts' blocks stay leased and are served over a TCP side channel (protobuf-c,
 * HMAC challenge-response) that hands out the UCX worker address and memory key once per
 * peer. Decode side: pins a lease, reads the blocks with UCX RMA GET (contiguous runs
 * coalesced into one read), releases the lease, and tells the engine. One transfer thread
 * per worker process runs the side channel and the UCX worker. */
#ifndef DUET_KVX_H
#define DUET_KVX_H

#include <stdint.h>

#include "server/server.h"

typedef struct kvx_stats {
    uint64_t fetches_ok, fetches_failed;
    uint64_t bytes_read, gets_issued;
    uint64_t pins_served, pins_refused, peers_refused;
    double fetch_seconds_total;
} kvx_stats;

typedef struct kvx kvx;

/* Fills *plugin with the hooks and a new state (kvx_destroy frees it after srv_main). */
duet_status kvx_create(srv_kv_plugin *plugin);
void kvx_destroy(srv_kv_plugin *plugin);
void kvx_get_stats(const srv_kv_plugin *plugin, kvx_stats *st);

#endif
