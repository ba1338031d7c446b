/* KV transfer between a prefill engine and a decode engine in one process, each with its own
 * transfer plug-in (thread, side channel on localhost, UCX): every golden case decoded after
 * pulling its prompt's KV gives the golden greedy ids; leases are freed after the pull; reads
 * are coalesced; a wrong secret, a different block size and an expired lease fail the request
 * cleanly and leave both pools full. With "staging", KV also moves through host staging areas,
 * and a decode whose area is a few blocks pulls large prompts as a pipeline of chunks; every
 * side also has --kv-cuda-ipc, which host caches must decline (UCX carries the KV). With
 * --kv-cache-dtype fp8 on both sides the e4m3 codes move and decode as the decode side's own
 * prompt would; an fp8 prefill and a float32 decode refuse each other at the handshake. */
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>

#include "base/opt.h"
#include "check.h"
#include "kv_link.h"
#include "kv_wire.h"
#include "golden.h"
#include "kv_lease.h"
#include "kv_pull.h"
#include "pd_side.h"
#include "base/log.h"

typedef pd_side side;

typedef struct rec {
    int32_t out[64];
    int n_out, n_final;
    eng_finish finish;
    char error[400];
    int32_t lease[64];
    int n_lease;
    int n_open; /* lease_open events */
} rec;

static rec R[64];
static golden_set G;

static void on_event(void *user, const eng_event *ev) {
    (void)user;
    rec *r = &R[ev->id % 64];
    if (ev->lease_open) {
        r->n_open++;
        if (ev->tokens || ev->finish) r->n_open += 100; /* an open event is nothing else */
        return;
    }
    for (int i = 0; i < ev->n_tokens && r->n_out < 64; i++) r->out[r->n_out++] = ev->tokens[i];
    if (ev->finish) {
        r->n_final++;
        r->finish = ev->finish;
        if (ev->error) snprintf(r->error, sizeof r->error, "%s", ev->error);
        if (ev->n_lease_blocks) {
            memcpy(r->lease, ev->lease_blocks, (size_t)ev->n_lease_blocks * sizeof(int32_t));
            r->n_lease = ev->n_lease_blocks;
        }
    }
}

static int g_port;
static const char *g_staging = "auto"; /* "on": both sides move KV through staging slots */
static const char *g_staging_bytes = "256M";
static const char *g_chunk_bytes = "16M";
static const char *g_in_flight = "3";
static bool g_ipc;   /* --kv-cuda-ipc on every side: host caches must fall back to UCX */
static int g_budget; /* > 0: --max-num-batched-tokens of the sides made now */
static dt_dtype g_kv_dtype = DT_COUNT; /* --kv-cache-dtype of the sides made now */

static int make_side(side *s, srv_role role, int block_size, int n_blocks, const char *secret,
                     double lease_s) {
    par_options po;
    par_options_init(&po);
    po.kv_dtype = g_kv_dtype;
    char *args[12] = {"x",
                      "--kv-secret",
                      (char *)secret,
                      "--kv-staging",
                      (char *)g_staging,
                      "--kv-staging-bytes",
                      (char *)g_staging_bytes,
                      "--kv-chunk-bytes",
                      (char *)g_chunk_bytes,
                      "--kv-chunks-in-flight",
                      (char *)g_in_flight,
                      g_ipc ? "--kv-cuda-ipc" : "--no-kv-cuda-ipc"};
    eng_config c;
    eng_config_default(&c);
    c.block_size = block_size;
    c.n_blocks = n_blocks;
    c.max_model_len = 1024;
    c.lease_timeout_s = lease_s;
    if (g_budget > 0) c.max_num_batched_tokens = g_budget;
    c.on_event = on_event;
    return pd_side_start(s, role, GOLDEN_DIR "/tiny-v3/model", &po, "test_kvx", 12, args, &c,
                         g_port);
}

static void free_side(side *s) {
    pd_side_stop(s);
}

static void step(side *s) {
    bool busy;
    CHECK(eng_step(s->eng, &busy) == DUET_OK);
    if (!busy) eng_wait(s->eng, 2);
}

static int free_blocks(side *s) {
    eng_stats st;
    eng_get_stats(s->eng, &st);
    return st.n_free_blocks;
}

static int leased(side *s) {
    eng_stats st;
    eng_get_stats(s->eng, &st);
    return st.n_leased;
}

/* Greedy request id of case k's prompt: the prefill's (leased, one token) or, remote given, the
 * decode's pulling it (the golden length). */
