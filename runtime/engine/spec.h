/* MTP speculative decoding for the engine: the drafts each request carries between steps, the
 * acceptance rule (greedy: exact match against the target model's own choices) and the batch
 * of MTP work after a step (mdl_draft), with vLLM's counters. The engine keeps the requests,
 * the blocks and the sampling; this module only decides how many drafts a request verifies
 * and which of them stand. Engine thread only. */
#ifndef DUET_SPEC_H
#define DUET_SPEC_H

#include <stdbool.h>
#include <stdint.h>

#include "engine/parallel.h"
#include "model/model.h"
#include "base/status.h"

/* A request's drafts for its next verify step. */
typedef struct spec_req {
    int32_t draft[MDL_MAX_DRAFT];
    int n_draft;
} spec_req;

/* vLLM's spec_decode counters (cumulative). */
typedef struct spec_stats {
    uint64_t n_drafts;       /* verify steps that carried drafts */
    uint64_t n_draft_tokens; /* drafts verified */
    uint64_t n_accepted;     /* drafts accepted */
    uint64_t accepted_per_pos[MDL_MAX_DRAFT];
} spec_stats;

typedef struct spec_engine spec_engine;

/* k drafts per step (1 up to the model's mdl_spec_tokens) for up to max_seqs requests a step,
 * run through inst (TP followers take part). inst is borrowed. */
duet_status spec_create(par_instance *inst, int max_seqs, int k, spec_engine **s_p);
void spec_destroy(spec_engine *s);
int spec_k(const spec_engine *s);

/* How many of n_draft drafts stand against the target's tokens target[0..n_draft] (row j is
 * the target's choice after draft j - 1): the longest prefix with draft[j] == target[j]. */
int spec_accept(const int32_t *draft, int n_draft, const int32_t *target);
/* Counts one verify of n_draft drafts of which n_accepted stood. */
void spec_count(spec_engine *s, int n_draft, int n_accepted);
const spec_stats *spec_get_stats(const spec_engine *s);

/* The MTP work after a step, one request at a time (see mdl_draft_seq for the fields), then
 * run: each added request's drafts (n_draft of them, 0 for KV only) land in its spec_req. Run
 * after every step: under DP lockstep it joins the other groups' MTP passes even when this
 * group has nothing to draft (par_draft). */
void spec_batch_begin(spec_engine *s);
void spec_batch_add(spec_engine *s, spec_req *q, const mdl_draft_seq *seq);
duet_status spec_batch_run(spec_engine *s, be_kv *kv);

#endif
