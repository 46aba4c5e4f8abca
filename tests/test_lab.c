/*
 * test_lab.c -- the head lab's pieces:
 *   - the head scores on hand-built attention patterns: a head that attends
 *     exactly to i - 1 scores previous-token 1.0, one that attends to the
 *     token after the earlier copy scores induction 1.0, one that attends
 *     to the copy itself duplicate 1.0, one parked on position 0 first-token
 *     1.0; uniform rows give the entropy ln(i + 1); roles follow;
 *   - the repeated-span data: deterministic, with a repeat in every row;
 *   - the model's gradients (embeddings, unembedding, attention) against
 *     directional derivatives of its loss;
 *   - a few steps of training lower the loss.
 */
#include "harness.h"
#include "lab.h"

#include <stdint.h>
#include <unistd.h>

enum { B = 3, T = 16 };

static void fill_pattern(float *a, const int32_t *tokens, int kind)
{
    memset(a, 0, sizeof(float) * B * T * T);
    for (int b = 0; b < B; b++)
        for (int i = 0; i < T; i++) {
            float *row = a + (b * T + i) * T;
            int target = i;
            if (kind == 0) target = i > 0 ? i - 1 : 0;
            if (kind == 3) target = 0;
            if (kind == 1 || kind == 2) { /* after the earlier copy, or the copy */
                const int32_t *seq = tokens + b * T;
                int j = -1;
                for (int k = i - 1; k >= 0 && j < 0; k--)
                    if (seq[k] == seq[i]) j = k;
                target = j >= 0 && j + 1 < i ? (kind == 1 ? j + 1 : j) : i;
            }
            if (kind == 4) {
                for (int j = 0; j <= i; j++) row[j] = 1.0f / (float)(i + 1);
                continue;
            }
            row[target] = 1.0f;
        }
}

static void test_scores(void)
{
    int32_t tokens[B * T];
    uint64_t state = 7;
    lab_repeated_spans(tokens, B, T, 1000, &state);
    float *a = malloc(sizeof(float) * B * T * T);
    lab_head_scores s;
    static const char *const roles[4] = {"previous-token", "induction", "duplicate-token", "first-token"};
    for (int kind = 0; kind < 4; kind++) {
        fill_pattern(a, tokens, kind);
        lab_head_scores_compute(a, tokens, B, T, &s);
        double score = kind == 0 ? s.previous_token : kind == 1 ? s.induction : kind == 2 ? s.duplicate : s.first_token;
        CHECK(fabs(score - 1.0) < 1e-12, "pattern %d scores %.6f, not 1", kind, score);
        CHECK(strcmp(lab_head_role(&s), roles[kind]) == 0, "pattern %d has role %s", kind, lab_head_role(&s));
    }
    fill_pattern(a, tokens, 4);
    lab_head_scores_compute(a, tokens, B, T, &s);
    double want = 0, dist = 0;
    for (int i = 0; i < T; i++) want += log(i + 1.0) / T, dist += i / 2.0 / T;
    CHECK(fabs(s.entropy - want) < 1e-6 && fabs(s.distance - dist) < 1e-6,
          "uniform rows: entropy %.6f (want %.6f), "
          "distance %.6f (want %.6f)",
          s.entropy, want, s.distance, dist);
    CHECK(strcmp(lab_head_role(&s), "mixed") == 0, "uniform rows are mixed, not %s", lab_head_role(&s));
    /* A head spread over the last three positions: positional (local). */
    memset(a, 0, sizeof(float) * B * T * T);
    for (int b = 0; b < B; b++)
        for (int i = 0; i < T; i++)
            for (int j = i - 2 < 0 ? 0 : i - 2; j <= i; j++)
                a[(b * T + i) * T + j] = 1.0f / (float)(i - (i - 2 < 0 ? 0 : i - 2) + 1);
    lab_head_scores_compute(a, tokens, B, T, &s);
    CHECK(strcmp(lab_head_role(&s), "positional (local)") == 0, "a window of three is %s (distance %.2f)",
          lab_head_role(&s), s.distance);
    free(a);
}

