/* KV transfer plug-in; see kvx.h. Everything below the hooks runs on the transfer thread,
 * which owns the libuv loop (side channel), the UCX worker and all peer state. The engine
 * thread hands fetches over through a locked inbox and uv_async; results go back through the
 * engine's thread-safe calls (eng_kv_fetched, eng_lease_pin, eng_lease_release).
 *
 * A fetch never reports failure while one of its reads may still land: on a timeout or an
 * error the peer's endpoint is closed forcibly first, which completes every read in flight. */
#include "kvx.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "base/clock.h"
#include "kv_ucx.h"
#include "kv_wire.h"
#include "base/log.h"

#define KVX_MAX_HOST 256
enum { STAGE_AUTO = 0, STAGE_ON = 1, STAGE_OFF = 2 };
/* a staged pin whose reader vanished keeps its slots this long: the reads may still run */
#define KVX_ORPHAN_S 30.0

/* ---- state ---- */

typedef struct kvx_remote {
    char host[KVX_MAX_HOST];
    int port;
    char engine_id[64];
    uint64_t lease;
} kvx_remote;

typedef struct kvx_peer kvx_peer;

typedef struct kvx_job {
    uint64_t id;
    kvx_remote rem;
    int32_t *local; /* this engine's blocks to fill, [n_blocks] */
    int n_blocks, skip, n_tokens;
    uint64_t seq;
    int gets_left;
    bool pinned, failed, reported;
    uint32_t *remote_ids; /* from the pin reply: where to read, [skip + n_blocks] */
    size_t n_remote;
    int32_t *slots;  /* staging: local slots the reads land in, [n_blocks] */
    double retry_at; /* > 0: pin (busy prefill) or read (no local slots) again then */
    char err[400];
    double deadline, t0;
    uint64_t bytes;
    kvx_peer *peer;
    struct kvx_job *next;
} kvx_job;

enum peer_state { PEER_CONNECTING, PEER_HELLO, PEER_AUTH_SENT, PEER_READY, PEER_DEAD };

struct kvx_peer {
    struct kvx *x;
    char host[KVX_MAX_HOST];
    int port;
    enum peer_state state;
    uv_tcp_t tcp;
    uv_connect_t conn_req;
    uv_getaddrinfo_t gai;
    bool tcp_open;
    kvw_reader rd;
    uint8_t nonce_s[KVW_NONCE_LEN], nonce_c[KVW_NONCE_LEN];
    char engine_id[64];
    uint32_t remote_blocks; /* the prefill pool's size, to check the ids it pins */
    bool gai_pending;
    kvu_peer *up;
    kvx_job *jobs; /* waiting for the peer, pinning, or reading */
    uint64_t next_seq;
    struct kvx_peer *next;
};

/* Staging: a host area in whole-block slots (allocated by UCX, page-locked by the backend)
 * through which KV in device memory travels when UCX cannot read the device directly. */
typedef struct kvx_stage {
    uint8_t *base;
    int n_slots;
    uint8_t *used; /* [n_slots] */
    kvu_region *reg;
    bool pinned;
} kvx_stage;

/* Prefill side, staging: slots holding a lease's copy while a decode worker reads them. */
typedef struct kvx_pin {
    uint64_t lease;
    int32_t *slots;
    int n;
    double deadline; /* when orphaned (its reader's connection closed) */
    struct kvx_pin *next;
} kvx_pin;

typedef struct kvx_conn { /* prefill side: one decode worker connected to us */
    struct kvx *x;
    uv_tcp_t tcp;
    kvw_reader rd;
    uint8_t nonce_s[KVW_NONCE_LEN];
    bool authed, closing;
    kvx_pin *pins;
    struct kvx_conn *next;
} kvx_conn;

struct kvx {
    /* options */
    const char *opt_secret, *opt_host; /* as given (argv or the environment) */
    char secret[512];
    int kv_port; /* 0: http port + 1000 */
    char advertise_host[KVX_MAX_HOST];
    double timeout_s;
    int staging_mode;        /* STAGE_AUTO, STAGE_ON, STAGE_OFF */
    long long staging_bytes; /* > 0 */
    srv_kv_context ctx;
    char model[256];

    uv_loop_t loop;
    bool loop_ready;
    uv_thread_t thread;
    bool thread_started;
    uv_async_t async;
    uv_timer_t ucx_tick; /* progresses the UCX worker every millisecond */
    uv_idle_t ucx_hot;   /* ... and on every loop turn while traffic flows */
    double hot_last;     /* when progress last found work */
    uv_tcp_t listener;
    uv_timer_t sweep;
    kvu_ctx *ucx;
    kvu_region *region;
    be_backend *be;
    bool staged; /* reads and serves through the staging area, not the cache itself */
    kvx_stage stage;
    kvx_pin *orphans;
    char engine_id[33];
    Duet__Kv__PoolInfo pool;
    char dtype[8];

    pthread_mutex_t mu;
    kvx_job *inbox;
    bool stopping;

    kvx_peer *peers;
    kvx_conn *conns;
    kvx_stats stats;
    pthread_mutex_t stats_mu;
};

/* ---- plug-in hooks: command line ---- */

static duet_status x_add_options(void *state, opt_parser *p) {
    kvx *x = state;
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
        {.name = "--kv-secret",
         .type = OPT_STRING,
         .dest = &x->opt_secret,
         .metavar = "S",
         .env = "DUET_KV_SECRET",
         .help = "shared secret of the side channel"},
        {.name = "--kv-transfer-timeout",
         .type = OPT_DOUBLE,
         .dest = &x->timeout_s,
         .def = "10",
         .min = 1e-3,
         .max = 1e6,
         .metavar = "S",
         .help = "decode side: fail a KV pull after S seconds"},
        {.name = "--kv-staging",
         .type = OPT_CHOICE,
         .dest = &x->staging_mode,
         .def = "auto",
         .choices = "auto|on|off",
         .help = "move KV through a host staging area (auto: when the cache is in device "
                 "memory UCX cannot read; on: also for host caches, which lets same-host peers "
                 "use UCX's shared-memory reads)"},
        {.name = "--kv-staging-bytes",
         .type = OPT_SIZE,
         .dest = &x->staging_bytes,
         .def = "256M",
         .help = "size of the staging area"},
    };
    return opt_add(p, "KV transfer (disaggregated prefill/decode)", specs,
                   (int)(sizeof specs / sizeof specs[0]));
}

/* ---- transfer thread: helpers ---- */

static void stats_add(kvx *x, void (*f)(kvx_stats *, const void *), const void *arg) {
    pthread_mutex_lock(&x->stats_mu);
    f(&x->stats, arg);
    pthread_mutex_unlock(&x->stats_mu);
}

static void count_ok(kvx_stats *s, const void *arg) {
    const kvx_job *j = arg;
    s->fetches_ok++;
    s->bytes_read += j->bytes;
    s->fetch_seconds_total += clock_now_s() - j->t0;
}

