/* A planted heap-buffer-overflow: tests/sanitize/expect.sh runs it in the ASan+UBSan job and
 * fails the job unless AddressSanitizer reports it, so the job cannot silently stop catching. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The buffer escapes through it, so the compiler cannot elide the allocation or the read. */
static char *volatile g_escape;

int main(int argc, char **argv) {
    (void)argv;
    size_t n = 16 + (size_t)argc; /* not a constant: the compiler cannot prove the access */
    g_escape = malloc(n);
    if (!g_escape) return 2;
    memset(g_escape, 'x', n);
    char c = g_escape[n]; /* one past the end */
    printf("read %d\n", c);
    free(g_escape);
    return 0;
}
