/*
 * flash_bwd.c -- the fused attention backward: FlashAttention-2's
 * recomputation of the probabilities from the forward's row statistics,
 * so nothing of size L x S is ever stored.
 *
 * With s = scores (after softcap and bias), P = softmax(s) per row,
 * O = P V, and dO given:
 *   delta_i = dO_i . O_i                        (once per row, first)
 *   dV_j    = sum_i P_ij dO_i
 *   dP_ij   = dO_i . V_j
 *   dS_ij   = P_ij (dP_ij - delta_i)  [* (1 - tanh^2) under softcap]
 *   dK_j    = scale sum_i dS_ij q_i
 *   dQ_i    = scale sum_j dS_ij k_j
 * One sweep computes all three: a work item owns a kv head's key blocks
 * (all of them, or every G-th when there are few kv heads, G fixed by the
 * shape), accumulates dK and dV of one key block at a time in a tile
 * (passes of as many key blocks as stay in L2 over the query blocks), and
 * adds dS K into its own dQ accumulator (the output itself, or one of G
 * partial sums); a last pass adds the partials in a fixed order and
 * scales.  FlashAttention-2 adds into dQ with atomics instead, which makes
 * the bits depend on the thread count; here every sum has a fixed order,
 * so the same bits come out for any thread count.  5 block products per
 * tile pair (S, dP, dV, dK, dQ) against the forward's 2.
 *
 * The probabilities come back as exp(s - shift) * mul per row: (max,
 * 1 / sum) when the forward kept both (the layer), exact to the forward's
 * bits.  From an lse alone (mha_attention_backward), a float32 lse is off
 * by up to half an ulp of |lse| (4e-6 at lse = 100), which scales the
 * whole row by one factor; a first pass sums each row's recomputed
 * probabilities (scores only: one block product) and divides by the sum,
 * cancelling it, so large logits cost no accuracy.
 *
 * Tiles are key-major like the forward's: queries lie in vector lanes, and
 * the score contract (attention.c) is the forward's.
 */
#include "attn/attention.h"
#include "attn/products.h"
#include "kernels/kernels.h"

#include <math.h>
#include <string.h>

/* Query rows and keys per tile: multiples of every kernel's mr and nr.
 * 144 and 192 measured the same as 96 at N = 2048 within this machine's
 * noise; 96 keeps the tiles small and the items many at short N. */
enum { BQ = 96, BK = 96 };
_Static_assert((int)BK <= (int)MHA_REFINE_MAX_COLS && (int)BQ <= (int)MHA_REFINE_MAX_ROWS,
               "a block's scores must fit mha__refine and mha__shift_tile");

typedef struct bwd_job {
    const mha__attn_plan *p;
    const mha__kernels *kt;
    const mha_tensor *q, *k, *v, *dout;
    mha_tensor *dq, *dk, *dv;
    float *shift, *mul, *delta; /* per row [B, Hq, L]: p = exp(s - shift) * mul */
    float *delta_lo;            /* per row: delta's part below float32 (exact_rows_range), else 0 */
    float *partial;             /* unscaled dQ sums, contiguous [B, Hq, L, D] each, one after another */
    bool first_is_dq;           /* the first sum is kept in dq itself (its rows are contiguous) */
    char *scratch;
    int64_t scratch_stride;
    int64_t q_blocks, k_blocks; /* k_blocks counts the appended keys' block */
    int64_t groups;             /* G: key-block groups per kv head */
    int64_t pass_blocks;        /* key blocks a sweep takes per pass over the query blocks */
    bool from_lse;              /* the forward kept an lse, not (max, sum) */
    const double *k_norm2;      /* [B * Hkv]: each kv head's largest squared key norm, found before dK may
                                 * overwrite K (mha__keys_norm2_max_all), or the forward's */
    const double *q_norm2;      /* the forward's squared query norms (mha__wide_rows), or NULL */
} bwd_job;

/* Per-thread tiles. */
typedef struct bwd_tiles {
    float *qt;    /* [D][BQ]   (scale Q)^T, the B operand of the scores */
    float *qr;    /* [BQ][D]   Q rows, the B operand of dK, when Q's are strided */
    float *dot;   /* [Dv][BQ]  dO^T, the B operand of dP */
    float *dor;   /* [BQ][Dv]  dO rows, the B operand of dV, when dO's are strided */
    float *st;    /* [BK][BQ]  scores, then probabilities */
    float *dpt;   /* [BK][BQ]  dP, then dS */
    float *slope; /* [BK][BQ]  softcap's derivative */
    float *acc_k; /* [item's keys][D]   dK of every key block the item owns */
    float *acc_v; /* [item's keys][Dv]  dV likewise */
    float *kr;    /* [BK][D]   key rows gathered, when K's rows are strided */
    /* The split scores and dP only (split products, below): */
    uint16_t *qs;    /* (scale Q)^T: B's column tiles of 16 queries */
    uint16_t *dos;   /* dO^T likewise */
    uint16_t *kvs;   /* [pass blocks]: a key block's K rows as A's row tiles of 16 keys, then its V rows,
                      * then (split_grads) K^T as A's row tiles of 16 dimensions, k along the keys */
    bool *kv_finite; /* [pass blocks][3]: the block's K, V, and K^T tiles there and finite */
    bool qs_finite, dos_finite;
    /* dV, dK and dQ from split products (split_grads) only: */
    uint16_t *qb, *dob; /* the query block's Q rows, and dO rows, as B's column tiles, k down the queries */
    uint16_t *grad;     /* P^T or dS^T as A's row tiles (k along the queries), or dS^T as B's column tiles */
    float *dqt;         /* [D][BQ]  the query block's dQ^T sum over one pass's key blocks */
    float *dq_block;    /* [BQ][D]  dqt turned back into rows */
    bool qb_finite, dob_finite;
    int64_t lo[BQ], hi[BQ];
    float zero[BQ];       /* the shift of refined scores, already shifted */
    mha__refine refine;   /* which of the block's scores to refine (attention.h) */
    bool wide[BQ];        /* the query block's rows refined whole (attention.h) */
    double *qd;           /* [D][BQ]  the query block's rows widened, for refined scores (float32 plans only) */
    const float *qd_row;  /* the first of the rows qd holds; NULL: none yet */
    double *dod;          /* [Dv][BQ]  the block's dO rows widened, for few rows' dP (refine_dp) */
    const float *dod_row; /* the first of the rows dod holds; NULL: none yet */
} bwd_tiles;

static int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

/* Key rows an item may own: every block of a kv head (room for the
 * appended keys' block included). */
static int64_t item_keys(const mha__attn_plan *p) { return ((p->R + BK - 1) / BK + 1) * BK; }

enum { SPLIT_ROWS = 16, PAIR = 32 }; /* rows of a split tile; of a pair of them */

/* Whether dV, dK and dQ come from the split products too: where the
 * scores do and D, like Dv, is a multiple of 32 (dK adds 32 of its
 * columns at a time). */
static bool split_grads(const mha__attn_plan *p) { return p->split && p->D % PAIR == 0; }

/* The split products' sizes, in uint16_t values (0 where the plan's
 * forward does not use them: the backward's scores then come from the
 * same products as the forward's, see split_scores): one query block's
 * (scale Q)^T and dO^T as B's column tiles, and one key block's K and V
 * rows as A's row tiles (a slot); with split_grads also the block's Q
 * and dO rows as B's column tiles (rows), a slot's K^T (key_cols), one
 * block pair's P or dS split (grad), and dQ^T's floats (dqt). */
