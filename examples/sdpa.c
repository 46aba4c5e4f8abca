/*
 * sdpa.c -- scaled dot-product attention on buffers you own: softmax(Q K^T
 * / sqrt(D)) V with a causal mask, for a batch of one and two heads, and
 * the same sum written out by hand to show what the call computes.
 */
#include <mha.h>

#include <math.h>
#include <stdio.h>

enum { B = 1, H = 2, L = 5, D = 8 };

/* Row i of head h by hand: weights over keys j <= i, then their average of V. */
static void by_hand(const float *q, const float *k, const float *v, int h, int i, double *row)
{
    double s[L], max = -INFINITY, sum = 0;
    for (int j = 0; j <= i; j++) {
        s[j] = 0;
        for (int d = 0; d < D; d++) s[j] += (double)q[(h * L + i) * D + d] * k[(h * L + j) * D + d];
        s[j] /= sqrt(D);
        max = fmax(max, s[j]);
    }
    for (int j = 0; j <= i; j++) sum += s[j] = exp(s[j] - max);
    for (int d = 0; d < D; d++) {
        row[d] = 0;
        for (int j = 0; j <= i; j++) row[d] += s[j] / sum * v[(h * L + j) * D + d];
    }
}

int main(void)
{
    static float q[B * H * L * D], k[B * H * L * D], v[B * H * L * D], out[B * H * L * D];
    for (int i = 0; i < B * H * L * D; i++) { /* any numbers will do */
        q[i] = sinf(0.37f * (float)i);
        k[i] = cosf(0.23f * (float)i);
        v[i] = (float)(i % 7) - 3.0f;
    }
    mha_ctx *ctx = NULL;
    if (mha_ctx_create(0, &ctx) != MHA_OK) return 1;
    mha_tensor tq = mha_tensor_4d(q, B, H, L, D), tk = mha_tensor_4d(k, B, H, L, D), tv = mha_tensor_4d(v, B, H, L, D),
               to = mha_tensor_4d(out, B, H, L, D);
    mha_attn_desc desc;
    mha_attn_desc_init(&desc); /* scale 1/sqrt(D), no mask */
    desc.causal = MHA_CAUSAL_TOP_LEFT;
    if (mha_attention(ctx, &to, NULL, &tq, &tk, &tv, &desc) != MHA_OK) {
        fprintf(stderr, "sdpa: %s\n", mha_last_error());
        mha_ctx_free(ctx);
        return 1;
    }
    double worst = 0, row[D];
    for (int h = 0; h < H; h++)
        for (int i = 0; i < L; i++) {
            by_hand(q, k, v, h, i, row);
            for (int d = 0; d < D; d++) worst = fmax(worst, fabs(out[(h * L + i) * D + d] - row[d]));
        }
    printf("out[0][1][4][0..3] = %.5f %.5f %.5f %.5f (%s)\n", out[(L + 4) * D], out[(L + 4) * D + 1],
           out[(L + 4) * D + 2], out[(L + 4) * D + 3], mha_isa());
    printf("largest difference from the sum by hand: %.3g\n", worst);
    mha_ctx_free(ctx);
    return worst < 1e-5 ? 0 : 1;
}
