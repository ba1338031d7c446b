/* The decode side of KV transfer; see kv_pull.h. Everything below the hooks runs on the
 * transfer thread of transport/kv_link.h, which owns the peers and their jobs; the engine thread
 * hands pulls over through a locked inbox and kvl_wake, and results go back through the engine's
 * thread-safe eng_kv_fetched. */
#include "kv_pull.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/clock.h"
#include "base/log.h"
#include "kv_link.h"

typedef struct kvpull kvpull;
typedef struct kvpull_peer kvpull_peer;

/* A staged transfer moves its blocks in chunks, each in a lane of its own (a run of staging
 * slots): UCX reads into the slots, then the backend copies them host->device into the cache
 * while the other lanes read (or copy) the next chunks. */
enum lane_state { LANE_FREE, LANE_READING, LANE_COPYING };

typedef struct kvpull_job kvpull_job;

typedef struct kvpull_lane {
    kvpull_job *job;
    enum lane_state state;
    int first, n;  /* the job's blocks [first, first + n) */
    int slot0;     /* staging slots [slot0, slot0 + n) */
    int gets_left; /* READING: reads not yet completed */
    void *copy;    /* COPYING: the host->device copy's ticket */
} kvpull_lane;

struct kvpull_job {
    uint64_t id;
    srv_kv_params rem;
    int32_t *local; /* this engine's blocks to fill, [n_blocks] */
    int n_blocks, skip, n_tokens;
    uint64_t seq;
    int gets_left;
    bool pinned, failed, reported;
    uint32_t *remote_ids; /* from the pin reply: where to read, [skip + n_blocks] */
    size_t n_remote;
    bool staged;    /* reads go through staging lanes */
    size_t ready;   /* remote_ids [0, ready) are readable (a streamed pin grows it) */
    int issued;     /* direct and CUDA IPC: blocks [0, issued) have their reads or copies
                     * issued (a pin of a prompt still being computed grows ready, and more
                     * are issued as it does) */
    size_t partial; /* direct: remote_ids [ready, partial) hold their first `layers` layers */
    int layers;
    uint16_t *lread; /* direct: layers of each of the job's blocks read so far [n_blocks] */
    bool ipc;        /* CUDA IPC: copies from the mapped prefill cache */
    void *ipc_copy;  /* CUDA IPC: the device-to-device copy in flight */
    kvpull_lane lanes[KVL_MAX_CHUNKS_IN_FLIGHT];
    int next_block;  /* staged: the first block no lane has taken yet */
    int blocks_done; /* staged: blocks copied into the cache */
    double retry_at; /* > 0: pin (busy prefill) or read (no local slots) again then */
    char err[400];
    double deadline, t0;
    uint64_t bytes;
    kvpull_peer *peer;
    struct kvpull_job *next;
};

enum peer_state { PEER_CONNECTING, PEER_HELLO, PEER_AUTH_SENT, PEER_READY, PEER_DEAD };

struct kvpull_peer {
    kvpull *x;
    char host[SRV_KV_HOST_MAX];
    int port;
    enum peer_state state;
    uv_tcp_t tcp;
    uv_connect_t conn_req;
    uv_getaddrinfo_t gai;
    bool tcp_open;
    kvw_reader rd;
    uint8_t nonce_s[KVW_NONCE_LEN], nonce_c[KVW_NONCE_LEN];
    char engine_id[SRV_KV_ENGINE_ID_MAX];
    uint32_t remote_blocks; /* the prefill pool's size, to check the ids it pins */
    bool gai_pending;
    kvu_peer *up;
    void *ipc_base;      /* CUDA IPC: the prefill's cache mapped here (NULL: UCX) */
    uint32_t ipc_blocks; /* its block count */
    kvpull_job *jobs;    /* waiting for the peer, pinning, or reading */
    uint64_t next_seq;
    struct kvpull_peer *next;
};

struct kvpull {
    kvl_options common;
    double timeout_s;
    kvl_link *link;
    eng_engine *engine;
    be_kv *kv;

    pthread_mutex_t mu; /* inbox and closed */
    kvpull_job *inbox;
    bool closed;

    kvpull_peer *peers;
    kvpull_stats stats;
    pthread_mutex_t stats_mu;
};

static void count_ok(kvpull *x, const kvpull_job *j) {
    pthread_mutex_lock(&x->stats_mu);
    x->stats.fetches_ok++;
    x->stats.bytes_read += j->bytes;
    x->stats.fetch_seconds_total += clock_now_s() - j->t0;
    pthread_mutex_unlock(&x->stats_mu);
}

static void count(kvpull *x, uint64_t *field) {
    pthread_mutex_lock(&x->stats_mu);
    (*field)++;
    pthread_mutex_unlock(&x->stats_mu);
}

/* ---- decode side: jobs ---- */

