/*
 * test_decode.c -- the KV cache and decoding against the full forward.
 *
 * For random model blocks (GQA/MQA, rotary of both kinds, window, softcap,
 * ALiBi, biases), a sequence of T tokens is decoded as a prompt, then a
 * chunk of a few tokens, then one token at a time; every decoded row is
 * held to the tolerance rule against the float64 reference layer run over
 * the whole sequence with causal masking (float32 reference as baseline),
 * and each step is bit-identical with 1 and 3 threads.  bf16 and int8
 * caches are checked against the float32 cache's results (their own error
 * is the rounding of K and V; seen here: at most 0.16% and 0.5% of the
 * largest output, held to 2%).  The int8 cache on its own, through
 * append, read and mha_kv_cache_attention: every value read back within
 * max |row| / 254, the attention within the tolerance rule of float64
 * attention over the values the cache holds, and within the error bound
 * of docs/NUMERICS.md of the float32 cache's.  Then the cache API's
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

/* One step as its stages (mha_layer_decode_qkv, append, attention over
 * the cache with mha_layer_decode_desc, mha_layer_decode_output) into y
 * [N, n, E]; q, k, v and the heads through strided views ([N, n, heads,
 * d] memory) to exercise the stages' strides. */
static void step_in_stages(mha_ctx *ctx, mha_layer *layer, const block *b, mha_kv_cache *cache, mha_tensor *y,
                           const mha_tensor *x)
{
    int64_t N = b->N, n = x->shape[1], d = b->hd;
    float *mem = malloc((size_t)(N * n * (2 * b->H + 2 * b->G) * d) * sizeof(float));
    float *qm = mem, *km = qm + N * n * b->H * d, *vm = km + N * n * b->G * d, *hm = vm + N * n * b->G * d;
    mha_tensor q = {qm, {N, b->H, n, d}, {n * b->H * d, d, b->H * d, 1}};
    mha_tensor k = {km, {N, b->G, n, d}, {n * b->G * d, d, b->G * d, 1}}, v = k, heads = q;
    v.data = vm, heads.data = hm;
    mha_attn_desc desc;
    CHECK_OK(mha_layer_decode_desc(layer, &desc));
    CHECK_OK(mha_layer_decode_qkv(ctx, layer, mha_kv_cache_length(cache), x, &q, &k, &v));
    CHECK_OK(mha_kv_cache_append(cache, &k, &v));
    CHECK_OK(mha_kv_cache_attention(ctx, cache, &heads, &q, &desc));
    CHECK_OK(mha_layer_decode_output(ctx, layer, y, &heads));
    free(mem);
}

