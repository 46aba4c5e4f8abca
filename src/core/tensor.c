/*
 * tensor.c -- tensor views: the constructors of the public API and the
 * check every entry point runs on a caller's view before reading it.
 */
#include "core/tensor.h"

#include <string.h>

mha_tensor mha_tensor_4d(float *data, int64_t d0, int64_t d1, int64_t d2, int64_t d3)
{
    mha_tensor t = {data, {d0, d1, d2, d3}, {d1 * d2 * d3, d2 * d3, d3, 1}};
    return t;
}

mha_tensor mha_tensor_3d(float *data, int64_t d0, int64_t d1, int64_t d2)
{
    mha_tensor t = {data, {d0, d1, d2, 1}, {d1 * d2, d2, 1, 0}};
    return t;
}

mha_status mha__check_tensor(const mha_tensor *t, const char *what, const int64_t shape[4])
{
    static const char *const dim_names[4] = {"first", "second", "third", "fourth"};
    if (!t || !t->data) return mha__fail(MHA_ERR_MISUSE, "%s is NULL", what);
    int64_t last = 0;
    for (int d = 0; d < 4; d++) {
        if (t->shape[d] < 0 || t->stride[d] < 0)
            return mha__fail(MHA_ERR_INVALID_ARG, "%s has a negative size or stride in its %s dimension", what,
                             dim_names[d]);
        if (shape[d] >= 0 && t->shape[d] != shape[d])
            return mha__fail(MHA_ERR_INVALID_ARG, "%s has %lld in its %s dimension, expected %lld", what,
                             (long long)t->shape[d], dim_names[d], (long long)shape[d]);
        int64_t reach;
        if (t->shape[d] > 0 && (!mha__mul(t->shape[d] - 1, t->stride[d], &reach) || !mha__add(last, reach, &last)))
            return mha__fail(MHA_ERR_INVALID_ARG, "%s: shape times strides overflows 64 bits", what);
    }
    return MHA_OK;
}

void mha__tensor_copy(const mha_tensor *src, const mha_tensor *dst)
{
    for (int64_t a = 0; a < src->shape[0]; a++)
        for (int64_t b = 0; b < src->shape[1]; b++)
            for (int64_t c = 0; c < src->shape[2]; c++) {
                const float *from = src->data + a * src->stride[0] + b * src->stride[1] + c * src->stride[2];
                float *to = dst->data + a * dst->stride[0] + b * dst->stride[1] + c * dst->stride[2];
                for (int64_t e = 0; e < src->shape[3]; e++) to[e * dst->stride[3]] = from[e * src->stride[3]];
            }
}

bool mha__same_tensor(const mha_tensor *a, const mha_tensor *b)
{
    return a && b && a->data == b->data && memcmp(a->shape, b->shape, sizeof a->shape) == 0 &&
           memcmp(a->stride, b->stride, sizeof a->stride) == 0;
}
