/*
 * layer.h -- the MHA layer's insides, shared by layer.c (weights and the
 * forward pass) and layer_train.c (gradients, parameters, the tape).
 */
#ifndef MHA_LAYER_H
#define MHA_LAYER_H

#include "attn/attention.h"
#include "gemm/gemm.h"
#include "core/internal.h"
#include "core/tensor.h"

enum { LAYER_MAGIC = 0x6d68616c }; /* "mhal": catches use of a freed or foreign pointer */

/* The four matrices: W_q [h d, E], W_k [g d, kdim], W_v [g d, vdim],
 * W_o [E, h d] (nn.MultiheadAttention: h d = g d = E). */
typedef enum matrix { MAT_Q, MAT_K, MAT_V, MAT_OUT, MAT_COUNT } matrix;

/* What training adds to a layer (mha_layer_train_init): the plain weights
 * the optimizer updates (the packs are made from them; the backward's
 * dX = dY W reads them in place) and their gradients. */
typedef struct mha__layer_train {
    float *plain;          /* W_q, W_k, W_v, W_o back to back: in_proj_weight then out_proj.weight */
    bool own_plain;        /* plain is the layer's (else the caller's storage) */
    float *w[MAT_COUNT];   /* into plain */
    float *grads;          /* the same layout, then the bias gradients */
    bool own_grads;        /* grads is the layer's (else the caller's storage) */
    float *g_w[MAT_COUNT]; /* into grads */
    float *g_b_in, *g_b_out, *g_bias_k, *g_bias_v; /* into grads, or NULL */
    int64_t n_grads;                               /* floats in grads */
    bool zero_pending; /* mha_layer_zero_grad_deferred: the next backward writes the gradients, not adds */
} mha__layer_train;

/* Frees a layer's training state (NULL: nothing). */
void mha__layer_train_free(mha__layer_train *t);

/* Matrices are kept packed (gemm.h), float32 or bf16 as the layer
 * computes; a plain copy exists only for training, where the optimizer
 * needs one: for inference it would be 4 E^2 floats nothing reads. */
struct mha_layer {
    uint32_t magic;
    mha_layer_desc desc;
    int64_t head_dim;
    int64_t qdim, kvdim;         /* h x head_dim, g x head_dim */
    const mha__isa_kernels *isa; /* the kernels the packs were made for, chosen once */
    bool bf16;                   /* desc.dtype == MHA_DTYPE_BF16 */
    mha__weight w[MAT_COUNT];    /* packed for the GEMM, in desc.dtype */
    float *b_in;                 /* [qdim | kvdim | kvdim]: Q, K, V biases, or NULL */
    float *b_out;                /* [E] or NULL */
    float *bias_k, *bias_v;      /* [E] or NULL */
    float *alibi;                /* [h] or NULL: the desc's slopes, copied */
    mha_weight_names names;      /* the family the weights were loaded under (TORCH when set by hand) */
    unsigned unset;              /* the required weights never given: bit m for matrix m, then
                                    UNSET_BIAS_K, UNSET_BIAS_V (biases default to 0, as PyTorch
                                    initialises them; matrices and bias_k/bias_v have no default) */
    mha__layer_train *train;     /* NULL until mha_layer_train_init */
};

/* What a forward call records for the backward pass (mha_layer_tape). */
struct mha_layer_tape {
    uint32_t magic;
    const mha_layer *layer;   /* who recorded; NULL = nothing recorded */
    int64_t N, L, S;          /* the recorded call's sizes */
    int64_t position;         /* and its rope position */
    float *q, *k, *v, *heads; /* activations (mha__layer_activations layout), S' key rows */
    mha__row_stats stats;     /* [N, h, L] */
    /* The wide pass's norms the attention took (mha__layer_norms), NULL
     * when not kept (rotary embeddings, bf16): the backward's too. */
    const double *q_norm2, *k_norm2_max;
    float *base;      /* one allocation behind all of the above */
    int64_t capacity; /* floats in base */
};

enum { TAPE_MAGIC = 0x6d686174 }; /* "mhat" */
enum { UNSET_BIAS_K = 1u << MAT_COUNT, UNSET_BIAS_V = 2u << MAT_COUNT };

mha_status mha__layer_check(const mha_layer *l, const char *fn);
/* A description checked and completed as a layer keeps it (kdim, vdim,
 * kv heads, head width, output bias, rope's defaults filled in).
 * INVALID_ARG naming the field. */
mha_status mha__layer_complete_desc(const mha_layer_desc *desc, mha_layer_desc *out);
mha_status mha__layer_check_forward(const mha_layer *l, const mha_tensor *attn_output, const mha_tensor *attn_weights,
                                    const mha_layer_fwd_args *a);

/* The attention problem of a forward call with these args (its problem
 * fields: mha__attn_plan_resolve completes it). */
mha__attn_plan mha__layer_plan(const mha_layer *l, const mha_layer_fwd_args *a);

