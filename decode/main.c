/* duet-decode: the decode worker. A complete OpenAI server (runtime/server) that also continues
 * requests whose prompt KV a prefill worker leased, pulling that KV through its KV plug-in
 * (kv_pull.h). */
#include <stdio.h>

#include "kv_pull.h"
#include "server/server.h"

int main(int argc, char **argv) {
    srv_kv_plugin kv;
    if (kvpull_create(&kv) != DUET_OK) {
        fprintf(stderr, "duet-decode: out of memory\n");
        return 1;
    }
    int rc = srv_main(argc, argv, SRV_ROLE_DECODE, &kv);
    kvpull_destroy(&kv);
    return rc;
}
