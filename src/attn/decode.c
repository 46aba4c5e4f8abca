/*
 * decode.c -- attention for a few new query rows against a long KV cache
 * (token-by-token generation), where the work is reading K and V once.
 *
 * The keys are split into chunks of KC, fixed by the shape, never by the
 * thread count.  A work item (batch, kv head, chunk) takes every query row
 * of the group's heads against its chunk, up to MHA_ROWS_AT_ONCE rows in
 * one pass over the chunk's rows (rows_chunk):
 *   s = K_chunk (scale q)    (dot_rows)    score contract (contract.c)
 *   m = max s,  p = exp(s - m),  l = sum p,  O = sum p V_chunk (axpy_rows)
 * and a merge pass combines the chunks of each row in chunk order:
 *   M = max m_c,  l = sum l_c e^(m_c - M),  out = sum O_c e^(m_c - M) / l
 * (the log-sum-exp merge of split-K FlashDecoding), so a single query row
 * uses every thread and the result has the same bits for any thread count.
 * K and V are read in place from the cache, float32, bf16 or int8 (each
 * row dequantised in registers by its scale).
 *
 * Which rows are wide (refined whole, attention.h) depends on the keys'
 * largest norm.  A cache keeps it.  For tensors it waits for the chunks
 * (deferred_wide): each item takes its chunk's column maxima of |K|,
 * which brings the chunk into L2 for the dots, and takes every row as
 * narrow; then each head's bound, the sum of its columns' squared maxima,
 * shows whether any row could be wide, and only then are its exact norms
 * found and its wide rows done again.  An exact pass before the chunks
 * read K from L3 once more: a third of a step against 4096 keys.
 */
#include "attn/products.h"

#include <math.h>
#include <string.h>

enum { KC = 256 }; /* keys per chunk: 256 x 64 floats of K and of V fit in L2 beside each other */
_Static_assert((int)KC <= (int)MHA_REFINE_MAX_COLS, "a chunk's scores must fit mha__refine and mha__shift_tile");
_Static_assert((int)MHA_DECODE_ROWS <= (int)MHA_REFINE_MAX_ROWS, "a head's query rows must fit mha__wide_rows");

typedef struct decode_job {
    const mha__attn_plan *p;
    const mha__kernels *kt;
    const mha_tensor *q;
    const mha__kv_view *kv;
    mha_tensor *out;
    float *lse;
    float *partial; /* [B, Hq, L, chunks][2 + Dv]: m, l, O */
    bool *wide;     /* [B, Hq, L]: the rows refined whole (attention.h; wide_range) */
    float *key_top; /* [B, Hkv, chunks][D]: each chunk's column maxima of |K| (deferred_wide), or NULL */
    bool *redo;     /* [B, Hkv]: a head with wide rows to do again (deferred_wide) */
    int64_t chunks;
    char *scratch;
    int64_t scratch_stride;
} decode_job;

static int64_t partial_width(const mha__attn_plan *p) { return 2 + p->Dv; }

static float *partial_at(const decode_job *j, int64_t b, int64_t h, int64_t i, int64_t c)
{
    const mha__attn_plan *p = j->p;
    return j->partial + (((b * p->Hq + h) * p->L + i) * j->chunks + c) * partial_width(p);
}

/* The scales of rows j0 .. of kv head g (int8 rows), or NULL. */
static const float *row_scales(const mha__kv_view *kv, const float *scales, int64_t b, int64_t g, int64_t j0)
{
    return scales ? scales + b * kv->scale_stride[0] + g * kv->scale_stride[1] + j0 : NULL;
}

/* Scores of keys [j0, j0 + cols) of kv head g for the scaled queries
 * q[r], r < rows, into s[r]. */
static void chunk_scores(const decode_job *j, int64_t b, int64_t g, int64_t j0, int64_t cols, int rows,
                         const float *const *q, float *const *s)
{
    const mha__kv_view *kv = j->kv;
    int64_t at = b * kv->stride[0] + g * kv->stride[1] + j0 * kv->stride[2];
    j->p->kv_rows->dot(j->p, kv->k, row_scales(kv, kv->k_scale, b, g, j0), at, kv->stride[2], cols, rows, q, s);
}

