/*
 * products.h -- the forward's block products in the dtype a plan computes
 * in, and the tiles they work on.  flash.c walks the tiles and calls
 * these through the plan (mha__attn_plan.products), so no dtype appears
 * in the driver: products.c has one table for float32 and one for bf16.
 */
#ifndef MHA_PRODUCTS_H
#define MHA_PRODUCTS_H

#include "attn/attention.h"

/* Query rows per item (at most MHA__BR) and keys per tile: multiples of
 * every kernel's mr (12, 6, 4), so full tiles have no tails.  MHA__BR is
 * also the leading dimension of (scale Q)^T.  The score tile's is MHA__LDS,
 * 16 floats more: 768 bytes apart, a strip of P V's A operand (one column
 * per key) fell into a quarter of L1's sets and missed on every strip; 832
 * bytes apart (13 cache lines, an odd count) it spreads over all of them
 * (3x fewer L1 misses in P V, cachegrind, measured at 800 bytes) and every
 * row starts a cache line, as AMX's tile stores need to run at full speed
 * (a 16 x 16 float tile stored 800 bytes apart ran at 0.64x). */
enum { MHA__BR = 192, MHA__BC = 192, MHA__LDS = MHA__BR + 16 };

/* Keys a cached tile holds (products.c, products_split.c): the whole of
 * key tile `tile`, whatever part of it the item at hand sees.  A causal
 * item of 96 rows sees half of its last 192-key tile and the next item
 * all of it; caching only the part seen packed or split that tile twice,
 * 1.5x the keys of a dense pass (docs/PERFORMANCE.md).  The parts past
 * an item's keys are never read: its probabilities there are 0 and the
 * products stop at each strip's reach (mha__strip_reach). */
int64_t mha__cached_tile_keys(const mha__attn_plan *p, int64_t tile);

/* One split key or value tile (products_split.c): the rows it was split
 * from (NULL: none yet), how many, and whether all were finite. */
typedef struct mha__split_tag {
    const float *rows;
    int64_t cols;
    bool finite;
} mha__split_tag;

/* Rows of `width` floats, `ld` floats apart, that the float32 products
 * bring into L2 while they compute a tile's scores (a prefetch, never a
 * read; `at` NULL: none).  Where a head's K and V stream from beyond L2
 * (the plan's kv_stream), the driver names the next key tile's keys:
 * the scores' first strip read each new key row from L3 with only the
 * micro-kernel's twelve rows in flight, and waited on them.  Fetching
 * the tile's values too (packed or in place) gained nothing, the
 * hardware's prefetcher following P V's reads in order
 * (docs/PERFORMANCE.md). */
typedef struct mha__fetch_rows {
    const float *at;
    int64_t rows, ld, width;
} mha__fetch_rows;

/* Per-thread tiles, carved from one workspace slice. */
typedef struct mha__tiles {
    float *qt;                /* [D][BR]   the item's queries, (scale Q)^T (packed once per item) */
    float *vt;                /* [BC][Dv]  the value tile, when V's rows are a bf16 or int8 cache's */
    float *vp;                /* [Dv / nr][BC][nr]  the value tile in the micro-kernel's column panels */
    float *kq;                /* [BC][D]   the key tile, when K's rows are a bf16 or int8 cache's */
    float *st;                /* [BC][LDS] scores, then probabilities, key-major */
    float *o;                 /* [BR][Dv]  unnormalised output; O^T, [Dv][BR], for products that keep it so */
    float *max, *sum, *scale; /* [BR] */
    uint16_t *k16;            /* bf16 only: [BC][D even]  the key tile, rounded */
    uint16_t *p16;            /* bf16 only: [BR][BC even]  probabilities, a row of keys per query, rounded */
    float *p16_sum;           /* bf16 only: [BR]  the running sum of the probabilities as rounded into p16 */
    float *vcache;            /* float32 table only: [vslots][Dv / nr][BC][nr]  packed value tiles, see below */
    const float **vtag;       /* [vslots]  the V rows each slot was packed from (NULL: none yet) */
    int64_t *vcols;           /* [vslots]  and how many (mha__cached_tile_keys) */
    int64_t vslots;           /* 0: no cache */
    /* The split products only (products_split.c): */
    uint16_t *qs;               /* (scale Q)^T: B's column tiles of 16 queries */
    uint16_t *ps;               /* P^T of 32 queries: B's two column tiles */
    uint16_t *ks, *vs;          /* a key tile (A's row tiles of 16 keys) and a value tile (of V^T), when not cached */
    uint16_t *split_cache;      /* [sslots]: key tile j split, then value tile j */
    mha__split_tag *split_ktag; /* [sslots]  what each slot's key tile was split from */
    mha__split_tag *split_vtag; /* [sslots]  and its value tile */
    int64_t sslots;             /* 0: no cache */
    bool *qs_finite;            /* (scale Q)^T's values all finite */
    int64_t lo[MHA__BR], hi[MHA__BR]; /* each row's visible real keys (mha__row_key_range) */
    /* The current key tile's first reach[r] keys hold every key row r
     * sees; reach never falls with r (mha__strip_reach). */
    int64_t reach[MHA__BR];
    mha__refine refine;           /* which of the tile's scores to refine (attention.h) */
    bool wide[MHA__BR], wide_any; /* the item's rows refined whole (attention.h), and whether any is */
    mha__fetch_rows next_keys;    /* what the scores fetch (above): the next key tile's keys */
    double *qd;          /* [D][MHA__BR]  the item's query rows widened, for refined scores (float32 plans only) */
    const float *qd_row; /* the first of the rows qd holds; NULL: none yet */
} mha__tiles;

