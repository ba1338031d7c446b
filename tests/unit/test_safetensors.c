/* The safetensors reader and writer at the file level. The writer round-trips and refuses
 * misuse; every kind of bad file (truncated, header length beyond the file, malformed header
 * JSON, bad entries, offsets out of range, overlapping or mis-sized tensors, duplicate names,
 * bad indexes and missing shards) fails with one error line naming the file and the problem,
 * never a crash. Files are built here byte by byte or rewritten from a good one. */
#include <stdint.h>
#include <string.h>

#include "check.h"
#include "model/safetensors.h"
#include "safetensors_write.h"
#include "testutil.h"

static char *g_dir;

static const char *at(const char *name) {
    static char bufs[4][4096];
    static int k;
    char *b = bufs[k++ & 3];
    snprintf(b, 4096, "%s/%s", g_dir, name);
    return b;
}

static duet_status open_file(const char *path) {
    st_set *s = NULL;
    duet_status st = st_open_file(path, &s);
    st_close(s);
    return st;
}

static duet_status open_dir(const char *dir) {
    st_set *s = NULL;
    duet_status st = st_open_dir(dir, &s);
    st_close(s);
    return st;
}

/* A file of an exact header text followed by data_len zero bytes. */
static void raw_file(const char *path, const char *header, size_t data_len) {
    size_t hl = strlen(header);
    unsigned char *b = calloc(1, 8 + hl + data_len);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    memcpy(b + 8, header, hl);
    tu_write(path, b, 8 + hl + data_len);
    free(b);
}

/* a: BF16 [2, 3], b: F32 [4], c: F8_E4M3 [2, 2], s: F32 scalar; data 0, 1, 2, ... */
static const int64_t SHAPE_A[] = {2, 3}, SHAPE_B[] = {4}, SHAPE_C[] = {2, 2};

static duet_status make_good(const char *path) {
    st_writer *w = NULL;
    duet_status st = st_writer_create(path, "test", &w);
    if (st != DUET_OK) return st;
    st = st_writer_declare(w, "a", DT_BF16, 2, SHAPE_A);
    if (st == DUET_OK) st = st_writer_declare(w, "b", DT_F32, 1, SHAPE_B);
    if (st == DUET_OK) st = st_writer_declare(w, "c", DT_F8_E4M3, 2, SHAPE_C);
    if (st == DUET_OK) st = st_writer_declare(w, "s", DT_F32, 0, NULL);
    if (st == DUET_OK) st = st_writer_begin(w);
    unsigned char data[36];
    for (int i = 0; i < 36; i++) data[i] = (unsigned char)i;
    /* pieces that do not follow tensor boundaries */
    if (st == DUET_OK) st = st_writer_write(w, data, 5);
    if (st == DUET_OK) st = st_writer_write(w, data + 5, 20);
    if (st == DUET_OK) st = st_writer_write(w, data + 25, 11);
    if (st == DUET_OK) st = st_writer_finish(w);
    st_writer_destroy(w);
    return st;
}

static uint64_t header_len(const unsigned char *b) {
    uint64_t h = 0;
    for (int i = 7; i >= 0; i--) h = (h << 8) | b[i];
    return h;
}

