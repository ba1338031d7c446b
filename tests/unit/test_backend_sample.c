/* The host sampling rule (be_sample_host_row) and the sampling ops on the CPU backend: the
 * shared arithmetic (Philox known answers, the exponential against libm), the rule's radix
 * selection against the rule computed by sorting (same token for every row, seed and
 * parameter mix, ties included), the draw's distribution, penalties and bans against the
 * engine's reference sampler (smp_sample), logprobs against smp_logprobs, penalty slots
 * counting drawn tokens, and the CPU backend's op giving the same tokens as the fallback
 * through be_ops.download. tests/gpu/test_sample.c holds the CUDA kernel to the same rule. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/backends/registry.h"
#include "model/backend.h"
#include "model/sample_rule.h"
#include "check.h"
#include "base/philox.h"
#include "engine/sampler.h"

static uint64_t g_x = 0x9e3779b97f4a7c15ull;
static double urand(void) {
    g_x ^= g_x << 13;
    g_x ^= g_x >> 7;
    g_x ^= g_x << 17;
    return (double)(g_x >> 11) / 9007199254740992.0;
}

static void *g_scratch;
static int32_t draw(const float *l, int V, const be_sample_row *r) {
    be_sample_out o;
    be_sample_host_row(l, V, r, NULL, NULL, g_scratch, &o, NULL);
    return o.token;
}

static be_sample_row row_t(float t, uint64_t seed, uint64_t off) {
    be_sample_row r;
    be_sample_row_init(&r);
    r.temperature = t;
    r.seed = seed;
    r.offset = off;
    return r;
}

static int cmp_desc(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x > y ? -1 : x < y ? 1 : 0;
}

/* The rule of backend.h computed the obvious way, by sorting: what radix selection must give. */
static int32_t rule_by_sort(const float *l, int V, const be_sample_row *r, const int32_t *counts,
                            const uint32_t *bits) {
    float *z = malloc((size_t)V * sizeof *z), *srt = malloc((size_t)V * sizeof *srt);
    bool pen = counts && (r->presence_penalty != 0 || r->frequency_penalty != 0 ||
                          r->repetition_penalty != 1.0f);
    for (int i = 0; i < V; i++) {
        z[i] = smp_clean(l[i]);
        if (pen)
            z[i] = smp_penalize(z[i], counts[i], (bits[i >> 5] >> (i & 31)) & 1,
                                r->repetition_penalty, r->presence_penalty, r->frequency_penalty);
    }
    for (int j = 0; j < r->n_ban; j++) z[r->ban[j]] = -INFINITY;
    int best = 0;
    for (int i = 1; i < V; i++)
        if (z[i] > z[best]) best = i;
    int32_t tok = best;
    if (r->temperature >= 1e-5f && z[best] > -INFINITY) {
        float zmax = z[best], inv_t = 1.0f / r->temperature, keep_from = 0;
        for (int i = 0; i < V; i++) z[i] = smp_exp_neg((z[i] - zmax) * inv_t);
        float lo = 1e-45f; /* p > 0 */
        if (r->top_k > 0 && r->top_k < V) {
            memcpy(srt, z, (size_t)V * sizeof *srt);
            qsort(srt, (size_t)V, sizeof *srt, cmp_desc);
            lo = fmaxf(lo, srt[r->top_k - 1]);
        }
        if (r->top_p < 1.0f) {
            int n = 0;
            uint64_t total = 0;
            for (int i = 0; i < V; i++)
                if (z[i] >= lo) {
                    srt[n++] = z[i];
                    total += smp_mass(z[i]);
                }
            qsort(srt, (size_t)n, sizeof *srt, cmp_desc);
            uint64_t limit = smp_top_p_limit(r->top_p, total), above = 0;
            for (int j = 0; j < n;) { /* groups of equal p, most likely first */
                if (above >= limit) break;
                keep_from = srt[j];
                int k = j;
                while (k < n && srt[k] == srt[j]) above += smp_mass(srt[k++]);
                j = k;
            }
            lo = fmaxf(lo, keep_from);
        }
        if (r->min_p > 0) lo = fmaxf(lo, r->min_p);
        uint64_t total = 0, acc = 0;
        for (int i = 0; i < V; i++)
            if (z[i] >= lo) total += smp_mass(z[i]);
        if (total) {
            uint64_t target = smp_target(philox_uniform(r->seed, r->offset), total);
            for (int i = 0; i < V; i++) {
                if (z[i] < lo) continue;
                acc += smp_mass(z[i]);
                if (acc > target) {
                    tok = i;
                    break;
                }
            }
        }
    }
    free(z);
    free(srt);
    return tok;
}

