/* duet-launch (run as deploy/launch): starts a whole deployment from one description file —
 * every instance as one mpirun job, then duet-proxy with every DP endpoint listed — waits until
 * all answer /health, and supervises them until SIGINT/SIGTERM, which stops everything.
 * --dry-run prints the exact commands instead. The format and its checks are in desc.h.
 *
 * Why C on cJSON and opt.h rather than a shell script: the checks (placement against GPUs,
 * ports on each host, the model's heads and experts from config.json) need real parsing and
 * arithmetic, the description parser takes outside input and so gets a libFuzzer driver
 * (tests/fuzz/fuzz_launch_desc.c), and supervising children, signals and /health probes is
 * what libuv and duet's own HTTP client already do well; duet keeps Python out of its tools.
 * JSON (with comments) because cJSON reads it already and duet-proxy --config uses it too. */
#include <cjson/cJSON.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "base/fileio.h"
#include "base/log.h"
#include "base/opt.h"
#include "desc.h"
#include "model/config.h"
#include "net/httpc.h"

#ifndef DUET_BUILD_ROOT
#define DUET_BUILD_ROOT "build"
#endif

enum { PROBE_MS = 500 };

typedef struct launcher launcher;

typedef struct child {
    launcher *l;
    int cmd; /* index into the plan */
    uv_process_t proc;
    bool started, exited;
} child;

typedef struct probe {
    launcher *l;
    httpc_pool *pool;
    bool ready, in_flight;
} probe;

struct launcher {
    uv_loop_t *loop;
    const dl_plan *plan;
    const char *log_dir;
    double ready_timeout_s, stop_timeout_s;
    child *kids;   /* [plan->n_cmds] */
    probe *probes; /* [n_endpoints + 1]: the last one is the proxy's */
    uv_timer_t tick, kill_timer;
    uv_signal_t sigint, sigterm;
    uint64_t t0, stop_t0;
    bool instances_up, proxy_up, stopping;
    int exit_code;
};

/* "$VAR" as an env entry's value stands for the launcher's own VAR (secrets are not copied
 * into the plan). Returns NULL when the command sets nothing (the child inherits ours). */
static char **child_env(const dl_cmd *c) {
    extern char **environ;
    int n = 0, m = 0;
    for (char **e = c->env; e && *e; e++) n++;
    if (!n) return NULL;
    for (char **e = environ; *e; e++) m++;
    char **env = calloc((size_t)(n + m + 1), sizeof *env);
    if (!env) return NULL;
    int k = 0;
    for (char **e = c->env; *e; e++) {
        const char *eq = strchr(*e, '=');
        const char *val = eq[1] == '$' ? getenv(eq + 2) : eq + 1;
        if (!val) val = "";
        size_t len = (size_t)(eq - *e) + strlen(val) + 2;
        if ((env[k] = malloc(len))) snprintf(env[k++], len, "%.*s=%s", (int)(eq - *e), *e, val);
    }
    for (char **e = environ; *e; e++)
        if ((env[k] = strdup(*e))) k++;
    return env;
}

static void free_env(char **env) {
    for (char **e = env; e && *e; e++) free(*e);
    free(env);
}

static bool any_running(const launcher *l) {
    for (int i = 0; i < l->plan->n_cmds; i++)
        if (l->kids[i].started && !l->kids[i].exited) return true;
    return false;
}

static void close_cb_none(uv_handle_t *h, void *arg) {
    (void)arg;
    if (!uv_is_closing(h)) uv_close(h, NULL);
}

/* Everything has exited: close the handles so that uv_run returns. */
static void finish(launcher *l) {
    for (int i = 0; i <= l->plan->n_endpoints; i++) {
        httpc_pool_destroy(l->probes[i].pool);
        l->probes[i].pool = NULL;
    }
    uv_walk(l->loop, close_cb_none, NULL);
}

static void kill_all(launcher *l, const char *why) {
    for (int i = 0; i < l->plan->n_cmds; i++) {
        child *c = &l->kids[i];
        if (c->started && !c->exited) {
            LOG_WARN("%s %s: killing its process group", l->plan->cmds[i].name, why);
            uv_kill(-c->proc.pid, SIGKILL);
        }
    }
}

static void on_kill_timer(uv_timer_t *t) {
    launcher *l = t->data;
    char why[64];
    snprintf(why, sizeof why, "did not stop within %.0f s", l->stop_timeout_s);
    kill_all(l, why);
}

