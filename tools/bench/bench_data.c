/* duet-bench's datasets and arrival process (bench_data.h). The sampling rules are vLLM's
 * (vllm/benchmarks/datasets: random, sharegpt, custom; serve.py's get_request), the random
 * numbers duet's own (Philox streams), so the same seed gives the same workload here but not
 * the same one as numpy would. */
#include "bench_data.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/fileio.h"
#include "base/philox.h"

/* ---------------------------------------------------------------------------------------------
 * Random numbers */

void bds_rng_init(bds_rng *g, uint64_t seed, uint64_t stream) {
    /* one key per (seed, stream): the dataset and the arrival process never share draws */
    g->key = seed * 0x9E3779B97F4A7C15ull ^ (stream + 1) * 0xD1B54A32D192ED03ull;
    g->n = 0;
}

double bds_rng_uniform(bds_rng *g) {
    return philox_uniform(g->key, g->n++);
}

long long bds_rng_int(bds_rng *g, long long lo, long long hi) {
    if (hi <= lo) return lo;
    long long span = hi - lo + 1;
    long long k = (long long)(bds_rng_uniform(g) * (double)span);
    return lo + (k < span ? k : span - 1);
}

static double rng_normal(bds_rng *g) {
    double u1 = bds_rng_uniform(g), u2 = bds_rng_uniform(g);
    return sqrt(-2.0 * log(1.0 - u1)) * cos(2.0 * M_PI * u2);
}

/* Marsaglia and Tsang, "A simple method for generating gamma variables" (2000); shape < 1 by
 * their boost: gamma(a) = gamma(a + 1) * U^(1/a). */
