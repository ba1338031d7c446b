/* Tokenizer beyond the golden cases: results derived from the rules (pre-tokenizer pieces,
 * added-token matching, byte-level round trips, UTF-8 repair), a small synthetic tokenizer.json
 * for the features DeepSeek's file does not use, refusals of bad files, speed and threads. */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "check.h"
#include "base/fileio.h"
#include "base/log.h"
#include "text/tokenizer.h"

static tok_tokenizer *g_v3;

/* ---- helpers -------------------------------------------------------------------------------- */

typedef struct ids {
    int32_t *v;
    size_t n;
} ids;

static ids enc(const tok_tokenizer *t, const char *s, size_t len) {
    ids r = {NULL, 0};
    duet_status st = tok_encode(t, s, len, false, &r.v, &r.n);
    CHECK_MSG(st == DUET_OK, "encode \"%s\": %s", s, duet_strerror(st));
    return r;
}

static ids encs(const char *s) {
    return enc(g_v3, s, strlen(s));
}

static ids cat(ids a, ids b) {
    ids r = {malloc((a.n + b.n + 1) * sizeof(int32_t)), a.n + b.n};
    if (a.n) memcpy(r.v, a.v, a.n * sizeof(int32_t));
    if (b.n) memcpy(r.v + a.n, b.v, b.n * sizeof(int32_t));
    free(a.v);
    free(b.v);
    return r;
}

static ids one(int32_t id) {
    ids r = {malloc(sizeof(int32_t)), 1};
    r.v[0] = id;
    return r;
}

static bool ids_eq(ids a, ids b) {
    return a.n == b.n && (a.n == 0 || !memcmp(a.v, b.v, a.n * sizeof(int32_t)));
}

/* encode(s) must equal want (consumed). */
#define CHECK_ENC(s, want)                                                                         \
    do {                                                                                           \
        ids got_ = encs(s), want_ = (want);                                                        \
        CHECK_MSG(ids_eq(got_, want_), "encode \"%s\": %zu ids, want %zu", s, got_.n, want_.n);    \
        free(got_.v);                                                                              \
        free(want_.v);                                                                             \
    } while (0)

static char *dec(const tok_tokenizer *t, ids x, bool skip, size_t *len_p) {
    char *out = NULL;
    size_t len = 0;
    CHECK(tok_decode(t, x.v, x.n, skip, &out, &len) == DUET_OK);
    if (len_p) *len_p = len;
    return out;
}

/* Joins the stream's outputs for x. */
static char *stream_all(const tok_tokenizer *t, ids x, bool skip, size_t *len_p) {
    tok_stream *s;
    CHECK(tok_stream_create(t, skip, &s) == DUET_OK);
    char *out = malloc(3 * (x.n * tok_max_piece_len(t) + 4) + 1);
    size_t n = 0;
    for (size_t i = 0; i < x.n; i++) {
        const char *p;
        size_t l;
        CHECK(tok_stream_put(s, x.v[i], &p, &l) == DUET_OK);
        memcpy(out + n, p, l);
        n += l;
    }
    const char *p;
    size_t l;
    tok_stream_finish(s, &p, &l);
    memcpy(out + n, p, l);
    n += l;
    out[n] = '\0';
    tok_stream_destroy(s);
    *len_p = n;
    return out;
}

/* decode(encode(s)) == s for valid UTF-8; the stream agrees with decode; the pieces' bytes
 * join up to s exactly, valid or not. */
static void round_trip(const tok_tokenizer *t, const char *s, size_t len) {
    ids x = enc(t, s, len);
    size_t dl, sl, pl = 0;
    char *d = dec(t, x, false, &dl);
    char *st = stream_all(t, x, false, &sl);
    char *raw = malloc(len + 1);
    bool pieces_ok = true;
    for (size_t i = 0; i < x.n; i++) {
        const char *p;
        size_t l;
        if (tok_id_to_piece(t, x.v[i], &p, &l) != DUET_OK || pl + l > len) {
            pieces_ok = false;
            break;
        }
        memcpy(raw + pl, p, l);
        pl += l;
    }
    CHECK_MSG(pieces_ok && pl == len && !memcmp(raw, s, len), "pieces of \"%.40s\"", s);
    CHECK_MSG(dl == sl && d && st && !memcmp(d, st, dl), "stream vs decode of \"%.40s\"", s);
    free(raw);
    free(d);
    free(st);
    free(x.v);
}

