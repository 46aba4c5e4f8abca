/*
 * flash.c -- the fused attention forward: tiles of up to BR query rows
 * against tiles of BC keys with an online softmax (FlashAttention's
 * algorithm), so the L x S score matrix never exists.  Memory beyond inputs
 * and outputs is one tile set per thread: O(BR * (BC + D + Dv)).
 *
 * For one work item (batch b, head h, a block of query rows):
 *   m = -inf, l = 0, O = 0
 *   for each key tile that some row of the item may see:
 *     S = K (scale Q)^T, key-major     (micro-kernel: K rows x packed Q^T)
 *     S = softcap, biases, masks        (the row contract of contract.c)
 *     m', P = exp(S - m') c(m'), l = l s + rowsum(P)      (softmax_step)
 *     O = O s + P V, s = e^(m - m') c(m') / c(m)  (micro-kernel, accumulating)
 *   out = O / l, lse = m + log(l / c(m))  (0 and -inf for a row that saw nothing)
 * where c(m), in (1/2, 1], is the factor softmax_step's base-2
 * exponentials carry (kernels.h), which makes s a power of two; it
 * cancels in O / l.
 * Key tiles outside every row's causal/window range are skipped, so a
 * causal problem costs about half of a dense one.  Work items are
 * independent, hence the same bits for any thread count, and are handed
 * out as threads come free (mha__parallel_items).
 */
#include "attn/products.h"

#include <math.h>
#include <stdatomic.h>
#include <string.h>

/* Query rows per item (at most BR; the plan's block_rows) and keys per tile
 * (products.h). */
enum { BR = MHA__BR, BC = MHA__BC, LDS = MHA__LDS };
_Static_assert((int)BC <= (int)MHA_REFINE_MAX_COLS && (int)BR <= (int)MHA_REFINE_MAX_ROWS,
               "a tile's scores must fit mha__refine and mha__shift_tile");

typedef mha__tiles tiles;

typedef struct flash_job {
    const mha__attn_plan *p;
    const mha__kernels *kt;
    int64_t br; /* query rows per item */
    mha_tensor *out;
    float *lse;
    mha__row_stats *stats;
    const mha_tensor *q;
    const double *q_norm2; /* its rows' squared norms, or NULL (mha__wide_rows) */
    const mha__kv *kv;     /* float32 tensors, or a bf16/int8 cache's rows (kv->k.data NULL) */
    /* Each (b, kv head)'s largest squared key norm, at b * Hkv + g: as
     * the cache keeps it or the layer's wide pass found it (NULL: none),
     * else found by the first item of the head that needs it
     * (head_key_norm2). */
    const double *k_norm2;
    _Atomic double *k_norm2_found;
    atomic_bool *k_norm2_known;
    char *scratch;
    int64_t scratch_stride, q_blocks;
} flash_job;

static tiles tiles_at(const flash_job *j, int thread)
{
    return mha__tiles_carve(j->p, (float *)(j->scratch + thread * j->scratch_stride));
}

/* (scale * Q)^T for query rows i0 .. i0+rows of (b, h), in the plan's
 * dtype: packed once per item, it is the B operand of every score tile. */
static void pack_queries(const flash_job *j, int64_t b, int64_t h, int64_t i0, int64_t rows, tiles *t)
{
    const mha_tensor *q = j->q;
    mha__strided qs = {q->data + b * q->stride[0] + h * q->stride[1] + i0 * q->stride[2], q->stride[2], q->stride[3]};
    j->p->products->pack_queries(j->p, qs, rows, t);
}

/* Keys (or values) j0 .. j0+cols of head h's kv head as float32 rows:
 * in place from a float32 tensor, else widened or dequantised from a
 * cache's rows into t->kq (t->vt): the values the cache holds. */
static mha__strided tile_rows(const flash_job *j, const tiles *t, bool values, int64_t b, int64_t h, int64_t j0,
                              int64_t cols)
{
    const mha_tensor *x = values ? &j->kv->v : &j->kv->k;
    int64_t g = h / j->p->group, width = values ? j->p->Dv : j->p->D;
    if (x->data)
        return (mha__strided){x->data + b * x->stride[0] + g * x->stride[1] + j0 * x->stride[2], x->stride[2],
                              x->stride[3]};
    float *dst = values ? t->vt : t->kq;
    mha__kv_rows_widen(&j->kv->rows, values, b, g, j0, cols, width, dst, width, 1);
    return (mha__strided){dst, width, 1};
}

