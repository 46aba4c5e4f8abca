/*
 * avx2.c -- kernels for AVX2 with FMA.  Compiled with -mavx2 -mfma; called
 * only when cpu.c has seen the CPU and OS support them.
 *
 * gemm_tile keeps a 6 x 16 tile of C in 12 ymm registers: per step of k it
 * loads two vectors of B and broadcasts six values of A.  Rows past m
 * re-read the last valid row of A and are not stored; columns past n are
 * masked.
 */
#include "kernels/exp_poly.h"
#include "kernels/few_rows.h"
#include "kernels/kernels.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

enum { MR = 6, NR = 16 };

/* Lanes 0 .. n-1 of 8 enabled, as maskload/maskstore want them. */
static __m256i lane_mask(int64_t n)
{
    int64_t k = n < 0 ? 0 : n > 8 ? 8 : n;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* One row of the tile: broadcast A(i, p), two FMAs. */
#define ROW_FMA(i)                                        \
    do {                                                  \
        __m256 a_ = _mm256_broadcast_ss(&r##i[p * a_cs]); \
        c##i##0 = _mm256_fmadd_ps(a_, b0, c##i##0);       \
        c##i##1 = _mm256_fmadd_ps(a_, b1, c##i##1);       \
    } while (0)

/* B's row p, plain or masked (see tile_body). */
#define LOAD_B(off) \
    (full ? _mm256_loadu_ps(b + p * ldb + (off)) : _mm256_maskload_ps(b + p * ldb + (off), (off) ? m1 : m0))

#define ROW_STORE(i)                                                                  \
    do {                                                                              \
        if (i < m) {                                                                  \
            float *ci = c + i * ldc;                                                  \
            if (full) {                                                               \
                if (accumulate) {                                                     \
                    c##i##0 = _mm256_add_ps(c##i##0, _mm256_loadu_ps(ci));            \
                    c##i##1 = _mm256_add_ps(c##i##1, _mm256_loadu_ps(ci + 8));        \
                }                                                                     \
                _mm256_storeu_ps(ci, c##i##0);                                        \
                _mm256_storeu_ps(ci + 8, c##i##1);                                    \
            } else {                                                                  \
                if (accumulate) {                                                     \
                    c##i##0 = _mm256_add_ps(c##i##0, _mm256_maskload_ps(ci, m0));     \
                    c##i##1 = _mm256_add_ps(c##i##1, _mm256_maskload_ps(ci + 8, m1)); \
                }                                                                     \
                _mm256_maskstore_ps(ci, m0, c##i##0);                                 \
                _mm256_maskstore_ps(ci + 8, m1, c##i##1);                             \
            }                                                                         \
        }                                                                             \
    } while (0)

/* The tile, inlined into gemm_tile_avx2 once per case it tells apart, so
 * that constant arguments (m, a_rs or a_cs = 1, full) fold away: with
 * a_cs = 1 the six rows are read through one index, with a_rs = 1 from
 * one pointer, and the loop keeps just its 12 FMAs and 8 loads.  full says
 * n = NR: plain loads and stores (vmaskmovps is slow on some CPUs; AMD
 * microcodes the masked store), masks only for the tails.  Named
 * accumulators, not an array: compilers spill arrays of vectors. */
static inline __attribute__((always_inline)) void tile_body(int64_t m, int64_t n, int64_t k, const float *a,
                                                            int64_t a_rs, int64_t a_cs, const float *b, int64_t ldb,
                                                            float *c, int64_t ldc, int accumulate, int full,
                                                            int64_t groups, int64_t a_gs)
{
    const float *r0 = a, *r1 = a + (1 < m ? 1 : m - 1) * a_rs, *r2 = a + (2 < m ? 2 : m - 1) * a_rs;
    const float *r3 = a + (3 < m ? 3 : m - 1) * a_rs, *r4 = a + (4 < m ? 4 : m - 1) * a_rs;
    const float *r5 = a + (5 < m ? 5 : m - 1) * a_rs;
    __m256i m0 = lane_mask(n), m1 = lane_mask(n - 8);
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int64_t g = 0; g < groups; g++) { /* k steps a group */
        for (int64_t p = 0; p < k; p++) {
            __m256 b0 = LOAD_B(0), b1 = LOAD_B(8);
            ROW_FMA(0);
            ROW_FMA(1);
            ROW_FMA(2);
            ROW_FMA(3);
            ROW_FMA(4);
            ROW_FMA(5);
        }
        r0 += a_gs, r1 += a_gs, r2 += a_gs, r3 += a_gs, r4 += a_gs, r5 += a_gs;
        b += k * ldb;
    }
    ROW_STORE(0);
    ROW_STORE(1);
    ROW_STORE(2);
    ROW_STORE(3);
    ROW_STORE(4);
    ROW_STORE(5);
}

/* Full tiles with A's rows contiguous (K rows in the scores, weight rows
 * in the projections) or its columns contiguous (P^T in P V) take the
 * specialised bodies: 10-25% faster than the general one on Zen 3. */
static void gemm_tile_avx2(int64_t m, int64_t n, int64_t k, const float *a, int64_t a_rs, int64_t a_cs, const float *b,
                           int64_t ldb, float *c, int64_t ldc, int accumulate)
{
    if (n == NR && m == MR && a_cs == 1) tile_body(MR, NR, k, a, a_rs, 1, b, ldb, c, ldc, accumulate, 1, 1, 0);
    else if (n == NR && m == MR && a_rs == 1) tile_body(MR, NR, k, a, 1, a_cs, b, ldb, c, ldc, accumulate, 1, 1, 0);
    else /* kernels/few_rows.h */
        MHA_FEW_ROWS_CALL(m, MR, tile_body(M, n, k, a, a_rs, a_cs, b, ldb, c, ldc, accumulate, n == NR, 1, 0));
}

static void gemm_tile_grouped_avx2(int64_t m, int64_t n, int64_t groups, int64_t gk, const float *a, int64_t a_rs,
                                   int64_t a_gs, const float *b, int64_t ldb, float *c, int64_t ldc, int accumulate)
{
    if (n == NR && m == MR) tile_body(MR, NR, gk, a, a_rs, 1, b, ldb, c, ldc, accumulate, 1, groups, a_gs);
    else MHA_FEW_ROWS_CALL(m, MR, tile_body(M, n, gk, a, a_rs, 1, b, ldb, c, ldc, accumulate, n == NR, groups, a_gs));
}

/* gemm_tile_exact: M rows (1 or 2, a constant once inlined) by 16
 * columns in float64, four ymm of four sums a row (eight accumulators
 * and B's row of four ymm fit the sixteen registers; more rows
 * spilled).  Columns past n are masked off the stores. */
static inline __attribute__((always_inline)) void exact_rows_avx2(int M, int64_t n, int64_t k, const double *a,
                                                                  int64_t lda, const double *b, int64_t ldb,
                                                                  const float *bias, float *const *c)
{
    __m256i lo = lane_mask(n), hi = lane_mask(n - 8);
    __m256 b0 = bias ? _mm256_maskload_ps(bias, lo) : _mm256_setzero_ps();
    __m256 b1 = bias ? _mm256_maskload_ps(bias + 8, hi) : _mm256_setzero_ps();
    __m256d acc[2][4];
    _Pragma("GCC unroll 4") for (int i = 0; i < M; i++)
    {
        acc[i][0] = _mm256_cvtps_pd(_mm256_castps256_ps128(b0));
        acc[i][1] = _mm256_cvtps_pd(_mm256_extractf128_ps(b0, 1));
        acc[i][2] = _mm256_cvtps_pd(_mm256_castps256_ps128(b1));
        acc[i][3] = _mm256_cvtps_pd(_mm256_extractf128_ps(b1, 1));
    }
    for (int64_t p = 0; p < k; p++) {
        const double *row = b + p * ldb;
        __m256d w[4] = {_mm256_loadu_pd(row), _mm256_loadu_pd(row + 4), _mm256_loadu_pd(row + 8),
                        _mm256_loadu_pd(row + 12)};
        _Pragma("GCC unroll 4") for (int i = 0; i < M; i++)
        {
            __m256d x = _mm256_set1_pd(a[i * lda + p]);
            _Pragma("GCC unroll 4") for (int q = 0; q < 4; q++) acc[i][q] = _mm256_fmadd_pd(x, w[q], acc[i][q]);
        }
    }
    _Pragma("GCC unroll 4") for (int i = 0; i < M; i++)
    {
        __m256 r0 = _mm256_set_m128(_mm256_cvtpd_ps(acc[i][1]), _mm256_cvtpd_ps(acc[i][0]));
        __m256 r1 = _mm256_set_m128(_mm256_cvtpd_ps(acc[i][3]), _mm256_cvtpd_ps(acc[i][2]));
        _mm256_maskstore_ps(c[i], lo, r0);
        _mm256_maskstore_ps(c[i] + 8, hi, r1);
    }
}

/* widen: four floats a conversion where they are contiguous. */
static void widen_avx2(double *dst, const float *src, int64_t cs, int64_t n)
{
    int64_t i = 0;
    for (; cs == 1 && i + 4 <= n; i += 4) _mm256_storeu_pd(dst + i, _mm256_cvtps_pd(_mm_loadu_ps(src + i)));
    for (; i < n; i++) dst[i] = src[i * cs];
}

static void gemm_tile_exact_avx2(int64_t m, int64_t n, int64_t k, const double *a, int64_t lda, const double *b,
                                 int64_t ldb, const float *bias, float *const *c)
{
    for (int64_t i = 0; i < m; i += 2) {
        if (m - i >= 2) exact_rows_avx2(2, n, k, a + i * lda, lda, b, ldb, bias, c + i);
        else exact_rows_avx2(1, n, k, a + i * lda, lda, b, ldb, bias, c + i);
    }
}

#define EXP_VEC    __m256
#define EXP_OP(op) _mm256_##op
#include "kernels/exp_estrin.h"

/* exp(x) for 8 lanes, exp_estrin.h's polynomial times 2^n built in the
 * exponent bits: with 127 (the exponent's bias) in the shifter, t's low
 * mantissa bits hold n + 127, which one shift moves into the exponent
 * field.  For x in [-88.0, MAX_INPUT] or NaN: n + 127 stays in [0, 254]
 * (at n + 127 = 0 the field gives 2^n = +0.0).  vminps and vmaxps return
 * their second operand when either is NaN, so the callers' clamps pass a
 * NaN through and it comes out NaN. */
static inline __m256 exp256_clamped(__m256 x)
{
    __m256 t, n, p = exp_reduced(x, _mm256_set1_ps(0x1.8p23f + 127.0f), &t, &n);
    (void)n;
    __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23)); /* (n + 127) << 23 */
    return _mm256_mul_ps(p, two_n);
}

/* exp(x) for any x: clamped to [-87.33, MAX_INPUT], so that 2^n stays a
 * normal float; lanes below -87.33 (subnormal results) give 0, -inf
 * included.  15 instructions. */
static inline __m256 exp256(__m256 x)
{
    const __m256 lowest = _mm256_set1_ps(-87.33f);
    __m256 alive = _mm256_cmp_ps(x, lowest, _CMP_NLT_UQ); /* x >= -87.33 or NaN */
    x = _mm256_max_ps(lowest, _mm256_min_ps(_mm256_set1_ps(MHA_EXP_MAX_INPUT), x));
    return _mm256_and_ps(exp256_clamped(x), alive);
}

/* 2^y for 8 lanes of y <= 1, -inf or NaN (softmax_step's): r = y -
 * floor(y) in [0, 1], and 2^floor(y) built in the exponent bits as
 * exp256_clamped builds 2^n.  y is clamped below at -127, where the field
 * gives +0.0: every 2^y below 2^-126 comes out 0, -inf included, as
 * avx512.c's flush to zero gives.  vmaxps returns its second operand
 * when either is NaN, so a NaN passes the clamp and comes out NaN. */
static inline __m256 exp2_256(__m256 y)
{
    y = _mm256_max_ps(_mm256_set1_ps(MHA_EXP2_MIN_INPUT - 1.0f), y);
    __m256 n = _mm256_floor_ps(y);
    __m256 t = _mm256_add_ps(n, _mm256_set1_ps(0x1.8p23f + 127.0f)); /* low bits: n + 127 in [0, 128] */
    __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23));
    return _mm256_mul_ps(exp2_fraction(_mm256_sub_ps(y, n)), two_n);
}

/* mha__softmax_anchor for 8 lanes. */
static inline __m256 anchor256(__m256 m) { return _mm256_ceil_ps(_mm256_mul_ps(m, _mm256_set1_ps(MHA_EXP_LOG2E))); }

/* Loads and stores of the 8 queries at column i: plain when all 8 are
 * rows (every vector but a tile's last), masked otherwise -- AMD
 * microcodes vmaskmovps stores, which made them a third of the softmax
 * step's time. */
#define LOAD8(ptr)       (full ? _mm256_loadu_ps(ptr) : _mm256_maskload_ps((ptr), mk))
#define STORE8(ptr, val) (full ? _mm256_storeu_ps((ptr), (val)) : _mm256_maskstore_ps((ptr), mk, (val)))

/* The keys [0, cols) seen by all of the first `lanes` lanes' limits
 * (the others are 0), and those [0, *some) seen by at least one. */
static inline int64_t keys_seen_by_all8(const int32_t *limit, __m256i mk, int64_t cols, int64_t *some)
{
    int32_t live[8];
    _mm256_storeu_si256((__m256i *)(void *)live, mk);
    int64_t all = cols, any = 0;
    for (int k = 0; k < 8; k++) {
        if (!live[k]) continue;
        all = limit[k] < all ? limit[k] : all;
        any = limit[k] > any ? limit[k] : any;
    }
    *some = any < cols ? any : cols;
    return all < *some ? all : *some;
}

/* softmax_step for the queries i .. i+7 (those of mk); inlined twice, with
 * full = 1 and 0, so the test on `full` disappears, and again with a
 * reach for each lane (`limit`, NULL for none), so that the plain step
 * keeps its loop.  Keys past a lane's reach are loaded as -inf (left out
 * of the maximum, exp 0) and as +inf for the minimum.  Only the keys some
 * lane sees but not all take the masked loops: those all see take the
 * plain ones (four chains for the maximum, where one masked chain waited
 * a vmaxps latency a key), and those none sees are stored 0. */
static inline __attribute__((always_inline)) bool softmax_step8(float *s, int64_t lds, int64_t cols, float *max,
                                                                float *sum, float *scale, float above, __m256i mk,
                                                                int full, const int32_t *limit)
{
    const __m256 neg_inf = _mm256_set1_ps(-INFINITY), pos_inf = _mm256_set1_ps(INFINITY), one = _mm256_set1_ps(1.0f);
    __m256 old_max = LOAD8(max), m0 = neg_inf, m1 = neg_inf, m2 = neg_inf, m3 = neg_inf;
    __m256 n0 = pos_inf, n1 = pos_inf, n2 = pos_inf, n3 = pos_inf;
    /* vmaxps(x, m) returns m when x is NaN: the maximum skips NaN scores,
     * and a NaN score still makes its row NaN, as a plain softmax does:
     * its exp is NaN, so the row's sum is NaN from here on, and so are its
     * output (P V and the division by the sum) and its lse.  Lanes past
     * the rows are computed on whatever maskload gave (0) and not stored.
     * Four running maxima and minima, as avx512.c's column_max keeps. */
    const __m256i lim = limit ? _mm256_loadu_si256((const __m256i *)(const void *)limit) : _mm256_setzero_si256();
#define SEEN8(j) _mm256_castsi256_ps(_mm256_cmpgt_epi32(lim, _mm256_set1_epi32((int)(j))))
    int64_t some = cols, all = limit ? keys_seen_by_all8(limit, mk, cols, &some) : cols, j = 0;
    for (; j + 4 <= all; j += 4) {
        __m256 x0 = LOAD8(s + j * lds), x1 = LOAD8(s + (j + 1) * lds), x2 = LOAD8(s + (j + 2) * lds);
        __m256 x3 = LOAD8(s + (j + 3) * lds);
        m0 = _mm256_max_ps(x0, m0), m1 = _mm256_max_ps(x1, m1), m2 = _mm256_max_ps(x2, m2), m3 = _mm256_max_ps(x3, m3);
        n0 = _mm256_min_ps(x0, n0), n1 = _mm256_min_ps(x1, n1), n2 = _mm256_min_ps(x2, n2), n3 = _mm256_min_ps(x3, n3);
    }
    for (; j < all; j++) {
        __m256 x = LOAD8(s + j * lds);
        m0 = _mm256_max_ps(x, m0), n0 = _mm256_min_ps(x, n0);
    }
    for (; j < some; j++) {
        __m256 x = LOAD8(s + j * lds), seen_j = SEEN8(j);
        m0 = _mm256_max_ps(_mm256_blendv_ps(neg_inf, x, seen_j), m0);
        n0 = _mm256_min_ps(_mm256_blendv_ps(pos_inf, x, seen_j), n0);
    }
    __m256 tile_max = _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3));
    __m256 tile_min = _mm256_min_ps(_mm256_min_ps(n0, n1), _mm256_min_ps(n2, n3));
    __m256 new_max = _mm256_max_ps(tile_max, old_max);
    /* Lanes past the rows saw 0 (maskload): never above. */
    __m256 large = _mm256_or_ps(_mm256_cmp_ps(tile_max, _mm256_set1_ps(above), _CMP_GT_OQ),
                                _mm256_cmp_ps(tile_min, _mm256_set1_ps(-above), _CMP_LT_OQ));
    /* Queries that still see nothing take anchor 0, so their -inf scores give 0. */
    __m256 seen = _mm256_cmp_ps(new_max, neg_inf, _CMP_NEQ_UQ);
    __m256 anchor = _mm256_and_ps(anchor256(new_max), seen), block_sum = _mm256_setzero_ps();
    const __m256 log2e = _mm256_set1_ps(MHA_EXP_LOG2E);
    for (j = 0; j < some; j++) { /* past them the exponentials are 0: adding them adds +0 */
        __m256 x = LOAD8(s + j * lds);
        if (j >= all) x = _mm256_blendv_ps(neg_inf, x, SEEN8(j));
        __m256 e = exp2_256(_mm256_fmsub_ps(x, log2e, anchor));
        STORE8(s + j * lds, e);
        block_sum = _mm256_add_ps(block_sum, e);
    }
    for (; j < cols; j++) STORE8(s + j * lds, _mm256_setzero_ps());
