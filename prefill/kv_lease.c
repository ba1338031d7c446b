/* The prefill side of KV transfer; see kv_lease.h. Everything below the hooks runs on the
 * transfer thread of transport/kv_link.h, which owns the listener, the connections and the
 * pins; leases themselves are the engine's (eng_lease_pin, eng_lease_release). */
#include "kv_lease.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/clock.h"
#include "base/log.h"
#include "kv_link.h"

/* a staged pin whose reader vanished keeps its slots this long: the reads may still run */
#define KVLEASE_ORPHAN_S 30.0

/* A streamed pin: the reader learns through Ready messages how far it may read. Two things
 * hold a pin back, either or both: its prompt is still being computed (the lease was pinned
 * before its request finished: the engine's progress is polled), and, staged, the
 * device->host copies into the slots the reader reads, queued chunk by chunk as blocks are
 * computed, so the reader's reads of the first chunks overlap the copies of later ones and
 * the prefill of the rest. */
typedef struct kvlease_pin {
    uint64_t lease, seq;
    int32_t *slots;  /* staged: the copy's slots, [n]; NULL: the reader reads the lease's blocks */
    int32_t *blocks; /* staged: the lease's blocks, [n] (where the copies come from) */
    int n;
    int computed;        /* blocks [0, computed) hold their whole KV (n once the prompt is done) */
    int partial, layers; /* read in place: blocks [computed, partial) hold `layers` layers */
    int partial_sent, layers_sent;
    int queued;     /* staged: blocks [0, queued) have their copies queued */
    void **tickets; /* [n_tickets] device->host copies in flight, in order */
    int *ends;      /* [n_tickets] blocks [0, ends[k]) are copied once ticket k is done */
    int n_tickets, next_ticket;
    int ready_sent;  /* the last ready count sent; -1: the stream ended in an error */
    double deadline; /* when orphaned (its reader's connection closed) */
    struct kvlease_pin *next;
} kvlease_pin;

typedef struct kvlease kvlease;

typedef struct kvlease_conn { /* one decode worker connected to us */
    kvlease *x;
    uv_tcp_t tcp;
    kvw_reader rd;
    uint8_t nonce_s[KVW_NONCE_LEN];
    uint32_t version; /* the reader's protocol version */
    bool authed, closing;
    kvlease_pin *pins;
    struct kvlease_conn *next;
} kvlease_conn;

struct kvlease {
    kvl_options common;
    int kv_port; /* 0: http port + 1000 */
    const char *opt_host;
    char advertise_host[SRV_KV_HOST_MAX];
    kvl_link *link;
    int tp_size;

    uv_tcp_t listener;
    kvlease_conn *conns;
    kvlease_pin *orphans;

    kvlease_stats stats;
    pthread_mutex_t stats_mu;
};

static void count(kvlease *x, uint64_t *field) {
    pthread_mutex_lock(&x->stats_mu);
    (*field)++;
    pthread_mutex_unlock(&x->stats_mu);
}

/* Waits for the pin's copies still in flight (they write its slots); the first error. */
static duet_status pin_drain(kvlease *x, kvlease_pin *p) {
    duet_status first = DUET_OK;
    for (; p->next_ticket < p->n_tickets; p->next_ticket++) {
        duet_status st = kvl_copy_poll(x->link, p->tickets[p->next_ticket], true);
        p->tickets[p->next_ticket] = NULL;
        if (first == DUET_OK) first = st;
    }
    return first;
}

static void pins_free(kvlease *x, kvlease_pin *p) {
    while (p) {
        kvlease_pin *n = p->next;
        pin_drain(x, p);
        free(p->tickets);
        free(p->ends);
        if (p->slots) kvl_stage_free(x->link, p->slots, p->n);
        free(p->slots);
        free(p->blocks);
        free(p);
        p = n;
    }
}

/* ---- connections from decode workers ---- */

