/*
 * mha.h -- libmha, multi-head attention for CPUs.  The whole public API.
 *
 * libmha computes what PyTorch's nn.MultiheadAttention and
 * scaled_dot_product_attention compute:
 *
 *     Attention(Q, K, V) = softmax(Q K^T * scale + bias) V,  scale = 1/sqrt(d)
 *     head_i             = Attention(X_q W_i^Q, X_k W_i^K, X_v W_i^V)
 *     MultiHead          = Concat(head_1 .. head_h) W^O
 *
 * Quick start (self-attention, error handling shortened):
 *
 *     mha_st_file *weights;
 *     mha_layer   *layer;
 *     mha_ctx     *ctx;
 *     mha_st_open("block.safetensors", &weights);
 *     mha_layer_from_safetensors(weights, "", 12, 0, MHA_DTYPE_F32, &layer);
 *     mha_ctx_create(0, &ctx);                                 // all CPUs
 *
 *     mha_layer_fwd_args args;
 *     mha_layer_fwd_args_init(&args);
 *     args.query = mha_tensor_3d(x, batch, seq, embed);        // [N, L, E]
 *     args.key = args.value = args.query;
 *     mha_tensor y = mha_tensor_3d(out, batch, seq, embed);
 *     if (mha_layer_forward(ctx, layer, &y, NULL, &args) != MHA_OK)
 *         fprintf(stderr, "%s\n", mha_last_error());
 *
 * Conventions
 *   - Every fallible function returns mha_status; MHA_OK is 0.  On failure
 *     mha_last_error() returns a sentence (thread-local, valid until the
 *     next failing call on the same thread) naming the argument at fault.
 *     Outputs are written only on success, unless a function says so.
 *   - Tensors are caller-owned float32 buffers described by mha_tensor:
 *     up to four dimensions with explicit strides counted in elements, so
 *     [B, L, H, D] and [B, H, L, D] layouts are both read without copies.
 *     Inputs are never written through.
 *   - Masks are either "keep" bytes (non-zero = may attend) or floats added
 *     to the scores, with broadcasting strides (0 repeats a dimension).
 *   - A query row whose keys are all masked gives output 0 and log-sum-exp
 *     -inf (never NaN).  PyTorch gives NaN there; this is the one
 *     intentional difference.
 *   - Sizes are int64_t and every size product is checked for overflow.
 *   - Results do not depend on the thread count: same bits for 1 or N.
 *   - Thread safety: functions are reentrant.  An mha_ctx or mha_layer may
 *     be used by one thread at a time; an mha_st_file likewise.  Distinct
 *     objects may be used from distinct threads freely.
 *   - Every *_free(NULL) is a harmless no-op.
 */
#ifndef MHA_H
#define MHA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MHA_VERSION_MAJOR  0
#define MHA_VERSION_MINOR  1
#define MHA_VERSION_PATCH  0
#define MHA_VERSION_STRING "0.1.0"

/* ------------------------------------------------------------------ */
/* Status and errors                                                   */
/* ------------------------------------------------------------------ */

typedef enum mha_status {
    MHA_OK = 0,
    MHA_ERR_INVALID_ARG, /* an argument is out of range or inconsistent */
    MHA_ERR_MISUSE,      /* NULL handle or call in the wrong order */
    MHA_ERR_NOMEM,       /* an allocation failed */
    MHA_ERR_IO,          /* a file could not be read or written */
    MHA_ERR_CORRUPT,     /* a safetensors file is malformed */
    MHA_ERR_UNSUPPORTED, /* valid request this build cannot serve */
    MHA_ERR_NOT_FOUND,   /* a named tensor is absent */
    MHA_ERR_INTERNAL     /* a bug in libmha; please report it */
} mha_status;

/* Sizes that overflow.  A size computed from a call's arguments (a
 * tensor's reach, elements, bytes, a workspace) that does not fit in 64
 * bits is MHA_ERR_INVALID_ARG in every function, and is found before
 * anything is allocated or computed; MHA_ERR_NOMEM always means that an
 * allocation of a size that exists failed.  A size from a file's header
 * that overflows makes the file MHA_ERR_CORRUPT. */

/* Name of a status ("invalid argument", ...); static storage, never NULL. */
const char *mha_status_str(mha_status status);

/* The sentence describing the last failure on this thread, or "" if none
 * has happened.  Owned by the library. */
const char *mha_last_error(void);

/* The library's version, e.g. "0.1.0"; compare with MHA_VERSION_STRING to
 * check that header and library match. */
const char *mha_version(void);

/* The instruction set of the kernels in use: "amx" (the avx512 kernels,
 * with AMX tiles for bfloat16 products), "avx512", "avx2" or "generic", the
 * best this CPU and OS support.  The environment variable
 * MHA_ISA=generic|avx2|avx512|amx, read once, caps the choice (for tests
 * and benchmarks).  Static storage. */
const char *mha_isa(void);

/* ------------------------------------------------------------------ */
/* Tensors and masks                                                   */
/* ------------------------------------------------------------------ */

/* A strided float32 view.  Rank-3 views leave shape[3] = 1, stride[3] = 0;
 * functions say which rank they expect.  Strides are in elements and may
 * be any non-negative values (0 repeats). */
typedef struct mha_tensor {
    float *data;
    int64_t shape[4];
    int64_t stride[4];
} mha_tensor;

/* Contiguous row-major views. */
mha_tensor mha_tensor_3d(float *data, int64_t d0, int64_t d1, int64_t d2);
mha_tensor mha_tensor_4d(float *data, int64_t d0, int64_t d1, int64_t d2, int64_t d3);

typedef enum mha_mask_kind {
    MHA_MASK_NONE = 0,
    MHA_MASK_KEEP, /* uint8_t; non-zero = the key may be attended */
    MHA_MASK_ADD   /* float; added to the score (-INFINITY masks out) */
} mha_mask_kind;

/* A mask over [batch, heads, query, key].  stride[] is in elements; use 0
 * to broadcast a dimension (e.g. [L, S] -> {0, 0, S, 1}). */
typedef struct mha_mask {
    mha_mask_kind kind;
    const void *data;
    int64_t stride[4];
} mha_mask;

typedef enum mha_causal {
    MHA_CAUSAL_NONE = 0,
    MHA_CAUSAL_TOP_LEFT,    /* key j <= query i (PyTorch is_causal) */
    MHA_CAUSAL_BOTTOM_RIGHT /* key j <= i + S - L (flash-attn, KV cache) */
} mha_causal;

/* Element types: of safetensors data, of computation (F32, BF16) and of
 * KV cache storage (F32, BF16, I8). */
