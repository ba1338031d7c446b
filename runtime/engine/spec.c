/* MTP speculative decoding's bookkeeping for the engine; see spec.h. The model computes
 * (mdl_draft); this file batches the requests' MTP work and keeps the counters. */
#include "engine/spec.h"

#include <stdlib.h>
#include <string.h>

struct spec_engine {
    par_instance *inst;
    int k, cap, n;
    mdl_draft_seq *seqs; /* [cap] */
    spec_req **owner;    /* [cap] */
    int32_t *drafts;     /* [cap, MDL_MAX_DRAFT] */
    spec_stats stats;
};

duet_status spec_create(par_instance *inst, int max_seqs, int k, spec_engine **s_p) {
    if (k < 1 || k > mdl_spec_tokens(par_model(inst)) || max_seqs < 1) return DUET_ERR_INVALID;
    spec_engine *s = calloc(1, sizeof *s);
    if (!s) return DUET_ERR_NO_MEMORY;
    s->inst = inst;
    s->k = k;
    s->cap = max_seqs;
    s->seqs = calloc((size_t)max_seqs, sizeof *s->seqs);
    s->owner = calloc((size_t)max_seqs, sizeof *s->owner);
    s->drafts = calloc((size_t)max_seqs * MDL_MAX_DRAFT, sizeof *s->drafts);
    if (!s->seqs || !s->owner || !s->drafts) {
        spec_destroy(s);
        return DUET_ERR_NO_MEMORY;
    }
    *s_p = s;
    return DUET_OK;
}

void spec_destroy(spec_engine *s) {
    if (!s) return;
    free(s->seqs);
    free(s->owner);
    free(s->drafts);
    free(s);
}

int spec_k(const spec_engine *s) {
    return s->k;
}

int spec_accept(const int32_t *draft, int n_draft, const int32_t *target) {
    int a = 0;
    while (a < n_draft && draft[a] == target[a]) a++;
    return a;
}

void spec_count(spec_engine *s, int n_draft, int n_accepted) {
    if (n_draft <= 0) return;
    s->stats.n_drafts++;
    s->stats.n_draft_tokens += (uint64_t)n_draft;
    s->stats.n_accepted += (uint64_t)n_accepted;
    for (int j = 0; j < n_accepted && j < MDL_MAX_DRAFT; j++) s->stats.accepted_per_pos[j]++;
}

const spec_stats *spec_get_stats(const spec_engine *s) {
    return &s->stats;
}

void spec_batch_begin(spec_engine *s) {
    s->n = 0;
}

void spec_batch_add(spec_engine *s, spec_req *q, const mdl_draft_seq *seq) {
    q->n_draft = 0;
    if (s->n >= s->cap || seq->n_tokens < 1) return; /* no MTP work: no drafts */
    s->seqs[s->n] = *seq;
    if (s->seqs[s->n].n_draft > s->k) s->seqs[s->n].n_draft = s->k;
    s->owner[s->n++] = q;
}

duet_status spec_batch_run(spec_engine *s, be_kv *kv) {
    /* under DP lockstep the round of MTP passes is joined even with nothing to draft: the
     * other groups' passes need this group's ranks in their all-to-alls */
    if (s->n == 0 && !par_lockstep(s->inst)) return DUET_OK;
    duet_status st = par_draft(s->inst, kv, s->seqs, s->n, s->drafts);
    for (int i = 0; i < s->n; i++) {
        spec_req *q = s->owner[i];
        q->n_draft = st == DUET_OK ? s->seqs[i].n_draft : 0;
        memcpy(q->draft, s->drafts + (size_t)i * MDL_MAX_DRAFT, sizeof q->draft);
    }
    s->n = 0;
    return st;
}
