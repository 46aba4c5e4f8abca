/*
 * test_workspace.c -- plan, then compute: what each operation says it
 * will take from the context's workspace is what it takes.
 *
 *   - For every entry point and a spread of shapes (both attention
 *     drivers, bf16, GQA, rope, appended keys, attn_weights, a strided
 *     output, training, decoding with a float32 and a bf16 cache, the
 *     dense layer): a context reserved with exactly the reported size
 *     runs the call with no allocation and does not grow; a fresh context
 *     grows to exactly that size.
 *   - Sizes that overflow 64 bits are INVALID_ARG everywhere, from the
 *     size query and from the call, never NOMEM.
 *   - A strided output of a layer whose heads are narrower than the model
 *     (staged in an area of its own) equals the contiguous output.
 *   - mha_ctx_reserve's errors.
 *   - The fork-join loops hand out every item exactly once, to a valid
 *     thread number, for any item and thread count.
 */
#include "core/internal.h"
#include "core/parallel.h"
#include "harness.h"
#include "mha.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static float *random_floats(int64_t n, unsigned seed)
{
    float *x = malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        x[i] = (float)((seed >> 8) & 0xffff) / 32768.0f - 1.0f;
    }
    return x;
}

/* A call to check: `size` asks its workspace, `run` makes it. */
typedef struct call {
    const char *name;
    mha_status (*size)(const mha_ctx *ctx, void *arg, int64_t *bytes);
    mha_status (*run)(mha_ctx *ctx, void *arg);
    void *arg;
    void (*prepare)(void *arg); /* before each run, outside what is counted (NULL: nothing) */
} call;

static void check_call(const call *c)
{
    int threads[2] = {1, 3};
    for (int t = 0; t < 2; t++) {
        mha_ctx *fresh = NULL, *reserved = NULL;
        CHECK_OK(mha_ctx_create(threads[t], &fresh));
        CHECK_OK(mha_ctx_create(threads[t], &reserved));
        int64_t bytes = -1;
        if (c->prepare) c->prepare(c->arg);
        CHECK_OK(c->size(fresh, c->arg, &bytes));
        CHECK(bytes >= 0, "%s: size %lld", c->name, (long long)bytes);
        CHECK_OK(c->run(fresh, c->arg));
        CHECK(mha_ctx_workspace_bytes(fresh) == bytes, "%s (%d threads): a fresh context grew to %lld, planned %lld",
              c->name, threads[t], (long long)mha_ctx_workspace_bytes(fresh), (long long)bytes);
        CHECK_OK(mha_ctx_reserve(reserved, bytes));
        if (c->prepare) c->prepare(c->arg);
        int64_t before = mha__allocations();
        CHECK_OK(c->run(reserved, c->arg));
        CHECK(mha__allocations() == before, "%s (%d threads): %lld allocations after reserving the planned size",
              c->name, threads[t], (long long)(mha__allocations() - before));
        CHECK(mha_ctx_workspace_bytes(reserved) == bytes, "%s: the reserved context grew", c->name);
        mha_ctx_free(fresh);
        mha_ctx_free(reserved);
    }
}

/* ---------------------------------------------------------------- */
/* Scaled dot-product attention                                      */
/* ---------------------------------------------------------------- */

typedef struct sdpa_arg {
    mha_tensor q, k, v, out, dq, dk, dv, dout;
    float *lse, *sum; /* lse, or the row maximum, with sum */
    mha_attn_desc desc;
} sdpa_arg;

static sdpa_arg sdpa_make(int64_t B, int64_t Hq, int64_t Hkv, int64_t L, int64_t S, int64_t D, int64_t Dv)
{
    sdpa_arg a;
    a.q = mha_tensor_4d(random_floats(B * Hq * L * D, 1), B, Hq, L, D);
    a.k = mha_tensor_4d(random_floats(B * Hkv * S * D, 2), B, Hkv, S, D);
    a.v = mha_tensor_4d(random_floats(B * Hkv * S * Dv, 3), B, Hkv, S, Dv);
    a.out = mha_tensor_4d(random_floats(B * Hq * L * Dv, 4), B, Hq, L, Dv);
    a.dout = mha_tensor_4d(random_floats(B * Hq * L * Dv, 5), B, Hq, L, Dv);
    a.dq = mha_tensor_4d(random_floats(B * Hq * L * D, 6), B, Hq, L, D);
    a.dk = mha_tensor_4d(random_floats(B * Hkv * S * D, 7), B, Hkv, S, D);
    a.dv = mha_tensor_4d(random_floats(B * Hkv * S * Dv, 8), B, Hkv, S, Dv);
    a.lse = random_floats(B * Hq * L, 9);
    a.sum = random_floats(B * Hq * L, 10);
    mha_attn_desc_init(&a.desc);
    a.desc.enable_gqa = Hq != Hkv;
    return a;
}