/* SIGTERM to the proxy and to every mpirun (which passes it to its ranks: they drain and
 * exit); what is left after --stop-timeout is killed. */
static void stop_all(launcher *l, int code) {
    if (!l->stopping) l->exit_code = code;
    if (l->stopping) return;
    l->stopping = true;
    l->stop_t0 = uv_now(l->loop);
    uv_timer_stop(&l->tick);
    for (int i = l->plan->n_cmds - 1; i >= 0; i--)
        if (l->kids[i].started && !l->kids[i].exited) uv_kill(l->kids[i].proc.pid, SIGTERM);
    if (!any_running(l)) {
        finish(l);
        return;
    }
    uv_timer_start(&l->kill_timer, on_kill_timer, (uint64_t)(l->stop_timeout_s * 1000), 0);
}

static void on_signal(uv_signal_t *s, int signum) {
    launcher *l = s->data;
    if (l->stopping) {
        /* one Ctrl-C often arrives twice (the terminal's and a wrapper script's): only a
         * second signal a moment later means "now" */
        if (uv_now(l->loop) - l->stop_t0 >= 1000)
            kill_all(l, "is still stopping at a second signal");
        return;
    }
    LOG_INFO("signal %d: stopping every instance and the proxy", signum);
    stop_all(l, 0);
}

static void on_exit_cb(uv_process_t *p, int64_t status, int term_signal) {
    child *c = p->data;
    launcher *l = c->l;
    const dl_cmd *cmd = &l->plan->cmds[c->cmd];
    c->exited = true;
    uv_close((uv_handle_t *)p, NULL);
    if (l->stopping) {
        LOG_INFO("%s stopped (%s %d)", cmd->name, term_signal ? "signal" : "status",
                 term_signal ? term_signal : (int)status);
        if (!any_running(l)) {
            uv_timer_stop(&l->kill_timer);
            finish(l);
        }
        return;
    }
    LOG_ERROR("%s exited (%s %d); its log: %s/%s.log", cmd->name, term_signal ? "signal" : "status",
              term_signal ? term_signal : (int)status, l->log_dir, cmd->name);
    if (!l->proxy_up || cmd->instance < 0) {
        stop_all(l, 1); /* not up yet, or the front door is gone: nothing left to serve */
        return;
    }
    bool left[2] = {false, false};
    for (int i = 0; i < l->plan->n_cmds; i++) {
        const dl_cmd *o = &l->plan->cmds[i];
        if (o->instance >= 0 && !l->kids[i].exited)
            for (int e = 0; e < l->plan->n_endpoints; e++)
                if (l->plan->endpoints[e].instance == o->instance)
                    left[l->plan->endpoints[e].role] = true;
    }
    if (!left[DL_ROLE_PREFILL] || !left[DL_ROLE_DECODE]) {
        LOG_ERROR("no %s instance is left: stopping", left[DL_ROLE_PREFILL] ? "decode" : "prefill");
        stop_all(l, 1);
        return;
    }
    LOG_WARN("the other instances go on serving; the proxy stops sending to %s's endpoints",
             cmd->name);
}

static duet_status spawn(launcher *l, int i) {
    const dl_cmd *cmd = &l->plan->cmds[i];
    child *c = &l->kids[i];
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.log", l->log_dir, cmd->name);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        LOG_ERROR("cannot write %s", path);
        return DUET_ERR_IO;
    }
    uv_stdio_container_t stdio[3] = {
        {.flags = UV_IGNORE},
        {.flags = UV_INHERIT_FD, .data.fd = fd},
        {.flags = UV_INHERIT_FD, .data.fd = fd},
    };
    char **env = child_env(cmd);
    uv_process_options_t o = {
        .exit_cb = on_exit_cb,
        .file = cmd->argv[0],
        .args = cmd->argv,
        .env = env,
        .stdio_count = 3,
        .stdio = stdio,
        /* own process group: a terminal's Ctrl-C reaches the launcher only, which stops the
         * children in order; the last-resort kill takes the whole group */
        .flags = UV_PROCESS_DETACHED,
    };
    c->l = l;
    c->cmd = i;
    c->proc.data = c;
    int rc = uv_spawn(l->loop, &c->proc, &o);
    free_env(env);
    close(fd);
    if (rc != 0) {
        LOG_ERROR("cannot start %s (%s): %s", cmd->name, cmd->argv[0], uv_strerror(rc));
        return DUET_ERR_IO;
    }
    c->started = true;
    LOG_INFO("started %s (pid %d): %s", cmd->name, c->proc.pid, cmd->summary);
    return DUET_OK;
}

