/* MTP through 1P1D: a prefill engine and a decode engine of one process, each with its
 * transfer plug-in (side channel on localhost, UCX), both loaded with the MTP module. The
 * decode side pulls the prompt's KV (the module's layer travels in the same blocks), computes
 * the last prompt token and drafts from there: its greedy output with k = 1..3 drafts equals
 * the output without drafts, with the module's drafts and with steered ones (mostly right);
 * both pools end full, no lease is left. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/log.h"
#include "base/opt.h"
#include "check.h"
#include "kv_lease.h"
#include "kv_pull.h"
#include "mkmodel.h"
#include "pd_side.h"
#include "testmodel.h"
#include "testutil.h"

#define VOCAB 512
#define NREQ  6

typedef struct rec {
    int32_t out[64];
    int n_out, n_final;
    eng_finish finish;
    char error[400];
    const int32_t *ref; /* steered drafts from this answer, or NULL */
    int n_ref;
} rec;

static rec R[64];
static char g_dir[4200];
static int g_port;

static void on_event(void *user, const eng_event *ev) {
    (void)user;
    rec *r = &R[ev->id];
    for (int i = 0; i < ev->n_tokens && r->n_out < 64; i++) r->out[r->n_out++] = ev->tokens[i];
    if (ev->finish) {
        r->n_final++;
        r->finish = ev->finish;
        if (ev->error) snprintf(r->error, sizeof r->error, "%s", ev->error);
    }
}

static void on_draft(void *user, int n_output, int32_t *draft, int n_draft) {
    rec *r = user;
    for (int j = 0; r->ref && j < n_draft; j++) {
        int idx = n_output + j;
        int32_t right = idx < r->n_ref ? r->ref[idx] : 0;
        draft[j] = (idx * 7 + j * 3) % 5 ? right : (right + 1) % VOCAB; /* one in five wrong */
    }
}

static int make_side(pd_side *s, srv_role role, int k) {
    par_options po;
    par_options_init(&po);
    po.spec_tokens = MDL_MAX_DRAFT;
    char *args[3] = {"x", "--kv-secret", "s3cret"};
    eng_config c;
    eng_config_default(&c);
    c.block_size = 16;
    c.n_blocks = 64;
    c.max_model_len = 256;
    c.on_event = on_event;
    c.spec_tokens = k;
    return pd_side_start(s, role, g_dir, &po, "test_spec_pd", 3, args, &c, g_port);
}

static void step(pd_side *s) {
    bool busy;
    CHECK(eng_step(s->eng, &busy) == DUET_OK);
    if (!busy) eng_wait(s->eng, 2);
}

/* Prefill (lease) then the decode request pulling it; the decode record. */
static rec *pd_request(pd_side *p, pd_side *d, int id, const int32_t *prompt, int n_prompt,
                       int max_tokens, const rec *steer) {
    memset(&R[id], 0, sizeof R[id]);
    memset(&R[id + 32], 0, sizeof R[id + 32]);
    eng_request q = {.id = (uint64_t)id, .prompt = prompt, .n_prompt = n_prompt};
    eng_sampling_default(&q.sampling);
    q.sampling.smp.temperature = 0;
    q.sampling.max_tokens = 1;
    q.sampling.ignore_eos = true;
    q.kv_role = ENG_KV_LEASE;
    char err[256];
    CHECK_MSG(eng_submit(p->eng, &q, err, sizeof err) == DUET_OK, "%s", err);
    for (int i = 0; i < 500 && !R[id].n_final; i++) step(p);
    CHECK(R[id].n_final == 1);
    srv_kv_params *remote = calloc(1, sizeof *remote);
    CHECK(remote && p->plug.lease(p->plug.state, (uint64_t)id, "req", remote) == DUET_OK);
    remote->lease = (uint64_t)id;
    rec *r = &R[id + 32];
    if (steer) {
        r->ref = steer->out;
        r->n_ref = steer->n_out;
    }
    eng_request dq = {.id = (uint64_t)id + 32, .prompt = prompt, .n_prompt = n_prompt};
    eng_sampling_default(&dq.sampling);
    dq.sampling.smp.temperature = 0;
    dq.sampling.max_tokens = max_tokens;
    dq.sampling.ignore_eos = true;
    dq.kv_role = ENG_KV_REMOTE;
    dq.remote = remote;
    dq.user = r;
    dq.on_draft = on_draft;
    CHECK(eng_submit(d->eng, &dq, err, sizeof err) == DUET_OK);
    for (int i = 0; i < 5000 && !r->n_final; i++) {
        step(d);
        step(p);
    }
    for (int i = 0; i < 20; i++) step(p); /* lets the release reach the prefill engine */
    free(remote);
    return r;
}

