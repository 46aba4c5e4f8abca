/*
 * layer.c -- torch.nn.MultiheadAttention: weights, projections, attention
 * over the heads, output projection.
 *
 * Data flow of one forward call (N batches, L queries, S keys, h heads of
 * width d = E / h); the projections are GEMMs against weights packed when
 * they are set (gemm.c), the attention is flash.c's fused kernel:
 *   Q = query W_q^T + b_q            L rows   (workspace or tape, head-major
 *   K = key   W_k^T + b_k            S' rows   [N][h][T][d] when d allows,
 *   V = value W_v^T + b_v            S' rows   see activations())
 *                                    S' = S (+1 bias_k) (+1 zero row)
 *   A = attention over [N, h, T, d] views of Q, K, V (no copies),
 *       written over Q when nothing reads Q afterwards
 *   attn_output = A W_o^T + b_o      written through the caller's strides
 *   attn_weights, if asked, recomputed from the saved row max and sum.
 */
#include "layer/layer.h"

#include <math.h>
#include <string.h>

void mha_layer_desc_init(mha_layer_desc *desc)
{
    memset(desc, 0, sizeof *desc);
    desc->bias = 1;
    desc->out_bias = -1;
    desc->dtype = MHA_DTYPE_F32;
    desc->window_left = -1;
    desc->window_right = -1;
}

void mha_layer_fwd_args_init(mha_layer_fwd_args *args)
{
    memset(args, 0, sizeof *args);
    args->average_attn_weights = 1;
}

static mha_status check_rope(const mha_layer_desc *d, int64_t head_dim)
{
    const mha_rope *r = &d->rope;
    if (r->kind != MHA_ROPE_NONE && r->kind != MHA_ROPE_HALF && r->kind != MHA_ROPE_INTERLEAVED)
        return mha__fail(MHA_ERR_INVALID_ARG, "rope.kind %d is not an mha_rope_kind value", (int)r->kind);
    if (r->kind == MHA_ROPE_NONE) return MHA_OK;
    if (!(r->theta >= 0) || isinf(r->theta) || (r->theta > 0 && r->theta <= 1))
        return mha__fail(MHA_ERR_INVALID_ARG, "rope.theta must be > 1 (0 = 10000), got %g", r->theta);
    if (r->dim < 0 || r->dim > head_dim || r->dim % 2 || (r->dim == 0 && head_dim % 2))
        return mha__fail(MHA_ERR_INVALID_ARG,
                         "rope.dim must be even and at most head_dim %lld (0 = head_dim), got %lld",
                         (long long)head_dim, (long long)r->dim);
    if (d->add_bias_kv || d->add_zero_attn)
        return mha__fail(MHA_ERR_INVALID_ARG,
                         "rope has no position for the bias_k/zero rows; it excludes add_bias_kv and add_zero_attn");
    return MHA_OK;
}

static mha_status check_desc(const mha_layer_desc *d)
{
    if (d->embed_dim < 1)
        return mha__fail(MHA_ERR_INVALID_ARG, "embed_dim must be positive, got %lld", (long long)d->embed_dim);
    if (d->num_heads < 1)
        return mha__fail(MHA_ERR_INVALID_ARG, "num_heads must be positive, got %lld", (long long)d->num_heads);
    if (d->head_dim < 0)
        return mha__fail(MHA_ERR_INVALID_ARG, "head_dim must be >= 0 (0 = embed_dim / num_heads), got %lld",
                         (long long)d->head_dim);
    if (!d->head_dim && d->embed_dim % d->num_heads)
        return mha__fail(MHA_ERR_INVALID_ARG,
                         "embed_dim %lld is not divisible by num_heads %lld, so the heads cannot have equal width",
                         (long long)d->embed_dim, (long long)d->num_heads);
    int64_t g = d->num_kv_heads ? d->num_kv_heads : d->num_heads;
    if (g < 1 || d->num_heads % g)
        return mha__fail(MHA_ERR_INVALID_ARG, "num_heads %lld is not a multiple of num_kv_heads %lld",
                         (long long)d->num_heads, (long long)d->num_kv_heads);
    if (d->kdim < 0 || d->vdim < 0)
        return mha__fail(MHA_ERR_INVALID_ARG, "kdim and vdim must be >= 0 (0 = embed_dim), got %lld and %lld",
                         (long long)d->kdim, (long long)d->vdim);
    if (d->dtype != MHA_DTYPE_F32 && d->dtype != MHA_DTYPE_BF16)
        return mha__fail(MHA_ERR_INVALID_ARG, "dtype %s is not supported; the layer computes in F32 or BF16",
                         mha_dtype_name(d->dtype));
    int64_t hd = d->head_dim ? d->head_dim : d->embed_dim / d->num_heads, qdim, sizes[4] = {d->embed_dim, 0, 0, 0};
    if (!mha__mul(hd, d->num_heads, &qdim)) return mha__fail(MHA_ERR_INVALID_ARG, "num_heads x head_dim overflows");
    sizes[1] = qdim, sizes[2] = d->kdim, sizes[3] = d->vdim;
    for (int i = 0; i < 4; i++) {
        int64_t sq;
        if (!mha__mul(sizes[i], sizes[i] > d->embed_dim ? sizes[i] : d->embed_dim, &sq) || sq > INT64_MAX / 64)
            return mha__fail(MHA_ERR_INVALID_ARG, "embed_dim %lld, head sizes or kdim/vdim are too large",
                             (long long)d->embed_dim);
    }
    if ((d->add_bias_kv || d->add_zero_attn) && (g != d->num_heads || qdim != d->embed_dim))
        return mha__fail(MHA_ERR_INVALID_ARG, "add_bias_kv and add_zero_attn are nn.MultiheadAttention's: they need "
                                              "num_kv_heads == num_heads and num_heads x head_dim == embed_dim");
    if (d->out_bias < -1 || d->out_bias > 1)
        return mha__fail(MHA_ERR_INVALID_ARG, "out_bias must be -1, 0 or 1, got %d", d->out_bias);
    if (d->window_left < -1 || d->window_right < -1)
        return mha__fail(MHA_ERR_INVALID_ARG, "window sizes must be >= -1 (-1 = unbounded), got left %lld right %lld",
                         (long long)d->window_left, (long long)d->window_right);
    if (!(d->softcap >= 0) || isinf(d->softcap))
        return mha__fail(MHA_ERR_INVALID_ARG, "softcap must be finite and >= 0 (0 = off), got %g", (double)d->softcap);
    return check_rope(d, hd);
}

