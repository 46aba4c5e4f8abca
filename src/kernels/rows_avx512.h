/*
 * rows_avx512.h -- the decoding kernels dot_rows and axpy_rows (kernels.h)
 * for AVX-512, written once and included by avx512.c (float32 and int8
 * rows) and avx512_bf16.c (bf16 rows), which define
 *   ROWS_ELEM           the stored element type
 *   ROWS_LOAD(mk, x)    16 elements at x (lanes in mk) as float32
 *   ROWS_DOT, ROWS_AXPY the functions' names
 *   ROWS_PREFETCHED     (optional) prefetch each row ahead of its use
 *                       (rows_options.h)
 *   ROWS_SCALED         (optional) rows carry a float scale each, as the
 *                       int8 kernels' contract has it: the functions take
 *                       `scale` after n (dot) or p (axpy), and apply it to
 *                       each score and weight (rows_options.h)
 *   ROWS_KEYWISE        (optional) the dot reads blocks of 64 columns key
 *                       by key (ROWS_DOT says when that pays; rows_options.h)
 *   ROWS_DOT_MULTI, ROWS_AXPY_MULTI  (optional) the names of the same two
 *                       for up to MHA_ROWS_AT_ONCE query rows at once
 *                       (kernels.h), after ROWS_AXPY below
 * and a lane_mask(n) (and kernels/few_rows.h for the multi-row forms).  Eight keys at a time, each an FMA chain over
 * 16-wide slices of d, then reduced four together; values accumulate in
 * registers, 64 columns at a time, while the rows stream by.  Tails are
 * masked.
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

#include "kernels/rows_options.h"

/* One 16-wide slice c of q (lanes in mk) against keys k0 .. k0 + 3 ldk:
 * an FMA into each key's chain (q and ldk are ROWS_DOT's). */
#define ROWS_DOT_SLICE4(k0, c, mk, a0, a1, a2, a3)                            \
    do {                                                                      \
        __m512 qv_ = _mm512_maskz_loadu_ps((mk), q + (c));                    \
        a0 = _mm512_fmadd_ps(ROWS_LOAD((mk), (k0) + (c)), qv_, a0);           \
        a1 = _mm512_fmadd_ps(ROWS_LOAD((mk), (k0) + ldk + (c)), qv_, a1);     \
        a2 = _mm512_fmadd_ps(ROWS_LOAD((mk), (k0) + 2 * ldk + (c)), qv_, a2); \
        a3 = _mm512_fmadd_ps(ROWS_LOAD((mk), (k0) + 3 * ldk + (c)), qv_, a3); \
    } while (0)

/* Columns [c, c + 64) of the key row kr into its chain a, the four
 * slices in address order, against q's slices q0 .. q3 (ROWS_DOT's).
 * The empty asm with a memory clobber ends the key: no load moves across
 * it, so the compiler cannot interleave the eight keys' chains slice by
 * slice (gcc's scheduler did, to hide the FMAs' latency, which the
 * out-of-order core hides anyway). */
#define ROWS_DOT_KEY64(a, kr, c)                                      \
    do {                                                              \
        a = _mm512_fmadd_ps(ROWS_LOAD(full, (kr) + (c)), q0, a);      \
        a = _mm512_fmadd_ps(ROWS_LOAD(full, (kr) + (c) + 16), q1, a); \
        a = _mm512_fmadd_ps(ROWS_LOAD(full, (kr) + (c) + 32), q2, a); \
        a = _mm512_fmadd_ps(ROWS_LOAD(full, (kr) + (c) + 48), q3, a); \
        __asm__ volatile("" ::: "memory");                            \
    } while (0)

