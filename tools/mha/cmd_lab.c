/*
 * cmd_lab.c -- `mha lab`: train the lab's transformer, see what each head
 * learned, prune heads, compare grouped-query attention, and write the
 * report.  The experiments are lab/experiments.c; this file parses the
 * flags, shows progress, and reads and writes the files.
 *
 *   mha lab [run]   everything below, into --out (default lab-report/)
 *   mha lab train   train (or --resume) and save DIR/checkpoint.safetensors;
 *                   Ctrl-C saves a checkpoint and stops
 *   mha lab analyze the head table of a saved model
 *   mha lab prune   the pruning curves of a saved model
 *   mha lab report  the report (HTML, PNG heatmaps, summary) of a saved
 *                   model, with the GQA comparison trained on the spot
 *   mha lab model   the same questions of a pretrained model
 *                   (cmd_lab_model.c)
 */
#define _POSIX_C_SOURCE 200809L

#include "cli.h"
#include "lab.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *const CMD = "lab";

enum { SUB_RUN, SUB_TRAIN, SUB_ANALYZE, SUB_PRUNE, SUB_REPORT };

typedef struct lab_opts {
    lab_run run;
    lab_text text; /* loaded when data is "text" */
    const char *out, *data, *text_path;
    int64_t threads, gqa_steps;
    bool resume;
} lab_opts;

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

/* ---------------------------------------------------------------- */
/* Training                                                          */
/* ---------------------------------------------------------------- */

typedef struct progress {
    const char *label; /* what is being trained */
    double t0, last_draw;
} progress;

/* After each step: a progress bar redrawn in place on a terminal (at most
 * 5 times a second), or a line every tenth of the run into a file or
 * pipe; stops the training at Ctrl-C. */
static int on_step(void *arg, int64_t step, int64_t total, double loss)
{
    progress *p = arg;
    bool tty = isatty(STDERR_FILENO), last = step == total;
    double now = cli_now_ms();
    if (interrupted) {
        fprintf(stderr, "\nmha lab: interrupted at step %lld\n", (long long)step);
        return 1;
    }
    if (tty && !last && now - p->last_draw < 200) return 0;
    if (!tty && !last && step % (total / 10 > 0 ? total / 10 : 1) != 0) return 0;
    p->last_draw = now;
    double elapsed = (now - p->t0) / 1e3, eta = elapsed / (double)step * (double)(total - step);
    int width = 30, filled = (int)(width * step / total);
    char bar[64];
    for (int i = 0; i < width; i++) bar[i] = i < filled ? '#' : '.';
    bar[width] = '\0';
    fprintf(stderr, "%s%-16s [%s] step %lld/%lld  loss %.4f  %.0f s, eta %.0f s %s", tty ? "\r" : "", p->label, bar,
            (long long)step, (long long)total, loss, elapsed, eta, tty && !last ? "" : "\n");
    return 0;
}

/* Trains (or resumes) and saves the checkpoint; *model is the result. */
static int do_train(const lab_opts *o, mha_ctx *ctx, lab_model **model, double *curve)
{
    char ckpt[1024];
    path_in(ckpt, sizeof ckpt, o, "checkpoint.safetensors");
    mha_status st = o->resume ? lab_model_load(ckpt, model) : lab_model_create(&o->run.model, model);
    if (st != MHA_OK) {
        cli_error(CMD, o->resume ? "cannot resume from %s: %s" : "cannot create the model%s: %s", o->resume ? ckpt : "",
                  mha_last_error());
        return CLI_FAIL;
    }
    if (o->resume) fprintf(stderr, "mha lab: resuming at step %lld\n", (long long)lab_model_steps(*model));
    progress p = {"training", cli_now_ms(), 0};
    bool stopped = false;
    signal(SIGINT, on_sigint);
    st = lab_train(ctx, *model, &o->run, curve, on_step, &p, &stopped);
    signal(SIGINT, SIG_DFL);
    if (st != MHA_OK) cli_error(CMD, "step %lld: %s", (long long)lab_model_steps(*model) + 1, mha_last_error());
    if (lab_model_save(*model, ckpt) != MHA_OK) {
        cli_error(CMD, "cannot save %s: %s", ckpt, mha_last_error());
        return CLI_FAIL;
    }
    if (stopped) fprintf(stderr, "mha lab: checkpoint saved to %s (continue with --resume)\n", ckpt);
    else if (st == MHA_OK)
        fprintf(stderr, "mha lab: trained to step %lld; model and optimiser state saved to %s\n",
                (long long)lab_model_steps(*model), ckpt);
    return st == MHA_OK && !stopped ? CLI_OK : CLI_FAIL;
}

