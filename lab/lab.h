/*
 * lab.h -- the head lab: a small decoder-only transformer built on libmha's
 * public API, the data that makes its heads specialise, and the scores
 * that say what each head does.  (The first part of the head-lab issue:
 * attention-only models, the repeated-span task, training with AdamW, and
 * the previous-token, induction, duplicate-token, first-token, distance
 * and entropy scores.)
 */
#ifndef MHA_LAB_H
#define MHA_LAB_H

#include "mha.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

/* ---- the model ---------------------------------------------------- */

typedef struct lab_config {
    int64_t vocab;     /* tokens 0 .. vocab-1 */
    int64_t context;   /* T: positions */
    int64_t embed_dim; /* E */
    int64_t layers;
    int64_t heads;    /* per layer */
    int64_t kv_heads; /* 0 = heads (GQA when fewer) */
    uint64_t seed;    /* initial weights */
    int mlp;          /* 0: attention-only blocks; 1: pre-norm blocks with an MLP */
    int tied;         /* 1: the unembedding is the token embedding (W_U = tok_emb) */
} lab_config;

/* x_0 = tok_emb[token] + pos_emb[t], then per layer (causal attention):
 *   attention-only:  x_{l+1} = x_l + MHA_l(x_l)
 *   with mlp:        x'  = x_l + MHA_l(LN1_l(x_l))
 *                    x_{l+1} = x' + W2 GELU(W1 LN2_l(x') + b1) + b2   (width 4E)
 * logits = y W_U^T with y = x_L (attention-only) or LN_f(x_L).  The
 * attention-only form is the smallest model where induction heads are
 * known to form; the pre-norm form is GPT-2's block. */
typedef struct lab_model lab_model;

mha_status lab_model_create(const lab_config *config, lab_model **model);
void lab_model_free(lab_model *model);
const lab_config *lab_model_config(const lab_model *model);
mha_layer *lab_model_layer(lab_model *model, int64_t l);

/* Mean next-token cross-entropy over tokens [B, T] (targets: the next
 * token; the last position has none).  With `backward`, also adds the
 * gradients of every parameter (zeroed first).  attn, if not NULL, gets
 * each layer's per-head attention [layers][B][H][T][T]. */
mha_status lab_model_loss(mha_ctx *ctx, lab_model *model, const int32_t *tokens, int64_t B, int backward, float *attn,
                          double *loss);

/* One AdamW step (lr, betas 0.9 / 0.98, eps 1e-8, decoupled weight decay
 * `wd` on the matrices, none on embeddings of positions) from the
 * gradients of the last lab_model_loss(backward = 1). */
mha_status lab_model_adamw(lab_model *model, double lr, double wd);

/* The trainable arrays (embeddings, unembedding, every layer's
 * parameters), for checks and checkpoints: array i's values, its gradient
 * and its size; after writing values, lab_model_params_changed(). */
int lab_model_param_count(const lab_model *model);
float *lab_model_param(lab_model *model, int i, float **grad, int64_t *n);
mha_status lab_model_params_changed(lab_model *model);

/* Head pruning (Michel et al., 2019): the importance of head h of layer l
 * is the mean over batches of |dL/dxi|, xi a gate on the head's output
 * at 1; since the head feeds W_o's columns h d .. (h+1) d - 1, that is
 * |sum W_o * dW_o| over those columns.  importance[l * heads + h]. */
mha_status lab_head_importance(mha_ctx *ctx, lab_model *model, const int32_t *tokens, int64_t B, int64_t batches,
                               double *importance);
/* Removes the heads whose keep[l * heads + h] is 0 (their W_o columns set
 * to 0; the rest restored to the trained values). */
mha_status lab_model_keep_heads(lab_model *model, const uint8_t *keep);

/* Checkpoints: every trainable array, the AdamW moments and the step, as
 * safetensors (the config in the metadata).  load creates the model. */