typedef enum mha_dtype {
    MHA_DTYPE_F64 = 0,
    MHA_DTYPE_F32,
    MHA_DTYPE_F16,
    MHA_DTYPE_BF16,
    MHA_DTYPE_BOOL,
    MHA_DTYPE_U8,
    MHA_DTYPE_I32,
    MHA_DTYPE_I64,
    MHA_DTYPE_I8,
    MHA_DTYPE_COUNT
} mha_dtype;

/* ------------------------------------------------------------------ */
/* Execution context                                                   */
/* ------------------------------------------------------------------ */

/* Threads and scratch memory for compute calls.  n_threads 0 means the
 * MHA_NUM_THREADS environment variable if set, else all online CPUs.
 * Errors: INVALID_ARG (n_threads < 0 or > 1024), NOMEM. */
typedef struct mha_ctx mha_ctx;
mha_status mha_ctx_create(int n_threads, mha_ctx **out_ctx);
void mha_ctx_free(mha_ctx *ctx);
int mha_ctx_threads(const mha_ctx *ctx);

/* Workspace.  A compute call plans the scratch memory it needs before it
 * computes and takes it from its context's one workspace buffer, which
 * grows to the largest call so far (that call's only allocation) and is
 * kept until mha_ctx_free.  mha_ctx_reserve grows it ahead of time, so
 * that later calls needing no more allocate nothing; the
 * *_workspace_size functions below say what a call would take, and
 * mha_ctx_workspace_bytes what the context holds.
 * Errors: MISUSE (ctx NULL), INVALID_ARG (bytes < 0), NOMEM. */
mha_status mha_ctx_reserve(mha_ctx *ctx, int64_t bytes);
int64_t mha_ctx_workspace_bytes(const mha_ctx *ctx);

/* ------------------------------------------------------------------ */
/* Scaled dot-product attention                                        */
/* ------------------------------------------------------------------ */

/* Options of one attention call.  Call mha_attn_desc_init() first.
 * The score of query i and key j (L queries, S keys) is built in this
 * order:
 *     s  = (q_i . k_j) * scale
 *     s  = softcap * tanh(s / softcap)          if softcap > 0
 *     s += -alibi_slopes[h] * |i + S - L - j|   if alibi_slopes
 *     s += mask (ADD) or -inf where mask is 0 (KEEP)
 *     s  = -inf where causal or window excludes j
 * The window is flash-attn's: i + S - L - window_left <= j <=
 * i + S - L + window_right, -1 meaning unbounded on that side. */
typedef struct mha_attn_desc {
    double scale;              /* NAN (default): 1/sqrt(D) */
    mha_causal causal;         /* default MHA_CAUSAL_NONE */
    int64_t window_left;       /* default -1 */
    int64_t window_right;      /* default -1 */
    float softcap;             /* default 0 = off */
    const float *alibi_slopes; /* [Hq] or NULL */
    mha_mask mask;             /* over [B, Hq, L, S]; default none */
    int enable_gqa;            /* allow Hkv to divide Hq; default 0 */
    mha_dtype dtype;           /* MHA_DTYPE_F32 (default), or MHA_DTYPE_BF16:
                                  scale*q, k, v and the probabilities are
                                  rounded to bf16 where they enter the two
                                  products, which accumulate in float32 */
    /* Where this call's rows sit in a longer sequence, for attention
     * computed a block of queries and keys at a time (sequence
     * parallelism, mha_mpi.h): query row i is row query_offset + i of
     * query_total, key j is key key_offset + j of key_total, and causal
     * masking, the window and ALiBi follow those positions (i and j in
     * the score's description above become them, L and S the totals;
     * the mask stays this call's [B, Hq, L, S]).  Defaults 0; a total of
     * 0 means this call's own L or S. */
    int64_t query_offset, key_offset;
    int64_t query_total, key_total;
} mha_attn_desc;

void mha_attn_desc_init(mha_attn_desc *desc);

/* out = attention(q, k, v) for every batch and head.
 *   out  [B, Hq, L, Dv]  written
 *   lse  [B, Hq, L]      contiguous; natural log of each row's softmax
 *                        denominator (-inf for a fully masked row); may
 *                        be NULL
 *   q    [B, Hq, L, D]
 *   k    [B, Hkv, S, D]  Hkv == Hq, or with enable_gqa Hq % Hkv == 0
 *                        (query head h reads kv head h / (Hq / Hkv))
 *   v    [B, Hkv, S, Dv]
 * out must not overlap the inputs.  Errors: MISUSE (NULL pointers),
 * INVALID_ARG (shapes, strides, window, softcap, scale), NOMEM. */
mha_status mha_attention(mha_ctx *ctx, mha_tensor *out, float *lse, const mha_tensor *q, const mha_tensor *k,
                         const mha_tensor *v, const mha_attn_desc *desc);

/* The workspace bytes mha_attention() would take from ctx for these
 * arguments (out, q, k, v are only checked, never read).  Errors as
 * mha_attention's, without NOMEM. */
mha_status mha_attention_workspace_size(const mha_ctx *ctx, const mha_tensor *out, const mha_tensor *q,
                                        const mha_tensor *k, const mha_tensor *v, const mha_attn_desc *desc,
                                        int64_t *bytes);

/* Gradients of mha_attention() (float32 only).  Given the forward call's
 * inputs and descriptor, its output `out` and `lse` (which this pass needs:
 * the probabilities are recomputed from them, FlashAttention-2 style, with
 * O(L + S) memory per thread), and grad_out = dLoss/dout [B, Hq, L, Dv]:
 *   dq [B, Hq, L, D], dk [B, Hkv, S, D], dv [B, Hkv, S, Dv]   overwritten
 * With GQA, dk and dv sum over the query heads that share each kv head.
 * Masks, ALiBi and the window get no gradient.  The same bits for any
 * thread count.  Errors: MISUSE, INVALID_ARG (as mha_attention, and the
 * gradients' shapes), UNSUPPORTED (dtype BF16), NOMEM. */
mha_status mha_attention_backward(mha_ctx *ctx, mha_tensor *dq, mha_tensor *dk, mha_tensor *dv, const mha_tensor *q,
                                  const mha_tensor *k, const mha_tensor *v, const mha_tensor *out, const float *lse,
                                  const mha_tensor *grad_out, const mha_attn_desc *desc);

/* The workspace bytes mha_attention_backward() would take (it does not
 * need lse to say).  Errors as mha_attention_backward's, without NOMEM. */