/* ---- Weight names (names.c) ---- */

/* The parts of a layer a named tensor can set. */
typedef enum mha__part {
    MHA__PART_QKV, /* W_q, W_k, W_v stacked by rows */
    MHA__PART_Q,
    MHA__PART_K,
    MHA__PART_V,
    MHA__PART_OUT,
    MHA__PART_QKV_BIAS,
    MHA__PART_Q_BIAS,
    MHA__PART_K_BIAS,
    MHA__PART_V_BIAS,
    MHA__PART_OUT_BIAS,
    MHA__PART_BIAS_K,
    MHA__PART_BIAS_V,
    MHA__PART_COUNT
} mha__part;

enum { MHA__FAMILIES = MHA_NAMES_BERT + 1 };

/* One tensor of a family as this layer has it: its shape as stored
 * (Conv1D: the transpose of the layer's [out, in]). */
typedef struct mha__named {
    const char *name;
    mha__part part;
    bool conv1d;
    int64_t numel;
    int rank;
    int64_t shape[3];
} mha__named;

/* The family a layer's tensors are named in: the one it was loaded under,
 * except that a layer made by hand (TORCH) whose shape nn.MultiheadAttention
 * cannot have (GQA, head_dim x heads != E) is named Llama-style. */
mha_weight_names mha__layer_family(const mha_layer *l);
/* MISUSE naming the first required weight never set (in the layer's
 * family), for a compute call `fn`; MHA_OK when all were. */
mha_status mha__layer_check_weights(const mha_layer *l, const char *fn);
/* The part a name sets in any family, and whether it is stored as a
 * Conv1D transpose; false for a name no family has. */
bool mha__part_of_name(const char *name, mha__part *part, bool *conv1d);
/* The family's name of a part, or NULL if the family has none. */
const char *mha__name_of(mha_weight_names family, mha__part part);
/* Does the layer have `part` under `family`?  Then *t describes it. */
bool mha__named_tensor(const mha_layer *l, mha_weight_names family, mha__part part, mha__named *t);
/* The family's tensors this layer has, in PyTorch's parameters() order
 * (at most MHA__PART_COUNT); returns how many. */
int mha__named_list(const mha_layer *l, mha_weight_names family, mha__named *list);
/* The tensor called `name` in any family, if this layer has it. */
bool mha__named_find(const mha_layer *l, const char *name, mha__named *t);
/* Where a training layer keeps a (non-Conv1D) tensor's values and
 * gradients, in the tensor's layout: Q, K, V stacked are contiguous. */
void mha__named_storage(const mha_layer *l, const mha__named *t, float **value, float **grad);

/* ---- The pipeline's stages (pipeline.c) ---- */

/* The rows a call projects: N batches of Lq query rows and Lk key/value
 * rows, the K and V buffers holding Tk >= Lk rows per batch (appended
 * keys follow, written before the projections). */
typedef struct mha__layer_rows {
    int64_t N, Lq, Lk, Tk;
    /* Whether the attention's plan feeds a backward: with Lq and Tk, what
     * its wide rows' bound depends on (attn/attention.h: few rows). */
    bool feeds_backward;
} mha__layer_rows;

/* The norms the wide pass found, kept for the attention so it need not
 * read Q and K again for its own decision (mha__wide_rows): each query
 * row's squared norm, q [N][H][Lq], and each batch and kv head's largest
 * squared key norm over its Tk keys, k_max [N][G], of Q and K as they
 * leave the pass.  Valid for the attention only while Q and K stay as
 * they are: not across a rotation. */
typedef struct mha__layer_norms {
    double *q, *k_max;
} mha__layer_norms;

/* Q, K, V = x W^T + b into the activation buffers q, k, v; the wide
 * rows' Q (logits that may be large) and their keys' K summed exactly
 * (pipeline.c); their norms left in `keep` unless it is NULL.  INTERNAL
 * (the plan reserved mha__layer_project_workspace). */
mha_status mha__layer_project_qkv(mha_ctx *ctx, const mha_layer *l, const mha__layer_rows *r, const mha__batched *x_q,
                                  const mha__batched *x_k, const mha__batched *x_v, float *q, float *k, float *v,
                                  mha__layer_norms *keep);
/* After the float32 Q and K (activation buffers qb, kb), the rows the
 * attention will refine whole (wide) and their keys summed exactly again
 * (wide.c), the norms it found left in `keep` unless it is NULL; nothing
 * for bf16 layers.  INTERNAL (the plan reserved
 * mha__layer_project_wide_workspace). */
mha_status mha__layer_project_wide(mha_ctx *ctx, const mha_layer *l, const mha__layer_rows *r, const mha__batched *x_q,
                                   const mha__batched *x_k, const mha__batched *qb, const mha__batched *kb,
                                   mha__layer_norms *keep);
bool mha__layer_project_wide_workspace(const mha_ctx *ctx, const mha_layer *l, int64_t N, int64_t Lq, int64_t Lk,
                                       int64_t *bytes);
