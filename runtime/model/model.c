/* DeepSeek V2/V3 forward pass over the backend ops (see model.h). The layer structure follows
 * DeepSeek's reference inference/model.py: MLA with the latent KV cache, dense MLP for the
 * first layers, routed + shared experts after. The model sits on the modules below it: the
 * shard plan (shard.h), this rank's weights (weights.h: reading the checkpoint) and the TP/EP
 * collectives (collectives.h: moving activations); what is left here is computing. */
#include "model/model.h"

#include <stdlib.h>
#include <string.h>

#include "base/log.h"
#include "model/collectives.h"
#include "model/shard.h"
#include "model/weights.h"

/* Host-side arrays describing the step, reused across steps. */
typedef struct mdl_step {
    int32_t *tokens, *token_pos, *token_slot, *out_rows; /* [cap_tokens] */
    int32_t *seq_start, *seq_ctx;                        /* [cap_seqs + 1] */
    int32_t *block_table;                                /* [cap_table] */
    size_t cap_tokens, cap_seqs, cap_table;
} mdl_step;

/* Device activation buffers for up to cap_tokens tokens, and host routing results. */
typedef struct mdl_buffers {
    int cap_tokens, cap_out;
    void *h, *xn, *qa, *q, *kva, *attn, *o, *o2, *gu, *act, *logits;
    /* with MTP: hid[T, D] the last forward's final-normed hidden states (what the drafts start
     * from), mtp_prev[T, D] the MTP module's own output rows (what a further draft starts from) */
    void *hid, *mtp_prev;
    int32_t *ids;   /* host [cap_tokens, K] */
    float *weights; /* host [cap_tokens, K] */
    int32_t *d_ids; /* device [cap_tokens, K], with device routing (mem_alloc) */
    float *d_weights;
} mdl_buffers;

/* Steps of w new tokens per sequence (decode: 1; MTP verify: k + 1) and the MTP module's
 * draft passes are recorded once per (kind, w, batch bucket, block-table bucket) and replayed
 * (CUDA graphs on backends that record): the launch of ~30 ops per layer becomes one. A key is
 * recorded on its second use; its first runs eagerly and grows every scratch area the
 * recording will refer to. */
#define MDL_GRAPH_BUCKETS 16
static const int k_graph_sizes[MDL_GRAPH_BUCKETS] = {1,  2,  4,   8,   16,  24,  32,  48,
                                                     64, 96, 128, 160, 192, 224, 256, 0};

typedef struct mdl_graphs {
    bool on; /* the backend records and the model's ops all can be */
    /* eager runs of (kind, w, size, log2 table width) so far */
    uint8_t seen[2][MDL_GRAPH_MAX_W + 1][MDL_GRAPH_BUCKETS][32];
    /* replays and recordings by mdl_graph_use, for tests and logs */
    uint64_t launched[MDL_GRAPH_USES], recorded[MDL_GRAPH_USES];
} mdl_graphs;

struct mdl_model {
    cfg_model cfg;
    be_backend *be;
    mdl_plan plan; /* this rank's slices (shard.h) */
    mdl_weights *w;
    mdl_coll *coll;
    int kv_dim;
    float softmax_scale;
    be_route_params route;
    /* routing stays on the device (the backend has the device MoE ops; DUET_MOE_PATH=host
     * picks the host-routing path instead, for comparisons) */
    bool moe_dev;
    mdl_step step;
    mdl_buffers buf;
    mdl_graphs graphs;
    int spec_tokens;   /* MTP drafts per step (0: no MTP module loaded) */
    bool marks_on;     /* mdl_layer_marks: the next forward notes its layers */
    bool marks_armed;  /* ... this one does (eager, not a graph) */
    int n_kv_layers;   /* num_hidden_layers, + 1 for the MTP module's own cache */
    dt_dtype kv_dtype; /* DT_COUNT: the activation type; DT_F8_E4M3 (mdl_set_kv_dtype) */
    int last_T;        /* tokens of the last mdl_forward (rows of buf.hid) */
    /* MTP drafts are the module's argmax, taken where the logits are (the backend's sampling
     * ops, greedy rows): no row of logits comes to the host */
    be_sampler *draft_smp;
    int cap_draft; /* its rows */
    /* the last forward's logits left in backend memory (mdl_forward with logits NULL):
     * [n_out, stride] with vocab_size valid columns */
    const void *out_logits;
    int out_stride, n_out;
};

const cfg_model *mdl_config(const mdl_model *m) {
    return &m->cfg;
}

be_backend *mdl_backend(const mdl_model *m) {
    return m->be;
}

duet_status mdl_set_kv_dtype(mdl_model *m, dt_dtype t) {
    if (t != DT_COUNT && t != DT_F8_E4M3) return DUET_ERR_INVALID;
    m->kv_dtype = t;
    return DUET_OK;
}

dt_dtype mdl_kv_dtype(const mdl_model *m) {
    return m->kv_dtype == DT_F8_E4M3 ? DT_F8_E4M3 : m->be->ops->act_dtype;
}

size_t mdl_kv_bytes_per_token(const mdl_model *m) {
    size_t b = (size_t)m->n_kv_layers * (size_t)m->kv_dim * dt_size(mdl_kv_dtype(m));
    /* a backend's decoded layer of an fp8 cache grows with the blocks: counted with them */
    if (mdl_kv_dtype(m) == DT_F8_E4M3 && m->be->ops->kv_fp8_decoded_layer)
        b += (size_t)m->kv_dim * dt_size(m->be->ops->act_dtype);
    return b;
}

duet_status mdl_kv_create(mdl_model *m, int n_blocks, int block_size, be_kv **kv_p) {
    if (n_blocks <= 0 || block_size <= 0) return DUET_ERR_INVALID;
    return m->be->ops->kv_create(m->be, n_blocks, m->n_kv_layers, block_size, m->kv_dim,
                                 mdl_kv_dtype(m), kv_p);
}

void mdl_kv_destroy(mdl_model *m, be_kv *kv) {
    if (kv) m->be->ops->kv_destroy(m->be, kv);
}

static int grow(int32_t **p, size_t n) {
    int32_t *np = realloc(*p, (n ? n : 1) * sizeof **p);
    if (!np) return -1;
    *p = np;
    return 0;
}

static duet_status step_reserve(mdl_step *s, int n_tokens, int n_seqs, int max_blocks) {
    size_t nt = (size_t)n_tokens, ns = (size_t)n_seqs + 1, tb = (size_t)n_seqs * max_blocks;
    if (nt > s->cap_tokens) {
        if (grow(&s->tokens, nt) || grow(&s->token_pos, nt) || grow(&s->token_slot, nt) ||
            grow(&s->out_rows, nt))
            return DUET_ERR_NO_MEMORY;
        s->cap_tokens = nt;
    }
    if (ns > s->cap_seqs) {
        if (grow(&s->seq_start, ns) || grow(&s->seq_ctx, ns)) return DUET_ERR_NO_MEMORY;
        s->cap_seqs = ns;
    }
    if (tb > s->cap_table) {
        if (grow(&s->block_table, tb)) return DUET_ERR_NO_MEMORY;
        s->cap_table = tb;
    }
    return DUET_OK;
}

