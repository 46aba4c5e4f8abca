/*
 * test_split.c -- float32 projections from split bf16 products (AMX),
 * where this CPU has them (otherwise skipped, and the FMA path the layer
 * takes instead is test_linear's):
 *   split:   hi + mid + lo == x exactly down to |x| = 2^-110 (within
 *            2^-126 below), |mid| <= 2^-8 |x|, |lo| <= 2^-16 |x|, over
 *            magnitudes from the smallest normal to FLT_MAX; any infinity
 *            or NaN reported; the tile fillers put every value's parts
 *            where kernels.h's layouts say, whole tiles and partial;
 *   product: y = x W^T (+ b, or added to y) against double over shapes
 *            that hit every tail (rows, outputs and inputs not multiples
 *            of 16 or 32, more rows than one chunk), grouped x and y, W
 *            split once or from W^T into the workspace, within float32's
 *            error bound; the same bits on 1 and 3 threads; with an
 *            infinity in x, the same classes of outputs (finite, inf,
 *            NaN) as the FMA GEMM's (from W^T, with its float32 panels
 *            packed on demand, as the backward's dX);
 *   shared input: three weights of one x (Q, K, V) with x split once, the
 *            same bits as a product each;
 *   weight gradients: dW += dY^T X the same ways, over batches, chunks of
 *            rows and head-major dY; three of one X (W_q, W_k, W_v)
 *            with X split once, the same bits as a call each;
 *   attention's pieces (products_split.c, flash_bwd.c): the
 *            probabilities' filler, the near fillers, and the product
 *            stored, added and scaled and added into C.
 */
#include "core/convert.h"
#include "gemm/gemm.h"
#include "harness.h"

#include <stdint.h>

static uint64_t rng = 2024;

static float uniform(void)
{
    rng = rng * 6364136223846793005u + 1442695040888963407u;
    return (float)((rng >> 40) * 0x1p-24 * 2.0 - 1.0);
}

static double bf16_value(uint16_t h) { return mha__bf16_to_f32(h); }

/* split_rows_tile's parts of one row of N values (row 0 of the three
 * part tiles), every exponent: exact, |mid| <= 2^-8 |x|, |lo| <= 2^-16
 * |x|, hi finite up to FLT_MAX; false for an infinity or a NaN. */
static void test_split_row(const mha__bf16_kernels *bk)
{
    enum { N = 29 }; /* a tail past one vector */
    float x[N];
    uint16_t tiles[3 * MHA_SPLIT_TILE];
    const uint16_t *hi = tiles, *mid = tiles + MHA_SPLIT_TILE, *lo = tiles + 2 * MHA_SPLIT_TILE;
    int bad = 0;
    for (int e = -126; e <= 127; e += 3)
        for (int rep = 0; rep < 4; rep++) {
            for (int i = 0; i < N; i++) x[i] = ldexpf(1.0f + fabsf(uniform()), e) * (uniform() < 0 ? -1.0f : 1.0f);
            if (e == 127) x[0] = FLT_MAX, x[1] = -FLT_MAX, x[2] = nextafterf(FLT_MAX, 0);
            bad += !bk->split_rows_tile(x, N, 1, N, tiles);
            for (int i = 0; i < N; i++) {
                double h = bf16_value(hi[i]), m = bf16_value(mid[i]), l = bf16_value(lo[i]), a = fabs(x[i]);
                /* Exact while lo can be a normal bf16; below that the
                 * parts lose what bf16 cannot hold (AMX reads denormal
                 * parts as 0 anyway): at most 2^-126 in all. */
                double miss = fabs(h + m + l - (double)x[i]), allowed = e >= -110 ? 0.0 : 0x1p-126;
                bad += miss > allowed || fabs(m) > 0x1p-8 * a || fabs(l) > 0x1p-16 * a || isinf(h);
            }
        }
    CHECK(bad == 0, "%s row split: %d parts wrong", bk->name, bad);
    float special[3] = {INFINITY, -INFINITY, NAN};
    for (int s = 0; s < 3; s++) {
        for (int i = 0; i < N; i++) x[i] = uniform();
        x[17] = special[s];
        CHECK(!bk->split_rows_tile(x, N, 1, N, tiles), "%s row split missed a value that is not finite (%d)", bk->name,
              s);
    }
}

static float *random_floats(int64_t n, float scale)
{
    float *v = malloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++) v[i] = uniform() * scale;
    return v;
}

/* hi + mid + lo of value `at` in three part tiles, as double. */
static double tile_value(const uint16_t *tiles, int64_t at)
{
    return bf16_value(tiles[at]) + bf16_value(tiles[at + MHA_SPLIT_TILE]) + bf16_value(tiles[at + 2 * MHA_SPLIT_TILE]);
}

/* The tile fillers against the layouts kernels.h gives, whole tiles and
 * partial ones: every value back exactly where it belongs,
 * zeros everywhere else. */
