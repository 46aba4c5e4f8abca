/*
 * test_mpi_sequence.c -- sequence-parallel attention (mha_mpi.h) under
 * mpirun -np 1 .. 4: each rank passes its block of rows of one whole
 * problem (views into it, uneven blocks), and its block of the output,
 * lse and gradients must be the single-process call's bits; failures on
 * one rank, or ranks that disagree, fail every rank with the rank named.
 */
#include "mha_mpi.h"
#include "mpi_harness.h"
#include "reference.h"

#include <stdint.h>

static float uniform(float scale) { return (float)mpi_uniform() * scale; }

static float *random_floats(int64_t n, float scale)
{
    float *x = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    for (int64_t i = 0; i < n; i++) x[i] = uniform(scale);
    return x;
}

typedef struct seq_case {
    const char *label;
    int64_t B, H, G, L, S, D, Dv;
    mha_causal causal;
    int64_t window_left, window_right;
    float softcap, size;
    bool alibi, add_mask, keep_mask;
    double scale; /* 0: the default */
} seq_case;

/* Rank r's block of n rows: uneven on purpose (rank 0 gets the fewest). */
static void block_of(int64_t n, int r, int64_t *at, int64_t *rows)
{
    int64_t weight = (int64_t)size * (size + 1) / 2;
    *at = n * ((int64_t)r * (r + 1) / 2) / weight;
    *rows = n * ((int64_t)(r + 1) * (r + 2) / 2) / weight - *at;
}

/* The view of rows [at, at + rows) of a whole [B, heads, n, w] tensor. */
static mha_tensor rows_view(float *whole, int64_t B, int64_t heads, int64_t n, int64_t w, int64_t at, int64_t rows)
{
    mha_tensor t = mha_tensor_4d(whole, B, heads, n, w);
    t.data += at * w;
    t.shape[2] = rows;
    return t;
}

/* Whether a block (contiguous [B, heads, rows, w]) holds rows [at, + rows)
 * of the whole tensor, bit for bit. */
static bool same_rows(const float *block, const float *whole, int64_t B, int64_t heads, int64_t n, int64_t w,
                      int64_t at, int64_t rows)
{
    for (int64_t bh = 0; bh < B * heads; bh++)
        if (memcmp(block + bh * rows * w, whole + (bh * n + at) * w, (size_t)(rows * w) * sizeof(float)) != 0)
            return false;
    return true;
}

typedef struct problem {
    const seq_case *c;
    float *q, *k, *v, *out, *lse, *dout, *dq, *dk, *dv, *add, *slopes;
    uint8_t *keep;
    mha_attn_desc desc;
} problem;

static void problem_init(problem *p, const seq_case *c, mha_ctx *ctx)
{
    memset(p, 0, sizeof *p);
    p->c = c;
    float in = c->size > 0 ? c->size : 1.0f;
    p->q = random_floats(c->B * c->H * c->L * c->D, in);
    p->k = random_floats(c->B * c->G * c->S * c->D, in);
    p->v = random_floats(c->B * c->G * c->S * c->Dv, 1.0f);
    p->dout = random_floats(c->B * c->H * c->L * c->Dv, 1.0f);
    p->out = malloc((size_t)(c->B * c->H * c->L * c->Dv) * sizeof(float));
    p->lse = malloc((size_t)(c->B * c->H * c->L) * sizeof(float));
    p->dq = malloc((size_t)(c->B * c->H * c->L * c->D) * sizeof(float));
    p->dk = malloc((size_t)(c->B * c->G * c->S * c->D) * sizeof(float));
    p->dv = malloc((size_t)(c->B * c->G * c->S * c->Dv) * sizeof(float));
    mha_attn_desc_init(&p->desc);
    p->desc.causal = c->causal, p->desc.window_left = c->window_left, p->desc.window_right = c->window_right;
    p->desc.softcap = c->softcap, p->desc.enable_gqa = c->G != c->H;
    if (c->scale != 0) p->desc.scale = c->scale;
    if (c->alibi) {
        p->slopes = random_floats(c->H, 0.5f);
        for (int64_t h = 0; h < c->H; h++) p->slopes[h] = fabsf(p->slopes[h]);
        p->desc.alibi_slopes = p->slopes;
    }
    if (c->add_mask) { /* per head: each rank must read its heads' part */
        p->add = random_floats(c->B * c->H * c->L * c->S, 2.0f);
        p->desc.mask = (mha_mask){MHA_MASK_ADD, p->add, {c->H * c->L * c->S, c->L * c->S, c->S, 1}};
    }
    if (c->keep_mask) { /* [L, S], broadcast over batch and heads; row 1 fully masked */
        p->keep = malloc((size_t)(c->L * c->S));
        for (int64_t i = 0; i < c->L * c->S; i++) p->keep[i] = i / c->S != 1 && (i * 7) % 5 != 0;
        p->desc.mask = (mha_mask){MHA_MASK_KEEP, p->keep, {0, 0, c->S, 1}};
    }
    /* The single-process results every rank's blocks must reproduce. */
    mha_tensor q = mha_tensor_4d(p->q, c->B, c->H, c->L, c->D), k = mha_tensor_4d(p->k, c->B, c->G, c->S, c->D);
    mha_tensor v = mha_tensor_4d(p->v, c->B, c->G, c->S, c->Dv), o = mha_tensor_4d(p->out, c->B, c->H, c->L, c->Dv);
    mha_tensor g = mha_tensor_4d(p->dout, c->B, c->H, c->L, c->Dv);
    mha_tensor dq = mha_tensor_4d(p->dq, c->B, c->H, c->L, c->D), dk = mha_tensor_4d(p->dk, c->B, c->G, c->S, c->D);
    mha_tensor dv = mha_tensor_4d(p->dv, c->B, c->G, c->S, c->Dv);
    CHECK_OK(mha_attention(ctx, &o, p->lse, &q, &k, &v, &p->desc));
    CHECK_OK(mha_attention_backward(ctx, &dq, &dk, &dv, &q, &k, &v, &o, p->lse, &g, &p->desc));
}

