/*
 * ulysses.c -- sequence-parallel attention by all-to-all (DeepSpeed-
 * Ulysses, mha_mpi.h): each rank holds a block of the sequence for every
 * head; one all-to-all per tensor hands each rank whole sequences of its
 * heads instead, attention runs there as in one process, and one more
 * all-to-all brings the output back to the sequence blocks.
 *
 *   rank r:  q [B, H, L_r, D] --all-to-all--> [B, its heads, L, D]
 *            mha_attention over the whole sequence, its heads
 *            out [B, its heads, L, Dv] --all-to-all--> [B, H, L_r, Dv]
 *
 * Each head's attention is the single-process call's own computation on
 * the same numbers, so the results are the single-process bits.
 */
#include <limits.h>
#include <stdbool.h>
#include <string.h>

#include "core/internal.h"
#include "core/parallel.h"
#include "mha_mpi.h"
#include "mpi/collective.h"
#include "mpi/sequence.h"

/* Who holds what: per rank, its block of query rows and of keys (in rank
 * order along the sequence) and its heads (whole kv groups). */
typedef struct split {
    MPI_Comm comm;
    int rank, size;
    int64_t B, H, G, L, S;
    int64_t *q_at, *q_rows, *kv_at, *kv_rows;   /* [size] each */
    int64_t *h_first, *h_num, *g_first, *g_num; /* [size] each */
    int *counts;                                /* [4 size]: an all-to-all's counts and offsets, as MPI takes them */
    float *buffer;                              /* the all-to-alls' send and receive blocks (ctx's kept slot 1) */
    int64_t buffer_floats;
} split;

/* Which way an all-to-all goes: sequence blocks of every head to whole
 * sequences of some heads, or back. */
typedef enum direction { TO_HEADS, TO_ROWS } direction;

/* The piece of `t` that goes to (or comes from) rank `peer`: TO_HEADS
 * sends the peer's heads of this rank's rows and receives this rank's
 * heads of the peer's rows; TO_ROWS the other way round. */
static mha_tensor peer_piece(const split *s, const mha_tensor *t, direction dir, bool sending, bool kv, int peer)
{
    const int64_t *first = kv ? s->g_first : s->h_first, *num = kv ? s->g_num : s->h_num;
    const int64_t *at = kv ? s->kv_at : s->q_at, *rows = kv ? s->kv_rows : s->q_rows;
    bool heads_of_peer = (dir == TO_HEADS) == sending; /* else the peer's rows */
    if (heads_of_peer) return mha__mpi_piece(t, first[peer], num[peer], 0, t->shape[2]);
    return mha__mpi_piece(t, 0, t->shape[1], at[peer], rows[peer]);
}

/* The floats one exchange of `t` (this rank's side, `dir`) moves through
 * the buffer: what it sends plus what it receives. */
static int64_t exchange_size(const split *s, const mha_tensor *src, const mha_tensor *dst, direction dir, bool kv)
{
    int64_t n = 0;
    for (int r = 0; r < s->size; r++) {
        mha_tensor out = peer_piece(s, src, dir, true, kv, r), in = peer_piece(s, dst, dir, false, kv, r);
        n += mha__mpi_numel(&out) + mha__mpi_numel(&in);
    }
    return n;
}

/* src -> dst by one all-to-all (sizes checked by exchange_size's caller). */
static void exchange(const split *s, const mha_tensor *src, mha_tensor *dst, direction dir, bool kv)
{
    int P = s->size, *send_count = s->counts, *send_at = send_count + P, *recv_count = send_at + P;
    int *recv_at = recv_count + P;
    int64_t at = 0;
    for (int r = 0; r < P; r++) {
        mha_tensor out = peer_piece(s, src, dir, true, kv, r);
        mha__mpi_copy_piece(&out, s->buffer + at, true);
        send_at[r] = (int)at, send_count[r] = (int)mha__mpi_numel(&out), at += mha__mpi_numel(&out);
    }
    float *in = s->buffer + at;
    at = 0;
    for (int r = 0; r < P; r++) {
        mha_tensor from = peer_piece(s, dst, dir, false, kv, r);
        recv_at[r] = (int)at, recv_count[r] = (int)mha__mpi_numel(&from), at += mha__mpi_numel(&from);
    }
    double t = mha__mpi_clock();
    MPI_Alltoallv(s->buffer, send_count, send_at, MPI_FLOAT, in, recv_count, recv_at, MPI_FLOAT, s->comm);
    mha__mpi_waited(t);
    for (int r = 0; r < P; r++) {
        mha_tensor from = peer_piece(s, dst, dir, false, kv, r);
        mha__mpi_copy_piece(&from, in + recv_at[r], false);
    }
}

