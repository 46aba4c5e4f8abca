/*
 * kernels.h -- the contract between the portable orchestration code and the
 * per-ISA micro-kernels, and the table that selects them at run time.
 *
 * Only these small, well-specified functions are written per ISA, each in
 * its own file compiled with its own flags (generic.c, avx2.c, avx512.c).
 * Everything else -- tiling, masking, scheduling -- is portable C that
 * calls through the table.  generic.c is the readable statement of what
 * every other implementation computes.
 */
#ifndef MHA_KERNELS_H
#define MHA_KERNELS_H

#include "kernels/exp_poly.h"

#include <math.h>
#include <stdbool.h>
#include <stdint.h>

/* C[m x n] (+)= A[m x k] * B[k x n], the register-tiled core of every
 * matrix product in the library:
 *   A element (i, p) is a[i * a_rs + p * a_cs]   (any strides: row-major
 *                    Q rows, or packed MR-wide panels)
 *   B element (p, j) is b[p * ldb + j]           (rows of n contiguous floats)
 *   C element (i, j) is c[i * ldc + j]
 * with m <= mr and n <= nr of the table; accumulate = 0 overwrites C,
 * 1 adds to it.  Each C element is one chain of multiply-adds over p in
 * increasing order, so a tile's result does not depend on how the caller
 * splits the work.  Reads and writes only the m x n tile (tails are
 * masked, never over-read). */
typedef void (*mha__gemm_tile_fn)(int64_t m, int64_t n, int64_t k, const float *a, int64_t a_rs, int64_t a_cs,
                                  const float *b, int64_t ldb, float *c, int64_t ldc, int accumulate);

/* gemm_tile over an A whose columns come in groups, as head-major
 * activations hold them ([H][rows][d]: the output projection's input, the
 * backward's dQ, dK, dV): with k = groups * gk,
 *   A element (i, p) is a[(p / gk) * a_gs + i * a_rs + p % gk]
 * and everything else as in gemm_tile.  Each C element is still one chain
 * over all k in increasing order: called a group at a time instead, the
 * tile went to memory and back after every gk = d steps, which ran the
 * output projection 8-10% slower than on a row-major input. */
typedef void (*mha__gemm_tile_grouped_fn)(int64_t m, int64_t n, int64_t groups, int64_t gk, const float *a,
                                          int64_t a_rs, int64_t a_gs, const float *b, int64_t ldb, float *c,
                                          int64_t ldc, int accumulate);

/* Rows of A times B in float64, plus bias, rounded to float32 once into
 * rows c[0 .. m-1]: A element (i, p) at a[i * lda + p], B element (p, j)
 * at b[p * ldb + j], bias[j] (NULL: 0).  A and B hold floats widened to
 * float64 (exactly) by the caller, once for all the tiles that read
 * them: widening inside the loop over p cost the conversions and
 * broadcasts half the FMA ports.  B's rows are the table's nr wide,
 * and the columns from n on are read but never stored (any values).
 * Each C element starts from its bias and adds the products over p in
 * increasing order; every product of two floats is exact in float64 (so
 * a multiply-add rounds as a multiply and an add do), and every kernel
 * gives the same bits.  m <= MHA_EXACT_MR, n <= the table's nr.  The
 * layer's projections where its logits are large (gemm/exact.c). */
typedef void (*mha__gemm_tile_exact_fn)(int64_t m, int64_t n, int64_t k, const double *a, int64_t lda, const double *b,
                                        int64_t ldb, const float *bias, float *const *c);
enum { MHA_EXACT_MR = 6 };

