/*
 * test_decode.c -- the KV cache and decoding against the full forward.
 *
 * For random model blocks (GQA/MQA, rotary of both kinds, window, softcap,
 * ALiBi, biases), a sequence of T tokens is decoded as a prompt, then a
 * chunk of a few tokens, then one token at a time; every decoded row is
 * held to the tolerance rule against the float64 reference layer run over
 * the whole sequence with causal masking (float32 reference as baseline),
 * and each step is bit-identical with 1 and 3 threads.  A bf16 cache is
 * checked against the float32 cache's results (its own error is the
 * rounding of K and V to 8 bits of mantissa).  Then the cache API's
 * errors, truncate and reset.
 */
#include "harness.h"
#include "mha.h"
#include "reference.h"

#include <stdint.h>

static uint64_t rng = 0x2545f4914f6cdd1du;

static double uniform(void)
{
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (double)(rng >> 11) * 0x1p-53 * 2.0 - 1.0;
}

static int64_t pick(int64_t n) { return (int64_t)(uniform() * 0.5 * (double)n + 0.5 * (double)n) % n; }

/* n random floats and their double copies. */
static float *randoms(int64_t n, double scale, double **copy)
{
    float *f = malloc((size_t)(n ? n : 1) * sizeof *f);
    *copy = malloc((size_t)(n ? n : 1) * sizeof **copy);
    for (int64_t i = 0; i < n; i++) (*copy)[i] = f[i] = (float)(uniform() * scale);
    return f;
}

typedef struct block {
    int64_t E, H, G, hd, T, N, prompt;
    mha_rope rope;
    int64_t window;
    float softcap;
    bool alibi, bias;
} block;

/* Decodes the block's sequence with a cache of `dtype` on ctx, writing
 * every token's output row into out [N, T, E]. */
static void decode_all(mha_ctx *ctx, mha_layer *layer, const block *b, mha_dtype dtype, const float *x, float *out)
{
    mha_kv_cache *cache = NULL;
    CHECK_OK(mha_kv_cache_create(layer, b->N, b->T, dtype, &cache));
    if (!cache) return;
    int64_t t = 0, E = b->E;
    while (t < b->T) { /* the prompt, then a chunk of 3, then single tokens */
        int64_t n = t == 0 ? b->prompt : t == b->prompt ? 3 : 1;
        n = n > b->T - t ? b->T - t : n;
        mha_tensor xt = {(float *)x + t * E, {b->N, n, E, 1}, {b->T * E, E, 1, 0}};
        mha_tensor yt = {out + t * E, {b->N, n, E, 1}, {b->T * E, E, 1, 0}};
        CHECK_OK(mha_layer_decode(ctx, layer, cache, &yt, &xt));
        t += n;
        CHECK(mha_kv_cache_length(cache) == t, "cache length %lld after %lld tokens",
              (long long)mha_kv_cache_length(cache), (long long)t);
    }
    mha_kv_cache_free(cache);
}

