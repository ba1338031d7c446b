/* duet-bench's metrics (bench_stats.h): the definitions of `vllm bench serve`
 * (vllm/benchmarks/serve.py, calculate_metrics and its printed table), written anew in C.
 * Statistics follow numpy's: population standard deviation, linear-interpolated percentiles,
 * and the mean/median of an empty list taken as 0. */
#include "bench_stats.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void bst_request_cleanup(bst_request *r) {
    if (!r) return;
    free(r->error);
    free(r->itl);
    free(r->text);
    memset(r, 0, sizeof *r);
}

bool bst_request_add_itl(bst_request *r, double gap) {
    if (r->n_itl == r->cap_itl) {
        int cap = r->cap_itl ? 2 * r->cap_itl : 64;
        double *p = realloc(r->itl, (size_t)cap * sizeof *p);
        if (!p) return false;
        r->itl = p;
        r->cap_itl = cap;
    }
    r->itl[r->n_itl++] = gap;
    return true;
}

bool bst_request_add_text(bst_request *r, const char *s, size_t n) {
    if (r->text_len + n + 1 > r->text_cap) {
        size_t cap = r->text_cap ? r->text_cap : 256;
        while (cap < r->text_len + n + 1) cap *= 2;
        char *p = realloc(r->text, cap);
        if (!p) return false;
        r->text = p;
        r->text_cap = cap;
    }
    memcpy(r->text + r->text_len, s, n);
    r->text_len += n;
    r->text[r->text_len] = '\0';
    return true;
}

/* ---------------------------------------------------------------------------------------------
 * Options */

static const struct {
    const char *key, *name, *header;
} g_metrics[BST_METRIC_COUNT] = {
    [BST_METRIC_TTFT] = {"ttft", "TTFT", "Time to First Token"},
    [BST_METRIC_TPOT] = {"tpot", "TPOT", "Time per Output Token (excl. 1st token)"},
    [BST_METRIC_ITL] = {"itl", "ITL", "Inter-token Latency"},
    [BST_METRIC_E2EL] = {"e2el", "E2EL", "End-to-end Latency"},
    [BST_METRIC_QUEUE] = {"client_queue_time", "Client Queue Time", "Client-side Queueing"},
};

const char *bst_metric_key(bst_metric m) {
    return m < BST_METRIC_COUNT ? g_metrics[m].key : "?";
}

duet_status bst_parse_metrics(const char *list, bst_config *cfg, char *err, size_t err_len) {
    unsigned set = 0;
    const char *p = list;
    while (p && *p) {
        const char *comma = strchr(p, ',');
        size_t n = comma ? (size_t)(comma - p) : strlen(p);
        while (n && *p == ' ') p++, n--;
        while (n && p[n - 1] == ' ') n--;
        int found = -1;
        for (int m = 0; m < BST_METRIC_COUNT; m++)
            if (strlen(g_metrics[m].key) == n && !strncmp(g_metrics[m].key, p, n)) found = m;
        if (found < 0) {
            snprintf(err, err_len,
                     "unknown metric '%.*s' (ttft, tpot, itl, e2el or client_queue_time)", (int)n,
                     p);
            return DUET_ERR_INVALID;
        }
        set |= 1u << found;
        p = comma ? comma + 1 : NULL;
    }
    if (!set) {
        snprintf(err, err_len, "no metric named");
        return DUET_ERR_INVALID;
    }
    cfg->metrics = set;
    return DUET_OK;
}

duet_status bst_parse_percentiles(const char *list, bst_config *cfg, char *err, size_t err_len) {
    int n = 0;
    const char *p = list;
    while (p && *p) {
        char *end;
        double v = strtod(p, &end);
        while (*end == ' ') end++;
        if (end == p || (*end && *end != ',') || !(v >= 0 && v <= 100)) {
            snprintf(err, err_len, "'%s' is not a comma-separated list of numbers in [0, 100]",
                     list);
            return DUET_ERR_INVALID;
        }
        if (n == BST_MAX_PERCENTILES) {
            snprintf(err, err_len, "at most %d percentiles", BST_MAX_PERCENTILES);
            return DUET_ERR_INVALID;
        }
        cfg->percentiles[n++] = v;
        p = *end ? end + 1 : NULL;
    }
    if (!n) {
        snprintf(err, err_len, "no percentile given");
        return DUET_ERR_INVALID;
    }
    cfg->n_percentiles = n;
    return DUET_OK;
}

