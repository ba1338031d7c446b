/* NCCL device collectives attached to comm groups (see comm.h): the communicator is created
 * non-blocking, so every wait, at creation and after each collective, polls
 * ncclCommGetAsyncError and the stream against comm_set_timeout's deadline. A peer that died
 * or hangs becomes one error line and an instance-wide abort, as on the MPI path, instead of a
 * GPU kernel spinning forever. Plain C: NCCL and the CUDA runtime API are C libraries. */
#include <cuda_runtime_api.h>
#include <nccl.h>
#include <stdlib.h>
#include <time.h>

#include "base/clock.h"
#include "dist/comm-impl.h"
#include "base/log.h"

typedef struct nccl_dev {
    comm_dev base;
    ncclComm_t comm;
    cudaStream_t stream;
    cudaEvent_t done;
    int device;
    bool broken; /* aborted: nothing more may be issued */
} nccl_dev;

/* The one conversion point of NCCL results: logs once, where first seen. */
#define NCCL_FAIL(g, d, what, rc) nccl_fail((g), (d), (what), (rc), __FILE__, __LINE__)

static duet_status nccl_fail(comm_group *g, nccl_dev *d, const char *what, ncclResult_t rc,
                             const char *file, int line) {
    const char *last = d && d->comm ? ncclGetLastError(d->comm) : NULL;
    LOG_ERROR("comm: rank %d: %s on the %s group failed at %s:%d: %s%s%s; stopping the instance",
              comm_world_rank(), what, comm_group_name(g), file, line, ncclGetErrorString(rc),
              last && *last ? ": " : "", last ? last : "");
    if (d && d->comm && !d->broken) {
        d->broken = true;
        ncclCommAbort(d->comm);
        d->comm = NULL;
    }
    /* the ranks are out of step for good: end them all, as comm_mpi.c does */
    comm_abort(3);
    return DUET_ERR_COMM;
}

static duet_status timed_out(comm_group *g, nccl_dev *d, const char *what) {
    LOG_ERROR("comm: rank %d: %s on the %s group did not complete within %.0f s (a peer rank "
              "died or hangs); stopping the instance",
              comm_world_rank(), what, comm_group_name(g), comm_timeout());
    if (d->comm && !d->broken) {
        d->broken = true;
        ncclCommAbort(d->comm); /* frees the GPU from kernels waiting on the dead peer */
        d->comm = NULL;
    }
    comm_abort(3);
    return DUET_ERR_COMM;
}

static void nap(long spins) {
    static const struct timespec ts = {0, 20000}; /* 20 us: low latency without a spinning core */
    if (spins > 200) nanosleep(&ts, NULL);
}

/* Waits until the communicator has no call in progress (non-blocking mode returns
 * ncclInProgress from calls whose work is still being set up). */
static duet_status wait_issued(comm_group *g, nccl_dev *d, const char *what, ncclResult_t rc,
                               double start) {
    for (long spins = 0; rc == ncclInProgress; spins++) {
        if ((spins & 255) == 0 && clock_now_s() - start > comm_timeout())
            return timed_out(g, d, what);
        nap(spins);
        ncclResult_t q = ncclCommGetAsyncError(d->comm, &rc);
        if (q != ncclSuccess) rc = q;
    }
    if (rc != ncclSuccess) return NCCL_FAIL(g, d, what, rc);
    return DUET_OK;
}

/* After a collective was issued: waits for the stream to pass it, watching for an
 * asynchronous NCCL error and the deadline. */
static duet_status wait_done(comm_group *g, nccl_dev *d, const char *what, ncclResult_t rc) {
    double start = clock_now_s();
    duet_status st = wait_issued(g, d, what, rc, start);
    if (st != DUET_OK) return st;
    cudaError_t e = cudaEventRecord(d->done, d->stream);
    if (e != cudaSuccess) {
        LOG_ERROR("comm: rank %d: %s on the %s group: cudaEventRecord failed: %s",
                  comm_world_rank(), what, comm_group_name(g), cudaGetErrorString(e));
        return DUET_ERR_DEVICE;
    }
    for (long spins = 0;; spins++) {
        e = cudaEventQuery(d->done);
        if (e == cudaSuccess) return DUET_OK;
        if (e != cudaErrorNotReady) {
            LOG_ERROR("comm: rank %d: %s on the %s group: the device failed: %s", comm_world_rank(),
                      what, comm_group_name(g), cudaGetErrorString(e));
            return DUET_ERR_DEVICE;
        }
        ncclResult_t async = ncclSuccess;
        ncclCommGetAsyncError(d->comm, &async);
        if (async != ncclSuccess && async != ncclInProgress) return NCCL_FAIL(g, d, what, async);
        if ((spins & 255) == 0 && clock_now_s() - start > comm_timeout())
            return timed_out(g, d, what);
        nap(spins);
    }
}

