/* Backends, health and picks; see px_backend.h. Health is one counter pair per backend:
 * failures in a row (requests or probes) eject it, good probes in a row bring it back. Probes
 * keep running for healthy backends too, so a backend that dies while idle is ejected before a
 * client request finds out. */
#include "px_backend.h"

#include <stdlib.h>
#include <string.h>

#include "base/log.h"

static const char *const g_roles[PX_ROLE_COUNT] = {"prefill", "decode", "backend"};

const char *px_role_name(px_role r) {
    return (unsigned)r < PX_ROLE_COUNT ? g_roles[r] : "unknown";
}

duet_status px_role_parse(const char *s, px_role *role_p) {
    for (int r = 0; r < PX_ROLE_COUNT; r++)
        if (s && !strcmp(s, g_roles[r])) {
            *role_p = (px_role)r;
            return DUET_OK;
        }
    return DUET_ERR_INVALID;
}

static void backend_unref(px_backend *b) {
    if (--b->refs > 0) return;
    httpc_pool_destroy(b->pool);
    free(b);
}

static void eject(px_backend *b, const char *why) {
    if (!b->healthy) return;
    b->healthy = false;
    b->oks = 0;
    b->ejections++;
    LOG_WARN("proxy: %s %s ejected after %u consecutive failures (last: %s)", px_role_name(b->role),
             b->name, b->fails, why);
}

static void count_failure(px_backend *b, const char *why) {
    /* a restarted backend may have come back at another address (a Kubernetes pod) */
    httpc_pool_refresh(b->pool);
    b->fails++;
    b->oks = 0;
    if (b->healthy && b->fails >= b->set->opts.eject_after) eject(b, why);
}

void px_backend_report(px_backend *b, bool ok) {
    if (!b) return;
    if (ok) {
        if (b->healthy) b->fails = 0;
        return;
    }
    b->failures++;
    count_failure(b, "request failed");
}

static void probe_result(px_backend *b, bool ok, const char *why) {
    if (!ok) {
        count_failure(b, why);
        return;
    }
    b->fails = 0;
    if (b->healthy || !b->listed) return;
    if (++b->oks >= b->set->opts.readmit_after) {
        b->healthy = true;
        b->readmissions++;
        LOG_INFO("proxy: %s %s admitted after %u good health probes", px_role_name(b->role),
                 b->name, b->oks);
    }
}

static void probe_on_head(httpc_req *req, const httpc_response *resp, void *arg) {
    (void)req;
    ((px_backend *)arg)->probe_status = resp->status;
}

static void probe_on_end(httpc_req *req, duet_status st, void *arg) {
    px_backend *b = arg;
    b->probe = NULL;
    char why[160];
    if (st)
        snprintf(why, sizeof why, "health probe: %s", httpc_req_reason(req));
    else
        snprintf(why, sizeof why, "health probe: HTTP %d", b->probe_status);
    probe_result(b, st == DUET_OK && b->probe_status == 200, why);
    backend_unref(b);
}

static void probe_send(px_backend *b) {
    if (b->probe || !b->listed) return;
    const px_backends_opts *o = &b->set->opts;
    http_header hs[] = {{"Authorization", o->auth}, {NULL, NULL}};
    httpc_request rq = {.method = "GET",
                        .path = "/health",
                        .headers = o->auth ? hs : NULL,
                        .first_byte_timeout_ms = o->health_timeout_ms,
                        .idle_timeout_ms = o->health_timeout_ms};
    static const httpc_callbacks cb = {probe_on_head, NULL, probe_on_end};
    b->probe_status = 0;
    if (httpc_send(b->pool, &rq, &cb, b, &b->probe)) {
        b->probe = NULL; /* the next round tries again */
        return;
    }
    b->refs++;
}

static void on_probe_timer(uv_timer_t *t) {
    px_backends *s = t->data;
    for (int r = 0; r < PX_ROLE_COUNT; r++)
        for (px_backend *b = s->list[r]; b; b = b->next) probe_send(b);
}

duet_status px_backends_init(px_backends *s, uv_loop_t *loop, const px_backends_opts *opts) {
    memset(s, 0, sizeof *s);
    s->loop = loop;
    s->opts = *opts;
    for (int r = 0; r < PX_ROLE_COUNT; r++) {
        duet_status st =
            px_policy_create(opts->policy, (uint64_t)uv_hrtime() + (uint64_t)r, &s->policy[r]);
        if (st) {
            for (int k = 0; k < r; k++) px_policy_destroy(s->policy[k]);
            return st;
        }
    }
    uv_timer_init(loop, &s->probe_timer);
    s->probe_timer.data = s;
    uv_timer_start(&s->probe_timer, on_probe_timer, opts->health_interval_ms,
                   opts->health_interval_ms);
    return DUET_OK;
}

