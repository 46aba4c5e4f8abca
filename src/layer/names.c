/*
 * names.c -- the one table of weight names: which tensor of which naming
 * family sets which part of the layer, in what layout.  Setting a weight
 * by name, loading a block from a file (weights.c), the training
 * parameter list (layer_train.c) and exporting weights and gradients in a
 * file's layout all read it; nothing else in the library spells a
 * weight's name (callers use them as PyTorch's state_dict does).
 *
 *   family                  Q|K|V stacked    Q, K, V            O                 biases          extra
 *   nn.MultiheadAttention   in_proj_weight   q/k/v_proj_weight  out_proj.weight   in_proj_bias,   bias_k, bias_v
 *                                                                                 out_proj.bias
 *   Llama-style             -                q/k/v_proj.weight  o_proj.weight     q/k/v_proj.bias,
 *                                                                                 o_proj.bias
 *   GPT-2 (Conv1D)          c_attn.weight T  -                  c_proj.weight T   c_attn.bias,
 *                                                                                 c_proj.bias
 *   BERT                    -                attention.self.    attention.output. attention.self.
 *                                            query/key/value    dense.weight      query/key/value.bias,
 *                                            .weight                              attention.output.dense.bias
 *
 * T: stored [in, out], the transpose of the layer's [out, in].
 */
#include "layer/layer.h"

#include <string.h>

static const struct {
    const char *name;
    bool conv1d;
} TABLE[MHA__FAMILIES][MHA__PART_COUNT] = {
    [MHA_NAMES_TORCH] =
        {
            [MHA__PART_QKV] = {"in_proj_weight", false},
            [MHA__PART_Q] = {"q_proj_weight", false},
            [MHA__PART_K] = {"k_proj_weight", false},
            [MHA__PART_V] = {"v_proj_weight", false},
            [MHA__PART_OUT] = {"out_proj.weight", false},
            [MHA__PART_QKV_BIAS] = {"in_proj_bias", false},
            [MHA__PART_OUT_BIAS] = {"out_proj.bias", false},
            [MHA__PART_BIAS_K] = {"bias_k", false},
            [MHA__PART_BIAS_V] = {"bias_v", false},
        },
    [MHA_NAMES_LLAMA] =
        {
            [MHA__PART_Q] = {"q_proj.weight", false},
            [MHA__PART_K] = {"k_proj.weight", false},
            [MHA__PART_V] = {"v_proj.weight", false},
            [MHA__PART_OUT] = {"o_proj.weight", false},
            [MHA__PART_Q_BIAS] = {"q_proj.bias", false},
            [MHA__PART_K_BIAS] = {"k_proj.bias", false},
            [MHA__PART_V_BIAS] = {"v_proj.bias", false},
            [MHA__PART_OUT_BIAS] = {"o_proj.bias", false},
        },
    [MHA_NAMES_GPT2] =
        {
            [MHA__PART_QKV] = {"c_attn.weight", true},
            [MHA__PART_OUT] = {"c_proj.weight", true},
            [MHA__PART_QKV_BIAS] = {"c_attn.bias", false},
            [MHA__PART_OUT_BIAS] = {"c_proj.bias", false},
        },
    [MHA_NAMES_BERT] =
        {
            [MHA__PART_Q] = {"attention.self.query.weight", false},
            [MHA__PART_K] = {"attention.self.key.weight", false},
            [MHA__PART_V] = {"attention.self.value.weight", false},
            [MHA__PART_OUT] = {"attention.output.dense.weight", false},
            [MHA__PART_Q_BIAS] = {"attention.self.query.bias", false},
            [MHA__PART_K_BIAS] = {"attention.self.key.bias", false},
            [MHA__PART_V_BIAS] = {"attention.self.value.bias", false},
            [MHA__PART_OUT_BIAS] = {"attention.output.dense.bias", false},
        },
};

/* PyTorch's parameters() order within a family. */
static const mha__part ORDER[] = {MHA__PART_QKV,      MHA__PART_Q,      MHA__PART_K,      MHA__PART_V,
                                  MHA__PART_QKV_BIAS, MHA__PART_Q_BIAS, MHA__PART_K_BIAS, MHA__PART_V_BIAS,
                                  MHA__PART_BIAS_K,   MHA__PART_BIAS_V, MHA__PART_OUT,    MHA__PART_OUT_BIAS};

const char *mha__name_of(mha_weight_names family, mha__part part)
{
    bool known = (int)family > MHA_NAMES_AUTO && (int)family < MHA__FAMILIES && part >= 0 && part < MHA__PART_COUNT;
    return known ? TABLE[family][part].name : NULL;
}