#undef SEEN8
    __m256 sc = _mm256_blendv_ps(one, exp2_256(_mm256_sub_ps(anchor256(old_max), anchor)), seen);
    __m256 new_sum = _mm256_fmadd_ps(LOAD8(sum), sc, block_sum);
    STORE8(scale, sc);
    STORE8(sum, new_sum);
    STORE8(max, new_max);
    return _mm256_movemask_ps(large) != 0;
}

/* The lanes' reaches as 32-bit integers (0 past the rows). */
static void lane_limits(const int64_t *reach, int64_t lanes, int32_t limit[8])
{
    for (int64_t k = 0; k < 8; k++) limit[k] = k < lanes ? (int32_t)reach[k] : 0;
}

static bool softmax_step_avx2(float *s, int64_t lds, int64_t rows, int64_t cols, float *max, float *sum, float *scale,
                              float above, const int64_t *reach)
{
    bool large = false;
    int32_t limit[8];
    int64_t i = 0;
    for (; i + 8 <= rows; i += 8) { /* 8 queries per vector */
        if (!reach) {
            large |= softmax_step8(s + i, lds, cols, max + i, sum + i, scale + i, above, lane_mask(8), 1, NULL);
            continue;
        }
        lane_limits(reach + i, 8, limit);
        large |= softmax_step8(s + i, lds, cols, max + i, sum + i, scale + i, above, lane_mask(8), 1, limit);
    }
    if (i == rows) return large;
    if (reach) lane_limits(reach + i, rows - i, limit);
    return large | softmax_step8(s + i, lds, cols, max + i, sum + i, scale + i, above, lane_mask(rows - i), 0,
                                 reach ? limit : NULL);
}

