/* The Jinja interpreter against transformers: every template_cases.json and
 * chat_template_cases.json case rendered byte for byte and tokenized to the same ids, then
 * jinja2 semantics the golden templates do not reach (expected texts are jinja2 3.1's output
 * with transformers' settings), refusals at parse time with the line, and the render limits. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "base/fileio.h"
#include "base/log.h"
#include "check.h"
#include "text/jinja.h"
#include "text/tokenizer.h"

#define TEMPLATES GOLDEN_DIR "/chat-templates"
#define CASES     GOLDEN_DIR "/tokenizer-cases"

static tok_tokenizer *g_tok;

static cJSON *read_json(const char *path) {
    char *text = NULL;
    if (fio_read_text(path, (size_t)64 << 20, &text) != DUET_OK) return NULL;
    cJSON *j = cJSON_Parse(text);
    free(text);
    return j;
}

static jinja_template *parse_file(const char *path) {
    char *src = NULL, err[256];
    jinja_template *t = NULL;
    CHECK_MSG(fio_read_text(path, 1 << 20, &src) == DUET_OK, "%s", path);
    if (!src) return NULL;
    duet_status st = jinja_parse(src, strlen(src), &t, err, sizeof err);
    CHECK_MSG(st == DUET_OK, "%s: %s", path, err);
    free(src);
    return t;
}

static const char *str_of(const cJSON *o, const char *k) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

/* Renders one golden case the way transformers calls the template, compares text and ids. */
static void run_case(const jinja_template *t, const cJSON *c, const char *bos, const char *eos,
                     const char *label) {
    cJSON *b = cJSON_CreateString(bos), *e = cJSON_CreateString(eos);
    const cJSON *tools = cJSON_GetObjectItemCaseSensitive(c, "tools");
    const cJSON *kw = cJSON_GetObjectItemCaseSensitive(c, "chat_template_kwargs");
    jinja_var vars[16] = {
        {"bos_token", b},
        {"eos_token", e},
        {"messages", cJSON_GetObjectItemCaseSensitive(c, "messages")},
        {"tools", tools}, /* absent in chat_template_cases: null, as transformers passes */
        {"add_generation_prompt", cJSON_GetObjectItemCaseSensitive(c, "add_generation_prompt")},
    };
    size_t n = 5;
    const cJSON *k;
    cJSON_ArrayForEach(k, kw) {
        if (n < 16) vars[n++] = (jinja_var){k->string, k};
    }
    strbuf out = {0};
    char err[256];
    duet_status st = jinja_render(t, vars, n, NULL, &out, err, sizeof err);
    CHECK_MSG(st == DUET_OK, "%s: %s", label, err);
    const char *want = str_of(c, "text");
    if (st == DUET_OK && want) {
        const char *got = out.p ? out.p : "";
        CHECK_MSG(out.len == strlen(want) && !memcmp(got, want, out.len),
                  "%s:\n got  [%s]\n want [%s]", label, got, want);
        int32_t *ids = NULL;
        size_t n_ids = 0;
        CHECK(tok_encode(g_tok, got, out.len, false, &ids, &n_ids) == DUET_OK);
        const cJSON *want_ids = cJSON_GetObjectItemCaseSensitive(c, "ids");
        bool same = (size_t)cJSON_GetArraySize(want_ids) == n_ids;
        size_t i = 0;
        const cJSON *id;
        cJSON_ArrayForEach(id, want_ids) {
            same = same && i < n_ids && ids[i] == id->valueint;
            i++;
        }
        CHECK_MSG(same, "%s: ids differ (%zu vs %d)", label, n_ids, cJSON_GetArraySize(want_ids));
        free(ids);
    }
    strbuf_free(&out);
    cJSON_Delete(b);
    cJSON_Delete(e);
}

