/*
 * avx512.c -- kernels for AVX-512 (F, DQ, BW, VL).  Compiled with
 * -mavx512f -mavx512dq -mavx512bw -mavx512vl -mfma; called only when cpu.c
 * has seen the CPU and OS support them.
 *
 * gemm_tile keeps a 12 x 32 tile of C in 24 zmm registers: per step of k
 * it loads two vectors of B and broadcasts twelve values of A (24 FMAs for
 * 14 loads).  Rows past m re-read the last valid row of A and are not stored,
 * so tails never touch memory outside the tile; columns past n are masked.
 */
#include "kernels/exp_poly.h"
#include "kernels/few_rows.h"
#include "kernels/kernels.h"
#include "kernels/transpose16.h"

#include <immintrin.h>
#include <math.h>

enum { MR = 12, NR = 32 };

static __mmask16 lane_mask(int64_t n)
{
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

/* One row of the tile: broadcast A(i, p) from the expression a_at, two
 * FMAs (one in a tile of half width). */
#define ROW_FMA(i, a_at)                                       \
    do {                                                       \
        __m512 a_ = _mm512_set1_ps(a_at);                      \
        c##i##0 = _mm512_fmadd_ps(a_, b0, c##i##0);            \
        if (!half) c##i##1 = _mm512_fmadd_ps(a_, b1, c##i##1); \
    } while (0)

/* B's row p: plain loads for a full tile, masked ones for a tail. */
#define LOAD_B(off) \
    (full ? _mm512_loadu_ps(b + p * ldb + (off)) : _mm512_maskz_loadu_ps((off) ? m1 : m0, b + p * ldb + (off)))

/* The k loop, A(i, p) read as A_AT(i); NEXT_P advances A's pointer. */
#define K_LOOP(A_AT, NEXT_P)                                \
    for (int64_t p = 0; p < k; p++) {                       \
        __m512 b0 = LOAD_B(0), b1 = half ? b0 : LOAD_B(16); \
        ROW_FMA(0, A_AT(0));                                \
        ROW_FMA(1, A_AT(1));                                \
        ROW_FMA(2, A_AT(2));                                \
        ROW_FMA(3, A_AT(3));                                \
        ROW_FMA(4, A_AT(4));                                \
        ROW_FMA(5, A_AT(5));                                \
        ROW_FMA(6, A_AT(6));                                \
        ROW_FMA(7, A_AT(7));                                \
        ROW_FMA(8, A_AT(8));                                \
        ROW_FMA(9, A_AT(9));                                \
        ROW_FMA(10, A_AT(10));                              \
        ROW_FMA(11, A_AT(11));                              \
        NEXT_P;                                             \
    }

#define LOAD_C(off, mk) (full ? _mm512_loadu_ps(ci + (off)) : _mm512_maskz_loadu_ps(mk, ci + (off)))

#define ROW_STORE(i)                                                         \
    do {                                                                     \
        if (i < m) {                                                         \
            float *ci = c + i * ldc;                                         \
            if (accumulate) {                                                \
                c##i##0 = _mm512_add_ps(c##i##0, LOAD_C(0, m0));             \
                if (!half) c##i##1 = _mm512_add_ps(c##i##1, LOAD_C(16, m1)); \
            }                                                                \
            if (full) {                                                      \
                _mm512_storeu_ps(ci, c##i##0);                               \
                _mm512_storeu_ps(ci + 16, c##i##1);                          \
            } else {                                                         \
                _mm512_mask_storeu_ps(ci, m0, c##i##0);                      \
                if (!half) _mm512_mask_storeu_ps(ci + 16, m1, c##i##1);      \
            }                                                                \
        }                                                                    \
    } while (0)

/* How the tile reads A, from the cheapest to the general form:
 *   PANEL    rows adjacent (a_rs = 1: packed panels, or the score tile's
 *            columns in P V): all twelve from one pointer at fixed offsets;
 *   ROWS     a whole tile with columns adjacent (a_cs = 1: K's rows in
 *            the scores, the projections' inputs): two pointers, rows 0-5
 *            and 6-11, at the same six row offsets.  One pointer with
 *            eleven offsets left too few general registers for the loop:
 *            three offsets were reloaded from the stack every step, and
 *            the projections' GEMM ran 5-7% slower on one thread;
 *   CLAMPED  anything else: a pointer per row, each clamped to the last
 *            valid row, so a tail never reads past A.  Twelve pointers
 *            leave the loop short of general registers, and the compiler
 *            shuttles the rest through vector registers on the FMA ports.
 * On one thread of Sapphire Rapids, a 192 x 192 score tile from K's rows
 * in place ran at 140 GFLOP/s CLAMPED and 153-156 ROWS; the P V tile
 * shape (12 x 32, k = 192) at 94 CLAMPED and 118-122 PANEL when that form
 * came in, and masked loads of B for full tiles cost a further 4-7% (the
 * peak: 201 GFLOP/s; docs/PERFORMANCE.md). */
enum a_form { PANEL, ROWS, CLAMPED };
#define PANEL_A(i)   ap[i]
#define PANEL_NEXT   (ap += a_cs)
#define ROWS_A(i)    ((i) < 6 ? ap[(i)*a_rs] : ap6[((i)-6) * a_rs])
#define ROWS_NEXT    (ap += 1, ap6 += 1)
#define CLAMPED_A(i) r[i][p * a_cs]

/* Which of the tile's columns exist: all NR (no masks), up to NR
 * (masked), or up to 16, a tile of half width whose second vector of
 * columns has neither FMAs nor stores.  The score tiles of a call with
 * 16 query rows or fewer are such tiles (B is Q^T), and with the second
 * vector's FMAs on masked-off lanes they ran at half the FMA rate. */
enum b_cols { B_FULL, B_PART, B_HALF };

/* The tile, inlined into gemm_tile_avx512 once per case it tells apart so
 * that constant arguments (m, the form, the columns) fold away.
 * Named accumulators, not an array: compilers spill arrays of vectors.
 * 24 accumulators + 2 B vectors + 1 broadcast of the 32 zmm registers. */
static inline __attribute__((always_inline)) void tile_body(int64_t m, int64_t n, int64_t k, const float *a,
                                                            int64_t a_rs, int64_t a_cs, const float *b, int64_t ldb,
                                                            float *c, int64_t ldc, int accumulate, enum b_cols cols,
                                                            enum a_form form, int64_t groups, int64_t a_gs)
{
    int full = cols == B_FULL, half = cols == B_HALF;
    __mmask16 m0 = lane_mask(n), m1 = lane_mask(n - 16);
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
    __m512 c40 = c00, c41 = c00, c50 = c00, c51 = c00, c60 = c00, c61 = c00, c70 = c00, c71 = c00;
    __m512 c80 = c00, c81 = c00, c90 = c00, c91 = c00, c100 = c00, c101 = c00, c110 = c00, c111 = c00;
    /* The tile adds into C only after its k steps; fetching C's lines now
     * hides their misses behind those steps (the layer's input gradients
     * add into rows that are in neither L1 nor L2). */
    if (accumulate)
        for (int64_t i = 0; i < m; i++) {
            _mm_prefetch((const char *)(c + i * ldc), _MM_HINT_T0);
            _mm_prefetch((const char *)(c + i * ldc + 16), _MM_HINT_T0);
        }
    for (int64_t g = 0; g < groups; g++, a += a_gs, b += k * ldb) { /* k steps a group */
        if (form == PANEL) {
            const float *ap = a;
            K_LOOP(PANEL_A, PANEL_NEXT);
        } else if (form == ROWS) {
            const float *ap = a, *ap6 = a + 6 * a_rs;
            K_LOOP(ROWS_A, ROWS_NEXT);
        } else {
            const float *r[MR];
            for (int i = 0; i < MR; i++) r[i] = a + (i < m ? i : m - 1) * a_rs;
            K_LOOP(CLAMPED_A, (void)0);
        }
    }
    ROW_STORE(0);
    ROW_STORE(1);
    ROW_STORE(2);
    ROW_STORE(3);
    ROW_STORE(4);
    ROW_STORE(5);
    ROW_STORE(6);
    ROW_STORE(7);
    ROW_STORE(8);
    ROW_STORE(9);
    ROW_STORE(10);
    ROW_STORE(11);
}

static void gemm_tile_avx512(int64_t m, int64_t n, int64_t k, const float *a, int64_t a_rs, int64_t a_cs,
                             const float *b, int64_t ldb, float *c, int64_t ldc, int accumulate)
{
    if (m == MR && a_rs == 1) {
        if (n == NR) tile_body(MR, NR, k, a, 1, a_cs, b, ldb, c, ldc, accumulate, B_FULL, PANEL, 1, 0);
        else tile_body(MR, n, k, a, 1, a_cs, b, ldb, c, ldc, accumulate, B_PART, PANEL, 1, 0);
    } else if (m == MR && a_cs == 1 && (n == NR || n <= NR / 2)) {
        if (n == NR) tile_body(MR, NR, k, a, a_rs, 1, b, ldb, c, ldc, accumulate, B_FULL, ROWS, 1, 0);
        else tile_body(MR, n, k, a, a_rs, 1, b, ldb, c, ldc, accumulate, B_HALF, ROWS, 1, 0);
    } else { /* kernels/few_rows.h */
        MHA_FEW_ROWS_CALL(
            m, MR,
            tile_body(M, n, k, a, a_rs, a_cs, b, ldb, c, ldc, accumulate, n == NR ? B_FULL : B_PART, CLAMPED, 1, 0));
    }
}

static void gemm_tile_grouped_avx512(int64_t m, int64_t n, int64_t groups, int64_t gk, const float *a, int64_t a_rs,
                                     int64_t a_gs, const float *b, int64_t ldb, float *c, int64_t ldc, int accumulate)
{
    if (m == MR && n == NR) tile_body(MR, NR, gk, a, a_rs, 1, b, ldb, c, ldc, accumulate, B_FULL, ROWS, groups, a_gs);
    else
        MHA_FEW_ROWS_CALL(m, MR,
                          tile_body(M, n, gk, a, a_rs, 1, b, ldb, c, ldc, accumulate, n == NR ? B_FULL : B_PART,
                                    CLAMPED, groups, a_gs));
}

/* gemm_tile_exact: M rows (a constant once inlined) by 32 columns in
 * float64, four zmm of eight sums a row; each step of k loads B's row
 * (four zmm) and broadcasts M values of A from memory: 4 M FMAs and no
 * other work on the FMA ports.  Columns past n are masked off the
 * stores. */
static inline __attribute__((always_inline)) void exact_rows_avx512(int M, int64_t n, int64_t k, const double *a,
                                                                    int64_t lda, const double *b, int64_t ldb,
                                                                    const float *bias, float *const *c)
{
    __mmask16 lo = lane_mask(n), hi = lane_mask(n - 16);
    __m512 b0 = bias ? _mm512_maskz_loadu_ps(lo, bias) : _mm512_setzero_ps();
    __m512 b1 = bias ? _mm512_maskz_loadu_ps(hi, bias + 16) : _mm512_setzero_ps();
    __m512d acc[MHA_EXACT_MR][4];
    _Pragma("GCC unroll 6") for (int i = 0; i < M; i++)
    {
        acc[i][0] = _mm512_cvtps_pd(_mm512_castps512_ps256(b0));
        acc[i][1] = _mm512_cvtps_pd(_mm512_extractf32x8_ps(b0, 1));
        acc[i][2] = _mm512_cvtps_pd(_mm512_castps512_ps256(b1));
        acc[i][3] = _mm512_cvtps_pd(_mm512_extractf32x8_ps(b1, 1));
    }
    for (int64_t p = 0; p < k; p++) {
        const double *row = b + p * ldb;
        __m512d w[4] = {_mm512_loadu_pd(row), _mm512_loadu_pd(row + 8), _mm512_loadu_pd(row + 16),
                        _mm512_loadu_pd(row + 24)};
        _Pragma("GCC unroll 6") for (int i = 0; i < M; i++)
        {
            __m512d x = _mm512_set1_pd(a[i * lda + p]);
            _Pragma("GCC unroll 4") for (int q = 0; q < 4; q++) acc[i][q] = _mm512_fmadd_pd(x, w[q], acc[i][q]);
        }
    }
    _Pragma("GCC unroll 6") for (int i = 0; i < M; i++)
    {
        __m512 r0 =
            _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(acc[i][0])), _mm512_cvtpd_ps(acc[i][1]), 1);
        __m512 r1 =
            _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtpd_ps(acc[i][2])), _mm512_cvtpd_ps(acc[i][3]), 1);
        _mm512_mask_storeu_ps(c[i], lo, r0);
        _mm512_mask_storeu_ps(c[i] + 16, hi, r1);
    }
}

/* widen: eight floats a conversion where they are contiguous, the tail
 * masked. */
static void widen_avx512(double *dst, const float *src, int64_t cs, int64_t n)
{
    if (cs != 1) {
        for (int64_t i = 0; i < n; i++) dst[i] = src[i * cs];
        return;
    }
    for (int64_t i = 0; i < n; i += 8) {
        __mmask8 mk = (__mmask8)lane_mask(n - i);
        _mm512_mask_storeu_pd(dst + i, mk, _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mk, src + i)));
    }
}

