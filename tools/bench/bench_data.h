/* duet-bench's workloads: the prompts of `vllm bench serve`'s datasets (random, sharegpt,
 * custom) with the output length each request asks for, and the arrival times of a Poisson
 * (or gamma) request process. Everything is a function of the seed. Sending them is
 * duet-bench.c's business. One thread. */
#ifndef DUET_BENCH_DATA_H
#define DUET_BENCH_DATA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/status.h"
#include "text/chat.h"
#include "text/tokenizer.h"

/* A counter-based random stream (Philox): draws depend only on (seed, stream, index). */
typedef struct bds_rng {
    uint64_t key, n;
} bds_rng;

void bds_rng_init(bds_rng *g, uint64_t seed, uint64_t stream);
double bds_rng_uniform(bds_rng *g);                            /* [0, 1) */
long long bds_rng_int(bds_rng *g, long long lo, long long hi); /* [lo, hi] */
double bds_rng_gamma(bds_rng *g, double shape, double scale);  /* shape, scale > 0 */

/* One request's prompt: token ids (sent as a list of ints) or text. */
typedef struct bds_item {
    int32_t *ids; /* [n_ids] or NULL */
    int n_ids;
    char *text; /* NUL-terminated, or NULL */
    /* The prompt's length in tokens as this side counts it; 0 when unknown (then only the
     * server's usage.prompt_tokens tells). */
    int prompt_len;
    int output_len; /* max_tokens to ask for */
} bds_item;

typedef struct bds_set {
    bds_item *items;
    int n;
} bds_set;

void bds_set_cleanup(bds_set *set);

typedef struct bds_random_opts {
    int input_len, output_len, prefix_len;
    double range_ratio; /* lengths uniform in [len * (1 - r), len * (1 + r)], 0 <= r < 1 */
    bool as_text;       /* decode the ids to text (for chat messages) instead of sending ids */
} bds_random_opts;

/* Random prompts the way vLLM builds them: BOS when the tokenizer adds one, a random prefix of
 * prefix_len tokens shared by every request, then per request a run of consecutive vocabulary
 * entries from a random offset, never a special token. Token ids are drawn from
 * [0, vocab_limit) (vocab_limit <= 0: the tokenizer's vocabulary); without a tokenizer
 * vocab_limit is required and as_text impossible. */
duet_status bds_random(const tok_tokenizer *tok, int vocab_limit, const bds_random_opts *o, int n,
                       uint64_t seed, bds_set *out, char *err, size_t err_len);

/* ShareGPT JSON (a list of {"conversations": [{"from", "value"}, ...]}): the first turn is the
 * prompt and the second's length in tokens the output length (or output_len when > 0).
 * Entries are shuffled with the seed (unless no_shuffle); a pair with a prompt or answer under 4
 * tokens, a prompt over 1024 or both over 2048 is skipped; too few left are topped up by
 * drawing again among them (unless no_oversample). Needs tok unless output_len > 0. */
duet_status bds_sharegpt(const char *path, const tok_tokenizer *tok, int output_len, int n,
                         uint64_t seed, bool no_shuffle, bool no_oversample, bds_set *out,
                         char *err, size_t err_len);

/* JSONL with one {"prompt": "..."} per line, each asking for output_len tokens; shuffled and
 * topped up as above. With tpl, each prompt is rendered as one user turn of the chat template
 * (vLLM's default for this dataset). tok, when given, counts the prompt's tokens. */
duet_status bds_custom(const char *path, const tok_tokenizer *tok, const chat_template *tpl,
                       int output_len, int n, uint64_t seed, bool no_shuffle, bool no_oversample,
                       bds_set *out, char *err, size_t err_len);

/* Send times of n requests, seconds from the start, ascending, into t[n]. rate INFINITY: all
 * at 0. Otherwise gaps are gamma(burstiness, 1 / (rate * burstiness)) (exponential, a Poisson
 * process, for burstiness 1; INFINITY: evenly spaced), then scaled so the last request goes at
 * n / rate exactly, as vLLM does to keep runs of different seeds comparable. */
duet_status bds_arrivals(int n, double rate, double burstiness, uint64_t seed, double *t);

#endif
