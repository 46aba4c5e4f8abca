/*
 * gemm.h -- the projections' matrix product: y = x W^T + b with W packed
 * once (when the weight is set) into panels the micro-kernel streams.
 */
#ifndef MHA_GEMM_H
#define MHA_GEMM_H

#include "core/internal.h"
#include "kernels/kernels.h"
#include "core/parallel.h"

/* The B operand of y = x W^T for W [out, in]: ceil(out / nr) panels of nr
 * output columns, panel p at data + p * panel_stride, its row c (input c)
 * at + c * ldb.  A pack (mha__pack) stores each panel contiguous (W^T,
 * zero-padded to a whole panel: ldb = nr); a view (mha__transposed_view)
 * reads a plain matrix in place. */
typedef struct mha__packed {
    float *data;
    int64_t out, in, nr;
    int64_t ldb, panel_stride;
} mha__packed;

/* Packs w [out, in] (NULL: zeros) on ctx's threads (NULL: the caller's
 * alone); replaces any earlier contents of p, in place when the size is
 * unchanged.  On failure p is unchanged.  NOMEM. */
mha_status mha__pack(mha_ctx *ctx, mha__packed *p, const mha__kernels *kt, const float *w, int64_t out, int64_t in);
/* The same into the workspace, for a weight used once: the bytes to plan
 * for (false, INVALID_ARG, when they overflow), and the take.  INTERNAL
 * when the plan did not reserve them. */
bool mha__pack_workspace(const mha__kernels *kt, int64_t out, int64_t in, int64_t *bytes);
mha_status mha__pack_workspace_take(mha_ctx *ctx, const mha__kernels *kt, const float *w, int64_t out, int64_t in,
                                    mha__packed *p);
/* w [rows, cols] row-major packed into the workspace as the B operand of
 * y = x w: mha__linear with it computes dX = dY W in the backward pass.
 * The bytes to plan for, and the take (INTERNAL when not reserved). */
bool mha__pack_transposed_workspace(const mha__kernels *kt, int64_t rows, int64_t cols, int64_t *bytes);
mha_status mha__pack_transposed_workspace_take(mha_ctx *ctx, const mha__kernels *kt, const float *w, int64_t rows,
                                               int64_t cols, mha__packed *p);
/* The same panels in p's own memory, refilled in place when the size is
 * unchanged (a training layer keeps them: mha__weight_transposed).
 * NOMEM. */
mha_status mha__pack_transposed(mha_ctx *ctx, mha__packed *p, const mha__kernels *kt, const float *w, int64_t rows,
                                int64_t cols);
/* The plain [out, in] matrix back from its pack (exact). */
void mha__unpack(const mha__packed *p, float *w);
void mha__packed_free(mha__packed *p);

/* A matrix seen through strides, its columns optionally split into groups
 * of group_cols (0: one group) that lie group_stride floats apart:
 * element (r, c) is at data + (c / group_cols) * group_stride + r * rs +
 * (c % group_cols) * cs.  Row-major [rows][cols] is {data, cols, 1, 0, 0};
 * head-major [H][rows][d] is {data, d, 1, d, rows * d}. */
typedef struct mha__mat {
    float *data;
    int64_t rs, cs;
    int64_t group_cols, group_stride;
} mha__mat;

/* Element (r, c) of a grouped matrix. */
static inline float *mha__mat_at(const mha__mat *a, int64_t r, int64_t c)
{
    int64_t g = a->group_cols ? c / a->group_cols : 0, cc = a->group_cols ? c % a->group_cols : c;
    return a->data + g * a->group_stride + r * a->rs + cc * a->cs;
}

/* How many of the m columns from c on lie in c's column group. */
static inline int64_t mha__group_run(const mha__mat *a, int64_t c, int64_t m)
{
    if (!a->group_cols) return m;
    int64_t left = a->group_cols - c % a->group_cols;
    return m < left ? m : left;
}

/* y's rows r0 .. r1-1, columns c0 .. c1-1 (y.cs = 1) set to b[c0 .. c1-1],
 * or to 0 when b is NULL: one copy per row and column group. */
void mha__fill_rows(const mha__mat *y, const float *b, int64_t r0, int64_t r1, int64_t c0, int64_t c1);

/* y[r, :] = x[r, :] W^T + b for r < rows; b may be NULL.  y must have
 * cs = 1 and, if grouped, groups that are a multiple of the kernels' nr
 * wide (so no panel straddles two groups).  Each output is the bias plus
 * one FMA chain per pass over the inputs (all of them, or a few of x's
 * column groups: gemm.c), passes in order, whatever the thread count. */
void mha__linear(mha_ctx *ctx, const mha__kernels *kt, int64_t rows, const mha__mat *x, const mha__packed *w,
                 const float *b, const mha__mat *y);

