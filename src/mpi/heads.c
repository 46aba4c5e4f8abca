/*
 * heads.c -- the head-parallel layer (mha_mpi.h): each rank a layer of
 * its own heads, one ordered sum across the ranks for the output.
 *
 *   rank r:  y_r = concat(heads of r) W_O[:, columns of r] (+ b_O on rank 0)
 *   all:     y   = y_0 + y_1 + ... + y_(P-1)            (mha__mpi_sum)
 *
 * A weight given whole is cut by a table: which of its rows or columns
 * belong to the query heads, which to the kv heads (three parts for the
 * stacked Q|K|V tensors), or whether it is the output bias, which rank 0
 * alone keeps.  Gathering a weight or gradient runs the same cut backwards.
 */
#include <stdbool.h>
#include <string.h>

#include "core/internal.h"
#include "core/parallel.h"
#include "core/tensor.h"
#include "layer/layer.h"
#include "mha_mpi.h"
#include "mpi/collective.h"
#include "mpi/sequence.h"

struct mha_mpi_layer {
    MPI_Comm comm;
    int rank, size;
    int64_t E, head_dim, heads, kv_heads; /* the whole layer's */
    int64_t first_head, num_heads, first_kv, num_kv;
    bool out_bias; /* the whole layer has one (rank 0's local layer holds it) */
    mha_layer *local;
};

/* ------------------------------------------------------------------ */
/* Which heads a rank holds                                            */
/* ------------------------------------------------------------------ */

/* The whole layer's head sizes, or an error naming the field. */
static mha_status whole_layer(const mha_layer_desc *d, int size, int64_t *head_dim, int64_t *kv_heads)
{
    if (d->num_heads < 1 || d->embed_dim < 1 || d->head_dim < 0 || d->num_kv_heads < 0)
        return mha__fail(MHA_ERR_INVALID_ARG, "embed_dim and num_heads must be positive, head_dim and "
                                              "num_kv_heads >= 0");
    if (!d->head_dim && d->embed_dim % d->num_heads)
        return mha__fail(MHA_ERR_INVALID_ARG, "embed_dim %lld is not divisible by num_heads %lld",
                         (long long)d->embed_dim, (long long)d->num_heads);
    *head_dim = d->head_dim ? d->head_dim : d->embed_dim / d->num_heads;
    *kv_heads = d->num_kv_heads ? d->num_kv_heads : d->num_heads;
    if (d->num_heads % *kv_heads)
        return mha__fail(MHA_ERR_INVALID_ARG, "num_heads %lld is not a multiple of num_kv_heads %lld",
                         (long long)d->num_heads, (long long)*kv_heads);
    if (*kv_heads < size)
        return mha__fail(MHA_ERR_INVALID_ARG,
                         "%lld kv heads cannot be split over %d ranks: each rank needs at least one whole kv head "
                         "(sequence parallelism splits such layers instead)",
                         (long long)*kv_heads, size);
    return MHA_OK;
}