static void conn_closed(uv_handle_t *h) {
    kvlease_conn *c = h->data;
    kvw_reader_cleanup(&c->rd);
    free(c);
}

static void conn_close(kvlease_conn *c) {
    if (c->closing) return;
    c->closing = true;
    kvlease *x = c->x;
    for (kvlease_conn **l = &x->conns; *l; l = &(*l)->next)
        if (*l == c) {
            *l = c->next;
            break;
        }
    /* leases it pinned stay until released or expired: it may still be reading them; so do
     * the staging slots it reads, for a while */
    while (c->pins) {
        kvlease_pin *p = c->pins;
        c->pins = p->next;
        p->deadline = clock_now_s() + KVLEASE_ORPHAN_S;
        p->next = x->orphans;
        x->orphans = p;
    }
    uv_close((uv_handle_t *)&c->tcp, conn_closed);
}

static void conn_refuse(kvlease_conn *c, const char *reason) {
    Duet__Kv__Refuse r = DUET__KV__REFUSE__INIT;
    r.reason = (char *)reason;
    Duet__Kv__Envelope env = DUET__KV__ENVELOPE__INIT;
    env.msg_case = DUET__KV__ENVELOPE__MSG_REFUSE;
    env.refuse = &r;
    kvl_send(&c->tcp, &env);
    count(c->x, &c->x->stats.peers_refused);
    conn_close(c);
}

static void conn_auth(kvlease_conn *c, const Duet__Kv__Auth *a) {
    kvlease *x = c->x;
    kvl_link *l = x->link;
    const char *secret = kvl_secret(l);
    char why[256];
    if (a->nonce.len != KVW_NONCE_LEN ||
        !kvw_mac_ok(secret, "duet-kv-c", c->nonce_s, KVW_NONCE_LEN, a->nonce.data, KVW_NONCE_LEN,
                    a->mac.data, a->mac.len)) {
        LOG_WARN("kv: refused a decode worker that failed authentication");
        conn_refuse(c, "authentication failed (wrong --kv-secret?)");
        return;
    }
    if (!a->pool || !kvw_pools_compatible(a->pool, kvl_pool(l), why, sizeof why)) {
        LOG_WARN("kv: refused a decode worker: %s", a->pool ? why : "no pool description");
        conn_refuse(c, a->pool ? why : "no KV pool description");
        return;
    }
    c->version = a->version ? a->version : 1;
    uint8_t mac[KVW_MAC_LEN];
    kvw_mac(secret, "duet-kv-s", a->nonce.data, KVW_NONCE_LEN, c->nonce_s, KVW_NONCE_LEN, mac);
    const void *addr, *rkey;
    size_t addr_len, rkey_len;
    kvu_address(kvl_ucx(l), &addr, &addr_len);
    kvu_region_rkey(kvl_region(l), &rkey, &rkey_len);
    Duet__Kv__Welcome w = DUET__KV__WELCOME__INIT;
    Duet__Kv__PoolInfo served = *kvl_pool(l);
    served.n_blocks = (uint32_t)kvl_n_slots(l); /* what reads address */
    w.mac.data = mac;
    w.mac.len = KVW_MAC_LEN;
    w.pool = &served;
    w.ucx_address.data = (uint8_t *)addr;
    w.ucx_address.len = addr_len;
    w.rkey.data = (uint8_t *)rkey;
    w.rkey.len = rkey_len;
    w.base_addr = (uint64_t)(uintptr_t)kvl_base(l);
    w.engine_id = (char *)kvl_engine_id(l);
    const void *ipc;
    size_t ipc_len;
    kvl_ipc_handle(l, &ipc, &ipc_len);
    if (c->version >= 2 && ipc_len) { /* same-host readers may map the cache itself */
        w.cuda_ipc.data = (uint8_t *)ipc;
        w.cuda_ipc.len = ipc_len;
        w.boot_id = (char *)kvl_boot_id(l);
        w.ipc_blocks = kvl_pool(l)->n_blocks;
    }
    Duet__Kv__Envelope out = DUET__KV__ENVELOPE__INIT;
    out.msg_case = DUET__KV__ENVELOPE__MSG_WELCOME;
    out.welcome = &w;
    c->authed = true;
    if (kvl_send(&c->tcp, &out) != DUET_OK) conn_close(c);
}

