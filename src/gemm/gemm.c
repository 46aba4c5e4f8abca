/*
 * gemm.c -- y = x W^T + b for the projections.
 *
 * W is packed once into panels of nr output columns (W^T, in x nr each), so
 * the micro-kernel reads B as contiguous vectors.  Inputs and outputs may be
 * split into column groups (one per head: [H][rows][d]), which lets the
 * layer keep Q, K, V and the head outputs head-major.  The work is a grid of
 * (block of ROW_BLOCK rows) x (range of panels) items; within an item the
 * block's rows (96 x in floats, ~300 KB for in = 768) stay in L2 while the
 * item's panels pass over them, mr rows at a time.  Every output tile is
 * computed by one micro-kernel call per pass over x's columns (all of
 * them, or a few heads' groups: PASS_COLS), passes in order, so the result
 * does not depend on how items are spread over threads.
 */
#include "gemm/gemm.h"

#include "core/convert.h"

#include <string.h>

enum { ROW_BLOCK = 96 };

/* Floats in the pack of a [out, in] weight; false when that overflows. */
static bool packed_floats(int64_t nr, int64_t out, int64_t in, int64_t *n)
{
    int64_t panels = out / nr + (out % nr != 0), cols;
    if (mha__mul(panels, nr, &cols) && mha__mul(cols, in, n)) return true;
    mha__fail(MHA_ERR_INVALID_ARG, "weight of %lld x %lld is too large", (long long)out, (long long)in);
    return false;
}

/* Panels [begin, end) of w's (w NULL: zeros) into data. */
typedef struct pack_job {
    const mha__kernels *kt;
    float *data;
    const float *w;
    int64_t out, in;
} pack_job;

/* Panel p is the transpose of w's rows p nr .. p nr + nr - 1, so the
 * kernels' blocked transpose makes it (times 1: exact, the same bits for
 * every value but a signalling NaN, which comes out quiet); the columns
 * past w's last row are zeros.  One value at a time, reading down w's
 * columns (rows `in` floats apart), the pack took a third of a training
 * step's weight refresh on Sapphire Rapids (docs/PERFORMANCE.md). */
static void pack_panels(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const pack_job *j = arg;
    int64_t nr = j->kt->nr;
    for (int64_t panel = begin; panel < end; panel++) {
        float *dst = j->data + panel * j->in * nr;
        int64_t live = j->w ? mha__max64(0, mha__min64(nr, j->out - panel * nr)) : 0;
        if (live) j->kt->transpose_scaled(dst, nr, j->w + panel * nr * j->in, j->in, live, j->in, 1.0f);
        if (live < nr)
            for (int64_t c = 0; c < j->in; c++) memset(dst + c * nr + live, 0, (size_t)(nr - live) * sizeof(float));
    }
}

/* Fills data with w's panels (w NULL: zeros) on ctx's threads (NULL:
 * this one) and describes them.  Each panel's values are moved (above),
 * not summed: the same pack whatever the threads. */
static mha__packed pack_into(mha_ctx *ctx, const mha__kernels *kt, float *data, const float *w, int64_t out, int64_t in)
{
    pack_job job = {kt, data, w, out, in};
    int64_t nr = kt->nr, panels = (out + nr - 1) / nr;
    if (ctx) mha__parallel_for(ctx, panels, pack_panels, &job);
    else pack_panels(&job, 0, 0, panels);
    return (mha__packed){data, out, in, nr, nr, in * nr};
}

/* Memory for p's panels of an [out, in] pack in *data: p's own when the
 * shape is the same (a training step that repacks its weights allocates
 * nothing), else a new allocation, p's old one freed.  On an error p is
 * untouched: INVALID_ARG (too large), NOMEM. */
static mha_status panels_memory(mha__packed *p, const mha__kernels *kt, int64_t out, int64_t in, float **data)
{
    int64_t n;
    if (!packed_floats(kt->nr, out, in, &n)) return MHA_ERR_INVALID_ARG;
    if (p->data && p->out == out && p->in == in && p->nr == kt->nr) {
        *data = p->data;
        return MHA_OK;
    }
    if (!(*data = mha__alloc(n, sizeof(float)))) return MHA_ERR_NOMEM;
    mha__packed_free(p);
    return MHA_OK;
}

