/* The engine against the goldens: all cases submitted together at different steps, under
 * chunk sizes 1, 7, 64 and unlimited, with a pool small enough to force preemption, with
 * prefix-cache reuse; random aborts leak nothing; seeded sampling does not depend on the
 * batch; min_tokens holds back stop tokens; every sampled token replays under the host rule
 * (penalties, bans, filters, seeds, logprobs). After every scenario the pool is full again. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "engine/engine.h"
#include "golden.h"
#include "base/log.h"
#include "engine/parallel.h"

#define MAXR 64

typedef struct rec {
    const golden_case *gc; /* NULL: not a golden request */
    int32_t out[256];
    int n_out;
    int n_final;
    eng_finish finish;
    int32_t stop_token;
    double max_err;
    int n_rows;
} rec;

static golden_set G;
static rec R[MAXR];

/* prompt logprobs as the events hand them over, by request id */
static eng_token_lp g_plp[4][512];
static int g_n_plp[4];

static void on_event(void *user, const eng_event *ev) {
    (void)user;
    rec *r = &R[ev->id];
    if (ev->prompt_logprobs && ev->id < 4 && ev->n_prompt <= 512) {
        memcpy(g_plp[ev->id], ev->prompt_logprobs, (size_t)ev->n_prompt * sizeof *g_plp[0]);
        g_n_plp[ev->id] = ev->n_prompt;
    }
    for (int i = 0; i < ev->n_tokens && r->n_out < 256; i++) r->out[r->n_out++] = ev->tokens[i];
    if (ev->finish) {
        r->n_final++;
        r->finish = ev->finish;
        r->stop_token = ev->stop_token;
    }
}

static void on_logits(void *user, int pos, const float *row, int V) {
    rec *r = user;
    if (!r->gc) return;
    const float *ref = golden_row(&G, r->gc, pos);
    if (!ref) return;
    double e = golden_rel_l2(row, ref, V);
    if (e > r->max_err) r->max_err = e;
    r->n_rows++;
}

static par_instance *g_inst;

static eng_engine *make(int chunk, int block_size, int n_blocks, bool prefix) {
    eng_config c;
    eng_config_default(&c);
    c.max_num_batched_tokens = chunk;
    c.block_size = block_size;
    c.n_blocks = n_blocks;
    c.max_model_len = 1024;
    c.max_num_seqs = 32;
    c.prefix_caching = prefix;
    c.on_event = on_event;
    eng_engine *e = NULL;
    CHECK(eng_create(&c, g_inst, NULL, &e) == DUET_OK);
    return e;
}

/* 0: every prompt row's logits reach on_logits; -1: the last ones only (prompt logprobs keep a
 * request away from the prefix cache, so the prefix test asks none) */
static int g_golden_prompt_lp = 0;

static void submit_golden(eng_engine *e, int id, const golden_case *k) {
    memset(&R[id], 0, sizeof R[id]);
    R[id].gc = k;
    eng_request q = {.id = (uint64_t)id, .prompt = k->prompt, .n_prompt = k->n_prompt};
    eng_sampling_default(&q.sampling);
    q.sampling.smp.temperature = 0;
    q.sampling.ignore_eos = true;
    q.sampling.max_tokens = k->n_greedy;
    q.sampling.prompt_logprobs = g_golden_prompt_lp; /* 0: every prompt row's logits */
    q.user = &R[id];
    q.on_logits = on_logits;
    char err[256];
    CHECK_MSG(eng_submit(e, &q, err, sizeof err) == DUET_OK, "%s", err);
}

static int run_until_idle(eng_engine *e, int max_steps) {
    int steps = 0;
    for (; steps < max_steps; steps++) {
        bool busy;
        CHECK(eng_step(e, &busy) == DUET_OK);
        eng_stats st;
        eng_get_stats(e, &st);
        if (!busy && st.n_running == 0 && st.n_waiting == 0) break;
    }
    return steps;
}

static void check_pool_full(eng_engine *e, const char *what) {
    eng_stats st;
    eng_get_stats(e, &st);
    CHECK_MSG(st.n_free_blocks == st.n_blocks, "%s: %d of %d blocks free", what, st.n_free_blocks,
              st.n_blocks);
    CHECK_MSG(st.n_running == 0 && st.n_waiting == 0 && st.n_leased == 0, "%s: requests left",
              what);
}

