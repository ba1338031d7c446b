/* duet-kvbench: KV transfer speed of the disaggregation path, prefill worker to decode worker,
 * in two processes on this host. The prefill process leases blocks for prompts of the given
 * lengths (filled with a known pattern, no model compute); the decode process pulls each lease
 * the way duet-decode does (side channel pin, coalesced UCX GETs, release), checks every byte,
 * and reports GB/s and per-request transfer latency. The KV geometry is DeepSeek-V3's latent
 * (kv_lora_rank 512 + rope 64) over --layers layers in the CPU backend's float32.
 * tools/bench-kv.sh runs it next to ucx_perftest on the same transport. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "base/fileio.h"
#include "kv_lease.h"
#include "kv_pull.h"
#include "base/log.h"
#include "base/opt.h"

typedef struct bench_opts {
    int tokens[16];
    int n_sizes;
    int layers, block_size, repeat, port;
    const char *staging; /* --kv-staging of both workers */
    const char *backend; /* "cpu" or "cuda" */
    long long chunk_bytes, staging_bytes;
    int in_flight;
    bool copy_ref; /* also time pinned host<->device copies of the same bytes */
    bool cuda_ipc; /* --kv-cuda-ipc on both workers */
} bench_opts;

static int write_model(const char *dir, int layers) {
    char cfg[1024], path[512];
    snprintf(cfg, sizeof cfg,
             "{\"model_type\":\"deepseek_v3\",\"vocab_size\":256,\"hidden_size\":64,"
             "\"intermediate_size\":64,\"num_hidden_layers\":%d,\"num_attention_heads\":1,"
             "\"q_lora_rank\":null,\"kv_lora_rank\":512,\"qk_nope_head_dim\":16,"
             "\"qk_rope_head_dim\":64,\"v_head_dim\":16,\"n_routed_experts\":0,"
             "\"max_position_embeddings\":163840,\"rope_theta\":10000,\"bos_token_id\":0,"
             "\"eos_token_id\":1}",
             layers);
    snprintf(path, sizeof path, "%s/config.json", dir);
    return fio_write_file(path, cfg, strlen(cfg)) == DUET_OK ? 0 : -1;
}

/* The value every byte of a leased block holds: block id and offset mixed. */
static uint8_t pattern(int32_t block, size_t off) {
    uint64_t x = (uint64_t)block * 0x9e3779b97f4a7c15ull + off * 0xbf58476d1ce4e5b9ull;
    return (uint8_t)(x >> 56);
}

static void on_event(void *user, const eng_event *ev);

typedef struct side {
    par_instance *inst;
    eng_engine *eng;
    srv_kv_plugin plug;
} side;

static int make_side(side *s, const char *model, srv_role role, const bench_opts *o, int n_blocks) {
    par_options po;
    par_options_init(&po);
    po.load_format = MDL_WEIGHTS_DUMMY;
    snprintf(po.backend, sizeof po.backend, "%s", o->backend);
    int argc = 0;
    char **argv = NULL;
    if (par_instance_create(&po, model, &argc, &argv, &s->inst) != DUET_OK) return -1;
    if ((role == SRV_ROLE_PREFILL ? kvlease_create(&s->plug) : kvpull_create(&s->plug)) != DUET_OK)
        return -1;
    /* room for the largest prompt's blocks (576 float32 latent dims per token and layer) */
    char staging_bytes[32], chunk[32], in_flight[16];
    snprintf(staging_bytes, sizeof staging_bytes, "%zu",
             o->staging_bytes > 0 ? (size_t)o->staging_bytes
                                  : (size_t)(n_blocks / 2 + 1) * (size_t)o->layers *
                                        (size_t)o->block_size * 576 * 4);
    snprintf(chunk, sizeof chunk, "%lld", o->chunk_bytes);
    snprintf(in_flight, sizeof in_flight, "%d", o->in_flight);
    char *args[10] = {"x",
                      "--kv-staging",
                      (char *)o->staging,
                      "--kv-staging-bytes",
                      staging_bytes,
                      "--kv-chunk-bytes",
                      chunk,
                      "--kv-chunks-in-flight",
                      in_flight,
                      o->cuda_ipc ? "--kv-cuda-ipc" : "--no-kv-cuda-ipc"};
    opt_parser *op;
    if (opt_parser_create("duet-kvbench", NULL, NULL, &op) != DUET_OK) return -1;
    int prc = s->plug.add_options(s->plug.state, op) == DUET_OK ? opt_parse(op, 10, args) : 2;
    opt_parser_destroy(op);
    if (prc != 0) return -1;
    eng_config c;
    eng_config_default(&c);
    c.block_size = o->block_size;
    c.n_blocks = n_blocks;
    c.max_model_len = 163840;
    c.max_num_batched_tokens = 4096;
    c.fetch = s->plug.fetch;
    c.fetch_user = s->plug.state;
    c.on_event = on_event;
    if (eng_create(&c, s->inst, NULL, &s->eng) != DUET_OK) return -1;
    srv_kv_context ctx = {.role = role,
                          .engine = s->eng,
                          .kv = eng_kv(s->eng),
                          .inst = s->inst,
                          .host = "127.0.0.1",
                          .http_port = o->port - 1000,
                          .dp_size = 1,
                          .tp_size = 1,
                          .served_model_name = "kvbench",
                          .max_model_len = c.max_model_len};
    return s->plug.start(s->plug.state, &ctx) == DUET_OK ? 0 : -1;
}

