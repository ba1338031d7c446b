/* The seam between comm_mpi.c, which owns groups, and device communicators (NCCL in
 * cuda/comm_nccl.c) attached to them: a two-level ops table so the CPU-only build links no
 * device library. Not for other modules. */
#ifndef DUET_COMM_IMPL_H
#define DUET_COMM_IMPL_H

#include "dist/comm.h"

typedef struct comm_dev comm_dev;

typedef struct comm_dev_ops {
    duet_status (*allreduce)(comm_group *g, comm_dev *d, void *buf, size_t n, dt_dtype t);
    duet_status (*allgather)(comm_group *g, comm_dev *d, const void *src, void *dst,
                             size_t bytes_each);
    duet_status (*alltoallv)(comm_group *g, comm_dev *d, const void *send, const int *send_counts,
                             void *recv, const int *recv_counts);
    duet_status (*bcast)(comm_group *g, comm_dev *d, void *buf, size_t bytes, int root);
    duet_status (*alltoall_async)(comm_group *g, comm_dev *d, const void *src, void *dst,
                                  size_t bytes_each);
    duet_status (*wait)(comm_group *g, comm_dev *d);
    void (*destroy)(comm_dev *d);
} comm_dev_ops;

/* Implementations embed this first. */
struct comm_dev {
    const comm_dev_ops *ops;
};

/* g takes d over (destroyed with the group, before its MPI communicator); replaces and
 * destroys any earlier one. */
void comm_group_set_dev(comm_group *g, comm_dev *d);
const char *comm_group_name(const comm_group *g);
/* The deadline of comm_set_timeout, in seconds, and this rank in the world (for error lines). */
double comm_timeout(void);
int comm_world_rank(void);

#endif
