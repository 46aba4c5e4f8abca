/*
 * weight.c -- a weight packed for the GEMM in the dtype it computes in,
 * behind one type: a layer keeps one mha__weight per matrix and never
 * asks which packing is inside.
 */
#include "gemm/gemm.h"

#include <string.h>

mha_status mha__weight_pack(mha_ctx *ctx, mha__weight *w, const mha__isa_kernels *k, mha_dtype dtype, const float *src,
                            int64_t out, int64_t in)
{
    w->kernels = k;
    w->bf16 = dtype == MHA_DTYPE_BF16;
    w->pending = NULL;
    w->f32_behind = NULL;
    w->transposed_fresh = false;
    if (w->bf16) return mha__pack_bf16(&w->b16, src, out, in);
    mha_status st = mha__pack(ctx, &w->f32, k->f32, src, out, in);
    if (st != MHA_OK || !mha__split_products(k)) return st;
    st = mha__pack_split(ctx, &w->split, k->bf16, src, out, in);
    if (st != MHA_OK) mha__packed_split_free(&w->split); /* never a stale split beside new panels */
    return st;
}

void mha__weight_defer(mha__weight *w, const float *src)
{
    w->pending = src;
    w->f32_behind = NULL; /* the refresh says again where the panels' values are: src may have moved */
}

mha_status mha__weight_refresh(mha_ctx *ctx, mha__weight *w)
{
    if (!w->pending) return MHA_OK;
    const float *src = w->pending;
    mha_status st = MHA_OK;
    w->transposed_fresh = false;
    if (mha__split_products(w->kernels)) {
        st = mha__pack_split(ctx, &w->split, w->kernels->bf16, src, w->f32.out, w->f32.in);
        if (st == MHA_OK && w->split.data) { /* split: the panels wait for a call that needs them */
            w->pending = NULL;
            w->f32_behind = src;
            return MHA_OK;
        }
    }
    /* No split products, or values that do not split (the FMA GEMM then
     * serves every chunk): everything now. */
    if (st == MHA_OK) st = mha__weight_pack(ctx, w, w->kernels, MHA_DTYPE_F32, src, w->f32.out, w->f32.in);
    if (st != MHA_OK) w->pending = src; /* still behind: the next call tries again */
    return st;
}

mha_status mha__weight_transposed(mha_ctx *ctx, mha__weight *w, const float *plain)
{
    if (w->transposed_fresh) return MHA_OK;
    int64_t out = w->f32.out, in = w->f32.in;
    mha_status st = MHA_OK;
    if (mha__split_products(w->kernels))
        st = mha__pack_split_transposed(ctx, &w->split_t, w->kernels->bf16, plain, out, in);
    if (st == MHA_OK && !w->split_t.data) st = mha__pack_transposed(ctx, &w->f32_t, w->kernels->f32, plain, out, in);
    w->transposed_fresh = st == MHA_OK;
    return st;
}

mha_status mha__weight_f32(mha_ctx *ctx, const mha__weight *w, const mha__packed **panels)
{
    mha__weight *cache = (mha__weight *)w;
    if (cache->f32_behind) {
        mha_status st = mha__pack(ctx, &cache->f32, w->kernels->f32, cache->f32_behind, w->f32.out, w->f32.in);
        if (st != MHA_OK) return st;
        cache->f32_behind = NULL;
    }
    *panels = &w->f32;
    return MHA_OK;
}

void mha__weight_free(mha__weight *w)
{
    mha__packed_free(&w->f32);
    mha__packed_split_free(&w->split);
    mha__packed_free(&w->f32_t);
    mha__packed_split_free(&w->split_t);
    mha__packed_bf16_free(&w->b16);
}

int64_t mha__weight_panel(const mha__weight *w) { return w->bf16 ? MHA_BF16_NR : w->kernels->f32->nr; }

bool mha__weight_linear_workspace(const mha__weight *w, int64_t rows, int64_t in, int64_t *bytes)
{
    if (w->bf16) return mha__linear_bf16_workspace(rows, in, bytes);
    bool may_split = w->split.data || (w->pending && mha__split_products(w->kernels));
    return !may_split || mha__linear_split_workspace(rows, in, bytes);
}

/* The split product's view of w: its float32 panels handed out (packed
 * first if behind) only to the chunks that take the FMA GEMM. */
static mha_status own_panels(mha_ctx *ctx, const void *w, const mha__packed **panels)
{
    return mha__weight_f32(ctx, w, panels);
}

static mha__split_output split_output(const mha__weight *w, const float *b, const mha__mat *y)
{
    return (mha__split_output){&w->split, NULL, b, y, NULL, own_panels, w};
}

mha_status mha__weight_linear(mha_ctx *ctx, const mha__weight *w, int64_t rows, const mha__mat *x, const float *b,
                              const mha__mat *y)
{
    if (w->bf16) return mha__linear_bf16(ctx, w->kernels->bf16, rows, x, &w->b16, b, y);
    if (w->split.data) {
        mha__split_output one = split_output(w, b, y);
        return mha__linear_split_shared(ctx, w->kernels, rows, x, 1, &one, false);
    }
    const mha__packed *panels;
    mha_status st = mha__weight_f32(ctx, w, &panels);
    if (st != MHA_OK) return st;
    mha__linear(ctx, w->kernels->f32, rows, x, panels, b, y);
    return MHA_OK;
}

mha_status mha__weights_linear_shared(mha_ctx *ctx, int count, const mha__weight *const *w, int64_t rows,
                                      const mha__mat *x, const float *const *b, const mha__mat *const *y)
{
    mha__split_output outs[MHA_SPLIT_OUTPUTS];
    bool shared = count <= MHA_SPLIT_OUTPUTS;
    for (int i = 0; i < count && shared; i++) {
        shared = !w[i]->bf16 && w[i]->split.data && w[i]->kernels == w[0]->kernels && w[i]->split.in == w[0]->split.in;
        outs[i] = split_output(w[i], b[i], y[i]);
    }
    if (shared) return mha__linear_split_shared(ctx, w[0]->kernels, rows, x, count, outs, false);
    mha_status st = MHA_OK;
    for (int i = 0; i < count && st == MHA_OK; i++) st = mha__weight_linear(ctx, w[i], rows, x, b[i], y[i]);
    return st;
}

mha_status mha__weight_unpack(const mha__weight *w, float *dst)
{
    if (w->bf16) return mha__fail(MHA_ERR_UNSUPPORTED, "a bf16 weight keeps only its rounded pack");
    if (w->f32_behind) memcpy(dst, w->f32_behind, (size_t)(w->f32.out * w->f32.in) * sizeof(float));
    else mha__unpack(&w->f32, dst);
    return MHA_OK;
}
