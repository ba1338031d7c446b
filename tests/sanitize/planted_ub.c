/* Planted undefined behaviour (signed overflow, and arithmetic on a null pointer as the
 * sanitizers found in the engine): tests/sanitize/expect.sh fails the ASan+UBSan job unless
 * UBSan reports it and stops the program. */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    (void)argv;
    volatile int big = 0x7fffffff - 1 + argc; /* INT_MAX with no arguments */
    int sum = big + 1;
    printf("sum %d\n", sum);
    return 0;
}