static void round_trip_text(const tok_tokenizer *t, const char *s) {
    size_t len = strlen(s), dl;
    round_trip(t, s, len);
    ids x = enc(t, s, len);
    char *d = dec(t, x, false, &dl);
    CHECK_MSG(d && dl == len && !memcmp(d, s, len), "decode(encode(\"%.40s\"))", s);
    free(d);
    free(x.v);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- DeepSeek-V3, by the rules -------------------------------------------------------------- */

static void test_lookups(void) {
    const tok_tokenizer *t = g_v3;
    CHECK_EQ_INT(tok_vocab_size(t), 128815);
    CHECK_EQ_INT(tok_bos_id(t), 0);
    CHECK_EQ_INT(tok_eos_id(t), 1);
    CHECK(tok_add_bos(t) && !tok_add_eos(t));
    CHECK_EQ_INT(tok_token_to_id(t, "<｜end▁of▁sentence｜>"), 1);
    CHECK_EQ_INT(tok_token_to_id(t, "<｜User｜>"), 128803);
    CHECK_EQ_INT(tok_token_to_id(t, "Hello"), 19923);
    CHECK_EQ_INT(tok_token_to_id(t, "Ċ"), 201); /* vocabulary entries use byte-level spelling */
    CHECK_EQ_INT(tok_token_to_id(t, "no such token at all"), -1);
    CHECK_EQ_INT(tok_token_to_id(t, NULL), -1);
    CHECK(tok_is_special(t, 0) && tok_is_special(t, 1) && tok_is_special(t, 128805));
    CHECK(!tok_is_special(t, 128803) && !tok_is_special(t, 19923));
    CHECK(!tok_is_special(t, -1) && !tok_is_special(t, 128815) && !tok_is_special(t, INT32_MAX));
    const char *p;
    size_t l;
    CHECK(tok_id_to_piece(t, 201, &p, &l) == DUET_OK && l == 1 && p[0] == '\n');
    CHECK(tok_id_to_piece(t, 223, &p, &l) == DUET_OK && l == 1 && p[0] == ' ');
    CHECK(tok_id_to_piece(t, 0, &p, &l) == DUET_OK && l == strlen("<｜begin▁of▁sentence｜>") &&
          !memcmp(p, "<｜begin▁of▁sentence｜>", l));
    CHECK(tok_id_to_piece(t, -5, &p, &l) == DUET_ERR_INVALID);
    CHECK(tok_id_to_piece(t, 128815, &p, &l) == DUET_ERR_INVALID);
    CHECK(tok_max_piece_len(t) >= 16 && tok_max_piece_len(t) < 1024);
}

static void test_pieces_by_rule(void) {
    /* \p{N}{1,3}: digit runs are cut into threes from the left, in any script. */
    CHECK_ENC("1234567", cat(cat(encs("123"), encs("456")), encs("7")));
    CHECK_ENC("١٢٣٤", cat(encs("١٢٣"), encs("٤")));
    CHECK_ENC("x2024y", cat(cat(encs("x"), encs("202")), cat(encs("4"), encs("y"))));
    /* CJK runs are one piece of their own, apart from the letters around them. */
    CHECK_ENC("abc中文def", cat(cat(encs("abc"), encs("中文")), encs("def")));
    /* \s+(?!\S) keeps the last space of a run for the word after it. */
    CHECK_ENC("a    b", cat(cat(encs("a"), encs("   ")), encs(" b")));
    CHECK_ENC("a \t b", cat(cat(encs("a"), encs(" \t")), encs(" b")));
    /* \s*[\r\n]+ takes spaces up to and including line breaks. */
    CHECK_ENC("x  \r\ny", cat(cat(encs("x"), encs("  \r\n")), encs("y")));
    CHECK_ENC("x\r\n\r\ny", cat(cat(encs("x"), encs("\r\n\r\n")), encs("y")));
    /* Punctuation runs take one leading space and the line breaks after them. */
    CHECK_ENC("a !?\n\nb", cat(cat(encs("a"), encs(" !?\n\n")), encs("b")));
    /* Oniguruma's \s includes U+0085 (NEL): " \u0085" is one whitespace piece there. */
    CHECK_ENC("a \xc2\x85 b", cat(cat(encs("a"), encs(" \xc2\x85")), encs(" b")));
}

static void test_added_tokens(void) {
    /* Added tokens are cut out first wherever they are, special or not. */
    CHECK_ENC("abc<｜end▁of▁sentence｜>def", cat(cat(encs("abc"), one(1)), encs("def")));
    CHECK_ENC("x<｜User｜><｜User｜>y",
              cat(cat(cat(encs("x"), one(128803)), one(128803)), encs("y")));
    CHECK_ENC("  <｜Assistant｜>  ", cat(cat(encs("  "), one(128804)), encs("  ")));
    /* No lstrip/rstrip in these files: spaces next to a token stay text. */
    CHECK_ENC("a <|EOT|> b", cat(cat(encs("a "), one(128805)), encs(" b")));
    /* A cut-off token is plain text. */
    ids part = encs("<｜end▁of▁sent");
    bool has_eos = false;
    for (size_t i = 0; i < part.n; i++) has_eos |= part.v[i] == 1;
    CHECK(!has_eos && part.n > 1);
    free(part.v);
    round_trip_text(g_v3, "<｜end▁of▁sent<｜User｜");
    /* The longest token wins where two start at the same place: none here is a prefix of
     * another, so check leftmost: the earlier start wins over a longer later one. */
    CHECK_ENC("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>", cat(one(128806), one(128808)));
    /* add_special follows the post-processor, which for DeepSeek (ByteLevel) adds nothing. */
    int32_t *a, *b;
    size_t na, nb;
    CHECK(tok_encode(g_v3, "hi there", 8, true, &a, &na) == DUET_OK);
    CHECK(tok_encode(g_v3, "hi there", 8, false, &b, &nb) == DUET_OK);
    CHECK(na == nb && !memcmp(a, b, na * sizeof *a));
    free(a);
    free(b);
}

static void test_round_trips(void) {
    static const char *const texts[] = {
        "深度求索（DeepSeek）成立于2023年，专注于研究世界领先的通用人工智能底层模型与技术，"
        "挑战人工智能前沿性难题。基于自研训练框架、自建智算集群和万卡算力等资源，"
        "深度求索团队仅用半年时间便已发布并开源多个百亿级参数大模型。",
        "#include <stdio.h>\nint main(int argc, char **argv) {\n\tfor (int i = 0; i < argc; "
        "i++)\n\t\tprintf(\"%s\\n\", argv[i]);\n\treturn 0;\n}\n",
        "def f(x):\r\n    return {'a': [1, 2.5e-3, None], \"b\": x ** 2}  # comment\r\n",
        "emoji 😀😃😄 flags 🇨🇳🇺🇸 skin 👋🏿"
        " zwj 👩‍💻 keycap 1️⃣"
        " variation ☺︎☺️",
        "mixed: English, 中文, 日本語, 한국어, русский, العربية, עברית, हिन्दी, ไทย, Ελληνικά",
        "numbers 0 1 12 123 1234 12345 1234567 3.14159 -2.5e+10 1,000,000 ٣٤٥ ⅣⅤ ①②",
        "   leading and trailing   \t\t\n\n\n   ",
        "\r\n\r\n\n\r \r \n",
        "a\u00a0b\u2009c\u3000d\u200be\ufeff\u2028f\u2029g",
        "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 Z\u0351\u0352\u0353",
        "tokens <｜User｜>inside<｜Assistant｜> text<｜end▁of▁sentence｜>and <|EOT|> more",
        "<think>\nreasoning here\n</think>\n\nanswer",
        "quotes “” ‘’ «» „“ — – … · • ™ © ® ° ± × ÷ € £ ¥",
        "",
        " ",
        "x",
    };
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++) round_trip_text(g_v3, texts[i]);
    /* Every single byte value and every code point class boundary. */
    char buf[8];
    for (unsigned b = 1; b < 0x80; b++) {
        buf[0] = (char)b;
        buf[1] = '\0';
        round_trip_text(g_v3, buf);
    }
    static const uint32_t cps[] = {0x80, 0x7ff, 0x800, 0xfffd, 0xffff, 0x10000, 0x10ffff, 0xe000};
    for (size_t i = 0; i < sizeof cps / sizeof *cps; i++) {
        uint32_t cp = cps[i];
        size_t n = cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
        if (n == 2) {
            buf[0] = (char)(0xc0 | cp >> 6);
        } else if (n == 3) {
            buf[0] = (char)(0xe0 | cp >> 12);
            buf[1] = (char)(0x80 | (cp >> 6 & 0x3f));
        } else {
            buf[0] = (char)(0xf0 | cp >> 18);
            buf[1] = (char)(0x80 | (cp >> 12 & 0x3f));
            buf[2] = (char)(0x80 | (cp >> 6 & 0x3f));
        }
        buf[n - 1] = (char)(0x80 | (cp & 0x3f));
        buf[n] = '\0';
        round_trip_text(g_v3, buf);
    }
    /* Embedded NUL: lengths, not C strings. */
    round_trip(g_v3, "a\0b\0\0c", 6);
}

