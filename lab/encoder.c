/*
 * encoder.c -- a pretrained BERT-style encoder (all-MiniLM-L6-v2 and its
 * kind) on libmha: its attention blocks are libmha layers loaded under
 * BERT's names; the rest is here, as Hugging Face's BertModel computes it:
 *
 *   x_0     = LN_e(word[id_t] + position[t] + token_type[0])
 *   a       = MHA_l(x_l)                    key padding masked
 *   x'      = LN1_l(x_l + a)                 attention.output.LayerNorm
 *   x_{l+1} = LN2_l(x' + W2 GELU(W1 x' + b1) + b2)   intermediate, output
 *
 * and a sentence's embedding is the mean of its real tokens' last states,
 * normalised to length 1 (sentence-transformers' Pooling + Normalize).
 * Everything read from the files is checked: every tensor's shape against
 * the others, the head count from config.json against the width.
 */
#include "lab.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_LAYERS = 64, MAX_POSITIONS = 1 << 16, MAX_HEADS = 1024 };

typedef struct enc_block {
    mha_layer *attn;
    float *ln1_g, *ln1_b, *w1, *b1, *w2, *b2, *ln2_g, *ln2_b;
    float *w_out; /* attention.output.dense.weight as trained, for pruning */
} enc_block;

struct lab_encoder {
    lab_encoder_config c;
    float *word, *position, *type0, *ln_g, *ln_b;
    enc_block *blocks;
    uint8_t *kept;     /* [L * H]: the heads as lab_encoder_keep_heads last left them */
    float *a, *x1, *u; /* scratch for the largest batch so far */
    uint8_t *keep_keys;
    int64_t capacity; /* B * T the scratch holds */
};

/* ---- reading ------------------------------------------------------- */

/* The tensor `name` of exactly the given shape, read as float32 into a
 * new array. */
static mha_status read_tensor(mha_st_file *f, const char *name, int rank, const int64_t *shape, float **out)
{
    mha_st_info info;
    mha_status st = mha_st_find(f, name, &info);
    if (st != MHA_OK) return lab_fail_mha(st, "the model");
    bool same = info.rank == rank;
    int64_t n = 1;
    for (int i = 0; i < rank; i++) same = same && info.shape[i] == shape[i], n *= shape[i];
    if (!same) {
        char want[64];
        snprintf(want, sizeof want, rank == 1 ? "[%lld]" : "[%lld, %lld]", (long long)shape[0],
                 (long long)(rank > 1 ? shape[1] : 0));
        return lab_fail(MHA_ERR_INVALID_ARG, "the model's %s has rank %d and %lld values; it must be %s", name,
                        info.rank, (long long)info.numel, want);
    }
    if (!(*out = malloc((size_t)n * sizeof(float)))) return MHA_ERR_NOMEM;
    if ((st = mha_st_read_f32(f, name, *out, n)) != MHA_OK) return lab_fail_mha(st, name);
    return MHA_OK;
}

/* A number from config.json, `"key": value`, within [lo, hi]. */
static mha_status config_number(const char *json, const char *path, const char *key, double lo, double hi, double *v)
{
    char quoted[64];
    snprintf(quoted, sizeof quoted, "\"%s\"", key);
    const char *at = strstr(json, quoted);
    if (at) at = strchr(at + strlen(quoted), ':');
    char *end = NULL;
    *v = at ? strtod(at + 1, &end) : NAN;
    if (!at || end == at + 1 || !(*v >= lo && *v <= hi))
        return lab_fail(MHA_ERR_INVALID_ARG, "%s: \"%s\" must be a number in [%g, %g]", path, key, lo, hi);
    return MHA_OK;
}

static mha_status read_config(const char *dir, lab_encoder_config *c)
{
    char path[4096], json[1 << 14];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "r");
    if (!f)
        return lab_fail(MHA_ERR_IO, "cannot open %s: %s (scripts/get_model.sh fetches the model)", path,
                        strerror(errno));
    size_t n = fread(json, 1, sizeof json - 1, f);
    bool whole = feof(f);
    fclose(f);
    json[n] = '\0';
    if (!whole) return lab_fail(MHA_ERR_INVALID_ARG, "%s: larger than %zu bytes", path, sizeof json - 1);
    if (strstr(json, "\"hidden_act\"") && !strstr(json, "\"gelu\""))
        return lab_fail(MHA_ERR_INVALID_ARG, "%s: hidden_act must be \"gelu\" (the erf form)", path);
    double heads = 0, eps = 0;
    mha_status st = config_number(json, path, "num_attention_heads", 1, MAX_HEADS, &heads);
    if (st == MHA_OK) st = config_number(json, path, "layer_norm_eps", 0, 1, &eps);
    c->heads = (int64_t)heads, c->eps = eps;
    return st;
}