/* The run's model with each kv-head count, trained afresh as the main
 * model was (the same steps, seed and data), so the losses compare like
 * with like.  The count the main model has is the main model itself
 * (lab_gqa_loss would retrain it to the same bits, tests/test_lab.c): it is
 * evaluated, not retrained, on the held-out `tokens` as lab_gqa_loss does. */
static int gqa_table(const lab_opts *o, mha_ctx *ctx, lab_model *model, const int32_t *tokens, lab_gqa *g)
{
    lab_run run = o->run;
    run.steps = o->gqa_steps;
    const lab_config *c = lab_model_config(model);
    int64_t own_kv = c->kv_heads ? c->kv_heads : c->heads;
    bool same_steps = lab_model_steps(model) == run.steps;
    g->n = lab_gqa_candidates(run.model.heads, g->kv);
    for (int64_t i = 0; i < g->n; i++) {
        char label[48];
        snprintf(label, sizeof label, "GQA %lld kv head%s", (long long)g->kv[i], g->kv[i] == 1 ? "" : "s");
        g->bytes[i] = lab_kv_bytes(&run.model, g->kv[i]);
        if (g->kv[i] == own_kv && same_steps) {
            if (lab_model_loss(ctx, model, tokens, LAB_EVAL_B, 0, NULL, &g->loss[i]) != MHA_OK) {
                cli_error(CMD, "%s: %s", label, mha_last_error());
                return CLI_FAIL;
            }
            fprintf(stderr, "%-16s the main model: held-out loss %.4f\n", label, g->loss[i]);
            continue;
        }
        progress p = {label, cli_now_ms(), 0};
        if (lab_gqa_loss(ctx, &run, g->kv[i], on_step, &p, &g->loss[i]) != MHA_OK) {
            cli_error(CMD, "%s: %s", label, mha_last_error());
            return CLI_FAIL;
        }
        if (interrupted) return CLI_FAIL; /* on_step said so; the checkpoint is saved */
    }
    return CLI_OK;
}

/* ---------------------------------------------------------------- */
/* Analysis and the report                                           */
/* ---------------------------------------------------------------- */

/* What the analysis of a model produces, and the report shows. */
typedef struct results {
    int32_t *tokens;         /* the held-out sequences [LAB_EVAL_B, T] */
    float *attn, *sample;    /* their maps; the first sequence's [layers][heads][T][T] */
    lab_head_scores *scores; /* [layers * heads] */
    double *buf, held;       /* the pruning curves' storage; the held-out loss */
    lab_pruning pruning;
    lab_gqa gqa;
} results;

static void results_free(results *r) { free(r->tokens), free(r->attn), free(r->sample), free(r->scores), free(r->buf); }

static int results_alloc(const lab_config *c, results *r)
{
    int64_t n = c->layers * c->heads, T = c->context;
    *r = (results){.tokens = malloc((size_t)(LAB_EVAL_B * T) * sizeof(int32_t)),
                   .attn = malloc((size_t)(n * LAB_EVAL_B * T * T) * sizeof(float)),
                   .sample = malloc((size_t)(n * T * T) * sizeof(float)),
                   .scores = calloc((size_t)n, sizeof(lab_head_scores)),
                   .buf = calloc((size_t)(3 * n + 2), sizeof(double))};
    r->pruning = (lab_pruning){r->buf, r->buf + n, r->buf + 2 * n + 1};
    if (r->tokens && r->attn && r->sample && r->scores && r->buf) return CLI_OK;
    cli_error(CMD, "out of memory for the analysis");
    results_free(r);
    return CLI_FAIL;
}

/* The heads' scores on the held-out sequences. */
static int analyze(const lab_opts *o, mha_ctx *ctx, lab_model *model, results *r)
{
    if (lab_analyze(ctx, model, &o->run, r->tokens, r->attn, r->scores, &r->held) == MHA_OK) return CLI_OK;
    cli_error(CMD, "%s", mha_last_error());
    return CLI_FAIL;
}

/* The first held-out sequence's maps of every head, for the pictures. */
static void first_sample(const lab_config *c, results *r)
{
    int64_t T = c->context, maps = LAB_EVAL_B * c->heads * T * T;
    for (int64_t l = 0; l < c->layers; l++)
        for (int64_t h = 0; h < c->heads; h++)
            memcpy(r->sample + (l * c->heads + h) * T * T, r->attn + l * maps + h * T * T,
                   (size_t)(T * T) * sizeof(float));
}