static void test_tile_fillers(const mha__bf16_kernels *bk)
{
    enum { LDS = 40 };
    float src[32 * LDS];
    uint16_t tiles[3 * MHA_SPLIT_TILE];
    for (int i = 0; i < 32 * LDS; i++) src[i] = uniform() * 8.0f;
    static const int64_t rows_cases[][2] = {{16, 32}, {9, 13}, {16, 7}, {1, 32}};
    static const int64_t pair_cases[][2] = {{32, 16}, {17, 5}, {1, 16}, {32, 3}};
    int bad = 0;
    for (int c = 0; c < 4; c++) {
        int64_t live = rows_cases[c][0], n = rows_cases[c][1];
        bad += !bk->split_rows_tile(src, LDS, live, n, tiles);
        for (int64_t i = 0; i < 16; i++) /* A: row i, value k at i * 32 + k */
            for (int64_t k = 0; k < 32; k++)
                bad += tile_value(tiles, i * 32 + k) != (i < live && k < n ? (double)src[i * LDS + k] : 0.0);
        live = pair_cases[c][0], n = pair_cases[c][1];
        bad += !bk->split_pairs_tile(src, LDS, live, n, tiles);
        for (int64_t k = 0; k < 32; k++) /* B: value k of column j at (k / 2) * 32 + 2 j + k % 2 */
            for (int64_t j = 0; j < 16; j++)
                bad += tile_value(tiles, (k / 2) * 32 + 2 * j + k % 2) !=
                       (k < live && j < n ? (double)src[k * LDS + j] : 0.0);
    }
    CHECK(bad == 0, "%s tile fillers: %d values misplaced or wrong", bk->name, bad);
}

/* The probabilities' filler (the attention's P, values in [0, 1]): B's
 * layout, as split_pairs_tile's, each value within 2^-24 of itself (the
 * lo part truncated) down to 2^-110, 2^-126 below; zeros past the live
 * rows and the n columns. */
static void test_unit_pairs(const mha__bf16_kernels *bk)
{
    enum { LDS = 24 };
    float src[32 * LDS];
    uint16_t tiles[3 * MHA_SPLIT_TILE];
    static const int64_t cases[][2] = {{32, 16}, {17, 5}, {1, 16}, {32, 3}, {0, 16}};
    int bad = 0;
    for (int c = 0; c < 5; c++) {
        for (int i = 0; i < 32 * LDS; i++) {
            float u = fabsf(uniform());
            src[i] = i % 7 == 0 ? ldexpf(u, -(int)(i % 140)) : i % 11 == 0 ? 1.0f : i % 13 == 0 ? 0.0f : u;
        }
        src[3] = nextafterf(1.0f, 0.0f);
        int64_t live = cases[c][0], n = cases[c][1];
        bk->split_unit_pairs_tile(src, LDS, live, n, tiles);
        for (int64_t k = 0; k < 32; k++)
            for (int64_t j = 0; j < 16; j++) {
                double got = tile_value(tiles, (k / 2) * 32 + 2 * j + k % 2);
                double want = k < live && j < n ? (double)src[k * LDS + j] : 0.0;
                bad += !(fabs(got - want) <= (want >= 0x1p-110 ? 0x1p-24 * want : 0x1p-126));
            }
    }
    CHECK(bad == 0, "%s probabilities' filler: %d values misplaced or wrong", bk->name, bad);
}

/* Whether value `at` of three part tiles is src_value: exactly while
 * lo can be a normal bf16, within 2^-126 below (as a row split's). */
static bool part_sum_is(const uint16_t *tiles, int64_t at, float src_value)
{
    double miss = fabs(tile_value(tiles, at) - (double)src_value);
    return miss <= (fabs(src_value) >= 0x1p-110 ? 0.0 : 0x1p-126);
}

/* The near fillers (kernels.h), which the backward's dV, dK and dQ split
 * P and dS with: split_rows_tile's and split_pairs_tile's layouts, every
 * value its three parts' exact sum, over magnitudes from below the
 * smallest normal to the edge of the range, whole tiles, partial and
 * empty; false for an infinity, a NaN or a value within half a bf16 step
 * of FLT_MAX among the live values, and only there. */
static void test_near_fillers(const mha__bf16_kernels *bk)
{
    enum { LDS = 40 };
    float src[32 * LDS];
    uint16_t tiles[3 * MHA_SPLIT_TILE];
    static const int64_t rows_cases[][2] = {{16, 32}, {9, 13}, {16, 7}, {1, 32}, {0, 32}};
    static const int64_t pair_cases[][2] = {{32, 16}, {17, 5}, {1, 16}, {32, 3}, {0, 16}};
    int bad = 0;
    for (int e = -133; e <= 127; e += 5) {
        for (int i = 0; i < 32 * LDS; i++) /* below the edge, 1.99609375 * 2^127 */
            src[i] = ldexpf(1.0f + 0.99f * fabsf(uniform()), e - i % 4) * (uniform() < 0 ? -1.0f : 1.0f);
        src[LDS + 1] = 0.0f;
        for (int c = 0; c < 5; c++) {
            int64_t live = rows_cases[c][0], n = rows_cases[c][1];
            bad += !bk->split_near_rows_tile(src, LDS, live, n, tiles);
            for (int64_t i = 0; i < 16; i++)
                for (int64_t k = 0; k < 32; k++)
                    bad += !part_sum_is(tiles, i * 32 + k, i < live && k < n ? src[i * LDS + k] : 0.0f);
            live = pair_cases[c][0], n = pair_cases[c][1];
            bad += !bk->split_near_pairs_tile(src, LDS, live, n, tiles);
            for (int64_t k = 0; k < 32; k++)
                for (int64_t j = 0; j < 16; j++)
                    bad +=
                        !part_sum_is(tiles, (k / 2) * 32 + 2 * j + k % 2, k < live && j < n ? src[k * LDS + j] : 0.0f);
        }
    }
    CHECK(bad == 0, "%s near fillers: %d values misplaced or wrong", bk->name, bad);
    uint32_t edge_bits = 0x7f7f8000u;
    float edge;
    memcpy(&edge, &edge_bits, sizeof edge);
    const float unsplittable[] = {INFINITY, -INFINITY, NAN, edge, -FLT_MAX};
    for (size_t u = 0; u < sizeof unsplittable / sizeof unsplittable[0]; u++) {
        for (int i = 0; i < 32 * LDS; i++) src[i] = uniform();
        src[5 * LDS + 3] = unsplittable[u];
        src[20 * LDS + 30] = unsplittable[u]; /* past the live rows and columns below */
        CHECK(!bk->split_near_rows_tile(src, LDS, 16, 32, tiles) && !bk->split_near_pairs_tile(src, LDS, 32, 16, tiles),
              "%s near fillers missed %g", bk->name, (double)unsplittable[u]);
        CHECK(bk->split_near_rows_tile(src + 6 * LDS, LDS, 10, 32, tiles) &&
                  bk->split_near_pairs_tile(src, LDS, 32, 3, tiles),
              "%s near fillers saw %g where they do not read", bk->name, (double)unsplittable[u]);
    }
}

