/*
 * mpi_harness.h -- what the MPI suites share beside harness.h: this
 * process's rank and the rank count, one random stream every rank draws
 * alike (so all hold the same whole problem), and an ending that fails
 * the job when any rank failed.
 */
#ifndef MHA_TEST_MPI_HARNESS_H
#define MHA_TEST_MPI_HARNESS_H

#include <mpi.h>
#include <stdint.h>

#include "harness.h"

static int rank, size;

static uint64_t mpi_rng = 0x9E3779B97F4A7C15ull;

/* Uniform in [-1, 1), the same sequence on every rank. */
static inline double mpi_uniform(void)
{
    mpi_rng ^= mpi_rng << 13;
    mpi_rng ^= mpi_rng >> 7;
    mpi_rng ^= mpi_rng << 17;
    return (double)(mpi_rng >> 11) / 9007199254740992.0 * 2.0 - 1.0;
}

static inline void mpi_begin(int *argc, char ***argv)
{
    MPI_Init(argc, argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
}

/* Ends main(): each rank's summary line, and a non-zero exit on every
 * rank when any rank failed a check. */
static inline int mpi_finish(const char *suite)
{
    int mine = harness_failures, all = 0;
    MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    char name[96];
    snprintf(name, sizeof name, "%s rank %d of %d", suite, rank, size);
    int rc = harness_finish(name);
    MPI_Finalize();
    return rc || all;
}

#endif /* MHA_TEST_MPI_HARNESS_H */
