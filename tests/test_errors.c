/*
 * test_errors.c -- every documented error: the status (or exit code), a
 * message that names the problem, and for the CLI no output file left
 * behind.  Leaks are caught by the sanitizer build of the same test.
 */
#define _POSIX_C_SOURCE 200809L

#include "cli.h"
#include "harness.h"

#include <sys/stat.h>
#include <unistd.h>

#include <stdarg.h>
#include <stdint.h>
#include <unistd.h>

static char tmpdir[] = "/tmp/mha_errors_XXXXXX";
static char out_path[512];
static const char *golden_dir;

/* ------------------------------------------------------------------ */
/* The C API                                                           */
/* ------------------------------------------------------------------ */

static void test_ctx_and_info(void)
{
    mha_ctx *ctx = (mha_ctx *)&ctx;
    CHECK_FAILS(mha_ctx_create(-1, &ctx), MHA_ERR_INVALID_ARG, "thread count -1");
    CHECK(ctx == NULL, "ctx not cleared on failure");
    CHECK_FAILS(mha_ctx_create(5000, &ctx), MHA_ERR_INVALID_ARG, "outside 0..1024");
    CHECK_FAILS(mha_ctx_create(1, NULL), MHA_ERR_MISUSE, "NULL");
    mha_info info;
    CHECK_FAILS(mha_info_compute(768, 10, 0, 16, &info), MHA_ERR_INVALID_ARG,
                "embed_dim 768 is not divisible by num_heads 10 (768 / 10 = 76.8)");
    CHECK_FAILS(mha_info_compute(768, 12, 5, 16, &info), MHA_ERR_INVALID_ARG,
                "num_heads 12 is not a multiple of num_kv_heads 5");
    CHECK_FAILS(mha_info_compute(0, 1, 0, 16, &info), MHA_ERR_INVALID_ARG, "embed_dim must be in");
    CHECK_FAILS(mha_info_compute(64, 0, 0, 16, &info), MHA_ERR_INVALID_ARG, "num_heads must be positive");
    CHECK_FAILS(mha_info_compute(64, 4, 0, -1, &info), MHA_ERR_INVALID_ARG, "seq must be in");
    CHECK_OK(mha_info_compute(768, 12, 4, 1024, &info));
    CHECK(info.head_dim == 64 && info.kv_dim == 256, "GQA head_dim %lld kv_dim %lld", (long long)info.head_dim,
          (long long)info.kv_dim);
    CHECK(info.kv_cache_bytes_per_token == 2 * 256 * 4 && info.kv_cache_bytes_per_token_mha == 2 * 768 * 4,
          "kv cache bytes");
    CHECK_OK(mha_info_compute(768, 12, 0, 1024, &info));
    CHECK(info.params == info.params_single_head && info.params == 4 * 768 * 768 + 4 * 768, "MHA parameters");
    CHECK(info.flops_attention == 4.0 * 1024 * 1024 * 768, "attention FLOPs");
    CHECK(strcmp(mha_status_str(MHA_ERR_CORRUPT), "malformed file") == 0 &&
              strcmp(mha_status_str((mha_status)99), "unknown status") == 0,
          "status names");
    CHECK(strcmp(mha_version(), MHA_VERSION_STRING) == 0, "version mismatch");
    double gflops;
    mha_ctx *one = NULL;
    CHECK_OK(mha_ctx_create(1, &one));
    CHECK_FAILS(mha_measure_peak(one, MHA_DTYPE_F32, 0, &gflops), MHA_ERR_INVALID_ARG, "seconds must be in (0, 60]");
    CHECK_FAILS(mha_measure_peak(one, MHA_DTYPE_I32, 1, &gflops), MHA_ERR_INVALID_ARG, "dtype I32 has no peak");
    CHECK_FAILS(mha_measure_peak(NULL, MHA_DTYPE_F32, 1, &gflops), MHA_ERR_MISUSE, "NULL");
    CHECK_FAILS(mha_measure_bandwidth(one, 100, &gflops), MHA_ERR_INVALID_ARG, "bytes must be in 4 KiB");
    CHECK_FAILS(mha_measure_bandwidth(NULL, 1 << 20, &gflops), MHA_ERR_MISUSE, "NULL");
    /* A timed copy copies: every byte lands, in parts split over threads. */
    enum { COPY = 100003 };
    char *src = malloc(COPY), *dst = calloc(COPY, 1);
    for (int i = 0; i < COPY; i++) src[i] = (char)(i * 7 + 3);
    mha_ctx *two = NULL;
    CHECK_OK(mha_ctx_create(2, &two));
    double gbps = 0;
    CHECK_OK(mha_time_copy(two, dst, src, COPY, &gbps));
    CHECK(memcmp(src, dst, COPY) == 0 && gbps > 0, "mha_time_copy: copy differs or rate %g", gbps);
    CHECK_FAILS(mha_time_copy(two, dst, src, 4095, &gbps), MHA_ERR_INVALID_ARG, "bytes must be in 4 KiB");
    CHECK_FAILS(mha_time_copy(two, NULL, src, COPY, &gbps), MHA_ERR_MISUSE, "NULL");
    CHECK_FAILS(mha_time_copy(NULL, dst, src, COPY, &gbps), MHA_ERR_MISUSE, "NULL");
    mha_ctx_free(two);
    free(src);
    free(dst);
    mha_ctx_free(one);
    const char *isa = mha_isa();
    CHECK(strcmp(isa, "generic") == 0 || strcmp(isa, "avx2") == 0 || strcmp(isa, "avx512") == 0 ||
              strcmp(isa, "amx") == 0,
          "isa %s", isa);
}