/* gemm_split's three ways with C, on 2 row pairs of A read a_run values
 * apart (one block of k more than the product uses) and a pair of B's
 * column tiles: the store and the sum from zero the same bits, within
 * float32's bound of the parts' exact product; the scaled sum C * s + X
 * with each column's s, multiplied and added as two roundings. */
static void test_gemm_modes(const mha__bf16_kernels *bk)
{
    enum { KB = 3, PAIRS = 2, ROWS = 32 * PAIRS, LDC = 80 };
    int64_t run = 3 * KB * MHA_SPLIT_TILE, a_run = run + 3 * MHA_SPLIT_TILE;
    uint16_t *a = calloc((size_t)(2 * PAIRS * a_run), sizeof(uint16_t)), *b = calloc((size_t)(2 * run), 2);
    float *x = random_floats(ROWS * 32 * KB, 2.0f), *w = random_floats(32 * KB * 32, 2.0f);
    for (int64_t t = 0; t < 2 * PAIRS; t++) /* A row tile t: rows 16 t .., columns k of x */
        for (int64_t kb = 0; kb <= KB; kb++)
            bk->split_rows_tile(x + t * 16 * 32 * KB + (kb % KB) * 32, 32 * KB, 16, 32,
                                a + t * a_run + kb * 3 * MHA_SPLIT_TILE);
    for (int64_t t = 0; t < 2; t++) /* B column tile t: columns 16 t .. of w (k rows) */
        for (int64_t kb = 0; kb < KB; kb++)
            bk->split_pairs_tile(w + kb * 32 * 32 + t * 16, 32, 32, 16, b + t * run + kb * 3 * MHA_SPLIT_TILE);
    float *stored = malloc(sizeof(float) * ROWS * LDC), *added = malloc(sizeof(float) * ROWS * LDC);
    float *c0 = random_floats(ROWS * LDC, 1.0f), *scaled = malloc(sizeof(float) * ROWS * LDC);
    float *s = random_floats(32, 1.0f);
    float *biased = malloc(sizeof(float) * ROWS * LDC), *zeroed = malloc(sizeof(float) * ROWS * LDC);
    for (int64_t i = 0; i < ROWS * LDC; i++) stored[i] = biased[i] = zeroed[i] = NAN, added[i] = scaled[i] = c0[i];
    bk->gemm_split(PAIRS, KB, a, a_run, b, stored, LDC, MHA_SPLIT_STORE, NULL);
    bk->gemm_split(PAIRS, KB, a, a_run, b, added, LDC, MHA_SPLIT_ADD, NULL);
    bk->gemm_split(PAIRS, KB, a, a_run, b, scaled, LDC, MHA_SPLIT_SCALE_ADD, s);
    bk->gemm_split(PAIRS, KB, a, a_run, b, biased, LDC, MHA_SPLIT_BIAS_ADD, s); /* s as the bias */
    bk->gemm_split(PAIRS, KB, a, a_run, b, zeroed, LDC, MHA_SPLIT_BIAS_ADD, NULL);
    bk->split_release();
    int bad = 0;
    for (int64_t i = 0; i < ROWS; i++)
        for (int64_t j = 0; j < 32; j++) {
            double want = 0, mag = 0;
            for (int64_t k = 0; k < 32 * KB; k++) {
                double xa = tile_value(a + (i / 16) * a_run + (k / 32) * 3 * MHA_SPLIT_TILE, (i % 16) * 32 + k % 32);
                double wb = tile_value(b + (j / 16) * run + (k / 32) * 3 * MHA_SPLIT_TILE,
                                       ((k % 32) / 2) * 32 + 2 * (j % 16) + k % 2);
                want += xa * wb, mag += fabs(xa * wb);
            }
            float x_ij = stored[i * LDC + j], sum = added[i * LDC + j] - c0[i * LDC + j];
            float rescaled = c0[i * LDC + j] * s[j];
            bad += !(fabs(x_ij - want) <= (32 * KB + 2) * FLT_EPSILON * mag);
            bad += memcmp(&added[i * LDC + j], &(float){c0[i * LDC + j] + x_ij}, sizeof(float)) != 0 && !isnan(sum);
            bad += memcmp(&scaled[i * LDC + j], &(float){rescaled + x_ij}, sizeof(float)) != 0;
            bad += memcmp(&biased[i * LDC + j], &(float){s[j] + x_ij}, sizeof(float)) != 0;
            bad += memcmp(&zeroed[i * LDC + j], &(float){0.0f + x_ij}, sizeof(float)) != 0;
        }
    for (int64_t i = 0; i < ROWS; i++) /* columns past 32 untouched */
        for (int64_t j = 32; j < LDC; j++)
            bad += !isnan(stored[i * LDC + j]) || added[i * LDC + j] != c0[i * LDC + j] ||
                   scaled[i * LDC + j] != c0[i * LDC + j] || !isnan(biased[i * LDC + j]) || !isnan(zeroed[i * LDC + j]);
    CHECK(bad == 0, "%s gemm_split's store, sum, scaled and biased sums: %d outputs wrong", bk->name, bad);
    void *owned[] = {a, b, x, w, stored, added, c0, scaled, s, biased, zeroed};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) free(owned[i]);
}