/* t->next_keys (products.h) for the key tile [j0, j0 + cols), which
 * next_cols keys follow: none unless the plan streams K and V
 * (kv_stream) and K is read in place, row by row. */
static void fetch_ahead(const flash_job *j, tiles *t, int64_t b, int64_t h, int64_t j0, int64_t cols, int64_t next_cols)
{
    const mha__attn_plan *p = j->p;
    const mha_tensor *k = &j->kv->k;
    t->next_keys.at = NULL;
    if (!p->kv_stream || !k->data || k->stride[3] != 1 || next_cols <= 0) return;
    const float *rows = k->data + b * k->stride[0] + h / p->group * k->stride[1] + (j0 + cols) * k->stride[2];
    t->next_keys = (mha__fetch_rows){rows, next_cols, k->stride[2], p->D};
}

/* Which key tile of its kv head keys j0 onward are, for the products'
 * caches (products.h): a whole tile of K and V read in place; -1 for
 * appended keys (off the tile grid) and a cache's rows. */
static int64_t key_tile_index(const flash_job *j, int64_t j0)
{
    return j->kv->k.data && j->kv->v.data && j0 % BC == 0 ? j0 / BC : -1;
}

/* Scores of keys [j0, j0+cols) against the item's rows, key-major:
 * S^T = K (scale Q)^T in the plan's dtype; then the row contract, unless
 * `plain` says every key of the tile is visible to every row with no
 * bias.  t->refine: which of them to refine (attention.h), decided as
 * the backward and the weights decide; for a plain tile only if
 * `decide`, else none (softmax_step then tells whether any would be). */
static void score_tile(const flash_job *j, tiles *t, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                       int64_t cols, bool plain, bool decide, mha__strided ks)
{
    const mha__attn_plan *p = j->p;
    p->products->scores(p, ks, rows, cols, key_tile_index(j, j0), t);
    t->refine.any = false;
    if (decide || !plain || t->wide_any)
        mha__refine_raw(p, t->st, LDS, rows, cols, j0, plain ? NULL : t->lo, plain ? NULL : t->hi, t->wide, &t->refine);
    if (plain) return;
    mha__score_contract(p, t->st, LDS, b, h, i0, rows, j0, cols, t->lo, t->hi, NULL);
    mha__refine_contracted(p, t->st, LDS, rows, cols, &t->refine);
}

/* O = O * scale + P V for keys [j0, j0+cols), in the plan's dtype.  A
 * whole tile of V read in place may come from the value-tile cache
 * (products.h).  Products that keep O^T rescale it themselves. */
static void accumulate_values(const flash_job *j, const tiles *t, int64_t b, int64_t h, int64_t rows, int64_t j0,
                              int64_t cols)
{
    const mha__attn_plan *p = j->p;
    if (!p->products->o_transposed) mha__rescale_rows(j->kt, t->o, p->Dv, rows, t->scale);
    for (int64_t r = 0; r < rows && p->bf16; r++) t->p16_sum[r] *= t->scale[r]; /* a power of two: exact */
    p->products->values(p, tile_rows(j, t, true, b, h, j0, cols), rows, cols, key_tile_index(j, j0), t);
}

/* For rows whose running maxima went from old to max (old <= max): the
 * factor softmax_step's probabilities carry (kernels.h) and the rescale
 * of O and l, as the step computes them: the step itself, run from the
 * old maxima over a one-key tile holding the new.  So a row's largest
 * score gets exactly factor[r] from the step, and dividing l by it
 * leaves the largest term 1 -- what the backward's exp(s - lse) needs of
 * a peaked row, where an lse off by an ulp puts the ulp into dS.  Rows
 * that see nothing get factor 0 and scale 1; rows seeing their first key
 * get scale 0, rescaling an O and l that are still 0. */