static void test_attention_args(void)
{
    mha_ctx *ctx = NULL;
    CHECK_OK(mha_ctx_create(1, &ctx));
    float q[2 * 3 * 4], k[2 * 5 * 4], v[2 * 5 * 6], o[2 * 3 * 6], lse[6];
    memset(q, 0, sizeof q);
    memset(k, 0, sizeof k);
    memset(v, 0, sizeof v);
    mha_tensor tq = mha_tensor_4d(q, 1, 2, 3, 4), tk = mha_tensor_4d(k, 1, 2, 5, 4);
    mha_tensor tv = mha_tensor_4d(v, 1, 2, 5, 6), to = mha_tensor_4d(o, 1, 2, 3, 6);
    mha_attn_desc d;
    mha_attn_desc_init(&d);
    CHECK_OK(mha_attention(ctx, &to, lse, &tq, &tk, &tv, &d));
    CHECK_FAILS(mha_attention(NULL, &to, lse, &tq, &tk, &tv, &d), MHA_ERR_MISUSE, "NULL");
    mha_tensor bad = tk;
    bad.shape[3] = 3;
    CHECK_FAILS(mha_attention(ctx, &to, lse, &tq, &bad, &tv, &d), MHA_ERR_INVALID_ARG,
                "key has 3 in its fourth dimension, expected 4");
    bad = tv;
    bad.shape[2] = 4;
    CHECK_FAILS(mha_attention(ctx, &to, lse, &tq, &tk, &bad, &d), MHA_ERR_INVALID_ARG, "value has 4 in its third");
    bad = to;
    bad.shape[3] = 4;
    CHECK_FAILS(mha_attention(ctx, &bad, lse, &tq, &tk, &tv, &d), MHA_ERR_INVALID_ARG, "output has 4 in its fourth");
    bad = tq;
    bad.stride[0] = -1;
    CHECK_FAILS(mha_attention(ctx, &to, lse, &bad, &tk, &tv, &d), MHA_ERR_INVALID_ARG, "negative size or stride");
    bad = tq;
    bad.stride[2] = INT64_MAX / 2;
    CHECK_FAILS(mha_attention(ctx, &to, lse, &bad, &tk, &tv, &d), MHA_ERR_INVALID_ARG, "overflows 64 bits");
    bad = tk;
    bad.data = NULL;
    CHECK_FAILS(mha_attention(ctx, &to, lse, &tq, &bad, &tv, &d), MHA_ERR_MISUSE, "key is NULL");
    mha_tensor k1 = mha_tensor_4d(k, 1, 1, 5, 4), v1 = mha_tensor_4d(v, 1, 1, 5, 6);
    CHECK_FAILS(mha_attention(ctx, &to, lse, &tq, &k1, &v1, &d), MHA_ERR_INVALID_ARG,
                "key has 1 heads but query has 2; set enable_gqa");
    mha_tensor q3 = mha_tensor_4d(q, 1, 3, 2, 4), o3 = mha_tensor_4d(o, 1, 3, 2, 6);
    d.enable_gqa = 1;
    CHECK_FAILS(mha_attention(ctx, &o3, lse, &q3, &tk, &tv, &d), MHA_ERR_INVALID_ARG,
                "query heads 3 are not a multiple of key/value heads 2");
    mha_attn_desc_init(&d);
    d.window_left = -2;
    CHECK_FAILS(mha_attention(ctx, &to, lse, &tq, &tk, &tv, &d), MHA_ERR_INVALID_ARG, "window sizes must be >= -1");
    mha_attn_desc_init(&d);
    d.softcap = -1;
    CHECK_FAILS(mha_attention(ctx, &to, lse, &tq, &tk, &tv, &d), MHA_ERR_INVALID_ARG,
                "softcap must be finite and >= 0");
    d.softcap = NAN;
    CHECK_FAILS(mha_attention(ctx, &to, lse, &tq, &tk, &tv, &d), MHA_ERR_INVALID_ARG, "softcap");
    mha_attn_desc_init(&d);
    d.scale = INFINITY;
    CHECK_FAILS(mha_attention(ctx, &to, lse, &tq, &tk, &tv, &d), MHA_ERR_INVALID_ARG, "scale must be finite");
    mha_attn_desc_init(&d);
    d.causal = (mha_causal)7;
    CHECK_FAILS(mha_attention(ctx, &to, lse, &tq, &tk, &tv, &d), MHA_ERR_INVALID_ARG, "causal mode 7");
    mha_attn_desc_init(&d);
    d.dtype = MHA_DTYPE_F16;
    CHECK_FAILS(mha_attention(ctx, &to, lse, &tq, &tk, &tv, &d), MHA_ERR_INVALID_ARG, "dtype F16 is not supported");
    mha_attn_desc_init(&d);
    d.mask.kind = (mha_mask_kind)9;
    CHECK_FAILS(mha_attention(ctx, &to, lse, &tq, &tk, &tv, &d), MHA_ERR_INVALID_ARG, "mask kind 9");
    d.mask.kind = MHA_MASK_KEEP;
    CHECK_FAILS(mha_attention(ctx, &to, lse, &tq, &tk, &tv, &d), MHA_ERR_MISUSE, "mask data is NULL");
    uint8_t keep[15];
    d.mask = (mha_mask){MHA_MASK_KEEP, keep, {0, 0, INT64_MAX / 2, 1}};
    CHECK_FAILS(mha_attention(ctx, &to, lse, &tq, &tk, &tv, &d), MHA_ERR_INVALID_ARG, "mask strides");

    /* The backward pass: its own arguments, then everything the forward checks. */
    float dq[sizeof q / sizeof q[0]], dk[sizeof k / sizeof k[0]], dv[sizeof v / sizeof v[0]],
        dout[sizeof o / sizeof o[0]];
    memset(dout, 0, sizeof dout);
    mha_tensor tdq = mha_tensor_4d(dq, 1, 2, 3, 4), tdk = mha_tensor_4d(dk, 1, 2, 5, 4);
    mha_tensor tdv = mha_tensor_4d(dv, 1, 2, 5, 6), tdo = mha_tensor_4d(dout, 1, 2, 3, 6);
    mha_attn_desc_init(&d);
    CHECK_OK(mha_attention(ctx, &to, lse, &tq, &tk, &tv, &d));
    CHECK_OK(mha_attention_backward(ctx, &tdq, &tdk, &tdv, &tq, &tk, &tv, &to, lse, &tdo, &d));
    CHECK_FAILS(mha_attention_backward(ctx, &tdq, &tdk, &tdv, &tq, &tk, &tv, &to, NULL, &tdo, &d), MHA_ERR_MISUSE,
                "NULL");
    bad = tdo;
    bad.shape[2] = 2;
    CHECK_FAILS(mha_attention_backward(ctx, &tdq, &tdk, &tdv, &tq, &tk, &tv, &to, lse, &bad, &d), MHA_ERR_INVALID_ARG,
                "grad_output has 2 in its third dimension, expected 3");
    bad = tdk;
    bad.shape[1] = 1;
    CHECK_FAILS(mha_attention_backward(ctx, &tdq, &bad, &tdv, &tq, &tk, &tv, &to, lse, &tdo, &d), MHA_ERR_INVALID_ARG,
                "key.grad has 1 in its second dimension");
    bad = tk;
    bad.shape[3] = 3;
    CHECK_FAILS(mha_attention_backward(ctx, &tdq, &tdk, &tdv, &tq, &bad, &tv, &to, lse, &tdo, &d), MHA_ERR_INVALID_ARG,
                "key has 3 in its fourth dimension");
    d.dtype = MHA_DTYPE_BF16;
    CHECK_FAILS(mha_attention_backward(ctx, &tdq, &tdk, &tdv, &tq, &tk, &tv, &to, lse, &tdo, &d), MHA_ERR_UNSUPPORTED,
                "F32 only");

    /* The pair that keeps the row statistics: the same checks, and a NULL
     * statistic is misuse. */
    float row_max[6], row_sum[6];
    mha_attn_stats stats = {row_max, row_sum}, no_sum = {row_max, NULL};
    mha_attn_desc_init(&d);
    CHECK_OK(mha_attention_with_stats(ctx, &to, &stats, &tq, &tk, &tv, &d));
    CHECK_OK(mha_attention_backward_with_stats(ctx, &tdq, &tdk, &tdv, &tq, &tk, &tv, &to, &stats, &tdo, &d));
    CHECK_FAILS(mha_attention_with_stats(ctx, &to, &no_sum, &tq, &tk, &tv, &d), MHA_ERR_MISUSE,
                "mha_attention_with_stats: NULL argument");
    CHECK_FAILS(mha_attention_backward_with_stats(ctx, &tdq, &tdk, &tdv, &tq, &tk, &tv, &to, NULL, &tdo, &d),
                MHA_ERR_MISUSE, "mha_attention_backward_with_stats: NULL argument");
    CHECK_FAILS(mha_attention_with_stats(ctx, &to, &stats, &tq, &bad, &tv, &d), MHA_ERR_INVALID_ARG,
                "key has 3 in its fourth dimension");

    /* Blocks of a longer sequence: the block backward and its row sums,
     * and positions that do not fit. */
    double p_sum[6], p_dp[6];
    float delta[6] = {0};
    CHECK_OK(mha_attention_backward_row_sums(ctx, p_sum, p_dp, &tq, &tk, &tv, &tdo, &stats, &d));
    CHECK_OK(mha_attention_backward_block(ctx, &tdq, &tdk, &tdv, &tq, &tk, &tv, &stats, delta, &tdo, &d));
    CHECK_FAILS(mha_attention_backward_block(ctx, &tdq, &tdk, &tdv, &tq, &tk, &tv, &stats, NULL, &tdo, &d),
                MHA_ERR_MISUSE, "mha_attention_backward_block: NULL argument");
    CHECK_FAILS(mha_attention_backward_row_sums(ctx, NULL, p_dp, &tq, &tk, &tv, &tdo, &stats, &d), MHA_ERR_MISUSE,
                "mha_attention_backward_row_sums: NULL argument");
    CHECK_FAILS(mha_attention_backward_row_sums(ctx, p_sum, p_dp, &tq, &bad, &tv, &tdo, &stats, &d),
                MHA_ERR_INVALID_ARG, "key has 3 in its fourth dimension");
    d.query_offset = 2, d.query_total = 4;
    CHECK_FAILS(mha_attention(ctx, &to, NULL, &tq, &tk, &tv, &d), MHA_ERR_INVALID_ARG, "positions: query rows 2 +");
    d.query_offset = 0, d.query_total = 0, d.key_offset = -1;
    CHECK_FAILS(mha_attention(ctx, &to, NULL, &tq, &tk, &tv, &d), MHA_ERR_INVALID_ARG, "offsets >= 0");
    mha_ctx_free(ctx);
}

