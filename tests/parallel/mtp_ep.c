/* mtp-ep: MTP speculative decoding under expert parallelism, driven the way the servers drive
 * it: every DP group's leader runs its own engine on its own requests (token ids, no
 * tokenizer), TP followers follow, idle groups join with empty steps and empty MTP passes.
 * Prints each request's output ids in rank order; mtp_ep.sh compares runs with and without
 * drafts. A broken lockstep ends in the collectives' timeout (DUET_COMM_TIMEOUT), not a hang.
 * Usage: mpirun -np N mtp-ep --model DIR [-tp T] [-dp D] [--enable-expert-parallel]
 *        [--num-speculative-tokens K] [--sampled] [--busy all|first] [--oracle FILE] */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "base/opt.h"
#include "dist/comm.h"
#include "engine/engine.h"
#include "engine/parallel.h"

enum { MAX_REQ = 3, MAX_OUT = 64, BLOCK_SIZE = 16, N_BLOCKS = 128 };

typedef struct out_req {
    int32_t ids[MAX_OUT];
    int n;
    bool done;
    bool failed;
    /* --oracle: the output of a run without drafts, which the drafts are steered to */
    int32_t want[MAX_OUT];
    int n_want;
    int vocab;
} out_req;

/* --oracle: drafts made right (they are the reference's next tokens) so they are accepted and
 * requests advance several tokens a step, except the last draft every other step, made wrong
 * so some verify steps accept only part of their drafts. */
static void on_draft(void *user, int n_output, int32_t *draft, int n_draft) {
    out_req *o = user;
    for (int j = 0; j < n_draft; j++)
        if (n_output + j < o->n_want) draft[j] = o->want[n_output + j];
    if (n_draft > 1 && n_output % 2) draft[n_draft - 1] = (draft[n_draft - 1] + 1) % o->vocab;
}

/* Reads DP group dp's lines "dp D req I: ids..." of a reference output into outs[].want. */
static int read_oracle(const char *path, int dp, out_req *outs) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "mtp-ep: cannot read %s\n", path);
        return 1;
    }
    char line[8192];
    while (fgets(line, sizeof line, f)) {
        int d, i, off;
        if (sscanf(line, "dp %d req %d:%n", &d, &i, &off) != 2 || d != dp || i < 0 || i >= MAX_REQ)
            continue;
        char *p = line + off, *end;
        for (long v = strtol(p, &end, 10); end != p && outs[i].n_want < MAX_OUT;
             v = strtol(p, &end, 10)) {
            outs[i].want[outs[i].n_want++] = (int32_t)v;
            p = end;
        }
    }
    fclose(f);
    return 0;
}

static void on_event(void *user, const eng_event *ev) {
    out_req *o = ev->user;
    (void)user;
    for (int i = 0; i < ev->n_tokens && o->n < MAX_OUT; i++) o->ids[o->n++] = ev->tokens[i];
    if (ev->finish) {
        o->done = true;
        o->failed = ev->finish == ENG_FINISH_ERROR;
        if (ev->error) fprintf(stderr, "mtp-ep: request failed: %s\n", ev->error);
    }
}

/* Request i of DP group dp: its own prompt and length, so groups finish at different steps and
 * one drafts while another idles. */
static void make_request(int dp, int i, int vocab, bool sampled, int32_t *prompt, int *n_prompt,
                         eng_sampling *sp) {
    int n = 6 + 5 * i + 3 * dp;
    for (int j = 0; j < n; j++) prompt[j] = (int32_t)((17 + 31 * dp + 7 * i + 13 * j) % vocab);
    *n_prompt = n;
    eng_sampling_default(sp);
    sp->ignore_eos = true;
    sp->max_tokens = dp == 0 ? 24 - 8 * i : 6 + 4 * i;
    if (sampled) {
        sp->smp.temperature = 0.8f;
        sp->smp.top_k = 20;
        sp->seed = 7 + (uint64_t)(100 * dp + i);
        sp->has_seed = true;
    } else {
        sp->smp.temperature = 0;
    }
}

/* A TP leader: its group's requests through the engine, stepping (empty steps once its own
 * are done) until every DP group is done. */
