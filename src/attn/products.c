/*
 * products.c -- the forward's three block operations, once per dtype,
 * and the split-K driver's two row operations, once per cache dtype:
 *
 *   float32  the micro-kernel's tile reads K's rows in place as the
 *            broadcast operand and P^T through its strides;
 *   bf16     K, V and P are rounded into the pair layouts the bf16 tile
 *            reads (kernels.h), (scale Q)^T is packed in pairs once per
 *            item; odd dimensions are padded with 0.  Softmax work stays
 *            float32 either way.
 */
#include "attn/products.h"
#include "core/convert.h"

static int64_t even(int64_t n) { return n + (n & 1); }

/* Slots of a thread's cache of a kv head's key tiles, slot_bytes each:
 * one per key tile, when they fit in the bytes products.h allows for this
 * L2; else none. */
static int64_t cache_slots(const mha__attn_plan *p, int64_t slot_bytes)
{
    int64_t tiles = (p->S + MHA__BC - 1) / MHA__BC, l2 = mha__l2_bytes();
    int64_t most = (l2 >= MHA__VCACHE_LARGE_L2 ? 8 : 2) * l2;
    return tiles <= most / slot_bytes ? tiles : 0;
}

/* Slots of the value-tile cache.  None for the split products, which
 * keep their own (their float32 fallback packs each tile as it comes). */
static int64_t value_slots(const mha__attn_plan *p)
{
    return p->bf16 || p->split ? 0 : cache_slots(p, MHA__BC * p->Dv * (int64_t)sizeof(float));
}

/* Floats that hold n pointers and n int64_t. */
static int64_t tag_floats(int64_t n)
{
    return n * (int64_t)((sizeof(const float *) + sizeof(int64_t) + sizeof(float) - 1) / sizeof(float));
}

int64_t mha__split_blocks(int64_t n) { return (n + MHA_SPLIT_K - 1) / MHA_SPLIT_K; }

int64_t mha__split_run(int64_t k_blocks) { return 3 * k_blocks * MHA_SPLIT_TILE; }

/* mha__split_tiles with the filler `fill` (split_pairs_tile's kind with
 * `pairs`, else split_rows_tile's). */
static bool split_tiles_by(mha__split_tile_fn fill, bool pairs, const float *x, int64_t ld, int64_t tiles,
                           int64_t count, int64_t width, uint16_t *dst)
{
    int64_t kb = mha__split_blocks(width), run = mha__split_run(kb);
    bool finite = true;
    for (int64_t i = 0; i < tiles; i++) {
        int64_t at = i * 16, lanes = count - at < 16 ? (count - at > 0 ? count - at : 0) : 16;
        for (int64_t b = 0; b < kb; b++) {
            int64_t d0 = b * MHA_SPLIT_K, k = width - d0 < MHA_SPLIT_K ? width - d0 : MHA_SPLIT_K;
            uint16_t *tile = dst + i * run + b * 3 * MHA_SPLIT_TILE;
            finite &= pairs ? fill(x + d0 * ld + at, ld, k, lanes, tile)
                            : fill(lanes ? x + at * ld + d0 : NULL, ld, lanes, k, tile);
        }
    }
    return finite;
}

bool mha__split_tiles(const mha__bf16_kernels *bk, bool pairs, const float *x, int64_t ld, int64_t tiles, int64_t count,
                      int64_t width, uint16_t *dst)
{
    return split_tiles_by(pairs ? bk->split_pairs_tile : bk->split_rows_tile, pairs, x, ld, tiles, count, width, dst);
}

bool mha__split_tiles_near(const mha__bf16_kernels *bk, bool pairs, const float *x, int64_t ld, int64_t tiles,
                           int64_t count, int64_t width, uint16_t *dst)
{
    return split_tiles_by(pairs ? bk->split_near_pairs_tile : bk->split_near_rows_tile, pairs, x, ld, tiles, count,
                          width, dst);
}