mha_status mha__pack(mha_ctx *ctx, mha__packed *p, const mha__kernels *kt, const float *w, int64_t out, int64_t in)
{
    float *data;
    mha_status st = panels_memory(p, kt, out, in, &data);
    if (st == MHA_OK) *p = pack_into(ctx, kt, data, w, out, in);
    return st;
}

bool mha__pack_workspace(const mha__kernels *kt, int64_t out, int64_t in, int64_t *bytes)
{
    int64_t n;
    return packed_floats(kt->nr, out, in, &n) && n <= INT64_MAX / (int64_t)sizeof(float) &&
           mha__ws_add(bytes, n * (int64_t)sizeof(float), "a packed weight");
}

mha_status mha__pack_workspace_take(mha_ctx *ctx, const mha__kernels *kt, const float *w, int64_t out, int64_t in,
                                    mha__packed *p)
{
    int64_t n;
    float *data = packed_floats(kt->nr, out, in, &n) ? mha__ws_take(ctx, n * (int64_t)sizeof(float)) : NULL;
    if (!data) return MHA_ERR_INTERNAL; /* the plan sized it */
    *p = pack_into(ctx, kt, data, w, out, in);
    return MHA_OK;
}

/* Packing w [rows, cols] as the B operand of y = x w: panel p holds
 * columns p nr .. p nr + nr - 1 of every row, zero-padded.  Reading w's
 * rows in place instead (ldb = cols) cost half the speed: rows 3 KB apart
 * fall into a few L1 and L2 sets and evict each other. */
typedef struct transpose_job {
    float *data;
    const float *w;
    int64_t rows, cols, nr;
} transpose_job;

static void transpose_range(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const transpose_job *j = arg;
    for (int64_t panel = begin; panel < end; panel++) {
        int64_t c0 = panel * j->nr, n = j->cols - c0 < j->nr ? j->cols - c0 : j->nr;
        for (int64_t r = 0; r < j->rows; r++) {
            float *dst = j->data + (panel * j->rows + r) * j->nr;
            memcpy(dst, j->w + r * j->cols + c0, (size_t)n * sizeof(float));
            memset(dst + n, 0, (size_t)(j->nr - n) * sizeof(float));
        }
    }
}

bool mha__pack_transposed_workspace(const mha__kernels *kt, int64_t rows, int64_t cols, int64_t *bytes)
{
    return mha__pack_workspace(kt, cols, rows, bytes);
}

mha_status mha__pack_transposed_workspace_take(mha_ctx *ctx, const mha__kernels *kt, const float *w, int64_t rows,
                                               int64_t cols, mha__packed *p)
{
    int64_t n;
    float *data = packed_floats(kt->nr, cols, rows, &n) ? mha__ws_take(ctx, n * (int64_t)sizeof(float)) : NULL;
    if (!data) return MHA_ERR_INTERNAL; /* the plan sized it */
    transpose_job job = {data, w, rows, cols, kt->nr};
    mha__parallel_for(ctx, (cols + kt->nr - 1) / kt->nr, transpose_range, &job);
    *p = (mha__packed){data, cols, rows, kt->nr, kt->nr, rows * kt->nr};
    return MHA_OK;
}

mha_status mha__pack_transposed(mha_ctx *ctx, mha__packed *p, const mha__kernels *kt, const float *w, int64_t rows,
                                int64_t cols)
{
    float *data;
    mha_status st = panels_memory(p, kt, cols, rows, &data);
    if (st != MHA_OK) return st;
    transpose_job job = {data, w, rows, cols, kt->nr};
    mha__parallel_for(ctx, (cols + kt->nr - 1) / kt->nr, transpose_range, &job);
    *p = (mha__packed){data, cols, rows, kt->nr, kt->nr, rows * kt->nr};
    return MHA_OK;
}

void mha__unpack(const mha__packed *p, float *w)
{
    for (int64_t o = 0; o < p->out; o++)
        for (int64_t c = 0; c < p->in; c++) w[o * p->in + c] = p->data[((o / p->nr) * p->in + c) * p->nr + o % p->nr];
}

void mha__packed_free(mha__packed *p)
{
    mha__free(p->data);
    p->data = NULL;
}

