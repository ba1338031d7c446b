/* Helpers for tests that work on files: a scratch directory, whole-file read/write, capturing
 * stderr (where log lines go) to check what a failure said, and rewriting a safetensors header
 * through cJSON to craft bad checkpoints from good ones. Header-only; one thread. */
#ifndef DUET_TEST_UTIL_H
#define DUET_TEST_UTIL_H

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "base/status.h"

/* A fresh directory under $TMPDIR (or /tmp); the caller frees the string. */
static inline char *tu_mkdtemp(const char *tag) {
    const char *base = getenv("TMPDIR");
    char *path = malloc(4096);
    if (!path) return NULL;
    snprintf(path, 4096, "%s/duet-%s-XXXXXX", base && base[0] ? base : "/tmp", tag);
    if (!mkdtemp(path)) {
        perror("mkdtemp");
        free(path);
        return NULL;
    }
    return path;
}

static inline int tu_rm_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static inline void tu_rmtree(const char *dir) {
    if (dir) nftw(dir, tu_rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

/* Reads a whole file (NUL-terminated for convenience); 0 on success. */
static inline int tu_read(const char *path, unsigned char **buf_p, size_t *len_p) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc((size_t)(n > 0 ? n : 0) + 1);
    if (!buf || (n > 0 && fread(buf, 1, (size_t)n, f) != (size_t)n)) {
        free(buf);
        fclose(f);
        return -1;
    }
    fclose(f);
    buf[n > 0 ? n : 0] = '\0';
    *buf_p = buf;
    *len_p = (size_t)(n > 0 ? n : 0);
    return 0;
}

static inline int tu_write(const char *path, const void *buf, size_t len) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    int ok = fwrite(buf, 1, len, f) == len;
    return fclose(f) == 0 && ok ? 0 : -1;
}

static inline int tu_write_str(const char *path, const char *s) {
    return tu_write(path, s, strlen(s));
}

static inline int tu_copy(const char *src, const char *dst) {
    unsigned char *b;
    size_t n;
    if (tu_read(src, &b, &n) != 0) return -1;
    int r = tu_write(dst, b, n);
    free(b);
    return r;
}

/* Copies every regular file of src into dst (created if missing). */
static inline int tu_copy_dir(const char *src, const char *dst) {
    if (mkdir(dst, 0755) != 0 && errno != EEXIST) return -1;
    DIR *d = opendir(src);
    if (!d) return -1;
    int r = 0;
    struct dirent *de;
    while (r == 0 && (de = readdir(d))) {
        char s[4096], t[4096];
        struct stat sb;
        snprintf(s, sizeof s, "%s/%s", src, de->d_name);
        snprintf(t, sizeof t, "%s/%s", dst, de->d_name);
        if (stat(s, &sb) == 0 && S_ISREG(sb.st_mode)) r = tu_copy(s, t);
    }
    closedir(d);
    return r;
}

/* stderr capture: log lines are write(2)s on fd 2, so fd 2 itself is redirected. */
static int g_tu_saved_fd = -1;
static char g_tu_cap_path[64];

static inline void tu_capture_begin(void) {
    fflush(stderr);
    snprintf(g_tu_cap_path, sizeof g_tu_cap_path, "/tmp/duet-capture-XXXXXX");
    int fd = mkstemp(g_tu_cap_path);
    if (fd < 0) return;
    g_tu_saved_fd = dup(2);
    dup2(fd, 2);
    close(fd);
}

/* Ends the capture; returns what was written (caller frees). */
static inline char *tu_capture_end(void) {
    fflush(stderr);
    if (g_tu_saved_fd < 0) return strdup("");
    dup2(g_tu_saved_fd, 2);
    close(g_tu_saved_fd);
    g_tu_saved_fd = -1;
    unsigned char *b = NULL;
    size_t n = 0;
    if (tu_read(g_tu_cap_path, &b, &n) != 0) b = (unsigned char *)strdup("");
    unlink(g_tu_cap_path);
    return (char *)b;
}

static inline int tu_count_lines(const char *s) {
    int n = 0;
    for (; *s; s++) n += *s == '\n';
    return n;
}

/* Rewrites a safetensors file: edit() changes the parsed header (a cJSON object), the data
 * area is copied unchanged after the new header. 0 on success. */
typedef void (*tu_header_edit)(cJSON *header, void *arg);

static inline int tu_st_rewrite(const char *src, const char *dst, tu_header_edit edit, void *arg) {
    unsigned char *b;
    size_t n;
    if (tu_read(src, &b, &n) != 0 || n < 8) return -1;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | b[i];
    cJSON *h = cJSON_ParseWithLength((const char *)b + 8, (size_t)hlen);
    if (!h) {
        free(b);
        return -1;
    }
    edit(h, arg);
    char *text = cJSON_PrintUnformatted(h);
    cJSON_Delete(h);
    size_t tl = strlen(text), pl = (tl + 7) & ~(size_t)7, dl = n - 8 - (size_t)hlen;
    unsigned char *out = malloc(8 + pl + dl);
    for (int i = 0; i < 8; i++) out[i] = (unsigned char)((uint64_t)pl >> (8 * i));
    memcpy(out + 8, text, tl);
    memset(out + 8 + tl, ' ', pl - tl);
    memcpy(out + 8 + pl, b + 8 + hlen, dl);
    int r = tu_write(dst, out, 8 + pl + dl);
    free(out);
    free(text);
    free(b);
    return r;
}

/* The failure is `want`, and the log holds exactly one error line containing every phrase. */
static inline void tu_check_failure(int line, duet_status st, duet_status want, char *log,
                                    const char *const *phrases) {
    CHECK_MSG(st == want, "line %d: status %d (%s), expected %d (%s); log: %s", line, st,
              duet_strerror(st), want, duet_strerror(want), log);
    CHECK_MSG(tu_count_lines(log) == 1 && strstr(log, " E "),
              "line %d: expected one error line, got: %s", line, log);
    for (int i = 0; phrases[i]; i++)
        CHECK_MSG(strstr(log, phrases[i]) != NULL, "line %d: log lacks \"%s\": %s", line,
                  phrases[i], log);
    printf("line %d: %s", line, log); /* the test log shows what a user would read */
    free(log);
}

/* EXPECT_FAIL(call, status, phrases...): runs call with stderr captured and checks that it
 * failed with status, logging one error line holding every phrase. */
#define EXPECT_FAIL(call, want, ...)                                                               \
    do {                                                                                           \
        tu_capture_begin();                                                                        \
        duet_status st_ = (call);                                                                  \
        char *log_ = tu_capture_end();                                                             \
        tu_check_failure(__LINE__, st_, want, log_, (const char *const[]){__VA_ARGS__, NULL});     \
    } while (0)

#endif
