/*
 * kvcache.c -- the KV cache and the layer's decoding step.
 *
 * The cache keeps, per sequence and kv head, `capacity` rows of head_dim
 * keys and values, [batch][g][capacity][d], so one head's keys are one
 * contiguous run that decoding streams through.  A step:
 *   Q, K_new, V_new = projections of the n new rows      (the layer's GEMM)
 *   rotate Q and K_new at positions length ..             (rope.c)
 *   append K_new, V_new (rounded if the cache is bf16, quantised if int8)
 *   attention of the new rows over all length + n rows, bottom-right
 *   causal: flash.c's tiles for 16 or more rows (a prompt; a bf16 or
 *   int8 cache's key and value tiles widened to float32 as they are
 *   read), else decode.c's split-K (a token at a time)
 *
 * An int8 cache stores each row (one token of one kv head, K or V apart)
 * as head_dim integers q in [-127, 127] and one float scale = max |x| /
 * 127, x ~ scale * q: symmetric, so 0 stays exactly 0, and per row, so one
 * large token does not cost the others their precision.  Each element is
 * off by at most scale / 2 = max |x| / 254 (docs/NUMERICS.md bounds what
 * that does to the attention).
 *   out = heads W_o^T + b_o
 */
#include "core/convert.h"
#include "layer/layer.h"

#include <math.h>
#include <string.h>

enum { CACHE_MAGIC = 0x6d68616b /* "mhak" */ };

struct mha_kv_cache {
    uint32_t magic;
    int64_t batch, kv_heads, head_dim, capacity, length;
    mha_dtype dtype;          /* F32, BF16 or I8 */
    void *k, *v;              /* [batch][g][capacity][d] elements of dtype */
    float *k_scale, *v_scale; /* I8: [batch][g][capacity], one per row; else NULL */
    /* Each key row's squared norm as held (mha__norm2), [batch][g][capacity],
     * and the largest of rows [0, length) of each (b, g), [batch][g]: the
     * attention's wide rows (attention.h) without a pass over the keys. */
    double *k_norm2, *k_norm2_max;
    float *key_row; /* [d]: a key row widened for its norm (appends allocate nothing) */
};

static mha_status check_cache(const mha_kv_cache *c, const char *fn)
{
    if (!c || c->magic != CACHE_MAGIC) return mha__fail(MHA_ERR_MISUSE, "%s: not a live mha_kv_cache", fn);
    return MHA_OK;
}

mha_status mha_kv_cache_create(const mha_layer *layer, int64_t batch, int64_t capacity, mha_dtype dtype,
                               mha_kv_cache **cache)
{
    if (!cache) return mha__fail(MHA_ERR_MISUSE, "mha_kv_cache_create: NULL argument");
    *cache = NULL;
    mha_status st = mha__layer_check(layer, "mha_kv_cache_create");
    if (st != MHA_OK) return st;
    if (batch < 1 || capacity < 1)
        return mha__fail(MHA_ERR_INVALID_ARG, "batch and capacity must be positive, got %lld and %lld",
                         (long long)batch, (long long)capacity);
    if (dtype != MHA_DTYPE_F32 && dtype != MHA_DTYPE_BF16 && dtype != MHA_DTYPE_I8)
        return mha__fail(MHA_ERR_INVALID_ARG, "a KV cache stores F32, BF16 or I8, not %s", mha_dtype_name(dtype));
    int64_t n, rows, row_bytes, g = layer->desc.num_kv_heads; /* rows: one norm (and int8 scale) each */
    if (!mha__product((int64_t[]){batch, g, capacity, layer->head_dim, (int64_t)mha_dtype_size(dtype)}, 5, &n) ||
        !mha__product((int64_t[]){batch, g, capacity}, 3, &rows) ||
        !mha__mul(rows, (int64_t)sizeof(double), &row_bytes))
        return mha__fail(MHA_ERR_INVALID_ARG, "a cache of %lld tokens x %lld sequences overflows", (long long)capacity,
                         (long long)batch);
    mha_kv_cache *c = mha__calloc(1, sizeof *c);
    if (!c) return MHA_ERR_NOMEM;
    *c = (mha_kv_cache){.magic = CACHE_MAGIC,
                        .batch = batch,
                        .kv_heads = g,
                        .head_dim = layer->head_dim,
                        .capacity = capacity,
                        .dtype = dtype,
                        .k = mha__alloc(n, 1),
                        .v = mha__alloc(n, 1),
                        .k_norm2 = mha__alloc(rows, sizeof(double)),
                        .k_norm2_max = mha__calloc(batch * g, sizeof(double)),
                        .key_row = mha__alloc(layer->head_dim, sizeof(float))};
    bool scaled = dtype == MHA_DTYPE_I8;
    if (scaled) {
        c->k_scale = mha__alloc(rows, sizeof(float));
        c->v_scale = mha__alloc(rows, sizeof(float));
    }
    if (!c->k || !c->v || !c->k_norm2 || !c->k_norm2_max || !c->key_row || (scaled && (!c->k_scale || !c->v_scale))) {
        mha_kv_cache_free(c);
        return MHA_ERR_NOMEM;
    }
    *cache = c;
    return MHA_OK;
}

