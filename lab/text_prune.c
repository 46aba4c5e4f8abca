/*
 * text_prune.c -- which of a sentence encoder's heads can go.  Quality is
 * how well the pruned model keeps the unpruned one's judgement of which
 * sentences are alike: the Pearson correlation between the two models'
 * cosine similarities over every pair of the corpus's sentences (1 when
 * nothing is removed).  A head's importance is the quality lost when it
 * alone is removed (an ablation: a sentence encoder has no training loss
 * to take gradients of, which the toy lab's importance uses).
 */
#include "lab.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* The corpus's sentences as one padded batch. */
mha_status lab_batch_make(const lab_corpus *c, lab_batch *b)
{
    if (c->n < 1) return lab_fail(MHA_ERR_INVALID_ARG, "a batch of no sentences");
    b->B = c->n, b->T = 1;
    for (int64_t i = 0; i < c->n; i++) b->T = c->sentences[i].length > b->T ? c->sentences[i].length : b->T;
    b->ids = calloc((size_t)(b->B * b->T), sizeof *b->ids);
    b->lengths = malloc((size_t)b->B * sizeof *b->lengths);
    if (!b->ids || !b->lengths) return MHA_ERR_NOMEM;
    for (int64_t i = 0; i < c->n; i++) {
        b->lengths[i] = c->sentences[i].length;
        memcpy(b->ids + i * b->T, c->sentences[i].ids, (size_t)b->lengths[i] * sizeof *b->ids);
    }
    return MHA_OK;
}

void lab_batch_free(lab_batch *b)
{
    free(b->ids);
    free(b->lengths);
    b->ids = NULL, b->lengths = NULL;
}

/* Cosine similarity of every pair i < j of unit embeddings. */
void lab_similarities(const float *emb, int64_t n, int64_t E, double *sim)
{
    int64_t k = 0;
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = i + 1; j < n; j++, k++) {
            double dot = 0;
            for (int64_t e = 0; e < E; e++) dot += (double)emb[i * E + e] * emb[j * E + e];
            sim[k] = dot;
        }
}

double lab_pearson(const double *a, const double *b, int64_t n)
{
    double ma = 0, mb = 0, sab = 0, saa = 0, sbb = 0;
    for (int64_t i = 0; i < n; i++) ma += a[i], mb += b[i];
    ma /= (double)n, mb /= (double)n;
    for (int64_t i = 0; i < n; i++) {
        sab += (a[i] - ma) * (b[i] - mb);
        saa += (a[i] - ma) * (a[i] - ma);
        sbb += (b[i] - mb) * (b[i] - mb);
    }
    return saa > 0 && sbb > 0 ? sab / sqrt(saa * sbb) : 0;
}

/* Every block's input is kept (lab_encoder_forward_from): removing a
 * head of block l changes nothing before it, so only blocks l .. L-1 are
 * computed again -- about half the work of a whole forward. */
typedef struct judge {
    mha_ctx *ctx;
    lab_encoder *enc;
    const lab_batch *batch;
    int64_t heads, layers, n;    /* n: floats of one block's states */
    float *whole, *states, *emb; /* the unpruned model's block inputs; the current model's */
    double *reference, *sim;     /* the unpruned similarities, the current model's */
    int64_t pairs;
    lab_text_pruning *p;
    int64_t measured, to_measure; /* models, for progress */
} judge;

/* The similarities of the model as it stands, from block `first` on. */
static mha_status similarities_now(judge *j, int64_t first, double *sim)
{
    const lab_batch *b = j->batch;
    int64_t E = lab_encoder_config_of(j->enc)->embed_dim;
    mha_status st = lab_encoder_forward_from(j->ctx, j->enc, b->ids, b->lengths, b->B, b->T, first, j->states);
    if (st != MHA_OK) return st;
    lab_encoder_pool(j->states + j->layers * j->n, b->lengths, b->B, b->T, E, j->emb);
    lab_similarities(j->emb, b->B, E, sim);
    return MHA_OK;
}

/* Quality with the heads keep[] says stay, the states valid up to block
 * `first`. */
static mha_status quality(judge *j, const uint8_t *keep, int64_t first, double *q)
{
    mha_status st = lab_encoder_keep_heads(j->enc, keep);
    if (st == MHA_OK) st = similarities_now(j, first, j->sim);
    *q = st == MHA_OK ? lab_pearson(j->reference, j->sim, j->pairs) : NAN;
    if (j->p->progress) j->p->progress(j->p->progress_arg, ++j->measured, j->to_measure);
    return st;
}