double bds_rng_gamma(bds_rng *g, double shape, double scale) {
    if (shape == 1.0) return -log(1.0 - bds_rng_uniform(g)) * scale;
    if (shape < 1.0) {
        double u = bds_rng_uniform(g);
        return bds_rng_gamma(g, shape + 1.0, scale) * pow(1.0 - u, 1.0 / shape);
    }
    double d = shape - 1.0 / 3.0, c = 1.0 / sqrt(9.0 * d);
    for (;;) {
        double x = rng_normal(g), v = 1.0 + c * x;
        if (v <= 0) continue;
        v = v * v * v;
        double u = 1.0 - bds_rng_uniform(g);
        if (log(u) < 0.5 * x * x + d - d * v + d * log(v)) return d * v * scale;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Sets */

void bds_set_cleanup(bds_set *set) {
    if (!set) return;
    for (int i = 0; i < set->n; i++) {
        free(set->items[i].ids);
        free(set->items[i].text);
    }
    free(set->items);
    set->items = NULL;
    set->n = 0;
}

static duet_status fail(char *err, size_t err_len, const char *what) {
    snprintf(err, err_len, "%s", what);
    return DUET_ERR_INVALID;
}

/* ---------------------------------------------------------------------------------------------
 * random */

/* The ids a random prompt may use: below the limit, with a piece, not special. */
static duet_status allowed_ids(const tok_tokenizer *tok, int vocab_limit, int32_t **ids_p,
                               int *n_p) {
    int limit = vocab_limit;
    if (tok && (limit <= 0 || tok_vocab_size(tok) < limit)) limit = tok_vocab_size(tok);
    int32_t *ids = malloc((size_t)(limit > 0 ? limit : 1) * sizeof *ids);
    if (!ids) return DUET_ERR_NO_MEMORY;
    int n = 0;
    for (int32_t id = 0; id < limit; id++) {
        const char *piece;
        size_t len;
        if (tok && (tok_is_special(tok, id) || tok_id_to_piece(tok, id, &piece, &len) != DUET_OK))
            continue;
        ids[n++] = id;
    }
    *ids_p = ids;
    *n_p = n;
    return DUET_OK;
}

duet_status bds_random(const tok_tokenizer *tok, int vocab_limit, const bds_random_opts *o, int n,
                       uint64_t seed, bds_set *out, char *err, size_t err_len) {
    memset(out, 0, sizeof *out);
    if (!tok && vocab_limit <= 0)
        return fail(err, err_len,
                    "the random dataset needs the model's tokenizer or vocabulary size");
    if (!tok && o->as_text)
        return fail(err, err_len, "random text prompts (for chat) need the model's tokenizer");
    if (!(o->range_ratio >= 0 && o->range_ratio < 1))
        return fail(err, err_len, "--random-range-ratio must be in [0, 1)");
    if (o->input_len < 1 || o->output_len < 1 || o->prefix_len < 0)
        return fail(err, err_len, "random lengths must be positive");
    /* BOS counts toward the input length, as the server would add it to a text prompt */
    bool bos = tok && tok_add_bos(tok) && tok_bos_id(tok) >= 0 && !o->as_text;
    int real = o->input_len - (bos ? 1 : 0);
    long long in_lo = (long long)floor(real * (1 - o->range_ratio));
    long long in_hi = (long long)ceil(real * (1 + o->range_ratio));
    long long out_lo = (long long)floor(o->output_len * (1 - o->range_ratio));
    long long out_hi = (long long)ceil(o->output_len * (1 + o->range_ratio));
    if (out_lo < 1) out_lo = 1;
    if (out_hi < 1) out_hi = 1;
    if (o->prefix_len + in_lo + (bos ? 1 : 0) < 1)
        return fail(err, err_len, "--random-input-len is too small for a non-empty prompt");

    int32_t *allowed;
    int n_allowed;
    if (allowed_ids(tok, vocab_limit, &allowed, &n_allowed) != DUET_OK) return DUET_ERR_NO_MEMORY;
    if (n_allowed == 0) {
        free(allowed);
        return fail(err, err_len, "the vocabulary has no ordinary token to draw");
    }
    bds_rng g;
    bds_rng_init(&g, seed, 1);
    int32_t *prefix = malloc((size_t)(o->prefix_len + 1) * sizeof *prefix);
    out->items = calloc((size_t)(n > 0 ? n : 1), sizeof *out->items);
    duet_status st = prefix && out->items ? DUET_OK : DUET_ERR_NO_MEMORY;
    for (int k = 0; st == DUET_OK && k < o->prefix_len; k++)
        prefix[k] = allowed[bds_rng_int(&g, 0, n_allowed - 1)];
    for (int i = 0; st == DUET_OK && i < n; i++) {
        bds_item *it = &out->items[i];
        int len = (int)bds_rng_int(&g, in_lo, in_hi);
        it->output_len = (int)bds_rng_int(&g, out_lo, out_hi);
        long long offset = bds_rng_int(&g, 0, n_allowed - 1);
        int total = (bos ? 1 : 0) + o->prefix_len + len;
        it->ids = malloc((size_t)total * sizeof *it->ids);
        if (!it->ids) {
            st = DUET_ERR_NO_MEMORY;
            break;
        }
        int k = 0;
        if (bos) it->ids[k++] = tok_bos_id(tok);
        memcpy(it->ids + k, prefix, (size_t)o->prefix_len * sizeof *prefix);
        k += o->prefix_len;
        for (int j = 0; j < len; j++) it->ids[k++] = allowed[(offset + i + j) % n_allowed];
        it->n_ids = total;
        it->prompt_len = total;
        out->n = i + 1;
        if (o->as_text) {
            size_t tl;
            st = tok_decode(tok, it->ids, (size_t)it->n_ids, false, &it->text, &tl);
            free(it->ids);
            it->ids = NULL;
            it->n_ids = 0;
            /* re-encoding decoded text need not give the same count: the server's is used */
            it->prompt_len = 0;
        }
    }
    free(prefix);
    free(allowed);
    if (st != DUET_OK) {
        bds_set_cleanup(out);
        if (st == DUET_ERR_NO_MEMORY) snprintf(err, err_len, "out of memory");
    }
    return st;
}

/* ---------------------------------------------------------------------------------------------
 * Files */

/* Fisher-Yates over an index array. */
static void shuffle(int *idx, int n, bds_rng *g) {
    for (int i = n - 1; i > 0; i--) {
        int j = (int)bds_rng_int(g, 0, i);
        int t = idx[i];
        idx[i] = idx[j];
        idx[j] = t;
    }
}

static int *order(int n, uint64_t seed, bool no_shuffle) {
    int *idx = malloc((size_t)(n > 0 ? n : 1) * sizeof *idx);
    if (!idx) return NULL;
    for (int i = 0; i < n; i++) idx[i] = i;
    bds_rng g;
    bds_rng_init(&g, seed, 2);
    if (!no_shuffle) shuffle(idx, n, &g);
    return idx;
}

static int count_tokens(const tok_tokenizer *tok, const char *text) {
    int32_t *ids = NULL;
    size_t n = 0;
    if (tok_encode(tok, text, strlen(text), true, &ids, &n) != DUET_OK) return -1;
    free(ids);
    /* a text prompt gets BOS from the server when the tokenizer asks for one */
    return (int)n + (tok_add_bos(tok) && tok_bos_id(tok) >= 0 ? 1 : 0);
}

/* Tops the set up to n by drawing among what it has (vLLM's oversampling). */
static duet_status top_up(bds_set *out, int n, uint64_t seed, bool no_oversample, char *err,
                          size_t err_len) {
    if (out->n >= n || no_oversample) return DUET_OK;
    if (out->n == 0) return fail(err, err_len, "the dataset has no usable prompt");
    fprintf(stderr, "duet-bench: %d usable prompts in the dataset; %d more drawn among them\n",
            out->n, n - out->n);
    bds_rng g;
    bds_rng_init(&g, seed, 3);
    int have = out->n;
    for (int i = have; i < n; i++) {
        const bds_item *src = &out->items[bds_rng_int(&g, 0, have - 1)];
        bds_item *it = &out->items[i];
        *it = *src;
        it->ids = NULL;
        it->text = src->text ? strdup(src->text) : NULL;
        if (src->text && !it->text) return DUET_ERR_NO_MEMORY;
        out->n = i + 1;
    }
    return DUET_OK;
}

static duet_status load_json(const char *path, size_t max, char **text_p, char *err,
                             size_t err_len) {
    if (fio_read_text(path, max, text_p) != DUET_OK) {
        snprintf(err, err_len, "cannot read %s", path);
        return DUET_ERR_NOT_FOUND;
    }
    return DUET_OK;
}

duet_status bds_sharegpt(const char *path, const tok_tokenizer *tok, int output_len, int n,
                         uint64_t seed, bool no_shuffle, bool no_oversample, bds_set *out,
                         char *err, size_t err_len) {
    memset(out, 0, sizeof *out);
    if (!tok && output_len <= 0)
        return fail(err, err_len,
                    "sharegpt needs the model's tokenizer (or --sharegpt-output-len) to know "
                    "each answer's length");
    char *text;
    duet_status st = load_json(path, (size_t)4 << 30, &text, err, err_len);
    if (st != DUET_OK) return st;
    cJSON *root = cJSON_Parse(text);
    free(text);
    if (!cJSON_IsArray(root)) {
        cJSON_Delete(root);
        snprintf(err, err_len, "%s: not a ShareGPT JSON list", path);
        return DUET_ERR_FORMAT;
    }
    /* the entries with two turns of text, in a seeded order */
    int total = cJSON_GetArraySize(root), m = 0;
    const cJSON **pairs = calloc((size_t)(total > 0 ? total : 1), sizeof *pairs);
    out->items = calloc((size_t)(n > 0 ? n : 1), sizeof *out->items);
    int *idx = NULL;
    if (!pairs || !out->items) st = DUET_ERR_NO_MEMORY;
    const cJSON *e;
    cJSON_ArrayForEach(e, root) {
        if (st != DUET_OK) break;
        const cJSON *conv = cJSON_GetObjectItemCaseSensitive(e, "conversations");
        if (cJSON_GetArraySize(conv) < 2) continue;
        const cJSON *a = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(conv, 0), "value");
        const cJSON *b = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(conv, 1), "value");
        if (cJSON_IsString(a) && cJSON_IsString(b)) pairs[m++] = conv;
    }
    if (st == DUET_OK && !(idx = order(m, seed, no_shuffle))) st = DUET_ERR_NO_MEMORY;
    for (int k = 0; st == DUET_OK && k < m && out->n < n; k++) {
        const cJSON *conv = pairs[idx[k]];
        const char *prompt =
            cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(conv, 0), "value")->valuestring;
        const char *answer =
            cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(conv, 1), "value")->valuestring;
        int plen = tok ? count_tokens(tok, prompt) : 0;
        int olen = output_len > 0 ? output_len : count_tokens(tok, answer);
        if (plen < 0 || olen < 0) continue;
        /* vLLM's is_valid_sequence; without a tokenizer the prompt's length is not known here */
        if (tok && (plen < 4 || plen > 1024)) continue;
        if (output_len <= 0 && olen < 4) continue;
        if (tok && plen + olen > 2048) continue;
        bds_item *it = &out->items[out->n];
        it->text = strdup(prompt);
        if (!it->text) st = DUET_ERR_NO_MEMORY;
        it->prompt_len = plen;
        it->output_len = olen;
        out->n++;
    }
    free(idx);
    free(pairs);
    cJSON_Delete(root);
    if (st == DUET_OK) st = top_up(out, n, seed, no_oversample, err, err_len);
    if (st != DUET_OK) {
        if (st == DUET_ERR_NO_MEMORY) snprintf(err, err_len, "out of memory");
        bds_set_cleanup(out);
    }
    return st;
}