static void test_writer_roundtrip(void) {
    const char *p = at("good.safetensors");
    CHECK(make_good(p) == DUET_OK);
    unsigned char *b;
    size_t n;
    CHECK(tu_read(p, &b, &n) == 0);
    uint64_t hl = header_len(b);
    CHECK((8 + hl) % 8 == 0); /* data stays 8-byte aligned in a mapping */
    CHECK(n == 8 + hl + 36);  /* nothing but header and data */
    CHECK(strstr((char *)b + 8, "\"generated_by\":\"test\"") != NULL);
    free(b);

    st_set *s = NULL;
    CHECK(st_open_file(p, &s) == DUET_OK);
    if (!s) return;
    CHECK(st_count(s) == 4);
    const st_tensor *a = st_find(s, "a"), *tb = st_find(s, "b"), *c = st_find(s, "c"),
                    *sc = st_find(s, "s");
    CHECK(a && tb && c && sc && !st_find(s, "__metadata__"));
    if (a && tb && c && sc) {
        CHECK(a->dtype == DT_BF16 && a->ndim == 2 && a->shape[0] == 2 && a->shape[1] == 3);
        CHECK(tb->dtype == DT_F32 && tb->ndim == 1 && tb->shape[0] == 4);
        CHECK(c->dtype == DT_F8_E4M3 && c->nbytes == 4 && sc->ndim == 0 && sc->nbytes == 4);
        const unsigned char *ad = a->data, *cd = c->data, *sd = sc->data;
        CHECK(ad[0] == 0 && ad[11] == 11 && cd[0] == 28 && sd[3] == 35);
        CHECK(((uintptr_t)tb->data & 3) == 0);
        CHECK(st_numel(a) == 6 && st_numel(sc) == 1);
        CHECK(!strcmp(a->file, p));
    }
    st_close(s);
}

static void test_writer_misuse(void) {
    const char *p = at("misuse.safetensors");
    st_writer *w = NULL;
    unsigned char z[64] = {0};

    CHECK(st_writer_create(p, NULL, &w) == DUET_OK);
    CHECK(st_writer_declare(w, "x", DT_F32, 1, SHAPE_B) == DUET_OK);
    EXPECT_FAIL(st_writer_write(w, z, 4), DUET_ERR_INVALID, p, "before the header");
    CHECK(st_writer_begin(w) == DUET_OK);
    EXPECT_FAIL(st_writer_declare(w, "y", DT_F32, 1, SHAPE_B), DUET_ERR_INVALID, p, "y",
                "after the header");
    EXPECT_FAIL(st_writer_write(w, z, 17), DUET_ERR_INVALID, p, "more tensor data");
    CHECK(st_writer_write(w, z, 8) == DUET_OK);
    EXPECT_FAIL(st_writer_finish(w), DUET_ERR_INVALID, p, "8 of 16 bytes");
    st_writer_destroy(w);
    CHECK(access(p, F_OK) != 0); /* an unfinished file does not stay behind */

    CHECK(st_writer_create(p, NULL, &w) == DUET_OK);
    CHECK(st_writer_declare(w, "x", DT_F32, 1, SHAPE_B) == DUET_OK);
    CHECK(st_writer_declare(w, "x", DT_F32, 1, SHAPE_B) == DUET_OK);
    EXPECT_FAIL(st_writer_begin(w), DUET_ERR_INVALID, p, "x declared twice");
    int64_t neg[] = {-1};
    EXPECT_FAIL(st_writer_declare(w, "n", DT_F32, 1, neg), DUET_ERR_INVALID, p, "n");
    EXPECT_FAIL(st_writer_declare(w, "__metadata__", DT_F32, 1, SHAPE_B), DUET_ERR_INVALID, p);
    st_writer_destroy(w);
    st_writer_destroy(NULL);

    const char *nodir = at("no/such/dir/x.safetensors");
    EXPECT_FAIL(st_writer_create(nodir, NULL, &w), DUET_ERR_NOT_FOUND, nodir, "cannot create");
}

/* Every truncation of a good file fails cleanly, saying what is missing. */
static void test_truncated(void) {
    unsigned char *b;
    size_t n;
    const char *good = at("good.safetensors"), *p = at("trunc.safetensors");
    if (tu_read(good, &b, &n) != 0) {
        CHECK(0);
        return;
    }
    uint64_t hl = header_len(b);
    for (size_t len = 0; len < n; len++) {
        tu_write(p, b, len);
        if (len < 8)
            EXPECT_FAIL(open_file(p), DUET_ERR_FORMAT, p, "truncated file");
        else if (len < 8 + hl)
            EXPECT_FAIL(open_file(p), DUET_ERR_FORMAT, p, "beyond the end of the file");
        else
            EXPECT_FAIL(open_file(p), DUET_ERR_FORMAT, p, "out of range", "truncated file?");
    }
    tu_write(p, b, n);
    CHECK(open_file(p) == DUET_OK);
    free(b);
}

