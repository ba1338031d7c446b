/* Streaming safetensors writer; see safetensors_write.h. The header is padded with spaces to a
 * multiple of 8 bytes, as the Python and Rust writers do, so tensor data stays 8-byte aligned
 * when the file is memory-mapped. */
#include "safetensors_write.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "base/log.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; this writer copies host memory as it is"
#endif

#define ST_WRITE_MAX_DIMS 8

typedef struct st_decl {
    char *name;
    dt_dtype dtype;
    int ndim;
    int64_t shape[ST_WRITE_MAX_DIMS];
    uint64_t nbytes;
} st_decl;

struct st_writer {
    char *path;
    char *meta;
    FILE *f;
    st_decl *decls;
    size_t n_decls, cap_decls;
    uint64_t total, written;
    int begun, finished;
};

static char *xstrdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

duet_status st_writer_create(const char *path, const char *metadata_value, st_writer **w_p) {
    st_writer *w = calloc(1, sizeof *w);
    if (!w) return DUET_ERR_NO_MEMORY;
    w->path = xstrdup(path);
    w->meta = metadata_value ? xstrdup(metadata_value) : NULL;
    if (!w->path || (metadata_value && !w->meta)) {
        st_writer_destroy(w);
        return DUET_ERR_NO_MEMORY;
    }
    w->f = fopen(path, "wb");
    if (!w->f) {
        int e = errno;
        LOG_ERROR("%s: cannot create: %s", path, strerror(e));
        free(w->meta);
        free(w->path);
        free(w);
        return e == ENOENT ? DUET_ERR_NOT_FOUND : DUET_ERR_IO;
    }
    /* Tensors arrive in pieces of a few MB; a larger stdio buffer saves nothing. */
    setvbuf(w->f, NULL, _IOFBF, 1u << 20);
    *w_p = w;
    return DUET_OK;
}

duet_status st_writer_declare(st_writer *w, const char *name, dt_dtype dtype, int ndim,
                              const int64_t *shape) {
    if (w->begun) {
        LOG_ERROR("%s: tensor %s declared after the header was written", w->path, name);
        return DUET_ERR_INVALID;
    }
    if (ndim < 0 || ndim > ST_WRITE_MAX_DIMS || dt_size(dtype) == 0 || !name[0] ||
        !strcmp(name, "__metadata__")) {
        LOG_ERROR("%s: cannot declare tensor \"%s\" (%d dims, dtype %s)", w->path, name, ndim,
                  dt_name(dtype));
        return DUET_ERR_INVALID;
    }
    uint64_t n = dt_size(dtype);
    for (int i = 0; i < ndim; i++) {
        /* 2^53 keeps every offset exact in the JSON numbers readers parse as doubles */
        if (shape[i] < 0 || (shape[i] > 0 && n > (UINT64_C(1) << 53) / (uint64_t)shape[i])) {
            LOG_ERROR("%s: tensor %s has a bad or too large shape", w->path, name);
            return DUET_ERR_INVALID;
        }
        n *= (uint64_t)shape[i];
    }
    if (w->n_decls == w->cap_decls) {
        size_t cap = w->cap_decls ? w->cap_decls * 2 : 64;
        st_decl *d = realloc(w->decls, cap * sizeof *d);
        if (!d) return DUET_ERR_NO_MEMORY;
        w->decls = d;
        w->cap_decls = cap;
    }
    st_decl *d = &w->decls[w->n_decls];
    memset(d, 0, sizeof *d);
    d->name = xstrdup(name);
    if (!d->name) return DUET_ERR_NO_MEMORY;
    d->dtype = dtype;
    d->ndim = ndim;
    for (int i = 0; i < ndim; i++) d->shape[i] = shape[i];
    d->nbytes = n;
    w->total += n;
    w->n_decls++;
    return DUET_OK;
}

uint64_t st_writer_data_bytes(const st_writer *w) {
    return w->total;
}