mha__split_sizes mha__split_sizes_of(const mha__attn_plan *p)
{
    if (!p->split) return (mha__split_sizes){0};
    mha__split_sizes z;
    z.q = MHA__BR / 16 * mha__split_run(mha__split_blocks(p->D));
    z.p = 2 * 2 * mha__split_run(MHA__BC / MHA_SPLIT_K); /* two panels (products_split.c) */
    z.k = MHA__BC / 16 * mha__split_run(mha__split_blocks(p->D));
    z.v = p->Dv / 16 * mha__split_run(MHA__BC / MHA_SPLIT_K);
    z.slots = cache_slots(p, (z.k + z.v) * (int64_t)sizeof(uint16_t));
    return z;
}

/* Floats that hold n split tags. */
static int64_t split_tag_floats(int64_t n) { return n * (int64_t)((sizeof(mha__split_tag) + 3) / 4); }

/* Carving a slice into the tiles: each array 16 floats aligned from
 * the slice's start.  With no slice (base NULL) it only counts, so the
 * size a plan asks for and the carving are one piece of code. */
typedef struct carver {
    float *base;
    int64_t at; /* floats carved so far */
} carver;

static void *carve(carver *c, int64_t n)
{
    float *start = c->base ? c->base + c->at : NULL;
    c->at += (n + 15) / 16 * 16;
    return start;
}

static mha__tiles carve_tiles(const mha__attn_plan *p, carver *c)
{
    mha__tiles t;
    t.next_keys.at = NULL; /* nothing to fetch until a driver says */
    t.qt = carve(c, p->D * MHA__BR);
    t.vt = carve(c, MHA__BC * p->Dv);
    t.vp = carve(c, MHA__BC * p->Dv);
    t.kq = carve(c, MHA__BC * p->D);
    t.st = carve(c, MHA__BC * MHA__LDS);
    t.o = carve(c, MHA__BR * p->Dv);
    t.max = carve(c, MHA__BR);
    t.sum = carve(c, MHA__BR);
    t.scale = carve(c, MHA__BR);
    t.k16 = carve(c, MHA__BC * even(p->D) / 2);
    t.p16 = carve(c, MHA__BR * MHA__BC / 2);
    t.p16_sum = carve(c, p->bf16 ? MHA__BR : 0);
    t.vslots = value_slots(p);
    t.vcache = carve(c, t.vslots * MHA__BC * p->Dv);
    t.vtag = carve(c, tag_floats(t.vslots));
    t.vcols = t.vtag ? (int64_t *)(void *)(t.vtag + t.vslots) : NULL;
    mha__split_sizes z = mha__split_sizes_of(p); /* even counts: whole floats */
    t.qs = carve(c, z.q / 2);
    t.ps = carve(c, z.p / 2);
    t.ks = carve(c, z.k / 2);
    t.vs = carve(c, z.v / 2);
    t.sslots = z.slots;
    t.split_cache = carve(c, z.slots * (z.k + z.v) / 2);
    t.split_ktag = carve(c, split_tag_floats(t.sslots));
    t.split_vtag = carve(c, split_tag_floats(t.sslots));
    t.qs_finite = carve(c, 1);
    t.qd = carve(c, p->bf16 ? 0 : 2 * p->D * MHA__BR);
    t.qd_row = NULL;
    return t;
}

void mha__rescale_rows(const mha__kernels *kt, float *o, int64_t dv, int64_t rows, const float *scale)
{
    for (int64_t r = 0; r < rows; r++)
        if (scale[r] != 1.0f) kt->scale(o + r * dv, dv, scale[r]);
}

int64_t mha__tiles_floats(const mha__attn_plan *p)
{
    carver c = {NULL, 0};
    carve_tiles(p, &c);
    return c.at;
}

mha__tiles mha__tiles_carve(const mha__attn_plan *p, float *slice)
{
    carver c = {slice, 0};
    return carve_tiles(p, &c);
}

void mha__tiles_forget_values(const mha__tiles *t)
{
    for (int64_t s = 0; s < t->vslots; s++) t->vtag[s] = NULL;
    for (int64_t s = 0; s < t->sslots; s++) t->split_ktag[s].rows = t->split_vtag[s].rows = NULL;
}

/* ---------------------------------------------------------------- */
/* float32                                                           */
/* ---------------------------------------------------------------- */

