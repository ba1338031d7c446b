/* Instance bootstrap and DP lockstep; see parallel.h. */
#include "model/backends/registry.h"
#include "engine/parallel.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"

struct par_instance {
    par_options opt;
    comm_world world;
    int dp_rank, tp_rank;
    comm_group *tp, *ep, *world_group;
    be_backend *be;
    mdl_model *model;
    bool lockstep;
    /* under lockstep with MTP: a forward ran and its round of MTP passes (par_draft, or
     * draft_settle with none of this rank's own) is still owed to the other DP groups */
    bool draft_owed;
    void *plan; /* TP plan buffer */
    size_t plan_cap;
    mplan mem;              /* the memory plan, when o->mem asked for one */
    bool planned, measured; /* mem holds a plan; readings holds the device's */
    mplan_measured readings;
};

void par_options_init(par_options *o) {
    memset(o, 0, sizeof *o);
    o->max_tokens = 2048;
    /* the defaults are the option table's (par_options_add): parse an empty command line */
    opt_parser *p;
    char *argv[] = {(char *)"duet", NULL};
    if (opt_parser_create("duet", NULL, NULL, &p) != DUET_OK) return;
    if (par_options_add(p, o) == DUET_OK) (void)opt_parse(p, 1, argv);
    opt_parser_destroy(p);
}

static duet_status parse_backend(const opt_spec *s, const char *v, char *err, size_t len) {
    if (strcmp(v, "cpu") != 0 && strcmp(v, "cuda") != 0) {
        snprintf(err, len, "expected cpu or cuda, got '%s'", v);
        return DUET_ERR_INVALID;
    }
    par_options *o = s->user;
    snprintf(o->backend, sizeof o->backend, "%s", v);
    return DUET_OK;
}

static duet_status parse_dtype(const opt_spec *s, const char *v, char *err, size_t len) {
    par_options *o = s->user;
    if (!strcmp(v, "auto"))
        o->dtype = DT_COUNT;
    else if (!strcmp(v, "bfloat16") || !strcmp(v, "bf16"))
        o->dtype = DT_BF16;
    else if (!strcmp(v, "float32") || !strcmp(v, "float") || !strcmp(v, "f32"))
        o->dtype = DT_F32;
    else if (!strcmp(v, "float16") || !strcmp(v, "half") || !strcmp(v, "fp16")) {
        /* vLLM users ask for 16 bits (older GPUs, AWQ checkpoints); DeepSeek's weights and
         * activations overflow float16's range, so duet runs the backend's own default */
        o->dtype = DT_COUNT;
        LOG_INFO("--dtype %s: duet has no float16 path; running the backend's default "
                 "(bfloat16 on cuda, float32 on cpu)",
                 v);
    } else {
        snprintf(err, len, "expected auto, bfloat16, float16 or float32, got '%s'", v);
        return DUET_ERR_INVALID;
    }
    return DUET_OK;
}

static duet_status parse_kv_dtype(const opt_spec *s, const char *v, char *err, size_t len) {
    par_options *o = s->user;
    if (!strcmp(v, "auto"))
        o->kv_dtype = DT_COUNT;
    else if (!strcmp(v, "fp8") || !strcmp(v, "fp8_e4m3"))
        o->kv_dtype = DT_F8_E4M3;
    else {
        /* vLLM's fp8_e5m2 and fp8_inc have no kernels here: refused, not read as e4m3 */
        snprintf(err, len, "expected auto, fp8 or fp8_e4m3, got '%s'", v);
        return DUET_ERR_INVALID;
    }
    return DUET_OK;
}

static duet_status parse_load_format(const opt_spec *s, const char *v, char *err, size_t len) {
    par_options *o = s->user;
    if (!strcmp(v, "dummy"))
        o->load_format = MDL_WEIGHTS_DUMMY;
    else if (!strcmp(v, "auto") || !strcmp(v, "safetensors"))
        o->load_format = MDL_WEIGHTS_CHECKPOINT;
    else {
        snprintf(err, len, "expected auto, safetensors or dummy, got '%s'", v);
        return DUET_ERR_INVALID;
    }
    return DUET_OK;
}

static duet_status parse_seed(const opt_spec *s, const char *v, char *err, size_t len) {
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 10);
    if (!*v || *end || errno || v[0] == '-') {
        snprintf(err, len, "expected a non-negative integer, got '%s'", v);
        return DUET_ERR_INVALID;
    }
    ((par_options *)s->user)->seed = x;
    return DUET_OK;
}

