/* Chat rendering beyond the golden cases: tool calls and outputs, the template's quirks, R1's
 * options, content parts, and refusals of bad messages, with the expected text worked out by
 * hand from the Jinja template in tokenizer_config.json. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "text/chat.h"
#include "check.h"
#include "base/fileio.h"
#include "base/log.h"

static chat_template *g_v3, *g_r1;

/* Renders the JSON messages and compares with want; NULL want: expect status st. */
static void expect(const chat_template *t, const char *json, bool gen, const char *want,
                   duet_status st) {
    cJSON *m = cJSON_Parse(json);
    CHECK_MSG(m != NULL, "test JSON: %s", json);
    chat_opts o = chat_default_opts(t);
    o.add_generation_prompt = gen;
    char *out = (char *)"untouched", err[160] = "stale";
    size_t len = 99;
    duet_status got = chat_render(t, m, &o, &out, &len, err, sizeof err);
    if (want) {
        CHECK_MSG(got == DUET_OK, "%s: %s (%s)", json, duet_strerror(got), err);
        if (got == DUET_OK) {
            CHECK_MSG(len == strlen(out) && !strcmp(out, want), "%s:\n got  %s\n want %s", json,
                      out, want);
            CHECK(err[0] == '\0');
            free(out);
        }
    } else {
        CHECK_MSG(got == st, "%s: got %s, want %s", json, duet_strerror(got), duet_strerror(st));
        CHECK_MSG(err[0] != '\0' && strcmp(err, "stale") != 0, "%s: no reason given", json);
        CHECK(!strcmp(out, "untouched") && len == 99);
        /* the caller may not want the reason */
        CHECK(chat_render(t, m, &o, &out, &len, NULL, 0) == st);
    }
    cJSON_Delete(m);
}

#define OK(t, json, gen, want) expect(t, json, gen, want, DUET_OK)
#define BAD(json, st)          expect(g_v3, json, true, NULL, st)

#define CALL_F                                                                                     \
    "{\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"x\\\":1}\"}}"
#define CALL_G "{\"type\":\"function\",\"function\":{\"name\":\"g\",\"arguments\":\"{}\"}}"
#define F_BODY                                                                                     \
    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"x\":1}\n```<｜tool▁call▁end｜>"
#define G_BODY "<｜tool▁call▁begin｜>function<｜tool▁sep｜>g\n```json\n{}\n```<｜tool▁call▁end｜>"

static void test_basic(void) {
    OK(g_v3, "[]", true, "<B><｜Assistant｜>");
    OK(g_v3, "[]", false, "<B>");
    OK(g_v3, "[{\"role\":\"user\",\"content\":\"hi\"}]", true, "<B><｜User｜>hi<｜Assistant｜>");
    /* System prompts go right after BOS wherever they are, joined by a blank line. */
    OK(g_v3,
       "[{\"role\":\"user\",\"content\":\"u\"},{\"role\":\"system\",\"content\":\"s1\"},"
       "{\"role\":\"developer\",\"content\":\"s2\"},{\"role\":\"system\",\"content\":\"\"}]",
       false, "<B>s1\n\ns2\n\n<｜User｜>u");
    /* Assistant turns end with EOS; an empty answer is still a turn. */
    OK(g_v3,
       "[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"assistant\",\"content\":\"b\"},"
       "{\"role\":\"assistant\",\"content\":\"\"}]",
       true,
       "<B><｜User｜>a<｜Assistant｜>b<｜end▁of▁sentence｜><｜Assistant｜><｜end▁of▁sentence｜>"
       "<｜Assistant｜>");
    /* Content parts are joined by newlines; unknown fields are ignored. */
    OK(g_v3,
       "[{\"role\":\"user\",\"name\":\"x\",\"content\":[{\"type\":\"text\",\"text\":\"one\"},"
       "{\"type\":\"text\",\"text\":\"two\"}]}]",
       false, "<B><｜User｜>one\ntwo");
    OK(g_v3, "[{\"role\":\"user\",\"content\":[]}]", false, "<B><｜User｜>");
    /* Special-token text in content is copied as is (the tokenizer will see it). */
    OK(g_v3, "[{\"role\":\"user\",\"content\":\"<｜end▁of▁sentence｜>\"}]", false,
       "<B><｜User｜><｜end▁of▁sentence｜>");
}