/* Queues the device->host copies of a staged streamed pin's computed blocks not queued yet,
 * chunk by chunk (a chunk's runs of consecutive slots are one copy each; a chunk waits until
 * all its blocks are computed). On an error what was queued is waited for. */
static duet_status pin_queue_copies(kvlease *x, kvlease_pin *pin) {
    kvl_link *l = x->link;
    int n = pin->n, chunk = kvl_chunk_blocks(l);
    if (!pin->tickets) {
        pin->tickets = calloc((size_t)(n ? n : 1), sizeof(void *));
        pin->ends = calloc((size_t)(n ? n : 1), sizeof(int));
        if (!pin->tickets || !pin->ends) return DUET_ERR_NO_MEMORY;
    }
    while (pin->queued < n) {
        int c0 = pin->queued, c1 = c0 + chunk < n ? c0 + chunk : n;
        if (c1 > pin->computed) break;
        for (int i = c0; i < c1;) {
            int k = i + 1;
            while (k < c1 && pin->slots[k] == pin->slots[k - 1] + 1) k++;
            void *t = NULL;
            duet_status st =
                kvl_stage_copy_start(l, pin->blocks + i, pin->slots[i], k - i, true, &t);
            if (st != DUET_OK) {
                pin_drain(x, pin);
                return st;
            }
            pin->tickets[pin->n_tickets] = t;
            pin->ends[pin->n_tickets++] = k;
            i = k;
        }
        pin->queued = c1;
    }
    return DUET_OK;
}

static void send_ready(kvlease_conn *c, uint64_t seq, int ready, int partial, int layers,
                       const char *error) {
    Duet__Kv__Ready r = DUET__KV__READY__INIT;
    r.seq = seq;
    r.ok = error == NULL;
    r.ready = (uint32_t)ready;
    r.partial = (uint32_t)(layers > 0 && partial > ready ? partial : ready);
    r.layers = (uint32_t)(layers > 0 && partial > ready ? layers : 0);
    r.error = (char *)error;
    Duet__Kv__Envelope out = DUET__KV__ENVELOPE__INIT;
    out.msg_case = DUET__KV__ENVELOPE__MSG_READY;
    out.ready = &r;
    if (kvl_send(&c->tcp, &out) != DUET_OK) conn_close(c);
}

/* Ends a pin's stream with an error: the reader fails its pull and releases the lease. */
static void pin_stream_fail(kvlease_conn *c, kvlease_pin *pin, const char *why) {
    pin_drain(c->x, pin);
    LOG_WARN("kv: lease %llu: %s", (unsigned long long)pin->lease, why);
    pin->ready_sent = -1; /* no further Ready for this pin */
    send_ready(c, pin->seq, 0, 0, 0, why);
}

/* A pin of a prompt still being computed: the engine's progress, and (staged) the copies
 * it allows. False when the stream ended in an error. */
static bool pin_compute_progress(kvlease_conn *c, kvlease_pin *pin) {
    kvlease *x = c->x;
    eng_lease_ready rd;
    duet_status st = eng_lease_progress(kvl_context(x->link)->engine, pin->lease, &rd);
    if (st != DUET_OK) {
        pin_stream_fail(c, pin,
                        st == DUET_ERR_CANCELED
                            ? "the prefill of this prompt failed or was aborted"
                            : "the lease is gone (expired or released) while being read");
        return false;
    }
    int ready = rd.ready < pin->n ? rd.ready : pin->n;
    pin->partial = rd.partial < pin->n ? rd.partial : pin->n;
    pin->layers = rd.layers;
    if (ready <= pin->computed) return true;
    pin->computed = ready;
    if (pin->slots && pin_queue_copies(x, pin) != DUET_OK) {
        pin_stream_fail(c, pin, "copying the KV to the staging area failed");
        return false;
    }
    return true;
}

