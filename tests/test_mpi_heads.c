/*
 * test_mpi_heads.c -- the head-parallel layer (mha_mpi.h) under mpirun
 * -np 1 .. 4: every rank checks the whole output, attention weights and
 * gradients against the float64 reference layer (the float32 reference
 * as baseline), the same bits on a second run, and that a failure on one
 * rank, or ranks that disagree, fail every rank with the rank named and
 * nothing written.
 */
#include "mha_mpi.h"
#include <unistd.h>
#include "mpi_harness.h"
#include "reference.h"

#include <stdint.h>

/* n floats in [-scale, scale), and the same as doubles in *as_double. */
static float *random_floats(int64_t n, double scale, double **as_double)
{
    float *f = malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    *as_double = malloc((size_t)(n > 0 ? n : 1) * sizeof(double));
    for (int64_t i = 0; i < n; i++) (*as_double)[i] = f[i] = (float)(mpi_uniform() * scale);
    return f;
}

typedef enum names { NAMES_PACKED, NAMES_SEPARATE, NAMES_LLAMA, NAMES_GPT2 } names;

typedef struct heads_case {
    const char *label;
    int64_t N, L, S, E, H, G, hd, kdim, vdim;
    names family;
    bool bias, bias_kv, zero_attn, causal, mask, kpm, weights, average, self;
    mha_rope_kind rope;
    int64_t window_left, window_right;
    float softcap;
    bool alibi;
} heads_case;

/* Everything one case builds: the whole weights (float and double), the
 * inputs, and the reference's description. */
typedef struct fixture {
    const heads_case *c;
    int64_t qd, kvd, S1;
    float *w[8];
    double *w64[8]; /* w_q, w_k, w_v, w_out, b_in, b_out, bias_k, bias_v */
    float *x[3];
    double *x64[3];
    float *add;    /* dense [N, H, L, S] additive mask (NULL: none) */
    double *add64; /* the same with the key padding folded in, for the reference */
    uint8_t *keep; /* key padding [N, S] */
    float *slopes;
    double *slopes64;
    mha_ref_layer ref;
} fixture;

enum { WQ, WK, WV, WO, BIN, BOUT, BK, BV };

static void fixture_init(fixture *f, const heads_case *c)
{
    memset(f, 0, sizeof *f);
    f->c = c;
    int64_t hd = c->hd ? c->hd : c->E / c->H, G = c->G ? c->G : c->H;
    f->qd = c->H * hd, f->kvd = G * hd, f->S1 = c->S + c->bias_kv + c->zero_attn;
    double ws = 1.0 / sqrt((double)c->E);
    const int64_t sizes[8] = {
        f->qd * c->E, f->kvd * c->kdim, f->kvd * c->vdim, c->E * f->qd, f->qd + 2 * f->kvd, c->E, f->kvd, f->kvd};
    for (int i = 0; i < 8; i++) f->w[i] = random_floats(sizes[i], i >= BIN ? 0.5 : ws, &f->w64[i]);
    const int64_t xs[3] = {c->N * c->L * c->E, c->N * c->S * c->kdim, c->N * c->S * c->vdim};
    for (int i = 0; i < 3; i++) f->x[i] = random_floats(xs[i], 1.0, &f->x64[i]);
    if (c->self) /* self-attention: one input */
        for (int i = 1; i < 3; i++)
            memcpy(f->x[i], f->x[0], (size_t)xs[0] * sizeof(float)),
                memcpy(f->x64[i], f->x64[0], (size_t)xs[0] * sizeof(double));
    int64_t n_add = c->N * c->H * c->L * c->S;
    if (c->mask || c->kpm) {
        f->add = calloc((size_t)n_add, sizeof(float));
        f->add64 = calloc((size_t)n_add, sizeof(double));
        f->keep = malloc((size_t)(c->N * c->S));
        for (int64_t j = 0; j < c->N * c->S; j++) f->keep[j] = j % c->S != 2 || j < c->S; /* key 2 of batch 1 */
        for (int64_t i = 0; i < n_add; i++) {
            int64_t n = i / (c->H * c->L * c->S), s = i % c->S;
            f->add[i] = c->mask ? (float)(mpi_uniform() * 2.0) : 0.0f;
            f->add64[i] = f->add[i];
            if (c->kpm && !f->keep[n * c->S + s]) f->add64[i] = -INFINITY;
        }
    }
    if (c->alibi) {
        f->slopes = random_floats(c->H, 0.5, &f->slopes64);
        for (int64_t h = 0; h < c->H; h++) f->slopes64[h] = f->slopes[h] = fabsf(f->slopes[h]);
    }
    f->ref = (mha_ref_layer){.N = c->N,
                             .L = c->L,
                             .S = c->S,
                             .E = c->E,
                             .H = c->H,
                             .kdim = c->kdim,
                             .vdim = c->vdim,
                             .add_zero_attn = c->zero_attn,
                             .causal = c->causal,
                             .w_q = f->w64[WQ],
                             .w_k = f->w64[WK],
                             .w_v = f->w64[WV],
                             .w_out = f->w64[WO],
                             .b_in = c->bias ? f->w64[BIN] : NULL,
                             .b_out = c->bias ? f->w64[BOUT] : NULL,
                             .bias_k = c->bias_kv ? f->w64[BK] : NULL,
                             .bias_v = c->bias_kv ? f->w64[BV] : NULL,
                             .add = f->add64,
                             .G = c->G,
                             .hd = c->hd,
                             .rope_kind = c->rope,
                             .rope_theta = 10000.0,
                             .rope_dim = hd,
                             .window_left = c->window_left,
                             .window_right = c->window_right,
                             .softcap = c->softcap,
                             .alibi = f->slopes64};
}