static void sdpa_free(sdpa_arg *a)
{
    float *all[] = {a->q.data,  a->k.data,  a->v.data,  a->out.data, a->dout.data,
                    a->dq.data, a->dk.data, a->dv.data, a->lse,      a->sum};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free(all[i]);
}

static mha_status sdpa_size(const mha_ctx *ctx, void *p, int64_t *bytes)
{
    sdpa_arg *a = p;
    return mha_attention_workspace_size(ctx, &a->out, &a->q, &a->k, &a->v, &a->desc, bytes);
}

static mha_status sdpa_run(mha_ctx *ctx, void *p)
{
    sdpa_arg *a = p;
    return mha_attention(ctx, &a->out, a->lse, &a->q, &a->k, &a->v, &a->desc);
}

static mha_status sdpa_stats_size(const mha_ctx *ctx, void *p, int64_t *bytes)
{
    sdpa_arg *a = p;
    return mha_attention_with_stats_workspace_size(ctx, &a->out, &a->q, &a->k, &a->v, &a->desc, bytes);
}

static mha_status sdpa_stats_run(mha_ctx *ctx, void *p)
{
    sdpa_arg *a = p;
    mha_attn_stats stats = {a->lse, a->sum};
    return mha_attention_with_stats(ctx, &a->out, &stats, &a->q, &a->k, &a->v, &a->desc);
}

static mha_status sdpa_bwd_size(const mha_ctx *ctx, void *p, int64_t *bytes)
{
    sdpa_arg *a = p;
    return mha_attention_backward_workspace_size(ctx, &a->dq, &a->dk, &a->dv, &a->q, &a->k, &a->v, &a->out, &a->dout,
                                                 &a->desc, bytes);
}

static mha_status sdpa_bwd_run(mha_ctx *ctx, void *p)
{
    sdpa_arg *a = p;
    return mha_attention_backward(ctx, &a->dq, &a->dk, &a->dv, &a->q, &a->k, &a->v, &a->out, a->lse, &a->dout,
                                  &a->desc);
}

static mha_status sdpa_bwd_stats_run(mha_ctx *ctx, void *p)
{
    sdpa_arg *a = p;
    mha_attn_stats stats = {a->lse, a->sum};
    return mha_attention_backward_with_stats(ctx, &a->dq, &a->dk, &a->dv, &a->q, &a->k, &a->v, &a->out, &stats,
                                             &a->dout, &a->desc);
}

static void test_sdpa(void)
{
    const int64_t shapes[][7] = {
        /* B, Hq, Hkv, L, S, D, Dv */
        {1, 2, 2, 200, 300, 64, 64}, /* tiles */
        {2, 4, 2, 3, 700, 32, 32},   /* split-K (few rows), GQA */
        {1, 2, 1, 5, 40, 16, 24},    /* few rows but Dv != D: tiles */
        {1, 1, 1, 0, 10, 8, 8},      /* no rows */
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        const int64_t *s = shapes[i];
        sdpa_arg a = sdpa_make(s[0], s[1], s[2], s[3], s[4], s[5], s[6]);
        for (int variant = 0; variant < 3; variant++) {
            mha_attn_desc_init(&a.desc);
            a.desc.enable_gqa = s[1] != s[2];
            a.desc.causal = variant == 1 ? MHA_CAUSAL_BOTTOM_RIGHT : MHA_CAUSAL_NONE;
            a.desc.dtype = variant == 2 ? MHA_DTYPE_BF16 : MHA_DTYPE_F32;
            call fwd = {"mha_attention", sdpa_size, sdpa_run, &a, NULL};
            check_call(&fwd);
            call fwd_stats = {"mha_attention_with_stats", sdpa_stats_size, sdpa_stats_run, &a, NULL};
            check_call(&fwd_stats);
            if (variant == 2) continue; /* the backward is float32 only */
            call bwd = {"mha_attention_backward", sdpa_bwd_size, sdpa_bwd_run, &a, NULL};
            check_call(&bwd);
            call bwd_stats = {"mha_attention_backward_with_stats", sdpa_bwd_size, sdpa_bwd_stats_run, &a, NULL};
            check_call(&bwd_stats);
        }
        sdpa_free(&a);
    }
}

