/* The model against itself on duet-mkmodel checkpoints, for shapes that have no golden data: a
 * reduced DeepSeek-V2-Lite (plain q_proj, softmax greedy routing, no router bias) and the tiny
 * V3 preset in bf16 and fp8. Four ways of feeding the same prompts must give the same logits
 * (relative L2 per row <= 1e-5) and the same greedy continuation:
 *   prefill  - each prompt in one step (the reference), then one token per step;
 *   stepwise - each prompt one token per step;
 *   chunked  - each prompt in chunks of 7;
 *   batched  - all prompts in shared steps at different positions: prompt chunks of one
 *              sequence beside single tokens and decodes of others, some with only the last
 *              row of logits.
 * KV blocks of 5 tokens come from a scrambled pool, so sequences cross blocks everywhere.
 * Usage: test_model_consistency v2-lite|tiny-bf16|tiny-fp8 */
#include <string.h>

#include "check.h"
#include "base/log.h"
#include "mkmodel.h"
#include "testmodel.h"
#include "testutil.h"

#define N_PROMPTS  3
#define GREEDY     8
#define BLOCK      5
#define POOL       96
#define MAX_BLOCKS 16
#define TOL        1e-5

static const int PROMPT_LEN[N_PROMPTS] = {23, 17, 30};

typedef struct ref {
    int32_t prompt[32];
    float *prefill; /* [len, V] */
    float *decode;  /* [GREEDY - 1, V] */
    int32_t greedy[GREEDY];
} ref;

typedef struct ctx {
    tm_model tm;
    be_kv *kv;
    int V;
    int32_t pool[POOL];
    int n_free;
    float *logits; /* [64, V] */
    ref refs[N_PROMPTS];
    double worst[4];
    const char *path; /* the path running, for messages */
} ctx;

typedef struct seq {
    int32_t blocks[MAX_BLOCKS];
    int n_blocks, pos;
} seq;

static int seq_grow(ctx *c, seq *s, int upto) {
    while (s->n_blocks * BLOCK < upto) {
        if (!c->n_free || s->n_blocks == MAX_BLOCKS) return -1;
        s->blocks[s->n_blocks++] = c->pool[--c->n_free];
    }
    return 0;
}

static void seq_release(ctx *c, seq *s) {
    while (s->n_blocks) c->pool[c->n_free++] = s->blocks[--s->n_blocks];
    s->pos = 0;
}

/* One step: seqs[i] gets toks[i] (n[i] tokens) and nl[i] rows of logits into c->logits. */
static duet_status step(ctx *c, seq **seqs, const int32_t **toks, const int *n, const int *nl,
                        int count) {
    mdl_seq ms[N_PROMPTS] = {{0}};
    for (int i = 0; i < count; i++) {
        if (seq_grow(c, seqs[i], seqs[i]->pos + n[i]) != 0) return DUET_ERR_NO_MEMORY;
        ms[i] = (mdl_seq){.tokens = toks[i],
                          .n_tokens = n[i],
                          .pos0 = seqs[i]->pos,
                          .block_table = seqs[i]->blocks,
                          .n_blocks = seqs[i]->n_blocks,
                          .n_logits = nl[i]};
    }
    duet_status st = mdl_forward(c->tm.m, c->kv, ms, count, c->logits);
    for (int i = 0; i < count; i++) seqs[i]->pos += n[i];
    CHECK_MSG(st == DUET_OK, "%s: forward failed: %s", c->path, duet_strerror(st));
    return st;
}

static const float *row(const ctx *c, int r) {
    return c->logits + (size_t)r * c->V;
}

/* Compares a row with the reference; which: 0 prefill, 1 stepwise, 2 chunked, 3 batched. */
static void compare(ctx *c, int which, const float *got, const float *want, int p, int pos) {
    double e = tm_rel_l2(got, want, (size_t)c->V);
    if (e > c->worst[which]) c->worst[which] = e;
    CHECK_MSG(e <= TOL, "%s: prompt %d position %d: relative L2 %.3g", c->path, p, pos, e);
}

/* Greedy continuation of a sequence whose last logits row is last: GREEDY tokens, one step
 * each, checked against the reference ids and decode rows. */
static void continue_greedy(ctx *c, int which, seq *s, const float *last, int p) {
    ref *r = &c->refs[p];
    int32_t tok = (int32_t)tm_argmax(last, c->V);
    for (int g = 0; g < GREEDY; g++) {
        CHECK_MSG(tok == r->greedy[g], "%s: prompt %d greedy token %d: %d, reference %d", c->path,
                  p, g, tok, r->greedy[g]);
        if (g == GREEDY - 1) break;
        const int32_t *t = &tok;
        int one = 1;
        if (step(c, &s, &t, &one, &one, 1) != DUET_OK) return;
        compare(c, which, row(c, 0), r->decode + (size_t)g * c->V, p, s->pos - 1);
        tok = (int32_t)tm_argmax(row(c, 0), c->V);
    }
}

