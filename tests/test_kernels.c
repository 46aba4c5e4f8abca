/*
 * test_kernels.c -- every micro-kernel of every ISA this machine runs,
 * against double precision, over shapes that hit each tail:
 *   gemm_tile: m in 1..mr, n in 1..nr, k in {0, 1, 3, 17, 64, 200}, both
 *              A layouts, overwrite and accumulate, never writing outside
 *              the tile; gemm_tile_grouped the same, over 1-12 groups;
 *              gemm_tile_exact to the bit of its float64 sum;
 *   pair_dots: the same bits as gemm_tile's 1 x 1 product, row by row;
 *   exp:       relative error over [-103, 88] and exact 0 for -inf;
 *   softmax_step: running max/sum against a direct computation over a
 *              key-major tile, queries fully masked, tails;
 *   softmax_grad: probabilities and score gradients against double, with
 *              masked scores and a row with nothing visible (mul 0).
 */
#include "core/convert.h"
#include "harness.h"
#include "kernels/kernels.h"

#include <stdint.h>

static uint64_t rng = 12345;

static float uniform(void)
{
    rng = rng * 6364136223846793005u + 1442695040888963407u;
    return (float)((rng >> 40) * 0x1p-24 * 2.0 - 1.0);
}

/* An operand of a product under test, element (r, c) read by `at`. */
typedef struct operand {
    double (*at)(const struct operand *x, int64_t r, int64_t c);
    const void *data;
    int64_t rs, cs, gk, gs; /* as each `at` reads them */
} operand;

/* float32, in groups of gk columns lying gs apart (gk > k: no groups):
 * (r, c) at data[(c / gk) * gs + r * rs + (c % gk) * cs]. */
static double f32_at(const operand *x, int64_t r, int64_t c)
{
    return ((const float *)x->data)[(c / x->gk) * x->gs + r * x->rs + (c % x->gk) * x->cs];
}

/* bfloat16 in pairs along c: (r, c) at data[r * rs + (c / 2) * cs + c % 2]. */
static double bf16_at(const operand *x, int64_t r, int64_t c)
{
    return mha__bf16_to_f32(((const uint16_t *)x->data)[r * x->rs + (c / 2) * x->cs + c % 2]);
}

enum { GUARD = 3 }; /* rows of C checked past the product's */

/* Values of C (ldc wide, rows + GUARD rows; c0 before the call) that a
 * product C (+)= A B over m x n, k, got wrong against double, or wrote
 * outside its m x n.  B is read as (p, j) = b->at(b, j, p). */
static int product_errors(const operand *a, const operand *b, const float *c, const float *c0, int64_t ldc,
                          int64_t rows, int64_t m, int64_t n, int64_t k, int acc)
{
    int bad = 0;
    for (int64_t i = 0; i < rows + GUARD; i++)
        for (int64_t j = 0; j < ldc; j++) {
            float got = c[i * ldc + j];
            if (i >= m || j >= n) {
                bad += got != c0[i * ldc + j];
                continue;
            }
            double want = acc ? c0[i * ldc + j] : 0.0, mag = fabs(want);
            for (int64_t p = 0; p < k; p++) {
                double t = a->at(a, i, p) * b->at(b, j, p);
                want += t;
                mag += fabs(t);
            }
            /* A float32 sum of k + 1 terms: k+2 roundings at most. */
            bad += fabs(got - want) > (double)(k + 2) * FLT_EPSILON * mag + 1e-30;
        }
    return bad;
}

static float *filled(int64_t n)
{
    float *x = malloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++) x[i] = uniform();
    return x;
}

static void test_gemm_tile(const mha__kernels *kt)
{
    enum { K_MAX = 200 };
    static const int64_t ks[] = {0, 1, 3, 17, 64, 200};
    int64_t lda = K_MAX + 5, ldb = kt->nr + 7, ldc = kt->nr + 9;
    float *a = filled(kt->mr * lda * 2), *b = filled(K_MAX * ldb), *c = filled((kt->mr + GUARD) * ldc);
    float *c0 = filled((kt->mr + GUARD) * ldc);
    operand B = {f32_at, b, 1, ldb, K_MAX + 1, 0};
    int bad = 0;
    for (int layout = 0; layout < 2; layout++)
        for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ki++)
            for (int64_t m = 1; m <= kt->mr; m++)
                for (int64_t n = 1; n <= kt->nr; n++)
                    for (int acc = 0; acc < 2; acc++) {
                        int64_t k = ks[ki];
                        /* layout 0: row-major A; 1: column panels (a_rs 1, a_cs mr). */
                        operand A = {f32_at, a, layout ? 1 : lda, layout ? kt->mr : 1, K_MAX + 1, 0};
                        for (int64_t i = 0; i < (kt->mr + GUARD) * ldc; i++) c[i] = c0[i] = uniform();
                        kt->gemm_tile(m, n, k, a, A.rs, A.cs, b, ldb, c, ldc, acc);
                        bad += product_errors(&A, &B, c, c0, ldc, kt->mr, m, n, k, acc);
                    }
    CHECK(bad == 0, "%s gemm_tile: %d wrong or out-of-tile values", kt->name, bad);
    free(a);
    free(b);
    free(c);
    free(c0);
}

/* gemm_tile_exact: every m <= MHA_EXACT_MR and n <= nr, with and
 * without bias, A's rows lda apart (more than k) and C's rows in a
 * shuffled order: the bits of the float64 sum in order (bias first)
 * rounded once, and nothing written past n or to other rows.  A's and
 * B's values are floats (what the caller widens), A's spanning 2^-8 to
 * 2^8 so that a float32 sum would differ; B's columns from n on are
 * NaN, which must not reach C.  B holds exactly the k rows read, so a
 * read past them shows under ASan. */
static void test_gemm_tile_exact(const mha__kernels *kt)
{
    enum { K_MAX = 200, LDA = K_MAX + 3, LDC = 40 };
    static const int64_t ks[] = {0, 1, 3, 17, 200};
    float *af = filled(MHA_EXACT_MR * LDA), *bias = filled(kt->nr), c[MHA_EXACT_MR * LDC];
    double *a = malloc(MHA_EXACT_MR * LDA * sizeof(double));
    for (int64_t i = 0; i < MHA_EXACT_MR * LDA; i++) a[i] = ldexpf(af[i], (int)(uniform() * 8.0f));
    int bad = 0;
    for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ki++) {
        int64_t k = ks[ki], ldb = kt->nr;
        float *bf = filled(k * ldb > 0 ? k * ldb : 1);
        double *b = malloc((size_t)(k * ldb > 0 ? k * ldb : 1) * sizeof(double));
        for (int64_t m = 1; m <= MHA_EXACT_MR; m++)
            for (int64_t n = 1; n <= kt->nr; n++) {
                for (int64_t i = 0; i < k * ldb; i++) b[i] = i % ldb < n ? (double)bf[i] : NAN;
                for (int with_bias = 0; with_bias < 2; with_bias++) {
                    float *out[MHA_EXACT_MR];
                    for (int64_t i = 0; i < m; i++) out[i] = c + ((i * 5 + 1) % MHA_EXACT_MR) * LDC; /* shuffled */
                    for (int64_t i = 0; i < MHA_EXACT_MR * LDC; i++) c[i] = -7.0f;
                    const float *bj = with_bias ? bias : NULL;
                    kt->gemm_tile_exact(m, n, k, a, LDA, b, ldb, bj, out);
                    for (int64_t i = 0; i < MHA_EXACT_MR; i++) { /* C's row for A's row i; past m, untouched */
                        const float *got = c + ((i * 5 + 1) % MHA_EXACT_MR) * LDC;
                        for (int64_t j = 0; j < LDC; j++) {
                            if (i >= m || j >= n) {
                                bad += got[j] != -7.0f;
                                continue;
                            }
                            double want = bj ? bj[j] : 0.0;
                            for (int64_t p = 0; p < k; p++) want += a[i * LDA + p] * b[p * ldb + j];
                            bad += got[j] != (float)want;
                        }
                    }
                }
            }
        free(b);
        free(bf);
    }
    free(af);
    CHECK(bad == 0, "%s gemm_tile_exact: %d wrong or out-of-tile values", kt->name, bad);
    free(a);
    free(bias);
}

/* widen: every n to 40, contiguous and strided: each value its float's
 * double, and nothing written past n (the masked tail's edge). */