static void count_fail(kvx_stats *s, const void *arg) {
    (void)arg;
    s->fetches_failed++;
}

static void count_pin(kvx_stats *s, const void *arg) {
    if (*(const bool *)arg)
        s->pins_served++;
    else
        s->pins_refused++;
}

static void count_refused(kvx_stats *s, const void *arg) {
    (void)arg;
    s->peers_refused++;
}

static void count_get(kvx_stats *s, const void *arg) {
    (void)arg;
    s->gets_issued++;
}

typedef struct write_req {
    uv_write_t w;
    uint8_t *buf;
} write_req;

static void write_done(uv_write_t *w, int status) {
    (void)status; /* a failed write shows up as a read error / close on the same stream */
    write_req *wr = (write_req *)w;
    free(wr->buf);
    free(wr);
}

static duet_status send_env(uv_tcp_t *tcp, const Duet__Kv__Envelope *env) {
    uint8_t *buf;
    size_t len;
    duet_status st = kvw_encode(env, &buf, &len);
    if (st != DUET_OK) return st;
    write_req *wr = malloc(sizeof *wr);
    if (!wr) {
        free(buf);
        return DUET_ERR_NO_MEMORY;
    }
    wr->buf = buf;
    uv_buf_t b = uv_buf_init((char *)buf, (unsigned)len);
    int rc = uv_write(&wr->w, (uv_stream_t *)tcp, &b, 1, write_done);
    if (rc != 0) {
        free(buf);
        free(wr);
        return DUET_ERR_IO;
    }
    return DUET_OK;
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    (void)h;
    buf->base = malloc(suggested);
    buf->len = buf->base ? suggested : 0;
}

/* UCX progress without an event fd (see kv_ucx.h): a 1 ms tick while idle; once a tick finds
 * work, every loop turn progresses until 50 ms pass without any. Software transports (TCP,
 * shared-memory active messages) need the target side to progress too, so both sides do this. */
static void ucx_hot(uv_idle_t *h) {
    kvx *x = h->data;
    double t = clock_now_s();
    if (kvu_progress(x->ucx))
        x->hot_last = t;
    else if (t - x->hot_last > 0.05)
        uv_idle_stop(&x->ucx_hot);
}

static void ucx_heat(kvx *x) {
    x->hot_last = clock_now_s();
    if (!uv_is_active((uv_handle_t *)&x->ucx_hot)) uv_idle_start(&x->ucx_hot, ucx_hot);
}

static void ucx_tick(uv_timer_t *t) {
    kvx *x = t->data;
    if (kvu_progress(x->ucx)) ucx_heat(x);
}

/* ---- staging ---- */

/* Takes n slots, one contiguous run if there is one. 0: taken; -1: not now; -2: never (the
 * area is smaller than n). */
static int stage_alloc(kvx_stage *st, int n, int32_t *out) {
    if (n > st->n_slots) return -2;
    int run = 0, n_free = 0;
    for (int i = 0; i < st->n_slots; i++) {
        run = st->used[i] ? 0 : run + 1;
        n_free += !st->used[i];
        if (run == n) {
            for (int k = 0; k < n; k++) {
                out[k] = i - n + 1 + k;
                st->used[out[k]] = 1;
            }
            return 0;
        }
    }
    if (n_free < n) return -1;
    for (int i = 0, k = 0; k < n; i++)
        if (!st->used[i]) {
            st->used[i] = 1;
            out[k++] = i;
        }
    return 0;
}

static void stage_free(kvx_stage *st, const int32_t *slots, int n) {
    for (int i = 0; i < n; i++)
        if (slots[i] >= 0 && slots[i] < st->n_slots) st->used[slots[i]] = 0;
}

/* Copies cache blocks to (to_host) or from staging slots; a run of consecutive slots is one
 * copy. Host caches are copied with memcpy, device caches by the backend. */
static duet_status stage_copy(kvx *x, const int32_t *blocks, const int32_t *slots, int n,
                              bool to_host) {
    be_kv *kv = x->ctx.kv;
    size_t bb = kv->block_bytes;
    for (int i = 0; i < n;) {
        int k = i + 1;
        while (k < n && slots[k] == slots[k - 1] + 1) k++;
        uint8_t *h = x->stage.base + (size_t)slots[i] * bb;
        if (x->be->ops->kv_copy_host) {
            duet_status st = x->be->ops->kv_copy_host(x->be, kv, blocks + i, k - i, h, to_host);
            if (st != DUET_OK) return st;
        } else {
            for (int b = i; b < k; b++) {
                uint8_t *c = (uint8_t *)kv->data + (size_t)blocks[b] * bb;
                uint8_t *hb = h + (size_t)(b - i) * bb;
                if (to_host)
                    memcpy(hb, c, bb);
                else
                    memcpy(c, hb, bb);
            }
        }
        i = k;
    }
    return DUET_OK;
}

static void pins_free(kvx *x, kvx_pin *p) {
    while (p) {
        kvx_pin *n = p->next;
        stage_free(&x->stage, p->slots, p->n);
        free(p->slots);
        free(p);
        p = n;
    }
}

/* ---- decode side: jobs ---- */

static void job_report(kvx *x, kvx_job *j) {
    if (j->reported) return;
    j->reported = true;
    if (j->slots) { /* every read into them has completed by now */
        stage_free(&x->stage, j->slots, j->n_blocks);
        free(j->slots);
        j->slots = NULL;
    }
    if (j->failed) {
        LOG_WARN("kv: request %llu: %s", (unsigned long long)j->id, j->err);
        stats_add(x, count_fail, NULL);
        eng_kv_fetched(x->ctx.engine, j->id, false, j->err);
    } else {
        stats_add(x, count_ok, j);
        eng_kv_fetched(x->ctx.engine, j->id, true, NULL);
    }
}

static void job_free(kvx_job *j) {
    free(j->local);
    free(j->remote_ids);
    free(j->slots);
    free(j);
}

static void job_fail(kvx_job *j, const char *fmt, const char *a) {
    if (j->failed) return;
    j->failed = true;
    snprintf(j->err, sizeof j->err, fmt, a);
}

static void peer_unlink_job(kvx_peer *p, kvx_job *j) {
    for (kvx_job **l = &p->jobs; *l; l = &(*l)->next)
        if (*l == j) {
            *l = j->next;
            break;
        }
}

