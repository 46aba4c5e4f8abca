/*
 * contract.c -- the attention plan's checks and the row contract: which
 * keys a query row sees, and the bias on each score.  Every driver
 * (flash.c, flash_bwd.c, decode.c) calls down into this file and nothing
 * here calls them, so the public entry points (sdpa.c) sit above both.
 */
#include "attn/attention.h"
#include "core/convert.h"
#include "core/parallel.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- */
/* Validation                                                        */
/* ---------------------------------------------------------------- */

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
    if (p->query_offset < 0 || p->key_offset < 0 || p->query_total < 0 || p->key_total < 0 ||
        (p->query_total && p->query_offset > p->query_total - p->L) ||
        (p->key_total && p->key_offset > p->key_total - p->R))
        return mha__fail(MHA_ERR_INVALID_ARG,
                         "positions: query rows %lld + %lld must fit in query_total %lld and keys %lld + %lld in "
                         "key_total %lld (offsets >= 0; a total of 0 is this call's own)",
                         (long long)p->query_offset, (long long)p->L, (long long)p->query_total,
                         (long long)p->key_offset, (long long)p->R, (long long)p->key_total);
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
            if (mask->stride[d] < 0 ||
                (extent[d] > 0 && (!mha__mul(extent[d] - 1, mask->stride[d], &reach) || !mha__add(last, reach, &last))))
                return mha__fail(MHA_ERR_INVALID_ARG, "mask strides are negative or overflow");
    }
    return MHA_OK;
}

/* ---------------------------------------------------------------- */
/* The row contract                                                  */
/* ---------------------------------------------------------------- */

/* Row i's position minus key j's is i - j + this: 0 for one sequence,
 * else the offsets of the call's rows in the longer one. */
static int64_t top_left_shift(const mha__attn_plan *p) { return p->query_offset - p->key_offset; }

/* The same, bottom-right aligned (the last query with the last key):
 * the key aligned with row i is i + this. */
static int64_t bottom_right_shift(const mha__attn_plan *p)
{
    int64_t L = p->query_total ? p->query_total : p->L, S = p->key_total ? p->key_total : p->R;
    return top_left_shift(p) + S - L;
}

void mha__row_key_range(const mha__attn_plan *p, int64_t i, int64_t *lo, int64_t *hi)
{
    int64_t diag = i + bottom_right_shift(p); /* the key aligned with row i, bottom-right */
    *lo = 0;
    *hi = p->R;
    if (p->causal == MHA_CAUSAL_TOP_LEFT) *hi = mha__min64(*hi, i + top_left_shift(p) + 1);
    if (p->causal == MHA_CAUSAL_BOTTOM_RIGHT) *hi = mha__min64(*hi, diag + 1);
    if (p->window_left >= 0) *lo = mha__max64(*lo, diag - p->window_left);
    if (p->window_right >= 0) *hi = mha__min64(*hi, diag + p->window_right + 1);
}

bool mha__plan_has_bias(const mha__attn_plan *p)
{
    return p->alibi || p->masks[0].kind != MHA_MASK_NONE || p->masks[1].kind != MHA_MASK_NONE;
}