static void test_text(void)
{
    const char *path = "/tmp/mha_test_lab_text.txt";
    FILE *f = fopen(path, "w");
    fputs("abcdefghij\xff", f);
    fclose(f);
    lab_text text;
    CHECK_OK(lab_text_load(path, 128, &text));
    CHECK(text.n == 11 && text.chars[0] == 'a' && text.chars[10] == 127, "11 characters, the non-ASCII byte as 127");
    int32_t w[2 * 4];
    uint64_t state = 3;
    lab_text_windows(&text, w, 2, 4, &state);
    bool ok = true;
    for (int b = 0; b < 2; b++)
        for (int t = 1; t < 4; t++) ok = ok && w[b * 4 + t] == w[b * 4 + t - 1] + 1; /* consecutive characters */
    CHECK(ok, "windows are runs of the text");
    lab_text_free(&text);
    CHECK(lab_text_load("/nonexistent/text", 128, &text) == MHA_ERR_IO, "a missing text file is an IO error");
    unlink(path);
}

static void test_data(void)
{
    int32_t x[B * T], y[B * T];
    uint64_t s1 = 42, s2 = 42;
    lab_repeated_spans(x, B, T, 50, &s1);
    lab_repeated_spans(y, B, T, 50, &s2);
    CHECK(memcmp(x, y, sizeof x) == 0, "the same seed gives the same data");
    for (int b = 0; b < B; b++) { /* a span of at least T/4 repeated right after itself */
        bool found = false;
        for (int p = T / 4; p <= T / 2 && !found; p++)
            for (int st = 0; st + 2 * p <= T && !found; st++)
                found = memcmp(x + b * T + st, x + b * T + st + p, (size_t)p * sizeof(int32_t)) == 0;
        CHECK(found, "row %d has no repeated span", b);
    }
}

/* <grad, v> against central differences of the loss along a random
 * direction v, for every trainable array (float32: h = 1e-2). */
static void test_gradients(mha_ctx *ctx, int mlp)
{
    lab_config c = {
        .vocab = 12, .context = 8, .embed_dim = 8, .layers = 2, .heads = 2, .seed = 3, .mlp = mlp, .tied = mlp};
    lab_model *m = NULL;
    CHECK_OK(lab_model_create(&c, &m));
    int32_t tokens[2 * 8];
    uint64_t state = 9;
    lab_repeated_spans(tokens, 2, 8, 12, &state);
    double loss, up, down;
    CHECK_OK(lab_model_loss(ctx, m, tokens, 2, 1, NULL, &loss));
    for (int i = 0; i < lab_model_param_count(m); i++) {
        float *grad, *value;
        int64_t n;
        value = lab_model_param(m, i, &grad, &n);
        float *g = malloc((size_t)n * sizeof *g), *v0 = malloc((size_t)n * sizeof *v0),
              *dir = malloc((size_t)n * sizeof *dir);
        memcpy(g, grad, (size_t)n * sizeof *g);
        memcpy(v0, value, (size_t)n * sizeof *v0);
        double predicted = 0, h = 1e-2;
        for (int64_t k = 0; k < n; k++) {
            state ^= state << 13, state ^= state >> 7, state ^= state << 17;
            dir[k] = (float)((double)(state >> 11) * 0x1p-53 * 2.0 - 1.0);
            predicted += (double)g[k] * dir[k];
        }
        for (int sign = 1; sign >= -1; sign -= 2) {
            for (int64_t k = 0; k < n; k++) value[k] = v0[k] + (float)(sign * h) * dir[k];
            CHECK_OK(lab_model_params_changed(m));
            CHECK_OK(lab_model_loss(ctx, m, tokens, 2, 0, NULL, sign > 0 ? &up : &down));
        }
        memcpy(value, v0, (size_t)n * sizeof *v0);
        CHECK_OK(lab_model_params_changed(m));
        double measured = (up - down) / (2 * h);
        CHECK(fabs(measured - predicted) <= 2e-3 * fmax(0.1, fabs(predicted)),
              "mlp %d, array %d: directional "
              "derivative %.6g, gradient says %.6g",
              mlp, i, measured, predicted);
        free(g), free(v0), free(dir);
    }
    lab_model_free(m);
}

static void test_training(mha_ctx *ctx)
{
    lab_config c = {.vocab = 16, .context = 12, .embed_dim = 16, .layers = 2, .heads = 2, .seed = 5};
    lab_model *m = NULL;
    CHECK_OK(lab_model_create(&c, &m));
    int32_t tokens[16 * 12];
    uint64_t state = 11;
    double first = 0, last = 0;
    for (int step = 0; step < 80; step++) {
        lab_repeated_spans(tokens, 16, 12, 16, &state);
        CHECK_OK(lab_model_loss(ctx, m, tokens, 16, 1, NULL, &last));
        if (step == 0) first = last;
        CHECK_OK(lab_model_adamw(m, 3e-3, 0.01));
    }
    CHECK(last < 0.85 * first, "80 steps took the loss only from %.4f to %.4f", first, last);
    lab_model_free(m);
}