/* q [B, 1, L, 64] over one float with stride 0 in its batch and rows:
 * any size passes the tensor check without memory behind it. */
static mha_tensor broadcast(float *x, int64_t B, int64_t H, int64_t T, int64_t D)
{
    mha_tensor t = {x, {B, H, T, D}, {0, 0, 0, 1}};
    return t;
}

static void test_sdpa_overflow(void)
{
    mha_ctx *ctx = NULL;
    CHECK_OK(mha_ctx_create(1, &ctx));
    static float x[64];
    mha_attn_desc d;
    mha_attn_desc_init(&d);
    int64_t bytes = 0;
    /* split-K partials: 2^40 rows x 2^22 chunks x 66 floats */
    mha_tensor q = broadcast(x, INT64_C(1) << 40, 1, 1, 64),
               k = broadcast(x, INT64_C(1) << 40, 1, INT64_C(1) << 30, 64);
    mha_tensor o = q;
    CHECK_FAILS(mha_attention_workspace_size(ctx, &o, &q, &k, &k, &d, &bytes), MHA_ERR_INVALID_ARG, "overflows");
    CHECK(bytes == 0, "bytes set on failure");
    CHECK_FAILS(mha_attention(ctx, &o, NULL, &q, &k, &k, &d), MHA_ERR_INVALID_ARG, "overflows");
    /* the backward's rows: 2^58 rows x 64 */
    q = broadcast(x, INT64_C(1) << 58, 1, 1, 64);
    k = broadcast(x, INT64_C(1) << 58, 1, 1, 64);
    o = q;
    CHECK_FAILS(mha_attention_backward_workspace_size(ctx, &o, &k, &k, &q, &k, &k, &o, &o, &d, &bytes),
                MHA_ERR_INVALID_ARG, "overflow");
    CHECK_FAILS(mha_attention_backward(ctx, &o, &k, &k, &q, &k, &k, &o, x, &o, &d), MHA_ERR_INVALID_ARG, "overflow");
    /* batch x heads x queries itself */
    q = broadcast(x, INT64_C(1) << 62, 4, 1, 64);
    k = broadcast(x, INT64_C(1) << 62, 4, 1, 64);
    o = q;
    CHECK_FAILS(mha_attention(ctx, &o, NULL, &q, &k, &k, &d), MHA_ERR_INVALID_ARG, "overflows");
    CHECK(mha_ctx_workspace_bytes(ctx) == 0, "a refused call grew the workspace");
    mha_ctx_free(ctx);
}

/* ---------------------------------------------------------------- */
/* The layer: forward, backward, decoding                            */
/* ---------------------------------------------------------------- */

typedef struct layer_arg {
    mha_layer *layer;
    mha_layer_fwd_args args;
    mha_tensor out, weights, gx;
    bool want_weights;
    mha_kv_cache *cache;
    mha_tensor step_x, step_out;
    float *buffers[6];
} layer_arg;

static mha_status layer_size(const mha_ctx *ctx, void *p, int64_t *bytes)
{
    layer_arg *a = p;
    return mha_layer_workspace_size(ctx, a->layer, &a->out, a->want_weights ? &a->weights : NULL, &a->args, bytes);
}

static mha_status layer_run(mha_ctx *ctx, void *p)
{
    layer_arg *a = p;
    return mha_layer_forward(ctx, a->layer, &a->out, a->want_weights ? &a->weights : NULL, &a->args);
}

/* Records the forward the backward needs, on a context of its own (a
 * backward consumes it), so what is measured is the backward's alone. */
