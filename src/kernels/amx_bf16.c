/*
 * amx_bf16.c -- bf16 matrix products on AMX tiles (TDPBF16PS).
 * Compiled with -mamx-tile -mamx-bf16 -mavx512f -mavx512bw -mavx512vl;
 * called only when cpu.c has seen the CPU support AMX-BF16 and the kernel
 * has granted this process the tile data state (arch_prctl).
 *
 * One configuration for every call: eight tiles of 16 rows x 64 bytes.
 * Tiles 0-3 accumulate a 32 x 32 block of C (four 16 x 16 float32 tiles),
 * tiles 4-5 hold 32 rows of A by 32 values of k, tiles 6-7 hold 16 pairs of
 * k by 32 columns of B: the product's layouts (kernels.h) are the tiles'
 * own, so whole tiles load straight from the operands.  One TDPBF16PS is
 * 16 x 16 x 32 multiply-adds, 16 times vdpbf16ps.
 *
 * Tails (fewer than 16 rows or columns, fewer than 32 values of k left, or
 * A stored in pairs of rows) go through small zero-padded copies; C tiles
 * that do not fill 16 x 16 are staged the same way.  The padding is zeros
 * on both sides of every product, so it adds +0 and no NaN.  The
 * configuration is loaded at the start of each call and released at the
 * end, so no tile state outlives a call (other AMX users in the process, a
 * thread pool's idle threads).
 */
#include "kernels/kernels.h"
#include "kernels/transpose16.h"

#include <immintrin.h>
#include <stdbool.h>
#include <string.h>

enum { TILE_ROWS = 16, TILE_BYTES = 64, TILE_K = 32 /* bf16 values of k per tile */ };

/* The layout LDTILECFG reads (palette 1). */
typedef struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* A static object, not one built on the stack: the compiler sees the
 * intrinsic read only the pointer-sized start of it and may drop stores to
 * the rest. */
static const tile_config config = {
    .palette = 1,
    .colsb = {TILE_BYTES, TILE_BYTES, TILE_BYTES, TILE_BYTES, TILE_BYTES, TILE_BYTES, TILE_BYTES, TILE_BYTES},
    .rows = {TILE_ROWS, TILE_ROWS, TILE_ROWS, TILE_ROWS, TILE_ROWS, TILE_ROWS, TILE_ROWS, TILE_ROWS},
};

/* Whether this thread's tiles hold the configuration: split products
 * keep it from one call to the next (LDTILECFG and TILERELEASE a call cost
 * 5% of the attention core at N = 512) until their caller releases it. */
static _Thread_local bool configured;

static void configure(void)
{
    if (configured) return;
    _tile_loadconfig(&config);
    configured = true;
}

static void release(void)
{
    _tile_release();
    configured = false;
}

void mha__split_release_amx(void) { release(); }

/* Where a tile loads from: the operand itself, or a padded copy. */
typedef struct tile_src {
    const void *at;
    int64_t stride; /* bytes between rows */
} tile_src;

static int64_t at_most(int64_t x, int64_t cap) { return x < cap ? x : cap; }

/* A's rows i .. i+15, values kk .. kk+31 of k, as 16 rows of 16 pairs. */
static tile_src a_tile(const uint16_t *a, int64_t a_rs, int64_t a_ps, int64_t m, int64_t k, int64_t i, int64_t kk,
                       uint32_t pad[TILE_ROWS][TILE_K / 2])
{
    int64_t rows = at_most(m - i, TILE_ROWS), pairs = at_most(k - kk, TILE_K) / 2;
    if (a_ps == 2 && rows == TILE_ROWS && pairs == TILE_K / 2)
        return (tile_src){a + i * a_rs + kk, a_rs * (int64_t)sizeof(uint16_t)};
    memset(pad, 0, sizeof(uint32_t) * TILE_ROWS * (TILE_K / 2));
    for (int64_t r = 0; r < rows; r++)
        for (int64_t p = 0; p < pairs; p++) memcpy(&pad[r][p], a + (i + r) * a_rs + (kk / 2 + p) * a_ps, 4);
    return (tile_src){pad, TILE_BYTES};
}

/* B's pairs of k rows kk/2 .. kk/2+15, columns j .. j+15: 16 rows of 16
 * pairs, as B is stored. */
static tile_src b_tile(const uint16_t *b, int64_t ldb, int64_t n, int64_t k, int64_t j, int64_t kk,
                       uint32_t pad[TILE_ROWS][TILE_ROWS])
{
    int64_t cols = at_most(n - j, TILE_ROWS), pairs = at_most(k - kk, TILE_K) / 2;
    const uint16_t *at = b + (kk / 2) * ldb + 2 * j;
    if (cols == TILE_ROWS && pairs == TILE_ROWS) return (tile_src){at, ldb * (int64_t)sizeof(uint16_t)};
    memset(pad, 0, sizeof(uint32_t) * TILE_ROWS * TILE_ROWS);
    for (int64_t p = 0; p < pairs; p++) memcpy(pad[p], at + p * ldb, (size_t)cols * 4);
    return (tile_src){pad, TILE_BYTES};
}