static void submit(side *s, int id, const golden_case *k, srv_kv_params *remote) {
    memset(&R[id], 0, sizeof R[id]);
    eng_request q = {.id = (uint64_t)id, .prompt = k->prompt, .n_prompt = k->n_prompt};
    eng_sampling_default(&q.sampling);
    q.sampling.smp.temperature = 0;
    q.sampling.max_tokens = remote ? k->n_greedy : 1;
    q.sampling.ignore_eos = true;
    q.kv_role = remote ? ENG_KV_REMOTE : ENG_KV_LEASE;
    q.remote = remote;
    char err[256];
    CHECK_MSG(eng_submit(s->eng, &q, err, sizeof err) == DUET_OK, "%s", err);
}

/* What the server passes from the prefill answer to the decode request (heap). */
static srv_kv_params *remote_of(side *p, int id) {
    srv_kv_params *remote = calloc(1, sizeof *remote);
    CHECK(remote && p->plug.lease(p->plug.state, (uint64_t)id, "req", remote) == DUET_OK);
    remote->lease = (uint64_t)id;
    return remote;
}

/* Prefill request id (lease) for case k, then the decode request pulling it. Returns the
 * decode record. */
static rec *pd_request(side *p, side *d, int id, const golden_case *k, int sleep_ms) {
    submit(p, id, k, NULL);
    for (int i = 0; i < 500 && !R[id].n_final; i++) step(p);
    CHECK(R[id].n_final == 1 && R[id].n_lease > 0);
    CHECK(R[id].n_out == 1 && R[id].out[0] == k->greedy[0]);
    srv_kv_params *remote = remote_of(p, id);
    if (sleep_ms) {
        for (int i = 0; i < sleep_ms / 5; i++) step(p); /* the prefill engine keeps stepping */
    }
    submit(d, id + 32, k, remote);
    for (int i = 0; i < 5000 && !R[id + 32].n_final; i++) {
        step(d);
        step(p);
    }
    for (int i = 0; i < 20; i++) step(p); /* lets the release reach the prefill engine */
    free(remote);
    return &R[id + 32];
}

/* Layer-wise pulls made certain: the prefill side's backend ops with a layer_mark that, once
 * armed, stops its forward after the second layer until the decode side has issued a read of
 * a block's first layers (or 2 s pass). Without it the forward of a tiny model's chunk is too
 * quick for the transfer thread's 1 ms polls to see it half done, sometimes. */
static be_ops g_hook_ops;
static const be_ops *g_hook_orig;
static side *g_hook_d;
static volatile bool g_hook_armed;

static void hooked_layer_mark(be_backend *be, int layer) {
    g_hook_orig->layer_mark(be, layer);
    if (!g_hook_armed || layer != 1) return;
    g_hook_armed = false;
    kvpull_stats st0, st;
    kvpull_get_stats(&g_hook_d->plug, &st0);
    for (int i = 0; i < 2000; i++) {
        kvpull_get_stats(&g_hook_d->plug, &st);
        if (st.layer_reads > st0.layer_reads) break;
        usleep(1000);
    }
}

static void hook_layers(side *p, side *d) {
    be_backend *be = mdl_backend(par_model(p->inst));
    g_hook_orig = be->ops;
    g_hook_ops = *be->ops;
    g_hook_ops.layer_mark = hooked_layer_mark;
    be->ops = &g_hook_ops;
    g_hook_d = d;
}

/* The decode pulls while the prefill computes the prompt (a chunk a step: the test steps the
 * prefill engine itself). The prefill computes its first chunk, which also admits it and
 * announces its lease; the decode request is submitted with the lease's params at once and
 * the prefill waits until the decode has pinned the lease (so the pin surely comes while the
 * prompt is being computed), then both step to the end. abort_after >= 0: the prefill request
 * is aborted after that many more steps. */
static rec *pd_overlap(side *p, side *d, int id, const golden_case *k, int abort_after) {
    submit(p, id, k, NULL);
    for (int i = 0; i < 100 && !R[id].n_open; i++) step(p);
    CHECK_MSG(R[id].n_open == 1 && R[id].n_final == 0 && R[id].n_out == 0,
              "lease_open events %d, final %d", R[id].n_open, R[id].n_final);
    srv_kv_params *remote = remote_of(p, id);
    kvlease_stats ls0, ls;
    kvlease_get_stats(&p->plug, &ls0);
    submit(d, id + 32, k, remote);
    ls = ls0;
    for (int i = 0; i < 3000 && ls.pins_computing == ls0.pins_computing; i++) {
        step(d);
        kvlease_get_stats(&p->plug, &ls);
    }
    CHECK_MSG(ls.pins_computing == ls0.pins_computing + 1 && R[id].n_final == 0,
              "the decode did not pin the lease while its prompt was computed (%llu)",
              (unsigned long long)(ls.pins_computing - ls0.pins_computing));
    if (g_hook_d) g_hook_armed = true; /* the next chunk waits for a layer read */
    for (int i = 0; i < abort_after; i++) step(p);
    if (abort_after >= 0) eng_abort(p->eng, (uint64_t)id);
    for (int i = 0; i < 5000 && !R[id + 32].n_final; i++) {
        step(p);
        step(d);
    }
    for (int i = 0; i < 20; i++) step(p); /* lets the release reach the prefill engine */
    free(remote);
    return &R[id + 32];
}