/* The job is done (every read completed): release the lease and report. */
static void job_finish(kvx *x, kvx_job *j) {
    kvx_peer *p = j->peer;
    if (p) {
        peer_unlink_job(p, j);
        if (j->pinned && p->state == PEER_READY) {
            Duet__Kv__Release rel = DUET__KV__RELEASE__INIT;
            rel.lease = j->rem.lease;
            Duet__Kv__Envelope env = DUET__KV__ENVELOPE__INIT;
            env.msg_case = DUET__KV__ENVELOPE__MSG_RELEASE;
            env.release = &rel;
            send_env(&p->tcp, &env);
        }
    }
    if (j->slots && !j->failed) {
        /* the reads landed in staging: now into the blocks of the cache */
        duet_status st = stage_copy(x, j->local, j->slots, j->n_blocks, false);
        if (st != DUET_OK)
            job_fail(j, "copying the KV into the cache failed: %s", duet_strerror(st));
    }
    job_report(x, j);
    job_free(j);
}

static void peer_close(kvx_peer *p, const char *why);

static void get_done(void *arg, duet_status st) {
    kvx_job *j = arg;
    if (st != DUET_OK) job_fail(j, "KV read from the prefill worker failed: %s", duet_strerror(st));
    /* a closing peer reports its jobs itself once every read has come back */
    if (--j->gets_left == 0 && j->peer->state != PEER_DEAD) job_finish(j->peer->x, j);
}

/* Reads the pinned blocks (into the cache, or into staging slots): runs where both the
 * remote ids and the local destinations are consecutive become one read. Without free staging
 * slots it tries again a little later. */
static void job_start_reads(kvx *x, kvx_job *j) {
    kvx_peer *p = j->peer;
    j->retry_at = 0;
    if (x->staged && !j->slots) {
        int32_t *slots = malloc((size_t)(j->n_blocks ? j->n_blocks : 1) * sizeof(int32_t));
        int rc = slots ? stage_alloc(&x->stage, j->n_blocks, slots) : -2;
        if (rc != 0) {
            free(slots);
            if (rc == -1) {
                j->retry_at = clock_now_s() + 0.005;
                return;
            }
            job_fail(j, "the prompt's KV is larger than the staging area (--kv-staging-bytes)%s",
                     "");
            job_finish(x, j);
            return;
        }
        j->slots = slots;
    }
    const uint32_t *remote = j->remote_ids;
    be_kv *kv = x->ctx.kv;
    size_t bb = kv->block_bytes;
    j->gets_left = 1; /* held until every read is issued */
    for (int i = 0; i < j->n_blocks;) {
        const int32_t *dst = j->slots ? j->slots : j->local;
        int k = i + 1;
        while (k < j->n_blocks && remote[j->skip + k] == remote[j->skip + k - 1] + 1 &&
               dst[k] == dst[k - 1] + 1)
            k++;
        uint32_t r0 = remote[j->skip + i];
        if ((uint64_t)r0 + (uint64_t)(k - i) > p->remote_blocks) {
            job_fail(j, "the prefill worker pinned block ids outside its pool%s", "");
            break;
        }
        size_t len = (size_t)(k - i) * bb;
        uint8_t *local = j->slots ? x->stage.base + (size_t)dst[i] * bb
                                  : (uint8_t *)kv->data + (size_t)dst[i] * bb;
        j->gets_left++;
        j->bytes += len;
        stats_add(x, count_get, NULL);
        duet_status st = kvu_get(p->up, j->slots ? x->stage.reg : x->region, local, len,
                                 (uint64_t)r0 * bb, get_done, j);
        if (st != DUET_OK) {
            j->gets_left--;
            job_fail(j, "KV read could not start: %s", duet_strerror(st));
            break;
        }
        i = k;
    }
    if (--j->gets_left == 0) job_finish(x, j);
    ucx_heat(x);
}

static void job_read(kvx *x, kvx_job *j, const uint32_t *remote, size_t n_remote) {
    if (n_remote < (size_t)(j->skip + j->n_blocks)) {
        job_fail(j, "the prefill worker's lease holds fewer blocks than the prompt needs%s", "");
        job_finish(x, j);
        return;
    }
    j->remote_ids = malloc((n_remote ? n_remote : 1) * sizeof(uint32_t));
    if (!j->remote_ids) {
        job_fail(j, "out of memory%s", "");
        job_finish(x, j);
        return;
    }
    memcpy(j->remote_ids, remote, n_remote * sizeof(uint32_t));
    j->n_remote = n_remote;
    job_start_reads(x, j);
}

static void job_pin(kvx_job *j) {
    kvx_peer *p = j->peer;
    j->retry_at = 0;
    Duet__Kv__Pin pin = DUET__KV__PIN__INIT;
    j->seq = ++p->next_seq;
    pin.seq = j->seq;
    pin.lease = j->rem.lease;
    Duet__Kv__Envelope env = DUET__KV__ENVELOPE__INIT;
    env.msg_case = DUET__KV__ENVELOPE__MSG_PIN;
    env.pin = &pin;
    if (send_env(&p->tcp, &env) != DUET_OK) peer_close(p, "sending to the prefill worker failed");
}

/* ---- decode side: peers ---- */

static void peer_handle_closed(uv_handle_t *h) {
    kvx_peer *p = h->data;
    kvw_reader_cleanup(&p->rd);
    free(p);
}

static void peer_destroy_later(kvx_peer *p) {
    kvx *x = p->x;
    for (kvx_peer **l = &x->peers; *l; l = &(*l)->next)
        if (*l == p) {
            *l = p->next;
            break;
        }
    if (p->tcp_open)
        uv_close((uv_handle_t *)&p->tcp, peer_handle_closed);
    else if (!p->gai_pending)
        free(p); /* else peer_resolved frees it */
}

/* Ends a peer: reads in flight are completed (failed) by closing the endpoint, then every job
 * of the peer is failed with why, and the peer is forgotten (a later fetch reconnects). */
static void peer_close(kvx_peer *p, const char *why) {
    if (p->state == PEER_DEAD) return;
    p->state = PEER_DEAD;
    kvx *x = p->x;
    for (kvx_job *j = p->jobs; j; j = j->next) job_fail(j, "%s", why);
    if (p->up) {
        /* completes every read in flight (their callbacks run here, see get_done) */
        kvu_peer_destroy(x->ucx, p->up);
        p->up = NULL;
    }
    while (p->jobs) {
        kvx_job *j = p->jobs;
        p->jobs = j->next;
        j->peer = NULL;
        job_report(x, j);
        job_free(j);
    }
    peer_destroy_later(p);
}

