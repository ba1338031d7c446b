/* The CPU backend's fused ops against the unfused sequences they replace, bit for bit, in
 * float32 and in the bf16-emulating mode (whose rounding points are where the CUDA kernels
 * store): add_rmsnorm = add then rmsnorm; and be_add_rmsnorm's fallback (a table without the
 * op) gives the same. tests/gpu/test_backend_ops.c holds the CUDA kernels to these ops. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "model/backend.h"
#include "model/backends/registry.h"

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;

static float urand(float a) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return ((float)(g_rng >> 40) / 16777216.0f * 2.0f - 1.0f) * a;
}

static float *rand_vec(size_t n, float a) {
    float *v = malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) v[i] = urand(a);
    return v;
}

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
    float *hh = rand_vec(n, 3.0f), *xh = rand_vec(n, 3.0f), *wh = rand_vec((size_t)D, 1.5f);
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
        be_destroy(be);
    }
    CHECK_DONE();
}
