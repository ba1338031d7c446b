/* The engine's text path with the real DeepSeek-V3 tokenizer on the golden model: a stop
 * string made of the end of one token's text and the start of the next is found, the answer is
 * cut before it and nothing of it was streamed before the decision; the model's own EOS ends a
 * request, and min_tokens holds it back (a copy of the golden model whose config names the
 * third greedy token as EOS). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "engine/engine.h"
#include "golden.h"
#include "base/log.h"
#include "engine/parallel.h"
#include "text/tokenizer.h"

typedef struct rec {
    char text[4096];
    size_t len;
    char piece[64][256]; /* text delivered by each event */
    int n_events, n_out, n_final;
    eng_finish finish;
    char stop_reason[64];
} rec;

static rec R;
static golden_set G;

static void on_event(void *user, const eng_event *ev) {
    (void)user;
    if (R.n_events < 64) {
        size_t n = ev->text_len < 255 ? ev->text_len : 255;
        if (n) memcpy(R.piece[R.n_events], ev->text, n); /* text is NULL in a bare final event */
        R.piece[R.n_events][n] = '\0';
    }
    R.n_events++;
    if (ev->text_len && R.len + ev->text_len < sizeof R.text) {
        memcpy(R.text + R.len, ev->text, ev->text_len);
        R.len += ev->text_len;
        R.text[R.len] = '\0';
    }
    R.n_out += ev->n_tokens;
    if (ev->finish) {
        R.n_final++;
        R.finish = ev->finish;
        snprintf(R.stop_reason, sizeof R.stop_reason, "%s", ev->stop_reason ? ev->stop_reason : "");
    }
}

static void run(par_instance *inst, const tok_tokenizer *tok, const golden_case *k,
                const eng_sampling *sp) {
    memset(&R, 0, sizeof R);
    eng_config c;
    eng_config_default(&c);
    c.block_size = 16;
    c.n_blocks = 64;
    c.max_model_len = 1024;
    c.on_event = on_event;
    eng_engine *e = NULL;
    CHECK(eng_create(&c, inst, tok, &e) == DUET_OK);
    eng_request q = {.id = 1, .prompt = k->prompt, .n_prompt = k->n_prompt, .sampling = *sp};
    char err[128];
    CHECK(eng_submit(e, &q, err, sizeof err) == DUET_OK);
    for (int i = 0; i < 1000 && !R.n_final; i++) {
        bool busy;
        eng_step(e, &busy);
    }
    eng_stats st;
    eng_get_stats(e, &st);
    CHECK(st.n_free_blocks == st.n_blocks);
    eng_destroy(e);
}

static int ascii_only(const char *s) {
    for (; *s; s++)
        if ((unsigned char)*s >= 0x80 || (unsigned char)*s < 0x20) return 0;
    return 1;
}

