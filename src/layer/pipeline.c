/*
 * pipeline.c -- the layer's stages, one place for each, shared by the
 * forward pass (forward.c), the decoding step (kvcache.c) and the
 * backward pass (layer_train.c):
 *
 *   project   Q = x_q W_q^T + b_q, K = x_k W_k^T + b_k, V = x_v W_v^T + b_v
 *             into the layer's activation layout        mha__layer_project_qkv
 *             (wide rows' Q and K summed exactly: wide.c)
 *   rotate    Q and K by the rotary embedding at their positions (the
 *             backward: by minus the angle)              mha__layer_rotate
 *   attend    the planned attention                      mha__attn_run (attn/)
 *   output    y = heads W_o^T + b_o through y's strides  mha__layer_project_output
 *
 * The forward runs them in order over its buffers; a decoding step runs
 * the same stages over the new rows, appending K and V to the cache
 * between rotate and attend; the backward runs the output stage's and the
 * attention's gradients, then rotate inverse, then the projections'.
 */
#include "layer/layer.h"

#include <string.h>

/* A [N, T, F] tensor view as a batch of [T, F] matrices. */
mha__batched mha__layer_from_view(const mha_tensor *t)
{
    return (mha__batched){{t->data, t->stride[1], t->stride[2], 0, 0}, t->stride[0]};
}

/* One GEMM of the layer, in its dtype. */
static mha_status linear(mha_ctx *ctx, const mha_layer *l, int64_t rows, const mha__mat *x, matrix which,
                         const float *b, const mha__mat *y)
{
    return mha__weight_linear(ctx, &l->w[which], rows, x, b, y);
}

