/* Prints, for this rank, how many CPUs it may run on and how many threads OpenMP would use:
 * "rank R cpus N omp M". For mpi_binding.sh. */
#include <omp.h>
#include <sched.h>
#include <stdio.h>

#include "dist/comm.h"

int main(int argc, char **argv) {
    comm_world w;
    if (comm_init(&argc, &argv, &w) != DUET_OK) return 1;
    cpu_set_t s;
    int n = sched_getaffinity(0, sizeof s, &s) == 0 ? CPU_COUNT(&s) : -1;
    printf("rank %d cpus %d omp %d\n", w.rank, n, omp_get_max_threads());
    fflush(stdout);
    comm_finalize();
    return 0;
}