mha_status mha_attention_backward_workspace_size(const mha_ctx *ctx, const mha_tensor *dq, const mha_tensor *dk,
                                                 const mha_tensor *dv, const mha_tensor *q, const mha_tensor *k,
                                                 const mha_tensor *v, const mha_tensor *out, const mha_tensor *grad_out,
                                                 const mha_attn_desc *desc, int64_t *bytes);

/* The softmax's row statistics of a forward call, for a backward that
 * recomputes every probability as the forward did:
 *   max  [B, Hq, L]  contiguous; each row's largest score, rounded to
 *                    float32 (-inf for a row that sees no key)
 *   sum  [B, Hq, L]  contiguous; the sum over its keys of exp(score - max),
 *                    with the exact score where logits are large
 *                    (docs/NUMERICS.md), so the largest term is 1 but
 *                    for the rounding of max (0 for a row that sees no
 *                    key)
 * lse is max + log(sum) rounded to float32, off by up to half an ulp of
 * |lse| (4e-6 at lse = 100), an error in every probability of its row;
 * mha_attention_backward removes it with an extra pass over the scores
 * (one more block product to its five; where a row's largest probability
 * passes 1/2, a second pass over scores and dP takes delta = sum P dP
 * exactly), which these make unnecessary but for that second pass. */
typedef struct mha_attn_stats {
    float *max;
    float *sum;
} mha_attn_stats;

/* mha_attention() writing the row statistics instead of lse (always by
 * the tiled driver, which keeps them: for fewer than 16 query rows the
 * output, and max + log(sum) against mha_attention's lse, may differ in
 * the last bits, mha_attention's split-K rounding each score its own
 * way; the backward recomputes the tiles' scores either way).  Errors as
 * mha_attention's (MISUSE for a NULL stats, max or sum). */
mha_status mha_attention_with_stats(mha_ctx *ctx, mha_tensor *out, const mha_attn_stats *stats, const mha_tensor *q,
                                    const mha_tensor *k, const mha_tensor *v, const mha_attn_desc *desc);
/* Its workspace bytes, as mha_attention_workspace_size. */
mha_status mha_attention_with_stats_workspace_size(const mha_ctx *ctx, const mha_tensor *out, const mha_tensor *q,
                                                   const mha_tensor *k, const mha_tensor *v, const mha_attn_desc *desc,
                                                   int64_t *bytes);

/* mha_attention_backward() from the row statistics of
 * mha_attention_with_stats() instead of lse: no pass to renormalise the
 * probabilities.  Workspace: mha_attention_backward_workspace_size's.
 * Errors as mha_attention_backward's. */
mha_status mha_attention_backward_with_stats(mha_ctx *ctx, mha_tensor *dq, mha_tensor *dk, mha_tensor *dv,
                                             const mha_tensor *q, const mha_tensor *k, const mha_tensor *v,
                                             const mha_tensor *out, const mha_attn_stats *stats,
                                             const mha_tensor *grad_out, const mha_attn_desc *desc);

/* The backward of one block of keys of longer rows (sequence
 * parallelism, mha_mpi.h): as mha_attention_backward_with_stats, with
 * stats the whole rows' max and sum, and delta [B, Hq, L] each whole
 * row's delta_i = sum_j P_ij dP_ij (mha_attention_backward_row_sums says
 * how); nothing is renormalised over this call's keys and no output is
 * read.  dq, dk, dv get this block's share (overwritten); summed over the
 * blocks they are the gradients.  Errors as mha_attention_backward's
 * (MISUSE for a NULL stats, max, sum or delta). */
mha_status mha_attention_backward_block(mha_ctx *ctx, mha_tensor *dq, mha_tensor *dk, mha_tensor *dv,
                                        const mha_tensor *q, const mha_tensor *k, const mha_tensor *v,
                                        const mha_attn_stats *stats, const float *delta, const mha_tensor *grad_out,
                                        const mha_attn_desc *desc);

/* For a backward split over blocks of keys (sequence parallelism): over
 * this call's keys only, each row's
 *   p_sum [B, Hq, L]  sum_j P_ij
 *   p_dp  [B, Hq, L]  sum_j P_ij dP_ij,  dP_ij = grad_out_i . v_j
 * in float64 (overwritten), with P_ij = exp(s_ij - max_i) / sum_i from
 * stats, the whole row's (an lse as max with sum 1 will do).  Summed over
 * the blocks, delta = p_dp / p_sum and the p_sum total are what
 * mha_attention_backward_block takes as delta and (times sum) as
 * stats->sum: the softmax's gradient exactly as one call over all keys
 * takes it where a row's probability peaks.  Errors as
 * mha_attention_backward's (MISUSE for a NULL stats, max or sum). */
mha_status mha_attention_backward_row_sums(mha_ctx *ctx, double *p_sum, double *p_dp, const mha_tensor *q,
                                           const mha_tensor *k, const mha_tensor *v, const mha_tensor *grad_out,
                                           const mha_attn_stats *stats, const mha_attn_desc *desc);

/* ------------------------------------------------------------------ */
/* safetensors files                                                   */
/* ------------------------------------------------------------------ */

#define MHA_ST_MAX_RANK 8

/* "F32", "BF16", ... as written in safetensors headers. */
const char *mha_dtype_name(mha_dtype dtype);
size_t mha_dtype_size(mha_dtype dtype);

/* Measure this machine's multiply-add peak for `dtype` (MHA_DTYPE_F32, or
 * MHA_DTYPE_BF16: the bf16 dot-product instructions where the kernels use
 * them, else the float32 peak) with the kernels in use (mha_isa()), all of
 * ctx's threads at once, for about `seconds` (best of three runs).
 * GFLOP/s in *gflops.  Not reentrant.  Errors: MISUSE, INVALID_ARG (dtype,
 * seconds outside (0, 60]). */
mha_status mha_measure_peak(mha_ctx *ctx, mha_dtype dtype, double seconds, double *gflops);

/* The machine's copy bandwidth with the context's threads: the best of ten
 * parallel memcpy of `bytes` (64 MB is beyond every cache here), counted
 * as STREAM counts a copy, 2 x bytes (read + write) per second, in GB/s.
 * Errors: MISUSE, INVALID_ARG (bytes outside 4 KiB .. 64 GiB), NOMEM. */
mha_status mha_measure_bandwidth(mha_ctx *ctx, int64_t bytes, double *gbps);

/* One parallel memcpy of `bytes` from src to dst (not overlapping) with
 * the context's threads, timed, counted as mha_measure_bandwidth counts:
 * for a benchmark that times copies between its own calls, so that both
 * see the same neighbours on a shared machine.  Errors: MISUSE,
 * INVALID_ARG (bytes outside 4 KiB .. 64 GiB). */
