/*
 * layer.c -- torch.nn.MultiheadAttention: weights, projections, attention
 * over the heads, output projection.
 *
 * Data flow of one forward call (N batches, L queries, S keys, h heads of
 * width d = E / h); the projections are GEMMs against weights packed when
 * they are set (gemm.c), the attention is flash.c's fused kernel:
 *   Q = query W_q^T + b_q            [N, L, E]   layer scratch
 *   K = key   W_k^T + b_k            [N, S', E]  S' = S (+1 bias_k) (+1 zero)
 *   V = value W_v^T + b_v            [N, S', E]
 *   A = attention over [N, h, *, d] views of Q, K, V (no copies)
 *   attn_output = A W_o^T + b_o      written through the caller's strides
 *   attn_weights, if asked, recomputed from the saved row max and sum.
 */
#include "attention.h"
#include "gemm.h"
#include "internal.h"

#include <math.h>
#include <string.h>

enum { LAYER_MAGIC = 0x6d68616c }; /* "mhal": catches use of a freed or foreign pointer */

struct mha_layer {
    uint32_t       magic;
    mha_layer_desc desc;
    int64_t        head_dim;
    float         *w_in;      /* W_q [E, E], W_k [E, kdim], W_v [E, vdim], back to back */
    float         *w_q, *w_k, *w_v;
    float         *b_in;      /* [3E] or NULL */
    float         *w_out;     /* [E, E] */
    float         *b_out;     /* [E] or NULL */
    float         *bias_k, *bias_v;  /* [E] or NULL */
    const mha__kernels *kt;   /* the kernels the packs below were made for */
    mha__packed    pk_q, pk_k, pk_v, pk_out;  /* the four matrices, packed for the GEMM */
};

void mha_layer_desc_init(mha_layer_desc *desc)
{
    memset(desc, 0, sizeof *desc);
    desc->bias = 1;
}

void mha_layer_fwd_args_init(mha_layer_fwd_args *args)
{
    memset(args, 0, sizeof *args);
    args->average_attn_weights = 1;
}

static mha_status check_desc(const mha_layer_desc *d)
{
    if (d->embed_dim < 1) return mha__fail(MHA_ERR_INVALID_ARG, "embed_dim must be positive, got %lld", (long long)d->embed_dim);
    if (d->num_heads < 1) return mha__fail(MHA_ERR_INVALID_ARG, "num_heads must be positive, got %lld", (long long)d->num_heads);
    if (d->embed_dim % d->num_heads)
        return mha__fail(MHA_ERR_INVALID_ARG, "embed_dim %lld is not divisible by num_heads %lld, so the heads cannot have equal width",
                         (long long)d->embed_dim, (long long)d->num_heads);
    if (d->kdim < 0 || d->vdim < 0)
        return mha__fail(MHA_ERR_INVALID_ARG, "kdim and vdim must be >= 0 (0 = embed_dim), got %lld and %lld",
                         (long long)d->kdim, (long long)d->vdim);
    int64_t e2;
    if (!mha__mul(d->embed_dim, d->embed_dim, &e2) || e2 > INT64_MAX / 8)
        return mha__fail(MHA_ERR_INVALID_ARG, "embed_dim %lld is too large", (long long)d->embed_dim);
    return MHA_OK;
}

/* Refresh the packed copy of whichever matrix starts at `changed` (all
 * three input projections for the packed in_proj_weight). */
static mha_status repack(mha_layer *l, const float *changed)
{
    const mha_layer_desc *d = &l->desc;
    int64_t E = d->embed_dim;
    mha_status st = MHA_OK;
    if (changed == l->w_out) return mha__pack(&l->pk_out, l->kt, l->w_out, E, E);
    if (changed == l->w_in || changed == l->w_q) st = mha__pack(&l->pk_q, l->kt, l->w_q, E, E);
    if (st == MHA_OK && (changed == l->w_in || changed == l->w_k)) st = mha__pack(&l->pk_k, l->kt, l->w_k, E, d->kdim);
    if (st == MHA_OK && (changed == l->w_in || changed == l->w_v)) st = mha__pack(&l->pk_v, l->kt, l->w_v, E, d->vdim);
    return st;
}

