/* Loading a DeepSeek checkpoint onto a backend, sliced by the shard plan (see weights.h):
 * tensor names as Hugging Face stores them, FP8 e4m3 weights kept FP8 with their 128x128
 * weight_scale_inv blocks where the backend computes with them (be_ops.weight_create_fp8, the
 * slices memplan.h's mplan_fp8_resident allows), dequantized otherwise, every shape checked
 * against config.json. Dummy weights
 * (--load-format dummy) follow the same path with values from a hash of (name, row, col)
 * (model/dummy_rule.h), made by the backend itself where it has be_ops.weight_create_dummy.
 * Which slices to take is shard.c's decision, what to compute with them model.c's. Progress is
 * logged against totals the memory plan counts up front (memplan.h). */
#include "model/weights.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/clock.h"
#include "base/log.h"
#include "model/dummy_rule.h"
#include "model/memplan.h"
#include "model/safetensors.h"

/* Loading a big checkpoint takes minutes: a line every interval seconds (DUET_LOAD_PROGRESS_S,
 * default 5; 0 logs every tensor) with tensors and bytes done of this rank's totals, the rate
 * and the time left, and a last line with the whole time and rate. Bytes are what the backend
 * keeps: linear weights in its activation type, router gates and norms float32. */
typedef struct load_progress {
    long long tensors, bytes, total_tensors, total_bytes;
    double t0, last, interval;
} load_progress;

static void progress_start(load_progress *pr, const cfg_model *c, const mdl_plan *plan,
                           dt_dtype act) {
    memset(pr, 0, sizeof *pr);
    mplan_weights w;
    if (mplan_weights_count(c, plan, mplan_weight_format_auto(c, act), act, &w) == DUET_OK) {
        pr->total_tensors = w.tensors;
        pr->total_bytes = w.total;
    }
    const char *e = getenv("DUET_LOAD_PROGRESS_S");
    char *end = NULL;
    double v = e && *e ? strtod(e, &end) : -1.0;
    pr->interval = end && !*end && v >= 0.0 ? v : 5.0;
    pr->t0 = pr->last = clock_now_s();
    LOG_INFO("weights: loading %lld tensors, %.2f GiB on this rank", pr->total_tensors,
             (double)pr->total_bytes / (1 << 30));
}

/* A tensor (tensors 1) or a weight's bytes arrived on the backend. */
static void progress_add(load_progress *pr, long long tensors, long long bytes) {
    pr->tensors += tensors;
    pr->bytes += bytes;
    double now = clock_now_s();
    if (bytes == 0 || now - pr->last < pr->interval) return;
    pr->last = now;
    double dt = now - pr->t0, rate = dt > 0 ? (double)pr->bytes / dt : 0.0;
    double left = rate > 0 ? (double)(pr->total_bytes - pr->bytes) / rate : 0.0;
    LOG_INFO("weights: %lld of %lld tensors, %.2f of %.2f GiB (%.0f%%), %.2f GiB/s, %.0f s left",
             pr->tensors, pr->total_tensors, (double)pr->bytes / (1 << 30),
             (double)pr->total_bytes / (1 << 30),
             pr->total_bytes > 0 ? 100.0 * (double)pr->bytes / (double)pr->total_bytes : 100.0,
             rate / (1 << 30), left < 0 ? 0.0 : left);
}

static void progress_end(const load_progress *pr) {
    double dt = clock_now_s() - pr->t0;
    LOG_INFO("weights: loaded %lld tensors, %.2f GiB in %.1f s (%.2f GiB/s)", pr->tensors,
             (double)pr->bytes / (1 << 30), dt, dt > 0 ? (double)pr->bytes / dt / (1 << 30) : 0.0);
    /* the totals come from the memory plan's own walk: a difference means the two drifted */
    if (pr->tensors != pr->total_tensors || pr->bytes != pr->total_bytes)
        LOG_WARN("weights: the memory plan counted %lld tensors and %lld bytes, the loader "
                 "created %lld and %lld (model/memplan.c no longer mirrors weights.c)",
                 pr->total_tensors, pr->total_bytes, pr->tensors, pr->bytes);
}

typedef struct loader {
    const cfg_model *c;
    const char *dir;
    const mdl_plan *plan;
    st_set *st;
    mdl_weights_source source;
    uint64_t dummy_seed;
    be_backend *be;
    float *tmp; /* host staging for one slice */
    size_t tmp_cap;
    uint8_t *q; /* host staging of one FP8 weight and its scales */
    float *qs;
    size_t q_cap, qs_cap;
    bool fp8;      /* FP8 projections are offered to the backend as FP8 */
    bool fp8_plan; /* the memory plan counts them FP8 (else dequantized: progress does too) */
    load_progress prog;
} loader;

static float *tmp_get(loader *ld, size_t n) {
    if (n > ld->tmp_cap) {
        free(ld->tmp);
        ld->tmp = malloc(n * sizeof(float));
        ld->tmp_cap = ld->tmp ? n : 0;
    }
    return ld->tmp;
}