/* report.html, a PNG per head and summary.txt into --out; the summary
 * and the head table on stdout. */
static int write_files(const lab_opts *o, const lab_report *rep, const results *r)
{
    const lab_config *c = &rep->config;
    int64_t n = c->layers * c->heads, T = c->context;
    char path[1024];
    path_in(path, sizeof path, o, "report.html");
    int rc = lab_report_write(path, rep) == 0 ? CLI_OK : CLI_FAIL;
    if (rc != CLI_OK) cli_error(CMD, "cannot write %s", path);
    for (int64_t i = 0; rc == CLI_OK && i < n; i++) {
        char name[64], title[96];
        snprintf(name, sizeof name, "layer%lld_head%lld.png", (long long)(i / c->heads), (long long)(i % c->heads));
        snprintf(title, sizeof title, "layer %lld, head %lld: %s", (long long)(i / c->heads), (long long)(i % c->heads),
                 lab_head_role(&r->scores[i]));
        path_in(path, sizeof path, o, name);
        lab_map_picture pic = {r->sample + i * T * T, T, T, title, rep->repeat_start};
        if (lab_map_png(path, &pic, T <= 48 ? 8 : T <= 128 ? 3 : 1) != 0) {
            cli_error(CMD, "cannot write %s", path);
            rc = CLI_FAIL;
        }
    }
    path_in(path, sizeof path, o, "summary.txt");
    FILE *f = rc == CLI_OK ? fopen(path, "w") : NULL;
    if (f) {
        fputs(rep->summary, f);
        lab_print_heads(c, r->scores, r->pruning.importance, f);
        fclose(f);
    }
    if (rc != CLI_OK) return rc;
    fputs(rep->summary, stdout);
    lab_print_heads(c, r->scores, r->pruning.importance, stdout);
    path_in(path, sizeof path, o, "report.html");
    printf("report: %s (and layer*_head*.png, summary.txt)\n", path);
    return CLI_OK;
}

/* Everything after training: scores, pruning, GQA, the report files. */
static int write_report(const lab_opts *o, mha_ctx *ctx, lab_model *model, const double *curve, int64_t curve_len,
                        bool with_gqa)
{
    const lab_config *c = lab_model_config(model);
    int64_t n = c->layers * c->heads;
    results r;
    if (results_alloc(c, &r) != CLI_OK) return CLI_FAIL;
    fprintf(stderr, "mha lab: scoring the heads on %d held-out sequences, then pruning (%lld heads, 2 orders)\n",
            LAB_EVAL_B, (long long)n);
    int rc = analyze(o, ctx, model, &r);
    if (rc == CLI_OK && lab_prune(ctx, model, &o->run, r.tokens, &r.pruning) != MHA_OK) {
        cli_error(CMD, "pruning: %s", mha_last_error());
        rc = CLI_FAIL;
    }
    if (rc == CLI_OK && with_gqa) rc = gqa_table(o, ctx, model, r.tokens, &r.gqa);
    char summary[8192];
    if (rc == CLI_OK) {
        lab_summary(summary, sizeof summary, model, &o->run, r.held, r.scores, &r.pruning, &r.gqa);
        first_sample(c, &r);
        int64_t repeat_start = -1, repeat_len = -1;
        if (!o->run.text) lab_find_repeat(r.tokens, c->context, &repeat_start, &repeat_len);
        lab_report rep = {.config = *c,
                          .summary = summary,
                          .curve = curve,
                          .curve_len = curve_len,
                          .scores = r.scores,
                          .importance = r.pruning.importance,
                          .sample = r.tokens,
                          .sample_len = c->context,
                          .maps = r.sample,
                          .prune_important = r.pruning.by_importance,
                          .prune_random = r.pruning.by_random,
                          .prune_len = n + 1,
                          .gqa_kv_heads = r.gqa.kv,
                          .gqa_kv_bytes = r.gqa.bytes,
                          .gqa_loss = r.gqa.loss,
                          .gqa_len = r.gqa.n,
                          .steps = lab_model_steps(model),
                          .gqa_steps = o->gqa_steps,
                          .repeat_start = repeat_start,
                          .repeat_len = repeat_len,
                          .text = o->run.text != NULL};
        rc = write_files(o, &rep, &r);
    }
    results_free(&r);
    return rc;
}

/* `mha lab analyze`: the held-out loss and the head table, importance
 * included. */