static inline __attribute__((always_inline)) void softmax_grad8(float *s, float *dp, int64_t lds, int64_t cols,
                                                                const float *shift, const float *mul,
                                                                const float *delta, __m256i mk, int full)
{
    __m256 sh = LOAD8(shift), mu = LOAD8(mul), de = LOAD8(delta);
    for (int64_t j = 0; j < cols; j++) {
        float *sj = s + j * lds, *dj = dp + j * lds;
        __m256 p = _mm256_mul_ps(exp256(_mm256_sub_ps(LOAD8(sj), sh)), mu);
        STORE8(sj, p);
        STORE8(dj, _mm256_mul_ps(p, _mm256_sub_ps(LOAD8(dj), de)));
    }
}

static void softmax_grad_avx2(float *s, float *dp, int64_t lds, int64_t rows, int64_t cols, const float *shift,
                              const float *mul, const float *delta)
{
    int64_t i = 0;
    for (; i + 8 <= rows; i += 8) /* 8 queries per vector, as softmax_step */
        softmax_grad8(s + i, dp + i, lds, cols, shift + i, mul + i, delta + i, lane_mask(8), 1);
    if (i < rows) softmax_grad8(s + i, dp + i, lds, cols, shift + i, mul + i, delta + i, lane_mask(rows - i), 0);
}

