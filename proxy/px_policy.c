/* The three policies behind px_policy_ops. Least-load breaks ties by fewer active picks, then
 * by rotating its start, so equal backends share a burst instead of the first one taking it. */
#include "px_policy.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/rng.h"

typedef struct rr_policy {
    px_policy base;
    size_t next;
} rr_policy;

typedef struct ll_policy {
    px_policy base;
    size_t rotate;
} ll_policy;

typedef struct p2_policy {
    px_policy base;
    rng_state rng;
} p2_policy;

/* Lower load wins; equal loads, fewer active picks. */
static bool lighter(const px_target *a, const px_target *b) {
    return a->load < b->load || (a->load == b->load && a->active < b->active);
}

static size_t rr_select(px_policy *p, px_target *const *cands, size_t n, uint64_t load) {
    rr_policy *rr = (rr_policy *)p;
    (void)cands;
    (void)load;
    return rr->next++ % n;
}

static size_t ll_select(px_policy *p, px_target *const *cands, size_t n, uint64_t load) {
    ll_policy *ll = (ll_policy *)p;
    (void)load;
    size_t start = ll->rotate++ % n, best = start;
    for (size_t k = 1; k < n; k++) {
        size_t i = (start + k) % n;
        if (lighter(cands[i], cands[best])) best = i;
    }
    return best;
}

static size_t p2_select(px_policy *p, px_target *const *cands, size_t n, uint64_t load) {
    p2_policy *p2 = (p2_policy *)p;
    (void)load;
    if (n == 1) return 0;
    size_t a = (size_t)(rng_next(&p2->rng) % n);
    size_t b = (size_t)(rng_next(&p2->rng) % (n - 1));
    if (b >= a) b++; /* two distinct candidates */
    return lighter(cands[b], cands[a]) ? b : a;
}

static void policy_free(px_policy *p) {
    free(p);
}

static const px_policy_ops g_rr_ops = {"round-robin", rr_select, NULL, policy_free};
static const px_policy_ops g_ll_ops = {"least-load", ll_select, NULL, policy_free};
static const px_policy_ops g_p2_ops = {"power-of-two", p2_select, NULL, policy_free};

static const px_policy_ops *const g_ops[] = {
    [PX_POLICY_LEAST_LOAD] = &g_ll_ops,
    [PX_POLICY_ROUND_ROBIN] = &g_rr_ops,
    [PX_POLICY_POWER_OF_TWO] = &g_p2_ops,
};

duet_status px_policy_parse(const char *name, px_policy_kind *kind_p) {
    for (size_t k = 0; k < sizeof g_ops / sizeof g_ops[0]; k++)
        if (name && !strcmp(name, g_ops[k]->name)) {
            *kind_p = (px_policy_kind)k;
            return DUET_OK;
        }
    return DUET_ERR_INVALID;
}

const char *px_policy_kind_name(px_policy_kind kind) {
    return (size_t)kind < sizeof g_ops / sizeof g_ops[0] ? g_ops[kind]->name : "unknown";
}

duet_status px_policy_create(px_policy_kind kind, uint64_t seed, px_policy **policy_p) {
    px_policy *p = NULL;
    switch (kind) {
    case PX_POLICY_ROUND_ROBIN:
        p = calloc(1, sizeof(rr_policy));
        break;
    case PX_POLICY_LEAST_LOAD:
        p = calloc(1, sizeof(ll_policy));
        break;
    case PX_POLICY_POWER_OF_TWO: {
        p2_policy *p2 = calloc(1, sizeof *p2);
        if (p2) rng_seed(&p2->rng, seed);
        p = p2 ? &p2->base : NULL;
        break;
    }
    default:
        return DUET_ERR_INVALID;
    }
    if (!p) {
        LOG_ERROR("proxy: out of memory creating a policy");
        return DUET_ERR_NO_MEMORY;
    }
    p->ops = g_ops[kind];
    *policy_p = p;
    return DUET_OK;
}

void px_policy_destroy(px_policy *p) {
    if (p) p->ops->destroy(p);
}

px_target *px_policy_pick(px_policy *p, px_target *const *cands, size_t n, uint64_t load) {
    if (n == 0) return NULL;
    size_t i = p->ops->select(p, cands, n, load);
    px_target *t = cands[i < n ? i : 0];
    t->load += load;
    t->active++;
    return t;
}

void px_policy_release(px_policy *p, px_target *t, uint64_t load) {
    if (!t) return;
    t->load -= load <= t->load ? load : t->load;
    if (t->active) t->active--;
    if (p->ops->release) p->ops->release(p, t, load);
}