static void step_free(mdl_step *s) {
    free(s->tokens);
    free(s->token_pos);
    free(s->token_slot);
    free(s->out_rows);
    free(s->seq_start);
    free(s->seq_ctx);
    free(s->block_table);
}

static void buffers_free(mdl_model *m) {
    mdl_buffers *b = &m->buf;
    void **bufs[] = {&b->h,  &b->xn, &b->qa,  &b->q,      &b->kva, &b->attn,    &b->o,
                     &b->o2, &b->gu, &b->act, &b->logits, &b->hid, &b->mtp_prev};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        if (*bufs[i]) m->be->ops->buf_free(m->be, *bufs[i]);
        *bufs[i] = NULL;
    }
    free(b->ids);
    free(b->weights);
    b->ids = NULL;
    b->weights = NULL;
    if (b->d_ids) m->be->ops->mem_free(m->be, b->d_ids);
    if (b->d_weights) m->be->ops->mem_free(m->be, b->d_weights);
    b->d_ids = NULL;
    b->d_weights = NULL;
    b->cap_tokens = b->cap_out = 0;
}

/* Grows activation buffers (and the collectives' logits staging) to hold T tokens and n_out
 * logits rows. */
static duet_status reserve(mdl_model *m, int T, int n_out) {
    mdl_buffers *b = &m->buf;
    if (T <= b->cap_tokens && n_out <= b->cap_out) return DUET_OK;
    const cfg_model *c = &m->cfg;
    const mdl_plan *p = &m->plan;
    int cap_t = T > b->cap_tokens ? T : b->cap_tokens;
    int cap_o = n_out > b->cap_out ? n_out : b->cap_out;
    if (cap_o > cap_t) cap_t = cap_o;
    buffers_free(m);
    size_t t = (size_t)cap_t, D = (size_t)c->hidden_size;
    int H = p->n_heads_local, qk = cfg_qk_head_dim(c);
    int I = p->inter_local;
    if (p->shared_inter_local > I) I = p->shared_inter_local;
    if (p->expert_inter_local > I) I = p->expert_inter_local;
    int K = c->num_experts_per_tok > 0 ? c->num_experts_per_tok : 1;
    be_backend *be = m->be;
    void *(*al)(be_backend *, size_t) = be->ops->buf_alloc;
    b->h = al(be, t * D);
    b->xn = al(be, t * D);
    b->qa = al(be, t * (size_t)(c->q_lora_rank ? c->q_lora_rank : 1));
    b->q = al(be, t * (size_t)H * qk);
    b->kva = al(be, t * (size_t)m->kv_dim);
    b->attn = al(be, t * (size_t)H * c->v_head_dim);
    b->o = al(be, t * D);
    b->o2 = al(be, t * D);
    b->gu = al(be, t * 2 * (size_t)I);
    b->act = al(be, t * (size_t)I);
    b->logits = al(be, (size_t)cap_o * p->vocab_local);
    if (m->spec_tokens > 0) {
        b->hid = al(be, t * D);
        b->mtp_prev = al(be, t * D);
    }
    b->ids = malloc(t * K * sizeof(int32_t));
    b->weights = malloc(t * K * sizeof(float));
    if (m->moe_dev) {
        b->d_ids = be->ops->mem_alloc(be, t * K * sizeof(int32_t));
        b->d_weights = be->ops->mem_alloc(be, t * K * sizeof(float));
    }
    b->cap_tokens = cap_t;
    b->cap_out = cap_o;
    if (!b->h || !b->xn || !b->qa || !b->q || !b->kva || !b->attn || !b->o || !b->o2 || !b->gu ||
        !b->act || !b->logits || !b->ids || !b->weights ||
        (m->spec_tokens > 0 && (!b->hid || !b->mtp_prev)) ||
        (m->moe_dev && (!b->d_ids || !b->d_weights)) ||
        mdl_coll_reserve(m->coll, cap_o) != DUET_OK) {
        LOG_ERROR("model: cannot allocate activations for %d tokens", cap_t);
        buffers_free(m);
        return DUET_ERR_NO_MEMORY;
    }
    return DUET_OK;
}

/* Whether MoE layers run without host round trips (the backend's device MoE ops: routing
 * results stay in device memory), so a step with MoE layers can be recorded. */
static bool mdl_moe_on_device(const mdl_model *m) {
    return m->moe_dev;
}

/* What the forward derives from config.json once: routing, softmax scale, RoPE tables on the
 * backend; and the limits of what duet routes and rotates. */
static duet_status setup(mdl_model *m, const char *dir) {
    const cfg_model *c = &m->cfg;
    if (c->n_routed_experts &&
        (c->n_routed_experts > 1024 || c->num_experts_per_tok > 64 || c->n_group > 256)) {
        LOG_ERROR("config.json: %d routed experts, top-%d, %d groups exceed what duet routes "
                  "(1024, 64, 256)",
                  c->n_routed_experts, c->num_experts_per_tok, c->n_group);
        return DUET_ERR_UNSUPPORTED;
    }
    if (c->qk_rope_head_dim > 256) {
        LOG_ERROR("config.json: qk_rope_head_dim %d exceeds duet's limit of 256",
                  c->qk_rope_head_dim);
        return DUET_ERR_UNSUPPORTED;
    }
    if (c->norm_topk_prob && strcmp(c->model_type, "deepseek_v3") != 0)
        LOG_WARN("%s/config.json: norm_topk_prob is ignored for %s checkpoints, as "
                 "transformers does; routed weights are only scaled",
                 dir, c->model_type);
    const be_ops *o = m->be->ops;
    const char *path = getenv("DUET_MOE_PATH");
    m->moe_dev = o->mem_alloc && o->mem_free && o->mem_upload && o->mem_download &&
                 o->moe_route_dev && o->moe_experts_dev && o->moe_ep_pack && o->moe_ep_unpack &&
                 !(path && !strcmp(path, "host"));
    m->kv_dim = c->kv_lora_rank + c->qk_rope_head_dim;
    m->softmax_scale = cfg_softmax_scale(c);
    m->route = (be_route_params){
        .n_experts = c->n_routed_experts,
        .top_k = c->num_experts_per_tok,
        .n_group = c->n_group,
        .topk_group = c->topk_group,
        .scoring = c->scoring_func,
        .method = c->topk_method,
        .norm_topk_prob = c->norm_topk_prob,
        .scale_after_norm = !strcmp(c->model_type, "deepseek_v3"),
        .routed_scaling_factor = c->routed_scaling_factor,
    };
    float inv_freq[256], attn;
    if (c->qk_rope_head_dim / 2 > 256) return DUET_ERR_UNSUPPORTED;
    cfg_rope_inv_freq(c, inv_freq, &attn);
    return m->be->ops->rope_setup(m->be, inv_freq, c->qk_rope_head_dim / 2, attn);
}