/* What a tensor's values are when no checkpoint is read (model/dummy_rule.h): norms are
 * ones, the router bias zero, everything else uniform with the config's usual 0.02 standard
 * deviation. Rows of a big tensor in parallel (big models' dummy weights would otherwise take
 * minutes on one core); backends with weight_create_dummy make them on the device instead. */
static void dummy_fill(loader *ld, const char *name, int full_in, int r0, int nrows, int c0,
                       int ncols, float *dst) {
    const dummy_slice s = dummy_slice_of(name, ld->dummy_seed, r0 + nrows, full_in, r0, c0);
#pragma omp parallel for schedule(static) if ((size_t)nrows * ncols > 65536)
    for (int i = 0; i < nrows; i++)
        for (int j = 0; j < ncols; j++) dst[(size_t)i * ncols + j] = dummy_at(&s, i, j);
}

/* ---- FP8 kept as FP8 ---- */

static int cdiv(int a, int b) {
    return (a + b - 1) / b;
}

/* Staging for an FP8 weight of n bytes and ns scales. */
static bool q_get(loader *ld, size_t n, size_t ns) {
    if (n > ld->q_cap) {
        free(ld->q);
        ld->q = malloc(n);
        ld->q_cap = ld->q ? n : 0;
    }
    if (ns > ld->qs_cap) {
        free(ld->qs);
        ld->qs = malloc(ns * sizeof(float));
        ld->qs_cap = ld->qs ? ns : 0;
    }
    return ld->q && ld->qs;
}

static duet_status load_slice(loader *ld, const char *name, int full_out, int full_in, int r0,
                              int nrows, int c0, int ncols, float *dst);

/* Rows [r0, r0 + nrows) and columns [c0, c0 + ncols) of FP8 tensor name ([full_out, full_in])
 * as e4m3 bytes q [nrows, ncols] and scales s [ceil(nrows / 128)][ceil(ncols / 128)], the
 * slice on block boundaries (mplan_fp8_resident). DUET_ERR_UNSUPPORTED, nothing logged: the
 * checkpoint stores this tensor in another type (the caller dequantizes). Dummy weights are
 * quantized with one scale for every block (their values are uniform in [-a, a]). */
static duet_status load_slice_fp8(loader *ld, const char *name, int full_out, int full_in, int r0,
                                  int nrows, int c0, int ncols, uint8_t *q, float *s) {
    int rb = cdiv(nrows, 128), cb = cdiv(ncols, 128);
    if (ld->source == MDL_WEIGHTS_DUMMY) {
        float *buf = tmp_get(ld, (size_t)nrows * ncols);
        if (!buf) return DUET_ERR_NO_MEMORY;
        duet_status st = load_slice(ld, name, full_out, full_in, r0, nrows, c0, ncols, buf);
        if (st != DUET_OK) return st;
        const float scale = dummy_fp8_scale(), inv = dummy_fp8_inv();
        for (int i = 0; i < rb * cb; i++) s[i] = scale;
#pragma omp parallel for schedule(static) if ((size_t)nrows * ncols > 65536)
        for (int i = 0; i < nrows; i++)
            for (int j = 0; j < ncols; j++)
                q[(size_t)i * ncols + j] = dummy_e4m3(buf[(size_t)i * ncols + j] * inv);
        return DUET_OK;
    }
    const st_tensor *t = st_find(ld->st, name);
    if (!t || t->dtype != DT_F8_E4M3 || r0 + nrows > full_out) return DUET_ERR_UNSUPPORTED;
    int64_t dims[2] = {full_out, full_in};
    duet_status st = st_expect_shape(t, 2, dims);
    if (st != DUET_OK) return st;
    char sname[512];
    snprintf(sname, sizeof sname, "%s_scale_inv", name);
    const st_tensor *sc = st_find(ld->st, sname);
    if (!sc) {
        LOG_ERROR("%s: tensor %s is F8_E4M3 but %s is missing", t->file, name, sname);
        return DUET_ERR_NOT_FOUND;
    }
    int64_t sd[2] = {cdiv(full_out, 128), cdiv(full_in, 128)};
    st = st_expect_shape(sc, 2, sd);
    if (st != DUET_OK) return st;
    if (sc->dtype != DT_F32 && sc->dtype != DT_BF16 && sc->dtype != DT_F16) {
        LOG_ERROR("%s: scale tensor %s has dtype %s (a float type is needed)", sc->file, sname,
                  sc->dtype_name);
        return DUET_ERR_FORMAT;
    }
    for (int i = 0; i < nrows; i++)
        memcpy(q + (size_t)i * ncols,
               (const uint8_t *)t->data + (size_t)(r0 + i) * (size_t)full_in + (size_t)c0,
               (size_t)ncols);
    size_t ses = dt_size((dt_dtype)sc->dtype);
    for (int i = 0; i < rb; i++)
        dt_to_f32((dt_dtype)sc->dtype,
                  (const unsigned char *)sc->data +
                      ((size_t)(r0 / 128 + i) * (size_t)sd[1] + (size_t)(c0 / 128)) * ses,
                  s + (size_t)i * cb, (size_t)cb);
    for (int i = 0; i < rb * cb; i++)
        if (!(s[i] > 0.0f) || !isfinite(s[i])) {
            LOG_ERROR("%s: %s holds a scale that is not a positive finite number (%g)", sc->file,
                      sname, s[i]);
            return DUET_ERR_FORMAT;
        }
    return DUET_OK;
}

