/* Cross-backend op test: every op of be_ops on the CPU reference and on CUDA (bf16 and float32
 * activations) with the same fresh random inputs, compared by relative L2 error per op. GPU
 * outputs are poisoned with NaN first, so an element the kernel never wrote fails the op.
 * Inputs are bf16-exact, so both backends start from identical values and the error measured
 * is the op's own. Exit 77 (skip) without a CUDA device. DUET_TEST_SEED fixes the inputs. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model/backends/registry.h"
#include "model/backend.h"
#include "check.h"
#include "model/backends/cuda/backend_cuda.h"

enum { CPU = 0, GPU = 1 };

typedef struct tb {
    be_backend *be[2];
    dt_dtype dt;
    double tol;
    int failed;
} tb;

static uint64_t g_rng;

static uint64_t rnd(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return g_rng;
}

/* uniform in [-a, a], rounded to bf16 so both backends see the same value */
static float urand(float a) {
    float u = ((float)(rnd() >> 40) / 16777216.0f * 2.0f - 1.0f) * a;
    return dt_bf16_to_f32(dt_f32_to_bf16(u));
}

static float *rand_vec(size_t n, float a) {
    float *v = malloc((n ? n : 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) v[i] = urand(a);
    return v;
}

/* a buffer on each backend holding host (or NaN on the GPU side when poison) */
typedef struct pbuf {
    void *b[2];
    size_t n;
} pbuf;

static pbuf pbuf_new(tb *t, const float *host, size_t n, bool poison) {
    pbuf p = {{NULL, NULL}, n};
    for (int k = 0; k < 2; k++) {
        p.b[k] = t->be[k]->ops->buf_alloc(t->be[k], n);
        if (k == GPU && poison) {
            float *nan = malloc(n * sizeof(float));
            for (size_t i = 0; i < n; i++) nan[i] = NAN;
            t->be[k]->ops->upload(t->be[k], p.b[k], 0, nan, n);
            free(nan);
        } else if (host) {
            t->be[k]->ops->upload(t->be[k], p.b[k], 0, host, n);
        } else {
            t->be[k]->ops->zero(t->be[k], p.b[k], n);
        }
    }
    return p;
}

static void pbuf_free(tb *t, pbuf *p) {
    for (int k = 0; k < 2; k++) t->be[k]->ops->buf_free(t->be[k], p->b[k]);
}

static float *download(tb *t, int k, const void *buf, size_t n) {
    float *h = malloc((n ? n : 1) * sizeof(float));
    duet_status st = t->be[k]->ops->download(t->be[k], h, buf, 0, n);
    CHECK_MSG(st == DUET_OK, "download on %s: %s", t->be[k]->ops->name, duet_strerror(st));
    return h;
}

/* Compares the two sides of p (or raw buffers) and reports the op. */
static void compare_raw(tb *t, const char *op, const void *cb, const void *gb, size_t n,
                        double tol) {
    float *ref = download(t, CPU, cb, n), *got = download(t, GPU, gb, n);
    double num = 0, den = 0;
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) {
            bad++;
            continue;
        }
        double d = (double)got[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    double err = den > 0 ? sqrt(num / den) : sqrt(num);
    bool ok = bad == 0 && err <= tol;
    printf("  %-22s %-5s rel_l2 %.3e  (tol %.0e)  %s%s\n", op, t->dt == DT_BF16 ? "bf16" : "f32",
           err, tol, ok ? "PASS" : "FAIL", bad ? "  <- unwritten/non-finite elements" : "");
    if (bad) printf("    %zu of %zu elements non-finite\n", bad, n);
    if (!ok) t->failed++;
    CHECK_MSG(ok, "%s (%s): rel_l2 %.3e, %zu non-finite", op, dt_name(t->dt), err, bad);
    free(ref);
    free(got);
}

static void compare(tb *t, const char *op, const pbuf *p, double tol) {
    compare_raw(t, op, p->b[CPU], p->b[GPU], p->n, tol);
}

typedef struct pweight {
    be_weight *w[2];
} pweight;

static pweight pweight_new(tb *t, int n_out, int n_in, float a, bool keep_f32) {
    pweight w;
    float *h = rand_vec((size_t)n_out * n_in, a);
    for (int k = 0; k < 2; k++) {
        duet_status st = t->be[k]->ops->weight_create(t->be[k], h, n_out, n_in, keep_f32, &w.w[k]);
        CHECK(st == DUET_OK);
    }
    free(h);
    return w;
}

static void pweight_free(tb *t, pweight *w) {
    for (int k = 0; k < 2; k++) t->be[k]->ops->weight_destroy(t->be[k], w->w[k]);
}

static void *vec_new(tb *t, int k, const float *v, int n) {
    void *d = NULL;
    CHECK(t->be[k]->ops->vec_create(t->be[k], v, n, &d) == DUET_OK);
    return d;
}

static void set_batch(tb *t, const be_batch *b) {
    for (int k = 0; k < 2; k++) CHECK(t->be[k]->ops->set_batch(t->be[k], b) == DUET_OK);
}

/* ---- simple ops ---- */

static void test_embed(tb *t) {
    int V = 50, D = 64, T = 24, row0 = 10;
    pweight tab = pweight_new(t, V, D, 1.0f, false);
    int32_t ids[24];
    for (int i = 0; i < T; i++) ids[i] = (int32_t)(rnd() % 75); /* some outside [10, 60) */
    pbuf out = pbuf_new(t, NULL, (size_t)T * D, true);
    for (int k = 0; k < 2; k++) t->be[k]->ops->embed(t->be[k], out.b[k], ids, T, tab.w[k], row0);
    compare(t, "embed", &out, 0);
    pbuf_free(t, &out);
    pweight_free(t, &tab);
}

static void test_linear(tb *t, bool keep_f32) {
    int T = 33, n_in = 96, n_out = 80, stride = 100;
    float *xh = rand_vec((size_t)T * stride, 1.0f);
    pbuf x = pbuf_new(t, xh, (size_t)T * stride, false);
    pweight w = pweight_new(t, n_out, n_in, 0.1f, keep_f32);
    pbuf y = pbuf_new(t, NULL, (size_t)T * n_out, true);
    for (int k = 0; k < 2; k++) t->be[k]->ops->linear(t->be[k], y.b[k], x.b[k], stride, T, w.w[k]);
    compare(t, keep_f32 ? "linear (f32 weight)" : "linear", &y, t->tol);
    pbuf_free(t, &x);
    pbuf_free(t, &y);
    pweight_free(t, &w);
    free(xh);
}

static void test_rmsnorm(tb *t) {
    int T = 7, D = 200, stride = 208;
    float *xh = rand_vec((size_t)T * stride, 2.0f), *wh = rand_vec((size_t)D, 1.0f);
    pbuf x = pbuf_new(t, xh, (size_t)T * stride, false);
    pbuf y = pbuf_new(t, xh, (size_t)T * stride, false); /* columns past D must stay */
    void *w[2] = {vec_new(t, CPU, wh, D), vec_new(t, GPU, wh, D)};
    for (int k = 0; k < 2; k++)
        t->be[k]->ops->rmsnorm(t->be[k], y.b[k], stride, x.b[k], stride, w[k], T, D, 1e-6f);
    compare(t, "rmsnorm", &y, t->tol);
    /* in place, as the model normalizes kva's latent part */
    for (int k = 0; k < 2; k++)
        t->be[k]->ops->rmsnorm(t->be[k], x.b[k], stride, x.b[k], stride, w[k], T, D - 8, 1e-6f);
    compare(t, "rmsnorm (in place)", &x, t->tol);
    for (int k = 0; k < 2; k++) t->be[k]->ops->buf_free(t->be[k], w[k]);
    pbuf_free(t, &x);
    pbuf_free(t, &y);
    free(xh);
    free(wh);
}

static void test_add_silu(tb *t) {
    size_t n = 1003;
    float *a = rand_vec(n, 1.0f), *b = rand_vec(n, 1.0f);
    pbuf y = pbuf_new(t, a, n, false), x = pbuf_new(t, b, n, false);
    for (int k = 0; k < 2; k++) t->be[k]->ops->add(t->be[k], y.b[k], x.b[k], n);
    compare(t, "add", &y, t->tol);
    pbuf_free(t, &y);
    pbuf_free(t, &x);
    free(a);
    free(b);

    int T = 9, I = 70;
    float *gh = rand_vec((size_t)T * 2 * I, 3.0f);
    pbuf gu = pbuf_new(t, gh, (size_t)T * 2 * I, false),
         out = pbuf_new(t, NULL, (size_t)T * I, true);
    for (int k = 0; k < 2; k++) t->be[k]->ops->silu_mul(t->be[k], out.b[k], gu.b[k], T, I);
    compare(t, "silu_mul", &out, t->tol);
    pbuf_free(t, &gu);
    pbuf_free(t, &out);
    free(gh);
}

static void test_rope(tb *t) {
    int T = 6, H = 3, nope = 16, R = 8, qk = nope + R;
    int32_t pos[6] = {0, 1, 7, 63, 130, 3001}, slot[6] = {0, 1, 2, 3, 4, 5};
    int32_t start[2] = {0, 6}, ctx[1] = {3002}, table[1] = {0};
    be_batch b = {.n_tokens = T,
                  .n_seqs = 1,
                  .token_pos = pos,
                  .token_slot = slot,
                  .seq_start = start,
                  .seq_ctx = ctx,
                  .block_table = table,
                  .max_blocks = 1};
    set_batch(t, &b);
    float *qh = rand_vec((size_t)T * H * qk, 1.0f);
    pbuf q = pbuf_new(t, qh, (size_t)T * H * qk, false);
    for (int k = 0; k < 2; k++) t->be[k]->ops->rope(t->be[k], q.b[k], T, H * qk, H, qk, nope, R);
    compare(t, "rope (heads)", &q, t->tol);
    for (int k = 0; k < 2; k++) t->be[k]->ops->rope(t->be[k], q.b[k], T, 40, 1, 0, 32, R);
    compare(t, "rope (shared key)", &q, t->tol);
    pbuf_free(t, &q);
    free(qh);
}

static void test_rows(tb *t) {
    int n_src = 40, D = 24, n = 17;
    float *sh = rand_vec((size_t)n_src * D, 1.0f), *dh = rand_vec((size_t)n_src * D, 1.0f);
    int32_t idx[17], perm[40];
    for (int i = 0; i < n_src; i++) perm[i] = i;
    for (int i = n_src - 1; i > 0; i--) {
        int j = (int)(rnd() % (uint64_t)(i + 1));
        int32_t tmp = perm[i];
        perm[i] = perm[j];
        perm[j] = tmp;
    }
    for (int i = 0; i < n; i++) idx[i] = perm[i]; /* distinct, for the scatter */
    pbuf src = pbuf_new(t, sh, (size_t)n_src * D, false);
    pbuf dst = pbuf_new(t, NULL, (size_t)n * D, true);
    for (int k = 0; k < 2; k++) t->be[k]->ops->gather_rows(t->be[k], dst.b[k], src.b[k], idx, n, D);
    compare(t, "gather_rows", &dst, 0);
    pbuf acc = pbuf_new(t, dh, (size_t)n_src * D, false);
    for (int k = 0; k < 2; k++)
        t->be[k]->ops->scatter_add_rows(t->be[k], acc.b[k], dst.b[k], idx, n, D);
    compare(t, "scatter_add_rows", &acc, t->tol);
    /* zero on a fresh copy: the rows past n stay as they were, exactly */
    pbuf z = pbuf_new(t, dh, (size_t)n_src * D, false);
    for (int k = 0; k < 2; k++) t->be[k]->ops->zero(t->be[k], z.b[k], (size_t)(n_src - 3) * D);
    compare(t, "zero", &z, 0);
    pbuf_free(t, &z);
    pbuf_free(t, &src);
    pbuf_free(t, &dst);
    pbuf_free(t, &acc);
    free(sh);
    free(dh);
}

/* ---- KV cache and attention ---- */

typedef struct mla_case {
    const char *name;
    int H, nope, R, v, L, bs, n_layers, layer;
    int n_seqs;
    int n_tok[8], pos0[8]; /* per sequence: new tokens and first position */
    /* bf16 only: the decode sequences must take the tensor-core kernel; split > 0 forces its
     * KV split count (0: the backend's choice) */
    bool want_tc;
    int split;
} mla_case;

static void test_mla(tb *t, const mla_case *mc) {
    int H = mc->H, nope = mc->nope, R = mc->R, v = mc->v, L = mc->L, bs = mc->bs;
    int kv_dim = L + R, ns = mc->n_seqs;
    /* blocks: every sequence's context, handed out in a scrambled order */
    int max_blocks = 0, n_blocks = 0;
    for (int s = 0; s < ns; s++) {
        int nb = (mc->pos0[s] + mc->n_tok[s] + bs - 1) / bs;
        max_blocks = nb > max_blocks ? nb : max_blocks;
        n_blocks += nb;
    }
    n_blocks += 3;
    int32_t *perm = malloc((size_t)n_blocks * sizeof(int32_t));
    for (int i = 0; i < n_blocks; i++) perm[i] = i;
    for (int i = n_blocks - 1; i > 0; i--) {
        int j = (int)(rnd() % (uint64_t)(i + 1));
        int32_t tmp = perm[i];
        perm[i] = perm[j];
        perm[j] = tmp;
    }
    int32_t *table = calloc((size_t)ns * max_blocks, sizeof(int32_t));
    for (int s = 0, at = 0; s < ns; s++) {
        int nb = (mc->pos0[s] + mc->n_tok[s] + bs - 1) / bs;
        for (int j = 0; j < nb; j++) table[s * max_blocks + j] = perm[at++];
    }
    be_kv *kv[2];
    for (int k = 0; k < 2; k++)
        CHECK(t->be[k]->ops->kv_create(t->be[k], n_blocks, mc->n_layers, bs, kv_dim, &kv[k]) ==
              DUET_OK);

    /* 1. history: every slot of every layer gets random latents through kv_write */
    int n_slots = n_blocks * bs;
    int32_t *all_pos = calloc((size_t)n_slots, sizeof(int32_t));
    int32_t *all_slot = malloc((size_t)n_slots * sizeof(int32_t));
    for (int i = 0; i < n_slots; i++) all_slot[i] = i;
    int32_t hstart[2] = {0, n_slots}, hctx[1] = {1}, htab[1] = {0};
    be_batch hb = {.n_tokens = n_slots,
                   .n_seqs = 1,
                   .token_pos = all_pos,
                   .token_slot = all_slot,
                   .seq_start = hstart,
                   .seq_ctx = hctx,
                   .block_table = htab,
                   .max_blocks = 1};
    set_batch(t, &hb);
    for (int l = 0; l < mc->n_layers; l++) {
        float *lat = rand_vec((size_t)n_slots * (kv_dim + 3), 1.0f);
        pbuf kva = pbuf_new(t, lat, (size_t)n_slots * (kv_dim + 3), false);
        for (int k = 0; k < 2; k++)
            t->be[k]->ops->kv_write(t->be[k], kv[k], l, kva.b[k], kv_dim + 3); /* strided */
        pbuf_free(t, &kva);
        free(lat);
    }
    size_t kv_n = (size_t)n_blocks * kv[0]->block_bytes / sizeof(float);
    char name[96];
    snprintf(name, sizeof name, "kv_write (%s)", mc->name);
    compare_raw(t, name, kv[CPU]->data, kv[GPU]->data, kv_n, 0);

    /* 2. the step: new tokens written at their slots, then attention */
    int T = 0;
    for (int s = 0; s < ns; s++) T += mc->n_tok[s];
    int32_t *pos = malloc((size_t)T * sizeof(int32_t)), *slot = malloc((size_t)T * sizeof(int32_t));
    int32_t start[9], ctx[8];
    start[0] = 0;
    for (int s = 0, i = 0; s < ns; s++) {
        for (int j = 0; j < mc->n_tok[s]; j++, i++) {
            pos[i] = mc->pos0[s] + j;
            slot[i] = table[s * max_blocks + pos[i] / bs] * bs + pos[i] % bs;
        }
        start[s + 1] = i;
        ctx[s] = mc->pos0[s] + mc->n_tok[s];
    }
    be_batch b = {.n_tokens = T,
                  .n_seqs = ns,
                  .token_pos = pos,
                  .token_slot = slot,
                  .seq_start = start,
                  .seq_ctx = ctx,
                  .block_table = table,
                  .max_blocks = max_blocks};
    set_batch(t, &b);
    float *kvah = rand_vec((size_t)T * kv_dim, 1.0f);
    pbuf kva = pbuf_new(t, kvah, (size_t)T * kv_dim, false);
    for (int k = 0; k < 2; k++)
        t->be[k]->ops->kv_write(t->be[k], kv[k], mc->layer, kva.b[k], kv_dim);
    snprintf(name, sizeof name, "kv_write step (%s)", mc->name);
    compare_raw(t, name, kv[CPU]->data, kv[GPU]->data, kv_n, 0);

    float *qh = rand_vec((size_t)T * H * (nope + R), 1.0f);
    pbuf q = pbuf_new(t, qh, (size_t)T * H * (nope + R), false);
    pweight kvb = pweight_new(t, H * (nope + v), L, 0.5f, false);
    pbuf out = pbuf_new(t, NULL, (size_t)T * H * v, true);
    float scale = 1.0f / sqrtf((float)(nope + R));
    CHECK(be_cuda_mla_tune(t->be[GPU], mc->split, 0) == DUET_OK);
    for (int k = 0; k < 2; k++)
        t->be[k]->ops->mla_attention(t->be[k], out.b[k], q.b[k], kv[k], mc->layer, kvb.w[k], H,
                                     nope, R, v, scale);
    be_cuda_mla_info info = {0};
    CHECK(be_cuda_mla_last(t->be[GPU], &info) == DUET_OK);
    CHECK(be_cuda_mla_tune(t->be[GPU], 0, 0) == DUET_OK);
    if (info.tensor_cores)
        snprintf(name, sizeof name, "mla_attention (%s; tc %d rows x %d groups, %d splits)",
                 mc->name, info.rows_per_block, info.n_groups, info.n_split);
    else
        snprintf(name, sizeof name, "mla_attention (%s)", mc->name);
    compare(t, name, &out, t->tol);
    if (t->dt == DT_BF16 && mc->want_tc) {
        CHECK_MSG(info.tensor_cores, "%s: the tensor-core decode kernel did not run", mc->name);
        if (!info.tensor_cores) t->failed++;
        if (mc->split > 0) CHECK_EQ_INT(info.n_split, mc->split);
    }

    pbuf_free(t, &kva);
    pbuf_free(t, &q);
    pbuf_free(t, &out);
    pweight_free(t, &kvb);
    for (int k = 0; k < 2; k++) t->be[k]->ops->kv_destroy(t->be[k], kv[k]);
    free(perm);
    free(table);
    free(all_pos);
    free(all_slot);
    free(pos);
    free(slot);
    free(kvah);
    free(qh);
}

/* The decode path at DeepSeek's shapes (L 512, rope 64, nope 128, v 128): contexts of 1, 17,
 * 300 and 4100 positions over scrambled blocks, one and three query rows per sequence (causal
 * among them), V2-Lite's 16 heads and V3's 128 (and 32, V3 over TP 4), forced and chosen KV
 * splits, and prompt chunks (expanded form) between decode sequences in one batch. */
static void test_mla_decode(tb *t) {
    mla_case c = {.H = 16,
                  .nope = 128,
                  .R = 64,
                  .v = 128,
                  .L = 512,
                  .bs = 64,
                  .n_layers = 2,
                  .layer = 1,
                  .n_seqs = 4,
                  .n_tok = {1, 1, 1, 1},
                  .pos0 = {0, 16, 299, 4099},
                  .want_tc = true};
    c.name = "V2-Lite decode";
    test_mla(t, &c);
    c.name = "V2-Lite decode, 1 split";
    c.split = 1;
    test_mla(t, &c);
    c.name = "V2-Lite decode, 7 splits";
    c.split = 7;
    test_mla(t, &c);
    c.split = 0;
    c.name = "V2-Lite 3 rows";
    for (int s = 0; s < 4; s++) {
        c.n_tok[s] = 3;
        c.pos0[s] -= s ? 2 : 0; /* contexts 3, 17, 300, 4100 */
    }
    test_mla(t, &c);
    c.name = "V2-Lite mixed, 2 rows, chunk";
    c.n_seqs = 5;
    int tok_mix[5] = {1, 2, 20, 1, 2}, pos_mix[5] = {50, 7, 0, 1000, 4098};
    memcpy(c.n_tok, tok_mix, sizeof tok_mix);
    memcpy(c.pos0, pos_mix, sizeof pos_mix);
    test_mla(t, &c);

    mla_case v3 = c;
    v3.H = 128;
    v3.bs = 16; /* tiles of 32 positions straddle blocks */
    v3.n_layers = 1;
    v3.layer = 0;
    v3.n_seqs = 4;
    int tok1[4] = {1, 1, 1, 1}, pos1[4] = {0, 16, 299, 4099};
    memcpy(v3.n_tok, tok1, sizeof tok1);
    memcpy(v3.pos0, pos1, sizeof pos1);
    v3.name = "V3 128 heads decode";
    test_mla(t, &v3);
    v3.name = "V3 128 heads 3 rows";
    int tok3[4] = {3, 3, 3, 3}, pos3[4] = {0, 14, 297, 4097};
    memcpy(v3.n_tok, tok3, sizeof tok3);
    memcpy(v3.pos0, pos3, sizeof pos3);
    test_mla(t, &v3);
    v3.name = "V3 TP4 32 heads 2 rows, 5 splits";
    v3.H = 32;
    v3.split = 5;
    int tok2[4] = {2, 2, 2, 2}, pos2[4] = {0, 15, 298, 4098};
    memcpy(v3.n_tok, tok2, sizeof tok2);
    memcpy(v3.pos0, pos2, sizeof pos2);
    test_mla(t, &v3);
}

/* ---- MoE ---- */

static void test_route(tb *t, const char *name, be_route_params p, bool with_bias) {
    int T = 50, D = 96, E = p.n_experts, K = p.top_k;
    float *xh = rand_vec((size_t)T * D, 1.0f);
    pbuf x = pbuf_new(t, xh, (size_t)T * D, false);
    pweight gate = pweight_new(t, E, D, 0.1f, true);
    float *bh = rand_vec((size_t)E, 0.05f);
    void *bias[2] = {NULL, NULL};
    if (with_bias)
        for (int k = 0; k < 2; k++) bias[k] = vec_new(t, k, bh, E);
    int32_t *ids[2];
    float *w[2];
    for (int k = 0; k < 2; k++) {
        ids[k] = malloc((size_t)T * K * sizeof(int32_t));
        w[k] = malloc((size_t)T * K * sizeof(float));
        duet_status st =
            t->be[k]->ops->moe_route(t->be[k], x.b[k], T, gate.w[k], bias[k], &p, ids[k], w[k]);
        CHECK_MSG(st == DUET_OK, "moe_route on %s: %s", t->be[k]->ops->name, duet_strerror(st));
    }
    int mism = 0;
    double num = 0, den = 0;
    for (int i = 0; i < T; i++) {
        if (memcmp(ids[0] + i * K, ids[1] + i * K, (size_t)K * sizeof(int32_t)) != 0) {
            mism++;
            continue;
        }
        for (int k = 0; k < K; k++) {
            double d = (double)w[1][i * K + k] - w[0][i * K + k];
            num += d * d;
            den += (double)w[0][i * K + k] * w[0][i * K + k];
        }
    }
    double err = den > 0 ? sqrt(num / den) : 1.0;
    /* identical inputs and float32 logits on both sides: a flip needs a near-exact tie */
    bool ok = mism <= 1 && err <= 1e-5 && isfinite(err);
    printf("  %-22s %-5s weights rel_l2 %.3e, %d of %d tokens chose other experts  %s\n", name,
           t->dt == DT_BF16 ? "bf16" : "f32", err, mism, T, ok ? "PASS" : "FAIL");
    if (!ok) t->failed++;
    CHECK_MSG(ok, "%s: %d id mismatches, weights rel_l2 %.3e", name, mism, err);
    for (int k = 0; k < 2; k++) {
        free(ids[k]);
        free(w[k]);
        if (bias[k]) t->be[k]->ops->buf_free(t->be[k], bias[k]);
    }
    pbuf_free(t, &x);
    pweight_free(t, &gate);
    free(xh);
    free(bh);
}

static void test_experts(tb *t) {
    int T = 40, D = 64, K = 4, E = 16, e0 = 4, n_local = 8, I = 48;
    float *xh = rand_vec((size_t)T * D, 1.0f), *oh = rand_vec((size_t)T * D, 1.0f);
    pbuf x = pbuf_new(t, xh, (size_t)T * D, false), out = pbuf_new(t, oh, (size_t)T * D, false);
    int32_t *ids = malloc((size_t)T * K * sizeof(int32_t));
    float *w = malloc((size_t)T * K * sizeof(float));
    for (int i = 0; i < T; i++)
        for (int k = 0; k < K; k++) {
            int e, dup;
            do { /* distinct experts per token */
                e = (int)(rnd() % (uint64_t)E);
                dup = 0;
                for (int j = 0; j < k; j++) dup |= ids[i * K + j] == e;
            } while (dup);
            ids[i * K + k] = e;
            w[i * K + k] = 0.1f + (float)(rnd() % 1000) / 1000.0f;
        }
    pweight gu[8], dn[8];
    be_ffn f[2][8];
    for (int e = 0; e < n_local; e++) {
        gu[e] = pweight_new(t, 2 * I, D, 0.15f, false);
        dn[e] = pweight_new(t, D, I, 0.15f, false);
        for (int k = 0; k < 2; k++) f[k][e] = (be_ffn){gu[e].w[k], dn[e].w[k], I};
    }
    for (int k = 0; k < 2; k++)
        t->be[k]->ops->moe_experts(t->be[k], out.b[k], x.b[k], T, D, ids, w, K, f[k], e0, n_local);
    compare(t, "moe_experts", &out, t->tol);
    for (int e = 0; e < n_local; e++) {
        pweight_free(t, &gu[e]);
        pweight_free(t, &dn[e]);
    }
    pbuf_free(t, &x);
    pbuf_free(t, &out);
    free(ids);
    free(w);
    free(xh);
    free(oh);
}

static void run_all(tb *t) {
    float inv_freq[32];
    for (int i = 0; i < 32; i++) inv_freq[i] = powf(10000.0f, -2.0f * (float)i / 64.0f) * 0.7f;
    for (int k = 0; k < 2; k++) CHECK(t->be[k]->ops->rope_setup(t->be[k], inv_freq, 4, 1.2f) == 0);
    test_embed(t);
    test_linear(t, false);
    test_linear(t, true);
    test_rmsnorm(t);
    test_add_silu(t);
    test_rope(t);
    test_rows(t);
    /* decode (one token), prompt chunks from 0 and continuing, contexts past a 64-row tile */
    mla_case small = {.name = "small",
                      .H = 4,
                      .nope = 16,
                      .R = 8,
                      .v = 12,
                      .L = 32,
                      .bs = 4,
                      .n_layers = 2,
                      .layer = 1,
                      .n_seqs = 6,
                      .n_tok = {7, 1, 5, 1, 1, 70},
                      .pos0 = {0, 9, 6, 0, 149, 10}};
    test_mla(t, &small);
    for (int k = 0; k < 2; k++) CHECK(t->be[k]->ops->rope_setup(t->be[k], inv_freq, 32, 1.0f) == 0);
    mla_case big = {.name = "V3 head dims",
                    .H = 2,
                    .nope = 128,
                    .R = 64,
                    .v = 128,
                    .L = 512,
                    .bs = 16,
                    .n_layers = 1,
                    .layer = 0,
                    .n_seqs = 3,
                    .n_tok = {1, 40, 1},
                    .pos0 = {300, 100, 5}};
    test_mla(t, &big);
    test_mla_decode(t);
    be_route_params v3 = {.n_experts = 64,
                          .top_k = 6,
                          .n_group = 8,
                          .topk_group = 3,
                          .scoring = CFG_SCORING_SIGMOID,
                          .method = CFG_TOPK_NOAUX_TC,
                          .norm_topk_prob = true,
                          .scale_after_norm = true,
                          .routed_scaling_factor = 2.5f};
    test_route(t, "moe_route (V3)", v3, true);
    be_route_params v2 = {.n_experts = 64,
                          .top_k = 6,
                          .n_group = 8,
                          .topk_group = 3,
                          .scoring = CFG_SCORING_SOFTMAX,
                          .method = CFG_TOPK_GROUP_LIMITED_GREEDY,
                          .norm_topk_prob = false,
                          .scale_after_norm = false,
                          .routed_scaling_factor = 16.0f};
    test_route(t, "moe_route (V2)", v2, false);
    be_route_params lite = v2;
    lite.method = CFG_TOPK_GREEDY;
    lite.n_group = 1;
    lite.topk_group = 1;
    lite.routed_scaling_factor = 1.0f;
    test_route(t, "moe_route (V2-Lite)", lite, false);
    test_experts(t);
}

int main(void) {
    if (be_cuda_device_count() < 1) {
        fprintf(stderr, "no CUDA device: skipped\n");
        return 77;
    }
    const char *seed = getenv("DUET_TEST_SEED");
    g_rng = seed ? strtoull(seed, NULL, 10) : (uint64_t)time(NULL) * 2654435761u;
    if (!g_rng) g_rng = 1;
    printf("seed %llu (DUET_TEST_SEED repeats it)\n", (unsigned long long)g_rng);
    int failed = 0;
    dt_dtype dts[2] = {DT_BF16, DT_F32};
    for (int i = 0; i < 2; i++) {
        tb t = {.dt = dts[i], .tol = dts[i] == DT_BF16 ? 1e-2 : 1e-5};
        CHECK(be_create("cpu", 0, &t.be[CPU]) == DUET_OK);
        duet_status st = be_cuda_create(0, dts[i], &t.be[GPU]);
        CHECK_MSG(st == DUET_OK, "be_cuda_create: %s", duet_strerror(st));
        if (st != DUET_OK) break;
        printf("cpu vs cuda, %s activations:\n", dts[i] == DT_BF16 ? "bf16" : "float32");
        run_all(&t);
        CHECK(t.be[GPU]->ops->sync(t.be[GPU]) == DUET_OK);
        failed += t.failed;
        be_destroy(t.be[CPU]);
        be_destroy(t.be[GPU]);
    }
    printf("%s: %d op checks failed\n", failed ? "FAIL" : "PASS", failed);
    CHECK_DONE();
}