typedef struct linear_job {
    const mha__kernels *kt;
    int64_t rows;
    mha__mat x;
    const mha__packed *w;
    const float *b;
    mha__mat y;
    int64_t row_blocks, panels, panels_per_item;
    bool add; /* y += x W^T instead of y = x W^T + b */
} linear_job;

/* One copy per row and column group (an item's panels are adjacent
 * columns), where a copy per row and panel (128 bytes each, some 98 000
 * calls in a layer forward at S1) took 1.7% of that forward. */
void mha__fill_rows(const mha__mat *y, const float *b, int64_t r0, int64_t r1, int64_t c0, int64_t c1)
{
    for (int64_t r = r0; r < r1; r++)
        for (int64_t c = c0, run; c < c1; c += run) {
            run = mha__group_run(y, c, c1 - c);
            if (b) memcpy(mha__mat_at(y, r, c), b + c, (size_t)run * sizeof(float));
            else memset(mha__mat_at(y, r, c), 0, (size_t)run * sizeof(float));
        }
}

/* With x in column groups, the columns one pass of tile calls covers:
 * PASS_COLS of them (four heads of 64), in one chain per output (the
 * tile stays in registers across the pass's groups; a call per group
 * took the tile to memory and back every d steps, 8-10% of the time).
 * Not every group at once: the groups lie rows x d floats apart, a
 * multiple of L2's way size, so all of them fall in the same L2 sets,
 * and twelve heads' rows of the block filled twelve of the sixteen ways,
 * leaving too few for the item's panels of W: the rows were fetched
 * again from L3 for every panel.  Four heads leave room. */
enum { PASS_COLS = 256 };

static int64_t pass_cols(const linear_job *j)
{
    int64_t g = j->x.group_cols;
    if (!g) return j->w->in;
    bool whole_groups = j->x.cs == 1 && j->w->in % g == 0; /* as gemm_tile_grouped reads them */
    return !whole_groups || g >= PASS_COLS ? g : PASS_COLS / g * g;
}

/* Rows r .. r + m - 1 of y, columns col0 .. col0 + cols - 1, from panel
 * p of W, over x's columns c0 .. c0 + k - 1 (one pass). */
static void linear_tile(const linear_job *j, int64_t r, int64_t m, int64_t p, int64_t c0, int64_t k)
{
    const mha__kernels *kt = j->kt;
    int64_t col0 = p * kt->nr, cols = j->w->out - col0 < kt->nr ? j->w->out - col0 : kt->nr;
    const float *b = j->w->data + p * j->w->panel_stride + c0 * j->w->ldb;
    float *y = mha__mat_at(&j->y, r, col0);
    int accumulate = j->add || j->b != NULL || c0 > 0;
    if (j->x.group_cols && k > j->x.group_cols)
        kt->gemm_tile_grouped(m, cols, k / j->x.group_cols, j->x.group_cols, mha__mat_at(&j->x, r, c0), j->x.rs,
                              j->x.group_stride, b, j->w->ldb, y, j->y.rs, accumulate);
    else kt->gemm_tile(m, cols, k, mha__mat_at(&j->x, r, c0), j->x.rs, j->x.cs, b, j->w->ldb, y, j->y.rs, accumulate);
}

/* Item (row block, range of panels): every panel of the item passes over
 * the block's rows (96 x in floats, or a pass's groups of them), which
 * stay in L2.  Each output adds one chain per pass, passes in order, so
 * the result does not depend on how items are spread over threads. */
static void linear_item(const linear_job *j, int64_t item)
{
    const mha__kernels *kt = j->kt;
    int64_t rb = item % j->row_blocks, p0 = item / j->row_blocks * j->panels_per_item;
    int64_t p1 = p0 + j->panels_per_item < j->panels ? p0 + j->panels_per_item : j->panels;
    int64_t r0 = rb * ROW_BLOCK, r1 = r0 + ROW_BLOCK < j->rows ? r0 + ROW_BLOCK : j->rows;
    int64_t in = j->w->in, span = pass_cols(j);
    if (j->b) mha__fill_rows(&j->y, j->b, r0, r1, p0 * kt->nr, p1 * kt->nr < j->w->out ? p1 * kt->nr : j->w->out);
    for (int64_t c0 = 0; c0 < in; c0 += span)
        for (int64_t p = p0; p < p1; p++)
            for (int64_t r = r0; r < r1; r += kt->mr)
                linear_tile(j, r, r1 - r < kt->mr ? r1 - r : kt->mr, p, c0, in - c0 < span ? in - c0 : span);
}