/* Dummy weights the backend makes itself (be_ops.weight_create_dummy): no host values, no
 * copy; the same bits as the host fill and upload (model/dummy_rule.h). */
static bool dev_dummy(const loader *ld) {
    return ld->source == MDL_WEIGHTS_DUMMY && ld->be->ops->weight_create_dummy != NULL;
}

/* parts (1, or 2: gate and up) tensors names[p], rows [r0, r0 + nrows) and columns [c0, c0 +
 * ncols) of each, as one weight made by the backend from the dummy rule (not FP8) */
static duet_status dummy_weight(loader *ld, const char *const names[2], int parts, int full_out,
                                int full_in, int r0, int nrows, int c0, int ncols, bool keep_f32,
                                be_weight **w_p) {
    dummy_slice s[2];
    for (int p = 0; p < parts; p++)
        s[p] = dummy_slice_of(names[p], ld->dummy_seed, full_out, full_in, r0, c0);
    progress_add(&ld->prog, parts, 0);
    duet_status st =
        ld->be->ops->weight_create_dummy(ld->be, s, parts, nrows, ncols, keep_f32, false, w_p);
    size_t es = keep_f32 ? sizeof(float) : dt_size(ld->be->ops->act_dtype);
    if (st == DUET_OK) progress_add(&ld->prog, 0, (long long)parts * nrows * ncols * (long long)es);
    return st;
}

/* One or two parts (gate and up) of FP8 rows, then the backend's FP8 weight. *done false:
 * the checkpoint or the backend said no, nothing was created, the caller dequantizes. */
static duet_status load_fp8_parts(loader *ld, const char *const names[2], int full_out, int full_in,
                                  int r0, int nrows, int c0, int ncols, int parts, be_weight **w_p,
                                  bool *done) {
    *done = false;
    if (!ld->fp8 || !mplan_fp8_resident(ld->c, r0, c0, ncols)) return DUET_OK;
    size_t cb = (size_t)cdiv(ncols, 128), rb = (size_t)cdiv(nrows, 128);
    long long n = (long long)parts * nrows * ncols;
    long long bytes = ld->fp8_plan ? n + 4LL * parts * (long long)(rb * cb)
                                   : n * (long long)dt_size(ld->be->ops->act_dtype);
    if (dev_dummy(ld)) {
        dummy_slice s[2];
        for (int p = 0; p < parts; p++)
            s[p] = dummy_slice_of(names[p], ld->dummy_seed, full_out, full_in, r0, c0);
        duet_status st =
            ld->be->ops->weight_create_dummy(ld->be, s, parts, nrows, ncols, false, true, w_p);
        if (st == DUET_ERR_UNSUPPORTED) ld->fp8 = false; /* as for weight_create_fp8 below */
        if (st != DUET_OK) return st == DUET_ERR_UNSUPPORTED ? DUET_OK : st;
        *done = true;
        progress_add(&ld->prog, parts, 0);
        progress_add(&ld->prog, 0, bytes);
        return DUET_OK;
    }
    if (!q_get(ld, (size_t)parts * nrows * ncols, parts * rb * cb)) return DUET_ERR_NO_MEMORY;
    for (int p = 0; p < parts; p++) {
        duet_status st =
            load_slice_fp8(ld, names[p], full_out, full_in, r0, nrows, c0, ncols,
                           ld->q + (size_t)p * nrows * ncols, ld->qs + (size_t)p * rb * cb);
        if (st == DUET_ERR_UNSUPPORTED) return DUET_OK;
        if (st != DUET_OK) return st;
    }
    duet_status st =
        ld->be->ops->weight_create_fp8(ld->be, ld->q, ld->qs, parts * nrows, ncols, nrows, w_p);
    if (st == DUET_ERR_UNSUPPORTED) {
        ld->fp8 = false; /* this backend takes none: dequantize from here on */
        /* dummy parts went through load_slice, which counted them; the caller loads again */
        if (ld->source == MDL_WEIGHTS_DUMMY) ld->prog.tensors -= parts;
        return DUET_OK;
    }
    if (st != DUET_OK) return st;
    *done = true;
    if (ld->source != MDL_WEIGHTS_DUMMY) progress_add(&ld->prog, parts, 0); /* dummy: counted */
    progress_add(&ld->prog, 0, bytes);
    return DUET_OK;
}

