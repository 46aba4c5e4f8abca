/*
 * model.c -- the lab's attention-only transformer, trained with the
 * library's own gradients.
 *
 * Forward, for tokens [B, T]:
 *   x_0     = tok_emb[token] + pos_emb[t]
 *   x_{l+1} = x_l + MHA_l(x_l)               causal self-attention (libmha)
 *   logits  = x_L W_U^T,  loss = mean next-token cross-entropy
 * Backward runs the same steps in reverse: dlogits = softmax - onehot,
 * dW_U and dx_L from it, then every layer's mha_layer_backward, which adds
 * its input gradient onto the residual's (dx_l = dx_{l+1} + dMHA/dx_l),
 * and finally the embeddings' rows.  Only the public API of libmha is
 * used.
 */
#include "lab.h"

#ifndef M_PI
#define M_PI 3.14159265358979323846
#endif

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* One trainable array with its AdamW moments. */
typedef struct lab_param {
    float *value, *grad;
    float *m, *v;
    int64_t n;
    bool decay; /* weight decay applies (matrices) */
} lab_param;

enum { MAX_PARAMS = 3 + 8 * 16 };

struct lab_model {
    lab_config c;
    float *tok, *pos, *unemb; /* [V, E], [T, E], [V, E] */
    float *g_tok, *g_pos, *g_unemb;
    mha_layer **layers;
    mha_layer_tape **tapes;
    lab_param params[MAX_PARAMS];
    int n_params;
    int64_t step;
    int64_t capacity;            /* sequences the buffers hold */
    float *xs, *dx, *logits, *y; /* [layers + 1][B T E], [2][B T E], [B T V], [B T E] */
    float **saved_wo;            /* the trained W_o of each layer, once heads are pruned */
    /* Pre-norm blocks (config.mlp): per layer ln1 (g, b), ln2 (g, b), W1 [F, E],
     * b1 [F], W2 [E, F], b2 [E] with F = 4E, then the final norm (g, b). */
    float *mlp, *g_mlp;                          /* values and gradients, layer after layer, final norm last */
    float *hs, *x1s, *gs, *us, *vs, *stats, *yf; /* saved for backward; stats: mean, rstd of each norm */
};

typedef struct block_view {
    float *ln1_g, *ln1_b, *ln2_g, *ln2_b, *w1, *b1, *w2, *b2;
} block_view;

static int64_t block_floats(int64_t E) { return 4 * E + 4 * E * E + 4 * E + 4 * E * E + E; }

static block_view block_at(float *base, int64_t l, int64_t E)
{
    float *p = base + l * block_floats(E);
    block_view v = {p, p + E, p + 2 * E, p + 3 * E, p + 4 * E, 0, 0, 0};
    v.b1 = v.w1 + 4 * E * E;
    v.w2 = v.b1 + 4 * E;
    v.b2 = v.w2 + 4 * E * E;
    return v;
}

/* ---- setup -------------------------------------------------------- */

static float gaussian(uint64_t *s)
{
    double sum = 0;
    for (int i = 0; i < 4; i++) { /* sum of 4 uniforms: near normal, variance 1 after scaling */
        *s ^= *s << 13, *s ^= *s >> 7, *s ^= *s << 17;
        sum += (double)(*s >> 11) * 0x1p-53 - 0.5;
    }
    return (float)(sum * sqrt(3.0));
}

static void fill_gaussian(float *x, int64_t n, double std, uint64_t *s)
{
    for (int64_t i = 0; i < n; i++) x[i] = (float)(std * gaussian(s));
}

static mha_status add_param(lab_model *m, float *value, float *grad, int64_t n, bool decay)
{
    if (m->n_params >= MAX_PARAMS) return MHA_ERR_INVALID_ARG;
    lab_param *p = &m->params[m->n_params++];
    *p = (lab_param){value, grad, calloc((size_t)n, sizeof(float)), calloc((size_t)n, sizeof(float)), n, decay};
    return p->m && p->v ? MHA_OK : MHA_ERR_NOMEM;
}

