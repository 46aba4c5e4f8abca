/*
 * ring.c -- ring attention (mha_mpi.h): every rank keeps its queries,
 * and the blocks of keys and values travel around the ring of ranks, the
 * next block arriving (non-blocking receive) while the current one is
 * computed.  Each (query segment, key segment) pair is one libmha call
 * that knows where its rows sit in the whole sequence (mha_attn_desc's
 * positions), and the partial results merge by their row statistics:
 *
 *   M' = max(M, m),  S' = S e^(M - M') + s e^(m - M'),
 *   O' = (O S e^(M - M') + o s e^(m - M')) / S'
 *
 * in the order the blocks arrive, a function of the rank count only.
 *
 * The backward goes round twice.  First each row's sums of P and of
 * P dP over every block (mha_attention_backward_row_sums) give the whole
 * row's delta = sum P dP exactly, as one call takes it; then each block's
 * gradients (mha_attention_backward_block): dQ stays with its rank, and
 * dK, dV travel with their block, which ends back at its owner.
 *
 * Causal work is balanced by the zigzag layout: with the sequence in 2P
 * chunks, rank r holds chunks r and 2P - 1 - r, so every rank has as many
 * scores below the diagonal as any other.
 */
#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "core/internal.h"
#include "attn/products.h" /* MHA__BR, the tiles' query rows */
#include "core/parallel.h"
#include "mha_mpi.h"
#include "mpi/collective.h"
#include "mpi/sequence.h"

/* A run of a rank's rows: rows [at, at + rows) of the whole sequence,
 * from row `local` of the rank's tensors. */
typedef struct segment {
    int64_t at, rows, local;
} segment;

typedef struct ring {
    MPI_Comm comm;
    int rank, size;
    int64_t B, H, G, D, Dv, L, S;
    segment *q, *kv;       /* [2 size]: every rank's two segments (the second may be empty) */
    int64_t kv_most;       /* the most keys any rank holds */
    MPI_Request *inflight; /* the transfers under way (4), for progress() */
} ring;

void mha_mpi_layout_rows(mha_mpi_layout layout, int64_t n, int size, int rank, int64_t start[2], int64_t rows[2])
{
    if (layout == MHA_MPI_ZIGZAG) {
        int64_t chunks = 2 * (int64_t)size, c1 = 2 * (int64_t)size - 1 - rank;
        start[0] = n * rank / chunks, rows[0] = n * (rank + 1) / chunks - start[0];
        start[1] = n * c1 / chunks, rows[1] = n * (c1 + 1) / chunks - start[1];
    } else { /* even blocks, for callers who want them; BLOCKS takes any */
        start[0] = n * rank / size, rows[0] = n * (rank + 1) / size - start[0];
        start[1] = start[0] + rows[0], rows[1] = 0;
    }
}

static void ring_free(ring *g) { mha__free(g->q); }

/* Rank r's keys: its two key segments. */
static int64_t keys_of(const ring *g, int r) { return g->kv[2 * r].rows + g->kv[2 * r + 1].rows; }

/* Rank r's segments of an n-row sequence: under BLOCKS one run of the
 * `held` rows from `at`; under ZIGZAG its two chunks, which must be what
 * it holds. */
static mha_status segments_of(mha_mpi_layout layout, int64_t n, int size, int r, int64_t at, int64_t held,
                              const char *what, segment s[2])
{
    s[0] = (segment){at, held, 0}, s[1] = (segment){at + held, 0, held};
    if (layout != MHA_MPI_ZIGZAG) return MHA_OK;
    int64_t start[2], rows[2];
    mha_mpi_layout_rows(layout, n, size, r, start, rows);
    s[0] = (segment){start[0], rows[0], 0}, s[1] = (segment){start[1], rows[1], rows[0]};
    if (held == rows[0] + rows[1]) return MHA_OK;
    return mha__fail(MHA_ERR_INVALID_ARG, "zigzag: rank %d holds %lld %s, its chunks have %lld", r, (long long)held,
                     what, (long long)(rows[0] + rows[1]));
}

/* Every rank's segments from the rows each holds (gathered), in rank
 * order; the same on every rank. */
