/* Whole-file reads and read-only mappings, with one clear error line naming the file.
 * Any thread. */
#ifndef DUET_FILEIO_H
#define DUET_FILEIO_H

#include <stddef.h>

#include "base/status.h"

/* Reads the file into a NUL-terminated heap buffer (*text_p, caller frees). Files larger than
 * max_bytes are refused. */
duet_status fio_read_text(const char *path, size_t max_bytes, char **text_p);

typedef struct fio_map {
    const void *data;
    size_t size;
} fio_map;

/* Maps a file read-only. An empty file maps to {NULL, 0}. */
duet_status fio_map_file(const char *path, fio_map *map_p);
void fio_unmap(fio_map *map);

/* Writes all of buf to path (created or truncated). */
duet_status fio_write_file(const char *path, const void *buf, size_t len);

#endif
