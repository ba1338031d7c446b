/* MTP speculative decoding on duet-mkmodel --mtp checkpoints, CPU backend. The model: loading
 * the MTP module (and the clear refusals: no MTP layer, too many drafts), and the module's own
 * KV cache kept in step (drafts made step by step equal drafts made from scratch). The engine:
 * greedy output with k = 1, 2, 3 drafts a step equals the output without drafts, token for
 * token, with the same finish reasons and logprobs, under continuous batching, chunked prefill,
 * preemption, prefix caching, stop tokens, max_tokens (never overshot) and aborts, once with
 * the module's own drafts and once with drafts a test oracle steers (mostly right, sometimes
 * wrong), so that acceptance, partial rejection and the KV rollback all happen; the counters
 * agree with what was accepted. Sampled requests (seeded) give the same tokens with drafts, and
 * a chi-square test over 2000 seeded requests shows the output distribution is the target's.
 * Argument "text": stop strings on a checkpoint with DeepSeek's tokenizer. */
#include <string.h>

#include "check.h"
#include "engine/engine.h"
#include "engine/parallel.h"
#include "base/log.h"
#include "mkmodel.h"
#include "testmodel.h"
#include "testutil.h"
#include "text/tokenizer.h"

#define VOCAB 512
#define NREQ  12
#define MAXO  64

static char *g_root;
static char g_mtp_dir[4200], g_plain_dir[4200];
static par_instance *g_inst;

typedef struct rec {
    int32_t prompt[80];
    int n_prompt;
    int32_t out[MAXO];
    float lp[MAXO];
    int n_out, n_final;
    eng_finish finish;
    /* oracle drafts: the reference output of the same scenario, or NULL for the module's */
    const int32_t *ref;
    int n_ref, id;
} rec;

static rec R[NREQ], REF[NREQ];
static int32_t g_stop[NREQ]; /* the stops scenario's stop token per request, or -1 */

static void on_event(void *user, const eng_event *ev) {
    (void)user;
    rec *r = &R[ev->id];
    for (int i = 0; i < ev->n_tokens && r->n_out < MAXO; i++) {
        r->lp[r->n_out] = ev->logprobs ? ev->logprobs[i].logprob : 0.0f;
        r->out[r->n_out++] = ev->tokens[i];
    }
    if (ev->finish) {
        r->n_final++;
        r->finish = ev->finish;
    }
}

/* Drafts mostly right (the reference's next tokens), one in five wrong. */
static void on_draft(void *user, int n_output, int32_t *draft, int n_draft) {
    rec *r = user;
    if (!r->ref) return;
    for (int j = 0; j < n_draft; j++) {
        int idx = n_output + j;
        int32_t right = idx < r->n_ref ? r->ref[idx] : 0;
        bool ok = (r->id * 7 + idx * 13 + j) % 5 != 0;
        draft[j] = ok ? right : (right + 1) % VOCAB;
    }
}

typedef struct scenario {
    const char *name;
    int chunk, block_size, n_blocks;
    bool prefix, shared_prefix, stops;
    int every; /* request i arrives at step every * i */
} scenario;

static void make_prompts(const scenario *sc) {
    for (int i = 0; i < NREQ; i++) {
        rec *r = &R[i];
        memset(r, 0, sizeof *r);
        r->id = i;
        r->n_prompt = 3 + (i * 7) % 37;
        tm_prompt(r->prompt, r->n_prompt, VOCAB, 100u + (uint32_t)i);
        if (sc->shared_prefix && r->n_prompt > 20) /* the first 20 tokens shared by many */
            tm_prompt(r->prompt, 20, VOCAB, 99u);
    }
}

