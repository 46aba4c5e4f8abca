/*
 * sdpa.c -- the public scaled dot-product attention: mha_attention() and
 * mha_attention_backward() check their tensors and descriptor, resolve
 * them into a plan (attention.h), and hand it to the fused forward
 * (flash.c), the split-K decode path (decode.c) or the fused backward
 * (flash_bwd.c).
 */
#include "attn/attention.h"
#include "core/tensor.h"

#include <math.h>
#include <string.h>

void mha_attn_desc_init(mha_attn_desc *desc)
{
    memset(desc, 0, sizeof *desc);
    desc->scale = NAN;
    desc->dtype = MHA_DTYPE_F32;
    desc->causal = MHA_CAUSAL_NONE;
    desc->window_left = -1;
    desc->window_right = -1;
}

/* The problem of one mha_attention() call, after checking q, k, v, out
 * (out's shape [B, Hq, L, Dv]) and the descriptor. */
static mha_status problem_from_desc(const mha_tensor *q, const mha_tensor *k, const mha_tensor *v,
                                    const mha_tensor *out, const mha_attn_desc *desc, mha__attn_plan *plan)
{
    const int64_t any[4] = {-1, -1, -1, -1};
    mha_status st = mha__check_tensor(q, "query", any);
    if (st != MHA_OK) return st;
    int64_t B = q->shape[0], Hq = q->shape[1], L = q->shape[2], D = q->shape[3];
    const int64_t k_shape[4] = {B, -1, -1, D};
    if ((st = mha__check_tensor(k, "key", k_shape)) != MHA_OK) return st;
    int64_t Hkv = k->shape[1], S = k->shape[2];
    const int64_t v_shape[4] = {B, Hkv, S, -1};
    if ((st = mha__check_tensor(v, "value", v_shape)) != MHA_OK) return st;
    const int64_t out_shape[4] = {B, Hq, L, v->shape[3]};
    if ((st = mha__check_tensor(out, "output", out_shape)) != MHA_OK) return st;
    if (Hkv != Hq && !desc->enable_gqa)
        return mha__fail(MHA_ERR_INVALID_ARG,
                         "key has %lld heads but query has %lld; set enable_gqa for grouped-query attention",
                         (long long)Hkv, (long long)Hq);
    if (Hkv == 0 && Hq > 0) return mha__fail(MHA_ERR_INVALID_ARG, "key has 0 heads but query has %lld", (long long)Hq);
    return mha__attn_problem(desc, (mha__attn_dims){B, Hq, Hkv, L, S, D, v->shape[3]}, plan);
}

mha_status mha__attn_problem(const mha_attn_desc *desc, mha__attn_dims dims, mha__attn_plan *plan)
{
    int64_t D = dims.D, S = dims.S;
    *plan = (mha__attn_plan){
        .B = dims.B,
        .Hq = dims.Hq,
        .Hkv = dims.Hkv,
        .L = dims.L,
        .S = S,
        .D = D,
        .Dv = dims.Dv,
        .R = S,
        .scale = isnan(desc->scale) ? (float)(1.0 / sqrt((double)D)) : (float)desc->scale,
        .softcap = desc->softcap,
        .causal = desc->causal,
        .window_left = desc->window_left,
        .window_right = desc->window_right,
        .alibi = desc->alibi_slopes,
        .masks = {desc->mask},
        .query_offset = desc->query_offset,
        .key_offset = desc->key_offset,
        .query_total = desc->query_total,
        .key_total = desc->key_total,
        .bf16 = desc->dtype == MHA_DTYPE_BF16,
    };
    if (desc->dtype != MHA_DTYPE_F32 && desc->dtype != MHA_DTYPE_BF16)
        return mha__fail(MHA_ERR_INVALID_ARG, "dtype %s is not supported; attention computes in F32 or BF16",
                         mha_dtype_name(desc->dtype));
    return MHA_OK;
}

/* The forward's plan, checked and resolved; `stats`: the caller wants the
 * row statistics (which only the tiled driver keeps). */
static mha_status forward_plan(const mha_ctx *ctx, const mha_tensor *out, const mha_tensor *q, const mha_tensor *k,
                               const mha_tensor *v, const mha_attn_desc *desc, bool stats, mha__attn_plan *p,
                               mha__kv *kv)
{
    mha_status st = problem_from_desc(q, k, v, out, desc, p);
    if (st != MHA_OK) return st;
    p->feeds_backward = stats; /* the statistics are the backward's */
    *kv = mha__kv_from_tensors(k, v);
    return mha__attn_plan_resolve(p, ctx, mha__attn_needs_of(kv, stats));
}

/* Either forward's workspace (fn names the caller in the error). */
static mha_status forward_workspace(const char *fn, const mha_ctx *ctx, const mha_tensor *out, const mha_tensor *q,
                                    const mha_tensor *k, const mha_tensor *v, const mha_attn_desc *desc, bool stats,
                                    int64_t *bytes)
{
    if (!ctx || !out || !q || !k || !v || !desc || !bytes) return mha__fail(MHA_ERR_MISUSE, "%s: NULL argument", fn);
    mha__attn_plan p;
    mha__kv kv;
    mha_status st = forward_plan(ctx, out, q, k, v, desc, stats, &p, &kv);
    *bytes = st == MHA_OK ? p.workspace : 0;
    return st;
}

