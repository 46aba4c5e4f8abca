/*
 * wide.c -- the projections of rows whose logits may be large: their Q,
 * and their keys' K, summed exactly (pipeline.c's project stage calls it
 * after the float32 products).
 *
 * Where scale |q_i| max_j |k_j| passes MHA_REFINE_TERMS, the attention
 * refines row i's scores in float64 (a "wide" row, attn/attention.h),
 * but from q and k as projected, and a float32 projection errs by about
 * an ulp of its terms (x's times W's, E of them), which the score
 * multiplies by the other side's size.  With inputs x10 a plain float32
 * layer's errors and ours were alike, and the W_q and W_k gradients
 * missed the 3x rule in about one case in 1000 (docs/NUMERICS.md).  So
 * the projections take the attention's decision, from the same float64
 * norms of the float32 projections, per batch and kv head: a wide query
 * row gets its Q columns of that head summed exactly
 * (mha__linear_exact), and the head's keys in that batch their K
 * columns, before the rotation (which keeps norms).  Every head decides
 * before any changes.  A row the attention leaves in float32 keeps
 * float32 projections: exact ones under float32 scores lost a plain
 * implementation's cancellation of the two (one large-logit case at
 * 1.05x the rule).  V and the output projection stay float32 (no logit
 * multiplies their error), and so do bf16 layers (their rounding is far
 * larger).  A decoding step decides from its new rows alone, as its
 * stages (mha_layer_decode_qkv) must, having no cache: the same bits.
 * The forward keeps the norms that decided (mha__layer_norms), those of
 * the rows summed again found again, and hands them to the attention,
 * which would otherwise read Q and K once more for the same decision.
 */
#include "layer/layer.h"

/* The pass's buffers: the largest key norm of each batch and kv head,
 * each query row's norm (when the caller keeps them), whether each batch
 * and query head has a wide row, and the offsets of the rows of one
 * head's call. */
typedef struct exact_buffers {
    double *keys;    /* [N][G] */
    double *queries; /* [N][H][Lq], or NULL: found a chunk at a time */
    bool *wide;      /* [N][H] */
    int64_t *x_at, *y_at;
} exact_buffers;

bool mha__layer_project_wide_workspace(const mha_ctx *ctx, const mha_layer *l, int64_t N, int64_t Lq, int64_t Lk,
                                       int64_t *bytes)
{
    int64_t rows = 0, offsets = 0, keys = 0, wide = 0, q = 0, k = 0; /* as exact_buffers_take takes them */
    *bytes = 0;
    return l->bf16 ||
           (mha__mul(N, mha__max64(Lq, Lk), &rows) && mha__mul(rows, 2 * (int64_t)sizeof(int64_t), &offsets) &&
            mha__mul(N, l->desc.num_kv_heads * (int64_t)sizeof(double), &keys) &&
            mha__mul(N, l->desc.num_heads * (int64_t)sizeof(bool), &wide) &&
            mha__ws_add(bytes, offsets, "the wide rows' offsets") && mha__ws_add(bytes, keys, "the key norms") &&
            mha__ws_add(bytes, wide, "the wide heads") &&
            mha__linear_exact_workspace(ctx, &l->w[MAT_Q].f32, l->head_dim, &q) &&
            mha__linear_exact_workspace(ctx, &l->w[MAT_K].f32, l->head_dim, &k) &&
            mha__add(*bytes, mha__max64(q, k), bytes));
}

/* The buffers, from the workspace but for the norms a caller keeps. */
static bool exact_buffers_take(mha_ctx *ctx, const mha_layer *l, int64_t N, int64_t rows, mha__layer_norms *keep,
                               exact_buffers *e)
{
    e->x_at = mha__ws_take(ctx, 2 * rows * (int64_t)sizeof(int64_t));
    e->y_at = e->x_at ? e->x_at + rows : NULL;
    e->keys = keep ? keep->k_max : mha__ws_take(ctx, N * l->desc.num_kv_heads * (int64_t)sizeof(double));
    e->queries = keep ? keep->q : NULL;
    e->wide = mha__ws_take(ctx, N * l->desc.num_heads * (int64_t)sizeof(bool));
    return e->x_at && e->keys && e->wide;
}

/* The decision's inputs, shared by its parallel passes: `p` holds what
 * the attention's own decision (mha__wide_rows) reads of its plan. */
typedef struct wide_job {
    const mha_layer *l;
    mha__attn_plan p;
    mha_tensor qh, kh; /* the projections as attention reads them, with any appended keys */
    exact_buffers *e;
} wide_job;