mha_status mha_mpi_layer_create(MPI_Comm comm, const mha_layer_desc *desc, mha_mpi_layer **out_layer)
{
    if (!desc || !out_layer) return mha__fail(MHA_ERR_MISUSE, "mha_mpi_layer_create: NULL argument");
    *out_layer = NULL;
    mha_mpi_layer *L = mha__calloc(1, sizeof *L);
    mha__mpi_field f[24];
    mha_status same = mha__mpi_same(comm, L ? MHA_OK : MHA_ERR_NOMEM, f, L ? mha__mpi_describe_layer(desc, f) : 0),
               st = same;
    if (st == MHA_OK) {
        L->comm = MPI_COMM_NULL;
        MPI_Comm_rank(comm, &L->rank);
        MPI_Comm_size(comm, &L->size);
        st = whole_layer(desc, L->size, &L->head_dim, &L->kv_heads);
    }
    mha_layer_desc mine;
    if (st == MHA_OK) {
        L->E = desc->embed_dim;
        L->heads = desc->num_heads;
        L->out_bias = desc->out_bias < 0 ? desc->bias != 0 : desc->out_bias != 0;
        mha__mpi_heads_of(L->heads, L->kv_heads, L->size, L->rank, &L->first_head, &L->num_heads, &L->first_kv,
                          &L->num_kv);
        mine = *desc;
        mine.num_heads = L->num_heads;
        mine.num_kv_heads = L->num_kv;
        mine.head_dim = L->head_dim;
        mine.out_bias = L->rank == 0 && L->out_bias;
        mine.alibi_slopes = desc->alibi_slopes ? desc->alibi_slopes + L->first_head : NULL;
        st = mha_layer_create(&mine, &L->local);
    }
    if (same == MHA_OK) st = mha__mpi_agree(comm, st); /* a failure before it is agreed already */
    if (st == MHA_OK) MPI_Comm_dup(comm, &L->comm);
    if (st != MHA_OK) {
        if (L) mha_layer_free(L->local);
        mha__free(L);
        return st;
    }
    *out_layer = L;
    return MHA_OK;
}

void mha_mpi_layer_free(mha_mpi_layer *L)
{
    if (!L) return;
    mha_layer_free(L->local);
    if (L->comm != MPI_COMM_NULL) MPI_Comm_free(&L->comm);
    mha__free(L);
}

void mha_mpi_layer_heads(const mha_mpi_layer *L, int64_t *first_head, int64_t *num_heads, int64_t *first_kv_head,
                         int64_t *num_kv_heads)
{
    if (first_head) *first_head = L ? L->first_head : 0;
    if (num_heads) *num_heads = L ? L->num_heads : 0;
    if (first_kv_head) *first_kv_head = L ? L->first_kv : 0;
    if (num_kv_heads) *num_kv_heads = L ? L->num_kv : 0;
}

mha_layer *mha_mpi_layer_local(mha_mpi_layer *L) { return L ? L->local : NULL; }

/* ------------------------------------------------------------------ */
/* Cutting whole weights into shards                                   */
/* ------------------------------------------------------------------ */

typedef enum cut_kind {
    CUT_QKV_ROWS, /* Q|K|V stacked along rows: in_proj_weight, in_proj_bias */
    CUT_QKV_COLS, /* ... along columns: GPT-2's c_attn */
    CUT_Q_ROWS,
    CUT_KV_ROWS,
    CUT_Q_COLS, /* the output projection's inputs */
    CUT_KV_COLS,
    CUT_RANK0 /* the output bias: rank 0's whole */
} cut_kind;

/* How a part of the layer (names.c's table says which part a name sets)
 * divides among ranks: a Conv1D tensor is stored transposed, so its rows
 * are the layer's columns. */
static int cut_of(const char *name)
{
    mha__part part;
    bool conv1d;
    if (!mha__part_of_name(name, &part, &conv1d)) return -1;
    switch (part) {
    case MHA__PART_QKV: return conv1d ? CUT_QKV_COLS : CUT_QKV_ROWS;
    case MHA__PART_QKV_BIAS: return CUT_QKV_ROWS; /* one row or one column: the same pieces */
    case MHA__PART_Q:
    case MHA__PART_Q_BIAS: return CUT_Q_ROWS;
    case MHA__PART_K:
    case MHA__PART_V:
    case MHA__PART_K_BIAS:
    case MHA__PART_V_BIAS: return CUT_KV_ROWS;
    case MHA__PART_OUT: return conv1d ? CUT_Q_ROWS : CUT_Q_COLS;
    case MHA__PART_OUT_BIAS: return CUT_RANK0;
    default: return CUT_KV_COLS; /* bias_k, bias_v: [1, 1, kvd] */
    }
}

/* A weight seen as a row-major [rows, cols] matrix, and the parts of it
 * (row ranges or column ranges) one rank holds, in the order its own
 * layer stacks them. */
typedef struct cut {
    int64_t rows, cols;
    bool by_cols, rank0;
    int parts;
    int64_t start[3], len[3];
} cut;