static float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 floats of a row at x + c: plain when all 8 lie before the row's end
 * d, masked for its tail (AMD microcodes the masked forms). */
static inline __m256 row_load(const float *x, int64_t c, int64_t d)
{
    return c + 8 <= d ? _mm256_loadu_ps(x + c) : _mm256_maskload_ps(x + c, lane_mask(d - c));
}

/* 8 bf16 values of a row at x + c as float32 (exact: the bits shifted
 * into the high half); past the row's end d, zeros. */
static inline __m256 bf16_row_load(const uint16_t *x, int64_t c, int64_t d)
{
    __m128i raw;
    if (c + 8 <= d) {
        raw = _mm_loadu_si128((const __m128i *)(x + c));
    } else {
        uint16_t tail[8] = {0};
        for (int64_t i = 0; c + i < d; i++) tail[i] = x[c + i];
        raw = _mm_loadu_si128((const __m128i *)tail);
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

/* Decoding's row kernels, once for float32 rows and once for bf16 rows
 * (a bf16 KV cache). */
#define ROWS_KEYWISE
#define ROWS_ELEM          float
#define ROWS_LOAD(x, c, d) row_load((x), (c), (d))
#define ROWS_DOT           dot_rows_avx2
#define ROWS_AXPY64        axpy64_avx2
#define ROWS_AXPY          axpy_rows_avx2
#include "kernels/rows_avx2.h"

#define ROWS_ELEM          uint16_t
#define ROWS_LOAD(x, c, d) bf16_row_load((x), (c), (d))
#define ROWS_DOT           dot_rows_bf16_avx2
#define ROWS_AXPY64        axpy64_bf16_avx2
#define ROWS_AXPY          axpy_rows_bf16_avx2
#include "kernels/rows_avx2.h"

/* 8 int8 values of a row at x + c as float32 (exact); past the row's
 * end d, zeros. */
static inline __m256 i8_row_load(const int8_t *x, int64_t c, int64_t d)
{
    __m128i raw;
    if (c + 8 <= d) {
        raw = _mm_loadl_epi64((const __m128i *)(x + c));
    } else {
        int8_t tail[16] = {0};
        memcpy(tail, x + c, (size_t)(d - c));
        raw = _mm_loadu_si128((const __m128i *)tail);
    }
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
}

/* And once for int8 rows with a scale each (an int8 KV cache), each row
 * prefetched as avx512.c's are (rows_options.h).  With one L1 prefetch 64
 * keys ahead against none, MHA_ISA=avx2 mha bench --op decode
 * --cache-dtype int8, E=512, h=8, 2 threads, Zen 5, 6 alternating rounds:
 * 131072 keys 6.21 -> 4.04 ms, 524288 keys 21.9 -> 18.0 ms, 4096 keys (in
 * L3) 0.112 / 0.111 ms.  The far rows only, as avx512.c's. */
#define ROWS_ELEM          int8_t
#define ROWS_LOAD(x, c, d) i8_row_load((x), (c), (d))
#define ROWS_DOT           dot_rows_i8_avx2
#define ROWS_AXPY64        axpy64_i8_avx2
#define ROWS_AXPY          axpy_rows_i8_avx2
#define ROWS_SCALED
#include "kernels/rows_avx2.h"
#define ROWS_PREFETCHED
#define ROWS_ELEM          int8_t
#define ROWS_LOAD(x, c, d) i8_row_load((x), (c), (d))
#define ROWS_DOT           dot_rows_i8_far_avx2
#define ROWS_AXPY64        axpy64_i8_far_avx2
#define ROWS_AXPY          axpy_rows_i8_far_avx2
#define ROWS_SCALED
#include "kernels/rows_avx2.h"

const mha__bf16_kernels mha__bf16_kernels_avx2 = {
    .name = "avx2",
    .gemm = mha__bf16_gemm_generic,
    .round = mha__bf16_round_generic,
    .pairs = mha__bf16_pairs_generic,
    .transpose = mha__bf16_transpose_generic,
    .row_sums = mha__bf16_row_sums_generic,
    .dot_rows = dot_rows_bf16_avx2,
    .axpy_rows = axpy_rows_bf16_avx2,
    .peak = NULL, /* converts to float32: the float32 peak applies */
};

/* x[j][i] <- x[i][j] for 8 rows of 8 floats: pairs of rows interleaved,
 * then fours, then the 128-bit halves exchanged. */
static inline void transpose8(__m256 x[8])
{
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(x[i], x[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(x[i], x[i + 1]);
    }
    /* u[4g + e], lane L of each half: rows 4g .. 4g+3 of column 4 half + e. */
    for (int g = 0; g < 8; g += 4) {
        u[g] = _mm256_shuffle_ps(t[g], t[g + 2], 0x44);
        u[g + 1] = _mm256_shuffle_ps(t[g], t[g + 2], 0xee);
        u[g + 2] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0x44);
        u[g + 3] = _mm256_shuffle_ps(t[g + 1], t[g + 3], 0xee);
    }
    for (int e = 0; e < 4; e++) {
        x[e] = _mm256_permute2f128_ps(u[e], u[4 + e], 0x20);
        x[4 + e] = _mm256_permute2f128_ps(u[e], u[4 + e], 0x31);
    }
}

/* Blocks of 8 rows x 8 columns, as avx512.c's 16 x 16: each row's floats
 * loaded, the block transposed in registers, scaled, stored as columns;
 * rows past the last load as zeros, columns past it are not stored.  The
 * portable loop was 1.8% of the core at N = 512 on one thread. */
static void transpose_scaled_avx2(float *dst, int64_t ldd, const float *src, int64_t lds, int64_t rows, int64_t cols,
                                  float alpha)
{
    const __m256 va = _mm256_set1_ps(alpha);
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
        int64_t nr = rows - r0 < 8 ? rows - r0 : 8;
        __m256i row_mask = lane_mask(nr);
        for (int64_t c0 = 0; c0 < cols; c0 += 8) {
            int64_t nc = cols - c0 < 8 ? cols - c0 : 8;
            __m256i col_mask = lane_mask(nc);
            __m256 x[8];
            for (int64_t i = 0; i < 8; i++)
                x[i] = i < nr ? _mm256_maskload_ps(src + (r0 + i) * lds + c0, col_mask) : _mm256_setzero_ps();
            transpose8(x);
            for (int64_t c = 0; c < nc; c++) {
                float *d = dst + (c0 + c) * ldd + r0;
                __m256 v = _mm256_mul_ps(x[c], va);
                if (nr == 8) _mm256_storeu_ps(d, v);
                else _mm256_maskstore_ps(d, row_mask, v);
            }
        }
    }
}

/* Whole vectors plain, the tail masked (see LOAD8). */
static void scale_avx2(float *x, int64_t n, float alpha)
{
    __m256 va = _mm256_set1_ps(alpha);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), va));
    __m256i mk = lane_mask(n - i);
    if (i < n) _mm256_maskstore_ps(x + i, mk, _mm256_mul_ps(_mm256_maskload_ps(x + i, mk), va));
}

