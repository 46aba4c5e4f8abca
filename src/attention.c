/*
 * attention.c -- scaled dot-product attention: validation, the per-row key
 * range and bias, and the portable row kernel.
 *
 * One query row at a time: its scores against the keys it may see go into
 * a per-thread row buffer, then a max-subtracted softmax weights the values.
 * Memory beyond inputs and outputs is O(S) per thread.  The fused,
 * blocked, SIMD kernels of later work implement the same contract; this
 * one is written to be read.
 */
#include "attention.h"

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

/* The real keys [*lo, *hi) that query row i may see under causal masking
 * and the window; empty when *lo >= *hi. */
static void row_key_range(const mha__attn_plan *p, int64_t i, int64_t *lo, int64_t *hi)
{
    int64_t diag = i + p->R - p->L; /* the key aligned with row i, bottom-right */
    *lo = 0;
    *hi = p->R;
    if (p->causal == MHA_CAUSAL_TOP_LEFT) *hi = min64(*hi, i + 1);
    if (p->causal == MHA_CAUSAL_BOTTOM_RIGHT) *hi = min64(*hi, diag + 1);
    if (p->window_left >= 0) *lo = max64(*lo, diag - p->window_left);
    if (p->window_right >= 0) *hi = min64(*hi, diag + p->window_right + 1);
}

static float dot(const float *a, int64_t a_stride, const float *b, int64_t b_stride, int64_t n)
{
    float sum = 0.0f;
    for (int64_t c = 0; c < n; c++) sum += a[c * a_stride] * b[c * b_stride];
    return sum;
}

/* Additive bias of real key j for (batch b, head h, row i): ALiBi plus the
 * masks, -inf where a keep-mask forbids the key. */
static float real_key_bias(const mha__attn_plan *p, int64_t b, int64_t h, int64_t i, int64_t j)
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

/* One row's view of the problem. */
typedef struct row {
    int64_t b, h, i;
    int64_t lo, hi;           /* visible real keys */
    const float *q;           /* q[b, h, i, :] */
    const float *k;           /* k[b, h / group, 0, :] */
} row;

static row make_row(const mha__attn_plan *p, const mha_tensor *q, const mha_tensor *k,
                    int64_t b, int64_t h, int64_t i)
{
    row r = {.b = b, .h = h, .i = i};
    row_key_range(p, i, &r.lo, &r.hi);
    r.q = q->data + b * q->stride[0] + h * q->stride[1] + i * q->stride[2];
    r.k = k->data + b * k->stride[0] + (h / p->group) * k->stride[1];
    return r;
}

static bool key_visible(const mha__attn_plan *p, const row *r, int64_t j)
{
    return j >= p->R || (j >= r->lo && j < r->hi);
}

/* scores[j] for every key of the row: scaled, capped, biased; -inf for
 * keys the row may not see.  Returns the maximum. */
static float score_row(const mha__attn_plan *p, const row *r, const mha_tensor *q, const mha_tensor *k,
                       float *scores)
{
    float max = -INFINITY;
    for (int64_t j = 0; j < p->S; j++) {
        if (!key_visible(p, r, j)) {
            scores[j] = -INFINITY;
            continue;
        }
        float s = dot(r->q, q->stride[3], r->k + j * k->stride[2], k->stride[3], p->D) * p->scale;
        if (p->softcap > 0) s = p->softcap * tanhf(s / p->softcap);
        if (j < p->R) s += real_key_bias(p, r->b, r->h, r->i, j);
        scores[j] = s;
        if (s > max) max = s;
    }
    return max;
}

/* ---------------------------------------------------------------- */
/* Forward                                                           */
/* ---------------------------------------------------------------- */

typedef struct forward_job {
    const mha__attn_plan *p;
    mha_tensor *out;
    float *lse;
    mha__row_stats *stats;
    const mha_tensor *q, *k, *v;
    char *scratch;
    int64_t scratch_stride;  /* bytes per thread */
} forward_job;

static void forward_row(const forward_job *job, int64_t b, int64_t h, int64_t i, float *scores, float *acc)
{
    const mha__attn_plan *p = job->p;
    const mha_tensor *v = job->v, *out = job->out;
    row r = make_row(p, job->q, job->k, b, h, i);
    float max = score_row(p, &r, job->q, job->k, scores);
    float *o = out->data + b * out->stride[0] + h * out->stride[1] + i * out->stride[2];
    float sum = 0.0f;
    if (max == -INFINITY) {
        /* Nothing visible: defined as output 0, lse -inf (not NaN). */
        for (int64_t c = 0; c < p->Dv; c++) o[c * out->stride[3]] = 0.0f;
    } else {
        const float *vrow = v->data + b * v->stride[0] + (h / p->group) * v->stride[1];
        for (int64_t c = 0; c < p->Dv; c++) acc[c] = 0.0f;
        for (int64_t j = 0; j < p->S; j++) {
            if (scores[j] == -INFINITY) continue;
            float w = expf(scores[j] - max);
            sum += w;
            const float *vj = vrow + j * v->stride[2];
            for (int64_t c = 0; c < p->Dv; c++) acc[c] += w * vj[c * v->stride[3]];
        }
        for (int64_t c = 0; c < p->Dv; c++) o[c * out->stride[3]] = acc[c] / sum;
    }
    int64_t at = (b * p->Hq + h) * p->L + i;
    if (job->lse) job->lse[at] = sum > 0 ? max + logf(sum) : -INFINITY;
    if (job->stats) {
        job->stats->max[at] = max;
        job->stats->sum[at] = sum;
    }
}

