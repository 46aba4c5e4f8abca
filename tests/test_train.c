/*
 * test_train.c -- the training API as a user drives it:
 *   - the library's own gradients against central differences of its own
 *     float32 forward, along random directions (inputs and parameters);
 *   - gradients accumulate across backward calls until zeroed;
 *   - gradients in storage the caller owns (mha_layer_set_grad_storage),
 *     and the matrices' values too (mha_layer_set_weight_storage);
 *   - a deferred zero: the next backward writes the gradients;
 *   - input gradients written rather than added (write_input_grads);
 *   - a training step allocates nothing once shapes stop growing;
 *   - writing parameters and calling mha_layer_params_changed changes what
 *     the forward and the backward compute, to the bits of a layer packed
 *     where its weights were set (the packs wait for the next call with a
 *     context; the backward's W^T is kept until the values change);
 *   - plain SGD on the gradients fits a layer to a teacher layer's outputs
 *     (the loss falls by more than 10x);
 *   - parameters are named as the layer's weights were: nn.MultiheadAttention
 *     for a created layer, Llama's for a loaded Llama or GPT-2 block.
 */
#define _POSIX_C_SOURCE 200809L
#include "harness.h"
#include "core/internal.h"
#include "mha.h"

#include <stdint.h>
#include <unistd.h>

static uint64_t rng = 0x853c49e6748fea9bu;

static float uniform(void)
{
    rng = rng * 6364136223846793005u + 1442695040888963407u;
    return (float)((rng >> 40) * 0x1p-24 * 2.0 - 1.0);
}

static void fill(float *x, int64_t n, float scale)
{
    for (int64_t i = 0; i < n; i++) x[i] = uniform() * scale;
}

enum { N = 2, L = 7, E = 32, H = 4, NX = N * L * E };

/* A self-attention layer of the tests' size, its weights zero. */
static mha_layer *created(bool bias_kv)
{
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    d.embed_dim = E;
    d.num_heads = H;
    d.add_bias_kv = bias_kv;
    mha_layer *layer = NULL;
    CHECK_OK(mha_layer_create(&d, &layer));
    return layer;
}

/* A self-attention layer with every parameter random, and its parameters. */
static mha_layer *make_layer(bool bias_kv, mha_param *params, int64_t *n_params)
{
    mha_layer *layer = created(bias_kv);
    CHECK_OK(mha_layer_train_init(layer));
    *n_params = mha_layer_params(layer, params, 8);
    for (int64_t i = 0; i < *n_params; i++) fill(params[i].value, params[i].numel, 0.3f);
    CHECK_OK(mha_layer_params_changed(layer));
    return layer;
}

/* A self-attention training setup: layer, parameters, tape, input x,
 * upstream gradient dy, and the input's gradient gx. */
typedef struct fixture {
    mha_layer *layer;
    mha_param params[8];
    int64_t n_params;
    mha_layer_fwd_args a;
    float x[NX], dy[NX], gx[NX];
} fixture;

static void fixture_init(fixture *f, bool bias_kv, mha_causal causal)
{
    f->layer = make_layer(bias_kv, f->params, &f->n_params);
    mha_layer_tape *tape = NULL;
    CHECK_OK(mha_layer_tape_create(&tape));
    fill(f->x, NX, 1.0f);
    fill(f->dy, NX, 1.0f);
    mha_layer_fwd_args_init(&f->a);
    f->a.query = f->a.key = f->a.value = mha_tensor_3d(f->x, N, L, E);
    f->a.causal = causal;
    f->a.tape = tape;
    mha_layer_zero_grad(f->layer);
}

static void fixture_free(fixture *f)
{
    mha_layer_tape_free(f->a.tape);
    mha_layer_free(f->layer);
}

/* loss = sum(attn_output * dy), the scalar whose gradient backward gives
 * for grad_attn_output = dy. */
static double loss_of(mha_ctx *ctx, mha_layer *layer, mha_layer_fwd_args *a, const float *dy)
{
    float y[NX];
    mha_tensor ty = mha_tensor_3d(y, N, L, E);
    mha_layer_tape *tape = a->tape;
    a->tape = NULL;
    CHECK_OK(mha_layer_forward(ctx, layer, &ty, NULL, a));
    a->tape = tape;
    double loss = 0;
    for (int i = 0; i < NX; i++) loss += (double)y[i] * dy[i];
    return loss;
}

/* One forward with the tape and one backward for dy: parameter gradients
 * accumulate in the layer, the input gradient into gx (zeroed here). */