/* Runs the scenario with k drafts a step (oracle: steered drafts); outputs in R. */
static eng_stats run(const scenario *sc, int k, bool oracle, bool abort_some) {
    make_prompts(sc);
    eng_config c;
    eng_config_default(&c);
    c.max_num_batched_tokens = sc->chunk;
    c.block_size = sc->block_size;
    c.n_blocks = sc->n_blocks;
    c.max_model_len = 256;
    c.max_num_seqs = 8;
    c.prefix_caching = sc->prefix;
    c.on_event = on_event;
    c.spec_tokens = k;
    eng_engine *e = NULL;
    eng_stats st = {0};
    CHECK(eng_create(&c, g_inst, NULL, &e) == DUET_OK);
    if (!e) return st;
    int next = 0;
    for (int step = 0; step < 5000; step++) {
        while (next < NREQ && step == sc->every * next) {
            rec *r = &R[next];
            eng_request q = {.id = (uint64_t)next, .prompt = r->prompt, .n_prompt = r->n_prompt};
            eng_sampling_default(&q.sampling);
            q.sampling.smp.temperature = 0;
            if (next % 3 == 1) {
                /* sampled, seeded: the same tokens with and without drafts */
                q.sampling.smp.temperature = 0.8f;
                q.sampling.smp.top_k = 20;
                q.sampling.seed = 1000u + (uint64_t)next;
                q.sampling.has_seed = true;
            }
            q.sampling.ignore_eos = true;
            /* 1..k+1 and longer: the last verify must stop exactly at max_tokens */
            q.sampling.max_tokens = next < 4 ? next + 1 : 8 + (next * 5) % 17;
            q.sampling.logprobs = next % 2 ? 2 : -1;
            if (sc->stops && g_stop[next] >= 0)
                q.sampling.stop_ids[q.sampling.n_stop_ids++] = g_stop[next];
            if (oracle) {
                r->ref = REF[next].out;
                r->n_ref = REF[next].n_out;
            }
            q.user = r;
            q.on_draft = on_draft;
            char err[256];
            CHECK_MSG(eng_submit(e, &q, err, sizeof err) == DUET_OK, "%s", err);
            next++;
        }
        if (abort_some && step == 9) {
            eng_abort(e, 2);
            eng_abort(e, 7);
        }
        bool busy;
        CHECK(eng_step(e, &busy) == DUET_OK);
        eng_get_stats(e, &st);
        if (next == NREQ && st.n_running == 0 && st.n_waiting == 0) break;
    }
    eng_get_stats(e, &st);
    CHECK_MSG(st.n_free_blocks == st.n_blocks && st.n_running == 0 && st.n_waiting == 0,
              "%s k=%d: %d of %d blocks free, %d running", sc->name, k, st.n_free_blocks,
              st.n_blocks, st.n_running);
    eng_destroy(e);
    return st;
}

static void compare(const scenario *sc, int k, bool oracle, bool aborted) {
    for (int i = 0; i < NREQ; i++) {
        rec *a = &R[i], *b = &REF[i];
        CHECK_MSG(a->n_final == 1, "%s k=%d: request %d had %d final events", sc->name, k, i,
                  a->n_final);
        if (aborted && (i == 2 || i == 7)) continue; /* cut at a step that depends on k */
        CHECK_MSG(a->n_out == b->n_out && !memcmp(a->out, b->out, (size_t)b->n_out * 4),
                  "%s k=%d%s: request %d: %d tokens vs %d without drafts, or others", sc->name, k,
                  oracle ? " (oracle)" : "", i, a->n_out, b->n_out);
        CHECK_MSG(a->finish == b->finish, "%s k=%d: request %d finish %d vs %d", sc->name, k, i,
                  a->finish, b->finish);
        for (int j = 0; j < a->n_out && j < b->n_out; j++)
            CHECK_MSG(fabsf(a->lp[j] - b->lp[j]) < 1e-3f,
                      "%s k=%d: request %d logprob %d: %g vs %g", sc->name, k, i, j, a->lp[j],
                      b->lp[j]);
    }
}

