/*
 * text_heads.c -- what a pretrained model's heads do on real sentences:
 * token-level scores (previous / next token, the [CLS] and [SEP] sinks,
 * punctuation, a word's own pieces, how broad), each head's accuracy on
 * labelled word relations against a position-only baseline, and which
 * heads can go (formulas in docs/HEADS.md).
 *
 * Attention comes as lab_encoder_forward writes it for a batch of the
 * corpus's sentences: attn[((l * B + b) * H + h) * T * T + i * T + j].
 */
#include "lab.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static const float *map_of(const lab_attention *a, int64_t l, int64_t h, int64_t b)
{
    return a->attn + ((l * a->B + b) * a->H + h) * a->T * a->T;
}

/* A token is punctuation when its word is one character BERT splits off. */
static bool is_punct_word(const char *w)
{
    return w[0] && !w[1] &&
           ((w[0] >= 33 && w[0] <= 47) || (w[0] >= 58 && w[0] <= 64) || (w[0] >= 91 && w[0] <= 96) ||
            (w[0] >= 123 && w[0] <= 126));
}

static bool multi_piece(const lab_sentence *s, int64_t i)
{
    int32_t w = s->word_of[i];
    return w >= 0 && ((i > 0 && s->word_of[i - 1] == w) || (i + 1 < s->length && s->word_of[i + 1] == w));
}

/* The scores of one row i of a sentence's map. */
static void row_scores(const float *a, int64_t T, const lab_sentence *s, int64_t i, lab_text_scores *sum,
                       double *same_rows)
{
    int64_t n = s->length;
    const float *row = a + i * T;
    sum->previous += i > 0 ? row[i - 1] : 0;
    sum->next += i + 1 < n ? row[i + 1] : 0;
    sum->self += row[i];
    sum->cls += row[0];
    sum->sep += row[n - 1];
    double ent = 0, dist = 0, punct = 0, same = 0;
    for (int64_t j = 0; j < n; j++) {
        double p = row[j];
        if (p > 0) ent -= p * log(p);
        dist += p * (double)(i > j ? i - j : j - i);
        if (s->word_of[j] >= 0 && is_punct_word(s->words[s->word_of[j]])) punct += p;
        if (j != i && s->word_of[j] >= 0 && s->word_of[j] == s->word_of[i]) same += p;
    }
    sum->punct += punct;
    sum->entropy += n > 1 ? ent / log((double)n) : 0;
    sum->distance += dist;
    if (multi_piece(s, i)) sum->same_word += same, (*same_rows)++;
}

void lab_text_scores_head(const lab_attention *a, const lab_sentence *sentences, int64_t l, int64_t h,
                          lab_text_scores *s)
{
    memset(s, 0, sizeof *s);
    double rows = 0, same_rows = 0;
    for (int64_t b = 0; b < a->B; b++) {
        const lab_sentence *sen = &sentences[b];
        for (int64_t i = 0; i < sen->length; i++, rows++) row_scores(map_of(a, l, h, b), a->T, sen, i, s, &same_rows);
    }
    double *fields[] = {&s->previous, &s->next, &s->self, &s->cls, &s->sep, &s->punct, &s->entropy, &s->distance};
    for (size_t k = 0; k < sizeof fields / sizeof fields[0]; k++) *fields[k] /= rows > 0 ? rows : 1;
    s->same_word = same_rows > 0 ? s->same_word / same_rows : 0;
}

/* The first score at or above its threshold, in this order; else broad
 * (spread over the sentence) or local (near the query), else mixed. */
const char *lab_text_role(const lab_text_scores *s)
{
    if (s->previous >= 0.5) return "previous token";
    if (s->next >= 0.5) return "next token";
    if (s->sep >= 0.5) return "[SEP] sink";
    if (s->cls >= 0.5) return "[CLS] sink";
    if (s->punct >= 0.5) return "punctuation";
    if (s->self >= 0.5) return "self";
    if (s->same_word >= 0.5) return "same word";
    if (s->entropy >= 0.7) return "broad";
    if (s->distance <= 1.5) return "local";
    return "mixed";
}

/* ---- relations ------------------------------------------------------ */

static const struct {
    const char *name;
    int kind;
    bool reversed; /* the pair read to > from */
} RELATIONS[LAB_RELATIONS] = {
    {"determiner -> noun", 0, false}, {"subject -> verb", 1, false},       {"verb -> subject", 1, true},
    {"verb -> object", 2, false},     {"preposition -> object", 3, false}, {"pronoun -> antecedent", 4, false},
};

const char *lab_relation_name(int r) { return r >= 0 && r < LAB_RELATIONS ? RELATIONS[r].name : "?"; }

static void pair_ends(const lab_pair *p, int r, int64_t *from, int64_t *to)
{
    *from = RELATIONS[r].reversed ? p->to : p->from;
    *to = RELATIONS[r].reversed ? p->from : p->to;
}

/* The word the head attends to most from word u: attention from a word is
 * the mean over its tokens' rows, to a word the sum over its tokens'
 * columns; [CLS], [SEP] and u itself are not candidates.  -1 when no
 * candidate gets any attention (all of it on [CLS], [SEP] or u): a head
 * that looks nowhere points at no word. */
static int64_t most_attended_word(const float *a, int64_t T, const lab_sentence *s, int64_t u)
{
    double to[LAB_MAX_TOKENS] = {0};
    for (int64_t i = 0; i < s->length; i++) {
        if (s->word_of[i] != u) continue;
        for (int64_t j = 0; j < s->length; j++)
            if (s->word_of[j] >= 0) to[s->word_of[j]] += a[i * T + j];
    }
    int64_t best = -1;
    for (int64_t v = 0; v < s->n_words; v++)
        if (v != u && (best < 0 || to[v] > to[best])) best = v;
    return best >= 0 && to[best] > 0 ? best : -1;
}

void lab_relation_accuracy(const lab_attention *a, const lab_corpus *c, double *accuracy)
{
    int64_t LH = a->L * a->H;
    for (int r = 0; r < LAB_RELATIONS; r++)
        for (int64_t lh = 0; lh < LH; lh++) {
            int64_t hits = 0, total = 0;
            for (int64_t p = 0; p < c->n_pairs; p++) {
                if (c->pairs[p].kind != RELATIONS[r].kind) continue;
                int64_t from, to, b = c->pairs[p].sentence;
                pair_ends(&c->pairs[p], r, &from, &to);
                hits += most_attended_word(map_of(a, lh / a->H, lh % a->H, b), a->T, &c->sentences[b], from) == to;
                total++;
            }
            accuracy[r * LH + lh] = total ? (double)hits / (double)total : 0;
        }
}

void lab_relation_baseline(const lab_corpus *c, int r, double *accuracy, int *offset)
{
    *accuracy = 0, *offset = 0;
    for (int k = -LAB_MAX_OFFSET; k <= LAB_MAX_OFFSET; k++) {
        if (k == 0) continue;
        int64_t hits = 0, total = 0;
        for (int64_t p = 0; p < c->n_pairs; p++) {
            if (c->pairs[p].kind != RELATIONS[r].kind) continue;
            int64_t from, to;
            pair_ends(&c->pairs[p], r, &from, &to);
            hits += to == from + k;
            total++;
        }
        double acc = total ? (double)hits / (double)total : 0;
        if (acc > *accuracy) *accuracy = acc, *offset = k;
    }
}

int64_t lab_relation_pairs(const lab_corpus *c, int r)
{
    int64_t n = 0;
    for (int64_t p = 0; p < c->n_pairs; p++) n += c->pairs[p].kind == RELATIONS[r].kind;
    return n;
}
