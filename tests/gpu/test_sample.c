/* The CUDA sampling ops against the host rule (be_sample_host_row): both run the rule of
 * be_sample_row with the same arithmetic (model/sample_rule.h), so every row must give the
 * same token: greedy, temperature, top-k, top-p alone (DeepSeek's 0.95 at 0.6), min-p, mixes,
 * penalties with device slots counting across calls, min_tokens bans. Logprobs within 1e-3 of
 * the host and the same top-N; draws follow the rule's distribution (chi-square per mix over
 * 20000 offsets); the same call twice gives the same tokens. Results are poisoned before
 * every call. DUET_TEST_QUICK=1 (for compute-sanitizer) runs 16 rows, one call and two mixes
 * of 2000 draws. 'test_sample cpu' runs the same checks on the CPU backend's op (the unit suite
 * runs it, so the test's own expectations are checked without a GPU). Exit 77 without a CUDA
 * device. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model/backend.h"
#include "model/backends/registry.h"
#include "model/sample_rule.h"
#include "check.h"
#ifdef DUET_HAVE_CUDA
#include "model/backends/cuda/backend_cuda.h"
#endif
#include "base/philox.h"

static uint64_t g_rng;
static int g_quick;

static double urand(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (double)(g_rng >> 11) / 9007199254740992.0;
}

/* Normal-ish logits with a few tokens far ahead, like a language model's rows. */
static void fill_row(float *x, int V, int kind) {
    for (int i = 0; i < V; i++) {
        double g = urand() + urand() + urand() + urand() - 2.0; /* variance 1/3 */
        x[i] = (float)(g * (kind == 0 ? 10.0 : 3.5));
    }
    if (kind != 0)
        for (int j = 0; j < 12; j++) x[(int)(urand() * V)] += (float)(6.0 + 8.0 * urand());
}

/* Host copy of a penalty slot. */
typedef struct hslot {
    int32_t *counts;
    uint32_t *bits;
} hslot;

static void hslot_init(hslot *h, int V, const int32_t *prompt, int np, const int32_t *out, int no) {
    memset(h->counts, 0, (size_t)V * sizeof(int32_t));
    memset(h->bits, 0, (size_t)((V + 31) / 32) * sizeof(uint32_t));
    for (int i = 0; i < np; i++) h->bits[prompt[i] >> 5] |= 1u << (prompt[i] & 31);
    for (int i = 0; i < no; i++) h->counts[out[i]]++;
}

static void poison(be_sampler *s, int n) {
    for (int i = 0; i < n; i++) {
        s->out[i].token = -7;
        s->out[i].logprob = NAN;
        memset(&s->top[i], 0xff, sizeof s->top[i]);
    }
}

/* The row mixes of part 1. */
static void mix(be_sample_row *p, int r, int n_slots) {
    be_sample_row_init(p);
    p->logits_row = r;
    p->seed = 1000 + (uint64_t)r * 7919;
    p->offset = (uint64_t)r * 3;
    switch (r % 12) {
    case 0:
        break; /* greedy */
    case 1:
        p->temperature = 1.0f;
        break;
    case 2:
        p->temperature = 0.7f;
        p->top_k = 50;
        break;
    case 3:
        p->temperature = 0.6f;
        p->top_p = 0.95f; /* DeepSeek's recommendation */
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
        break;
    case 7:
        p->temperature = 1.3f;
        p->top_p = 0.9f;
        p->n_ban = 33; /* EOS and 32 stop ids held back by min_tokens */
        for (int j = 0; j < 33; j++) p->ban[j] = j * 97;
        break;
    case 8:
        p->temperature = 0.0f; /* greedy with penalties and bans */
        p->repetition_penalty = 1.2f;
        p->presence_penalty = 0.5f;
        p->n_ban = 2;
        p->ban[0] = 1;
        p->ban[1] = 2;
        break;
    default:
        p->temperature = 0.9f;
        p->top_p = 0.95f;
        p->repetition_penalty = 1.1f;
        p->frequency_penalty = 0.6f;
        p->presence_penalty = 0.3f;
        break;
    }
    if (r % 12 >= 8) p->slot = r % n_slots;
    p->n_logprobs = r % 5 == 0 ? 20 : r % 5 == 1 ? 0 : r % 5 == 2 ? 5 : -1;
}

