/*
 * reference.c -- the naive reference (see reference.h): obviously correct
 * loops, no blocking, no SIMD, no threads.
 */
#include "reference.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define REAL double
#define MATH(f) f
#define NAME mha_ref_sdpa_f64
#include "reference_sdpa.h"
#undef REAL
#undef MATH
#undef NAME

#define REAL float
#define MATH(fn) fn##f
#define NAME mha_ref_sdpa_f32
#include "reference_sdpa.h"
#undef REAL
#undef MATH
#undef NAME

/* y[r, :] = x[r, :] W^T + b over `rows` rows. */
static void ref_linear(const double *x, int64_t rows, int64_t in, const double *w, const double *b,
                       int64_t out, double *y)
{
    for (int64_t r = 0; r < rows; r++)
        for (int64_t o = 0; o < out; o++) {
            double s = b ? b[o] : 0;
            for (int64_t c = 0; c < in; c++) s += x[r * in + c] * w[o * in + c];
            y[r * out + o] = s;
        }
}

static double *ref_alloc(int64_t n)
{
    double *p = calloc((size_t)(n ? n : 1), sizeof *p);
    if (!p) abort(); /* tests only */
    return p;
}

void mha_ref_layer_f64(const mha_ref_layer *a, const double *query, const double *key, const double *value,
                       double *out, double *probs)
{
    int64_t N = a->N, L = a->L, S = a->S, E = a->E, H = a->H, d = E / H;
    int64_t S1 = S + (a->bias_k != NULL) + (a->add_zero_attn != 0);
    double *q = ref_alloc(N * L * E), *k = ref_alloc(N * S1 * E), *v = ref_alloc(N * S1 * E);
    double *qh = ref_alloc(N * H * L * d), *kh = ref_alloc(N * H * S1 * d), *vh = ref_alloc(N * H * S1 * d);
    double *oh = ref_alloc(N * H * L * d), *cat = ref_alloc(N * L * E), *add = ref_alloc(N * H * L * S1);
    for (int64_t n = 0; n < N; n++) {
        ref_linear(query + n * L * E, L, E, a->w_q, a->b_in, E, q + n * L * E);
        ref_linear(key + n * S * a->kdim, S, a->kdim, a->w_k, a->b_in ? a->b_in + E : NULL, E, k + n * S1 * E);
        ref_linear(value + n * S * a->vdim, S, a->vdim, a->w_v, a->b_in ? a->b_in + 2 * E : NULL, E, v + n * S1 * E);
        if (a->bias_k) {
            memcpy(k + (n * S1 + S) * E, a->bias_k, (size_t)E * sizeof(double));
            memcpy(v + (n * S1 + S) * E, a->bias_v, (size_t)E * sizeof(double));
        } /* the zero row is already zero */
    }
    /* Split heads: [N, T, h, d] -> [N, h, T, d]; pad the mask with zeros
     * for the appended keys; causal is a -inf mask over the real keys. */
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t c = 0; c < d; c++) {
                for (int64_t t = 0; t < L; t++) qh[((n * H + h) * L + t) * d + c] = q[(n * L + t) * E + h * d + c];
                for (int64_t t = 0; t < S1; t++) {
                    kh[((n * H + h) * S1 + t) * d + c] = k[(n * S1 + t) * E + h * d + c];
                    vh[((n * H + h) * S1 + t) * d + c] = v[(n * S1 + t) * E + h * d + c];
                }
            }
    for (int64_t r = 0; r < N * H * L; r++)
        for (int64_t j = 0; j < S; j++) {
            double m = a->add ? a->add[r * S + j] : 0;
            if (a->causal && j > r % L) m = -INFINITY;
            add[r * S1 + j] = m;
        }
    mha_ref_sdpa sd = {.B = N, .Hq = H, .Hkv = H, .L = L, .S = S1, .D = d, .Dv = d,
                       .scale = 1.0 / sqrt((double)d), .window_left = -1, .window_right = -1, .add = add};
    mha_ref_sdpa_f64(&sd, qh, kh, vh, oh, NULL, probs);
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t t = 0; t < L; t++)
                for (int64_t c = 0; c < d; c++) cat[(n * L + t) * E + h * d + c] = oh[((n * H + h) * L + t) * d + c];
    ref_linear(cat, N * L, E, a->w_out, a->b_out, E, out);
    free(q); free(k); free(v); free(qh); free(kh); free(vh); free(oh); free(cat); free(add);
}