static const char *display_dir(const loader *ld) {
    return ld->dir;
}

/* Fills dst [nrows, ncols] with rows [r0, r0 + nrows) and columns [c0, c0 + ncols) of tensor
 * name, whose shape config.json says is [full_out, full_in] ([full_out] when full_in == 0).
 * Rows at or beyond full_out read as zero (padding of a vocabulary split over TP). */
static duet_status load_slice(loader *ld, const char *name, int full_out, int full_in, int r0,
                              int nrows, int c0, int ncols, float *dst) {
    progress_add(&ld->prog, 1, 0);
    int real_rows = r0 >= full_out ? 0 : (r0 + nrows > full_out ? full_out - r0 : nrows);
    memset(dst + (size_t)real_rows * ncols, 0, (size_t)(nrows - real_rows) * ncols * sizeof(float));
    if (ld->source == MDL_WEIGHTS_DUMMY) {
        dummy_fill(ld, name, full_in, r0, real_rows, c0, ncols, dst);
        return DUET_OK;
    }
    const st_tensor *t = st_find(ld->st, name);
    if (!t) {
        LOG_ERROR("%s: missing tensor %s", display_dir(ld), name);
        return DUET_ERR_NOT_FOUND;
    }
    if (t->dtype < 0 || t->dtype == DT_I32 || t->dtype == DT_I64) {
        LOG_ERROR("%s: tensor %s has dtype %s, which duet does not read (BF16, F16, F32, "
                  "F8_E4M3 are read)",
                  t->file, name, t->dtype_name);
        return DUET_ERR_UNSUPPORTED;
    }
    int64_t dims[2] = {full_out, full_in};
    duet_status st = st_expect_shape(t, full_in ? 2 : 1, dims);
    if (st != DUET_OK) return st;
    int cols = full_in ? full_in : 1;
    size_t es = dt_size((dt_dtype)t->dtype);
    for (int i = 0; i < real_rows; i++) {
        const unsigned char *src =
            (const unsigned char *)t->data + ((size_t)(r0 + i) * (size_t)cols + (size_t)c0) * es;
        dt_to_f32((dt_dtype)t->dtype, src, dst + (size_t)i * ncols, (size_t)ncols);
    }
    if (t->dtype != DT_F8_E4M3) return DUET_OK;

    /* FP8: dequantized = fp8 * scale_inv[row / bo][col / bi] */
    char sname[512];
    snprintf(sname, sizeof sname, "%s_scale_inv", name);
    const st_tensor *s = st_find(ld->st, sname);
    if (!s) {
        LOG_ERROR("%s: tensor %s is F8_E4M3 but %s is missing", t->file, name, sname);
        return DUET_ERR_NOT_FOUND;
    }
    int bo = ld->c->fp8 ? ld->c->fp8_block[0] : 128, bi = ld->c->fp8 ? ld->c->fp8_block[1] : 128;
    int64_t sd[2] = {(full_out + bo - 1) / bo, (cols + bi - 1) / bi};
    st = st_expect_shape(s, full_in ? 2 : 1, sd);
    if (st != DUET_OK) return st;
    if (s->dtype != DT_F32 && s->dtype != DT_BF16 && s->dtype != DT_F16) {
        LOG_ERROR("%s: scale tensor %s has dtype %s (a float type is needed)", s->file, sname,
                  s->dtype_name);
        return DUET_ERR_FORMAT;
    }
    /* one row of block scales at a time, converted once, not once per element */
    size_t ses = dt_size((dt_dtype)s->dtype);
    float *srow = malloc((size_t)sd[1] * sizeof(float));
    if (!srow) return DUET_ERR_NO_MEMORY;
    int cur = -1;
    for (int i = 0; i < real_rows; i++) {
        int br = (r0 + i) / bo;
        if (br != cur) {
            dt_to_f32((dt_dtype)s->dtype, (const unsigned char *)s->data + (size_t)br * sd[1] * ses,
                      srow, (size_t)sd[1]);
            cur = br;
        }
        float *row = dst + (size_t)i * ncols;
        for (int j = 0; j < ncols; j++) row[j] *= srow[(c0 + j) / bi];
    }
    free(srow);
    return DUET_OK;
}

static duet_status upload_weight(loader *ld, const float *w, int n_out, int n_in, bool keep_f32,
                                 be_weight **w_p) {
    duet_status st = ld->be->ops->weight_create(ld->be, w, n_out, n_in, keep_f32, w_p);
    size_t es = keep_f32 ? sizeof(float) : dt_size(ld->be->ops->act_dtype);
    if (st == DUET_OK) progress_add(&ld->prog, 0, (long long)n_out * n_in * (long long)es);
    return st;
}

/* A whole or row/col-sliced linear weight onto the backend; fp8: a projection an FP8
 * checkpoint may store as e4m3, kept so where it can be. */
