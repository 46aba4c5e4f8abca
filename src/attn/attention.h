/*
 * attention.h -- the resolved form of one attention problem, shared by the
 * public mha_attention() and the layer.
 *
 * Every option (scale, softcap, ALiBi, masks, causal alignment, window,
 * GQA, keys appended by the layer) is resolved here once into:
 *   - per query row i, a range [lo, hi) of the R "real" keys it may see,
 *   - per score, an additive bias (ALiBi and masks) on real keys,
 *   - keys R .. S-1 (bias_k/bias_v and zero rows of the layer) that every
 *     row sees without bias,
 * so the kernels only follow that one contract.
 */
#ifndef MHA_ATTENTION_H
#define MHA_ATTENTION_H

#include "core/internal.h"
#include "core/parallel.h"
#include "kernels/kernels.h"

#include <math.h>

/* Which driver runs a forward problem: flash.c's tiles over blocks of
 * query rows, or decode.c's split over chunks of keys (a few query
 * rows).  Chosen by mha__attn_plan_resolve alone. */
typedef enum mha__attn_path { MHA__PATH_TILED, MHA__PATH_SPLIT_K } mha__attn_path;

typedef struct mha__attn_plan {
    /* The problem: filled by the caller. */
    int64_t B, Hq, Hkv, L, S, D, Dv;
    int64_t R; /* keys [0, R) are real: masks, causal, window, ALiBi apply */
    float scale;
    float softcap; /* 0 = off */
    mha_causal causal;
    int64_t window_left, window_right; /* -1 = unbounded */
    const float *alibi;                /* [Hq] or NULL */
    mha_mask masks[2];                 /* over [B, Hq, L, R]; kind NONE = unused */
    /* Positions in a longer sequence (mha_attn_desc's): 0 = this call's own. */
    int64_t query_offset, key_offset, query_total, key_total;
    bool bf16; /* Q, K, V and P rounded to bf16 for the products */
    /* The passes feed a backward: a forward keeping the row statistics for
     * one, or the backward's own.  Few such rows are wide from a lower
     * bound (refined scores, below). */
    bool feeds_backward;
    /* Resolved by mha__attn_plan_resolve. */
    int64_t group;                        /* Hq / Hkv: query heads per kv head */
    const mha__kernels *kt;               /* this CPU's float32 kernels */
    const mha__bf16_kernels *bk;          /* its bf16 kernels, when the products or the K/V rows are bf16; else NULL */
    mha__attn_path path;                  /* the forward's driver */
    int64_t block_rows;                   /* the tiles' query rows per work item (at most MHA__BR, products.h) */
    const struct mha__products *products; /* the tiles' block products in its dtype (products.h) */
    bool split;                           /* they are float32 from split bf16 products (products_split.c) */
    const struct mha__kv_rows *kv_rows;   /* split-K's row operations in the K/V rows' dtype */
    bool kv_far;                          /* ... in their prefetching forms (split-K's far rows: plan.c) */
    bool kv_stream;                       /* the score tiles fetch the next key tile into L2 (plan.c, products.h) */
    int64_t workspace;                    /* bytes the forward takes from the context */
} mha__attn_plan;

/* K and V as a forward reads them: float32 tensors [B, Hkv, S, D] and
 * [B, Hkv, S, Dv]; and, when both store rows contiguously with the same
 * strides (always so in a KV cache), the same rows as `rows`: element
 * (b, g, j, c) at k + b * stride[0] + g * stride[1] + j * stride[2] + c,
 * in `dtype`: F32, BF16, or I8 with a float scale per row (the row's
 * value is scale * the integers), row (b, g, j)'s at k_scale + b *
 * scale_stride[0] + g * scale_stride[1] + j.  A BF16 or I8 cache has only
 * the rows (k.data NULL). */
