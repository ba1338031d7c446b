/* Chat rendering around the Jinja interpreter: where templates come from (tokenizer_config.json
 * in both forms, chat_template.jinja, --chat-template as file or text), refusals at load time,
 * vLLM's message preparation (content parts, null content, tool-call arguments parsed), the
 * variables the template sees (tools, add_generation_prompt, chat_template_kwargs) and the
 * errors a client gets. Expected texts are jinja2's for the same prepared messages. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "base/fileio.h"
#include "base/log.h"
#include "check.h"
#include "testutil.h"
#include "text/chat.h"

/* Shows what a template receives. */
static const char SHOW[] =
    "{% for m in messages %}[{{ m.role }}|{{ m.content }}|"
    "{{ m.tool_calls | tojson if m.tool_calls is defined else '-' }}|"
    "{{ m.name if m.name is defined else '-' }}|"
    "{{ m.tool_call_id if m.tool_call_id is defined else '-' }}]{% endfor %}"
    "{{ add_generation_prompt }}|{{ tools | tojson }}|{{ bos_token }}{{ eos_token }}|"
    "{{ thinking if thinking is defined else '-' }}|{{ documents }}";

static chat_template *g_show;

/* Renders messages with opts; NULL want: expect st with a reason. */
static void expect(const chat_template *t, const char *json, const chat_opts *o, const char *want,
                   duet_status st) {
    cJSON *m = cJSON_Parse(json);
    CHECK_MSG(m != NULL, "test JSON: %s", json);
    chat_opts d = chat_default_opts(t);
    char *out = (char *)"untouched", err[200] = "stale";
    size_t len = 99;
    duet_status got = chat_render(t, m, o ? o : &d, &out, &len, err, sizeof err);
    if (want) {
        CHECK_MSG(got == DUET_OK, "%s: %s (%s)", json, duet_strerror(got), err);
        if (got == DUET_OK) {
            CHECK_MSG(len == strlen(out) && !strcmp(out, want), "%s:\n got  [%s]\n want [%s]", json,
                      out, want);
            CHECK(err[0] == '\0');
            free(out);
        }
    } else {
        CHECK_MSG(got == st, "%s: got %s (%s), want %s", json, duet_strerror(got), err,
                  duet_strerror(st));
        CHECK_MSG(err[0] != '\0' && strcmp(err, "stale") != 0, "%s: no reason given", json);
        CHECK(!strcmp(out, "untouched") && len == 99);
        CHECK(chat_render(t, m, o ? o : &d, &out, &len, NULL, 0) == st);
    }
    cJSON_Delete(m);
}

#define OK(json, want) expect(g_show, json, NULL, want, DUET_OK)
#define BAD(json, st)  expect(g_show, json, NULL, NULL, st)
#define TAIL           "True|null|<B><E>|-|None"

