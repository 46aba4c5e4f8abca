/*
 * info.c -- the arithmetic behind `mha info`: head width, parameters,
 * FLOPs, bytes and KV-cache size of one self-attention layer.
 *
 * Counting rules (docs/ARCHITECTURE.md repeats them):
 *   projections  2 * N * E * (E_q + E_k + E_v + E_o) multiply-adds x2
 *   attention    4 * N * S * h * d  (Q K^T and P V, 2 FLOPs per MAC)
 *   bytes        float32 weights, plus every activation written once and
 *                read once (input, Q, K, V, head outputs, output)
 */
#include "core/internal.h"

#include <string.h>

mha_status mha_info_compute(int64_t E, int64_t h, int64_t g, int64_t seq, mha_info *info)
{
    if (!info) return mha__fail(MHA_ERR_MISUSE, "mha_info_compute: info is NULL");
    if (E < 1 || E > (INT64_C(1) << 24))
        return mha__fail(MHA_ERR_INVALID_ARG, "embed_dim must be in 1..16777216, got %lld", (long long)E);
    if (h < 1) return mha__fail(MHA_ERR_INVALID_ARG, "num_heads must be positive, got %lld", (long long)h);
    if (E % h)
        return mha__fail(MHA_ERR_INVALID_ARG,
                         "embed_dim %lld is not divisible by num_heads %lld (%lld / %lld = %.4g), so the heads "
                         "cannot have equal width",
                         (long long)E, (long long)h, (long long)E, (long long)h, (double)E / (double)h);
    if (g == 0) g = h;
    if (g < 1 || h % g)
        return mha__fail(MHA_ERR_INVALID_ARG,
                         "num_heads %lld is not a multiple of num_kv_heads %lld, so query heads cannot share "
                         "key/value heads in equal groups",
                         (long long)h, (long long)g);
    if (seq < 0 || seq > (INT64_C(1) << 32))
        return mha__fail(MHA_ERR_INVALID_ARG, "seq must be in 0..4294967296, got %lld", (long long)seq);
    memset(info, 0, sizeof *info);
    int64_t d = E / h, kv = g * d;
    double N = (double)seq;
    info->head_dim = d;
    info->kv_dim = kv;
    /* W_q, W_o: E x E; W_k, W_v: kv x E; biases E + kv + kv + E. */
    info->params = 2 * E * E + 2 * kv * E + 2 * E + 2 * kv;
    info->params_single_head = 4 * E * E + 4 * E;
    info->flops_projections = 2.0 * N * (double)E * (double)(E + kv + kv + E);
    info->flops_attention = 4.0 * N * N * (double)(h * d);
    info->bytes_weights = 4.0 * (double)info->params;
    /* input read 3x (Q, K, V projections), Q/K/V written and read,
     * head outputs written and read, output written. */
    info->bytes_activations = 4.0 * N * (3.0 * (double)E + 2.0 * (double)(E + 2 * kv) + 2.0 * (double)E + (double)E);
    info->kv_cache_bytes_per_token = 2 * kv * 4;
    info->kv_cache_bytes_per_token_mha = 2 * E * 4;
    return MHA_OK;
}
