/*
 * layer_train.c -- training the MHA layer: its parameters and gradients,
 * the tape a forward call records, and the backward pass.
 *
 * Backward of one recorded call (dY = dLoss/d attn_output, rows of
 * activations as the forward kept them, see layer.h):
 *   b_o  += colsum(dY)          W_o += dY^T O          dO = dY W_o
 *   dQ, dK, dV = attention backward (flash_bwd.c) from Q, K, V, O, the
 *                row statistics and dO, written over O, K and V (each is
 *                read before its gradient is written), so the pass needs
 *                one buffer, dO, beyond the tape
 *   bias_k/bias_v += the appended key row's dK/dV, summed over batches
 *   b_in += colsum(dQ | dK | dV)     W_q += dQ^T X_q   (and K, V)
 *   grad_query += dQ W_q,  grad_key += dK W_k,  grad_value += dV W_v
 * Every step is a fixed-order reduction owned by one work item, so the
 * gradients have the same bits for any thread count.
 */
#include "layer/layer.h"

#include <string.h>

static mha_status check_training(const mha_layer *l, const char *fn)
{
    mha_status st = mha__layer_check(l, fn);
    if (st != MHA_OK) return st;
    if (l->bf16) return mha__fail(MHA_ERR_UNSUPPORTED, "%s: training computes in F32; this layer's dtype is BF16", fn);
    if (!l->train) return mha__fail(MHA_ERR_MISUSE, "%s: call mha_layer_train_init first", fn);
    return MHA_OK;
}

/* ---------------------------------------------------------------- */
/* Parameters                                                        */
/* ---------------------------------------------------------------- */

/* Lays out plain and grads: W_q, W_k, W_v, W_o, then (grads only) the
 * biases in_proj_bias, out_proj.bias, bias_k, bias_v. */
static int64_t matrix_size(const mha_layer *l, matrix m)
{
    return mha__layer_out_features(l, m) * mha__layer_in_features(l, m);
}

/* The floats of the four matrices, which come first in plain and grads. */
static int64_t matrices_size(const mha_layer *l)
{
    int64_t n = 0;
    for (int m = 0; m < MAT_COUNT; m++) n += matrix_size(l, (matrix)m);
    return n;
}

static void train_layout(const mha_layer *l, mha__layer_train *t)
{
    const mha_layer_desc *d = &l->desc;
    int64_t E = d->embed_dim, at = 0;
    for (int m = 0; m < MAT_COUNT; m++) {
        t->w[m] = t->plain + at;
        t->g_w[m] = t->grads + at;
        at += matrix_size(l, (matrix)m);
    }
    t->g_b_in = d->bias ? t->grads + at : NULL;
    at += d->bias ? l->qdim + 2 * l->kvdim : 0;
    t->g_b_out = d->out_bias ? t->grads + at : NULL;
    at += d->out_bias ? E : 0;
    t->g_bias_k = d->add_bias_kv ? t->grads + at : NULL;
    t->g_bias_v = d->add_bias_kv ? t->grads + at + l->kvdim : NULL;
}

mha_status mha_layer_train_init(mha_layer *l)
{
    mha_status st = mha__layer_check(l, "mha_layer_train_init");
    if (st != MHA_OK) return st;
    if (l->bf16)
        return mha__fail(MHA_ERR_UNSUPPORTED,
                         "mha_layer_train_init: training computes in F32; this layer's dtype is BF16");
    if (l->train) return MHA_OK;
    const mha_layer_desc *d = &l->desc;
    int64_t E = d->embed_dim, n_plain = matrices_size(l); /* sizes checked when the layer was made */
    mha__layer_train *t = mha__calloc(1, sizeof *t);
    if (!t) return MHA_ERR_NOMEM;
    t->n_grads =
        n_plain + (d->bias ? l->qdim + 2 * l->kvdim : 0) + (d->out_bias ? E : 0) + (d->add_bias_kv ? 2 * l->kvdim : 0);
    t->plain = mha__alloc(n_plain, sizeof(float));
    t->grads = mha__calloc((size_t)t->n_grads, sizeof(float));
    t->own_plain = t->own_grads = true;
    if (!t->plain || !t->grads) {
        mha__layer_train_free(t);
        return MHA_ERR_NOMEM;
    }
    train_layout(l, t);
    for (int m = 0; m < MAT_COUNT; m++) mha__weight_unpack(&l->w[m], t->w[m]); /* float32: checked above */
    l->train = t;
    return MHA_OK;
}

