/* comm over MPI (Open MPI): world bootstrap, group splits, and host-memory collectives run as
 * non-blocking MPI calls polled against a deadline, so a dead or stuck peer becomes one clear
 * error line and an instance-wide abort instead of a silent hang. */
#include "dist/comm-impl.h"

#include <mpi.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "base/clock.h"
#include "base/log.h"

struct comm_group {
    MPI_Comm comm;
    char name[16];
    int rank, size;
    comm_dev *dev; /* device communicator, when a backend attached one */
};

static double g_timeout = 60.0;
static bool g_mpi;
static int g_world_rank;

void comm_set_timeout(double seconds) {
    if (seconds > 0) g_timeout = seconds;
}

double comm_timeout(void) {
    return g_timeout;
}

int comm_world_rank(void) {
    return g_world_rank;
}

const char *comm_group_name(const comm_group *g) {
    return g->name;
}

void comm_group_set_dev(comm_group *g, comm_dev *d) {
    if (g->dev && g->dev != d) g->dev->ops->destroy(g->dev);
    g->dev = d;
}

bool comm_group_has_device(const comm_group *g) {
    return g && g->dev;
}

/* Open MPI binds each rank to one core when mpirun starts one or two ranks and nobody asked
 * for a binding; every instance mpirun starts on a host then begins at core 0, so the
 * instances of a one-host deployment (two prefills and a decode) share a core or two for their
 * engine, transfer and HTTP threads and their OpenMP loops (dummy weights were made at a
 * twentieth of their speed on an H200 host). Before main, a rank bound to a single CPU that
 * way (no --bind-to given: Open MPI then exports no binding policy) takes every CPU its cgroup
 * allows and runs itself again, so that the OpenMP and OpenBLAS runtimes, which size their
 * thread pools when they load, see them. `mpirun --bind-to core` (or any --bind-to) keeps
 * Open MPI's binding. */
__attribute__((constructor)) static void comm_unbind(void) {
    if (!getenv("OMPI_COMM_WORLD_SIZE") || getenv("OMPI_MCA_hwloc_base_binding_policy") ||
        getenv("DUET_UNBOUND"))
        return;
    cpu_set_t cur, all;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n <= 1 || sched_getaffinity(0, sizeof cur, &cur) != 0 || CPU_COUNT(&cur) != 1) return;
    int was = 0;
    while (was < CPU_SETSIZE && !CPU_ISSET(was, &cur)) was++;
    CPU_ZERO(&all);
    for (long i = 0; i < n && i < CPU_SETSIZE; i++) CPU_SET((int)i, &all);
    /* the kernel keeps what the cgroup's cpuset allows of it */
    if (sched_setaffinity(0, sizeof all, &all) != 0 ||
        sched_getaffinity(0, sizeof cur, &cur) != 0 || CPU_COUNT(&cur) <= 1)
        return;
    static char cmd[1 << 16];
    static char *args[1024];
    FILE *f = fopen("/proc/self/cmdline", "rb");
    size_t len = f ? fread(cmd, 1, sizeof cmd - 1, f) : 0;
    if (f) fclose(f);
    if (len == 0 || len >= sizeof cmd - 1) return; /* widened; its pools stay as they are */
    int argc = 0;
    for (size_t i = 0; i < len && argc < 1023; i += strlen(cmd + i) + 1) args[argc++] = cmd + i;
    args[argc] = NULL;
    char mark[16];
    snprintf(mark, sizeof mark, "%d", was);
    setenv("DUET_UNBOUND", mark, 1);
    execv("/proc/self/exe", args);
    /* exec failed: go on widened (the thread pools keep the size they took) */
}

duet_status comm_init(int *argc, char ***argv, comm_world *world_p) {
    comm_world w = {.rank = 0, .size = 1, .local_rank = 0, .local_size = 1, .mpi = false};
    const char *t = getenv("DUET_COMM_TIMEOUT");
    if (t && atof(t) > 0) g_timeout = atof(t);
    /* Under mpirun (Open MPI sets these) start MPI; a plain run stays a single rank. */
    if (getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMIX_RANK") || getenv("DUET_FORCE_MPI")) {
        int provided = 0;
        if (MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided) != MPI_SUCCESS) {
            LOG_ERROR("comm: MPI_Init_thread failed");
            return DUET_ERR_COMM;
        }
        /* Errors come back to us so they can be reported with context. */
        MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
        MPI_Comm_rank(MPI_COMM_WORLD, &w.rank);
        MPI_Comm_size(MPI_COMM_WORLD, &w.size);
        MPI_Comm local;
        MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, w.rank, MPI_INFO_NULL, &local);
        MPI_Comm_rank(local, &w.local_rank);
        MPI_Comm_size(local, &w.local_size);
        MPI_Comm_free(&local);
        w.mpi = true;
        g_mpi = true;
        g_world_rank = w.rank;
        const char *was = getenv("DUET_UNBOUND");
        if (was && w.local_rank == 0)
            LOG_INFO("comm: mpirun bound rank %d to CPU %s alone (its default for one or two "
                     "ranks); duet runs it on every CPU it may use (mpirun --bind-to ... keeps "
                     "a binding)",
                     w.rank, was);
    }
    *world_p = w;
    return DUET_OK;
}

