/*
 * attention.c -- scaled dot-product attention: validation and the row
 * contract (which keys a query row sees, and the bias on each score).  The
 * computation itself is in flash.c.
 */
#include "attention.h"
#include "decode.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

mha_tensor mha_tensor_4d(float *data, int64_t d0, int64_t d1, int64_t d2, int64_t d3)
{
    mha_tensor t = {data, {d0, d1, d2, d3}, {d1 * d2 * d3, d2 * d3, d3, 1}};
    return t;
}

mha_tensor mha_tensor_3d(float *data, int64_t d0, int64_t d1, int64_t d2)
{
    mha_tensor t = {data, {d0, d1, d2, 1}, {d1 * d2, d2, 1, 0}};
    return t;
}

void mha_attn_desc_init(mha_attn_desc *desc)
{
    memset(desc, 0, sizeof *desc);
    desc->scale = NAN;
    desc->dtype = MHA_DTYPE_F32;
    desc->causal = MHA_CAUSAL_NONE;
    desc->window_left = -1;
    desc->window_right = -1;
}

/* ---------------------------------------------------------------- */
/* Validation                                                        */
/* ---------------------------------------------------------------- */

mha_status mha__check_tensor(const mha_tensor *t, const char *what, const int64_t shape[4])
{
    static const char *const dim_names[4] = {"first", "second", "third", "fourth"};
    if (!t || !t->data) return mha__fail(MHA_ERR_MISUSE, "%s is NULL", what);
    int64_t last = 0;
    for (int d = 0; d < 4; d++) {
        if (t->shape[d] < 0 || t->stride[d] < 0)
            return mha__fail(MHA_ERR_INVALID_ARG, "%s has a negative size or stride in its %s dimension",
                             what, dim_names[d]);
        if (shape[d] >= 0 && t->shape[d] != shape[d])
            return mha__fail(MHA_ERR_INVALID_ARG, "%s has %lld in its %s dimension, expected %lld", what,
                             (long long)t->shape[d], dim_names[d], (long long)shape[d]);
        int64_t reach;
        if (t->shape[d] > 0 &&
            (!mha__mul(t->shape[d] - 1, t->stride[d], &reach) || !mha__add(last, reach, &last)))
            return mha__fail(MHA_ERR_INVALID_ARG, "%s: shape times strides overflows 64 bits", what);
    }
    return MHA_OK;
}

mha_status mha__attn_plan_check(const mha__attn_plan *p)
{
    if (p->D < 1) return mha__fail(MHA_ERR_INVALID_ARG, "head dimension must be at least 1, got %lld", (long long)p->D);
    if (p->Hkv < 1 || p->Hq % p->Hkv != 0)
        return mha__fail(MHA_ERR_INVALID_ARG, "query heads %lld are not a multiple of key/value heads %lld",
                         (long long)p->Hq, (long long)p->Hkv);
    if (!isfinite(p->scale)) return mha__fail(MHA_ERR_INVALID_ARG, "scale must be finite");
    if (!(p->softcap >= 0) || isinf(p->softcap))
        return mha__fail(MHA_ERR_INVALID_ARG, "softcap must be finite and >= 0 (0 = off), got %g", (double)p->softcap);
    if (p->window_left < -1 || p->window_right < -1)
        return mha__fail(MHA_ERR_INVALID_ARG, "window sizes must be >= -1 (-1 = unbounded), got left %lld right %lld",
                         (long long)p->window_left, (long long)p->window_right);
    if (p->causal != MHA_CAUSAL_NONE && p->causal != MHA_CAUSAL_TOP_LEFT && p->causal != MHA_CAUSAL_BOTTOM_RIGHT)
        return mha__fail(MHA_ERR_INVALID_ARG, "causal mode %d is not an mha_causal value", (int)p->causal);
    for (int m = 0; m < 2; m++) {
        const mha_mask *mask = &p->masks[m];
        if (mask->kind != MHA_MASK_NONE && mask->kind != MHA_MASK_KEEP && mask->kind != MHA_MASK_ADD)
            return mha__fail(MHA_ERR_INVALID_ARG, "mask kind %d is not an mha_mask_kind value", (int)mask->kind);
        if (mask->kind == MHA_MASK_NONE) continue;
        if (!mask->data) return mha__fail(MHA_ERR_MISUSE, "mask data is NULL");
        const int64_t extent[4] = {p->B, p->Hq, p->L, p->R};
        int64_t last = 0, reach;
        for (int d = 0; d < 4; d++)
            if (mask->stride[d] < 0 || (extent[d] > 0 && (!mha__mul(extent[d] - 1, mask->stride[d], &reach) ||
                                                          !mha__add(last, reach, &last))))
                return mha__fail(MHA_ERR_INVALID_ARG, "mask strides are negative or overflow");
    }
    return MHA_OK;
}