static int cmp_name(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* A duplicate name would make the JSON object ambiguous; readers disagree on which one wins. */
static duet_status check_unique(st_writer *w) {
    if (w->n_decls < 2) return DUET_OK;
    char **names = malloc(w->n_decls * sizeof *names);
    if (!names) return DUET_ERR_NO_MEMORY;
    for (size_t i = 0; i < w->n_decls; i++) names[i] = w->decls[i].name;
    qsort(names, w->n_decls, sizeof *names, cmp_name);
    duet_status st = DUET_OK;
    for (size_t i = 1; i < w->n_decls && st == DUET_OK; i++) {
        if (!strcmp(names[i], names[i - 1])) {
            LOG_ERROR("%s: tensor %s declared twice", w->path, names[i]);
            st = DUET_ERR_INVALID;
        }
    }
    free(names);
    return st;
}

static duet_status write_bytes(st_writer *w, const void *p, size_t n) {
    if (n && fwrite(p, 1, n, w->f) != n) {
        LOG_ERROR("%s: write failed: %s", w->path, strerror(errno));
        return DUET_ERR_IO;
    }
    return DUET_OK;
}

/* {"__metadata__": {...}, name: {"dtype", "shape", "data_offsets"}, ...} */
static char *header_json(const st_writer *w) {
    cJSON *root = cJSON_CreateObject();
    cJSON *meta = cJSON_AddObjectToObject(root, "__metadata__");
    int ok = root && meta && cJSON_AddStringToObject(meta, "format", "pt");
    if (ok && w->meta) ok = cJSON_AddStringToObject(meta, "generated_by", w->meta) != NULL;
    uint64_t off = 0;
    for (size_t i = 0; ok && i < w->n_decls; i++) {
        const st_decl *d = &w->decls[i];
        cJSON *t = cJSON_AddObjectToObject(root, d->name);
        cJSON *shape = t ? cJSON_AddArrayToObject(t, "shape") : NULL;
        cJSON *offs = t ? cJSON_AddArrayToObject(t, "data_offsets") : NULL;
        ok = t && shape && offs && cJSON_AddStringToObject(t, "dtype", dt_name(d->dtype));
        for (int k = 0; ok && k < d->ndim; k++)
            ok = cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)d->shape[k]));
        ok = ok && cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)off)) &&
             cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(off + d->nbytes)));
        off += d->nbytes;
    }
    char *text = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    return text;
}

duet_status st_writer_begin(st_writer *w) {
    if (w->begun) return DUET_ERR_INVALID;
    duet_status st = check_unique(w);
    if (st != DUET_OK) return st;
    char *json = header_json(w);
    if (!json) return DUET_ERR_NO_MEMORY;
    size_t len = strlen(json), padded = (len + 7) & ~(size_t)7;
    unsigned char hl[8];
    for (int i = 0; i < 8; i++) hl[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    st = write_bytes(w, hl, sizeof hl);
    if (st == DUET_OK) st = write_bytes(w, json, len);
    static const char spaces[8] = "        ";
    if (st == DUET_OK) st = write_bytes(w, spaces, padded - len);
    cJSON_free(json);
    if (st == DUET_OK) w->begun = 1;
    return st;
}

duet_status st_writer_write(st_writer *w, const void *data, size_t n) {
    if (!w->begun || n > w->total - w->written) {
        LOG_ERROR("%s: %s", w->path,
                  w->begun ? "more tensor data than the header declares"
                           : "tensor data written before the header");
        return DUET_ERR_INVALID;
    }
    duet_status st = write_bytes(w, data, n);
    if (st == DUET_OK) w->written += n;
    return st;
}

duet_status st_writer_finish(st_writer *w) {
    if (!w->begun || w->written != w->total) {
        LOG_ERROR("%s: %llu of %llu bytes of tensor data were written", w->path,
                  (unsigned long long)w->written, (unsigned long long)w->total);
        return DUET_ERR_INVALID;
    }
    FILE *f = w->f;
    w->f = NULL;
    /* fclose reports a full disk that buffered writes did not see yet */
    if (fclose(f) != 0) {
        LOG_ERROR("%s: write failed: %s", w->path, strerror(errno));
        unlink(w->path);
        return DUET_ERR_IO;
    }
    w->finished = 1;
    return DUET_OK;
}

void st_writer_destroy(st_writer *w) {
    if (!w) return;
    if (w->f) fclose(w->f);
    if (!w->finished && w->path) unlink(w->path);
    for (size_t i = 0; i < w->n_decls; i++) free(w->decls[i].name);
    free(w->decls);
    free(w->meta);
    free(w->path);
    free(w);
}