static void gemm_tile_exact_avx512(int64_t m, int64_t n, int64_t k, const double *a, int64_t lda, const double *b,
                                   int64_t ldb, const float *bias, float *const *c)
{
    switch (m) {
    case 6: exact_rows_avx512(6, n, k, a, lda, b, ldb, bias, c); break;
    case 5: exact_rows_avx512(5, n, k, a, lda, b, ldb, bias, c); break;
    case 4: exact_rows_avx512(4, n, k, a, lda, b, ldb, bias, c); break;
    case 3: exact_rows_avx512(3, n, k, a, lda, b, ldb, bias, c); break;
    case 2: exact_rows_avx512(2, n, k, a, lda, b, ldb, bias, c); break;
    default: exact_rows_avx512(1, n, k, a, lda, b, ldb, bias, c); break;
    }
}

#define EXP_VEC    __m512
#define EXP_OP(op) _mm512_##op
#include "kernels/exp_estrin.h"

/* exp(x) for 16 lanes: exp_estrin.h's polynomial scaled by 2^n with
 * vscalefps, which takes n as a float.  Lanes outside `alive` give 0: the
 * scaling is masked, so no lane rounds to a subnormal, which costs a
 * microcode assist on Intel (clamping -inf to an underflowing argument
 * instead made the step 1.7x slower on a 24-key tile whose rows began far
 * below their maxima).  For x <= MAX_INPUT; NaN stays NaN. */
