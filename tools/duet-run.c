/* duet-run: generate from a prompt (or chat) on the command line, printing text as it streams.
 * The quickest way to see a model work: one engine, one request at a time, the same sampling
 * parameters the servers accept. Under mpirun (-tp/-dp) rank 0 generates and the other ranks
 * follow its steps. */
#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "text/chat.h"
#include "engine/engine.h"
#include "base/log.h"
#include "base/opt.h"
#include "engine/parallel.h"
#include "text/tokenizer.h"

typedef struct run_state {
    bool done;
    eng_finish finish;
    int n_out;
    int n_prompt;
    bool show_logprobs;
    char *answer; /* collected for chat history */
    size_t answer_len;
} run_state;

static void on_event(void *user, const eng_event *ev) {
    run_state *s = user;
    if (ev->text_len) {
        fwrite(ev->text, 1, ev->text_len, stdout);
        fflush(stdout);
        char *a = realloc(s->answer, s->answer_len + ev->text_len + 1);
        if (a) {
            memcpy(a + s->answer_len, ev->text, ev->text_len);
            s->answer_len += ev->text_len;
            a[s->answer_len] = '\0';
            s->answer = a;
        }
    }
    if (s->show_logprobs && ev->logprobs)
        for (int i = 0; i < ev->n_tokens; i++)
            fprintf(stderr, "[token %d logprob %.4f]\n", ev->tokens[i], ev->logprobs[i].logprob);
    s->n_out = ev->n_output;
    s->n_prompt = ev->n_prompt;
    if (ev->finish) {
        s->done = true;
        s->finish = ev->finish;
        if (ev->error) fprintf(stderr, "\nduet-run: %s\n", ev->error);
    }
}