/* The 16 x 16 block of C at (i, j): itself when whole, else a copy of its
 * m x n corner (zeros elsewhere) in stage. */
typedef struct c_block {
    float *at;
    int64_t ldc, rows, cols;
    float (*stage)[TILE_ROWS];
} c_block;

static tile_src c_src(const c_block *cb)
{
    if (cb->rows == TILE_ROWS && cb->cols == TILE_ROWS) return (tile_src){cb->at, cb->ldc * (int64_t)sizeof(float)};
    memset(cb->stage, 0, sizeof(float) * TILE_ROWS * TILE_ROWS);
    for (int64_t r = 0; r < cb->rows; r++) memcpy(cb->stage[r], cb->at + r * cb->ldc, (size_t)cb->cols * sizeof(float));
    return (tile_src){cb->stage, TILE_BYTES};
}

/* After a staged tile was stored to stage: its corner back into C. */
static void c_finish(const c_block *cb)
{
    if (cb->rows == TILE_ROWS && cb->cols == TILE_ROWS) return;
    for (int64_t r = 0; r < cb->rows; r++) memcpy(cb->at + r * cb->ldc, cb->stage[r], (size_t)cb->cols * sizeof(float));
}

/* The padded copies of one 32 x 32 block's operands. */
typedef struct block_pads {
    uint32_t a[2][TILE_ROWS][TILE_K / 2];
    uint32_t b[2][TILE_ROWS][TILE_ROWS];
    float c[4][TILE_ROWS][TILE_ROWS];
} block_pads;

typedef struct operands {
    int64_t m, n, k;
    const uint16_t *a;
    int64_t a_rs, a_ps;
    const uint16_t *b;
    int64_t ldb;
    float *c;
    int64_t ldc;
    int accumulate;
} operands;

static c_block c_at(const operands *o, int64_t i, int64_t j, float (*stage)[TILE_ROWS])
{
    return (c_block){o->c + i * o->ldc + j, o->ldc, at_most(o->m - i, TILE_ROWS), at_most(o->n - j, TILE_ROWS), stage};
}

/* C's tile t starts from C itself (accumulate) or from zero. */
#define C_START(t, cb)                        \
    do {                                      \
        if (o->accumulate) {                  \
            tile_src s_ = c_src(&(cb));       \
            _tile_loadd(t, s_.at, s_.stride); \
        } else {                              \
            _tile_zero(t);                    \
        }                                     \
    } while (0)

#define C_END(t, cb)                                                                   \
    do {                                                                               \
        int whole_ = (cb).rows == TILE_ROWS && (cb).cols == TILE_ROWS;                 \
        _tile_stored(t, whole_ ? (void *)(cb).at : (void *)(cb).stage,                 \
                     whole_ ? (cb).ldc *(int64_t)sizeof(float) : (int64_t)TILE_BYTES); \
        c_finish(&(cb));                                                               \
    } while (0)

/* The whole 32 x 32 block at (i, j) when all its operands load straight
 * from memory: the loop has nothing in it but the tiles. */
static void block_whole(const operands *o, int64_t i, int64_t j)
{
    const uint16_t *a0 = o->a + i * o->a_rs, *a1 = a0 + TILE_ROWS * o->a_rs, *b0 = o->b + 2 * j,
                   *b1 = b0 + 2 * TILE_ROWS;
    int64_t sa = o->a_rs * (int64_t)sizeof(uint16_t), sb = o->ldb * (int64_t)sizeof(uint16_t);
    float *c00 = o->c + i * o->ldc + j, *c10 = c00 + TILE_ROWS * o->ldc;
    int64_t sc = o->ldc * (int64_t)sizeof(float);
    if (o->accumulate) {
        _tile_loadd(0, c00, sc);
        _tile_loadd(1, c00 + TILE_ROWS, sc);
        _tile_loadd(2, c10, sc);
        _tile_loadd(3, c10 + TILE_ROWS, sc);
    } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    }
    for (int64_t kk = 0; kk < o->k; kk += TILE_K) {
        _tile_loadd(4, a0 + kk, sa);
        _tile_loadd(6, b0 + (kk / 2) * o->ldb, sb);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, b1 + (kk / 2) * o->ldb, sb);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, a1 + kk, sa);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c00, sc);
    _tile_stored(1, c00 + TILE_ROWS, sc);
    _tile_stored(2, c10, sc);
    _tile_stored(3, c10 + TILE_ROWS, sc);
}

/* C's block of up to 32 x 32 at (i, j), k in order, one tile step of 32
 * values at a time; the second row or column half only where it exists. */