static int lanes_busy(const kvpull_job *j) {
    int n = 0;
    for (int i = 0; i < KVL_MAX_CHUNKS_IN_FLIGHT; i++) n += j->lanes[i].state != LANE_FREE;
    return n;
}

/* Gives a lane's slots back; a host->device copy still running is waited for first, so nothing
 * lands in blocks the engine frees after the report. Reads are over by now (completed, or the
 * endpoint was closed, which completes them). */
static void lane_release(kvpull *x, kvpull_lane *ln) {
    if (ln->state == LANE_FREE) return;
    if (ln->state == LANE_COPYING && ln->copy) {
        duet_status st = kvl_copy_poll(x->link, ln->copy, true);
        if (st != DUET_OK && !ln->job->failed) {
            ln->job->failed = true;
            snprintf(ln->job->err, sizeof ln->job->err, "copying the KV into the cache failed: %s",
                     duet_strerror(st));
        }
    }
    for (int i = 0; i < ln->n; i++) {
        int32_t slot = ln->slot0 + i;
        kvl_stage_free(x->link, &slot, 1);
    }
    ln->copy = NULL;
    ln->state = LANE_FREE;
}

static void job_fail(kvpull_job *j, const char *fmt, const char *a);

static void job_report(kvpull *x, kvpull_job *j) {
    if (j->reported) return;
    j->reported = true;
    if (j->ipc_copy) { /* it writes the blocks the engine frees on a failure */
        duet_status st = kvl_copy_poll(x->link, j->ipc_copy, true);
        j->ipc_copy = NULL;
        if (st != DUET_OK)
            job_fail(j, "copying the KV from the prefill's cache failed: %s", duet_strerror(st));
    }
    for (int i = 0; i < KVL_MAX_CHUNKS_IN_FLIGHT; i++) lane_release(x, &j->lanes[i]);
    if (j->failed) {
        LOG_WARN("kv: request %llu: %s", (unsigned long long)j->id, j->err);
        count(x, &x->stats.fetches_failed);
        eng_kv_fetched(x->engine, j->id, false, j->err);
    } else {
        count_ok(x, j);
        eng_kv_fetched(x->engine, j->id, true, NULL);
    }
}

static void job_free(kvpull_job *j) {
    free(j->local);
    free(j->remote_ids);
    free(j->lread);
    free(j);
}

static void job_fail(kvpull_job *j, const char *fmt, const char *a) {
    if (j->failed) return;
    j->failed = true;
    snprintf(j->err, sizeof j->err, fmt, a);
}

static void peer_unlink_job(kvpull_peer *p, kvpull_job *j) {
    for (kvpull_job **l = &p->jobs; *l; l = &(*l)->next)
        if (*l == j) {
            *l = j->next;
            break;
        }
}

/* The job is done (every read completed): release the lease and report. */
static void job_finish(kvpull *x, kvpull_job *j) {
    kvpull_peer *p = j->peer;
    if (p) {
        peer_unlink_job(p, j);
        if (j->pinned && p->state == PEER_READY) {
            Duet__Kv__Release rel = DUET__KV__RELEASE__INIT;
            rel.lease = j->rem.lease;
            Duet__Kv__Envelope env = DUET__KV__ENVELOPE__INIT;
            env.msg_case = DUET__KV__ENVELOPE__MSG_RELEASE;
            env.release = &rel;
            kvl_send(&p->tcp, &env);
        }
    }
    job_report(x, j);
    job_free(j);
}

static void peer_close(kvpull_peer *p, const char *why);

static void get_done(void *arg, duet_status st) {
    kvpull_job *j = arg;
    if (st != DUET_OK) job_fail(j, "KV read from the prefill worker failed: %s", duet_strerror(st));
    /* a closing peer reports its jobs itself once every read has come back; more reads may
     * follow while the prefill computes */
    if (--j->gets_left == 0 && j->peer->state != PEER_DEAD &&
        (j->failed || j->issued == j->n_blocks))
        job_finish(j->peer->x, j);
}

static void job_advance(kvpull *x, kvpull_job *j);

static void lane_get_done(void *arg, duet_status st) {
    kvpull_lane *ln = arg;
    kvpull_job *j = ln->job;
    if (st != DUET_OK) job_fail(j, "KV read from the prefill worker failed: %s", duet_strerror(st));
    /* a closing peer reports its jobs itself once every read has come back */
    if (--ln->gets_left == 0 && j->peer->state != PEER_DEAD) job_advance(j->peer->x, j);
}

/* Takes the next chunk into a free lane and issues its reads (runs whose remote ids are
 * consecutive become one read; the lane's slots are consecutive). 1: issued; 0: no staging
 * room now; 2: the prefill has not copied the chunk yet (streamed pin); -1: failed. */