static void set_header_len(const char *src, const char *dst, uint64_t hl) {
    unsigned char *b;
    size_t n;
    if (tu_read(src, &b, &n) != 0) return;
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)(hl >> (8 * i));
    tu_write(dst, b, n);
    free(b);
}

static void test_header_length(void) {
    const char *good = at("good.safetensors"), *p = at("hlen.safetensors");
    unsigned char *b;
    size_t n;
    if (tu_read(good, &b, &n) != 0) return;
    free(b);
    set_header_len(good, p, n - 7);
    EXPECT_FAIL(open_file(p), DUET_ERR_FORMAT, p, "header length", "beyond the end of the file");
    set_header_len(good, p, UINT64_MAX);
    EXPECT_FAIL(open_file(p), DUET_ERR_FORMAT, p, "header length 18446744073709551615",
                "beyond the end");
    set_header_len(good, p, 0);
    EXPECT_FAIL(open_file(p), DUET_ERR_FORMAT, p, "header length 0 is not plausible");
    /* a shorter length cuts the JSON */
    set_header_len(good, p, 16);
    EXPECT_FAIL(open_file(p), DUET_ERR_FORMAT, p, "malformed header JSON");
}

static void test_malformed_json(void) {
    const char *p = at("json.safetensors");
    raw_file(p, "{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,12]", 12);
    EXPECT_FAIL(open_file(p), DUET_ERR_FORMAT, p, "malformed header JSON");
    raw_file(p, "[{\"a\":1}]", 0);
    EXPECT_FAIL(open_file(p), DUET_ERR_FORMAT, p, "malformed header JSON");
    raw_file(p, "not json at all", 4);
    EXPECT_FAIL(open_file(p), DUET_ERR_FORMAT, p, "malformed header JSON");
    raw_file(p, "{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,12]}}\x01\x02", 12);
    EXPECT_FAIL(open_file(p), DUET_ERR_FORMAT, p, "malformed header JSON");
}