/* Side work's record: the order its steps ran in. */
typedef struct side_log {
    int64_t ran[64], count;
} side_log;

static void log_step(void *ctx, int64_t i)
{
    side_log *log = ctx;
    if (log->count < 64) log->ran[log->count] = i;
    log->count++;
}

/* gemm_split_beside: gemm_split's bits, and each side step run once, in
 * order, whether there are fewer steps than blocks of k, more, none, or
 * no products to run them beside. */
static void test_gemm_beside(const mha__bf16_kernels *bk)
{
    if (!bk->gemm_split_beside) return;
    enum { KB = 3, PAIRS = 3, ROWS = 32 * PAIRS, LDC = 40 };
    int64_t run = 3 * KB * MHA_SPLIT_TILE;
    uint16_t *a = calloc((size_t)(2 * PAIRS * run), sizeof(uint16_t)), *b = calloc((size_t)(2 * run), 2);
    float *x = random_floats(ROWS * 32 * KB, 2.0f), *w = random_floats(32 * KB * 32, 2.0f);
    for (int64_t t = 0; t < 2 * PAIRS; t++)
        for (int64_t kb = 0; kb < KB; kb++)
            bk->split_rows_tile(x + t * 16 * 32 * KB + kb * 32, 32 * KB, 16, 32, a + t * run + kb * 3 * MHA_SPLIT_TILE);
    for (int64_t t = 0; t < 2; t++)
        for (int64_t kb = 0; kb < KB; kb++)
            bk->split_pairs_tile(w + kb * 32 * 32 + t * 16, 32, 32, 16, b + t * run + kb * 3 * MHA_SPLIT_TILE);
    float *c0 = random_floats(ROWS * LDC, 1.0f), *s = random_floats(32, 1.0f);
    float *want = malloc(sizeof(float) * ROWS * LDC), *got = malloc(sizeof(float) * ROWS * LDC);
    memcpy(want, c0, sizeof(float) * ROWS * LDC);
    bk->gemm_split(PAIRS, KB, a, run, b, want, LDC, MHA_SPLIT_SCALE_ADD, s);
    const int64_t counts[] = {0, 1, 5, PAIRS * KB, 37};
    for (size_t n = 0; n < sizeof counts / sizeof counts[0]; n++)
        for (int64_t pairs = 0; pairs <= PAIRS; pairs += PAIRS) {
            side_log log = {.count = 0};
            mha__side_work side = {log_step, &log, counts[n]};
            memcpy(got, c0, sizeof(float) * ROWS * LDC);
            bk->gemm_split_beside(pairs, KB, a, run, b, got, LDC, MHA_SPLIT_SCALE_ADD, s, &side);
            bool in_order = log.count == counts[n];
            for (int64_t i = 0; i < log.count && i < 64; i++) in_order &= log.ran[i] == i;
            CHECK(in_order, "%s gemm_split_beside ran %lld of %lld side steps out of order (%lld row pairs)", bk->name,
                  (long long)log.count, (long long)counts[n], (long long)pairs);
            const float *expect = pairs ? want : c0;
            CHECK(memcmp(got, expect, sizeof(float) * ROWS * LDC) == 0,
                  "%s gemm_split_beside's C differs from gemm_split's (%lld side steps, %lld row pairs)", bk->name,
                  (long long)counts[n], (long long)pairs);
        }
    bk->split_release();
    void *owned[] = {a, b, x, w, c0, s, want, got};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) free(owned[i]);
}

enum variant { PLAIN, BIAS, GROUPED, ADD, TRANSPOSED, VARIANTS };

typedef struct problem {
    int64_t rows, in, out;
    enum variant v;
    float *x, *w, *b, *y0; /* y0: y before the call (ADD) */
    mha__mat xm, ym;
} problem;

/* Whether one output misses: a sum of `terms` products (plus what it
 * started from) against double `want` within float32's bound, as
 * test_kernels holds the FMA tiles to; or, where the FMA path's output
 * `ieee` (NULL: not compared) is not finite, of another class than it. */