static inline __m512 exp512_alive(__m512 x, __mmask16 alive)
{
    __m512 t, n, p = exp_reduced(x, _mm512_set1_ps(0x1.8p23f), &t, &n);
    return _mm512_maskz_scalef_ps(alive, p, n);
}

/* Lanes at or above exp's normal range, exp(x) >= 2^-126, or NaN: the
 * others (-inf included) come out 0, as in avx2.c. */
static inline __mmask16 exp512_normal(__m512 x) { return _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33f), _CMP_NLT_UQ); }

/* exp(x) for any x, saturating at exp(MAX_INPUT).  vminps returns its
 * second operand when either is NaN, so a NaN passes the clamp. */
static inline __m512 exp512(__m512 x)
{
    x = _mm512_min_ps(_mm512_set1_ps(MHA_EXP_MAX_INPUT), x);
    return exp512_alive(x, exp512_normal(x));
}

/* exp(x) for the softmax steps, whose arguments are a score minus its
 * row's maximum (or a larger shift): x <= 0, -inf or NaN, so no clamp. */
static inline __m512 exp512_nonpositive(__m512 x) { return exp512_alive(x, exp512_normal(x)); }

/* max(s[j * lds] for j < cols), and its min in *min, lanes in mk (the
 * others -inf in both).  vmaxps(x, m) and vminps(x, m) return m when
 * either is NaN: the maximum and minimum pass over NaN
 * scores, whose exp then makes the row's sum NaN (kernels.h), as in
 * avx2.c and generic.c.  Four running maxima, not one: a single chain
 * waited a vmaxps latency a key, a quarter of the softmax step on
 * Sapphire Rapids.  A maximum is exact in any order. */
static inline __m512 column_max(const float *s, int64_t lds, int64_t cols, __mmask16 mk, __m512 *min)
{
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY), pos_inf = _mm512_set1_ps(INFINITY);
    __m512 m0 = neg_inf, m1 = neg_inf, m2 = neg_inf, m3 = neg_inf, n0 = pos_inf, n1 = pos_inf, n2 = pos_inf,
           n3 = pos_inf;
    int64_t j = 0;
    for (; j + 4 <= cols; j += 4) {
        __m512 x0 = _mm512_mask_loadu_ps(neg_inf, mk, s + j * lds);
        __m512 x1 = _mm512_mask_loadu_ps(neg_inf, mk, s + (j + 1) * lds);
        __m512 x2 = _mm512_mask_loadu_ps(neg_inf, mk, s + (j + 2) * lds);
        __m512 x3 = _mm512_mask_loadu_ps(neg_inf, mk, s + (j + 3) * lds);
        m0 = _mm512_max_ps(x0, m0), m1 = _mm512_max_ps(x1, m1), m2 = _mm512_max_ps(x2, m2), m3 = _mm512_max_ps(x3, m3);
        n0 = _mm512_min_ps(x0, n0), n1 = _mm512_min_ps(x1, n1), n2 = _mm512_min_ps(x2, n2), n3 = _mm512_min_ps(x3, n3);
    }
    for (; j < cols; j++) {
        __m512 x = _mm512_mask_loadu_ps(neg_inf, mk, s + j * lds);
        m0 = _mm512_max_ps(x, m0), n0 = _mm512_min_ps(x, n0);
    }
    *min = _mm512_min_ps(_mm512_min_ps(n0, n1), _mm512_min_ps(n2, n3));
    return _mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3));
}

/* top[i] = max(top[i], max_j |s[j][i]|), four keys at a time into
 * separate maxima: a single chain (avx2.c's, which this table shared)
 * waits a vmaxps latency a key, and scanning every tile so cost the core
 * 3% at N = 2048.  vmaxps keeps its second operand, the running maximum,
 * where |s| is NaN. */
