/* The sampling rule of be_sample_row (backend.h) in plain C, and the sampling ops built on it
 * for host-memory backends and as the fallback of backends without their own. The CUDA kernel
 * (backends/cuda/sample.cu) runs the same steps with the same arithmetic (sample_rule.h);
 * tests/gpu/test_sample.c holds the two against each other.
 *
 * Thresholds are found by radix selection over the values' order keys (three digits of 11, 11
 * and 10 bits, a histogram each), not by sorting: O(V) per row, where sorting 129k
 * probabilities for top-p took 19 ms. */
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/philox.h"
#include "model/backend.h"
#include "model/sample_rule.h"

#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_max_threads(void) {
    return 1;
}
static int omp_get_thread_num(void) {
    return 0;
}
#endif

void be_sample_row_init(be_sample_row *r) {
    memset(r, 0, sizeof *r);
    r->temperature = 0.0f;
    r->top_p = 1.0f;
    r->repetition_penalty = 1.0f;
    r->slot = -1;
    r->n_logprobs = -1;
}

/* scratch: p [V] floats, then the histogram: counts [BINS], masses [BINS], then the top list */
typedef struct host_scratch {
    float *p;
    uint32_t *cnt;
    uint64_t *mass;
    int32_t *list; /* [BE_SAMPLE_MAX_TOP] */
} host_scratch;

size_t be_sample_host_scratch(int V) {
    return (size_t)(V > 0 ? V : 1) * sizeof(float) + SMP_RADIX_BINS * (sizeof(uint32_t) + 8) +
           BE_SAMPLE_MAX_TOP * sizeof(int32_t) + 16;
}

static host_scratch scratch_carve(void *scratch, int V) {
    host_scratch s;
    char *b = scratch;
    s.mass = (uint64_t *)b; /* the 8-byte array first: aligned like the allocation */
    b += SMP_RADIX_BINS * sizeof(uint64_t);
    s.cnt = (uint32_t *)b;
    b += SMP_RADIX_BINS * sizeof(uint32_t);
    s.list = (int32_t *)b;
    b += BE_SAMPLE_MAX_TOP * sizeof(int32_t);
    s.p = (float *)b;
    (void)V;
    return s;
}

/* Radix selection over the keys of v[0..V) with key >= floor_key.
 *   count mode (mass_mode false): the largest key t with count(key >= t) >= want, i.e. the
 *     key of the want-th largest value (want at most the number of values considered);
 *   mass mode: v are probabilities; the smallest key t of a value with mass(key > t) < want
 *     (the top-p bound), i.e. the least likely group top-p keeps.
 * Each digit's histogram narrows the prefix: in count mode the bin where the count from the
 * top reaches want, in mass mode the lowest non-empty bin whose mass above is below want. */
static uint32_t radix_select(const float *v, int V, uint32_t floor_key, bool mass_mode,
                             uint64_t want, const host_scratch *s) {
    uint32_t pmask = 0, pval = 0;
    uint64_t above = 0;
    for (int pass = 0; pass < 3; pass++) {
        int shift = smp_digit_shift(pass);
        uint32_t dmask = smp_digit_mask(pass);
        int nb = (int)dmask + 1;
        memset(s->cnt, 0, (size_t)nb * sizeof *s->cnt);
        if (mass_mode) memset(s->mass, 0, (size_t)nb * sizeof *s->mass);
        for (int i = 0; i < V; i++) {
            float x = smp_clean(v[i]);
            uint32_t key = smp_key(x);
            if (key < floor_key || (key & pmask) != pval) continue;
            uint32_t d = (key >> shift) & dmask;
            s->cnt[d]++;
            if (mass_mode) s->mass[d] += smp_mass(x);
        }
        uint64_t run = above;
        int sel = 0;
        uint64_t sel_above = above;
        for (int b = nb - 1; b >= 0; b--) {
            if (!mass_mode) {
                if (run + s->cnt[b] >= want) {
                    sel = b;
                    sel_above = run;
                    break;
                }
                run += s->cnt[b];
            } else {
                if (run >= want) break; /* mass above only grows downwards */
                if (s->cnt[b]) {
                    sel = b;
                    sel_above = run;
                }
                run += s->mass[b];
            }
        }
        above = sel_above;
        pval |= (uint32_t)sel << shift;
        pmask |= dmask << shift;
    }
    return pval;
}

