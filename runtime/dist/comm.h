/* Communicators of an instance: the MPI world that mpirun starts, and groups (TP, DP, EP) with
 * the collectives the model and the scheduler need. Implementations: MPI on host memory (the
 * CPU backend; also the control plane everywhere) and, in the CUDA build, NCCL on device
 * memory (comm-impl.h is the seam between them). Every collective has a deadline: a peer that died
 * or hangs makes it fail with DUET_ERR_COMM after logging which group, which collective and how
 * long it waited. A group is used by one thread at a time (the engine thread). */
#ifndef DUET_COMM_H
#define DUET_COMM_H

#include <stdbool.h>
#include <stddef.h>

#include "base/dtype.h"
#include "base/status.h"

typedef struct comm_group comm_group;

typedef struct comm_world {
    int rank, size;             /* in the instance (MPI_COMM_WORLD) */
    int local_rank, local_size; /* on this host: picks the device */
    bool mpi;                   /* false when running without mpirun as a single rank */
} comm_world;

/* Starts MPI when launched by mpirun (or when force_mpi), else describes a single rank. */
duet_status comm_init(int *argc, char ***argv, comm_world *world_p);
void comm_finalize(void);
/* Ends every rank of the instance after the error line has been logged. */
void comm_abort(int code);

/* Splits the world into groups: ranks with the same color form a group, ordered by key.
 * name ("tp", "dp", "ep") appears in error lines. */
duet_status comm_group_create(const char *name, int color, int key, comm_group **group_p);
void comm_group_destroy(comm_group *g);
int comm_group_rank(const comm_group *g);
int comm_group_size(const comm_group *g);

/* Seconds a collective may wait before the instance is declared broken (default 60,
 * env DUET_COMM_TIMEOUT). */
void comm_set_timeout(double seconds);

/* Collectives on host memory. */
duet_status comm_allreduce_f32(comm_group *g, float *buf, size_t n);
duet_status comm_allreduce_i64(comm_group *g, long long *buf, size_t n, bool max);
duet_status comm_bcast(comm_group *g, void *buf, size_t bytes, int root);
duet_status comm_allgather(comm_group *g, const void *src, void *dst, size_t bytes_each);
/* Variable all-to-all: send_counts / recv_counts in bytes per peer, displacements implied
 * (packed in peer order). recv_counts must already be known (exchange counts first with
 * comm_alltoall_counts). */
duet_status comm_alltoall_counts(comm_group *g, const int *send_counts, int *recv_counts);
duet_status comm_alltoallv(comm_group *g, const void *send, const int *send_counts, void *recv,
                           const int *recv_counts);
duet_status comm_barrier(comm_group *g);

/* ---- collectives on device memory ----
 * A group moves device buffers once a device communicator is attached to it (the CUDA
 * backend attaches NCCL through be_ops.comm_attach). The calls are ordered on the stream
 * given when attaching and return once the transfer completed, under the same deadline as
 * above (a dead peer aborts the instance with one line naming the rank, group and wait).
 * On a group of one rank with nothing attached, allreduce and bcast are no-ops. */
bool comm_group_has_device(const comm_group *g);
/* buf[n] of type t (DT_F32 or DT_BF16) summed over the group, in place */
duet_status comm_dev_allreduce(comm_group *g, void *buf, size_t n, dt_dtype t);
/* dst [size][bytes_each] = every rank's src, in group rank order */
duet_status comm_dev_allgather(comm_group *g, const void *src, void *dst, size_t bytes_each);
/* As comm_alltoallv (byte counts per peer, packed in peer order), on device memory */
duet_status comm_dev_alltoallv(comm_group *g, const void *send, const int *send_counts, void *recv,
                               const int *recv_counts);
duet_status comm_dev_bcast(comm_group *g, void *buf, size_t bytes, int root);
/* Equal blocks: dst [size][bytes_each] receives every rank's block for this rank, src
 * [size][bytes_each] holds this rank's block for each. Only enqueued: the call returns once the
 * transfer is ordered on the stream, without waiting for it, so later work on that stream
 * (and a captured graph) follows it with no host synchronization; comm_dev_wait bounds the
 * wait for it by the deadline. */
duet_status comm_dev_alltoall_async(comm_group *g, const void *src, void *dst, size_t bytes_each);
/* Waits, under the deadline, until the stream passed every collective enqueued on g. */
duet_status comm_dev_wait(comm_group *g);

#ifdef DUET_HAVE_CUDA
/* Creates an NCCL communicator over g's ranks on CUDA device `device` and attaches it to g;
 * collective over g: every rank of g calls it, groups in the same order on every rank. The
 * NCCL id travels over g's host (MPI) broadcast. stream is the cudaStream_t the collectives
 * are ordered on. Sets NCCL_NVLS_ENABLE=0 unless the environment already says otherwise:
 * NVLink multicast can take shared GPUs down. (runtime/cuda/comm_nccl.c) */
duet_status comm_nccl_attach(comm_group *g, int device, void *stream);
#endif

#endif