static void shared_arithmetic(void) {
    /* Random123's known-answer vector for Philox-4x32-10, counter and key zero */
    philox4 kat = philox4x32_10(0ull, 0ull);
    CHECK(kat.v[0] == 0x6627e8d5u && kat.v[1] == 0xe169c58du && kat.v[2] == 0xbc57ac4cu &&
          kat.v[3] == 0x9b00dbd8u);
    double u = philox_uniform(7, 9);
    CHECK(u >= 0.0 && u < 1.0);
    CHECK(philox_uniform(7, 9) == u && philox_uniform(7, 10) != u);
    /* the exponential: within 2 ulp of libm's (double) over its range, exact at 0 */
    double worst = 0;
    for (int i = 0; i < 200000; i++) {
        float x = -(float)(urand() * 87.0);
        double want = exp((double)x), got = smp_exp_neg(x);
        double ulp = ldexp(1.0, ilogb(want) - 23);
        if (want >= 1.2e-38) worst = fmax(worst, fabs(got - want) / ulp);
    }
    CHECK_MSG(worst <= 2.0, "smp_exp_neg off by %.2f ulp", worst);
    CHECK(smp_exp_neg(0.0f) == 1.0f && smp_exp_neg(-100.0f) == 0.0f &&
          smp_exp_neg(-INFINITY) == 0.0f && smp_exp_neg(NAN) == 0.0f);
    /* keys order floats of any sign */
    CHECK(smp_key(-2.0f) < smp_key(-1.0f) && smp_key(-1.0f) < smp_key(0.0f) &&
          smp_key(0.0f) < smp_key(1e-30f) && smp_key(1e-30f) < smp_key(3.0f));
    CHECK(smp_mass(1.0f) == (1ull << 40) && smp_mass(0.0f) == 0);
}

static void rule_basics(void) {
    /* greedy: the lowest id among equal maxima */
    float l[8] = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f, 1.9f, 0.0f, 2.0f};
    be_sample_row g = row_t(0.0f, 0, 0);
    CHECK_EQ_INT(draw(l, 8, &g), 1);
    /* top-k 1 keeps only the maxima (ties kept), whatever the draw */
    int seen[8] = {0};
    for (uint64_t o = 0; o < 300; o++) {
        be_sample_row r = row_t(1.0f, 3, o);
        r.top_k = 1;
        seen[draw(l, 8, &r)]++;
    }
    CHECK(seen[1] + seen[3] + seen[7] == 300 && seen[1] && seen[3] && seen[7]);
    /* top-p: probabilities 0.5, 0.25, 0.125, 0.125 (logits ln 2 apart); p = 0.6 keeps the
     * first two (mass above the third is 0.75), p = 0.5 only the first */
    float q[4] = {0.0f, -logf(2.0f), -logf(4.0f), -logf(4.0f)};
    for (uint64_t o = 0; o < 200; o++) {
        be_sample_row r = row_t(1.0f, 11, o);
        r.top_p = 0.6f;
        CHECK(draw(q, 4, &r) < 2);
        r.top_p = 0.5f;
        CHECK_EQ_INT(draw(q, 4, &r), 0);
        /* min-p 0.3 of the best drops the 0.125s */
        r.top_p = 1.0f;
        r.min_p = 0.3f;
        CHECK(draw(q, 4, &r) < 2);
        /* bans: never drawn, greedy or not */
        r.min_p = 0;
        r.n_ban = 2;
        r.ban[0] = 0;
        r.ban[1] = 2;
        int32_t t = draw(q, 4, &r);
        CHECK(t == 1 || t == 3);
    }
    /* everything banned: token 0, as the kernel */
    be_sample_row all = row_t(1.0f, 1, 1);
    all.n_ban = 4;
    for (int i = 0; i < 4; i++) all.ban[i] = i;
    CHECK_EQ_INT(draw(q, 4, &all), 0);
    /* the draw follows the softmax: chi-square over 20000 offsets, 3 degrees of freedom */
    int cnt[4] = {0};
    for (uint64_t o = 0; o < 20000; o++) {
        be_sample_row r = row_t(1.0f, 5, o);
        cnt[draw(q, 4, &r)]++;
    }
    double p[4] = {0.5, 0.25, 0.125, 0.125}, chi = 0;
    for (int i = 0; i < 4; i++) chi += pow(cnt[i] - 20000 * p[i], 2) / (20000 * p[i]);
    CHECK_MSG(chi < 16.3, "chi-square %.2f", chi); /* p = 0.001 at 3 dof */
}

