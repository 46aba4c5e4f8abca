/*
 * test_mpi_decode.c -- decoding over a KV cache split by sequence
 * (mha_mpi.h) under mpirun -np 1 .. 4: shards of uneven length (one
 * empty from 3 ranks on), float32 and int8 caches, against the float64
 * reference over the values the caches hold; the same bits twice; errors
 * on every rank.
 */
#include "mha_mpi.h"
#include "mpi_harness.h"
#include "reference.h"

#include <stdint.h>

static float uniform(float scale) { return (float)mpi_uniform() * scale; }

enum { B = 2, HQ = 8, G = 4, D = 16, T = 53, LQ = 3 };

/* Rank r's tokens: uneven, and none for rank 1 when there are 3 or more. */
static void shard_of(int r, int64_t *start, int64_t *len)
{
    int64_t weights[8], sum = 0, at = 0;
    for (int i = 0; i < size; i++) weights[i] = size >= 3 && i == 1 ? 0 : i + 1, sum += weights[i];
    for (int i = 0; i < r; i++) at += T * weights[i] / sum;
    *start = at;
    *len = r == size - 1 ? T - at : T * weights[r] / sum;
}

static double *to_double(const float *x, int64_t n)
{
    double *d = malloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++) d[i] = x[i];
    return d;
}