typedef struct bwd_split_sizes {
    int64_t q, dout, kv, rows, key_cols, grad, dqt;
} bwd_split_sizes;

static bwd_split_sizes bwd_split_sizes_of(const mha__attn_plan *p)
{
    if (!p->split) return (bwd_split_sizes){0};
    int64_t run_k = mha__split_run(mha__split_blocks(p->D)), run_v = mha__split_run(mha__split_blocks(p->Dv));
    bwd_split_sizes z = {
        .q = BQ / SPLIT_ROWS * run_k, .dout = BQ / SPLIT_ROWS * run_v, .kv = BK / SPLIT_ROWS * (run_k + run_v)};
    if (!split_grads(p)) return z;
    int64_t run_q = mha__split_run(mha__split_blocks(BQ)), run_keys = mha__split_run(mha__split_blocks(BK));
    z.rows = (p->D + p->Dv) / SPLIT_ROWS * run_q;
    z.key_cols = p->D / SPLIT_ROWS * run_keys;
    z.grad = (BK > BQ ? BK : BQ) / SPLIT_ROWS * (run_q > run_keys ? run_q : run_keys);
    z.dqt = p->D * BQ;
    return z;
}

/* Key blocks a sweep pass takes: as many as keep their K and V rows and
 * dK, dV sums (BK (2 D + 2 Dv) floats a block) within half of L2, so they
 * stay there while the query blocks go by; each pass packs the query
 * blocks again.  In one pass over all of them (4.2 MB at N = 4096, d = 64)
 * they came from L3 for every query block: the backward at N = 4096 and
 * 8192 ran 1.10-1.14x faster in passes, at N = 2048 the same (Zen 4, 1 MB
 * of L2; docs/PERFORMANCE.md).  Split K and V, where the scores are split,
 * are not counted: 0.75x the float32 rows' bytes again, they fit in the
 * other half of Sapphire Rapids' 2 MB, and counting them (more passes,
 * each packing and splitting the query blocks again) measured 4% slower
 * at N = 2048. */
static int64_t pass_blocks(const mha__attn_plan *p)
{
    int64_t l2 = mha__l2_bytes(), per_block = BK * 2 * (p->D + p->Dv) * (int64_t)sizeof(float);
    int64_t n = l2 / 2 / per_block;
    return n > 1 ? n : 1;
}

/* Carving a slice into the tiles: each array 16 floats aligned from the
 * slice's start.  With no slice (base NULL) it only counts, so the size
 * a plan asks for and the carving are one piece of code. */
typedef struct carver {
    float *base;
    int64_t used;
} carver;

static float *carve(carver *c, int64_t n)
{
    float *at = c->base ? c->base + c->used : NULL;
    c->used += round16(n);
    return at;
}

static bwd_tiles carve_tiles(const mha__attn_plan *p, carver *c)
{
    bwd_tiles t;
    t.qt = carve(c, p->D * BQ);
    t.qr = carve(c, BQ * p->D);
    t.dot = carve(c, p->Dv * BQ);
    t.dor = carve(c, BQ * p->Dv);
    t.st = carve(c, BK * BQ);
    t.dpt = carve(c, BK * BQ);
    t.slope = carve(c, BK * BQ);
    t.acc_k = carve(c, item_keys(p) * p->D);
    t.acc_v = carve(c, item_keys(p) * p->Dv);
    t.kr = carve(c, BK * p->D);
    bwd_split_sizes z = bwd_split_sizes_of(p); /* even counts: whole floats */
    int64_t slots = z.kv ? pass_blocks(p) : 0;
    t.qs = (uint16_t *)carve(c, z.q / 2);
    t.dos = (uint16_t *)carve(c, z.dout / 2);
    t.kvs = (uint16_t *)carve(c, slots * (z.kv + z.key_cols) / 2);
    t.kv_finite = (bool *)carve(c, (3 * slots + 3) / 4);
    t.qb = (uint16_t *)carve(c, z.rows / 2);
    t.dob = z.rows && t.qb ? t.qb + p->D / SPLIT_ROWS * mha__split_run(mha__split_blocks(BQ)) : NULL;
    t.grad = (uint16_t *)carve(c, z.grad / 2);
    t.dqt = carve(c, z.dqt);
    t.dq_block = carve(c, z.dqt);
    t.qb_finite = t.dob_finite = false;
    t.qd = (double *)(void *)carve(c, p->bf16 ? 0 : 2 * p->D * BQ);
    t.qd_row = NULL;
    t.dod = (double *)(void *)carve(c, p->bf16 ? 0 : 2 * p->Dv * BQ);
    t.dod_row = NULL;
    t.qs_finite = t.dos_finite = false;
    memset(t.zero, 0, sizeof t.zero);
    return t;
}

static int64_t bwd_tiles_floats(const mha__attn_plan *p)
{
    carver c = {NULL, 0};
    carve_tiles(p, &c);
    return c.used;
}

static bwd_tiles bwd_tiles_at(const bwd_job *j, int thread)
{
    carver c = {(float *)(j->scratch + thread * j->scratch_stride), 0};
    return carve_tiles(j->p, &c);
}

/* C[m x n] (+)= A[m x k] B[k x n] of any size, tile by tile (kernels.h's
 * operand conventions); each element is one chain over k in order. */
static void product(const mha__kernels *kt, int64_t m, int64_t n, int64_t k, const float *a, int64_t a_rs, int64_t a_cs,
                    const float *b, int64_t ldb, float *c, int64_t ldc, int accumulate)
{
    for (int64_t i = 0; i < m; i += kt->mr)
        for (int64_t jj = 0; jj < n; jj += kt->nr)
            kt->gemm_tile(m - i < kt->mr ? m - i : kt->mr, n - jj < kt->nr ? n - jj : kt->nr, k, a + i * a_rs, a_rs,
                          a_cs, b + jj, ldb, c + i * ldc + jj, ldc, accumulate);
}

static const float *row_of(const mha_tensor *t, int64_t b, int64_t h, int64_t i)
{
    return t->data + b * t->stride[0] + h * t->stride[1] + i * t->stride[2];
}

/* The rows' normalisation and delta_i = dO_i . O_i.  delta is computed
 * (pair_dots) as the same chain of multiply-adds as gemm_tile computes
 * dP_ij = dO_i . V_j, so where O_i = V_j (a row that sees one key) dP -
 * delta is exactly 0, as the softmax's gradient must be.  Where dP comes
 * from the split products instead, such a row (p = 1, so mul = 1) is one
 * exact_rows_range recomputes from the sweep's own dP: delta = dP there. */
typedef struct rows_job {
    const bwd_job *j;
    const mha_tensor *out; /* NULL: shift and mul only (mha__attn_row_sums) */
    const mha__row_norm *norm;
} rows_job;

/* Rows i0 .. of x for (b, head h), as a strided matrix. */
static mha__strided rows_at(const mha_tensor *x, int64_t b, int64_t h, int64_t i0)
{
    return (mha__strided){row_of(x, b, h, i0), x->stride[2], x->stride[3]};
}

/* delta of rows begin .. end - 1, a run of one (batch, head) at a time. */
static void row_deltas(const rows_job *rj, int64_t begin, int64_t end)
{
    const bwd_job *j = rj->j;
    const mha__attn_plan *p = j->p;
    for (int64_t row = begin, run; row < end; row += run) {
        int64_t b = row / (p->Hq * p->L), h = row / p->L % p->Hq, i = row % p->L;
        run = end - row < p->L - i ? end - row : p->L - i;
        mha__strided o = rows_at(rj->out, b, h, i), d = rows_at(j->dout, b, h, i);
        j->kt->pair_dots(run, p->Dv, o.data, o.rs, o.cs, d.data, d.rs, d.cs, j->delta + row);
    }
}