float mha__real_key_bias(const mha__attn_plan *p, int64_t b, int64_t h, int64_t i, int64_t j)
{
    float bias = 0.0f;
    if (p->alibi) bias -= p->alibi[h] * (float)llabs(i + bottom_right_shift(p) - j);
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

/* s[r] = -inf for r in [from, to), sixteen at a time: a causal diagonal
 * tile's masked half, one store per score, took 1.3% of the causal core
 * (perf, N = 2048); fixed-size copies compile to vector stores. */
static void mask_rows(float *s, int64_t from, int64_t to)
{
    static const float masked[16] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY,
                                     -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY,
                                     -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int64_t r = from;
    for (; r + 16 <= to; r += 16) memcpy(s + r, masked, sizeof masked);
    for (; r < to; r++) s[r] = -INFINITY;
}

void mha__score_contract(const mha__attn_plan *p, float *st, int64_t lds, int64_t b, int64_t h, int64_t i0,
                         int64_t rows, int64_t j0, int64_t cols, const int64_t *lo, const int64_t *hi, float *cap_slope)
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
        mask_rows(s, 0, first);
        mask_rows(s, last > first ? last : first, rows);
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
/* Refined scores                                                    */
/* ---------------------------------------------------------------- */

/* Row r's keys outside [lo[r], hi[r]) of the tile set to 0, a key's
 * column at a time: as in mha__score_contract the rows that see a key
 * form one run [first, last), so the rest of its column is two
 * contiguous stretches.  A row at a time, each store a column apart from
 * the last, mha__refine_raw took 1.7% of the causal core's samples at N =
 * 2048 (the diagonal tiles' masked halves); a column at a time 0.4%, and
 * memset 0.5%. */
static void zero_unseen(float *st, int64_t lds, int64_t rows, int64_t cols, int64_t j0, const int64_t *lo,
                        const int64_t *hi)
{
    int64_t first = 0, last = 0;
    for (int64_t c = 0; c < cols; c++) {
        int64_t key = j0 + c, from;
        while (first < rows && hi[first] <= key) first++;
        while (last < rows && lo[last] <= key) last++;
        from = last > first ? last : first;
        memset(st + c * lds, 0, (size_t)first * sizeof(float));
        memset(st + c * lds + from, 0, (size_t)(rows - from) * sizeof(float));
    }
}

/* The largest |s[c]| of n contiguous scores, NaN passed over: the tile
 * kernel over them as 16 rows of keys (its lanes), then a short loop. */
static float contiguous_top(const mha__attn_plan *p, const float *s, int64_t n)
{
    enum { W = 16 };
    float top[W] = {0}, m = 0.0f;
    p->kt->abs_max(s, W, W, n / W, top);
    for (int64_t c = n / W * W; c < n; c++) m = fabsf(s[c]) > m ? fabsf(s[c]) : m;
    for (int r = 0; r < W; r++) m = top[r] > m ? top[r] : m;
    return m;
}

void mha__norms2(const mha__kernels *kt, const float *x, int64_t rs, int64_t cs, int64_t rows, int64_t n, double *out)
{
    if (cs == 1) kt->norm2(x, rs, rows, n, out);
    else
        for (int64_t r = 0; r < rows; r++) out[r] = mha__dot_f64_ordered(x + r * rs, cs, x + r * rs, cs, n);
}

/* mha__norm2_top over n squared norms (each >= 0 or NaN) from 0: eight
 * running maxima and a NaN flag, where one chain through mha__norm2_top
 * waited out a compare and a branch a row (a tenth of a decoding step
 * over tensors at S = 4096).  A maximum is exact in any order. */
static double norms_top(const double *x, int64_t n)
{
    enum { LANES = 8 };
    double lane[LANES] = {0}, top = 0;
    bool nan = false;
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int t = 0; t < LANES; t++) {
            lane[t] = x[j + t] > lane[t] ? x[j + t] : lane[t];
            nan |= x[j + t] != x[j + t];
        }
    for (; j < n; j++) top = mha__norm2_top(top, x[j]);
    for (int t = 0; t < LANES; t++) top = mha__norm2_top(top, lane[t]);
    return nan ? NAN : top;
}

double mha__rows_norm2_max(const mha__kernels *kt, const float *x, int64_t rs, int64_t cs, int64_t n, int64_t d)
{
    enum { CHUNK = 64 };
    double norm2[CHUNK], top = 0;
    for (int64_t j0 = 0; j0 < n && !isnan(top); j0 += CHUNK) {
        int64_t m = n - j0 < CHUNK ? n - j0 : CHUNK;
        mha__norms2(kt, x + j0 * rs, rs, cs, m, d, norm2);
        top = mha__norm2_top(top, norms_top(norm2, m));
    }
    return top;
}