static mha_status create_layers(lab_model *m, uint64_t *seed)
{
    const lab_config *c = &m->c;
    for (int64_t l = 0; l < c->layers; l++) {
        mha_layer_desc d;
        mha_layer_desc_init(&d);
        d.embed_dim = c->embed_dim;
        d.num_heads = c->heads;
        d.num_kv_heads = c->kv_heads;
        mha_status st;
        if ((st = mha_layer_create(&d, &m->layers[l])) != MHA_OK ||
            (st = mha_layer_train_init(m->layers[l])) != MHA_OK || (st = mha_layer_tape_create(&m->tapes[l])) != MHA_OK)
            return st;
        mha_param p[8];
        int64_t n = mha_layer_params(m->layers[l], p, 8);
        for (int64_t i = 0; i < n; i++) {
            bool matrix = p[i].rank == 2;
            fill_gaussian(p[i].value, p[i].numel, matrix ? 1.0 / sqrt((double)c->embed_dim) : 0.0, seed);
            if ((st = add_param(m, p[i].value, p[i].grad, p[i].numel, matrix)) != MHA_OK) return st;
        }
        if ((st = mha_layer_params_changed(m->layers[l])) != MHA_OK) return st;
    }
    return MHA_OK;
}

/* Norm gains 1, biases 0, W1 and W2 ~ N(0, 1/fan_in). */
static mha_status create_mlp(lab_model *m, uint64_t *seed)
{
    int64_t E = m->c.embed_dim, per = block_floats(E), n = m->c.layers * per + 2 * E;
    m->mlp = calloc((size_t)n, sizeof(float));
    m->g_mlp = calloc((size_t)n, sizeof(float));
    if (!m->mlp || !m->g_mlp) return MHA_ERR_NOMEM;
    mha_status st = MHA_OK;
    for (int64_t l = 0; l <= m->c.layers && st == MHA_OK; l++) {
        float *v = m->mlp + l * per, *g = m->g_mlp + l * per;
        if (l == m->c.layers) { /* the final norm */
            for (int64_t e = 0; e < E; e++) v[e] = 1.0f;
            st = add_param(m, v, g, 2 * E, false);
            break;
        }
        block_view b = block_at(m->mlp, l, E), gb = block_at(m->g_mlp, l, E);
        for (int64_t e = 0; e < E; e++) b.ln1_g[e] = b.ln2_g[e] = 1.0f;
        fill_gaussian(b.w1, 4 * E * E, 1.0 / sqrt((double)E), seed);
        fill_gaussian(b.w2, 4 * E * E, 1.0 / sqrt(4.0 * (double)E), seed);
        if ((st = add_param(m, b.ln1_g, gb.ln1_g, 4 * E, false)) == MHA_OK &&
            (st = add_param(m, b.w1, gb.w1, 4 * E * E, true)) == MHA_OK &&
            (st = add_param(m, b.b1, gb.b1, 4 * E, false)) == MHA_OK &&
            (st = add_param(m, b.w2, gb.w2, 4 * E * E, true)) == MHA_OK)
            st = add_param(m, b.b2, gb.b2, E, false);
    }
    return st;
}