static void check_counters(const scenario *sc, int k, bool oracle, const eng_stats *st) {
    uint64_t per = 0;
    for (int j = 0; j < MDL_MAX_DRAFT; j++) {
        per += st->spec_accepted_per_pos[j];
        if (j > 0) CHECK(st->spec_accepted_per_pos[j] <= st->spec_accepted_per_pos[j - 1]);
        if (j >= k) CHECK(st->spec_accepted_per_pos[j] == 0);
    }
    CHECK_MSG(per == st->spec_accepted, "%s k=%d: per-position sum %llu vs %llu accepted", sc->name,
              k, (unsigned long long)per, (unsigned long long)st->spec_accepted);
    CHECK(st->spec_accepted <= st->spec_draft_tokens);
    CHECK(st->spec_draft_tokens <= (uint64_t)k * st->spec_drafts);
    CHECK_MSG(st->spec_drafts > 0, "%s k=%d: nothing was drafted", sc->name, k);
    if (oracle) {
        /* steered: many drafts stand (four in five are right, but one wrong voids the rest of
         * its step's), some do not */
        CHECK_MSG(st->spec_accepted * 10 > st->spec_draft_tokens * 4 &&
                      st->spec_accepted < st->spec_draft_tokens,
                  "%s k=%d: %llu of %llu oracle drafts accepted", sc->name, k,
                  (unsigned long long)st->spec_accepted, (unsigned long long)st->spec_draft_tokens);
        /* fewer steps than tokens: drafts were turned into output */
        CHECK_MSG(st->n_steps < st->generation_tokens, "%s k=%d: %llu steps for %llu tokens",
                  sc->name, k, (unsigned long long)st->n_steps,
                  (unsigned long long)st->generation_tokens);
    }
}

/* The reference without drafts, then oracle drafts for k = 1..3 and the module's own drafts
 * for k = k_own (the scenarios take turns, to keep the test short). */
static void scenario_all(const scenario *sc, int k_own, bool abort_some) {
    if (sc->stops) {
        /* a token the last reference (same prompts) makes somewhere in the middle */
        for (int i = 0; i < NREQ; i++)
            g_stop[i] = REF[i].n_out > 6 ? REF[i].out[REF[i].n_out / 2] : -1;
    }
    eng_stats ref = run(sc, 0, false, abort_some);
    CHECK(ref.spec_drafts == 0 && ref.spec_draft_tokens == 0);
    memcpy(REF, R, sizeof R);
    for (int k = 1; k <= MDL_MAX_DRAFT; k++) {
        for (int oracle = k == k_own ? 0 : 1; oracle < 2; oracle++) {
            eng_stats st = run(sc, k, oracle, abort_some);
            compare(sc, k, oracle, abort_some);
            check_counters(sc, k, oracle, &st);
            if (!strcmp(sc->name, "preemption"))
                CHECK_MSG(st.n_preemptions > 0, "k=%d: no preemption with %d blocks", k,
                          sc->n_blocks);
        }
    }
}

/* ---- stop strings (argument "text": a checkpoint with DeepSeek's tokenizer) ---- */

typedef struct trec {
    char text[8192];
    size_t len;
    int32_t out[64];
    int n_out, n_final;
    eng_finish finish;
    char stop_reason[64];
} trec;

static trec T;
static const int32_t *g_text_ref; /* drafts from this answer (all right), or NULL */
static int g_text_n_ref;

static void text_draft(void *user, int n_output, int32_t *draft, int n_draft) {
    (void)user;
    for (int j = 0; g_text_ref && j < n_draft; j++)
        if (n_output + j < g_text_n_ref) draft[j] = g_text_ref[n_output + j];
}

static void text_event(void *user, const eng_event *ev) {
    (void)user;
    for (int i = 0; i < ev->n_tokens && T.n_out < 64; i++) T.out[T.n_out++] = ev->tokens[i];
    if (ev->text_len && T.len + ev->text_len < sizeof T.text) {
        memcpy(T.text + T.len, ev->text, ev->text_len);
        T.len += ev->text_len;
    }
    if (ev->finish) {
        T.n_final++;
        T.finish = ev->finish;
        snprintf(T.stop_reason, sizeof T.stop_reason, "%s", ev->stop_reason ? ev->stop_reason : "");
    }
}