static void step_factors(const flash_job *j, const float *old, const float *max, int64_t rows, float *factor,
                         float *scale)
{
    float m[BR], sum[BR] = {0};
    memcpy(m, old, (size_t)rows * sizeof(float));
    memcpy(factor, max, (size_t)rows * sizeof(float));
    j->kt->softmax_step(factor, BR, rows, 1, m, sum, scale, INFINITY, NULL);
}

/* Where the refined scores of the item's rows come from: its query rows,
 * widened into t->qd when the item first refines (attention.h). */
static mha__score_source refine_source(const mha__attn_plan *p, const mha_tensor *q, tiles *t, int64_t b, int64_t h,
                                       int64_t i0, int64_t rows, int64_t j0, mha__strided ks)
{
    mha__score_source src = mha__score_rows(q, b, h, i0, j0, ks);
    mha__panel_of(p, &src, rows, t->qd, BR, &t->qd_row);
    return src;
}

/* softmax_step (kernels.h) for a tile where some scores are large
 * (attention.h: refined scores): each row's scores relative to its new
 * maximum m, refined where marked, then p = exp(x) times the factor
 * softmax_step's probabilities carry, so that this tile's and the vector
 * step's tiles of a row add up alike; scale as the vector step's, a
 * power of two. */
static void refined_softmax_step(const flash_job *j, tiles *t, int64_t b, int64_t h, int64_t i0, int64_t rows,
                                 int64_t j0, int64_t cols, mha__strided ks)
{
    mha__score_source src = refine_source(j->p, j->q, t, b, h, i0, rows, j0, ks);
    float l[BR] = {0}, old[BR], factor[BR];
    memcpy(old, t->max, (size_t)rows * sizeof(float));
    mha__shift_tile(j->p, &src, t->st, LDS, rows, cols, t->max, false, &t->refine, NULL);
    step_factors(j, old, t->max, rows, factor, t->scale);
    for (int64_t c = 0; c < cols; c++) { /* p = exp(x) factor, a key's rows at a time */
        float *x = t->st + c * LDS;
        j->kt->exp_shift(x, rows, 0.0f);
        for (int64_t r = 0; r < rows; r++) l[r] += x[r] *= factor[r];
    }
    for (int64_t r = 0; r < rows; r++) t->sum[r] = t->sum[r] * t->scale[r] + l[r];
}

/* How many of the tile's keys, from its first, hold every key each row
 * sees (products.h): up to the row's range's end for real keys under a
 * contract, the whole tile otherwise.  Above a causal diagonal the
 * products then skip what is masked: the diagonal tile is half of it. */
static void tile_reach(const flash_job *j, tiles *t, int64_t rows, int64_t j0, int64_t cols, bool plain)
{
    bool ranged = !plain && j0 + cols <= j->p->R; /* appended keys are seen by all */
    for (int64_t r = 0; r < rows; r++) {
        int64_t n = ranged ? t->hi[r] - j0 : cols;
        t->reach[r] = n < 0 ? 0 : n > cols ? cols : n;
    }
}

/* One key tile [j0, j0+cols) for the item's rows: the vector softmax
 * step, or the refined one where some of the tile's scores are large.
 * A plain tile learns that from the vector step itself, and then goes
 * back to its statistics before the step and computes its scores again.
 * So does a `prefix` tile (each row sees a first part of it: a causal
 * mask alone, no bias, no cap) when no row is wide: the step masks the
 * keys past each row's reach itself, so the tile needs neither the
 * contract's pass nor the refinement's pass that finds large scores
 * (both still run where the step finds some).  The same bits as the
 * contract's -inf give. */
static void key_tile(const flash_job *j, tiles *t, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                     int64_t cols, bool plain, bool prefix)
{
    const mha__attn_plan *p = j->p;
    tile_reach(j, t, rows, j0, cols, plain);
    mha__strided ks = tile_rows(j, t, false, b, h, j0, cols);
    bool unmasked = plain || (prefix && !t->wide_any); /* scores as the products leave them */
    score_tile(j, t, b, h, i0, rows, j0, cols, unmasked, false, ks);
    if (!t->refine.any) {
        float max[BR], sum[BR], above = unmasked && !p->bf16 ? MHA_REFINE_ABOVE : INFINITY;
        const int64_t *reach = unmasked && !plain ? t->reach : NULL;
        memcpy(max, t->max, (size_t)rows * sizeof(float));
        memcpy(sum, t->sum, (size_t)rows * sizeof(float));
        if (!j->kt->softmax_step(t->st, LDS, rows, cols, t->max, t->sum, t->scale, above, reach)) {
            accumulate_values(j, t, b, h, rows, j0, cols);
            return;
        }
        memcpy(t->max, max, (size_t)rows * sizeof(float));
        memcpy(t->sum, sum, (size_t)rows * sizeof(float));
        score_tile(j, t, b, h, i0, rows, j0, cols, plain, true, ks);
    }
    refined_softmax_step(j, t, b, h, i0, rows, j0, cols, ks);
    accumulate_values(j, t, b, h, rows, j0, cols);
}