static void test_golden(void) {
    cJSON *cfg = read_json(GOLDEN_DIR "/tokenizer/tokenizer_config.json");
    cJSON *tc = read_json(CASES "/template_cases.json");
    cJSON *cc = read_json(CASES "/chat_template_cases.json");
    CHECK(cfg && tc && cc);
    if (!cfg || !tc || !cc) goto out;
    const char *bos = str_of(cJSON_GetObjectItem(cfg, "bos_token"), "content");
    const char *eos = str_of(cJSON_GetObjectItem(cfg, "eos_token"), "content");
    const char *cfg_src = str_of(cfg, "chat_template");
    CHECK(bos && eos && cfg_src);
    if (!bos || !eos || !cfg_src) goto out;
    jinja_template *cfg_tpl = NULL;
    char err[256];
    CHECK_MSG(jinja_parse(cfg_src, strlen(cfg_src), &cfg_tpl, err, sizeof err) == DUET_OK, "%s",
              err);
    int n_cases = 0;
    const char *names[] = {"deepseek_v3_tools", "deepseek_r1_tools", "deepseek_v31_tools",
                           "v3_tokenizer_config"};
    int per_template[4] = {0};
    for (int k = 0; k < 4; k++) {
        char path[512];
        snprintf(path, sizeof path, "%s/%s.jinja", TEMPLATES, names[k]);
        jinja_template *t = k == 3 ? cfg_tpl : parse_file(path);
        const cJSON *c;
        int i = 0;
        cJSON_ArrayForEach(c, cJSON_GetObjectItem(tc, "cases")) {
            const char *name = str_of(c, "template");
            if (t && name && !strcmp(name, names[k])) {
                char label[96];
                snprintf(label, sizeof label, "template_cases[%d] (%s)", i, name);
                run_case(t, c, bos, eos, label);
                per_template[k]++;
                n_cases++;
            }
            i++;
        }
        if (k < 3) jinja_destroy(t);
    }
    /* every template has cases, and every case was run */
    for (int k = 0; k < 4; k++) CHECK_MSG(per_template[k] > 0, "no cases for %s", names[k]);
    CHECK_EQ_INT(n_cases, cJSON_GetArraySize(cJSON_GetObjectItem(tc, "cases")));
    const cJSON *c;
    int i = 0;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(cc, "cases")) {
        char label[64];
        snprintf(label, sizeof label, "chat_template_cases[%d]", i++);
        if (cfg_tpl) run_case(cfg_tpl, c, bos, eos, label);
    }
    CHECK(i >= 10);
    jinja_destroy(cfg_tpl);
out:
    cJSON_Delete(cfg);
    cJSON_Delete(tc);
    cJSON_Delete(cc);
}

/* ---- semantics ------------------------------------------------------------------------------- */

/* Renders src with vars given as one JSON object; want NULL expects failure with status st and
 * err containing want_err. */
static void expect_full(const char *src, const char *vars_json, const char *want, duet_status st,
                        const char *want_err, const jinja_limits *lim) {
    jinja_template *t = NULL;
    char err[512] = "";
    duet_status pst = jinja_parse(src, strlen(src), &t, err, sizeof err);
    CHECK_MSG(pst == DUET_OK, "parse %s: %s", src, err);
    if (pst != DUET_OK) return;
    cJSON *vars = cJSON_Parse(vars_json ? vars_json : "{}");
    CHECK_MSG(vars != NULL, "test JSON %s", vars_json);
    jinja_var v[16];
    size_t n = 0;
    const cJSON *k;
    cJSON_ArrayForEach(k, vars) {
        if (n < 16) v[n++] = (jinja_var){k->string, k};
    }
    strbuf out = {0};
    duet_status got = jinja_render(t, v, n, lim, &out, err, sizeof err);
    if (want) {
        CHECK_MSG(got == DUET_OK, "%s: %s", src, err);
        const char *text = out.p ? out.p : "";
        if (got == DUET_OK)
            CHECK_MSG(out.len == strlen(want) && !strcmp(text, want), "%s:\n got  [%s]\n want [%s]",
                      src, text, want);
    } else {
        CHECK_MSG(got == st, "%s: got %s (%s), want %s", src, duet_strerror(got), err,
                  duet_strerror(st));
        CHECK_MSG(strstr(err, want_err) != NULL, "%s: error [%s] lacks [%s]", src, err, want_err);
    }
    strbuf_free(&out);
    cJSON_Delete(vars);
    jinja_destroy(t);
}