static void test_widen(const mha__kernels *kt)
{
    enum { N_MAX = 40, CS = 3 };
    float *src = filled(N_MAX * CS);
    double dst[N_MAX + 1];
    int bad = 0;
    for (int64_t cs = 1; cs <= CS; cs += CS - 1)
        for (int64_t n = 0; n <= N_MAX; n++) {
            for (int64_t i = 0; i <= N_MAX; i++) dst[i] = -7.0;
            kt->widen(dst, src, cs, n);
            for (int64_t i = 0; i <= N_MAX; i++) bad += dst[i] != (i < n ? (double)src[i * cs] : -7.0);
        }
    CHECK(bad == 0, "%s widen: %d values wrong or written past n", kt->name, bad);
    free(src);
}

/* gemm_tile_grouped: A's columns in groups of gk lying a_gs apart (an odd
 * stride, so a group read from the wrong place shows). */
static void test_gemm_tile_grouped(const mha__kernels *kt)
{
    enum { GROUPS_MAX = 12, GK_MAX = 64, K_MAX = 256 };
    static const int64_t shapes[][2] = {{1, 7}, {2, 1}, {3, 17}, {4, 64}, {12, 5}}; /* groups, gk: k <= K_MAX */
    int64_t lda = GK_MAX + 3, a_gs = kt->mr * lda + 11, ldb = kt->nr + 7, ldc = kt->nr + 9;
    float *a = filled(GROUPS_MAX * a_gs), *b = filled(K_MAX * ldb), *c = filled((kt->mr + GUARD) * ldc);
    float *c0 = filled((kt->mr + GUARD) * ldc);
    operand B = {f32_at, b, 1, ldb, K_MAX + 1, 0};
    int bad = 0;
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++)
        for (int64_t m = 1; m <= kt->mr; m++)
            for (int64_t n = 1; n <= kt->nr; n++)
                for (int acc = 0; acc < 2; acc++) {
                    int64_t groups = shapes[si][0], gk = shapes[si][1];
                    operand A = {f32_at, a, lda, 1, gk, a_gs};
                    for (int64_t i = 0; i < (kt->mr + GUARD) * ldc; i++) c[i] = c0[i] = uniform();
                    kt->gemm_tile_grouped(m, n, groups, gk, a, lda, a_gs, b, ldb, c, ldc, acc);
                    bad += product_errors(&A, &B, c, c0, ldc, kt->mr, m, n, groups * gk, acc);
                }
    CHECK(bad == 0, "%s gemm_tile_grouped: %d wrong or out-of-tile values", kt->name, bad);
    free(a);
    free(b);
    free(c);
    free(c0);
}

/* key_sums: each row's float64 sums one chain in key order, the same
 * bits as a plain loop, for 1-20 rows (the eight-row blocks and the
 * rest), with and without w, from running sums not 0; top passes over a
 * NaN score (the sum takes it); nothing written past the rows. */
static void test_key_sums(const mha__kernels *kt)
{
    enum { ROWS = 20, COLS = 37, LDS = 24 };
    float *s = filled(COLS * LDS), *w = filled(COLS * LDS);
    s[5 * LDS + 3] = NAN;
    int bad = 0;
    for (int weighted = 0; weighted < 2; weighted++)
        for (int64_t rows = 1; rows <= ROWS; rows++)
            for (int64_t cols = 0; cols <= COLS; cols += 6) {
                double sum[ROWS + 1], wsum[ROWS + 1], want_sum[ROWS], want_wsum[ROWS];
                float top[ROWS + 1], want_top[ROWS];
                for (int64_t i = 0; i <= rows; i++) {
                    sum[i] = wsum[i] = 0.25 * (double)i - 1.0;
                    top[i] = 0.01f * (float)i;
                }
                for (int64_t i = 0; i < rows; i++) {
                    want_sum[i] = sum[i], want_wsum[i] = wsum[i], want_top[i] = top[i];
                    for (int64_t c = 0; c < cols; c++) {
                        float p = s[c * LDS + i];
                        want_sum[i] += p;
                        if (weighted) want_wsum[i] += w[c * LDS + i];
                        want_top[i] = p > want_top[i] ? p : want_top[i];
                    }
                }
                double guard = sum[rows];
                kt->key_sums(s, weighted ? w : NULL, LDS, rows, cols, sum, wsum, top);
                bad += memcmp(sum, want_sum, (size_t)rows * sizeof(double)) != 0;
                bad += memcmp(wsum, want_wsum, (size_t)rows * sizeof(double)) != 0;
                bad += memcmp(top, want_top, (size_t)rows * sizeof(float)) != 0;
                bad += memcmp(&sum[rows], &guard, sizeof guard) != 0 || top[rows] != 0.01f * (float)rows;
            }
    CHECK(bad == 0, "%s key_sums: %d tiles unlike the plain loop's bits or written past the rows", kt->name, bad);
    free(s);
    free(w);
}

/* pair_dots: each row's dot the same bits as gemm_tile computes it as a
 * 1 x 1 product (the backward's dP - delta is then exactly 0 where a row
 * sees one key), for 1-11 rows (the four-row groups and the rest), both
 * contiguous and strided elements. */
static void test_pair_dots(const mha__kernels *kt)
{
    enum { ROWS = 11, K_MAX = 100 };
    static const int64_t ks[] = {0, 1, 5, 64, 100};
    float *a = filled(ROWS * (2 * K_MAX + 7)), *b = filled(ROWS * (2 * K_MAX + 3)), out[ROWS + 1];
    int bad = 0;
    for (int64_t cs = 1; cs <= 2; cs++)
        for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ki++)
            for (int64_t rows = 1; rows <= ROWS; rows++) {
                int64_t k = ks[ki], a_rs = cs * K_MAX + 7, b_rs = cs * K_MAX + 3;
                out[rows] = 12345.0f;
                kt->pair_dots(rows, k, a, a_rs, cs, b, b_rs, cs, out);
                for (int64_t i = 0; i < rows; i++) {
                    float want;
                    kt->gemm_tile(1, 1, k, a + i * a_rs, 0, cs, b + i * b_rs, cs, &want, 1, 0);
                    bad += memcmp(&want, &out[i], sizeof want) != 0;
                }
                bad += out[rows] != 12345.0f;
            }
    CHECK(bad == 0, "%s pair_dots: %d values unlike gemm_tile's or written past the rows", kt->name, bad);
    free(a);
    free(b);
}

static void test_exp(const mha__kernels *kt)
{
    enum { N = 4099 };
    float *x = malloc(N * sizeof(float));
    double worst = 0;
    for (int i = 0; i < N; i++) x[i] = -103.0f + 191.0f * (float)i / (N - 1);
    float *y = malloc(N * sizeof(float));
    memcpy(y, x, N * sizeof(float));
    kt->exp_shift(y, N, 0.0f);
    for (int i = 0; i < N; i++) {
        double want = exp((double)x[i]);
        if (want < 0x1p-126) continue; /* denormal results may flush to 0 */
        double rel = fabs(y[i] - want) / want;
        if (rel > worst) worst = rel;
    }
    CHECK(worst < 4 * FLT_EPSILON, "%s exp: worst relative error %.3g", kt->name, worst);
    float special[5] = {-INFINITY, -200.0f, 0.0f, NAN, 1.0f};
    kt->exp_shift(special, 5, 1.0f);
    CHECK(special[0] == 0.0f && special[1] == 0.0f && fabsf(special[2] - 0.36787944f) < 1e-7f && isnan(special[3]) &&
              special[4] == 1.0f,
          "%s exp specials: %g %g %g %g %g", kt->name, (double)special[0], (double)special[1], (double)special[2],
          (double)special[3], (double)special[4]);
    free(x);
    free(y);
}

/* abs_max over every tail of rows, with NaN and infinite scores: the
 * largest magnitude per row, NaN passed over, nothing written past rows. */
static void test_abs_max(const mha__kernels *kt)
{
    enum { ROWS = 21, COLS = 9, LDS = 24 };
    float s[COLS * LDS], top[ROWS + 1];
    int bad = 0;
    for (int i = 0; i < COLS * LDS; i++) s[i] = uniform() * 100.0f;
    s[3 * LDS + 5] = NAN;
    s[4 * LDS + 6] = -INFINITY;
    for (int rows = 1; rows <= ROWS; rows++) {
        for (int r = 0; r <= ROWS; r++) top[r] = r == 0 ? 500.0f : 0.5f; /* row 0 keeps its larger start */
        kt->abs_max(s, LDS, rows, COLS, top);
        for (int r = 0; r < rows; r++) {
            float want = r == 0 ? 500.0f : 0.5f;
            for (int c = 0; c < COLS; c++) {
                float a = fabsf(s[c * LDS + r]);
                want = a > want ? a : want;
            }
            bad += top[r] != want;
        }
        if (rows < ROWS) bad += top[rows] != 0.5f; /* nothing written past rows */
    }
    CHECK(bad == 0, "%s abs_max: %d mismatches", kt->name, bad);
}

