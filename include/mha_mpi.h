/*
 * mha_mpi.h -- libmha over MPI (libmha_mpi): attention split across the
 * ranks of a communicator, exact against the single-process library.
 *
 * libmha itself never touches MPI; this library is built beside it when
 * CMake finds MPI, and computes through libmha's public API on each rank.
 *
 * Every function here is collective over the layer's communicator: all
 * ranks call it, in the same order, with arguments that describe the same
 * computation (shapes, masks' kinds, flags).  They all return the same
 * status: when one rank fails (a bad argument, an allocation, a
 * disagreement with rank 0's shapes), every rank returns that error and
 * mha_last_error() says which rank and why ("rank 2 of 4: ..."), with
 * nothing written to the outputs.  Arguments are compared between ranks
 * before any compute.  MPI's own failures go to the communicator's error
 * handler (MPI_ERRORS_ARE_FATAL unless the caller sets another).
 *
 * Memory: the blocks in flight and the exchange buffers (tens of MB at
 * long sequences) are kept in the mha_ctx passed in from call to call, so
 * a repeated call allocates nothing new; mha_ctx_free releases them.
 *
 * Results: the same bits from run to run for a given rank count (sums
 * across ranks are taken in rank order, never in whatever order MPI's
 * collectives choose), and within the tolerance rule of the
 * single-process library (docs/NUMERICS.md).  docs/SCALING.md describes
 * the modes and their costs.
 */
#ifndef MHA_MPI_H
#define MHA_MPI_H

#include <mpi.h>

#include "mha.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Seconds this process has spent in libmha_mpi's data transfers (the
 * all-to-alls, sums and gathers, and the ring's waits for blocks the
 * compute did not hide) since the previous call; a call's other time is
 * compute and the small agreements.  Not collective; libmha_mpi is
 * called from one thread per process. */
double mha_mpi_transfer_seconds(void);

/* ------------------------------------------------------------------ */
/* Head-parallel layer (tensor parallelism over the heads)             */
/* ------------------------------------------------------------------ */

/* A multi-head attention layer whose heads are split over the ranks of
 * comm.  Rank r holds the key/value heads [g r / P, g (r + 1) / P) (whole
 * GQA groups: g kv heads over P ranks, so uneven counts split as evenly as
 * they can) and the query heads that read them; its share of W_Q, W_K,
 * W_V (rows) and W_O (columns), their biases and bias_k/bias_v; rank 0
 * alone adds the output projection's bias.  Each rank computes its heads
 * and its part of the output projection; one sum across the ranks forms
 * the output.  Needs g >= P (a layer with fewer kv heads than ranks is
 * refused: INVALID_ARG naming both counts).
 *
 * desc is the whole layer's, as for mha_layer_create; comm is duplicated
 * (the caller may free its own).  Errors: as mha_layer_create's, and
 * INVALID_ARG (more ranks than kv heads), on every rank. */
typedef struct mha_mpi_layer mha_mpi_layer;
mha_status mha_mpi_layer_create(MPI_Comm comm, const mha_layer_desc *desc, mha_mpi_layer **out_layer);
void mha_mpi_layer_free(mha_mpi_layer *layer); /* collective: frees the communicator */

/* The heads this rank holds: query heads [*first_head, + *num_heads) and
 * kv heads [*first_kv_head, + *num_kv_heads).  Not collective. */
void mha_mpi_layer_heads(const mha_mpi_layer *layer, int64_t *first_head, int64_t *num_heads, int64_t *first_kv_head,
                         int64_t *num_kv_heads);

/* The rank's own layer (its heads; E inputs and outputs), for what is per
 * rank: mha_layer_train_init, mha_layer_params (its shards of the
 * parameters and their gradients), mha_layer_params_changed,
 * mha_layer_zero_grad and a tape for mha_layer_fwd_args.  Not collective. */
mha_layer *mha_mpi_layer_local(mha_mpi_layer *layer);

/* Sets a weight from the whole tensor (every rank passes all of it, in
 * any naming family mha_layer_set_weight takes); each rank keeps its
 * shard.  Errors: as mha_layer_set_weight's. */
mha_status mha_mpi_layer_set_weight(mha_mpi_layer *layer, const char *name, const float *data, int64_t numel);

/* The same from a safetensors file, each rank reading only its shard of
 * the tensor called `tensor` (its rows or columns, converted from any
 * float dtype): for layers whose whole weights one rank should not hold.
 * `name` is the weight's name as mha_mpi_layer_set_weight takes it.
 * Errors: as mha_layer_set_weight's, NOT_FOUND (no such tensor), IO. */
mha_status mha_mpi_layer_read_weight(mha_mpi_layer *layer, mha_st_file *file, const char *tensor, const char *name);

/* A head-parallel layer from a block's weights in a safetensors file,
 * planned by mha_layer_plan_load (every rank its own plan of the same
 * file): each rank reads only its shard of each weight.  Errors: as
 * mha_mpi_layer_create's and mha_mpi_layer_read_weight's. */
mha_status mha_mpi_layer_load(MPI_Comm comm, mha_st_file *file, const mha_layer_load_plan *plan,
                              mha_mpi_layer **out_layer);