/* The cut of `name` (numel floats whole) for rank r; NOT_FOUND for a name
 * no layer has, INVALID_ARG when numel does not fit the layer. */
static mha_status cut_for(const mha_mpi_layer *L, const char *name, int64_t numel, int r, cut *c)
{
    int kind = cut_of(name);
    if (kind < 0) return mha__fail(MHA_ERR_NOT_FOUND, "\"%s\" is not a weight of a multi-head attention layer", name);
    int64_t d = L->head_dim, qd = L->heads * d, kvd = L->kv_heads * d, h0, hn, g0, gn;
    mha__mpi_heads_of(L->heads, L->kv_heads, L->size, r, &h0, &hn, &g0, &gn);
    memset(c, 0, sizeof *c);
    c->by_cols = kind == CUT_QKV_COLS || kind == CUT_Q_COLS || kind == CUT_KV_COLS;
    c->rank0 = kind == CUT_RANK0;
    int64_t along = kind == CUT_QKV_ROWS || kind == CUT_QKV_COLS ? qd + 2 * kvd
                    : kind == CUT_Q_ROWS || kind == CUT_Q_COLS   ? qd
                    : kind == CUT_KV_ROWS || kind == CUT_KV_COLS ? kvd
                                                                 : numel;
    if (numel < 1 || numel % along)
        return mha__fail(MHA_ERR_INVALID_ARG, "%s: %lld values is not a multiple of %lld", name, (long long)numel,
                         (long long)along);
    c->rows = c->by_cols ? numel / along : along;
    c->cols = c->by_cols ? along : numel / along;
    bool q = kind == CUT_Q_ROWS || kind == CUT_Q_COLS, kv = kind == CUT_KV_ROWS || kind == CUT_KV_COLS;
    if (kind == CUT_RANK0) { /* whole on rank 0, nothing elsewhere */
        c->parts = r == 0;
        c->len[0] = along;
    } else if (q || kv) {
        c->parts = 1;
        c->start[0] = (q ? h0 : g0) * d;
        c->len[0] = (q ? hn : gn) * d;
    } else { /* Q, K and V parts of one stacked tensor */
        c->parts = 3;
        c->start[0] = h0 * d, c->len[0] = hn * d;
        c->start[1] = qd + g0 * d, c->len[1] = gn * d;
        c->start[2] = qd + kvd + g0 * d, c->len[2] = gn * d;
    }
    return MHA_OK;
}

/* Floats in a rank's shard. */
static int64_t shard_size(const cut *c)
{
    int64_t n = 0;
    for (int p = 0; p < c->parts; p++) n += c->len[p];
    return n * (c->by_cols ? c->rows : c->cols);
}

/* Copies between the whole tensor and one rank's shard: to_shard 1 takes
 * the shard out of `whole`, 0 puts it back. */
static void move_shard(const cut *c, float *whole, float *shard, bool to_shard)
{
    float *s = shard;
    if (!c->by_cols) {
        for (int p = 0; p < c->parts; p++) {
            float *w = whole + c->start[p] * c->cols;
            size_t bytes = (size_t)(c->len[p] * c->cols) * sizeof(float);
            if (to_shard) memcpy(s, w, bytes);
            else memcpy(w, s, bytes);
            s += c->len[p] * c->cols;
        }
        return;
    }
    for (int64_t row = 0; row < c->rows; row++) /* the shard is [rows, its columns] */
        for (int p = 0; p < c->parts; p++) {
            float *w = whole + row * c->cols + c->start[p];
            if (to_shard) memcpy(s, w, (size_t)c->len[p] * sizeof(float));
            else memcpy(w, s, (size_t)c->len[p] * sizeof(float));
            s += c->len[p];
        }
}

/* Where a weight comes from: the whole tensor in memory, or a tensor of
 * a file of which only this rank's shard is read. */
typedef struct weight_source {
    const float *whole;
    mha_st_file *file;
    const char *tensor;
} weight_source;

