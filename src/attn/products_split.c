/*
 * products_split.c -- the forward's block products in float32 from split
 * bf16 products on AMX (kernels.h): each operand split into three bf16
 * parts, the six products that float32 accuracy needs accumulated in
 * float32 by the tiles, as the projections do (gemm/split.c).
 *
 *   scores  S^T = K (scale Q)^T: K's tile split into A's row tiles of 16
 *           keys, (scale Q)^T into B's column tiles of 16 queries once
 *           per item, the products stored straight into the score tile;
 *   values  O^T = O^T * scale + V^T P^T (kernels.h's MHA_SPLIT_SCALE_ADD):
 *           V's tile split into A's row tiles of V^T (16 of its
 *           columns), P into B's column tiles of 16 queries straight from
 *           the key-major score tile, where 32 keys are already pairs
 *           down a query's column: no transpose of P.  The item keeps O
 *           transposed (o_transposed, products.h), so no key tile
 *           transposes its product either, and each row's rescale rides
 *           on the add; the driver turns O^T back once an item.
 *
 * Against the float32 table at N = 2048, d = 64 (Sapphire Rapids, two
 * threads): the core 1.07-1.13x, the layer 1.11x; at N = 8192 the core
 * 1.22x (docs/PERFORMANCE.md).  The six products on the tiles take about
 * 60% of the float32 FMA products' time; splitting P every tile costs
 * back 10% of the core.
 *
 * A thread keeps the key and value tiles of the kv head it works on split
 * (its cache, as the float32 table keeps V's packed panels, products.h):
 * its next items on that head use them again.  A tile, query block or P
 * with a value that is not finite goes through the float32 table instead,
 * so infinities and NaN propagate as IEEE products do.
 */
#include "attn/products.h"

#include <math.h>
#include <string.h>

enum { SPLIT_ROWS = 16, PAIR = 32 }; /* rows of a tile; rows (or keys) of a tile pair */
enum { MIN_ROWS = 512 };             /* keys, and query rows (see mha__split_attention) */

/* Not const: the tests lower it to run small problems through the split
 * products (mha__split_attention_min_rows). */
static int64_t min_rows = MIN_ROWS;

static int64_t blocks_of(int64_t n) { return mha__split_blocks(n); }
static int64_t run_of(int64_t k_blocks) { return mha__split_run(k_blocks); }

bool mha__split_attention(const mha__attn_plan *p, const mha__isa_kernels *isa, mha_dtype kv_dtype)
{
    /* Splitting costs a pass over (scale Q)^T per item, over K and V per
     * kv head and thread: under 512 keys, or 512 query rows, it cost more
     * than the products gained (two threads, d = 64: 13% slower with 128
     * keys and rows, 5% with 256, 10% with 192 rows against 4096 keys; 3%
     * faster at 512, 10% at 2048, 22% at 8192; docs/PERFORMANCE.md).  Not
     * the rows per kv head: GQA keeps the bits of MHA with K and V
     * repeated.  K and V float32, read in place: a bf16 or int8 cache's
     * tiles are widened for every item, and would be split for every item
     * too, the case that made the scores alone 0.90x (docs/PERFORMANCE.md,
     * twentieth session).  P V adds 32 columns of O at a time: Dv a
     * multiple of 32 keeps them in their row. */
    return !p->bf16 && isa->bf16 && isa->bf16->gemm_split && isa->bf16->gemm_split_beside &&
           kv_dtype == MHA_DTYPE_F32 && p->Dv % PAIR == 0 && p->S >= min_rows && p->L >= min_rows;
}

void mha__split_attention_min_rows(int64_t rows) { min_rows = rows < 0 ? MIN_ROWS : rows; }

/* (scale Q)^T as the float32 table packs it, then split: 32 of its rows
 * (dimensions) at a time are pairs of k down a column tile's 16 queries. */
static void pack_queries_split(const mha__attn_plan *p, mha__strided q, int64_t rows, const mha__tiles *t)
{
    mha__products_f32.pack_queries(p, q, rows, t);
    /* Whole pairs of column tiles, zeros past the item's rows; P V adds
     * to O's rows in 32s: those past the item's are zeroed too, so that
     * nothing uninitialised is read. */
    int64_t padded = (rows + PAIR - 1) / PAIR * PAIR;
    *t->qs_finite = mha__split_tiles_near(p->bk, true, t->qt, MHA__BR, padded / SPLIT_ROWS, rows, p->D, t->qs);
    for (int64_t d = 0; d < p->Dv; d++) memset(t->o + d * MHA__BR + rows, 0, (size_t)(padded - rows) * sizeof(float));
}