/* 8 rows per vector; max_ps returns its second operand when either is
 * NaN, so a NaN score leaves the running maximum as it was. */
/* Eight rows' top of |s| over the keys, four keys at a time into
 * separate maxima (as abs_max_avx512: one chain waits on each max);
 * inlined with full = 1 and 0, as softmax_step8. */
static inline __attribute__((always_inline)) void abs_max8(const float *s, int64_t lds, int64_t cols, float *top,
                                                           __m256i mk, int full)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m0 = LOAD8(top), m1 = _mm256_setzero_ps(), m2 = m1, m3 = m1;
    int64_t j = 0;
    for (; j + 4 <= cols; j += 4) {
        m0 = _mm256_max_ps(_mm256_andnot_ps(sign, LOAD8(s + j * lds)), m0);
        m1 = _mm256_max_ps(_mm256_andnot_ps(sign, LOAD8(s + (j + 1) * lds)), m1);
        m2 = _mm256_max_ps(_mm256_andnot_ps(sign, LOAD8(s + (j + 2) * lds)), m2);
        m3 = _mm256_max_ps(_mm256_andnot_ps(sign, LOAD8(s + (j + 3) * lds)), m3);
    }
    for (; j < cols; j++) m0 = _mm256_max_ps(_mm256_andnot_ps(sign, LOAD8(s + j * lds)), m0);
    STORE8(top, _mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
}

/* Four vectors of sums (32 columns) in registers down all the rows:
 * kept in memory, as the compiler left a plain loop, each row's adds
 * waited on the last row's stores (a bias's gradient was 1% of an S2
 * training step). */