void mha_kv_cache_free(mha_kv_cache *c)
{
    if (!c) return;
    c->magic = 0;
    mha__free(c->k);
    mha__free(c->v);
    mha__free(c->k_scale);
    mha__free(c->v_scale);
    mha__free(c->k_norm2);
    mha__free(c->k_norm2_max);
    mha__free(c->key_row);
    mha__free(c);
}

int64_t mha_kv_cache_length(const mha_kv_cache *c)
{
    return check_cache(c, "mha_kv_cache_length") == MHA_OK ? c->length : -1;
}

int64_t mha_kv_cache_capacity(const mha_kv_cache *c)
{
    return check_cache(c, "mha_kv_cache_capacity") == MHA_OK ? c->capacity : -1;
}

/* The largest key norm of rows [0, length) of each (b, g), as
 * mha__keys_norm2_max finds it from the rows. */
static void find_norm2_max(mha_kv_cache *c)
{
    for (int64_t bg = 0; bg < c->batch * c->kv_heads; bg++) {
        const double *norm2 = c->k_norm2 + bg * c->capacity;
        double top = 0;
        for (int64_t j = 0; j < c->length; j++) top = mha__norm2_top(top, norm2[j]);
        c->k_norm2_max[bg] = top;
    }
}

/* Drops rows [length, c->length). */
static void shorten(mha_kv_cache *c, int64_t length)
{
    c->length = length;
    find_norm2_max(c);
}

void mha_kv_cache_reset(mha_kv_cache *c)
{
    if (check_cache(c, "mha_kv_cache_reset") == MHA_OK) shorten(c, 0);
}

mha_status mha_kv_cache_truncate(mha_kv_cache *c, int64_t length)
{
    mha_status st = check_cache(c, "mha_kv_cache_truncate");
    if (st != MHA_OK) return st;
    if (length < 0 || length > c->length)
        return mha__fail(MHA_ERR_INVALID_ARG, "cannot truncate a cache of %lld tokens to %lld", (long long)c->length,
                         (long long)length);
    shorten(c, length);
    return MHA_OK;
}

/* The cache's rows as the decode kernels read them. */
static mha__kv_view cache_view(const mha_kv_cache *c)
{
    int64_t d = c->head_dim;
    return (mha__kv_view){.k = c->k,
                          .v = c->v,
                          .dtype = c->dtype,
                          .k_scale = c->k_scale,
                          .v_scale = c->v_scale,
                          .stride = {c->kv_heads * c->capacity * d, c->capacity * d, d},
                          .scale_stride = {c->kv_heads * c->capacity, c->capacity},
                          .k_norm2_max = c->k_norm2_max};
}

/* One row of d values (stride apart) as int8 at dst; returns its scale.
 * A row holding an infinity or NaN gets scale NaN (its scores and
 * weights become NaN, as they would from the float values). */
static float quantize_row(const float *src, int64_t stride, int64_t d, int8_t *dst)
{
    float amax = 0.0f;
    for (int64_t e = 0; e < d; e++) {
        float a = fabsf(src[e * stride]);
        amax = isnan(a) || a > amax ? a : amax; /* a NaN sticks */
    }
    float scale = isfinite(amax) ? amax / 127.0f : NAN;
    if (!(scale > 0.0f)) { /* all zeros (or too small to scale), or not finite: zeros */
        for (int64_t e = 0; e < d; e++) dst[e] = 0;
        return scale;
    }
    for (int64_t e = 0; e < d; e++) {
        float q = nearbyintf(src[e * stride] / scale); /* |q| <= 127 but for rounding at the top */
        dst[e] = (int8_t)(q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q);
    }
    return scale;
}