static int lane_issue(kvpull *x, kvpull_job *j, kvpull_lane *ln) {
    kvpull_peer *p = j->peer;
    int n = kvl_chunk_blocks(x->link);
    if (n > j->n_blocks - j->next_block) n = j->n_blocks - j->next_block;
    long avail = (long)j->ready - j->skip - j->next_block; /* streamed: copied so far */
    if (avail < n) return 2; /* wait until the whole chunk is copied */
    int s0 = kvl_stage_alloc_run(x->link, n);
    if (s0 == -1) return 0;
    if (s0 < 0) {
        job_fail(j, "the KV chunk does not fit the staging area (--kv-staging-bytes)%s", "");
        return -1;
    }
    *ln = (kvpull_lane){.job = j,
                        .state = LANE_READING,
                        .first = j->next_block,
                        .n = n,
                        .slot0 = s0,
                        .gets_left = 1 /* held until every read is issued */};
    j->next_block += n;
    const uint32_t *remote = j->remote_ids + j->skip;
    size_t bb = x->kv->block_bytes;
    for (int i = ln->first; i < ln->first + n;) {
        int k = i + 1;
        while (k < ln->first + n && remote[k] == remote[k - 1] + 1) k++;
        if ((uint64_t)remote[i] + (uint64_t)(k - i) > p->remote_blocks) {
            job_fail(j, "the prefill worker pinned block ids outside its pool%s", "");
            break;
        }
        size_t len = (size_t)(k - i) * bb;
        uint8_t *local = kvl_base(x->link) + (size_t)(s0 + i - ln->first) * bb;
        ln->gets_left++;
        j->bytes += len;
        count(x, &x->stats.gets_issued);
        duet_status st = kvu_get(p->up, kvl_region(x->link), local, len, (uint64_t)remote[i] * bb,
                                 lane_get_done, ln);
        if (st != DUET_OK) {
            ln->gets_left--;
            job_fail(j, "KV read could not start: %s", duet_strerror(st));
            break;
        }
        i = k;
    }
    ln->gets_left--;
    return j->failed ? -1 : 1;
}

/* Moves a staged job's lanes along until nothing changes: finished copies free their lanes,
 * finished reads start their copies, free lanes take the next chunks. The job is finished
 * (released, reported, freed) once every block is in the cache, or once it failed and no lane
 * is busy; the caller must not touch j afterwards. */
static void job_advance(kvpull *x, kvpull_job *j) {
    int n_lanes = kvl_chunks_in_flight(x->link);
    bool no_room = false;
    for (bool moved = true; moved;) {
        moved = false;
        for (int i = 0; i < n_lanes; i++) {
            kvpull_lane *ln = &j->lanes[i];
            if (ln->state == LANE_COPYING) {
                duet_status st = kvl_copy_poll(x->link, ln->copy, false);
                if (st == DUET_ERR_BUSY) continue;
                ln->copy = NULL;
                if (st != DUET_OK)
                    job_fail(j, "copying the KV into the cache failed: %s", duet_strerror(st));
                else
                    j->blocks_done += ln->n;
                lane_release(x, ln);
                moved = true;
            } else if (ln->state == LANE_READING && ln->gets_left == 0) {
                moved = true;
                duet_status st = DUET_OK;
                if (!j->failed)
                    st = kvl_stage_copy_start(x->link, j->local + ln->first, ln->slot0, ln->n,
                                              false, &ln->copy);
                if (st != DUET_OK)
                    job_fail(j, "copying the KV into the cache failed: %s", duet_strerror(st));
                if (!j->failed && ln->copy) {
                    ln->state = LANE_COPYING;
                    continue;
                }
                if (!j->failed) j->blocks_done += ln->n; /* copied at once (host cache) */
                lane_release(x, ln);
            }
        }
        for (int i = 0; i < n_lanes && !j->failed && j->next_block < j->n_blocks; i++) {
            if (j->lanes[i].state != LANE_FREE) continue;
            int rc = lane_issue(x, j, &j->lanes[i]);
            no_room = rc == 0;
            if (rc == 2) count(x, &x->stats.ready_waits);
            if (rc == 0 || rc == 2) break;
            moved = true;
        }
    }
    kvl_ucx_heat(x->link);
    int busy = lanes_busy(j);
    if (busy == 0 && (j->failed || j->blocks_done == j->n_blocks)) {
        job_finish(x, j);
        return;
    }
    if (busy == 0 && no_room) j->retry_at = clock_now_s() + 0.005; /* the staging area is full */
}

/* Blocks of the job that the prefill says are readable now. */
static int job_avail(const kvpull_job *j) {
    long a = (long)j->ready - j->skip;
    return a < 0 ? 0 : a > j->n_blocks ? j->n_blocks : (int)a;
}

/* Direct: one read of bytes [off, off + len) of the job's blocks [i, k) (consecutive on both
 * sides), into the same bytes of the local blocks. Fails the job on an error. */