/* ---------------------------------------------------------------- */
/* The row contract                                                  */
/* ---------------------------------------------------------------- */

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

void mha__row_key_range(const mha__attn_plan *p, int64_t i, int64_t *lo, int64_t *hi)
{
    int64_t diag = i + p->R - p->L; /* the key aligned with row i, bottom-right */
    *lo = 0;
    *hi = p->R;
    if (p->causal == MHA_CAUSAL_TOP_LEFT) *hi = min64(*hi, i + 1);
    if (p->causal == MHA_CAUSAL_BOTTOM_RIGHT) *hi = min64(*hi, diag + 1);
    if (p->window_left >= 0) *lo = max64(*lo, diag - p->window_left);
    if (p->window_right >= 0) *hi = min64(*hi, diag + p->window_right + 1);
}

bool mha__plan_has_bias(const mha__attn_plan *p)
{
    return p->alibi || p->masks[0].kind != MHA_MASK_NONE || p->masks[1].kind != MHA_MASK_NONE;
}

float mha__real_key_bias(const mha__attn_plan *p, int64_t b, int64_t h, int64_t i, int64_t j)
{
    float bias = 0.0f;
    if (p->alibi) bias -= p->alibi[h] * (float)llabs(i + p->R - p->L - j);
    for (int m = 0; m < 2; m++) {
        const mha_mask *mask = &p->masks[m];
        if (mask->kind == MHA_MASK_NONE) continue;
        int64_t at = b * mask->stride[0] + h * mask->stride[1] + i * mask->stride[2] + j * mask->stride[3];
        if (mask->kind == MHA_MASK_KEEP) {
            if (!((const uint8_t *)mask->data)[at]) return -INFINITY;
        } else {
            bias += ((const float *)mask->data)[at];
        }
    }
    return bias;
}

void mha__score_contract(const mha__attn_plan *p, float *st, int64_t lds, int64_t b, int64_t h, int64_t i0,
                         int64_t rows, int64_t j0, int64_t cols, const int64_t *lo, const int64_t *hi,
                         float *cap_slope)
{
    bool biased = mha__plan_has_bias(p);
    float cap = p->softcap;
    /* Key-major order, so each pass is over contiguous memory.  Rows' ranges
     * grow with the row, so the rows that see a key form one run
     * [first, last), and both ends only move forward as the key grows. */
    int64_t first = 0, last = 0;
    for (int64_t c = 0; c < cols; c++) {
        int64_t key = j0 + c;
        float *s = st + c * lds, *slope = cap_slope ? cap_slope + c * lds : NULL;
        if (key >= p->R) { /* appended keys: no range, no bias, only the cap */
            for (int64_t r = 0; cap > 0 && r < rows; r++) {
                float t = tanhf(s[r] / cap);
                s[r] = cap * t;
                if (slope) slope[r] = 1.0f - t * t;
            }
            continue;
        }
        while (first < rows && hi[first] <= key) first++;
        while (last < rows && lo[last] <= key) last++;
        for (int64_t r = 0; r < first; r++) s[r] = -INFINITY;
        for (int64_t r = last > first ? last : first; r < rows; r++) s[r] = -INFINITY;
        for (int64_t r = first; r < last && (biased || cap > 0); r++) {
            float x = s[r];
            if (cap > 0) {
                float t = tanhf(x / cap);
                x = cap * t;
                if (slope) slope[r] = 1.0f - t * t;
            }
            if (biased) x += mha__real_key_bias(p, b, h, i0 + r, key);
            s[r] = x;
        }
    }
}

/* ---------------------------------------------------------------- */
/* Scratch                                                           */
/* ---------------------------------------------------------------- */

/* Per-thread scratch of `floats` floats; NULL on failure. */
char *mha__thread_scratch(mha_ctx *ctx, int64_t floats, int64_t *stride)
{
    int64_t bytes;
    if (!mha__mul(floats, (int64_t)sizeof(float), &bytes) || bytes > INT64_MAX / 2 - 64) {
        mha__fail(MHA_ERR_NOMEM, "row scratch of %lld floats overflows", (long long)floats);
        return NULL;
    }
    *stride = mha__pad_to_line(bytes);
    int64_t total;
    if (!mha__mul(*stride, mha_ctx_threads(ctx), &total)) {
        mha__fail(MHA_ERR_NOMEM, "row scratch overflows");
        return NULL;
    }
    return mha__ctx_scratch(ctx, MHA_SCRATCH_THREADS, total);
}

/* ---------------------------------------------------------------- */
/* Public entry                                                      */
/* ---------------------------------------------------------------- */

/* The plan of one mha_attention() problem, after checking q, k, v, out
 * (out's shape [B, Hq, L, Dv]) and the descriptor; `what_out` names out
 * in errors. */