/* This rank's shard of the weight, from its source. */
static mha_status take_shard(const cut *c, const weight_source *src, float *shard)
{
    if (src->whole) {
        move_shard(c, (float *)src->whole, shard, true); /* reads the whole only */
        return MHA_OK;
    }
    mha_status st = MHA_OK;
    float *s = shard;
    for (int64_t row = 0; row < (c->by_cols ? c->rows : 1); row++) /* rows cut: each part one range */
        for (int p = 0; p < c->parts && st == MHA_OK; p++) {
            int64_t first = c->by_cols ? row * c->cols + c->start[p] : c->start[p] * c->cols;
            int64_t count = c->by_cols ? c->len[p] : c->len[p] * c->cols;
            st = mha_st_read_f32_range(src->file, src->tensor, first, count, s);
            s += count;
        }
    return st;
}

/* Sets weight `name` (numel floats whole) from its source, every rank its
 * shard; no rank changes its layer unless every rank can. */
static mha_status set_shard(mha_mpi_layer *L, const char *name, int64_t numel, const weight_source *src)
{
    cut c;
    float *shard = NULL;
    mha_status st = cut_for(L, name, numel, L->rank, &c);
    if (st == MHA_OK && c.rank0 && !L->out_bias)
        st = mha__fail(MHA_ERR_NOT_FOUND, "\"%s\": this layer has no output bias", name);
    if (st == MHA_OK && c.parts) {
        shard = mha__alloc(shard_size(&c), sizeof(float));
        st = shard ? take_shard(&c, src, shard) : MHA_ERR_NOMEM;
    }
    if ((st = mha__mpi_agree(L->comm, st)) == MHA_OK && c.parts)
        st = mha_layer_set_weight(L->local, name, shard, shard_size(&c));
    mha__free(shard);
    return mha__mpi_agree(L->comm, st);
}

mha_status mha_mpi_layer_set_weight(mha_mpi_layer *L, const char *name, const float *data, int64_t numel)
{
    if (!L) return mha__fail(MHA_ERR_MISUSE, "mha_mpi_layer_set_weight: NULL layer");
    if (!name || !data) /* still collective: every rank learns of it */
        return mha__mpi_agree(L->comm, mha__fail(MHA_ERR_MISUSE, "mha_mpi_layer_set_weight: NULL argument"));
    weight_source src = {data, NULL, NULL};
    return set_shard(L, name, numel, &src);
}

mha_status mha_mpi_layer_read_weight(mha_mpi_layer *L, mha_st_file *file, const char *tensor, const char *name)
{
    if (!L) return mha__fail(MHA_ERR_MISUSE, "mha_mpi_layer_read_weight: NULL layer");
    mha_st_info info;
    mha_status st = !file || !tensor || !name ? mha__fail(MHA_ERR_MISUSE, "mha_mpi_layer_read_weight: NULL argument")
                                              : mha_st_find(file, tensor, &info);
    if (st != MHA_OK) return mha__mpi_agree(L->comm, st);
    weight_source src = {NULL, file, tensor};
    return set_shard(L, name, info.numel, &src);
}

mha_status mha_mpi_layer_load(MPI_Comm comm, mha_st_file *file, const mha_layer_load_plan *plan,
                              mha_mpi_layer **out_layer)
{
    if (!plan || !out_layer) return mha__fail(MHA_ERR_MISUSE, "mha_mpi_layer_load: NULL argument");
    mha_status st = mha_mpi_layer_create(comm, &plan->desc, out_layer);
    for (int i = 0; st == MHA_OK && i < plan->n_weights; i++) /* the same tensors everywhere: the desc agreed */
        st = mha_mpi_layer_read_weight(*out_layer, file, plan->weights[i].name, plan->weight_names[i]);
    if (st != MHA_OK) {
        mha_mpi_layer_free(*out_layer);
        *out_layer = NULL;
    }
    return st;
}

/* Gathers the whole tensor from every rank's shard, read by `get` (the
 * weight or its gradient). */
