/* Sampling: greedy, temperature statistics, top-k / top-p / min-p supports, penalties, bans,
 * seeded reproducibility, logprobs; smp_logprobs (float, vectors, partial top-n selection)
 * against a double-precision log_softmax and a full sort, on vocabularies of every length mod
 * the vector width, with ties, -inf entries and large logits. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "engine/sampler.h"

#define V 8

static int draw(const smp_params *p, const float *base, rng_state *r, smp_scratch *s) {
    float l[V];
    memcpy(l, base, sizeof l);
    smp_history h = {0};
    return smp_sample(p, &h, NULL, 0, l, V, r, s);
}

/* the reference: double log-sum-exp, the top n by sorting everything */
static const float *g_ref_row;
static int ref_cmp(const void *a, const void *b) {
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    float x = g_ref_row[i], y = g_ref_row[j];
    if (x != y) return x > y ? -1 : 1;
    return i - j;
}

static void logprobs_against_reference(void) {
    enum { BIG = 129280, N_TOP = 20 };
    float *row = malloc(BIG * sizeof *row);
    int32_t *order = malloc(BIG * sizeof *order);
    smp_scratch s = {0};
    rng_state r;
    rng_seed(&r, 7);
    const int sizes[] = {1, 2, 3, 4, 5, 7, 8, 9, 31, 255, 256, 257, 1000, 2048, BIG};
    for (int si = 0; si < (int)(sizeof sizes / sizeof sizes[0]); si++) {
        int n_v = sizes[si];
        for (int kind = 0; kind < 4; kind++) {
            for (int i = 0; i < n_v; i++) {
                double u = rng_uniform(&r);
                if (kind == 0) row[i] = (float)(u * 20 - 10); /* spread logits */
                if (kind == 1) row[i] = (float)(int)(u * 5);  /* many ties */
                if (kind == 2) row[i] = (float)(u * 60 + 40); /* large, one far ahead */
                if (kind == 3) row[i] = u < 0.3 ? -INFINITY : (float)(u * 8); /* banned ones */
            }
            if (kind == 2) row[n_v / 2] = 300.0f;
            if (kind == 3) row[n_v - 1] = 1.0f; /* at least one finite */
            double mx = -INFINITY, sum = 0;
            for (int i = 0; i < n_v; i++) mx = row[i] > mx ? row[i] : mx;
            for (int i = 0; i < n_v; i++) sum += exp((double)row[i] - mx);
            double lse = mx + log(sum);
            for (int i = 0; i < n_v; i++) order[i] = i;
            g_ref_row = row;
            qsort(order, (size_t)n_v, sizeof *order, ref_cmp);
            int n = n_v < N_TOP ? n_v : N_TOP;
            int32_t tok = (int32_t)(rng_uniform(&r) * n_v);
            float lp = 0;
            smp_logprob top[N_TOP];
            smp_logprobs(row, n_v, tok, n, &lp, top, &s);
            double want = (double)row[tok] - lse;
            CHECK_MSG(isinf(want) ? lp == (float)want
                                  : fabs(lp - want) < 1e-5 * fmax(1, fabs(want)),
                      "V %d kind %d token %d: %.7g, want %.7g", n_v, kind, tok, lp, want);
            for (int i = 0; i < n; i++) {
                CHECK_MSG(top[i].token == order[i], "V %d kind %d top[%d]: %d, want %d (%g/%g)",
                          n_v, kind, i, top[i].token, order[i], row[top[i].token], row[order[i]]);
                double w = (double)row[order[i]] - lse;
                CHECK_MSG(isinf(w) ? top[i].logprob == (float)w
                                   : fabs(top[i].logprob - w) < 1e-5 * fmax(1, fabs(w)),
                          "V %d kind %d top[%d] logprob %.7g, want %.7g", n_v, kind, i,
                          top[i].logprob, w);
            }
        }
    }
    /* out-of-range token: -inf, the top still filled */
    float lp = 0;
    smp_logprob top[2];
    smp_logprobs(row, 9, 9, 2, &lp, top, &s);
    int best = 0;
    for (int i = 1; i < 9; i++) best = row[i] > row[best] ? i : best;
    CHECK(isinf(lp) && lp < 0 && top[0].token == best);
    smp_scratch_free(&s);
    free(row);
    free(order);
}

