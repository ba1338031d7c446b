/* File helpers; see fileio.h. */
#include "base/fileio.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/log.h"

static duet_status from_errno(int e) {
    switch (e) {
    case ENOENT:
        return DUET_ERR_NOT_FOUND;
    case ENOMEM:
        return DUET_ERR_NO_MEMORY;
    case EACCES:
    case EPERM:
        return DUET_ERR_AUTH;
    default:
        return DUET_ERR_IO;
    }
}

/* Opens path for reading and checks that it is a regular file; on success *fd_p is open and
 * *sb_p holds its stat. One error line on failure, nothing left open. */
static duet_status open_regular(const char *path, int *fd_p, struct stat *sb_p) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        LOG_ERROR("%s: cannot open: %s", path, strerror(e));
        return from_errno(e);
    }
    if (fstat(fd, sb_p) != 0 || !S_ISREG(sb_p->st_mode)) {
        LOG_ERROR("%s: not a regular file", path);
        close(fd);
        return DUET_ERR_IO;
    }
    *fd_p = fd;
    return DUET_OK;
}

duet_status fio_read_text(const char *path, size_t max_bytes, char **text_p) {
    int fd = -1;
    struct stat sb;
    duet_status st = open_regular(path, &fd, &sb);
    if (st != DUET_OK) return st;
    if ((size_t)sb.st_size > max_bytes) {
        LOG_ERROR("%s: file is %lld bytes, more than the %zu allowed", path, (long long)sb.st_size,
                  max_bytes);
        close(fd);
        return DUET_ERR_TOO_LONG;
    }
    char *buf = malloc((size_t)sb.st_size + 1);
    if (!buf) {
        close(fd);
        return DUET_ERR_NO_MEMORY;
    }
    size_t got = 0;
    while (got < (size_t)sb.st_size) {
        ssize_t r = read(fd, buf + got, (size_t)sb.st_size - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            LOG_ERROR("%s: read failed: %s", path, r < 0 ? strerror(errno) : "short file");
            free(buf);
            close(fd);
            return DUET_ERR_IO;
        }
        got += (size_t)r;
    }
    close(fd);
    buf[got] = '\0';
    *text_p = buf;
    return DUET_OK;
}

duet_status fio_map_file(const char *path, fio_map *map_p) {
    int fd = -1;
    struct stat sb;
    duet_status st = open_regular(path, &fd, &sb);
    if (st != DUET_OK) return st;
    fio_map m = {NULL, (size_t)sb.st_size};
    if (m.size > 0) {
        void *p = mmap(NULL, m.size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            int e = errno;
            LOG_ERROR("%s: mmap failed: %s", path, strerror(e));
            close(fd);
            return from_errno(e);
        }
        m.data = p;
    }
    close(fd);
    *map_p = m;
    return DUET_OK;
}

void fio_unmap(fio_map *map) {
    if (!map) return;
    if (map->data) munmap((void *)map->data, map->size);
    map->data = NULL;
    map->size = 0;
}

duet_status fio_write_file(const char *path, const void *buf, size_t len) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        int e = errno;
        LOG_ERROR("%s: cannot create: %s", path, strerror(e));
        return from_errno(e);
    }
    const char *p = buf;
    size_t left = len;
    while (left > 0) {
        ssize_t w = write(fd, p, left);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            LOG_ERROR("%s: write failed: %s", path, strerror(errno));
            close(fd);
            return DUET_ERR_IO;
        }
        p += w;
        left -= (size_t)w;
    }
    if (close(fd) != 0) {
        LOG_ERROR("%s: close failed: %s", path, strerror(errno));
        return DUET_ERR_IO;
    }
    return DUET_OK;
}
