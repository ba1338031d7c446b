/* duet-prefill: the prefill worker. Computes prompts' KV and first tokens behind the
 * OpenAI API of server.h and, through the KV transfer plug-in (transport/kvx.h), leases that
 * KV to decode instances. Everything else is srv_main's. */
#include <stdio.h>

#include "kvx.h"
#include "server/server.h"

int main(int argc, char **argv) {
    srv_kv_plugin kv;
    if (kvx_create(&kv) != DUET_OK) {
        fprintf(stderr, "duet-prefill: out of memory\n");
        return 1;
    }
    int rc = srv_main(argc, argv, SRV_ROLE_PREFILL, &kv);
    kvx_destroy(&kv);
    return rc;
}