static void check_golden_results(const char *what) {
    for (int i = 0; i < G.n; i++) {
        rec *r = &R[i];
        const golden_case *k = r->gc;
        CHECK_MSG(r->n_final == 1, "%s %s: %d final events", what, k->name, r->n_final);
        CHECK_MSG(r->n_out == k->n_greedy && !memcmp(r->out, k->greedy, k->n_greedy * 4),
                  "%s %s: greedy ids differ (%d of %d tokens)", what, k->name, r->n_out,
                  k->n_greedy);
        CHECK_MSG(r->max_err < 1e-4, "%s %s: logits rel err %.3g", what, k->name, r->max_err);
        CHECK_MSG(r->n_rows >= k->n_prompt + k->n_greedy - 1, "%s %s: only %d rows compared", what,
                  k->name, r->n_rows);
    }
}

/* All cases, case i arriving at step every * i. */
static eng_stats golden_together(int chunk, int block_size, int n_blocks, bool prefix, int every) {
    eng_engine *e = make(chunk, block_size, n_blocks, prefix);
    eng_stats st = {0};
    if (!e) return st;
    int next = 0;
    for (int step = 0; step < 20000; step++) {
        while (next < G.n && step == every * next) {
            submit_golden(e, next, &G.cases[next]);
            next++;
        }
        bool busy;
        CHECK(eng_step(e, &busy) == DUET_OK);
        eng_get_stats(e, &st);
        if (next == G.n && st.n_running == 0 && st.n_waiting == 0) break;
    }
    char what[64];
    snprintf(what, sizeof what, "chunk %d bs %d blocks %d", chunk, block_size, n_blocks);
    check_golden_results(what);
    check_pool_full(e, what);
    eng_get_stats(e, &st);
    eng_destroy(e);
    return st;
}

static void prefix_reuse(void) {
    eng_engine *e = make(64, 16, 64, true);
    const golden_case *k = NULL;
    for (int i = 0; i < G.n; i++)
        if (G.cases[i].n_prompt >= 64) k = &G.cases[i];
    g_golden_prompt_lp = -1;
    submit_golden(e, 0, k);
    run_until_idle(e, 1000);
    eng_stats before;
    eng_get_stats(e, &before);
    submit_golden(e, 1, k);
    run_until_idle(e, 1000);
    eng_stats after;
    eng_get_stats(e, &after);
    int full = (k->n_prompt - 1) / 16;
    CHECK_MSG(after.prefix_hits - before.prefix_hits == (uint64_t)full,
              "prefix hits %llu, expected %d",
              (unsigned long long)(after.prefix_hits - before.prefix_hits), full);
    for (int i = 0; i < 2; i++) {
        CHECK(R[i].n_out == k->n_greedy && !memcmp(R[i].out, k->greedy, k->n_greedy * 4));
        CHECK_MSG(R[i].max_err < 1e-4, "prefix reuse run %d err %.3g", i, R[i].max_err);
    }
    g_golden_prompt_lp = 0;
    check_pool_full(e, "prefix reuse");
    eng_destroy(e);
}

/* A request that waits for blocks gives its prefix hits back every step it waits and looks
 * them up again when it is next tried; the metrics count its lookup once, when it is admitted.
 * A holds every block of the pool for its last 15 steps; B, the same prompt, finds A's full
 * blocks cached but needs one more block, so it waits until A is done. */
