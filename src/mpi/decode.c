/*
 * decode.c -- decoding over a KV cache split by sequence (mha_mpi.h):
 * each rank's cache holds one contiguous block of the tokens, the blocks
 * in rank order.  Every rank attends the new rows over its block (the
 * descriptor's positions tell it where the block sits), and the partial
 * outputs merge by their lse in rank order, on every rank alike:
 *
 *   M = max_r lse_r,  w_r = e^(lse_r - M),  out = sum_r w_r out_r / sum_r w_r
 */
#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "core/internal.h"
#include "core/tensor.h"
#include "mha_mpi.h"
#include "mpi/collective.h"
#include "mpi/sequence.h"

/* out and lse from every rank's partial ones, all[r] = (out_r, lse_r), merged
 * in rank order; m, s and one [rows] floats of scratch. */
static void merge_ranks(const float *all, int size, int64_t rows, int64_t width, float *out, float *lse, float *m,
                        float *s, float *one)
{
    int64_t part = rows * (width + 1); /* a rank's out, then its lse */
    memset(out, 0, (size_t)(rows * width) * sizeof(float));
    for (int64_t i = 0; i < rows; i++) m[i] = -INFINITY, s[i] = 0.0f;
    for (int r = 0; r < size; r++) {
        const float *l = all + r * part + rows * width;
        for (int64_t i = 0; i < rows; i++) one[i] = l[i] > -INFINITY ? 1.0f : 0.0f; /* an lse is a max with sum 1 */
        mha__mpi_merge_rows(out, m, s, all + r * part, l, one, rows, width);
    }
    for (int64_t i = 0; i < rows; i++) lse[i] = s[i] > 0 ? m[i] + logf(s[i]) : -INFINITY;
}

/* This rank's partial result over its block of `total` tokens starting
 * at `start`, contiguous in mine: out [B, Hq, L, D] then lse [B, Hq, L]. */
static mha_status shard_attention(mha_ctx *ctx, const mha_kv_cache *shard, int64_t start, int64_t total,
                                  const mha_tensor *q, const mha_attn_desc *desc, float *mine)
{
    int64_t rows = q->shape[0] * q->shape[1] * q->shape[2], width = q->shape[3];
    if (mha_kv_cache_length(shard) == 0) { /* an empty block: nothing seen */
        memset(mine, 0, (size_t)(rows * width) * sizeof(float));
        for (int64_t i = 0; i < rows; i++) mine[rows * width + i] = -INFINITY;
        return MHA_OK;
    }
    mha_attn_desc d = *desc;
    d.key_offset = start, d.key_total = total;
    mha_tensor out = mha_tensor_4d(mine, q->shape[0], q->shape[1], q->shape[2], width);
    return mha_kv_cache_attention_lse(ctx, shard, &out, mine + rows * width, q, &d);
}

/* This rank's own arguments. */
static mha_status check_args(mha_ctx *ctx, const mha_kv_cache *shard, const mha_tensor *out, const mha_tensor *q,
                             const mha_attn_desc *desc)
{
    if (!ctx || !shard || !out || !q || !desc || !q->data || !out->data)
        return mha__fail(MHA_ERR_MISUSE, "mha_mpi_kv_cache_attention: NULL argument");
    if (desc->key_offset || desc->key_total)
        return mha__fail(MHA_ERR_INVALID_ARG,
                         "the keys' positions are the shards' own: leave key_offset and key_total 0");
    const int64_t any[4] = {-1, -1, -1, -1};
    mha_status st = mha__check_tensor(q, "query", any);
    return st == MHA_OK ? mha__check_tensor(out, "output", q->shape) : st;
}

/* Where this rank's block starts, and the whole cache's tokens. */
static mha_status shard_position(MPI_Comm comm, const mha_kv_cache *shard, int64_t *start, int64_t *total)
{
    int rank, size;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    int64_t length = mha_kv_cache_length(shard), *lengths = mha__alloc(size, sizeof(int64_t));
    mha_status st = mha__mpi_agree(comm, lengths ? MHA_OK : MHA_ERR_NOMEM);
    if (st == MHA_OK) {
        MPI_Allgather(&length, 1, MPI_INT64_T, lengths, 1, MPI_INT64_T, comm);
        *start = *total = 0;
        for (int r = 0; r < size; r++) *start += r < rank ? lengths[r] : 0, *total += lengths[r];
    }
    mha__free(lengths);
    return st;
}

/* The attention over the shards once the call is agreed on and this
 * rank's block is known to start at token `start` of `total`. */