static duet_status load_linear_as(loader *ld, const char *name, int full_out, int full_in, int r0,
                                  int nrows, int c0, int ncols, bool keep_f32, bool fp8,
                                  be_weight **w_p) {
    if (fp8) {
        const char *names[2] = {name, NULL};
        bool done;
        duet_status st =
            load_fp8_parts(ld, names, full_out, full_in, r0, nrows, c0, ncols, 1, w_p, &done);
        if (st != DUET_OK || done) return st;
    }
    if (dev_dummy(ld)) {
        const char *names[2] = {name, NULL};
        return dummy_weight(ld, names, 1, full_out, full_in, r0, nrows, c0, ncols, keep_f32, w_p);
    }
    float *buf = tmp_get(ld, (size_t)nrows * ncols);
    if (!buf) return DUET_ERR_NO_MEMORY;
    duet_status st = load_slice(ld, name, full_out, full_in, r0, nrows, c0, ncols, buf);
    if (st != DUET_OK) return st;
    return upload_weight(ld, buf, nrows, ncols, keep_f32, w_p);
}

/* A projection of a layer (FP8 where the checkpoint and backend allow). */
static duet_status load_linear(loader *ld, const char *name, int full_out, int full_in, int r0,
                               int nrows, int c0, int ncols, bool keep_f32, be_weight **w_p) {
    return load_linear_as(ld, name, full_out, full_in, r0, nrows, c0, ncols, keep_f32, !keep_f32,
                          w_p);
}

static duet_status load_vec(loader *ld, const char *name, int n, void **dev_p) {
    if (dev_dummy(ld) && ld->be->ops->vec_create_dummy) {
        const dummy_slice s = dummy_slice_of(name, ld->dummy_seed, n, 0, 0, 0);
        progress_add(&ld->prog, 1, 0);
        duet_status st = ld->be->ops->vec_create_dummy(ld->be, &s, n, dev_p);
        if (st == DUET_OK) progress_add(&ld->prog, 0, (long long)n * (long long)sizeof(float));
        return st;
    }
    float *buf = tmp_get(ld, (size_t)n);
    if (!buf) return DUET_ERR_NO_MEMORY;
    duet_status st = load_slice(ld, name, n, 0, 0, n, 0, 1, buf);
    if (st == DUET_OK) st = ld->be->ops->vec_create(ld->be, buf, n, dev_p);
    if (st == DUET_OK) progress_add(&ld->prog, 0, (long long)n * (long long)sizeof(float));
    return st;
}

/* prefix.gate_proj / up_proj rows [i0, i0 + n) fused as gate_up [2n, D]; down_proj columns
 * [i0, i0 + n) as down [D, n]. full_i is the unsplit intermediate width. */
/* fp8: the layer's rule lets this MLP stay FP8 (memplan.h: whole MLPs, a MoE layer's experts
 * all together); otherwise both weights are dequantized */
static duet_status load_ffn(loader *ld, const char *prefix, int full_i, int i0, int n, bool fp8,
                            be_ffn *f) {
    int D = ld->c->hidden_size;
    char name[512];
    f->n_inter = n;
    if (fp8) {
        char gname[512], uname[512];
        snprintf(gname, sizeof gname, "%s.gate_proj.weight", prefix);
        snprintf(uname, sizeof uname, "%s.up_proj.weight", prefix);
        const char *names[2] = {gname, uname};
        bool done;
        duet_status st = load_fp8_parts(ld, names, full_i, D, i0, n, 0, D, 2, &f->gate_up, &done);
        if (st != DUET_OK) return st;
        if (done) {
            snprintf(name, sizeof name, "%s.down_proj.weight", prefix);
            return load_linear(ld, name, D, full_i, 0, D, i0, n, false, &f->down);
        }
    }
    if (dev_dummy(ld)) {
        char gname[512], uname[512];
        snprintf(gname, sizeof gname, "%s.gate_proj.weight", prefix);
        snprintf(uname, sizeof uname, "%s.up_proj.weight", prefix);
        const char *names[2] = {gname, uname};
        duet_status st = dummy_weight(ld, names, 2, full_i, D, i0, n, 0, D, false, &f->gate_up);
        snprintf(name, sizeof name, "%s.down_proj.weight", prefix);
        if (st == DUET_OK)
            st = load_linear_as(ld, name, D, full_i, 0, D, i0, n, false, false, &f->down);
        return st;
    }
    float *buf = tmp_get(ld, (size_t)2 * n * D > (size_t)D * n ? (size_t)2 * n * D : (size_t)D * n);
    if (!buf) return DUET_ERR_NO_MEMORY;
    snprintf(name, sizeof name, "%s.gate_proj.weight", prefix);
    duet_status st = load_slice(ld, name, full_i, D, i0, n, 0, D, buf);
    snprintf(name, sizeof name, "%s.up_proj.weight", prefix);
    if (st == DUET_OK) st = load_slice(ld, name, full_i, D, i0, n, 0, D, buf + (size_t)n * D);
    if (st == DUET_OK) st = upload_weight(ld, buf, 2 * n, D, false, &f->gate_up);
    snprintf(name, sizeof name, "%s.down_proj.weight", prefix);
    if (st == DUET_OK)
        st = load_linear_as(ld, name, D, full_i, 0, D, i0, n, false, false, &f->down);
    return st;
}