static void column_sums_avx2(const float *x, int64_t ldx, int64_t rows, int64_t n, float *sums)
{
    for (int64_t i = 0; i < n; i += 32) {
        __m256i m[4] = {lane_mask(n - i), lane_mask(n - i - 8), lane_mask(n - i - 16), lane_mask(n - i - 24)};
        __m256 acc[4];
        for (int v = 0; v < 4; v++) acc[v] = _mm256_maskload_ps(sums + i + 8 * v, m[v]);
        for (int64_t r = 0; r < rows; r++)
            for (int v = 0; v < 4; v++)
                acc[v] = _mm256_add_ps(acc[v], _mm256_maskload_ps(x + r * ldx + i + 8 * v, m[v]));
        for (int v = 0; v < 4; v++) _mm256_maskstore_ps(sums + i + 8 * v, m[v], acc[v]);
    }
}

static void abs_max_avx2(const float *s, int64_t lds, int64_t rows, int64_t cols, float *top)
{
    int64_t i = 0;
    for (; i + 8 <= rows; i += 8) abs_max8(s + i, lds, cols, top + i, lane_mask(8), 1);
    if (i < rows) abs_max8(s + i, lds, cols, top + i, lane_mask(rows - i), 0);
}

/* Eight rows of the sums at once, in registers across the keys: two
 * float64 vectors of four rows each for sum (and wsum), one float32
 * vector for top (max_ps keeps its second operand, the running top,
 * where the score is NaN).  Scalar in a compiled loop over doubles, it
 * was 14.5% of a backward from lse (Sapphire Rapids, N = 2048). */
static void key_sums8(const float *s, const float *w, int64_t lds, int64_t cols, double *sum, double *wsum, float *top)
{
    __m256d s0 = _mm256_loadu_pd(sum), s1 = _mm256_loadu_pd(sum + 4), w0 = _mm256_setzero_pd(), w1 = w0;
    __m256 t = _mm256_loadu_ps(top);
    if (w) w0 = _mm256_loadu_pd(wsum), w1 = _mm256_loadu_pd(wsum + 4);
    for (int64_t c = 0; c < cols; c++) {
        __m256 p = _mm256_loadu_ps(s + c * lds);
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(p)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(p, 1)));
        t = _mm256_max_ps(p, t);
        if (!w) continue;
        __m256 q = _mm256_loadu_ps(w + c * lds);
        w0 = _mm256_add_pd(w0, _mm256_cvtps_pd(_mm256_castps256_ps128(q)));
        w1 = _mm256_add_pd(w1, _mm256_cvtps_pd(_mm256_extractf128_ps(q, 1)));
    }
    _mm256_storeu_pd(sum, s0), _mm256_storeu_pd(sum + 4, s1);
    _mm256_storeu_ps(top, t);
    if (w) _mm256_storeu_pd(wsum, w0), _mm256_storeu_pd(wsum + 4, w1);
}

void mha__key_sums_avx2(const float *s, const float *w, int64_t lds, int64_t rows, int64_t cols, double *sum,
                        double *wsum, float *top)
{
    int64_t i = 0;
    for (; i + 8 <= rows; i += 8) key_sums8(s + i, w ? w + i : NULL, lds, cols, sum + i, wsum + i, top + i);
    for (; i < rows; i++) /* the last rows one chain each, as the vectors' lanes */
        for (int64_t c = 0; c < cols; c++) {
            float p = s[c * lds + i];
            sum[i] += p;
            if (w) wsum[i] += w[c * lds + i];
            top[i] = p > top[i] ? p : top[i];
        }
}

/* Row i's chain: one fmaf a step (one vfmadd here), as a vector lane of
 * gemm_tile computes it. */
#define PAIR_FMA(i) c##i = fmaf(a[(i)*a_rs + p * a_cs], b[(i)*b_rs + p * b_cs], c##i)

/* Four rows at a time in four named chains (an array of them was kept in
 * memory, a store and a reload every step); the last rows one by one.
 * Per row, gemm_tile's 1 x 1 tail (a whole masked 6 x 16 or 12 x 32 tile
 * for one value) was 3% of a layer's forward+backward at S1. */
void mha__pair_dots_avx2(int64_t rows, int64_t k, const float *a, int64_t a_rs, int64_t a_cs, const float *b,
                         int64_t b_rs, int64_t b_cs, float *out)
{
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4, a += 4 * a_rs, b += 4 * b_rs) {
        float c0 = 0.0f, c1 = 0.0f, c2 = 0.0f, c3 = 0.0f;
        for (int64_t p = 0; p < k; p++) {
            PAIR_FMA(0);
            PAIR_FMA(1);
            PAIR_FMA(2);
            PAIR_FMA(3);
        }
        out[i] = c0, out[i + 1] = c1, out[i + 2] = c2, out[i + 3] = c3;
    }
    for (; i < rows; i++, a += a_rs, b += b_rs) {
        float c0 = 0.0f;
        for (int64_t p = 0; p < k; p++) PAIR_FMA(0);
        out[i] = c0;
    }
}

/* a . b from lanes 0-3 and 4-7 of kernels.h's norm2 order: the tail
 * from c, then the lanes in turn. */
static double ordered_finish(const float *a, const float *b, int64_t c, int64_t n, __m256d lo, __m256d hi)
{
    double lane[8], sum = 0;
    _mm256_storeu_pd(lane, lo);
    _mm256_storeu_pd(lane + 4, hi);
    for (; c < n; c++) sum += (double)a[c] * b[c];
    for (int l = 0; l < 8; l++) sum += lane[l];
    return sum;
}

/* lo, hi += a[c ..] * b[c ..], eight floats as doubles; with `square`,
 * b is a and each float is loaded and widened once. */
