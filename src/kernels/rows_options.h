/*
 * rows_options.h -- the optional features of the decoding row
 * templates (rows_avx2.h, rows_avx512.h), written once and included by
 * each template at every instance, since instances differ:
 *
 *   ROWS_SCALED: rows carry a float scale each, as the int8 kernels'
 *   contract has it.  ROWS_SCALE_PARAM / ROWS_SCALE_ARG add `scale` to a
 *   function's parameters / a call's arguments; ROWS_SCALE4(r, j) scales
 *   the four scores r of keys j .., ROWS_SCALE1(x, j) the score of key j,
 *   ROWS_WEIGHT(p, j) is key j's weight in the values' sum.  Without it
 *   they are the unscaled forms.
 *
 *   ROWS_PREFETCH_KEYS: ROWS_PREFETCH(x, ld, n) brings every cache line of
 *   the n elements (of ROWS_ELEM) of the row ROWS_PREFETCH_KEYS rows of ld
 *   elements past x into L1; without it, nothing.  A prefetch past the
 *   cache's end is harmless (prefetches never fault); the address is
 *   formed as an integer so that no pointer runs past its array.
 *
 *   ROWS_KEYWISE: the dot reads blocks of columns key by key, each row's
 *   lines in address order (rows_avx512.h says when that pays).
 *   ROWS_KEY_BLOCKS(VEC, LOADU, W, KEY) is that loop, for vectors VEC of
 *   W floats loaded by LOADU: while four vectors of columns remain from
 *   c, q's four slices go to registers q0 .. q3 and the template's
 *   per-key step KEY(a, kr, c) runs over the eight keys in order, chains
 *   a0 .. a7, rows k0 .. k0 + 3 ldk and k4 .. k4 + 3 ldk (ROWS_DOT's
 *   names).
 *
 * The templates #undef all of these at their end.
 */
#ifdef ROWS_SCALED
#define ROWS_SCALE_PARAM  const float *scale,
#define ROWS_SCALE_ARG    scale,
#define ROWS_SCALE4(r, j) _mm_mul_ps((r), _mm_loadu_ps(scale + (j)))
#define ROWS_SCALE1(x, j) ((x)*scale[j])
#define ROWS_WEIGHT(p, j) ((p)[j] * scale[j])
#else
#define ROWS_SCALE_PARAM
#define ROWS_SCALE_ARG
#define ROWS_SCALE4(r, j) (r)
#define ROWS_SCALE1(x, j) (x)
#define ROWS_WEIGHT(p, j) ((p)[j])
#endif

#ifdef ROWS_PREFETCH_KEYS
#define ROWS_PREFETCH(x, ld, n)                                                                      \
    do {                                                                                             \
        uintptr_t at_ = (uintptr_t)(x) + (uintptr_t)(ROWS_PREFETCH_KEYS * (ld)) * sizeof(ROWS_ELEM); \
        for (int64_t b_ = 0; b_ < (n) * (int64_t)sizeof(ROWS_ELEM); b_ += 64)                        \
            _mm_prefetch((const char *)(at_ + (uintptr_t)b_), _MM_HINT_T0);                          \
    } while (0)
#else
#define ROWS_PREFETCH(x, ld, n) ((void)0)
#endif

#define ROWS_KEY_BLOCKS(VEC, LOADU, W, KEY)                           \
    for (; c + 4 * (W) <= d; c += 4 * (W)) {                          \
        VEC q0 = LOADU(q + c), q1 = LOADU(q + c + (W));               \
        VEC q2 = LOADU(q + c + 2 * (W)), q3 = LOADU(q + c + 3 * (W)); \
        KEY(a0, k0, c);                                               \
        KEY(a1, k0 + ldk, c);                                         \
        KEY(a2, k0 + 2 * ldk, c);                                     \
        KEY(a3, k0 + 3 * ldk, c);                                     \
        KEY(a4, k4, c);                                               \
        KEY(a5, k4 + ldk, c);                                         \
        KEY(a6, k4 + 2 * ldk, c);                                     \
        KEY(a7, k4 + 3 * ldk, c);                                     \
    }
