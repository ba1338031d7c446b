/* duet-check golden: runs every case of a golden directory (model/, cases.json, logits.f32, as
 * ../shared/golden/tiny-v3 lays them out) through three paths and compares each logits row with
 * the reference by relative L2 error:
 *   prefill  - the whole prompt in one step, then greedy decode one token per step;
 *   stepwise - the prompt fed one token per step on the KV cache;
 *   batched  - all cases' prompts in one step, then all decodes batched.
 * Greedy ids must agree wherever the reference's top-2 margin exceeds what the tolerance
 * allows. Parallel flags shard the model exactly as the servers do.
 *
 * --compare-to MODE holds a reduced-precision run to what that precision costs: the same paths
 * run again on a reference mode (bf16-emulated: the CPU backend rounding to bf16 wherever CUDA
 * stores bf16; or float32), and every row's error must stay within --ratio times the
 * reference's error on the same row and under --tol. --per-row prints every row. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "base/fileio.h"
#include "base/log.h"
#include "base/opt.h"
#include "engine/parallel.h"
#include "model/backends/registry.h"

typedef struct gcase {
    char name[64];
    int32_t *prompt;
    int n_prompt;
    int32_t *greedy;
    int n_greedy;
    double margin;
    const float *prefill_ref; /* [n_prompt, V] */
    const float *decode_ref;  /* [n_greedy - 1, V] */
    /* results */
    double err_prefill, err_stepwise, err_batched;
    int greedy_bad;
    int idx; /* in cases.json */
} gcase;

enum { PATH_PREFILL, PATH_STEPWISE, PATH_BATCHED };
static const char *const PATH_NAME[] = {"prefill", "stepwise", "batched"};

/* One row's error, in the order the paths compute them (the same for every run). */
typedef struct grow {
    int cas, path, row; /* row: 0..n_prompt-1 prompt rows, then n_prompt + s for decode step s */
    double err;
} grow;

typedef struct gctx {
    par_instance *inst; /* the run under test ... */
    mdl_model *ref;     /* ... or the reference mode's model (one rank, no instance) */
    mdl_model *m;
    be_kv *kv;
    int V, block_size, n_blocks;
    double tol;
    int32_t *free_blocks; /* a scrambled list of block ids to hand out */
    int n_free;
    float *logits;
    grow *rows; /* every row's error */
    int n_rows, cap_rows;
} gctx;

static void log_row(gctx *g, const gcase *k, int path, int row, double err) {
    if (g->n_rows == g->cap_rows) {
        int cap = g->cap_rows ? 2 * g->cap_rows : 1024;
        grow *r = realloc(g->rows, (size_t)cap * sizeof *r);
        if (!r) return; /* the comparison then reports a length mismatch */
        g->rows = r;
        g->cap_rows = cap;
    }
    g->rows[g->n_rows++] = (grow){k->idx, path, row, err};
}

