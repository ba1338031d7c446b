/* duet-check tokenizer / chat: runs the tokenizer and the chat renderer over reference cases
 * made by HF `tokenizers` and transformers' apply_chat_template, one line per case. The cases'
 * format is described in shared/golden/README.md. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "text/chat.h"
#include "check.h"
#include "base/fileio.h"
#include "base/opt.h"
#include "text/tokenizer.h"

#define CASES_MAX ((size_t)64 << 20)

/* A subcommand's start: --help and exactly n arguments, into args, then the tokenizer of the
 * first (a directory) into *tok_p. Returns -1 to go on, or the exit status: 0 after --help, 2
 * after one error line on the command line, 1 when the tokenizer does not load (tok_load said
 * why). */
static int start_command(const char *prog, const char *usage, const char *about, int n, int argc,
                         char **argv, const char **args, tok_tokenizer **tok_p) {
    opt_parser *p;
    if (opt_parser_create(prog, usage, about, &p) != DUET_OK) {
        fprintf(stderr, "%s: out of memory\n", prog);
        return 2;
    }
    opt_allow_positional(p, n, "arguments");
    int rc = opt_parse(p, argc, argv);
    if (rc == 0 && opt_positional_count(p) != n) {
        fprintf(stderr, "%s: expected %s (see --help)\n", prog, usage);
        rc = 2;
    }
    for (int i = 0; rc == 0 && i < n; i++) args[i] = opt_positional(p, i);
    opt_parser_destroy(p);
    if (rc) return rc == 1 ? 0 : 2;
    return tok_load(args[0], tok_p) == DUET_OK ? -1 : 1;
}

static cJSON *read_cases(const char *path) {
    char *text;
    if (fio_read_text(path, CASES_MAX, &text) != DUET_OK) return NULL;
    cJSON *root = cJSON_ParseWithLength(text, strlen(text));
    free(text);
    if (!root) fprintf(stderr, "%s: not valid JSON\n", path);
    return root;
}

/* A short printable form of a case's text for its line: escapes control characters, keeps
 * UTF-8 sequences whole, and cuts after about 48 bytes. */
static void label(const char *s, char *out, size_t cap) {
    size_t o = 0, i = 0;
    while (s[i] && o + 12 < cap && o < 48) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0xc0) {
            size_t l = 1;
            while (l < 4 && ((unsigned char)s[i + l] & 0xc0) == 0x80) l++;
            memcpy(out + o, s + i, l);
            o += l;
            i += l;
            continue;
        }
        if (c == '\n')
            o += (size_t)snprintf(out + o, cap - o, "\\n");
        else if (c == '\r')
            o += (size_t)snprintf(out + o, cap - o, "\\r");
        else if (c == '\t')
            o += (size_t)snprintf(out + o, cap - o, "\\t");
        else if (c < 0x20 || c >= 0x7f)
            o += (size_t)snprintf(out + o, cap - o, "\\x%02x", c);
        else
            out[o++] = (char)c;
        i++;
    }
    if (s[i]) o += (size_t)snprintf(out + o, cap - o, "...");
    out[o] = '\0';
}

/* Reads an array of integers; false if v is not one. */
static bool json_ids(const cJSON *v, int32_t **ids_p, size_t *n_p) {
    if (!cJSON_IsArray(v)) return false;
    size_t n = (size_t)cJSON_GetArraySize(v), i = 0;
    int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
    if (!ids) return false;
    const cJSON *e;
    cJSON_ArrayForEach(e, v) {
        if (!cJSON_IsNumber(e)) {
            free(ids);
            return false;
        }
        ids[i++] = (int32_t)e->valuedouble;
    }
    *ids_p = ids;
    *n_p = n;
    return true;
}

