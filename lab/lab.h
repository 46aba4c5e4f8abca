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

#include <stdint.h>

/* ---- the model ---------------------------------------------------- */

typedef struct lab_config {
    int64_t vocab;       /* tokens 0 .. vocab-1 */
    int64_t context;     /* T: positions */
    int64_t embed_dim;   /* E */
    int64_t layers;
    int64_t heads;       /* per layer */
    int64_t kv_heads;    /* 0 = heads (GQA when fewer) */
    uint64_t seed;       /* initial weights */
} lab_config;

/* x_0 = tok_emb[token] + pos_emb[t]; x_{l+1} = x_l + MHA_l(x_l), causal;
 * logits = x_L W_U^T.  Attention-only, as in the smallest models where
 * induction heads are known to form. */
typedef struct lab_model lab_model;

mha_status lab_model_create(const lab_config *config, lab_model **model);
void       lab_model_free(lab_model *model);
const lab_config *lab_model_config(const lab_model *model);
mha_layer *lab_model_layer(lab_model *model, int64_t l);

/* Mean next-token cross-entropy over tokens [B, T] (targets: the next
 * token; the last position has none).  With `backward`, also adds the
 * gradients of every parameter (zeroed first).  attn, if not NULL, gets
 * each layer's per-head attention [layers][B][H][T][T]. */
mha_status lab_model_loss(mha_ctx *ctx, lab_model *model, const int32_t *tokens, int64_t B, int backward,
                          float *attn, double *loss);

/* One AdamW step (lr, betas 0.9 / 0.98, eps 1e-8, decoupled weight decay
 * `wd` on the matrices, none on embeddings of positions) from the
 * gradients of the last lab_model_loss(backward = 1). */
mha_status lab_model_adamw(lab_model *model, double lr, double wd);

/* The trainable arrays (embeddings, unembedding, every layer's
 * parameters), for checks and checkpoints: array i's values, its gradient
 * and its size; after writing values, lab_model_params_changed(). */
int        lab_model_param_count(const lab_model *model);
float     *lab_model_param(lab_model *model, int i, float **grad, int64_t *n);
mha_status lab_model_params_changed(lab_model *model);

/* ---- data --------------------------------------------------------- */

/* Repeated random spans: each sequence of T random tokens holds a span of
 * random length (T/4 .. T/2) at a random place, repeated right after
 * itself, so inside the repeat the next token can be copied from after
 * the current token's earlier occurrence: the task where two-layer models
 * grow induction heads.  Deterministic in *state. */
void lab_repeated_spans(int32_t *tokens, int64_t B, int64_t T, int64_t vocab, uint64_t *state);

/* ---- head scores -------------------------------------------------- */

/* Scores of one head from its attention a [B][T][T] (rows sum to 1) over
 * the sequences tokens [B][T]; formulas in docs/HEADS.md. */
typedef struct lab_head_scores {
    double previous_token;  /* mean attention from i to i - 1 */
    double induction;       /* from a repeated token to the token after its earlier copy */
    double duplicate;       /* from a repeated token to its earlier copy */
    double first_token;     /* mean attention to position 0 (the sink) */
    double distance;        /* mean |i - j| weighted by attention */
    double entropy;         /* mean entropy of a row, in nats */
} lab_head_scores;

void lab_head_scores_compute(const float *a, const int32_t *tokens, int64_t B, int64_t T, lab_head_scores *s);

/* The role a head's scores single out, or "mixed": thresholds in
 * docs/HEADS.md. */
const char *lab_head_role(const lab_head_scores *s);

#endif /* MHA_LAB_H */