/* decode_all, a step at a time through step_in_stages. */
static void decode_in_stages(mha_ctx *ctx, mha_layer *layer, const block *b, mha_dtype dtype, const float *x,
                             float *out)
{
    mha_kv_cache *cache = NULL;
    CHECK_OK(mha_kv_cache_create(layer, b->N, b->T, dtype, &cache));
    for (int64_t t = 0, E = b->E; cache && t < b->T;) {
        int64_t n = t == 0 ? b->prompt : t == b->prompt ? 3 : 1;
        n = n > b->T - t ? b->T - t : n;
        mha_tensor xt = {(float *)x + t * E, {b->N, n, E, 1}, {b->T * E, E, 1, 0}};
        mha_tensor yt = {out + t * E, {b->N, n, E, 1}, {b->T * E, E, 1, 0}};
        step_in_stages(ctx, layer, b, cache, &yt, &xt);
        t += n;
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
    float *out16 = calloc((size_t)(N * T * E), sizeof(float)), *out8 = calloc((size_t)(N * T * E), sizeof(float));
    decode_all(ctx1, layer, b, MHA_DTYPE_F32, x, out1);
    decode_all(ctx3, layer, b, MHA_DTYPE_F32, x, out3);
    CHECK(memcmp(out1, out3, (size_t)(N * T * E) * sizeof(float)) == 0, "%s: 1 and 3 threads differ", label);
    decode_all(ctx1, layer, b, MHA_DTYPE_BF16, x, out16);
    decode_all(ctx1, layer, b, MHA_DTYPE_I8, x, out8);
    float *staged = calloc((size_t)(N * T * E), sizeof(float));
    mha_ctx *fresh = NULL; /* a workspace no earlier call has grown */
    CHECK_OK(mha_ctx_create(2, &fresh));
    decode_in_stages(fresh, layer, b, MHA_DTYPE_F32, x, staged);
    mha_ctx_free(fresh);
    CHECK(memcmp(out1, staged, (size_t)(N * T * E) * sizeof(float)) == 0, "%s: the step in stages differs", label);
    decode_in_stages(ctx1, layer, b, MHA_DTYPE_I8, x, staged);
    CHECK(memcmp(out8, staged, (size_t)(N * T * E) * sizeof(float)) == 0, "%s: int8 step in stages differs", label);
    free(staged);

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
    double worst = 0, worst8 = 0, mag = 0;
    for (int64_t i = 0; i < N * T * E; i++) {
        worst = fmax(worst, fabs((double)out16[i] - out1[i]));
        worst8 = fmax(worst8, fabs((double)out8[i] - out1[i]));
        mag = fmax(mag, fabs((double)out1[i]));
    }
    CHECK(worst <= 2e-2 * fmax(1.0, mag), "%s: bf16 cache differs from the float32 cache by %.3g (max |out| %.3g)",
          label, worst, mag);
    CHECK(worst8 <= 2e-2 * fmax(1.0, mag), "%s: int8 cache differs from the float32 cache by %.3g (max |out| %.3g)",
          label, worst8, mag);
    for (int i = 0; i < 5; i++) free(w[i]), free(w64[i]);
    void *owned[] = {x, x64, out1, out3, out16, out8, want, base, slopes, slopes64};
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

/* ---------------------------------------------------------------- */
/* The int8 cache through mha_kv_cache_append/read/attention          */
/* ---------------------------------------------------------------- */

typedef struct i8_case {
    int64_t N, Hq, G, S, L, d;
    mha_causal causal;
    float softcap;
    int64_t window;
} i8_case;

/* Random rows of very different sizes: a few `big` times the rest, a few
 * 1e-3 times, some all zero, so the per-row scales matter.  (Keys stay
 * within 10x so that the scores do too: accuracy at large logits is
 * tested on its own, not through the cache's rounding.) */
static float *cache_rows(int64_t rows, int64_t d, float big)
{
    double *unused;
    float *x = randoms(rows * d, 1.0, &unused);
    free(unused);
    for (int64_t r = 0; r < rows; r++) {
        int kind = (int)pick(10);
        float size = kind == 0 ? big : kind == 1 ? 1e-3f : kind == 2 ? 0.0f : 1.0f;
        for (int64_t e = 0; e < d; e++) x[r * d + e] *= size;
    }
    return x;
}

/* Each row read back within max |row| / 254 of what was appended (and
 * the float32 rounding of scale * integer);
 * returns the largest such bound over the rows (the worst element error
 * allowed). */
static double check_dequantized(const char *what, const float *x, const float *back, int64_t rows, int64_t d,
                                double *row_bound)
{
    double worst_bound = 0;
    int bad = 0;
    for (int64_t r = 0; r < rows; r++) {
        double amax = 0;
        for (int64_t e = 0; e < d; e++) amax = fmax(amax, fabs((double)x[r * d + e]));
        row_bound[r] = amax / 254.0 + amax * FLT_EPSILON;
        worst_bound = fmax(worst_bound, row_bound[r]);
        for (int64_t e = 0; e < d; e++) bad += fabs((double)back[r * d + e] - x[r * d + e]) > row_bound[r];
    }
    CHECK(bad == 0, "%s: %d values read back off by more than max |row| / 254", what, bad);
    return worst_bound;
}

/* The bound on |out_int8 - out_f32| of docs/NUMERICS.md for one query
 * row: scores move by at most delta = scale |q|_1 max_j err_k_j (softcap
 * only shrinks moves), so each probability by a factor within e^(+-2 delta)
 * and the output by (e^(2 delta) - 1) / 2 times the range of V's column,
 * plus V's own error. */
static double output_bound(const i8_case *t, const float *q, double k_err, double v_err, double v_range)
{
    double l1 = 0;
    for (int64_t c = 0; c < t->d; c++) l1 += fabs((double)q[c]);
    double delta = l1 / sqrt((double)t->d) * k_err;
    return (exp(2 * delta) - 1) / 2 * v_range + v_err;
}

static mha_attn_desc i8_desc(const i8_case *t)
{
    mha_attn_desc desc;
    mha_attn_desc_init(&desc);
    desc.causal = t->causal;
    desc.softcap = t->softcap;
    desc.window_left = t->window;
    desc.enable_gqa = t->Hq != t->G;
    return desc;
}

static void run_i8_case(const i8_case *t, mha_ctx *ctx1, mha_ctx *ctx3, mha_layer *layer, const char *label)
{
    int64_t N = t->N, G = t->G, S = t->S, d = t->d, kv_rows = N * G * S, nq = N * t->Hq * t->L * d;
    float *k = cache_rows(kv_rows, d, 10.0f), *v = cache_rows(kv_rows, d, 100.0f),
          *kb = malloc(sizeof(float) * kv_rows * d);
    float *vb = malloc(sizeof(float) * kv_rows * d), *o8 = malloc(sizeof(float) * nq),
          *o8t = malloc(sizeof(float) * nq);
    float *o32 = malloc(sizeof(float) * nq), *base = malloc(sizeof(float) * nq);
    double *q64, *kb64 = malloc(sizeof(double) * kv_rows * d), *vb64 = malloc(sizeof(double) * kv_rows * d);
    double *want = malloc(sizeof(double) * nq), *k_bound = malloc(sizeof(double) * kv_rows);
    double *v_bound = malloc(sizeof(double) * kv_rows);
    float *q = randoms(nq, 1.0, &q64);
    mha_kv_cache *c8 = NULL, *c32 = NULL;
    CHECK_OK(mha_kv_cache_create(layer, N, S + 3, MHA_DTYPE_I8, &c8));
    CHECK_OK(mha_kv_cache_create(layer, N, S, MHA_DTYPE_F32, &c32));
    int64_t first = S / 3; /* two appends: rows land after the first ones */
    mha_tensor k1 = {k, {N, G, first, d}, {G * S * d, S * d, d, 1}}, v1 = k1;
    v1.data = v;
    mha_tensor k2 = k1, v2 = v1;
    k2.data += first * d, v2.data += first * d, k2.shape[2] = v2.shape[2] = S - first;
    CHECK_OK(mha_kv_cache_append(c8, &k1, &v1));
    CHECK_OK(mha_kv_cache_append(c8, &k2, &v2));
    CHECK_OK(mha_kv_cache_append(c32, &k1, &v1));
    CHECK_OK(mha_kv_cache_append(c32, &k2, &v2));
    mha_tensor kr = mha_tensor_4d(kb, N, G, S, d), vr = mha_tensor_4d(vb, N, G, S, d);
    CHECK_OK(mha_kv_cache_read(c8, 0, &kr, &vr));
    char what[300];
    snprintf(what, sizeof what, "%s keys", label);
    double k_err = check_dequantized(what, k, kb, kv_rows, d, k_bound);
    snprintf(what, sizeof what, "%s values", label);
    double v_err = check_dequantized(what, v, vb, kv_rows, d, v_bound);

    mha_attn_desc desc = i8_desc(t);
    mha_tensor qt = mha_tensor_4d(q, N, t->Hq, t->L, d), out8 = mha_tensor_4d(o8, N, t->Hq, t->L, d);
    mha_tensor out8t = mha_tensor_4d(o8t, N, t->Hq, t->L, d), out32 = mha_tensor_4d(o32, N, t->Hq, t->L, d);
    CHECK_OK(mha_kv_cache_attention(ctx1, c8, &out8, &qt, &desc));
    CHECK_OK(mha_kv_cache_attention(ctx3, c8, &out8t, &qt, &desc));
    CHECK(memcmp(o8, o8t, sizeof(float) * nq) == 0, "%s: 1 and 3 threads differ", label);
    CHECK_OK(mha_kv_cache_attention(ctx1, c32, &out32, &qt, &desc));

    /* Against float64 attention over the values the int8 cache holds. */
    for (int64_t i = 0; i < kv_rows * d; i++) kb64[i] = kb[i], vb64[i] = vb[i];
    mha_ref_sdpa r = {N,          t->Hq,     G,         t->L, S,    d,    d,   1.0 / sqrt((double)d),
                      t->softcap, t->causal, t->window, -1,   NULL, NULL, NULL};
    int64_t n_rows = N * t->Hq * t->L;
    double *want_lse = malloc((size_t)n_rows * sizeof(double));
    float *lse = malloc((size_t)n_rows * sizeof(float)), *base_lse = malloc((size_t)n_rows * sizeof(float));
    mha_ref_sdpa_f64(&r, q64, kb64, vb64, want, want_lse, NULL);
    mha_ref_sdpa_f32(&r, q, kb, vb, base, base_lse, NULL);
    snprintf(what, sizeof what, "%s over the dequantised cache", label);
    CHECK_CLOSE(what, o8, want, base, nq);
    /* The same with each row's lse (what merges the shards of a split cache). */
    CHECK_OK(mha_kv_cache_attention_lse(ctx3, c8, &out8t, lse, &qt, &desc));
    CHECK(memcmp(o8, o8t, sizeof(float) * nq) == 0, "%s: the output differs when lse is asked for", label);
    snprintf(what, sizeof what, "%s: lse over the dequantised cache", label);
    CHECK_CLOSE(what, lse, want_lse, base_lse, n_rows);
    free(want_lse), free(lse), free(base_lse);

    /* Against the float32 cache, by the bound. */
    double v_range = 0;
    for (int64_t i = 0; i < kv_rows * d; i++) v_range = fmax(v_range, 2 * fabs((double)v[i]));
    int bad = 0;
    for (int64_t row = 0; row < N * t->Hq * t->L; row++) {
        double limit = output_bound(t, q + row * d, k_err, v_err, v_range) + 1e-5 * (1 + v_range);
        for (int64_t c = 0; c < d; c++) bad += !(fabs((double)o8[row * d + c] - o32[row * d + c]) <= limit);
    }
    CHECK(bad == 0, "%s: %d outputs off the float32 cache's by more than the bound", label, bad);
    mha_kv_cache_free(c8);
    mha_kv_cache_free(c32);
    void *owned[] = {k, v, kb, vb, o8, o8t, o32, base, q, q64, kb64, vb64, want, k_bound, v_bound};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) free(owned[i]);
}

static void test_int8_cache(mha_ctx *ctx1, mha_ctx *ctx3)
{
    static const int64_t widths[] = {8, 24, 64, 128};
    for (int n = 0; n < 24; n++) {
        i8_case t = {.window = -1};
        t.G = 1 + pick(3);
        t.Hq = t.G * (1 + pick(3));
        t.d = widths[pick(4)];
        t.N = 1 + pick(2);
        t.S = 1 + pick(n % 4 == 0 ? 1500 : 300); /* several 256-key chunks sometimes */
        t.L = 1 + pick(t.S < 20 ? t.S : 20);
        t.causal = pick(2) ? MHA_CAUSAL_BOTTOM_RIGHT : MHA_CAUSAL_NONE;
        if (pick(4) == 0) t.softcap = 5.0f;
        if (pick(4) == 0) t.window = pick(40);
        mha_layer_desc ld;
        mha_layer_desc_init(&ld);
        ld.num_heads = t.Hq;
        ld.num_kv_heads = t.G;
        ld.embed_dim = t.Hq * t.d;
        mha_layer *layer = NULL;
        CHECK_OK(mha_layer_create(&ld, &layer));
        char label[200];
        snprintf(label, sizeof label, "int8 cache #%d N%lld Hq%lld G%lld S%lld L%lld d%lld causal%d cap%g win%lld", n,
                 (long long)t.N, (long long)t.Hq, (long long)t.G, (long long)t.S, (long long)t.L, (long long)t.d,
                 (int)t.causal, (double)t.softcap, (long long)t.window);
        run_i8_case(&t, ctx1, ctx3, layer, label);
        mha_layer_free(layer);
    }
}

/* Attention over the cache against attention over the rows it holds,
 * read back as tensors: the same bits, in the tiles (20 query rows) and
 * in split-K decoding (one row).  The cache keeps
 * its keys' largest norm, which decides which rows are refined whole
 * (attention.h: refined scores); the tensors' attention finds it from
 * the rows.  (Split-K over an int8 cache scales each row's dot product,
 * not its elements: other bits.)  A key row 20 times the others' size makes every row wide
 * while it is held; after truncating it away, and after a reset, the
 * kept norm must be the remaining rows' again, or the two would refine
 * different rows and differ.  The split products (products_split.c)
 * take float32 keys only, so where the _split run sends every float32
 * problem to them (on AMX), a bf16 or int8 cache's rows read back as
 * float32 must not go there either, or the products would differ and
 * the comparison would no longer be about the kept norm.  Two kv heads,
 * the large key in the second only, and a third of the query rows small:
 * split-K over tensors decides a head's wide rows after its chunks
 * (decode.c), and here some heads have wide rows and others none, some
 * rows of a head are wide and others not. */
static void check_cache_as_tensors(mha_ctx *ctx, mha_kv_cache *c, mha_dtype dtype, int64_t G, int64_t d, const float *q,
                                   int64_t Hq, const char *label)
{
    int64_t S = mha_kv_cache_length(c), L = 20;
    float *k = malloc(sizeof(float) * G * S * d), *v = malloc(sizeof(float) * G * S * d);
    float *o_cache = malloc(sizeof(float) * Hq * L * d), *o_rows = malloc(sizeof(float) * Hq * L * d);
    mha_tensor kt = mha_tensor_4d(k, 1, G, S, d), vt = mha_tensor_4d(v, 1, G, S, d);
    CHECK_OK(mha_kv_cache_read(c, 0, &kt, &vt));
    mha_attn_desc desc;
    mha_attn_desc_init(&desc);
    desc.enable_gqa = Hq != G;
    if (dtype != MHA_DTYPE_F32) mha__split_attention_min_rows(-1); /* the default: never at 20 rows */
    bool split_k = dtype != MHA_DTYPE_I8;                          /* int8 rows scale the sums, not the elements */
    const int64_t row_counts[] = {L, 4, 1};                        /* the tiles; split-K on every ISA */
    for (int n = 0; n < (split_k ? 3 : 1); n++) {
        int64_t rows = row_counts[n];
        mha_tensor qt = {(float *)q, {1, Hq, rows, d}, {L * d * Hq, L * d, d, 1}};
        mha_tensor oc = {o_cache, {1, Hq, rows, d}, {L * d * Hq, L * d, d, 1}}, orows = oc;
        orows.data = o_rows;
        CHECK_OK(mha_kv_cache_attention(ctx, c, &oc, &qt, &desc));
        CHECK_OK(mha_attention(ctx, &orows, NULL, &qt, &kt, &vt, &desc));
        bool same = true;
        for (int64_t h = 0; h < Hq; h++)
            same = same && memcmp(o_cache + h * L * d, o_rows + h * L * d, sizeof(float) * rows * d) == 0;
        CHECK(same, "%s, %lld keys, %lld query rows: the cache's attention differs from its rows'", label, (long long)S,
              (long long)rows);
    }
    harness_split_all();
    free(k), free(v), free(o_cache), free(o_rows);
}

static void test_cache_keeps_norms(mha_ctx *ctx)
{
    enum { G = 2, HQ = 4, D = 64, S = 300 };
    static const mha_dtype dtypes[] = {MHA_DTYPE_F32, MHA_DTYPE_BF16, MHA_DTYPE_I8};
    mha_layer_desc ld;
    mha_layer_desc_init(&ld);
    ld.embed_dim = HQ * D;
    ld.num_heads = HQ;
    ld.num_kv_heads = G;
    mha_layer *layer = NULL;
    CHECK_OK(mha_layer_create(&ld, &layer));
    double *copy;
    float *q = randoms(HQ * 20 * D, 2.0, &copy), *k, *v, *big;
    free(copy);
    k = randoms(G * S * D, 2.0, &copy), free(copy);
    v = randoms(G * S * D, 1.0, &copy), free(copy);
    big = randoms(G * D, 40.0, &copy), free(copy);
    for (int64_t c = 0; c < D; c++) big[c] *= 0.05f; /* kv head 0's: as its other keys */
    for (int64_t r = 1; r < HQ * 20; r += 3)
        for (int64_t c = 0; c < D; c++) q[r * D + c] *= 0.02f; /* rows too small to be wide */
    mha_tensor kt = mha_tensor_4d(k, 1, G, S, D), vt = mha_tensor_4d(v, 1, G, S, D);
    mha_tensor kb = mha_tensor_4d(big, 1, G, 1, D), vb = mha_tensor_4d(v, 1, G, 1, D);
    for (int n = 0; n < 3; n++) {
        mha_kv_cache *c = NULL;
        char label[80];
        snprintf(label, sizeof label, "%s cache", mha_dtype_name(dtypes[n]));
        CHECK_OK(mha_kv_cache_create(layer, 1, S + 1, dtypes[n], &c));
        CHECK_OK(mha_kv_cache_append(c, &kt, &vt));
        check_cache_as_tensors(ctx, c, dtypes[n], G, D, q, HQ, label);
        CHECK_OK(mha_kv_cache_append(c, &kb, &vb));
        check_cache_as_tensors(ctx, c, dtypes[n], G, D, q, HQ, label);
        CHECK_OK(mha_kv_cache_truncate(c, S));
        check_cache_as_tensors(ctx, c, dtypes[n], G, D, q, HQ, label);
        mha_kv_cache_reset(c);
        CHECK_OK(mha_kv_cache_append(c, &kt, &vt));
        check_cache_as_tensors(ctx, c, dtypes[n], G, D, q, HQ, label);
        mha_kv_cache_free(c);
    }
    free(q), free(k), free(v), free(big);
    mha_layer_free(layer);
}

/* mha_kv_cache_read and mha_kv_cache_attention on bad input, and an
 * int8 row with an infinity: NaN where it is seen, nowhere else. */
static void test_read_and_attention_errors(mha_ctx *ctx, mha_layer *layer)
{
    mha_kv_cache *c = NULL;
    CHECK_OK(mha_kv_cache_create(layer, 1, 4, MHA_DTYPE_I8, &c)); /* 2 kv heads of 4 */
    float k[2 * 2 * 4], v[2 * 2 * 4], q[4 * 2 * 4], o[4 * 2 * 4], back[2 * 3 * 4];
    for (int i = 0; i < 16; i++) k[i] = v[i] = 0.25f * (float)(i % 5) - 0.5f;
    for (int i = 0; i < 32; i++) q[i] = 0.1f * (float)(i % 7);
    k[8] = INFINITY; /* token 0 of kv head 1 */
    mha_tensor kt = mha_tensor_4d(k, 1, 2, 2, 4), vt = mha_tensor_4d(v, 1, 2, 2, 4);
    CHECK_OK(mha_kv_cache_append(c, &kt, &vt));
    mha_tensor r3 = mha_tensor_4d(back, 1, 2, 3, 4);
    CHECK_FAILS(mha_kv_cache_read(c, 0, &r3, NULL), MHA_ERR_INVALID_ARG,
                "cannot read tokens 0 .. 3 of a cache holding 2");
    CHECK_FAILS(mha_kv_cache_read(c, -1, NULL, NULL), MHA_ERR_MISUSE, "no tensor to read into");
    mha_tensor r2 = mha_tensor_4d(back, 1, 2, 2, 4);
    CHECK_OK(mha_kv_cache_read(c, 0, NULL, &r2));
    bool near = true, ends = back[4] == v[4] && back[5] == v[5]; /* max |row| itself is exact: 127 x scale */
    for (int i = 0; i < 16; i++) near = near && fabsf(back[i] - v[i]) <= 0.5f / 254.0f + 1e-7f;
    CHECK(near && ends, "values read back within max |row| / 254, the largest exactly");
    mha_attn_desc desc;
    mha_attn_desc_init(&desc);
    mha_tensor qt = mha_tensor_4d(q, 1, 4, 2, 4), ot = mha_tensor_4d(o, 1, 4, 2, 4);
    CHECK_FAILS(mha_kv_cache_attention(ctx, c, &ot, &qt, &desc), MHA_ERR_INVALID_ARG, "set enable_gqa");
    desc.enable_gqa = true;
    desc.dtype = MHA_DTYPE_BF16;
    CHECK_FAILS(mha_kv_cache_attention(ctx, c, &ot, &qt, &desc), MHA_ERR_INVALID_ARG, "computes in F32, not BF16");
    desc.dtype = MHA_DTYPE_F32;
    mha_tensor q3 = mha_tensor_4d(q, 1, 4, 2, 3);
    CHECK_FAILS(mha_kv_cache_attention(ctx, c, &ot, &q3, &desc), MHA_ERR_INVALID_ARG, "query has 3 in its fourth");
    CHECK_FAILS(mha_kv_cache_attention(ctx, NULL, &ot, &qt, &desc), MHA_ERR_MISUSE, "not a live mha_kv_cache");
    CHECK_OK(mha_kv_cache_attention(ctx, c, &ot, &qt, &desc));
    int nan_rows = 0, finite_rows = 0;
    for (int row = 0; row < 8; row++) { /* query heads 0, 1 read kv head 0; 2, 3 kv head 1 */
        bool nan = isnan(o[row * 4]);
        nan_rows += nan && row >= 4, finite_rows += !nan && row < 4;
    }
    CHECK(nan_rows == 4 && finite_rows == 4, "the infinite key's head is NaN (%d of 4), the other finite (%d of 4)",
          nan_rows, finite_rows);
    mha_kv_cache_free(c);
}

/* The step's stages on bad input (layer of E 16, 4 heads, 2 kv heads). */
static void test_stage_errors(mha_ctx *ctx, mha_layer *layer)
{
    float x[2 * 16] = {0}, q[4 * 2 * 4], k[2 * 2 * 4], v[2 * 2 * 4], y[2 * 16];
    mha_tensor xt = mha_tensor_3d(x, 1, 2, 16), qt = mha_tensor_4d(q, 1, 4, 2, 4), kt = mha_tensor_4d(k, 1, 2, 2, 4);
    mha_tensor vt = mha_tensor_4d(v, 1, 2, 2, 4), yt = mha_tensor_3d(y, 1, 2, 16);
    CHECK_FAILS(mha_layer_decode_qkv(ctx, layer, -1, &xt, &qt, &kt, &vt), MHA_ERR_INVALID_ARG, "position -1");
    CHECK_FAILS(mha_layer_decode_qkv(ctx, layer, 0, &xt, &kt, &kt, &vt), MHA_ERR_INVALID_ARG, "q has 2 in its second");
    CHECK_FAILS(mha_layer_decode_qkv(ctx, layer, 0, &xt, &qt, &qt, &vt), MHA_ERR_INVALID_ARG, "k has 4 in its second");
    CHECK_FAILS(mha_layer_decode_qkv(NULL, layer, 0, &xt, &qt, &kt, &vt), MHA_ERR_MISUSE, "NULL context");
    CHECK_FAILS(mha_layer_decode_qkv(ctx, layer, 0, &xt, &qt, &kt, NULL), MHA_ERR_MISUSE, "NULL argument");
    mha_tensor x15 = mha_tensor_3d(x, 1, 2, 15);
    CHECK_FAILS(mha_layer_decode_qkv(ctx, layer, 0, &x15, &qt, &kt, &vt), MHA_ERR_INVALID_ARG, "x has 15 in its");
    CHECK_FAILS(mha_layer_decode_output(ctx, layer, &yt, &kt), MHA_ERR_INVALID_ARG, "heads has 2 in its second");
    mha_tensor y1 = mha_tensor_3d(y, 1, 1, 16);
    CHECK_FAILS(mha_layer_decode_output(ctx, layer, &y1, &qt), MHA_ERR_INVALID_ARG, "out has 1 in its second");
    mha_tensor y_strided = {y, {1, 2, 8, 1}, {32, 16, 2, 0}};
    mha_tensor q8 = mha_tensor_4d(q, 1, 4, 2, 2);
    CHECK_FAILS(mha_layer_decode_output(ctx, layer, &y_strided, &q8), MHA_ERR_INVALID_ARG, "heads has 2 in its fourth");
    CHECK_OK(mha_layer_decode_qkv(ctx, layer, 3, &xt, &qt, &kt, &vt));
    CHECK_OK(mha_layer_decode_output(ctx, layer, &yt, &qt));
    mha_attn_desc desc;
    CHECK_FAILS(mha_layer_decode_desc(layer, NULL), MHA_ERR_MISUSE, "NULL argument");
    CHECK_OK(mha_layer_decode_desc(layer, &desc));
    CHECK(desc.causal == MHA_CAUSAL_BOTTOM_RIGHT && desc.enable_gqa && isnan(desc.scale), "the step's descriptor");
    mha_layer_desc ld;
    mha_layer_desc_init(&ld);
    ld.embed_dim = 16, ld.num_heads = 4, ld.add_bias_kv = 1;
    mha_layer *kv_bias = NULL, *unset = NULL;
    CHECK_OK(mha_layer_create(&ld, &kv_bias));
    CHECK_FAILS(mha_layer_decode_desc(kv_bias, &desc), MHA_ERR_INVALID_ARG, "no place for add_bias_kv");
    ld.add_bias_kv = 0, ld.num_kv_heads = 2;
    CHECK_OK(mha_layer_create(&ld, &unset));
    CHECK_FAILS(mha_layer_decode_qkv(ctx, unset, 0, &xt, &qt, &kt, &vt), MHA_ERR_MISUSE, "never set");
    CHECK_FAILS(mha_layer_decode_output(ctx, unset, &yt, &qt), MHA_ERR_MISUSE, "never set");
    mha_layer_free(kv_bias);
    mha_layer_free(unset);
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
    CHECK_FAILS(mha_kv_cache_create(layer, 1, 4, MHA_DTYPE_F16, &c), MHA_ERR_INVALID_ARG, "F32, BF16 or I8, not F16");
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
    test_read_and_attention_errors(ctx, layer);
    test_stage_errors(ctx, layer);
    mha_layer_free(layer);
}

int main(void)
{
    harness_split_all();
    mha_ctx *ctx1 = NULL, *ctx3 = NULL;
    CHECK_OK(mha_ctx_create(1, &ctx1));
    CHECK_OK(mha_ctx_create(3, &ctx3));
    test_blocks(ctx1, ctx3);
    test_int8_cache(ctx1, ctx3);
    test_cache_keeps_norms(ctx3);
    test_cache_api(ctx1);
    mha_ctx_free(ctx1);
    mha_ctx_free(ctx3);
    return harness_finish("test_decode");
}