void mha__pack_columns(const mha__kernels *kt, float *dst, int64_t ldd, mha__strided x, int64_t rows, int64_t cols,
                       float alpha)
{
    if (x.cs == 1) {
        kt->transpose_scaled(dst, ldd, x.data, x.rs, rows, cols, alpha);
        return;
    }
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) dst[c * ldd + r] = alpha * x.data[r * x.rs + c * x.cs];
}

/* Scaling the queries once, as nn.MultiheadAttention does, saves a pass
 * over every score tile. */
static void pack_queries_f32(const mha__attn_plan *p, mha__strided q, int64_t rows, const mha__tiles *t)
{
    mha__pack_columns(p->kt, t->qt, MHA__BR, q, rows, p->D, p->scale);
}

int64_t mha__strip_reach(const mha__tiles *t, int64_t r, int64_t n) { return n > 0 ? t->reach[r + n - 1] : 0; }

/* Row `row` of f brought into L2: every cache line it touches. */
static void fetch_row(const mha__fetch_rows *f, int64_t row)
{
    const char *first = (const char *)(f->at + row * f->ld);
    uintptr_t line = (uintptr_t)first & ~(uintptr_t)63, end = (uintptr_t)(first + f->width * (int64_t)sizeof(float));
    for (; line < end; line += 64) __builtin_prefetch((const void *)line, 0, 2); /* prefetcht1: into L2 */
}

/* Blocks of keys that no row of a strip sees (above a causal diagonal)
 * are not computed but zeroed: the contract masks them, and the check
 * for large scores then passes over them as it should.  The fetches
 * are spread evenly over the micro-kernel's calls, a few rows each: all
 * at once, they would queue behind each other in the miss buffers. */
static void scores_f32(const mha__attn_plan *p, mha__strided k, int64_t rows, int64_t cols, int64_t tile,
                       const mha__tiles *t)
{
    (void)tile;
    const mha__kernels *kt = p->kt;
    int64_t blocks = (cols + kt->mr - 1) / kt->mr, calls = (rows + kt->nr - 1) / kt->nr * blocks;
    /* fetch / calls rows a call, by a running count (no division a call) */
    int64_t fetch = t->next_keys.at ? t->next_keys.rows : 0, due = 0, fetched = 0;
    for (int64_t r = 0; r < rows; r += kt->nr) {
        int64_t n = rows - r < kt->nr ? rows - r : kt->nr, seen = mha__strip_reach(t, r, n);
        for (int64_t c = 0; c < cols; c += kt->mr) {
            int64_t m = cols - c < kt->mr ? cols - c : kt->mr;
            for (due += fetch; due >= calls; due -= calls) fetch_row(&t->next_keys, fetched++);
            float *s = t->st + c * MHA__LDS + r;
            if (c < seen) kt->gemm_tile(m, n, p->D, k.data + c * k.rs, k.rs, k.cs, t->qt + r, MHA__BR, s, MHA__LDS, 0);
            else
                for (int64_t x = 0; x < m; x++) memset(s + x * MHA__LDS, 0, (size_t)n * sizeof(float));
        }
    }
}

/* The value tile in column panels of nr (the last one narrower):
 * columns [c, c + w) of row j at vp + c * cols + j * w.  Row by row,
 * so V is read in order, as the prefetcher likes it. */
static void pack_values(const mha__attn_plan *p, mha__strided v, int64_t cols, int64_t nr, float *vp)
{
    for (int64_t j = 0; j < cols; j++)
        for (int64_t c = 0; c < p->Dv; c += nr) {
            int64_t w = p->Dv - c < nr ? p->Dv - c : nr, x = 0;
            const float *src = v.data + j * v.rs + c * v.cs;
            float *dst = vp + c * cols + j * w;
            if (v.cs == 1) /* fixed-size copies compile to moves; a libc call per row cost 5% */
                for (; x + 8 <= w; x += 8) memcpy(dst + x, src + x, 8 * sizeof(float));
            for (; x < w; x++) dst[x] = src[x * v.cs];
        }
}

int64_t mha__cached_tile_keys(const mha__attn_plan *p, int64_t tile)
{
    return mha__min64(MHA__BC, p->S - tile * MHA__BC);
}