int64_t mha_layer_params(mha_layer *l, mha_param *params, int64_t capacity)
{
    if (check_training(l, "mha_layer_params") != MHA_OK) return -1;
    if (capacity > 0 && !params) {
        mha__fail(MHA_ERR_MISUSE, "mha_layer_params: NULL params with capacity %lld", (long long)capacity);
        return -1;
    }
    /* The layer's family, except GPT-2's, whose Conv1D tensors are the
     * transposes of what the layer stores: Llama's names have its layout
     * (mha_layer_get_grad gives GPT-2's). */
    mha_weight_names family = mha__layer_family(l);
    mha__named list[MHA__PART_COUNT];
    int n = mha__named_list(l, family == MHA_NAMES_GPT2 ? MHA_NAMES_LLAMA : family, list);
    for (int i = 0; i < n && i < capacity; i++) {
        const mha__named *t = &list[i];
        params[i] = (mha_param){t->name, NULL, NULL, t->numel, t->rank, {t->shape[0], t->shape[1], t->shape[2]}};
        mha__named_storage(l, t, &params[i].value, &params[i].grad);
    }
    return n;
}

mha_status mha_layer_params_changed(mha_layer *l)
{
    mha_status st = check_training(l, "mha_layer_params_changed");
    /* The packs follow at the next call with a context, on its threads. */
    for (int m = 0; m < MAT_COUNT && st == MHA_OK; m++) st = mha__layer_pack(l, (matrix)m, l->train->w[m]);
    if (st == MHA_OK) l->unset = 0; /* the caller wrote every parameter it was given */
    return st;
}

void mha_layer_zero_grad(mha_layer *l)
{
    if (check_training(l, "mha_layer_zero_grad") != MHA_OK) return;
    memset(l->train->grads, 0, (size_t)l->train->n_grads * sizeof(float));
    l->train->zero_pending = false;
}

void mha_layer_zero_grad_deferred(mha_layer *l)
{
    if (check_training(l, "mha_layer_zero_grad_deferred") != MHA_OK) return;
    l->train->zero_pending = true;
}

/* The floats of a training layer's caller storage: its gradients', or
 * (`weights`) its matrices' values. */
static int64_t storage_floats(const mha_layer *l, bool weights)
{
    return weights ? matrices_size(l) : l->train->n_grads;
}

static mha_status storage_size(const mha_layer *l, const char *fn, bool weights, int64_t *count)
{
    mha_status st = check_training(l, fn);
    if (st != MHA_OK) return st;
    if (!count) return mha__fail(MHA_ERR_MISUSE, "%s: NULL count", fn);
    *count = storage_floats(l, weights);
    return MHA_OK;
}

/* fn's arguments: a training layer, and storage of its size (or NULL). */
static mha_status storage_checked(const mha_layer *l, const char *fn, bool weights, const float *storage, int64_t count)
{
    mha_status st = check_training(l, fn);
    if (st != MHA_OK || !storage || count == storage_floats(l, weights)) return st;
    return mha__fail(MHA_ERR_INVALID_ARG, "%s: storage has %lld floats; the layer's %s take %lld", fn, (long long)count,
                     weights ? "matrices" : "gradients", (long long)storage_floats(l, weights));
}

/* *array (n floats, the layer's if *own) moved to storage, or with NULL
 * to an allocation of the layer's: its values kept (`keep`) or zeroed. */