duet_status bst_parse_goodput(const char *pair, bst_config *cfg, char *err, size_t err_len) {
    static const char *const names[3] = {"ttft", "tpot", "e2el"};
    const char *colon = strchr(pair, ':');
    char *end = NULL;
    double v = colon ? strtod(colon + 1, &end) : NAN;
    if (!colon || end == colon + 1 || *end || !isfinite(v)) {
        snprintf(err, err_len,
                 "'%s': service level objectives are KEY:VALUE pairs, the value a number of "
                 "milliseconds",
                 pair);
        return DUET_ERR_INVALID;
    }
    for (int i = 0; i < 3; i++) {
        if (strlen(names[i]) != (size_t)(colon - pair) || strncmp(names[i], pair, strlen(names[i])))
            continue;
        if (v < 0) {
            snprintf(err, err_len, "'%s': the objective must not be negative", pair);
            return DUET_ERR_INVALID;
        }
        cfg->goodput = true;
        cfg->slo_set[i] = true;
        cfg->slo_ms[i] = v;
        return DUET_OK;
    }
    snprintf(err, err_len, "'%s': the objective's name is one of ttft, tpot, e2el", pair);
    return DUET_ERR_INVALID;
}

/* ---------------------------------------------------------------------------------------------
 * Statistics */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

double bst_percentile(const double *sorted, int n, double p) {
    if (n <= 0) return 0;
    double rank = p / 100.0 * (n - 1);
    int lo = (int)floor(rank);
    if (lo >= n - 1) return sorted[n - 1];
    if (lo < 0) return sorted[0];
    double frac = rank - lo;
    return sorted[lo] + (sorted[lo + 1] - sorted[lo]) * frac;
}

duet_status bst_summarize(const double *v, int n, const bst_config *cfg, bst_summary *out) {
    memset(out, 0, sizeof *out);
    if (n <= 0) return DUET_OK;
    double *s = malloc((size_t)n * sizeof *s);
    if (!s) return DUET_ERR_NO_MEMORY;
    memcpy(s, v, (size_t)n * sizeof *s);
    qsort(s, (size_t)n, sizeof *s, cmp_double);
    double sum = 0;
    for (int i = 0; i < n; i++) sum += s[i];
    double mean = sum / n, sq = 0;
    for (int i = 0; i < n; i++) sq += (s[i] - mean) * (s[i] - mean);
    out->mean = mean * 1000;
    out->std = sqrt(sq / n) * 1000;
    out->median = bst_percentile(s, n, 50) * 1000;
    for (int k = 0; k < cfg->n_percentiles; k++)
        out->pct[k] = bst_percentile(s, n, cfg->percentiles[k]) * 1000;
    free(s);
    return DUET_OK;
}

/* Sweep events (time, +1 start / -1 end): by time, ends first at the same time. */
static int cmp_double_pair(const void *a, const void *b) {
    const double *x = a, *y = b;
    if (x[0] != y[0]) return x[0] < y[0] ? -1 : 1;
    return x[1] < y[1] ? -1 : x[1] > y[1];
}

/* The chunk count stands in when the server reported no usage (vLLM falls back to re-tokenizing
 * the text, or to 1 without a tokenizer; the caller may have done the former already). */
static int counted_output(const bst_request *r) {
    if (r->output_tokens > 0) return r->output_tokens;
    return r->n_chunks > 0 ? r->n_chunks : 1;
}

/* Peak output rate: chunks per one-second bucket from the first successful request's start;
 * peak concurrency: a sweep over the half-open intervals [start, start + latency). */