/* Decoder layer l of the checkpoint into ly; moe: whether its MLP is the experts'. */
static duet_status load_layer(loader *ld, mdl_layer *ly, int l, bool moe) {
    const cfg_model *c = ld->c;
    const mdl_plan *pl = ld->plan;
    int D = c->hidden_size, L = c->kv_lora_rank, R = c->qk_rope_head_dim;
    int qk = cfg_qk_head_dim(c), nv = c->qk_nope_head_dim + c->v_head_dim;
    int H = c->num_attention_heads, Hl = pl->n_heads_local, h0 = pl->shard.tp_rank * Hl;
    char p[256], n[512];
    snprintf(p, sizeof p, "model.layers.%d", l);
    duet_status st;

#define NAME(suffix) (snprintf(n, sizeof n, "%s.%s", p, suffix), n)
    st = load_vec(ld, NAME("input_layernorm.weight"), D, &ly->attn_norm);
    if (st == DUET_OK) st = load_vec(ld, NAME("post_attention_layernorm.weight"), D, &ly->ffn_norm);
    if (st == DUET_OK && c->q_lora_rank) {
        int q = c->q_lora_rank;
        st = load_linear(ld, NAME("self_attn.q_a_proj.weight"), q, D, 0, q, 0, D, false, &ly->q_a);
        if (st == DUET_OK)
            st = load_vec(ld, NAME("self_attn.q_a_layernorm.weight"), q, &ly->q_a_norm);
        if (st == DUET_OK)
            st = load_linear(ld, NAME("self_attn.q_b_proj.weight"), H * qk, q, h0 * qk, Hl * qk, 0,
                             q, false, &ly->q_b);
    } else if (st == DUET_OK) {
        st = load_linear(ld, NAME("self_attn.q_proj.weight"), H * qk, D, h0 * qk, Hl * qk, 0, D,
                         false, &ly->q);
    }
    if (st == DUET_OK)
        st = load_linear(ld, NAME("self_attn.kv_a_proj_with_mqa.weight"), L + R, D, 0, L + R, 0, D,
                         false, &ly->kv_a);
    if (st == DUET_OK)
        st = load_vec(ld, NAME("self_attn.kv_a_layernorm.weight"), L, &ly->kv_a_norm);
    if (st == DUET_OK)
        st = load_linear_as(ld, NAME("self_attn.kv_b_proj.weight"), H * nv, L, h0 * nv, Hl * nv, 0,
                            L, false, false, &ly->kv_b); /* MLA reads it as bf16 */
    if (st == DUET_OK)
        st = load_linear(ld, NAME("self_attn.o_proj.weight"), D, H * c->v_head_dim, 0, D,
                         h0 * c->v_head_dim, Hl * c->v_head_dim, false, &ly->o);
    if (st != DUET_OK) return st;

    ly->moe = moe;
    if (!ly->moe) {
        int i0 = pl->shard.tp_rank * pl->inter_local;
        return load_ffn(ld, NAME("mlp"), c->intermediate_size, i0, pl->inter_local,
                        mplan_fp8_ffn_resident(c, i0, pl->inter_local), &ly->dense);
    }
    int E = c->n_routed_experts;
    st = load_linear(ld, NAME("mlp.gate.weight"), E, D, 0, E, 0, D, true, &ly->gate);
    if (st == DUET_OK && c->topk_method == CFG_TOPK_NOAUX_TC)
        st = load_vec(ld, NAME("mlp.gate.e_score_correction_bias"), E, &ly->gate_bias);
    if (st != DUET_OK) return st;
    const bool moe_fp8 = mplan_fp8_moe_resident(c, pl);
    ly->experts = calloc((size_t)pl->n_local_experts, sizeof *ly->experts);
    if (!ly->experts) return DUET_ERR_NO_MEMORY;
    /* without EP every rank holds every expert, its intermediate split over TP */
    int ei0 = pl->shard.ep_size > 1 ? 0 : pl->shard.tp_rank * pl->expert_inter_local;
    for (int e = 0; e < pl->n_local_experts && st == DUET_OK; e++) {
        char ep[300];
        snprintf(ep, sizeof ep, "%s.mlp.experts.%d", p, pl->expert0 + e);
        st = load_ffn(ld, ep, c->moe_intermediate_size, ei0, pl->expert_inter_local, moe_fp8,
                      &ly->experts[e]);
    }
    if (st == DUET_OK && c->n_shared_experts > 0)
        st =
            load_ffn(ld, NAME("mlp.shared_experts"), c->n_shared_experts * c->moe_intermediate_size,
                     pl->shard.tp_rank * pl->shared_inter_local, pl->shared_inter_local, moe_fp8,
                     &ly->shared);
#undef NAME
    return st;
}