static bool move_array(float **array, bool *own, float *storage, int64_t n, bool keep)
{
    float *to = storage ? storage : keep ? mha__alloc(n, sizeof(float)) : mha__calloc((size_t)n, sizeof(float));
    if (!to) return false;
    if (keep) memmove(to, *array, (size_t)n * sizeof(float));
    if (*own) mha__free(*array);
    *array = to;
    *own = !storage;
    return true;
}

mha_status mha_layer_grad_storage_size(const mha_layer *l, int64_t *count)
{
    return storage_size(l, "mha_layer_grad_storage_size", false, count);
}

mha_status mha_layer_set_grad_storage(mha_layer *l, float *storage, int64_t count)
{
    mha_status st = storage_checked(l, "mha_layer_set_grad_storage", false, storage, count);
    if (st != MHA_OK) return st;
    mha__layer_train *t = l->train;
    if (storage && storage == t->grads) return MHA_OK; /* already where the gradients are */
    if (!move_array(&t->grads, &t->own_grads, storage, t->n_grads, false)) return MHA_ERR_NOMEM;
    train_layout(l, t);
    return MHA_OK;
}

mha_status mha_layer_weight_storage_size(const mha_layer *l, int64_t *count)
{
    return storage_size(l, "mha_layer_weight_storage_size", true, count);
}

mha_status mha_layer_set_weight_storage(mha_layer *l, float *storage, int64_t count)
{
    mha_status st = storage_checked(l, "mha_layer_set_weight_storage", true, storage, count);
    if (st != MHA_OK) return st;
    mha__layer_train *t = l->train;
    if (storage == t->plain) return MHA_OK; /* already where the values are */
    if (!move_array(&t->plain, &t->own_plain, storage, matrices_size(l), true)) return MHA_ERR_NOMEM;
    train_layout(l, t);
    /* Packs still waiting read the values where they now are. */
    for (int m = 0; m < MAT_COUNT && st == MHA_OK; m++) st = mha__layer_pack(l, (matrix)m, t->w[m]);
    return st;
}

/* ---------------------------------------------------------------- */
/* The tape                                                          */
/* ---------------------------------------------------------------- */

mha_status mha_layer_tape_create(mha_layer_tape **tape)
{
    if (!tape) return mha__fail(MHA_ERR_MISUSE, "mha_layer_tape_create: NULL argument");
    *tape = mha__calloc(1, sizeof **tape);
    if (!*tape) return MHA_ERR_NOMEM;
    (*tape)->magic = TAPE_MAGIC;
    return MHA_OK;
}

void mha_layer_tape_free(mha_layer_tape *tape)
{
    if (!tape) return;
    tape->magic = 0;
    mha__free(tape->base);
    mha__free(tape);
}

/* ---------------------------------------------------------------- */
/* Backward                                                          */
/* ---------------------------------------------------------------- */

