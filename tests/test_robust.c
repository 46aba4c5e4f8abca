/*
 * test_robust.c -- numbers at the edges, determinism and concurrency:
 *   - logits up to +-1e4 and inputs scaled by 1e3: no overflow, no NaN,
 *     within the tolerance rule of float64;
 *   - NaN and Inf in inputs propagate as in a plain softmax (only to the
 *     rows that see them) and never crash; the backward's split products
 *     hand such blocks to float32 ones with the same results;
 *   - the floating-point control state (MXCSR: flush-to-zero,
 *     denormals-are-zero, rounding) is the same after every call;
 *   - the same bits for 1, 2, 3 and 4 threads and over 50 repeats, for the
 *     layer's forward and backward and for decoding; and with the score
 *     tiles' fetch ahead forced on and off;
 *   - several threads calling the library at once, each with its own
 *     context, get the single-threaded bits;
 *   - a sequence whose workspace does not fit in the address space fails
 *     with NOMEM (in builds without a sanitizer, which reserve the space).
 */
#define _POSIX_C_SOURCE 200809L

#include "harness.h"
#include "mha.h"
#include "reference.h"

#include <pthread.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

static uint64_t rng = 0x9e3779b97f4a7c15u;

static double uniform(void)
{
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (double)(rng >> 11) * 0x1p-53 * 2.0 - 1.0;
}

static float *randoms(int64_t n, double scale, double **copy)
{
    float *f = malloc((size_t)n * sizeof *f);
    if (copy) *copy = malloc((size_t)n * sizeof **copy);
    for (int64_t i = 0; i < n; i++) {
        f[i] = (float)(uniform() * scale);
        if (copy) (*copy)[i] = f[i];
    }
    return f;
}

/* The floating-point control bits: flush-to-zero, rounding, exception
 * masks, denormals-are-zero (not the sticky exception flags, which any
 * arithmetic sets). */
