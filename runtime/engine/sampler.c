/* Sampling; see sampler.h. Order of operations as vLLM applies them: penalties, bans
 * (min_tokens), then greedy or temperature -> top-k -> top-p -> min-p -> draw. */
#include "engine/sampler.h"

#include <float.h>
#include <math.h>
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

/* Moves the n largest of v[idx[0..m)] to the front of idx, sorted descending. */
static int top_candidates(const float *v, int32_t *idx, int m, int n) {
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
        m = top_candidates(logits, s->idx, V, p->top_k);
    else if (p->top_p < 1.0f)
        m = top_candidates(logits, s->idx, V, V);
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

void smp_logprobs(const float *logits, int V, int32_t token, int n, float *token_lp,
                  smp_logprob *top, smp_scratch *s) {
    float mx = -INFINITY;
    for (int i = 0; i < V; i++) mx = logits[i] > mx ? logits[i] : mx;
    double sum = 0;
    for (int i = 0; i < V; i++) sum += exp((double)(logits[i] - mx));
    float lse = mx + (float)log(sum);
    if (token_lp) *token_lp = token >= 0 && token < V ? logits[token] - lse : -INFINITY;
    if (n <= 0) return;
    if (scratch_reserve(s, V) != 0) return;
    if (n > V) n = V;
    for (int i = 0; i < V; i++) s->idx[i] = i;
    top_candidates(logits, s->idx, V, n);
    for (int i = 0; i < n; i++) {
        top[i].token = s->idx[i];
        top[i].logprob = logits[s->idx[i]] - lse;
    }
}
