/* Dummy weights made on the device (be_ops.weight_create_dummy / vec_create_dummy, CUDA's
 * dummy.cu) against the host path (model/dummy_rule.h's values filled on the host, then
 * weight_create, weight_create_fp8 or vec_create), downloaded and compared byte for byte:
 * bf16, float32 (keep_f32 and the float32 backend), FP8 codes and block scales, vectors; slices
 * that start inside their tensor (r0, c0 != 0), odd sizes, rows past full_out, gate and up
 * fused. Then a whole dummy load (a small DeepSeek-V3 FP8 config with an MTP layer, TP 1 and
 * rank 1 of TP 2) through the op and through the host path gives the same bytes in every
 * tensor. Exit 77 (skip) without a CUDA device. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "model/backend.h"
#include "model/backends/cuda/backend_cuda.h"
#include "model/config.h"
#include "model/shard.h"
#include "model/weights.h"

/* bytes of a weight as the device holds it; scales appended for FP8 */
static unsigned char *weight_bytes(be_backend *be, const be_weight *w, size_t *n_p,
                                   dt_dtype *dt_p) {
    be_cuda_weight_view v;
    be_cuda_weight_view_of(w, &v);
    size_t n = (size_t)v.n_out * (size_t)v.n_in * dt_size(v.dtype);
    size_t ns = v.n_scales * sizeof(float);
    unsigned char *h = malloc(n + ns + 1);
    CHECK(be->ops->mem_download(be, h, v.data, n) == DUET_OK);
    if (ns) CHECK(be->ops->mem_download(be, h + n, v.scales, ns) == DUET_OK);
    *n_p = n + ns;
    *dt_p = v.dtype;
    return h;
}

static void same_weight(be_backend *be, const be_weight *a, const be_weight *b, const char *what) {
    if (!a || !b) {
        CHECK_MSG(!a && !b, "%s: on one side only", what);
        return;
    }
    size_t na, nb;
    dt_dtype ta, tb;
    unsigned char *ha = weight_bytes(be, a, &na, &ta), *hb = weight_bytes(be, b, &nb, &tb);
    CHECK_MSG(ta == tb && na == nb, "%s: %s of %zu bytes vs %s of %zu", what, dt_name(ta), na,
              dt_name(tb), nb);
    if (ta == tb && na == nb) {
        size_t first = na;
        for (size_t i = 0; i < na && first == na; i++)
            if (ha[i] != hb[i]) first = i;
        CHECK_MSG(first == na, "%s (%s): bytes differ from byte %zu of %zu", what, dt_name(ta),
                  first, na);
    }
    free(ha);
    free(hb);
}

static void same_vec(be_backend *be, const void *a, const void *b, int n, const char *what) {
    if (!a || !b) {
        CHECK_MSG(!a && !b, "%s: on one side only", what);
        return;
    }
    float *ha = malloc((size_t)n * 4 + 4), *hb = malloc((size_t)n * 4 + 4);
    CHECK(be->ops->mem_download(be, ha, a, (size_t)n * 4) == DUET_OK);
    CHECK(be->ops->mem_download(be, hb, b, (size_t)n * 4) == DUET_OK);
    CHECK_MSG(!memcmp(ha, hb, (size_t)n * 4), "%s: vectors differ", what);
    free(ha);
    free(hb);
}

/* ---- single weights ---- */

typedef struct wcase {
    const char *name[2];
    int parts, full_out, full_in, r0, c0, n_rows, n_in;
    bool keep_f32, fp8;
} wcase;