/* Eight keys at a time share q, whole slices with plain loads (a
 * constant full mask folds away) and the row's tail masked; a lone key
 * is reduced as one of four, so its score never depends on where it
 * falls.  Int8 rows, one thread, a 256-key chunk in L1 (Sapphire
 * Rapids): 5.3 -> 3.3-4.2 ns a key of 64 values against four keys at a
 * time with every slice's mask computed and applied.
 *
 * With ROWS_KEYWISE each block of 64 columns is read key by key, a row's
 * lines in address order, with q's four slices in registers.  Float32
 * rows take it: a row of 64 is four cache lines, and taken slice by slice
 * across the eight keys the loads strode 256 bytes back and forth; with
 * the cache in L3 the dot took twice the time of the value sum over as
 * many bytes (1.4x after), and the decoding step ran 1.3x as fast on two
 * threads, 1.9x on one (docs/PERFORMANCE.md).  Int8 rows, a line each,
 * gained nothing measurable (sets of alternating rounds from 0.97x to
 * 1.13x) and bf16 rows were even, so they keep the slice order.  Every
 * chain runs over d in order either way. */
static void ROWS_DOT(const ROWS_ELEM *k, int64_t ldk, int64_t n, ROWS_SCALE_PARAM const float *q, int64_t d, float *s)
{
    const __mmask16 full = 0xffff, tail = lane_mask(d % 16);
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const ROWS_ELEM *k0 = k + j * ldk, *k4 = k0 + 4 * ldk;
        for (int r = 0; r < 8; r++) ROWS_PREFETCH(k0 + r * ldk, ldk, d);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
        int64_t c = 0;
#ifdef ROWS_KEYWISE
        ROWS_KEY_BLOCKS(__m512, _mm512_loadu_ps, 16, ROWS_DOT_KEY64);
#endif
        for (; c + 16 <= d; c += 16) {
            ROWS_DOT_SLICE4(k0, c, full, a0, a1, a2, a3);
            ROWS_DOT_SLICE4(k4, c, full, a4, a5, a6, a7); /* the compiler loads q's slice once */
        }
        if (c < d) {
            ROWS_DOT_SLICE4(k0, c, tail, a0, a1, a2, a3);
            ROWS_DOT_SLICE4(k4, c, tail, a4, a5, a6, a7);
        }
        _mm_storeu_ps(s + j, ROWS_SCALE4(reduce4(a0, a1, a2, a3), j));
        _mm_storeu_ps(s + j + 4, ROWS_SCALE4(reduce4(a4, a5, a6, a7), j + 4));
    }
    for (; j < n; j++) {
        __m512 a = _mm512_setzero_ps(), zero = a;
        for (int64_t c = 0; c < d; c += 16) {
            __mmask16 mk = c + 16 <= d ? full : tail;
            a = _mm512_fmadd_ps(ROWS_LOAD(mk, k + j * ldk + c), _mm512_maskz_loadu_ps(mk, q + c), a);
        }
        s[j] = ROWS_SCALE1(_mm_cvtss_f32(reduce4(a, zero, zero, zero)), j);
    }
}

/* o[c .. c + 63] += sum_j w_j v_j[c .. c + 63] for the lanes in masks
 * m0 .. m3 (ROWS_AXPY's variables), four FMA chains while the rows
 * stream by. */
#define ROWS_AXPY_BLOCK(m0, m1, m2, m3)                                                                \
    do {                                                                                               \
        __m512 o0 = _mm512_maskz_loadu_ps(m0, o + c), o1 = _mm512_maskz_loadu_ps(m1, o + c + 16);      \
        __m512 o2 = _mm512_maskz_loadu_ps(m2, o + c + 32), o3 = _mm512_maskz_loadu_ps(m3, o + c + 48); \
        for (int64_t j = 0; j < n; j++) {                                                              \
            const ROWS_ELEM *vj = v + j * ldv + c;                                                     \
            if (c == 0) ROWS_PREFETCH(vj, ldv, d);                                                     \
            __m512 pj = _mm512_set1_ps(ROWS_WEIGHT(p, j));                                             \
            o0 = _mm512_fmadd_ps(pj, ROWS_LOAD(m0, vj), o0);                                           \
            o1 = _mm512_fmadd_ps(pj, ROWS_LOAD(m1, vj + 16), o1);                                      \
            o2 = _mm512_fmadd_ps(pj, ROWS_LOAD(m2, vj + 32), o2);                                      \
            o3 = _mm512_fmadd_ps(pj, ROWS_LOAD(m3, vj + 48), o3);                                      \
        }                                                                                              \
        _mm512_mask_storeu_ps(o + c, m0, o0);                                                          \
        _mm512_mask_storeu_ps(o + c + 16, m1, o1);                                                     \
        _mm512_mask_storeu_ps(o + c + 32, m2, o2);                                                     \
        _mm512_mask_storeu_ps(o + c + 48, m3, o3);                                                     \
    } while (0)