static duet_status peaks(const bst_request *r, int n, bst_result *res) {
    double t0 = INFINITY, t1 = -INFINITY;
    int n_ok = 0;
    for (int i = 0; i < n; i++) {
        if (!r[i].success) continue;
        n_ok++;
        if (r[i].start_time < t0) t0 = r[i].start_time;
        if (r[i].start_time + r[i].latency > t1) t1 = r[i].start_time + r[i].latency;
    }
    if (!n_ok) return DUET_OK;
    size_t buckets = (size_t)ceil(t1 - t0) + 1;
    double *per_s = calloc(buckets, sizeof *per_s);
    double(*ev)[2] = malloc((size_t)n_ok * 2 * sizeof *ev);
    if (!per_s || !ev) {
        free(per_s);
        free(ev);
        return DUET_ERR_NO_MEMORY;
    }
    int k = 0;
    for (int i = 0; i < n; i++) {
        if (!r[i].success) continue;
        double t = r[i].start_time + r[i].ttft;
        for (int j = -1; j < r[i].n_itl; j++) {
            if (j >= 0) t += r[i].itl[j];
            double b = floor(t - t0);
            if (b >= 0 && b < (double)buckets) per_s[(size_t)b] += 1;
        }
        ev[k][0] = r[i].start_time;
        ev[k++][1] = 1;
        ev[k][0] = r[i].start_time + r[i].latency;
        ev[k++][1] = -1;
    }
    for (size_t b = 0; b < buckets; b++)
        if (per_s[b] > res->max_output_tokens_per_s) res->max_output_tokens_per_s = per_s[b];
    /* ends before starts at the same instant: an interval is half-open */
    qsort(ev, (size_t)k, sizeof *ev, cmp_double_pair);
    int cur = 0;
    for (int i = 0; i < k; i++) {
        cur += (int)ev[i][1];
        if (cur > res->max_concurrent_requests) res->max_concurrent_requests = cur;
    }
    free(per_s);
    free(ev);
    return DUET_OK;
}

duet_status bst_compute(const bst_request *r, int n, double duration, const bst_config *cfg,
                        bst_result *out) {
    memset(out, 0, sizeof *out);
    out->n = n;
    out->duration = duration;
    out->output_lens = calloc((size_t)(n > 0 ? n : 1), sizeof *out->output_lens);
    /* per metric, the values of the successful requests (TPOT: only those with > 1 token) */
    double *v[BST_METRIC_COUNT] = {0}, *all_tpot = NULL;
    int nv[BST_METRIC_COUNT] = {0}, n_itl = 0;
    for (int i = 0; i < n; i++) n_itl += r[i].success ? r[i].n_itl : 0;
    for (int m = 0; m < BST_METRIC_COUNT; m++)
        v[m] = malloc((size_t)((m == BST_METRIC_ITL ? n_itl : n) + 1) * sizeof(double));
    all_tpot = malloc((size_t)(n + 1) * sizeof *all_tpot);
    duet_status st = out->output_lens && all_tpot ? DUET_OK : DUET_ERR_NO_MEMORY;
    for (int m = 0; m < BST_METRIC_COUNT; m++)
        if (!v[m]) st = DUET_ERR_NO_MEMORY;
    int good = 0;
    for (int i = 0; st == DUET_OK && i < n; i++) {
        if (!r[i].success) {
            out->failed++;
            continue;
        }
        int len = counted_output(&r[i]);
        out->output_lens[i] = len;
        out->total_output += len;
        out->total_input += r[i].prompt_len;
        out->completed++;
        double tpot = 0;
        if (len > 1) {
            tpot = (r[i].latency - r[i].ttft) / (len - 1);
            v[BST_METRIC_TPOT][nv[BST_METRIC_TPOT]++] = tpot;
        }
        /* a single-token answer counts as TPOT 0 against a goodput bound */
        all_tpot[i] = tpot;
        for (int k = 0; k < r[i].n_itl; k++) v[BST_METRIC_ITL][nv[BST_METRIC_ITL]++] = r[i].itl[k];
        v[BST_METRIC_TTFT][nv[BST_METRIC_TTFT]++] = r[i].ttft;
        v[BST_METRIC_E2EL][nv[BST_METRIC_E2EL]++] = r[i].latency;
        v[BST_METRIC_QUEUE][nv[BST_METRIC_QUEUE]++] = r[i].queue_time;
        if (cfg->goodput) {
            const double got[3] = {r[i].ttft, tpot, r[i].latency};
            bool ok = true;
            for (int k = 0; k < 3; k++)
                if (cfg->slo_set[k] && !(cfg->slo_ms[k] / 1000.0 >= got[k])) ok = false;
            good += ok;
        }
    }
    for (int m = 0; st == DUET_OK && m < BST_METRIC_COUNT; m++)
        st = bst_summarize(v[m], nv[m], cfg, &out->s[m]);
    if (st == DUET_OK) st = peaks(r, n, out);
    for (int m = 0; m < BST_METRIC_COUNT; m++) free(v[m]);
    free(all_tpot);
    if (st != DUET_OK) {
        bst_result_cleanup(out);
        return st;
    }
    double d = duration > 0 ? duration : 1e-9;
    out->request_throughput = out->completed / d;
    out->request_goodput = good / d;
    out->output_throughput = (double)out->total_output / d;
    out->total_token_throughput = (double)(out->total_input + out->total_output) / d;
    return DUET_OK;
}