static void check_case(be_backend *be, const wcase *k, uint64_t seed) {
    dummy_slice s[2];
    for (int p = 0; p < k->parts; p++)
        s[p] = dummy_slice_of(k->name[p], seed, k->full_out, k->full_in, k->r0, k->c0);
    size_t n = (size_t)k->parts * k->n_rows * k->n_in;
    float *v = malloc(n * sizeof(float));
    for (int p = 0; p < k->parts; p++)
        for (int i = 0; i < k->n_rows; i++)
            for (int j = 0; j < k->n_in; j++)
                v[((size_t)p * k->n_rows + i) * k->n_in + j] = dummy_at(&s[p], i, j);
    be_weight *host = NULL, *dev = NULL;
    duet_status sh, sd;
    char what[256];
    snprintf(what, sizeof what, "%s backend: %s%s [%d x %d, %d] at (%d, %d)%s%s",
             dt_name(be->ops->act_dtype), k->name[0], k->parts > 1 ? " + up" : "", k->parts,
             k->n_rows, k->n_in, k->r0, k->c0, k->keep_f32 ? " keep_f32" : "",
             k->fp8 ? " fp8" : "");
    if (k->fp8) {
        int cb = (k->n_in + 127) / 128, rb = k->parts * ((k->n_rows + 127) / 128);
        uint8_t *q = malloc(n);
        float *sc = malloc((size_t)rb * cb * sizeof(float));
        for (size_t i = 0; i < n; i++) q[i] = dummy_e4m3(v[i] * dummy_fp8_inv());
        for (int i = 0; i < rb * cb; i++) sc[i] = dummy_fp8_scale();
        sh = be->ops->weight_create_fp8(be, q, sc, k->parts * k->n_rows, k->n_in, k->n_rows, &host);
        free(q);
        free(sc);
    } else {
        sh = be->ops->weight_create(be, v, k->parts * k->n_rows, k->n_in, k->keep_f32, &host);
    }
    sd = be->ops->weight_create_dummy(be, s, k->parts, k->n_rows, k->n_in, k->keep_f32, k->fp8,
                                      &dev);
    CHECK_MSG(sh == sd, "%s: host path %s, device op %s", what, duet_strerror(sh),
              duet_strerror(sd));
    if (sh == DUET_OK && sd == DUET_OK) same_weight(be, host, dev, what);
    /* the values are not all one number (a kernel that wrote nothing would not pass above
     * either: the host path wrote every byte) */
    int distinct = 0;
    for (size_t i = 1; i < n && !distinct; i++) distinct = v[i] != v[0];
    CHECK_MSG(distinct, "%s: constant values", what);
    printf("%-90s %s\n", what, sh == DUET_OK ? "same bytes" : duet_strerror(sh));
    be->ops->weight_destroy(be, host);
    be->ops->weight_destroy(be, dev);
    free(v);
}

static void check_vec(be_backend *be, const char *name, int n, uint64_t seed) {
    dummy_slice s = dummy_slice_of(name, seed, n, 0, 0, 0);
    float *v = malloc((size_t)n * sizeof(float));
    for (int i = 0; i < n; i++) v[i] = dummy_at(&s, i, 0);
    void *a = NULL, *b = NULL;
    CHECK(be->ops->vec_create(be, v, n, &a) == DUET_OK);
    CHECK(be->ops->vec_create_dummy(be, &s, n, &b) == DUET_OK);
    same_vec(be, a, b, n, name);
    be->ops->buf_free(be, a);
    be->ops->buf_free(be, b);
    free(v);
}