duet_status par_options_add(opt_parser *p, par_options *o) {
    const opt_spec specs[] = {
        {.name = "--backend",
         .type = OPT_CUSTOM,
         .parse = parse_backend,
         .user = o,
         .dest = o,
         .metavar = "{cpu,cuda}",
         .def = "cpu",
         .help = "device backend"},
        {.name = "--dtype",
         .type = OPT_CUSTOM,
         .parse = parse_dtype,
         .user = o,
         .dest = o,
         .metavar = "{auto,bfloat16,float16,float32}",
         .def = "auto",
         .help =
             "weights and activations (auto: float32 on cpu, bfloat16 on cuda; bfloat16 on "
             "cpu emulates CUDA's bf16 storage in float32 arithmetic; float16 is read as auto)"},
        {.name = "--kv-cache-dtype",
         .type = OPT_CUSTOM,
         .parse = parse_kv_dtype,
         .user = o,
         .dest = o,
         .metavar = "{auto,fp8,fp8_e4m3}",
         .def = "auto",
         .help = "the KV cache's element type (auto: the activation type; fp8: e4m3 with a "
                 "per-tensor scale of 1.0, half of bf16's bytes)"},
        {.name = "--tensor-parallel-size",
         .alias = "-tp",
         .type = OPT_INT,
         .dest = &o->tp,
         .def = "1",
         .min = 1,
         .max = 4096,
         .help = "ranks sharing each layer"},
        {.name = "--data-parallel-size",
         .alias = "-dp",
         .type = OPT_INT,
         .dest = &o->dp,
         .def = "1",
         .min = 1,
         .max = 4096,
         .help = "independent replicas in the instance (an instance of dp * tp ranks is "
                 "started with mpirun -np dp*tp)"},
        {.name = "--enable-expert-parallel",
         .alias = "-ep",
         .type = OPT_FLAG,
         .dest = &o->ep,
         .help = "place routed experts across all ranks of the instance"},
        {.name = "--enforce-eager",
         .type = OPT_FLAG,
         .dest = &o->eager,
         .help = "run every step op by op (no CUDA graphs), as vLLM's flag does"},
        {.name = "--load-format",
         .type = OPT_CUSTOM,
         .parse = parse_load_format,
         .user = o,
         .dest = o,
         .metavar = "{auto,safetensors,dummy}",
         .def = "auto",
         .help = "dummy: random weights of the config's shapes"},
        {.name = "--seed",
         .type = OPT_CUSTOM,
         .parse = parse_seed,
         .user = o,
         .dest = o,
         .metavar = "N",
         .help = "seed of dummy weights; servers also draw unseeded requests' seeds from it "
                 "(vLLM's --seed)"},
    };
    return opt_add(p, "Parallelism and device", specs, (int)(sizeof specs / sizeof specs[0]));
}

/* The last component of a model directory, for messages. */
static void model_name(const char *dir, char *buf, size_t len) {
    size_t n = strlen(dir);
    while (n > 1 && dir[n - 1] == '/') n--;
    size_t s = n;
    while (s > 0 && dir[s - 1] != '/') s--;
    snprintf(buf, len, "%.*s", (int)(n - s), dir + s);
}

/* The memory plan of this layout, before anything loads. Every rank plans against the smallest
 * device of the instance, so all reach one verdict and fail together (world rank 0 says why);
 * a device another process holds part of fails on its own rank, which says so. Keeps the
 * device's free memory for par_kv_budget. */