#define OK(src, vars, want)       expect_full(src, vars, want, DUET_OK, NULL, NULL)
#define FAILS(src, vars, st, msg) expect_full(src, vars, NULL, st, msg, NULL)

static void test_whitespace(void) {
    /* trim_blocks eats one newline after a block tag; lstrip_blocks the indentation before it */
    OK("{% if true %}\n  x\n  {% endif %}\ny", NULL, "  x\ny");
    OK("a  {% if true %}b{% endif %}", NULL, "a  b");
    OK("a\n  {%- if true -%}  \n b  {%- endif %}", NULL, "ab");
    OK("  {{ 'v' }}\n", NULL, "  v");
    OK("a\n  {%+ if true %}b{% endif %}", NULL, "a\n  b");
    OK("{% if true +%}\nb{% endif %}", NULL, "\nb");
    OK("a {# note #}\n b\n   {# own line #}\nc", NULL, "a  b\nc");
    OK("x{#- strip -#}  y", NULL, "xy");
    OK("{{ 'a' -}}   \n  b{{- 'c' }}", NULL, "abc");
    /* one trailing newline goes; \r\n is \n */
    OK("a\r\nb\n", NULL, "a\nb");
    OK("a\n\n", NULL, "a\n");
    OK("{% raw %}{{ x }}{% endraw %}", NULL, "{{ x }}");
    /* "-" strips Unicode whitespace too, as Python's str.rstrip does */
    OK("a\xe3\x80\x80 {%- if true %}b{% endif %}", NULL, "ab");
}

static void test_expressions(void) {
    OK("{{ 1 + 2 * 3 }}|{{ (1 + 2) * 3 }}|{{ 7 // 2 }}|{{ -7 // 2 }}|{{ 7 % -3 }}|{{ 2 ** 10 }}"
       "|{{ 7 / 2 }}|{{ 1e3 }}|{{ 10 / 5 }}|{{ 0.1 + 0.2 }}|{{ 1_000 }}",
       NULL, "7|9|3|-4|-2|1024|3.5|1000.0|2.0|0.30000000000000004|1000");
    OK("{{ 'a' ~ 1 ~ none ~ true }}|{{ 'ab' * 3 }}|{{ [1] + [2] }}", NULL,
       "a1NoneTrue|ababab|[1, 2]");
    OK("{{ none }}|{{ true }}|{{ 1.0 }}|{{ [1, 'a', none, 1.5] }}|{{ {'a': 'b'} }}|{{ (1,) }}",
       NULL, "None|True|1.0|[1, 'a', None, 1.5]|{'a': 'b'}|(1,)");
    OK("{{ \"it's\" }}|{{ [\"it's\", 'x\\ny'] }}", NULL, "it's|[\"it's\", 'x\\ny']");
    OK("{{ 'a' 'b' \"c\" }}|{{ '\\u00e9\\x41\\101\\q' }}", NULL,
       "abc|\xc3\xa9"
       "AA\\q");
    OK("{{ 1 < 2 < 3 }}{{ 3 < 2 < 4 }}{{ 'b' > 'a' }}{{ 1 == 1.0 }}{{ 1 == true }}{{ [1,2] == "
       "[1,2] }}",
       NULL, "TrueFalseTrueTrueTrueTrue");
    OK("{{ 'x' in 'axb' }}{{ 2 in [1,2] }}{{ 'k' in {'k': 1} }}{{ 'z' not in 'abc' }}{{ 1 in u }}",
       NULL, "TrueTrueTrueTrueFalse");
    OK("{{ 0 or 'x' }}|{{ 1 and 'y' }}|{{ none or [] }}|{{ not '' }}", NULL, "x|y|[]|True");
    OK("{{ 'a' if x else 'b' }}|{{ 'a' if 0 }}|{{ x.y if x else 'n' }}", "{\"x\":{\"y\":5}}",
       "a||5");
    OK("{{ s[0] }}{{ s[-1] }}{{ s[1:3] }}{{ s[::-1] }}{{ s[:-1] }}{{ l[1:] }}{{ l[::2] }}",
       "{\"s\":\"h\xc3\xa9llo\",\"l\":[1,2,3]}",
       "ho\xc3\xa9l"
       "oll\xc3\xa9h"
       "h\xc3\xa9ll[2, 3][1, 3]");
    OK("{{ m.a }}{{ m['a'] }}{{ m.b is defined }}{{ l[5] is defined }}{{ m.get('a') }}"
       "{{ m.get('z', 7) }}{{ m.items() | list }}",
       "{\"m\":{\"a\":1},\"l\":[]}", "11FalseFalse17[('a', 1)]");
    OK("{{ x is none }}{{ 1 is number }}{{ 'a' is string }}{{ [] is iterable }}{{ {} is mapping }}"
       "{{ 3 is odd }}{{ 4 is divisibleby 2 }}{{ 4 is divisibleby(3) }}{{ y is not defined }}",
       "{\"x\":null}", "TrueTrueTrueTrueTrueTrueTrueFalseTrue");
    /* integers from JSON stay integers; other numbers are floats */
    OK("{{ n }} {{ f }} {{ n is integer }} {{ big }}", "{\"n\":3,\"f\":2.5,\"big\":1e300}",
       "3 2.5 True 1e+300");
}

