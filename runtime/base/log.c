/* Logging to stderr; see log.h. */
#include "base/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static char g_tag[64] = "duet";
static log_level g_level = LOG_LEVEL_INFO;
static int g_level_from_env;

static void level_from_env(void) {
    if (g_level_from_env) return;
    g_level_from_env = 1;
    const char *e = getenv("DUET_LOG");
    if (!e) return;
    if (!strcasecmp(e, "debug"))
        g_level = LOG_LEVEL_DEBUG;
    else if (!strcasecmp(e, "info"))
        g_level = LOG_LEVEL_INFO;
    else if (!strcasecmp(e, "warn"))
        g_level = LOG_LEVEL_WARN;
    else if (!strcasecmp(e, "error"))
        g_level = LOG_LEVEL_ERROR;
}

void log_set_tag(const char *tag) {
    snprintf(g_tag, sizeof g_tag, "%s", tag ? tag : "duet");
}

void log_set_level(log_level level) {
    g_level_from_env = 1;
    g_level = level;
}

log_level log_get_level(void) {
    level_from_env();
    return g_level;
}

void log_vwrite(log_level level, const char *fmt, va_list ap) {
    if (level < log_get_level()) return;
    static const char lv[] = "DIWE";
    char line[2048];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, sizeof line, "%02d:%02d:%02d.%03ld %s %c ", tm.tm_hour, tm.tm_min,
                     tm.tm_sec, ts.tv_nsec / 1000000, g_tag, lv[level & 3]);
    if (n < 0) return;
    int m = vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    if (m < 0) return;
    size_t len = (size_t)n + (size_t)m;
    if (len > sizeof line - 2) len = sizeof line - 2;
    line[len++] = '\n';
    /* One write per line so concurrent threads and ranks do not interleave mid-line. */
    ssize_t w = write(STDERR_FILENO, line, len);
    (void)w;
}

void log_write(log_level level, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    log_vwrite(level, fmt, ap);
    va_end(ap);
}