/* quality after removing order[0 .. k-1], k = 0 .. n, into curve. */
static mha_status curve_of(judge *j, const int64_t *order, int64_t n, uint8_t *keep, double *curve)
{
    memset(keep, 1, (size_t)n);
    memcpy(j->states, j->whole, (size_t)((j->layers + 1) * j->n) * sizeof(float));
    curve[0] = 1; /* the model itself */
    mha_status st = MHA_OK;
    for (int64_t k = 1; k <= n && st == MHA_OK; k++) {
        keep[order[k - 1]] = 0;
        st = quality(j, keep, order[k - 1] / j->heads, &curve[k]);
    }
    return st;
}

static uint64_t next_random(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static mha_status orders_and_curves(judge *j, int64_t n, uint8_t *keep, int64_t *order, lab_text_pruning *p)
{
    for (int64_t i = 0; i < n; i++) order[i] = i;
    for (int64_t i = 1; i < n; i++) /* least important first, ties by index: a stable insertion sort */
        for (int64_t k = i; k > 0 && p->importance[order[k]] < p->importance[order[k - 1]]; k--) {
            int64_t t = order[k];
            order[k] = order[k - 1], order[k - 1] = t;
        }
    memcpy(p->order, order, (size_t)n * sizeof *order);
    mha_status st = curve_of(j, order, n, keep, p->by_importance);
    double *one = malloc((size_t)(n + 1) * sizeof *one);
    if (!one) return MHA_ERR_NOMEM;
    memset(p->by_random, 0, (size_t)(n + 1) * sizeof *p->by_random);
    uint64_t seed = 20261201;
    for (int r = 0; r < LAB_RANDOM_ORDERS && st == MHA_OK; r++) {
        for (int64_t i = 0; i < n; i++) order[i] = i;
        for (int64_t i = n - 1; i > 0; i--) { /* Fisher-Yates */
            int64_t k = (int64_t)(next_random(&seed) % (uint64_t)(i + 1)), t = order[i];
            order[i] = order[k], order[k] = t;
        }
        st = curve_of(j, order, n, keep, one);
        for (int64_t k = 0; k <= n; k++) p->by_random[k] += one[k] / LAB_RANDOM_ORDERS;
    }
    free(one);
    return st;
}

static mha_status prune(judge *j, int64_t n, lab_text_pruning *p)
{
    uint8_t *keep = malloc((size_t)n);
    int64_t *order = malloc((size_t)n * sizeof *order);
    mha_status st = keep && order ? similarities_now(j, -1, j->reference) : MHA_ERR_NOMEM;
    if (st == MHA_OK) memcpy(j->whole, j->states, (size_t)((j->layers + 1) * j->n) * sizeof(float));
    for (int64_t h = 0; h < n && st == MHA_OK; h++) {
        double q;
        memset(keep, 1, (size_t)n);
        keep[h] = 0;
        int64_t l = h / j->heads; /* block l's input is the unpruned model's */
        memcpy(j->states + l * j->n, j->whole + l * j->n, (size_t)j->n * sizeof(float));
        st = quality(j, keep, l, &q);
        p->importance[h] = 1 - q;
    }
    if (st == MHA_OK) st = orders_and_curves(j, n, keep, order, p);
    p->removable = 0;
    while (st == MHA_OK && p->removable < n && p->by_importance[p->removable + 1] >= 1 - LAB_QUALITY_LOSS)
        p->removable++;
    if (keep) memset(keep, 1, (size_t)n);
    if (keep && st == MHA_OK) st = lab_encoder_keep_heads(j->enc, keep); /* the model as it was */
    free(keep);
    free(order);
    return st;
}

mha_status lab_text_prune(mha_ctx *ctx, lab_encoder *enc, const lab_batch *batch, lab_text_pruning *p)
{
    const lab_encoder_config *c = lab_encoder_config_of(enc);
    int64_t n = c->layers * c->heads, pairs = batch->B * (batch->B - 1) / 2, block = batch->B * batch->T * c->embed_dim;
    judge j = {ctx,   enc,   batch, c->heads, c->layers,
               block, NULL,  NULL,  NULL,     NULL,
               NULL,  pairs, p,     0,        n * (2 + LAB_RANDOM_ORDERS)};
    j.whole = malloc((size_t)((c->layers + 1) * block) * sizeof(float));
    j.states = malloc((size_t)((c->layers + 1) * block) * sizeof(float));
    j.emb = malloc((size_t)(batch->B * c->embed_dim) * sizeof(float));
    j.reference = malloc((size_t)pairs * sizeof(double));
    j.sim = malloc((size_t)pairs * sizeof(double));
    bool ok = j.whole && j.states && j.emb && j.reference && j.sim;
    mha_status st =
        pairs < 2 ? lab_fail(MHA_ERR_INVALID_ARG, "pruning needs 3 sentences or more, got %lld", (long long)batch->B)
        : ok      ? prune(&j, n, p)
                  : MHA_ERR_NOMEM;
    free(j.whole), free(j.states), free(j.emb), free(j.reference), free(j.sim);
    return st;
}
