/*
 * avx2.c -- kernels for AVX2 with FMA.  Compiled with -mavx2 -mfma; called
 * only when cpu.c has seen the CPU and OS support them.
 *
 * gemm_tile keeps a 6 x 16 tile of C in 12 ymm registers: per step of k it
 * loads two vectors of B and broadcasts six values of A.  Rows past m
 * re-read the last valid row of A and are not stored; columns past n are
 * masked.
 */
#include "kernels.h"

#include <immintrin.h>
#include <math.h>

enum { MR = 6, NR = 16 };

/* Lanes 0 .. n-1 of 8 enabled, as maskload/maskstore want them. */
static __m256i lane_mask(int64_t n)
{
    int64_t k = n < 0 ? 0 : n > 8 ? 8 : n;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)k), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static void gemm_tile_avx2(int64_t m, int64_t n, int64_t k, const float *a, int64_t a_rs, int64_t a_cs,
                           const float *b, int64_t ldb, float *c, int64_t ldc, int accumulate)
{
    const float *row[MR];
    for (int i = 0; i < MR; i++) row[i] = a + (i < m ? i : m - 1) * a_rs;
    __m256i m0 = lane_mask(n), m1 = lane_mask(n - 8);
    __m256 acc[MR][2];
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t p = 0; p < k; p++) {
        __m256 b0 = _mm256_maskload_ps(b + p * ldb, m0);
        __m256 b1 = _mm256_maskload_ps(b + p * ldb + 8, m1);
#pragma GCC unroll 6
        for (int i = 0; i < MR; i++) {
            __m256 ai = _mm256_broadcast_ss(&row[i][p * a_cs]);
            acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
        }
    }
    for (int i = 0; i < m; i++) {
        float *ci = c + i * ldc;
        if (accumulate) {
            acc[i][0] = _mm256_add_ps(acc[i][0], _mm256_maskload_ps(ci, m0));
            acc[i][1] = _mm256_add_ps(acc[i][1], _mm256_maskload_ps(ci + 8, m1));
        }
        _mm256_maskstore_ps(ci, m0, acc[i][0]);
        _mm256_maskstore_ps(ci + 8, m1, acc[i][1]);
    }
}

/* exp(x) for 8 lanes, the same method as exp512 in avx512.c; 2^n is built
 * in the exponent bits, so lanes below -87.3 (denormal results) give 0. */
static __m256 exp256(__m256 x)
{
    const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
    const __m256 ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
    __m256 alive = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33f), _CMP_NLT_UQ);
    __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    __m256 x_in = x;
    x = _mm256_min_ps(x, _mm256_set1_ps(88.72f));
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.33f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, ln2_hi, x);
    r = _mm256_fnmadd_ps(n, ln2_lo, r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
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

static float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static float hmax256(__m256 v)
{
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static void softmax_step_avx2(float *s, int64_t lds, int64_t rows, int64_t cols, float *max, float *sum,
                              float *scale)
{
    const __m256 neg_inf = _mm256_set1_ps(-INFINITY);
    for (int64_t r = 0; r < rows; r++) {
        float *row = s + r * lds;
        __m256 vmax = _mm256_set1_ps(max[r]);
        for (int64_t j = 0; j < cols; j += 8) {
            __m256i mk = lane_mask(cols - j);
            __m256 v = _mm256_blendv_ps(neg_inf, _mm256_maskload_ps(row + j, mk), _mm256_castsi256_ps(mk));
            vmax = _mm256_max_ps(vmax, v);
        }
        float new_max = hmax256(vmax);
        if (new_max == -INFINITY) {
            for (int64_t j = 0; j < cols; j += 8) _mm256_maskstore_ps(row + j, lane_mask(cols - j), _mm256_setzero_ps());
            scale[r] = 1.0f;
            continue;
        }
        __m256 vsum = _mm256_setzero_ps(), shift = _mm256_set1_ps(new_max);
        for (int64_t j = 0; j < cols; j += 8) {
            __m256i mk = lane_mask(cols - j);
            __m256 e = exp256(_mm256_sub_ps(_mm256_maskload_ps(row + j, mk), shift));
            e = _mm256_and_ps(e, _mm256_castsi256_ps(mk));
            _mm256_maskstore_ps(row + j, mk, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        scale[r] = expf(max[r] - new_max);
        sum[r] = sum[r] * scale[r] + hsum256(vsum);
        max[r] = new_max;
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

const mha__kernels mha__kernels_avx2 = {
    .name = "avx2",
    .mr = MR,
    .nr = NR,
    .gemm_tile = gemm_tile_avx2,
    .softmax_step = softmax_step_avx2,
    .scale = scale_avx2,
    .exp_shift = exp_shift_avx2,
};
