/* A planted data race inside an MPI program: with the checked-in TSan suppressions
 * (tests/sanitize/tsan.supp) in force, ThreadSanitizer must still report two threads writing
 * one counter without a lock; tests/sanitize/expect.sh fails the TSan job otherwise. */
#include <mpi.h>
#include <pthread.h>
#include <stdio.h>

static long g_counter; /* written by two threads, no lock: the planted race */

static void *bump(void *arg) {
    (void)arg;
    for (int i = 0; i < 100000; i++) g_counter++;
    return NULL;
}

int main(int argc, char **argv) {
    if (MPI_Init(&argc, &argv) != MPI_SUCCESS) return 2;
    pthread_t a, b;
    pthread_create(&a, NULL, bump, NULL);
    pthread_create(&b, NULL, bump, NULL);
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    printf("counter %ld\n", g_counter);
    MPI_Finalize();
    return 0;
}
