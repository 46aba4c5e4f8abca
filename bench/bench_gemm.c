/*
 * bench_gemm.c -- libmha's projection GEMM against OpenBLAS's sgemm on the
 * projection shapes of the layer, side by side in one process:
 *     y [M, n] = x [M, k] W^T + b,   M = batch * seq, k = n = E (or n = 3E)
 * with the same thread count (OpenBLAS via openblas_set_num_threads).
 * libmha twice: its FMA GEMM, and the weight's path the layer takes
 * (mha__weight_linear: on a CPU with split products, float32 from three
 * bf16 parts on AMX; elsewhere the same FMA GEMM).  Two blocks of each,
 * interleaved; median of `repeat` runs each; prints GFLOP/s and the
 * ratios to OpenBLAS.  OpenBLAS's time includes writing the bias into y
 * first (its beta = 1 does the add), since ours includes the bias too.
 * Built only when OpenBLAS is installed (libopenblas-dev).
 *
 *     build/bench_gemm [threads] [repeat]
 */
#define _POSIX_C_SOURCE 200809L

#include "gemm/gemm.h"

#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

void openblas_set_num_threads(int num_threads);

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e3 * (double)ts.tv_sec + 1e-6 * (double)ts.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static float *filled(int64_t n)
{
    float *p = malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) p[i] = (float)((i * 7919) % 1000) / 1000.0f - 0.5f;
    return p;
}

/* One product of a shape, as each side computes it. */
typedef struct gemm_case {
    mha_ctx *ctx;
    const mha__kernels *kt;
    int64_t M, K, N;
    float *x, *y; /* (mha__mat's data is writable) */
    const float *w, *b;
    mha__packed fma;    /* libmha's FMA GEMM */
    mha__weight weight; /* the layer's path */
} gemm_case;

typedef enum { SIDE_BLAS, SIDE_FMA, SIDE_LAYER, SIDES } side;

static void run_once(gemm_case *g, side which)
{
    mha__mat xm = {g->x, g->K, 1, 0, 0}, ym = {g->y, g->N, 1, 0, 0};
    if (which == SIDE_FMA) {
        mha__linear(g->ctx, g->kt, g->M, &xm, &g->fma, g->b, &ym);
    } else if (which == SIDE_LAYER) {
        int64_t top = mha__ws_top(g->ctx);
        if (mha__weight_linear(g->ctx, &g->weight, g->M, &xm, g->b, &ym) != MHA_OK) {
            fprintf(stderr, "bench_gemm: %s\n", mha_last_error());
            exit(1);
        }
        mha__ws_release(g->ctx, top);
    } else {
        for (int64_t i = 0; i < g->M; i++) /* bias first, as PyTorch's addmm */
            for (int64_t j = 0; j < g->N; j++) g->y[i * g->N + j] = g->b[j];
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)g->M, (int)g->N, (int)g->K, 1.0f, g->x, (int)g->K,
                    g->w, (int)g->K, 1.0f, g->y, (int)g->N);
    }
}

/* Blocks, not alternating calls: OpenBLAS's threads spin for a while after
 * each call and would steal the cores from the next one. */
static void time_blocks(gemm_case *g, int repeat, double *times[SIDES])
{
    for (int block = 0; block < 2; block++) {
        for (int which = 0; which < SIDES; which++)
            for (int r = -2; r < repeat / 2; r++) { /* two warm-up calls */
                double t0 = now_ms();
                run_once(g, (side)which);
                if (r >= 0) times[which][block * (repeat / 2) + r] = now_ms() - t0;
            }
        struct timespec pause = {0, 300 * 1000 * 1000}; /* let OpenBLAS's threads go to sleep */
        nanosleep(&pause, NULL);
    }
}

static void fail(const char *what)
{
    fprintf(stderr, "bench_gemm: %s: %s\n", what, mha_last_error());
    exit(1);
}

int main(int argc, char **argv)
{
    int threads = argc > 1 ? atoi(argv[1]) : 2, repeat = argc > 2 ? atoi(argv[2]) : 10;
    repeat = repeat < 2 ? 2 : repeat / 2 * 2;
    static const struct {
        const char *name;
        int64_t rows, in, out;
    } shapes[] = {
        {"S1 Q/K/V/O  (B=8 N=128)", 1024, 768, 768}, {"S1 fused QKV", 1024, 768, 2304},
        {"S2 Q/K/V/O  (N=512)", 512, 768, 768},      {"S3 Q/K/V/O  (N=2048)", 2048, 768, 768},
        {"S4 Q/K/V/O  (N=8192)", 8192, 768, 768},
    };
    mha_ctx *ctx;
    if (mha_ctx_create(threads, &ctx) != MHA_OK) fail("context");
    openblas_set_num_threads(threads);
    const mha__isa_kernels *isa = mha__isa_get();
    bool split = mha__split_products(isa);
    printf("%d threads; libmha's FMA GEMM on %s, the layer's path on %s; medians of %d\n", threads, isa->f32->name,
           split ? "split bf16 products (AMX)" : "the same FMA GEMM", repeat);
    printf("%-26s %12s %12s %12s %8s %8s\n", "shape", "OpenBLAS", "libmha FMA", "layer path", "FMA", "layer");
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int64_t M = shapes[s].rows, K = shapes[s].in, N = shapes[s].out, ws = 0;
        float *x = filled(M * K), *w = filled(N * K), *b = filled(N), *y = malloc((size_t)(M * N) * sizeof(float));
        gemm_case g = {.ctx = ctx, .kt = isa->f32, .M = M, .K = K, .N = N, .x = x, .w = w, .b = b, .y = y};
        if (mha__pack(ctx, &g.fma, isa->f32, w, N, K) != MHA_OK) fail("packing W");
        if (mha__weight_pack(ctx, &g.weight, isa, MHA_DTYPE_F32, w, N, K) != MHA_OK) fail("packing the weight");
        if (!mha__weight_linear_workspace(&g.weight, M, K, &ws) || mha__ws_reserve(ctx, ws) != MHA_OK)
            fail("the workspace");
        double *times[SIDES];
        for (int i = 0; i < SIDES; i++) times[i] = malloc((size_t)repeat * sizeof(double));
        time_blocks(&g, repeat, times);
        double flops = 2.0 * (double)M * (double)N * (double)K, gflops[SIDES];
        for (int i = 0; i < SIDES; i++) {
            qsort(times[i], (size_t)repeat, sizeof(double), cmp);
            gflops[i] = flops / (times[i][repeat / 2] * 1e6);
            free(times[i]);
        }
        printf("%-26s %7.1f GF/s %7.1f GF/s %7.1f GF/s %7.2fx %7.2fx\n", shapes[s].name, gflops[SIDE_BLAS],
               gflops[SIDE_FMA], gflops[SIDE_LAYER], gflops[SIDE_FMA] / gflops[SIDE_BLAS],
               gflops[SIDE_LAYER] / gflops[SIDE_BLAS]);
        mha__packed_free(&g.fma);
        mha__weight_free(&g.weight);
        free(x), free(w), free(b), free(y);
    }
    mha_ctx_free(ctx);
    return 0;
}