duet_status bds_custom(const char *path, const tok_tokenizer *tok, const chat_template *tpl,
                       int output_len, int n, uint64_t seed, bool no_shuffle, bool no_oversample,
                       bds_set *out, char *err, size_t err_len) {
    memset(out, 0, sizeof *out);
    if (output_len < 1) return fail(err, err_len, "--custom-output-len must be positive");
    char *text;
    duet_status st = load_json(path, (size_t)4 << 30, &text, err, err_len);
    if (st != DUET_OK) return st;
    /* one prompt per line */
    int lines = 1;
    for (const char *p = text; *p; p++) lines += *p == '\n';
    char **prompts = calloc((size_t)lines, sizeof *prompts);
    out->items = calloc((size_t)(n > 0 ? n : 1), sizeof *out->items);
    int m = 0, line_no = 0;
    if (!prompts || !out->items) st = DUET_ERR_NO_MEMORY;
    for (char *p = text, *nl; st == DUET_OK && p && *p; p = nl ? nl + 1 : NULL) {
        nl = strchr(p, '\n');
        if (nl) *nl = '\0';
        line_no++;
        if (strspn(p, " \t\r") == strlen(p)) continue;
        cJSON *o = cJSON_Parse(p);
        const cJSON *pr = cJSON_GetObjectItemCaseSensitive(o, "prompt");
        if (!cJSON_IsString(pr)) {
            snprintf(err, err_len, "%s:%d: each line must be a JSON object with a \"prompt\"", path,
                     line_no);
            st = DUET_ERR_FORMAT;
        } else if (!(prompts[m++] = strdup(pr->valuestring))) {
            st = DUET_ERR_NO_MEMORY;
        }
        cJSON_Delete(o);
    }
    free(text);
    int *idx = st == DUET_OK ? order(m, seed, no_shuffle) : NULL;
    if (st == DUET_OK && !idx) st = DUET_ERR_NO_MEMORY;
    for (int k = 0; st == DUET_OK && k < m && out->n < n; k++) {
        bds_item *it = &out->items[out->n];
        const char *prompt = prompts[idx[k]];
        if (tpl) {
            /* one user turn, rendered as the server's chat endpoint would */
            cJSON *msgs = cJSON_CreateArray(), *u = cJSON_CreateObject();
            cJSON_AddStringToObject(u, "role", "user");
            cJSON_AddStringToObject(u, "content", prompt);
            cJSON_AddItemToArray(msgs, u);
            chat_opts co = chat_default_opts(tpl);
            size_t len;
            char why[256];
            st = chat_render(tpl, msgs, &co, &it->text, &len, why, sizeof why);
            cJSON_Delete(msgs);
            if (st != DUET_OK) snprintf(err, err_len, "chat template: %s", why);
        } else if (!(it->text = strdup(prompt))) {
            st = DUET_ERR_NO_MEMORY;
        }
        if (st != DUET_OK) break;
        it->output_len = output_len;
        if (tok && (it->prompt_len = count_tokens(tok, it->text)) < 0) it->prompt_len = 0;
        out->n++;
    }
    free(idx);
    for (int i = 0; prompts && i < m; i++) free(prompts[i]);
    free(prompts);
    if (st == DUET_OK) st = top_up(out, n, seed, no_oversample, err, err_len);
    if (st != DUET_OK) {
        if (st == DUET_ERR_NO_MEMORY) snprintf(err, err_len, "out of memory");
        bds_set_cleanup(out);
    }
    return st;
}

/* ---------------------------------------------------------------------------------------------
 * Arrivals */

duet_status bds_arrivals(int n, double rate, double burstiness, uint64_t seed, double *t) {
    if (n <= 0) return DUET_OK;
    if (!(rate > 0) || !(burstiness > 0)) return DUET_ERR_INVALID;
    if (isinf(rate)) {
        for (int i = 0; i < n; i++) t[i] = 0;
        return DUET_OK;
    }
    bds_rng g;
    bds_rng_init(&g, seed, 4);
    double sum = 0;
    for (int i = 0; i < n; i++) {
        sum += isinf(burstiness) ? 1.0 / rate
                                 : bds_rng_gamma(&g, burstiness, 1.0 / (rate * burstiness));
        t[i] = sum;
    }
    if (sum > 0) {
        double k = (double)n / rate / sum;
        for (int i = 0; i < n; i++) t[i] *= k;
    }
    return DUET_OK;
}
