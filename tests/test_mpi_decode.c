/*
 * test_mpi_decode.c -- decoding over a KV cache split by sequence
 * (mha_mpi.h) under mpirun -np 1 .. 4: shards of uneven length (one
 * empty from 3 ranks on), float32 and int8 caches, against the float64
 * reference over the values the caches hold; the same bits twice; errors
 * on every rank.  Then the layer's decoding step over the ranks, split by
 * sequence (shards of uneven capacity, a prompt spilling over several)
 * and by heads, against the float64 reference layer over the whole
 * sequence; the same bits twice; a step that does not fit leaves every
 * shard as it was.
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

/* ------------------------------------------------------------------ */
/* The layer's step                                                    */
/* ------------------------------------------------------------------ */

enum { LE = 48, LH = 8, LG = 4, LD = 8, LT = 37, LPROMPT = 11, LB = LH * LD + 2 * LG * LD };

typedef struct layer_case {
    mha_layer_desc desc;
    float w[4][LH * LD * LE], b[LB], slopes[LH], x[2 * LT * LE];
    double w64[4][LH * LD * LE], b64[LB], slopes64[LH], x64[2 * LT * LE];
} layer_case;

/* A block with rotary, GQA, a window, softcap, ALiBi and biases. */
static void make_case(layer_case *c)
{
    mha_layer_desc_init(&c->desc);
    c->desc.embed_dim = LE, c->desc.num_heads = LH, c->desc.num_kv_heads = LG, c->desc.head_dim = LD;
    c->desc.rope = (mha_rope){MHA_ROPE_HALF, 10000.0, 0};
    c->desc.window_left = 20, c->desc.softcap = 6.0f, c->desc.alibi_slopes = c->slopes;
    const int64_t sizes[4] = {LH * LD * LE, LG * LD * LE, LG * LD * LE, LE * LH * LD};
    for (int m = 0; m < 4; m++)
        for (int64_t i = 0; i < sizes[m]; i++) c->w64[m][i] = c->w[m][i] = uniform(0.3f);
    for (int i = 0; i < LB; i++) c->b64[i] = c->b[i] = uniform(0.2f);
    for (int h = 0; h < LH; h++) c->slopes64[h] = c->slopes[h] = 0.02f * (float)(h + 1);
    for (int i = 0; i < 2 * LT * LE; i++) c->x64[i] = c->x[i] = uniform(1.0f);
}

