/* duet's sequential random generator: xoshiro256** (Blackman and Vigna), seeded through the
 * splitmix64 finalizer of hash.h so that any 64-bit seed, 0 included, gives a good state. One
 * state per user (a request's sampler, a proxy policy, the id source): no locks inside.
 * The other generator of the project, philox.h, is counter-based and exists because draws must
 * match between host and GPU code; everything that only needs a stream uses this one.
 * Header-only. Not for secrets (kv_wire.c takes nonces from the OS). */
#ifndef DUET_RNG_H
#define DUET_RNG_H

#include <stdint.h>

#include "base/hash.h"

typedef struct rng_state {
    uint64_t s[4];
} rng_state;

static inline void rng_seed(rng_state *r, uint64_t seed) {
    for (int i = 0; i < 4; i++) {
        seed += 0x9e3779b97f4a7c15ull;
        r->s[i] = hash_mix64(seed);
    }
}

static inline uint64_t rng_rotl(uint64_t x, int k) {
    return (x << k) | (x >> (64 - k));
}

static inline uint64_t rng_next(rng_state *r) {
    uint64_t *s = r->s;
    uint64_t result = rng_rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rng_rotl(s[3], 45);
    return result;
}

/* Uniform in [0, 1), 53 bits. */
static inline double rng_uniform(rng_state *r) {
    return (double)(rng_next(r) >> 11) * 0x1.0p-53;
}

#endif