static duet_status plan_memory(par_instance *p, const par_options *o, const char *model_dir) {
    const par_memory *mo = &o->mem;
    if (mo->utilization <= 0 && !mo->print_plan) return DUET_OK;
    bool rank0 = p->world.rank == 0;
    long long total = 0, free_b = 0;
    bool readings = mo->device_memory <= 0 && be_mem_info(p->be, &total, &free_b) == DUET_OK;
    if (mo->device_memory > 0) total = mo->device_memory;
    if (total <= 0) {
        /* the CPU backend: host memory, nothing to plan against (every rank alike) */
        if (rank0 && mo->print_plan)
            LOG_INFO("memory plan: the %s backend reports no device memory; nothing to plan",
                     p->be->ops->name);
        return DUET_OK;
    }
    long long smallest = -total;
    duet_status st = comm_allreduce_i64(p->world_group, &smallest, 1, true);
    if (st != DUET_OK) return st;
    cfg_model c;
    st = cfg_load(model_dir, &c);
    if (st != DUET_OK) return st;

    char name[128], err[512];
    model_name(model_dir, name, sizeof name);
    dt_dtype act = p->be->ops->act_dtype;
    mplan_inputs in;
    mplan_inputs_default(&in);
    in.model_name = name;
    in.tp = o->tp;
    in.dp = o->dp;
    in.ep = o->ep;
    in.gpus_per_node = p->world.local_size;
    in.gpu_memory = -smallest;
    in.gpu_memory_utilization = mo->utilization > 0 ? mo->utilization : 0.9;
    /* the FP8-resident loader changes what mplan_weight_format_auto answers, not this */
    in.weights = mplan_weight_format_auto(&c, act);
    in.act_dtype = act;
    in.kv_dtype = o->kv_dtype == DT_F8_E4M3 ? DT_F8_E4M3 : act; /* --kv-cache-dtype */
    in.kv_decoded_layer = p->be->ops->kv_fp8_decoded_layer;
    in.max_model_len = mo->max_model_len;
    if (mo->max_num_seqs > 0) in.max_num_seqs = mo->max_num_seqs;
    if (o->max_tokens > 0) in.max_num_batched_tokens = o->max_tokens;
    if (mo->block_size > 0) in.block_size = mo->block_size;
    in.graphs = !o->eager;
    in.kv_cache_memory = mo->kv_cache_memory;
    in.spec_tokens = o->spec_tokens; /* the MTP module, its KV layer, the verify step's rows */
    st = mplan_compute(&c, &in, &p->mem, err, sizeof err);
    if (st != DUET_OK) {
        if (rank0) LOG_ERROR("memory plan: %s", err);
        return st;
    }
    if (rank0 && mo->print_plan) {
        mplan_print(&p->mem, stdout);
        fflush(stdout);
    }
    p->readings = (mplan_measured){.total = total, .free_at_start = free_b};
    if (readings) {
        /* what the instance holds itself: a neighbour loading beside it must not count */
        size_t own = 0, ctx = 0;
        p->readings.counted =
            p->be->ops->mem_used && p->be->ops->mem_used(p->be, &own, &ctx) == DUET_OK;
        p->readings.own_at_start = (long long)own;
        p->readings.context = (long long)ctx;
    }
    bool ok = p->mem.fits;
    if (ok && readings && mplan_check_start(&p->mem, &p->readings, err, sizeof err) != DUET_OK) {
        LOG_ERROR("memory plan: %s", err);
        ok = false;
    }
    long long failed = ok ? 0 : 1;
    st = comm_allreduce_i64(p->world_group, &failed, 1, true);
    if (st != DUET_OK) return st;
    if (!p->mem.fits) {
        if (rank0)
            LOG_ERROR("memory plan: %s (duet-check plan shows the whole plan without a GPU)",
                      p->mem.verdict);
        return DUET_ERR_NO_MEMORY;
    }
    if (failed) return DUET_ERR_NO_MEMORY; /* the rank that failed said why */
    if (rank0) {
        char line[256];
        mplan_summary(&p->mem, line, sizeof line);
        LOG_INFO("memory plan: %s%s", line,
                 mo->print_plan ? "" : " (--print-memory-plan shows the table)");
    }
    p->planned = true;
    p->measured = readings;
    return DUET_OK;
}

const mplan *par_memory_plan(const par_instance *p) {
    return p->planned ? &p->mem : NULL;
}

bool par_memory_readings(const par_instance *p, mplan_measured *readings_p) {
    if (!p->planned || !p->measured) return false;
    *readings_p = p->readings;
    return true;
}

/* One verdict for the instance from each rank's st (all ranks): DUET_OK where every rank's
 * is, else DUET_ERR_NO_MEMORY on all of them, and one line: the lowest rank that does not fit
 * logs its err. */
static duet_status instance_verdict(par_instance *p, duet_status st, const char *err) {
    long long first = st == DUET_OK ? 0 : p->world.size - p->world.rank;
    if (p->world.size > 1) {
        duet_status cst = comm_allreduce_i64(p->world_group, &first, 1, true);
        if (cst != DUET_OK) return cst;
    }
    if (!first) return DUET_OK;
    if (p->world.size - first == p->world.rank) LOG_ERROR("memory plan: %s", err);
    return DUET_ERR_NO_MEMORY;
}

duet_status par_kv_budget(par_instance *p, long long *bytes_p) {
    if (!p->planned || !p->measured) return DUET_ERR_UNSUPPORTED;
    char err[512];
    long long kv = 0;
    duet_status st = mplan_kv_after_load(&p->mem, &p->readings, &kv, err, sizeof err);
    /* a rank that fits must not go on to the KV agreement while another ends (it would wait
     * there for its deadline) */
    st = instance_verdict(p, st, err);
    if (st != DUET_OK) return st;
    if (err[0]) LOG_WARN("memory plan: %s", err); /* a neighbour holds more than its share */
    const mplan_measured *m = &p->readings;
    const double gib = (double)(1LL << 30);
    if (m->counted)
        LOG_INFO("memory plan: this rank holds %.2f GiB after loading (its own allocations; "
                 "context read as %.2f GiB, at most %.2f taken), the device has %.2f GiB free: "
                 "%.2f GiB of KV cache",
                 (double)m->own_after_load / gib, (double)m->context / gib,
                 (double)MPLAN_CONTEXT_MAX / gib, (double)m->free_after_load / gib,
                 (double)kv / gib);
    *bytes_p = kv;
    return DUET_OK;
}

/* One number from a file of "name value" lines (/proc/meminfo: kB, "MemAvailable:";
 * memory.stat: bytes, "inactive_file"), times mul. */
static bool read_keyed(const char *path, const char *key, long long mul, long long *v_p) {
    FILE *f = fopen(path, "r");
    if (!f) return false;
    char line[256];
    size_t kl = strlen(key);
    bool found = false;
    while (!found && fgets(line, sizeof line, f)) {
        long long v;
        if (!strncmp(line, key, kl) && (line[kl] == ' ' || line[kl] == '\t') &&
            sscanf(line + kl, "%lld", &v) == 1 && v >= 0) {
            *v_p = v * mul;
            found = true;
        }
    }
    fclose(f);
    return found;
}