static void chunk_values(const decode_job *j, int64_t b, int64_t g, int64_t j0, int64_t cols, int rows,
                         const float *const *pr, float *const *o)
{
    const mha__kv_view *kv = j->kv;
    int64_t at = b * kv->stride[0] + g * kv->stride[1] + j0 * kv->stride[2];
    j->p->kv_rows->axpy(j->p, rows, pr, kv->v, row_scales(kv, kv->v_scale, b, g, j0), at, kv->stride[2], cols, o);
}

/* Where the float64 scores of query row qi against keys j0.. come from. */
static mha__score_source chunk_source(const decode_job *j, const float *qi, int64_t b, int64_t h, int64_t i, int64_t j0)
{
    const mha__kv_view *kv = j->kv;
    int64_t g = h / j->p->group;
    size_t size = mha_dtype_size(kv->dtype);
    return (mha__score_source){.q = qi,
                               .q_cs = j->q->stride[3],
                               .k = (const char *)kv->k +
                                    (b * kv->stride[0] + g * kv->stride[1] + j0 * kv->stride[2]) * (int64_t)size,
                               .k_rs = kv->stride[2],
                               .k_cs = 1,
                               .k_dtype = kv->dtype,
                               .k_scale = row_scales(kv, kv->k_scale, b, g, j0),
                               .b = b,
                               .h = h,
                               .i0 = i,
                               .j0 = j0};
}

/* Both loops below keep eight running results (one vector), not one
 * chain: a scalar maximum with its NaN tests and a scalar sum, one add's
 * latency a key, took a fifth of an int8 decode step's time. */
enum { LANES = 8 };

/* The largest of a chunk's n scores.  NaN scores are passed over, as
 * softmax_step passes them (kernels.h): their exp makes the chunk's sum,
 * and so the row, NaN.  Only among scores that are all -inf would that
 * be lost (the chunk is skipped), so there a NaN is the maximum. */
static float chunk_max(const float *s, int64_t n)
{
    float lane[LANES], m = -INFINITY;
    for (int t = 0; t < LANES; t++) lane[t] = -INFINITY;
    int64_t k = 0;
    for (; k + LANES <= n; k += LANES)
        for (int t = 0; t < LANES; t++) lane[t] = s[k + t] > lane[t] ? s[k + t] : lane[t];
    for (; k < n; k++) m = s[k] > m ? s[k] : m;
    for (int t = 0; t < LANES; t++) m = lane[t] > m ? lane[t] : m;
    for (k = 0; m == -INFINITY && k < n; k++)
        if (isnan(s[k])) m = NAN;
    return m;
}

/* The sum of a chunk's n probabilities, in a fixed order. */
static float chunk_sum(const float *s, int64_t n)
{
    float lane[LANES] = {0}, l = 0.0f;
    int64_t k = 0;
    for (; k + LANES <= n; k += LANES)
        for (int t = 0; t < LANES; t++) lane[t] += s[k + t];
    for (int t = 0; t < LANES; t++) l += lane[t];
    for (; k < n; k++) l += s[k];
    return l;
}

/* Query row (b, h, i)'s scores s against chunk c's keys j0 .. j0 +
 * cols - 1 made its probabilities, relative to their maximum, returned
 * with their sum; -inf when the row sees none of them. */
static float chunk_probs(const decode_job *j, float *s, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t cols,
                         float *sum)
{
    const mha__attn_plan *p = j->p;
    int64_t lo, hi;
    mha__row_key_range(p, i, &lo, &hi);
    bool plain = p->softcap == 0 && !mha__plan_has_bias(p) && j0 >= lo && j0 + cols <= hi;
    mha__refine refine;
    mha__refine_raw(p, s, 1, 1, cols, j0, plain ? NULL : &lo, plain ? NULL : &hi, &j->wide[(b * p->Hq + h) * p->L + i],
                    &refine);
    if (!plain) {
        mha__score_contract(p, s, 1, b, h, i, 1, j0, cols, &lo, &hi, NULL);
        mha__refine_contracted(p, s, 1, 1, cols, &refine);
    }
    float m = chunk_max(s, cols);
    if (m == -INFINITY) return m;
    if (refine.any && !isnan(m)) { /* relative to the chunk's exact maximum (attention.h: refined scores) */
        const float *qi = j->q->data + b * j->q->stride[0] + h * j->q->stride[1] + i * j->q->stride[2];
        mha__score_source src = chunk_source(j, qi, b, h, i, j0);
        m = -INFINITY;
        mha__shift_tile(p, &src, s, 1, 1, cols, &m, false, &refine, NULL);
        j->kt->exp_shift(s, cols, 0.0f);
    } else {
        j->kt->exp_shift(s, cols, m);
    }
    *sum = chunk_sum(s, cols);
    return m;
}