typedef struct mha__kv_view {
    const void *k, *v; /* NULL: no row view */
    mha_dtype dtype;
    const float *k_scale, *v_scale; /* I8 only */
    int64_t stride[3];
    int64_t scale_stride[2];
    /* The largest squared key norm of each (b, g), at b * Hkv + g
     * (mha__keys_norm2_max), as a cache keeps it or the layer's wide pass
     * found it; NULL: computed from float32 rows. */
    const double *k_norm2_max;
} mha__kv_view;

typedef struct mha__kv {
    mha_tensor k, v;
    mha__kv_view rows;
} mha__kv;

/* Rows j0 .. j0+n of kv head g, batch b, of the view's K (values = false)
 * or V, `width` elements each, as float32 into dst[j * ld + c * inc]:
 * copied, widened from bf16, or dequantised from int8 with each row's
 * scale (the values the cache holds).  For the tiles to read a cache that
 * is not float32, and for mha_kv_cache_read. */
void mha__kv_rows_widen(const mha__kv_view *kv, bool values, int64_t b, int64_t g, int64_t j0, int64_t n, int64_t width,
                        float *dst, int64_t ld, int64_t inc);

/* The K and V of mha_attention(): the tensors, and their row view when
 * their layout has one. */
mha__kv mha__kv_from_tensors(const mha_tensor *k, const mha_tensor *v);

/* Per-row softmax statistics a forward pass can save: the maximum score
 * and the sum of exp(score - max), each [B, Hq, L] contiguous.  lse is
 * max + log(sum); keeping the two apart lets the probabilities be
 * recomputed as exp(s - max) / sum, as accurate as a plain softmax even
 * when scores are large (exp(s - lse) loses |lse| * eps). */
typedef struct mha__row_stats {
    float *max, *sum;
} mha__row_stats;

/* How a backward pass recovers each row's probabilities from the forward:
 * from lse (p = exp(s - lse)), or, more accurately for large scores, from
 * the row max and sum (p = exp(s - max) / sum).  Exactly one of lse and
 * stats.max is set; each is [B, Hq, L]. */
typedef struct mha__row_norm {
    const float *lse;
    const float *max, *sum;
    const float *delta; /* NULL, or each row's sum_j P_ij dP_ij over all its
                           keys, of which the call sees a block (then no
                           row is renormalised over the call's keys) */
    /* NULL, or what the forward found for its wide rows over the same q
     * and k (mha__wide_rows' q_norm2; mha__keys_norm2_max_all's array):
     * the backward then takes them instead of reading Q and K again. */
    const double *q_norm2, *k_norm2_max;
} mha__row_norm;

/* The sizes of one attention problem: batch, query and kv heads, query
 * rows, keys, query/key and value widths. */
typedef struct mha__attn_dims {
    int64_t B, Hq, Hkv, L, S, D, Dv;
} mha__attn_dims;

/* A plan's problem fields from a public descriptor (scale, softcap,
 * causal, window, ALiBi, mask, dtype) and the sizes; INVALID_ARG for a
 * dtype attention does not compute in.  The tensors are the caller's to
 * check. */
mha_status mha__attn_problem(const mha_attn_desc *desc, mha__attn_dims dims, mha__attn_plan *plan);

/* A matrix read through two strides: element (r, c) at data[r * rs + c * cs]. */
typedef struct mha__strided {
    const float *data;
    int64_t rs, cs;
} mha__strided;

/* dst[c * ldd + r] = alpha * x(r, c) for r < rows, c < cols: rows of
 * queries (or of output gradients) turned into the columns a score tile's
 * B operand reads; the kernels' transpose_scaled when x's columns are
 * adjacent.  One multiply an element either way: the same bits. */
void mha__pack_columns(const mha__kernels *kt, float *dst, int64_t ldd, mha__strided x, int64_t rows, int64_t cols,
                       float alpha);

