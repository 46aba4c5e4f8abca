/*
 * forward.c -- the layer's forward pass: torch.nn.MultiheadAttention and
 * the model blocks, as a plan and the pipeline's stages (pipeline.c).
 *
 * Data flow of one call (N batches, L queries, S keys, h heads of width
 * d); the projections are GEMMs against weights packed when they are set:
 *   Q = query W_q^T + b_q            L rows   (workspace or tape, head-major
 *   K = key   W_k^T + b_k            S' rows   [h][N][T][d] when d allows,
 *   V = value W_v^T + b_v            S' rows   see mha__layer_activations)
 *                                    S' = S (+1 bias_k) (+1 zero row)
 *   Q, K rotated (rope)
 *   A = attention over [N, h, T, d] views of Q, K, V (no copies),
 *       written over Q when nothing reads Q afterwards
 *   attn_output = A W_o^T + b_o      written through the caller's strides
 *   attn_weights, if asked, recomputed from the saved row max and sum.
 */
#include "layer/layer.h"

#include <string.h>

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
    bool keep_norms;             /* the wide pass's norms go to the attention: no rotation between */
    int64_t nq, nk, nrow, n_out; /* floats: Q (and heads), K (and V), each statistic, the output */
    int64_t n_norms;             /* doubles of the kept norms (mha__layer_norms) */
    int64_t norms_at;            /* their offset in floats in the tape's buffers, or -1: workspace */
    int64_t buffers;             /* floats of Q, K, V, heads, statistics: workspace or tape */
    int64_t staging_at;          /* offset of the staging area in the workspace, or -1: Q's buffer */
    int64_t workspace;           /* bytes */
} fwd_plan;

/* Floats of each buffer; INVALID_ARG if they overflow. */
static mha_status plan_buffers(const mha_layer *l, bool tape, fwd_plan *f)
{
    int64_t all;
    if (!mha__mul(f->N, f->L, &f->nq) || !mha__mul(f->nq, l->qdim, &f->nq) || !mha__mul(f->N, f->S1, &f->nk) ||
        !mha__mul(f->nk, l->kvdim, &f->nk) || !mha__mul(f->N * f->L, l->desc.num_heads, &f->nrow) ||
        !mha__mul(f->N * f->L, l->desc.embed_dim, &f->n_out) || !mha__add(f->nq, f->nk, &all) ||
        !mha__add(all, f->nk, &all) || !mha__add(all, f->separate_heads ? f->nq : 0, &all) ||
        !mha__add(all, f->stats ? 2 * f->nrow : 0, &all) || !mha__add(all, f->n_out, &all) || all > INT64_MAX / 8 ||
        !mha__add(f->keep_norms ? f->nrow : 0, f->keep_norms ? f->N * l->desc.num_kv_heads : 0, &f->n_norms) ||
        f->n_norms > INT64_MAX / 8)
        return mha__fail(MHA_ERR_INVALID_ARG, "the layer's workspace for %lld x %lld queries and %lld keys overflows",
                         (long long)f->N, (long long)f->L, (long long)f->S1);
    f->buffers = all - f->n_out;
    /* A tape keeps the norms after its activations (doubles: an even
     * offset), for the backward. */
    f->norms_at = tape && f->n_norms ? f->buffers + f->buffers % 2 : -1;
    if (f->norms_at >= 0) f->buffers = f->norms_at + 2 * f->n_norms;
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
    int64_t project = 0, rotate = 0, probs = 0;
    bool ok = mha__layer_project_workspace(ctx, l, f->N, f->L, f->S, &project) &&
              mha__layer_rotate_workspace(l, f->L, f->S1, &rotate);
    if (ok && f->weights) ok = mha__attn_forward_workspace(&f->attn, ctx, &probs);
    *bytes = mha__max64(mha__max64(project, rotate), mha__max64(f->attn.workspace, probs));
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
    f->keep_norms = !l->bf16 && l->desc.rope.kind == MHA_ROPE_NONE;
    mha_status st = mha__attn_plan_check(&f->attn);
    if (st == MHA_OK) st = plan_buffers(l, tape, f);
    mha__attn_needs needs = {
        .kv_rows = true, .kv_dtype = MHA_DTYPE_F32, .stats = f->stats}; /* the activations always have a row view */
    if (st == MHA_OK) st = mha__attn_plan_resolve(&f->attn, ctx, needs);
    int64_t calls = 0, own = 0;
    if (st == MHA_OK && !plan_calls(ctx, l, f, &calls)) st = MHA_ERR_INVALID_ARG;
    if (st != MHA_OK) return st;
    int64_t staging = f->staging_at >= 0 ? f->n_out : 0, floats = (tape ? 0 : f->buffers) + staging;
    if (!mha__ws_add(&own, floats * (int64_t)sizeof(float), "the layer's activations") ||
        !mha__ws_add(&own, (tape ? 0 : f->n_norms) * (int64_t)sizeof(double), "the wide pass's norms") ||
        !mha__add(own, calls, &f->workspace))
        return mha__fail(MHA_ERR_INVALID_ARG, "the layer's workspace overflows");
    return MHA_OK;
}

/* Where a forward call keeps Q, K, V, the concatenated heads and the row
 * statistics, where a strided attn_output is staged, and the wide pass's
 * norms (NULL when not kept). */