/* Row (b, g, t) of x [batch, g, n, d] stored at element `at` of base,
 * with its scale at `scale` (int8 only). */
static void store_row(const mha_kv_cache *c, void *base, float *scale, int64_t at, const float *src, int64_t stride)
{
    int64_t d = c->head_dim;
    if (c->dtype == MHA_DTYPE_I8) {
        *scale = quantize_row(src, stride, d, (int8_t *)base + at);
        return;
    }
    for (int64_t e = 0; e < d; e++) {
        float value = src[e * stride];
        if (c->dtype == MHA_DTYPE_BF16) ((uint16_t *)base)[at + e] = mha__f32_to_bf16(value);
        else ((float *)base)[at + e] = value;
    }
}

/* Rows [length, length + n) of every (sequence, kv head) from x [batch, g, n, d]. */
static void store_rows(mha_kv_cache *c, void *dst_base, float *scales, const mha_tensor *x)
{
    mha__kv_view view = cache_view(c);
    int64_t n = x->shape[2];
    for (int64_t b = 0; b < c->batch; b++)
        for (int64_t g = 0; g < c->kv_heads; g++)
            for (int64_t t = 0, j = c->length; t < n; t++, j++) {
                int64_t at = b * view.stride[0] + g * view.stride[1] + j * view.stride[2];
                float *scale = scales ? scales + b * view.scale_stride[0] + g * view.scale_stride[1] + j : NULL;
                const float *src = x->data + b * x->stride[0] + g * x->stride[1] + t * x->stride[2];
                store_row(c, dst_base, scale, at, src, x->stride[3]);
            }
}

/* The norms of key rows [length, length + n), just stored, as the
 * attention would find them from the values held. */
static void keep_norms(mha_kv_cache *c, int64_t n)
{
    float *row = c->key_row;
    const mha__kernels *kt = mha__isa_get()->f32;
    mha__kv_view view = cache_view(c);
    for (int64_t b = 0; b < c->batch; b++)
        for (int64_t g = 0; g < c->kv_heads; g++) {
            int64_t bg = b * c->kv_heads + g;
            double *top = &c->k_norm2_max[bg];
            for (int64_t j = c->length; j < c->length + n; j++) {
                mha__kv_rows_widen(&view, false, b, g, j, 1, c->head_dim, row, c->head_dim, 1);
                double *v = &c->k_norm2[bg * c->capacity + j];
                mha__norms2(kt, row, c->head_dim, 1, 1, c->head_dim, v);
                *top = mha__norm2_top(*top, *v);
            }
        }
}

mha_status mha_kv_cache_append(mha_kv_cache *c, const mha_tensor *k, const mha_tensor *v)
{
    mha_status st = check_cache(c, "mha_kv_cache_append");
    if (st != MHA_OK) return st;
    if (!k || !v) return mha__fail(MHA_ERR_MISUSE, "mha_kv_cache_append: NULL argument");
    const int64_t shape[4] = {c->batch, c->kv_heads, -1, c->head_dim};
    if ((st = mha__check_tensor(k, "keys", shape)) != MHA_OK) return st;
    const int64_t v_shape[4] = {c->batch, c->kv_heads, k->shape[2], c->head_dim};
    if ((st = mha__check_tensor(v, "values", v_shape)) != MHA_OK) return st;
    if (k->shape[2] > c->capacity - c->length)
        return mha__fail(MHA_ERR_INVALID_ARG, "appending %lld tokens to a cache holding %lld of %lld overflows it",
                         (long long)k->shape[2], (long long)c->length, (long long)c->capacity);
    store_rows(c, c->k, c->k_scale, k);
    store_rows(c, c->v, c->v_scale, v);
    keep_norms(c, k->shape[2]);
    c->length += k->shape[2];
    return MHA_OK;
}