static void test_prepare(void) {
    OK("[]", TAIL);
    OK("[{\"role\":\"user\",\"content\":\"hi\"}]", "[user|hi|-|-|-]" TAIL);
    /* null or missing content is "", parts are joined by newlines, developer is system */
    OK("[{\"role\":\"assistant\",\"content\":null},{\"role\":\"assistant\"},"
       "{\"role\":\"developer\",\"content\":[{\"type\":\"text\",\"text\":\"a\"},\"b\","
       "{\"type\":\"text\",\"text\":null},{\"type\":\"refusal\",\"refusal\":\"c\"}]}]",
       "[assistant||-|-|-][assistant||-|-|-][system|a\nb\nc|-|-|-]" TAIL);
    /* tool calls: arguments parsed (bad JSON is {}), an empty list dropped; name and
     * tool_call_id kept, other fields not */
    OK("[{\"role\":\"assistant\",\"content\":null,\"extra\":1,\"tool_calls\":["
       "{\"id\":\"c1\",\"type\":\"function\",\"function\":{\"name\":\"f\","
       "\"arguments\":\"{\\\"x\\\": \\\"\xc3\xa9\\\"}\"}},"
       "{\"id\":\"c2\",\"type\":\"function\",\"function\":{\"name\":\"g\",\"arguments\":\"{oops\"}}"
       ","
       "{\"type\":\"function\",\"function\":{\"name\":\"h\"}}]},"
       "{\"role\":\"assistant\",\"content\":\"x\",\"tool_calls\":[]},"
       "{\"role\":\"tool\",\"tool_call_id\":\"c1\",\"name\":\"f\",\"content\":\"r\"}]",
       "[assistant||[{\"id\": \"c1\", \"type\": \"function\", \"function\": {\"name\": \"f\", "
       "\"arguments\": {\"x\": \"\xc3\xa9\"}}}, {\"id\": \"c2\", \"type\": \"function\", "
       "\"function\": {\"name\": \"g\", \"arguments\": {}}}, {\"type\": \"function\", "
       "\"function\": {\"name\": \"h\", \"arguments\": {}}}]|-|-]"
       "[assistant|x|-|-|-][tool|r|-|f|c1]" TAIL);
}

static void test_refusals(void) {
    BAD("{\"role\":\"user\",\"content\":\"hi\"}", DUET_ERR_INVALID);
    BAD("[5]", DUET_ERR_INVALID);
    BAD("[{}]", DUET_ERR_INVALID);
    BAD("[{\"role\":3,\"content\":\"x\"}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"wizard\",\"content\":\"x\"}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"user\",\"content\":\"ok\"},{\"role\":\"User\",\"content\":\"x\"}]",
        DUET_ERR_INVALID);
    BAD("[{\"role\":\"user\",\"content\":5}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"user\",\"content\":{\"text\":\"x\"}}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"user\",\"content\":[5]}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":7}]}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\",\"image_url\":{\"url\":\"x\"}}]}"
        "]",
        DUET_ERR_UNSUPPORTED);
    BAD("[{\"role\":\"assistant\",\"tool_calls\":\"f()\"}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"assistant\",\"tool_calls\":[5]}]", DUET_ERR_INVALID);
    BAD("[{\"role\":\"assistant\",\"tool_calls\":[{\"function\":{\"arguments\":\"{}\"}}]}]",
        DUET_ERR_INVALID);
    char *out;
    size_t len;
    chat_opts o = chat_default_opts(g_show);
    cJSON *m = cJSON_Parse("[]"), *bad = cJSON_Parse("{\"tools\":5}");
    CHECK(chat_render(g_show, NULL, &o, &out, &len, NULL, 0) == DUET_ERR_INVALID);
    CHECK(chat_render(NULL, m, &o, &out, &len, NULL, 0) == DUET_ERR_INVALID);
    CHECK(chat_render(g_show, m, NULL, &out, &len, NULL, 0) == DUET_ERR_INVALID);
    o.tools = cJSON_GetObjectItem(bad, "tools");
    CHECK(chat_render(g_show, m, &o, &out, &len, NULL, 0) == DUET_ERR_INVALID);
    o.tools = NULL;
    o.kwargs = o.tools = NULL;
    o.kwargs = cJSON_GetObjectItem(bad, "tools");
    CHECK(chat_render(g_show, m, &o, &out, &len, NULL, 0) == DUET_ERR_INVALID);
    cJSON_Delete(m);
    cJSON_Delete(bad);
}