static void rows_range(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const rows_job *rj = arg;
    const bwd_job *j = rj->j;
    if (rj->norm->delta) /* the whole rows', given */
        memcpy(j->delta + begin, rj->norm->delta + begin, (size_t)(end - begin) * sizeof(float));
    else if (rj->out) row_deltas(rj, begin, end);
    if (j->delta_lo) memset(j->delta_lo + begin, 0, (size_t)(end - begin) * sizeof(float));
    for (int64_t row = begin; row < end; row++) {
        /* A row that saw no key: every p is 0 (shift 0 keeps exp finite). */
        if (rj->norm->lse) {
            float lse = rj->norm->lse[row];
            bool seen = lse > -INFINITY;
            j->shift[row] = seen ? lse : 0.0f;
            j->mul[row] = seen ? 1.0f : 0.0f;
        } else {
            float sum = rj->norm->sum[row];
            j->shift[row] = sum > 0 ? rj->norm->max[row] : 0.0f;
            j->mul[row] = sum > 0 ? 1.0f / sum : 0.0f;
        }
    }
}

/* ---------------------------------------------------------------- */
/* The scores and dP from split products (kernels.h), for the plans    */
/* whose forward takes them (products_split.c)                        */
/* ---------------------------------------------------------------- */

/* The same chains as the forward's scores, so the backward's scores are
 * the forward's bits and its probabilities the forward's.  dV, dK and dQ
 * (split_grads) take split products too, from P and dS split for every
 * block pair, three times: P^T and dS^T as A's row tiles along the
 * queries (dV = P^T dO, dK = dS^T Q), dS^T as B's column tiles down the
 * keys (dQ^T = K^T dS^T, summed transposed over a pass's key blocks and
 * added to dQ's rows once a pass: no transpose of dS).  Their other
 * operands are split once a query block (Q and dO rows) or once a pass
 * (K^T, with K and V).  The twenty-fifth session counted that the splits would
 * cost what the tiles save; since then the split kernel's reloads and
 * the P filler got faster (docs/PERFORMANCE.md). */

enum { SLOT_K, SLOT_V, SLOT_KT }; /* a slot's parts, in order */

/* Slot `slot`'s K row tiles, its V row tiles, or its K^T row tiles. */
static uint16_t *slot_tiles(const bwd_job *j, const bwd_tiles *t, int64_t slot, int part)
{
    const mha__attn_plan *p = j->p;
    bwd_split_sizes z = bwd_split_sizes_of(p);
    int64_t k_part = BK / SPLIT_ROWS * mha__split_run(mha__split_blocks(p->D));
    return t->kvs + slot * (z.kv + z.key_cols) + (part == SLOT_K ? 0 : part == SLOT_V ? k_part : z.kv);
}

/* Key block [j0, j0+cols) of kv head g, K's rows and (with `values`)
 * V's, split into slot `slot`, each marked finite or not; rows whose
 * values are not contiguous, and V's when not split, are marked not
 * finite, so the float32 products take them. */
static void split_key_block(const bwd_job *j, bwd_tiles *t, int64_t b, int64_t g, int64_t j0, int64_t cols,
                            int64_t slot, bool values)
{
    const mha__attn_plan *p = j->p;
    const mha_tensor *k = j->k, *v = j->v;
    t->kv_finite[3 * slot + SLOT_K] =
        k->stride[3] == 1 && mha__split_tiles_near(p->bk, false, row_of(k, b, g, j0), k->stride[2], BK / SPLIT_ROWS,
                                                   cols, p->D, slot_tiles(j, t, slot, SLOT_K));
    t->kv_finite[3 * slot + SLOT_V] =
        values && v->stride[3] == 1 &&
        mha__split_tiles_near(p->bk, false, row_of(v, b, g, j0), v->stride[2], BK / SPLIT_ROWS, cols, p->Dv,
                              slot_tiles(j, t, slot, SLOT_V));
    t->kv_finite[3 * slot + SLOT_KT] = false;
}

/* The same key block's K^T into slot `slot` as A's row tiles of 16
 * dimensions, k along the keys (dQ^T = K^T dS^T): pairs of keys down
 * column tiles of K, each transposed.  Where K's tiles are not there
 * (strided or not finite), neither is K^T: dQ then takes the float32
 * product. */
static void split_key_columns(const bwd_job *j, bwd_tiles *t, int64_t b, int64_t g, int64_t j0, int64_t cols,
                              int64_t slot)
{
    const mha__attn_plan *p = j->p;
    uint16_t *dst = slot_tiles(j, t, slot, SLOT_KT);
    int64_t kb = mha__split_blocks(cols), run = mha__split_run(kb);
    bool ok =
        t->kv_finite[3 * slot + SLOT_K] &&
        mha__split_tiles_near(p->bk, true, row_of(j->k, b, g, j0), j->k->stride[2], p->D / SPLIT_ROWS, p->D, cols, dst);
    for (int64_t i = 0; ok && i < p->D / SPLIT_ROWS; i++)
        for (int64_t bb = 0; bb < kb; bb++) p->bk->split_transpose(dst + i * run + bb * 3 * MHA_SPLIT_TILE);
    t->kv_finite[3 * slot + SLOT_KT] = ok;
}

/* dst ([BK][BQ]) = S^T = K (scale Q)^T, or with `values` dP^T = V dO^T,
 * for key block `slot` and the packed query block, from the split
 * products; rows and columns up to the next 32 hold zeros' products.
 * False, nothing written, where the split operands are not all finite
 * or there are none (slot < 0): the float32 products then take them. */
static bool split_scores(const bwd_job *j, const bwd_tiles *t, int64_t slot, bool values, int64_t rows, int64_t cols,
                         float *dst)
{
    const mha__attn_plan *p = j->p;
    if (slot < 0 || !t->kv_finite[3 * slot + values] || !(values ? t->dos_finite : t->qs_finite)) return false;
    int64_t kb = mha__split_blocks(values ? p->Dv : p->D), run = mha__split_run(kb);
    const uint16_t *a = slot_tiles(j, t, slot, values ? SLOT_V : SLOT_K), *columns = values ? t->dos : t->qs;
    for (int64_t r = 0; r < rows; r += PAIR)
        p->bk->gemm_split((cols + PAIR - 1) / PAIR, kb, a, run, columns + r / SPLIT_ROWS * run, dst + r, BQ,
                          MHA_SPLIT_STORE, NULL);
    return true;
}

/* The tiles' configuration released at the end of a thread's run of
 * items (kernels.h). */
static void release_split(const bwd_job *j)
{
    if (j->p->split) j->p->bk->split_release();
}

/* Packs the query block's (scale Q)^T and dO^T (times 1: exact), and
 * finds its wide rows as the forward does (attention.h: refined scores;
 * the keys' largest norm found before the items). */
