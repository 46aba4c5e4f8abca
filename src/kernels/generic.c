/*
 * generic.c -- the portable kernels: plain C, no intrinsics.  This is the
 * documentation of what the SIMD kernels compute; they must agree with it
 * within the tolerance rule.  One difference: its dot products (gemm_tile,
 * pair_dots) sum in double (dot_wide), where the SIMD tiles chain float
 * FMAs.  Without FMA, a float chain rounds each product and each sum, and
 * the backward's dP = dO . V over 128 values erred by 12 ulps where
 * PyTorch's float32 erred by 1-2 (bench/accuracy_sweep.py case 324 on
 * Zen 4: dk 1.13x the rule's limit).  Summed in double: 1-3 ulps.  The
 * tiles take B a row at a time (row_dots_wide), which made the generic
 * core 2.3-3.8x faster than going down B's columns, with the same bits.
 */
#include "core/convert.h"
#include "kernels/kernels.h"

#include <math.h>

enum { GENERIC_MR = 4, GENERIC_NR = 16 };

/* sum_p a[p * a_step] b[p * b_step] for p < k in double: each product
 * exact (24-bit by 24-bit significands), the sum's error k 2^-53 of the
 * terms' magnitudes, so one rounding to float is all a caller sees. */
static double dot_wide(int64_t k, const float *a, int64_t a_step, const float *b, int64_t b_step)
{
    double acc = 0.0;
    for (int64_t p = 0; p < k; p++) acc += (double)a[p * a_step] * (double)b[p * b_step];
    return acc;
}

/* dots[j] = dot_wide(k, a, a_step, b + j, ldb) for j < n <= GENERIC_NR:
 * each sum in double from 0 over p in order, as dot_wide's, so the same
 * bits; but a row of B at a time, read in order, where dot_wide down each
 * column strode ldb floats a product.  A whole row of GENERIC_NR sums in
 * a local array of constant size, which the compiler keeps in registers
 * and vectorises at -O2 too (the default build's; a count of n it left
 * scalar there: the core 1.4-1.5x slower than this). */
static void row_dots_wide(int64_t n, int64_t k, const float *a, int64_t a_step, const float *b, int64_t ldb,
                          double dots[GENERIC_NR])
{
    if (n == GENERIC_NR) {
        double row[GENERIC_NR] = {0};
        for (int64_t p = 0; p < k; p++) {
            double ap = a[p * a_step];
            for (int j = 0; j < GENERIC_NR; j++) row[j] += ap * (double)b[p * ldb + j];
        }
        for (int j = 0; j < GENERIC_NR; j++) dots[j] = row[j];
        return;
    }
    for (int64_t j = 0; j < n; j++) dots[j] = 0.0;
    for (int64_t p = 0; p < k; p++)
        for (int64_t j = 0; j < n; j++) dots[j] += (double)a[p * a_step] * (double)b[p * ldb + j];
}

static void gemm_tile_generic(int64_t m, int64_t n, int64_t k, const float *a, int64_t a_rs, int64_t a_cs,
                              const float *b, int64_t ldb, float *c, int64_t ldc, int accumulate)
{
    double dots[GENERIC_NR];
    for (int64_t i = 0; i < m; i++)
        for (int64_t j0 = 0; j0 < n; j0 += GENERIC_NR) {
            int64_t w = n - j0 < GENERIC_NR ? n - j0 : GENERIC_NR;
            float *ci = c + i * ldc + j0;
            row_dots_wide(w, k, a + i * a_rs, a_cs, b + j0, ldb, dots);
            for (int64_t j = 0; j < w; j++) ci[j] = (float)((accumulate ? ci[j] : 0.0) + dots[j]);
        }
}

