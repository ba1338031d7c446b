/* A minimal test harness: CHECK() records a failure with file:line and goes on, so one run
 * shows every broken expectation; CHECK_DONE() ends main with the right exit status. */
#ifndef DUET_TEST_CHECK_H
#define DUET_TEST_CHECK_H

#include <math.h>
#include <stdio.h>

static int g_check_failures;
static int g_check_count;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        g_check_count++;                                                                           \
        if (!(cond)) {                                                                             \
            g_check_failures++;                                                                    \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);               \
        }                                                                                          \
    } while (0)

#define CHECK_MSG(cond, ...)                                                                       \
    do {                                                                                           \
        g_check_count++;                                                                           \
        if (!(cond)) {                                                                             \
            g_check_failures++;                                                                    \
            fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond);               \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
        }                                                                                          \
    } while (0)

#define CHECK_EQ_INT(a, b)                                                                         \
    CHECK_MSG((long long)(a) == (long long)(b), "%lld != %lld", (long long)(a), (long long)(b))

#define CHECK_NEAR(a, b, tol)                                                                      \
    CHECK_MSG(fabs((double)(a) - (double)(b)) <= (tol), "%.9g vs %.9g (tol %g)", (double)(a),      \
              (double)(b), (double)(tol))

#define CHECK_DONE()                                                                               \
    do {                                                                                           \
        fprintf(stderr, "%d checks, %d failed\n", g_check_count, g_check_failures);                \
        return g_check_failures ? 1 : 0;                                                           \
    } while (0)

#endif