/* The reference: whole prompt in one step, every row kept, then the greedy decode. */
static void run_reference(ctx *c, int p) {
    ref *r = &c->refs[p];
    int len = PROMPT_LEN[p];
    seq s = {0};
    seq *sp = &s;
    const int32_t *t = r->prompt;
    c->path = "prefill";
    if (step(c, &sp, &t, &len, &len, 1) != DUET_OK) return;
    memcpy(r->prefill, c->logits, (size_t)len * c->V * sizeof(float));
    CHECK(tm_all_finite(r->prefill, (size_t)len * c->V));
    int32_t tok = (int32_t)tm_argmax(row(c, len - 1), c->V);
    for (int g = 0; g < GREEDY; g++) {
        r->greedy[g] = tok;
        if (g == GREEDY - 1) break;
        const int32_t *tt = &tok;
        int one = 1;
        if (step(c, &sp, &tt, &one, &one, 1) != DUET_OK) return;
        memcpy(r->decode + (size_t)g * c->V, c->logits, (size_t)c->V * sizeof(float));
        tok = (int32_t)tm_argmax(row(c, 0), c->V);
    }
    seq_release(c, &s);
}

/* The prompt in chunks of `chunk` tokens (1: token by token), every row checked. */
static void run_chunked(ctx *c, int which, int p, int chunk) {
    ref *r = &c->refs[p];
    int len = PROMPT_LEN[p];
    seq s = {0};
    seq *sp = &s;
    float *last = malloc((size_t)c->V * sizeof(float));
    for (int j = 0; j < len; j += chunk) {
        int n = len - j < chunk ? len - j : chunk;
        const int32_t *t = r->prompt + j;
        if (step(c, &sp, &t, &n, &n, 1) != DUET_OK) {
            free(last);
            return;
        }
        for (int k = 0; k < n; k++)
            compare(c, which, row(c, k), r->prefill + (size_t)(j + k) * c->V, p, j + k);
        memcpy(last, row(c, n - 1), (size_t)c->V * sizeof(float));
    }
    continue_greedy(c, which, &s, last, p);
    free(last);
    seq_release(c, &s);
}

/* All prompts through shared steps. Each sequence starts at its own step, feeds its prompt in
 * its own chunk sizes, then decodes greedily, while the others are elsewhere in theirs. */
static void run_batched(ctx *c) {
    static const int start[N_PROMPTS] = {0, 0, 1};
    static const int chunks[N_PROMPTS][8] = {{10, 13}, {1, 1, 4, 4, 4, 3}, {30}};
    static const int all_rows[N_PROMPTS] = {1, 1, 0}; /* prompt 2: only its last row */
    seq s[N_PROMPTS];
    memset(s, 0, sizeof s);
    int chunk_i[N_PROMPTS] = {0}, fed[N_PROMPTS] = {0}, n_greedy[N_PROMPTS] = {0};
    int32_t next[N_PROMPTS];
    c->path = "batched";
    for (int t = 0;; t++) {
        seq *sp[N_PROMPTS];
        const int32_t *toks[N_PROMPTS];
        int n[N_PROMPTS], nl[N_PROMPTS], who[N_PROMPTS], count = 0;
        for (int p = 0; p < N_PROMPTS; p++) {
            if (t < start[p] || n_greedy[p] == GREEDY) continue;
            ref *r = &c->refs[p];
            who[count] = p;
            sp[count] = &s[p];
            if (fed[p] < PROMPT_LEN[p]) {
                n[count] = chunks[p][chunk_i[p]++];
                toks[count] = r->prompt + fed[p];
                nl[count] = all_rows[p] ? n[count] : 1;
            } else {
                n[count] = 1;
                toks[count] = &next[p];
                nl[count] = 1;
            }
            count++;
        }
        if (!count) break;
        if (step(c, sp, toks, n, nl, count) != DUET_OK) break;
        int rr = 0;
        for (int i = 0; i < count; i++) {
            int p = who[i];
            ref *r = &c->refs[p];
            if (fed[p] < PROMPT_LEN[p]) {
                for (int k = 0; k < nl[i]; k++) {
                    int pos = fed[p] + n[i] - nl[i] + k;
                    compare(c, 3, row(c, rr + k), r->prefill + (size_t)pos * c->V, p, pos);
                }
                fed[p] += n[i];
            } else {
                /* decode row after feeding greedy token n_greedy - 1 */
                int g = n_greedy[p] - 1;
                compare(c, 3, row(c, rr), r->decode + (size_t)g * c->V, p, s[p].pos - 1);
            }
            rr += nl[i];
            if (fed[p] == PROMPT_LEN[p]) {
                next[p] = (int32_t)tm_argmax(row(c, rr - 1), c->V);
                CHECK_MSG(next[p] == r->greedy[n_greedy[p]],
                          "batched: prompt %d greedy token %d: %d, reference %d", p, n_greedy[p],
                          next[p], r->greedy[n_greedy[p]]);
                n_greedy[p]++;
            }
        }
    }
    for (int p = 0; p < N_PROMPTS; p++) {
        CHECK_MSG(n_greedy[p] == GREEDY, "batched: prompt %d made %d greedy tokens", p,
                  n_greedy[p]);
        seq_release(c, &s[p]);
    }
}