/* The want largest raw logits (want <= V), most likely first, ties by lower id. */
static void top_logits(const float *x, int V, int want, float lse, const host_scratch *s,
                       be_sample_top *top) {
    uint32_t t = radix_select(x, V, 0, false, (uint64_t)want, s);
    int n_gt = 0;
    for (int i = 0; i < V; i++)
        if (smp_key(smp_clean(x[i])) > t) s->list[n_gt++] = i;
    for (int i = 0, n = n_gt; i < V && n < want; i++)
        if (smp_key(smp_clean(x[i])) == t) s->list[n++] = i;
    /* insertion sort of at most 20: value descending, then id ascending */
    for (int a = 1; a < want; a++) {
        int32_t id = s->list[a];
        float xv = smp_clean(x[id]);
        int b = a;
        while (b > 0) {
            int32_t o = s->list[b - 1];
            float ov = smp_clean(x[o]);
            if (ov > xv || (ov == xv && o < id)) break;
            s->list[b] = o;
            b--;
        }
        s->list[b] = id;
    }
    for (int a = 0; a < want; a++) {
        top->token[a] = s->list[a];
        top->logprob[a] = smp_clean(x[s->list[a]]) - lse;
    }
}

void be_sample_host_row(const float *logits, int V, const be_sample_row *r, int32_t *counts,
                        const uint32_t *prompt_bits, void *scratch, be_sample_out *out,
                        be_sample_top *top) {
    host_scratch s = scratch_carve(scratch, V);
    float *z = s.p;
    bool pen = counts && (r->presence_penalty != 0.0f || r->frequency_penalty != 0.0f ||
                          (r->repetition_penalty > 0.0f && r->repetition_penalty != 1.0f));
    /* 1-2. penalized logits, bans */
    for (int i = 0; i < V; i++) {
        float l = smp_clean(logits[i]);
        if (pen)
            l = smp_penalize(l, counts[i], (prompt_bits[i >> 5] >> (i & 31)) & 1u,
                             r->repetition_penalty, r->presence_penalty, r->frequency_penalty);
        z[i] = l;
    }
    for (int j = 0; j < r->n_ban && j < BE_SAMPLE_MAX_BAN; j++)
        if (r->ban[j] >= 0 && r->ban[j] < V) z[r->ban[j]] = -SMP_INF;
    int best = 0;
    for (int i = 1; i < V; i++)
        if (z[i] > z[best]) best = i;
    float zmax = z[best];
    int32_t tok = best;
    /* 3. greedy, or probabilities at temperature (nothing left to choose: the argmax) */
    if (r->temperature >= 1e-5f && zmax > -SMP_INF) {
        float inv_t = 1.0f / r->temperature;
        for (int i = 0; i < V; i++) z[i] = smp_exp_neg(SMP_MUL(SMP_SUB(z[i], zmax), inv_t));
        const float *p = z;
        /* 4. thresholds as keys: keep p with key >= thr */
        uint32_t thr = smp_key(0.0f) + 1; /* p > 0 */
        if (r->top_k > 0 && r->top_k < V) {
            uint32_t k = radix_select(p, V, 0, false, (uint64_t)r->top_k, &s);
            thr = k > thr ? k : thr;
        }
        if (r->top_p < 1.0f) {
            uint64_t total = 0;
            for (int i = 0; i < V; i++)
                if (smp_key(p[i]) >= thr) total += smp_mass(p[i]);
            uint32_t k = radix_select(p, V, thr, true, smp_top_p_limit(r->top_p, total), &s);
            thr = k > thr ? k : thr;
        }
        if (r->min_p > 0.0f) {
            uint32_t k = smp_key(r->min_p);
            thr = k > thr ? k : thr;
        }
        /* 5. the draw, in token id order */
        uint64_t total = 0;
        for (int i = 0; i < V; i++)
            if (smp_key(p[i]) >= thr) total += smp_mass(p[i]);
        if (total > 0) {
            uint64_t target = smp_target(philox_uniform(r->seed, r->offset), total), acc = 0;
            for (int i = 0; i < V; i++) {
                if (smp_key(p[i]) < thr) continue;
                acc += smp_mass(p[i]);
                if (acc > target) {
                    tok = i;
                    break;
                }
            }
        }
    }
    /* 6. the slot counts the token */
    if (counts) counts[tok]++;
    out->token = tok;
    out->logprob = 0.0f;
    if (r->n_logprobs < 0) return;
    /* logprobs of the raw row */
    float mx = -SMP_INF;
    for (int i = 0; i < V; i++) {
        float l = smp_clean(logits[i]);
        mx = l > mx ? l : mx;
    }
    double sum = 0;
    if (mx > -SMP_INF)
        for (int i = 0; i < V; i++) sum += (double)expf(smp_clean(logits[i]) - mx);
    float lse = mx > -SMP_INF ? mx + (float)log(sum) : 0.0f;
    out->logprob = smp_clean(logits[tok]) - lse;
    int n = r->n_logprobs < BE_SAMPLE_MAX_TOP ? r->n_logprobs : BE_SAMPLE_MAX_TOP;
    if (n > V) n = V;
    if (n > 0 && top) top_logits(logits, V, n, lse, &s, top);
}