/* One online-softmax step over a tile of scores stored key-major:
 * s[j * lds + i] is the score of query i < rows against key j < cols.
 * The exponentials are taken in base 2 against an anchor: for a row whose
 * maximum is m, a = mha__softmax_anchor(m) = ceil(m log2 e), an integer,
 * and a score s becomes
 *   p = 2^(s log2 e - a)   (y = s log2 e - a by one FMA, rounded once)
 *     = exp(s - m) 2^(m log2 e - a),
 * exp(s - m) times a factor of the row in (1/2, 1], the same for all its
 * keys: the step's own value for a score equal to m.  It cancels in
 * O / l; the lse and a natural sum divide it out (flash.c).  For each
 * query i, with max[i], sum[i] its running statistics:
 *   new_max  = max(max[i], max_j s[j][i])
 *   s[j][i] <- 2^(s[j][i] log2 e - a(new_max))  (0 where s was -inf or
 *                                                 2^y below 2^-126)
 *   scale[i] = 2^(a(max[i]) - a(new_max))    (1 while nothing is visible)
 *   sum[i]   = sum[i] * scale[i] + sum_j s[j][i]
 *   max[i]   = new_max
 * Why base 2 and an integer anchor: y's reduction to [0, 1) is one
 * instruction where exp's is four (exp_poly.h), and the product inside
 * the FMA is exact, so y is rounded once, as s - m was.  (log2 e rounded
 * to float is 1.3e-8 too small in relative terms: a probability relative
 * to the row's largest comes out exp(-1.3e-8 (s - m)) too large, under
 * 1.2e-6 down to the 2^-126 cut; the row's common part cancels in O / l
 * and in the lse.)  scale is an exact power of two, and exactly 1 -- O
 * keeps its bits -- until the maximum passes the next integer in base 2.
 * The caller then rescales output row i by scale[i] and adds P V.  The
 * layout puts queries in vector lanes, so no step needs a horizontal
 * reduction.  A NaN score does not enter the maximum (vmaxps passes over
 * it); its exponential is NaN, so the row's sum is NaN from that step on,
 * and with it the row's output and lse, as a plain softmax gives.
 * Returns whether some score of the tile passes `above` in magnitude
 * (NaN passed over, -inf passing any bound): the forward's test for
 * refining a tile whose scores are its raw ones, none masked
 * (attention.h), taken in the maximum's pass over the tile, where a pass
 * of its own (abs_max) cost 1% of the core.
 *
 * With `reach` (NULL: every key), query i sees only the tile's first
 * reach[i] keys (0 <= reach[i] <= cols): the others count as -inf
 * scores (probability 0, left out of the maximum) and not as large, as
 * if a causal contract had masked them, so a diagonal tile under a
 * causal mask alone needs no contract pass, nor the refinement's pass to
 * find its large scores (flash.c). */
typedef bool (*mha__softmax_step_fn)(float *s, int64_t lds, int64_t rows, int64_t cols, float *max, float *sum,
                                     float *scale, float above, const int64_t *reach);

/* softmax_step's anchor for a row whose maximum is m: ceil(m log2 e), the
 * product rounded to float first (every kernel computes it so). */
static inline float mha__softmax_anchor(float m) { return ceilf(m * MHA_EXP_LOG2E); }

/* The backward pass's step over the same key-major layout: with s[j][i]
 * the recomputed score of query i < rows against key j < cols and dp[j][i]
 * = dO_i . V_j,
 *   p        = exp(s[j][i] - shift[i]) * mul[i]    (0 where s was -inf)
 *   s[j][i]  <- p                                   the probability
 *   dp[j][i] <- p * (dp[j][i] - delta[i])          the score's gradient
 * where delta[i] = dO_i . O_i, and shift/mul restore the forward's
 * normalisation: (lse, 1), or (row max, 1 / row sum) when both were kept. */
typedef void (*mha__softmax_grad_fn)(float *s, float *dp, int64_t lds, int64_t rows, int64_t cols, const float *shift,
                                     const float *mul, const float *delta);

/* Decoding, one query row against rows of cached keys and values:
 *   dot_rows:  s[j] = sum_c q[c] k[j * ldk + c]            for j < n
 *   axpy_rows: o[c] += sum_j p[j] v[j * ldv + c], j in order, for c < d
 * Each output is one chain in index order (the same bits for any split
 * of the work that keeps these calls whole). */
typedef void (*mha__dot_rows_fn)(const float *k, int64_t ldk, int64_t n, const float *q, int64_t d, float *s);
typedef void (*mha__axpy_rows_fn)(const float *p, const float *v, int64_t ldv, int64_t n, int64_t d, float *o);

/* The same for 1 .. MHA_ROWS_AT_ONCE query rows at once, q[r] and s[r]
 * (dot), p[r] and o[r] (axpy) for row r < rows, which share each key's
 * and value's loads: every output the bits dot_rows and axpy_rows give
 * it.  So too for int8 and bf16 rows below; NULL in a table: a call of
 * the one-row kernel per row. */
enum { MHA_ROWS_AT_ONCE = 4 };
typedef void (*mha__dot_rows_multi_fn)(const float *k, int64_t ldk, int64_t n, int rows, const float *const *q,
                                       int64_t d, float *const *s);
typedef void (*mha__axpy_rows_multi_fn)(int rows, const float *const *p, const float *v, int64_t ldv, int64_t n,
                                        int64_t d, float *const *o);

/* The same two over an int8 cache, each row stored as integers with one
 * float scale (the row's value is scale[j] * k[j * ldk + c]), dequantised
 * in registers, never copied out:
 *   dot_rows_i8:  s[j] = scale[j] * sum_c q[c] k[j * ldk + c]
 *   axpy_rows_i8: o[c] += sum_j (p[j] scale[j]) v[j * ldv + c], j in order
 * Each product q[c] * k is exact but for one rounding (an int8 is exact
 * in float32); sums as in dot_rows and axpy_rows. */