static void pack_block(const bwd_job *j, bwd_tiles *t, int64_t b, int64_t h, int64_t i0, int64_t rows)
{
    const mha__attn_plan *p = j->p;
    mha__wide_rows(p, j->q, j->q_norm2, b, h, i0, rows, j->k_norm2[b * p->Hkv + h / p->group], t->wide);
    mha__pack_columns(j->kt, t->qt, BQ, rows_at(j->q, b, h, i0), rows, p->D, p->scale);
    mha__pack_columns(j->kt, t->dot, BQ, rows_at(j->dout, b, h, i0), rows, p->Dv, 1.0f);
    if (!p->split) return;
    /* All BQ / 16 column tiles, zeros past the rows: every pair is whole. */
    t->qs_finite = mha__split_tiles_near(p->bk, true, t->qt, BQ, BQ / SPLIT_ROWS, rows, p->D, t->qs);
    t->dos_finite = mha__split_tiles_near(p->bk, true, t->dot, BQ, BQ / SPLIT_ROWS, rows, p->Dv, t->dos);
}

/* Rows i0 .. i0+n of x (K, Q or dO) for (b, head h), `width` elements
 * each, as a B operand: in place when their elements are contiguous, else
 * gathered into `gathered` ([n][width]). */
static const float *operand_rows(const mha_tensor *x, int64_t b, int64_t h, int64_t i0, int64_t n, int64_t width,
                                 float *gathered, int64_t *ld)
{
    const float *x0 = row_of(x, b, h, i0);
    *ld = x->stride[2];
    if (x->stride[3] == 1) return x0;
    for (int64_t r = 0; r < n; r++)
        for (int64_t c = 0; c < width; c++) gathered[r * width + c] = x0[r * x->stride[2] + c * x->stride[3]];
    *ld = width;
    return gathered;
}

static void row_ranges(const bwd_job *j, bwd_tiles *t, int64_t i0, int64_t rows)
{
    for (int64_t r = 0; r < rows; r++) mha__row_key_range(j->p, i0 + r, &t->lo[r], &t->hi[r]);
}

/* Does key block [j0, j0+cols) meet any visible range of the packed rows,
 * and if so, is every key of it visible to every row without bias? */
static bool block_visible(const bwd_job *j, const bwd_tiles *t, int64_t rows, int64_t j0, int64_t cols, bool *plain)
{
    const mha__attn_plan *p = j->p;
    bool exact = p->softcap == 0 && !mha__plan_has_bias(p);
    if (j0 >= p->R) { /* appended keys: seen by every row */
        *plain = p->softcap == 0;
        return true;
    }
    /* Ranges grow with the row: the first row has the smallest hi, the last
     * the largest lo. */
    int64_t lo_first = t->lo[0], hi_first = t->hi[0], lo_last = t->lo[rows - 1], hi_last = t->hi[rows - 1];
    *plain = exact && j0 >= lo_last && j0 + cols <= hi_first;
    return j0 < hi_last && j0 + cols > lo_first;
}

/* Where some of the block's scores are large (attention.h: refined
 * scores), they become x = s - shift row by row, refined where marked
 * (with the cap's slope); the probabilities are then exp(x) (a zero
 * shift). */
static void refine_block(const bwd_job *j, bwd_tiles *t, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                         int64_t cols, const float *shift)
{
    const mha__attn_plan *p = j->p;
    const mha_tensor *k = j->k;
    mha__strided ks = {row_of(k, b, h / p->group, j0), k->stride[2], k->stride[3]};
    mha__score_source src = mha__score_rows(j->q, b, h, i0, j0, ks);
    mha__panel_of(p, &src, rows, t->qd, BQ, &t->qd_row);
    float anchor[BQ];
    memcpy(anchor, shift, (size_t)rows * sizeof(float));
    mha__shift_tile(p, &src, t->st, BQ, rows, cols, anchor, true, &t->refine, p->softcap > 0 ? t->slope : NULL);
}

/* dP of a plan with few rows (attention.h: refined scores) in float64,
 * rounded once.  A float32 chain over Dv = 128 errs by several ulps of
 * dP, and where a row's probability is split between keys far apart
 * that error is dq's: x10 inputs at d = 128, twenty times PyTorch's dq
 * error; at x1, two rows against 66 keys, dk's 6.7 times (PyTorch's
 * blocked sums err less than one chain, and over few rows the largest
 * error is a handful of roundings; docs/NUMERICS.md).  Sixteen rows at a
 * time from the panel kernel, dO's rows widened once a block (as Q's for
 * the refined scores); V's rows a column apart take the ordered dot,
 * which gives the same bits. */
enum { DP_PANEL = 16 };

static void refine_dp(const bwd_job *j, bwd_tiles *t, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                      int64_t cols)
{
    const mha__attn_plan *p = j->p;
    const mha_tensor *v = j->v, *dout = j->dout;
    const float *vb = row_of(v, b, h / p->group, j0), *d0 = row_of(dout, b, h, i0);
    bool panel = v->stride[3] == 1 && t->dod;
    if (panel) mha__widen_panel(d0, dout->stride[2], dout->stride[3], rows, p->Dv, t->dod, BQ, &t->dod_row);
    double dot[BK * DP_PANEL];
    for (int64_t r0 = 0; r0 < rows; r0 += DP_PANEL) {
        int64_t n = rows - r0 < DP_PANEL ? rows - r0 : DP_PANEL;
        if (panel) p->kt->dots_f64_panel(vb, v->stride[2], cols, t->dod + r0, BQ, n, p->Dv, dot, DP_PANEL);
        for (int64_t r = r0; r < r0 + n; r++)
            for (int64_t c = 0; c < cols; c++)
                t->dpt[c * BQ + r] =
                    (float)(panel ? dot[c * DP_PANEL + r - r0]
                                  : mha__dot_f64_ordered(vb + c * v->stride[2], v->stride[3], d0 + r * dout->stride[2],
                                                         dout->stride[3], p->Dv));
    }
}

/* For key rows k_j0.. and the packed query block: st = P^T and dpt =
 * (P o (dP - delta))^T, with delta for the block's rows (and, under
 * softcap, the cap's slope in t->slope).  Without `dp` the dP product is
 * skipped and dpt must hold zeros (it then stays 0 with a zero delta).
 * The scores and dP come from the split products where the key block
 * is split in slot `slot` (-1: none). */
static void block_probabilities(const bwd_job *j, bwd_tiles *t, int64_t b, int64_t h, int64_t i0, int64_t rows,
                                int64_t j0, int64_t cols, int64_t slot, bool plain, bool dp, const float *delta)
{
    const mha__attn_plan *p = j->p;
    const mha__kernels *kt = j->kt;
    const mha_tensor *k = j->k, *v = j->v;
    int64_t g = h / p->group;
    const float *kb = row_of(k, b, g, j0), *vb = row_of(v, b, g, j0);
    if (!split_scores(j, t, slot, false, rows, cols, t->st))
        product(kt, cols, rows, p->D, kb, k->stride[2], k->stride[3], t->qt, BQ, t->st, BQ, 0);
    bool capped = p->softcap > 0;
    mha__refine_raw(p, t->st, BQ, rows, cols, j0, plain ? NULL : t->lo, plain ? NULL : t->hi, t->wide, &t->refine);
    if (!plain) {
        mha__score_contract(p, t->st, BQ, b, h, i0, rows, j0, cols, t->lo, t->hi, capped ? t->slope : NULL);
        mha__refine_contracted(p, t->st, BQ, rows, cols, &t->refine);
    }
    if (dp && mha__refine_few(p)) /* in float64 instead of the float32 product */
        refine_dp(j, t, b, h, i0, rows, j0, cols);
    else if (dp && !split_scores(j, t, slot, true, rows, cols, t->dpt))
        product(kt, cols, rows, p->Dv, vb, v->stride[2], v->stride[3], t->dot, BQ, t->dpt, BQ, 0);
    const float *shift = j->shift + (b * p->Hq + h) * p->L + i0;
    if (t->refine.any) {
        refine_block(j, t, b, h, i0, rows, j0, cols, shift);
        shift = t->zero;
    }
    kt->softmax_grad(t->st, t->dpt, BQ, rows, cols, shift, j->mul + (b * p->Hq + h) * p->L + i0, delta);
}

