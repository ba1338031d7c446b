/* Logging: one line per event on stderr, prefixed with the process tag ("prefill r1") and level.
 * Thread-safe (one write(2) per line). Errors are logged once, where first detected. */
#ifndef DUET_LOG_H
#define DUET_LOG_H

#include <stdarg.h>

typedef enum log_level {
    LOG_LEVEL_DEBUG = 0,
    LOG_LEVEL_INFO = 1,
    LOG_LEVEL_WARN = 2,
    LOG_LEVEL_ERROR = 3,
} log_level;

/* Not thread-safe: call at start-up. tag is copied. Level also from env
 * DUET_LOG=debug|info|warn|error. */
void log_set_tag(const char *tag);
void log_set_level(log_level level);
log_level log_get_level(void);

void log_write(log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void log_vwrite(log_level level, const char *fmt, va_list ap);

#define LOG_DEBUG(...)                                                                             \
    do {                                                                                           \
        if (log_get_level() <= LOG_LEVEL_DEBUG) log_write(LOG_LEVEL_DEBUG, __VA_ARGS__);           \
    } while (0)
#define LOG_INFO(...)  log_write(LOG_LEVEL_INFO, __VA_ARGS__)
#define LOG_WARN(...)  log_write(LOG_LEVEL_WARN, __VA_ARGS__)
#define LOG_ERROR(...) log_write(LOG_LEVEL_ERROR, __VA_ARGS__)

#endif
