/* A planted leak inside an MPI program: run under mpirun with the checked-in LSan suppressions
 * (tests/sanitize/lsan.supp), LeakSanitizer must still report duet-side memory (a malloc and a
 * cJSON tree) while Open MPI's own allocations stay suppressed; tests/sanitize/expect.sh fails
 * the job otherwise. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

/* The last allocation is kept here until the end; the others are lost as soon as the next one
 * replaces them. Many of them, because a stale copy of a pointer left in a register or on the
 * stack makes LSan count that one block as reachable. */
static char *volatile g_last;

__attribute__((noinline)) static char *keep_nothing(size_t n) {
    char *p = malloc(n);
    if (p) memset(p, 1, n);
    return p;
}

int main(int argc, char **argv) {
    if (MPI_Init(&argc, &argv) != MPI_SUCCESS) return 2;
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    for (int i = 0; i < 64; i++) g_last = keep_nothing(4077);
    cJSON *tree = cJSON_CreateObject();
    cJSON_AddStringToObject(tree, "planted", "leak");
    printf("rank %d: %p %p\n", rank, (void *)g_last, (void *)tree);
    g_last = NULL;
    tree = NULL;
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Finalize();
    return 0;
}