static void test_layer_args(void)
{
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    mha_layer *layer = (mha_layer *)&d;
    d.embed_dim = 768;
    d.num_heads = 10;
    CHECK_FAILS(mha_layer_create(&d, &layer), MHA_ERR_INVALID_ARG, "embed_dim 768 is not divisible by num_heads 10");
    CHECK(layer == NULL, "layer not cleared on failure");
    d.num_heads = 0;
    CHECK_FAILS(mha_layer_create(&d, &layer), MHA_ERR_INVALID_ARG, "num_heads must be positive");
    d.embed_dim = 0;
    d.num_heads = 1;
    CHECK_FAILS(mha_layer_create(&d, &layer), MHA_ERR_INVALID_ARG, "embed_dim must be positive");
    d.embed_dim = INT64_C(1) << 40;
    CHECK_FAILS(mha_layer_create(&d, &layer), MHA_ERR_INVALID_ARG, "too large");
    d.embed_dim = 8;
    d.num_heads = 2;
    d.kdim = -3;
    CHECK_FAILS(mha_layer_create(&d, &layer), MHA_ERR_INVALID_ARG, "kdim and vdim must be >= 0");
    d.kdim = 0;
    d.dtype = MHA_DTYPE_I64;
    CHECK_FAILS(mha_layer_create(&d, &layer), MHA_ERR_INVALID_ARG, "dtype I64 is not supported");
    d.dtype = MHA_DTYPE_F32;
    d.kdim = 5;
    CHECK_OK(mha_layer_create(&d, &layer));
    float w[3 * 64];
    memset(w, 0, sizeof w);
    CHECK_FAILS(mha_layer_set_weight(layer, "in_proj_weight", w, 3 * 64), MHA_ERR_NOT_FOUND,
                "\"in_proj_weight\" is not a weight of this layer configuration");
    CHECK_FAILS(mha_layer_set_weight(layer, "bias_k", w, 8), MHA_ERR_NOT_FOUND, "bias_k");
    CHECK_FAILS(mha_layer_set_weight(layer, "k_proj_weight", w, 64), MHA_ERR_INVALID_ARG,
                "k_proj_weight needs 40 values, got 64");
    CHECK_FAILS(mha_layer_set_weight(layer, "nonsense", w, 1), MHA_ERR_NOT_FOUND, "nonsense");
    CHECK_OK(mha_layer_set_weight(layer, "k_proj_weight", w, 40));
    CHECK_FAILS(mha_layer_set_weight(NULL, "k_proj_weight", w, 40), MHA_ERR_MISUSE, "not a live mha_layer");

    mha_ctx *ctx = NULL;
    CHECK_OK(mha_ctx_create(2, &ctx));
    float x[2 * 4 * 8], key[2 * 4 * 5], y[2 * 3 * 8], att[2 * 3 * 4];
    memset(x, 0, sizeof x);
    memset(key, 0, sizeof key);
    mha_layer_fwd_args a;
    mha_layer_fwd_args_init(&a);
    a.query = mha_tensor_3d(x, 2, 3, 8);
    a.key = mha_tensor_3d(key, 2, 4, 5);
    a.value = mha_tensor_3d(x, 2, 3, 8);
    mha_tensor out = mha_tensor_3d(y, 2, 3, 8), weights = mha_tensor_4d(att, 2, 1, 3, 4);
    CHECK_FAILS(mha_layer_forward(ctx, layer, &out, NULL, &a), MHA_ERR_INVALID_ARG, "value has 3 in its second");
    a.value = mha_tensor_3d(x, 2, 4, 8);
    a.key = mha_tensor_3d(key, 2, 4, 4);
    CHECK_FAILS(mha_layer_forward(ctx, layer, &out, NULL, &a), MHA_ERR_INVALID_ARG,
                "key has 4 in its third dimension, expected 5");
    a.key = mha_tensor_3d(key, 2, 4, 5);
    /* A layer computes only once its matrices are set: biases default to
     * 0 as PyTorch initialises them, matrices have no default. */
    CHECK_FAILS(mha_layer_forward(ctx, layer, &out, &weights, &a), MHA_ERR_MISUSE,
                "weight \"q_proj_weight\" was never set");
    CHECK_OK(mha_layer_set_weight(layer, "q_proj_weight", w, 64));
    CHECK_FAILS(mha_layer_forward(ctx, layer, &out, &weights, &a), MHA_ERR_MISUSE,
                "weight \"v_proj_weight\" was never set");
    CHECK_OK(harness_fill_weights(layer, 0.0f));
    CHECK_OK(mha_layer_forward(ctx, layer, &out, &weights, &a));
    weights.shape[3] = 5;
    CHECK_FAILS(mha_layer_forward(ctx, layer, &out, &weights, &a), MHA_ERR_INVALID_ARG,
                "attn_weights has 5 in its fourth");
    out.shape[1] = 2;
    CHECK_FAILS(mha_layer_forward(ctx, layer, &out, NULL, &a), MHA_ERR_INVALID_ARG, "attn_output has 2 in its second");
    CHECK_FAILS(mha_layer_forward(ctx, NULL, &out, NULL, &a), MHA_ERR_MISUSE, "not a live mha_layer");
    CHECK_FAILS(mha_layer_forward(NULL, layer, &out, NULL, &a), MHA_ERR_MISUSE, "NULL");

    /* Training: every misuse of the tape and the parameters. */
    out.shape[1] = 3;
    mha_layer_tape *tape = NULL, *other_tape = NULL;
    CHECK_OK(mha_layer_tape_create(&tape));
    CHECK_OK(mha_layer_tape_create(&other_tape));
    mha_param params[8];
    float dy_storage[8];
    CHECK(mha_layer_params(layer, params, 8) == -1 && strstr(mha_last_error(), "mha_layer_train_init"),
          "params before train_init: %s", mha_last_error());
    a.tape = tape;
    CHECK_FAILS(mha_layer_forward(ctx, layer, &out, NULL, &a), MHA_ERR_MISUSE, "needs mha_layer_train_init first");
    int64_t grad_count = 0;
    CHECK_FAILS(mha_layer_grad_storage_size(layer, &grad_count), MHA_ERR_MISUSE, "mha_layer_train_init first");
    CHECK_FAILS(mha_layer_set_grad_storage(layer, NULL, 0), MHA_ERR_MISUSE, "mha_layer_train_init first");
    CHECK_FAILS(mha_layer_weight_storage_size(layer, &grad_count), MHA_ERR_MISUSE, "mha_layer_train_init first");
    CHECK_FAILS(mha_layer_set_weight_storage(layer, NULL, 0), MHA_ERR_MISUSE, "mha_layer_train_init first");
    CHECK_OK(mha_layer_train_init(layer));
    CHECK_FAILS(mha_layer_grad_storage_size(layer, NULL), MHA_ERR_MISUSE, "NULL count");
    CHECK_FAILS(mha_layer_set_grad_storage(layer, dy_storage, 7), MHA_ERR_INVALID_ARG, "storage has 7 floats");
    CHECK_FAILS(mha_layer_weight_storage_size(layer, NULL), MHA_ERR_MISUSE, "NULL count");
    CHECK_FAILS(mha_layer_set_weight_storage(layer, dy_storage, 7), MHA_ERR_INVALID_ARG, "storage has 7 floats");
    CHECK_OK(mha_layer_train_init(layer)); /* idempotent */
    CHECK(mha_layer_params(layer, params, 8) == 6, "q/k/v_proj_weight, in_proj_bias, out_proj weight and bias");
    CHECK(mha_layer_params(layer, NULL, 0) == 6, "counting needs no array");
    float dy[2 * 3 * 8], gx[2 * 3 * 8];
    memset(dy, 0, sizeof dy);
    mha_tensor tdy = mha_tensor_3d(dy, 2, 3, 8), tgx = mha_tensor_3d(gx, 2, 3, 8);
    CHECK_FAILS(mha_layer_backward(ctx, layer, &a, &tdy, NULL, NULL, NULL), MHA_ERR_MISUSE, "holds no forward call");
    CHECK_OK(mha_layer_forward(ctx, layer, &out, NULL, &a));
    mha_tensor bad_dy = tdy;
    bad_dy.shape[2] = 7;
    CHECK_FAILS(mha_layer_backward(ctx, layer, &a, &bad_dy, NULL, NULL, NULL), MHA_ERR_INVALID_ARG,
                "grad_attn_output has 7 in its third dimension");
    mha_tensor bad_gx = tgx;
    bad_gx.shape[1] = 2;
    CHECK_FAILS(mha_layer_backward(ctx, layer, &a, &tdy, &bad_gx, NULL, NULL), MHA_ERR_INVALID_ARG, "grad_query has 2");
    mha_layer_fwd_args shorter = a;
    shorter.query = mha_tensor_3d(x, 2, 2, 8);
    CHECK_FAILS(mha_layer_backward(ctx, layer, &shorter, &tdy, NULL, NULL, NULL), MHA_ERR_INVALID_ARG,
                "but the tape recorded N 2, L 3, S 4");
    a.tape = other_tape;
    CHECK_FAILS(mha_layer_backward(ctx, layer, &a, &tdy, NULL, NULL, NULL), MHA_ERR_MISUSE, "holds no forward call");
    a.tape = tape;
    memset(gx, 0, sizeof gx);
    CHECK_OK(mha_layer_backward(ctx, layer, &a, &tdy, &tgx, NULL, NULL));
    CHECK_FAILS(mha_layer_backward(ctx, layer, &a, &tdy, &tgx, NULL, NULL), MHA_ERR_MISUSE,
                "each backward consumes it");
    a.tape = (mha_layer_tape *)&d;
    CHECK_FAILS(mha_layer_forward(ctx, layer, &out, NULL, &a), MHA_ERR_MISUSE, "not a live mha_layer_tape");
    a.tape = NULL;
    CHECK_FAILS(mha_layer_backward(ctx, layer, &a, &tdy, NULL, NULL, NULL), MHA_ERR_MISUSE, "not a live tape");
    CHECK_FAILS(mha_layer_params_changed(NULL), MHA_ERR_MISUSE, "not a live mha_layer");
    CHECK_FAILS(mha_layer_tape_create(NULL), MHA_ERR_MISUSE, "NULL");
    mha_layer_tape_free(tape);
    mha_layer_tape_free(other_tape);
    mha_layer_tape_free(NULL);
    mha_layer_desc bd;
    mha_layer_desc_init(&bd);
    bd.embed_dim = 8;
    bd.num_heads = 2;
    bd.dtype = MHA_DTYPE_BF16;
    mha_layer *bf16_layer = NULL;
    CHECK_OK(mha_layer_create(&bd, &bf16_layer));
    CHECK_FAILS(mha_layer_train_init(bf16_layer), MHA_ERR_UNSUPPORTED, "training computes in F32");
    mha_layer_free(bf16_layer);
    mha_ctx_free(ctx);
    mha_layer_free(layer);
    mha_layer_free(NULL);
    mha_ctx_free(NULL);
    mha_st_close(NULL);
    mha_st_writer_free(NULL);
}

