/*
 * few_rows.h -- a tile of one to MHA_FEW_ROWS rows as a body of its own,
 * for the FMA micro-kernels (avx2.c, avx512.c).
 *
 * A micro-kernel's general body computes the FMAs of all its MR rows and
 * stores only the m that exist.  The projections of a decoding step are
 * tiles of a row or a few (one a sequence), and there that waste set the
 * pace: on Zen 4 a row's projections at E = 768 took 0.27 ms with
 * AVX-512's twelve-row body, 0.063 ms with a body of one row, now bound
 * by the rate at which L3 gives the weights (docs/PERFORMANCE.md).
 * MHA_FEW_ROWS_CALL(m, call) runs `call` with M an integer constant equal
 * to m, so the compiler drops the missing rows' FMAs; each row's sums are
 * the general body's, to the bit.
 */
#ifndef MHA_KERNELS_FEW_ROWS_H
#define MHA_KERNELS_FEW_ROWS_H

enum { MHA_FEW_ROWS = 4 };

#define MHA_FEW_ROWS_CALL(m, call) \
    do {                           \
        if ((m) == 1) {            \
            enum { M = 1 };        \
            call;                  \
        } else if ((m) == 2) {     \
            enum { M = 2 };        \
            call;                  \
        } else if ((m) == 3) {     \
            enum { M = 3 };        \
            call;                  \
        } else {                   \
            enum { M = 4 };        \
            call;                  \
        }                          \
    } while (0)

#endif /* MHA_KERNELS_FEW_ROWS_H */