/* ------------------------------------------------------------------ */
/* Who holds what, agreed                                              */
/* ------------------------------------------------------------------ */

static void split_free(split *s)
{
    mha__free(s->q_at);
    mha__free(s->counts);
}

/* Gathers every rank's rows and splits the heads; INVALID_ARG (agreed)
 * when there are fewer kv heads than ranks. */
static mha_status split_init(split *s, MPI_Comm comm, const mha_tensor *q, const mha_tensor *k)
{
    memset(s, 0, sizeof *s);
    s->comm = comm;
    MPI_Comm_rank(comm, &s->rank);
    MPI_Comm_size(comm, &s->size);
    int P = s->size;
    s->B = q->shape[0], s->H = q->shape[1], s->G = k->shape[1];
    s->q_at = mha__alloc(8 * (int64_t)P, sizeof(int64_t));
    s->counts = mha__alloc(4 * (int64_t)P, sizeof(int));
    mha_status st = s->q_at && s->counts ? MHA_OK : MHA_ERR_NOMEM;
    if (st == MHA_OK && s->G < P)
        st = mha__fail(MHA_ERR_INVALID_ARG,
                       "%lld kv heads cannot be split over %d ranks (Ulysses gives each rank "
                       "whole kv heads)",
                       (long long)s->G, P);
    if (st == MHA_OK && (s->G < 1 || s->H % s->G))
        st = mha__fail(MHA_ERR_INVALID_ARG, "%lld query heads are not a multiple of %lld kv heads", (long long)s->H,
                       (long long)s->G);
    if ((st = mha__mpi_agree(comm, st)) != MHA_OK) return st;
    s->q_rows = s->q_at + P, s->kv_at = s->q_at + 2 * P, s->kv_rows = s->q_at + 3 * P;
    s->h_first = s->q_at + 4 * P, s->h_num = s->q_at + 5 * P, s->g_first = s->q_at + 6 * P;
    s->g_num = s->q_at + 7 * P;
    int64_t mine[2] = {q->shape[2], k->shape[2]}, all[2 * P];
    MPI_Allgather(mine, 2, MPI_INT64_T, all, 2, MPI_INT64_T, comm);
    for (int r = 0; r < P; r++) {
        s->q_rows[r] = all[2 * r], s->kv_rows[r] = all[2 * r + 1];
        s->q_at[r] = s->L, s->kv_at[r] = s->S;
        s->L += s->q_rows[r], s->S += s->kv_rows[r];
        mha__mpi_heads_of(s->H, s->G, P, r, &s->h_first[r], &s->h_num[r], &s->g_first[r], &s->g_num[r]);
    }
    return MHA_OK;
}

/* The descriptor this rank's heads run with: its ALiBi slopes, its heads
 * of the mask. */
static mha_attn_desc heads_desc(const split *s, const mha_attn_desc *d)
{
    mha_attn_desc mine = *d;
    int64_t h0 = s->h_first[s->rank];
    if (d->alibi_slopes) mine.alibi_slopes = d->alibi_slopes + h0;
    if (d->mask.kind != MHA_MASK_NONE && d->mask.data) {
        size_t elem = d->mask.kind == MHA_MASK_KEEP ? sizeof(uint8_t) : sizeof(float);
        mine.mask.data = (const char *)d->mask.data + (size_t)(h0 * d->mask.stride[1]) * elem;
    }
    return mine;
}