static px_backend *find(px_backends *s, px_role role, const char *name) {
    for (px_backend *b = s->list[role]; b; b = b->next)
        if (!strcmp(b->name, name)) return b;
    return NULL;
}

duet_status px_backends_add(px_backends *s, px_role role, const px_endpoint *ep, bool healthy) {
    char name[PX_HOST_MAX + 8];
    px_endpoint_format(ep, name, sizeof name);
    if (find(s, role, name)) return DUET_ERR_BUSY;
    size_t total = 1;
    for (int r = 0; r < PX_ROLE_COUNT; r++)
        for (px_backend *b = s->list[r]; b; b = b->next) total++;
    if (total > s->cands_cap) {
        px_target **nc = realloc(s->cands, total * 2 * sizeof *nc);
        if (!nc) return DUET_ERR_NO_MEMORY;
        s->cands = nc;
        s->cands_cap = total * 2;
    }
    px_backend *b = calloc(1, sizeof *b);
    if (!b) return DUET_ERR_NO_MEMORY;
    httpc_pool_opts po;
    httpc_pool_opts_init(&po);
    po.connect_timeout_ms = s->opts.connect_timeout_ms;
    duet_status st = httpc_pool_create(s->loop, ep->host, ep->port, &po, &b->pool);
    if (st) {
        free(b);
        return st;
    }
    snprintf(b->name, sizeof b->name, "%s", name);
    b->role = role;
    b->set = s;
    b->refs = 1;
    b->listed = true;
    b->healthy = healthy;
    /* Appended: listing order is the order given, which round-robin follows. */
    px_backend **tail = &s->list[role];
    while (*tail) tail = &(*tail)->next;
    *tail = b;
    LOG_INFO("proxy: %s %s added%s", px_role_name(role), name,
             healthy ? "" : ", admitted once its health probes pass");
    if (!healthy) probe_send(b);
    return DUET_OK;
}

static void unlist(px_backends *s, px_backend *b) {
    px_backend **pp = &s->list[b->role];
    while (*pp && *pp != b) pp = &(*pp)->next;
    if (*pp) *pp = b->next;
    b->next = NULL;
    b->listed = false;
    b->healthy = false;
    if (b->probe) {
        httpc_cancel(b->probe); /* no on_end: drop its reference here */
        b->probe = NULL;
        b->refs--;
    }
    backend_unref(b);
}

duet_status px_backends_remove(px_backends *s, px_role role, const char *name) {
    px_backend *b = find(s, role, name);
    if (!b) return DUET_ERR_NOT_FOUND;
    LOG_INFO("proxy: %s %s removed (%u requests still on it finish)", px_role_name(role), name,
             b->target.active);
    unlist(s, b);
    return DUET_OK;
}

static bool avoided(const px_backend *b, px_backend *const *avoid, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (avoid[i] == b) return true;
    return false;
}

px_backend *px_backends_pick(px_backends *s, px_role role, uint64_t load, px_backend *const *avoid,
                             size_t n_avoid) {
    if (s->closed) return NULL;
    size_t n = 0;
    for (px_backend *b = s->list[role]; b; b = b->next)
        if (b->healthy && !avoided(b, avoid, n_avoid)) s->cands[n++] = &b->target;
    if (n == 0) /* every healthy one was tried: try them again rather than give up */
        for (px_backend *b = s->list[role]; b; b = b->next)
            if (b->healthy) s->cands[n++] = &b->target;
    px_backend *b = (px_backend *)px_policy_pick(s->policy[role], s->cands, n, load);
    if (b) b->refs++;
    return b;
}

void px_backends_release(px_backends *s, px_backend *b, uint64_t load) {
    if (!b) return;
    px_policy_release(s->policy[b->role], &b->target, load);
    backend_unref(b);
}

void px_backend_ref(px_backend *b) {
    if (b) b->refs++;
}

void px_backend_unref(px_backend *b) {
    if (b) backend_unref(b);
}

size_t px_backends_count(const px_backends *s, px_role role, bool healthy_only) {
    size_t n = 0;
    for (const px_backend *b = s->list[role]; b; b = b->next)
        if (!healthy_only || b->healthy) n++;
    return n;
}

static void on_probe_timer_closed(uv_handle_t *h) {
    px_backends *s = h->data;
    if (s->on_closed) s->on_closed(s);
}

void px_backends_close(px_backends *s, void (*on_closed)(px_backends *s)) {
    if (s->closed) return;
    s->closed = true;
    s->on_closed = on_closed;
    for (int r = 0; r < PX_ROLE_COUNT; r++)
        while (s->list[r]) unlist(s, s->list[r]);
    uv_close((uv_handle_t *)&s->probe_timer, on_probe_timer_closed);
}

void px_backends_cleanup(px_backends *s) {
    for (int r = 0; r < PX_ROLE_COUNT; r++) {
        px_policy_destroy(s->policy[r]);
        s->policy[r] = NULL;
    }
    free(s->cands);
    s->cands = NULL;
}