mha_status lab_model_save(const lab_model *model, const char *path);
mha_status lab_model_load(const char *path, lab_model **model);
int64_t lab_model_steps(const lab_model *model);

/* ---- errors and shared pieces ----------------------------------------- */

/* The lab's failures carry a sentence, as the library's do: lab_fail
 * keeps it (per thread) and returns status; lab_fail_mha prefixes the
 * library's own sentence with what the lab was doing. */
mha_status lab_fail(mha_status status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
mha_status lab_fail_mha(mha_status status, const char *what);
const char *lab_last_error(void);

/* y = (x - mean) / sqrt(var + eps) * g + b over rows of E; the statistics
 * into mean and rstd when they are not NULL. */
void lab_layer_norm(const float *x, const float *g, const float *b, int64_t rows, int64_t E, double eps, float *y,
                    float *mean, float *rstd);

/* ---- data --------------------------------------------------------- */

/* Repeated random spans: each sequence of T random tokens holds a span of
 * random length (T/4 .. T/2) at a random place, repeated right after
 * itself, so inside the repeat the next token can be copied from after
 * the current token's earlier occurrence: the task where two-layer models
 * grow induction heads.  Deterministic in *state. */
void lab_repeated_spans(int32_t *tokens, int64_t B, int64_t T, int64_t vocab, uint64_t *state);

/* Character-level text: every byte of a file, as a token (bytes >= vocab
 * become vocab - 1), read once; batches are windows of T characters from
 * random places.  Any text will do; the default is a document every
 * Debian system ships (/usr/share/common-licenses/GPL-3). */
typedef struct lab_text {
    int32_t *chars;
    int64_t n;
} lab_text;

/* The longest repeat in one sequence: the largest p >= 2 with
 * seq[s + p .. s + 2p) == seq[s .. s + p) for some s; *start = s + p (where
 * the copy begins) and *len = p, or both -1 when there is none.  For the
 * repeated-span data, the span that was planted (or a longer one that
 * happens to contain it). */
void lab_find_repeat(const int32_t *seq, int64_t T, int64_t *start, int64_t *len);

mha_status lab_text_load(const char *path, int64_t vocab, lab_text *text);
void lab_text_free(lab_text *text);
void lab_text_windows(const lab_text *text, int32_t *tokens, int64_t B, int64_t T, uint64_t *state);

/* ---- head scores -------------------------------------------------- */

/* Scores of one head from its attention a [B][T][T] (rows sum to 1) over
 * the sequences tokens [B][T]; formulas in docs/HEADS.md. */
typedef struct lab_head_scores {
    double previous_token; /* mean attention from i to i - 1 */
    double induction;      /* from a repeated token to the token after its earlier copy */
    double duplicate;      /* from a repeated token to its earlier copy */
    double first_token;    /* mean attention to position 0 (the sink) */
    double distance;       /* mean |i - j| weighted by attention */
    double entropy;        /* mean entropy of a row, in nats */
} lab_head_scores;

void lab_head_scores_compute(const float *a, const int32_t *tokens, int64_t B, int64_t T, lab_head_scores *s);

/* The role a head's scores single out, or "mixed": thresholds in
 * docs/HEADS.md. */
const char *lab_head_role(const lab_head_scores *s);

/* ---- experiments (experiments.c): what `mha lab` runs -------------- */

/* A run's settings: the model, its data and the optimiser's. */
typedef struct lab_run {
    lab_config model;
    const lab_text *text; /* NULL: repeated random spans */
    int64_t steps, batch; /* train up to `steps` steps of `batch` sequences */
    double lr, wd;        /* AdamW */
} lab_run;

/* Held-out sequences per evaluation, and batches of them for importance. */
enum { LAB_EVAL_B = 32, LAB_PRUNE_BATCHES = 4 };

/* B sequences of the run's data from the stream *state, and the held-out
 * ones (a stream no training step uses). */
void lab_sequences(const lab_run *run, const lab_config *c, int64_t B, int32_t *tokens, uint64_t *state);
void lab_held_out(const lab_run *run, const lab_config *c, int64_t B, int32_t *tokens);

/* Called after each training step; non-zero stops the training. */
typedef int (*lab_step_fn)(void *arg, int64_t step, int64_t total, double loss);

/* Trains the model from its own step count up to run->steps, each step on
 * a batch of its own stream (so a resumed run sees the same data);
 * curve[step - 1] gets each step's loss when not NULL.  *stopped says
 * whether on_step stopped it. */
mha_status lab_train(mha_ctx *ctx, lab_model *model, const lab_run *run, double *curve, lab_step_fn on_step, void *arg,
                     bool *stopped);

/* The scores of every head on LAB_EVAL_B held-out sequences: tokens gets
 * them [LAB_EVAL_B, T], attn the maps [layers][LAB_EVAL_B][heads][T][T],
 * scores [layers * heads], loss the held-out loss. */
mha_status lab_analyze(mha_ctx *ctx, lab_model *model, const lab_run *run, int32_t *tokens, float *attn,
                       lab_head_scores *scores, double *loss);

/* Each head's importance (lab_head_importance) on LAB_PRUNE_BATCHES
 * held-out batches of their own, [layers * heads]. */
mha_status lab_importance(mha_ctx *ctx, lab_model *model, const lab_run *run, double *importance);

/* Pruning: each head's importance (on held-out batches of their own), and
 * the loss on eval_tokens with k = 0 .. n heads removed, least important
 * first and in a seeded random order ([n + 1] each). */
typedef struct lab_pruning {
    double *importance, *by_importance, *by_random;
} lab_pruning;
mha_status lab_prune(mha_ctx *ctx, lab_model *model, const lab_run *run, const int32_t *eval_tokens, lab_pruning *p);

/* Grouped-query attention: the kv-head counts to compare (h, h/2, h/4, 1,
 * each once), the KV cache bytes per token with kv heads, and the held-out
 * loss of the run's model trained afresh with them (on_step as in
 * lab_train; NaN when it stopped the training). */
typedef struct lab_gqa {
    int64_t n, kv[4], bytes[4];
    double loss[4];
} lab_gqa;
int lab_gqa_candidates(int64_t heads, int64_t kv[4]);
int64_t lab_kv_bytes(const lab_config *c, int64_t kv_heads);
mha_status lab_gqa_loss(mha_ctx *ctx, const lab_run *run, int64_t kv_heads, lab_step_fn on_step, void *arg,
                        double *loss);

/* The plain-text summary of a run (snprintf's return), and the head table. */
int lab_summary(char *out, size_t size, const lab_model *model, const lab_run *run, double held,
                const lab_head_scores *scores, const lab_pruning *p, const lab_gqa *gqa);
void lab_print_heads(const lab_config *c, const lab_head_scores *scores, const double *importance, FILE *f);

/* ---- a pretrained encoder (wordpiece.c, encoder.c) ------------------- */

/* A BERT vocabulary (vocab.txt: one token per line, its id the line). */
typedef struct lab_vocab lab_vocab;
mha_status lab_vocab_load(const char *path, lab_vocab **vocab);
void lab_vocab_free(lab_vocab *vocab);
int64_t lab_vocab_size(const lab_vocab *vocab);
int32_t lab_vocab_id(const lab_vocab *vocab, const char *token); /* -1 if absent */
const char *lab_vocab_token(const lab_vocab *vocab, int32_t id);

/* BERT's uncased tokenizer: [CLS], the WordPiece pieces of text's words,
 * [SEP], at most capacity tokens (a longer text is cut before [SEP], as the
 * reference truncates).  word_of[i] is the word token i comes from (-1 for
 * [CLS] and [SEP]); word_text, if not NULL, gets each word as the model
 * sees it (lower case, no accents; at most capacity words); *words their
 * count.  Returns the token count, or -1 if capacity < 2. */
enum { LAB_WORD_BYTES = 48 };
int64_t lab_tokenize(const lab_vocab *vocab, const char *text, int64_t capacity, int32_t *ids, int32_t *word_of,
                     char (*word_text)[LAB_WORD_BYTES], int64_t *words);

typedef struct lab_encoder_config {
    int64_t vocab, max_positions, embed_dim, heads, layers, ffn;
    double eps; /* the layer norms' */
} lab_encoder_config;

/* A BERT-style encoder from a folder with model.safetensors (Hugging
 * Face's BertModel names) and config.json (the head count, the layer norm
 * epsilon): its attention blocks are libmha layers. */
typedef struct lab_encoder lab_encoder;
mha_status lab_encoder_load(const char *dir, lab_encoder **encoder);
void lab_encoder_free(lab_encoder *encoder);
const lab_encoder_config *lab_encoder_config_of(const lab_encoder *encoder);

/* The last hidden states [B, T, E] (hidden, if not NULL) of B sentences
 * of token ids [B, T], sentence b's tokens being the first lengths[b] (the
 * rest padding, masked as keys); each block's attention [layers][B][heads]
 * [T][T] into attn if not NULL. */
mha_status lab_encoder_forward(mha_ctx *ctx, lab_encoder *encoder, const int32_t *ids, const int64_t *lengths,
                               int64_t B, int64_t T, float *hidden, float *attn);

/* The same, keeping every block's input: states [L + 1][B * T * E] holds
 * block l's input at l and the last hidden states at L.  Recomputes blocks
 * first .. L-1 from states[first], which the caller keeps from an earlier
 * call (what pruning a head of block `first` leaves unchanged); first = -1
 * starts from the embeddings. */
mha_status lab_encoder_forward_from(mha_ctx *ctx, lab_encoder *encoder, const int32_t *ids, const int64_t *lengths,
                                    int64_t B, int64_t T, int64_t first, float *states);

/* Sentence embeddings [B, E]: the mean of each sentence's real tokens'
 * states, normalised to length 1. */
void lab_encoder_pool(const float *hidden, const int64_t *lengths, int64_t B, int64_t T, int64_t E, float *embeddings);

/* Keeps the heads whose keep[l * heads + h] is non-zero and removes the
 * rest (their columns of the output projection zeroed; the others as
 * trained). */
mha_status lab_encoder_keep_heads(lab_encoder *encoder, const uint8_t *keep);

/* ---- the pretrained model's heads on real text (corpus.c, text_heads.c,
 *      text_prune.c) --------------------------------------------------- */

enum {
    LAB_MAX_TOKENS = 64,   /* per sentence of the corpus */
    LAB_MAX_PAIRS = 16,    /* labelled pairs per sentence */
    LAB_PAIR_KINDS = 5,    /* det, subj, obj, pobj, coref */
    LAB_RELATIONS = 6,     /* the directions scored (lab_relation_name) */
    LAB_MAX_OFFSET = 8,    /* the position-only baseline's offsets, -8 .. 8 */
    LAB_RANDOM_ORDERS = 3, /* random pruning orders averaged */
};
#define LAB_QUALITY_LOSS 0.01 /* "can go": quality stays within 1% */

/* A sentence as the model sees it: token ids ([CLS] .. [SEP]), each
 * token's word, the words. */
typedef struct lab_sentence {
    const char *text;
    int64_t length, n_words;
    int32_t ids[LAB_MAX_TOKENS], word_of[LAB_MAX_TOKENS];
    char words[LAB_MAX_TOKENS][LAB_WORD_BYTES];
} lab_sentence;

/* A labelled pair of words of one sentence: kind 0 .. LAB_PAIR_KINDS-1. */
typedef struct lab_pair {
    int kind;
    int64_t sentence, from, to;
} lab_pair;

/* The sentences written for this project and their pairs (corpus.c). */
typedef struct lab_corpus {
    lab_sentence *sentences;
    int64_t n;
    lab_pair *pairs;
    int64_t n_pairs;
} lab_corpus;

int64_t lab_corpus_size(void);
const char *lab_corpus_text(int64_t i);
const char *lab_pair_kind_name(int kind);
mha_status lab_corpus_load(const lab_vocab *vocab, lab_corpus *corpus);
void lab_corpus_free(lab_corpus *corpus);
/* One sentence and its pairs ("kind from>to; ..." as corpus.c writes
 * them, or NULL): at most capacity pairs into out. */
mha_status lab_sentence_make(const lab_vocab *vocab, const char *text, const char *pairs, int64_t index,
                             lab_sentence *sentence, lab_pair *out, int64_t capacity, int64_t *n_pairs);

/* The corpus as one padded batch (token ids [B, T], lengths [B]). */
typedef struct lab_batch {
    int32_t *ids;
    int64_t *lengths;
    int64_t B, T;
} lab_batch;
mha_status lab_batch_make(const lab_corpus *corpus, lab_batch *batch);
void lab_batch_free(lab_batch *batch);

/* Attention of a batch as lab_encoder_forward writes it: [L][B][H][T][T]. */
typedef struct lab_attention {
    const float *attn;
    int64_t L, B, H, T;
} lab_attention;

/* One head's scores on real text, means over every real token's row
 * (formulas in docs/HEADS.md). */
typedef struct lab_text_scores {
    double previous, next, self; /* attention to i - 1, i + 1, i */
    double cls, sep, punct;      /* to [CLS], to [SEP], to punctuation */
    double same_word;            /* a word's piece to its other pieces */
    double entropy, distance;    /* entropy / log(length); mean |i - j| */
} lab_text_scores;

void lab_text_scores_head(const lab_attention *attn, const lab_sentence *sentences, int64_t l, int64_t h,
                          lab_text_scores *scores);
/* The role the scores single out (thresholds in docs/HEADS.md). */
const char *lab_text_role(const lab_text_scores *scores);

/* Relation r's name ("determiner -> noun", ...); each head's accuracy
 * [LAB_RELATIONS][L * H]: how often the word it attends to most from a
 * pair's first word is the pair's second; the best fixed offset's accuracy
 * (the position-only baseline); the relation's pair count. */
const char *lab_relation_name(int r);
void lab_relation_accuracy(const lab_attention *attn, const lab_corpus *corpus, double *accuracy);
void lab_relation_baseline(const lab_corpus *corpus, int r, double *accuracy, int *offset);
int64_t lab_relation_pairs(const lab_corpus *corpus, int r);

/* The cosine similarity of every pair i < j of n unit embeddings [n, E]
 * (pair (i, j) in row order), and the Pearson correlation of two series:
 * the pieces of pruning's quality. */
void lab_similarities(const float *embeddings, int64_t n, int64_t E, double *sim);
double lab_pearson(const double *a, const double *b, int64_t n);

/* Pruning (text_prune.c): importance [L * H] (quality lost with the head
 * alone removed), the quality with k = 0 .. L * H heads removed least
 * important first and in random orders (mean of LAB_RANDOM_ORDERS)
 * [L * H + 1], the importance order [L * H], and how many heads go before
 * quality falls below 1 - LAB_QUALITY_LOSS.  The encoder is left whole. */
typedef struct lab_text_pruning {
    double *importance, *by_importance, *by_random;
    int64_t *order;
    int64_t removable;
    /* Called after each model measured (NULL: not called). */
    void (*progress)(void *arg, int64_t done, int64_t total);
    void *progress_arg;
} lab_text_pruning;
mha_status lab_text_prune(mha_ctx *ctx, lab_encoder *encoder, const lab_batch *batch, lab_text_pruning *pruning);

/* The pretrained model's report (report_text.c): what a run found. */
typedef struct lab_text_report {
    const char *model_name; /* the model and the package it came from */
    lab_encoder_config config;
    const lab_vocab *vocab;
    const lab_corpus *corpus;
    const lab_attention *attn;       /* the corpus's batch */
    const lab_text_scores *scores;   /* [L * H] */
    const double *relation_accuracy; /* [LAB_RELATIONS][L * H] */
    double baseline[LAB_RELATIONS];
    int baseline_offset[LAB_RELATIONS];
    const lab_text_pruning *pruning;
    const int64_t *samples; /* sentences whose maps are drawn */
    int64_t n_samples;
    const char *summary;
} lab_text_report;

/* The self-contained HTML report; 0 or -1.  The plain-text summary
 * (snprintf's return). */
int lab_text_report_write(const char *path, const lab_text_report *report);
int lab_text_summary(char *out, size_t size, const lab_text_report *report);

/* ---- the reports' pieces (chart.c) --------------------------------- */

/* A line chart of one or two series as inline SVG (class "chart", 640 x
 * 300, axes, ticks, titles, a legend above the plot); point i is at
 * x0 + i. */
typedef struct lab_chart {
    const double *y[2]; /* y[1] may be NULL */
    const char *name[2];
    int64_t n;
    double x0;
    const char *xtitle, *ytitle, *label; /* label: what the chart shows, for screen readers */
} lab_chart;
void lab_svg_chart(FILE *f, const lab_chart *chart);

/* The maps' colour scale, weight 0 .. 1 with ticks, as inline SVG. */
void lab_colour_scale_svg(FILE *f);

/* The reports' CSS. */
extern const char *const lab_report_style;

/* ---- the report --------------------------------------------------- */

typedef struct lab_report {
    lab_config config;
    const char *summary; /* the plain-text summary */
    const double *curve; /* training loss per step */
    int64_t curve_len;
    const lab_head_scores *scores; /* [layers * heads] */
    const double *importance;      /* [layers * heads] or NULL */
    const int32_t *sample;         /* one held-out sequence */
    int64_t sample_len;
    const float *maps;                            /* its attention [layers][heads][T][T] */
    const double *prune_important, *prune_random; /* loss with k heads removed, k = 0 .. prune_len - 1 */
    int64_t prune_len;
    const int64_t *gqa_kv_heads, *gqa_kv_bytes;
    const double *gqa_loss;
    int64_t gqa_len;
    int64_t steps, gqa_steps;         /* the main model's training steps; each GQA model's */
    int64_t repeat_start, repeat_len; /* the sample's repeat (lab_find_repeat), or -1 */
    int text;                         /* tokens are characters: show them as such */
} lab_report;

/* The self-contained HTML report (no network: inline style, SVG, script);
 * 0 or -1. */
int lab_report_write(const char *path, const lab_report *report);

/* One head's map as a PNG that explains itself (picture.c): the title,
 * axes with ticks and titles, the colour scale, and dashed lines where the
 * repeat starts.  Each cell is cell x cell pixels; 0 or -1. */
typedef struct lab_map_picture {
    const float *map; /* [rows, cols] weights in [0, 1] */
    int64_t rows, cols;
    const char *title;    /* e.g. "layer 0, head 3: previous-token" */
    int64_t repeat_start; /* position where the repeated span starts; -1: none */
} lab_map_picture;

int lab_map_png(const char *path, const lab_map_picture *picture, int64_t cell);

/* The colour of attention weight w in [0, 1], from white to dark blue on a
 * square-root scale so small weights stay visible: the PNGs' and the
 * report's (whose script computes the same in JavaScript). */
void lab_weight_colour(float w, unsigned char rgb[3]);

/* The weights the colour scale marks (PNGs and report alike), placed at
 * sqrt(weight) along it. */
enum { LAB_SCALE_TICKS = 5 };
extern const double lab_scale_ticks[LAB_SCALE_TICKS];

#endif /* MHA_LAB_H */