int main(void) {
    char *root = tu_mkdtemp("spec-pd");
    if (!root) return 1;
    snprintf(g_dir, sizeof g_dir, "%s/mtp", root);
    log_set_level(LOG_LEVEL_WARN);
    mk_spec s;
    mk_preset("tiny", &s);
    s.cfg.vocab_size = VOCAB;
    s.cfg.n_routed_experts = 8;
    s.cfg.moe_intermediate_size = 64;
    s.cfg.num_nextn_predict_layers = 1;
    s.seed = 13;
    mk_spec_fit(&s);
    if (mk_write(&s, g_dir) != DUET_OK) return 1;

    int32_t prompts[NREQ][48];
    int lens[NREQ];
    for (int i = 0; i < NREQ; i++) {
        lens[i] = 5 + i * 7; /* up to 40 tokens: several blocks of 16 */
        tm_prompt(prompts[i], lens[i], VOCAB, 300u + (uint32_t)i);
    }
    static rec ref[NREQ];
    eng_stats dst = {0};
    for (int k = 0; k <= MDL_MAX_DRAFT; k++) {
        for (int steer = 0; steer < (k ? 2 : 1); steer++) {
            pd_side p, d;
            g_port = pd_free_port();
            if (make_side(&p, SRV_ROLE_PREFILL, k) != 0 || make_side(&d, SRV_ROLE_DECODE, k) != 0)
                return 1;
            eng_stats p0, d0;
            eng_get_stats(p.eng, &p0);
            eng_get_stats(d.eng, &d0);
            for (int i = 0; i < NREQ; i++) {
                rec *r = pd_request(&p, &d, i, prompts[i], lens[i], 12 + i, steer ? &ref[i] : NULL);
                CHECK_MSG(r->n_final == 1 && r->finish == ENG_FINISH_LENGTH, "k=%d %d: %d %s", k, i,
                          r->finish, r->error);
                if (k == 0) {
                    ref[i] = *r;
                    continue;
                }
                CHECK_MSG(r->n_out == ref[i].n_out &&
                              !memcmp(r->out, ref[i].out, sizeof(int32_t) * r->n_out),
                          "k=%d%s request %d: the decode side's output differs from k=0's", k,
                          steer ? " (steered)" : "", i);
            }
            eng_stats pe, de;
            eng_get_stats(p.eng, &pe);
            eng_get_stats(d.eng, &de);
            CHECK(pe.n_leased == 0 && pe.n_free_blocks == p0.n_free_blocks &&
                  de.n_free_blocks == d0.n_free_blocks);
            if (k > 0) CHECK_MSG(de.spec_drafts > 0, "k=%d: the decode side drafted nothing", k);
            if (steer) {
                CHECK_MSG(de.spec_accepted > 0 && de.spec_accepted < de.spec_draft_tokens,
                          "k=%d: %llu of %llu steered drafts accepted", k,
                          (unsigned long long)de.spec_accepted,
                          (unsigned long long)de.spec_draft_tokens);
                dst = de;
            }
            pd_side_stop(&p);
            pd_side_stop(&d);
        }
    }
    printf("k=3 steered: %llu of %llu drafts accepted on the decode side\n",
           (unsigned long long)dst.spec_accepted, (unsigned long long)dst.spec_draft_tokens);
    tu_rmtree(root);
    free(root);
    CHECK_DONE();
}
