/* Sampling; see sampler.h. Order of operations as vLLM applies them: penalties, bans
 * (min_tokens), then greedy or temperature -> top-k -> top-p -> min-p -> draw. */
#include "engine/sampler.h"

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void smp_params_default(smp_params *p) {
    p->temperature = 1.0f;
    p->top_k = 0;
    p->top_p = 1.0f;
    p->min_p = 0.0f;
    p->repetition_penalty = 1.0f;
    p->presence_penalty = 0.0f;
    p->frequency_penalty = 0.0f;
}

duet_status smp_params_check(const smp_params *p, char *err, size_t err_len) {
    const char *msg = NULL;
    if (!(p->temperature >= 0.0f) || !isfinite(p->temperature))
        msg = "temperature must be non-negative";
    else if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        msg = "top_p must be in (0, 1]";
    else if (p->top_k < -1)
        msg = "top_k must be -1 (disable), or at least 1";
    else if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        msg = "min_p must be in [0, 1]";
    else if (!(p->repetition_penalty > 0.0f) || !isfinite(p->repetition_penalty))
        msg = "repetition_penalty must be greater than zero";
    else if (!(p->presence_penalty >= -2.0f && p->presence_penalty <= 2.0f))
        msg = "presence_penalty must be in [-2, 2]";
    else if (!(p->frequency_penalty >= -2.0f && p->frequency_penalty <= 2.0f))
        msg = "frequency_penalty must be in [-2, 2]";
    if (!msg) return DUET_OK;
    snprintf(err, err_len, "%s", msg);
    return DUET_ERR_INVALID;
}

void smp_scratch_free(smp_scratch *s) {
    free(s->probs);
    free(s->idx);
    free(s->counts);
    free(s->seen);
    memset(s, 0, sizeof *s);
}

static int scratch_reserve(smp_scratch *s, int V) {
    if (V <= s->cap) return 0;
    smp_scratch_free(s);
    s->probs = malloc((size_t)V * sizeof *s->probs);
    s->idx = malloc((size_t)V * sizeof *s->idx);
    s->counts = calloc((size_t)V, sizeof *s->counts);
    s->seen = calloc((size_t)V, sizeof *s->seen);
    if (!s->probs || !s->idx || !s->counts || !s->seen) {
        smp_scratch_free(s);
        return -1;
    }
    s->cap = V;
    return 0;
}

static void apply_penalties(const smp_params *p, const smp_history *h, float *logits, int V,
                            smp_scratch *s) {
    bool rep = p->repetition_penalty != 1.0f;
    bool pf = p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f;
    if (!rep && !pf) return;
    /* counts/seen are left all-zero between calls: only touched entries are reset */
    for (int i = 0; i < h->n_output; i++) {
        int32_t t = h->output[i];
        if (t >= 0 && t < V) s->counts[t]++, s->seen[t] = 1;
    }
    if (rep)
        for (int i = 0; i < h->n_prompt; i++) {
            int32_t t = h->prompt[i];
            if (t >= 0 && t < V) s->seen[t] = 1;
        }
    for (int pass = 0; pass < 2; pass++) {
        const int32_t *toks = pass ? h->prompt : h->output;
        int n = pass ? h->n_prompt : h->n_output;
        for (int i = 0; i < n; i++) {
            int32_t t = toks[i];
            if (t < 0 || t >= V || !s->seen[t]) continue;
            if (rep)
                logits[t] = logits[t] > 0 ? logits[t] / p->repetition_penalty
                                          : logits[t] * p->repetition_penalty;
            if (s->counts[t] > 0)
                logits[t] -= p->frequency_penalty * (float)s->counts[t] + p->presence_penalty;
            s->seen[t] = 0; /* each token once */
            s->counts[t] = 0;
        }
    }
}