static void job_get(kvpull *x, kvpull_job *j, int i, int k, size_t off, size_t len) {
    kvpull_peer *p = j->peer;
    size_t bb = x->kv->block_bytes;
    uint32_t r0 = j->remote_ids[j->skip + i];
    if ((uint64_t)r0 + (uint64_t)(k - i) > p->remote_blocks) {
        job_fail(j, "the prefill worker pinned block ids outside its pool%s", "");
        return;
    }
    uint8_t *local = (uint8_t *)x->kv->data + (size_t)j->local[i] * bb + off;
    j->gets_left++;
    j->bytes += len;
    count(x, &x->stats.gets_issued);
    duet_status st =
        kvu_get(p->up, kvl_region(x->link), local, len, (uint64_t)r0 * bb + off, get_done, j);
    if (st != DUET_OK) {
        j->gets_left--;
        job_fail(j, "KV read could not start: %s", duet_strerror(st));
    }
}

/* Reads the pinned blocks. Direct: into the cache, runs where both the remote ids and the local
 * blocks are consecutive as one read each, those readable now (all, unless the prefill is
 * still computing the prompt: then each Ready issues the next ones). Staged: chunk by chunk
 * through lanes (job_advance); without free staging slots it tries again a little later. */
static void job_start_reads(kvpull *x, kvpull_job *j) {
    j->retry_at = 0;
    if (j->staged) {
        job_advance(x, j);
        return;
    }
    int avail = job_avail(j);
    /* the chunk under way (read in place): blocks [avail, part) have their first j->layers
     * layers written */
    long pa = (long)j->partial - j->skip;
    int part = j->layers > 0 && pa > avail ? (pa > j->n_blocks ? j->n_blocks : (int)pa) : avail;
    const uint32_t *remote = j->remote_ids;
    be_kv *kv = x->kv;
    size_t bb = kv->block_bytes, lb = bb / (size_t)kv->n_layers;
    j->gets_left++; /* held until every read is issued */
    /* whole blocks not read yet: runs where both the remote ids and the local blocks are
     * consecutive as one read each */
    for (int i = j->issued; i < avail && !j->failed;) {
        const int32_t *dst = j->local;
        int k = i + 1;
        while (k < avail && !j->lread[i] && !j->lread[k] &&
               remote[j->skip + k] == remote[j->skip + k - 1] + 1 && dst[k] == dst[k - 1] + 1)
            k++;
        /* a block whose first layers were read while it was computed: the rest of it */
        size_t off = (size_t)j->lread[i] * lb;
        if (off < (size_t)(k - i) * bb) job_get(x, j, i, k, off, (size_t)(k - i) * bb - off);
        for (int b = i; b < k; b++) j->lread[b] = (uint16_t)kv->n_layers;
        i = k;
    }
    if (avail > j->issued) j->issued = avail;
    /* the chunk under way: each block's layers not read yet, up to those written */
    for (int b = avail; b < part && !j->failed; b++) {
        int l0 = j->lread[b], l1 = j->layers < kv->n_layers ? j->layers : kv->n_layers;
        if (l1 <= l0) continue;
        job_get(x, j, b, b + 1, (size_t)l0 * lb, (size_t)(l1 - l0) * lb);
        j->lread[b] = (uint16_t)l1;
        count(x, &x->stats.layer_reads);
    }
    if (--j->gets_left == 0 && (j->failed || j->issued == j->n_blocks)) {
        job_finish(x, j);
        return;
    }
    kvl_ucx_heat(x->link);
}

/* CUDA IPC: the pinned blocks of the mapped prefill cache are copied device to device into the
 * cache, those readable now, one copy at a time (role_progress polls it and calls this again);
 * the job finishes once every block is copied, or once it failed and no copy runs. */
static void job_ipc_more(kvpull *x, kvpull_job *j) {
    kvpull_peer *p = j->peer;
    if (j->ipc_copy) return;
    int avail = job_avail(j);
    if (j->failed || (avail <= j->issued && j->issued == j->n_blocks)) {
        job_finish(x, j);
        return;
    }
    if (avail <= j->issued) return; /* Ready messages will come */
    void *t = NULL;
    duet_status st = kvl_ipc_copy_start(x->link, j->local + j->issued, avail - j->issued,
                                        p->ipc_base, j->remote_ids + j->skip + j->issued, &t);
    if (st != DUET_OK) {
        job_fail(j, "copying the KV from the prefill's cache failed: %s", duet_strerror(st));
        job_finish(x, j);
        return;
    }
    count(x, &x->stats.gets_issued);
    j->bytes += (uint64_t)(avail - j->issued) * x->kv->block_bytes;
    j->issued = avail;
    j->ipc_copy = t;
    if (!t) {
        job_ipc_more(x, j); /* copied at once: finished, or waits for Ready */
        return;
    }
    kvl_ucx_heat(x->link); /* role_progress polls the copy */
}

