/*
 * plan.c -- completing an attention plan and running its forward.
 *
 * Every attention forward (mha_attention, the layer, the KV cache's
 * decoding step) fills a plan's problem fields, then comes here: the
 * kernels, the driver and the workspace are decided once, in this file,
 * and the drivers only follow the plan.
 */
#include "attn/products.h"

mha__kv mha__kv_from_tensors(const mha_tensor *k, const mha_tensor *v)
{
    mha__kv kv = {.k = *k, .v = *v, .rows = {.dtype = MHA_DTYPE_F32}};
    bool rows_contiguous = k->stride[3] == 1 && v->stride[3] == 1;
    bool same_strides = k->stride[0] == v->stride[0] && k->stride[1] == v->stride[1] && k->stride[2] == v->stride[2];
    if (rows_contiguous && same_strides)
        kv.rows = (mha__kv_view){
            .k = k->data, .v = v->data, .dtype = MHA_DTYPE_F32, .stride = {k->stride[0], k->stride[1], k->stride[2]}};
    return kv;
}

/* The one choice between the drivers.  Split-K reads K and V once with
 * every thread on it, which is what a few query rows need; the tiles
 * reuse each K and V tile across many rows (a bf16 or int8 cache's tile
 * widened to float32 once per block of query rows: a prompt).  Only the
 * tiles produce row statistics, appended keys, Dv != D and bf16 products,
 * or read K and V without a row view.  Split-K's rows each read the
 * chunk's K and V from L2 again, a matrix-vector product a row, while a
 * tile of a few query rows costs about as much as one of a single row.
 * Where the two cross over float32 rows depends on the micro-kernels, so
 * each kernel table says (split_k_rows).  On Zen 4, against 4096 keys:
 * AVX-512's split-K takes four rows of a group at once (dot_rows_multi)
 * and wins to its limit of 16 (12 heads of 64: 1.73x at 8 rows, even at
 * 10, the tiles 1.09x at 12 and even at 15 over tensors, but split-K
 * 1.37x at 12 in a decoding step from a cache; 32 query heads on 8 of
 * 128: split-K 2.5x at 4 rows, 1.42x at 8, 1.08x at 12).  Before those
 * kernels, the tiles took over from 8 rows, and from 5 where query heads
 * share kv heads.  AVX2's tiles of 16 columns, against its one-row
 * split-K, win from 14 rows (split-K 1.28x at 12, the tiles 1.04x at 15)
 * and 10 shared (split-K 1.10x at 8, the tiles 1.28x at 12); the generic
 * kernels' split-K wins up to its limit.  The tiles widen a
 * bf16 or int8 cache's rows per block of query rows, which keeps split-K
 * to 16 rows there (12 rows: the tiles 1.4x and 1.7x slower;
 * docs/PERFORMANCE.md). */
static mha__attn_path choose_path(const mha__attn_plan *p, mha__attn_needs needs)
{
    if (!needs.kv_rows) return MHA__PATH_TILED;
    int64_t f32_rows = p->group > 1 ? p->kt->split_k_rows_shared : p->kt->split_k_rows;
    bool few_rows = p->L < (needs.kv_dtype == MHA_DTYPE_F32 ? mha__min64(f32_rows, MHA_DECODE_ROWS) : MHA_DECODE_ROWS);
    return few_rows && !needs.stats && !p->bf16 && p->D == p->Dv && p->R == p->S ? MHA__PATH_SPLIT_K : MHA__PATH_TILED;
}

/* One head's K and V as float32, the size the tiles' rules go by. */
static double head_kv_bytes(const mha__attn_plan *p) { return (double)p->S * (double)(p->D + p->Dv) * sizeof(float); }

/* 96 query rows per work item while one head's K and V fit in about
 * twice the L2 cache; beyond that, 192 rows share each pass over K and V
 * (measured at N = 2048 and 8192, d = 64: docs/PERFORMANCE.md).  The
 * split products (AMX) take 192 sooner: a thread splits each K and V
 * tile of its head once, and twice the rows use each split.  Where every
 * row sees every key that is all an item's size changes, from four
 * blocks of 192 rows up (the core at N = 2048 1.014x, 4096 1.063x, the
 * layer at 2048 1.009-1.017x; no change at 512 or 1024); under a causal
 * mask or a window a larger item also computes more of its diagonal
 * tiles' masked half, so 192 only once a head's K and V pass 1.5 MB
 * (causal N = 4096 1.035x, 2048 0.993-1.003x). */
static int64_t block_rows(const mha__attn_plan *p)
{
    double kv_bytes = head_kv_bytes(p);
    bool every_key = p->causal == MHA_CAUSAL_NONE && p->window_left < 0 && p->window_right < 0;
    if (p->split) return (every_key && p->L >= 4 * MHA__BR) || kv_bytes > 1.5e6 ? MHA__BR : MHA__BR / 2;
    return kv_bytes > 2.5e6 ? MHA__BR : MHA__BR / 2;
}

