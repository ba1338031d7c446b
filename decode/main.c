/* duet-decode: the decode worker. A complete OpenAI-compatible server on its own; with the KV
 * transfer plug-in (transport/, not yet passed here) it also continues requests whose prompt
 * KV a prefill instance computed. Everything else is srv_main's. */
#include "server.h"

int main(int argc, char **argv) {
    return srv_main(argc, argv, SRV_ROLE_DECODE, NULL);
}