duet_status mdl_load(const char *dir, be_backend *be, const mdl_shard *shard,
                     const mdl_load_opts *opts, mdl_model **model_p) {
    mdl_model *m = calloc(1, sizeof *m);
    if (!m) return DUET_ERR_NO_MEMORY;
    m->be = be;
    m->kv_dtype = DT_COUNT;
    duet_status st = cfg_load(dir, &m->cfg);
    if (st == DUET_OK) st = mdl_shard_plan(&m->cfg, shard, &m->plan);
    if (st == DUET_OK) st = setup(m, dir);
    m->n_kv_layers = m->cfg.num_hidden_layers;
    if (st == DUET_OK && (opts->spec_tokens < 0 || opts->spec_tokens > MDL_MAX_DRAFT)) {
        LOG_ERROR("model: %d speculative tokens: MTP drafts 1..%d a step", opts->spec_tokens,
                  MDL_MAX_DRAFT);
        st = DUET_ERR_INVALID;
    }
    if (st == DUET_OK && opts->spec_tokens > 0 && m->cfg.num_nextn_predict_layers < 1) {
        /* before the weights: a checkpoint without the module is refused at once */
        LOG_ERROR("%s/config.json: the checkpoint has no MTP layer (num_nextn_predict_layers is "
                  "0); MTP speculative decoding needs one: leave --speculative-config out",
                  dir);
        st = DUET_ERR_UNSUPPORTED;
    }
    if (st == DUET_OK)
        st = mdl_weights_load(dir, &m->cfg, &m->plan, be, opts->source, opts->dummy_seed, &m->w);
    if (st == DUET_OK && opts->spec_tokens > 0) {
        st = mdl_weights_load_mtp(dir, &m->cfg, &m->plan, opts->source, opts->dummy_seed, m->w);
        if (st == DUET_OK) {
            m->spec_tokens = opts->spec_tokens;
            m->n_kv_layers = m->cfg.num_hidden_layers + 1;
        }
    }
    if (st == DUET_OK) st = mdl_coll_create(be, &m->cfg, &m->plan, &m->coll);
    if (st == DUET_OK) st = reserve(m, opts->max_tokens > 0 ? opts->max_tokens : 256, 1);
    if (st == DUET_OK) {
        const be_ops *o = be->ops;
        /* every op of a recorded step or draft pass must take its inputs from device memory:
         * the MoE layers only can when the backend routes on the device; collectives wait on
         * the host */
        bool moe_dev = !m->cfg.n_routed_experts || mdl_moe_on_device(m);
        m->graphs.on = !opts->eager && o->graph_begin && o->graph_end && o->graph_ready &&
                       o->graph_launch && moe_dev && m->plan.shard.tp_size == 1 &&
                       m->plan.shard.ep_size == 1;
        if (m->graphs.on) {
            int cap = opts->max_tokens > 0 ? opts->max_tokens : 256;
            if (cap > k_graph_sizes[MDL_GRAPH_BUCKETS - 2])
                cap = k_graph_sizes[MDL_GRAPH_BUCKETS - 2];
            st = reserve(m, cap, cap); /* a bucket's rows all get logits */
        }
    }
    if (st != DUET_OK) {
        mdl_destroy(m);
        return st;
    }
    *model_p = m;
    return DUET_OK;
}

void mdl_destroy(mdl_model *m) {
    if (!m) return;
    const mdl_graphs *g = &m->graphs;
    uint64_t any = 0;
    for (int u = 0; u < MDL_GRAPH_USES; u++) any += g->recorded[u];
    if (any)
        LOG_INFO("model: graphs recorded/replayed: decode %llu/%llu, verify %llu/%llu, drafts "
                 "%llu/%llu",
                 (unsigned long long)g->recorded[MDL_GRAPH_USE_DECODE],
                 (unsigned long long)g->launched[MDL_GRAPH_USE_DECODE],
                 (unsigned long long)g->recorded[MDL_GRAPH_USE_VERIFY],
                 (unsigned long long)g->launched[MDL_GRAPH_USE_VERIFY],
                 (unsigned long long)g->recorded[MDL_GRAPH_USE_DRAFT],
                 (unsigned long long)g->launched[MDL_GRAPH_USE_DRAFT]);
    buffers_free(m);
    if (m->draft_smp) be_sampler_destroy(m->be, m->draft_smp);
    mdl_coll_destroy(m->coll);
    mdl_weights_destroy(m->w);
    step_free(&m->step);
    free(m);
}

/* Fills the host-side batch description and hands it to the backend. pad_to > n_seqs (a
 * recorded step): rows n_seqs..pad_to-1 are padding sequences of pad_w tokens at positions
 * 0..pad_w-1 of the cache's padding block (pad_w <= block_size), the last pad_logits of them
 * with a logits row each; table_width > 0 fixes the block table's width. */
static duet_status prepare_batch(mdl_model *m, be_kv *kv, const mdl_seq *seqs, int n_seqs, int T,
                                 int pad_to, int table_width, int pad_w, int pad_logits) {
    mdl_step *s = &m->step;
    int bs = kv->block_size, max_blocks = 1;
    for (int i = 0; i < n_seqs; i++)
        max_blocks = seqs[i].n_blocks > max_blocks ? seqs[i].n_blocks : max_blocks;
    if (table_width > 0) max_blocks = table_width;
    if (pad_to > n_seqs && (pad_w < 1 || pad_w > bs || pad_logits < 0 || pad_logits > pad_w))
        return DUET_ERR_INTERNAL; /* mdl_graph_shape_of admits no such batch */
    int n_all = pad_to > n_seqs ? pad_to : n_seqs;
    int T_all = T + (n_all - n_seqs) * (pad_to > n_seqs ? pad_w : 0);
    duet_status st = step_reserve(s, T_all, n_all, max_blocks);
    if (st != DUET_OK) return st;
    int t = 0, r = 0;
    s->seq_start[0] = 0;
    for (int i = 0; i < n_seqs; i++) {
        const mdl_seq *q = &seqs[i];
        if (q->n_tokens < 0 || q->pos0 < 0 || q->n_logits < 0 || q->n_logits > q->n_tokens ||
            (int64_t)q->pos0 + q->n_tokens > (int64_t)q->n_blocks * bs) {
            LOG_ERROR("model: sequence %d of the step is malformed (pos0 %d, %d tokens, %d "
                      "blocks of %d)",
                      i, q->pos0, q->n_tokens, q->n_blocks, bs);
            return DUET_ERR_INVALID;
        }
        for (int j = 0; j < q->n_blocks; j++) {
            if (q->block_table[j] < 0 || q->block_table[j] >= kv->n_blocks) {
                LOG_ERROR("model: block id %d is outside the pool of %d", q->block_table[j],
                          kv->n_blocks);
                return DUET_ERR_INVALID;
            }
        }
        for (int j = 0; j < q->n_tokens; j++, t++) {
            int32_t tok = q->tokens[j];
            if (tok < 0 || tok >= m->cfg.vocab_size) {
                LOG_ERROR("model: token id %d is outside the vocabulary (%d)", tok,
                          m->cfg.vocab_size);
                return DUET_ERR_INVALID;
            }
            int pos = q->pos0 + j;
            s->tokens[t] = tok;
            s->token_pos[t] = pos;
            s->token_slot[t] = q->block_table[pos / bs] * bs + pos % bs;
        }
        for (int k = q->n_logits; k > 0; k--) s->out_rows[r++] = t - k;
        s->seq_start[i + 1] = t;
        s->seq_ctx[i] = q->pos0 + q->n_tokens;
        memcpy(s->block_table + (size_t)i * max_blocks, q->block_table,
               (size_t)q->n_blocks * sizeof(int32_t));
    }
    for (int i = n_seqs; i < n_all; i++) {
        /* padding: token 0 at positions 0..pad_w-1 of the padding block (every padding
         * sequence writes the same values there, and only padding reads that block) */
        for (int j = 0; j < pad_w; j++, t++) {
            s->tokens[t] = 0;
            s->token_pos[t] = j;
            s->token_slot[t] = kv->pad_block * bs + j;
        }
        for (int k = pad_logits; k > 0; k--) s->out_rows[r++] = t - k;
        s->seq_start[i + 1] = t;
        s->seq_ctx[i] = pad_w;
        s->block_table[(size_t)i * max_blocks] = kv->pad_block;
    }
    be_batch b = {
        .n_tokens = T_all,
        .n_seqs = n_all,
        .token_ids = s->tokens,
        .out_rows = s->out_rows,
        .n_out = r,
        .token_pos = s->token_pos,
        .token_slot = s->token_slot,
        .seq_start = s->seq_start,
        .seq_ctx = s->seq_ctx,
        .block_table = s->block_table,
        .max_blocks = max_blocks,
    };
    return m->be->ops->set_batch(m->be, &b);
}

