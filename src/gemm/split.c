/*
 * split.c -- y = x W^T + b in float32 on AMX: both operands split into
 * three bf16 parts, six products of parts (kernels.h) accumulated in
 * float32 by the tiles.  As accurate as the FMA path (docs/NUMERICS.md)
 * and faster on Sapphire Rapids: the layer forward 1.3-1.4x at S1 and S2
 * (docs/PERFORMANCE.md).  The tiles do 512 bf16 multiply-adds a cycle
 * against the FMA units' 32 float32 ones, so six products a float32 one
 * still leave them ahead.
 *
 * The forward's W is split once, when the weight is packed, into column
 * tiles; the backward's W^T for dX = dY W is split into the workspace each
 * call (pairs of W's rows, no transpose).  x is split a chunk of
 * SPLIT_ROWS rows at a time into the workspace (row tiles, padded to
 * pairs with zero rows), then items of (ROW_BLOCK rows, a range of
 * 32-column panels) run the kernel, which adds into y, or unless the
 * call adds, writes bias + product there (MHA_SPLIT_BIAS_ADD: the bits
 * of adding to y set to the bias first, without that pass over y and
 * the kernel's read of it).  The weight gradient dW += dY^T X
 * splits both operands 256 rows at a time (dY's pairs of rows transposed
 * into A's tiles).  Each output is one chain a chunk in a fixed order,
 * whatever the thread count.  A chunk with a value that is not finite,
 * and products of fewer than MIN_ROWS rows, go through the float32 FMA
 * path instead, so infinities and NaN propagate as IEEE products do (the
 * backward's W^T panels for it packed only then).  Products that read one
 * input (self-attention's Q, K and V, and their weight gradients' X)
 * split it once a chunk and share the threads' items.
 */
#include "gemm/gemm.h"

#include <stdatomic.h>
#include <string.h>