static int print_analysis(const lab_opts *o, mha_ctx *ctx, lab_model *model)
{
    results r;
    if (results_alloc(lab_model_config(model), &r) != CLI_OK) return CLI_FAIL;
    int rc = analyze(o, ctx, model, &r);
    if (rc == CLI_OK && lab_importance(ctx, model, &o->run, r.pruning.importance) != MHA_OK) {
        cli_error(CMD, "importance: %s", mha_last_error());
        rc = CLI_FAIL;
    }
    if (rc == CLI_OK) {
        printf("held-out loss %.4f\n", r.held);
        lab_print_heads(lab_model_config(model), r.scores, r.pruning.importance, stdout);
    }
    results_free(&r);
    return rc;
}

/* ---------------------------------------------------------------- */
/* The command                                                       */
/* ---------------------------------------------------------------- */

static int load_saved(const lab_opts *o, lab_model **model)
{
    char ckpt[1024];
    path_in(ckpt, sizeof ckpt, o, "checkpoint.safetensors");
    if (lab_model_load(ckpt, model) == MHA_OK) return CLI_OK;
    cli_error(CMD, "cannot load %s (train first: mha lab train --out %s): %s", ckpt, o->out, mha_last_error());
    return CLI_FAIL;
}

/* The flags' ranges: a value outside one is named as it is read. */
static const cli_range LAYERS = {1, 16, "in 1..16"}, CONTEXT = {4, 4096, "in 4..4096"},
                       VOCAB = {2, 1 << 20, "in 2..1048576"}, KV_HEADS = {0, 1 << 20, "0 (= --heads) or more"},
                       STEPS = {1, 1e8, "in 1..100000000"}, LR = {1e-9, 1, "in (0, 1]"};

/* The rules that tie flags together, and the learning rate's. */
static int check_relations(const lab_opts *o)
{
    const lab_config *m = &o->run.model;
    if (m->embed_dim % m->heads != 0) {
        cli_error(CMD, "--heads %lld does not divide --embed-dim %lld: each head gets embed-dim / heads columns",
                  (long long)m->heads, (long long)m->embed_dim);
        return CLI_USAGE;
    }
    if (m->kv_heads > m->heads) {
        cli_error(CMD, "--kv-heads %lld is more than --heads %lld: kv heads are shared by query heads, never more",
                  (long long)m->kv_heads, (long long)m->heads);
        return CLI_USAGE;
    }
    if (m->kv_heads > 0 && m->heads % m->kv_heads != 0) {
        cli_error(CMD, "--kv-heads %lld does not divide --heads %lld: each kv head serves a whole group of heads",
                  (long long)m->kv_heads, (long long)m->heads);
        return CLI_USAGE;
    }
    return CLI_OK;
}

/* The flags' rules, and the text for --data text. */
static int check_opts(lab_opts *o, bool vocab_seen)
{
    int rc = check_relations(o);
    if (rc != CLI_OK) return rc;
    if (strcmp(o->data, "spans") != 0 && strcmp(o->data, "text") != 0) {
        cli_error(CMD, "--data must be spans or text, got \"%s\"", o->data);
        return CLI_USAGE;
    }
    if (strcmp(o->data, "text") != 0) return CLI_OK;
    if (!vocab_seen) o->run.model.vocab = 128; /* ASCII */
    if (lab_text_load(o->text_path, o->run.model.vocab, &o->text) != MHA_OK) {
        cli_error(CMD, "--text %s: cannot read it (or it is empty)", o->text_path);
        return CLI_FAIL;
    }
    o->run.text = &o->text;
    return CLI_OK;
}

