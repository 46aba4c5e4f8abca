/*
 * rows_avx2.h -- the decoding kernels dot_rows and axpy_rows (kernels.h)
 * for AVX2, written once and included by avx2.c for float32 rows and for
 * bf16 rows, which defines
 *   ROWS_ELEM                the stored element type
 *   ROWS_LOAD(x, c, d)       8 elements of a row at x + c as float32,
 *                            zeros past its end d
 *   ROWS_DOT, ROWS_AXPY64, ROWS_AXPY   the functions' names
 *   ROWS_PREFETCHED          (optional) prefetch each row ahead of its
 *                            use (rows_options.h)
 *   ROWS_SCALED              (optional) rows carry a float scale each, as
 *                            the int8 kernels' contract has it: the
 *                            functions take `scale` after n (dot) or p
 *                            (axpy), and apply it to each score and weight
 *                            (rows_options.h)
 *   ROWS_KEYWISE             (optional) the dot reads blocks of 32 columns
 *                            key by key (rows_avx512.h says when that pays;
 *                            rows_options.h)
 * and row_load (8 floats, as ROWS_LOAD) and lane_mask.  Eight keys at a
 * time (the last n mod 8 one by one), each an FMA chain over 8-wide
 * slices of d, reduced four together (a lone key the same way, so its
 * score never depends on where it falls);
 * values accumulate in eight named registers, 64 columns at a time, while
 * the rows stream by.  Masks only on a row's tail: AMD microcodes them.
 */

#ifndef MHA_ROWS_AVX2_REDUCE4
#define MHA_ROWS_AVX2_REDUCE4
/* The four sums of a0 .. a3 at once (two rounds of hadd, then the two
 * 128-bit halves). */
static __m128 reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3)
{
    __m256 x = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
}
#endif

#include "kernels/rows_options.h"

/* One 8-wide slice c of q against keys k0 .. k0 + 3 ldk: an FMA into each
 * key's chain (q, d and ldk are ROWS_DOT's). */
#define ROWS_DOT_SLICE4(k0, c, a0, a1, a2, a3)                          \
    do {                                                                \
        __m256 qv_ = row_load(q, c, d);                                 \
        a0 = _mm256_fmadd_ps(ROWS_LOAD((k0), c, d), qv_, a0);           \
        a1 = _mm256_fmadd_ps(ROWS_LOAD((k0) + ldk, c, d), qv_, a1);     \
        a2 = _mm256_fmadd_ps(ROWS_LOAD((k0) + 2 * ldk, c, d), qv_, a2); \
        a3 = _mm256_fmadd_ps(ROWS_LOAD((k0) + 3 * ldk, c, d), qv_, a3); \
    } while (0)

/* Columns [c, c + 32) of the key row kr into its chain a, in address
 * order, against q's slices q0 .. q3 (ROWS_DOT's); the empty asm keeps
 * the compiler from interleaving the keys slice by slice, as in
 * rows_avx512.h.  The loads see a 32-column row, so they are whole. */
#define ROWS_DOT_KEY32(a, kr, c)                                   \
    do {                                                           \
        a = _mm256_fmadd_ps(ROWS_LOAD((kr) + (c), 0, 32), q0, a);  \
        a = _mm256_fmadd_ps(ROWS_LOAD((kr) + (c), 8, 32), q1, a);  \
        a = _mm256_fmadd_ps(ROWS_LOAD((kr) + (c), 16, 32), q2, a); \
        a = _mm256_fmadd_ps(ROWS_LOAD((kr) + (c), 24, 32), q3, a); \
        __asm__ volatile("" ::: "memory");                         \
    } while (0)