static int argmax(const float *x, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

static int cmp_desc(const void *a, const void *b, void *arg) {
    const float *p = arg;
    float x = p[*(const int32_t *)a], y = p[*(const int32_t *)b];
    if (x != y) return x > y ? -1 : 1;
    return *(const int32_t *)a - *(const int32_t *)b;
}

int smp_top_candidates(const float *v, int32_t *idx, int m, int n) {
    if (n >= m) {
        qsort_r(idx, (size_t)m, sizeof *idx, cmp_desc, (void *)v);
        return m;
    }
    /* quickselect the n-th largest, then sort the front */
    int lo = 0, hi = m - 1;
    while (lo < hi) {
        float pivot = v[idx[(lo + hi) / 2]];
        int i = lo, j = hi;
        while (i <= j) {
            while (v[idx[i]] > pivot) i++;
            while (v[idx[j]] < pivot) j--;
            if (i <= j) {
                int32_t t = idx[i];
                idx[i++] = idx[j];
                idx[j--] = t;
            }
        }
        if (n - 1 <= j)
            hi = j;
        else if (n - 1 >= i)
            lo = i;
        else
            break;
    }
    qsort_r(idx, (size_t)n, sizeof *idx, cmp_desc, (void *)v);
    return n;
}

int32_t smp_sample(const smp_params *p, const smp_history *h, const int32_t *banned, int n_banned,
                   float *logits, int V, rng_state *rng, smp_scratch *s) {
    if (scratch_reserve(s, V) != 0) return (int32_t)argmax(logits, V);
    apply_penalties(p, h, logits, V, s);
    for (int i = 0; i < n_banned; i++)
        if (banned[i] >= 0 && banned[i] < V) logits[banned[i]] = -INFINITY;
    if (p->temperature < 1e-5f) return (int32_t)argmax(logits, V);

    /* softmax at temperature over candidates: top-k narrows first */
    float inv_t = 1.0f / p->temperature;
    int m = V;
    for (int i = 0; i < V; i++) s->idx[i] = i;
    if (p->top_k > 0 && p->top_k < V)
        m = smp_top_candidates(logits, s->idx, V, p->top_k);
    else if (p->top_p < 1.0f)
        m = smp_top_candidates(logits, s->idx, V, V);
    float mx = -INFINITY;
    for (int i = 0; i < m; i++) mx = logits[s->idx[i]] > mx ? logits[s->idx[i]] : mx;
    double sum = 0;
    for (int i = 0; i < m; i++) {
        float e = expf((logits[s->idx[i]] - mx) * inv_t);
        s->probs[i] = e;
        sum += e;
    }
    /* top-p on the sorted candidates: smallest prefix with mass >= top_p */
    if (p->top_p < 1.0f) {
        double acc = 0;
        int keep = m;
        for (int i = 0; i < m; i++) {
            acc += s->probs[i] / sum;
            if (acc >= p->top_p) {
                keep = i + 1;
                break;
            }
        }
        m = keep;
        sum = 0;
        for (int i = 0; i < m; i++) sum += s->probs[i];
    }
    /* min-p: drop candidates below min_p times the most likely one */
    if (p->min_p > 0.0f) {
        float best = 0;
        for (int i = 0; i < m; i++) best = s->probs[i] > best ? s->probs[i] : best;
        double thr = (double)p->min_p * best;
        int w = 0;
        sum = 0;
        for (int i = 0; i < m; i++)
            if (s->probs[i] >= thr) {
                s->probs[w] = s->probs[i];
                s->idx[w++] = s->idx[i];
                sum += s->probs[i];
            }
        m = w;
    }
    double u = rng_uniform(rng) * sum, acc = 0;
    for (int i = 0; i < m; i++) {
        acc += s->probs[i];
        if (u < acc) return s->idx[i];
    }
    return s->idx[m - 1];
}

/* ---- log_softmax of a whole row (prompt logprobs: every row of a prompt chunk) ----
 * Float throughout, in 4-lane vectors (GCC/clang vector extensions, so the loops are vectors
 * at -O2 on any target: SSE2 on x86-64's baseline, NEON on arm64; wider vectors would change
 * the ABI of these helpers without AVX). The
 * exp is a polynomial (below); the sum runs in float lanes over blocks of EXP_BLOCK values and
 * adds the blocks up in double, so a 129k-entry vocabulary loses no more than a few ulps. */

typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
enum { LANES = 4, EXP_BLOCK = 256 };

static inline f32x4 load4(const float *p) {
    f32x4 v;
    memcpy(&v, p, sizeof v);
    return v;
}

#if !defined(__SSE__)
static inline f32x4 select4(i32x4 mask, f32x4 a, f32x4 b) {
    return (f32x4)(((i32x4)a & mask) | ((i32x4)b & ~mask));
}
#endif

static inline f32x4 splat4(float x) {
    return (f32x4){x, x, x, x};
}

/* e^x for x <= 0 (x = logit - max), relative error below 2e-7 down to -80; below -80 it is
 * e^-80 (1.8e-35), which no sum of a vocabulary's terms (the largest is 1) can notice.
 * e^x = 2^n e^r with n = round(x / ln 2) and |r| <= ln2 / 2: a degree-7 Taylor polynomial for
 * e^r, 2^n put into the exponent bits. */
static inline f32x4 exp4(f32x4 x) {
#if defined(__SSE__)
    x = __builtin_ia32_maxps(x, splat4(-80.0f));
#else
    x = select4(x < splat4(-80.0f), splat4(-80.0f), x);
#endif
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    f32x4 t = x * splat4(1.44269504088896341f) + splat4(shifter);
    i32x4 n = (i32x4)t - (i32x4)splat4(shifter);
    f32x4 nf = t - splat4(shifter);
    f32x4 r = x - nf * splat4(0.693145751953125f); /* ln 2, high part: exact in float */
    r = r - nf * splat4(1.428606765330187e-06f);   /* ln 2, the rest */
    f32x4 p = splat4(1.0f / 5040);
    p = p * r + splat4(1.0f / 720);
    p = p * r + splat4(1.0f / 120);
    p = p * r + splat4(1.0f / 24);
    p = p * r + splat4(1.0f / 6);
    p = p * r + splat4(0.5f);
    p = p * r + splat4(1.0f);
    p = p * r + splat4(1.0f);
    return (f32x4)((i32x4)p + (n << 23));
}

static float row_max(const float *x, int V) {
    int i = 0;
    float mx = -INFINITY;
    if (V >= LANES) {
        f32x4 m = load4(x);
        for (i = LANES; i + LANES <= V; i += LANES) {
            f32x4 v = load4(x + i);
#if defined(__SSE__)
            m = __builtin_ia32_maxps(m, v);
#else
            m = select4(v > m, v, m);
#endif
        }
        for (int l = 0; l < LANES; l++) mx = m[l] > mx ? m[l] : mx;
    }
    for (; i < V; i++) mx = x[i] > mx ? x[i] : mx;
    return mx;
}

/* sum of e^(x[i] - mx) */
static double row_sum_exp(const float *x, int V, float mx) {
    double sum = 0;
    f32x4 vmx = splat4(mx);
    int i = 0;
    while (i + LANES <= V) {
        int end = i + EXP_BLOCK <= V ? i + EXP_BLOCK : V;
        f32x4 acc = splat4(0.0f);
        for (; i + LANES <= end; i += LANES) acc += exp4(load4(x + i) - vmx);
        for (int l = 0; l < LANES; l++) sum += acc[l];
    }
    for (; i < V; i++) sum += exp((double)(x[i] - mx));
    return sum;
}

/* The n best of x (higher value first, the lower id on a tie) by one pass that keeps them in
 * a min-heap of n (its root the worst kept): a value enters only when it beats the root, which
 * after the first few thousand entries almost none does, and 4 values at a time are compared
 * with the root before any is looked at alone. No sort of the vocabulary. */
static bool worse(const float *x, int32_t a, int32_t b) {
    return x[a] < x[b] || (x[a] == x[b] && a > b);
}

static void heap_sift_down(const float *x, int32_t *h, int n, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && worse(x, h[l], h[w])) w = l;
        if (r < n && worse(x, h[r], h[w])) w = r;
        if (w == i) return;
        int32_t t = h[i];
        h[i] = h[w];
        h[w] = t;
        i = w;
    }
}