static int argmax(const float *x, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

static double rel_l2(const float *a, const float *ref, int n) {
    double num = 0, den = 0;
    for (int i = 0; i < n; i++) {
        double d = (double)a[i] - (double)ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* Greedy agreement: our top token must be the reference's, except where the reference's own
 * gap between the two is within what our error on this row can explain (if every logit is off
 * by at most e, two logits whose reference values differ by at most 2e may swap). */
static int greedy_ok(const float *row, const float *ref, int V, int want) {
    int got = argmax(row, V);
    if (got == want) return 1;
    double e = 0;
    for (int i = 0; i < V; i++) {
        double d = fabs((double)row[i] - (double)ref[i]);
        e = d > e ? d : e;
    }
    return (double)ref[want] - (double)ref[got] <= 2.0 * e;
}

static duet_status parse_cases(const char *dir, gcase **cases_p, int *n_p, fio_map *map, int V) {
    char path[4096];
    snprintf(path, sizeof path, "%s/cases.json", dir);
    char *text = NULL;
    duet_status st = fio_read_text(path, 64u << 20, &text);
    if (st != DUET_OK) return st;
    cJSON *root = cJSON_Parse(text);
    free(text);
    const cJSON *arr = root ? cJSON_GetObjectItemCaseSensitive(root, "cases") : NULL;
    if (!cJSON_IsArray(arr)) {
        LOG_ERROR("%s: no \"cases\" array", path);
        cJSON_Delete(root);
        return DUET_ERR_FORMAT;
    }
    snprintf(path, sizeof path, "%s/logits.f32", dir);
    st = fio_map_file(path, map);
    if (st != DUET_OK) {
        cJSON_Delete(root);
        return st;
    }
    int n = cJSON_GetArraySize(arr);
    gcase *cs = calloc((size_t)n, sizeof *cs);
    for (int i = 0; i < n && st == DUET_OK; i++) {
        const cJSON *c = cJSON_GetArrayItem(arr, i);
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(c, "name");
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(c, "prompt_ids");
        const cJSON *g = cJSON_GetObjectItemCaseSensitive(c, "greedy_ids");
        const cJSON *mg = cJSON_GetObjectItemCaseSensitive(c, "greedy_min_margin");
        const cJSON *pl = cJSON_GetObjectItemCaseSensitive(c, "prefill_logits");
        const cJSON *dl = cJSON_GetObjectItemCaseSensitive(c, "decode_logits");
        const cJSON *po = pl ? cJSON_GetObjectItemCaseSensitive(pl, "offset") : NULL;
        const cJSON *dof = dl ? cJSON_GetObjectItemCaseSensitive(dl, "offset") : NULL;
        if (!cJSON_IsArray(p) || !cJSON_IsArray(g) || !cJSON_IsNumber(po) || !cJSON_IsNumber(dof) ||
            cJSON_GetArraySize(p) < 1 || cJSON_GetArraySize(g) < 1) {
            LOG_ERROR("%s/cases.json: case %d is malformed", dir, i);
            st = DUET_ERR_FORMAT;
            break;
        }
        gcase *k = &cs[i];
        snprintf(k->name, sizeof k->name, "%s", cJSON_IsString(name) ? name->valuestring : "?");
        k->n_prompt = cJSON_GetArraySize(p);
        k->n_greedy = cJSON_GetArraySize(g);
        k->prompt = malloc((size_t)k->n_prompt * sizeof(int32_t));
        k->greedy = malloc((size_t)k->n_greedy * sizeof(int32_t));
        for (int j = 0; j < k->n_prompt; j++) k->prompt[j] = cJSON_GetArrayItem(p, j)->valueint;
        for (int j = 0; j < k->n_greedy; j++) k->greedy[j] = cJSON_GetArrayItem(g, j)->valueint;
        k->margin = cJSON_IsNumber(mg) ? mg->valuedouble : 0;
        size_t need_p = (size_t)k->n_prompt * V * 4, need_d = (size_t)(k->n_greedy - 1) * V * 4;
        if ((size_t)po->valuedouble + need_p > map->size ||
            (size_t)dof->valuedouble + need_d > map->size) {
            LOG_ERROR("%s/logits.f32: case %s points beyond the file", dir, k->name);
            st = DUET_ERR_FORMAT;
            break;
        }
        k->prefill_ref = (const float *)((const char *)map->data + (size_t)po->valuedouble);
        k->decode_ref = (const float *)((const char *)map->data + (size_t)dof->valuedouble);
    }
    cJSON_Delete(root);
    *cases_p = cs;
    *n_p = n;
    return st;
}

/* A sequence's KV blocks, taken from the scrambled free list. */
typedef struct gseq {
    int32_t blocks[512];
    int n_blocks;
    int pos;
} gseq;

static int seq_grow(gctx *g, gseq *s, int upto) {
    while (s->n_blocks * g->block_size < upto) {
        if (g->n_free == 0 || s->n_blocks == 512) return -1;
        s->blocks[s->n_blocks++] = g->free_blocks[--g->n_free];
    }
    return 0;
}

static void seq_release(gctx *g, gseq *s) {
    while (s->n_blocks > 0) g->free_blocks[g->n_free++] = s->blocks[--s->n_blocks];
    s->pos = 0;
}

/* Runs one step for sequences seqs[i] feeding toks[i] (n[i] tokens each), with n_logits[i]
 * rows of logits each, into g->logits. */
static duet_status step(gctx *g, gseq **seqs, const int32_t **toks, const int *n,
                        const int *n_logits, int count) {
    mdl_seq ms[64] = {0};
    for (int i = 0; i < count; i++) {
        if (seq_grow(g, seqs[i], seqs[i]->pos + n[i]) != 0) return DUET_ERR_NO_MEMORY;
        ms[i] = (mdl_seq){.tokens = toks[i],
                          .n_tokens = n[i],
                          .pos0 = seqs[i]->pos,
                          .block_table = seqs[i]->blocks,
                          .n_blocks = seqs[i]->n_blocks,
                          .n_logits = n_logits[i]};
    }
    duet_status st = g->ref ? mdl_forward(g->ref, g->kv, ms, count, g->logits)
                            : par_forward(g->inst, g->kv, ms, count, g->logits);
    for (int i = 0; i < count; i++) seqs[i]->pos += n[i];
    return st;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double max_d(double a, double b) {
    return a > b ? a : b;
}

/* prefill then greedy decode; or (stepwise) the prompt one token at a time first */
static duet_status run_single(gctx *g, gcase *k, int stepwise) {
    gseq s = {0};
    gseq *sp = &s;
    duet_status st = DUET_OK;
    double err = 0;
    int V = g->V;
    if (!stepwise) {
        const int32_t *t = k->prompt;
        int n = k->n_prompt, nl = k->n_prompt;
        st = step(g, &sp, &t, &n, &nl, 1);
        for (int r = 0; st == DUET_OK && r < k->n_prompt; r++) {
            double e = rel_l2(g->logits + (size_t)r * V, k->prefill_ref + (size_t)r * V, V);
            log_row(g, k, PATH_PREFILL, r, e);
            err = max_d(err, e);
        }
    } else {
        for (int j = 0; st == DUET_OK && j < k->n_prompt; j++) {
            const int32_t *t = k->prompt + j;
            int n = 1, nl = 1;
            st = step(g, &sp, &t, &n, &nl, 1);
            if (st == DUET_OK) {
                double e = rel_l2(g->logits, k->prefill_ref + (size_t)j * V, V);
                log_row(g, k, PATH_STEPWISE, j, e);
                err = max_d(err, e);
            }
        }
    }
    if (st == DUET_OK) {
        const float *last = stepwise ? g->logits : g->logits + (size_t)(k->n_prompt - 1) * V;
        const float *ref = k->prefill_ref + (size_t)(k->n_prompt - 1) * V;
        if (!greedy_ok(last, ref, V, k->greedy[0])) k->greedy_bad++;
    }
    for (int s_ = 0; st == DUET_OK && s_ < k->n_greedy - 1; s_++) {
        const int32_t *t = k->greedy + s_;
        int n = 1, nl = 1;
        st = step(g, &sp, &t, &n, &nl, 1);
        if (st != DUET_OK) break;
        const float *ref = k->decode_ref + (size_t)s_ * V;
        double e = rel_l2(g->logits, ref, V);
        log_row(g, k, stepwise ? PATH_STEPWISE : PATH_PREFILL, k->n_prompt + s_, e);
        err = max_d(err, e);
        if (!greedy_ok(g->logits, ref, V, k->greedy[s_ + 1])) k->greedy_bad++;
    }
    seq_release(g, &s);
    if (stepwise)
        k->err_stepwise = err;
    else
        k->err_prefill = err;
    return st;
}

/* All cases at once: their prompts in one step, then their decodes batched step by step
 * (cases with fewer greedy tokens drop out). */
static duet_status run_batched(gctx *g, gcase *cs, int n) {
    gseq *seqs = calloc((size_t)n, sizeof *seqs);
    gseq *sp[64];
    const int32_t *toks[64];
    int nt[64] = {0}, nl[64] = {0}, idx[64];
    int V = g->V;
    if (n > 64 || !seqs) {
        free(seqs);
        return DUET_ERR_UNSUPPORTED;
    }
    for (int i = 0; i < n; i++) {
        sp[i] = &seqs[i];
        toks[i] = cs[i].prompt;
        nt[i] = cs[i].n_prompt;
        nl[i] = 1;
        cs[i].err_batched = 0;
    }
    duet_status st = step(g, sp, toks, nt, nl, n);
    for (int i = 0; st == DUET_OK && i < n; i++) {
        const float *ref = cs[i].prefill_ref + (size_t)(cs[i].n_prompt - 1) * V;
        cs[i].err_batched = rel_l2(g->logits + (size_t)i * V, ref, V);
        log_row(g, &cs[i], PATH_BATCHED, cs[i].n_prompt - 1, cs[i].err_batched);
    }
    for (int s_ = 0; st == DUET_OK; s_++) {
        int cnt = 0;
        for (int i = 0; i < n; i++) {
            if (s_ >= cs[i].n_greedy - 1) continue;
            idx[cnt] = i;
            sp[cnt] = &seqs[i];
            toks[cnt] = cs[i].greedy + s_;
            nt[cnt] = 1;
            nl[cnt] = 1;
            cnt++;
        }
        if (!cnt) break;
        st = step(g, sp, toks, nt, nl, cnt);
        for (int j = 0; st == DUET_OK && j < cnt; j++) {
            gcase *k = &cs[idx[j]];
            double e = rel_l2(g->logits + (size_t)j * V, k->decode_ref + (size_t)s_ * V, V);
            log_row(g, k, PATH_BATCHED, k->n_prompt + s_, e);
            k->err_batched = max_d(k->err_batched, e);
        }
    }
    for (int i = 0; i < n; i++) seq_release(g, &seqs[i]);
    free(seqs);
    return st;
}

/* The block list and the logits rows of a run, for n cases (kv created by the caller). */
static duet_status ctx_buffers(gctx *g, const gcase *cs, int n) {
    int max_rows = n;
    for (int i = 0; i < n; i++) max_rows = cs[i].n_prompt > max_rows ? cs[i].n_prompt : max_rows;
    g->free_blocks = malloc((size_t)g->n_blocks * sizeof(int32_t));
    g->logits = malloc((size_t)max_rows * g->V * sizeof(float));
    if (!g->free_blocks || !g->logits) return DUET_ERR_NO_MEMORY;
    /* hand blocks out in a scrambled order so sequences are never contiguous in the pool */
    for (int i = 0; i < g->n_blocks; i++) g->free_blocks[i] = (int32_t)((i * 7 + 3) % g->n_blocks);
    g->n_free = g->n_blocks;
    if (g->n_blocks % 7 == 0)
        for (int i = 0; i < g->n_blocks; i++) g->free_blocks[i] = g->n_blocks - 1 - i;
    return DUET_OK;
}

static void ctx_free(gctx *g) {
    free(g->free_blocks);
    free(g->logits);
    free(g->rows);
    if (g->kv) mdl_kv_destroy(g->m, g->kv);
    g->free_blocks = NULL;
    g->logits = NULL;
    g->rows = NULL;
    g->kv = NULL;
}

/* Every path over the cases, repeat times. */
static duet_status run_all(gctx *g, gcase *cs, int n, int repeat) {
    duet_status st = DUET_OK;
    for (int rep = 0; rep < repeat && st == DUET_OK; rep++) {
        for (int i = 0; st == DUET_OK && i < n; i++) {
            st = run_single(g, &cs[i], 0);
            if (st == DUET_OK) st = run_single(g, &cs[i], 1);
        }
        if (st == DUET_OK && n) st = run_batched(g, cs, n);
    }
    return st;
}

/* The same cases on the reference mode: the CPU backend in float32 or emulating bf16, one rank,
 * the checkpoint loaded as the run under test loaded it. Its row errors land in ref. */
static duet_status run_reference(const par_options *po, const char *model_dir, int mode,
                                 const gcase *mine, int n, int repeat, gctx *ref) {
    be_backend *be = NULL;
    duet_status st = be_create_dtype("cpu", 0, mode == 1 ? DT_BF16 : DT_F32, &be);
    if (st != DUET_OK) return st;
    mdl_shard shard = {.tp_rank = 0, .tp_size = 1, .ep_rank = 0, .ep_size = 1};
    mdl_load_opts lo = {
        .source = po->load_format, .dummy_seed = po->seed, .max_tokens = po->max_tokens};
    gcase *cs = malloc((size_t)(n ? n : 1) * sizeof *cs);
    st = cs ? mdl_load(model_dir, be, &shard, &lo, &ref->m) : DUET_ERR_NO_MEMORY;
    ref->ref = ref->m;
    /* the KV cache as the run under test keeps it (--kv-cache-dtype): like against like */
    if (st == DUET_OK) st = mdl_set_kv_dtype(ref->m, po->kv_dtype);
    if (st == DUET_OK) st = mdl_kv_create(ref->m, ref->n_blocks, ref->block_size, &ref->kv);
    if (st == DUET_OK) st = ctx_buffers(ref, mine, n);
    if (st == DUET_OK) {
        memcpy(cs, mine, (size_t)n * sizeof *cs);
        for (int i = 0; i < n; i++) cs[i].greedy_bad = 0;
        st = run_all(ref, cs, n, repeat);
    }
    if (ref->kv) mdl_kv_destroy(ref->m, ref->kv);
    ref->kv = NULL;
    mdl_destroy(ref->m);
    ref->m = ref->ref = NULL;
    be_destroy(be);
    free(cs);
    return st;
}

int check_golden_main(int argc, char **argv) {
    par_options po;
    par_options_init(&po);
    double tol = -1, ratio = 1.5;
    int block_size = 16, repeat = 1, dp_cases = 1, compare = 0, ratio_of = 0;
    bool per_row = false;
    opt_parser *op;
    if (opt_parser_create("duet-check golden", "[options] CASE_DIR",
                          "Runs every case of CASE_DIR (model/ plus cases.json and logits.f32) "
                          "and compares logits and greedy ids with the reference.",
                          &op) != DUET_OK)
        return 1;
    const opt_spec specs[] = {
        {.name = "--tol",
         .type = OPT_DOUBLE,
         .dest = &tol,
         .min = 0,
         .max = 10,
         .help = "max relative L2 error per logits row (default 1e-4 on cpu in float32, 2e-2 "
                 "on cuda, 6e-2 for bf16 on cpu or with --compare-to)"},
        {.name = "--block-size",
         .type = OPT_INT,
         .dest = &block_size,
         .def = "16",
         .min = 1,
         .max = 1 << 16,
         .help = "KV block size"},
        {.name = "--repeat",
         .type = OPT_INT,
         .dest = &repeat,
         .def = "1",
         .min = 1,
         .max = 1 << 20,
         .help = "run every case N times (a soak test)"},
        {.name = "--dp-cases",
         .type = OPT_CHOICE,
         .dest = &dp_cases,
         .def = "spread",
         .choices = "first|spread",
         .help = "give every case to DP rank 0 (the others only join with empty steps) or "
                 "spread them"},
        {.name = "--compare-to",
         .type = OPT_CHOICE,
         .dest = &compare,
         .def = "none",
         .choices = "none|bf16-emulated|float32",
         .help = "also run the cases on this reference mode of the CPU backend (bf16-emulated: "
                 "float32 arithmetic rounding to bf16 wherever CUDA stores bf16) and hold every "
                 "row to --ratio times the reference's error on that row"},
        {.name = "--ratio",
         .type = OPT_DOUBLE,
         .dest = &ratio,
         .def = "1.5",
         .min = 0,
         .max = 1000,
         .help = "with --compare-to: most a row's error may exceed the reference's, as a "
                 "factor"},
        {.name = "--ratio-of",
         .type = OPT_CHOICE,
         .dest = &ratio_of,
         .def = "row",
         .choices = "row|case|p90",
         .help = "with --compare-to: what --ratio bounds: each row's error over the same row's "
                 "reference error (row), over the largest reference error of the same case and "
                 "path (case), or the 90th percentile over a case's rows of the first (p90). "
                 "Single rows move by up to 2x between correct bf16 implementations (see "
                 "docs/cuda.md)"},
        {.name = "--per-row",
         .type = OPT_FLAG,
         .dest = &per_row,
         .help = "print every row's error (and the reference's, with --compare-to)"},
    };
    opt_allow_positional(op, 1, "CASE_DIR");
    int rc = 2;
    if (opt_add(op, "Golden check", specs, (int)(sizeof specs / sizeof specs[0])) == DUET_OK &&
        par_options_add(op, &po) == DUET_OK)
        rc = opt_parse(op, argc, argv);
    const char *dir = opt_positional(op, 0);
    opt_parser_destroy(op);
    if (rc) return rc == 1 ? 0 : 2;
    if (!dir) {
        fprintf(stderr, "duet-check golden: CASE_DIR is required (see --help)\n");
        return 2;
    }
    bool dp_first = dp_cases == 0;
    bool cpu = !strcmp(po.backend, "cpu");
    if (tol < 0) tol = compare || (cpu && po.dtype == DT_BF16) ? 6e-2 : cpu ? 1e-4 : 2e-2;

    char model_dir[4096];
    snprintf(model_dir, sizeof model_dir, "%s/model", dir);
    gctx g = {.tol = tol, .block_size = block_size};
    duet_status st = par_instance_create(&po, model_dir, &argc, &argv, &g.inst);
    if (st != DUET_OK) return 1;
    g.m = par_model(g.inst);
    g.V = mdl_config(g.m)->vocab_size;

    gcase *cs = NULL;
    int n = 0;
    fio_map map = {0};
    st = parse_cases(dir, &cs, &n, &map, g.V);
    int total_tokens = 0;
    for (int i = 0; i < n; i++) {
        cs[i].idx = i;
        total_tokens += cs[i].n_prompt + cs[i].n_greedy + block_size;
    }
    g.n_blocks = total_tokens / block_size + n + 4;
    if (st == DUET_OK) st = mdl_kv_create(g.m, g.n_blocks, block_size, &g.kv);
    if (st == DUET_OK && par_world(g.inst)->rank == 0)
        LOG_INFO("golden: %d cases x %d on %d rank(s), backend %s", n, repeat,
                 par_world(g.inst)->size, po.backend);
    if (st == DUET_OK) st = ctx_buffers(&g, cs, n);

    /* This DP rank's cases; other DP ranks take the rest. */
    int dp = par_dp_size(g.inst), dpr = par_dp_rank(g.inst);
    gcase *mine = calloc((size_t)(n ? n : 1), sizeof *mine);
    int n_mine = 0;
    for (int i = 0; i < n; i++)
        if (dp_first ? dpr == 0 : i % dp == dpr) mine[n_mine++] = cs[i];
    if (st == DUET_OK) st = run_all(&g, mine, n_mine, repeat);
    if (st == DUET_OK) st = par_finish(g.inst); /* empty steps until every DP rank is done */
    if (st == DUET_OK && par_world(g.inst)->rank == 0 && mdl_graphs_on(g.m)) {
        uint64_t rec = 0, launched = 0;
        mdl_graph_counts(g.m, &rec, &launched);
        LOG_INFO("golden: decode steps as graphs: %llu recorded, %llu replays",
                 (unsigned long long)rec, (unsigned long long)launched);
    }

    /* the reference mode, on each rank that reports, for its own cases */
    gctx ref = {.tol = tol, .block_size = block_size, .n_blocks = g.n_blocks, .V = g.V};
    if (st == DUET_OK && compare && par_is_reporter(g.inst)) {
        st = run_reference(&po, model_dir, compare, mine, n_mine, repeat, &ref);
        if (st == DUET_OK && ref.n_rows != g.n_rows) {
            LOG_ERROR("golden: the reference computed %d rows, the run %d", ref.n_rows, g.n_rows);
            st = DUET_ERR_INTERNAL;
        }
    }

    /* the reference error each row is held to: its own row's, or the envelope of its case and
     * path */
    double *bound = compare && st == DUET_OK ? calloc((size_t)g.n_rows + 1, sizeof *bound) : NULL;
    if (compare && st == DUET_OK && !bound) st = DUET_ERR_NO_MEMORY;
    for (int j = 0; bound && j < g.n_rows; j++) {
        bound[j] = ref.rows[j].err;
        for (int k = 0; ratio_of == 1 && k < g.n_rows; k++)
            if (ref.rows[k].cas == ref.rows[j].cas && ref.rows[k].path == ref.rows[j].path &&
                ref.rows[k].err > bound[j])
                bound[j] = ref.rows[k].err;
    }

    int passed = 0, failed = 0;
    char report[16384];
    size_t used = 0;
    report[0] = '\0';
    if (st == DUET_OK && par_is_reporter(g.inst)) {
        /* per row: the error under --tol, and with a reference within ratio times its error */
        for (int j = 0; j < g.n_rows; j++) {
            const grow *w = &g.rows[j];
            double f = compare ? ref.rows[j].err : 0;
            bool bad =
                !(w->err <= tol) || (compare && ratio_of != 2 && !(w->err <= ratio * bound[j]));
            if (!per_row && !bad) continue;
            if (compare)
                printf("  %-28s %-8s row %3d  err %.3e  ref %.3e  ratio %5.2f%s\n", cs[w->cas].name,
                       PATH_NAME[w->path], w->row, w->err, f, f > 0 ? w->err / f : 0.0,
                       bad ? "  FAIL" : "");
            else
                printf("  %-28s %-8s row %3d  err %.3e%s\n", cs[w->cas].name, PATH_NAME[w->path],
                       w->row, w->err, bad ? "  FAIL" : "");
        }
        for (int i = 0; i < n_mine; i++) {
            gcase *k = &mine[i];
            int ok = k->greedy_bad == 0, bad_rows = 0, n_q = 0;
            double ref_max = 0, worst = 0, p90 = 0;
            double *q = compare ? malloc((size_t)g.n_rows * sizeof *q) : NULL;
            for (int j = 0; j < g.n_rows; j++) {
                const grow *w = &g.rows[j];
                if (w->cas != k->idx) continue;
                double f = compare ? ref.rows[j].err : 0;
                bad_rows +=
                    !(w->err <= tol) || (compare && ratio_of != 2 && !(w->err <= ratio * bound[j]));
                ref_max = f > ref_max ? f : ref_max;
                if (compare && f > 0) worst = w->err / f > worst ? w->err / f : worst;
                if (q) q[n_q++] = f > 0 ? w->err / f : 0;
            }
            if (q && n_q) {
                qsort(q, (size_t)n_q, sizeof *q, cmp_double);
                p90 = q[(int)(n_q * 0.9)];
            }
            free(q);
            ok = ok && bad_rows == 0 && !(compare && ratio_of == 2 && !(p90 <= ratio));
            char extra[96] = "";
            if (compare)
                snprintf(extra, sizeof extra, "  ref max %.2e  ratio p90 %.2f max %.2f", ref_max,
                         p90, worst);
            if (used < sizeof report)
                used += (size_t)snprintf(report + used, sizeof report - used,
                                         "%-28s prefill %.2e  stepwise %.2e  batched %.2e%s  "
                                         "greedy %s  %s\n",
                                         k->name, k->err_prefill, k->err_stepwise, k->err_batched,
                                         extra, k->greedy_bad ? "MISMATCH" : "ok",
                                         ok ? "PASS" : "FAIL");
            ok ? passed++ : failed++;
        }
        if (compare && g.n_rows && used < sizeof report) {
            /* how the rows' errors spread against the reference's on the same rows */
            double *q = malloc((size_t)g.n_rows * sizeof *q);
            int over = 0;
            for (int j = 0; q && j < g.n_rows; j++) {
                q[j] = ref.rows[j].err > 0 ? g.rows[j].err / ref.rows[j].err : 0;
                over += q[j] > ratio;
            }
            if (q) {
                qsort(q, (size_t)g.n_rows, sizeof *q, cmp_double);
                int n_r = g.n_rows;
                used += (size_t)snprintf(report + used, sizeof report - used,
                                         "error / reference error on the same row, %d rows: "
                                         "median %.2f  p90 %.2f  p99 %.2f  max %.2f  (%d over "
                                         "%.2f)\n",
                                         n_r, q[n_r / 2], q[(int)(n_r * 0.9)], q[(int)(n_r * 0.99)],
                                         q[n_r - 1], over, ratio);
            }
            free(q);
        }
        fflush(stdout);
    }
    if (st != DUET_OK) {
        fprintf(stderr, "duet-check golden: %s\n", duet_strerror(st));
        failed = n_mine ? n_mine : 1;
        passed = 0;
    }
    par_print_ordered(g.inst, report);
    par_report_totals(g.inst, &passed, &failed);
    if (par_world(g.inst)->rank == 0) printf("%d passed, %d failed\n", passed, failed);
    fflush(stdout);

    for (int i = 0; i < n; i++) {
        free(cs[i].prompt);
        free(cs[i].greedy);
    }
    free(cs);
    free(mine);
    free(bound);
    free(ref.free_blocks);
    free(ref.logits);
    free(ref.rows);
    fio_unmap(&map);
    ctx_free(&g);
    par_instance_destroy(g.inst);
    return failed || st != DUET_OK ? 1 : 0;
}