/* Radix selection against sorting: random rows (some coarse, full of ties), random mixes. */
static void rule_vs_sort(void) {
    const int V = 3001, rows = 400;
    float *l = malloc((size_t)V * sizeof *l);
    int32_t *counts = calloc((size_t)V, sizeof *counts);
    uint32_t bits[(3001 + 31) / 32];
    int bad = 0, drawn_non_argmax = 0;
    for (int t = 0; t < rows; t++) {
        float scale = (float)(1.0 + 8.0 * urand());
        bool coarse = t % 3 == 0;
        for (int i = 0; i < V; i++) {
            float x = (float)((urand() * 2 - 1) * scale);
            l[i] = coarse ? roundf(x * 2) / 2 : x; /* coarse rows: many equal logits */
        }
        if (t % 17 == 0) l[t % V] = NAN;
        be_sample_row r = row_t((float)(0.3 + 1.5 * urand()), 1000 + (uint64_t)t, (uint64_t)t * 5);
        if (t % 4 == 1) r.top_k = 1 + (int)(urand() * 300);
        if (t % 4 == 2) r.top_p = (float)(0.05 + 0.94 * urand());
        if (t % 4 == 3) {
            r.top_k = 1 + (int)(urand() * 2000);
            r.top_p = (float)(0.5 + 0.5 * urand());
            r.min_p = (float)(0.1 * urand());
        }
        if (t % 5 == 0) r.min_p = (float)(0.5 * urand());
        if (t % 7 == 0) {
            r.n_ban = 3;
            for (int j = 0; j < 3; j++) r.ban[j] = (int32_t)(urand() * V);
        }
        bool pen = t % 6 == 0;
        if (pen) {
            memset(bits, 0, sizeof bits);
            for (int i = 0; i < V; i++) counts[i] = urand() < 0.01 ? 1 + (int)(urand() * 3) : 0;
            for (int i = 0; i < 40; i++) {
                int k = (int)(urand() * V);
                bits[k >> 5] |= 1u << (k & 31);
            }
            r.repetition_penalty = 1.3f;
            r.presence_penalty = 0.4f;
            r.frequency_penalty = 0.2f;
        }
        int32_t want = rule_by_sort(l, V, &r, pen ? counts : NULL, pen ? bits : NULL);
        be_sample_out o;
        be_sample_host_row(l, V, &r, pen ? counts : NULL, pen ? bits : NULL, g_scratch, &o, NULL);
        if (o.token != want) bad++;
        be_sample_row gr = r;
        gr.temperature = 0;
        drawn_non_argmax +=
            o.token != rule_by_sort(l, V, &gr, pen ? counts : NULL, pen ? bits : NULL);
    }
    CHECK_MSG(bad == 0, "%d of %d rows: radix selection and sorting chose differently", bad, rows);
    CHECK(drawn_non_argmax > rows / 4); /* the rows really were sampled */
    free(l);
    free(counts);
}