static void forward_range(void *arg, int thread, int64_t begin, int64_t end)
{
    const forward_job *job = arg;
    const mha__attn_plan *p = job->p;
    float *scores = (float *)(job->scratch + thread * job->scratch_stride);
    float *acc = scores + p->S;
    for (int64_t item = begin; item < end; item++) {
        int64_t i = item % p->L, bh = item / p->L;
        forward_row(job, bh / p->Hq, bh % p->Hq, i, scores, acc);
    }
}

/* Per-thread scratch of `floats` floats; NULL on failure. */
static char *thread_scratch(mha_ctx *ctx, int64_t floats, int64_t *stride)
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

mha_status mha__attn_forward(mha_ctx *ctx, const mha__attn_plan *p, mha_tensor *out, float *lse,
                             mha__row_stats *stats, const mha_tensor *q, const mha_tensor *k, const mha_tensor *v)
{
    forward_job job = {p, out, lse, stats, q, k, v, NULL, 0};
    job.scratch = thread_scratch(ctx, p->S + p->Dv, &job.scratch_stride);
    if (!job.scratch) return MHA_ERR_NOMEM;
    mha__parallel_for(ctx, p->B * p->Hq * p->L, forward_range, &job);
    return MHA_OK;
}

/* ---------------------------------------------------------------- */
/* Probabilities from the saved row statistics                      */
/* ---------------------------------------------------------------- */

typedef struct probs_job {
    const mha__attn_plan *p;
    mha_tensor *probs;
    int average;
    const mha__row_stats *stats;
    const mha_tensor *q, *k;
    char *scratch;
    int64_t scratch_stride;
} probs_job;

/* Row (b, i) of every head; heads in a fixed order so averaging is
 * deterministic. */
static void probs_row(const probs_job *job, int64_t b, int64_t i, float *scores)
{
    const mha__attn_plan *p = job->p;
    const mha_tensor *pr = job->probs;
    for (int64_t h = 0; h < p->Hq; h++) {
        row r = make_row(p, job->q, job->k, b, h, i);
        score_row(p, &r, job->q, job->k, scores);
        int64_t at = (b * p->Hq + h) * p->L + i;
        float max = job->stats->max[at], sum = job->stats->sum[at];
        float *dst = pr->data + b * pr->stride[0] + (job->average ? 0 : h) * pr->stride[1] + i * pr->stride[2];
        for (int64_t j = 0; j < p->S; j++) {
            float w = sum > 0 ? expf(scores[j] - max) / sum : 0.0f;
            float *d = &dst[j * pr->stride[3]];
            *d = (job->average && h > 0) ? *d + w : w;
        }
    }
    if (job->average) {
        float *dst = pr->data + b * pr->stride[0] + i * pr->stride[2];
        for (int64_t j = 0; j < p->S; j++) dst[j * pr->stride[3]] /= (float)p->Hq;
    }
}

static void probs_range(void *arg, int thread, int64_t begin, int64_t end)
{
    const probs_job *job = arg;
    float *scores = (float *)(job->scratch + thread * job->scratch_stride);
    for (int64_t item = begin; item < end; item++)
        probs_row(job, item / job->p->L, item % job->p->L, scores);
}

mha_status mha__attn_probs(mha_ctx *ctx, const mha__attn_plan *p, mha_tensor *probs, int average,
                           const mha__row_stats *stats, const mha_tensor *q, const mha_tensor *k)
{
    probs_job job = {p, probs, average, stats, q, k, NULL, 0};
    job.scratch = thread_scratch(ctx, p->S, &job.scratch_stride);
    if (!job.scratch) return MHA_ERR_NOMEM;
    mha__parallel_for(ctx, p->B * p->L, probs_range, &job);
    return MHA_OK;
}

/* ---------------------------------------------------------------- */
/* Public entry                                                      */
/* ---------------------------------------------------------------- */

mha_status mha_attention(mha_ctx *ctx, mha_tensor *out, float *lse, const mha_tensor *q,
                         const mha_tensor *k, const mha_tensor *v, const mha_attn_desc *desc)
{
    if (!ctx || !out || !q || !k || !v || !desc)
        return mha__fail(MHA_ERR_MISUSE, "mha_attention: NULL argument");
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
        return mha__fail(MHA_ERR_INVALID_ARG, "key has %lld heads but query has %lld; set enable_gqa for grouped-query attention",
                         (long long)Hkv, (long long)Hq);
    if (Hkv == 0 && Hq > 0)
        return mha__fail(MHA_ERR_INVALID_ARG, "key has 0 heads but query has %lld", (long long)Hq);
    int64_t rows;
    if (!mha__mul(B, Hq, &rows) || !mha__mul(rows, L, &rows))
        return mha__fail(MHA_ERR_INVALID_ARG, "batch x heads x queries overflows");
    if (rows == 0) return MHA_OK;
    mha__attn_plan p = {
        .B = B, .Hq = Hq, .Hkv = Hkv, .L = L, .S = S, .D = D, .Dv = v->shape[3], .R = S,
        .group = Hq / (Hkv ? Hkv : 1),
        .scale = isnan(desc->scale) ? (float)(1.0 / sqrt((double)D)) : (float)desc->scale,
        .softcap = desc->softcap, .causal = desc->causal,
        .window_left = desc->window_left, .window_right = desc->window_right,
        .alibi = desc->alibi_slopes, .masks = {desc->mask},
    };
    if ((st = mha__attn_plan_check(&p)) != MHA_OK) return st;
    return mha__attn_forward(ctx, &p, out, lse, NULL, q, k, v);
}