/* column_sums over every width up to 70 (each tail of its vectors),
 * rows 0, 1 and 37: each sum its start plus the rows in order, one
 * float32 add at a time (bits against the scalar chain, so denormals, a
 * NaN and an infinity too), nothing written past n. */
static void test_column_sums(const mha__kernels *kt)
{
    enum { ROWS = 37, N = 70, LDX = 75 };
    static float x[ROWS * LDX];
    float sums[N + 1], want[N];
    int bad = 0;
    for (int i = 0; i < ROWS * LDX; i++) x[i] = uniform() * (i % 11 == 0 ? 1e-38f : 3.0f);
    x[5 * LDX + 17] = NAN;
    x[9 * LDX + 40] = -INFINITY;
    static const int64_t row_counts[] = {0, 1, ROWS};
    for (size_t c = 0; c < sizeof row_counts / sizeof row_counts[0]; c++)
        for (int64_t n = 1; n <= N; n++) {
            int64_t rows = row_counts[c];
            for (int64_t i = 0; i <= N; i++) sums[i] = i < n ? uniform() : 7.0f;
            for (int64_t i = 0; i < n; i++) {
                want[i] = sums[i];
                for (int64_t r = 0; r < rows; r++) want[i] += x[r * LDX + i];
            }
            kt->column_sums(x, LDX, rows, n, sums);
            bad += memcmp(sums, want, (size_t)n * sizeof(float)) != 0 || sums[n] != 7.0f;
        }
    CHECK(bad == 0, "%s column_sums: %d widths wrong", kt->name, bad);
}

/* transpose_scaled over row and column tails around its 16 x 16 blocks:
 * every element alpha * src exactly (one multiply), nothing written
 * outside the rows x cols block of dst. */
static void test_transpose_scaled(const mha__kernels *kt)
{
    enum { ROWS = 37, COLS = 35, LDS = 40, LDD = 48, SENTINEL = -12345 };
    static const int row_counts[] = {1, 15, 16, 17, 32, 37}, col_counts[] = {1, 7, 16, 20, 35};
    float src[ROWS * LDS], dst[COLS * LDD];
    const float alpha = 0.125f * 1.1f;
    int bad = 0;
    for (int i = 0; i < ROWS * LDS; i++) src[i] = uniform() * 50.0f;
    for (size_t a = 0; a < sizeof row_counts / sizeof row_counts[0]; a++)
        for (size_t b = 0; b < sizeof col_counts / sizeof col_counts[0]; b++) {
            int rows = row_counts[a], cols = col_counts[b];
            for (int i = 0; i < COLS * LDD; i++) dst[i] = SENTINEL;
            kt->transpose_scaled(dst, LDD, src, LDS, rows, cols, alpha);
            for (int c = 0; c < COLS; c++)
                for (int r = 0; r < LDD; r++) {
                    float want = r < rows && c < cols ? alpha * src[r * LDS + c] : SENTINEL;
                    bad += dst[c * LDD + r] != want;
                }
        }
    CHECK(bad == 0, "%s transpose_scaled: %d mismatches", kt->name, bad);
}

/* sum_c a[c] b[c] in float64 in kernels.h's norm2 order, written out. */
static double ordered_dot(const float *a, const float *b, int n)
{
    double lane[8] = {0}, sum = 0;
    int c = 0;
    for (; c + 8 <= n; c += 8)
        for (int l = 0; l < 8; l++) lane[l] += (double)a[c + l] * b[c + l];
    for (; c < n; c++) sum += (double)a[c] * b[c];
    for (int l = 0; l < 8; l++) sum += lane[l];
    return sum;
}

/* Does got have want's bits, and lie within float64's rounding (n ulps
 * of the sum of magnitudes) of long double? */
static bool ordered_ok(double got, double want, const float *a, const float *b, int n)
{
    long double exact = 0, mag = 0;
    for (int i = 0; i < n; i++) exact += (long double)a[i] * b[i], mag += fabsl((long double)a[i] * b[i]);
    return memcmp(&got, &want, sizeof got) == 0 && fabsl(got - exact) <= (n + 1) * DBL_EPSILON * mag;
}

/* dots_f64 over every tail of d and every count of keys up to nineteen,
 * in a shuffled order with repeats (the vector kernels take eight or
 * four at a time, pad a short eight and take the last few one by one),
 * terms of mixed sign and size: each key's bits as the order written
 * out gives them, whatever keys come with it. */
static void test_dots_f64(const mha__kernels *kt)
{
    enum { N = 133, KEYS = 19, LD = 140 };
    static const int64_t idx[KEYS] = {3, 0, 6, 6, 1, 5, 2, 9, 4, 8, 0, 7, 3, 9, 2, 5, 1, 8, 4};
    float a[N], b[10 * LD];
    for (int i = 0; i < N; i++) a[i] = uniform() * 1000.0f;
    for (int i = 0; i < 10 * LD; i++) b[i] = uniform() * (i % 3 ? 1.0f : 1e-3f);
    int bad = 0;
    for (int d = 0; d <= N; d++)
        for (int n = 1; n <= KEYS; n++) {
            double got[KEYS];
            kt->dots_f64(a, b, LD, idx + KEYS - n, n, d, got);
            for (int i = 0; i < n; i++) {
                const float *k = b + idx[KEYS - n + i] * LD;
                bad += !ordered_ok(got[i], ordered_dot(a, k, d), a, k, d);
            }
        }
    CHECK(bad == 0, "%s dots_f64: %d mismatches", kt->name, bad);
}

/* dots_f64_panel over every tail of d, 1 to 19 rows of a panel wider
 * than them (every mask of the vectors of 4 and 8 rows), an odd number of
 * keys (the AVX-512 kernel takes two at a time): each score's bits as
 * the order written out gives them, and nothing written outside the
 * rows and keys asked for. */
static void test_dots_f64_panel(const mha__kernels *kt)
{
    enum { N = 133, ROWS = 19, LDQ = 21, KEYS = 3, LDK = 140, LDO = 24 };
    static double qd[N * LDQ], out[KEYS * LDO];
    float q[ROWS][N], k[KEYS * LDK];
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < N; c++) q[r][c] = uniform() * (c % 3 ? 30.0f : 1e-3f);
    for (int c = 0; c < N; c++)
        for (int r = 0; r < LDQ; r++) qd[c * LDQ + r] = r < ROWS ? q[r][c] : NAN; /* never read */
    for (int i = 0; i < KEYS * LDK; i++) k[i] = uniform() * (i % 4 ? 1.0f : 1e-2f);
    int bad = 0;
    for (int d = 0; d <= N; d++)
        for (int rows = 1 + d % 3; rows <= ROWS; rows += 3) {
            int cols = d % 2 ? KEYS : 1;
            for (int i = 0; i < KEYS * LDO; i++) out[i] = -1.0;
            kt->dots_f64_panel(k, LDK, cols, qd, LDQ, rows, d, out, LDO);
            for (int c = 0; c < KEYS; c++)
                for (int r = 0; r < LDO; r++) {
                    double got = out[c * LDO + r];
                    if (c < cols && r < rows)
                        bad += !ordered_ok(got, ordered_dot(k + c * LDK, q[r], d), k + c * LDK, q[r], d);
                    else bad += got != -1.0;
                }
        }
    CHECK(bad == 0, "%s dots_f64_panel: %d mismatches", kt->name, bad);
}

/* shift_refined against its definition (kernels.h) written out: n from 1
 * to 21 (every tail of the vectors), rows marked or not, above near or
 * not (or at it, or an ulp above), a NaN and -inf score, a shift of 0 with +inf near (a row that sees
 * nothing); nothing written past n. */
/* shift_pick over every tail of n: the shifted column and the picked
 * rows as the scalar loop finds them (NaN, -inf, unmarked rows and
 * scores at near), nothing written past n. */
