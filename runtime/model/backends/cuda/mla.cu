/* MLA attention over the paged latent cache (see be_ops.mla_attention and the CPU reference's
 * attend_absorbed / attend_expanded). Both forms share one kernel, one block per (query
 * token, head), walking the context in tiles with an online (running max) float32 softmax:
 *   absorbed (single-token decode): q_nope is folded into the latent space through W_uk,
 *     scores and the weighted sum run over cached latents, W_uv maps the result back;
 *   expanded (prompt chunks): the sequence's latents go through kv_b once (a cuBLAS GEMM)
 *     into keys and values for every head, then plain causal attention.
 * Both take the rope part of the key from the cache. */
#include "model/backends/cuda/cuda-impl.cuh"

#define MLA_TILE    64  /* context positions scored per round */
#define MLA_THREADS 128 /* 4 warps; MLA_TILE <= MLA_THREADS */

template <typename T> struct mla_args {
    T *out;         /* [T, H * v] */
    const T *q;     /* [T, H * (nope + rope)] */
    const T *cache; /* the pool: [block][layer][bs][kv_dim] */
    const int32_t *table, *pos;
    const int32_t *tok, *seq; /* absorbed: token and sequence of each block row */
    int t0, seq0;             /* expanded: the chunk's first token and its sequence */
    const T *kvx;             /* expanded: [ctx, H * (nope + v)] keys and values */
    const T *wkvb;            /* absorbed: kv_b [H * (nope + v), L] */
    int H, nope, rope, v, L, kv_dim, n_layers, bs, max_blocks, layer;
    float scale;
};

