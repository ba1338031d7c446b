/* Communicators of an instance: the MPI world that mpirun starts, and groups (TP, DP, EP) with
 * the collectives the model and the scheduler need. Implementations: MPI on host memory (the
 * CPU backend; also the control plane everywhere) and, in the CUDA build, NCCL on device
 * memory. Every collective has a deadline: a peer that died or hangs makes it fail with
 * DUET_ERR_COMM after logging which group, which collective and how long it waited.
 * A group is used by one thread at a time (the engine thread). */
#ifndef DUET_COMM_H
#define DUET_COMM_H

#include <stdbool.h>
#include <stddef.h>

#include "dtype.h"
#include "status.h"

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

#endif
