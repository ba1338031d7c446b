/* A worker program (duet-prefill, duet-decode): command line, MPI instance, engine thread,
 * OpenAI-compatible HTTP API on libuv, metrics, graceful shutdown. The programs' mains are
 * thin: they hand srv_main a role and, for disaggregation, the KV transfer plug-in that
 * transport/ provides (runtime does not depend on transport; the plug-in is a table of hooks).
 *
 * Threads: the main thread runs the HTTP loop, one engine thread steps the engine; TP
 * followers run par_follow instead. The plug-in's hooks say which thread calls them. */
#ifndef DUET_SERVER_H
#define DUET_SERVER_H

#include "server/kv_plugin.h"

/* Runs a worker until SIGTERM/SIGINT (then drains within --shutdown-timeout, exit 0).
 * plugin may be NULL. Returns the process exit status. */
int srv_main(int argc, char **argv, srv_role role, const srv_kv_plugin *plugin);

#endif