static void prefix_counted_once(void) {
    const golden_case *k = NULL;
    for (int i = 0; i < G.n; i++)
        if (G.cases[i].n_prompt >= 33) k = &G.cases[i];
    int n_blocks = (k->n_prompt + 15) / 16 + 1;
    eng_engine *e = make(64, 16, n_blocks, true);
    for (int id = 0; id < 2; id++) {
        memset(&R[id], 0, sizeof R[id]);
        eng_request q = {.id = (uint64_t)id, .prompt = k->prompt, .n_prompt = k->n_prompt};
        eng_sampling_default(&q.sampling);
        q.sampling.smp.temperature = 0;
        q.sampling.ignore_eos = true;
        q.sampling.max_tokens = id == 0 ? n_blocks * 16 - k->n_prompt : 2;
        char err[256];
        CHECK_MSG(eng_submit(e, &q, err, sizeof err) == DUET_OK, "%s", err);
        if (id == 1) break;
        eng_stats st;
        for (int step = 0; step < 1000; step++) { /* until A holds the whole pool */
            bool busy;
            CHECK(eng_step(e, &busy) == DUET_OK);
            eng_get_stats(e, &st);
            if (st.n_free_blocks == 0) break;
        }
        CHECK_MSG(st.n_free_blocks == 0 && st.n_running == 1, "A holds %d of %d blocks",
                  st.n_blocks - st.n_free_blocks, st.n_blocks);
    }
    eng_stats before, st;
    eng_get_stats(e, &before);
    int waited = 0;
    for (int step = 0; step < 1000; step++) {
        bool busy;
        CHECK(eng_step(e, &busy) == DUET_OK);
        eng_get_stats(e, &st);
        if (st.n_waiting) waited++;
        if (!busy && st.n_running == 0 && st.n_waiting == 0) break;
    }
    int full = (k->n_prompt - 1) / 16;
    CHECK_MSG(waited >= 5, "B waited %d steps only", waited);
    CHECK_MSG(st.prefix_queries - before.prefix_queries == (uint64_t)full &&
                  st.prefix_hits - before.prefix_hits == (uint64_t)full,
              "B waited %d steps: %llu queries, %llu hits counted, expected %d of each", waited,
              (unsigned long long)(st.prefix_queries - before.prefix_queries),
              (unsigned long long)(st.prefix_hits - before.prefix_hits), full);
    CHECK(R[0].n_final == 1 && R[1].n_final == 1 && R[1].n_out == 2);
    check_pool_full(e, "prefix counted once");
    eng_destroy(e);
}

/* A request asking for prompt logprobs computes every prompt row, whatever of its prompt is in
 * the prefix cache (rows served from the cache have no logits): its prompt logprobs equal those
 * of an engine without the cache. */
static void prompt_logprobs_bypass_cache(void) {
    const golden_case *k = NULL;
    for (int i = 0; i < G.n; i++)
        if (G.cases[i].n_prompt >= 48 && G.cases[i].n_prompt <= 512) k = &G.cases[i];
    eng_engine *cached = make(64, 16, 64, true), *plain = make(64, 16, 64, false);
    for (int id = 0; id < 3; id++) {
        memset(&R[id], 0, sizeof R[id]);
        g_n_plp[id] = 0;
        eng_request q = {.id = (uint64_t)id, .prompt = k->prompt, .n_prompt = k->n_prompt};
        eng_sampling_default(&q.sampling);
        q.sampling.smp.temperature = 0;
        q.sampling.ignore_eos = true;
        q.sampling.max_tokens = 1;
        q.sampling.prompt_logprobs = id == 0 ? -1 : 3; /* 0 fills the cache, 1 and 2 ask */
        char err[256];
        eng_engine *e = id == 2 ? plain : cached;
        CHECK_MSG(eng_submit(e, &q, err, sizeof err) == DUET_OK, "%s", err);
        run_until_idle(e, 1000);
    }
    CHECK(g_n_plp[1] == k->n_prompt && g_n_plp[2] == k->n_prompt);
    int bad = 0;
    for (int i = 1; i < k->n_prompt; i++) {
        const eng_token_lp *a = &g_plp[1][i], *b = &g_plp[2][i];
        bool same = a->token == k->prompt[i] && b->token == k->prompt[i] &&
                    fabsf(a->logprob - b->logprob) < 1e-4f && a->n_top == 3 &&
                    a->top[0].token == b->top[0].token;
        bad += !same;
    }
    CHECK_MSG(bad == 0, "%d of %d prompt logprobs differ with the prefix cache", bad,
              k->n_prompt - 1);
    check_pool_full(cached, "prompt logprobs, cached");
    check_pool_full(plain, "prompt logprobs, plain");
    eng_destroy(cached);
    eng_destroy(plain);
}

static rng_state g_rng = {{88172645463325252ull, 1, 2, 3}};
static uint32_t rnd(void) {
    return (uint32_t)rng_next(&g_rng);
}

