/*
 * linear.c -- mha_linear and its backward: the projections' GEMM (gemm.c)
 * offered for plain row-major matrices, so models built on the library
 * (the head lab's MLP and unembedding) need no GEMM of their own.
 *
 *   forward   y  = x W^T + b    W packed into the context's workspace
 *   backward  dx = dy W         W packed transposed into the workspace
 *             dW += dy^T x      mha__weight_grad (its packs in the workspace)
 *             db += sum_r dy    mha__column_sums
 *
 * Every output element is one chain of multiply-adds in a fixed order, so
 * the bits do not depend on the thread count.
 */
#include "gemm/gemm.h"

/* Checks the sizes and that every matrix's element count fits. */
static mha_status check_sizes(const char *fn, int64_t rows, int64_t in, int64_t out)
{
    int64_t n;
    if (rows < 1 || in < 1 || out < 1)
        return mha__fail(MHA_ERR_INVALID_ARG, "%s: rows, in and out must be positive, got %lld, %lld, %lld", fn,
                         (long long)rows, (long long)in, (long long)out);
    if (!mha__mul(rows, in, &n) || !mha__mul(rows, out, &n) || !mha__mul(out, in, &n) ||
        !mha__mul(n, (int64_t)sizeof(float), &n))
        return mha__fail(MHA_ERR_INVALID_ARG, "%s: %lld x %lld x %lld is too large", fn, (long long)rows, (long long)in,
                         (long long)out);
    return MHA_OK;
}

/* A row-major [rows, cols] matrix as the GEMM's operand. */
static mha__mat plain(const float *data, int64_t cols) { return (mha__mat){(float *)data, cols, 1, 0, 0}; }

mha_status mha_linear_workspace_size(int64_t rows, int64_t in, int64_t out, int64_t *bytes)
{
    if (!bytes) return mha__fail(MHA_ERR_MISUSE, "mha_linear_workspace_size: NULL argument");
    *bytes = 0;
    mha_status st = check_sizes("mha_linear", rows, in, out);
    if (st == MHA_OK && !mha__pack_workspace(mha__kernels_get(), out, in, bytes)) st = MHA_ERR_INVALID_ARG;
    return st;
}

mha_status mha_linear(mha_ctx *ctx, const float *x, const float *w, const float *b, float *y, int64_t rows, int64_t in,
                      int64_t out)
{
    if (!ctx || !x || !w || !y) return mha__fail(MHA_ERR_MISUSE, "mha_linear: NULL argument");
    int64_t bytes, top = mha__ws_top(ctx);
    mha_status st = mha_linear_workspace_size(rows, in, out, &bytes);
    if (st == MHA_OK) st = mha__ws_reserve(ctx, bytes);
    const mha__kernels *kt = mha__kernels_get();
    mha__packed packed;
    if (st == MHA_OK) st = mha__pack_workspace_take(ctx, kt, w, out, in, &packed);
    if (st != MHA_OK) return st;
    mha__mat xm = plain(x, in), ym = plain(y, out);
    mha__linear(ctx, kt, rows, &xm, &packed, b, &ym);
    mha__ws_release(ctx, top);
    return MHA_OK;
}

mha_status mha_linear_backward_workspace_size(int64_t rows, int64_t in, int64_t out, int64_t *bytes)
{
    if (!bytes) return mha__fail(MHA_ERR_MISUSE, "mha_linear_backward_workspace_size: NULL argument");
    *bytes = 0;
    mha_status st = check_sizes("mha_linear_backward", rows, in, out);
    if (st != MHA_OK) return st;
    /* The two steps use the workspace one after the other. */
    const mha__kernels *kt = mha__kernels_get();
    int64_t pack = 0, grad = 0;
    if (!mha__pack_transposed_workspace(kt, out, in, &pack) || !mha__weight_grad_workspace(kt, out, in, &grad))
        return MHA_ERR_INVALID_ARG;
    *bytes = mha__max64(pack, grad);
    return MHA_OK;
}

mha_status mha_linear_backward(mha_ctx *ctx, const float *dy, const float *x, const float *w, float *dx, float *dw,
                               float *db, int64_t rows, int64_t in, int64_t out)
{
    if (!ctx || !dy || !x || !w || !dw) return mha__fail(MHA_ERR_MISUSE, "mha_linear_backward: NULL argument");
    int64_t bytes, top = mha__ws_top(ctx);
    mha_status st = mha_linear_backward_workspace_size(rows, in, out, &bytes);
    if (st == MHA_OK) st = mha__ws_reserve(ctx, bytes);
    if (st != MHA_OK) return st;
    const mha__kernels *kt = mha__kernels_get();
    mha__batched dyb = {plain(dy, out), 0}, xb = {plain(x, in), 0};
    if (dx) {
        mha__packed wt;
        if ((st = mha__pack_transposed_workspace_take(ctx, kt, w, out, in, &wt)) != MHA_OK) return st;
        mha__mat dxm = plain(dx, in);
        mha__linear(ctx, kt, rows, &dyb.m, &wt, NULL, &dxm);
        mha__ws_release(ctx, top);
    }
    if ((st = mha__weight_grad(ctx, kt, 1, rows, &dyb, &xb, out, in, dw, false)) != MHA_OK) return st;
    if (db) mha__column_sums(ctx, kt, 1, rows, &dyb, out, db);
    return MHA_OK;
}