static void problem_free(problem *p)
{
    void *owned[] = {p->q, p->k, p->v, p->out, p->lse, p->dout, p->dq, p->dk, p->dv, p->add, p->slopes, p->keep};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) free(owned[i]);
}

/* This rank's blocks of one problem. */
typedef struct blocks {
    int64_t l0, lr, s0, sr;
    mha_tensor q, k, v, out, dout, dq, dk, dv;
    float *mem, *lse;
} blocks;

/* This rank's block of the queries (keys: true, of the keys) as blocks_init
 * lays them out: one run. */
static void blocks_of_rank(int64_t n, bool keys, int64_t start[2], int64_t rows[2])
{
    start[0] = 0;
    for (int r = 0; r < rank; r++) {
        int64_t at, len;
        block_of(n, keys ? size - 1 - r : r, &at, &len);
        start[0] += len;
    }
    block_of(n, keys ? size - 1 - rank : rank, &start[1], &rows[0]);
    start[1] = start[0] + rows[0], rows[1] = 0;
}

static void blocks_init(blocks *b, problem *p)
{
    const seq_case *c = p->c;
    block_of(c->L, rank, &b->l0, &b->lr);
    /* Keys split the other way round (rank 0 the most), still in rank
     * order along the sequence. */
    block_of(c->S, size - 1 - rank, &b->s0, &b->sr);
    b->s0 = 0;
    for (int r = 0; r < rank; r++) {
        int64_t at, rows;
        block_of(c->S, size - 1 - r, &at, &rows);
        b->s0 += rows;
    }
    b->q = rows_view(p->q, c->B, c->H, c->L, c->D, b->l0, b->lr);
    b->k = rows_view(p->k, c->B, c->G, c->S, c->D, b->s0, b->sr);
    b->v = rows_view(p->v, c->B, c->G, c->S, c->Dv, b->s0, b->sr);
    b->dout = rows_view(p->dout, c->B, c->H, c->L, c->Dv, b->l0, b->lr);
    int64_t n_out = c->B * c->H * b->lr * c->Dv, n_dq = c->B * c->H * b->lr * c->D;
    int64_t n_dk = c->B * c->G * b->sr * c->D, n_dv = c->B * c->G * b->sr * c->Dv;
    b->mem = malloc((size_t)(n_out + n_dq + n_dk + n_dv + 1) * sizeof(float));
    b->lse = malloc((size_t)(c->B * c->H * b->lr + 1) * sizeof(float));
    b->out = mha_tensor_4d(b->mem, c->B, c->H, b->lr, c->Dv);
    b->dq = mha_tensor_4d(b->mem + n_out, c->B, c->H, b->lr, c->D);
    b->dk = mha_tensor_4d(b->mem + n_out + n_dq, c->B, c->G, b->sr, c->D);
    b->dv = mha_tensor_4d(b->mem + n_out + n_dq + n_dk, c->B, c->G, b->sr, c->Dv);
}