/* Does this layer have `part` under `family`? */
static bool present(const mha_layer *l, mha_weight_names family, mha__part part)
{
    const mha_layer_desc *d = &l->desc;
    bool same_in = d->kdim == d->embed_dim && d->vdim == d->embed_dim; /* PyTorch's _qkv_same_embed_dim */
    switch (part) {
    case MHA__PART_QKV: return same_in;
    case MHA__PART_Q:
    case MHA__PART_K:
    case MHA__PART_V: return family != MHA_NAMES_TORCH || !same_in;
    case MHA__PART_QKV_BIAS: return d->bias && (family != MHA_NAMES_GPT2 || same_in);
    case MHA__PART_Q_BIAS:
    case MHA__PART_K_BIAS:
    case MHA__PART_V_BIAS: return d->bias;
    case MHA__PART_OUT: return true;
    case MHA__PART_OUT_BIAS: return d->out_bias;
    case MHA__PART_BIAS_K:
    case MHA__PART_BIAS_V: return d->add_bias_kv;
    default: return false;
    }
}

/* The part's shape as the layer stores it: [out, in] for a matrix. */
static int part_shape(const mha_layer *l, mha__part part, int64_t shape[3])
{
    const mha_layer_desc *d = &l->desc;
    int64_t E = d->embed_dim, qd = l->qdim, kvd = l->kvdim;
    switch (part) {
    case MHA__PART_QKV: shape[0] = qd + 2 * kvd, shape[1] = E; return 2;
    case MHA__PART_Q: shape[0] = qd, shape[1] = E; return 2;
    case MHA__PART_K: shape[0] = kvd, shape[1] = d->kdim; return 2;
    case MHA__PART_V: shape[0] = kvd, shape[1] = d->vdim; return 2;
    case MHA__PART_OUT: shape[0] = E, shape[1] = qd; return 2;
    case MHA__PART_QKV_BIAS: shape[0] = qd + 2 * kvd; return 1;
    case MHA__PART_Q_BIAS: shape[0] = qd; return 1;
    case MHA__PART_K_BIAS:
    case MHA__PART_V_BIAS: shape[0] = kvd; return 1;
    case MHA__PART_OUT_BIAS: shape[0] = E; return 1;
    default: shape[0] = shape[1] = 1, shape[2] = kvd; return 3; /* bias_k, bias_v */
    }
}

bool mha__named_tensor(const mha_layer *l, mha_weight_names family, mha__part part, mha__named *t)
{
    const char *name = mha__name_of(family, part);
    if (!name || !present(l, family, part)) return false;
    *t = (mha__named){name, part, TABLE[family][part].conv1d, 1, 0, {0, 0, 0}};
    t->rank = part_shape(l, part, t->shape);
    if (t->conv1d) { /* stored as the transpose */
        int64_t rows = t->shape[0];
        t->shape[0] = t->shape[1];
        t->shape[1] = rows;
    }
    for (int i = 0; i < t->rank; i++) t->numel *= t->shape[i]; /* sizes checked when the layer was made */
    return true;
}

int mha__named_list(const mha_layer *l, mha_weight_names family, mha__named *list)
{
    int n = 0;
    for (size_t i = 0; i < sizeof ORDER / sizeof ORDER[0]; i++)
        if (mha__named_tensor(l, family, ORDER[i], &list[n])) n++;
    return n;
}

bool mha__part_of_name(const char *name, mha__part *part, bool *conv1d)
{
    for (int family = MHA_NAMES_TORCH; family < MHA__FAMILIES; family++)
        for (int p = 0; p < MHA__PART_COUNT; p++) {
            const char *n = TABLE[family][p].name;
            if (n && strcmp(n, name) == 0) {
                *part = (mha__part)p;
                *conv1d = TABLE[family][p].conv1d;
                return true;
            }
        }
    return false;
}

bool mha__named_find(const mha_layer *l, const char *name, mha__named *t)
{
    for (int family = MHA_NAMES_TORCH; family < MHA__FAMILIES; family++)
        for (int part = 0; part < MHA__PART_COUNT; part++) {
            const char *n = TABLE[family][part].name;
            if (n && strcmp(n, name) == 0) return mha__named_tensor(l, (mha_weight_names)family, (mha__part)part, t);
        }
    return false;
}

/* ---------------------------------------------------------------- */
/* Between a named tensor and the layer                              */
/* ---------------------------------------------------------------- */

