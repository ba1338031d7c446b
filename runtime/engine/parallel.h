/* An instance rank: MPI bootstrap, the DP x TP grid (and EP across all of it), this rank's
 * backend and model shard, and the lockstep rule that keeps expert-parallel DP groups in step.
 * Used by every program that runs the model (duet-check, duet-run, duet-prefill, duet-decode).
 * Rank r of an instance of dp * tp ranks is DP rank r / tp, TP rank r % tp. */
#ifndef DUET_PARALLEL_H
#define DUET_PARALLEL_H

#include <stdbool.h>
#include <stdio.h>

#include "base/opt.h"
#include "dist/comm.h"
#include "model/memplan.h"
#include "model/model.h"

/* The memory plan checked before loading (model/memplan.h). Set by the program from its own
 * flags; par_options_add adds none of these. utilization 0 and no print_plan: nothing planned
 * (print_plan alone plans with 0.9, vLLM's default). */
typedef struct par_memory {
    double utilization;        /* --gpu-memory-utilization: share of each device, (0, 1] */
    long long kv_cache_memory; /* --kv-cache-memory: a fixed KV cache per rank; 0: none */
    int max_model_len, max_num_seqs, block_size; /* the worker's limits (max_tokens: batched) */
    bool print_plan; /* --print-memory-plan: the plan's table on stdout (world rank 0) */
    /* bytes of one device instead of the backend's reading (tests, and backends that report
     * none); no device readings are taken then */
    long long device_memory;
} par_memory;

typedef struct par_options {
    char backend[16]; /* "cpu" or "cuda" */
    dt_dtype dtype;   /* --dtype: DT_COUNT (auto: the backend's default), DT_BF16 or DT_F32 */
    /* --kv-cache-dtype: DT_COUNT (auto: the activation type) or DT_F8_E4M3 (fp8, fp8_e4m3) */
    dt_dtype kv_dtype;
    int tp, dp; /* --tensor-parallel-size, --data-parallel-size */
    bool ep;    /* --enable-expert-parallel */
    bool eager; /* --enforce-eager: no recorded (CUDA graph) steps */
    mdl_weights_source load_format;
    unsigned long long seed;
    int max_tokens;
    /* MTP drafts per step (--speculative-config's num_speculative_tokens, 0: off); the model
     * loads its MTP module. Under lockstep every lockstepped forward is followed by one round
     * of MTP passes that every DP group joins (par_draft, or empty passes; see par_draft). */
    int spec_tokens;
    par_memory mem;
} par_options;

void par_options_init(par_options *o);
/* Adds the parallel and device options (--backend, --dtype, --kv-cache-dtype, -tp, -dp,
 * --enable-expert-parallel, --load-format, --seed) to p, writing into o (which must outlive p's
 * parse). */
duet_status par_options_add(opt_parser *p, par_options *o);

typedef struct par_instance par_instance;

/* Starts MPI (when under mpirun), checks the world matches dp * tp, creates the groups, the
 * backend on this rank's device and loads the model shard from model_dir. With o->mem set, the
 * memory plan of the layout is computed first, against the smallest device of the instance,
 * and a layout that does not fit is refused before any weight loads (DUET_ERR_NO_MEMORY, one
 * line saying what does not fit by how much). */
duet_status par_instance_create(const par_options *o, const char *model_dir, int *argc,
                                char ***argv, par_instance **inst_p);
void par_instance_destroy(par_instance *inst);

mdl_model *par_model(par_instance *inst);
const comm_world *par_world(const par_instance *inst);
int par_dp_rank(const par_instance *inst);
int par_dp_size(const par_instance *inst);
int par_tp_rank(const par_instance *inst);
int par_tp_size(const par_instance *inst);
comm_group *par_tp_group(par_instance *inst);
/* True on the one rank per DP group that reports results (TP rank 0). */
bool par_is_reporter(const par_instance *inst);
/* True when DP groups must step together (EP spans more than one DP group). */
bool par_lockstep(const par_instance *inst);

/* This rank's KV cache in bytes from its device's readings before and after loading
 * (mplan_kv_after_load): what o->mem.utilization of the device leaves after loading and after
 * what the first steps will allocate. DUET_ERR_UNSUPPORTED when there are no readings (the
 * CPU backend, no plan asked for, or o->mem.device_memory given): the caller keeps its own
 * default. All ranks: DUET_ERR_NO_MEMORY on every rank when one sequence of max_model_len does
 * not fit on some rank (or its start-up reading refuses), logged once by the first such rank. */
duet_status par_kv_budget(par_instance *inst, long long *bytes_p);

