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
#include "kernels/kernels.h"

#include <immintrin.h>
#include <math.h>

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

#define FULL_STORE(i)                                                      \
    do {                                                                   \
        if (i < m) {                                                       \
            float *ci = c + i * ldc;                                       \
            if (accumulate) {                                              \
                c##i##0 = _mm256_add_ps(c##i##0, _mm256_loadu_ps(ci));     \
                c##i##1 = _mm256_add_ps(c##i##1, _mm256_loadu_ps(ci + 8)); \
            }                                                              \
            _mm256_storeu_ps(ci, c##i##0);                                 \
            _mm256_storeu_ps(ci + 8, c##i##1);                             \
        }                                                                  \
    } while (0)

#define ROW_STORE(i)                                                              \
    do {                                                                          \
        if (i < m) {                                                              \
            float *ci = c + i * ldc;                                              \
            if (accumulate) {                                                     \
                c##i##0 = _mm256_add_ps(c##i##0, _mm256_maskload_ps(ci, m0));     \
                c##i##1 = _mm256_add_ps(c##i##1, _mm256_maskload_ps(ci + 8, m1)); \
            }                                                                     \
            _mm256_maskstore_ps(ci, m0, c##i##0);                                 \
            _mm256_maskstore_ps(ci + 8, m1, c##i##1);                             \
        }                                                                         \
    } while (0)

/* The k loop over rows r0..r5, with B loaded by LOAD_B(offset). */
#define TILE_LOOP(LOAD_B)                      \
    for (int64_t p = 0; p < k; p++) {          \
        __m256 b0 = LOAD_B(0), b1 = LOAD_B(8); \
        ROW_FMA(0);                            \
        ROW_FMA(1);                            \
        ROW_FMA(2);                            \
        ROW_FMA(3);                            \
        ROW_FMA(4);                            \
        ROW_FMA(5);                            \
    }
#define LOAD_FULL(off)   _mm256_loadu_ps(b + p * ldb + (off))
#define LOAD_MASKED(off) _mm256_maskload_ps(b + p * ldb + (off), (off) ? m1 : m0)

/* Named accumulators, not an array: compilers spill arrays of vectors.
 * Full-width tiles use plain loads: vmaskmovps is slow on some CPUs (AMD
 * microcodes the masked store), so masks are kept for the tails. */
static void gemm_tile_avx2(int64_t m, int64_t n, int64_t k, const float *a, int64_t a_rs, int64_t a_cs, const float *b,
                           int64_t ldb, float *c, int64_t ldc, int accumulate)
{
    const float *r0 = a, *r1 = a + (1 < m ? 1 : m - 1) * a_rs, *r2 = a + (2 < m ? 2 : m - 1) * a_rs;
    const float *r3 = a + (3 < m ? 3 : m - 1) * a_rs, *r4 = a + (4 < m ? 4 : m - 1) * a_rs;
    const float *r5 = a + (5 < m ? 5 : m - 1) * a_rs;
    __m256i m0 = lane_mask(n), m1 = lane_mask(n - 8);
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    if (n == NR) {
        TILE_LOOP(LOAD_FULL)
        FULL_STORE(0);
        FULL_STORE(1);
        FULL_STORE(2);
        FULL_STORE(3);
        FULL_STORE(4);
        FULL_STORE(5);
        return;
    }
    TILE_LOOP(LOAD_MASKED)
    ROW_STORE(0);
    ROW_STORE(1);
    ROW_STORE(2);
    ROW_STORE(3);
    ROW_STORE(4);
    ROW_STORE(5);
}

/* exp(x) for 8 lanes, the same method as exp512 in avx512.c; 2^n is built
 * in the exponent bits, so lanes below -87.3 (denormal results) give 0. */
static __m256 exp256(__m256 x)
{
    const __m256 log2e = _mm256_set1_ps(MHA_EXP_LOG2E);
    const __m256 ln2_hi = _mm256_set1_ps(MHA_EXP_LN2_HI), ln2_lo = _mm256_set1_ps(MHA_EXP_LN2_LO);
    __m256 alive = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33f), _CMP_NLT_UQ);
    __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    __m256 x_in = x;
    x = _mm256_min_ps(x, _mm256_set1_ps(MHA_EXP_MAX_INPUT));
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.33f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, ln2_hi, x);
    r = _mm256_fnmadd_ps(n, ln2_lo, r);
    __m256 p = _mm256_set1_ps(MHA_EXP_C0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(MHA_EXP_C1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(MHA_EXP_C2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(MHA_EXP_C3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(MHA_EXP_C4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(MHA_EXP_C5));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* 2^n as a float: n + 127 in the exponent field; n is in [-126, 128]. */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    __m256 two_n = _mm256_castsi256_ps(e);
    /* n = 128 only for x near 88.72: split it as 2^127 * 2. */
    __m256 big = _mm256_cmp_ps(n, _mm256_set1_ps(127.5f), _CMP_GT_OQ);
    two_n = _mm256_blendv_ps(two_n, _mm256_set1_ps(0x1p127f), big);
    p = _mm256_blendv_ps(p, _mm256_mul_ps(p, _mm256_set1_ps(2.0f)), big);
    __m256 result = _mm256_and_ps(_mm256_mul_ps(p, two_n), alive);
    return _mm256_blendv_ps(result, x_in, nan);
}

static void softmax_step_avx2(float *s, int64_t lds, int64_t rows, int64_t cols, float *max, float *sum, float *scale)
{
    const __m256 neg_inf = _mm256_set1_ps(-INFINITY), one = _mm256_set1_ps(1.0f);
    for (int64_t i = 0; i < rows; i += 8) { /* 8 queries per vector */
        __m256i mk = lane_mask(rows - i);
        __m256 lanes = _mm256_castsi256_ps(mk);
        __m256 old_max = _mm256_blendv_ps(neg_inf, _mm256_maskload_ps(max + i, mk), lanes), new_max = old_max;
        __m256 nan = _mm256_cmp_ps(old_max, old_max, _CMP_UNORD_Q);
        for (int64_t j = 0; j < cols; j++) {
            __m256 x = _mm256_blendv_ps(neg_inf, _mm256_maskload_ps(s + j * lds + i, mk), lanes);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
            new_max = _mm256_max_ps(new_max, x);
        }
        /* vmaxps drops NaNs; a NaN score makes the row NaN, as a plain softmax does. */
        new_max = _mm256_blendv_ps(new_max, _mm256_set1_ps(NAN), nan);
        /* Queries that still see nothing subtract 0, so their -inf scores give 0. */
        __m256 seen = _mm256_cmp_ps(new_max, neg_inf, _CMP_NEQ_UQ);
        __m256 shift = _mm256_and_ps(new_max, seen), block_sum = _mm256_setzero_ps();
        for (int64_t j = 0; j < cols; j++) {
            __m256 e = exp256(_mm256_sub_ps(_mm256_maskload_ps(s + j * lds + i, mk), shift));
            _mm256_maskstore_ps(s + j * lds + i, mk, e);
            block_sum = _mm256_add_ps(block_sum, e);
        }
        __m256 sc = _mm256_blendv_ps(one, exp256(_mm256_sub_ps(old_max, shift)), seen);
        __m256 new_sum = _mm256_fmadd_ps(_mm256_maskload_ps(sum + i, mk), sc, block_sum);
        _mm256_maskstore_ps(scale + i, mk, sc);
        _mm256_maskstore_ps(sum + i, mk, new_sum);
        _mm256_maskstore_ps(max + i, mk, new_max);
    }
}

static void softmax_grad_avx2(float *s, float *dp, int64_t lds, int64_t rows, int64_t cols, const float *shift,
                              const float *mul, const float *delta)
{
    for (int64_t i = 0; i < rows; i += 8) { /* 8 queries per vector, as softmax_step */
        __m256i mk = lane_mask(rows - i);
        __m256 sh = _mm256_maskload_ps(shift + i, mk), mu = _mm256_maskload_ps(mul + i, mk);
        __m256 de = _mm256_maskload_ps(delta + i, mk);
        for (int64_t j = 0; j < cols; j++) {
            float *sj = s + j * lds + i, *dj = dp + j * lds + i;
            __m256 p = _mm256_mul_ps(exp256(_mm256_sub_ps(_mm256_maskload_ps(sj, mk), sh)), mu);
            _mm256_maskstore_ps(sj, mk, p);
            _mm256_maskstore_ps(dj, mk, _mm256_mul_ps(p, _mm256_sub_ps(_mm256_maskload_ps(dj, mk), de)));
        }
    }
}

static float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* As dot_rows_avx512, 8 lanes, two keys at a time. */
static void dot_rows_avx2(const float *k, int64_t ldk, int64_t n, const float *q, int64_t d, float *s)
{
    int64_t j = 0;
    for (; j + 2 <= n; j += 2) {
        const float *k0 = k + j * ldk, *k1 = k0 + ldk;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        for (int64_t c = 0; c < d; c += 8) {
            __m256i mk = lane_mask(d - c);
            __m256 qv = _mm256_maskload_ps(q + c, mk);
            a0 = _mm256_fmadd_ps(_mm256_maskload_ps(k0 + c, mk), qv, a0);
            a1 = _mm256_fmadd_ps(_mm256_maskload_ps(k1 + c, mk), qv, a1);
        }
        s[j] = hsum256(a0);
        s[j + 1] = hsum256(a1);
    }
    for (; j < n; j++) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t c = 0; c < d; c += 8) {
            __m256i mk = lane_mask(d - c);
            a = _mm256_fmadd_ps(_mm256_maskload_ps(k + j * ldk + c, mk), _mm256_maskload_ps(q + c, mk), a);
        }
        s[j] = hsum256(a);
    }
}

static void axpy_rows_avx2(const float *p, const float *v, int64_t ldv, int64_t n, int64_t d, float *o)
{
    for (int64_t c = 0; c < d; c += 32) {
        __m256i m0 = lane_mask(d - c), m1 = lane_mask(d - c - 8), m2 = lane_mask(d - c - 16),
                m3 = lane_mask(d - c - 24);
        __m256 o0 = _mm256_maskload_ps(o + c, m0), o1 = _mm256_maskload_ps(o + c + 8, m1);
        __m256 o2 = _mm256_maskload_ps(o + c + 16, m2), o3 = _mm256_maskload_ps(o + c + 24, m3);
        for (int64_t j = 0; j < n; j++) {
            const float *vj = v + j * ldv + c;
            __m256 pj = _mm256_set1_ps(p[j]);
            o0 = _mm256_fmadd_ps(pj, _mm256_maskload_ps(vj, m0), o0);
            o1 = _mm256_fmadd_ps(pj, _mm256_maskload_ps(vj + 8, m1), o1);
            o2 = _mm256_fmadd_ps(pj, _mm256_maskload_ps(vj + 16, m2), o2);
            o3 = _mm256_fmadd_ps(pj, _mm256_maskload_ps(vj + 24, m3), o3);
        }
        _mm256_maskstore_ps(o + c, m0, o0);
        _mm256_maskstore_ps(o + c + 8, m1, o1);
        _mm256_maskstore_ps(o + c + 16, m2, o2);
        _mm256_maskstore_ps(o + c + 24, m3, o3);
    }
}

static void scale_avx2(float *x, int64_t n, float alpha)
{
    __m256 va = _mm256_set1_ps(alpha);
    for (int64_t i = 0; i < n; i += 8) {
        __m256i mk = lane_mask(n - i);
        _mm256_maskstore_ps(x + i, mk, _mm256_mul_ps(_mm256_maskload_ps(x + i, mk), va));
    }
}

static void exp_shift_avx2(float *x, int64_t n, float shift)
{
    __m256 vs = _mm256_set1_ps(shift);
    for (int64_t i = 0; i < n; i += 8) {
        __m256i mk = lane_mask(n - i);
        _mm256_maskstore_ps(x + i, mk, exp256(_mm256_sub_ps(_mm256_maskload_ps(x + i, mk), vs)));
    }
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
    .gemm_tile = gemm_tile_avx2,
    .softmax_step = softmax_step_avx2,
    .softmax_grad = softmax_grad_avx2,
    .dot_rows = dot_rows_avx2,
    .axpy_rows = axpy_rows_avx2,
    .scale = scale_avx2,
    .exp_shift = exp_shift_avx2,
    .peak = peak_avx2,
};