static void step(mha_ctx *ctx, mha_layer *layer, mha_layer_fwd_args *a, float *dy, float *gx)
{
    float y[NX];
    mha_tensor ty = mha_tensor_3d(y, N, L, E), tdy = mha_tensor_3d(dy, N, L, E), tgx = mha_tensor_3d(gx, N, L, E);
    memset(gx, 0, NX * sizeof(float));
    CHECK_OK(mha_layer_forward(ctx, layer, &ty, NULL, a));
    CHECK_OK(mha_layer_backward(ctx, layer, a, &tdy, &tgx, &tgx, &tgx));
}

/* <grad, v> against (loss(p + h v) - loss(p - h v)) / 2h in float32. The
 * loss is a cubic-free smooth function at this scale; h = 1e-2 keeps the
 * float32 rounding of the difference (~1e-7 / h) below 1e-4 relative. */
static void test_directional_derivatives(mha_ctx *ctx)
{
    static fixture f;
    fixture_init(&f, true, MHA_CAUSAL_TOP_LEFT);
    mha_layer *layer = f.layer;
    mha_param *params = f.params;
    int64_t n_params = f.n_params;
    float *x = f.x, *dy = f.dy, *gx = f.gx;
    mha_layer_fwd_args a = f.a;
    step(ctx, layer, &a, dy, gx);
    /* Each parameter, then the input, along its own random direction. */
    for (int64_t i = 0; i <= n_params; i++) {
        bool input = i == n_params;
        float *value = input ? x : params[i].value, *grad = input ? gx : params[i].grad;
        int64_t n = input ? NX : params[i].numel;
        float *dir = malloc((size_t)n * sizeof(float)), *saved = malloc((size_t)n * sizeof(float));
        fill(dir, n, 1.0f);
        memcpy(saved, value, (size_t)n * sizeof(float));
        double predicted = 0, h = 1e-2, up, down;
        for (int64_t j = 0; j < n; j++) predicted += (double)grad[j] * dir[j];
        for (int64_t j = 0; j < n; j++) value[j] = saved[j] + (float)h * dir[j];
        CHECK_OK(mha_layer_params_changed(layer));
        up = loss_of(ctx, layer, &a, dy);
        for (int64_t j = 0; j < n; j++) value[j] = saved[j] - (float)h * dir[j];
        CHECK_OK(mha_layer_params_changed(layer));
        down = loss_of(ctx, layer, &a, dy);
        memcpy(value, saved, (size_t)n * sizeof(float));
        CHECK_OK(mha_layer_params_changed(layer));
        double measured = (up - down) / (2 * h), err = fabs(measured - predicted);
        if (getenv("MHA_TEST_VERBOSE"))
            printf("%-16s directional derivative %.7g, gradient %.7g\n", input ? "query" : params[i].name, measured,
                   predicted);
        CHECK(err <= 2e-3 * fmax(1.0, fabs(predicted)), "%s: directional derivative %.6g, gradient says %.6g",
              input ? "query" : params[i].name, measured, predicted);
        free(dir);
        free(saved);
    }
    fixture_free(&f);
}

/* Two backward calls without zeroing give twice one call's gradients;
 * zero_grad clears them; the steady state allocates nothing. */
static void test_accumulation_and_allocations(mha_ctx *ctx)
{
    static fixture f;
    fixture_init(&f, false, MHA_CAUSAL_NONE);
    mha_layer *layer = f.layer;
    mha_param *params = f.params;
    int64_t n_params = f.n_params;
    float *dy = f.dy, *gx = f.gx;
    mha_layer_fwd_args a = f.a;
    step(ctx, layer, &a, dy, gx);
    float *once[8];
    for (int64_t i = 0; i < n_params; i++) {
        once[i] = malloc((size_t)params[i].numel * sizeof(float));
        memcpy(once[i], params[i].grad, (size_t)params[i].numel * sizeof(float));
    }
    step(ctx, layer, &a, dy, gx);
    int bad = 0;
    for (int64_t i = 0; i < n_params; i++)
        for (int64_t j = 0; j < params[i].numel; j++)
            bad += fabsf(params[i].grad[j] - 2 * once[i][j]) > 1e-5f * (1 + fabsf(once[i][j]));
    CHECK(bad == 0, "%d gradients are not the sum of two calls", bad);
    mha_layer_zero_grad(layer);
    for (int64_t i = 0; i < n_params; i++)
        for (int64_t j = 0; j < params[i].numel; j++) bad += params[i].grad[j] != 0;
    CHECK(bad == 0, "zero_grad left %d non-zero gradients", bad);
    int64_t before = mha__allocations();
    for (int s = 0; s < 3; s++) {
        mha_layer_zero_grad(layer);
        step(ctx, layer, &a, dy, gx);
        for (int64_t i = 0; i < n_params; i++) params[i].value[0] -= 1e-3f * params[i].grad[0];
        CHECK_OK(mha_layer_params_changed(layer));
    }
    CHECK(mha__allocations() == before, "three training steps made %lld allocations",
          (long long)(mha__allocations() - before));
    for (int64_t i = 0; i < n_params; i++) free(once[i]);
    fixture_free(&f);
}