/* Whole 64-column blocks with constant full masks, so the loads are plain
 * (and int8's fold into the widening); the last block masked.  Each
 * output is one chain over j in order either way. */
static void ROWS_AXPY(const float *p, ROWS_SCALE_PARAM const ROWS_ELEM *v, int64_t ldv, int64_t n, int64_t d, float *o)
{
    const __mmask16 full = 0xffff;
    int64_t c = 0;
    for (; c + 64 <= d; c += 64) ROWS_AXPY_BLOCK(full, full, full, full);
    if (c < d) ROWS_AXPY_BLOCK(lane_mask(d - c), lane_mask(d - c - 16), lane_mask(d - c - 32), lane_mask(d - c - 48));
}

#ifdef ROWS_DOT_MULTI
/* The two for up to four query rows at once.  Split-K takes every query
 * row of a kv head's group against a chunk of 256 keys, and a row at a
 * time it read the chunk's K and V from L2 again for each: the dots and
 * sums ran at L2's rate, not the FMAs'.  Here each key's and value's
 * slice is loaded (and widened, and prefetched) once for every row.  Each
 * key's chain over d and each output's over the keys are the one-row
 * kernels', a key's four-way reduction does not depend on its
 * neighbours', and scales apply as there, so every output has their
 * bits.  A row count is a constant in its body (few_rows.h): 4 keys x 4
 * rows of chains, the keys' slices and one of q take 21 of the 32
 * registers. */
#define ROWS_CAT2_(a, b)      a##b
#define ROWS_CAT_(a, b)       ROWS_CAT2_(a, b)
#define ROWS_MULTI_DOT_BODY   ROWS_CAT_(ROWS_DOT_MULTI, _body)
#define ROWS_MULTI_AXPY_BLOCK ROWS_CAT_(ROWS_AXPY_MULTI, _block)
#define ROWS_MULTI_AXPY_BODY  ROWS_CAT_(ROWS_AXPY_MULTI, _body)

