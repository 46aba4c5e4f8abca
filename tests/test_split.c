/*
 * test_split.c -- float32 projections from split bf16 products (AMX),
 * where this CPU has them (otherwise skipped, and the FMA path the layer
 * takes instead is test_linear's):
 *   split3:  hi + mid + lo == x exactly down to |x| = 2^-110 (within
 *            2^-126 below), |mid| <= 2^-8 |x|, |lo| <= 2^-16 |x|, over
 *            magnitudes from the smallest normal to FLT_MAX; any infinity
 *            or NaN reported;
 *   product: y = x W^T + b against double over shapes that hit every tail
 *            (rows, outputs and inputs not multiples of 16 or 32, more
 *            rows than one chunk), grouped x and y, with and without bias,
 *            within float32's error bound; the same bits on 1 and 3
 *            threads; false (the caller's fallback) for an input that is
 *            not finite.
 */
#include "core/convert.h"
#include "gemm/gemm.h"
#include "harness.h"

#include <stdint.h>

static uint64_t rng = 2024;

static float uniform(void)
{
    rng = rng * 6364136223846793005u + 1442695040888963407u;
    return (float)((rng >> 40) * 0x1p-24 * 2.0 - 1.0);
}

static double bf16_value(uint16_t h) { return mha__bf16_to_f32(h); }

static void test_split3(const mha__bf16_kernels *bk)
{
    enum { N = 29 }; /* a tail past one vector */
    float x[N];
    uint16_t hi[N], mid[N], lo[N];
    int bad = 0;
    for (int e = -126; e <= 127; e += 3)
        for (int rep = 0; rep < 4; rep++) {
            for (int i = 0; i < N; i++) x[i] = ldexpf(1.0f + fabsf(uniform()), e) * (uniform() < 0 ? -1.0f : 1.0f);
            if (e == 127) x[0] = FLT_MAX, x[1] = -FLT_MAX, x[2] = nextafterf(FLT_MAX, 0);
            bad += !bk->split3(x, N, hi, mid, lo);
            for (int i = 0; i < N; i++) {
                double h = bf16_value(hi[i]), m = bf16_value(mid[i]), l = bf16_value(lo[i]), a = fabs(x[i]);
                /* Exact while lo can be a normal bf16; below that the
                 * parts lose what bf16 cannot hold (AMX reads denormal
                 * parts as 0 anyway): at most 2^-126 in all. */
                double miss = fabs(h + m + l - (double)x[i]), allowed = e >= -110 ? 0.0 : 0x1p-126;
                bad += miss > allowed || fabs(m) > 0x1p-8 * a || fabs(l) > 0x1p-16 * a || isinf(h);
            }
        }
    CHECK(bad == 0, "%s split3: %d parts wrong", bk->name, bad);
    float special[3] = {INFINITY, -INFINITY, NAN};
    for (int s = 0; s < 3; s++) {
        for (int i = 0; i < N; i++) x[i] = uniform();
        x[17] = special[s];
        CHECK(!bk->split3(x, N, hi, mid, lo), "%s split3 missed a value that is not finite (%d)", bk->name, s);
    }
}

/* Runs y = x W^T + b (grouped: head-major x and y of 64-column groups)
 * and returns how many outputs miss float32's bound against double. */