static void run_block(const block *b, mha_ctx *ctx1, mha_ctx *ctx3, const char *label)
{
    int64_t E = b->E, H = b->H, G = b->G, d = b->hd, qd = H * d, kvd = G * d, N = b->N, T = b->T;
    mha_layer_desc ld;
    mha_layer_desc_init(&ld);
    ld.embed_dim = E;
    ld.num_heads = H;
    ld.num_kv_heads = G;
    ld.head_dim = d;
    ld.bias = b->bias;
    ld.rope = b->rope;
    ld.window_left = b->window;
    ld.softcap = b->softcap;
    double *slopes64 = NULL;
    float *slopes = b->alibi ? randoms(H, 0.3, &slopes64) : NULL;
    for (int64_t h = 0; slopes && h < H; h++) slopes64[h] = slopes[h] = fabsf(slopes[h]);
    ld.alibi_slopes = slopes;
    mha_layer *layer = NULL;
    CHECK_OK(mha_layer_create(&ld, &layer));
    double *w64[5], *x64;
    const int64_t sizes[5] = {qd * E, kvd * E, kvd * E, E * qd, qd + 2 * kvd};
    static const char *const names[4] = {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"};
    float *w[5];
    for (int i = 0; i < 5; i++) {
        w[i] = randoms(sizes[i], i == 4 ? 0.5 : 1.0 / sqrt((double)(i == 3 ? qd : E)), &w64[i]);
        if (i < 4) CHECK_OK(mha_layer_set_weight(layer, names[i], w[i], sizes[i]));
    }
    if (b->bias) CHECK_OK(mha_layer_set_weight(layer, "in_proj_bias", w[4], sizes[4]));
    float *x = randoms(N * T * E, 1.0, &x64);
    float *out1 = calloc((size_t)(N * T * E), sizeof(float)), *out3 = calloc((size_t)(N * T * E), sizeof(float));
    float *out16 = calloc((size_t)(N * T * E), sizeof(float));
    decode_all(ctx1, layer, b, MHA_DTYPE_F32, x, out1);
    decode_all(ctx3, layer, b, MHA_DTYPE_F32, x, out3);
    CHECK(memcmp(out1, out3, (size_t)(N * T * E) * sizeof(float)) == 0, "%s: 1 and 3 threads differ", label);
    decode_all(ctx1, layer, b, MHA_DTYPE_BF16, x, out16);

    mha_ref_layer r = {.N = N,
                       .L = T,
                       .S = T,
                       .E = E,
                       .H = H,
                       .kdim = E,
                       .vdim = E,
                       .causal = 1,
                       .w_q = w64[0],
                       .w_k = w64[1],
                       .w_v = w64[2],
                       .w_out = w64[3],
                       .b_in = b->bias ? w64[4] : NULL,
                       .G = G,
                       .hd = d,
                       .rope_kind = b->rope.kind,
                       .rope_theta = b->rope.theta ? b->rope.theta : 10000.0,
                       .rope_dim = b->rope.dim ? b->rope.dim : d,
                       .window_left = b->window,
                       .window_right = -1,
                       .softcap = b->softcap,
                       .alibi = slopes64};
    double *want = malloc((size_t)(N * T * E) * sizeof(double));
    float *base = malloc((size_t)(N * T * E) * sizeof(float));
    mha_ref_layer_f64(&r, x64, x64, x64, want, NULL);
    mha_ref_layer_f32(&r, x, x, x, base, NULL);
    char what[300];
    snprintf(what, sizeof what, "%s decoded", label);
    CHECK_CLOSE(what, out1, want, base, N * T * E);
    double worst = 0, mag = 0;
    for (int64_t i = 0; i < N * T * E; i++) {
        worst = fmax(worst, fabs((double)out16[i] - out1[i]));
        mag = fmax(mag, fabs((double)out1[i]));
    }
    CHECK(worst <= 2e-2 * fmax(1.0, mag), "%s: bf16 cache differs from the float32 cache by %.3g (max |out| %.3g)",
          label, worst, mag);
    for (int i = 0; i < 5; i++) free(w[i]), free(w64[i]);
    void *owned[] = {x, x64, out1, out3, out16, want, base, slopes, slopes64};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) free(owned[i]);
    mha_layer_free(layer);
}

static void test_blocks(mha_ctx *ctx1, mha_ctx *ctx3)
{
    static const int64_t widths[] = {8, 16, 32, 64};
    for (int n = 0; n < 40; n++) {
        block b = {.window = -1};
        b.G = 1 + pick(3);
        b.H = b.G * (1 + pick(3));
        b.hd = widths[pick(4)];
        b.E = 8 + pick(40);
        b.N = 1 + pick(2);
        b.T = 1 + pick(n % 5 == 0 ? 600 : 40); /* some long enough for several key chunks */
        b.prompt = 1 + pick(b.T > 20 ? 20 : b.T);
        b.rope = (mha_rope){(mha_rope_kind)pick(3), pick(2) ? 10000.0 : 1e6, 0};
        if (pick(3) == 0) b.window = pick(50);
        if (pick(4) == 0) b.softcap = 5.0f;
        b.alibi = pick(4) == 0;
        b.bias = pick(2);
        char label[200];
        snprintf(label, sizeof label,
                 "decode #%d N%lld T%lld prompt%lld E%lld H%lld G%lld d%lld rope%d win%lld cap%g alibi%d", n,
                 (long long)b.N, (long long)b.T, (long long)b.prompt, (long long)b.E, (long long)b.H, (long long)b.G,
                 (long long)b.hd, (int)b.rope.kind, (long long)b.window, (double)b.softcap, b.alibi);
        run_block(&b, ctx1, ctx3, label);
    }
}