/* The pin reply's block ids, checked (enough of them; for CUDA IPC, ids inside the mapped
 * pool) and kept, with how many are readable now. False: the job failed and finished. */
static bool job_take_ids(kvpull *x, kvpull_job *j, const uint32_t *remote, size_t n_remote,
                         size_t ready) {
    const char *why = NULL;
    if (n_remote < (size_t)(j->skip + j->n_blocks))
        why = "the prefill worker's lease holds fewer blocks than the prompt needs%s";
    for (int i = 0; !why && j->peer->ipc_base && i < j->n_blocks; i++)
        if (remote[j->skip + i] >= j->peer->ipc_blocks)
            why = "the prefill worker pinned block ids outside its pool%s";
    if (!why && !(j->remote_ids = malloc((n_remote ? n_remote : 1) * sizeof(uint32_t))))
        why = "out of memory%s";
    if (!why && !(j->lread = calloc((size_t)(j->n_blocks ? j->n_blocks : 1), sizeof *j->lread)))
        why = "out of memory%s";
    if (why) {
        job_fail(j, why, "");
        job_finish(x, j);
        return false;
    }
    memcpy(j->remote_ids, remote, n_remote * sizeof(uint32_t));
    j->n_remote = n_remote;
    j->ready = ready < n_remote ? ready : n_remote;
    return true;
}

/* Reads (or, CUDA IPC, copies) the pinned blocks, as many as are readable now. */
static void job_read(kvpull *x, kvpull_job *j, const uint32_t *remote, size_t n_remote,
                     size_t ready) {
    if (!job_take_ids(x, j, remote, n_remote, ready)) return;
    if (j->peer->ipc_base) {
        j->ipc = true;
        job_ipc_more(x, j);
        return;
    }
    j->staged = kvl_staged(x->link);
    job_start_reads(x, j);
}

static void job_pin(kvpull_job *j) {
    kvpull_peer *p = j->peer;
    j->retry_at = 0;
    Duet__Kv__Pin pin = DUET__KV__PIN__INIT;
    j->seq = ++p->next_seq;
    pin.seq = j->seq;
    pin.lease = j->rem.lease;
    pin.pool_ids = p->ipc_base != NULL;
    Duet__Kv__Envelope env = DUET__KV__ENVELOPE__INIT;
    env.msg_case = DUET__KV__ENVELOPE__MSG_PIN;
    env.pin = &pin;
    if (kvl_send(&p->tcp, &env) != DUET_OK) peer_close(p, "sending to the prefill worker failed");
}

/* ---- decode side: peers ---- */

static void peer_handle_closed(uv_handle_t *h) {
    kvpull_peer *p = h->data;
    kvw_reader_cleanup(&p->rd);
    free(p);
}