/* ---- the ops on the host ---- */

typedef struct host_sampler {
    be_sampler pub;
    int words;        /* (V + 31) / 32 */
    int32_t **counts; /* [n_slots]: [V] each, allocated on first use */
    uint32_t **bits;  /* [n_slots]: [words] each */
    float *row;       /* [V]: a row downloaded from device memory */
    int n_scratch;
    void **scratch; /* [n_scratch]: one per thread (rows in host memory run in parallel) */
} host_sampler;

static host_sampler *hs_of(be_sampler *s) {
    return (host_sampler *)s;
}

void be_host_sampler_destroy(be_backend *be, be_sampler *s) {
    (void)be;
    if (!s) return;
    host_sampler *h = hs_of(s);
    for (int i = 0; i < s->n_slots; i++) {
        if (h->counts) free(h->counts[i]);
        if (h->bits) free(h->bits[i]);
    }
    free(h->counts);
    free(h->bits);
    free(h->row);
    for (int i = 0; h->scratch && i < h->n_scratch; i++) free(h->scratch[i]);
    free(h->scratch);
    free(s->rows);
    free(s->out);
    free(s->top);
    free(h);
}

duet_status be_host_sampler_create(be_backend *be, int max_rows, int V, int n_slots,
                                   be_sampler **s_p) {
    if (max_rows < 1 || V < 1 || n_slots < 0) return DUET_ERR_INVALID;
    host_sampler *h = calloc(1, sizeof *h);
    if (!h) return DUET_ERR_NO_MEMORY;
    be_sampler *s = &h->pub;
    s->max_rows = max_rows;
    s->V = V;
    s->n_slots = n_slots;
    h->words = (V + 31) / 32;
    s->rows = calloc((size_t)max_rows, sizeof *s->rows);
    s->out = calloc((size_t)max_rows, sizeof *s->out);
    s->top = calloc((size_t)max_rows, sizeof *s->top);
    h->counts = calloc((size_t)(n_slots ? n_slots : 1), sizeof *h->counts);
    h->bits = calloc((size_t)(n_slots ? n_slots : 1), sizeof *h->bits);
    h->row = malloc((size_t)V * sizeof *h->row);
    h->n_scratch = omp_get_max_threads();
    h->scratch = calloc((size_t)h->n_scratch, sizeof *h->scratch);
    bool ok = s->rows && s->out && s->top && h->counts && h->bits && h->row && h->scratch;
    for (int i = 0; ok && i < h->n_scratch; i++) {
        h->scratch[i] = malloc(be_sample_host_scratch(V));
        ok = h->scratch[i] != NULL;
    }
    if (!ok) {
        be_host_sampler_destroy(be, s);
        return DUET_ERR_NO_MEMORY;
    }
    for (int i = 0; i < max_rows; i++) be_sample_row_init(&s->rows[i]);
    *s_p = s;
    return DUET_OK;
}