static void record_forward(void *p)
{
    layer_arg *a = p;
    mha_ctx *recorder = NULL;
    CHECK_OK(mha_ctx_create(1, &recorder));
    CHECK_OK(mha_layer_forward(recorder, a->layer, &a->out, NULL, &a->args));
    mha_ctx_free(recorder);
}

static mha_status layer_bwd_size(const mha_ctx *ctx, void *p, int64_t *bytes)
{
    layer_arg *a = p;
    return mha_layer_backward_workspace_size(ctx, a->layer, &a->args, &a->out, &a->gx, NULL, NULL, bytes);
}

static mha_status layer_bwd_run(mha_ctx *ctx, void *p)
{
    layer_arg *a = p;
    return mha_layer_backward(ctx, a->layer, &a->args, &a->out, &a->gx, NULL, NULL);
}

static mha_status decode_size(const mha_ctx *ctx, void *p, int64_t *bytes)
{
    layer_arg *a = p;
    CHECK_OK(mha_kv_cache_truncate(a->cache, 300));
    return mha_layer_decode_workspace_size(ctx, a->layer, a->cache, &a->step_out, &a->step_x, bytes);
}

/* The same step each time: the cache is cut back to its prompt first. */
static mha_status decode_run(mha_ctx *ctx, void *p)
{
    layer_arg *a = p;
    CHECK_OK(mha_kv_cache_truncate(a->cache, 300));
    return mha_layer_decode(ctx, a->layer, a->cache, &a->step_out, &a->step_x);
}

typedef struct layer_case {
    const char *name;
    int64_t E, H, G, head_dim, N, L, S;
    mha_dtype dtype;
    bool rope, bias_kv, weights, strided, train;
} layer_case;

static void layer_setup(const layer_case *c, layer_arg *a)
{
    memset(a, 0, sizeof *a);
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    d.embed_dim = c->E;
    d.num_heads = c->H;
    d.num_kv_heads = c->G;
    d.head_dim = c->head_dim;
    d.dtype = c->dtype;
    d.add_bias_kv = c->bias_kv;
    if (c->rope) d.rope.kind = MHA_ROPE_HALF;
    CHECK_OK(mha_layer_create(&d, &a->layer));
    CHECK_OK(harness_fill_weights(a->layer, 0.01f));
    if (c->train) CHECK_OK(mha_layer_train_init(a->layer));
    float *x = a->buffers[0] = random_floats(c->N * c->S * c->E, 11);
    mha_layer_fwd_args_init(&a->args);
    a->args.query = mha_tensor_3d(x, c->N, c->L, c->E);
    a->args.key = a->args.value = mha_tensor_3d(x, c->N, c->S, c->E);
    int64_t out_floats = c->N * c->L * c->E * (c->strided ? 2 : 1);
    a->out = mha_tensor_3d(a->buffers[1] = random_floats(out_floats, 12), c->N, c->L, c->E);
    if (c->strided) a->out.stride[2] = 2, a->out.stride[1] = 2 * c->E, a->out.stride[0] = 2 * c->E * c->L;
    int64_t S1 = c->S + c->bias_kv;
    a->weights = mha_tensor_4d(a->buffers[2] = random_floats(c->N * c->L * S1, 13), c->N, 1, c->L, S1);
    a->want_weights = c->weights;
    a->gx = mha_tensor_3d(a->buffers[3] = random_floats(c->N * c->L * c->E, 14), c->N, c->L, c->E);
}

static void layer_free(layer_arg *a)
{
    for (int i = 0; i < 6; i++) free(a->buffers[i]);
    mha_kv_cache_free(a->cache);
    mha_layer_free(a->layer);
}