static mha_status gather_whole(const mha_mpi_layer *L, const char *name, float *dst, int64_t numel,
                               mha_status (*get)(const mha_layer *, const char *, float *, int64_t))
{
    if (!L) return mha__fail(MHA_ERR_MISUSE, "NULL layer");
    cut c;
    int64_t count[L->size], offset[L->size], total = 0;
    float *all = NULL;
    mha_status st = !name || !dst ? mha__fail(MHA_ERR_MISUSE, "NULL argument") : cut_for(L, name, numel, 0, &c);
    if (st == MHA_OK && c.rank0 && !L->out_bias)
        st = mha__fail(MHA_ERR_NOT_FOUND, "\"%s\": this layer has no output bias", name);
    for (int r = 0; st == MHA_OK && r < L->size; r++) {
        (void)cut_for(L, name, numel, r, &c); /* checked for rank 0 above: the same numel */
        count[r] = shard_size(&c);
        offset[r] = total;
        total += count[r];
    }
    if (st == MHA_OK) {
        all = mha__alloc(total, sizeof(float));
        st = all ? MHA_OK : MHA_ERR_NOMEM;
    }
    if (st == MHA_OK && count[L->rank]) st = get(L->local, name, all + offset[L->rank], count[L->rank]);
    st = mha__mpi_agree(L->comm, st);
    if (st == MHA_OK) {
        mha__mpi_gather(L->comm, all + offset[L->rank], all, count, offset);
        for (int r = 0; r < L->size; r++) {
            (void)cut_for(L, name, numel, r, &c);
            move_shard(&c, dst, all + offset[r], false);
        }
    }
    mha__free(all);
    return st;
}

mha_status mha_mpi_layer_get_weight(const mha_mpi_layer *L, const char *name, float *dst, int64_t numel)
{
    return gather_whole(L, name, dst, numel, mha_layer_get_weight);
}

mha_status mha_mpi_layer_get_grad(const mha_mpi_layer *L, const char *name, float *dst, int64_t numel)
{
    return gather_whole(L, name, dst, numel, mha_layer_get_grad);
}

/* ------------------------------------------------------------------ */
/* Forward and backward                                                */
/* ------------------------------------------------------------------ */

/* The caller's output tensors, before anything is written through
 * their strides: attn_output [N, L, E], attn_weights [N, 1 or h, L, S'];
 * every other shape the rank's own layer checks. */
static mha_status check_outputs(const mha_mpi_layer *L, const mha_layer_fwd_args *a, const mha_tensor *out,
                                const mha_tensor *w)
{
    const mha_layer_desc *d = mha_layer_get_desc(L->local);
    const int64_t out_shape[4] = {a->query.shape[0], a->query.shape[1], L->E, 1};
    mha_status st = mha__check_tensor(out, "attn_output", out_shape);
    if (st != MHA_OK || !w) return st;
    int64_t keys = a->key.shape[1] + !!d->add_bias_kv + !!d->add_zero_attn;
    const int64_t w_shape[4] = {a->query.shape[0], w->shape[1] == 1 ? 1 : L->heads, a->query.shape[1], keys};
    return mha__check_tensor(w, "attn_weights", w_shape);
}

/* A mask over the whole layer's heads, moved to this rank's first head. */
static mha_mask heads_mask(const mha_mask *m, int64_t first_head)
{
    mha_mask mine = *m;
    size_t elem = m->kind == MHA_MASK_KEEP ? sizeof(uint8_t) : sizeof(float);
    if (m->kind != MHA_MASK_NONE && m->data)
        mine.data = (const char *)m->data + (size_t)(first_head * m->stride[1]) * elem;
    return mine;
}

static mha_layer_fwd_args local_args(const mha_mpi_layer *L, const mha_layer_fwd_args *a)
{
    mha_layer_fwd_args mine = *a;
    mine.attn_mask = heads_mask(&a->attn_mask, L->first_head);
    mine.key_padding_mask = heads_mask(&a->key_padding_mask, L->first_head);
    return mine;
}

