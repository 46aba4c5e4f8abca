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
 * kernels' gemm_tile_exact, MHA_EXACT_MR rows at a time).
 *
 * The operands are widened to float64 first, so that the kernel's loop
 * is only loads, broadcasts and multiply-adds: W's columns once a call,
 * into panels all threads read, and an item's rows of x once an item,
 * into its thread's scratch.
 */
#include "gemm/gemm.h"

/* Rows an item takes: every panel of the range passes over them (the
 * panels stay in L2 while they do). */
enum { EXACT_ROWS = 64 };

/* The workspace in doubles: the widened panels of `outputs` columns,
 * [panels][in][nr] and nr more (the kernel reads a panel's nr columns from
 * an output inside it), then each thread's rows, [EXACT_ROWS][in]; false
 * when that overflows. */
typedef struct exact_sizes {
    int64_t panels, shared, per_thread;
} exact_sizes;

static bool exact_sizes_of(const mha__packed *w, int64_t outputs, exact_sizes *z)
{
    z->panels = (outputs + w->nr - 1) / w->nr;
    return mha__mul(z->panels * w->nr, w->in, &z->shared) && mha__add(z->shared, w->nr, &z->shared) &&
           z->shared <= INT64_MAX / 16 && mha__mul(EXACT_ROWS, w->in, &z->per_thread) &&
           z->per_thread <= INT64_MAX / 16;
}

bool mha__linear_exact_workspace(const mha_ctx *ctx, const mha__packed *w, int64_t outputs, int64_t *bytes)
{
    exact_sizes z;
    if (!exact_sizes_of(w, outputs, &z)) {
        mha__fail(MHA_ERR_INVALID_ARG, "the exact sums of %lld x %lld overflow", (long long)outputs, (long long)w->in);
        return false;
    }
    return mha__ws_add(bytes, z.shared * (int64_t)sizeof(double), "the exact sums' widened weights") &&
           mha__ws_add_per_thread(bytes, ctx, 2 * z.per_thread, "the exact sums' widened rows");
}

typedef struct exact_job {
    const mha__kernels *kt;
    mha__exact_rows rows;
    const mha__packed *w;
    const float *b;
    int64_t o0, o1;
    double *panels; /* W's columns o0 .. o1 - 1 widened: panel q holds o0 + q nr onward */
    char *scratch;  /* each thread's rows widened */
    int64_t scratch_stride;
} exact_job;

/* Panels [begin, end) of the widened weights: each row of a panel the nr
 * columns from o0 + q nr (found in W's own panels, which need not start
 * there), zeros past o1. */
static void widen_panels(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const exact_job *j = arg;
    const mha__packed *w = j->w;
    for (int64_t q = begin; q < end; q++) {
        double *panel = j->panels + q * w->in * w->nr;
        int64_t first = j->o0 + q * w->nr, live = mha__min64(w->nr, j->o1 - first);
        for (int64_t p = 0; p < w->in; p++) {
            for (int64_t c = 0, n; c < live; c += n) { /* runs inside one of W's panels */
                int64_t o = first + c;
                n = mha__min64(w->nr - o % w->nr, live - c);
                j->kt->widen(panel + p * w->nr + c, w->data + (o / w->nr) * w->panel_stride + p * w->ldb + o % w->nr, 1,
                             n);
            }
            for (int64_t c = live; c < w->nr; c++) panel[p * w->nr + c] = 0.0;
        }
    }
}

/* Outputs o .. o + n - 1 (inside one widened panel) of the item's
 * widened rows xd, [r1 - r0][in], into the list's rows r0 .. r1 - 1 of y. */
static void exact_columns(const exact_job *j, int64_t r0, int64_t r1, const double *xd, int64_t o, int64_t n)
{
    const mha__exact_rows *rows = &j->rows;
    const mha__packed *w = j->w;
    int64_t c = o - j->o0;
    const double *panel = j->panels + (c / w->nr) * w->in * w->nr + c % w->nr;
    const float *b = j->b ? j->b + o : NULL;
    float *y0 = mha__mat_at(&rows->y, 0, o);
    for (int64_t r = r0; r < r1; r += MHA_EXACT_MR) {
        int64_t m = mha__min64(MHA_EXACT_MR, r1 - r);
        float *yr[MHA_EXACT_MR];
        for (int64_t i = 0; i < m; i++) yr[i] = y0 + rows->y_at[r + i];
        j->kt->gemm_tile_exact(m, n, w->in, xd + (r - r0) * w->in, w->in, panel, w->nr, b, yr);
    }
}

static void exact_items(void *arg, int thread, int64_t begin, int64_t end)
{
    const exact_job *j = arg;
    const mha__exact_rows *rows = &j->rows;
    int64_t in = j->w->in, nr = j->w->nr;
    double *xd = (double *)(void *)(j->scratch + thread * j->scratch_stride);
    for (int64_t item = begin; item < end; item++) {
        int64_t r0 = item * EXACT_ROWS, r1 = mha__min64(r0 + EXACT_ROWS, rows->count);
        for (int64_t r = r0; r < r1; r++) j->kt->widen(xd + (r - r0) * in, rows->x + rows->x_at[r], rows->x_cs, in);
        for (int64_t o = j->o0, n; o < j->o1; o += n) {
            n = mha__min64(nr - (o - j->o0) % nr, j->o1 - o);
            n = mha__group_run(&rows->y, o, n);
            exact_columns(j, r0, r1, xd, o, n);
        }
    }
}

mha_status mha__linear_exact(mha_ctx *ctx, const mha__kernels *kt, const mha__exact_rows *rows, const mha__packed *w,
                             int64_t o0, int64_t o1, const float *b)
{
    int64_t top = mha__ws_top(ctx);
    exact_sizes z;
    exact_job job = {kt, *rows, w, b, o0, o1, NULL, NULL, 0};
    if (!exact_sizes_of(w, o1 - o0, &z)) return MHA_ERR_INTERNAL; /* planned */
    job.panels = mha__ws_take(ctx, z.shared * (int64_t)sizeof(double));
    job.scratch = job.panels ? mha__ws_take_per_thread(ctx, 2 * z.per_thread, &job.scratch_stride) : NULL;
    if (!job.scratch) return MHA_ERR_INTERNAL;
    for (int64_t i = z.panels * w->in * w->nr; i < z.shared; i++) job.panels[i] = 0.0; /* the kernel's overreach */
    mha__parallel_for(ctx, z.panels, widen_panels, &job);
    mha__parallel_items(ctx, (rows->count + EXACT_ROWS - 1) / EXACT_ROWS, exact_items, &job);
    mha__ws_release(ctx, top);
    return MHA_OK;
}