/* A whole-sequence tensor of this rank's heads: [B, heads, rows, width],
 * contiguous at `at` (advanced past it). */
static mha_tensor whole(const split *s, bool kv, bool keys, int64_t width, float **at)
{
    int64_t heads = kv ? s->g_num[s->rank] : s->h_num[s->rank];
    mha_tensor t = mha_tensor_4d(*at, s->B, heads, keys ? s->S : s->L, width);
    *at += mha__mpi_numel(&t);
    return t;
}

/* ------------------------------------------------------------------ */
/* Forward and backward                                                */
/* ------------------------------------------------------------------ */

/* One tensor's exchange. */
typedef struct move {
    const mha_tensor *src;
    mha_tensor *dst;
    direction dir;
    bool kv; /* split by kv heads (K, V and their gradients) */
} move;

/* The buffer for the largest of n exchanges, agreed. */
static mha_status buffer_for(mha_ctx *ctx, split *s, const move *m, int n)
{
    int64_t most = 0;
    for (int i = 0; i < n; i++) {
        int64_t size = exchange_size(s, m[i].src, m[i].dst, m[i].dir, m[i].kv);
        most = size > most ? size : most;
    }
    mha_status st = MHA_OK;
    if (most > INT_MAX)
        st = mha__fail(MHA_ERR_UNSUPPORTED, "one all-to-all would move %lld floats, more than MPI counts in an int",
                       (long long)most);
    else if (!(s->buffer = mha__kept(ctx, 1, (most > 0 ? most : 1) * (int64_t)sizeof(float)))) st = MHA_ERR_NOMEM;
    return mha__mpi_agree(s->comm, st);
}

static void run_moves(const split *s, const move *m, int n)
{
    for (int i = 0; i < n; i++) exchange(s, m[i].src, m[i].dst, m[i].dir, m[i].kv);
}

/* The agreed start of either call: local checks, then every rank's
 * description against rank 0's, then who holds what. */
static mha_status begin(split *s, MPI_Comm comm, mha_status local, const mha_tensor *q, const mha_tensor *k,
                        const mha_tensor *v, const mha_attn_desc *desc, bool lse)
{
    mha__mpi_field f[24];
    int n = local == MHA_OK ? mha__mpi_seq_describe(q, k, v, desc, lse, f) : 0;
    mha_status st = mha__mpi_same(comm, local, f, n);
    if (st == MHA_OK) st = split_init(s, comm, q, k);
    return st;
}

mha_status mha_mpi_attention_ulysses(mha_ctx *ctx, MPI_Comm comm, mha_tensor *out, float *lse, const mha_tensor *q,
                                     const mha_tensor *k, const mha_tensor *v, const mha_attn_desc *desc)
{
    split s = {0};
    mha_status st = ctx ? mha__mpi_seq_check(q, k, v, out, desc) : mha__fail(MHA_ERR_MISUSE, "NULL context");
    if ((st = begin(&s, comm, st, q, k, v, desc, lse != NULL)) != MHA_OK) {
        split_free(&s);
        return st;
    }
    int64_t D = q->shape[3], Dv = v->shape[3];
    mha_tensor lse_rows = mha_tensor_4d(lse, s.B, s.H, q->shape[2], 1);
    int64_t hn = s.h_num[s.rank], gn = s.g_num[s.rank];
    int64_t floats = s.B * (hn * s.L * (D + 2 * Dv + 1) + gn * s.S * (D + Dv));
    float *work = mha__kept(ctx, 0, floats * (int64_t)sizeof(float)), *at = work; /* kept: see mha__kept */
    st = mha__mpi_agree(comm, work ? MHA_OK : MHA_ERR_NOMEM);
    if (st == MHA_OK) {
        mha_tensor qh = whole(&s, false, false, D, &at), kh = whole(&s, true, true, D, &at);
        mha_tensor vh = whole(&s, true, true, Dv, &at), oh = whole(&s, false, false, Dv, &at);
        mha_tensor lh = whole(&s, false, false, 1, &at);
        const move moves[] = {{q, &qh, TO_HEADS, false},
                              {k, &kh, TO_HEADS, true},
                              {v, &vh, TO_HEADS, true},
                              {&oh, out, TO_ROWS, false},
                              {&lh, &lse_rows, TO_ROWS, false}}; /* the last only with lse */
        int n_back = lse ? 2 : 1;
        st = buffer_for(ctx, &s, moves, 3 + n_back);
        if (st == MHA_OK) {
            run_moves(&s, moves, 3);
            mha_attn_desc mine = heads_desc(&s, desc);
            st = mha__mpi_agree(comm, mha_attention(ctx, &oh, lh.data, &qh, &kh, &vh, &mine));
        }
        if (st == MHA_OK) run_moves(&s, moves + 3, n_back);
    }
    split_free(&s);
    return st;
}

