/*
 * collective.h -- the collectives libmha_mpi's modes are built from:
 * agreeing on a status, checking that ranks describe the same call, and a
 * sum across ranks whose bits depend only on the rank count.
 */
#ifndef MHA_MPI_COLLECTIVE_H
#define MHA_MPI_COLLECTIVE_H

#include <mpi.h>
#include <stdint.h>

#include "mha.h"

/* Every rank passes its own status; every rank returns the status of the
 * lowest-numbered rank that failed (MHA_OK when none did), with that
 * rank's sentence in mha_last_error(): "rank r of P: <sentence>". */
mha_status mha__mpi_agree(MPI_Comm comm, mha_status local);

/* One field of a call's description, compared between ranks. */
typedef struct mha__mpi_field {
    const char *name;
    int64_t value;
} mha__mpi_field;

/* Checks that every rank's n fields equal rank 0's (n and the names the
 * same everywhere); on the first that differs every rank fails with
 * INVALID_ARG naming the rank, the field and both values.  Agrees on
 * `local` first, so a rank that already failed is reported instead. */
mha_status mha__mpi_same(MPI_Comm comm, mha_status local, const mha__mpi_field *fields, int n);

/* x[0 .. n) = the sum over ranks of every rank's x, on every rank, each
 * element added in rank order (((x_0 + x_1) + x_2) ...): the same bits
 * from run to run, whatever algorithms MPI picks.  Each rank sums one
 * slice of n / P elements (a reduce-scatter by all-to-all), then the
 * slices are shared (all-gather): 2 (P - 1) / P n floats sent a rank.
 * Not agreed: call it where every rank is known to have succeeded.
 * Its scratch is ctx's kept slot 1 (mha__kept), so the caller may hold
 * slot 0.
 * Errors: NOMEM (then every rank fails: the scratch is agreed on first). */
mha_status mha__mpi_sum(mha_ctx *ctx, MPI_Comm comm, float *x, int64_t n);

/* The fields of a layer's description every rank must agree on (at most
 * 24); returns how many. */
int mha__mpi_describe_layer(const mha_layer_desc *d, mha__mpi_field *f);

/* The heads rank r of P holds when h query heads reading g kv heads are
 * split by whole kv groups: kv heads [g r / P, g (r + 1) / P) (as even
 * as whole groups allow) and the query heads that read them. */
void mha__mpi_heads_of(int64_t h, int64_t g, int size, int r, int64_t *first_head, int64_t *num_heads,
                       int64_t *first_kv, int64_t *num_kv);

/* The transfer clock behind mha_mpi_transfer_seconds: each data-moving
 * MPI call is bracketed as  t = mha__mpi_clock(); MPI_...; mha__mpi_waited(t); */
double mha__mpi_clock(void);
void mha__mpi_waited(double since);

/* Gathers every rank's block into all[]: rank r's count[r] floats land at
 * all + offset[r] (the blocks in rank order, as MPI_Allgatherv, in pieces
 * of at most INT_MAX). */
void mha__mpi_gather(MPI_Comm comm, const float *mine, float *all, const int64_t *count, const int64_t *offset);

#endif /* MHA_MPI_COLLECTIVE_H */