/* The item's unnormalised output as rows [rows][Dv]: t->o, or O^T turned
 * into t->vt (free once the item's last key tile is done). */
static float *output_rows(const flash_job *j, const tiles *t, int64_t rows)
{
    const mha__attn_plan *p = j->p;
    if (!p->products->o_transposed) return t->o;
    j->kt->transpose_scaled(t->vt, p->Dv, t->o, BR, p->Dv, rows, 1.0f);
    return t->vt;
}

static void write_rows(const flash_job *j, const tiles *t, int64_t b, int64_t h, int64_t i0, int64_t rows)
{
    const mha__attn_plan *p = j->p;
    const mha_tensor *out = j->out;
    float factor[BR], unchanged[BR], *o_rows = output_rows(j, t, rows);
    step_factors(j, t->max, t->max, rows, factor, unchanged);
    for (int64_t r = 0; r < rows; r++) {
        float *dst = out->data + b * out->stride[0] + h * out->stride[1] + (i0 + r) * out->stride[2];
        /* l is 0 for a row that saw no key (output 0), NaN for a row that
         * saw a NaN score (output NaN, as a plain softmax gives). */
        float l = t->sum[r];
        bool seen = l > 0 || isnan(l);
        float *o = o_rows + r * p->Dv;
        /* bf16 products weigh the values by the probabilities rounded, so
         * O is divided by their sum: a row that sees one key gets its
         * value (to the division's rounding), as a plain bf16 model's
         * p = 1 gives, where l, the sum of unrounded p, would leave in it
         * the rounding of the step's factor (kernels.h), up to 2^-9 of
         * every output of the row. */
        float divisor = p->bf16 ? t->p16_sum[r] : l;
        if (seen) j->kt->scale(o, p->Dv, 1.0f / divisor); /* in the tile, then copied: one vector pass */
        else memset(o, 0, (size_t)p->Dv * sizeof(float));
        if (out->stride[3] == 1) memcpy(dst, o, (size_t)p->Dv * sizeof(float));
        else
            for (int64_t c = 0; c < p->Dv; c++) dst[c * out->stride[3]] = o[c];
        /* l carries softmax_step's factor (step_factors); the lse and
         * the saved sum are the row's own, without it. */
        int64_t at = (b * p->Hq + h) * p->L + i0 + r;
        float own = seen ? l / factor[r] : l;
        if (j->lse) j->lse[at] = seen ? t->max[r] + logf(own) : -INFINITY;
        if (j->stats) {
            j->stats->max[at] = seen ? t->max[r] : -INFINITY;
            j->stats->sum[at] = own;
        }
    }
}

/* The largest squared key norm of kv head g in batch b.  Found by the
 * head's first item, not in a pass of its own over all of K before the
 * items: that pass read K from memory, and the head's key tiles, split
 * or packed later, read it again (the pass was 2.4% of the causal core
 * at N = 2048).  Products that keep key tiles find it from the tiles as
 * they make them (key_norm2_max, products.h); otherwise the head's keys
 * are at least in L2 when its tiles come.  Two threads that start items
 * of one head together may both find it, and store the same bits. */