/* Tokens start .. of every (sequence, kv head), keys or values, into x. */
static void read_rows(const mha_kv_cache *c, bool values, int64_t start, mha_tensor *x)
{
    mha__kv_view view = cache_view(c);
    for (int64_t b = 0; b < c->batch; b++)
        for (int64_t g = 0; g < c->kv_heads; g++)
            mha__kv_rows_widen(&view, values, b, g, start, x->shape[2], c->head_dim,
                               x->data + b * x->stride[0] + g * x->stride[1], x->stride[2], x->stride[3]);
}

mha_status mha_kv_cache_read(const mha_kv_cache *c, int64_t start, mha_tensor *k, mha_tensor *v)
{
    mha_status st = check_cache(c, "mha_kv_cache_read");
    if (st != MHA_OK) return st;
    if (!k && !v) return mha__fail(MHA_ERR_MISUSE, "mha_kv_cache_read: no tensor to read into");
    int64_t n = (k ? k : v)->shape[2];
    const int64_t shape[4] = {c->batch, c->kv_heads, -1, c->head_dim};
    if (k && (st = mha__check_tensor(k, "keys", shape)) != MHA_OK) return st;
    const int64_t v_shape[4] = {c->batch, c->kv_heads, n, c->head_dim};
    if (v && (st = mha__check_tensor(v, "values", v_shape)) != MHA_OK) return st;
    if (start < 0 || n > c->length - start)
        return mha__fail(MHA_ERR_INVALID_ARG, "cannot read tokens %lld .. %lld of a cache holding %lld",
                         (long long)start, (long long)(start + n), (long long)c->length);
    if (k) read_rows(c, false, start, k);
    if (v) read_rows(c, true, start, v);
    return MHA_OK;
}

/* ---------------------------------------------------------------- */
/* The decoding step                                                 */
/* ---------------------------------------------------------------- */

/* A layer a decoding step can run: self-attention with nothing beside
 * the tokens' own keys. */
static mha_status check_step_layer(const mha_layer *l, const char *fn)
{
    mha_status st = mha__layer_check(l, fn);
    if (st != MHA_OK) return st;
    const mha_layer_desc *d = &l->desc;
    if (d->add_bias_kv || d->add_zero_attn)
        return mha__fail(MHA_ERR_INVALID_ARG, "decoding has no place for add_bias_kv/add_zero_attn rows in the cache");
    if (d->kdim != d->embed_dim || d->vdim != d->embed_dim)
        return mha__fail(MHA_ERR_INVALID_ARG, "decoding is self-attention: kdim and vdim must equal embed_dim");
    return MHA_OK;
}

static mha_status check_decode(const mha_layer *l, const mha_kv_cache *c, const mha_tensor *out, const mha_tensor *x)
{
    mha_status st = check_step_layer(l, "mha_layer_decode");
    if (st == MHA_OK) st = check_cache(c, "mha_layer_decode");
    if (st != MHA_OK) return st;
    if (!out || !x) return mha__fail(MHA_ERR_MISUSE, "mha_layer_decode: NULL argument");
    const mha_layer_desc *d = &l->desc;
    if (c->kv_heads != d->num_kv_heads || c->head_dim != l->head_dim)
        return mha__fail(MHA_ERR_INVALID_ARG, "the cache holds %lld kv heads of %lld, the layer has %lld of %lld",
                         (long long)c->kv_heads, (long long)c->head_dim, (long long)d->num_kv_heads,
                         (long long)l->head_dim);
    const int64_t x_shape[4] = {c->batch, -1, d->embed_dim, 1};
    if ((st = mha__check_tensor(x, "x", x_shape)) != MHA_OK) return st;
    const int64_t o_shape[4] = {c->batch, x->shape[1], d->embed_dim, 1};
    if ((st = mha__check_tensor(out, "out", o_shape)) != MHA_OK) return st;
    if (out->stride[2] != 1) return mha__fail(MHA_ERR_INVALID_ARG, "out's columns must be contiguous (stride 1)");
    if (x->shape[1] < 1) return mha__fail(MHA_ERR_INVALID_ARG, "x has no tokens");
    if (x->shape[1] > c->capacity - c->length)
        return mha__fail(MHA_ERR_INVALID_ARG, "%lld new tokens do not fit: the cache holds %lld of %lld",
                         (long long)x->shape[1], (long long)c->length, (long long)c->capacity);
    return MHA_OK;
}