mha_status mha_time_copy(mha_ctx *ctx, void *dst, const void *src, int64_t bytes, double *gbps);

/* One core's last-level cache in bytes: what Linux's sysfs says of cpu0's
 * highest cache level (index3), else the C library's sysconf, else 32 MB.
 * sysfs first: on an AMD EPYC guest glibc's sysconf said 320 MB, the whole
 * package's, where a core sees its own 32 MB.  Decoding's plan asks it
 * whether a float32 KV cache stays in it between steps; `mha bench`
 * whether K and V fit in it. */
int64_t mha_last_level_cache_bytes(void);

typedef struct mha_st_info {
    const char *name; /* owned by the file object */
    mha_dtype dtype;
    int rank;
    int64_t shape[MHA_ST_MAX_RANK];
    int64_t numel;
} mha_st_info;

/* A parsed and fully validated safetensors file.  Opening checks the
 * whole header (size bound of 100 MB, JSON, dtypes, shapes, offsets that
 * are in order, contiguous and inside the file) before anything sized
 * from the file is allocated; tensor data is read on demand.
 * Errors: IO (cannot open/read), CORRUPT (names the fault), NOMEM. */
typedef struct mha_st_file mha_st_file;
mha_status mha_st_open(const char *path, mha_st_file **out_file);
/* Same, over a caller buffer that must outlive the file object. */
mha_status mha_st_open_memory(const void *buf, size_t len, mha_st_file **out_file);
void mha_st_close(mha_st_file *file);

int64_t mha_st_count(const mha_st_file *file);
/* Tensor by index (0 .. count-1, in file order) or by name; NOT_FOUND
 * when absent. */
mha_status mha_st_info_at(const mha_st_file *file, int64_t index, mha_st_info *info);
mha_status mha_st_find(const mha_st_file *file, const char *name, mha_st_info *info);
/* Value of a __metadata__ key, or NULL. */
const char *mha_st_metadata(const mha_st_file *file, const char *key);

/* Copy a tensor converted to float32 (from F64, F32, F16, BF16, BOOL,
 * U8, I32 or I64) into dst, which holds `capacity` floats.
 * Errors: NOT_FOUND, INVALID_ARG (capacity too small), IO. */
mha_status mha_st_read_f32(mha_st_file *file, const char *name, float *dst, int64_t capacity);
/* Elements [first, first + count) of a tensor, in its row-major order,
 * converted to float32 into dst (count floats): a part of a large tensor
 * without the rest (one rank's shard, mha_mpi.h).  Errors: NOT_FOUND,
 * INVALID_ARG (the range outside the tensor), IO. */
mha_status mha_st_read_f32_range(mha_st_file *file, const char *name, int64_t first, int64_t count, float *dst);
/* Copy a tensor's raw little-endian bytes into dst (capacity bytes). */
mha_status mha_st_read_raw(mha_st_file *file, const char *name, void *dst, size_t capacity);

/* Builds a safetensors file in memory and writes it atomically: to a
 * temporary name in the same directory, fsync, then rename, so a reader
 * never sees a partial file and a failure leaves nothing behind.  Added
 * data is copied.  Errors: INVALID_ARG (bad name/shape, duplicate name),
 * NOMEM, IO. */
typedef struct mha_st_writer mha_st_writer;
mha_status mha_st_writer_create(mha_st_writer **out_writer);
void mha_st_writer_free(mha_st_writer *writer);
mha_status mha_st_writer_add(mha_st_writer *writer, const char *name, mha_dtype dtype, int rank, const int64_t *shape,
                             const void *data);
mha_status mha_st_writer_set_metadata(mha_st_writer *writer, const char *key, const char *value);
mha_status mha_st_writer_save(const mha_st_writer *writer, const char *path);

/* ------------------------------------------------------------------ */
/* The multi-head attention layer (torch.nn.MultiheadAttention)        */
/* ------------------------------------------------------------------ */

/* Rotary position embeddings on Q and K (after their projections and
 * biases): pairs of dimensions are rotated by pos * theta^(-2i / dim).
 *   HALF        pairs (i, i + dim/2): Llama, GPT-NeoX ("rotate_half")
 *   INTERLEAVED pairs (2i, 2i + 1): GPT-J */
typedef enum mha_rope_kind { MHA_ROPE_NONE = 0, MHA_ROPE_HALF, MHA_ROPE_INTERLEAVED } mha_rope_kind;

typedef struct mha_rope {
    mha_rope_kind kind; /* default MHA_ROPE_NONE */
    double theta;       /* base; 0 (default) = 10000 */
    int64_t dim;        /* rotated dimensions per head, even; 0 = head_dim */
} mha_rope;

typedef struct mha_layer_desc {
    int64_t embed_dim; /* E; required */
    int64_t num_heads; /* h query heads */
    int64_t kdim;      /* key features; 0 (default) = E */
    int64_t vdim;      /* value features; 0 (default) = E */
    int bias;          /* biases of the Q, K, V projections; default 1 */
    int add_bias_kv;   /* bias_k and bias_v rows; default 0 */
    int add_zero_attn; /* a zero key/value row; default 0 */
    mha_dtype dtype;   /* MHA_DTYPE_F32 (default) or MHA_DTYPE_BF16 */
    /* Beyond nn.MultiheadAttention (Llama, GPT-2, Mistral, Gemma blocks): */
    int64_t num_kv_heads;      /* g key/value heads, h % g == 0 (GQA; MQA: 1); 0 (default) = h */
    int64_t head_dim;          /* 0 (default) = E / h, which must then divide */
    int out_bias;              /* bias of the output projection; -1 (default) = as bias */
    mha_rope rope;             /* default none */
    int64_t window_left;       /* sliding window as in mha_attn_desc; default -1 */
    int64_t window_right;      /* default -1 */
    float softcap;             /* default 0 = off */
    const float *alibi_slopes; /* [h] or NULL (default); copied */
} mha_layer_desc;

void mha_layer_desc_init(mha_layer_desc *desc);

/* With dtype MHA_DTYPE_BF16 the layer computes as a bfloat16 model does:
 * weights are rounded to bf16 when set, and the input, Q, K, V, the
 * unnormalised attention probabilities and the head outputs are rounded to
 * bf16 where they enter a matrix product; every product accumulates in
 * float32, softmax statistics stay float32, and inputs and outputs are
 * float32 buffers as always.  Its matrix products run on AMX tiles where
 * the CPU has them (mha_isa() "amx"), else on AVX512-BF16 where the CPU
 * has it (mha_isa() "avx512" and the CPU flag), else on a portable bf16
 * kernel.
 * Accuracy: docs/NUMERICS.md.
 *
 * A layer owns packed copies of its weights.  Biases start at 0, as
 * PyTorch initialises them; the matrices (and bias_k/bias_v) have no
 * default: mha_layer_forward, _backward and _decode return MISUSE naming
 * the first one never set (by mha_layer_set_weight, mha_layer_load, or
 * mha_layer_params followed by mha_layer_params_changed).
 * Errors: INVALID_ARG (names the field, e.g. E not divisible by h), NOMEM. */