static void gemm_tile_grouped_generic(int64_t m, int64_t n, int64_t groups, int64_t gk, const float *a, int64_t a_rs,
                                      int64_t a_gs, const float *b, int64_t ldb, float *c, int64_t ldc, int accumulate)
{
    double dots[GENERIC_NR], acc[GENERIC_NR];
    for (int64_t i = 0; i < m; i++)
        for (int64_t j0 = 0; j0 < n; j0 += GENERIC_NR) {
            int64_t w = n - j0 < GENERIC_NR ? n - j0 : GENERIC_NR;
            float *ci = c + i * ldc + j0;
            for (int64_t j = 0; j < w; j++) acc[j] = accumulate ? ci[j] : 0.0;
            for (int64_t g = 0; g < groups; g++) {
                row_dots_wide(w, gk, a + g * a_gs + i * a_rs, 1, b + g * gk * ldb + j0, ldb, dots);
                for (int64_t j = 0; j < w; j++) acc[j] += dots[j];
            }
            for (int64_t j = 0; j < w; j++) ci[j] = (float)acc[j];
        }
}

/* Each output from its bias, then the products over p in order (each
 * exact: widened floats), as kernels.h orders them; a row of B at a time
 * into a row of sums, as row_dots_wide and for its reasons.  B's rows
 * are the table's nr wide (kernels.h), so every row takes the loop of
 * constant size, the columns from n on summed and never stored. */
static void gemm_tile_exact_generic(int64_t m, int64_t n, int64_t k, const double *a, int64_t lda, const double *b,
                                    int64_t ldb, const float *bias, float *const *c)
{
    for (int64_t i = 0; i < m; i++) {
        double row[GENERIC_NR];
        for (int j = 0; j < GENERIC_NR; j++) row[j] = bias && j < n ? bias[j] : 0.0;
        for (int64_t p = 0; p < k; p++)
            for (int j = 0; j < GENERIC_NR; j++) row[j] += a[i * lda + p] * b[p * ldb + j];
        for (int64_t j = 0; j < n; j++) c[i][j] = (float)row[j];
    }
}

/* As gemm_tile_generic computes one element. */
static void pair_dots_generic(int64_t rows, int64_t k, const float *a, int64_t a_rs, int64_t a_cs, const float *b,
                              int64_t b_rs, int64_t b_cs, float *out)
{
    for (int64_t i = 0; i < rows; i++) out[i] = (float)dot_wide(k, a + i * a_rs, a_cs, b + i * b_rs, b_cs);
}

/* 2^y, 0 below 2^-126 as the vector kernels give it (exp_poly.h). */
static float exp2_flushed(float y) { return y < MHA_EXP2_MIN_INPUT ? 0.0f : exp2f(y); }

static bool softmax_step_generic(float *s, int64_t lds, int64_t rows, int64_t cols, float *max, float *sum,
                                 float *scale, float above, const int64_t *reach)
{
    bool large = false;
    for (int64_t i = 0; i < rows; i++) {
        float top = -INFINITY, bottom = INFINITY;
        int64_t seen = reach ? reach[i] : cols;
        for (int64_t j = 0; j < seen; j++) { /* a NaN score fails both tests: passed over */
            if (s[j * lds + i] > top) top = s[j * lds + i];
            if (s[j * lds + i] < bottom) bottom = s[j * lds + i];
        }
        large = large || top > above || bottom < -above;
        float new_max = top > max[i] ? top : max[i];
        /* A query that still sees nothing takes anchor 0: its -inf
         * scores give 0, a NaN gives NaN. */
        float anchor = new_max == -INFINITY ? 0.0f : mha__softmax_anchor(new_max), block_sum = 0.0f;
        for (int64_t j = 0; j < cols; j++) { /* keys past the reach: -inf's 0, added as a -inf score's is */
            s[j * lds + i] = j < seen ? exp2_flushed(fmaf(s[j * lds + i], MHA_EXP_LOG2E, -anchor)) : 0.0f;
            block_sum += s[j * lds + i];
        }
        scale[i] = new_max == -INFINITY ? 1.0f : exp2_flushed(mha__softmax_anchor(max[i]) - anchor);
        sum[i] = sum[i] * scale[i] + block_sum;
        max[i] = new_max;
    }
    return large;
}

