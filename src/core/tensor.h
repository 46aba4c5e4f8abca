/*
 * tensor.h -- checking a caller's tensor view before any kernel reads it.
 */
#ifndef MHA_TENSOR_H
#define MHA_TENSOR_H

#include "core/internal.h"

/* Checks that `t` has the given rank-4 shape (-1 = any) and that its
 * strides address no element past INT64_MAX; INVALID_ARG names `what`. */
mha_status mha__check_tensor(const mha_tensor *t, const char *what, const int64_t shape[4]);

/* dst = src: two views of the same shape, any strides, not overlapping. */
void mha__tensor_copy(const mha_tensor *src, const mha_tensor *dst);

/* Whether a and b (either may be NULL: not) view the same elements in
 * the same order: one data pointer, shape and strides. */
bool mha__same_tensor(const mha_tensor *a, const mha_tensor *b);

#endif /* MHA_TENSOR_H */