duet_status be_host_sampler_slot_init(be_backend *be, be_sampler *s, int slot,
                                      const int32_t *prompt, int n_prompt, const int32_t *output,
                                      int n_output) {
    (void)be;
    host_sampler *h = hs_of(s);
    if (slot < 0 || slot >= s->n_slots) return DUET_ERR_INVALID;
    if (!h->counts[slot]) {
        h->counts[slot] = malloc((size_t)s->V * sizeof(int32_t));
        h->bits[slot] = malloc((size_t)h->words * sizeof(uint32_t));
        if (!h->counts[slot] || !h->bits[slot]) {
            free(h->counts[slot]);
            free(h->bits[slot]);
            h->counts[slot] = NULL;
            h->bits[slot] = NULL;
            return DUET_ERR_NO_MEMORY;
        }
    }
    memset(h->counts[slot], 0, (size_t)s->V * sizeof(int32_t));
    memset(h->bits[slot], 0, (size_t)h->words * sizeof(uint32_t));
    for (int i = 0; i < n_prompt; i++)
        if (prompt[i] >= 0 && prompt[i] < s->V)
            h->bits[slot][prompt[i] >> 5] |= 1u << (prompt[i] & 31);
    for (int i = 0; i < n_output; i++)
        if (output[i] >= 0 && output[i] < s->V) h->counts[slot][output[i]]++;
    return DUET_OK;
}

duet_status be_host_sample(be_backend *be, be_sampler *s, const void *logits, int stride,
                           int n_logits, int n) {
    host_sampler *h = hs_of(s);
    (void)n_logits;
    for (int i = 0; i < n; i++) {
        const be_sample_row *r = &s->rows[i];
        if (r->slot >= 0 && !h->counts[r->slot]) {
            /* a slot never set up counts from zero, as the device's does */
            duet_status st = be_host_sampler_slot_init(be, s, r->slot, NULL, 0, NULL, 0);
            if (st != DUET_OK) return st;
        }
    }
    /* host memory holding float32: rows read in place, one thread each (rows and their slots
     * are independent); anything else through the download op, one row at a time */
    if (!be->ops->on_device && be->ops->act_dtype == DT_F32) {
        int nt = h->n_scratch < n ? h->n_scratch : n;
#pragma omp parallel for schedule(dynamic) num_threads(nt) if (nt > 1)
        for (int i = 0; i < n; i++) {
            const be_sample_row *r = &s->rows[i];
            const float *row = (const float *)logits + (size_t)r->logits_row * (size_t)stride;
            be_sample_host_row(row, s->V, r, r->slot >= 0 ? h->counts[r->slot] : NULL,
                               r->slot >= 0 ? h->bits[r->slot] : NULL,
                               h->scratch[omp_get_thread_num()], &s->out[i], &s->top[i]);
        }
        return DUET_OK;
    }
    for (int i = 0; i < n; i++) {
        const be_sample_row *r = &s->rows[i];
        duet_status st = be->ops->download(be, h->row, logits,
                                           (size_t)r->logits_row * (size_t)stride, (size_t)s->V);
        if (st != DUET_OK) return st;
        be_sample_host_row(h->row, s->V, r, r->slot >= 0 ? h->counts[r->slot] : NULL,
                           r->slot >= 0 ? h->bits[r->slot] : NULL, h->scratch[0], &s->out[i],
                           &s->top[i]);
    }
    return DUET_OK;
}