static mha_status check_backward(const mha_layer *l, const mha_layer_fwd_args *a, const mha_tensor *dy,
                                 const mha_tensor *gq, const mha_tensor *gk, const mha_tensor *gv)
{
    mha_status st = check_training(l, "mha_layer_backward");
    if (st != MHA_OK) return st;
    if (!a || !dy) return mha__fail(MHA_ERR_MISUSE, "mha_layer_backward: NULL argument");
    const mha_layer_tape *tape = a->tape;
    if (!tape || tape->magic != TAPE_MAGIC)
        return mha__fail(MHA_ERR_MISUSE, "mha_layer_backward: args.tape is not a live tape");
    if (tape->layer != l)
        return mha__fail(MHA_ERR_MISUSE, "mha_layer_backward: the tape holds no forward call of this layer (record one "
                                         "with args.tape; each backward consumes it)");
    /* The args as the forward checked them (query stands in for the output). */
    if ((st = mha__layer_check_forward(l, &a->query, NULL, a)) != MHA_OK) return st;
    int64_t N = a->query.shape[0], L = a->query.shape[1], S = a->key.shape[1];
    if (N != tape->N || L != tape->L || S != tape->S)
        return mha__fail(MHA_ERR_INVALID_ARG,
                         "mha_layer_backward: args have N %lld, L %lld, S %lld but the tape "
                         "recorded N %lld, L %lld, S %lld",
                         (long long)N, (long long)L, (long long)S, (long long)tape->N, (long long)tape->L,
                         (long long)tape->S);
    const int64_t q_shape[4] = {N, L, l->desc.embed_dim, 1}, k_shape[4] = {N, S, l->desc.kdim, 1};
    const int64_t v_shape[4] = {N, S, l->desc.vdim, 1};
    if ((st = mha__check_tensor(dy, "grad_attn_output", q_shape)) != MHA_OK ||
        (gq && (st = mha__check_tensor(gq, "grad_query", q_shape)) != MHA_OK) ||
        (gk && (st = mha__check_tensor(gk, "grad_key", k_shape)) != MHA_OK) ||
        (gv && (st = mha__check_tensor(gv, "grad_value", v_shape)) != MHA_OK))
        return st;
    return MHA_OK;
}

/* A caller's [N, T, F] tensor as GEMM rows with contiguous columns: the
 * view itself, or a copy in `stage` when its columns are strided. */
static mha__batched contiguous(const mha_tensor *t, float *stage)
{
    if (t->stride[2] == 1) return mha__layer_from_view(t);
    int64_t N = t->shape[0], T = t->shape[1], F = t->shape[2];
    for (int64_t n = 0; n < N; n++)
        for (int64_t r = 0; r < T; r++)
            for (int64_t c = 0; c < F; c++)
                stage[(n * T + r) * F + c] = t->data[n * t->stride[0] + r * t->stride[1] + c * t->stride[2]];
    return (mha__batched){{stage, F, 1, 0, 0}, T * F};
}

/* Writes a staged copy back into the tensor it came from. */
static void scatter(const mha__batched *staged, mha_tensor *t)
{
    if (staged->m.data == t->data) return;
    int64_t N = t->shape[0], T = t->shape[1], F = t->shape[2];
    for (int64_t n = 0; n < N; n++)
        for (int64_t r = 0; r < T; r++)
            for (int64_t c = 0; c < F; c++)
                t->data[n * t->stride[0] + r * t->stride[1] + c * t->stride[2]] = staged->m.data[(n * T + r) * F + c];
}

/* The backward's buffers in the workspace: dO [N, L, E] (activation
 * layout), and a staging area for caller tensors with strided columns
 * (only touched when there are some). */
typedef struct grad_buffers {
    float *dout, *stage;
} grad_buffers;

/* The plan of one backward call: the attention problem of the recorded
 * forward, the buffers' floats, and the workspace in bytes. */
typedef struct bwd_plan {
    mha__attn_plan attn;
    int64_t nq, stage;
    int64_t workspace;
} bwd_plan;

/* Raises *bytes to what any projection's gradients take: its weight
 * gradient's packs, then (reusing them) its packed transposed weight for
 * the FMA GEMM's chunks, and where the split products run the split rows
 * of up to `rows` rows of dy (W^T itself is the weight's, kept). */