/* Tensors of layers past num_hidden_layers are DeepSeek-V3's multi-token-prediction module,
 * loaded apart (mdl_weights_load_mtp) when speculative decoding asks for it. */
static void note_skipped_layers(const loader *ld) {
    if (!ld->st) return;
    size_t n = 0;
    int lo = -1, hi = -1;
    for (size_t i = 0; i < st_count(ld->st); i++) {
        int layer;
        if (sscanf(st_at(ld->st, i)->name, "model.layers.%d.", &layer) == 1 &&
            layer >= ld->c->num_hidden_layers) {
            n++;
            lo = lo < 0 || layer < lo ? layer : lo;
            hi = layer > hi ? layer : hi;
        }
    }
    if (n)
        LOG_INFO("%s: skipping %zu tensors of layers %d..%d (beyond num_hidden_layers %d: MTP)",
                 ld->dir, n, lo, hi, ld->c->num_hidden_layers);
}

duet_status mdl_weights_load(const char *dir, const cfg_model *c, const mdl_plan *plan,
                             be_backend *be, mdl_weights_source source, uint64_t dummy_seed,
                             mdl_weights **w_p) {
    mdl_weights *w = calloc(1, sizeof *w);
    if (!w) return DUET_ERR_NO_MEMORY;
    w->be = be;
    w->n_local_experts = plan->n_local_experts;
    loader ld = {
        .c = c, .dir = dir, .plan = plan, .source = source, .dummy_seed = dummy_seed, .be = be};
    duet_status st = DUET_OK;
    if (source == MDL_WEIGHTS_CHECKPOINT) st = st_open_dir(dir, &ld.st);
    if (st == DUET_OK) note_skipped_layers(&ld);
    if (st == DUET_OK) progress_start(&ld.prog, c, plan, be->ops->act_dtype);
    /* offered where the backend has the op; the first refusal (CUDA with float32 activations,
     * the CPU backend unless it emulates the FP8 prefill GEMMs) ends the offers */
    ld.fp8 = be->ops->weight_create_fp8 != NULL && c->fp8;
    ld.fp8_plan = mplan_weight_format_auto(c, be->ops->act_dtype) == MPLAN_WEIGHTS_FP8;

    int D = c->hidden_size, V = c->vocab_size;
    if (st == DUET_OK)
        st = load_linear_as(&ld, "model.embed_tokens.weight", V, D, plan->vocab0, plan->vocab_local,
                            0, D, false, false, &w->embed);
    if (st == DUET_OK)
        st = load_linear_as(&ld,
                            c->tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight",
                            V, D, plan->vocab0, plan->vocab_local, 0, D, false, false, &w->lm_head);
    if (st == DUET_OK) st = load_vec(&ld, "model.norm.weight", D, &w->final_norm);
    if (st == DUET_OK) {
        w->layers = calloc((size_t)c->num_hidden_layers, sizeof *w->layers);
        if (!w->layers) st = DUET_ERR_NO_MEMORY;
        w->n_layers = w->layers ? c->num_hidden_layers : 0;
    }
    for (int l = 0; st == DUET_OK && l < c->num_hidden_layers; l++)
        st = load_layer(&ld, &w->layers[l], l, cfg_layer_is_moe(c, l));
    /* weights the backend made itself may still be in its queue: the time and rate logged
     * are of weights that are there */
    if (st == DUET_OK && dev_dummy(&ld) && be->ops->sync) st = be->ops->sync(be);
    if (st == DUET_OK) progress_end(&ld.prog);
    free(ld.tmp);
    free(ld.q);
    free(ld.qs);
    st_close(ld.st);
    if (st != DUET_OK) {
        mdl_weights_destroy(w);
        return st;
    }
    *w_p = w;
    return DUET_OK;
}

/* The MTP module: layer num_hidden_layers as DeepSeek-V3 stores it (its own embedding and
 * head copies, enorm, hnorm, eh_proj, shared_head.norm around one decoder layer, which has
 * experts whenever the model has them, as in DeepSeek's files and duet-mkmodel's). */
