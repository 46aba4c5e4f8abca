/*
 * decode.c -- a decoding loop with a KV cache: a Llama-style layer
 * (grouped-query attention, 8 heads sharing 2 key/value heads, rotary
 * embeddings) takes a 6-token prompt in one call, then one token per call;
 * the last token's output is checked against one causal forward pass over
 * the whole sequence.
 */
#include <mha.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

enum { E = 64, HEADS = 8, KV_HEADS = 2, PROMPT = 6, STEPS = 10, T = PROMPT + STEPS };

static float uniform(unsigned *s) /* in [-1, 1) */
{
    *s = *s * 1664525u + 1013904223u;
    return (float)(*s >> 8) / (float)(1u << 23) - 1.0f;
}

/* Sets each of the layer's weights, by the names it reports, to random
 * values of about 1/sqrt(E). */
static mha_status random_weights(mha_layer *layer)
{
    const char *names[12];
    int64_t n = mha_layer_weight_names(layer, names, 12);
    unsigned seed = 3;
    mha_status st = MHA_OK;
    for (int64_t i = 0; i < n && st == MHA_OK; i++) {
        int rank;
        int64_t shape[3], numel;
        st = mha_layer_weight_shape(layer, names[i], &rank, shape, &numel);
        float *w = st == MHA_OK ? malloc((size_t)numel * sizeof(float)) : NULL;
        for (int64_t j = 0; w && j < numel; j++) w[j] = uniform(&seed) / 8;
        if (st == MHA_OK) st = w ? mha_layer_set_weight(layer, names[i], w, numel) : MHA_ERR_NOMEM;
        free(w);
    }
    return st;
}

int main(void)
{
    static float x[T * E], step_out[T * E], full_out[T * E];
    unsigned seed = 11;
    for (int i = 0; i < T * E; i++) x[i] = uniform(&seed);
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    d.embed_dim = E;
    d.num_heads = HEADS;
    d.num_kv_heads = KV_HEADS;
    d.bias = 0;
    d.rope.kind = MHA_ROPE_HALF;
    mha_layer *layer = NULL;
    mha_kv_cache *cache = NULL;
    mha_ctx *ctx = NULL;
    mha_status st = mha_layer_create(&d, &layer);
    if (st == MHA_OK) st = random_weights(layer);
    if (st == MHA_OK) st = mha_kv_cache_create(layer, 1, T, MHA_DTYPE_F32, &cache);
    if (st == MHA_OK) st = mha_ctx_create(0, &ctx);
    for (int pos = 0; pos < T && st == MHA_OK;) { /* the prompt at once, then token by token */
        int n = pos == 0 ? PROMPT : 1;
        mha_tensor in = mha_tensor_3d(x + pos * E, 1, n, E), out = mha_tensor_3d(step_out + pos * E, 1, n, E);
        st = mha_layer_decode(ctx, layer, cache, &out, &in);
        pos += n;
    }
    mha_layer_fwd_args args;
    mha_layer_fwd_args_init(&args);
    args.query = args.key = args.value = mha_tensor_3d(x, 1, T, E);
    args.causal = MHA_CAUSAL_TOP_LEFT;
    mha_tensor full = mha_tensor_3d(full_out, 1, T, E);
    if (st == MHA_OK) st = mha_layer_forward(ctx, layer, &full, NULL, &args);
    double worst = 0;
    for (int i = 0; i < T * E; i++) worst = fmax(worst, fabs((double)step_out[i] - full_out[i]));
    if (st != MHA_OK) fprintf(stderr, "decode: %s\n", mha_last_error());
    else
        printf("%d tokens decoded (%lld cached); largest difference from one full forward: %.3g\n", T,
               (long long)mha_kv_cache_length(cache), worst);
    mha_ctx_free(ctx);
    mha_kv_cache_free(cache);
    mha_layer_free(layer);
    return st == MHA_OK && worst < 1e-5 ? 0 : 1;
}
