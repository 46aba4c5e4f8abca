/*
 * reference.h -- the naive reference implementation, in float64 (the
 * oracle) and float32 (the "plain float32 implementation" that the
 * tolerance rule measures against).  Not part of the public API; used by
 * tests.  Every tensor is contiguous row-major.
 */
#ifndef MHA_REFERENCE_H
#define MHA_REFERENCE_H

#include "mha.h"

#include <stdint.h>

/* One attention problem.  Masks are dense over [B, Hq, L, S] (NULL =
 * none): keep (non-zero = may attend) and add (added to the score). */
typedef struct mha_ref_sdpa {
    int64_t B, Hq, Hkv, L, S, D, Dv;
    double scale, softcap; /* softcap 0 = off */
    mha_causal causal;
    int64_t window_left, window_right;
    const double *alibi; /* [Hq] or NULL */
    const uint8_t *keep;
    const double *add;
} mha_ref_sdpa;

/* out [B,Hq,L,Dv]; lse [B,Hq,L] and probs [B,Hq,L,S] may be NULL. */
void mha_ref_sdpa_f64(const mha_ref_sdpa *a, const double *q, const double *k, const double *v, double *out,
                      double *lse, double *probs);
void mha_ref_sdpa_f32(const mha_ref_sdpa *a, const float *q, const float *k, const float *v, float *out, float *lse,
                      float *probs);
/* float32, with the probabilities rounded to bf16 where they meet V. */
void mha_ref_sdpa_bf16(const mha_ref_sdpa *a, const float *q, const float *k, const float *v, float *out, float *lse,
                       float *probs);

/* Gradients of the same problem for dout [B,Hq,L,Dv]: dq, dk, dv
 * overwritten (contiguous, shapes as q, k, v). */
void mha_ref_sdpa_backward_f64(const mha_ref_sdpa *a, const double *q, const double *k, const double *v,
                               const double *dout, double *dq, double *dk, double *dv);
void mha_ref_sdpa_backward_f32(const mha_ref_sdpa *a, const float *q, const float *k, const float *v, const float *dout,
                               float *dq, float *dk, float *dv);

/* nn.MultiheadAttention, batch-first [N, L, E] inputs.  Weights as in the
 * state_dict: w_q [E,E], w_k [E,kdim], w_v [E,vdim], b_in [3E] or NULL,
 * w_out [E,E], b_out [E] or NULL, bias_k/bias_v [E] or NULL.  `add` is a
 * dense additive mask [N, h, L, S] over the real keys (or NULL); `causal`
 * is top-left over them.  probs [N, h, L, S'] may be NULL. */
typedef struct mha_ref_layer {
    int64_t N, L, S, E, H, kdim, vdim;
    int add_zero_attn, causal;
    const double *w_q, *w_k, *w_v, *b_in, *w_out, *b_out, *bias_k, *bias_v;
    const double *add;
    /* Beyond nn.MultiheadAttention (0 / NULL: as nn.MultiheadAttention):
     * G kv heads, head width hd (w_q [H hd, E], w_k/w_v [G hd, in],
     * w_out [E, H hd], b_in [H hd + 2 G hd]), rotary embedding from
     * `position`, and the SDPA options. */
    int64_t G, hd;
    int rope_kind; /* mha_rope_kind */
    double rope_theta;
    int64_t rope_dim, position;
    int64_t window_left, window_right; /* set both to -1 when unused */
    double softcap;
    const double *alibi;
} mha_ref_layer;

void mha_ref_layer_f64(const mha_ref_layer *a, const double *query, const double *key, const double *value, double *out,
                       double *probs);
/* The same in float32 (weights and mask rounded to float), and as a plain
 * bfloat16 model computes it (see reference_layer.h): the baselines of the
 * tolerance rule for the float32 and bf16 layers. */
void mha_ref_layer_bf16(const mha_ref_layer *a, const float *query, const float *key, const float *value, float *out,
                        float *probs);
void mha_ref_layer_f32(const mha_ref_layer *a, const float *query, const float *key, const float *value, float *out,
                       float *probs);

/* Gradients of the layer for dout [N, L, E], all in one array, in order:
 * query [N,L,E], key [N,S,kdim], value [N,S,vdim], w_q, w_k, w_v, w_out,
 * b_in, b_out [E], bias_k [E], bias_v [E] (shapes as in mha_ref_layer;
 * zero where the layer has no such parameter). */
int64_t mha_ref_layer_grads_size(const mha_ref_layer *a);
void mha_ref_layer_backward_f64(const mha_ref_layer *a, const double *query, const double *key, const double *value,
                                const double *dout, double *grads);
void mha_ref_layer_backward_f32(const mha_ref_layer *a, const float *query, const float *key, const float *value,
                                const float *dout, float *grads);

#endif /* MHA_REFERENCE_H */