/* One number alone in a file (cgroup limits and usage); false for "max" (no limit). */
static bool read_number(const char *path, long long *v_p) {
    FILE *f = fopen(path, "r");
    if (!f) return false;
    long long v;
    bool ok = fscanf(f, "%lld", &v) == 1 && v >= 0;
    fclose(f);
    if (ok) *v_p = v;
    return ok;
}

/* The host memory this process may still take: MemAvailable, or less where the cgroup's limit
 * leaves less (limit - usage + inactive file cache, which the kernel reclaims first; v2, then
 * v1). *what_p says which. */
static bool host_available(long long *bytes_p, const char **what_p) {
    long long avail;
    if (!read_keyed("/proc/meminfo", "MemAvailable:", 1024, &avail)) return false;
    *what_p = "available (MemAvailable)";
    static const char *const cg[2][4] = {
        {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
         "inactive_file"},
        {"/sys/fs/cgroup/memory/memory.limit_in_bytes",
         "/sys/fs/cgroup/memory/memory.usage_in_bytes", "/sys/fs/cgroup/memory/memory.stat",
         "total_inactive_file"}};
    for (int i = 0; i < 2; i++) {
        long long limit, usage, inactive = 0;
        if (!read_number(cg[i][0], &limit) || !read_number(cg[i][1], &usage)) continue;
        (void)read_keyed(cg[i][2], cg[i][3], 1, &inactive);
        long long left = limit - usage + (inactive < usage ? inactive : usage);
        if (left < 0) left = 0;
        if (left < avail) {
            avail = left;
            *what_p = "available (under its cgroup's memory limit)";
        }
        break;
    }
    *bytes_p = avail;
    return true;
}

duet_status par_kv_fixed_check(par_instance *p, long long bytes, const char *flag) {
    char err[512] = "";
    duet_status st = DUET_OK;
    long long total = 0, free_b = 0, avail = 0;
    const char *what = NULL;
    if (p->planned && p->measured) {
        mplan m = p->mem;
        m.in.kv_cache_memory = bytes;
        snprintf(m.in.kv_flag, sizeof m.in.kv_flag, "%s", flag ? flag : "");
        long long kv;
        st = mplan_kv_after_load(&m, &p->readings, &kv, err, sizeof err);
    } else if (p->planned) {
        /* a device size given instead of readings: what the plan leaves of it */
        const mplan *m = &p->mem;
        st = mplan_check_kv_fixed(
            bytes, 1, m->in.gpu_memory - m->w.total - m->act_total - m->kv_block_bytes,
            "the device", "left after the plan's weights and activations", flag, err, sizeof err);
    } else if (p->opt.mem.device_memory > 0) {
        /* a device size given but no plan asked for: nothing to hold it to */
    } else if (be_mem_info(p->be, &total, &free_b) == DUET_OK) {
        st = mplan_check_kv_fixed(bytes, 1, free_b, "the device", "free", flag, err, sizeof err);
    } else if (host_available(&avail, &what)) {
        /* host memory: every rank of the instance on this host allocates a cache of its own */
        st = mplan_check_kv_fixed(bytes, p->world.local_size, avail, "the host", what, flag, err,
                                  sizeof err);
    } else {
        LOG_WARN("memory plan: cannot read the host's available memory (/proc/meminfo); "
                 "the fixed KV cache size is taken unchecked");
    }
    return instance_verdict(p, st, err);
}

/* --kv-cache-dtype fp8 on a backend that cannot hold it fails before any weight loads: a one-
 * block cache of the type is asked for and freed (the backend's kv_create says why not). */
static duet_status kv_dtype_probe(be_backend *be) {
    be_kv *kv = NULL;
    duet_status st = be->ops->kv_create(be, 1, 1, 1, 16, DT_F8_E4M3, &kv);
    if (st != DUET_OK) {
        LOG_ERROR("--kv-cache-dtype fp8: the %s backend cannot hold an fp8 KV cache",
                  be->ops->name);
        return st;
    }
    be->ops->kv_destroy(be, kv);
    return DUET_OK;
}

