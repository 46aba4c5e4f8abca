/*
 * peak.c -- the machine's measured float32 multiply-add peak, the yardstick
 * of every "percent of peak" the benchmarks report.
 */
#include "kernels/kernels.h"
#include "core/parallel.h"

#include <string.h>

static double now_seconds(void) { return 1e-9 * (double)mha__now_ns(); }

typedef struct peak_job {
    mha__peak_fn peak;
    int64_t iterations;
    double flops[1024];
} peak_job;

static void peak_range(void *arg, int thread, int64_t begin, int64_t end)
{
    peak_job *j = arg;
    (void)begin;
    (void)end;
    j->flops[thread] = j->peak(j->iterations);
}

/* FLOP/s of all threads running the peak loop together for `iterations`. */
static double run(mha_ctx *ctx, peak_job *j, int64_t iterations, double *seconds)
{
    int n = mha_ctx_threads(ctx);
    j->iterations = iterations;
    double t0 = now_seconds();
    mha__parallel_for(ctx, n, peak_range, j);
    *seconds = now_seconds() - t0;
    double total = 0;
    for (int t = 0; t < n; t++) total += j->flops[t];
    return total / *seconds;
}

mha_status mha_measure_peak(mha_ctx *ctx, mha_dtype dtype, double seconds, double *gflops)
{
    if (!ctx || !gflops) return mha__fail(MHA_ERR_MISUSE, "mha_measure_peak: NULL argument");
    if (!(seconds > 0 && seconds <= 60))
        return mha__fail(MHA_ERR_INVALID_ARG, "seconds must be in (0, 60], got %g", seconds);
    if (dtype != MHA_DTYPE_F32 && dtype != MHA_DTYPE_BF16)
        return mha__fail(MHA_ERR_INVALID_ARG, "dtype %s has no peak to measure; use F32 or BF16",
                         mha_dtype_name(dtype));
    peak_job *j = mha__alloc(1, sizeof *j); /* per call: calls from several threads do not share it */
    if (!j) return MHA_ERR_NOMEM;
    const mha__bf16_kernels *bk = mha__bf16_get();
    j->peak = dtype == MHA_DTYPE_BF16 && bk->peak ? bk->peak : mha__kernels_get()->peak;
    double took;
    int64_t iterations = 100000;
    run(ctx, j, iterations, &took);
    while (took < seconds / 20 && iterations < (INT64_C(1) << 40)) { /* calibrate */
        iterations *= 4;
        run(ctx, j, iterations, &took);
    }
    iterations = (int64_t)((double)iterations * (seconds / 3) / took) + 1;
    double best = 0;
    for (int rep = 0; rep < 3; rep++) { /* best of three: noise only slows it down */
        double rate = run(ctx, j, iterations, &took);
        if (rate > best) best = rate;
    }
    mha__free(j);
    *gflops = best / 1e9;
    return MHA_OK;
}

typedef struct copy_job {
    const char *src;
    char *dst;
    int64_t bytes, parts;
} copy_job;

static void copy_range(void *arg, int thread, int64_t begin, int64_t end)
{
    (void)thread;
    const copy_job *j = arg;
    for (int64_t part = begin; part < end; part++) {
        int64_t lo = j->bytes * part / j->parts, hi = j->bytes * (part + 1) / j->parts;
        memcpy(j->dst + lo, j->src + lo, (size_t)(hi - lo));
    }
}

/* The copies' size bound (mha.h), in one place: MHA_OK or the error. */
static mha_status check_copy_bytes(int64_t bytes)
{
    if (bytes < 4096 || bytes > (INT64_C(1) << 36))
        return mha__fail(MHA_ERR_INVALID_ARG, "bytes must be in 4 KiB .. 64 GiB, got %lld", (long long)bytes);
    return MHA_OK;
}

/* The copy split into parts, several per thread, so that a slow thread
 * does not hold up the rest. */
enum { COPY_PARTS = 64 };

mha_status mha_time_copy(mha_ctx *ctx, void *dst, const void *src, int64_t bytes, double *gbps)
{
    if (!ctx || !dst || !src || !gbps) return mha__fail(MHA_ERR_MISUSE, "mha_time_copy: NULL argument");
    mha_status st = check_copy_bytes(bytes);
    if (st != MHA_OK) return st;
    copy_job j = {src, dst, bytes, COPY_PARTS};
    double t0 = now_seconds();
    mha__parallel_for(ctx, j.parts, copy_range, &j);
    double took = now_seconds() - t0;
    *gbps = 2.0 * (double)bytes / (took > 1e-9 ? took : 1e-9) / 1e9; /* a clock that did not move: 1 ns */
    return MHA_OK;
}

mha_status mha_measure_bandwidth(mha_ctx *ctx, int64_t bytes, double *gbps)
{
    if (!ctx || !gbps) return mha__fail(MHA_ERR_MISUSE, "mha_measure_bandwidth: NULL argument");
    mha_status st = check_copy_bytes(bytes);
    if (st != MHA_OK) return st;
    char *src = mha__alloc(bytes, 1), *dst = mha__alloc(bytes, 1);
    if (!src || !dst) {
        mha__free(src);
        mha__free(dst);
        return MHA_ERR_NOMEM;
    }
    memset(src, 1, (size_t)bytes);
    memset(dst, 2, (size_t)bytes); /* fault every page in before timing */
    double best = 0;
    for (int rep = 0; rep < 10; rep++) { /* best of ten: noise only slows it down */
        double rate = 0;
        mha_time_copy(ctx, dst, src, bytes, &rate);
        best = rate > best ? rate : best;
    }
    mha__free(src);
    mha__free(dst);
    *gbps = best;
    return MHA_OK;
}