static void linear_range(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    for (int64_t item = begin; item < end; item++) linear_item(arg, item);
}

/* Items: row blocks, each split into enough panel ranges that there are
 * about LINEAR_ITEMS items (a function of the shape alone). */
enum { LINEAR_ITEMS = 32 };

static void linear_run(mha_ctx *ctx, linear_job *job)
{
    int64_t splits = (LINEAR_ITEMS + job->row_blocks - 1) / job->row_blocks;
    splits = splits > job->panels ? job->panels : splits;
    job->panels_per_item = (job->panels + splits - 1) / splits;
    int64_t ranges = (job->panels + job->panels_per_item - 1) / job->panels_per_item;
    mha__parallel_items(ctx, job->row_blocks * ranges, linear_range, job);
}

void mha__linear(mha_ctx *ctx, const mha__kernels *kt, int64_t rows, const mha__mat *x, const mha__packed *w,
                 const float *b, const mha__mat *y)
{
    linear_job job = {kt, rows, *x, w, b, *y, (rows + ROW_BLOCK - 1) / ROW_BLOCK, (w->out + kt->nr - 1) / kt->nr,
                      0,  false};
    linear_run(ctx, &job);
}

void mha__linear_add(mha_ctx *ctx, const mha__kernels *kt, int64_t rows, const mha__mat *x, const mha__packed *w,
                     const mha__mat *y)
{
    linear_job job = {kt, rows, *x, w, NULL, *y, (rows + ROW_BLOCK - 1) / ROW_BLOCK, (w->out + kt->nr - 1) / kt->nr,
                      0,  true};
    linear_run(ctx, &job);
}

/* ---------------------------------------------------------------- */
/* Weight gradients                                                  */
/* ---------------------------------------------------------------- */

/* dW [out, in] += sum over batches and rows of dy(r, o) x(r, i), a chunk
 * of GRAD_ROWS rows at a time (crossing batches only where their rows
 * follow one another).  Each chunk is
 * packed first: dy's columns into panels of mr ([rows][mr] each, the A
 * operand read down its columns), x's into panels of nr ([rows][nr], the
 * B operand), both zero-padded; then items of GRAD_OUT x GRAD_IN of dW run
 * every tile over the chunk's rows.  Packed, both operands stream from
 * contiguous memory: read in place, their rows lie a whole activation row
 * apart (3 KB at E = 768), map to a few cache sets and evict each other,
 * which ran the product at half speed.  Each dW element is one chain per
 * chunk added to it, chunks in order, owned by one item: the same bits
 * for any thread count. */
enum { GRAD_OUT = 48, GRAD_IN = 128, GRAD_ROWS = 256 };

typedef struct grad_chunk {
    const mha__kernels *kt;
    int64_t out, in, rows; /* this chunk's rows */
    int64_t out_panels, in_panels;
    mha__mat dy, x; /* moved to the chunk's first row */
    float *a, *b;   /* the packs: [out_panels][rows][mr], [in_panels][rows][nr] */
    float *dw;
    int64_t in_blocks;
    bool zero_first; /* dW's blocks zeroed before this chunk adds to them */
} grad_chunk;

/* The widest panel of any kernel table (avx512's nr). */
enum { MAX_PANEL = 32 };

/* Columns c0 .. c0+n-1 of m (n <= width <= MAX_PANEL), rows r0 .. r1-1,
 * into dst[r * width + c], zeros past n: one copy per row when the
 * columns lie side by side, else column by column (a panel may straddle
 * two column groups; each column's start is found once). */
static void pack_columns(const mha__mat *m, int64_t c0, int64_t n, int64_t r0, int64_t r1, int64_t width, float *dst)
{
    const float *col[MAX_PANEL];
    for (int64_t c = 0; c < n; c++) col[c] = mha__mat_at(m, 0, c0 + c);
    bool side_by_side = m->cs == 1 && col[n - 1] == col[0] + n - 1;
    for (int64_t r = r0; r < r1; r++) {
        float *d = dst + r * width;
        if (side_by_side) { /* fixed-size copies inline; a memcpy call per 24 bytes cost 5% */
            const float *s = col[0] + r * m->rs;
            int64_t c = 0;
            for (; c + 4 <= n; c += 4) memcpy(d + c, s + c, 4 * sizeof(float));
            for (; c < n; c++) d[c] = s[c];
        } else {
            for (int64_t c = 0; c < n; c++) d[c] = col[c][r * m->rs];
        }
        for (int64_t c = n; c < width; c++) d[c] = 0.0f;
    }
}