mha_status mha_attention_workspace_size(const mha_ctx *ctx, const mha_tensor *out, const mha_tensor *q,
                                        const mha_tensor *k, const mha_tensor *v, const mha_attn_desc *desc,
                                        int64_t *bytes)
{
    return forward_workspace("mha_attention_workspace_size", ctx, out, q, k, v, desc, false, bytes);
}

mha_status mha_attention_with_stats_workspace_size(const mha_ctx *ctx, const mha_tensor *out, const mha_tensor *q,
                                                   const mha_tensor *k, const mha_tensor *v, const mha_attn_desc *desc,
                                                   int64_t *bytes)
{
    return forward_workspace("mha_attention_with_stats_workspace_size", ctx, out, q, k, v, desc, true, bytes);
}

/* Either forward: lse, or the row statistics (stats not NULL). */
static mha_status attention(mha_ctx *ctx, mha_tensor *out, float *lse, mha__row_stats *stats, const mha_tensor *q,
                            const mha_tensor *k, const mha_tensor *v, const mha_attn_desc *desc)
{
    mha__attn_plan p;
    mha__kv kv;
    mha_status st = forward_plan(ctx, out, q, k, v, desc, stats != NULL, &p, &kv);
    if (st == MHA_OK) st = mha__ws_reserve(ctx, p.workspace);
    if (st != MHA_OK) return st;
    int64_t top = mha__ws_top(ctx);
    st = mha__attn_run(ctx, &p, out, lse, stats, q, NULL, &kv);
    mha__ws_release(ctx, top);
    return st;
}

mha_status mha_attention(mha_ctx *ctx, mha_tensor *out, float *lse, const mha_tensor *q, const mha_tensor *k,
                         const mha_tensor *v, const mha_attn_desc *desc)
{
    if (!ctx || !out || !q || !k || !v || !desc) return mha__fail(MHA_ERR_MISUSE, "mha_attention: NULL argument");
    return attention(ctx, out, lse, NULL, q, k, v, desc);
}

mha_status mha_attention_with_stats(mha_ctx *ctx, mha_tensor *out, const mha_attn_stats *stats, const mha_tensor *q,
                                    const mha_tensor *k, const mha_tensor *v, const mha_attn_desc *desc)
{
    if (!ctx || !out || !stats || !stats->max || !stats->sum || !q || !k || !v || !desc)
        return mha__fail(MHA_ERR_MISUSE, "mha_attention_with_stats: NULL argument");
    mha__row_stats rows = {stats->max, stats->sum};
    return attention(ctx, out, NULL, &rows, q, k, v, desc);
}

/* The backward's plan and workspace, after checking its tensors. */
static mha_status backward_plan(const mha_ctx *ctx, const mha_tensor *dq, const mha_tensor *dk, const mha_tensor *dv,
                                const mha_tensor *q, const mha_tensor *k, const mha_tensor *v, const mha_tensor *out,
                                const mha_tensor *grad_out, const mha_attn_desc *desc, mha__attn_plan *p,
                                int64_t *bytes)
{
    mha_status st = problem_from_desc(q, k, v, out, desc, p);
    if (st != MHA_OK) return st;
    if (p->bf16)
        return mha__fail(MHA_ERR_UNSUPPORTED, "the backward pass computes in F32 only; dtype BF16 is forward-only");
    p->feeds_backward = true;
    if ((st = mha__check_tensor(grad_out, "grad_output", out->shape)) != MHA_OK ||
        (st = mha__check_tensor(dq, "query.grad", q->shape)) != MHA_OK ||
        (st = mha__check_tensor(dk, "key.grad", k->shape)) != MHA_OK ||
        (st = mha__check_tensor(dv, "value.grad", v->shape)) != MHA_OK)
        return st;
    mha__kv kv = mha__kv_from_tensors(k, v);
    if ((st = mha__attn_plan_resolve(p, ctx, mha__attn_needs_of(&kv, true))) != MHA_OK) return st;
    *bytes = 0;
    return mha__attn_backward_workspace(p, ctx, dq->stride[3] == 1, bytes) ? MHA_OK : MHA_ERR_INVALID_ARG;
}

mha_status mha_attention_backward_workspace_size(const mha_ctx *ctx, const mha_tensor *dq, const mha_tensor *dk,
                                                 const mha_tensor *dv, const mha_tensor *q, const mha_tensor *k,
                                                 const mha_tensor *v, const mha_tensor *out, const mha_tensor *grad_out,
                                                 const mha_attn_desc *desc, int64_t *bytes)
{
    if (!ctx || !dq || !dk || !dv || !q || !k || !v || !out || !grad_out || !desc || !bytes)
        return mha__fail(MHA_ERR_MISUSE, "mha_attention_backward_workspace_size: NULL argument");
    mha__attn_plan p;
    mha_status st = backward_plan(ctx, dq, dk, dv, q, k, v, out, grad_out, desc, &p, bytes);
    if (st != MHA_OK) *bytes = 0;
    return st;
}