/* Scores where float32 is not enough.
 *
 * A probability is exp(s - m) / l: its relative error is the error of the
 * difference s - m.  A score rounded to float32 is off by up to half an
 * ulp of |s|, 3e-5 at |s| = 500, and any float32 computation of it at
 * least that, so with logits in the hundreds that error dominates the
 * output's, and ours and a float32 reference's are alike in size: nothing
 * then keeps ours within the tolerance rule's factor of the reference's.
 * Which scores are refined is decided per row and per block of
 * MHA_REFINE_KEYS keys (keys 0 to 95, 96 to 191, ...): where a score the
 * row sees in the block passes MHA_REFINE_ABOVE in magnitude, raw (the
 * dot product before softcap and bias: its terms set the float32 error)
 * or, with a bias, after the contract, the block's scores that matter
 * (within MHA_REFINE_NEAR of the row's largest; beyond, exp < 2e-9) are
 * recomputed from the unscaled rows in float64, the contract applied in
 * float64 too, and stored as x = s - anchor, rounded once: near the
 * anchor x is small, and so is its rounding.  The anchor is a float the
 * softmax treats as the row's maximum: the forward's running maximum,
 * raised to the exact maximum of each tile; the backward's and the
 * weights' saved maximum (or lse).  bf16 plans are left alone (their
 * rounding is far larger).  Below the threshold a score's rounding is no
 * larger than the float32 reference's.
 *
 * Every pass decides alike, from scores it computes to the same bits,
 * whatever its tiles: the backward's exp(s - lse) sums to 1 only if its
 * s are the values the forward's lse summed.  A score refined in one pass
 * and not in the other differs by its float32 error (several ulps of a
 * score of 15 whose terms are large), and where that key holds most of
 * a row's weight the difference goes whole into dV and dS, while a
 * float32 reference, normalised from its own scores, cancels it.  The
 * passes once decided per tile (192 keys forward, 96 backward), counting
 * keys a row does not see and the running or saved maximum, and
 * disagreed.
 *
 * A score's size is not all: a float32 dot product errs by about an ulp
 * of its terms' size, not of its result's, and where scale |q| |k| is
 * large (inputs x5 at d = 128 with a window and softcap: scores under 16
 * from terms near 2) a score under the threshold is off as much as a
 * rounded score of 30.  So a row whose largest possible score, scale
 * |q_i| max_j |k_j| (by Cauchy-Schwarz a bound on the sum of each of its
 * dot products' terms' sizes), passes MHA_REFINE_TERMS is "wide": all its
 * blocks are refined.  max_j runs over every key of the kv head, seen or
 * not, and the norms are float64 sums in one order (mha__norms2): every
 * pass, whatever its tiles, and a cache that keeps the maximum as rows
 * arrive, get the same bits.  At 64 it costs nothing where logits are
 * moderate (q, k x2 at d = 64: bound 44, logits to 24, every score near
 * its row's maximum); 32 would also cover a score of 3 whose terms reach
 * 0.25 (bound 38), but even from dots_f64_panel its refined scores cost
 * 1.4-2.1x the forward and backward where logits are moderate (d = 64 and
 * 128, inputs x1.5-x2; docs/NUMERICS.md).
 *
 * Few rows are wide from MHA_REFINE_ABOVE instead: fewer than
 * MHA_REFINE_FEW_ROWS query rows, or fewer than MHA_REFINE_FEW_BATCH_ROWS
 * over the batch, in a plan that feeds a backward, or over at most
 * MHA_REFINE_FEW_KEYS keys in any plan (the whole sequence's, under
 * sequence parallelism).  There a plain float32
 * layer's largest error hangs on a handful of roundings, and by luck it
 * can be a third of ours, while over many rows the two err alike: the
 * W_q and W_k gradients multiply the rounding of q and k by the logits.
 * Refined whole (and the layer then sums their Q and K exactly, wide.c),
 * ours is smaller instead.  The large-logit layers of 1600 seeds missed
 * the rule 26 times on amx and 29 on avx512, none after, every miss with
 * 17 query rows or fewer, the forward's over 3 keys (docs/NUMERICS.md).
 * A forward keeping no statistics over more keys, decoding's above all,
 * keeps 64: few rows over 4096 keys refined whole cost 2.6-6x the
 * attention (bound 35), and those outputs held the rule.  (A decoding
 * step's projections decide from its new rows alone, as ever: layer/wide.c.)
 * The batch's count came in 2026-12-07 (eleventh session): one batch of
 * 33 rows and two of 48 missed by 1.15x and 1.02x (dq; a small scale,
 * bottom-right causal).  It leaves the heads out, which Ulysses splits.
 * Few rows' backward also takes every dP = dO V^T in float64
 * (flash_bwd.c, refine_dp; the same session):
 * a float32 chain over Dv = 128 erred by several ulps of dP, which with a
 * row's probability split between two keys far apart made dq's error
 * twenty times PyTorch's (x10 inputs). */
