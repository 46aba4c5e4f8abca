/*
 * parallel.h -- the execution context: thread count, scratch buffers and a
 * fork-join loop over independent work items.
 *
 * Work items are split into contiguous chunks, one per thread, and every
 * item is computed the same way whichever thread runs it, so results do
 * not depend on the thread count.
 */
#ifndef MHA_PARALLEL_H
#define MHA_PARALLEL_H

#include "core/internal.h"

/* Scratch buffers a context keeps between calls; each grows on demand at
 * call setup, never inside a compute loop. */
typedef enum mha__scratch_slot {
    MHA_SCRATCH_THREADS = 0, /* per-thread rows of the attention kernels */
    MHA_SCRATCH_LAYER,       /* projections of the layer */
    MHA_SCRATCH_BF16,        /* a GEMM's input rounded to bfloat16 */
    MHA_SCRATCH_ROWS,        /* per-row statistics of the backward pass */
    MHA_SCRATCH_GRAD,        /* the layer backward's dO and staging */
    MHA_SCRATCH_ROPE,        /* the rotary table of one call */
    MHA_SCRATCH_DECODE,      /* split-K partial results of a decode step */
    MHA_SCRATCH_PACK,        /* mha_linear's weight, packed for the call */
    MHA_SCRATCH_COUNT
} mha__scratch_slot;

/* A buffer of at least `bytes` in `slot`, 64-byte aligned, or NULL (with
 * mha_last_error set).  Valid until the next call for the same slot. */
void *mha__ctx_scratch(mha_ctx *ctx, mha__scratch_slot slot, int64_t bytes);

/* Calls fn(arg, thread, begin, end) on contiguous chunks covering
 * [0, n_items), one chunk per thread (fewer when there are fewer items);
 * thread numbers are 0 .. n-1 and index per-thread scratch.  Returns when
 * all chunks are done. */
typedef void (*mha__range_fn)(void *arg, int thread, int64_t begin, int64_t end);
void mha__parallel_for(mha_ctx *ctx, int64_t n_items, mha__range_fn fn, void *arg);

/* Bytes of per-thread scratch rounded up so threads never share a line. */
int64_t mha__pad_to_line(int64_t bytes);

/* Per-thread scratch of `floats` floats for every thread of ctx, each
 * slice 64-byte aligned, *stride bytes apart; NULL on failure. */
char *mha__thread_scratch(mha_ctx *ctx, int64_t floats, int64_t *stride);

#endif /* MHA_PARALLEL_H */
