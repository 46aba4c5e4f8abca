/*
 * sequence.h -- what the modes share: pieces of 4-D tensors (a rank-3
 * view is one with shape[3] = 1) copied to, from and added to contiguous
 * blocks, and partial softmaxes merged (every mode); the checks of a
 * sequence-parallel call's arguments and the fields ranks compare
 * (ulysses.c, ring.c).
 */
#ifndef MHA_MPI_SEQUENCE_H
#define MHA_MPI_SEQUENCE_H

#include <stdbool.h>

#include "mha.h"
#include "mpi/collective.h"

/* A view of heads [h0, h0 + hn) and rows [r0, r0 + rn) of t. */
mha_tensor mha__mpi_piece(const mha_tensor *t, int64_t h0, int64_t hn, int64_t r0, int64_t rn);
/* Elements of a 4-D view. */
int64_t mha__mpi_numel(const mha_tensor *t);
/* Copies a view to a contiguous block (out = true) or back. */
void mha__mpi_copy_piece(const mha_tensor *p, float *block, bool out);

/* Merges a part of each of n rows' softmax into what is merged so far:
 * the outputs o and po [n, width] are normalised, m and pm the rows'
 * largest scores, s and ps their sums of e^(score - max) (a part with
 * ps = 0 saw no key of its row and changes nothing; start with m = -inf,
 * s = 0).  docs/NUMERICS.md gives the formula and its roundings. */
void mha__mpi_merge_rows(float *o, float *m, float *s, const float *po, const float *pm, const float *ps, int64_t n,
                         int64_t width);

/* p += block (p's shape, contiguous). */
void mha__mpi_add_piece(const mha_tensor *p, const float *block);

/* The fields of a sequence-parallel call every rank must agree on (the
 * heads, widths and options; at most 24); returns how many. */
int mha__mpi_seq_describe(const mha_tensor *q, const mha_tensor *k, const mha_tensor *v, const mha_attn_desc *d,
                          bool lse, mha__mpi_field *f);
/* This rank's own arguments: shapes that fit together locally. */
mha_status mha__mpi_seq_check(const mha_tensor *q, const mha_tensor *k, const mha_tensor *v, const mha_tensor *out,
                              const mha_attn_desc *d);
/* The backward's own arguments beside the forward's. */
mha_status mha__mpi_seq_check_backward(const mha_tensor *dq, const mha_tensor *dk, const mha_tensor *dv,
                                       const mha_tensor *q, const mha_tensor *k, const mha_tensor *v,
                                       const mha_tensor *out, const float *lse, const mha_tensor *grad_out);

#endif /* MHA_MPI_SEQUENCE_H */
