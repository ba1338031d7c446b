/* mdl_load on checkpoints made by duet-mkmodel's writer, on the CPU backend: single-file,
 * sharded and FP8 checkpoints load and agree bit for bit; MTP layers are skipped with a log
 * line; --load-format dummy needs no safetensors; and every bad checkpoint (missing tensor,
 * shape mismatch with config.json, unsupported dtype, missing or bad FP8 scales, truncated
 * file, missing shard, index naming a tensor its shard lacks, missing config) fails with one
 * error line naming the file and the problem. Loading logs its progress against the memory
 * plan's totals, throttled in time, for checkpoints and dummy weights alike. */
#include <string.h>

#include "check.h"
#include "base/log.h"
#include "mkmodel.h"
#include "testmodel.h"
#include "testutil.h"

#define VOCAB  512
#define PROMPT 11

static char *g_root;
static int32_t g_prompt[PROMPT];

static const char *at(const char *name) {
    static char bufs[4][4096];
    static int k;
    char *b = bufs[k++ & 3];
    snprintf(b, 4096, "%s/%s", g_root, name);
    return b;
}

static mk_spec tiny_spec(bool fp8, int shards, int mtp) {
    mk_spec s;
    mk_preset("tiny", &s);
    /* fewer, narrower experts than the preset: these tests copy checkpoints around, and
     * bytes on disk are their cost */
    s.cfg.vocab_size = VOCAB;
    s.cfg.n_routed_experts = 8;
    s.cfg.moe_intermediate_size = 64;
    s.cfg.fp8 = fp8;
    s.cfg.num_nextn_predict_layers = mtp;
    s.shards = shards;
    s.seed = 7;
    mk_spec_fit(&s);
    return s;
}

static int make_model(const char *name, bool fp8, int shards, int mtp) {
    mk_spec s = tiny_spec(fp8, shards, mtp);
    duet_status st = mk_write(&s, at(name));
    CHECK_MSG(st == DUET_OK, "writing %s: %s", name, duet_strerror(st));
    return st == DUET_OK ? 0 : -1;
}

/* Logits of the prompt (all rows) from dir, or NULL when it does not load. */
static float *logits_of(const char *dir, mdl_weights_source src, uint64_t seed) {
    tm_model tm;
    if (tm_load(dir, src, seed, &tm) != DUET_OK) return NULL;
    float *out = malloc((size_t)PROMPT * VOCAB * sizeof(float));
    duet_status st = tm_prefill(&tm, g_prompt, PROMPT, out);
    tm_unload(&tm);
    CHECK_MSG(st == DUET_OK, "forward on %s: %s", dir, duet_strerror(st));
    CHECK(tm_all_finite(out, (size_t)PROMPT * VOCAB));
    return out;
}

static duet_status load_status(const char *dir) {
    tm_model tm;
    duet_status st = tm_load(dir, MDL_WEIGHTS_CHECKPOINT, 0, &tm);
    if (st == DUET_OK) tm_unload(&tm);
    return st;
}

/* Lines of log holding s. */
static int count_of(const char *log, const char *s) {
    int n = 0;
    for (const char *line = log; *line;) {
        const char *nl = strchr(line, '\n');
        size_t len = nl ? (size_t)(nl - line) : strlen(line);
        const char *hit = strstr(line, s);
        if (hit && hit < line + len) n++;
        line += len + (nl ? 1 : 0);
    }
    return n;
}

/* EXPECT_LOAD_FAIL(dir, status, phrases...) */
#define EXPECT_LOAD_FAIL(dir, want, ...) EXPECT_FAIL(load_status(dir), want, __VA_ARGS__)

/* ---- header edits ---- */

typedef struct edit_arg {
    const char *name;
    const char *value;
} edit_arg;

static void edit_remove(cJSON *h, void *arg) {
    cJSON_DeleteItemFromObjectCaseSensitive(h, ((edit_arg *)arg)->name);
}

static void edit_swap_shape(cJSON *h, void *arg) {
    cJSON *t = cJSON_GetObjectItemCaseSensitive(h, ((edit_arg *)arg)->name);
    cJSON *shape = cJSON_GetObjectItemCaseSensitive(t, "shape");
    cJSON *a = cJSON_GetArrayItem(shape, 0), *b = cJSON_GetArrayItem(shape, 1);
    if (!a || !b) return;
    double x = a->valuedouble;
    cJSON_SetNumberValue(a, b->valuedouble);
    cJSON_SetNumberValue(b, x);
}

