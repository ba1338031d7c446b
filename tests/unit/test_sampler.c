/* Sampling: greedy, temperature statistics, top-k / top-p / min-p supports, penalties, bans,
 * seeded reproducibility, logprobs. */
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

int main(void) {
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