/* One case: the cache's dtype and the query rows. */
static void check_decode(mha_ctx *ctx, const mha_layer *layer, mha_dtype dtype, int64_t lq)
{
    enum { NK = B * G * T * D, NQ = B * HQ * LQ * D };
    static float k[NK], v[NK], q[NQ], out[NQ], again[NQ], lse[B * HQ * LQ], held_k[NK], held_v[NK], slopes[HQ];
    for (int i = 0; i < NK; i++) k[i] = uniform(2.0f), v[i] = uniform(1.0f);
    for (int i = 0; i < NQ; i++) q[i] = uniform(2.0f);
    for (int h = 0; h < HQ; h++) slopes[h] = 0.05f * (float)(h + 1);
    int64_t start, len;
    shard_of(rank, &start, &len);
    mha_kv_cache *shard = NULL;
    CHECK_OK(mha_kv_cache_create(layer, B, T, dtype, &shard));
    mha_tensor kt = mha_tensor_4d(k, B, G, T, D), vt = mha_tensor_4d(v, B, G, T, D);
    kt.data += start * D, vt.data += start * D, kt.shape[2] = vt.shape[2] = len;
    if (len) CHECK_OK(mha_kv_cache_append(shard, &kt, &vt));
    /* What the caches hold, gathered whole (zeros elsewhere, then summed). */
    memset(held_k, 0, sizeof held_k), memset(held_v, 0, sizeof held_v);
    mha_tensor hk = mha_tensor_4d(held_k, B, G, T, D), hv = mha_tensor_4d(held_v, B, G, T, D);
    hk.data += start * D, hv.data += start * D, hk.shape[2] = hv.shape[2] = len;
    if (len) CHECK_OK(mha_kv_cache_read(shard, 0, &hk, &hv));
    MPI_Allreduce(MPI_IN_PLACE, held_k, NK, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, held_v, NK, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    mha_attn_desc d;
    mha_attn_desc_init(&d);
    d.causal = MHA_CAUSAL_BOTTOM_RIGHT, d.window_left = 30, d.softcap = 8.0f, d.alibi_slopes = slopes;
    d.enable_gqa = 1;
    mha_tensor tq = mha_tensor_4d(q, B, HQ, lq, D), to = mha_tensor_4d(out, B, HQ, lq, D);
    mha_tensor ta = mha_tensor_4d(again, B, HQ, lq, D);
    CHECK_OK(mha_mpi_kv_cache_attention(ctx, MPI_COMM_WORLD, shard, &to, lse, &tq, &d));
    CHECK_OK(mha_mpi_kv_cache_attention(ctx, MPI_COMM_WORLD, shard, &ta, NULL, &tq, &d));
    int64_t n = B * HQ * lq * D;
    CHECK(memcmp(out, again, (size_t)n * sizeof(float)) == 0, "two runs differ");
    double slopes64[HQ], *q64 = to_double(q, n), *k64 = to_double(held_k, NK), *v64 = to_double(held_v, NK);
    for (int h = 0; h < HQ; h++) slopes64[h] = slopes[h];
    mha_ref_sdpa ref = {B, HQ, G, lq, T, D, D, 0.25, 8.0, MHA_CAUSAL_BOTTOM_RIGHT, 30, -1, slopes64, NULL, NULL};
    double *want = malloc((size_t)(n + B * HQ * lq) * sizeof(double));
    float *base = malloc((size_t)(n + B * HQ * lq) * sizeof(float));
    mha_ref_sdpa_f64(&ref, q64, k64, v64, want, want + n, NULL);
    mha_ref_sdpa_f32(&ref, q, held_k, held_v, base, base + n, NULL);
    char what[120];
    snprintf(what, sizeof what, "%s cache, %lld new rows, %d shards: output", mha_dtype_name(dtype), (long long)lq,
             size);
    CHECK_CLOSE(what, out, want, base, n);
    snprintf(what, sizeof what, "%s cache, %lld new rows, %d shards: lse", mha_dtype_name(dtype), (long long)lq, size);
    CHECK_CLOSE(what, lse, want + n, base + n, B * HQ * lq);
    free(q64), free(k64), free(v64), free(want), free(base);
    mha_kv_cache_free(shard);
}

/* Errors reach every rank and name the rank. */
static void test_failures(mha_ctx *ctx, const mha_layer *layer)
{
    mha_kv_cache *shard = NULL;
    CHECK_OK(mha_kv_cache_create(layer, B, T, MHA_DTYPE_F32, &shard));
    float q[B * HQ * D] = {0}, out[B * HQ * D];
    mha_tensor tq = mha_tensor_4d(q, B, HQ, 1, D), to = mha_tensor_4d(out, B, HQ, 1, D);
    mha_attn_desc d;
    mha_attn_desc_init(&d);
    d.enable_gqa = 1;
    char who[32];
    snprintf(who, sizeof who, "rank %d of %d", size - 1, size);
    if (rank == size - 1) d.key_offset = 5;
    CHECK_FAILS(mha_mpi_kv_cache_attention(ctx, MPI_COMM_WORLD, shard, &to, NULL, &tq, &d), MHA_ERR_INVALID_ARG, who);
    d.key_offset = 0;
    if (size > 1) {
        if (rank == size - 1) tq.shape[1] = to.shape[1] = G; /* a different head count */
        CHECK_FAILS(mha_mpi_kv_cache_attention(ctx, MPI_COMM_WORLD, shard, &to, NULL, &tq, &d), MHA_ERR_INVALID_ARG,
                    "q.shape[1] (heads)");
    }
    mha_kv_cache_free(shard);
}

int main(int argc, char **argv)
{
    mpi_begin(&argc, &argv);
    mha_ctx *ctx = NULL;
    mha_layer *layer = NULL;
    mha_layer_desc ld;
    mha_layer_desc_init(&ld);
    ld.embed_dim = 64, ld.num_heads = HQ, ld.num_kv_heads = G, ld.head_dim = D;
    CHECK_OK(mha_ctx_create(1, &ctx));
    CHECK_OK(mha_layer_create(&ld, &layer));
    if (ctx && layer) {
        check_decode(ctx, layer, MHA_DTYPE_F32, 1);
        check_decode(ctx, layer, MHA_DTYPE_F32, LQ);
        check_decode(ctx, layer, MHA_DTYPE_I8, 1);
        check_decode(ctx, layer, MHA_DTYPE_BF16, LQ);
        test_failures(ctx, layer);
    }
    mha_layer_free(layer);
    mha_ctx_free(ctx);
    return mpi_finish("test_mpi_decode");
}