static void softmax_grad_generic(float *s, float *dp, int64_t lds, int64_t rows, int64_t cols, const float *shift,
                                 const float *mul, const float *delta)
{
    for (int64_t j = 0; j < cols; j++)
        for (int64_t i = 0; i < rows; i++) {
            float p = expf(s[j * lds + i] - shift[i]) * mul[i];
            s[j * lds + i] = p;
            dp[j * lds + i] = p * (dp[j * lds + i] - delta[i]);
        }
}

#define ROWS_ELEM     float
#define ROWS_WIDEN(x) (x)
#define ROWS_DOT      dot_rows_generic
#define ROWS_AXPY     axpy_rows_generic
#include "kernels/rows_generic.h"

#define ROWS_ELEM     uint16_t
#define ROWS_WIDEN(x) mha__bf16_to_f32(x)
#define ROWS_DOT      dot_rows_bf16_generic
#define ROWS_AXPY     axpy_rows_bf16_generic
#include "kernels/rows_generic.h"

#define ROWS_SCALED
#define ROWS_ELEM     int8_t
#define ROWS_WIDEN(x) ((float)(x))
#define ROWS_DOT      dot_rows_i8_generic
#define ROWS_AXPY     axpy_rows_i8_generic
#include "kernels/rows_generic.h"

static void column_sums_generic(const float *x, int64_t ldx, int64_t rows, int64_t n, float *sums)
{
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < n; i++) sums[i] += x[r * ldx + i];
}

static void abs_max_generic(const float *s, int64_t lds, int64_t rows, int64_t cols, float *top)
{
    for (int64_t j = 0; j < cols; j++)
        for (int64_t i = 0; i < rows; i++) {
            float a = fabsf(s[j * lds + i]);
            top[i] = a > top[i] ? a : top[i];
        }
}

static void row_max_generic(const float *s, int64_t lds, int64_t rows, int64_t cols, float *top, int32_t *at)
{
    for (int64_t r = 0; r < rows; r++) top[r] = -INFINITY, at[r] = -1;
    for (int64_t c = 0; c < cols; c++)
        for (int64_t r = 0; r < rows; r++)
            if (s[c * lds + r] > top[r]) top[r] = s[c * lds + r], at[r] = (int32_t)c;
}

static int64_t shift_pick_generic(float *x, const bool *marked, const float *near, const float *shift, int64_t n,
                                  int64_t *picked)
{
    int64_t count = 0;
    for (int64_t r = 0; r < n; r++) {
        picked[count] = r;
        count += marked[r] & (x[r] > near[r]);
        x[r] -= shift[r];
    }
    return count;
}

static void key_sums_generic(const float *s, const float *w, int64_t lds, int64_t rows, int64_t cols, double *sum,
                             double *wsum, float *top)
{
    for (int64_t c = 0; c < cols; c++)
        for (int64_t i = 0; i < rows; i++) {
            float p = s[c * lds + i];
            sum[i] += p;
            if (w) wsum[i] += w[c * lds + i];
            top[i] = p > top[i] ? p : top[i];
        }
}

double mha__dot_f64_ordered(const float *a, int64_t as, const float *b, int64_t bs, int64_t n)
{
    double lane[8] = {0}, sum = 0;
    int64_t c = 0;
    for (; c + 8 <= n; c += 8)
        for (int l = 0; l < 8; l++) lane[l] += (double)a[(c + l) * as] * b[(c + l) * bs];
    for (; c < n; c++) sum += (double)a[c * as] * b[c * bs];
    for (int l = 0; l < 8; l++) sum += lane[l];
    return sum;
}