int main(void) {
    par_options po;
    par_options_init(&po);
    int argc = 0;
    char **argv = NULL;
    par_instance *inst;
    tok_tokenizer *tok;
    if (golden_load(GOLDEN_DIR "/tiny-v3", 2048, &G) != 0 ||
        tok_load(GOLDEN_DIR "/tokenizer", &tok) != DUET_OK ||
        par_instance_create(&po, GOLDEN_DIR "/tiny-v3/model", &argc, &argv, &inst) != DUET_OK)
        return 1;

    /* 1. where tokens' texts meet: pick two neighbouring ASCII pieces of 2+ bytes each */
    const golden_case *k = &G.cases[2];
    eng_sampling sp;
    eng_sampling_default(&sp);
    sp.smp.temperature = 0;
    sp.max_tokens = k->n_greedy;
    sp.ignore_eos = true;
    run(inst, tok, k, &sp);
    CHECK(R.n_out == k->n_greedy);
    int at = -1;
    for (int i = 0; i + 1 < R.n_events && i + 1 < 64; i++)
        if (strlen(R.piece[i]) >= 2 && strlen(R.piece[i + 1]) >= 2 && ascii_only(R.piece[i]) &&
            ascii_only(R.piece[i + 1]) && i > 0) {
            at = i;
            break;
        }
    CHECK_MSG(at > 0, "no two neighbouring ASCII pieces in '%s'", R.text);
    if (at > 0) {
        char stop[8], whole[4096], before[4096];
        size_t la = strlen(R.piece[at]);
        snprintf(stop, sizeof stop, "%s%.2s", R.piece[at] + la - 2, R.piece[at + 1]);
        snprintf(whole, sizeof whole, "%s", R.text);
        /* everything before the stop string's first occurrence */
        const char *hit = strstr(whole, stop);
        CHECK(hit != NULL);
        size_t cut = hit ? (size_t)(hit - whole) : 0;
        snprintf(before, sizeof before, "%.*s", (int)cut, whole);

        sp.n_stop = 1;
        sp.stop[0] = stop;
        run(inst, tok, k, &sp);
        CHECK_MSG(R.finish == ENG_FINISH_STOP && !strcmp(R.stop_reason, stop),
                  "finish %d, stop_reason '%s' (wanted '%s')", R.finish, R.stop_reason, stop);
        CHECK_MSG(!strcmp(R.text, before), "text '%s', wanted '%s'", R.text, before);
        /* streamed before the decision: never a part of the stop string past the cut */
        CHECK(strstr(R.text, stop) == NULL);
        /* include_stop_str_in_output keeps it */
        sp.include_stop_str_in_output = true;
        run(inst, tok, k, &sp);
        CHECK(R.finish == ENG_FINISH_STOP && R.len == cut + strlen(stop));
        sp.include_stop_str_in_output = false;
        sp.n_stop = 0;
    }

    /* 2. EOS: a copy of the golden model whose EOS is the third greedy token */
    const golden_case *g1 = &G.cases[1];
    char dir[] = "/tmp/duet-eos-XXXXXX", path[512], cfg[8192];
    CHECK(mkdtemp(dir) != NULL);
    char *text = NULL;
    CHECK(fio_read_text(GOLDEN_DIR "/tiny-v3/model/config.json", 1 << 20, &text) == DUET_OK);
    char *eos = text ? strstr(text, "\"eos_token_id\": 1") : NULL;
    CHECK(eos != NULL);
    if (eos) {
        snprintf(cfg, sizeof cfg, "%.*s\"eos_token_id\": %d%s", (int)(eos - text), text,
                 g1->greedy[2], eos + strlen("\"eos_token_id\": 1"));
        snprintf(path, sizeof path, "%s/config.json", dir);
        CHECK(fio_write_file(path, cfg, strlen(cfg)) == DUET_OK);
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        CHECK(symlink(GOLDEN_DIR "/tiny-v3/model/model.safetensors", path) == 0);
        par_instance *inst2;
        CHECK(par_instance_create(&po, dir, &argc, &argv, &inst2) == DUET_OK);
        eng_sampling_default(&sp);
        sp.smp.temperature = 0;
        sp.max_tokens = 12;
        run(inst2, NULL, g1, &sp);
        CHECK_MSG(R.finish == ENG_FINISH_STOP && R.n_out == 3, "EOS: finish %d after %d tokens",
                  R.finish, R.n_out);
        sp.min_tokens = 6;
        run(inst2, NULL, g1, &sp);
        CHECK_MSG(R.n_out >= 6, "min_tokens 6: only %d tokens", R.n_out);
        sp.ignore_eos = true;
        sp.min_tokens = 0;
        run(inst2, NULL, g1, &sp);
        CHECK(R.finish == ENG_FINISH_LENGTH && R.n_out == 12);
        par_instance_destroy(inst2);
        unlink(path);
        snprintf(path, sizeof path, "%s/config.json", dir);
        unlink(path);
    }
    free(text);
    rmdir(dir);
    tok_destroy(tok);
    par_instance_destroy(inst);
    fio_unmap(&G.map);
    CHECK_DONE();
}