/* Gradients in storage the caller owns: the same bits as in the layer's
 * own, mha_layer_params pointing into it, accumulation and zeroing there,
 * and back to the layer's own (zeroed) with NULL; the layer never frees
 * or writes the caller's storage after letting it go. */
static void test_caller_storage(mha_ctx *ctx)
{
    static fixture f;
    fixture_init(&f, true, MHA_CAUSAL_NONE);
    int64_t count = 0, total = 0;
    CHECK_OK(mha_layer_grad_storage_size(f.layer, &count));
    for (int64_t i = 0; i < f.n_params; i++) total += f.params[i].numel;
    CHECK(count == total, "storage of %lld floats for parameters of %lld", (long long)count, (long long)total);
    step(ctx, f.layer, &f.a, f.dy, f.gx);
    float *own = malloc((size_t)count * sizeof(float)), *mine = malloc((size_t)(count + 1) * sizeof(float));
    float *storage = mine + 1; /* not 64-byte aligned, as a caller's array may be */
    for (int64_t i = 0, at = 0; i < f.n_params; at += f.params[i].numel, i++)
        memcpy(own + at, f.params[i].grad, (size_t)f.params[i].numel * sizeof(float));
    CHECK(mha_layer_set_grad_storage(f.layer, storage, count - 1) == MHA_ERR_INVALID_ARG &&
              strstr(mha_last_error(), "storage has"),
          "a storage of the wrong size is refused: %s", mha_last_error());
    CHECK_OK(mha_layer_set_grad_storage(f.layer, storage, count));
    mha_param params[8];
    CHECK(mha_layer_params(f.layer, params, 8) == f.n_params, "the same parameters");
    int outside = 0;
    for (int64_t i = 0; i < f.n_params; i++)
        outside += params[i].grad < storage || params[i].grad + params[i].numel > storage + count;
    CHECK(outside == 0, "%d parameters' gradients lie outside the caller's storage", outside);
    mha_layer_zero_grad(f.layer);
    step(ctx, f.layer, &f.a, f.dy, f.gx);
    int differ = 0;
    for (int64_t i = 0, at = 0; i < f.n_params; at += params[i].numel, i++)
        differ += memcmp(own + at, params[i].grad, (size_t)params[i].numel * sizeof(float)) != 0;
    CHECK(differ == 0, "%d gradients in the caller's storage differ from the layer's own", differ);
    step(ctx, f.layer, &f.a, f.dy, f.gx);
    int bad = 0;
    for (int64_t i = 0, at = 0; i < f.n_params; at += params[i].numel, i++)
        for (int64_t j = 0; j < params[i].numel; j++)
            bad += fabsf(params[i].grad[j] - 2 * own[at + j]) > 1e-5f * (1 + fabsf(own[at + j]));
    CHECK(bad == 0, "%d gradients in the caller's storage are not the sum of two calls", bad);
    float first = storage[0];
    CHECK_OK(mha_layer_set_grad_storage(f.layer, NULL, 0));
    CHECK(mha_layer_params(f.layer, params, 8) == f.n_params, "the same parameters");
    bad = 0;
    for (int64_t i = 0; i < f.n_params; i++)
        for (int64_t j = 0; j < params[i].numel; j++) bad += params[i].grad[j] != 0;
    CHECK(bad == 0, "the layer's own storage again holds %d non-zero gradients", bad);
    step(ctx, f.layer, &f.a, f.dy, f.gx);
    CHECK(storage[0] == first, "a backward after NULL wrote the caller's storage");
    CHECK(memcmp(own, params[0].grad, (size_t)params[0].numel * sizeof(float)) == 0,
          "the layer's own storage again gives the same gradients");
    CHECK_OK(mha_layer_set_grad_storage(f.layer, storage, count));
    fixture_free(&f); /* frees the layer with the caller's storage in use: not the layer's to free */
    free(mine);
    free(own);
}