/* A row's share of a thread's scratch: a chunk's scores, then the scaled
 * query row (16 floats over, so each slot starts a line apart). */
static int64_t row_floats(const mha__attn_plan *p) { return KC + p->D + 16; }

/* Query rows rows[0 .. count - 1] (h L + i, at most MHA_ROWS_AT_ONCE) of
 * one kv head's group against chunk c: each row's (m, l, O).  The rows'
 * dots and value sums go to the kernels together, which read each key's
 * and value's row once for all of them; a row at a time re-read the
 * chunk from L2 for every row of the group. */
static void rows_chunk(const decode_job *j, float *scratch, int64_t b, const int64_t *rows, int count, int64_t c)
{
    const mha__attn_plan *p = j->p;
    int64_t j0 = c * KC, cols = p->S - j0 < KC ? p->S - j0 : KC, g = rows[0] / p->L / p->group;
    const float *q[MHA_ROWS_AT_ONCE];
    float *s[MHA_ROWS_AT_ONCE], *o[MHA_ROWS_AT_ONCE];
    int64_t seen[MHA_ROWS_AT_ONCE];
    int n = 0;
    for (int r = 0; r < count; r++) {
        int64_t h = rows[r] / p->L, i = rows[r] % p->L, lo, hi;
        float *part = partial_at(j, b, h, i, c);
        part[0] = -INFINITY;
        part[1] = 0.0f;
        memset(part + 2, 0, (size_t)p->Dv * sizeof(float));
        mha__row_key_range(p, i, &lo, &hi);
        if (j0 >= hi || j0 + cols <= lo) continue; /* nothing of this chunk is visible */
        const float *qi = j->q->data + b * j->q->stride[0] + h * j->q->stride[1] + i * j->q->stride[2];
        float *qs = scratch + n * row_floats(p) + KC;
        for (int64_t d = 0; d < p->D; d++) qs[d] = qi[d * j->q->stride[3]] * p->scale;
        q[n] = qs;
        s[n] = qs - KC;
        seen[n++] = rows[r];
    }
    if (n == 0) return;
    chunk_scores(j, b, g, j0, cols, n, q, s);
    const float *pr[MHA_ROWS_AT_ONCE];
    int adding = 0;
    for (int r = 0; r < n; r++) {
        int64_t h = seen[r] / p->L, i = seen[r] % p->L;
        float l, m = chunk_probs(j, s[r], b, h, i, j0, cols, &l);
        if (m == -INFINITY) continue;
        float *part = partial_at(j, b, h, i, c);
        part[0] = m;
        part[1] = l;
        pr[adding] = s[r];
        o[adding++] = part + 2;
    }
    if (adding) chunk_values(j, b, g, j0, cols, adding, pr, o);
}

/* top[d] = the largest |k| of column d over the chunk's keys (NaN passed
 * over), after the chunk's rows: the dots have brought its K into L2.
 * abs_max takes columns in lanes and walks the keys once per 16 columns,
 * so KEYS keys a call keep those walks in L1. */
static void chunk_key_top(const decode_job *j, int64_t b, int64_t g, int64_t c, float *top)
{
    enum { KEYS = 32 };
    const mha__attn_plan *p = j->p;
    const mha__kv_view *kv = j->kv;
    int64_t j0 = c * KC, cols = p->S - j0 < KC ? p->S - j0 : KC;
    const float *k = (const float *)kv->k + b * kv->stride[0] + g * kv->stride[1] + j0 * kv->stride[2];
    memset(top, 0, (size_t)p->D * sizeof(float));
    for (int64_t k0 = 0; k0 < cols; k0 += KEYS)
        j->kt->abs_max(k + k0 * kv->stride[2], kv->stride[2], p->D, cols - k0 < KEYS ? cols - k0 : KEYS, top);
}

