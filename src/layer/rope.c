/*
 * rope.c -- rotary position embeddings (Su et al., RoFormer) on the
 * layer's Q and K, in place, after their projections.
 *
 * Pair i of a head (i < dim / 2) is rotated by angle pos * theta^(-2i/dim):
 *   HALF:        the pair (i, i + dim/2)   -- Llama, GPT-NeoX "rotate_half"
 *   INTERLEAVED: the pair (2i, 2i + 1)     -- GPT-J "rotate_every_two"
 *   (x, y) -> (x cos - y sin, y cos + x sin)
 * Dimensions past `dim` are left alone (partial rotary).  The angles and
 * their cosines and sines are computed in double, once per position, and
 * rounded to float: at position 4096 a float32 angle would already be off
 * by 2e-4 radians.
 */
#include "layer/layer.h"

#include <math.h>

typedef struct rope_job {
    const mha_tensor *x;
    const mha_rope *rope;
    int64_t position, pairs;
    float *cos_sin; /* [T][pairs][2] */
    bool inverse;
} rope_job;

static void table_range(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const rope_job *j = arg;
    for (int64_t t = begin; t < end; t++)
        for (int64_t i = 0; i < j->pairs; i++) {
            double angle = (double)(j->position + t) * pow(j->rope->theta, -2.0 * (double)i / (double)j->rope->dim);
            j->cos_sin[(t * j->pairs + i) * 2] = (float)cos(angle);
            j->cos_sin[(t * j->pairs + i) * 2 + 1] = (float)(j->inverse ? -sin(angle) : sin(angle));
        }
}

/* Rows of one (batch, head) pair per item. */
static void rotate_range(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const rope_job *j = arg;
    const mha_tensor *x = j->x;
    int64_t H = x->shape[1], T = x->shape[2], half = j->pairs;
    bool interleaved = j->rope->kind == MHA_ROPE_INTERLEAVED;
    for (int64_t item = begin; item < end; item++)
        for (int64_t t = 0; t < T; t++) {
            float *row = x->data + (item / H) * x->stride[0] + (item % H) * x->stride[1] + t * x->stride[2];
            const float *cs = j->cos_sin + t * half * 2;
            for (int64_t i = 0; i < half; i++) {
                float *a = row + (interleaved ? 2 * i : i) * x->stride[3];
                float *b = row + (interleaved ? 2 * i + 1 : i + half) * x->stride[3];
                float c = cs[2 * i], s = cs[2 * i + 1], u = *a, w = *b;
                *a = u * c - w * s;
                *b = w * c + u * s;
            }
        }
}

/* The table of T positions: a cos and a sin per rotated pair. */
static bool table_bytes(const mha_rope *rope, int64_t T, int64_t *bytes)
{
    return mha__mul(T, rope->dim * (int64_t)sizeof(float), bytes);
}

bool mha__rope_workspace(const mha_layer *l, int64_t T, int64_t *bytes)
{
    int64_t table;
    if (l->desc.rope.kind == MHA_ROPE_NONE) return true;
    if (table_bytes(&l->desc.rope, T, &table)) return mha__ws_add(bytes, table, "the rope table");
    mha__fail(MHA_ERR_INVALID_ARG, "the rope table for %lld rows overflows", (long long)T);
    return false;
}

mha_status mha__rope_apply(mha_ctx *ctx, const mha_layer *l, const mha_tensor *x, int64_t position, bool inverse)
{
    const mha_rope *rope = &l->desc.rope;
    int64_t T = x->shape[2], bytes, top = mha__ws_top(ctx);
    if (rope->kind == MHA_ROPE_NONE || x->shape[0] * x->shape[1] * T == 0) return MHA_OK;
    if (position < 0 || position > INT64_MAX / 2 - T)
        return mha__fail(MHA_ERR_INVALID_ARG, "position %lld is out of range", (long long)position);
    float *table = table_bytes(rope, T, &bytes) ? mha__ws_take(ctx, bytes) : NULL;
    if (!table) return MHA_ERR_INTERNAL; /* the plan sized it */
    rope_job j = {x, rope, position, rope->dim / 2, table, inverse};
    mha__parallel_for(ctx, T, table_range, &j);
    mha__parallel_for(ctx, x->shape[0] * x->shape[1], rotate_range, &j);
    mha__ws_release(ctx, top);
    return MHA_OK;
}