static void test_layer(void)
{
    const layer_case cases[] = {
        {"plain", 64, 4, 4, 0, 2, 40, 40, MHA_DTYPE_F32, false, false, false, false, true},
        {"wider (AMX: x split once for Q, K, V)", 256, 4, 4, 0, 3, 100, 100, MHA_DTYPE_F32, false, false, false, false,
         true},
        {"few rows (split-K)", 64, 4, 2, 0, 1, 3, 90, MHA_DTYPE_F32, true, false, false, false, true},
        {"attn_weights, bias_kv", 32, 2, 2, 0, 2, 20, 20, MHA_DTYPE_F32, false, true, true, false, true},
        {"strided output, narrow heads", 48, 2, 2, 8, 2, 30, 30, MHA_DTYPE_F32, false, false, false, true, true},
        {"bf16, rope, GQA", 64, 4, 2, 0, 1, 50, 50, MHA_DTYPE_BF16, true, false, true, false, false},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const layer_case *c = &cases[i];
        layer_arg a;
        layer_setup(c, &a);
        call fwd = {c->name, layer_size, layer_run, &a, NULL};
        check_call(&fwd);
        if (c->train) {
            mha_layer_tape *tape = NULL;
            CHECK_OK(mha_layer_tape_create(&tape));
            a.args.tape = tape;
            a.want_weights = false;
            call bwd = {"backward", layer_bwd_size, layer_bwd_run, &a, record_forward};
            check_call(&bwd);
            a.args.tape = NULL;
            mha_layer_tape_free(tape);
        }
        layer_free(&a);
    }
}

static void test_decode(void)
{
    mha_dtype dtypes[2] = {MHA_DTYPE_F32, MHA_DTYPE_BF16};
    int64_t steps[2] = {1, 20}; /* split-K, and (float32 cache) tiles */
    for (int t = 0; t < 2; t++)
        for (int s = 0; s < 2; s++) {
            layer_case c = {"decode", 64, 4, 2, 0, 1, 1, 1, MHA_DTYPE_F32, true, false, false, false, false};
            layer_arg a;
            layer_setup(&c, &a);
            CHECK_OK(mha_kv_cache_create(a.layer, 2, 400, dtypes[t], &a.cache));
            float *prompt = a.buffers[4] = random_floats(2 * 300 * 64, 21);
            float *out = a.buffers[5] = random_floats(2 * 300 * 64, 22);
            mha_tensor px = mha_tensor_3d(prompt, 2, 300, 64), po = mha_tensor_3d(out, 2, 300, 64);
            mha_ctx *ctx = NULL;
            CHECK_OK(mha_ctx_create(2, &ctx));
            CHECK_OK(mha_layer_decode(ctx, a.layer, a.cache, &po, &px));
            mha_ctx_free(ctx);
            a.step_x = mha_tensor_3d(prompt, 2, steps[s], 64);
            a.step_out = mha_tensor_3d(out, 2, steps[s], 64);
            call step = {dtypes[t] == MHA_DTYPE_BF16 ? "decode, bf16 cache" : "decode", decode_size, decode_run, &a,
                         NULL};
            check_call(&step);
            layer_free(&a);
        }
}

static void test_layer_overflow(void)
{
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    d.embed_dim = 64;
    d.num_heads = 4;
    mha_layer *layer = NULL;
    CHECK_OK(mha_layer_create(&d, &layer));
    CHECK_OK(harness_fill_weights(layer, 0.01f));
    mha_ctx *ctx = NULL;
    CHECK_OK(mha_ctx_create(1, &ctx));
    static float x[64];
    mha_layer_fwd_args a;
    mha_layer_fwd_args_init(&a);
    a.query = (mha_tensor){x, {INT64_C(1) << 40, INT64_C(1) << 20, 64, 1}, {0, 0, 1, 0}};
    a.key = a.value = a.query;
    mha_tensor out = a.query;
    int64_t bytes = 7;
    CHECK_FAILS(mha_layer_workspace_size(ctx, layer, &out, NULL, &a, &bytes), MHA_ERR_INVALID_ARG, "overflows");
    CHECK(bytes == 0, "bytes set on failure");
    CHECK_FAILS(mha_layer_forward(ctx, layer, &out, NULL, &a), MHA_ERR_INVALID_ARG, "overflows");
    CHECK(mha_ctx_workspace_bytes(ctx) == 0, "a refused call grew the workspace");
    CHECK_FAILS(mha_linear_workspace_size(INT64_C(1) << 40, INT64_C(1) << 30, 8, &bytes), MHA_ERR_INVALID_ARG,
                "too large");
    mha_ctx_free(ctx);
    mha_layer_free(layer);
}