static void fixture_free(fixture *f)
{
    for (int i = 0; i < 8; i++) free(f->w[i]), free(f->w64[i]);
    for (int i = 0; i < 3; i++) free(f->x[i]), free(f->x64[i]);
    free(f->add), free(f->add64), free(f->keep), free(f->slopes), free(f->slopes64);
}

/* [rows, cols] -> [cols, rows] */
static float *transposed(const float *a, int64_t rows, int64_t cols)
{
    float *t = malloc((size_t)(rows * cols) * sizeof(float));
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) t[c * rows + r] = a[r * cols + c];
    return t;
}

/* Q|K|V stacked along rows ([qd + 2 kvd, E]). */
static float *stacked(const fixture *f, const float *q, const float *k, const float *v, int64_t cols)
{
    float *s = malloc((size_t)((f->qd + 2 * f->kvd) * cols) * sizeof(float));
    memcpy(s, q, (size_t)(f->qd * cols) * sizeof(float));
    memcpy(s + f->qd * cols, k, (size_t)(f->kvd * cols) * sizeof(float));
    memcpy(s + (f->qd + f->kvd) * cols, v, (size_t)(f->kvd * cols) * sizeof(float));
    return s;
}

/* Where set_weights puts each whole weight. */
typedef void (*put_fn)(void *to, const char *name, const float *data, int64_t numel);

static void put_in_layer(void *to, const char *name, const float *data, int64_t numel)
{
    CHECK_OK(mha_mpi_layer_set_weight(to, name, data, numel));
}