/* dS -= p delta_lo for rows whose delta has a part below float32: with
 * dP - delta exact near delta (Sterbenz), dS = p ((dP - hi) - lo) is
 * good to a few ulps of dS itself, where delta rounded to float32 alone
 * is good to an ulp of dP -- a percent of dS in a row whose second key
 * has p ~ 1e-5. */
static void subtract_delta_lo(bwd_tiles *t, const float *lo, int64_t rows, int64_t cols)
{
    bool any = false;
    for (int64_t r = 0; r < rows; r++) any = any || lo[r] != 0.0f;
    if (!any) return;
    for (int64_t c = 0; c < cols; c++)
        for (int64_t r = 0; r < rows; r++) t->dpt[c * BQ + r] -= t->st[c * BQ + r] * lo[r];
}

/* For key rows k_j0.. and the packed query block: st = P^T, dpt = dS^T. */
static void score_gradients(const bwd_job *j, bwd_tiles *t, int64_t b, int64_t h, int64_t i0, int64_t rows, int64_t j0,
                            int64_t cols, int64_t slot, bool plain)
{
    const mha__attn_plan *p = j->p;
    int64_t row0 = (b * p->Hq + h) * p->L + i0;
    block_probabilities(j, t, b, h, i0, rows, j0, cols, slot, plain, true, j->delta + row0);
    subtract_delta_lo(t, j->delta_lo + row0, rows, cols);
    if (p->softcap == 0) return;
    for (int64_t c = 0; c < cols; c++)
        for (int64_t r = 0; r < rows; r++) /* masked scores have p = 0, so dS = 0 whatever the slope */
            if (t->st[c * BQ + r] != 0.0f) t->dpt[c * BQ + r] *= t->slope[c * BQ + r];
}

/* Key block [j0, j0+cols) of item `item`'s numbering. */
static void key_block(const bwd_job *j, int64_t kb, int64_t *j0, int64_t *cols)
{
    const mha__attn_plan *p = j->p;
    int64_t real_blocks = (p->R + BK - 1) / BK;
    *j0 = kb < real_blocks ? kb * BK : p->R;
    *cols = kb < real_blocks ? (p->R - *j0 < BK ? p->R - *j0 : BK) : p->S - p->R;
}

/* Elements per run of the row loops below: a fixed count, and every
 * load of a run made into a local array before its stores, which -O2's
 * vectoriser takes (a loop of unknown count, or whose stores might alias
 * its loads, it leaves scalar). */
enum { RUN = 16 };

/* An item's dK or dV sums, scaled, into their rows: where a row's
 * elements are side by side, in runs of RUN (element by element, 5% of
 * the attention backward at N = 512). */
static void write_scaled(float *dst, const int64_t stride[4], const float *src, int64_t rows, int64_t width,
                         float scale)
{
    for (int64_t r = 0; r < rows; r++) {
        float *d = dst + r * stride[2];
        const float *s = src + r * width;
        int64_t c = 0;
        for (; stride[3] == 1 && c + RUN <= width; c += RUN) {
            float run[RUN];
            for (int64_t v = 0; v < RUN; v++) run[v] = s[c + v] * scale;
            memcpy(d + c, run, sizeof run);
        }
        for (; c < width; c++) d[c * stride[3]] = s[c] * scale;
    }
}

/* Partial dQ sum `g` at (b, h, row i), and the distance between its rows. */
static float *partial_row(const bwd_job *j, int64_t g, int64_t b, int64_t h, int64_t i, int64_t *ld)
{
    const mha__attn_plan *p = j->p;
    if (g == 0 && j->first_is_dq) {
        *ld = j->dq->stride[2];
        return j->dq->data + b * j->dq->stride[0] + h * j->dq->stride[1] + i * j->dq->stride[2];
    }
    *ld = p->D;
    return j->partial + (g - j->first_is_dq) * p->B * p->Hq * p->L * p->D + ((b * p->Hq + h) * p->L + i) * p->D;
}

/* The query block's Q and dO rows as B's column tiles, k down the
 * queries (dK = dS^T Q, dV = P^T dO), and its dQ^T sum cleared. */
static void split_query_rows(const bwd_job *j, bwd_tiles *t, const float *qr, int64_t ldqr, const float *dor,
                             int64_t lddo, int64_t rows)
{
    const mha__attn_plan *p = j->p;
    t->qb_finite = mha__split_tiles_near(p->bk, true, qr, ldqr, p->D / SPLIT_ROWS, p->D, rows, t->qb);
    t->dob_finite = mha__split_tiles_near(p->bk, true, dor, lddo, p->Dv / SPLIT_ROWS, p->Dv, rows, t->dob);
    memset(t->dqt, 0, (size_t)(p->D * BQ) * sizeof(float));
}

/* A block pair's float32 operands, for the products that fall back. */
typedef struct block_operands {
    const float *qr;
    int64_t ldqr;
    const float *dor;
    int64_t lddo;
    const float *kr;
    int64_t ldk;
} block_operands;

/* acc (+)= X^T B, X = P or dS ([BK][BQ] key-major: its rows are A's
 * rows, k along the queries), B split as `columns` (k down the
 * queries), 32 of acc's `width` columns a call; false, nothing added,
 * where X is not finite. */
static bool add_key_rows(const bwd_job *j, bwd_tiles *t, const float *x, int64_t rows, int64_t cols,
                         const uint16_t *columns, float *acc, int64_t width)
{
    const mha__bf16_kernels *bk = j->p->bk;
    int64_t kb = mha__split_blocks(rows), run = mha__split_run(kb), pairs = (cols + PAIR - 1) / PAIR;
    if (!mha__split_tiles_near(bk, false, x, BQ, 2 * pairs, cols, rows, t->grad)) return false;
    for (int64_t c0 = 0; c0 < width; c0 += PAIR)
        bk->gemm_split(pairs, kb, t->grad, run, columns + c0 / SPLIT_ROWS * run, acc + c0, width, MHA_SPLIT_ADD, NULL);
    return true;
}

/* dV += P^T dO, dK += dS^T Q (unscaled) and the query block's dQ^T +=
 * K^T dS^T, from split products; each product whose operands are not
 * all finite (or K's rows strided) takes the float32 tiles instead, the
 * same sums in float32 chains. */
