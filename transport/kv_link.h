/* What both roles of KV transfer share (vLLM NIXL-connector protocol, "prefill first, decode
 * pulls"): the transfer thread with its libuv loop, the UCX context and worker progressed from
 * that loop, the KV pool registered for remote reads (or a host staging area when UCX cannot
 * read the pool's memory), the side channel's framing and the options both roles take. The
 * roles themselves live in their programs: prefill/kv_lease.c serves leases, decode/kv_pull.c
 * pulls them; each plugs its callbacks into one kvl_link.
 * Threads: kvl_create/kvl_stop/kvl_destroy on the main thread, kvl_wake and kvl_stopping on any
 * thread, everything else on the transfer thread (inside the role's callbacks). */
#ifndef DUET_KV_LINK_H
#define DUET_KV_LINK_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "base/opt.h"
#include "kv_ucx.h"
#include "kv_wire.h"
#include "server/kv_plugin.h"

/* Options both roles take (kvl_options_add writes them). */
typedef struct kvl_options {
    const char *secret;      /* --kv-secret / DUET_KV_SECRET; NULL: none (warned) */
    int staging_mode;        /* KVL_STAGE_* */
    long long staging_bytes; /* --kv-staging-bytes; 0: kvl_staging_size's choice */
    long long chunk_bytes;   /* --kv-chunk-bytes: staged transfers move chunks of this size */
    int chunks_in_flight;    /* --kv-chunks-in-flight: per transfer, each in its own buffer */
    bool cuda_ipc;           /* --kv-cuda-ipc: same-host device-to-device copies */
} kvl_options;

#define KVL_MAX_CHUNKS_IN_FLIGHT 8

enum { KVL_STAGE_AUTO = 0, KVL_STAGE_ON = 1, KVL_STAGE_OFF = 2 };

duet_status kvl_options_add(opt_parser *p, kvl_options *o);

/* The staging area's blocks. A prefill pins a staged lease whole into the area, so a lease
 * larger than it is refused: asked (--kv-staging-bytes) 0 sizes it for one lease of
 * max_model_len tokens and at least KVL_STAGING_MIN bytes; any size is held to n_blocks (the
 * pool) and at least one block. *short_p: the area holds fewer blocks than one lease of
 * max_model_len (an explicit size too small: the caller warns). Arithmetic only. */
#define KVL_STAGING_MIN (256LL << 20)
size_t kvl_staging_blocks(long long asked, int max_model_len, int block_size, size_t block_bytes,
                          int n_blocks, bool *short_p);

typedef struct kvl_link kvl_link;

/* A role's callbacks, each on the transfer thread; any may be NULL. */
typedef struct kvl_role {
    void *arg;
    /* Before the thread starts, on the main thread: open the role's handles on the loop. */
    duet_status (*open)(void *arg, kvl_link *l);
    /* kvl_wake was called: work waits in the role's own inbox. */
    void (*woken)(void *arg);
    /* Every 5 ms: deadlines and retries. */
    void (*tick)(void *arg, double now);
    /* After each UCX poll while traffic flows (and every millisecond): device copies in
     * flight are checked here. Returns true while the role has copies in flight. */
    bool (*progress)(void *arg);
    /* Stopping: fail what is pending and close every handle the role opened. */
    void (*close)(void *arg);
} kvl_role;

/* Sets up UCX and the pool's registration (or the staging area), the loop, then role->open,
 * then starts the transfer thread. The context stays the caller's. */
duet_status kvl_create(const kvl_options *o, const srv_kv_context *ctx, const kvl_role *role,
                       kvl_link **l_p);
/* Stops the thread (role->close runs on it), after which nothing of the engine's backend is
 * used. Then kvl_destroy frees the rest. Both accept NULL. */
void kvl_stop(kvl_link *l);
void kvl_destroy(kvl_link *l);