static void check_ulysses(mha_ctx *ctx, problem *p)
{
    const seq_case *c = p->c;
    blocks b;
    blocks_init(&b, p);
    CHECK_OK(mha_mpi_attention_ulysses(ctx, MPI_COMM_WORLD, &b.out, b.lse, &b.q, &b.k, &b.v, &p->desc));
    CHECK(same_rows(b.mem, p->out, c->B, c->H, c->L, c->Dv, b.l0, b.lr), "%s on %d ranks: output differs", c->label,
          size);
    CHECK(same_rows(b.lse, p->lse, c->B, c->H, c->L, 1, b.l0, b.lr), "%s on %d ranks: lse differs", c->label, size);
    CHECK_OK(mha_mpi_attention_ulysses_backward(ctx, MPI_COMM_WORLD, &b.dq, &b.dk, &b.dv, &b.q, &b.k, &b.v, &b.out,
                                                b.lse, &b.dout, &p->desc));
    CHECK(same_rows(b.dq.data, p->dq, c->B, c->H, c->L, c->D, b.l0, b.lr), "%s on %d ranks: dq differs", c->label,
          size);
    CHECK(same_rows(b.dk.data, p->dk, c->B, c->G, c->S, c->D, b.s0, b.sr), "%s on %d ranks: dk differs", c->label,
          size);
    CHECK(same_rows(b.dv.data, p->dv, c->B, c->G, c->S, c->Dv, b.s0, b.sr), "%s on %d ranks: dv differs", c->label,
          size);
    free(b.mem);
    free(b.lse);
}

/* ------------------------------------------------------------------ */
/* Ring attention: within the tolerance rule of the float64 reference   */
/* ------------------------------------------------------------------ */

/* This rank's rows under a layout: for BLOCKS the uneven blocks above. */
static void runs_of(mha_mpi_layout layout, int64_t n, bool keys, int64_t start[2], int64_t rows[2])
{
    if (layout == MHA_MPI_ZIGZAG) return mha_mpi_layout_rows(layout, n, size, rank, start, rows);
    blocks_of_rank(n, keys, start, rows);
}

/* Copies rows `runs` of a whole [B, heads, n, w] tensor to a contiguous
 * [B, heads, rows, w] one (to_local) or back. */
static void move_rows(float *whole, float *local, int64_t BH, int64_t n, int64_t w, const int64_t start[2],
                      const int64_t rows[2], bool to_local)
{
    int64_t total = rows[0] + rows[1];
    for (int64_t bh = 0; bh < BH; bh++)
        for (int r = 0, at = 0; r < 2; at += (int)rows[r], r++) {
            float *wp = whole + (bh * n + start[r]) * w, *lp = local + (bh * total + at) * w;
            size_t bytes = (size_t)(rows[r] * w) * sizeof(float);
            if (to_local) memcpy(lp, wp, bytes);
            else memcpy(wp, lp, bytes);
        }
}

static double *to_double(const float *x, int64_t n)
{
    double *d = malloc((size_t)(n > 0 ? n : 1) * sizeof(double));
    for (int64_t i = 0; i < n; i++) d[i] = x[i];
    return d;
}

/* The reference's description of a problem, with dense masks. */
static mha_ref_sdpa reference_of(const problem *p, double **add, uint8_t **keep, double **slopes)
{
    const seq_case *c = p->c;
    int64_t n = c->B * c->H * c->L * c->S;
    *add = NULL, *keep = NULL, *slopes = NULL;
    if (c->add_mask) *add = to_double(p->add, n);
    if (c->keep_mask) {
        *keep = malloc((size_t)(n > 0 ? n : 1));
        for (int64_t i = 0; i < n; i++) (*keep)[i] = p->keep[i % (c->L * c->S)];
    }
    if (c->alibi) *slopes = to_double(p->slopes, c->H);
    mha_attn_desc d = p->desc;
    return (mha_ref_sdpa){c->B,
                          c->H,
                          c->G,
                          c->L,
                          c->S,
                          c->D,
                          c->Dv,
                          isnan(d.scale) ? 1.0 / sqrt((double)c->D) : d.scale,
                          c->softcap,
                          c->causal,
                          c->window_left,
                          c->window_right,
                          *slopes,
                          *keep,
                          *add};
}