#define MHA_REFINE_ABOVE 16.0f
#define MHA_REFINE_NEAR  20.0f
#define MHA_REFINE_TERMS 64.0
enum { MHA_REFINE_FEW_ROWS = 32, MHA_REFINE_FEW_BATCH_ROWS = 128, MHA_REFINE_FEW_KEYS = 96 };
enum { MHA_REFINE_MAX_COLS = 256, MHA_REFINE_MAX_ROWS = 192 }; /* the largest tile or chunk */
/* Blocks of keys: a tile of MHA_REFINE_MAX_COLS keys from anywhere meets
 * at most MHA_REFINE_BLOCKS of them. */
enum { MHA_REFINE_KEYS = 96, MHA_REFINE_BLOCKS = (MHA_REFINE_MAX_COLS + MHA_REFINE_KEYS - 2) / MHA_REFINE_KEYS + 1 };

/* Which scores of a tile (rows <= MHA_REFINE_MAX_ROWS, cols <=
 * MHA_REFINE_MAX_COLS) are refined: large[k][r] for row r's keys in the
 * tile's k-th block, any if one is; the tile's first key is key `first`
 * of its block. */
typedef struct mha__refine {
    bool large[MHA_REFINE_BLOCKS][MHA_REFINE_MAX_ROWS];
    int64_t first;
    bool any;
} mha__refine;

/* The flags of the tile's column c, one per row. */
static inline const bool *mha__refine_column(const mha__refine *f, int64_t c)
{
    return f->large[(f->first + c) / MHA_REFINE_KEYS];
}

/* Where the float64 scores of a tile come from: query rows i0 + r at q
 * (unscaled, float32) and key rows j0 + c at k, stored as float32, or as
 * a cache's bf16 or int8 rows (k_cs 1; int8 with a scale per row).  qd,
 * if not NULL, holds the same query rows widened and transposed (row r's
 * element c at qd[c * ldq + r], mha__panel_of): a key's refined scores
 * against many of them then come from dots_f64_panel, the rows in vector
 * lanes, at a fraction of what dots_f64 costs a score (the same bits). */
typedef struct mha__score_source {
    const float *q;
    int64_t q_rs, q_cs;
    const void *k;
    int64_t k_rs, k_cs;
    mha_dtype k_dtype;
    const float *k_scale;
    int64_t b, h, i0, j0;
    const double *qd;
    int64_t ldq;
} mha__score_source;

/* Gives src its panel (above) in qd, ldq doubles a row of it: the rows
 * widened, qd[c * ldq + r] = q[r * q_rs + c * q_cs] for r < rows, c < D,
 * unless *widened says qd holds src's rows already (a work item's tiles
 * after its first; NULL: none yet). */
void mha__panel_of(const mha__attn_plan *p, mha__score_source *src, int64_t rows, double *qd, int64_t ldq,
                   const float **widened);

/* The widening under mha__panel_of, for any float32 rows (few rows' dO
 * too: flash_bwd.c): dst[c * ld + r] = x[r * rs + c * cs] for r < rows,
 * c < width, unless *widened is x already; then *widened = x. */
void mha__widen_panel(const float *x, int64_t rs, int64_t cs, int64_t rows, int64_t width, double *dst, int64_t ld,
                      const float **widened);

/* The source of query rows i0.. of head h, batch b, of a float32 tensor
 * q [B, Hq, L, D], against float32 key rows k (keys j0..). */