static bool projections_workspace(const mha_layer *l, int64_t rows, int64_t *bytes)
{
    bool split = mha__split_products(l->isa);
    for (matrix m = MAT_Q; m < MAT_COUNT; m++) {
        int64_t out = mha__layer_out_features(l, m), in = mha__layer_in_features(l, m), grad = 0, pack = 0;
        if (!mha__weight_grad_workspace(l->isa->f32, out, in, &grad) ||
            (split && !mha__weight_grad_split_workspace(out, in, &grad)) ||
            !mha__pack_transposed_workspace(l->isa->f32, out, in, &pack) ||
            (split && !mha__linear_split_workspace(rows, out, &pack)))
            return false;
        *bytes = mha__max64(*bytes, mha__max64(grad, pack));
    }
    int64_t E = l->desc.embed_dim; /* self-attention's shared X: every input E wide */
    if (!split || mha__layer_in_features(l, MAT_K) != E || mha__layer_in_features(l, MAT_V) != E) return true;
    int64_t shared = 0;
    mha__grad_output outs[3];
    for (matrix m = MAT_Q; m <= MAT_V; m++) outs[m] = (mha__grad_output){.out = mha__layer_out_features(l, m)};
    if (!mha__weight_grads_split_workspace(3, outs, E, &shared)) return false;
    *bytes = mha__max64(*bytes, shared);
    return true;
}

static mha_status plan_backward(const mha_ctx *ctx, const mha_layer *l, const mha_layer_fwd_args *a, bwd_plan *p)
{
    const mha_layer_desc *d = &l->desc;
    const mha_layer_tape *tape = a->tape;
    int64_t N = tape->N, L = tape->L, S = tape->S, widest = mha__max64(d->embed_dim, mha__max64(d->kdim, d->vdim)),
            total;
    p->attn = mha__layer_plan(l, a);
    mha_status st = mha__attn_plan_check(&p->attn);
    if (st == MHA_OK)
        st = mha__attn_plan_resolve(&p->attn, ctx,
                                    (mha__attn_needs){.kv_rows = true, .kv_dtype = MHA_DTYPE_F32, .stats = true});
    if (st != MHA_OK) return st;
    if (!mha__mul(N * L, l->qdim, &p->nq) || !mha__mul(N * mha__max64(L, S), widest, &p->stage) ||
        !mha__add(p->nq, p->stage, &total) || total > INT64_MAX / 8)
        return mha__fail(MHA_ERR_INVALID_ARG, "the backward workspace for %lld x %lld queries overflows", (long long)N,
                         (long long)L);
    /* The attention, the rotation and the projections take theirs in turn. */
    int64_t attn = 0, rotate = 0, proj = 0, own = 0;
    bool ok = mha__attn_backward_workspace(&p->attn, ctx, true, &attn) && /* dQ lands over the heads: contiguous */
              mha__layer_rotate_workspace(l, L, p->attn.S, &rotate) &&
              projections_workspace(l, N * mha__max64(L, S), &proj) &&
              mha__ws_add(&own, total * (int64_t)sizeof(float), "the backward's buffers");
    if (!ok || !mha__add(own, mha__max64(attn, mha__max64(rotate, proj)), &p->workspace))
        return mha__fail(MHA_ERR_INVALID_ARG, "the backward workspace overflows");
    return MHA_OK;
}

static mha_status grad_buffers_get(mha_ctx *ctx, const bwd_plan *p, grad_buffers *b)
{
    float *base = mha__ws_take(ctx, (p->nq + p->stage) * (int64_t)sizeof(float));
    if (!base) return MHA_ERR_INTERNAL;
    *b = (grad_buffers){base, base + p->nq};
    return MHA_OK;
}

/* bias_k / bias_v gradients: row S of every batch's dK / dV (over the
 * tape's K and V), per head. */
static void appended_key_grads(const mha_layer *l, const mha_layer_tape *tape, int64_t S1)
{
    mha__layer_train *t = l->train;
    if (!t->g_bias_k) return;
    mha_tensor kh = mha__layer_heads_view(l, tape->k, tape->N, S1, l->desc.num_heads); /* V has the same layout */
    int64_t d = l->head_dim;
    for (int64_t n = 0; n < tape->N; n++)
        for (int64_t h = 0; h < l->desc.num_heads; h++)
            for (int64_t c = 0; c < d; c++) {
                int64_t at = n * kh.stride[0] + h * kh.stride[1] + tape->S * kh.stride[2] + c;
                t->g_bias_k[h * d + c] += tape->k[at];
                t->g_bias_v[h * d + c] += tape->v[at];
            }
}