duet_status par_instance_create(const par_options *o, const char *model_dir, int *argc,
                                char ***argv, par_instance **inst_p) {
    par_instance *p = calloc(1, sizeof *p);
    if (!p) return DUET_ERR_NO_MEMORY;
    p->opt = *o;
    duet_status st = comm_init(argc, argv, &p->world);
    if (st != DUET_OK) {
        free(p);
        return st;
    }
    char tag[48];
    if (p->world.size > 1) {
        snprintf(tag, sizeof tag, "r%d", p->world.rank);
        log_set_tag(tag);
    }
    int want = o->dp * o->tp;
    if (p->world.size != want) {
        if (p->world.rank == 0)
            LOG_ERROR("the instance has %d ranks but --data-parallel-size %d x "
                      "--tensor-parallel-size %d needs %d (start it with mpirun -np %d)",
                      p->world.size, o->dp, o->tp, want, want);
        par_instance_destroy(p);
        return DUET_ERR_INVALID;
    }
    p->dp_rank = p->world.rank / o->tp;
    p->tp_rank = p->world.rank % o->tp;
    mdl_shard shard = {.tp_rank = p->tp_rank, .tp_size = o->tp, .ep_rank = 0, .ep_size = 1};
    st = comm_group_create("tp", p->dp_rank, p->tp_rank, &p->tp);
    if (st == DUET_OK) st = comm_group_create("world", 0, p->world.rank, &p->world_group);
    if (st == DUET_OK && o->ep && want > 1) {
        st = comm_group_create("ep", 0, p->world.rank, &p->ep);
        shard.ep_rank = p->world.rank;
        shard.ep_size = want;
        p->lockstep = o->dp > 1;
    }
    shard.tp = p->tp;
    shard.ep = p->ep;
    if (st == DUET_OK) st = be_create_dtype(o->backend, p->world.local_rank, o->dtype, &p->be);
    if (st == DUET_OK && o->kv_dtype == DT_F8_E4M3) st = kv_dtype_probe(p->be);
    /* before NCCL's buffers and the weights: the plan's verdict, and the free memory that
     * par_kv_budget measures loading against */
    if (st == DUET_OK) st = plan_memory(p, o, model_dir);
    /* device memory: the TP and EP groups get the backend's device communicator (NCCL); every
     * rank attaches the same groups in the same order */
    if (st == DUET_OK && p->be->ops->comm_attach && comm_group_size(p->tp) > 1)
        st = p->be->ops->comm_attach(p->be, p->tp);
    if (st == DUET_OK && p->be->ops->comm_attach && p->ep && comm_group_size(p->ep) > 1)
        st = p->be->ops->comm_attach(p->be, p->ep);
    mdl_load_opts lo = {.source = o->load_format,
                        .dummy_seed = o->seed,
                        .max_tokens = o->max_tokens,
                        .eager = o->eager,
                        .spec_tokens = o->spec_tokens};
    if (st == DUET_OK) st = mdl_load(model_dir, p->be, &shard, &lo, &p->model);
    if (st == DUET_OK) st = mdl_set_kv_dtype(p->model, o->kv_dtype);
    if (st == DUET_OK && p->measured) {
        long long total;
        p->measured = be_mem_info(p->be, &total, &p->readings.free_after_load) == DUET_OK;
        size_t own = 0, ctx = 0;
        if (p->readings.counted && p->be->ops->mem_used(p->be, &own, &ctx) != DUET_OK)
            p->readings.counted = false;
        p->readings.own_after_load = (long long)own;
    }
    if (st != DUET_OK) {
        /* every rank fails the same way on a bad checkpoint; one stuck rank must not hang
         * the others, so the instance ends here. */
        par_instance_destroy(p);
        return st;
    }
    *inst_p = p;
    return DUET_OK;
}

void par_instance_destroy(par_instance *p) {
    if (!p) return;
    mdl_destroy(p->model);
    be_destroy(p->be);
    comm_group_destroy(p->tp);
    comm_group_destroy(p->ep);
    comm_group_destroy(p->world_group);
    free(p->plan);
    free(p);
    comm_finalize();
}

mdl_model *par_model(par_instance *p) {
    return p->model;
}

const comm_world *par_world(const par_instance *p) {
    return &p->world;
}

int par_dp_rank(const par_instance *p) {
    return p->dp_rank;
}

int par_dp_size(const par_instance *p) {
    return p->opt.dp;
}

int par_tp_rank(const par_instance *p) {
    return p->tp_rank;
}

int par_tp_size(const par_instance *p) {
    return p->opt.tp;
}

comm_group *par_tp_group(par_instance *p) {
    return p->tp;
}

bool par_is_reporter(const par_instance *p) {
    return p->tp_rank == 0;
}

bool par_lockstep(const par_instance *p) {
    return p->lockstep;
}

/* Every rank says whether it has work; the maximum decides whether a step runs. */
static duet_status agree(par_instance *p, int mine, int *any_p) {
    long long v = mine;
    duet_status st = comm_allreduce_i64(p->world_group, &v, 1, true);
    *any_p = (int)v;
    return st;
}

/* The MTP passes after a lockstepped forward: every rank says how many it runs (0: no drafts
 * here) and all run the most, those with fewer joining the MTP layer's all-to-alls empty.
 * Ranks without work of their own settle with seqs NULL. */
static duet_status draft_round(par_instance *p, be_kv *kv, const mdl_draft_seq *seqs, int n_seqs,
                               int32_t *drafts) {
    if (!p->lockstep) return mdl_draft(p->model, kv, seqs, n_seqs, drafts);
    p->draft_owed = false;
    int passes;
    duet_status st = agree(p, mdl_draft_passes(seqs, n_seqs), &passes);
    if (st != DUET_OK) return st;
    return mdl_draft_joined(p->model, kv, seqs, n_seqs, drafts, passes);
}