static void test_statements(void) {
    OK("{% for x in [1,2,3] if x > 1 %}{{ loop.index }}/{{ loop.length }}{{ loop.first }}"
       "{{ loop.last }}{% else %}E{% endfor %}",
       NULL, "1/2TrueFalse2/2FalseTrue");
    OK("{% for x in [] %}x{% else %}empty{% endfor %}", NULL, "empty");
    OK("{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }}{{ ',' if not loop.last }}"
       "{% endfor %}",
       NULL, "a=1,b=2");
    OK("{% for x in [1,2,3,4] %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}"
       "{% break %}{% endif %}{{ x }}{{ loop.previtem }}{{ loop.cycle('a', 'b') }}{% endfor %}",
       NULL, "1a32a");
    /* a set inside a loop stays in its iteration; a namespace carries values out */
    OK("{% for i in range(3) %}{% if i == 1 %}{% set x = 5 %}{% endif %}[{{ x }}]{% endfor %}"
       "[{{ x }}]",
       NULL, "[][5][][]");
    OK("{% set ns = namespace(n=0, s='') %}{% for c in 'abc' %}{% set ns.n = ns.n + 1 %}"
       "{% set ns.s = ns.s + c %}{% endfor %}{{ ns.n }}{{ ns.s }}",
       NULL, "3abc");
    OK("{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set t %}x{{ a }}{% endset %}{{ t }}", NULL, "12x1");
    OK("{% macro m(a, b=2) %}{{ a }}-{{ b }}-{{ g }}{% endmacro %}{% set g = 7 %}{{ m(1) }}"
       "{{ m(1, b=3) }}",
       NULL, "1-2-71-3-7");
    OK("{% macro f(n) %}{% if n > 0 %}{{ n }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(3) }}",
       NULL, "321");
    OK("{% if x %}a{% elif y %}b{% else %}c{% endif %}", "{\"y\":1}", "b");
    OK("{% generation %}g{% endgeneration %}", NULL, "g");
    /* the loop variable of an outer loop is seen inside, shadowed by the inner one */
    OK("{% for a in [1,2] %}{% for b in 'xy' %}{{ a }}{{ b }}{{ loop.index }}{% endfor %}"
       "{% endfor %}",
       NULL, "1x11y22x12y2");
}