/* Matrix m's weight gradient, from its outputs' gradient dy and its input
 * x: added to it, or written where a deferred zero is pending. */
static mha_status weight_grad(mha_ctx *ctx, const mha_layer *l, matrix m, int64_t N, int64_t T, const mha__batched *dy,
                              const mha__batched *x)
{
    int64_t out = mha__layer_out_features(l, m), in = mha__layer_in_features(l, m);
    bool overwrite = l->train->zero_pending;
    if (mha__split_products(l->isa))
        return mha__weight_grad_split(ctx, l->isa, N, T, dy, x, out, in, l->train->g_w[m], overwrite);
    return mha__weight_grad(ctx, l->isa->f32, N, T, dy, x, out, in, l->train->g_w[m], overwrite);
}

/* A deferred zero, for the gradients the backward adds to rather than
 * writes: the biases' (a few E floats, after the matrices). */
static void zero_bias_grads(const mha_layer *l)
{
    mha__layer_train *t = l->train;
    int64_t matrices = matrices_size(l);
    if (t->zero_pending) memset(t->grads + matrices, 0, (size_t)(t->n_grads - matrices) * sizeof(float));
}

/* Matrix m's input gradient dx = dy W, with the W^T the weight keeps
 * (mha__weight_transposed: split where the split products run, else
 * packed; the split products' chunks of dy that are not finite pack the
 * float32 panels into the workspace, which cost 2% of a training step at
 * S2 when done every call): written into gx, or added to it with `add`. */
static mha_status input_grad(mha_ctx *ctx, const mha_layer *l, matrix m, int64_t N, int64_t T, const mha__batched *dy,
                             const mha__batched *gx, bool add)
{
    int64_t top = mha__ws_top(ctx), out = mha__layer_out_features(l, m), in = mha__layer_in_features(l, m);
    const mha__weight *w = &l->w[m]; /* its transposed packs made where the backward began */
    mha__fma_on_demand on_demand = {l->isa->f32, l->train->w[m], out, in, {0}};
    const mha__packed_split *split = w->split_t.data ? &w->split_t : NULL;
    mha_status st = mha__layer_project_packed(ctx, l, N, T, dy, split ? NULL : &w->f32_t, split, &on_demand, gx, add);
    mha__ws_release(ctx, top);
    return st;
}

/* One input projection's share: b_in's slice and, unless `weight_done`
 * (the shared weight gradients took it), W's gradient; and the input's
 * gradient if asked for, added to gx or (`write`) written there.  dp: the
 * projected rows' gradient (T rows per batch, of a buffer with T1 rows
 * per batch).  x and gx may share the staging area: gx is staged only
 * after the weight gradient has read x. */
static mha_status projection_grads(mha_ctx *ctx, const mha_layer *l, matrix m, int64_t N, int64_t T, float *dp,
                                   int64_t T1, const mha_tensor *x, mha_tensor *gx, float *stage, bool weight_done,
                                   bool write)
{
    mha__layer_train *t = l->train;
    mha__batched dpb = mha__layer_activations(l, dp, N, T1, m == MAT_Q ? l->desc.num_heads : l->desc.num_kv_heads);
    if (t->g_b_in)
        mha__column_sums(ctx, l->isa->f32, N, T, &dpb, mha__layer_out_features(l, m),
                         t->g_b_in + mha__layer_bias_offset(l, m));
    mha_status st = MHA_OK;
    if (!weight_done) {
        mha__batched xb = contiguous(x, stage);
        st = weight_grad(ctx, l, m, N, T, &dpb, &xb);
    }
    if (st != MHA_OK || !gx) return st;
    mha__batched gb = contiguous(gx, stage);
    if ((st = input_grad(ctx, l, m, N, T, &dpb, &gb, !write)) == MHA_OK) scatter(&gb, gx);
    return st;
}

