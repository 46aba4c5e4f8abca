/*
 * parallel_sdpa.c -- `mpirun -np P mha sdpa|sdpa-backward ... --parallel
 * ring|ulysses`: each rank reads only its rows of query, key, value (and
 * grad_output) from the inputs file, the sequence computes over the ranks
 * (mha_mpi.h), and rank 0 gathers the rows and writes the outputs, the
 * same tensors as one process writes.  The rows a rank holds: the ring's
 * zigzag layout under causal masking (every rank the same work), else one
 * even block each.
 */
#include "cli.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mha_mpi.h"

/* One [B, H, T, W] tensor of the problem, as this rank holds it: the rows
 * of `rows` runs of the whole, contiguous [B, H, own, W]. */
typedef struct part {
    const char *name;
    int64_t shape[4]; /* the whole tensor's */
    int64_t own;      /* rows held here */
    float *data;
} part;

typedef struct seq_job {
    const cli_sdpa_opts *o;
    mha_mpi_layout layout;
    int rank, size;
    part q, k, v, grad, out, lse, dq, dk, dv;
    mha_ctx *ctx;
    mha_attn_desc desc;
} seq_job;

static void part_init(part *p, const seq_job *j, const char *name, const int64_t shape[4])
{
    int64_t start[2], rows[2];
    mha_mpi_layout_rows(j->layout, shape[2], j->size, j->rank, start, rows);
    *p = (part){.name = name, .own = rows[0] + rows[1]};
    memcpy(p->shape, shape, sizeof p->shape);
}

static int64_t part_numel(const part *p) { return p->shape[0] * p->shape[1] * p->own * p->shape[3]; }

static mha_tensor part_view(const part *p)
{
    return mha_tensor_4d(p->data, p->shape[0], p->shape[1], p->own, p->shape[3]);
}

/* Reads this rank's rows of p from the file, a run of rows per (batch,
 * head): nothing else of the tensor is read. */
static mha_status read_part(const seq_job *j, mha_st_file *f, part *p)
{
    int64_t start[2], rows[2], T = p->shape[2], W = p->shape[3], at = 0;
    mha_mpi_layout_rows(j->layout, T, j->size, j->rank, start, rows);
    for (int64_t bh = 0; bh < p->shape[0] * p->shape[1]; bh++)
        for (int run = 0; run < 2; run++) {
            if (rows[run] == 0) continue;
            mha_status st = mha_st_read_f32_range(f, p->name, (bh * T + start[run]) * W, rows[run] * W, p->data + at);
            if (st != MHA_OK) return st;
            at += rows[run] * W;
        }
    return MHA_OK;
}

/* Gathers every rank's rows of p into `whole` on rank 0 (in the file's
 * order).  Collective; fails past INT_MAX floats in all. */
static int gather_part(const seq_job *j, const part *p, float *whole)
{
    int *counts = NULL, *offsets = NULL;
    float *all = NULL;
    int64_t total = p->shape[0] * p->shape[1] * p->shape[2] * p->shape[3];
    bool ok = total <= INT_MAX; /* so every count and offset fits an int */
    if (j->rank == 0 && ok) {
        counts = calloc((size_t)j->size, sizeof(int)), offsets = calloc((size_t)j->size, sizeof(int));
        all = malloc((size_t)(total ? total : 1) * sizeof(float));
        ok = counts && offsets && all;
    }
    if (!ok) cli_error(j->o->cmd, "cannot gather %s: out of memory or past INT_MAX floats", p->name);
    int rc = cli_agree(ok ? CLI_OK : CLI_FAIL);
    for (int r = 0; rc == CLI_OK && j->rank == 0 && r < j->size; r++) { /* rank r's rows, from the layout */
        int64_t start[2], rows[2];
        mha_mpi_layout_rows(j->layout, p->shape[2], j->size, r, start, rows);
        counts[r] = (int)(p->shape[0] * p->shape[1] * (rows[0] + rows[1]) * p->shape[3]);
        offsets[r] = r ? offsets[r - 1] + counts[r - 1] : 0;
    }
    if (rc == CLI_OK)
        MPI_Gatherv(p->data, (int)part_numel(p), MPI_FLOAT, all, counts, offsets, MPI_FLOAT, 0, MPI_COMM_WORLD);
    int64_t T = p->shape[2], W = p->shape[3];
    for (int r = 0; rc == CLI_OK && j->rank == 0 && r < j->size; r++) { /* rank r's runs back in place */
        int64_t start[2], rows[2];
        const float *from = all + offsets[r];
        mha_mpi_layout_rows(j->layout, T, j->size, r, start, rows);
        for (int64_t bh = 0; bh < p->shape[0] * p->shape[1]; bh++)
            for (int run = 0; run < 2; run++) {
                memcpy(whole + (bh * T + start[run]) * W, from, (size_t)(rows[run] * W) * sizeof(float));
                from += rows[run] * W;
            }
    }
    free(counts), free(offsets), free(all);
    return rc;
}