/* Whether split-K takes the kernels' prefetching row forms: where they
 * have them for the dtype and the cached K and V rows stream from far
 * enough that prefetching them pays.  bf16 and int8 rows: where each
 * thread's share is more than its L2 holds (int8 rows: kernels/avx512.c;
 * a bf16 cache on Sapphire Rapids: kernels/avx512_bf16.c).  Float32 rows,
 * four lines a key, come from L3 at the rate the core takes them, so
 * only where K and V pass two thirds of the last-level cache, which then
 * does not keep them between steps (kernels/avx512.c: 0.93x at 59% of
 * Zen 4's 32 MB, 1.04-1.24x from 69%).  Rows nearer only pay the
 * prefetches' cost.  Only split-K reads rows this way (decode.c); other
 * plans neither ask nor read the last-level cache's size. */
static bool kv_rows_far(const mha__attn_plan *p, const mha_ctx *ctx, mha_dtype dtype)
{
    if (p->path != MHA__PATH_SPLIT_K) return false;
    double bytes =
        (double)p->B * (double)p->Hkv * (double)p->S * (double)(p->D + p->Dv) * (double)mha_dtype_size(dtype);
    if (dtype == MHA_DTYPE_F32)
        return p->kt->dot_rows_far && p->kt->axpy_rows_far && bytes > 2.0 / 3.0 * (double)mha_last_level_cache_bytes();
    bool have = dtype == MHA_DTYPE_BF16 ? p->bk && p->bk->dot_rows_far && p->bk->axpy_rows_far
                                        : dtype == MHA_DTYPE_I8 && p->kt->dot_rows_i8_far && p->kt->axpy_rows_i8_far;
    int threads = mha_ctx_threads(ctx);
    return have && bytes / (threads > 0 ? threads : 1) > (double)mha__l2_bytes();
}

static int64_t stream_min_bytes = -1; /* -1: twice L2 (mha__kv_stream_min_bytes) */

/* Whether the float32 tiles fetch the next key tile's keys into L2 as
 * they compute a tile's scores (products.h): where one head's K and V
 * take more than twice L2, so that every item reads them from L3 again.
 * On Zen 4 (1 MB of L2) the core at N = 8192 (4 MB a head) ran 1.026x
 * and the layer at S4 1.030x (7 alternating rounds); with the rule
 * lowered to take N = 2048 and 4096 in, they ran 1.007x and 1.000x, the
 * caches keeping what the fetches would bring (docs/PERFORMANCE.md). */
static bool kv_streams(const mha__attn_plan *p)
{
    if (p->bf16 || p->split || p->path != MHA__PATH_TILED) return false;
    return head_kv_bytes(p) > (stream_min_bytes < 0 ? 2.0 * (double)mha__l2_bytes() : (double)stream_min_bytes);
}

void mha__kv_stream_min_bytes(int64_t bytes) { stream_min_bytes = bytes < 0 ? -1 : bytes; }

mha__attn_needs mha__attn_needs_of(const mha__kv *kv, bool stats)
{
    return (mha__attn_needs){.kv_rows = kv->rows.k != NULL, .kv_dtype = kv->rows.dtype, .stats = stats};
}

mha_status mha__attn_plan_resolve(mha__attn_plan *p, const mha_ctx *ctx, mha__attn_needs needs)
{
    int64_t rows;
    if (!mha__mul(p->B, p->Hq, &rows) || !mha__mul(rows, p->L, &rows))
        return mha__fail(MHA_ERR_INVALID_ARG, "batch x heads x queries overflows");
    p->group = p->Hq / (p->Hkv ? p->Hkv : 1);
    const mha__isa_kernels *isa = mha__isa_get(); /* this CPU's kernels, for each dtype */
    p->kt = isa->f32;
    bool split = mha__split_attention(p, isa, needs.kv_dtype);
    p->bk = p->bf16 || split || needs.kv_dtype == MHA_DTYPE_BF16 ? isa->bf16 : NULL;
    p->path = choose_path(p, needs);
    p->split = split;
    p->block_rows = block_rows(p);
    p->products = p->bf16 ? &mha__products_bf16 : split ? &mha__products_f32_split : &mha__products_f32;
    p->kv_rows = mha__kv_rows_of(needs.kv_dtype);
    p->kv_far = kv_rows_far(p, ctx, needs.kv_dtype);
    p->kv_stream = kv_streams(p);
    p->workspace = 0;
    if (rows == 0) return MHA_OK;
    mha_status st = mha__attn_plan_check(p);
    if (st != MHA_OK) return st;
    bool ok = p->path == MHA__PATH_SPLIT_K ? mha__decode_workspace(p, ctx, &p->workspace)
                                           : mha__attn_forward_workspace(p, ctx, &p->workspace);
    return ok ? MHA_OK : MHA_ERR_INVALID_ARG;
}

mha_status mha__attn_run(mha_ctx *ctx, const mha__attn_plan *p, mha_tensor *out, float *lse, mha__row_stats *stats,
                         const mha_tensor *q, const double *q_norm2, const mha__kv *kv)
{
    if (p->B * p->Hq * p->L == 0) return MHA_OK;
    if (p->path == MHA__PATH_SPLIT_K) return mha__decode_attention(ctx, p, out, lse, q, &kv->rows); /* a few rows */
    return mha__attn_forward(ctx, p, out, lse, stats, q, q_norm2, kv);
}