typedef void (*mha__dot_rows_i8_fn)(const int8_t *k, int64_t ldk, int64_t n, const float *scale, const float *q,
                                    int64_t d, float *s);
typedef void (*mha__axpy_rows_i8_fn)(const float *p, const float *scale, const int8_t *v, int64_t ldv, int64_t n,
                                     int64_t d, float *o);
typedef void (*mha__dot_rows_i8_multi_fn)(const int8_t *k, int64_t ldk, int64_t n, const float *scale, int rows,
                                          const float *const *q, int64_t d, float *const *s);
typedef void (*mha__axpy_rows_i8_multi_fn)(int rows, const float *const *p, const float *scale, const int8_t *v,
                                           int64_t ldv, int64_t n, int64_t d, float *const *o);

/* out[i] = sum_p a[i * a_rs + p * a_cs] b[i * b_rs + p * b_cs] for i < rows,
 * p < k: each one chain of multiply-adds from 0 in p order, the arithmetic
 * of one gemm_tile element.  The backward's delta_i = dO_i . O_i, which
 * must equal dP_ij = dO_i . V_j to the bit where O_i = V_j (a row that
 * sees one key), so that dP - delta is exactly 0 there. */
typedef void (*mha__pair_dots_fn)(int64_t rows, int64_t k, const float *a, int64_t a_rs, int64_t a_cs, const float *b,
                                  int64_t b_rs, int64_t b_cs, float *out);

/* dst[c * ldd + r] = alpha * src[r * lds + c] for r < rows, c < cols:
 * rows of queries scaled and turned into columns (queries in lanes), the
 * B operand of the score tile; with alpha 1, a weight's rows turned into
 * the FMA GEMM's panels (gemm.c).  One multiply an element: the same bits
 * in every kernel. */
typedef void (*mha__transpose_scaled_fn)(float *dst, int64_t ldd, const float *src, int64_t lds, int64_t rows,
                                         int64_t cols, float alpha);

/* x[i] *= alpha for i < n. */
typedef void (*mha__scale_fn)(float *x, int64_t n, float alpha);

/* x[i] = exp(x[i] - shift) for i < n (0 where x[i] is -inf), with the same
 * exp as softmax_step. */
typedef void (*mha__exp_shift_fn)(float *x, int64_t n, float shift);

/* top[i] = max(top[i], max_j |s[j * lds + i]|) for i < rows, j < cols,
 * over a key-major tile as softmax_step's (queries in lanes); NaN scores
 * are passed over.  Which rows' raw scores are large enough to need
 * refining (attention.h). */
typedef void (*mha__abs_max_fn)(const float *s, int64_t lds, int64_t rows, int64_t cols, float *top);

/* For rows i < rows of a key-major tile as softmax_step's (queries in
 * lanes), over keys c < cols in order: sum[i] += s[c * lds + i] and, with
 * w (else NULL), wsum[i] += w[c * lds + i], both in float64; top[i] =
 * max(top[i], s[c * lds + i]), passing over NaN.  Each sum one float64
 * chain in key order: the same bits in every kernel.  The backward's row
 * sums of p and p dP (flash_bwd.c). */
typedef void (*mha__key_sums_fn)(const float *s, const float *w, int64_t lds, int64_t rows, int64_t cols, double *sum,
                                 double *wsum, float *top);

/* sums[i] += x[r * ldx + i] for i < n, over rows r < rows in order: each
 * sum one float32 chain in row order, the same bits in every kernel.  A
 * bias's gradient, the column sums of dY (gemm.c). */
typedef void (*mha__column_sums_fn)(const float *x, int64_t ldx, int64_t rows, int64_t n, float *sums);

/* out[r] = sum_c x[r * ld + c]^2 for r < rows, c < n, in float64 and in
 * one order: lane c % 8 of eight partial sums takes c in turn (c < n / 8
 * * 8), the tail is summed from 0, then lanes 0 to 7 are added to it.
 * Each square is exact in float64 (a multiply-add rounds as a multiply
 * and an add do), so every kernel gives the same bits.  Rows' norms for
 * the refinement's decision (attention.h), which every pass must take
 * alike. */
typedef void (*mha__norm2_fn)(const float *x, int64_t ld, int64_t rows, int64_t n, double *out);

/* dst[i] = src[i * cs] in float64 (exact) for i < n: operands widened
 * once for the float64 products that read them many times
 * (gemm_tile_exact). */
typedef void (*mha__widen_fn)(double *dst, const float *src, int64_t cs, int64_t n);