static void random_aborts(void) {
    eng_engine *e = make(48, 16, 40, true);
    const int N = 40;
    static int32_t prompts[MAXR][80];
    int aborted_at[MAXR];
    for (int i = 0; i < N; i++) {
        memset(&R[i], 0, sizeof R[i]);
        int n = 1 + (int)(rnd() % 79);
        for (int j = 0; j < n; j++) prompts[i][j] = (int32_t)(rnd() % 2048);
        /* shared prefixes now and then, so cached blocks get aborted too */
        if (i > 0 && rnd() % 3 == 0) memcpy(prompts[i], prompts[i - 1], 32 * sizeof(int32_t));
        eng_request q = {.id = (uint64_t)i, .prompt = prompts[i], .n_prompt = n < 33 ? 33 : n};
        eng_sampling_default(&q.sampling);
        q.sampling.smp.temperature = 0.7f;
        q.sampling.max_tokens = 1 + (int)(rnd() % 30);
        q.sampling.ignore_eos = true;
        char err[128];
        CHECK(eng_submit(e, &q, err, sizeof err) == DUET_OK);
        aborted_at[i] = rnd() % 2 ? (int)(rnd() % 40) : -1;
    }
    for (int step = 0; step < 5000; step++) {
        for (int i = 0; i < N; i++)
            if (aborted_at[i] == step) eng_abort(e, (uint64_t)i);
        eng_abort(e, 999999); /* unknown ids are ignored */
        bool busy;
        CHECK(eng_step(e, &busy) == DUET_OK);
        eng_stats st;
        eng_get_stats(e, &st);
        if (step > 40 && st.n_running == 0 && st.n_waiting == 0) break;
    }
    int aborts = 0;
    for (int i = 0; i < N; i++) {
        CHECK_MSG(R[i].n_final == 1, "request %d: %d final events", i, R[i].n_final);
        aborts += R[i].finish == ENG_FINISH_ABORT;
    }
    CHECK(aborts > 0);
    check_pool_full(e, "random aborts");
    eng_destroy(e);
}

/* Seeded sampling gives the same tokens alone and in a batch with other requests. */
static void seeded(void) {
    const golden_case *k = &G.cases[1];
    int32_t outs[3][16];
    for (int round = 0; round < 3; round++) {
        eng_engine *e = make(64, 16, 64, true);
        int n_req = round == 0 ? 1 : 4;
        for (int i = 0; i < n_req; i++) {
            memset(&R[i], 0, sizeof R[i]);
            eng_request q = {.id = (uint64_t)i,
                             .prompt = i == 0 ? k->prompt : G.cases[i + 1].prompt,
                             .n_prompt = i == 0 ? k->n_prompt : G.cases[i + 1].n_prompt};
            eng_sampling_default(&q.sampling);
            q.sampling.smp.temperature = 1.5f;
            q.sampling.smp.top_p = 0.95f;
            q.sampling.has_seed = true;
            q.sampling.seed = i == 0 ? (round == 2 ? 99 : 1234) : 7 + (uint64_t)i;
            q.sampling.max_tokens = 16;
            q.sampling.ignore_eos = true;
            char err[128];
            CHECK(eng_submit(e, &q, err, sizeof err) == DUET_OK);
            if (round == 1 && i == 0) { /* the seeded one arrives while others run */
                bool busy;
                eng_step(e, &busy);
            }
        }
        run_until_idle(e, 1000);
        CHECK(R[0].n_out == 16);
        memcpy(outs[round], R[0].out, sizeof outs[round]);
        check_pool_full(e, "seeded");
        eng_destroy(e);
    }
    CHECK_MSG(!memcmp(outs[0], outs[1], sizeof outs[0]), "same seed, other batch: tokens differ");
    CHECK_MSG(memcmp(outs[0], outs[2], sizeof outs[0]) != 0, "another seed gave the same tokens");
}