int64_t mha__layer_in_features(const mha_layer *l, matrix which)
{
    switch (which) {
    case MAT_K: return l->desc.kdim;
    case MAT_V: return l->desc.vdim;
    case MAT_OUT: return l->qdim;
    default: return l->desc.embed_dim;
    }
}

int64_t mha__layer_out_features(const mha_layer *l, matrix which)
{
    return which == MAT_Q ? l->qdim : which == MAT_OUT ? l->desc.embed_dim : l->kvdim;
}

int64_t mha__layer_bias_offset(const mha_layer *l, matrix which)
{
    return which == MAT_Q ? 0 : which == MAT_K ? l->qdim : l->qdim + l->kvdim;
}

mha_status mha__layer_pack(mha_layer *l, matrix which, const float *w)
{
    int64_t out = mha__layer_out_features(l, which), in = mha__layer_in_features(l, which);
    if (l->bf16) return mha__pack_bf16(&l->w16[which], w, out, in);
    mha__layer_train *t = l->train;
    if (t && w != t->w[which]) { /* training: the plain copy is the source of the packs */
        if (w) memcpy(t->w[which], w, (size_t)(out * in) * sizeof(float));
        else memset(t->w[which], 0, (size_t)(out * in) * sizeof(float));
        w = t->w[which];
    }
    return mha__pack(&l->w[which], l->kt, w, out, in);
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
    if (!d.num_kv_heads) d.num_kv_heads = d.num_heads;
    if (!d.head_dim) d.head_dim = E / d.num_heads;
    if (d.out_bias < 0) d.out_bias = d.bias;
    if (d.rope.kind != MHA_ROPE_NONE && !d.rope.theta) d.rope.theta = 10000.0;
    if (d.rope.kind != MHA_ROPE_NONE && !d.rope.dim) d.rope.dim = d.head_dim;
    d.alibi_slopes = NULL; /* the layer's own copy below */
    mha_layer *l = mha__calloc(1, sizeof *l);
    if (!l) return MHA_ERR_NOMEM;
    l->magic = LAYER_MAGIC;
    l->desc = d;
    l->head_dim = d.head_dim;
    l->qdim = d.num_heads * d.head_dim;
    l->kvdim = d.num_kv_heads * d.head_dim;
    l->kt = mha__kernels_get();
    l->names = MHA_NAMES_TORCH;
    /* Weights start as zeros, as the header promises. */
    l->bf16 = d.dtype == MHA_DTYPE_BF16;
    for (int m = 0; m < MAT_COUNT && st == MHA_OK; m++) st = mha__layer_pack(l, (matrix)m, NULL);
    bool ok = st == MHA_OK;
    if (ok && d.bias) ok = (l->b_in = mha__calloc(l->qdim + 2 * l->kvdim, sizeof(float))) != NULL;
    if (ok && d.out_bias) ok = (l->b_out = mha__calloc(E, sizeof(float))) != NULL;
    if (ok && d.add_bias_kv)
        ok = (l->bias_k = mha__calloc(E, sizeof(float))) && (l->bias_v = mha__calloc(E, sizeof(float)));
    if (ok && desc->alibi_slopes && (ok = (l->alibi = mha__alloc(d.num_heads, sizeof(float))) != NULL)) {
        memcpy(l->alibi, desc->alibi_slopes, (size_t)d.num_heads * sizeof(float));
        l->desc.alibi_slopes = l->alibi;
    }
    if (!ok) {
        mha_layer_free(l);
        return st != MHA_OK ? st : MHA_ERR_NOMEM;
    }
    *out_layer = l;
    return MHA_OK;
}