void comm_finalize(void) {
    if (g_mpi) MPI_Finalize();
    g_mpi = false;
}

void comm_abort(int code) {
    if (g_mpi) MPI_Abort(MPI_COMM_WORLD, code);
    exit(code);
}

static duet_status wait_req(comm_group *g, MPI_Request *req, const char *what, int rc);

duet_status comm_group_create(const char *name, int color, int key, comm_group **group_p) {
    comm_group *g = calloc(1, sizeof *g);
    if (!g) return DUET_ERR_NO_MEMORY;
    snprintf(g->name, sizeof g->name, "%s", name);
    if (!g_mpi) {
        g->comm = MPI_COMM_NULL;
        g->rank = 0;
        g->size = 1;
    } else {
        /* MPI_Comm_split blocks without a deadline: first meet every rank in a barrier that has
         * one, so a rank that died or hangs while the instance starts ends it, as later */
        comm_group world = {.comm = MPI_COMM_WORLD, .rank = g_world_rank};
        snprintf(world.name, sizeof world.name, "world");
        MPI_Request req;
        int rc = MPI_Ibarrier(MPI_COMM_WORLD, &req);
        if (wait_req(&world, &req, "start-up barrier", rc) != DUET_OK) {
            free(g);
            return DUET_ERR_COMM;
        }
        if (MPI_Comm_split(MPI_COMM_WORLD, color, key, &g->comm) != MPI_SUCCESS) {
            LOG_ERROR("comm: cannot create the %s group", name);
            free(g);
            return DUET_ERR_COMM;
        }
        MPI_Comm_set_errhandler(g->comm, MPI_ERRORS_RETURN);
        MPI_Comm_rank(g->comm, &g->rank);
        MPI_Comm_size(g->comm, &g->size);
    }
    *group_p = g;
    return DUET_OK;
}

void comm_group_destroy(comm_group *g) {
    if (!g) return;
    comm_group_set_dev(g, NULL);
    if (g->comm != MPI_COMM_NULL) MPI_Comm_free(&g->comm);
    free(g);
}

int comm_group_rank(const comm_group *g) {
    return g ? g->rank : 0;
}

int comm_group_size(const comm_group *g) {
    return g ? g->size : 1;
}

/* Waits for req until the deadline; on failure logs once and aborts the whole instance:
 * a collective that did not complete leaves the ranks out of step for good. */
static duet_status wait_req(comm_group *g, MPI_Request *req, const char *what, int rc) {
    if (rc != MPI_SUCCESS) {
        char err[MPI_MAX_ERROR_STRING];
        int len = 0;
        MPI_Error_string(rc, err, &len);
        LOG_ERROR("comm: rank %d: %s on the %s group failed: %s", g_world_rank, what, g->name, err);
        comm_abort(3);
        return DUET_ERR_COMM;
    }
    double start = clock_now_s();
    struct timespec nap = {0, 20000}; /* 20 us: keeps latency low without spinning a core */
    for (long spins = 0;; spins++) {
        int done = 0;
        rc = MPI_Test(req, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) return wait_req(g, req, what, rc);
        if (done) return DUET_OK;
        if (spins > 200) nanosleep(&nap, NULL);
        if ((spins & 255) == 0 && clock_now_s() - start > g_timeout) {
            LOG_ERROR("comm: rank %d: %s on the %s group did not complete within %.0f s (a "
                      "peer rank died or hangs); stopping the instance",
                      g_world_rank, what, g->name, g_timeout);
            comm_abort(3);
            return DUET_ERR_COMM;
        }
    }
}

duet_status comm_allreduce_f32(comm_group *g, float *buf, size_t n) {
    if (g->size <= 1 || n == 0) return DUET_OK;
    MPI_Request req;
    int rc = MPI_Iallreduce(MPI_IN_PLACE, buf, (int)n, MPI_FLOAT, MPI_SUM, g->comm, &req);
    return wait_req(g, &req, "allreduce", rc);
}