static void norm2_generic(const float *x, int64_t ld, int64_t rows, int64_t n, double *out)
{
    for (int64_t r = 0; r < rows; r++) out[r] = mha__dot_f64_ordered(x + r * ld, 1, x + r * ld, 1, n);
}

static void widen_generic(double *dst, const float *src, int64_t cs, int64_t n)
{
    for (int64_t i = 0; i < n; i++) dst[i] = src[i * cs];
}

static void dots_f64_generic(const float *a, const float *b, int64_t ldb, const int64_t *idx, int64_t n, int64_t d,
                             double *out)
{
    for (int64_t i = 0; i < n; i++) out[i] = mha__dot_f64_ordered(a, 1, b + idx[i] * ldb, 1, d);
}

static void dots_f64_panel_generic(const float *k, int64_t ldk, int64_t cols, const double *qd, int64_t ldq,
                                   int64_t rows, int64_t d, double *out, int64_t ldo)
{
    for (int64_t c = 0; c < cols; c++)
        for (int64_t r = 0; r < rows; r++) {
            const float *a = k + c * ldk;
            double lane[8] = {0}, sum = 0;
            int64_t x = 0;
            for (; x + 8 <= d; x += 8)
                for (int l = 0; l < 8; l++) lane[l] += a[x + l] * qd[(x + l) * ldq + r];
            for (; x < d; x++) sum += a[x] * qd[x * ldq + r];
            for (int l = 0; l < 8; l++) sum += lane[l];
            out[c * ldo + r] = sum;
        }
}

static void shift_refined_generic(float *x, const double *dot, const bool *marked, const float *near,
                                  const float *shift, int64_t n, double scale)
{
    for (int64_t r = 0; r < n; r++)
        x[r] = marked[r] && x[r] > near[r] ? (float)(dot[r] * scale - shift[r]) : x[r] - shift[r];
}

static void transpose_scaled_generic(float *dst, int64_t ldd, const float *src, int64_t lds, int64_t rows, int64_t cols,
                                     float alpha)
{
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) dst[c * ldd + r] = alpha * src[r * lds + c];
}

static void scale_generic(float *x, int64_t n, float alpha)
{
    for (int64_t i = 0; i < n; i++) x[i] *= alpha;
}

static void exp_shift_generic(float *x, int64_t n, float shift)
{
    for (int64_t i = 0; i < n; i++) x[i] = expf(x[i] - shift);
}

static double peak_generic(int64_t iterations)
{
    /* Eight independent chains; volatile keeps the compiler from folding them. */
    volatile float seed = 1.0f;
    float x[8], m = seed * 0.999999f, a = seed * 1e-7f;
    for (int i = 0; i < 8; i++) x[i] = seed + (float)i;
    for (int64_t it = 0; it < iterations; it++)
        for (int i = 0; i < 8; i++) x[i] = x[i] * m + a;
    float sink = 0;
    for (int i = 0; i < 8; i++) sink += x[i];
    seed = sink;
    return 2.0 * 8.0 * (double)iterations;
}

void mha__bf16_gemm_tiled(mha__gemm_tile_bf16_fn tile, int64_t m, int64_t n, int64_t k, const uint16_t *a, int64_t a_rs,
                          int64_t a_ps, const uint16_t *b, int64_t ldb, float *c, int64_t ldc, int accumulate)
{
    for (int64_t i = 0; i < m; i += MHA_BF16_MR)
        for (int64_t j = 0; j < n; j += MHA_BF16_NR) {
            int64_t mt = m - i < MHA_BF16_MR ? m - i : MHA_BF16_MR, nt = n - j < MHA_BF16_NR ? n - j : MHA_BF16_NR;
            tile(mt, nt, k, a + i * a_rs, a_rs, a_ps, b + 2 * j, ldb, c + i * ldc + j, ldc, accumulate);
        }
}

