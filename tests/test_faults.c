/*
 * test_faults.c -- allocation failures at every point of every public
 * entry point (built with -DMHA_FAULT_INJECTION=ON, run under ASan/LSan).
 *
 * Each scenario makes and frees everything it uses.  It runs once without
 * faults for its reference result; then, for n = 1, 2, ..., with the n-th
 * allocation failing, until a run makes fewer than n allocations.  Every
 * faulty run must return MHA_ERR_NOMEM, or succeed with the reference's
 * exact bits (a failure the library can absorb: a worker thread that
 * could not be started); write no output file; and leak nothing
 * (LeakSanitizer, at exit).
 */
#include "harness.h"
#include "core/internal.h"
#include "lab.h"
#include "mha.h"

#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *golden_dir;
static char out_path[256];

enum { RESULT = 64 };

typedef mha_status (*scenario_fn)(float *result);

static float *randoms(int64_t n, uint64_t seed)
{
    float *x = malloc((size_t)n * sizeof *x);
    for (int64_t i = 0; x && i < n; i++) {
        seed = seed * 6364136223846793005u + 1442695040888963407u;
        x[i] = (float)((double)(seed >> 40) * 0x1p-24 * 2.0 - 1.0);
    }
    return x;
}

/* Reading: open a golden file, look a tensor up, read it. */
static mha_status read_file(float *result)
{
    char path[512];
    snprintf(path, sizeof path, "%s/fwd_basic.safetensors", golden_dir);
    mha_st_file *f = NULL;
    mha_status st = mha_st_open(path, &f);
    if (st == MHA_OK) st = mha_st_read_f32(f, "out_proj.bias", result, 16);
    mha_st_close(f);
    return st;
}

/* Writing: two tensors and metadata, saved atomically. */
static mha_status write_file(float *result)
{
    float data[12];
    for (int i = 0; i < 12; i++) data[i] = result[i] = (float)i;
    mha_st_writer *w = NULL;
    mha_status st = mha_st_writer_create(&w);
    if (st == MHA_OK) st = mha_st_writer_add(w, "a", MHA_DTYPE_F32, 2, (int64_t[]){3, 4}, data);
    if (st == MHA_OK) st = mha_st_writer_add(w, "b", MHA_DTYPE_F32, 1, (int64_t[]){5}, data);
    if (st == MHA_OK) st = mha_st_writer_set_metadata(w, "k", "v");
    if (st == MHA_OK) st = mha_st_writer_save(w, out_path);
    mha_st_writer_free(w);
    return st;
}

/* A Llama block loaded from its file, then a causal forward. */
static mha_status load_and_forward(float *result)
{
    char path[512];
    snprintf(path, sizeof path, "%s/blk_llama_gqa.safetensors", golden_dir);
    mha_st_file *f = NULL;
    mha_layer *layer = NULL;
    mha_ctx *ctx = NULL;
    mha_layer_desc hints;
    mha_layer_desc_init(&hints);
    hints.num_heads = 4;
    hints.rope.kind = MHA_ROPE_HALF;
    float *x = randoms(2 * 9 * 32, 1), *y = malloc(2 * 9 * 32 * sizeof *y);
    mha_status st = mha_st_open(path, &f);
    if (st == MHA_OK) st = mha_layer_load(f, "model.layers.0.self_attn.", MHA_NAMES_AUTO, &hints, &layer);
    if (st == MHA_OK) st = mha_ctx_create(2, &ctx);
    if (st == MHA_OK) {
        mha_layer_fwd_args a;
        mha_layer_fwd_args_init(&a);
        a.query = a.key = a.value = mha_tensor_3d(x, 2, 9, 32);
        a.causal = MHA_CAUSAL_TOP_LEFT;
        mha_tensor t = mha_tensor_3d(y, 2, 9, 32);
        st = mha_layer_forward(ctx, layer, &t, NULL, &a);
    }
    if (st == MHA_OK) memcpy(result, y, RESULT * sizeof(float));
    mha_ctx_free(ctx);
    mha_layer_free(layer);
    mha_st_close(f);
    free(x);
    free(y);
    return st;
}

