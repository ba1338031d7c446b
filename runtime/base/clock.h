/* Monotonic time for deadlines, timeouts and latency measurements (never wall-clock time,
 * which can jump). Any thread. */
#ifndef DUET_CLOCK_H
#define DUET_CLOCK_H

#include <time.h>

/* Seconds since an arbitrary fixed point. */
static inline double clock_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

#endif