static bool output_misses(float got, double want, double mag, int64_t terms, const float *ieee)
{
    if (ieee && !isfinite(*ieee)) return isnan(*ieee) != isnan(got) || (isinf(*ieee) && got != *ieee);
    return !(fabs(got - want) <= (double)(terms + 2) * FLT_EPSILON * mag + 1e-30);
}

/* Outputs of y that miss (output_misses; `fma`: the FMA GEMM's y, where x
 * has an infinity). */
static int misses(const problem *p, const float *fma)
{
    int bad = 0;
    for (int64_t r = 0; r < p->rows; r++)
        for (int64_t o = 0; o < p->out; o++) {
            double want = p->v == BIAS ? p->b[o] : p->v == ADD ? p->y0[r * p->out + o] : 0.0, mag = fabs(want);
            for (int64_t c = 0; c < p->in; c++) {
                double t = (double)*mha__mat_at(&p->xm, r, c) * p->w[o * p->in + c];
                want += t, mag += fabs(t);
            }
            bad += output_misses(*mha__mat_at(&p->ym, r, o), want, mag, p->in, fma ? fma + r * p->out + o : NULL);
        }
    return bad;
}

/* y through the split products as variant v asks: W split once
 * (mha__pack_split) or, TRANSPOSED, from W^T (mha__pack_split_transposed,
 * as a training layer keeps it for the backward). */
static void run_split(mha_ctx *ctx, const mha__isa_kernels *k, problem *p)
{
    int64_t bytes = 0, rows = p->rows, in = p->in, out = p->out;
    mha__packed fma = {0};
    mha__packed_split sp = {0};
    float *wt = malloc(sizeof(float) * (size_t)(in * out));
    for (int64_t o = 0; o < out; o++)
        for (int64_t c = 0; c < in; c++) wt[c * out + o] = p->w[o * in + c];
    CHECK(mha__pack(ctx, &fma, k->f32, p->w, out, in) == MHA_OK, "float32 pack");
    CHECK(mha__linear_split_workspace(rows, in, &bytes) && mha__pack_transposed_workspace(k->f32, in, out, &bytes) &&
              mha__ws_reserve(ctx, bytes) == MHA_OK,
          "workspace");
    int64_t top = mha__ws_top(ctx);
    if (p->v == TRANSPOSED)
        CHECK(mha__pack_split_transposed(ctx, &sp, k->bf16, wt, in, out) == MHA_OK && sp.data, "transposed split");
    else CHECK(mha__pack_split(ctx, &sp, k->bf16, p->w, out, in) == MHA_OK && sp.data, "split pack");
    memcpy(p->ym.data, p->y0, sizeof(float) * (size_t)(rows * out));
    /* W^T's float32 panels, as the backward's, packed only if a chunk needs them. */
    mha__fma_on_demand on_demand = {k->f32, wt, in, out, {0}};
    mha__split_output one = {
        &sp, p->v == TRANSPOSED ? NULL : &fma, p->v == BIAS ? p->b : NULL, &p->ym, &on_demand, NULL, NULL};
    CHECK(mha__linear_split_shared(ctx, k, rows, &p->xm, 1, &one, p->v == ADD) == MHA_OK, "split product");
    CHECK(!on_demand.packed.data, "panels packed on demand outlive the product");
    mha__packed_split_free(&sp);
    mha__ws_release(ctx, top);
    mha__packed_free(&fma);
    free(wt);
}

static problem problem_make(int64_t rows, int64_t in, int64_t out, enum variant v)
{
    problem p = {.rows = rows, .in = in, .out = out, .v = v};
    p.x = random_floats(rows * in, 4.0f), p.w = random_floats(out * in, 0.25f);
    p.b = random_floats(out, 1.0f), p.y0 = random_floats(rows * out, 1.0f);
    float *y = malloc(sizeof(float) * (size_t)(rows * out));
    p.xm = (mha__mat){p.x, in, 1, 0, 0}, p.ym = (mha__mat){y, out, 1, 0, 0};
    if (v == GROUPED) p.xm = (mha__mat){p.x, 64, 1, 64, rows * 64}, p.ym = (mha__mat){y, 64, 1, 64, rows * 64};
    return p;
}

static void problem_free(problem *p) { free(p->x), free(p->w), free(p->b), free(p->y0), free(p->ym.data); }

/* With an infinity in x: the rows of its chunk go through the FMA GEMM,
 * so the outputs' classes (finite, inf, NaN) are IEEE's. */
static void check_infinity(mha_ctx *ctx, const mha__isa_kernels *k, problem *p)
{
    p->x[(p->rows / 2) * p->in + p->in / 3] = INFINITY; /* row rows / 2 in either layout */
    run_split(ctx, k, p);
    float *fma = malloc(sizeof(float) * (size_t)(p->rows * p->out));
    mha__packed packed = {0};
    mha__mat ym = p->ym;
    ym.data = fma;
    memcpy(fma, p->y0, sizeof(float) * (size_t)(p->rows * p->out));
    CHECK(mha__pack(NULL, &packed, k->f32, p->w, p->out, p->in) == MHA_OK, "float32 pack");
    if (p->v == ADD) mha__linear_add(ctx, k->f32, p->rows, &p->xm, &packed, &ym);
    else mha__linear(ctx, k->f32, p->rows, &p->xm, &packed, p->v == BIAS ? p->b : NULL, &ym);
    float *plain = malloc(sizeof(float) * (size_t)(p->rows * p->out));
    for (int64_t r = 0; r < p->rows; r++)
        for (int64_t o = 0; o < p->out; o++) plain[r * p->out + o] = *mha__mat_at(&ym, r, o);
    CHECK(misses(p, plain) == 0, "split product with an infinity: outputs unlike IEEE's");
    mha__packed_free(&packed);
    free(fma), free(plain);
}