/* Items begin .. end - 1: every query row of the group against the
 * item's chunk (then, deferring, the chunk's column maxima), or with
 * `again` only the wide rows of the heads marked to be done again. */
static void run_items(const decode_job *j, int thread, int64_t begin, int64_t end, bool again)
{
    const mha__attn_plan *p = j->p;
    float *scratch = (float *)(j->scratch + thread * j->scratch_stride);
    for (int64_t item = begin; item < end; item++) {
        int64_t c = item % j->chunks, bg = item / j->chunks, b = bg / p->Hkv, g = bg % p->Hkv;
        if (again && !j->redo[bg]) continue;
        int64_t rows[MHA_ROWS_AT_ONCE];
        int count = 0;
        for (int64_t row = g * p->group * p->L; row < (g + 1) * p->group * p->L; row++) { /* h L + i */
            if (again && !j->wide[b * p->Hq * p->L + row]) continue;
            rows[count++] = row;
            if (count == MHA_ROWS_AT_ONCE) rows_chunk(j, scratch, b, rows, count, c), count = 0;
        }
        if (count) rows_chunk(j, scratch, b, rows, count, c);
        if (j->key_top && !again) chunk_key_top(j, b, g, c, j->key_top + item * p->D);
    }
}

static void chunk_range(void *arg, int thread, int64_t begin, int64_t end)
{
    run_items(arg, thread, begin, end, false);
}

/* The wide rows' chunks again, with the wide flags now found. */
static void redo_range(void *arg, int thread, int64_t begin, int64_t end) { run_items(arg, thread, begin, end, true); }

/* Which rows of each kv head's group are wide (attention.h: refined
 * scores), from the keys' largest norm that a cache keeps, before the
 * chunks. */
static void wide_range(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const decode_job *j = arg;
    const mha__attn_plan *p = j->p;
    for (int64_t bg = begin; bg < end; bg++) {
        int64_t b = bg / p->Hkv, g = bg % p->Hkv;
        double k_norm2_max = mha__keys_norm2_max(p, j->kv, NULL, b, g);
        for (int64_t h = g * p->group; h < (g + 1) * p->group; h++)
            mha__wide_rows(p, j->q, NULL, b, h, 0, p->L, k_norm2_max, j->wide + (b * p->Hq + h) * p->L);
    }
}

/* The largest squared norm of the query rows of kv head g's group in
 * batch b, as mha__wide_rows finds each (NaN if one holds a NaN). */
static double group_q_norm2_max(const decode_job *j, int64_t b, int64_t g)
{
    const mha__attn_plan *p = j->p;
    const mha_tensor *q = j->q;
    double top = 0;
    for (int64_t h = g * p->group; h < (g + 1) * p->group; h++)
        top = mha__norm2_top(top, mha__rows_norm2_max(p->kt, q->data + b * q->stride[0] + h * q->stride[1],
                                                      q->stride[2], q->stride[3], p->L, p->D));
    return top;
}

/* At least kv head (b, g)'s largest squared key norm: the sum of its
 * columns' squared maxima over every chunk.  Squares of floats are exact
 * in float64; the margin covers this sum's rounding and the exact norms'. */
static double key_norm2_bound(const decode_job *j, int64_t bg)
{
    const mha__attn_plan *p = j->p;
    const float *top = j->key_top + bg * j->chunks * p->D;
    double sum = 0;
    for (int64_t d = 0; d < p->D; d++) {
        float m = 0.0f;
        for (int64_t c = 0; c < j->chunks; c++) m = top[c * p->D + d] > m ? top[c * p->D + d] : m;
        sum += (double)m * m;
    }
    return sum * (1 + (double)(p->D + 1) * 0x1p-50);
}