static void batch(be_backend *be, const char *dn) {
    const int n = g_quick ? 16 : 64, V = 129280, n_slots = 64;
    float *h = malloc((size_t)n * V * sizeof(float)), *got = malloc((size_t)n * V * sizeof(float));
    for (int r = 0; r < n; r++) fill_row(h + (size_t)r * V, V, r % 3);
    void *dev = be->ops->buf_alloc(be, (size_t)n * V);
    CHECK(be->ops->upload(be, dev, 0, h, (size_t)n * V) == DUET_OK);
    /* what the device holds (bf16-rounded on a bf16 backend) is the host rule's input */
    CHECK(be->ops->download(be, got, dev, 0, (size_t)n * V) == DUET_OK);
    be_sampler *s;
    if (be_sampler_create(be, n, V, n_slots, &s) != DUET_OK) {
        CHECK(0);
        return;
    }
    void *scratch = malloc(be_sample_host_scratch(V));
    hslot hs[64];
    int32_t prompt[300], output[40];
    for (int k = 0; k < n_slots; k++) {
        hs[k].counts = malloc((size_t)V * sizeof(int32_t));
        hs[k].bits = malloc((size_t)((V + 31) / 32) * sizeof(uint32_t));
    }
    /* every slot: a prompt and an answer so far, made of the row's likely tokens so the
     * penalties move the choice */
    for (int k = 0; k < n_slots; k++) {
        const float *row = got + (size_t)k * V;
        int best = 0;
        for (int i = 1; i < V; i++) best = row[i] > row[best] ? i : best;
        for (int i = 0; i < 300; i++) prompt[i] = i < 3 ? best : (int32_t)(urand() * V);
        for (int i = 0; i < 40; i++) output[i] = i < 6 ? best : (int32_t)(urand() * V);
        hslot_init(&hs[k], V, prompt, 300, output, 40);
        CHECK(be_sampler_slot_init(be, s, k, prompt, 300, output, 40) == DUET_OK);
    }
    int bad = 0, greedy_bad = 0, lp_bad = 0, top_bad = 0, sampled = 0;
    double lp_err = 0;
    int32_t first[64];
    const int calls = g_quick ? 1 : 3;
    for (int call = 0; call < calls; call++) {
        for (int r = 0; r < n; r++) mix(&s->rows[r], r, n_slots);
        poison(s, n);
        CHECK(be_sample(be, s, dev, V, n, n) == DUET_OK);
        for (int r = 0; r < n; r++) {
            const be_sample_row *p = &s->rows[r];
            hslot *sl = p->slot >= 0 ? &hs[p->slot] : NULL;
            be_sample_out want;
            be_sample_top want_top;
            be_sample_host_row(got + (size_t)r * V, V, p, sl ? sl->counts : NULL,
                               sl ? sl->bits : NULL, scratch, &want, &want_top);
            int32_t t = s->out[r].token;
            CHECK_MSG(t >= 0 && t < V, "%s row %d: token %d", dn, r, t);
            if (t != want.token) {
                if (p->temperature < 1e-5f || p->top_k == 1) greedy_bad++;
                bad++;
                printf("    %s call %d row %d: gpu %d, host %d\n", dn, call, r, t, want.token);
            }
            sampled += p->temperature >= 1e-5f;
            if (call == 0) first[r] = t;
            if (p->n_logprobs >= 0) {
                double e = fabs((double)s->out[r].logprob - want.logprob);
                lp_err = e > lp_err ? e : lp_err;
                lp_bad += !(e <= 1e-3);
                for (int j = 0; j < p->n_logprobs; j++) {
                    top_bad += s->top[r].token[j] != want_top.token[j];
                    lp_bad += !(fabs((double)s->top[r].logprob[j] - want_top.logprob[j]) <= 1e-3);
                }
            }
        }
        /* the slots counted this call's tokens on the device as on the host: the next call's
         * penalties see them */
    }
    /* the same call again, slots reset as they were: the same tokens */
    for (int k = 0; k < n_slots; k++) {
        for (int i = 0; i < 300; i++) prompt[i] = (int32_t)(urand() * V);
        CHECK(be_sampler_slot_init(be, s, k, NULL, 0, NULL, 0) == DUET_OK);
    }
    for (int r = 0; r < n; r++) mix(&s->rows[r], r, n_slots);
    poison(s, n);
    CHECK(be_sample(be, s, dev, V, n, n) == DUET_OK);
    int repeat_bad = 0;
    for (int r = 0; r < n; r++)
        if (s->rows[r].slot < 0) repeat_bad += s->out[r].token != first[r];
    printf("  %-5s %d rows x %d calls of V %d: %d differ from the host rule (%d greedy), "
           "logprob max err %.2e (%d over 1e-3), %d top-N ids differ, %d repeats differ\n",
           dn, n, calls, V, bad, greedy_bad, lp_err, lp_bad, top_bad, repeat_bad);
    CHECK_EQ_INT(bad, 0);
    CHECK_EQ_INT(lp_bad, 0);
    CHECK_EQ_INT(top_bad, 0);
    CHECK_EQ_INT(repeat_bad, 0);
    CHECK(sampled > 0);
    for (int k = 0; k < n_slots; k++) {
        free(hs[k].counts);
        free(hs[k].bits);
    }
    be_sampler_destroy(be, s);
    be->ops->buf_free(be, dev);
    free(scratch);
    free(h);
    free(got);
}

