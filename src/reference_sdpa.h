/*
 * reference_sdpa.h -- the body of the reference attention, written once
 * and compiled for two element types by reference.c, which defines REAL
 * (the element type), MATH(f) (the libm function for it) and NAME (the
 * function's name).  Three passes per row, as on paper:
 *   scores, max and sum, then the weighted values.
 */
void NAME(const mha_ref_sdpa *a, const REAL *q, const REAL *k, const REAL *v, REAL *out, REAL *lse, REAL *probs)
{
    int64_t group = a->Hq / a->Hkv;
    REAL *s = malloc((size_t)(a->S ? a->S : 1) * sizeof *s);
    if (!s) abort(); /* tests only */
    for (int64_t b = 0; b < a->B; b++)
    for (int64_t h = 0; h < a->Hq; h++)
    for (int64_t i = 0; i < a->L; i++) {
        const REAL *qi = q + ((b * a->Hq + h) * a->L + i) * a->D;
        const REAL *kb = k + (b * a->Hkv + h / group) * a->S * a->D;
        const REAL *vb = v + (b * a->Hkv + h / group) * a->S * a->Dv;
        int64_t row = (b * a->Hq + h) * a->L + i, diag = i + a->S - a->L;
        REAL max = -INFINITY;
        for (int64_t j = 0; j < a->S; j++) {
            bool visible = true;
            if (a->causal == MHA_CAUSAL_TOP_LEFT && j > i) visible = false;
            if (a->causal == MHA_CAUSAL_BOTTOM_RIGHT && j > diag) visible = false;
            if (a->window_left >= 0 && j < diag - a->window_left) visible = false;
            if (a->window_right >= 0 && j > diag + a->window_right) visible = false;
            if (a->keep && !a->keep[row * a->S + j]) visible = false;
            /* Queries scaled first, as nn.MultiheadAttention does (and, in a
             * bf16 model, stored rounded). */
            REAL x = 0;
            for (int64_t c = 0; c < a->D; c++) x += ROUND(qi[c] * (REAL)a->scale) * kb[j * a->D + c];
            if (a->softcap > 0) x = (REAL)a->softcap * MATH(tanh)(x / (REAL)a->softcap);
            if (a->alibi) x -= (REAL)a->alibi[h] * (REAL)llabs(diag - j);
            if (a->add) x += (REAL)a->add[row * a->S + j];
            s[j] = visible ? x : -INFINITY;
            if (s[j] > max) max = s[j];
        }
        REAL sum = 0;
        for (int64_t j = 0; j < a->S; j++) {
            s[j] = max == -INFINITY ? 0 : MATH(exp)(s[j] - max);
            sum += s[j];
        }
        for (int64_t c = 0; c < a->Dv; c++) {
            REAL o = 0;
            for (int64_t j = 0; j < a->S; j++) o += ROUND(s[j]) * vb[j * a->Dv + c];
            out[row * a->Dv + c] = sum > 0 ? o / sum : 0;
        }
        if (lse) lse[row] = sum > 0 ? max + MATH(log)(sum) : -INFINITY;
        if (probs)
            for (int64_t j = 0; j < a->S; j++) probs[row * a->S + j] = sum > 0 ? s[j] / sum : 0;
    }
    free(s);
}
