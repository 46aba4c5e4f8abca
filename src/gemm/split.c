/*
 * split.c -- y = x W^T + b in float32 on AMX: both operands split into
 * three bf16 parts, six products of parts (kernels.h) accumulated in
 * float32 by the tiles.  As accurate as the FMA path (docs/NUMERICS.md)
 * and faster on Sapphire Rapids: the layer forward 1.3-1.4x at S1 and S2
 * (docs/PERFORMANCE.md).  The tiles do 512 bf16 multiply-adds a cycle
 * against the FMA units' 32 float32 ones, so six products a float32 one
 * still leave them ahead.
 *
 * W is split once, when the weight is packed, into column tiles.  x is
 * split a chunk of SPLIT_ROWS rows at a time into the workspace (row
 * tiles, padded to pairs with zero rows), then items of (ROW_BLOCK rows,
 * a range of 32-column panels) run the kernel, which adds into y: y is
 * first set to the bias (or 0).  Each output is the bias plus one chain
 * in a fixed order, whatever the thread count.  A chunk with a value
 * that is not finite goes through the float32 FMA path instead, so
 * infinities and NaN propagate as IEEE products do.
 */
#include "gemm/gemm.h"

#include <string.h>

enum {
    PANEL = 32,       /* columns of y a kernel call covers: two column tiles */
    PAIR_ROWS = 32,   /* rows of a kernel block: two row tiles */
    ROW_BLOCK = 96,   /* rows of an item: three blocks, A's 216 KB at in = 768 */
    SPLIT_ROWS = 768, /* rows split at a time: 3.5 MB of workspace at in = 768 */
    LINEAR_ITEMS = 32
};

static int64_t k_blocks(int64_t in) { return (in + MHA_SPLIT_K - 1) / MHA_SPLIT_K; }

/* uint16_t values in a row or column tile's three parts over all of k. */
static int64_t tile_run(int64_t in) { return 3 * k_blocks(in) * MHA_SPLIT_TILE; }

static int64_t row_pairs(int64_t rows) { return (rows + PAIR_ROWS - 1) / PAIR_ROWS; }

/* Splits n <= 32 values of src (zeros past n) into block b of a row
 * tile's run, as row 0 of its three part tiles (callers move run to the
 * row).  False if a value is not finite. */
static bool split_block_row(const mha__bf16_kernels *bk, const float *src, int64_t n, uint16_t *run, int64_t b)
{
    uint16_t *hi = run + (b * 3) * MHA_SPLIT_TILE, *mid = hi + MHA_SPLIT_TILE, *lo = mid + MHA_SPLIT_TILE;
    bool finite = bk->split3(src, n, hi, mid, lo);
    for (int64_t c = n; c < MHA_SPLIT_K; c++) hi[c] = mid[c] = lo[c] = 0;
    return finite;
}

/* ---------------------------------------------------------------- */
/* W, split once                                                     */
/* ---------------------------------------------------------------- */

mha_status mha__pack_split(mha__packed_split *p, const mha__bf16_kernels *bk, const float *w, int64_t out, int64_t in)
{
    int64_t panels = (out + PANEL - 1) / PANEL, run = tile_run(in), n;
    if (!mha__mul(2 * panels, run, &n))
        return mha__fail(MHA_ERR_INVALID_ARG, "weight of %lld x %lld is too large", (long long)out, (long long)in);
    bool reuse = p->data && p->out == out && p->in == in;
    uint16_t *data = reuse ? p->data : mha__alloc(n, sizeof(uint16_t));
    if (!data) return MHA_ERR_NOMEM;
    if (!reuse) mha__free(p->data);
    memset(data, 0, (size_t)n * sizeof(uint16_t));
    bool finite = true;
    uint16_t row[3 * MHA_SPLIT_TILE]; /* one block of an output's row, laid out as A's */
    for (int64_t o = 0; o < out && w; o++) {
        uint16_t *tile = data + (o / 16) * run;
        int64_t j = o % 16;
        for (int64_t b = 0; b * MHA_SPLIT_K < in; b++) {
            int64_t c0 = b * MHA_SPLIT_K, cols = in - c0 < MHA_SPLIT_K ? in - c0 : MHA_SPLIT_K;
            finite &= split_block_row(bk, w + o * in + c0, cols, row, 0);
            for (int q = 0; q < 3; q++) { /* into B's pairs: values c, c + 1 of column j, one copy */
                uint16_t *part = tile + (b * 3 + q) * MHA_SPLIT_TILE + 2 * j;
                const uint16_t *from = row + q * MHA_SPLIT_TILE;
                for (int64_t c = 0; c < cols; c += 2) memcpy(part + (c / 2) * 32, from + c, 2 * sizeof(uint16_t));
            }
        }
    }
    if (!finite) { /* the FMA path then: keep nothing split */
        mha__free(data);
        data = NULL;
    }
    *p = (mha__packed_split){data, out, in};
    return MHA_OK;
}

void mha__packed_split_free(mha__packed_split *p)
{
    mha__free(p->data);
    *p = (mha__packed_split){0};
}

/* ---------------------------------------------------------------- */
/* x, a chunk at a time                                              */
/* ---------------------------------------------------------------- */

bool mha__linear_split_workspace(int64_t rows, int64_t in, int64_t *bytes)
{
    int64_t chunk = rows < SPLIT_ROWS ? rows : SPLIT_ROWS, n;
    if (mha__mul(2 * row_pairs(chunk), tile_run(in), &n) && n <= INT64_MAX / (int64_t)sizeof(uint16_t) &&
        mha__ws_add(bytes, n * (int64_t)sizeof(uint16_t), "a split product's input"))
        return mha__ws_add(bytes, row_pairs(chunk), "a split product's flags");
    return false;
}

