/*
 * harness.h -- what every libmha test shares: checks that count failures
 * and the tolerance rule, in one place.
 *
 * Tolerance rule (FlashAttention's, docs/NUMERICS.md): against the float64
 * oracle, our error may be at most twice the error of a plain
 * implementation of the same computation in the same precision, plus a tiny
 * absolute floor tied to that precision's epsilon:
 *     max|ours - ref| <= 2 * max|base - ref| + 4 * eps * max(1, max|ref|)
 * with eps = FLT_EPSILON for float32, and for bfloat16 BF16_FLOOR_EPS =
 * 2^-11, so that the floor 4 * eps is half of bf16's unit roundoff 2^-8.
 * Infinities must match exactly (a fully masked row's lse is -inf), and a
 * NaN where the oracle has none always fails.
 */
#ifndef MHA_TEST_HARNESS_H
#define MHA_TEST_HARNESS_H

#include "attn/products.h"
#include "mha.h"

#include <float.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int harness_failures;
static int harness_checks;

#define CHECK(cond, ...)                                                             \
    do {                                                                             \
        harness_checks++;                                                            \
        if (!(cond)) {                                                               \
            harness_failures++;                                                      \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                            \
            fputc('\n', stderr);                                                     \
        }                                                                            \
    } while (0)

/* A call that must succeed; prints the library's sentence if not. */
#define CHECK_OK(call)                                                                      \
    do {                                                                                    \
        mha_status st_ = (call);                                                            \
        CHECK(st_ == MHA_OK, "%s -> %s: %s", #call, mha_status_str(st_), mha_last_error()); \
    } while (0)

/* A call that must fail with `status` and a message containing `needle`. */
#define CHECK_FAILS(call, status, needle)                                                                             \
    do {                                                                                                              \
        mha_status st_ = (call);                                                                                      \
        CHECK(st_ == (status), "%s -> %s (%s), expected %s", #call, mha_status_str(st_), mha_last_error(),            \
              mha_status_str(status));                                                                                \
        CHECK(strstr(mha_last_error(), (needle)) != NULL, "message \"%s\" lacks \"%s\"", mha_last_error(), (needle)); \
    } while (0)

/* Sets every weight of the layer (by its own names) to `value`: for tests
 * whose point is not the weights; a layer refuses to compute until its
 * matrices are set. */
static inline mha_status harness_fill_weights(mha_layer *layer, float value)
{
    const char *names[16];
    int64_t n = mha_layer_weight_names(layer, names, 16);
    mha_status st = n < 0 ? MHA_ERR_MISUSE : MHA_OK;
    for (int64_t i = 0; i < n && st == MHA_OK; i++) {
        int rank;
        int64_t shape[3], numel;
        st = mha_layer_weight_shape(layer, names[i], &rank, shape, &numel);
        float *w = st == MHA_OK ? malloc((size_t)numel * sizeof(float)) : NULL;
        if (st == MHA_OK && !w) st = MHA_ERR_NOMEM;
        for (int64_t j = 0; st == MHA_OK && j < numel; j++) w[j] = value;
        if (st == MHA_OK) st = mha_layer_set_weight(layer, names[i], w, numel);
        free(w);
    }
    return st;
}

/* Ends main(): the summary line ctest logs and a non-zero exit on failure. */
/* MHA_TEST_SPLIT_ALL set (ctest's *_split runs): every float32 attention
 * problem whose shape allows it takes the split products (products_split.c),
 * not only those of 512 keys and rows or more, so that the suites' small
 * cases check that path too.  Nothing changes on a CPU without them. */
static inline void harness_split_all(void)
{
    if (getenv("MHA_TEST_SPLIT_ALL")) mha__split_attention_min_rows(0);
}

static inline int harness_finish(const char *name)
{
    printf("%s: %d passed, %d failed\n", name, harness_checks - harness_failures, harness_failures);
    return harness_failures ? 1 : 0;
}

typedef struct tolerance_report {
    double err, base_err, limit;
    long long worst; /* index of the largest error, -1 if none */
    bool ok;
} tolerance_report;

#define BF16_FLOOR_EPS 0x1p-11

/* The tolerance rule over n values.  `base` may be NULL when no baseline
 * exists: then only the floor applies. */
static inline tolerance_report tolerance_check_rule(const float *got, const double *ref, const float *base, long long n,
                                                    double eps, double factor)
{
    tolerance_report r = {0, 0, 0, -1, true};
    double max_ref = 1.0;
    for (long long i = 0; i < n; i++) {
        if (isfinite(ref[i]) && fabs(ref[i]) > max_ref) max_ref = fabs(ref[i]);
        if (isinf(ref[i]) || isnan(ref[i])) {
            bool same = isnan(ref[i]) ? isnan(got[i]) : (double)got[i] == ref[i];
            if (!same) {
                r.ok = false;
                r.worst = i;
                r.err = INFINITY;
            }
            continue;
        }
        double e = isfinite(got[i]) ? fabs((double)got[i] - ref[i]) : INFINITY;
        if (e > r.err || (isnan(got[i]))) {
            r.err = isnan(got[i]) ? INFINITY : e;
            r.worst = i;
        }
        if (base && isfinite(base[i])) {
            double b = fabs((double)base[i] - ref[i]);
            if (b > r.base_err) r.base_err = b;
        }
    }
    r.limit = factor * r.base_err + 4.0 * eps * max_ref;
    if (!(r.err <= r.limit)) r.ok = false;
    return r;
}

/* Values: at most twice the plain float32 implementation's error. */
static inline tolerance_report tolerance_check_eps(const float *got, const double *ref, const float *base, long long n,
                                                   double eps)
{
    return tolerance_check_rule(got, ref, base, n, eps, 2.0);
}

/* Gradients: three times, as FlashAttention's tests allow for them. */
#define GRAD_FACTOR 3.0

static inline tolerance_report tolerance_check(const float *got, const double *ref, const float *base, long long n)
{
    return tolerance_check_eps(got, ref, base, n, FLT_EPSILON);
}

/* CHECK the rule; on failure print where and by how much. */
#define CHECK_CLOSE(what, got, ref, base, n)          CHECK_CLOSE_EPS(what, got, ref, base, n, FLT_EPSILON)
#define CHECK_CLOSE_EPS(what, got, ref, base, n, eps) CHECK_CLOSE_RULE(what, got, ref, base, n, eps, 2.0)
#define CHECK_CLOSE_GRAD(what, got, ref, base, n)     CHECK_CLOSE_RULE(what, got, ref, base, n, FLT_EPSILON, GRAD_FACTOR)
#define CHECK_CLOSE_RULE(what, got, ref, base, n, eps, factor)                                                       \
    do {                                                                                                             \
        tolerance_report tr_ = tolerance_check_rule((got), (ref), (base), (n), (eps), (factor));                     \
        CHECK(tr_.ok, "%s: max error %.3g > limit %.3g (float32 baseline %.3g) at %lld: got %.9g want %.9g", (what), \
              tr_.err, tr_.limit, tr_.base_err, tr_.worst, tr_.worst >= 0 ? (double)(got)[tr_.worst] : 0.0,          \
              tr_.worst >= 0 ? (ref)[tr_.worst] : 0.0);                                                              \
    } while (0)

#endif /* MHA_TEST_HARNESS_H */