static void split_block_grads(const bwd_job *j, bwd_tiles *t, int64_t slot, int64_t rows, int64_t cols,
                              block_operands f, float *acc_v, float *acc_k)
{
    const mha__attn_plan *p = j->p;
    const mha__kernels *kt = j->kt;
    if (!t->dob_finite || !add_key_rows(j, t, t->st, rows, cols, t->dob, acc_v, p->Dv))
        product(kt, cols, p->Dv, rows, t->st, BQ, 1, f.dor, f.lddo, acc_v, p->Dv, 1);
    if (!t->qb_finite || !add_key_rows(j, t, t->dpt, rows, cols, t->qb, acc_k, p->D))
        product(kt, cols, p->D, rows, t->dpt, BQ, 1, f.qr, f.ldqr, acc_k, p->D, 1);
    int64_t kb = mha__split_blocks(cols), run = mha__split_run(kb), pairs = (rows + PAIR - 1) / PAIR;
    if (t->kv_finite[3 * slot + SLOT_KT] &&
        mha__split_tiles_near(p->bk, true, t->dpt, BQ, 2 * pairs, rows, cols, t->grad)) {
        const uint16_t *kcols = slot_tiles(j, t, slot, SLOT_KT);
        for (int64_t r0 = 0; r0 < rows; r0 += PAIR)
            p->bk->gemm_split(p->D / PAIR, kb, kcols, run, t->grad + r0 / SPLIT_ROWS * run, t->dqt + r0, BQ,
                              MHA_SPLIT_ADD, NULL);
    } else {
        product(kt, p->D, rows, cols, f.kr, 1, f.ldk, t->dpt, BQ, t->dqt, BQ, 1);
    }
}

/* dq_rows (+)= dqt^T: rows x width from [width][BQ], turned by the
 * kernel's transpose (times 1: exact) into `rows_of` first, so that the
 * adds run along rows; the same adds as element by element, which read
 * dqt a column at a time and were 2-3% of the backward at N = 512. */
static void add_transposed(const mha__kernels *kt, float *dq_rows, int64_t ldq, const float *dqt, int64_t rows,
                           int64_t width, float *rows_of)
{
    kt->transpose_scaled(rows_of, width, dqt, BQ, width, rows, 1.0f);
    for (int64_t r = 0; r < rows; r++) {
        float *d = dq_rows + r * ldq;
        const float *s = rows_of + r * width;
        int64_t c = 0;
        for (; c + RUN <= width; c += RUN) {
            float run[RUN];
            for (int64_t v = 0; v < RUN; v++) run[v] = d[c + v] + s[c + v];
            memcpy(d + c, run, sizeof run);
        }
        for (; c < width; c++) d[c] += s[c];
    }
}

/* One pass of a sweep: the item's key blocks m0 .. m1-1 (of its `mine`)
 * against every query block of every head of kv head g's group.  Each
 * query block is packed once a pass, and its dQ rows (partial sum
 * `group`) stay in cache while the pass's key blocks go by; those blocks'
 * K and V rows (split once a pass, where the scores are) and dK, dV sums
 * stay in L2 across the query blocks. */
static void sweep_pass(const bwd_job *j, bwd_tiles *t, int64_t b, int64_t g, int64_t group, int64_t m0, int64_t m1)
{
    const mha__attn_plan *p = j->p;
    const mha__kernels *kt = j->kt;
    for (int64_t m = m0; m < m1 && p->split; m++) {
        int64_t j0, cols;
        key_block(j, group + m * j->groups, &j0, &cols);
        split_key_block(j, t, b, g, j0, cols, m - m0, true);
        if (split_grads(p)) split_key_columns(j, t, b, g, j0, cols, m - m0);
    }
    for (int64_t h = g * p->group; h < (g + 1) * p->group; h++)
        for (int64_t qb = 0; qb < j->q_blocks; qb++) {
            int64_t i0 = qb * BQ, rows = p->L - i0 < BQ ? p->L - i0 : BQ, ldq, ldqr = 0, lddo = 0;
            float *dq_rows = partial_row(j, group, b, h, i0, &ldq);
            const float *qr = NULL, *dor = NULL;
            bool packed = false;
            row_ranges(j, t, i0, rows);
            for (int64_t m = m0; m < m1; m++) {
                int64_t j0, cols, ldk;
                bool plain;
                key_block(j, group + m * j->groups, &j0, &cols);
                if (!block_visible(j, t, rows, j0, cols, &plain)) continue;
                if (!packed) {
                    pack_block(j, t, b, h, i0, rows);
                    qr = operand_rows(j->q, b, h, i0, rows, p->D, t->qr, &ldqr);
                    dor = operand_rows(j->dout, b, h, i0, rows, p->Dv, t->dor, &lddo);
                    if (split_grads(p)) split_query_rows(j, t, qr, ldqr, dor, lddo, rows);
                    packed = true;
                }
                const float *kr = operand_rows(j->k, b, g, j0, cols, p->D, t->kr, &ldk);
                score_gradients(j, t, b, h, i0, rows, j0, cols, p->split ? m - m0 : -1, plain);
                float *acc_v = t->acc_v + m * BK * p->Dv, *acc_k = t->acc_k + m * BK * p->D;
                if (split_grads(p)) {
                    split_block_grads(j, t, m - m0, rows, cols, (block_operands){qr, ldqr, dor, lddo, kr, ldk}, acc_v,
                                      acc_k);
                    continue;
                }
                product(kt, cols, p->Dv, rows, t->st, BQ, 1, dor, lddo, acc_v, p->Dv, 1);
                product(kt, cols, p->D, rows, t->dpt, BQ, 1, qr, ldqr, acc_k, p->D, 1);
                product(kt, rows, p->D, cols, t->dpt, 1, BQ, kr, ldk, dq_rows, ldq, 1);
            }
            if (packed && split_grads(p)) add_transposed(kt, dq_rows, ldq, t->dqt, rows, p->D, t->dq_block);
        }
}

/* Item (b, kv head g, group): the key blocks group, group + G, ... of kv
 * head g, against every query block of every head of the group, in
 * passes of j->pass_blocks key blocks.  dK and dV accumulate per key
 * block in the thread's tiles and are written at the end, after the last
 * read of K and V (dk, dv may alias k, v: no other item reads these rows).
 * Every sum runs in a fixed order whatever the passes: dK, dV over (head,
 * query block), dQ over key blocks. */
static void sweep_item(const bwd_job *j, bwd_tiles *t, int64_t b, int64_t g, int64_t group)
{
    const mha__attn_plan *p = j->p;
    int64_t mine = (j->k_blocks - group + j->groups - 1) / j->groups;
    memset(t->acc_k, 0, (size_t)(mine * BK * p->D) * sizeof(float));
    memset(t->acc_v, 0, (size_t)(mine * BK * p->Dv) * sizeof(float));
    for (int64_t m0 = 0; m0 < mine; m0 += j->pass_blocks)
        sweep_pass(j, t, b, g, group, m0, m0 + j->pass_blocks < mine ? m0 + j->pass_blocks : mine);
    for (int64_t m = 0; m < mine; m++) {
        int64_t j0, cols;
        key_block(j, group + m * j->groups, &j0, &cols);
        write_scaled(j->dk->data + b * j->dk->stride[0] + g * j->dk->stride[1] + j0 * j->dk->stride[2], j->dk->stride,
                     t->acc_k + m * BK * p->D, cols, p->D, p->scale);
        write_scaled(j->dv->data + b * j->dv->stride[0] + g * j->dv->stride[1] + j0 * j->dv->stride[2], j->dv->stride,
                     t->acc_v + m * BK * p->Dv, cols, p->Dv, 1.0f);
    }
}

static void sweep_range(void *arg, int thread, int64_t begin, int64_t end)
{
    const bwd_job *j = arg;
    bwd_tiles t = bwd_tiles_at(j, thread);
    for (int64_t item = begin; item < end; item++) {
        int64_t group = item % j->groups, bg = item / j->groups;
        sweep_item(j, &t, bg / j->p->Hkv, bg % j->p->Hkv, group);
    }
    release_split(j);
}