static void abs_max_avx512(const float *s, int64_t lds, int64_t rows, int64_t cols, float *top)
{
    const __m512 sign = _mm512_set1_ps(-0.0f);
    for (int64_t i = 0; i < rows; i += 16) {
        __mmask16 mk = lane_mask(rows - i);
        const float *si = s + i;
        __m512 m0 = _mm512_maskz_loadu_ps(mk, top + i), m1 = _mm512_setzero_ps(), m2 = m1, m3 = m1;
        int64_t j = 0;
        for (; j + 4 <= cols; j += 4) {
            m0 = _mm512_max_ps(_mm512_andnot_ps(sign, _mm512_maskz_loadu_ps(mk, si + j * lds)), m0);
            m1 = _mm512_max_ps(_mm512_andnot_ps(sign, _mm512_maskz_loadu_ps(mk, si + (j + 1) * lds)), m1);
            m2 = _mm512_max_ps(_mm512_andnot_ps(sign, _mm512_maskz_loadu_ps(mk, si + (j + 2) * lds)), m2);
            m3 = _mm512_max_ps(_mm512_andnot_ps(sign, _mm512_maskz_loadu_ps(mk, si + (j + 3) * lds)), m3);
        }
        for (; j < cols; j++) m0 = _mm512_max_ps(_mm512_andnot_ps(sign, _mm512_maskz_loadu_ps(mk, si + j * lds)), m0);
        _mm512_mask_storeu_ps(top + i, mk, _mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
    }
}

/* Four vectors of sums (64 columns) in registers down all the rows, as
 * column_sums_avx2. */
static void column_sums_avx512(const float *x, int64_t ldx, int64_t rows, int64_t n, float *sums)
{
    for (int64_t i = 0; i < n; i += 64) {
        __mmask16 m[4] = {lane_mask(n - i), lane_mask(n - i - 16), lane_mask(n - i - 32), lane_mask(n - i - 48)};
        __m512 acc[4];
        for (int v = 0; v < 4; v++) acc[v] = _mm512_maskz_loadu_ps(m[v], sums + i + 16 * v);
        for (int64_t r = 0; r < rows; r++)
            for (int v = 0; v < 4; v++)
                acc[v] = _mm512_add_ps(acc[v], _mm512_maskz_loadu_ps(m[v], x + r * ldx + i + 16 * v));
        for (int v = 0; v < 4; v++) _mm512_mask_storeu_ps(sums + i + 16 * v, m[v], acc[v]);
    }
}

/* 2^y for 16 lanes of y <= 1, -inf or NaN (softmax_step's): vreduceps
 * takes the fraction r = y - floor(y) in one instruction, vscalefps
 * applies 2^floor(y), itself flooring y.  For y = -inf vreduceps gives 0
 * and vscalefps 0; NaN stays NaN.  Lanes below 2^-126 would come out
 * subnormal, which costs an Intel core a microcode assist (30 times an
 * unassisted vscalefps, timed on Sapphire Rapids): its callers run with
 * MXCSR's flush-to-zero set (with_flush_to_zero), so they come out 0, as
 * a mask of the lanes below -126 made them at one more instruction. */
static inline __m512 exp2_512(__m512 y)
{
    __m512 r = _mm512_reduce_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    return _mm512_scalef_ps(exp2_fraction(r), y);
}

/* MXCSR with flush-to-zero set, and the caller's to restore.  Setting
 * and restoring it costs about 11 ns, once a softmax step. */
static unsigned with_flush_to_zero(void)
{
    unsigned caller = _mm_getcsr();
    _mm_setcsr(caller | _MM_FLUSH_ZERO_ON);
    return caller;
}

/* mha__softmax_anchor for 16 lanes. */
static inline __m512 anchor512(__m512 m)
{
    return _mm512_roundscale_ps(_mm512_mul_ps(m, _mm512_set1_ps(MHA_EXP_LOG2E)),
                                _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
}

/* The keys [0, cols) seen by every lane of mk, and those [0, *some)
 * seen by at least one, from the lanes' reaches (limit, 32-bit). */
static inline int64_t keys_seen_by_all(__m512i limit, __mmask16 mk, int64_t cols, int64_t *some)
{
    int64_t all = _mm512_mask_reduce_min_epi32(mk, limit), any = _mm512_mask_reduce_max_epi32(mk, limit);
    *some = any < cols ? any : cols;
    return all < *some ? all : *some;
}

/* column_max over the keys each lane sees: key j in the lanes of mk whose
 * reach (limit, 32-bit) passes j; the others passed over (a lane that
 * sees none keeps -inf and +inf).  The keys every lane sees go through
 * column_max's four chains, the keys only some see through one masked
 * chain, the keys none sees not at all: one masked chain over them all
 * waited a vmaxps latency a key, and made a diagonal tile's step slower
 * than a whole tile's. */
static inline __m512 reach_column_max(const float *s, int64_t lds, int64_t cols, __mmask16 mk, __m512i limit,
                                      __m512 *min)
{
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
    int64_t some, all = keys_seen_by_all(limit, mk, cols, &some);
    __m512 n, m = column_max(s, lds, all, mk, &n);
    for (int64_t j = all; j < some; j++) {
        __mmask16 seen = _mm512_mask_cmpgt_epi32_mask(mk, limit, _mm512_set1_epi32((int)j));
        __m512 x = _mm512_maskz_loadu_ps(mk, s + j * lds);
        m = _mm512_mask_max_ps(m, seen, x, m);
        n = _mm512_mask_min_ps(n, seen, x, n);
    }
    *min = _mm512_mask_mov_ps(neg_inf, mk, n);
    return _mm512_mask_mov_ps(neg_inf, mk, m);
}

/* 16 lanes' reaches as 32-bit integers (0 past mk). */
static inline __m512i lane_reach(const int64_t *reach, __mmask16 mk)
{
    __m256i lo = _mm512_cvtepi64_epi32(_mm512_maskz_loadu_epi64((__mmask8)mk, reach));
    __m256i hi = _mm512_cvtepi64_epi32(_mm512_maskz_loadu_epi64((__mmask8)(mk >> 8), reach + 8));
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/* The step's exponentials of 16 queries' columns [from, cols) (lanes
 * mk) against `anchor`, stored, added to block_sum in turn; with `limit`,
 * 0 for the keys past a lane's reach, as a -inf score gives. */
static inline __attribute__((always_inline)) __m512 column_exp(float *s, int64_t lds, int64_t from, int64_t cols,
                                                               __mmask16 mk, __m512 anchor, bool reached, __m512i limit,
                                                               __m512 block_sum)
{
    const __m512 log2e = _mm512_set1_ps(MHA_EXP_LOG2E);
    for (int64_t j = from; j < cols; j++) {
        __m512 e = exp2_512(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(mk, s + j * lds), log2e, anchor));
        if (reached) e = _mm512_maskz_mov_ps(_mm512_cmpgt_epi32_mask(limit, _mm512_set1_epi32((int)j)), e);
        _mm512_mask_storeu_ps(s + j * lds, mk, e);
        block_sum = _mm512_add_ps(block_sum, e);
    }
    return block_sum;
}

/* column_exp with reaches: the keys every lane sees unmasked, those
 * some see masked, and 0 stored for those none sees, whose exponentials
 * would be 0 (adding them to the sum adds +0: the same sum). */
static inline __m512 reach_column_exp(float *s, int64_t lds, int64_t cols, __mmask16 mk, __m512 anchor, __m512i limit)
{
    int64_t some, all = keys_seen_by_all(limit, mk, cols, &some);
    __m512 block_sum = column_exp(s, lds, 0, all, mk, anchor, false, limit, _mm512_setzero_ps());
    block_sum = column_exp(s, lds, all, some, mk, anchor, true, limit, block_sum);
    for (int64_t j = some; j < cols; j++) _mm512_mask_storeu_ps(s + j * lds, mk, _mm512_setzero_ps());
    return block_sum;
}

static bool softmax_step_avx512(float *s, int64_t lds, int64_t rows, int64_t cols, float *max, float *sum, float *scale,
                                float above, const int64_t *reach)
{
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY), one = _mm512_set1_ps(1.0f);
    const __m512 top = _mm512_set1_ps(above), bottom = _mm512_set1_ps(-above);
    unsigned caller_csr = with_flush_to_zero(); /* exp2_512's */
    __mmask16 large = 0;
    for (int64_t i = 0; i < rows; i += 16) { /* 16 queries per vector */
        __mmask16 mk = lane_mask(rows - i);
        __m512i limit = reach ? lane_reach(reach + i, mk) : _mm512_setzero_si512();
        __m512 old_max = _mm512_mask_loadu_ps(neg_inf, mk, max + i), tile_min;
        __m512 tile_max = reach ? reach_column_max(s + i, lds, cols, mk, limit, &tile_min)
                                : column_max(s + i, lds, cols, mk, &tile_min);
        __m512 new_max = _mm512_max_ps(tile_max, old_max);
        large |= _mm512_mask_cmp_ps_mask(mk, tile_max, top, _CMP_GT_OQ) |
                 _mm512_mask_cmp_ps_mask(mk, tile_min, bottom, _CMP_LT_OQ);
        /* Queries that still see nothing take anchor 0, so their -inf scores give 0. */
        __mmask16 seen = _mm512_cmp_ps_mask(new_max, neg_inf, _CMP_NEQ_UQ);
        __m512 anchor = _mm512_maskz_mov_ps(seen, anchor512(new_max));
        __m512 block_sum = reach ? reach_column_exp(s + i, lds, cols, mk, anchor, limit)
                                 : column_exp(s + i, lds, 0, cols, mk, anchor, false, limit, _mm512_setzero_ps());
        __m512 sc = _mm512_mask_blend_ps(seen, one, exp2_512(_mm512_sub_ps(anchor512(old_max), anchor)));
        __m512 new_sum = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, sum + i), sc, block_sum);
        _mm512_mask_storeu_ps(scale + i, mk, sc);
        _mm512_mask_storeu_ps(sum + i, mk, new_sum);
        _mm512_mask_storeu_ps(max + i, mk, new_max);
    }
    _mm_setcsr(caller_csr);
    return large != 0;
}

