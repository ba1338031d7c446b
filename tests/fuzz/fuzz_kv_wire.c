/* Fuzz driver for the KV side channel's frame reader: whatever bytes a peer sends, in any
 * split, the reader yields whole decoded Envelopes or a format error, never a crash, and the
 * pool-compatibility check copes with any PoolInfo it decodes. */
#include <stddef.h>
#include <stdint.h>

#include "kv_wire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    kvw_reader r = {0};
    /* feed in two pieces, split where the first byte says, to exercise reassembly */
    size_t cut = size ? data[0] % (size + 1) : 0;
    const uint8_t *parts[2] = {data, data + cut};
    size_t lens[2] = {cut, size - cut};
    Duet__Kv__PoolInfo mine = DUET__KV__POOL_INFO__INIT;
    mine.block_size = 64;
    mine.dtype = "BF16";
    for (int i = 0; i < 2; i++) {
        if (kvw_reader_feed(&r, parts[i], lens[i]) != DUET_OK) break;
        for (;;) {
            Duet__Kv__Envelope *env = NULL;
            if (kvw_reader_next(&r, &env) != DUET_OK || !env) break;
            char why[256];
            if (env->msg_case == DUET__KV__ENVELOPE__MSG_AUTH && env->auth->pool)
                kvw_pools_compatible(&mine, env->auth->pool, why, sizeof why);
            if (env->msg_case == DUET__KV__ENVELOPE__MSG_WELCOME && env->welcome->pool)
                kvw_pools_compatible(env->welcome->pool, &mine, why, sizeof why);
            duet__kv__envelope__free_unpacked(env, NULL);
        }
    }
    kvw_reader_cleanup(&r);
    return 0;
}