static void block(const operands *o, int64_t i, int64_t j, block_pads *pads)
{
    int two_rows = o->m - i > TILE_ROWS, two_cols = o->n - j > TILE_ROWS;
    c_block c00 = c_at(o, i, j, pads->c[0]), c01 = c_at(o, i, j + TILE_ROWS, pads->c[1]);
    c_block c10 = c_at(o, i + TILE_ROWS, j, pads->c[2]), c11 = c_at(o, i + TILE_ROWS, j + TILE_ROWS, pads->c[3]);
    C_START(0, c00);
    if (two_cols) C_START(1, c01);
    if (two_rows) C_START(2, c10);
    if (two_rows && two_cols) C_START(3, c11);
    for (int64_t kk = 0; kk < o->k; kk += TILE_K) {
        tile_src a0 = a_tile(o->a, o->a_rs, o->a_ps, o->m, o->k, i, kk, pads->a[0]);
        tile_src b0 = b_tile(o->b, o->ldb, o->n, o->k, j, kk, pads->b[0]);
        _tile_loadd(4, a0.at, a0.stride);
        _tile_loadd(6, b0.at, b0.stride);
        _tile_dpbf16ps(0, 4, 6);
        if (two_cols) {
            tile_src b1 = b_tile(o->b, o->ldb, o->n, o->k, j + TILE_ROWS, kk, pads->b[1]);
            _tile_loadd(7, b1.at, b1.stride);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (two_rows) {
            tile_src a1 = a_tile(o->a, o->a_rs, o->a_ps, o->m, o->k, i + TILE_ROWS, kk, pads->a[1]);
            _tile_loadd(5, a1.at, a1.stride);
            _tile_dpbf16ps(2, 5, 6);
            if (two_cols) _tile_dpbf16ps(3, 5, 7);
        }
    }
    C_END(0, c00);
    if (two_cols) C_END(1, c01);
    if (two_rows) C_END(2, c10);
    if (two_rows && two_cols) C_END(3, c11);
}

void mha__bf16_gemm_amx(int64_t m, int64_t n, int64_t k, const uint16_t *a, int64_t a_rs, int64_t a_ps,
                        const uint16_t *b, int64_t ldb, float *c, int64_t ldc, int accumulate)
{
    if (m <= 0 || n <= 0) return;
    operands o = {m, n, k, a, a_rs, a_ps, b, ldb, c, ldc, accumulate};
    _Alignas(64) block_pads pads; /* whole lines for the tiles, as gemm_split's sums */
    bool whole_k = a_ps == 2 && k % TILE_K == 0;
    configure();
    for (int64_t i = 0; i < m; i += 2 * TILE_ROWS)
        for (int64_t j = 0; j < n; j += 2 * TILE_ROWS) {
            if (whole_k && m - i >= 2 * TILE_ROWS && n - j >= 2 * TILE_ROWS) block_whole(&o, i, j);
            else block(&o, i, j, &pads);
        }
    release();
}

/* Four independent accumulator tiles fed by two A and two B tiles of
 * zeros (no overflow, no denormals): each TDPBF16PS is 16 x 16 x 32
 * multiply-adds. */
double mha__bf16_peak_amx(int64_t iterations)
{
    static const uint8_t zeros[TILE_ROWS * TILE_BYTES];
    configure();
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, zeros, TILE_BYTES);
    _tile_loadd(5, zeros, TILE_BYTES);
    _tile_loadd(6, zeros, TILE_BYTES);
    _tile_loadd(7, zeros, TILE_BYTES);
    for (int64_t it = 0; it < iterations; it++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    release();
    return 2.0 * TILE_ROWS * TILE_ROWS * TILE_K * 4.0 * (double)iterations;
}

/* ---------------------------------------------------------------- */
/* Float32 products from split bf16 parts (kernels.h)                */
/* ---------------------------------------------------------------- */

/* x rounded to bf16, nearest even, as float32 bits with the low half 0;
 * x finite.  Where that rounding overflows (|x| within half a bf16 step
 * of FLT_MAX) the truncation instead, which cannot. */
static __m512i bf16_bits(__m512i x)
{
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    __m512i up = _mm512_add_epi32(x, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    __m512i high = _mm512_set1_epi32((int)0xffff0000u), exponent = _mm512_set1_epi32(0x7f800000);
    __mmask16 overflow = _mm512_cmpeq_epi32_mask(_mm512_and_si512(up, exponent), exponent);
    return _mm512_and_si512(_mm512_mask_blend_epi32(overflow, up, x), high);
}

/* The high halves of a's 16 lanes, then b's, as 32 bf16 values in order. */
static void store_high_halves(uint16_t *dst, __m512i a, __m512i b)
{
    const __m512i odd_words = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29,
                                               27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, odd_words, b));
}

/* The three parts of 16 lanes of x (finite lanes only matter). */
typedef struct parts {
    __m512i hi, mid, lo;
} parts;