double mha__keys_norm2_max(const mha__attn_plan *p, const mha__kv_view *rows, const mha_tensor *k, int64_t b, int64_t g)
{
    if (rows && rows->k_norm2_max) return rows->k_norm2_max[b * p->Hkv + g];
    if (k && k->data)
        return mha__rows_norm2_max(p->kt, k->data + b * k->stride[0] + g * k->stride[1], k->stride[2], k->stride[3],
                                   p->S, p->D);
    if (rows && rows->k && rows->dtype == MHA_DTYPE_F32)
        return mha__rows_norm2_max(p->kt, (const float *)rows->k + b * rows->stride[0] + g * rows->stride[1],
                                   rows->stride[2], 1, p->S, p->D);
    return INFINITY;
}

typedef struct key_norms_job {
    const mha__attn_plan *p;
    const mha__kv_view *rows;
    const mha_tensor *k;
    double *out;
} key_norms_job;

static void key_norms_range(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const key_norms_job *n = arg;
    for (int64_t bg = begin; bg < end; bg++)
        n->out[bg] = mha__keys_norm2_max(n->p, n->rows, n->k, bg / n->p->Hkv, bg % n->p->Hkv);
}

double *mha__keys_norm2_max_all(mha_ctx *ctx, const mha__attn_plan *p, const mha__kv_view *rows, const mha_tensor *k)
{
    key_norms_job n = {p, rows, k, mha__ws_take(ctx, p->B * p->Hkv * (int64_t)sizeof(double))};
    if (n.out) mha__parallel_items(ctx, p->B * p->Hkv, key_norms_range, &n);
    return n.out;
}

bool mha__refine_few(const mha__attn_plan *p)
{
    /* The whole sequence's rows and keys, not a block's, and not the
     * heads: sequence parallelism and Ulysses (mha_mpi.h) must decide as
     * one process does. */
    int64_t L = p->query_total ? p->query_total : p->L, S = p->key_total ? p->key_total : p->S;
    bool few_rows = L < MHA_REFINE_FEW_ROWS || p->B * L < MHA_REFINE_FEW_BATCH_ROWS;
    return few_rows && (p->feeds_backward || S <= MHA_REFINE_FEW_KEYS);
}

/* The bound past which a row is wide (attention.h: few rows). */
static double wide_terms(const mha__attn_plan *p) { return mha__refine_few(p) ? MHA_REFINE_ABOVE : MHA_REFINE_TERMS; }

/* A row of squared norm q2 is wide where q2 * bound > limit: scale^2
 * |q|^2 max |k|^2 > T^2, in float64 (no overflow), the one comparison of
 * every pass, mha__wide_rows' and mha__none_wide's. */
static void wide_test(const mha__attn_plan *p, double k_norm2, double *bound, double *limit)
{
    double terms = wide_terms(p);
    *bound = (double)p->scale * p->scale * k_norm2;
    *limit = terms * terms;
}

bool mha__none_wide(const mha__attn_plan *p, double q_norm2_max, double k_norm2)
{
    /* wide_test's comparison for the largest query row, whose rounding is
     * monotone in both norms; NaN settles nothing. */
    double bound, limit;
    wide_test(p, k_norm2, &bound, &limit);
    return p->bf16 || q_norm2_max * bound <= limit;
}

bool mha__wide_rows(const mha__attn_plan *p, const mha_tensor *q, const double *q_norm2, int64_t b, int64_t h,
                    int64_t i0, int64_t rows, double k_norm2_max, bool *wide)
{
    /* wide_test's comparison.  NaN: not wide (the row is NaN). */
    double bound, limit, found[MHA_REFINE_MAX_ROWS];
    wide_test(p, k_norm2_max, &bound, &limit);
    const double *norm2 = q_norm2 ? q_norm2 + (b * p->Hq + h) * p->L + i0 : found;
    bool any = false;
    if (!p->bf16 && !q_norm2)
        mha__norms2(p->kt, q->data + b * q->stride[0] + h * q->stride[1] + i0 * q->stride[2], q->stride[2],
                    q->stride[3], rows, p->D, found);
    for (int64_t r = 0; r < rows; r++) {
        wide[r] = !p->bf16 && norm2[r] * bound > limit;
        any = any || wide[r];
    }
    return any;
}

