/*
 * parallel.c -- execution contexts: a persistent pool of worker threads,
 * the workspace, and the fork-join loop.
 *
 * A context starts its n - 1 workers once, at creation.  Threads started
 * per call begin on their parent's CPU and are only spread out by the
 * scheduler milliseconds later, which halved the speed of 6 ms GEMMs; a
 * long-lived worker wakes on the CPU it last ran on.  Between calls the
 * workers spin for up to SPIN_NS (a call that follows soon costs no
 * wake-up) and then sleep on a condition variable.
 *
 * Chunks are assigned by thread number, so results never depend on which
 * thread finishes first.  Work made of independent items can instead be
 * shared out as it goes (mha__parallel_items): each thread claims the next
 * item from a counter, so a thread whose CPU is busy with other work
 * leaves its items to the others instead of holding up the call.
 */
#define _POSIX_C_SOURCE 200809L

#include "core/parallel.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

enum { MAX_THREADS = 1024 };

/* How long a thread spins, waiting for the next job or for the workers to
 * finish one, before it sleeps.  Within a training step's few hundred
 * calls a worker often waits tens to hundreds of microseconds (for the
 * caller to finish its share of a job, or for short serial work), and
 * each sleep costs a wake-up.  The layer's forward + backward at S2 on
 * Sapphire Rapids, 5 alternating rounds: spinning 5 us (the 20000 rounds
 * before) 31.4 ms, 50 us 30.2, 200 us 29.0; in another run 5 us 30.7,
 * 200 us 28.7, 500 us 29.1, 2 ms 29.2.  Between the calls of a step made
 * from Python (the PyTorch drop-in's forward, autograd, its backward) the
 * caller is away for 0.5-1 ms, and after a sleep that long the next call
 * ran 3-8% slower than back to back: the same C calls in a loop with a
 * 0.75 ms nanosleep before each, S2, 5 alternating runs, 31.2 ms a step
 * spinning 200 us against 30.5 spinning 2 ms and 30.3 with no pause; the
 * drop-in's step 32.5 ms against 31.5 (1, 2 and 5 ms alike).  So 2 ms.
 * Past YIELD_AFTER_NS the spin yields at each look at the clock, so that
 * a thread it waits for, or another process, gets the CPU when there are
 * more threads than CPUs: without that, `ctest -j2` (two test processes
 * of 2-3 threads on 2 CPUs) took 103 s against 51 s; with it 46 s (46 s
 * spinning 2 ms too, and the MPI suites' ranks 20.5 s either way).
 * Timed, not counted, since a round's length differs between CPUs. */
enum { SPIN_NS = 2000 * 1000, YIELD_AFTER_NS = 5 * 1000, SPIN_CHECK = 256 };

int64_t mha__now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Whether a spin that began at `start` may go on past round i; the clock
 * is read (and the CPU offered to others) every SPIN_CHECK rounds. */
static bool may_spin(int64_t start, int64_t i)
{
    if (i % SPIN_CHECK != 0) return true;
    int64_t spun = mha__now_ns() - start;
    if (spun >= YIELD_AFTER_NS) sched_yield();
    return spun < SPIN_NS;
}

/* The job every worker runs its share of: chunk number `thread` of
 * n_chunks, or, when `claimed` is set, runs of items claimed from it. */
typedef struct job {
    mha__range_fn fn;
    void *arg;
    int64_t n_items;
    int n_chunks;
    atomic_int_fast64_t *claimed; /* items handed out so far */
    int64_t group;                /* claimed: items that share a cache, handed out together while many are left */
} job;

typedef struct pool {
    pthread_t *threads;
    int n_workers; /* threads started */
    pthread_mutex_t lock;
    pthread_cond_t wake, done;
    job current;
    atomic_uint_fast64_t generation; /* bumped for each job and for shutdown */
    atomic_int pending;              /* workers still busy with the job */
    bool stop;
} pool;