/* ------------------------------------------------------------------ */
/* The CLI                                                             */
/* ------------------------------------------------------------------ */

/* Run `mha argv...` with file descriptor `fd` (1 or 2) captured into
 * text; returns the exit code. */
static int run_captured(int fd, char **argv, int argc, char *text, size_t size)
{
    char path[600];
    snprintf(path, sizeof path, "%s/captured.txt", tmpdir);
    fflush(stdout);
    fflush(stderr);
    int saved = dup(fd);
    FILE *capture = fopen(path, "w+");
    dup2(fileno(capture), fd);
    int rc = mha_cli_main(argc, argv);
    fflush(stdout);
    fflush(stderr);
    dup2(saved, fd);
    close(saved);
    rewind(capture);
    size_t n = fread(text, 1, size - 1, capture);
    text[n] = '\0';
    fclose(capture);
    unlink(path);
    return rc;
}

static int collect_args(char **argv, va_list ap)
{
    int argc = 0;
    argv[argc++] = "mha";
    for (char *a; argc < 39 && (a = va_arg(ap, char *));) argv[argc++] = a;
    argv[argc] = NULL;
    return argc;
}

/* Run `mha args...`; check the exit code is non-zero, stderr is one line
 * containing `needle`, and --out was not written. */
static void expect_cli_error(const char *needle, ...)
{
    char *argv[40], text[2048];
    va_list ap;
    va_start(ap, needle);
    int argc = collect_args(argv, ap);
    va_end(ap);
    int rc = run_captured(2, argv, argc, text, sizeof text);
    CHECK(rc != 0, "mha %s ... exited 0 (expected an error containing \"%s\")", argc > 1 ? argv[1] : "", needle);
    CHECK(strstr(text, needle) != NULL, "stderr \"%s\" lacks \"%s\"", text, needle);
    CHECK(strchr(text, '\n') == text + strlen(text) - 1, "not one line: \"%s\"", text);
    CHECK(access(out_path, F_OK) != 0, "output file left behind after \"%s\"", needle);
    unlink(out_path);
}

/* Run `mha args...`; check it exits 0 and stdout contains `needle`. */
static void expect_cli_output(const char *needle, ...)
{
    char *argv[40], text[8192];
    va_list ap;
    va_start(ap, needle);
    int argc = collect_args(argv, ap);
    va_end(ap);
    int rc = run_captured(1, argv, argc, text, sizeof text);
    CHECK(rc == 0, "mha %s ... exited %d", argc > 1 ? argv[1] : "", rc);
    CHECK(strstr(text, needle) != NULL, "stdout \"%s\" lacks \"%s\"", text, needle);
}