static unsigned fp_state(void)
{
#if defined(__x86_64__)
    return _mm_getcsr() & ~0x3fu;
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------ */

/* SDPA with scores of size `logit` (q and k scaled so that q.k/sqrt(d)
 * reaches it), against float64 with the float32 reference as baseline. */
static void check_large_logits(mha_ctx *ctx, double logit)
{
    enum { B = 1, H = 2, L = 33, S = 40, D = 16 };
    double *q64, *k64, *v64;
    double scale = sqrt(logit * 4.0 / sqrt((double)D)); /* |q.k| / 4 ~ logit for uniform entries */
    float *q = randoms(B * H * L * D, scale, &q64), *k = randoms(B * H * S * D, scale, &k64);
    float *v = randoms(B * H * S * D, 1.0, &v64), out[B * H * L * D], base[B * H * L * D], lse[B * H * L];
    double want[B * H * L * D];
    mha_tensor tq = mha_tensor_4d(q, B, H, L, D), tk = mha_tensor_4d(k, B, H, S, D), tv = mha_tensor_4d(v, B, H, S, D);
    mha_tensor to = mha_tensor_4d(out, B, H, L, D);
    mha_attn_desc desc;
    mha_attn_desc_init(&desc);
    unsigned before = fp_state();
    CHECK_OK(mha_attention(ctx, &to, lse, &tq, &tk, &tv, &desc));
    CHECK(fp_state() == before, "MXCSR changed across mha_attention: %x -> %x", before, fp_state());
    mha_ref_sdpa r = {.B = B,
                      .Hq = H,
                      .Hkv = H,
                      .L = L,
                      .S = S,
                      .D = D,
                      .Dv = D,
                      .scale = 1.0 / sqrt((double)D),
                      .window_left = -1,
                      .window_right = -1};
    mha_ref_sdpa_f64(&r, q64, k64, v64, want, NULL, NULL);
    mha_ref_sdpa_f32(&r, q, k, v, base, NULL, NULL);
    int bad = 0;
    for (int i = 0; i < B * H * L * D; i++) bad += !isfinite(out[i]);
    for (int i = 0; i < B * H * L; i++) bad += !isfinite(lse[i]);
    CHECK(bad == 0, "logits ~%g: %d values not finite", logit, bad);
    char what[80];
    snprintf(what, sizeof what, "logits ~%g", logit);
    CHECK_CLOSE(what, out, want, base, B * H * L * D);
    free(q), free(k), free(v), free(q64), free(k64), free(v64);
}

/* The layer with inputs scaled by 1e3 (logits in the thousands). */
static void check_scaled_layer(mha_ctx *ctx)
{
    enum { N = 2, L = 9, E = 16, H = 2 };
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    d.embed_dim = E;
    d.num_heads = H;
    mha_layer *layer = NULL;
    CHECK_OK(mha_layer_create(&d, &layer));
    double *w64, *x64;
    float *w = randoms(4 * E * E, 1.0 / sqrt((double)E), &w64), *x = randoms(N * L * E, 1e3, &x64);
    CHECK_OK(mha_layer_set_weight(layer, "in_proj_weight", w, 3 * E * E));
    CHECK_OK(mha_layer_set_weight(layer, "out_proj.weight", w + 3 * E * E, E * E));
    float y[N * L * E], base[N * L * E];
    double want[N * L * E];
    mha_layer_fwd_args a;
    mha_layer_fwd_args_init(&a);
    a.query = a.key = a.value = mha_tensor_3d(x, N, L, E);
    mha_tensor ty = mha_tensor_3d(y, N, L, E);
    CHECK_OK(mha_layer_forward(ctx, layer, &ty, NULL, &a));
    mha_ref_layer r = {.N = N,
                       .L = L,
                       .S = L,
                       .E = E,
                       .H = H,
                       .kdim = E,
                       .vdim = E,
                       .w_q = w64,
                       .w_k = w64 + E * E,
                       .w_v = w64 + 2 * E * E,
                       .w_out = w64 + 3 * E * E,
                       .window_left = -1,
                       .window_right = -1};
    mha_ref_layer_f64(&r, x64, x64, x64, want, NULL);
    mha_ref_layer_f32(&r, x, x, x, base, NULL);
    CHECK_CLOSE("layer, inputs x 1e3", y, want, base, N * L * E);
    mha_layer_free(layer);
    free(w), free(x), free(w64), free(x64);
}

/* NaN in one query row poisons that row only; NaN in key j poisons the
 * rows that see j (causal: rows >= j) only; +Inf in a value makes that
 * output column non-finite in the rows that see it and leaves the other
 * columns finite (rows that cannot see it may get 0 x Inf = NaN there, as
 * PyTorch's P V does); nothing crashes.  L < 16: the decoding path; else
 * the tiled one, and from 512 rows with D = 64 its split products where
 * the CPU has AMX, whose tiles hand what is not finite to the float32
 * products (O kept transposed there: turned into rows and back). */
static void check_nan_inf(mha_ctx *ctx, int L, int D)
{
    enum { J = 5 };
    for (int kind = 0; kind < 3; kind++) {
        float *q = randoms(L * D, 1, NULL), *k = randoms(L * D, 1, NULL), *v = randoms(L * D, 1, NULL);
        float *out = malloc((size_t)(L * D) * sizeof *out);
        if (kind == 0) q[3 * D + 2] = NAN;
        if (kind == 1) k[J * D + 1] = NAN;
        if (kind == 2) v[J * D + 4] = INFINITY;
        mha_tensor tq = mha_tensor_4d(q, 1, 1, L, D), tk = mha_tensor_4d(k, 1, 1, L, D),
                   tv = mha_tensor_4d(v, 1, 1, L, D);
        mha_tensor to = mha_tensor_4d(out, 1, 1, L, D);
        mha_attn_desc desc;
        mha_attn_desc_init(&desc);
        desc.causal = MHA_CAUSAL_TOP_LEFT;
        CHECK_OK(mha_attention(ctx, &to, NULL, &tq, &tk, &tv, &desc));
        int bad = 0;
        for (int i = 0; i < L; i++)
            for (int c = 0; c < D; c++) {
                float o = out[i * D + c];
                bool poisoned = kind == 0 ? i == 3 : i >= J;
                if (kind == 2) { /* Inf in one value column */
                    bad += c == 4 ? (i >= J && isfinite(o)) : !isfinite(o);
                    continue;
                }
                bad += poisoned ? !isnan(o) : !isfinite(o);
            }
        CHECK(bad == 0, "L %d, non-finite input kind %d: %d outputs where they should not be", L, kind, bad);
        free(q), free(k), free(v), free(out);
    }
}

/* NaN in a key (kind 0) or value (kind 1) row J = 150, causal.  The
 * first work item's rows (0-95: the plan's block rows at this size) see
 * half of the first 192-key tile, which the forward caches whole
 * (mha__cached_tile_keys): the NaN there must not send that item to the
 * float32 products (its own keys are finite, so the split products still
 * take them, as they did when the cache held only the keys an item saw),
 * so its rows keep the bits they have without the NaN.  Rows up to J
 * stay finite (but for a value's column, as in check_nan_inf: a strip
 * of rows whose keys pass J multiplies its 0 probability by the NaN);
 * from J on a key's NaN fills the row, a value's its column. */
static void check_unseen_nan(mha_ctx *ctx, int L, int D)
{
    enum { J = 150, COLUMN = 4, FIRST_ITEM = 96 };
    int64_t n = (int64_t)L * D;
    for (int kind = 0; kind < 2; kind++) {
        float *q = randoms(n, 1, NULL), *k = randoms(n, 1, NULL), *v = randoms(n, 1, NULL), *out[2];
        mha_tensor tq = mha_tensor_4d(q, 1, 1, L, D), tk = mha_tensor_4d(k, 1, 1, L, D),
                   tv = mha_tensor_4d(v, 1, 1, L, D);
        mha_attn_desc desc;
        mha_attn_desc_init(&desc);
        desc.causal = MHA_CAUSAL_TOP_LEFT;
        for (int poisoned = 0; poisoned < 2; poisoned++) {
            if (poisoned) (kind == 0 ? k : v)[J * D + COLUMN] = NAN;
            out[poisoned] = malloc((size_t)n * sizeof(float));
            mha_tensor to = mha_tensor_4d(out[poisoned], 1, 1, L, D);
            CHECK_OK(mha_attention(ctx, &to, NULL, &tq, &tk, &tv, &desc));
        }
        bool same = memcmp(out[0], out[1], (size_t)FIRST_ITEM * D * sizeof(float)) == 0;
        int64_t wrong = 0;
        for (int64_t i = FIRST_ITEM; i < L; i++)
            for (int c = 0; c < D; c++) {
                float o = out[1][i * D + c];
                bool column = kind == 1 && c == COLUMN;
                wrong += i < J ? !column && !isfinite(o) : (kind == 0 || column) != isnan(o);
            }
        CHECK(same && !wrong, "L %d, NaN in %s row %d: the first item's rows %s, %lld outputs after them wrong", L,
              kind == 0 ? "key" : "value", J, same ? "kept their bits" : "changed", (long long)wrong);
        free(q), free(k), free(v), free(out[0]), free(out[1]);
    }
}

/* The backward over the same non-finite inputs (L rows, from the forward's
 * output and lse) with the split products and without: the same NaN and
 * infinities, and finite gradients alike to float32 rounding.  Blocks
 * whose P or dS are not finite take the float32 products there
 * (flash_bwd.c); this is where they meet them. */
static void check_nan_inf_backward(mha_ctx *ctx, int L, int D)
{
    enum { J = 5 };
    int64_t n = (int64_t)L * D;
    for (int kind = 0; kind < 3; kind++) {
        float *q = randoms(n, 1, NULL), *k = randoms(n, 1, NULL), *v = randoms(n, 1, NULL), *dout = randoms(n, 1, NULL);
        float *out = malloc((size_t)n * sizeof *out), *lse = malloc((size_t)L * sizeof *lse), *g[2][3];
        if (kind == 0) q[3 * D + 2] = NAN;
        if (kind == 1) k[J * D + 1] = NAN;
        if (kind == 2) v[J * D + 4] = INFINITY;
        mha_tensor tq = mha_tensor_4d(q, 1, 1, L, D), tk = mha_tensor_4d(k, 1, 1, L, D),
                   tv = mha_tensor_4d(v, 1, 1, L, D), to = mha_tensor_4d(out, 1, 1, L, D),
                   tdo = mha_tensor_4d(dout, 1, 1, L, D);
        mha_attn_desc desc;
        mha_attn_desc_init(&desc);
        desc.causal = MHA_CAUSAL_TOP_LEFT;
        CHECK_OK(mha_attention(ctx, &to, lse, &tq, &tk, &tv, &desc));
        for (int split = 0; split < 2; split++) {
            mha__split_attention_min_rows(split ? 0 : INT64_MAX);
            mha_tensor t[3];
            for (int i = 0; i < 3; i++) {
                g[split][i] = malloc((size_t)n * sizeof(float));
                t[i] = mha_tensor_4d(g[split][i], 1, 1, L, D);
            }
            CHECK_OK(mha_attention_backward(ctx, &t[0], &t[1], &t[2], &tq, &tk, &tv, &to, lse, &tdo, &desc));
        }
        mha__split_attention_min_rows(-1);
        harness_split_all();
        int64_t unlike = 0, non_finite = 0;
        for (int i = 0; i < 3; i++) {
            double top = 0;
            for (int64_t e = 0; e < n; e++)
                if (isfinite(g[0][i][e])) top = fmax(top, fabs(g[0][i][e]));
            for (int64_t e = 0; e < n; e++) {
                float a = g[0][i][e], b = g[1][i][e];
                non_finite += !isfinite(a);
                unlike += isfinite(a) ? !(fabs(a - b) <= 1e-5 * top) : isnan(a) ? !isnan(b) : a != b;
            }
        }
        CHECK(unlike == 0 && non_finite > 0,
              "L %d, non-finite input kind %d: %lld gradients differ with and without split products (%lld not finite)",
              L, kind, (long long)unlike, (long long)non_finite);
        for (int s = 0; s < 2; s++)
            for (int i = 0; i < 3; i++) free(g[s][i]);
        free(q), free(k), free(v), free(dout), free(out), free(lse);
    }
}

/* ------------------------------------------------------------------ */

typedef struct bits {
    float y[2 * 40 * 32], gx[2 * 40 * 32], gw[8], dec[40 * 32];
} bits;

/* A generator of its own, so threads computing at once share nothing. */
static float local_uniform(uint64_t *state)
{
    *state ^= *state << 13, *state ^= *state >> 7, *state ^= *state << 17;
    return (float)((double)(*state >> 11) * 0x1p-53 * 2.0 - 1.0);
}

/* The layer's forward, backward and a decode of the same inputs with a
 * context of `threads` threads: the bits every run must reproduce.  Safe
 * to call from several threads (no CHECK inside: it returns false when a
 * call fails). */
static bool compute_bits(int threads, bits *out)
{
    enum { N = 2, L = 40, E = 32 };
    mha_ctx *ctx = NULL;
    mha_layer *layer = NULL;
    mha_layer_tape *tape = NULL;
    mha_kv_cache *cache = NULL;
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    d.embed_dim = E;
    d.num_heads = 4;
    d.num_kv_heads = 2;
    d.rope.kind = MHA_ROPE_HALF;
    static float x[N * L * E], dy[N * L * E]; /* written once, before any thread starts */
    static bool inputs_ready;
    uint64_t state = 0x1234567; /* the weights: the same numbers on every call */
    if (!inputs_ready) {
        uint64_t in_state = 0x7654321;
        for (int i = 0; i < N * L * E; i++) x[i] = local_uniform(&in_state), dy[i] = local_uniform(&in_state);
        inputs_ready = true;
    }
    bool ok = mha_ctx_create(threads, &ctx) == MHA_OK && mha_layer_create(&d, &layer) == MHA_OK &&
              mha_layer_train_init(layer) == MHA_OK && mha_layer_tape_create(&tape) == MHA_OK;
    mha_param p[8];
    int64_t n = ok ? mha_layer_params(layer, p, 8) : 0;
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < p[i].numel; j++) p[i].value[j] = 0.3f * local_uniform(&state);
    ok = ok && mha_layer_params_changed(layer) == MHA_OK;
    mha_layer_fwd_args a;
    mha_layer_fwd_args_init(&a);
    a.query = a.key = a.value = mha_tensor_3d(x, N, L, E);
    a.causal = MHA_CAUSAL_TOP_LEFT;
    a.tape = tape;
    mha_tensor ty = mha_tensor_3d(out->y, N, L, E), tdy = mha_tensor_3d(dy, N, L, E),
               tgx = mha_tensor_3d(out->gx, N, L, E);
    memset(out->gx, 0, sizeof out->gx);
    if (ok) mha_layer_zero_grad(layer);
    ok = ok && mha_layer_forward(ctx, layer, &ty, NULL, &a) == MHA_OK &&
         mha_layer_backward(ctx, layer, &a, &tdy, &tgx, &tgx, &tgx) == MHA_OK;
    for (int i = 0; ok && i < 8; i++) out->gw[i] = p[0].grad[i * 97];
    ok = ok && mha_kv_cache_create(layer, 1, L, MHA_DTYPE_F32, &cache) == MHA_OK;
    for (int64_t t = 0; ok && t < L; t++) { /* one sequence, a token at a time */
        mha_tensor xt = mha_tensor_3d(x + t * E, 1, 1, E), yt = mha_tensor_3d(out->dec + t * E, 1, 1, E);
        ok = mha_layer_decode(ctx, layer, cache, &yt, &xt) == MHA_OK;
    }
    mha_kv_cache_free(cache);
    mha_layer_tape_free(tape);
    mha_layer_free(layer);
    mha_ctx_free(ctx);
    return ok;
}