/* The plan of one decoding step of n new rows. */
typedef struct decode_plan {
    mha__attn_plan attn;
    int64_t nq, nk;    /* floats: Q and the heads, K and V */
    int64_t workspace; /* bytes */
} decode_plan;

/* The attention a step runs (every decoding path's one statement of it):
 * the layer's scale, softcap, window and ALiBi, bottom-right causal. */
static void step_desc(const mha_layer *l, mha_attn_desc *desc)
{
    mha_attn_desc_init(desc);
    desc->causal = MHA_CAUSAL_BOTTOM_RIGHT;
    desc->window_left = l->desc.window_left;
    desc->window_right = l->desc.window_right;
    desc->softcap = l->desc.softcap;
    desc->alibi_slopes = l->alibi;
    desc->enable_gqa = l->desc.num_kv_heads != l->desc.num_heads;
}

/* The workspace of the step's projections and rotation of n new rows,
 * beside `own` bytes of its own buffers. */
static bool stage_workspace(const mha_ctx *ctx, const mha_layer *l, int64_t N, int64_t n, int64_t own, int64_t *bytes)
{
    int64_t gemm = 0, rope = 0;
    return mha__layer_rotate_workspace(l, n, n, &rope) && mha__layer_project_workspace(ctx, l, N, n, n, &gemm) &&
           mha__add(own, mha__max64(rope, gemm), bytes);
}

static mha_status plan_decode(const mha_ctx *ctx, const mha_layer *l, const mha_kv_cache *c, int64_t n, decode_plan *p)
{
    int64_t N = c->batch, hd = l->head_dim, own = 0, stages = 0;
    mha_attn_desc desc;
    step_desc(l, &desc); /* attention of the n new rows over all length + n rows */
    mha__attn_dims dims = {N, l->desc.num_heads, l->desc.num_kv_heads, n, c->length + n, hd, hd};
    mha_status st = mha__attn_problem(&desc, dims, &p->attn);
    if (st == MHA_OK)
        st = mha__attn_plan_resolve(&p->attn, ctx, (mha__attn_needs){.kv_rows = true, .kv_dtype = c->dtype});
    if (st != MHA_OK) return st;
    p->nq = N * n * l->qdim; /* bounded by x and the cache, both allocated */
    p->nk = N * n * l->kvdim;
    bool ok = mha__ws_add(&own, (2 * p->nq + 2 * p->nk) * (int64_t)sizeof(float), "the decoding step's rows") &&
              stage_workspace(ctx, l, N, n, 0, &stages);
    if (!ok || !mha__add(own, mha__max64(p->attn.workspace, stages), &p->workspace))
        return mha__fail(MHA_ERR_INVALID_ARG, "the decoding step's workspace overflows");
    return MHA_OK;
}

mha_status mha_layer_decode_workspace_size(const mha_ctx *ctx, const mha_layer *l, const mha_kv_cache *c,
                                           const mha_tensor *out, const mha_tensor *x, int64_t *bytes)
{
    if (!ctx || !bytes) return mha__fail(MHA_ERR_MISUSE, "mha_layer_decode_workspace_size: NULL argument");
    *bytes = 0;
    mha_status st = check_decode(l, c, out, x);
    decode_plan p;
    if (st == MHA_OK && (st = plan_decode(ctx, l, c, x->shape[1], &p)) == MHA_OK) *bytes = p.workspace;
    return st;
}

/* The cache's K and V as the attention reads them: the rows in place,
 * and for a float32 cache the same as tensors. */
static mha__kv cache_kv(const mha_kv_cache *c, int64_t S)
{
    mha__kv_view rows = cache_view(c);
    mha__kv kv = {.rows = rows};
    if (c->dtype == MHA_DTYPE_F32) {
        int64_t shape[4] = {c->batch, c->kv_heads, S, c->head_dim};
        kv.k = (mha_tensor){(float *)c->k,
                            {shape[0], shape[1], shape[2], shape[3]},
                            {rows.stride[0], rows.stride[1], rows.stride[2], 1}};
        kv.v = kv.k;
        kv.v.data = (float *)c->v;
    }
    return kv;
}

/* The step's first stages: Q, K, V of the new rows x [N, n, E] into the
 * layer's activation buffers, Q and K rotated at positions position ... */
