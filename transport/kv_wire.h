/* The KV side channel's wire: length-prefixed protobuf-c Envelopes (kv.proto), incremental
 * frame reassembly for a byte stream, HMAC challenge-response, and the compatibility check of
 * two KV pools. No I/O here: kvx.c moves the bytes. Any thread; no shared state. */
#ifndef DUET_KV_WIRE_H
#define DUET_KV_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kv.pb-c.h"
#include "base/status.h"

/* 2: streamed pins (PinReply.streamed, Ready); 3: pins of a prompt still being computed
 * (streamed for direct and CUDA IPC reads too); see kv.proto */
#define KVW_VERSION   3
#define KVW_NONCE_LEN 32
#define KVW_MAC_LEN   32
/* Larger frames are refused: a Welcome with a UCX address and rkey is a few KiB; a PinReply
 * of a 160k-token prompt in 64-token blocks is about 13 KiB. */
#define KVW_MAX_FRAME (4u << 20)

/* Serializes env into a new heap buffer with its 4-byte length prefix. */
duet_status kvw_encode(const Duet__Kv__Envelope *env, uint8_t **buf_p, size_t *len_p);

/* Reassembles frames from stream bytes. */
typedef struct kvw_reader {
    uint8_t *buf;
    size_t len, cap;
} kvw_reader;

void kvw_reader_cleanup(kvw_reader *r);
/* Appends bytes. DUET_ERR_NO_MEMORY or DUET_ERR_FORMAT (a frame longer than KVW_MAX_FRAME is
 * announced): the connection should be dropped. */
duet_status kvw_reader_feed(kvw_reader *r, const void *data, size_t len);
/* The next complete Envelope (caller frees with duet__kv__envelope__free_unpacked(env, NULL)),
 * *env_p NULL when none is complete yet; DUET_ERR_FORMAT when a frame does not decode. */
duet_status kvw_reader_next(kvw_reader *r, Duet__Kv__Envelope **env_p);

/* Random nonce from the OS. */
duet_status kvw_nonce(uint8_t out[KVW_NONCE_LEN]);
/* HMAC-SHA256(secret, label | a | b). */
void kvw_mac(const char *secret, const char *label, const uint8_t *a, size_t a_len,
             const uint8_t *b, size_t b_len, uint8_t out[KVW_MAC_LEN]);
/* Constant-time check of a received mac. */
bool kvw_mac_ok(const char *secret, const char *label, const uint8_t *a, size_t a_len,
                const uint8_t *b, size_t b_len, const uint8_t *mac, size_t mac_len);

/* Whether a decode pool can take blocks from a prefill pool: same block size, layers, latent
 * width and dtype (hence block bytes). On mismatch writes a one-line reason naming both sides'
 * values. */
bool kvw_pools_compatible(const Duet__Kv__PoolInfo *decode, const Duet__Kv__PoolInfo *prefill,
                          char *why, size_t why_len);

#endif