static void check_weights(be_backend *be) {
    const char *q = "model.layers.0.self_attn.q_b_proj.weight";
    const char *g = "model.layers.2.mlp.experts.5.gate_proj.weight";
    const char *u = "model.layers.2.mlp.experts.5.up_proj.weight";
    const wcase cases[] = {
        {{q, NULL}, 1, 1000, 333, 129, 37, 517, 251, false, false},
        {{q, NULL}, 1, 1000, 333, 0, 0, 1000, 333, false, false},
        {{"lm_head.weight", NULL}, 1, 1000, 96, 900, 0, 150, 96, false, false}, /* 50 pad rows */
        {{"model.layers.1.mlp.gate.weight", NULL}, 1, 257, 129, 0, 0, 257, 129, true, false},
        {{g, u}, 2, 777, 300, 300, 20, 477, 255, false, false},
        {{q, NULL}, 1, 1000, 512, 128, 256, 300, 208, false, true},
        {{g, u}, 2, 640, 384, 128, 0, 200, 384, false, true},
        {{g, u}, 2, 640, 384, 0, 0, 640, 384, false, true},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) check_case(be, &cases[i], 1234);
    check_case(be, &cases[0], 0);
    check_vec(be, "model.layers.3.post_attention_layernorm.weight", 7168, 5);
    check_vec(be, "model.layers.3.mlp.gate.e_score_correction_bias", 256, 5);
    check_vec(be, "model.layers.3.some_vector", 1001, 5); /* uniform values */
}

/* ---- a whole load ---- */

static const char *k_config =
    "{\"architectures\":[\"DeepseekV3ForCausalLM\"],\"model_type\":\"deepseek_v3\","
    "\"vocab_size\":2047,\"hidden_size\":256,\"intermediate_size\":384,"
    "\"moe_intermediate_size\":128,\"num_hidden_layers\":3,\"num_attention_heads\":4,"
    "\"num_key_value_heads\":4,\"n_shared_experts\":1,\"n_routed_experts\":8,"
    "\"routed_scaling_factor\":2.5,\"kv_lora_rank\":64,\"q_lora_rank\":192,"
    "\"qk_rope_head_dim\":16,\"v_head_dim\":32,\"qk_nope_head_dim\":32,\"topk_method\":"
    "\"noaux_tc\",\"n_group\":4,\"topk_group\":2,\"num_experts_per_tok\":4,\"moe_layer_freq\":1,"
    "\"first_k_dense_replace\":1,\"norm_topk_prob\":true,\"scoring_func\":\"sigmoid\","
    "\"hidden_act\":\"silu\",\"max_position_embeddings\":4096,\"rms_norm_eps\":1e-06,"
    "\"rope_theta\":10000.0,\"tie_word_embeddings\":false,\"bos_token_id\":0,\"eos_token_id\":1,"
    "\"torch_dtype\":\"bfloat16\",\"num_nextn_predict_layers\":1,\"quantization_config\":"
    "{\"activation_scheme\":\"dynamic\",\"fmt\":\"e4m3\",\"quant_method\":\"fp8\","
    "\"weight_block_size\":[128,128]}}";

static void same_ffn(be_backend *be, const be_ffn *a, const be_ffn *b, const char *what) {
    same_weight(be, a->gate_up, b->gate_up, what);
    same_weight(be, a->down, b->down, what);
}

static void same_layer(be_backend *be, const cfg_model *c, const mdl_plan *pl, const mdl_layer *x,
                       const mdl_layer *y) {
    int D = c->hidden_size;
    same_vec(be, x->attn_norm, y->attn_norm, D, "attn_norm");
    same_vec(be, x->ffn_norm, y->ffn_norm, D, "ffn_norm");
    same_vec(be, x->q_a_norm, y->q_a_norm, c->q_lora_rank, "q_a_norm");
    same_vec(be, x->kv_a_norm, y->kv_a_norm, c->kv_lora_rank, "kv_a_norm");
    same_vec(be, x->gate_bias, y->gate_bias, c->n_routed_experts, "gate_bias");
    same_weight(be, x->q_a, y->q_a, "q_a");
    same_weight(be, x->q_b, y->q_b, "q_b");
    same_weight(be, x->kv_a, y->kv_a, "kv_a");
    same_weight(be, x->kv_b, y->kv_b, "kv_b");
    same_weight(be, x->o, y->o, "o");
    same_weight(be, x->gate, y->gate, "gate");
    same_ffn(be, &x->dense, &y->dense, "dense");
    for (int e = 0; x->moe && e < pl->n_local_experts; e++)
        same_ffn(be, &x->experts[e], &y->experts[e], "expert");
    same_ffn(be, &x->shared, &y->shared, "shared");
}

