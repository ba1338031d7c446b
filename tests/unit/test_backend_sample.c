/* The host sampling rule of be_ops.sample (be_sample_host, also be_sample's fallback on the
 * CPU backend): Philox known answers, greedy ties, top-k/top-p/min-p cut-offs and the draw's
 * distribution. tests/gpu/test_sample.c holds the CUDA kernel to the same rule. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/backends/registry.h"
#include "model/backend.h"
#include "check.h"
#include "base/philox.h"

static int32_t draw(const float *l, int V, be_sample_row r) {
    float scratch[64];
    return be_sample_host(l, V, &r, scratch);
}

int main(void) {
    /* Random123's known-answer vector for Philox-4x32-10, counter and key zero */
    philox4 kat = philox4x32_10(0ull, 0ull);
    CHECK(kat.v[0] == 0x6627e8d5u && kat.v[1] == 0xe169c58du && kat.v[2] == 0xbc57ac4cu &&
          kat.v[3] == 0x9b00dbd8u);
    double u = philox_uniform(7, 9);
    CHECK(u >= 0.0 && u < 1.0);
    CHECK(philox_uniform(7, 9) == u && philox_uniform(7, 10) != u);

    /* greedy: the lowest id among equal maxima */
    float l[8] = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f, 1.9f, 0.0f, 2.0f};
    be_sample_row g = {.temperature = 0.0f, .top_p = 1.0f};
    CHECK_EQ_INT(draw(l, 8, g), 1);
    /* top-k 1 keeps only the maxima (ties kept), whatever the draw */
    for (uint64_t o = 0; o < 50; o++) {
        int32_t t =
            draw(l, 8,
                 (be_sample_row){
                     .temperature = 1.0f, .top_k = 1, .top_p = 1.0f, .seed = 3, .offset = o});
        CHECK(t == 1 || t == 3 || t == 7);
    }
    /* top-p: probabilities 0.5, 0.25, 0.125, 0.125 (logits log2 apart); p = 0.6 keeps the
     * first two (mass above the third is 0.75), p = 0.5 only the first */
    float q[4] = {0.0f, -logf(2.0f), -logf(4.0f), -logf(4.0f)};
    for (uint64_t o = 0; o < 200; o++) {
        be_sample_row r = {.temperature = 1.0f, .top_p = 0.6f, .seed = 11, .offset = o};
        CHECK(draw(q, 4, r) < 2);
        r.top_p = 0.5f;
        CHECK_EQ_INT(draw(q, 4, r), 0);
        /* min-p 0.3 of the best drops the 0.125s */
        r.top_p = 1.0f;
        r.min_p = 0.3f;
        CHECK(draw(q, 4, r) < 2);
    }
    /* the draw follows the softmax: chi-square over 20000 offsets, 3 degrees of freedom */
    int cnt[4] = {0};
    for (uint64_t o = 0; o < 20000; o++)
        cnt[draw(q, 4,
                 (be_sample_row){.temperature = 1.0f, .top_p = 1.0f, .seed = 5, .offset = o})]++;
    double p[4] = {0.5, 0.25, 0.125, 0.125}, chi = 0;
    for (int i = 0; i < 4; i++) chi += pow(cnt[i] - 20000 * p[i], 2) / (20000 * p[i]);
    CHECK_MSG(chi < 16.3, "chi-square %.2f", chi); /* p = 0.001 at 3 dof */

    /* the wrapper's fallback on the CPU backend gives the same token */
    be_backend *be;
    CHECK(be_create("cpu", 0, &be) == DUET_OK);
    void *dev = be->ops->buf_alloc(be, 2 * 8); /* two rows of logits [2, 8], both l */
    CHECK(dev != NULL);
    CHECK(be->ops->upload(be, dev, 0, l, 8) == DUET_OK);
    CHECK(be->ops->upload(be, dev, 8, l, 8) == DUET_OK);
    be_sample_row rows[2] = {g, {.temperature = 0.8f, .top_k = 3, .top_p = 0.9f, .seed = 1}};
    int32_t ids[2];
    CHECK(be_sample(be, dev, 2, 8, rows, ids) == DUET_OK);
    CHECK_EQ_INT(ids[0], 1);
    CHECK_EQ_INT(ids[1], draw(l, 8, rows[1]));
    be->ops->buf_free(be, dev);
    be_destroy(be);
    CHECK_DONE();
}