/* An nn.MultiheadAttention with bias_kv and need_weights, bf16 or not. */
static mha_status torch_layer(float *result, mha_dtype dtype)
{
    enum { E = 16, N = 2, L = 5 };
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    d.embed_dim = E;
    d.num_heads = 2;
    d.add_bias_kv = 1;
    d.dtype = dtype;
    mha_layer *layer = NULL;
    mha_ctx *ctx = NULL;
    float *w = randoms(3 * E * E, 2), *x = randoms(N * L * E, 3), y[N * L * E], att[N * L * (L + 1)];
    mha_status st = mha_layer_create(&d, &layer);
    if (st == MHA_OK) st = mha_layer_set_weight(layer, "in_proj_weight", w, 3 * E * E);
    if (st == MHA_OK) st = mha_layer_set_weight(layer, "out_proj.weight", w, E * E);
    if (st == MHA_OK) st = mha_layer_set_weight(layer, "bias_k", w, E);
    if (st == MHA_OK) st = mha_layer_set_weight(layer, "bias_v", w + E, E);
    if (st == MHA_OK) st = mha_ctx_create(3, &ctx);
    if (st == MHA_OK) {
        mha_layer_fwd_args a;
        mha_layer_fwd_args_init(&a);
        a.query = a.key = a.value = mha_tensor_3d(x, N, L, E);
        mha_tensor t = mha_tensor_3d(y, N, L, E), tw = mha_tensor_4d(att, N, 1, L, L + 1);
        st = mha_layer_forward(ctx, layer, &t, &tw, &a);
    }
    if (st == MHA_OK) memcpy(result, y, RESULT * sizeof(float));
    mha_ctx_free(ctx);
    mha_layer_free(layer);
    free(w);
    free(x);
    return st;
}

static mha_status torch_layer_f32(float *result) { return torch_layer(result, MHA_DTYPE_F32); }
static mha_status torch_layer_bf16(float *result) { return torch_layer(result, MHA_DTYPE_BF16); }

/* SDPA forward and backward with GQA, a window and softcap. */
static mha_status attention(float *result)
{
    enum { B = 1, HQ = 4, HKV = 2, L = 20, S = 30, D = 8 };
    float *q = randoms(B * HQ * L * D, 4), *k = randoms(B * HKV * S * D, 5), *v = randoms(B * HKV * S * D, 6);
    float *dout = randoms(B * HQ * L * D, 7);
    float o[B * HQ * L * D], lse[B * HQ * L], dq[B * HQ * L * D], dk[B * HKV * S * D], dv[B * HKV * S * D];
    mha_tensor tq = mha_tensor_4d(q, B, HQ, L, D), tk = mha_tensor_4d(k, B, HKV, S, D),
               tv = mha_tensor_4d(v, B, HKV, S, D);
    mha_tensor to = mha_tensor_4d(o, B, HQ, L, D), tdo = mha_tensor_4d(dout, B, HQ, L, D);
    mha_tensor tdq = mha_tensor_4d(dq, B, HQ, L, D), tdk = mha_tensor_4d(dk, B, HKV, S, D),
               tdv = mha_tensor_4d(dv, B, HKV, S, D);
    mha_attn_desc desc;
    mha_attn_desc_init(&desc);
    desc.enable_gqa = 1;
    desc.window_left = 7;
    desc.softcap = 4.0f;
    desc.causal = MHA_CAUSAL_BOTTOM_RIGHT;
    mha_ctx *ctx = NULL;
    mha_status st = mha_ctx_create(2, &ctx);
    if (st == MHA_OK) st = mha_attention(ctx, &to, lse, &tq, &tk, &tv, &desc);
    if (st == MHA_OK) st = mha_attention_backward(ctx, &tdq, &tdk, &tdv, &tq, &tk, &tv, &to, lse, &tdo, &desc);
    /* The same as a block of a longer sequence (its row sums, its share). */
    double p_sum[B * HQ * L], p_dp[B * HQ * L];
    float ones[B * HQ * L], delta[B * HQ * L];
    for (int i = 0; i < B * HQ * L; i++) ones[i] = 1.0f;
    mha_attn_stats stats = {lse, ones};
    desc.query_offset = 3, desc.query_total = L + 3;
    if (st == MHA_OK) st = mha_attention_backward_row_sums(ctx, p_sum, p_dp, &tq, &tk, &tv, &tdo, &stats, &desc);
    for (int i = 0; st == MHA_OK && i < B * HQ * L; i++) delta[i] = p_sum[i] > 0 ? (float)(p_dp[i] / p_sum[i]) : 0.0f;
    if (st == MHA_OK)
        st = mha_attention_backward_block(ctx, &tdq, &tdk, &tdv, &tq, &tk, &tv, &stats, delta, &tdo, &desc);
    if (st == MHA_OK) {
        memcpy(result, o, 32 * sizeof(float));
        memcpy(result + 32, dk, 32 * sizeof(float));
    }
    mha_ctx_free(ctx);
    free(q), free(k), free(v), free(dout);
    return st;
}

