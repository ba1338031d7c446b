/* duet-proxy: the OpenAI-compatible front door of a prefill/decode deployment (2P1D, xPyD).
 * Parses the command line, runs the loop, and turns SIGTERM/SIGINT into a graceful drain;
 * everything else is px_proxy. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "base/log.h"
#include "px_config.h"
#include "px_proxy.h"

typedef struct app {
    uv_loop_t loop;
    uv_signal_t sigterm, sigint;
    px_proxy *px;
    const px_config *cfg;
    bool stopping;
} app;

static void on_walk_close(uv_handle_t *h, void *arg) {
    (void)arg;
    if (!uv_is_closing(h)) uv_close(h, NULL);
}

static void on_drained(px_proxy *px, void *arg) {
    app *a = arg;
    LOG_INFO("proxy: drained, exiting");
    px_proxy_destroy(px);
    a->px = NULL;
    uv_close((uv_handle_t *)&a->sigterm, NULL);
    uv_close((uv_handle_t *)&a->sigint, NULL);
}

static void on_signal(uv_signal_t *s, int signum) {
    app *a = s->data;
    if (a->stopping) { /* a second signal: stop waiting */
        LOG_WARN("proxy: signal %d again, closing now", signum);
        if (a->px) on_drained(a->px, a);
        return;
    }
    a->stopping = true;
    LOG_INFO("proxy: signal %d, draining (up to %u ms)", signum, a->cfg->drain_timeout_ms);
    px_proxy_drain(a->px, a->cfg->drain_timeout_ms, on_drained, a);
}

int main(int argc, char **argv) {
    log_set_tag("proxy");
    px_config cfg;
    px_config_init(&cfg);
    int prc = px_config_parse_args(&cfg, argc, argv); /* 1: --help, 2: an error line */
    if (prc) {
        px_config_cleanup(&cfg);
        return prc == 1 ? 0 : 2;
    }
    if (cfg.version) {
        puts("duet-proxy " DUET_VERSION);
        px_config_cleanup(&cfg);
        return 0;
    }
    app a;
    memset(&a, 0, sizeof a);
    a.cfg = &cfg;
    uv_loop_init(&a.loop);
    int rc = 0;
    if (px_proxy_create(&a.loop, &cfg, &a.px) != DUET_OK) {
        fprintf(stderr, "duet-proxy: cannot start (see the log above)\n");
        rc = 1;
    } else {
        LOG_INFO("proxy: %zu prefill, %zu decode endpoints, policy %s, listening on %s:%d",
                 cfg.n_prefill, cfg.n_decode, px_policy_kind_name(cfg.policy), cfg.host,
                 px_proxy_port(a.px));
        uv_signal_init(&a.loop, &a.sigterm);
        uv_signal_init(&a.loop, &a.sigint);
        a.sigterm.data = a.sigint.data = &a;
        uv_signal_start(&a.sigterm, on_signal, SIGTERM);
        uv_signal_start(&a.sigint, on_signal, SIGINT);
    }
    uv_run(&a.loop, UV_RUN_DEFAULT);
    uv_walk(&a.loop, on_walk_close, NULL);
    uv_run(&a.loop, UV_RUN_DEFAULT);
    uv_loop_close(&a.loop);
    px_config_cleanup(&cfg);
    return rc;
}