/* Batch n's largest key norm of kv head g, over every key the attention
 * will see. */
static void key_norm(const wide_job *j, int64_t n, int64_t g)
{
    const float *rows = j->kh.data + n * j->kh.stride[0] + g * j->kh.stride[1];
    j->e->keys[n * j->kh.shape[1] + g] =
        mha__rows_norm2_max(j->l->isa->f32, rows, j->kh.stride[2], 1, j->kh.shape[2], j->l->head_dim);
}

/* Item n G + g: key_norm(n, g). */
static void key_norms(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const wide_job *j = arg;
    for (int64_t item = begin; item < end; item++) key_norm(j, item / j->kh.shape[1], item % j->kh.shape[1]);
}

/* Batch n's query rows of head h, their norms kept. */
static void query_norms(const wide_job *j, int64_t n, int64_t h)
{
    int64_t H = j->qh.shape[1], L = j->qh.shape[2];
    mha__norms2(j->l->isa->f32, j->qh.data + n * j->qh.stride[0] + h * j->qh.stride[1], j->qh.stride[2], 1, L,
                j->l->head_dim, j->e->queries + (n * H + h) * L);
}

enum { WIDE_CHUNK = 64 }; /* query rows whose norms are taken at once */

/* Marks in wide[] which of rows i0 .. i0 + m - 1 of batch n, head h are
 * wide, by the attention's own test against the batch's keys; whether
 * any is. */
static bool wide_rows(const wide_job *j, int64_t n, int64_t h, int64_t i0, int64_t m, bool *wide)
{
    double keys = j->e->keys[n * j->kh.shape[1] + h / (j->qh.shape[1] / j->kh.shape[1])];
    return mha__wide_rows(&j->p, &j->qh, j->e->queries, n, h, i0, m, keys, wide);
}

/* Item n H + h: whether batch n has a wide row in head h (its rows'
 * norms kept first, if they are). */
static void wide_heads(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const wide_job *j = arg;
    int64_t H = j->qh.shape[1], L = j->qh.shape[2];
    for (int64_t item = begin; item < end; item++) {
        if (j->e->queries) query_norms(j, item / H, item % H);
        bool any = false, wide[WIDE_CHUNK];
        for (int64_t i0 = 0; i0 < L && !any; i0 += WIDE_CHUNK)
            any = wide_rows(j, item / H, item % H, i0, mha__min64(WIDE_CHUNK, L - i0), wide);
        j->e->wide[item] = any;
    }
}

/* One of the decision's passes over `items`, reading `floats` values:
 * on this thread where they are few (a decoding step's rows: handing
 * them to the pool twice cost 3% of a step against 4096 cached tokens),
 * else on every thread.  Items are independent: the same bits. */
enum { PASS_INLINE_FLOATS = 1 << 16 };

static void run_pass(mha_ctx *ctx, int64_t floats, int64_t items, mha__range_fn fn, wide_job *j)
{
    if (floats < PASS_INLINE_FLOATS) fn(j, 0, 0, items);
    else mha__parallel_for(ctx, items, fn, j);
}

/* Row i of batch n of x and of y: the offsets to list. */
static void list_row(const mha__batched *x, const mha__batched *y, int64_t n, int64_t i, exact_buffers *e,
                     int64_t *count)
{
    e->x_at[*count] = n * x->batch_stride + i * x->m.rs;
    e->y_at[*count] = n * y->batch_stride + i * y->m.rs;
    ++*count;
}

/* The listed rows of head `head`'s columns of matrix `which`, summed
 * exactly. */
static mha_status project_listed(mha_ctx *ctx, const mha_layer *l, const mha__batched *x, matrix which, int64_t head,
                                 const exact_buffers *e, int64_t count, const mha__batched *y)
{
    int64_t d = l->head_dim;
    mha__exact_rows rows = {x->m.data, x->m.cs, e->x_at, y->m, e->y_at, count};
    const mha__packed *w;
    mha_status st = mha__weight_f32(ctx, &l->w[which], &w);
    if (st != MHA_OK) return st;
    return mha__linear_exact(ctx, l->isa->f32, &rows, w, head * d, (head + 1) * d, mha__layer_in_bias(l, which));
}

/* Head h's wide query rows in every batch that has one, listed and
 * projected exactly. */
