/*
 * decode.h -- attention of a few query rows against a KV cache (decode.c),
 * and the cache's layout.
 */
#ifndef MHA_DECODE_H
#define MHA_DECODE_H

#include "attn/attention.h"

/* Below this many query rows, attention splits the keys over the threads
 * (decode.c) instead of the query rows (flash.c). */
enum { MHA_DECODE_ROWS = 16 };

/* K and V rows in a cache: element (b, g, j, c) at k + b * stride[0] +
 * g * stride[1] + j * stride[2] + c, float32 or bf16. */
typedef struct mha__kv_view {
    const void *k, *v;
    bool bf16;
    int64_t stride[3];
} mha__kv_view;

/* out [B, Hq, L, Dv] (and lse [B, Hq, L] if not NULL) for q [B, Hq, L, D]
 * against the plan's S keys in kv: split-K over fixed chunks of keys,
 * merged by log-sum-exp in chunk order, so the bits do not depend on the
 * thread count.  The plan's options (causal, window, softcap, ALiBi) apply
 * as in mha__attn_forward; it must have no appended keys (R == S) and no
 * masks.  NOMEM, INVALID_ARG (sizes overflow). */
mha_status mha__decode_attention(mha_ctx *ctx, const mha__attn_plan *plan, mha_tensor *out, float *lse,
                                 const mha_tensor *q, const mha__kv_view *kv);

#endif /* MHA_DECODE_H */
