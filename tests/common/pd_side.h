/* One side of a prefill/decode pair inside one test process (test_kvx, test_spec_pd): an
 * instance, its engine and the role's KV plug-in (kv_lease or kv_pull: side channel on
 * localhost, UCX), started as the worker server would start them. Header-only; the test links
 * the prefill and decode libraries. One thread. */
#ifndef DUET_TEST_PD_SIDE_H
#define DUET_TEST_PD_SIDE_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "base/opt.h"
#include "check.h"
#include "kv_lease.h"
#include "kv_pull.h"

typedef struct pd_side {
    par_instance *inst;
    eng_engine *eng;
    srv_kv_plugin plug;
    srv_role role;
} pd_side;

/* Whether port on 127.0.0.1 can be bound now (0: the kernel picks one, stored in *got_p). */
static inline bool pd_port_bind(int port, int *got_p) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return false;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    bool ok = bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
              getsockname(fd, (struct sockaddr *)&a, &len) == 0;
    if (ok && got_p) *got_p = ntohs(a.sin_port);
    close(fd);
    return ok;
}

/* An HTTP port for a new pair of sides: one the kernel hands out as free, whose prefill side
 * channel (the port + 1000, kv_lease's default) is free too. Tests running side by side each
 * get their own (fixed ranges stepped per side set collided under parallel runs). */
static inline int pd_free_port(void) {
    for (int i = 0; i < 100; i++) {
        int p = 0;
        if (pd_port_bind(0, &p) && p + 1000 < 65536 && pd_port_bind(p + 1000, NULL)) return p;
    }
    CHECK_MSG(0, "no free port pair (p, p + 1000) on 127.0.0.1");
    return 0;
}

/* Starts a side of role on model_dir with instance options po: the plug-in takes its options
 * from args[0..n_args) (args[0] is the program's name; parsed under prog), the engine is
 * created with c (the caller's sizes and on_event; the plug-in's fetch hook is set here), and
 * the plug-in starts on 127.0.0.1 naming http_port. 0, or -1 where the instance or the
 * plug-in does not start (*s can then be left as it is). */
static inline int pd_side_start(pd_side *s, srv_role role, const char *model_dir,
                                const par_options *po, const char *prog, int n_args, char **args,
                                eng_config *c, int http_port) {
    memset(s, 0, sizeof *s);
    s->role = role;
    int argc = 0;
    char **argv = NULL;
    if (par_instance_create(po, model_dir, &argc, &argv, &s->inst) != DUET_OK) return -1;
    CHECK((role == SRV_ROLE_PREFILL ? kvlease_create(&s->plug) : kvpull_create(&s->plug)) ==
          DUET_OK);
    opt_parser *op;
    CHECK(opt_parser_create(prog, NULL, NULL, &op) == DUET_OK);
    CHECK(s->plug.add_options(s->plug.state, op) == DUET_OK);
    CHECK(opt_parse(op, n_args, args) == 0);
    opt_parser_destroy(op);
    c->fetch = s->plug.fetch;
    c->fetch_user = s->plug.state;
    CHECK(eng_create(c, s->inst, NULL, &s->eng) == DUET_OK);
    srv_kv_context ctx = {.role = role,
                          .engine = s->eng,
                          .kv = eng_kv(s->eng),
                          .inst = s->inst,
                          .host = "127.0.0.1",
                          .http_port = http_port,
                          .dp_rank = 0,
                          .dp_size = 1,
                          .tp_size = 1,
                          .served_model_name = "tiny"};
    return s->plug.start(s->plug.state, &ctx) == DUET_OK ? 0 : -1;
}

/* Stops the plug-in, then destroys the engine, the plug-in and the instance. */
static inline void pd_side_stop(pd_side *s) {
    s->plug.stop(s->plug.state);
    eng_destroy(s->eng);
    if (s->role == SRV_ROLE_PREFILL)
        kvlease_destroy(&s->plug);
    else
        kvpull_destroy(&s->plug);
    par_instance_destroy(s->inst);
}

#endif