/* The whole results of one ring run, from every rank's rows. */
typedef struct ring_result {
    float *out, *lse, *dq, *dk, *dv;
} ring_result;

static void run_ring(mha_ctx *ctx, const problem *p, mha_mpi_layout layout, ring_result *r)
{
    const seq_case *c = p->c;
    int64_t qs[2], qr[2], ks[2], kr[2];
    runs_of(layout, c->L, false, qs, qr);
    runs_of(layout, c->S, true, ks, kr);
    int64_t lr = qr[0] + qr[1], sr = kr[0] + kr[1], BH = c->B * c->H, BG = c->B * c->G;
    float *q = malloc((size_t)(BH * lr * c->D + 1) * sizeof(float)),
          *g = malloc((size_t)(BH * lr * c->Dv + 1) * sizeof(float));
    float *k = malloc((size_t)(BG * sr * c->D + 1) * sizeof(float)),
          *v = malloc((size_t)(BG * sr * c->Dv + 1) * sizeof(float));
    float *o = malloc((size_t)(BH * lr * c->Dv + 1) * sizeof(float)),
          *l = malloc((size_t)(BH * lr + 1) * sizeof(float));
    float *dq = malloc((size_t)(BH * lr * c->D + 1) * sizeof(float)),
          *dk = malloc((size_t)(BG * sr * c->D + 1) * sizeof(float));
    float *dv = malloc((size_t)(BG * sr * c->Dv + 1) * sizeof(float));
    move_rows(p->q, q, BH, c->L, c->D, qs, qr, true);
    move_rows(p->dout, g, BH, c->L, c->Dv, qs, qr, true);
    move_rows(p->k, k, BG, c->S, c->D, ks, kr, true);
    move_rows(p->v, v, BG, c->S, c->Dv, ks, kr, true);
    mha_tensor tq = mha_tensor_4d(q, c->B, c->H, lr, c->D), tk = mha_tensor_4d(k, c->B, c->G, sr, c->D);
    mha_tensor tv = mha_tensor_4d(v, c->B, c->G, sr, c->Dv), to = mha_tensor_4d(o, c->B, c->H, lr, c->Dv);
    mha_tensor tg = mha_tensor_4d(g, c->B, c->H, lr, c->Dv), tdq = mha_tensor_4d(dq, c->B, c->H, lr, c->D);
    mha_tensor tdk = mha_tensor_4d(dk, c->B, c->G, sr, c->D), tdv = mha_tensor_4d(dv, c->B, c->G, sr, c->Dv);
    CHECK_OK(mha_mpi_attention_ring(ctx, MPI_COMM_WORLD, layout, &to, l, &tq, &tk, &tv, &p->desc));
    CHECK_OK(mha_mpi_attention_ring_backward(ctx, MPI_COMM_WORLD, layout, &tdq, &tdk, &tdv, &tq, &tk, &tv, &to, l, &tg,
                                             &p->desc));
    /* Every rank's rows into whole tensors (zeros elsewhere), summed: exact. */
    int64_t n[5] = {BH * c->L * c->Dv, BH * c->L, BH * c->L * c->D, BG * c->S * c->D, BG * c->S * c->Dv};
    float **all[5] = {&r->out, &r->lse, &r->dq, &r->dk, &r->dv};
    for (int i = 0; i < 5; i++) *all[i] = calloc((size_t)n[i], sizeof(float));
    move_rows(r->out, o, BH, c->L, c->Dv, qs, qr, false);
    move_rows(r->lse, l, BH, c->L, 1, qs, qr, false);
    move_rows(r->dq, dq, BH, c->L, c->D, qs, qr, false);
    move_rows(r->dk, dk, BG, c->S, c->D, ks, kr, false);
    move_rows(r->dv, dv, BG, c->S, c->Dv, ks, kr, false);
    for (int i = 0; i < 5; i++) MPI_Allreduce(MPI_IN_PLACE, *all[i], (int)n[i], MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    void *owned[] = {q, g, k, v, o, l, dq, dk, dv};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) free(owned[i]);
}

static void ring_result_free(ring_result *r) { free(r->out), free(r->lse), free(r->dq), free(r->dk), free(r->dv); }