void mha_layer_free(mha_layer *l)
{
    if (!l) return;
    l->magic = 0;
    for (int i = 0; i < MAT_COUNT; i++) {
        mha__packed_free(&l->w[i]);
        mha__packed_bf16_free(&l->w16[i]);
    }
    if (l->train) {
        mha__free(l->train->plain);
        mha__free(l->train->grads);
        mha__free(l->train);
    }
    mha__free(l->b_in);
    mha__free(l->b_out);
    mha__free(l->bias_k);
    mha__free(l->bias_v);
    mha__free(l->alibi);
    mha__free(l);
}

mha_status mha__layer_check(const mha_layer *l, const char *fn)
{
    if (!l || l->magic != LAYER_MAGIC) return mha__fail(MHA_ERR_MISUSE, "%s: not a live mha_layer", fn);
    return MHA_OK;
}

mha_weight_names mha_layer_names(const mha_layer *l)
{
    return mha__layer_check(l, "mha_layer_names") == MHA_OK ? l->names : MHA_NAMES_AUTO;
}

void mha__layer_set_names(mha_layer *l, mha_weight_names names) { l->names = names; }

const mha_layer_desc *mha_layer_get_desc(const mha_layer *l)
{
    return mha__layer_check(l, "mha_layer_get_desc") == MHA_OK ? &l->desc : NULL;
}

/* ---------------------------------------------------------------- */
/* Weights by PyTorch name                                           */
/* ---------------------------------------------------------------- */

/* What each weight name sets.  Three families of names are understood:
 * nn.MultiheadAttention's state_dict, Llama-style attention blocks
 * (q_proj.weight ... o_proj.bias) and GPT-2's (c_attn / c_proj, Conv1D
 * weights stored [in, out], so transposed here). */
typedef enum weight_target {
    SET_QKV,   /* Q, K, V stacked by rows, [out, in] */
    SET_QKV_T, /* the same stacked by columns, [in, out] (GPT-2 c_attn) */
    SET_Q,
    SET_K,
    SET_V,
    SET_OUT,
    SET_OUT_T, /* W_o as [in, out] (GPT-2 c_proj) */
    SET_QKV_BIAS,
    SET_Q_BIAS,
    SET_K_BIAS,
    SET_V_BIAS,
    SET_OUT_BIAS,
    SET_BIAS_K,
    SET_BIAS_V
} weight_target;

typedef struct weight_slot {
    const char *name;
    weight_target target;
    int64_t numel;
    bool present; /* does this configuration have it? */
} weight_slot;

enum { MAX_SLOTS = 22 };

static int weight_slots(const mha_layer *l, weight_slot slots[MAX_SLOTS])
{
    const mha_layer_desc *d = &l->desc;
    int64_t E = d->embed_dim, qd = l->qdim, kvd = l->kvdim, all = qd + 2 * kvd;
    bool packed = d->kdim == E && d->vdim == E; /* PyTorch's _qkv_same_embed_dim */
    bool b = d->bias, ob = d->out_bias, same_in = d->kdim == E && d->vdim == E;
    int n = 0;
    /* nn.MultiheadAttention */
    slots[n++] = (weight_slot){"in_proj_weight", SET_QKV, all * E, packed};
    slots[n++] = (weight_slot){"q_proj_weight", SET_Q, qd * E, !packed};
    slots[n++] = (weight_slot){"k_proj_weight", SET_K, kvd * d->kdim, !packed};
    slots[n++] = (weight_slot){"v_proj_weight", SET_V, kvd * d->vdim, !packed};
    slots[n++] = (weight_slot){"in_proj_bias", SET_QKV_BIAS, all, b};
    slots[n++] = (weight_slot){"out_proj.weight", SET_OUT, E * qd, true};
    slots[n++] = (weight_slot){"out_proj.bias", SET_OUT_BIAS, E, ob};
    slots[n++] = (weight_slot){"bias_k", SET_BIAS_K, E, d->add_bias_kv};
    slots[n++] = (weight_slot){"bias_v", SET_BIAS_V, E, d->add_bias_kv};
    /* Llama-style */
    slots[n++] = (weight_slot){"q_proj.weight", SET_Q, qd * E, true};
    slots[n++] = (weight_slot){"k_proj.weight", SET_K, kvd * d->kdim, true};
    slots[n++] = (weight_slot){"v_proj.weight", SET_V, kvd * d->vdim, true};
    slots[n++] = (weight_slot){"o_proj.weight", SET_OUT, E * qd, true};
    slots[n++] = (weight_slot){"q_proj.bias", SET_Q_BIAS, qd, b};
    slots[n++] = (weight_slot){"k_proj.bias", SET_K_BIAS, kvd, b};
    slots[n++] = (weight_slot){"v_proj.bias", SET_V_BIAS, kvd, b};
    slots[n++] = (weight_slot){"o_proj.bias", SET_OUT_BIAS, E, ob};
    /* GPT-2 (self-attention only: one input width) */
    slots[n++] = (weight_slot){"c_attn.weight", SET_QKV_T, E * all, same_in};
    slots[n++] = (weight_slot){"c_attn.bias", SET_QKV_BIAS, all, same_in && b};
    slots[n++] = (weight_slot){"c_proj.weight", SET_OUT_T, qd * E, true};
    slots[n++] = (weight_slot){"c_proj.bias", SET_OUT_BIAS, E, ob};
    return n;
}