/* The matrices a part covers: Q, K, V stacked are three, from MAT_Q. */
static int part_matrices(mha__part part, matrix *first)
{
    switch (part) {
    case MHA__PART_QKV: *first = MAT_Q; return 3;
    case MHA__PART_Q: *first = MAT_Q; return 1;
    case MHA__PART_K: *first = MAT_K; return 1;
    case MHA__PART_V: *first = MAT_V; return 1;
    case MHA__PART_OUT: *first = MAT_OUT; return 1;
    default: return 0;
    }
}

/* A bias part's values (or, with grads, its gradients) in the layer. */
static float *part_bias(const mha_layer *l, mha__part part, bool grads)
{
    const mha__layer_train *t = l->train;
    float *in = grads ? t->g_b_in : l->b_in;
    switch (part) {
    case MHA__PART_QKV_BIAS:
    case MHA__PART_Q_BIAS: return in;
    case MHA__PART_K_BIAS: return in + mha__layer_bias_offset(l, MAT_K);
    case MHA__PART_V_BIAS: return in + mha__layer_bias_offset(l, MAT_V);
    case MHA__PART_OUT_BIAS: return grads ? t->g_b_out : l->b_out;
    case MHA__PART_BIAS_K: return grads ? t->g_bias_k : l->bias_k;
    case MHA__PART_BIAS_V: return grads ? t->g_bias_v : l->bias_v;
    default: return NULL;
    }
}

void mha__named_storage(const mha_layer *l, const mha__named *t, float **value, float **grad)
{
    matrix first;
    if (part_matrices(t->part, &first)) {
        *value = l->train->w[first];
        *grad = l->train->g_w[first];
    } else {
        *value = part_bias(l, t->part, false);
        *grad = part_bias(l, t->part, true);
    }
}

/* Matrix m, [out, in], is rows [r0, r0 + out) of a stacked tensor whose
 * rows are the stacked outputs (transposed for Conv1D, whose [in, all]
 * has `all` columns): copies between the layer's layout `plain` and the
 * tensor's. */
static void copy_matrix(float *plain, float *tensor, int64_t out, int64_t in, int64_t r0, int64_t all, bool conv1d,
                        bool to_tensor)
{
    for (int64_t r = 0; r < out; r++)
        for (int64_t c = 0; c < in; c++) {
            float *p = plain + r * in + c, *s = tensor + (conv1d ? c * all + r0 + r : (r0 + r) * in + c);
            if (to_tensor) *s = *p;
            else *p = *s;
        }
}

/* Sets the layer's matrices from a named tensor: in place when stored as
 * the layer stores them, else through a transposed copy. */
static mha_status set_matrices(mha_layer *l, const mha__named *t, const float *data)
{
    matrix first;
    int count = part_matrices(t->part, &first);
    int64_t all = t->conv1d ? t->shape[1] : 0, r0 = 0;
    mha_status st = MHA_OK;
    for (int m = (int)first; m < (int)first + count && st == MHA_OK; m++) {
        int64_t out = mha__layer_out_features(l, (matrix)m), in = mha__layer_in_features(l, (matrix)m);
        if (!t->conv1d) {
            st = mha__layer_pack(l, (matrix)m, data + r0 * in);
        } else {
            float *plain = mha__alloc(out * in, sizeof(float));
            if (plain) copy_matrix(plain, (float *)data, out, in, r0, all, true, false);
            st = plain ? mha__layer_pack(l, (matrix)m, plain) : MHA_ERR_NOMEM;
            mha__free(plain);
        }
        r0 += out;
    }
    return st;
}

/* The `unset` bits a part covers. */
static unsigned part_bits(mha__part part)
{
    matrix first;
    int count = part_matrices(part, &first);
    if (count) return ((1u << count) - 1) << first;
    return part == MHA__PART_BIAS_K ? UNSET_BIAS_K : part == MHA__PART_BIAS_V ? UNSET_BIAS_V : 0;
}

mha_status mha__layer_check_weights(const mha_layer *l, const char *fn)
{
    if (!l->unset) return MHA_OK;
    mha__named list[MHA__PART_COUNT];
    int n = mha__named_list(l, mha__layer_family(l), list);
    for (int i = 0; i < n; i++)
        if (part_bits(list[i].part) & l->unset)
            return mha__fail(MHA_ERR_MISUSE,
                             "%s: weight \"%s\" was never set (mha_layer_set_weight, mha_layer_load, or "
                             "mha_layer_params then mha_layer_params_changed); only biases default to 0",
                             fn, list[i].name);
    return mha__fail(MHA_ERR_INTERNAL, "%s: a weight was never set", fn); /* every part has a name */
}

