/*
 * avx512_bf16.c -- the bf16 micro-kernel on AVX512-BF16 (vdpbf16ps).
 * Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512bf16; called only
 * when cpu.c has seen the CPU support it.
 *
 * A 12 x 32 tile of C in 24 zmm registers, as the float32 kernel, but each
 * step takes two values of k: one zmm of B holds 16 columns x 2 rows of
 * bf16, one 32-bit broadcast holds A(i, p) and A(i, p+1), and vdpbf16ps
 * adds both products into each float32 lane: twice the multiply-adds of
 * vfmadd231ps per instruction.
 */
#include "kernels/few_rows.h"
#include "kernels/kernels.h"
#include "kernels/transpose16.h"

#include <immintrin.h>
#include <string.h>

static __mmask16 lane_mask(int64_t n)
{
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

static __m512i pair_at(const uint16_t *a)
{
    int32_t pair;
    memcpy(&pair, a, sizeof pair);
    return _mm512_set1_epi32(pair);
}

#define ROW_DOT(i)                                              \
    do {                                                        \
        __m512bh a_ = (__m512bh)pair_at(r##i + (p / 2) * a_ps); \
        c##i##0 = _mm512_dpbf16_ps(c##i##0, a_, b0);            \
        c##i##1 = _mm512_dpbf16_ps(c##i##1, a_, b1);            \
    } while (0)

#define ROW_STORE(i)                                                                  \
    do {                                                                              \
        if (i < m) {                                                                  \
            float *ci = c + i * ldc;                                                  \
            if (accumulate) {                                                         \
                c##i##0 = _mm512_add_ps(c##i##0, _mm512_maskz_loadu_ps(m0, ci));      \
                c##i##1 = _mm512_add_ps(c##i##1, _mm512_maskz_loadu_ps(m1, ci + 16)); \
            }                                                                         \
            _mm512_mask_storeu_ps(ci, m0, c##i##0);                                   \
            _mm512_mask_storeu_ps(ci + 16, m1, c##i##1);                              \
        }                                                                             \
    } while (0)

/* The tile, inlined once per row count few_rows.h tells apart. */
static inline __attribute__((always_inline)) void tile_body(int64_t m, int64_t n, int64_t k, const uint16_t *a,
                                                            int64_t a_rs, int64_t a_ps, const uint16_t *b, int64_t ldb,
                                                            float *c, int64_t ldc, int accumulate)
{
#define ROW_PTR(i) const uint16_t *r##i = a + (i < m ? i : m - 1) * a_rs
    ROW_PTR(0);
    ROW_PTR(1);
    ROW_PTR(2);
    ROW_PTR(3);
    ROW_PTR(4);
    ROW_PTR(5);
    ROW_PTR(6);
    ROW_PTR(7);
    ROW_PTR(8);
    ROW_PTR(9);
    ROW_PTR(10);
    ROW_PTR(11);
#undef ROW_PTR
    __mmask16 m0 = lane_mask(n), m1 = lane_mask(n - 16);
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
    __m512 c40 = c00, c41 = c00, c50 = c00, c51 = c00, c60 = c00, c61 = c00, c70 = c00, c71 = c00;
    __m512 c80 = c00, c81 = c00, c90 = c00, c91 = c00, c100 = c00, c101 = c00, c110 = c00, c111 = c00;
    for (int64_t p = 0; p < k; p += 2) {
        /* Lane j holds B(p, j) and B(p+1, j): 32 bits per column. */
        const uint16_t *bp = b + (p / 2) * ldb;
        __m512bh b0 = (__m512bh)_mm512_maskz_loadu_epi32(m0, bp);
        __m512bh b1 = (__m512bh)_mm512_maskz_loadu_epi32(m1, bp + 32);
        ROW_DOT(0);
        ROW_DOT(1);
        ROW_DOT(2);
        ROW_DOT(3);
        ROW_DOT(4);
        ROW_DOT(5);
        ROW_DOT(6);
        ROW_DOT(7);
        ROW_DOT(8);
        ROW_DOT(9);
        ROW_DOT(10);
        ROW_DOT(11);
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

/* Each row count (a decoding step's projections: a row a sequence) with
 * a body of its own, the missing rows' dot products dropped
 * (kernels/few_rows.h). */
static void tile_bf16_avx512(int64_t m, int64_t n, int64_t k, const uint16_t *a, int64_t a_rs, int64_t a_ps,
                             const uint16_t *b, int64_t ldb, float *c, int64_t ldc, int accumulate)
{
    MHA_FEW_ROWS_CALL(m, MHA_BF16_MR, tile_body(M, n, k, a, a_rs, a_ps, b, ldb, c, ldc, accumulate));
}

static void round_bf16_avx512(uint16_t *dst, const float *src, int64_t n)
{
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 mk = lane_mask(n - i);
        __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, src + i));
        _mm256_mask_storeu_epi16(dst + i, mk, (__m256i)h);
    }
}

/* Widen each bf16 to 32 bits, the second row's in the high half: lane j is
 * then the pair (x0[j], x1[j]) in memory order. */
static void pairs_bf16_avx512(uint16_t *dst, const float *x0, const float *x1, int64_t n)
{
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 mk = lane_mask(n - i);
        __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, x0 + i)));
        __m512i hi = x1 ? _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, x1 + i)))
                        : _mm512_setzero_si512();
        _mm512_mask_storeu_epi32(dst + 2 * i, mk, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
}