static void check_determinism(void)
{
    static bits want, got;
    CHECK(compute_bits(1, &want), "the reference run failed: %s", mha_last_error());
    for (int threads = 2; threads <= 4; threads++) {
        CHECK(compute_bits(threads, &got), "%d threads: %s", threads, mha_last_error());
        CHECK(memcmp(&want, &got, sizeof want) == 0, "%d threads give other bits than 1", threads);
    }
    int differ = 0;
    for (int r = 0; r < 50; r++) differ += !compute_bits(2, &got) || memcmp(&want, &got, sizeof want) != 0;
    CHECK(differ == 0, "%d of 50 repeats gave other bits", differ);
}

/* The score tiles' fetch of the next key tile (products.h: kv_stream)
 * brings lines into L2 and nothing else: forced on for every plan and
 * off, the same bits, over tiles with tails, GQA, causal and a window,
 * K and V contiguous and as views of rows holding every kv head (the
 * layer's layout).  Run under the sanitizers, it also checks the rows it
 * names lie inside K. */
static void check_fetch_ahead(mha_ctx *ctx)
{
    enum { Hq = 4, Hkv = 2, L = 230, S = 500, D = 64 };
    float *q = randoms(Hq * L * D, 1, NULL), *k = randoms(Hkv * S * D, 1, NULL), *v = randoms(Hkv * S * D, 1, NULL);
    float *out[2] = {malloc(sizeof(float) * Hq * L * D), malloc(sizeof(float) * Hq * L * D)};
    for (int shape = 0; shape < 4; shape++) {
        bool rows_view = shape & 1, masked = shape & 2;
        mha_tensor tq = mha_tensor_4d(q, 1, Hq, L, D), tk = mha_tensor_4d(k, 1, Hkv, S, D),
                   tv = mha_tensor_4d(v, 1, Hkv, S, D);
        if (rows_view) /* [S][Hkv][D] rows: head g's key j at (j * Hkv + g) * D */
            for (int i = 0; i < 2; i++) {
                mha_tensor *t = i ? &tv : &tk;
                t->stride[1] = D, t->stride[2] = Hkv * D;
            }
        mha_attn_desc desc;
        mha_attn_desc_init(&desc);
        desc.enable_gqa = true;
        if (masked) desc.causal = MHA_CAUSAL_BOTTOM_RIGHT, desc.window_left = 300;
        for (int fetch = 0; fetch < 2; fetch++) {
            mha__kv_stream_min_bytes(fetch ? 0 : INT64_MAX);
            mha_tensor to = mha_tensor_4d(out[fetch], 1, Hq, L, D);
            CHECK_OK(mha_attention(ctx, &to, NULL, &tq, &tk, &tv, &desc));
        }
        CHECK(memcmp(out[0], out[1], sizeof(float) * Hq * L * D) == 0,
              "%s K and V%s: other bits with the next key tile fetched", rows_view ? "row-view" : "contiguous",
              masked ? ", causal with a window" : "");
    }
    mha__kv_stream_min_bytes(-1);
    free(q), free(k), free(v), free(out[0]), free(out[1]);
}