/* deferred_wide's decision, after the chunks, for heads whose bound did
 * not leave every row narrow (redo set by decide_wide): the exact norm
 * decides, and a head keeps its mark only if it has a wide row. */
static void exact_range(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const decode_job *j = arg;
    const mha__attn_plan *p = j->p;
    for (int64_t bg = begin; bg < end; bg++) {
        if (!j->redo[bg]) continue;
        int64_t b = bg / p->Hkv, g = bg % p->Hkv;
        double k_norm2_max = mha__keys_norm2_max(p, j->kv, NULL, b, g);
        j->redo[bg] = false;
        for (int64_t h = g * p->group; h < (g + 1) * p->group; h++)
            j->redo[bg] |= mha__wide_rows(p, j->q, NULL, b, h, 0, p->L, k_norm2_max, j->wide + (b * p->Hq + h) * p->L);
    }
}

/* deferred_wide's first question: can any of the head's rows be wide?
 * Where its bound leaves every row narrow, as the chunks took them, that
 * is what the exact norm decides too (mha__none_wide). */
static void bound_range(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const decode_job *j = arg;
    const mha__attn_plan *p = j->p;
    for (int64_t bg = begin; bg < end; bg++)
        j->redo[bg] = !mha__none_wide(p, group_q_norm2_max(j, bg / p->Hkv, bg % p->Hkv), key_norm2_bound(j, bg));
}

/* deferred_wide's decision: the bounds, then the exact norms where a
 * bound could not settle it.  The bounds read a few floats a chunk and a
 * row: below BOUND_FLOATS of them the calling thread finds them, as a
 * pass on the pool cost a step over 16 keys a tenth.  Returns whether a
 * head has wide rows to do again. */
static bool decide_wide(mha_ctx *ctx, decode_job *j)
{
    enum { BOUND_FLOATS = 4096 };
    const mha__attn_plan *p = j->p;
    int64_t heads = p->B * p->Hkv;
    if (heads * (j->chunks + p->group * p->L) * p->D <= BOUND_FLOATS) bound_range(j, 0, 0, heads);
    else mha__parallel_items(ctx, heads, bound_range, j);
    bool exact = false, again = false;
    for (int64_t bg = 0; bg < heads; bg++) exact = exact || j->redo[bg];
    if (exact) mha__parallel_items(ctx, heads, exact_range, j);
    for (int64_t bg = 0; bg < heads; bg++) again = again || j->redo[bg];
    return again;
}

/* The chunks of each row combined in chunk order. */
static void merge_range(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const decode_job *j = arg;
    const mha__attn_plan *p = j->p;
    for (int64_t row = begin; row < end; row++) {
        int64_t b = row / (p->Hq * p->L), h = row / p->L % p->Hq, i = row % p->L;
        float *dst = j->out->data + b * j->out->stride[0] + h * j->out->stride[1] + i * j->out->stride[2];
        float m = -INFINITY, l = 0.0f;
        for (int64_t c = 0; c < j->chunks; c++) {
            float mc = partial_at(j, b, h, i, c)[0];
            m = isnan(m) ? m : mc > m || isnan(mc) ? mc : m;
        }
        for (int64_t d = 0; d < p->Dv; d++) dst[d * j->out->stride[3]] = isnan(m) ? NAN : 0.0f;
        if (m > -INFINITY) {
            for (int64_t c = 0; c < j->chunks; c++) {
                const float *part = partial_at(j, b, h, i, c);
                if (part[1] == 0.0f) continue;
                float w = expf(part[0] - m);
                l += part[1] * w;
                for (int64_t d = 0; d < p->Dv; d++) dst[d * j->out->stride[3]] += part[2 + d] * w;
            }
            for (int64_t d = 0; d < p->Dv; d++) dst[d * j->out->stride[3]] /= l;
        }
        if (j->lse) j->lse[row] = m > -INFINITY || isnan(m) ? m + logf(l) : -INFINITY;
    }
}

/* The partial results: [B, Hq, L, chunks][2 + Dv] floats. */
static bool partial_floats(const mha__attn_plan *p, int64_t chunks, int64_t *floats)
{
    return mha__mul(p->B * p->Hq * p->L, chunks > 0 ? chunks : 1, floats) && /* B Hq L: checked by the plan */
           mha__mul(*floats, partial_width(p), floats) && *floats <= INT64_MAX / (int64_t)sizeof(float);
}

