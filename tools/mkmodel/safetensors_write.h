/* Writes one safetensors file as a stream: every tensor is declared first (name, dtype, shape),
 * which fixes the header and all offsets; the data then follows in declaration order, in pieces
 * of any size, so a file of any size is written with constant memory. A writer belongs to one
 * thread. The reader side is safetensors.h. */
#ifndef DUET_SAFETENSORS_WRITE_H
#define DUET_SAFETENSORS_WRITE_H

#include <stddef.h>
#include <stdint.h>

#include "base/dtype.h"
#include "base/status.h"

typedef struct st_writer st_writer;

/* Creates (or truncates) path. metadata_value, when not NULL, is stored in "__metadata__" under
 * the key "generated_by" next to "format": "pt". */
duet_status st_writer_create(const char *path, const char *metadata_value, st_writer **w_p);
/* Declares the next tensor; shape has ndim (0..8) entries. name is copied. */
duet_status st_writer_declare(st_writer *w, const char *name, dt_dtype dtype, int ndim,
                              const int64_t *shape);
/* Writes the header. No declarations after this. */
duet_status st_writer_begin(st_writer *w);
/* Appends n bytes of tensor data (little-endian elements, tensors back to back in declaration
 * order). Writing more than was declared is refused. */
duet_status st_writer_write(st_writer *w, const void *data, size_t n);
/* Checks every declared byte was written, flushes and closes the file. */
duet_status st_writer_finish(st_writer *w);
/* Frees the writer; a file that was not finished is removed, so no half-written checkpoint is
 * left behind. Accepts NULL. */
void st_writer_destroy(st_writer *w);

/* Bytes of tensor data declared so far (the file is 8 + header + this). */
uint64_t st_writer_data_bytes(const st_writer *w);

#endif