static void test_builtins(void) {
    OK("{{ 'a,b,,c'.split(',') }}{{ ' a b '.split() }}{{ 'a-b-c'.split('-', 1) }}"
       "{{ 'a-b-c'.rsplit('-', 1) }}{{ '  a b  c '.split(none, 1) }}{{ ''.split() }}"
       "{{ ''.split(',') }}",
       NULL, "['a', 'b', '', 'c']['a', 'b']['a', 'b-c']['a-b', 'c']['a', 'b  c '][]['']");
    OK("[{{ '  x \\n'.strip() }}][{{ 'xxaxx'.strip('x') }}][{{ '  x '.lstrip() }}]"
       "[{{ '  x '.rstrip() }}]{{ 'abc'.startswith('ab') }}{{ 'abc'.endswith(('x', 'c')) }}",
       NULL, "[x][a][x ][  x]TrueTrue");
    OK("{{ 'Hi There'.lower() }}{{ 'hi'.upper() }}{{ 'hello world'.title() }}"
       "{{ 'hELLO'.capitalize() }}{{ 'aaa'.replace('a', 'b', 2) }}{{ 'abc'.find('c') }}"
       "{{ 'abab'.count('ab') }}",
       NULL, "hi thereHIHello WorldHellobba22");
    OK("{{ x | tojson }}", "{\"x\":{\"b\":[1,2.5,null,true],\"a\":\"\xc3\xa9\\\"\\n<>&\"}}",
       "{\"b\": [1, 2.5, null, true], \"a\": \"\xc3\xa9\\\"\\n<>&\"}");
    OK("{{ x | tojson(indent=2) }}|{{ x | tojson(separators=(',', ':'), sort_keys=true) }}"
       "|{{ 'é' | tojson(ensure_ascii=true) }}|{{ [] | tojson }}|{{ {} | tojson(indent=2) }}",
       "{\"x\":{\"b\":[1],\"a\":2}}",
       "{\n  \"b\": [\n    1\n  ],\n  \"a\": 2\n}|{\"a\":2,\"b\":[1]}|\"\\u00e9\"|[]|{}");
    OK("{{ '  x ' | trim }}|{{ [1,2] | length }}|{{ 'é' | length }}|{{ u | length }}"
       "|{{ 3 | string }}|{{ u | default('d') }}|{{ '' | default('d', true) }}"
       "|{{ [1,2,3] | join('-') }}|{{ [1,2] | first }}{{ [1,2] | last }}|{{ 'ab' | list }}"
       "|{{ 'ab' | reverse }}|{{ '3' | int + 1 }}|{{ 'x' | int }}|{{ '2.5' | float }}"
       "|{{ -3 | abs }}|{{ 'a\nb' | indent(2) }}|{{ 'Ab' | upper }}",
       NULL, "x|2|1|0|3|d|d|1-2-3|12|['a', 'b']|ba|4|0|2.5|3|a\n  b|AB");
    OK("{{ l | map(attribute='n') | list }}|{{ l | selectattr('n', 'gt', 1) | map(attribute='n') "
       "| join(',') }}|{{ [0, 1, 2] | select | list }}|{{ [1, 2, 3] | reject('odd') | list }}"
       "|{{ l | rejectattr('n') | list }}|{{ ['a', 'B'] | map('upper') | join }}",
       "{\"l\":[{\"n\":1},{\"n\":2},{\"n\":0}]}", "[1, 2, 0]|2|[1, 2]|[2]|[{'n': 0}]|AB");
    OK("{{ range(3) | list }}{{ range(1, 7, 2) | list }}{{ range(3, 0, -1) | list }}"
       "{{ dict(a=1) }}{{ namespace(x=1).x }}",
       NULL, "[0, 1, 2][1, 3, 5][3, 2, 1]{'a': 1}1");
}