static inline __attribute__((always_inline)) parts split_lanes(__m512 x)
{
    parts p;
    p.hi = bf16_bits(_mm512_castps_si512(x));
    __m512 r = _mm512_sub_ps(x, _mm512_castsi512_ps(p.hi));
    p.mid = bf16_bits(_mm512_castps_si512(r));
    p.lo = bf16_bits(_mm512_castps_si512(_mm512_sub_ps(r, _mm512_castsi512_ps(p.mid))));
    return p;
}

static __mmask16 finite_lanes(__m512 x)
{
    __m512i exponent = _mm512_set1_epi32(0x7f800000);
    return _mm512_cmpneq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(x), exponent), exponent);
}

/* Pairs of bf16 parts, a's in the low half of each 32-bit lane. */
static void store_pairs(uint16_t *dst, __m512i a, __m512i b)
{
    _mm512_storeu_si512(dst, _mm512_or_si512(_mm512_srli_epi32(a, 16), b));
}

/* The parts of two rows' lanes into a tile row of pairs in each of the
 * three part tiles (MHA_SPLIT_TILE values apart). */
static void store_part_pairs(uint16_t *row, parts a, parts b)
{
    store_pairs(row, a.hi, b.hi);
    store_pairs(row + MHA_SPLIT_TILE, a.mid, b.mid);
    store_pairs(row + 2 * MHA_SPLIT_TILE, a.lo, b.lo);
}

/* Lanes below n of 16 (all for n >= 16, none for n <= 0). */
static __mmask16 first_lanes(int64_t n)
{
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

/* Each part's 32 values are stored as one 64-byte row: the weights' pack
 * transposes each tile right after filling it, and its 64-byte loads of
 * rows written as two 32-byte halves could not be forwarded from the
 * store buffer (they waited for both stores to reach L1, and the
 * transpose took more time than the split). */
static bool split3(const float *src, int64_t n, uint16_t *hi, uint16_t *mid, uint16_t *lo)
{
    __mmask16 m0 = first_lanes(n), m1 = first_lanes(n - 16); /* lanes past n load as 0, whose parts are 0 */
    __m512 a = _mm512_maskz_loadu_ps(m0, src), b = _mm512_maskz_loadu_ps(m1, src + 16);
    parts pa = split_lanes(a), pb = split_lanes(b);
    store_high_halves(hi, pa.hi, pb.hi);
    store_high_halves(mid, pa.mid, pb.mid);
    store_high_halves(lo, pa.lo, pb.lo);
    return (finite_lanes(a) & m0) == m0 && (finite_lanes(b) & m1) == m1;
}

/* split3 of two rows into a tile row of pairs, as B's tiles hold them:
 * part q of x0[j] at row_q[2 j], of x1[j] at row_q[2 j + 1] (x1 NULL: 0),
 * for j < n <= 16, zeros past them. */
static bool split3_pairs(const float *x0, const float *x1, int64_t n, uint16_t *row)
{
    __mmask16 mk = first_lanes(n);
    __m512 a = _mm512_maskz_loadu_ps(mk, x0), b = x1 ? _mm512_maskz_loadu_ps(mk, x1) : _mm512_setzero_ps();
    store_part_pairs(row, split_lanes(a), split_lanes(b));
    return (finite_lanes(a) & finite_lanes(b) & mk) == mk;
}

/* x's high half rounded to nearest (ties away from zero) as float32 bits
 * with the low half 0, for |x| <= 1: no carry can reach infinity. */
static __m512i bf16_bits_unit(__m512i x)
{
    return _mm512_and_si512(_mm512_add_epi32(x, _mm512_set1_epi32(0x8000)), _mm512_set1_epi32((int)0xffff0000u));
}

/* The parts of 16 probabilities: hi and mid rounded to nearest, lo the
 * rest truncated (off by at most 2^-8 |lo|, 2^-24 |x|: float32's own).
 * lo keeps its low half here: store_pairs_cut cuts it off as it pairs. */
static inline __attribute__((always_inline)) parts split_unit_lanes(__m512 x)
{
    parts p;
    p.hi = bf16_bits_unit(_mm512_castps_si512(x));
    __m512 r = _mm512_sub_ps(x, _mm512_castsi512_ps(p.hi));
    p.mid = bf16_bits_unit(_mm512_castps_si512(r));
    p.lo = _mm512_castps_si512(_mm512_sub_ps(r, _mm512_castsi512_ps(p.mid)));
    return p;
}

/* store_pairs for parts whose low halves are still there: a >> 16 drops
 * a's, and one ternary-logic operation cuts b's and pairs them (a >> 16)
 * | (b & 0xffff0000), two operations fewer than cutting both first (the
 * probabilities' filler is a tenth of the attention core's time). */
static void store_pairs_cut(uint16_t *dst, __m512i a, __m512i b)
{
    enum { A_OR_B_AND_C = 0xf8 }; /* the truth table of a | (b & c) */
    _mm512_storeu_si512(
        dst, _mm512_ternarylogic_epi32(_mm512_srli_epi32(a, 16), b, _mm512_set1_epi32((int)0xffff0000u), A_OR_B_AND_C));
}

/* Lanes whose value the rounding of bf16_bits_unit keeps finite: |x|
 * below FLT_MAX's last half bf16 step (0x7f7f8000), which leaves out
 * infinities and NaNs too.  For those lanes split_unit_lanes is exact
 * whatever |x|: hi and mid take 8 bits each, rounded, and lo = r - mid
 * the 8 that remain (x = hi + mid + lo, lo's low half 0). */
static __mmask16 splittable_lanes(__m512 x)
{
    __m512i magnitude = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff));
    return _mm512_cmplt_epu32_mask(magnitude, _mm512_set1_epi32(0x7f7f8000));
}