/* This rank's parts: allocated, and the inputs' rows read. */
static int load_parts(seq_job *j, mha_st_file *f, cli_sdpa_inputs *in)
{
    const int64_t *qs = in->q.shape, *ks = in->k.shape, *vs = in->v.shape;
    int64_t out_shape[4] = {qs[0], qs[1], qs[2], vs[3]}, lse_shape[4] = {qs[0], qs[1], qs[2], 1};
    part_init(&j->q, j, "query", qs), part_init(&j->k, j, "key", ks), part_init(&j->v, j, "value", vs);
    part_init(&j->out, j, "output", out_shape), part_init(&j->lse, j, "lse", lse_shape);
    part_init(&j->grad, j, "grad_output", out_shape), part_init(&j->dq, j, "query.grad", qs);
    part_init(&j->dk, j, "key.grad", ks), part_init(&j->dv, j, "value.grad", vs);
    part *all[] = {&j->q, &j->k, &j->v, &j->out, &j->lse, &j->grad, &j->dq, &j->dk, &j->dv};
    int n = j->o->backward ? 9 : 5;
    for (int i = 0; i < n; i++)
        if (!(all[i]->data = malloc((size_t)(part_numel(all[i]) + 1) * sizeof(float)))) {
            cli_error(j->o->cmd, "out of memory for this rank's rows of %s", all[i]->name);
            return CLI_FAIL;
        }
    part *inputs[] = {&j->q, &j->k, &j->v, &j->grad};
    for (int i = 0; i < (j->o->backward ? 4 : 3); i++)
        if (read_part(j, f, inputs[i]) != MHA_OK) {
            cli_error(j->o->cmd, "%s: %s", j->o->inputs, mha_last_error());
            return CLI_FAIL;
        }
    return CLI_OK;
}

static mha_status forward(seq_job *j)
{
    mha_tensor q = part_view(&j->q), k = part_view(&j->k), v = part_view(&j->v), out = part_view(&j->out);
    if (strcmp(j->o->parallel, "ulysses") == 0)
        return mha_mpi_attention_ulysses(j->ctx, MPI_COMM_WORLD, &out, j->lse.data, &q, &k, &v, &j->desc);
    return mha_mpi_attention_ring(j->ctx, MPI_COMM_WORLD, j->layout, &out, j->lse.data, &q, &k, &v, &j->desc);
}

static mha_status backward(seq_job *j)
{
    mha_tensor q = part_view(&j->q), k = part_view(&j->k), v = part_view(&j->v), out = part_view(&j->out);
    mha_tensor g = part_view(&j->grad), dq = part_view(&j->dq), dk = part_view(&j->dk), dv = part_view(&j->dv);
    if (strcmp(j->o->parallel, "ulysses") == 0)
        return mha_mpi_attention_ulysses_backward(j->ctx, MPI_COMM_WORLD, &dq, &dk, &dv, &q, &k, &v, &out, j->lse.data,
                                                  &g, &j->desc);
    return mha_mpi_attention_ring_backward(j->ctx, MPI_COMM_WORLD, j->layout, &dq, &dk, &dv, &q, &k, &v, &out,
                                           j->lse.data, &g, &j->desc);
}

/* Rank 0 gathers the outputs and writes them; every rank takes part. */
static int save(const seq_job *j)
{
    const part *outs[3] = {&j->out, &j->lse, NULL};
    if (j->o->backward) outs[0] = &j->dq, outs[1] = &j->dk, outs[2] = &j->dv;
    int n = j->o->backward ? 3 : 2, rc = CLI_OK;
    float *whole[3] = {NULL, NULL, NULL};
    cli_output files[3];
    for (int i = 0; i < n && rc == CLI_OK; i++) {
        const int64_t *s = outs[i]->shape;
        if (j->rank == 0 && !(whole[i] = cli_alloc_floats(j->o->cmd, outs[i]->name, s, 4))) rc = CLI_FAIL;
        if ((rc = cli_agree(rc)) == CLI_OK) rc = gather_part(j, outs[i], whole[i]);
        files[i] = (cli_output){outs[i]->name, outs[i] == &j->lse ? 3 : 4, s, whole[i]};
    }
    if (rc == CLI_OK && j->rank == 0) rc = cli_save(j->o->cmd, j->o->out, files, n);
    for (int i = 0; i < 3; i++) free(whole[i]);
    return rc;
}

static int compute_and_save(seq_job *j)
{
    mha_status st = forward(j);
    if (st == MHA_OK && j->o->backward) st = backward(j);
    if (st != MHA_OK) {
        cli_lib_error(j->o->cmd, j->o->inputs);
        return CLI_FAIL;
    }
    return save(j);
}

int cli_sdpa_parallel(const cli_sdpa_opts *o)
{
    seq_job j = {.o = o};
    MPI_Comm_rank(MPI_COMM_WORLD, &j.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &j.size);
    bool causal = o->is_causal || o->bottom_right;
    j.layout = strcmp(o->parallel, "ring") == 0 && causal ? MHA_MPI_ZIGZAG : MHA_MPI_BLOCKS;
    mha_st_file *f = NULL;
    cli_sdpa_inputs in;
    memset(&in, 0, sizeof in);
    int rc = cli_open(o->cmd, "--inputs", o->inputs, &f);
    if (rc == CLI_OK) rc = cli_sdpa_load(o, f, &in, false); /* q, k, v, grad_output: their shapes */
    if (rc == CLI_OK) rc = cli_sdpa_desc(o, &in, &j.desc);
    if (rc == CLI_OK) rc = load_parts(&j, f, &in);
    if (rc == CLI_OK) rc = cli_ctx(o->cmd, o->threads, &j.ctx);
    if ((rc = cli_agree(rc)) == CLI_OK) rc = compute_and_save(&j);
    part *all[] = {&j.q, &j.k, &j.v, &j.out, &j.lse, &j.grad, &j.dq, &j.dk, &j.dv};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) free(all[i]->data);
    mha_ctx_free(j.ctx);
    cli_sdpa_inputs_free(&in);
    mha_st_close(f);
    return rc;
}