/* The staging area of a strided output must not overlap the heads it is
 * projected from: the strided result equals the contiguous one. */
static void test_strided_output(void)
{
    layer_case c = {"staging", 48, 2, 2, 8, 2, 30, 30, MHA_DTYPE_F32, false, false, false, true, false};
    layer_arg a;
    layer_setup(&c, &a);
    float *w = random_floats(4 * 48 * 48, 31);
    CHECK_OK(mha_layer_set_weight(a.layer, "q_proj.weight", w, 16 * 48));
    CHECK_OK(mha_layer_set_weight(a.layer, "k_proj.weight", w + 1000, 16 * 48));
    CHECK_OK(mha_layer_set_weight(a.layer, "v_proj.weight", w + 2000, 16 * 48));
    CHECK_OK(mha_layer_set_weight(a.layer, "o_proj.weight", w + 3000, 48 * 16));
    mha_ctx *ctx = NULL;
    CHECK_OK(mha_ctx_create(2, &ctx));
    float *plain = random_floats(2 * 30 * 48, 32);
    mha_tensor contiguous = mha_tensor_3d(plain, 2, 30, 48);
    CHECK_OK(mha_layer_forward(ctx, a.layer, &contiguous, NULL, &a.args));
    CHECK_OK(mha_layer_forward(ctx, a.layer, &a.out, NULL, &a.args));
    int64_t differ = 0;
    for (int64_t n = 0; n < 2; n++)
        for (int64_t t = 0; t < 30; t++)
            for (int64_t e = 0; e < 48; e++)
                differ += a.out.data[n * a.out.stride[0] + t * a.out.stride[1] + e * a.out.stride[2]] !=
                          plain[(n * 30 + t) * 48 + e];
    CHECK(differ == 0, "strided output differs from the contiguous one in %lld of %d values", (long long)differ,
          2 * 30 * 48);
    free(plain);
    free(w);
    mha_ctx_free(ctx);
    layer_free(&a);
}

static void test_linear(void)
{
    int64_t bytes = -1;
    CHECK_OK(mha_linear_workspace_size(100, 70, 50, &bytes));
    CHECK(bytes > 0, "mha_linear plans no workspace");
    mha_ctx *ctx = NULL;
    CHECK_OK(mha_ctx_create(2, &ctx));
    CHECK_OK(mha_ctx_reserve(ctx, bytes));
    float *x = random_floats(100 * 70, 41), *w = random_floats(50 * 70, 42), *y = random_floats(100 * 50, 43);
    int64_t before = mha__allocations();
    CHECK_OK(mha_linear(ctx, x, w, NULL, y, 100, 70, 50));
    CHECK(mha__allocations() == before, "mha_linear allocated after reserving its planned size");
    CHECK(mha_ctx_workspace_bytes(ctx) == bytes, "mha_linear grew the workspace past its plan");
    free(x);
    free(w);
    free(y);
    mha_ctx_free(ctx);
}

/* The backward packs W^T and chunks of dy and x: planned, and nothing more. */
static void test_linear_backward(void)
{
    enum { ROWS = 300, IN = 70, OUT = 50 }; /* 300 rows: two chunks of the weight gradient */
    int64_t bytes = -1;
    CHECK_OK(mha_linear_backward_workspace_size(ROWS, IN, OUT, &bytes));
    CHECK(bytes > 0, "mha_linear_backward plans no workspace");
    CHECK_FAILS(mha_linear_backward_workspace_size(INT64_C(1) << 40, INT64_C(1) << 30, 8, &bytes), MHA_ERR_INVALID_ARG,
                "too large");
    CHECK_OK(mha_linear_backward_workspace_size(ROWS, IN, OUT, &bytes));
    mha_ctx *ctx = NULL;
    CHECK_OK(mha_ctx_create(2, &ctx));
    CHECK_OK(mha_ctx_reserve(ctx, bytes));
    float *dy = random_floats(ROWS * OUT, 44), *x = random_floats(ROWS * IN, 45), *w = random_floats(OUT * IN, 46);
    float *dx = random_floats(ROWS * IN, 47), *dw = random_floats(OUT * IN, 48), *db = random_floats(OUT, 49);
    int64_t before = mha__allocations();
    CHECK_OK(mha_linear_backward(ctx, dy, x, w, dx, dw, db, ROWS, IN, OUT));
    CHECK(mha__allocations() == before, "mha_linear_backward allocated after reserving its planned size");
    CHECK(mha_ctx_workspace_bytes(ctx) == bytes, "mha_linear_backward grew the workspace past its plan");
    free(dy);
    free(x);
    free(w);
    free(dx);
    free(dw);
    free(db);
    mha_ctx_free(ctx);
}