static void peer_got(kvx_peer *p, Duet__Kv__Envelope *env) {
    kvx *x = p->x;
    char why[400];
    switch (env->msg_case) {
    case DUET__KV__ENVELOPE__MSG_HELLO: {
        if (p->state != PEER_HELLO || env->hello->nonce.len != KVW_NONCE_LEN) break;
        memcpy(p->nonce_s, env->hello->nonce.data, KVW_NONCE_LEN);
        if (kvw_nonce(p->nonce_c) != DUET_OK) {
            peer_close(p, "no randomness for the side channel");
            return;
        }
        Duet__Kv__Auth auth = DUET__KV__AUTH__INIT;
        uint8_t mac[KVW_MAC_LEN];
        kvw_mac(x->secret, "duet-kv-c", p->nonce_s, KVW_NONCE_LEN, p->nonce_c, KVW_NONCE_LEN, mac);
        auth.nonce.data = p->nonce_c;
        auth.nonce.len = KVW_NONCE_LEN;
        auth.mac.data = mac;
        auth.mac.len = KVW_MAC_LEN;
        auth.pool = &x->pool;
        Duet__Kv__Envelope out = DUET__KV__ENVELOPE__INIT;
        out.msg_case = DUET__KV__ENVELOPE__MSG_AUTH;
        out.auth = &auth;
        p->state = PEER_AUTH_SENT;
        if (send_env(&p->tcp, &out) != DUET_OK)
            peer_close(p, "sending to the prefill worker failed");
        return;
    }
    case DUET__KV__ENVELOPE__MSG_REFUSE: {
        stats_add(x, count_refused, NULL);
        snprintf(why, sizeof why, "KV transfer refused by the prefill worker %.100s:%d: %.160s",
                 p->host, p->port, env->refuse->reason ? env->refuse->reason : "?");
        LOG_ERROR("kv: %s", why);
        peer_close(p, why);
        return;
    }
    case DUET__KV__ENVELOPE__MSG_WELCOME: {
        Duet__Kv__Welcome *w = env->welcome;
        if (p->state != PEER_AUTH_SENT) break;
        if (!kvw_mac_ok(x->secret, "duet-kv-s", p->nonce_c, KVW_NONCE_LEN, p->nonce_s,
                        KVW_NONCE_LEN, w->mac.data, w->mac.len)) {
            snprintf(why, sizeof why,
                     "the prefill worker %.100s:%d failed authentication (wrong --kv-secret?)",
                     p->host, p->port);
            LOG_ERROR("kv: %s", why);
            peer_close(p, why);
            return;
        }
        if (!w->pool || !kvw_pools_compatible(&x->pool, w->pool, why, sizeof why)) {
            LOG_ERROR("kv: prefill worker %.100s:%d: %s", p->host, p->port,
                      w->pool ? why : "no pool");
            peer_close(p, w->pool ? why : "the prefill worker sent no KV pool description");
            return;
        }
        snprintf(p->engine_id, sizeof p->engine_id, "%s", w->engine_id ? w->engine_id : "");
        duet_status st = kvu_peer_create(x->ucx, w->ucx_address.data, w->ucx_address.len,
                                         w->rkey.data, w->rkey.len, w->base_addr, &p->up);
        if (st != DUET_OK) {
            peer_close(p, "cannot open a UCX endpoint to the prefill worker");
            return;
        }
        p->remote_blocks = w->pool->n_blocks;
        p->state = PEER_READY;
        for (kvx_job *j = p->jobs, *next; j; j = next) {
            next = j->next;
            if (strcmp(j->rem.engine_id, p->engine_id) != 0) {
                job_fail(j, "the prefill worker's engine id changed (it restarted?)%s", "");
                job_finish(x, j);
            } else {
                job_pin(j);
            }
        }
        return;
    }
    case DUET__KV__ENVELOPE__MSG_PIN_REPLY: {
        Duet__Kv__PinReply *r = env->pin_reply;
        if (p->state != PEER_READY) break;
        for (kvx_job *j = p->jobs; j; j = j->next) {
            if (j->seq != r->seq || j->pinned || j->failed) continue;
            if (!r->ok && r->busy) { /* the prefill's staging area is full: pin again soon */
                j->retry_at = clock_now_s() + 0.005;
                return;
            }
            if (!r->ok) {
                snprintf(j->err, sizeof j->err,
                         "the prefill worker %.100s:%d refused lease %llu: %.100s", p->host,
                         p->port, (unsigned long long)j->rem.lease, r->error ? r->error : "?");
                j->failed = true;
                job_finish(x, j);
                return;
            }
            j->pinned = true;
            job_read(x, j, r->block_ids, r->n_block_ids);
            return;
        }
        return;
    }
    default:
        break;
    }
    peer_close(p, "the prefill worker sent an unexpected message");
}

static void peer_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
    kvx_peer *p = s->data;
    if (n > 0 && p->state != PEER_DEAD) {
        if (kvw_reader_feed(&p->rd, buf->base, (size_t)n) != DUET_OK) {
            free(buf->base);
            peer_close(p, "the prefill worker sent a malformed frame");
            return;
        }
        for (;;) {
            Duet__Kv__Envelope *env;
            if (kvw_reader_next(&p->rd, &env) != DUET_OK) {
                peer_close(p, "the prefill worker sent a malformed message");
                break;
            }
            if (!env) break;
            peer_got(p, env);
            duet__kv__envelope__free_unpacked(env, NULL);
            if (p->state == PEER_DEAD) break;
        }
    } else if (n < 0) {
        char why[300];
        snprintf(why, sizeof why, "lost the connection to the prefill worker %.100s:%d (%s)",
                 p->host, p->port, uv_strerror((int)n));
        peer_close(p, why);
    }
    free(buf->base);
}

static void peer_connected(uv_connect_t *c, int status) {
    kvx_peer *p = c->data;
    if (p->state == PEER_DEAD) return;
    if (status != 0) {
        char why[300];
        snprintf(why, sizeof why, "cannot connect to the prefill worker %.100s:%d (%s)", p->host,
                 p->port, uv_strerror(status));
        peer_close(p, why);
        return;
    }
    p->state = PEER_HELLO;
    uv_read_start((uv_stream_t *)&p->tcp, alloc_cb, peer_read);
}

static void peer_resolved(uv_getaddrinfo_t *g, int status, struct addrinfo *res) {
    kvx_peer *p = g->data;
    p->gai_pending = false;
    if (p->state == PEER_DEAD) { /* closed while resolving */
        if (res) uv_freeaddrinfo(res);
        free(p);
        return;
    }
    if (status != 0 || !res) {
        char why[300];
        snprintf(why, sizeof why, "cannot resolve the prefill worker's host %.100s (%s)", p->host,
                 uv_strerror(status));
        if (res) uv_freeaddrinfo(res);
        peer_close(p, why);
        return;
    }
    uv_tcp_init(&p->x->loop, &p->tcp);
    p->tcp.data = p;
    p->tcp_open = true;
    p->conn_req.data = p;
    int rc = uv_tcp_connect(&p->conn_req, &p->tcp, res->ai_addr, peer_connected);
    uv_freeaddrinfo(res);
    if (rc != 0) {
        char why[300];
        snprintf(why, sizeof why, "cannot connect to the prefill worker %.100s:%d (%s)", p->host,
                 p->port, uv_strerror(rc));
        peer_close(p, why);
    }
}