/* Rows per packing item: every panel of dy and x takes the item's rows,
 * so each activation row is read once, in order.  Panel by panel, each
 * panel read its 128 bytes of every row, rows 3 KB apart. */
enum { PACK_ROWS = 16 };

static void grad_pack_range(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const grad_chunk *j = arg;
    int64_t mr = j->kt->mr, nr = j->kt->nr;
    int64_t r0 = begin * PACK_ROWS, r1 = end * PACK_ROWS < j->rows ? end * PACK_ROWS : j->rows;
    for (int64_t panel = 0; panel < j->out_panels; panel++) {
        int64_t o = panel * mr;
        pack_columns(&j->dy, o, j->out - o < mr ? j->out - o : mr, r0, r1, mr, j->a + panel * j->rows * mr);
    }
    for (int64_t p = 0; p < j->in_panels; p++) {
        int64_t i = p * nr;
        pack_columns(&j->x, i, j->in - i < nr ? j->in - i : nr, r0, r1, nr, j->b + p * j->rows * nr);
    }
}

static void grad_tile_range(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const grad_chunk *j = arg;
    const mha__kernels *kt = j->kt;
    int64_t mr = kt->mr, nr = kt->nr, rows = j->rows;
    for (int64_t item = begin; item < end; item++) {
        int64_t o0 = (item / j->in_blocks) * GRAD_OUT, i0 = (item % j->in_blocks) * GRAD_IN;
        int64_t o1 = o0 + GRAD_OUT < j->out ? o0 + GRAD_OUT : j->out, i1 = i0 + GRAD_IN < j->in ? i0 + GRAD_IN : j->in;
        for (int64_t o = o0; j->zero_first && o < o1; o++)
            memset(j->dw + o * j->in + i0, 0, (size_t)(i1 - i0) * sizeof(float));
        for (int64_t o = o0; o < o1; o += mr)
            for (int64_t i = i0; i < i1; i += nr)
                kt->gemm_tile(o1 - o < mr ? o1 - o : mr, i1 - i < nr ? i1 - i : nr, rows, j->a + (o / mr) * rows * mr,
                              1, mr, j->b + (i / nr) * rows * nr, nr, j->dw + o * j->in + i, j->in, 1);
    }
}

static int64_t grad_pack_floats(const mha__kernels *kt, int64_t out, int64_t in)
{
    return GRAD_ROWS * ((out + kt->mr - 1) / kt->mr * kt->mr + (in + kt->nr - 1) / kt->nr * kt->nr);
}

bool mha__weight_grad_workspace(const mha__kernels *kt, int64_t out, int64_t in, int64_t *bytes)
{
    if (out > INT64_MAX / 64 / GRAD_ROWS || in > INT64_MAX / 64 / GRAD_ROWS) {
        mha__fail(MHA_ERR_INVALID_ARG, "weight of %lld x %lld is too large", (long long)out, (long long)in);
        return false;
    }
    return mha__ws_add(bytes, grad_pack_floats(kt, out, in) * (int64_t)sizeof(float), "a weight gradient's packs");
}