/* All ranks, before a fixed KV cache (--kv-cache-memory) of bytes per rank is allocated: the
 * check the automatic path makes, applied to the size asked. With the plan's device readings,
 * what mplan_kv_after_load allows (the instance's share of the device and its free memory after
 * loading); with o->mem.device_memory instead of readings, what the plan leaves of that size
 * after weights and activations; on a device without readings or plan, its free memory;
 * on the CPU backend, the host's available memory (MemAvailable, lowered to what the cgroup's
 * limit leaves) shared by this host's ranks. DUET_ERR_NO_MEMORY when it does not fit on some
 * rank: every rank returns it, and the first such rank logs one line naming --kv-cache-memory
 * (or flag, as mplan_inputs.kv_flag: "--num-gpu-blocks-override N"), the size asked and what
 * is free. */
duet_status par_kv_fixed_check(par_instance *inst, long long bytes, const char *flag);

/* The memory plan par_instance_create computed, or NULL when none was asked for (or the
 * backend has no device memory to plan against); and the device's readings before and after
 * loading (false when there are none: the CPU backend, or a given device size). */
const mplan *par_memory_plan(const par_instance *inst);
bool par_memory_readings(const par_instance *inst, mplan_measured *readings_p);

/* One forward step (mdl_forward; logits NULL leaves them in backend memory for mdl_sample_queue,
 * which followers' steps always do). Under lockstep it first agrees with the other DP groups
 * that a step happens, so idle groups join with empty steps (see par_idle_step). */
duet_status par_forward(par_instance *inst, be_kv *kv, const mdl_seq *seqs, int n_seqs,
                        float *logits);
/* Under lockstep: joins the other DP groups' steps with empty ones while any group still has
 * work; returns once every group is idle. Without lockstep: returns at once. For programs whose
 * every rank runs its own forwards (duet-check golden) and calls this once its work is done:
 * the first round in which no rank has work ends it everywhere. Not for a TP leader whose
 * followers run par_follow (they do not join its rounds) nor for an engine that can go idle
 * between requests (that round would end the other groups early); those vote among the TP
 * leaders after every step instead, as the servers and duet-run do. */
duet_status par_finish(par_instance *inst);
/* One round of the lockstep agreement for a rank without work: *stepped_p tells whether an
 * empty step was run (another group had work). */
duet_status par_idle_step(par_instance *inst, be_kv *kv, bool *stepped_p);

/* ---- engine steps across the TP group ----
 * The TP leader (TP rank 0) schedules; each step's plan (the sequences of mdl_seq) is
 * broadcast to the followers, which run the same forward. */

/* All ranks of the TP group: agree on the KV pool's size (the smallest any rank proposes) so
 * block ids mean the same everywhere. */
duet_status par_kv_agree(par_instance *inst, int *n_blocks, int block_size);
/* Leader: one step (broadcast plan, then par_forward). */
duet_status par_step(par_instance *inst, be_kv *kv, const mdl_seq *seqs, int n_seqs, float *logits);
/* Leader with nothing to run: a heartbeat to the followers, and under lockstep one round of
 * agreement (joining another DP group's step with an empty one if needed). */
/* TP leader, after par_step: the MTP module's work of the step (mdl_draft), broadcast to the
 * TP followers first, which run it too; drafts as mdl_draft gives them (on every rank). Under
 * lockstep with MTP loaded, each forward owes the other DP groups one round of MTP passes, so
 * every EP rank runs the same number of passes (mdl_draft_joined): after a step this call pays
 * it (n_seqs may be 0: call it after every step, as spec_batch_run does); an empty step
 * (par_idle_step) pays it at once with empty passes; a step not followed by par_draft pays it
 * before the next agreement (a caller that runs other collectives between steps must not
 * rely on that). */
duet_status par_draft(par_instance *inst, be_kv *kv, const mdl_draft_seq *seqs, int n_seqs,
                      int32_t *drafts);
duet_status par_idle(par_instance *inst, be_kv *kv, bool *stepped_p);
/* Leader: copies the contents of blocks[0..n) of its KV cache to the same blocks of every TP
 * follower (KV that arrived from a remote prefill lands on the leader only). */
duet_status par_kv_replicate(par_instance *inst, be_kv *kv, const int32_t *blocks, int n);
/* Leader: tells the followers to return from par_follow. */
duet_status par_stop_followers(par_instance *inst);
/* Follower: runs the leader's plans until it stops them. */
duet_status par_follow(par_instance *inst, be_kv *kv);

/* Prints every rank's text (up to 16 KiB each) on world rank 0, in rank order, so reports of
 * several DP groups come out whole and before any final line. */
void par_print_ordered(par_instance *inst, const char *text);

/* Sums pass/fail counters of the reporters over the instance, in place, on every rank. */
void par_report_totals(par_instance *inst, int *passed, int *failed);

#endif