static void check_load(be_backend *be, const char *dir, int tp, int rank) {
    cfg_model c;
    if (cfg_load(dir, &c) != DUET_OK) {
        CHECK_MSG(0, "config at %s", dir);
        return;
    }
    mdl_shard sh = {.tp_rank = rank, .tp_size = tp, .ep_rank = 0, .ep_size = 1};
    mdl_plan plan;
    CHECK(mdl_shard_plan(&c, &sh, &plan) == DUET_OK);
    const be_ops *own = be->ops;
    be_ops host = *own;
    host.weight_create_dummy = NULL;
    host.vec_create_dummy = NULL;
    mdl_weights *wh = NULL, *wd = NULL;
    be->ops = &host;
    CHECK(mdl_weights_load(dir, &c, &plan, be, MDL_WEIGHTS_DUMMY, 3, &wh) == DUET_OK);
    if (wh) CHECK(mdl_weights_load_mtp(dir, &c, &plan, MDL_WEIGHTS_DUMMY, 3, wh) == DUET_OK);
    be->ops = own;
    CHECK(mdl_weights_load(dir, &c, &plan, be, MDL_WEIGHTS_DUMMY, 3, &wd) == DUET_OK);
    if (wd) CHECK(mdl_weights_load_mtp(dir, &c, &plan, MDL_WEIGHTS_DUMMY, 3, wd) == DUET_OK);
    if (wh && wd) {
        int D = c.hidden_size;
        same_weight(be, wh->embed, wd->embed, "embed");
        same_weight(be, wh->lm_head, wd->lm_head, "lm_head");
        same_vec(be, wh->final_norm, wd->final_norm, D, "final_norm");
        for (int l = 0; l < c.num_hidden_layers; l++)
            same_layer(be, &c, &plan, &wh->layers[l], &wd->layers[l]);
        if (wh->mtp && wd->mtp) {
            same_weight(be, wh->mtp->embed, wd->mtp->embed, "mtp embed");
            same_weight(be, wh->mtp->head, wd->mtp->head, "mtp head");
            same_weight(be, wh->mtp->eh_e, wd->mtp->eh_e, "eh_e");
            same_weight(be, wh->mtp->eh_h, wd->mtp->eh_h, "eh_h");
            same_vec(be, wh->mtp->enorm, wd->mtp->enorm, D, "enorm");
            same_vec(be, wh->mtp->hnorm, wd->mtp->hnorm, D, "hnorm");
            same_vec(be, wh->mtp->head_norm, wd->mtp->head_norm, D, "head_norm");
            same_layer(be, &c, &plan, &wh->mtp->layer, &wd->mtp->layer);
        }
    }
    printf("%s backend: a whole dummy load, tp %d rank %d: compared\n", dt_name(be->ops->act_dtype),
           tp, rank);
    mdl_weights_destroy(wh);
    mdl_weights_destroy(wd);
}

int main(void) {
    if (be_cuda_device_count() == 0) {
        fprintf(stderr, "no CUDA device: skipped\n");
        return 77;
    }
    char dir[] = "/tmp/duet-dummy-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    char path[256];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    CHECK(f != NULL);
    if (f) {
        fputs(k_config, f);
        fclose(f);
    }
    const dt_dtype types[2] = {DT_BF16, DT_F32};
    for (int t = 0; t < 2; t++) {
        be_backend *be = NULL;
        CHECK(be_cuda_create(0, types[t], &be) == DUET_OK);
        if (!be) continue;
        check_weights(be);
        check_load(be, dir, 1, 0);
        check_load(be, dir, 2, 1);
        CHECK(be->ops->sync(be) == DUET_OK);
        be_destroy(be);
    }
    unlink(path);
    rmdir(dir);
    CHECK_DONE();
}