/* Finished copies of a streamed pin, and the prompt's progress while it is being computed,
 * raise its ready count; the reader hears of each rise. A failed copy or prefill ends the
 * stream with an error (the reader fails its pull and releases). Returns whether copies are
 * still in flight (a prompt being computed is polled every tick, not spun on). */
static bool pin_progress(kvlease_conn *c, kvlease_pin *pin) {
    kvlease *x = c->x;
    if (pin->ready_sent < 0) return false;
    if (pin->computed < pin->n && !pin_compute_progress(c, pin)) return false;
    if (!pin->slots) { /* the reader reads the lease's own blocks: computed is ready */
        bool more_layers = pin->computed < pin->n && pin->partial > pin->computed &&
                           (pin->partial != pin->partial_sent || pin->layers > pin->layers_sent);
        if (pin->computed > pin->ready_sent || more_layers) {
            pin->ready_sent = pin->computed;
            pin->partial_sent = pin->partial;
            pin->layers_sent = pin->layers;
            send_ready(c, pin->seq, pin->computed, pin->partial, pin->layers, NULL);
        }
        return false;
    }
    int ready = pin->ready_sent;
    while (pin->next_ticket < pin->n_tickets) {
        duet_status st = kvl_copy_poll(x->link, pin->tickets[pin->next_ticket], false);
        if (st == DUET_ERR_BUSY) break;
        pin->tickets[pin->next_ticket] = NULL;
        if (st != DUET_OK) {
            pin->next_ticket++;
            char why[160];
            snprintf(why, sizeof why, "copying the KV to the staging area failed: %s",
                     duet_strerror(st));
            pin_stream_fail(c, pin, why);
            return false;
        }
        ready = pin->ends[pin->next_ticket++];
    }
    if (pin->ready_sent >= 0 && ready > pin->ready_sent) {
        pin->ready_sent = ready;
        send_ready(c, pin->seq, ready, 0, 0, NULL);
    }
    return pin->next_ticket < pin->n_tickets;
}

/* Pins a lease for this reader: its block ids (or, staged, a copy's slots) in the reply. A
 * streamed reply (version 2 on: staged copies; version 3 on: also a prompt still being
 * computed) is followed by Ready messages; an older reader pinning a prompt still being
 * computed is told to pin again later (busy). */
