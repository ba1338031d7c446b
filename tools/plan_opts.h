/* The serving limits the memory plan takes, as the workers spell them (--max-num-seqs,
 * --max-num-batched-tokens, --block-size, with their defaults and ranges), for the programs that
 * take them beside the plan: `duet-check plan` (tools/check_plan.c) and the device check
 * (tests/gpu/memplan_check.c). Header-only; each returns one entry of an opt_spec array. */
#ifndef DUET_TOOLS_PLAN_OPTS_H
#define DUET_TOOLS_PLAN_OPTS_H

#include "base/opt.h"

static inline opt_spec plan_spec_max_num_seqs(int *dest) {
    return (opt_spec){.name = "--max-num-seqs",
                      .type = OPT_INT,
                      .dest = dest,
                      .def = "256",
                      .min = 1,
                      .max = 1 << 16,
                      .help = "sequences per step"};
}

static inline opt_spec plan_spec_max_num_batched_tokens(int *dest) {
    return (opt_spec){.name = "--max-num-batched-tokens",
                      .type = OPT_INT,
                      .dest = dest,
                      .def = "2048",
                      .min = 1,
                      .max = 1 << 24,
                      .help = "tokens per step"};
}

static inline opt_spec plan_spec_block_size(int *dest) {
    return (opt_spec){.name = "--block-size",
                      .type = OPT_INT,
                      .dest = dest,
                      .def = "64",
                      .min = 1,
                      .max = 1 << 16,
                      .help = "tokens per KV block"};
}

#endif