static void test_shift_pick(const mha__kernels *kt)
{
    enum { N = 45 };
    float x[N + 1], x0[N + 1], near[N], shift[N];
    bool marked[N];
    int64_t picked[N + 1];
    int bad = 0;
    for (int n = 0; n <= N; n++) {
        for (int r = 0; r <= N; r++) x0[r] = r % 11 == 3 ? NAN : r % 13 == 5 ? -INFINITY : uniform() * 10;
        for (int r = 0; r < N; r++) {
            near[r] = r % 7 == 2 ? x0[r] : uniform() * 5; /* x == near: not picked */
            shift[r] = uniform() * 3;
            marked[r] = uniform() > -0.5;
        }
        memcpy(x, x0, sizeof x);
        picked[n] = 42;
        int64_t count = kt->shift_pick(x, marked, near, shift, n, picked), want = 0;
        bad += memcmp(&x[n], &x0[n], sizeof x[n]) != 0;
        for (int r = 0; r < n; r++) {
            float shifted = x0[r] - shift[r];
            bad += memcmp(&x[r], &shifted, sizeof shifted) != 0;
            if (marked[r] && x0[r] > near[r]) bad += want >= count || picked[want++] != r;
        }
        bad += count != want || picked[n] != 42;
    }
    CHECK(bad == 0, "%s shift_pick: %d mismatches", kt->name, bad);
}

/* row_max over tails of rows and keys, scores with ties, NaN, -inf and
 * rows that see nothing: the largest and its first key, as a branch per
 * score finds them, and nothing written past rows. */
static void test_row_max(const mha__kernels *kt)
{
    enum { ROWS = 37, COLS = 70, LDS = 40 };
    static float s[COLS * LDS];
    for (int i = 0; i < COLS * LDS; i++) {
        int kind = (int)(fabs(uniform()) * 20);
        s[i] = kind == 0 ? NAN : kind == 1 ? -INFINITY : kind < 5 ? 3.0f : uniform() * 4; /* 3: ties */
    }
    for (int c = 0; c < COLS; c++) s[c * LDS + 5] = c % 3 ? NAN : -INFINITY; /* row 5 sees nothing */
    int bad = 0;
    for (int rows = 1; rows <= ROWS; rows += 3)
        for (int cols = 0; cols <= COLS; cols += 7) {
            float top[ROWS + 1];
            int32_t at[ROWS + 1];
            top[rows] = 42.0f, at[rows] = 42;
            kt->row_max(s, LDS, rows, cols, top, at);
            bad += top[rows] != 42.0f || at[rows] != 42;
            for (int r = 0; r < rows; r++) {
                float want = -INFINITY;
                int32_t want_at = -1;
                for (int c = 0; c < cols; c++)
                    if (s[c * LDS + r] > want) want = s[c * LDS + r], want_at = c;
                bad += memcmp(&top[r], &want, sizeof want) != 0 || at[r] != want_at;
            }
        }
    CHECK(bad == 0, "%s row_max: %d mismatches", kt->name, bad);
}

static void test_shift_refined(const mha__kernels *kt)
{
    enum { N = 21 };
    float x0[N + 1], near[N], shift[N];
    double dot[N];
    bool marked[N];
    for (int r = 0; r < N; r++) {
        x0[r] = uniform() * 40.0f;
        near[r] = r % 5 == 0 ? INFINITY : uniform() * 40.0f - 10.0f;
        shift[r] = r % 5 == 0 ? 0.0f : uniform() * 40.0f;
        dot[r] = (double)x0[r] * 8.0 + uniform() * 1e-3;
        marked[r] = r % 3 != 1;
    }
    x0[4] = NAN;
    x0[7] = -INFINITY;
    near[9] = x0[9]; /* not above: shifted */
    near[10] = nextafterf(x0[10], -INFINITY);
    x0[N] = 12345.0f;
    const double scale = 0.125;
    int bad = 0;
    for (int n = 1; n <= N; n++) {
        float x[N + 1];
        memcpy(x, x0, sizeof x);
        kt->shift_refined(x, dot, marked, near, shift, n, scale);
        for (int r = 0; r <= N; r++) {
            float want = r >= n                         ? x0[r]
                         : marked[r] && x0[r] > near[r] ? (float)(dot[r] * scale - shift[r])
                                                        : x0[r] - shift[r];
            bad += memcmp(&x[r], &want, sizeof want) != 0 && !(isnan(x[r]) && isnan(want));
        }
    }
    CHECK(bad == 0, "%s shift_refined: %d mismatches", kt->name, bad);
}

/* norm2 over every tail of n and every count of rows up to nineteen
 * (the vector kernels take four at a time, then one by one), values of
 * every size: the order's bits. */
static void test_norm2(const mha__kernels *kt)
{
    enum { N = 133, ROWS = 19, LD = 5 };
    float x[N + ROWS * LD];
    for (int i = 0; i < N + ROWS * LD; i++) x[i] = uniform() * (i % 5 ? 30.0f : 1e-3f);
    int bad = 0;
    for (int n = 0; n <= N; n++)
        for (int rows = 1; rows <= ROWS; rows++) {
            double got[ROWS];
            kt->norm2(x + (ROWS - rows) * LD, LD, rows, n, got);
            for (int r = 0; r < rows; r++) {
                const float *row = x + (ROWS - rows + r) * LD;
                bad += !ordered_ok(got[r], ordered_dot(row, row, n), row, row, n);
            }
        }
    CHECK(bad == 0, "%s norm2: %d mismatches", kt->name, bad);
}

/* Do a and b agree: both NaN, or equal to 4 FLT_EPSILON of b (infinities
 * exactly)? */
static bool agrees(float a, float b)
{
    if (isnan(a) || isnan(b)) return isnan(a) && isnan(b);
    if (isinf(a) || isinf(b)) return a == b;
    return fabsf(a - b) <= 4 * FLT_EPSILON * (fabsf(b) + 1e-30f);
}

/* NaN and +inf scores, in either of two blocks, alone or together, in
 * masked rows and the tail lane: every output as the generic kernel
 * gives it (kernels.h) -- a NaN score, or +inf (whose exp(inf - inf) is
 * NaN), makes the row's sum NaN from that block on. */
static void test_softmax_step_special(const mha__kernels *kt)
{
    enum { ROWS = 21, COLS = 10, LDS = 24 };
    const mha__kernels *ref = mha__kernels_named("generic");
    float row[ROWS][2 * COLS], s[2][COLS * LDS], max[2][ROWS], sum[2][ROWS], scale[2][ROWS];
    for (int r = 0; r < ROWS; r++)
        for (int j = 0; j < 2 * COLS; j++) row[r][j] = uniform() * 20.0f;
    row[0][3] = NAN;                                          /* NaN, first block */
    row[1][COLS + 4] = NAN;                                   /* NaN, second block */
    for (int j = 0; j < 2 * COLS; j++) row[2][j] = -INFINITY; /* masked, then a NaN */
    row[2][COLS + 1] = NAN;
    row[3][2] = INFINITY;                    /* +inf */
    row[4][1] = INFINITY, row[4][6] = NAN;   /* both, one block */
    row[5][COLS + 2] = INFINITY;             /* +inf, second block */
    row[6][COLS - 1] = NAN, row[7][0] = NAN; /* two NaN rows in one vector */
    row[ROWS - 1][COLS + 9] = NAN;           /* the tail lane */
    int bad = 0;
    for (int k = 0; k < 2; k++)
        for (int r = 0; r < ROWS; r++) max[k][r] = -INFINITY, sum[k][r] = 0;
    for (int blk = 0; blk < 2; blk++) {
        for (int k = 0; k < 2; k++) {
            for (int r = 0; r < ROWS; r++)
                for (int j = 0; j < COLS; j++) s[k][j * LDS + r] = row[r][blk * COLS + j];
            (k ? kt : ref)->softmax_step(s[k], LDS, ROWS, COLS, max[k], sum[k], scale[k], INFINITY, NULL);
        }
        for (int r = 0; r < ROWS; r++) {
            bad += !agrees(max[1][r], max[0][r]) + !agrees(sum[1][r], sum[0][r]) + !agrees(scale[1][r], scale[0][r]);
            for (int j = 0; j < COLS; j++) bad += !agrees(s[1][j * LDS + r], s[0][j * LDS + r]);
        }
    }
    CHECK(bad == 0, "%s softmax_step with NaN and +inf scores: %d mismatches against generic", kt->name, bad);
    int nan_rows = 0;
    for (int r = 0; r < ROWS; r++) nan_rows += isnan(sum[1][r]);
    CHECK(nan_rows == 9 && isnan(sum[1][2]) && isnan(sum[1][ROWS - 1]) && max[1][3] == INFINITY,
          "%s softmax_step: %d rows with NaN sums, not the 9 with NaN or +inf scores", kt->name, nan_rows);
}

/* softmax_step's answer to "is some score beyond `above` in magnitude":
 * for one score of 17 or -17 (else all within 15) at each row, the tail
 * lanes too, and at a key past the fourth (the unrolled loop's tail);
 * never for NaN or a bound of +inf. */
