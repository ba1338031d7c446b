/* Recorded steps (model.h: mdl_graph_shape_of). 1. The key rule as a pure function: which
 * batches are recorded (one-token decode, verify steps of w tokens, uniform MTP draft passes),
 * their bucket, padding and key. 2. The padded batches the recordings run: the CPU backend
 * does not record, so a stand-in with graph ops that run the ops as they are called (every
 * "recording" is the padded batch run eagerly, its "replay" a no-op) makes the model take its
 * recorded path; verify logits and MTP drafts through it equal those of the same model without
 * graphs. 3. With argument "cuda" (CUDA builds, on a GPU; exit 77 without one): the same script
 * on the CUDA backend in float32 and bf16, graphs on (recorded and replayed for real) against
 * --enforce-eager's op-by-op run; tests/gpu/mtp_check.sh runs it. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "base/log.h"
#include "mkmodel.h"
#include "model/model.h"
#include "testmodel.h"
#include "testutil.h"
#ifdef DUET_HAVE_CUDA
#include "model/backends/cuda/backend_cuda.h"
#endif

#define VOCAB 512

static mdl_seq seq(int n_tokens, int n_logits, int n_blocks) {
    static const int32_t toks[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    static const int32_t table[64] = {0};
    return (mdl_seq){.tokens = toks,
                     .n_tokens = n_tokens,
                     .block_table = table,
                     .n_blocks = n_blocks,
                     .n_logits = n_logits};
}

static void key_rule(void) {
    mdl_seq s[300];
    mdl_graph_shape g;
    /* one-token decode: the smallest bucket holding the batch */
    for (int i = 0; i < 300; i++) s[i] = seq(1, 1, 3);
    CHECK(mdl_graph_shape_of(MDL_GRAPH_STEP, s, 3, 256, 16, &g) && g.rows == 4 && g.w == 1 &&
          g.wlog == 2);
    CHECK(mdl_graph_shape_of(MDL_GRAPH_STEP, s, 1, 256, 16, &g) && g.rows == 1 && g.bucket == 0);
    CHECK(mdl_graph_shape_of(MDL_GRAPH_STEP, s, 65, 256, 16, &g) && g.rows == 96);
    CHECK(mdl_graph_shape_of(MDL_GRAPH_STEP, s, 256, 256, 16, &g) && g.rows == 256);
    CHECK(!mdl_graph_shape_of(MDL_GRAPH_STEP, s, 257, 4096, 16, &g)); /* past the buckets */
    CHECK(!mdl_graph_shape_of(MDL_GRAPH_STEP, s, 0, 256, 16, &g));
    CHECK(!mdl_graph_shape_of(MDL_GRAPH_STEP, s, 65, 64, 16, &g)); /* 96 rows > reserved 64 */
    /* verify steps: w tokens, w logits rows each; rows * w within the reserved rows */
    for (int w = 2; w <= MDL_GRAPH_MAX_W; w++) {
        for (int i = 0; i < 300; i++) s[i] = seq(w, w, 5);
        CHECK(mdl_graph_shape_of(MDL_GRAPH_STEP, s, 64, 256, 16, &g) && g.rows == 64 && g.w == w &&
              g.wlog == 3);
        CHECK(mdl_graph_shape_of(MDL_GRAPH_STEP, s, 20, 256, 16, &g) && g.rows == 24);
        CHECK(mdl_graph_shape_of(MDL_GRAPH_STEP, s, 64, 64 * w, 16, &g));
        CHECK(!mdl_graph_shape_of(MDL_GRAPH_STEP, s, 64, 64 * w - 1, 16, &g));
        CHECK(!mdl_graph_shape_of(MDL_GRAPH_STEP, s, 4, 256, w - 1, &g)); /* padding block */
        CHECK(!mdl_graph_shape_of(MDL_GRAPH_DRAFT, s, 4, 256, 16, &g));   /* w logits rows */
    }
    /* not uniform: mixed widths, logits on fewer rows, too many tokens */
    for (int i = 0; i < 8; i++) s[i] = seq(2, 2, 1);
    s[5] = seq(3, 3, 1);
    CHECK(!mdl_graph_shape_of(MDL_GRAPH_STEP, s, 8, 256, 16, &g));
    s[5] = seq(2, 1, 1);
    CHECK(!mdl_graph_shape_of(MDL_GRAPH_STEP, s, 8, 256, 16, &g));
    for (int i = 0; i < 8; i++) s[i] = seq(MDL_GRAPH_MAX_W + 1, MDL_GRAPH_MAX_W + 1, 1);
    CHECK(!mdl_graph_shape_of(MDL_GRAPH_STEP, s, 8, 256, 16, &g));
    /* draft passes: w positions, the last one's logits */
    for (int i = 0; i < 8; i++) s[i] = seq(3, 1, 9);
    CHECK(mdl_graph_shape_of(MDL_GRAPH_DRAFT, s, 7, 256, 16, &g) && g.rows == 8 && g.w == 3 &&
          g.wlog == 4);
    s[2] = seq(3, 0, 9); /* a sequence that only writes the module's KV */
    CHECK(!mdl_graph_shape_of(MDL_GRAPH_DRAFT, s, 7, 256, 16, &g));
    /* keys: one per (kind, w, rows, width) */
    uint64_t keys[2 * MDL_GRAPH_MAX_W * 3 * 2];
    int n_keys = 0;
    for (int k = 0; k < 2; k++)
        for (int w = 1; w <= MDL_GRAPH_MAX_W; w++)
            for (int n = 1; n <= 3; n++)
                for (int nb = 1; nb <= 2; nb++) {
                    mdl_seq q[3];
                    for (int i = 0; i < 3; i++) q[i] = seq(w, k == MDL_GRAPH_STEP ? w : 1, nb);
                    CHECK(mdl_graph_shape_of((mdl_graph_kind)k, q, n, 256, 16, &g));
                    keys[n_keys++] = g.key;
                }
    int dup = 0;
    for (int i = 0; i < n_keys; i++)
        for (int j = 0; j < i; j++) dup += keys[i] == keys[j];
    /* n = 3 and n = 4 would share a bucket; 1, 2, 3 -> buckets 1, 2, 4: all distinct */
    CHECK_MSG(dup == 0, "%d duplicate keys", dup);
}