/* out[i] = sum_c a[c] b[idx[i] * ldb + c] for i < n, c < d, in float64
 * in norm2's order: each product is exact, so every kernel gives the same
 * bits, whatever n and whichever rows come with it (and a . b = b . a to
 * the bit).  A key against the query rows whose scores of it are refined
 * (attention.h), several at a time. */
typedef void (*mha__dots_f64_fn)(const float *a, const float *b, int64_t ldb, const int64_t *idx, int64_t n, int64_t d,
                                 double *out);

/* out[c * ldo + r] = sum_x k[c * ldk + x] qd[x * ldq + r] for c < cols,
 * r < rows, x < d, in float64 in norm2's order, where qd holds float32
 * values widened (each product exact): the same bits as dots_f64 of key
 * c against those rows.  Keys against a block of query rows kept
 * transposed in float64 (mha__score_source), the rows in vector lanes,
 * a few rows at a time against every key, so that their panel stays in
 * L1: one multiply-add a product, where dots_f64 widens both operands and
 * adds up each result's lanes. */
typedef void (*mha__dots_f64_panel_fn)(const float *k, int64_t ldk, int64_t cols, const double *qd, int64_t ldq,
                                       int64_t rows, int64_t d, double *out, int64_t ldo);

/* For r < n: x[r] = (float)(dot[r] * scale - shift[r]) where marked[r]
 * and x[r] > near[r] (a NaN x never), else x[r] - shift[r]: a column of
 * a tile's scores shifted, those that are refined from their float64 dot
 * products, under a contract that is the scale alone
 * (mha__shift_tile).  A multiply and a subtract, each rounded, then the
 * rounding to float: the same bits in every kernel. */
typedef void (*mha__shift_refined_fn)(float *x, const double *dot, const bool *marked, const float *near,
                                      const float *shift, int64_t n, double scale);

/* For r < n: x[r] -= shift[r], and the r where marked[r] and x[r] > near[r]
 * beforehand (a NaN x never) listed in order in picked[], their count
 * returned: a column of a tile's scores shifted, with the rows whose
 * scores are refined found (mha__shift_tile), without a branch on each. */
typedef int64_t (*mha__shift_pick_fn)(float *x, const bool *marked, const float *near, const float *shift, int64_t n,
                                      int64_t *picked);

/* For r < rows of a key-major tile (queries in lanes): top[r] = the
 * largest s[c * lds + r] over c < cols and at[r] = its first c, NaN
 * passed over (-inf and -1 where no score is above -inf).  Where
 * mha__shift_tile's refined rows anchor; at large logits a branch per
 * score on whether it is the largest so far was a coin toss. */
typedef void (*mha__row_max_fn)(const float *s, int64_t lds, int64_t rows, int64_t cols, float *top, int32_t *at);

/* sum_c a[c * as] b[c * bs] for c < n in float64 in norm2's order: the
 * generic kernels' arithmetic, and the one for strided rows. */
double mha__dot_f64_ordered(const float *a, int64_t as, const float *b, int64_t bs, int64_t n);

/* Runs `iterations` rounds of independent multiply-adds on registers (no
 * memory traffic) and returns the floating-point operations done: the
 * measure of this ISA's peak. */
typedef double (*mha__peak_fn)(int64_t iterations);

typedef struct mha__kernels {
    const char *name; /* "generic", "avx2", "avx512" */
    int mr, nr;       /* gemm_tile's largest m and n */
    /* Float32 query rows below which splitting the keys over the threads
     * (attn/decode.c) beats these tiles (attn/flash.c): a kv head per
     * query head, and kv heads shared (attn/plan.c says why they differ). */
    int split_k_rows, split_k_rows_shared;
    mha__gemm_tile_fn gemm_tile;
    mha__gemm_tile_grouped_fn gemm_tile_grouped;
    mha__gemm_tile_exact_fn gemm_tile_exact;
    mha__softmax_step_fn softmax_step;
    mha__softmax_grad_fn softmax_grad;
    mha__dot_rows_fn dot_rows;
    mha__axpy_rows_fn axpy_rows;
    mha__dot_rows_multi_fn dot_rows_multi;
    mha__axpy_rows_multi_fn axpy_rows_multi;
    mha__dot_rows_i8_multi_fn dot_rows_i8_multi;
    mha__axpy_rows_i8_multi_fn axpy_rows_i8_multi;
    mha__dot_rows_i8_fn dot_rows_i8;
    mha__axpy_rows_i8_fn axpy_rows_i8;
    /* The same sums (the same bits), prefetching rows ahead, for caches
     * whose rows stream from far away (attn/plan.c; NULL: the plain ones
     * serve). */
    mha__dot_rows_fn dot_rows_far;
    mha__axpy_rows_fn axpy_rows_far;
    mha__dot_rows_i8_fn dot_rows_i8_far;
    mha__axpy_rows_i8_fn axpy_rows_i8_far;
    mha__dot_rows_multi_fn dot_rows_multi_far;
    mha__axpy_rows_multi_fn axpy_rows_multi_far;
    mha__dot_rows_i8_multi_fn dot_rows_i8_multi_far;
    mha__axpy_rows_i8_multi_fn axpy_rows_i8_multi_far;
    mha__pair_dots_fn pair_dots;
    mha__transpose_scaled_fn transpose_scaled;
    mha__scale_fn scale;
    mha__exp_shift_fn exp_shift;
    mha__abs_max_fn abs_max;
    mha__key_sums_fn key_sums;
    mha__column_sums_fn column_sums;
    mha__norm2_fn norm2;
    mha__widen_fn widen;
    mha__dots_f64_fn dots_f64;
    mha__dots_f64_panel_fn dots_f64_panel;
    mha__shift_refined_fn shift_refined;
    mha__row_max_fn row_max;
    mha__shift_pick_fn shift_pick;
    mha__peak_fn peak;
} mha__kernels;