static bool nccl_type(dt_dtype t, ncclDataType_t *out) {
    if (t == DT_F32)
        *out = ncclFloat32;
    else if (t == DT_BF16)
        *out = ncclBfloat16;
    else
        return false;
    return true;
}

static duet_status nccl_allreduce(comm_group *g, comm_dev *cd, void *buf, size_t n, dt_dtype t) {
    nccl_dev *d = (nccl_dev *)cd;
    ncclDataType_t nt;
    if (!nccl_type(t, &nt)) return DUET_ERR_UNSUPPORTED;
    if (n == 0 || comm_group_size(g) <= 1) return DUET_OK;
    ncclResult_t rc = ncclAllReduce(buf, buf, n, nt, ncclSum, d->comm, d->stream);
    return wait_done(g, d, "allreduce", rc);
}

static duet_status nccl_allgather(comm_group *g, comm_dev *cd, const void *src, void *dst,
                                  size_t bytes_each) {
    nccl_dev *d = (nccl_dev *)cd;
    if (bytes_each == 0) return DUET_OK;
    ncclResult_t rc = ncclAllGather(src, dst, bytes_each, ncclUint8, d->comm, d->stream);
    return wait_done(g, d, "allgather", rc);
}

/* Point-to-point sends and receives in one group call: NCCL matches them pairwise, so no
 * ordering between peers can deadlock. */
static duet_status nccl_alltoallv(comm_group *g, comm_dev *cd, const void *send,
                                  const int *send_counts, void *recv, const int *recv_counts) {
    nccl_dev *d = (nccl_dev *)cd;
    int n = comm_group_size(g);
    size_t so = 0, ro = 0;
    ncclResult_t rc = ncclGroupStart();
    for (int p = 0; p < n && (rc == ncclSuccess || rc == ncclInProgress); p++) {
        if (send_counts[p] > 0)
            rc = ncclSend((const char *)send + so, (size_t)send_counts[p], ncclUint8, p, d->comm,
                          d->stream);
        if (recv_counts[p] > 0 && (rc == ncclSuccess || rc == ncclInProgress))
            rc = ncclRecv((char *)recv + ro, (size_t)recv_counts[p], ncclUint8, p, d->comm,
                          d->stream);
        so += (size_t)(send_counts[p] > 0 ? send_counts[p] : 0);
        ro += (size_t)(recv_counts[p] > 0 ? recv_counts[p] : 0);
    }
    ncclResult_t end = ncclGroupEnd(); /* always closes the group, even after an error */
    if (rc == ncclSuccess || rc == ncclInProgress) rc = end;
    return wait_done(g, d, "alltoallv", rc);
}

static duet_status nccl_bcast(comm_group *g, comm_dev *cd, void *buf, size_t bytes, int root) {
    nccl_dev *d = (nccl_dev *)cd;
    if (bytes == 0 || comm_group_size(g) <= 1) return DUET_OK;
    ncclResult_t rc = ncclBroadcast(buf, buf, bytes, ncclUint8, root, d->comm, d->stream);
    return wait_done(g, d, "broadcast", rc);
}

/* The fixed-size all-to-all of EP dispatch and combine: grouped sends and receives, only
 * enqueued (wait_issued polls the communicator's setup, not the stream). */