static void ROWS_DOT(const ROWS_ELEM *k, int64_t ldk, int64_t n, ROWS_SCALE_PARAM const float *q, int64_t d, float *s)
{
    int64_t j = 0;
    /* Eight keys share q: its loads and the loop's overhead are paid once
     * per eight keys.  Int8 rows on Zen 3 (one thread, a 256-key chunk in
     * L1): 0.63 -> 0.50 ns per 8 values, where the widening alone
     * (vpmovsxbd + vcvtdq2ps) takes 0.41.  With ROWS_KEYWISE, blocks of 32
     * columns are read key by key, each row's lines in address order
     * (rows_avx512.h); every chain runs over d in order either way. */
    for (; j + 8 <= n; j += 8) {
        const ROWS_ELEM *k0 = k + j * ldk, *k4 = k0 + 4 * ldk;
        for (int r = 0; r < 8; r++) ROWS_PREFETCH(k0 + r * ldk, ldk, d);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        int64_t c = 0;
#ifdef ROWS_KEYWISE
        ROWS_KEY_BLOCKS(__m256, _mm256_loadu_ps, 8, ROWS_DOT_KEY32);
#endif
        for (; c + 8 <= d; c += 8) { /* whole vectors: the loads' tail branches fold away */
            ROWS_DOT_SLICE4(k0, c, a0, a1, a2, a3);
            ROWS_DOT_SLICE4(k4, c, a4, a5, a6, a7); /* the compiler loads q's slice once */
        }
        if (c < d) {
            ROWS_DOT_SLICE4(k0, c, a0, a1, a2, a3);
            ROWS_DOT_SLICE4(k4, c, a4, a5, a6, a7);
        }
        _mm_storeu_ps(s + j, ROWS_SCALE4(reduce4(a0, a1, a2, a3), j));
        _mm_storeu_ps(s + j + 4, ROWS_SCALE4(reduce4(a4, a5, a6, a7), j + 4));
    }
    for (; j < n; j++) {
        __m256 a = _mm256_setzero_ps(), zero = a;
        for (int64_t c = 0; c < d; c += 8) a = _mm256_fmadd_ps(ROWS_LOAD(k + j * ldk, c, d), row_load(q, c, d), a);
        s[j] = ROWS_SCALE1(_mm_cvtss_f32(reduce4(a, zero, zero, zero)), j);
    }
}

/* o[0 .. 63] += sum_j p[j] v_j[0 .. 63]: 8 named accumulators (8 FMA
 * chains keep both pipes busy; an array of vectors would be spilled). */
static void ROWS_AXPY64(const float *p, ROWS_SCALE_PARAM const ROWS_ELEM *v, int64_t ldv, int64_t n, float *o)
{
    __m256 o0 = _mm256_loadu_ps(o), o1 = _mm256_loadu_ps(o + 8), o2 = _mm256_loadu_ps(o + 16);
    __m256 o3 = _mm256_loadu_ps(o + 24), o4 = _mm256_loadu_ps(o + 32), o5 = _mm256_loadu_ps(o + 40);
    __m256 o6 = _mm256_loadu_ps(o + 48), o7 = _mm256_loadu_ps(o + 56);
    for (int64_t j = 0; j < n; j++) {
        const ROWS_ELEM *vj = v + j * ldv;
        ROWS_PREFETCH(vj, ldv, 64);
        __m256 pj = _mm256_set1_ps(ROWS_WEIGHT(p, j));
        o0 = _mm256_fmadd_ps(pj, ROWS_LOAD(vj, 0, 64), o0);
        o1 = _mm256_fmadd_ps(pj, ROWS_LOAD(vj, 8, 64), o1);
        o2 = _mm256_fmadd_ps(pj, ROWS_LOAD(vj, 16, 64), o2);
        o3 = _mm256_fmadd_ps(pj, ROWS_LOAD(vj, 24, 64), o3);
        o4 = _mm256_fmadd_ps(pj, ROWS_LOAD(vj, 32, 64), o4);
        o5 = _mm256_fmadd_ps(pj, ROWS_LOAD(vj, 40, 64), o5);
        o6 = _mm256_fmadd_ps(pj, ROWS_LOAD(vj, 48, 64), o6);
        o7 = _mm256_fmadd_ps(pj, ROWS_LOAD(vj, 56, 64), o7);
    }
    _mm256_storeu_ps(o, o0);
    _mm256_storeu_ps(o + 8, o1);
    _mm256_storeu_ps(o + 16, o2);
    _mm256_storeu_ps(o + 24, o3);
    _mm256_storeu_ps(o + 32, o4);
    _mm256_storeu_ps(o + 40, o5);
    _mm256_storeu_ps(o + 48, o6);
    _mm256_storeu_ps(o + 56, o7);
}

/* Each output is one chain over j in order, whichever path computes it:
 * whole 64-column blocks, then the last columns 8 at a time. */
static void ROWS_AXPY(const float *p, ROWS_SCALE_PARAM const ROWS_ELEM *v, int64_t ldv, int64_t n, int64_t d, float *o)
{
    int64_t c = 0;
    for (; c + 64 <= d; c += 64) ROWS_AXPY64(p, ROWS_SCALE_ARG v + c, ldv, n, o + c);
    for (; c < d; c += 8) {
        __m256 acc = row_load(o, c, d);
        for (int64_t j = 0; j < n; j++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(ROWS_WEIGHT(p, j)), ROWS_LOAD(v + j * ldv, c, d), acc);
        if (c + 8 <= d) _mm256_storeu_ps(o + c, acc);
        else _mm256_maskstore_ps(o + c, lane_mask(d - c), acc);
    }
}

#undef ROWS_DOT_SLICE4
#undef ROWS_DOT_KEY32
#undef ROWS_AXPY64
#include "kernels/rows_undef.h"