/* ---- a side-channel client of a given protocol version, with blocking sockets ---- */

static int raw_send(int fd, const Duet__Kv__Envelope *env) {
    uint8_t *buf;
    size_t len;
    if (kvw_encode(env, &buf, &len) != DUET_OK) return -1;
    ssize_t n = send(fd, buf, len, 0);
    free(buf);
    return n == (ssize_t)len ? 0 : -1;
}

/* The next envelope, or NULL when nothing arrives within the socket's receive timeout. */
static Duet__Kv__Envelope *raw_recv(int fd, kvw_reader *rd) {
    for (;;) {
        Duet__Kv__Envelope *env = NULL;
        if (kvw_reader_next(rd, &env) != DUET_OK) return NULL;
        if (env) return env;
        uint8_t buf[4096];
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n <= 0 || kvw_reader_feed(rd, buf, (size_t)n) != DUET_OK) return NULL;
    }
}

typedef struct raw_result {
    int n_ids;     /* block ids in the pin reply */
    bool streamed; /* the reply said Ready messages follow */
    int ready;     /* the ready count reached (the reply's, then the Ready messages') */
    int extra;     /* messages after the reply that were not a rising Ready */
} raw_result;

/* Connects to the prefill's side channel as a decode worker of protocol version `version` (1:
 * an Auth without a version, as version-1 workers send), pins lease, reads what follows for
 * 300 ms after the pin reply, releases (or, !release, closes without). 0 when the handshake and
 * the pin succeeded. */
static int raw_pin(int port, uint32_t version, const be_kv *kv, uint64_t lease, bool release,
                   raw_result *res) {
    memset(res, 0, sizeof *res);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        close(fd);
        return -1;
    }
    kvw_reader rd = {0};
    int rc = -1;
    Duet__Kv__Envelope *env = raw_recv(fd, &rd);
    if (!env || env->msg_case != DUET__KV__ENVELOPE__MSG_HELLO ||
        env->hello->nonce.len != KVW_NONCE_LEN || env->hello->version != KVW_VERSION)
        goto out;
    uint8_t nonce_s[KVW_NONCE_LEN], nonce_c[KVW_NONCE_LEN], mac[KVW_MAC_LEN];
    memcpy(nonce_s, env->hello->nonce.data, KVW_NONCE_LEN);
    duet__kv__envelope__free_unpacked(env, NULL);
    env = NULL;
    CHECK(kvw_nonce(nonce_c) == DUET_OK);
    kvw_mac("s3cret", "duet-kv-c", nonce_s, KVW_NONCE_LEN, nonce_c, KVW_NONCE_LEN, mac);
    Duet__Kv__PoolInfo pool = DUET__KV__POOL_INFO__INIT;
    pool.block_size = (uint32_t)kv->block_size;
    pool.n_layers = (uint32_t)kv->n_layers;
    pool.kv_dim = (uint32_t)kv->kv_dim;
    pool.dtype = (char *)dt_name(kv->dtype);
    pool.block_bytes = kv->block_bytes;
    pool.n_blocks = (uint32_t)kv->n_blocks;
    pool.model = "tiny";
    Duet__Kv__Auth auth = DUET__KV__AUTH__INIT;
    auth.nonce.data = nonce_c;
    auth.nonce.len = KVW_NONCE_LEN;
    auth.mac.data = mac;
    auth.mac.len = KVW_MAC_LEN;
    auth.pool = &pool;
    auth.version = version >= 2 ? version : 0;
    Duet__Kv__Envelope out = DUET__KV__ENVELOPE__INIT;
    out.msg_case = DUET__KV__ENVELOPE__MSG_AUTH;
    out.auth = &auth;
    if (raw_send(fd, &out) != 0) goto out;
    env = raw_recv(fd, &rd);
    if (!env || env->msg_case != DUET__KV__ENVELOPE__MSG_WELCOME) goto out;
    duet__kv__envelope__free_unpacked(env, NULL);
    Duet__Kv__Pin pin = DUET__KV__PIN__INIT;
    pin.seq = 7;
    pin.lease = lease;
    out = (Duet__Kv__Envelope)DUET__KV__ENVELOPE__INIT;
    out.msg_case = DUET__KV__ENVELOPE__MSG_PIN;
    out.pin = &pin;
    if (raw_send(fd, &out) != 0) goto out;
    env = raw_recv(fd, &rd);
    if (!env || env->msg_case != DUET__KV__ENVELOPE__MSG_PIN_REPLY || !env->pin_reply->ok ||
        env->pin_reply->seq != 7)
        goto out;
    res->n_ids = (int)env->pin_reply->n_block_ids;
    res->streamed = env->pin_reply->streamed;
    res->ready = res->streamed ? (int)env->pin_reply->ready : res->n_ids;
    duet__kv__envelope__free_unpacked(env, NULL);
    tv = (struct timeval){.tv_usec = 300000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    while ((env = raw_recv(fd, &rd)) != NULL) {
        if (env->msg_case == DUET__KV__ENVELOPE__MSG_READY && env->ready->ok &&
            env->ready->seq == 7 && (int)env->ready->ready > res->ready)
            res->ready = (int)env->ready->ready;
        else
            res->extra++;
        duet__kv__envelope__free_unpacked(env, NULL);
    }
    Duet__Kv__Release rel = DUET__KV__RELEASE__INIT;
    rel.lease = lease;
    out = (Duet__Kv__Envelope)DUET__KV__ENVELOPE__INIT;
    out.msg_case = DUET__KV__ENVELOPE__MSG_RELEASE;
    out.release = &rel;
    rc = release ? raw_send(fd, &out) : 0; /* else: vanish, pinned */
    env = NULL;
out:
    if (env) duet__kv__envelope__free_unpacked(env, NULL);
    kvw_reader_cleanup(&rd);
    close(fd);
    return rc;
}