static void check_ring(mha_ctx *ctx, problem *p, mha_mpi_layout layout)
{
    const seq_case *c = p->c;
    ring_result r, again;
    run_ring(ctx, p, layout, &r);
    run_ring(ctx, p, layout, &again);
    int64_t BH = c->B * c->H, BG = c->B * c->G, n_out = BH * c->L * c->Dv, n_q = BH * c->L * c->D;
    int64_t n_k = BG * c->S * c->D, n_v = BG * c->S * c->Dv;
    const char *name = layout == MHA_MPI_ZIGZAG ? "zigzag" : "blocks";
    CHECK(memcmp(r.out, again.out, (size_t)n_out * sizeof(float)) == 0 &&
              memcmp(r.dk, again.dk, (size_t)n_k * sizeof(float)) == 0,
          "%s, ring %s on %d ranks: two runs differ", c->label, name, size);
    double *add, *slopes, *q64 = to_double(p->q, n_q), *k64 = to_double(p->k, n_k), *v64 = to_double(p->v, n_v);
    double *g64 = to_double(p->dout, n_out);
    uint8_t *keep;
    mha_ref_sdpa ref = reference_of(p, &add, &keep, &slopes);
    double *want = malloc((size_t)(n_out + BH * c->L + n_q + n_k + n_v) * sizeof(double));
    float *base = malloc((size_t)(n_out + BH * c->L + n_q + n_k + n_v) * sizeof(float));
    double *w_lse = want + n_out, *w_dq = w_lse + BH * c->L, *w_dk = w_dq + n_q, *w_dv = w_dk + n_k;
    float *b_lse = base + n_out, *b_dq = b_lse + BH * c->L, *b_dk = b_dq + n_q, *b_dv = b_dk + n_k;
    mha_ref_sdpa_f64(&ref, q64, k64, v64, want, w_lse, NULL);
    mha_ref_sdpa_f32(&ref, p->q, p->k, p->v, base, b_lse, NULL);
    mha_ref_sdpa_backward_f64(&ref, q64, k64, v64, g64, w_dq, w_dk, w_dv);
    mha_ref_sdpa_backward_f32(&ref, p->q, p->k, p->v, p->dout, b_dq, b_dk, b_dv);
    char what[200];
    snprintf(what, sizeof what, "%s, ring %s on %d ranks: output", c->label, name, size);
    CHECK_CLOSE(what, r.out, want, base, n_out);
    snprintf(what, sizeof what, "%s, ring %s on %d ranks: lse", c->label, name, size);
    CHECK_CLOSE(what, r.lse, w_lse, b_lse, BH * c->L);
    snprintf(what, sizeof what, "%s, ring %s on %d ranks: dq", c->label, name, size);
    CHECK_CLOSE_GRAD(what, r.dq, w_dq, b_dq, n_q);
    snprintf(what, sizeof what, "%s, ring %s on %d ranks: dk", c->label, name, size);
    CHECK_CLOSE_GRAD(what, r.dk, w_dk, b_dk, n_k);
    snprintf(what, sizeof what, "%s, ring %s on %d ranks: dv", c->label, name, size);
    CHECK_CLOSE_GRAD(what, r.dv, w_dv, b_dv, n_v);
    void *owned[] = {add, keep, slopes, q64, k64, v64, g64, want, base};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) free(owned[i]);
    ring_result_free(&r);
    ring_result_free(&again);
}

static const seq_case cases[] = {
    {"plain", 2, 4, 4, 37, 37, 16, 16, MHA_CAUSAL_NONE, -1, -1, 0, 0, false, false, false, 0},
    {"causal, top-left", 1, 4, 4, 50, 50, 32, 32, MHA_CAUSAL_TOP_LEFT, -1, -1, 0, 0, false, false, false, 0},
    {"causal, bottom-right, more keys", 2, 4, 4, 21, 45, 16, 24, MHA_CAUSAL_BOTTOM_RIGHT, -1, -1, 0, 0, false, false,
     false, 0},
    {"window, softcap, ALiBi, scale", 1, 6, 6, 40, 40, 16, 16, MHA_CAUSAL_NONE, 5, 3, 4.0f, 0, true, false, false, 0.3},
    {"GQA 8/4, per-head additive mask", 2, 8, 4, 23, 29, 16, 8, MHA_CAUSAL_NONE, -1, -1, 0, 0, false, true, false, 0},
    {"keep mask with a fully masked row", 1, 4, 4, 19, 19, 8, 8, MHA_CAUSAL_NONE, -1, -1, 0, 0, false, false, true, 0},
    {"large logits", 1, 4, 4, 33, 33, 64, 64, MHA_CAUSAL_TOP_LEFT, -1, -1, 0, 15.0f, false, false, false, 0},
    {"MQA (one kv head), causal", 2, 4, 1, 30, 30, 16, 16, MHA_CAUSAL_TOP_LEFT, -1, -1, 0, 0, false, false, false, 0},
    /* more query rows a rank than the ring's forward takes in one call */
    {"long, causal", 1, 2, 2, 2600, 2600, 8, 8, MHA_CAUSAL_TOP_LEFT, -1, -1, 0, 0, false, false, false, 0},
};