static void test_tools(void) {
    /* Two calls in one turn: the first opens the block, the second is closed by
     * calls_end + EOS (and the first never is, if alone). Then two outputs, the answer after
     * the outputs (no Assistant tag: outputs_end hands over), and a new question. */
    OK(g_v3,
       "[{\"role\":\"system\",\"content\":\"S\"},{\"role\":\"user\",\"content\":\"q\"},"
       "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[" CALL_F "," CALL_G "]},"
       "{\"role\":\"tool\",\"tool_call_id\":\"1\",\"content\":\"r1\"},"
       "{\"role\":\"tool\",\"content\":\"r2\"},{\"role\":\"assistant\",\"content\":\"A\"},"
       "{\"role\":\"user\",\"content\":\"thanks\"}]",
       true,
       "<B>S<｜User｜>q<｜Assistant｜><｜tool▁calls▁begin｜>" F_BODY "\n" G_BODY
       "<｜tool▁calls▁end｜><｜end▁of▁sentence｜><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>r1"
       "<｜tool▁output▁end｜>\n<｜tool▁output▁begin｜>r2<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
       "A"
       "<｜end▁of▁sentence｜><｜User｜>thanks<｜Assistant｜>");
    /* Ending on a tool output: outputs_end, and no generation prompt even when asked. Content
     * missing is taken as null. */
    OK(g_v3,
       "[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"tool_calls\":[" CALL_F
       "]},{\"role\":\"tool\",\"content\":\"r\"}]",
       true,
       "<B><｜User｜>q<｜Assistant｜><｜tool▁calls▁begin｜>" F_BODY
       "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>r<｜tool▁output▁end｜><"
       "｜tool▁outputs▁end｜>");
    /* The template never resets ns.is_first / ns.is_output_first: a later tool turn continues
     * the first one's block. Reproduced as is. */
    OK(g_v3,
       "[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"assistant\",\"content\":null,"
       "\"tool_calls\":[" CALL_F "]},{\"role\":\"tool\",\"content\":\"1\"},"
       "{\"role\":\"assistant\",\"content\":\"x\"},{\"role\":\"user\",\"content\":\"b\"},"
       "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[" CALL_G "]},"
       "{\"role\":\"tool\",\"content\":\"2\"}]",
       true,
       "<B><｜User｜>a<｜Assistant｜><｜tool▁calls▁begin｜>" F_BODY
       "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>1<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
       "x"
       "<｜end▁of▁sentence｜><｜User｜>b\n" G_BODY "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>\n"
       "<｜tool▁output▁begin｜>2<｜tool▁output▁end｜><｜tool▁outputs▁end｜>");
    /* Content wins over tool_calls; null content without calls writes nothing. */
    OK(g_v3,
       "[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":\"A\","
       "\"tool_calls\":[" CALL_F "]},{\"role\":\"assistant\",\"content\":null},"
       "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":null}]",
       false, "<B><｜User｜>q<｜Assistant｜>A<｜end▁of▁sentence｜>");
    /* A user message after tool outputs: outputs_end is only written after the loop or
     * before an assistant answer, as in the template. */
    OK(g_v3, "[{\"role\":\"tool\",\"content\":\"r\"},{\"role\":\"user\",\"content\":\"u\"}]", true,
       "<B><｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>r<｜tool▁output▁end｜><｜User｜>u"
       "<｜Assistant｜>");
}

static void test_r1(void) {
    /* R1: earlier answers lose their reasoning; the reply opens with <think>. */
    OK(g_r1,
       "[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":"
       "\"<think>\\nA\\n</think>\\n\\nB</think>C\"},{\"role\":\"user\",\"content\":\"q2\"}]",
       true,
       "<B><｜User｜>q<｜Assistant｜>C<｜end▁of▁sentence｜><｜User｜>q2<｜Assistant｜><think>\n");
    OK(g_r1, "[{\"role\":\"user\",\"content\":\"q\"}]", false, "<B><｜User｜>q");
    chat_opts o = chat_default_opts(g_r1);
    CHECK(o.add_generation_prompt && o.think_prefix && o.strip_reasoning);
    o = chat_default_opts(g_v3);
    CHECK(o.add_generation_prompt && !o.think_prefix && !o.strip_reasoning);
    /* Options are the caller's: V3 with them on behaves like R1. */
    cJSON *m = cJSON_Parse("[{\"role\":\"assistant\",\"content\":\"x</think>y\"}]");
    o.think_prefix = o.strip_reasoning = true;
    char *out;
    size_t len;
    CHECK(chat_render(g_v3, m, &o, &out, &len, NULL, 0) == DUET_OK);
    CHECK(!strcmp(out, "<B><｜Assistant｜>y<｜end▁of▁sentence｜><｜Assistant｜><think>\n"));
    free(out);
    cJSON_Delete(m);
}