static void run_text(const tok_tokenizer *tok, int k, const char *stop, int max_tokens) {
    memset(&T, 0, sizeof T);
    eng_config c;
    eng_config_default(&c);
    c.block_size = 16;
    c.n_blocks = 64;
    c.max_model_len = 256;
    c.max_num_seqs = 4;
    c.on_event = text_event;
    c.spec_tokens = k;
    eng_engine *e = NULL;
    CHECK(eng_create(&c, g_inst, tok, &e) == DUET_OK);
    if (!e) return;
    int32_t prompt[12];
    tm_prompt(prompt, 12, 120000, 31u);
    eng_request q = {.id = 1, .prompt = prompt, .n_prompt = 12};
    eng_sampling_default(&q.sampling);
    q.sampling.smp.temperature = 0;
    q.sampling.ignore_eos = true;
    q.sampling.max_tokens = max_tokens;
    q.on_draft = text_draft;
    if (stop) q.sampling.stop[q.sampling.n_stop++] = (char *)stop;
    char err[256];
    CHECK_MSG(eng_submit(e, &q, err, sizeof err) == DUET_OK, "%s", err);
    for (int step = 0; step < 500; step++) {
        bool busy;
        CHECK(eng_step(e, &busy) == DUET_OK);
        eng_stats st;
        eng_get_stats(e, &st);
        if (st.n_running == 0 && st.n_waiting == 0) break;
    }
    eng_destroy(e);
    CHECK(T.n_final == 1);
}

/* A stop string from the middle of the answer (its bytes may straddle tokens): with drafts the
 * answer stops at the same token with the same text as without, with the module's drafts and
 * with drafts that are all right (so the stop falls inside a run of accepted drafts). */
static void stop_strings(const tok_tokenizer *tok) {
    run_text(tok, 0, NULL, 40);
    trec ref = T;
    CHECK_MSG(ref.n_out == 40 && ref.len > 8, "reference: %d tokens, %zu bytes", ref.n_out,
              ref.len);
    if (ref.len <= 8) return;
    for (int cut = 0; cut < 3; cut++) {
        char stop[8] = {0};
        size_t at = ref.len * (cut + 1) / 4;
        memcpy(stop, ref.text + at, 3);
        run_text(tok, 0, stop, 40);
        trec off = T;
        CHECK_MSG(off.finish == ENG_FINISH_STOP && !strcmp(off.stop_reason, stop),
                  "stop '%s' not found without drafts", stop);
        for (int k = 1; k <= 2 * MDL_MAX_DRAFT; k++) {
            g_text_ref = k > MDL_MAX_DRAFT ? ref.out : NULL;
            g_text_n_ref = ref.n_out;
            run_text(tok, k > MDL_MAX_DRAFT ? k - MDL_MAX_DRAFT : k, stop, 40);
            g_text_ref = NULL;
            CHECK_MSG(T.n_out == off.n_out && !memcmp(T.out, off.out, sizeof(int32_t) * T.n_out) &&
                          T.len == off.len && !memcmp(T.text, off.text, T.len) &&
                          T.finish == off.finish && !strcmp(T.stop_reason, off.stop_reason),
                      "k=%d, stop '%s': %d tokens, %zu bytes vs %d, %zu without drafts", k, stop,
                      T.n_out, T.len, off.n_out, off.len);
        }
    }
}

/* ---- temperature > 0: the output distribution is the target's ---- */

#define CHI_N  2000
#define CHI_TK 4

static int32_t g_chi_out[CHI_N][3];
static int32_t g_chi_top[CHI_TK];  /* the first token's top-k */
static int32_t g_chi_best[CHI_TK]; /* the likeliest second token after each */
static int g_chi_drafts, g_chi_n_out[CHI_N];

static void chi_event(void *user, const eng_event *ev) {
    (void)user;
    for (int i = 0; i < ev->n_tokens; i++)
        if (g_chi_n_out[ev->id] < 3) g_chi_out[ev->id][g_chi_n_out[ev->id]++] = ev->tokens[i];
}

/* The draft after the first token: the likeliest second token, so drafts stand often. */
static void chi_draft(void *user, int n_output, int32_t *draft, int n_draft) {
    const int32_t *first = user;
    (void)n_output;
    for (int t = 0; t < CHI_TK; t++)
        if (first && *first == g_chi_top[t] && n_draft > 0) draft[0] = g_chi_best[t];
    g_chi_drafts++;
}