int main(int argc, char **argv) {
    log_set_tag("duet-run");
    par_options po;
    par_options_init(&po);
    const char *model = NULL, *tok_dir = NULL, *prompt = NULL, *message = NULL, *system = NULL;
    bool chat = false, logprobs = false;
    eng_sampling sp;
    eng_sampling_default(&sp);
    double temperature = 0.6, top_p = sp.smp.top_p, min_p = sp.smp.min_p;
    double rep = sp.smp.repetition_penalty, pres = sp.smp.presence_penalty;
    double freq = sp.smp.frequency_penalty;
    int max_tokens = 256, min_tokens = 0, top_k = sp.smp.top_k;
    opt_list stops = {0};
    int max_model_len = 4096, block_size = 64, n_blocks = 512, spec_tokens = 0;
    const opt_spec specs[] = {
        {.name = "--model",
         .type = OPT_STRING,
         .dest = &model,
         .metavar = "DIR",
         .help = "checkpoint folder"},
        {.name = "--tokenizer",
         .type = OPT_STRING,
         .dest = &tok_dir,
         .metavar = "DIR",
         .help = "tokenizer.json + tokenizer_config.json (default: the model folder)"},
        {.name = "--prompt",
         .type = OPT_STRING,
         .dest = &prompt,
         .metavar = "TEXT",
         .help = "plain completion of TEXT (BOS prepended as the tokenizer says)"},
        {.name = "--message",
         .type = OPT_STRING,
         .dest = &message,
         .metavar = "TEXT",
         .help = "one chat turn, rendered with the chat template"},
        {.name = "--chat",
         .type = OPT_FLAG,
         .dest = &chat,
         .help = "interactive chat: one user message per line on stdin"},
        {.name = "--system",
         .type = OPT_STRING,
         .dest = &system,
         .metavar = "TEXT",
         .help = "system prompt for --message / --chat"},
        {.name = "--max-tokens",
         .type = OPT_INT,
         .dest = &max_tokens,
         .min = 1,
         .max = 1 << 24,
         .def = "256"},
        {.name = "--min-tokens", .type = OPT_INT, .dest = &min_tokens, .min = 0, .max = 1 << 24},
        {.name = "--temperature",
         .type = OPT_DOUBLE,
         .dest = &temperature,
         .min = 0,
         .max = 100,
         .def = "0.6"},
        {.name = "--top-p", .type = OPT_DOUBLE, .dest = &top_p, .min = 1e-9, .max = 1},
        {.name = "--top-k", .type = OPT_INT, .dest = &top_k, .min = -1, .max = 1 << 24},
        {.name = "--min-p", .type = OPT_DOUBLE, .dest = &min_p, .min = 0, .max = 1},
        {.name = "--repetition-penalty", .type = OPT_DOUBLE, .dest = &rep, .min = 1e-3, .max = 100},
        {.name = "--presence-penalty", .type = OPT_DOUBLE, .dest = &pres, .min = -2, .max = 2},
        {.name = "--frequency-penalty", .type = OPT_DOUBLE, .dest = &freq, .min = -2, .max = 2},
        {.name = "--stop",
         .type = OPT_LIST,
         .dest = &stops,
         .metavar = "TEXT...",
         .help = "stop strings"},
        {.name = "--ignore-eos", .type = OPT_FLAG, .dest = &sp.ignore_eos},
        {.name = "--logprobs",
         .type = OPT_FLAG,
         .dest = &logprobs,
         .help = "print each token's logprob"},
        {.name = "--max-model-len",
         .type = OPT_INT,
         .dest = &max_model_len,
         .min = 2,
         .max = 1 << 24,
         .def = "4096"},
        {.name = "--block-size",
         .type = OPT_INT,
         .dest = &block_size,
         .min = 1,
         .max = 1 << 16,
         .def = "64"},
        {.name = "--num-blocks",
         .type = OPT_INT,
         .dest = &n_blocks,
         .min = 1,
         .max = 1 << 24,
         .def = "512"},
        {.name = "--num-speculative-tokens",
         .type = OPT_INT,
         .dest = &spec_tokens,
         .min = 0,
         .max = MDL_MAX_DRAFT,
         .def = "0",
         .help = "MTP speculative decoding: drafts per step (the checkpoint's MTP module)"},
    };
    opt_parser *op;
    if (opt_parser_create("duet-run",
                          "--model DIR (--prompt TEXT | --message TEXT | --chat) "
                          "[options]",
                          "Generates from the command line, streaming (--seed seeds sampling and "
                          "dummy weights alike).",
                          &op) != DUET_OK)
        return 1;
    int prc = 2;
    if (opt_add(op, "Generation", specs, (int)(sizeof specs / sizeof specs[0])) == DUET_OK &&
        par_options_add(op, &po) == DUET_OK)
        prc = opt_parse(op, argc, argv);
    if (prc == 0 && opt_given(op, "--seed")) {
        sp.seed = po.seed;
        sp.has_seed = true;
    }
    if (prc == 0 && stops.n > ENG_MAX_STOP) {
        fprintf(stderr, "duet-run: --stop: at most %d strings\n", ENG_MAX_STOP);
        prc = 2;
    }
    for (int i = 0; prc == 0 && i < stops.n; i++) sp.stop[sp.n_stop++] = (char *)stops.v[i];
    opt_parser_destroy(op);
    if (prc) return prc == 1 ? 0 : 2;
    sp.max_tokens = max_tokens;
    sp.min_tokens = min_tokens;
    sp.smp.temperature = (float)temperature;
    sp.smp.top_p = (float)top_p;
    sp.smp.top_k = top_k;
    sp.smp.min_p = (float)min_p;
    sp.smp.repetition_penalty = (float)rep;
    sp.smp.presence_penalty = (float)pres;
    sp.smp.frequency_penalty = (float)freq;
    if (!model || (!prompt && !message && !chat)) {
        fprintf(stderr, "duet-run: --model and one of --prompt, --message, --chat are required "
                        "(see --help)\n");
        return 2;
    }
    if (logprobs) sp.logprobs = 0;
    po.spec_tokens = spec_tokens;

    par_instance *inst;
    if (par_instance_create(&po, model, &argc, &argv, &inst) != DUET_OK) return 1;
    int rc = 0;
    if (par_tp_rank(inst) != 0 || par_dp_rank(inst) != 0) {
        /* every other rank follows rank 0's steps; other DP groups only join with empty ones */
        be_kv *kv = NULL;
        if (par_tp_rank(inst) != 0) {
            int nb = n_blocks;
            if (par_kv_agree(inst, &nb, block_size) == DUET_OK &&
                mdl_kv_create(par_model(inst), nb, block_size, &kv) == DUET_OK)
                rc = par_follow(inst, kv) == DUET_OK ? 0 : 1;
        } else {
            rc = par_finish(inst) == DUET_OK ? 0 : 1;
        }
        mdl_kv_destroy(par_model(inst), kv);
        par_instance_destroy(inst);
        return rc;
    }

    tok_tokenizer *tok = NULL;
    chat_template *tpl = NULL;
    if (tok_load(tok_dir ? tok_dir : model, &tok) != DUET_OK ||
        ((message || chat) && chat_load(tok_dir ? tok_dir : model, &tpl) != DUET_OK)) {
        par_stop_followers(inst);
        par_instance_destroy(inst);
        return 1;
    }
    run_state rs = {.show_logprobs = logprobs};
    eng_config ec;
    eng_config_default(&ec);
    ec.max_model_len = max_model_len;
    ec.block_size = block_size;
    ec.n_blocks = n_blocks;
    ec.on_event = on_event;
    ec.event_user = &rs;
    ec.spec_tokens = spec_tokens;
    eng_engine *eng = NULL;
    if (eng_create(&ec, inst, tok, &eng) != DUET_OK) {
        rc = 1;
        goto out;
    }

    cJSON *history = cJSON_CreateArray();
    if (system) {
        cJSON *m = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "role", "system");
        cJSON_AddStringToObject(m, "content", system);
        cJSON_AddItemToArray(history, m);
    }
    char line[65536];
    for (uint64_t turn = 1;; turn++) {
        char *text = NULL;
        size_t text_len = 0;
        bool add_bos = false;
        if (prompt) {
            text = strdup(prompt);
            text_len = strlen(prompt);
            add_bos = tok_add_bos(tok);
        } else {
            const char *user = message;
            if (chat) {
                fprintf(stderr, "\n> ");
                if (!fgets(line, sizeof line, stdin)) break;
                line[strcspn(line, "\n")] = '\0';
                if (!line[0]) continue;
                user = line;
            }
            cJSON *m = cJSON_CreateObject();
            cJSON_AddStringToObject(m, "role", "user");
            cJSON_AddStringToObject(m, "content", user);
            cJSON_AddItemToArray(history, m);
            chat_opts co = chat_default_opts(tpl);
            char err[256];
            if (chat_render(tpl, history, &co, &text, &text_len, err, sizeof err) != DUET_OK) {
                fprintf(stderr, "duet-run: %s\n", err);
                rc = 1;
                break;
            }
        }
        int32_t *ids = NULL;
        size_t n_ids = 0;
        duet_status st = tok_encode(tok, text, text_len, false, &ids, &n_ids);
        free(text);
        if (st != DUET_OK) {
            rc = 1;
            break;
        }
        int32_t *prompt_ids = malloc((n_ids + 1) * sizeof(int32_t));
        size_t n = 0;
        if (add_bos) prompt_ids[n++] = tok_bos_id(tok);
        memcpy(prompt_ids + n, ids, n_ids * sizeof(int32_t));
        n += n_ids;
        free(ids);
        eng_request q = {.id = turn, .prompt = prompt_ids, .n_prompt = (int)n, .sampling = sp};
        char err[256];
        rs = (run_state){.show_logprobs = logprobs};
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        st = eng_submit(eng, &q, err, sizeof err);
        free(prompt_ids);
        if (st != DUET_OK) {
            fprintf(stderr, "duet-run: %s\n", err);
            rc = 1;
            break;
        }
        while (!rs.done) {
            bool busy;
            if (eng_step(eng, &busy) != DUET_OK) {
                rc = 1;
                break;
            }
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double dt = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
        fprintf(stderr, "\n[%d prompt tokens, %d generated, %.2f s, %.1f tokens/s, finish: %s]\n",
                rs.n_prompt, rs.n_out, dt, dt > 0 ? rs.n_out / dt : 0.0,
                eng_finish_name(rs.finish) ? eng_finish_name(rs.finish) : "?");
        if (chat) {
            cJSON *m = cJSON_CreateObject();
            cJSON_AddStringToObject(m, "role", "assistant");
            cJSON_AddStringToObject(m, "content", rs.answer ? rs.answer : "");
            cJSON_AddItemToArray(history, m);
        }
        free(rs.answer);
        rs.answer = NULL;
        if (!chat || rc) break;
    }
    cJSON_Delete(history);
out:
    eng_destroy(eng);
    par_stop_followers(inst);
    par_finish(inst);
    chat_destroy(tpl);
    tok_destroy(tok);
    par_instance_destroy(inst);
    return rc;
}