static void peer_destroy_later(kvpull_peer *p) {
    kvpull *x = p->x;
    for (kvpull_peer **l = &x->peers; *l; l = &(*l)->next)
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
static void peer_close(kvpull_peer *p, const char *why) {
    if (p->state == PEER_DEAD) return;
    p->state = PEER_DEAD;
    kvpull *x = p->x;
    for (kvpull_job *j = p->jobs; j; j = j->next) job_fail(j, "%s", why);
    if (p->up) {
        /* completes every read in flight (their callbacks run here, see get_done) */
        kvu_peer_destroy(kvl_ucx(x->link), p->up);
        p->up = NULL;
    }
    while (p->jobs) {
        kvpull_job *j = p->jobs;
        p->jobs = j->next;
        j->peer = NULL;
        job_report(x, j); /* waits for its device copy, if any */
        job_free(j);
    }
    kvl_ipc_close(x->link, p->ipc_base);
    p->ipc_base = NULL;
    peer_destroy_later(p);
}

static void peer_got(kvpull_peer *p, Duet__Kv__Envelope *env) {
    kvpull *x = p->x;
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
        kvw_mac(kvl_secret(x->link), "duet-kv-c", p->nonce_s, KVW_NONCE_LEN, p->nonce_c,
                KVW_NONCE_LEN, mac);
        auth.nonce.data = p->nonce_c;
        auth.nonce.len = KVW_NONCE_LEN;
        auth.mac.data = mac;
        auth.mac.len = KVW_MAC_LEN;
        auth.pool = (Duet__Kv__PoolInfo *)kvl_pool(x->link);
        auth.version = KVW_VERSION;
        Duet__Kv__Envelope out = DUET__KV__ENVELOPE__INIT;
        out.msg_case = DUET__KV__ENVELOPE__MSG_AUTH;
        out.auth = &auth;
        p->state = PEER_AUTH_SENT;
        if (kvl_send(&p->tcp, &out) != DUET_OK)
            peer_close(p, "sending to the prefill worker failed");
        return;
    }
    case DUET__KV__ENVELOPE__MSG_REFUSE: {
        count(x, &x->stats.peers_refused);
        snprintf(why, sizeof why, "KV transfer refused by the prefill worker %.100s:%d: %.160s",
                 p->host, p->port, env->refuse->reason ? env->refuse->reason : "?");
        LOG_ERROR("kv: %s", why);
        peer_close(p, why);
        return;
    }
    case DUET__KV__ENVELOPE__MSG_WELCOME: {
        Duet__Kv__Welcome *w = env->welcome;
        if (p->state != PEER_AUTH_SENT) break;
        if (!kvw_mac_ok(kvl_secret(x->link), "duet-kv-s", p->nonce_c, KVW_NONCE_LEN, p->nonce_s,
                        KVW_NONCE_LEN, w->mac.data, w->mac.len)) {
            snprintf(why, sizeof why,
                     "the prefill worker %.100s:%d failed authentication (wrong --kv-secret?)",
                     p->host, p->port);
            LOG_ERROR("kv: %s", why);
            peer_close(p, why);
            return;
        }
        if (!w->pool || !kvw_pools_compatible(kvl_pool(x->link), w->pool, why, sizeof why)) {
            LOG_ERROR("kv: prefill worker %.100s:%d: %s", p->host, p->port,
                      w->pool ? why : "no pool");
            peer_close(p, w->pool ? why : "the prefill worker sent no KV pool description");
            return;
        }
        snprintf(p->engine_id, sizeof p->engine_id, "%s", w->engine_id ? w->engine_id : "");
        duet_status st = kvu_peer_create(kvl_ucx(x->link), w->ucx_address.data, w->ucx_address.len,
                                         w->rkey.data, w->rkey.len, w->base_addr, &p->up);
        if (st != DUET_OK) {
            peer_close(p, "cannot open a UCX endpoint to the prefill worker");
            return;
        }
        p->remote_blocks = w->pool->n_blocks;
        if (w->cuda_ipc.len && w->boot_id && w->boot_id[0] && kvl_ipc_usable(x->link) &&
            !strcmp(w->boot_id, kvl_boot_id(x->link))) {
            /* the same host: map its cache and copy device to device, no UCX reads */
            if (kvl_ipc_open(x->link, w->cuda_ipc.data, w->cuda_ipc.len, &p->ipc_base) == DUET_OK) {
                p->ipc_blocks = w->ipc_blocks;
                LOG_INFO("kv: prefill worker %s:%d: its KV cache is mapped here (CUDA IPC)",
                         p->host, p->port);
            } else {
                p->ipc_base = NULL;
                LOG_WARN("kv: prefill worker %s:%d: cannot map its KV cache (CUDA IPC); reading "
                         "through UCX",
                         p->host, p->port);
            }
        }
        p->state = PEER_READY;
        for (kvpull_job *j = p->jobs, *next; j; j = next) {
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
        for (kvpull_job *j = p->jobs; j; j = j->next) {
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
            if (r->streamed) count(x, &x->stats.pins_streamed);
            if (r->streamed && r->layers > 0 && r->partial > r->ready) {
                j->partial = r->partial;
                j->layers = (int)r->layers;
            }
            job_read(x, j, r->block_ids, r->n_block_ids, r->streamed ? r->ready : r->n_block_ids);
            return;
        }
        return;
    }
    case DUET__KV__ENVELOPE__MSG_READY: { /* a streamed pin: more blocks are readable */
        Duet__Kv__Ready *r = env->ready;
        if (p->state != PEER_READY) break;
        for (kvpull_job *j = p->jobs; j; j = j->next) {
            if (j->seq != r->seq || !j->pinned || j->failed || !j->remote_ids) continue;
            if (!r->ok) {
                snprintf(why, sizeof why, "the prefill worker %.100s:%d failed lease %llu: %.160s",
                         p->host, p->port, (unsigned long long)j->rem.lease,
                         r->error ? r->error : "?");
                job_fail(j, "%s", why);
            } else if (r->ready > j->ready || (r->layers > 0 && r->partial > r->ready)) {
                if (r->ready > j->ready) j->ready = r->ready < j->n_remote ? r->ready : j->n_remote;
                j->partial = r->layers > 0 && r->partial > r->ready ? r->partial : j->ready;
                j->layers = r->layers > 0 && r->partial > r->ready ? (int)r->layers : 0;
                /* the prefill (or its copies) moves on: the deadline counts from here */
                j->deadline = clock_now_s() + x->timeout_s;
            }
            if (j->staged)
                job_advance(x, j);
            else if (j->ipc)
                job_ipc_more(x, j); /* after the copy in flight, if any */
            else if (j->failed && j->gets_left == 0)
                job_finish(x, j);
            else if (!j->failed && j->retry_at == 0)
                job_start_reads(x, j);
            return;
        }
        return; /* a pin this side gave up on */
    }
    default:
        break;
    }
    peer_close(p, "the prefill worker sent an unexpected message");
}