/* The rows of a query block that the softmax's gradient would cancel
 * badly from delta = dO . O: those whose largest probability passes 1/2.
 * There dP_ij - delta_i is a small difference of two large dot products
 * whose float32 errors are independent, and the difference's error grows
 * as 1 / (1 - p_max): with logits in the tens, a hundred times PyTorch's,
 * which takes delta as sum_j P_ij dP_ij from the same dP, so that dP's
 * error cancels with weight p_max.  From the forward's (max, sum), p_max
 * is mul = 1 / sum; from an lse alone it is known only after the pass
 * that renormalises (below). */
static bool block_peaked(const bwd_job *j, int64_t row0, int64_t rows)
{
    for (int64_t r = 0; r < rows; r++)
        if (j->mul[row0 + r] > 0.5f) return true;
    return false;
}

/* Sums over every key of a query block's rows, in float64 and key order,
 * from the same p (and dP) as the sweep's: sum[r] of p, top[r] the
 * largest p, and given ref (else NULL) wsum[r] of p (dP - ref[r]).  A
 * ref near the row's delta keeps the float32 products p (dP - ref) small
 * and their rounding with them: dP - ref is exact near it (Sterbenz). */
typedef struct row_sums {
    double sum[BQ], wsum[BQ];
    float top[BQ];
} row_sums;

static void sum_rows(const bwd_job *j, bwd_tiles *t, int64_t b, int64_t h, int64_t i0, int64_t rows, const float *ref,
                     row_sums *s)
{
    bool weighted = ref != NULL;
    float zero[BQ] = {0};
    memset(s, 0, sizeof *s);
    if (!weighted) memset(t->dpt, 0, (size_t)(BK * BQ) * sizeof(float)); /* stays 0: no dP, zero delta */
    for (int64_t kb = 0; kb < j->k_blocks; kb++) {
        int64_t j0, cols;
        bool plain;
        key_block(j, kb, &j0, &cols);
        if (!block_visible(j, t, rows, j0, cols, &plain)) continue;
        if (j->p->split) split_key_block(j, t, b, h / j->p->group, j0, cols, 0, weighted); /* V only for dP */
        block_probabilities(j, t, b, h, i0, rows, j0, cols, j->p->split ? 0 : -1, plain, weighted,
                            weighted ? ref : zero); /* dpt = P o (dP - ref) */
        j->kt->key_sums(t->st, weighted ? t->dpt : NULL, BQ, rows, cols, s->sum, s->wsum, s->top);
    }
}

/* Item (batch, head, query block) of the row passes: its batch, head,
 * first row and rows, and that row's index in [B, Hq, L]. */
static void query_item(const bwd_job *j, int64_t item, int64_t *b, int64_t *h, int64_t *i0, int64_t *rows,
                       int64_t *row0)
{
    const mha__attn_plan *p = j->p;
    int64_t bh = item / j->q_blocks;
    *b = bh / p->Hq, *h = bh % p->Hq, *i0 = item % j->q_blocks * BQ;
    *rows = p->L - *i0 < BQ ? p->L - *i0 : BQ;
    *row0 = bh * p->L + *i0;
}

/* Item (batch, head, query block).  From an lse alone (from_lse), each
 * row's mul is first divided by its recomputed sum of p: a float32 lse is
 * off by up to half an ulp of |lse|, which scales the row by one factor
 * that this cancels.  Then, where the block is peaked (block_peaked; from
 * an lse, known only now), delta = sum_j p_ij dP_ij / sum_j p_ij:
 * normalised by the very sum of the p the sweep uses, a row that sees one
 * key (p = 1 +- an ulp) gets delta = dP exactly and dS = 0, as the
 * softmax's gradient must be.  The sums are taken relative to dO . O
 * (sum_rows' ref), and delta kept as float32 hi + lo (subtract_delta_lo):
 * where dP - delta is 1e-5 of dP, an ulp of dP is a percent of dS. */
static void exact_rows_range(void *arg, int thread, int64_t begin, int64_t end)
{
    const bwd_job *j = arg;
    bwd_tiles t = bwd_tiles_at(j, thread);
    row_sums s;
    for (int64_t item = begin; item < end; item++) {
        int64_t b, h, i0, rows, row0;
        query_item(j, item, &b, &h, &i0, &rows, &row0);
        bool peaked = !j->from_lse && block_peaked(j, row0, rows);
        if (!j->from_lse && !peaked) continue;
        pack_block(j, &t, b, h, i0, rows);
        row_ranges(j, &t, i0, rows);
        if (j->from_lse) {
            sum_rows(j, &t, b, h, i0, rows, NULL, &s);
            for (int64_t r = 0; r < rows; r++) {
                j->mul[row0 + r] = s.sum[r] > 0 ? (float)(j->mul[row0 + r] / s.sum[r]) : 0.0f;
                peaked = peaked || (s.sum[r] > 0 && s.top[r] > 0.5 * s.sum[r]);
            }
            if (!peaked) continue;
        }
        float *ref = j->delta + row0; /* dO . O, each row's replaced after its own use */
        sum_rows(j, &t, b, h, i0, rows, ref, &s);
        for (int64_t r = 0; r < rows; r++) {
            double delta = s.sum[r] > 0 ? ref[r] + s.wsum[r] / s.sum[r] : 0.0;
            j->delta[row0 + r] = (float)delta;
            j->delta_lo[row0 + r] = isfinite(delta) ? (float)(delta - (double)j->delta[row0 + r]) : 0.0f;
        }
    }
    release_split(j);
}

enum { MAX_GROUPS = 4 }; /* key_groups' largest */

/* dq = scale * (partial 0 + partial 1 + ...), in that order, per row.
 * Each row's partial sums are found once, not once an element: the call
 * per element (partial_row) was 6.4% of the attention backward at N =
 * 512, where there is one group and this is only the scaling. */
static void finish_range(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const bwd_job *j = arg;
    const mha__attn_plan *p = j->p;
    int64_t cs = j->dq->stride[3];
    for (int64_t row = begin; row < end; row++) {
        int64_t b = row / (p->Hq * p->L), h = row / p->L % p->Hq, i = row % p->L, ld;
        float *dst = j->dq->data + b * j->dq->stride[0] + h * j->dq->stride[1] + i * j->dq->stride[2];
        const float *part[MAX_GROUPS];
        for (int64_t g = 0; g < j->groups; g++) part[g] = partial_row(j, g, b, h, i, &ld);
        int64_t c = 0;
        for (; cs == 1 && c + RUN <= p->D; c += RUN) { /* dst may be partial 0: each run read before it is written */
            float sum[RUN];
            for (int64_t v = 0; v < RUN; v++) sum[v] = part[0][c + v];
            for (int64_t g = 1; g < j->groups; g++)
                for (int64_t v = 0; v < RUN; v++) sum[v] += part[g][c + v];
            for (int64_t v = 0; v < RUN; v++) dst[c + v] = sum[v] * p->scale;
        }
        for (; c < p->D; c++) {
            float sum = part[0][c];
            for (int64_t g = 1; g < j->groups; g++) sum += part[g][c];
            dst[c * cs] = sum * p->scale;
        }
    }
}

static void zero_range(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const bwd_job *j = arg;
    const mha__attn_plan *p = j->p;
    for (int64_t row = begin; row < end; row++) {
        int64_t b = row / (p->Hq * p->L), h = row / p->L % p->Hq, i = row % p->L;
        int64_t ld;
        for (int64_t g = 0; g < j->groups; g++)
            memset(partial_row(j, g, b, h, i, &ld), 0, (size_t)p->D * sizeof(float));
    }
}

