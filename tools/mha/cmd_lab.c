/*
 * cmd_lab.c -- `mha lab train`: train the lab's attention-only transformer
 * on repeated random spans and print what each head learned (its scores
 * on held-out sequences and the role they single out).
 */
#include "cli.h"
#include "lab.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const CMD = "lab";

typedef struct lab_opts {
    lab_config model;
    int64_t steps, batch, threads, report_every;
    double lr, wd;
} lab_opts;

static void print_heads(mha_ctx *ctx, lab_model *model, const lab_opts *o)
{
    const lab_config *c = lab_model_config(model);
    int64_t B = 16, T = c->context, maps = B * c->heads * T * T;
    int32_t *tokens = malloc((size_t)(B * T) * sizeof *tokens);
    float *attn = malloc((size_t)(c->layers * maps) * sizeof *attn);
    uint64_t state = o->model.seed * 7919u + 12345u; /* held out: not the training stream */
    double loss = 0;
    if (!tokens || !attn) {
        cli_error(CMD, "out of memory for the held-out batch");
    } else {
        lab_repeated_spans(tokens, B, T, c->vocab, &state);
        if (lab_model_loss(ctx, model, tokens, B, 0, attn, &loss) != MHA_OK) cli_error(CMD, "%s", mha_last_error());
        printf("held-out loss %.4f (random tokens cost ln %lld = %.3f each; copied ones can cost 0)\n", loss,
               (long long)c->vocab, log((double)c->vocab));
        printf("%-6s %-5s %8s %9s %9s %6s %8s %7s  %s\n", "layer", "head", "prev-tok", "induction", "duplicate", "first",
               "distance", "entropy", "role");
        for (int64_t l = 0; l < c->layers; l++)
            for (int64_t h = 0; h < c->heads; h++) {
                /* this head's maps, [B][T][T], gathered from [B][H][T][T] */
                float *a = malloc((size_t)(B * T * T) * sizeof *a);
                if (!a) break;
                for (int64_t b = 0; b < B; b++)
                    memcpy(a + b * T * T, attn + l * maps + (b * c->heads + h) * T * T, (size_t)(T * T) * sizeof(float));
                lab_head_scores s;
                lab_head_scores_compute(a, tokens, B, T, &s);
                printf("%-6lld %-5lld %8.3f %9.3f %9.3f %6.3f %8.2f %7.3f  %s\n", (long long)l, (long long)h,
                       s.previous_token, s.induction, s.duplicate, s.first_token, s.distance, s.entropy,
                       lab_head_role(&s));
                free(a);
            }
    }
    free(tokens);
    free(attn);
}

static int train(const lab_opts *o)
{
    mha_ctx *ctx = NULL;
    lab_model *model = NULL;
    int rc = cli_ctx(CMD, o->threads, &ctx);
    if (rc == CLI_OK && lab_model_create(&o->model, &model) != MHA_OK) {
        cli_error(CMD, "cannot create the model: %s", mha_last_error());
        rc = CLI_FAIL;
    }
    int64_t T = o->model.context;
    int32_t *tokens = rc == CLI_OK ? malloc((size_t)(o->batch * T) * sizeof *tokens) : NULL;
    if (rc == CLI_OK && !tokens) rc = CLI_FAIL;
    uint64_t state = o->model.seed + 1;
    double t0 = cli_now_ms(), loss = 0, first = 0;
    for (int64_t step = 1; rc == CLI_OK && step <= o->steps; step++) {
        lab_repeated_spans(tokens, o->batch, T, o->model.vocab, &state);
        if (lab_model_loss(ctx, model, tokens, o->batch, 1, NULL, &loss) != MHA_OK ||
            lab_model_adamw(model, o->lr, o->wd) != MHA_OK) {
            cli_error(CMD, "step %lld: %s", (long long)step, mha_last_error());
            rc = CLI_FAIL;
            break;
        }
        if (step == 1) first = loss;
        if (step % o->report_every == 0 || step == o->steps) {
            double elapsed = (cli_now_ms() - t0) / 1e3;
            printf("step %5lld  loss %.4f  %.1f s, eta %.1f s\n", (long long)step, loss, elapsed,
                   elapsed / (double)step * (double)(o->steps - step));
            fflush(stdout);
        }
    }
    if (rc == CLI_OK) {
        printf("trained %lld steps: loss %.4f -> %.4f in %.1f s\n", (long long)o->steps, first, loss,
               (cli_now_ms() - t0) / 1e3);
        print_heads(ctx, model, o);
    }
    free(tokens);
    lab_model_free(model);
    mha_ctx_free(ctx);
    return rc;
}

int mha_cmd_lab(int argc, char **argv)
{
    lab_opts o = {.model = {.vocab = 64, .context = 32, .embed_dim = 64, .layers = 2, .heads = 4, .seed = 1},
                  .steps = 600, .batch = 32, .report_every = 100, .lr = 3e-3, .wd = 0.01};
    if (argc < 2 || strcmp(argv[1], "train") != 0) {
        if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
            printf("usage: mha lab train [flags]   (mha lab train --help for them)\n");
            return CLI_OK;
        }
        cli_error(CMD, "expected a subcommand: train (analyze, prune and report are still to come)");
        return CLI_USAGE;
    }
    int64_t seed = 1;
    cli_flag flags[] = {
        {"layers", FLAG_INT, &o.model.layers, "attention layers (default 2)", false},
        {"heads", FLAG_INT, &o.model.heads, "heads per layer (default 4)", false},
        {"kv-heads", FLAG_INT, &o.model.kv_heads, "key/value heads per layer (default: heads)", false},
        {"embed-dim", FLAG_INT, &o.model.embed_dim, "model width (default 64)", false},
        {"context", FLAG_INT, &o.model.context, "tokens per sequence (default 32)", false},
        {"vocab", FLAG_INT, &o.model.vocab, "vocabulary size (default 64)", false},
        {"steps", FLAG_INT, &o.steps, "training steps (default 600)", false},
        {"batch", FLAG_INT, &o.batch, "sequences per step (default 32)", false},
        {"lr", FLAG_DOUBLE, &o.lr, "AdamW learning rate (default 3e-3)", false},
        {"seed", FLAG_INT, &seed, "seed of the weights and the data (default 1)", false},
        {"threads", FLAG_INT, &o.threads, "worker threads (default: all CPUs)", false},
    };
    bool help;
    int rc = cli_parse(CMD, "train [flags]", argc - 1, argv + 1, flags, (int)(sizeof flags / sizeof flags[0]), &help);
    if (rc != CLI_OK || help) return rc;
    o.model.seed = (uint64_t)seed;
    if (o.steps < 1 || o.batch < 1 || o.model.layers < 1 || o.model.layers > 16 || o.model.heads < 1 ||
        o.model.context < 4 || o.model.vocab < 2 || o.model.embed_dim % o.model.heads || !(o.lr > 0)) {
        cli_error(CMD, "--steps, --batch, --layers (1..16), --heads, --context (>= 4), --vocab (>= 2) must be positive, "
                       "--embed-dim a multiple of --heads and --lr > 0");
        return CLI_USAGE;
    }
    return train(&o);
}