static mha_status project_new_rows(mha_ctx *ctx, const mha_layer *l, const mha_tensor *x, int64_t position, float *q,
                                   float *k, float *v)
{
    int64_t N = x->shape[0], n = x->shape[1];
    mha__layer_rows rows = {N, n, n, n, false};
    mha__batched xb = mha__layer_from_view(x);
    mha_status st = mha__layer_project_qkv(ctx, l, &rows, &xb, &xb, &xb, q, k, v, NULL);
    mha_tensor qh = mha__layer_heads_view(l, q, N, n, l->desc.num_heads);
    mha_tensor kh = mha__layer_heads_view(l, k, N, n, l->desc.num_kv_heads);
    return st == MHA_OK ? mha__layer_rotate(ctx, l, &qh, &kh, position, false) : st;
}

static mha_status run_decode(mha_ctx *ctx, const mha_layer *l, const decode_plan *p, mha_kv_cache *c, mha_tensor *out,
                             const mha_tensor *x)
{
    int64_t N = c->batch, n = x->shape[1], H = l->desc.num_heads, G = l->desc.num_kv_heads;
    float *q = mha__ws_take(ctx, (2 * p->nq + 2 * p->nk) * (int64_t)sizeof(float));
    if (!q) return MHA_ERR_INTERNAL;
    float *k = q + p->nq, *v = k + p->nk, *heads = v + p->nk;
    mha_tensor qh = mha__layer_heads_view(l, q, N, n, H), kh = mha__layer_heads_view(l, k, N, n, G);
    mha_tensor vh = mha__layer_heads_view(l, v, N, n, G), oh = mha__layer_heads_view(l, heads, N, n, H);
    mha_status st = project_new_rows(ctx, l, x, c->length, q, k, v);
    if (st == MHA_OK) st = mha_kv_cache_append(c, &kh, &vh); /* K after rotation, as the cache keeps it */
    mha__kv kv = cache_kv(c, c->length);
    if (st == MHA_OK) st = mha__attn_run(ctx, &p->attn, &oh, NULL, NULL, &qh, NULL, &kv);
    if (st == MHA_OK) st = mha__layer_project_output(ctx, l, N, n, heads, out, NULL);
    return st;
}

mha_status mha_layer_decode(mha_ctx *ctx, mha_layer *l, mha_kv_cache *c, mha_tensor *out, const mha_tensor *x)
{
    if (!ctx) return mha__fail(MHA_ERR_MISUSE, "mha_layer_decode: NULL context");
    mha_status st = check_decode(l, c, out, x);
    if (st == MHA_OK) st = mha__layer_check_weights(l, "mha_layer_decode");
    if (st == MHA_OK) st = mha__layer_refresh(ctx, l);
    decode_plan p;
    if (st == MHA_OK) st = plan_decode(ctx, l, c, x->shape[1], &p);
    if (st == MHA_OK) st = mha__ws_reserve(ctx, p.workspace);
    if (st != MHA_OK) return st;
    int64_t top = mha__ws_top(ctx), before = c->length;
    st = run_decode(ctx, l, &p, c, out, x);
    mha__ws_release(ctx, top);
    if (st != MHA_OK) shorten(c, before); /* the cache is unchanged on error */
    return st;
}

/* ---------------------------------------------------------------- */
/* The step's stages, for callers that keep the keys elsewhere         */
/* ---------------------------------------------------------------- */

mha_status mha_layer_decode_desc(const mha_layer *l, mha_attn_desc *desc)
{
    mha_status st = check_step_layer(l, "mha_layer_decode_desc");
    if (st == MHA_OK && !desc) st = mha__fail(MHA_ERR_MISUSE, "mha_layer_decode_desc: NULL argument");
    if (st == MHA_OK) step_desc(l, desc);
    return st;
}