/* B's pair tiles from split_unit_lanes: the probabilities' filler and the
 * near pairs filler, one loop.  With `check`, the lanes of every row that
 * are splittable (all 16 where they all are); without, 0xffff (the
 * probabilities are in [0, 1]), the check compiled out. */
static inline __attribute__((always_inline)) __mmask16 unit_pairs(const float *src, int64_t lds, int64_t live,
                                                                  int64_t n, uint16_t *tiles, bool check)
{
    __mmask16 mk = first_lanes(n), ok = 0xffff;
    for (int64_t pr = 0; pr < 16; pr++) {
        uint16_t *row = tiles + pr * MHA_SPLIT_K;
        __m512 a = 2 * pr < live ? _mm512_maskz_loadu_ps(mk, src + 2 * pr * lds) : _mm512_setzero_ps();
        __m512 b = 2 * pr + 1 < live ? _mm512_maskz_loadu_ps(mk, src + (2 * pr + 1) * lds) : _mm512_setzero_ps();
        if (check) ok &= splittable_lanes(a) & splittable_lanes(b);
        parts pa = split_unit_lanes(a), pb = split_unit_lanes(b);
        store_pairs(row, pa.hi, pb.hi);
        store_pairs(row + MHA_SPLIT_TILE, pa.mid, pb.mid);
        store_pairs_cut(row + 2 * MHA_SPLIT_TILE, pa.lo, pb.lo);
    }
    return ok;
}

void mha__split_unit_pairs_tile_amx(const float *src, int64_t lds, int64_t live, int64_t n, uint16_t *tiles)
{
    (void)unit_pairs(src, lds, live, n, tiles, false);
}

bool mha__split_near_pairs_tile_amx(const float *src, int64_t lds, int64_t live, int64_t n, uint16_t *tiles)
{
    return unit_pairs(src, lds, live, n, tiles, true) == 0xffff;
}

bool mha__split_near_rows_tile_amx(const float *src, int64_t lds, int64_t live, int64_t n, uint16_t *tiles)
{
    __mmask16 m0 = first_lanes(n), m1 = first_lanes(n - 16), ok = 0xffff;
    for (int64_t i = 0; i < 16; i++) {
        uint16_t *row = tiles + i * MHA_SPLIT_K;
        __m512 a = i < live ? _mm512_maskz_loadu_ps(m0, src + i * lds) : _mm512_setzero_ps();
        __m512 b = i < live ? _mm512_maskz_loadu_ps(m1, src + i * lds + 16) : _mm512_setzero_ps();
        ok &= splittable_lanes(a) & splittable_lanes(b);
        parts pa = split_unit_lanes(a), pb = split_unit_lanes(b);
        store_high_halves(row, pa.hi, pb.hi);
        store_high_halves(row + MHA_SPLIT_TILE, pa.mid, pb.mid);
        store_high_halves(row + 2 * MHA_SPLIT_TILE, pa.lo, pb.lo);
    }
    return ok == 0xffff;
}

/* A tile row of zeros in each of the three parts: rows past the live ones. */
static void zero_row(uint16_t *row)
{
    for (int q = 0; q < 3; q++) memset(row + q * MHA_SPLIT_TILE, 0, MHA_SPLIT_K * sizeof(uint16_t));
}

bool mha__split_rows_tile_amx(const float *src, int64_t lds, int64_t live, int64_t n, uint16_t *tiles)
{
    bool finite = true;
    for (int64_t i = 0; i < 16; i++) {
        uint16_t *row = tiles + i * MHA_SPLIT_K;
        if (i < live) finite &= split3(src + i * lds, n, row, row + MHA_SPLIT_TILE, row + 2 * MHA_SPLIT_TILE);
        else zero_row(row);
    }
    return finite;
}

/* The row MHA_SPLIT_K rows below x (the same columns of the next block,
 * which its caller splits after this block's other tiles) on to L2. */
