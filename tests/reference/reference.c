/*
 * reference.c -- the naive reference (see reference.h): obviously correct
 * loops, no blocking, no SIMD, no threads.
 */
#include "reference.h"

#include "core/convert.h"

#include <stdint.h>

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

static void *ref_alloc(int64_t n, size_t size)
{
    void *p = calloc((size_t)(n ? n : 1), size);
    if (!p) abort(); /* tests only */
    return p;
}

#define ROUND(x)       (x)
#define REAL           double
#define MATH(f)        f
#define NAME           mha_ref_sdpa_f64
#define BWD_NAME       mha_ref_sdpa_backward_f64
#define LAYER_NAME     mha_ref_layer_f64
#define LAYER_BWD_NAME mha_ref_layer_backward_f64
#define SUFFIX(x)      x##_f64
#include "reference_sdpa.h"
#include "reference_layer.h"
#undef REAL
#undef MATH
#undef NAME
#undef BWD_NAME
#undef LAYER_NAME
#undef LAYER_BWD_NAME
#undef SUFFIX

#define REAL           float
#define MATH(fn)       fn##f
#define NAME           mha_ref_sdpa_f32
#define BWD_NAME       mha_ref_sdpa_backward_f32
#define LAYER_NAME     mha_ref_layer_f32
#define LAYER_BWD_NAME mha_ref_layer_backward_f32
#define SUFFIX(x)      x##_f32
#include "reference_sdpa.h"
#include "reference_layer.h"
#undef REAL
#undef MATH
#undef NAME
#undef BWD_NAME
#undef LAYER_NAME
#undef LAYER_BWD_NAME
#undef SUFFIX
#undef ROUND

/* The plain bfloat16 model: float32 arithmetic, values rounded to bf16
 * where a bf16 model stores them. */
static float round_bf16(float x) { return mha__bf16_to_f32(mha__f32_to_bf16(x)); }
#define ROUND(x)       round_bf16(x)
#define REAL           float
#define MATH(fn)       fn##f
#define NAME           mha_ref_sdpa_bf16
#define BWD_NAME       mha_ref_sdpa_backward_bf16
#define LAYER_NAME     mha_ref_layer_bf16
#define LAYER_BWD_NAME mha_ref_layer_backward_bf16
#define SUFFIX(x)      x##_bf16
#include "reference_sdpa.h"
#include "reference_layer.h"
#undef REAL
#undef MATH
#undef NAME
#undef BWD_NAME
#undef LAYER_NAME
#undef LAYER_BWD_NAME
#undef SUFFIX
#undef ROUND

int64_t mha_ref_layer_grads_size(const mha_ref_layer *a)
{
    int64_t E = a->E, d = a->hd ? a->hd : E / a->H, qd = a->H * d, kvd = (a->G ? a->G : a->H) * d;
    return a->N * (a->L * E + a->S * (a->kdim + a->vdim)) + qd * E + kvd * (a->kdim + a->vdim) + E * qd +
           (qd + 2 * kvd) + 3 * E;
}