/* ---- the recorded path on the CPU, through stand-in graph ops ---- */

static be_ops g_fake_ops;
static int g_recordings;

static duet_status fake_begin(be_backend *be) {
    (void)be;
    return DUET_OK;
}

static duet_status fake_end(be_backend *be, uint64_t key) {
    (void)be;
    (void)key;
    g_recordings++;
    return DUET_OK;
}

static bool fake_ready(be_backend *be, uint64_t key) {
    (void)be;
    (void)key;
    return false; /* every use "records" again: the padded batch runs each time */
}

static duet_status fake_launch(be_backend *be, uint64_t key) {
    (void)be;
    (void)key;
    return DUET_OK;
}

/* The backend of a run: the CPU's (with stand-in graph ops when fake_graphs), or CUDA's in dt. */
typedef struct run_mode {
    bool cuda;
    dt_dtype dt;
    const char *name;
} run_mode;

static mdl_model *load(const char *dir, const run_mode *rm, bool graphs, be_backend **be_p) {
    *be_p = NULL;
#ifdef DUET_HAVE_CUDA
    if (rm->cuda) CHECK(be_cuda_create(0, rm->dt, be_p) == DUET_OK);
#endif
    if (!rm->cuda) CHECK(be_create("cpu", 0, be_p) == DUET_OK);
    if (!*be_p) return NULL;
    bool fake_graphs = graphs && !rm->cuda;
    if (fake_graphs) {
        g_fake_ops = *(*be_p)->ops;
        g_fake_ops.graph_begin = fake_begin;
        g_fake_ops.graph_end = fake_end;
        g_fake_ops.graph_ready = fake_ready;
        g_fake_ops.graph_launch = fake_launch;
        (*be_p)->ops = &g_fake_ops;
    }
    mdl_shard shard = {.tp_rank = 0, .tp_size = 1, .ep_rank = 0, .ep_size = 1};
    mdl_load_opts lo = {
        .source = MDL_WEIGHTS_CHECKPOINT, .max_tokens = 64, .spec_tokens = 3, .eager = !graphs};
    mdl_model *m = NULL;
    CHECK(mdl_load(dir, *be_p, &shard, &lo, &m) == DUET_OK);
    if (m) CHECK_MSG(mdl_graphs_on(m) == graphs, "%s: graphs %s", rm->name, graphs ? "off" : "on");
    return m;
}

enum { NS = 5, BS = 16, NB = 4, REPS = 3, W_MAX = MDL_GRAPH_MAX_W };
enum { MAXT = REPS * NS * (1 + 2 + 3 + 4), MAXD = REPS * W_MAX * NS * MDL_MAX_DRAFT };

