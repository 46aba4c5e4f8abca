/*
 * gemm.h -- the projections' matrix product: y = x W^T + b with W packed
 * once (when the weight is set) into panels the micro-kernel streams.
 */
#ifndef MHA_GEMM_H
#define MHA_GEMM_H

#include "internal.h"
#include "kernels/kernels.h"
#include "parallel.h"

/* W [out, in] row-major, stored as ceil(out / nr) panels of in x nr floats
 * (W^T, zero-padded to a whole panel), nr from the kernel table it was
 * packed for. */
typedef struct mha__packed {
    float  *data;
    int64_t out, in, nr;
} mha__packed;

/* Packs w [out, in] (NULL: zeros); replaces any earlier contents of p.
 * On failure p is unchanged.  NOMEM. */
mha_status mha__pack(mha__packed *p, const mha__kernels *kt, const float *w, int64_t out, int64_t in);
void       mha__packed_free(mha__packed *p);

/* y[r, :] = x[r, :] W^T + b for r < rows, with x[r, c] at x[r * x_rs + c * x_cs]
 * and y[r, j] at y[r * ldy + j]; b may be NULL.  Each output is one FMA
 * chain over the inputs in order (bias first), whatever the thread count. */
void mha__linear(mha_ctx *ctx, const mha__kernels *kt, int64_t rows, const float *x, int64_t x_rs, int64_t x_cs,
                 const mha__packed *w, const float *b, float *y, int64_t ldy);

#endif /* MHA_GEMM_H */