static void test_variables(void) {
    cJSON *tools = cJSON_Parse("[{\"type\":\"function\",\"function\":{\"name\":\"f\"}}]");
    cJSON *kw = cJSON_Parse("{\"thinking\":true,\"messages\":[1],\"tools\":null,"
                            "\"add_generation_prompt\":false}");
    chat_opts o = {.add_generation_prompt = true, .tools = tools};
    expect(g_show, "[]", &o,
           "True|[{\"type\": \"function\", \"function\": {\"name\": \"f\"}}]|<B><E>|-|None",
           DUET_OK);
    /* chat_template_kwargs go over the request's own variables, as in vLLM; never over
     * messages */
    o.kwargs = kw;
    expect(g_show, "[{\"role\":\"user\",\"content\":\"u\"}]", &o,
           "[user|u|-|-|-]False|null|<B><E>|True|None", DUET_OK);
    cJSON_Delete(tools);
    cJSON_Delete(kw);

    /* DeepSeek-V3.1's own template: thinking from kwargs, tool-call arguments as JSON */
    char *src = NULL;
    chat_template *v31 = NULL;
    CHECK(fio_read_text(GOLDEN_DIR "/chat-templates/deepseek_v31_tools.jinja", 1 << 20, &src) ==
          DUET_OK);
    CHECK(src && chat_create(src, "<B>", "<E>", &v31) == DUET_OK);
    free(src);
    if (!v31) return;
    cJSON *think = cJSON_Parse("{\"thinking\":true}");
    o = (chat_opts){.add_generation_prompt = true, .kwargs = think};
    expect(v31, "[{\"role\":\"user\",\"content\":\"a\\nb\"}]", &o,
           "\n\n<B><｜User｜>a\nb  <｜Assistant｜>    <think>", DUET_OK);
    o.add_generation_prompt = false;
    expect(v31, "[{\"role\":\"user\",\"content\":\"a\\nb\"}]", &o, "\n\n<B><｜User｜>a\nb",
           DUET_OK);
    o.add_generation_prompt = true;
    expect(v31,
           "[{\"role\":\"system\",\"content\":\"S\"},{\"role\":\"user\",\"content\":\"q\"},"
           "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"id\":\"c1\","
           "\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":"
           "\"{\\\"x\\\":\\\"\xc3\xa9\\\"}\"}}]},"
           "{\"role\":\"tool\",\"tool_call_id\":\"c1\",\"content\":\"r\"}]",
           &o,
           "\n\n<B>S<｜User｜>q      <｜Assistant｜></think>          <｜tool▁calls▁begin｜>"
           "<｜tool▁call▁begin｜>f<｜tool▁sep｜>{\"x\": \"\xc3\xa9\"}<｜tool▁call▁end｜>    "
           "<｜tool▁calls▁end｜><｜end▁of▁sentence｜><｜tool▁output▁begin｜>r"
           "<｜tool▁output▁end｜>",
           DUET_OK);
    cJSON_Delete(think);
    chat_destroy(v31);
}

static void test_template_errors(void) {
    chat_template *t = NULL;
    CHECK(chat_create("{% for m in messages %}{% if m.role == 'user' and loop.index0 % 2 %}"
                      "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
                      "{% endif %}{% endfor %}\n{{ messages[0].x.y }}",
                      NULL, NULL, &t) == DUET_OK);
    if (!t) return;
    char err[200] = "";
    char *out;
    size_t len;
    chat_opts o = chat_default_opts(t);
    cJSON *m = cJSON_Parse("[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"user\","
                           "\"content\":\"b\"}]");
    /* the template's own words for the client */
    CHECK(chat_render(t, m, &o, &out, &len, err, sizeof err) == DUET_ERR_INVALID);
    CHECK_MSG(!strcmp(err, "Conversation roles must alternate user/assistant"), "%s", err);
    cJSON_DeleteItemFromArray(m, 1);
    CHECK(chat_render(t, m, &o, &out, &len, err, sizeof err) == DUET_ERR_INVALID);
    CHECK_MSG(!strcmp(err, "chat template line 2: 'x' is undefined"), "%s", err);
    cJSON_Delete(m);
    chat_destroy(t);
}

static void write_file(const char *dir, const char *name, const char *text) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    CHECK(fio_write_file(path, text, strlen(text)) == DUET_OK);
}