static int lead(par_instance *inst, comm_group *leaders, int k, bool sampled, bool busy,
                const char *oracle) {
    int dp = par_dp_rank(inst), n_req = busy ? (dp == 0 ? 3 : 2) : 0;
    out_req outs[MAX_REQ];
    memset(outs, 0, sizeof outs);
    if (oracle && read_oracle(oracle, dp, outs)) {
        par_stop_followers(inst);
        return 1;
    }
    eng_config ec;
    eng_config_default(&ec);
    ec.max_model_len = 256;
    ec.block_size = BLOCK_SIZE;
    ec.n_blocks = N_BLOCKS;
    ec.spec_tokens = k;
    ec.on_event = on_event;
    eng_engine *eng = NULL;
    int rc = 0;
    if (eng_create(&ec, inst, NULL, &eng) != DUET_OK) {
        par_stop_followers(inst);
        return 1;
    }
    int vocab = mdl_config(par_model(inst))->vocab_size;
    for (int i = 0; i < n_req; i++) {
        int32_t prompt[64];
        eng_request q = {.id = (uint64_t)i + 1, .prompt = prompt, .user = &outs[i]};
        outs[i].vocab = vocab;
        if (oracle) q.on_draft = on_draft;
        make_request(dp, i, vocab, sampled, prompt, &q.n_prompt, &q.sampling);
        char err[256];
        if (eng_submit(eng, &q, err, sizeof err) != DUET_OK) {
            fprintf(stderr, "mtp-ep: submit: %s\n", err);
            rc = 1;
            n_req = i;
            break;
        }
    }
    /* the server's loop: a step, then the DP leaders' vote (its own collective between steps)
     * on whether any of them still has work; an idle group's steps are empty ones */
    for (;;) {
        bool busy_step;
        if (eng_step(eng, &busy_step) != DUET_OK) {
            rc = 1;
            break;
        }
        long long more = 0;
        for (int i = 0; i < n_req; i++) more |= !outs[i].done;
        if (comm_allreduce_i64(leaders, &more, 1, true) != DUET_OK) {
            rc = 1;
            break;
        }
        if (!more) break;
    }
    char text[8192] = "";
    size_t len = 0;
    for (int i = 0; i < n_req; i++) {
        rc |= outs[i].failed || outs[i].n == 0;
        len += (size_t)snprintf(text + len, sizeof text - len, "dp %d req %d:", dp, i);
        for (int j = 0; j < outs[i].n && len < sizeof text - 16; j++)
            len += (size_t)snprintf(text + len, sizeof text - len, " %d", outs[i].ids[j]);
        len += (size_t)snprintf(text + len, sizeof text - len, "\n");
    }
    if (rc) len += (size_t)snprintf(text + len, sizeof text - len, "dp %d FAILED\n", dp);
    eng_stats es;
    eng_get_stats(eng, &es);
    /* on stderr: the outputs compared must not depend on acceptance */
    fprintf(stderr, "mtp-ep: dp %d drafted %llu, accepted %llu\n", dp,
            (unsigned long long)es.spec_draft_tokens, (unsigned long long)es.spec_accepted);
    /* the followers leave par_follow first: the print is a collective of every rank */
    par_stop_followers(inst);
    par_print_ordered(inst, text);
    eng_destroy(eng);
    return rc;
}

int main(int argc, char **argv) {
    par_options po;
    par_options_init(&po);
    const char *model = NULL, *oracle = NULL;
    int k = 0, busy = 0; /* busy: 0 all, 1 first */
    bool sampled = false;
    const opt_spec specs[] = {
        {.name = "--model", .type = OPT_STRING, .dest = &model, .help = "checkpoint directory"},
        {.name = "--num-speculative-tokens",
         .type = OPT_INT,
         .dest = &k,
         .def = "0",
         .min = 0,
         .max = 3,
         .help = "MTP drafts per step (0: off)"},
        {.name = "--sampled",
         .type = OPT_FLAG,
         .dest = &sampled,
         .help = "seeded sampling instead of greedy"},
        {.name = "--oracle",
         .type = OPT_STRING,
         .dest = &oracle,
         .metavar = "FILE",
         .help = "steer the drafts to this output of a run without drafts (most accepted)"},
        {.name = "--busy",
         .type = OPT_CHOICE,
         .dest = &busy,
         .def = "all",
         .choices = "all|first",
         .help = "requests on every DP group, or on DP group 0 only (the others idle)"},
    };
    opt_parser *op;
    if (opt_parser_create("mtp-ep", "--model DIR", NULL, &op) != DUET_OK) return 1;
    int perr =
        opt_add(op, "MTP under EP", specs, (int)(sizeof specs / sizeof specs[0])) != DUET_OK ||
        par_options_add(op, &po) != DUET_OK || opt_parse(op, argc, argv) != DUET_OK;
    opt_parser_destroy(op);
    if (perr || !model) {
        fprintf(stderr, "mtp-ep: --model DIR is required\n");
        return 2;
    }
    po.spec_tokens = k;
    par_instance *inst;
    if (par_instance_create(&po, model, &argc, &argv, &inst) != DUET_OK) return 1;
    /* every rank takes part in creating it; only the TP leaders use it */
    comm_group *leaders = NULL;
    if (comm_group_create("leaders", par_tp_rank(inst) == 0 ? 0 : 1, par_world(inst)->rank,
                          &leaders) != DUET_OK) {
        par_instance_destroy(inst);
        return 1;
    }
    int rc;
    if (par_tp_rank(inst) == 0) {
        rc = lead(inst, leaders, k, sampled, busy == 0 || par_dp_rank(inst) == 0, oracle);
    } else {
        be_kv *kv = NULL;
        int nb = N_BLOCKS;
        rc = 1;
        if (par_kv_agree(inst, &nb, BLOCK_SIZE) == DUET_OK &&
            mdl_kv_create(par_model(inst), nb, BLOCK_SIZE, &kv) == DUET_OK) {
            rc = par_follow(inst, kv) == DUET_OK ? 0 : 1;
            par_print_ordered(inst, "");
        }
        mdl_kv_destroy(par_model(inst), kv);
    }
    comm_group_destroy(leaders);
    par_instance_destroy(inst);
    return rc;
}