static void test_reserve_errors(void)
{
    mha_ctx *ctx = NULL;
    CHECK_OK(mha_ctx_create(1, &ctx));
    CHECK_FAILS(mha_ctx_reserve(NULL, 10), MHA_ERR_MISUSE, "NULL");
    CHECK_FAILS(mha_ctx_reserve(ctx, -1), MHA_ERR_INVALID_ARG, "cannot reserve -1 bytes");
    CHECK_OK(mha_ctx_reserve(ctx, 1000));
    CHECK(mha_ctx_workspace_bytes(ctx) == 1000, "reserve 1000 gave %lld", (long long)mha_ctx_workspace_bytes(ctx));
    CHECK_OK(mha_ctx_reserve(ctx, 10)); /* never shrinks */
    CHECK(mha_ctx_workspace_bytes(ctx) == 1000, "reserve shrank the workspace");
    CHECK(mha_ctx_workspace_bytes(NULL) == 0, "NULL context has a workspace");
    mha_ctx_free(ctx);
}

/* Each item counts its visits; runs and thread numbers must be sane,
 * and with groups (group > 1) a run claimed while more than one group a
 * thread was left must be whole groups. */
typedef struct visits {
    int *count;
    int64_t items, group;
    int threads, bad;
} visits;

static void count_visits(void *arg, int thread, int64_t begin, int64_t end)
{
    visits *v = arg;
    if (thread < 0 || thread >= v->threads || begin < 0 || begin >= end || end > v->items)
        v->bad = 1; /* a flag: any writer sets 1 */
    if (v->group > 1 && v->items - begin > v->threads * v->group && (begin % v->group || end % v->group)) v->bad = 1;
    for (int64_t i = begin; i < end; i++) v->count[i]++;
}

static void test_parallel_loops(void)
{
    const int threads[] = {1, 2, 3, 7};
    const int64_t items[] = {0, 1, 2, 5, 6, 7, 100, 1001};
    for (size_t t = 0; t < sizeof threads / sizeof *threads; t++) {
        mha_ctx *ctx = NULL;
        CHECK_OK(mha_ctx_create(threads[t], &ctx));
        if (!ctx) continue;
        for (size_t n = 0; n < sizeof items / sizeof *items; n++)
            for (int way = 0; way < 5; way++) { /* for, items, groups of 3, 22 and 2000 */
                static const char *names[] = {"parallel_for", "parallel_items", "parallel_groups"};
                static const int64_t groups[] = {1, 1, 3, 22, 2000};
                int64_t count = items[n];
                visits v = {calloc((size_t)count + 1, sizeof(int)), count, groups[way], mha_ctx_threads(ctx), 0};
                if (way == 0) mha__parallel_for(ctx, count, count_visits, &v);
                else if (way == 1) mha__parallel_items(ctx, count, count_visits, &v);
                else mha__parallel_groups(ctx, count, groups[way], count_visits, &v);
                int wrong = 0;
                for (int64_t i = 0; i < count; i++) wrong += v.count[i] != 1;
                CHECK(wrong == 0 && !v.bad,
                      "%s (groups of %lld), %d threads, %lld items: %d items not run exactly once%s",
                      names[way < 2 ? way : 2], (long long)groups[way], threads[t], (long long)count, wrong,
                      v.bad ? ", or a bad range" : "");
                free(v.count);
            }
        mha_ctx_free(ctx);
    }
}

int main(void)
{
    test_parallel_loops();
    test_sdpa();
    test_sdpa_overflow();
    test_layer();
    test_decode();
    test_layer_overflow();
    test_strided_output();
    test_linear();
    test_linear_backward();
    test_reserve_errors();
    return harness_finish("test_workspace");
}
