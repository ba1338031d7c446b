/* duet-run: generate from a prompt (or chat) on the command line, printing text as it streams.
 * The quickest way to see a model work: one engine, one request at a time, the same sampling
 * parameters the servers accept. Under mpirun (-tp/-dp) DP rank 0 generates, its TP followers
 * follow its steps, the other DP groups only join (empty steps under lockstep), and every TP
 * leader votes after each step, as the servers' leaders do, so all leave in the same round. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "text/chat.h"
#include "engine/engine.h"
#include "base/log.h"
#include "base/opt.h"
#include "dist/comm.h"
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

/* One engine step and one round of the TP leaders' vote (NULL alone: mine is the answer):
 * *more_p tells whether any leader still wants steps. An idle step is a heartbeat to the TP
 * followers and, under lockstep, this group's empty step when another has work. A failure
 * ends the whole instance: the other leaders would wait for this one until the deadline. */
static duet_status step_and_vote(eng_engine *eng, comm_group *leaders, bool mine, bool *more_p) {
    bool busy;
    duet_status st = eng_step(eng, &busy);
    long long v = mine;
    if (st == DUET_OK && leaders) st = comm_allreduce_i64(leaders, &v, 1, true);
    if (st != DUET_OK) {
        if (leaders) {
            LOG_ERROR("duet-run: a step failed (%s); stopping the instance", duet_strerror(st));
            comm_abort(1);
        }
        return st;
    }
    *more_p = v != 0;
    return DUET_OK;
}

/* --chat's input, read with read(2) so that poll(2) sees what is still unread. */
typedef struct line_reader {
    char line[65536]; /* the last line read, without its newline */
    char buf[65536];
    size_t n; /* bytes in buf */
    bool eof;
} line_reader;

/* The next line of stdin into r->line (DUET_ERR_NOT_FOUND at the end of input). With other
 * ranks, while no line is ready the engine keeps stepping and voting to stay, so the
 * followers' and other groups' collectives never reach their deadline while someone types. */
static duet_status read_line(line_reader *r, eng_engine *eng, comm_group *leaders) {
    for (;;) {
        char *nl = memchr(r->buf, '\n', r->n);
        if (nl || r->eof || r->n == sizeof r->buf) {
            if (!nl && r->n == 0) return DUET_ERR_NOT_FOUND;
            size_t len = nl ? (size_t)(nl - r->buf) : r->n;
            size_t take = nl ? len + 1 : len;
            if (len >= sizeof r->line) len = sizeof r->line - 1;
            memcpy(r->line, r->buf, len);
            r->line[len] = '\0';
            memmove(r->buf, r->buf + take, r->n - take);
            r->n -= take;
            return DUET_OK;
        }
        struct pollfd pfd = {.fd = STDIN_FILENO, .events = POLLIN};
        int pr = poll(&pfd, 1, leaders ? 20 : -1);
        if (pr < 0 && errno != EINTR) return DUET_ERR_IO;
        if (pr <= 0) {
            bool more;
            duet_status st = leaders ? step_and_vote(eng, leaders, true, &more) : DUET_OK;
            if (st != DUET_OK) return st;
            continue;
        }
        ssize_t got = read(STDIN_FILENO, r->buf + r->n, sizeof r->buf - r->n);
        if (got < 0 && errno != EINTR && errno != EAGAIN) return DUET_ERR_IO;
        if (got == 0) r->eof = true;
        if (got > 0) r->n += (size_t)got;
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

    /* every rank reads the tokenizer and the chat template before any collective: a bad file
     * fails all alike, before MPI */
    tok_tokenizer *tok = NULL;
    chat_template *tpl = NULL;
    if (tok_load(tok_dir ? tok_dir : model, &tok) != DUET_OK ||
        ((message || chat) && chat_load(tok_dir ? tok_dir : model, &tpl) != DUET_OK)) {
        tok_destroy(tok);
        return 1;
    }
    par_instance *inst;
    if (par_instance_create(&po, model, &argc, &argv, &inst) != DUET_OK) {
        chat_destroy(tpl);
        tok_destroy(tok);
        return 1;
    }
    int rc = 0;
    /* the TP leaders' vote after every step (the server's rule): every leader, the generating
     * one included, leaves in the same round, so none waits in a collective the others left */
    comm_group *leaders = NULL;
    if (par_world(inst)->size > 1 &&
        comm_group_create("leaders", par_tp_rank(inst) == 0 ? 0 : 1, par_world(inst)->rank,
                          &leaders) != DUET_OK) {
        chat_destroy(tpl);
        tok_destroy(tok);
        par_instance_destroy(inst);
        return 1;
    }
    if (par_tp_rank(inst) != 0) {
        /* a TP follower runs its leader's plans, steps and heartbeats alike, until it stops them */
        be_kv *kv = NULL;
        int nb = n_blocks;
        rc = 1;
        if (par_kv_agree(inst, &nb, block_size) == DUET_OK &&
            mdl_kv_create(par_model(inst), nb, block_size, &kv) == DUET_OK)
            rc = par_follow(inst, kv) == DUET_OK ? 0 : 1;
        mdl_kv_destroy(par_model(inst), kv);
        goto out_inst;
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
        /* the other leaders would wait for this one in every step until the deadline */
        if (leaders) comm_abort(1);
        rc = 1;
        goto out;
    }
    bool more = true;
    if (par_dp_rank(inst) != 0) {
        /* another DP group: only heartbeats to its followers and, under lockstep, empty steps
         * joining DP rank 0's, until rank 0 votes to leave */
        while (more && rc == 0)
            if (step_and_vote(eng, leaders, false, &more) != DUET_OK) rc = 1;
        goto out;
    }

    cJSON *history = cJSON_CreateArray();
    if (system) {
        cJSON *m = cJSON_CreateObject();
        cJSON_AddStringToObject(m, "role", "system");
        cJSON_AddStringToObject(m, "content", system);
        cJSON_AddItemToArray(history, m);
    }
    line_reader lr = {0};
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
                duet_status rst = read_line(&lr, eng, leaders);
                if (rst == DUET_ERR_NOT_FOUND) break; /* end of input */
                if (rst != DUET_OK) {
                    rc = 1;
                    break;
                }
                if (!lr.line[0]) continue;
                user = lr.line;
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
        if (!prompt_ids) {
            free(ids);
            rc = 1;
            break;
        }
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
        while (!rs.done && rc == 0)
            if (step_and_vote(eng, leaders, true, &more) != DUET_OK) rc = 1;
        if (rc) break;
        if (rs.finish == ENG_FINISH_ERROR || rs.finish == ENG_FINISH_ABORT) rc = 1;
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
    /* DP rank 0 is done: one more round, voting to leave, which every other leader is
     * already voting (a failed step above has ended the instance instead) */
    while (more)
        if (step_and_vote(eng, leaders, false, &more) != DUET_OK) rc = 1;
out:
    eng_destroy(eng);
    par_stop_followers(inst);
out_inst:
    comm_group_destroy(leaders);
    chat_destroy(tpl);
    tok_destroy(tok);
    par_instance_destroy(inst);
    return rc;
}
