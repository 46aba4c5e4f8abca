/*
 * exact.c -- y = x W^T + b for some of W's outputs, each summed in
 * float64 and rounded to float32 once.
 *
 * The layer's Q and K projections where its logits are large
 * (layer/pipeline.c): a float32 chain over E inputs errs by about an ulp
 * of its terms' partial sums, and the softmax multiplies that error by
 * the size of the keys it meets.  A product of two floats is exact in
 * float64 and E of them sum there with an error near 2^-53 E of their
 * sizes, so the result is the exact one rounded (but in rare ties of that
 * tiny error): more accurate than any float32 implementation, and the
 * same bits in every kernel set and for any thread count (each output is
 * one sum over the inputs in their order, whoever computes it: the
 * kernels' gemm_tile_exact, four rows at a time).
 */
#include "gemm/gemm.h"

/* Rows an item takes: every panel of the range passes over them (its
 * rows of W stay in L2 while they do). */
enum { EXACT_ROWS = 64 };

typedef struct exact_job {
    const mha__kernels *kt;
    mha__exact_rows rows;
    const mha__packed *w;
    const float *b;
    int64_t o0, o1;
} exact_job;

/* The item's rows [r0, r1) of the list, outputs o .. o + n - 1: in one
 * panel of W and one column group of y. */
static void exact_columns(const exact_job *j, int64_t r0, int64_t r1, int64_t o, int64_t n)
{
    const mha__exact_rows *rows = &j->rows;
    const mha__packed *w = j->w;
    const float *panel = w->data + (o / w->nr) * w->panel_stride + o % w->nr, *b = j->b ? j->b + o : NULL;
    float *y0 = mha__mat_at(&rows->y, 0, o);
    for (int64_t r = r0; r < r1; r += MHA_EXACT_MR) {
        int64_t m = mha__min64(MHA_EXACT_MR, r1 - r);
        const float *xr[MHA_EXACT_MR];
        float *yr[MHA_EXACT_MR];
        for (int64_t i = 0; i < m; i++) xr[i] = rows->x + rows->x_at[r + i], yr[i] = y0 + rows->y_at[r + i];
        j->kt->gemm_tile_exact(m, n, w->in, xr, rows->x_cs, panel, w->ldb, b, yr);
    }
}

static void exact_items(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const exact_job *j = arg;
    for (int64_t item = begin; item < end; item++) {
        int64_t r0 = item * EXACT_ROWS, r1 = mha__min64(r0 + EXACT_ROWS, j->rows.count);
        for (int64_t o = j->o0, n; o < j->o1; o += n) {
            n = mha__min64(j->w->nr - o % j->w->nr, j->o1 - o);
            n = mha__group_run(&j->rows.y, o, n);
            exact_columns(j, r0, r1, o, n);
        }
    }
}

void mha__linear_exact(mha_ctx *ctx, const mha__kernels *kt, const mha__exact_rows *rows, const mha__packed *w,
                       int64_t o0, int64_t o1, const float *b)
{
    exact_job job = {kt, *rows, w, b, o0, o1};
    mha__parallel_items(ctx, (rows->count + EXACT_ROWS - 1) / EXACT_ROWS, exact_items, &job);
}
