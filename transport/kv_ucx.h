/* UCX for KV transfer: one context and worker per process (owned by the transfer thread:
 * every call here on that thread), registered memory regions with packed remote keys, peers
 * (an endpoint plus the peer's unpacked key), and one-sided GETs with completion callbacks.
 * UCX picks the transport (UCX_TLS is respected): shared memory on one host, RDMA verbs where
 * present, TCP otherwise. */
#ifndef DUET_KV_UCX_H
#define DUET_KV_UCX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"

typedef struct kvu_ctx kvu_ctx;
typedef struct kvu_region kvu_region;
typedef struct kvu_peer kvu_peer;

/* Called once per operation, from kvu_progress (or kvu_peer_destroy): DUET_OK or the error. */
typedef void (*kvu_done_fn)(void *arg, duet_status st);

/* The worker has no wakeup event fd on purpose: asking UCX for one excludes the transports
 * that cannot raise events (shared memory, CMA), which are the fast one-sided ones on a host.
 * The caller polls kvu_progress instead (see kvx.c). */
duet_status kvu_create(kvu_ctx **ctx_p);
void kvu_destroy(kvu_ctx *c);
/* Progresses until nothing more happens; returns how many events it handled. */
unsigned kvu_progress(kvu_ctx *c);
/* The worker's address, for peers to connect to (owned by the context). */
void kvu_address(kvu_ctx *c, const void **addr_p, size_t *len_p);
/* Whether the UCX build can move this memory type (false for device memory without CUDA
 * support in UCX). */
bool kvu_supports_device_memory(kvu_ctx *c);

/* Allocates len bytes through UCX (shared memory where its transports offer it, so peers on
 * this host read it one-sidedly at memory speed) and registers them; *ptr_p gets the address. */
duet_status kvu_alloc(kvu_ctx *c, size_t len, void **ptr_p, kvu_region **reg_p);
/* Registers [base, base + len) once for remote reads and local writes. */
duet_status kvu_register(kvu_ctx *c, void *base, size_t len, bool on_device, kvu_region **reg_p);
void kvu_region_destroy(kvu_ctx *c, kvu_region *r);
/* The packed remote key of a region (owned by the region). */
void kvu_region_rkey(kvu_region *r, const void **rkey_p, size_t *len_p);

/* Connects to a peer's worker address and unpacks its key for the memory at remote_base.
 * Without UCX-level failure reports (see kv_ucx.c): the caller bounds every read by a deadline
 * and destroys the peer when one passes. */
duet_status kvu_peer_create(kvu_ctx *c, const void *addr, size_t addr_len, const void *rkey,
                            size_t rkey_len, uint64_t remote_base, kvu_peer **peer_p);
/* Closes the endpoint forcibly: operations still in flight complete (with an error) before
 * this returns, so their local memory is no longer written afterwards. */
void kvu_peer_destroy(kvu_ctx *c, kvu_peer *p);

/* Reads len bytes at the peer's remote_base + roff into local, which lies inside region
 * (registered). done is called exactly once, unless this returns an error. */
duet_status kvu_get(kvu_peer *p, kvu_region *region, void *local, size_t len, uint64_t roff,
                    kvu_done_fn done, void *arg);

#endif