mha_status mha_layer_create(const mha_layer_desc *desc, mha_layer **out_layer)
{
    if (!desc || !out_layer) return mha__fail(MHA_ERR_MISUSE, "mha_layer_create: NULL argument");
    *out_layer = NULL;
    mha_status st = check_desc(desc);
    if (st != MHA_OK) return st;
    mha_layer_desc d = *desc;
    int64_t E = d.embed_dim;
    if (!d.kdim) d.kdim = E;
    if (!d.vdim) d.vdim = E;
    int64_t in_cols, in_size;
    if (!mha__add(E, d.kdim, &in_cols) || !mha__add(in_cols, d.vdim, &in_cols) || !mha__mul(E, in_cols, &in_size))
        return mha__fail(MHA_ERR_INVALID_ARG, "kdim %lld or vdim %lld is too large", (long long)d.kdim, (long long)d.vdim);
    mha_layer *l = mha__calloc(1, sizeof *l);
    if (!l) return MHA_ERR_NOMEM;
    l->magic = LAYER_MAGIC;
    l->desc = d;
    l->head_dim = E / d.num_heads;
    l->w_in = mha__calloc(in_size, sizeof(float));
    l->w_out = mha__calloc(E * E, sizeof(float));
    bool ok = l->w_in && l->w_out;
    if (ok && d.bias) ok = (l->b_in = mha__calloc(3 * E, sizeof(float))) && (l->b_out = mha__calloc(E, sizeof(float)));
    if (ok && d.add_bias_kv)
        ok = (l->bias_k = mha__calloc(E, sizeof(float))) && (l->bias_v = mha__calloc(E, sizeof(float)));
    if (!ok) {
        mha_layer_free(l);
        return MHA_ERR_NOMEM;
    }
    l->w_q = l->w_in;
    l->w_k = l->w_q + E * E;
    l->w_v = l->w_k + E * d.kdim;
    l->kt = mha__kernels_get();
    if ((st = repack(l, l->w_in)) != MHA_OK || (st = repack(l, l->w_out)) != MHA_OK) {
        mha_layer_free(l);
        return st;
    }
    *out_layer = l;
    return MHA_OK;
}

void mha_layer_free(mha_layer *l)
{
    if (!l) return;
    l->magic = 0;
    mha__free(l->w_in);
    mha__free(l->w_out);
    mha__free(l->b_in);
    mha__free(l->b_out);
    mha__free(l->bias_k);
    mha__free(l->bias_v);
    mha__packed_free(&l->pk_q);
    mha__packed_free(&l->pk_k);
    mha__packed_free(&l->pk_v);
    mha__packed_free(&l->pk_out);
    mha__free(l);
}

static mha_status check_layer(const mha_layer *l, const char *fn)
{
    if (!l || l->magic != LAYER_MAGIC) return mha__fail(MHA_ERR_MISUSE, "%s: not a live mha_layer", fn);
    return MHA_OK;
}

const mha_layer_desc *mha_layer_get_desc(const mha_layer *l)
{
    return check_layer(l, "mha_layer_get_desc") == MHA_OK ? &l->desc : NULL;
}

/* ---------------------------------------------------------------- */
/* Weights by PyTorch name                                           */
/* ---------------------------------------------------------------- */

/* Where each state_dict tensor of this layer lives, and its size; NULL
 * dst when the layer's configuration has no such tensor. */
typedef struct weight_slot {
    const char *name;
    float      *dst;
    int64_t     numel;
} weight_slot;

static int weight_slots(mha_layer *l, weight_slot slots[8])
{
    const mha_layer_desc *d = &l->desc;
    int64_t E = d->embed_dim;
    bool packed = d->kdim == E && d->vdim == E; /* PyTorch's _qkv_same_embed_dim */
    int n = 0;
    slots[n++] = (weight_slot){"in_proj_weight", packed ? l->w_in : NULL, 3 * E * E};
    slots[n++] = (weight_slot){"q_proj_weight", packed ? NULL : l->w_q, E * E};
    slots[n++] = (weight_slot){"k_proj_weight", packed ? NULL : l->w_k, E * d->kdim};
    slots[n++] = (weight_slot){"v_proj_weight", packed ? NULL : l->w_v, E * d->vdim};
    slots[n++] = (weight_slot){"in_proj_bias", l->b_in, 3 * E};
    slots[n++] = (weight_slot){"out_proj.weight", l->w_out, E * E};
    slots[n++] = (weight_slot){"out_proj.bias", l->b_out, E};
    slots[n++] = (weight_slot){"bias_k", l->bias_k, E};
    return n;
}

static weight_slot *find_slot(weight_slot *slots, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (strcmp(slots[i].name, name) == 0) return &slots[i];
    return NULL;
}

mha_status mha_layer_set_weight(mha_layer *l, const char *name, const float *data, int64_t numel)
{
    mha_status st = check_layer(l, "mha_layer_set_weight");
    if (st != MHA_OK) return st;
    if (!name || !data) return mha__fail(MHA_ERR_MISUSE, "mha_layer_set_weight: NULL argument");
    weight_slot slots[8];
    int n = weight_slots(l, slots);
    weight_slot bias_v = {"bias_v", l->bias_v, l->desc.embed_dim};
    weight_slot *s = strcmp(name, "bias_v") == 0 ? &bias_v : find_slot(slots, n, name);
    if (!s || !s->dst)
        return mha__fail(MHA_ERR_NOT_FOUND, "\"%s\" is not a weight of this layer configuration", name);
    if (numel != s->numel)
        return mha__fail(MHA_ERR_INVALID_ARG, "%s needs %lld values, got %lld", name, (long long)s->numel, (long long)numel);
    memcpy(s->dst, data, (size_t)numel * sizeof(float));
    return repack(l, s->dst);
}

