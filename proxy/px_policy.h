/* Load-balancing policies of the proxy, each a small vtable like h2o's balancers: round-robin,
 * least outstanding load, power-of-two choices. A policy only chooses; the wrapper charges and
 * releases the load on the chosen target. Which targets are eligible (healthy, not yet tried)
 * is the caller's business. Threads: the proxy's loop thread. */
#ifndef DUET_PX_POLICY_H
#define DUET_PX_POLICY_H

#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

/* One candidate as a policy sees it; embedded in the proxy's backend objects. */
typedef struct px_target {
    uint64_t load;   /* load units charged by px_policy_pick and not yet released */
    unsigned active; /* picks not yet released */
} px_target;

typedef struct px_policy px_policy;

typedef struct px_policy_ops {
    const char *name;
    /* Index in cands[0..n) (n >= 1) of the target for a request of `load` units. */
    size_t (*select)(px_policy *p, px_target *const *cands, size_t n, uint64_t load);
    /* A pick of t with `load` units is over, after the wrapper uncharged it. May be NULL. */
    void (*release)(px_policy *p, px_target *t, uint64_t load);
    void (*destroy)(px_policy *p);
} px_policy_ops;

struct px_policy {
    const px_policy_ops *ops;
};

typedef enum px_policy_kind {
    PX_POLICY_LEAST_LOAD = 0,
    PX_POLICY_ROUND_ROBIN,
    PX_POLICY_POWER_OF_TWO,
} px_policy_kind;

/* "least-load", "round-robin", "power-of-two"; DUET_ERR_INVALID otherwise. */
duet_status px_policy_parse(const char *name, px_policy_kind *kind_p);
const char *px_policy_kind_name(px_policy_kind kind);

/* seed drives power-of-two's random choices (tests pass a fixed one). */
duet_status px_policy_create(px_policy_kind kind, uint64_t seed, px_policy **policy_p);
void px_policy_destroy(px_policy *p); /* accepts NULL */

/* Chooses among cands (n >= 1), charges load to it and returns it. NULL when n == 0. */
px_target *px_policy_pick(px_policy *p, px_target *const *cands, size_t n, uint64_t load);
/* Uncharges a pick made by px_policy_pick. */
void px_policy_release(px_policy *p, px_target *t, uint64_t load);

#endif