/* x[T, D] -> out[T, D] through a SwiGLU MLP (possibly this rank's slice of it). */
static void ffn(mdl_model *m, void *out, const void *x, int T, const be_ffn *f) {
    const be_ops *o = m->be->ops;
    int I = f->n_inter;
    o->linear(m->be, m->buf.gu, x, m->cfg.hidden_size, T, f->gate_up);
    o->silu_mul(m->be, m->buf.act, m->buf.gu, T, I);
    o->linear(m->be, out, m->buf.act, I, T, f->down);
}

/* buf.o [T, D] = layer ly's attention (summed over TP) on buf.xn = attn_norm(buf.h), its KV
 * in cache layer l. */
static duet_status attention(mdl_model *m, be_kv *kv, int l, const mdl_layer *ly, int T) {
    const be_ops *o = m->be->ops;
    const cfg_model *c = &m->cfg;
    int D = c->hidden_size, L = c->kv_lora_rank, R = c->qk_rope_head_dim;
    int nope = c->qk_nope_head_dim, qk = nope + R, H = m->plan.n_heads_local;
    be_backend *be = m->be;

    if (c->q_lora_rank) {
        o->linear(be, m->buf.qa, m->buf.xn, D, T, ly->q_a);
        o->rmsnorm(be, m->buf.qa, c->q_lora_rank, m->buf.qa, c->q_lora_rank, ly->q_a_norm, T,
                   c->q_lora_rank, c->rms_norm_eps);
        o->linear(be, m->buf.q, m->buf.qa, c->q_lora_rank, T, ly->q_b);
    } else {
        o->linear(be, m->buf.q, m->buf.xn, D, T, ly->q);
    }
    /* kva[T, L + R]: the latent (normalized) and the shared rope key */
    o->linear(be, m->buf.kva, m->buf.xn, D, T, ly->kv_a);
    o->rmsnorm(be, m->buf.kva, L + R, m->buf.kva, L + R, ly->kv_a_norm, T, L, c->rms_norm_eps);
    o->rope(be, m->buf.q, T, H * qk, H, qk, nope, R);
    be_rope_kv_write(be, kv, l, m->buf.kva, T, L + R, L, R);
    o->mla_attention(be, m->buf.attn, m->buf.q, kv, l, ly->kv_b, H, nope, R, c->v_head_dim,
                     m->softmax_scale);
    o->linear(be, m->buf.o, m->buf.attn, H * c->v_head_dim, T, ly->o);
    return mdl_coll_allreduce(m->coll, m->buf.o, (size_t)T * D);
}

/* out[T, D] = routed experts held by this rank applied to x (zeroed first); ids / w are
 * host [T, K] routing results, ids of other ranks' experts skipped. */
static void moe_local(mdl_model *m, const mdl_layer *ly, void *out, const void *x, int T,
                      const int32_t *ids, const float *w) {
    const be_ops *o = m->be->ops;
    o->zero(m->be, out, (size_t)T * m->cfg.hidden_size);
    o->moe_experts(m->be, out, x, T, m->cfg.hidden_size, ids, w, m->cfg.num_experts_per_tok,
                   ly->experts, m->plan.expert0, m->plan.n_local_experts);
}

/* Routed experts over the EP group: buf.xn tokens with buf.ids / buf.weights out to the
 * experts' ranks, this rank's experts over what arrives, the results summed into buf.o. */
static duet_status moe_ep(mdl_model *m, const mdl_layer *ly, int T) {
    mdl_ep_rows rows;
    duet_status st = mdl_coll_dispatch(m->coll, m->buf.xn, m->buf.ids, m->buf.weights, T, &rows);
    if (st != DUET_OK) return st;
    if (rows.n) moe_local(m, ly, rows.y, rows.x, rows.n, rows.ids, rows.weights);
    return mdl_coll_combine(m->coll, m->buf.o, T);
}

/* The device form of moe_ep: routing from buf.d_ids / buf.d_weights, fixed-capacity blocks. */
static duet_status moe_ep_dev(mdl_model *m, const mdl_layer *ly, int T) {
    be_moe_rows rows;
    void *y;
    duet_status st =
        mdl_coll_dispatch_dev(m->coll, m->buf.xn, m->buf.d_ids, m->buf.d_weights, T, &rows, &y);
    if (st != DUET_OK) return st;
    m->be->ops->moe_experts_dev(m->be, y, &rows, ly->experts, m->plan.expert0,
                                m->plan.n_local_experts, NULL);
    return mdl_coll_combine_dev(m->coll, m->buf.o, T);
}

/* buf.o [T, D] = the MoE layer with routing kept on the device: no host copy, no wait. Without
 * EP the shared experts ride in the same grouped launches as the routed ones (the backend
 * schedules them together); with EP they run after the combine, on this rank's tokens. */