static void test_render_errors(void) {
    /* what jinja2 would raise, as 400-worthy messages with the line */
    FAILS("{{ raise_exception('Conversation roles must alternate') }}", NULL, DUET_ERR_INVALID,
          "Conversation roles must alternate");
    FAILS("\n\n{{ 'a' + none }}", NULL, DUET_ERR_INVALID,
          "line 3: unsupported operand types "
          "for +: 'str' and 'none'");
    FAILS("{{ x.y }}", NULL, DUET_ERR_INVALID, "'x' is undefined");
    FAILS("{{ m.a.b }}", "{\"m\":{}}", DUET_ERR_INVALID, "'a' is undefined");
    FAILS("{{ u + 'a' }}", NULL, DUET_ERR_INVALID, "'u' is undefined");
    FAILS("{{ u | tojson }}", NULL, DUET_ERR_INVALID, "Object of type Undefined");
    FAILS("{% for x in 5 %}{% endfor %}", NULL, DUET_ERR_INVALID, "'int' object is not iterable");
    FAILS("{{ 1 // 0 }}", NULL, DUET_ERR_INVALID, "division by zero");
    FAILS("{% set x = 1 %}{% set x.a = 2 %}", NULL, DUET_ERR_INVALID, "non-namespace");
    FAILS("{{ 'a' < 1 }}", NULL, DUET_ERR_INVALID, "not supported between");
    FAILS("{{ 9223372036854775807 + 1 }}", NULL, DUET_ERR_UNSUPPORTED, "64 bits");
    FAILS("{{ f() }}", "{\"f\":1}", DUET_ERR_INVALID, "not callable");
    FAILS("{% macro m(a) %}{% endmacro %}{{ m(1, 2) }}", NULL, DUET_ERR_INVALID, "at most 1");
    /* limits: loops, output, recursion, memory */
    jinja_limits lim = {.max_steps = 1000};
    expect_full("{% for i in range(10) %}{% for j in range(200) %}{% endfor %}{% endfor %}", NULL,
                NULL, DUET_ERR_TOO_LONG, "loop iterations", &lim);
    lim = (jinja_limits){.max_output = 100};
    expect_full("{% for i in range(101) %}x{% endfor %}", NULL, NULL, DUET_ERR_TOO_LONG,
                "exceeds 100 bytes", &lim);
    expect_full("{% for i in range(100) %}x{% endfor %}", NULL,
                "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
                "xxxxxxxxxxxxxxxxxx",
                DUET_OK, NULL, &lim);
    FAILS("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", NULL, DUET_ERR_TOO_LONG,
          "nested more than 64");
    lim = (jinja_limits){.max_memory = 4 << 20};
    expect_full("{% set ns = namespace(s='xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx') %}"
                "{% for i in range(20) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
                NULL, NULL, DUET_ERR_TOO_LONG, "working memory", &lim);
    FAILS("{% set ns = namespace(l=[]) %}{% for i in range(2000) %}{% set ns.l = [ns.l] %}"
          "{% endfor %}",
          NULL, DUET_ERR_TOO_LONG, "nested more than");
}

/* Parse-time refusals name the construct and the line. */
static void expect_parse(const char *src, duet_status st, const char *msg) {
    jinja_template *t = (jinja_template *)1;
    char err[256] = "";
    duet_status got = jinja_parse(src, strlen(src), &t, err, sizeof err);
    CHECK_MSG(got == st, "%s: got %s (%s)", src, duet_strerror(got), err);
    CHECK_MSG(strstr(err, msg) != NULL, "%s: error [%s] lacks [%s]", src, err, msg);
    CHECK(t == (jinja_template *)1);
}