static void expect_loaded(const char *dir, const char *override, const char *want) {
    chat_template *t = NULL;
    duet_status st = chat_load_template(dir, override, &t);
    CHECK_MSG(st == DUET_OK, "%s / %s: %s", dir, override ? override : "-", duet_strerror(st));
    if (t) expect(t, "[{\"role\":\"user\",\"content\":\"Hi\"}]", NULL, want, DUET_OK);
    chat_destroy(t);
}

static void test_load(void) {
    expect_loaded(GOLDEN_DIR "/tokenizer", NULL,
                  "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>");
    chat_template *t = NULL;
    CHECK(chat_load("/nonexistent/duet", &t) == DUET_ERR_NOT_FOUND && !t);
    chat_destroy(NULL);

    char *dir = tu_mkdtemp("chat");
    if (!dir) return;
    char path[512];
    /* the named-list form; bos_token as an AddedToken object; unk_token passed on */
    write_file(dir, "tokenizer_config.json",
               "{\"bos_token\":{\"content\":\"<b>\"},\"unk_token\":\"<u>\",\"chat_template\":["
               "{\"name\":\"tool_use\",\"template\":\"x\"},{\"name\":\"default\",\"template\":"
               "\"{{ bos_token }}{{ unk_token }}{{ messages[0].content }}|{{ eos_token }}\"}]}");
    expect_loaded(dir, NULL, "<b><u>Hi|");
    /* --chat-template: a file, or the text itself; the tokens still come from DIR */
    snprintf(path, sizeof path, "%s/t.jinja", dir);
    write_file(dir, "t.jinja", "F{{ bos_token }}{{ messages | length }}\n");
    expect_loaded(dir, path, "F<b>1");
    expect_loaded(dir, "T{{ add_generation_prompt }}", "TTrue");
    CHECK(chat_load_template(dir, "no-such-template.jinja", &t) == DUET_ERR_NOT_FOUND && !t);
    /* no chat_template in the config: chat_template.jinja beside it */
    write_file(dir, "tokenizer_config.json", "{\"bos_token\":\"<s>\"}");
    CHECK(chat_load(dir, &t) == DUET_ERR_NOT_FOUND && !t);
    write_file(dir, "chat_template.jinja", "J{{ bos_token }}");
    expect_loaded(dir, NULL, "J<s>");
    /* a template it cannot interpret is refused at load, naming construct and line */
    write_file(dir, "tokenizer_config.json",
               "{\"chat_template\":\"{% if x %}\\n{% include 'other' %}{% endif %}\"}");
    CHECK(chat_load(dir, &t) == DUET_ERR_UNSUPPORTED && !t);
    write_file(dir, "tokenizer_config.json", "{\"chat_template\":\"{% if x %}\"}");
    CHECK(chat_load(dir, &t) == DUET_ERR_FORMAT && !t);
    write_file(dir, "tokenizer_config.json", "{\"bos_token\":7,\"chat_template\":\"x\"}");
    CHECK(chat_load(dir, &t) == DUET_ERR_FORMAT && !t);
    write_file(dir, "tokenizer_config.json", "[1,2]");
    CHECK(chat_load(dir, &t) == DUET_ERR_FORMAT && !t);
    /* --chat-template without a tokenizer_config.json: empty special tokens */
    char *empty = tu_mkdtemp("chat-empty");
    if (empty) {
        expect_loaded(empty, "[{{ bos_token }}]", "[]");
        tu_rmtree(empty);
        free(empty);
    }
    tu_rmtree(dir);
    free(dir);
}

int main(void) {
    log_set_level(LOG_LEVEL_ERROR + 1);
    CHECK(chat_create(SHOW, "<B>", "<E>", &g_show) == DUET_OK);
    if (!g_show) CHECK_DONE();
    test_prepare();
    test_refusals();
    test_variables();
    test_template_errors();
    test_load();
    chat_destroy(g_show);
    CHECK_DONE();
}