static duet_status moe_dev(mdl_model *m, const mdl_layer *ly, int T) {
    const be_ops *o = m->be->ops;
    be_backend *be = m->be;
    int D = m->cfg.hidden_size, K = m->cfg.num_experts_per_tok;
    const be_ffn *shared = ly->shared.gate_up ? &ly->shared : NULL;
    if (T > 0)
        o->moe_route_dev(be, m->buf.xn, T, ly->gate, ly->gate_bias, &m->route, m->buf.d_ids,
                         m->buf.d_weights);
    if (m->plan.shard.ep_size > 1) {
        duet_status st = moe_ep_dev(m, ly, T);
        if (st != DUET_OK || !shared || T == 0) return st;
        ffn(m, m->buf.o2, m->buf.xn, T, shared);
        o->add(be, m->buf.o, m->buf.o2, (size_t)T * D);
        return DUET_OK;
    }
    be_moe_rows rows = {.n = T,
                        .D = D,
                        .K = K,
                        .x = m->buf.xn,
                        .x_stride = D,
                        .ids = m->buf.d_ids,
                        .weights = m->buf.d_weights,
                        .meta_stride = K};
    o->moe_experts_dev(be, m->buf.o, &rows, ly->experts, m->plan.expert0, m->plan.n_local_experts,
                       shared);
    return DUET_OK;
}

/* buf.o [T, D] = the MoE layer (routed + shared experts) on buf.xn. */
static duet_status moe(mdl_model *m, const mdl_layer *ly, int T) {
    const be_ops *o = m->be->ops;
    be_backend *be = m->be;
    duet_status st;
    if (m->moe_dev) return moe_dev(m, ly, T);
    if (T > 0) {
        st = o->moe_route(be, m->buf.xn, T, ly->gate, ly->gate_bias, &m->route, m->buf.ids,
                          m->buf.weights);
        if (st != DUET_OK) return st;
    }
    if (m->plan.shard.ep_size > 1) {
        st = moe_ep(m, ly, T);
        if (st != DUET_OK) return st;
    } else {
        moe_local(m, ly, m->buf.o, m->buf.xn, T, m->buf.ids, m->buf.weights);
    }
    if (ly->shared.gate_up && T > 0) {
        ffn(m, m->buf.o2, m->buf.xn, T, &ly->shared);
        o->add(be, m->buf.o, m->buf.o2, (size_t)T * m->cfg.hidden_size);
    }
    return DUET_OK;
}

/* buf.o [T, D] = layer ly's MLP (summed over TP) on buf.xn = ffn_norm(buf.h). */
static duet_status mlp(mdl_model *m, const mdl_layer *ly, int T) {
    if (!ly->moe) {
        ffn(m, m->buf.o, m->buf.xn, T, &ly->dense);
    } else {
        duet_status st = moe(m, ly, T);
        if (st != DUET_OK) return st;
    }
    return mdl_coll_allreduce(m->coll, m->buf.o, (size_t)T * m->cfg.hidden_size);
}

/* Layer ly on the residual stream buf.h, its KV in cache layer l; buf.xn holds
 * attn_norm(buf.h) on entry. Each residual add runs fused with the norm after it (the MLP's,
 * then next_norm: the next layer's attention norm, or NULL for a plain add after the last). */
static duet_status decoder_layer(mdl_model *m, be_kv *kv, int l, const mdl_layer *ly, int T,
                                 const void *next_norm) {
    be_backend *be = m->be;
    int D = m->cfg.hidden_size;
    float eps = m->cfg.rms_norm_eps;
    duet_status st = attention(m, kv, l, ly, T);
    if (st != DUET_OK) return st;
    be_add_rmsnorm(be, m->buf.xn, m->buf.h, m->buf.o, ly->ffn_norm, T, D, eps);
    st = mlp(m, ly, T);
    if (st != DUET_OK) return st;
    if (next_norm)
        be_add_rmsnorm(be, m->buf.xn, m->buf.h, m->buf.o, next_norm, T, D, eps);
    else
        be->ops->add(be, m->buf.h, m->buf.o, (size_t)T * D);
    return DUET_OK;
}

/* The ops of a step after set_batch, up to logits[n_out] on the device; no host data. */
static duet_status compute(mdl_model *m, be_kv *kv, int T, int n_out) {
    const be_ops *o = m->be->ops;
    const cfg_model *c = &m->cfg;
    be_backend *be = m->be;
    int D = c->hidden_size;
    o->embed(be, m->buf.h, NULL, T, m->w->embed, m->plan.vocab0);
    duet_status st = mdl_coll_allreduce(m->coll, m->buf.h, (size_t)T * D);
    int n_layers = c->num_hidden_layers;
    const mdl_layer *ly = m->w->layers;
    if (st == DUET_OK && n_layers > 0)
        o->rmsnorm(be, m->buf.xn, D, m->buf.h, D, ly[0].attn_norm, T, D, c->rms_norm_eps);
    for (int l = 0; l < n_layers && st == DUET_OK; l++) {
        st = decoder_layer(m, kv, l, &ly[l], T, l + 1 < n_layers ? ly[l + 1].attn_norm : NULL);
        if (st == DUET_OK && m->marks_armed) o->layer_mark(be, l);
    }
    if (st != DUET_OK) return st;
    if (m->spec_tokens > 0) {
        /* MTP drafts from every token's final-normed hidden state: all rows are kept (row by
         * row the same values as normalizing only the gathered ones) */
        o->rmsnorm(be, m->buf.hid, D, m->buf.h, D, m->w->final_norm, T, D, c->rms_norm_eps);
        if (n_out > 0) o->gather_rows(be, m->buf.xn, m->buf.hid, NULL, n_out, D);
    } else if (n_out > 0) {
        /* final norm and lm_head only on the rows that want logits */
        o->gather_rows(be, m->buf.xn, m->buf.h, NULL, n_out, D);
        o->rmsnorm(be, m->buf.xn, D, m->buf.xn, D, m->w->final_norm, n_out, D, c->rms_norm_eps);
    }
    if (n_out == 0) return DUET_OK;
    o->linear(be, m->buf.logits, m->buf.xn, D, n_out, m->w->lm_head);
    return DUET_OK;
}

bool mdl_graph_shape_of(mdl_graph_kind kind, const mdl_seq *seqs, int n, int cap_rows,
                        int block_size, mdl_graph_shape *shape_p) {
    if (n <= 0 || (kind != MDL_GRAPH_STEP && kind != MDL_GRAPH_DRAFT)) return false;
    int w = seqs[0].n_tokens, width = 1, wlog = 0;
    /* the CUDA MLA takes up to 8 new tokens a sequence in its absorbed form (MLA_ABS_MAX_Q in
     * backends/cuda/mla.cu), whose launch shapes depend on the batch's shape only */
    if (w < 1 || w > MDL_GRAPH_MAX_W || w > block_size) return false;
    for (int i = 0; i < n; i++) {
        if (seqs[i].n_tokens != w || seqs[i].n_logits != (kind == MDL_GRAPH_STEP ? w : 1))
            return false;
        while (width < seqs[i].n_blocks) {
            if (wlog >= 30) return false;
            width *= 2;
            wlog++;
        }
    }
    for (int b = 0; k_graph_sizes[b]; b++) {
        if (k_graph_sizes[b] < n) continue;
        int rows = k_graph_sizes[b];
        if ((int64_t)rows * w > cap_rows) return false;
        *shape_p = (mdl_graph_shape){.bucket = b,
                                     .rows = rows,
                                     .w = w,
                                     .wlog = wlog,
                                     .key = (uint64_t)kind << 40 | (uint64_t)w << 32 |
                                            (uint64_t)rows << 8 | (uint64_t)wlog};
        return true;
    }
    return false;
}