/* Widths from the embeddings, the block count from the names present. */
static mha_status read_sizes(mha_st_file *f, lab_encoder_config *c)
{
    mha_st_info word, pos, inter;
    mha_status st;
    if ((st = mha_st_find(f, "embeddings.word_embeddings.weight", &word)) != MHA_OK ||
        (st = mha_st_find(f, "embeddings.position_embeddings.weight", &pos)) != MHA_OK ||
        (st = mha_st_find(f, "encoder.layer.0.intermediate.dense.weight", &inter)) != MHA_OK)
        return lab_fail_mha(st, "the model");
    if (word.rank != 2 || pos.rank != 2 || inter.rank != 2 || word.shape[1] != pos.shape[1] ||
        inter.shape[1] != word.shape[1] || pos.shape[0] > MAX_POSITIONS)
        return lab_fail(MHA_ERR_INVALID_ARG,
                        "the model's embeddings and first intermediate.dense do not share a width");
    c->vocab = word.shape[0], c->embed_dim = word.shape[1], c->max_positions = pos.shape[0];
    c->ffn = inter.shape[0];
    if (c->embed_dim % c->heads)
        return lab_fail(MHA_ERR_INVALID_ARG, "the model's width %lld is not a multiple of its %lld heads",
                        (long long)c->embed_dim, (long long)c->heads);
    char name[128];
    mha_st_info info;
    for (c->layers = 0; c->layers < MAX_LAYERS; c->layers++) {
        snprintf(name, sizeof name, "encoder.layer.%lld.attention.output.dense.weight", (long long)c->layers);
        if (mha_st_find(f, name, &info) != MHA_OK) break;
    }
    if (c->layers == 0) return lab_fail(MHA_ERR_NOT_FOUND, "the model has no encoder.layer.0 block");
    return MHA_OK;
}

/* One block: its attention through libmha's loader, the rest read here. */
static mha_status read_block(mha_st_file *f, const lab_encoder_config *c, int64_t l, enc_block *b)
{
    char prefix[64], name[160];
    snprintf(prefix, sizeof prefix, "encoder.layer.%lld.", (long long)l);
    mha_layer_desc hints;
    mha_layer_desc_init(&hints);
    hints.num_heads = c->heads;
    mha_status st = mha_layer_load(f, prefix, MHA_NAMES_BERT, &hints, &b->attn);
    if (st != MHA_OK) return lab_fail_mha(st, prefix);
    const int64_t E = c->embed_dim, F = c->ffn, vec[1] = {E}, ffn_vec[1] = {F}, up[2] = {F, E}, down[2] = {E, F},
                  square[2] = {E, E};
    struct {
        const char *suffix;
        int rank;
        const int64_t *shape;
        float **dst;
    } parts[] = {
        {"attention.output.LayerNorm.weight", 1, vec, &b->ln1_g},
        {"attention.output.LayerNorm.bias", 1, vec, &b->ln1_b},
        {"intermediate.dense.weight", 2, up, &b->w1},
        {"intermediate.dense.bias", 1, ffn_vec, &b->b1},
        {"output.dense.weight", 2, down, &b->w2},
        {"output.dense.bias", 1, vec, &b->b2},
        {"output.LayerNorm.weight", 1, vec, &b->ln2_g},
        {"output.LayerNorm.bias", 1, vec, &b->ln2_b},
        {"attention.output.dense.weight", 2, square, &b->w_out},
    };
    for (size_t i = 0; i < sizeof parts / sizeof parts[0] && st == MHA_OK; i++) {
        snprintf(name, sizeof name, "%s%s", prefix, parts[i].suffix);
        st = read_tensor(f, name, parts[i].rank, parts[i].shape, parts[i].dst);
    }
    return st;
}

