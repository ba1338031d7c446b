/* The CPU backend's fused ops against the unfused sequences they replace, bit for bit, in
 * float32 and in the bf16-emulating mode (whose rounding points are where the CUDA kernels
 * store): add_rmsnorm = add then rmsnorm, rope_kv_write = rope then kv_write; and the
 * wrappers' fallbacks (a table without the op) give the same. tests/gpu/test_backend_ops.c holds
 * the CUDA kernels to these ops. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#define XS_SEED 0x9e3779b97f4a7c15ull
#include "optest.h"
#include "model/backend.h"
#include "model/backends/registry.h"

/* a backend buffer holding host[n] */
static void *buf(be_backend *be, const float *host, size_t n) {
    void *b = be->ops->buf_alloc(be, n);
    CHECK(b && be->ops->upload(be, b, 0, host, n) == DUET_OK);
    return b;
}

static bool same(be_backend *be, const void *a, const void *b, size_t n) {
    float *ha = malloc(n * sizeof(float)), *hb = malloc(n * sizeof(float));
    CHECK(be->ops->download(be, ha, a, 0, n) == DUET_OK);
    CHECK(be->ops->download(be, hb, b, 0, n) == DUET_OK);
    bool eq = memcmp(ha, hb, n * sizeof(float)) == 0;
    free(ha);
    free(hb);
    return eq;
}

/* The fused op (and the wrapper's fallback when fallback) against add + rmsnorm. */
static void test_add_rmsnorm(be_backend *be, int T, int D, bool fallback) {
    size_t n = (size_t)T * D;
    float *hh = xs_vec(n, 3.0f), *xh = xs_vec(n, 3.0f), *wh = xs_vec((size_t)D, 1.5f);
    void *w = NULL;
    CHECK(be->ops->vec_create(be, wh, D, &w) == DUET_OK);
    void *h1 = buf(be, hh, n), *h2 = buf(be, hh, n), *x = buf(be, xh, n);
    void *o1 = be->ops->buf_alloc(be, n), *o2 = be->ops->buf_alloc(be, n);
    be->ops->add(be, h1, x, n);
    be->ops->rmsnorm(be, o1, D, h1, D, w, T, D, 1e-6f);
    const be_ops *keep = be->ops;
    be_ops plain = *keep;
    plain.add_rmsnorm = NULL;
    if (fallback) be->ops = &plain;
    be_add_rmsnorm(be, o2, h2, x, w, T, D, 1e-6f);
    be->ops = keep;
    CHECK(be->ops->sync(be) == DUET_OK);
    CHECK_MSG(same(be, h1, h2, n), "add_rmsnorm %dx%d (%s): residual differs", T, D,
              fallback ? "fallback" : "op");
    CHECK_MSG(same(be, o1, o2, n), "add_rmsnorm %dx%d (%s): output differs", T, D,
              fallback ? "fallback" : "op");
    /* and the op did something: the output is the normalized sum, not a copy of either */
    CHECK(!same(be, o2, h2, n) && !same(be, h2, x, n));
    void *bufs[] = {h1, h2, x, o1, o2, w};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) be->ops->buf_free(be, bufs[i]);
    free(hh);
    free(xh);
    free(wh);
}

/* rope_kv_write (op, or the wrapper's fallback) against rope then kv_write: kva's columns
 * and the whole cache, T tokens at scrambled slots and positions. */
