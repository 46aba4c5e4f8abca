/*
 * mpi_pingpong.c -- the interconnect figures docs/SCALING.md's model
 * takes: MPI latency and bandwidth between ranks 0 and 1.
 *
 *     mpirun -np 2 build/bench_mpi_pingpong [--repeat N]
 *
 * Rank 0 sends n bytes, rank 1 sends them back; half the round trip's
 * median is the one-way time.  Latency is that time for 8 bytes;
 * bandwidth, n / time for messages of 64 KB to 64 MB.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* The median one-way time of `repeat` round trips of n bytes. */
static double one_way(char *buf, int n, int rank, int repeat, double *times)
{
    for (int r = -2; r < repeat; r++) { /* two warm-up trips */
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = MPI_Wtime();
        if (rank == 0) {
            MPI_Send(buf, n, MPI_BYTE, 1, 0, MPI_COMM_WORLD);
            MPI_Recv(buf, n, MPI_BYTE, 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else if (rank == 1) {
            MPI_Recv(buf, n, MPI_BYTE, 0, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            MPI_Send(buf, n, MPI_BYTE, 0, 0, MPI_COMM_WORLD);
        }
        if (r >= 0) times[r] = (MPI_Wtime() - t0) / 2;
    }
    qsort(times, (size_t)repeat, sizeof *times, cmp_double);
    return times[repeat / 2];
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int rank, size, repeat = 50;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], "--repeat") == 0) repeat = atoi(argv[i + 1]);
    if (size < 2 || repeat < 1) {
        if (rank == 0) fprintf(stderr, "bench_mpi_pingpong: needs 2 ranks (mpirun -np 2) and --repeat >= 1\n");
        MPI_Finalize();
        return 2;
    }
    const int most = 64 << 20;
    char *buf = calloc((size_t)most, 1);
    double *times = malloc((size_t)repeat * sizeof(double));
    if (!buf || !times) MPI_Abort(MPI_COMM_WORLD, 1);
    double latency = one_way(buf, 8, rank, repeat, times);
    if (rank == 0) printf("{\"bytes\":8,\"one_way_us\":%.3f}\n", latency * 1e6);
    for (int n = 64 << 10; n <= most; n *= 4) {
        double t = one_way(buf, n, rank, repeat, times);
        if (rank == 0) printf("{\"bytes\":%d,\"one_way_us\":%.1f,\"gb_per_s\":%.2f}\n", n, t * 1e6, n / t / 1e9);
    }
    free(buf);
    free(times);
    MPI_Finalize();
    return 0;
}