/* The whole weight, or its gradient (training state needed, as for
 * mha_layer_get_grad), gathered from every rank's shard into dst on
 * every rank.  Errors: as mha_layer_get_weight's. */
mha_status mha_mpi_layer_get_weight(const mha_mpi_layer *layer, const char *name, float *dst, int64_t numel);
mha_status mha_mpi_layer_get_grad(const mha_mpi_layer *layer, const char *name, float *dst, int64_t numel);

/* mha_layer_forward over the ranks: every rank passes the whole input and
 * receives the whole output (and attention weights when asked: per head
 * [N, h, L, S'] or averaged [N, 1, L, S']).  Masks over [N, h, L, S] are
 * the whole layer's; each rank reads its heads' part.  A tape in args
 * records this rank's share for mha_mpi_layer_backward.  Errors: as
 * mha_layer_forward's, NOMEM. */
mha_status mha_mpi_layer_forward(mha_ctx *ctx, mha_mpi_layer *layer, mha_tensor *attn_output, mha_tensor *attn_weights,
                                 const mha_layer_fwd_args *args);

/* mha_layer_backward over the ranks: the input gradients are summed
 * across the ranks (one sum per distinct tensor: one for self-attention,
 * where the three are the same) and ADDED to grad_query/key/value on
 * every rank (written, with args->write_input_grads), as the
 * single-process call does; each rank's parameter
 * gradients accumulate its shard (gather them with
 * mha_mpi_layer_get_grad).  Errors: as mha_layer_backward's, NOMEM. */
mha_status mha_mpi_layer_backward(mha_ctx *ctx, mha_mpi_layer *layer, const mha_layer_fwd_args *args,
                                  const mha_tensor *grad_attn_output, mha_tensor *grad_query, mha_tensor *grad_key,
                                  mha_tensor *grad_value);

/* mha_layer_decode over the ranks (tensor-parallel decoding): `cache` is
 * this rank's, made by mha_kv_cache_create(mha_mpi_layer_local(layer),
 * ...), so it holds the keys and values of the rank's kv heads only
 * (1/P of the whole cache).  Every rank passes the same x [batch, n, E]
 * and gets the whole out; one ordered sum forms it.  The caches stay in
 * step: on an error on any rank, every rank's cache is as the call found
 * it.  Errors: as mha_layer_decode's, NOMEM. */
mha_status mha_mpi_layer_decode(mha_ctx *ctx, mha_mpi_layer *layer, mha_kv_cache *cache, mha_tensor *out,
                                const mha_tensor *x);

/* ------------------------------------------------------------------ */
/* Sequence-parallel attention                                         */
/* ------------------------------------------------------------------ */

/* mha_attention() of a sequence split over the ranks of comm: each rank
 * holds one contiguous block of the query rows and one of the keys, the
 * blocks in rank order (any sizes, empty ones too):
 *   q    [B, Hq, L_r, D]     rows L_0 + .. + L_(r-1) onwards of the whole Q
 *   k    [B, Hkv, S_r, D]    likewise of K, and v [B, Hkv, S_r, Dv] of V
 *   out  [B, Hq, L_r, Dv]    the same rows of the whole output, written
 *   lse  [B, Hq, L_r]        contiguous, or NULL
 * desc is the whole problem's: causal alignment, window and ALiBi by
 * positions in the whole sequence (L = sum L_r queries, S = sum S_r keys),
 * the mask over the whole [B, Hq, L, S] (every rank passes all of it).
 *
 * Ulysses (DeepSpeed-Ulysses' all-to-all): one all-to-all per tensor
 * gives each rank whole sequences of its heads (whole kv groups: Hkv >=
 * P, else INVALID_ARG), mha_attention runs on them, one all-to-all brings
 * out (and lse) back to the blocks.  Each head is computed exactly as
 * mha_attention computes it in one process: the same bits.  Moves 2 (P -
 * 1) / P of the rank's q, k, v and out; holds whole sequences of its
 * heads (about its block's size again, four times).  Errors: as
 * mha_attention's, UNSUPPORTED (an all-to-all past INT_MAX floats), NOMEM. */
mha_status mha_mpi_attention_ulysses(mha_ctx *ctx, MPI_Comm comm, mha_tensor *out, float *lse, const mha_tensor *q,
                                     const mha_tensor *k, const mha_tensor *v, const mha_attn_desc *desc);

/* Its gradients, as mha_attention_backward() of the whole sequence: every
 * tensor in the blocks above (lse from the forward call, required); dq,
 * dk, dv overwritten.  The same bits as one process.  Errors: as
 * mha_attention_backward's, UNSUPPORTED, NOMEM. */
mha_status mha_mpi_attention_ulysses_backward(mha_ctx *ctx, MPI_Comm comm, mha_tensor *dq, mha_tensor *dk,
                                              mha_tensor *dv, const mha_tensor *q, const mha_tensor *k,
                                              const mha_tensor *v, const mha_tensor *out, const float *lse,
                                              const mha_tensor *grad_out, const mha_attn_desc *desc);