/* Where key tile `tile` (values: its value tile) goes split: its slot
 * of the thread's cache with the slot's tag, or ks (vs) and no tag when
 * the tile is not cached. */
typedef struct split_place {
    uint16_t *dst;
    mha__split_tag *tag;
} split_place;

static split_place place_of(const mha__attn_plan *p, int64_t tile, bool values, const mha__tiles *t)
{
    if (tile < 0 || tile >= t->sslots) return (split_place){values ? t->vs : t->ks, NULL};
    mha__split_sizes z = mha__split_sizes_of(p);
    uint16_t *slot = t->split_cache + tile * (z.k + z.v);
    return values ? (split_place){slot + z.k, &t->split_vtag[tile]} : (split_place){slot, &t->split_ktag[tile]};
}

/* Whether a place already holds a split of the first `cols` rows from
 * `rows` that serves: those rows exactly, or more of them all finite
 * (each key's parts are its own, so the first cols are the same bits).
 * A split with a value that is not finite serves only its own rows: the
 * item's may all be finite, and then take the split products. */
static bool holds(const split_place *at, const float *rows, int64_t cols)
{
    return at->tag && at->tag->rows == rows && (at->tag->cols == cols || (at->tag->cols > cols && at->tag->finite));
}

/* K's first `rows` rows split into A's row tiles (16 keys, 32 of the D
 * dimensions a block) at dst. */
static bool split_key_rows(const mha__attn_plan *p, mha__strided k, int64_t rows, uint16_t *dst)
{
    return mha__split_tiles_near(p->bk, false, k.data, k.rs, (rows + PAIR - 1) / PAIR * 2, rows, p->D, dst);
}

/* V's first `rows` rows split into A's row tiles of V^T (16 of the Dv
 * columns, 32 keys a block) at dst: pairs of keys down 16 columns,
 * transposed into rows of pairs. */
static bool split_value_rows(const mha__attn_plan *p, mha__strided v, int64_t rows, uint16_t *dst)
{
    int64_t kb = blocks_of(rows), run = run_of(kb);
    bool finite = true;
    for (int64_t d = 0; d < p->Dv; d += SPLIT_ROWS)
        for (int64_t b = 0; b < kb; b++) {
            int64_t j0 = b * MHA_SPLIT_K, live = rows - j0 < MHA_SPLIT_K ? rows - j0 : MHA_SPLIT_K;
            uint16_t *tiles = dst + (d / SPLIT_ROWS) * run + b * 3 * MHA_SPLIT_TILE;
            finite &= p->bk->split_near_pairs_tile(v.data + j0 * v.rs + d, v.rs, live, SPLIT_ROWS, tiles);
            p->bk->split_transpose(tiles);
        }
    return finite;
}

/* Key tile `tile`'s rows (`values`: its value rows) split, from the
 * thread's cache or into it, the whole tile (mha__cached_tile_keys); ks
 * (vs) and only the item's `cols` rows when not cached.  *split: the rows
 * split, whose blocks set V^T's row tiles' stride.  NULL if one of the
 * item's values is not finite: a whole tile that is not is split again
 * as the item's rows alone, which may be. */
static const uint16_t *split_tile(const mha__attn_plan *p, mha__strided x, int64_t cols, int64_t tile, bool values,
                                  const mha__tiles *t, int64_t *split)
{
    split_place at = place_of(p, tile, values, t);
    if (holds(&at, x.data, cols)) {
        *split = at.tag->cols;
        return at.tag->finite ? at.dst : NULL;
    }
    bool (*fill)(const mha__attn_plan *, mha__strided, int64_t, uint16_t *) =
        values ? split_value_rows : split_key_rows;
    int64_t rows = at.tag ? mha__cached_tile_keys(p, tile) : cols;
    bool finite = fill(p, x, rows, at.dst);
    if (!finite && rows > cols) finite = fill(p, x, rows = cols, at.dst);
    if (at.tag) *at.tag = (mha__split_tag){x.data, rows, finite};
    *split = rows;
    return finite ? at.dst : NULL;
}