mha__score_source mha__score_rows(const mha_tensor *q, int64_t b, int64_t h, int64_t i0, int64_t j0, mha__strided k);

/* out[r] = sum_c x[r * rs + c * cs]^2 for r < rows, c < n, in float64 in
 * kernels.h's norm2 order: the same bits whatever the strides, the kernel
 * set or the caller. */
void mha__norms2(const mha__kernels *kt, const float *x, int64_t rs, int64_t cs, int64_t rows, int64_t n, double *out);

/* The larger of the largest squared norm so far and the next one, v: a
 * NaN, once met, stays (a row holding a NaN makes its head's maximum NaN
 * whatever order its rows come in). */
static inline double mha__norm2_top(double top, double v) { return isnan(top) ? top : v > top || isnan(v) ? v : top; }

/* The largest squared norm of n rows of d values, as mha__norms2 finds
 * them; 0 for none, NaN if a row holds a NaN. */
double mha__rows_norm2_max(const mha__kernels *kt, const float *x, int64_t rs, int64_t cs, int64_t n, int64_t d);

/* The largest squared norm of kv head g's keys [0, S) in batch b: kept by
 * a cache (rows->k_norm2_max), else from the float32 tensor k or the
 * float32 rows (either may be NULL); +inf (every row wide) if neither. */
double mha__keys_norm2_max(const mha__attn_plan *p, const mha__kv_view *rows, const mha_tensor *k, int64_t b,
                           int64_t g);
/* mha__keys_norm2_max of every (b, kv head), at [b * Hkv + g] of B * Hkv
 * doubles taken from ctx's workspace (the caller planned them), found on
 * ctx's threads; NULL when not planned.  The forward, the attention
 * weights and the backward find them once a call, before their items. */
double *mha__keys_norm2_max_all(mha_ctx *ctx, const mha__attn_plan *p, const mha__kv_view *rows, const mha_tensor *k);

/* wide[r] for query rows i0.. of head h (unscaled float32 rows of q)
 * against keys whose largest squared norm is k_norm2_max: whether the row
 * is refined whole (above); true if any is.  q_norm2: all of q's rows'
 * squared norms as mha__norms2 finds them, row (b, h, i) at (b * Hq + h) *
 * L + i, when the caller has them; NULL: found here. */
bool mha__wide_rows(const mha__attn_plan *p, const mha_tensor *q, const double *q_norm2, int64_t b, int64_t h,
                    int64_t i0, int64_t rows, double k_norm2_max, bool *wide); /* rows <= MHA_REFINE_MAX_ROWS */

/* Whether the plan's rows are few (above): wide from MHA_REFINE_ABOVE,
 * and the backward's dP taken in float64 (flash_bwd.c). */
bool mha__refine_few(const mha__attn_plan *p);

/* Whether keys whose largest squared norm is at most k_norm2 leave every
 * query row of squared norm at most q_norm2_max narrow (mha__wide_rows),
 * so that an upper bound on either decides as the exact values would;
 * false for NaN. */
bool mha__none_wide(const mha__attn_plan *p, double q_norm2_max, double k_norm2);

/* f from key-major tile st (st[c * lds + r]) of raw float32 scores,
 * before the contract, for keys j0.. : a block's flag set where a visible
 * score passes MHA_REFINE_ABOVE in magnitude, or for every block of a
 * wide row (wide NULL: none is), never for a bf16 plan.  Real keys
 * outside row r's range [lo[r], hi[r]) are set to 0 first (the contract
 * masks them); appended keys (j0 >= R: a tile holds one kind) and lo, hi
 * NULL: every key is visible. */
void mha__refine_raw(const mha__attn_plan *p, float *st, int64_t lds, int64_t rows, int64_t cols, int64_t j0,
                     const int64_t *lo, const int64_t *hi, const bool *wide, mha__refine *f);
/* For a plan with a bias, after the contract: also the blocks where a
 * visible (finite) score passes MHA_REFINE_ABOVE in magnitude. */