static void test_rope_kv_write(be_backend *be, int T, int L, int R, bool fallback) {
    int kv_dim = L + R, stride = kv_dim + 3, bs = 4, n_blocks = T / bs + 2, n_slots = n_blocks * bs;
    be_kv *kv[2];
    for (int k = 0; k < 2; k++)
        CHECK(be->ops->kv_create(be, n_blocks, 2, bs, kv_dim, be->ops->act_dtype, &kv[k]) ==
              DUET_OK);
    size_t kv_n = (size_t)n_blocks * kv[0]->block_bytes / sizeof(float);
    float *fill = xs_vec(kv_n, 1.0f);
    for (int k = 0; k < 2; k++) memcpy(kv[k]->data, fill, kv_n * sizeof(float)); /* host caches */
    int32_t *pos = malloc((size_t)T * sizeof(int32_t)), *slot = malloc((size_t)T * sizeof(int32_t));
    for (int i = 0; i < T; i++) {
        pos[i] = 1 + (int32_t)((xs_uniform(1.0f) + 1.0f) * 2000.0f);
        slot[i] = (int32_t)((i * 7 + 3) % n_slots); /* distinct: 7 is prime to n_slots here */
    }
    bt_seq1 b;
    CHECK(be->ops->set_batch(be, bt_seq1_init(&b, T, pos, slot, 4002)) == DUET_OK);
    float *kh = xs_vec((size_t)T * stride, 1.0f);
    void *k1 = buf(be, kh, (size_t)T * stride), *k2 = buf(be, kh, (size_t)T * stride);
    be->ops->rope(be, k1, T, stride, 1, 0, L, R);
    be->ops->kv_write(be, kv[0], 1, k1, stride);
    const be_ops *keep = be->ops;
    be_ops plain = *keep;
    plain.rope_kv_write = NULL;
    if (fallback) be->ops = &plain;
    be_rope_kv_write(be, kv[1], 1, k2, T, stride, L, R);
    be->ops = keep;
    CHECK(be->ops->sync(be) == DUET_OK);
    CHECK_MSG(same(be, k1, k2, (size_t)T * stride), "rope_kv_write %dx%d (%s): kva differs", T,
              kv_dim, fallback ? "fallback" : "op");
    CHECK_MSG(memcmp(kv[0]->data, kv[1]->data, kv_n * sizeof(float)) == 0,
              "rope_kv_write %dx%d (%s): cache differs", T, kv_dim, fallback ? "fallback" : "op");
    /* and it wrote: the first token's row holds kva's latent columns and rotated rope ones */
    const float *row = (const float *)kv[1]->data +
                       (((size_t)(slot[0] / bs) * 2 + 1) * bs + (size_t)(slot[0] % bs)) * kv_dim;
    float *got = malloc((size_t)kv_dim * sizeof(float));
    CHECK(be->ops->download(be, got, k2, 0, (size_t)kv_dim) == DUET_OK);
    CHECK(memcmp(row, got, (size_t)kv_dim * sizeof(float)) == 0);
    CHECK(memcmp(row + L, kh + L, (size_t)R * sizeof(float)) != 0);
    free(got);
    be->ops->buf_free(be, k1);
    be->ops->buf_free(be, k2);
    for (int k = 0; k < 2; k++) be->ops->kv_destroy(be, kv[k]);
    free(fill);
    free(kh);
    free(pos);
    free(slot);
}

int main(void) {
    dt_dtype dts[2] = {DT_F32, DT_BF16};
    for (int i = 0; i < 2; i++) {
        be_backend *be = NULL;
        CHECK(be_create_dtype("cpu", 0, dts[i], &be) == DUET_OK);
        CHECK(be->ops->add_rmsnorm != NULL);
        int shapes[][2] = {{1, 2048}, {1, 7168}, {9, 200}, {3, 30}};
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
            test_add_rmsnorm(be, shapes[s][0], shapes[s][1], false);
            test_add_rmsnorm(be, shapes[s][0], shapes[s][1], true);
        }
        float inv_freq[32];
        for (int i = 0; i < 32; i++) inv_freq[i] = powf(10000.0f, -2.0f * (float)i / 64.0f);
        CHECK(be->ops->rope_setup(be, inv_freq, 32, 1.1f) == DUET_OK);
        CHECK(be->ops->rope_kv_write != NULL);
        for (int fb = 0; fb < 2; fb++) {
            test_rope_kv_write(be, 1, 512, 64, fb);
            test_rope_kv_write(be, 9, 64, 64, fb);
        }
        be_destroy(be);
    }
    CHECK_DONE();
}
