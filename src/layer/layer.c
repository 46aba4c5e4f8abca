/*
 * layer.c -- the layer object: its description checked and completed,
 * its weights (kept packed for the GEMM, gemm.c) and their names.  The
 * forward pass is forward.c, its stages pipeline.c, training
 * layer_train.c, decoding kvcache.c.
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
    /* bias_k/bias_v hold one row per kv head (kv_dim floats: E in
     * nn.MultiheadAttention, less in a shard of its heads, mha_mpi.h). */
    if ((d->add_bias_kv || d->add_zero_attn) && g != d->num_heads)
        return mha__fail(MHA_ERR_INVALID_ARG, "add_bias_kv and add_zero_attn are nn.MultiheadAttention's: they need "
                                              "num_kv_heads == num_heads");
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

float mha__layer_scale(const mha_layer *l) { return (float)(1.0 / sqrt((double)l->head_dim)); }

const float *mha__layer_in_bias(const mha_layer *l, matrix which)
{
    return l->b_in ? l->b_in + mha__layer_bias_offset(l, which) : NULL;
}

mha_status mha__layer_pack(mha_layer *l, matrix which, const float *w)
{
    int64_t out = mha__layer_out_features(l, which), in = mha__layer_in_features(l, which);
    mha__layer_train *t = l->train;
    if (!t) return mha__weight_pack(NULL, &l->w[which], l->isa, l->desc.dtype, w, out, in);
    /* Training: the plain copy is the source of the packs, which the next
     * call with a context makes on its threads (the weights change every
     * optimizer step). */
    if (w != t->w[which]) {
        if (w) memcpy(t->w[which], w, (size_t)(out * in) * sizeof(float));
        else memset(t->w[which], 0, (size_t)(out * in) * sizeof(float));
    }
    mha__weight_defer(&l->w[which], t->w[which]);
    return MHA_OK;
}

mha_status mha__layer_refresh(mha_ctx *ctx, const mha_layer *l)
{
    mha_layer *cache = (mha_layer *)l; /* the packs only: see layer.h */
    mha_status st = MHA_OK;
    for (int m = 0; m < MAT_COUNT && st == MHA_OK; m++) st = mha__weight_refresh(ctx, &cache->w[m]);
    return st;
}

mha_status mha__layer_complete_desc(const mha_layer_desc *desc, mha_layer_desc *out)
{
    mha_status st = check_desc(desc);
    if (st != MHA_OK) return st;
    mha_layer_desc d = *desc;
    if (!d.kdim) d.kdim = d.embed_dim;
    if (!d.vdim) d.vdim = d.embed_dim;
    if (!d.num_kv_heads) d.num_kv_heads = d.num_heads;
    if (!d.head_dim) d.head_dim = d.embed_dim / d.num_heads;
    if (d.out_bias < 0) d.out_bias = d.bias;
    if (d.rope.kind != MHA_ROPE_NONE && !d.rope.theta) d.rope.theta = 10000.0;
    if (d.rope.kind != MHA_ROPE_NONE && !d.rope.dim) d.rope.dim = d.head_dim;
    *out = d;
    return MHA_OK;
}

mha_status mha_layer_create(const mha_layer_desc *desc, mha_layer **out_layer)
{
    if (!desc || !out_layer) return mha__fail(MHA_ERR_MISUSE, "mha_layer_create: NULL argument");
    *out_layer = NULL;
    mha_layer_desc d;
    mha_status st = mha__layer_complete_desc(desc, &d);
    if (st != MHA_OK) return st;
    int64_t E = d.embed_dim;
    d.alibi_slopes = NULL; /* the layer's own copy below */
    mha_layer *l = mha__calloc(1, sizeof *l);
    if (!l) return MHA_ERR_NOMEM;
    l->magic = LAYER_MAGIC;
    l->desc = d;
    l->unset = (1u << MAT_COUNT) - 1;
    if (d.add_bias_kv) l->unset |= UNSET_BIAS_K | UNSET_BIAS_V;
    l->head_dim = d.head_dim;
    l->qdim = d.num_heads * d.head_dim;
    l->kvdim = d.num_kv_heads * d.head_dim;
    l->isa = mha__isa_get();
    l->names = MHA_NAMES_TORCH;
    /* Weights start as zeros; the compute calls refuse until the
     * matrices are set (l->unset). */
    l->bf16 = d.dtype == MHA_DTYPE_BF16;
    for (int m = 0; m < MAT_COUNT && st == MHA_OK; m++) st = mha__layer_pack(l, (matrix)m, NULL);
    bool ok = st == MHA_OK;
    if (ok && d.bias) ok = (l->b_in = mha__calloc(l->qdim + 2 * l->kvdim, sizeof(float))) != NULL;
    if (ok && d.out_bias) ok = (l->b_out = mha__calloc(E, sizeof(float))) != NULL;
    if (ok && d.add_bias_kv)
        ok = (l->bias_k = mha__calloc(l->kvdim, sizeof(float))) && (l->bias_v = mha__calloc(l->kvdim, sizeof(float)));
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

void mha__layer_train_free(mha__layer_train *t)
{
    if (!t) return;
    if (t->own_plain) mha__free(t->plain);
    if (t->own_grads) mha__free(t->grads);
    mha__free(t);
}

void mha_layer_free(mha_layer *l)
{
    if (!l) return;
    l->magic = 0;
    for (int i = 0; i < MAT_COUNT; i++) {
        mha__weight_free(&l->w[i]);
    }
    mha__layer_train_free(l->train);
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

/* Where the layer keeps its activations (Q, K, V, head outputs), T rows
 * per batch: head-major [H][N][T][d] when d is a multiple of the kernels'
 * nr, so each GEMM panel lies inside one head and attention reads a head's
 * rows contiguously; otherwise row-major [N][T][E].  Heads outermost, not
 * batches ([N][H][T][d] before): a head's rows of every batch then follow
 * one another, so a projection over N batches of T rows is one GEMM of
 * N T rows, where it was N GEMMs of T (at B = 8, T = 128: a 32-row tail
 * tile in every 128 rows, eight times the calls). */
static bool head_major(const mha_layer *l)
{
    return l->head_dim % mha__weight_panel(&l->w[MAT_Q]) == 0; /* every matrix has the same panel width */
}

mha__batched mha__layer_activations(const mha_layer *l, float *base, int64_t N, int64_t T, int64_t heads)
{
    int64_t d = l->head_dim, width = heads * d;
    if (head_major(l)) return (mha__batched){{base, d, 1, d, N * T * d}, T * d};
    return (mha__batched){{base, width, 1, 0, 0}, T * width};
}

/* The same activations as the [N, H, T, d] view attention reads. */
mha_tensor mha__layer_heads_view(const mha_layer *l, float *base, int64_t N, int64_t T, int64_t H)
{
    int64_t d = l->head_dim;
    mha_tensor t = {base, {N, H, T, d}, {T * H * d, d, H * d, 1}};
    if (head_major(l)) t.stride[0] = T * d, t.stride[1] = N * T * d, t.stride[2] = d;
    return t;
}