static void on_probe_head(httpc_req *req, const httpc_response *resp, void *arg) {
    (void)req;
    probe *p = arg;
    if (resp->status == 200) p->ready = true;
}

static void on_probe_end(httpc_req *req, duet_status st, void *arg) {
    (void)req;
    (void)st;
    probe *p = arg;
    p->in_flight = false;
}

static void probe_send(probe *p) {
    if (p->ready || p->in_flight || !p->pool) return;
    httpc_request rq = {
        .method = "GET", .path = "/health", .first_byte_timeout_ms = 2000, .idle_timeout_ms = 2000};
    httpc_callbacks cb = {.on_head = on_probe_head, .on_end = on_probe_end};
    if (httpc_send(p->pool, &rq, &cb, p, NULL) == DUET_OK) p->in_flight = true;
}

static void on_tick(uv_timer_t *t) {
    launcher *l = t->data;
    const dl_plan *plan = l->plan;
    double waited = (double)(uv_now(l->loop) - l->t0) / 1000.0;
    if (!l->instances_up) {
        bool all = true;
        for (int e = 0; e < plan->n_endpoints; e++) {
            probe_send(&l->probes[e]);
            all &= l->probes[e].ready;
        }
        if (all) {
            l->instances_up = true;
            LOG_INFO("every DP endpoint is healthy (%.1f s)", waited);
            int proxy = plan->n_cmds - 1;
            if (plan->cmds[proxy].instance >= 0) {
                l->proxy_up = true; /* no proxy in this deployment */
                for (int e = 0; e < plan->n_endpoints; e++)
                    printf("duet-launch: ready: http://%s\n", plan->endpoints[e].host_port);
                fflush(stdout);
                uv_timer_stop(&l->tick);
                return;
            }
            if (spawn(l, proxy) != DUET_OK) return stop_all(l, 1);
        }
    } else if (!l->proxy_up) {
        probe *p = &l->probes[plan->n_endpoints];
        probe_send(p);
        if (p->ready) {
            l->proxy_up = true;
            uv_timer_stop(&l->tick);
            LOG_INFO("the proxy is healthy (%.1f s): OpenAI API at %s/v1", waited, plan->proxy_url);
            printf("duet-launch: ready: %s\n", plan->proxy_url);
            fflush(stdout);
            return;
        }
    }
    if (waited > l->ready_timeout_s) {
        for (int e = 0; e < plan->n_endpoints; e++)
            if (!l->probes[e].ready)
                LOG_ERROR("%s (%s) did not answer /health within %.0f s; see %s/%s.log",
                          plan->endpoints[e].host_port,
                          plan->cmds[plan->endpoints[e].instance].name, l->ready_timeout_s,
                          l->log_dir, plan->cmds[plan->endpoints[e].instance].name);
        if (l->instances_up)
            LOG_ERROR("the proxy did not become healthy; see %s/proxy.log", l->log_dir);
        stop_all(l, 1);
    }
}

static duet_status split_host_port(const char *hp, char *host, size_t host_len, int *port_p) {
    const char *colon = strrchr(hp, ':');
    if (!colon) return DUET_ERR_INVALID;
    const char *h = hp;
    size_t n = (size_t)(colon - hp);
    if (h[0] == '[' && n >= 2 && h[n - 1] == ']') {
        h++;
        n -= 2;
    }
    if (n >= host_len) return DUET_ERR_INVALID;
    memcpy(host, h, n);
    host[n] = '\0';
    *port_p = atoi(colon + 1);
    return DUET_OK;
}

static duet_status make_probe(launcher *l, probe *p, const char *host_port) {
    char host[256];
    int port;
    httpc_pool_opts po;
    httpc_pool_opts_init(&po);
    po.connect_timeout_ms = 1000;
    po.keepalive_ms = 0;
    p->l = l;
    duet_status st = split_host_port(host_port, host, sizeof host, &port);
    if (st == DUET_OK) st = httpc_pool_create(l->loop, host, port, &po, &p->pool);
    if (st != DUET_OK) LOG_ERROR("cannot probe %s: %s", host_port, duet_strerror(st));
    return st;
}