/* Appends "what: ..." to why when got differs from want. */
static bool same_ids(const char *what, const int32_t *got, size_t ng, const int32_t *want,
                     size_t nw, char *why, size_t cap) {
    size_t i = 0;
    while (i < ng && i < nw && got[i] == want[i]) i++;
    if (i == ng && i == nw) return true;
    size_t l = strlen(why);
    if (i < ng && i < nw)
        snprintf(why + l, cap - l, "%s%s differ at %zu: got %d, want %d (%zu vs %zu ids)",
                 l ? "; " : "", what, i, got[i], want[i], ng, nw);
    else
        snprintf(why + l, cap - l, "%s%s: got %zu ids, want %zu", l ? "; " : "", what, ng, nw);
    return false;
}

static bool same_text(const char *what, const char *got, size_t ng, const char *want, char *why,
                      size_t cap) {
    size_t nw = strlen(want);
    if (ng == nw && !memcmp(got, want, ng)) return true;
    size_t i = 0;
    while (i < ng && i < nw && got[i] == want[i]) i++;
    size_t l = strlen(why);
    char g[64], w[64];
    label(got + i, g, sizeof g);
    label(want + i, w, sizeof w);
    snprintf(why + l, cap - l, "%s%s differs at byte %zu: got \"%s\", want \"%s\"", l ? "; " : "",
             what, i, g, w);
    return false;
}

/* Feeds ids through a stream and checks the pieces join up to tok_decode's text. */
static bool stream_matches(const tok_tokenizer *tok, const int32_t *ids, size_t n,
                           bool skip_special, char *why, size_t cap) {
    char *want;
    size_t nwant;
    if (tok_decode(tok, ids, n, skip_special, &want, &nwant) != DUET_OK) return false;
    tok_stream *s;
    if (tok_stream_create(tok, skip_special, &s) != DUET_OK) {
        free(want);
        return false;
    }
    char *got = malloc(3 * nwant + 3 * n + 16);
    size_t ng = 0;
    bool ok = got != NULL;
    for (size_t i = 0; ok && i < n; i++) {
        const char *p;
        size_t l;
        ok = tok_stream_put(s, ids[i], &p, &l) == DUET_OK;
        if (ok) memcpy(got + ng, p, l);
        ng += ok ? l : 0;
    }
    if (ok) {
        const char *p;
        size_t l;
        tok_stream_finish(s, &p, &l);
        memcpy(got + ng, p, l);
        ng += l;
        ok = same_text(skip_special ? "stream (skip special)" : "stream", got, ng, want, why, cap);
    }
    tok_stream_destroy(s);
    free(got);
    free(want);
    return ok;
}

static bool run_tok_case(const tok_tokenizer *tok, const cJSON *c, char *why, size_t cap) {
    const cJSON *text = cJSON_GetObjectItemCaseSensitive(c, "text");
    const cJSON *dec = cJSON_GetObjectItemCaseSensitive(c, "decoded");
    const cJSON *dec_skip = cJSON_GetObjectItemCaseSensitive(c, "decoded_skip_special");
    int32_t *want = NULL, *want_sp = NULL;
    size_t nwant = 0, nwant_sp = 0;
    if (!cJSON_IsString(text) || !cJSON_IsString(dec) || !cJSON_IsString(dec_skip) ||
        !json_ids(cJSON_GetObjectItemCaseSensitive(c, "ids"), &want, &nwant) ||
        !json_ids(cJSON_GetObjectItemCaseSensitive(c, "ids_with_special"), &want_sp, &nwant_sp)) {
        snprintf(why, cap,
                 "malformed case (needs text, ids, ids_with_special, decoded, "
                 "decoded_skip_special)");
        free(want);
        return false;
    }
    bool ok = true;
    int32_t *ids = NULL;
    size_t n = 0;
    const char *s = text->valuestring;
    if (tok_encode(tok, s, strlen(s), false, &ids, &n) == DUET_OK) {
        ok &= same_ids("ids", ids, n, want, nwant, why, cap);
        free(ids);
    } else {
        ok = false;
        snprintf(why, cap, "encode failed");
    }
    if (tok_encode(tok, s, strlen(s), true, &ids, &n) == DUET_OK) {
        ok &= same_ids("ids_with_special", ids, n, want_sp, nwant_sp, why, cap);
        free(ids);
    } else {
        ok = false;
        snprintf(why, cap, "encode with special tokens failed");
    }
    /* Decoding starts from the reference ids, so it is checked even when encoding is off. */
    for (int skip = 0; skip < 2; skip++) {
        char *out;
        size_t len;
        const char *what = skip ? "decoded_skip_special" : "decoded";
        if (tok_decode(tok, want, nwant, skip, &out, &len) != DUET_OK) {
            size_t l = strlen(why);
            snprintf(why + l, cap - l, "%s%s: decode failed", l ? "; " : "", what);
            ok = false;
            continue;
        }
        ok &= same_text(what, out, len, (skip ? dec_skip : dec)->valuestring, why, cap);
        free(out);
        ok &= stream_matches(tok, want, nwant, skip, why, cap);
    }
    free(want);
    free(want_sp);
    return ok;
}