template <typename T, bool ABS>
__global__ void __launch_bounds__(MLA_THREADS) mla_kernel(mla_args<T> a) {
    extern __shared__ float sh[];
    const int A = ABS ? a.L : a.nope, Vd = ABS ? a.L : a.v;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
    /* qa [A] (latent-space or nope query), qr [rope], acc [Vd], sc [TILE], rowoff [TILE] */
    float *qa = sh, *qr = qa + A, *acc = qr + a.rope, *sc = acc + Vd;
    size_t *rowoff = (size_t *)(sh + ((A + a.rope + Vd + MLA_TILE + 1) & ~1));
    const int h = blockIdx.y;
    const int t = ABS ? a.tok[blockIdx.x] : a.t0 + (int)blockIdx.x;
    const int s = ABS ? a.seq[blockIdx.x] : a.seq0;
    const int upto = a.pos[t] + 1; /* causal: positions 0 .. own */
    const int hw = a.nope + a.v, kvw = a.H * hw;
    const T *qh = a.q + (size_t)t * a.H * (a.nope + a.rope) + (size_t)h * (a.nope + a.rope);

    for (int r = tid; r < a.rope; r += blockDim.x) qr[r] = to_f(qh[a.nope + r]);
    if (ABS) {
        /* q_lat[l] = sum_i q_nope[i] * W_uk[h][i][l] */
        const T *wh = a.wkvb + (size_t)h * hw * a.L;
        for (int l = tid; l < a.L; l += blockDim.x) {
            float d = 0.0f;
            for (int i = 0; i < a.nope; i++) d += to_f(qh[i]) * to_f(wh[(size_t)i * a.L + l]);
            qa[l] = d;
        }
    } else {
        for (int e = tid; e < a.nope; e += blockDim.x) qa[e] = to_f(qh[e]);
    }
    for (int e = tid; e < Vd; e += blockDim.x) acc[e] = 0.0f;
    __syncthreads();

    float m = -INFINITY, sum = 0.0f; /* identical in every thread */
    for (int j0 = 0; j0 < upto; j0 += MLA_TILE) {
        const int nj = min(MLA_TILE, upto - j0);
        for (int jj = warp; jj < nj; jj += nw) {
            const int j = j0 + jj;
            const int blk = a.table[(size_t)s * a.max_blocks + j / a.bs];
            const size_t row =
                (((size_t)blk * a.n_layers + a.layer) * a.bs + (size_t)(j % a.bs)) * a.kv_dim;
            const T *key = ABS ? a.cache + row : a.kvx + (size_t)j * kvw + (size_t)h * hw;
            const T *kr = a.cache + row + a.L;
            float d = 0.0f;
            for (int e = lane; e < A; e += 32) d += qa[e] * to_f(key[e]);
            for (int r = lane; r < a.rope; r += 32) d += qr[r] * to_f(kr[r]);
            d = warp_sum(d);
            if (lane == 0) {
                sc[jj] = d * a.scale;
                rowoff[jj] = row;
            }
        }
        __syncthreads();
        float tmax = -INFINITY;
        for (int jj = 0; jj < nj; jj++) tmax = fmaxf(tmax, sc[jj]);
        const float mn = fmaxf(m, tmax), corr = expf(m - mn); /* first tile: exp(-inf) = 0 */
        __syncthreads();                                      /* every thread has read the scores */
        if (tid < nj) sc[tid] = expf(sc[tid] - mn);
        __syncthreads();
        float ts = 0.0f;
        for (int jj = 0; jj < nj; jj++) ts += sc[jj];
        sum = sum * corr + ts;
        for (int e = tid; e < Vd; e += blockDim.x) {
            float o = acc[e] * corr;
            for (int jj = 0; jj < nj; jj++) {
                const T *val = ABS ? a.cache + rowoff[jj]
                                   : a.kvx + (size_t)(j0 + jj) * kvw + (size_t)h * hw + a.nope;
                o += sc[jj] * to_f(val[e]);
            }
            acc[e] = o;
        }
        m = mn;
        __syncthreads(); /* the next tile overwrites sc and rowoff */
    }

    const float inv = 1.0f / sum;
    T *o = a.out + (size_t)t * a.H * a.v + (size_t)h * a.v;
    if (ABS) {
        for (int e = tid; e < Vd; e += blockDim.x) acc[e] *= inv;
        __syncthreads();
        /* out[i] = W_uv[h][i] . o_lat */
        const T *wv = a.wkvb + ((size_t)h * hw + a.nope) * a.L;
        for (int e = warp; e < a.v; e += nw) {
            float d = 0.0f;
            for (int l = lane; l < a.L; l += 32) d += to_f(wv[(size_t)e * a.L + l]) * acc[l];
            d = warp_sum(d);
            if (lane == 0) o[e] = from_f<T>(d);
        }
    } else {
        for (int e = tid; e < Vd; e += blockDim.x) o[e] = from_f<T>(acc[e] * inv);
    }
}

/* lat[j, :L] = latent of position j of sequence s, j < ctx */
template <typename T>
__global__ void gather_latents(T *lat, const T *cache, const int32_t *table, int s, int ctx, int L,
                               int kv_dim, int n_layers, int bs, int max_blocks, int layer) {
    size_t n = (size_t)ctx * L;
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n;
         k += (size_t)gridDim.x * blockDim.x) {
        int j = (int)(k / L), l = (int)(k % L);
        int blk = table[(size_t)s * max_blocks + j / bs];
        size_t row = (((size_t)blk * n_layers + layer) * bs + (size_t)(j % bs)) * kv_dim;
        lat[k] = cache[row + l];
    }
}

static size_t mla_smem(int A, int rope, int Vd) {
    return (size_t)((A + rope + Vd + MLA_TILE + 1) & ~1) * sizeof(float) +
           MLA_TILE * sizeof(size_t);
}