static mha_status read_embeddings(mha_st_file *f, lab_encoder *e)
{
    const lab_encoder_config *c = &e->c;
    const int64_t E = c->embed_dim, word[2] = {c->vocab, E}, pos[2] = {c->max_positions, E}, vec[1] = {E};
    mha_st_info types;
    mha_status st = mha_st_find(f, "embeddings.token_type_embeddings.weight", &types);
    if (st != MHA_OK) return lab_fail_mha(st, "the model");
    if (types.rank != 2 || types.shape[0] < 1 || types.shape[1] != E)
        return lab_fail(MHA_ERR_INVALID_ARG, "the model's token_type_embeddings must be [types, %lld]", (long long)E);
    if (!(e->type0 = malloc((size_t)E * sizeof(float)))) return MHA_ERR_NOMEM;
    if ((st = mha_st_read_f32_range(f, "embeddings.token_type_embeddings.weight", 0, E, e->type0)) != MHA_OK)
        return lab_fail_mha(st, "token_type_embeddings");
    if ((st = read_tensor(f, "embeddings.word_embeddings.weight", 2, word, &e->word)) != MHA_OK ||
        (st = read_tensor(f, "embeddings.position_embeddings.weight", 2, pos, &e->position)) != MHA_OK ||
        (st = read_tensor(f, "embeddings.LayerNorm.weight", 1, vec, &e->ln_g)) != MHA_OK)
        return st;
    return read_tensor(f, "embeddings.LayerNorm.bias", 1, vec, &e->ln_b);
}

static mha_status load_from(const char *dir, mha_st_file *f, lab_encoder *e)
{
    mha_status st = read_config(dir, &e->c);
    if (st == MHA_OK) st = read_sizes(f, &e->c);
    if (st == MHA_OK) st = read_embeddings(f, e);
    if (st == MHA_OK && !(e->blocks = calloc((size_t)e->c.layers, sizeof *e->blocks))) st = MHA_ERR_NOMEM;
    if (st == MHA_OK && !(e->kept = malloc((size_t)(e->c.layers * e->c.heads)))) st = MHA_ERR_NOMEM;
    if (st == MHA_OK) memset(e->kept, 1, (size_t)(e->c.layers * e->c.heads));
    for (int64_t l = 0; st == MHA_OK && l < e->c.layers; l++) st = read_block(f, &e->c, l, &e->blocks[l]);
    return st;
}

mha_status lab_encoder_load(const char *dir, lab_encoder **out)
{
    *out = NULL;
    char path[4096];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    mha_st_file *f = NULL;
    mha_status st = mha_st_open(path, &f);
    if (st != MHA_OK) return lab_fail_mha(st, "the model (scripts/get_model.sh fetches it)");
    lab_encoder *e = calloc(1, sizeof *e);
    st = e ? load_from(dir, f, e) : MHA_ERR_NOMEM;
    mha_st_close(f);
    if (st != MHA_OK) {
        lab_encoder_free(e);
        return st;
    }
    *out = e;
    return MHA_OK;
}

void lab_encoder_free(lab_encoder *e)
{
    if (!e) return;
    for (int64_t l = 0; e->blocks && l < e->c.layers; l++) {
        enc_block *b = &e->blocks[l];
        mha_layer_free(b->attn);
        free(b->ln1_g), free(b->ln1_b), free(b->w1), free(b->b1), free(b->w2), free(b->b2);
        free(b->ln2_g), free(b->ln2_b), free(b->w_out);
    }
    free(e->blocks);
    free(e->kept);
    free(e->word), free(e->position), free(e->type0), free(e->ln_g), free(e->ln_b);
    free(e->a), free(e->x1), free(e->u), free(e->keep_keys);
    free(e);
}

const lab_encoder_config *lab_encoder_config_of(const lab_encoder *e) { return &e->c; }

/* ---- computing ----------------------------------------------------- */

static mha_status reserve(lab_encoder *e, int64_t rows)
{
    if (rows <= e->capacity) return MHA_OK;
    int64_t E = e->c.embed_dim;
    free(e->a), free(e->x1), free(e->u), free(e->keep_keys);
    e->a = malloc((size_t)(rows * E) * sizeof(float));
    e->x1 = malloc((size_t)(rows * E) * sizeof(float));
    e->u = malloc((size_t)(rows * e->c.ffn) * sizeof(float));
    e->keep_keys = malloc((size_t)rows);
    bool ok = e->a && e->x1 && e->u && e->keep_keys;
    e->capacity = ok ? rows : 0;
    return ok ? MHA_OK : MHA_ERR_NOMEM;
}