mha_status lab_model_create(const lab_config *config, lab_model **out)
{
    const lab_config *c = config;
    *out = NULL;
    if (c->vocab < 2 || c->context < 2 || c->embed_dim < 1 || c->layers < 1 || c->layers > 16 || c->heads < 1 ||
        c->mlp < 0 || c->mlp > 1 || c->tied < 0 || c->tied > 1)
        return MHA_ERR_INVALID_ARG;
    lab_model *m = calloc(1, sizeof *m);
    if (!m) return MHA_ERR_NOMEM;
    m->c = *c;
    int64_t V = c->vocab, T = c->context, E = c->embed_dim;
    m->tok = malloc((size_t)(V * E) * sizeof(float));
    m->pos = malloc((size_t)(T * E) * sizeof(float));
    m->unemb = malloc((size_t)(V * E) * sizeof(float));
    m->g_tok = calloc((size_t)(V * E), sizeof(float));
    m->g_pos = calloc((size_t)(T * E), sizeof(float));
    m->g_unemb = calloc((size_t)(V * E), sizeof(float));
    m->layers = calloc((size_t)c->layers, sizeof *m->layers);
    m->tapes = calloc((size_t)c->layers, sizeof *m->tapes);
    mha_status st = m->tok && m->pos && m->unemb && m->g_tok && m->g_pos && m->g_unemb && m->layers && m->tapes
                        ? MHA_OK
                        : MHA_ERR_NOMEM;
    uint64_t seed = c->seed * 0x9e3779b97f4a7c15u + 0x2545f4914f6cdd1du;
    if (st == MHA_OK) {
        fill_gaussian(m->tok, V * E, 1.0, &seed);
        fill_gaussian(m->pos, T * E, 1.0, &seed);
        fill_gaussian(m->unemb, V * E, 1.0 / sqrt((double)E), &seed);
        if ((st = add_param(m, m->tok, m->g_tok, V * E, false)) == MHA_OK &&
            (st = add_param(m, m->pos, m->g_pos, T * E, false)) == MHA_OK && !c->tied)
            st = add_param(m, m->unemb, m->g_unemb, V * E, true);
    }
    if (st == MHA_OK) st = create_layers(m, &seed);
    if (st == MHA_OK && c->mlp) st = create_mlp(m, &seed);
    if (st != MHA_OK) {
        lab_model_free(m);
        return st;
    }
    *out = m;
    return MHA_OK;
}

void lab_model_free(lab_model *m)
{
    if (!m) return;
    for (int64_t l = 0; m->layers && l < m->c.layers; l++) {
        mha_layer_free(m->layers[l]);
        mha_layer_tape_free(m->tapes[l]);
    }
    for (int i = 0; i < m->n_params; i++) free(m->params[i].m), free(m->params[i].v);
    for (int64_t l = 0; m->saved_wo && l < m->c.layers; l++) free(m->saved_wo[l]);
    free(m->saved_wo);
    void *owned[] = {m->tok,   m->pos, m->unemb, m->g_tok,  m->g_pos, m->g_unemb, m->layers,
                     m->tapes, m->xs,  m->dx,    m->logits, m->y,     m->mlp,     m->g_mlp,
                     m->hs,    m->x1s, m->gs,    m->us,     m->vs,    m->stats,   m->yf};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) free(owned[i]);
    free(m);
}

const lab_config *lab_model_config(const lab_model *m) { return &m->c; }

mha_layer *lab_model_layer(lab_model *m, int64_t l) { return m->layers[l]; }

/* ---- forward and backward ----------------------------------------- */

static mha_status ensure_buffers(lab_model *m, int64_t B)
{
    if (B <= m->capacity) return MHA_OK;
    int64_t rows = B * m->c.context, E = m->c.embed_dim;
    free(m->xs), free(m->dx), free(m->logits), free(m->y);
    m->xs = malloc((size_t)((m->c.layers + 1) * rows * E) * sizeof(float));
    m->dx = malloc((size_t)(3 * rows * 4 * E) * sizeof(float));
    m->logits = malloc((size_t)(rows * m->c.vocab) * sizeof(float));
    m->y = malloc((size_t)(rows * E) * sizeof(float));
    bool ok = m->xs && m->dx && m->logits && m->y;
    if (m->c.mlp) {
        int64_t L = m->c.layers;
        free(m->hs), free(m->x1s), free(m->gs), free(m->us), free(m->vs), free(m->stats), free(m->yf);
        m->hs = malloc((size_t)(L * rows * E) * sizeof(float));
        m->x1s = malloc((size_t)(L * rows * E) * sizeof(float));
        m->gs = malloc((size_t)(L * rows * E) * sizeof(float));
        m->us = malloc((size_t)(L * rows * 4 * E) * sizeof(float));
        m->vs = malloc((size_t)(L * rows * 4 * E) * sizeof(float));
        m->stats = malloc((size_t)((2 * L + 1) * 2 * rows) * sizeof(float));
        m->yf = malloc((size_t)(rows * E) * sizeof(float));
        ok = ok && m->hs && m->x1s && m->gs && m->us && m->vs && m->stats && m->yf;
    }
    m->capacity = ok ? B : 0;
    return m->capacity ? MHA_OK : MHA_ERR_NOMEM;
}

/* ---- the pieces of a pre-norm block --------------------------------- */