/* Rows [r0, r0 + rows) of the transpose of w [in, out]: a [rows, in] matrix. */
static float *transposed_rows(const float *w, int64_t in, int64_t out, int64_t r0, int64_t rows)
{
    float *t = mha__alloc(rows * in, sizeof(float));
    for (int64_t r = 0; t && r < rows; r++)
        for (int64_t c = 0; c < in; c++) t[r * in + c] = w[c * out + r0 + r];
    return t;
}

/* Packs Q, K, V from a stacked matrix, [out, in] or (transposed) [in, out]. */
static mha_status set_qkv(mha_layer *l, const float *w, bool transposed)
{
    int64_t E = l->desc.embed_dim, all = l->qdim + 2 * l->kvdim;
    mha_status st = MHA_OK;
    for (int m = MAT_Q; m <= MAT_V && st == MHA_OK; m++) {
        int64_t r0 = mha__layer_bias_offset(l, (matrix)m), rows = mha__layer_out_features(l, (matrix)m);
        if (!transposed) {
            st = mha__layer_pack(l, (matrix)m, w + r0 * E);
            continue;
        }
        float *t = transposed_rows(w, E, all, r0, rows);
        st = t ? mha__layer_pack(l, (matrix)m, t) : MHA_ERR_NOMEM;
        mha__free(t);
    }
    return st;
}

static mha_status apply_weight(mha_layer *l, weight_target what, const float *data, int64_t numel)
{
    size_t bytes = (size_t)numel * sizeof(float);
    switch (what) {
    case SET_QKV: return set_qkv(l, data, false);
    case SET_QKV_T: return set_qkv(l, data, true);
    case SET_Q: return mha__layer_pack(l, MAT_Q, data);
    case SET_K: return mha__layer_pack(l, MAT_K, data);
    case SET_V: return mha__layer_pack(l, MAT_V, data);
    case SET_OUT: return mha__layer_pack(l, MAT_OUT, data);
    case SET_OUT_T: {
        float *t = transposed_rows(data, l->qdim, l->desc.embed_dim, 0, l->desc.embed_dim);
        mha_status st = t ? mha__layer_pack(l, MAT_OUT, t) : MHA_ERR_NOMEM;
        mha__free(t);
        return st;
    }
    case SET_QKV_BIAS: memcpy(l->b_in, data, bytes); return MHA_OK;
    case SET_Q_BIAS: memcpy(l->b_in + mha__layer_bias_offset(l, MAT_Q), data, bytes); return MHA_OK;
    case SET_K_BIAS: memcpy(l->b_in + mha__layer_bias_offset(l, MAT_K), data, bytes); return MHA_OK;
    case SET_V_BIAS: memcpy(l->b_in + mha__layer_bias_offset(l, MAT_V), data, bytes); return MHA_OK;
    case SET_OUT_BIAS: memcpy(l->b_out, data, bytes); return MHA_OK;
    case SET_BIAS_K: memcpy(l->bias_k, data, bytes); return MHA_OK;
    case SET_BIAS_V: memcpy(l->bias_v, data, bytes); return MHA_OK;
    }
    return mha__fail(MHA_ERR_INTERNAL, "unknown weight target %d", (int)what);
}

mha_status mha_layer_set_weight(mha_layer *l, const char *name, const float *data, int64_t numel)
{
    mha_status st = mha__layer_check(l, "mha_layer_set_weight");
    if (st != MHA_OK) return st;
    if (!name || !data) return mha__fail(MHA_ERR_MISUSE, "mha_layer_set_weight: NULL argument");
    weight_slot slots[MAX_SLOTS];
    int n = weight_slots(l, slots);
    for (int t = 0; t < n; t++) {
        if (strcmp(slots[t].name, name) != 0) continue;
        if (!slots[t].present) break;
        if (numel != slots[t].numel)
            return mha__fail(MHA_ERR_INVALID_ARG, "%s needs %lld values, got %lld", name, (long long)slots[t].numel,
                             (long long)numel);
        return apply_weight(l, slots[t].target, data, numel);
    }
    return mha__fail(MHA_ERR_NOT_FOUND, "\"%s\" is not a weight of this layer configuration", name);
}

/* ---------------------------------------------------------------- */
/* Projections                                                       */
/* ---------------------------------------------------------------- */

/* A [N, T, F] tensor view as a batch of [T, F] matrices. */
mha__batched mha__layer_from_view(const mha_tensor *t)
{
    return (mha__batched){{t->data, t->stride[1], t->stride[2], 0, 0}, t->stride[0]};
}

/* Where the layer keeps its activations (Q, K, V, head outputs), T rows
 * per batch: head-major [N][H][T][d] when d is a multiple of the kernels'
 * nr, so each GEMM panel lies inside one head and attention reads a head's
 * rows contiguously; otherwise row-major [N][T][E]. */
static bool head_major(const mha_layer *l)
{
    return l->head_dim % (l->bf16 ? MHA_BF16_NR : l->kt->nr) == 0; /* the GEMM's panel width */
}