/* A lease of case k's prompt on the prefill side (request id). */
static void make_lease(side *p, int id, const golden_case *k) {
    submit(p, id, k, NULL);
    for (int i = 0; i < 500 && !R[id].n_final; i++) step(p);
    CHECK(R[id].n_final == 1 && R[id].n_lease > 0);
}

/* The staging area's size: a prefill pins a staged lease whole, so by default the area holds
 * one prompt of max_model_len (V3: 8,192 tokens of 64-token blocks of 4,497,408 bytes are 128
 * blocks, 576 MB, more than the old fixed 256M's 59: those prompts were refused). */
static void test_staging_size(void) {
    const size_t v3 = 4497408;
    bool s;
    CHECK_EQ_INT((int)kvl_staging_blocks(0, 8192, 64, v3, 8402, &s), 128);
    CHECK(!s);
    /* at least 256M when one prompt needs less */
    CHECK_EQ_INT((int)kvl_staging_blocks(0, 1024, 64, v3, 8402, &s), 59);
    CHECK(!s);
    /* an explicit size is kept, and said short when it cannot hold one prompt */
    CHECK_EQ_INT((int)kvl_staging_blocks(256LL << 20, 8192, 64, v3, 8402, &s), 59);
    CHECK(s);
    CHECK_EQ_INT((int)kvl_staging_blocks(1LL << 30, 8192, 64, v3, 8402, &s), 238);
    CHECK(!s);
    /* never more than the pool, never less than one block; a decode (no lease length) */
    CHECK_EQ_INT((int)kvl_staging_blocks(0, 8192, 64, v3, 100, &s), 100);
    CHECK(!s);
    CHECK_EQ_INT((int)kvl_staging_blocks(1, 8192, 64, v3, 8402, &s), 1);
    CHECK(s);
    CHECK_EQ_INT((int)kvl_staging_blocks(0, 0, 64, v3, 8402, &s), 59);
    CHECK(!s);
}

/* --kv-cache-dtype fp8 on both sides: every case's pulled e4m3 prompt decodes to the ids the
 * decode side gets computing the prompt itself (the same codes); a float32 decode is refused at
 * the handshake naming both dtypes, and nothing leaks. */