static mha_status ring_init(ring *g, MPI_Comm comm, mha_mpi_layout layout, const mha_tensor *q, const mha_tensor *k,
                            const mha_tensor *v)
{
    memset(g, 0, sizeof *g);
    g->comm = comm;
    MPI_Comm_rank(comm, &g->rank);
    MPI_Comm_size(comm, &g->size);
    int P = g->size;
    g->B = q->shape[0], g->H = q->shape[1], g->G = k->shape[1], g->D = q->shape[3], g->Dv = v->shape[3];
    g->q = mha__alloc(4 * (int64_t)P, sizeof(segment));
    int64_t *held = mha__alloc(2 * (int64_t)P, sizeof(int64_t)); /* [q rows, keys] per rank */
    mha_status st = g->q && held ? MHA_OK : MHA_ERR_NOMEM;
    if (st == MHA_OK && layout != MHA_MPI_BLOCKS && layout != MHA_MPI_ZIGZAG)
        st = mha__fail(MHA_ERR_INVALID_ARG, "layout %d is not an mha_mpi_layout", (int)layout);
    if ((st = mha__mpi_agree(comm, st)) == MHA_OK) {
        g->kv = g->q + 2 * P;
        int64_t mine[2] = {q->shape[2], k->shape[2]}, q_at = 0, kv_at = 0;
        MPI_Allgather(mine, 2, MPI_INT64_T, held, 2, MPI_INT64_T, comm);
        for (int r = 0; r < P; r++) g->L += held[2 * r], g->S += held[2 * r + 1];
        for (int r = 0; r < P && st == MHA_OK; r++) {
            st = segments_of(layout, g->L, P, r, q_at, held[2 * r], "query rows", g->q + 2 * r);
            if (st == MHA_OK) st = segments_of(layout, g->S, P, r, kv_at, held[2 * r + 1], "keys", g->kv + 2 * r);
            q_at += held[2 * r], kv_at += held[2 * r + 1];
            g->kv_most = keys_of(g, r) > g->kv_most ? keys_of(g, r) : g->kv_most;
        }
    }
    mha__free(held);
    return st; /* the same on every rank: computed from gathered sizes */
}

/* The descriptor of one (query segment, key segment) pair: its positions
 * in the whole sequence, and its part of the mask. */
static mha_attn_desc pair_desc(const ring *g, const mha_attn_desc *d, const segment *a, const segment *b)
{
    mha_attn_desc mine = *d;
    mine.query_offset = a->at, mine.key_offset = b->at;
    mine.query_total = g->L, mine.key_total = g->S;
    if (d->mask.kind != MHA_MASK_NONE && d->mask.data) {
        size_t elem = d->mask.kind == MHA_MASK_KEEP ? sizeof(uint8_t) : sizeof(float);
        mine.mask.data =
            (const char *)d->mask.data + (size_t)(a->at * d->mask.stride[2] + b->at * d->mask.stride[3]) * elem;
    }
    return mine;
}

/* Whether no query of segment a can see any key of segment b: causal
 * masking or the window hides the whole pair, which then contributes
 * nothing and needs no call. */
static bool pair_hidden(const ring *g, const mha_attn_desc *d, const segment *a, const segment *b)
{
    int64_t first_q = a->at, last_q = a->at + a->rows - 1, first_k = b->at, last_k = b->at + b->rows - 1;
    int64_t diag = g->S - g->L; /* bottom-right: query i aligns with key i + diag */
    if (d->causal == MHA_CAUSAL_TOP_LEFT && last_q < first_k) return true;
    if (d->causal == MHA_CAUSAL_BOTTOM_RIGHT && last_q + diag < first_k) return true;
    if (d->window_left >= 0 && first_q + diag - d->window_left > last_k) return true;
    return d->window_right >= 0 && last_q + diag + d->window_right < first_k;
}

/* Lets MPI move the blocks in flight while the compute goes on: with one
 * thread a rank, a large message advances only inside MPI calls, so the
 * pairs' loop calls in between them. */
static void progress(const ring *g)
{
    int done;
    if (g->inflight) MPI_Testall(4, g->inflight, &done, MPI_STATUSES_IGNORE);
}

/* Skip pair (a, b): empty, or hidden; first a turn for the transfers. */
static bool pair_skipped(const ring *g, const mha_attn_desc *d, const segment *a, const segment *b)
{
    progress(g);
    return !a->rows || !b->rows || pair_hidden(g, d, a, b);
}