template <typename T>
static void mla_run(cuda_backend *c, void *out, const void *q, be_kv *kv, int layer,
                    const be_weight *kv_b, int H, int nope, int rope, int v, float scale) {
    const int L = kv->kv_dim - rope;
    mla_args<T> a = {};
    a.out = (T *)out;
    a.q = (const T *)q;
    a.cache = (const T *)kv->data;
    a.table = c->d_table;
    a.pos = c->d_pos;
    a.wkvb = (const T *)kv_b->w;
    a.H = H;
    a.nope = nope;
    a.rope = rope;
    a.v = v;
    a.L = L;
    a.kv_dim = kv->kv_dim;
    a.n_layers = kv->n_layers;
    a.bs = kv->block_size;
    a.max_blocks = c->max_blocks;
    a.layer = layer;
    a.scale = scale;

    /* single-token sequences: one absorbed launch for all of them */
    int n_dec = 0, max_ctx = 0;
    for (int s = 0; s < c->n_seqs; s++) {
        int n = c->h_start[s + 1] - c->h_start[s];
        if (n == 1) n_dec++;
        if (n > 1 && c->h_ctx[s] > max_ctx) max_ctx = c->h_ctx[s];
    }
    if (n_dec) {
        int32_t *h = (int32_t *)cuda_host_tmp(c, (size_t)n_dec * 2 * sizeof(int32_t));
        if (!h) return;
        for (int s = 0, i = 0; s < c->n_seqs; s++)
            if (c->h_start[s + 1] - c->h_start[s] == 1) {
                h[i] = c->h_start[s];
                h[n_dec + i] = s;
                i++;
            }
        int32_t *d = cuda_upload_idx(c, h, (size_t)n_dec * 2);
        if (!d) return;
        a.tok = d;
        a.seq = d + n_dec;
        mla_kernel<T, true><<<dim3(n_dec, H), MLA_THREADS, mla_smem(L, rope, L), c->stream>>>(a);
        if (CUDA_LAUNCHED(c, "mla_kernel (absorbed)") != DUET_OK) return;
    }
    if (!max_ctx) return;

    /* prompt chunks: per sequence, latents -> keys/values of every head, then attention */
    const int kvw = H * (nope + v);
    size_t lat_n = (size_t)max_ctx * L, kvx_n = (size_t)max_ctx * kvw;
    T *lat = (T *)cuda_scratch(c, SCR_OP, (lat_n + kvx_n) * sizeof(T));
    if (!lat) return;
    T *kvx = lat + lat_n;
    a.kvx = kvx;
    for (int s = 0; s < c->n_seqs; s++) {
        int t0 = c->h_start[s], n = c->h_start[s + 1] - t0, ctx = c->h_ctx[s];
        if (n <= 1) continue;
        size_t cnt = (size_t)ctx * L;
        unsigned g = (unsigned)((cnt + 255) / 256 < 65535 * 16 ? (cnt + 255) / 256 : 65535 * 16);
        gather_latents<T><<<g, 256, 0, c->stream>>>(lat, (const T *)kv->data, c->d_table, s, ctx, L,
                                                    kv->kv_dim, kv->n_layers, kv->block_size,
                                                    c->max_blocks, layer);
        if (CUDA_LAUNCHED(c, "gather_latents") != DUET_OK) return;
        /* kvx[ctx, H * (nope + v)] = lat[ctx, L] @ kv_b^T */
        cuda_gemm_act(c, kvx, kvw, lat, L, ctx, kv_b->w, kvw, L);
        a.t0 = t0;
        a.seq0 = s;
        mla_kernel<T, false><<<dim3(n, H), MLA_THREADS, mla_smem(nope, rope, v), c->stream>>>(a);
        if (CUDA_LAUNCHED(c, "mla_kernel (expanded)") != DUET_OK) return;
    }
}

void cuda_mla_attention(be_backend *be, void *out, const void *q, be_kv *kv, int layer,
                        const be_weight *kv_b, int H, int nope, int rope, int v, float scale) {
    cuda_backend *c = cuda_be(be);
    if (c->err != DUET_OK || c->n_tokens <= 0 || H <= 0) return;
    if (kv_b->dtype != c->act || kv->dtype != c->act) {
        LOG_ERROR("cuda backend: MLA needs kv_b and the KV cache in the activation type");
        c->err = DUET_ERR_INTERNAL;
        return;
    }
    if (c->act == DT_BF16)
        mla_run<bf16>(c, out, q, kv, layer, kv_b, H, nope, rope, v, scale);
    else
        mla_run<float>(c, out, q, kv, layer, kv_b, H, nope, rope, v, scale);
}
