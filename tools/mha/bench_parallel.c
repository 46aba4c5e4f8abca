/*
 * bench_parallel.c -- `mpirun -np P mha bench ... --parallel MODE`: the
 * libmha_mpi modes timed on one shape (docs/SCALING.md).  Every rank
 * builds its own share of one random problem, all ranks start each call
 * together (a barrier), and a call's time is the slowest rank's.  Beside
 * the median it reports how much of it each rank spent in transfers the
 * compute did not hide (mha_mpi_transfer_seconds), so the time without
 * them is known too.  Rank 0 prints.
 */
#include "cli.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mha_mpi.h"

static const char *const CMD = "bench";

/* One parallel case: what a call needs, per rank. */
typedef struct par_case {
    const cli_bench_shape *o;
    int rank, size;
    mha_ctx *ctx;
    mha_mpi_layer *layer;
    mha_layer_fwd_args args;
    mha_layer_tape *tape;
    mha_tensor x, y, q, k, v, out, g, dq, dk, dv;
    float *lse;
    mha_attn_desc desc;
    mha_kv_cache *shard;
    mha_layer *cache_shape;
    float *mem;
} par_case;

static void fill(float *x, int64_t n, uint64_t seed, float scale)
{
    for (int64_t i = 0; i < n; i++) {
        seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
        x[i] = scale * ((float)(seed >> 40) * 0x1p-24f * 2.0f - 1.0f);
    }
}

/* The head-parallel layer: the whole weights on every rank (each keeps
 * its shard), the whole input. */
static mha_status setup_heads(par_case *c)
{
    const cli_bench_shape *o = c->o;
    int64_t E = o->embed_dim, n_x = o->batch * o->seq * E;
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    d.embed_dim = E, d.num_heads = o->num_heads;
    mha_status st = mha_mpi_layer_create(MPI_COMM_WORLD, &d, &c->layer);
    c->mem = st == MHA_OK ? malloc((size_t)(3 * E * E + 3 * n_x) * sizeof(float)) : NULL;
    if (st == MHA_OK && !c->mem) st = MHA_ERR_NOMEM;
    if (st != MHA_OK) return st;
    fill(c->mem, 3 * E * E, 7, 1.0f / sqrtf((float)E));
    fill(c->mem + 3 * E * E, n_x, 11, 1.0f);
    fill(c->mem + 3 * E * E + 2 * n_x, n_x, 13, 1.0f);
    st = mha_mpi_layer_set_weight(c->layer, "in_proj_weight", c->mem, 3 * E * E);
    if (st == MHA_OK) st = mha_mpi_layer_set_weight(c->layer, "out_proj.weight", c->mem, E * E);
    mha_layer_fwd_args_init(&c->args);
    c->x = mha_tensor_3d(c->mem + 3 * E * E, o->batch, o->seq, E);
    c->args.query = c->args.key = c->args.value = c->x;
    c->args.causal = o->causal ? MHA_CAUSAL_TOP_LEFT : MHA_CAUSAL_NONE;
    c->y = mha_tensor_3d(c->mem + 3 * E * E + n_x, o->batch, o->seq, E);
    c->g = mha_tensor_3d(c->mem + 3 * E * E + 2 * n_x, o->batch, o->seq, E);
    if (st == MHA_OK && o->backward) {
        st = mha_layer_train_init(mha_mpi_layer_local(c->layer));
        if (st == MHA_OK) st = mha_layer_tape_create(&c->tape);
        c->args.tape = c->tape;
        c->args.write_input_grads = 1; /* as the single-process bench */
    }
    return st;
}

/* Ring or Ulysses: this rank's rows of Q, K, V (and of the gradients). */
static mha_status setup_sequence(par_case *c, bool zigzag)
{
    const cli_bench_shape *o = c->o;
    int64_t start[2], rows[2], H = o->num_heads, G = o->num_kv_heads, D = o->embed_dim / H;
    mha_mpi_layout_rows(zigzag ? MHA_MPI_ZIGZAG : MHA_MPI_BLOCKS, o->seq, c->size, c->rank, start, rows);
    int64_t L = rows[0] + rows[1], nq = o->batch * H * L * D, nk = o->batch * G * L * D;
    c->mem = malloc((size_t)(4 * nq + 4 * nk + o->batch * H * L + 1) * sizeof(float));
    if (!c->mem) return MHA_ERR_NOMEM;
    float *at = c->mem;
    c->q = mha_tensor_4d(at, o->batch, H, L, D), at += nq;
    c->out = mha_tensor_4d(at, o->batch, H, L, D), at += nq;
    c->g = mha_tensor_4d(at, o->batch, H, L, D), at += nq;
    c->dq = mha_tensor_4d(at, o->batch, H, L, D), at += nq;
    c->k = mha_tensor_4d(at, o->batch, G, L, D), at += nk;
    c->v = mha_tensor_4d(at, o->batch, G, L, D), at += nk;
    c->dk = mha_tensor_4d(at, o->batch, G, L, D), at += nk;
    c->dv = mha_tensor_4d(at, o->batch, G, L, D), at += nk;
    c->lse = at;
    fill(c->mem, nq, 17 + (uint64_t)c->rank, 1.0f);
    fill(c->mem + 4 * nq, 2 * nk, 19 + (uint64_t)c->rank, 1.0f);
    fill(c->g.data, nq, 23 + (uint64_t)c->rank, 1.0f);
    mha_attn_desc_init(&c->desc);
    c->desc.enable_gqa = G != H;
    c->desc.causal = o->causal ? MHA_CAUSAL_TOP_LEFT : MHA_CAUSAL_NONE;
    return MHA_OK;
}