/* mha_layer_zero_grad_deferred: the next backward writes every gradient
 * (the bias_k, bias_v and biases' too) over whatever the storage held, to
 * the bits a zeroed one gets; the one after adds again; and
 * mha_layer_zero_grad cancels a deferred zero. */
static void test_deferred_zero(mha_ctx *ctx)
{
    static fixture f;
    fixture_init(&f, true, MHA_CAUSAL_NONE);
    int64_t count = 0;
    CHECK_OK(mha_layer_grad_storage_size(f.layer, &count));
    float *storage = malloc((size_t)count * sizeof(float)), *zeroed = malloc((size_t)count * sizeof(float));
    CHECK_OK(mha_layer_set_grad_storage(f.layer, storage, count));
    mha_layer_zero_grad(f.layer);
    step(ctx, f.layer, &f.a, f.dy, f.gx);
    memcpy(zeroed, storage, (size_t)count * sizeof(float));
    for (int64_t i = 0; i < count; i++) storage[i] = NAN;
    mha_layer_zero_grad_deferred(f.layer);
    step(ctx, f.layer, &f.a, f.dy, f.gx);
    CHECK(memcmp(storage, zeroed, (size_t)count * sizeof(float)) == 0,
          "a backward after a deferred zero differs from one after mha_layer_zero_grad");
    step(ctx, f.layer, &f.a, f.dy, f.gx);
    int bad = 0;
    for (int64_t i = 0; i < count; i++) bad += !(fabsf(storage[i] - 2 * zeroed[i]) <= 1e-5f * (1 + fabsf(zeroed[i])));
    CHECK(bad == 0, "%d gradients are not the sum of two calls after a deferred zero", bad);
    mha_layer_zero_grad_deferred(f.layer);
    mha_layer_zero_grad(f.layer);
    for (int64_t i = 0; i < count; i++) bad += storage[i] != 0;
    CHECK(bad == 0, "mha_layer_zero_grad after a deferred zero left %d gradients", bad);
    storage[0] = 1.0f; /* a zero no longer deferred: the next backward adds to this */
    step(ctx, f.layer, &f.a, f.dy, f.gx);
    CHECK(fabsf(storage[0] - (1.0f + zeroed[0])) <= 1e-5f * (2 + fabsf(zeroed[0])),
          "mha_layer_zero_grad did not cancel a deferred zero");
    CHECK_OK(mha_layer_set_grad_storage(f.layer, NULL, 0));
    fixture_free(&f);
    free(storage), free(zeroed);
}

/* args.write_input_grads: the backward writes grad_query, grad_key and
 * grad_value over what they held (NaN), to the bits it leaves when adding
 * to zeros: self-attention (one tensor for all three, its three shares
 * summed) and cross-attention with key and value one tensor, on enough
 * rows for the split products where the CPU has them. */
static void test_write_input_grads(mha_ctx *ctx)
{
    enum { RL = 40, M = N * RL * E };
    mha_param params[8];
    int64_t n_params;
    mha_layer *layer = make_layer(false, params, &n_params);
    mha_layer_tape *tape = NULL;
    CHECK_OK(mha_layer_tape_create(&tape));
    static float x[M], kv[M], dy[M], y[M], got[2][2][M]; /* [written][query, key and value] */
    fill(x, M, 1.0f), fill(kv, M, 1.0f), fill(dy, M, 1.0f);
    for (int cross = 0; cross < 2; cross++) {
        for (int write = 0; write < 2; write++) {
            mha_layer_fwd_args a;
            mha_layer_fwd_args_init(&a);
            a.query = mha_tensor_3d(x, N, RL, E);
            a.key = a.value = cross ? mha_tensor_3d(kv, N, RL, E) : a.query;
            a.tape = tape;
            a.write_input_grads = write;
            float *gq = got[write][0], *gkv = cross ? got[write][1] : gq;
            for (int64_t i = 0; i < M; i++) gq[i] = gkv[i] = write ? NAN : 0.0f;
            mha_tensor ty = mha_tensor_3d(y, N, RL, E), tdy = mha_tensor_3d(dy, N, RL, E);
            mha_tensor tq = mha_tensor_3d(gq, N, RL, E), tkv = mha_tensor_3d(gkv, N, RL, E);
            CHECK_OK(mha_layer_forward(ctx, layer, &ty, NULL, &a));
            CHECK_OK(mha_layer_backward(ctx, layer, &a, &tdy, &tq, &tkv, &tkv));
        }
        int differ = 0;
        for (int t = 0; t <= cross; t++) differ += memcmp(got[0][t], got[1][t], sizeof got[0][t]) != 0;
        CHECK(differ == 0, "%s: %d input gradients written differ from added to zeros",
              cross ? "cross-attention" : "self-attention", differ);
    }
    mha_layer_tape_free(tape);
    mha_layer_free(layer);
}