static void test_cache_api(mha_ctx *ctx)
{
    mha_layer_desc ld;
    mha_layer_desc_init(&ld);
    ld.embed_dim = 16;
    ld.num_heads = 4;
    ld.num_kv_heads = 2;
    mha_layer *layer = NULL;
    CHECK_OK(mha_layer_create(&ld, &layer));
    CHECK_OK(harness_fill_weights(layer, 0.01f));
    mha_kv_cache *c = NULL;
    CHECK_FAILS(mha_kv_cache_create(layer, 1, 0, MHA_DTYPE_F32, &c), MHA_ERR_INVALID_ARG, "capacity must be positive");
    CHECK_FAILS(mha_kv_cache_create(layer, 1, 4, MHA_DTYPE_F16, &c), MHA_ERR_INVALID_ARG, "F32 or BF16, not F16");
    CHECK_FAILS(mha_kv_cache_create(layer, INT64_C(1) << 40, INT64_C(1) << 40, MHA_DTYPE_F32, &c), MHA_ERR_INVALID_ARG,
                "overflows");
    CHECK_OK(mha_kv_cache_create(layer, 1, 4, MHA_DTYPE_F32, &c));
    CHECK(mha_kv_cache_capacity(c) == 4 && mha_kv_cache_length(c) == 0, "fresh cache");
    float x[5 * 16] = {0}, y[5 * 16];
    mha_tensor x3 = mha_tensor_3d(x, 1, 3, 16), y3 = mha_tensor_3d(y, 1, 3, 16);
    CHECK_OK(mha_layer_decode(ctx, layer, c, &y3, &x3));
    CHECK_FAILS(mha_layer_decode(ctx, layer, c, &y3, &x3), MHA_ERR_INVALID_ARG,
                "3 new tokens do not fit: the cache holds 3 of 4");
    CHECK(mha_kv_cache_length(c) == 3, "a failed step leaves the cache as it was");
    CHECK_FAILS(mha_kv_cache_truncate(c, 4), MHA_ERR_INVALID_ARG, "cannot truncate a cache of 3 tokens to 4");
    CHECK_OK(mha_kv_cache_truncate(c, 1));
    CHECK(mha_kv_cache_length(c) == 1, "truncated to 1");
    mha_kv_cache_reset(c);
    CHECK(mha_kv_cache_length(c) == 0, "reset");
    float k[2 * 5 * 4] = {0};
    mha_tensor kt = mha_tensor_4d(k, 1, 2, 5, 4), vt = kt;
    CHECK_FAILS(mha_kv_cache_append(c, &kt, &vt), MHA_ERR_INVALID_ARG, "appending 5 tokens to a cache holding 0 of 4");
    mha_tensor bad = mha_tensor_4d(k, 1, 3, 2, 4);
    CHECK_FAILS(mha_kv_cache_append(c, &bad, &bad), MHA_ERR_INVALID_ARG, "keys has 3 in its second dimension");
    mha_tensor y2 = mha_tensor_3d(y, 1, 2, 16);
    CHECK_FAILS(mha_layer_decode(ctx, layer, c, &y2, &x3), MHA_ERR_INVALID_ARG, "out has 2 in its second dimension");
    CHECK_FAILS(mha_layer_decode(ctx, layer, NULL, &y3, &x3), MHA_ERR_MISUSE, "not a live mha_kv_cache");
    mha_layer_desc other = ld;
    other.num_kv_heads = 4;
    mha_layer *layer4 = NULL;
    CHECK_OK(mha_layer_create(&other, &layer4));
    CHECK_OK(harness_fill_weights(layer4, 0.01f));
    CHECK_FAILS(mha_layer_decode(ctx, layer4, c, &y3, &x3), MHA_ERR_INVALID_ARG,
                "the cache holds 2 kv heads of 4, the layer has 4 of 4");
    mha_layer_free(layer4);
    mha_kv_cache_free(c);
    mha_kv_cache_free(NULL);
    mha_layer_free(layer);
}

int main(void)
{
    mha_ctx *ctx1 = NULL, *ctx3 = NULL;
    CHECK_OK(mha_ctx_create(1, &ctx1));
    CHECK_OK(mha_ctx_create(3, &ctx3));
    test_blocks(ctx1, ctx3);
    test_cache_api(ctx1);
    mha_ctx_free(ctx1);
    mha_ctx_free(ctx3);
    return harness_finish("test_decode");
}