static void conn_pin(kvlease_conn *c, const Duet__Kv__Pin *pin_msg) {
    kvlease *x = c->x;
    kvl_link *l = x->link;
    const srv_kv_context *ctx = kvl_context(l);
    Duet__Kv__PinReply r = DUET__KV__PIN_REPLY__INIT;
    r.seq = pin_msg->seq;
    int cap = ctx->kv->n_blocks, n = 0, computed = 0;
    eng_lease_ready rd = {0, 0, 0};
    int32_t *blocks = malloc((size_t)cap * sizeof(int32_t));
    uint32_t *ids = malloc((size_t)cap * sizeof(uint32_t));
    kvlease_pin *pin = NULL;
    duet_status st = blocks && ids
                         ? eng_lease_pin(ctx->engine, pin_msg->lease, blocks, cap, &n, &rd)
                         : DUET_ERR_NO_MEMORY;
    computed = rd.ready;
    const void *ipc;
    size_t ipc_len;
    kvl_ipc_handle(l, &ipc, &ipc_len);
    bool pool_ids = pin_msg->pool_ids && ipc_len > 0; /* the reader maps the cache (CUDA IPC) */
    bool staged = kvl_staged(l) && !pool_ids;
    bool computing = st == DUET_OK && computed < n;
    /* what this reader can follow: Ready for copies from version 2, for a prefill from 3 */
    bool streamed = st == DUET_OK && (computing ? c->version >= 3 : staged && c->version >= 2);
    if (computing && !streamed) st = DUET_ERR_BUSY;
    if (st == DUET_OK && (streamed || staged)) {
        pin = calloc(1, sizeof *pin);
        if (!pin) st = DUET_ERR_NO_MEMORY;
    }
    if (pin) {
        pin->lease = pin_msg->lease;
        pin->seq = pin_msg->seq;
        pin->n = n;
        pin->computed = computed;
    }
    if (pin && staged) {
        /* serve a copy in the staging area: UCX cannot read the cache itself */
        pin->slots = malloc((size_t)(n ? n : 1) * sizeof(int32_t));
        pin->blocks = malloc((size_t)(n ? n : 1) * sizeof(int32_t));
        int rc = pin->slots && pin->blocks ? kvl_stage_alloc(l, n, pin->slots) : -3;
        if (rc == 0) {
            memcpy(pin->blocks, blocks, (size_t)n * sizeof(int32_t));
            st = streamed ? pin_queue_copies(x, pin)
                          : kvl_stage_copy(l, blocks, pin->slots, n, true);
            if (st != DUET_OK)
                kvl_stage_free(l, pin->slots, n);
            else
                memcpy(blocks, pin->slots, (size_t)n * sizeof(int32_t)); /* where to read */
        } else {
            st = rc == -1 ? DUET_ERR_BUSY : rc == -2 ? DUET_ERR_TOO_LONG : DUET_ERR_NO_MEMORY;
        }
        if (st != DUET_OK) {
            free(pin->slots);
            pin->slots = NULL;
        }
    }
    if (pin && st != DUET_OK) {
        free(pin->tickets);
        free(pin->ends);
        free(pin->blocks);
        free(pin);
        pin = NULL;
    }
    if (pin) {
        pin->next = c->pins;
        c->pins = pin;
    }
    if (st == DUET_OK) {
        for (int i = 0; i < n; i++) ids[i] = (uint32_t)blocks[i];
        r.ok = true;
        r.block_ids = ids;
        r.n_block_ids = (size_t)n;
        r.streamed = streamed;
        /* streamed: Ready messages follow; a direct read of a prompt being computed may start
         * on the blocks computed so far */
        r.ready = streamed && !staged ? (uint32_t)computed : 0;
        if (pin && streamed && !staged) {
            pin->ready_sent = computed;
            if (rd.layers > 0 && rd.partial > computed) { /* the chunk under way, so far */
                pin->partial = pin->partial_sent = rd.partial < n ? rd.partial : n;
                pin->layers = pin->layers_sent = rd.layers;
                r.partial = (uint32_t)pin->partial;
                r.layers = (uint32_t)rd.layers;
            }
        }
    } else {
        r.ok = false;
        r.busy = st == DUET_ERR_BUSY;
        r.error = st == DUET_ERR_NOT_FOUND  ? "the lease is gone (expired or released)"
                  : st == DUET_ERR_CANCELED ? "the prefill of this prompt failed or was aborted"
                  : st == DUET_ERR_BUSY ? (computing ? "busy: the prompt is still being computed"
                                                     : "busy: the staging area is full")
                  : st == DUET_ERR_TOO_LONG
                      ? "the lease is larger than the prefill's staging area (--kv-staging-bytes)"
                      : "cannot pin the lease";
    }
    if (!r.busy) count(x, r.ok ? &x->stats.pins_served : &x->stats.pins_refused);
    if (r.ok && computing) count(x, &x->stats.pins_computing);
    Duet__Kv__Envelope out = DUET__KV__ENVELOPE__INIT;
    out.msg_case = DUET__KV__ENVELOPE__MSG_PIN_REPLY;
    out.pin_reply = &r;
    bool sent = kvl_send(&c->tcp, &out) == DUET_OK;
    if (!sent) conn_close(c);
    free(blocks);
    free(ids);
    if (sent && pin && streamed) {
        pin_progress(c, pin); /* copies already over (host caches) are announced now */
        kvl_ucx_heat(l);      /* the rest are polled by role_progress */
    }
}