#define ORDERED_STEP(a, b, lo, hi, square)                                         \
    do {                                                                           \
        __m256d al_ = _mm256_cvtps_pd(_mm_loadu_ps((a) + c));                      \
        __m256d ah_ = _mm256_cvtps_pd(_mm_loadu_ps((a) + c + 4));                  \
        __m256d bl_ = (square) ? al_ : _mm256_cvtps_pd(_mm_loadu_ps((b) + c));     \
        __m256d bh_ = (square) ? ah_ : _mm256_cvtps_pd(_mm_loadu_ps((b) + c + 4)); \
        lo = _mm256_fmadd_pd(al_, bl_, lo);                                        \
        hi = _mm256_fmadd_pd(ah_, bh_, hi);                                        \
    } while (0)

/* out[t] = a[t] . b[t] for t < 4, n elements each (`square`, a constant
 * once inlined: a[t] . a[t], norm2's case): each product's eight lanes
 * are one chain of n / 8 multiply-adds, which alone would wait out the
 * latency every step, so four go together. */
static inline __attribute__((always_inline)) void ordered_dots4(const float *const a[4], const float *const b[4],
                                                                int64_t n, bool square, double out[4])
{
    __m256d lo0 = _mm256_setzero_pd(), hi0 = lo0, lo1 = lo0, hi1 = lo0, lo2 = lo0, hi2 = lo0, lo3 = lo0, hi3 = lo0;
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        ORDERED_STEP(a[0], b[0], lo0, hi0, square);
        ORDERED_STEP(a[1], b[1], lo1, hi1, square);
        ORDERED_STEP(a[2], b[2], lo2, hi2, square);
        ORDERED_STEP(a[3], b[3], lo3, hi3, square);
    }
    out[0] = ordered_finish(a[0], b[0], c, n, lo0, hi0);
    out[1] = ordered_finish(a[1], b[1], c, n, lo1, hi1);
    out[2] = ordered_finish(a[2], b[2], c, n, lo2, hi2);
    out[3] = ordered_finish(a[3], b[3], c, n, lo3, hi3);
}

static double ordered_dot(const float *a, const float *b, int64_t n)
{
    __m256d lo = _mm256_setzero_pd(), hi = lo;
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) ORDERED_STEP(a, b, lo, hi, false);
    return ordered_finish(a, b, c, n, lo, hi);
}

void mha__norm2_avx2(const float *x, int64_t ld, int64_t rows, int64_t n, double *out)
{
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
        const float *row[4] = {x + r * ld, x + (r + 1) * ld, x + (r + 2) * ld, x + (r + 3) * ld};
        ordered_dots4(row, row, n, true, out + r);
    }
    for (; r < rows; r++) out[r] = ordered_dot(x + r * ld, x + r * ld, n);
}

void mha__dots_f64_avx2(const float *a, const float *b, int64_t ldb, const int64_t *idx, int64_t n, int64_t d,
                        double *out)
{
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const float *same[4] = {a, a, a, a};
        const float *rows[4] = {b + idx[i] * ldb, b + idx[i + 1] * ldb, b + idx[i + 2] * ldb, b + idx[i + 3] * ldb};
        ordered_dots4(same, rows, d, false, out + i);
    }
    for (; i < n; i++) out[i] = ordered_dot(a, b + idx[i] * ldb, d);
}

/* Lanes [0, n) of four doubles (n clamped to [0, 4]). */
static __m256i lane_mask64(int64_t n)
{
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
}

/* x += key value kv * row c of the panel, for the four query rows in
 * the vector (those m holds). */
#define PANEL_STEP(kv, c, x) x = _mm256_fmadd_pd(_mm256_set1_pd(kv), _mm256_maskload_pd(qd + (c)*ldq, m), x)

/* Key a against the panel's four rows from qd (those m holds), in
 * norm2's order: eight chains of d / 8 multiply-adds, enough to cover the
 * latency, then the tail from 0 and the lanes in turn added to it.  The
 * key is widened 32 values at a time, so a step broadcasts a double. */
static __m256d panel_dots4(const float *a, const double *qd, int64_t ldq, int64_t d, __m256i m)
{
    __m256d x0 = _mm256_setzero_pd(), x1 = x0, x2 = x0, x3 = x0, x4 = x0, x5 = x0, x6 = x0, x7 = x0, sum = x0;
    double kd[32];
    int64_t c = 0, whole = d / 8 * 8;
    while (c < whole) {
        int64_t n = whole - c < 32 ? whole - c : 32;
        for (int64_t x = 0; x < n; x += 4) _mm256_storeu_pd(kd + x, _mm256_cvtps_pd(_mm_loadu_ps(a + c + x)));
        for (int64_t x = 0; x < n; x += 8, c += 8) {
            PANEL_STEP(kd[x], c, x0);
            PANEL_STEP(kd[x + 1], c + 1, x1);
            PANEL_STEP(kd[x + 2], c + 2, x2);
            PANEL_STEP(kd[x + 3], c + 3, x3);
            PANEL_STEP(kd[x + 4], c + 4, x4);
            PANEL_STEP(kd[x + 5], c + 5, x5);
            PANEL_STEP(kd[x + 6], c + 6, x6);
            PANEL_STEP(kd[x + 7], c + 7, x7);
        }
    }
    for (; c < d; c++) PANEL_STEP((double)a[c], c, sum);
    const __m256d lanes[8] = {x0, x1, x2, x3, x4, x5, x6, x7};
    for (int l = 0; l < 8; l++) sum = _mm256_add_pd(sum, lanes[l]);
    return sum;
}

/* Four rows at a time against every key (their panel, 32 d bytes, stays
 * in L1). */
static void dots_f64_panel_avx2(const float *k, int64_t ldk, int64_t cols, const double *qd, int64_t ldq, int64_t rows,
                                int64_t d, double *out, int64_t ldo)
{
    for (int64_t r = 0; r < rows; r += 4) {
        __m256i m = lane_mask64(rows - r);
        for (int64_t c = 0; c < cols; c++)
            _mm256_maskstore_pd(out + c * ldo + r, m, panel_dots4(k + c * ldk, qd + r, ldq, d, m));
    }
}

/* Four rows at a time: the taken lanes from their dot products, blended
 * into the shifted scores. */
