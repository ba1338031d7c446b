/* A planted bug behind a three-byte comparison, for the timed fuzzing job: tests/fuzz/
 * run-timed.sh --planted expects libFuzzer to find it from an empty corpus and ASan to report it
 * within its time, else the job fails. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size >= 4 && data[0] == 'b' && data[1] == 'u' && data[2] == 'g') {
        char *p = malloc(4);
        if (!p) return 0;
        memcpy(p, data, size); /* overflows when size > 4 */
        free(p);
    }
    return 0;
}