static void test_softmax_step_large(const mha__kernels *kt)
{
    enum { ROWS = 21, COLS = 7, LDS = 24 };
    float base[COLS * LDS], s[COLS * LDS], max[ROWS], sum[ROWS], scale[ROWS];
    for (int i = 0; i < COLS * LDS; i++) base[i] = uniform() * 15.0f;
    int bad = 0;
    for (int r = 0; r < ROWS; r++)
        for (int v = 0; v < 4; v++) {
            float value = v == 0 ? 17.0f : v == 1 ? -17.0f : v == 2 ? NAN : 12.0f;
            memcpy(s, base, sizeof s);
            s[(r % 2 ? COLS - 1 : r % COLS) * LDS + r] = value;
            for (int i = 0; i < ROWS; i++) max[i] = -INFINITY, sum[i] = 0;
            bool large = kt->softmax_step(s, LDS, ROWS, COLS, max, sum, scale, 16.0f, NULL);
            bad += large != (v < 2);
            memcpy(s, base, sizeof s);
            s[r] = value; /* key 0 */
            bad += kt->softmax_step(s, LDS, ROWS, COLS, max, sum, scale, INFINITY, NULL);
        }
    CHECK(bad == 0, "%s softmax_step: %d wrong answers to whether a score is large", kt->name, bad);
}

/* softmax_step with a reach for each row against the same step over the
 * tile with the keys past each reach set to -inf, as a causal contract
 * sets them: the same bits (probabilities 0 there, maxima, sums and
 * scales), a NaN or a large score past a reach left out, every reach
 * from 0 to the whole tile, tails of 16 and 8 lanes; and the large
 * answer for scores within the reach as without one. */
static void test_softmax_step_reach(const mha__kernels *kt)
{
    enum { ROWS = 37, COLS = 23, LDS = 40 };
    float row[ROWS][2 * COLS], s[2][COLS * LDS], max[2][ROWS], sum[2][ROWS], scale[2][ROWS];
    int64_t reach[2][ROWS];
    for (int r = 0; r < ROWS; r++) {
        for (int j = 0; j < 2 * COLS; j++) row[r][j] = uniform() * 15.0f;
        reach[0][r] = r * (COLS + 1) / ROWS; /* 0 .. COLS, growing: a causal diagonal */
        reach[1][r] = (r * 7) % (COLS + 1);  /* any order */
    }
    row[5][COLS] = 20.0f; /* within both reaches of row 5: the second block is large */
    int bad = 0, wrong_large = 0;
    for (int kind = 0; kind < 2; kind++) {
        for (int k = 0; k < 2; k++)
            for (int r = 0; r < ROWS; r++) max[k][r] = -INFINITY, sum[k][r] = 0;
        for (int blk = 0; blk < 2; blk++) {
            for (int k = 0; k < 2; k++)
                for (int r = 0; r < ROWS; r++)
                    for (int j = 0; j < COLS; j++) {
                        bool past = j >= reach[kind][r];
                        /* past the reach: -inf for the masked step, else a value to leave out */
                        float beyond = r % 3 == 0 ? 40.0f : r % 3 == 1 ? NAN : -40.0f;
                        s[k][j * LDS + r] = !past ? row[r][blk * COLS + j] : k == 0 ? -INFINITY : beyond;
                    }
            bool want_large = false;
            for (int r = 0; r < ROWS; r++)
                for (int j = 0; j < reach[kind][r]; j++) want_large |= fabsf(row[r][blk * COLS + j]) > 16.0f;
            bool large0 = kt->softmax_step(s[0], LDS, ROWS, COLS, max[0], sum[0], scale[0], INFINITY, NULL);
            bool large1 = kt->softmax_step(s[1], LDS, ROWS, COLS, max[1], sum[1], scale[1], 16.0f, reach[kind]);
            wrong_large += large0 || large1 != want_large;
            for (int r = 0; r < ROWS; r++) {
                bad += memcmp(&max[0][r], &max[1][r], sizeof(float)) != 0;
                bad += memcmp(&sum[0][r], &sum[1][r], sizeof(float)) != 0;
                bad += memcmp(&scale[0][r], &scale[1][r], sizeof(float)) != 0;
                for (int j = 0; j < COLS; j++)
                    bad += memcmp(&s[0][j * LDS + r], &s[1][j * LDS + r], sizeof(float)) != 0;
            }
        }
    }
    CHECK(bad == 0, "%s softmax_step with reaches: %d values differ from the masked step", kt->name, bad);
    CHECK(wrong_large == 0, "%s softmax_step with reaches: %d wrong answers to whether a score is large", kt->name,
          wrong_large);
}

/* 2^(s log2 e - a) as kernels.h states softmax_step's probabilities, in
 * double from y as the kernel rounds it (one FMA); 0 below 2^-126. */
static double step_probability(float s, float anchor)
{
    double y = (double)fmaf(s, MHA_EXP_LOG2E, -anchor);
    return y < MHA_EXP2_MIN_INPUT ? 0.0 : exp2(y);
}

/* Two steps of softmax_step over a row split in two blocks must give the
 * statistics of the whole row: its maximum, probabilities against the
 * anchor of the maximum so far, a power-of-two scale between the blocks'
 * anchors, and a sum that is exp(s - m) summed times the row's factor
 * 2^offset (kernels.h). */
static void test_softmax_step(const mha__kernels *kt)
{
    enum { ROWS = 21, COLS = 37, LDS = 24 }; /* 21 queries: a tail in every vector width */
    float s[COLS * LDS], max[ROWS], sum[ROWS], scale[ROWS], row[ROWS][2 * COLS];
    for (int r = 0; r < ROWS; r++) {
        max[r] = -INFINITY;
        sum[r] = 0;
        for (int j = 0; j < 2 * COLS; j++) row[r][j] = uniform() * 20.0f;
    }
    for (int j = 0; j < 2 * COLS; j++) /* differences down to -90, past where exp underflows */
        row[4][j] = j == 7 ? 0.0f : -80.0f - 10.0f * (float)j / (2 * COLS);
    for (int j = 0; j < 2 * COLS; j++) row[1][j] = -INFINITY; /* fully masked row */
    for (int j = 0; j < COLS; j++) row[2][j] = -INFINITY;     /* first block masked */
    row[3][5] = -INFINITY;
    for (int j = 0; j < 2 * COLS; j++) row[5][j] = 300.0f + uniform(); /* large logits */
    row[5][COLS + 3] = 303.0f;                                         /* the anchor moves */
    int bad = 0;
    float first_anchor[ROWS];
    for (int blk = 0; blk < 2; blk++) {
        for (int r = 0; r < ROWS; r++) /* key-major: s[key * LDS + query] */
            for (int j = 0; j < COLS; j++) s[j * LDS + r] = row[r][blk * COLS + j];
        kt->softmax_step(s, LDS, ROWS, COLS, max, sum, scale, INFINITY, NULL);
        for (int r = 0; r < ROWS; r++) {
            double m = -INFINITY;
            for (int j = 0; j < (blk + 1) * COLS; j++) m = fmax(m, row[r][j]);
            bad += max[r] != (float)m && !(isinf(m) && max[r] == -INFINITY);
            float anchor = isinf(m) ? 0.0f : mha__softmax_anchor((float)m);
            for (int j = 0; j < COLS; j++) {
                double want = isinf(m) ? 0.0 : step_probability(row[r][blk * COLS + j], anchor);
                bad += fabs(s[j * LDS + r] - want) > 4 * FLT_EPSILON * (want + 1e-30);
            }
            if (blk == 1 && !isinf(m)) /* an exact power of two, 1 while the anchor stays */
                bad += first_anchor[r] == -INFINITY ? scale[r] != 0.0f : scale[r] != exp2f(first_anchor[r] - anchor);
            if (blk == 0) first_anchor[r] = isinf(m) ? -INFINITY : anchor;
        }
    }
    int scale_exp; /* the anchor moved up by 2 to 4 (x log2 e): a power of two below 1, whatever the draw */
    CHECK(scale[5] > 0.0f && scale[5] < 1.0f && frexpf(scale[5], &scale_exp) == 0.5f,
          "%s softmax_step: the large row's scale %g, not the anchor's move", kt->name, (double)scale[5]);
    for (int r = 0; r < ROWS; r++) {
        double m = -INFINITY, want = 0;
        for (int j = 0; j < 2 * COLS; j++) m = fmax(m, row[r][j]);
        for (int j = 0; j < 2 * COLS && !isinf(m); j++) want += exp((double)row[r][j] - m);
        if (!isinf(m)) want *= exp2((double)m * MHA_EXP_LOG2E - mha__softmax_anchor((float)m));
        bad += fabs(sum[r] - want) > 16 * FLT_EPSILON * want;
    }
    CHECK(bad == 0, "%s softmax_step: %d mismatches", kt->name, bad);
    CHECK(sum[1] == 0.0f && max[1] == -INFINITY, "%s: masked row has sum %g", kt->name, (double)sum[1]);
}

