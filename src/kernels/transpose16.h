/*
 * transpose16.h -- a 16 x 16 float transpose in AVX-512 registers, for the
 * kernels that turn rows into columns: avx512_bf16.c's probabilities into
 * rows of keys, avx512.c's queries into columns (queries in lanes).
 * For files compiled for AVX-512F.
 */
#ifndef MHA_KERNELS_TRANSPOSE16_H
#define MHA_KERNELS_TRANSPOSE16_H

#include <immintrin.h>

/* x[j][i] <- x[i][j] for 16 rows of 16 floats: pairs of rows interleaved,
 * then fours, then the 128-bit lanes moved as a 4 x 4 transpose. */
static inline void transpose16(__m512 x[16])
{
    __m512 t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(x[i], x[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(x[i], x[i + 1]);
    }
    /* u[4g + e], lane L: rows 4g .. 4g+3 of column 4L + e. */
    for (int g = 0; g < 16; g += 4) {
        u[g] = _mm512_shuffle_ps(t[g], t[g + 2], 0x44);
        u[g + 1] = _mm512_shuffle_ps(t[g], t[g + 2], 0xee);
        u[g + 2] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0x44);
        u[g + 3] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0xee);
    }
    /* Column 4L + e, lane g, is u[4g + e]'s lane L. */
    for (int e = 0; e < 4; e++) {
        __m512 v0 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x44), v1 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xee);
        __m512 v2 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x44),
               v3 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xee);
        x[e] = _mm512_shuffle_f32x4(v0, v2, 0x88);
        x[4 + e] = _mm512_shuffle_f32x4(v0, v2, 0xdd);
        x[8 + e] = _mm512_shuffle_f32x4(v1, v3, 0x88);
        x[12 + e] = _mm512_shuffle_f32x4(v1, v3, 0xdd);
    }
}

/* The first n rows of src (rows lds floats apart, the lanes in `lanes`
 * of each, the others 0; rows past n all 0) loaded and transposed: x[j]
 * then holds column j of those rows, a row a lane. */
static inline void load_transposed16(__m512 x[16], const float *src, int64_t lds, int64_t n, __mmask16 lanes)
{
    for (int64_t i = 0; i < 16; i++) x[i] = i < n ? _mm512_maskz_loadu_ps(lanes, src + i * lds) : _mm512_setzero_ps();
    transpose16(x);
}

#endif