/* How a sequence is laid out over the ranks for ring attention:
 *   BLOCKS  each rank one contiguous block, in rank order, any sizes (as
 *           Ulysses takes them);
 *   ZIGZAG  the sequence in 2P chunks (chunk c = rows [n c / 2P,
 *           n (c + 1) / 2P)); rank r holds chunks r and 2P - 1 - r, in that
 *           order: under causal masking every rank then has the same
 *           work, where BLOCKS leaves the last rank the most. */
typedef enum mha_mpi_layout { MHA_MPI_BLOCKS = 0, MHA_MPI_ZIGZAG } mha_mpi_layout;

/* The rows of an n-row sequence that rank r of P holds, as up to two runs
 * [start[i], start[i] + rows[i]) (the second empty for BLOCKS, where this
 * gives even blocks).  Not collective. */
void mha_mpi_layout_rows(mha_mpi_layout layout, int64_t n, int size, int rank, int64_t start[2], int64_t rows[2]);

/* Ring attention: the arguments of mha_mpi_attention_ulysses, the rows
 * laid out by `layout` (queries and keys alike).  Each rank keeps its
 * queries; the blocks of keys and values go round the ring (the next one
 * received while the current one is computed) and the partial results
 * merge by their row statistics in arrival order.  No limit on heads (MQA
 * too); per rank, two blocks of K and V in flight.  Within the tolerance
 * rule of one process, the same bits for a given rank count and layout.
 * Errors: as mha_attention's, INVALID_ARG (a rank's rows are not its
 * ZIGZAG chunks), UNSUPPORTED (a block past INT_MAX floats), NOMEM. */
mha_status mha_mpi_attention_ring(mha_ctx *ctx, MPI_Comm comm, mha_mpi_layout layout, mha_tensor *out, float *lse,
                                  const mha_tensor *q, const mha_tensor *k, const mha_tensor *v,
                                  const mha_attn_desc *desc);

/* Its gradients (lse from the forward call, required; dq, dk, dv
 * overwritten): twice round the ring, first for each row's exact delta =
 * sum P dP (mha_attention_backward_row_sums), then for the gradients
 * (mha_attention_backward_block), dK and dV travelling with their block
 * back to its owner.  Errors: as mha_mpi_attention_ring's. */
mha_status mha_mpi_attention_ring_backward(mha_ctx *ctx, MPI_Comm comm, mha_mpi_layout layout, mha_tensor *dq,
                                           mha_tensor *dk, mha_tensor *dv, const mha_tensor *q, const mha_tensor *k,
                                           const mha_tensor *v, const mha_tensor *out, const float *lse,
                                           const mha_tensor *grad_out, const mha_attn_desc *desc);

/* ------------------------------------------------------------------ */
/* Decoding over a KV cache split by sequence                          */
/* ------------------------------------------------------------------ */

/* mha_kv_cache_attention over a cache split across the ranks: rank r's
 * `shard` holds one contiguous block of the tokens, the blocks in rank
 * order (rank 0 the first tokens; any lengths, empty ones too: append
 * each new token to the last rank's shard, or start a new block on the
 * next rank when it is full).  q [batch, Hq, L, head_dim], the same on
 * every rank, holds the newest L tokens' queries; desc is
 * mha_kv_cache_attention's over the whole cache (causal bottom-right
 * places the queries at its end) with key_offset and key_total left 0:
 * the shards' positions set them.  Each rank attends over its shard, the
 * partial results merge by lse in rank order, and every rank gets out
 * [same as q] and lse [batch, Hq, L] (or NULL).  Within the tolerance
 * rule of one cache, the same bits for a given rank count and shard
 * lengths.  Errors: as mha_kv_cache_attention's, NOMEM. */
mha_status mha_mpi_kv_cache_attention(mha_ctx *ctx, MPI_Comm comm, const mha_kv_cache *shard, mha_tensor *out,
                                      float *lse, const mha_tensor *q, const mha_attn_desc *desc);

/* mha_layer_decode over a cache split by sequence: every rank holds the
 * whole layer (the same weights: they are small beside a long cache) and
 * its shard, made by mha_kv_cache_create(layer, batch, its capacity,
 * ...), and passes the same x [batch, n, E].  Each rank projects the new
 * rows (mha_layer_decode_qkv, at the position the shards' lengths add up
 * to); their keys and values go after the last rank that holds any
 * tokens, filling its shard, then the next ranks' (so a rank's block
 * follows the previous rank's); the new rows attend over every shard
 * (mha_mpi_kv_cache_attention, with the layer's mha_layer_decode_desc)
 * and every rank gets the whole out [batch, n, E].  Within the tolerance
 * rule of mha_layer_decode over one cache; the same bits for a given
 * rank count and shard capacities.  On an error every shard is as the
 * call found it.  Errors: as mha_layer_decode's (INVALID_ARG: the new
 * tokens do not fit in the shards' room), NOMEM. */
mha_status mha_mpi_kv_cache_decode(mha_ctx *ctx, MPI_Comm comm, const mha_layer *layer, mha_kv_cache *shard,
                                   mha_tensor *out, const mha_tensor *x);

#ifdef __cplusplus
}
#endif

#endif /* MHA_MPI_H */