static void edit_dtype(cJSON *h, void *arg) {
    edit_arg *e = arg;
    cJSON *t = cJSON_GetObjectItemCaseSensitive(h, e->name);
    cJSON_ReplaceItemInObjectCaseSensitive(t, "dtype", cJSON_CreateString(e->value));
}

/* A copy of model src as dst with one header edit in file (relative to the model dir). */
static const char *variant(const char *src, const char *dst, const char *file, tu_header_edit ed,
                           const char *name, const char *value) {
    char s[4096], d[4096];
    const char *dir = at(dst);
    tu_copy_dir(at(src), dir);
    if (ed) {
        edit_arg a = {name, value};
        snprintf(s, sizeof s, "%s/%s", at(src), file);
        snprintf(d, sizeof d, "%s/%s", dir, file);
        CHECK(tu_st_rewrite(s, d, ed, &a) == 0);
    }
    return dir;
}

/* Replaces the first occurrence of from in dir/file by to. */
static void replace_in(const char *dir, const char *file, const char *from, const char *to) {
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", dir, file);
    unsigned char *b;
    size_t n;
    if (tu_read(p, &b, &n) != 0) return;
    char *hit = strstr((char *)b, from);
    CHECK(hit != NULL);
    if (hit) {
        size_t pre = (size_t)(hit - (char *)b), fl = strlen(from), tl = strlen(to);
        char *out = malloc(n - fl + tl + 1);
        memcpy(out, b, pre);
        memcpy(out + pre, to, tl);
        memcpy(out + pre + tl, hit + fl, n - pre - fl);
        tu_write(p, out, n - fl + tl);
        free(out);
    }
    free(b);
}

/* The shard file that dir's index names for tensor. */
static void shard_of(const char *dir, const char *tensor, char *out, size_t len) {
    char p[4096];
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", dir);
    unsigned char *b;
    size_t n;
    out[0] = '\0';
    if (tu_read(p, &b, &n) != 0) return;
    cJSON *root = cJSON_Parse((char *)b);
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(
        cJSON_GetObjectItemCaseSensitive(root, "weight_map"), tensor);
    if (cJSON_IsString(f)) snprintf(out, len, "%s", f->valuestring);
    CHECK(out[0] != '\0');
    cJSON_Delete(root);
    free(b);
}

/* ---- tests ---- */

static void test_good_and_sharded(void) {
    float *one = logits_of(at("bf16"), MDL_WEIGHTS_CHECKPOINT, 0);
    float *sharded = logits_of(at("bf16-sharded"), MDL_WEIGHTS_CHECKPOINT, 0);
    float *fp8 = logits_of(at("fp8"), MDL_WEIGHTS_CHECKPOINT, 0);
    float *fp8s = logits_of(at("fp8-sharded"), MDL_WEIGHTS_CHECKPOINT, 0);
    CHECK(one && sharded && fp8 && fp8s);
    size_t bytes = (size_t)PROMPT * VOCAB * sizeof(float);
    if (one && sharded) CHECK_MSG(!memcmp(one, sharded, bytes), "sharded bf16 logits differ");
    if (fp8 && fp8s) CHECK_MSG(!memcmp(fp8, fp8s, bytes), "sharded fp8 logits differ");
    /* the FP8 checkpoint is a different model (its own draws and scales) */
    if (one && fp8) CHECK(tm_rel_l2(fp8, one, (size_t)PROMPT * VOCAB) > 0.1);
    free(one);
    free(sharded);
    free(fp8);
    free(fp8s);
}

static void test_mtp_skipped(void) {
    mk_spec base = tiny_spec(false, 1, 0), mtp = tiny_spec(false, 1, 1);
    size_t n0 = 0, n1 = 0;
    uint64_t b0, b1;
    mk_plan_size(&base, &n0, &b0);
    mk_plan_size(&mtp, &n1, &b1);
    char want[160];
    snprintf(want, sizeof want,
             "skipping %zu tensors of layers 4..4 (beyond num_hidden_layers 4: MTP)", n1 - n0);
    log_set_level(LOG_LEVEL_INFO);
    tu_capture_begin();
    float *with = logits_of(at("mtp"), MDL_WEIGHTS_CHECKPOINT, 0);
    char *log = tu_capture_end();
    CHECK_MSG(strstr(log, want) && strstr(log, at("mtp")), "expected \"%s\" in: %s", want, log);
    CHECK(count_of(log, "skipping") == 1);
    CHECK(count_of(log, " W ") == 0 && count_of(log, " E ") == 0);
    free(log);
    /* same seed, same main-model tensors: the MTP layer changes nothing */
    float *without = logits_of(at("bf16"), MDL_WEIGHTS_CHECKPOINT, 0);
    if (with && without) CHECK(!memcmp(with, without, (size_t)PROMPT * VOCAB * sizeof(float)));
    free(with);
    free(without);
}