/* Decoding: this rank's block of a --kv-seq cache. */
static mha_status setup_decode(par_case *c)
{
    const cli_bench_shape *o = c->o;
    int64_t start[2], rows[2], H = o->num_heads, G = o->num_kv_heads, D = o->embed_dim / H;
    mha_mpi_layout_rows(MHA_MPI_BLOCKS, o->kv_seq, c->size, c->rank, start, rows);
    int64_t nk = o->batch * G * rows[0] * D, nq = o->batch * H * o->seq * D;
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    d.embed_dim = o->embed_dim, d.num_heads = H, d.num_kv_heads = G;
    c->mem = malloc((size_t)(2 * nk + 2 * nq + 1) * sizeof(float));
    if (!c->mem) return MHA_ERR_NOMEM;
    fill(c->mem, 2 * nk + nq, 29 + (uint64_t)c->rank, 1.0f);
    mha_tensor k = mha_tensor_4d(c->mem, o->batch, G, rows[0], D),
               v = mha_tensor_4d(c->mem + nk, o->batch, G, rows[0], D);
    c->q = mha_tensor_4d(c->mem + 2 * nk, o->batch, H, o->seq, D);
    c->out = mha_tensor_4d(c->mem + 2 * nk + nq, o->batch, H, o->seq, D);
    mha_attn_desc_init(&c->desc);
    c->desc.enable_gqa = G != H, c->desc.causal = MHA_CAUSAL_BOTTOM_RIGHT;
    mha_status st = mha_layer_create(&d, &c->cache_shape);
    if (st == MHA_OK)
        st = mha_kv_cache_create(c->cache_shape, o->batch, rows[0] > 0 ? rows[0] : 1, o->cache, &c->shard);
    if (st == MHA_OK && rows[0]) st = mha_kv_cache_append(c->shard, &k, &v);
    return st;
}

static mha_status sequence_forward(par_case *c)
{
    MPI_Comm w = MPI_COMM_WORLD;
    if (strcmp(c->o->parallel, "ulysses") == 0)
        return mha_mpi_attention_ulysses(c->ctx, w, &c->out, c->lse, &c->q, &c->k, &c->v, &c->desc);
    mha_mpi_layout layout = c->o->causal ? MHA_MPI_ZIGZAG : MHA_MPI_BLOCKS;
    return mha_mpi_attention_ring(c->ctx, w, layout, &c->out, c->lse, &c->q, &c->k, &c->v, &c->desc);
}

/* The gradients alone (the forward ran once in setup), as the
 * single-process --op sdpa-backward times them. */
static mha_status sequence_backward(par_case *c)
{
    MPI_Comm w = MPI_COMM_WORLD;
    if (strcmp(c->o->parallel, "ulysses") == 0)
        return mha_mpi_attention_ulysses_backward(c->ctx, w, &c->dq, &c->dk, &c->dv, &c->q, &c->k, &c->v, &c->out,
                                                  c->lse, &c->g, &c->desc);
    mha_mpi_layout layout = c->o->causal ? MHA_MPI_ZIGZAG : MHA_MPI_BLOCKS;
    return mha_mpi_attention_ring_backward(c->ctx, w, layout, &c->dq, &c->dk, &c->dv, &c->q, &c->k, &c->v, &c->out,
                                           c->lse, &c->g, &c->desc);
}

