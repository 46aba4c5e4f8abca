/*
 * gemm.c -- y = x W^T + b for the projections.
 *
 * W is packed once into panels of nr output columns (W^T, in x nr each), so
 * the micro-kernel reads B as contiguous vectors.  The work is a grid of
 * (block of ROW_BLOCK rows) x (one panel) items; within an item the panel
 * (in x nr floats, ~100 KB for in = 768) stays in L2 while the rows stream
 * through it, mr at a time.  Every output tile is computed by one
 * micro-kernel call over the whole input width, so the result does not
 * depend on how items are spread over threads.
 */
#include "gemm.h"

#include <string.h>

enum { ROW_BLOCK = 96 };

mha_status mha__pack(mha__packed *p, const mha__kernels *kt, const float *w, int64_t out, int64_t in)
{
    int64_t nr = kt->nr, panels = (out + nr - 1) / nr, n;
    if (!mha__mul(panels * nr, in, &n)) return mha__fail(MHA_ERR_INVALID_ARG, "weight of %lld x %lld is too large",
                                                         (long long)out, (long long)in);
    float *data = mha__alloc(n, sizeof(float));
    if (!data) return MHA_ERR_NOMEM;
    for (int64_t panel = 0; panel < panels; panel++)
        for (int64_t c = 0; c < in; c++)
            for (int64_t j = 0; j < nr; j++) {
                int64_t o = panel * nr + j;
                data[(panel * in + c) * nr + j] = o < out && w ? w[o * in + c] : 0.0f;
            }
    mha__free(p->data);
    *p = (mha__packed){data, out, in, nr};
    return MHA_OK;
}

void mha__packed_free(mha__packed *p)
{
    mha__free(p->data);
    p->data = NULL;
}

typedef struct linear_job {
    const mha__kernels *kt;
    int64_t rows;
    const float *x;
    int64_t x_rs, x_cs;
    const mha__packed *w;
    const float *b;
    float *y;
    int64_t ldy, row_blocks;
} linear_job;

static void linear_item(const linear_job *j, int64_t item)
{
    const mha__kernels *kt = j->kt;
    int64_t panel = item / j->row_blocks, r0 = (item % j->row_blocks) * ROW_BLOCK;
    int64_t r1 = r0 + ROW_BLOCK < j->rows ? r0 + ROW_BLOCK : j->rows;
    int64_t col0 = panel * kt->nr, cols = j->w->out - col0 < kt->nr ? j->w->out - col0 : kt->nr;
    const float *b = j->w->data + panel * j->w->in * kt->nr;
    for (int64_t r = r0; r < r1; r += kt->mr) {
        int64_t m = r1 - r < kt->mr ? r1 - r : kt->mr;
        float *y = j->y + r * j->ldy + col0;
        if (j->b)
            for (int64_t i = 0; i < m; i++) memcpy(y + i * j->ldy, j->b + col0, (size_t)cols * sizeof(float));
        kt->gemm_tile(m, cols, j->w->in, j->x + r * j->x_rs, j->x_rs, j->x_cs, b, kt->nr, y, j->ldy, j->b != NULL);
    }
}

static void linear_range(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    for (int64_t item = begin; item < end; item++) linear_item(arg, item);
}

void mha__linear(mha_ctx *ctx, const mha__kernels *kt, int64_t rows, const float *x, int64_t x_rs, int64_t x_cs,
                 const mha__packed *w, const float *b, float *y, int64_t ldy)
{
    linear_job job = {kt, rows, x, x_rs, x_cs, w, b, y, ldy, (rows + ROW_BLOCK - 1) / ROW_BLOCK};
    int64_t panels = (w->out + kt->nr - 1) / kt->nr;
    mha__parallel_for(ctx, job.row_blocks * panels, linear_range, &job);
}