static void peer_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf) {
    kvpull_peer *p = s->data;
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
    kvpull_peer *p = c->data;
    if (p->state == PEER_DEAD) return;
    if (status != 0) {
        char why[300];
        snprintf(why, sizeof why, "cannot connect to the prefill worker %.100s:%d (%s)", p->host,
                 p->port, uv_strerror(status));
        peer_close(p, why);
        return;
    }
    p->state = PEER_HELLO;
    uv_read_start((uv_stream_t *)&p->tcp, kvl_alloc_cb, peer_read);
}

static void peer_resolved(uv_getaddrinfo_t *g, int status, struct addrinfo *res) {
    kvpull_peer *p = g->data;
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
    uv_tcp_init(kvl_loop(p->x->link), &p->tcp);
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

static kvpull_peer *peer_get(kvpull *x, const char *host, int port) {
    for (kvpull_peer *p = x->peers; p; p = p->next)
        if (p->port == port && !strcmp(p->host, host) && p->state != PEER_DEAD) return p;
    kvpull_peer *p = calloc(1, sizeof *p);
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
    if (uv_getaddrinfo(kvl_loop(x->link), &p->gai, peer_resolved, host, port_s, &hints) != 0) {
        x->peers = p->next;
        free(p);
        return NULL;
    }
    return p;
}

/* Jobs handed over by the engine thread join their peer's queue. */
static void take_inbox(kvpull *x) {
    pthread_mutex_lock(&x->mu);
    kvpull_job *j = x->inbox;
    x->inbox = NULL;
    pthread_mutex_unlock(&x->mu);
    /* the inbox is a stack: restore arrival order */
    kvpull_job *rev = NULL;
    while (j) {
        kvpull_job *n = j->next;
        j->next = rev;
        rev = j;
        j = n;
    }
    for (j = rev; j;) {
        kvpull_job *n = j->next;
        j->next = NULL;
        kvpull_peer *p = peer_get(x, j->rem.host, j->rem.port);
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

/* Timeouts and deferred retries: a job past its deadline closes its peer (completing its reads),
 * which fails every job of that peer. */
static void role_tick(void *arg, double now) {
    kvpull *x = arg;
    for (kvpull_peer *p = x->peers, *next; p; p = next) {
        next = p->next;
        char why[300];
        /* one retry per peer and tick: acting on a job may change the peer's list */
        for (kvpull_job *j = p->jobs; j; j = j->next) {
            if (j->retry_at > 0 && now >= j->retry_at && now < j->deadline && !j->failed) {
                if (j->pinned)
                    job_start_reads(x, j);
                else
                    job_pin(j);
                break;
            }
        }
        if (p->state == PEER_DEAD) continue;
        for (kvpull_job *j = p->jobs; j; j = j->next) {
            if (now < j->deadline) continue;
            snprintf(why, sizeof why,
                     "KV transfer from the prefill worker %.100s:%d timed out after %.0f s",
                     p->host, p->port, x->timeout_s);
            peer_close(p, why);
            break;
        }
    }
}

/* Host->device copies in flight: a finished one frees its lane for the next chunk. */
static bool role_progress(void *arg) {
    kvpull *x = arg;
    bool busy = false;
    for (kvpull_peer *p = x->peers; p; p = p->next) {
        if (p->state != PEER_READY) continue;
        for (kvpull_job *j = p->jobs, *next; j; j = next) {
            next = j->next;
            if (j->ipc_copy) {
                duet_status st = kvl_copy_poll(x->link, j->ipc_copy, false);
                if (st == DUET_ERR_BUSY) {
                    busy = true;
                    continue;
                }
                j->ipc_copy = NULL;
                if (st != DUET_OK)
                    job_fail(j, "copying the KV from the prefill's cache failed: %s",
                             duet_strerror(st));
                job_ipc_more(x, j); /* the next blocks, or the end */
                continue;
            }
            bool copying = false;
            for (int i = 0; i < KVL_MAX_CHUNKS_IN_FLIGHT; i++)
                copying |= j->lanes[i].state == LANE_COPYING;
            if (!copying) continue;
            busy = true;
            job_advance(x, j);
        }
    }
    return busy;
}

static void role_woken(void *arg) {
    take_inbox(arg);
}

/* Shutdown: every peer closes (failing its jobs), and so do pulls that raced it. */
static void role_close(void *arg) {
    kvpull *x = arg;
    pthread_mutex_lock(&x->mu);
    x->closed = true;
    pthread_mutex_unlock(&x->mu);
    while (x->peers) peer_close(x->peers, "the decode worker is shutting down");
    take_inbox(x);
    while (x->peers) peer_close(x->peers, "the decode worker is shutting down");
}

/* ---- plug-in hooks ---- */

/* Engine thread: queue the pull for the transfer thread. */
static duet_status x_fetch(void *user, uint64_t id, void *remote, const int32_t *blocks,
                           int n_blocks, int skip_blocks, int n_tokens) {
    kvpull *x = user;
    if (!remote || !x->link) return DUET_ERR_INVALID;
    kvpull_job *j = calloc(1, sizeof *j);
    if (!j) return DUET_ERR_NO_MEMORY;
    j->local = malloc((size_t)n_blocks * sizeof(int32_t));
    if (!j->local) {
        free(j);
        return DUET_ERR_NO_MEMORY;
    }
    memcpy(j->local, blocks, (size_t)n_blocks * sizeof(int32_t));
    j->id = id;
    j->rem = *(const srv_kv_params *)remote;
    j->n_blocks = n_blocks;
    j->skip = skip_blocks;
    j->n_tokens = n_tokens;
    j->t0 = clock_now_s();
    j->deadline = j->t0 + x->timeout_s;
    pthread_mutex_lock(&x->mu);
    bool stopping = x->closed;
    if (!stopping) {
        j->next = x->inbox;
        x->inbox = j;
    }
    pthread_mutex_unlock(&x->mu);
    if (stopping) {
        job_free(j);
        return DUET_ERR_BUSY;
    }
    kvl_wake(x->link);
    return DUET_OK;
}

static duet_status x_add_options(void *state, opt_parser *p) {
    kvpull *x = state;
    const opt_spec specs[] = {
        {.name = "--kv-transfer-timeout",
         .type = OPT_DOUBLE,
         .dest = &x->timeout_s,
         .def = "10",
         .min = 1e-3,
         .max = 1e6,
         .metavar = "S",
         .help = "fail a KV pull after S seconds"},
    };
    duet_status st = opt_add(p, "KV pulls (decode side)", specs, 1);
    return st == DUET_OK ? kvl_options_add(p, &x->common) : st;
}

static duet_status x_start(void *state, const srv_kv_context *ctx) {
    kvpull *x = state;
    if (ctx->role != SRV_ROLE_DECODE) return DUET_ERR_INVALID;
    x->engine = ctx->engine;
    x->kv = ctx->kv;
    kvl_role role = {.arg = x,
                     .woken = role_woken,
                     .tick = role_tick,
                     .progress = role_progress,
                     .close = role_close};
    return kvl_create(&x->common, ctx, &role, &x->link);
}

static void x_stop(void *state) {
    kvpull *x = state;
    kvl_stop(x->link);
}

static char *x_metrics_text(void *state, const char *label) {
    kvpull *x = state;
    kvpull_stats st;
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
             "# HELP duet_kv_peers_refused_total Side-channel peers refused (authentication, "
             "layout).\n"
             "# TYPE duet_kv_peers_refused_total counter\n"
             "duet_kv_peers_refused_total{%s} %llu\n"
             "# HELP duet_kv_pull_layer_reads_total Reads of a block's first layers while the "
             "prefill was still computing it (layer-wise pulls).\n"
             "# TYPE duet_kv_pull_layer_reads_total counter\n"
             "duet_kv_pull_layer_reads_total{%s} %llu\n",
             label, (unsigned long long)st.fetches_ok, label, (unsigned long long)st.fetches_failed,
             label, (unsigned long long)st.bytes_read, label, (unsigned long long)st.gets_issued,
             label, st.fetch_seconds_total, label, (unsigned long long)st.peers_refused, label,
             (unsigned long long)st.layer_reads);
    return t;
}

duet_status kvpull_create(srv_kv_plugin *plugin) {
    kvpull *x = calloc(1, sizeof *x);
    if (!x) return DUET_ERR_NO_MEMORY;
    pthread_mutex_init(&x->mu, NULL);
    pthread_mutex_init(&x->stats_mu, NULL);
    memset(plugin, 0, sizeof *plugin);
    plugin->state = x;
    plugin->add_options = x_add_options;
    plugin->start = x_start;
    plugin->stop = x_stop;
    plugin->fetch = x_fetch;
    plugin->metrics_text = x_metrics_text;
    return DUET_OK;
}

void kvpull_destroy(srv_kv_plugin *plugin) {
    kvpull *x = plugin->state;
    if (!x) return;
    kvl_destroy(x->link);
    pthread_mutex_destroy(&x->mu);
    pthread_mutex_destroy(&x->stats_mu);
    free(x);
    plugin->state = NULL;
}

void kvpull_get_stats(const srv_kv_plugin *plugin, kvpull_stats *st) {
    kvpull *x = plugin->state;
    pthread_mutex_lock(&x->stats_mu);
    *st = x->stats;
    pthread_mutex_unlock(&x->stats_mu);
}
