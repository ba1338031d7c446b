/* libFuzzer driver for the safetensors reader: any bytes as a checkpoint file are refused with
 * a format error or give tensors that lie wholly inside the file's data area, without
 * overlapping, sized by their shape and dtype, each found again by its name. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "base/dtype.h"
#include "base/log.h"
#include "model/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_set(const st_set *set, const uint8_t *file, size_t size) {
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | file[i];
    size_t data_size = size - 8 - (size_t)hlen;
    size_t n = st_count(set);
    for (size_t i = 0; i < n; i++) {
        const st_tensor *t = st_at(set, i);
        if (!t || !t->name || !t->dtype_name || t->ndim < 0 || t->ndim > ST_MAX_DIMS) abort();
        if (st_find(set, t->name) != t) abort();
        /* offsets into the data area, which the mapping shows as the file's bytes */
        if (t->nbytes > data_size) abort();
        if (t->dtype >= 0 && (uint64_t)st_numel(t) * dt_size((dt_dtype)t->dtype) != t->nbytes)
            abort();
        for (size_t j = 0; j < i; j++) {
            const st_tensor *u = st_at(set, j);
            const char *a = t->data, *b = u->data;
            if (t->nbytes && u->nbytes && a < b + u->nbytes && b < a + t->nbytes) abort();
        }
        volatile uint8_t sum = 0; /* every byte readable (ASan checks the bounds) */
        for (size_t k = 0; k < t->nbytes; k++) sum ^= ((const uint8_t *)t->data)[k];
        (void)sum;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static int fd = -1;
    if (fd < 0) {
        log_set_level(LOG_LEVEL_ERROR + 1);
        fd = memfd_create("fuzz.safetensors", 0);
        if (fd < 0) abort();
    }
    if (ftruncate(fd, 0) || pwrite(fd, data, size, 0) != (ssize_t)size) abort();
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    st_set *set = NULL;
    duet_status st = st_open_file(path, &set);
    if (st == DUET_OK) {
        if (size < 8) abort();
        check_set(set, data, size);
        st_close(set);
    } else if (st != DUET_ERR_FORMAT && st != DUET_ERR_IO && st != DUET_ERR_INVALID) {
        abort();
    }
    return 0;
}