/* Any m and n: the plain loops need no tiling. */
void mha__bf16_gemm_generic(int64_t m, int64_t n, int64_t k, const uint16_t *a, int64_t a_rs, int64_t a_ps,
                            const uint16_t *b, int64_t ldb, float *c, int64_t ldc, int accumulate)
{
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            float acc = accumulate ? c[i * ldc + j] : 0.0f;
            for (int64_t p = 0; p < k; p += 2) {
                const uint16_t *ap = a + i * a_rs + (p / 2) * a_ps, *bp = b + (p / 2) * ldb + 2 * j;
                /* Products of bf16 values are exact in float32. */
                acc += mha__bf16_to_f32(ap[0]) * mha__bf16_to_f32(bp[0]);
                acc += mha__bf16_to_f32(ap[1]) * mha__bf16_to_f32(bp[1]);
            }
            c[i * ldc + j] = acc;
        }
}

void mha__bf16_round_generic(uint16_t *dst, const float *src, int64_t n)
{
    for (int64_t i = 0; i < n; i++) dst[i] = mha__f32_to_bf16(src[i]);
}

void mha__bf16_pairs_generic(uint16_t *dst, const float *x0, const float *x1, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        dst[2 * i] = mha__f32_to_bf16(x0[i]);
        dst[2 * i + 1] = x1 ? mha__f32_to_bf16(x1[i]) : 0;
    }
}

void mha__bf16_transpose_generic(uint16_t *dst, int64_t ldd, const float *src, int64_t lds, int64_t rows, int64_t cols)
{
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) dst[r * ldd + c] = mha__f32_to_bf16(src[c * lds + r]);
}

void mha__bf16_row_sums_generic(const uint16_t *p, int64_t ld, int64_t rows, int64_t cols, float *sum)
{
    for (int64_t r = 0; r < rows; r++) {
        float row = 0.0f;
        for (int64_t c = 0; c < cols; c++) row += mha__bf16_to_f32(p[r * ld + c]);
        sum[r] += row;
    }
}

const mha__bf16_kernels mha__bf16_kernels_generic = {
    .name = "generic",
    .gemm = mha__bf16_gemm_generic,
    .round = mha__bf16_round_generic,
    .pairs = mha__bf16_pairs_generic,
    .transpose = mha__bf16_transpose_generic,
    .row_sums = mha__bf16_row_sums_generic,
    .dot_rows = dot_rows_bf16_generic,
    .axpy_rows = axpy_rows_bf16_generic,
    .peak = NULL, /* converts to float32: the float32 peak applies */
};

const mha__kernels mha__kernels_generic = {
    .name = "generic",
    .mr = GENERIC_MR,
    .nr = GENERIC_NR,
    .split_k_rows = 16, /* split-K's limit, MHA_DECODE_ROWS (attn/plan.c) */
    .split_k_rows_shared = 16,
    .gemm_tile = gemm_tile_generic,
    .gemm_tile_grouped = gemm_tile_grouped_generic,
    .gemm_tile_exact = gemm_tile_exact_generic,
    .pair_dots = pair_dots_generic,
    .softmax_step = softmax_step_generic,
    .softmax_grad = softmax_grad_generic,
    .dot_rows = dot_rows_generic,
    .axpy_rows = axpy_rows_generic,
    .dot_rows_i8 = dot_rows_i8_generic,
    .axpy_rows_i8 = axpy_rows_i8_generic,
    .transpose_scaled = transpose_scaled_generic,
    .scale = scale_generic,
    .exp_shift = exp_shift_generic,
    .abs_max = abs_max_generic,
    .key_sums = key_sums_generic,
    .column_sums = column_sums_generic,
    .norm2 = norm2_generic,
    .widen = widen_generic,
    .dots_f64 = dots_f64_generic,
    .dots_f64_panel = dots_f64_panel_generic,
    .shift_refined = shift_refined_generic,
    .row_max = row_max_generic,
    .shift_pick = shift_pick_generic,
    .peak = peak_generic,
};
