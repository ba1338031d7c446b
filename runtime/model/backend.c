/* The wrappers that apply an optional op's fallback once, for every backend (the registry that
 * picks a backend by name sits above the backends: backends/registry.c). */
#include "model/backend.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "base/log.h"

void be_destroy(be_backend *be) {
    if (be) be->ops->destroy(be);
}

duet_status be_mem_info(be_backend *be, long long *total_p, long long *free_p) {
    if (!be->ops->mem_info) return DUET_ERR_UNSUPPORTED;
    size_t total = 0, free_b = 0;
    duet_status st = be->ops->mem_info(be, &total, &free_b);
    if (st != DUET_OK) return st;
    *total_p = (long long)total;
    *free_p = (long long)free_b;
    return DUET_OK;
}

/* ---- fused ops ---- */

void be_add_rmsnorm(be_backend *be, void *out, void *h, const void *x, const void *w, int T, int D,
                    float eps) {
    const be_ops *o = be->ops;
    if (o->add_rmsnorm) {
        o->add_rmsnorm(be, out, h, x, w, T, D, eps);
        return;
    }
    o->add(be, h, x, (size_t)T * (size_t)D);
    o->rmsnorm(be, out, D, h, D, w, T, D, eps);
}

void be_rope_kv_write(be_backend *be, be_kv *kv, int layer, void *kva, int T, int kv_stride,
                      int col0, int rope_dim) {
    const be_ops *o = be->ops;
    if (o->rope_kv_write) {
        o->rope_kv_write(be, kv, layer, kva, T, kv_stride, col0, rope_dim);
        return;
    }
    o->rope(be, kva, T, kv_stride, 1, 0, col0, rope_dim);
    o->kv_write(be, kv, layer, kva, kv_stride);
}

/* ---- KV copies for the transfer thread ---- */

duet_status be_kv_copy_start(be_backend *be, be_kv *kv, const int32_t *blocks, int n, void *host,
                             bool to_host, void **ticket_p) {
    for (int i = 0; i < n; i++)
        if (blocks[i] < 0 || blocks[i] >= kv->n_blocks) return DUET_ERR_INVALID;
    if (be->ops->kv_copy_start && be->ops->kv_copy_poll)
        return be->ops->kv_copy_start(be, kv, blocks, n, host, to_host, ticket_p);
    duet_status st = DUET_OK;
    if (be->ops->kv_copy_host) {
        st = be->ops->kv_copy_host(be, kv, blocks, n, host, to_host);
    } else if (kv->on_device) {
        st = DUET_ERR_UNSUPPORTED;
    } else {
        size_t bb = kv->block_bytes;
        for (int i = 0; i < n; i++) {
            uint8_t *c = (uint8_t *)kv->data + (size_t)blocks[i] * bb;
            uint8_t *h = (uint8_t *)host + (size_t)i * bb;
            if (to_host)
                memcpy(h, c, bb);
            else
                memcpy(c, h, bb);
        }
    }
    if (st == DUET_OK) *ticket_p = NULL;
    return st;
}

duet_status be_kv_copy_poll(be_backend *be, void *ticket, bool wait) {
    if (!ticket) return DUET_OK;
    return be->ops->kv_copy_poll(be, ticket, wait);
}

/* ---- sampling: the ops when the backend has them, the host rule otherwise ---- */

duet_status be_sampler_create(be_backend *be, int max_rows, int V, int n_slots, be_sampler **s_p) {
    if (max_rows < 1 || V < 1 || n_slots < 0) return DUET_ERR_INVALID;
    if (be->ops->sampler_create) return be->ops->sampler_create(be, max_rows, V, n_slots, s_p);
    return be_host_sampler_create(be, max_rows, V, n_slots, s_p);
}

void be_sampler_destroy(be_backend *be, be_sampler *s) {
    if (!s) return;
    if (be->ops->sampler_destroy)
        be->ops->sampler_destroy(be, s);
    else
        be_host_sampler_destroy(be, s);
}

duet_status be_sampler_slot_init(be_backend *be, be_sampler *s, int slot, const int32_t *prompt,
                                 int n_prompt, const int32_t *output, int n_output) {
    if (slot < 0 || slot >= s->n_slots || n_prompt < 0 || n_output < 0) return DUET_ERR_INVALID;
    if (be->ops->sampler_slot_init)
        return be->ops->sampler_slot_init(be, s, slot, prompt, n_prompt, output, n_output);
    return be_host_sampler_slot_init(be, s, slot, prompt, n_prompt, output, n_output);
}

/* The rows a call may carry: every index in range, each slot named once. */
static duet_status check_rows(const be_sampler *s, int n_logits, int n) {
    if (n < 0 || n > s->max_rows || n_logits < 0) return DUET_ERR_INVALID;
    for (int i = 0; i < n; i++) {
        const be_sample_row *r = &s->rows[i];
        const char *bad = NULL;
        if (r->logits_row < 0 || r->logits_row >= n_logits)
            bad = "names a logits row outside the step";
        else if (r->slot < -1 || r->slot >= s->n_slots)
            bad = "names a penalty slot the sampler does not have";
        else if (r->n_ban < 0 || r->n_ban > BE_SAMPLE_MAX_BAN)
            bad = "bans more tokens than BE_SAMPLE_MAX_BAN";
        else if (r->n_logprobs < -1 || r->n_logprobs > BE_SAMPLE_MAX_TOP)
            bad = "asks for more logprobs than BE_SAMPLE_MAX_TOP";
        for (int j = 0; !bad && r->slot >= 0 && j < i; j++)
            if (s->rows[j].slot == r->slot) bad = "shares its penalty slot with another row";
        if (bad) {
            LOG_ERROR("sampling: row %d %s", i, bad);
            return DUET_ERR_INVALID;
        }
    }
    return DUET_OK;
}

duet_status be_sample_queue(be_backend *be, be_sampler *s, const void *logits, int stride,
                            int n_logits, int n) {
    duet_status st = check_rows(s, n_logits, n);
    if (st != DUET_OK || n == 0) return st;
    if (stride < s->V) return DUET_ERR_INVALID;
    if (be->ops->sample) return be->ops->sample(be, s, logits, stride, n_logits, n);
    return be_host_sample(be, s, logits, stride, n_logits, n);
}

duet_status be_sample_wait(be_backend *be, be_sampler *s) {
    (void)s;
    return be->ops->sync(be);
}

duet_status be_sample(be_backend *be, be_sampler *s, const void *logits, int stride, int n_logits,
                      int n) {
    duet_status st = be_sample_queue(be, s, logits, stride, n_logits, n);
    if (st == DUET_OK) st = be_sample_wait(be, s);
    return st;
}

int be_fp8_prefill_rows(void) {
    static int rows = -1; /* the engine thread reads it first; the value never changes */
    if (rows < 0) {
        const char *e = getenv("DUET_FP8_PREFILL_ROWS");
        char *end = NULL;
        long v = e && *e ? strtol(e, &end, 10) : 0;
        rows = end && *end == '\0' && v > 0 && v < (1L << 30) ? (int)v : 0;
        if (e && *e && !rows)
            LOG_WARN("DUET_FP8_PREFILL_ROWS=%s is not a positive row count: FP8 prefill GEMMs off",
                     e);
    }
    return rows;
}