void mha__refine_contracted(const mha__attn_plan *p, const float *st, int64_t lds, int64_t rows, int64_t cols,
                            mha__refine *f);

/* Key-major tile st (st[c * lds + r], rows <= MHA_REFINE_MAX_ROWS, cols
 * <= MHA_REFINE_MAX_COLS: now the float32 scores after the contract)
 * rewritten as x = s - anchor[r], the scores that `refine` marks and that
 * lie near the row's largest computed in float64 (and then the cap's
 * slope too, if slope is not NULL).  With `fixed` the anchors are given;
 * else each becomes max(anchor[r], the row's maximum, from its exact
 * score where refined, rounded), so the largest x is about 0.  A row
 * whose anchor is -inf sees nothing and stays at -inf. */
void mha__shift_tile(const mha__attn_plan *p, const mha__score_source *src, float *st, int64_t lds, int64_t rows,
                     int64_t cols, float *anchor, bool fixed, const mha__refine *refine, float *slope);

/* Checks a plan's sizes and options (not its tensors); INVALID_ARG names
 * the offending field. */
mha_status mha__attn_plan_check(const mha__attn_plan *plan);

/* What the choice of driver depends on besides the problem itself. */
typedef struct mha__attn_needs {
    bool kv_rows;       /* K and V have a row view (mha__kv.rows is set) */
    mha_dtype kv_dtype; /* ... stored as F32, or BF16 or I8 (a cache) */
    bool stats;         /* the caller wants the row statistics */
} mha__attn_needs;

mha__attn_needs mha__attn_needs_of(const mha__kv *kv, bool stats);

/* Completes a plan whose problem fields are filled, to run on ctx: checks
 * it, picks the kernels, the forward's driver (the one place that
 * chooses: split-K for fewer than MHA_DECODE_ROWS (float32 rows: the
 * kernel table's split_k_rows) query rows when no row statistics are
 * wanted and the rows allow it;
 * else tiles) and sizes its workspace.  INVALID_ARG. */
mha_status mha__attn_plan_resolve(mha__attn_plan *plan, const mha_ctx *ctx, mha__attn_needs needs);

/* For tests: the bytes of K and V a head must pass for plans to take
 * kv_stream (default twice L2; negative: the default again; 0: every
 * float32 tiled plan).  Set it before plans are made and while no call
 * runs. */
void mha__kv_stream_min_bytes(int64_t bytes);

/* Below this many query rows, a forward splits the keys over the threads
 * (decode.c) instead of the query rows (flash.c); over float32 K and V
 * below the kernel table's split_k_rows, at most this (plan.c says
 * why). */
enum { MHA_DECODE_ROWS = 16 };

/* out [B, Hq, L, Dv] (and lse [B, Hq, L], stats, if not NULL; stats only
 * with want_stats) from q [B, Hq, L, D] and kv, by the plan's driver;
 * shapes already validated.  q_norm2: q's rows' squared norms when the
 * caller has them (mha__wide_rows), else NULL.  Takes plan->workspace
 * bytes of workspace. */
mha_status mha__attn_run(mha_ctx *ctx, const mha__attn_plan *plan, mha_tensor *out, float *lse, mha__row_stats *stats,
                         const mha_tensor *q, const double *q_norm2, const mha__kv *kv);

/* The tiled forward (flash.c) and its workspace. */
mha_status mha__attn_forward(mha_ctx *ctx, const mha__attn_plan *plan, mha_tensor *out, float *lse,
                             mha__row_stats *stats, const mha_tensor *q, const double *q_norm2, const mha__kv *kv);
bool mha__attn_forward_workspace(const mha__attn_plan *plan, const mha_ctx *ctx, int64_t *bytes);

/* The split-K forward (decode.c) and its workspace: the plan's options
 * (causal, window, softcap, ALiBi, masks) apply as in mha__attn_forward;
 * it must have no appended keys (R == S) and D == Dv. */