/* How many of the step's 2^y for scores s_in (one key, n queries, anchor
 * 0) are more than 1 FLT_EPSILON from exp2 in double. */
static int exp2_misses(const mha__kernels *kt, const float *s_in, int n)
{
    enum { N = 8192 };
    static float s[N], max[N], sum[N], scale[N];
    int bad = 0;
    for (int i = 0; i < n; i++) {
        s[i] = s_in[i];
        max[i] = 0.0f; /* anchor 0: y = s log2 e */
        sum[i] = 0.0f;
    }
    kt->softmax_step(s, N, n, 1, max, sum, scale, INFINITY, NULL); /* one key, n queries */
    for (int i = 0; i < n; i++) {
        double want = step_probability(s_in[i], 0.0f);
        bad += fabs(s[i] - want) > FLT_EPSILON * want;
    }
    return bad;
}

/* softmax_step's 2^y over y from -130.25 to 0, 4096 steps that land on
 * every part of [0, 1) for the fraction, and over [-2, 0] at 2^-12 steps:
 * within 1 FLT_EPSILON of exp2 in double (the vector kernels' polynomial
 * measures at most 0.79 over every float y in [-126, 0], exp_poly.h;
 * generic's libm exp2f less), 0 below 2^-126, and exactly 1 at 0.  The
 * bound was 4 FLT_EPSILON, which passed a 2^y five times less exact. */
static void test_softmax_exp2(const mha__kernels *kt)
{
    enum { WIDE = 4096, NEAR = 8192 };
    static float wide[WIDE], near[NEAR];
    for (int i = 0; i < WIDE; i++) wide[i] = -130.25f * (float)(WIDE - 1 - i) / (WIDE - 1) * logf(2.0f);
    for (int i = 0; i < NEAR; i++) near[i] = -2.0f * (float)i / NEAR / MHA_EXP_LOG2E;
    int bad = exp2_misses(kt, wide, WIDE) + exp2_misses(kt, near, NEAR);
    float x = 0.0f, m = 0.0f, l = 0.0f, sc; /* y = 0: exactly 1, so a score at an integer anchor is 1 */
    kt->softmax_step(&x, 1, 1, 1, &m, &l, &sc, INFINITY, NULL);
    bad += x != 1.0f || sc != 1.0f;
    CHECK(bad == 0, "%s softmax_step's 2^y: %d values off", kt->name, bad);
    /* A step may flush subnormal results to zero inside (avx512.c's) but
     * must leave the caller's arithmetic as it was: a subnormal product. */
    volatile float tiny = 0x1p-130f, half = 0.5f;
    CHECK(tiny * half == 0x1p-131f, "%s softmax_step left subnormal results flushed to zero", kt->name);
}

/* p = exp(s - shift) * mul and ds = p (dp - delta), key-major, every tail. */
static void test_softmax_grad(const mha__kernels *kt)
{
    enum { ROWS = 21, COLS = 13, LDS = 24 };
    float s[COLS * LDS], dp[COLS * LDS], s0[COLS * LDS], dp0[COLS * LDS], shift[ROWS], mul[ROWS], delta[ROWS];
    for (int r = 0; r < ROWS; r++) {
        shift[r] = uniform() * 10.0f + 12.0f;
        mul[r] = 0.5f + 0.5f * fabsf(uniform());
        delta[r] = uniform();
    }
    for (int i = 0; i < COLS * LDS; i++) {
        s0[i] = uniform() * 10.0f;
        dp0[i] = uniform() * 3.0f;
    }
    s0[3 * LDS + 4] = -INFINITY;    /* a masked score */
    shift[7] = 0.0f, mul[7] = 0.0f; /* a row that saw nothing, as the callers pass it */
    for (int j = 0; j < COLS; j++) s0[j * LDS + 7] = -INFINITY;
    int bad = 0;
    for (int rows = 1; rows <= ROWS; rows += 4) {
        memcpy(s, s0, sizeof s);
        memcpy(dp, dp0, sizeof dp);
        kt->softmax_grad(s, dp, LDS, rows, COLS, shift, mul, delta);
        for (int j = 0; j < COLS; j++)
            for (int r = 0; r < LDS; r++) {
                int at = j * LDS + r;
                if (r >= rows) { /* outside the tile: untouched */
                    bad += s[at] != s0[at] || dp[at] != dp0[at];
                    continue;
                }
                double p = exp((double)(s0[at] - shift[r])) * mul[r], ds = p * ((double)dp0[at] - delta[r]);
                bad += fabs(s[at] - p) > 4 * FLT_EPSILON * p;
                bad += fabs(dp[at] - ds) > 8 * FLT_EPSILON * (p * (fabs(dp0[at]) + fabs(delta[r])) + 1e-30);
            }
    }
    CHECK(bad == 0, "%s softmax_grad: %d mismatches", kt->name, bad);
}

/* The rows test_rows reads: float32, bf16 or int8 with a scale per row;
 * kv holds their values as float32 (exact for bf16, and within a rounding
 * of scale * integer for int8). */
enum { ROWS_N = 13, ROWS_D = 133, ROWS_LD = 140 };
typedef struct rows_case {
    const mha__kernels *kt;      /* float32 or int8 rows (with i8) */
    const mha__bf16_kernels *bk; /* bf16 rows */
    bool i8;
    float kv[ROWS_N * ROWS_LD], scale[ROWS_N];
    uint16_t kv16[ROWS_N * ROWS_LD];
    int8_t kv8[ROWS_N * ROWS_LD];
} rows_case;

static void fill_rows(rows_case *r)
{
    for (int j = 0; j < ROWS_N; j++) r->scale[j] = j == 2 ? 0.0f : (float)fabs(uniform()) * 0.05f;
    for (int i = 0; i < ROWS_N * ROWS_LD; i++) {
        r->kv16[i] = mha__f32_to_bf16(uniform());
        r->kv8[i] = (int8_t)(uniform() * 127.0);
        r->kv[i] = r->bk ? mha__bf16_to_f32(r->kv16[i]) : r->i8 ? r->scale[i / ROWS_LD] * r->kv8[i] : uniform();
    }
}

static void rows_dot(const rows_case *r, int n, const float *q, int d, float *s)
{
    if (r->bk) r->bk->dot_rows(r->kv16, ROWS_LD, n, q, d, s);
    else if (r->i8) r->kt->dot_rows_i8(r->kv8, ROWS_LD, n, r->scale, q, d, s);
    else r->kt->dot_rows(r->kv, ROWS_LD, n, q, d, s);
}

static void rows_axpy(const rows_case *r, const float *p, int n, int d, float *o)
{
    if (r->bk) r->bk->axpy_rows(p, r->kv16, ROWS_LD, n, d, o);
    else if (r->i8) r->kt->axpy_rows_i8(p, r->scale, r->kv8, ROWS_LD, n, d, o);
    else r->kt->axpy_rows(p, r->kv, ROWS_LD, n, d, o);
}

/* Whether float32, bf16 or int8 rows' prefetching forms, where the table
 * has them, differ from the plain ones by a bit: scores s (the plain
 * dot's) and a sum. */
static int far_rows_differ(const rows_case *r, int n, const float *q, const float *p, int d, const float *s)
{
    float s_far[ROWS_N], o[ROWS_D] = {0}, o_far[ROWS_D] = {0};
    if (r->bk && r->bk->dot_rows_far) {
        r->bk->dot_rows_far(r->kv16, ROWS_LD, n, q, d, s_far);
        r->bk->axpy_rows(p, r->kv16, ROWS_LD, n, d, o);
        r->bk->axpy_rows_far(p, r->kv16, ROWS_LD, n, d, o_far);
    } else if (!r->bk && r->i8 && r->kt->dot_rows_i8_far) {
        r->kt->dot_rows_i8_far(r->kv8, ROWS_LD, n, r->scale, q, d, s_far);
        r->kt->axpy_rows_i8(p, r->scale, r->kv8, ROWS_LD, n, d, o);
        r->kt->axpy_rows_i8_far(p, r->scale, r->kv8, ROWS_LD, n, d, o_far);
    } else if (!r->bk && !r->i8 && r->kt->dot_rows_far) {
        r->kt->dot_rows_far(r->kv, ROWS_LD, n, q, d, s_far);
        r->kt->axpy_rows(p, r->kv, ROWS_LD, n, d, o);
        r->kt->axpy_rows_far(p, r->kv, ROWS_LD, n, d, o_far);
    } else {
        return 0;
    }
    return (memcmp(s, s_far, sizeof(float) * (size_t)n) != 0) + (memcmp(o, o_far, sizeof o) != 0);
}