/* Every weight through the case's naming family. */
static void set_weights(put_fn put, void *to, const fixture *f)
{
    const heads_case *c = f->c;
    int64_t E = c->E, qd = f->qd, kvd = f->kvd, all = qd + 2 * kvd;
    if (c->family == NAMES_PACKED) {
        float *w = stacked(f, f->w[WQ], f->w[WK], f->w[WV], E);
        put(to, "in_proj_weight", w, all * E);
        free(w);
    } else if (c->family == NAMES_GPT2) {
        float *w = stacked(f, f->w[WQ], f->w[WK], f->w[WV], E), *t = transposed(w, all, E);
        float *o = transposed(f->w[WO], E, qd);
        put(to, "c_attn.weight", t, all * E);
        put(to, "c_proj.weight", o, qd * E);
        free(w), free(t), free(o);
    } else {
        bool llama = c->family == NAMES_LLAMA;
        put(to, llama ? "q_proj.weight" : "q_proj_weight", f->w[WQ], qd * E);
        put(to, llama ? "k_proj.weight" : "k_proj_weight", f->w[WK], kvd * c->kdim);
        put(to, llama ? "v_proj.weight" : "v_proj_weight", f->w[WV], kvd * c->vdim);
    }
    if (c->family != NAMES_GPT2)
        put(to, c->family == NAMES_LLAMA ? "o_proj.weight" : "out_proj.weight", f->w[WO], E * qd);
    if (c->bias && c->family == NAMES_LLAMA) {
        put(to, "q_proj.bias", f->w[BIN], qd);
        put(to, "k_proj.bias", f->w[BIN] + qd, kvd);
        put(to, "v_proj.bias", f->w[BIN] + qd + kvd, kvd);
        put(to, "o_proj.bias", f->w[BOUT], E);
    } else if (c->bias) {
        bool gpt2 = c->family == NAMES_GPT2;
        put(to, gpt2 ? "c_attn.bias" : "in_proj_bias", f->w[BIN], all);
        put(to, gpt2 ? "c_proj.bias" : "out_proj.bias", f->w[BOUT], E);
    }
    if (c->bias_kv) {
        put(to, "bias_k", f->w[BK], kvd);
        put(to, "bias_v", f->w[BV], kvd);
    }
}

static mha_mpi_layer *make_layer(const fixture *f, bool weights)
{
    const heads_case *c = f->c;
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    d.embed_dim = c->E, d.num_heads = c->H, d.num_kv_heads = c->G, d.head_dim = c->hd;
    d.kdim = c->kdim, d.vdim = c->vdim, d.bias = c->bias, d.add_bias_kv = c->bias_kv;
    d.add_zero_attn = c->zero_attn, d.rope.kind = c->rope;
    d.window_left = c->window_left, d.window_right = c->window_right, d.softcap = c->softcap;
    d.alibi_slopes = f->slopes;
    mha_mpi_layer *layer = NULL;
    CHECK_OK(mha_mpi_layer_create(MPI_COMM_WORLD, &d, &layer));
    if (layer && weights) set_weights(put_in_layer, layer, f);
    return layer;
}

/* Into a file (each rank its own), as tensor "w.<name>". */
static void put_in_file(void *to, const char *name, const float *data, int64_t numel)
{
    char tensor[64];
    snprintf(tensor, sizeof tensor, "w.%s", name);
    CHECK_OK(mha_st_writer_add(to, tensor, MHA_DTYPE_F32, 1, &numel, data));
}

/* Back from the file: each rank reads only its shard. */
typedef struct file_layer {
    mha_mpi_layer *layer;
    mha_st_file *file;
} file_layer;

static void put_from_file(void *to, const char *name, const float *data, int64_t numel)
{
    (void)data, (void)numel;
    file_layer *fl = to;
    char tensor[64];
    snprintf(tensor, sizeof tensor, "w.%s", name);
    CHECK_OK(mha_mpi_layer_read_weight(fl->layer, fl->file, tensor, name));
}

static mha_layer_fwd_args make_args(fixture *f);

/* A layer whose ranks read their shards from a file computes the bits of
 * one given the whole weights. */
static void check_read_weight(mha_ctx *ctx, mha_mpi_layer *given, fixture *f)
{
    const heads_case *c = f->c;
    char path[96];
    snprintf(path, sizeof path, "/tmp/test_mpi_heads_%ld_%d.safetensors", (long)getpid(), rank);
    mha_st_writer *w = NULL;
    CHECK_OK(mha_st_writer_create(&w));
    set_weights(put_in_file, w, f);
    CHECK_OK(mha_st_writer_save(w, path));
    mha_st_writer_free(w);
    file_layer fl = {make_layer(f, false), NULL};
    CHECK_OK(mha_st_open(path, &fl.file));
    if (fl.layer && fl.file) set_weights(put_from_file, &fl, f);
    int64_t n = c->N * c->L * c->E;
    float *a = malloc((size_t)n * sizeof(float)), *b = malloc((size_t)n * sizeof(float));
    mha_tensor ya = mha_tensor_3d(a, c->N, c->L, c->E), yb = mha_tensor_3d(b, c->N, c->L, c->E);
    mha_layer_fwd_args args = make_args(f);
    CHECK_OK(mha_mpi_layer_forward(ctx, given, &ya, NULL, &args));
    CHECK_OK(mha_mpi_layer_forward(ctx, fl.layer, &yb, NULL, &args));
    CHECK(memcmp(a, b, (size_t)n * sizeof(float)) == 0, "%s: weights read by shard give other bits", c->label);
    free(a), free(b);
    mha_st_close(fl.file);
    mha_mpi_layer_free(fl.layer);
    remove(path);
}

