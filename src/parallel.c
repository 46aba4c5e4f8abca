/*
 * parallel.c -- execution contexts and the fork-join loop.
 *
 * Threads are started per call with pthreads.  That costs tens of
 * microseconds, which is noise next to the work of one attention call
 * today; a persistent pool can replace it behind the same interface.
 */
#define _POSIX_C_SOURCE 200809L

#include "parallel.h"

#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

enum { MAX_THREADS = 1024 };

struct mha_ctx {
    int     n_threads;
    void   *scratch[MHA_SCRATCH_COUNT];
    int64_t scratch_bytes[MHA_SCRATCH_COUNT];
};

static int default_threads(void)
{
    const char *env = getenv("MHA_NUM_THREADS");
    if (env && *env) {
        char *end;
        long n = strtol(env, &end, 10);
        if (*end == '\0' && n >= 1 && n <= MAX_THREADS) return (int)n;
    }
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    return online >= 1 && online <= MAX_THREADS ? (int)online : 1;
}

mha_status mha_ctx_create(int n_threads, mha_ctx **out_ctx)
{
    if (!out_ctx) return mha__fail(MHA_ERR_MISUSE, "mha_ctx_create: out_ctx is NULL");
    *out_ctx = NULL;
    if (n_threads < 0 || n_threads > MAX_THREADS)
        return mha__fail(MHA_ERR_INVALID_ARG, "thread count %d is outside 0..%d (0 = all CPUs)",
                         n_threads, MAX_THREADS);
    mha_ctx *ctx = mha__calloc(1, sizeof *ctx);
    if (!ctx) return MHA_ERR_NOMEM;
    ctx->n_threads = n_threads ? n_threads : default_threads();
    *out_ctx = ctx;
    return MHA_OK;
}

void mha_ctx_free(mha_ctx *ctx)
{
    if (!ctx) return;
    for (int s = 0; s < MHA_SCRATCH_COUNT; s++) mha__free(ctx->scratch[s]);
    mha__free(ctx);
}

int mha_ctx_threads(const mha_ctx *ctx) { return ctx ? ctx->n_threads : 0; }

void *mha__ctx_scratch(mha_ctx *ctx, mha__scratch_slot slot, int64_t bytes)
{
    if (bytes <= ctx->scratch_bytes[slot]) return ctx->scratch[slot];
    void *grown = mha__alloc(bytes, 1);
    if (!grown) return NULL;
    mha__free(ctx->scratch[slot]);
    ctx->scratch[slot] = grown;
    ctx->scratch_bytes[slot] = bytes;
    return grown;
}

int64_t mha__pad_to_line(int64_t bytes) { return (bytes + 63) / 64 * 64; }

typedef struct chunk {
    mha__range_fn fn;
    void   *arg;
    int     thread;
    int64_t begin, end;
} chunk;

static void *run_chunk(void *p)
{
    chunk *c = p;
    c->fn(c->arg, c->thread, c->begin, c->end);
    return NULL;
}

void mha__parallel_for(mha_ctx *ctx, int64_t n_items, mha__range_fn fn, void *arg)
{
    int n = ctx->n_threads;
    if (n_items < n) n = (int)n_items;
    if (n <= 1) {
        if (n_items > 0) fn(arg, 0, 0, n_items);
        return;
    }
    chunk chunks[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    bool started[MAX_THREADS];
    for (int t = 0; t < n; t++)
        chunks[t] = (chunk){fn, arg, t, n_items * t / n, n_items * (t + 1) / n};
    for (int t = 1; t < n; t++)
        started[t] = pthread_create(&tids[t], NULL, run_chunk, &chunks[t]) == 0;
    run_chunk(&chunks[0]);
    /* A thread that could not start has its chunk run here instead; the
     * result is the same, only slower. */
    for (int t = 1; t < n; t++) {
        if (started[t]) pthread_join(tids[t], NULL);
        else run_chunk(&chunks[t]);
    }
}
