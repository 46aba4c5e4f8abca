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
 *   ROWS_PREFETCHED: ROWS_PREFETCH(x, ld, n) brings every cache line of
 *   the n elements (of ROWS_ELEM) of a row of ld elements at x in two
 *   steps: the row ROWS_L2_KEYS ahead into L2, the row ROWS_L1_KEYS ahead
 *   on to L1; without it, nothing.  A prefetch past the cache's end is
 *   harmless (prefetches never fault); the address is formed as an
 *   integer so that no pointer runs past its array.
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
 * The templates undefine all of these at their end (rows_undef.h).
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

#ifdef ROWS_PREFETCHED
/* Why two distances.  Prefetches into L1 each hold one of the core's few
 * L1 miss buffers (a dozen or two) for a whole trip to memory, so
 * a single L1 distance long enough to hide that trip stalls on them; L2
 * tracks many more misses.  So the far prefetch, which hides memory's
 * latency, goes to L2, and the near one only has L2's to hide.  int8
 * rows, E=512, h=8, 2 threads, 1048576 cached keys (1.1 GB, beyond the
 * 480 MB L3), Sapphire Rapids, 3 alternating rounds, K/V read over the
 * copy bandwidth timed in the same calls: L1 alone 16/32/48/64/128/256
 * keys ahead 0.83/0.88-0.90/0.90/0.84-0.86/0.83/0.79, L2 alone 32/64/256
 * 0.83/0.88/0.88, no prefetch 0.66; L1 32 with L2 128/160/256/512
 * 0.935/0.945-0.976/0.935/0.945 (docs/PERFORMANCE.md). */
#define ROWS_L1_KEYS 32
#define ROWS_L2_KEYS 256
#define ROWS_PREFETCH(x, ld, n)                                                                \
    do {                                                                                       \
        uintptr_t l1_ = (uintptr_t)(x) + (uintptr_t)(ROWS_L1_KEYS * (ld)) * sizeof(ROWS_ELEM); \
        uintptr_t l2_ = (uintptr_t)(x) + (uintptr_t)(ROWS_L2_KEYS * (ld)) * sizeof(ROWS_ELEM); \
        for (int64_t b_ = 0; b_ < (n) * (int64_t)sizeof(ROWS_ELEM); b_ += 64) {                \
            _mm_prefetch((const char *)(l2_ + (uintptr_t)b_), _MM_HINT_T1);                    \
            _mm_prefetch((const char *)(l1_ + (uintptr_t)b_), _MM_HINT_T0);                    \
        }                                                                                      \
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