/* The most rows a recorded batch may have: activations and logits, as reserved at load. */
static int graph_cap_rows(const mdl_model *m) {
    return m->buf.cap_tokens < m->buf.cap_out ? m->buf.cap_tokens : m->buf.cap_out;
}

static mdl_graph_use graph_use(mdl_graph_kind kind, const mdl_graph_shape *g) {
    if (kind == MDL_GRAPH_DRAFT) return MDL_GRAPH_USE_DRAFT;
    return g->w > 1 ? MDL_GRAPH_USE_VERIFY : MDL_GRAPH_USE_DECODE;
}

static duet_status compute(mdl_model *m, be_kv *kv, int T, int n_out);
static duet_status mtp_compute(mdl_model *m, be_kv *kv, int T, int n_out);

/* The recordable part of a padded batch of shape g (set_batch done): a step's ops up to its
 * logits (every row has one), or a draft pass's up to its head's logits (one a sequence). */
static duet_status graph_body(mdl_model *m, be_kv *kv, mdl_graph_kind kind,
                              const mdl_graph_shape *g) {
    int T = g->rows * g->w;
    return kind == MDL_GRAPH_DRAFT ? mtp_compute(m, kv, T, g->rows) : compute(m, kv, T, T);
}

/* Replays g's recording, or runs the batch eagerly on the key's first use, or records it on
 * its second (and replays it). */
static duet_status graph_run(mdl_model *m, be_kv *kv, mdl_graph_kind kind,
                             const mdl_graph_shape *g) {
    const be_ops *o = m->be->ops;
    be_backend *be = m->be;
    mdl_graph_use use = graph_use(kind, g);
    uint8_t *seen = &m->graphs.seen[kind][g->w][g->bucket][g->wlog];
    duet_status st;
    if (o->graph_ready(be, g->key)) {
        st = o->graph_launch(be, g->key);
        m->graphs.launched[use]++;
        return st;
    }
    if (*seen == 0) {
        *seen = 1; /* first use: eagerly, growing what it needs */
        return graph_body(m, kv, kind, g);
    }
    st = o->graph_begin(be);
    if (st == DUET_OK) {
        duet_status cst = graph_body(m, kv, kind, g);
        st = o->graph_end(be, g->key);
        if (cst != DUET_OK) st = cst;
    }
    if (st == DUET_OK) {
        m->graphs.recorded[use]++;
        st = o->graph_launch(be, g->key);
        m->graphs.launched[use]++;
    } else if (st == DUET_ERR_UNSUPPORTED) {
        /* this batch cannot be recorded on this backend: stop trying (nothing ran while
         * recording, so the inputs are still in place) */
        m->graphs.on = false;
        st = graph_body(m, kv, kind, g);
    }
    return st;
}

void mdl_layer_marks(mdl_model *m, bool on) {
    const be_ops *o = m->be->ops;
    m->marks_on = on && o->layer_mark && o->layer_marks_reset && o->layers_done;
    if (m->marks_on) o->layer_marks_reset(m->be);
}

int mdl_layers_done(const mdl_model *m) {
    const be_ops *o = m->be->ops;
    return o->layers_done ? o->layers_done(m->be) : 0;
}

bool mdl_graphs_on(const mdl_model *m) {
    return m->graphs.on;
}

void mdl_graph_counts(const mdl_model *m, uint64_t *recorded, uint64_t *launched) {
    *recorded = *launched = 0;
    for (int u = 0; u < MDL_GRAPH_USES; u++) {
        *recorded += m->graphs.recorded[u];
        *launched += m->graphs.launched[u];
    }
}

void mdl_graph_counts_of(const mdl_model *m, mdl_graph_use use, uint64_t *recorded,
                         uint64_t *launched) {
    bool ok = use >= 0 && use < MDL_GRAPH_USES;
    *recorded = ok ? m->graphs.recorded[use] : 0;
    *launched = ok ? m->graphs.launched[use] : 0;
}

/* The step's n_out rows of logits: gathered over TP into logits (host), or with logits NULL
 * left in backend memory for mdl_sample_queue and mdl_logits_rows. */
static duet_status finish_logits(mdl_model *m, int n_out, float *logits) {
    if (logits) return mdl_coll_logits(m->coll, m->buf.logits, n_out, logits);
    duet_status st =
        mdl_coll_logits_gather(m->coll, m->buf.logits, n_out, &m->out_logits, &m->out_stride);
    if (st == DUET_OK) m->n_out = n_out;
    return st;
}

duet_status mdl_forward(mdl_model *m, be_kv *kv, const mdl_seq *seqs, int n_seqs, float *logits) {
    const be_ops *o = m->be->ops;
    const cfg_model *c = &m->cfg;
    be_backend *be = m->be;
    int T = 0, n_out = 0;
    for (int i = 0; i < n_seqs; i++) {
        T += seqs[i].n_tokens;
        n_out += seqs[i].n_logits;
    }
    m->out_logits = NULL;
    m->n_out = 0;
    m->last_T = 0;
    bool marks = m->marks_on; /* for this forward only */
    m->marks_on = false;
    duet_status st = reserve(m, T, n_out);
    if (st != DUET_OK) return st;
    /* device routing under EP: one agreement per step on the all-to-alls' block size */
    bool ep_dev = m->moe_dev && m->plan.shard.ep_size > 1;
    if (ep_dev) st = mdl_coll_ep_begin(m->coll, T);
    if (st != DUET_OK) return st;
    if (T == 0) {
        /* an empty step: nothing to compute, but expert parallelism's all-to-alls of every
         * MoE layer must still be joined so the other DP groups can step */
        for (int l = 0; l < c->num_hidden_layers && st == DUET_OK; l++)
            if (m->w->layers[l].moe && m->plan.shard.ep_size > 1)
                st = ep_dev ? moe_ep_dev(m, &m->w->layers[l], 0) : moe_ep(m, &m->w->layers[l], 0);
        if (st == DUET_OK && ep_dev) st = mdl_coll_ep_end(m->coll);
        return st;
    }
    mdl_graph_shape g;
    bool graphed = m->graphs.on && mdl_graph_shape_of(MDL_GRAPH_STEP, seqs, n_seqs,
                                                      graph_cap_rows(m), kv->block_size, &g);
    /* a step of several tokens a sequence that wants layer marks is a prompt chunk the KV
     * transfer follows (prompt logprobs give it every row): op by op, as before */
    if (graphed && marks && g.w > 1) graphed = false;
    if (!graphed) {
        st = prepare_batch(m, kv, seqs, n_seqs, T, 0, 0, 0, 0);
        m->marks_armed = marks;
        if (st == DUET_OK) st = compute(m, kv, T, n_out);
        m->marks_armed = false;
        /* before any wait without a deadline: a dead peer must not hang the stream's sync */
        if (ep_dev) {
            duet_status est = mdl_coll_ep_end(m->coll);
            if (st == DUET_OK) st = est;
        }
        /* ops cannot return errors one by one; the backend keeps the first, reported here */
        if (st == DUET_OK) st = o->sync(be);
        if (st == DUET_OK) m->last_T = T;
        if (st != DUET_OK || n_out == 0) return st;
        return finish_logits(m, n_out, logits);
    }
    /* a step of a recorded shape (graphs are on only without EP: ep_dev is false here): padded
     * to g.rows sequences of g.w tokens, block tables to a power of two */
    st = prepare_batch(m, kv, seqs, n_seqs, T, g.rows, 1 << g.wlog, g.w, g.w);
    if (st == DUET_OK) st = graph_run(m, kv, MDL_GRAPH_STEP, &g);
    if (st == DUET_OK) st = o->sync(be);
    if (st != DUET_OK) return st;
    m->last_T = T;
    /* the first n_out rows are the real sequences' (padding rows come after) */
    return finish_logits(m, n_out, logits);
}