static mha_status attend_shards(mha_ctx *ctx, MPI_Comm comm, const mha_kv_cache *shard, int64_t start, int64_t total,
                                mha_tensor *out, float *lse, const mha_tensor *q, const mha_attn_desc *desc)
{
    int rank, size;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    int64_t rows = q->shape[0] * q->shape[1] * q->shape[2], part = rows * (q->shape[3] + 1);
    float *all = mha__alloc(part * (size + 1) + 3 * rows, sizeof(float)), *merged = all ? all + part * size : NULL;
    mha_status st = !all ? MHA_ERR_NOMEM
                    : part > INT32_MAX
                        ? mha__fail(MHA_ERR_UNSUPPORTED, "%lld floats of partial results per rank", (long long)part)
                        : shard_attention(ctx, shard, start, total, q, desc, all + rank * part);
    if ((st = mha__mpi_agree(comm, st)) == MHA_OK) {
        double t = mha__mpi_clock();
        MPI_Allgather(MPI_IN_PLACE, 0, MPI_FLOAT, all, (int)part, MPI_FLOAT, comm);
        mha__mpi_waited(t);
        float *scratch = merged + part;
        merge_ranks(all, size, rows, q->shape[3], merged, merged + rows * q->shape[3], scratch, scratch + rows,
                    scratch + 2 * rows);
        mha__mpi_copy_piece(out, merged, false); /* through out's strides */
        if (lse) memcpy(lse, merged + rows * q->shape[3], (size_t)rows * sizeof(float));
    }
    mha__free(all);
    return st;
}

mha_status mha_mpi_kv_cache_attention(mha_ctx *ctx, MPI_Comm comm, const mha_kv_cache *shard, mha_tensor *out,
                                      float *lse, const mha_tensor *q, const mha_attn_desc *desc)
{
    mha_status st = check_args(ctx, shard, out, q, desc);
    bool ok = st == MHA_OK;
    mha__mpi_field f[] = {{"q.shape[0] (batch)", ok ? q->shape[0] : 0},
                          {"q.shape[1] (heads)", ok ? q->shape[1] : 0},
                          {"q.shape[2] (new rows)", ok ? q->shape[2] : 0},
                          {"q.shape[3] (head width)", ok ? q->shape[3] : 0},
                          {"causal", ok ? desc->causal : 0},
                          {"window_left", ok ? desc->window_left : 0},
                          {"window_right", ok ? desc->window_right : 0},
                          {"lse given", lse != NULL}};
    int64_t start = 0, total = 0;
    if ((st = mha__mpi_same(comm, st, f, (int)(sizeof f / sizeof f[0]))) != MHA_OK ||
        (st = shard_position(comm, shard, &start, &total)) != MHA_OK)
        return st;
    return attend_shards(ctx, comm, shard, start, total, out, lse, q, desc);
}

/* ------------------------------------------------------------------ */
/* The layer's decoding step over the split cache                      */
/* ------------------------------------------------------------------ */

/* Where the n new tokens go: after the last rank that holds any, filling
 * it, then the next ranks in order, so the blocks stay contiguous and in
 * rank order.  *position = the tokens held so far; rank `rank` takes the
 * new tokens [*first, *first + *count).  INVALID_ARG when they do not fit. */
static mha_status place_tokens(const int64_t *held, int size, int rank, int64_t n, int64_t *position, int64_t *first,
                               int64_t *count)
{
    int last = 0; /* held[2 r] tokens of capacity held[2 r + 1] on rank r */
    int64_t room = 0;
    *position = *first = *count = 0;
    for (int r = 0; r < size; r++) {
        *position += held[2 * r];
        if (held[2 * r] > 0) last = r;
    }
    for (int r = last; r < size; r++) { /* room = the new tokens given out so far */
        int64_t take = held[2 * r + 1] - held[2 * r];
        take = take < n - room ? take : n - room;
        if (r == rank) *first = room, *count = take;
        room += take;
    }
    if (room < n)
        return mha__fail(MHA_ERR_INVALID_ARG,
                         "%lld new tokens do not fit: the shards from rank %d on have room for %lld", (long long)n,
                         last, (long long)room);
    return MHA_OK;
}

/* The step's own arguments on this rank; *desc the step's attention. */
static mha_status check_step(mha_ctx *ctx, const mha_layer *layer, const mha_kv_cache *shard, const mha_tensor *out,
                             const mha_tensor *x, mha_attn_desc *desc)
{
    if (!ctx || !layer || !shard || !out || !x || !x->data || !out->data)
        return mha__fail(MHA_ERR_MISUSE, "mha_mpi_kv_cache_decode: NULL argument");
    mha_status st = mha_layer_decode_desc(layer, desc);
    const int64_t E = mha_layer_get_desc(layer)->embed_dim, x_shape[4] = {-1, -1, E, 1};
    if (st == MHA_OK) st = mha__check_tensor(x, "x", x_shape);
    if (st != MHA_OK) return st;
    if (x->shape[0] < 1 || x->shape[1] < 1) return mha__fail(MHA_ERR_INVALID_ARG, "x has no tokens");
    const int64_t out_shape[4] = {x->shape[0], x->shape[1], E, 1};
    return mha__check_tensor(out, "out", out_shape);
}