/* The same script on a model: prompts of different lengths for NS sequences, then verify
 * steps of w = 1..4 tokens each, reps times each width (all logits rows into lg) and a draft
 * round after each (pass 1 over the verify's w positions, then 2 more passes), drafts into
 * dr. Returns the logits rows written, or -1. */
static int script(mdl_model *m, int reps, float *lg, int32_t *dr) {
    be_kv *kv = NULL;
    CHECK(mdl_kv_create(m, NS * NB + 1, BS, &kv) == DUET_OK);
    if (!kv) return -1;
    static int32_t toks[NS][NB * BS], table[NS][NB];
    for (int s = 0; s < NS; s++) {
        tm_prompt(toks[s], NB * BS, VOCAB, 100u + (uint32_t)s);
        for (int b = 0; b < NB; b++) table[s][b] = NS * NB - 1 - (s * NB + b); /* scattered */
    }
    mdl_seq q[NS];
    mdl_draft_seq d[NS];
    int pos[NS], n_lg = 0, n_dr = 0, rc = 0;
    for (int s = 0; s < NS; s++) {
        pos[s] = 5 + 2 * s;
        q[s] = (mdl_seq){.tokens = toks[s],
                         .n_tokens = pos[s],
                         .block_table = table[s],
                         .n_blocks = NB,
                         .n_logits = 1};
    }
    if (mdl_forward(m, kv, q, NS, NULL) != DUET_OK) rc = -1;
    /* reps times each width: the first use of a key runs eagerly, the second records, the
     * third replays */
    for (int it = 0; it < reps * W_MAX && !rc; it++) {
        int w = 1 + it / reps;
        for (int s = 0; s < NS; s++)
            q[s] = (mdl_seq){.tokens = toks[s] + pos[s],
                             .n_tokens = w,
                             .pos0 = pos[s],
                             .block_table = table[s],
                             .n_blocks = NB,
                             .n_logits = w};
        float *out = lg + (size_t)n_lg * VOCAB;
        if (mdl_forward(m, kv, q, NS, out) != DUET_OK) rc = -1;
        n_lg += NS * w;
        /* the sequences in the other order: hidden rows gathered, not taken in place */
        for (int i = 0; i < NS; i++) {
            int s = NS - 1 - i;
            d[i] = (mdl_draft_seq){.tokens = toks[s] + pos[s] + 1,
                                   .n_tokens = w,
                                   .pos0 = pos[s],
                                   .hid0 = s * w,
                                   .block_table = table[s],
                                   .n_blocks = NB,
                                   .n_draft = 3};
        }
        int32_t drafts[NS * MDL_MAX_DRAFT];
        if (!rc && mdl_draft(m, kv, d, NS, drafts) != DUET_OK) rc = -1;
        memcpy(dr + n_dr, drafts, sizeof drafts);
        n_dr += NS * MDL_MAX_DRAFT;
        for (int s = 0; s < NS; s++) pos[s] += w;
    }
    mdl_kv_destroy(m, kv);
    return rc ? rc : n_lg;
}