mha_status mha__weight_grad(mha_ctx *ctx, const mha__kernels *kt, int64_t N, int64_t T, const mha__batched *dy,
                            const mha__batched *x, int64_t out, int64_t in, float *dw, bool overwrite)
{
    int64_t top = mha__ws_top(ctx), out_panels = (out + kt->mr - 1) / kt->mr;
    float *a = mha__ws_take(ctx, grad_pack_floats(kt, out, in) * (int64_t)sizeof(float));
    if (!a) return MHA_ERR_INTERNAL; /* the plan sized it */
    grad_chunk j = {kt,         out,
                    in,         0,
                    out_panels, (in + kt->nr - 1) / kt->nr,
                    dy->m,      x->m,
                    a,          a + GRAD_ROWS * out_panels * kt->mr,
                    dw,         (in + GRAD_IN - 1) / GRAD_IN,
                    false};
    /* Batches whose rows follow one another are one run of rows: at S1's
     * T = 128 a chunk of GRAD_ROWS then spans two batches, and dW is read
     * and written half as often (each chunk passes it through L3: 2.3 MB
     * at E = 768). */
    if (mha__batch_rows_follow(T, dy) && mha__batch_rows_follow(T, x)) T *= N, N = 1;
    if (overwrite && (N < 1 || T < 1)) memset(dw, 0, (size_t)(out * in) * sizeof(float)); /* no chunk zeroes it */
    for (int64_t n = 0; n < N; n++)
        for (int64_t r0 = 0; r0 < T; r0 += GRAD_ROWS) {
            j.rows = T - r0 < GRAD_ROWS ? T - r0 : GRAD_ROWS;
            j.zero_first = overwrite && n == 0 && r0 == 0;
            j.dy.data = dy->m.data + n * dy->batch_stride + r0 * dy->m.rs;
            j.x.data = x->m.data + n * x->batch_stride + r0 * x->m.rs;
            mha__parallel_for(ctx, (j.rows + PACK_ROWS - 1) / PACK_ROWS, grad_pack_range, &j);
            mha__parallel_for(ctx, ((out + GRAD_OUT - 1) / GRAD_OUT) * j.in_blocks, grad_tile_range, &j);
        }
    mha__ws_release(ctx, top);
    return MHA_OK;
}

typedef struct colsum_job {
    const mha__kernels *kt;
    int64_t N, T, cols;
    mha__batched y;
    float *sums;
} colsum_job;

enum { SUM_COLS = 64 };

/* sums[i] += column i of a run of T rows, row by row: the kernel's
 * column_sums where the run's columns lie side by side, else one column
 * after another (the same additions in the same order, so the same bits). */
static void sum_run(const mha__kernels *kt, const float *at, int64_t rs, int64_t cs, int64_t T, int64_t run,
                    float *sums)
{
    if (cs == 1) {
        kt->column_sums(at, rs, T, run, sums);
        return;
    }
    for (int64_t i = 0; i < run; i++) {
        float acc = sums[i];
        for (int64_t r = 0; r < T; r++) acc += at[r * rs + i * cs];
        sums[i] = acc;
    }
}

static void colsum_range(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const colsum_job *j = arg;
    for (int64_t item = begin; item < end; item++) {
        int64_t c0 = item * SUM_COLS, c1 = c0 + SUM_COLS < j->cols ? c0 + SUM_COLS : j->cols;
        for (int64_t n = 0; n < j->N; n++) {
            mha__mat y = j->y.m;
            y.data += n * j->y.batch_stride;
            for (int64_t c = c0; c < c1;) { /* a run of columns in one group at a time */
                int64_t run = mha__group_run(&y, c, c1 - c);
                sum_run(j->kt, mha__mat_at(&y, 0, c), y.rs, y.cs, j->T, run, j->sums + c);
                c += run;
            }
        }
    }
}

void mha__column_sums(mha_ctx *ctx, const mha__kernels *kt, int64_t N, int64_t T, const mha__batched *y, int64_t cols,
                      float *sums)
{
    colsum_job job = {kt, N, T, cols, *y, sums};
    mha__parallel_for(ctx, (cols + SUM_COLS - 1) / SUM_COLS, colsum_range, &job);
}

/* ---------------------------------------------------------------- */
/* bfloat16                                                          */
/* ---------------------------------------------------------------- */

mha_status mha__pack_bf16(mha__packed_bf16 *p, const float *w, int64_t out, int64_t in)
{
    int64_t nr = MHA_BF16_NR, panels = (out + nr - 1) / nr, in_even = in + (in & 1), n;
    if (!mha__mul(panels * nr, in_even, &n))
        return mha__fail(MHA_ERR_INVALID_ARG, "weight of %lld x %lld is too large", (long long)out, (long long)in);
    uint16_t *data = mha__alloc(n, sizeof(uint16_t));
    if (!data) return MHA_ERR_NOMEM;
    for (int64_t panel = 0; panel < panels; panel++)
        for (int64_t c = 0; c < in_even; c++)
            for (int64_t j = 0; j < nr; j++) {
                int64_t o = panel * nr + j;
                float v = o < out && c < in && w ? w[o * in + c] : 0.0f;
                data[panel * in_even * nr + (c / 2) * 2 * nr + 2 * j + c % 2] = mha__f32_to_bf16(v);
            }
    mha__free(p->data);
    *p = (mha__packed_bf16){data, out, in, in_even};
    return MHA_OK;
}