/* The fields of a step every rank must agree on: x's shape and the
 * layer's description. */
static int describe_step(const mha_layer *layer, const mha_tensor *x, mha__mpi_field *f)
{
    f[0] = (mha__mpi_field){"x.shape[0] (batch)", x->shape[0]};
    f[1] = (mha__mpi_field){"x.shape[1] (new tokens)", x->shape[1]};
    return 2 + mha__mpi_describe_layer(mha_layer_get_desc(layer), f + 2);
}

/* Every rank's (length, capacity), and from them this rank's share of the
 * new tokens (place_tokens) and where its block starts once they are in:
 * after the tokens of the ranks before it, old and new. */
static mha_status share_of_step(MPI_Comm comm, const mha_kv_cache *shard, int64_t n, int64_t *position, int64_t *first,
                                int64_t *count, int64_t *start)
{
    int rank, size;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    int64_t mine[2] = {mha_kv_cache_length(shard), mha_kv_cache_capacity(shard)};
    int64_t *held = mha__alloc(2 * (int64_t)size, sizeof(int64_t));
    mha_status st = mha__mpi_agree(comm, held ? MHA_OK : MHA_ERR_NOMEM);
    if (st == MHA_OK) {
        MPI_Allgather(mine, 2, MPI_INT64_T, held, 2, MPI_INT64_T, comm);
        st = place_tokens(held, size, rank, n, position, first, count); /* the same on every rank */
        *start = *first;                                                /* the new tokens before this rank */
        for (int r = 0; r < rank; r++) *start += held[2 * r];
    }
    mha__free(held);
    return st;
}

/* q, k, v of the new rows on every rank; this rank's share of k and v
 * appended to its shard.  buf holds q, k, v, then the heads. */
static mha_status project_and_append(mha_ctx *ctx, const mha_layer *layer, mha_kv_cache *shard, const mha_tensor *x,
                                     int64_t position, int64_t first, int64_t count, mha_tensor *q, float *buf)
{
    const mha_layer_desc *d = mha_layer_get_desc(layer);
    int64_t N = x->shape[0], n = x->shape[1], hd = d->head_dim, G = d->num_kv_heads;
    int64_t nk = N * G * n * hd;
    *q = mha_tensor_4d(buf, N, d->num_heads, n, hd);
    mha_tensor k = mha_tensor_4d(buf + mha__mpi_numel(q), N, G, n, hd), v = k;
    v.data += nk;
    mha_status st = mha_layer_decode_qkv(ctx, layer, position, x, q, &k, &v);
    if (st != MHA_OK || count == 0) return st;
    mha_tensor k_mine = mha__mpi_piece(&k, 0, G, first, count), v_mine = mha__mpi_piece(&v, 0, G, first, count);
    return mha_kv_cache_append(shard, &k_mine, &v_mine);
}

mha_status mha_mpi_kv_cache_decode(mha_ctx *ctx, MPI_Comm comm, const mha_layer *layer, mha_kv_cache *shard,
                                   mha_tensor *out, const mha_tensor *x)
{
    mha_attn_desc desc;
    mha__mpi_field f[26];
    mha_status st = check_step(ctx, layer, shard, out, x, &desc);
    int n_fields = st == MHA_OK ? describe_step(layer, x, f) : 0;
    int64_t position = 0, first = 0, count = 0, start = 0;
    if ((st = mha__mpi_same(comm, st, f, n_fields)) != MHA_OK ||
        (st = share_of_step(comm, shard, x->shape[1], &position, &first, &count, &start)) != MHA_OK)
        return st;
    const mha_layer_desc *d = mha_layer_get_desc(layer);
    int64_t N = x->shape[0], n = x->shape[1], before = mha_kv_cache_length(shard);
    int64_t nq = N * d->num_heads * n * d->head_dim, nk = N * d->num_kv_heads * n * d->head_dim;
    float *buf = mha__alloc(2 * nq + 2 * nk + N * n * d->embed_dim, sizeof(float));
    mha_tensor q, heads, y;
    st = buf ? project_and_append(ctx, layer, shard, x, position, first, count, &q, buf) : MHA_ERR_NOMEM;
    if ((st = mha__mpi_agree(comm, st)) == MHA_OK) {
        heads = mha_tensor_4d(buf + nq + 2 * nk, N, d->num_heads, n, d->head_dim);
        st = attend_shards(ctx, comm, shard, start, position + n, &heads, NULL, &q, &desc); /* agreed inside */
    }
    if (st == MHA_OK) {
        y = mha_tensor_3d(heads.data + nq, N, n, d->embed_dim);
        st = mha__mpi_agree(comm, mha_layer_decode_output(ctx, layer, &y, &heads));
    }
    if (st == MHA_OK) mha__mpi_copy_piece(out, y.data, false); /* written only once all went well */
    else (void)mha_kv_cache_truncate(shard, before);           /* on every rank, as the error */
    mha__free(buf);
    return st;
}