mha__batched mha__layer_activations(const mha_layer *l, float *base, int64_t T, int64_t heads)
{
    int64_t d = l->head_dim, width = heads * d;
    if (head_major(l)) return (mha__batched){{base, d, 1, d, T * d}, width * T};
    return (mha__batched){{base, width, 1, 0, 0}, T * width};
}

/* The same activations as the [N, H, T, d] view attention reads. */
mha_tensor mha__layer_heads_view(const mha_layer *l, float *base, int64_t N, int64_t T, int64_t H)
{
    int64_t d = l->head_dim;
    if (head_major(l)) return mha_tensor_4d(base, N, H, T, d);
    mha_tensor t = {base, {N, H, T, d}, {T * H * d, d, H * d, 1}};
    return t;
}

/* One GEMM of the layer, in its dtype. */
static mha_status linear(mha_ctx *ctx, const mha_layer *l, int64_t rows, const mha__mat *x, matrix which,
                         const float *b, const mha__mat *y)
{
    if (l->bf16) return mha__linear_bf16(ctx, mha__bf16_get(), rows, x, &l->w16[which], b, y);
    mha__linear(ctx, l->kt, rows, x, &l->w[which], b, y);
    return MHA_OK;
}

/* Can N batches of T rows be one matrix of N T rows? */
static bool batches_even(int64_t T, const mha__batched *x, const mha__batched *y)
{
    return !x->m.group_cols && !y->m.group_cols && x->batch_stride == T * x->m.rs && y->batch_stride == T * y->m.rs;
}

/* y[n, t, :] = x[n, t, :] W^T + b for N batches of T rows: one GEMM when
 * the batches lie evenly one after another, else one per batch. */
mha_status mha__layer_project(mha_ctx *ctx, const mha_layer *l, int64_t N, int64_t T, const mha__batched *x,
                              matrix which, const float *b, const mha__batched *y)
{
    if (N == 1 || batches_even(T, x, y)) return linear(ctx, l, N * T, &x->m, which, b, &y->m);
    mha_status st = MHA_OK;
    for (int64_t n = 0; n < N && st == MHA_OK; n++) {
        mha__mat xn = x->m, yn = y->m;
        xn.data += n * x->batch_stride;
        yn.data += n * y->batch_stride;
        st = linear(ctx, l, T, &xn, which, b, &yn);
    }
    return st;
}

void mha__layer_project_packed(mha_ctx *ctx, const mha_layer *l, int64_t N, int64_t T, const mha__batched *x,
                               const mha__packed *w, const mha__batched *y, bool add)
{
    bool whole = N == 1 || batches_even(T, x, y);
    for (int64_t n = 0; n < (whole ? 1 : N); n++) {
        mha__mat xn = x->m, yn = y->m;
        xn.data += n * x->batch_stride;
        yn.data += n * y->batch_stride;
        int64_t rows = whole ? N * T : T;
        if (add) mha__linear_add(ctx, l->kt, rows, &xn, w, &yn);
        else mha__linear(ctx, l->kt, rows, &xn, w, NULL, &yn);
    }
}

/* Rows S and S+1 of K and V in every head: bias_k/bias_v, then the zero
 * row (the activations hold S1 rows per batch). */
static void append_extra_keys(const mha_layer *l, float *k, float *v, int64_t N, int64_t S, int64_t S1)
{
    mha_tensor kh = mha__layer_heads_view(l, k, N, S1, l->desc.num_heads),
               vh = mha__layer_heads_view(l, v, N, S1, l->desc.num_heads);
    int64_t d = l->head_dim;
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < l->desc.num_heads; h++) {
            int64_t row = S, at_k = n * kh.stride[0] + h * kh.stride[1], at_v = n * vh.stride[0] + h * vh.stride[1];
            if (l->desc.add_bias_kv) {
                memcpy(k + at_k + row * kh.stride[2], l->bias_k + h * d, (size_t)d * sizeof(float));
                memcpy(v + at_v + row * vh.stride[2], l->bias_v + h * d, (size_t)d * sizeof(float));
                row++;
            }
            if (l->desc.add_zero_attn) {
                memset(k + at_k + row * kh.stride[2], 0, (size_t)d * sizeof(float));
                memset(v + at_v + row * vh.stride[2], 0, (size_t)d * sizeof(float));
            }
        }
}

/* ---------------------------------------------------------------- */
/* Forward                                                           */
/* ---------------------------------------------------------------- */