static kvx_peer *peer_get(kvx *x, const char *host, int port) {
    for (kvx_peer *p = x->peers; p; p = p->next)
        if (p->port == port && !strcmp(p->host, host) && p->state != PEER_DEAD) return p;
    kvx_peer *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->x = x;
    snprintf(p->host, sizeof p->host, "%s", host);
    p->port = port;
    p->state = PEER_CONNECTING;
    p->next = x->peers;
    x->peers = p;
    char port_s[16];
    snprintf(port_s, sizeof port_s, "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    p->gai.data = p;
    p->gai_pending = true;
    if (uv_getaddrinfo(&x->loop, &p->gai, peer_resolved, host, port_s, &hints) != 0) {
        x->peers = p->next;
        free(p);
        return NULL;
    }
    return p;
}

/* Jobs handed over by the engine thread join their peer's queue. */
static void take_inbox(kvx *x) {
    pthread_mutex_lock(&x->mu);
    kvx_job *j = x->inbox;
    x->inbox = NULL;
    pthread_mutex_unlock(&x->mu);
    /* the inbox is a stack: restore arrival order */
    kvx_job *rev = NULL;
    while (j) {
        kvx_job *n = j->next;
        j->next = rev;
        rev = j;
        j = n;
    }
    for (j = rev; j;) {
        kvx_job *n = j->next;
        j->next = NULL;
        kvx_peer *p = peer_get(x, j->rem.host, j->rem.port);
        if (!p) {
            job_fail(j, "cannot reach the prefill worker %.100s", j->rem.host);
            job_report(x, j);
            job_free(j);
        } else {
            j->peer = p;
            j->next = p->jobs;
            p->jobs = j;
            if (p->state == PEER_READY) {
                if (strcmp(j->rem.engine_id, p->engine_id) != 0) {
                    job_fail(j, "the prefill worker's engine id changed (it restarted?)%s", "");
                    job_finish(x, j);
                } else {
                    job_pin(j);
                }
            }
        }
        j = n;
    }
}

/* Timeouts and deferred failures: a job past its deadline closes its peer (completing its
 * reads), which fails every job of that peer. */
static void sweep(uv_timer_t *t) {
    kvx *x = t->data;
    double now = clock_now_s();
    for (kvx_pin **l = &x->orphans; *l;) {
        kvx_pin *o = *l;
        if (now < o->deadline) {
            l = &o->next;
            continue;
        }
        *l = o->next;
        o->next = NULL;
        pins_free(x, o);
    }
    for (kvx_peer *p = x->peers, *next; p; p = next) {
        next = p->next;
        char why[300];
        /* one retry per peer and tick: acting on a job may change the peer's list */
        for (kvx_job *j = p->jobs; j; j = j->next) {
            if (j->retry_at > 0 && now >= j->retry_at && now < j->deadline && !j->failed) {
                if (j->pinned)
                    job_start_reads(x, j);
                else
                    job_pin(j);
                break;
            }
        }
        if (p->state == PEER_DEAD) continue;
        for (kvx_job *j = p->jobs; j; j = j->next) {
            if (now < j->deadline) continue;
            snprintf(why, sizeof why,
                     "KV transfer from the prefill worker %.100s:%d timed out after %.0f s",
                     p->host, p->port, x->timeout_s);
            peer_close(p, why);
            break;
        }
    }
}

/* ---- prefill side: connections from decode workers ---- */

static void conn_closed(uv_handle_t *h) {
    kvx_conn *c = h->data;
    kvw_reader_cleanup(&c->rd);
    free(c);
}

static void conn_close(kvx_conn *c) {
    if (c->closing) return;
    c->closing = true;
    kvx *x = c->x;
    for (kvx_conn **l = &x->conns; *l; l = &(*l)->next)
        if (*l == c) {
            *l = c->next;
            break;
        }
    /* leases it pinned stay until released or expired: it may still be reading them; so do
     * the staging slots it reads, for a while */
    while (c->pins) {
        kvx_pin *p = c->pins;
        c->pins = p->next;
        p->deadline = clock_now_s() + KVX_ORPHAN_S;
        p->next = x->orphans;
        x->orphans = p;
    }
    uv_close((uv_handle_t *)&c->tcp, conn_closed);
}

static void conn_refuse(kvx_conn *c, const char *reason) {
    Duet__Kv__Refuse r = DUET__KV__REFUSE__INIT;
    r.reason = (char *)reason;
    Duet__Kv__Envelope env = DUET__KV__ENVELOPE__INIT;
    env.msg_case = DUET__KV__ENVELOPE__MSG_REFUSE;
    env.refuse = &r;
    send_env(&c->tcp, &env);
    stats_add(c->x, count_refused, NULL);
    conn_close(c);
}

static void conn_got(kvx_conn *c, Duet__Kv__Envelope *env) {
    kvx *x = c->x;
    if (env->msg_case == DUET__KV__ENVELOPE__MSG_AUTH && !c->authed) {
        Duet__Kv__Auth *a = env->auth;
        char why[256];
        if (a->nonce.len != KVW_NONCE_LEN ||
            !kvw_mac_ok(x->secret, "duet-kv-c", c->nonce_s, KVW_NONCE_LEN, a->nonce.data,
                        KVW_NONCE_LEN, a->mac.data, a->mac.len)) {
            LOG_WARN("kv: refused a decode worker that failed authentication");
            conn_refuse(c, "authentication failed (wrong --kv-secret?)");
            return;
        }
        if (!a->pool || !kvw_pools_compatible(a->pool, &x->pool, why, sizeof why)) {
            LOG_WARN("kv: refused a decode worker: %s", a->pool ? why : "no pool description");
            conn_refuse(c, a->pool ? why : "no KV pool description");
            return;
        }
        uint8_t mac[KVW_MAC_LEN];
        kvw_mac(x->secret, "duet-kv-s", a->nonce.data, KVW_NONCE_LEN, c->nonce_s, KVW_NONCE_LEN,
                mac);
        const void *addr, *rkey;
        size_t addr_len, rkey_len;
        kvu_address(x->ucx, &addr, &addr_len);
        kvu_region_rkey(x->staged ? x->stage.reg : x->region, &rkey, &rkey_len);
        Duet__Kv__Welcome w = DUET__KV__WELCOME__INIT;
        Duet__Kv__PoolInfo served = x->pool;
        if (x->staged) served.n_blocks = (uint32_t)x->stage.n_slots; /* what reads address */
        w.mac.data = mac;
        w.mac.len = KVW_MAC_LEN;
        w.pool = &served;
        w.ucx_address.data = (uint8_t *)addr;
        w.ucx_address.len = addr_len;
        w.rkey.data = (uint8_t *)rkey;
        w.rkey.len = rkey_len;
        w.base_addr = (uint64_t)(uintptr_t)(x->staged ? (void *)x->stage.base : x->ctx.kv->data);
        w.engine_id = x->engine_id;
        Duet__Kv__Envelope out = DUET__KV__ENVELOPE__INIT;
        out.msg_case = DUET__KV__ENVELOPE__MSG_WELCOME;
        out.welcome = &w;
        c->authed = true;
        if (send_env(&c->tcp, &out) != DUET_OK) conn_close(c);
        return;
    }
    if (!c->authed) {
        conn_refuse(c, "authenticate first");
        return;
    }
    if (env->msg_case == DUET__KV__ENVELOPE__MSG_PIN) {
        Duet__Kv__PinReply r = DUET__KV__PIN_REPLY__INIT;
        r.seq = env->pin->seq;
        int cap = x->ctx.kv->n_blocks, n = 0;
        int32_t *blocks = malloc((size_t)cap * sizeof(int32_t));
        int32_t *slots = NULL;
        uint32_t *ids = malloc((size_t)cap * sizeof(uint32_t));
        duet_status st = blocks && ids
                             ? eng_lease_pin(x->ctx.engine, env->pin->lease, blocks, cap, &n)
                             : DUET_ERR_NO_MEMORY;
        int rc = 0;
        if (st == DUET_OK && x->staged) {
            /* serve a copy in the staging area: UCX cannot read the cache itself */
            slots = malloc((size_t)(n ? n : 1) * sizeof(int32_t));
            rc = slots ? stage_alloc(&x->stage, n, slots) : -2;
            kvx_pin *pin = rc == 0 ? calloc(1, sizeof *pin) : NULL;
            if (rc == 0 && pin) {
                st = stage_copy(x, blocks, slots, n, true);
                if (st == DUET_OK) {
                    pin->lease = env->pin->lease;
                    pin->slots = slots;
                    pin->n = n;
                    pin->next = c->pins;
                    c->pins = pin;
                    memcpy(blocks, slots, (size_t)n * sizeof(int32_t));
                    slots = NULL; /* the pin owns them */
                } else {
                    stage_free(&x->stage, slots, n);
                    free(pin);
                }
            } else if (rc == 0) {
                stage_free(&x->stage, slots, n);
                st = DUET_ERR_NO_MEMORY;
            } else {
                st = rc == -1 ? DUET_ERR_BUSY : DUET_ERR_TOO_LONG;
            }
        }
        if (st == DUET_OK) {
            for (int i = 0; i < n; i++) ids[i] = (uint32_t)blocks[i];
            r.ok = true;
            r.block_ids = ids;
            r.n_block_ids = (size_t)n;
        } else {
            r.ok = false;
            r.busy = st == DUET_ERR_BUSY;
            r.error =
                st == DUET_ERR_NOT_FOUND ? "the lease is gone (expired or released)"
                : st == DUET_ERR_BUSY    ? "busy: the staging area is full"
                : st == DUET_ERR_TOO_LONG
                    ? "the lease is larger than the prefill's staging area (--kv-staging-bytes)"
                    : "cannot pin the lease";
        }
        bool ok = r.ok;
        if (!r.busy) stats_add(x, count_pin, &ok);
        Duet__Kv__Envelope out = DUET__KV__ENVELOPE__INIT;
        out.msg_case = DUET__KV__ENVELOPE__MSG_PIN_REPLY;
        out.pin_reply = &r;
        if (send_env(&c->tcp, &out) != DUET_OK) conn_close(c);
        free(blocks);
        free(ids);
        free(slots);
        return;
    }
    if (env->msg_case == DUET__KV__ENVELOPE__MSG_RELEASE) {
        for (kvx_pin **l = &c->pins; *l; l = &(*l)->next) {
            if ((*l)->lease != env->release->lease) continue;
            kvx_pin *p = *l;
            *l = p->next;
            p->next = NULL;
            pins_free(x, p);
            break;
        }
        eng_lease_release(x->ctx.engine, env->release->lease);
        return;
    }
    conn_refuse(c, "unexpected message");
}

static void conn_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
    kvx_conn *c = s->data;
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
    kvx *x = server->data;
    if (status != 0) return;
    kvx_conn *c = calloc(1, sizeof *c);
    if (!c) return;
    c->x = x;
    uv_tcp_init(&x->loop, &c->tcp);
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
    if (send_env(&c->tcp, &env) != DUET_OK) {
        conn_close(c);
        return;
    }
    uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, conn_read);
}