/* The value-tile cache: a thread keeps key tile j of the kv head it works
 * on packed in slot j, and its next items on that head (its other query
 * blocks, and with GQA the group's other heads) use it again instead of
 * packing it again: packing took 6% of the core at N = 2048 on Sapphire
 * Rapids, and 7.6% of a ring rank's time with 2048-key blocks.  Only
 * for float32 values read in place, and only while the head's packed
 * values take at most twice the core's L2 when that is under 1 MB
 * (mha__l2_bytes assumes 512 KB when unknown), eight times when it is
 * 1 MB or more; the tiles of a longer head are packed as they come.  A
 * cached tile that has left L2 comes back from L3, and whether that
 * beats packing it again from V differed by machine.  Measured: with
 * 512 KB of L2 (Zen 3) 0.54 MB of packed values gained 5% and 2.1 MB
 * lost 3.5%; with 2 MB (Sapphire Rapids) both gained, 7% and 3-5%;
 * with 1 MB (Zen 4) 2.1 MB gained 2.5-3.4%, 4.2 MB 5.8% and 8.4 MB
 * 4.4% (docs/PERFORMANCE.md). */
enum { MHA__VCACHE_LARGE_L2 = 1 << 20 };

/* o's rows [rows][dv] times each row's rescale, where it is not 1: the
 * online softmax's step on an unnormalised output kept as rows. */
void mha__rescale_rows(const mha__kernels *kt, float *o, int64_t dv, int64_t rows, const float *scale);

/* The most keys any of rows [r, r + n) sees in the current key tile:
 * its last row's reach, as reach never falls from one row to the next
 * (rows' key ranges grow with the row, flash.c). */
int64_t mha__strip_reach(const mha__tiles *t, int64_t r, int64_t n);

/* Floats of one thread's tiles for a plan. */
int64_t mha__tiles_floats(const mha__attn_plan *p);
/* The tiles carved from a slice of mha__tiles_floats floats. */
mha__tiles mha__tiles_carve(const mha__attn_plan *p, float *slice);
/* Empties the value-tile cache of tiles carved from a slice: before a
 * call's first item, since the slice may hold another call's tiles. */
void mha__tiles_forget_values(const mha__tiles *t);

typedef struct mha__products {
    /* t->qt = (scale Q)^T for the `rows` query rows q. */
    void (*pack_queries)(const mha__attn_plan *p, mha__strided q, int64_t rows, const mha__tiles *t);
    /* t->st = S^T = K (scale Q)^T for keys [0, cols) at k, key-major;
     * scores past every row's t->reach in a block of the micro-kernel's
     * may be left 0 or as they were instead: the driver never takes them
     * for scores (the contract masks them, the refinement's check zeroes
     * them first, and the softmax step masks keys past the reaches it is
     * given).  `tile` as for values, below.  Products may fetch the rows
     * of t->next_keys meanwhile (the float32 ones do). */
    void (*scores)(const mha__attn_plan *p, mha__strided k, int64_t rows, int64_t cols, int64_t tile,
                   const mha__tiles *t);
    /* t->o += P V for keys [0, cols) at v, P key-major in t->st, each
     * row's probabilities past t->reach being 0 (so not read); `tile`:
     * which key tile of its kv head v is (keys tile BC onward, read in
     * place), or -1 (any other rows: never cached).  With o_transposed,
     * t->o = t->o * t->scale (each row's rescale, which the driver does
     * itself otherwise) + P V, on O^T. */
    void (*values)(const mha__attn_plan *p, mha__strided v, int64_t rows, int64_t cols, int64_t tile,
                   const mha__tiles *t);
    /* A thread's run of items is done: gives back what the products hold
     * across calls (AMX's tile state); NULL: nothing. */
    void (*release)(const mha__attn_plan *p);
    /* The largest squared norm of a kv head's `keys` keys at k (float32,
     * read in place) as mha__rows_norm2_max finds it, from each key tile
     * as the products make it ready in the thread's cache (the whole
     * tile, as scores would): K read once for both, where the norm's own
     * pass read it from memory and the tiles read it again.  NULL: the
     * products keep no key tiles. */
    double (*key_norm2_max)(const mha__attn_plan *p, mha__strided k, int64_t keys, const mha__tiles *t);
    /* t->o holds O^T, [Dv][MHA__BR]: the split products add P V as their
     * tiles make it, V^T P^T, with no transpose a key tile, and fold each
     * row's rescale into that add (products_split.c). */
    bool o_transposed;
} mha__products;

