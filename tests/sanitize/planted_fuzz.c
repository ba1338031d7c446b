/* A planted bug behind three byte comparisons, for the timed fuzzing job: tests/fuzz/
 * run-timed.sh --planted expects libFuzzer to find it from an empty corpus and ASan to report it
 * within its time, else the job fails. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Written between the comparisons so that the compiler cannot merge them into one wide compare:
 * each byte matched is new coverage, the way a parser's branches are. */
static volatile int g_depth;
/* The buffer escapes through it, so the compiler cannot elide the allocation and the copy. */
static char *volatile g_escape;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1 || data[0] != 'b') return 0;
    g_depth = 1;
    if (size < 2 || data[1] != 'u') return 0;
    g_depth = 2;
    if (size < 3 || data[2] != 'g') return 0;
    g_depth = 3;
    g_escape = malloc(2);
    if (!g_escape) return 0;
    memcpy(g_escape, data, size); /* size >= 3: one byte or more past the end */
    free(g_escape);
    return 0;
}