static double head_key_norm2(const flash_job *j, const tiles *t, int64_t b, int64_t g)
{
    const mha__attn_plan *p = j->p;
    const mha_tensor *k = &j->kv->k;
    int64_t bg = b * p->Hkv + g;
    if (j->k_norm2) return j->k_norm2[bg];
    if (atomic_load_explicit(&j->k_norm2_known[bg], memory_order_acquire))
        return atomic_load_explicit(&j->k_norm2_found[bg], memory_order_relaxed);
    double found;
    if (k->data && p->products->key_norm2_max) {
        mha__strided keys = {k->data + b * k->stride[0] + g * k->stride[1], k->stride[2], k->stride[3]};
        found = p->products->key_norm2_max(p, keys, p->S, t);
    } else {
        found = mha__keys_norm2_max(p, &j->kv->rows, k, b, g);
    }
    atomic_store_explicit(&j->k_norm2_found[bg], found, memory_order_relaxed);
    atomic_store_explicit(&j->k_norm2_known[bg], true, memory_order_release);
    return found;
}

/* Which of the item's rows are wide (attention.h: refined scores), from
 * the largest key norm of their kv head. */
static void wide_rows(const flash_job *j, tiles *t, int64_t b, int64_t h, int64_t i0, int64_t rows)
{
    const mha__attn_plan *p = j->p;
    double k_norm2_max = head_key_norm2(j, t, b, h / p->group);
    t->wide_any = mha__wide_rows(p, j->q, j->q_norm2, b, h, i0, rows, k_norm2_max, t->wide);
}

/* Each row's visible real keys, for the row contract in score_tile. */
static void row_ranges(const flash_job *j, tiles *t, int64_t i0, int64_t rows)
{
    for (int64_t r = 0; r < rows; r++) mha__row_key_range(j->p, i0 + r, &t->lo[r], &t->hi[r]);
}

static void flash_item(const flash_job *j, tiles *t, int64_t item)
{
    const mha__attn_plan *p = j->p;
    int64_t qb = item % j->q_blocks, bh = item / j->q_blocks, b = bh / p->Hq, h = bh % p->Hq;
    int64_t i0 = qb * j->br, rows = p->L - i0 < j->br ? p->L - i0 : j->br;
    /* Rows' key ranges grow with i, so the first row has the smallest hi
     * and the last row the largest lo. */
    row_ranges(j, t, i0, rows);
    int64_t lo_first = t->lo[0], hi_first = t->hi[0], lo_last = t->lo[rows - 1], hi_last = t->hi[rows - 1];
    for (int64_t r = 0; r < rows; r++) {
        t->max[r] = -INFINITY;
        t->sum[r] = 0.0f;
        if (p->bf16) t->p16_sum[r] = 0.0f;
    }
    if (p->products->o_transposed)
        for (int64_t d = 0; d < p->Dv; d++) memset(t->o + d * BR, 0, (size_t)rows * sizeof(float));
    else memset(t->o, 0, (size_t)(rows * p->Dv) * sizeof(float));
    pack_queries(j, b, h, i0, rows, t);
    wide_rows(j, t, b, h, i0, rows);
    bool biased = p->softcap > 0 || mha__plan_has_bias(p); /* any score needs more than the GEMM */
    int64_t start = lo_first > 0 ? lo_first / BC * BC : 0, stop = hi_last < p->R ? hi_last : p->R;
    for (int64_t j0 = start; j0 < stop; j0 += BC) {
        int64_t cols = stop - j0 < BC ? stop - j0 : BC;
        bool seen_from_start = !biased && j0 >= lo_last; /* no row's keys start inside the tile */
        fetch_ahead(j, t, b, h, j0, cols, mha__min64(BC, stop - j0 - cols));
        key_tile(j, t, b, h, i0, rows, j0, cols, seen_from_start && j0 + cols <= hi_first, seen_from_start);
    }
    if (p->S > p->R) { /* appended keys: visible to all, unbiased, but capped */
        fetch_ahead(j, t, b, h, p->R, p->S - p->R, 0);
        key_tile(j, t, b, h, i0, rows, p->R, p->S - p->R, p->softcap == 0, false);
    }
    write_rows(j, t, b, h, i0, rows);
}

static void flash_range(void *arg, int thread, int64_t begin, int64_t end)
{
    const flash_job *j = arg;
    tiles t = tiles_at(j, thread);
    for (int64_t item = begin; item < end; item++) flash_item(j, &t, item);
    if (j->p->products->release) j->p->products->release(j->p);
}

/* ---------------------------------------------------------------- */
/* attn_weights: probabilities recomputed from the saved statistics   */
/* ---------------------------------------------------------------- */