/* x [N, n, E] and the three outputs' shapes, for mha_layer_decode_qkv. */
static mha_status check_qkv(const mha_layer *l, const mha_tensor *x, const mha_tensor *q, const mha_tensor *k,
                            const mha_tensor *v, int64_t position)
{
    mha_status st = check_step_layer(l, "mha_layer_decode_qkv");
    if (st == MHA_OK) st = mha__layer_check_weights(l, "mha_layer_decode_qkv");
    if (st != MHA_OK) return st;
    if (!x || !q || !k || !v) return mha__fail(MHA_ERR_MISUSE, "mha_layer_decode_qkv: NULL argument");
    const int64_t x_shape[4] = {-1, -1, l->desc.embed_dim, 1};
    if ((st = mha__check_tensor(x, "x", x_shape)) != MHA_OK) return st;
    if (x->shape[0] < 1 || x->shape[1] < 1) return mha__fail(MHA_ERR_INVALID_ARG, "x has no rows");
    if (position < 0) return mha__fail(MHA_ERR_INVALID_ARG, "position %lld is negative", (long long)position);
    int64_t N = x->shape[0], n = x->shape[1], d = l->head_dim;
    const int64_t q_shape[4] = {N, l->desc.num_heads, n, d}, kv_shape[4] = {N, l->desc.num_kv_heads, n, d};
    if ((st = mha__check_tensor(q, "q", q_shape)) != MHA_OK || (st = mha__check_tensor(k, "k", kv_shape)) != MHA_OK)
        return st;
    return mha__check_tensor(v, "v", kv_shape);
}

mha_status mha_layer_decode_qkv(mha_ctx *ctx, const mha_layer *l, int64_t position, const mha_tensor *x, mha_tensor *q,
                                mha_tensor *k, mha_tensor *v)
{
    if (!ctx) return mha__fail(MHA_ERR_MISUSE, "mha_layer_decode_qkv: NULL context");
    mha_status st = check_qkv(l, x, q, k, v, position);
    if (st == MHA_OK) st = mha__layer_refresh(ctx, l);
    if (st != MHA_OK) return st;
    int64_t N = x->shape[0], n = x->shape[1], nq = N * n * l->qdim, nk = N * n * l->kvdim, bytes = 0, own = 0;
    int64_t rows = (nq + 2 * nk) * (int64_t)sizeof(float);
    if (!mha__ws_add(&own, rows, "the new rows") || !stage_workspace(ctx, l, N, n, own, &bytes))
        return mha__fail(MHA_ERR_INVALID_ARG, "the decoding step's workspace overflows");
    if ((st = mha__ws_reserve(ctx, bytes)) != MHA_OK) return st;
    int64_t top = mha__ws_top(ctx);
    float *qb = mha__ws_take(ctx, rows), *kb = qb + nq, *vb = kb + nk;
    st = qb ? project_new_rows(ctx, l, x, position, qb, kb, vb) : MHA_ERR_INTERNAL;
    if (st == MHA_OK) { /* only now through the caller's strides */
        mha_tensor qh = mha__layer_heads_view(l, qb, N, n, l->desc.num_heads);
        mha_tensor kh = mha__layer_heads_view(l, kb, N, n, l->desc.num_kv_heads);
        mha_tensor vh = mha__layer_heads_view(l, vb, N, n, l->desc.num_kv_heads);
        mha__tensor_copy(&qh, q), mha__tensor_copy(&kh, k), mha__tensor_copy(&vh, v);
    }
    mha__ws_release(ctx, top);
    return st;
}

static mha_status check_output(const mha_layer *l, const mha_tensor *out, const mha_tensor *heads)
{
    mha_status st = check_step_layer(l, "mha_layer_decode_output");
    if (st == MHA_OK) st = mha__layer_check_weights(l, "mha_layer_decode_output");
    if (st != MHA_OK) return st;
    if (!out || !heads) return mha__fail(MHA_ERR_MISUSE, "mha_layer_decode_output: NULL argument");
    const int64_t h_shape[4] = {-1, l->desc.num_heads, -1, l->head_dim};
    if ((st = mha__check_tensor(heads, "heads", h_shape)) != MHA_OK) return st;
    if (heads->shape[0] < 1 || heads->shape[2] < 1) return mha__fail(MHA_ERR_INVALID_ARG, "heads has no rows");
    const int64_t o_shape[4] = {heads->shape[0], heads->shape[2], l->desc.embed_dim, 1};
    if ((st = mha__check_tensor(out, "out", o_shape)) != MHA_OK) return st;
    if (out->stride[2] != 1) return mha__fail(MHA_ERR_INVALID_ARG, "out's columns must be contiguous (stride 1)");
    return MHA_OK;
}