/* The k largest of row[V] (indices, descending) and their softmax at temperature 1. */
static void top_probs(const float *row, int V, int32_t *idx, double *p) {
    for (int t = 0; t < CHI_TK; t++) {
        int best = -1;
        for (int v = 0; v < V; v++) {
            bool taken = false;
            for (int u = 0; u < t; u++) taken |= idx[u] == v;
            if (!taken && (best < 0 || row[v] > row[best])) best = v;
        }
        idx[t] = best;
    }
    double z = 0;
    for (int t = 0; t < CHI_TK; t++) z += exp((double)row[idx[t]] - row[idx[0]]);
    for (int t = 0; t < CHI_TK; t++) p[t] = exp((double)row[idx[t]] - row[idx[0]]) / z;
}

/* CHI_N seeded requests (temperature 1, top-k 4, 3 tokens, one draft a step, steered to the
 * likeliest second token): the triples of output tokens against the target's exact joint
 * distribution, computed from its logits without MTP. The third token is the one the rule
 * decides: drawn after the draft, it stands only if the draft was the target's own draw. */
static void chi_square(void) {
    enum { P = 9 };
    int32_t prompt[P + 2];
    tm_prompt(prompt, P, VOCAB, 777u);
    tm_model tm;
    if (tm_load(g_mtp_dir, MDL_WEIGHTS_CHECKPOINT, 0, &tm) != DUET_OK) {
        CHECK(0);
        return;
    }
    float *rows = malloc((size_t)(P + 2) * VOCAB * sizeof(float));
    double p0[CHI_TK], p1[CHI_TK][CHI_TK], p2[CHI_TK][CHI_TK][CHI_TK];
    int32_t second[CHI_TK][CHI_TK], third[CHI_TK][CHI_TK][CHI_TK];
    CHECK(tm_prefill(&tm, prompt, P, rows) == DUET_OK);
    top_probs(rows + (size_t)(P - 1) * VOCAB, VOCAB, g_chi_top, p0);
    for (int t = 0; t < CHI_TK; t++) {
        prompt[P] = g_chi_top[t];
        CHECK(tm_prefill(&tm, prompt, P + 1, rows) == DUET_OK);
        top_probs(rows + (size_t)P * VOCAB, VOCAB, second[t], p1[t]);
        g_chi_best[t] = second[t][0];
        for (int u = 0; u < CHI_TK; u++) {
            prompt[P + 1] = second[t][u];
            CHECK(tm_prefill(&tm, prompt, P + 2, rows) == DUET_OK);
            top_probs(rows + (size_t)(P + 1) * VOCAB, VOCAB, third[t][u], p2[t][u]);
        }
    }
    tm_unload(&tm);
    free(rows);

    eng_config c;
    eng_config_default(&c);
    c.block_size = 16;
    c.n_blocks = 512;
    c.max_model_len = 64;
    c.max_num_seqs = 64;
    c.on_event = chi_event;
    c.spec_tokens = 1;
    eng_engine *e = NULL;
    CHECK(eng_create(&c, g_inst, NULL, &e) == DUET_OK);
    if (!e) return;
    memset(g_chi_n_out, 0, sizeof g_chi_n_out);
    g_chi_drafts = 0;
    int next = 0;
    for (int step = 0; step < 100000; step++) {
        eng_stats st;
        eng_get_stats(e, &st);
        while (next < CHI_N && st.n_running + st.n_waiting < 64) {
            eng_request q = {.id = (uint64_t)next, .prompt = prompt, .n_prompt = P};
            eng_sampling_default(&q.sampling);
            q.sampling.smp.temperature = 1.0f;
            q.sampling.smp.top_k = CHI_TK;
            q.sampling.max_tokens = 3;
            q.sampling.ignore_eos = true;
            q.sampling.seed = 5000u + (uint64_t)next;
            q.sampling.has_seed = true;
            q.on_draft = chi_draft;
            q.user = &g_chi_out[next][0];
            char err[256];
            CHECK_MSG(eng_submit(e, &q, err, sizeof err) == DUET_OK, "%s", err);
            next++;
            st.n_waiting++;
        }
        bool busy;
        CHECK(eng_step(e, &busy) == DUET_OK);
        eng_get_stats(e, &st);
        if (next == CHI_N && st.n_running == 0 && st.n_waiting == 0) break;
    }
    eng_stats st;
    eng_get_stats(e, &st);
    eng_destroy(e);
    /* observed triples against the joint; triples outside the top-k never come */
    double chi = 0;
    int bins = 0, outside = 0;
    static int cnt[CHI_TK][CHI_TK][CHI_TK];
    memset(cnt, 0, sizeof cnt);
    for (int i = 0; i < CHI_N; i++) {
        int a = -1, b = -1, d = -1;
        for (int t = 0; t < CHI_TK; t++)
            if (g_chi_out[i][0] == g_chi_top[t]) a = t;
        for (int t = 0; a >= 0 && t < CHI_TK; t++)
            if (g_chi_out[i][1] == second[a][t]) b = t;
        for (int t = 0; b >= 0 && t < CHI_TK; t++)
            if (g_chi_out[i][2] == third[a][b][t]) d = t;
        if (d < 0 || g_chi_n_out[i] != 3) {
            outside++;
            continue;
        }
        cnt[a][b][d]++;
    }
    double pooled_e = 0, pooled_o = 0;
    for (int a = 0; a < CHI_TK; a++) {
        for (int b = 0; b < CHI_TK; b++) {
            for (int d = 0; d < CHI_TK; d++) {
                double ex = CHI_N * p0[a] * p1[a][b] * p2[a][b][d];
                if (ex < 5) { /* small bins pooled into one */
                    pooled_e += ex;
                    pooled_o += cnt[a][b][d];
                    continue;
                }
                chi += pow(cnt[a][b][d] - ex, 2) / ex;
                bins++;
            }
        }
    }
    if (pooled_e > 0) {
        chi += pow(pooled_o - pooled_e, 2) / pooled_e;
        bins++;
    }
    int dof = bins - 1;
    /* the 0.999 quantile of chi-square with dof degrees of freedom (Wilson-Hilferty) */
    double h = 2.0 / (9.0 * dof), crit = dof * pow(1 - h + 3.09 * sqrt(h), 3);
    CHECK_MSG(outside == 0, "%d requests left the top-%d support or the 3 tokens", outside, CHI_TK);
    CHECK_MSG(chi < crit, "chi-square %.2f over %d bins (0.999 quantile %.2f)", chi, bins, crit);
    /* the path under test ran: drafts were verified and many stood */
    CHECK_MSG(st.spec_draft_tokens > CHI_N / 2 && st.spec_accepted > st.spec_draft_tokens / 5 &&
                  st.spec_accepted < st.spec_draft_tokens,
              "%llu of %llu drafts accepted", (unsigned long long)st.spec_accepted,
              (unsigned long long)st.spec_draft_tokens);
    printf("chi-square %.2f over %d bins (0.999 quantile %.2f); %llu of %llu drafts accepted\n",
           chi, bins, crit, (unsigned long long)st.spec_accepted,
           (unsigned long long)st.spec_draft_tokens);
}