/* The scores come from the same micro-kernel as the forward pass, so each
 * is bit-identical to the one the statistics were built from; with logits
 * in the hundreds any other way of computing them would disagree with the
 * saved maximum by more than the tolerance allows. */
typedef struct probs_job {
    flash_job f;
    mha_tensor *probs;
    int average;
} probs_job;

/* probs[b, h or 0, i0 .. i0+rows, j0 .. j0+cols] = P (or += for averaging). */
static void store_probs(const probs_job *pj, tiles *t, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                        int64_t cols, mha__strided ks)
{
    const mha__attn_plan *p = pj->f.p;
    const mha_tensor *pr = pj->probs;
    bool add = pj->average && h > 0, shifted = t->refine.any;
    const float *max = pj->f.stats->max + (b * p->Hq + h) * p->L + i0,
                *sum = pj->f.stats->sum + (max - pj->f.stats->max);
    float anchor[BR];
    for (int64_t r = 0; r < rows; r++) anchor[r] = sum[r] > 0 ? max[r] : -INFINITY;
    if (shifted) { /* as the forward refined them: x = s - max */
        mha__score_source src = refine_source(p, pj->f.q, t, b, h, i0, rows, j0, ks);
        mha__shift_tile(p, &src, t->st, LDS, rows, cols, anchor, true, &t->refine, NULL);
    }
    for (int64_t r = 0; r < rows; r++) {
        float s[BC];
        for (int64_t c = 0; c < cols; c++) s[c] = t->st[c * LDS + r]; /* back to query-major */
        if (sum[r] > 0) {
            pj->f.kt->exp_shift(s, cols, shifted ? 0.0f : max[r]);
            pj->f.kt->scale(s, cols, 1.0f / sum[r]);
        } else {
            memset(s, 0, (size_t)cols * sizeof(float));
        }
        float *dst = pr->data + b * pr->stride[0] + (pj->average ? 0 : h) * pr->stride[1] + (i0 + r) * pr->stride[2] +
                     j0 * pr->stride[3];
        for (int64_t c = 0; c < cols; c++) dst[c * pr->stride[3]] = add ? dst[c * pr->stride[3]] + s[c] : s[c];
    }
}

/* Item (b, query block): every head in order, every key tile. */
static void probs_item(const probs_job *pj, tiles *t, int64_t item)
{
    const flash_job *j = &pj->f;
    const mha__attn_plan *p = j->p;
    int64_t b = item / j->q_blocks, i0 = (item % j->q_blocks) * j->br, rows = p->L - i0 < j->br ? p->L - i0 : j->br;
    row_ranges(j, t, i0, rows);
    for (int64_t h = 0; h < p->Hq; h++) {
        pack_queries(j, b, h, i0, rows, t);
        wide_rows(j, t, b, h, i0, rows);
        for (int64_t j0 = 0, cols; j0 < p->S; j0 += cols) { /* the forward's tiles: real keys, then appended */
            int64_t end = j0 < p->R ? p->R : p->S;
            cols = end - j0 < BC ? end - j0 : BC;
            mha__strided ks = tile_rows(j, t, false, b, h, j0, cols);
            tile_reach(j, t, rows, j0, cols, false);
            score_tile(j, t, b, h, i0, rows, j0, cols, false, true, ks);
            store_probs(pj, t, b, h, i0, rows, j0, cols, ks);
        }
    }
    if (!pj->average) return;
    float inv = 1.0f / (float)p->Hq;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < p->S; c++) {
            const mha_tensor *pr = pj->probs;
            float *d = pr->data + b * pr->stride[0] + (i0 + r) * pr->stride[2] + c * pr->stride[3];
            *d = *d * inv;
        }
}

static void probs_range(void *arg, int thread, int64_t begin, int64_t end)
{
    const probs_job *pj = arg;
    tiles t = tiles_at(&pj->f, thread);
    for (int64_t item = begin; item < end; item++) probs_item(pj, &t, item);
    if (pj->f.p->products->release) pj->f.p->products->release(pj->f.p);
}

