/* The prefill worker's side of KV transfer: its KV plug-in (server/kv_plugin.h). A request
 * that ends leased (kv_transfer_params "do_remote_decode": true) keeps its blocks; this module
 * serves them on a TCP side channel (HMAC challenge-response, pool layouts compared) that hands
 * each decode worker the UCX address and memory key once, pins a lease for one reader (copying
 * it to the staging area when UCX cannot read the cache), and frees it on release. Unread
 * leases expire in the engine (--kv-lease-timeout). */
#ifndef DUET_KV_LEASE_H
#define DUET_KV_LEASE_H

#include <stdint.h>

#include "server/kv_plugin.h"

typedef struct kvlease_stats {
    uint64_t pins_served, pins_refused, peers_refused;
    uint64_t pins_computing; /* of pins_served: the prompt was still being computed */
} kvlease_stats;

/* Fills *plugin with the hooks and a new state (kvlease_destroy frees it after srv_main). */
duet_status kvlease_create(srv_kv_plugin *plugin);
void kvlease_destroy(srv_kv_plugin *plugin);
void kvlease_get_stats(const srv_kv_plugin *plugin, kvlease_stats *st);

#endif
