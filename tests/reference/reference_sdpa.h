/*
 * reference_sdpa.h -- the body of the reference attention, written once
 * and compiled for two element types by reference.c, which defines REAL
 * (the element type), MATH(f) (the libm function for it) and NAME (the
 * function's name).  Three passes per row, as on paper:
 *   scores, max and sum, then the weighted values.
 */
/* Row i's scores against every key of its kv head (-inf where not
 * visible) into s, returning their maximum; with slope, also the softcap's
 * derivative d(capped)/d(raw) per key (1 without softcap). */
static REAL SUFFIX(row_scores)(const mha_ref_sdpa *a, const REAL *qi, const REAL *kb, int64_t h, int64_t i, int64_t row,
                               REAL *s, REAL *slope)
{
    int64_t diag = i + a->S - a->L;
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
        if (slope) slope[j] = 1;
        if (a->softcap > 0) {
            REAL t = MATH(tanh)(x / (REAL)a->softcap);
            x = (REAL)a->softcap * t;
            if (slope) slope[j] = 1 - t * t;
        }
        if (a->alibi) x -= (REAL)a->alibi[h] * (REAL)llabs(diag - j);
        if (a->add) x += (REAL)a->add[row * a->S + j];
        s[j] = visible ? x : -INFINITY;
        if (s[j] > max) max = s[j];
    }
    return max;
}

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
                int64_t row = (b * a->Hq + h) * a->L + i;
                REAL max = SUFFIX(row_scores)(a, qi, kb, h, i, row, s, NULL);
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

/* Its gradients, straight from the chain rule, row by row: the
 * probabilities as above, then dV += p dO, dS = p (dP - dO.O) (times the
 * softcap's derivative), dQ += scale dS k, dK += dS (scale q).  dq, dk, dv
 * are overwritten. */
void BWD_NAME(const mha_ref_sdpa *a, const REAL *q, const REAL *k, const REAL *v, const REAL *dout, REAL *dq, REAL *dk,
              REAL *dv)
{
    int64_t group = a->Hq / a->Hkv, S = a->S ? a->S : 1;
    REAL *s = malloc((size_t)S * sizeof *s), *slope = malloc((size_t)S * sizeof *slope);
    if (!s || !slope) abort(); /* tests only */
    memset(dq, 0, (size_t)(a->B * a->Hq * a->L * a->D) * sizeof *dq);
    memset(dk, 0, (size_t)(a->B * a->Hkv * a->S * a->D) * sizeof *dk);
    memset(dv, 0, (size_t)(a->B * a->Hkv * a->S * a->Dv) * sizeof *dv);
    for (int64_t b = 0; b < a->B; b++)
        for (int64_t h = 0; h < a->Hq; h++)
            for (int64_t i = 0; i < a->L; i++) {
                int64_t row = (b * a->Hq + h) * a->L + i, kv = b * a->Hkv + h / group;
                const REAL *qi = q + row * a->D, *di = dout + row * a->Dv;
                const REAL *kb = k + kv * a->S * a->D, *vb = v + kv * a->S * a->Dv;
                REAL max = SUFFIX(row_scores)(a, qi, kb, h, i, row, s, slope);
                REAL sum = 0;
                for (int64_t j = 0; j < a->S; j++) {
                    s[j] = max == -INFINITY ? 0 : MATH(exp)(s[j] - max);
                    sum += s[j];
                }
                if (!(sum > 0)) continue; /* nothing visible: no gradient */
                REAL delta = 0;
                for (int64_t j = 0; j < a->S; j++) s[j] /= sum;
                for (int64_t c = 0; c < a->Dv; c++) {
                    REAL o = 0;
                    for (int64_t j = 0; j < a->S; j++) o += s[j] * vb[j * a->Dv + c];
                    delta += o * di[c];
                }
                for (int64_t j = 0; j < a->S; j++) {
                    REAL dp = 0;
                    for (int64_t c = 0; c < a->Dv; c++) {
                        dp += di[c] * vb[j * a->Dv + c];
                        dv[(kv * a->S + j) * a->Dv + c] += s[j] * di[c];
                    }
                    REAL ds = s[j] * (dp - delta) * slope[j];
                    for (int64_t c = 0; c < a->D; c++) {
                        dq[row * a->D + c] += (REAL)a->scale * ds * kb[j * a->D + c];
                        dk[(kv * a->S + j) * a->D + c] += ds * (REAL)a->scale * qi[c];
                    }
                }
            }
    free(s);
    free(slope);
}