static int make_spec(const char *which, mk_spec *s) {
    if (!strcmp(which, "v2-lite")) {
        /* DeepSeek-V2-Lite's structure (plain q_proj, softmax greedy top-k over all experts,
         * no router bias, two shared experts, one dense layer, YaRN mscale 0.707) at widths
         * that run in milliseconds */
        mk_preset("v2-lite", s);
        s->cfg.hidden_size = 256;
        s->cfg.num_hidden_layers = 3;
        s->cfg.num_attention_heads = 4;
        s->cfg.kv_lora_rank = 64;
        s->cfg.qk_nope_head_dim = 32;
        s->cfg.qk_rope_head_dim = 16;
        s->cfg.v_head_dim = 32;
        s->cfg.intermediate_size = 512;
        s->cfg.moe_intermediate_size = 128;
        s->cfg.n_routed_experts = 16;
        s->cfg.num_experts_per_tok = 4;
    } else if (!strcmp(which, "tiny-bf16") || !strcmp(which, "tiny-fp8")) {
        mk_preset("tiny", s);
        s->cfg.fp8 = !strcmp(which, "tiny-fp8");
    } else {
        return -1;
    }
    /* the vocabulary only widens lm_head; 4096 keeps the test quick under valgrind */
    s->cfg.vocab_size = 4096;
    s->seed = 11;
    mk_spec_fit(s);
    return 0;
}

int main(int argc, char **argv) {
    mk_spec spec;
    if (argc != 2 || make_spec(argv[1], &spec) != 0) {
        fprintf(stderr, "usage: test_model_consistency v2-lite|tiny-bf16|tiny-fp8\n");
        return 2;
    }
    char *dir = tu_mkdtemp("consistency");
    if (!dir) return 1;
    log_set_level(LOG_LEVEL_WARN);
    CHECK(mk_write(&spec, dir) == DUET_OK);
    ctx c;
    memset(&c, 0, sizeof c);
    if (tm_load(dir, MDL_WEIGHTS_CHECKPOINT, 0, &c.tm) != DUET_OK) {
        CHECK(0);
        CHECK_DONE();
    }
    const cfg_model *cfg = mdl_config(c.tm.m);
    CHECK(cfg->q_lora_rank == spec.cfg.q_lora_rank && cfg->fp8 == spec.cfg.fp8);
    c.V = cfg->vocab_size;
    CHECK(mdl_kv_create(c.tm.m, POOL, BLOCK, &c.kv) == DUET_OK);
    for (int i = 0; i < POOL; i++) c.pool[i] = (int32_t)((i * 37 + 11) % POOL); /* scrambled */
    c.n_free = POOL;
    c.logits = malloc((size_t)64 * c.V * sizeof(float));
    for (int p = 0; p < N_PROMPTS; p++) {
        tm_prompt(c.refs[p].prompt, PROMPT_LEN[p], c.V, (uint32_t)(p + 1));
        c.refs[p].prefill = malloc((size_t)PROMPT_LEN[p] * c.V * sizeof(float));
        c.refs[p].decode = malloc((size_t)(GREEDY - 1) * c.V * sizeof(float));
    }

    for (int p = 0; p < N_PROMPTS; p++) run_reference(&c, p);
    /* the comparison must be able to fail: neighbouring rows differ far beyond TOL */
    CHECK(tm_rel_l2(c.refs[0].prefill + c.V, c.refs[0].prefill, (size_t)c.V) > 1e-2);
    for (int p = 0; p < N_PROMPTS; p++) {
        c.path = "stepwise";
        run_chunked(&c, 1, p, 1);
        c.path = "chunked";
        run_chunked(&c, 2, p, 7);
    }
    run_batched(&c);
    CHECK(c.n_free == POOL); /* every path gave its blocks back */

    printf("%s: worst relative L2 stepwise %.2e  chunked %.2e  batched %.2e; greedy ids", argv[1],
           c.worst[1], c.worst[2], c.worst[3]);
    for (int p = 0; p < N_PROMPTS; p++)
        for (int g = 0; g < GREEDY; g++) printf("%s%d", g ? "," : " ", c.refs[p].greedy[g]);
    printf("\n");

    for (int p = 0; p < N_PROMPTS; p++) {
        free(c.refs[p].prefill);
        free(c.refs[p].decode);
    }
    free(c.logits);
    mdl_kv_destroy(c.tm.m, c.kv);
    tm_unload(&c.tm);
    tu_rmtree(dir);
    free(dir);
    CHECK_DONE();
}