typedef struct mha_layer mha_layer;
mha_status mha_layer_create(const mha_layer_desc *desc, mha_layer **out_layer);
void mha_layer_free(mha_layer *layer);
const mha_layer_desc *mha_layer_get_desc(const mha_layer *layer);

/* Set one weight by its name in the block's PyTorch state_dict, with
 * qd = h * head_dim and kvd = g * head_dim (both E in nn.MultiheadAttention):
 *   nn.MultiheadAttention: in_proj_weight [qd + 2 kvd, E] (kdim == vdim ==
 *     E), q_proj_weight [qd, E], k_proj_weight [kvd, kdim], v_proj_weight
 *     [kvd, vdim], in_proj_bias [qd + 2 kvd], out_proj.weight [E, qd],
 *     out_proj.bias [E], bias_k / bias_v [1, 1, E];
 *   Llama-style: q_proj.weight, k_proj.weight, v_proj.weight, o_proj.weight
 *     (shapes as above) and q_proj.bias, k_proj.bias, v_proj.bias,
 *     o_proj.bias;
 *   GPT-2 (Conv1D, stored [in, out]): c_attn.weight [E, qd + 2 kvd],
 *     c_attn.bias, c_proj.weight [qd, E], c_proj.bias [E];
 *   BERT (Hugging Face's BertSelfAttention and BertSelfOutput):
 *     attention.self.query.weight, attention.self.key.weight,
 *     attention.self.value.weight, attention.output.dense.weight (shapes as
 *     Llama's) and their .bias.  The block's residual and LayerNorm
 *     (attention.output.LayerNorm) are not part of the layer.
 * numel must match.  Errors: NOT_FOUND (name not a weight of this layer),
 * INVALID_ARG (size), NOMEM. */
mha_status mha_layer_set_weight(mha_layer *layer, const char *name, const float *data, int64_t numel);

/* Create a layer from the state_dict tensors "<prefix><name>" in a
 * safetensors file: E, kdim, vdim, bias and add_bias_kv are read from the
 * tensors present; num_heads and add_zero_attn are not stored by PyTorch
 * and are given here, as is the dtype to compute in (MHA_DTYPE_F32 or
 * MHA_DTYPE_BF16; stored F32, F64, F16 and BF16 weights load into either).
 * Errors: NOT_FOUND (names the missing tensor), INVALID_ARG (names the
 * tensor with the wrong shape or dtype), IO, NOMEM. */
/* The naming family of a block's weights (see mha_layer_set_weight). */
typedef enum mha_weight_names {
    MHA_NAMES_AUTO = 0, /* the first of out_proj.weight, o_proj.weight, c_attn.weight,
                           attention.output.dense.weight present */
    MHA_NAMES_TORCH,    /* nn.MultiheadAttention */
    MHA_NAMES_LLAMA,    /* q_proj / k_proj / v_proj / o_proj */
    MHA_NAMES_GPT2,     /* c_attn / c_proj */
    MHA_NAMES_BERT      /* attention.self.query / key / value, attention.output.dense */
} mha_weight_names;

/* A layer from the block "<prefix>..." in a safetensors file, named by
 * `names`: the tensors give E, kdim, vdim, the kv heads and head width
 * (from W_q's and W_k's rows and hints->num_heads), the biases and
 * bias_k/bias_v; every other field (num_heads, add_zero_attn, dtype, rope,
 * window, softcap, alibi_slopes) comes from *hints.  Errors as above. */
mha_status mha_layer_load(mha_st_file *file, const char *prefix, mha_weight_names names, const mha_layer_desc *hints,
                          mha_layer **out_layer);

/* What mha_layer_load would build, planned without reading a weight:
 * the description (hints completed from the file, then as
 * mha_layer_create completes it: kdim, vdim, num_kv_heads, head_dim,
 * out_bias and rope's defaults set; an invalid one refused), the naming family,
 * and the tensors it would read: weights[i] as the file stores it (its
 * name, with the prefix, is the file's) and weight_names[i] as
 * mha_layer_set_weight names it (static).  For loaders that read each
 * weight themselves, in shards (mha_mpi_layer_load).  Errors: as
 * mha_layer_load's, without NOMEM. */
enum { MHA_LOAD_MAX_WEIGHTS = 8 };
typedef struct mha_layer_load_plan {
    mha_layer_desc desc;
    mha_weight_names names;
    int n_weights;
    mha_st_info weights[MHA_LOAD_MAX_WEIGHTS];
    const char *weight_names[MHA_LOAD_MAX_WEIGHTS];
} mha_layer_load_plan;
mha_status mha_layer_plan_load(mha_st_file *file, const char *prefix, mha_weight_names names,
                               const mha_layer_desc *hints, mha_layer_load_plan *plan);

/* The family a layer's weights were loaded under (MHA_NAMES_TORCH for a
 * layer made with mha_layer_create); mha_layer_params names parameters by
 * it: nn.MultiheadAttention's names for such a layer, Llama's otherwise
 * (also for GPT-2, whose Conv1D matrices are the transposes). */
mha_weight_names mha_layer_names(const mha_layer *layer);

/* The names of the layer's weight tensors in its family (see
 * mha_layer_set_weight), in PyTorch's parameters() order: fills
 * names[0 .. min(n, capacity)) (static strings) and returns n, at most 12;
 * -1 with MISUSE for a bad layer. */
int64_t mha_layer_weight_names(const mha_layer *layer, const char **names, int64_t capacity);

/* Copies the weight, or its gradient, called `name` (in any family, as
 * mha_layer_set_weight takes it) into dst in that tensor's own layout:
 * GPT-2's Conv1D tensors transposed, Q|K|V stacked.  Needs the training
 * state (mha_layer_train_init), which holds the plain weights.  Errors:
 * MISUSE (no training state, NULL), NOT_FOUND (not a weight of this
 * layer), INVALID_ARG (numel is not the tensor's). */
mha_status mha_layer_get_weight(const mha_layer *layer, const char *name, float *dst, int64_t numel);
/* The rank, shape and element count of the weight called `name`, as
 * stored in a file of its family.  Errors: MISUSE, NOT_FOUND. */
