/*
 * experiments.c -- what `mha lab` runs, as functions a program calls:
 * training with AdamW on a stream of sequences, the heads' scores on
 * held-out sequences, the pruning curves, the grouped-query comparison,
 * and the summary.  The CLI (tools/mha/cmd_lab.c) only parses flags,
 * shows progress and writes files.  Every stream of data is seeded from
 * the run's seed, so a run is reproducible step by step.
 */
#include "lab.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void lab_sequences(const lab_run *r, const lab_config *c, int64_t B, int32_t *tokens, uint64_t *state)
{
    if (r->text) lab_text_windows(r->text, tokens, B, c->context, state);
    else lab_repeated_spans(tokens, B, c->context, c->vocab, state);
}

/* The batch of training step `step`: a stream of its own, so a resumed run
 * sees the same data as an uninterrupted one. */
static void step_batch(const lab_run *r, const lab_config *c, int64_t step, int32_t *tokens)
{
    uint64_t state = (c->seed + 1) * 0x9e3779b97f4a7c15u ^ (uint64_t)step * 0xbf58476d1ce4e5b9u;
    state = state ? state : 1;
    lab_sequences(r, c, r->batch, tokens, &state);
}

void lab_held_out(const lab_run *r, const lab_config *c, int64_t B, int32_t *tokens)
{
    uint64_t state = c->seed * 7919u + 0x5851f42d4c957f2du;
    lab_sequences(r, c, B, tokens, &state);
}

mha_status lab_train(mha_ctx *ctx, lab_model *model, const lab_run *r, double *curve, lab_step_fn on_step, void *arg,
                     bool *stopped)
{
    const lab_config *c = lab_model_config(model);
    int32_t *tokens = malloc((size_t)(r->batch * c->context) * sizeof *tokens);
    if (!tokens) return MHA_ERR_NOMEM;
    mha_status st = MHA_OK;
    *stopped = false;
    for (int64_t step = lab_model_steps(model) + 1; step <= r->steps && st == MHA_OK; step++) {
        double loss = 0;
        step_batch(r, c, step, tokens);
        st = lab_model_loss(ctx, model, tokens, r->batch, 1, NULL, &loss);
        if (st == MHA_OK) st = lab_model_adamw(model, r->lr, r->wd);
        if (st != MHA_OK) break;
        if (curve) curve[step - 1] = loss;
        if (on_step && on_step(arg, step, r->steps, loss)) {
            *stopped = true;
            break;
        }
    }
    free(tokens);
    return st;
}

mha_status lab_analyze(mha_ctx *ctx, lab_model *model, const lab_run *r, int32_t *tokens, float *attn,
                       lab_head_scores *scores, double *loss)
{
    const lab_config *c = lab_model_config(model);
    int64_t T = c->context, H = c->heads, maps = LAB_EVAL_B * H * T * T;
    lab_held_out(r, c, LAB_EVAL_B, tokens);
    mha_status st = lab_model_loss(ctx, model, tokens, LAB_EVAL_B, 0, attn, loss);
    float *a = st == MHA_OK ? malloc((size_t)(LAB_EVAL_B * T * T) * sizeof *a) : NULL;
    if (st == MHA_OK && !a) st = MHA_ERR_NOMEM;
    for (int64_t l = 0; st == MHA_OK && l < c->layers; l++)
        for (int64_t h = 0; h < H; h++) { /* head h's maps of every sequence, together */
            for (int64_t b = 0; b < LAB_EVAL_B; b++)
                memcpy(a + b * T * T, attn + l * maps + (b * H + h) * T * T, (size_t)(T * T) * sizeof(float));
            lab_head_scores_compute(a, tokens, LAB_EVAL_B, T, &scores[l * H + h]);
        }
    free(a);
    return st;
}

/* Held-out loss with the heads removed in `order`, k = 0 .. n heads; the
 * model keeps every head afterwards. */
static mha_status prune_curve(mha_ctx *ctx, lab_model *model, const int32_t *tokens, const int64_t *order,
                              double *curve)
{
    const lab_config *c = lab_model_config(model);
    int64_t n = c->layers * c->heads; /* >= 1: the model exists */
    uint8_t *keep = n > 0 ? malloc((size_t)n) : NULL;
    if (!keep) return MHA_ERR_NOMEM;
    memset(keep, 1, (size_t)n);
    mha_status st = MHA_OK;
    for (int64_t k = 0; k <= n && st == MHA_OK; k++) {
        if (k > 0) keep[order[k - 1]] = 0;
        st = lab_model_keep_heads(model, keep);
        if (st == MHA_OK) st = lab_model_loss(ctx, model, tokens, LAB_EVAL_B, 0, NULL, &curve[k]);
    }
    memset(keep, 1, (size_t)n);
    mha_status restored = lab_model_keep_heads(model, keep);
    free(keep);
    return st != MHA_OK ? st : restored;
}

/* order: the heads least important first, then (shuffled) at random. */
static void order_by_importance(const double *importance, int64_t n, int64_t *order)
{
    for (int64_t i = 0; i < n; i++) order[i] = i;
    for (int64_t i = 1; i < n; i++)
        for (int64_t j = i; j > 0 && importance[order[j]] < importance[order[j - 1]]; j--) {
            int64_t t = order[j];
            order[j] = order[j - 1], order[j - 1] = t;
        }
}