static void test_parse_errors(void) {
    expect_parse("a\n{% include 'x.jinja' %}", DUET_ERR_UNSUPPORTED,
                 "line 2: unsupported construct 'include'");
    expect_parse("{% extends 'base' %}", DUET_ERR_UNSUPPORTED,
                 "line 1: unsupported construct "
                 "'extends'");
    expect_parse("\n\n\n{{ x | wordwrap }}", DUET_ERR_UNSUPPORTED,
                 "line 4: unsupported construct '|wordwrap' (filter)");
    expect_parse("{% if x is sameas y %}{% endif %}", DUET_ERR_UNSUPPORTED,
                 "unsupported construct 'is sameas' (test)");
    expect_parse("{% call m() %}{% endcall %}", DUET_ERR_UNSUPPORTED,
                 "unsupported construct 'call'");
    expect_parse("{% for x in y recursive %}{% endfor %}", DUET_ERR_UNSUPPORTED, "recursive");
    expect_parse("{{ f(*args) }}", DUET_ERR_UNSUPPORTED, "unsupported construct '*'");
    expect_parse("{% filter upper %}x{% endfilter %}", DUET_ERR_UNSUPPORTED,
                 "unsupported construct 'filter'");
    expect_parse("{% if x %}\nno end", DUET_ERR_FORMAT, "needs 'endif'");
    expect_parse("{% endfor %}", DUET_ERR_FORMAT, "line 1: unexpected 'endfor'");
    expect_parse("{{ 'abc }}", DUET_ERR_FORMAT, "unterminated string");
    expect_parse("{{ 1 + }}", DUET_ERR_FORMAT, "expected an expression");
    expect_parse("{{ a b }}", DUET_ERR_FORMAT, "expected '}}'");
    expect_parse("{# open", DUET_ERR_FORMAT, "missing end of comment");
    expect_parse("{{ x", DUET_ERR_FORMAT, "expected '}}'");
    expect_parse("{{ 'a' ? }}", DUET_ERR_FORMAT, "unexpected character '?'");
    /* deep nesting is refused before it can exhaust the stack */
    char deep[2100];
    size_t n = 0;
    n += (size_t)snprintf(deep + n, sizeof deep - n, "{{ ");
    for (int i = 0; i < 1000; i++) deep[n++] = '(';
    deep[n++] = '1';
    for (int i = 0; i < 1000; i++) deep[n++] = ')';
    snprintf(deep + n, sizeof deep - n, " }}");
    expect_parse(deep, DUET_ERR_UNSUPPORTED, "nesting deeper than");
}

/* One template, many threads is the server's case: the template is never written to. */
static void test_reuse(void) {
    const char *src = "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 "
                      "%}{{ m }}{% endfor %}{{ ns.n }}";
    jinja_template *t = NULL;
    CHECK(jinja_parse(src, strlen(src), &t, NULL, 0) == DUET_OK);
    cJSON *m = cJSON_Parse("[\"a\",\"b\"]");
    jinja_var v = {"messages", m};
    for (int i = 0; i < 3; i++) {
        strbuf out = {0};
        strbuf_str(&out, "keep:");
        CHECK(jinja_render(t, &v, 1, NULL, &out, NULL, 0) == DUET_OK);
        CHECK_MSG(out.p && !strcmp(out.p, "keep:ab2"), "%s", out.p);
        strbuf_free(&out);
    }
    /* later vars win */
    jinja_var two[2] = {{"messages", m}, {"messages", NULL}};
    strbuf out = {0};
    CHECK(jinja_render(t, two, 2, NULL, &out, NULL, 0) != DUET_OK);
    strbuf_free(&out);
    cJSON_Delete(m);
    jinja_destroy(t);
    jinja_destroy(NULL);
}

int main(void) {
    log_set_level(LOG_LEVEL_ERROR);
    if (tok_load(GOLDEN_DIR "/tokenizer", &g_tok) != DUET_OK) {
        fprintf(stderr, "cannot load the golden tokenizer\n");
        return 1;
    }
    test_golden();
    test_whitespace();
    test_expressions();
    test_statements();
    test_builtins();
    test_render_errors();
    test_parse_errors();
    test_reuse();
    tok_destroy(g_tok);
    CHECK_DONE();
}
