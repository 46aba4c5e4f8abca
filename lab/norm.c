/*
 * norm.c -- layer normalisation, the one piece of a transformer block
 * outside attention and the dense layers that both of the lab's models
 * use (GPT-2's pre-norm block, BERT's post-norm one), in double inside a
 * row so the statistics of wide rows keep their digits.
 */
#include "lab.h"

#include <math.h>

void lab_layer_norm(const float *x, const float *g, const float *b, int64_t rows, int64_t E, double eps, float *y,
                    float *mean, float *rstd)
{
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * E;
        double mu = 0, var = 0;
        for (int64_t e = 0; e < E; e++) mu += xr[e];
        mu /= (double)E;
        for (int64_t e = 0; e < E; e++) var += (xr[e] - mu) * (xr[e] - mu);
        double rs = 1.0 / sqrt(var / (double)E + eps);
        if (mean) mean[r] = (float)mu;
        if (rstd) rstd[r] = (float)rs;
        for (int64_t e = 0; e < E; e++) y[r * E + e] = (float)((xr[e] - mu) * rs) * g[e] + b[e];
    }
}
