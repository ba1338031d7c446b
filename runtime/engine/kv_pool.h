/* The KV block manager: a fixed pool of block ids (the memory itself is the backend's be_kv),
 * reference counts, and prefix caching by a hash chain over full blocks' tokens, as vLLM's
 * block pool does it. Free blocks wait in an LRU queue; a cached block whose count drops to
 * zero stays findable until the queue hands it out again, so shared prefixes survive between
 * requests. Not thread-safe: the engine thread owns it. */
#ifndef DUET_KV_POOL_H
#define DUET_KV_POOL_H

#include <stdbool.h>
#include <stdint.h>

#include "base/status.h"

typedef struct kv_pool kv_pool;

typedef struct kv_pool_stats {
    int n_blocks;
    int n_free;       /* reference count 0 (cached or not) */
    int n_cached;     /* with a prefix hash */
    uint64_t queries; /* full blocks looked up, as counted by kv_pool_count_lookups */
    uint64_t hits;    /* of which found */
} kv_pool_stats;

duet_status kv_pool_create(int n_blocks, int block_size, bool prefix_caching, kv_pool **pool_p);
void kv_pool_destroy(kv_pool *p);

int kv_pool_block_size(const kv_pool *p);
int kv_pool_num_free(const kv_pool *p);
void kv_pool_get_stats(const kv_pool *p, kv_pool_stats *st);

/* Takes n free blocks (evicting cached ones, least recently freed first) into ids, each with
 * reference count 1. All or nothing: DUET_ERR_NO_MEMORY leaves the pool as it was. */
duet_status kv_pool_alloc(kv_pool *p, int n, int32_t *ids);
/* Adds a reference to a block in use. */
void kv_pool_ref(kv_pool *p, int32_t id);
/* Drops n references, in the given order; a block reaching zero joins the free queue (its
 * cache entry kept). Free a sequence's blocks last-first so its tail is evicted first. */
void kv_pool_release(kv_pool *p, const int32_t *ids, int n);
int kv_pool_refcount(const kv_pool *p, int32_t id);

/* Hash of a full block of tokens following the block whose hash is parent (0 for the first). */
uint64_t kv_pool_hash(uint64_t parent, const int32_t *tokens, int n);
/* Finds the cached block with this hash and content; on a hit takes a reference (reviving it
 * from the free queue if needed) and returns its id, else -1. Counts nothing: a lookup may be
 * given back and repeated (a request waiting for blocks), so the caller counts the one that
 * stands with kv_pool_count_lookups. */
int32_t kv_pool_lookup(kv_pool *p, uint64_t hash, uint64_t parent, const int32_t *tokens);
/* Adds to the queries and hits of kv_pool_stats (nothing when prefix caching is off). */
void kv_pool_count_lookups(kv_pool *p, int queries, int hits);
/* Records that block id (in use) now holds this full block of tokens. A block already cached
 * under the same content elsewhere keeps that entry; the id stays uncached. */
void kv_pool_commit(kv_pool *p, int32_t id, uint64_t hash, uint64_t parent, const int32_t *tokens);
/* Drops every cache entry of blocks not in use (e.g. after the weights changed). */
void kv_pool_reset_cache(kv_pool *p);

#endif