/* ---- the model: loading, refusals, the module's own cache ---- */

static duet_status load(const char *dir, int spec, mdl_model **m_p, be_backend **be_p,
                        char **log_p) {
    CHECK(be_create("cpu", 0, be_p) == DUET_OK);
    mdl_shard shard = {.tp_rank = 0, .tp_size = 1, .ep_rank = 0, .ep_size = 1};
    mdl_load_opts lo = {.source = MDL_WEIGHTS_CHECKPOINT, .max_tokens = 128, .spec_tokens = spec};
    tu_capture_begin();
    duet_status st = mdl_load(dir, *be_p, &shard, &lo, m_p);
    char *log = tu_capture_end();
    if (log_p)
        *log_p = log;
    else
        free(log);
    return st;
}

static void refusals(void) {
    mdl_model *m = NULL;
    be_backend *be = NULL;
    char *log = NULL;
    CHECK(load(g_plain_dir, 1, &m, &be, &log) == DUET_ERR_UNSUPPORTED);
    CHECK_MSG(strstr(log, "has no MTP layer (num_nextn_predict_layers is 0)") &&
                  tu_count_lines(log) == 1,
              "no-MTP refusal said: %s", log);
    free(log);
    be_destroy(be);
    CHECK(load(g_mtp_dir, 4, &m, &be, &log) == DUET_ERR_INVALID);
    CHECK_MSG(strstr(log, "MTP drafts 1..3") != NULL, "k=4 refusal said: %s", log);
    free(log);
    be_destroy(be);
}