/* A checkpoint restores the model and its optimizer exactly: training on
 * after a save and a load gives the same bits as training straight on. */
static void test_checkpoint(mha_ctx *ctx)
{
    lab_config c = {
        .vocab = 16, .context = 12, .embed_dim = 16, .layers = 2, .heads = 4, .kv_heads = 2, .seed = 8, .mlp = 1};
    lab_model *a = NULL, *b = NULL;
    CHECK_OK(lab_model_create(&c, &a));
    int32_t tokens[8 * 12];
    double la = 0, lb = 0;
    for (int step = 0; step < 20; step++) {
        if (step == 10) {
            CHECK(lab_model_save(a, "/tmp/mha_test_lab.safetensors") == MHA_OK, "save: %s", mha_last_error());
            CHECK(lab_model_load("/tmp/mha_test_lab.safetensors", &b) == MHA_OK, "load: %s", mha_last_error());
            CHECK(b && lab_model_steps(b) == 10, "the step count survives");
        }
        uint64_t state = 100 + (uint64_t)step; /* each step's batch from its own stream */
        lab_repeated_spans(tokens, 8, 12, 16, &state);
        CHECK_OK(lab_model_loss(ctx, a, tokens, 8, 1, NULL, &la));
        CHECK_OK(lab_model_adamw(a, 3e-3, 0.01));
        if (b) {
            CHECK_OK(lab_model_loss(ctx, b, tokens, 8, 1, NULL, &lb));
            CHECK_OK(lab_model_adamw(b, 3e-3, 0.01));
            CHECK(la == lb, "step %d after the reload: loss %.17g, not %.17g", step, lb, la);
        }
    }
    lab_model *missing = NULL;
    CHECK(lab_model_load("/nonexistent/ckpt.safetensors", &missing) == MHA_ERR_IO && !missing,
          "a missing checkpoint fails with IO: %s", mha_last_error());
    lab_model_free(a);
    lab_model_free(b);
    unlink("/tmp/mha_test_lab.safetensors");
}

/* The GQA comparison reuses the main model's loss for its own kv-head
 * count: retraining it gives the same bits, with kv_heads 0 or = heads.
 * And every head of a trained model has a non-zero importance. */
static void test_gqa_and_importance(mha_ctx *ctx)
{
    lab_run run = {.model = {.vocab = 16, .context = 12, .embed_dim = 16, .layers = 2, .heads = 2, .seed = 3},
                   .steps = 30,
                   .batch = 8,
                   .lr = 3e-3,
                   .wd = 0.01};
    lab_model *m = NULL;
    bool stopped = true;
    CHECK_OK(lab_model_create(&run.model, &m));
    CHECK_OK(lab_train(ctx, m, &run, NULL, NULL, NULL, &stopped));
    CHECK(!stopped, "nothing stopped the training");
    int32_t tokens[LAB_EVAL_B * 12];
    float *attn = malloc(sizeof(float) * 2 * LAB_EVAL_B * 2 * 12 * 12);
    lab_head_scores scores[4];
    double held = 0, again = 1, importance[4];
    CHECK_OK(lab_analyze(ctx, m, &run, tokens, attn, scores, &held));
    CHECK_OK(lab_model_loss(ctx, m, tokens, LAB_EVAL_B, 0, NULL, &held)); /* as lab_gqa_loss: no maps */
    CHECK_OK(lab_gqa_loss(ctx, &run, 2, NULL, NULL, &again));
    CHECK(held == again, "GQA with the main model's 2 kv heads: loss %.17g, the main model's %.17g", again, held);
    CHECK_OK(lab_importance(ctx, m, &run, importance));
    for (int i = 0; i < 4; i++) CHECK(importance[i] > 0, "head %d has importance %g", i, importance[i]);
    free(attn);
    lab_model_free(m);
}

int main(void)
{
    mha_ctx *ctx = NULL;
    CHECK_OK(mha_ctx_create(2, &ctx));
    test_scores();
    test_data();
    test_text();
    test_gradients(ctx, 0);
    test_gradients(ctx, 1);
    test_training(ctx);
    test_checkpoint(ctx);
    test_gqa_and_importance(ctx);
    mha_ctx_free(ctx);
    return harness_finish("test_lab");
}