static void shift_refined_avx2(float *x, const double *dot, const bool *marked, const float *near, const float *shift,
                               int64_t n, double scale)
{
    __m256d vs = _mm256_set1_pd(scale);
    for (int64_t r = 0; r < n; r += 4) {
        int64_t k = n - r < 4 ? n - r : 4;
        __m128i m = _mm256_castsi256_si128(lane_mask(k));
        __m128i marks = _mm_setr_epi32(k > 0 && marked[r] ? -1 : 0, k > 1 && marked[r + 1] ? -1 : 0,
                                       k > 2 && marked[r + 2] ? -1 : 0, k > 3 && marked[r + 3] ? -1 : 0);
        __m128 xv = _mm_maskload_ps(x + r, m), sh = _mm_maskload_ps(shift + r, m);
        __m128 take = _mm_and_ps(_mm_castsi128_ps(marks), _mm_cmpgt_ps(xv, _mm_maskload_ps(near + r, m)));
        __m256d e = _mm256_sub_pd(_mm256_mul_pd(_mm256_maskload_pd(dot + r, _mm256_cvtepi32_epi64(m)), vs),
                                  _mm256_cvtps_pd(sh));
        _mm_maskstore_ps(x + r, m, _mm_blendv_ps(_mm_sub_ps(xv, sh), _mm256_cvtpd_ps(e), take));
    }
}

/* Eight rows at a time, the maximum and its key blended in where a score
 * beats it (a NaN never does). */
static void row_max_avx2(const float *s, int64_t lds, int64_t rows, int64_t cols, float *top, int32_t *at)
{
    for (int64_t r = 0; r < rows; r += 8) {
        __m256i mk = lane_mask(rows - r);
        __m256 m = _mm256_set1_ps(-INFINITY);
        __m256 key = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        for (int64_t c = 0; c < cols; c++) {
            __m256 x = _mm256_maskload_ps(s + c * lds + r, mk);
            __m256 above = _mm256_cmp_ps(x, m, _CMP_GT_OQ);
            m = _mm256_blendv_ps(m, x, above);
            key = _mm256_blendv_ps(key, _mm256_castsi256_ps(_mm256_set1_epi32((int)c)), above);
        }
        _mm256_maskstore_ps(top + r, mk, m);
        _mm256_maskstore_epi32(at + r, mk, _mm256_castps_si256(key));
    }
}

/* Eight rows at a time: shifted in a vector, the picked rows taken from
 * the comparison's bits, lowest first. */
static int64_t shift_pick_avx2(float *x, const bool *marked, const float *near, const float *shift, int64_t n,
                               int64_t *picked)
{
    int64_t count = 0;
    for (int64_t r = 0; r < n; r += 8) {
        int64_t k = n - r < 8 ? n - r : 8;
        __m256i mk = lane_mask(k);
        __m256 xv = _mm256_maskload_ps(x + r, mk);
        unsigned bits = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(xv, _mm256_maskload_ps(near + r, mk), _CMP_GT_OQ));
        unsigned marks = 0;
        for (int64_t i = 0; i < k; i++) marks |= (unsigned)marked[r + i] << i;
        _mm256_maskstore_ps(x + r, mk, _mm256_sub_ps(xv, _mm256_maskload_ps(shift + r, mk)));
        for (bits &= marks; bits; bits &= bits - 1) picked[count++] = r + __builtin_ctz(bits);
    }
    return count;
}

static void exp_shift_avx2(float *x, int64_t n, float shift)
{
    __m256 vs = _mm256_set1_ps(shift);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vs)));
    __m256i mk = lane_mask(n - i);
    if (i < n) _mm256_maskstore_ps(x + i, mk, exp256(_mm256_sub_ps(_mm256_maskload_ps(x + i, mk), vs)));
}

/* 12 independent FMA chains (see avx512.c). */
static double peak_avx2(int64_t iterations)
{
    volatile float seed = 1.0f;
    __m256 m = _mm256_set1_ps(seed * 0.999999f), a = _mm256_set1_ps(seed * 1e-7f);
    __m256 x[12];
    for (int i = 0; i < 12; i++) x[i] = _mm256_set1_ps(seed + (float)i);
    for (int64_t it = 0; it < iterations; it++) {
#pragma GCC unroll 12
        for (int i = 0; i < 12; i++) x[i] = _mm256_fmadd_ps(x[i], m, a);
    }
    __m256 sum = x[0];
    for (int i = 1; i < 12; i++) sum = _mm256_add_ps(sum, x[i]);
    seed = hsum256(sum);
    return 2.0 * 8.0 * 12.0 * (double)iterations;
}

const mha__kernels mha__kernels_avx2 = {
    .name = "avx2",
    .mr = MR,
    .nr = NR,
    .split_k_rows = 14, /* measured on Zen 4 (attn/plan.c) */
    .split_k_rows_shared = 10,
    .gemm_tile = gemm_tile_avx2,
    .gemm_tile_grouped = gemm_tile_grouped_avx2,
    .gemm_tile_exact = gemm_tile_exact_avx2,
    .softmax_step = softmax_step_avx2,
    .softmax_grad = softmax_grad_avx2,
    .dot_rows = dot_rows_avx2,
    .axpy_rows = axpy_rows_avx2,
    .dot_rows_i8 = dot_rows_i8_avx2,
    .axpy_rows_i8 = axpy_rows_i8_avx2,
    .dot_rows_i8_far = dot_rows_i8_far_avx2,
    .axpy_rows_i8_far = axpy_rows_i8_far_avx2,
    .transpose_scaled = transpose_scaled_avx2,
    .scale = scale_avx2,
    .exp_shift = exp_shift_avx2,
    .abs_max = abs_max_avx2,
    .key_sums = mha__key_sums_avx2,
    .column_sums = column_sums_avx2,
    .norm2 = mha__norm2_avx2,
    .widen = widen_avx2,
    .dots_f64 = mha__dots_f64_avx2,
    .dots_f64_panel = dots_f64_panel_avx2,
    .shift_refined = shift_refined_avx2,
    .row_max = row_max_avx2,
    .shift_pick = shift_pick_avx2,
    .pair_dots = mha__pair_dots_avx2,
    .peak = peak_avx2,
};