int check_tokenizer_main(int argc, char **argv) {
    const char *a[3];
    tok_tokenizer *tok;
    int rc = start_command("duet-check tokenizer", "TOKENIZER_DIR CASES_JSON VARIANT",
                           "Encodes and decodes every case under cases.VARIANT of CASES_JSON with "
                           "TOKENIZER_DIR/tokenizer.json, one line per case.",
                           3, argc, argv, a, &tok);
    if (rc >= 0) return rc;
    const char *cases_path = a[1], *variant = a[2];
    cJSON *root = read_cases(cases_path);
    const cJSON *cases =
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, "cases"), variant);
    if (!cJSON_IsArray(cases)) {
        if (root) fprintf(stderr, "%s: no array cases.%s\n", cases_path, variant);
        cJSON_Delete(root);
        tok_destroy(tok);
        return 1;
    }
    int passed = 0, failed = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, cases) {
        char why[1024] = "", lab[96];
        const cJSON *text = cJSON_GetObjectItemCaseSensitive(c, "text");
        label(cJSON_IsString(text) ? text->valuestring : "?", lab, sizeof lab);
        if (run_tok_case(tok, c, why, sizeof why)) {
            printf("ok   \"%s\"\n", lab);
            passed++;
        } else {
            printf("FAIL \"%s\": %s\n", lab, why);
            failed++;
        }
    }
    printf("%d passed, %d failed\n", passed, failed);
    cJSON_Delete(root);
    tok_destroy(tok);
    return failed || passed == 0 ? 1 : 0;
}

/* A reference whose ids do not decode to its own text contradicts itself and cannot judge the
 * ids (chat_template_cases.json has such: its ids drop every character outside GPT-2's byte
 * alphabet, spaces and CJK included). Those ids are reported, not compared; the text still is. */
static bool ids_self_consistent(const tok_tokenizer *tok, const int32_t *ids, size_t n,
                                const char *text, char *note, size_t cap) {
    char *dec;
    size_t len;
    if (tok_decode(tok, ids, n, false, &dec, &len) != DUET_OK) {
        snprintf(note, cap, "reference ids not compared: they hold an unknown id");
        return false;
    }
    bool same = len == strlen(text) && !memcmp(dec, text, len);
    if (!same) {
        char lab[96];
        label(dec, lab, sizeof lab);
        snprintf(note, cap, "reference ids not compared: they decode to \"%s\", not to the text",
                 lab);
    }
    free(dec);
    return same;
}

