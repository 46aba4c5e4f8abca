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
 *     m', P = exp(S - m'), l = l e^(m - m') + rowsum(P)   (softmax_step)
 *     O = O e^(m - m') + P V           (micro-kernel, accumulating)
 *   out = O / l, lse = m + log l   (0 and -inf for a row that saw nothing)
 * Key tiles outside every row's causal/window range are skipped, so a
 * causal problem costs about half of a dense one.  Work items are
 * independent, hence the same bits for any thread count.
 */
#include "attn/attention.h"
#include "core/convert.h"
#include "kernels/kernels.h"

#include <math.h>
#include <string.h>

/* Query rows per item (at most BR; see rows_per_item) and keys per tile:
 * multiples of every kernel's mr (12, 6, 4), so full tiles have no tails.
 * BR is also the leading dimension of the transposed tiles. */
enum { BR = 192, BC = 192 };

/* 96 rows per item while one head's K and V fit in about twice the L2
 * cache; beyond that, 192 rows share each pass over K and V (measured at
 * N = 2048 and 8192, d = 64: docs/PERFORMANCE.md). */
static int64_t rows_per_item(const mha__attn_plan *p)
{
    double kv_bytes = (double)p->S * (double)(p->D + p->Dv) * sizeof(float);
    return kv_bytes > 2.5e6 ? BR : BR / 2;
}

typedef struct flash_job {
    const mha__attn_plan *p;
    const mha__kernels *kt;
    const mha__bf16_kernels *bk; /* non-NULL: the products run in bf16 */
    int64_t br;                  /* query rows per item */
    mha_tensor *out;
    float *lse;
    mha__row_stats *stats;
    const mha_tensor *q, *k, *v;
    char *scratch;
    int64_t scratch_stride, q_blocks;
} flash_job;

/* Per-thread tiles, carved from one scratch slice. */
typedef struct tiles {
    float *qt;                /* [D][BR]   the item's queries, transposed (packed once per item) */
    float *vt;                /* [BC][Dv]  the value tile, when V's rows are not contiguous */
    float *st;                /* [BC][BR]  scores, then probabilities, key-major */
    float *o;                 /* [BR][Dv]  unnormalised output */
    float *max, *sum, *scale; /* [BR] */
    uint16_t *k16;            /* bf16 only: [BC][D even]  the key tile, rounded */
    uint16_t *p16;            /* bf16 only: [BC / 2][BR][2] probabilities in pairs of keys, rounded */
    int64_t lo[BR], hi[BR];   /* each row's visible real keys (mha__row_key_range) */
} tiles;

/* In bf16, qt holds (scale Q)^T and vt the value tile in pairs of rows,
 * as the bf16 tile reads B (kernels.h); odd dimensions are padded with 0. */
static int64_t even(int64_t n) { return n + (n & 1); }

static int64_t tiles_floats(const mha__attn_plan *p)
{
    return p->D * BR + BC * p->Dv + BC * BR + BR * p->Dv + 3 * BR + (BC * even(p->D) + BR * BC) / 2 +
           7 * 16; /* +16 per array: alignment slack */
}

static float *carve(float **cursor, int64_t n)
{
    float *start = *cursor;
    *cursor += (n + 15) / 16 * 16;
    return start;
}

static tiles tiles_at(const flash_job *j, int thread)
{
    const mha__attn_plan *p = j->p;
    float *cur = (float *)(j->scratch + thread * j->scratch_stride);
    tiles t;
    t.qt = carve(&cur, p->D * BR);
    t.vt = carve(&cur, BC * p->Dv);
    t.st = carve(&cur, BC * BR);
    t.o = carve(&cur, BR * p->Dv);
    t.max = carve(&cur, BR);
    t.sum = carve(&cur, BR);
    t.scale = carve(&cur, BR);
    t.k16 = (uint16_t *)carve(&cur, BC * even(p->D) / 2);
    t.p16 = (uint16_t *)carve(&cur, BR * BC / 2);
    return t;
}

/* (scale * Q)^T for query rows i0 .. i0+rows of (b, h): packed once per
 * item, it is the B operand of every score tile.  Scaling the queries, as
 * nn.MultiheadAttention does, saves a pass over every score tile. */
static void pack_queries(const flash_job *j, int64_t b, int64_t h, int64_t i0, int64_t rows, float *qt)
{
    const mha_tensor *q = j->q;
    const float *qb = q->data + b * q->stride[0] + h * q->stride[1] + i0 * q->stride[2];
    float scale = j->p->scale;
    int64_t D = j->p->D;
    if (j->bk) { /* pairs of dimensions: element (c, r) at (c / 2) * 2 BR + 2 r + c % 2 */
        uint16_t *qt16 = (uint16_t *)qt;
        for (int64_t r = 0; r < rows; r++) {
            for (int64_t c = 0; c < D; c++)
                qt16[(c / 2) * 2 * BR + 2 * r + c % 2] =
                    mha__f32_to_bf16(qb[r * q->stride[2] + c * q->stride[3]] * scale);
            if (D & 1) qt16[(D / 2) * 2 * BR + 2 * r + 1] = 0;
        }
        return;
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < D; c++) qt[c * BR + r] = qb[r * q->stride[2] + c * q->stride[3]] * scale;
}

/* S^T for keys [0, cols) of the tile at kb, in bf16: the key rows rounded
 * and padded to an even width, times the packed (scale Q)^T. */
static void score_products_bf16(const flash_job *j, const tiles *t, const float *kb, int64_t rows, int64_t cols)
{
    const mha_tensor *k = j->k;
    int64_t D = j->p->D, De = even(D);
    for (int64_t c = 0; c < cols; c++) {
        if (k->stride[3] == 1) {
            j->bk->round(t->k16 + c * De, kb + c * k->stride[2], D);
        } else {
            for (int64_t d = 0; d < D; d++)
                t->k16[c * De + d] = mha__f32_to_bf16(kb[c * k->stride[2] + d * k->stride[3]]);
        }
        if (D & 1) t->k16[c * De + D] = 0;
    }
    for (int64_t c = 0; c < cols; c += MHA_BF16_MR)
        for (int64_t r = 0; r < rows; r += MHA_BF16_NR) {
            int64_t m = cols - c < MHA_BF16_MR ? cols - c : MHA_BF16_MR,
                    n = rows - r < MHA_BF16_NR ? rows - r : MHA_BF16_NR;
            j->bk->tile(m, n, De, t->k16 + c * De, De, 2, (const uint16_t *)t->qt + 2 * r, 2 * BR, t->st + c * BR + r,
                        BR, 0);
        }
}

/* O += P V in bf16: pairs of key rows of P (key-major, as softmax_step
 * left it) and of V interleaved and rounded, padded to an even number of
 * keys; P's pairs are then the A operand (a_rs = 2, a_ps = 2 BR). */
static void value_products_bf16(const flash_job *j, const tiles *t, const float *vb, int64_t rows, int64_t cols)
{
    const mha_tensor *v = j->v;
    const mha__bf16_kernels *bk = j->bk;
    int64_t Dv = j->p->Dv, ce = even(cols);
    uint16_t *v16 = (uint16_t *)t->vt, *p16 = t->p16;
    for (int64_t c = 0; c < cols; c += 2) {
        const float *second = c + 1 < cols ? t->st + (c + 1) * BR : NULL;
        bk->pairs(p16 + (c / 2) * 2 * BR, t->st + c * BR, second, rows);
        if (v->stride[3] == 1) {
            bk->pairs(v16 + (c / 2) * 2 * Dv, vb + c * v->stride[2], c + 1 < cols ? vb + (c + 1) * v->stride[2] : NULL,
                      Dv);
            continue;
        }
        for (int64_t d = 0; d < Dv; d++) {
            v16[(c / 2) * 2 * Dv + 2 * d] = mha__f32_to_bf16(vb[c * v->stride[2] + d * v->stride[3]]);
            v16[(c / 2) * 2 * Dv + 2 * d + 1] =
                c + 1 < cols ? mha__f32_to_bf16(vb[(c + 1) * v->stride[2] + d * v->stride[3]]) : 0;
        }
    }
    for (int64_t r = 0; r < rows; r += MHA_BF16_MR)
        for (int64_t c = 0; c < Dv; c += MHA_BF16_NR) {
            int64_t m = rows - r < MHA_BF16_MR ? rows - r : MHA_BF16_MR,
                    n = Dv - c < MHA_BF16_NR ? Dv - c : MHA_BF16_NR;
            bk->tile(m, n, ce, p16 + 2 * r, 2, 2 * BR, v16 + 2 * c, 2 * Dv, t->o + r * Dv + c, Dv, 1);
        }
}

/* Scores of keys [j0, j0+cols) against the item's rows, key-major:
 * S^T = K (scale Q)^T, with K's rows read in place as the broadcast
 * operand; then the row contract, unless `plain` says every key of the
 * tile is visible to every row with no bias. */
static void score_tile(const flash_job *j, const tiles *t, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                       int64_t cols, bool plain)
{
    const mha__attn_plan *p = j->p;
    const mha__kernels *kt = j->kt;
    const mha_tensor *k = j->k;
    const float *kb = k->data + b * k->stride[0] + (h / p->group) * k->stride[1] + j0 * k->stride[2];
    if (j->bk) score_products_bf16(j, t, kb, rows, cols);
    else
        for (int64_t c = 0; c < cols; c += kt->mr)
            for (int64_t r = 0; r < rows; r += kt->nr) {
                int64_t m = cols - c < kt->mr ? cols - c : kt->mr, n = rows - r < kt->nr ? rows - r : kt->nr;
                kt->gemm_tile(m, n, p->D, kb + c * k->stride[2], k->stride[2], k->stride[3], t->qt + r, BR,
                              t->st + c * BR + r, BR, 0);
            }
    if (!plain) mha__score_contract(p, t->st, BR, b, h, i0, rows, j0, cols, t->lo, t->hi, NULL);
}

/* O = O * scale + P V for keys [j0, j0+cols); P^T is the A operand, read
 * through its strides. */
static void accumulate_values(const flash_job *j, const tiles *t, int64_t b, int64_t h, int64_t rows, int64_t j0,
                              int64_t cols)
{
    const mha__attn_plan *p = j->p;
    const mha__kernels *kt = j->kt;
    const mha_tensor *v = j->v;
    const float *vb = v->data + b * v->stride[0] + (h / p->group) * v->stride[1] + j0 * v->stride[2];
    int64_t ldv = v->stride[2];
    for (int64_t r = 0; r < rows; r++)
        if (t->scale[r] != 1.0f) kt->scale(t->o + r * p->Dv, p->Dv, t->scale[r]);
    if (j->bk) {
        value_products_bf16(j, t, vb, rows, cols);
        return;
    }
    if (v->stride[3] != 1) { /* gather the tile so its rows are contiguous */
        for (int64_t jj = 0; jj < cols; jj++)
            for (int64_t c = 0; c < p->Dv; c++) t->vt[jj * p->Dv + c] = vb[jj * v->stride[2] + c * v->stride[3]];
        vb = t->vt;
        ldv = p->Dv;
    }
    for (int64_t r = 0; r < rows; r += kt->mr)
        for (int64_t c = 0; c < p->Dv; c += kt->nr) {
            int64_t m = rows - r < kt->mr ? rows - r : kt->mr, n = p->Dv - c < kt->nr ? p->Dv - c : kt->nr;
            kt->gemm_tile(m, n, cols, t->st + r, 1, BR, vb + c, ldv, t->o + r * p->Dv + c, p->Dv, 1);
        }
}

/* One key tile [j0, j0+cols) for the item's rows. */
static void key_tile(const flash_job *j, const tiles *t, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                     int64_t cols, bool plain)
{
    score_tile(j, t, b, h, i0, rows, j0, cols, plain);
    j->kt->softmax_step(t->st, BR, rows, cols, t->max, t->sum, t->scale);
    accumulate_values(j, t, b, h, rows, j0, cols);
}

static void write_rows(const flash_job *j, const tiles *t, int64_t b, int64_t h, int64_t i0, int64_t rows)
{
    const mha__attn_plan *p = j->p;
    const mha_tensor *out = j->out;
    for (int64_t r = 0; r < rows; r++) {
        float *dst = out->data + b * out->stride[0] + h * out->stride[1] + (i0 + r) * out->stride[2];
        /* l is 0 for a row that saw no key (output 0), NaN for a row that
         * saw a NaN score (output NaN, as a plain softmax gives). */
        float l = t->sum[r];
        bool seen = l > 0 || isnan(l);
        float inv = seen ? 1.0f / l : 0.0f;
        const float *o = t->o + r * p->Dv;
        for (int64_t c = 0; c < p->Dv; c++) dst[c * out->stride[3]] = seen ? o[c] * inv : 0.0f;
        int64_t at = (b * p->Hq + h) * p->L + i0 + r;
        if (j->lse) j->lse[at] = seen ? t->max[r] + logf(l) : -INFINITY;
        if (j->stats) {
            j->stats->max[at] = seen ? t->max[r] : -INFINITY;
            j->stats->sum[at] = l;
        }
    }
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
    }
    memset(t->o, 0, (size_t)(rows * p->Dv) * sizeof(float));
    pack_queries(j, b, h, i0, rows, t->qt);
    bool biased = p->softcap > 0 || mha__plan_has_bias(p); /* any score needs more than the GEMM */
    int64_t start = lo_first > 0 ? lo_first / BC * BC : 0, stop = hi_last < p->R ? hi_last : p->R;
    for (int64_t j0 = start; j0 < stop; j0 += BC) {
        int64_t cols = stop - j0 < BC ? stop - j0 : BC;
        bool plain = !biased && j0 >= lo_last && j0 + cols <= hi_first;
        key_tile(j, t, b, h, i0, rows, j0, cols, plain);
    }
    if (p->S > p->R) { /* appended keys: visible to all, unbiased, but capped */
        key_tile(j, t, b, h, i0, rows, p->R, p->S - p->R, p->softcap == 0);
    }
    write_rows(j, t, b, h, i0, rows);
}

static void flash_range(void *arg, int thread, int64_t begin, int64_t end)
{
    const flash_job *j = arg;
    tiles t = tiles_at(j, thread);
    for (int64_t item = begin; item < end; item++) flash_item(j, &t, item);
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
static void store_probs(const probs_job *pj, const tiles *t, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                        int64_t cols)
{
    const mha__attn_plan *p = pj->f.p;
    const mha_tensor *pr = pj->probs;
    bool add = pj->average && h > 0;
    for (int64_t r = 0; r < rows; r++) {
        int64_t at = (b * p->Hq + h) * p->L + i0 + r;
        float max = pj->f.stats->max[at], sum = pj->f.stats->sum[at];
        float s[BC];
        for (int64_t c = 0; c < cols; c++) s[c] = t->st[c * BR + r]; /* back to query-major */
        if (sum > 0) {
            pj->f.kt->exp_shift(s, cols, max);
            pj->f.kt->scale(s, cols, 1.0f / sum);
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
        pack_queries(j, b, h, i0, rows, t->qt);
        for (int64_t j0 = 0; j0 < p->S; j0 += BC) {
            int64_t cols = p->S - j0 < BC ? p->S - j0 : BC;
            score_tile(j, t, b, h, i0, rows, j0, cols, false);
            store_probs(pj, t, b, h, i0, rows, j0, cols);
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
}

bool mha__attn_forward_workspace(const mha__attn_plan *p, const mha_ctx *ctx, int64_t *bytes)
{
    return mha__ws_add_per_thread(bytes, ctx, tiles_floats(p), "the attention tiles");
}

mha_status mha__attn_probs(mha_ctx *ctx, const mha__attn_plan *p, mha_tensor *probs, int average,
                           const mha__row_stats *stats, const mha_tensor *q, const mha_tensor *k)
{
    int64_t br = rows_per_item(p), top = mha__ws_top(ctx);
    probs_job pj = {{p, p->kt, p->bf16 ? p->bk : NULL, br, NULL, NULL, (mha__row_stats *)stats, q, k, NULL, NULL, 0,
                     (p->L + br - 1) / br},
                    probs,
                    average};
    pj.f.scratch = mha__ws_take_per_thread(ctx, tiles_floats(p), &pj.f.scratch_stride);
    if (!pj.f.scratch) return MHA_ERR_INTERNAL;
    mha__parallel_for(ctx, p->B * pj.f.q_blocks, probs_range, &pj);
    mha__ws_release(ctx, top);
    return MHA_OK;
}

mha_status mha__attn_forward(mha_ctx *ctx, const mha__attn_plan *p, mha_tensor *out, float *lse, mha__row_stats *stats,
                             const mha_tensor *q, const mha_tensor *k, const mha_tensor *v)
{
    int64_t br = rows_per_item(p), top = mha__ws_top(ctx);
    flash_job job = {p, p->kt, p->bf16 ? p->bk : NULL, br, out, lse, stats, q, k, v, NULL, 0, (p->L + br - 1) / br};
    job.scratch = mha__ws_take_per_thread(ctx, tiles_floats(p), &job.scratch_stride);
    if (!job.scratch) return MHA_ERR_INTERNAL;
    mha__parallel_for(ctx, p->B * p->Hq * job.q_blocks, flash_range, &job);
    mha__ws_release(ctx, top);
    return MHA_OK;
}