/* Drafts made step by step (the module's cache filled as a sequence grows, with rejected
 * positions overwritten) equal drafts made in one go from the whole sequence. */
static void module_cache(void) {
    mdl_model *m = NULL;
    be_backend *be = NULL;
    if (load(g_mtp_dir, 3, &m, &be, NULL) != DUET_OK) {
        CHECK(0);
        be_destroy(be);
        return;
    }
    CHECK(mdl_spec_tokens(m) == 3);
    enum { N = 40, BS = 16, NB = 4 };
    int32_t seq[N + 1], table[NB] = {3, 1, 0, 2};
    tm_prompt(seq, N + 1, VOCAB, 4242u);
    be_kv *kv = NULL, *kv2 = NULL;
    CHECK(mdl_kv_create(m, NB + 1, BS, &kv) == DUET_OK);
    CHECK(mdl_kv_create(m, NB + 1, BS, &kv2) == DUET_OK);
    /* incremental: a prompt of 10, then 1 or 3 tokens a step; drafts (3) after each */
    int n = 10, mism = 0, checks = 0, pos = 0;
    while (kv && kv2 && n <= N) {
        mdl_seq s = {.tokens = seq + pos,
                     .n_tokens = n - pos,
                     .pos0 = pos,
                     .block_table = table,
                     .n_blocks = NB,
                     .n_logits = 1};
        CHECK(mdl_forward(m, kv, &s, 1, NULL) == DUET_OK);
        int32_t d[MDL_MAX_DRAFT] = {0};
        mdl_draft_seq q = {.tokens = seq + pos + 1,
                           .n_tokens = n - pos,
                           .pos0 = pos,
                           .hid0 = 0,
                           .block_table = table,
                           .n_blocks = NB,
                           .n_draft = n + 3 <= NB * BS ? 3 : 1};
        CHECK(mdl_draft(m, kv, &q, 1, d) == DUET_OK);
        /* from scratch on a fresh cache: the whole sequence, then the module over it */
        mdl_seq s2 = {.tokens = seq, .n_tokens = n, .block_table = table, .n_blocks = NB};
        CHECK(mdl_forward(m, kv2, &s2, 1, NULL) == DUET_OK);
        int32_t d2[MDL_MAX_DRAFT] = {0};
        mdl_draft_seq q2 = q;
        q2.tokens = seq + 1;
        q2.n_tokens = n;
        q2.pos0 = 0;
        CHECK(mdl_draft(m, kv2, &q2, 1, d2) == DUET_OK);
        for (int j = 0; j < q.n_draft; j++, checks++) mism += d[j] != d2[j];
        pos = n;
        n += n % 2 ? 3 : 1;
    }
    CHECK_MSG(checks > 20 && mism == 0, "%d of %d drafts differ from the from-scratch ones", mism,
              checks);
    /* bad input: rows beyond the last forward */
    int32_t d[MDL_MAX_DRAFT];
    mdl_draft_seq bad = {
        .tokens = seq, .n_tokens = 5, .hid0 = 1000, .block_table = table, .n_blocks = NB};
    CHECK(mdl_draft(m, kv, &bad, 1, d) == DUET_ERR_INVALID);
    mdl_kv_destroy(m, kv);
    mdl_kv_destroy(m, kv2);
    mdl_destroy(m);
    be_destroy(be);
}