/* The progress lines of one load of dir with DUET_LOAD_PROGRESS_S = interval: every line
 * counts against the totals of the first, done counts never go back, the last line has every
 * tensor, and no line says the memory plan's totals and the loader disagree. Returns the
 * number of lines in between (periodic ones), or -1. */
static int progress_lines(const char *dir, mdl_weights_source src, const char *interval,
                          long long *tensors_p) {
    setenv("DUET_LOAD_PROGRESS_S", interval, 1);
    log_set_level(LOG_LEVEL_INFO);
    tu_capture_begin();
    tm_model tm;
    duet_status st = tm_load(dir, src, 5, &tm);
    char *log = tu_capture_end();
    log_set_level(LOG_LEVEL_WARN);
    unsetenv("DUET_LOAD_PROGRESS_S");
    CHECK_MSG(st == DUET_OK, "loading %s: %s", dir, duet_strerror(st));
    if (st == DUET_OK) tm_unload(&tm);
    long long total = -1, done = 0, last_done = -1;
    double total_gib = -1;
    int between = 0, bad = 0, ends = 0;
    for (char *line = strtok(log, "\n"); line; line = strtok(NULL, "\n")) {
        const char *w = strstr(line, "weights: ");
        if (!w) continue;
        long long d, t;
        double gd, gt;
        if (sscanf(w, "weights: loading %lld tensors, %lf GiB", &t, &gt) == 2) {
            total = t;
            total_gib = gt;
        } else if (sscanf(w, "weights: %lld of %lld tensors, %lf of %lf GiB", &d, &t, &gd, &gt) ==
                   4) {
            between++;
            bad += t != total || d < last_done || d > total || gt != total_gib || gd > gt ||
                   !strstr(w, "GiB/s") || !strstr(w, " s left");
            last_done = d;
        } else if (sscanf(w, "weights: loaded %lld tensors, %lf GiB in", &d, &gd) == 2) {
            ends++;
            done = d;
            bad += gd != total_gib || !strstr(w, "GiB/s");
        } else {
            bad++; /* the drift warning, or a line of another shape */
            fprintf(stderr, "unexpected: %s\n", line);
        }
    }
    CHECK_MSG(total > 0 && ends == 1 && done == total && !bad,
              "%s: %lld tensors announced, %d end lines with %lld, %d bad lines", dir, total, ends,
              done, bad);
    free(log);
    *tensors_p = total;
    return total > 0 && ends == 1 && !bad ? between : -1;
}

static void test_progress(void) {
    long long n_ckpt = 0, n_dummy = 0, n_fp8 = 0;
    /* interval 0: a line after every tensor put on the backend (gate_up fuses two) */
    int every = progress_lines(at("bf16"), MDL_WEIGHTS_CHECKPOINT, "0", &n_ckpt);
    CHECK_MSG(every > n_ckpt / 2 && every <= n_ckpt, "%d lines for %lld tensors", every, n_ckpt);
    /* the default 5 s: a load of milliseconds logs its start and end only */
    CHECK_EQ_INT(progress_lines(at("bf16"), MDL_WEIGHTS_CHECKPOINT, "5", &n_ckpt), 0);
    /* dummy weights follow the same path and count the same tensors */
    CHECK_EQ_INT(progress_lines(at("bf16"), MDL_WEIGHTS_DUMMY, "0", &n_dummy), every);
    CHECK_EQ_INT(n_dummy, n_ckpt);
    /* FP8 scales count with their weights */
    CHECK_EQ_INT(progress_lines(at("fp8"), MDL_WEIGHTS_CHECKPOINT, "0", &n_fp8), every);
    CHECK_EQ_INT(n_fp8, n_ckpt);
}

static void test_dummy(void) {
    /* config.json only, plus a model.safetensors that is garbage: dummy weights never open it */
    const char *dir = at("dummy");
    mkdir(dir, 0755);
    char p[4096];
    snprintf(p, sizeof p, "%s/config.json", dir);
    tu_copy(at("bf16/config.json"), p);
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    tu_write_str(p, "not a safetensors file");
    float *a = logits_of(dir, MDL_WEIGHTS_DUMMY, 1);
    float *b = logits_of(dir, MDL_WEIGHTS_DUMMY, 1);
    float *c = logits_of(dir, MDL_WEIGHTS_DUMMY, 2);
    CHECK(a && b && c);
    size_t n = (size_t)PROMPT * VOCAB;
    if (a && b) CHECK(!memcmp(a, b, n * sizeof(float)));
    if (a && c) CHECK(tm_rel_l2(c, a, n) > 0.1);
    /* the same directory through the checkpoint path fails on the garbage file */
    EXPECT_LOAD_FAIL(dir, DUET_ERR_FORMAT, p);
    free(a);
    free(b);
    free(c);
}

