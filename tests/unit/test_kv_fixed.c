/* A fixed KV cache (--kv-cache-memory) is held to what the memory can give before it is
 * allocated: mplan_check_kv_fixed's arithmetic (one rank, several ranks sharing the host, sizes
 * near the limits), and par_kv_fixed_check on a real CPU instance of tiny-v3, against the host's
 * available memory as /proc/meminfo reports it (twice that is refused with one line naming the
 * flag, the size and what the host has; 1 MiB is taken) and against a given device size (what
 * the plan leaves of it). The worker programs' use of it runs in tests/integration/kv_fixed.sh. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "base/log.h"
#include "engine/parallel.h"
#include "model/memplan.h"
#include "testutil.h"

#define MIB (1LL << 20)
#define GIB (1LL << 30)

static void check_has(const char *s, const char *want) {
    CHECK_MSG(s && strstr(s, want), "'%s' not in '%s'", want, s ? s : "(null)");
}

static int count(const char *s, const char *what) {
    int n = 0;
    for (const char *p = s; p && (p = strstr(p, what)); p += strlen(what)) n++;
    return n;
}

static void test_arith(void) {
    char err[512];
    /* exactly what is there fits, one byte more does not */
    CHECK_EQ_INT(
        mplan_check_kv_fixed(8 * GIB, 1, 8 * GIB, "the host", "available", NULL, err, sizeof err),
        DUET_OK);
    CHECK(err[0] == '\0');
    CHECK_EQ_INT(mplan_check_kv_fixed(8 * GIB + 1, 1, 8 * GIB, "the host", "available", NULL, err,
                                      sizeof err),
                 DUET_ERR_NO_MEMORY);
    check_has(err, "--kv-cache-memory 8.0 GiB does not fit: the host has 8.0 GiB available");
    CHECK(strchr(err, '\n') == NULL);
    /* four ranks on the host each allocate their own cache */
    CHECK_EQ_INT(
        mplan_check_kv_fixed(2 * GIB, 4, 8 * GIB, "the host", "available", NULL, err, sizeof err),
        DUET_OK);
    CHECK_EQ_INT(
        mplan_check_kv_fixed(3 * GIB, 4, 8 * GIB, "the host", "available", NULL, err, sizeof err),
        DUET_ERR_NO_MEMORY);
    check_has(err, "--kv-cache-memory 3.0 GiB does not fit: the 4 ranks on the host need 12.0 "
                   "GiB for their KV caches, the host has 8.0 GiB available");
    /* on a device, and sizes at the edges: 10 TiB, the largest size the flag takes times 4096
     * ranks (no overflow), nothing available */
    CHECK_EQ_INT(mplan_check_kv_fixed(10 * 1024 * GIB, 1, 140 * GIB, "the device", "free", NULL,
                                      err, sizeof err),
                 DUET_ERR_NO_MEMORY);
    check_has(err, "--kv-cache-memory 10240.0 GiB does not fit: the device has 140.0 GiB free");
    CHECK_EQ_INT(mplan_check_kv_fixed(9000000000000000000LL, 4096, 140 * GIB, "the host",
                                      "available", NULL, err, sizeof err),
                 DUET_ERR_NO_MEMORY);
    check_has(err, "the 4096 ranks on the host need ");
    /* a size asked in blocks names its flag and what the blocks take */
    CHECK_EQ_INT(mplan_check_kv_fixed(16 * GIB, 1, 8 * GIB, "the device", "free",
                                      "--num-gpu-blocks-override 4096", err, sizeof err),
                 DUET_ERR_NO_MEMORY);
    check_has(err, "--num-gpu-blocks-override 4096 (16.0 GiB) does not fit: the device has 8.0 GiB "
                   "free");
    CHECK_MSG(!strstr(err, "--kv-cache-memory"), "names the wrong flag: %s", err);
    CHECK_EQ_INT(mplan_check_kv_fixed(1, 1, 0, "the host", "available", NULL, err, sizeof err),
                 DUET_ERR_NO_MEMORY);
}

/* MemAvailable of /proc/meminfo in bytes, read here on its own; -1 when unreadable. */
static long long mem_available(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return -1;
    char line[256];
    long long kb = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %lld kB", &kb) == 1) break;
    fclose(f);
    return kb < 0 ? -1 : kb * 1024;
}

/* A one-rank CPU instance of tiny-v3 (device: a device size given to plan against, 0: none). */
static par_instance *instance(long long device) {
    par_options po;
    par_options_init(&po);
    po.max_tokens = 256;
    po.mem = (par_memory){.utilization = 0.9,
                          .max_model_len = 1024,
                          .max_num_seqs = 16,
                          .block_size = 16,
                          .device_memory = device};
    int argc = 0;
    char **argv = NULL;
    par_instance *inst = NULL;
    duet_status st = par_instance_create(&po, GOLDEN_DIR "/tiny-v3/model", &argc, &argv, &inst);
    CHECK_EQ_INT(st, DUET_OK);
    return st == DUET_OK ? inst : NULL;
}

/* par_kv_fixed_check on inst, its log captured into *log_p. */
static duet_status fixed(par_instance *inst, long long bytes, char **log_p) {
    log_set_level(LOG_LEVEL_INFO);
    tu_capture_begin();
    duet_status st = par_kv_fixed_check(inst, bytes, NULL);
    *log_p = tu_capture_end();
    log_set_level(LOG_LEVEL_WARN);
    return st;
}

static void test_host(void) {
    long long avail = mem_available();
    CHECK_MSG(avail > 0, "cannot read MemAvailable from /proc/meminfo");
    if (avail <= 0) return;
    par_instance *inst = instance(0);
    if (!inst) return;
    char *log = NULL;
    /* 10 TiB, as a user might mistype it */
    CHECK_EQ_INT(fixed(inst, 10 * 1024 * GIB, &log), DUET_ERR_NO_MEMORY);
    CHECK_EQ_INT(count(log, "\n"), 1);
    check_has(log, "memory plan: --kv-cache-memory 10240.0 GiB does not fit: the host has ");
    check_has(log, " available (");
    free(log);
    /* twice what the host has now: refused whatever the machine (a cgroup only lowers it) */
    CHECK_EQ_INT(fixed(inst, 2 * avail, &log), DUET_ERR_NO_MEMORY);
    check_has(log, "does not fit: the host has ");
    free(log);
    /* a small cache fits, silently */
    CHECK_EQ_INT(fixed(inst, MIB, &log), DUET_OK);
    CHECK_MSG(!strstr(log, "does not fit"), "refused 1 MiB: %s", log);
    free(log);
    par_instance_destroy(inst);
}

static void test_device_size(void) {
    /* a 4 GiB device given to plan against: tiny-v3's 8 MiB of weights and ~40 MiB of
     * activations leave a little under 4 GiB */
    par_instance *inst = instance(4 * GIB);
    if (!inst) return;
    char *log = NULL;
    CHECK_EQ_INT(fixed(inst, 4 * GIB, &log), DUET_ERR_NO_MEMORY);
    CHECK_EQ_INT(count(log, "\n"), 1);
    check_has(log, "--kv-cache-memory 4.0 GiB does not fit: the device has ");
    check_has(log, "left after the plan's weights and activations");
    free(log);
    CHECK_EQ_INT(fixed(inst, 3 * GIB, &log), DUET_OK);
    free(log);
    par_instance_destroy(inst);
}

int main(void) {
    log_set_level(LOG_LEVEL_WARN);
    test_arith();
    test_host();
    test_device_size();
    CHECK_DONE();
}