static void padded_path(const char *dir, const run_mode *rm) {
    static float lg_ref[MAXT * VOCAB], lg[MAXT * VOCAB];
    static int32_t dr_ref[MAXD], dr[MAXD];
    /* the CPU's stand-in records on every use after the first: two uses a key are enough */
    int reps = rm->cuda ? REPS : 2, n_dr = reps * W_MAX * NS * MDL_MAX_DRAFT;
    be_backend *be = NULL, *be2 = NULL;
    mdl_model *m = load(dir, rm, false, &be);
    int n_ref = m ? script(m, reps, lg_ref, dr_ref) : -1;
    mdl_destroy(m);
    be_destroy(be);
    g_recordings = 0;
    m = load(dir, rm, true, &be2);
    int n = m ? script(m, reps, lg, dr) : -1;
    uint64_t rec[MDL_GRAPH_USES] = {0}, launched[MDL_GRAPH_USES] = {0};
    for (int u = 0; m && u < MDL_GRAPH_USES; u++)
        mdl_graph_counts_of(m, (mdl_graph_use)u, &rec[u], &launched[u]);
    mdl_destroy(m);
    be_destroy(be2);
    CHECK_MSG(n_ref > 0 && n == n_ref, "%s: the script ran %d and %d rows", rm->name, n_ref, n);
    /* w = 1: one decode recording; w = 2..4: one verify recording each; drafts: pass 1 of w
     * positions (w = 1..4) and passes 2, 3 of one (w = 1: the same key as pass 1 of w = 1) */
    /* (on CUDA a scratch area grown by a later batch's first run voids the recordings made
     * before, which are then made again: at least that many there) */
    bool exact = !rm->cuda;
    CHECK_MSG((exact ? rec[MDL_GRAPH_USE_DECODE] == 1 && rec[MDL_GRAPH_USE_VERIFY] == W_MAX - 1
                     : rec[MDL_GRAPH_USE_DECODE] >= 1 && rec[MDL_GRAPH_USE_VERIFY] >= W_MAX - 1) &&
                  rec[MDL_GRAPH_USE_DRAFT] >= (uint64_t)W_MAX,
              "%s: recorded %llu decode, %llu verify, %llu draft passes", rm->name,
              (unsigned long long)rec[0], (unsigned long long)rec[1], (unsigned long long)rec[2]);
    if (rm->cuda) /* replays past the one after each recording */
        CHECK_MSG(launched[MDL_GRAPH_USE_VERIFY] > rec[MDL_GRAPH_USE_VERIFY] &&
                      launched[MDL_GRAPH_USE_DRAFT] > rec[MDL_GRAPH_USE_DRAFT],
                  "%s: replays %llu verify, %llu draft passes", rm->name,
                  (unsigned long long)launched[1], (unsigned long long)launched[2]);
    else
        CHECK(g_recordings > 0);
    double worst = 0;
    for (int i = 0; n > 0 && i < n * VOCAB; i++) {
        double e = fabs((double)lg[i] - lg_ref[i]);
        worst = e > worst || isnan(e) ? e : worst;
    }
    /* the CPU runs the same rows alike; on CUDA the padded batch may pick GEMM kernels and
     * (bf16) attention splits differently: a summation order, so float32 within 1e-3; bf16 is
     * reported (its rounding can flip a tiny random model's routing: cuda.md, "Precision") */
    bool report = rm->cuda && rm->dt != DT_F32;
    double tol = !rm->cuda ? 1e-4 : 1e-3;
    if (!report)
        CHECK_MSG(worst < tol, "%s: verify logits differ with graphs by %g", rm->name, worst);
    int mism = 0;
    for (int i = 0; i < n_dr; i++) mism += dr[i] != dr_ref[i];
    if (report)
        printf("%s: %d of %d drafts differ with graphs (verify logits within %g)\n", rm->name, mism,
               n_dr, worst);
    else
        CHECK_MSG(mism == 0, "%s: %d of %d drafts differ through the recorded path", rm->name, mism,
                  n_dr);
    printf("%s: recorded/replayed decode %llu/%llu, verify %llu/%llu, drafts %llu/%llu\n", rm->name,
           (unsigned long long)rec[0], (unsigned long long)launched[0], (unsigned long long)rec[1],
           (unsigned long long)launched[1], (unsigned long long)rec[2],
           (unsigned long long)launched[2]);
}

static int main_cuda(const char *dir) {
#ifdef DUET_HAVE_CUDA
    be_backend *be = NULL;
    if (be_cuda_create(0, DT_F32, &be) != DUET_OK) {
        printf("no CUDA device: skipped\n");
        return 77;
    }
    be_destroy(be);
    const run_mode modes[] = {{true, DT_F32, "cuda float32"}, {true, DT_BF16, "cuda bf16"}};
    for (int i = 0; i < 2; i++) padded_path(dir, &modes[i]);
    return 0;
#else
    (void)dir;
    printf("built without CUDA: skipped\n");
    return 77;
#endif
}

int main(int argc, char **argv) {
    bool cuda = argc > 1 && !strcmp(argv[1], "cuda");
    log_set_level(LOG_LEVEL_WARN);
    key_rule();
    char *root = tu_mkdtemp("graph-shape");
    if (!root) return 1;
    char dir[4200];
    snprintf(dir, sizeof dir, "%s/mtp", root);
    mk_spec s;
    mk_preset("tiny", &s);
    s.cfg.vocab_size = VOCAB;
    s.cfg.n_routed_experts = 8;
    s.cfg.moe_intermediate_size = 64;
    s.cfg.num_nextn_predict_layers = 1;
    s.seed = 17;
    mk_spec_fit(&s);
    duet_status st = mk_write(&s, dir);
    CHECK_MSG(st == DUET_OK, "writing %s: %s", dir, duet_strerror(st));
    const run_mode cpu = {false, DT_F32, "cpu"};
    int rc = 0;
    if (st == DUET_OK) {
        if (cuda)
            rc = main_cuda(dir);
        else
            padded_path(dir, &cpu);
    }
    tu_rmtree(root);
    free(root);
    if (rc == 77) return 77;
    CHECK_DONE();
}