/* Self-attention's W_q, W_k, W_v gradients in one split product of their
 * shared input X (split once a chunk): false, nothing done, unless the
 * query, key and value are one tensor and the split products run. */
static bool shared_weight_grads(mha_ctx *ctx, const mha_layer *l, const mha_layer_fwd_args *a, int64_t S1,
                                float *const dp[3], float *stage, mha_status *st)
{
    const mha_layer_tape *tape = a->tape;
    if (!mha__split_products(l->isa) || tape->L != tape->S || !mha__same_tensor(&a->query, &a->key) ||
        !mha__same_tensor(&a->query, &a->value))
        return false;
    mha__batched dpb[3], xb = contiguous(&a->query, stage);
    mha__grad_output outs[3];
    for (matrix m = MAT_Q; m <= MAT_V; m++) {
        int64_t heads = m == MAT_Q ? l->desc.num_heads : l->desc.num_kv_heads;
        dpb[m] = mha__layer_activations(l, dp[m], tape->N, m == MAT_Q ? tape->L : S1, heads);
        outs[m] = (mha__grad_output){&dpb[m], mha__layer_out_features(l, m), l->train->g_w[m], l->train->zero_pending};
    }
    *st = mha__weight_grads_split(ctx, l->isa, tape->N, tape->L, 3, outs, &xb, l->desc.embed_dim);
    return true;
}

/* The input projections' gradients, in the order Q, K, V, so inputs that
 * are one tensor (self-attention) sum their three gradients in that order. */
static mha_status input_projections_grads(mha_ctx *ctx, const mha_layer *l, const mha_layer_fwd_args *a, int64_t S1,
                                          mha_tensor *const gx[3], float *stage)
{
    const mha_layer_tape *tape = a->tape;
    float *const dp[3] = {tape->heads, tape->k, tape->v};
    const mha_tensor *x[3] = {&a->query, &a->key, &a->value};
    mha_status st = MHA_OK;
    bool weight_done = shared_weight_grads(ctx, l, a, S1, dp, stage, &st);
    for (matrix m = MAT_Q; m <= MAT_V && st == MHA_OK; m++) {
        int64_t T = m == MAT_Q ? tape->L : tape->S, T1 = m == MAT_Q ? tape->L : S1;
        bool seen = false; /* gx[m] is also an earlier projection's: add to what that wrote */
        for (matrix e = MAT_Q; e < m; e++) seen = seen || mha__same_tensor(gx[e], gx[m]);
        st = projection_grads(ctx, l, m, tape->N, T, dp[m], T1, x[m], gx[m], stage, weight_done,
                              a->write_input_grads && !seen);
    }
    return st;
}