/* Prefill process: answers "N" lines on stdin with one JSON line of kv_transfer_params. */
static int run_prefill(const char *model, const bench_opts *o, int n_blocks, FILE *in, FILE *out) {
    side s = {0};
    if (make_side(&s, model, SRV_ROLE_PREFILL, o, n_blocks) != 0) return 1;
    be_kv *kv = eng_kv(s.eng);
    int32_t *blocks = malloc((size_t)n_blocks * sizeof(int32_t));
    char line[64];
    uint64_t id = 1;
    fprintf(out, "ready\n");
    fflush(out);
    while (fgets(line, sizeof line, in)) {
        int n_tokens = atoi(line), n = 0;
        bool busy;
        for (int i = 0; i < 50; i++) eng_step(s.eng, &busy); /* frees released leases */
        if (eng_lease_for_test(s.eng, id, n_tokens, blocks, n_blocks, &n) != DUET_OK) {
            fprintf(out, "error\n");
            fflush(out);
            continue;
        }
        /* the pattern goes in through a host copy when the cache is in device memory */
        be_backend *be = mdl_backend(par_model(s.inst));
        uint8_t *host = kv->on_device ? malloc((size_t)n * kv->block_bytes) : NULL;
        for (int b = 0; b < n; b++) {
            uint8_t *p = host ? host + (size_t)b * kv->block_bytes
                              : (uint8_t *)kv->data + (size_t)blocks[b] * kv->block_bytes;
            for (size_t k = 0; k < kv->block_bytes; k++) p[k] = pattern(blocks[b], k);
        }
        if (host) {
            be->ops->kv_copy_host(be, kv, blocks, n, host, false);
            free(host);
        }
        /* what a prefill worker's answer carries (kv_transfer_params), as one JSON line */
        srv_kv_params kp = {0};
        cJSON *params = cJSON_CreateObject();
        if (params && s.plug.lease(s.plug.state, id, "bench", &kp) == DUET_OK) {
            cJSON *ids = cJSON_AddArrayToObject(params, "remote_block_ids");
            for (int b = 0; b < n; b++) cJSON_AddItemToArray(ids, cJSON_CreateNumber(blocks[b]));
            cJSON_AddStringToObject(params, "remote_engine_id", kp.engine_id);
            cJSON_AddStringToObject(params, "remote_host", kp.host);
            cJSON_AddNumberToObject(params, "remote_port", kp.port);
            cJSON_AddNumberToObject(params, "remote_request_id", (double)id);
        }
        char *txt = params ? cJSON_PrintUnformatted(params) : NULL;
        fprintf(out, "%s\n", txt ? txt : "error");
        fflush(out);
        free(txt);
        cJSON_Delete(params);
        id++;
    }
    free(blocks);
    s.plug.stop(s.plug.state);
    eng_destroy(s.eng);
    kvlease_destroy(&s.plug);
    par_instance_destroy(s.inst);
    return 0;
}

typedef struct result {
    bool done;
    eng_finish finish;
    char error[256];
    be_kv *kv;
    const int32_t *remote;
    int n_tokens;
    size_t bad;
    bool checked;
} result;

