/* safetensors reader; see safetensors.h. Format: 8-byte little-endian header length N, N bytes
 * of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the
 * data area that the offsets index. */
#include "model/safetensors.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/fileio.h"
#include "base/hash.h"
#include "base/log.h"

/* A header larger than this is not a checkpoint we can trust (DeepSeek-V3 shards use ~100 KB). */
#define ST_MAX_HEADER (100u << 20)

typedef struct st_file {
    char *path;
    fio_map map;
} st_file;

struct st_set {
    st_file *files;
    size_t n_files;
    st_tensor *tensors;
    size_t n_tensors, cap_tensors;
    /* open-addressing name index over tensors */
    size_t *index;
    size_t index_cap;
};

static duet_status index_build(st_set *set) {
    size_t cap = 16;
    while (cap < set->n_tensors * 2) cap *= 2;
    set->index = malloc(cap * sizeof *set->index);
    if (!set->index) return DUET_ERR_NO_MEMORY;
    set->index_cap = cap;
    for (size_t i = 0; i < cap; i++) set->index[i] = SIZE_MAX;
    for (size_t i = 0; i < set->n_tensors; i++) {
        size_t h = hash_fnv1a_str(set->tensors[i].name) & (cap - 1);
        while (set->index[h] != SIZE_MAX) {
            if (!strcmp(set->tensors[set->index[h]].name, set->tensors[i].name)) {
                LOG_ERROR("%s: tensor %s appears twice (also in %s)", set->tensors[i].file,
                          set->tensors[i].name, set->tensors[set->index[h]].file);
                return DUET_ERR_FORMAT;
            }
            h = (h + 1) & (cap - 1);
        }
        set->index[h] = i;
    }
    return DUET_OK;
}

const st_tensor *st_find(const st_set *set, const char *name) {
    if (!set->index_cap) return NULL;
    size_t h = hash_fnv1a_str(name) & (set->index_cap - 1);
    while (set->index[h] != SIZE_MAX) {
        const st_tensor *t = &set->tensors[set->index[h]];
        if (!strcmp(t->name, name)) return t;
        h = (h + 1) & (set->index_cap - 1);
    }
    return NULL;
}

size_t st_count(const st_set *set) {
    return set->n_tensors;
}

const st_tensor *st_at(const st_set *set, size_t i) {
    return i < set->n_tensors ? &set->tensors[i] : NULL;
}