static void conn_got(kvlease_conn *c, Duet__Kv__Envelope *env) {
    kvlease *x = c->x;
    if (env->msg_case == DUET__KV__ENVELOPE__MSG_AUTH && !c->authed) {
        conn_auth(c, env->auth);
        return;
    }
    if (!c->authed) {
        conn_refuse(c, "authenticate first");
        return;
    }
    if (env->msg_case == DUET__KV__ENVELOPE__MSG_PIN) {
        conn_pin(c, env->pin);
        return;
    }
    if (env->msg_case == DUET__KV__ENVELOPE__MSG_RELEASE) {
        for (kvlease_pin **l = &c->pins; *l; l = &(*l)->next) {
            if ((*l)->lease != env->release->lease) continue;
            kvlease_pin *p = *l;
            *l = p->next;
            p->next = NULL;
            pins_free(x, p);
            break;
        }
        eng_lease_release(kvl_context(x->link)->engine, env->release->lease);
        return;
    }
    conn_refuse(c, "unexpected message");
}

static void conn_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
    kvlease_conn *c = s->data;
    if (n > 0 && !c->closing) {
        if (kvw_reader_feed(&c->rd, buf->base, (size_t)n) != DUET_OK) {
            conn_close(c);
        } else {
            for (;;) {
                Duet__Kv__Envelope *env;
                if (kvw_reader_next(&c->rd, &env) != DUET_OK) {
                    conn_close(c);
                    break;
                }
                if (!env) break;
                conn_got(c, env);
                duet__kv__envelope__free_unpacked(env, NULL);
                if (c->closing) break;
            }
        }
    } else if (n < 0) {
        conn_close(c);
    }
    free(buf->base);
}

static void on_connection(uv_stream_t *server, int status) {
    kvlease *x = server->data;
    if (status != 0) return;
    kvlease_conn *c = calloc(1, sizeof *c);
    if (!c) return;
    c->x = x;
    uv_tcp_init(kvl_loop(x->link), &c->tcp);
    c->tcp.data = c;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0 || kvw_nonce(c->nonce_s) != DUET_OK) {
        uv_close((uv_handle_t *)&c->tcp, conn_closed);
        return;
    }
    c->next = x->conns;
    x->conns = c;
    uv_tcp_nodelay(&c->tcp, 1);
    Duet__Kv__Hello h = DUET__KV__HELLO__INIT;
    h.version = KVW_VERSION;
    h.nonce.data = c->nonce_s;
    h.nonce.len = KVW_NONCE_LEN;
    Duet__Kv__Envelope env = DUET__KV__ENVELOPE__INIT;
    env.msg_case = DUET__KV__ENVELOPE__MSG_HELLO;
    env.hello = &h;
    if (kvl_send(&c->tcp, &env) != DUET_OK) {
        conn_close(c);
        return;
    }
    uv_read_start((uv_stream_t *)&c->tcp, kvl_alloc_cb, conn_read);
}

/* ---- the role's callbacks on the link ---- */