static void test_products(mha_ctx *ctx1, mha_ctx *ctx3, const mha__isa_kernels *k)
{
    /* One or three inputs: each output a single product or three, where
     * float32's bound is tight enough to catch any of the six parts'
     * products missing; then every tail, and more rows than a chunk. */
    static const int64_t shapes[][3] = {{1, 1, 1},    {64, 1, 64},   {40, 3, 48},    {5, 31, 17},    {16, 32, 32},
                                        {33, 64, 40}, {100, 70, 96}, {97, 768, 130}, {800, 100, 64}, {1601, 65, 33}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (enum variant v = PLAIN; v < VARIANTS; v++) {
            int64_t rows = shapes[s][0], in = shapes[s][1], out = shapes[s][2];
            if (v == GROUPED && (in % 64 || out % 64)) continue;
            problem p = problem_make(rows, in, out, v);
            run_split(ctx1, k, &p);
            int bad = misses(&p, NULL);
            float *y1 = malloc(sizeof(float) * (size_t)(rows * out));
            memcpy(y1, p.ym.data, sizeof(float) * (size_t)(rows * out));
            run_split(ctx3, k, &p);
            CHECK(bad == 0, "split product %lld x %lld -> %lld (variant %d): %d outputs off", (long long)rows,
                  (long long)in, (long long)out, (int)v, bad);
            CHECK(memcmp(y1, p.ym.data, sizeof(float) * (size_t)(rows * out)) == 0,
                  "split product %lld x %lld -> %lld (variant %d): bits differ between 1 and 3 threads",
                  (long long)rows, (long long)in, (long long)out, (int)v);
            check_infinity(ctx3, k, &p);
            free(y1);
            problem_free(&p);
        }
}

/* Three weights of one input (self-attention's Q, K, V) through
 * mha__weights_linear_shared, x split once: the same bits as three
 * mha__weight_linear calls, over fewer rows than the tiles take, a chunk
 * and a tail, narrower K and V (grouped-query), head-major outputs, and
 * an infinity in the second chunk (its rows by the FMA GEMM for all
 * three); shared on 3 threads against separate on 1. */
static void test_shared_input(mha_ctx *ctx1, mha_ctx *ctx3, const mha__isa_kernels *k)
{
    static const int64_t shapes[][5] = {/* rows, in, out of Q, K, V */
                                        {5, 70, 64, 64, 64},
                                        {40, 100, 96, 32, 32},
                                        {800, 64, 64, 128, 64},
                                        {1601, 33, 17, 40, 33}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int mode = 0; mode < 3; mode++) { /* plain, head-major y, an infinity in x */
            int64_t rows = shapes[s][0], in = shapes[s][1], bytes = 0, total = 0;
            bool grouped = mode == 1 && shapes[s][2] % 64 == 0 && shapes[s][3] % 64 == 0 && shapes[s][4] % 64 == 0;
            if (mode == 1 && !grouped) continue;
            float *x = random_floats(rows * in, 4.0f), *w[3], *b[3], *shared[3], *separate[3];
            if (mode == 2) x[(rows * 3 / 4) * in + in / 2] = INFINITY;
            mha__mat xm = {x, in, 1, 0, 0}, ys[3], yp[3];
            mha__weight packed[3] = {{0}};
            for (int i = 0; i < 3; i++) {
                int64_t out = shapes[s][2 + i];
                w[i] = random_floats(out * in, 0.25f), b[i] = random_floats(out, 1.0f);
                shared[i] = random_floats(rows * out, 1.0f), separate[i] = random_floats(rows * out, 1.0f);
                ys[i] = (mha__mat){shared[i], out, 1, 0, 0}, yp[i] = (mha__mat){separate[i], out, 1, 0, 0};
                if (grouped)
                    ys[i] = (mha__mat){shared[i], 64, 1, 64, rows * 64},
                    yp[i] = (mha__mat){separate[i], 64, 1, 64, rows * 64};
                CHECK(mha__weight_pack(ctx3, &packed[i], k, MHA_DTYPE_F32, w[i], out, in) == MHA_OK &&
                          packed[i].split.data,
                      "split weight");
                total += out;
            }
            CHECK(mha__weight_linear_workspace(&packed[0], rows, in, &bytes) &&
                      mha__ws_reserve(ctx1, bytes) == MHA_OK && mha__ws_reserve(ctx3, bytes) == MHA_OK,
                  "workspace");
            const mha__weight *wp[3] = {&packed[0], &packed[1], &packed[2]};
            const float *bp[3] = {b[0], b[1], b[2]};
            const mha__mat *yps[3] = {&ys[0], &ys[1], &ys[2]};
            CHECK(mha__weights_linear_shared(ctx3, 3, wp, rows, &xm, bp, yps) == MHA_OK, "shared product");
            for (int i = 0; i < 3; i++)
                CHECK(mha__weight_linear(ctx1, &packed[i], rows, &xm, b[i], &yp[i]) == MHA_OK, "one product");
            int64_t differ = 0;
            for (int i = 0; i < 3; i++)
                differ += memcmp(shared[i], separate[i], sizeof(float) * (size_t)(rows * shapes[s][2 + i])) != 0;
            CHECK(differ == 0,
                  "shared input %lld x %lld -> %lld columns (mode %d): %lld of 3 outputs differ from one product each",
                  (long long)rows, (long long)in, (long long)total, mode, (long long)differ);
            for (int i = 0; i < 3; i++) {
                mha__weight_free(&packed[i]);
                free(w[i]), free(b[i]), free(shared[i]), free(separate[i]);
            }
            free(x);
        }
}

/* dW = dw0 + dY^T X over N batches of T rows (dY head-major in 64-column
 * groups when grouped) by the split products: off float32's bound, or
 * with an infinity in dY, of another class than the FMA path's.  With
 * `overwrite` dw0 is 0 and both paths write dW over NaN, the split one
 * to the bits it adds to zeros. */
static int grad_misses(mha_ctx *ctx, const mha__isa_kernels *k, int64_t N, int64_t T, int64_t out, int64_t in,
                       bool grouped, bool infinity, bool overwrite, float **dw_out)
{
    int64_t rows = N * T, bytes = 0;
    float *dy = random_floats(rows * out, 2.0f), *x = random_floats(rows * in, 2.0f),
          *dw0 = overwrite ? calloc((size_t)(out * in), sizeof(float)) : random_floats(out * in, 1.0f);
    float *dw = malloc(sizeof(float) * (size_t)(out * in)), *plain = malloc(sizeof(float) * (size_t)(out * in));
    mha__batched dyb = {{dy, out, 1, 0, 0}, T * out}, xb = {{x, in, 1, 0, 0}, T * in};
    if (grouped) dyb = (mha__batched){{dy, 64, 1, 64, rows * 64}, T * 64};
    if (infinity) dy[(rows / 2) * 64 % (rows * out)] = INFINITY;
    CHECK(mha__weight_grad_workspace(k->f32, out, in, &bytes) && mha__weight_grad_split_workspace(out, in, &bytes) &&
              mha__ws_reserve(ctx, bytes) == MHA_OK,
          "workspace");
    for (int64_t i = 0; i < out * in; i++) dw[i] = plain[i] = overwrite ? NAN : dw0[i];
    CHECK(mha__weight_grad_split(ctx, k, N, T, &dyb, &xb, out, in, dw, overwrite) == MHA_OK, "split weight gradient");
    CHECK(mha__weight_grad(ctx, k->f32, N, T, &dyb, &xb, out, in, plain, overwrite) == MHA_OK,
          "float32 weight gradient");
    int bad = 0;
    if (overwrite) { /* the same bits as adding to zeros */
        float *added = calloc((size_t)(out * in), sizeof(float));
        CHECK(mha__weight_grad_split(ctx, k, N, T, &dyb, &xb, out, in, added, false) == MHA_OK,
              "split weight gradient");
        bad += memcmp(added, dw, sizeof(float) * (size_t)(out * in)) != 0;
        free(added);
    }
    for (int64_t o = 0; o < out; o++)
        for (int64_t i = 0; i < in; i++) {
            double want = dw0[o * in + i], mag = fabs(want);
            for (int64_t r = 0; r < rows; r++) {
                double t = (double)*mha__mat_at(&dyb.m, r, o) * x[r * in + i];
                want += t, mag += fabs(t);
            }
            bad += output_misses(dw[o * in + i], want, mag, rows, plain + o * in + i);
        }
    free(dy), free(x), free(dw0), free(plain);
    *dw_out = dw;
    return bad;
}

static void test_weight_grads(mha_ctx *ctx1, mha_ctx *ctx3, const mha__isa_kernels *k)
{
    /* N, T, out, in: a single product, tails of every kind, more rows
     * than a chunk of 256, and batches that are not one run of rows. */
    static const int64_t shapes[][4] = {{1, 1, 1, 1},     {1, 3, 16, 16},    {2, 128, 64, 96},
                                        {1, 300, 40, 33}, {3, 171, 130, 70}, {2, 100, 128, 64}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int mode = 0; mode < 6; mode++) { /* plain, grouped dY, an infinity; each added, then written */
            int64_t N = shapes[s][0], T = shapes[s][1], out = shapes[s][2], in = shapes[s][3];
            bool overwrite = mode >= 3;
            if (mode % 3 == 1 && out % 64) continue;
            float *dw1, *dw3;
            uint64_t seed = rng;
            int bad = grad_misses(ctx1, k, N, T, out, in, mode % 3 == 1, mode % 3 == 2, overwrite, &dw1);
            rng = seed;
            bad += grad_misses(ctx3, k, N, T, out, in, mode % 3 == 1, mode % 3 == 2, overwrite, &dw3);
            CHECK(bad == 0, "split weight gradient N %lld T %lld %lld x %lld (mode %d): %d off", (long long)N,
                  (long long)T, (long long)out, (long long)in, mode, bad);
            CHECK(mode % 3 == 2 || memcmp(dw1, dw3, sizeof(float) * (size_t)(out * in)) == 0,
                  "split weight gradient %lld x %lld: bits differ between 1 and 3 threads", (long long)out,
                  (long long)in);
            free(dw1), free(dw3);
        }
}

static bool all_finite(const float *x, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i])) return false;
    return true;
}