static void prefetch_next_block(const float *x, int64_t lds)
{
    _mm_prefetch((const char *)((uintptr_t)x + (uintptr_t)(MHA_SPLIT_K * lds) * sizeof(float)), _MM_HINT_T1);
}

bool mha__split_pairs_tile_amx(const float *src, int64_t lds, int64_t live, int64_t n, uint16_t *tiles)
{
    bool finite = true;
    for (int64_t pr = 0; pr < 16; pr++) {
        uint16_t *row = tiles + pr * MHA_SPLIT_K;
        if (2 * pr + 1 < live) {
            prefetch_next_block(src + 2 * pr * lds, lds);
            prefetch_next_block(src + (2 * pr + 1) * lds, lds);
        }
        if (2 * pr < live)
            finite &= split3_pairs(src + 2 * pr * lds, 2 * pr + 1 < live ? src + (2 * pr + 1) * lds : NULL, n, row);
        else zero_row(row);
    }
    return finite;
}

void mha__split_transpose_amx(uint16_t *tiles)
{
    for (int q = 0; q < 3; q++) {
        float *tile = (float *)(void *)(tiles + q * MHA_SPLIT_TILE); /* 16 x 16 pairs, moved as 32-bit lanes */
        __m512 x[16];
        for (int i = 0; i < 16; i++) x[i] = _mm512_loadu_ps(tile + 16 * i);
        transpose16(x);
        for (int i = 0; i < 16; i++) _mm512_storeu_ps(tile + 16 * i, x[i]);
    }
}

/* Part q of block b of a tile run (one row tile of A or column tile of B). */
#define SPLIT_PART(t, b, q) ((const void *)((t) + ((b)*3 + (q)) * MHA_SPLIT_TILE))

/* Tile 4 or 5 from part q of block b of A's first or second row tile,
 * 6 or 7 from B's first or second column tile. */
#define LOAD_A(t, b, q) _tile_loadd(t, SPLIT_PART(t == 4 ? a0 : a1, b, q), TILE_BYTES)
#define LOAD_B(t, b, q) _tile_loadd(t, SPLIT_PART(t == 6 ? b0 : b1, b, q), TILE_BYTES)
#define LOAD_5_7(b, qa, qb) \
    do {                    \
        LOAD_A(5, b, qa);   \
        LOAD_B(7, b, qb);   \
    } while (0)

/* The four products of one pair of parts, ordered to be done early with
 * the registers the next step reloads, each reload issued right after its
 * last reader: B's (6 first, then 7) or A's (4 first, then 5).  A tile
 * load waits for every earlier product that reads its register (the tiles
 * behave as if not renamed), so with all four products issued first a
 * step's reloads waited for the last of them, and the next step for the
 * loads; ordered this way a reload overlaps the step's last one or two
 * products.  The same bits (each accumulator sees the same products in
 * the same order).  A throwaway timer (1056 x 768 -> 2304, one thread)
 * went from 236-245 to 276-284 GFLOP/s; the layer forward at S2 from 9.10
 * to 8.85 ms, its training step from 35.7 to 34.1 (docs/PERFORMANCE.md). */
#define PRODUCTS_B(reload6, reload7) \
    do {                             \
        _tile_dpbf16ps(0, 4, 6);     \
        _tile_dpbf16ps(2, 5, 6);     \
        reload6;                     \
        _tile_dpbf16ps(1, 4, 7);     \
        _tile_dpbf16ps(3, 5, 7);     \
        reload7;                     \
    } while (0)
#define PRODUCTS_A(reload4, reload6, reload5) \
    do {                                      \
        _tile_dpbf16ps(0, 4, 6);              \
        _tile_dpbf16ps(1, 4, 7);              \
        reload4;                              \
        _tile_dpbf16ps(2, 5, 6);              \
        reload6;                              \
        _tile_dpbf16ps(3, 5, 7);              \
        reload5;                              \
    } while (0)

/* Where a product's side work (kernels.h) has got to: `done` of its
 * steps, after `block` of the product's `blocks` blocks of k. */
typedef struct side_cursor {
    const mha__side_work *work;
    int64_t done, block, blocks;
} side_cursor;

/* The steps due at one more block of k: an even share of them a block,
 * run once the block's first eight products are issued, so that they run
 * while the tiles work through them and the next ones.  Placed after the
 * block's last product instead, or spread in smaller steps after each
 * group of four, a throwaway timer of the values' products with the
 * probabilities' split beside them ran 3-5% slower. */
static void side_steps(side_cursor *side)
{
    if (!side) return;
    side->block++;
    int64_t due = side->work->steps * side->block / side->blocks;
    while (side->done < due) side->work->step(side->work->ctx, side->done++);
}