/* ---- after a forward that left its logits in backend memory ---- */

duet_status mdl_sample_queue(mdl_model *m, be_sampler *s, int n) {
    if (n <= 0) return DUET_OK;
    if (!m->out_logits) return DUET_ERR_INVALID;
    return be_sample_queue(m->be, s, m->out_logits, m->out_stride, m->n_out, n);
}

duet_status mdl_logits_rows(mdl_model *m, const int32_t *rows, int n, float *out) {
    const be_ops *o = m->be->ops;
    size_t V = (size_t)m->cfg.vocab_size;
    for (int i = 0; i < n; i++) {
        if (!m->out_logits || rows[i] < 0 || rows[i] >= m->n_out) return DUET_ERR_INVALID;
        duet_status st = o->download(m->be, out + (size_t)i * V, m->out_logits,
                                     (size_t)rows[i] * (size_t)m->out_stride, V);
        if (st != DUET_OK) return st;
    }
    return DUET_OK;
}

/* ---- MTP drafts ---- */

int mdl_spec_tokens(const mdl_model *m) {
    return m->spec_tokens;
}

/* The recordable part of a pass of the MTP module over the batch already set (T tokens,
 * n_out logits rows), with buf.xn holding the hidden rows it starts from (mtp_gather):
 * x = eh_proj [enorm(embed(token)) | hnorm(hidden)]; the decoder layer on its own cache layer;
 * the output rows (pre-norm) kept in buf.mtp_prev; shared_head on them into buf.logits. Every
 * input comes from device memory (the batch's ids and out_rows), so a uniform pass can be
 * replayed as a graph. */
static duet_status mtp_compute(mdl_model *m, be_kv *kv, int T, int n_out) {
    const be_ops *o = m->be->ops;
    const cfg_model *c = &m->cfg;
    const mdl_mtp *t = m->w->mtp;
    be_backend *be = m->be;
    int D = c->hidden_size;
    float eps = c->rms_norm_eps;
    o->rmsnorm(be, m->buf.xn, D, m->buf.xn, D, t->hnorm, T, D, eps);
    o->embed(be, m->buf.h, NULL, T, t->embed, m->plan.vocab0);
    duet_status st = mdl_coll_allreduce(m->coll, m->buf.h, (size_t)T * D);
    if (st != DUET_OK) return st;
    o->rmsnorm(be, m->buf.o, D, m->buf.h, D, t->enorm, T, D, eps);
    /* eh_proj over the concatenation, as its two column halves */
    o->linear(be, m->buf.h, m->buf.o, D, T, t->eh_e);
    o->linear(be, m->buf.o2, m->buf.xn, D, T, t->eh_h);
    be_add_rmsnorm(be, m->buf.xn, m->buf.h, m->buf.o2, t->layer.attn_norm, T, D, eps);
    /* device routing under EP: the pass is a step of its own for the all-to-alls' capacity
     * (never in a recording: graphs are off under EP) */
    bool ep_dev = m->moe_dev && m->plan.shard.ep_size > 1 && t->layer.moe;
    if (ep_dev) st = mdl_coll_ep_begin(m->coll, T);
    if (st == DUET_OK) st = decoder_layer(m, kv, c->num_hidden_layers, &t->layer, T, NULL);
    if (ep_dev) {
        /* before any wait without a deadline, as in mdl_forward */
        duet_status est = mdl_coll_ep_end(m->coll);
        if (st == DUET_OK) st = est;
    }
    if (st != DUET_OK || n_out == 0) return st;
    o->gather_rows(be, m->buf.mtp_prev, m->buf.h, NULL, n_out, D);
    o->rmsnorm(be, m->buf.xn, D, m->buf.mtp_prev, D, t->head_norm, n_out, D, eps);
    o->linear(be, m->buf.logits, m->buf.xn, D, n_out, t->head);
    return DUET_OK;
}

/* The greedy token of each of the first n_out rows of the MTP head's logits into out[n_out]:
 * the rows gathered over TP in backend memory (collective), then one sampling call (the
 * device's argmax; n_out tokens downloaded). Outside any recording, as mdl_sample_queue is. */
static duet_status mtp_sample(mdl_model *m, int n_out, int32_t *out) {
    be_backend *be = m->be;
    const void *rows_dev;
    int stride;
    duet_status st = mdl_coll_logits_gather(m->coll, m->buf.logits, n_out, &rows_dev, &stride);
    if (st != DUET_OK) return st;
    if (n_out > m->cap_draft) {
        if (m->draft_smp) be_sampler_destroy(be, m->draft_smp);
        m->draft_smp = NULL;
        m->cap_draft = 0;
        st = be_sampler_create(be, m->buf.cap_out, m->cfg.vocab_size, 0, &m->draft_smp);
        if (st != DUET_OK) return st;
        m->cap_draft = m->buf.cap_out;
    }
    be_sampler *smp = m->draft_smp;
    for (int r = 0; r < n_out; r++) {
        be_sample_row_init(&smp->rows[r]); /* greedy: the first of equal maxima */
        smp->rows[r].logits_row = r;
    }
    st = be_sample(be, smp, rows_dev, stride, n_out, n_out);
    for (int r = 0; st == DUET_OK && r < n_out; r++) out[r] = smp->out[r].token;
    return st;
}

/* One pass of the MTP module over n sequences (T tokens, n_out of them wanting a draft):
 * hidden rows from src at host indices rows[T] (rows has room for the padded batch of a
 * recorded pass), then mtp_compute (replayed as a graph when the batch's shape allows), then
 * the drafts into out[n_out]. The gather of the hidden rows runs before, outside the
 * recording: its indices come from the host. */