static void test_missing_tensor(void) {
    const char *t = "model.layers.2.self_attn.kv_b_proj.weight";
    const char *d = variant("bf16", "missing", "model.safetensors", edit_remove, t, NULL);
    EXPECT_LOAD_FAIL(d, DUET_ERR_NOT_FOUND, d, "missing tensor model.layers.2.self_attn.kv_b_proj");
    t = "model.layers.3.mlp.experts.7.down_proj.weight";
    d = variant("bf16", "missing-expert", "model.safetensors", edit_remove, t, NULL);
    EXPECT_LOAD_FAIL(d, DUET_ERR_NOT_FOUND, d, "missing tensor", t);
    t = "model.layers.1.mlp.gate.e_score_correction_bias";
    d = variant("bf16", "missing-bias", "model.safetensors", edit_remove, t, NULL);
    EXPECT_LOAD_FAIL(d, DUET_ERR_NOT_FOUND, d, "missing tensor", t);
    d = variant("bf16", "missing-head", "model.safetensors", edit_remove, "lm_head.weight", NULL);
    EXPECT_LOAD_FAIL(d, DUET_ERR_NOT_FOUND, d, "missing tensor lm_head.weight");
}

static void test_shape_mismatch(void) {
    /* o_proj is [hidden 256, heads 4 * v 32 = 128]; stored transposed */
    const char *t = "model.layers.1.self_attn.o_proj.weight";
    const char *d = variant("bf16", "shape", "model.safetensors", edit_swap_shape, t, NULL);
    char file[4096];
    snprintf(file, sizeof file, "%s/model.safetensors", d);
    EXPECT_LOAD_FAIL(d, DUET_ERR_FORMAT, file, t, "has shape [128, 256], expected [256, 128]",
                     "config.json");
    /* the other way round: config.json disagrees with every kv_a_proj tensor */
    d = variant("bf16", "shape-config", "", NULL, NULL, NULL);
    replace_in(d, "config.json", "\"kv_lora_rank\": 64", "\"kv_lora_rank\": 48");
    snprintf(file, sizeof file, "%s/model.safetensors", d);
    EXPECT_LOAD_FAIL(d, DUET_ERR_FORMAT, file, "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                     "has shape [80, 256], expected [64, 256]");
}

static void test_dtype(void) {
    const char *t = "model.layers.0.mlp.up_proj.weight";
    const char *d = variant("bf16", "dtype", "model.safetensors", edit_dtype, t, "F64");
    char file[4096];
    snprintf(file, sizeof file, "%s/model.safetensors", d);
    EXPECT_LOAD_FAIL(d, DUET_ERR_UNSUPPORTED, file, t, "has dtype F64, which duet does not read");
    t = "model.layers.2.mlp.gate.e_score_correction_bias";
    d = variant("bf16", "dtype-i32", "model.safetensors", edit_dtype, t, "I32");
    snprintf(file, sizeof file, "%s/model.safetensors", d);
    EXPECT_LOAD_FAIL(d, DUET_ERR_UNSUPPORTED, file, t, "has dtype I32");
}

static void test_fp8_scales(void) {
    const char *s = "model.layers.0.self_attn.q_a_proj.weight_scale_inv";
    const char *d = variant("fp8", "fp8-noscale", "model.safetensors", edit_remove, s, NULL);
    char file[4096];
    snprintf(file, sizeof file, "%s/model.safetensors", d);
    EXPECT_LOAD_FAIL(d, DUET_ERR_NOT_FOUND, file,
                     "tensor model.layers.0.self_attn.q_a_proj.weight is F8_E4M3", s, "missing");
    /* kv_a_proj is [80, 256]: scales [1, 2], stored as [2, 1] */
    s = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv";
    d = variant("fp8", "fp8-scaleshape", "model.safetensors", edit_swap_shape, s, NULL);
    snprintf(file, sizeof file, "%s/model.safetensors", d);
    EXPECT_LOAD_FAIL(d, DUET_ERR_FORMAT, file, s, "has shape [2, 1], expected [1, 2]");
    s = "model.layers.2.self_attn.o_proj.weight_scale_inv";
    d = variant("fp8", "fp8-scaledtype", "model.safetensors", edit_dtype, s, "I32");
    snprintf(file, sizeof file, "%s/model.safetensors", d);
    EXPECT_LOAD_FAIL(d, DUET_ERR_FORMAT, file, "scale tensor", s, "has dtype I32");
}

static void test_bad_files(void) {
    char file[4096];
    const char *d = variant("bf16", "trunc", "", NULL, NULL, NULL);
    snprintf(file, sizeof file, "%s/model.safetensors", d);
    unsigned char *b;
    size_t n;
    if (tu_read(file, &b, &n) == 0) {
        tu_write(file, b, n - 100);
        EXPECT_LOAD_FAIL(d, DUET_ERR_FORMAT, file, "out of range", "truncated file?");
        tu_write(file, b, 5);
        EXPECT_LOAD_FAIL(d, DUET_ERR_FORMAT, file, "truncated file: 5 bytes");
        for (int i = 0; i < 8; i++) b[i] = 0xff;
        tu_write(file, b, n);
        EXPECT_LOAD_FAIL(d, DUET_ERR_FORMAT, file, "beyond the end of the file");
        for (int i = 0; i < 8; i++) b[i] = 0;
        b[0] = 64; /* the header cut in the middle */
        tu_write(file, b, n);
        EXPECT_LOAD_FAIL(d, DUET_ERR_FORMAT, file, "malformed header JSON");
        free(b);
    }
    d = variant("bf16", "noweights", "", NULL, NULL, NULL);
    snprintf(file, sizeof file, "%s/model.safetensors", d);
    unlink(file);
    EXPECT_LOAD_FAIL(d, DUET_ERR_NOT_FOUND, d, "no model.safetensors, index or *.safetensors");
    d = variant("bf16", "noconfig", "", NULL, NULL, NULL);
    snprintf(file, sizeof file, "%s/config.json", d);
    unlink(file);
    EXPECT_LOAD_FAIL(d, DUET_ERR_NOT_FOUND, file, "cannot open");
    tu_write_str(file, "{\"model_type\": \"deepseek_v3\",");
    EXPECT_LOAD_FAIL(d, DUET_ERR_FORMAT, file, "malformed JSON");
}

static void test_bad_shards(void) {
    char file[4096];
    const char *d = variant("bf16-sharded", "noshard", "", NULL, NULL, NULL);
    snprintf(file, sizeof file, "%s/model-00002-of-00003.safetensors", d);
    unlink(file);
    EXPECT_LOAD_FAIL(d, DUET_ERR_NOT_FOUND, "model.safetensors.index.json",
                     "shard model-00002-of-00003.safetensors is missing");

    /* the index names a tensor that its shard does not hold */
    d = variant("bf16-sharded", "ghost", "", NULL, NULL, NULL);
    replace_in(d, "model.safetensors.index.json", "\"weight_map\": {",
               "\"weight_map\": {\n    \"model.layers.0.ghost.weight\": "
               "\"model-00001-of-00003.safetensors\",");
    EXPECT_LOAD_FAIL(d, DUET_ERR_FORMAT, "model.safetensors.index.json",
                     "tensor model.layers.0.ghost.weight is listed in the index but missing from "
                     "model-00001-of-00003.safetensors");

    /* a tensor removed from its shard while the index still lists it */
    char shard[256];
    shard_of(at("bf16-sharded"), "lm_head.weight", shard, sizeof shard);
    d = variant("bf16-sharded", "shard-lost", shard, edit_remove, "lm_head.weight", NULL);
    EXPECT_LOAD_FAIL(d, DUET_ERR_FORMAT, "tensor lm_head.weight is listed in the index", shard);
}

int main(void) {
    g_root = tu_mkdtemp("load");
    if (!g_root) return 1;
    tm_prompt(g_prompt, PROMPT, VOCAB, 3);
    log_set_level(LOG_LEVEL_WARN); /* the writer's progress lines */
    if (make_model("bf16", false, 1, 0) || make_model("bf16-sharded", false, 3, 0) ||
        make_model("fp8", true, 1, 0) || make_model("fp8-sharded", true, 4, 0) ||
        make_model("mtp", false, 1, 1))
        CHECK_DONE();
    test_good_and_sharded();
    test_mtp_skipped();
    test_progress();
    log_set_level(LOG_LEVEL_WARN);
    test_dummy();
    test_missing_tensor();
    test_shape_mismatch();
    test_dtype();
    test_fp8_scales();
    test_bad_files();
    test_bad_shards();
    tu_rmtree(g_root);
    free(g_root);
    CHECK_DONE();
}
