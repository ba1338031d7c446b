/* A planted leak inside an MPI program: run under mpirun with the checked-in LSan suppressions
 * (tests/sanitize/lsan.supp), LeakSanitizer must still report duet-side memory (a malloc and a
 * cJSON tree) while Open MPI's own allocations stay suppressed; tests/sanitize/expect.sh fails
 * the job otherwise. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

static char *keep_nothing(size_t n) {
    char *p = malloc(n);
    if (p) memset(p, 1, n);
    return p;
}

int main(int argc, char **argv) {
    if (MPI_Init(&argc, &argv) != MPI_SUCCESS) return 2;
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    char *p = keep_nothing(4077);
    cJSON *tree = cJSON_CreateObject();
    cJSON_AddStringToObject(tree, "planted", "leak");
    printf("rank %d: %p %p\n", rank, (void *)p, (void *)tree);
    p = NULL;
    tree = NULL;
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Finalize();
    return 0;
}