/* The workspace of the four projections of N Lq query rows and N Lk
 * key rows: the largest of their products', or of the wide rows' pass
 * after them. */
bool mha__layer_project_workspace(const mha_ctx *ctx, const mha_layer *l, int64_t N, int64_t Lq, int64_t Lk,
                                  int64_t *bytes);
/* Q [N, h, Lq, d] and K [N, g, Tk, d] rotated at `position` (by minus the
 * angle when `inverse`); nothing without rope.  And its workspace. */
mha_status mha__layer_rotate(mha_ctx *ctx, const mha_layer *l, const mha_tensor *q, const mha_tensor *k,
                             int64_t position, bool inverse);
bool mha__layer_rotate_workspace(const mha_layer *l, int64_t Lq, int64_t Tk, int64_t *bytes);
/* y [N, L, E] = heads W_o^T + b_o through y's strides; with strided
 * columns through `staging` (N L E floats). */
mha_status mha__layer_project_output(mha_ctx *ctx, const mha_layer *l, int64_t N, int64_t L, float *heads,
                                     mha_tensor *y, float *staging);

/* A [N, T, F] tensor view as a batch of [T, F] matrices. */
mha__batched mha__layer_from_view(const mha_tensor *t);
/* Where the layer keeps activations of N batches of T rows from base:
 * head-major [H][N][T][d] when d is a multiple of the kernels' nr, else
 * row-major [N][T][E]; and the same as the [N, H, T, d] attention view
 * (layer.c: every stage's, wide.c's too). */
mha__batched mha__layer_activations(const mha_layer *l, float *base, int64_t N, int64_t T, int64_t heads);
mha_tensor mha__layer_heads_view(const mha_layer *l, float *base, int64_t N, int64_t T, int64_t heads);

/* Rotates x [N, heads, T, d] in place by the layer's rotary embedding, row
 * t of every batch at position `position + t` (by minus the angle when
 * `inverse`: the backward pass).  Nothing without rope.  INVALID_ARG
 * (position out of range), NOMEM. */
mha_status mha__rope_apply(mha_ctx *ctx, const mha_layer *l, const mha_tensor *x, int64_t position, bool inverse);
/* Its workspace for T rows (none without rope); false, INVALID_ARG, when
 * that overflows. */
bool mha__rope_workspace(const mha_layer *l, int64_t T, int64_t *bytes);

/* y = x W^T + b for matrix `which` over N batches of T rows, in the
 * layer's dtype (bf16: the plan reserved mha__linear_bf16_workspace).
 * INTERNAL when it did not. */
mha_status mha__layer_project(mha_ctx *ctx, const mha_layer *l, int64_t N, int64_t T, const mha__batched *x,
                              matrix which, const float *b, const mha__batched *y);

/* y = x W^T, or y += x W^T when `add`, over N batches of T rows, with W
 * packed as w (float32 layers), or split as `split` when not NULL: the
 * split products then, and for rows that are not finite w, or when w is
 * NULL, the panels `on_demand` packs when first needed.  INTERNAL when
 * the workspace was not planned. */
mha_status mha__layer_project_packed(mha_ctx *ctx, const mha_layer *l, int64_t N, int64_t T, const mha__batched *x,
                                     const mha__packed *w, const mha__packed_split *split,
                                     mha__fma_on_demand *on_demand, const mha__batched *y, bool add);

/* Packs `which` from w (NULL: zeros); for training keeps w as the plain
 * copy and leaves the packs behind it until mha__layer_refresh.  NOMEM. */
mha_status mha__layer_pack(mha_layer *l, matrix which, const float *w);
/* Brings packs left behind the plain copy up to date on ctx's threads:
 * every call that computes with the layer's matrices makes it first.
 * The layer may be passed const: the packs are a cache of the plain
 * copy, and bringing them up to date changes no value a caller can
 * observe (and a layer is used by one thread at a time, mha.h).  NOMEM. */
mha_status mha__layer_refresh(mha_ctx *ctx, const mha_layer *l);

/* Matrix `which` is [out, in]: Q [qdim, E], K [kvdim, kdim], V [kvdim, vdim],
 * O [E, qdim]; its bias starts at b_in + bias_offset (Q, K, V). */
int64_t mha__layer_in_features(const mha_layer *l, matrix which);
int64_t mha__layer_out_features(const mha_layer *l, matrix which);
int64_t mha__layer_bias_offset(const mha_layer *l, matrix which);
/* The attention's score scale, 1 / sqrt(head_dim), as a float. */
float mha__layer_scale(const mha_layer *l);
/* Matrix which's bias (Q, K, V: a slice of b_in), or NULL. */
const float *mha__layer_in_bias(const mha_layer *l, matrix which);

/* The naming family a loaded layer remembers (weights.c sets it). */
void mha__layer_set_names(mha_layer *layer, mha_weight_names names);

#endif /* MHA_LAYER_H */