/* y[r, :] += x[r, :] W^T, the same way (y's existing values start each
 * output's chain). */
void mha__linear_add(mha_ctx *ctx, const mha__kernels *kt, int64_t rows, const mha__mat *x, const mha__packed *w,
                     const mha__mat *y);

/* Rows of x and y given one by one (the rows where the attention refines
 * scores, wherever they lie): row r of x at x + x_at[r], its columns x_cs
 * apart; row r's output o at mha__mat_at(&y, 0, o) + y_at[r]. */
typedef struct mha__exact_rows {
    const float *x;
    int64_t x_cs;
    const int64_t *x_at;
    mha__mat y;
    const int64_t *y_at;
    int64_t count;
} mha__exact_rows;

/* Output o0 <= o < o1 of each listed row: y = x W^T[:, o] + b[o], the
 * exact sum rounded once (summed in float64: exact.c), where mha__linear
 * rounds every multiply-add; the same bits in every kernel set.  w
 * packed for kt; y with cs = 1; b may be NULL.  The workspace to plan
 * for up to `outputs` = o1 - o0 (false, INVALID_ARG, when it overflows),
 * and the call (INTERNAL if it was not planned). */
bool mha__linear_exact_workspace(const mha_ctx *ctx, const mha__packed *w, int64_t outputs, int64_t *bytes);
mha_status mha__linear_exact(mha_ctx *ctx, const mha__kernels *kt, const mha__exact_rows *rows, const mha__packed *w,
                             int64_t o0, int64_t o1, const float *b);

/* N matrices: matrix n is m with data moved by n * batch_stride. */
typedef struct mha__batched {
    mha__mat m;
    int64_t batch_stride;
} mha__batched;

/* Do the batches' rows (T a batch) follow one another, in every column
 * group?  Then N batches are one matrix of N T rows. */
static inline bool mha__batch_rows_follow(int64_t T, const mha__batched *b) { return b->batch_stride == T * b->m.rs; }

/* dW [out, in] row-major += sum over n < N, r < T of dy_n(r, o) x_n(r, i):
 * a weight's gradient.  Each element gets one chain of multiply-adds per
 * chunk of rows, added to it in order, whatever the thread count.  With
 * `overwrite` dW's contents are not read: each block of it is zeroed just
 * before the first chunk adds to it, while it is in cache (the same bits
 * as zeroing dW first, without a pass over it through memory).  Packs
 * the chunks in the workspace: the bytes to plan for (false, INVALID_ARG,
 * when they overflow); INTERNAL when they were not reserved. */
bool mha__weight_grad_workspace(const mha__kernels *kt, int64_t out, int64_t in, int64_t *bytes);
mha_status mha__weight_grad(mha_ctx *ctx, const mha__kernels *kt, int64_t N, int64_t T, const mha__batched *dy,
                            const mha__batched *x, int64_t out, int64_t in, float *dw, bool overwrite);

/* sums[c] += sum over n < N, r < T of y_n(r, c), in that order. */
void mha__column_sums(mha_ctx *ctx, const mha__kernels *kt, int64_t N, int64_t T, const mha__batched *y, int64_t cols,
                      float *sums);

/* The same for bfloat16 weights: W [out, in] rounded to bf16, in panels of
 * MHA_BF16_NR columns, the input dimension padded to even with zeros and
 * stored in pairs: element (c, j) of panel p at
 * data + p * in_even * MHA_BF16_NR + (c / 2) * 2 * MHA_BF16_NR + 2 * j + c % 2. */
typedef struct mha__packed_bf16 {
    uint16_t *data;
    int64_t out, in, in_even;
} mha__packed_bf16;

mha_status mha__pack_bf16(mha__packed_bf16 *p, const float *w, int64_t out, int64_t in);
void mha__packed_bf16_free(mha__packed_bf16 *p);

/* y = x W^T + b with x rounded to bf16 (once, into the workspace: plan
 * for it with mha__linear_bf16_workspace, rows of `in` inputs) and every
 * product accumulated in float32 by bk's tile.  INTERNAL if unplanned. */
bool mha__linear_bf16_workspace(int64_t rows, int64_t in, int64_t *bytes);
mha_status mha__linear_bf16(mha_ctx *ctx, const mha__bf16_kernels *bk, int64_t rows, const mha__mat *x,
                            const mha__packed_bf16 *w, const float *b, const mha__mat *y);

/* W [out, in] split for the float32 split products (split.c, kernels.h):
 * column tile t (outputs 16 t .. 16 t + 15) at data + t * 3 * ceil(in /
 * 32) * MHA_SPLIT_TILE, zero-padded to whole 32-column panels and blocks
 * of k.  data is NULL when W has a value that is not finite. */
