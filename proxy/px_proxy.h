/* duet-proxy's front end: the OpenAI routes on http.h's server, the prefill -> decode flow with
 * retries and failover, the proxy's own /health, /metrics and admin routes. main.c only parses
 * the command line, owns the loop and turns signals into px_proxy_drain. Loop thread only. */
#ifndef DUET_PX_PROXY_H
#define DUET_PX_PROXY_H

#include <uv.h>

#include "px_config.h"
#include "base/status.h"

typedef struct px_proxy px_proxy;

/* Builds the backends from cfg and listens on cfg->host:cfg->port. cfg must outlive the proxy. */
duet_status px_proxy_create(uv_loop_t *loop, const px_config *cfg, px_proxy **px_p);

/* The bound port (cfg->port 0 picks an ephemeral one). */
int px_proxy_port(const px_proxy *px);

typedef void (*px_drained_fn)(px_proxy *px, void *arg);

/* SIGTERM: stops accepting, lets requests in flight finish; after deadline_ms (0 = none) cuts
 * the rest off (their backends' requests are canceled). cb runs from the loop once nothing is
 * left, never inside this call. */
void px_proxy_drain(px_proxy *px, unsigned deadline_ms, px_drained_fn cb, void *arg);

/* Closes everything; memory goes once the loop has run the close callbacks. Accepts NULL. */
void px_proxy_destroy(px_proxy *px);

#endif