mha_status mha_layer_weight_shape(const mha_layer *layer, const char *name, int *rank, int64_t shape[3],
                                  int64_t *numel);
mha_status mha_layer_get_grad(const mha_layer *layer, const char *name, float *dst, int64_t numel);

mha_status mha_layer_from_safetensors(mha_st_file *file, const char *prefix, int64_t num_heads, int add_zero_attn,
                                      mha_dtype dtype, mha_layer **out_layer);

typedef struct mha_layer_tape mha_layer_tape;

typedef struct mha_layer_fwd_args {
    mha_tensor query;          /* [N, L, E] rank 3 */
    mha_tensor key;            /* [N, S, kdim] */
    mha_tensor value;          /* [N, S, vdim] */
    mha_mask attn_mask;        /* over [N, h, L, S] */
    mha_mask key_padding_mask; /* over [N, h, L, S], usually {S, 0, 0, 1} */
    mha_causal causal;         /* over the S real keys; default none */
    int average_attn_weights;  /* default 1 */
    mha_layer_tape *tape;      /* NULL (default), or where to record what
                                  mha_layer_backward needs (training) */
    int64_t position;          /* rope: position of query row 0 and key
                                  row 0; default 0 */
    int write_input_grads;     /* mha_layer_backward only: 1 writes
                                  grad_query, grad_key and grad_value (=)
                                  instead of adding to them (+=); a tensor
                                  given for several still gets their sum.
                                  Default 0 */
} mha_layer_fwd_args;

void mha_layer_fwd_args_init(mha_layer_fwd_args *args);

/* attn_output = MultiHead(query, key, value).
 *   attn_output   [N, L, E]  written
 *   attn_weights  NULL, or [N, 1, L, S'] (averaged over heads) or
 *                 [N, h, L, S'], S' = S + add_bias_kv + add_zero_attn;
 *                 the softmax probabilities
 * Masks and causal apply to the S real keys; the bias_k/bias_v and zero
 * rows are appended after them and never masked, as in PyTorch.
 * Errors: MISUSE, INVALID_ARG (names the tensor and dimension), NOMEM. */
mha_status mha_layer_forward(mha_ctx *ctx, mha_layer *layer, mha_tensor *attn_output, mha_tensor *attn_weights,
                             const mha_layer_fwd_args *args);

/* The workspace bytes mha_layer_forward() would take from ctx for these
 * arguments (nothing is read).  Errors as mha_layer_forward's, without
 * NOMEM. */
mha_status mha_layer_workspace_size(const mha_ctx *ctx, const mha_layer *layer, const mha_tensor *attn_output,
                                    const mha_tensor *attn_weights, const mha_layer_fwd_args *args, int64_t *bytes);

/* ------------------------------------------------------------------ */
/* Training: gradients of the layer                                    */
/* ------------------------------------------------------------------ */

/* A training step:
 *
 *     mha_layer_train_init(layer);             once: gradients, plain weights
 *     mha_layer_tape_create(&tape);            once: reused by every step
 *     args.tape = tape;
 *     mha_layer_zero_grad(layer);
 *     mha_layer_forward(ctx, layer, &y, NULL, &args);     records into tape
 *     ... loss, dL/dy ...
 *     mha_layer_backward(ctx, layer, &args, &dy, &dx, NULL, NULL);
 *     n = mha_layer_params(layer, params, 8);  value, grad, numel by name
 *     ... the optimizer updates params[i].value from params[i].grad ...
 *     mha_layer_params_changed(layer);
 *
 * Nothing is allocated per step once the shapes stop growing: the tape
 * keeps its buffers, the context its workspace, the layer its weights.
 * Training computes in float32; a BF16 layer returns UNSUPPORTED. */

/* Gives the layer float32 gradients (zero) and a plain copy of its weights
 * the optimizer can update.  Idempotent.  Errors: MISUSE, UNSUPPORTED
 * (dtype BF16), NOMEM. */
mha_status mha_layer_train_init(mha_layer *layer);

/* One parameter of a training layer, named as in the PyTorch state_dict.
 * value and grad are arrays of numel floats (shape in shape[0..rank)):
 * the layer's own, grad in the caller's storage after
 * mha_layer_set_grad_storage; gradients accumulate there across backward
 * calls until zeroed. */
typedef struct mha_param {
    const char *name;
    float *value;
    float *grad;
    int64_t numel;
    int rank;
    int64_t shape[3];
} mha_param;

/* Fills params[0 .. min(n, capacity)) in PyTorch's parameters() order
 * (in_proj_weight or q/k/v_proj_weight, in_proj_bias, bias_k, bias_v,
 * out_proj.weight, out_proj.bias; those the layer has) and returns n, the
 * number the layer has (at most 8); -1 with MISUSE when the layer has no
 * training state. */
int64_t mha_layer_params(mha_layer *layer, mha_param *params, int64_t capacity);

/* After writing to mha_param values: the packed copies the kernels read
 * are brought up to date (in place) by the next call that computes with
 * the layer (mha_layer_forward, _backward, _decode and the decoding
 * stages), on its context's threads; mha_layer_set_weight on a training
 * layer waits for it the same way.  Errors: MISUSE. */
mha_status mha_layer_params_changed(mha_layer *layer);

/* Sets every gradient to 0. */
void mha_layer_zero_grad(mha_layer *layer);

/* Sets every gradient to 0 as of the next mha_layer_backward, which then
 * writes the gradients instead of adding to them: each block of a weight
 * gradient gets its first sum as if added to zero (the same bits as after
 * mha_layer_zero_grad), with no pass over 4 E^2 floats through memory
 * before the backward.  Until that backward the gradients' contents are
 * left as they are, so read none of them in between.  For a framework
 * that hands each step's gradients on in new storage
 * (mha_layer_set_grad_storage): PyTorch's autograd does.  mha_layer_zero_grad
 * cancels it. */
void mha_layer_zero_grad_deferred(mha_layer *layer);

/* The floats of the layer's gradient storage: every parameter's gradient,
 * back to back.  Errors: MISUSE (no training state, NULL). */
mha_status mha_layer_grad_storage_size(const mha_layer *layer, int64_t *count);

/* Moves the gradients into storage the caller owns: `count` floats
 * (mha_layer_grad_storage_size), any alignment, kept alive and not
 * otherwise written while the layer uses it.  For a framework that hands
 * each step's gradients on as new arrays (PyTorch's autograd does): a new
 * storage a step, and the gradients are never copied out.  From then on
 * the storage's contents are the gradients: the backward adds into them
 * as they are (zero them first, mha_layer_zero_grad), and
 * mha_layer_params' grad pointers point into it (read them again).  NULL
 * gives the layer storage of its own again, zeroed.  Errors: MISUSE (no
 * training state), INVALID_ARG (count is not the layer's), NOMEM. */