/* Which dimensions a mask broadcasts (stride 0), as bits. */
static int64_t broadcast_bits(const mha_mask *m)
{
    int64_t bits = 0;
    for (int i = 0; i < 4; i++) bits |= (int64_t)(m->stride[i] == 0) << i;
    return bits;
}

#define SHAPE3(label, t) \
    {label ".shape[0]", (t).shape[0]}, {label ".shape[1]", (t).shape[1]}, { label ".shape[2]", (t).shape[2] }

/* The fields of a forward call every rank must agree on; returns how many. */
static int describe_forward(const mha_layer_fwd_args *a, const mha_tensor *out, const mha_tensor *w, mha__mpi_field *f)
{
    const mha__mpi_field fields[] = {
        SHAPE3("query", a->query),
        SHAPE3("key", a->key),
        SHAPE3("value", a->value),
        SHAPE3("attn_output", *out),
        {"attn_mask kind", a->attn_mask.kind},
        {"attn_mask broadcast dimensions", broadcast_bits(&a->attn_mask)},
        {"key_padding_mask kind", a->key_padding_mask.kind},
        {"key_padding_mask broadcast dimensions", broadcast_bits(&a->key_padding_mask)},
        {"causal", a->causal},
        {"average_attn_weights", a->average_attn_weights},
        {"position", a->position},
        {"tape given", a->tape != NULL},
        {"attn_weights given", w != NULL},
        {"attn_weights.shape[1]", w ? w->shape[1] : 0},
        {"attn_weights.shape[3]", w ? w->shape[3] : 0},
    };
    int n = (int)(sizeof fields / sizeof fields[0]);
    memcpy(f, fields, sizeof fields);
    return n;
}

/* This rank's attention weights into the whole [N, h, L, S'] or averaged
 * [N, 1, L, S'] tensor, from mine ([N, own heads or 1, L, S']). */
static mha_status share_weights(mha_ctx *ctx, const mha_mpi_layer *L, float *mine, const mha_tensor *w)
{
    int64_t N = w->shape[0], rows = w->shape[2] * w->shape[3];
    if (w->shape[1] == 1 && L->heads > 1) { /* averaged: mean of own heads x own/all, summed */
        int64_t n = N * rows;
        for (int64_t i = 0; i < n; i++) mine[i] *= (float)L->num_heads / (float)L->heads;
        mha_status st = mha__mpi_sum(ctx, L->comm, mine, n);
        if (st == MHA_OK) mha__mpi_copy_piece(w, mine, false);
        return st;
    }
    int64_t count[L->size], offset[L->size], total = 0;
    for (int r = 0; r < L->size; r++) {
        int64_t h0, hn, g0, gn;
        mha__mpi_heads_of(L->heads, L->kv_heads, L->size, r, &h0, &hn, &g0, &gn);
        count[r] = N * hn * rows;
        offset[r] = total;
        total += count[r];
    }
    float *all = mha__alloc(total, sizeof(float));
    mha_status st = mha__mpi_agree(L->comm, all ? MHA_OK : MHA_ERR_NOMEM);
    if (st == MHA_OK) {
        mha__mpi_gather(L->comm, mine, all, count, offset);
        for (int r = 0; r < L->size; r++) { /* rank r's block is [N, its heads, L, S'] */
            int64_t h0, hn, g0, gn;
            mha__mpi_heads_of(L->heads, L->kv_heads, L->size, r, &h0, &hn, &g0, &gn);
            mha_tensor part = mha__mpi_piece(w, h0, hn, 0, w->shape[2]);
            mha__mpi_copy_piece(&part, all + offset[r], false);
        }
    }
    mha__free(all);
    return st;
}