void bst_result_cleanup(bst_result *res) {
    if (!res) return;
    free(res->output_lens);
    res->output_lens = NULL;
}

/* ---------------------------------------------------------------------------------------------
 * Output */

void bst_percentile_word(double p, char *buf, size_t len) {
    if (p == floor(p)) {
        snprintf(buf, len, "%d", (int)p);
        return;
    }
    /* the shortest spelling that reads back as p, as Python's str(float) */
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(buf, len, "%.*g", prec, p);
        if (strtod(buf, NULL) == p) return;
    }
}

/* Python's "{s:{c}^{n}}": s centred in n columns of c, the odd column on the right. */
static void print_banner(FILE *f, const char *s, char c) {
    int len = (int)strlen(s), pad = len < 50 ? 50 - len : 0;
    for (int i = 0; i < pad / 2; i++) fputc(c, f);
    fputs(s, f);
    for (int i = 0; i < pad - pad / 2; i++) fputc(c, f);
    fputc('\n', f);
}

static void row_int(FILE *f, const char *label, long long v) {
    fprintf(f, "%-40s %-10lld\n", label, v);
}

static void row_num(FILE *f, const char *label, double v) {
    fprintf(f, "%-40s %-10.2f\n", label, v);
}

void bst_print(FILE *f, const bst_result *res, const bst_config *cfg, const bst_run_info *info) {
    print_banner(f, " Serving Benchmark Result ", '=');
    row_int(f, "Successful requests:", res->completed);
    row_int(f, "Failed requests:", res->failed);
    if (info->max_concurrency > 0)
        row_int(f, "Maximum request concurrency:", info->max_concurrency);
    if (isfinite(info->request_rate))
        row_num(f, "Request rate configured (RPS):", info->request_rate);
    row_num(f, "Benchmark duration (s):", res->duration);
    row_int(f, "Total input tokens:", res->total_input);
    row_int(f, "Total generated tokens:", res->total_output);
    row_num(f, "Request throughput (req/s):", res->request_throughput);
    if (cfg->goodput) row_num(f, "Request goodput (req/s):", res->request_goodput);
    row_num(f, "Output token throughput (tok/s):", res->output_throughput);
    row_num(f, "Peak output token throughput (tok/s):", res->max_output_tokens_per_s);
    row_num(f, "Peak concurrent requests:", res->max_concurrent_requests);
    row_num(f, "Total Token throughput (tok/s):", res->total_token_throughput);
    for (int m = 0; m < BST_METRIC_COUNT; m++) {
        if (!(cfg->metrics & (1u << m))) continue;
        const bst_summary *s = &res->s[m];
        char label[96], word[32];
        print_banner(f, g_metrics[m].header, '-');
        snprintf(label, sizeof label, "Mean %s (ms):", g_metrics[m].name);
        row_num(f, label, s->mean);
        snprintf(label, sizeof label, "Median %s (ms):", g_metrics[m].name);
        row_num(f, label, s->median);
        for (int k = 0; k < cfg->n_percentiles; k++) {
            bst_percentile_word(cfg->percentiles[k], word, sizeof word);
            snprintf(label, sizeof label, "P%s %s (ms):", word, g_metrics[m].name);
            row_num(f, label, s->pct[k]);
        }
    }
    for (int i = 0; i < 50; i++) fputc('=', f);
    fputc('\n', f);
}