mha_status mha_layer_set_grad_storage(mha_layer *layer, float *storage, int64_t count);

/* The floats of the layer's weight storage: its matrices' values (the
 * optimizer's copy), back to back.  Errors: MISUSE (no training state,
 * NULL). */
mha_status mha_layer_weight_storage_size(const mha_layer *layer, int64_t *count);

/* Moves the matrices' values (mha_layer_params' value of each matrix
 * parameter; biases stay the layer's) into storage the caller owns:
 * `count` floats (mha_layer_weight_storage_size), any alignment, kept
 * alive while the layer uses it; the current values are copied in.  For
 * a framework whose parameters live in its own tensors (PyTorch's): with
 * the tensors made views of the storage, the optimizer's update writes
 * the layer's values in place, announced by mha_layer_params_changed,
 * and nothing is copied a step.  mha_layer_params' value pointers point
 * into it (read them again).  NULL gives the layer storage of its own
 * again, the values copied back.  Either way the packs are made again at
 * the next call with a context.  Errors: MISUSE (no training state),
 * INVALID_ARG (count is not the layer's), NOMEM. */
mha_status mha_layer_set_weight_storage(mha_layer *layer, float *storage, int64_t count);

/* The activations one forward call saves for its backward: Q, K, V, the
 * head outputs and per-row softmax statistics, O(N (L + S) E) floats, never
 * the N h L S probabilities.  Buffers grow to the largest call and are
 * kept.  A tape belongs to one layer at a time and is consumed by
 * mha_layer_backward (record again before the next backward). */
mha_status mha_layer_tape_create(mha_layer_tape **tape);
void mha_layer_tape_free(mha_layer_tape *tape);

/* Gradients of the forward call recorded in args->tape, which must be
 * made with the same args (inputs, masks, causal) and this layer:
 *   grad_attn_output  [N, L, E]   dLoss/d attn_output
 *   grad_query        [N, L, E]      or NULL  \  ADDED to (+=), so the
 *   grad_key          [N, S, kdim]   or NULL   } three may be the same
 *   grad_value        [N, S, vdim]   or NULL  /  tensor (self-attention);
 *                                                written instead with
 *                                                args->write_input_grads
 * and every parameter gradient += its share (mha_layer_params).  The
 * probabilities are recomputed from the saved statistics
 * (FlashAttention-2), with O(L + S) memory per thread; the same bits for
 * any thread count.  Errors: MISUSE (no tape, tape not recorded by this
 * layer, no training state), INVALID_ARG (shapes differ from the recorded
 * call), UNSUPPORTED (BF16), NOMEM. */
mha_status mha_layer_backward(mha_ctx *ctx, mha_layer *layer, const mha_layer_fwd_args *args,
                              const mha_tensor *grad_attn_output, mha_tensor *grad_query, mha_tensor *grad_key,
                              mha_tensor *grad_value);

/* The workspace bytes mha_layer_backward() would take.  Errors as its,
 * without NOMEM. */
mha_status mha_layer_backward_workspace_size(const mha_ctx *ctx, const mha_layer *layer, const mha_layer_fwd_args *args,
                                             const mha_tensor *grad_attn_output, const mha_tensor *grad_query,
                                             const mha_tensor *grad_key, const mha_tensor *grad_value, int64_t *bytes);

/* A dense layer on the projections' GEMM, for the parts of a model around
 * attention (an MLP, an unembedding): y [rows, out] = x [rows, in] W^T + b
 * with W [out, in] as nn.Linear stores it and b [out] or NULL.  Matrices
 * are row-major and contiguous; y must not overlap x or W.  W is packed
 * into the context's workspace on each call.  Each output is one chain of
 * multiply-adds over the inputs in order: the same bits for any thread
 * count.  Errors: MISUSE (NULL argument), INVALID_ARG (a size < 1 or too
 * large), NOMEM. */
mha_status mha_linear(mha_ctx *ctx, const float *x, const float *w, const float *b, float *y, int64_t rows, int64_t in,
                      int64_t out);
/* The workspace bytes mha_linear() takes (its packed weight).  Errors:
 * MISUSE, INVALID_ARG as mha_linear's. */
mha_status mha_linear_workspace_size(int64_t rows, int64_t in, int64_t out, int64_t *bytes);

/* Its gradients, given dy [rows, out]:
 *   dx [rows, in]  = dy W        (overwritten; NULL to skip)
 *   dw [out, in]  += dy^T x      (accumulated, like the layer's)
 *   db [out]      += the column sums of dy  (NULL to skip)
 * dx must not overlap the others.  The same bits for any thread count.
 * Errors as mha_linear's. */
mha_status mha_linear_backward(mha_ctx *ctx, const float *dy, const float *x, const float *w, float *dx, float *dw,
                               float *db, int64_t rows, int64_t in, int64_t out);
/* The workspace bytes mha_linear_backward() takes (W^T packed for dx, and
 * dy and x packed a chunk of rows at a time for dw).  Errors as
 * mha_linear_workspace_size's. */
mha_status mha_linear_backward_workspace_size(int64_t rows, int64_t in, int64_t out, int64_t *bytes);

/* ------------------------------------------------------------------ */
/* Decoding with a KV cache                                            */
/* ------------------------------------------------------------------ */

/* The keys (after the rotary embedding) and values of one layer for the
 * tokens seen so far, for `batch` sequences at once: capacity tokens of
 * g kv heads x head_dim, stored as
 *   F32   exactly;
 *   BF16  rounded to bfloat16 (half the memory);
 *   I8    quantised when appended, symmetric per token and kv head: each
 *         row of head_dim keys (or values) is integers in [-127, 127]
 *         times one float scale, max |row| / 127, so each element is off by
 *         at most max |row| / 254 (a row with an infinity or NaN reads as
 *         NaN).  A bit over a quarter of the memory (4 bytes of scale per
 *         head_dim bytes); docs/NUMERICS.md bounds the output's error.
 * The attention always computes in float32, dequantising in registers.
 * Sequences in a batch advance together. */
typedef struct mha_kv_cache mha_kv_cache;

/* Errors: MISUSE, INVALID_ARG (sizes, dtype not F32/BF16/I8), NOMEM. */
mha_status mha_kv_cache_create(const mha_layer *layer, int64_t batch, int64_t capacity, mha_dtype dtype,
                               mha_kv_cache **cache);
