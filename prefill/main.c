/* duet-prefill: the prefill worker. Computes prompts' KV and first tokens behind the
 * OpenAI API of server.h; with the KV transfer plug-in (transport/, not yet passed here) it
 * leases the KV to decode instances. Everything else is srv_main's. */
#include "server.h"

int main(int argc, char **argv) {
    return srv_main(argc, argv, SRV_ROLE_PREFILL, NULL);
}