/* Can N batches of T rows be one matrix of N T rows? */
static bool batches_even(int64_t T, const mha__batched *x, const mha__batched *y)
{
    return mha__batch_rows_follow(T, x) && mha__batch_rows_follow(T, y);
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

mha_status mha__layer_project_packed(mha_ctx *ctx, const mha_layer *l, int64_t N, int64_t T, const mha__batched *x,
                                     const mha__packed *w, const mha__packed_split *split,
                                     mha__fma_on_demand *on_demand, const mha__batched *y, bool add)
{
    bool whole = N == 1 || batches_even(T, x, y);
    mha_status st = MHA_OK;
    for (int64_t n = 0; n < (whole ? 1 : N) && st == MHA_OK; n++) {
        mha__mat xn = x->m, yn = y->m;
        xn.data += n * x->batch_stride;
        yn.data += n * y->batch_stride;
        int64_t rows = whole ? N * T : T;
        mha__split_output out = {split, w, NULL, &yn, on_demand, NULL, NULL};
        if (split) st = mha__linear_split_shared(ctx, l->isa, rows, &xn, 1, &out, add);
        else if (add) mha__linear_add(ctx, l->isa->f32, rows, &xn, w, &yn);
        else mha__linear(ctx, l->isa->f32, rows, &xn, w, NULL, &yn);
    }
    return st;
}

static bool same_view(const mha__batched *a, const mha__batched *b)
{
    return a->m.data == b->m.data && a->m.rs == b->m.rs && a->m.cs == b->m.cs && a->m.group_cols == b->m.group_cols &&
           a->m.group_stride == b->m.group_stride && a->batch_stride == b->batch_stride;
}

/* Self-attention's Q, K and V as one product of x, split once for all
 * three: false (nothing done) unless x is all three inputs and each
 * projection is one GEMM of N T rows. */
static bool project_shared(mha_ctx *ctx, const mha_layer *l, const mha__layer_rows *r, const mha__batched *x,
                           const mha__batched *const y[3], mha_status *st)
{
    int64_t T = r->Lq;
    if (r->Lk != T) return false;
    for (int i = 0; i < 3; i++)
        if (r->N != 1 && !batches_even(T, x, y[i])) return false;
    const mha__weight *w[3] = {&l->w[MAT_Q], &l->w[MAT_K], &l->w[MAT_V]};
    const float *b[3] = {NULL, NULL, NULL};
    const mha__mat *ym[3] = {&y[0]->m, &y[1]->m, &y[2]->m};
    for (int i = 0; i < 3; i++) b[i] = mha__layer_in_bias(l, (matrix)(MAT_Q + i));
    *st = mha__weights_linear_shared(ctx, 3, w, r->N * T, &x->m, b, ym);
    return true;
}

mha_status mha__layer_project_qkv(mha_ctx *ctx, const mha_layer *l, const mha__layer_rows *r, const mha__batched *x_q,
                                  const mha__batched *x_k, const mha__batched *x_v, float *q, float *k, float *v,
                                  mha__layer_norms *keep)
{
    int64_t H = l->desc.num_heads, G = l->desc.num_kv_heads;
    mha__batched qb = mha__layer_activations(l, q, r->N, r->Lq, H), kb = mha__layer_activations(l, k, r->N, r->Tk, G);
    mha__batched vb = mha__layer_activations(l, v, r->N, r->Tk, G);
    mha_status st;
    const mha__batched *outs[3] = {&qb, &kb, &vb};
    if (!(same_view(x_q, x_k) && same_view(x_q, x_v) && project_shared(ctx, l, r, x_q, outs, &st)) &&
        (st = mha__layer_project(ctx, l, r->N, r->Lq, x_q, MAT_Q, mha__layer_in_bias(l, MAT_Q), &qb)) == MHA_OK &&
        (st = mha__layer_project(ctx, l, r->N, r->Lk, x_k, MAT_K, mha__layer_in_bias(l, MAT_K), &kb)) == MHA_OK)
        st = mha__layer_project(ctx, l, r->N, r->Lk, x_v, MAT_V, mha__layer_in_bias(l, MAT_V), &vb);
    return st == MHA_OK ? mha__layer_project_wide(ctx, l, r, x_q, x_k, &qb, &kb, keep) : st;
}

mha_status mha__layer_rotate(mha_ctx *ctx, const mha_layer *l, const mha_tensor *q, const mha_tensor *k,
                             int64_t position, bool inverse)
{
    mha_status st = mha__rope_apply(ctx, l, q, position, inverse);
    return st != MHA_OK ? st : mha__rope_apply(ctx, l, k, position, inverse);
}

bool mha__layer_rotate_workspace(const mha_layer *l, int64_t Lq, int64_t Tk, int64_t *bytes)
{
    int64_t q = 0, k = 0;
    if (!mha__rope_workspace(l, Lq, &q) || !mha__rope_workspace(l, Tk, &k)) return false;
    *bytes = mha__max64(q, k); /* one after the other */
    return true;
}

/* The output's columns are strided: project into `staging` (N L E
 * floats), then scatter. */
static mha_status project_staged(mha_ctx *ctx, const mha_layer *l, int64_t N, int64_t L, const mha__batched *heads,
                                 mha_tensor *y, float *staging)
{
    int64_t E = l->desc.embed_dim;
    mha__batched staged = {{staging, E, 1, 0, 0}, L * E};
    mha_status st = mha__layer_project(ctx, l, N, L, heads, MAT_OUT, l->b_out, &staged);
    if (st != MHA_OK) return st;
    for (int64_t n = 0; n < N; n++)
        for (int64_t t = 0; t < L; t++)
            for (int64_t c = 0; c < E; c++)
                y->data[n * y->stride[0] + t * y->stride[1] + c * y->stride[2]] = staging[(n * L + t) * E + c];
    return MHA_OK;
}

mha_status mha__layer_project_output(mha_ctx *ctx, const mha_layer *l, int64_t N, int64_t L, float *heads,
                                     mha_tensor *y, float *staging)
{
    mha__batched hb = mha__layer_activations(l, heads, N, L, l->desc.num_heads);
    if (y->stride[2] != 1) return project_staged(ctx, l, N, L, &hb, y, staging);
    mha__batched yb = mha__layer_from_view(y);
    return mha__layer_project(ctx, l, N, L, &hb, MAT_OUT, l->b_out, &yb);
}

bool mha__layer_project_workspace(const mha_ctx *ctx, const mha_layer *l, int64_t N, int64_t Lq, int64_t Lk,
                                  int64_t *bytes)
{
    int64_t most = 0;
    for (int m = 0; m < MAT_COUNT; m++) {
        int64_t one = 0;
        int64_t rows = N * (m == MAT_K || m == MAT_V ? Lk : Lq);
        if (!mha__weight_linear_workspace(&l->w[m], rows, mha__layer_in_features(l, (matrix)m), &one)) return false;
        most = mha__max64(most, one);
    }
    int64_t wide = 0; /* and the wide rows' pass after them */
    if (!mha__layer_project_wide_workspace(ctx, l, N, Lq, Lk, &wide)) return false;
    *bytes = mha__max64(most, wide); /* the four products run one after another */
    return true;
}
