/* Reads safetensors checkpoints: one file or shards listed by model.safetensors.index.json,
 * memory-mapped, every header validated before any tensor is handed out. A bad file fails with
 * one line naming the file and the problem. The set is read-only after open: any thread may
 * look tensors up; tensor data stays valid until st_close. */
#ifndef DUET_SAFETENSORS_H
#define DUET_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "base/dtype.h"
#include "base/status.h"

#define ST_MAX_DIMS 8

typedef struct st_tensor {
    const char *name;       /* owned by the set */
    const char *file;       /* path of the file holding it, for messages */
    int dtype;              /* a dt_dtype, or -1 when duet does not read this type */
    const char *dtype_name; /* as the header spells it */
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data; /* into the mapping */
    size_t nbytes;
} st_tensor;

typedef struct st_set st_set;

/* Opens dir/model.safetensors.index.json when present (all shards it names), else
 * dir/model.safetensors, else every *.safetensors file in dir. */
duet_status st_open_dir(const char *dir, st_set **set_p);
/* Opens one file. */
duet_status st_open_file(const char *path, st_set **set_p);
void st_close(st_set *set);

/* NULL when absent. */
const st_tensor *st_find(const st_set *set, const char *name);
size_t st_count(const st_set *set);
const st_tensor *st_at(const st_set *set, size_t i);
int64_t st_numel(const st_tensor *t);

/* Checks that t has the given dims (ndim entries), logging "FILE: tensor NAME has shape [..],
 * expected [..]" otherwise. */
duet_status st_expect_shape(const st_tensor *t, int ndim, const int64_t *dims);

#endif
