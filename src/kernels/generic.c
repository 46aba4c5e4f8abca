/*
 * generic.c -- the portable kernels: plain C, no intrinsics.  This is the
 * documentation of what the SIMD kernels compute; they must agree with it
 * within the tolerance rule.
 */
#include "kernels.h"

#include <math.h>

enum { GENERIC_MR = 4, GENERIC_NR = 16 };

static void gemm_tile_generic(int64_t m, int64_t n, int64_t k, const float *a, int64_t a_rs, int64_t a_cs,
                              const float *b, int64_t ldb, float *c, int64_t ldc, int accumulate)
{
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            float acc = accumulate ? c[i * ldc + j] : 0.0f;
            for (int64_t p = 0; p < k; p++) acc += a[i * a_rs + p * a_cs] * b[p * ldb + j];
            c[i * ldc + j] = acc;
        }
}

static void softmax_step_generic(float *s, int64_t lds, int64_t rows, int64_t cols, float *max, float *sum,
                                 float *scale)
{
    for (int64_t r = 0; r < rows; r++) {
        float *row = s + r * lds;
        float new_max = max[r];
        for (int64_t j = 0; j < cols; j++)
            if (row[j] > new_max) new_max = row[j];
        if (new_max == -INFINITY) { /* nothing visible yet */
            for (int64_t j = 0; j < cols; j++) row[j] = 0.0f;
            scale[r] = 1.0f;
            continue;
        }
        float row_sum = 0.0f;
        for (int64_t j = 0; j < cols; j++) {
            row[j] = expf(row[j] - new_max);
            row_sum += row[j];
        }
        scale[r] = expf(max[r] - new_max);
        sum[r] = sum[r] * scale[r] + row_sum;
        max[r] = new_max;
    }
}

static void scale_generic(float *x, int64_t n, float alpha)
{
    for (int64_t i = 0; i < n; i++) x[i] *= alpha;
}

static void exp_shift_generic(float *x, int64_t n, float shift)
{
    for (int64_t i = 0; i < n; i++) x[i] = expf(x[i] - shift);
}

const mha__kernels mha__kernels_generic = {
    .name = "generic",
    .mr = GENERIC_MR,
    .nr = GENERIC_NR,
    .gemm_tile = gemm_tile_generic,
    .softmax_step = softmax_step_generic,
    .scale = scale_generic,
    .exp_shift = exp_shift_generic,
};