static duet_status role_open(void *arg, kvl_link *l) {
    kvlease *x = arg;
    x->link = l;
    const srv_kv_context *ctx = kvl_context(l);
    struct sockaddr_storage sa;
    const char *bind_host = ctx->host && ctx->host[0] ? ctx->host : "0.0.0.0";
    int rc = uv_ip4_addr(bind_host, x->kv_port, (struct sockaddr_in *)&sa);
    if (rc != 0) rc = uv_ip6_addr(bind_host, x->kv_port, (struct sockaddr_in6 *)&sa);
    if (rc != 0) rc = uv_ip4_addr("0.0.0.0", x->kv_port, (struct sockaddr_in *)&sa);
    uv_tcp_init(kvl_loop(l), &x->listener);
    x->listener.data = x;
    rc = uv_tcp_bind(&x->listener, (const struct sockaddr *)&sa, 0);
    if (rc == 0) rc = uv_listen((uv_stream_t *)&x->listener, 128, on_connection);
    if (rc != 0) {
        LOG_ERROR("kv: cannot listen on the side channel port %d: %s", x->kv_port, uv_strerror(rc));
        return DUET_ERR_IO;
    }
    LOG_INFO("kv: leasing KV blocks to decode workers on %s:%d (engine %s)", x->advertise_host,
             x->kv_port, kvl_engine_id(l));
    return DUET_OK;
}

/* Orphaned pins free their staging slots once their reads can no longer run. */
static void role_tick(void *arg, double now) {
    kvlease *x = arg;
    for (kvlease_pin **l = &x->orphans; *l;) {
        kvlease_pin *o = *l;
        if (now < o->deadline) {
            l = &o->next;
            continue;
        }
        *l = o->next;
        o->next = NULL;
        pins_free(x, o);
    }
}

/* Streamed pins: finished device->host copies and a prompt's progress are announced to their
 * readers (every UCX tick, 1 ms; every loop turn while copies are in flight). */
static bool role_progress(void *arg) {
    kvlease *x = arg;
    bool busy = false;
    for (kvlease_conn *c = x->conns, *next; c; c = next) {
        next = c->next;
        for (kvlease_pin *p = c->pins; p && !c->closing; p = p->next)
            if (p->ready_sent >= 0 && (p->next_ticket < p->n_tickets || p->computed < p->n))
                busy |= pin_progress(c, p);
    }
    return busy;
}

static void role_close(void *arg) {
    kvlease *x = arg;
    while (x->conns) conn_close(x->conns);
    /* copies still in flight end here: after the thread stops the backend may be gone */
    for (kvlease_pin *p = x->orphans; p; p = p->next) pin_drain(x, p);
    uv_close((uv_handle_t *)&x->listener, NULL);
}

/* ---- plug-in hooks ---- */

static duet_status x_add_options(void *state, opt_parser *p) {
    kvlease *x = state;
    const opt_spec specs[] = {
        {.name = "--kv-port",
         .type = OPT_INT,
         .dest = &x->kv_port,
         .min = 1,
         .max = 65535,
         .help = "side channel port of a prefill worker (default: its HTTP port + 1000; DP rank "
                 "r adds r)"},
        {.name = "--kv-host",
         .type = OPT_STRING,
         .dest = &x->opt_host,
         .metavar = "HOST",
         .help = "address decode workers use to reach this prefill worker (default: --host, or "
                 "127.0.0.1)"},
    };
    duet_status st =
        opt_add(p, "KV leases (prefill side)", specs, (int)(sizeof specs / sizeof specs[0]));
    return st == DUET_OK ? kvl_options_add(p, &x->common) : st;
}

static duet_status x_start(void *state, const srv_kv_context *ctx) {
    kvlease *x = state;
    if (ctx->role != SRV_ROLE_PREFILL) return DUET_ERR_INVALID;
    const char *h = x->opt_host ? x->opt_host : ctx->host;
    snprintf(x->advertise_host, sizeof x->advertise_host, "%s",
             h && h[0] && strcmp(h, "0.0.0.0") != 0 && strcmp(h, "::") != 0 ? h : "127.0.0.1");
    x->kv_port = (x->kv_port ? x->kv_port : ctx->http_port - ctx->dp_rank + 1000) + ctx->dp_rank;
    if (x->kv_port > 65535) {
        LOG_ERROR("kv: side channel port %d (--kv-port + DP rank) passes 65535", x->kv_port);
        return DUET_ERR_INVALID;
    }
    x->tp_size = ctx->tp_size;
    kvl_role role = {.arg = x,
                     .open = role_open,
                     .tick = role_tick,
                     .progress = role_progress,
                     .close = role_close};
    /* role_open stores x->link before the transfer thread starts, and the thread reads it as
     * soon as a decode worker connects: kvl_create must not store it again from here. */
    kvl_link *link = NULL;
    duet_status st = kvl_create(&x->common, ctx, &role, &link);
    if (st != DUET_OK) x->link = NULL; /* freed by kvl_create */
    return st;
}

