/*
 * weights.c -- build a layer from an attention block's weights saved as
 * safetensors, under one of the naming families of names.c.  The tensors
 * present decide the configuration (widths, kv heads, head width, biases,
 * bias_k/bias_v), exactly as the block's constructor decides which
 * tensors it creates; what no tensor records (heads, rotary, window, ...)
 * comes from the caller.  The weights are then set by name.
 */
#include "layer/layer.h"

#include <stdio.h>
#include <string.h>

/* A family's name of a part (names.c's table). */
#define TORCH(part) mha__name_of(MHA_NAMES_TORCH, MHA__PART_##part)
#define LLAMA(part) mha__name_of(MHA_NAMES_LLAMA, MHA__PART_##part)
#define BERT(part)  mha__name_of(MHA_NAMES_BERT, MHA__PART_##part)
#define GPT2(part)  mha__name_of(MHA_NAMES_GPT2, MHA__PART_##part)

typedef struct lookup {
    mha_st_file *file;
    const char *prefix;
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
    bool present = false; /* set by find_weight when it succeeds */
    mha_status st = find_weight(lk, name, info, &present);
    if (st == MHA_OK && !present)
        st = mha__fail(MHA_ERR_NOT_FOUND, "no tensor \"%s%s\" (an attention block weight; is --prefix right?)",
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

/* A weight's stored dtype: one that loads as float32. */
static mha_status check_dtype(const mha_st_info *info)
{
    if (info->dtype == MHA_DTYPE_F32 || info->dtype == MHA_DTYPE_F64 || info->dtype == MHA_DTYPE_F16 ||
        info->dtype == MHA_DTYPE_BF16)
        return MHA_OK;
    return mha__fail(MHA_ERR_INVALID_ARG, "tensor \"%s\" has dtype %s; weights must be F32, F64, F16 or BF16",
                     info->name, mha_dtype_name(info->dtype));
}

/* Read the tensor described by info into the layer weight `name`. */
static mha_status load_weight(mha_layer *layer, mha_st_file *file, const mha_st_info *info, const char *name)
{
    float *tmp = mha__alloc(info->numel, sizeof(float));
    if (!tmp) return MHA_ERR_NOMEM;
    mha_status st = mha_st_read_f32(file, info->name, tmp, info->numel);
    if (st == MHA_OK) st = mha_layer_set_weight(layer, name, tmp, info->numel);
    mha__free(tmp);
    return st;
}

/* A tensor to load, found while inferring the configuration. */
static void add_found(mha_layer_load_plan *f, const mha_st_info *info, const char *name)
{
    f->weights[f->n_weights] = *info;
    f->weight_names[f->n_weights++] = name;
}

/* A weight's [rows, cols], or INVALID_ARG naming it. */
static mha_status matrix_shape(const mha_st_info *info, int64_t *rows, int64_t *cols)
{
    if (info->rank != 2 || info->shape[0] < 1 || info->shape[1] < 1)
        return mha__fail(MHA_ERR_INVALID_ARG, "tensor \"%s\" must be a matrix", info->name);
    *rows = info->shape[0];
    *cols = info->shape[1];
    return MHA_OK;
}

/* Optional bias `name` of n values: *present says whether it is there. */
static mha_status optional_bias(const lookup *lk, const char *name, int64_t n, mha_layer_load_plan *f, bool *present)
{
    mha_st_info info;
    mha_status st = find_weight(lk, name, &info, present);
    if (st != MHA_OK || !*present) return st;
    if ((st = expect_shape(&info, 1, (int64_t[]){n})) != MHA_OK) return st;
    add_found(f, &info, name);
    return MHA_OK;
}

/* h d = rows of W_q; d must be a whole number, as must g = (g d) / d. */
static mha_status head_split(mha_layer_desc *d, int64_t q_rows, int64_t kv_rows, const char *q_name)
{
    if (q_rows % d->num_heads)
        return mha__fail(MHA_ERR_INVALID_ARG, "%s has %lld rows, not a multiple of num_heads %lld", q_name,
                         (long long)q_rows, (long long)d->num_heads);
    d->head_dim = q_rows / d->num_heads;
    if (kv_rows % d->head_dim || d->num_heads % (kv_rows / d->head_dim))
        return mha__fail(MHA_ERR_INVALID_ARG,
                         "key/value projections have %lld rows: not a whole number of %lld-wide "
                         "heads dividing num_heads %lld",
                         (long long)kv_rows, (long long)d->head_dim, (long long)d->num_heads);
    d->num_kv_heads = kv_rows / d->head_dim;
    return MHA_OK;
}

/* Q, K, V and O apart, biases optional: Llama's names, or BERT's. */
static mha_status infer_apart(const lookup *lk, mha_weight_names family, mha_layer_desc *d, mha_layer_load_plan *f)
{
#define NAME(part) mha__name_of(family, MHA__PART_##part)
    const char *const w_names[4] = {NAME(Q), NAME(K), NAME(V), NAME(OUT)};
    int64_t rows[4] = {0}, cols[4] = {0};
    mha_st_info info;
    mha_status st = MHA_OK;
    for (int i = 0; i < 4 && st == MHA_OK; i++)
        if ((st = require_weight(lk, w_names[i], &info)) == MHA_OK &&
            (st = matrix_shape(&info, &rows[i], &cols[i])) == MHA_OK)
            add_found(f, &info, w_names[i]);
    if (st != MHA_OK) return st;
    d->embed_dim = rows[3];
    if (cols[0] != d->embed_dim || cols[3] != rows[0] || rows[1] != rows[2])
        return mha__fail(MHA_ERR_INVALID_ARG,
                         "%s [%lld, %lld], %s and %s [%lld, ...], [%lld, ...] and %s [%lld, %lld] do not "
                         "fit one attention block",
                         w_names[0], (long long)rows[0], (long long)cols[0], w_names[1], w_names[2], (long long)rows[1],
                         (long long)rows[2], w_names[3], (long long)rows[3], (long long)cols[3]);
    d->kdim = cols[1];
    d->vdim = cols[2];
    if ((st = head_split(d, rows[0], rows[1], NAME(Q))) != MHA_OK) return st;
    bool has[3], has_out;
    const char *const b_names[3] = {NAME(Q_BIAS), NAME(K_BIAS), NAME(V_BIAS)};
    for (int i = 0; i < 3 && st == MHA_OK; i++) st = optional_bias(lk, b_names[i], rows[i], f, &has[i]);
    if (st == MHA_OK) st = optional_bias(lk, NAME(OUT_BIAS), d->embed_dim, f, &has_out);
#undef NAME
    if (st != MHA_OK) return st;
    /* Some blocks leave out some of these (Whisper has no k_proj.bias): an
     * absent bias is a zero bias, which the layer starts with. */
    d->bias = has[0] || has[1] || has[2];
    d->out_bias = has_out;
    return MHA_OK;
}

/* GPT-2: Q|K|V stacked [E, 3 h d] and O [h d, E], both Conv1D. */
static mha_status infer_gpt2(const lookup *lk, mha_layer_desc *d, mha_layer_load_plan *f)
{
    mha_st_info attn, proj;
    int64_t ar = 0, ac = 0, pr = 0, pc = 0;
    mha_status st;
    if ((st = require_weight(lk, GPT2(QKV), &attn)) != MHA_OK || (st = matrix_shape(&attn, &ar, &ac)) != MHA_OK ||
        (st = require_weight(lk, GPT2(OUT), &proj)) != MHA_OK || (st = matrix_shape(&proj, &pr, &pc)) != MHA_OK)
        return st;
    if (ac % 3 || pr != ac / 3 || pc != ar)
        return mha__fail(MHA_ERR_INVALID_ARG,
                         "%s [%lld, %lld] and %s [%lld, %lld] are not GPT-2's [E, 3 E'] and [E', E]", GPT2(QKV),
                         (long long)ar, (long long)ac, GPT2(OUT), (long long)pr, (long long)pc);
    add_found(f, &attn, GPT2(QKV));
    add_found(f, &proj, GPT2(OUT));
    d->embed_dim = ar;
    if ((st = head_split(d, ac / 3, ac / 3, GPT2(QKV))) != MHA_OK) return st;
    bool has_in = false, has_out = false;
    if ((st = optional_bias(lk, GPT2(QKV_BIAS), ac, f, &has_in)) != MHA_OK ||
        (st = optional_bias(lk, GPT2(OUT_BIAS), ar, f, &has_out)) != MHA_OK)
        return st;
    d->bias = has_in;
    d->out_bias = has_out;
    return MHA_OK;
}

/* nn.MultiheadAttention's input projections: Q|K|V stacked [3E, E], or
 * apart with kdim and vdim read from K's and V's widths. */
static mha_status torch_inputs(const lookup *lk, mha_layer_desc *d, mha_layer_load_plan *f)
{
    int64_t E = d->embed_dim;
    bool packed = false;
    mha_st_info info;
    mha_status st = find_weight(lk, TORCH(QKV), &info, &packed);
    if (st != MHA_OK) return st;
    if (packed) {
        if ((st = expect_shape(&info, 2, (int64_t[]){3 * E, E})) == MHA_OK) add_found(f, &info, TORCH(QKV));
        return st;
    }
    const char *const apart[3] = {TORCH(Q), TORCH(K), TORCH(V)};
    for (int i = 0; i < 3; i++) {
        if ((st = require_weight(lk, apart[i], &info)) != MHA_OK) return st;
        if (info.rank != 2 || info.shape[0] != E || info.shape[1] < 1)
            return mha__fail(MHA_ERR_INVALID_ARG, "tensor \"%s\" must be [%lld, in_features]", info.name, (long long)E);
        if (i == 0 && (st = expect_shape(&info, 2, (int64_t[]){E, E})) != MHA_OK) return st;
        if (i == 1) d->kdim = info.shape[1];
        if (i == 2) d->vdim = info.shape[1];
        add_found(f, &info, apart[i]);
    }
    return MHA_OK;
}

/* Its biases: both (in and out) or neither. */
static mha_status torch_biases(const lookup *lk, mha_layer_desc *d, mha_layer_load_plan *f)
{
    int64_t E = d->embed_dim;
    bool has_in = false, has_out = false;
    mha_st_info in, out;
    mha_status st;
    if ((st = find_weight(lk, TORCH(QKV_BIAS), &in, &has_in)) != MHA_OK ||
        (st = find_weight(lk, TORCH(OUT_BIAS), &out, &has_out)) != MHA_OK)
        return st;
    if (has_in != has_out)
        return mha__fail(MHA_ERR_NOT_FOUND,
                         "\"%s%s\" is present but \"%s%s\" is not; nn.MultiheadAttention has both or neither",
                         lk->prefix, has_in ? TORCH(QKV_BIAS) : TORCH(OUT_BIAS), lk->prefix,
                         has_in ? TORCH(OUT_BIAS) : TORCH(QKV_BIAS));
    d->bias = d->out_bias = has_in;
    if (!has_in) return MHA_OK;
    if ((st = expect_shape(&in, 1, (int64_t[]){3 * E})) != MHA_OK ||
        (st = expect_shape(&out, 1, (int64_t[]){E})) != MHA_OK)
        return st;
    add_found(f, &in, TORCH(QKV_BIAS));
    add_found(f, &out, TORCH(OUT_BIAS));
    return MHA_OK;
}

/* bias_k and bias_v [1, 1, E] (add_bias_kv): both or neither. */
static mha_status torch_bias_kv(const lookup *lk, mha_layer_desc *d, mha_layer_load_plan *f)
{
    const int64_t shape[3] = {1, 1, d->embed_dim};
    bool has_k = false;
    mha_st_info info;
    mha_status st = find_weight(lk, TORCH(BIAS_K), &info, &has_k);
    d->add_bias_kv = has_k;
    if (st != MHA_OK || !has_k) return st;
    if ((st = expect_shape(&info, 3, shape)) != MHA_OK) return st;
    add_found(f, &info, TORCH(BIAS_K));
    if ((st = require_weight(lk, TORCH(BIAS_V), &info)) != MHA_OK || (st = expect_shape(&info, 3, shape)) != MHA_OK)
        return st;
    add_found(f, &info, TORCH(BIAS_V));
    return MHA_OK;
}

/* nn.MultiheadAttention: the tensors present and their shapes; out_proj
 * first, so a missing one is named for this family. */
static mha_status infer_torch(const lookup *lk, mha_layer_desc *d, mha_layer_load_plan *f)
{
    mha_st_info out_w;
    mha_status st = require_weight(lk, TORCH(OUT), &out_w);
    if (st != MHA_OK) return st;
    if (out_w.rank != 2 || out_w.shape[0] != out_w.shape[1] || out_w.shape[0] < 1)
        return mha__fail(MHA_ERR_INVALID_ARG, "tensor \"%s\" must be a square [E, E] matrix", out_w.name);
    d->embed_dim = out_w.shape[0];
    add_found(f, &out_w, TORCH(OUT));
    if ((st = torch_inputs(lk, d, f)) != MHA_OK || (st = torch_biases(lk, d, f)) != MHA_OK) return st;
    return torch_bias_kv(lk, d, f);
}

/* The family asked for, or the first whose anchor tensor is present. */
static mha_status infer_desc(const lookup *lk, mha_weight_names names, mha_layer_desc *d, mha_layer_load_plan *f,
                             mha_weight_names *chosen)
{
    mha_st_info info;
    bool torch = false, llama = false, gpt2 = false, bert = false;
    mha_status st;
    if ((st = find_weight(lk, TORCH(OUT), &info, &torch)) != MHA_OK ||
        (st = find_weight(lk, LLAMA(OUT), &info, &llama)) != MHA_OK ||
        (st = find_weight(lk, GPT2(QKV), &info, &gpt2)) != MHA_OK ||
        (st = find_weight(lk, BERT(OUT), &info, &bert)) != MHA_OK)
        return st;
    if (names == MHA_NAMES_AUTO)
        names = torch   ? MHA_NAMES_TORCH
                : llama ? MHA_NAMES_LLAMA
                : gpt2  ? MHA_NAMES_GPT2
                : bert  ? MHA_NAMES_BERT
                        : MHA_NAMES_TORCH;
    *chosen = names;
    switch (names) {
    case MHA_NAMES_LLAMA:
    case MHA_NAMES_BERT: return infer_apart(lk, names, d, f);
    case MHA_NAMES_GPT2: return infer_gpt2(lk, d, f);
    case MHA_NAMES_TORCH: return infer_torch(lk, d, f); /* also names what is missing */
    default: break;
    }
    return mha__fail(MHA_ERR_INVALID_ARG, "weight names %d is not an mha_weight_names value", (int)names);
}

mha_status mha_layer_plan_load(mha_st_file *file, const char *prefix, mha_weight_names names,
                               const mha_layer_desc *hints, mha_layer_load_plan *plan)
{
    if (!file || !hints || !plan) return mha__fail(MHA_ERR_MISUSE, "mha_layer_plan_load: NULL argument");
    memset(plan, 0, sizeof *plan);
    if (hints->num_heads < 1)
        return mha__fail(MHA_ERR_INVALID_ARG, "num_heads must be positive, got %lld (files do not store it)",
                         (long long)hints->num_heads);
    lookup lk = {file, prefix ? prefix : ""};
    plan->desc = *hints;
    plan->desc.kdim = plan->desc.vdim = 0;
    plan->desc.num_kv_heads = plan->desc.head_dim = 0;
    plan->names = MHA_NAMES_TORCH;
    mha_status st = infer_desc(&lk, names, &plan->desc, plan, &plan->names);
    for (int i = 0; st == MHA_OK && i < plan->n_weights; i++) st = check_dtype(&plan->weights[i]);
    return st == MHA_OK ? mha__layer_complete_desc(&plan->desc, &plan->desc) : st;
}

mha_status mha_layer_load(mha_st_file *file, const char *prefix, mha_weight_names names, const mha_layer_desc *hints,
                          mha_layer **out_layer)
{
    if (!file || !hints || !out_layer) return mha__fail(MHA_ERR_MISUSE, "mha_layer_load: NULL argument");
    *out_layer = NULL;
    mha_layer_load_plan f;
    mha_status st = mha_layer_plan_load(file, prefix, names, hints, &f);
    mha_layer *layer = NULL;
    if (st == MHA_OK) st = mha_layer_create(&f.desc, &layer);
    if (st == MHA_OK) mha__layer_set_names(layer, f.names);
    for (int i = 0; st == MHA_OK && i < f.n_weights; i++)
        st = load_weight(layer, file, &f.weights[i], f.weight_names[i]);
    if (st != MHA_OK) {
        mha_layer_free(layer);
        return st;
    }
    *out_layer = layer;
    return MHA_OK;
}

mha_status mha_layer_from_safetensors(mha_st_file *file, const char *prefix, int64_t num_heads, int add_zero_attn,
                                      mha_dtype dtype, mha_layer **out_layer)
{
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    d.num_heads = num_heads;
    d.add_zero_attn = add_zero_attn;
    d.dtype = dtype;
    return mha_layer_load(file, prefix, MHA_NAMES_AUTO, &d, out_layer);
}
