/*
 * cmd_lab.c -- `mha lab`: train the lab's transformer on repeated random
 * spans, see what each head learned, prune heads, compare grouped-query
 * attention, and write the report.
 *
 *   mha lab [run]   everything below, into --out (default lab-report/)
 *   mha lab train   train (or --resume) and save DIR/checkpoint.safetensors;
 *                   Ctrl-C saves a checkpoint and stops
 *   mha lab analyze the head table of a saved model
 *   mha lab prune   the pruning curves of a saved model
 *   mha lab report  the report (HTML, PNG heatmaps, summary) of a saved
 *                   model, with the GQA comparison trained on the spot
 */
#define _POSIX_C_SOURCE 200809L

#include "cli.h"
#include "lab.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *const CMD = "lab";

typedef struct lab_opts {
    lab_config model;
    const char *out, *data, *text_path;
    lab_text text; /* loaded when data is "text" */
    int64_t steps, batch, threads, gqa_steps;
    double lr, wd;
    bool resume, quiet;
} lab_opts;

enum { EVAL_B = 32, PRUNE_BATCHES = 4 };

static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
    (void)sig;
    interrupted = 1;
}

static void path_in(char *buf, size_t size, const lab_opts *o, const char *name)
{
    snprintf(buf, size, "%s/%s", o->out, name);
}

/* B sequences of the chosen data from the stream *state. */
static void sequences(const lab_opts *o, const lab_config *c, int64_t B, int32_t *tokens, uint64_t *state)
{
    if (o->text.chars) lab_text_windows(&o->text, tokens, B, c->context, state);
    else lab_repeated_spans(tokens, B, c->context, c->vocab, state);
}

/* The batch of training step `step`: a stream of its own, so a resumed run
 * sees the same data as an uninterrupted one. */
static void step_batch(const lab_opts *o, const lab_config *c, int64_t step, int32_t *tokens)
{
    uint64_t state = (c->seed + 1) * 0x9e3779b97f4a7c15u ^ (uint64_t)step * 0xbf58476d1ce4e5b9u;
    state = state ? state : 1;
    sequences(o, c, o->batch, tokens, &state);
}

/* Held-out sequences: a stream no training step uses. */
static void held_out(const lab_opts *o, const lab_config *c, int64_t B, int32_t *tokens)
{
    uint64_t state = c->seed * 7919u + 0x5851f42d4c957f2du;
    sequences(o, c, B, tokens, &state);
}

/* A progress bar redrawn in place on a terminal (at most 5 times a
 * second), or a line every tenth of the run into a file or pipe. */
static void progress(const lab_opts *o, int64_t step, int64_t total, double loss, double t0)
{
    static double last_draw;
    if (o->quiet) return;
    bool tty = isatty(STDERR_FILENO), last = step == total;
    double now = cli_now_ms();
    if (tty && !last && now - last_draw < 200) return;
    if (!tty && !last && step % (total / 10 > 0 ? total / 10 : 1) != 0) return;
    last_draw = now;
    double elapsed = (now - t0) / 1e3, eta = elapsed / (double)step * (double)(total - step);
    int width = 30, filled = (int)(width * step / total);
    char bar[64];
    for (int i = 0; i < width; i++) bar[i] = i < filled ? '#' : '.';
    bar[width] = '\0';
    fprintf(stderr, "%s[%s] step %lld/%lld  loss %.4f  %.0f s, eta %.0f s %s", tty ? "\r" : "", bar, (long long)step,
            (long long)total, loss, elapsed, eta, tty && !last ? "" : "\n");
}

/* Trains model up to o->steps (from its own step count), appending the
 * losses to curve (which holds o->steps entries).  Stops at Ctrl-C with
 * CLI_FAIL after the caller's checkpoint. */