/* The secrets the description names come from this environment; the workers and the proxy
 * read them under duet's own names (mpirun -x passes them by name). */
static duet_status take_secrets(const dl_desc *d) {
    bool pd = false;
    for (int i = 0; i < d->n_inst; i++) pd |= d->inst[i].role == DL_ROLE_PREFILL;
    if (pd) {
        const char *v = getenv(d->kv_secret_env);
        if (!v || !v[0]) {
            LOG_ERROR("%s is not set: prefill and decode workers authenticate the KV side "
                      "channel with it (export one shared secret, e.g. "
                      "%s=$(head -c 24 /dev/urandom | base64))",
                      d->kv_secret_env, d->kv_secret_env);
            return DUET_ERR_INVALID;
        }
        setenv("DUET_KV_SECRET", v, 1);
    }
    if (d->api_key_env) {
        const char *v = getenv(d->api_key_env);
        if (!v || !v[0]) {
            LOG_ERROR("%s is not set: the description asks for an API key from it", d->api_key_env);
            return DUET_ERR_INVALID;
        }
        setenv("DUET_API_KEY", v, 1);
    }
    return DUET_OK;
}

static int run(const dl_plan *plan, const dl_desc *d, const char *log_dir, double ready_s,
               double stop_s) {
    if (take_secrets(d) != DUET_OK) return 1;
    if (mkdir(log_dir, 0755) != 0 && access(log_dir, W_OK) != 0) {
        LOG_ERROR("cannot use the log folder %s", log_dir);
        return 1;
    }
    launcher l = {.loop = uv_default_loop(),
                  .plan = plan,
                  .log_dir = log_dir,
                  .ready_timeout_s = ready_s,
                  .stop_timeout_s = stop_s};
    l.kids = calloc((size_t)plan->n_cmds, sizeof *l.kids);
    l.probes = calloc((size_t)plan->n_endpoints + 1, sizeof *l.probes);
    if (!l.kids || !l.probes) {
        free(l.kids);
        free(l.probes);
        return 1;
    }
    uv_timer_init(l.loop, &l.tick);
    uv_timer_init(l.loop, &l.kill_timer);
    uv_signal_init(l.loop, &l.sigint);
    uv_signal_init(l.loop, &l.sigterm);
    l.tick.data = l.kill_timer.data = l.sigint.data = l.sigterm.data = &l;
    uv_signal_start(&l.sigint, on_signal, SIGINT);
    uv_signal_start(&l.sigterm, on_signal, SIGTERM);
    signal(SIGPIPE, SIG_IGN);
    l.t0 = uv_now(l.loop);

    duet_status st = DUET_OK;
    for (int e = 0; e < plan->n_endpoints && st == DUET_OK; e++)
        st = make_probe(&l, &l.probes[e], plan->endpoints[e].host_port);
    if (st == DUET_OK && plan->proxy_url)
        st = make_probe(&l, &l.probes[plan->n_endpoints], plan->proxy_url + strlen("http://"));
    for (int i = 0; i < plan->n_cmds && st == DUET_OK; i++)
        if (plan->cmds[i].instance >= 0) st = spawn(&l, i);
    if (st != DUET_OK)
        stop_all(&l, 1);
    else
        uv_timer_start(&l.tick, on_tick, PROBE_MS, PROBE_MS);
    uv_run(l.loop, UV_RUN_DEFAULT);
    uv_loop_close(l.loop);
    free(l.kids);
    free(l.probes);
    return l.exit_code;
}

static duet_status check_model(const dl_desc *d, const char *config_path) {
    char path[4096];
    if (!config_path) {
        snprintf(path, sizeof path, "%s/config.json", d->model);
        config_path = path;
    }
    if (access(config_path, R_OK) != 0) {
        LOG_ERROR("cannot read %s: the layout is checked against the model's heads and experts "
                  "(give --model-config FILE when the model is not on this machine)",
                  config_path);
        return DUET_ERR_NOT_FOUND;
    }
    char *text = NULL;
    duet_status st = fio_read_text(config_path, 16u << 20, &text); /* logs its own error */
    if (st != DUET_OK) return st;
    cfg_model c;
    st = cfg_parse(text, config_path, &c);
    free(text);
    if (st != DUET_OK) return st;
    dl_model_shape m = {.heads = c.num_attention_heads,
                        .intermediate = c.intermediate_size,
                        .moe_intermediate = c.moe_intermediate_size,
                        .shared_experts = c.n_shared_experts,
                        .routed_experts = c.n_routed_experts};
    char err[512];
    st = dl_desc_check_model(d, &m, config_path, err, sizeof err);
    if (st != DUET_OK) LOG_ERROR("%s", err);
    return st;
}