void mha__refine_raw(const mha__attn_plan *p, float *st, int64_t lds, int64_t rows, int64_t cols, int64_t j0,
                     const int64_t *lo, const int64_t *hi, const bool *wide, mha__refine *f)
{
    f->any = false;
    f->first = j0 % MHA_REFINE_KEYS;
    int64_t blocks = (f->first + cols + MHA_REFINE_KEYS - 1) / MHA_REFINE_KEYS;
    for (int64_t k = 0; k < blocks; k++) memset(f->large[k], 0, (size_t)rows * sizeof(bool));
    if (p->bf16) return;
    if (lo && j0 < p->R) zero_unseen(st, lds, rows, cols, j0, lo, hi); /* appended keys: seen by all */
    for (int64_t r = 0; wide && r < rows; r++)
        for (int64_t k = 0; wide[r] && k < blocks; k++) f->large[k][r] = f->any = true;
    bool lanes = rows == 1 && lds == 1; /* one row's contiguous scores (decode) */
    if (lanes && (f->any || !(contiguous_top(p, st, cols) > MHA_REFINE_ABOVE))) return; /* one pass for all blocks */
    for (int64_t k = 0; k < blocks; k++) { /* the tile's columns [c0, c0 + n) */
        int64_t c0 = k == 0 ? 0 : k * MHA_REFINE_KEYS - f->first, end = (k + 1) * MHA_REFINE_KEYS - f->first;
        int64_t n = (end < cols ? end : cols) - c0;
        float top[MHA_REFINE_MAX_ROWS];
        if (lanes) {
            top[0] = contiguous_top(p, st + c0, n);
        } else {
            memset(top, 0, (size_t)rows * sizeof(float));
            p->kt->abs_max(st + c0 * lds, lds, rows, n, top);
        }
        for (int64_t r = 0; r < rows; r++) {
            f->large[k][r] = f->large[k][r] || top[r] > MHA_REFINE_ABOVE;
            f->any = f->any || f->large[k][r];
        }
    }
}

void mha__refine_contracted(const mha__attn_plan *p, const float *st, int64_t lds, int64_t rows, int64_t cols,
                            mha__refine *f)
{
    if (p->bf16 || !mha__plan_has_bias(p)) return; /* a softcap only shrinks the raw scores */
    for (int64_t c = 0; c < cols; c++) {
        bool *large = f->large[(f->first + c) / MHA_REFINE_KEYS];
        for (int64_t r = 0; r < rows; r++) {
            float s = st[c * lds + r];
            if (s > -INFINITY && fabsf(s) > MHA_REFINE_ABOVE) large[r] = f->any = true;
        }
    }
}

mha__score_source mha__score_rows(const mha_tensor *q, int64_t b, int64_t h, int64_t i0, int64_t j0, mha__strided k)
{
    return (mha__score_source){.q = q->data + b * q->stride[0] + h * q->stride[1] + i0 * q->stride[2],
                               .q_rs = q->stride[2],
                               .q_cs = q->stride[3],
                               .k = k.data,
                               .k_rs = k.rs,
                               .k_cs = k.cs,
                               .k_dtype = MHA_DTYPE_F32,
                               .b = b,
                               .h = h,
                               .i0 = i0,
                               .j0 = j0};
}

static double key_element(const mha__score_source *src, int64_t c, int64_t d)
{
    int64_t at = c * src->k_rs + d * src->k_cs;
    if (src->k_dtype == MHA_DTYPE_BF16) return mha__bf16_to_f32(((const uint16_t *)src->k)[at]);
    if (src->k_dtype == MHA_DTYPE_I8) return (double)src->k_scale[c] * ((const int8_t *)src->k)[at];
    return ((const float *)src->k)[at];
}

/* The dot product of query row r and key c, unscaled, in float64 and in
 * kernels.h's norm2 order whatever the layout. */