/* GPT-2's layer norm epsilon. */
static void layer_norm(const float *x, const float *g, const float *b, int64_t rows, int64_t E, float *y, float *mean,
                       float *rstd)
{
    lab_layer_norm(x, g, b, rows, E, 1e-5, y, mean, rstd);
}

/* dx += the norm's input gradient for dy; dg, db += its parameters'. */
static void layer_norm_backward(const float *dy, const float *x, const float *g, const float *mean, const float *rstd,
                                int64_t rows, int64_t E, float *dx, float *dg, float *db)
{
    for (int64_t r = 0; r < rows; r++) {
        double s1 = 0, s2 = 0;
        for (int64_t e = 0; e < E; e++) {
            double xh = (x[r * E + e] - mean[r]) * rstd[r], d = dy[r * E + e] * g[e];
            dg[e] += (float)(dy[r * E + e] * xh);
            db[e] += dy[r * E + e];
            s1 += d, s2 += d * xh;
        }
        for (int64_t e = 0; e < E; e++) {
            double xh = (x[r * E + e] - mean[r]) * rstd[r], d = dy[r * E + e] * g[e];
            dx[r * E + e] += (float)(rstd[r] * (d - s1 / (double)E - xh * s2 / (double)E));
        }
    }
}

/* GELU, the tanh form GPT-2 uses, and its derivative.  tanh z is taken
 * as 1 - 2 / (e^{2z} + 1) in float: exact enough for training and several
 * times faster than libm's double tanh, which dominated an MLP step. */
static const float GELU_K = 0.7978845608f; /* sqrt(2 / pi) */

static float gelu_tanh(float u) { return 1.0f - 2.0f / (expf(2.0f * GELU_K * (u + 0.044715f * u * u * u)) + 1.0f); }

static float gelu(float u) { return 0.5f * u * (1.0f + gelu_tanh(u)); }

static float gelu_grad(float u)
{
    float t = gelu_tanh(u);
    return 0.5f * (1.0f + t) + 0.5f * u * (1.0f - t * t) * GELU_K * (1.0f + 3.0f * 0.044715f * u * u);
}

static float *stat_at(const lab_model *m, int64_t norm, int64_t rows) { return m->stats + norm * 2 * rows; }

/* ---- the blocks ---------------------------------------------------- */

/* Attention of layer l over `in` (x_l, or LN1(x_l) in a pre-norm block)
 * into m->y; the per-head weights into attn if asked. */
static mha_status attention(mha_ctx *ctx, lab_model *m, int64_t l, int64_t B, const float *in, bool record, float *attn)
{
    int64_t T = m->c.context, E = m->c.embed_dim;
    mha_layer_fwd_args a;
    mha_layer_fwd_args_init(&a);
    a.query = a.key = a.value = mha_tensor_3d((float *)in, B, T, E);
    a.causal = MHA_CAUSAL_TOP_LEFT;
    a.average_attn_weights = 0;
    a.tape = record ? m->tapes[l] : NULL;
    mha_tensor y = mha_tensor_3d(m->y, B, T, E), w = mha_tensor_4d(attn, B, m->c.heads, T, T);
    return mha_layer_forward(ctx, m->layers[l], &y, attn ? &w : NULL, &a);
}

static mha_status layer_forward(mha_ctx *ctx, lab_model *m, int64_t l, int64_t B, bool record, float *attn)
{
    int64_t rows = B * m->c.context, E = m->c.embed_dim, n = rows * E, F = 4 * E;
    float *x = m->xs + l * n, *next = x + n;
    if (!m->c.mlp) {
        mha_status st = attention(ctx, m, l, B, x, record, attn);
        for (int64_t i = 0; st == MHA_OK && i < n; i++) next[i] = x[i] + m->y[i];
        return st;
    }
    block_view b = block_at(m->mlp, l, E);
    float *h = m->hs + l * n, *x1 = m->x1s + l * n, *g = m->gs + l * n, *u = m->us + l * rows * F,
          *v = m->vs + l * rows * F;
    float *s1 = stat_at(m, 2 * l, rows), *s2 = stat_at(m, 2 * l + 1, rows);
    layer_norm(x, b.ln1_g, b.ln1_b, rows, E, h, s1, s1 + rows);
    mha_status st = attention(ctx, m, l, B, h, record, attn);
    if (st != MHA_OK) return st;
    for (int64_t i = 0; i < n; i++) x1[i] = x[i] + m->y[i];
    layer_norm(x1, b.ln2_g, b.ln2_b, rows, E, g, s2, s2 + rows);
    st = mha_linear(ctx, g, b.w1, b.b1, u, rows, E, F);
    for (int64_t i = 0; st == MHA_OK && i < rows * F; i++) v[i] = gelu(u[i]);
    if (st == MHA_OK) st = mha_linear(ctx, v, b.w2, b.b2, m->y, rows, F, E);
    for (int64_t i = 0; st == MHA_OK && i < n; i++) next[i] = x1[i] + m->y[i];
    return st;
}