/* dot_rows and axpy_rows (float32, bf16 with bk, or int8 with i8 keys and
 * values) against double over every tail of n and d; int8 rows may be off
 * by one more rounding (the scale's). */
static void test_rows(const mha__kernels *kt, const mha__bf16_kernels *bk, bool i8)
{
    enum { N = ROWS_N, D = ROWS_D, LD = ROWS_LD };
    static rows_case r;
    r.kt = kt, r.bk = bk, r.i8 = i8;
    fill_rows(&r);
    const float *kv = r.kv;
    float q[D], s[N + 1], o[D + 1], o0[D + 1], p[N];
    for (int i = 0; i < D; i++) q[i] = uniform();
    for (int i = 0; i < N; i++) p[i] = uniform();
    int bad = 0;
    for (int n = 0; n <= N; n += 3)
        for (int d = 1; d <= D; d += 11) {
            s[n] = 42.0f;
            rows_dot(&r, n, q, d, s);
            bad += s[n] != 42.0f; /* nothing written past n */
            bad += far_rows_differ(&r, n, q, p, d, s);
            for (int j = 0; j < n; j++) {
                double want = 0, mag = 0;
                for (int c = 0; c < d; c++)
                    want += (double)q[c] * kv[j * LD + c], mag += fabs((double)q[c] * kv[j * LD + c]);
                bad += fabs(s[j] - want) > (d + (i8 ? 3 : 1)) * FLT_EPSILON * mag + 1e-30;
            }
            for (int c = 0; c <= D; c++) o[c] = o0[c] = uniform();
            rows_axpy(&r, p, n, d, o);
            bad += o[d] != o0[d];
            for (int c = 0; c < d; c++) {
                double want = o0[c], mag = fabs(o0[c]);
                for (int j = 0; j < n; j++)
                    want += (double)p[j] * kv[j * LD + c], mag += fabs((double)p[j] * kv[j * LD + c]);
                bad += fabs(o[c] - want) > (n + (i8 ? 3 : 1)) * FLT_EPSILON * mag + 1e-30;
            }
        }
    CHECK(bad == 0, "%s%s dot_rows/axpy_rows: %d mismatches",
          bk   ? "bf16 "
          : i8 ? "int8 "
               : "",
          bk ? bk->name : kt->name, bad);
}

/* A rows_case's multi-row dot and sum (far: the prefetching forms);
 * false where its table has none. */
static bool rows_multi(const rows_case *r, bool far, int rows, const float *const *q, const float *const *p, int n,
                       int d, float *const *s, float *const *o)
{
    const mha__kernels *kt = r->kt;
    const mha__bf16_kernels *bk = r->bk;
    if (bk && (far ? bk->dot_rows_multi_far : bk->dot_rows_multi)) {
        (far ? bk->dot_rows_multi_far : bk->dot_rows_multi)(r->kv16, ROWS_LD, n, rows, q, d, s);
        (far ? bk->axpy_rows_multi_far : bk->axpy_rows_multi)(rows, p, r->kv16, ROWS_LD, n, d, o);
    } else if (!bk && r->i8 && (far ? kt->dot_rows_i8_multi_far : kt->dot_rows_i8_multi)) {
        (far ? kt->dot_rows_i8_multi_far : kt->dot_rows_i8_multi)(r->kv8, ROWS_LD, n, r->scale, rows, q, d, s);
        (far ? kt->axpy_rows_i8_multi_far : kt->axpy_rows_i8_multi)(rows, p, r->scale, r->kv8, ROWS_LD, n, d, o);
    } else if (!bk && !r->i8 && (far ? kt->dot_rows_multi_far : kt->dot_rows_multi)) {
        (far ? kt->dot_rows_multi_far : kt->dot_rows_multi)(r->kv, ROWS_LD, n, rows, q, d, s);
        (far ? kt->axpy_rows_multi_far : kt->axpy_rows_multi)(rows, p, r->kv, ROWS_LD, n, d, o);
    } else {
        return false;
    }
    return true;
}

/* The multi-row dots and sums (plain and far) of float32, int8 or bf16
 * rows, where the table has them: for 1 to MHA_ROWS_AT_ONCE rows, over
 * every tail of n (the four-key blocks and the lone keys) and d (whole
 * and masked slices and 64-column blocks), each row's scores and sums the
 * one-row kernels' to the bit, and nothing written past n or d, or to
 * rows past `rows`. */
static void test_rows_multi(const mha__kernels *kt, const mha__bf16_kernels *bk, bool i8)
{
    enum { N = ROWS_N, D = ROWS_D, R = MHA_ROWS_AT_ONCE };
    static rows_case r;
    r.kt = kt, r.bk = bk, r.i8 = i8;
    fill_rows(&r);
    float q[R][D], s[R][N + 1], s1[N], p[R][N], o[R][D + 1], o1[D + 1];
    for (int i = 0; i < R; i++) {
        for (int c = 0; c < D; c++) q[i][c] = uniform();
        for (int j = 0; j < N; j++) p[i][j] = uniform();
    }
    const float *qp[R] = {q[0], q[1], q[2], q[3]}, *pp[R] = {p[0], p[1], p[2], p[3]};
    float *sp[R] = {s[0], s[1], s[2], s[3]}, *op[R] = {o[0], o[1], o[2], o[3]};
    int bad = 0, ran = 0;
    for (int far = 0; far < 2; far++)
        for (int rows = 1; rows <= R; rows++)
            for (int n = 0; n <= N; n++)
                for (int d = 1; d <= D; d += 4) {
                    for (int i = 0; i < R; i++) {
                        s[i][n] = 42.0f;
                        for (int c = 0; c <= D; c++) o[i][c] = (float)(i + c);
                    }
                    if (!rows_multi(&r, far, rows, qp, pp, n, d, sp, op)) continue;
                    ran++;
                    for (int i = 0; i < rows; i++) {
                        rows_dot(&r, n, q[i], d, s1);
                        for (int c = 0; c <= D; c++) o1[c] = (float)(i + c);
                        rows_axpy(&r, p[i], n, d, o1);
                        bad += memcmp(s[i], s1, sizeof(float) * (size_t)n) != 0 || s[i][n] != 42.0f;
                        bad += memcmp(o[i], o1, sizeof o1) != 0;
                    }
                    for (int i = rows; i < R; i++)
                        bad += s[i][n] != 42.0f || o[i][0] != (float)i; /* rows past `rows` */
                }
    CHECK(bad == 0, "%s%s multi-row dots and sums (%d calls): %d differ from one row at a time",
          bk   ? "bf16 "
          : i8 ? "int8 "
               : "",
          bk ? bk->name : kt->name, ran, bad);
}

/* P's turn into rows: every element rounded as the scalar rounding does,
 * over sizes around the 16 x 16 blocks, nothing written outside rows x cols
 * of dst. */
static void test_bf16_transpose(const mha__bf16_kernels *bk)
{
    enum { MAX = 40, LDS = MAX + 3, LDD = MAX + 5 };
    static const int64_t sizes[] = {1, 3, 15, 16, 17, 32, 40};
    enum { N_SIZES = sizeof sizes / sizeof sizes[0] };
    float src[MAX * LDS];
    uint16_t dst[(MAX + 1) * LDD];
    for (int i = 0; i < MAX * LDS; i++) src[i] = uniform() * 100.0f;
    int bad = 0;
    for (int ri = 0; ri < N_SIZES; ri++)
        for (int ci = 0; ci < N_SIZES; ci++) {
            int64_t rows = sizes[ri], cols = sizes[ci];
            memset(dst, 0xab, sizeof dst);
            bk->transpose(dst, LDD, src, LDS, rows, cols);
            for (int64_t r = 0; r <= MAX; r++)
                for (int64_t c = 0; c < LDD; c++) {
                    uint16_t want = r < rows && c < cols ? mha__f32_to_bf16(src[c * LDS + r]) : 0xabab;
                    bad += dst[r * LDD + c] != want;
                }
        }
    CHECK(bad == 0, "%s bf16 transpose: %d wrong or out-of-range values", bk->name, bad);
}