static int train_steps(const lab_opts *o, mha_ctx *ctx, lab_model *model, double *curve)
{
    const lab_config *c = lab_model_config(model);
    int32_t *tokens = malloc((size_t)(o->batch * c->context) * sizeof *tokens);
    if (!tokens) return CLI_FAIL;
    double t0 = cli_now_ms();
    int rc = CLI_OK;
    for (int64_t step = lab_model_steps(model) + 1; step <= o->steps; step++) {
        if (interrupted) {
            fprintf(stderr, "\nmha lab: interrupted at step %lld\n", (long long)step - 1);
            rc = CLI_FAIL;
            break;
        }
        double loss = 0;
        step_batch(o, c, step, tokens);
        if (lab_model_loss(ctx, model, tokens, o->batch, 1, NULL, &loss) != MHA_OK ||
            lab_model_adamw(model, o->lr, o->wd) != MHA_OK) {
            cli_error(CMD, "step %lld: %s", (long long)step, mha_last_error());
            rc = CLI_FAIL;
            break;
        }
        if (curve) curve[step - 1] = loss;
        progress(o, step, o->steps, loss, t0);
    }
    free(tokens);
    return rc;
}

/* Scores of every head on the held-out batch; attn gets the maps. */
static int analyze(const lab_opts *o, mha_ctx *ctx, lab_model *model, int32_t *tokens, float *attn,
                   lab_head_scores *scores, double *loss)
{
    const lab_config *c = lab_model_config(model);
    int64_t T = c->context, H = c->heads, maps = EVAL_B * H * T * T;
    held_out(o, c, EVAL_B, tokens);
    if (lab_model_loss(ctx, model, tokens, EVAL_B, 0, attn, loss) != MHA_OK) {
        cli_error(CMD, "%s", mha_last_error());
        return CLI_FAIL;
    }
    float *a = malloc((size_t)(EVAL_B * T * T) * sizeof *a);
    if (!a) return CLI_FAIL;
    for (int64_t l = 0; l < c->layers; l++)
        for (int64_t h = 0; h < H; h++) {
            for (int64_t b = 0; b < EVAL_B; b++)
                memcpy(a + b * T * T, attn + l * maps + (b * H + h) * T * T, (size_t)(T * T) * sizeof(float));
            lab_head_scores_compute(a, tokens, EVAL_B, T, &scores[l * H + h]);
        }
    free(a);
    return CLI_OK;
}

static void print_heads(const lab_config *c, const lab_head_scores *scores, const double *importance, FILE *f)
{
    fprintf(f, "%-6s %-5s %8s %9s %9s %6s %8s %7s %10s  %s\n", "layer", "head", "prev-tok", "induction", "duplicate",
            "first", "distance", "entropy", "importance", "role");
    for (int64_t i = 0; i < c->layers * c->heads; i++) {
        const lab_head_scores *s = &scores[i];
        fprintf(f, "%-6lld %-5lld %8.3f %9.3f %9.3f %6.3f %8.2f %7.3f %10.4f  %s\n", (long long)(i / c->heads),
                (long long)(i % c->heads), s->previous_token, s->induction, s->duplicate, s->first_token, s->distance,
                s->entropy, importance ? importance[i] : 0.0, lab_head_role(s));
    }
}

/* Held-out loss with the heads removed in `order`, k = 0 .. n heads. */
static int prune_curve(mha_ctx *ctx, lab_model *model, const int32_t *tokens, const int64_t *order, double *curve)
{
    const lab_config *c = lab_model_config(model);
    int64_t n = c->layers * c->heads;
    uint8_t *keep = malloc((size_t)n);
    if (!keep) return CLI_FAIL;
    memset(keep, 1, (size_t)n);
    int rc = CLI_OK;
    for (int64_t k = 0; k <= n && rc == CLI_OK; k++) {
        if (k > 0) keep[order[k - 1]] = 0;
        if (lab_model_keep_heads(model, keep) != MHA_OK ||
            lab_model_loss(ctx, model, tokens, EVAL_B, 0, NULL, &curve[k]) != MHA_OK)
            rc = CLI_FAIL;
    }
    memset(keep, 1, (size_t)n);
    if (lab_model_keep_heads(model, keep) != MHA_OK) rc = CLI_FAIL;
    free(keep);
    return rc;
}

typedef struct pruning {
    double *importance, *by_importance, *by_random;
} pruning;