mha_status mha__decode_attention(mha_ctx *ctx, const mha__attn_plan *plan, mha_tensor *out, float *lse,
                                 const mha_tensor *q, const mha__kv_view *kv);
bool mha__decode_workspace(const mha__attn_plan *plan, const mha_ctx *ctx, int64_t *bytes);

/* Softmax probabilities recomputed from the statistics a forward pass
 * saved: p = exp(score - max) / sum, written to probs [B, Hq, L, S], or
 * summed over heads and divided by Hq into probs [B, 1, L, S] when
 * `average`.  O(S) scratch per thread, no L x S buffer. */
mha_status mha__attn_probs(mha_ctx *ctx, const mha__attn_plan *plan, mha_tensor *probs, int average,
                           const mha__row_stats *stats, const mha_tensor *q, const mha_tensor *k);
/* Its workspace: the same as the tiled forward's. */

/* Gradients of the attention forward (flash-attention 2's recomputation,
 * without atomics): given its inputs, its output `out` and the row
 * normalisation it saved, and dout = dL/dout, writes dq, dk, dv
 * (overwriting; with GQA, dk and dv sum over each group's query heads in
 * head order).  Keys R .. S-1 get their gradients like any other.  float32
 * plans only.  dq may be the same memory as out, dk as k and dv as v (the
 * layer saves memory so): out is read (for dO.O) before dq is written, and
 * each key block's K and V rows are read only by the work item that then
 * writes that block's dK and dV, after the pass that reads all of them.
 * NOMEM. */
mha_status mha__attn_backward(mha_ctx *ctx, const mha__attn_plan *plan, mha_tensor *dq, mha_tensor *dk, mha_tensor *dv,
                              const mha_tensor *q, const mha_tensor *k, const mha_tensor *v, const mha_tensor *out,
                              const mha_tensor *dout, const mha__row_norm *norm);
/* Its workspace, given whether dq's rows are contiguous (dQ then
 * accumulates in place). */
bool mha__attn_backward_workspace(const mha__attn_plan *plan, const mha_ctx *ctx, bool dq_contiguous, int64_t *bytes);

/* Over the plan's keys, each row's sum of p and of p dP (float64, key
 * order), p from norm's max and sum (mha_attention_backward_row_sums).
 * Workspace: mha__attn_backward_workspace's. */
void mha__attn_row_sums(mha_ctx *ctx, const mha__attn_plan *plan, const mha_tensor *q, const mha_tensor *k,
                        const mha_tensor *v, const mha_tensor *dout, const mha__row_norm *norm, double *p_sum,
                        double *p_dp);

/* The row contract, in one place for every kernel:
 * the real keys [*lo, *hi) that query row i may see under causal masking
 * and the window (empty when *lo >= *hi; both grow with i), ... */
void mha__row_key_range(const mha__attn_plan *plan, int64_t i, int64_t *lo, int64_t *hi);
/* ... and the additive bias of real key j for (batch b, head h, row i):
 * ALiBi plus the masks, -inf where a keep-mask forbids the key. */
float mha__real_key_bias(const mha__attn_plan *plan, int64_t b, int64_t h, int64_t i, int64_t j);
/* Applies the row contract to a key-major tile of raw scores,
 * st[c * lds + r] = (scale q_{i0+r}) . k_{j0+c} for (batch b, head h):
 * softcap, then the bias, and -inf outside row r's range [lo[r], hi[r]).
 * With softcap and cap_slope non-NULL, also stores d(capped)/d(raw) =
 * 1 - tanh^2 at the same places (for visible scores). */
void mha__score_contract(const mha__attn_plan *plan, float *st, int64_t lds, int64_t b, int64_t h, int64_t i0,
                         int64_t rows, int64_t j0, int64_t cols, const int64_t *lo, const int64_t *hi,
                         float *cap_slope);
/* Is mha__real_key_bias ever non-zero (ALiBi or a mask present)? */
bool mha__plan_has_bias(const mha__attn_plan *plan);

#endif /* MHA_ATTENTION_H */