/* Any thread: run role->woken on the transfer thread soon. */
void kvl_wake(kvl_link *l);
/* Any thread: whether kvl_stop has begun (new work should be refused). */
bool kvl_stopping(kvl_link *l);

uv_loop_t *kvl_loop(kvl_link *l);
const srv_kv_context *kvl_context(const kvl_link *l);
kvu_ctx *kvl_ucx(kvl_link *l);
const char *kvl_secret(const kvl_link *l);    /* "" when none */
const char *kvl_engine_id(const kvl_link *l); /* random per process: a restart changes it */
/* The pool as the side channel describes it (compared at the handshake). */
const Duet__Kv__PoolInfo *kvl_pool(const kvl_link *l);

/* UCX progress is polled (see kv_ucx.h): call after issuing work so the loop polls hot. */
void kvl_ucx_heat(kvl_link *l);

/* Memory remote peers read and reads land in: the pool itself, or the staging area. */
bool kvl_staged(const kvl_link *l);
kvu_region *kvl_region(kvl_link *l); /* of the pool or of the staging area */
uint8_t *kvl_base(kvl_link *l);      /* its first byte */
int kvl_n_slots(const kvl_link *l);  /* blocks it holds */
/* Staging slots: 0 taken (one contiguous run if there is one); -1 not now; -2 never (the area
 * is smaller than n). */
int kvl_stage_alloc(kvl_link *l, int n, int32_t *slots);
void kvl_stage_free(kvl_link *l, const int32_t *slots, int n);
/* A run of n consecutive free slots: its first slot; -1 not now; -2 never (n > the area). */
int kvl_stage_alloc_run(kvl_link *l, int n);
/* Copies pool blocks to (to_host) or from staging slots; runs of consecutive slots are one copy
 * each (by the backend for device pools, memcpy for host pools). */
duet_status kvl_stage_copy(kvl_link *l, const int32_t *blocks, const int32_t *slots, int n,
                           bool to_host);
/* The same for n blocks and the consecutive slots from slot0, without waiting: *ticket_p is
 * polled with kvl_copy_poll (NULL: already done, as on host pools). */
duet_status kvl_stage_copy_start(kvl_link *l, const int32_t *blocks, int slot0, int n, bool to_host,
                                 void **ticket_p);
/* DUET_ERR_BUSY while the copy runs (wait: until it ends), else its result (ticket freed). */
duet_status kvl_copy_poll(kvl_link *l, void *ticket, bool wait);
/* Blocks per chunk of a staged transfer (--kv-chunk-bytes, at most the staging area divided
 * by the chunks in flight, at least 1) and the chunks one transfer keeps in flight. */
int kvl_chunk_blocks(const kvl_link *l);
int kvl_chunks_in_flight(const kvl_link *l);

/* Same-host device-to-device transfer (--kv-cuda-ipc, CUDA caches): the cache's IPC handle
 * (*len_p 0 when not offered) and this host's boot id ("" when unknown). */
void kvl_ipc_handle(const kvl_link *l, const void **handle_p, size_t *len_p);
const char *kvl_boot_id(const kvl_link *l);
/* Whether this side may map a peer's cache: the option is on, the cache is on the device and the
 * backend can; then open/close and the copies (tickets for kvl_copy_poll). */
bool kvl_ipc_usable(const kvl_link *l);
duet_status kvl_ipc_open(kvl_link *l, const void *handle, size_t len, void **ptr_p);
void kvl_ipc_close(kvl_link *l, void *ptr);
duet_status kvl_ipc_copy_start(kvl_link *l, const int32_t *blocks, int n, const void *src,
                               const uint32_t *src_blocks, void **ticket_p);

/* The side channel: one framed protobuf envelope (DUET_ERR_IO when the write cannot start; a
 * failed write shows up as a read error on the same stream). */
duet_status kvl_send(uv_tcp_t *tcp, const Duet__Kv__Envelope *env);
/* libuv read buffers (heap; the read callback frees buf->base). */
void kvl_alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf);

#endif