mha_status mha_mpi_layer_forward(mha_ctx *ctx, mha_mpi_layer *L, mha_tensor *attn_output, mha_tensor *attn_weights,
                                 const mha_layer_fwd_args *args)
{
    if (!L) return mha__fail(MHA_ERR_MISUSE, "mha_mpi_layer_forward: NULL layer");
    mha__mpi_field fields[32];
    mha_status st = MHA_OK;
    int n = 0;
    if (!ctx || !attn_output || !args) st = mha__fail(MHA_ERR_MISUSE, "mha_mpi_layer_forward: NULL argument");
    else if ((st = check_outputs(L, args, attn_output, attn_weights)) == MHA_OK)
        n = describe_forward(args, attn_output, attn_weights, fields);
    if ((st = mha__mpi_same(L->comm, st, fields, n)) != MHA_OK) return st;

    /* This rank's output and weights, contiguous, before the sums. */
    int64_t n_out = mha__mpi_numel(attn_output), n_w = 0;
    mha_tensor w_mine = {0};
    if (attn_weights) {
        w_mine = mha_tensor_4d(NULL, attn_weights->shape[0], attn_weights->shape[1] == 1 ? 1 : L->num_heads,
                               attn_weights->shape[2], attn_weights->shape[3]);
        n_w = mha__mpi_numel(&w_mine);
    }
    float *y = mha__kept(ctx, 0, (n_out + n_w) * (int64_t)sizeof(float));
    st = y ? MHA_OK : MHA_ERR_NOMEM;
    mha_tensor y_mine = *attn_output;
    if (st == MHA_OK) {
        y_mine = mha_tensor_3d(y, attn_output->shape[0], attn_output->shape[1], attn_output->shape[2]);
        w_mine.data = y + n_out;
        mha_layer_fwd_args mine = local_args(L, args);
        st = mha_layer_forward(ctx, L->local, &y_mine, attn_weights ? &w_mine : NULL, &mine);
    }
    st = mha__mpi_agree(L->comm, st);
    if (st == MHA_OK) st = mha__mpi_sum(ctx, L->comm, y, n_out);
    if (st == MHA_OK && attn_weights) st = share_weights(ctx, L, w_mine.data, attn_weights);
    if (st == MHA_OK) mha__mpi_copy_piece(attn_output, y, false); /* written only once all went well */
    return st;
}

mha_status mha_mpi_layer_backward(mha_ctx *ctx, mha_mpi_layer *L, const mha_layer_fwd_args *args,
                                  const mha_tensor *grad_attn_output, mha_tensor *grad_query, mha_tensor *grad_key,
                                  mha_tensor *grad_value)
{
    if (!L) return mha__fail(MHA_ERR_MISUSE, "mha_mpi_layer_backward: NULL layer");
    mha__mpi_field fields[40];
    mha_status st = MHA_OK;
    int n = 0;
    mha_tensor *user[3] = {grad_query, grad_key, grad_value};
    int alias[3] = {0, 1, 2}; /* the first of the three that is the same tensor (self-attention passes one) */
    for (int i = 1; i < 3; i++)
        for (int j = 0; j < i; j++)
            if (alias[i] == i && mha__same_tensor(user[i], user[j])) alias[i] = j;
    const mha_tensor *inputs[3] = {args ? &args->query : NULL, args ? &args->key : NULL, args ? &args->value : NULL};
    const char *const grad_names[3] = {"grad_query", "grad_key", "grad_value"};
    if (!ctx || !args || !grad_attn_output) st = mha__fail(MHA_ERR_MISUSE, "mha_mpi_layer_backward: NULL argument");
    for (int i = 0; i < 3 && st == MHA_OK; i++) /* each like its input, before it is added to */
        if (user[i]) st = mha__check_tensor(user[i], grad_names[i], inputs[i]->shape);
    if (st == MHA_OK) {
        n = describe_forward(args, grad_attn_output, NULL, fields);
        for (int i = 0; i < 3; i++) {
            const char *const names[3][2] = {{"grad_query given", "grad_query shared with"},
                                             {"grad_key given", "grad_key shared with"},
                                             {"grad_value given", "grad_value shared with"}};
            fields[n++] = (mha__mpi_field){names[i][0], user[i] != NULL};
            fields[n++] = (mha__mpi_field){names[i][1], alias[i]};
        }
    }
    if ((st = mha__mpi_same(L->comm, st, fields, n)) != MHA_OK) return st;

    /* This rank's share of each distinct input gradient, from zero. */
    int64_t at[3] = {0, 0, 0}, total = 0;
    for (int i = 0; i < 3; i++)
        if (user[i] && alias[i] == i) at[i] = total, total += mha__mpi_numel(user[i]);
    float *g = mha__calloc(total > 0 ? total : 1, sizeof(float));
    st = g ? MHA_OK : MHA_ERR_NOMEM;
    mha_tensor mine[3];
    for (int i = 0; i < 3 && st == MHA_OK; i++)
        if (user[i] && alias[i] == i)
            mine[i] = mha_tensor_3d(g + at[i], user[i]->shape[0], user[i]->shape[1], user[i]->shape[2]);
    if (st == MHA_OK) {
        mha_layer_fwd_args a = local_args(L, args);
        mha_tensor *gq = user[0] ? &mine[alias[0]] : NULL, *gk = user[1] ? &mine[alias[1]] : NULL;
        mha_tensor *gv = user[2] ? &mine[alias[2]] : NULL;
        st = mha_layer_backward(ctx, L->local, &a, grad_attn_output, gq, gk, gv);
    }
    st = mha__mpi_agree(L->comm, st);
    if (st == MHA_OK) st = mha__mpi_sum(ctx, L->comm, g, total);
    for (int i = 0; i < 3 && st == MHA_OK; i++) {
        if (!user[i] || alias[i] != i) continue;
        if (args->write_input_grads) mha__mpi_copy_piece(user[i], g + at[i], false);
        else mha__mpi_add_piece(user[i], g + at[i]);
    }
    mha__free(g);
    return st;
}