static int prune(const lab_opts *o, mha_ctx *ctx, lab_model *model, const int32_t *eval_tokens, pruning *p)
{
    const lab_config *c = lab_model_config(model);
    int64_t n = c->layers * c->heads, T = c->context;
    int32_t *tokens = malloc((size_t)(PRUNE_BATCHES * EVAL_B * T) * sizeof *tokens);
    int64_t *order = malloc((size_t)n * sizeof *order);
    if (!tokens || !order) {
        free(tokens), free(order);
        return CLI_FAIL;
    }
    uint64_t state = c->seed * 31u + 77u; /* importance on its own held-out sequences */
    sequences(o, c, PRUNE_BATCHES * EVAL_B, tokens, &state);
    int rc =
        lab_head_importance(ctx, model, tokens, EVAL_B, PRUNE_BATCHES, p->importance) == MHA_OK ? CLI_OK : CLI_FAIL;
    for (int64_t i = 0; i < n; i++) order[i] = i;
    for (int64_t i = 1; i < n; i++) /* least important first */
        for (int64_t j = i; j > 0 && p->importance[order[j]] < p->importance[order[j - 1]]; j--) {
            int64_t t = order[j];
            order[j] = order[j - 1], order[j - 1] = t;
        }
    if (rc == CLI_OK) rc = prune_curve(ctx, model, eval_tokens, order, p->by_importance);
    uint64_t shuffle = c->seed * 104729u + 3u;
    for (int64_t i = n - 1; i > 0; i--) { /* a random order, seeded */
        shuffle ^= shuffle << 13, shuffle ^= shuffle >> 7, shuffle ^= shuffle << 17;
        int64_t j = (int64_t)(shuffle % (uint64_t)(i + 1)), t = order[i];
        order[i] = order[j], order[j] = t;
    }
    if (rc == CLI_OK) rc = prune_curve(ctx, model, eval_tokens, order, p->by_random);
    free(tokens);
    free(order);
    return rc;
}

static int ensure_dir(const char *dir)
{
    if (mkdir(dir, 0777) == 0 || errno == EEXIST) return CLI_OK;
    cli_error(CMD, "cannot create --out %s: %s", dir, strerror(errno));
    return CLI_FAIL;
}

/* Trains (or resumes) and saves the checkpoint; *model is the result. */
static int do_train(const lab_opts *o, mha_ctx *ctx, lab_model **model, double *curve)
{
    char ckpt[1024];
    path_in(ckpt, sizeof ckpt, o, "checkpoint.safetensors");
    mha_status st = o->resume ? lab_model_load(ckpt, model) : lab_model_create(&o->model, model);
    if (st != MHA_OK) {
        cli_error(CMD, o->resume ? "cannot resume from %s: %s" : "cannot create the model%s: %s", o->resume ? ckpt : "",
                  mha_last_error());
        return CLI_FAIL;
    }
    if (o->resume) fprintf(stderr, "mha lab: resuming at step %lld\n", (long long)lab_model_steps(*model));
    signal(SIGINT, on_sigint);
    int rc = train_steps(o, ctx, *model, curve);
    signal(SIGINT, SIG_DFL);
    if (lab_model_save(*model, ckpt) != MHA_OK) {
        cli_error(CMD, "cannot save %s: %s", ckpt, mha_last_error());
        return CLI_FAIL;
    }
    if (rc != CLI_OK && interrupted)
        fprintf(stderr, "mha lab: checkpoint saved to %s (continue with --resume)\n", ckpt);
    return rc;
}

/* Trains a copy of the configuration with each kv-head count for the GQA
 * table. */