mha_status mha_layer_set_weight(mha_layer *l, const char *name, const float *data, int64_t numel)
{
    mha_status st = mha__layer_check(l, "mha_layer_set_weight");
    if (st != MHA_OK) return st;
    if (!name || !data) return mha__fail(MHA_ERR_MISUSE, "mha_layer_set_weight: NULL argument");
    mha__named t;
    if (!mha__named_find(l, name, &t))
        return mha__fail(MHA_ERR_NOT_FOUND, "\"%s\" is not a weight of this layer configuration", name);
    if (numel != t.numel)
        return mha__fail(MHA_ERR_INVALID_ARG, "%s needs %lld values, got %lld", name, (long long)t.numel,
                         (long long)numel);
    matrix first;
    if (part_matrices(t.part, &first)) st = set_matrices(l, &t, data);
    else memcpy(part_bias(l, t.part, false), data, (size_t)numel * sizeof(float));
    if (st == MHA_OK) l->unset &= ~part_bits(t.part);
    return st;
}

mha_weight_names mha__layer_family(const mha_layer *l)
{
    const mha_layer_desc *d = &l->desc;
    bool torch_shaped = d->num_kv_heads == d->num_heads && l->qdim == d->embed_dim;
    return l->names == MHA_NAMES_TORCH && !torch_shaped ? MHA_NAMES_LLAMA : l->names;
}

mha_status mha_layer_weight_shape(const mha_layer *l, const char *name, int *rank, int64_t shape[3], int64_t *numel)
{
    mha_status st = mha__layer_check(l, "mha_layer_weight_shape");
    if (st != MHA_OK) return st;
    if (!name || !rank || !shape || !numel) return mha__fail(MHA_ERR_MISUSE, "mha_layer_weight_shape: NULL argument");
    mha__named t;
    if (!mha__named_find(l, name, &t))
        return mha__fail(MHA_ERR_NOT_FOUND, "\"%s\" is not a weight of this layer configuration", name);
    *rank = t.rank;
    memcpy(shape, t.shape, sizeof t.shape);
    *numel = t.numel;
    return MHA_OK;
}

int64_t mha_layer_weight_names(const mha_layer *l, const char **names, int64_t capacity)
{
    if (mha__layer_check(l, "mha_layer_weight_names") != MHA_OK) return -1;
    if (capacity > 0 && !names) {
        mha__fail(MHA_ERR_MISUSE, "mha_layer_weight_names: NULL names with capacity %lld", (long long)capacity);
        return -1;
    }
    mha__named list[MHA__PART_COUNT];
    int n = mha__named_list(l, mha__layer_family(l), list);
    for (int i = 0; i < n && i < capacity; i++) names[i] = list[i].name;
    return n;
}

/* Writes the named tensor's gradient (grads) or value into dst, in the
 * tensor's layout. */
static void export_named(const mha_layer *l, const mha__named *t, bool grads, float *dst)
{
    matrix first;
    int count = part_matrices(t->part, &first);
    if (!count) {
        memcpy(dst, part_bias(l, t->part, grads), (size_t)t->numel * sizeof(float));
        return;
    }
    int64_t all = t->conv1d ? t->shape[1] : 0, r0 = 0;
    for (int m = (int)first; m < (int)first + count; m++) {
        int64_t out = mha__layer_out_features(l, (matrix)m), in = mha__layer_in_features(l, (matrix)m);
        float *src = grads ? l->train->g_w[m] : l->train->w[m];
        copy_matrix(src, dst, out, in, r0, all, t->conv1d, true);
        r0 += out;
    }
}

static mha_status export_checked(const mha_layer *l, const char *fn, const char *name, bool grads, float *dst,
                                 int64_t numel)
{
    mha_status st = mha__layer_check(l, fn);
    if (st != MHA_OK) return st;
    if (!name || !dst) return mha__fail(MHA_ERR_MISUSE, "%s: NULL argument", fn);
    if (!l->train) return mha__fail(MHA_ERR_MISUSE, "%s: the layer has no training state (mha_layer_train_init)", fn);
    mha__named t;
    if (!mha__named_find(l, name, &t))
        return mha__fail(MHA_ERR_NOT_FOUND, "\"%s\" is not a weight of this layer configuration", name);
    if (numel != t.numel)
        return mha__fail(MHA_ERR_INVALID_ARG, "%s: %s has %lld values, not %lld", fn, name, (long long)t.numel,
                         (long long)numel);
    export_named(l, &t, grads, dst);
    return MHA_OK;
}

mha_status mha_layer_get_weight(const mha_layer *l, const char *name, float *dst, int64_t numel)
{
    return export_checked(l, "mha_layer_get_weight", name, false, dst, numel);
}

mha_status mha_layer_get_grad(const mha_layer *l, const char *name, float *dst, int64_t numel)
{
    return export_checked(l, "mha_layer_get_grad", name, true, dst, numel);
}
