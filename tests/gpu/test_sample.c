/* be_ops.sample on CUDA against the host rule (be_sample_host, the fallback of be_sample):
 * greedy rows must agree exactly; sampled rows must agree on nearly every draw (both sides
 * compute the same thresholds, but float summation order can move a boundary) and must never
 * pick a token the host rule drops; draws follow the distribution (chi-square over many
 * offsets); the same (seed, offset) gives the same token. Exit 77 without a CUDA device. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model/backend.h"
#include "check.h"
#include "model/backends/cuda/backend_cuda.h"
#include "base/philox.h"

static uint64_t g_rng;

static float urand(float a) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return ((float)(g_rng >> 40) / 16777216.0f * 2.0f - 1.0f) * a;
}

static void test_dtype(dt_dtype dt) {
    be_backend *be;
    if (be_cuda_create(0, dt, &be) != DUET_OK) {
        CHECK(0);
        return;
    }
    const char *dn = dt == DT_BF16 ? "bf16" : "f32";
    /* 1. a batch of rows of a DeepSeek-sized vocabulary, mixed parameters */
    int n = 48, V = 129280;
    float *h = malloc((size_t)n * V * sizeof(float)), *got = malloc((size_t)n * V * sizeof(float));
    float *scratch = malloc((size_t)V * 2 * sizeof(float));
    for (size_t i = 0; i < (size_t)n * V; i++) h[i] = urand(6.0f);
    void *dev = be->ops->buf_alloc(be, (size_t)n * V);
    CHECK(be->ops->upload(be, dev, 0, h, (size_t)n * V) == DUET_OK);
    /* what the device holds (bf16-rounded on a bf16 backend): the host rule's input */
    CHECK(be->ops->download(be, got, dev, 0, (size_t)n * V) == DUET_OK);
    be_sample_row *rows = calloc((size_t)n, sizeof *rows);
    for (int r = 0; r < n; r++) {
        be_sample_row *p = &rows[r];
        p->seed = 1000 + (uint64_t)r * 7919;
        p->offset = (uint64_t)r * 3;
        p->top_p = 1.0f;
        switch (r % 8) {
        case 0:
            p->temperature = 0.0f;
            break; /* greedy */
        case 1:
            p->temperature = 1.0f;
            break; /* plain */
        case 2:
            p->temperature = 0.7f;
            p->top_k = 50;
            break;
        case 3:
            p->temperature = 1.3f;
            p->top_p = 0.9f;
            break;
        case 4:
            p->temperature = 1.0f;
            p->min_p = 0.05f;
            break;
        case 5:
            p->temperature = 0.8f;
            p->top_k = 200;
            p->top_p = 0.5f;
            p->min_p = 0.01f;
            break;
        case 6:
            p->temperature = 2.0f;
            p->top_k = 1;
            break; /* greedy by top-k */
        default:
            p->temperature = 0.5f;
            p->top_p = 0.1f;
            break;
        }
    }
    int32_t *ids = malloc((size_t)n * sizeof(int32_t)),
            *again = malloc((size_t)n * sizeof(int32_t));
    CHECK(be_sample(be, dev, n, V, rows, ids) == DUET_OK);
    CHECK(be_sample(be, dev, n, V, rows, again) == DUET_OK);
    int agree = 0, greedy_bad = 0, repeat_bad = 0;
    for (int r = 0; r < n; r++) {
        const float *row = got + (size_t)r * V;
        int32_t want = be_sample_host(row, V, &rows[r], scratch);
        if (ids[r] == want)
            agree++;
        else if (rows[r].temperature < 1e-5f || rows[r].top_k == 1)
            greedy_bad++;
        else
            printf("    row %d: gpu %d (logit %.4f), host %d (logit %.4f)\n", r, ids[r],
                   ids[r] >= 0 && ids[r] < V ? row[ids[r]] : NAN, want, row[want]);
        if (ids[r] != again[r]) repeat_bad++;
    }
    printf("  %-5s %d rows of %d: %d agree with the host rule, %d greedy mismatches, %d "
           "repeats differ\n",
           dn, n, V, agree, greedy_bad, repeat_bad);
    CHECK_EQ_INT(greedy_bad, 0);
    CHECK_EQ_INT(repeat_bad, 0);
    CHECK(agree >= n - 1);

    /* 2. distribution: one small row drawn at 20000 offsets; top-k 5 of 8 */
    int m = 20000, W = 8;
    float logit8[8] = {1.0f, 0.5f, 0.0f, -0.5f, 2.0f, 1.5f, -1.0f, 0.25f};
    float *rep = malloc((size_t)m * W * sizeof(float));
    for (int i = 0; i < m; i++) memcpy(rep + (size_t)i * W, logit8, sizeof logit8);
    void *dev8 = be->ops->buf_alloc(be, (size_t)m * W);
    CHECK(be->ops->upload(be, dev8, 0, rep, (size_t)m * W) == DUET_OK);
    be_sample_row *r8 = calloc((size_t)m, sizeof *r8);
    for (int i = 0; i < m; i++)
        r8[i] = (be_sample_row){
            .temperature = 1.0f, .top_k = 5, .top_p = 1.0f, .seed = 42, .offset = (uint64_t)i};
    int32_t *d8 = malloc((size_t)m * sizeof(int32_t));
    CHECK(be_sample(be, dev8, m, W, r8, d8) == DUET_OK);
    int cnt[8] = {0};
    for (int i = 0; i < m; i++) cnt[d8[i] >= 0 && d8[i] < W ? d8[i] : 0]++;
    /* expected: softmax over the 5 largest (ids 4, 5, 0, 1, 7) */
    double z = 0, chi = 0;
    int keep[8] = {1, 1, 0, 0, 1, 1, 0, 1};
    for (int i = 0; i < W; i++) z += keep[i] ? exp(logit8[i]) : 0;
    int dropped = 0;
    for (int i = 0; i < W; i++) {
        if (!keep[i]) {
            dropped += cnt[i];
            continue;
        }
        double e = m * exp(logit8[i]) / z;
        chi += (cnt[i] - e) * (cnt[i] - e) / e;
    }
    /* 4 degrees of freedom: chi-square above 18.5 has probability 0.001 */
    printf("  %-5s 20000 draws: chi-square %.2f (4 dof), %d dropped tokens drawn\n", dn, chi,
           dropped);
    CHECK_EQ_INT(dropped, 0);
    CHECK(chi < 18.5);

    be->ops->buf_free(be, dev);
    be->ops->buf_free(be, dev8);
    be_destroy(be);
    free(h);
    free(got);
    free(scratch);
    free(rows);
    free(ids);
    free(again);
    free(rep);
    free(r8);
    free(d8);
}

int main(void) {
    /* the generator itself: Random123's known-answer vector for Philox-4x32-10 */
    philox4 kat = philox4x32_10(0ull, 0ull);
    CHECK(kat.v[0] == 0x6627e8d5u && kat.v[1] == 0xe169c58du && kat.v[2] == 0xbc57ac4cu &&
          kat.v[3] == 0x9b00dbd8u);
    if (be_cuda_device_count() < 1) {
        fprintf(stderr, "no CUDA device: skipped\n");
        return g_check_failures ? 1 : 77;
    }
    const char *seed = getenv("DUET_TEST_SEED");
    g_rng = seed ? strtoull(seed, NULL, 10) : (uint64_t)time(NULL) * 2654435761u;
    if (!g_rng) g_rng = 1;
    printf("seed %llu\n", (unsigned long long)g_rng);
    test_dtype(DT_BF16);
    test_dtype(DT_F32);
    CHECK_DONE();
}