static mha_layer_fwd_args make_args(fixture *f)
{
    const heads_case *c = f->c;
    mha_layer_fwd_args a;
    mha_layer_fwd_args_init(&a);
    a.query = mha_tensor_3d(f->x[0], c->N, c->L, c->E);
    a.key = mha_tensor_3d(c->self ? f->x[0] : f->x[1], c->N, c->S, c->kdim);
    a.value = mha_tensor_3d(c->self ? f->x[0] : f->x[2], c->N, c->S, c->vdim);
    if (c->mask) a.attn_mask = (mha_mask){MHA_MASK_ADD, f->add, {c->H * c->L * c->S, c->L * c->S, c->S, 1}};
    if (c->kpm) a.key_padding_mask = (mha_mask){MHA_MASK_KEEP, f->keep, {c->S, 0, 0, 1}};
    a.causal = c->causal ? MHA_CAUSAL_TOP_LEFT : MHA_CAUSAL_NONE;
    a.average_attn_weights = c->average;
    return a;
}

/* The output (and weights) against the reference, and the same bits twice. */
static void check_forward(mha_ctx *ctx, mha_mpi_layer *layer, fixture *f)
{
    const heads_case *c = f->c;
    int64_t n_out = c->N * c->L * c->E, hw = c->average ? 1 : c->H, n_w = c->N * hw * c->L * f->S1;
    float *out = malloc((size_t)n_out * sizeof(float)), *again = malloc((size_t)n_out * sizeof(float));
    float *w = calloc((size_t)n_w, sizeof(float)), *base = malloc((size_t)n_out * sizeof(float));
    double *want = malloc((size_t)n_out * sizeof(double));
    int64_t n_probs = c->N * c->H * c->L * f->S1;
    double *probs = malloc((size_t)n_probs * sizeof(double)), *want_w = calloc((size_t)n_w, sizeof(double));
    mha_tensor y = mha_tensor_3d(out, c->N, c->L, c->E), y2 = mha_tensor_3d(again, c->N, c->L, c->E);
    mha_tensor tw = mha_tensor_4d(w, c->N, hw, c->L, f->S1);
    mha_layer_fwd_args a = make_args(f);
    CHECK_OK(mha_mpi_layer_forward(ctx, layer, &y, c->weights ? &tw : NULL, &a));
    CHECK_OK(mha_mpi_layer_forward(ctx, layer, &y2, c->weights ? &tw : NULL, &a)); /* the same call */
    CHECK(memcmp(out, again, (size_t)n_out * sizeof(float)) == 0, "%s: two runs differ", c->label);
    mha_ref_layer_f64(&f->ref, f->x64[0], f->x64[1], f->x64[2], want, probs);
    mha_ref_layer_f32(&f->ref, f->x[0], f->x[1], f->x[2], base, NULL);
    char what[160];
    snprintf(what, sizeof what, "%s on %d ranks: output", c->label, size);
    CHECK_CLOSE(what, out, want, base, n_out);
    if (c->weights) {
        for (int64_t i = 0; i < n_probs; i++) { /* [N, H, L, S'] -> [N, hw, L, S'] */
            int64_t n = i / (c->H * c->L * f->S1), h = i / (c->L * f->S1) % c->H, rest = i % (c->L * f->S1);
            int64_t to = (n * hw + (c->average ? 0 : h)) * c->L * f->S1 + rest;
            want_w[to] += c->average ? probs[i] / (double)c->H : probs[i];
        }
        snprintf(what, sizeof what, "%s on %d ranks: attention weights", c->label, size);
        CHECK_CLOSE(what, w, want_w, NULL, n_w);
    }
    void *owned[] = {out, again, w, base, want, probs, want_w};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) free(owned[i]);
}