static mha_status plan_from_desc(const mha_tensor *q, const mha_tensor *k, const mha_tensor *v, const mha_tensor *out,
                                 const char *what_out, const mha_attn_desc *desc, mha__attn_plan *plan)
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
    if ((st = mha__check_tensor(out, what_out, out_shape)) != MHA_OK) return st;
    if (Hkv != Hq && !desc->enable_gqa)
        return mha__fail(MHA_ERR_INVALID_ARG, "key has %lld heads but query has %lld; set enable_gqa for grouped-query attention",
                         (long long)Hkv, (long long)Hq);
    if (Hkv == 0 && Hq > 0)
        return mha__fail(MHA_ERR_INVALID_ARG, "key has 0 heads but query has %lld", (long long)Hq);
    int64_t rows;
    if (!mha__mul(B, Hq, &rows) || !mha__mul(rows, L, &rows))
        return mha__fail(MHA_ERR_INVALID_ARG, "batch x heads x queries overflows");
    *plan = (mha__attn_plan){
        .B = B, .Hq = Hq, .Hkv = Hkv, .L = L, .S = S, .D = D, .Dv = v->shape[3], .R = S,
        .group = Hq / (Hkv ? Hkv : 1),
        .scale = isnan(desc->scale) ? (float)(1.0 / sqrt((double)D)) : (float)desc->scale,
        .softcap = desc->softcap, .causal = desc->causal,
        .window_left = desc->window_left, .window_right = desc->window_right,
        .alibi = desc->alibi_slopes, .masks = {desc->mask}, .bf16 = desc->dtype == MHA_DTYPE_BF16,
    };
    if (desc->dtype != MHA_DTYPE_F32 && desc->dtype != MHA_DTYPE_BF16)
        return mha__fail(MHA_ERR_INVALID_ARG, "dtype %s is not supported; attention computes in F32 or BF16",
                         mha_dtype_name(desc->dtype));
    if (rows == 0) return MHA_OK;
    return mha__attn_plan_check(plan);
}

mha_status mha_attention(mha_ctx *ctx, mha_tensor *out, float *lse, const mha_tensor *q,
                         const mha_tensor *k, const mha_tensor *v, const mha_attn_desc *desc)
{
    if (!ctx || !out || !q || !k || !v || !desc)
        return mha__fail(MHA_ERR_MISUSE, "mha_attention: NULL argument");
    mha__attn_plan p;
    mha_status st = plan_from_desc(q, k, v, out, "output", desc, &p);
    if (st != MHA_OK || p.B * p.Hq * p.L == 0) return st;
    /* A few query rows (decoding): split the keys instead of the rows. */
    if (p.L < MHA_DECODE_ROWS && !p.bf16 && k->stride[3] == 1 && v->stride[3] == 1 && p.D == p.Dv) {
        mha__kv_view kv = {k->data, v->data, false, {k->stride[0], k->stride[1], k->stride[2]}};
        if (k->stride[0] == v->stride[0] && k->stride[1] == v->stride[1] && k->stride[2] == v->stride[2])
            return mha__decode_attention(ctx, &p, out, lse, q, &kv);
    }
    return mha__attn_forward(ctx, &p, out, lse, NULL, q, k, v);
}

mha_status mha_attention_backward(mha_ctx *ctx, mha_tensor *dq, mha_tensor *dk, mha_tensor *dv,
                                  const mha_tensor *q, const mha_tensor *k, const mha_tensor *v,
                                  const mha_tensor *out, const float *lse, const mha_tensor *grad_out,
                                  const mha_attn_desc *desc)
{
    if (!ctx || !dq || !dk || !dv || !q || !k || !v || !out || !lse || !grad_out || !desc)
        return mha__fail(MHA_ERR_MISUSE, "mha_attention_backward: NULL argument");
    mha__attn_plan p;
    mha_status st = plan_from_desc(q, k, v, out, "output", desc, &p);
    if (st != MHA_OK) return st;
    if (p.bf16)
        return mha__fail(MHA_ERR_UNSUPPORTED, "the backward pass computes in F32 only; dtype BF16 is forward-only");
    if ((st = mha__check_tensor(grad_out, "grad_output", out->shape)) != MHA_OK ||
        (st = mha__check_tensor(dq, "query.grad", q->shape)) != MHA_OK ||
        (st = mha__check_tensor(dk, "key.grad", k->shape)) != MHA_OK ||
        (st = mha__check_tensor(dv, "value.grad", v->shape)) != MHA_OK)
        return st;
    mha__row_norm norm = {lse, NULL, NULL};
    return mha__attn_backward(ctx, &p, dq, dk, dv, q, k, v, out, grad_out, &norm);
}
