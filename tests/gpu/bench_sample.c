/* Sampling cost at DeepSeek's vocabulary (V = 129,280), batch 64:
 *   1. the sampling kernels alone, per mix (greedy; top_p 0.95 at temperature 0.6, DeepSeek's
 *      recommendation; top-k; top-k + top-p + min-p; penalties; logprobs 20): device time
 *      per call from 50 calls queued back to back, and one call's latency (queue + wait);
 *   2. the engine's part of a step: an engine on a --load-format dummy model of the "tiny"
 *      preset (DeepSeek-V3's vocabulary) decoding 64 requests with top_p 0.95: host time the
 *      engine thread spends sampling per step (filling the rows, queueing, taking the tokens)
 *      and the time it waits for the device, from the engine's own counters;
 *   3. for comparison, the host rule on one row and the engine's old host sampler (smp_sample,
 *      which sorts the vocabulary for top-p).
 * Usage: bench_sample [cuda|cpu] (cpu: the host rule through the same op; smaller runs).
 * Exit 77 where the backend asked for has no device. The last lines are a table. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/clock.h"
#include "base/log.h"
#include "engine/engine.h"
#include "engine/parallel.h"
#include "engine/sampler.h"
#include "mkmodel.h"
#include "model/backend.h"
#include "model/backends/registry.h"
#ifdef DUET_HAVE_CUDA
#include "model/backends/cuda/backend_cuda.h"
#endif

#define V     129280
#define BATCH 64

static uint64_t g_x = 88172645463325252ull;
static double urand(void) {
    g_x ^= g_x << 13;
    g_x ^= g_x >> 7;
    g_x ^= g_x << 17;
    return (double)(g_x >> 11) / 9007199254740992.0;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    return v[n / 2];
}

static char g_table[4096];
static size_t g_used;
#define ROW(...)                                                                                   \
    (g_used += (size_t)snprintf(g_table + g_used, sizeof g_table - g_used, __VA_ARGS__))

static void set_mix(be_sample_row *p, int mix, int r) {
    be_sample_row_init(p);
    p->logits_row = r;
    p->seed = 7 + (uint64_t)r;
    p->offset = 100;
    switch (mix) {
    case 0:
        break;
    case 1:
        p->temperature = 0.6f;
        p->top_p = 0.95f;
        break;
    case 2:
        p->temperature = 0.8f;
        p->top_k = 50;
        break;
    case 3:
        p->temperature = 0.8f;
        p->top_k = 1000;
        p->top_p = 0.9f;
        p->min_p = 0.02f;
        break;
    case 4:
        p->temperature = 0.6f;
        p->top_p = 0.95f;
        p->repetition_penalty = 1.1f;
        p->frequency_penalty = 0.5f;
        p->presence_penalty = 0.5f;
        p->slot = r;
        break;
    default:
        p->temperature = 0.6f;
        p->top_p = 0.95f;
        p->n_logprobs = 20;
        break;
    }
}

static const char *MIX[] = {"greedy",    "top_p 0.95 t 0.6",  "top_k 50",
                            "k+p+min_p", "top_p + penalties", "top_p + logprobs 20"};

/* 1. the kernels alone */
static int kernels(be_backend *be, int calls) {
    float *h = malloc((size_t)BATCH * V * sizeof(float));
    for (size_t i = 0; i < (size_t)BATCH * V; i++) {
        double g = urand() + urand() + urand() + urand() - 2.0;
        h[i] = (float)(g * 3.5);
    }
    for (int r = 0; r < BATCH; r++)
        for (int j = 0; j < 10; j++) h[(size_t)r * V + (size_t)(urand() * V)] += 9.0f;
    void *dev = be->ops->buf_alloc(be, (size_t)BATCH * V);
    be_sampler *s = NULL;
    if (!dev || be->ops->upload(be, dev, 0, h, (size_t)BATCH * V) != DUET_OK ||
        be_sampler_create(be, BATCH, V, BATCH, &s) != DUET_OK) {
        fprintf(stderr, "bench_sample: cannot set up the batch\n");
        return 1;
    }
    int32_t prompt[512];
    for (int i = 0; i < 512; i++) prompt[i] = (int32_t)(urand() * V);
    for (int r = 0; r < BATCH; r++) be_sampler_slot_init(be, s, r, prompt, 512, prompt, 64);
    ROW("%-22s %12s %12s\n", "kernels, batch 64", "device ms", "latency ms");
    for (int mix = 0; mix < 6; mix++) {
        for (int r = 0; r < BATCH; r++) set_mix(&s->rows[r], mix, r);
        if (be_sample(be, s, dev, V, BATCH, BATCH) != DUET_OK) return 1; /* warm-up */
        double lat[20];
        for (int k = 0; k < 20; k++) {
            double t0 = clock_now_s();
            be_sample(be, s, dev, V, BATCH, BATCH);
            lat[k] = clock_now_s() - t0;
        }
        double t0 = clock_now_s();
        for (int k = 0; k < calls; k++) be_sample_queue(be, s, dev, V, BATCH, BATCH);
        duet_status st = be_sample_wait(be, s);
        double dev_ms = (clock_now_s() - t0) * 1e3 / calls;
        if (st != DUET_OK) return 1;
        ROW("%-22s %12.3f %12.3f\n", MIX[mix], dev_ms, median(lat, 20) * 1e3);
    }
    be_sampler_destroy(be, s);
    be->ops->buf_free(be, dev);
    free(h);
    return 0;
}

static uint64_t g_tokens;
static void on_event(void *user, const eng_event *ev) {
    (void)user;
    g_tokens += (uint64_t)ev->n_tokens;
}