static float gelu_erf(float u) { return 0.5f * u * (1.0f + erff(u * 0.70710678118654752f)); }

/* x = LN(word + position + token type 0). */
static void embed(const lab_encoder *e, const int32_t *ids, int64_t rows, int64_t T, float *x)
{
    int64_t E = e->c.embed_dim;
    for (int64_t r = 0; r < rows; r++) {
        const float *w = e->word + (int64_t)ids[r] * E, *p = e->position + (r % T) * E;
        for (int64_t i = 0; i < E; i++) e->a[r * E + i] = w[i] + p[i] + e->type0[i];
    }
    lab_layer_norm(e->a, e->ln_g, e->ln_b, rows, E, e->c.eps, x, NULL, NULL);
}

/* One block from x to out; its heads' attention into attn if asked. */
static mha_status block_forward(mha_ctx *ctx, lab_encoder *e, const enc_block *b, int64_t B, int64_t T, const float *x,
                                float *out, float *attn)
{
    int64_t E = e->c.embed_dim, F = e->c.ffn, rows = B * T, n = rows * E;
    mha_layer_fwd_args args;
    mha_layer_fwd_args_init(&args);
    args.query = args.key = args.value = mha_tensor_3d((float *)x, B, T, E);
    args.key_padding_mask = (mha_mask){MHA_MASK_KEEP, e->keep_keys, {T, 0, 0, 1}};
    args.average_attn_weights = 0;
    mha_tensor y = mha_tensor_3d(e->a, B, T, E), w = mha_tensor_4d(attn, B, e->c.heads, T, T);
    mha_status st = mha_layer_forward(ctx, b->attn, &y, attn ? &w : NULL, &args);
    if (st != MHA_OK) return lab_fail_mha(st, "an encoder block's attention");
    for (int64_t i = 0; i < n; i++) e->a[i] += x[i];
    lab_layer_norm(e->a, b->ln1_g, b->ln1_b, rows, E, e->c.eps, e->x1, NULL, NULL);
    if ((st = mha_linear(ctx, e->x1, b->w1, b->b1, e->u, rows, E, F)) != MHA_OK)
        return lab_fail_mha(st, "intermediate.dense");
    for (int64_t i = 0; i < rows * F; i++) e->u[i] = gelu_erf(e->u[i]);
    if ((st = mha_linear(ctx, e->u, b->w2, b->b2, e->a, rows, F, E)) != MHA_OK) return lab_fail_mha(st, "output.dense");
    for (int64_t i = 0; i < n; i++) e->a[i] += e->x1[i];
    lab_layer_norm(e->a, b->ln2_g, b->ln2_b, rows, E, e->c.eps, out, NULL, NULL);
    return MHA_OK;
}

static mha_status check_batch(const lab_encoder *e, const int32_t *ids, const int64_t *lengths, int64_t B, int64_t T)
{
    if (B < 1 || T < 1 || T > e->c.max_positions)
        return lab_fail(MHA_ERR_INVALID_ARG, "a batch of %lld x %lld tokens; the model takes 1 to %lld positions",
                        (long long)B, (long long)T, (long long)e->c.max_positions);
    for (int64_t b = 0; b < B; b++)
        if (lengths[b] < 1 || lengths[b] > T)
            return lab_fail(MHA_ERR_INVALID_ARG, "sentence %lld has length %lld, not in 1..%lld", (long long)b,
                            (long long)lengths[b], (long long)T);
    for (int64_t r = 0; r < B * T; r++)
        if (ids[r] < 0 || ids[r] >= e->c.vocab)
            return lab_fail(MHA_ERR_INVALID_ARG, "token id %d is outside the vocabulary of %lld", (int)ids[r],
                            (long long)e->c.vocab);
    return MHA_OK;
}

/* Blocks first .. L-1 from states[first] (each block's input, then the
 * last output, [L + 1][B * T * E]); the embeddings first when first < 0. */