mha_status mha__layer_check_forward(const mha_layer *l, const mha_tensor *attn_output, const mha_tensor *attn_weights,
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

/* The plan of one forward call: the attention problem, where Q, K, V,
 * the heads and the row statistics live, and what the call takes from
 * the workspace.  Without a tape, Q, K, V (and the heads and statistics
 * when needed) are workspace; with one, they are the tape's, and only a
 * staging area for a strided output is workspace. */
typedef struct fwd_plan {
    mha__attn_plan attn;
    int64_t N, L, S, S1;         /* S1: S and the appended key rows */
    bool separate_heads;         /* else the heads overwrite Q */
    bool stats;                  /* row max and sum are kept */
    bool weights;                /* attn_weights are asked for */
    bool staged;                 /* the output's columns are strided */
    int64_t nq, nk, nrow, n_out; /* floats: Q (and heads), K (and V), each statistic, the output */
    int64_t buffers;             /* floats of Q, K, V, heads, statistics: workspace or tape */
    int64_t staging_at;          /* offset of the staging area in the workspace, or -1: Q's buffer */
    int64_t workspace;           /* bytes */
} fwd_plan;

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Floats of each buffer; INVALID_ARG if they overflow. */
static mha_status plan_buffers(const mha_layer *l, bool tape, fwd_plan *f)
{
    int64_t all;
    if (!mha__mul(f->N, f->L, &f->nq) || !mha__mul(f->nq, l->qdim, &f->nq) || !mha__mul(f->N, f->S1, &f->nk) ||
        !mha__mul(f->nk, l->kvdim, &f->nk) || !mha__mul(f->N * f->L, l->desc.num_heads, &f->nrow) ||
        !mha__mul(f->N * f->L, l->desc.embed_dim, &f->n_out) || !mha__add(f->nq, f->nk, &all) ||
        !mha__add(all, f->nk, &all) || !mha__add(all, f->separate_heads ? f->nq : 0, &all) ||
        !mha__add(all, f->stats ? 2 * f->nrow : 0, &all) || !mha__add(all, f->n_out, &all) || all > INT64_MAX / 8)
        return mha__fail(MHA_ERR_INVALID_ARG, "the layer's workspace for %lld x %lld queries and %lld keys overflows",
                         (long long)f->N, (long long)f->L, (long long)f->S1);
    f->buffers = all - f->n_out;
    /* A strided output is staged in Q's buffer, free once the heads have
     * their own, when it is large enough; else in an area of its own. */
    f->staging_at = f->staged && (tape || f->n_out > f->nq) ? (tape ? 0 : f->buffers) : -1;
    return MHA_OK;
}

/* The largest workspace of the calls the forward makes one after another:
 * the rotary tables, the bf16 products' rounded inputs, the attention and
 * the attn_weights pass. */
static bool plan_calls(const mha_ctx *ctx, const mha_layer *l, const fwd_plan *f, int64_t *bytes)
{
    int64_t rope = 0, rope_k = 0, gemm[MAT_COUNT] = {0}, probs = 0;
    bool ok = mha__rope_workspace(l, f->L, &rope) && mha__rope_workspace(l, f->S1, &rope_k);
    for (int m = 0; ok && l->bf16 && m < MAT_COUNT; m++) {
        int64_t rows = f->N * (m == MAT_K || m == MAT_V ? f->S : f->L);
        ok = mha__linear_bf16_workspace(rows, mha__layer_in_features(l, (matrix)m), &gemm[m]);
    }
    if (ok && f->weights) ok = mha__attn_forward_workspace(&f->attn, ctx, &probs);
    *bytes = max64(max64(rope, rope_k), max64(max64(gemm[0], gemm[1]), max64(gemm[2], gemm[3])));
    *bytes = max64(*bytes, max64(f->attn.workspace, probs));
    return ok;
}

static mha_status plan_forward(const mha_ctx *ctx, const mha_layer *l, const mha_tensor *attn_output,
                               const mha_tensor *attn_weights, const mha_layer_fwd_args *a, fwd_plan *f)
{
    bool tape = a->tape != NULL;
    *f = (fwd_plan){.attn = mha__layer_plan(l, a),
                    .N = a->query.shape[0],
                    .L = a->query.shape[1],
                    .S = a->key.shape[1],
                    .stats = tape || attn_weights,
                    .weights = attn_weights != NULL,
                    .staged = attn_output->stride[2] != 1};
    f->S1 = f->attn.S;
    /* The weights pass re-reads Q, and a strided output is staged. */
    f->separate_heads = tape || attn_weights || f->staged;
    mha_status st = mha__attn_plan_check(&f->attn);
    if (st == MHA_OK) st = plan_buffers(l, tape, f);
    mha__attn_needs needs = {true, false, f->stats}; /* the activations always have a row view */
    if (st == MHA_OK) st = mha__attn_plan_resolve(&f->attn, ctx, needs);
    int64_t calls = 0, own = 0;
    if (st == MHA_OK && !plan_calls(ctx, l, f, &calls)) st = MHA_ERR_INVALID_ARG;
    if (st != MHA_OK) return st;
    int64_t staging = f->staging_at >= 0 ? f->n_out : 0, floats = (tape ? 0 : f->buffers) + staging;
    if (!mha__ws_add(&own, floats * (int64_t)sizeof(float), "the layer's activations") ||
        !mha__add(own, calls, &f->workspace))
        return mha__fail(MHA_ERR_INVALID_ARG, "the layer's workspace overflows");
    return MHA_OK;
}

/* Where a forward call keeps Q, K, V, the concatenated heads and the row
 * statistics, and where a strided attn_output is staged. */
typedef struct layer_buffers {
    float *q, *k, *v, *heads, *staging;
    mha__row_stats stats;
} layer_buffers;

static layer_buffers carve_buffers(const fwd_plan *f, float *base, float *staging)
{
    layer_buffers b = {.q = base};
    b.k = b.q + f->nq;
    b.v = b.k + f->nk;
    b.heads = f->separate_heads ? b.v + f->nk : b.q;
    b.stats.max = f->stats ? b.v + f->nk + (f->separate_heads ? f->nq : 0) : NULL;
    b.stats.sum = f->stats ? b.stats.max + f->nrow : NULL;
    b.staging = staging ? staging : b.q;
    return b;
}

/* The buffers of a planned call: taken from the workspace, or the tape's
 * (grown if needed: the tape's only allocation). */
static mha_status buffers_get(mha_ctx *ctx, const fwd_plan *f, mha_layer_tape *tape, layer_buffers *b)
{
    if (tape) {
        tape->layer = NULL; /* until this call has recorded */
        if (f->buffers > tape->capacity) {
            float *grown = mha__alloc(f->buffers, sizeof(float));
            if (!grown) return MHA_ERR_NOMEM;
            mha__free(tape->base);
            tape->base = grown;
            tape->capacity = f->buffers;
        }
    }
    int64_t own = (tape ? 0 : f->buffers) + (f->staging_at >= 0 ? f->n_out : 0);
    float *ws = own ? mha__ws_take(ctx, own * (int64_t)sizeof(float)) : NULL;
    if (own && !ws) return MHA_ERR_INTERNAL;
    *b = carve_buffers(f, tape ? tape->base : ws, f->staging_at >= 0 ? ws + f->staging_at : NULL);
    return MHA_OK;
}

mha__attn_plan mha__layer_plan(const mha_layer *l, const mha_layer_fwd_args *a)
{
    const mha_layer_desc *d = &l->desc;
    int64_t S = a->key.shape[1];
    return (mha__attn_plan){
        .B = a->query.shape[0],
        .Hq = d->num_heads,
        .Hkv = d->num_kv_heads,
        .L = a->query.shape[1],
        .S = S + !!d->add_bias_kv + !!d->add_zero_attn,
        .D = l->head_dim,
        .Dv = l->head_dim,
        .R = S,
        .scale = (float)(1.0 / sqrt((double)l->head_dim)),
        .softcap = d->softcap,
        .causal = a->causal,
        .window_left = d->window_left,
        .window_right = d->window_right,
        .alibi = l->alibi,
        .masks = {a->attn_mask, a->key_padding_mask},
        .bf16 = l->bf16,
    };
}

/* Marks the tape (if any) as holding this call's activations. */
static void record(mha_layer_tape *tape, const mha_layer *l, const mha_layer_fwd_args *a, const layer_buffers *b)
{
    if (tape)
        *tape = (mha_layer_tape){
            TAPE_MAGIC, l,    a->query.shape[0], a->query.shape[1], a->key.shape[1], a->position,   b->q,
            b->k,       b->v, b->heads,          b->stats,          tape->base,      tape->capacity};
}

static mha_status check_tape(const mha_layer *l, const mha_layer_tape *tape)
{
    if (!tape) return MHA_OK;
    if (tape->magic != TAPE_MAGIC) return mha__fail(MHA_ERR_MISUSE, "args.tape is not a live mha_layer_tape");
    if (!l->train) return mha__fail(MHA_ERR_MISUSE, "recording a tape needs mha_layer_train_init first");
    return MHA_OK;
}

/* Everything a forward call checks and plans before it computes. */
static mha_status forward_plan(const mha_ctx *ctx, const mha_layer *l, const mha_tensor *attn_output,
                               const mha_tensor *attn_weights, const mha_layer_fwd_args *a, fwd_plan *f)
{
    mha_status st = mha__layer_check(l, "mha_layer_forward");
    if (st != MHA_OK) return st;
    if (!ctx || !attn_output || !a) return mha__fail(MHA_ERR_MISUSE, "mha_layer_forward: NULL argument");
    if ((st = mha__layer_check_forward(l, attn_output, attn_weights, a)) != MHA_OK) return st;
    if ((st = check_tape(l, a->tape)) != MHA_OK) return st;
    return plan_forward(ctx, l, attn_output, attn_weights, a, f);
}

mha_status mha_layer_workspace_size(const mha_ctx *ctx, const mha_layer *l, const mha_tensor *attn_output,
                                    const mha_tensor *attn_weights, const mha_layer_fwd_args *a, int64_t *bytes)
{
    if (!bytes) return mha__fail(MHA_ERR_MISUSE, "mha_layer_workspace_size: NULL argument");
    fwd_plan f;
    mha_status st = forward_plan(ctx, l, attn_output, attn_weights, a, &f);
    *bytes = st == MHA_OK ? f.workspace : 0;
    return st;
}

/* Q, K, V from the inputs: projected, the appended key rows, rotated. */
static mha_status project_inputs(mha_ctx *ctx, const mha_layer *l, const fwd_plan *f, const mha_layer_fwd_args *a,
                                 const layer_buffers *buf)
{
    int64_t N = f->N, L = f->L, S = f->S, S1 = f->S1, H = l->desc.num_heads, G = l->desc.num_kv_heads;
    mha__batched x_q = mha__layer_from_view(&a->query), x_k = mha__layer_from_view(&a->key);
    mha__batched x_v = mha__layer_from_view(&a->value), q = mha__layer_activations(l, buf->q, L, H);
    mha__batched k = mha__layer_activations(l, buf->k, S1, G), v = mha__layer_activations(l, buf->v, S1, G);
    const float *b_q = l->b_in ? l->b_in + mha__layer_bias_offset(l, MAT_Q) : NULL;
    const float *b_k = l->b_in ? l->b_in + mha__layer_bias_offset(l, MAT_K) : NULL;
    const float *b_v = l->b_in ? l->b_in + mha__layer_bias_offset(l, MAT_V) : NULL;
    mha_status st;
    if ((st = mha__layer_project(ctx, l, N, L, &x_q, MAT_Q, b_q, &q)) != MHA_OK ||
        (st = mha__layer_project(ctx, l, N, S, &x_k, MAT_K, b_k, &k)) != MHA_OK || /* extra rows follow */
        (st = mha__layer_project(ctx, l, N, S, &x_v, MAT_V, b_v, &v)) != MHA_OK)
        return st;
    append_extra_keys(l, buf->k, buf->v, N, S, S1);
    mha_tensor qh = mha__layer_heads_view(l, buf->q, N, L, H), kh = mha__layer_heads_view(l, buf->k, N, S1, G);
    if ((st = mha__rope_apply(ctx, l, &qh, a->position, false)) != MHA_OK) return st;
    return mha__rope_apply(ctx, l, &kh, a->position, false);
}

/* attn_output = heads W_o^T + b_o, through a staging area when its
 * columns are strided. */
static mha_status project_output(mha_ctx *ctx, const mha_layer *l, const fwd_plan *f, const layer_buffers *buf,
                                 mha_tensor *attn_output)
{
    int64_t N = f->N, L = f->L, E = l->desc.embed_dim;
    mha__batched heads = mha__layer_activations(l, buf->heads, L, l->desc.num_heads);
    if (!f->staged) {
        mha__batched y = mha__layer_from_view(attn_output);
        return mha__layer_project(ctx, l, N, L, &heads, MAT_OUT, l->b_out, &y);
    }
    mha__batched staged = {{buf->staging, E, 1, 0, 0}, L * E};
    mha_status st = mha__layer_project(ctx, l, N, L, &heads, MAT_OUT, l->b_out, &staged);
    if (st != MHA_OK) return st;
    for (int64_t n = 0; n < N; n++)
        for (int64_t t = 0; t < L; t++)
            for (int64_t c = 0; c < E; c++)
                attn_output
                    ->data[n * attn_output->stride[0] + t * attn_output->stride[1] + c * attn_output->stride[2]] =
                    buf->staging[(n * L + t) * E + c];
    return MHA_OK;
}

static mha_status run_forward(mha_ctx *ctx, const mha_layer *l, const fwd_plan *f, mha_tensor *attn_output,
                              mha_tensor *attn_weights, const mha_layer_fwd_args *a)
{
    layer_buffers buf;
    mha_status st = buffers_get(ctx, f, a->tape, &buf);
    if (st != MHA_OK || f->N * f->L == 0) {
        if (st == MHA_OK) record(a->tape, l, a, &buf);
        return st;
    }
    if ((st = project_inputs(ctx, l, f, a, &buf)) != MHA_OK) return st;
    int64_t H = l->desc.num_heads, G = l->desc.num_kv_heads;
    mha_tensor qh = mha__layer_heads_view(l, buf.q, f->N, f->L, H),
               kh = mha__layer_heads_view(l, buf.k, f->N, f->S1, G);
    mha_tensor vh = mha__layer_heads_view(l, buf.v, f->N, f->S1, G);
    mha_tensor oh = mha__layer_heads_view(l, buf.heads, f->N, f->L, H);
    mha__kv kv = mha__kv_from_tensors(&kh, &vh);
    if ((st = mha__attn_run(ctx, &f->attn, &oh, NULL, f->stats ? &buf.stats : NULL, &qh, &kv)) != MHA_OK) return st;
    if (attn_weights &&
        (st = mha__attn_probs(ctx, &f->attn, attn_weights, a->average_attn_weights, &buf.stats, &qh, &kh)) != MHA_OK)
        return st;
    if ((st = project_output(ctx, l, f, &buf, attn_output)) != MHA_OK) return st;
    record(a->tape, l, a, &buf);
    return MHA_OK;
}

mha_status mha_layer_forward(mha_ctx *ctx, mha_layer *l, mha_tensor *attn_output, mha_tensor *attn_weights,
                             const mha_layer_fwd_args *a)
{
    fwd_plan f;
    mha_status st = forward_plan(ctx, l, attn_output, attn_weights, a, &f);
    if (st != MHA_OK) return st;
    if (f.N * f.L == 0 && !a->tape) return MHA_OK;
    if ((st = mha__ws_reserve(ctx, f.workspace)) != MHA_OK) return st;
    int64_t top = mha__ws_top(ctx);
    st = run_forward(ctx, l, &f, attn_output, attn_weights, a);
    mha__ws_release(ctx, top);
    return st;
}
