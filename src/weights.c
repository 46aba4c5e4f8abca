/*
 * weights.c -- build a layer from a PyTorch state_dict saved as
 * safetensors.  Uses only the public API: the tensors present decide the
 * configuration (packed or separate projections, biases, bias_k/bias_v),
 * exactly as nn.MultiheadAttention's constructor decides which it creates.
 */
#include "internal.h"

#include <stdio.h>
#include <string.h>

typedef struct lookup {
    mha_st_file *file;
    const char  *prefix;
} lookup;

/* Finds "<prefix><name>"; *present is false when absent. */
static mha_status find_weight(const lookup *lk, const char *name, mha_st_info *info, bool *present)
{
    char full[512];
    if ((size_t)snprintf(full, sizeof full, "%s%s", lk->prefix, name) >= sizeof full)
        return mha__fail(MHA_ERR_INVALID_ARG, "prefix \"%s\" is too long", lk->prefix);
    mha_status st = mha_st_find(lk->file, full, info);
    *present = st == MHA_OK;
    return st == MHA_ERR_NOT_FOUND ? MHA_OK : st;
}

static mha_status require_weight(const lookup *lk, const char *name, mha_st_info *info)
{
    bool present;
    mha_status st = find_weight(lk, name, info, &present);
    if (st == MHA_OK && !present)
        st = mha__fail(MHA_ERR_NOT_FOUND, "no tensor \"%s%s\" (an nn.MultiheadAttention weight; is --prefix right?)",
                       lk->prefix, name);
    return st;
}

/* info must have exactly the given shape. */
static mha_status expect_shape(const mha_st_info *info, int rank, const int64_t *shape)
{
    bool ok = info->rank == rank;
    for (int d = 0; ok && d < rank; d++) ok = info->shape[d] == shape[d];
    if (ok) return MHA_OK;
    char want[96] = "", got[96] = "";
    for (int d = 0; d < rank; d++)
        snprintf(want + strlen(want), sizeof want - strlen(want), "%s%lld", d ? ", " : "", (long long)shape[d]);
    for (int d = 0; d < info->rank; d++)
        snprintf(got + strlen(got), sizeof got - strlen(got), "%s%lld", d ? ", " : "", (long long)info->shape[d]);
    return mha__fail(MHA_ERR_INVALID_ARG, "tensor \"%s\" has shape [%s], expected [%s]", info->name, got, want);
}

/* Read the tensor described by info into the layer weight `name`. */
static mha_status load_weight(mha_layer *layer, mha_st_file *file, const mha_st_info *info, const char *name)
{
    if (info->dtype != MHA_DTYPE_F32 && info->dtype != MHA_DTYPE_F64 && info->dtype != MHA_DTYPE_F16 &&
        info->dtype != MHA_DTYPE_BF16)
        return mha__fail(MHA_ERR_INVALID_ARG, "tensor \"%s\" has dtype %s; weights must be F32, F64, F16 or BF16",
                         info->name, mha_dtype_name(info->dtype));
    float *tmp = mha__alloc(info->numel, sizeof(float));
    if (!tmp) return MHA_ERR_NOMEM;
    mha_status st = mha_st_read_f32(file, info->name, tmp, info->numel);
    if (st == MHA_OK) st = mha_layer_set_weight(layer, name, tmp, info->numel);
    mha__free(tmp);
    return st;
}

