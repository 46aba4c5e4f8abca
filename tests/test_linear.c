/*
 * test_linear.c -- mha_linear and mha_linear_backward against float64:
 *   - shapes around the micro-kernels' tile sizes (1 row, odd widths, more
 *     rows than one row block), with and without a bias;
 *   - y, dx, dW and db held to the tolerance rule (dW and db accumulate
 *     onto values already there), a plain float32 loop as the baseline;
 *   - the same bits with 1 and 3 threads;
 *   - every error: NULL arguments, sizes < 1, sizes whose products
 *     overflow (refused before any allocation).
 * ctest runs it on every kernel path (MHA_ISA).
 */
#include "harness.h"
#include "mha.h"

#include <stdint.h>

static uint64_t rng = 0x9e3779b97f4a7c15u;

static float uniform(void)
{
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (float)((double)(rng >> 11) * 0x1p-53 * 2.0 - 1.0);
}

static float *randoms(int64_t n)
{
    float *x = malloc((size_t)n * sizeof *x);
    for (int64_t i = 0; i < n; i++) x[i] = uniform();
    return x;
}

/* The four results of one forward + backward call, as floats. */
typedef struct results {
    float *y, *dx, *dw, *db;
} results;

/* The references: float64 (ref) and a plain float32 loop (base), for
 * c[i, j] = init[j or (i, j)] + sum_k a(i, k) b(k, j) with a(i, k) at
 * a[i * ars + k * acs] and b(k, j) at b[k * brs + j * bcs]. */
static void product(const float *a, int64_t ars, int64_t acs, const float *b, int64_t brs, int64_t bcs,
                    const float *init, int64_t init_rs, int64_t m, int64_t n, int64_t k, double *ref, float *base)
{
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            double s = init ? init[i * init_rs + j] : 0.0;
            float f = init ? init[i * init_rs + j] : 0.0f;
            for (int64_t t = 0; t < k; t++) {
                s += (double)a[i * ars + t * acs] * b[t * brs + j * bcs];
                f += a[i * ars + t * acs] * b[t * brs + j * bcs];
            }
            ref[i * n + j] = s;
            base[i * n + j] = f;
        }
}

static void run(mha_ctx *ctx, const float *x, const float *w, const float *b, const float *dy, const float *dw0,
                const float *db0, int64_t rows, int64_t in, int64_t out, results *r)
{
    memcpy(r->dw, dw0, (size_t)(out * in) * sizeof(float));
    memcpy(r->db, db0, (size_t)out * sizeof(float));
    CHECK_OK(mha_linear(ctx, x, w, b, r->y, rows, in, out));
    CHECK_OK(mha_linear_backward(ctx, dy, x, w, r->dx, r->dw, r->db, rows, in, out));
}

static results alloc_results(int64_t rows, int64_t in, int64_t out)
{
    return (results){malloc((size_t)(rows * out) * sizeof(float)), malloc((size_t)(rows * in) * sizeof(float)),
                     malloc((size_t)(out * in) * sizeof(float)), malloc((size_t)out * sizeof(float))};
}

static void free_results(results *r) { free(r->y), free(r->dx), free(r->dw), free(r->db); }

static void check_shape(mha_ctx *ctx1, mha_ctx *ctx3, int64_t rows, int64_t in, int64_t out, bool bias)
{
    float *x = randoms(rows * in), *w = randoms(out * in), *b = bias ? randoms(out) : NULL;
    float *dy = randoms(rows * out), *dw0 = randoms(out * in), *db0 = randoms(out);
    results r1 = alloc_results(rows, in, out), r3 = alloc_results(rows, in, out);
    run(ctx1, x, w, b, dy, dw0, db0, rows, in, out, &r1);
    run(ctx3, x, w, b, dy, dw0, db0, rows, in, out, &r3);
    char what[200];
    snprintf(what, sizeof what, "rows %lld in %lld out %lld bias %d", (long long)rows, (long long)in, (long long)out,
             bias);
    CHECK(memcmp(r1.y, r3.y, (size_t)(rows * out) * sizeof(float)) == 0 &&
              memcmp(r1.dx, r3.dx, (size_t)(rows * in) * sizeof(float)) == 0 &&
              memcmp(r1.dw, r3.dw, (size_t)(out * in) * sizeof(float)) == 0 &&
              memcmp(r1.db, r3.db, (size_t)out * sizeof(float)) == 0,
          "%s: 1 and 3 threads differ", what);

    int64_t most = rows * out > out * in ? rows * out : out * in;
    most = most > rows * in ? most : rows * in;
    double *ref = malloc((size_t)most * sizeof *ref);
    float *base = malloc((size_t)most * sizeof *base), *bias_rows = malloc((size_t)(rows * out) * sizeof(float));
    for (int64_t i = 0; i < rows * out; i++) bias_rows[i] = b ? b[i % out] : 0.0f;
    char label[260];
    /* y = x W^T + b */
    product(x, in, 1, w, 1, in, bias_rows, out, rows, out, in, ref, base);
    snprintf(label, sizeof label, "%s: y", what);
    CHECK_CLOSE(label, r1.y, ref, base, rows * out);
    /* dx = dy W */
    product(dy, out, 1, w, in, 1, NULL, 0, rows, in, out, ref, base);
    snprintf(label, sizeof label, "%s: dx", what);
    CHECK_CLOSE_GRAD(label, r1.dx, ref, base, rows * in);
    /* dW = dW0 + dy^T x */
    product(dy, 1, out, x, in, 1, dw0, in, out, in, rows, ref, base);
    snprintf(label, sizeof label, "%s: dW", what);
    CHECK_CLOSE_GRAD(label, r1.dw, ref, base, out * in);
    /* db = db0 + column sums of dy */
    float *ones = malloc((size_t)rows * sizeof *ones);
    for (int64_t i = 0; i < rows; i++) ones[i] = 1.0f;
    product(ones, rows, 1, dy, out, 1, db0, 0, 1, out, rows, ref, base);
    snprintf(label, sizeof label, "%s: db", what);
    CHECK_CLOSE_GRAD(label, r1.db, ref, base, out);

    void *owned[] = {x, w, b, dy, dw0, db0, ref, base, bias_rows, ones};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) free(owned[i]);
    free_results(&r1);
    free_results(&r3);
}