/* A layer like `trained` for inference: every weight set by name from
 * trained's parameters, packed when set (the layer has no training
 * state, so nothing waits for a call). */
static mha_layer *copy_for_inference(const mha_param *params, int64_t n_params)
{
    mha_layer *layer = created(false);
    for (int64_t i = 0; i < n_params; i++)
        CHECK_OK(mha_layer_set_weight(layer, params[i].name, params[i].value, params[i].numel));
    return layer;
}

/* The forward of `layer` over x's first `batches` batches of rows rows
 * (x [N, RL, E], y alike), the inputs times `gain`. */
static void forward_scaled(mha_ctx *ctx, mha_layer *layer, const float *x, int64_t batches, int64_t rows, float gain,
                           float *y)
{
    enum { RL = 40 };
    static float xs[N * RL * E];
    for (int64_t i = 0; i < batches * rows * E; i++) xs[i] = gain * x[i];
    mha_layer_fwd_args a;
    mha_layer_fwd_args_init(&a);
    a.query = a.key = a.value = mha_tensor_3d(xs, batches, rows, E);
    mha_tensor ty = mha_tensor_3d(y, batches, rows, E);
    CHECK_OK(mha_layer_forward(ctx, layer, &ty, NULL, &a));
}

/* A training layer's packs follow its parameters at the next call with a
 * context, on that context's threads: the forward, and the decoding
 * stages, which take the layer const, compute the very bits of a layer
 * packed where its weights were set, after every change of the
 * parameters (several steps, each on 1 and 3 threads).  So do the
 * float32 panels that split products leave for a call that asks
 * (gemm.h): a forward of 5 rows (the FMA GEMM's) and one whose inputs
 * x 100 make every row wide (the exact sums read the panels), each
 * first after a change in some step. */
static void test_packs_follow_params(void)
{
    enum { RL = 40, M = N * RL * E, HD = E / H, FEW = 5 };
    mha_ctx *ctx[2] = {NULL, NULL};
    CHECK_OK(mha_ctx_create(1, &ctx[0]));
    CHECK_OK(mha_ctx_create(3, &ctx[1]));
    mha_param params[8];
    int64_t n_params;
    mha_layer *trained = make_layer(false, params, &n_params);
    static float x[M], y[2][M], q[2][M], k[2][M], v[2][M], few[2][FEW * E], wide[2][M];
    fill(x, M, 1.0f);
    int differ = 0;
    for (int step = 0; step < 4; step++) {
        for (int64_t i = 0; step && i < n_params; i++) /* an optimizer's update */
            for (int64_t j = 0; j < params[i].numel; j++) params[i].value[j] += 0.01f * uniform();
        if (step) CHECK_OK(mha_layer_params_changed(trained));
        mha_layer *packed = copy_for_inference(params, n_params);
        mha_layer *const layers[2] = {trained, packed};
        for (int which = 0; which < 2; which++) {
            mha_ctx *c = ctx[step % 2];
            mha_layer_fwd_args a;
            mha_layer_fwd_args_init(&a);
            a.query = a.key = a.value = mha_tensor_3d(x, N, RL, E);
            mha_tensor ty = mha_tensor_3d(y[which], N, RL, E), tq = mha_tensor_4d(q[which], N, H, RL, HD),
                       tk = mha_tensor_4d(k[which], N, H, RL, HD), tv = mha_tensor_4d(v[which], N, H, RL, HD);
            if (step == 1) forward_scaled(c, layers[which], x, 1, FEW, 1.0f, few[which]);
            if (step == 3) forward_scaled(c, layers[which], x, N, RL, 100.0f, wide[which]);
            if (step == 2) { /* the stages first: they bring the packs up to date */
                CHECK_OK(mha_layer_decode_qkv(c, layers[which], 0, &a.query, &tq, &tk, &tv));
                CHECK_OK(mha_layer_forward(c, layers[which], &ty, NULL, &a));
            } else {
                CHECK_OK(mha_layer_forward(c, layers[which], &ty, NULL, &a));
                CHECK_OK(mha_layer_decode_qkv(c, layers[which], 0, &a.query, &tq, &tk, &tv));
            }
            if (step != 1) forward_scaled(c, layers[which], x, 1, FEW, 1.0f, few[which]);
            if (step != 3) forward_scaled(c, layers[which], x, N, RL, 100.0f, wide[which]);
        }
        differ += memcmp(few[0], few[1], sizeof few[0]) != 0;
        differ += memcmp(wide[0], wide[1], sizeof wide[0]) != 0;
        differ += memcmp(y[0], y[1], sizeof y[0]) != 0;
        differ += memcmp(q[0], q[1], sizeof q[0]) || memcmp(k[0], k[1], sizeof k[0]) || memcmp(v[0], v[1], sizeof v[0]);
        mha_layer_free(packed);
    }
    CHECK(differ == 0, "%d outputs of a training layer differ from a layer packed when its weights were set", differ);
    mha_layer_free(trained);
    mha_ctx_free(ctx[0]);
    mha_ctx_free(ctx[1]);
}