/* ------------------------------------------------------------------ */
/* The travelling blocks                                               */
/* ------------------------------------------------------------------ */

/* Rank `owner`'s keys and values as held in a buffer, and in the backward
 * their gradients after them (the part that travels after the compute). */
typedef struct kv_block {
    mha_tensor k, v, dk, dv;
    int64_t kv_floats, grad_floats;
} kv_block;

static kv_block block_at(const ring *g, float *buf, int owner, bool grads)
{
    int64_t rows = keys_of(g, owner);
    kv_block b = {0};
    b.k = mha_tensor_4d(buf, g->B, g->G, rows, g->D);
    b.v = mha_tensor_4d(buf + mha__mpi_numel(&b.k), g->B, g->G, rows, g->Dv);
    b.kv_floats = mha__mpi_numel(&b.k) + mha__mpi_numel(&b.v);
    if (grads) {
        b.dk = mha_tensor_4d(buf + b.kv_floats, g->B, g->G, rows, g->D);
        b.dv = mha_tensor_4d(buf + b.kv_floats + mha__mpi_numel(&b.k), g->B, g->G, rows, g->Dv);
        b.grad_floats = b.kv_floats;
    }
    return b;
}

/* The floats of the largest block; UNSUPPORTED past what one MPI message
 * counts. */
static mha_status block_capacity(const ring *g, bool grads, int64_t *floats)
{
    *floats = g->B * g->G * g->kv_most * (g->D + g->Dv) * (grads ? 2 : 1);
    if (*floats > INT32_MAX)
        return mha__fail(MHA_ERR_UNSUPPORTED, "a block of %lld floats is more than one MPI message counts",
                         (long long)*floats);
    return MHA_OK;
}

/* Posts the send of n floats to the next rank and the receive of m from
 * the previous one. */
static void shift(const ring *g, float *send, int64_t n, float *recv, int64_t m, int tag, MPI_Request req[2])
{
    int right = (g->rank + 1) % g->size, left = (g->rank + g->size - 1) % g->size;
    MPI_Irecv(recv, (int)m, MPI_FLOAT, left, tag, g->comm, &req[0]);
    MPI_Isend(send, (int)n, MPI_FLOAT, right, tag, g->comm, &req[1]);
}

/* ------------------------------------------------------------------ */
/* Forward                                                             */
/* ------------------------------------------------------------------ */

/* This rank's rows as merged so far (O, M, S) and one pair's result. */
typedef struct merge {
    float *o, *m, *s;    /* [B, H, L_r (, Dv)] */
    float *po, *pm, *ps; /* [B, H, segment rows (, Dv)] */
    int64_t rows;        /* L_r */
} merge;

static void merge_pair(const ring *g, merge *mg, const segment *a)
{
    for (int64_t bh = 0; bh < g->B * g->H; bh++) {
        int64_t run = bh * mg->rows + a->local, pair = bh * a->rows;
        mha__mpi_merge_rows(mg->o + run * g->Dv, mg->m + run, mg->s + run, mg->po + pair * g->Dv, mg->pm + pair,
                            mg->ps + pair, a->rows, g->Dv);
    }
}

/* One pair's forward (a piece of a query segment with a key segment),
 * merged into the rows; nothing when the pair is hidden. */
static mha_status forward_pair(mha_ctx *ctx, const ring *g, merge *mg, const mha_tensor *q, const kv_block *blk,
                               const segment *sa, const segment *sb, const mha_attn_desc *d)
{
    if (pair_skipped(g, d, sa, sb)) return MHA_OK;
    mha_tensor qv = mha__mpi_piece(q, 0, g->H, sa->local, sa->rows);
    mha_tensor kv = mha__mpi_piece(&blk->k, 0, g->G, sb->local, sb->rows);
    mha_tensor vv = mha__mpi_piece(&blk->v, 0, g->G, sb->local, sb->rows);
    mha_tensor ov = mha_tensor_4d(mg->po, g->B, g->H, sa->rows, g->Dv);
    mha_attn_stats stats = {mg->pm, mg->ps};
    mha_attn_desc pd = pair_desc(g, d, sa, sb);
    mha_status st = mha_attention_with_stats(ctx, &ov, &stats, &qv, &kv, &vv, &pd);
    if (st == MHA_OK) merge_pair(g, mg, sa);
    return st;
}