static void test_bad_entries(void) {
    const char *p = at("entry.safetensors");
    static const struct {
        const char *header;
        const char *phrase;
    } cases[] = {
        {"{\"a\":5}", "malformed header entry for tensor a"},
        {"{\"a\":{\"shape\":[2,3],\"data_offsets\":[0,12]}}",
         "malformed header entry for tensor a"},
        {"{\"a\":{\"dtype\":7,\"shape\":[2,3],\"data_offsets\":[0,12]}}", "malformed header entry"},
        {"{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,3]}}", "malformed header entry for tensor a"},
        {"{\"a\":{\"dtype\":\"BF16\",\"shape\":6,\"data_offsets\":[0,12]}}", "malformed header"},
        {"{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,6,12]}}",
         "malformed header entry"},
        {"{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,-3],\"data_offsets\":[0,12]}}",
         "malformed shape or data_offsets for tensor a"},
        {"{\"a\":{\"dtype\":\"BF16\",\"shape\":[\"2\",3],\"data_offsets\":[0,12]}}",
         "malformed shape or data_offsets"},
        {"{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[12,0]}}",
         "malformed shape or data_offsets"},
        {"{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[-4,8]}}",
         "malformed shape or data_offsets"},
        {"{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,\"12\"]}}",
         "malformed shape or data_offsets"},
        {"{\"a\":{\"dtype\":\"BF16\",\"shape\":[2.5,2],\"data_offsets\":[0,10]}}",
         "malformed shape or data_offsets"},
        {"{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0.5,12.5]}}",
         "malformed shape or data_offsets"},
        {"{\"a\":{\"dtype\":\"BF16\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,2]}}",
         "9 dimensions, more than 8"},
        {"{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,1000]}}",
         "tensor a data_offsets [0, 1000] are out of range: the data area holds 16 bytes"},
        {"{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,10]}}",
         "tensor a spans 10 bytes but its shape and dtype BF16 need 12"},
        {"{\"a\":{\"dtype\":\"BF16\",\"shape\":[1000000000000000,1000000000000000],"
         "\"data_offsets\":[0,12]}}",
         "tensor a spans 12 bytes"},
        {"{\"a\":{\"dtype\":\"BF16\",\"shape\":[2,3],\"data_offsets\":[0,12]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
         "tensors a and b overlap"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        raw_file(p, cases[i].header, 16);
        tu_capture_begin();
        duet_status st = open_file(p);
        char *log = tu_capture_end();
        CHECK_MSG(st == DUET_ERR_FORMAT, "case %zu: status %d", i, st);
        CHECK_MSG(tu_count_lines(log) == 1 && strstr(log, p) && strstr(log, cases[i].phrase),
                  "case %zu: expected one line naming %s and \"%s\", got: %s", i, p,
                  cases[i].phrase, log);
        free(log);
    }
    /* Unknown dtypes are not the reader's business: the loader refuses them by name. */
    raw_file(p, "{\"a\":{\"dtype\":\"F64\",\"shape\":[2],\"data_offsets\":[0,16]}}", 16);
    st_set *s = NULL;
    CHECK(st_open_file(p, &s) == DUET_OK);
    const st_tensor *t = s ? st_find(s, "a") : NULL;
    CHECK(t && t->dtype == -1 && !strcmp(t->dtype_name, "F64"));
    st_close(s);
    /* an empty header object is a valid file with no tensors */
    raw_file(p, "{}", 0);
    CHECK(open_file(p) == DUET_OK);
}

/* Random corruption of a good header: open either succeeds silently or fails with one line. */
static void test_header_flips(void) {
    const char *good = at("good.safetensors"), *p = at("flip.safetensors");
    unsigned char *b;
    size_t n;
    if (tu_read(good, &b, &n) != 0) return;
    uint64_t hl = header_len(b);
    static const unsigned char masks[] = {0x01, 0x04, 0x20, 0x80};
    int failed = 0, opened = 0;
    for (size_t i = 8; i < 8 + hl; i++) {
        for (size_t m = 0; m < sizeof masks; m++) {
            b[i] ^= masks[m];
            tu_write(p, b, n);
            b[i] ^= masks[m];
            tu_capture_begin();
            duet_status st = open_file(p);
            char *log = tu_capture_end();
            int lines = tu_count_lines(log);
            CHECK_MSG(st == DUET_OK ? lines == 0 : (lines == 1 && strstr(log, p) != NULL),
                      "byte %zu ^ 0x%02x: status %d, log: %s", i, masks[m], st, log);
            st == DUET_OK ? opened++ : failed++;
            free(log);
        }
    }
    CHECK(failed > 0 && opened > 0);
    free(b);
}

static void test_dirs(void) {
    char *empty = tu_mkdtemp("st-empty");
    EXPECT_FAIL(open_dir(empty), DUET_ERR_NOT_FOUND, empty,
                "no model.safetensors, index or *.safetensors file");
    const char *gone = at("no-such-dir");
    EXPECT_FAIL(open_dir(gone), DUET_ERR_NOT_FOUND, gone, "cannot open model directory");

    /* without index or model.safetensors: every *.safetensors file, names unique across them */
    char p1[4096], p2[4096];
    snprintf(p1, sizeof p1, "%s/one.safetensors", empty);
    snprintf(p2, sizeof p2, "%s/two.safetensors", empty);
    make_good(p1);
    raw_file(p2, "{\"d\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4);
    st_set *s = NULL;
    CHECK(st_open_dir(empty, &s) == DUET_OK);
    CHECK(s && st_count(s) == 5 && st_find(s, "a") && st_find(s, "d"));
    st_close(s);
    raw_file(p2, "{\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4);
    EXPECT_FAIL(open_dir(empty), DUET_ERR_FORMAT, "tensor b appears twice", "one.safetensors",
                "two.safetensors");
    tu_rmtree(empty);
    free(empty);
}

static void test_index(void) {
    char *d = tu_mkdtemp("st-index");
    char s1[4096], s2[4096], idx[4096];
    snprintf(s1, sizeof s1, "%s/model-00001-of-00002.safetensors", d);
    snprintf(s2, sizeof s2, "%s/model-00002-of-00002.safetensors", d);
    snprintf(idx, sizeof idx, "%s/model.safetensors.index.json", d);
    make_good(s1);
    raw_file(s2, "{\"d\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4);
    const char *good = "{\"metadata\":{\"total_size\":40},\"weight_map\":{"
                       "\"a\":\"model-00001-of-00002.safetensors\","
                       "\"b\":\"model-00001-of-00002.safetensors\","
                       "\"c\":\"model-00001-of-00002.safetensors\","
                       "\"s\":\"model-00001-of-00002.safetensors\","
                       "\"d\":\"model-00002-of-00002.safetensors\"}}";
    tu_write_str(idx, good);
    st_set *s = NULL;
    CHECK(st_open_dir(d, &s) == DUET_OK);
    const st_tensor *t = s ? st_find(s, "d") : NULL;
    CHECK(t && !strcmp(t->file, s2));
    st_close(s);

    tu_write_str(idx, "{\"weight_map\":{\"a\":");
    EXPECT_FAIL(open_dir(d), DUET_ERR_FORMAT, idx, "malformed JSON");
    tu_write_str(idx, "{\"metadata\":{}}");
    EXPECT_FAIL(open_dir(d), DUET_ERR_FORMAT, idx, "no \"weight_map\" object");
    tu_write_str(idx, "{\"weight_map\":{\"a\":\"../model-00001-of-00002.safetensors\"}}");
    EXPECT_FAIL(open_dir(d), DUET_ERR_FORMAT, idx, "weight_map entry for a", "plain file name");
    tu_write_str(idx, "{\"weight_map\":{\"a\":5}}");
    EXPECT_FAIL(open_dir(d), DUET_ERR_FORMAT, idx, "weight_map entry for a");

    /* a tensor the index places in a shard that does not hold it */
    tu_write_str(idx, "{\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\","
                      "\"zz\":\"model-00001-of-00002.safetensors\"}}");
    EXPECT_FAIL(open_dir(d), DUET_ERR_FORMAT, idx, "tensor zz is listed in the index",
                "missing from model-00001-of-00002.safetensors");
    tu_write_str(idx, "{\"weight_map\":{\"a\":\"model-00002-of-00002.safetensors\","
                      "\"d\":\"model-00001-of-00002.safetensors\"}}");
    EXPECT_FAIL(open_dir(d), DUET_ERR_FORMAT, idx, "is listed in model-0000", "but found in");

    /* a shard the index names but the directory lacks */
    tu_write_str(idx, "{\"weight_map\":{\"a\":\"model-00001-of-00002.safetensors\","
                      "\"q\":\"model-00003-of-00002.safetensors\"}}");
    EXPECT_FAIL(open_dir(d), DUET_ERR_NOT_FOUND, "model-00003-of-00002.safetensors", idx,
                "missing");

    /* a bad shard is named as the file at fault */
    tu_write_str(idx, good);
    unsigned char *b;
    size_t n;
    if (tu_read(s1, &b, &n) == 0) {
        tu_write(s1, b, n - 3);
        free(b);
    }
    EXPECT_FAIL(open_dir(d), DUET_ERR_FORMAT, s1, "out of range");
    tu_rmtree(d);
    free(d);
}

int main(void) {
    g_dir = tu_mkdtemp("st");
    if (!g_dir) return 1;
    test_writer_roundtrip();
    test_writer_misuse();
    test_truncated();
    test_header_length();
    test_malformed_json();
    test_bad_entries();
    test_header_flips();
    test_dirs();
    test_index();
    tu_rmtree(g_dir);
    free(g_dir);
    CHECK_DONE();
}