/* Pairs of 16-query column tiles, outer; the key row pairs up to the
 * furthest key a pair's rows see, stored straight into the score tile;
 * the rest left as it was (products.h).  Zeroing it, as the float32
 * table does, took 1.4 us of a causal diagonal tile's 22 (N = 2048), a
 * store to a line out of L1 for every 32 scores. */
static void scores_split(const mha__attn_plan *p, mha__strided k, int64_t rows, int64_t cols, int64_t tile,
                         const mha__tiles *t)
{
    int64_t split;
    const uint16_t *a = k.cs == 1 && *t->qs_finite ? split_tile(p, k, cols, tile, false, t, &split) : NULL;
    if (!a) {
        mha__products_f32.scores(p, k, rows, cols, tile, t);
        return;
    }
    int64_t kb = blocks_of(p->D), run = run_of(kb);
    for (int64_t r = 0; r < rows; r += PAIR) {
        int64_t n = rows - r < PAIR ? rows - r : PAIR;
        int64_t seen = (mha__strip_reach(t, r, n) + PAIR - 1) / PAIR;
        float *s = t->st + r;
        if (seen)
            p->bk->gemm_split(seen, kb, a, run, t->qs + (r / SPLIT_ROWS) * run, s, MHA__LDS, MHA_SPLIT_STORE, NULL);
    }
}

/* Whether every row's probabilities so far are numbers: a NaN among them
 * makes its row's running sum NaN (a probability cannot be infinite). */
static bool probabilities_finite(const mha__tiles *t, int64_t rows)
{
    bool finite = true;
    for (int64_t r = 0; r < rows; r++) finite &= !isnan(t->sum[r]);
    return finite;
}

/* The float32 table's P V on O^T: turned into rows in t->vt (free: V is
 * read in place), rescaled there as the driver rescales rows, added to,
 * turned back.  For a tile or P with a value that is not finite. */
static void values_by_f32(const mha__attn_plan *p, mha__strided v, int64_t rows, int64_t cols, int64_t tile,
                          const mha__tiles *t)
{
    _Static_assert(MHA__BC >= MHA__BR, "t->vt must hold O's rows");
    mha__tiles rowwise = *t;
    rowwise.o = t->vt;
    p->kt->transpose_scaled(rowwise.o, p->Dv, t->o, MHA__BR, p->Dv, rows, 1.0f);
    mha__rescale_rows(p->kt, rowwise.o, p->Dv, rows, t->scale);
    mha__products_f32.values(p, v, rows, cols, tile, &rowwise);
    p->kt->transpose_scaled(t->o, MHA__BR, rowwise.o, p->Dv, rows, p->Dv, 1.0f);
}

/* Panel q of 32 queries' P^T, split into B's two column tiles: rows
 * 32 q .. 32 q + n - 1 of the item, against the tile's first `keys` keys
 * (past its reach its probabilities are 0: the keys stop at the block
 * that holds its last, as the float32 table's). */
typedef struct p_panel {
    const mha__attn_plan *p;
    const mha__tiles *t;
    int64_t rows, r, n, keys, kb;
    uint16_t *ps; /* half of t->ps: panels alternate, one split while the other multiplies */
} p_panel;

static p_panel panel_at(const mha__attn_plan *p, const mha__tiles *t, int64_t rows, int64_t q, int64_t half)
{
    int64_t r = q * PAIR, n = rows - r < PAIR ? rows - r : PAIR, keys = mha__strip_reach(t, r, n);
    uint16_t *ps = t->ps + half * 2 * run_of(blocks_of(MHA__BC));
    return (p_panel){p, t, rows, r, n, keys, blocks_of(keys), ps};
}

/* Step i of a panel's split (side work, kernels.h): its half i / kb (16
 * queries) in block i % kb of keys. */