duet_status mdl_weights_load_mtp(const char *dir, const cfg_model *c, const mdl_plan *plan,
                                 mdl_weights_source source, uint64_t dummy_seed, mdl_weights *w) {
    if (c->num_nextn_predict_layers < 1) {
        LOG_ERROR("%s/config.json: the checkpoint has no MTP layer (num_nextn_predict_layers is "
                  "0): MTP speculative decoding needs one; leave --speculative-config out",
                  dir);
        return DUET_ERR_UNSUPPORTED;
    }
    if (w->mtp) return DUET_ERR_INVALID;
    mdl_mtp *t = calloc(1, sizeof *t);
    if (!t) return DUET_ERR_NO_MEMORY;
    loader ld = {
        .c = c, .dir = dir, .plan = plan, .source = source, .dummy_seed = dummy_seed, .be = w->be};
    /* a small part of the load (mplan_mtp_weights_count): no periodic lines, one at the end */
    ld.prog.interval = 1e30;
    duet_status st = DUET_OK;
    if (source == MDL_WEIGHTS_CHECKPOINT) st = st_open_dir(dir, &ld.st);
    int D = c->hidden_size, V = c->vocab_size, l = c->num_hidden_layers;
    char n[256];
#define NAME(suffix) (snprintf(n, sizeof n, "model.layers.%d.%s", l, suffix), n)
    if (st == DUET_OK)
        st = load_linear(&ld, NAME("embed_tokens.weight"), V, D, plan->vocab0, plan->vocab_local, 0,
                         D, false, &t->embed);
    if (st == DUET_OK)
        st = load_linear(&ld, NAME("shared_head.head.weight"), V, D, plan->vocab0,
                         plan->vocab_local, 0, D, false, &t->head);
    if (st == DUET_OK) st = load_vec(&ld, NAME("enorm.weight"), D, &t->enorm);
    if (st == DUET_OK) st = load_vec(&ld, NAME("hnorm.weight"), D, &t->hnorm);
    if (st == DUET_OK) st = load_vec(&ld, NAME("shared_head.norm.weight"), D, &t->head_norm);
    if (st == DUET_OK)
        st = load_linear(&ld, NAME("eh_proj.weight"), D, 2 * D, 0, D, 0, D, false, &t->eh_e);
    if (st == DUET_OK)
        st = load_linear(&ld, NAME("eh_proj.weight"), D, 2 * D, 0, D, D, D, false, &t->eh_h);
#undef NAME
    if (st == DUET_OK) st = load_layer(&ld, &t->layer, l, c->n_routed_experts > 0);
    if (st == DUET_OK && dev_dummy(&ld) && w->be->ops->sync) st = w->be->ops->sync(w->be);
    if (st == DUET_OK)
        LOG_INFO("weights: MTP module (layer %d) loaded, %.2f GiB", l,
                 (double)ld.prog.bytes / (1 << 30));
    free(ld.tmp);
    st_close(ld.st);
    w->mtp = t; /* destroy frees a partly loaded module too */
    if (st != DUET_OK) {
        mdl_weights_drop_mtp(w);
        return st;
    }
    return DUET_OK;
}

static void ffn_free(be_backend *be, be_ffn *f) {
    be->ops->weight_destroy(be, f->gate_up);
    be->ops->weight_destroy(be, f->down);
}

static void vec_free(be_backend *be, void *v) {
    if (v) be->ops->buf_free(be, v);
}

static void layer_free(const mdl_weights *w, mdl_layer *ly) {
    be_backend *be = w->be;
    const be_ops *o = be->ops;
    vec_free(be, ly->attn_norm);
    vec_free(be, ly->ffn_norm);
    vec_free(be, ly->q_a_norm);
    vec_free(be, ly->kv_a_norm);
    vec_free(be, ly->gate_bias);
    o->weight_destroy(be, ly->q_a);
    o->weight_destroy(be, ly->q_b);
    o->weight_destroy(be, ly->q);
    o->weight_destroy(be, ly->kv_a);
    o->weight_destroy(be, ly->kv_b);
    o->weight_destroy(be, ly->o);
    o->weight_destroy(be, ly->gate);
    ffn_free(be, &ly->dense);
    ffn_free(be, &ly->shared);
    for (int e = 0; ly->experts && e < w->n_local_experts; e++) ffn_free(be, &ly->experts[e]);
    free(ly->experts);
}

void mdl_weights_drop_mtp(mdl_weights *w) {
    mdl_mtp *t = w ? w->mtp : NULL;
    if (!t) return;
    const be_ops *o = w->be->ops;
    layer_free(w, &t->layer);
    o->weight_destroy(w->be, t->embed);
    o->weight_destroy(w->be, t->head);
    o->weight_destroy(w->be, t->eh_e);
    o->weight_destroy(w->be, t->eh_h);
    vec_free(w->be, t->enorm);
    vec_free(w->be, t->hnorm);
    vec_free(w->be, t->head_norm);
    free(t);
    w->mtp = NULL;
}

void mdl_weights_destroy(mdl_weights *w) {
    if (!w) return;
    be_backend *be = w->be;
    const be_ops *o = be->ops;
    for (int l = 0; l < w->n_layers; l++) layer_free(w, &w->layers[l]);
    mdl_weights_drop_mtp(w);
    free(w->layers);
    o->weight_destroy(be, w->embed);
    o->weight_destroy(be, w->lm_head);
    vec_free(be, w->final_norm);
    free(w);
}