/* stop_token_ids end the request; min_tokens holds them back. */
static void stops(void) {
    const golden_case *k = &G.cases[1];
    for (int variant = 0; variant < 2; variant++) {
        eng_engine *e = make(64, 16, 64, true);
        memset(&R[0], 0, sizeof R[0]);
        eng_request q = {.id = 0, .prompt = k->prompt, .n_prompt = k->n_prompt};
        eng_sampling_default(&q.sampling);
        q.sampling.smp.temperature = 0;
        q.sampling.max_tokens = 12;
        q.sampling.n_stop_ids = 1;
        q.sampling.stop_ids[0] = k->greedy[2];
        q.sampling.min_tokens = variant ? 5 : 0;
        char err[128];
        CHECK(eng_submit(e, &q, err, sizeof err) == DUET_OK);
        run_until_idle(e, 1000);
        if (!variant) {
            CHECK(R[0].n_out == 3 && R[0].finish == ENG_FINISH_STOP);
            CHECK(R[0].stop_token == k->greedy[2]);
        } else {
            CHECK(R[0].n_out >= 5);
            for (int i = 0; i < 5 && i < R[0].n_out; i++) CHECK(R[0].out[i] != k->greedy[2]);
        }
        check_pool_full(e, "stops");
        eng_destroy(e);
    }
}

/* Chunked prefill shares each step with running decodes: a long prompt that arrives first
 * keeps getting chunks while short requests keep arriving and decoding, nobody starves, and
 * waiting requests start in arrival order. */
static void starvation(void) {
    eng_engine *e = make(16, 16, 256, false);
    const golden_case *longest = &G.cases[0];
    for (int i = 0; i < G.n; i++)
        if (G.cases[i].n_prompt > longest->n_prompt) longest = &G.cases[i];
    int first_token_step[MAXR], done_step[MAXR];
    for (int i = 0; i < MAXR; i++) first_token_step[i] = done_step[i] = -1;
    memset(R, 0, sizeof R);
    submit_golden(e, 0, longest);
    const int N = 12;
    for (int step = 0; step < 2000; step++) {
        if (step >= 1 && step <= N) { /* one short request per step */
            memset(&R[step], 0, sizeof R[step]);
            eng_request q = {.id = (uint64_t)step, .prompt = G.cases[1].prompt, .n_prompt = 3};
            eng_sampling_default(&q.sampling);
            q.sampling.smp.temperature = 0;
            q.sampling.max_tokens = 40;
            q.sampling.ignore_eos = true;
            char err[64];
            CHECK(eng_submit(e, &q, err, sizeof err) == DUET_OK);
        }
        bool busy;
        eng_step(e, &busy);
        for (int i = 0; i <= N; i++) {
            if (R[i].n_out > 0 && first_token_step[i] < 0) first_token_step[i] = step;
            if (R[i].n_final && done_step[i] < 0) done_step[i] = step;
        }
        eng_stats st;
        eng_get_stats(e, &st);
        if (step > N && st.n_running == 0 && st.n_waiting == 0) break;
    }
    /* the long prompt needs ceil(n / 16) steps alone; with up to 12 decodes taking a token
     * each from every step's budget of 16 it still gets at least 4 tokens a step */
    int bound = (longest->n_prompt + 3) / 4 + longest->n_greedy + 4;
    CHECK_MSG(done_step[0] >= 0 && done_step[0] <= bound, "long prompt done at step %d (bound %d)",
              done_step[0], bound);
    CHECK(R[0].n_out == longest->n_greedy &&
          !memcmp(R[0].out, longest->greedy, 4 * (size_t)longest->n_greedy));
    for (int i = 1; i <= N; i++) {
        CHECK_MSG(done_step[i] >= 0, "short request %d never finished", i);
        /* a running decode gets its token every step, long prefill or not */
        CHECK_MSG(done_step[i] - first_token_step[i] == 39,
                  "request %d took %d steps for 40 tokens", i,
                  done_step[i] - first_token_step[i] + 1);
        if (i > 1)
            CHECK_MSG(first_token_step[i] >= first_token_step[i - 1],
                      "request %d started before request %d", i, i - 1);
    }
    check_pool_full(e, "starvation");
    eng_destroy(e);
}

/* The engine samples by the rule of backend.h: every token of seeded requests with penalties,
 * min_tokens bans, filters and logprobs is the host rule's on the row the hook saw, with the
 * Philox counter at the output index and the penalty slot rebuilt from the tokens so far;
 * logprobs agree with smp_logprobs on the raw row. */
typedef struct replay {
    float rows[40][2048];
    int n_rows;
} replay;
static replay g_replay[2];