/* The sums of P's rounded rows, from a running sum: within float32
 * rounding of the exact (double) sums over sizes around the 32-key
 * vectors and 4-row passes; a NaN makes its row's sum NaN; nothing
 * written beyond rows, nothing read beyond cols (those keys are NaN). */
static void test_bf16_row_sums(const mha__bf16_kernels *bk)
{
    enum { MAX = 80, LD = MAX + 6 };
    static const int64_t sizes[] = {1, 3, 4, 5, 15, 31, 32, 33, 64, 80};
    enum { N_SIZES = sizeof sizes / sizeof sizes[0] };
    uint16_t p[MAX * LD];
    float sum[MAX + 1];
    for (int i = 0; i < MAX * LD; i++) p[i] = mha__f32_to_bf16(i % 7 == 0 ? 0.0f : 0.5f + 0.5f * uniform());
    int bad = 0;
    for (int ri = 0; ri < N_SIZES; ri++)
        for (int ci = 0; ci < N_SIZES; ci++) {
            int64_t rows = sizes[ri], cols = sizes[ci];
            for (int64_t r = 0; r < rows; r++) p[r * LD + cols] = 0x7fc0; /* a NaN just past the keys */
            for (int64_t r = 0; r <= MAX; r++) sum[r] = r < rows ? 3.0f * (float)r : -1.0f;
            bk->row_sums(p, LD, rows, cols, sum);
            for (int64_t r = 0; r <= MAX; r++) {
                double want = r < rows ? 3.0 * (double)r : -1.0;
                for (int64_t c = 0; r < rows && c < cols; c++) want += mha__bf16_to_f32(p[r * LD + c]);
                bad += !(fabs(sum[r] - want) <= 2.0 * (double)cols * FLT_EPSILON * fabs(want));
            }
            for (int64_t r = 0; r < rows; r++) p[r * LD + cols] = mha__f32_to_bf16(0.75f);
        }
    p[2 * LD + 1] = 0x7fc0;
    sum[2] = 0.0f;
    bk->row_sums(p, LD, 3, 40, sum);
    CHECK(bad == 0 && isnan(sum[2]), "%s bf16 row_sums: %d rows wrong, a NaN row gives %g", bk->name, bad,
          (double)sum[2]);
}

/* The bf16 kernels: the product over sizes around every tile edge (the
 * register tiles' 12 x 32, AMX's 16 x 16 and 32 x 32, k steps of 32), both
 * A layouts (row-major and pairs of rows) and both accumulate modes,
 * writing nothing outside C's m x n, with sums within float32 rounding of
 * the exact (double) ones; and the conversions against the scalar
 * rounding. */
static void test_bf16_kernels(const mha__bf16_kernels *bk)
{
    enum { K_MAX = 200, M_MAX = 50, N_MAX = 50 };
    static const int64_t ks[] = {0, 2, 6, 32, 64, 98, 200}, sizes[] = {1, 3, 5, 12, 13, 16, 17, 32, 33, 50};
    enum { N_SIZES = sizeof sizes / sizeof sizes[0] };
    int64_t lda = K_MAX + 6, ldb = 2 * N_MAX + 10, ldc = N_MAX + 9;
    uint16_t *a = malloc(sizeof(uint16_t) * M_MAX * lda * 2), *b = malloc(sizeof(uint16_t) * (K_MAX / 2) * ldb);
    float *c = malloc(sizeof(float) * (M_MAX + GUARD) * ldc), *c0 = malloc(sizeof(float) * (M_MAX + GUARD) * ldc);
    for (int64_t i = 0; i < M_MAX * lda * 2; i++) a[i] = mha__f32_to_bf16(uniform());
    for (int64_t i = 0; i < (K_MAX / 2) * ldb; i++) b[i] = mha__f32_to_bf16(uniform());
    operand B = {bf16_at, b, 2, ldb, 0, 0}; /* (p, j) at b[(p / 2) * ldb + 2 j + p % 2] */
    int bad = 0;
    for (int layout = 0; layout < 2; layout++)
        for (size_t ki = 0; ki < sizeof ks / sizeof ks[0]; ki++)
            for (int mi = 0; mi < N_SIZES; mi++)
                for (int ni = 0; ni < N_SIZES; ni++)
                    for (int acc = 0; acc < 2; acc++) {
                        int64_t k = ks[ki], m = sizes[mi], n = sizes[ni];
                        /* layout 0: rows of k values; 1: pairs of rows, [k / 2][M_MAX][2]. */
                        int64_t a_rs = layout ? 2 : lda, a_ps = layout ? 2 * M_MAX : 2;
                        for (int64_t i = 0; i < (M_MAX + GUARD) * ldc; i++) c[i] = c0[i] = uniform();
                        bk->gemm(m, n, k, a, a_rs, a_ps, b, ldb, c, ldc, acc);
                        operand A = {bf16_at, a, a_rs, a_ps, 0, 0};
                        bad += product_errors(&A, &B, c, c0, ldc, M_MAX, m, n, k, acc);
                    }
    CHECK(bad == 0, "%s bf16 product: %d wrong or out-of-block values", bk->name, bad);
    test_bf16_transpose(bk);
    test_bf16_row_sums(bk);
    /* Conversions, with tails, against the scalar round-to-nearest-even. */
    enum { N = 37 };
    float x0[N], x1[N];
    uint16_t out[2 * N + 2], want[2 * N + 2];
    for (int i = 0; i < N; i++) x0[i] = uniform() * 300.0f, x1[i] = uniform() * 1e-3f;
    int conv_bad = 0;
    for (int n = 1; n <= N; n += 7) {
        memset(out, 0xab, sizeof out);
        memcpy(want, out, sizeof want);
        for (int i = 0; i < n; i++) want[i] = mha__f32_to_bf16(x0[i]);
        bk->round(out, x0, n);
        conv_bad += memcmp(out, want, sizeof out) != 0;
        memset(out, 0xab, sizeof out);
        memcpy(want, out, sizeof want);
        for (int i = 0; i < n; i++) want[2 * i] = mha__f32_to_bf16(x0[i]), want[2 * i + 1] = mha__f32_to_bf16(x1[i]);
        bk->pairs(out, x0, x1, n);
        conv_bad += memcmp(out, want, sizeof out) != 0;
        for (int i = 0; i < n; i++) want[2 * i + 1] = 0;
        bk->pairs(out, x0, NULL, n);
        conv_bad += memcmp(out, want, sizeof out) != 0;
    }
    CHECK(conv_bad == 0, "%s bf16 conversions: %d mismatches", bk->name, conv_bad);
    free(a);
    free(b);
    free(c);
    free(c0);
}

int main(void)
{
    static const char *const bf16_names[] = {"generic", "avx2", "avx512_bf16", "amx"};
    for (size_t i = 0; i < sizeof bf16_names / sizeof bf16_names[0]; i++) {
        const mha__bf16_kernels *bk = mha__bf16_named(bf16_names[i]);
        if (bk) {
            test_bf16_kernels(bk);
            test_rows(NULL, bk, false);
            test_rows_multi(NULL, bk, false);
        } else printf("test_kernels: bf16 kernels %s not supported here, skipped\n", bf16_names[i]);
    }
    static const char *const names[] = {"generic", "avx2", "avx512"};
    int tested = 0;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const mha__kernels *kt = mha__kernels_named(names[i]);
        if (!kt) {
            printf("test_kernels: %s not supported here, skipped\n", names[i]);
            continue;
        }
        test_gemm_tile(kt);
        test_gemm_tile_grouped(kt);
        test_gemm_tile_exact(kt);
        test_widen(kt);
        test_pair_dots(kt);
        test_exp(kt);
        test_softmax_step(kt);
        test_softmax_step_reach(kt);
        test_softmax_exp2(kt);
        test_softmax_step_special(kt);
        test_softmax_grad(kt);
        test_abs_max(kt);
        test_column_sums(kt);
        test_softmax_step_large(kt);
        test_key_sums(kt);
        test_transpose_scaled(kt);
        test_dots_f64(kt);
        test_dots_f64_panel(kt);
        test_shift_refined(kt);
        test_row_max(kt);
        test_shift_pick(kt);
        test_norm2(kt);
        test_rows(kt, NULL, false);
        test_rows(kt, NULL, true);
        test_rows_multi(kt, NULL, false);
        test_rows_multi(kt, NULL, true);
        tested++;
    }
    CHECK(tested >= 1, "no kernels ran");
    printf("test_kernels: in use here: %s, bf16 kernels %s\n", mha_isa(), mha__bf16_get()->name);
    return harness_finish("test_kernels");
}