static int gqa_table(const lab_opts *o, mha_ctx *ctx, int64_t *kv, int64_t *bytes, double *loss, int64_t *n)
{
    int64_t H = o->model.heads, d = o->model.embed_dim / H, cands[4] = {H, H / 2, H / 4, 1};
    *n = 0;
    for (int i = 0; i < 4; i++) { /* h, h/2, h/4 and 1 kv heads, each once */
        if (cands[i] < 1 || H % cands[i] || (*n > 0 && kv[*n - 1] == cands[i])) continue;
        lab_opts g = *o;
        g.model.kv_heads = cands[i];
        g.steps = o->gqa_steps;
        g.resume = false;
        g.quiet = true;
        lab_model *m = NULL;
        if (lab_model_create(&g.model, &m) != MHA_OK) return CLI_FAIL;
        int rc = train_steps(&g, ctx, m, NULL);
        int32_t *tokens = malloc((size_t)(EVAL_B * o->model.context) * sizeof *tokens);
        if (rc == CLI_OK && tokens) {
            held_out(o, &g.model, EVAL_B, tokens);
            if (lab_model_loss(ctx, m, tokens, EVAL_B, 0, NULL, &loss[*n]) != MHA_OK) rc = CLI_FAIL;
        }
        free(tokens);
        lab_model_free(m);
        if (rc != CLI_OK) return rc;
        kv[*n] = cands[i];
        bytes[*n] = 2 * cands[i] * d * (int64_t)sizeof(float) * o->model.layers;
        fprintf(stderr, "mha lab: GQA with %lld kv heads: held-out loss %.4f\n", (long long)kv[*n], loss[*n]);
        (*n)++;
    }
    return CLI_OK;
}

/* Everything after training: scores, pruning, GQA, report files. */
static int write_report(const lab_opts *o, mha_ctx *ctx, lab_model *model, const double *curve, int64_t curve_len,
                        bool with_gqa)
{
    const lab_config *c = lab_model_config(model);
    int64_t n = c->layers * c->heads, T = c->context, maps = EVAL_B * c->heads * T * T;
    int32_t *tokens = malloc((size_t)(EVAL_B * T) * sizeof *tokens);
    float *attn = malloc((size_t)(c->layers * maps) * sizeof *attn),
          *sample = malloc((size_t)(n * T * T) * sizeof *sample);
    lab_head_scores *scores = calloc((size_t)n, sizeof *scores);
    double *buf = calloc((size_t)(3 * n + 2), sizeof *buf), held = 0;
    pruning p = {buf, buf + n, buf + 2 * n + 1};
    int64_t kv[4], bytes[4], n_gqa = 0;
    double gqa_loss[4];
    int rc = tokens && attn && sample && scores && buf ? CLI_OK : CLI_FAIL;
    if (rc == CLI_OK) rc = analyze(o, ctx, model, tokens, attn, scores, &held);
    if (rc == CLI_OK) rc = prune(o, ctx, model, tokens, &p);
    if (rc == CLI_OK && with_gqa) rc = gqa_table(o, ctx, kv, bytes, gqa_loss, &n_gqa);
    char summary[8192], path[1024];
    int used = 0;
    if (rc == CLI_OK) {
        int roles_prev = 0, roles_ind = 0;
        for (int64_t i = 0; i < n; i++) {
            roles_prev += strcmp(lab_head_role(&scores[i]), "previous-token") == 0;
            roles_ind += strcmp(lab_head_role(&scores[i]), "induction") == 0;
        }
        used += snprintf(
            summary + used, sizeof summary - (size_t)used,
            "%lld training steps on %s; held-out loss %.4f (a uniform guess costs ln %lld = %.3f).\n"
            "%d previous-token head(s) and %d induction head(s) (thresholds in docs/HEADS.md).\n"
            "Removing the %lld least important heads: loss %.4f; %lld random heads: %.4f (none removed: %.4f).\n",
            (long long)lab_model_steps(model), o->text.chars ? "character-level text" : "repeated random spans", held,
            (long long)c->vocab, log((double)c->vocab), roles_prev, roles_ind, (long long)(n / 2),
            p.by_importance[n / 2], (long long)(n / 2), p.by_random[n / 2], p.by_importance[0]);
        for (int64_t i = 0; i < n_gqa; i++)
            used += snprintf(summary + used, sizeof summary - (size_t)used,
                             "GQA: %lld kv heads, held-out loss %.4f, KV cache %lld bytes per token.\n",
                             (long long)kv[i], gqa_loss[i], (long long)bytes[i]);
        for (int64_t l = 0; l < c->layers; l++) /* the first held-out sequence's maps */
            for (int64_t h = 0; h < c->heads; h++)
                memcpy(sample + (l * c->heads + h) * T * T, attn + l * maps + h * T * T,
                       (size_t)(T * T) * sizeof(float));
        lab_report r = {*c,
                        summary,
                        curve,
                        curve_len,
                        scores,
                        p.importance,
                        tokens,
                        T,
                        sample,
                        p.by_importance,
                        p.by_random,
                        n + 1,
                        kv,
                        bytes,
                        gqa_loss,
                        n_gqa,
                        o->text.chars != NULL};
        path_in(path, sizeof path, o, "report.html");
        if (lab_report_write(path, &r) != 0) {
            cli_error(CMD, "cannot write %s", path);
            rc = CLI_FAIL;
        }
        for (int64_t i = 0; rc == CLI_OK && i < n; i++) {
            char name[64];
            snprintf(name, sizeof name, "layer%lld_head%lld.png", (long long)(i / c->heads), (long long)(i % c->heads));
            path_in(path, sizeof path, o, name);
            if (lab_png_heatmap(path, sample + i * T * T, T, T, 8) != 0) rc = CLI_FAIL;
        }
        path_in(path, sizeof path, o, "summary.txt");
        FILE *f = fopen(path, "w");
        if (f) {
            fputs(summary, f);
            print_heads(c, scores, p.importance, f);
            fclose(f);
        }
        fputs(summary, stdout);
        print_heads(c, scores, p.importance, stdout);
        path_in(path, sizeof path, o, "report.html");
        printf("report: %s (and layer*_head*.png, summary.txt)\n", path);
    }
    free(tokens), free(attn), free(sample), free(scores), free(buf);
    return rc;
}

