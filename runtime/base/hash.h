/* The project's two non-cryptographic hashes, in one place: FNV-1a over bytes (hash tables,
 * prefix-cache chains, names) and the splitmix64 finalizer (spreading a counter or a weak hash
 * into well-mixed bits). Pure inline functions; any thread. */
#ifndef DUET_HASH_H
#define DUET_HASH_H

#include <stddef.h>
#include <stdint.h>

#define HASH_FNV_BASIS 1469598103934665603ull
#define HASH_FNV_PRIME 1099511628211ull

/* FNV-1a of n bytes, continuing from h (HASH_FNV_BASIS to start). */
static inline uint64_t hash_fnv1a(uint64_t h, const void *data, size_t n) {
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * HASH_FNV_PRIME;
    return h;
}

static inline uint64_t hash_fnv1a_str(const char *s) {
    uint64_t h = HASH_FNV_BASIS;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * HASH_FNV_PRIME;
    return h;
}

/* splitmix64's finalizer: a bijection that spreads every input bit over the output. */
static inline uint64_t hash_mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

#endif