/* Query rows a forward call takes at most: a step's queries go in pieces
 * so that MPI gets a turn (progress) between them to move the next block.
 * A multiple of the tiles' query rows (96 or 192, plan.c), so that only a
 * segment's last piece ends in a partial tile: with 1024 every piece did
 * (a 64-row tile costs a whole pass over the keys for a third of the work). */
enum { RING_ROWS = 6 * MHA__BR };

/* Every pair of this rank's query segments (in pieces) with the block of
 * `owner`. */
static mha_status forward_step(mha_ctx *ctx, const ring *g, merge *mg, const mha_tensor *q, const kv_block *blk,
                               int owner, const mha_attn_desc *d)
{
    for (int a = 0; a < 2; a++)
        for (int b = 0; b < 2; b++) {
            const segment *whole = &g->q[2 * g->rank + a], *sb = &g->kv[2 * owner + b];
            for (int64_t off = 0; off < whole->rows; off += RING_ROWS) {
                int64_t n = whole->rows - off < RING_ROWS ? whole->rows - off : RING_ROWS;
                segment piece = {whole->at + off, n, whole->local + off};
                mha_status st = forward_pair(ctx, g, mg, q, blk, &piece, sb, d);
                if (st != MHA_OK) return st;
            }
        }
    return MHA_OK;
}

/* The agreed start of either direction: local checks, the fields every
 * rank compares, the layout. */
static mha_status ring_begin(ring *g, MPI_Comm comm, mha_status local, mha_mpi_layout layout, const mha_tensor *q,
                             const mha_tensor *k, const mha_tensor *v, const mha_attn_desc *d, bool lse)
{
    mha__mpi_field f[26];
    int n = 0;
    if (local == MHA_OK) {
        n = mha__mpi_seq_describe(q, k, v, d, lse, f);
        f[n++] = (mha__mpi_field){"layout", layout};
    }
    mha_status st = mha__mpi_same(comm, local, f, n);
    if (st == MHA_OK) st = mha__mpi_agree(comm, ring_init(g, comm, layout, q, k, v));
    return st;
}

/* The most query rows in one of this rank's segments. */
static int64_t segment_most(const ring *g)
{
    const segment *s = g->q + 2 * g->rank;
    return s[0].rows > s[1].rows ? s[0].rows : s[1].rows;
}

/* Goes round the ring once: `step` computes with each block in turn
 * while the next one arrives. */
typedef mha_status (*ring_step_fn)(void *arg, const kv_block *blk, int owner);

static mha_status go_round(ring *g, float *buf[2], bool grads, ring_step_fn step, void *arg)
{
    mha_status st = MHA_OK;
    for (int t = 0; t < g->size; t++) {
        int owner = (g->rank - t + g->size) % g->size, next = (owner + g->size - 1) % g->size;
        kv_block cur = block_at(g, buf[t % 2], owner, grads), nxt = block_at(g, buf[(t + 1) % 2], next, grads);
        MPI_Request req[4] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL, MPI_REQUEST_NULL, MPI_REQUEST_NULL};
        if (t + 1 < g->size) shift(g, cur.k.data, cur.kv_floats, nxt.k.data, nxt.kv_floats, 1, req);
        g->inflight = req;
        if (st == MHA_OK) st = step(arg, &cur, owner); /* a failed rank still passes the blocks on */
        if (grads) { /* dK and dV follow their block once it is computed; the last step sends them home */
            shift(g, cur.dk.data, cur.grad_floats, nxt.dk.data, nxt.grad_floats, 2, req + 2);
        }
        g->inflight = NULL;
        double waited = mha__mpi_clock(); /* only what the compute did not hide */
        MPI_Waitall(4, req, MPI_STATUSES_IGNORE);
        mha__mpi_waited(waited);
    }
    return st;
}

typedef struct forward_arg {
    mha_ctx *ctx;
    const ring *g;
    merge *mg;
    const mha_tensor *q;
    const mha_attn_desc *d;
} forward_arg;

static mha_status forward_block(void *arg, const kv_block *blk, int owner)
{
    const forward_arg *fa = arg;
    return forward_step(fa->ctx, fa->g, fa->mg, fa->q, blk, owner, fa->d);
}