static double exact_dot(const mha__attn_plan *p, const mha__score_source *src, int64_t r, int64_t c)
{
    const float *q = src->q + r * src->q_rs;
    if (src->k_dtype == MHA_DTYPE_F32)
        return mha__dot_f64_ordered(q, src->q_cs, (const float *)src->k + c * src->k_rs, src->k_cs, p->D);
    double lane[8] = {0}, sum = 0; /* a cache's bf16 or int8 rows: the same order */
    int64_t d = 0;
    for (; d + 8 <= p->D; d += 8)
        for (int l = 0; l < 8; l++) lane[l] += q[(d + l) * src->q_cs] * key_element(src, c, d + l);
    for (; d < p->D; d++) sum += q[d * src->q_cs] * key_element(src, c, d);
    for (int l = 0; l < 8; l++) sum += lane[l];
    return sum;
}

void mha__widen_panel(const float *x, int64_t rs, int64_t cs, int64_t rows, int64_t width, double *dst, int64_t ld,
                      const float **widened)
{
    if (*widened != x)
        for (int64_t c = 0; c < width; c++)
            for (int64_t r = 0; r < rows; r++) dst[c * ld + r] = x[r * rs + c * cs];
    *widened = x;
}

void mha__panel_of(const mha__attn_plan *p, mha__score_source *src, int64_t rows, double *qd, int64_t ldq,
                   const float **widened)
{
    mha__widen_panel(src->q, src->q_rs, src->q_cs, rows, p->D, qd, ldq, widened);
    src->qd = qd;
    src->ldq = ldq;
}

/* Whether the kernels' dots_f64 can take these rows: contiguous float32
 * query and key rows. */
static bool dots_by_kernel(const mha__score_source *src)
{
    return src->k_dtype == MHA_DTYPE_F32 && src->q_cs == 1 && src->k_cs == 1;
}

/* exact_dot of key c with query rows rows[0 .. n): a batch from the
 * kernel where both are contiguous float32 rows (each product exact and
 * the order the same: the same bits as exact_dot). */
static void exact_dots(const mha__attn_plan *p, const mha__score_source *src, int64_t c, const int64_t *rows, int64_t n,
                       double *out)
{
    if (dots_by_kernel(src)) {
        p->kt->dots_f64((const float *)src->k + c * src->k_rs, src->q, src->q_rs, rows, n, p->D, out);
        return;
    }
    for (int64_t i = 0; i < n; i++) out[i] = exact_dot(p, src, rows[i], c);
}

/* Query row r's score of key c from its dot product, after the contract
 * in float64: the scale, the softcap (its slope in *slope) and, where
 * `biased`, the bias of a real key. */
static double exact_contract(const mha__attn_plan *p, const mha__score_source *src, bool biased, int64_t r, int64_t c,
                             double dot, double *slope)
{
    double s = dot * p->scale;
    *slope = 1.0;
    if (p->softcap > 0) {
        double t = tanh(s / p->softcap);
        s = p->softcap * t;
        *slope = 1.0 - t * t;
    }
    int64_t key = src->j0 + c;
    if (biased && key < p->R) s += mha__real_key_bias(p, src->b, src->h, src->i0 + r, key);
    return s;
}

/* Whether score (r, c) of the tile is refined: marked, near its row's
 * largest, and its row sees something. */
static bool refined_score(const float *x, int64_t r, const bool *marked, const float *near)
{
    return marked[r] & (x[r] > near[r]); /* no branch */
}

/* Column c of the tile's rows [r0, r0 + rows) as x = s - shift, its
 * marked scores near their row's largest (above near) computed in
 * float64, the others shifted. */
