/* A planted heap-buffer-overflow: tests/sanitize/expect.sh runs it in the ASan+UBSan job and
 * fails the job unless AddressSanitizer reports it, so the job cannot silently stop catching. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    (void)argv;
    size_t n = 16 + (size_t)argc; /* not a constant: the compiler cannot prove the access */
    char *buf = malloc(n);
    if (!buf) return 2;
    memset(buf, 'x', n);
    volatile char c = buf[n]; /* one past the end */
    printf("read %d\n", c);
    free(buf);
    return 0;
}