typedef struct layer_buffers {
    float *q, *k, *v, *heads, *staging;
    mha__row_stats stats;
    mha__layer_norms norms;
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
    if (f->n_norms) {
        b->norms.q = f->norms_at >= 0 ? (double *)(void *)(tape->base + f->norms_at)
                                      : mha__ws_take(ctx, f->n_norms * (int64_t)sizeof(double));
        if (!b->norms.q) return MHA_ERR_INTERNAL;
        b->norms.k_max = b->norms.q + f->nrow;
    }
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
        .scale = mha__layer_scale(l),
        .softcap = d->softcap,
        .causal = a->causal,
        .window_left = d->window_left,
        .window_right = d->window_right,
        .alibi = l->alibi,
        .masks = {a->attn_mask, a->key_padding_mask},
        .bf16 = l->bf16,
        .feeds_backward = a->tape != NULL, /* recording for one, or the backward itself */
    };
}

/* Marks the tape (if any) as holding this call's activations. */
static void record(mha_layer_tape *tape, const mha_layer *l, const mha_layer_fwd_args *a, const layer_buffers *b)
{
    if (tape)
        *tape = (mha_layer_tape){.magic = TAPE_MAGIC,
                                 .layer = l,
                                 .N = a->query.shape[0],
                                 .L = a->query.shape[1],
                                 .S = a->key.shape[1],
                                 .position = a->position,
                                 .q = b->q,
                                 .k = b->k,
                                 .v = b->v,
                                 .heads = b->heads,
                                 .stats = b->stats,
                                 .q_norm2 = b->norms.q,
                                 .k_norm2_max = b->norms.k_max,
                                 .base = tape->base,
                                 .capacity = tape->capacity};
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

static mha_status run_forward(mha_ctx *ctx, const mha_layer *l, const fwd_plan *f, mha_tensor *attn_output,
                              mha_tensor *attn_weights, const mha_layer_fwd_args *a)
{
    layer_buffers buf;
    mha_status st = buffers_get(ctx, f, a->tape, &buf);
    if (st != MHA_OK || f->N * f->L == 0) {
        if (st == MHA_OK) record(a->tape, l, a, &buf);
        return st;
    }
    int64_t N = f->N, H = l->desc.num_heads, G = l->desc.num_kv_heads;
    mha__layer_rows rows = {N, f->L, f->S, f->S1, f->attn.feeds_backward};
    mha__batched x_q = mha__layer_from_view(&a->query), x_k = mha__layer_from_view(&a->key);
    mha__batched x_v = mha__layer_from_view(&a->value);
    /* The appended keys first: the wide pass's key norms take in every key
     * the attention sees, as its own would. */
    append_extra_keys(l, buf.k, buf.v, N, f->S, f->S1);
    mha__layer_norms *keep = f->keep_norms ? &buf.norms : NULL;
    if ((st = mha__layer_project_qkv(ctx, l, &rows, &x_q, &x_k, &x_v, buf.q, buf.k, buf.v, keep)) != MHA_OK) return st;
    mha_tensor qh = mha__layer_heads_view(l, buf.q, N, f->L, H), kh = mha__layer_heads_view(l, buf.k, N, f->S1, G);
    mha_tensor vh = mha__layer_heads_view(l, buf.v, N, f->S1, G), oh = mha__layer_heads_view(l, buf.heads, N, f->L, H);
    if ((st = mha__layer_rotate(ctx, l, &qh, &kh, a->position, false)) != MHA_OK) return st;
    mha__kv kv = mha__kv_from_tensors(&kh, &vh);
    kv.rows.k_norm2_max = buf.norms.k_max; /* NULL: the attention finds its own */
    if ((st = mha__attn_run(ctx, &f->attn, &oh, NULL, f->stats ? &buf.stats : NULL, &qh, buf.norms.q, &kv)) != MHA_OK)
        return st;
    if (attn_weights &&
        (st = mha__attn_probs(ctx, &f->attn, attn_weights, a->average_attn_weights, &buf.stats, &qh, &kh)) != MHA_OK)
        return st;
    if ((st = mha__layer_project_output(ctx, l, N, f->L, buf.heads, attn_output, buf.staging)) != MHA_OK) return st;
    record(a->tape, l, a, &buf);
    return MHA_OK;
}

mha_status mha_layer_forward(mha_ctx *ctx, mha_layer *l, mha_tensor *attn_output, mha_tensor *attn_weights,
                             const mha_layer_fwd_args *a)
{
    fwd_plan f;
    mha_status st = forward_plan(ctx, l, attn_output, attn_weights, a, &f);
    if (st == MHA_OK) st = mha__layer_check_weights(l, "mha_layer_forward");
    if (st == MHA_OK) st = mha__layer_refresh(ctx, l);
    if (st != MHA_OK) return st;
    if (f.N * f.L == 0 && !a->tape) return MHA_OK;
    if ((st = mha__ws_reserve(ctx, f.workspace)) != MHA_OK) return st;
    int64_t top = mha__ws_top(ctx);
    st = run_forward(ctx, l, &f, attn_output, attn_weights, a);
    mha__ws_release(ctx, top);
    return st;
}