struct mha_ctx {
    int n_threads;
    pool pool;
    char *ws; /* the workspace: ws_cap bytes, of which [0, ws_top) are taken */
    int64_t ws_cap, ws_top;
    void *kept[MHA__KEPT_SLOTS]; /* mha__kept's buffers, kept_bytes[i] each */
    int64_t kept_bytes[MHA__KEPT_SLOTS];
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

/* How many items the next run takes, `left` being left: a (2 x
 * threads)th of them, at least one -- long runs while much is left keep
 * a thread's items together (a GEMM's panels stay in its cache), short
 * ones at the end even out the finish.  With groups, whole groups (at
 * least one) while more than one a thread is left, so that a thread
 * starts a group only where no other has: each group's first items fill
 * a cache of the thread's that the rest reuse. */
static int64_t claim_length(const job *j, int64_t left)
{
    int64_t run = left / (2 * j->n_chunks);
    if (j->group > 1 && left > j->n_chunks * j->group) return (run / j->group > 1 ? run / j->group : 1) * j->group;
    return run > 1 ? run : 1;
}

/* The next run of a shared-out job's items, [*begin, *end)
 * (claim_length's length).  False when none is left. */
static bool claim(const job *j, int64_t *begin, int64_t *end)
{
    int64_t at = atomic_load_explicit(j->claimed, memory_order_relaxed), run;
    do {
        if (at >= j->n_items) return false;
        run = claim_length(j, j->n_items - at);
    } while (
        !atomic_compare_exchange_weak_explicit(j->claimed, &at, at + run, memory_order_relaxed, memory_order_relaxed));
    *begin = at;
    *end = at + run;
    return true;
}

static void run_chunk(const job *j, int chunk)
{
    if (chunk >= j->n_chunks) return;
    if (j->claimed) {
        int64_t begin, end;
        while (claim(j, &begin, &end)) j->fn(j->arg, chunk, begin, end);
        return;
    }
    int64_t begin = j->n_items * chunk / j->n_chunks, end = j->n_items * (chunk + 1) / j->n_chunks;
    if (begin < end) j->fn(j->arg, chunk, begin, end);
}

typedef struct worker_arg {
    mha_ctx *ctx;
    int index; /* 1 .. n_threads - 1; the caller is 0 */
} worker_arg;

/* Wait for a generation other than `seen`: spin first, then sleep. */
static uint64_t wait_for_work(pool *p, uint64_t seen)
{
    int64_t start = mha__now_ns();
    for (int64_t i = 1; may_spin(start, i); i++) {
        uint64_t g = atomic_load_explicit(&p->generation, memory_order_acquire);
        if (g != seen) return g;
    }
    pthread_mutex_lock(&p->lock);
    uint64_t g;
    while ((g = atomic_load_explicit(&p->generation, memory_order_acquire)) == seen)
        pthread_cond_wait(&p->wake, &p->lock);
    pthread_mutex_unlock(&p->lock);
    return g;
}

static void *worker_main(void *raw)
{
    worker_arg *w = raw;
    pool *p = &w->ctx->pool;
    int index = w->index;
    mha__free(w);
    uint64_t seen = 0;
    for (;;) {
        seen = wait_for_work(p, seen);
        if (p->stop) return NULL;
        run_chunk(&p->current, index);
        if (atomic_fetch_sub_explicit(&p->pending, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&p->lock);
            pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->lock);
        }
    }
}

static void pool_stop(pool *p)
{
    pthread_mutex_lock(&p->lock);
    p->stop = true;
    atomic_fetch_add_explicit(&p->generation, 1, memory_order_release);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    for (int t = 0; t < p->n_workers; t++) pthread_join(p->threads[t], NULL);
    mha__free(p->threads);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
    pthread_mutex_destroy(&p->lock);
}

/* Start n - 1 workers.  Fewer may start if the system refuses threads;
 * the context then runs with as many as it got. */
static mha_status pool_start(mha_ctx *ctx, int n)
{
    pool *p = &ctx->pool;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    atomic_init(&p->generation, 0);
    atomic_init(&p->pending, 0);
    p->threads = mha__calloc(n > 1 ? n - 1 : 1, sizeof(pthread_t));
    if (!p->threads) {
        pthread_cond_destroy(&p->wake);
        pthread_cond_destroy(&p->done);
        pthread_mutex_destroy(&p->lock);
        return mha__fail(MHA_ERR_NOMEM, "out of memory for %d threads", n);
    }
    for (int t = 1; t < n; t++) {
        worker_arg *w = mha__alloc(1, sizeof *w);
        if (!w) break;
        *w = (worker_arg){ctx, t};
        if (pthread_create(&p->threads[p->n_workers], NULL, worker_main, w) != 0) {
            mha__free(w);
            break;
        }
        p->n_workers++;
    }
    ctx->n_threads = p->n_workers + 1;
    return MHA_OK;
}