/* out and lse from the merged rows. */
static void forward_finish(const ring *g, const merge *mg, mha_tensor *out, float *lse)
{
    mha__mpi_copy_piece(out, mg->o, false);
    for (int64_t row = 0; lse && row < g->B * g->H * mg->rows; row++)
        lse[row] = mg->s[row] > 0 ? mg->m[row] + logf(mg->s[row]) : -INFINITY;
}

mha_status mha_mpi_attention_ring(mha_ctx *ctx, MPI_Comm comm, mha_mpi_layout layout, mha_tensor *out, float *lse,
                                  const mha_tensor *q, const mha_tensor *k, const mha_tensor *v,
                                  const mha_attn_desc *desc)
{
    ring g = {0};
    mha_status st = ctx ? mha__mpi_seq_check(q, k, v, out, desc) : mha__fail(MHA_ERR_MISUSE, "NULL context");
    if ((st = ring_begin(&g, comm, st, layout, q, k, v, desc, lse != NULL)) != MHA_OK) {
        ring_free(&g);
        return st;
    }
    int64_t cap = 0, rows = q->shape[2], n_rows = g.B * g.H * rows,
            n_pair = g.B * g.H * (segment_most(&g) < RING_ROWS ? segment_most(&g) : RING_ROWS);
    st = block_capacity(&g, false, &cap);
    int64_t floats = 2 * cap + n_rows * (g.Dv + 2) + n_pair * (g.Dv + 2);
    float *mem = st == MHA_OK ? mha__kept(ctx, 0, floats * (int64_t)sizeof(float)) : NULL;
    if (st == MHA_OK && !mem) st = MHA_ERR_NOMEM;
    if ((st = mha__mpi_agree(comm, st)) == MHA_OK) {
        float *buf[2] = {mem, mem + cap};
        merge mg = {.o = mem + 2 * cap, .rows = rows};
        mg.m = mg.o + n_rows * g.Dv, mg.s = mg.m + n_rows;
        mg.po = mg.s + n_rows, mg.pm = mg.po + n_pair * g.Dv, mg.ps = mg.pm + n_pair;
        memset(mg.o, 0, (size_t)(n_rows * g.Dv) * sizeof(float));
        for (int64_t i = 0; i < n_rows; i++) mg.m[i] = -INFINITY, mg.s[i] = 0.0f;
        kv_block own = block_at(&g, buf[0], g.rank, false);
        mha__mpi_copy_piece(k, own.k.data, true);
        mha__mpi_copy_piece(v, own.v.data, true);
        forward_arg fa = {ctx, &g, &mg, q, desc};
        st = mha__mpi_agree(comm, go_round(&g, buf, false, forward_block, &fa));
        if (st == MHA_OK) forward_finish(&g, &mg, out, lse);
    }
    ring_free(&g);
    return st;
}

/* ------------------------------------------------------------------ */
/* Backward                                                            */
/* ------------------------------------------------------------------ */

/* One query segment's rows, contiguous as the calls take them. */
typedef struct seg_rows {
    float *lse, *sum, *delta; /* [B, H, rows] */
    double *p_sum, *p_dp;     /* the first pass's sums so far */
} seg_rows;

typedef struct backward_arg {
    mha_ctx *ctx;
    const ring *g;
    const mha_tensor *q, *grad_out;
    const mha_attn_desc *d;
    seg_rows seg[2];
    double *t_sum, *t_dp; /* one pair's sums */
    float *ones;          /* the first pass's stats: max = lse, sum = 1 */
    float *dq;            /* [B, H, L_r, D], summed over the blocks so far */
    float *tq, *tk, *tv;  /* one pair's gradients */
} backward_arg;

/* The views of one pair. */
typedef struct pair {
    const segment *a, *b;
    mha_tensor q, k, v, g;
    mha_attn_desc d;
} pair;

static pair pair_of(const backward_arg *ba, const kv_block *blk, int owner, int a, int b)
{
    const ring *g = ba->g;
    pair p = {.a = &g->q[2 * g->rank + a], .b = &g->kv[2 * owner + b]};
    p.q = mha__mpi_piece(ba->q, 0, g->H, p.a->local, p.a->rows);
    p.g = mha__mpi_piece(ba->grad_out, 0, g->H, p.a->local, p.a->rows);
    p.k = mha__mpi_piece(&blk->k, 0, g->G, p.b->local, p.b->rows);
    p.v = mha__mpi_piece(&blk->v, 0, g->G, p.b->local, p.b->rows);
    p.d = pair_desc(g, ba->d, p.a, p.b);
    return p;
}