static int product_misses(mha_ctx *ctx, const mha__bf16_kernels *bk, int64_t rows, int64_t in, int64_t out, bool bias,
                          bool grouped, float **y_out)
{
    float *x = malloc(sizeof(float) * (size_t)(rows * in)), *w = malloc(sizeof(float) * (size_t)(out * in));
    float *b = malloc(sizeof(float) * (size_t)out), *y = malloc(sizeof(float) * (size_t)(rows * out));
    for (int64_t i = 0; i < rows * in; i++) x[i] = uniform() * 4.0f;
    for (int64_t i = 0; i < out * in; i++) w[i] = uniform() * 0.25f;
    for (int64_t i = 0; i < out; i++) b[i] = uniform();
    mha__mat xm = {x, in, 1, 0, 0}, ym = {y, out, 1, 0, 0};
    if (grouped) xm = (mha__mat){x, 64, 1, 64, rows * 64}, ym = (mha__mat){y, 64, 1, 64, rows * 64};
    mha__packed_split p = {0};
    int64_t bytes = 0, misses = 0;
    CHECK(mha__pack_split(&p, bk, w, out, in) == MHA_OK && p.data, "split pack %lld x %lld", (long long)out,
          (long long)in);
    CHECK(mha__linear_split_workspace(rows, in, &bytes) && mha__ws_reserve(ctx, bytes) == MHA_OK, "workspace");
    CHECK(mha__linear_split(ctx, bk, rows, &xm, &p, bias ? b : NULL, &ym), "split product refused finite input");
    for (int64_t r = 0; r < rows; r++)
        for (int64_t o = 0; o < out; o++) {
            double want = bias ? b[o] : 0.0, mag = fabs(want);
            for (int64_t c = 0; c < in; c++) {
                double t = (double)*mha__mat_at(&xm, r, c) * w[o * in + c];
                want += t, mag += fabs(t);
            }
            /* float32's bound for a sum of in + 1 terms, as test_kernels
             * holds the FMA tiles to. */
            misses += fabs(*mha__mat_at(&ym, r, o) - want) > (double)(in + 2) * FLT_EPSILON * mag + 1e-30;
        }
    x[(rows / 2) * in + in / 3] = INFINITY; /* row rows / 2, column in / 3 in either layout */
    CHECK(!mha__linear_split(ctx, bk, rows, &xm, &p, NULL, &ym), "split product took an infinity");
    mha__packed_split_free(&p);
    free(x), free(w), free(b);
    *y_out = y;
    return (int)misses;
}

static void test_products(mha_ctx *ctx1, mha_ctx *ctx3, const mha__bf16_kernels *bk)
{
    /* One or three inputs: each output a single product or three, where
     * float32's bound is tight enough to catch any of the six parts'
     * products missing; then every tail, and more rows than a chunk. */
    static const int64_t shapes[][3] = {{1, 1, 1},    {64, 1, 64},   {40, 3, 48},    {5, 31, 17},    {16, 32, 32},
                                        {33, 64, 40}, {100, 70, 96}, {97, 768, 130}, {800, 100, 64}, {1601, 65, 33}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int variant = 0; variant < 3; variant++) {
            int64_t rows = shapes[s][0], in = shapes[s][1], out = shapes[s][2];
            bool grouped = variant == 2;
            if (grouped && (in % 64 || out % 64)) continue;
            float *y1, *y3;
            uint64_t seed = rng;
            int misses = product_misses(ctx1, bk, rows, in, out, variant != 0, grouped, &y1);
            rng = seed;
            misses += product_misses(ctx3, bk, rows, in, out, variant != 0, grouped, &y3);
            CHECK(misses == 0, "split product %lld x %lld -> %lld (variant %d): %d outputs off", (long long)rows,
                  (long long)in, (long long)out, variant, misses);
            CHECK(memcmp(y1, y3, sizeof(float) * (size_t)(rows * out)) == 0,
                  "split product %lld x %lld -> %lld: bits differ between 1 and 3 threads", (long long)rows,
                  (long long)in, (long long)out);
            free(y1), free(y3);
        }
}

int main(void)
{
    const mha__bf16_kernels *bk = mha__bf16_named("amx");
    if (!bk || !bk->gemm_split) {
        printf("test_split: no split products on this CPU, skipped\n");
        return harness_finish("test_split");
    }
    mha_ctx *ctx1 = NULL, *ctx3 = NULL;
    CHECK(mha_ctx_create(1, &ctx1) == MHA_OK && mha_ctx_create(3, &ctx3) == MHA_OK, "contexts");
    test_split3(bk);
    test_products(ctx1, ctx3, bk);
    mha_ctx_free(ctx1);
    mha_ctx_free(ctx3);
    return harness_finish("test_split");
}