static mha_status run_once(par_case *c)
{
    const cli_bench_shape *o = c->o;
    if (strcmp(o->parallel, "heads") == 0) {
        if (!o->backward) return mha_mpi_layer_forward(c->ctx, c->layer, &c->y, NULL, &c->args);
        mha_layer_zero_grad_deferred(mha_mpi_layer_local(c->layer)); /* as the single-process bench */
        mha_status st = mha_mpi_layer_forward(c->ctx, c->layer, &c->y, NULL, &c->args);
        mha_tensor dx = c->y; /* dX into Y's memory: Y is not read by the backward */
        return st != MHA_OK ? st : mha_mpi_layer_backward(c->ctx, c->layer, &c->args, &c->g, &dx, &dx, &dx);
    }
    if (strcmp(o->op, "decode") == 0)
        return mha_mpi_kv_cache_attention(c->ctx, MPI_COMM_WORLD, c->shard, &c->out, NULL, &c->q, &c->desc);
    return o->backward ? sequence_backward(c) : sequence_forward(c);
}

static void case_free(par_case *c)
{
    mha_mpi_layer_free(c->layer);
    mha_layer_tape_free(c->tape);
    mha_kv_cache_free(c->shard);
    mha_layer_free(c->cache_shape);
    mha_ctx_free(c->ctx);
    free(c->mem);
}

static mha_status setup(par_case *c)
{
    const cli_bench_shape *o = c->o;
    mha_status st = mha_ctx_create((int)o->threads, &c->ctx);
    if (st != MHA_OK) return st;
    if (strcmp(o->parallel, "heads") == 0) return setup_heads(c);
    if (strcmp(o->op, "decode") == 0) return setup_decode(c);
    st = setup_sequence(c, strcmp(o->parallel, "ring") == 0 && o->causal);
    if (st == MHA_OK && o->backward) st = sequence_forward(c); /* the forward's output and lse */
    return st;
}

/* Medians over the calls of the slowest rank's time and of the most any
 * rank spent in exposed transfers (ms). */
static void report(const par_case *c, double *ms, double *xfer, int n)
{
    const cli_bench_shape *o = c->o;
    qsort(ms, (size_t)n, sizeof *ms, cli_cmp_double);
    qsort(xfer, (size_t)n, sizeof *xfer, cli_cmp_double);
    double median = n % 2 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
    double moved = n % 2 ? xfer[n / 2] : 0.5 * (xfer[n / 2 - 1] + xfer[n / 2]);
    if (c->rank != 0) return;
    if (o->json)
        printf("{\"op\":\"%s\",\"parallel\":\"%s\",\"ranks\":%d,\"threads\":%d,\"batch\":%lld,\"seq\":%lld,"
               "\"kv_seq\":%lld,\"embed_dim\":%lld,\"num_heads\":%lld,\"num_kv_heads\":%lld,\"causal\":%s,"
               "\"median_ms\":%.4f,\"min_ms\":%.4f,\"max_ms\":%.4f,\"transfer_ms\":%.4f}\n",
               o->op, o->parallel, c->size, mha_ctx_threads(c->ctx), (long long)o->batch, (long long)o->seq,
               (long long)o->kv_seq, (long long)o->embed_dim, (long long)o->num_heads, (long long)o->num_kv_heads,
               o->causal ? "true" : "false", median, ms[0], ms[n - 1], moved);
    else
        printf("%s --parallel %s, %d ranks x %d threads, B=%lld N=%lld S=%lld E=%lld h=%lld kv=%lld%s: median %.3f "
               "ms (min %.3f, max %.3f), of which %.3f ms in transfers not hidden by compute\n",
               o->op, o->parallel, c->size, mha_ctx_threads(c->ctx), (long long)o->batch, (long long)o->seq,
               (long long)o->kv_seq, (long long)o->embed_dim, (long long)o->num_heads, (long long)o->num_kv_heads,
               o->causal ? " causal" : "", median, ms[0], ms[n - 1], moved);
}

int cli_bench_parallel(const cli_bench_shape *o)
{
    par_case c = {.o = o};
    c.rank = cli_rank(), c.size = cli_ranks();
    double *ms = malloc((size_t)o->repeat * 2 * sizeof(double)), *xfer = ms ? ms + o->repeat : NULL;
    mha_status st = ms ? setup(&c) : MHA_ERR_NOMEM;
    for (int w = 0; st == MHA_OK && w < 2; w++) st = run_once(&c); /* warm-up */
    for (int64_t r = 0; st == MHA_OK && r < o->repeat; r++) {
        MPI_Barrier(MPI_COMM_WORLD);
        (void)mha_mpi_transfer_seconds();
        double t0 = cli_now_ms();
        st = run_once(&c);
        double mine[2] = {cli_now_ms() - t0, 1e3 * mha_mpi_transfer_seconds()}, most[2];
        MPI_Allreduce(mine, most, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
        ms[r] = most[0], xfer[r] = most[1];
    }
    if (st == MHA_OK) report(&c, ms, xfer, (int)o->repeat);
    else cli_lib_error(CMD, NULL);
    free(ms);
    case_free(&c);
    return st == MHA_OK ? CLI_OK : CLI_FAIL;
}