static mha_status run_backward(mha_ctx *ctx, mha_layer *l, const bwd_plan *p, const mha_layer_fwd_args *a,
                               const mha_tensor *grad_attn_output, mha_tensor *grad_query, mha_tensor *grad_key,
                               mha_tensor *grad_value)
{
    mha_layer_tape *tape = a->tape;
    mha__layer_train *t = l->train;
    int64_t N = tape->N, L = tape->L, S1 = p->attn.S, E = l->desc.embed_dim;
    int64_t H = l->desc.num_heads, G = l->desc.num_kv_heads;
    grad_buffers g = {0};
    mha_status st = grad_buffers_get(ctx, p, &g);
    if (st != MHA_OK) return st;
    tape->layer = NULL; /* consumed: the head outputs are overwritten below */
    zero_bias_grads(l);

    /* The output projection. */
    mha__batched dy = contiguous(grad_attn_output, g.stage);
    mha__batched heads = mha__layer_activations(l, tape->heads, N, L, H),
                 dout = mha__layer_activations(l, g.dout, N, L, H);
    if (t->g_b_out) mha__column_sums(ctx, l->isa->f32, N, L, &dy, E, t->g_b_out);
    if ((st = weight_grad(ctx, l, MAT_OUT, N, L, &dy, &heads)) != MHA_OK ||
        (st = input_grad(ctx, l, MAT_OUT, N, L, &dy, &dout, false)) != MHA_OK)
        return st;

    /* Attention: dQ, dK, dV land over O, K, V. */
    mha_tensor qh = mha__layer_heads_view(l, tape->q, N, L, H), kh = mha__layer_heads_view(l, tape->k, N, S1, G);
    mha_tensor vh = mha__layer_heads_view(l, tape->v, N, S1, G), oh = mha__layer_heads_view(l, tape->heads, N, L, H);
    mha_tensor doh = mha__layer_heads_view(l, g.dout, N, L, H);
    mha__row_norm norm = {
        .max = tape->stats.max, .sum = tape->stats.sum, .q_norm2 = tape->q_norm2, .k_norm2_max = tape->k_norm2_max};
    if ((st = mha__attn_backward(ctx, &p->attn, &oh, &kh, &vh, &qh, &kh, &vh, &oh, &doh, &norm)) != MHA_OK) return st;
    /* Back through the rotation: the gradients of the unrotated Q and K. */
    if ((st = mha__layer_rotate(ctx, l, &oh, &kh, tape->position, true)) != MHA_OK) return st;
    appended_key_grads(l, tape, S1);

    mha_tensor *const gx[3] = {grad_query, grad_key, grad_value};
    if ((st = input_projections_grads(ctx, l, a, S1, gx, g.stage)) == MHA_OK) t->zero_pending = false;
    return st;
}

mha_status mha_layer_backward_workspace_size(const mha_ctx *ctx, const mha_layer *l, const mha_layer_fwd_args *a,
                                             const mha_tensor *grad_attn_output, const mha_tensor *grad_query,
                                             const mha_tensor *grad_key, const mha_tensor *grad_value, int64_t *bytes)
{
    if (!ctx || !bytes) return mha__fail(MHA_ERR_MISUSE, "mha_layer_backward_workspace_size: NULL argument");
    *bytes = 0;
    mha_status st = check_backward(l, a, grad_attn_output, grad_query, grad_key, grad_value);
    bwd_plan p;
    if (st == MHA_OK && (st = plan_backward(ctx, l, a, &p)) == MHA_OK) *bytes = p.workspace;
    return st;
}

mha_status mha_layer_backward(mha_ctx *ctx, mha_layer *l, const mha_layer_fwd_args *a,
                              const mha_tensor *grad_attn_output, mha_tensor *grad_query, mha_tensor *grad_key,
                              mha_tensor *grad_value)
{
    if (!ctx) return mha__fail(MHA_ERR_MISUSE, "mha_layer_backward: NULL context");
    mha_status st = check_backward(l, a, grad_attn_output, grad_query, grad_key, grad_value);
    if (st == MHA_OK) st = mha__layer_check_weights(l, "mha_layer_backward");
    if (st == MHA_OK) st = mha__layer_refresh(ctx, l);
    /* W^T for each dX = dY W, before anything is written: out_proj's
     * always, the input projections' when an input's gradient is asked. */
    bool inputs = grad_query || grad_key || grad_value;
    for (int m = 0; m < MAT_COUNT && st == MHA_OK; m++)
        if (m == MAT_OUT || inputs) st = mha__weight_transposed(ctx, &l->w[m], l->train->w[m]);
    bwd_plan p;
    if (st == MHA_OK) st = plan_backward(ctx, l, a, &p);
    if (st == MHA_OK) st = mha__ws_reserve(ctx, p.workspace);
    if (st != MHA_OK) return st;
    int64_t top = mha__ws_top(ctx);
    st = run_backward(ctx, l, &p, a, grad_attn_output, grad_query, grad_key, grad_value);
    mha__ws_release(ctx, top);
    return st;
}