/* Key tile `tile`'s values packed: from the thread's cache, packed into
 * it first (the whole tile) if the slot holds other rows; t->vp when not
 * cached.  *packed: the keys packed, which set the panels' stride. */
static const float *value_panels(const mha__attn_plan *p, mha__strided v, int64_t cols, int64_t tile,
                                 const mha__tiles *t, int64_t *packed)
{
    if (tile < 0 || tile >= t->vslots) {
        pack_values(p, v, cols, p->kt->nr, t->vp);
        *packed = cols;
        return t->vp;
    }
    float *slot = t->vcache + tile * MHA__BC * p->Dv;
    if (t->vtag[tile] != v.data || t->vcols[tile] < cols) {
        int64_t whole = mha__cached_tile_keys(p, tile);
        pack_values(p, v, whole, p->kt->nr, slot);
        t->vtag[tile] = v.data;
        t->vcols[tile] = whole;
    }
    *packed = t->vcols[tile];
    return slot;
}

static void values_f32(const mha__attn_plan *p, mha__strided v, int64_t rows, int64_t cols, int64_t tile,
                       const mha__tiles *t)
{
    const mha__kernels *kt = p->kt;
    /* Column panels outer: one panel of V (cols x nr) stays in L1 while
     * every row strip of P passes over it -- packed.  In place, V's rows
     * (256 bytes apart at Dv = 64) fall into a quarter of L1's sets, as
     * P's columns did before the score tile was padded (MHA__LDS), and
     * the two evicted each other: the panel came from L2 again for every
     * strip.  Packed, its rows spread over all sets: 33% fewer L1 misses
     * (cachegrind), the core 4-5% faster (docs/PERFORMANCE.md). */
    int64_t packed;
    const float *vp = value_panels(p, v, cols, tile, t, &packed);
    for (int64_t c = 0; c < p->Dv; c += kt->nr) {
        int64_t n = p->Dv - c < kt->nr ? p->Dv - c : kt->nr;
        const float *panel = vp + c * packed;
        for (int64_t r = 0; r < rows; r += kt->mr) {
            /* The strip's probabilities past its reach are 0: adding
             * their products would leave each output's bits as they are
             * (V finite), so the keys stop there. */
            int64_t m = rows - r < kt->mr ? rows - r : kt->mr, keys = mha__strip_reach(t, r, m);
            if (keys > 0) kt->gemm_tile(m, n, keys, t->st + r, 1, MHA__LDS, panel, n, t->o + r * p->Dv + c, p->Dv, 1);
        }
    }
}

const mha__products mha__products_f32 = {pack_queries_f32, scores_f32, values_f32, NULL, NULL, false};

/* ---------------------------------------------------------------- */
/* bf16                                                              */
/* ---------------------------------------------------------------- */

/* Pairs of dimensions: element (c, r) at (c / 2) * 2 BR + 2 r + c % 2. */
static void pack_queries_bf16(const mha__attn_plan *p, mha__strided q, int64_t rows, const mha__tiles *t)
{
    uint16_t *qt16 = (uint16_t *)t->qt;
    int64_t D = p->D;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t c = 0; c < D; c++)
            qt16[(c / 2) * 2 * MHA__BR + 2 * r + c % 2] = mha__f32_to_bf16(q.data[r * q.rs + c * q.cs] * p->scale);
        if (D & 1) qt16[(D / 2) * 2 * MHA__BR + 2 * r + 1] = 0;
    }
}

/* The key rows rounded and padded to an even width, times (scale Q)^T. */
static void scores_bf16(const mha__attn_plan *p, mha__strided k, int64_t rows, int64_t cols, int64_t tile,
                        const mha__tiles *t)
{
    (void)tile;
    int64_t D = p->D, De = even(D);
    for (int64_t c = 0; c < cols; c++) {
        if (k.cs == 1) {
            p->bk->round(t->k16 + c * De, k.data + c * k.rs, D);
        } else {
            for (int64_t d = 0; d < D; d++) t->k16[c * De + d] = mha__f32_to_bf16(k.data[c * k.rs + d * k.cs]);
        }
        if (D & 1) t->k16[c * De + D] = 0;
    }
    p->bk->gemm(cols, rows, De, t->k16, De, 2, (const uint16_t *)t->qt, 2 * MHA__BR, t->st, MHA__LDS, 0);
}