/* Three weight gradients of one X (self-attention's W_q, W_k, W_v) by
 * mha__weight_grads_split, X split once: the same bits as a call each,
 * over a chunk and a tail, narrower K and V, batches that are not one
 * run of rows (dY with a spare row a batch, as bias_k leaves), and an
 * infinity in one dY (that output alone by the FMA path); shared on 3
 * threads against separate on 1, each context reserved with exactly its
 * plan. */
static void test_shared_grads(mha_ctx *ctx1, mha_ctx *ctx3, const mha__isa_kernels *k)
{
    static const int64_t shapes[][5] = {/* N, T, out of Q, K, V; in = 48 */
                                        {1, 300, 64, 32, 32},
                                        {2, 100, 40, 40, 40},
                                        {3, 17, 16, 48, 33}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int mode = 0; mode < 6; mode++) { /* plain, a spare dY row a batch, an infinity in dY_k; added, then
                                                   written over NaN */
            int64_t N = shapes[s][0], T = shapes[s][1], in = 48, T1 = T + (mode % 3 == 1), bytes = 0;
            bool overwrite = mode >= 3;
            float *x = random_floats(N * T * in, 2.0f), *dy[3], *shared[3], *separate[3];
            mha__batched xb = {{x, in, 1, 0, 0}, T * in}, dyb[3];
            mha__grad_output outs[3];
            for (int i = 0; i < 3; i++) {
                int64_t out = shapes[s][2 + i];
                dy[i] = random_floats(N * T1 * out, 2.0f);
                shared[i] = random_floats(out * in, 1.0f);
                separate[i] = malloc(sizeof(float) * (size_t)(out * in));
                for (int64_t e = 0; overwrite && e < out * in; e++) shared[i][e] = NAN;
                memcpy(separate[i], shared[i], sizeof(float) * (size_t)(out * in));
                dyb[i] = (mha__batched){{dy[i], out, 1, 0, 0}, T1 * out};
                outs[i] = (mha__grad_output){&dyb[i], out, shared[i], overwrite};
            }
            if (mode % 3 == 2) dy[1][T / 2 * shapes[s][3]] = INFINITY;
            CHECK(mha__weight_grads_split_workspace(3, outs, in, &bytes) && mha__ws_reserve(ctx3, bytes) == MHA_OK,
                  "workspace");
            int64_t reserved = mha_ctx_workspace_bytes(ctx3);
            CHECK(mha__weight_grads_split(ctx3, k, N, T, 3, outs, &xb, in) == MHA_OK, "shared weight gradients");
            CHECK(mha_ctx_workspace_bytes(ctx3) == reserved, "shared weight gradients: the workspace grew");
            for (int i = 0; i < 3; i++) {
                int64_t one = 0;
                CHECK(mha__weight_grad_workspace(k->f32, outs[i].out, in, &one) &&
                          mha__weight_grad_split_workspace(outs[i].out, in, &one) &&
                          mha__ws_reserve(ctx1, one) == MHA_OK,
                      "workspace");
                CHECK(mha__weight_grad_split(ctx1, k, N, T, &dyb[i], &xb, outs[i].out, in, separate[i], overwrite) ==
                          MHA_OK,
                      "one weight gradient");
            }
            int differ = 0;
            for (int i = 0; i < 3; i++) /* written over NaN: any left shows (an infinity's NaN has other bits) */
                differ += memcmp(shared[i], separate[i], sizeof(float) * (size_t)(outs[i].out * in)) != 0 ||
                          (overwrite && !(mode % 3 == 2 && i == 1) && !all_finite(shared[i], outs[i].out * in));
            CHECK(differ == 0, "shared weight gradients N %lld T %lld (mode %d): %d of 3 differ from a call each",
                  (long long)N, (long long)T, mode, differ);
            for (int i = 0; i < 3; i++) free(dy[i]), free(shared[i]), free(separate[i]);
            free(x);
        }
}

int main(void)
{
    const mha__bf16_kernels *bk = mha__bf16_named("amx");
    mha__isa_kernels k = {mha__kernels_named("avx512"), bk};
    if (!bk || !k.f32 || !mha__split_products(&k)) {
        printf("test_split: no split products on this CPU, skipped\n");
        return harness_finish("test_split");
    }
    mha_ctx *ctx1 = NULL, *ctx3 = NULL;
    CHECK(mha_ctx_create(1, &ctx1) == MHA_OK && mha_ctx_create(3, &ctx3) == MHA_OK, "contexts");
    test_split_row(bk);
    test_tile_fillers(bk);
    test_unit_pairs(bk);
    test_near_fillers(bk);
    test_gemm_modes(bk);
    test_gemm_beside(bk);
    test_products(ctx1, ctx3, &k);
    test_shared_input(ctx1, ctx3, &k);
    test_weight_grads(ctx1, ctx3, &k);
    test_shared_grads(ctx1, ctx3, &k);
    mha_ctx_free(ctx1);
    mha_ctx_free(ctx3);
    return harness_finish("test_split");
}