extern const mha__products mha__products_f32;
extern const mha__products mha__products_bf16;
/* float32 from split bf16 products on AMX (products_split.c), for the
 * plans where mha__split_attention holds: the CPU has them, K and V
 * (stored as kv_dtype) are float32 read in place, Dv is a multiple of
 * 32, and there are 512 keys and 512 query rows or more. */
extern const mha__products mha__products_f32_split;
bool mha__split_attention(const mha__attn_plan *p, const mha__isa_kernels *isa, mha_dtype kv_dtype);
/* For tests: the keys and query rows a problem needs for the split
 * products (default 512; negative: the default again).  Set it before
 * plans are made and while no call runs. */
void mha__split_attention_min_rows(int64_t rows);
/* The split products' tiles, in uint16_t values: (scale Q)^T, P, a key
 * tile and a value tile (a cache slot holds one of each); and the slots
 * of the thread's cache.  All 0 for other plans. */
typedef struct mha__split_sizes {
    int64_t q, p, k, v, slots;
} mha__split_sizes;
mha__split_sizes mha__split_sizes_of(const mha__attn_plan *p);
/* Blocks of MHA_SPLIT_K that hold n values of k; values of one row or
 * column tile's three parts over k_blocks blocks (kernels.h). */
int64_t mha__split_blocks(int64_t n);
int64_t mha__split_run(int64_t k_blocks);
/* x split into `tiles` tiles of 16 (kernels.h), zeros past its first
 * `count` columns or rows: with `pairs`, B's column tiles of 16 of its
 * columns, k (`width` of it) down its rows (split_pairs_tile); else A's
 * row tiles of 16 of its rows, k along them (split_rows_tile).  Rows ld
 * floats apart; a tile's blocks of k are mha__split_run apart.  False if
 * a value is not finite. */
bool mha__split_tiles(const mha__bf16_kernels *bk, bool pairs, const float *x, int64_t ld, int64_t tiles, int64_t count,
                      int64_t width, uint16_t *dst);
/* The same tiles from the near fillers (kernels.h: split_near_rows_tile),
 * for operands split once and used once, where the rounding's cost
 * counts; false also for a value at the edge of float32's range. */
bool mha__split_tiles_near(const mha__bf16_kernels *bk, bool pairs, const float *x, int64_t ld, int64_t tiles,
                           int64_t count, int64_t width, uint16_t *dst);

/* The split-K driver's two row operations on cached K and V rows stored
 * in the cache's dtype, element `at` onward, rows ld elements apart, with
 * the rows' scales from `scale` on (int8 rows; NULL for the others), for
 * 1 .. MHA_ROWS_AT_ONCE query rows r < rows at once (kernels.h):
 *   dot:  s[r][j] = q[r] . k_j for j < n (q already scaled)
 *   axpy: o[r] += sum_j pr[r][j] v_j, j in order
 * Each row's outputs have the same bits however many rows a call takes. */
typedef struct mha__kv_rows {
    void (*dot)(const mha__attn_plan *p, const void *k, const float *scale, int64_t at, int64_t ld, int64_t n, int rows,
                const float *const *q, float *const *s);
    void (*axpy)(const mha__attn_plan *p, int rows, const float *const *pr, const void *v, const float *scale,
                 int64_t at, int64_t ld, int64_t n, float *const *o);
} mha__kv_rows;

/* The row operations for K and V stored as F32, BF16 or I8 (with the
 * plan's kv_far, the kernels' prefetching forms). */
const mha__kv_rows *mha__kv_rows_of(mha_dtype dtype);

#endif /* MHA_PRODUCTS_H */