static void shuffle(int64_t *order, int64_t n, uint64_t seed)
{
    uint64_t s = seed * 104729u + 3u;
    for (int64_t i = n - 1; i > 0; i--) { /* Fisher-Yates with xorshift */
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        int64_t j = (int64_t)(s % (uint64_t)(i + 1)), t = order[i];
        order[i] = order[j], order[j] = t;
    }
}

mha_status lab_importance(mha_ctx *ctx, lab_model *model, const lab_run *r, double *importance)
{
    const lab_config *c = lab_model_config(model);
    int32_t *tokens = malloc((size_t)(LAB_PRUNE_BATCHES * LAB_EVAL_B * c->context) * sizeof *tokens);
    if (!tokens) return MHA_ERR_NOMEM;
    uint64_t state = c->seed * 31u + 77u; /* held-out sequences of their own */
    lab_sequences(r, c, LAB_PRUNE_BATCHES * LAB_EVAL_B, tokens, &state);
    mha_status st = lab_head_importance(ctx, model, tokens, LAB_EVAL_B, LAB_PRUNE_BATCHES, importance);
    free(tokens);
    return st;
}

mha_status lab_prune(mha_ctx *ctx, lab_model *model, const lab_run *r, const int32_t *eval_tokens, lab_pruning *p)
{
    const lab_config *c = lab_model_config(model);
    int64_t n = c->layers * c->heads;
    int64_t *order = n > 0 ? calloc((size_t)n, sizeof *order) : NULL;
    mha_status st = order ? lab_importance(ctx, model, r, p->importance) : MHA_ERR_NOMEM;
    if (st == MHA_OK) {
        order_by_importance(p->importance, n, order);
        st = prune_curve(ctx, model, eval_tokens, order, p->by_importance);
    }
    if (st == MHA_OK) {
        shuffle(order, n, c->seed);
        st = prune_curve(ctx, model, eval_tokens, order, p->by_random);
    }
    free(order);
    return st;
}

int lab_gqa_candidates(int64_t heads, int64_t kv[4])
{
    int64_t cands[4] = {heads, heads / 2, heads / 4, 1};
    int n = 0;
    for (int i = 0; i < 4; i++) /* h, h/2, h/4 and 1 kv heads, each once */
        if (cands[i] >= 1 && heads % cands[i] == 0 && (n == 0 || kv[n - 1] != cands[i])) kv[n++] = cands[i];
    return n;
}

int64_t lab_kv_bytes(const lab_config *c, int64_t kv_heads)
{
    return 2 * kv_heads * (c->embed_dim / c->heads) * (int64_t)sizeof(float) * c->layers;
}

mha_status lab_gqa_loss(mha_ctx *ctx, const lab_run *r, int64_t kv_heads, lab_step_fn on_step, void *arg, double *loss)
{
    lab_run g = *r;
    g.model.kv_heads = kv_heads;
    lab_model *m = NULL;
    mha_status st = lab_model_create(&g.model, &m);
    bool stopped = false;
    if (st == MHA_OK) st = lab_train(ctx, m, &g, NULL, on_step, arg, &stopped);
    if (st == MHA_OK && stopped) { /* on_step said stop: no loss to give */
        *loss = NAN;
        lab_model_free(m);
        return MHA_OK;
    }
    int32_t *tokens = st == MHA_OK ? malloc((size_t)(LAB_EVAL_B * g.model.context) * sizeof *tokens) : NULL;
    if (st == MHA_OK && !tokens) st = MHA_ERR_NOMEM;
    if (st == MHA_OK) {
        lab_held_out(&g, &g.model, LAB_EVAL_B, tokens);
        st = lab_model_loss(ctx, m, tokens, LAB_EVAL_B, 0, NULL, loss);
    }
    free(tokens);
    lab_model_free(m);
    return st;
}

int lab_summary(char *out, size_t size, const lab_model *model, const lab_run *r, double held,
                const lab_head_scores *scores, const lab_pruning *p, const lab_gqa *gqa)
{
    const lab_config *c = lab_model_config(model);
    int64_t n = c->layers * c->heads;
    int prev = 0, induction = 0, used;
    for (int64_t i = 0; i < n; i++) {
        prev += strcmp(lab_head_role(&scores[i]), "previous-token") == 0;
        induction += strcmp(lab_head_role(&scores[i]), "induction") == 0;
    }
    used = snprintf(out, size,
                    "%lld training steps on %s; held-out loss %.4f (a uniform guess costs ln %lld = %.3f).\n"
                    "%d previous-token head(s) and %d induction head(s) (thresholds in docs/HEADS.md).\n"
                    "Removing the %lld least important heads: loss %.4f; %lld random heads: %.4f (none removed: "
                    "%.4f).\n",
                    (long long)lab_model_steps(model), r->text ? "character-level text" : "repeated random spans", held,
                    (long long)c->vocab, log((double)c->vocab), prev, induction, (long long)(n / 2),
                    p->by_importance[n / 2], (long long)(n / 2), p->by_random[n / 2], p->by_importance[0]);
    for (int64_t i = 0; gqa && i < gqa->n && used >= 0 && (size_t)used < size; i++)
        used += snprintf(out + used, size - (size_t)used,
                         "GQA: %lld kv head%s, held-out loss %.4f, KV cache %lld bytes per token.\n",
                         (long long)gqa->kv[i], gqa->kv[i] == 1 ? "" : "s", gqa->loss[i], (long long)gqa->bytes[i]);
    return used;
}

void lab_print_heads(const lab_config *c, const lab_head_scores *scores, const double *importance, FILE *f)
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