/* A tile store where none has run for some 2000 cycles takes about 900
 * more (a throwaway timer of split_block's products from L1, one thread:
 * pairs of up to 5 blocks of k ran at the tiles' peak, 5.4 ns a
 * TDPBF16PS, pairs of 6 blocks at 7.3 ns, their store_sums 300 ns each;
 * a store of any tile every block or two took that away).  So each block
 * stores tile 4 as one line, all 16 rows at one place (stride 0) in a
 * line of the thread's own: the attention's values (6 blocks a pair),
 * the weight gradients (8) and the projections (24) keep their stores
 * warm. */
static void keep_stores_warm(void)
{
    static _Thread_local _Alignas(64) uint8_t line[64];
    _tile_stored(4, line, 0);
}

/* One 32 x 32 block of C: tiles 0-3 accumulate the product from zero,
 * added to C at the end (one rounding at C's scale, as the FMA tiles add
 * theirs: summed from C itself, the six products of each block of k each
 * rounded at the scale of a bias or an earlier chunk's gradient, and a
 * weight gradient's error reached 2.6x PyTorch's on a golden case against
 * the FMA path's 0.9x), 4-5 hold two row tiles' part of A, 6-7 two column
 * tiles' part of B.  Per block of k the six products are ordered so that
 * each part is loaded once a row or column tile but B's hi (twice):
 * A hi against lo, mid, hi of B, then A mid against hi and mid, then A lo
 * against hi: eight loads of two tiles for 24 TDPBF16PS.  The last step
 * loads the next block's first parts as its registers come free, and
 * after the last block the next pair's (next0, next1 its row tiles of A;
 * B is the same), which that call then finds `loaded`: a pair no longer
 * starts by waiting for its first loads.  The sums stay in tiles 0-3
 * (store_sums takes them, to C or to a buffer add_sums adds to C).
 * `side`: the side work's place (NULL: none). */
static inline __attribute__((always_inline)) void split_block(int64_t k_blocks, const uint16_t *a0, const uint16_t *a1,
                                                              const uint16_t *next0, const uint16_t *next1,
                                                              const uint16_t *b0, const uint16_t *b1, bool loaded,
                                                              side_cursor *side)
{
    enum { HI, MID, LO };
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    if (!loaded) {
        LOAD_A(4, 0, HI);
        LOAD_B(6, 0, LO);
        LOAD_A(5, 0, HI);
        LOAD_B(7, 0, LO);
    }
    for (int64_t b = 0; b < k_blocks; b++) {
        PRODUCTS_B(LOAD_B(6, b, MID), LOAD_B(7, b, MID)); /* hi lo */
        PRODUCTS_B(LOAD_B(6, b, HI), LOAD_B(7, b, HI));   /* hi mid */
        keep_stores_warm();
        side_steps(side);
        PRODUCTS_A(LOAD_A(4, b, MID), (void)0, LOAD_A(5, b, MID));           /* hi hi */
        PRODUCTS_B(LOAD_B(6, b, MID), LOAD_B(7, b, MID));                    /* mid hi */
        PRODUCTS_A(LOAD_A(4, b, LO), LOAD_B(6, b, HI), LOAD_5_7(b, LO, HI)); /* mid mid */
        if (b + 1 < k_blocks) /* lo hi, loading the next block's first parts as registers come free */
            PRODUCTS_A(LOAD_A(4, b + 1, HI), LOAD_B(6, b + 1, LO), LOAD_5_7(b + 1, HI, LO));
        else if (next0) /* or the next pair's */
            PRODUCTS_A(
                _tile_loadd(4, SPLIT_PART(next0, 0, HI), TILE_BYTES), LOAD_B(6, 0, LO), do {
                    _tile_loadd(5, SPLIT_PART(next1, 0, HI), TILE_BYTES);
                    LOAD_B(7, 0, LO);
                } while (0));
        else PRODUCTS_A((void)0, (void)0, (void)0);
    }
}

/* Tiles 0-3 (a 32 x 32 block) stored at `to`, ld floats apart. */
static void store_sums(float *to, int64_t ld)
{
    _tile_stored(0, to, ld * (int64_t)sizeof(float));
    _tile_stored(1, to + 16, ld * (int64_t)sizeof(float));
    _tile_stored(2, to + 16 * ld, ld * (int64_t)sizeof(float));
    _tile_stored(3, to + 16 * ld + 16, ld * (int64_t)sizeof(float));
}

/* C's 32 x 32 block += sum (MHA_SPLIT_ADD), C = C * col_scale + sum
 * (MHA_SPLIT_SCALE_ADD: the multiply rounded, then the add; no FMA,
 * -ffp-contract=off), or C = bias + sum (MHA_SPLIT_BIAS_ADD, the bias in
 * col_scale's place, NULL for zeros). */