int main(void) {
    logprobs_against_reference();
    smp_scratch s = {0};
    rng_state r;
    rng_seed(&r, 42);
    smp_params p;
    smp_params_default(&p);
    float base[V] = {1.0f, 3.0f, 2.0f, 0.5f, 2.9f, -1.0f, 0.0f, 1.5f};

    /* greedy */
    p.temperature = 0;
    CHECK(draw(&p, base, &r, &s) == 1);

    /* temperature 1: empirical frequencies follow softmax */
    p.temperature = 1.0f;
    int counts[V] = {0};
    const int N = 200000;
    for (int i = 0; i < N; i++) counts[draw(&p, base, &r, &s)]++;
    double z = 0;
    for (int i = 0; i < V; i++) z += exp(base[i]);
    for (int i = 0; i < V; i++) CHECK_NEAR((double)counts[i] / N, exp(base[i]) / z, 0.01);

    /* top-k 2: only the two best */
    p.top_k = 2;
    for (int i = 0; i < 2000; i++) {
        int t = draw(&p, base, &r, &s);
        CHECK(t == 1 || t == 4);
    }
    p.top_k = 0;
    /* top-p: 3.0 and 2.9 hold about 0.55 of the mass: p=0.5 keeps just them */
    p.top_p = 0.5f;
    for (int i = 0; i < 2000; i++) {
        int t = draw(&p, base, &r, &s);
        CHECK(t == 1 || t == 4);
    }
    p.top_p = 1.0f;
    /* min-p 0.5: tokens within ln 2 of the best (3.0, 2.9, 2.0 is e^-1 = 0.37 -> out) */
    p.min_p = 0.5f;
    for (int i = 0; i < 2000; i++) {
        int t = draw(&p, base, &r, &s);
        CHECK(t == 1 || t == 4);
    }
    p.min_p = 0.0f;

    /* seeded: the same seed gives the same stream */
    rng_state r1, r2;
    rng_seed(&r1, 7);
    rng_seed(&r2, 7);
    for (int i = 0; i < 100; i++) CHECK(draw(&p, base, &r1, &s) == draw(&p, base, &r2, &s));

    /* bans (min_tokens holding back EOS): greedy never picks a banned token */
    p.temperature = 0;
    {
        float l[V];
        memcpy(l, base, sizeof l);
        int32_t ban[2] = {1, 4};
        smp_history h = {0};
        CHECK(smp_sample(&p, &h, ban, 2, l, V, &r, &s) == 2);
    }
    /* repetition penalty divides positive logits of seen tokens */
    {
        float l[V];
        memcpy(l, base, sizeof l);
        int32_t prompt[1] = {1};
        smp_history h = {prompt, 1, NULL, 0};
        p.repetition_penalty = 2.0f; /* 3.0 -> 1.5: token 4 (2.9) wins */
        CHECK(smp_sample(&p, &h, NULL, 0, l, V, &r, &s) == 4);
        CHECK_NEAR(l[1], 1.5, 1e-6);
        p.repetition_penalty = 1.0f;
    }
    /* presence / frequency penalties count output tokens only */
    {
        float l[V];
        memcpy(l, base, sizeof l);
        int32_t out[3] = {1, 1, 4};
        smp_history h = {NULL, 0, out, 3};
        p.presence_penalty = 0.5f;
        p.frequency_penalty = 0.25f;
        smp_sample(&p, &h, NULL, 0, l, V, &r, &s);
        CHECK_NEAR(l[1], 3.0 - 0.5 - 0.5, 1e-6);
        CHECK_NEAR(l[4], 2.9 - 0.5 - 0.25, 1e-6);
        CHECK_NEAR(l[2], 2.0, 1e-6);
        p.presence_penalty = p.frequency_penalty = 0;
    }
    /* logprobs */
    {
        float lp;
        smp_logprob top[3];
        smp_logprobs(base, V, 2, 3, &lp, top, &s);
        CHECK_NEAR(lp, 2.0 - log(z), 1e-5);
        CHECK(top[0].token == 1 && top[1].token == 4 && top[2].token == 2);
        CHECK_NEAR(top[0].logprob, 3.0 - log(z), 1e-5);
    }
    /* parameter validation */
    char err[128];
    smp_params bad = p;
    bad.top_p = 0;
    CHECK(smp_params_check(&bad, err, sizeof err) == DUET_ERR_INVALID && strstr(err, "top_p"));
    bad = p;
    bad.temperature = -1;
    CHECK(smp_params_check(&bad, err, sizeof err) == DUET_ERR_INVALID);
    CHECK(smp_params_check(&p, err, sizeof err) == DUET_OK);
    smp_scratch_free(&s);
    CHECK_DONE();
}
