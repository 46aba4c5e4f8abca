/*
 * train_step.c -- training with libmha's gradients: a student layer learns
 * to reproduce a teacher layer's outputs (mean squared error) with Adam.
 * Each step is the loop mha.h documents: zero the gradients, forward with
 * a tape, the loss and dL/dy, backward, update the parameters through
 * mha_layer_params, mha_layer_params_changed.
 */
#include <mha.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

enum { N = 4, L = 8, E = 16, HEADS = 4, STEPS = 300 };

static float uniform(unsigned *s) /* in [-1, 1) */
{
    *s = *s * 1664525u + 1013904223u;
    return (float)(*s >> 8) / (float)(1u << 23) - 1.0f;
}

/* A layer whose parameters are uniform in [-scale, scale). */
static mha_layer *random_layer(unsigned seed, float scale)
{
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    d.embed_dim = E;
    d.num_heads = HEADS;
    mha_layer *layer = NULL;
    mha_param p[8];
    if (mha_layer_create(&d, &layer) != MHA_OK || mha_layer_train_init(layer) != MHA_OK) return NULL;
    int64_t n = mha_layer_params(layer, p, 8);
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < p[i].numel; j++) p[i].value[j] = scale * uniform(&seed);
    mha_layer_params_changed(layer);
    return layer;
}

/* Adam (lr 1e-2, betas 0.9 / 0.999) over every parameter; m and v hold
 * two moments per value, in parameter order. */
static void adam(mha_layer *layer, float *m, float *v, int step)
{
    mha_param p[8];
    int64_t n = mha_layer_params(layer, p, 8), at = 0;
    double c1 = 1 - pow(0.9, step), c2 = 1 - pow(0.999, step);
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < p[i].numel; j++, at++) {
            float g = p[i].grad[j];
            m[at] = 0.9f * m[at] + 0.1f * g;
            v[at] = 0.999f * v[at] + 0.001f * g * g;
            p[i].value[j] -= (float)(1e-2 * (m[at] / c1) / (sqrt(v[at] / c2) + 1e-8));
        }
    mha_layer_params_changed(layer);
}

int main(void)
{
    static float x[N * L * E], target[N * L * E], y[N * L * E], dy[N * L * E], m[4 * E * E + 4 * E],
        v[4 * E * E + 4 * E];
    unsigned seed = 7;
    for (int i = 0; i < N * L * E; i++) x[i] = uniform(&seed);
    mha_layer *teacher = random_layer(1, 0.5f), *student = random_layer(2, 0.1f);
    mha_layer_tape *tape = NULL;
    mha_ctx *ctx = NULL;
    if (!teacher || !student || mha_layer_tape_create(&tape) != MHA_OK || mha_ctx_create(0, &ctx) != MHA_OK) {
        fprintf(stderr, "train_step: %s\n", mha_last_error());
        return 1;
    }
    mha_layer_fwd_args args;
    mha_layer_fwd_args_init(&args);
    args.query = args.key = args.value = mha_tensor_3d(x, N, L, E);
    mha_tensor t = mha_tensor_3d(target, N, L, E), out = mha_tensor_3d(y, N, L, E), grad = mha_tensor_3d(dy, N, L, E);
    mha_status st = mha_layer_forward(ctx, teacher, &t, NULL, &args);
    double first = 0, loss = 0;
    args.tape = tape;
    for (int step = 1; step <= STEPS && st == MHA_OK; step++) {
        mha_layer_zero_grad_deferred(student); /* zeroed by the backward as it writes them */
        st = mha_layer_forward(ctx, student, &out, NULL, &args);
        loss = 0;
        for (int i = 0; i < N * L * E; i++) {
            double diff = (double)y[i] - target[i];
            loss += diff * diff / (N * L * E);
            dy[i] = (float)(2 * diff / (N * L * E));
        }
        if (step == 1) first = loss;
        if (st == MHA_OK) st = mha_layer_backward(ctx, student, &args, &grad, NULL, NULL, NULL);
        if (st == MHA_OK) adam(student, m, v, step);
    }
    if (st != MHA_OK) fprintf(stderr, "train_step: %s\n", mha_last_error());
    else printf("mean squared error: %.6f at step 1, %.6f after %d steps\n", first, loss, STEPS);
    mha_ctx_free(ctx);
    mha_layer_tape_free(tape);
    mha_layer_free(teacher);
    mha_layer_free(student);
    return st == MHA_OK && loss < 0.1 * first ? 0 : 1;
}
