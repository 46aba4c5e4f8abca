/*
 * rows_generic.h -- the decoding kernels dot_rows and axpy_rows (kernels.h)
 * in plain C, written once and included by generic.c for float32, bf16
 * and int8 rows, which defines
 *   ROWS_ELEM            the stored element type
 *   ROWS_WIDEN(x)        one stored element as float32 (exact)
 *   ROWS_DOT, ROWS_AXPY  the functions' names
 *   ROWS_SCALED          (optional) rows carry a float scale each
 *                        (rows_options.h)
 * Each score is one float chain over d in order, and each output one
 * chain over the keys in order: the sums of a plain loop, so the same
 * bits.  But the dot runs eight keys' chains side by side, and the
 * values' sums take a block of 16 columns at a time down the keys, each
 * row read in order: with one chain a key the dot waited an add's
 * latency a term, and the sums went down V's columns, ldv floats a
 * step (the decoding step was 7x slower than AVX2's on Zen 4).
 */

#ifndef MHA_ROWS_GENERIC_SIZES
#define MHA_ROWS_GENERIC_SIZES
enum { ROWS_GENERIC_KEYS = 8, ROWS_GENERIC_COLS = 16 }; /* constant counts, which -O2 vectorises */
#endif

#include "kernels/rows_options.h"

static void ROWS_DOT(const ROWS_ELEM *k, int64_t ldk, int64_t n, ROWS_SCALE_PARAM const float *q, int64_t d, float *s)
{
    int64_t j = 0;
    for (; j + ROWS_GENERIC_KEYS <= n; j += ROWS_GENERIC_KEYS) {
        float acc[ROWS_GENERIC_KEYS] = {0};
        for (int64_t c = 0; c < d; c++)
            for (int t = 0; t < ROWS_GENERIC_KEYS; t++) acc[t] += q[c] * ROWS_WIDEN(k[(j + t) * ldk + c]);
        for (int t = 0; t < ROWS_GENERIC_KEYS; t++) s[j + t] = ROWS_SCALE1(acc[t], j + t);
    }
    for (; j < n; j++) {
        float acc = 0.0f;
        for (int64_t c = 0; c < d; c++) acc += q[c] * ROWS_WIDEN(k[j * ldk + c]);
        s[j] = ROWS_SCALE1(acc, j);
    }
}

static void ROWS_AXPY(const float *p, ROWS_SCALE_PARAM const ROWS_ELEM *v, int64_t ldv, int64_t n, int64_t d, float *o)
{
    int64_t c0 = 0;
    for (; c0 + ROWS_GENERIC_COLS <= d; c0 += ROWS_GENERIC_COLS) {
        float acc[ROWS_GENERIC_COLS];
        for (int c = 0; c < ROWS_GENERIC_COLS; c++) acc[c] = o[c0 + c];
        for (int64_t j = 0; j < n; j++) {
            float w = ROWS_WEIGHT(p, j);
            const ROWS_ELEM *vj = v + j * ldv + c0;
            for (int c = 0; c < ROWS_GENERIC_COLS; c++) acc[c] += w * ROWS_WIDEN(vj[c]);
        }
        for (int c = 0; c < ROWS_GENERIC_COLS; c++) o[c0 + c] = acc[c];
    }
    for (int64_t c = c0; c < d; c++) {
        float acc = o[c];
        for (int64_t j = 0; j < n; j++) acc += ROWS_WEIGHT(p, j) * ROWS_WIDEN(v[j * ldv + c]);
        o[c] = acc;
    }
}

#include "kernels/rows_undef.h"