static void on_replay_logits(void *user, int pos, const float *row, int V) {
    replay *rp = user;
    (void)pos;
    if (rp->n_rows < 40 && V == 2048) memcpy(rp->rows[rp->n_rows++], row, sizeof rp->rows[0]);
}

static eng_token_lp g_lp[2][40];
static int g_n_lp[2];
static void on_replay_event(void *user, const eng_event *ev) {
    on_event(user, ev);
    if (ev->logprobs && ev->id < 2 && g_n_lp[ev->id] < 40)
        g_lp[ev->id][g_n_lp[ev->id]++] = *ev->logprobs;
}

static void sampling_replay(void) {
    eng_config c;
    eng_config_default(&c);
    c.max_num_seqs = 4;
    c.n_blocks = 64;
    c.block_size = 16;
    c.max_model_len = 1024;
    c.on_event = on_replay_event;
    eng_engine *e = NULL;
    CHECK(eng_create(&c, g_inst, NULL, &e) == DUET_OK);
    if (!e) return;
    const int n_tok = 24;
    eng_sampling sp[2];
    for (int i = 0; i < 2; i++) {
        const golden_case *k = &G.cases[i + 1];
        memset(&R[i], 0, sizeof R[i]);
        memset(&g_replay[i], 0, sizeof g_replay[i]);
        g_n_lp[i] = 0;
        eng_request q = {.id = (uint64_t)i, .prompt = k->prompt, .n_prompt = k->n_prompt};
        eng_sampling_default(&q.sampling);
        q.sampling.smp.temperature = i ? 0.8f : 1.2f;
        q.sampling.smp.top_p = i ? 0.9f : 1.0f;
        q.sampling.smp.top_k = i ? 0 : 40;
        q.sampling.smp.min_p = i ? 0.0f : 0.02f;
        q.sampling.smp.repetition_penalty = 1.3f;
        q.sampling.smp.frequency_penalty = i ? 0.7f : 0.0f;
        q.sampling.smp.presence_penalty = 0.4f;
        q.sampling.has_seed = true;
        q.sampling.seed = 31 + (uint64_t)i;
        q.sampling.max_tokens = n_tok;
        q.sampling.min_tokens = 6;
        q.sampling.n_stop_ids = 2;
        q.sampling.stop_ids[0] = k->greedy[1];
        q.sampling.stop_ids[1] = k->greedy[2];
        q.sampling.logprobs = i ? 3 : 0;
        q.user = &g_replay[i];
        q.on_logits = on_replay_logits;
        sp[i] = q.sampling;
        char err[128];
        CHECK(eng_submit(e, &q, err, sizeof err) == DUET_OK);
    }
    run_until_idle(e, 1000);
    void *scratch = malloc(be_sample_host_scratch(2048));
    static int32_t counts[2048];
    static uint32_t bits[64];
    smp_scratch ss = {0};
    int replayed = 0;
    for (int i = 0; i < 2; i++) {
        const golden_case *k = &G.cases[i + 1];
        CHECK(R[i].n_final == 1 && R[i].n_out >= 1 && R[i].n_out == g_replay[i].n_rows);
        CHECK(g_n_lp[i] == R[i].n_out);
        for (int j = 0; j < R[i].n_out && j < g_replay[i].n_rows; j++) {
            memset(counts, 0, sizeof counts);
            memset(bits, 0, sizeof bits);
            for (int t = 0; t < k->n_prompt; t++)
                bits[k->prompt[t] >> 5] |= 1u << (k->prompt[t] & 31);
            for (int t = 0; t < j; t++) counts[R[i].out[t]]++;
            be_sample_row r;
            be_sample_row_init(&r);
            r.temperature = sp[i].smp.temperature;
            r.top_k = sp[i].smp.top_k;
            r.top_p = sp[i].smp.top_p;
            r.min_p = sp[i].smp.min_p;
            r.repetition_penalty = sp[i].smp.repetition_penalty;
            r.frequency_penalty = sp[i].smp.frequency_penalty;
            r.presence_penalty = sp[i].smp.presence_penalty;
            r.seed = sp[i].seed;
            r.offset = (uint64_t)j;
            r.n_logprobs = sp[i].logprobs;
            if (j < 6) {
                r.ban[r.n_ban++] = 1; /* EOS of the golden model */
                r.ban[r.n_ban++] = sp[i].stop_ids[0];
                r.ban[r.n_ban++] = sp[i].stop_ids[1];
            }
            be_sample_out o;
            be_sample_top top;
            be_sample_host_row(g_replay[i].rows[j], 2048, &r, counts, bits, scratch, &o, &top);
            CHECK_MSG(o.token == R[i].out[j], "request %d token %d: engine %d, rule %d", i, j,
                      R[i].out[j], o.token);
            float lp;
            smp_logprob want[3];
            smp_logprobs(g_replay[i].rows[j], 2048, R[i].out[j], sp[i].logprobs, &lp, want, &ss);
            const eng_token_lp *got = &g_lp[i][j];
            CHECK(got->token == R[i].out[j] && got->n_top == sp[i].logprobs);
            CHECK_NEAR(got->logprob, lp, 1e-5);
            for (int t = 0; t < sp[i].logprobs; t++) {
                CHECK(got->top[t].token == want[t].token);
                CHECK_NEAR(got->top[t].logprob, want[t].logprob, 1e-5);
            }
            if (j < 6) CHECK(R[i].out[j] != sp[i].stop_ids[0] && R[i].out[j] != sp[i].stop_ids[1]);
            replayed++;
        }
    }
    CHECK(replayed >= 12);
    smp_scratch_free(&ss);
    free(scratch);
    check_pool_full(e, "sampling replay");
    eng_destroy(e);
}