static void test_cli_success(void)
{
    char demo[600];
    snprintf(demo, sizeof demo, "%s/fwd_basic.safetensors", golden_dir);
    expect_cli_output("mha " MHA_VERSION_STRING, "--version", NULL);
    expect_cli_output("commands:", "--help", NULL);
    expect_cli_output("--no-average-attn-weights", "forward", "--help", NULL);
    expect_cli_output("--causal-bottom-right", "sdpa", "--help", NULL);
    expect_cli_output("query.grad, key.grad, value.grad", "sdpa-backward", "--help", NULL);
    expect_cli_output("<name>.grad of every input and weight", "backward", "--help", NULL);
    char blk[600];
    snprintf(blk, sizeof blk, "%s/blk_llama_gqa.safetensors", golden_dir);
    expect_cli_output("last step vs one full forward", "decode", "--weights", blk, "--prefix",
                      "model.layers.0.self_attn.", "--num-heads", "4", "--rope", "half", "--prompt-len", "5", "--steps",
                      "3", "--threads", "2", NULL);
    expect_cli_error("--cache-dtype must be f32, bf16 or int8, got \"f16\"", "decode", "--weights", blk, "--num-heads",
                     "4", "--cache-dtype", "f16", NULL);
    expect_cli_output("int8 cache, 2 threads", "decode", "--weights", blk, "--prefix", "model.layers.0.self_attn.",
                      "--num-heads", "4", "--rope", "half", "--prompt-len", "5", "--steps", "3", "--threads", "2",
                      "--cache-dtype", "int8", NULL);
    expect_cli_error("at least one token in all", "decode", "--weights", blk, "--num-heads", "4", "--prompt-len", "0",
                     "--steps", "0", NULL);
    expect_cli_error("--num-heads is required", "decode", "--weights", blk, NULL);
    expect_cli_output("head dimension: d_k = embed_dim / num_heads = 768 / 12 = 64", "info", "--embed-dim", "768",
                      "--num-heads", "12", NULL);
    expect_cli_output("one head of width 768 has 2,362,368: the same", "info", "--embed-dim", "768", "--num-heads",
                      "12", NULL);
    expect_cli_output("GQA     4 kv heads:     2048 bytes  (3x smaller)  <- this configuration", "info", "--embed-dim",
                      "768", "--num-heads", "12", "--num-kv-heads", "4", NULL);
    expect_cli_output("attention        0.5369 GFLOP", "info", "--embed-dim", "512", "--num-heads", "8", "--seq", "512",
                      NULL);
    expect_cli_output("in_proj_weight                   F32   [48, 16]", "show", demo, NULL);
    expect_cli_output("out_proj.bias F32 [16]", "show", demo, "--tensor", "out_proj.bias", "--max", "2", NULL);
    /* Benchmarks run on tiny shapes here only to check their plumbing. */
    expect_cli_output("\"op\":\"forward\",\"batch\":2,\"seq\":8", "bench", "--batch", "2", "--seq", "8", "--embed-dim",
                      "16", "--num-heads", "2", "--repeat", "2", "--peak-gflops", "1", "--json", NULL);
    expect_cli_output("\"num_kv_heads\":1,\"causal\":true", "bench", "--op", "sdpa", "--seq", "8", "--embed-dim", "16",
                      "--num-heads", "2", "--num-kv-heads", "1", "--is-causal", "--repeat", "1", "--peak-gflops", "1",
                      "--json", NULL);
    expect_cli_output("\"cache_dtype\":\"int8\"", "bench", "--op", "decode", "--kv-seq", "300", "--embed-dim", "16",
                      "--num-heads", "2", "--num-kv-heads", "1", "--cache-dtype", "int8", "--repeat", "1", "--json",
                      NULL);
    expect_cli_output("\"copy_timing\":\"before\"", "bench", "--op", "decode", "--kv-seq", "300", "--embed-dim", "16",
                      "--num-heads", "2", "--repeat", "1", "--json", NULL);
    expect_cli_output("\"copy_timing\":\"between\"", "bench", "--op", "decode", "--kv-seq", "300", "--embed-dim", "16",
                      "--num-heads", "2", "--repeat", "3", "--copy-timing", "between", "--json", NULL);
    expect_cli_output("the median of copies timed between the calls", "bench", "--op", "decode", "--kv-seq", "300",
                      "--embed-dim", "16", "--num-heads", "2", "--repeat", "2", "--copy-timing", "between", NULL);
}

/* Write a safetensors file of F32 (or given dtype) tensors; varargs are
 * (name, dtype, rank, dims..., ) ended by NULL; data is zeros. */
static void write_file(const char *path, ...)
{
    mha_st_writer *w = NULL;
    mha_st_writer_create(&w);
    va_list ap;
    va_start(ap, path);
    for (const char *name; (name = va_arg(ap, const char *));) {
        mha_dtype dt = (mha_dtype)va_arg(ap, int);
        int rank = va_arg(ap, int);
        int64_t shape[8], n = 1;
        for (int d = 0; d < rank; d++) n *= shape[d] = va_arg(ap, int);
        void *zeros = calloc((size_t)(n ? n : 1), 8);
        mha_st_writer_add(w, name, dt, rank, shape, zeros);
        free(zeros);
    }
    va_end(ap);
    CHECK_OK(mha_st_writer_save(w, path));
    mha_st_writer_free(w);
}

static void test_cli_usage(void)
{
    char weights[600];
    snprintf(weights, sizeof weights, "%s/fwd_basic.safetensors", golden_dir);
    expect_cli_error("unknown command \"bogus\"", "bogus", NULL);
    expect_cli_error("--weights is required", "forward", "--inputs", weights, "--out", out_path, "--num-heads", "2",
                     NULL);
    expect_cli_error("--num-heads is required", "forward", "--weights", weights, "--inputs", weights, "--out", out_path,
                     NULL);
    expect_cli_error("unknown flag --frobnicate", "forward", "--frobnicate", NULL);
    expect_cli_error("--num-heads needs an integer, got \"two\"", "forward", "--num-heads", "two", NULL);
    expect_cli_error("--num-heads needs a value", "forward", "--num-heads", NULL);
    expect_cli_error("--batch-first is given twice", "forward", "--batch-first", "--batch-first", NULL);
    expect_cli_error("unexpected argument \"stray\"", "forward", "stray", NULL);
    expect_cli_error("--num-heads must be positive (at most 16777216), got 0", "forward", "--weights", weights,
                     "--inputs", weights, "--out", out_path, "--num-heads", "0", NULL);
    expect_cli_error("--threads must be in 0..1024", "forward", "--weights", weights, "--inputs", weights, "--out",
                     out_path, "--num-heads", "2", "--threads", "-3", NULL);
    expect_cli_error("--scale needs a finite number", "sdpa", "--inputs", weights, "--out", out_path, "--scale", "nan",
                     NULL);
    expect_cli_error("exclude each other", "sdpa", "--inputs", weights, "--out", out_path, "--is-causal",
                     "--causal-bottom-right", NULL);
    expect_cli_error("--window-left must be -1 (unbounded) or more, got -2", "sdpa", "--inputs", weights, "--out",
                     out_path, "--window-left", "-2", NULL);
    expect_cli_error("--softcap must be 0 (off) or positive", "sdpa", "--inputs", weights, "--out", out_path,
                     "--softcap", "-1", NULL);
    expect_cli_error("--dtype must be f32 or bf16, got \"f16\"", "sdpa", "--inputs", weights, "--out", out_path,
                     "--dtype", "f16", NULL);
    expect_cli_error("--dtype must be f32 or bf16, got \"int8\"", "forward", "--weights", weights, "--inputs", weights,
                     "--out", out_path, "--num-heads", "2", "--dtype", "int8", NULL);
    expect_cli_error("embed_dim 768 is not divisible by num_heads 10", "info", "--embed-dim", "768", "--num-heads",
                     "10", NULL);
    expect_cli_error("not a multiple of num_kv_heads 5", "info", "--embed-dim", "768", "--num-heads", "12",
                     "--num-kv-heads", "5", NULL);
    expect_cli_error("--embed-dim is required", "info", "--num-heads", "12", NULL);
    expect_cli_error("--op prefill is not available; use forward, backward, sdpa, sdpa-backward or decode", "bench",
                     "--op", "prefill", NULL);
    expect_cli_error("--op backward is self-attention", "bench", "--op", "backward", "--kv-seq", "9", NULL);
    expect_cli_error("--dtype bf16 is not available for --op sdpa", "bench", "--op", "sdpa", "--dtype", "bf16", NULL);
    expect_cli_error("--copy-timing must be auto, before or between, got \"during\"", "bench", "--op", "decode",
                     "--copy-timing", "during", NULL);
    expect_cli_error("--copy-timing applies to --op decode only", "bench", "--op", "sdpa", "--copy-timing", "before",
                     NULL);
    expect_cli_error("--cache-dtype applies to --op decode only", "bench", "--op", "sdpa", "--cache-dtype", "int8",
                     NULL);
    expect_cli_error("--cache-dtype must be f32, bf16 or int8, got \"i8\"", "bench", "--op", "decode", "--cache-dtype",
                     "i8", NULL);
    expect_cli_error("--op forward is self-attention", "bench", "--kv-seq", "7", NULL);
    expect_cli_error("must be divisible by num_heads", "bench", "--embed-dim", "10", "--num-heads", "3", NULL);
}