#define ROWS_MULTI_DOT_ROW(r)                                  \
    do {                                                       \
        if ((r) < R) {                                         \
            __m512 qv_ = _mm512_maskz_loadu_ps(mk_, q##r + c); \
            a##r##0 = _mm512_fmadd_ps(k0v, qv_, a##r##0);      \
            a##r##1 = _mm512_fmadd_ps(k1v, qv_, a##r##1);      \
            a##r##2 = _mm512_fmadd_ps(k2v, qv_, a##r##2);      \
            a##r##3 = _mm512_fmadd_ps(k3v, qv_, a##r##3);      \
        }                                                      \
    } while (0)

/* Slice c (lanes in mk) of keys j .. j + 3 into every row's chains. */
#define ROWS_MULTI_DOT_SLICE(mk)                                                         \
    do {                                                                                 \
        const __mmask16 mk_ = (mk);                                                      \
        const ROWS_ELEM *kj_ = k + j * ldk + c;                                          \
        __m512 k0v = ROWS_LOAD(mk_, kj_), k1v = ROWS_LOAD(mk_, kj_ + ldk);               \
        __m512 k2v = ROWS_LOAD(mk_, kj_ + 2 * ldk), k3v = ROWS_LOAD(mk_, kj_ + 3 * ldk); \
        ROWS_MULTI_DOT_ROW(0);                                                           \
        ROWS_MULTI_DOT_ROW(1);                                                           \
        ROWS_MULTI_DOT_ROW(2);                                                           \
        ROWS_MULTI_DOT_ROW(3);                                                           \
    } while (0)

#define ROWS_MULTI_DOT_STORE(r)                                                                            \
    do {                                                                                                   \
        if ((r) < R) _mm_storeu_ps(s[r] + j, ROWS_SCALE4(reduce4(a##r##0, a##r##1, a##r##2, a##r##3), j)); \
    } while (0)

static inline __attribute__((always_inline)) void ROWS_MULTI_DOT_BODY(int R, const ROWS_ELEM *k, int64_t ldk, int64_t n,
                                                                      ROWS_SCALE_PARAM const float *const *q, int64_t d,
                                                                      float *const *s)
{
    const float *q0 = q[0], *q1 = q[1 < R ? 1 : 0], *q2 = q[2 < R ? 2 : 0], *q3 = q[3 < R ? 3 : 0];
    const __mmask16 full = 0xffff, tail = lane_mask(d % 16);
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        for (int t = 0; t < 4; t++) ROWS_PREFETCH(k + (j + t) * ldk, ldk, d);
        __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
        __m512 a20 = a00, a21 = a00, a22 = a00, a23 = a00, a30 = a00, a31 = a00, a32 = a00, a33 = a00;
        int64_t c = 0;
        for (; c + 16 <= d; c += 16) ROWS_MULTI_DOT_SLICE(full);
        if (c < d) ROWS_MULTI_DOT_SLICE(tail);
        ROWS_MULTI_DOT_STORE(0);
        ROWS_MULTI_DOT_STORE(1);
        ROWS_MULTI_DOT_STORE(2);
        ROWS_MULTI_DOT_STORE(3);
    }
    for (; j < n; j++) /* a lone key, as the one-row kernel reduces it */
        for (int r = 0; r < R; r++) {
            __m512 a = _mm512_setzero_ps(), zero = a;
            for (int64_t c = 0; c < d; c += 16) {
                __mmask16 mk = c + 16 <= d ? full : tail;
                a = _mm512_fmadd_ps(ROWS_LOAD(mk, k + j * ldk + c), _mm512_maskz_loadu_ps(mk, q[r] + c), a);
            }
            s[r][j] = ROWS_SCALE1(_mm_cvtss_f32(reduce4(a, zero, zero, zero)), j);
        }
}

static void ROWS_DOT_MULTI(const ROWS_ELEM *k, int64_t ldk, int64_t n, ROWS_SCALE_PARAM int rows, const float *const *q,
                           int64_t d, float *const *s)
{
    MHA_FEW_ROWS_CALL(rows, MHA_ROWS_AT_ONCE, ROWS_MULTI_DOT_BODY(M, k, ldk, n, ROWS_SCALE_ARG q, d, s));
}

#define ROWS_MULTI_AXPY_LOAD(r)                              \
    __m512 o##r##0 = _mm512_setzero_ps(), o##r##1 = o##r##0; \
    __m512 o##r##2 = o##r##0, o##r##3 = o##r##0;             \
    if ((r) < R) {                                           \
        o##r##0 = _mm512_maskz_loadu_ps(m0, o[r] + c);       \
        o##r##1 = _mm512_maskz_loadu_ps(m1, o[r] + c + 16);  \
        o##r##2 = _mm512_maskz_loadu_ps(m2, o[r] + c + 32);  \
        o##r##3 = _mm512_maskz_loadu_ps(m3, o[r] + c + 48);  \
    }

#define ROWS_MULTI_AXPY_ROW(r)                                 \
    do {                                                       \
        if ((r) < R) {                                         \
            __m512 pj_ = _mm512_set1_ps(ROWS_WEIGHT(p##r, j)); \
            o##r##0 = _mm512_fmadd_ps(pj_, v0, o##r##0);       \
            o##r##1 = _mm512_fmadd_ps(pj_, v1, o##r##1);       \
            o##r##2 = _mm512_fmadd_ps(pj_, v2, o##r##2);       \
            o##r##3 = _mm512_fmadd_ps(pj_, v3, o##r##3);       \
        }                                                      \
    } while (0)

#define ROWS_MULTI_AXPY_STORE(r)                               \
    do {                                                       \
        if ((r) < R) {                                         \
            _mm512_mask_storeu_ps(o[r] + c, m0, o##r##0);      \
            _mm512_mask_storeu_ps(o[r] + c + 16, m1, o##r##1); \
            _mm512_mask_storeu_ps(o[r] + c + 32, m2, o##r##2); \
            _mm512_mask_storeu_ps(o[r] + c + 48, m3, o##r##3); \
        }                                                      \
    } while (0)

/* Columns c .. c + 63 (lanes in m0 .. m3) of every row's output. */
static inline __attribute__((always_inline)) void
ROWS_MULTI_AXPY_BLOCK(int R, const float *const *p, ROWS_SCALE_PARAM const ROWS_ELEM *v, int64_t ldv, int64_t n,
                      int64_t d, int64_t c, __mmask16 m0, __mmask16 m1, __mmask16 m2, __mmask16 m3, float *const *o)
{
    (void)d; /* the prefetches' row length */
    const float *p0 = p[0], *p1 = p[1 < R ? 1 : 0], *p2 = p[2 < R ? 2 : 0], *p3 = p[3 < R ? 3 : 0];
    ROWS_MULTI_AXPY_LOAD(0)
    ROWS_MULTI_AXPY_LOAD(1)
    ROWS_MULTI_AXPY_LOAD(2)
    ROWS_MULTI_AXPY_LOAD(3)
    for (int64_t j = 0; j < n; j++) {
        const ROWS_ELEM *vj = v + j * ldv + c;
        if (c == 0) ROWS_PREFETCH(vj, ldv, d);
        __m512 v0 = ROWS_LOAD(m0, vj), v1 = ROWS_LOAD(m1, vj + 16), v2 = ROWS_LOAD(m2, vj + 32);
        __m512 v3 = ROWS_LOAD(m3, vj + 48);
        ROWS_MULTI_AXPY_ROW(0);
        ROWS_MULTI_AXPY_ROW(1);
        ROWS_MULTI_AXPY_ROW(2);
        ROWS_MULTI_AXPY_ROW(3);
    }
    ROWS_MULTI_AXPY_STORE(0);
    ROWS_MULTI_AXPY_STORE(1);
    ROWS_MULTI_AXPY_STORE(2);
    ROWS_MULTI_AXPY_STORE(3);
}

static inline __attribute__((always_inline)) void ROWS_MULTI_AXPY_BODY(int R, const float *const *p,
                                                                       ROWS_SCALE_PARAM const ROWS_ELEM *v, int64_t ldv,
                                                                       int64_t n, int64_t d, float *const *o)
{
    const __mmask16 full = 0xffff;
    int64_t c = 0;
    for (; c + 64 <= d; c += 64) ROWS_MULTI_AXPY_BLOCK(R, p, ROWS_SCALE_ARG v, ldv, n, d, c, full, full, full, full, o);
    if (c < d)
        ROWS_MULTI_AXPY_BLOCK(R, p, ROWS_SCALE_ARG v, ldv, n, d, c, lane_mask(d - c), lane_mask(d - c - 16),
                              lane_mask(d - c - 32), lane_mask(d - c - 48), o);
}

static void ROWS_AXPY_MULTI(int rows, const float *const *p, ROWS_SCALE_PARAM const ROWS_ELEM *v, int64_t ldv,
                            int64_t n, int64_t d, float *const *o)
{
    MHA_FEW_ROWS_CALL(rows, MHA_ROWS_AT_ONCE, ROWS_MULTI_AXPY_BODY(M, p, ROWS_SCALE_ARG v, ldv, n, d, o));
}

#undef ROWS_CAT2_
#undef ROWS_CAT_
#undef ROWS_MULTI_DOT_BODY
#undef ROWS_MULTI_AXPY_BLOCK
#undef ROWS_MULTI_AXPY_BODY
#undef ROWS_MULTI_DOT_ROW
#undef ROWS_MULTI_DOT_SLICE
#undef ROWS_MULTI_DOT_STORE
#undef ROWS_MULTI_AXPY_LOAD
#undef ROWS_MULTI_AXPY_ROW
#undef ROWS_MULTI_AXPY_STORE
#endif /* ROWS_DOT_MULTI */

#undef ROWS_DOT_SLICE4
#undef ROWS_DOT_KEY64
#undef ROWS_AXPY_BLOCK
#include "kernels/rows_undef.h"