/* First pass: each row's sums of P and P dP over the block's keys. */
static mha_status sums_block(void *arg, const kv_block *blk, int owner)
{
    backward_arg *ba = arg;
    for (int a = 0; a < 2; a++)
        for (int b = 0; b < 2; b++) {
            pair p = pair_of(ba, blk, owner, a, b);
            if (pair_skipped(ba->g, ba->d, p.a, p.b)) continue;
            mha_attn_stats stats = {ba->seg[a].lse, ba->ones};
            mha_status st =
                mha_attention_backward_row_sums(ba->ctx, ba->t_sum, ba->t_dp, &p.q, &p.k, &p.v, &p.g, &stats, &p.d);
            if (st != MHA_OK) return st;
            for (int64_t i = 0; i < ba->g->B * ba->g->H * p.a->rows; i++)
                ba->seg[a].p_sum[i] += ba->t_sum[i], ba->seg[a].p_dp[i] += ba->t_dp[i];
        }
    return MHA_OK;
}

/* Second pass: the block's share of dQ (kept) and of dK, dV (added to the
 * travelling sums). */
static mha_status grads_block(void *arg, const kv_block *blk, int owner)
{
    backward_arg *ba = arg;
    const ring *g = ba->g;
    for (int a = 0; a < 2; a++)
        for (int b = 0; b < 2; b++) {
            pair p = pair_of(ba, blk, owner, a, b);
            if (pair_skipped(ba->g, ba->d, p.a, p.b)) continue;
            mha_tensor tq = mha_tensor_4d(ba->tq, g->B, g->H, p.a->rows, g->D);
            mha_tensor tk = mha_tensor_4d(ba->tk, g->B, g->G, p.b->rows, g->D);
            mha_tensor tv = mha_tensor_4d(ba->tv, g->B, g->G, p.b->rows, g->Dv);
            mha_attn_stats stats = {ba->seg[a].lse, ba->seg[a].sum};
            mha_status st = mha_attention_backward_block(ba->ctx, &tq, &tk, &tv, &p.q, &p.k, &p.v, &stats,
                                                         ba->seg[a].delta, &p.g, &p.d);
            if (st != MHA_OK) return st;
            mha_tensor dq = mha_tensor_4d(ba->dq, g->B, g->H, ba->q->shape[2], g->D);
            dq = mha__mpi_piece(&dq, 0, g->H, p.a->local, p.a->rows);
            mha_tensor dk = mha__mpi_piece(&blk->dk, 0, g->G, p.b->local, p.b->rows);
            mha_tensor dv = mha__mpi_piece(&blk->dv, 0, g->G, p.b->local, p.b->rows);
            mha__mpi_add_piece(&dq, ba->tq);
            mha__mpi_add_piece(&dk, ba->tk);
            mha__mpi_add_piece(&dv, ba->tv);
        }
    return MHA_OK;
}

/* Each segment's lse rows, and (between the passes) its delta and sum. */
static void segment_rows(const ring *g, backward_arg *ba, const float *lse, int64_t rows, bool between)
{
    for (int a = 0; a < 2; a++) {
        const segment *s = &g->q[2 * g->rank + a];
        seg_rows *r = &ba->seg[a];
        for (int64_t bh = 0; bh < g->B * g->H; bh++)
            for (int64_t i = 0; i < s->rows; i++) {
                int64_t at = bh * s->rows + i;
                if (!between) {
                    r->lse[at] = lse[bh * rows + s->local + i];
                    r->p_sum[at] = r->p_dp[at] = 0.0;
                    continue;
                }
                r->sum[at] = (float)r->p_sum[at];
                r->delta[at] = r->p_sum[at] > 0 ? (float)(r->p_dp[at] / r->p_sum[at]) : 0.0f;
            }
    }
}

/* The backward's memory: the travelling blocks, dQ, the segments' rows
 * and one pair's results, carved from ctx's two kept buffers. */
typedef struct backward_mem {
    float *f;
    double *d;
    float *buf[2];
} backward_mem;