static void row_top(const float *x, int V, int n, int32_t *h) {
    for (int i = 0; i < n; i++) h[i] = i;
    for (int i = n / 2 - 1; i >= 0; i--) heap_sift_down(x, h, n, i);
    int i = n;
    for (; i < V; i++) {
        if ((i & (LANES - 1)) == 0 && i + LANES <= V) {
            /* scanning upward, a later equal value loses the tie: only > can enter */
            i32x4 gt = load4(x + i) > splat4(x[h[0]]);
#if defined(__SSE__)
            bool any = __builtin_ia32_movmskps((f32x4)gt) != 0;
#else
            bool any = false;
            for (int l = 0; l < LANES; l++) any |= gt[l] != 0;
#endif
            if (!any) {
                i += LANES - 1;
                continue;
            }
        }
        if (x[i] > x[h[0]]) {
            h[0] = i;
            heap_sift_down(x, h, n, 0);
        }
    }
    /* best first: insertion sort of the n (at most a few dozen) */
    for (int a = 1; a < n; a++) {
        int32_t t = h[a];
        int b = a;
        for (; b > 0 && worse(x, h[b - 1], t); b--) h[b] = h[b - 1];
        h[b] = t;
    }
}

void smp_logprobs(const float *logits, int V, int32_t token, int n, float *token_lp,
                  smp_logprob *top, smp_scratch *s) {
    float mx = row_max(logits, V);
    /* a row of -inf (or NaN) has no distribution: its logprobs come out NaN or -inf */
    float lse = mx > -INFINITY && mx < INFINITY ? mx + (float)log(row_sum_exp(logits, V, mx)) : mx;
    if (token_lp) *token_lp = token >= 0 && token < V ? logits[token] - lse : -INFINITY;
    if (n <= 0) return;
    if (scratch_reserve(s, V) != 0) return;
    if (n > V) n = V;
    row_top(logits, V, n, s->idx);
    for (int i = 0; i < n; i++) {
        top[i].token = s->idx[i];
        top[i].logprob = logits[s->idx[i]] - lse;
    }
}
