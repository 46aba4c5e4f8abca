/*
 * few_rows.h -- a tile of fewer rows than a micro-kernel's MR as a body of
 * its own, one per row count, for the FMA and bf16 micro-kernels (avx2.c,
 * avx512.c, avx512_bf16.c), and the same for the decoding kernels' query
 * rows at once (rows_avx512.h).
 *
 * A micro-kernel's general body computes the FMAs of all its MR rows and
 * stores only the m that exist.  The projections of a decoding step are
 * tiles of a row a sequence, and there that waste set the pace: on Zen 4
 * a row's projections at E = 768 took 0.27 ms with AVX-512's twelve-row
 * body, 0.063 ms with a body of one row, bound by the rate at which L3
 * gives the weights; eight sequences decoding together ran eight-row
 * tiles at two thirds of the FMA rate (docs/PERFORMANCE.md).
 * MHA_FEW_ROWS_CALL(m, mr, call) runs `call` with M an integer constant
 * equal to m, for 1 <= m <= mr <= 12 (the row counts past mr compile to
 * nothing), so the compiler drops the missing rows' FMAs; each row's sums
 * are the general body's, to the bit.  The bodies still read A through
 * pointers clamped to the last valid row: a missing row's loads are dead
 * code, but only an optimising compiler removes them.
 */
#ifndef MHA_KERNELS_FEW_ROWS_H
#define MHA_KERNELS_FEW_ROWS_H

#define MHA_ROWS_CASE_(count, mr, call) \
    case count:                         \
        if ((count) <= (mr)) {          \
            enum { M = count };         \
            call;                       \
        }                               \
        break

#define MHA_FEW_ROWS_CALL(m, mr, call)     \
    do {                                   \
        switch (m) {                       \
            MHA_ROWS_CASE_(1, mr, call);   \
            MHA_ROWS_CASE_(2, mr, call);   \
            MHA_ROWS_CASE_(3, mr, call);   \
            MHA_ROWS_CASE_(4, mr, call);   \
            MHA_ROWS_CASE_(5, mr, call);   \
            MHA_ROWS_CASE_(6, mr, call);   \
            MHA_ROWS_CASE_(7, mr, call);   \
            MHA_ROWS_CASE_(8, mr, call);   \
            MHA_ROWS_CASE_(9, mr, call);   \
            MHA_ROWS_CASE_(10, mr, call);  \
            MHA_ROWS_CASE_(11, mr, call);  \
            MHA_ROWS_CASE_(12, mr, call);  \
        default: break; /* m is 1 .. mr */ \
        }                                  \
    } while (0)

#endif /* MHA_KERNELS_FEW_ROWS_H */