/* The same product in bfloat16 (raw uint16_t bits) with float32
 * accumulation, for the bf16 paths:
 *   A element (i, p) at a[i * a_rs + (p / 2) * a_ps + p % 2]: values come
 *     in pairs along k (row-major rows have a_ps = 2, the fast layout for
 *     AMX, which loads whole tiles of them); k even
 *   B in pairs of rows: element (p, j) at b[(p / 2) * ldb + 2 * j + p % 2]
 *   C float32, as in gemm_tile; accumulate = 1 adds to C.
 * Each product of two bf16 values is exact in float32; the sums round as
 * float32 in p order, pairwise (p, p+1) as the AVX512-BF16 and AMX dot
 * product instructions do, which also treat denormal inputs and results
 * as 0.  A tile takes m <= MHA_BF16_MR, n <= MHA_BF16_NR; a table's gemm
 * takes any m and n (a tile ISA's gemm is mha__bf16_gemm_tiled over its
 * tile), and each C element's chain is the same whatever m and n are. */
typedef void (*mha__gemm_tile_bf16_fn)(int64_t m, int64_t n, int64_t k, const uint16_t *a, int64_t a_rs, int64_t a_ps,
                                       const uint16_t *b, int64_t ldb, float *c, int64_t ldc, int accumulate);
typedef mha__gemm_tile_bf16_fn mha__gemm_bf16_fn;

/* dst[i] = bf16(src[i]), round to nearest even, for i < n. */
typedef void (*mha__bf16_round_fn)(uint16_t *dst, const float *src, int64_t n);

/* dst[2i] = bf16(x0[i]), dst[2i + 1] = bf16(x1[i]) (0 when x1 is NULL), for
 * i < n: two rows interleaved into the pairs the tile reads. */
typedef void (*mha__bf16_pairs_fn)(uint16_t *dst, const float *x0, const float *x1, int64_t n);

/* dst[r * ldd + c] = bf16(src[c * lds + r]) for r < rows, c < cols: a
 * key-major tile of probabilities (queries in lanes, as softmax_step
 * leaves it) rounded into rows of keys, the A operand of P V (a_ps = 2). */
typedef void (*mha__bf16_transpose_fn)(uint16_t *dst, int64_t ldd, const float *src, int64_t lds, int64_t rows,
                                       int64_t cols);

/* sum[r] += p[r * ld + c] summed over c < cols, for r < rows: the
 * probabilities as transpose rounded them into P V's rows, added up so
 * that a bf16 output divides by the sum of the very weights it was built
 * from (flash.c).  Exact products by 1, float32 sums in an order fixed by
 * each table (the same bits for any thread count). */
typedef void (*mha__bf16_row_sums_fn)(const uint16_t *p, int64_t ld, int64_t rows, int64_t cols, float *sum);

/* dot_rows and axpy_rows with keys and values stored as bf16 (a bf16 KV
 * cache); q, s, p and o stay float32, products exact, sums float32. */
typedef void (*mha__dot_rows_bf16_fn)(const uint16_t *k, int64_t ldk, int64_t n, const float *q, int64_t d, float *s);
typedef void (*mha__axpy_rows_bf16_fn)(const float *p, const uint16_t *v, int64_t ldv, int64_t n, int64_t d, float *o);
typedef void (*mha__dot_rows_bf16_multi_fn)(const uint16_t *k, int64_t ldk, int64_t n, int rows, const float *const *q,
                                            int64_t d, float *const *s);