static duet_status draft_pass(mdl_model *m, be_kv *kv, const mdl_seq *ms, int n, int T, int n_out,
                              const void *src, int32_t *rows, int32_t *out) {
    const be_ops *o = m->be->ops;
    be_backend *be = m->be;
    int D = m->cfg.hidden_size;
    mdl_graph_shape g;
    bool graphed =
        m->graphs.on && n_out == n &&
        mdl_graph_shape_of(MDL_GRAPH_DRAFT, ms, n, graph_cap_rows(m), kv->block_size, &g);
    duet_status st;
    if (!graphed) {
        st = prepare_batch(m, kv, ms, n, T, 0, 0, 0, 0);
        if (st != DUET_OK) return st;
        /* hidden rows first: src may be buf.mtp_prev, which the pass overwrites */
        o->gather_rows(be, m->buf.xn, src, rows, T, D);
        st = mtp_compute(m, kv, T, n_out);
    } else {
        int T_all = g.rows * g.w;
        for (int t = T; t < T_all; t++) rows[t] = 0; /* padding: any valid row */
        st = prepare_batch(m, kv, ms, n, T, g.rows, 1 << g.wlog, g.w, 1);
        if (st != DUET_OK) return st;
        o->gather_rows(be, m->buf.xn, src, rows, T_all, D);
        st = graph_run(m, kv, MDL_GRAPH_DRAFT, &g);
    }
    if (st == DUET_OK) st = o->sync(be);
    if (st != DUET_OK || n_out == 0) return st;
    return mtp_sample(m, n_out, out);
}

/* A pass of the MTP module with no tokens on this rank: only the MoE layer's all-to-alls,
 * which other ranks of the EP group are running with theirs (the empty step's rule). */
static duet_status mtp_join(mdl_model *m) {
    const mdl_layer *ly = &m->w->mtp->layer;
    if (!ly->moe || m->plan.shard.ep_size <= 1) return DUET_OK;
    if (!m->moe_dev) return moe_ep(m, ly, 0);
    duet_status st = mdl_coll_ep_begin(m->coll, 0);
    if (st == DUET_OK) st = moe_ep_dev(m, ly, 0);
    duet_status est = mdl_coll_ep_end(m->coll);
    return st == DUET_OK ? est : st;
}

int mdl_draft_passes(const mdl_draft_seq *seqs, int n_seqs) {
    int T = 0, K = 1;
    for (int i = 0; i < n_seqs; i++) {
        T += seqs[i].n_tokens > 0 ? seqs[i].n_tokens : 0;
        if (seqs[i].n_draft > K) K = seqs[i].n_draft;
    }
    return T > 0 ? K : 0;
}

duet_status mdl_draft(mdl_model *m, be_kv *kv, const mdl_draft_seq *seqs, int n_seqs,
                      int32_t *drafts) {
    return mdl_draft_joined(m, kv, seqs, n_seqs, drafts, 0);
}

duet_status mdl_draft_joined(mdl_model *m, be_kv *kv, const mdl_draft_seq *seqs, int n_seqs,
                             int32_t *drafts, int n_passes) {
    if (m->spec_tokens <= 0) return DUET_ERR_INVALID;
    int T = 0, n_out = 0, K = 0, done = 0;
    for (int i = 0; i < n_seqs; i++) {
        const mdl_draft_seq *q = &seqs[i];
        if (q->n_tokens < 1 || q->hid0 < 0 || q->hid0 + q->n_tokens > m->last_T || q->n_draft < 0 ||
            q->n_draft > MDL_MAX_DRAFT) {
            LOG_ERROR("model: draft sequence %d is malformed (%d tokens from hidden row %d of "
                      "%d, %d drafts)",
                      i, q->n_tokens, q->hid0, m->last_T, q->n_draft);
            return DUET_ERR_INVALID;
        }
        T += q->n_tokens;
        n_out += q->n_draft > 0;
        K = q->n_draft > K ? q->n_draft : K;
    }
    duet_status st = DUET_OK;
    if (T == 0) goto join;
    /* within what the last forward used: growing the buffers would lose buf.hid */
    if (T > m->buf.cap_tokens || n_out > m->buf.cap_out) return DUET_ERR_INVALID;
    mdl_seq *ms = calloc((size_t)n_seqs, sizeof *ms);
    /* rows: room for a recorded pass's padding too (mdl_graph_shape_of: within cap_tokens) */
    size_t n_rows = (size_t)(T > m->buf.cap_tokens ? T : m->buf.cap_tokens);
    int32_t *rows = malloc(n_rows * sizeof *rows), *tok = malloc((size_t)T * sizeof *tok);
    int32_t *got = malloc((size_t)(n_out + 1) * sizeof *got);
    int *who = malloc((size_t)(n_out + 1) * sizeof *who);
    if (!ms || !rows || !tok || !got || !who) {
        st = DUET_ERR_NO_MEMORY;
        goto out;
    }
    /* pass 1: every position of the last forward the caller names, tokens one ahead */
    int t = 0, r = 0;
    for (int i = 0; i < n_seqs; i++) {
        const mdl_draft_seq *q = &seqs[i];
        ms[i] = (mdl_seq){.tokens = q->tokens,
                          .n_tokens = q->n_tokens,
                          .pos0 = q->pos0,
                          .block_table = q->block_table,
                          .n_blocks = q->n_blocks,
                          .n_logits = q->n_draft > 0};
        for (int j = 0; j < q->n_tokens; j++) rows[t++] = q->hid0 + j;
        if (q->n_draft > 0) who[r++] = i;
    }
    st = draft_pass(m, kv, ms, n_seqs, T, n_out, m->buf.hid, rows, got);
    done = 1;
    for (int k = 0; st == DUET_OK && k < n_out; k++)
        drafts[(size_t)who[k] * MDL_MAX_DRAFT] = got[k];
    /* passes 2..K: one token per sequence still drafting, from its previous MTP output */
    for (int d = 1; st == DUET_OK && d < K; d++) {
        int n = 0;
        for (int k = 0; k < n_out; k++) {
            const mdl_draft_seq *q = &seqs[who[k]];
            if (q->n_draft <= d) continue;
            tok[n] = drafts[(size_t)who[k] * MDL_MAX_DRAFT + d - 1];
            rows[n] = k; /* its row of buf.mtp_prev from the pass before */
            ms[n] = (mdl_seq){.tokens = &tok[n],
                              .n_tokens = 1,
                              .pos0 = q->pos0 + q->n_tokens - 1 + d,
                              .block_table = q->block_table,
                              .n_blocks = q->n_blocks,
                              .n_logits = 1};
            who[n] = who[k];
            n++;
        }
        /* (who is compacted in place: entry n <= k is written after entry k is read) */
        n_out = n;
        st = draft_pass(m, kv, ms, n, n, n, m->buf.mtp_prev, rows, got);
        for (int k = 0; st == DUET_OK && k < n; k++)
            drafts[(size_t)who[k] * MDL_MAX_DRAFT + d] = got[k];
        done++;
    }
out:
    free(ms);
    free(rows);
    free(tok);
    free(got);
    free(who);
    if (st != DUET_OK) return st;
join:
    /* the passes other ranks of the EP group still run */
    for (; st == DUET_OK && done < n_passes; done++) st = mtp_join(m);
    return st;
}