static void test_shapes(mha_ctx *ctx1, mha_ctx *ctx3)
{
    static const int64_t shapes[][3] = {{1, 1, 1},   {1, 64, 256},   {7, 13, 33},     {12, 32, 32},
                                        {97, 64, 5}, {130, 100, 70}, {1024, 64, 256}, {300, 256, 64}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        for (int bias = 0; bias < 2; bias++) check_shape(ctx1, ctx3, shapes[i][0], shapes[i][1], shapes[i][2], bias);
}

/* db with dx NULL and db NULL: the skipped outputs stay untouched. */
static void test_optional_outputs(mha_ctx *ctx)
{
    float x[6] = {1, 2, 3, 4, 5, 6}, w[6] = {1, 0, 0, 0, 1, 0}, dy[4] = {1, 2, 3, 4}, dw[6] = {0}, db[2] = {0};
    CHECK_OK(mha_linear_backward(ctx, dy, x, w, NULL, dw, NULL, 2, 3, 2));
    /* dW = dy^T x: [[1*1 + 3*4, 1*2 + 3*5, 1*3 + 3*6], [2*1 + 4*4, ...]] */
    const float want[6] = {13, 17, 21, 18, 24, 30};
    CHECK(memcmp(dw, want, sizeof want) == 0, "dW = [%g %g %g; %g %g %g]", dw[0], dw[1], dw[2], dw[3], dw[4], dw[5]);
    CHECK(db[0] == 0 && db[1] == 0, "db written although NULL was passed");
}

static void test_errors(mha_ctx *ctx)
{
    float a[4] = {0}, b[4] = {0}, c[4] = {0};
    CHECK_FAILS(mha_linear(NULL, a, b, NULL, c, 1, 1, 1), MHA_ERR_MISUSE, "mha_linear: NULL argument");
    CHECK_FAILS(mha_linear(ctx, NULL, b, NULL, c, 1, 1, 1), MHA_ERR_MISUSE, "NULL argument");
    CHECK_FAILS(mha_linear(ctx, a, b, NULL, NULL, 1, 1, 1), MHA_ERR_MISUSE, "NULL argument");
    CHECK_FAILS(mha_linear(ctx, a, b, NULL, c, 0, 1, 1), MHA_ERR_INVALID_ARG, "must be positive, got 0, 1, 1");
    CHECK_FAILS(mha_linear(ctx, a, b, NULL, c, 1, -3, 1), MHA_ERR_INVALID_ARG, "got 1, -3, 1");
    CHECK_FAILS(mha_linear(ctx, a, b, NULL, c, INT64_MAX / 2, 4, 1), MHA_ERR_INVALID_ARG, "is too large");
    CHECK_FAILS(mha_linear(ctx, a, b, NULL, c, 1, INT64_MAX, INT64_MAX), MHA_ERR_INVALID_ARG, "is too large");
    CHECK_FAILS(mha_linear_backward(ctx, a, b, c, a, NULL, NULL, 1, 1, 1), MHA_ERR_MISUSE,
                "mha_linear_backward: NULL argument");
    CHECK_FAILS(mha_linear_backward(ctx, a, b, c, a, b, NULL, 1, 0, 1), MHA_ERR_INVALID_ARG, "must be positive");
    CHECK_FAILS(mha_linear_backward(ctx, a, b, c, a, b, NULL, 3, INT64_MAX / 2, 1), MHA_ERR_INVALID_ARG,
                "is too large");
}

int main(void)
{
    mha_ctx *ctx1 = NULL, *ctx3 = NULL;
    CHECK_OK(mha_ctx_create(1, &ctx1));
    CHECK_OK(mha_ctx_create(3, &ctx3));
    test_shapes(ctx1, ctx3);
    test_optional_outputs(ctx1);
    test_errors(ctx1);
    mha_ctx_free(ctx1);
    mha_ctx_free(ctx3);
    return harness_finish("test_linear");
}