/* 2. the engine's part of a step */
static int engine(const char *backend, int steps) {
    char dir[] = "/tmp/duet-bench-sample-XXXXXX";
    if (!mkdtemp(dir)) return 1;
    mk_spec spec;
    char *json = NULL, path[4200];
    if (mk_preset("tiny", &spec) != DUET_OK) return 1;
    spec.cfg.num_hidden_layers = 2;
    mk_spec_fit(&spec);
    if (mk_config_json(&spec, &json) != DUET_OK) return 1;
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) return 1;
    fputs(json, f);
    fclose(f);
    free(json);
    par_options po;
    par_options_init(&po);
    snprintf(po.backend, sizeof po.backend, "%s", backend);
    po.load_format = MDL_WEIGHTS_DUMMY;
    int argc = 0;
    char **argv = NULL;
    par_instance *inst;
    if (par_instance_create(&po, dir, &argc, &argv, &inst) != DUET_OK) return 1;
    eng_config c;
    eng_config_default(&c);
    c.max_num_seqs = BATCH;
    c.max_num_batched_tokens = 2048;
    c.block_size = 64;
    c.n_blocks = 512;
    c.on_event = on_event;
    eng_engine *e;
    if (eng_create(&c, inst, NULL, &e) != DUET_OK) return 1;
    int32_t prompt[16];
    for (int i = 0; i < BATCH; i++) {
        for (int j = 0; j < 16; j++) prompt[j] = (int32_t)(urand() * 128000);
        eng_request q = {.id = (uint64_t)i + 1, .prompt = prompt, .n_prompt = 16};
        eng_sampling_default(&q.sampling);
        q.sampling.smp.temperature = 0.6f;
        q.sampling.smp.top_p = 0.95f;
        q.sampling.max_tokens = steps + 8;
        q.sampling.ignore_eos = true;
        char err[128];
        if (eng_submit(e, &q, err, sizeof err) != DUET_OK) return 1;
    }
    bool busy;
    eng_step(e, &busy); /* the prompts, and the first tokens */
    eng_stats a, b;
    eng_get_stats(e, &a);
    double t0 = clock_now_s();
    for (int i = 0; i < steps; i++) eng_step(e, &busy);
    double wall = clock_now_s() - t0;
    eng_get_stats(e, &b);
    double rows = (double)(b.sample_rows - a.sample_rows), n = (double)(b.n_steps - a.n_steps);
    ROW("engine (%s), batch 64, top_p 0.95, %d decode steps, %.0f rows a step\n", backend, (int)n,
        n > 0 ? rows / n : 0);
    ROW("  sampling host time per step   %8.3f ms   (target < 1 ms)\n",
        n > 0 ? (b.sample_host_s - a.sample_host_s) * 1e3 / n : 0);
    ROW("  waiting for sampling per step %8.3f ms\n",
        n > 0 ? (b.sample_wait_s - a.sample_wait_s) * 1e3 / n : 0);
    ROW("  whole step                    %8.3f ms\n", n > 0 ? wall * 1e3 / n : 0);
    eng_destroy(e);
    par_instance_destroy(inst);
    unlink(path);
    rmdir(dir);
    return g_tokens > 0 ? 0 : 1;
}

/* 3. the host rule and the old host sampler on one row */
static void host_rules(void) {
    float *l = malloc((size_t)V * sizeof(float)), *w = malloc((size_t)V * sizeof(float));
    for (int i = 0; i < V; i++) l[i] = (float)((urand() + urand() + urand() + urand() - 2) * 3.5);
    void *scratch = malloc(be_sample_host_scratch(V));
    be_sample_row r;
    set_mix(&r, 1, 0);
    be_sample_out o;
    double t0 = clock_now_s();
    for (int k = 0; k < 5; k++) be_sample_host_row(l, V, &r, NULL, NULL, scratch, &o, NULL);
    double rule = (clock_now_s() - t0) / 5;
    smp_params p;
    smp_params_default(&p);
    p.temperature = 0.6f;
    p.top_p = 0.95f;
    smp_scratch ss = {0};
    rng_state rng;
    rng_seed(&rng, 1);
    smp_history hist = {0};
    t0 = clock_now_s();
    for (int k = 0; k < 3; k++) {
        memcpy(w, l, (size_t)V * sizeof(float));
        smp_sample(&p, &hist, NULL, 0, w, V, &rng, &ss);
    }
    double old = (clock_now_s() - t0) / 3;
    ROW("host, one row, top_p 0.95: the rule (radix) %.2f ms, old smp_sample (sort) %.2f ms\n",
        rule * 1e3, old * 1e3);
    smp_scratch_free(&ss);
    free(scratch);
    free(l);
    free(w);
}

int main(int argc, char **argv) {
    const char *backend = argc > 1 ? argv[1] : "cuda";
    bool cuda = !strcmp(backend, "cuda");
#ifdef DUET_HAVE_CUDA
    if (cuda && be_cuda_device_count() < 1) {
        fprintf(stderr, "no CUDA device: skipped\n");
        return 77;
    }
#else
    if (cuda) {
        fprintf(stderr, "no CUDA in this build: skipped\n");
        return 77;
    }
#endif
    log_set_level(LOG_LEVEL_WARN);
    be_backend *be;
    if (be_create(backend, 0, &be) != DUET_OK) return 1;
    int rc = kernels(be, cuda ? 50 : 2);
    be_destroy(be);
    if (!rc) rc = engine(backend, cuda ? 64 : 3);
    host_rules();
    printf("%s", g_table);
    return rc;
}