static void add_sums(float *c, int64_t ldc, const float (*sum)[32], int accumulate, const float *col_scale)
{
    if (accumulate == MHA_SPLIT_BIAS_ADD) {
        __m512 b0 = col_scale ? _mm512_loadu_ps(col_scale) : _mm512_setzero_ps();
        __m512 b1 = col_scale ? _mm512_loadu_ps(col_scale + 16) : _mm512_setzero_ps();
        for (int i = 0; i < 32; i++) {
            _mm512_storeu_ps(c + i * ldc, _mm512_add_ps(b0, _mm512_loadu_ps(&sum[i][0])));
            _mm512_storeu_ps(c + i * ldc + 16, _mm512_add_ps(b1, _mm512_loadu_ps(&sum[i][16])));
        }
        return;
    }
    if (accumulate == MHA_SPLIT_SCALE_ADD) {
        __m512 s0 = _mm512_loadu_ps(col_scale), s1 = _mm512_loadu_ps(col_scale + 16);
        for (int i = 0; i < 32; i++) {
            float *ci = c + i * ldc;
            __m512 c0 = _mm512_mul_ps(_mm512_loadu_ps(ci), s0), c1 = _mm512_mul_ps(_mm512_loadu_ps(ci + 16), s1);
            _mm512_storeu_ps(ci, _mm512_add_ps(c0, _mm512_loadu_ps(&sum[i][0])));
            _mm512_storeu_ps(ci + 16, _mm512_add_ps(c1, _mm512_loadu_ps(&sum[i][16])));
        }
        return;
    }
    for (int i = 0; i < 32; i++)
        for (int h = 0; h < 32; h += 16) {
            float *ci = c + i * ldc + h;
            _mm512_storeu_ps(ci, _mm512_add_ps(_mm512_loadu_ps(ci), _mm512_loadu_ps(&sum[i][h])));
        }
}
#undef PRODUCTS_A
#undef PRODUCTS_B
#undef LOAD_5_7
#undef LOAD_A
#undef LOAD_B

/* Pairs one after another; where C is added to, each pair's sums go to
 * one of two buffers, and the previous pair's are added to C only after
 * this pair's products are issued: the vector adds run while the tiles
 * multiply, where they used to wait for them, and the tiles for them.
 * The same operations on each element in the same order: the same bits. */
static inline __attribute__((always_inline)) void gemm_split(int64_t row_pairs, int64_t k_blocks, const uint16_t *a,
                                                             int64_t a_run, const uint16_t *b, float *c, int64_t ldc,
                                                             int accumulate, const float *col_scale,
                                                             const mha__side_work *side)
{
    int64_t run = 3 * k_blocks * MHA_SPLIT_TILE; /* one column tile of B */
    side_cursor cursor = {side, 0, 0, row_pairs * k_blocks}, *beside = side && side->steps > 0 ? &cursor : NULL;
    /* Tile rows of 64 bytes stored to, and add_sums's vectors loaded from,
     * whole cache lines: without the alignment the buffer sat wherever the
     * caller's stack left it (16 bytes), and a thread whose frame fell
     * across lines split every row in two. */
    _Alignas(64) float sums[2][32][32];
    configure();
    for (int64_t p = 0; p < row_pairs; p++) {
        const uint16_t *a0 = a + 2 * p * a_run, *next0 = p + 1 < row_pairs ? a0 + 2 * a_run : NULL;
        split_block(k_blocks, a0, a0 + a_run, next0, next0 ? next0 + a_run : NULL, b, b + run, p > 0, beside);
        if (accumulate == MHA_SPLIT_STORE) { /* C = the product: the tiles straight to C */
            store_sums(c + p * 32 * ldc, ldc);
            continue;
        }
        if (p > 0) add_sums(c + (p - 1) * 32 * ldc, ldc, sums[(p - 1) & 1], accumulate, col_scale);
        store_sums(&sums[p & 1][0][0], 32);
    }
    if (accumulate != MHA_SPLIT_STORE && row_pairs > 0)
        add_sums(c + (row_pairs - 1) * 32 * ldc, ldc, sums[(row_pairs - 1) & 1], accumulate, col_scale);
    for (int64_t i = beside ? cursor.done : 0; side && i < side->steps; i++) side->step(side->ctx, i);
}

/* Two copies of the loop: without side work it compiles to the loop it
 * was before side work existed (one with a run-time test for it ran
 * 2-3% slower in the layer's projections). */
void mha__gemm_split_amx(int64_t row_pairs, int64_t k_blocks, const uint16_t *a, int64_t a_run, const uint16_t *b,
                         float *c, int64_t ldc, int accumulate, const float *col_scale)
{
    gemm_split(row_pairs, k_blocks, a, a_run, b, c, ldc, accumulate, col_scale, NULL);
}

void mha__gemm_split_beside_amx(int64_t row_pairs, int64_t k_blocks, const uint16_t *a, int64_t a_run,
                                const uint16_t *b, float *c, int64_t ldc, int accumulate, const float *col_scale,
                                const mha__side_work *side)
{
    gemm_split(row_pairs, k_blocks, a, a_run, b, c, ldc, accumulate, col_scale, side);
}