/* P (key-major, as softmax_step left it) turned into a row of keys per
 * query and rounded: the A operand in rows (a_ps = 2), as AMX loads it
 * whole.  Pairs of V's rows interleaved and rounded: the B operand.  Both
 * padded to an even number of keys. */
static void values_bf16(const mha__attn_plan *p, mha__strided v, int64_t rows, int64_t cols, int64_t tile,
                        const mha__tiles *t)
{
    (void)tile; /* the pairs are rounded per tile: no cache (products.h) */
    const mha__bf16_kernels *bk = p->bk;
    int64_t Dv = p->Dv, ce = even(cols);
    uint16_t *v16 = (uint16_t *)t->vt, *p16 = t->p16;
    bk->transpose(p16, ce, t->st, MHA__LDS, rows, cols);
    bk->row_sums(p16, ce, rows, cols, t->p16_sum);
    if (cols & 1)
        for (int64_t r = 0; r < rows; r++) p16[r * ce + cols] = 0;
    for (int64_t c = 0; c < cols; c += 2) {
        if (v.cs == 1) {
            bk->pairs(v16 + (c / 2) * 2 * Dv, v.data + c * v.rs, c + 1 < cols ? v.data + (c + 1) * v.rs : NULL, Dv);
            continue;
        }
        for (int64_t d = 0; d < Dv; d++) {
            v16[(c / 2) * 2 * Dv + 2 * d] = mha__f32_to_bf16(v.data[c * v.rs + d * v.cs]);
            v16[(c / 2) * 2 * Dv + 2 * d + 1] = c + 1 < cols ? mha__f32_to_bf16(v.data[(c + 1) * v.rs + d * v.cs]) : 0;
        }
    }
    bk->gemm(rows, Dv, ce, p16, ce, 2, v16, 2 * Dv, t->o, Dv, 1);
}

const mha__products mha__products_bf16 = {pack_queries_bf16, scores_bf16, values_bf16, NULL, NULL, false};

/* ---------------------------------------------------------------- */
/* Cached rows for split-K, float32 or bf16                          */
/* ---------------------------------------------------------------- */

/* Each dtype's rows: the rows at once where the kernels can, prefetching
 * where the plan says the cache is far (kv_rows_far). */
static void dot_f32(const mha__attn_plan *p, const void *k, const float *scale, int64_t at, int64_t ld, int64_t n,
                    int rows, const float *const *q, float *const *s)
{
    (void)scale;
    const float *kr = (const float *)k + at;
    mha__dot_rows_multi_fn multi = p->kv_far ? p->kt->dot_rows_multi_far : p->kt->dot_rows_multi;
    if (multi) {
        multi(kr, ld, n, rows, q, p->D, s);
        return;
    }
    for (int r = 0; r < rows; r++) (p->kv_far ? p->kt->dot_rows_far : p->kt->dot_rows)(kr, ld, n, q[r], p->D, s[r]);
}

static void axpy_f32(const mha__attn_plan *p, int rows, const float *const *pr, const void *v, const float *scale,
                     int64_t at, int64_t ld, int64_t n, float *const *o)
{
    (void)scale;
    const float *vr = (const float *)v + at;
    mha__axpy_rows_multi_fn multi = p->kv_far ? p->kt->axpy_rows_multi_far : p->kt->axpy_rows_multi;
    if (multi) {
        multi(rows, pr, vr, ld, n, p->Dv, o);
        return;
    }
    for (int r = 0; r < rows; r++) (p->kv_far ? p->kt->axpy_rows_far : p->kt->axpy_rows)(pr[r], vr, ld, n, p->Dv, o[r]);
}

static void dot_bf16(const mha__attn_plan *p, const void *k, const float *scale, int64_t at, int64_t ld, int64_t n,
                     int rows, const float *const *q, float *const *s)
{
    (void)scale;
    const uint16_t *kr = (const uint16_t *)k + at;
    mha__dot_rows_bf16_multi_fn multi = p->kv_far ? p->bk->dot_rows_multi_far : p->bk->dot_rows_multi;
    if (multi) {
        multi(kr, ld, n, rows, q, p->D, s);
        return;
    }
    for (int r = 0; r < rows; r++) (p->kv_far ? p->bk->dot_rows_far : p->bk->dot_rows)(kr, ld, n, q[r], p->D, s[r]);
}