static void split_panel_step(void *ctx, int64_t i)
{
    const p_panel *at = ctx;
    int64_t h = i / at->kb, b = i % at->kb, r0 = at->r + h * SPLIT_ROWS;
    int64_t m = at->rows - r0 < SPLIT_ROWS ? (at->rows - r0 > 0 ? at->rows - r0 : 0) : SPLIT_ROWS;
    int64_t j0 = b * MHA_SPLIT_K, live = at->keys - j0 < MHA_SPLIT_K ? at->keys - j0 : MHA_SPLIT_K;
    at->p->bk->split_unit_pairs_tile(at->t->st + j0 * MHA__LDS + r0, MHA__LDS, m ? live : 0, m,
                                     at->ps + h * run_of(at->kb) + b * 3 * MHA_SPLIT_TILE);
}

static mha__side_work panel_split(p_panel *at) { return (mha__side_work){split_panel_step, at, 2 * at->kb}; }

static void run_side_work(const mha__side_work *w)
{
    for (int64_t i = 0; i < w->steps; i++) w->step(w->ctx, i);
}

/* O^T = O^T * scale + V^T P^T, a panel of 32 queries at a time: V^T's row
 * tiles against a pair of P^T's column tiles (32 keys of the key-major
 * score tile a block, as pairs down their columns, no transpose), each
 * query's rescale applied to its column as the product is added.  The
 * next panel's P is split while the tiles multiply this one's (side
 * work, kernels.h), where the splits were a tenth of the core's time
 * between the products.  Panels go last to first: the first one's split
 * cannot hide, and taken first to last the core gained 1.02-1.04x, last
 * to first 1.06x (docs/PERFORMANCE.md).  A panel that sees none of the
 * tile's keys is only rescaled. */
static void values_split(const mha__attn_plan *p, mha__strided v, int64_t rows, int64_t cols, int64_t tile,
                         const mha__tiles *t)
{
    int64_t split = cols;
    const uint16_t *a =
        v.cs == 1 && probabilities_finite(t, rows) ? split_tile(p, v, cols, tile, true, t, &split) : NULL;
    if (!a) {
        values_by_f32(p, v, rows, cols, tile, t);
        return;
    }
    int64_t a_run = run_of(blocks_of(split)), last = (rows - 1) / PAIR;
    p_panel now = panel_at(p, t, rows, last, 0), next;
    mha__side_work side = panel_split(&now);
    run_side_work(&side);
    for (int64_t q = last; q >= 0; q--, now = next) {
        next = panel_at(p, t, rows, q > 0 ? q - 1 : 0, (last - q + 1) % 2);
        side = panel_split(&next);
        side.steps = q > 0 ? side.steps : 0;
        float scale[PAIR]; /* 1 past the item's rows: their columns stay 0 */
        for (int64_t i = 0; i < PAIR; i++) scale[i] = i < now.n ? t->scale[now.r + i] : 1.0f;
        if (now.kb == 0) {
            for (int64_t d = 0; d < p->Dv; d++)
                for (int64_t i = 0; i < now.n; i++) t->o[d * MHA__BR + now.r + i] *= scale[i];
            run_side_work(&side);
            continue;
        }
        p->bk->gemm_split_beside(p->Dv / PAIR, now.kb, a, a_run, now.ps, t->o + now.r, MHA__BR, MHA_SPLIT_SCALE_ADD,
                                 scale, &side);
    }
}

static void release_split(const mha__attn_plan *p) { p->bk->split_release(); }

/* Each key tile split into the thread's cache, then its keys' norms
 * found while the tile is in L1 (products.h). */
static double split_key_norm2_max(const mha__attn_plan *p, mha__strided k, int64_t keys, const mha__tiles *t)
{
    double top = 0;
    for (int64_t j0 = 0; j0 < keys && !isnan(top); j0 += MHA__BC) {
        int64_t tile = j0 / MHA__BC, rows = keys - j0 < MHA__BC ? keys - j0 : MHA__BC, split;
        mha__strided x = {k.data + j0 * k.rs, k.rs, k.cs};
        if (k.cs == 1 && tile < t->sslots) split_tile(p, x, mha__cached_tile_keys(p, tile), tile, false, t, &split);
        top = mha__norm2_top(top, mha__rows_norm2_max(p->kt, x.data, x.rs, x.cs, rows, p->D));
    }
    return top;
}

const mha__products mha__products_f32_split = {pack_queries_split, scores_split,        values_split,
                                               release_split,      split_key_norm2_max, true};
