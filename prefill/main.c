/* duet-prefill: the prefill worker. Computes prompts' KV and first tokens behind the OpenAI API
 * of the shared worker server (runtime/server) and leases that KV to decode instances through
 * its KV plug-in (kv_lease.h). */
#include <stdio.h>

#include "kv_lease.h"
#include "server/server.h"

int main(int argc, char **argv) {
    srv_kv_plugin kv;
    if (kvlease_create(&kv) != DUET_OK) {
        fprintf(stderr, "duet-prefill: out of memory\n");
        return 1;
    }
    int rc = srv_main(argc, argv, SRV_ROLE_PREFILL, &kv);
    kvlease_destroy(&kv);
    return rc;
}