/* Either backward: from lse, or from the row statistics. */
static mha_status attention_backward(mha_ctx *ctx, mha_tensor *dq, mha_tensor *dk, mha_tensor *dv, const mha_tensor *q,
                                     const mha_tensor *k, const mha_tensor *v, const mha_tensor *out,
                                     const mha__row_norm *norm, const mha_tensor *grad_out, const mha_attn_desc *desc)
{
    mha__attn_plan p;
    int64_t bytes;
    mha_status st = backward_plan(ctx, dq, dk, dv, q, k, v, out, grad_out, desc, &p, &bytes);
    if (st == MHA_OK) st = mha__ws_reserve(ctx, bytes);
    if (st != MHA_OK) return st;
    int64_t top = mha__ws_top(ctx);
    st = mha__attn_backward(ctx, &p, dq, dk, dv, q, k, v, out, grad_out, norm);
    mha__ws_release(ctx, top);
    return st;
}

mha_status mha_attention_backward(mha_ctx *ctx, mha_tensor *dq, mha_tensor *dk, mha_tensor *dv, const mha_tensor *q,
                                  const mha_tensor *k, const mha_tensor *v, const mha_tensor *out, const float *lse,
                                  const mha_tensor *grad_out, const mha_attn_desc *desc)
{
    if (!ctx || !dq || !dk || !dv || !q || !k || !v || !out || !lse || !grad_out || !desc)
        return mha__fail(MHA_ERR_MISUSE, "mha_attention_backward: NULL argument");
    mha__row_norm norm = {.lse = lse};
    return attention_backward(ctx, dq, dk, dv, q, k, v, out, &norm, grad_out, desc);
}

mha_status mha_attention_backward_with_stats(mha_ctx *ctx, mha_tensor *dq, mha_tensor *dk, mha_tensor *dv,
                                             const mha_tensor *q, const mha_tensor *k, const mha_tensor *v,
                                             const mha_tensor *out, const mha_attn_stats *stats,
                                             const mha_tensor *grad_out, const mha_attn_desc *desc)
{
    if (!ctx || !dq || !dk || !dv || !q || !k || !v || !out || !stats || !stats->max || !stats->sum || !grad_out ||
        !desc)
        return mha__fail(MHA_ERR_MISUSE, "mha_attention_backward_with_stats: NULL argument");
    mha__row_norm norm = {.max = stats->max, .sum = stats->sum};
    return attention_backward(ctx, dq, dk, dv, q, k, v, out, &norm, grad_out, desc);
}

mha_status mha_attention_backward_block(mha_ctx *ctx, mha_tensor *dq, mha_tensor *dk, mha_tensor *dv,
                                        const mha_tensor *q, const mha_tensor *k, const mha_tensor *v,
                                        const mha_attn_stats *stats, const float *delta, const mha_tensor *grad_out,
                                        const mha_attn_desc *desc)
{
    if (!ctx || !dq || !dk || !dv || !q || !k || !v || !stats || !stats->max || !stats->sum || !delta || !grad_out ||
        !desc)
        return mha__fail(MHA_ERR_MISUSE, "mha_attention_backward_block: NULL argument");
    mha__row_norm norm = {.max = stats->max, .sum = stats->sum, .delta = delta};
    /* grad_out stands in for the output, whose shape it has: with delta
     * given, the output is never read. */
    return attention_backward(ctx, dq, dk, dv, q, k, v, grad_out, &norm, grad_out, desc);
}

mha_status mha_attention_backward_row_sums(mha_ctx *ctx, double *p_sum, double *p_dp, const mha_tensor *q,
                                           const mha_tensor *k, const mha_tensor *v, const mha_tensor *grad_out,
                                           const mha_attn_stats *stats, const mha_attn_desc *desc)
{
    if (!ctx || !p_sum || !p_dp || !q || !k || !v || !grad_out || !stats || !stats->max || !stats->sum || !desc)
        return mha__fail(MHA_ERR_MISUSE, "mha_attention_backward_row_sums: NULL argument");
    mha__attn_plan p;
    int64_t bytes;
    /* The backward's plan, q, k and v standing in for their gradients and
     * grad_out for the output (the same shapes; none is written or read
     * as such): its workspace covers the row passes'. */
    mha_status st = backward_plan(ctx, q, k, v, q, k, v, grad_out, grad_out, desc, &p, &bytes);
    if (st == MHA_OK) st = mha__ws_reserve(ctx, bytes);
    if (st != MHA_OK) return st;
    mha__row_norm norm = {.max = stats->max, .sum = stats->sum};
    mha__attn_row_sums(ctx, &p, q, k, v, grad_out, &norm, p_sum, p_dp);
    return MHA_OK;
}
