/*
 * bench_gemm.c -- libmha's projection GEMM against OpenBLAS's sgemm on the
 * projection shapes of the layer, side by side in one process:
 *     y [M, n] = x [M, k] W^T + b,   M = batch * seq, k = n = E (or n = 3E)
 * with the same thread count (OpenBLAS via openblas_set_num_threads).
 * Two blocks of each, interleaved; median of `repeat` runs each; prints
 * GFLOP/s and the ratio.  OpenBLAS's time includes writing the bias into y
 * first (its beta = 1 does the add), since ours includes the bias too.  Built only when OpenBLAS is installed (libopenblas-dev).
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

int main(int argc, char **argv)
{
    int threads = argc > 1 ? atoi(argv[1]) : 2, repeat = argc > 2 ? atoi(argv[2]) : 10;
    static const struct {
        const char *name;
        int64_t rows, in, out;
    } shapes[] = {
        {"S1 Q/K/V/O  (B=8 N=128)", 1024, 768, 768}, {"S1 fused QKV", 1024, 768, 2304},
        {"S2 Q/K/V/O  (N=512)", 512, 768, 768},      {"S3 Q/K/V/O  (N=2048)", 2048, 768, 768},
        {"S4 Q/K/V/O  (N=8192)", 8192, 768, 768},
    };
    mha_ctx *ctx;
    if (mha_ctx_create(threads, &ctx) != MHA_OK) return 1;
    openblas_set_num_threads(threads);
    const mha__kernels *kt = mha__kernels_get();
    printf("%d threads, libmha kernels %s; medians of %d\n", threads, kt->name, repeat);
    printf("%-26s %12s %12s %8s\n", "shape", "OpenBLAS", "libmha", "ratio");
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        int64_t M = shapes[s].rows, K = shapes[s].in, N = shapes[s].out;
        float *x = filled(M * K), *w = filled(N * K), *b = filled(N), *y = malloc((size_t)(M * N) * sizeof(float));
        mha__packed packed = {0};
        mha__mat xm = {x, K, 1, 0, 0}, ym = {y, N, 1, 0, 0};
        mha__pack(&packed, kt, w, N, K);
        double *t_blas = malloc((size_t)repeat * sizeof(double)), *t_mha = malloc((size_t)repeat * sizeof(double));
        /* Blocks, not alternating calls: OpenBLAS's threads spin for a while
         * after each call and would steal the cores from the next one. */
        for (int block = 0; block < 2; block++) {
            for (int r = -2; r < repeat / 2; r++) { /* two warm-up calls */
                double t0 = now_ms();
                mha__linear(ctx, kt, M, &xm, &packed, b, &ym);
                if (r >= 0) t_mha[block * (repeat / 2) + r] = now_ms() - t0;
            }
            for (int r = -2; r < repeat / 2; r++) {
                double t0 = now_ms();
                for (int64_t i = 0; i < M; i++) /* bias first, as PyTorch's addmm */
                    for (int64_t j = 0; j < N; j++) y[i * N + j] = b[j];
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, (int)N, (int)K, 1.0f, x, (int)K, w, (int)K,
                            1.0f, y, (int)N);
                if (r >= 0) t_blas[block * (repeat / 2) + r] = now_ms() - t0;
            }
            struct timespec pause = {0, 300 * 1000 * 1000}; /* let OpenBLAS's threads go to sleep */
            nanosleep(&pause, NULL);
        }
        repeat = repeat / 2 * 2;
        qsort(t_blas, (size_t)repeat, sizeof(double), cmp);
        qsort(t_mha, (size_t)repeat, sizeof(double), cmp);
        double flops = 2.0 * (double)M * (double)N * (double)K;
        double g_blas = flops / (t_blas[repeat / 2] * 1e6), g_mha = flops / (t_mha[repeat / 2] * 1e6);
        printf("%-26s %7.1f GF/s %7.1f GF/s %7.2fx\n", shapes[s].name, g_blas, g_mha, g_mha / g_blas);
        mha__packed_free(&packed);
        free(x), free(w), free(b), free(y), free(t_blas), free(t_mha);
    }
    mha_ctx_free(ctx);
    return 0;
}