/* The forward of `layer` on x (N batches of RL rows) into y. */
static void forward_into(mha_ctx *ctx, mha_layer *layer, const float *x, float *y)
{
    forward_scaled(ctx, layer, x, N, 40, 1.0f, y);
}

/* mha_layer_set_weight_storage: the matrices' values move into the
 * caller's storage (copied), mha_layer_params' matrix values point into
 * it and the biases' do not, values written there and announced by
 * mha_layer_params_changed are what the forward computes with (to the
 * bits of a layer packed where those weights were set), and NULL moves
 * them back, after which the caller's storage is not read. */
static void test_weight_storage(mha_ctx *ctx)
{
    enum { M = N * 40 * E };
    static float x[M], y[2][M];
    fill(x, M, 1.0f);
    mha_param params[8];
    int64_t n_params, count = 0, matrices = 0;
    mha_layer *layer = make_layer(false, params, &n_params);
    CHECK_OK(mha_layer_weight_storage_size(layer, &count));
    for (int64_t i = 0; i < n_params; i++) matrices += params[i].rank == 2 ? params[i].numel : 0;
    CHECK(count == matrices, "weight storage of %lld floats for matrices of %lld", (long long)count,
          (long long)matrices);
    float *mine = malloc((size_t)(count + 1) * sizeof(float)), *storage = mine + 1; /* any alignment */
    float before = params[0].value[5];
    CHECK(mha_layer_set_weight_storage(layer, storage, count + 1) == MHA_ERR_INVALID_ARG &&
              strstr(mha_last_error(), "storage has"),
          "a storage of the wrong size is refused: %s", mha_last_error());
    CHECK_OK(mha_layer_set_weight_storage(layer, storage, count));
    CHECK(mha_layer_params(layer, params, 8) == n_params, "the same parameters");
    int misplaced = 0;
    for (int64_t i = 0; i < n_params; i++) {
        bool inside = params[i].value >= storage && params[i].value + params[i].numel <= storage + count;
        misplaced += inside != (params[i].rank == 2);
    }
    CHECK(misplaced == 0, "%d parameters' values are not where the storage puts them", misplaced);
    CHECK(params[0].value[5] == before, "the values were not moved with the storage");
    for (int step = 0; step < 2; step++) {
        for (int64_t i = 0; i < n_params; i++) /* an optimizer's update, in place */
            for (int64_t j = 0; j < params[i].numel; j++) params[i].value[j] -= 0.01f * uniform();
        CHECK_OK(mha_layer_params_changed(layer));
        mha_layer *packed = copy_for_inference(params, n_params);
        forward_into(ctx, layer, x, y[0]);
        forward_into(ctx, packed, x, y[1]);
        CHECK(memcmp(y[0], y[1], sizeof y[0]) == 0,
              "step %d: the forward differs from a layer packed with the "
              "storage's values",
              step);
        mha_layer_free(packed);
    }
    CHECK_OK(mha_layer_set_weight_storage(layer, NULL, 0));
    for (int64_t i = 0; i < count; i++) storage[i] = NAN; /* no longer the layer's: never read again */
    CHECK_OK(mha_layer_params_changed(layer));
    forward_into(ctx, layer, x, y[0]);
    CHECK(memcmp(y[0], y[1], sizeof y[0]) == 0, "the values moved back differ");
    CHECK_OK(mha_layer_set_weight_storage(layer, storage, count)); /* NaN now: freed with the layer, not by it */
    mha_layer_free(layer);
    free(mine);
}

