/* KV block manager; see kv_pool.h. Blocks live in three states: in use (ref > 0), free and
 * cached (ref 0, hash set: findable, evictable), free and blank. The free queue is a doubly
 * linked list over block ids: allocation takes the head, release appends to the tail. */
#include "engine/kv_pool.h"

#include <stdlib.h>
#include <string.h>

#include "base/hash.h"
#include "base/log.h"

#define NIL (-1)

typedef struct kv_block {
    int32_t ref;
    int32_t prev, next; /* free queue links, NIL when not queued */
    bool queued;
    bool cached;
    uint64_t hash, parent;
    int32_t bucket_next; /* hash chain */
} kv_block;

struct kv_pool {
    int n_blocks, block_size;
    bool prefix_caching;
    kv_block *blocks;
    int32_t *tokens; /* [n_blocks][block_size]: contents of cached blocks */
    int32_t head, tail;
    int n_free, n_cached;
    int32_t *buckets;
    uint32_t n_buckets;
    uint64_t queries, hits;
};

static void queue_remove(kv_pool *p, int32_t id) {
    kv_block *b = &p->blocks[id];
    if (!b->queued) return;
    if (b->prev != NIL)
        p->blocks[b->prev].next = b->next;
    else
        p->head = b->next;
    if (b->next != NIL)
        p->blocks[b->next].prev = b->prev;
    else
        p->tail = b->prev;
    b->prev = b->next = NIL;
    b->queued = false;
    p->n_free--;
}

static void queue_append(kv_pool *p, int32_t id) {
    kv_block *b = &p->blocks[id];
    b->prev = p->tail;
    b->next = NIL;
    if (p->tail != NIL)
        p->blocks[p->tail].next = id;
    else
        p->head = id;
    p->tail = id;
    b->queued = true;
    p->n_free++;
}

static uint32_t bucket_of(const kv_pool *p, uint64_t hash) {
    return (uint32_t)(hash ^ (hash >> 32)) & (p->n_buckets - 1);
}

static void uncache(kv_pool *p, int32_t id) {
    kv_block *b = &p->blocks[id];
    if (!b->cached) return;
    int32_t *link = &p->buckets[bucket_of(p, b->hash)];
    while (*link != NIL && *link != id) link = &p->blocks[*link].bucket_next;
    if (*link == id) *link = b->bucket_next;
    b->bucket_next = NIL;
    b->cached = false;
    p->n_cached--;
}

duet_status kv_pool_create(int n_blocks, int block_size, bool prefix_caching, kv_pool **pool_p) {
    if (n_blocks <= 0 || block_size <= 0) return DUET_ERR_INVALID;
    kv_pool *p = calloc(1, sizeof *p);
    if (!p) return DUET_ERR_NO_MEMORY;
    p->n_blocks = n_blocks;
    p->block_size = block_size;
    p->prefix_caching = prefix_caching;
    p->n_buckets = 16;
    while (p->n_buckets < (uint32_t)n_blocks) p->n_buckets <<= 1;
    p->blocks = calloc((size_t)n_blocks, sizeof *p->blocks);
    p->buckets = malloc(p->n_buckets * sizeof *p->buckets);
    if (prefix_caching) p->tokens = malloc((size_t)n_blocks * block_size * sizeof(int32_t));
    if (!p->blocks || !p->buckets || (prefix_caching && !p->tokens)) {
        kv_pool_destroy(p);
        return DUET_ERR_NO_MEMORY;
    }
    for (uint32_t i = 0; i < p->n_buckets; i++) p->buckets[i] = NIL;
    p->head = p->tail = NIL;
    for (int i = 0; i < n_blocks; i++) {
        p->blocks[i].prev = p->blocks[i].next = p->blocks[i].bucket_next = NIL;
        queue_append(p, i);
    }
    *pool_p = p;
    return DUET_OK;
}

void kv_pool_destroy(kv_pool *p) {
    if (!p) return;
    free(p->blocks);
    free(p->buckets);
    free(p->tokens);
    free(p);
}

int kv_pool_block_size(const kv_pool *p) {
    return p->block_size;
}

int kv_pool_num_free(const kv_pool *p) {
    return p->n_free;
}