/* ------------------------------------------------------------------ */
/* Decoding                                                            */
/* ------------------------------------------------------------------ */

mha_status mha_mpi_layer_decode(mha_ctx *ctx, mha_mpi_layer *L, mha_kv_cache *cache, mha_tensor *out,
                                const mha_tensor *x)
{
    if (!L) return mha__fail(MHA_ERR_MISUSE, "mha_mpi_layer_decode: NULL layer");
    mha_status st = MHA_OK;
    int n = 0;
    mha__mpi_field f[4];
    if (!ctx || !cache || !out || !x || !x->data) st = mha__fail(MHA_ERR_MISUSE, "mha_mpi_layer_decode: NULL argument");
    else if ((st = mha__check_tensor(out, "out", (const int64_t[4]){x->shape[0], x->shape[1], L->E, 1})) == MHA_OK) {
        const mha__mpi_field fields[] = {{"x.shape[0] (batch)", x->shape[0]},
                                         {"x.shape[1] (new tokens)", x->shape[1]},
                                         {"cache length", mha_kv_cache_length(cache)},
                                         {"cache capacity", mha_kv_cache_capacity(cache)}};
        memcpy(f, fields, sizeof fields);
        n = 4;
    }
    if ((st = mha__mpi_same(L->comm, st, f, n)) != MHA_OK) return st;
    int64_t before = mha_kv_cache_length(cache), n_out = x->shape[0] * x->shape[1] * L->E;
    float *y = mha__kept(ctx, 0, n_out * (int64_t)sizeof(float));
    mha_tensor y_mine = mha_tensor_3d(y, x->shape[0], x->shape[1], L->E);
    st = y ? mha_layer_decode(ctx, L->local, cache, &y_mine, x) : MHA_ERR_NOMEM; /* this rank's heads */
    st = mha__mpi_agree(L->comm, st);
    if (st == MHA_OK) st = mha__mpi_sum(ctx, L->comm, y, n_out);
    if (st == MHA_OK) mha__mpi_copy_piece(out, y, false);
    else (void)mha_kv_cache_truncate(cache, before); /* as the step found it, on every rank */
    return st;
}