static void softmax_grad_avx512(float *s, float *dp, int64_t lds, int64_t rows, int64_t cols, const float *shift,
                                const float *mul, const float *delta)
{
    for (int64_t i = 0; i < rows; i += 16) { /* 16 queries per vector, as softmax_step */
        __mmask16 mk = lane_mask(rows - i);
        __m512 sh = _mm512_maskz_loadu_ps(mk, shift + i), mu = _mm512_maskz_loadu_ps(mk, mul + i);
        __m512 de = _mm512_maskz_loadu_ps(mk, delta + i);
        for (int64_t j = 0; j < cols; j++) {
            float *sj = s + j * lds + i, *dj = dp + j * lds + i;
            __m512 p = _mm512_mul_ps(exp512_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sj), sh)), mu);
            _mm512_mask_storeu_ps(sj, mk, p);
            _mm512_mask_storeu_ps(dj, mk, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, dj), de)));
        }
    }
}

#define ROWS_KEYWISE
#define ROWS_ELEM        float
#define ROWS_LOAD(mk, x) _mm512_maskz_loadu_ps(mk, x)
#define ROWS_DOT         dot_rows_avx512
#define ROWS_AXPY        axpy_rows_avx512
#define ROWS_DOT_MULTI   dot_rows_multi_avx512
#define ROWS_AXPY_MULTI  axpy_rows_multi_avx512
#include "kernels/rows_avx512.h"

/* And prefetching, for a float32 cache too large to stay in the last-level
 * cache between steps (attn/plan.c says when).  Zen 4 (32 MB L3), 12
 * heads of 64, two threads, 7 alternating rounds, prefetching against
 * plain: 2048 tokens (12.6 MB of K and V) 0.78x, 3072 (18.9 MB) 0.93x,
 * 3584 (22 MB) 1.04x, 4096 (25.2 MB) 1.09x and 1.24x, 32768 (201 MB)
 * 1.04x; 8 heads, 8192 tokens (33.6 MB) 1.11x, 4096 (16.8 MB) 0.85x.
 * Within the LLC the rows' lines already come at the rate the core takes
 * them, and the prefetches cost instructions and miss buffers. */
#define ROWS_KEYWISE
#define ROWS_PREFETCHED
#define ROWS_ELEM        float
#define ROWS_LOAD(mk, x) _mm512_maskz_loadu_ps(mk, x)
#define ROWS_DOT         dot_rows_far_avx512
#define ROWS_AXPY        axpy_rows_far_avx512
#define ROWS_DOT_MULTI   dot_rows_multi_far_avx512
#define ROWS_AXPY_MULTI  axpy_rows_multi_far_avx512
#include "kernels/rows_avx512.h"

/* 16 int8 values widened to float32 (exact): a sign extension and a
 * convert, 16 values per pair where AVX2 converts 8. */
static inline __m512 load_i8(__mmask16 mk, const int8_t *x)
{
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, x)));
}

