/*
 * parallel.c -- `--parallel` of the file commands under mpirun: the
 * session every rank takes part in (agreeing on each step's status, one
 * rank printing the library's errors) and the head-parallel engine of the
 * layer commands.  Built without MPI, a session cannot begin and the
 * commands say so; everything else here is then a single process's.
 */
#include "cli.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef MHA_CLI_MPI
#include "mha_mpi.h"
#endif

/* The session: this process's rank and the number of ranks (1 outside
 * one, where every step is this process's alone); whether MPI was
 * started here. */
static int session_rank = 0, session_ranks = 1;
static bool started_mpi = false;

#ifdef MHA_CLI_MPI
static const char *session_mode = ""; /* --parallel's */
#endif

int cli_rank(void) { return session_rank; }

int cli_ranks(void) { return session_ranks; }

int cli_parallel_begin(const char *cmd, const char *mode, const char *const *modes)
{
    int i = 0;
    while (modes[i] && strcmp(modes[i], mode) != 0) i++;
    if (!modes[i]) {
        char list[96] = "";
        for (int j = 0; modes[j]; j++)
            snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", j ? " or " : "", modes[j]);
        cli_error(cmd, "--parallel must be %s for mha %s, got \"%s\"", list, cmd, mode);
        return CLI_USAGE;
    }
#ifdef MHA_CLI_MPI
    session_mode = mode;
    int running = 0;
    MPI_Initialized(&running);
    if (!running) MPI_Init(NULL, NULL);
    started_mpi = !running;
    MPI_Comm_rank(MPI_COMM_WORLD, &session_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &session_ranks);
    return CLI_OK;
#else
    cli_error(cmd, "--parallel needs MPI: this mha was built without it (apt-get install libopenmpi-dev "
                   "openmpi-bin, then rebuild)");
    return CLI_USAGE;
#endif
}

int cli_agree(int rc)
{
#ifdef MHA_CLI_MPI
    if (session_ranks > 1) {
        int worst = rc;
        MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
        return worst;
    }
#endif
    return rc;
}

int cli_parallel_end(int rc)
{
    rc = cli_agree(rc);
#ifdef MHA_CLI_MPI
    if (started_mpi) MPI_Finalize();
#endif
    started_mpi = false;
    session_rank = 0, session_ranks = 1;
    return rc;
}

#ifdef MHA_CLI_MPI
/* ------------------------------------------------------------------ */
/* The head-parallel engine                                            */
/* ------------------------------------------------------------------ */

static mha_status heads_forward(mha_ctx *ctx, void *layer, mha_tensor *y, mha_tensor *w, const mha_layer_fwd_args *a)
{
    return mha_mpi_layer_forward(ctx, layer, y, w, a);
}

static mha_status heads_backward(mha_ctx *ctx, void *layer, const mha_layer_fwd_args *a, const mha_tensor *dy,
                                 mha_tensor *dq, mha_tensor *dk, mha_tensor *dv)
{
    return mha_mpi_layer_backward(ctx, layer, a, dy, dq, dk, dv);
}

static mha_status heads_get_grad(const void *layer, const char *name, float *dst, int64_t numel)
{
    return mha_mpi_layer_get_grad(layer, name, dst, numel);
}

static mha_status heads_decode(mha_ctx *ctx, void *layer, mha_kv_cache *cache, mha_tensor *y, const mha_tensor *x)
{
    return mha_mpi_layer_decode(ctx, layer, cache, y, x);
}

static void heads_free(void *layer) { mha_mpi_layer_free(layer); }

static int engine_heads(const char *cmd, const cli_layer_opts *o, mha_layer_desc *hints, cli_engine *e)
{
    mha_st_file *wf = NULL;
    mha_weight_names names;
    mha_layer_load_plan plan;
    cli_layer_hints(o, hints, &names);
    int rc = cli_open(cmd, "--weights", o->weights, &wf);
    if (rc == CLI_OK && mha_layer_plan_load(wf, o->prefix, names, hints, &plan) != MHA_OK) {
        cli_error(cmd, "--weights %s: %s", o->weights, mha_last_error());
        rc = CLI_FAIL;
    }
    mha_mpi_layer *layer = NULL;
    if ((rc = cli_agree(rc)) == CLI_OK && mha_mpi_layer_load(MPI_COMM_WORLD, wf, &plan, &layer) != MHA_OK) {
        cli_lib_error(cmd, o->weights);
        rc = CLI_FAIL;
    }
    mha_st_close(wf);
    if (rc != CLI_OK) return rc;
    *e = (cli_engine){.layer = layer,
                      .local = mha_mpi_layer_local(layer),
                      .desc = plan.desc,
                      .n_weights = plan.n_weights,
                      .writes = session_rank == 0,
                      .forward = heads_forward,
                      .backward = heads_backward,
                      .get_grad = heads_get_grad,
                      .decode = heads_decode,
                      .free = heads_free};
    for (int i = 0; i < plan.n_weights; i++) {
        const mha_st_info *info = &plan.weights[i];
        e->weights[i] = (cli_weight){.name = plan.weight_names[i], .rank = info->rank, .numel = info->numel};
        memcpy(e->weights[i].shape, info->shape, (size_t)info->rank * sizeof info->shape[0]);
    }
    return CLI_OK;
}
#endif

#ifdef MHA_CLI_MPI
/* The ring's decoding step: the layer whole, the cache this rank's shard. */
static mha_status ring_decode(mha_ctx *ctx, void *layer, mha_kv_cache *shard, mha_tensor *y, const mha_tensor *x)
{
    return mha_mpi_kv_cache_decode(ctx, MPI_COMM_WORLD, layer, shard, y, x);
}

static int64_t ring_capacity(int64_t tokens)
{
    int64_t start[2], rows[2];
    mha_mpi_layout_rows(MHA_MPI_BLOCKS, tokens, session_ranks, session_rank, start, rows);
    return rows[0] > 0 ? rows[0] : 1; /* a cache holds at least one token */
}
#endif

int cli_engine_load(const char *cmd, const cli_layer_opts *o, mha_layer_desc *hints, cli_engine *e)
{
    memset(e, 0, sizeof *e);
#ifdef MHA_CLI_MPI
    if (session_ranks > 1 && strcmp(session_mode, "heads") == 0) return engine_heads(cmd, o, hints, e);
    if (session_ranks > 1) { /* ring: every rank the whole layer */
        int rc = cli_agree(cli_engine_single(cmd, o, hints, e));
        e->decode = ring_decode, e->cache_capacity = ring_capacity, e->writes = session_rank == 0;
        return rc;
    }
#endif
    return cli_engine_single(cmd, o, hints, e);
}