static void shift_column(const mha__attn_plan *p, const mha__score_source *src, bool biased, float *st, int64_t lds,
                         int64_t c, int64_t r0, int64_t rows, const float *shift, const float *near,
                         const mha__refine *refine, float *slope)
{
    const bool *marked = mha__refine_column(refine, c);
    int64_t exact[MHA_REFINE_MAX_ROWS];
    double dot[MHA_REFINE_MAX_ROWS], cap_slope;
    float *x = st + c * lds;
    int64_t n = p->kt->shift_pick(x + r0, marked + r0, near + r0, shift + r0, rows, exact); /* refined: again below */
    for (int64_t i = 0; i < n; i++) exact[i] += r0;
    exact_dots(p, src, c, exact, n, dot);
    for (int64_t i = 0; i < n; i++) {
        int64_t r = exact[i];
        x[r] = (float)(exact_contract(p, src, biased, r, c, dot[i], &cap_slope) - (double)shift[r]);
        if (slope) slope[c * lds + r] = (float)cap_slope;
    }
}

/* A one-row tile (split-K's chunks): x = s - shift, its marked scores
 * near the row's largest computed in float64 as shift_column would, but
 * one dots_f64 call for all of them (the query row against the picked
 * keys, four or eight at a time) instead of one a column: each product
 * is exact and the order the same, so the same bits. */
static void shift_one_row(const mha__attn_plan *p, const mha__score_source *src, bool biased, float *st, int64_t lds,
                          int64_t cols, const float *shift, const float *near, const mha__refine *refine, float *slope)
{
    int64_t picked[MHA_REFINE_MAX_COLS], n = 0;
    double dot[MHA_REFINE_MAX_COLS], cap_slope;
    for (int64_t c = 0; c < cols; c++) {
        float *x = st + c * lds;
        if (refined_score(x, 0, mha__refine_column(refine, c), near)) picked[n++] = c;
        *x -= shift[0];
    }
    if (dots_by_kernel(src)) p->kt->dots_f64(src->q, (const float *)src->k, src->k_rs, picked, n, p->D, dot);
    else
        for (int64_t i = 0; i < n; i++) dot[i] = exact_dot(p, src, 0, picked[i]);
    for (int64_t i = 0; i < n; i++) {
        int64_t c = picked[i];
        st[c * lds] = (float)(exact_contract(p, src, biased, 0, c, dot[i], &cap_slope) - (double)shift[0]);
        if (slope) slope[c * lds] = (float)cap_slope;
    }
}

/* Rows per block of the panel path: the kernels' vectors of rows (4 for
 * AVX2, 16 for AVX-512) both divide it. */
enum { PANEL_ROWS = 16 };

/* The rows of the block that starts at row r0 of a tile of `rows`. */
static int64_t panel_block(int64_t r0, int64_t rows) { return rows - r0 < PANEL_ROWS ? rows - r0 : PANEL_ROWS; }

/* Whether rows [r0, r0 + rows) have enough refined scores to take every
 * score's dot product from the panel: a score there costs about a third
 * of one from dots_f64 (8 against 20-30 cycles at d = 64 on Zen 4).
 * Counted in every fourth column: the choice changes no result (the two
 * paths give the same bits), only the time. */
static bool panel_pays(const mha__score_source *src, const float *st, int64_t lds, int64_t r0, int64_t rows,
                       int64_t cols, const float *near, const mha__refine *refine)
{
    if (!src->qd || src->k_dtype != MHA_DTYPE_F32 || src->k_cs != 1) return false;
    int64_t n = 0, seen = 0;
    for (int64_t c = 0; c < cols; c += 4, seen += rows) {
        const bool *marked = mha__refine_column(refine, c);
        for (int64_t r = r0; r < r0 + rows; r++) n += refined_score(st + c * lds, r, marked, near);
    }
    return 3 * n >= seen;
}

/* Rows [r0, r0 + rows) of the tile shifted as shift_column shifts them,
 * every score's dot product from the panel kernel. */