/* And once for int8 rows with a scale each (an int8 KV cache), whose
 * reads run from memory: a row of 64 values is one cache line, so one
 * prefetch a key into L2 and one into L1 (rows_options.h) overlap the
 * next lines' latency with this key's widening.  mha bench --op decode
 * --cache-dtype int8, E=512, h=8, 2 threads, AMD EPYC, 6 alternating
 * rounds, one L1 prefetch 64 keys ahead against none: 524288 keys 18.5
 * -> 15.4 ms, 131072 keys 4.24 -> 3.74 ms; 4096 keys (in L3) 0.063 either
 * way.  Float32 rows are four lines a key and their prefetches cost more
 * than they hide while the cache sits in L3 (4096 keys 0.116 -> 0.138
 * ms), so only int8 takes them, and only as the far rows (attn/plan.c):
 * where a thread's share fits its L2 they cost (Sapphire Rapids, 12 heads
 * of 64, two threads, three alternating rounds: 512 tokens 0.023-0.026
 * ms against 0.021-0.023 plain, 2048 tokens 0.081-0.083 against
 * 0.077-0.079; 32768 tokens 1.22-1.28 against 1.32-1.42). */
#define ROWS_ELEM        int8_t
#define ROWS_LOAD(mk, x) load_i8(mk, x)
#define ROWS_DOT         dot_rows_i8_avx512
#define ROWS_AXPY        axpy_rows_i8_avx512
#define ROWS_DOT_MULTI   dot_rows_i8_multi_avx512
#define ROWS_AXPY_MULTI  axpy_rows_i8_multi_avx512
#define ROWS_SCALED
#include "kernels/rows_avx512.h"
#define ROWS_PREFETCHED
#define ROWS_ELEM        int8_t
#define ROWS_LOAD(mk, x) load_i8(mk, x)
#define ROWS_DOT         dot_rows_i8_far_avx512
#define ROWS_AXPY        axpy_rows_i8_far_avx512
#define ROWS_DOT_MULTI   dot_rows_i8_multi_far_avx512
#define ROWS_AXPY_MULTI  axpy_rows_i8_multi_far_avx512
#define ROWS_SCALED
#include "kernels/rows_avx512.h"

/* Blocks of 16 rows x 16 columns: each row's 16 floats loaded, the block
 * transposed in registers, scaled, stored as 16 columns.  Rows past the
 * last load as zeros and columns past it are not stored.  The scalar
 * transpose, strided stores into every line of the 48 KB tile, was 1.5%
 * of the attention core at N = 2048 and 3.8% at N = 512 (one thread,
 * Sapphire Rapids). */
static void transpose_scaled_avx512(float *dst, int64_t ldd, const float *src, int64_t lds, int64_t rows, int64_t cols,
                                    float alpha)
{
    const __m512 va = _mm512_set1_ps(alpha);
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
        int64_t nr = rows - r0 < 16 ? rows - r0 : 16;
        __mmask16 row_mask = lane_mask(nr);
        for (int64_t c0 = 0; c0 < cols; c0 += 16) {
            int64_t nc = cols - c0 < 16 ? cols - c0 : 16;
            __mmask16 col_mask = lane_mask(nc);
            __m512 x[16];
            load_transposed16(x, src + r0 * lds + c0, lds, nr, col_mask);
            for (int64_t c = 0; c < nc; c++)
                _mm512_mask_storeu_ps(dst + (c0 + c) * ldd + r0, row_mask, _mm512_mul_ps(x[c], va));
        }
    }
}

static void scale_avx512(float *x, int64_t n, float alpha)
{
    __m512 va = _mm512_set1_ps(alpha);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 mk = lane_mask(n - i);
        _mm512_mask_storeu_ps(x + i, mk, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, x + i), va));
    }
}

static void exp_shift_avx512(float *x, int64_t n, float shift)
{
    __m512 vs = _mm512_set1_ps(shift);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 mk = lane_mask(n - i);
        _mm512_mask_storeu_ps(x + i, mk, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, x + i), vs)));
    }
}

/* x += ka * row c of the panel, y += kb * the same row: two keys
 * against the eight query rows in the vector (those m holds). */
#define PANEL_STEP(ka, kb, c, x, y)                          \
    do {                                                     \
        __m512d q_ = _mm512_maskz_loadu_pd(m, qd + (c)*ldq); \
        x = _mm512_fmadd_pd(_mm512_set1_pd(ka), q_, x);      \
        y = _mm512_fmadd_pd(_mm512_set1_pd(kb), q_, y);      \
    } while (0)

/* s plus the lanes x0 .. x7 in turn: norm2's order after the tail's sum. */
static inline __m512d lanes_added(__m512d s, __m512d x0, __m512d x1, __m512d x2, __m512d x3, __m512d x4, __m512d x5,
                                  __m512d x6, __m512d x7)
{
    s = _mm512_add_pd(s, x0);
    s = _mm512_add_pd(s, x1);
    s = _mm512_add_pd(s, x2);
    s = _mm512_add_pd(s, x3);
    s = _mm512_add_pd(s, x4);
    s = _mm512_add_pd(s, x5);
    s = _mm512_add_pd(s, x6);
    return _mm512_add_pd(s, x7);
}

/* Keys a and b (b may be a again) against eight rows of the panel from qd
 * (those m holds), in norm2's order, into oa[0 .. 8) and ob[0 .. 8):
 * sixteen chains of d / 8 multiply-adds, a load of the panel for two of
 * them (a load each kept the FMA unit half idle on Zen 4). */
static void panel_dots8x2(const float *a, const float *b, const double *qd, int64_t ldq, int64_t d, __mmask8 m,
                          double *oa, double *ob)
{
    __m512d x0 = _mm512_setzero_pd(), x1 = x0, x2 = x0, x3 = x0, x4 = x0, x5 = x0, x6 = x0, x7 = x0;
    __m512d y0 = x0, y1 = x0, y2 = x0, y3 = x0, y4 = x0, y5 = x0, y6 = x0, y7 = x0, sx = x0, sy = x0;
    /* The keys widened 64 values at a time, so each step broadcasts a
     * double from L1 (one load, folded into the multiply-add). */
    double ka[64], kb[64];
    int64_t c = 0, whole = d / 8 * 8;
    while (c < whole) {
        int64_t n = whole - c < 64 ? whole - c : 64;
        for (int64_t x = 0; x < n; x += 8) {
            _mm512_storeu_pd(ka + x, _mm512_cvtps_pd(_mm256_loadu_ps(a + c + x)));
            _mm512_storeu_pd(kb + x, _mm512_cvtps_pd(_mm256_loadu_ps(b + c + x)));
        }
        for (int64_t x = 0; x < n; x += 8, c += 8) {
            PANEL_STEP(ka[x], kb[x], c, x0, y0);
            PANEL_STEP(ka[x + 1], kb[x + 1], c + 1, x1, y1);
            PANEL_STEP(ka[x + 2], kb[x + 2], c + 2, x2, y2);
            PANEL_STEP(ka[x + 3], kb[x + 3], c + 3, x3, y3);
            PANEL_STEP(ka[x + 4], kb[x + 4], c + 4, x4, y4);
            PANEL_STEP(ka[x + 5], kb[x + 5], c + 5, x5, y5);
            PANEL_STEP(ka[x + 6], kb[x + 6], c + 6, x6, y6);
            PANEL_STEP(ka[x + 7], kb[x + 7], c + 7, x7, y7);
        }
    }
    for (; c < d; c++) PANEL_STEP((double)a[c], (double)b[c], c, sx, sy);
    _mm512_mask_storeu_pd(oa, m, lanes_added(sx, x0, x1, x2, x3, x4, x5, x6, x7));
    _mm512_mask_storeu_pd(ob, m, lanes_added(sy, y0, y1, y2, y3, y4, y5, y6, y7));
}