static bits *shared_want;

static void *concurrent_worker(void *arg)
{
    bits *mine = arg;
    for (int r = 0; r < 5; r++)
        if (!compute_bits(2, mine) || memcmp(mine, shared_want, sizeof *mine) != 0) return (void *)1;
    return NULL;
}

/* Four threads, each with its own contexts, layers and caches. */
static void check_concurrency(void)
{
    static bits want, mine[4];
    CHECK(compute_bits(1, &want), "the reference run failed: %s", mha_last_error());
    shared_want = &want;
    pthread_t th[4];
    for (int t = 0; t < 4; t++) CHECK(pthread_create(&th[t], NULL, concurrent_worker, &mine[t]) == 0, "thread %d", t);
    for (int t = 0; t < 4; t++) {
        void *res = NULL;
        pthread_join(th[t], &res);
        CHECK(res == NULL, "concurrent caller %d got other bits", t);
    }
}

/* ------------------------------------------------------------------ */

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define SANITIZED 1
#endif
#endif

/* A million-token sequence read through a broadcast view of one row: the
 * inputs take no memory, the layer's workspace (Q, K, V, heads: 1 GB)
 * cannot fit under a 512 MB address-space limit. */
static void check_out_of_memory(void)
{
#ifdef SANITIZED
    printf("test_robust: address-space limit test skipped under a sanitizer\n");
#else
    pid_t pid = fork();
    if (pid == 0) {
        struct rlimit lim = {512u << 20, 512u << 20};
        setrlimit(RLIMIT_AS, &lim);
        enum { E = 64, T = 1 << 20 };
        static float row[E], out_row[E];
        mha_ctx *ctx = NULL;
        mha_layer *layer = NULL;
        mha_layer_desc d;
        mha_layer_desc_init(&d);
        d.embed_dim = E;
        d.num_heads = 4;
        if (mha_ctx_create(2, &ctx) != MHA_OK || mha_layer_create(&d, &layer) != MHA_OK ||
            harness_fill_weights(layer, 0.01f) != MHA_OK)
            _exit(3);
        mha_layer_fwd_args a;
        mha_layer_fwd_args_init(&a);
        a.query = a.key = a.value = (mha_tensor){row, {1, T, E, 1}, {0, 0, 1, 0}};
        mha_tensor y = {out_row, {1, T, E, 1}, {0, 0, 1, 0}};
        mha_status st = mha_layer_forward(ctx, layer, &y, NULL, &a);
        mha_layer_free(layer);
        mha_ctx_free(ctx);
        _exit(st == MHA_ERR_NOMEM ? 0 : 4);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "a 1M-token forward under 512 MB: child status %d", status);
#endif
}

int main(void)
{
    harness_split_all();
    mha_ctx *ctx = NULL;
    CHECK_OK(mha_ctx_create(2, &ctx));
    check_large_logits(ctx, 1e2);
    check_large_logits(ctx, 1e4);
    check_scaled_layer(ctx);
    check_nan_inf(ctx, 12, 8);
    check_nan_inf(ctx, 300, 8);
    check_nan_inf(ctx, 600, 64);
    check_nan_inf_backward(ctx, 600, 64);
    check_unseen_nan(ctx, 600, 64);
    check_unseen_nan(ctx, 300, 32);
    check_fetch_ahead(ctx);
    mha_ctx_free(ctx);
    check_determinism();
    check_concurrency();
    check_out_of_memory();
    return harness_finish("test_robust");
}