static int parse(int argc, char **argv, lab_opts *o, bool *help)
{
    int64_t seed = 1;
    bool mlp = false, tied = false;
    lab_config *m = &o->run.model;
    cli_flag flags[] = {
        {"mlp", FLAG_BOOL, &mlp, "pre-norm blocks with an MLP (GPT-2's) instead of attention-only ones", false, NULL},
        {"tied", FLAG_BOOL, &tied, "tie the unembedding to the token embedding", false, NULL},
        {"out", FLAG_STRING, &o->out, "directory for the checkpoint and the report (default lab-report)", false, NULL},
        {"layers", FLAG_INT, &m->layers, "attention layers (default 2)", false, &LAYERS},
        {"heads", FLAG_INT, &m->heads, "heads per layer (default 4)", false, &CLI_COUNT},
        {"kv-heads", FLAG_INT, &m->kv_heads, "key/value heads per layer (default: heads)", false, &KV_HEADS},
        {"embed-dim", FLAG_INT, &m->embed_dim, "model width (default 64)", false, &CLI_COUNT},
        {"context", FLAG_INT, &m->context, "tokens per sequence (default 32)", false, &CONTEXT},
        {"vocab", FLAG_INT, &m->vocab, "vocabulary size (default 64)", false, &VOCAB},
        {"steps", FLAG_INT, &o->run.steps, "training steps (default 1500)", false, &STEPS},
        {"gqa-steps", FLAG_INT, &o->gqa_steps, "steps of each model in the GQA comparison (default: --steps)", false,
         &STEPS},
        {"batch", FLAG_INT, &o->run.batch, "sequences per step (default 32)", false, &CLI_COUNT},
        {"lr", FLAG_DOUBLE, &o->run.lr, "AdamW learning rate (default 3e-3)", false, &LR},
        {"seed", FLAG_INT, &seed, "seed of the weights and the data (default 1)", false, NULL},
        {"resume", FLAG_BOOL, &o->resume, "train: continue from --out's checkpoint", false, NULL},
        {"data", FLAG_STRING, &o->data, "spans (repeated random spans, default) or text (characters of --text)", false,
         NULL},
        {"text", FLAG_STRING, &o->text_path, "text file for --data text (default /usr/share/common-licenses/GPL-3)",
         false, NULL},
        {"threads", FLAG_INT, &o->threads, "worker threads (default: all CPUs)", false, &CLI_THREADS},
    };
    int rc = cli_parse(CMD, "[run|train|analyze|prune|report] [flags]", argc, argv, flags,
                       (int)(sizeof flags / sizeof flags[0]), help);
    if (rc != CLI_OK || *help) return rc;
    m->seed = (uint64_t)seed;
    if (!o->gqa_steps) o->gqa_steps = o->run.steps;
    m->mlp = mlp;
    m->tied = tied;
    bool vocab_seen = false;
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
        vocab_seen |= flags[i].dst == &m->vocab && flags[i].seen;
    return check_opts(o, vocab_seen);
}

/* The subcommand's work, after the flags. */
static int run_sub(const lab_opts *o, int which, mha_ctx *ctx, double *curve)
{
    lab_model *model = NULL;
    int rc = which == SUB_RUN || which == SUB_TRAIN ? do_train(o, ctx, &model, curve) : load_saved(o, &model);
    if (rc == CLI_OK && which == SUB_TRAIN)
        printf("trained: %s/checkpoint.safetensors (see it with mha lab analyze|prune|report --out %s)\n", o->out,
               o->out);
    if (rc == CLI_OK && which == SUB_ANALYZE) rc = print_analysis(o, ctx, model);
    if (rc == CLI_OK && (which == SUB_RUN || which == SUB_PRUNE || which == SUB_REPORT)) {
        int64_t steps = lab_model_steps(model), done = steps < o->run.steps ? steps : o->run.steps;
        rc = write_report(o, ctx, model, curve, which == SUB_RUN ? done : 0, which != SUB_PRUNE);
    }
    lab_model_free(model);
    return rc;
}

int mha_cmd_lab(int argc, char **argv)
{
    lab_opts o = {.run = {.model = {.vocab = 64, .context = 32, .embed_dim = 64, .layers = 2, .heads = 4, .seed = 1},
                          .steps = 1500,
                          .batch = 32,
                          .lr = 3e-3,
                          .wd = 0.01},
                  .out = "lab-report",
                  .data = "spans",
                  .text_path = "/usr/share/common-licenses/GPL-3",
                  .gqa_steps = 0};
    const char *sub = argc >= 2 && argv[1][0] != '-' ? argv[1] : "run";
    if (strcmp(sub, "model") == 0) return mha_cmd_lab_model(argc - 1, argv + 1);
    static const char *const subs[] = {"run", "train", "analyze", "prune", "report"};
    int which = cli_choice(sub, subs, 5);
    if (which < 0) {
        cli_error(CMD, "unknown subcommand \"%s\": run, train, analyze, prune, report or model", sub);
        return CLI_USAGE;
    }
    bool help = false;
    int skip = argc >= 2 && argv[1][0] != '-';
    int rc = parse(argc - skip, argv + skip, &o, &help);
    if (rc == CLI_OK && !help) rc = cli_out_dir(CMD, o.out);
    if (rc != CLI_OK || help) {
        lab_text_free(&o.text);
        return rc;
    }
    mha_ctx *ctx = NULL;
    double *curve = calloc((size_t)o.run.steps, sizeof *curve);
    rc = curve ? cli_ctx(CMD, o.threads, &ctx) : CLI_FAIL;
    if (rc == CLI_OK) rc = run_sub(&o, which, ctx, curve);
    mha_ctx_free(ctx);
    free(curve);
    lab_text_free(&o.text);
    return rc;
}