/* As avx2.c's (kernels.h), eight rows at a time against the keys two by
 * two (the rows' panel, 64 d bytes, stays in L1). */
static void dots_f64_panel_avx512(const float *k, int64_t ldk, int64_t cols, const double *qd, int64_t ldq,
                                  int64_t rows, int64_t d, double *out, int64_t ldo)
{
    for (int64_t r = 0; r < rows; r += 8) {
        __mmask8 m = rows - r >= 8 ? 0xff : (__mmask8)((1u << (rows - r)) - 1);
        for (int64_t c = 0; c < cols; c += 2) {
            int64_t c1 = c + 1 < cols ? c + 1 : c; /* an odd last key computed twice */
            panel_dots8x2(k + c * ldk, k + c1 * ldk, qd + r, ldq, d, m, out + c * ldo + r, out + c1 * ldo + r);
        }
    }
}

/* An 8 x 8 transpose of doubles: x[i]'s lane l to x[l]'s lane i. */
static inline void transpose8_pd(__m512d x[8])
{
    __m512d even[4], odd[4]; /* rows 2i and 2i + 1 interleaved: their lanes 0, 2, 4, 6 and 1, 3, 5, 7 */
    for (int i = 0; i < 4; i++) {
        even[i] = _mm512_unpacklo_pd(x[2 * i], x[2 * i + 1]);
        odd[i] = _mm512_unpackhi_pd(x[2 * i], x[2 * i + 1]);
    }
    /* Lanes l and l + 4 of four rows (half 0: rows 0-3, half 1: rows 4-7). */
    const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13),
                  second = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    __m512d quad[2][4];
    for (int h = 0; h < 2; h++) {
        quad[h][0] = _mm512_permutex2var_pd(even[2 * h], first, even[2 * h + 1]);
        quad[h][1] = _mm512_permutex2var_pd(odd[2 * h], first, odd[2 * h + 1]);
        quad[h][2] = _mm512_permutex2var_pd(even[2 * h], second, even[2 * h + 1]);
        quad[h][3] = _mm512_permutex2var_pd(odd[2 * h], second, odd[2 * h + 1]);
    }
    for (int l = 0; l < 4; l++) {
        x[l] = _mm512_shuffle_f64x2(quad[0][l], quad[1][l], 0x44);     /* the low halves: lane l */
        x[l + 4] = _mm512_shuffle_f64x2(quad[0][l], quad[1][l], 0xee); /* the high halves: lane l + 4 */
    }
}

/* out[i] = key . rows[i] for eight rows in float64 in kernels.h's norm2
 * order, those m holds stored; the key widened once a step for all
 * eight.  Each row's eight lanes are its own chain of d / 8
 * multiply-adds, eight chains together; then the rows' lanes are
 * transposed, so that one vector add a lane finishes all eight rows in
 * norm2's order (the tail's sum, then lanes 0 .. 7), where adding each
 * row's lanes in turn made the finish a chain of eight adds a row, the
 * bound of avx2.c's four at a time.  Each product of two floats is exact
 * in float64, so a multiply-add rounds as the add alone does. */
static void ordered_dots8(const float *key, const float *const rows[8], int64_t d, __mmask8 m, double *out)
{
    __m512d x[8];
    for (int i = 0; i < 8; i++) x[i] = _mm512_setzero_pd();
    int64_t c = 0;
    for (; c + 8 <= d; c += 8) {
        __m512d k = _mm512_cvtps_pd(_mm256_loadu_ps(key + c));
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) x[i] = _mm512_fmadd_pd(k, _mm512_cvtps_pd(_mm256_loadu_ps(rows[i] + c)), x[i]);
    }
    __m512d sum = _mm512_setzero_pd(); /* the tail, from 0, row i in lane i */
    for (; c < d; c++) {
        double r[8];
        for (int i = 0; i < 8; i++) r[i] = rows[i][c];
        sum = _mm512_fmadd_pd(_mm512_set1_pd(key[c]), _mm512_loadu_pd(r), sum);
    }
    transpose8_pd(x);
    for (int l = 0; l < 8; l++) sum = _mm512_add_pd(sum, x[l]);
    _mm512_mask_storeu_pd(out, m, sum);
}

/* Rows past n of eight padded with row n - 1 (computed, not stored).
 * Fewer than four go to avx2.c's kernels, which take them one by one
 * (three padded to eight moved no samples at inputs x3). */
enum { DOTS8_MIN = 4 };

static void dots_f64_avx512(const float *a, const float *b, int64_t ldb, const int64_t *idx, int64_t n, int64_t d,
                            double *out)
{
    for (int64_t i = 0; i < n; i += 8) {
        int64_t live = n - i < 8 ? n - i : 8;
        if (live < DOTS8_MIN) {
            mha__dots_f64_avx2(a, b, ldb, idx + i, live, d, out + i);
            return;
        }
        const float *rows[8];
        for (int r = 0; r < 8; r++) rows[r] = b + idx[i + (r < live ? r : live - 1)] * ldb;
        ordered_dots8(a, rows, d, (__mmask8)((1u << live) - 1), out + i);
    }
}

/* Eight rows at a time: the taken lanes from their dot products,
 * blended into the shifted scores. */
