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

mha_status mha_mpi_kv_cache_attention(mha_ctx *ctx, MPI_Comm comm, const mha_kv_cache *shard, mha_tensor *out,
                                      float *lse, const mha_tensor *q, const mha_attn_desc *desc)
{
    int rank, size;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
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
    int64_t rows = q->shape[0] * q->shape[1] * q->shape[2], part = rows * (q->shape[3] + 1);
    float *all = mha__alloc(part * (size + 1) + 3 * rows, sizeof(float)), *merged = all ? all + part * size : NULL;
    st = !all               ? MHA_ERR_NOMEM
         : part > INT32_MAX ? mha__fail(MHA_ERR_UNSUPPORTED, "%lld floats of partial results per rank", (long long)part)
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