/* Penalties, bans and logprobs mean what the engine's reference sampler means. */
static void against_smp(void) {
    const int V = 8;
    float base[8] = {1.0f, 3.0f, 2.0f, 0.5f, 2.9f, -1.0f, 0.0f, 1.5f};
    int32_t prompt[1] = {1}, output[3] = {4, 4, 2};
    int32_t counts[8] = {0};
    uint32_t bits[1] = {0};
    for (int i = 0; i < 1; i++) bits[0] |= 1u << prompt[i];
    for (int i = 0; i < 3; i++) counts[output[i]]++;
    smp_params sp;
    smp_params_default(&sp);
    sp.repetition_penalty = 2.0f;
    sp.presence_penalty = 0.5f;
    sp.frequency_penalty = 0.25f;
    sp.temperature = 0.9f;
    sp.top_p = 0.8f;
    smp_scratch ss = {0};
    rng_state rng;
    rng_seed(&rng, 3);
    smp_history h = {prompt, 1, output, 3};
    /* the penalized logits smp_sample leaves behind */
    float pl[8];
    memcpy(pl, base, sizeof pl);
    smp_sample(&sp, &h, NULL, 0, pl, V, &rng, &ss);
    float z[8];
    for (int i = 0; i < V; i++)
        z[i] = smp_penalize(base[i], counts[i], (bits[0] >> i) & 1, 2.0f, 0.5f, 0.25f);
    for (int i = 0; i < V; i++) CHECK_NEAR(z[i], pl[i], 0);
    /* the distributions agree (distinct probabilities: top-p ties cannot differ) */
    int a[8] = {0}, b[8] = {0};
    const int N = 40000;
    be_sample_row r = row_t(0.9f, 77, 0);
    r.top_p = 0.8f;
    r.repetition_penalty = 2.0f;
    r.presence_penalty = 0.5f;
    r.frequency_penalty = 0.25f;
    r.n_ban = 1;
    r.ban[0] = 7;
    int32_t ban[1] = {7};
    for (int i = 0; i < N; i++) {
        int32_t cc[8];
        memcpy(cc, counts, sizeof cc);
        r.offset = (uint64_t)i;
        be_sample_out o;
        be_sample_host_row(base, V, &r, cc, bits, g_scratch, &o, NULL);
        a[o.token]++;
        CHECK(cc[o.token] == counts[o.token] + 1); /* the slot counted the token */
        memcpy(pl, base, sizeof pl);
        b[smp_sample(&sp, &h, ban, 1, pl, V, &rng, &ss)]++;
    }
    for (int i = 0; i < V; i++)
        CHECK_MSG(fabs((double)(a[i] - b[i]) / N) < 0.012, "token %d: %d vs %d", i, a[i], b[i]);
    CHECK_EQ_INT(a[7], 0);
    /* logprobs of the raw row, and the top 3 */
    be_sample_row lr = row_t(0.0f, 0, 0);
    lr.n_logprobs = 3;
    be_sample_out o;
    be_sample_top top;
    be_sample_host_row(base, V, &lr, NULL, NULL, g_scratch, &o, &top);
    float want_lp;
    smp_logprob want[3];
    smp_logprobs(base, V, o.token, 3, &want_lp, want, &ss);
    CHECK_NEAR(o.logprob, want_lp, 1e-5);
    for (int i = 0; i < 3; i++) {
        CHECK_EQ_INT(top.token[i], want[i].token);
        CHECK_NEAR(top.logprob[i], want[i].logprob, 1e-5);
    }
    /* ties among the top: lower id first */
    float tie[6] = {1.0f, 2.0f, 2.0f, 0.0f, 2.0f, 1.0f};
    lr.n_logprobs = 4;
    be_sample_host_row(tie, 6, &lr, NULL, NULL, g_scratch, &o, &top);
    CHECK(top.token[0] == 1 && top.token[1] == 2 && top.token[2] == 4 && top.token[3] == 0);
    smp_scratch_free(&ss);
}