/* Requests the engine must refuse, with a message. */
static void refusals(void) {
    eng_engine *e = make(64, 16, 8, true);
    int32_t big[200], bad[2] = {5, 4096};
    for (int i = 0; i < 200; i++) big[i] = i;
    char err[256] = "";
    eng_request q = {.id = 1, .prompt = big, .n_prompt = 200};
    eng_sampling_default(&q.sampling);
    CHECK(eng_submit(e, &q, err, sizeof err) == DUET_ERR_TOO_LONG); /* 13 blocks > 8 */
    q.prompt = bad;
    q.n_prompt = 2;
    CHECK(eng_submit(e, &q, err, sizeof err) == DUET_ERR_INVALID && strstr(err, "4096"));
    q.n_prompt = 0;
    CHECK(eng_submit(e, &q, err, sizeof err) == DUET_ERR_INVALID);
    q.prompt = big;
    q.n_prompt = 4;
    q.sampling.smp.top_p = 2;
    CHECK(eng_submit(e, &q, err, sizeof err) == DUET_ERR_INVALID && strstr(err, "top_p"));
    eng_sampling_default(&q.sampling);
    q.sampling.max_tokens = 5000;
    CHECK(eng_submit(e, &q, err, sizeof err) == DUET_ERR_TOO_LONG &&
          strstr(err, "maximum context length is 1024"));
    check_pool_full(e, "refusals");
    eng_destroy(e);
}

int main(void) {
    par_options po;
    par_options_init(&po);
    int argc = 0;
    char **argv = NULL;
    if (par_instance_create(&po, GOLDEN_DIR "/tiny-v3/model", &argc, &argv, &g_inst) != DUET_OK)
        return 1;
    if (golden_load(GOLDEN_DIR "/tiny-v3", 2048, &G) != 0) return 1;
    int chunks[4] = {1, 7, 64, 1 << 20};
    for (int c = 0; c < 4; c++) golden_together(chunks[c], 16, 256, true, 2);
    golden_together(64, 64, 64, true, 2);
    /* a pool smaller than all cases together needs: preemption by recompute */
    eng_stats st = golden_together(32, 16, 12, true, 2);
    CHECK_MSG(st.n_preemptions > 0, "no preemption happened with 12 blocks");
    st = golden_together(1 << 20, 16, 9, false, 0);
    CHECK_MSG(st.n_preemptions > 0, "no preemption with all arriving at once");
    prefix_reuse();
    prefix_counted_once();
    prompt_logprobs_bypass_cache();
    random_aborts();
    seeded();
    stops();
    sampling_replay();
    starvation();
    refusals();
    fio_unmap(&G.map);
    par_instance_destroy(g_inst);
    CHECK_DONE();
}