/* The attention's backward for dy, adding its input gradient into gin. */
static mha_status attention_backward(mha_ctx *ctx, lab_model *m, int64_t l, int64_t B, const float *in, float *dy,
                                     float *gin)
{
    int64_t T = m->c.context, E = m->c.embed_dim;
    mha_layer_zero_grad_deferred(m->layers[l]); /* the backward writes them: no pass to zero them first */
    mha_layer_fwd_args a;
    mha_layer_fwd_args_init(&a);
    a.query = a.key = a.value = mha_tensor_3d((float *)in, B, T, E);
    a.causal = MHA_CAUSAL_TOP_LEFT;
    a.tape = m->tapes[l];
    mha_tensor tdy = mha_tensor_3d(dy, B, T, E), g = mha_tensor_3d(gin, B, T, E);
    return mha_layer_backward(ctx, m->layers[l], &a, &tdy, &g, &g, &g);
}

/* dx: the gradient at x_{l+1} in, at x_l out; work: 2 rows x 4E floats. */
static mha_status layer_backward(mha_ctx *ctx, lab_model *m, int64_t l, int64_t B, float *dx, float *work)
{
    int64_t rows = B * m->c.context, E = m->c.embed_dim, n = rows * E, F = 4 * E;
    float *x = m->xs + l * n;
    if (!m->c.mlp) { /* dx_l = dx_{l+1} + dMHA: the layer adds its input gradient onto the residual's */
        memcpy(work, dx, (size_t)n * sizeof(float));
        mha_status st = attention_backward(ctx, m, l, B, x, work, dx);
        return st;
    }
    block_view b = block_at(m->mlp, l, E), gb = block_at(m->g_mlp, l, E);
    float *h = m->hs + l * n, *x1 = m->x1s + l * n, *g = m->gs + l * n, *u = m->us + l * rows * F,
          *v = m->vs + l * rows * F;
    float *s1 = stat_at(m, 2 * l, rows), *s2 = stat_at(m, 2 * l + 1, rows);
    float *dv = work, *dg = work + rows * F; /* dg and dh share the second half */
    /* dx is dm, the MLP's output gradient */
    mha_status st = mha_linear_backward(ctx, dx, v, b.w2, dv, gb.w2, gb.b2, rows, F, E);
    for (int64_t i = 0; st == MHA_OK && i < rows * F; i++) dv[i] *= gelu_grad(u[i]); /* now du */
    if (st == MHA_OK) st = mha_linear_backward(ctx, dv, g, b.w1, dg, gb.w1, gb.b1, rows, E, F);
    if (st != MHA_OK) return st;
    layer_norm_backward(dg, x1, b.ln2_g, s2, s2 + rows, rows, E, dx, gb.ln2_g, gb.ln2_b); /* dx is now dx1 */
    float *dh = dg;
    memset(dh, 0, (size_t)n * sizeof(float));
    st = attention_backward(ctx, m, l, B, h, dx, dh);
    if (st == MHA_OK) layer_norm_backward(dh, x, b.ln1_g, s1, s1 + rows, rows, E, dx, gb.ln1_g, gb.ln1_b);
    return st;
}

/* The unembedding: the token embedding itself when tied. */
static const float *unembedding(const lab_model *m) { return m->c.tied ? m->tok : m->unemb; }

/* logits = y W_U^T, and *mean the mean cross-entropy of the next tokens;
 * with dlogits, its gradient (softmax - onehot) / count. */