int main(int argc, char **argv) {
    log_set_tag("duet-launch");
    bool dry_run = false;
    const char *model_config = NULL, *log_dir = NULL;
    double ready_s = 600, stop_s = 45;
    const opt_spec specs[] = {
        {.name = "--dry-run",
         .type = OPT_FLAG,
         .dest = &dry_run,
         .help = "print the commands (one per instance, then the proxy) and exit"},
        {.name = "--model-config",
         .type = OPT_STRING,
         .dest = &model_config,
         .metavar = "FILE",
         .help = "config.json to check the layout against (default: MODEL/config.json)"},
        {.name = "--log-dir",
         .type = OPT_STRING,
         .dest = &log_dir,
         .def = "duet-logs",
         .env = "DUET_LOG_DIR",
         .metavar = "DIR",
         .help = "where each instance's and the proxy's output goes (NAME.log)"},
        {.name = "--ready-timeout",
         .type = OPT_DOUBLE,
         .dest = &ready_s,
         .def = "600",
         .min = 1,
         .max = 1e6,
         .metavar = "S",
         .help = "give up when not every endpoint answers /health within S seconds"},
        {.name = "--stop-timeout",
         .type = OPT_DOUBLE,
         .dest = &stop_s,
         .def = "45",
         .min = 1,
         .max = 1e6,
         .metavar = "S",
         .help = "after SIGTERM, kill what is still running after S seconds"},
    };
    opt_parser *op;
    if (opt_parser_create("duet-launch", "[options] DESCRIPTION.json",
                          "Starts every instance of a deployment (one mpirun each) and duet-proxy "
                          "in front, waits for /health, and stops them all on SIGINT/SIGTERM. "
                          "See docs/deployment.md for the description's format.",
                          &op) != DUET_OK)
        return 1;
    int prc = 2;
    opt_allow_positional(op, 1, "DESCRIPTION");
    if (opt_add(op, "Launch", specs, (int)(sizeof specs / sizeof specs[0])) == DUET_OK)
        prc = opt_parse(op, argc, argv);
    const char *file = prc == 0 && opt_positional_count(op) ? opt_positional(op, 0) : NULL;
    if (prc == 0 && !file) {
        fprintf(stderr, "duet-launch: a description file is required (see --help)\n");
        prc = 2;
    }
    if (prc) {
        opt_parser_destroy(op);
        return prc == 1 ? 0 : 2;
    }

    char *text = NULL;
    dl_desc *d = NULL;
    dl_plan *plan = NULL;
    char err[1024];
    int rc = 2;
    if (fio_read_text(file, 64u << 20, &text) != DUET_OK) {
        LOG_ERROR("cannot read %s", file);
        goto out;
    }
    if (dl_desc_parse(text, strlen(text), &d, err, sizeof err) != DUET_OK) {
        LOG_ERROR("%s: %s", file, err);
        goto out;
    }
    if (check_model(d, model_config) != DUET_OK) goto out;
    dl_paths paths = {.prefill = DUET_BUILD_ROOT "/prefill/duet-prefill",
                      .decode = DUET_BUILD_ROOT "/decode/duet-decode",
                      .proxy = DUET_BUILD_ROOT "/proxy/duet-proxy",
                      .agent = DUET_BUILD_ROOT "/deploy/duet-mpi-agent"};
    if (dl_plan_create(d, &paths, &plan) != DUET_OK) {
        LOG_ERROR("out of memory");
        rc = 1;
        goto out;
    }
    if (dry_run) {
        for (int i = 0; i < plan->n_cmds; i++) {
            char *line = dl_cmd_line(&plan->cmds[i]);
            printf("# %s\n%s\n", plan->cmds[i].summary, line ? line : "");
            free(line);
        }
        rc = 0;
        goto out;
    }
    rc = run(plan, d, log_dir, ready_s, stop_s);
out:
    dl_plan_destroy(plan);
    dl_desc_destroy(d);
    free(text);
    opt_parser_destroy(op);
    return rc;
}