mha_status mha_mpi_attention_ulysses_backward(mha_ctx *ctx, MPI_Comm comm, mha_tensor *dq, mha_tensor *dk,
                                              mha_tensor *dv, const mha_tensor *q, const mha_tensor *k,
                                              const mha_tensor *v, const mha_tensor *out, const float *lse,
                                              const mha_tensor *grad_out, const mha_attn_desc *desc)
{
    split s = {0};
    mha_status st = ctx ? mha__mpi_seq_check(q, k, v, out, desc) : mha__fail(MHA_ERR_MISUSE, "NULL context");
    if (st == MHA_OK) st = mha__mpi_seq_check_backward(dq, dk, dv, q, k, v, out, lse, grad_out);
    if ((st = begin(&s, comm, st, q, k, v, desc, true)) != MHA_OK) {
        split_free(&s);
        return st;
    }
    int64_t D = q->shape[3], Dv = v->shape[3], hn = s.h_num[s.rank], gn = s.g_num[s.rank];
    mha_tensor lse_rows = mha_tensor_4d((float *)lse, s.B, s.H, q->shape[2], 1);
    int64_t floats = s.B * (hn * s.L * (2 * D + 2 * Dv + 1) + 2 * gn * s.S * (D + Dv));
    float *work = mha__kept(ctx, 0, floats * (int64_t)sizeof(float));
    float *at = work;
    st = mha__mpi_agree(comm, work ? MHA_OK : MHA_ERR_NOMEM);
    if (st == MHA_OK) {
        mha_tensor qh = whole(&s, false, false, D, &at), kh = whole(&s, true, true, D, &at);
        mha_tensor vh = whole(&s, true, true, Dv, &at), oh = whole(&s, false, false, Dv, &at);
        mha_tensor gh = whole(&s, false, false, Dv, &at), lh = whole(&s, false, false, 1, &at);
        mha_tensor dqh = whole(&s, false, false, D, &at), dkh = whole(&s, true, true, D, &at);
        mha_tensor dvh = whole(&s, true, true, Dv, &at);
        const move moves[] = {
            {q, &qh, TO_HEADS, false},   {k, &kh, TO_HEADS, true},         {v, &vh, TO_HEADS, true},
            {out, &oh, TO_HEADS, false}, {grad_out, &gh, TO_HEADS, false}, {&lse_rows, &lh, TO_HEADS, false},
            {&dqh, dq, TO_ROWS, false},  {&dkh, dk, TO_ROWS, true},        {&dvh, dv, TO_ROWS, true}};
        st = buffer_for(ctx, &s, moves, 9);
        if (st == MHA_OK) {
            run_moves(&s, moves, 6);
            mha_attn_desc mine = heads_desc(&s, desc);
            st = mha_attention_backward(ctx, &dqh, &dkh, &dvh, &qh, &kh, &vh, &oh, lh.data, &gh, &mine);
            st = mha__mpi_agree(comm, st);
        }
        if (st == MHA_OK) run_moves(&s, moves + 6, 3);
    }
    split_free(&s);
    return st;
}