static size_t verify(be_kv *kv, const int32_t *local, const int32_t *remote, int n, int n_tokens);

static void on_event(void *user, const eng_event *ev) {
    result *r = ev->user;
    (void)user;
    if (!ev->finish) return;
    r->done = true;
    r->finish = ev->finish;
    if (ev->error) snprintf(r->error, sizeof r->error, "%s", ev->error);
}

static void on_kv_ready(void *user, const int32_t *blocks, int n_blocks) {
    result *r = user;
    r->bad = verify(r->kv, blocks, r->remote, n_blocks, r->n_tokens);
    r->checked = true;
}

/* Every byte of the pulled blocks but the last token's own slot (decode recomputes it). */
static be_backend *g_decode_be;

static size_t verify(be_kv *kv, const int32_t *local, const int32_t *remote, int n, int n_tokens) {
    size_t bad = 0, row = (size_t)kv->kv_dim * dt_size(kv->dtype);
    int last_block = (n_tokens - 1) / kv->block_size, last_off = (n_tokens - 1) % kv->block_size;
    uint8_t *host = NULL;
    if (kv->on_device) { /* read the blocks back through a host copy */
        host = malloc((size_t)n * kv->block_bytes);
        if (!host ||
            g_decode_be->ops->kv_copy_host(g_decode_be, kv, local, n, host, true) != DUET_OK) {
            free(host);
            return 1;
        }
    }
    for (int b = 0; b < n; b++) {
        const uint8_t *p = host ? host + (size_t)b * kv->block_bytes
                                : (const uint8_t *)kv->data + (size_t)local[b] * kv->block_bytes;
        for (size_t k = 0; k < kv->block_bytes; k++) {
            size_t slot = (k / row) % (size_t)kv->block_size;
            if (b == last_block && (int)slot >= last_off) continue;
            if (p[k] != pattern(remote[b], k) && getenv("KVB_DEBUG") && bad < 5)
                fprintf(stderr, "block %d (local %d remote %d) byte %zu: %u vs %u\n", b, local[b],
                        remote[b], k, p[k], pattern(remote[b], k));
            bad += p[k] != pattern(remote[b], k);
        }
    }
    free(host);
    return bad;
}

/* The reference a pull is held to: the best of reps copies of blocks [0, n) of the decode's
 * cache to page-locked host memory and back (device->host first, so the cache keeps its bytes),
 * through the same backend copy ops the staged path uses. GB/s each way; -1 on failure. */
static int copy_reference(be_backend *be, be_kv *kv, int n, int reps, double *d2h_p,
                          double *h2d_p) {
    size_t bytes = (size_t)n * kv->block_bytes;
    void *host = NULL;
    int32_t *blocks = malloc((size_t)n * sizeof(int32_t));
    if (!blocks || posix_memalign(&host, 4096, bytes) != 0) {
        free(blocks);
        return -1;
    }
    memset(host, 0, bytes);
    bool pinned = be->ops->host_pin && be->ops->host_pin(be, host, bytes) == DUET_OK;
    for (int i = 0; i < n; i++) blocks[i] = i;
    double best[2] = {1e30, 1e30};
    int rc = 0;
    for (int rep = 0; rep < reps + 1 && !rc; rep++) {
        for (int dir = 0; dir < 2 && !rc; dir++) {
            struct timespec t0, t1;
            clock_gettime(CLOCK_MONOTONIC, &t0);
            void *t = NULL;
            duet_status st = be_kv_copy_start(be, kv, blocks, n, host, dir == 0, &t);
            if (st == DUET_OK) st = be_kv_copy_poll(be, t, true);
            clock_gettime(CLOCK_MONOTONIC, &t1);
            if (st != DUET_OK) rc = -1;
            double sec = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
            if (rep > 0 && sec < best[dir]) best[dir] = sec; /* rep 0 warms up */
        }
    }
    if (pinned) be->ops->host_unpin(be, host);
    free(host);
    free(blocks);
    *d2h_p = rc ? -1 : (double)bytes / best[0] / 1e9;
    *h2d_p = rc ? -1 : (double)bytes / best[1] / 1e9;
    return rc;
}