typedef struct mha__packed_split {
    uint16_t *data;
    int64_t out, in;
} mha__packed_split;

/* Splits w (NULL: zeros) with bk's split_rows_tile on ctx's threads (NULL: the
 * caller's alone), in place when the size is unchanged.  NOMEM, or
 * INVALID_ARG when the size overflows. */
mha_status mha__pack_split(mha_ctx *ctx, mha__packed_split *p, const mha__bf16_kernels *bk, const float *w, int64_t out,
                           int64_t in);
void mha__packed_split_free(mha__packed_split *p);

/* Whether k's float32 projections can run on split products: its bf16
 * table has them and its float32 panels are as wide as theirs (so a
 * head-major layout that suits one suits the other). */
bool mha__split_products(const mha__isa_kernels *k);

/* w [rows, cols] row-major split into p's own memory (refilled in place
 * when the size is unchanged) as the B operand of y = x w (dX = dY W in
 * the backward pass); p->data NULL when w has a value that is not
 * finite.  NOMEM, INVALID_ARG (too large). */
mha_status mha__pack_split_transposed(mha_ctx *ctx, mha__packed_split *p, const mha__bf16_kernels *bk, const float *w,
                                      int64_t rows, int64_t cols);

/* y = x W^T + b, or y += x W^T with `add`, by split products, x split a
 * chunk of rows at a time into the workspace (mha__linear_split_shared
 * below, for one output or more): the bytes to plan for.  A chunk with a
 * value that is not finite runs on the FMA GEMM with W's float32 panels,
 * so infinities and NaN propagate as IEEE products do; so do fewer than
 * 16 rows (a decoding step's), where the tiles' padding to 32 rows costs
 * more than they gain. */
bool mha__linear_split_workspace(int64_t rows, int64_t in, int64_t *bytes);

enum { MHA_SPLIT_OUTPUTS = 3 }; /* the most products of one input a call runs */

/* W's float32 panels packed from w [rows, cols] (row-major, W^T: the
 * backward's dX = dY W) into the workspace only when a chunk first needs
 * the FMA GEMM: the split products never read them otherwise.  The plan
 * reserves mha__pack_transposed_workspace beside the product's; `packed`
 * lives until the product returns. */
typedef struct mha__fma_on_demand {
    const mha__kernels *kt;
    const float *w;
    int64_t rows, cols;
    mha__packed packed; /* data NULL until packed */
} mha__fma_on_demand;

/* One output: W split, and W's float32 panels for the chunks the FMA GEMM
 * takes: fma; or when NULL, those `panels` hands out for `panels_of` (a
 * weight's own, packed at their first need: mha__weight_f32); or else
 * on_demand's. */
typedef struct mha__split_output {
    const mha__packed_split *w;
    const mha__packed *fma;
    const float *b;
    const mha__mat *y;
    mha__fma_on_demand *on_demand;
    mha_status (*panels)(mha_ctx *ctx, const void *panels_of, const mha__packed **fma);
    const void *panels_of;
} mha__split_output;

/* mha__linear_split for up to MHA_SPLIT_OUTPUTS products of one x
 * (self-attention's Q, K and V), whose weights all have x's `in` columns:
 * x is split once a chunk for all of them, and their items share the
 * threads.  The workspace is mha__linear_split_workspace's. */
mha_status mha__linear_split_shared(mha_ctx *ctx, const mha__isa_kernels *k, int64_t rows, const mha__mat *x, int count,
                                    const mha__split_output *outs, bool add);

/* mha__weight_grad by k's split products: dY^T and X split a chunk of
 * 256 rows at a time into the workspace, each dW element one chain a
 * chunk, chunks in order, whatever the thread count.  A chunk with a
 * value that is not finite, fewer than 16 rows in all, or operands whose
 * columns do not come 16 side by side, go through mha__weight_grad, whose
 * workspace the plan adds to this one's (false, INVALID_ARG, when the
 * bytes overflow).  INTERNAL when not reserved. */
bool mha__weight_grad_split_workspace(int64_t out, int64_t in, int64_t *bytes);
mha_status mha__weight_grad_split(mha_ctx *ctx, const mha__isa_kernels *k, int64_t N, int64_t T, const mha__batched *dy,
                                  const mha__batched *x, int64_t out, int64_t in, float *dw, bool overwrite);
/* The same for up to MHA_SPLIT_OUTPUTS weights of one input x
 * (self-attention's W_q, W_k, W_v): dW_o += dY_o^T X, X split once a
 * chunk for all of them and their panels on the threads together; each
 * dW_o the same bits as its own call.  The workspace is the sum of their
 * dY^T tiles and X's once (mha__weight_grads_split_workspace). */