static mha_status project_wide_queries(mha_ctx *ctx, const wide_job *j, const mha__batched *x_q, const mha__batched *qb,
                                       int64_t h)
{
    int64_t N = j->qh.shape[0], H = j->qh.shape[1], L = j->qh.shape[2], count = 0;
    bool wide[WIDE_CHUNK];
    for (int64_t n = 0; n < N; n++)
        for (int64_t i0 = 0; j->e->wide[n * H + h] && i0 < L; i0 += WIDE_CHUNK) {
            int64_t m = mha__min64(WIDE_CHUNK, L - i0);
            wide_rows(j, n, h, i0, m, wide);
            for (int64_t i = 0; i < m; i++)
                if (wide[i]) list_row(x_q, qb, n, i0 + i, j->e, &count);
        }
    return count ? project_listed(ctx, j->l, x_q, MAT_Q, h, j->e, count, qb) : MHA_OK;
}

/* Whether batch n's keys of kv head g are summed again: one of the
 * group's heads has a wide row there. */
static bool keys_wide(const wide_job *j, int64_t n, int64_t g)
{
    int64_t H = j->qh.shape[1], group = H / j->kh.shape[1];
    bool any = false;
    for (int64_t h = g * group; h < (g + 1) * group; h++) any = any || j->e->wide[n * H + h];
    return any;
}

/* The kept norms of the rows summed again, found again: as the attention
 * would find them from what it reads. */
static void renew_norms(const wide_job *j)
{
    int64_t N = j->qh.shape[0], H = j->qh.shape[1], G = j->kh.shape[1];
    for (int64_t n = 0; n < N; n++) {
        for (int64_t h = 0; h < H; h++)
            if (j->e->wide[n * H + h]) query_norms(j, n, h);
        for (int64_t g = 0; g < G; g++)
            if (keys_wide(j, n, g)) key_norm(j, n, g);
    }
}

static mha_status project_wide_rows(mha_ctx *ctx, const mha_layer *l, const mha__layer_rows *r, const mha__batched *x_q,
                                    const mha__batched *x_k, const mha__batched *qb, const mha__batched *kb,
                                    mha__layer_norms *keep)
{
    int64_t N = r->N, H = l->desc.num_heads, G = l->desc.num_kv_heads, group = H / G;
    exact_buffers e;
    if (!exact_buffers_take(ctx, l, N, N * mha__max64(r->Lq, r->Lk), keep, &e)) return MHA_ERR_INTERNAL;
    /* What mha__wide_rows reads of the attention's plan. */
    mha__attn_plan p = {.Hq = H,
                        .L = r->Lq,
                        .S = r->Tk, /* the attention's S; a decoding step's new rows (above) */
                        .kt = l->isa->f32,
                        .D = l->head_dim,
                        .scale = mha__layer_scale(l),
                        .feeds_backward = r->feeds_backward};
    wide_job j = {l, p, mha__layer_heads_view(l, qb->m.data, N, r->Lq, H),
                  mha__layer_heads_view(l, kb->m.data, N, r->Tk, G), &e};
    /* Every head decides from the float32 projections before any changes. */
    int64_t floats = N * (r->Tk * G + r->Lq * H) * l->head_dim;
    run_pass(ctx, floats, N * G, key_norms, &j);
    run_pass(ctx, floats, N * H, wide_heads, &j);
    mha_status st = MHA_OK;
    for (int64_t g = 0; g < G && st == MHA_OK; g++) {
        for (int64_t h = g * group; h < (g + 1) * group && st == MHA_OK; h++)
            st = project_wide_queries(ctx, &j, x_q, qb, h);
        int64_t count = 0; /* then the keys of every batch where one of them has a wide row */
        for (int64_t n = 0; n < N; n++)
            if (keys_wide(&j, n, g))
                for (int64_t i = 0; i < r->Lk; i++) list_row(x_k, kb, n, i, &e, &count);
        if (count && st == MHA_OK) st = project_listed(ctx, l, x_k, MAT_K, g, &e, count, kb);
    }
    if (keep && st == MHA_OK) renew_norms(&j);
    return st;
}

mha_status mha__layer_project_wide(mha_ctx *ctx, const mha_layer *l, const mha__layer_rows *r, const mha__batched *x_q,
                                   const mha__batched *x_k, const mha__batched *qb, const mha__batched *kb,
                                   mha__layer_norms *keep)
{
    if (l->bf16) return MHA_OK;
    int64_t top = mha__ws_top(ctx);
    mha_status st = project_wide_rows(ctx, l, r, x_q, x_k, qb, kb, keep);
    mha__ws_release(ctx, top);
    return st;
}