/* Decide the configuration from the tensors present and check shapes. */
static mha_status infer_desc(const lookup *lk, mha_layer_desc *d, mha_st_info found[8], const char *names[8], int *n)
{
    mha_st_info out_w;
    mha_status st = require_weight(lk, "out_proj.weight", &out_w);
    if (st != MHA_OK) return st;
    if (out_w.rank != 2 || out_w.shape[0] != out_w.shape[1] || out_w.shape[0] < 1)
        return mha__fail(MHA_ERR_INVALID_ARG, "tensor \"%s\" must be a square [E, E] matrix", out_w.name);
    int64_t E = d->embed_dim = out_w.shape[0];
    found[0] = out_w;
    names[0] = "out_proj.weight";
    *n = 1;

    bool packed, has_bias, has_out_bias, has_bias_k;
    mha_st_info info;
    if ((st = find_weight(lk, "in_proj_weight", &info, &packed)) != MHA_OK) return st;
    if (packed) {
        if ((st = expect_shape(&info, 2, (int64_t[]){3 * E, E})) != MHA_OK) return st;
        found[*n] = info;
        names[(*n)++] = "in_proj_weight";
    } else {
        static const char *const sep[3] = {"q_proj_weight", "k_proj_weight", "v_proj_weight"};
        for (int i = 0; i < 3; i++) {
            if ((st = require_weight(lk, sep[i], &info)) != MHA_OK) return st;
            if (info.rank != 2 || info.shape[0] != E || info.shape[1] < 1)
                return mha__fail(MHA_ERR_INVALID_ARG, "tensor \"%s\" must be [%lld, in_features]", info.name, (long long)E);
            if (i == 0 && (st = expect_shape(&info, 2, (int64_t[]){E, E})) != MHA_OK) return st;
            if (i == 1) d->kdim = info.shape[1];
            if (i == 2) d->vdim = info.shape[1];
            found[*n] = info;
            names[(*n)++] = sep[i];
        }
    }
    mha_st_info out_bias;
    if ((st = find_weight(lk, "in_proj_bias", &info, &has_bias)) != MHA_OK) return st;
    if ((st = find_weight(lk, "out_proj.bias", &out_bias, &has_out_bias)) != MHA_OK) return st;
    if (has_bias != has_out_bias)
        return mha__fail(MHA_ERR_NOT_FOUND, "\"%s%s\" is present but \"%s%s\" is not; nn.MultiheadAttention has both or neither",
                         lk->prefix, has_bias ? "in_proj_bias" : "out_proj.bias", lk->prefix,
                         has_bias ? "out_proj.bias" : "in_proj_bias");
    d->bias = has_bias;
    if (has_bias) {
        if ((st = expect_shape(&info, 1, (int64_t[]){3 * E})) != MHA_OK) return st;
        if ((st = expect_shape(&out_bias, 1, (int64_t[]){E})) != MHA_OK) return st;
        found[*n] = info;
        names[(*n)++] = "in_proj_bias";
        found[*n] = out_bias;
        names[(*n)++] = "out_proj.bias";
    }
    if ((st = find_weight(lk, "bias_k", &info, &has_bias_k)) != MHA_OK) return st;
    d->add_bias_kv = has_bias_k;
    if (has_bias_k) {
        if ((st = expect_shape(&info, 3, (int64_t[]){1, 1, E})) != MHA_OK) return st;
        found[*n] = info;
        names[(*n)++] = "bias_k";
        if ((st = require_weight(lk, "bias_v", &info)) != MHA_OK) return st;
        if ((st = expect_shape(&info, 3, (int64_t[]){1, 1, E})) != MHA_OK) return st;
        found[*n] = info;
        names[(*n)++] = "bias_v";
    }
    return MHA_OK;
}

mha_status mha_layer_from_safetensors(mha_st_file *file, const char *prefix, int64_t num_heads,
                                      int add_zero_attn, mha_dtype dtype, mha_layer **out_layer)
{
    if (!file || !out_layer) return mha__fail(MHA_ERR_MISUSE, "mha_layer_from_safetensors: NULL argument");
    *out_layer = NULL;
    lookup lk = {file, prefix ? prefix : ""};
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    d.num_heads = num_heads;
    d.add_zero_attn = add_zero_attn;
    d.dtype = dtype;
    mha_st_info found[8];
    const char *names[8];
    int n = 0;
    mha_status st = infer_desc(&lk, &d, found, names, &n);
    mha_layer *layer = NULL;
    if (st == MHA_OK) st = mha_layer_create(&d, &layer);
    for (int i = 0; st == MHA_OK && i < n; i++) st = load_weight(layer, file, &found[i], names[i]);
    if (st != MHA_OK) {
        mha_layer_free(layer);
        return st;
    }
    *out_layer = layer;
    return MHA_OK;
}