/* Where the reference keeps each gradient, by the names of the case's family. */
typedef struct grad_slot {
    const char *name;
    int64_t offset, numel;
    bool transpose; /* GPT-2's Conv1D tensors are stored [in, out] */
    int64_t rows;
} grad_slot;

static int grad_slots(const fixture *f, grad_slot *s)
{
    const heads_case *c = f->c;
    int64_t E = c->E, N = c->N, qd = f->qd, kvd = f->kvd;
    int64_t wq = N * (c->L * E + c->S * (c->kdim + c->vdim)), wk = wq + qd * E, wv = wk + kvd * c->kdim;
    int64_t wo = wv + kvd * c->vdim, bin = wo + E * qd, bout = bin + qd + 2 * kvd, bk = bout + E, bv = bk + E;
    int n = 0;
    if (c->family == NAMES_PACKED) s[n++] = (grad_slot){"in_proj_weight", wq, (qd + 2 * kvd) * E, false, 0};
    if (c->family == NAMES_GPT2) {
        s[n++] = (grad_slot){"c_attn.weight", wq, (qd + 2 * kvd) * E, true, qd + 2 * kvd};
        s[n++] = (grad_slot){"c_proj.weight", wo, E * qd, true, E};
    }
    if (c->family == NAMES_SEPARATE || c->family == NAMES_LLAMA) {
        bool llama = c->family == NAMES_LLAMA;
        s[n++] = (grad_slot){llama ? "q_proj.weight" : "q_proj_weight", wq, qd * E, false, 0};
        s[n++] = (grad_slot){llama ? "k_proj.weight" : "k_proj_weight", wk, kvd * c->kdim, false, 0};
        s[n++] = (grad_slot){llama ? "v_proj.weight" : "v_proj_weight", wv, kvd * c->vdim, false, 0};
    }
    if (c->family != NAMES_GPT2)
        s[n++] = (grad_slot){c->family == NAMES_LLAMA ? "o_proj.weight" : "out_proj.weight", wo, E * qd, false, 0};
    if (c->bias) {
        s[n++] = (grad_slot){c->family == NAMES_GPT2 ? "c_attn.bias" : "in_proj_bias", bin, qd + 2 * kvd, false, 0};
        s[n++] = (grad_slot){c->family == NAMES_GPT2 ? "c_proj.bias" : "out_proj.bias", bout, E, false, 0};
    }
    if (c->bias_kv) {
        s[n++] = (grad_slot){"bias_k", bk, kvd, false, 0};
        s[n++] = (grad_slot){"bias_v", bv, kvd, false, 0};
    }
    return n;
}

/* Input and parameter gradients against the reference's backward. */
/* Input gradients written (args.write_input_grads) over NaN: the bits
 * the backward leaves when adding them to zeros.  Two forwards and
 * backwards of their own; the parameters' gradients are the caller's to
 * zero after. */