static void gemm_bf16_avx512(int64_t m, int64_t n, int64_t k, const uint16_t *a, int64_t a_rs, int64_t a_ps,
                             const uint16_t *b, int64_t ldb, float *c, int64_t ldc, int accumulate)
{
    mha__bf16_gemm_tiled(tile_bf16_avx512, m, n, k, a, a_rs, a_ps, b, ldb, c, ldc, accumulate);
}

/* Blocks of 16 x 16: 16 rows of src (keys) loaded, transposed in
 * registers, rounded, stored as 16 rows of dst (queries). */
static void transpose_bf16_avx512(uint16_t *dst, int64_t ldd, const float *src, int64_t lds, int64_t rows, int64_t cols)
{
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
        __mmask16 row_mask = lane_mask(rows - r0);
        for (int64_t c0 = 0; c0 < cols; c0 += 16) {
            int64_t nc = cols - c0 < 16 ? cols - c0 : 16, nr = rows - r0 < 16 ? rows - r0 : 16;
            __m512 x[16];
            load_transposed16(x, src + c0 * lds + r0, lds, nc, row_mask);
            __mmask16 col_mask = lane_mask(nc);
            for (int64_t r = 0; r < nr; r++)
                _mm256_mask_storeu_epi16(dst + (r0 + r) * ldd + c0, col_mask, (__m256i)_mm512_cvtneps_pbh(x[r]));
        }
    }
}

/* vdpbf16ps against ones: 32 probabilities an instruction, each row's
 * 16 lanes reduced at the end; four rows at a time, so that no chain
 * waits on the one before (one pass over the float32 tile instead,
 * rounding each score again, ran the bf16 layer at N = 2048 5-9% slower). */
static void row_sums_bf16_avx512(const uint16_t *p, int64_t ld, int64_t rows, int64_t cols, float *sum)
{
    const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3f80); /* bf16 1.0 */
    for (int64_t r0 = 0; r0 < rows; r0 += 4) {
        int64_t nr = rows - r0 < 4 ? rows - r0 : 4;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t c = 0; c < cols; c += 32) {
            __mmask32 keys = cols - c >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (cols - c)) - 1);
            for (int64_t i = 0; i < 4; i++) {
                __m512i x = _mm512_maskz_loadu_epi16(i < nr ? keys : 0, p + (r0 + i) * ld + c);
                acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)x, ones);
            }
        }
        for (int64_t i = 0; i < nr; i++) sum[r0 + i] += _mm512_reduce_add_ps(acc[i]);
    }
}

/* 12 independent vdpbf16ps chains; each instruction is 16 lanes x 2
 * multiply-adds. */
static double peak_bf16_avx512(int64_t iterations)
{
    volatile float seed = 1.0f;
    __m512bh a = (__m512bh)_mm512_set1_epi32((int)(seed * 16256)), b = a;
    __m512 x[12];
    for (int i = 0; i < 12; i++) x[i] = _mm512_set1_ps(seed * (float)i);
    for (int64_t it = 0; it < iterations; it++) {
#pragma GCC unroll 12
        for (int i = 0; i < 12; i++) x[i] = _mm512_dpbf16_ps(x[i], a, b);
    }
    __m512 sum = x[0];
    for (int i = 1; i < 12; i++) sum = _mm512_add_ps(sum, x[i]);
    seed = _mm512_reduce_add_ps(sum);
    return 2.0 * 2.0 * 16.0 * 12.0 * (double)iterations;
}