/* The rule's distribution for one row (what the draw must follow): q[i] = mass of kept
 * token i over the kept total, computed by sorting as backend.h states the rule. */
static int cmp_desc(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return x > y ? -1 : x < y ? 1 : 0;
}

static void expected(const float *l, int W, const be_sample_row *r, const int32_t *counts,
                     const uint32_t *bits, double *q) {
    float z[64], srt[64];
    for (int i = 0; i < W; i++)
        z[i] = counts
                   ? smp_penalize(l[i], counts[i], (bits[i >> 5] >> (i & 31)) & 1,
                                  r->repetition_penalty, r->presence_penalty, r->frequency_penalty)
                   : l[i];
    for (int j = 0; j < r->n_ban; j++) z[r->ban[j]] = -INFINITY;
    float zmax = -INFINITY, lo = 1e-45f;
    for (int i = 0; i < W; i++) zmax = fmaxf(zmax, z[i]);
    for (int i = 0; i < W; i++) z[i] = smp_exp_neg((z[i] - zmax) * (1.0f / r->temperature));
    if (r->top_k > 0 && r->top_k < W) {
        memcpy(srt, z, sizeof(float) * (size_t)W);
        qsort(srt, (size_t)W, sizeof *srt, cmp_desc);
        lo = fmaxf(lo, srt[r->top_k - 1]);
    }
    if (r->top_p < 1.0f) {
        int n = 0;
        uint64_t total = 0, above = 0;
        for (int i = 0; i < W; i++)
            if (z[i] >= lo) {
                srt[n++] = z[i];
                total += smp_mass(z[i]);
            }
        qsort(srt, (size_t)n, sizeof *srt, cmp_desc);
        uint64_t limit = smp_top_p_limit(r->top_p, total);
        float keep = srt[0];
        for (int j = 0; j < n && above < limit; j++) {
            keep = srt[j];
            above += smp_mass(srt[j]);
        }
        lo = fmaxf(lo, keep);
    }
    if (r->min_p > 0) lo = fmaxf(lo, r->min_p);
    double total = 0;
    for (int i = 0; i < W; i++) total += z[i] >= lo ? (double)smp_mass(z[i]) : 0;
    for (int i = 0; i < W; i++) q[i] = z[i] >= lo ? (double)smp_mass(z[i]) / total : 0;
}

/* Chi-square bound at p = 1e-4 for k degrees of freedom (Wilson-Hilferty): ten such checks a
 * run fail by chance once in a thousand runs. */
static double chi2_bound(int k) {
    double a = 2.0 / (9.0 * k);
    return k * pow(1.0 - a + 3.719 * sqrt(a), 3);
}