static int64_t chunk_count(const mha__attn_plan *p) { return (p->S + KC - 1) / KC; }

/* deferred_wide's column maxima: D floats a chunk of each kv head, no
 * more than the partials' 2 + Dv a chunk of each query row (checked). */
static int64_t key_top_floats(const mha__attn_plan *p) { return p->B * p->Hkv * chunk_count(p) * p->D; }

/* Whether the wide rows wait for the chunks (above): float32 rows whose
 * largest norm nobody kept. */
static bool deferred_wide(const mha__kv_view *kv) { return !kv->k_norm2_max && kv->dtype == MHA_DTYPE_F32; }

/* Per thread: each of MHA_ROWS_AT_ONCE rows' chunk scores and scaled
 * query row. */
static int64_t thread_floats(const mha__attn_plan *p) { return MHA_ROWS_AT_ONCE * row_floats(p); }

bool mha__decode_workspace(const mha__attn_plan *p, const mha_ctx *ctx, int64_t *bytes)
{
    int64_t floats;
    if (!partial_floats(p, chunk_count(p), &floats)) {
        mha__fail(MHA_ERR_INVALID_ARG, "decoding %lld rows against %lld keys overflows",
                  (long long)(p->B * p->Hq * p->L), (long long)p->S);
        return false;
    }
    return mha__ws_add(bytes, floats * (int64_t)sizeof(float), "the split-K partials") &&
           mha__ws_add(bytes, p->B * p->Hq * p->L * (int64_t)sizeof(bool), "the wide rows") &&
           mha__ws_add(bytes, key_top_floats(p) * (int64_t)sizeof(float), "the chunks' key maxima") &&
           mha__ws_add(bytes, p->B * p->Hkv * (int64_t)sizeof(bool), "the heads done again") &&
           mha__ws_add_per_thread(bytes, ctx, thread_floats(p), "the split-K rows");
}

mha_status mha__decode_attention(mha_ctx *ctx, const mha__attn_plan *p, mha_tensor *out, float *lse,
                                 const mha_tensor *q, const mha__kv_view *kv)
{
    decode_job j = {.p = p, .kt = p->kt, .q = q, .kv = kv, .out = out, .lse = lse, .chunks = chunk_count(p)};
    int64_t rows = p->B * p->Hq * p->L, floats, top = mha__ws_top(ctx);
    if (rows == 0) return MHA_OK;
    if (!partial_floats(p, j.chunks, &floats)) return MHA_ERR_INTERNAL; /* the plan checked it */
    j.partial = mha__ws_take(ctx, floats * (int64_t)sizeof(float));
    j.wide = j.partial ? mha__ws_take(ctx, rows * (int64_t)sizeof(bool)) : NULL;
    j.scratch = j.wide ? mha__ws_take_per_thread(ctx, thread_floats(p), &j.scratch_stride) : NULL;
    if (j.scratch && deferred_wide(kv)) {
        j.key_top = mha__ws_take(ctx, key_top_floats(p) * (int64_t)sizeof(float));
        j.redo = j.key_top ? mha__ws_take(ctx, p->B * p->Hkv * (int64_t)sizeof(bool)) : NULL;
        if (!j.redo) return MHA_ERR_INTERNAL;
    }
    if (!j.scratch) return MHA_ERR_INTERNAL;
    int64_t items = p->B * p->Hkv * j.chunks;
    if (j.key_top) {
        memset(j.wide, 0, (size_t)rows * sizeof(bool));
        mha__parallel_items(ctx, items, chunk_range, &j);
        if (decide_wide(ctx, &j)) mha__parallel_items(ctx, items, redo_range, &j);
    } else {
        mha__parallel_items(ctx, p->B * p->Hkv, wide_range, &j);
        mha__parallel_items(ctx, items, chunk_range, &j);
    }
    mha__parallel_for(ctx, rows, merge_range, &j);
    mha__ws_release(ctx, top);
    return MHA_OK;
}