static mha_status unembed_loss(mha_ctx *ctx, lab_model *m, const float *y, const int32_t *tokens, int64_t B,
                               float *dlogits, double *mean)
{
    int64_t T = m->c.context, E = m->c.embed_dim, V = m->c.vocab, rows = B * T;
    double loss = 0, count = (double)(B * (T - 1));
    mha_status st = mha_linear(ctx, y, unembedding(m), NULL, m->logits, rows, E, V);
    if (st != MHA_OK) return st;
    for (int64_t r = 0; r < rows; r++) {
        const float *lg = m->logits + r * V;
        if (r % T == T - 1) { /* no next token */
            if (dlogits) memset(dlogits + r * V, 0, (size_t)V * sizeof(float));
            continue;
        }
        double max = lg[0], sum = 0;
        for (int64_t v = 1; v < V; v++) max = lg[v] > max ? lg[v] : max;
        for (int64_t v = 0; v < V; v++) sum += exp(lg[v] - max);
        int32_t target = tokens[r + 1];
        loss += max + log(sum) - lg[target];
        for (int64_t v = 0; dlogits && v < V; v++)
            dlogits[r * V + v] = (float)((exp(lg[v] - max) / sum - (v == target)) / count);
    }
    *mean = loss / count;
    return MHA_OK;
}

static mha_status backward(mha_ctx *ctx, lab_model *m, const int32_t *tokens, int64_t B, const float *y,
                           const float *dlogits)
{
    int64_t T = m->c.context, E = m->c.embed_dim, V = m->c.vocab, rows = B * T, n = rows * E, L = m->c.layers;
    memset(m->g_unemb, 0, (size_t)(V * E) * sizeof(float));
    memset(m->g_tok, 0, (size_t)(V * E) * sizeof(float));
    memset(m->g_pos, 0, (size_t)(T * E) * sizeof(float));
    if (m->c.mlp) memset(m->g_mlp, 0, (size_t)(L * block_floats(E) + 2 * E) * sizeof(float));
    float *dx = m->dx, *work = m->dx + n;
    mha_status st =
        mha_linear_backward(ctx, dlogits, y, unembedding(m), dx, m->c.tied ? m->g_tok : m->g_unemb, NULL, rows, E, V);
    if (st != MHA_OK) return st;
    if (m->c.mlp) { /* through the final norm */
        float *dy = work, *gf = m->g_mlp + L * block_floats(E), *vf = m->mlp + L * block_floats(E);
        float *sf = stat_at(m, 2 * L, rows);
        memcpy(dy, dx, (size_t)n * sizeof(float));
        memset(dx, 0, (size_t)n * sizeof(float));
        layer_norm_backward(dy, m->xs + L * n, vf, sf, sf + rows, rows, E, dx, gf, gf + E);
    }
    for (int64_t l = L - 1; l >= 0 && st == MHA_OK; l--) st = layer_backward(ctx, m, l, B, dx, work);
    if (st != MHA_OK) return st;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t e = 0; e < E; e++) {
            m->g_tok[tokens[r] * E + e] += dx[r * E + e];
            m->g_pos[(r % T) * E + e] += dx[r * E + e];
        }
    return MHA_OK;
}

mha_status lab_model_loss(mha_ctx *ctx, lab_model *m, const int32_t *tokens, int64_t B, int do_backward, float *attn,
                          double *loss)
{
    int64_t T = m->c.context, E = m->c.embed_dim, V = m->c.vocab, rows = B * T, L = m->c.layers;
    mha_status st = ensure_buffers(m, B);
    if (st != MHA_OK) return st;
    for (int64_t r = 0; r < rows; r++) {
        if (tokens[r] < 0 || tokens[r] >= V) return MHA_ERR_INVALID_ARG;
        for (int64_t e = 0; e < E; e++) m->xs[r * E + e] = m->tok[tokens[r] * E + e] + m->pos[(r % T) * E + e];
    }
    int64_t maps = B * m->c.heads * T * T;
    for (int64_t l = 0; l < L && st == MHA_OK; l++)
        st = layer_forward(ctx, m, l, B, do_backward, attn ? attn + l * maps : NULL);
    if (st != MHA_OK) return st;
    const float *y = m->xs + L * rows * E;
    if (m->c.mlp) { /* the final norm */
        float *vf = m->mlp + L * block_floats(E), *sf = stat_at(m, 2 * L, rows);
        layer_norm(y, vf, vf + E, rows, E, m->yf, sf, sf + rows);
        y = m->yf;
    }
    float *dlogits = do_backward ? malloc((size_t)(rows * V) * sizeof(float)) : NULL;
    if (do_backward && !dlogits) return MHA_ERR_NOMEM;
    st = unembed_loss(ctx, m, y, tokens, B, dlogits, loss);
    if (st == MHA_OK && do_backward) st = backward(ctx, m, tokens, B, y, dlogits);
    free(dlogits);
    return st;
}