static void x_stop(void *state) {
    kvlease *x = state;
    kvl_stop(x->link);
}

static duet_status x_lease(void *state, uint64_t lease, const char *request_id,
                           srv_kv_params *out) {
    kvlease *x = state;
    (void)lease;
    (void)request_id;
    if (!x->link) return DUET_ERR_INVALID;
    snprintf(out->engine_id, sizeof out->engine_id, "%s", kvl_engine_id(x->link));
    snprintf(out->host, sizeof out->host, "%s", x->advertise_host);
    out->port = x->kv_port;
    out->tp_size = x->tp_size;
    return DUET_OK;
}

static char *x_metrics_text(void *state, const char *label) {
    kvlease *x = state;
    kvlease_stats st;
    pthread_mutex_lock(&x->stats_mu);
    st = x->stats;
    pthread_mutex_unlock(&x->stats_mu);
    size_t cap = 2048;
    char *t = malloc(cap);
    if (!t) return NULL;
    snprintf(t, cap,
             "# HELP duet_kv_lease_pins_total Lease pins answered to decode workers, by result.\n"
             "# TYPE duet_kv_lease_pins_total counter\n"
             "duet_kv_lease_pins_total{%s,result=\"ok\"} %llu\n"
             "duet_kv_lease_pins_total{%s,result=\"gone\"} %llu\n"
             "# HELP duet_kv_peers_refused_total Side-channel peers refused (authentication, "
             "layout).\n"
             "# TYPE duet_kv_peers_refused_total counter\n"
             "duet_kv_peers_refused_total{%s} %llu\n"
             "# HELP duet_kv_lease_pins_computing_total Lease pins served while the prompt was "
             "still being computed (the decode read it as it was written).\n"
             "# TYPE duet_kv_lease_pins_computing_total counter\n"
             "duet_kv_lease_pins_computing_total{%s} %llu\n",
             label, (unsigned long long)st.pins_served, label, (unsigned long long)st.pins_refused,
             label, (unsigned long long)st.peers_refused, label,
             (unsigned long long)st.pins_computing);
    return t;
}

duet_status kvlease_create(srv_kv_plugin *plugin) {
    kvlease *x = calloc(1, sizeof *x);
    if (!x) return DUET_ERR_NO_MEMORY;
    pthread_mutex_init(&x->stats_mu, NULL);
    memset(plugin, 0, sizeof *plugin);
    plugin->state = x;
    plugin->add_options = x_add_options;
    plugin->start = x_start;
    plugin->stop = x_stop;
    plugin->lease = x_lease;
    plugin->metrics_text = x_metrics_text;
    return DUET_OK;
}

void kvlease_destroy(srv_kv_plugin *plugin) {
    kvlease *x = plugin->state;
    if (!x) return;
    kvl_stop(x->link);
    pins_free(x, x->orphans); /* the thread is gone: nothing reads them any more */
    x->orphans = NULL;
    kvl_destroy(x->link);
    pthread_mutex_destroy(&x->stats_mu);
    free(x);
    plugin->state = NULL;
}

void kvlease_get_stats(const srv_kv_plugin *plugin, kvlease_stats *st) {
    kvlease *x = plugin->state;
    pthread_mutex_lock(&x->stats_mu);
    *st = x->stats;
    pthread_mutex_unlock(&x->stats_mu);
}