/* The owed MTP round of the last forward with no drafts of this rank's own: right after an
 * empty step, and before the next agreement for a caller that ran a step without par_draft. */
static duet_status draft_settle(par_instance *p) {
    if (!p->draft_owed) return DUET_OK;
    return draft_round(p, NULL, NULL, 0, NULL);
}

/* A lockstepped forward, after which every rank owes a round of MTP passes when MTP is on. */
static duet_status lockstep_forward(par_instance *p, be_kv *kv, const mdl_seq *seqs, int n_seqs,
                                    float *logits) {
    duet_status st = mdl_forward(p->model, kv, seqs, n_seqs, logits);
    p->draft_owed = st == DUET_OK && mdl_spec_tokens(p->model) > 0;
    return st;
}

duet_status par_forward(par_instance *p, be_kv *kv, const mdl_seq *seqs, int n_seqs,
                        float *logits) {
    if (!p->lockstep) return mdl_forward(p->model, kv, seqs, n_seqs, logits);
    int any;
    duet_status st = draft_settle(p);
    if (st == DUET_OK) st = agree(p, 1, &any);
    if (st != DUET_OK) return st;
    return lockstep_forward(p, kv, seqs, n_seqs, logits);
}

duet_status par_idle_step(par_instance *p, be_kv *kv, bool *stepped_p) {
    *stepped_p = false;
    if (!p->lockstep) return DUET_OK;
    int any;
    duet_status st = draft_settle(p);
    if (st == DUET_OK) st = agree(p, 0, &any);
    if (st != DUET_OK || !any) return st;
    *stepped_p = true;
    st = lockstep_forward(p, kv, NULL, 0, NULL);
    /* a group without work drafts nothing: its round of MTP passes follows at once, inside the
     * caller's step as the busy groups' par_draft is inside theirs (the server's loop runs
     * another collective between steps) */
    return st == DUET_OK ? draft_settle(p) : st;
}

duet_status par_finish(par_instance *p) {
    bool stepped = true;
    duet_status st = DUET_OK;
    while (st == DUET_OK && stepped) st = par_idle_step(p, NULL, &stepped);
    return st;
}

void par_report_totals(par_instance *p, int *passed, int *failed) {
    long long v[2] = {par_is_reporter(p) ? *passed : 0, par_is_reporter(p) ? *failed : 0};
    if (comm_allreduce_i64(p->world_group, v, 2, false) == DUET_OK) {
        *passed = (int)v[0];
        *failed = (int)v[1];
    }
}

/* ---- TP plans ---- */

enum { PLAN_IDLE = 0, PLAN_STEP = 1, PLAN_QUIT = 2, PLAN_KV_COPY = 3, PLAN_DRAFT = 4 };

/* Header broadcast first; the payload (seq records, tokens, block tables) follows when
 * n_seqs > 0. */
typedef struct plan_hdr {
    int32_t kind, n_seqs, n_tokens, n_table;
} plan_hdr;

typedef struct plan_seq {
    int32_t n_tokens, pos0, n_blocks, n_logits;
} plan_seq;

/* PLAN_DRAFT's records: an mdl_draft_seq without its pointers */
typedef struct plan_dseq {
    int32_t n_tokens, pos0, hid0, n_blocks, n_draft;
} plan_dseq;

static duet_status plan_buf(par_instance *p, size_t bytes) {
    if (bytes <= p->plan_cap) return DUET_OK;
    void *b = realloc(p->plan, bytes);
    if (!b) return DUET_ERR_NO_MEMORY;
    p->plan = b;
    p->plan_cap = bytes;
    return DUET_OK;
}

duet_status par_kv_agree(par_instance *p, int *n_blocks, int block_size) {
    /* the maximum of the negated sizes is the minimum size */
    long long v[2] = {-(long long)*n_blocks, block_size};
    duet_status st = comm_allreduce_i64(p->tp, v, 2, true);
    if (st != DUET_OK) return st;
    if (v[1] != block_size) {
        LOG_ERROR("parallel: TP ranks disagree on the KV block size (%d here, %lld elsewhere)",
                  block_size, v[1]);
        return DUET_ERR_INVALID;
    }
    *n_blocks = (int)-v[0];
    return DUET_OK;
}