int lab_model_param_count(const lab_model *m) { return m->n_params; }

float *lab_model_param(lab_model *m, int i, float **grad, int64_t *n)
{
    if (i < 0 || i >= m->n_params) return NULL;
    if (grad) *grad = m->params[i].grad;
    if (n) *n = m->params[i].n;
    return m->params[i].value;
}

mha_status lab_model_params_changed(lab_model *m)
{
    mha_status st = MHA_OK;
    for (int64_t l = 0; l < m->c.layers && st == MHA_OK; l++) st = mha_layer_params_changed(m->layers[l]);
    return st;
}

mha_status lab_model_adamw(lab_model *m, double lr, double wd)
{
    const double b1 = 0.9, b2 = 0.98, eps = 1e-8;
    m->step++;
    double c1 = 1 - pow(b1, (double)m->step), c2 = 1 - pow(b2, (double)m->step);
    for (int i = 0; i < m->n_params; i++) {
        lab_param *p = &m->params[i];
        for (int64_t k = 0; k < p->n; k++) {
            double g = p->grad[k];
            p->m[k] = (float)(b1 * p->m[k] + (1 - b1) * g);
            p->v[k] = (float)(b2 * p->v[k] + (1 - b2) * g * g);
            double update = (p->m[k] / c1) / (sqrt(p->v[k] / c2) + eps);
            p->value[k] = (float)(p->value[k] - lr * (update + (p->decay ? wd * p->value[k] : 0.0)));
        }
    }
    return lab_model_params_changed(m);
}

/* ---- pruning ------------------------------------------------------- */

/* The layer's W_o: value, gradient, and its [E, h d] shape. */
static float *output_matrix(lab_model *m, int64_t l, float **grad, int64_t *cols)
{
    mha_param p[8];
    int64_t n = mha_layer_params(m->layers[l], p, 8);
    for (int64_t i = 0; i < n; i++)
        if (strcmp(p[i].name, "out_proj.weight") == 0 || strcmp(p[i].name, "o_proj.weight") == 0) {
            if (grad) *grad = p[i].grad;
            *cols = p[i].shape[1];
            return p[i].value;
        }
    return NULL;
}

mha_status lab_head_importance(mha_ctx *ctx, lab_model *m, const int32_t *tokens, int64_t B, int64_t batches,
                               double *importance)
{
    int64_t H = m->c.heads, E = m->c.embed_dim;
    memset(importance, 0, (size_t)(m->c.layers * H) * sizeof *importance);
    for (int64_t k = 0; k < batches; k++) {
        double loss;
        mha_status st = lab_model_loss(ctx, m, tokens + k * B * m->c.context, B, 1, NULL, &loss);
        if (st != MHA_OK) return st;
        for (int64_t l = 0; l < m->c.layers; l++) {
            float *g;
            int64_t cols;
            const float *w = output_matrix(m, l, &g, &cols);
            int64_t d = cols / H;
            for (int64_t h = 0; h < H; h++) {
                double dxi = 0;
                for (int64_t e = 0; e < E; e++)
                    for (int64_t c = h * d; c < (h + 1) * d; c++) dxi += (double)w[e * cols + c] * g[e * cols + c];
                importance[l * H + h] += fabs(dxi) / (double)batches;
            }
        }
    }
    return MHA_OK;
}

