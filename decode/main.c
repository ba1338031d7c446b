/* duet-decode: the decode worker. A complete OpenAI-compatible server on its own; through the
 * KV transfer plug-in (transport/kvx.h) it also continues requests whose prompt KV a prefill
 * instance computed, pulling it over UCX. Everything else is srv_main's. */
#include <stdio.h>

#include "kvx.h"
#include "server/server.h"

int main(int argc, char **argv) {
    srv_kv_plugin kv;
    if (kvx_create(&kv) != DUET_OK) {
        fprintf(stderr, "duet-decode: out of memory\n");
        return 1;
    }
    int rc = srv_main(argc, argv, SRV_ROLE_DECODE, &kv);
    kvx_destroy(&kv);
    return rc;
}