static void test_fp8(int pf, int df) {
    g_port = pd_free_port();
    g_kv_dtype = DT_F8_E4M3;
    side p, d;
    CHECK(make_side(&p, SRV_ROLE_PREFILL, 16, 64, "s3cret", 30) == 0);
    CHECK(make_side(&d, SRV_ROLE_DECODE, 16, 64, "s3cret", 30) == 0);
    g_kv_dtype = DT_COUNT;
    CHECK(eng_kv(p.eng)->dtype == DT_F8_E4M3 && eng_kv(d.eng)->dtype == DT_F8_E4M3);
    CHECK(free_blocks(&p) == pf && free_blocks(&d) == df); /* the same blocks: --n-blocks */
    for (int i = 0; i < G.n; i++) {
        const golden_case *k = &G.cases[i];
        /* the decode side alone, twice: the prompt computed there into its own fp8 cache, then
         * again from its prefix cache (whole blocks), the same ids */
        rec local;
        eng_stats s0, s1;
        eng_get_stats(d.eng, &s0);
        for (int rep = 0; rep < 2; rep++) {
            int id = 40 + i % 8;
            memset(&R[id], 0, sizeof R[id]);
            eng_request q = {.id = (uint64_t)id, .prompt = k->prompt, .n_prompt = k->n_prompt};
            eng_sampling_default(&q.sampling);
            q.sampling.smp.temperature = 0;
            q.sampling.max_tokens = k->n_greedy;
            q.sampling.ignore_eos = true;
            char err[256];
            CHECK_MSG(eng_submit(d.eng, &q, err, sizeof err) == DUET_OK, "%s", err);
            for (int j = 0; j < 5000 && !R[id].n_final; j++) step(&d);
            CHECK(R[id].n_final == 1 && R[id].n_out == k->n_greedy);
            CHECK_MSG(rep == 0 || !memcmp(R[id].out, local.out, 4 * (size_t)local.n_out),
                      "fp8 %s: a prefix-cache hit decodes differently", k->name);
            local = R[id];
        }
        eng_get_stats(d.eng, &s1);
        CHECK_MSG(k->n_prompt <= 16 || s1.prefix_hits > s0.prefix_hits,
                  "fp8 %s: the repeated prompt of %d tokens hit no cached block", k->name,
                  k->n_prompt);
        rec *r = pd_request(&p, &d, 16 + i % 8, k, 0);
        CHECK_MSG(r->n_final == 1 && r->finish == ENG_FINISH_LENGTH, "fp8 %s: finish %d %s",
                  k->name, r->finish, r->error);
        CHECK_MSG(r->n_out == local.n_out && !memcmp(r->out, local.out, 4 * (size_t)r->n_out),
                  "fp8 %s: decode after the KV pull differs from the decode side's own", k->name);
    }
    for (int i = 0; i < 200 && leased(&p) > 0; i++) step(&p);
    CHECK(leased(&p) == 0 && free_blocks(&p) == pf && free_blocks(&d) == df);
    kvpull_stats st;
    kvpull_get_stats(&d.plug, &st);
    /* one byte a value: a quarter of the float32 pool's block */
    const be_kv *kv = eng_kv(d.eng);
    CHECK(st.fetches_ok > 0 && kv->block_bytes == (size_t)kv->n_layers * 16 * kv->kv_dim);
    free_side(&d);

    side f32;
    CHECK(make_side(&f32, SRV_ROLE_DECODE, 16, 64, "s3cret", 30) == 0);
    rec *r = pd_request(&p, &f32, 13, &G.cases[2], 0);
    CHECK_MSG(r->finish == ENG_FINISH_ERROR && strstr(r->error, "dtype F32 on decode, F8_E4M3 on "
                                                                "prefill"),
              "error: %s", r->error);
    CHECK(free_blocks(&f32) == df);
    free_side(&f32);
    free_side(&p);
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "staging")) g_staging = "on", g_ipc = true;
    test_staging_size();
    if (golden_load(GOLDEN_DIR "/tiny-v3", 2048, &G) != 0) return 1;
    g_port = pd_free_port();
    side p, d;
    if (make_side(&p, SRV_ROLE_PREFILL, 16, 64, "s3cret", 30) != 0) return 1;
    if (make_side(&d, SRV_ROLE_DECODE, 16, 64, "s3cret", 30) != 0) return 1;
    int pf = free_blocks(&p), df = free_blocks(&d);

    /* every golden case through prefill -> UCX -> decode */
    for (int i = 0; i < G.n; i++) {
        const golden_case *k = &G.cases[i];
        rec *r = pd_request(&p, &d, i, k, 0);
        CHECK_MSG(r->n_final == 1 && r->finish == ENG_FINISH_LENGTH, "%s: finish %d %s", k->name,
                  r->finish, r->error);
        CHECK_MSG(r->n_out == k->n_greedy && !memcmp(r->out, k->greedy, 4 * (size_t)k->n_greedy),
                  "%s: decode after the KV pull differs from the golden greedy ids", k->name);
    }
    for (int i = 0; i < 200 && leased(&p) > 0; i++) step(&p);
    CHECK_MSG(leased(&p) == 0, "%d leases left on the prefill side", leased(&p));
    CHECK(free_blocks(&p) == pf && free_blocks(&d) == df);
    kvpull_stats st;
    kvpull_get_stats(&d.plug, &st);
    CHECK(st.fetches_ok > 0 && st.fetches_failed == 0);
    /* staged prefill pins stream their chunks (protocol version 2); direct ones do not */
    CHECK_MSG(!strcmp(g_staging, "on") ? st.pins_streamed == st.fetches_ok : st.pins_streamed == 0,
              "%llu of %llu pins streamed", (unsigned long long)st.pins_streamed,
              (unsigned long long)st.fetches_ok);
    /* blocks of a fresh pool come out in order: runs coalesce into fewer reads than blocks */
    CHECK_MSG(st.gets_issued < st.bytes_read / eng_kv(d.eng)->block_bytes,
              "%llu reads for %llu blocks", (unsigned long long)st.gets_issued,
              (unsigned long long)(st.bytes_read / eng_kv(d.eng)->block_bytes));

    /* the decode pulls while the prefill computes: 16-token chunks, a step each (9 steps for
     * the longest prompt). First the prefill aborted mid-prompt under a pinned lease: the
     * decode fails with the prefill's reason, every block of both sides comes back. Then every
     * longer golden prompt: the decode pins after the first chunk and reads (direct: a block
     * range per Ready; staged: 2-block chunks as both sides copy them) as the prefill goes
     * on; golden ids, nothing left. (Fresh prompts each: a prefix-cache hit on the prefill
     * would leave nothing to overlap.) */
    {
        free_side(&p);
        free_side(&d);
        g_port = pd_free_port();
        g_budget = 16;
        const char *chunk = g_chunk_bytes;
        g_chunk_bytes = "20K"; /* 2 blocks of 10 KiB */
        CHECK(make_side(&p, SRV_ROLE_PREFILL, 16, 64, "s3cret", 30) == 0);
        CHECK(make_side(&d, SRV_ROLE_DECODE, 16, 64, "s3cret", 30) == 0);
        g_budget = 0;
        g_chunk_bytes = chunk;
        const golden_case *k9 = &G.cases[0];
        for (int i = 0; i < G.n; i++)
            if (G.cases[i].n_prompt > k9->n_prompt) k9 = &G.cases[i];
        log_set_level(LOG_LEVEL_ERROR + 1); /* the abort's warnings are expected */
        rec *ra = pd_overlap(&p, &d, 23, k9, 2);
        CHECK_MSG(ra->n_final == 1 && ra->finish == ENG_FINISH_ERROR &&
                      strstr(ra->error, "failed or was aborted"),
                  "the prefill aborted under the pull: finish %d, %s", ra->finish, ra->error);
        CHECK(R[23].n_final == 1 && R[23].finish == ENG_FINISH_ABORT);
        for (int i = 0; i < 200 && leased(&p) > 0; i++) step(&p);
        CHECK_MSG(leased(&p) == 0 && free_blocks(&p) == pf && free_blocks(&d) == df,
                  "after the aborted prefill: %d leases, free %d/%d and %d/%d", leased(&p),
                  free_blocks(&p), pf, free_blocks(&d), df);

        kvpull_stats st0;
        kvpull_get_stats(&d.plug, &st0);
        int n_long = 0;
        for (int i = 0; i < G.n; i++) {
            const golden_case *k = &G.cases[i];
            if (k->n_prompt <= 48) continue; /* one chunk or two: little to overlap */
            n_long++;
            rec *r = pd_overlap(&p, &d, 24 + i % 8, k, -1);
            CHECK_MSG(r->n_final == 1 && r->finish == ENG_FINISH_LENGTH, "%s overlapped: %d %s",
                      k->name, r->finish, r->error);
            CHECK_MSG(r->n_out == k->n_greedy &&
                          !memcmp(r->out, k->greedy, 4 * (size_t)k->n_greedy),
                      "%s: decode after an overlapped pull differs from the golden ids", k->name);
        }
        CHECK(n_long >= 2);
        kvpull_get_stats(&d.plug, &st);
        CHECK_MSG(st.pins_streamed - st0.pins_streamed == (uint64_t)n_long,
                  "%llu streamed pins for %d overlapped pulls",
                  (unsigned long long)(st.pins_streamed - st0.pins_streamed), n_long);
        for (int i = 0; i < 200 && leased(&p) > 0; i++) step(&p);
        CHECK(leased(&p) == 0 && free_blocks(&p) == pf && free_blocks(&d) == df);
    }

    /* layer-wise: while a chunk is computed the decode reads its blocks' first layers (direct
     * reads of the cache in place; staged copies go block by block), then the rest of each
     * block once it is whole: golden ids, and every byte of the prompt's blocks read exactly
     * once (no layer twice, none skipped) */
    if (strcmp(g_staging, "on") != 0) {
        free_side(&p);
        free_side(&d);
        g_port = pd_free_port();
        g_budget = 16;
        CHECK(make_side(&p, SRV_ROLE_PREFILL, 16, 64, "s3cret", 30) == 0);
        CHECK(make_side(&d, SRV_ROLE_DECODE, 16, 64, "s3cret", 30) == 0);
        g_budget = 0;
        hook_layers(&p, &d);
        int n_long = 0;
        for (int i = 0; i < G.n; i++) {
            const golden_case *k = &G.cases[i];
            if (k->n_prompt <= 48) continue;
            n_long++;
            kvpull_stats s0, s1;
            kvpull_get_stats(&d.plug, &s0);
            rec *r = pd_overlap(&p, &d, 24 + i % 8, k, -1);
            kvpull_get_stats(&d.plug, &s1);
            CHECK_MSG(r->finish == ENG_FINISH_LENGTH && r->n_out == k->n_greedy &&
                          !memcmp(r->out, k->greedy, 4 * (size_t)k->n_greedy),
                      "%s, layer-wise: finish %d %s", k->name, r->finish, r->error);
            uint64_t want = (uint64_t)((k->n_prompt - 1 + 15) / 16) * eng_kv(d.eng)->block_bytes;
            CHECK_MSG(s1.layer_reads > s0.layer_reads && s1.bytes_read - s0.bytes_read == want,
                      "%s: %llu layer reads, %llu bytes read for %llu", k->name,
                      (unsigned long long)(s1.layer_reads - s0.layer_reads),
                      (unsigned long long)(s1.bytes_read - s0.bytes_read),
                      (unsigned long long)want);
        }
        CHECK(n_long >= 2);
        g_hook_d = NULL;
        for (int i = 0; i < 200 && leased(&p) > 0; i++) step(&p);
        CHECK(leased(&p) == 0 && free_blocks(&p) == pf && free_blocks(&d) == df);
    }

    /* a decode worker with the wrong secret gets nothing */
    side bad;
    g_port = pd_free_port();
    CHECK(make_side(&bad, SRV_ROLE_DECODE, 16, 64, "wrong", 30) == 0);
    rec *r = pd_request(&p, &bad, 10, &G.cases[1], 0);
    CHECK(r->finish == ENG_FINISH_ERROR && strstr(r->error, "authentication"));
    CHECK(free_blocks(&bad) == df);
    free_side(&bad);

    /* a decode worker with another block size is refused at the handshake */
    CHECK(make_side(&bad, SRV_ROLE_DECODE, 32, 32, "s3cret", 30) == 0);
    r = pd_request(&p, &bad, 11, &G.cases[2], 0);
    CHECK_MSG(r->finish == ENG_FINISH_ERROR && strstr(r->error, "block size"), "error: %s",
              r->error);
    free_side(&bad);
    /* the refused pulls never pinned: their leases expire; none is still pinned */
    free_side(&p);
    free_side(&d);

    /* a lease that expired before the pull: the request fails, nothing leaks */
    g_port = pd_free_port();
    CHECK(make_side(&p, SRV_ROLE_PREFILL, 16, 64, "s3cret", 0.2) == 0);
    CHECK(make_side(&d, SRV_ROLE_DECODE, 16, 64, "s3cret", 30) == 0);
    r = pd_request(&p, &d, 12, &G.cases[3], 600);
    CHECK_MSG(r->finish == ENG_FINISH_ERROR && strstr(r->error, "lease"), "error: %s", r->error);
    CHECK(leased(&p) == 0 && free_blocks(&p) == pf && free_blocks(&d) == df);
    free_side(&p);
    free_side(&d);

    test_fp8(pf, df);

    if (!strcmp(g_staging, "on")) {
        /* a staging area of 2 blocks cannot carry a 9-block prompt: a clear error, no leak */
        g_port = pd_free_port();
        g_staging_bytes = "20K"; /* blocks of 16 tokens are 10 KiB here */
        CHECK(make_side(&p, SRV_ROLE_PREFILL, 16, 64, "s3cret", 30) == 0);
        g_staging_bytes = "256M";
        CHECK(make_side(&d, SRV_ROLE_DECODE, 16, 64, "s3cret", 30) == 0);
        const golden_case *big = &G.cases[0];
        for (int i = 0; i < G.n; i++)
            if (G.cases[i].n_prompt > big->n_prompt) big = &G.cases[i];
        r = pd_request(&p, &d, 13, big, 0);
        CHECK_MSG(r->finish == ENG_FINISH_ERROR && strstr(r->error, "staging area"), "error: %s",
                  r->error);
        r = pd_request(&p, &d, 14, &G.cases[1], 0); /* a small one still goes through */
        CHECK(r->finish == ENG_FINISH_LENGTH && r->n_out == G.cases[1].n_greedy);
        for (int i = 0; i < 100 && leased(&p) > 0; i++) step(&p);
        CHECK(leased(&p) == 1); /* the refused big lease waits for its expiry */
        free_side(&p);
        free_side(&d);

        /* protocol versions: a staged pin streams (Ready messages up to every block) to a
         * version-2 reader only; a version-1 reader gets the plain reply and nothing more */
        g_port = pd_free_port();
        CHECK(make_side(&p, SRV_ROLE_PREFILL, 16, 64, "s3cret", 30) == 0);
        const golden_case *k9 = &G.cases[0];
        for (int i = 0; i < G.n; i++)
            if (G.cases[i].n_prompt > k9->n_prompt) k9 = &G.cases[i];
        for (uint32_t v = 1; v <= KVW_VERSION; v++) {
            make_lease(&p, 15, k9);
            raw_result rr;
            CHECK_MSG(raw_pin(g_port + 1000, v, eng_kv(p.eng), 15, true, &rr) == 0,
                      "version %u: handshake or pin failed", v);
            CHECK(rr.n_ids == R[15].n_lease && rr.extra == 0);
            CHECK_MSG(rr.streamed == (v >= 2) && rr.ready == rr.n_ids,
                      "version %u: streamed %d, ready %d of %d", v, rr.streamed, rr.ready,
                      rr.n_ids);
            for (int i = 0; i < 200 && leased(&p) > 0; i++) step(&p);
            CHECK_MSG(leased(&p) == 0, "version %u: the lease was not released", v);
        }
        CHECK(free_blocks(&p) == pf);
        free_side(&p);

        /* a version-2 reader that vanishes after pinning a streamed lease: the pin restarted
         * the lease clock, the lease expires after it, every block comes back */
        g_port = pd_free_port();
        CHECK(make_side(&p, SRV_ROLE_PREFILL, 16, 64, "s3cret", 0.5) == 0);
        make_lease(&p, 16, k9);
        raw_result rr;
        CHECK(raw_pin(g_port + 1000, KVW_VERSION, eng_kv(p.eng), 16, false, &rr) == 0);
        CHECK(rr.streamed && rr.ready == rr.n_ids && leased(&p) == 1);
        for (int i = 0; i < 400 && leased(&p) > 0; i++) step(&p);
        CHECK_MSG(leased(&p) == 0 && free_blocks(&p) == pf, "%d leases left", leased(&p));
        free_side(&p);

        /* a staged prefill streams to a direct decode (its cache read in place): the decode
         * reads once every block is ready; golden ids, nothing left */
        g_port = pd_free_port();
        CHECK(make_side(&p, SRV_ROLE_PREFILL, 16, 64, "s3cret", 30) == 0);
        g_staging = "auto";
        CHECK(make_side(&d, SRV_ROLE_DECODE, 16, 64, "s3cret", 30) == 0);
        g_staging = "on";
        for (int i = 0; i < G.n; i++) {
            const golden_case *k = &G.cases[i];
            r = pd_request(&p, &d, 20 + i % 10, k, 0);
            CHECK_MSG(r->finish == ENG_FINISH_LENGTH && r->n_out == k->n_greedy &&
                          !memcmp(r->out, k->greedy, 4 * (size_t)k->n_greedy),
                      "%s, staged prefill to a direct decode: finish %d %s", k->name, r->finish,
                      r->error);
        }
        kvpull_get_stats(&d.plug, &st);
        CHECK(st.pins_streamed == (uint64_t)G.n);
        for (int i = 0; i < 200 && leased(&p) > 0; i++) step(&p);
        CHECK(leased(&p) == 0 && free_blocks(&p) == pf && free_blocks(&d) == df);
        free_side(&p);
        free_side(&d);

        /* the decode's staged pull is a pipeline of chunks through a few reused staging slots:
         * a decode whose area holds 3 blocks (1-block chunks, 3 in flight), then 4 blocks
         * (2-block chunks, 2 in flight), pulls every golden prompt, the largest 9 blocks, and
         * decodes the golden ids; the slots and both pools are free afterwards */
        const char *areas[2][3] = {{"30K", "10K", "3"}, {"40K", "20K", "2"}};
        for (int a = 0; a < 2; a++) {
            g_port = pd_free_port();
            CHECK(make_side(&p, SRV_ROLE_PREFILL, 16, 64, "s3cret", 30) == 0);
            g_staging_bytes = areas[a][0];
            g_chunk_bytes = areas[a][1];
            g_in_flight = areas[a][2];
            CHECK(make_side(&d, SRV_ROLE_DECODE, 16, 64, "s3cret", 30) == 0);
            g_staging_bytes = "256M";
            g_chunk_bytes = "16M";
            g_in_flight = "3";
            kvpull_stats before;
            kvpull_get_stats(&d.plug, &before);
            for (int i = 0; i < G.n; i++) {
                const golden_case *k = &G.cases[i];
                r = pd_request(&p, &d, 20 + i % 10, k, 0);
                CHECK_MSG(r->finish == ENG_FINISH_LENGTH && r->n_out == k->n_greedy &&
                              !memcmp(r->out, k->greedy, 4 * (size_t)k->n_greedy),
                          "%s through %s of staging: finish %d %s", k->name, areas[a][0], r->finish,
                          r->error);
            }
            kvpull_stats after;
            kvpull_get_stats(&d.plug, &after);
            /* 1-block chunks: one read per block, never coalesced past a chunk */
            if (a == 0)
                CHECK(after.gets_issued - before.gets_issued ==
                      (after.bytes_read - before.bytes_read) / eng_kv(d.eng)->block_bytes);
            for (int i = 0; i < 200 && leased(&p) > 0; i++) step(&p);
            CHECK(leased(&p) == 0 && free_blocks(&p) == pf && free_blocks(&d) == df);
            free_side(&p);
            free_side(&d);
        }
    }
    fio_unmap(&G.map);
    CHECK_DONE();
}