int64_t st_numel(const st_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

static void shape_str(char *buf, size_t len, int ndim, const int64_t *dims) {
    size_t o = (size_t)snprintf(buf, len, "[");
    for (int i = 0; i < ndim && o < len; i++)
        o += (size_t)snprintf(buf + o, len - o, "%s%lld", i ? ", " : "", (long long)dims[i]);
    if (o < len) snprintf(buf + o, len - o, "]");
}

duet_status st_expect_shape(const st_tensor *t, int ndim, const int64_t *dims) {
    int ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == dims[i];
    if (ok) return DUET_OK;
    char got[128], want[128];
    shape_str(got, sizeof got, t->ndim, t->shape);
    shape_str(want, sizeof want, ndim, dims);
    LOG_ERROR("%s: tensor %s has shape %s, expected %s from config.json", t->file, t->name, got,
              want);
    return DUET_ERR_FORMAT;
}

static char *xstrdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

static int cmp_by_begin(const void *a, const void *b) {
    const st_tensor *x = *(st_tensor *const *)a, *y = *(st_tensor *const *)b;
    const char *px = x->data, *py = y->data;
    return px < py ? -1 : px > py;
}

static duet_status push_tensor(st_set *set, const st_tensor *t) {
    if (set->n_tensors == set->cap_tensors) {
        size_t cap = set->cap_tensors ? set->cap_tensors * 2 : 256;
        st_tensor *n = realloc(set->tensors, cap * sizeof *n);
        if (!n) return DUET_ERR_NO_MEMORY;
        set->tensors = n;
        set->cap_tensors = cap;
    }
    set->tensors[set->n_tensors++] = *t;
    return DUET_OK;
}

/* A dimension or byte offset: a whole number in [0, 2^53) (JSON numbers are doubles). */
static int is_count(const cJSON *v) {
    return cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble < 9007199254740992.0 &&
           v->valuedouble == floor(v->valuedouble);
}

/* Parses and validates the header of the file just mapped as set->files[fi]. */
static duet_status parse_file(st_set *set, size_t fi) {
    const char *path = set->files[fi].path;
    const unsigned char *base = set->files[fi].map.data;
    size_t size = set->files[fi].map.size;
    if (size < 8) {
        LOG_ERROR("%s: truncated file: %zu bytes, shorter than the 8-byte header length", path,
                  size);
        return DUET_ERR_FORMAT;
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | base[i];
    if (hlen > size - 8) {
        LOG_ERROR("%s: header length %llu is beyond the end of the file (%zu bytes)", path,
                  (unsigned long long)hlen, size);
        return DUET_ERR_FORMAT;
    }
    if (hlen > ST_MAX_HEADER || hlen < 2) {
        LOG_ERROR("%s: header length %llu is not plausible", path, (unsigned long long)hlen);
        return DUET_ERR_FORMAT;
    }
    /* Only the padding (spaces) may follow the JSON object, as in the reference reader; text
     * after it means the length or the header is damaged. */
    const char *hend = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts((const char *)base + 8, (size_t)hlen, &hend, 0);
    while (root && hend < (const char *)base + 8 + hlen &&
           (*hend == ' ' || *hend == '\t' || *hend == '\n' || *hend == '\r'))
        hend++;
    if (!root || !cJSON_IsObject(root) || hend != (const char *)base + 8 + hlen) {
        LOG_ERROR("%s: malformed header JSON", path);
        cJSON_Delete(root);
        return DUET_ERR_FORMAT;
    }
    const unsigned char *data = base + 8 + hlen;
    size_t data_size = size - 8 - (size_t)hlen;
    size_t first = set->n_tensors;
    duet_status st = DUET_OK;
    const cJSON *e;
    cJSON_ArrayForEach(e, root) {
        if (!strcmp(e->string, "__metadata__")) continue;
        const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
        const cJSON *shape = cJSON_GetObjectItemCaseSensitive(e, "shape");
        const cJSON *offs = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
        if (!cJSON_IsObject(e) || !cJSON_IsString(dt) || !cJSON_IsArray(shape) ||
            !cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2) {
            LOG_ERROR("%s: malformed header entry for tensor %s", path, e->string);
            st = DUET_ERR_FORMAT;
            break;
        }
        st_tensor t = {0};
        t.file = path;
        t.dtype = dt_from_name(dt->valuestring);
        int ndim = cJSON_GetArraySize(shape);
        if (ndim > ST_MAX_DIMS) {
            LOG_ERROR("%s: tensor %s has %d dimensions, more than %d", path, e->string, ndim,
                      ST_MAX_DIMS);
            st = DUET_ERR_FORMAT;
            break;
        }
        t.ndim = ndim;
        double numel = 1;
        for (int i = 0; i < ndim; i++) {
            const cJSON *d = cJSON_GetArrayItem(shape, i);
            if (!is_count(d)) {
                st = DUET_ERR_FORMAT;
                break;
            }
            t.shape[i] = (int64_t)d->valuedouble;
            numel *= d->valuedouble;
        }
        const cJSON *b = cJSON_GetArrayItem(offs, 0), *en = cJSON_GetArrayItem(offs, 1);
        if (st != DUET_OK || !is_count(b) || !is_count(en) || en->valuedouble < b->valuedouble) {
            LOG_ERROR("%s: malformed shape or data_offsets for tensor %s", path, e->string);
            st = DUET_ERR_FORMAT;
            break;
        }
        double begin = b->valuedouble, end = en->valuedouble;
        if (end > (double)data_size) {
            LOG_ERROR("%s: tensor %s data_offsets [%.0f, %.0f] are out of range: the data area "
                      "holds %zu bytes (truncated file?)",
                      path, e->string, begin, end, data_size);
            st = DUET_ERR_FORMAT;
            break;
        }
        if (t.dtype >= 0 && (end - begin) != numel * (double)dt_size((dt_dtype)t.dtype)) {
            LOG_ERROR("%s: tensor %s spans %.0f bytes but its shape and dtype %s need %.0f", path,
                      e->string, end - begin, dt->valuestring,
                      numel * (double)dt_size((dt_dtype)t.dtype));
            st = DUET_ERR_FORMAT;
            break;
        }
        t.data = data + (size_t)begin;
        t.nbytes = (size_t)(end - begin);
        t.name = xstrdup(e->string);
        t.dtype_name = xstrdup(dt->valuestring);
        if (!t.name || !t.dtype_name || push_tensor(set, &t) != DUET_OK) {
            free((void *)t.name);
            free((void *)t.dtype_name);
            st = DUET_ERR_NO_MEMORY;
            break;
        }
    }
    cJSON_Delete(root);
    if (st != DUET_OK) return st;

    /* Tensors must not overlap: a writer bug or a crafted file could alias weights. */
    size_t n = set->n_tensors - first;
    st_tensor **sorted = malloc((n ? n : 1) * sizeof *sorted);
    if (!sorted) return DUET_ERR_NO_MEMORY;
    for (size_t i = 0; i < n; i++) sorted[i] = &set->tensors[first + i];
    qsort(sorted, n, sizeof *sorted, cmp_by_begin);
    for (size_t i = 1; i < n && st == DUET_OK; i++) {
        const char *prev_end = (const char *)sorted[i - 1]->data + sorted[i - 1]->nbytes;
        if ((const char *)sorted[i]->data < prev_end) {
            LOG_ERROR("%s: tensors %s and %s overlap", path, sorted[i - 1]->name, sorted[i]->name);
            st = DUET_ERR_FORMAT;
        }
    }
    free(sorted);
    return st;
}

static duet_status add_file(st_set *set, const char *path) {
    st_file *nf = realloc(set->files, (set->n_files + 1) * sizeof *nf);
    if (!nf) return DUET_ERR_NO_MEMORY;
    set->files = nf;
    st_file *f = &set->files[set->n_files];
    memset(f, 0, sizeof *f);
    f->path = xstrdup(path);
    if (!f->path) return DUET_ERR_NO_MEMORY;
    set->n_files++;
    duet_status st = fio_map_file(path, &f->map);
    if (st != DUET_OK) return st;
    return parse_file(set, set->n_files - 1);
}

void st_close(st_set *set) {
    if (!set) return;
    for (size_t i = 0; i < set->n_tensors; i++) {
        free((void *)set->tensors[i].name);
        free((void *)set->tensors[i].dtype_name);
    }
    for (size_t i = 0; i < set->n_files; i++) {
        fio_unmap(&set->files[i].map);
        free(set->files[i].path);
    }
    free(set->files);
    free(set->tensors);
    free(set->index);
    free(set);
}

duet_status st_open_file(const char *path, st_set **set_p) {
    st_set *set = calloc(1, sizeof *set);
    if (!set) return DUET_ERR_NO_MEMORY;
    duet_status st = add_file(set, path);
    if (st == DUET_OK) st = index_build(set);
    if (st != DUET_OK) {
        st_close(set);
        return st;
    }
    *set_p = set;
    return DUET_OK;
}

static int file_exists(const char *path) {
    FILE *f = fopen(path, "rb");
    if (f) fclose(f);
    return f != NULL;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Opens every shard named by the index and checks that each tensor lives where it says. */
static duet_status open_index(st_set *set, const char *dir, const char *index_path) {
    char *text = NULL;
    duet_status st = fio_read_text(index_path, 64u << 20, &text);
    if (st != DUET_OK) return st;
    cJSON *root = cJSON_Parse(text);
    free(text);
    const cJSON *wm = root ? cJSON_GetObjectItemCaseSensitive(root, "weight_map") : NULL;
    if (!cJSON_IsObject(wm)) {
        LOG_ERROR("%s: %s", index_path, root ? "no \"weight_map\" object" : "malformed JSON");
        cJSON_Delete(root);
        return DUET_ERR_FORMAT;
    }
    /* Distinct shard names, sorted so the open order is stable. */
    size_t n = 0, cap = (size_t)cJSON_GetArraySize(wm);
    char **names = calloc(cap ? cap : 1, sizeof *names);
    if (!names) {
        cJSON_Delete(root);
        return DUET_ERR_NO_MEMORY;
    }
    const cJSON *e;
    cJSON_ArrayForEach(e, wm) {
        if (!cJSON_IsString(e) || strchr(e->valuestring, '/') || e->valuestring[0] == '.') {
            LOG_ERROR("%s: weight_map entry for %s must be a plain file name in the same "
                      "directory",
                      index_path, e->string);
            st = DUET_ERR_FORMAT;
            break;
        }
        names[n++] = e->valuestring;
    }
    if (st == DUET_OK) qsort(names, n, sizeof *names, cmp_str);
    for (size_t i = 0; i < n && st == DUET_OK; i++) {
        if (i > 0 && !strcmp(names[i], names[i - 1])) continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        /* said here, where the index that names the shard is known */
        if (!file_exists(path)) {
            LOG_ERROR("%s: shard %s is missing from %s", index_path, names[i], dir);
            st = DUET_ERR_NOT_FOUND;
            break;
        }
        st = add_file(set, path);
    }
    if (st == DUET_OK) st = index_build(set);
    cJSON_ArrayForEach(e, wm) {
        if (st != DUET_OK) break;
        const st_tensor *t = st_find(set, e->string);
        const char *slash = t ? strrchr(t->file, '/') : NULL;
        if (!t) {
            LOG_ERROR("%s: tensor %s is listed in the index but missing from %s", index_path,
                      e->string, e->valuestring);
            st = DUET_ERR_FORMAT;
        } else if (strcmp(slash ? slash + 1 : t->file, e->valuestring) != 0) {
            LOG_ERROR("%s: tensor %s is listed in %s but found in %s", index_path, e->string,
                      e->valuestring, t->file);
            st = DUET_ERR_FORMAT;
        }
    }
    free(names);
    cJSON_Delete(root);
    return st;
}

duet_status st_open_dir(const char *dir, st_set **set_p) {
    st_set *set = calloc(1, sizeof *set);
    if (!set) return DUET_ERR_NO_MEMORY;
    char path[4096];
    duet_status st;
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    if (file_exists(path)) {
        st = open_index(set, dir, path);
    } else {
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        if (file_exists(path)) {
            st = add_file(set, path);
            if (st == DUET_OK) st = index_build(set);
        } else {
            /* No index and no single file: take every *.safetensors in the directory. */
            DIR *d = opendir(dir);
            st = DUET_ERR_NOT_FOUND;
            if (!d) {
                LOG_ERROR("%s: cannot open model directory", dir);
            } else {
                char **names = NULL;
                size_t n = 0;
                struct dirent *de;
                while ((de = readdir(d))) {
                    size_t l = strlen(de->d_name);
                    if (l > 12 && !strcmp(de->d_name + l - 12, ".safetensors")) {
                        char **nn = realloc(names, (n + 1) * sizeof *nn);
                        if (!nn) break;
                        names = nn;
                        names[n++] = xstrdup(de->d_name);
                    }
                }
                closedir(d);
                if (n) qsort(names, n, sizeof *names, cmp_str);
                st = n ? DUET_OK : DUET_ERR_NOT_FOUND;
                if (!n) LOG_ERROR("%s: no model.safetensors, index or *.safetensors file", dir);
                for (size_t i = 0; i < n && st == DUET_OK; i++) {
                    snprintf(path, sizeof path, "%s/%s", dir, names[i]);
                    st = add_file(set, path);
                }
                for (size_t i = 0; i < n; i++) free(names[i]);
                free(names);
                if (st == DUET_OK) st = index_build(set);
            }
        }
    }
    if (st != DUET_OK) {
        st_close(set);
        return st;
    }
    *set_p = set;
    return DUET_OK;
}