/* A training layer's backward follows its parameters too: the W^T it
 * keeps for dX = dY W (mha__weight_transposed) is made again after a
 * change, so its input and parameter gradients are, step after step, the
 * bits of a layer whose weights were set to the same values (80 rows:
 * the split products' path, where the machine has them). */
static void test_backward_follows_params(mha_ctx *ctx)
{
    enum { RL = 40, M = N * RL * E };
    static float x[M], dy[M], y[M], gx[2][M];
    fill(x, M, 1.0f);
    fill(dy, M, 1.0f);
    mha_param params[8], fresh_params[8];
    int64_t n_params;
    mha_layer *trained = make_layer(false, params, &n_params);
    mha_layer_tape *tape = NULL;
    CHECK_OK(mha_layer_tape_create(&tape));
    int differ = 0;
    for (int step = 0; step < 3; step++) {
        for (int64_t i = 0; step && i < n_params; i++) /* an optimizer's update */
            for (int64_t j = 0; j < params[i].numel; j++) params[i].value[j] += 0.01f * uniform();
        if (step) CHECK_OK(mha_layer_params_changed(trained));
        mha_layer *fresh = copy_for_inference(params, n_params);
        CHECK_OK(mha_layer_train_init(fresh));
        mha_layer *const layers[2] = {trained, fresh};
        for (int which = 0; which < 2; which++) {
            mha_layer_fwd_args a;
            mha_layer_fwd_args_init(&a);
            a.query = a.key = a.value = mha_tensor_3d(x, N, RL, E);
            a.tape = tape;
            mha_tensor ty = mha_tensor_3d(y, N, RL, E), tdy = mha_tensor_3d(dy, N, RL, E),
                       tgx = mha_tensor_3d(gx[which], N, RL, E);
            memset(gx[which], 0, sizeof gx[which]);
            mha_layer_zero_grad(layers[which]);
            CHECK_OK(mha_layer_forward(ctx, layers[which], &ty, NULL, &a));
            CHECK_OK(mha_layer_backward(ctx, layers[which], &a, &tdy, &tgx, &tgx, &tgx));
        }
        differ += memcmp(gx[0], gx[1], sizeof gx[0]) != 0;
        CHECK(mha_layer_params(fresh, fresh_params, 8) == n_params, "the same parameters");
        for (int64_t i = 0; i < n_params; i++)
            differ += memcmp(params[i].grad, fresh_params[i].grad, (size_t)params[i].numel * sizeof(float)) != 0;
        mha_layer_free(fresh);
    }
    CHECK(differ == 0, "%d gradients of a training layer differ from a layer given its weights", differ);
    mha_layer_tape_free(tape);
    mha_layer_free(trained);
}

/* Plain SGD on 0.5 |y - y_teacher|^2 / n: the student starts from other
 * random weights; 150 steps must cut the loss by more than 10x. */
static void test_fits_a_teacher(mha_ctx *ctx)
{
    mha_param tp[8], sp[8];
    int64_t nt, ns;
    mha_layer *teacher = make_layer(false, tp, &nt), *student = make_layer(false, sp, &ns);
    mha_layer_tape *tape = NULL;
    CHECK_OK(mha_layer_tape_create(&tape));
    static float x[NX], want[NX], y[NX], dy[NX], gx[NX];
    fill(x, NX, 1.0f);
    mha_layer_fwd_args a;
    mha_layer_fwd_args_init(&a);
    a.query = a.key = a.value = mha_tensor_3d(x, N, L, E);
    mha_tensor twant = mha_tensor_3d(want, N, L, E), ty = mha_tensor_3d(y, N, L, E), tdy = mha_tensor_3d(dy, N, L, E);
    CHECK_OK(mha_layer_forward(ctx, teacher, &twant, NULL, &a));
    a.tape = tape;
    double first = 0, last = 0;
    for (int s = 0; s < 150; s++) {
        mha_layer_zero_grad(student);
        CHECK_OK(mha_layer_forward(ctx, student, &ty, NULL, &a));
        double loss = 0;
        for (int i = 0; i < NX; i++) {
            dy[i] = (y[i] - want[i]) / NX;
            loss += 0.5 * (double)(y[i] - want[i]) * (y[i] - want[i]) / NX;
        }
        if (s == 0) first = loss;
        last = loss;
        CHECK_OK(mha_layer_backward(ctx, student, &a, &tdy, NULL, NULL, NULL));
        for (int64_t i = 0; i < ns; i++)
            for (int64_t j = 0; j < sp[i].numel; j++) sp[i].value[j] -= 0.5f * sp[i].grad[j];
        CHECK_OK(mha_layer_params_changed(student));
    }
    if (getenv("MHA_TEST_VERBOSE")) printf("SGD: loss %.4g -> %.4g in 150 steps\n", first, last);
    CHECK(last < first / 10, "SGD took the loss from %.4g only to %.4g", first, last);
    (void)gx;
    mha_layer_tape_free(tape);
    mha_layer_free(teacher);
    mha_layer_free(student);
}