static void test_refusals(void) {
    BAD("{\"role\":\"user\",\"content\":\"hi\"}", DUET_ERR_INVALID);
    BAD("\"hi\"", DUET_ERR_INVALID);
    BAD("[5]", DUET_ERR_INVALID);
    BAD("[{}]", DUET_ERR_INVALID);
    BAD("[{\"role\":null,\"content\":\"x\"}]", DUET_ERR_INVALID);
    BAD("[{\"role\":3,\"content\":\"x\"}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"bot\",\"content\":\"x\"}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"user\",\"content\":\"ok\"},{\"role\":\"User\",\"content\":\"x\"}]",
        DUET_ERR_INVALID);
    BAD("[{\"role\":\"user\",\"content\":5}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"user\",\"content\":{\"text\":\"x\"}}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"user\"}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"user\",\"content\":null}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"system\",\"content\":null}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"tool\"}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"assistant\",\"content\":true}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"user\",\"content\":[\"text\"]}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"user\",\"content\":[{\"type\":\"text\"}]}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},"
        "{\"type\":\"image_url\",\"image_url\":{\"url\":\"http://x\"}}]}]",
        DUET_ERR_UNSUPPORTED);
    BAD("[{\"role\":\"assistant\",\"content\":null,\"tool_calls\":\"f()\"}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[5]}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"type\":\"function\"}]}]",
        DUET_ERR_INVALID);
    BAD("[{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[" CALL_F ","
        "{\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":{\"x\":1}}}]}]",
        DUET_ERR_INVALID);
    char *out;
    size_t len;
    chat_opts o = chat_default_opts(g_v3);
    cJSON *m = cJSON_Parse("[]");
    CHECK(chat_render(g_v3, NULL, &o, &out, &len, NULL, 0) == DUET_ERR_INVALID);
    CHECK(chat_render(NULL, m, &o, &out, &len, NULL, 0) == DUET_ERR_INVALID);
    CHECK(chat_render(g_v3, m, NULL, &out, &len, NULL, 0) == DUET_ERR_INVALID);
    cJSON_Delete(m);
}

static void write_cfg(const char *dir, const char *json) {
    char path[128];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    CHECK(fio_write_file(path, json, strlen(json)) == DUET_OK);
}

static void test_load(void) {
    chat_template *t = NULL;
    CHECK(chat_load(GOLDEN_DIR "/tokenizer", &t) == DUET_OK);
    if (t) {
        OK(t, "[{\"role\":\"user\",\"content\":\"Hello!\"}]", true,
           "<｜begin▁of▁sentence｜><｜User｜>Hello!<｜Assistant｜>");
        CHECK(!chat_default_opts(t).think_prefix);
    }
    chat_destroy(t);
    chat_destroy(NULL);
    CHECK(chat_load("/nonexistent/duet", &t) == DUET_ERR_NOT_FOUND);

    char dir[] = "/tmp/duet-chat-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    /* DeepSeek-R1's template (abridged to the parts that are recognised). */
    write_cfg(dir,
              "{\"bos_token\":\"<s>\",\"chat_template\":\"{% set content = "
              "content.split('</think>')[-1] %}{{'<｜User｜>'}}{{'<｜Assistant｜><think>\\\\n'}}"
              "\"}");
    t = NULL;
    CHECK(chat_load(dir, &t) == DUET_OK);
    if (t) {
        CHECK(chat_default_opts(t).think_prefix && chat_default_opts(t).strip_reasoning);
        OK(t, "[]", true, "<s><｜Assistant｜><think>\n");
    }
    chat_destroy(t);
    /* A list of named templates, bos_token as an AddedToken object. */
    write_cfg(dir,
              "{\"bos_token\":{\"content\":\"<b>\"},\"chat_template\":[{\"name\":\"tool_use\","
              "\"template\":\"x\"},{\"name\":\"default\",\"template\":\"<｜User｜><｜Assistant｜>"
              "\"}]}");
    CHECK(chat_load(dir, &t) == DUET_OK);
    if (t) OK(t, "[]", false, "<b>");
    chat_destroy(t);
    /* Not DeepSeek's template: a warning, V3 rendering. No bos_token: empty. */
    write_cfg(dir, "{\"chat_template\":\"{{ messages }}\"}");
    CHECK(chat_load(dir, &t) == DUET_OK);
    if (t) OK(t, "[]", true, "<｜Assistant｜>");
    chat_destroy(t);
    write_cfg(dir, "{\"bos_token\":7}");
    CHECK(chat_load(dir, &t) == DUET_ERR_FORMAT);
    write_cfg(dir, "[1,2]");
    CHECK(chat_load(dir, &t) == DUET_ERR_FORMAT);
    char path[128];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    unlink(path);
    rmdir(dir);
}

int main(void) {
    log_set_level(LOG_LEVEL_ERROR);
    CHECK(chat_create("<B>", false, &g_v3) == DUET_OK);
    CHECK(chat_create("<B>", true, &g_r1) == DUET_OK);
    if (!g_v3 || !g_r1) CHECK_DONE();
    test_basic();
    test_tools();
    test_r1();
    test_refusals();
    test_load();
    chat_destroy(g_v3);
    chat_destroy(g_r1);
    CHECK_DONE();
}
