/* Side-channel framing and authentication; see kv_wire.h. */
#include "kv_wire.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

duet_status kvw_encode(const Duet__Kv__Envelope *env, uint8_t **buf_p, size_t *len_p) {
    size_t n = duet__kv__envelope__get_packed_size(env);
    if (n > KVW_MAX_FRAME) return DUET_ERR_TOO_LONG;
    uint8_t *b = malloc(n + 4);
    if (!b) return DUET_ERR_NO_MEMORY;
    b[0] = (uint8_t)(n >> 24);
    b[1] = (uint8_t)(n >> 16);
    b[2] = (uint8_t)(n >> 8);
    b[3] = (uint8_t)n;
    duet__kv__envelope__pack(env, b + 4);
    *buf_p = b;
    *len_p = n + 4;
    return DUET_OK;
}

void kvw_reader_cleanup(kvw_reader *r) {
    free(r->buf);
    memset(r, 0, sizeof *r);
}

static size_t frame_len(const kvw_reader *r) {
    return (size_t)r->buf[0] << 24 | (size_t)r->buf[1] << 16 | (size_t)r->buf[2] << 8 |
           (size_t)r->buf[3];
}

duet_status kvw_reader_feed(kvw_reader *r, const void *data, size_t len) {
    if (len == 0) return DUET_OK; /* the buffer may not exist yet: no copy from or to NULL */
    if (r->len + len > r->cap) {
        size_t cap = r->cap ? r->cap : 4096;
        while (cap < r->len + len) cap *= 2;
        if (cap > KVW_MAX_FRAME * 2 + 8) cap = KVW_MAX_FRAME * 2 + 8;
        if (cap < r->len + len) return DUET_ERR_FORMAT;
        uint8_t *b = realloc(r->buf, cap);
        if (!b) return DUET_ERR_NO_MEMORY;
        r->buf = b;
        r->cap = cap;
    }
    memcpy(r->buf + r->len, data, len);
    r->len += len;
    if (r->len >= 4 && frame_len(r) > KVW_MAX_FRAME) return DUET_ERR_FORMAT;
    return DUET_OK;
}

duet_status kvw_reader_next(kvw_reader *r, Duet__Kv__Envelope **env_p) {
    *env_p = NULL;
    if (r->len < 4) return DUET_OK;
    size_t n = frame_len(r);
    if (n > KVW_MAX_FRAME) return DUET_ERR_FORMAT;
    if (r->len < 4 + n) return DUET_OK;
    Duet__Kv__Envelope *env = duet__kv__envelope__unpack(NULL, n, r->buf + 4);
    memmove(r->buf, r->buf + 4 + n, r->len - 4 - n);
    r->len -= 4 + n;
    if (!env || env->msg_case == DUET__KV__ENVELOPE__MSG__NOT_SET) {
        if (env) duet__kv__envelope__free_unpacked(env, NULL);
        return DUET_ERR_FORMAT;
    }
    *env_p = env;
    return DUET_OK;
}

duet_status kvw_nonce(uint8_t out[KVW_NONCE_LEN]) {
    return RAND_bytes(out, KVW_NONCE_LEN) == 1 ? DUET_OK : DUET_ERR_INTERNAL;
}

void kvw_mac(const char *secret, const char *label, const uint8_t *a, size_t a_len,
             const uint8_t *b, size_t b_len, uint8_t out[KVW_MAC_LEN]) {
    size_t ll = strlen(label), n = ll + a_len + b_len;
    uint8_t *msg = malloc(n ? n : 1);
    unsigned int out_len = KVW_MAC_LEN;
    if (!msg) {
        memset(out, 0, KVW_MAC_LEN); /* matches nothing a peer with the secret computes */
        return;
    }
    memcpy(msg, label, ll);
    memcpy(msg + ll, a, a_len);
    memcpy(msg + ll + a_len, b, b_len);
    HMAC(EVP_sha256(), secret, (int)strlen(secret), msg, n, out, &out_len);
    OPENSSL_cleanse(msg, n);
    free(msg);
}

bool kvw_mac_ok(const char *secret, const char *label, const uint8_t *a, size_t a_len,
                const uint8_t *b, size_t b_len, const uint8_t *mac, size_t mac_len) {
    if (mac_len != KVW_MAC_LEN) return false;
    uint8_t want[KVW_MAC_LEN];
    kvw_mac(secret, label, a, a_len, b, b_len, want);
    return CRYPTO_memcmp(want, mac, KVW_MAC_LEN) == 0;
}

bool kvw_pools_compatible(const Duet__Kv__PoolInfo *d, const Duet__Kv__PoolInfo *p, char *why,
                          size_t why_len) {
    const char *what = NULL;
    unsigned long long dv = 0, pv = 0;
    /* the dtype first: it also changes the block bytes, and the dtype is what to fix */
    if (strcmp(d->dtype ? d->dtype : "", p->dtype ? p->dtype : "") != 0) {
        snprintf(why, why_len, "KV layouts differ: dtype %s on decode, %s on prefill",
                 d->dtype ? d->dtype : "?", p->dtype ? p->dtype : "?");
        return false;
    }
    if (d->block_size != p->block_size)
        what = "block size", dv = d->block_size, pv = p->block_size;
    else if (d->n_layers != p->n_layers)
        what = "layer count", dv = d->n_layers, pv = p->n_layers;
    else if (d->kv_dim != p->kv_dim)
        what = "latent dims (kv_lora_rank + rope)", dv = d->kv_dim, pv = p->kv_dim;
    else if (d->block_bytes != p->block_bytes)
        what = "block bytes", dv = d->block_bytes, pv = p->block_bytes;
    if (what) {
        snprintf(why, why_len, "KV layouts differ: %s %llu on decode, %llu on prefill", what, dv,
                 pv);
        return false;
    }
    return true;
}