static void check_written_input_grads(mha_ctx *ctx, mha_mpi_layer *layer, const fixture *f, mha_layer_fwd_args *a)
{
    const heads_case *c = f->c;
    int64_t nq = c->N * c->L * c->E, nk = c->N * c->S * c->kdim, n = c->self ? nq : nq + nk + c->N * c->S * c->vdim;
    float *g[2] = {calloc((size_t)n, sizeof(float)), malloc((size_t)n * sizeof(float))}; /* added, written */
    float *out = malloc((size_t)nq * sizeof(float)), *dy = calloc((size_t)nq, sizeof(float));
    for (int64_t i = 0; i < n; i++) g[1][i] = NAN, dy[i % nq] = (float)(i % 7) - 3.0f;
    mha_tensor y = mha_tensor_3d(out, c->N, c->L, c->E), tdy = mha_tensor_3d(dy, c->N, c->L, c->E);
    for (int write = 0; write < 2; write++) {
        mha_tensor gq = mha_tensor_3d(g[write], c->N, c->L, c->E);
        mha_tensor gk = mha_tensor_3d(g[write] + nq, c->N, c->S, c->kdim);
        mha_tensor gv = mha_tensor_3d(g[write] + nq + nk, c->N, c->S, c->vdim);
        CHECK_OK(mha_mpi_layer_forward(ctx, layer, &y, NULL, a));
        a->write_input_grads = write;
        if (c->self) CHECK_OK(mha_mpi_layer_backward(ctx, layer, a, &tdy, &gq, &gq, &gq));
        else CHECK_OK(mha_mpi_layer_backward(ctx, layer, a, &tdy, &gq, &gk, &gv));
        a->write_input_grads = 0;
    }
    CHECK(memcmp(g[0], g[1], (size_t)n * sizeof(float)) == 0,
          "%s on %d ranks: input gradients written differ from added to zeros", c->label, size);
    free(g[0]), free(g[1]), free(out), free(dy);
}

static void check_backward(mha_ctx *ctx, mha_mpi_layer *layer, fixture *f)
{
    const heads_case *c = f->c;
    int64_t n_total = mha_ref_layer_grads_size(&f->ref), n_dy = c->N * c->L * c->E;
    int64_t nq = n_dy, nk = c->N * c->S * c->kdim;
    double *dy64;
    float *dy = random_floats(n_dy, 1.0, &dy64), *got = calloc((size_t)n_total, sizeof(float));
    float *out = malloc((size_t)n_dy * sizeof(float)), *base = malloc((size_t)n_total * sizeof(float));
    double *want = malloc((size_t)n_total * sizeof(double));
    mha_layer *mine = mha_mpi_layer_local(layer);
    mha_layer_tape *tape = NULL;
    CHECK_OK(mha_layer_train_init(mine));
    CHECK_OK(mha_layer_tape_create(&tape));
    mha_layer_fwd_args a = make_args(f);
    a.tape = tape;
    check_written_input_grads(ctx, layer, f, &a);
    /* The parameters' gradients of the backward below only, deferred as
     * a framework's step (and `mha bench --parallel heads`) does: the
     * two backwards above left sums that it must write over. */
    mha_layer_zero_grad_deferred(mine);
    mha_tensor y = mha_tensor_3d(out, c->N, c->L, c->E), tdy = mha_tensor_3d(dy, c->N, c->L, c->E);
    mha_tensor gq = mha_tensor_3d(got, c->N, c->L, c->E), gk = mha_tensor_3d(got + nq, c->N, c->S, c->kdim);
    mha_tensor gv = mha_tensor_3d(got + nq + nk, c->N, c->S, c->vdim);
    CHECK_OK(mha_mpi_layer_forward(ctx, layer, &y, NULL, &a));
    if (c->self) { /* one tensor for the three; the reference splits it in three */
        CHECK_OK(mha_mpi_layer_backward(ctx, layer, &a, &tdy, &gq, &gq, &gq));
    } else {
        CHECK_OK(mha_mpi_layer_backward(ctx, layer, &a, &tdy, &gq, &gk, &gv));
    }
    grad_slot slots[12];
    int n_slots = grad_slots(f, slots);
    for (int i = 0; i < n_slots; i++) {
        float *whole = malloc((size_t)slots[i].numel * sizeof(float));
        CHECK_OK(mha_mpi_layer_get_grad(layer, slots[i].name, whole, slots[i].numel));
        if (slots[i].transpose) { /* back to the reference's [out, in] */
            float *t = transposed(whole, slots[i].numel / slots[i].rows, slots[i].rows);
            memcpy(whole, t, (size_t)slots[i].numel * sizeof(float));
            free(t);
        }
        memcpy(got + slots[i].offset, whole, (size_t)slots[i].numel * sizeof(float));
        free(whole);
    }
    mha_ref_layer_backward_f64(&f->ref, f->x64[0], f->x64[1], f->x64[2], dy64, want);
    mha_ref_layer_backward_f32(&f->ref, f->x[0], f->x[1], f->x[2], dy, base);
    if (c->self) /* the reference's three input gradients, summed as the library's one */
        for (int64_t i = 0; i < nq; i++) {
            want[i] += want[nq + i] + want[2 * nq + i];
            base[i] += base[nq + i] + base[2 * nq + i];
            want[nq + i] = want[2 * nq + i] = 0, base[nq + i] = base[2 * nq + i] = 0;
        }
    char what[160];
    snprintf(what, sizeof what, "%s on %d ranks: gradients", c->label, size);
    CHECK_CLOSE_GRAD(what, got, want, base, n_total);
    mha_layer_tape_free(tape);
    void *owned[] = {dy64, dy, got, out, base, want};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) free(owned[i]);
}