/* ---- the thread ---- */

static void shut_down(kvx *x) {
    while (x->peers) peer_close(x->peers, "the decode worker is shutting down");
    while (x->conns) conn_close(x->conns);
    take_inbox(x); /* fetches that raced the shutdown fail too */
    while (x->peers) peer_close(x->peers, "the decode worker is shutting down");
    uv_close((uv_handle_t *)&x->async, NULL);
    uv_close((uv_handle_t *)&x->ucx_tick, NULL);
    uv_close((uv_handle_t *)&x->ucx_hot, NULL);
    uv_close((uv_handle_t *)&x->sweep, NULL);
    if (x->ctx.role == SRV_ROLE_PREFILL) uv_close((uv_handle_t *)&x->listener, NULL);
}

static void on_async(uv_async_t *a) {
    kvx *x = a->data;
    pthread_mutex_lock(&x->mu);
    bool stop = x->stopping;
    pthread_mutex_unlock(&x->mu);
    if (stop) {
        shut_down(x);
        return;
    }
    take_inbox(x);
}

/* Runs until shut_down has closed every handle (and pending resolutions have returned). */
static void thread_main(void *arg) {
    kvx *x = arg;
    uv_run(&x->loop, UV_RUN_DEFAULT);
}

/* ---- plug-in hooks: lifecycle ---- */