static void axpy_bf16(const mha__attn_plan *p, int rows, const float *const *pr, const void *v, const float *scale,
                      int64_t at, int64_t ld, int64_t n, float *const *o)
{
    (void)scale;
    const uint16_t *vr = (const uint16_t *)v + at;
    mha__axpy_rows_bf16_multi_fn multi = p->kv_far ? p->bk->axpy_rows_multi_far : p->bk->axpy_rows_multi;
    if (multi) {
        multi(rows, pr, vr, ld, n, p->Dv, o);
        return;
    }
    for (int r = 0; r < rows; r++) (p->kv_far ? p->bk->axpy_rows_far : p->bk->axpy_rows)(pr[r], vr, ld, n, p->Dv, o[r]);
}

static void dot_i8(const mha__attn_plan *p, const void *k, const float *scale, int64_t at, int64_t ld, int64_t n,
                   int rows, const float *const *q, float *const *s)
{
    const int8_t *kr = (const int8_t *)k + at;
    mha__dot_rows_i8_multi_fn multi = p->kv_far ? p->kt->dot_rows_i8_multi_far : p->kt->dot_rows_i8_multi;
    if (multi) {
        multi(kr, ld, n, scale, rows, q, p->D, s);
        return;
    }
    for (int r = 0; r < rows; r++)
        (p->kv_far ? p->kt->dot_rows_i8_far : p->kt->dot_rows_i8)(kr, ld, n, scale, q[r], p->D, s[r]);
}

static void axpy_i8(const mha__attn_plan *p, int rows, const float *const *pr, const void *v, const float *scale,
                    int64_t at, int64_t ld, int64_t n, float *const *o)
{
    const int8_t *vr = (const int8_t *)v + at;
    mha__axpy_rows_i8_multi_fn multi = p->kv_far ? p->kt->axpy_rows_i8_multi_far : p->kt->axpy_rows_i8_multi;
    if (multi) {
        multi(rows, pr, scale, vr, ld, n, p->Dv, o);
        return;
    }
    for (int r = 0; r < rows; r++)
        (p->kv_far ? p->kt->axpy_rows_i8_far : p->kt->axpy_rows_i8)(pr[r], scale, vr, ld, n, p->Dv, o[r]);
}

void mha__kv_rows_widen(const mha__kv_view *kv, bool values, int64_t b, int64_t g, int64_t j0, int64_t n, int64_t width,
                        float *dst, int64_t ld, int64_t inc)
{
    const void *base = values ? kv->v : kv->k;
    const float *scales = values ? kv->v_scale : kv->k_scale;
    for (int64_t j = 0; j < n; j++) {
        int64_t at = b * kv->stride[0] + g * kv->stride[1] + (j0 + j) * kv->stride[2];
        float *row = dst + j * ld;
        if (kv->dtype == MHA_DTYPE_BF16)
            for (int64_t c = 0; c < width; c++) row[c * inc] = mha__bf16_to_f32(((const uint16_t *)base)[at + c]);
        else if (kv->dtype == MHA_DTYPE_I8) {
            float scale = scales[b * kv->scale_stride[0] + g * kv->scale_stride[1] + j0 + j];
            for (int64_t c = 0; c < width; c++) row[c * inc] = scale * (float)((const int8_t *)base)[at + c];
        } else
            for (int64_t c = 0; c < width; c++) row[c * inc] = ((const float *)base)[at + c];
    }
}

const mha__kv_rows *mha__kv_rows_of(mha_dtype dtype)
{
    static const mha__kv_rows f32 = {dot_f32, axpy_f32}, bf16 = {dot_bf16, axpy_bf16}, i8 = {dot_i8, axpy_i8};
    return dtype == MHA_DTYPE_BF16 ? &bf16 : dtype == MHA_DTYPE_I8 ? &i8 : &f32;
}