/* The CPU backend's op against the fallback (the same rule through be_ops.download), with
 * penalty slots carried from call to call. */
static void ops(void) {
    be_backend *be;
    CHECK(be_create("cpu", 0, &be) == DUET_OK);
    const int V = 5000, n = 6, calls = 25;
    float *h = malloc((size_t)n * V * sizeof *h);
    void *dev = be->ops->buf_alloc(be, (size_t)n * V);
    be_ops no_sampler = *be->ops;
    no_sampler.sampler_create = NULL;
    no_sampler.sampler_destroy = NULL;
    no_sampler.sampler_slot_init = NULL;
    no_sampler.sample = NULL;
    no_sampler.on_device = true; /* so the fallback reads rows through be_ops.download */
    const be_ops *real = be->ops;
    be_sampler *s[2];
    int32_t prompt[5] = {1, 2, 3, 4, 5};
    for (int k = 0; k < 2; k++) {
        be->ops = k ? &no_sampler : real;
        CHECK(be_sampler_create(be, 8, V, 4, &s[k]) == DUET_OK);
        CHECK(be_sampler_slot_init(be, s[k], 2, prompt, 5, prompt, 2) == DUET_OK);
    }
    int differ = 0, sampled = 0;
    for (int c = 0; c < calls; c++) {
        for (size_t i = 0; i < (size_t)n * V; i++) h[i] = (float)(urand() * 8 - 4);
        be->ops = real;
        CHECK(be->ops->upload(be, dev, 0, h, (size_t)n * V) == DUET_OK);
        for (int k = 0; k < 2; k++) {
            be->ops = k ? &no_sampler : real;
            for (int i = 0; i < n; i++) {
                be_sample_row *r = &s[k]->rows[i];
                *r = row_t(i == 0 ? 0.0f : 0.8f, 42 + (uint64_t)i, (uint64_t)c);
                r->logits_row = n - 1 - i;
                r->top_p = i % 2 ? 0.9f : 1.0f;
                r->top_k = i == 3 ? 40 : 0;
                r->n_logprobs = i == 4 ? 5 : -1;
                if (i == 5) {
                    r->slot = 2;
                    r->frequency_penalty = 2.0f; /* repeats get rare */
                    r->repetition_penalty = 1.5f;
                }
            }
            CHECK(be_sample(be, s[k], dev, V, n, n) == DUET_OK);
        }
        for (int i = 0; i < n; i++) {
            differ += s[0]->out[i].token != s[1]->out[i].token;
            sampled += s[0]->out[i].token != s[0]->out[0].token;
        }
        CHECK_NEAR(s[0]->out[4].logprob, s[1]->out[4].logprob, 0);
        CHECK(!memcmp(&s[0]->top[4], &s[1]->top[4], sizeof s[0]->top[4]));
        CHECK(s[0]->top[4].logprob[0] >= s[0]->top[4].logprob[4]);
    }
    CHECK_MSG(differ == 0, "%d tokens differ between the op and the fallback", differ);
    CHECK(sampled > 0);
    /* bad rows are refused before anything runs */
    be->ops = real;
    s[0]->rows[0].logits_row = n;
    CHECK(be_sample(be, s[0], dev, V, n, 1) == DUET_ERR_INVALID);
    s[0]->rows[0].logits_row = 0;
    s[0]->rows[0].slot = 1;
    s[0]->rows[1] = s[0]->rows[0];
    CHECK(be_sample(be, s[0], dev, V, n, 2) == DUET_ERR_INVALID); /* one slot, two rows */
    for (int k = 0; k < 2; k++) {
        be->ops = k ? &no_sampler : real;
        be_sampler_destroy(be, s[k]);
    }
    be->ops = real;
    be->ops->buf_free(be, dev);
    be_destroy(be);
    free(h);
}

int main(void) {
    g_scratch = malloc(be_sample_host_scratch(5000));
    shared_arithmetic();
    rule_basics();
    rule_vs_sort();
    against_smp();
    ops();
    free(g_scratch);
    CHECK_DONE();
}