/* ---------------------------------------------------------------- */
/* Projections                                                       */
/* ---------------------------------------------------------------- */

/* y[n, t, :] = x[n, t, :] W^T + b for a [N, T, F] view x and an output
 * view y with unit column stride: one GEMM when the rows are evenly spaced,
 * else one per batch. */
static void project(mha_ctx *ctx, const mha_layer *l, const mha_tensor *x, const mha__packed *w, const float *b,
                    const mha_tensor *y)
{
    int64_t N = x->shape[0], T = x->shape[1];
    bool even = (N == 1 || x->stride[0] == T * x->stride[1]) && (N == 1 || y->stride[0] == T * y->stride[1]);
    if (even) {
        mha__linear(ctx, l->kt, N * T, x->data, x->stride[1], x->stride[2], w, b, y->data, y->stride[1]);
        return;
    }
    for (int64_t n = 0; n < N; n++)
        mha__linear(ctx, l->kt, T, x->data + n * x->stride[0], x->stride[1], x->stride[2], w, b,
                    y->data + n * y->stride[0], y->stride[1]);
}

/* ---------------------------------------------------------------- */
/* Forward                                                           */
/* ---------------------------------------------------------------- */

static mha_status check_forward(const mha_layer *l, const mha_tensor *attn_output, const mha_tensor *attn_weights,
                                const mha_layer_fwd_args *a)
{
    const mha_layer_desc *d = &l->desc;
    const int64_t q_shape[4] = {-1, -1, d->embed_dim, 1};
    mha_status st = mha__check_tensor(&a->query, "query", q_shape);
    if (st != MHA_OK) return st;
    int64_t N = a->query.shape[0], L = a->query.shape[1];
    const int64_t k_shape[4] = {N, -1, d->kdim, 1};
    if ((st = mha__check_tensor(&a->key, "key", k_shape)) != MHA_OK) return st;
    int64_t S = a->key.shape[1];
    const int64_t v_shape[4] = {N, S, d->vdim, 1};
    if ((st = mha__check_tensor(&a->value, "value", v_shape)) != MHA_OK) return st;
    if ((st = mha__check_tensor(attn_output, "attn_output", q_shape)) != MHA_OK) return st;
    const int64_t o_shape[4] = {N, L, d->embed_dim, 1};
    if ((st = mha__check_tensor(attn_output, "attn_output", o_shape)) != MHA_OK) return st;
    if (attn_weights) {
        int64_t heads = a->average_attn_weights ? 1 : d->num_heads;
        const int64_t w_shape[4] = {N, heads, L, S + !!d->add_bias_kv + !!d->add_zero_attn};
        if ((st = mha__check_tensor(attn_weights, "attn_weights", w_shape)) != MHA_OK) return st;
    }
    return MHA_OK;
}

/* The layer's scratch: Q, K, V, the concatenated heads and the row
 * statistics that attn_weights are recomputed from. */
typedef struct layer_buffers {
    float *q, *k, *v, *heads;
    mha__row_stats stats;
} layer_buffers;

static mha_status layer_buffers_get(mha_ctx *ctx, int64_t N, int64_t L, int64_t S1, int64_t E, int64_t H,
                                    layer_buffers *b)
{
    int64_t nq, nk, nlse, total;
    if (!mha__mul(N, L, &nq) || !mha__mul(nq, E, &nq) || !mha__mul(N, S1, &nk) || !mha__mul(nk, E, &nk) ||
        !mha__mul(N, H, &nlse) || !mha__mul(nlse, L, &nlse) || !mha__add(nq, nq, &total) ||
        !mha__add(total, nk, &total) || !mha__add(total, nk, &total) || !mha__add(total, nlse, &total) ||
        !mha__add(total, nlse, &total) ||
        !mha__mul(total, (int64_t)sizeof(float), &total))
        return mha__fail(MHA_ERR_INVALID_ARG, "the layer's workspace for %lld x %lld queries and %lld keys overflows",
                         (long long)N, (long long)L, (long long)S1);
    float *base = mha__ctx_scratch(ctx, MHA_SCRATCH_LAYER, total);
    if (!base) return MHA_ERR_NOMEM;
    b->q = base;
    b->k = b->q + nq;
    b->v = b->k + nk;
    b->heads = b->v + nk;
    b->stats.max = b->heads + nq;
    b->stats.sum = b->stats.max + nlse;
    return MHA_OK;
}