enum {
    /* Fewer rows go through the FMA GEMM: the tiles work on pairs of
     * 16-row tiles, so one row pays for 32.  A 2304 x 768 weight on two
     * threads: 1 row 0.30 ms split against 0.17 FMA, 4 rows 0.32 against
     * 0.15, 16 rows 0.33 against 0.34, 32 rows 0.32 against 0.49. */
    MIN_ROWS = 16,
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

/* 32-column panels of `cols` columns, and their 16-column tiles. */
static int64_t panels(int64_t cols) { return (cols + PANEL - 1) / PANEL; }
static int64_t column_tiles(int64_t cols) { return 2 * panels(cols); }

/* Whether every one of n flags (one per tile, pair or output) is set. */
static bool all_set(const uint8_t *flags, int64_t n)
{
    bool all = true;
    for (int64_t i = 0; i < n; i++) all &= flags[i];
    return all;
}

/* ---------------------------------------------------------------- */
/* W, split once                                                     */
/* ---------------------------------------------------------------- */

typedef struct pack_split_job {
    const mha__bf16_kernels *bk;
    const float *w; /* NULL: zeros */
    int64_t out, in;
    uint16_t *data;
    atomic_bool finite; /* cleared by a tile with a value that is not */
} pack_split_job;

/* Column tiles [begin, end): 16 rows of w split along k, then
 * transposed; the fillers write the zeros past w (and all of a padding
 * tile) too. */
static void pack_split_tiles(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    pack_split_job *j = arg;
    int64_t run = tile_run(j->in);
    bool finite = true;
    for (int64_t t = begin; t < end; t++)
        for (int64_t b = 0; b < k_blocks(j->in); b++) {
            uint16_t *tiles = j->data + t * run + b * 3 * MHA_SPLIT_TILE;
            int64_t o0 = 16 * t, c0 = b * MHA_SPLIT_K, live = j->w ? mha__max64(0, mha__min64(16, j->out - o0)) : 0;
            finite &= j->bk->split_rows_tile(live ? j->w + o0 * j->in + c0 : NULL, j->in, live,
                                             mha__min64(j->in - c0, MHA_SPLIT_K), tiles);
            j->bk->split_transpose(tiles);
        }
    if (!finite) atomic_store_explicit(&j->finite, false, memory_order_relaxed);
}

/* Memory for p's split of n values, `out` outputs of `in` inputs: p's
 * own when the shape is the same (a training step that repacks its
 * weights allocates nothing), else a new allocation, p's old one freed.
 * NULL (p untouched) on NOMEM. */
static uint16_t *split_memory(mha__packed_split *p, int64_t out, int64_t in, int64_t n)
{
    if (p->data && p->out == out && p->in == in) return p->data;
    uint16_t *data = mha__alloc(n, sizeof(uint16_t));
    if (data) mha__packed_split_free(p);
    return data;
}

mha_status mha__pack_split(mha_ctx *ctx, mha__packed_split *p, const mha__bf16_kernels *bk, const float *w, int64_t out,
                           int64_t in)
{
    int64_t run = tile_run(in), n;
    if (!mha__mul(column_tiles(out), run, &n))
        return mha__fail(MHA_ERR_INVALID_ARG, "weight of %lld x %lld is too large", (long long)out, (long long)in);
    uint16_t *data = split_memory(p, out, in, n);
    if (!data) return MHA_ERR_NOMEM;
    pack_split_job job = {.bk = bk, .w = w, .out = out, .in = in, .data = data};
    atomic_init(&job.finite, true);
    if (ctx) mha__parallel_for(ctx, column_tiles(out), pack_split_tiles, &job);
    else pack_split_tiles(&job, 0, 0, column_tiles(out));
    if (!atomic_load_explicit(&job.finite, memory_order_relaxed)) { /* the FMA path then: keep nothing split */
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

bool mha__split_products(const mha__isa_kernels *k) { return k->bf16 && k->bf16->gemm_split && k->f32->nr == PANEL; }

/* ---------------------------------------------------------------- */
/* W^T, split into the workspace for dX = dY W                       */
/* ---------------------------------------------------------------- */

static int64_t transposed_values(int64_t rows, int64_t cols, bool *fits)
{
    int64_t n;
    *fits = mha__mul(column_tiles(cols), tile_run(rows), &n) && n <= INT64_MAX / 2;
    return *fits ? n : 0;
}

typedef struct transposed_job {
    const mha__bf16_kernels *bk;
    const float *w;
    int64_t rows, cols; /* w's: rows are k, columns the outputs */
    uint16_t *data;
    atomic_bool finite; /* cleared by a tile with a value that is not */
} transposed_job;

/* Column tiles begin .. end - 1, a block of w's rows at a time across
 * all of them: each row's columns are then read side by side.  Tile by
 * tile, every read was a new line 4 bytes x cols apart, and the split
 * waited on memory for three quarters of its time. */
static void transposed_tiles(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    transposed_job *j = arg;
    int64_t run = tile_run(j->rows);
    bool finite = true;
    for (int64_t b = 0; b < k_blocks(j->rows); b++)
        for (int64_t t = begin; t < end; t++) {
            int64_t c0 = 16 * t, n = mha__max64(0, mha__min64(16, j->cols - c0));
            int64_t k0 = b * MHA_SPLIT_K, live = n ? mha__min64(MHA_SPLIT_K, j->rows - k0) : 0;
            finite &= j->bk->split_pairs_tile(j->w + k0 * j->cols + c0, j->cols, live, n,
                                              j->data + t * run + b * 3 * MHA_SPLIT_TILE);
        }
    if (!finite) atomic_store_explicit(&j->finite, false, memory_order_relaxed);
}

mha_status mha__pack_split_transposed(mha_ctx *ctx, mha__packed_split *p, const mha__bf16_kernels *bk, const float *w,
                                      int64_t rows, int64_t cols)
{
    bool fits;
    int64_t tiles = column_tiles(cols), n = transposed_values(rows, cols, &fits);
    if (!fits)
        return mha__fail(MHA_ERR_INVALID_ARG, "weight of %lld x %lld is too large", (long long)rows, (long long)cols);
    transposed_job j = {.bk = bk, .w = w, .rows = rows, .cols = cols, .data = split_memory(p, cols, rows, n)};
    if (!j.data) return MHA_ERR_NOMEM;
    atomic_init(&j.finite, true);
    mha__parallel_for(ctx, tiles, transposed_tiles, &j);
    *p = (mha__packed_split){j.data, cols, rows};
    if (!atomic_load_explicit(&j.finite, memory_order_relaxed))
        mha__packed_split_free(p); /* the FMA panels serve: keep nothing split */
    return MHA_OK;
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
    bool add;
    const mha__mat *x;
    int64_t in;
    const mha__split_output *outs;
    int count;
    int64_t r0, rows; /* the chunk */
    uint16_t *a;      /* its row tiles */
    uint8_t *finite;  /* one flag a pair of row tiles */
    int64_t row_blocks;
    /* Output o's items are first_item[o] .. first_item[o + 1] - 1, each
     * (a block of rows, a range of panels_per_item[o] panels). */
    int64_t panels_per_item[MHA_SPLIT_OUTPUTS], first_item[MHA_SPLIT_OUTPUTS + 1];
} split_job;

/* The chunk's row tile `tile` (16 rows, zeros past the chunk's) split
 * by the near filler (kernels.h): rows read in place where a block's
 * columns are contiguous, else gathered first.  x is split once a call
 * and used once a panel, so its rounding's cost counts: round-to-even's
 * filler (a row at a time) was 3.4% of the layer forward at S2 (Sapphire
 * Rapids, two threads).  False if a value is not splittable. */
static bool split_row_tile(const split_job *j, int64_t tile)
{
    int64_t r0 = 16 * tile, live = mha__max64(0, mha__min64(16, j->rows - r0));
    uint16_t *run = j->a + tile * tile_run(j->in);
    float gathered[16][MHA_SPLIT_K];
    bool finite = true;
    for (int64_t b = 0; b * MHA_SPLIT_K < j->in; b++) {
        int64_t c0 = b * MHA_SPLIT_K, cols = mha__min64(j->in - c0, MHA_SPLIT_K);
        const float *src = gathered[0];
        int64_t lds = MHA_SPLIT_K;
        if (live && j->x->cs == 1 && mha__group_run(j->x, c0, cols) >= cols) {
            src = mha__mat_at(j->x, j->r0 + r0, c0);
            lds = j->x->rs;
        } else
            for (int64_t i = 0; i < live; i++)
                for (int64_t c = 0; c < cols; c++) gathered[i][c] = *mha__mat_at(j->x, j->r0 + r0 + i, c0 + c);
        finite &= j->bk->split_near_rows_tile(src, lds, live, cols, run + b * 3 * MHA_SPLIT_TILE);
    }
    return finite;
}

/* Row pair `pair` of the chunk into its two row tiles. */
static void split_rows(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const split_job *j = arg;
    for (int64_t pair = begin; pair < end; pair++) {
        bool first = split_row_tile(j, 2 * pair), second = split_row_tile(j, 2 * pair + 1);
        j->finite[pair] = first && second;
    }
}

/* C += `pairs` pairs of A's row tiles (each run values long) times a
 * panel of B, for C's first `rows` rows and `cols` <= 32 columns at c
 * (ldc floats a row): in place for the pairs that lie whole inside C,
 * through a staged copy for a tail of rows or columns.  With `set`, C =
 * bias + the product instead (bias: the columns' `cols` values, or NULL
 * for zeros), C not read. */
static void add_panel(const mha__bf16_kernels *bk, int64_t kb, const uint16_t *a, const uint16_t *b, int64_t pairs,
                      int64_t rows, int64_t cols, float *c, int64_t ldc, bool set, const float *bias)
{
    int64_t run = 3 * kb * MHA_SPLIT_TILE, whole = cols == PANEL ? mha__min64(rows / PAIR_ROWS, pairs) : 0;
    int mode = set ? MHA_SPLIT_BIAS_ADD : MHA_SPLIT_ADD;
    float padded[PANEL] = {0}; /* a tail panel's bias: the kernel reads 32 */
    if (bias && cols < PANEL) bias = memcpy(padded, bias, (size_t)cols * sizeof(float));
    if (whole) bk->gemm_split(whole, kb, a, run, b, c, ldc, mode, bias);
    for (int64_t q = whole; q < pairs && q * PAIR_ROWS < rows; q++) {
        float stage[PAIR_ROWS * PANEL] = {0};
        int64_t n = mha__min64(rows - q * PAIR_ROWS, PAIR_ROWS);
        float *cq = c + q * PAIR_ROWS * ldc;
        for (int64_t i = 0; !set && i < n; i++) memcpy(stage + i * PANEL, cq + i * ldc, (size_t)cols * sizeof(float));
        bk->gemm_split(1, kb, a + 2 * q * run, run, b, stage, PANEL, mode, bias);
        for (int64_t i = 0; i < n; i++) memcpy(cq + i * ldc, stage + i * PANEL, (size_t)cols * sizeof(float));
    }
}

/* Rows r .. r + 32 pairs - 1 of the chunk, panel p of output o (its rows
 * lie ldc = y.rs apart: a panel never straddles two column groups). */
static void split_panel(const split_job *j, const mha__split_output *o, int64_t r, int64_t pairs, int64_t p)
{
    int64_t run = tile_run(j->in), col0 = p * PANEL;
    add_panel(j->bk, k_blocks(j->in), j->a + (r / 16) * run, o->w->data + 2 * p * run, pairs, j->rows - r,
              mha__min64(o->w->out - col0, PANEL), mha__mat_at(o->y, j->r0 + r, col0), o->y->rs, !j->add,
              o->b ? o->b + col0 : NULL);
}

static void split_items(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const split_job *j = arg;
    int which = 0;
    for (int64_t item = begin; item < end; item++) {
        while (item >= j->first_item[which + 1]) which++;
        const mha__split_output *o = &j->outs[which];
        int64_t local = item - j->first_item[which], rb = local % j->row_blocks;
        int64_t p0 = local / j->row_blocks * j->panels_per_item[which];
        int64_t p1 = mha__min64(p0 + j->panels_per_item[which], panels(o->w->out));
        int64_t r = rb * ROW_BLOCK, n = mha__min64(j->rows - r, ROW_BLOCK);
        for (int64_t p = p0; p < p1; p++) split_panel(j, o, r, row_pairs(n), p);
    }
    j->bk->split_release();
}

/* Output o's float32 panels, packed first if they are made on demand. */
static mha_status fma_weight(mha_ctx *ctx, const mha__split_output *o, const mha__packed **w)
{
    *w = o->fma;
    if (*w) return MHA_OK;
    if (o->panels) return o->panels(ctx, o->panels_of, w);
    mha__fma_on_demand *d = o->on_demand;
    mha_status st = MHA_OK;
    if (!d->packed.data) st = mha__pack_transposed_workspace_take(ctx, d->kt, d->w, d->rows, d->cols, &d->packed);
    *w = &d->packed;
    return st;
}

/* The chunk's rows through the FMA GEMM, into output o (fewer than
 * MIN_ROWS rows, or one of them is not finite). */
static mha_status chunk_by_fma(mha_ctx *ctx, const mha__kernels *kt, const split_job *j, const mha__split_output *o)
{
    const mha__packed *w;
    mha_status st = fma_weight(ctx, o, &w);
    if (st != MHA_OK) return st;
    mha__mat x = *j->x, y = *o->y;
    x.data += j->r0 * x.rs;
    y.data += j->r0 * y.rs;
    if (j->add) mha__linear_add(ctx, kt, j->rows, &x, w, &y);
    else mha__linear(ctx, kt, j->rows, &x, w, o->b, &y);
    return MHA_OK;
}

/* Every output of the chunk through the FMA GEMM. */
static mha_status chunk_all_by_fma(mha_ctx *ctx, const mha__kernels *kt, const split_job *j)
{
    mha_status st = MHA_OK;
    for (int o = 0; o < j->count && st == MHA_OK; o++) st = chunk_by_fma(ctx, kt, j, &j->outs[o]);
    return st;
}

/* The items of the chunk's products: for each output, as many ranges of
 * panels as make about LINEAR_ITEMS items with the chunk's row blocks. */
static int64_t plan_items(split_job *j)
{
    j->row_blocks = (j->rows + ROW_BLOCK - 1) / ROW_BLOCK;
    j->first_item[0] = 0;
    for (int o = 0; o < j->count; o++) {
        int64_t n = panels(j->outs[o].w->out);
        int64_t splits = mha__min64((LINEAR_ITEMS + j->row_blocks - 1) / j->row_blocks, n);
        j->panels_per_item[o] = (n + splits - 1) / splits;
        int64_t ranges = (n + j->panels_per_item[o] - 1) / j->panels_per_item[o];
        j->first_item[o + 1] = j->first_item[o] + j->row_blocks * ranges;
    }
    return j->first_item[j->count];
}

/* The workspace back, with any panels packed on demand in it: a later
 * call packs its own. */
static mha_status release(mha_ctx *ctx, int64_t top, int count, const mha__split_output *outs, mha_status st)
{
    for (int o = 0; o < count; o++)
        if (outs[o].on_demand) outs[o].on_demand->packed = (mha__packed){0};
    mha__ws_release(ctx, top);
    return st;
}

mha_status mha__linear_split_shared(mha_ctx *ctx, const mha__isa_kernels *k, int64_t rows, const mha__mat *x, int count,
                                    const mha__split_output *outs, bool add)
{
    if (count < 1 || count > MHA_SPLIT_OUTPUTS) return MHA_ERR_INTERNAL;
    split_job j = {.bk = k->bf16, .add = add, .x = x, .in = outs[0].w->in, .outs = outs, .count = count};
    int64_t top = mha__ws_top(ctx), chunk = mha__min64(rows, SPLIT_ROWS);
    mha_status st = MHA_OK;
    if (rows < MIN_ROWS) {
        j.rows = rows;
        return release(ctx, top, count, outs, chunk_all_by_fma(ctx, k->f32, &j));
    }
    j.a = mha__ws_take(ctx, 2 * row_pairs(chunk) * tile_run(j.in) * (int64_t)sizeof(uint16_t));
    j.finite = mha__ws_take(ctx, row_pairs(chunk));
    if (!j.a || !j.finite) return MHA_ERR_INTERNAL; /* sized by the plan */
    for (int64_t r0 = 0; r0 < rows && st == MHA_OK; r0 += SPLIT_ROWS) {
        j.r0 = r0;
        j.rows = mha__min64(rows - r0, SPLIT_ROWS);
        mha__parallel_for(ctx, row_pairs(j.rows), split_rows, &j);
        if (all_set(j.finite, row_pairs(j.rows))) mha__parallel_items(ctx, plan_items(&j), split_items, &j);
        else st = chunk_all_by_fma(ctx, k->f32, &j);
    }
    return release(ctx, top, count, outs, st);
}

/* ---------------------------------------------------------------- */
/* Weight gradients: dW += dY^T X, a chunk of rows at a time          */
/* ---------------------------------------------------------------- */

enum { GRAD_BLOCKS = 8 }; /* blocks of k (rows) a chunk: 256 rows */

static int64_t grad_run(void) { return 3 * GRAD_BLOCKS * MHA_SPLIT_TILE; }

/* Tiles of a chunk: each output's dY^T (pairs of 16-output row tiles),
 * then X's column tiles once. */
static bool grad_tile_count(int count, const mha__grad_output *outs, int64_t in, int64_t *tiles)
{
    *tiles = column_tiles(in);
    for (int o = 0; o < count; o++) *tiles += 2 * row_pairs(outs[o].out);
    return *tiles <= INT64_MAX / grad_run() / 2;
}

bool mha__weight_grads_split_workspace(int count, const mha__grad_output *outs, int64_t in, int64_t *bytes)
{
    int64_t tiles;
    if (!grad_tile_count(count, outs, in, &tiles)) {
        mha__fail(MHA_ERR_INVALID_ARG, "weight of %lld x %lld is too large", (long long)outs[0].out, (long long)in);
        return false;
    }
    return mha__ws_add(bytes, tiles * grad_run() * (int64_t)sizeof(uint16_t), "a split weight gradient's chunk") &&
           mha__ws_add(bytes, tiles + count, "a split weight gradient's flags");
}

bool mha__weight_grad_split_workspace(int64_t out, int64_t in, int64_t *bytes)
{
    mha__grad_output one = {.out = out};
    return mha__weight_grads_split_workspace(1, &one, in, bytes);
}

typedef struct grad_job {
    const mha__bf16_kernels *bk;
    const mha__grad_output *outs;
    int count;
    mha__mat dy[MHA_SPLIT_OUTPUTS], x; /* moved to the chunk's first row */
    int64_t rows, in;
    /* Output o's row tiles are tiles first_tile[o] .. first_tile[o + 1] - 1
     * of `tiles`; X's column tiles follow, from first_tile[count]. */
    uint16_t *tiles;
    int64_t first_tile[MHA_SPLIT_OUTPUTS + 1];
    uint8_t *finite; /* one flag a tile, then one an output */
    bool first;      /* the first chunk: outputs with `overwrite` take its sums without reading dW */
} grad_job;

/* Tiles begin .. end - 1 of the chunk, a block of rows at a time across
 * all of them (as transposed_tiles, so that each row's columns are read
 * side by side).  Tile t is a row tile of some output's dY^T (16
 * outputs: pairs of dY's rows, transposed), or a column tile of X (16
 * inputs: pairs of X's rows).  The near filler (kernels.h), as for x in
 * the forward: each chunk's tiles are split once and used once. */
static void grad_tiles_range(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const grad_job *j = arg;
    for (int64_t t = begin; t < end; t++) j->finite[t] = true;
    for (int64_t b = 0; b < GRAD_BLOCKS; b++) {
        int64_t r0 = b * MHA_SPLIT_K, rows = mha__max64(0, mha__min64(MHA_SPLIT_K, j->rows - r0));
        for (int64_t t = begin, o = 0; t < end; t++) {
            while (o < j->count && t >= j->first_tile[o + 1]) o++;
            bool is_a = o < j->count;
            const mha__mat *m = is_a ? &j->dy[o] : &j->x;
            int64_t c0 = 16 * (t - j->first_tile[o]), cols = is_a ? j->outs[o].out : j->in;
            int64_t n = mha__max64(0, mha__min64(16, cols - c0)), live = n ? rows : 0;
            uint16_t *tiles = j->tiles + t * grad_run() + b * 3 * MHA_SPLIT_TILE;
            j->finite[t] &= j->bk->split_near_pairs_tile(live ? mha__mat_at(m, r0, c0) : NULL, m->rs, live, n, tiles);
            if (is_a) j->bk->split_transpose(tiles);
        }
    }
}

/* Whether output o's chunk is finite (set by grad_chunk): its flag
 * follows the tiles' flags. */
static uint8_t *output_finite(const grad_job *j, int o)
{
    return &j->finite[j->first_tile[j->count] + column_tiles(j->in) + o];
}

/* Item: output item / panels, panel item % panels of its dW's columns
 * (inputs), all of its rows (outputs); nothing for an output whose chunk
 * has a value that is not finite. */
static void grad_panels(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const grad_job *j = arg;
    int64_t n = panels(j->in);
    const uint16_t *b = j->tiles + j->first_tile[j->count] * grad_run();
    for (int64_t item = begin; item < end; item++) {
        int64_t o = item / n, p = item % n;
        if (!*output_finite(j, (int)o)) continue;
        const mha__grad_output *g = &j->outs[o];
        add_panel(j->bk, GRAD_BLOCKS, j->tiles + j->first_tile[o] * grad_run(), b + 2 * p * grad_run(),
                  row_pairs(g->out), g->out, mha__min64(j->in - p * PANEL, PANEL), g->dw + p * PANEL, j->in,
                  j->first && g->overwrite, NULL);
    }
    j->bk->split_release();
}

/* Can the chunk's tiles read 16 columns of m from one pointer? */
static bool sixteen_side_by_side(const mha__mat *m)
{
    return m->cs == 1 && (!m->group_cols || m->group_cols % 16 == 0);
}

/* One chunk of rows: split, then the products; an output whose dY^T or
 * X has a value that is not finite takes the FMA path for the chunk. */
static mha_status grad_chunk(mha_ctx *ctx, const mha__isa_kernels *k, grad_job *j)
{
    int64_t x0 = j->first_tile[j->count], tiles = x0 + column_tiles(j->in);
    mha__parallel_for(ctx, tiles, grad_tiles_range, j);
    bool x_finite = all_set(j->finite + x0, tiles - x0);
    for (int o = 0; o < j->count; o++)
        *output_finite(j, o) =
            x_finite && all_set(j->finite + j->first_tile[o], j->first_tile[o + 1] - j->first_tile[o]);
    mha__parallel_for(ctx, j->count * panels(j->in), grad_panels, j);
    mha_status st = MHA_OK;
    for (int o = 0; o < j->count && st == MHA_OK; o++) {
        if (*output_finite(j, o)) continue;
        mha__batched dy = {j->dy[o], j->rows * j->dy[o].rs}, x = {j->x, j->rows * j->x.rs};
        st = mha__weight_grad(ctx, k->f32, 1, j->rows, &dy, &x, j->outs[o].out, j->in, j->outs[o].dw,
                              j->first && j->outs[o].overwrite);
    }
    return st;
}

/* Each output on its own through the FMA path's mha__weight_grad. */
static mha_status grads_by_fma(mha_ctx *ctx, const mha__isa_kernels *k, int64_t N, int64_t T, int count,
                               const mha__grad_output *outs, const mha__batched *x, int64_t in)
{
    mha_status st = MHA_OK;
    for (int o = 0; o < count && st == MHA_OK; o++)
        st = mha__weight_grad(ctx, k->f32, N, T, outs[o].dy, x, outs[o].out, in, outs[o].dw, outs[o].overwrite);
    return st;
}

mha_status mha__weight_grads_split(mha_ctx *ctx, const mha__isa_kernels *k, int64_t N, int64_t T, int count,
                                   const mha__grad_output *outs, const mha__batched *x, int64_t in)
{
    if (count < 1 || count > MHA_SPLIT_OUTPUTS) return MHA_ERR_INTERNAL;
    bool tiles_fit = N * T >= MIN_ROWS && sixteen_side_by_side(&x->m), follow = mha__batch_rows_follow(T, x);
    for (int o = 0; o < count; o++) {
        tiles_fit &= sixteen_side_by_side(&outs[o].dy->m);
        follow &= mha__batch_rows_follow(T, outs[o].dy);
    }
    if (!tiles_fit) return grads_by_fma(ctx, k, N, T, count, outs, x, in);
    grad_job j = {.bk = k->bf16, .outs = outs, .count = count, .in = in};
    int64_t top = mha__ws_top(ctx), tiles;
    grad_tile_count(count, outs, in, &tiles); /* the plan checked it */
    for (int o = 0; o < count; o++) j.first_tile[o + 1] = j.first_tile[o] + 2 * row_pairs(outs[o].out);
    j.tiles = mha__ws_take(ctx, tiles * grad_run() * (int64_t)sizeof(uint16_t));
    j.finite = mha__ws_take(ctx, tiles + count);
    if (!j.tiles || !j.finite) return MHA_ERR_INTERNAL; /* the plan sized it */
    if (follow) T *= N, N = 1;                          /* as mha__weight_grad */
    mha_status st = MHA_OK;
    for (int64_t n = 0; n < N && st == MHA_OK; n++)
        for (int64_t r0 = 0; r0 < T && st == MHA_OK; r0 += GRAD_BLOCKS * MHA_SPLIT_K) {
            j.rows = mha__min64(T - r0, GRAD_BLOCKS * MHA_SPLIT_K);
            for (int o = 0; o < count; o++) {
                j.dy[o] = outs[o].dy->m;
                j.dy[o].data += n * outs[o].dy->batch_stride + r0 * j.dy[o].rs;
            }
            j.x = x->m;
            j.x.data += n * x->batch_stride + r0 * x->m.rs;
            j.first = n == 0 && r0 == 0;
            st = grad_chunk(ctx, k, &j);
        }
    mha__ws_release(ctx, top);
    return st;
}

mha_status mha__weight_grad_split(mha_ctx *ctx, const mha__isa_kernels *k, int64_t N, int64_t T, const mha__batched *dy,
                                  const mha__batched *x, int64_t out, int64_t in, float *dw, bool overwrite)
{
    mha__grad_output one = {dy, out, dw, overwrite};
    return mha__weight_grads_split(ctx, k, N, T, 1, &one, x, in);
}