static const heads_case cases[] = {
    {.label = "nn.MultiheadAttention self-attention, packed weights, per-head mask, per-head weights",
     .N = 2,
     .L = 9,
     .S = 9,
     .E = 48,
     .H = 6,
     .kdim = 48,
     .vdim = 48,
     .family = NAMES_PACKED,
     .bias = true,
     .mask = true,
     .weights = true,
     .self = true,
     .window_left = -1,
     .window_right = -1},
    {.label = "bias_k/bias_v, zero row, key padding, causal, averaged weights",
     .N = 2,
     .L = 7,
     .S = 7,
     .E = 40,
     .H = 4,
     .kdim = 40,
     .vdim = 40,
     .family = NAMES_PACKED,
     .bias = true,
     .bias_kv = true,
     .zero_attn = true,
     .kpm = true,
     .causal = true,
     .weights = true,
     .average = true,
     .window_left = -1,
     .window_right = -1},
    {.label = "cross-attention, kdim and vdim, separate weights",
     .N = 1,
     .L = 5,
     .S = 11,
     .E = 32,
     .H = 4,
     .kdim = 24,
     .vdim = 20,
     .family = NAMES_SEPARATE,
     .bias = true,
     .mask = true,
     .window_left = -1,
     .window_right = -1},
    {.label = "Llama GQA 8/4 heads of 10, rope, window, softcap, ALiBi",
     .N = 2,
     .L = 12,
     .S = 12,
     .E = 64,
     .H = 8,
     .G = 4,
     .hd = 10,
     .kdim = 64,
     .vdim = 64,
     .family = NAMES_LLAMA,
     .bias = true,
     .causal = true,
     .rope = MHA_ROPE_HALF,
     .window_left = 4,
     .window_right = -1,
     .softcap = 5.0f,
     .alibi = true},
    {.label = "GPT-2 names (Conv1D), 5 heads",
     .N = 2,
     .L = 6,
     .S = 6,
     .E = 40,
     .H = 5,
     .kdim = 40,
     .vdim = 40,
     .family = NAMES_GPT2,
     .bias = true,
     .causal = true,
     .self = true,
     .window_left = -1,
     .window_right = -1},
};