static const char *const LLAMA[4] = {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"};
static const int64_t L_SIZES[4] = {LH * LD * LE, LG *LD *LE, LG *LD *LE, LE *LH *LD};

/* The prompt, then a step of 3 tokens, then single ones: every row's
 * output into out [2, LT, LE], by `step` (sequence split or heads). */
typedef mha_status (*step_fn)(mha_ctx *ctx, void *layer, mha_kv_cache *cache, mha_tensor *y, const mha_tensor *x);

static void decode_sequence(mha_ctx *ctx, void *layer, mha_kv_cache *cache, step_fn step, const float *x, float *out)
{
    for (int64_t t = 0; t < LT;) {
        int64_t n = t == 0 ? LPROMPT : t == LPROMPT ? 3 : 1;
        mha_tensor xt = {(float *)x + t * LE, {2, n, LE, 1}, {LT * LE, LE, 1, 0}};
        mha_tensor yt = {out + t * LE, {2, n, LE, 1}, {LT * LE, LE, 1, 0}};
        CHECK_OK(step(ctx, layer, cache, &yt, &xt));
        t += n;
    }
}

static mha_status sequence_step(mha_ctx *ctx, void *layer, mha_kv_cache *shard, mha_tensor *y, const mha_tensor *x)
{
    return mha_mpi_kv_cache_decode(ctx, MPI_COMM_WORLD, layer, shard, y, x);
}

static mha_status heads_step(mha_ctx *ctx, void *layer, mha_kv_cache *cache, mha_tensor *y, const mha_tensor *x)
{
    return mha_mpi_layer_decode(ctx, layer, cache, y, x);
}

/* The decoded rows against the float64 layer over the whole sequence. */
static void check_layer_rows(const layer_case *c, const float *out, const char *what)
{
    mha_ref_layer r = {.N = 2,
                       .L = LT,
                       .S = LT,
                       .E = LE,
                       .H = LH,
                       .kdim = LE,
                       .vdim = LE,
                       .causal = 1,
                       .w_q = c->w64[0],
                       .w_k = c->w64[1],
                       .w_v = c->w64[2],
                       .w_out = c->w64[3],
                       .b_in = c->b64,
                       .G = LG,
                       .hd = LD,
                       .rope_kind = MHA_ROPE_HALF,
                       .rope_theta = 10000.0,
                       .rope_dim = LD,
                       .window_left = 20,
                       .window_right = -1,
                       .softcap = 6.0,
                       .alibi = c->slopes64};
    static double want[2 * LT * LE];
    static float base[2 * LT * LE];
    mha_ref_layer_f64(&r, c->x64, c->x64, c->x64, want, NULL);
    mha_ref_layer_f32(&r, c->x, c->x, c->x, base, NULL);
    CHECK_CLOSE(what, out, want, base, 2 * LT * LE);
}

/* Rank r's shard capacity: uneven, rank 0's smaller than the prompt (so
 * the prompt spills onto the next ranks), all together exactly the
 * sequence. */
static int64_t capacity_of(int r)
{
    int64_t first = LPROMPT - 3, rest = LT - first;
    if (size == 1) return LT;
    if (r == 0) return first;
    return r == size - 1 ? rest - (size - 2) * (rest / (size - 1)) : rest / (size - 1);
}

static void test_sequence_layer(mha_ctx *ctx, const layer_case *c)
{
    mha_layer *layer = NULL;
    CHECK_OK(mha_layer_create(&c->desc, &layer));
    for (int m = 0; m < 4; m++) CHECK_OK(mha_layer_set_weight(layer, LLAMA[m], c->w[m], L_SIZES[m]));
    CHECK_OK(mha_layer_set_weight(layer, "in_proj_bias", c->b, LB));
    static float out[2 * LT * LE], again[2 * LT * LE];
    mha_dtype dtypes[2] = {MHA_DTYPE_F32, MHA_DTYPE_F32};
    float *outs[2] = {out, again};
    for (int run = 0; run < 2; run++) {
        mha_kv_cache *shard = NULL;
        CHECK_OK(mha_kv_cache_create(layer, 2, capacity_of(rank), dtypes[run], &shard));
        decode_sequence(ctx, layer, shard, sequence_step, c->x, outs[run]);
        int64_t full = mha_kv_cache_length(shard);
        CHECK(full == capacity_of(rank), "rank %d holds %lld tokens of its %lld", rank, (long long)full,
              (long long)capacity_of(rank));
        float one[2 * LE] = {0}, y[2 * LE];
        mha_tensor x1 = mha_tensor_3d(one, 2, 1, LE), y1 = mha_tensor_3d(y, 2, 1, LE);
        CHECK_FAILS(sequence_step(ctx, layer, shard, &y1, &x1), MHA_ERR_INVALID_ARG, "1 new tokens do not fit");
        CHECK(mha_kv_cache_length(shard) == full, "a step that does not fit changes no shard");
        mha_kv_cache_free(shard);
    }
    CHECK(memcmp(out, again, sizeof out) == 0, "two runs of the split cache differ");
    char what[80];
    snprintf(what, sizeof what, "layer decode over %d shards", size);
    check_layer_rows(c, out, what);
    mha_layer_free(layer);
}

static void test_heads_layer(mha_ctx *ctx, const layer_case *c)
{
    mha_mpi_layer *layer = NULL;
    CHECK_OK(mha_mpi_layer_create(MPI_COMM_WORLD, &c->desc, &layer));
    for (int m = 0; m < 4; m++) CHECK_OK(mha_mpi_layer_set_weight(layer, LLAMA[m], c->w[m], L_SIZES[m]));
    CHECK_OK(mha_mpi_layer_set_weight(layer, "in_proj_bias", c->b, LB));
    static float out[2 * LT * LE], again[2 * LT * LE];
    float *outs[2] = {out, again};
    for (int run = 0; run < 2; run++) {
        mha_kv_cache *cache = NULL;
        CHECK_OK(mha_kv_cache_create(mha_mpi_layer_local(layer), 2, LT, MHA_DTYPE_F32, &cache));
        decode_sequence(ctx, layer, cache, heads_step, c->x, outs[run]);
        float one[2 * LE] = {0}, y[2 * LE];
        mha_tensor x1 = mha_tensor_3d(one, 2, 1, LE), y1 = mha_tensor_3d(y, 2, 1, LE);
        if (run == 1 && size > 1 && rank == size - 1) mha_kv_cache_reset(cache); /* out of step */
        char who[64];
        snprintf(who, sizeof who, "rank %d of %d", size - 1, size);
        if (run == 1 && size > 1) CHECK_FAILS(heads_step(ctx, layer, cache, &y1, &x1), MHA_ERR_INVALID_ARG, who);
        mha_kv_cache_free(cache);
    }
    CHECK(memcmp(out, again, sizeof out) == 0, "two runs of the head-parallel decode differ");
    char what[80];
    snprintf(what, sizeof what, "layer decode over %d ranks' heads", size);
    check_layer_rows(c, out, what);
    mha_mpi_layer_free(layer);
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
        static layer_case c;
        make_case(&c);
        test_sequence_layer(ctx, &c);
        test_heads_layer(ctx, &c);
    }
    mha_layer_free(layer);
    mha_ctx_free(ctx);
    return mpi_finish("test_mpi_decode");
}