static duet_status x_start(void *state, const srv_kv_context *ctx) {
    kvx *x = state;
    x->ctx = *ctx;
    snprintf(x->model, sizeof x->model, "%s", ctx->served_model_name ? ctx->served_model_name : "");
    if (x->opt_secret) snprintf(x->secret, sizeof x->secret, "%s", x->opt_secret);
    if (x->opt_host) snprintf(x->advertise_host, sizeof x->advertise_host, "%s", x->opt_host);
    if (!x->secret[0])
        LOG_WARN("kv: no --kv-secret (or DUET_KV_SECRET): the KV side channel accepts any peer "
                 "that can reach it; set one shared secret on every prefill and decode worker");
    if (!x->advertise_host[0]) {
        const char *h = ctx->host;
        snprintf(x->advertise_host, sizeof x->advertise_host, "%s",
                 h && h[0] && strcmp(h, "0.0.0.0") != 0 && strcmp(h, "::") != 0 ? h : "127.0.0.1");
    }
    be_kv *kv = ctx->kv;
    snprintf(x->dtype, sizeof x->dtype, "%s", dt_name(kv->dtype));
    x->pool.block_size = (uint32_t)kv->block_size;
    x->pool.n_layers = (uint32_t)kv->n_layers;
    x->pool.kv_dim = (uint32_t)kv->kv_dim;
    x->pool.dtype = x->dtype;
    x->pool.block_bytes = kv->block_bytes;
    x->pool.n_blocks = (uint32_t)kv->n_blocks;
    x->pool.model = x->model;
    uint8_t rnd[KVW_NONCE_LEN];
    if (kvw_nonce(rnd) != DUET_OK) return DUET_ERR_INTERNAL;
    for (int i = 0; i < 16; i++) snprintf(x->engine_id + 2 * i, 3, "%02x", rnd[i]);

    duet_status st = kvu_create(&x->ucx);
    if (st != DUET_OK) return st;
    x->be = mdl_backend(par_model(ctx->inst));
    bool direct = !kv->on_device || kvu_supports_device_memory(x->ucx);
    x->staged = x->staging_mode == STAGE_ON || (x->staging_mode == STAGE_AUTO && !direct);
    if (!x->staged && !direct) {
        LOG_ERROR("kv: the KV cache is in device memory, this UCX build cannot read it and "
                  "--kv-staging is off");
        return DUET_ERR_UNSUPPORTED;
    }
    if (x->staged) {
        size_t want = (size_t)x->staging_bytes;
        size_t slots = want / kv->block_bytes;
        if (slots > (size_t)kv->n_blocks) slots = (size_t)kv->n_blocks;
        if (slots < 1) slots = 1;
        x->stage.n_slots = (int)slots;
        x->stage.used = calloc(slots, 1);
        void *base = NULL;
        st = x->stage.used ? kvu_alloc(x->ucx, slots * kv->block_bytes, &base, &x->stage.reg)
                           : DUET_ERR_NO_MEMORY;
        if (st != DUET_OK) return st;
        x->stage.base = base;
        if (x->be->ops->host_pin &&
            x->be->ops->host_pin(x->be, base, slots * kv->block_bytes) == DUET_OK)
            x->stage.pinned = true;
        LOG_INFO("kv: KV moves through a %zu MiB host staging area (%zu blocks)%s",
                 (slots * kv->block_bytes) >> 20, slots, x->stage.pinned ? ", page-locked" : "");
    } else {
        st = kvu_register(x->ucx, kv->data, kv->block_bytes * (size_t)kv->n_blocks, kv->on_device,
                          &x->region);
        if (st != DUET_OK) return st;
    }

    if (uv_loop_init(&x->loop) != 0) return DUET_ERR_INTERNAL;
    x->loop_ready = true;
    uv_async_init(&x->loop, &x->async, on_async);
    x->async.data = x;
    uv_timer_init(&x->loop, &x->ucx_tick);
    x->ucx_tick.data = x;
    uv_timer_start(&x->ucx_tick, ucx_tick, 1, 1);
    uv_idle_init(&x->loop, &x->ucx_hot);
    x->ucx_hot.data = x;
    uv_timer_init(&x->loop, &x->sweep);
    x->sweep.data = x;
    uv_timer_start(&x->sweep, sweep, 5, 5);
    if (ctx->role == SRV_ROLE_PREFILL) {
        int port = (x->kv_port ? x->kv_port : ctx->http_port - ctx->dp_rank + 1000) + ctx->dp_rank;
        x->kv_port = port;
        struct sockaddr_storage sa;
        const char *bind_host = ctx->host && ctx->host[0] ? ctx->host : "0.0.0.0";
        int rc = uv_ip4_addr(bind_host, port, (struct sockaddr_in *)&sa);
        if (rc != 0) rc = uv_ip6_addr(bind_host, port, (struct sockaddr_in6 *)&sa);
        if (rc != 0) rc = uv_ip4_addr("0.0.0.0", port, (struct sockaddr_in *)&sa);
        uv_tcp_init(&x->loop, &x->listener);
        x->listener.data = x;
        rc = uv_tcp_bind(&x->listener, (const struct sockaddr *)&sa, 0);
        if (rc == 0) rc = uv_listen((uv_stream_t *)&x->listener, 128, on_connection);
        if (rc != 0) {
            LOG_ERROR("kv: cannot listen on the side channel port %d: %s", port, uv_strerror(rc));
            return DUET_ERR_IO;
        }
        LOG_INFO("kv: leasing KV blocks to decode workers on %s:%d (engine %s)", x->advertise_host,
                 port, x->engine_id);
    }
    if (uv_thread_create(&x->thread, thread_main, x) != 0) return DUET_ERR_INTERNAL;
    x->thread_started = true;
    return DUET_OK;
}

static void x_stop(void *state) {
    kvx *x = state;
    if (!x->thread_started) return;
    pthread_mutex_lock(&x->mu);
    x->stopping = true;
    pthread_mutex_unlock(&x->mu);
    uv_async_send(&x->async);
    uv_thread_join(&x->thread);
    x->thread_started = false;
    /* the backend goes with the engine, right after this: nothing of it may be used later */
    if (x->stage.pinned) x->be->ops->host_unpin(x->be, x->stage.base);
    x->stage.pinned = false;
}

/* ---- plug-in hooks: per request ---- */

static cJSON *x_lease_params(void *state, uint64_t engine_id, const char *request_id,
                             const int32_t *blocks, int n_blocks, int n_prompt) {
    (void)request_id;
    (void)n_prompt;
    kvx *x = state;
    cJSON *o = cJSON_CreateObject();
    cJSON *ids = cJSON_CreateArray();
    if (!o || !ids) {
        cJSON_Delete(o);
        cJSON_Delete(ids);
        return NULL;
    }
    for (int i = 0; i < n_blocks; i++) cJSON_AddItemToArray(ids, cJSON_CreateNumber(blocks[i]));
    char lease[32];
    snprintf(lease, sizeof lease, "%llu", (unsigned long long)engine_id);
    cJSON_AddBoolToObject(o, "do_remote_prefill", 1);
    cJSON_AddBoolToObject(o, "do_remote_decode", 0);
    cJSON_AddStringToObject(o, "remote_engine_id", x->engine_id);
    cJSON_AddItemToObject(o, "remote_block_ids", ids);
    cJSON_AddStringToObject(o, "remote_host", x->advertise_host);
    cJSON_AddNumberToObject(o, "remote_port", x->kv_port);
    cJSON_AddStringToObject(o, "remote_request_id", lease);
    cJSON_AddNumberToObject(o, "tp_size", x->ctx.tp_size);
    return o;
}

static duet_status bad(char *err, size_t len, const char *msg) {
    snprintf(err, len, "kv_transfer_params: %s", msg);
    return DUET_ERR_INVALID;
}