/* Rows S and S+1 of K and V: bias_k/bias_v, then the zero row. */
static void append_extra_keys(const mha_layer *l, float *k, float *v, int64_t N, int64_t S, int64_t S1)
{
    int64_t E = l->desc.embed_dim;
    for (int64_t n = 0; n < N; n++) {
        int64_t row = S;
        if (l->desc.add_bias_kv) {
            memcpy(k + (n * S1 + row) * E, l->bias_k, (size_t)E * sizeof(float));
            memcpy(v + (n * S1 + row) * E, l->bias_v, (size_t)E * sizeof(float));
            row++;
        }
        if (l->desc.add_zero_attn) {
            memset(k + (n * S1 + row) * E, 0, (size_t)E * sizeof(float));
            memset(v + (n * S1 + row) * E, 0, (size_t)E * sizeof(float));
        }
    }
}

/* [N, rows, E] contiguous, seen as [N, h, rows, d]. */
static mha_tensor heads_view(float *data, int64_t N, int64_t rows, int64_t H, int64_t d)
{
    mha_tensor t = {data, {N, H, rows, d}, {rows * H * d, d, H * d, 1}};
    return t;
}

mha_status mha_layer_forward(mha_ctx *ctx, mha_layer *l, mha_tensor *attn_output, mha_tensor *attn_weights,
                             const mha_layer_fwd_args *a)
{
    mha_status st = check_layer(l, "mha_layer_forward");
    if (st != MHA_OK) return st;
    if (!ctx || !attn_output || !a) return mha__fail(MHA_ERR_MISUSE, "mha_layer_forward: NULL argument");
    if ((st = check_forward(l, attn_output, attn_weights, a)) != MHA_OK) return st;
    const mha_layer_desc *d = &l->desc;
    int64_t N = a->query.shape[0], L = a->query.shape[1], S = a->key.shape[1];
    int64_t E = d->embed_dim, H = d->num_heads, hd = l->head_dim;
    int64_t S1 = S + !!d->add_bias_kv + !!d->add_zero_attn;
    mha__attn_plan plan = {
        .B = N, .Hq = H, .Hkv = H, .L = L, .S = S1, .D = hd, .Dv = hd, .R = S, .group = 1,
        .scale = (float)(1.0 / sqrt((double)hd)), .causal = a->causal,
        .window_left = -1, .window_right = -1,
        .masks = {a->attn_mask, a->key_padding_mask},
    };
    if ((st = mha__attn_plan_check(&plan)) != MHA_OK) return st;
    if (N * L == 0) return MHA_OK;
    layer_buffers buf = {0};
    if ((st = layer_buffers_get(ctx, N, L, S1, E, H, &buf)) != MHA_OK) return st;

    mha_tensor q = mha_tensor_3d(buf.q, N, L, E);
    mha_tensor k = mha_tensor_3d(buf.k, N, S1, E);
    mha_tensor v = mha_tensor_3d(buf.v, N, S1, E);
    k.shape[1] = v.shape[1] = S; /* project the real keys; extra rows follow */
    project(ctx, l, &a->query, &l->pk_q, l->b_in, &q);
    project(ctx, l, &a->key, &l->pk_k, l->b_in ? l->b_in + E : NULL, &k);
    project(ctx, l, &a->value, &l->pk_v, l->b_in ? l->b_in + 2 * E : NULL, &v);
    append_extra_keys(l, buf.k, buf.v, N, S, S1);

    mha_tensor qh = heads_view(buf.q, N, L, H, hd);
    mha_tensor kh = heads_view(buf.k, N, S1, H, hd);
    mha_tensor vh = heads_view(buf.v, N, S1, H, hd);
    mha_tensor oh = heads_view(buf.heads, N, L, H, hd);
    if ((st = mha__attn_forward(ctx, &plan, &oh, NULL, &buf.stats, &qh, &kh, &vh)) != MHA_OK) return st;
    if (attn_weights &&
        (st = mha__attn_probs(ctx, &plan, attn_weights, a->average_attn_weights, &buf.stats, &qh, &kh)) != MHA_OK)
        return st;
    mha_tensor heads = mha_tensor_3d(buf.heads, N, L, E);
    if (attn_output->stride[2] == 1) {
        project(ctx, l, &heads, &l->pk_out, l->b_out, attn_output);
        return MHA_OK;
    }
    /* Columns not contiguous: project into Q's buffer (free by now), then scatter. */
    project(ctx, l, &heads, &l->pk_out, l->b_out, &q);
    for (int64_t n = 0; n < N; n++)
        for (int64_t t = 0; t < L; t++)
            for (int64_t c = 0; c < E; c++)
                attn_output->data[n * attn_output->stride[0] + t * attn_output->stride[1] + c * attn_output->stride[2]] =
                    buf.q[(n * L + t) * E + c];
    return MHA_OK;
}