/* G: enough items for 8 threads when there are few (batch, kv head) pairs,
 * at most 4 and never more than the key blocks; a function of the shape
 * only, so the bits do not depend on the thread count. */
static int64_t key_groups(const mha__attn_plan *p, int64_t k_blocks)
{
    int64_t pairs = p->B * p->Hkv, g = pairs >= 8 ? 1 : (8 + pairs - 1) / pairs;
    g = g > MAX_GROUPS ? MAX_GROUPS : g;
    return g > k_blocks ? (k_blocks > 0 ? k_blocks : 1) : g;
}

/* dQ partial sums: in dq itself when its rows are contiguous, so the
 * first key group needs no buffer; [B, Hq, L, D] for each other group. */
static int64_t partial_groups(int64_t groups, bool dq_contiguous) { return groups - dq_contiguous; }

/* The row statistics (shift, mul, delta, delta_lo: 4 per row, and one spare) and
 * the dQ partials, in floats; false when that overflows. */
static bool row_floats(const mha__attn_plan *p, int64_t partials, int64_t *floats)
{
    int64_t n_rows = p->B * p->Hq * p->L, n_q; /* B Hq L: checked by the plan */
    return mha__mul(n_rows, p->D, &n_q) && mha__mul(n_q, partials, floats) &&
           mha__add(*floats, 4 * n_rows + 1, floats) && *floats <= INT64_MAX / (int64_t)sizeof(float);
}

static int64_t key_block_count(const mha__attn_plan *p) { return (p->R + BK - 1) / BK + (p->S > p->R); }

bool mha__attn_backward_workspace(const mha__attn_plan *p, const mha_ctx *ctx, bool dq_contiguous, int64_t *bytes)
{
    int64_t floats;
    if (!row_floats(p, partial_groups(key_groups(p, key_block_count(p)), dq_contiguous), &floats)) {
        mha__fail(MHA_ERR_INVALID_ARG, "the backward pass's %lld rows overflow", (long long)(p->B * p->Hq * p->L));
        return false;
    }
    return mha__ws_add(bytes, floats * (int64_t)sizeof(float), "the backward's rows") &&
           mha__ws_add(bytes, p->B * p->Hkv * (int64_t)sizeof(double), "the key norms") &&
           mha__ws_add_per_thread(bytes, ctx, bwd_tiles_floats(p), "the backward's tiles");
}

mha_status mha__attn_backward(mha_ctx *ctx, const mha__attn_plan *p, mha_tensor *dq, mha_tensor *dk, mha_tensor *dv,
                              const mha_tensor *q, const mha_tensor *k, const mha_tensor *v, const mha_tensor *out,
                              const mha_tensor *dout, const mha__row_norm *norm)
{
    int64_t n_rows = p->B * p->Hq * p->L, floats, top = mha__ws_top(ctx);
    bwd_job j = {
        .p = p,
        .kt = p->kt,
        .q = q,
        .k = k,
        .v = v,
        .dout = dout,
        .dq = dq,
        .dk = dk,
        .dv = dv,
        .q_blocks = (p->L + BQ - 1) / BQ,
        .k_blocks = key_block_count(p),
    };
    j.groups = key_groups(p, j.k_blocks);
    j.pass_blocks = pass_blocks(p);
    j.from_lse = norm->lse != NULL;
    j.first_is_dq = dq->stride[3] == 1;
    if (!row_floats(p, partial_groups(j.groups, j.first_is_dq), &floats)) return MHA_ERR_INTERNAL; /* planned */
    float *rows = mha__ws_take(ctx, floats * (int64_t)sizeof(float));
    /* Each kv head's largest key norm (attention.h: refined scores), before
     * the sweep: its items write dK over K where they alias.  The forward's,
     * where it kept them (the layer's tape). */
    j.q_norm2 = norm->q_norm2;
    j.k_norm2 = !rows ? NULL : norm->k_norm2_max ? norm->k_norm2_max : mha__keys_norm2_max_all(ctx, p, NULL, k);
    j.scratch = j.k_norm2 ? mha__ws_take_per_thread(ctx, bwd_tiles_floats(p), &j.scratch_stride) : NULL;
    if (!j.scratch) return MHA_ERR_INTERNAL;
    j.shift = rows;
    j.mul = rows + n_rows;
    j.delta = rows + 2 * n_rows;
    j.delta_lo = rows + 3 * n_rows;
    j.partial = rows + 4 * n_rows;
    rows_job rj = {&j, out, norm};
    mha__parallel_for(ctx, n_rows, rows_range, &rj); /* reads out, which dq may overwrite from here on */
    if (!norm->delta) mha__parallel_items(ctx, p->B * p->Hq * j.q_blocks, exact_rows_range, &j);
    mha__parallel_for(ctx, n_rows, zero_range, &j);
    mha__parallel_items(ctx, p->B * p->Hkv * j.groups, sweep_range, &j);
    mha__parallel_for(ctx, n_rows, finish_range, &j);
    mha__ws_release(ctx, top);
    return MHA_OK;
}

/* Row sums, item (batch, head, query block). */
typedef struct sums_job {
    bwd_job j;
    double *p_sum, *p_dp;
} sums_job;

static void row_sums_range(void *arg, int thread, int64_t begin, int64_t end)
{
    const sums_job *sj = arg;
    const bwd_job *j = &sj->j;
    bwd_tiles t = bwd_tiles_at(j, thread);
    row_sums s;
    for (int64_t item = begin; item < end; item++) {
        int64_t b, h, i0, rows, row0;
        query_item(j, item, &b, &h, &i0, &rows, &row0);
        pack_block(j, &t, b, h, i0, rows);
        row_ranges(j, &t, i0, rows);
        sum_rows(j, &t, b, h, i0, rows, t.zero, &s);
        for (int64_t r = 0; r < rows; r++) sj->p_sum[row0 + r] = s.sum[r], sj->p_dp[row0 + r] = s.wsum[r];
    }
    release_split(j);
}

void mha__attn_row_sums(mha_ctx *ctx, const mha__attn_plan *p, const mha_tensor *q, const mha_tensor *k,
                        const mha_tensor *v, const mha_tensor *dout, const mha__row_norm *norm, double *p_sum,
                        double *p_dp)
{
    int64_t n_rows = p->B * p->Hq * p->L, top = mha__ws_top(ctx);
    sums_job sj = {.j = {.p = p,
                         .kt = p->kt,
                         .q = q,
                         .k = k,
                         .v = v,
                         .dout = dout,
                         .q_blocks = (p->L + BQ - 1) / BQ,
                         .k_blocks = key_block_count(p)},
                   .p_sum = p_sum,
                   .p_dp = p_dp};
    float *rows = mha__ws_take(ctx, (3 * n_rows + 1) * (int64_t)sizeof(float)); /* planned by the caller */
    sj.j.k_norm2 = mha__keys_norm2_max_all(ctx, p, NULL, k);
    sj.j.scratch = mha__ws_take_per_thread(ctx, bwd_tiles_floats(p), &sj.j.scratch_stride);
    sj.j.shift = rows, sj.j.mul = rows + n_rows, sj.j.delta = rows + 2 * n_rows;
    rows_job rj = {&sj.j, NULL, norm};
    mha__parallel_for(ctx, n_rows, rows_range, &rj); /* shift and mul; no out, no delta */
    mha__parallel_items(ctx, p->B * p->Hq * sj.j.q_blocks, row_sums_range, &sj);
    mha__ws_release(ctx, top);
}