/* --tokens: prompt lengths separated by commas, into bench_opts. */
static duet_status parse_tokens(const opt_spec *s, const char *v, char *err, size_t len) {
    bench_opts *o = s->dest;
    int n = 0, sizes[16];
    const char *p = v;
    for (;;) {
        char *end;
        errno = 0;
        long x = strtol(p, &end, 10);
        if (end == p || errno || x < 1 || x > 1 << 20 || (*end && *end != ',')) {
            snprintf(err, len,
                     "expected prompt lengths in [1, 1048576] separated by commas, got '%s'", v);
            return DUET_ERR_INVALID;
        }
        if (n == 16) {
            snprintf(err, len, "at most 16 lengths");
            return DUET_ERR_INVALID;
        }
        sizes[n++] = (int)x;
        if (!*end) break;
        p = end + 1;
    }
    memcpy(o->tokens, sizes, sizeof sizes);
    o->n_sizes = n;
    return DUET_OK;
}

int main(int argc, char **argv) {
    log_set_tag("duet-kvbench");
    bench_opts o = {0};
    int backend = 0;
    const opt_spec specs[] = {
        {.name = "--tokens",
         .type = OPT_CUSTOM,
         .parse = parse_tokens,
         .dest = &o,
         .def = "1024,8192,32768",
         .metavar = "N,N...",
         .help = "prompt lengths whose KV is pulled"},
        {.name = "--layers",
         .type = OPT_INT,
         .dest = &o.layers,
         .def = "30",
         .min = 1,
         .max = 4096,
         .help = "layers of latent KV (DeepSeek-V3 has 61)"},
        {.name = "--block-size",
         .type = OPT_INT,
         .dest = &o.block_size,
         .def = "64",
         .min = 1,
         .max = 1 << 16,
         .help = "tokens per KV block"},
        {.name = "--repeat",
         .type = OPT_INT,
         .dest = &o.repeat,
         .def = "5",
         .min = 1,
         .max = 64,
         .help = "timed pulls per length, after one to warm up"},
        {.name = "--port",
         .type = OPT_INT,
         .dest = &o.port,
         .def = "27600",
         .min = 1001,
         .max = 65535,
         .help = "the prefill side channel's port (N - 1000 is its nominal HTTP port)"},
        {.name = "--kv-staging",
         .type = OPT_STRING,
         .dest = &o.staging,
         .def = "auto",
         .metavar = "{auto,on,off}",
         .help = "--kv-staging of both workers"},
        {.name = "--kv-staging-bytes",
         .type = OPT_SIZE,
         .dest = &o.staging_bytes,
         .def = "0",
         .help = "--kv-staging-bytes of both workers (0: room for half the largest prompt's "
                 "blocks on each side, plus one)"},
        {.name = "--kv-chunk-bytes",
         .type = OPT_SIZE,
         .dest = &o.chunk_bytes,
         .def = "16M",
         .help = "--kv-chunk-bytes of both workers"},
        {.name = "--kv-chunks-in-flight",
         .type = OPT_INT,
         .dest = &o.in_flight,
         .def = "3",
         .min = 1,
         .max = 8,
         .help = "--kv-chunks-in-flight of both workers"},
        {.name = "--kv-cuda-ipc",
         .type = OPT_FLAG,
         .dest = &o.cuda_ipc,
         .flags = OPT_NEGATABLE,
         .help = "--kv-cuda-ipc on both workers (CUDA caches: device-to-device copies); "
                 "without it (or with --no-kv-cuda-ipc) both workers get --no-kv-cuda-ipc"},
        {.name = "--copy-reference",
         .type = OPT_FLAG,
         .dest = &o.copy_ref,
         .help = "also time device->host and host->device copies of the same blocks between "
                 "the decode's cache and page-locked host memory (the backend's KV copies; "
                 "memcpy on the CPU backend), and print the pull's share of the slower one"},
        {.name = "--backend",
         .type = OPT_CHOICE,
         .dest = &backend,
         .def = "cpu",
         .choices = "cpu|cuda",
         .help = "where the KV cache lives"},
    };
    opt_parser *op;
    if (opt_parser_create("duet-kvbench", "[options]",
                          "KV transfer speed of the disaggregation path: a prefill process leases "
                          "blocks of a known pattern, this one pulls them as duet-decode does, "
                          "checks every byte and reports GB/s and the latency of each pull.",
                          &op) != DUET_OK)
        return 1;
    int prc = opt_add(op, "Benchmark", specs, (int)(sizeof specs / sizeof specs[0])) == DUET_OK
                  ? opt_parse(op, argc, argv)
                  : 2;
    opt_parser_destroy(op);
    if (prc) return prc == 1 ? 0 : 2;
    o.backend = backend == 1 ? "cuda" : "cpu";
    int max_tokens = 0;
    for (int i = 0; i < o.n_sizes; i++)
        max_tokens = o.tokens[i] > max_tokens ? o.tokens[i] : max_tokens;
    int n_blocks = 2 * ((max_tokens + o.block_size - 1) / o.block_size) + 8;
    char model[] = "/tmp/duet-kvbench-XXXXXX";
    if (!mkdtemp(model) || write_model(model, o.layers) != 0) return 1;

    int to_child[2], from_child[2];
    if (pipe(to_child) || pipe(from_child)) return 1;
    pid_t pid = fork();
    if (pid == 0) {
        close(to_child[1]);
        close(from_child[0]);
        log_set_tag("kvbench-prefill");
        int rc =
            run_prefill(model, &o, n_blocks, fdopen(to_child[0], "r"), fdopen(from_child[1], "w"));
        _exit(rc);
    }
    close(to_child[0]);
    close(from_child[1]);
    FILE *cmd = fdopen(to_child[1], "w"), *reply = fdopen(from_child[0], "r");
    char *line = malloc(1 << 22);
    int rc = 0;
    if (!fgets(line, 1 << 22, reply) || strncmp(line, "ready", 5) != 0) {
        fprintf(stderr, "duet-kvbench: the prefill process did not start\n");
        rc = 1;
        goto out;
    }
    side d = {0};
    result res = {0};
    if (make_side(&d, model, SRV_ROLE_DECODE, &o, n_blocks) != 0) {
        rc = 1;
        goto out;
    }
    be_kv *kv = eng_kv(d.eng);
    g_decode_be = mdl_backend(par_model(d.inst));
    printf("KV geometry: %d layers x %d latent dims x %s = %zu bytes/token, blocks of %d tokens "
           "(%zu bytes)\n",
           kv->n_layers, kv->kv_dim, dt_name(kv->dtype), kv->block_bytes / (size_t)kv->block_size,
           kv->block_size, kv->block_bytes);
    printf("%8s %12s %10s %10s %10s %10s %8s %6s", "tokens", "bytes", "p50_ms", "min_ms",
           "GB/s_p50", "GB/s_mean", "reads", "ok");
    if (o.copy_ref) printf(" %10s %10s %8s", "d2h_GB/s", "h2d_GB/s", "pull/ref");
    printf("\n");
    int32_t *prompt = calloc((size_t)max_tokens, sizeof(int32_t));
    for (int i = 0; i < max_tokens; i++) prompt[i] = 2 + i % 200;
    uint64_t rid = 1;
    for (int si = 0; si < o.n_sizes && !rc; si++) {
        int n_tokens = o.tokens[si];
        double ms[64];
        int n_ok = 0;
        size_t bytes = 0, bytes_total = 0;
        double secs_total = 0;
        uint64_t reads0 = 0, reads1 = 0;
        /* rep -1 warms up: the first pull to a peer also sets up the connection */
        for (int rep = -1; rep < o.repeat && rep < 64; rep++) {
            fprintf(cmd, "%d\n", n_tokens);
            fflush(cmd);
            if (!fgets(line, 1 << 22, reply) || line[0] != '{') {
                rc = 1;
                break;
            }
            cJSON *params = cJSON_Parse(line);
            const cJSON *ids = cJSON_GetObjectItem(params, "remote_block_ids");
            int n_remote = cJSON_GetArraySize(ids);
            int32_t *remote = malloc((size_t)n_remote * sizeof(int32_t));
            for (int i = 0; i < n_remote; i++) remote[i] = cJSON_GetArrayItem(ids, i)->valueint;
            srv_kv_params rem = {.port = 0};
            char err[256];
            const cJSON *f = cJSON_GetObjectItem(params, "remote_engine_id");
            snprintf(rem.engine_id, sizeof rem.engine_id, "%s",
                     cJSON_IsString(f) ? f->valuestring : "");
            f = cJSON_GetObjectItem(params, "remote_host");
            snprintf(rem.host, sizeof rem.host, "%s", cJSON_IsString(f) ? f->valuestring : "");
            f = cJSON_GetObjectItem(params, "remote_port");
            rem.port = cJSON_IsNumber(f) ? f->valueint : 0;
            f = cJSON_GetObjectItem(params, "remote_request_id");
            rem.lease = cJSON_IsNumber(f) ? (uint64_t)f->valuedouble : 0;
            cJSON_Delete(params);
            kvpull_stats s0, s1;
            kvpull_get_stats(&d.plug, &s0);
            res = (result){.kv = kv, .remote = remote, .n_tokens = n_tokens};
            /* a prompt of its own, or the decode's prefix cache would serve the blocks */
            prompt[0] = 2 + (int32_t)(rid % 250);
            eng_request q = {.id = rid++,
                             .prompt = prompt,
                             .n_prompt = n_tokens,
                             .user = &res,
                             .on_kv_ready = on_kv_ready};
            eng_sampling_default(&q.sampling);
            q.sampling.max_tokens = 1;
            q.sampling.ignore_eos = true;
            q.kv_role = ENG_KV_REMOTE;
            q.remote = &rem;
            if (eng_submit(d.eng, &q, err, sizeof err) != DUET_OK) {
                fprintf(stderr, "duet-kvbench: %s\n", err);
                rc = 1;
                break;
            }
            for (int it = 0; it < 2000000 && !res.done; it++) {
                bool busy;
                eng_step(d.eng, &busy);
                if (!busy) eng_wait(d.eng, 1);
            }
            kvpull_get_stats(&d.plug, &s1);
            free(remote);
            if (!res.checked || res.bad) {
                fprintf(stderr, "duet-kvbench: %d tokens: %s\n", n_tokens,
                        res.checked ? "pulled bytes differ from the leased ones" : res.error);
                rc = 1;
                break;
            }
            if (s1.fetches_ok != s0.fetches_ok + 1) {
                fprintf(stderr, "duet-kvbench: pull of %d tokens failed: %s\n", n_tokens,
                        res.error);
                rc = 1;
                break;
            }
            if (rep < 0) continue;
            ms[n_ok++] = (s1.fetch_seconds_total - s0.fetch_seconds_total) * 1e3;
            bytes = s1.bytes_read - s0.bytes_read;
            if (rep == 0) reads0 = s0.gets_issued, reads1 = s1.gets_issued;
            bytes_total += s1.bytes_read - s0.bytes_read;
            secs_total += s1.fetch_seconds_total - s0.fetch_seconds_total;
        }
        if (rc || !n_ok) break;
        /* sort for the median */
        for (int i = 1; i < n_ok; i++)
            for (int k = i; k > 0 && ms[k] < ms[k - 1]; k--) {
                double t = ms[k];
                ms[k] = ms[k - 1];
                ms[k - 1] = t;
            }
        double p50 = ms[n_ok / 2], gbs = (double)bytes / (p50 * 1e-3) / 1e9;
        printf("%8d %12zu %10.3f %10.3f %10.2f %10.2f %8llu %6d", n_tokens, bytes, p50, ms[0], gbs,
               (double)bytes_total / secs_total / 1e9, (unsigned long long)(reads1 - reads0), n_ok);
        if (o.copy_ref) {
            double d2h, h2d;
            int nb = (int)(bytes / kv->block_bytes);
            if (copy_reference(g_decode_be, kv, nb, o.repeat, &d2h, &h2d) != 0) {
                fprintf(stderr, "duet-kvbench: the reference copies failed\n");
                rc = 1;
            }
            /* the pull is held to the slower direction: a staged pull needs both */
            printf(" %10.2f %10.2f %8.2f", d2h, h2d, gbs / (d2h < h2d ? d2h : h2d));
        }
        printf("\n");
        fflush(stdout);
    }
    free(prompt);
    d.plug.stop(d.plug.state);
    eng_destroy(d.eng);
    kvpull_destroy(&d.plug);
    par_instance_destroy(d.inst);
out:
    fclose(cmd);
    int status = 0;
    waitpid(pid, &status, 0);
    free(line);
    char rm[256];
    snprintf(rm, sizeof rm, "%s/config.json", model);
    unlink(rm);
    rmdir(model);
    return rc;
}