mha_status lab_model_keep_heads(lab_model *m, const uint8_t *keep)
{
    int64_t H = m->c.heads, E = m->c.embed_dim;
    for (int64_t l = 0; l < m->c.layers; l++) {
        int64_t cols;
        float *w = output_matrix(m, l, NULL, &cols);
        if (!m->saved_wo) {
            m->saved_wo = calloc((size_t)m->c.layers, sizeof *m->saved_wo);
            if (!m->saved_wo) return MHA_ERR_NOMEM;
        }
        if (!m->saved_wo[l]) { /* the trained values, kept from the first pruning on */
            m->saved_wo[l] = malloc((size_t)(E * cols) * sizeof(float));
            if (!m->saved_wo[l]) return MHA_ERR_NOMEM;
            memcpy(m->saved_wo[l], w, (size_t)(E * cols) * sizeof(float));
        }
        int64_t d = cols / H;
        for (int64_t e = 0; e < E; e++)
            for (int64_t c = 0; c < cols; c++)
                w[e * cols + c] = keep[l * H + c / d] ? m->saved_wo[l][e * cols + c] : 0.0f;
    }
    return lab_model_params_changed(m);
}

/* ---- checkpoints --------------------------------------------------- */

int64_t lab_model_steps(const lab_model *m) { return m->step; }

mha_status lab_model_save(const lab_model *m, const char *path)
{
    mha_st_writer *w = NULL;
    mha_status st = mha_st_writer_create(&w);
    char name[96], text[256];
    for (int i = 0; st == MHA_OK && i < m->n_params; i++) {
        const lab_param *p = &m->params[i];
        int64_t shape[1] = {p->n};
        static const char *const parts[3] = {"value", "adam_m", "adam_v"};
        const float *data[3] = {p->value, p->m, p->v};
        for (int k = 0; k < 3 && st == MHA_OK; k++) {
            snprintf(name, sizeof name, "param.%03d.%s", i, parts[k]);
            st = mha_st_writer_add(w, name, MHA_DTYPE_F32, 1, shape, data[k]);
        }
    }
    snprintf(text, sizeof text, "%lld %lld %lld %lld %lld %lld %llu %lld %d %d", (long long)m->c.vocab,
             (long long)m->c.context, (long long)m->c.embed_dim, (long long)m->c.layers, (long long)m->c.heads,
             (long long)m->c.kv_heads, (unsigned long long)m->c.seed, (long long)m->step, m->c.mlp, m->c.tied);
    if (st == MHA_OK) st = mha_st_writer_set_metadata(w, "lab_config", text);
    if (st == MHA_OK) st = mha_st_writer_save(w, path);
    mha_st_writer_free(w);
    return st;
}

mha_status lab_model_load(const char *path, lab_model **out)
{
    *out = NULL;
    mha_st_file *f = NULL;
    mha_status st = mha_st_open(path, &f);
    if (st != MHA_OK) return st;
    const char *text = mha_st_metadata(f, "lab_config");
    lab_config c;
    long long v[8];
    unsigned long long seed;
    int mlp, tied;
    if (!text || sscanf(text, "%lld %lld %lld %lld %lld %lld %llu %lld %d %d", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                        &seed, &v[7], &mlp, &tied) != 10) {
        mha_st_close(f);
        return MHA_ERR_CORRUPT;
    }
    c = (lab_config){v[0], v[1], v[2], v[3], v[4], v[5], seed, mlp, tied};
    lab_model *m = NULL;
    st = lab_model_create(&c, &m);
    char name[96];
    for (int i = 0; st == MHA_OK && i < m->n_params; i++) {
        lab_param *p = &m->params[i];
        static const char *const parts[3] = {"value", "adam_m", "adam_v"};
        float *data[3] = {p->value, p->m, p->v};
        for (int k = 0; k < 3 && st == MHA_OK; k++) {
            snprintf(name, sizeof name, "param.%03d.%s", i, parts[k]);
            st = mha_st_read_f32(f, name, data[k], p->n);
        }
    }
    mha_st_close(f);
    if (st == MHA_OK) st = lab_model_params_changed(m);
    if (st != MHA_OK) {
        lab_model_free(m);
        return st;
    }
    m->step = v[7];
    *out = m;
    return MHA_OK;
}