/* Every number flag's range, audited: a value out of it is a usage error
 * (exit 2) naming the flag, whatever the other flags and files are. */
static void test_cli_flag_values(void)
{
    char w[600], blk[600];
    snprintf(w, sizeof w, "%s/fwd_basic.safetensors", golden_dir);
    snprintf(blk, sizeof blk, "%s/blk_llama_gqa.safetensors", golden_dir);
    const char *fwd[] = {"--weights", w, "--inputs", w, "--out", out_path, "--num-heads", "2"};
    const char *sdpa[] = {"--inputs", w, "--out", out_path, NULL, NULL, NULL, NULL};
    const char *dec[] = {"--weights", blk, "--num-heads", "4", NULL, NULL, NULL, NULL};
    const char *info[] = {"--embed-dim", "16", "--num-heads", "2", NULL, NULL, NULL, NULL};
    const char *none[] = {NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    const struct {
        const char *cmd, *const *base, *flag, *value;
    } cases[] = {
        {"forward", fwd, "softcap", "-1"},
        {"forward", fwd, "window-left", "-5"},
        {"forward", fwd, "window-right", "-2"},
        {"forward", fwd, "rope-dim", "3"},
        {"forward", fwd, "rope-dim", "-2"},
        {"forward", fwd, "rope-theta", "0.5"},
        {"forward", fwd, "position", "-1"},
        {"forward", fwd, "threads", "-3"},
        {"backward", fwd, "softcap", "-0.5"},
        {"backward", fwd, "window-left", "-9"},
        {"backward", fwd, "threads", "2000"},
        {"sdpa", sdpa, "softcap", "-1"},
        {"sdpa", sdpa, "window-left", "-2"},
        {"sdpa", sdpa, "window-right", "-7"},
        {"sdpa", sdpa, "threads", "-1"},
        {"sdpa-backward", sdpa, "softcap", "-3"},
        {"sdpa-backward", sdpa, "window-right", "-4"},
        {"decode", dec, "prompt-len", "-1"},
        {"decode", dec, "steps", "-5"},
        {"decode", dec, "batch", "0"},
        {"decode", dec, "batch", "5000"},
        {"decode", dec, "softcap", "-1"},
        {"decode", dec, "window-left", "-5"},
        {"info", none, "num-heads", "0"},
        {"info", info, "seq", "0"},
        {"info", info, "num-kv-heads", "0"},
        {"info", none, "embed-dim", "-16"},
        {"bench", none, "seq", "0"},
        {"bench", none, "batch", "-1"},
        {"bench", none, "kv-seq", "0"},
        {"bench", none, "num-kv-heads", "0"},
        {"bench", none, "repeat", "0"},
        {"bench", none, "peak-gflops", "-5"},
        {"bench", none, "embed-dim", "99999999"},
        {"lab", none, "heads", "0"},
        {"lab", none, "steps", "-5"},
        {"lab", none, "gqa-steps", "0"},
        {"lab", none, "layers", "17"},
        {"lab", none, "context", "2"},
        {"lab", none, "vocab", "1"},
        {"lab", none, "batch", "0"},
        {"lab", none, "lr", "0"},
        {"lab", none, "kv-heads", "-1"},
        {"lab", none, "threads", "-2"},
        {"show", none, "max", "0"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *argv[16], text[2048], flag[64], want[96];
        int argc = 0;
        argv[argc++] = "mha";
        argv[argc++] = (char *)cases[i].cmd;
        if (strcmp(cases[i].cmd, "show") == 0) argv[argc++] = w;
        for (int k = 0; k < 8 && cases[i].base[k]; k++) argv[argc++] = (char *)cases[i].base[k];
        snprintf(flag, sizeof flag, "--%s", cases[i].flag);
        argv[argc++] = flag;
        argv[argc++] = (char *)cases[i].value;
        argv[argc] = NULL;
        int rc = run_captured(2, argv, argc, text, sizeof text);
        snprintf(want, sizeof want, "mha %s: --%s ", cases[i].cmd, cases[i].flag);
        CHECK(rc == 2, "mha %s --%s %s exited %d, not 2 (usage)", cases[i].cmd, cases[i].flag, cases[i].value, rc);
        CHECK(strncmp(text, want, strlen(want)) == 0 && strstr(text, cases[i].value),
              "mha %s --%s %s: \"%s\" does not start with \"%s\" and name the value", cases[i].cmd, cases[i].flag,
              cases[i].value, text, want);
        CHECK(access(out_path, F_OK) != 0, "mha %s --%s %s wrote its output", cases[i].cmd, cases[i].flag,
              cases[i].value);
    }
    /* Rules between flags name both. */
    expect_cli_error("--heads 3 does not divide --embed-dim 64", "lab", "--heads", "3", NULL);
    expect_cli_error("--kv-heads 3 does not divide --heads 4", "lab", "--kv-heads", "3", NULL);
    expect_cli_error("--kv-heads 8 is more than --heads 4", "lab", "--kv-heads", "8", NULL);
    /* The pretrained model's lab: a model that is not there, too few sentences. */
    expect_cli_error("/nonexistent/vocab.txt", "lab", "model", "--model", "/nonexistent", NULL);
    expect_cli_error("--sentences must be at least 3", "lab", "model", "--sentences", "2", NULL);
}

static void test_cli_files(void)
{
    char weights[600], p[600], corrupt[600];
    snprintf(weights, sizeof weights, "%s/fwd_basic.safetensors", golden_dir); /* E=16, 2 heads, [5, 2, 16] */
    snprintf(p, sizeof p, "%s/in.safetensors", tmpdir);
    snprintf(corrupt, sizeof corrupt, "%s/corrupt.safetensors", tmpdir);
    FILE *f = fopen(corrupt, "wb");
    fwrite("\x10\0\0\0\0\0\0\0{\"a\":", 1, 13, f);
    fclose(f);
    const char *fwd[] = {"forward", "--weights", weights, "--inputs", p, "--out", out_path, "--num-heads", "2"};
#define FWD(needle, ...) \
    expect_cli_error(needle, fwd[0], fwd[1], fwd[2], fwd[3], fwd[4], fwd[5], fwd[6], fwd[7], fwd[8], __VA_ARGS__)
    char text_file[600];
    snprintf(text_file, sizeof text_file, "%s/notes.txt", tmpdir);
    f = fopen(text_file, "w");
    fputs("These are notes, not tensors: a text file passed by mistake.\n", f);
    fclose(f);
    expect_cli_error("notes.txt: not a safetensors file (no JSON header): header length", "show", text_file, NULL);
    expect_cli_error("cannot open", "forward", "--weights", "/nonexistent/w.safetensors", "--inputs", weights, "--out",
                     out_path, "--num-heads", "2", NULL);
    expect_cli_error("corrupt.safetensors: header length 16 runs past the end", "forward", "--weights", corrupt,
                     "--inputs", weights, "--out", out_path, "--num-heads", "2", NULL);
    expect_cli_error("embed_dim 16 is not divisible by num_heads 3", "forward", "--weights", weights, "--inputs",
                     weights, "--out", out_path, "--num-heads", "3", NULL);
    expect_cli_error("no tensor \"blk.out_proj.weight\"", "forward", "--weights", weights, "--inputs", weights, "--out",
                     out_path, "--num-heads", "2", "--prefix", "blk.", NULL);
    expect_cli_error("cannot write --out", "forward", "--weights", weights, "--inputs", weights, "--out",
                     "/nonexistent/dir/y.safetensors", "--num-heads", "2", NULL);
    /* An output never replaces an input, even under another name. */
    char copy[600], alias[600];
    snprintf(copy, sizeof copy, "%s/copy.safetensors", tmpdir);
    snprintf(alias, sizeof alias, "%s/alias.safetensors", tmpdir);
    FILE *src = fopen(weights, "rb"), *dst = fopen(copy, "wb");
    for (int ch; src && dst && (ch = fgetc(src)) != EOF;) fputc(ch, dst);
    if (src) fclose(src);
    if (dst) fclose(dst);
    CHECK(link(copy, alias) == 0, "hard link for the alias test");
    expect_cli_error("is the input file", "forward", "--weights", copy, "--inputs", copy, "--out", alias, "--num-heads",
                     "2", NULL);
    expect_cli_error("is the input file", "sdpa", "--inputs", copy, "--out", copy, NULL);
    struct stat after;
    CHECK(stat(copy, &after) == 0 && after.st_size > 1000, "the input file survived");
    unlink(alias);
    unlink(copy);

    /* Weights whose names or shapes do not make an nn.MultiheadAttention. */
    char w[600];
    snprintf(w, sizeof w, "%s/w.safetensors", tmpdir);
    const char *bad_w[] = {"forward", "--weights", w, "--inputs", weights, "--out", out_path, "--num-heads", "2"};
#define BADW(needle)                                                                                                   \
    expect_cli_error(needle, bad_w[0], bad_w[1], bad_w[2], bad_w[3], bad_w[4], bad_w[5], bad_w[6], bad_w[7], bad_w[8], \
                     NULL)
    write_file(w, "out_proj.weight", MHA_DTYPE_F32, 2, 16, 15, NULL);
    BADW("\"out_proj.weight\" must be a square [E, E] matrix");
    write_file(w, "out_proj.weight", MHA_DTYPE_F32, 2, 16, 16, "in_proj_weight", MHA_DTYPE_F32, 2, 47, 16, NULL);
    BADW("\"in_proj_weight\" has shape [47, 16], expected [48, 16]");
    write_file(w, "out_proj.weight", MHA_DTYPE_F32, 2, 16, 16, NULL);
    BADW("no tensor \"q_proj_weight\"");
    write_file(w, "out_proj.weight", MHA_DTYPE_F32, 2, 16, 16, "q_proj_weight", MHA_DTYPE_F32, 2, 16, 16,
               "k_proj_weight", MHA_DTYPE_F32, 2, 15, 4, "v_proj_weight", MHA_DTYPE_F32, 2, 16, 4, NULL);
    BADW("\"k_proj_weight\" must be [16, in_features]");
    write_file(w, "out_proj.weight", MHA_DTYPE_F32, 2, 16, 16, "in_proj_weight", MHA_DTYPE_F32, 2, 48, 16,
               "in_proj_bias", MHA_DTYPE_F32, 1, 48, NULL);
    BADW("\"in_proj_bias\" is present but \"out_proj.bias\" is not");
    write_file(w, "out_proj.weight", MHA_DTYPE_F32, 2, 16, 16, "in_proj_weight", MHA_DTYPE_F32, 2, 48, 16,
               "in_proj_bias", MHA_DTYPE_F32, 1, 47, "out_proj.bias", MHA_DTYPE_F32, 1, 16, NULL);
    BADW("\"in_proj_bias\" has shape [47], expected [48]");
    write_file(w, "out_proj.weight", MHA_DTYPE_F32, 2, 16, 16, "in_proj_weight", MHA_DTYPE_F32, 2, 48, 16, "bias_k",
               MHA_DTYPE_F32, 3, 1, 1, 16, NULL);
    BADW("no tensor \"bias_v\"");
    write_file(w, "out_proj.weight", MHA_DTYPE_F32, 2, 16, 16, "in_proj_weight", MHA_DTYPE_I32, 2, 48, 16, NULL);
    BADW("\"in_proj_weight\" has dtype I32; weights must be F32, F64, F16 or BF16");
    /* Llama and GPT-2 blocks whose shapes do not fit. */
    write_file(w, "q_proj.weight", MHA_DTYPE_F32, 2, 15, 16, "k_proj.weight", MHA_DTYPE_F32, 2, 8, 16, "v_proj.weight",
               MHA_DTYPE_F32, 2, 8, 16, "o_proj.weight", MHA_DTYPE_F32, 2, 16, 15, NULL);
    BADW("q_proj.weight has 15 rows, not a multiple of num_heads 2");
    write_file(w, "q_proj.weight", MHA_DTYPE_F32, 2, 16, 16, "k_proj.weight", MHA_DTYPE_F32, 2, 6, 16, "v_proj.weight",
               MHA_DTYPE_F32, 2, 6, 16, "o_proj.weight", MHA_DTYPE_F32, 2, 16, 16, NULL);
    BADW("key/value projections have 6 rows: not a whole number of 8-wide heads");
    write_file(w, "q_proj.weight", MHA_DTYPE_F32, 2, 16, 16, "k_proj.weight", MHA_DTYPE_F32, 2, 8, 16, "v_proj.weight",
               MHA_DTYPE_F32, 2, 8, 16, "o_proj.weight", MHA_DTYPE_F32, 2, 16, 16, "q_proj.bias", MHA_DTYPE_F32, 1, 15,
               NULL);
    BADW("tensor \"q_proj.bias\" has shape [15], expected [16]");
    write_file(w, "c_attn.weight", MHA_DTYPE_F32, 2, 16, 47, "c_proj.weight", MHA_DTYPE_F32, 2, 16, 16, NULL);
    BADW("are not GPT-2's [E, 3 E'] and [E', E]");
    unlink(w);

    write_file(p, "key", MHA_DTYPE_F32, 3, 5, 2, 16, NULL);
    FWD("has no tensor named \"query\"", NULL);
    write_file(p, "query", MHA_DTYPE_F32, 3, 5, 2, 16, "key", MHA_DTYPE_F32, 3, 5, 2, 16, NULL);
    FWD("has \"key\" but no \"value\"", NULL);
    write_file(p, "query", MHA_DTYPE_I64, 3, 5, 2, 16, NULL);
    FWD("tensor \"query\" has dtype I64", NULL);
    write_file(p, "query", MHA_DTYPE_F32, 4, 1, 5, 2, 16, NULL);
    FWD("query has shape [1, 5, 2, 16]", NULL);
    write_file(p, "query", MHA_DTYPE_F32, 3, 5, 2, 12, NULL);
    FWD("query has 12 features but the weights' embed_dim is 16", NULL);
    write_file(p, "query", MHA_DTYPE_F32, 3, 5, 2, 16, "key", MHA_DTYPE_F32, 3, 7, 3, 16, "value", MHA_DTYPE_F32, 3, 7,
               3, 16, NULL);
    FWD("key has shape [7, 3, 16]", NULL);
    write_file(p, "query", MHA_DTYPE_F32, 3, 5, 2, 16, "key", MHA_DTYPE_F32, 3, 7, 2, 16, "value", MHA_DTYPE_F32, 3, 6,
               2, 16, NULL);
    FWD("value has shape [6, 2, 16]", NULL);
    write_file(p, "query", MHA_DTYPE_F32, 3, 5, 2, 16, "attn_mask", MHA_DTYPE_BOOL, 2, 5, 4, NULL);
    FWD("attn_mask has shape [5, 4]; it must be [L, S] = [5, 5] or [N*num_heads, L, S] = [4, 5, 5]", NULL);
    write_file(p, "query", MHA_DTYPE_F32, 3, 5, 2, 16, "attn_mask", MHA_DTYPE_I32, 2, 5, 5, NULL);
    FWD("attn_mask\" has dtype I32", NULL);
    write_file(p, "query", MHA_DTYPE_F32, 3, 5, 2, 16, "key_padding_mask", MHA_DTYPE_BOOL, 2, 5, 2, NULL);
    FWD("key_padding_mask has shape [5, 2]; it must be [N, S]", NULL);
    write_file(p, "query", MHA_DTYPE_F32, 2, 5, 16, "key_padding_mask", MHA_DTYPE_BOOL, 2, 1, 5, NULL);
    FWD("key_padding_mask has shape [1, 5]; it must be [S]", NULL);

    const char *bw[] = {"backward", "--weights", weights, "--inputs", p, "--out", out_path, "--num-heads", "2"};
#define BWD(needle, ...) \
    expect_cli_error(needle, bw[0], bw[1], bw[2], bw[3], bw[4], bw[5], bw[6], bw[7], bw[8], __VA_ARGS__)
    write_file(p, "query", MHA_DTYPE_F32, 3, 5, 2, 16, NULL);
    BWD("has no tensor named \"grad_attn_output\"", NULL);
    FWD("--names must be auto, torch, llama, gpt2 or bert, got \"t5\"", "--names", "t5", NULL);
    FWD("no tensor \"attention.self.query.weight\"", "--names", "bert", NULL);
    FWD("--rope must be none, half or interleaved, got \"yes\"", "--rope", "yes", NULL);
    FWD("no tensor \"q_proj.weight\"", "--names", "llama", NULL);
    FWD("rope.dim must be even and at most head_dim 8", "--rope", "half", "--rope-dim", "10", NULL);
    BWD("--need-weights and --no-average-attn-weights are forward outputs", "--need-weights", NULL);
    BWD("--dtype must be f32 (gradients are float32 only), got \"bf16\"", "--dtype", "bf16", NULL);
    write_file(p, "query", MHA_DTYPE_F32, 3, 5, 2, 16, "grad_attn_output", MHA_DTYPE_F32, 3, 5, 2, 15, NULL);
    BWD("grad_attn_output has shape [5, 2, 15]; it must match attn_output, which has query's shape [5, 2, 16]", NULL);
    write_file(p, "query", MHA_DTYPE_F32, 3, 5, 2, 12, "grad_attn_output", MHA_DTYPE_F32, 3, 5, 2, 12, NULL);
    BWD("query has 12 features but the weights' embed_dim is 16", NULL);

    const char *sd[] = {"sdpa", "--inputs", p, "--out", out_path};
#define SDPA(needle, ...) expect_cli_error(needle, sd[0], sd[1], sd[2], sd[3], sd[4], __VA_ARGS__)
    write_file(p, "query", MHA_DTYPE_F32, 3, 2, 3, 8, "key", MHA_DTYPE_F32, 4, 1, 2, 3, 8, "value", MHA_DTYPE_F32, 4, 1,
               2, 3, 8, NULL);
    SDPA("query has shape [2, 3, 8]; it must be [B, Hq, L, D]", NULL);
    write_file(p, "query", MHA_DTYPE_F32, 4, 1, 2, 3, 8, "value", MHA_DTYPE_F32, 4, 1, 2, 3, 8, NULL);
    SDPA("has no tensor named \"key\"", NULL);
    write_file(p, "query", MHA_DTYPE_F32, 4, 1, 4, 3, 8, "key", MHA_DTYPE_F32, 4, 1, 2, 5, 8, "value", MHA_DTYPE_F32, 4,
               1, 2, 5, 8, NULL);
    SDPA("key has 2 heads but query has 4; set enable_gqa", NULL);
    write_file(p, "query", MHA_DTYPE_F32, 4, 1, 2, 3, 8, "key", MHA_DTYPE_F32, 4, 1, 2, 5, 7, "value", MHA_DTYPE_F32, 4,
               1, 2, 5, 8, NULL);
    SDPA("key has 7 in its fourth dimension, expected 8", NULL);
    write_file(p, "query", MHA_DTYPE_F32, 4, 1, 2, 3, 8, "key", MHA_DTYPE_F32, 4, 1, 2, 5, 8, "value", MHA_DTYPE_F32, 4,
               1, 2, 5, 8, "attn_mask", MHA_DTYPE_BOOL, 2, 3, 4, NULL);
    SDPA("attn_mask of shape [3, 4] does not broadcast to [B, H, L, S] = [1, 2, 3, 5]", NULL);
    write_file(p, "query", MHA_DTYPE_F32, 4, 1, 2, 3, 8, "key", MHA_DTYPE_F32, 4, 1, 2, 5, 8, "value", MHA_DTYPE_F32, 4,
               1, 2, 5, 8, "alibi_slopes", MHA_DTYPE_F32, 1, 3, NULL);
    SDPA("alibi_slopes must have shape [Hq] = [2]", NULL);
    write_file(p, "query", MHA_DTYPE_F32, 4, 1, 2, 3, 8, "key", MHA_DTYPE_F32, 4, 1, 2, 5, 8, "value", MHA_DTYPE_F32, 4,
               1, 2, 5, 8, "attn_mask", MHA_DTYPE_BOOL, 5, 1, 1, 1, 3, 5, NULL);
    SDPA("attn_mask has 5 dimensions", NULL);
    /* Sizes from a file that would overflow an allocation are refused. */
    write_file(p, "query", MHA_DTYPE_F32, 4, 1 << 20, 1 << 20, 1 << 20, 0, "key", MHA_DTYPE_F32, 4, 1 << 20, 1, 5, 0,
               "value", MHA_DTYPE_F32, 4, 1 << 20, 1, 5, 1, NULL);
    SDPA("more elements than memory can address", NULL);

    const char *sb[] = {"sdpa-backward", "--inputs", p, "--out", out_path};
#define SDPA_BWD(needle, ...) expect_cli_error(needle, sb[0], sb[1], sb[2], sb[3], sb[4], __VA_ARGS__)
    write_file(p, "query", MHA_DTYPE_F32, 4, 1, 2, 3, 8, "key", MHA_DTYPE_F32, 4, 1, 2, 5, 8, "value", MHA_DTYPE_F32, 4,
               1, 2, 5, 8, NULL);
    SDPA_BWD("has no tensor named \"grad_output\"", NULL);
    SDPA_BWD("--dtype must be f32 (gradients are float32 only), got \"bf16\"", "--dtype", "bf16", NULL);
    write_file(p, "query", MHA_DTYPE_F32, 4, 1, 2, 3, 8, "key", MHA_DTYPE_F32, 4, 1, 2, 5, 8, "value", MHA_DTYPE_F32, 4,
               1, 2, 5, 8, "grad_output", MHA_DTYPE_F32, 4, 1, 2, 3, 7, NULL);
    SDPA_BWD("grad_output has shape [1, 2, 3, 7]; it must match the output, [1, 2, 3, 8]", NULL);
    unlink(p);
    unlink(corrupt);
    unlink(text_file);
}

int main(int argc, char **argv)
{
    golden_dir = argc > 1 ? argv[1] : "tests/data/golden";
    if (!mkdtemp(tmpdir)) return 1;
    snprintf(out_path, sizeof out_path, "%s/out.safetensors", tmpdir);
    test_ctx_and_info();
    test_attention_args();
    test_layer_args();
    test_cli_success();
    test_cli_usage();
    test_cli_flag_values();
    test_cli_files();
    rmdir(tmpdir);
    return harness_finish("test_errors");
}