void mha__packed_bf16_free(mha__packed_bf16 *p)
{
    mha__free(p->data);
    p->data = NULL;
}

typedef struct round_job {
    const mha__bf16_kernels *bk;
    const mha__mat *x;
    int64_t in, in_even;
    uint16_t *xb;
} round_job;

/* Rows of x rounded to bf16, padded to an even width; each group of
 * contiguous columns in one vector call. */
static void round_rows(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const round_job *j = arg;
    int64_t group = j->x->group_cols ? j->x->group_cols : j->in;
    for (int64_t r = begin; r < end; r++) {
        uint16_t *dst = j->xb + r * j->in_even;
        for (int64_t c0 = 0; c0 < j->in; c0 += group) {
            int64_t n = j->in - c0 < group ? j->in - c0 : group;
            if (j->x->cs == 1) {
                j->bk->round(dst + c0, mha__mat_at(j->x, r, c0), n);
            } else {
                for (int64_t c = c0; c < c0 + n; c++) dst[c] = mha__f32_to_bf16(*mha__mat_at(j->x, r, c));
            }
        }
        if (j->in_even > j->in) dst[j->in] = 0;
    }
}

typedef struct linear_bf16_job {
    mha__gemm_bf16_fn gemm;
    int64_t rows;
    const uint16_t *xb;
    const mha__packed_bf16 *w;
    const float *b;
    mha__mat y;
    int64_t row_blocks;
} linear_bf16_job;

static void linear_bf16_range(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const linear_bf16_job *j = arg;
    int64_t nr = MHA_BF16_NR, in_even = j->w->in_even;
    for (int64_t item = begin; item < end; item++) {
        int64_t panel = item / j->row_blocks, r0 = (item % j->row_blocks) * ROW_BLOCK;
        int64_t r1 = r0 + ROW_BLOCK < j->rows ? r0 + ROW_BLOCK : j->rows;
        int64_t col0 = panel * nr, cols = j->w->out - col0 < nr ? j->w->out - col0 : nr;
        const uint16_t *b = j->w->data + panel * in_even * nr;
        float *y = mha__mat_at(&j->y, r0, col0);
        if (j->b) mha__fill_rows(&j->y, j->b, r0, r1, col0, col0 + cols);
        j->gemm(r1 - r0, cols, in_even, j->xb + r0 * in_even, in_even, 2, b, 2 * nr, y, j->y.rs, j->b != NULL);
    }
}

bool mha__linear_bf16_workspace(int64_t rows, int64_t in, int64_t *bytes)
{
    int64_t n;
    if (mha__mul(rows, in + (in & 1), &n) && n <= INT64_MAX / (int64_t)sizeof(uint16_t))
        return mha__ws_add(bytes, n * (int64_t)sizeof(uint16_t), "a bf16 product's input");
    mha__fail(MHA_ERR_INVALID_ARG, "bf16 input of %lld rows overflows", (long long)rows);
    return false;
}

mha_status mha__linear_bf16(mha_ctx *ctx, const mha__bf16_kernels *bk, int64_t rows, const mha__mat *x,
                            const mha__packed_bf16 *w, const float *b, const mha__mat *y)
{
    int64_t top = mha__ws_top(ctx);
    uint16_t *xb = mha__ws_take(ctx, rows * w->in_even * (int64_t)sizeof(uint16_t)); /* sized by the plan */
    if (!xb) return MHA_ERR_INTERNAL;
    round_job rj = {bk, x, w->in, w->in_even, xb};
    mha__parallel_for(ctx, rows, round_rows, &rj);
    linear_bf16_job job = {bk->gemm, rows, xb, w, b, *y, (rows + ROW_BLOCK - 1) / ROW_BLOCK};
    mha__parallel_for(ctx, job.row_blocks * ((w->out + MHA_BF16_NR - 1) / MHA_BF16_NR), linear_bf16_range, &job);
    mha__ws_release(ctx, top);
    return MHA_OK;
}
