/* The KV block manager: allocation all-or-nothing, reference counts, LRU eviction order,
 * prefix-cache hits by hash chain and content, and the pool always returning to full. */
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "engine/kv_pool.h"

static void fill(int32_t *t, int n, int base) {
    for (int i = 0; i < n; i++) t[i] = base + i;
}

int main(void) {
    kv_pool *p;
    CHECK(kv_pool_create(0, 16, true, &p) == DUET_ERR_INVALID);
    CHECK(kv_pool_create(8, 4, true, &p) == DUET_OK);
    CHECK(kv_pool_num_free(p) == 8);

    int32_t a[8], b[8];
    CHECK(kv_pool_alloc(p, 9, a) == DUET_ERR_NO_MEMORY);
    CHECK(kv_pool_num_free(p) == 8); /* all or nothing */
    CHECK(kv_pool_alloc(p, 3, a) == DUET_OK);
    CHECK(kv_pool_num_free(p) == 5);
    for (int i = 0; i < 3; i++) CHECK(kv_pool_refcount(p, a[i]) == 1);
    kv_pool_ref(p, a[1]);
    kv_pool_release(p, a, 3);
    CHECK(kv_pool_num_free(p) == 7);
    CHECK(kv_pool_refcount(p, a[1]) == 1);
    kv_pool_release(p, &a[1], 1);
    CHECK(kv_pool_num_free(p) == 8);

    /* prefix cache: commit a chain of two blocks, look it up again */
    int32_t t0[4], t1[4], t2[4];
    fill(t0, 4, 100);
    fill(t1, 4, 200);
    fill(t2, 4, 300);
    uint64_t h0 = kv_pool_hash(0, t0, 4), h1 = kv_pool_hash(h0, t1, 4);
    CHECK(h0 != h1 && h0 != 0);
    CHECK(kv_pool_hash(0, t1, 4) != h1); /* the parent is part of the hash */
    CHECK(kv_pool_alloc(p, 2, a) == DUET_OK);
    kv_pool_commit(p, a[0], h0, 0, t0);
    kv_pool_commit(p, a[1], h1, h0, t1);
    kv_pool_release(p, a, 2); /* free, but still cached */
    kv_pool_stats st;
    kv_pool_get_stats(p, &st);
    CHECK(st.n_free == 8 && st.n_cached == 2);
    CHECK(kv_pool_lookup(p, h0, 0, t0) == a[0]);
    CHECK(kv_pool_refcount(p, a[0]) == 1 && kv_pool_num_free(p) == 7);
    CHECK(kv_pool_lookup(p, h1, h0, t1) == a[1]);
    CHECK(kv_pool_lookup(p, kv_pool_hash(h1, t2, 4), h1, t2) == -1);
    /* same hash, other content (a forced collision) must miss */
    CHECK(kv_pool_lookup(p, h0, 0, t1) == -1);
    kv_pool_get_stats(p, &st);
    CHECK(st.queries == 0 && st.hits == 0); /* lookups count nothing: their caller counts */
    kv_pool_count_lookups(p, 4, 2);
    kv_pool_count_lookups(p, 3, 1);
    kv_pool_get_stats(p, &st);
    CHECK(st.queries == 7 && st.hits == 3);
    kv_pool_release(p, (int32_t[]){a[1], a[0]}, 2);

    /* eviction: the least recently freed cached block goes first; the other stays findable */
    CHECK(kv_pool_alloc(p, 6, b) == DUET_OK); /* the 6 never-cached blocks come first */
    for (int i = 0; i < 6; i++) CHECK(b[i] != a[0] && b[i] != a[1]);
    int32_t c;
    CHECK(kv_pool_alloc(p, 1, &c) == DUET_OK);
    CHECK(c == a[1]); /* freed before a[0] above */
    CHECK(kv_pool_lookup(p, h1, h0, t1) == -1);
    CHECK(kv_pool_lookup(p, h0, 0, t0) == a[0]);
    kv_pool_release(p, &a[0], 1);
    kv_pool_release(p, &c, 1);
    kv_pool_release(p, b, 6);
    CHECK(kv_pool_num_free(p) == 8);

    /* without prefix caching nothing is ever found */
    kv_pool *q;
    CHECK(kv_pool_create(2, 4, false, &q) == DUET_OK);
    CHECK(kv_pool_alloc(q, 1, &c) == DUET_OK);
    kv_pool_commit(q, c, h0, 0, t0);
    kv_pool_release(q, &c, 1);
    CHECK(kv_pool_lookup(q, h0, 0, t0) == -1);
    kv_pool_destroy(q);
    kv_pool_destroy(p);
    kv_pool_destroy(NULL);
    CHECK_DONE();
}