typedef struct split_job {
    const mha__bf16_kernels *bk;
    const mha__mat *x;
    const mha__packed_split *w;
    const float *b;
    const mha__mat *y;
    int64_t r0, rows; /* the chunk */
    uint16_t *a;      /* its row tiles */
    uint8_t *finite;  /* one flag a pair of row tiles */
    int64_t row_blocks, panels, panels_per_item;
} split_job;

/* Row pair `pair` of the chunk into its two row tiles. */
static void split_rows(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const split_job *j = arg;
    int64_t in = j->w->in, run = tile_run(in);
    float gathered[MHA_SPLIT_K];
    for (int64_t pair = begin; pair < end; pair++) {
        bool finite = true;
        for (int64_t i = 0; i < PAIR_ROWS; i++) {
            int64_t r = pair * PAIR_ROWS + i;
            uint16_t *row = j->a + (r / 16) * run + (r % 16) * MHA_SPLIT_K;
            for (int64_t b = 0; b * MHA_SPLIT_K < in; b++) {
                int64_t c0 = b * MHA_SPLIT_K, cols = r < j->rows ? mha__min64(in - c0, MHA_SPLIT_K) : 0;
                const float *src = cols ? mha__mat_at(j->x, j->r0 + r, c0) : gathered;
                if (cols && (j->x->cs != 1 || mha__group_run(j->x, c0, cols) < cols)) {
                    for (int64_t c = 0; c < cols; c++) gathered[c] = *mha__mat_at(j->x, j->r0 + r, c0 + c);
                    src = gathered;
                }
                finite &= split_block_row(j->bk, src, cols, row, b);
            }
        }
        j->finite[pair] = finite;
    }
}

/* Rows r .. r + 32 pairs - 1 of the chunk, panel p: in place when the
 * block lies whole inside y, else through a staged copy. */
static void split_panel(const split_job *j, int64_t r, int64_t pairs, int64_t p)
{
    int64_t run = tile_run(j->w->in), kb = k_blocks(j->w->in), col0 = p * PANEL;
    const uint16_t *a = j->a + (r / 16) * run, *b = j->w->data + 2 * p * run;
    int64_t cols = mha__min64(j->w->out - col0, PANEL), whole = cols == PANEL ? (j->rows - r) / PAIR_ROWS : 0;
    whole = mha__min64(whole, pairs);
    if (whole) j->bk->gemm_split(whole, kb, a, b, mha__mat_at(j->y, j->r0 + r, col0), j->y->rs);
    for (int64_t q = whole; q < pairs; q++) { /* a tail of rows or columns */
        float stage[PAIR_ROWS * PANEL] = {0};
        int64_t rq = r + q * PAIR_ROWS, n = mha__min64(j->rows - rq, PAIR_ROWS);
        for (int64_t i = 0; i < n; i++)
            memcpy(stage + i * PANEL, mha__mat_at(j->y, j->r0 + rq + i, col0), (size_t)cols * sizeof(float));
        j->bk->gemm_split(1, kb, a + 2 * q * run, b, stage, PANEL);
        for (int64_t i = 0; i < n; i++)
            memcpy(mha__mat_at(j->y, j->r0 + rq + i, col0), stage + i * PANEL, (size_t)cols * sizeof(float));
    }
}

static void split_items(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const split_job *j = arg;
    for (int64_t item = begin; item < end; item++) {
        int64_t rb = item % j->row_blocks, p0 = item / j->row_blocks * j->panels_per_item;
        int64_t p1 = mha__min64(p0 + j->panels_per_item, j->panels);
        int64_t r = rb * ROW_BLOCK, n = mha__min64(j->rows - r, ROW_BLOCK);
        mha__fill_rows(j->y, j->b, j->r0 + r, j->r0 + r + n, p0 * PANEL, mha__min64(p1 * PANEL, j->w->out));
        for (int64_t p = p0; p < p1; p++) split_panel(j, r, row_pairs(n), p);
    }
}

bool mha__linear_split(mha_ctx *ctx, const mha__bf16_kernels *bk, int64_t rows, const mha__mat *x,
                       const mha__packed_split *w, const float *b, const mha__mat *y)
{
    int64_t top = mha__ws_top(ctx), chunk = mha__min64(rows, SPLIT_ROWS);
    split_job j = {bk, x, w, b, y, 0, 0, NULL, NULL, 0, (w->out + PANEL - 1) / PANEL, 0};
    j.a = mha__ws_take(ctx, 2 * row_pairs(chunk) * tile_run(w->in) * (int64_t)sizeof(uint16_t));
    j.finite = mha__ws_take(ctx, row_pairs(chunk));
    bool done = j.a && j.finite; /* sized by the plan */
    for (int64_t r0 = 0; r0 < rows && done; r0 += SPLIT_ROWS) {
        j.r0 = r0;
        j.rows = mha__min64(rows - r0, SPLIT_ROWS);
        mha__parallel_for(ctx, row_pairs(j.rows), split_rows, &j);
        for (int64_t q = 0; q < row_pairs(j.rows); q++) done &= j.finite[q];
        if (!done) break; /* the chunks before are done; the caller redoes all */
        j.row_blocks = (j.rows + ROW_BLOCK - 1) / ROW_BLOCK;
        int64_t splits = mha__min64((LINEAR_ITEMS + j.row_blocks - 1) / j.row_blocks, j.panels);
        j.panels_per_item = (j.panels + splits - 1) / splits;
        int64_t ranges = (j.panels + j.panels_per_item - 1) / j.panels_per_item;
        mha__parallel_items(ctx, j.row_blocks * ranges, split_items, &j);
    }
    mha__ws_release(ctx, top);
    return done;
}