void mha_kv_cache_free(mha_kv_cache *cache);
int64_t mha_kv_cache_length(const mha_kv_cache *cache); /* tokens held */
int64_t mha_kv_cache_capacity(const mha_kv_cache *cache);
void mha_kv_cache_reset(mha_kv_cache *cache); /* length 0 */
/* Forget every token from `length` on (length <= current length).
 * INVALID_ARG otherwise. */
mha_status mha_kv_cache_truncate(mha_kv_cache *cache, int64_t length);
/* Appends keys k [batch, g, n, head_dim] and values v [same] (any
 * strides), already projected and rotated.  INVALID_ARG (shapes, or past
 * the capacity: nothing is appended). */
mha_status mha_kv_cache_append(mha_kv_cache *cache, const mha_tensor *k, const mha_tensor *v);
/* Tokens start .. start + n - 1 as float32 (widened or dequantised) into
 * k and v [batch, g, n, head_dim] (any strides; either may be NULL).
 * INVALID_ARG (shapes, tokens the cache does not hold). */
mha_status mha_kv_cache_read(const mha_kv_cache *cache, int64_t start, mha_tensor *k, mha_tensor *v);

/* Scaled dot-product attention of q [batch, Hq, L, head_dim] over every
 * token the cache holds, into out [same shape], with the descriptor's
 * options as mha_attention() takes them (scale, causal -- bottom-right
 * when q holds the last L tokens --, window, softcap, ALiBi, mask over
 * [batch, Hq, L, length], enable_gqa for Hq != g; dtype F32): for models
 * whose projections are not a mha_layer's.  K and V are read in place in
 * the cache's dtype.  The same bits for any thread count.  Errors: MISUSE,
 * INVALID_ARG (shapes, options), NOMEM. */
mha_status mha_kv_cache_attention(mha_ctx *ctx, const mha_kv_cache *cache, mha_tensor *out, const mha_tensor *q,
                                  const mha_attn_desc *desc);
/* The same, writing each row's lse [batch, Hq, L] (contiguous; -inf for a
 * row that sees no key) as mha_attention does: with the descriptor's
 * positions, a cache can hold one block of a longer sequence (a shard,
 * mha_mpi.h) whose partial results merge by lse. */
mha_status mha_kv_cache_attention_lse(mha_ctx *ctx, const mha_kv_cache *cache, mha_tensor *out, float *lse,
                                      const mha_tensor *q, const mha_attn_desc *desc);

/* One decoding step of self-attention: x [batch, n, E] holds the next n
 * tokens (n >= 1; a whole prompt at once is fine), at positions
 * length .. length + n - 1.  Their keys (rotated) and values are appended
 * to the cache, every new row attends to every cached token up to its own
 * position (bottom-right causal, and the layer's window), and out
 * [batch, n, E] gets the layer's output: the same as mha_layer_forward
 * with causal masking over the whole sequence, within the tolerance rule.
 * A single new row is split over the threads by key range, merged by
 * log-sum-exp in a fixed order: the same bits for any thread count.
 * Errors: MISUSE, INVALID_ARG (shapes, cache full, a layer with
 * add_bias_kv/add_zero_attn or a cache made for another configuration),
 * NOMEM; on error the cache is unchanged. */
mha_status mha_layer_decode(mha_ctx *ctx, mha_layer *layer, mha_kv_cache *cache, mha_tensor *out, const mha_tensor *x);

/* The workspace bytes mha_layer_decode() would take for x against the
 * cache as it is now.  Errors as its, without NOMEM. */
mha_status mha_layer_decode_workspace_size(const mha_ctx *ctx, const mha_layer *layer, const mha_kv_cache *cache,
                                           const mha_tensor *out, const mha_tensor *x, int64_t *bytes);

/* The decoding step in its stages, for callers that keep the keys and
 * values elsewhere (a cache split over processes, mha_mpi.h).  Together
 *   mha_layer_decode_qkv          q, k, v of the new rows, rotated
 *   (append k, v to the cache; attend q over it with the step's desc)
 *   mha_layer_decode_output       out from the heads
 * compute what mha_layer_decode computes, bit for bit when the attention
 * is mha_kv_cache_attention over one cache.  The same bits for any
 * thread count.
 *
 * The step's attention: the layer's scale, softcap, window and ALiBi,
 * causal bottom-right, enable_gqa when h != g; dtype F32.  Errors:
 * MISUSE, INVALID_ARG (a layer mha_layer_decode refuses). */
mha_status mha_layer_decode_desc(const mha_layer *layer, mha_attn_desc *desc);

/* q [batch, h, n, head_dim], k and v [batch, g, n, head_dim] (any
 * strides) of the n rows x [batch, n, E], at positions position ..
 * position + n - 1 (the rotary embedding's).  Errors: MISUSE (NULL, a
 * weight never set), INVALID_ARG (shapes, position), NOMEM. */
mha_status mha_layer_decode_qkv(mha_ctx *ctx, const mha_layer *layer, int64_t position, const mha_tensor *x,
                                mha_tensor *q, mha_tensor *k, mha_tensor *v);

/* out [batch, n, E] (columns contiguous) = the heads [batch, h, n,
 * head_dim] (any strides), concatenated, times W_o^T, plus its bias.
 * Errors: as mha_layer_decode_qkv's. */
mha_status mha_layer_decode_output(mha_ctx *ctx, const mha_layer *layer, mha_tensor *out, const mha_tensor *heads);

/* ------------------------------------------------------------------ */
/* Sizing questions (mha info)                                         */
/* ------------------------------------------------------------------ */

typedef struct mha_info {
    int64_t head_dim;           /* E / h */
    int64_t kv_dim;             /* num_kv_heads * head_dim */
    int64_t params;             /* with biases */
    int64_t params_single_head; /* one head of width E */
    double flops_projections;   /* one forward, batch 1, seq N */
    double flops_attention;
    double bytes_weights;                 /* float32 */
    double bytes_activations;             /* float32 inputs, intermediates, output */
    int64_t kv_cache_bytes_per_token;     /* float32, this config */
    int64_t kv_cache_bytes_per_token_mha; /* float32, without GQA */
} mha_info;

/* Fill *info for self-attention with E, h heads, g kv heads (0 = h) at
 * sequence length seq.  Errors: INVALID_ARG with the reason, e.g. when E
 * is not divisible by h or h not by g. */
mha_status mha_info_compute(int64_t embed_dim, int64_t num_heads, int64_t num_kv_heads, int64_t seq, mha_info *info);

#ifdef __cplusplus
}
#endif

#endif /* MHA_H */