/* 16 bf16 values widened to float32: the bits shifted into the high half. */
static __m512 load_bf16(__mmask16 mk, const uint16_t *x)
{
    __m256i h = _mm256_maskz_loadu_epi16(mk, x);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

#define ROWS_ELEM        uint16_t
#define ROWS_LOAD(mk, x) load_bf16(mk, x)
#define ROWS_DOT         dot_rows_bf16_avx512
#define ROWS_AXPY        axpy_rows_bf16_avx512
#define ROWS_DOT_MULTI   dot_rows_bf16_multi_avx512
#define ROWS_AXPY_MULTI  axpy_rows_bf16_multi_avx512
#include "kernels/rows_avx512.h"

/* And prefetched (rows_options.h), the AMX table's far rows.  Sapphire
 * Rapids, two threads, 12 heads of 64, a decoding step over a bf16
 * cache, three alternating rounds: 32768 tokens (101 MB) 1.94-1.99 ms
 * against 3.41-4.23, reading K and V at the copy bandwidth; 131072
 * tokens, 8 heads, 8.5-9.0 against 12.9-13.1; 4096 tokens 0.237-0.241
 * against 0.238-0.265; but 512 tokens, which sit in L2, 0.024-0.025
 * against 0.022-0.024 (hence far rows only: attn/plan.c).  The
 * AVX512-BF16 table without AMX (Zen 4) keeps the plain rows: there, 12
 * heads, two threads, five alternating rounds, the far rows ran 1024
 * tokens 0.96x, 4096 1.00x, 8192 (25 MB, past two thirds of the 32 MB
 * L3) 1.33x but 32768 0.94x, where the plain step already reads at the
 * copy bandwidth: no one rule gains. */
#define ROWS_PREFETCHED
#define ROWS_ELEM        uint16_t
#define ROWS_LOAD(mk, x) load_bf16(mk, x)
#define ROWS_DOT         dot_rows_bf16_far_avx512
#define ROWS_AXPY        axpy_rows_bf16_far_avx512
#define ROWS_DOT_MULTI   dot_rows_bf16_multi_far_avx512
#define ROWS_AXPY_MULTI  axpy_rows_bf16_multi_far_avx512
#include "kernels/rows_avx512.h"

const mha__bf16_kernels mha__bf16_kernels_avx512 = {
    .name = "avx512_bf16",
    .gemm = gemm_bf16_avx512,
    .round = round_bf16_avx512,
    .pairs = pairs_bf16_avx512,
    .transpose = transpose_bf16_avx512,
    .row_sums = row_sums_bf16_avx512,
    .dot_rows = dot_rows_bf16_avx512,
    .axpy_rows = axpy_rows_bf16_avx512,
    .dot_rows_multi = dot_rows_bf16_multi_avx512,
    .axpy_rows_multi = axpy_rows_bf16_multi_avx512,
    .peak = peak_bf16_avx512,
};

/* Every CPU with AMX-BF16 has AVX512-BF16: the tiles take the products,
 * this file's kernels the rest. */
const mha__bf16_kernels mha__bf16_kernels_amx = {
    .name = "amx",
    .gemm = mha__bf16_gemm_amx,
    .round = round_bf16_avx512,
    .pairs = pairs_bf16_avx512,
    .transpose = transpose_bf16_avx512,
    .row_sums = row_sums_bf16_avx512,
    .dot_rows = dot_rows_bf16_avx512,
    .axpy_rows = axpy_rows_bf16_avx512,
    .dot_rows_far = dot_rows_bf16_far_avx512,
    .axpy_rows_far = axpy_rows_bf16_far_avx512,
    .dot_rows_multi = dot_rows_bf16_multi_avx512,
    .axpy_rows_multi = axpy_rows_bf16_multi_avx512,
    .dot_rows_multi_far = dot_rows_bf16_multi_far_avx512,
    .axpy_rows_multi_far = axpy_rows_bf16_multi_far_avx512,
    .peak = mha__bf16_peak_amx,
    .split_transpose = mha__split_transpose_amx,
    .split_rows_tile = mha__split_rows_tile_amx,
    .split_pairs_tile = mha__split_pairs_tile_amx,
    .split_unit_pairs_tile = mha__split_unit_pairs_tile_amx,
    .split_near_rows_tile = mha__split_near_rows_tile_amx,
    .split_near_pairs_tile = mha__split_near_pairs_tile_amx,
    .gemm_split = mha__gemm_split_amx,
    .gemm_split_beside = mha__gemm_split_beside_amx,
    .split_release = mha__split_release_amx,
};
