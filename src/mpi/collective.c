/*
 * collective.c -- status agreement, call checks and the ordered sum
 * (collective.h).
 */
#include "mpi/collective.h"

#include <stdio.h>
#include <string.h>

#include "core/internal.h"
#include "core/parallel.h"

mha_status mha__mpi_agree(MPI_Comm comm, mha_status local)
{
    int rank, size, mine, first;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    mine = local == MHA_OK ? size : rank;
    MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm);
    if (first == size) return MHA_OK;
    struct {
        int status;
        char sentence[400];
    } why = {0, {0}};
    if (rank == first) {
        why.status = (int)local;
        snprintf(why.sentence, sizeof why.sentence, "%s", mha_last_error());
    }
    MPI_Bcast(&why, (int)sizeof why, MPI_BYTE, first, comm);
    return mha__fail((mha_status)why.status, "rank %d of %d: %s", first, size, why.sentence);
}

mha_status mha__mpi_same(MPI_Comm comm, mha_status local, const mha__mpi_field *fields, int n)
{
    mha_status st = mha__mpi_agree(comm, local);
    if (st != MHA_OK) return st;
    int64_t theirs[64];
    if (n > 64) return mha__fail(MHA_ERR_INTERNAL, "mha__mpi_same: %d fields, at most 64", n);
    for (int i = 0; i < n; i++) theirs[i] = fields[i].value;
    MPI_Bcast(theirs, n, MPI_INT64_T, 0, comm);
    for (int i = 0; i < n; i++)
        if (theirs[i] != fields[i].value)
            return mha__mpi_agree(comm, mha__fail(MHA_ERR_INVALID_ARG, "%s is %lld here but %lld on rank 0",
                                                  fields[i].name, (long long)fields[i].value, (long long)theirs[i]));
    return mha__mpi_agree(comm, MHA_OK);
}

/* Seconds spent in data transfers since mha_mpi_transfer_seconds last
 * read them (one process calls libmha_mpi from one thread). */
static double transfer_seconds;

double mha__mpi_clock(void) { return MPI_Wtime(); }

void mha__mpi_waited(double since) { transfer_seconds += MPI_Wtime() - since; }

double mha_mpi_transfer_seconds(void)
{
    double s = transfer_seconds;
    transfer_seconds = 0;
    return s;
}

/* Element i of slab [0, n) belongs to rank r when slice_start(n, P, r) <=
 * i < slice_start(n, P, r + 1). */
static int64_t slice_start(int64_t n, int size, int r) { return n * r / size; }

/* The ordered sum over one slab of at most P * 2^28 elements, scratch
 * holding n + P floats. */
static void sum_slab(MPI_Comm comm, float *x, int64_t n, float *scratch)
{
    int rank, size;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    int send_count[size], send_at[size], recv_count[size], recv_at[size];
    int64_t lo = slice_start(n, size, rank), mine = slice_start(n, size, rank + 1) - lo;
    for (int r = 0; r < size; r++) {
        send_at[r] = (int)slice_start(n, size, r);
        send_count[r] = (int)(slice_start(n, size, r + 1) - send_at[r]);
        recv_count[r] = (int)mine;
        recv_at[r] = (int)(r * mine);
    }
    /* Rank r receives every rank's copy of its slice, in rank order... */
    double t = mha__mpi_clock();
    MPI_Alltoallv(x, send_count, send_at, MPI_FLOAT, scratch, recv_count, recv_at, MPI_FLOAT, comm);
    mha__mpi_waited(t);
    /* ...adds them in that order... */
    for (int64_t i = 0; i < mine; i++) {
        float acc = scratch[i];
        for (int r = 1; r < size; r++) acc += scratch[r * mine + i];
        x[lo + i] = acc;
    }
    /* ...and every rank gets every slice. */
    t = mha__mpi_clock();
    MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_FLOAT, x, send_count, send_at, MPI_FLOAT, comm);
    mha__mpi_waited(t);
}

mha_status mha__mpi_sum(mha_ctx *ctx, MPI_Comm comm, float *x, int64_t n)
{
    int size;
    MPI_Comm_size(comm, &size);
    if (size == 1 || n <= 0) return MHA_OK;
    int64_t slab = (int64_t)size << 28; /* every count and offset fits an int */
    int64_t most = n < slab ? n : slab;
    float *scratch = mha__kept(ctx, 1, (most + size) * (int64_t)sizeof(float));
    mha_status st = mha__mpi_agree(comm, scratch ? MHA_OK : mha__fail(MHA_ERR_NOMEM, "the sum's scratch"));
    if (st == MHA_OK)
        for (int64_t at = 0; at < n; at += slab) sum_slab(comm, x + at, n - at < slab ? n - at : slab, scratch);
    return st;
}

void mha__mpi_heads_of(int64_t h, int64_t g, int size, int r, int64_t *first_head, int64_t *num_heads,
                       int64_t *first_kv, int64_t *num_kv)
{
    *first_kv = g * r / size;
    *num_kv = g * (r + 1) / size - *first_kv;
    *first_head = *first_kv * (h / g);
    *num_heads = *num_kv * (h / g);
}

void mha__mpi_gather(MPI_Comm comm, const float *mine, float *all, const int64_t *count, const int64_t *offset)
{
    int rank, size;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    if (all + offset[rank] != mine) memcpy(all + offset[rank], mine, (size_t)count[rank] * sizeof(float));
    const int64_t piece = INT64_C(1) << 30;
    double t = mha__mpi_clock();
    for (int r = 0; r < size; r++)
        for (int64_t at = 0; at < count[r]; at += piece) {
            int64_t len = count[r] - at < piece ? count[r] - at : piece;
            MPI_Bcast(all + offset[r] + at, (int)len, MPI_FLOAT, r, comm);
        }
    mha__mpi_waited(t);
}

/* The fields of a layer's description every rank must agree on. */
int mha__mpi_describe_layer(const mha_layer_desc *d, mha__mpi_field *f)
{
    int64_t theta;
    memcpy(&theta, &d->rope.theta, sizeof theta);
    const mha__mpi_field fields[] = {
        {"embed_dim", d->embed_dim},
        {"num_heads", d->num_heads},
        {"num_kv_heads", d->num_kv_heads},
        {"head_dim", d->head_dim},
        {"kdim", d->kdim},
        {"vdim", d->vdim},
        {"bias", d->bias},
        {"out_bias", d->out_bias},
        {"add_bias_kv", d->add_bias_kv},
        {"add_zero_attn", d->add_zero_attn},
        {"dtype", d->dtype},
        {"rope kind", d->rope.kind},
        {"rope theta (bits)", theta},
        {"rope dim", d->rope.dim},
        {"window_left", d->window_left},
        {"window_right", d->window_right},
        {"ALiBi", !!d->alibi_slopes},
        {"softcap (x 1e6)", (int64_t)(d->softcap * 1e6f)},
    };
    memcpy(f, fields, sizeof fields);
    return (int)(sizeof fields / sizeof fields[0]);
}