mha_status mha_ctx_create(int n_threads, mha_ctx **out_ctx)
{
    if (!out_ctx) return mha__fail(MHA_ERR_MISUSE, "mha_ctx_create: out_ctx is NULL");
    *out_ctx = NULL;
    if (n_threads < 0 || n_threads > MAX_THREADS)
        return mha__fail(MHA_ERR_INVALID_ARG, "thread count %d is outside 0..%d (0 = all CPUs)", n_threads,
                         MAX_THREADS);
    mha_ctx *ctx = mha__calloc(1, sizeof *ctx);
    if (!ctx) return MHA_ERR_NOMEM;
    mha_status st = pool_start(ctx, n_threads ? n_threads : default_threads());
    if (st != MHA_OK) {
        mha__free(ctx);
        return st;
    }
    *out_ctx = ctx;
    return MHA_OK;
}

void mha_ctx_free(mha_ctx *ctx)
{
    if (!ctx) return;
    pool_stop(&ctx->pool);
    mha__free(ctx->ws);
    for (int i = 0; i < MHA__KEPT_SLOTS; i++) mha__free(ctx->kept[i]);
    mha__free(ctx);
}

int mha_ctx_threads(const mha_ctx *ctx) { return ctx ? ctx->n_threads : 0; }

int64_t mha__pad_to_line(int64_t bytes) { return (bytes + 63) / 64 * 64; }

/* Runs job j (its n_chunks chunks, or its items) on the pool. */
static void run_job(mha_ctx *ctx, job j)
{
    pool *p = &ctx->pool;
    int n = j.n_chunks;
    if (n <= 1 || p->n_workers == 0) {
        run_chunk(&j, 0);
        if (n > 1) /* no workers: run their chunks here, same split */
            for (int c = 1; c < n; c++) run_chunk(&j, c);
        return;
    }
    /* Every worker takes part (those past n_chunks return at once), so
     * `pending` counts them all. */
    p->current = j;
    atomic_store_explicit(&p->pending, p->n_workers, memory_order_relaxed);
    pthread_mutex_lock(&p->lock);
    atomic_fetch_add_explicit(&p->generation, 1, memory_order_release);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    run_chunk(&j, 0);
    int64_t start = mha__now_ns();
    for (int64_t i = 1; may_spin(start, i) && atomic_load_explicit(&p->pending, memory_order_acquire) > 0; i++) {}
    pthread_mutex_lock(&p->lock);
    while (atomic_load_explicit(&p->pending, memory_order_acquire) > 0) pthread_cond_wait(&p->done, &p->lock);
    pthread_mutex_unlock(&p->lock);
}

void mha__parallel_for(mha_ctx *ctx, int64_t n_items, mha__range_fn fn, void *arg)
{
    int n = ctx->n_threads;
    if (n_items < n) n = (int)n_items;
    run_job(ctx, (job){fn, arg, n_items, n, NULL, 1});
}

void mha__parallel_groups(mha_ctx *ctx, int64_t n_items, int64_t group, mha__range_fn fn, void *arg)
{
    int n = ctx->n_threads;
    if (n_items < n) n = (int)n_items;
    atomic_int_fast64_t claimed;
    atomic_init(&claimed, 0);
    run_job(ctx, (job){fn, arg, n_items, n, &claimed, group > 1 ? group : 1});
}

void mha__parallel_items(mha_ctx *ctx, int64_t n_items, mha__range_fn fn, void *arg)
{
    mha__parallel_groups(ctx, n_items, 1, fn, arg);
}

/* ---------------------------------------------------------------- */
/* Workspace                                                         */
/* ---------------------------------------------------------------- */

/* What a take of `bytes` occupies: whole cache lines, and after a region
 * of a page or more, half a page more, so that the next region starts at
 * another offset within a 4 KiB page.  Loads from one buffer and stores
 * to the next (the layer's activations and the attention tiles) then do
 * not alias on the low address bits, as they did when the two came from
 * separate allocations.  Measured at N = 512 against the same build
 * without it (bench/compare_builds.py, 25 rounds): 1.020x and 1.006x,
 * within this machine's noise.  -1 if it overflows. */