/* A training step of a rotary GQA layer. */
static mha_status training(float *result)
{
    enum { E = 24, N = 2, L = 6 };
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    d.embed_dim = E;
    d.num_heads = 4;
    d.num_kv_heads = 2;
    d.rope.kind = MHA_ROPE_HALF;
    mha_layer *layer = NULL;
    mha_layer_tape *tape = NULL;
    mha_ctx *ctx = NULL;
    float *x = randoms(N * L * E, 8), *dy = randoms(N * L * E, 9), y[N * L * E], gx[N * L * E] = {0};
    mha_status st = mha_layer_create(&d, &layer);
    if (st == MHA_OK) st = mha_layer_train_init(layer);
    if (st == MHA_OK) st = mha_layer_set_grad_storage(layer, NULL, 0); /* new storage of its own: may fail */
    mha_param params[8];
    int64_t n = st == MHA_OK ? mha_layer_params(layer, params, 8) : 0;
    for (int64_t i = 0; i < n; i++) {
        float *r = randoms(params[i].numel, 10 + (uint64_t)i);
        if (r) memcpy(params[i].value, r, (size_t)params[i].numel * sizeof(float));
        free(r);
    }
    if (st == MHA_OK) st = mha_layer_params_changed(layer);
    if (st == MHA_OK) st = mha_layer_tape_create(&tape);
    if (st == MHA_OK) st = mha_ctx_create(2, &ctx);
    if (st == MHA_OK) {
        mha_layer_fwd_args a;
        mha_layer_fwd_args_init(&a);
        a.query = a.key = a.value = mha_tensor_3d(x, N, L, E);
        a.causal = MHA_CAUSAL_TOP_LEFT;
        a.tape = tape;
        mha_tensor ty = mha_tensor_3d(y, N, L, E), tdy = mha_tensor_3d(dy, N, L, E), tgx = mha_tensor_3d(gx, N, L, E);
        st = mha_layer_forward(ctx, layer, &ty, NULL, &a);
        if (st == MHA_OK) st = mha_layer_backward(ctx, layer, &a, &tdy, &tgx, &tgx, &tgx);
    }
    if (st == MHA_OK) {
        memcpy(result, gx, 32 * sizeof(float));
        memcpy(result + 32, params[0].grad, 32 * sizeof(float));
    }
    mha_ctx_free(ctx);
    mha_layer_tape_free(tape);
    mha_layer_free(layer);
    free(x), free(dy);
    return st;
}

/* A prompt and two decoding steps with a bf16 cache. */
static mha_status decoding(float *result)
{
    enum { E = 16, P = 20 };
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    d.embed_dim = E;
    d.num_heads = 4;
    d.num_kv_heads = 1;
    d.rope.kind = MHA_ROPE_INTERLEAVED;
    mha_layer *layer = NULL;
    mha_kv_cache *cache = NULL;
    mha_ctx *ctx = NULL;
    float *w = randoms(E * E, 11), *x = randoms((P + 2) * E, 12), y[(P + 2) * E];
    mha_status st = mha_layer_create(&d, &layer);
    if (st == MHA_OK) st = mha_layer_set_weight(layer, "q_proj.weight", w, E * E);
    if (st == MHA_OK) st = mha_layer_set_weight(layer, "k_proj.weight", w, 4 * E);
    if (st == MHA_OK) st = mha_layer_set_weight(layer, "v_proj.weight", w + 4, 4 * E);
    if (st == MHA_OK) st = mha_layer_set_weight(layer, "o_proj.weight", w, E * E);
    if (st == MHA_OK) st = mha_kv_cache_create(layer, 1, P + 2, MHA_DTYPE_BF16, &cache);
    if (st == MHA_OK) st = mha_ctx_create(2, &ctx);
    for (int64_t t = 0, n = P; st == MHA_OK && t < P + 2; t += n, n = 1) {
        mha_tensor tx = mha_tensor_3d(x + t * E, 1, n, E), ty = mha_tensor_3d(y + t * E, 1, n, E);
        st = mha_layer_decode(ctx, layer, cache, &ty, &tx);
    }
    if (st == MHA_OK) memcpy(result, y + (P + 2) * E - RESULT, RESULT * sizeof(float));
    mha_ctx_free(ctx);
    mha_kv_cache_free(cache);
    mha_layer_free(layer);
    free(w), free(x);
    return st;
}