typedef void (*mha__axpy_rows_bf16_multi_fn)(int rows, const float *const *p, const uint16_t *v, int64_t ldv, int64_t n,
                                             int64_t d, float *const *o);

enum { MHA_BF16_MR = 12, MHA_BF16_NR = 32 };

/* Float32 products from bf16 parts ("split" products, AMX only).  Every
 * finite float32 x is exactly hi + mid + lo, three bf16 values with
 * |mid| <= 2^-8 |x| and |lo| <= 2^-16 |x|; of the nine products of two
 * such sums, the six down to the 2^-16 level (hi hi, hi mid, mid hi,
 * hi lo, lo hi, mid mid) leave out at most about 2^-23 |a b| in all, so a
 * dot product of split operands is as accurate as float32's own, at the
 * bf16 units' rate (docs/NUMERICS.md).
 *
 * The fillers below return false if a value is not finite (an
 * infinity's parts would turn inf * w into inf - inf; the caller then
 * takes the float32 path).  split_rows_tile and split_pairs_tile round hi
 * (and mid) to nearest even, or truncate where that rounding would
 * overflow to infinity.
 *
 * The split product's operands are whole tiles (amx_bf16.c), each 16 rows
 * of 32 bf16 values of k, one tile per part, parts in the order hi, mid,
 * lo, MHA_SPLIT_TILE values apart; a row tile of A (16 rows) or a column
 * tile of B (16 columns) is k_blocks blocks of 32 values of k, so
 * MHA_SPLIT_TILE * 3 * k_blocks values long:
 *   A  row i, value c of block b, part q: tile[(b * 3 + q) * MHA_SPLIT_TILE + i * 32 + c]
 *   B  column j, the same value:       tile[(b * 3 + q) * MHA_SPLIT_TILE + (c / 2) * 32 + 2 * j + c % 2]
 * gemm_split adds to C (row-major, ldc floats a row; `accumulate`
 * MHA_SPLIT_ADD), or stores in C (MHA_SPLIT_STORE), the product X of
 * 2 * row_pairs row tiles of A, a_run values apart (3 * k_blocks *
 * MHA_SPLIT_TILE, or more: the first k_blocks blocks of longer tiles),
 * with two column tiles of B, one after the other: C rows 0 .. 32 row_pairs - 1, columns 0 .. 31; or
 * (MHA_SPLIT_SCALE_ADD) scales C's column j by col_scale[j] first, then
 * adds X: C = C * col_scale + X, a multiply and an add, each rounded
 * (col_scale is read in that mode only; NULL otherwise); or
 * (MHA_SPLIT_BIAS_ADD) C = b + X with col_scale as b, C's 32 columns'
 * bias (NULL: zeros), the bits MHA_SPLIT_ADD leaves in a C first set to
 * b (a sum of -0 added to zeros becomes +0), without reading C: a
 * projection's output, or a weight gradient's first chunk, where setting
 * C first cost a pass over it.  Each C element
 * is one float32 chain in a fixed order from zero, added to C once (or
 * stored), whatever the caller's blocking.  The
 * tiles stay configured from one gemm_split to the next on a thread until
 * split_release, which a caller makes when its run of calls ends.
 *
 * split_rows_tile fills the three part tiles at `tiles` (MHA_SPLIT_TILE
 * values apart) from live <= 16 rows of src, lds floats apart, n <= 32
 * values each, one tile row a row (A's layout for k along src's rows);
 * split_pairs_tile from live <= 32 rows of src, n <= 16 values each, two
 * rows a tile row as pairs (B's layout for k down src's columns).  Zeros
 * past them; false if a value is not finite.  split_unit_pairs_tile is
 * split_pairs_tile for values in [0, 1] (probabilities), unchecked: its
 * lo part truncated, off by at most 2^-24 of the value.
 * split_near_rows_tile and split_near_pairs_tile are split_rows_tile and
 * split_pairs_tile with hi and mid rounded half away from zero (two
 * operations, not round-to-even's six), false also for a value within
 * half a bf16 step of FLT_MAX (its rounding would overflow): the parts
 * still add up to the value exactly, but are not split_rows_tile's. */
enum { MHA_SPLIT_TILE = 512, MHA_SPLIT_K = 32 };
enum { MHA_SPLIT_STORE, MHA_SPLIT_ADD, MHA_SPLIT_SCALE_ADD, MHA_SPLIT_BIAS_ADD };
/* Each of three part tiles (MHA_SPLIT_TILE values apart) transposed as
 * 16 x 16 pairs: pair j of row i moves to pair i of row j.  Rows of
 * pairs along k (a row tile's rows) become B's tile, pairs of rows
 * (split_pairs_tile) become A's. */