static void distributions(be_backend *be, const char *dn) {
    const int m = g_quick ? 2000 : 20000, W = 64;
    float base[64];
    /* logits within 3 of each other: every kept token expects a few dozen draws or more */
    for (int i = 0; i < W; i++) base[i] = (float)(urand() * 3.0 - 1.5);
    float *rep = malloc((size_t)m * W * sizeof(float)), got[64];
    for (int i = 0; i < m; i++) memcpy(rep + (size_t)i * W, base, sizeof base);
    void *dev = be->ops->buf_alloc(be, (size_t)m * W);
    CHECK(be->ops->upload(be, dev, 0, rep, (size_t)m * W) == DUET_OK);
    CHECK(be->ops->download(be, got, dev, 0, (size_t)W) == DUET_OK);
    be_sampler *s;
    if (be_sampler_create(be, m, W, m, &s) != DUET_OK) {
        CHECK(0);
        return;
    }
    int32_t prompt[4] = {3, 9, 27, 40}, output[5] = {9, 9, 12, 50, 3};
    int32_t counts[64] = {0};
    uint32_t bits[2] = {0};
    for (int i = 0; i < 4; i++) bits[prompt[i] >> 5] |= 1u << (prompt[i] & 31);
    for (int i = 0; i < 5; i++) counts[output[i]]++;
    const char *names[] = {"temperature 0.7", "top-p 0.8 only", "top-k 6", "min-p 0.2",
                           "top-p+penalties+bans"};
    for (int c = 0; c < 5; c++) {
        if (g_quick && c != 1 && c != 4) continue;
        for (int i = 0; i < m; i++) {
            be_sample_row *p = &s->rows[i];
            be_sample_row_init(p);
            p->logits_row = i;
            p->seed = 4242 + (uint64_t)c;
            p->offset = (uint64_t)i;
            p->temperature = c == 0 ? 0.7f : 1.0f;
            if (c == 1) p->top_p = 0.8f;
            if (c == 2) p->top_k = 6;
            if (c == 3) p->min_p = 0.2f;
            if (c == 4) {
                p->top_p = 0.9f;
                p->repetition_penalty = 1.5f;
                p->presence_penalty = 0.4f;
                p->frequency_penalty = 0.3f;
                p->n_ban = 2;
                p->ban[0] = 5;
                p->ban[1] = 6;
                p->slot = i; /* each row its own slot, all set up alike */
            }
        }
        if (c == 4)
            for (int i = 0; i < m; i++)
                CHECK(be_sampler_slot_init(be, s, i, prompt, 4, output, 5) == DUET_OK);
        poison(s, m);
        CHECK(be_sample(be, s, dev, W, m, m) == DUET_OK);
        double q[64], chi = 0;
        expected(got, W, &s->rows[0], c == 4 ? counts : NULL, c == 4 ? bits : NULL, q);
        int cnt[64] = {0}, outside = 0, kept = 0;
        for (int i = 0; i < m; i++) {
            int t = s->out[i].token;
            if (t < 0 || t >= W || q[t] == 0)
                outside++;
            else
                cnt[t]++;
        }
        for (int i = 0; i < W; i++)
            if (q[i] > 0) {
                double e = m * q[i];
                chi += (cnt[i] - e) * (cnt[i] - e) / e;
                kept++;
            }
        double bound = kept > 1 ? chi2_bound(kept - 1) : 0;
        printf("  %-5s %-22s %d draws: chi-square %.2f (%d dof, bound %.1f), %d outside the "
               "kept set\n",
               dn, names[c], m, chi, kept - 1, bound, outside);
        CHECK_EQ_INT(outside, 0);
        CHECK(kept <= 1 || chi < bound);
    }
    be_sampler_destroy(be, s);
    be->ops->buf_free(be, dev);
    free(rep);
}

int main(int argc, char **argv) {
    /* the generator itself: Random123's known-answer vector for Philox-4x32-10 */
    philox4 kat = philox4x32_10(0ull, 0ull);
    CHECK(kat.v[0] == 0x6627e8d5u && kat.v[1] == 0xe169c58du && kat.v[2] == 0xbc57ac4cu &&
          kat.v[3] == 0x9b00dbd8u);
    bool cpu = argc > 1 && !strcmp(argv[1], "cpu");
#ifdef DUET_HAVE_CUDA
    if (!cpu && be_cuda_device_count() < 1) {
#else
    if (!cpu) {
#endif
        fprintf(stderr, "no CUDA device: skipped\n");
        return g_check_failures ? 1 : 77;
    }
    g_quick = getenv("DUET_TEST_QUICK") && atoi(getenv("DUET_TEST_QUICK")) > 0;
    const char *seed = getenv("DUET_TEST_SEED");
    g_rng = seed ? strtoull(seed, NULL, 10) : (uint64_t)time(NULL) * 2654435761u;
    if (!g_rng) g_rng = 1;
    printf("seed %llu\n", (unsigned long long)g_rng);
    for (int k = 0; k < (cpu ? 1 : 2); k++) {
        be_backend *be = NULL;
        duet_status st;
        if (cpu) /* the same checks on the CPU backend's op: the test's own expectations */
            st = be_create("cpu", 0, &be);
        else
#ifdef DUET_HAVE_CUDA
            st = be_cuda_create(0, k ? DT_F32 : DT_BF16, &be);
#else
            st = DUET_ERR_UNSUPPORTED;
#endif
        if (st != DUET_OK) {
            CHECK(0);
            continue;
        }
        const char *dn = cpu ? "cpu" : k ? "f32" : "bf16";
        batch(be, dn);
        distributions(be, dn);
        be_destroy(be);
    }
    CHECK_DONE();
}