duet_status comm_allreduce_i64(comm_group *g, long long *buf, size_t n, bool max) {
    if (g->size <= 1 || n == 0) return DUET_OK;
    MPI_Request req;
    int rc = MPI_Iallreduce(MPI_IN_PLACE, buf, (int)n, MPI_LONG_LONG, max ? MPI_MAX : MPI_SUM,
                            g->comm, &req);
    return wait_req(g, &req, "allreduce", rc);
}

duet_status comm_bcast(comm_group *g, void *buf, size_t bytes, int root) {
    if (g->size <= 1 || bytes == 0) return DUET_OK;
    MPI_Request req;
    int rc = MPI_Ibcast(buf, (int)bytes, MPI_BYTE, root, g->comm, &req);
    return wait_req(g, &req, "broadcast", rc);
}

duet_status comm_allgather(comm_group *g, const void *src, void *dst, size_t bytes_each) {
    if (g->size <= 1) {
        memcpy(dst, src, bytes_each);
        return DUET_OK;
    }
    MPI_Request req;
    int rc = MPI_Iallgather(src, (int)bytes_each, MPI_BYTE, dst, (int)bytes_each, MPI_BYTE, g->comm,
                            &req);
    return wait_req(g, &req, "allgather", rc);
}

duet_status comm_alltoall_counts(comm_group *g, const int *send_counts, int *recv_counts) {
    if (g->size <= 1) {
        recv_counts[0] = send_counts[0];
        return DUET_OK;
    }
    MPI_Request req;
    int rc = MPI_Ialltoall(send_counts, 1, MPI_INT, recv_counts, 1, MPI_INT, g->comm, &req);
    return wait_req(g, &req, "alltoall", rc);
}

duet_status comm_alltoallv(comm_group *g, const void *send, const int *send_counts, void *recv,
                           const int *recv_counts) {
    int n = g->size;
    if (n <= 1) {
        if (send_counts[0]) memcpy(recv, send, (size_t)send_counts[0]);
        return DUET_OK;
    }
    int sd[256], rd[256];
    if (n > 256) return DUET_ERR_UNSUPPORTED;
    sd[0] = rd[0] = 0;
    for (int i = 1; i < n; i++) {
        sd[i] = sd[i - 1] + send_counts[i - 1];
        rd[i] = rd[i - 1] + recv_counts[i - 1];
    }
    MPI_Request req;
    int rc = MPI_Ialltoallv(send, send_counts, sd, MPI_BYTE, recv, recv_counts, rd, MPI_BYTE,
                            g->comm, &req);
    return wait_req(g, &req, "alltoallv", rc);
}

duet_status comm_barrier(comm_group *g) {
    if (g->size <= 1) return DUET_OK;
    MPI_Request req;
    int rc = MPI_Ibarrier(g->comm, &req);
    return wait_req(g, &req, "barrier", rc);
}

/* ---- device memory: through the attached device communicator ---- */

static duet_status no_dev(comm_group *g, const char *what) {
    LOG_ERROR("comm: %s of device memory on the %s group, which has no device communicator", what,
              g->name);
    return DUET_ERR_UNSUPPORTED;
}

duet_status comm_dev_allreduce(comm_group *g, void *buf, size_t n, dt_dtype t) {
    if (g->dev) return g->dev->ops->allreduce(g, g->dev, buf, n, t);
    return g->size <= 1 ? DUET_OK : no_dev(g, "allreduce");
}

duet_status comm_dev_allgather(comm_group *g, const void *src, void *dst, size_t bytes_each) {
    if (g->dev) return g->dev->ops->allgather(g, g->dev, src, dst, bytes_each);
    return no_dev(g, "allgather");
}

duet_status comm_dev_alltoallv(comm_group *g, const void *send, const int *send_counts, void *recv,
                               const int *recv_counts) {
    if (g->dev) return g->dev->ops->alltoallv(g, g->dev, send, send_counts, recv, recv_counts);
    return no_dev(g, "alltoallv");
}

duet_status comm_dev_bcast(comm_group *g, void *buf, size_t bytes, int root) {
    if (g->dev) return g->dev->ops->bcast(g, g->dev, buf, bytes, root);
    return g->size <= 1 ? DUET_OK : no_dev(g, "broadcast");
}

duet_status comm_dev_alltoall_async(comm_group *g, const void *src, void *dst, size_t bytes_each) {
    if (g->dev) return g->dev->ops->alltoall_async(g, g->dev, src, dst, bytes_each);
    return no_dev(g, "alltoall");
}

duet_status comm_dev_wait(comm_group *g) {
    return g->dev ? g->dev->ops->wait(g, g->dev) : DUET_OK;
}