/* Where each (b, kv head)'s largest key norm comes from
 * (head_key_norm2): the cache or the layer's wide pass, else a slot per
 * head that its first item fills, shared by the threads.  Not a copy per
 * thread: a thread's tiles are set up anew for each run of items it
 * claims, and a copy in them was found again every run. */
static mha_status key_norms(mha_ctx *ctx, flash_job *j)
{
    j->k_norm2 = j->kv->rows.k_norm2_max;
    if (j->k_norm2) return MHA_OK;
    int64_t heads = j->p->B * j->p->Hkv;
    j->k_norm2_found = mha__ws_take(ctx, heads * (int64_t)sizeof(_Atomic double));
    j->k_norm2_known = mha__ws_take(ctx, heads * (int64_t)sizeof(atomic_bool));
    if (!j->k_norm2_found || !j->k_norm2_known) return MHA_ERR_INTERNAL; /* the plan sized them */
    for (int64_t bg = 0; bg < heads; bg++) atomic_init(&j->k_norm2_known[bg], false);
    return MHA_OK;
}

/* The tiles' caches emptied before a call's first item: the slices may
 * hold another call's tiles, from rows at the same addresses. */
static void forget_values(const flash_job *j, const mha_ctx *ctx)
{
    for (int thread = 0; thread < mha_ctx_threads(ctx); thread++) {
        tiles t = tiles_at(j, thread);
        mha__tiles_forget_values(&t);
    }
}

bool mha__attn_forward_workspace(const mha__attn_plan *p, const mha_ctx *ctx, int64_t *bytes)
{
    return mha__ws_add_per_thread(bytes, ctx, mha__tiles_floats(p), "the attention tiles") &&
           mha__ws_add(bytes, p->B * p->Hkv * (int64_t)sizeof(_Atomic double), "the key norms") &&
           mha__ws_add(bytes, p->B * p->Hkv * (int64_t)sizeof(atomic_bool), "the key norms' flags");
}

mha_status mha__attn_probs(mha_ctx *ctx, const mha__attn_plan *p, mha_tensor *probs, int average,
                           const mha__row_stats *stats, const mha_tensor *q, const mha_tensor *k)
{
    int64_t br = p->block_rows, top = mha__ws_top(ctx);
    mha__kv kv = {.k = *k, .v = *k, .rows = {.dtype = MHA_DTYPE_F32}}; /* the keys only: no values are read */
    probs_job pj = {{.p = p,
                     .kt = p->kt,
                     .br = br,
                     .stats = (mha__row_stats *)stats,
                     .q = q,
                     .kv = &kv,
                     .q_blocks = (p->L + br - 1) / br},
                    probs,
                    average};
    pj.f.scratch = mha__ws_take_per_thread(ctx, mha__tiles_floats(p), &pj.f.scratch_stride);
    if (!pj.f.scratch || key_norms(ctx, &pj.f) != MHA_OK) return MHA_ERR_INTERNAL;
    forget_values(&pj.f, ctx);
    mha__parallel_items(ctx, p->B * pj.f.q_blocks, probs_range, &pj);
    mha__ws_release(ctx, top);
    return MHA_OK;
}

mha_status mha__attn_forward(mha_ctx *ctx, const mha__attn_plan *p, mha_tensor *out, float *lse, mha__row_stats *stats,
                             const mha_tensor *q, const double *q_norm2, const mha__kv *kv)
{
    int64_t br = p->block_rows, top = mha__ws_top(ctx);
    flash_job job = {.p = p,
                     .kt = p->kt,
                     .br = br,
                     .out = out,
                     .lse = lse,
                     .stats = stats,
                     .q = q,
                     .q_norm2 = q_norm2,
                     .kv = kv,
                     .q_blocks = (p->L + br - 1) / br};
    job.scratch = mha__ws_take_per_thread(ctx, mha__tiles_floats(p), &job.scratch_stride);
    if (!job.scratch || key_norms(ctx, &job) != MHA_OK) return MHA_ERR_INTERNAL;
    forget_values(&job, ctx);
    /* A kv head's items in a row: its query heads' blocks, which share
     * the split products' key and value tiles (products_split.c). */
    mha__parallel_groups(ctx, p->B * p->Hq * job.q_blocks, job.q_blocks * p->group, flash_range, &job);
    mha__ws_release(ctx, top);
    return MHA_OK;
}