static mha_status backward_alloc(mha_ctx *ctx, const ring *g, backward_arg *ba, backward_mem *m, int64_t rows)
{
    int64_t cap, most = segment_most(g), bh = g->B * g->H;
    mha_status st = block_capacity(g, true, &cap);
    if (st != MHA_OK) return st;
    int64_t floats =
        2 * cap + bh * rows * g->D + 3 * bh * rows + bh * most * (1 + g->D) + g->B * g->G * g->kv_most * (g->D + g->Dv);
    m->f = mha__kept(ctx, 0, floats * (int64_t)sizeof(float));
    m->d = mha__kept(ctx, 1, (2 * bh * rows + 2 * bh * most) * (int64_t)sizeof(double));
    if (!m->f || !m->d) return MHA_ERR_NOMEM;
    float *f = m->f;
    double *d = m->d;
    m->buf[0] = f, m->buf[1] = f + cap, f += 2 * cap;
    ba->dq = f, f += bh * rows * g->D;
    for (int a = 0; a < 2; a++) {
        int64_t n = bh * g->q[2 * g->rank + a].rows;
        ba->seg[a].lse = f, ba->seg[a].sum = f + n, ba->seg[a].delta = f + 2 * n, f += 3 * n;
        ba->seg[a].p_sum = d, ba->seg[a].p_dp = d + n, d += 2 * n;
    }
    ba->ones = f, f += bh * most;
    ba->tq = f, f += bh * most * g->D;
    ba->tk = f, ba->tv = f + g->B * g->G * g->kv_most * g->D;
    ba->t_sum = d, ba->t_dp = d + bh * most;
    for (int64_t i = 0; i < bh * most; i++) ba->ones[i] = 1.0f;
    memset(ba->dq, 0, (size_t)(bh * rows * g->D) * sizeof(float));
    return MHA_OK;
}

/* Puts this rank's K and V in the first buffer, with zero gradients. */
static void own_block(const ring *g, float *buf, const mha_tensor *k, const mha_tensor *v, bool grads)
{
    kv_block own = block_at(g, buf, g->rank, grads);
    mha__mpi_copy_piece(k, own.k.data, true);
    mha__mpi_copy_piece(v, own.v.data, true);
    if (grads) memset(own.dk.data, 0, (size_t)own.grad_floats * sizeof(float));
}

mha_status mha_mpi_attention_ring_backward(mha_ctx *ctx, MPI_Comm comm, mha_mpi_layout layout, mha_tensor *dq,
                                           mha_tensor *dk, mha_tensor *dv, const mha_tensor *q, const mha_tensor *k,
                                           const mha_tensor *v, const mha_tensor *out, const float *lse,
                                           const mha_tensor *grad_out, const mha_attn_desc *desc)
{
    ring g = {0};
    mha_status st = ctx ? mha__mpi_seq_check(q, k, v, out, desc) : mha__fail(MHA_ERR_MISUSE, "NULL context");
    if (st == MHA_OK) st = mha__mpi_seq_check_backward(dq, dk, dv, q, k, v, out, lse, grad_out);
    if ((st = ring_begin(&g, comm, st, layout, q, k, v, desc, true)) != MHA_OK) {
        ring_free(&g);
        return st;
    }
    backward_arg ba = {.ctx = ctx, .g = &g, .q = q, .grad_out = grad_out, .d = desc};
    backward_mem m = {0};
    st = mha__mpi_agree(comm, backward_alloc(ctx, &g, &ba, &m, q->shape[2]));
    if (st == MHA_OK) {
        segment_rows(&g, &ba, lse, q->shape[2], false);
        own_block(&g, m.buf[0], k, v, false);
        st = mha__mpi_agree(comm, go_round(&g, m.buf, false, sums_block, &ba));
    }
    if (st == MHA_OK) {
        segment_rows(&g, &ba, lse, q->shape[2], true);
        own_block(&g, m.buf[0], k, v, true);
        st = mha__mpi_agree(comm, go_round(&g, m.buf, true, grads_block, &ba));
    }
    if (st == MHA_OK) { /* the own block's dK and dV came home with the last step */
        kv_block home = block_at(&g, m.buf[g.size % 2], g.rank, true);
        mha_tensor all_dq = mha_tensor_4d(ba.dq, g.B, g.H, q->shape[2], g.D);
        mha__mpi_copy_piece(dq, all_dq.data, false);
        mha__mpi_copy_piece(dk, home.dk.data, false);
        mha__mpi_copy_piece(dv, home.dv.data, false);
    }
    ring_free(&g);
    return st;
}