static mha_status run_blocks(mha_ctx *ctx, lab_encoder *e, const int32_t *ids, const int64_t *lengths, int64_t B,
                             int64_t T, int64_t first, float *states, float *attn)
{
    mha_status st = check_batch(e, ids, lengths, B, T);
    if (st == MHA_OK && (st = reserve(e, B * T)) != MHA_OK)
        return lab_fail(st, "no memory for a batch of %lld x %lld", (long long)B, (long long)T);
    if (st != MHA_OK) return st;
    for (int64_t r = 0; r < B * T; r++) e->keep_keys[r] = r % T < lengths[r / T];
    int64_t n = B * T * e->c.embed_dim, per_layer = B * e->c.heads * T * T;
    if (first < 0) {
        embed(e, ids, B * T, T, states);
        first = 0;
    }
    for (int64_t l = first; l < e->c.layers && st == MHA_OK; l++)
        st = block_forward(ctx, e, &e->blocks[l], B, T, states + l * n, states + (l + 1) * n,
                           attn ? attn + l * per_layer : NULL);
    return st;
}

mha_status lab_encoder_forward(mha_ctx *ctx, lab_encoder *e, const int32_t *ids, const int64_t *lengths, int64_t B,
                               int64_t T, float *hidden, float *attn)
{
    int64_t n = B * T * e->c.embed_dim;
    float *states = B > 0 && T > 0 ? malloc((size_t)((e->c.layers + 1) * n) * sizeof(float)) : NULL;
    if (!states && B > 0 && T > 0) return MHA_ERR_NOMEM;
    mha_status st = run_blocks(ctx, e, ids, lengths, B, T, -1, states, attn);
    if (st == MHA_OK && hidden) memcpy(hidden, states + e->c.layers * n, (size_t)n * sizeof(float));
    free(states);
    return st;
}

mha_status lab_encoder_forward_from(mha_ctx *ctx, lab_encoder *e, const int32_t *ids, const int64_t *lengths, int64_t B,
                                    int64_t T, int64_t first, float *states)
{
    if (first < -1 || first >= e->c.layers)
        return lab_fail(MHA_ERR_INVALID_ARG, "block %lld: the model has %lld", (long long)first,
                        (long long)e->c.layers);
    return run_blocks(ctx, e, ids, lengths, B, T, first, states, NULL);
}

void lab_encoder_pool(const float *hidden, const int64_t *lengths, int64_t B, int64_t T, int64_t E, float *out)
{
    for (int64_t b = 0; b < B; b++) {
        double norm = 0;
        for (int64_t i = 0; i < E; i++) {
            double s = 0;
            for (int64_t t = 0; t < lengths[b]; t++) s += hidden[(b * T + t) * E + i];
            out[b * E + i] = (float)(s / (double)lengths[b]);
            norm += (double)out[b * E + i] * out[b * E + i];
        }
        double scale = 1.0 / fmax(sqrt(norm), 1e-12); /* torch.nn.functional.normalize's floor */
        for (int64_t i = 0; i < E; i++) out[b * E + i] = (float)(out[b * E + i] * scale);
    }
}

/* Only the blocks whose heads change get a new output projection. */
mha_status lab_encoder_keep_heads(lab_encoder *e, const uint8_t *keep)
{
    int64_t E = e->c.embed_dim, H = e->c.heads, d = E / H;
    float *w = malloc((size_t)(E * E) * sizeof(float));
    if (!w) return MHA_ERR_NOMEM;
    mha_status st = MHA_OK;
    for (int64_t l = 0; l < e->c.layers && st == MHA_OK; l++) {
        bool same = true;
        for (int64_t h = 0; h < H; h++) same = same && !keep[l * H + h] == !e->kept[l * H + h];
        if (same) continue;
        /* W_O [E, E]: head h feeds columns h d .. (h+1) d - 1. */
        for (int64_t r = 0; r < E; r++)
            for (int64_t c = 0; c < E; c++) w[r * E + c] = keep[l * H + c / d] ? e->blocks[l].w_out[r * E + c] : 0.0f;
        st = mha_layer_set_weight(e->blocks[l].attn, "attention.output.dense.weight", w, E * E);
        for (int64_t h = 0; h < H && st == MHA_OK; h++) e->kept[l * H + h] = keep[l * H + h] != 0;
    }
    free(w);
    return st == MHA_OK ? MHA_OK : lab_fail_mha(st, "pruning heads");
}