mha_status mha_layer_decode_output(mha_ctx *ctx, const mha_layer *l, mha_tensor *out, const mha_tensor *heads)
{
    if (!ctx) return mha__fail(MHA_ERR_MISUSE, "mha_layer_decode_output: NULL context");
    mha_status st = check_output(l, out, heads);
    if (st == MHA_OK) st = mha__layer_refresh(ctx, l);
    if (st != MHA_OK) return st;
    int64_t N = heads->shape[0], n = heads->shape[2], nq = N * n * l->qdim, bytes = 0, own = 0;
    if (!mha__ws_add(&own, nq * (int64_t)sizeof(float), "the heads") || !stage_workspace(ctx, l, N, n, own, &bytes))
        return mha__fail(MHA_ERR_INVALID_ARG, "the decoding step's workspace overflows");
    if ((st = mha__ws_reserve(ctx, bytes)) != MHA_OK) return st;
    int64_t top = mha__ws_top(ctx);
    float *hb = mha__ws_take(ctx, nq * (int64_t)sizeof(float));
    mha_tensor mine = mha__layer_heads_view(l, hb, N, n, l->desc.num_heads);
    if (hb) mha__tensor_copy(heads, &mine); /* into the layout the output projection reads */
    st = hb ? mha__layer_project_output(ctx, l, N, n, hb, out, NULL) : MHA_ERR_INTERNAL;
    mha__ws_release(ctx, top);
    return st;
}

/* ---------------------------------------------------------------- */
/* Attention over the cache, for callers with their own projections  */
/* ---------------------------------------------------------------- */

/* The plan of q [batch, Hq, L, head_dim] against the cache's rows, after
 * checking the tensors and the descriptor. */
static mha_status cached_plan(const mha_ctx *ctx, const mha_kv_cache *c, const mha_tensor *out, const mha_tensor *q,
                              const mha_attn_desc *desc, mha__attn_plan *p)
{
    mha_status st = check_cache(c, "mha_kv_cache_attention");
    if (st != MHA_OK) return st;
    const int64_t q_shape[4] = {c->batch, -1, -1, c->head_dim};
    if ((st = mha__check_tensor(q, "query", q_shape)) != MHA_OK) return st;
    int64_t Hq = q->shape[1], L = q->shape[2];
    if ((st = mha__check_tensor(out, "output", q->shape)) != MHA_OK) return st;
    if (Hq != c->kv_heads && !desc->enable_gqa)
        return mha__fail(MHA_ERR_INVALID_ARG,
                         "the cache has %lld kv heads but query has %lld; set enable_gqa for grouped-query attention",
                         (long long)c->kv_heads, (long long)Hq);
    if (desc->dtype != MHA_DTYPE_F32)
        return mha__fail(MHA_ERR_INVALID_ARG, "attention over a cache computes in F32, not %s",
                         mha_dtype_name(desc->dtype));
    mha__attn_dims dims = {c->batch, Hq, c->kv_heads, L, c->length, c->head_dim, c->head_dim};
    if ((st = mha__attn_problem(desc, dims, p)) != MHA_OK) return st;
    return mha__attn_plan_resolve(p, ctx, (mha__attn_needs){.kv_rows = true, .kv_dtype = c->dtype});
}

mha_status mha_kv_cache_attention_lse(mha_ctx *ctx, const mha_kv_cache *c, mha_tensor *out, float *lse,
                                      const mha_tensor *q, const mha_attn_desc *desc)
{
    if (!ctx || !out || !q || !desc) return mha__fail(MHA_ERR_MISUSE, "mha_kv_cache_attention: NULL argument");
    mha__attn_plan p;
    mha_status st = cached_plan(ctx, c, out, q, desc, &p);
    if (st == MHA_OK) st = mha__ws_reserve(ctx, p.workspace);
    if (st != MHA_OK) return st;
    int64_t top = mha__ws_top(ctx);
    mha__kv kv = cache_kv(c, c->length);
    st = mha__attn_run(ctx, &p, out, lse, NULL, q, NULL, &kv);
    mha__ws_release(ctx, top);
    return st;
}

mha_status mha_kv_cache_attention(mha_ctx *ctx, const mha_kv_cache *c, mha_tensor *out, const mha_tensor *q,
                                  const mha_attn_desc *desc)
{
    return mha_kv_cache_attention_lse(ctx, c, out, NULL, q, desc);
}