static int load_saved(const lab_opts *o, lab_model **model)
{
    char ckpt[1024];
    path_in(ckpt, sizeof ckpt, o, "checkpoint.safetensors");
    if (lab_model_load(ckpt, model) != MHA_OK) {
        cli_error(CMD, "cannot load %s (train first: mha lab train --out %s): %s", ckpt, o->out, mha_last_error());
        return CLI_FAIL;
    }
    return CLI_OK;
}

int mha_cmd_lab(int argc, char **argv)
{
    lab_opts o = {.model = {.vocab = 64, .context = 32, .embed_dim = 64, .layers = 2, .heads = 4, .seed = 1},
                  .out = "lab-report",
                  .data = "spans",
                  .text_path = "/usr/share/common-licenses/GPL-3",
                  .steps = 1500,
                  .batch = 32,
                  .gqa_steps = 1000,
                  .lr = 3e-3,
                  .wd = 0.01};
    const char *sub = argc >= 2 && argv[1][0] != '-' ? argv[1] : "run";
    static const char *const subs[] = {"run", "train", "analyze", "prune", "report"};
    int which = cli_choice(sub, subs, 5);
    if (which < 0) {
        cli_error(CMD, "unknown subcommand \"%s\": run, train, analyze, prune or report", sub);
        return CLI_USAGE;
    }
    int64_t seed = 1;
    bool mlp = false, tied = false;
    cli_flag flags[] = {
        {"mlp", FLAG_BOOL, &mlp, "pre-norm blocks with an MLP (GPT-2's) instead of attention-only ones", false},
        {"tied", FLAG_BOOL, &tied, "tie the unembedding to the token embedding", false},
        {"out", FLAG_STRING, &o.out, "directory for the checkpoint and the report (default lab-report)", false},
        {"layers", FLAG_INT, &o.model.layers, "attention layers (default 2)", false},
        {"heads", FLAG_INT, &o.model.heads, "heads per layer (default 4)", false},
        {"kv-heads", FLAG_INT, &o.model.kv_heads, "key/value heads per layer (default: heads)", false},
        {"embed-dim", FLAG_INT, &o.model.embed_dim, "model width (default 64)", false},
        {"context", FLAG_INT, &o.model.context, "tokens per sequence (default 32)", false},
        {"vocab", FLAG_INT, &o.model.vocab, "vocabulary size (default 64)", false},
        {"steps", FLAG_INT, &o.steps, "training steps (default 1500)", false},
        {"gqa-steps", FLAG_INT, &o.gqa_steps, "steps of each model in the GQA comparison (default 1000)", false},
        {"batch", FLAG_INT, &o.batch, "sequences per step (default 32)", false},
        {"lr", FLAG_DOUBLE, &o.lr, "AdamW learning rate (default 3e-3)", false},
        {"seed", FLAG_INT, &seed, "seed of the weights and the data (default 1)", false},
        {"resume", FLAG_BOOL, &o.resume, "train: continue from --out's checkpoint", false},
        {"data", FLAG_STRING, &o.data, "spans (repeated random spans, default) or text (characters of --text)", false},
        {"text", FLAG_STRING, &o.text_path, "text file for --data text (default /usr/share/common-licenses/GPL-3)",
         false},
        {"threads", FLAG_INT, &o.threads, "worker threads (default: all CPUs)", false},
    };
    bool help;
    int skip = argc >= 2 && argv[1][0] != '-';
    int rc = cli_parse(CMD, "[run|train|analyze|prune|report] [flags]", argc - skip, argv + skip, flags,
                       (int)(sizeof flags / sizeof flags[0]), &help);
    if (rc != CLI_OK || help) return rc;
    o.model.seed = (uint64_t)seed;
    o.model.mlp = mlp;
    o.model.tied = tied;
    if (o.steps < 1 || o.gqa_steps < 1 || o.batch < 1 || o.model.layers < 1 || o.model.layers > 16 ||
        o.model.heads < 1 || o.model.context < 4 || o.model.vocab < 2 || o.model.embed_dim % o.model.heads ||
        !(o.lr > 0)) {
        cli_error(CMD, "--steps, --gqa-steps, --batch, --layers (1..16), --heads, --context (>= 4), --vocab (>= 2) "
                       "must be positive, --embed-dim a multiple of --heads and --lr > 0");
        return CLI_USAGE;
    }
    if (strcmp(o.data, "spans") != 0 && strcmp(o.data, "text") != 0) {
        cli_error(CMD, "--data must be spans or text, got \"%s\"", o.data);
        return CLI_USAGE;
    }
    bool text = strcmp(o.data, "text") == 0;
    bool vocab_seen = false;
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
        vocab_seen |= flags[i].dst == &o.model.vocab && flags[i].seen;
    if (text && !vocab_seen) o.model.vocab = 128; /* ASCII */
    if (text && lab_text_load(o.text_path, o.model.vocab, &o.text) != MHA_OK) {
        cli_error(CMD, "--text %s: cannot read it (or it is empty)", o.text_path);
        return CLI_FAIL;
    }
    if ((rc = ensure_dir(o.out)) != CLI_OK) {
        lab_text_free(&o.text);
        return rc;
    }
    mha_ctx *ctx = NULL;
    lab_model *model = NULL;
    double *curve = calloc((size_t)o.steps, sizeof *curve);
    rc = curve ? cli_ctx(CMD, o.threads, &ctx) : CLI_FAIL;
    if (rc == CLI_OK && (which == 0 || which == 1)) rc = do_train(&o, ctx, &model, curve);
    if (rc == CLI_OK && which >= 2) rc = load_saved(&o, &model);
    if (rc == CLI_OK && which == 2) {
        int64_t n = model ? lab_model_config(model)->layers * lab_model_config(model)->heads : 0;
        lab_head_scores *scores = calloc((size_t)n, sizeof *scores);
        int32_t *tokens = malloc((size_t)(EVAL_B * lab_model_config(model)->context) * sizeof *tokens);
        float *attn = malloc(
            (size_t)(n * EVAL_B * lab_model_config(model)->context * lab_model_config(model)->context) * sizeof *attn);
        double held;
        rc = scores && tokens && attn ? analyze(&o, ctx, model, tokens, attn, scores, &held) : CLI_FAIL;
        if (rc == CLI_OK) {
            printf("held-out loss %.4f\n", held);
            print_heads(lab_model_config(model), scores, NULL, stdout);
        }
        free(scores), free(tokens), free(attn);
    }
    if (rc == CLI_OK && (which == 0 || which == 3 || which == 4)) {
        int64_t done = lab_model_steps(model) < o.steps ? lab_model_steps(model) : o.steps;
        rc = write_report(&o, ctx, model, curve, which == 0 ? done : 0, which != 3);
    }
    lab_model_free(model);
    mha_ctx_free(ctx);
    free(curve);
    lab_text_free(&o.text);
    return rc;
}