void bst_json_add(cJSON *root, const bst_request *r, int n, const bst_result *res,
                  const bst_config *cfg, bool detailed) {
    cJSON_AddNumberToObject(root, "duration", res->duration);
    cJSON_AddNumberToObject(root, "completed", res->completed);
    cJSON_AddNumberToObject(root, "failed", res->failed);
    cJSON_AddNumberToObject(root, "total_input_tokens", (double)res->total_input);
    cJSON_AddNumberToObject(root, "total_output_tokens", (double)res->total_output);
    cJSON_AddNumberToObject(root, "request_throughput", res->request_throughput);
    if (cfg->goodput)
        cJSON_AddNumberToObject(root, "request_goodput", res->request_goodput);
    else
        cJSON_AddNullToObject(root, "request_goodput");
    cJSON_AddNumberToObject(root, "output_throughput", res->output_throughput);
    cJSON_AddNumberToObject(root, "total_token_throughput", res->total_token_throughput);
    cJSON *lat = cJSON_AddArrayToObject(root, "latencies");
    cJSON *queue = cJSON_AddArrayToObject(root, "queue_times");
    cJSON *errors = cJSON_AddArrayToObject(root, "errors");
    for (int i = 0; i < n; i++) {
        cJSON_AddItemToArray(lat, cJSON_CreateNumber(r[i].success ? r[i].latency : 0));
        cJSON_AddItemToArray(queue, cJSON_CreateNumber(r[i].queue_time));
        cJSON_AddItemToArray(errors, cJSON_CreateString(r[i].error ? r[i].error : ""));
    }
    if (detailed) {
        cJSON *in = cJSON_AddArrayToObject(root, "input_lens");
        cJSON *out = cJSON_AddArrayToObject(root, "output_lens");
        cJSON *start = cJSON_AddArrayToObject(root, "start_times");
        cJSON *ttft = cJSON_AddArrayToObject(root, "ttfts");
        cJSON *itls = cJSON_AddArrayToObject(root, "itls");
        cJSON *texts = cJSON_AddArrayToObject(root, "generated_texts");
        for (int i = 0; i < n; i++) {
            cJSON_AddItemToArray(in, cJSON_CreateNumber(r[i].prompt_len));
            cJSON_AddItemToArray(out, cJSON_CreateNumber(res->output_lens[i]));
            cJSON_AddItemToArray(start, cJSON_CreateNumber(r[i].start_time));
            cJSON_AddItemToArray(ttft, cJSON_CreateNumber(r[i].success ? r[i].ttft : 0));
            cJSON *one = cJSON_CreateArray();
            for (int k = 0; k < r[i].n_itl; k++)
                cJSON_AddItemToArray(one, cJSON_CreateNumber(r[i].itl[k]));
            cJSON_AddItemToArray(itls, one);
            cJSON_AddItemToArray(texts, cJSON_CreateString(r[i].text ? r[i].text : ""));
        }
    }
    cJSON_AddNumberToObject(root, "max_output_tokens_per_s", res->max_output_tokens_per_s);
    cJSON_AddNumberToObject(root, "max_concurrent_requests", res->max_concurrent_requests);
    for (int m = 0; m < BST_METRIC_COUNT; m++) {
        if (!(cfg->metrics & (1u << m))) continue;
        char key[96], word[32];
        const bst_summary *s = &res->s[m];
        snprintf(key, sizeof key, "mean_%s_ms", g_metrics[m].key);
        cJSON_AddNumberToObject(root, key, s->mean);
        snprintf(key, sizeof key, "median_%s_ms", g_metrics[m].key);
        cJSON_AddNumberToObject(root, key, s->median);
        snprintf(key, sizeof key, "std_%s_ms", g_metrics[m].key);
        cJSON_AddNumberToObject(root, key, s->std);
        for (int k = 0; k < cfg->n_percentiles; k++) {
            bst_percentile_word(cfg->percentiles[k], word, sizeof word);
            snprintf(key, sizeof key, "p%s_%s_ms", word, g_metrics[m].key);
            cJSON_AddNumberToObject(root, key, s->pct[k]);
        }
    }
}