/* A GPT-2 block (c_attn [E, 3E], c_proj [E, E], both biases) written to a
 * temporary file and loaded: remembered as GPT-2, parameters Llama-named. */
static void test_param_names(void)
{
    mha_param params[8];
    int64_t n;
    mha_layer *created = make_layer(false, params, &n);
    CHECK(mha_layer_names(created) == MHA_NAMES_TORCH, "a created layer is not named the nn.MultiheadAttention way");
    CHECK(n == 4 && strcmp(params[0].name, "in_proj_weight") == 0 && strcmp(params[3].name, "out_proj.bias") == 0,
          "a created layer's parameters are %lld, first \"%s\"", (long long)n, params[0].name);
    mha_layer_free(created);
    CHECK(mha_layer_names(NULL) == MHA_NAMES_AUTO, "mha_layer_names(NULL) is not MHA_NAMES_AUTO");

    static float zeros[3 * E * E];
    char path[] = "/tmp/test_train_gpt2_XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0, "mkstemp failed");
    close(fd);
    mha_st_writer *w = NULL;
    CHECK_OK(mha_st_writer_create(&w));
    const int64_t attn[2] = {E, 3 * E}, attn_b[1] = {3 * E}, proj[2] = {E, E}, proj_b[1] = {E};
    CHECK_OK(mha_st_writer_add(w, "h.0.attn.c_attn.weight", MHA_DTYPE_F32, 2, attn, zeros));
    CHECK_OK(mha_st_writer_add(w, "h.0.attn.c_attn.bias", MHA_DTYPE_F32, 1, attn_b, zeros));
    CHECK_OK(mha_st_writer_add(w, "h.0.attn.c_proj.weight", MHA_DTYPE_F32, 2, proj, zeros));
    CHECK_OK(mha_st_writer_add(w, "h.0.attn.c_proj.bias", MHA_DTYPE_F32, 1, proj_b, zeros));
    CHECK_OK(mha_st_writer_save(w, path));
    mha_st_writer_free(w);
    mha_st_file *file = NULL;
    mha_layer *loaded = NULL;
    mha_layer_desc hints;
    mha_layer_desc_init(&hints);
    hints.num_heads = H;
    CHECK_OK(mha_st_open(path, &file));
    CHECK_OK(mha_layer_load(file, "h.0.attn.", MHA_NAMES_AUTO, &hints, &loaded));
    CHECK(mha_layer_names(loaded) == MHA_NAMES_GPT2, "a GPT-2 block is not remembered as GPT-2");
    CHECK_OK(mha_layer_train_init(loaded));
    n = mha_layer_params(loaded, params, 8);
    CHECK(n == 8 && strcmp(params[0].name, "q_proj.weight") == 0 && strcmp(params[7].name, "o_proj.bias") == 0,
          "a GPT-2 block's parameters are %lld, first \"%s\"", (long long)n, n > 0 ? params[0].name : "");
    mha_layer_free(loaded);
    mha_st_close(file);
    unlink(path);
}

int main(void)
{
    harness_split_all();
    mha_ctx *ctx = NULL;
    CHECK_OK(mha_ctx_create(2, &ctx));
    test_directional_derivatives(ctx);
    test_accumulation_and_allocations(ctx);
    test_caller_storage(ctx);
    test_weight_storage(ctx);
    test_deferred_zero(ctx);
    test_write_input_grads(ctx);
    test_fits_a_teacher(ctx);
    test_packs_follow_params();
    test_backward_follows_params(ctx);
    test_param_names();
    mha_ctx_free(ctx);
    return harness_finish("test_train");
}