typedef void (*mha__split_transpose_fn)(uint16_t *tiles);
typedef void (*mha__gemm_split_fn)(int64_t row_pairs, int64_t k_blocks, const uint16_t *a, int64_t a_run,
                                   const uint16_t *b, float *c, int64_t ldc, int accumulate, const float *col_scale);
typedef bool (*mha__split_tile_fn)(const float *src, int64_t lds, int64_t live, int64_t n, uint16_t *tiles);
/* Vector work a split product runs while its tiles multiply
 * (gemm_split_beside): step(ctx, i) for i = 0 .. steps - 1, each once and
 * in order, spread over the product's blocks of k; what is left when the
 * products end runs after them.  The tiles multiply on a unit of their
 * own and leave the vector ports idle: one thread's four TDPBF16PS took
 * 22 ns with or without 64 FMAs issued beside them, 24 ns beside 16 rows
 * split from L1 (20 ns alone), where work between two products adds its
 * whole time.  Work that reads and writes beyond L1 competes with the
 * tiles' loads and hides less (docs/PERFORMANCE.md).  A step must not
 * write the product's operands, nor touch C. */
typedef struct mha__side_work {
    void (*step)(void *ctx, int64_t i);
    void *ctx;
    int64_t steps;
} mha__side_work;
typedef void (*mha__gemm_split_beside_fn)(int64_t row_pairs, int64_t k_blocks, const uint16_t *a, int64_t a_run,
                                          const uint16_t *b, float *c, int64_t ldc, int accumulate,
                                          const float *col_scale, const mha__side_work *side);

typedef struct mha__bf16_kernels {
    const char *name; /* "generic", "avx2", "avx512_bf16" or "amx" */
    mha__gemm_bf16_fn gemm;
    mha__bf16_round_fn round;
    mha__bf16_pairs_fn pairs;
    mha__bf16_transpose_fn transpose;
    mha__bf16_row_sums_fn row_sums;
    mha__dot_rows_bf16_fn dot_rows;
    mha__axpy_rows_bf16_fn axpy_rows;
    /* The same sums (the same bits), prefetching rows ahead, for caches
     * that stream from beyond L2 (NULL: the plain ones serve). */
    mha__dot_rows_bf16_fn dot_rows_far;
    mha__axpy_rows_bf16_fn axpy_rows_far;
    /* Up to MHA_ROWS_AT_ONCE rows at once, plain and far (NULL: none) */
    mha__dot_rows_bf16_multi_fn dot_rows_multi, dot_rows_multi_far;
    mha__axpy_rows_bf16_multi_fn axpy_rows_multi, axpy_rows_multi_far;
    mha__peak_fn peak; /* the bf16 multiply-add peak (NULL: same as float32) */
    /* Float32 products from split parts (NULL: none on this ISA). */
    mha__split_transpose_fn split_transpose;
    mha__split_tile_fn split_rows_tile, split_pairs_tile;
    void (*split_unit_pairs_tile)(const float *src, int64_t lds, int64_t live, int64_t n, uint16_t *tiles);
    mha__split_tile_fn split_near_rows_tile, split_near_pairs_tile;
    mha__gemm_split_fn gemm_split;
    mha__gemm_split_beside_fn gemm_split_beside; /* gemm_split with side work (NULL: none on this ISA) */
    void (*split_release)(void);
} mha__bf16_kernels;

extern const mha__bf16_kernels mha__bf16_kernels_generic;
#if defined(__x86_64__) || defined(__i386__)
extern const mha__bf16_kernels mha__bf16_kernels_avx512;
/* AMX tiles for the products (amx_bf16.c), AVX512-BF16 for the rest. */
extern const mha__bf16_kernels mha__bf16_kernels_amx;
void mha__bf16_gemm_amx(int64_t m, int64_t n, int64_t k, const uint16_t *a, int64_t a_rs, int64_t a_ps,
                        const uint16_t *b, int64_t ldb, float *c, int64_t ldc, int accumulate);
double mha__bf16_peak_amx(int64_t iterations);
void mha__split_transpose_amx(uint16_t *tiles);
void mha__gemm_split_amx(int64_t row_pairs, int64_t k_blocks, const uint16_t *a, int64_t a_run, const uint16_t *b,
                         float *c, int64_t ldc, int accumulate, const float *col_scale);
void mha__gemm_split_beside_amx(int64_t row_pairs, int64_t k_blocks, const uint16_t *a, int64_t a_run,
                                const uint16_t *b, float *c, int64_t ldc, int accumulate, const float *col_scale,
                                const mha__side_work *side);