static int64_t take_size(int64_t bytes)
{
    if (bytes < 0 || bytes > INT64_MAX - 4096) return -1;
    int64_t size = mha__pad_to_line(bytes);
    return size >= 4096 ? size + 2048 : size;
}

bool mha__ws_add(int64_t *total, int64_t bytes, const char *what)
{
    int64_t size = take_size(bytes);
    if (size >= 0 && mha__add(*total, size, total)) return true;
    mha__fail(MHA_ERR_INVALID_ARG, "the workspace for %s overflows 64 bits", what);
    return false;
}

/* A slice per thread, each `floats` floats rounded up to a line. */
static bool per_thread_bytes(int threads, int64_t floats, int64_t *stride, int64_t *bytes)
{
    return mha__mul(floats, (int64_t)sizeof(float), stride) && *stride <= INT64_MAX - 63 &&
           mha__mul(*stride = mha__pad_to_line(*stride), threads, bytes);
}

bool mha__ws_add_per_thread(int64_t *total, const mha_ctx *ctx, int64_t floats, const char *what)
{
    int64_t stride, bytes;
    if (per_thread_bytes(ctx->n_threads, floats, &stride, &bytes)) return mha__ws_add(total, bytes, what);
    mha__fail(MHA_ERR_INVALID_ARG, "the workspace for %s overflows 64 bits", what);
    return false;
}

mha_status mha__ws_reserve(mha_ctx *ctx, int64_t bytes)
{
    if (bytes <= ctx->ws_cap - ctx->ws_top) return MHA_OK;
    if (ctx->ws_top > 0)
        return mha__fail(MHA_ERR_INTERNAL, "a nested call needs %lld workspace bytes the plan did not reserve",
                         (long long)bytes);
    char *grown = mha__alloc(bytes, 1);
    if (!grown) return MHA_ERR_NOMEM;
    mha__free(ctx->ws);
    ctx->ws = grown;
    ctx->ws_cap = bytes;
    return MHA_OK;
}

void *mha__ws_take(mha_ctx *ctx, int64_t bytes)
{
    int64_t size = take_size(bytes);
    if (size < 0 || size > ctx->ws_cap - ctx->ws_top) {
        mha__fail(MHA_ERR_INTERNAL, "taking %lld workspace bytes beyond the %lld the plan reserved", (long long)bytes,
                  (long long)ctx->ws_cap);
        return NULL;
    }
    char *at = ctx->ws + ctx->ws_top;
    ctx->ws_top += size;
    return at;
}

char *mha__ws_take_per_thread(mha_ctx *ctx, int64_t floats, int64_t *stride)
{
    int64_t bytes;
    if (!per_thread_bytes(ctx->n_threads, floats, stride, &bytes)) bytes = -1;
    return mha__ws_take(ctx, bytes);
}

int64_t mha__ws_top(const mha_ctx *ctx) { return ctx->ws_top; }

mha_status mha_ctx_reserve(mha_ctx *ctx, int64_t bytes)
{
    if (!ctx) return mha__fail(MHA_ERR_MISUSE, "mha_ctx_reserve: ctx is NULL");
    if (bytes < 0) return mha__fail(MHA_ERR_INVALID_ARG, "cannot reserve %lld bytes", (long long)bytes);
    return mha__ws_reserve(ctx, bytes);
}

int64_t mha_ctx_workspace_bytes(const mha_ctx *ctx) { return ctx ? ctx->ws_cap : 0; }

void mha__ws_release(mha_ctx *ctx, int64_t top) { ctx->ws_top = top; }

void *mha__kept(mha_ctx *ctx, int slot, int64_t bytes)
{
    if (bytes < 1) bytes = 1; /* a buffer even for nothing, as mha__alloc gives: NULL means NOMEM */
    if (bytes <= ctx->kept_bytes[slot]) return ctx->kept[slot];
    mha__free(ctx->kept[slot]); /* first, so the old and new never need room together */
    ctx->kept_bytes[slot] = 0;
    ctx->kept[slot] = mha__alloc(bytes, 1);
    if (ctx->kept[slot]) ctx->kept_bytes[slot] = bytes;
    return ctx->kept[slot];
}