/* Errors reach every rank, name the rank, and write nothing. */
static void test_failures(mha_ctx *ctx)
{
    seq_case c = cases[0];
    c.G = 1, c.H = 4; /* MQA: one kv head */
    problem p;
    problem_init(&p, &c, ctx);
    blocks b;
    blocks_init(&b, &p);
    if (size > 1)
        CHECK_FAILS(mha_mpi_attention_ulysses(ctx, MPI_COMM_WORLD, &b.out, NULL, &b.q, &b.k, &b.v, &p.desc),
                    MHA_ERR_INVALID_ARG, "cannot be split");
    free(b.mem), free(b.lse);
    problem_free(&p);

    problem_init(&p, &cases[0], ctx);
    blocks_init(&b, &p);
    for (int64_t i = 0; i < b.out.shape[0] * b.out.shape[1] * b.out.shape[2] * b.out.shape[3]; i++) b.mem[i] = 7.0f;
    char who[32];
    snprintf(who, sizeof who, "rank %d of %d", size - 1, size);
    mha_attn_desc d = p.desc;
    if (rank == size - 1) d.causal = MHA_CAUSAL_TOP_LEFT;
    if (size > 1)
        CHECK_FAILS(mha_mpi_attention_ulysses(ctx, MPI_COMM_WORLD, &b.out, NULL, &b.q, &b.k, &b.v, &d),
                    MHA_ERR_INVALID_ARG, "causal");
    mha_tensor bad = b.q;
    if (rank == size - 1) bad.shape[3] = 3; /* q's width no longer k's: a local error */
    CHECK_FAILS(mha_mpi_attention_ulysses(ctx, MPI_COMM_WORLD, &b.out, NULL, &bad, &b.k, &b.v, &p.desc),
                MHA_ERR_INVALID_ARG, who);
    bool untouched = true;
    for (int64_t i = 0; i < b.out.shape[0] * b.out.shape[1] * b.out.shape[2] * b.out.shape[3]; i++)
        untouched = untouched && b.mem[i] == 7.0f;
    CHECK(untouched, "a failed call wrote its output");
    mha_tensor far = b.out; /* an output whose strides reach outside it */
    far.stride[1] = -1;
    CHECK_FAILS(mha_mpi_attention_ulysses(ctx, MPI_COMM_WORLD, &far, NULL, &b.q, &b.k, &b.v, &p.desc),
                MHA_ERR_INVALID_ARG, "output");
    CHECK_FAILS(mha_mpi_attention_ring(ctx, MPI_COMM_WORLD, MHA_MPI_BLOCKS, &far, NULL, &b.q, &b.k, &b.v, &p.desc),
                MHA_ERR_INVALID_ARG, "output");
    CHECK_FAILS(mha_mpi_attention_ulysses_backward(ctx, MPI_COMM_WORLD, &b.dq, &b.dk, &b.dv, &b.q, &b.k, &b.v, &b.out,
                                                   rank == size - 1 ? NULL : b.lse, &b.dout, &p.desc),
                MHA_ERR_MISUSE, who);
    free(b.mem), free(b.lse);
    problem_free(&p);
}

int main(int argc, char **argv)
{
    mpi_begin(&argc, &argv);
    mha_ctx *ctx = NULL;
    CHECK_OK(mha_ctx_create(1, &ctx));
    for (size_t i = 0; ctx && i < sizeof cases / sizeof cases[0]; i++) {
        problem p;
        problem_init(&p, &cases[i], ctx);
        if (cases[i].G >= size) check_ulysses(ctx, &p); /* whole kv heads per rank */
        check_ring(ctx, &p, MHA_MPI_BLOCKS);
        check_ring(ctx, &p, MHA_MPI_ZIGZAG);
        problem_free(&p);
    }
    if (ctx) test_failures(ctx);
    mha_ctx_free(ctx);
    return mpi_finish("test_mpi_sequence");
}