duet_status par_step(par_instance *p, be_kv *kv, const mdl_seq *seqs, int n_seqs, float *logits) {
    if (p->opt.tp > 1) {
        plan_hdr h = {PLAN_STEP, n_seqs, 0, 0};
        for (int i = 0; i < n_seqs; i++) {
            h.n_tokens += seqs[i].n_tokens;
            h.n_table += seqs[i].n_blocks;
        }
        size_t bytes = (size_t)n_seqs * sizeof(plan_seq) +
                       ((size_t)h.n_tokens + (size_t)h.n_table) * sizeof(int32_t);
        duet_status st = plan_buf(p, bytes);
        if (st != DUET_OK) return st;
        plan_seq *ps = p->plan;
        int32_t *tok = (int32_t *)(ps + n_seqs), *tab = tok + h.n_tokens;
        for (int i = 0; i < n_seqs; i++) {
            ps[i] = (plan_seq){seqs[i].n_tokens, seqs[i].pos0, seqs[i].n_blocks, seqs[i].n_logits};
            memcpy(tok, seqs[i].tokens, (size_t)seqs[i].n_tokens * sizeof(int32_t));
            memcpy(tab, seqs[i].block_table, (size_t)seqs[i].n_blocks * sizeof(int32_t));
            tok += seqs[i].n_tokens;
            tab += seqs[i].n_blocks;
        }
        st = comm_bcast(p->tp, &h, sizeof h, 0);
        if (st == DUET_OK) st = comm_bcast(p->tp, p->plan, bytes, 0);
        if (st != DUET_OK) return st;
    }
    return par_forward(p, kv, seqs, n_seqs, logits);
}

duet_status par_draft(par_instance *p, be_kv *kv, const mdl_draft_seq *seqs, int n_seqs,
                      int32_t *drafts) {
    if (p->opt.tp > 1) {
        plan_hdr h = {PLAN_DRAFT, n_seqs, 0, 0};
        for (int i = 0; i < n_seqs; i++) {
            h.n_tokens += seqs[i].n_tokens;
            h.n_table += seqs[i].n_blocks;
        }
        size_t bytes = (size_t)n_seqs * sizeof(plan_dseq) +
                       ((size_t)h.n_tokens + (size_t)h.n_table) * sizeof(int32_t);
        duet_status st = plan_buf(p, bytes);
        if (st != DUET_OK) return st;
        plan_dseq *ps = p->plan;
        int32_t *tok = (int32_t *)(ps + n_seqs), *tab = tok + h.n_tokens;
        for (int i = 0; i < n_seqs; i++) {
            const mdl_draft_seq *q = &seqs[i];
            ps[i] = (plan_dseq){q->n_tokens, q->pos0, q->hid0, q->n_blocks, q->n_draft};
            memcpy(tok, q->tokens, (size_t)q->n_tokens * sizeof(int32_t));
            memcpy(tab, q->block_table, (size_t)q->n_blocks * sizeof(int32_t));
            tok += q->n_tokens;
            tab += q->n_blocks;
        }
        st = comm_bcast(p->tp, &h, sizeof h, 0);
        if (st == DUET_OK) st = comm_bcast(p->tp, p->plan, bytes, 0);
        if (st != DUET_OK) return st;
    }
    /* every TP rank gathers the module's logits and takes the same argmax: the drafts agree */
    return draft_round(p, kv, seqs, n_seqs, drafts);
}

/* A follower's share of PLAN_DRAFT, its payload already in p->plan. */
static duet_status follow_draft(par_instance *p, be_kv *kv, const plan_hdr *h) {
    mdl_draft_seq *seqs = calloc((size_t)(h->n_seqs ? h->n_seqs : 1), sizeof *seqs);
    int32_t *drafts = malloc((size_t)(h->n_seqs ? h->n_seqs : 1) * MDL_MAX_DRAFT * sizeof *drafts);
    duet_status st = seqs && drafts ? DUET_OK : DUET_ERR_NO_MEMORY;
    const plan_dseq *ps = p->plan;
    const int32_t *tok = (const int32_t *)(ps + h->n_seqs), *tab = tok + h->n_tokens;
    for (int i = 0; st == DUET_OK && i < h->n_seqs; i++) {
        seqs[i] = (mdl_draft_seq){.tokens = tok,
                                  .n_tokens = ps[i].n_tokens,
                                  .pos0 = ps[i].pos0,
                                  .hid0 = ps[i].hid0,
                                  .block_table = tab,
                                  .n_blocks = ps[i].n_blocks,
                                  .n_draft = ps[i].n_draft};
        tok += ps[i].n_tokens;
        tab += ps[i].n_blocks;
    }
    if (st == DUET_OK) st = draft_round(p, kv, seqs, h->n_seqs, drafts);
    free(seqs);
    free(drafts);
    return st;
}

duet_status par_idle(par_instance *p, be_kv *kv, bool *stepped_p) {
    *stepped_p = false;
    if (p->opt.tp > 1) {
        plan_hdr h = {PLAN_IDLE, 0, 0, 0};
        duet_status st = comm_bcast(p->tp, &h, sizeof h, 0);
        if (st != DUET_OK) return st;
    }
    return par_idle_step(p, kv, stepped_p);
}

/* The blocks' bytes go through the TP group's broadcast, one block at a time, from and into
 * the KV memory itself. Host-memory caches only: a device cache needs the device collective. */
static duet_status kv_copy(par_instance *p, be_kv *kv, const int32_t *blocks, int n) {
    if (kv->on_device) {
        LOG_ERROR("parallel: replicating device KV blocks to TP followers is not available yet");
        return DUET_ERR_UNSUPPORTED;
    }
    for (int i = 0; i < n; i++) {
        if (blocks[i] < 0 || blocks[i] >= kv->n_blocks) return DUET_ERR_INVALID;
        duet_status st = comm_bcast(p->tp, (char *)kv->data + (size_t)blocks[i] * kv->block_bytes,
                                    kv->block_bytes, 0);
        if (st != DUET_OK) return st;
    }
    return DUET_OK;
}