void kv_pool_get_stats(const kv_pool *p, kv_pool_stats *st) {
    st->n_blocks = p->n_blocks;
    st->n_free = p->n_free;
    st->n_cached = p->n_cached;
    st->queries = p->queries;
    st->hits = p->hits;
}

duet_status kv_pool_alloc(kv_pool *p, int n, int32_t *ids) {
    if (n < 0) return DUET_ERR_INVALID;
    if (n > p->n_free) return DUET_ERR_NO_MEMORY;
    for (int i = 0; i < n; i++) {
        int32_t id = p->head;
        queue_remove(p, id);
        uncache(p, id); /* evicted: its old contents are about to be overwritten */
        p->blocks[id].ref = 1;
        ids[i] = id;
    }
    return DUET_OK;
}

void kv_pool_ref(kv_pool *p, int32_t id) {
    kv_block *b = &p->blocks[id];
    if (b->queued) queue_remove(p, id);
    b->ref++;
}

void kv_pool_release(kv_pool *p, const int32_t *ids, int n) {
    for (int i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= p->n_blocks || p->blocks[id].ref <= 0) {
            LOG_ERROR("kv_pool: release of block %d that is not in use (internal error)", id);
            continue;
        }
        if (--p->blocks[id].ref == 0) queue_append(p, id);
    }
}

int kv_pool_refcount(const kv_pool *p, int32_t id) {
    return id >= 0 && id < p->n_blocks ? p->blocks[id].ref : -1;
}

uint64_t kv_pool_hash(uint64_t parent, const int32_t *tokens, int n) {
    /* FNV-1a over the parent hash and the token ids, then a final avalanche */
    uint64_t h = HASH_FNV_BASIS ^ parent;
    for (int i = 0; i < n; i++) {
        uint8_t le[4]; /* the id's bytes, least significant first, whatever the host order */
        uint32_t t = (uint32_t)tokens[i];
        for (int k = 0; k < 4; k++) le[k] = (uint8_t)(t >> (8 * k));
        h = hash_fnv1a(h, le, 4);
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return h ? h : 1; /* 0 means "no parent" */
}

static int32_t find(const kv_pool *p, uint64_t hash, uint64_t parent, const int32_t *tokens) {
    for (int32_t id = p->buckets[bucket_of(p, hash)]; id != NIL; id = p->blocks[id].bucket_next) {
        const kv_block *b = &p->blocks[id];
        /* the content is compared too: a 64-bit hash collision must not serve wrong KV */
        if (b->hash == hash && b->parent == parent &&
            !memcmp(p->tokens + (size_t)id * p->block_size, tokens,
                    (size_t)p->block_size * sizeof(int32_t)))
            return id;
    }
    return NIL;
}

int32_t kv_pool_lookup(kv_pool *p, uint64_t hash, uint64_t parent, const int32_t *tokens) {
    if (!p->prefix_caching) return NIL;
    int32_t id = find(p, hash, parent, tokens);
    if (id == NIL) return NIL;
    kv_pool_ref(p, id);
    return id;
}

void kv_pool_count_lookups(kv_pool *p, int queries, int hits) {
    if (!p->prefix_caching) return;
    p->queries += (uint64_t)queries;
    p->hits += (uint64_t)hits;
}

void kv_pool_commit(kv_pool *p, int32_t id, uint64_t hash, uint64_t parent, const int32_t *tokens) {
    if (!p->prefix_caching || p->blocks[id].cached) return;
    if (find(p, hash, parent, tokens) != NIL) return;
    kv_block *b = &p->blocks[id];
    b->hash = hash;
    b->parent = parent;
    b->cached = true;
    memcpy(p->tokens + (size_t)id * p->block_size, tokens, (size_t)p->block_size * sizeof(int32_t));
    uint32_t k = bucket_of(p, hash);
    b->bucket_next = p->buckets[k];
    p->buckets[k] = id;
    p->n_cached++;
}

void kv_pool_reset_cache(kv_pool *p) {
    for (int i = 0; i < p->n_blocks; i++)
        if (p->blocks[i].ref == 0) uncache(p, i);
}
