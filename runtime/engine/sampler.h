/* Next-token sampling with the parameters OpenAI/vLLM clients send: penalties, min_tokens,
 * temperature, top-k, top-p, min-p, and logprobs with the top N alternatives, on one host row.
 * The engine samples through the backend's sampling op (model/backend.h, be_sample_row: the
 * same parameters, Philox draws); smp_sample is the plain reference tests hold it to, and
 * smp_logprobs serves prompt logprobs. Pure functions; the caller owns all state. */
#ifndef DUET_SAMPLER_H
#define DUET_SAMPLER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/rng.h"
#include "base/status.h"

typedef struct smp_params {
    float temperature;        /* 0: greedy */
    int top_k;                /* 0 or -1: off */
    float top_p;              /* 1: off */
    float min_p;              /* 0: off */
    float repetition_penalty; /* 1: off; prompt and output tokens */
    float presence_penalty;   /* 0: off; output tokens */
    float frequency_penalty;  /* 0: off; output tokens */
} smp_params;

void smp_params_default(smp_params *p);
/* Validates ranges as vLLM does; on error writes a message for the client into err. */
duet_status smp_params_check(const smp_params *p, char *err, size_t err_len);

/* Scratch reused across calls (grows to the vocabulary once). */
typedef struct smp_scratch {
    float *probs;
    int32_t *idx;
    int32_t *counts; /* per-token output counts for penalties */
    uint8_t *seen;   /* tokens in prompt or output, for the repetition penalty */
    int cap;
} smp_scratch;

void smp_scratch_free(smp_scratch *s);

typedef struct smp_logprob {
    int32_t token;
    float logprob;
} smp_logprob;

/* What the sampler needs to know of the sequence so far. */
typedef struct smp_history {
    const int32_t *prompt;
    int n_prompt;
    const int32_t *output;
    int n_output;
} smp_history;

/* Applies penalties and bans in place to logits[V] (the raw row is lost), then picks a
 * token. banned: tokens not allowed now (EOS and stop tokens before min_tokens), n_banned.
 * If want_logprobs >= 0: *chosen_lp gets the chosen token's logprob and top[0..want) the
 * most likely alternatives, both from the raw logits (vLLM's default), so raw_lp must be
 * computed before this call with smp_logprobs. Returns the token. */
int32_t smp_sample(const smp_params *p, const smp_history *h, const int32_t *banned, int n_banned,
                   float *logits, int V, rng_state *rng, smp_scratch *s);

/* Moves the n largest of v[idx[0..m)] to the front of idx, sorted descending (ties: the lower
 * index first), by quickselect and a sort of the front; returns how many are sorted there,
 * min(n, m). The order of idx[n..m) is left unspecified. */
int smp_top_candidates(const float *v, int32_t *idx, int m, int n);

/* log_softmax of the raw row: the logprob of token and the top n alternatives (n may be 0),
 * sorted most likely first. */
void smp_logprobs(const float *logits, int V, int32_t token, int n, float *token_lp,
                  smp_logprob *top, smp_scratch *s);

#endif