static duet_status x_parse_remote(void *state, const cJSON *params, int n_prompt, void **remote_p,
                                  char *err, size_t err_len) {
    (void)state;
    (void)n_prompt;
    const cJSON *host = cJSON_GetObjectItemCaseSensitive(params, "remote_host");
    const cJSON *port = cJSON_GetObjectItemCaseSensitive(params, "remote_port");
    const cJSON *eng = cJSON_GetObjectItemCaseSensitive(params, "remote_engine_id");
    const cJSON *rid = cJSON_GetObjectItemCaseSensitive(params, "remote_request_id");
    if (!cJSON_IsString(host) || !host->valuestring[0] || strlen(host->valuestring) >= KVX_MAX_HOST)
        return bad(err, err_len, "remote_host must be a host name");
    if (!cJSON_IsNumber(port) || port->valuedouble < 1 || port->valuedouble > 65535 ||
        port->valuedouble != (int)port->valuedouble)
        return bad(err, err_len, "remote_port must be a port number");
    if (!cJSON_IsString(eng) || strlen(eng->valuestring) >= 64)
        return bad(err, err_len, "remote_engine_id must be a string");
    char *end = NULL;
    unsigned long long lease = cJSON_IsString(rid) ? strtoull(rid->valuestring, &end, 10) : 0;
    if (!cJSON_IsString(rid) || !rid->valuestring[0] || *end)
        return bad(err, err_len, "remote_request_id must be the prefill worker's lease id");
    kvx_remote *r = calloc(1, sizeof *r);
    if (!r) return DUET_ERR_NO_MEMORY;
    snprintf(r->host, sizeof r->host, "%s", host->valuestring);
    r->port = port->valueint;
    snprintf(r->engine_id, sizeof r->engine_id, "%s", eng->valuestring);
    r->lease = lease;
    *remote_p = r;
    return DUET_OK;
}

static void x_free_remote(void *state, void *remote) {
    (void)state;
    free(remote);
}

/* Engine thread: queue the pull for the transfer thread. */
static duet_status x_fetch(void *user, uint64_t id, void *remote, const int32_t *blocks,
                           int n_blocks, int skip_blocks, int n_tokens) {
    kvx *x = user;
    if (!remote || !x->thread_started) return DUET_ERR_INVALID;
    kvx_job *j = calloc(1, sizeof *j);
    if (!j) return DUET_ERR_NO_MEMORY;
    j->local = malloc((size_t)n_blocks * sizeof(int32_t));
    if (!j->local) {
        free(j);
        return DUET_ERR_NO_MEMORY;
    }
    memcpy(j->local, blocks, (size_t)n_blocks * sizeof(int32_t));
    j->id = id;
    j->rem = *(kvx_remote *)remote;
    j->n_blocks = n_blocks;
    j->skip = skip_blocks;
    j->n_tokens = n_tokens;
    j->t0 = clock_now_s();
    j->deadline = j->t0 + x->timeout_s;
    pthread_mutex_lock(&x->mu);
    bool stopping = x->stopping;
    if (!stopping) {
        j->next = x->inbox;
        x->inbox = j;
    }
    pthread_mutex_unlock(&x->mu);
    if (stopping) {
        job_free(j);
        return DUET_ERR_BUSY;
    }
    uv_async_send(&x->async);
    return DUET_OK;
}

static char *x_metrics_text(void *state, const char *label) {
    kvx *x = state;
    kvx_stats st;
    pthread_mutex_lock(&x->stats_mu);
    st = x->stats;
    pthread_mutex_unlock(&x->stats_mu);
    size_t cap = 4096;
    char *t = malloc(cap);
    if (!t) return NULL;
    snprintf(t, cap,
             "# HELP duet_kv_pulls_total KV pulls from prefill workers, by result.\n"
             "# TYPE duet_kv_pulls_total counter\n"
             "duet_kv_pulls_total{%s,result=\"ok\"} %llu\n"
             "duet_kv_pulls_total{%s,result=\"failed\"} %llu\n"
             "# HELP duet_kv_pull_bytes_total Bytes of KV read from prefill workers.\n"
             "# TYPE duet_kv_pull_bytes_total counter\n"
             "duet_kv_pull_bytes_total{%s} %llu\n"
             "# HELP duet_kv_pull_reads_total UCX reads issued (contiguous runs coalesced).\n"
             "# TYPE duet_kv_pull_reads_total counter\n"
             "duet_kv_pull_reads_total{%s} %llu\n"
             "# HELP duet_kv_pull_seconds_total Time spent in successful KV pulls.\n"
             "# TYPE duet_kv_pull_seconds_total counter\n"
             "duet_kv_pull_seconds_total{%s} %.6f\n"
             "# HELP duet_kv_lease_pins_total Lease pins answered to decode workers, by result.\n"
             "# TYPE duet_kv_lease_pins_total counter\n"
             "duet_kv_lease_pins_total{%s,result=\"ok\"} %llu\n"
             "duet_kv_lease_pins_total{%s,result=\"gone\"} %llu\n"
             "# HELP duet_kv_peers_refused_total Side-channel peers refused (authentication, "
             "layout).\n"
             "# TYPE duet_kv_peers_refused_total counter\n"
             "duet_kv_peers_refused_total{%s} %llu\n",
             label, (unsigned long long)st.fetches_ok, label, (unsigned long long)st.fetches_failed,
             label, (unsigned long long)st.bytes_read, label, (unsigned long long)st.gets_issued,
             label, st.fetch_seconds_total, label, (unsigned long long)st.pins_served, label,
             (unsigned long long)st.pins_refused, label, (unsigned long long)st.peers_refused);
    return t;
}

duet_status kvx_create(srv_kv_plugin *plugin) {
    kvx *x = calloc(1, sizeof *x);
    if (!x) return DUET_ERR_NO_MEMORY;
    pthread_mutex_init(&x->mu, NULL);
    pthread_mutex_init(&x->stats_mu, NULL);
    duet__kv__pool_info__init(&x->pool);
    memset(plugin, 0, sizeof *plugin);
    plugin->state = x;
    plugin->add_options = x_add_options;
    plugin->start = x_start;
    plugin->stop = x_stop;
    plugin->lease_params = x_lease_params;
    plugin->parse_remote = x_parse_remote;
    plugin->free_remote = x_free_remote;
    plugin->fetch = x_fetch;
    plugin->metrics_text = x_metrics_text;
    return DUET_OK;
}

void kvx_destroy(srv_kv_plugin *plugin) {
    kvx *x = plugin->state;
    if (!x) return;
    x_stop(x);
    if (x->loop_ready) uv_loop_close(&x->loop);
    pins_free(x, x->orphans);
    x->orphans = NULL;
    kvu_region_destroy(x->ucx, x->stage.reg); /* unmapping frees UCX-allocated memory */
    free(x->stage.used);
    kvu_region_destroy(x->ucx, x->region);
    kvu_destroy(x->ucx);
    pthread_mutex_destroy(&x->mu);
    pthread_mutex_destroy(&x->stats_mu);
    free(x);
    plugin->state = NULL;
}

void kvx_get_stats(const srv_kv_plugin *plugin, kvx_stats *st) {
    kvx *x = plugin->state;
    pthread_mutex_lock(&x->stats_mu);
    *st = x->stats;
    pthread_mutex_unlock(&x->stats_mu);
}