/* *skipped_p: the reference ids were not usable (see above). */
static bool run_chat_case(const tok_tokenizer *tok, const chat_template *tpl, const cJSON *c,
                          char *why, size_t cap, bool *skipped_p) {
    const cJSON *msgs = cJSON_GetObjectItemCaseSensitive(c, "messages");
    const cJSON *gen = cJSON_GetObjectItemCaseSensitive(c, "add_generation_prompt");
    const cJSON *text = cJSON_GetObjectItemCaseSensitive(c, "text");
    int32_t *want = NULL;
    size_t nwant = 0;
    *skipped_p = false;
    if (!cJSON_IsString(text) ||
        !json_ids(cJSON_GetObjectItemCaseSensitive(c, "ids"), &want, &nwant)) {
        snprintf(why, cap, "malformed case (needs messages, text, ids)");
        return false;
    }
    chat_opts opts = chat_default_opts(tpl);
    opts.add_generation_prompt = cJSON_IsTrue(gen);
    char *out, err[256];
    size_t len;
    bool ok = false;
    duet_status st = chat_render(tpl, msgs, &opts, &out, &len, err, sizeof err);
    if (st != DUET_OK) {
        snprintf(why, cap, "render failed: %s", err);
    } else {
        ok = same_text("text", out, len, text->valuestring, why, cap);
        int32_t *ids;
        size_t n;
        /* The template writes BOS itself. */
        if (tok_encode(tok, out, len, false, &ids, &n) != DUET_OK) {
            ok = false;
            snprintf(why, cap, "encode failed");
        } else if (ids_self_consistent(tok, want, nwant, text->valuestring, why + strlen(why),
                                       cap - strlen(why))) {
            ok &= same_ids("ids", ids, n, want, nwant, why, cap);
            free(ids);
        } else {
            *skipped_p = true;
            free(ids);
        }
        free(out);
    }
    free(want);
    return ok;
}

int check_chat_main(int argc, char **argv) {
    const char *a[2];
    tok_tokenizer *tok;
    int rc = start_command("duet-check chat", "TOKENIZER_DIR CASES_JSON",
                           "Renders every case's messages of CASES_JSON with TOKENIZER_DIR's chat "
                           "template and tokenizes them, one line per case.",
                           2, argc, argv, a, &tok);
    if (rc >= 0) return rc;
    const char *dir = a[0], *cases_path = a[1];
    chat_template *tpl;
    if (chat_load(dir, &tpl) != DUET_OK) {
        tok_destroy(tok);
        return 1;
    }
    cJSON *root = read_cases(cases_path);
    const cJSON *cases = cJSON_GetObjectItemCaseSensitive(root, "cases");
    int passed = 0, failed = 0, unusable = 0;
    if (!cJSON_IsArray(cases)) {
        if (root) fprintf(stderr, "%s: no array \"cases\"\n", cases_path);
        failed = -1;
    }
    const cJSON *c, *list = failed < 0 ? NULL : cases;
    int k = 0;
    cJSON_ArrayForEach(c, list) {
        /* The line names the roles and whether a generation prompt was asked for. */
        char lab[128] = "", why[1024] = "";
        size_t l = 0;
        const cJSON *m;
        cJSON_ArrayForEach(m, cJSON_GetObjectItemCaseSensitive(c, "messages")) {
            const cJSON *r = cJSON_GetObjectItemCaseSensitive(m, "role");
            if (l + 16 < sizeof lab)
                l += (size_t)snprintf(lab + l, sizeof lab - l, "%s%.10s", l ? "," : "",
                                      cJSON_IsString(r) ? r->valuestring : "?");
        }
        bool gen = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "add_generation_prompt"));
        bool skipped;
        if (run_chat_case(tok, tpl, c, why, sizeof why, &skipped)) {
            printf("ok   case %d [%s]%s%s%s\n", k, lab, gen ? " +generation prompt" : "",
                   why[0] ? ": " : "", why);
            passed++;
            unusable += skipped;
        } else {
            printf("FAIL case %d [%s]%s: %s\n", k, lab, gen ? " +generation prompt" : "", why);
            failed++;
        }
        k++;
    }
    if (unusable)
        printf("note: %d case(s) carry ids that do not decode to their own text; their text was "
               "checked, their ids were not\n",
               unusable);
    if (failed >= 0) printf("%d passed, %d failed\n", passed, failed);
    cJSON_Delete(root);
    chat_destroy(tpl);
    tok_destroy(tok);
    return failed || passed == 0 ? 1 : 0;
}
