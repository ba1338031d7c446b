/* The proxy's backends: prefill and decode endpoints, each with a keep-alive connection pool,
 * load counters for the balancer, health (periodic GET /health probes; ejection after N
 * consecutive failures of probes or requests, re-admission after M good probes) and its own
 * metrics. Endpoints come and go at run time (/instances/add, /instances/remove); a removed
 * one lives on until the requests holding it let go. Loop thread only. */
#ifndef DUET_PX_BACKEND_H
#define DUET_PX_BACKEND_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "net/httpc.h"
#include "px_config.h"
#include "px_metrics.h"
#include "px_policy.h"

typedef enum px_role {
    PX_ROLE_PREFILL = 0,
    PX_ROLE_DECODE,
    PX_ROLE_BACKEND, /* balancer mode: a plain instance answering whole requests */
    PX_ROLE_COUNT
} px_role;

typedef struct px_backends px_backends;
typedef struct px_backend px_backend;

struct px_backend {
    px_target target; /* first: what the policy sees */
    px_role role;
    char name[PX_HOST_MAX + 8]; /* host:port */
    httpc_pool *pool;
    px_backends *set;
    px_backend *next; /* in the set's list of its role */
    int refs;         /* the set's while listed, one per pick */
    bool listed;      /* false once removed */
    bool healthy;     /* eligible for picks */
    unsigned fails;   /* consecutive failures */
    unsigned oks;     /* consecutive good probes while ejected */
    httpc_req *probe; /* in flight */
    int probe_status; /* its HTTP status */
    /* A prefill endpoint that answered a streamed prefill leg cleanly without any
     * kv_transfer_params (vLLM's prefill workers put them in whole answers only): its prefill
     * legs are sent whole from then on. Set by the proxy; a new (re-added) endpoint starts
     * without it. */
    bool no_early_kv;
    /* Metrics. */
    px_hist latency; /* its legs, request sent to answer complete */
    uint64_t ejections, readmissions, failures;
};

typedef struct px_backends_opts {
    unsigned health_interval_ms;
    unsigned health_timeout_ms;
    unsigned eject_after;
    unsigned readmit_after;
    unsigned connect_timeout_ms;
    const char *auth; /* "Bearer ..." sent with probes, or NULL; must outlive the set */
    px_policy_kind policy;
} px_backends_opts;

struct px_backends {
    uv_loop_t *loop;
    px_backends_opts opts;
    px_backend *list[PX_ROLE_COUNT];
    px_policy *policy[PX_ROLE_COUNT]; /* one per role: round-robin cursors stay apart */
    uv_timer_t probe_timer;
    px_target **cands; /* scratch for picks */
    size_t cands_cap;
    bool closed;
    void (*on_closed)(px_backends *s);
};

const char *px_role_name(px_role r);
duet_status px_role_parse(const char *s, px_role *role_p); /* "prefill", "decode" */

/* Starts the probe timer. */
duet_status px_backends_init(px_backends *s, uv_loop_t *loop, const px_backends_opts *opts);
/* Removes every backend and cancels probes; picks fail from here on, releases still work.
 * Backends still held by requests are freed at their last release. on_closed (may be NULL)
 * runs from the loop once s's timer is closed: s may be freed from there. */
void px_backends_close(px_backends *s, void (*on_closed)(px_backends *s));
/* Frees the rest, once the loop has run the timer's close callback and nothing is held. */
void px_backends_cleanup(px_backends *s);

/* Adds an endpoint (healthy at once, or only after readmit_after good probes, probed now).
 * DUET_ERR_BUSY when it is already listed in that role. */
duet_status px_backends_add(px_backends *s, px_role role, const px_endpoint *ep, bool healthy);
/* DUET_ERR_NOT_FOUND when no such endpoint is listed. */
duet_status px_backends_remove(px_backends *s, px_role role, const char *name);

/* A healthy endpoint of role for load units, preferring ones not in avoid[0..n_avoid); charged
 * and referenced until px_backends_release. NULL when none is healthy. */
px_backend *px_backends_pick(px_backends *s, px_role role, uint64_t load, px_backend *const *avoid,
                             size_t n_avoid);
void px_backends_release(px_backends *s, px_backend *b, uint64_t load);
/* A reference without a charge, for a request that must report on b later (NULL: nothing);
 * px_backend_unref lets it go (freeing a removed backend at the last one). */
void px_backend_ref(px_backend *b);
void px_backend_unref(px_backend *b);

/* A request's outcome on b, for health: failures count toward ejection like failed probes. */
void px_backend_report(px_backend *b, bool ok);

size_t px_backends_count(const px_backends *s, px_role role, bool healthy_only);

#endif