static int main_text(void) {
    g_root = tu_mkdtemp("spec-text");
    if (!g_root) return 1;
    snprintf(g_mtp_dir, sizeof g_mtp_dir, "%s/mtp", g_root);
    log_set_level(LOG_LEVEL_WARN);
    mk_spec s;
    mk_preset("tiny", &s);
    s.cfg.num_nextn_predict_layers = 1;
    s.cfg.n_routed_experts = 8;
    s.cfg.moe_intermediate_size = 64;
    s.tokenizer_dir = GOLDEN_DIR "/tokenizer";
    s.seed = 5;
    mk_spec_fit(&s);
    duet_status st = mk_write(&s, g_mtp_dir);
    CHECK_MSG(st == DUET_OK, "writing %s: %s", g_mtp_dir, duet_strerror(st));
    par_options po;
    par_options_init(&po);
    po.spec_tokens = 3;
    int argc = 0;
    char **argv = NULL;
    tok_tokenizer *tok = NULL;
    if (st != DUET_OK || par_instance_create(&po, g_mtp_dir, &argc, &argv, &g_inst) != DUET_OK ||
        tok_load(g_mtp_dir, &tok) != DUET_OK)
        return 1;
    stop_strings(tok);
    tok_destroy(tok);
    par_instance_destroy(g_inst);
    tu_rmtree(g_root);
    free(g_root);
    CHECK_DONE();
}

static int make_models(void) {
    for (int mtp = 0; mtp < 2; mtp++) {
        mk_spec s;
        mk_preset("tiny", &s);
        s.cfg.vocab_size = VOCAB;
        s.cfg.n_routed_experts = 8;
        s.cfg.moe_intermediate_size = 64;
        s.cfg.num_nextn_predict_layers = mtp;
        s.seed = 11;
        mk_spec_fit(&s);
        const char *dir = mtp ? g_mtp_dir : g_plain_dir;
        duet_status st = mk_write(&s, dir);
        CHECK_MSG(st == DUET_OK, "writing %s: %s", dir, duet_strerror(st));
        if (st != DUET_OK) return -1;
    }
    return 0;
}

/* argument "chi": the chi-square test alone; "text": stop strings on a checkpoint with
 * DeepSeek's tokenizer (a process of its own: one instance per process) */
int main(int argc_, char **argv_) {
    bool chi_only = argc_ > 1 && !strcmp(argv_[1], "chi");
    if (argc_ > 1 && !strcmp(argv_[1], "text")) return main_text();
    g_root = tu_mkdtemp("spec");
    if (!g_root) return 1;
    snprintf(g_mtp_dir, sizeof g_mtp_dir, "%s/mtp", g_root);
    snprintf(g_plain_dir, sizeof g_plain_dir, "%s/plain", g_root);
    log_set_level(LOG_LEVEL_WARN);
    if (make_models() != 0) return 1;
    refusals();
    module_cache();

    par_options po;
    par_options_init(&po);
    po.spec_tokens = 3;
    int argc = 0;
    char **argv = NULL;
    if (par_instance_create(&po, g_mtp_dir, &argc, &argv, &g_inst) != DUET_OK) return 1;
    /* the engine may not ask for more drafts than the module was loaded for */
    eng_config c;
    eng_config_default(&c);
    c.spec_tokens = 4;
    eng_engine *e = NULL;
    CHECK(eng_create(&c, g_inst, NULL, &e) == DUET_ERR_INVALID && !e);

    const scenario scs[] = {
        {"batched", 4096, 16, 256, true, false, false, 0},
        {"chunked", 7, 16, 256, true, false, false, 2},
        {"stops", 4096, 16, 256, false, false, true, 1}, /* after "batched": its outputs */
        {"preemption", 48, 16, 8, true, false, false, 0},
        {"prefix", 64, 8, 256, true, true, false, 3},
    };
    for (int i = 0; !chi_only && i < (int)(sizeof scs / sizeof scs[0]); i++)
        scenario_all(&scs[i], 1 + i % MDL_MAX_DRAFT, false);
    if (!chi_only) scenario_all(&scs[0], 2, true);
    chi_square();
    par_instance_destroy(g_inst);
    tu_rmtree(g_root);
    free(g_root);
    CHECK_DONE();
}
