/*
 * avx512.c -- kernels for AVX-512 (F, DQ, BW, VL).  Compiled with
 * -mavx512f -mavx512dq -mavx512bw -mavx512vl -mfma; called only when cpu.c
 * has seen the CPU and OS support them.
 *
 * gemm_tile keeps an 8 x 32 tile of C in 16 zmm registers: per step of k it
 * loads two vectors of B and broadcasts eight values of A (16 FMAs for 10
 * loads).  Rows past m re-read the last valid row of A and are not stored,
 * so tails never touch memory outside the tile; columns past n are masked.
 */
#include "kernels.h"

#include <immintrin.h>
#include <math.h>

enum { MR = 8, NR = 32 };

static __mmask16 lane_mask(int64_t n)
{
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

static void gemm_tile_avx512(int64_t m, int64_t n, int64_t k, const float *a, int64_t a_rs, int64_t a_cs,
                             const float *b, int64_t ldb, float *c, int64_t ldc, int accumulate)
{
    const float *row[MR];
    for (int i = 0; i < MR; i++) row[i] = a + (i < m ? i : m - 1) * a_rs;
    __mmask16 m0 = lane_mask(n), m1 = lane_mask(n - 16);
    __m512 acc[MR][2];
    for (int i = 0; i < MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < k; p++) {
        __m512 b0 = _mm512_maskz_loadu_ps(m0, b + p * ldb);
        __m512 b1 = _mm512_maskz_loadu_ps(m1, b + p * ldb + 16);
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            __m512 ai = _mm512_set1_ps(row[i][p * a_cs]);
            acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
        }
    }
    for (int i = 0; i < m; i++) {
        float *ci = c + i * ldc;
        if (accumulate) {
            acc[i][0] = _mm512_add_ps(acc[i][0], _mm512_maskz_loadu_ps(m0, ci));
            acc[i][1] = _mm512_add_ps(acc[i][1], _mm512_maskz_loadu_ps(m1, ci + 16));
        }
        _mm512_mask_storeu_ps(ci, m0, acc[i][0]);
        _mm512_mask_storeu_ps(ci + 16, m1, acc[i][1]);
    }
}

/* exp(x) for 16 lanes, about 1 ulp: x = n ln2 + r with |r| <= ln2/2, a
 * degree-6 polynomial for exp(r), then scale by 2^n.  Lanes below
 * -103.9 (where expf underflows to 0) give exactly 0, -inf included; NaN
 * stays NaN. */
static __m512 exp512(__m512 x)
{
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    __mmask16 alive = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-103.9f), _CMP_NLT_UQ);
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    __m512 x_in = x;
    x = _mm512_min_ps(x, _mm512_set1_ps(88.72f));
    x = _mm512_max_ps(x, _mm512_set1_ps(-103.9f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_mask_mov_ps(_mm512_maskz_mov_ps(alive, _mm512_scalef_ps(p, n)), nan, x_in);
}

static void softmax_step_avx512(float *s, int64_t lds, int64_t rows, int64_t cols, float *max, float *sum,
                                float *scale)
{
    for (int64_t r = 0; r < rows; r++) {
        float *row = s + r * lds;
        __m512 vmax = _mm512_set1_ps(max[r]);
        for (int64_t j = 0; j < cols; j += 16) {
            __mmask16 mk = lane_mask(cols - j);
            vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), mk, row + j));
        }
        float new_max = _mm512_reduce_max_ps(vmax);
        if (new_max == -INFINITY) {
            for (int64_t j = 0; j < cols; j += 16) _mm512_mask_storeu_ps(row + j, lane_mask(cols - j), _mm512_setzero_ps());
            scale[r] = 1.0f;
            continue;
        }
        __m512 vsum = _mm512_setzero_ps(), shift = _mm512_set1_ps(new_max);
        for (int64_t j = 0; j < cols; j += 16) {
            __mmask16 mk = lane_mask(cols - j);
            __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, row + j), shift));
            e = _mm512_maskz_mov_ps(mk, e);
            _mm512_mask_storeu_ps(row + j, mk, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        scale[r] = expf(max[r] - new_max);
        sum[r] = sum[r] * scale[r] + _mm512_reduce_add_ps(vsum);
        max[r] = new_max;
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

const mha__kernels mha__kernels_avx512 = {
    .name = "avx512",
    .mr = MR,
    .nr = NR,
    .gemm_tile = gemm_tile_avx512,
    .softmax_step = softmax_step_avx512,
    .scale = scale_avx512,
    .exp_shift = exp_shift_avx512,
};
