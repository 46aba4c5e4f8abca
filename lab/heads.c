/*
 * heads.c -- what a head does, from its attention on sequences: the
 * scores of docs/HEADS.md, and the role they single out.
 */
#include "lab.h"

#include <math.h>

/* The latest j < i with tokens[j] == tokens[i], or -1. */
static int64_t earlier_copy(const int32_t *seq, int64_t i)
{
    for (int64_t j = i - 1; j >= 0; j--)
        if (seq[j] == seq[i]) return j;
    return -1;
}

void lab_head_scores_compute(const float *a, const int32_t *tokens, int64_t B, int64_t T, lab_head_scores *s)
{
    double prev = 0, ind = 0, dup = 0, first = 0, dist = 0, ent = 0;
    int64_t n_prev = 0, n_rep = 0, n_rows = 0;
    for (int64_t b = 0; b < B; b++) {
        const int32_t *seq = tokens + b * T;
        for (int64_t i = 0; i < T; i++) {
            const float *row = a + (b * T + i) * T;
            double d = 0, h = 0;
            for (int64_t j = 0; j <= i; j++) {
                d += row[j] * (double)(i - j);
                if (row[j] > 0) h -= row[j] * log((double)row[j]);
            }
            dist += d, ent += h, n_rows++;
            if (i == 0) continue;
            prev += row[i - 1], first += row[0], n_prev++;
            int64_t j = earlier_copy(seq, i);
            if (j >= 0 && j + 1 < i) {
                ind += row[j + 1], dup += row[j], n_rep++;
            }
        }
    }
    s->previous_token = n_prev ? prev / (double)n_prev : 0;
    s->first_token = n_prev ? first / (double)n_prev : 0;
    s->induction = n_rep ? ind / (double)n_rep : 0;
    s->duplicate = n_rep ? dup / (double)n_rep : 0;
    s->distance = n_rows ? dist / (double)n_rows : 0;
    s->entropy = n_rows ? ent / (double)n_rows : 0;
}

const char *lab_head_role(const lab_head_scores *s)
{
    if (s->induction >= 0.4) return "induction";
    if (s->previous_token >= 0.5) return "previous-token";
    if (s->duplicate >= 0.4) return "duplicate-token";
    if (s->first_token >= 0.5) return "first-token";
    if (s->distance <= 2.5) return "positional (local)";
    return "mixed";
}