/* A dense layer forward and backward (mha_linear). */
static mha_status dense_layer(float *result)
{
    enum { ROWS = 5, IN = 7, OUT = 9 };
    float *x = randoms(ROWS * IN, 1), *w = randoms(OUT * IN, 2), *dy = randoms(ROWS * OUT, 3);
    float y[ROWS * OUT], dx[ROWS * IN], dw[OUT * IN] = {0};
    mha_ctx *ctx = NULL;
    mha_status st = x && w && dy ? mha_ctx_create(2, &ctx) : MHA_ERR_NOMEM;
    if (st == MHA_OK) st = mha_linear(ctx, x, w, NULL, y, ROWS, IN, OUT);
    if (st == MHA_OK) st = mha_linear_backward(ctx, dy, x, w, dx, dw, NULL, ROWS, IN, OUT);
    if (st == MHA_OK) memcpy(result, y, 32 * sizeof(float)), memcpy(result + 32, dw, 32 * sizeof(float));
    mha_ctx_free(ctx);
    free(x), free(w), free(dy);
    return st;
}

/* Two training steps of the head lab's model (public API only):
 * attention-only, or GPT-2 blocks with an MLP. */
static mha_status lab_steps(float *result, bool mlp)
{
    lab_config c = {
        .vocab = 10, .context = 8, .embed_dim = 8, .layers = 2, .heads = 2, .kv_heads = 1, .seed = 4, .mlp = mlp};
    lab_model *m = NULL;
    mha_ctx *ctx = NULL;
    int32_t tokens[4 * 8];
    uint64_t state = 5;
    double loss = 0;
    lab_repeated_spans(tokens, 4, 8, 10, &state);
    mha_status st = lab_model_create(&c, &m);
    if (st == MHA_OK) st = mha_ctx_create(2, &ctx);
    for (int k = 0; st == MHA_OK && k < 2; k++) {
        st = lab_model_loss(ctx, m, tokens, 4, 1, NULL, &loss);
        if (st == MHA_OK) st = lab_model_adamw(m, 1e-2, 0.01);
    }
    if (st == MHA_OK) result[0] = (float)loss;
    mha_ctx_free(ctx);
    lab_model_free(m);
    return st;
}

static mha_status lab_steps_attention(float *result) { return lab_steps(result, false); }
static mha_status lab_steps_mlp(float *result) { return lab_steps(result, true); }

static void run(const char *name, scenario_fn fn)
{
    float want[RESULT] = {0}, got[RESULT];
    unlink(out_path);
    CHECK_OK(fn(want));
    unlink(out_path);
    int64_t n = 1, nomem = 0, absorbed = 0;
    for (;; n++) {
        memset(got, 0, sizeof got);
        mha__inject_alloc_failure(n);
        mha_status st = fn(got);
        bool failed = !mha__alloc_failure_pending();
        mha__inject_alloc_failure(0);
        if (!failed) {
            CHECK(st == MHA_OK, "%s: %s without an injected failure", name, mha_status_str(st));
            break;
        }
        struct stat sb;
        CHECK(stat(out_path, &sb) != 0, "%s: allocation %lld failed, yet the output file exists", name, (long long)n);
        unlink(out_path);
        if (st == MHA_OK) {
            absorbed++;
            CHECK(memcmp(got, want, sizeof got) == 0, "%s: allocation %lld failed and the result changed", name,
                  (long long)n);
        } else {
            nomem++;
            CHECK(st == MHA_ERR_NOMEM, "%s: allocation %lld failed with %s (%s), not NOMEM", name, (long long)n,
                  mha_status_str(st), mha_last_error());
        }
    }
    printf("test_faults: %-18s %3lld allocations, each failed once: %lld NOMEM, %lld absorbed\n", name,
           (long long)(n - 1), (long long)nomem, (long long)absorbed);
}

int main(int argc, char **argv)
{
    golden_dir = argc > 1 ? argv[1] : "tests/data/golden";
    snprintf(out_path, sizeof out_path, "/tmp/mha_faults_%d.safetensors", (int)getpid());
    run("read a file", read_file);
    run("write a file", write_file);
    run("load + forward", load_and_forward);
    run("layer f32", torch_layer_f32);
    run("layer bf16", torch_layer_bf16);
    run("attention fwd+bwd", attention);
    run("training step", training);
    run("decoding", decoding);
    run("dense layer", dense_layer);
    run("lab steps", lab_steps_attention);
    run("lab steps (MLP)", lab_steps_mlp);
    unlink(out_path);
    return harness_finish("test_faults");
}
