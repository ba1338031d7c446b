/* The decode worker's side of KV transfer: its KV plug-in (server/kv_plugin.h). The engine
 * hands over requests whose prompt KV a prefill worker leased (kv_transfer_params
 * "do_remote_prefill": true); this module connects once per prefill worker (side channel,
 * authenticated, pool layouts compared, UCX address and key received), pins the lease, reads the
 * blocks with UCX RMA GET (runs of consecutive blocks coalesced into one read), releases the
 * lease and reports to the engine. A pull never reports failure while one of its reads may still
 * land: on a timeout or an error the peer's endpoint is closed first, which completes every read
 * in flight. */
#ifndef DUET_KV_PULL_H
#define DUET_KV_PULL_H

#include <stdint.h>

#include "server/kv_plugin.h"

typedef struct kvpull_stats {
    uint64_t fetches_ok, fetches_failed;
    uint64_t bytes_read, gets_issued;
    uint64_t peers_refused;
    uint64_t pins_streamed; /* pins whose blocks became readable chunk by chunk (Ready) */
    uint64_t ready_waits;   /* times a staged pull waited for the prefill's next chunk */
    uint64_t layer_reads;   /* reads of a block's first layers while the prefill computed it */
    double fetch_seconds_total;
} kvpull_stats;

/* Fills *plugin with the hooks and a new state (kvpull_destroy frees it after srv_main). */
duet_status kvpull_create(srv_kv_plugin *plugin);
void kvpull_destroy(srv_kv_plugin *plugin);
void kvpull_get_stats(const srv_kv_plugin *plugin, kvpull_stats *st);

#endif