typedef struct mha__grad_output {
    const mha__batched *dy;
    int64_t out;
    float *dw;
    bool overwrite; /* as mha__weight_grad's */
} mha__grad_output;
bool mha__weight_grads_split_workspace(int count, const mha__grad_output *outs, int64_t in, int64_t *bytes);
mha_status mha__weight_grads_split(mha_ctx *ctx, const mha__isa_kernels *k, int64_t N, int64_t T, int count,
                                   const mha__grad_output *outs, const mha__batched *x, int64_t in);

/* A weight packed for the GEMM in the dtype it computes in (weight.c):
 * the one type a layer keeps per matrix.  Zero-initialised: empty. */
typedef struct mha__weight {
    const mha__isa_kernels *kernels; /* the kernels it was packed for */
    bool bf16;
    mha__packed f32;         /* float32 panels, and where the ISA has split products, */
    mha__packed_split split; /* its three bf16 parts; or */
    mha__packed_bf16 b16;    /* bf16 pairs */
    const float *pending;    /* new values the packs wait for (mha__weight_defer), or NULL */
    const float *f32_behind; /* the values f32 waits for once split is up to date, or NULL */
    /* W^T as a training layer's backward reads it for dX = dY W: split
     * (split_t), or where split products do not apply or a value does not
     * split, float32 panels (f32_t); made by mha__weight_transposed and
     * kept while the values stay (transposed_fresh). */
    mha__packed_split split_t;
    mha__packed f32_t;
    bool transposed_fresh;
} mha__weight;

/* Packs src [out, in] (NULL: zeros) for k's kernels in dtype (F32 or
 * BF16) on ctx's threads (NULL: the caller's alone), in place when the
 * size is unchanged; nothing is pending after.  NOMEM. */
mha_status mha__weight_pack(mha_ctx *ctx, mha__weight *w, const mha__isa_kernels *k, mha_dtype dtype, const float *src,
                            int64_t out, int64_t in);
/* Marks a packed float32 weight's packs as behind src (its shape, read
 * when the packs are brought up to date: src must live until then), and
 * mha__weight_refresh brings them up to date on a context's threads.  A
 * training layer's optimizer changes every weight every step; packing
 * them where the change is announced took the caller's thread alone,
 * about a tenth of a step at E = 768 (docs/PERFORMANCE.md). */
void mha__weight_defer(mha__weight *w, const float *src);
/* Where the ISA has split products the refresh makes only the split: the
 * float32 panels serve just the rare chunks the FMA GEMM takes (fewer
 * than 16 rows, a value that is not finite) and the exact sums of wide
 * rows, so they follow when a call first asks for them (mha__weight_f32).
 * Packing them at every refresh was a third of a training step's repack
 * at E = 768, for panels most steps never read (docs/PERFORMANCE.md). */
mha_status mha__weight_refresh(mha_ctx *ctx, mha__weight *w);
/* Brings w's transposed packs up to date with plain (its training copy,
 * [out, in]) on ctx's threads, if the values changed since they were
 * made: the backward packed W^T every call, 3% of a training step at S2
 * where the weights had not changed (docs/PERFORMANCE.md).  NOMEM. */
mha_status mha__weight_transposed(mha_ctx *ctx, mha__weight *w, const float *plain);
/* w's float32 panels, packed first on ctx's threads if a refresh left
 * them behind.  w may be passed const: the panels are a cache of the
 * plain copy (as for mha__layer_refresh).  NOMEM. */
mha_status mha__weight_f32(mha_ctx *ctx, const mha__weight *w, const mha__packed **panels);
void mha__weight_free(mha__weight *w);
/* The output columns of one panel: a head-major activation layout must
 * be a multiple of it wide. */
int64_t mha__weight_panel(const mha__weight *w);
/* y = x W^T + b over rows rows, and the workspace it takes (bf16: the
 * rounded input of `in` columns). */
mha_status mha__weight_linear(mha_ctx *ctx, const mha__weight *w, int64_t rows, const mha__mat *x, const float *b,
                              const mha__mat *y);
/* A pending weight is planned for as if its new values split (they may
 * where the old ones did not). */
bool mha__weight_linear_workspace(const mha__weight *w, int64_t rows, int64_t in, int64_t *bytes);
/* y[i] = x W[i]^T + b[i] for `count` weights of one input (self-attention's
 * Q, K and V), in their order: x split once for all of them where each has
 * split products (the workspace then is any one's), else one product each. */
mha_status mha__weights_linear_shared(mha_ctx *ctx, int count, const mha__weight *const *w, int64_t rows,
                                      const mha__mat *x, const float *const *b, const mha__mat *const *y);
/* The plain [out, in] matrix back (float32 weights only: UNSUPPORTED). */
mha_status mha__weight_unpack(const mha__weight *w, float *dst);

#endif /* MHA_GEMM_H */