static void test_invalid_utf8(void) {
    /* Invalid input is encoded byte for byte; decode then shows U+FFFD per maximal invalid
     * subpart, as HF (Rust's from_utf8_lossy) does. */
    static const struct {
        const char *in, *out;
    } cases[] = {
        {"\xff", "\xef\xbf\xbd"},
        {"a\xc3", "a\xef\xbf\xbd"},                               /* truncated at the end */
        {"\xe4\xb8x", "\xef\xbf\xbdx"},                           /* 2 of 3 bytes: one U+FFFD */
        {"\x80\x80", "\xef\xbf\xbd\xef\xbf\xbd"},                 /* lone continuations */
        {"\xed\xa0\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"}, /* surrogate: 3 */
        {"\xf0\x9f\x98", "\xef\xbf\xbd"},                         /* cut emoji */
        {"\xc0\xaf", "\xef\xbf\xbd\xef\xbf\xbd"},                 /* overlong */
        {"\xf4\x90\x80\x80", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"}, /* > U+10FFFF */
        {"ok \xfe\xff 中\x80文 <｜User｜>\xe4", "ok \xef\xbf\xbd\xef\xbf\xbd 中\xef\xbf\xbd文 "
                                                "<｜User｜>\xef\xbf\xbd"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        size_t len = strlen(cases[i].in), dl;
        round_trip(g_v3, cases[i].in, len);
        ids x = enc(g_v3, cases[i].in, len);
        char *d = dec(g_v3, x, false, &dl);
        CHECK_MSG(d && !strcmp(d, cases[i].out), "lossy decode of case %zu", i);
        free(d);
        free(x.v);
    }
}

static void test_decode(void) {
    ids x = cat(cat(one(0), encs("hi")), cat(one(1), one(128803)));
    size_t l;
    char *d = dec(g_v3, x, true, &l);
    CHECK(d && !strcmp(d, "hi<｜User｜>"));
    free(d);
    d = dec(g_v3, x, false, &l);
    CHECK(d && !strcmp(d, "<｜begin▁of▁sentence｜>hi<｜end▁of▁sentence｜><｜User｜>"));
    free(d);
    free(x.v);
    char *out = (char *)"untouched";
    size_t len = 7;
    int32_t bad[] = {19923, 128815};
    CHECK(tok_decode(g_v3, bad, 2, false, &out, &len) == DUET_ERR_INVALID);
    int32_t neg[] = {-1};
    CHECK(tok_decode(g_v3, neg, 1, false, &out, &len) == DUET_ERR_INVALID);
    CHECK(!strcmp(out, "untouched") && len == 7); /* outputs set only on success */
    CHECK(tok_decode(g_v3, NULL, 0, false, &out, &len) == DUET_OK && len == 0 && out[0] == '\0');
    free(out);
}

static void test_stream(void) {
    /* 🙂 is two tokens (80300 then 227): nothing comes out until the second. */
    tok_stream *s;
    CHECK(tok_stream_create(g_v3, false, &s) == DUET_OK);
    const char *p;
    size_t l;
    CHECK(tok_stream_put(s, 80300, &p, &l) == DUET_OK && l == 0);
    CHECK(tok_stream_put(s, 227, &p, &l) == DUET_OK && l == 4 && !memcmp(p, "🙂", 4));
    /* A bad id is refused and changes nothing. */
    CHECK(tok_stream_put(s, 80300, &p, &l) == DUET_OK && l == 0);
    CHECK(tok_stream_put(s, -3, &p, &l) == DUET_ERR_INVALID);
    CHECK(tok_stream_put(s, 128900, &p, &l) == DUET_ERR_INVALID);
    CHECK(tok_stream_put(s, 227, &p, &l) == DUET_OK && l == 4 && !memcmp(p, "🙂", 4));
    /* A held prefix followed by a byte that cannot continue it: U+FFFD, then the text. */
    ids lead = enc(g_v3, "\xe4", 1);
    CHECK(lead.n == 1);
    CHECK(tok_stream_put(s, lead.v[0], &p, &l) == DUET_OK && l == 0);
    CHECK(tok_stream_put(s, tok_token_to_id(g_v3, "x"), &p, &l) == DUET_OK);
    CHECK(l == 4 && !memcmp(p, "\xef\xbf\xbdx", 4));
    /* finish turns a held prefix into U+FFFD and resets. */
    CHECK(tok_stream_put(s, lead.v[0], &p, &l) == DUET_OK && l == 0);
    tok_stream_finish(s, &p, &l);
    CHECK(l == 3 && !memcmp(p, "\xef\xbf\xbd", 3));
    tok_stream_finish(s, &p, &l);
    CHECK(l == 0);
    tok_stream_destroy(s);
    free(lead.v);

    /* skip_special drops special tokens only; held bytes carry across them. */
    CHECK(tok_stream_create(g_v3, true, &s) == DUET_OK);
    CHECK(tok_stream_put(s, 80300, &p, &l) == DUET_OK && l == 0);
    CHECK(tok_stream_put(s, 1, &p, &l) == DUET_OK && l == 0);
    CHECK(tok_stream_put(s, 227, &p, &l) == DUET_OK && l == 4);
    CHECK(tok_stream_put(s, 128803, &p, &l) == DUET_OK && l == strlen("<｜User｜>"));
    tok_stream_destroy(s);
    tok_stream_destroy(NULL);
}

/* ---- speed and threads ---------------------------------------------------------------------- */

/* About 100 KB of varied text that repeats little: words, numbers, CJK, emoji, code. */
static char *make_text(size_t target, size_t *len_p) {
    static const char *const words[] = {
        "the",        "model", "serves",  "tokens", "quickly", "while",   "experts", "route",
        "MLA",        "cache", "prefill", "decode", "数据",    "模型",    "推理",    "です",
        "ありがとう", "🙂",  "naïve",   "Größe",  "x+=1;",   "{\"k\":", "[1,2]",   "\n",
        "\n\n",       "\t",    "  ",      "—",      "...",
    };
    char *s = malloc(target + 64);
    size_t n = 0;
    uint64_t r = 88172645463325252ull;
    while (n < target) {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        if (r % 5 == 0) {
            n += (size_t)snprintf(s + n, 64, " %llu", (unsigned long long)(r >> 40));
        } else if (r % 7 == 0) {
            /* a made-up word, so the word cache cannot do all the work */
            s[n++] = ' ';
            for (int k = 0; k < 3 + (int)(r >> 60); k++)
                s[n++] = (char)('a' + (r >> (4 * (k % 16))) % 26);
        } else {
            const char *w = words[(r >> 20) % (sizeof words / sizeof *words)];
            if (r & 1) s[n++] = ' ';
            memcpy(s + n, w, strlen(w));
            n += strlen(w);
        }
    }
    s[n] = '\0';
    *len_p = n;
    return s;
}

static void time_encode(const char *what, const char *s, size_t len) {
    double t0 = now_s();
    ids x = enc(g_v3, s, len);
    double dt = now_s() - t0;
    fprintf(stderr, "encode %-28s %7zu bytes -> %6zu ids in %6.1f ms\n", what, len, x.n, 1e3 * dt);
    /* Well under a second even on a busy 2-core CI machine. */
    CHECK_MSG(dt < 1.0, "encoding %s took %.2f s", what, dt);
    size_t dl;
    char *d = dec(g_v3, x, false, &dl);
    CHECK_MSG(d && dl == len && !memcmp(d, s, len), "round trip of %s", what);
    free(d);
    free(x.v);
}

static void test_speed(void) {
    size_t len;
    char *text = make_text(100 * 1000, &len);
    time_encode("varied text", text, len);
    free(text);

    size_t n = 100 * 1000;
    char *s = malloc(n + 4);
    memset(s, ' ', n);
    time_encode("spaces", s, n);
    memset(s, 'a', n);
    time_encode("one 100k-letter word", s, n);
    for (size_t i = 0; i < n; i++) s[i] = (char)('0' + i % 10);
    time_encode("digits", s, n);
    static const char cjk[] = "中文字";
    for (size_t i = 0; i + 3 <= n; i += 3) memcpy(s + i, &cjk[(i / 3 % 3) * 3], 3);
    time_encode("one CJK run", s, n / 3 * 3);
    for (size_t i = 0; i < n; i++) s[i] = (char)(i % 2 ? '\n' : '\r');
    time_encode("line breaks", s, n);
    for (size_t i = 0; i < n; i++) s[i] = "<｜User｜>"[i % 4];
    time_encode("added-token prefixes", s, n);
    free(s);
}

typedef struct thread_arg {
    const char *text;
    size_t len;
    ids want;
    bool ok;
} thread_arg;

static void *thread_main(void *p) {
    thread_arg *a = p;
    a->ok = true;
    for (int rep = 0; rep < 3; rep++) {
        int32_t *v;
        size_t n;
        if (tok_encode(g_v3, a->text, a->len, false, &v, &n) != DUET_OK) {
            a->ok = false;
            return NULL;
        }
        a->ok &= n == a->want.n && !memcmp(v, a->want.v, n * sizeof *v);
        char *d;
        size_t dl;
        a->ok &= tok_decode(g_v3, v, n, false, &d, &dl) == DUET_OK && dl == a->len &&
                 !memcmp(d, a->text, dl);
        free(d);
        free(v);
    }
    return NULL;
}

static void test_threads(void) {
    size_t len;
    char *text = make_text(30 * 1000, &len);
    ids want = enc(g_v3, text, len);
    pthread_t th[4];
    thread_arg args[4];
    for (int i = 0; i < 4; i++) {
        args[i] = (thread_arg){text, len, want, false};
        CHECK(pthread_create(&th[i], NULL, thread_main, &args[i]) == 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        CHECK_MSG(args[i].ok, "thread %d", i);
    }
    free(want.v);
    free(text);
}

/* ---- a synthetic tokenizer.json ------------------------------------------------------------- */

static char g_dir[64];

/* Ids 0..255: the byte-level character of that byte (127 left out, to have a hole), then
 * merges a+b, ab+c, Ġ+a, a+-, -+b, -+-. */
static const char *const MERGES[][2] = {{"a", "b"}, {"ab", "c"}, {"Ġ", "a"},
                                        {"a", "-"}, {"-", "b"},  {"-", "-"}};
enum { ID_AB = 256, ID_ABC, ID_SP_A, ID_A_DASH, ID_DASH_B, ID_DASH_DASH };

static size_t bl_char(unsigned b, char *out) {
    unsigned n = 0, cp = b;
    bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
    if (!printable) {
        for (unsigned x = 0; x < b; x++)
            n += !((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174));
        cp = 256 + n;
    }
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    out[0] = (char)(0xc0 | cp >> 6);
    out[1] = (char)(0x80 | (cp & 0x3f));
    return 2;
}

/* Writes g_dir/tokenizer.json with the given JSON fragments (NULL: a default) and
 * tokenizer_config.json, and loads it. */
static duet_status mini_load(const char *pre, const char *post, const char *added,
                             const char *model_extra, tok_tokenizer **t_p) {
    char frag[4096];
    snprintf(frag, sizeof frag,
             "{\"version\":\"1.0\",\"added_tokens\":%s,\"normalizer\":null,"
             "\"pre_tokenizer\":%s,\"post_processor\":%s,"
             "\"decoder\":{\"type\":\"ByteLevel\",\"add_prefix_space\":true,\"trim_offsets\":true,"
             "\"use_regex\":true},\"model\":{\"type\":\"BPE\",\"dropout\":null%s}}",
             added ? added : "[]",
             pre ? pre : "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"use_regex\":false}",
             post ? post : "null", model_extra ? model_extra : "");
    cJSON *root = cJSON_Parse(frag);
    CHECK(root != NULL);
    if (!root) return DUET_ERR_FORMAT;
    cJSON *model = cJSON_GetObjectItem(root, "model");
    cJSON *vocab = cJSON_AddObjectToObject(model, "vocab");
    for (unsigned b = 0; b < 256; b++) {
        if (b == 127) continue;
        char k[4] = {0};
        bl_char(b, k);
        cJSON_AddNumberToObject(vocab, k, b);
    }
    cJSON *merges = cJSON_AddArrayToObject(model, "merges");
    for (size_t i = 0; i < sizeof MERGES / sizeof *MERGES; i++) {
        char k[16], m[16];
        snprintf(k, sizeof k, "%s%s", MERGES[i][0], MERGES[i][1]);
        snprintf(m, sizeof m, "%s %s", MERGES[i][0], MERGES[i][1]);
        cJSON_AddNumberToObject(vocab, k, 256 + (double)i);
        cJSON_AddItemToArray(merges, cJSON_CreateString(m));
    }
    char *json = cJSON_PrintUnformatted(root);
    cJSON_Delete(root);
    char path[128];
    snprintf(path, sizeof path, "%s/tokenizer.json", g_dir);
    CHECK(fio_write_file(path, json, strlen(json)) == DUET_OK);
    free(json);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", g_dir);
    const char *cfg = "{\"add_bos_token\":false,\"bos_token\":null,\"eos_token\":\"a\"}";
    CHECK(fio_write_file(path, cfg, strlen(cfg)) == DUET_OK);
    return tok_load(g_dir, t_p);
}

static void check_mini(const tok_tokenizer *t, const char *text, const int32_t *want, size_t nwant,
                       const char *what) {
    ids x = enc(t, text, strlen(text));
    bool same = x.n == nwant && (nwant == 0 || !memcmp(x.v, want, nwant * sizeof *want));
    CHECK_MSG(same, "%s: \"%s\" gave %zu ids (first %d), want %zu", what, text, x.n,
              x.n ? x.v[0] : -1, nwant);
    free(x.v);
}

#define MINI(t, text, what, ...)                                                                   \
    do {                                                                                           \
        const int32_t w_[] = {__VA_ARGS__};                                                        \
        check_mini(t, text, w_, sizeof w_ / sizeof *w_, what);                                     \
    } while (0)

static void split_case(const char *behavior, bool invert, const char *text, const int32_t *want,
                       size_t nwant) {
    char pre[512];
    snprintf(pre, sizeof pre,
             "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":"
             "{\"String\":\"-\"},\"behavior\":\"%s\",\"invert\":%s},{\"type\":\"ByteLevel\","
             "\"add_prefix_space\":false,\"use_regex\":false}]}",
             behavior, invert ? "true" : "false");
    tok_tokenizer *t = NULL;
    CHECK(mini_load(pre, NULL, NULL, NULL, &t) == DUET_OK);
    if (t) {
        char what[64];
        snprintf(what, sizeof what, "%s%s", behavior, invert ? " inverted" : "");
        check_mini(t, text, want, nwant, what);
    }
    tok_destroy(t);
}

#define SPLIT(behavior, invert, text, ...)                                                         \
    do {                                                                                           \
        const int32_t w_[] = {__VA_ARGS__};                                                        \
        split_case(behavior, invert, text, w_, sizeof w_ / sizeof *w_);                            \
    } while (0)

static void test_mini(void) {
    tok_tokenizer *t = NULL;
    CHECK(mini_load(NULL, NULL, NULL, NULL, &t) == DUET_OK);
    if (!t) return;
    CHECK_EQ_INT(tok_vocab_size(t), 262);
    CHECK_EQ_INT(tok_eos_id(t), 'a');
    CHECK_EQ_INT(tok_bos_id(t), -1);
    /* BPE by rank: ab before abc; leftmost first among equal ranks. */
    MINI(t, "abc", "bpe", ID_ABC);
    MINI(t, "abab", "bpe", ID_AB, ID_AB);
    MINI(t, "a-b", "bpe", ID_A_DASH, 'b'); /* a+- (rank 3) before -+b (rank 4) */
    MINI(t, "a--b", "bpe", ID_A_DASH, ID_DASH_B);
    /* A byte without a token is dropped before merging, as HF BPE does without unk (so its
     * neighbours meet), and its id is a hole. */
    MINI(t,
         "a\x7f"
         "b",
         "no token", ID_AB);
    int32_t hole = 127;
    char *d;
    size_t dl;
    CHECK(tok_decode(t, &hole, 1, false, &d, &dl) == DUET_ERR_INVALID);
    tok_destroy(t);

    /* With unk_token, fused. */
    CHECK(mini_load(NULL, NULL, NULL, ",\"unk_token\":\"c\",\"fuse_unk\":true", &t) == DUET_OK);
    if (t)
        MINI(t,
             "a\x7f\x7f"
             "b",
             "fused unk", 'a', 'c', 'b');
    tok_destroy(t);

    /* Split behaviours on "-" (HF's NormalizedString::split). */
    SPLIT("Isolated", false, "a-b", 'a', '-', 'b');
    SPLIT("Removed", false, "a-b", 'a', 'b');
    SPLIT("MergedWithPrevious", false, "a-b", ID_A_DASH, 'b');
    SPLIT("MergedWithNext", false, "a-b", 'a', ID_DASH_B);
    SPLIT("MergedWithNext", false, "a--b", 'a', '-', ID_DASH_B);
    SPLIT("Contiguous", false, "a--b", 'a', ID_DASH_DASH, 'b');
    SPLIT("Isolated", false, "a--b", 'a', '-', '-', 'b');
    SPLIT("Removed", true, "a-b", '-');
    SPLIT("MergedWithPrevious", true, "a-b", 'a', ID_DASH_B);

    /* ByteLevel add_prefix_space: every piece gets one; use_regex: GPT-2 pieces. */
    CHECK(mini_load("{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":"
                    "{\"String\":\"-\"},\"behavior\":\"Isolated\",\"invert\":false},"
                    "{\"type\":\"ByteLevel\",\"add_prefix_space\":true,\"use_regex\":false}]}",
                    NULL, NULL, NULL, &t) == DUET_OK);
    if (t) {
        MINI(t, "ab", "prefix space", ' ', ID_AB);
        MINI(t, "a-a", "prefix space per piece", ID_SP_A, ' ', '-', ID_SP_A);
        MINI(t, " b", "no second space", ' ', 'b');
    }
    tok_destroy(t);
    CHECK(mini_load("{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"use_regex\":true}", NULL,
                    NULL, NULL, &t) == DUET_OK);
    if (t) MINI(t, "ab abc", "gpt2 regex", ID_AB, ' ', ID_ABC);
    tok_destroy(t);

    /* Added tokens' lstrip / rstrip / single_word, and a TemplateProcessing post-processor. */
    static const char ADDED[] =
        "[{\"id\":300,\"content\":\"<s>\",\"special\":true,\"normalized\":false},"
        "{\"id\":301,\"content\":\"[X]\",\"lstrip\":true},"
        "{\"id\":302,\"content\":\"[Y]\",\"rstrip\":true},"
        "{\"id\":303,\"content\":\"[W]\",\"single_word\":true},"
        "{\"id\":304,\"content\":\"[W]x\"}]";
    static const char POST[] =
        "{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":{\"id\":\"<s>\","
        "\"type_id\":0}},{\"Sequence\":{\"id\":\"A\",\"type_id\":0}}],\"pair\":[],"
        "\"special_tokens\":{\"<s>\":{\"id\":\"<s>\",\"ids\":[300],\"tokens\":[\"<s>\"]}}}";
    CHECK(mini_load(NULL, POST, ADDED, NULL, &t) == DUET_OK);
    if (!t) return;
    CHECK_EQ_INT(tok_vocab_size(t), 305);
    CHECK(tok_is_special(t, 300) && !tok_is_special(t, 301));
    MINI(t, "a  [X]b", "lstrip", 'a', 301, 'b');
    MINI(t, "a[Y] \t b", "rstrip", 'a', 302, 'b');
    MINI(t, "a [W] b", "single_word alone", 'a', ' ', 303, ' ', 'b');
    MINI(t, "a[W] b", "single_word after a letter", 'a', '[', 'W', ']', ' ', 'b');
    MINI(t, "([W]).", "single_word in punctuation", '(', 303, ')', '.');
    MINI(t, "[W]x", "longest match", 304);
    MINI(t, "a<s>b", "special", 'a', 300, 'b');
    int32_t *v;
    size_t n;
    CHECK(tok_encode(t, "ab", 2, true, &v, &n) == DUET_OK && n == 2 && v[0] == 300 &&
          v[1] == ID_AB);
    free(v);
    CHECK(tok_encode(t, "", 0, true, &v, &n) == DUET_OK && n == 1 && v[0] == 300);
    free(v);
    CHECK(tok_encode(t, "", 0, false, &v, &n) == DUET_OK && n == 0 && v == NULL);
    tok_destroy(t);
}

/* ---- refusals ------------------------------------------------------------------------------- */

static void write_str(const char *path, const char *s) {
    CHECK(fio_write_file(path, s, strlen(s)) == DUET_OK);
}

static void write_dir(const char *tok_json, const char *cfg_json) {
    char path[128];
    snprintf(path, sizeof path, "%s/tokenizer.json", g_dir);
    unlink(path);
    if (tok_json) write_str(path, tok_json);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", g_dir);
    unlink(path);
    if (cfg_json) write_str(path, cfg_json);
}

static void test_refusals(void) {
    tok_tokenizer *t = (tok_tokenizer *)&t; /* must stay untouched on failure */
    tok_tokenizer *const sentinel = t;
    CHECK(tok_load("/nonexistent/duet/tokenizer", &t) == DUET_ERR_NOT_FOUND);
    CHECK(tok_load(NULL, &t) == DUET_ERR_INVALID);
    write_dir("{\"model\": {\"vocab\": {\"a\": 0}, \"merges\": []", "{}");
    CHECK(tok_load(g_dir, &t) == DUET_ERR_FORMAT);
    write_dir("[]", "{}");
    CHECK(tok_load(g_dir, &t) == DUET_ERR_FORMAT);
    write_dir("{\"model\": {\"vocab\": {\"a\": -1}, \"merges\": []}}", "{}");
    CHECK(tok_load(g_dir, &t) == DUET_ERR_FORMAT);
    write_dir("{\"model\": {\"vocab\": {\"a\": 0, \"b\": 0}, \"merges\": []}}", "{}");
    CHECK(tok_load(g_dir, &t) == DUET_ERR_FORMAT);
    write_dir("{\"model\": {\"vocab\": {\"a\": 0}, \"merges\": [\"a b\"]}}", "{}");
    CHECK(tok_load(g_dir, &t) == DUET_ERR_FORMAT);
    write_dir("{\"model\": {\"type\": \"WordPiece\", \"vocab\": {\"a\": 0}, \"merges\": []}}",
              "{}");
    CHECK(tok_load(g_dir, &t) == DUET_ERR_UNSUPPORTED);
    write_dir("{\"normalizer\": {\"type\": \"NFC\"}, \"model\": {\"vocab\": {\"a\": 0}, "
              "\"merges\": []}}",
              "{}");
    CHECK(tok_load(g_dir, &t) == DUET_ERR_UNSUPPORTED);
    write_dir("{\"pre_tokenizer\": {\"type\": \"Whitespace\"}, \"model\": {\"vocab\": {\"a\": 0}, "
              "\"merges\": []}}",
              "{}");
    CHECK(tok_load(g_dir, &t) == DUET_ERR_UNSUPPORTED);
    write_dir("{\"pre_tokenizer\": null, \"model\": {\"vocab\": {\"a\": 0}, \"merges\": []}}",
              "{}");
    CHECK(tok_load(g_dir, &t) == DUET_ERR_UNSUPPORTED); /* not byte-level */
    write_dir("{\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"(\"}, "
              "\"behavior\": \"Isolated\"}, \"model\": {\"vocab\": {\"a\": 0}, \"merges\": []}}",
              "{}");
    CHECK(tok_load(g_dir, &t) == DUET_ERR_UNSUPPORTED); /* bad regex */
    CHECK(t == sentinel);

    /* A good tokenizer.json with a bad or missing tokenizer_config.json. */
    CHECK(mini_load(NULL, NULL, NULL, NULL, &t) == DUET_OK);
    tok_destroy(t);
    t = sentinel;
    char path[128];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", g_dir);
    unlink(path);
    CHECK(tok_load(g_dir, &t) == DUET_ERR_NOT_FOUND);
    write_str(path, "{\"bos_token\": \"<nope>\"}");
    CHECK(tok_load(g_dir, &t) == DUET_ERR_FORMAT);
    write_str(path, "{\"bos_token\": 5}");
    CHECK(tok_load(g_dir, &t) == DUET_ERR_FORMAT);
    write_str(path, "{\"add_bos_token\": \"yes\"}");
    CHECK(tok_load(g_dir, &t) == DUET_ERR_FORMAT);
    write_str(path, "not json");
    CHECK(tok_load(g_dir, &t) == DUET_ERR_FORMAT);
    CHECK(t == sentinel);
    write_dir(NULL, NULL);
    tok_destroy(NULL);
}

static void test_r1(void) {
    tok_tokenizer *t;
    CHECK(tok_load(GOLDEN_DIR "/tokenizer-r1", &t) == DUET_OK);
    if (!t) return;
    ids x = enc(t, "<think>\nhmm\n</think>\n\nok", 24);
    CHECK(x.n > 2 && x.v[0] == 128798);
    CHECK(!tok_is_special(t, 128798) && !tok_is_special(t, 128799));
    size_t l;
    char *d = dec(t, x, true, &l);
    CHECK(d && !strcmp(d, "<think>\nhmm\n</think>\n\nok")); /* not special: kept */
    free(d);
    free(x.v);
    tok_destroy(t);
}

int main(void) {
    log_set_level(LOG_LEVEL_ERROR);
    double t0 = now_s();
    CHECK(tok_load(GOLDEN_DIR "/tokenizer", &g_v3) == DUET_OK);
    if (!g_v3) CHECK_DONE();
    fprintf(stderr, "load DeepSeek-V3 tokenizer: %.0f ms\n", 1e3 * (now_s() - t0));
    test_lookups();
    test_pieces_by_rule();
    test_added_tokens();
    test_round_trips();
    test_invalid_utf8();
    test_decode();
    test_stream();
    test_speed();
    test_threads();
    test_r1();

    snprintf(g_dir, sizeof g_dir, "/tmp/duet-tok-XXXXXX");
    CHECK(mkdtemp(g_dir) != NULL);
    /* Refusals log their one error line each; that is expected output. */
    test_mini();
    test_refusals();
    rmdir(g_dir);

    tok_destroy(g_v3);
    CHECK_DONE();
}