bool mha__split_rows_tile_amx(const float *src, int64_t lds, int64_t live, int64_t n, uint16_t *tiles);
bool mha__split_pairs_tile_amx(const float *src, int64_t lds, int64_t live, int64_t n, uint16_t *tiles);
void mha__split_unit_pairs_tile_amx(const float *src, int64_t lds, int64_t live, int64_t n, uint16_t *tiles);
bool mha__split_near_rows_tile_amx(const float *src, int64_t lds, int64_t live, int64_t n, uint16_t *tiles);
bool mha__split_near_pairs_tile_amx(const float *src, int64_t lds, int64_t live, int64_t n, uint16_t *tiles);
void mha__split_release_amx(void);
/* AVX2 without native bf16 dot products: its own cache rows (dot_rows,
 * axpy_rows: a bf16 KV cache decodes at the speed of its bytes), the
 * portable tile, round and pairs below. */
extern const mha__bf16_kernels mha__bf16_kernels_avx2;
#endif

/* A whole product as tiles of MHA_BF16_MR x MHA_BF16_NR, for the ISAs
 * whose kernel is a register tile. */
void mha__bf16_gemm_tiled(mha__gemm_tile_bf16_fn tile, int64_t m, int64_t n, int64_t k, const uint16_t *a, int64_t a_rs,
                          int64_t a_ps, const uint16_t *b, int64_t ldb, float *c, int64_t ldc, int accumulate);

/* generic.c's bf16 product, rounding, pairing, transposing and sums, for tables
 * that have no faster ones. */
void mha__bf16_gemm_generic(int64_t m, int64_t n, int64_t k, const uint16_t *a, int64_t a_rs, int64_t a_ps,
                            const uint16_t *b, int64_t ldb, float *c, int64_t ldc, int accumulate);
void mha__bf16_round_generic(uint16_t *dst, const float *src, int64_t n);
void mha__bf16_pairs_generic(uint16_t *dst, const float *x0, const float *x1, int64_t n);
void mha__bf16_transpose_generic(uint16_t *dst, int64_t ldd, const float *src, int64_t lds, int64_t rows, int64_t cols);
void mha__bf16_row_sums_generic(const uint16_t *p, int64_t ld, int64_t rows, int64_t cols, float *sum);

/* One instruction set's kernels for each dtype the library computes in. */
typedef struct mha__isa_kernels {
    const mha__kernels *f32;
    const mha__bf16_kernels *bf16;
} mha__isa_kernels;

/* The kernels for this CPU, chosen once (thread-safe) from one table of
 * instruction sets: the best ISA the CPU and the OS support, or the one
 * named by MHA_ISA=generic|avx2|avx512 if the CPU can run it; its bf16
 * kernels are "avx512_bf16" when that ISA is avx512 and the CPU has
 * AVX512-BF16, "avx2" when it is avx2, else "generic".  Never NULL.  A plan (or a layer, for its
 * weights) takes them once; kernels_get and bf16_get are its parts. */
const mha__isa_kernels *mha__isa_get(void);
const mha__kernels *mha__kernels_get(void);
/* One core's L2 cache in bytes (512 KB where the system does not say),
 * for blocking choices: they may change speed, never results. */
int64_t mha__l2_bytes(void);
const mha__bf16_kernels *mha__bf16_get(void);

/* The named bf16 kernels, or NULL if they cannot run here (tests). */
const mha__bf16_kernels *mha__bf16_named(const char *name);

/* A specific table, or NULL if this CPU/OS cannot run it or the name is
 * unknown.  For tests and benchmarks that compare paths. */
const mha__kernels *mha__kernels_named(const char *name);

/* Each ISA file defines its table; cpu.c chooses among them. */
extern const mha__kernels mha__kernels_generic;
extern const mha__kernels mha__kernels_avx2;
extern const mha__kernels mha__kernels_avx512;

#if defined(__x86_64__) || defined(__i386__)
/* avx2.c's kernels that the avx512 table shares. */
void mha__key_sums_avx2(const float *s, const float *w, int64_t lds, int64_t rows, int64_t cols, double *sum,
                        double *wsum, float *top);
void mha__dots_f64_avx2(const float *a, const float *b, int64_t ldb, const int64_t *idx, int64_t n, int64_t d,
                        double *out);
void mha__norm2_avx2(const float *x, int64_t ld, int64_t rows, int64_t n, double *out);
void mha__pair_dots_avx2(int64_t rows, int64_t k, const float *a, int64_t a_rs, int64_t a_cs, const float *b,
                         int64_t b_rs, int64_t b_cs, float *out);
#endif

#endif /* MHA_KERNELS_H */