static void shift_refined_avx512(float *x, const double *dot, const bool *marked, const float *near, const float *shift,
                                 int64_t n, double scale)
{
    __m512d vs = _mm512_set1_pd(scale);
    for (int64_t r = 0; r < n; r += 8) {
        __mmask8 m = n - r >= 8 ? 0xff : (__mmask8)((1u << (n - r)) - 1);
        __m128i marks = _mm_maskz_loadu_epi8(m, marked + r);
        __m256 xv = _mm256_maskz_loadu_ps(m, x + r), sh = _mm256_maskz_loadu_ps(m, shift + r);
        __mmask8 take =
            _mm_test_epi8_mask(marks, marks) & _mm256_cmp_ps_mask(xv, _mm256_maskz_loadu_ps(m, near + r), _CMP_GT_OQ);
        __m512d e = _mm512_sub_pd(_mm512_mul_pd(_mm512_maskz_loadu_pd(take, dot + r), vs), _mm512_cvtps_pd(sh));
        _mm256_mask_storeu_ps(x + r, m, _mm256_mask_blend_ps(take, _mm256_sub_ps(xv, sh), _mm512_cvtpd_ps(e)));
    }
}

/* Sixteen rows at a time, the maximum and its key merged in where a score
 * beats it (a NaN never does). */
static void row_max_avx512(const float *s, int64_t lds, int64_t rows, int64_t cols, float *top, int32_t *at)
{
    for (int64_t r = 0; r < rows; r += 16) {
        __mmask16 mk = lane_mask(rows - r);
        __m512 m = _mm512_set1_ps(-INFINITY);
        __m512i key = _mm512_set1_epi32(-1);
        for (int64_t c = 0; c < cols; c++) {
            __m512 x = _mm512_maskz_loadu_ps(mk, s + c * lds + r);
            __mmask16 above = _mm512_cmp_ps_mask(x, m, _CMP_GT_OQ);
            m = _mm512_mask_mov_ps(m, above, x);
            key = _mm512_mask_mov_epi32(key, above, _mm512_set1_epi32((int)c));
        }
        _mm512_mask_storeu_ps(top + r, mk, m);
        _mm512_mask_storeu_epi32(at + r, mk, key);
    }
}

/* Eight rows at a time: shifted in a vector, the picked rows' indices
 * compressed into place. */
static int64_t shift_pick_avx512(float *x, const bool *marked, const float *near, const float *shift, int64_t n,
                                 int64_t *picked)
{
    int64_t count = 0;
    __m512i rows = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t r = 0; r < n; r += 8, rows = _mm512_add_epi64(rows, _mm512_set1_epi64(8))) {
        __mmask8 m = n - r >= 8 ? 0xff : (__mmask8)((1u << (n - r)) - 1);
        __m128i marks = _mm_maskz_loadu_epi8(m, marked + r);
        __m256 xv = _mm256_maskz_loadu_ps(m, x + r);
        __mmask8 take =
            _mm_test_epi8_mask(marks, marks) & _mm256_cmp_ps_mask(xv, _mm256_maskz_loadu_ps(m, near + r), _CMP_GT_OQ);
        _mm256_mask_storeu_ps(x + r, m, _mm256_sub_ps(xv, _mm256_maskz_loadu_ps(m, shift + r)));
        _mm512_mask_compressstoreu_epi64(picked + count, take, rows);
        count += __builtin_popcount(take);
    }
    return count;
}

/* 12 independent FMA chains: enough to cover the FMA latency on every
 * AVX-512 core we know (4 cycles x up to 2 ports, plus slack). */
static double peak_avx512(int64_t iterations)
{
    volatile float seed = 1.0f;
    __m512 m = _mm512_set1_ps(seed * 0.999999f), a = _mm512_set1_ps(seed * 1e-7f);
    __m512 x[12];
    for (int i = 0; i < 12; i++) x[i] = _mm512_set1_ps(seed + (float)i);
    for (int64_t it = 0; it < iterations; it++) {
#pragma GCC unroll 12
        for (int i = 0; i < 12; i++) x[i] = _mm512_fmadd_ps(x[i], m, a);
    }
    __m512 sum = x[0];
    for (int i = 1; i < 12; i++) sum = _mm512_add_ps(sum, x[i]);
    seed = _mm512_reduce_add_ps(sum);
    return 2.0 * 16.0 * 12.0 * (double)iterations;
}

const mha__kernels mha__kernels_avx512 = {
    .name = "avx512",
    .mr = MR,
    .nr = NR,
    .split_k_rows = 16, /* measured on Zen 4 (attn/plan.c) */
    .split_k_rows_shared = 16,
    .gemm_tile = gemm_tile_avx512,
    .gemm_tile_grouped = gemm_tile_grouped_avx512,
    .gemm_tile_exact = gemm_tile_exact_avx512,
    .softmax_step = softmax_step_avx512,
    .softmax_grad = softmax_grad_avx512,
    .dot_rows = dot_rows_avx512,
    .axpy_rows = axpy_rows_avx512,
    .dot_rows_multi = dot_rows_multi_avx512,
    .axpy_rows_multi = axpy_rows_multi_avx512,
    .dot_rows_i8_multi = dot_rows_i8_multi_avx512,
    .axpy_rows_i8_multi = axpy_rows_i8_multi_avx512,
    .dot_rows_multi_far = dot_rows_multi_far_avx512,
    .axpy_rows_multi_far = axpy_rows_multi_far_avx512,
    .dot_rows_i8_multi_far = dot_rows_i8_multi_far_avx512,
    .axpy_rows_i8_multi_far = axpy_rows_i8_multi_far_avx512,
    .dot_rows_far = dot_rows_far_avx512,
    .axpy_rows_far = axpy_rows_far_avx512,
    .dot_rows_i8 = dot_rows_i8_avx512,
    .axpy_rows_i8 = axpy_rows_i8_avx512,
    .dot_rows_i8_far = dot_rows_i8_far_avx512,
    .axpy_rows_i8_far = axpy_rows_i8_far_avx512,
    .transpose_scaled = transpose_scaled_avx512,
    .scale = scale_avx512,
    .exp_shift = exp_shift_avx512,
    .abs_max = abs_max_avx512,
    .key_sums = mha__key_sums_avx2,
    .column_sums = column_sums_avx512,
    .norm2 = mha__norm2_avx2,
    .widen = widen_avx512,
    .dots_f64 = dots_f64_avx512,
    .dots_f64_panel = dots_f64_panel_avx512,
    .shift_refined = shift_refined_avx512,
    .row_max = row_max_avx512,
    .shift_pick = shift_pick_avx512,
    .pair_dots = mha__pair_dots_avx2,
    .peak = peak_avx512,
};
