/*
 * rows_prefetch.h -- ROWS_PREFETCH(x, ld, n) for the decoding row
 * templates (rows_avx2.h, rows_avx512.h), included by each template at
 * every instance, since instances differ: with ROWS_PREFETCH_KEYS defined,
 * it brings every cache line of the n elements (of ROWS_ELEM) of the row
 * ROWS_PREFETCH_KEYS rows of ld elements past x into L1; without, it is
 * nothing.  A prefetch past the cache's end is harmless (prefetches never
 * fault); the address is formed as an integer so that no pointer runs
 * past its array.
 */
#undef ROWS_PREFETCH
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