duet_status par_kv_replicate(par_instance *p, be_kv *kv, const int32_t *blocks, int n) {
    if (p->opt.tp <= 1 || n <= 0) return DUET_OK;
    plan_hdr h = {PLAN_KV_COPY, 0, 0, n};
    duet_status st = comm_bcast(p->tp, &h, sizeof h, 0);
    if (st == DUET_OK) st = plan_buf(p, (size_t)n * sizeof(int32_t));
    if (st == DUET_OK) {
        memcpy(p->plan, blocks, (size_t)n * sizeof(int32_t));
        st = comm_bcast(p->tp, p->plan, (size_t)n * sizeof(int32_t), 0);
    }
    if (st == DUET_OK) st = kv_copy(p, kv, blocks, n);
    return st;
}

duet_status par_stop_followers(par_instance *p) {
    if (p->opt.tp <= 1) return DUET_OK;
    plan_hdr h = {PLAN_QUIT, 0, 0, 0};
    return comm_bcast(p->tp, &h, sizeof h, 0);
}

duet_status par_follow(par_instance *p, be_kv *kv) {
    mdl_seq *seqs = NULL;
    int cap_seqs = 0;
    duet_status st = DUET_OK;
    for (;;) {
        plan_hdr h;
        st = comm_bcast(p->tp, &h, sizeof h, 0);
        if (st != DUET_OK || h.kind == PLAN_QUIT) break;
        if (h.kind == PLAN_IDLE) {
            bool stepped;
            st = par_idle_step(p, kv, &stepped);
            if (st != DUET_OK) break;
            continue;
        }
        if (h.kind == PLAN_KV_COPY) {
            st = plan_buf(p, (size_t)h.n_table * sizeof(int32_t));
            if (st == DUET_OK)
                st = comm_bcast(p->tp, p->plan, (size_t)h.n_table * sizeof(int32_t), 0);
            if (st == DUET_OK) st = kv_copy(p, kv, p->plan, h.n_table);
            if (st != DUET_OK) break;
            continue;
        }
        if (h.kind == PLAN_DRAFT) {
            size_t bytes = (size_t)h.n_seqs * sizeof(plan_dseq) +
                           ((size_t)h.n_tokens + (size_t)h.n_table) * sizeof(int32_t);
            st = plan_buf(p, bytes);
            if (st == DUET_OK) st = comm_bcast(p->tp, p->plan, bytes, 0);
            if (st == DUET_OK) st = follow_draft(p, kv, &h);
            if (st != DUET_OK) break;
            continue;
        }
        size_t bytes = (size_t)h.n_seqs * sizeof(plan_seq) +
                       ((size_t)h.n_tokens + (size_t)h.n_table) * sizeof(int32_t);
        st = plan_buf(p, bytes);
        if (st == DUET_OK) st = comm_bcast(p->tp, p->plan, bytes, 0);
        if (st != DUET_OK) break;
        if (h.n_seqs > cap_seqs) {
            mdl_seq *ns = realloc(seqs, (size_t)h.n_seqs * sizeof *ns);
            if (!ns) {
                st = DUET_ERR_NO_MEMORY;
                break;
            }
            seqs = ns;
            cap_seqs = h.n_seqs;
        }
        plan_seq *ps = p->plan;
        const int32_t *tok = (const int32_t *)(ps + h.n_seqs), *tab = tok + h.n_tokens;
        for (int i = 0; i < h.n_seqs; i++) {
            seqs[i] = (mdl_seq){.tokens = tok,
                                .n_tokens = ps[i].n_tokens,
                                .pos0 = ps[i].pos0,
                                .block_table = tab,
                                .n_blocks = ps[i].n_blocks,
                                .n_logits = ps[i].n_logits};
            tok += ps[i].n_tokens;
            tab += ps[i].n_blocks;
        }
        /* the logits stay in backend memory (gathered): only the leader samples, from its copy */
        st = par_forward(p, kv, seqs, h.n_seqs, NULL);
        if (st != DUET_OK) break;
    }
    free(seqs);
    return st;
}

void par_print_ordered(par_instance *p, const char *text) {
    enum { CHUNK = 16384 };
    if (p->world.size <= 1) {
        fputs(text, stdout);
        return;
    }
    char *mine = calloc(1, CHUNK), *all = malloc((size_t)CHUNK * (size_t)p->world.size);
    if (!mine || !all) {
        free(mine);
        free(all);
        fputs(text, stdout);
        return;
    }
    snprintf(mine, CHUNK, "%s", text);
    if (comm_allgather(p->world_group, mine, all, CHUNK) == DUET_OK && p->world.rank == 0)
        for (int r = 0; r < p->world.size; r++) fputs(all + (size_t)r * CHUNK, stdout);
    free(mine);
    free(all);
}
