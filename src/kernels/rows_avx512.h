/*
 * rows_avx512.h -- the decoding kernels dot_rows and axpy_rows (kernels.h)
 * for AVX-512, written once and included by avx512.c (float32 rows) and
 * avx512_bf16.c (bf16 rows), which define
 *   ROWS_ELEM           the stored element type
 *   ROWS_LOAD(mk, x)    16 elements at x (lanes in mk) as float32
 *   ROWS_DOT, ROWS_AXPY the functions' names
 * and a lane_mask(n).  Four keys at a time, each an FMA chain over 16-wide
 * slices of d, then reduced; values accumulate in registers, 64 columns
 * at a time, while the rows stream by.  Tails are masked.
 */

#ifndef MHA_ROWS_REDUCE4
#define MHA_ROWS_REDUCE4
/* The four sums of a0 .. a3 at once: pairwise within 128-bit lanes
 * (unpack and add), then across the four lanes. */
static __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3)
{
    __m512 x01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    __m512 x23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    __m512 lo = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(x01), _mm512_castps_pd(x23)));
    __m512 hi = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(x01), _mm512_castps_pd(x23)));
    __m512 z = _mm512_add_ps(lo, hi); /* each 128-bit lane: its share of the four sums */
    __m256 z8 =
        _mm256_add_ps(_mm512_castps512_ps256(z), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(z8), _mm256_extractf128_ps(z8, 1));
}
#endif

static void ROWS_DOT(const ROWS_ELEM *k, int64_t ldk, int64_t n, const float *q, int64_t d, float *s)
{
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const ROWS_ELEM *k0 = k + j * ldk, *k1 = k0 + ldk, *k2 = k1 + ldk, *k3 = k2 + ldk;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t c = 0; c < d; c += 16) {
            __mmask16 mk = lane_mask(d - c);
            __m512 qv = _mm512_maskz_loadu_ps(mk, q + c);
            a0 = _mm512_fmadd_ps(ROWS_LOAD(mk, k0 + c), qv, a0);
            a1 = _mm512_fmadd_ps(ROWS_LOAD(mk, k1 + c), qv, a1);
            a2 = _mm512_fmadd_ps(ROWS_LOAD(mk, k2 + c), qv, a2);
            a3 = _mm512_fmadd_ps(ROWS_LOAD(mk, k3 + c), qv, a3);
        }
        _mm_storeu_ps(s + j, reduce4(a0, a1, a2, a3));
    }
    for (; j < n; j++) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t c = 0; c < d; c += 16) {
            __mmask16 mk = lane_mask(d - c);
            a = _mm512_fmadd_ps(ROWS_LOAD(mk, k + j * ldk + c), _mm512_maskz_loadu_ps(mk, q + c), a);
        }
        s[j] = _mm512_reduce_add_ps(a);
    }
}

static void ROWS_AXPY(const float *p, const ROWS_ELEM *v, int64_t ldv, int64_t n, int64_t d, float *o)
{
    for (int64_t c = 0; c < d; c += 64) {
        __mmask16 m0 = lane_mask(d - c), m1 = lane_mask(d - c - 16), m2 = lane_mask(d - c - 32),
                  m3 = lane_mask(d - c - 48);
        __m512 o0 = _mm512_maskz_loadu_ps(m0, o + c), o1 = _mm512_maskz_loadu_ps(m1, o + c + 16);
        __m512 o2 = _mm512_maskz_loadu_ps(m2, o + c + 32), o3 = _mm512_maskz_loadu_ps(m3, o + c + 48);
        for (int64_t j = 0; j < n; j++) {
            const ROWS_ELEM *vj = v + j * ldv + c;
            __m512 pj = _mm512_set1_ps(p[j]);
            o0 = _mm512_fmadd_ps(pj, ROWS_LOAD(m0, vj), o0);
            o1 = _mm512_fmadd_ps(pj, ROWS_LOAD(m1, vj + 16), o1);
            o2 = _mm512_fmadd_ps(pj, ROWS_LOAD(m2, vj + 32), o2);
            o3 = _mm512_fmadd_ps(pj, ROWS_LOAD(m3, vj + 48), o3);
        }
        _mm512_mask_storeu_ps(o + c, m0, o0);
        _mm512_mask_storeu_ps(o + c + 16, m1, o1);
        _mm512_mask_storeu_ps(o + c + 32, m2, o2);
        _mm512_mask_storeu_ps(o + c + 48, m3, o3);
    }
}

#undef ROWS_ELEM
#undef ROWS_LOAD
#undef ROWS_DOT
#undef ROWS_AXPY