static void shift_rows_panel(const mha__attn_plan *p, const mha__score_source *src, bool biased, float *st, int64_t lds,
                             int64_t r0, int64_t rows, int64_t cols, const float *shift, const float *near,
                             const mha__refine *refine, float *slope)
{
    double dot[MHA_REFINE_MAX_COLS * PANEL_ROWS], cap_slope;
    p->kt->dots_f64_panel((const float *)src->k, src->k_rs, cols, src->qd + r0, src->ldq, rows, p->D, dot, PANEL_ROWS);
    bool plain = !biased && p->softcap == 0 && !slope;
    for (int64_t c = 0; c < cols; c++) {
        const bool *marked = mha__refine_column(refine, c);
        float *x = st + c * lds;
        const double *dc = dot + c * PANEL_ROWS; /* row r0's first */
        if (plain) {
            p->kt->shift_refined(x + r0, dc, marked + r0, near + r0, shift + r0, rows, p->scale);
            continue;
        }
        for (int64_t r = r0; r < r0 + rows; r++) {
            if (!refined_score(x, r, marked, near)) {
                x[r] -= shift[r];
                continue;
            }
            x[r] = (float)(exact_contract(p, src, biased, r, c, dc[r - r0], &cap_slope) - (double)shift[r]);
            if (slope) slope[c * lds + r] = (float)cap_slope;
        }
    }
}

void mha__shift_tile(const mha__attn_plan *p, const mha__score_source *src, float *st, int64_t lds, int64_t rows,
                     int64_t cols, float *anchor, bool fixed, const mha__refine *refine, float *slope)
{
    float m32[MHA_REFINE_MAX_ROWS], near[MHA_REFINE_MAX_ROWS], shift[MHA_REFINE_MAX_ROWS];
    int32_t at[MHA_REFINE_MAX_ROWS];
    bool biased = mha__plan_has_bias(p);
    double cap_slope;
    p->kt->row_max(st, lds, rows, cols, m32, at);
    for (int64_t r = 0; r < rows; r++) {
        /* Near the row's largest so far (the anchor given, or the running
         * maximum and this tile's): farther, exp < 2e-9 whatever the tile. */
        near[r] = (fixed || anchor[r] > m32[r] ? anchor[r] : m32[r]) - MHA_REFINE_NEAR;
        if (!fixed) {
            bool exact = at[r] >= 0 && mha__refine_column(refine, at[r])[r];
            double dot = 0;
            if (exact) exact_dots(p, src, at[r], &r, 1, &dot); /* the kernel's where it can */
            float m = exact ? (float)exact_contract(p, src, biased, r, at[r], dot, &cap_slope) : m32[r];
            anchor[r] = m > anchor[r] ? m : anchor[r]; /* near the exact maximum: its own x is about 0 */
        }
        /* A row that sees nothing (every score -inf, or NaN) is left as it is. */
        bool none = anchor[r] == -INFINITY;
        shift[r] = none ? 0.0f : anchor[r];
        near[r] = none ? INFINITY : near[r];
    }
    /* Blocks the panel does not pay for go column by column in runs as
     * long as they come: dots_f64 takes a column's refined rows eight
     * (AVX-512) or four at a time, and a run cut at every block leaves
     * more of them alone. */
    bool panel[MHA_REFINE_MAX_ROWS / PANEL_ROWS + 1];
    for (int64_t r0 = 0; r0 < rows; r0 += PANEL_ROWS)
        panel[r0 / PANEL_ROWS] = panel_pays(src, st, lds, r0, panel_block(r0, rows), cols, near, refine);
    for (int64_t r0 = 0, r1; r0 < rows; r0 = r1) {
        bool on = panel[r0 / PANEL_ROWS];
        for (r1 = r0 + panel_block(r0, rows); !on && r1 < rows && !panel[r1 / PANEL_ROWS];) r1 += panel_block(r1, rows);
        if (on) shift_rows_panel(p, src, biased, st, lds, r0, r1 - r0, cols, shift, near, refine, slope);
        else if (rows == 1) /* split-K's chunks */
            shift_one_row(p, src, biased, st, lds, cols, shift, near, refine, slope);
        else
            for (int64_t c = 0; c < cols; c++)
                shift_column(p, src, biased, st, lds, c, r0, r1 - r0, shift, near, refine, slope);
    }
}