static duet_status nccl_alltoall_async(comm_group *g, comm_dev *cd, const void *src, void *dst,
                                       size_t bytes_each) {
    nccl_dev *d = (nccl_dev *)cd;
    int n = comm_group_size(g);
    if (bytes_each == 0) return DUET_OK;
    ncclResult_t rc = ncclGroupStart();
    for (int p = 0; p < n && (rc == ncclSuccess || rc == ncclInProgress); p++) {
        rc = ncclSend((const char *)src + (size_t)p * bytes_each, bytes_each, ncclUint8, p, d->comm,
                      d->stream);
        if (rc == ncclSuccess || rc == ncclInProgress)
            rc = ncclRecv((char *)dst + (size_t)p * bytes_each, bytes_each, ncclUint8, p, d->comm,
                          d->stream);
    }
    ncclResult_t end = ncclGroupEnd();
    if (rc == ncclSuccess || rc == ncclInProgress) rc = end;
    return wait_issued(g, d, "alltoall", rc, clock_now_s());
}

static duet_status nccl_wait(comm_group *g, comm_dev *cd) {
    return wait_done(g, (nccl_dev *)cd, "wait for enqueued collectives", ncclSuccess);
}

static void nccl_destroy(comm_dev *cd) {
    nccl_dev *d = (nccl_dev *)cd;
    if (!d) return;
    if (d->comm && !d->broken) {
        /* flush, then free; a finalize that cannot complete (a peer is gone) is aborted */
        ncclResult_t rc = ncclCommFinalize(d->comm);
        double start = clock_now_s();
        for (long spins = 0; rc == ncclInProgress; spins++) {
            if (clock_now_s() - start > comm_timeout()) break;
            nap(spins);
            ncclCommGetAsyncError(d->comm, &rc);
        }
        if (rc == ncclSuccess)
            ncclCommDestroy(d->comm);
        else
            ncclCommAbort(d->comm);
    }
    if (d->done) cudaEventDestroy(d->done);
    free(d);
}

static const comm_dev_ops g_nccl_ops = {
    .allreduce = nccl_allreduce,
    .allgather = nccl_allgather,
    .alltoallv = nccl_alltoallv,
    .bcast = nccl_bcast,
    .alltoall_async = nccl_alltoall_async,
    .wait = nccl_wait,
    .destroy = nccl_destroy,
};

duet_status comm_nccl_attach(comm_group *g, int device, void *stream) {
    /* before NCCL reads its environment: NVLink multicast stays off unless asked for */
    setenv("NCCL_NVLS_ENABLE", "0", 0);
    int rank = comm_group_rank(g), size = comm_group_size(g);
    nccl_dev *d = calloc(1, sizeof *d);
    if (!d) return DUET_ERR_NO_MEMORY;
    d->base.ops = &g_nccl_ops;
    d->stream = (cudaStream_t)stream;
    d->device = device;
    cudaError_t e = cudaSetDevice(device);
    if (e == cudaSuccess) e = cudaEventCreateWithFlags(&d->done, cudaEventDisableTiming);
    if (e != cudaSuccess) {
        LOG_ERROR("comm: rank %d: cannot prepare NCCL on device %d: %s", comm_world_rank(), device,
                  cudaGetErrorString(e));
        nccl_destroy(&d->base);
        return DUET_ERR_DEVICE;
    }
    ncclUniqueId id;
    ncclResult_t rc = rank == 0 ? ncclGetUniqueId(&id) : ncclSuccess;
    if (rc != ncclSuccess) {
        nccl_destroy(&d->base);
        return NCCL_FAIL(g, NULL, "ncclGetUniqueId", rc);
    }
    duet_status st = comm_bcast(g, &id, sizeof id, 0);
    if (st != DUET_OK) {
        nccl_destroy(&d->base);
        return st;
    }
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0; /* calls return at once; waits are ours, with a deadline */
    rc = ncclCommInitRankConfig(&d->comm, size, id, rank, &cfg);
    if (rc != ncclSuccess && rc != ncclInProgress) {
        d->comm = NULL;
        nccl_destroy(&d->base);
        return NCCL_FAIL(g, NULL, "ncclCommInitRankConfig", rc);
    }
    st = wait_issued(g, d, "NCCL communicator setup", rc, clock_now_s());
    if (st != DUET_OK) return st;
    int version = 0;
    ncclGetVersion(&version);
    LOG_INFO("comm: NCCL %d.%d.%d attached to the %s group (rank %d of %d, device %d)",
             version / 10000, version / 100 % 100, version % 100, comm_group_name(g), rank, size,
             device);
    comm_group_set_dev(g, &d->base);
    return DUET_OK;
}