/* Errors reach every rank, name the rank, and write nothing. */
static void test_failures(mha_ctx *ctx)
{
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    d.embed_dim = 32, d.num_heads = 4, d.num_kv_heads = 1;
    mha_mpi_layer *layer = NULL;
    if (size > 1) CHECK_FAILS(mha_mpi_layer_create(MPI_COMM_WORLD, &d, &layer), MHA_ERR_INVALID_ARG, "cannot be split");
    d.num_kv_heads = 0, d.num_heads = 3; /* 32 % 3 */
    CHECK_FAILS(mha_mpi_layer_create(MPI_COMM_WORLD, &d, &layer), MHA_ERR_INVALID_ARG, "not divisible");
    char who[32];
    snprintf(who, sizeof who, "rank %d of %d", size - 1, size);
    if (size > 1) { /* descriptions that disagree, caught before anything is made */
        d.num_heads = rank == size - 1 ? 8 : 4;
        CHECK_FAILS(mha_mpi_layer_create(MPI_COMM_WORLD, &d, &layer), MHA_ERR_INVALID_ARG,
                    "num_heads is 8 here but 4 on rank 0");
        CHECK(strstr(mha_last_error(), who) != NULL, "\"%s\" does not name %s", mha_last_error(), who);
    }
    CHECK(layer == NULL, "a failed create left a layer");

    heads_case c = cases[0];
    fixture f;
    fixture_init(&f, &c);
    layer = make_layer(&f, true);
    if (!layer) return fixture_free(&f);
    float wrong[7] = {0};
    CHECK_FAILS(mha_mpi_layer_set_weight(layer, "in_proj_weight", rank == size - 1 ? wrong : f.w[WQ],
                                         rank == size - 1 ? 7 : c.E * c.E * 3),
                MHA_ERR_INVALID_ARG, who);
    int64_t n_out = c.N * c.L * c.E;
    float *out = malloc((size_t)n_out * sizeof(float));
    for (int64_t i = 0; i < n_out; i++) out[i] = 1234.5f;
    mha_tensor y = mha_tensor_3d(out, c.N, c.L, c.E);
    mha_layer_fwd_args a = make_args(&f);
    if (size > 1) { /* ranks that disagree on the shapes: caught before any compute */
        if (rank == size - 1) a.query.shape[1] = c.L - 1, y.shape[1] = c.L - 1;
        CHECK_FAILS(mha_mpi_layer_forward(ctx, layer, &y, NULL, &a), MHA_ERR_INVALID_ARG, "query.shape[1]");
        a = make_args(&f), y.shape[1] = c.L;
    }
    /* A failure inside one rank's compute (its mask has no data): every
     * rank returns it. */
    if (rank == size - 1) a.attn_mask.data = NULL;
    mha_status st = mha_mpi_layer_forward(ctx, layer, &y, NULL, &a);
    CHECK(st != MHA_OK && strstr(mha_last_error(), who), "a local failure gave %s: %s", mha_status_str(st),
          mha_last_error());
    /* The caller's outputs are checked before anything is written through
     * them: attention weights for 2 of the 6 heads, a strided output
     * reaching past its end, a gradient shaped unlike its input. */
    a = make_args(&f);
    float w_small[2 * 9 * 9 * 2];
    mha_tensor w = mha_tensor_4d(w_small, c.N, 2, c.L, c.S);
    CHECK_FAILS(mha_mpi_layer_forward(ctx, layer, &y, &w, &a), MHA_ERR_INVALID_ARG,
                "attn_weights has 2 in its second dimension");
    mha_tensor y_bad = y;
    y_bad.stride[0] = -1;
    CHECK_FAILS(mha_mpi_layer_forward(ctx, layer, &y_bad, NULL, &a), MHA_ERR_INVALID_ARG, "attn_output");
    mha_tensor g_bad = mha_tensor_3d(out, c.N, c.L - 1, c.E);
    CHECK_FAILS(mha_mpi_layer_backward(ctx, layer, &a, &y, NULL, &g_bad, NULL), MHA_ERR_INVALID_ARG, "grad_key");
    bool untouched = true;
    for (int64_t i = 0; i < n_out; i++) untouched = untouched && out[i] == 1234.5f;
    CHECK(untouched, "a failed forward or backward wrote its output");
    free(out);
    mha_mpi_layer_free(layer);
    fixture_free(&f);
}

int main(int argc, char **argv)
{
    mpi_begin(&argc, &argv);
    mha_ctx *ctx = NULL;
    CHECK_OK(mha_ctx_create(1, &ctx));
    for (size_t i = 0; ctx && i < sizeof cases / sizeof cases[0]; i++) {
        int64_t G = cases[i].G ? cases[i].G : cases[i].H;
        if (G < size) continue; /* more ranks than kv heads: refused, tested below */
        fixture f;
        fixture_init(&f, &cases[i]);
        mha_mpi_layer *layer = make_layer(&f, true);
        if (layer) {
            check_forward(ctx, layer, &f);
            check_read_weight(ctx, layer, &f);
            check_backward(ctx, layer, &f);
        }
        mha_mpi_layer_free(layer);
        fixture_free(&f);
    }
    if (ctx) test_failures(ctx);
    mha_ctx_free(ctx);
    /* Every rank's verdict, so that the job fails when any rank does. */
    return mpi_finish("test_mpi_heads");
}
