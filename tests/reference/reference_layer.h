/*
 * reference_layer.h -- the body of the reference nn.MultiheadAttention,
 * compiled for several element types by reference.c (see reference_sdpa.h
 * for the macros; SUFFIX names the file-local helpers per type).  ROUND
 * marks every value a bf16 model stores: weights, inputs, Q, K, V, the
 * probabilities entering P V, and the head outputs.  It follows
 * PyTorch's multi_head_attention_forward step by step.
 */

/* y[r, :] = x[r, :] W^T + b over `rows` rows. */
static void SUFFIX(linear)(const REAL *x, int64_t rows, int64_t in, const REAL *w, const REAL *b, int64_t out, REAL *y)
{
    for (int64_t r = 0; r < rows; r++)
        for (int64_t o = 0; o < out; o++) {
            REAL s = b ? b[o] : 0;
            for (int64_t c = 0; c < in; c++) s += x[r * in + c] * w[o * in + c];
            y[r * out + o] = s;
        }
}

/* A REAL copy of n doubles (NULL stays NULL), each ROUNDed. */
static REAL *SUFFIX(copy)(const double *src, int64_t n)
{
    if (!src) return NULL;
    REAL *dst = ref_alloc(n, sizeof(REAL));
    for (int64_t i = 0; i < n; i++) dst[i] = ROUND((REAL)src[i]);
    return dst;
}

/* A REAL copy of n doubles, not rounded (NULL stays NULL). */
static REAL *SUFFIX(exact)(const double *src, int64_t n)
{
    if (!src) return NULL;
    REAL *dst = ref_alloc(n, sizeof(REAL));
    for (int64_t i = 0; i < n; i++) dst[i] = (REAL)src[i];
    return dst;
}

/* A ROUNDed copy of n REALs. */
static REAL *SUFFIX(rounded)(const REAL *src, int64_t n)
{
    REAL *dst = ref_alloc(n, sizeof(REAL));
    for (int64_t i = 0; i < n; i++) dst[i] = ROUND(src[i]);
    return dst;
}

/* Everything the forward computes before and during attention. */
typedef struct SUFFIX(layer_state) {
    int64_t N, L, S, S1, E, H, G, d, qd, kvd;
    REAL *query, *key, *value; /* inputs as the model stores them */
    REAL *w_q, *w_k, *w_v, *w_out, *b_in, *b_out;
    REAL *q, *k, *v;               /* projections, [N, T, h d] / [N, T, g d], S1 key rows */
    REAL *qh, *kh, *vh, *oh, *cat; /* per head [N, heads, T, d]; heads concatenated */
    double *add;
    mha_ref_sdpa sd;
} SUFFIX(layer_state);

/* Rotary embedding of x [N, heads, T, d] in place, row t at position
 * pos0 + t; by minus the angle when `inverse`. */
static void SUFFIX(rope)(const mha_ref_layer *a, REAL *x, int64_t N, int64_t heads, int64_t T, int64_t d, bool inverse)
{
    if (!a->rope_kind) return;
    int64_t half = a->rope_dim / 2;
    for (int64_t r = 0; r < N * heads * T; r++) {
        REAL *row = x + r * d;
        for (int64_t i = 0; i < half; i++) {
            double angle = (double)(a->position + r % T) * pow(a->rope_theta, -2.0 * (double)i / (double)a->rope_dim);
            REAL c = (REAL)cos(angle), sn = (REAL)(inverse ? -sin(angle) : sin(angle));
            int64_t i0 = a->rope_kind == MHA_ROPE_INTERLEAVED ? 2 * i : i;
            int64_t i1 = a->rope_kind == MHA_ROPE_INTERLEAVED ? 2 * i + 1 : i + half;
            REAL u = row[i0], w = row[i1];
            row[i0] = u * c - w * sn;
            row[i1] = w * c + u * sn;
        }
    }
}

/* [N, T, heads d] -> [N, heads, T, d] (ROUNDed), or back when `merge`. */
static void SUFFIX(split_heads)(REAL *flat, REAL *heads, int64_t N, int64_t T, int64_t H, int64_t d, bool merge)
{
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t t = 0; t < T; t++)
                for (int64_t c = 0; c < d; c++) {
                    REAL *f = flat + (n * T + t) * H * d + h * d + c, *x = heads + ((n * H + h) * T + t) * d + c;
                    if (merge) *f = *x;
                    else *x = ROUND(*f);
                }
}

static void SUFFIX(layer_prepare)(const mha_ref_layer *a, const REAL *query, const REAL *key, const REAL *value,
                                  SUFFIX(layer_state) * st, REAL *probs)
{
    int64_t N = a->N, L = a->L, S = a->S, E = a->E, H = a->H, G = a->G ? a->G : H, d = a->hd ? a->hd : E / H;
    int64_t qd = H * d, kvd = G * d, S1 = S + (a->bias_k != NULL) + (a->add_zero_attn != 0);
    SUFFIX(layer_state) z = {.N = N, .L = L, .S = S, .S1 = S1, .E = E, .H = H, .G = G, .d = d, .qd = qd, .kvd = kvd};
    /* In a bf16 model the weights and inputs are stored rounded; biases stay. */
    z.query = SUFFIX(rounded)(query, N * L * E), z.key = SUFFIX(rounded)(key, N * S * a->kdim);
    z.value = SUFFIX(rounded)(value, N * S * a->vdim);
    z.w_q = SUFFIX(copy)(a->w_q, qd * E), z.w_k = SUFFIX(copy)(a->w_k, kvd * a->kdim);
    z.w_v = SUFFIX(copy)(a->w_v, kvd * a->vdim), z.w_out = SUFFIX(copy)(a->w_out, E * qd);
    z.b_in = SUFFIX(exact)(a->b_in, qd + 2 * kvd), z.b_out = SUFFIX(exact)(a->b_out, E);
    z.q = ref_alloc(N * L * qd, sizeof(REAL)), z.k = ref_alloc(N * S1 * kvd, sizeof(REAL));
    z.v = ref_alloc(N * S1 * kvd, sizeof(REAL)), z.cat = ref_alloc(N * L * qd, sizeof(REAL));
    z.qh = ref_alloc(N * H * L * d, sizeof(REAL)), z.oh = ref_alloc(N * H * L * d, sizeof(REAL));
    z.kh = ref_alloc(N * G * S1 * d, sizeof(REAL)), z.vh = ref_alloc(N * G * S1 * d, sizeof(REAL));
    z.add = ref_alloc(N * H * L * S1, sizeof(double));
    for (int64_t n = 0; n < N; n++) {
        SUFFIX(linear)(z.query + n * L * E, L, E, z.w_q, z.b_in, qd, z.q + n * L * qd);
        SUFFIX(linear)
        (z.key + n * S * a->kdim, S, a->kdim, z.w_k, z.b_in ? z.b_in + qd : NULL, kvd, z.k + n * S1 * kvd);
        SUFFIX(linear)
        (z.value + n * S * a->vdim, S, a->vdim, z.w_v, z.b_in ? z.b_in + qd + kvd : NULL, kvd, z.v + n * S1 * kvd);
        for (int64_t c = 0; a->bias_k && c < E; c++) { /* bias_k/bias_v row; the zero row stays zero */
            z.k[(n * S1 + S) * E + c] = (REAL)a->bias_k[c];
            z.v[(n * S1 + S) * E + c] = (REAL)a->bias_v[c];
        }
    }
    SUFFIX(split_heads)(z.q, z.qh, N, L, H, d, false);
    SUFFIX(split_heads)(z.k, z.kh, N, S1, G, d, false);
    SUFFIX(split_heads)(z.v, z.vh, N, S1, G, d, false);
    SUFFIX(rope)(a, z.qh, N, H, L, d, false);
    SUFFIX(rope)(a, z.kh, N, G, S1, d, false);
    /* The mask over real keys, padded with 0 for the appended ones; causal
     * is -inf above the diagonal. */
    for (int64_t r = 0; r < N * H * L; r++)
        for (int64_t j = 0; j < S; j++) {
            double m = a->add ? a->add[r * S + j] : 0;
            z.add[r * S1 + j] = a->causal && j > r % L ? -INFINITY : m;
        }
    z.sd = (mha_ref_sdpa){.B = N,
                          .Hq = H,
                          .Hkv = G,
                          .L = L,
                          .S = S1,
                          .D = d,
                          .Dv = d,
                          .scale = 1.0 / sqrt((double)d),
                          .softcap = a->softcap,
                          .window_left = a->window_left,
                          .window_right = a->window_right,
                          .alibi = a->alibi,
                          .add = z.add};
    NAME(&z.sd, z.qh, z.kh, z.vh, z.oh, NULL, probs);
    SUFFIX(split_heads)(z.cat, z.oh, N, L, H, d, true);
    for (int64_t i = 0; i < N * L * qd; i++) z.cat[i] = ROUND(z.cat[i]);
    *st = z;
}

static void SUFFIX(layer_release)(SUFFIX(layer_state) * z)
{
    REAL *owned[] = {z->w_q, z->w_k, z->w_v, z->w_out, z->b_in, z->b_out, z->q,   z->k,    z->v,
                     z->cat, z->qh,  z->oh,  z->kh,    z->vh,   z->query, z->key, z->value};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) free(owned[i]);
    free(z->add);
}

void LAYER_NAME(const mha_ref_layer *a, const REAL *query, const REAL *key, const REAL *value, REAL *out, REAL *probs)
{
    SUFFIX(layer_state) z;
    SUFFIX(layer_prepare)(a, query, key, value, &z, probs);
    SUFFIX(linear)(z.cat, z.N * z.L, z.qd, z.w_out, z.b_out, z.E, out);
    SUFFIX(layer_release)(&z);
}

/* g[o, i] += sum_r dy[r, o] x[r, i] over `rows` rows. */
static void SUFFIX(weight_grad)(const REAL *dy, const REAL *x, int64_t rows, int64_t out, int64_t in, REAL *g)
{
    for (int64_t r = 0; r < rows; r++)
        for (int64_t o = 0; o < out; o++)
            for (int64_t i = 0; i < in; i++) g[o * in + i] += dy[r * out + o] * x[r * in + i];
}

/* dx[r, i] = sum_o dy[r, o] w[o, i]. */
static void SUFFIX(input_grad)(const REAL *dy, const REAL *w, int64_t rows, int64_t out, int64_t in, REAL *dx)
{
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < in; i++) {
            REAL s = 0;
            for (int64_t o = 0; o < out; o++) s += dy[r * out + o] * w[o * in + i];
            dx[r * in + i] = s;
        }
}

/* The layer's gradients for dout [N, L, E], by the chain rule through the
 * forward's steps (float32/float64 layers only: no rounding to bf16). */
void LAYER_BWD_NAME(const mha_ref_layer *a, const REAL *query, const REAL *key, const REAL *value, const REAL *dout,
                    REAL *grads)
{
    SUFFIX(layer_state) z;
    SUFFIX(layer_prepare)(a, query, key, value, &z, NULL);
    int64_t N = z.N, L = z.L, S = z.S, S1 = z.S1, E = z.E, H = z.H, G = z.G, d = z.d, qd = z.qd, kvd = z.kvd;
    int64_t kd = a->kdim, vd = a->vdim;
    REAL *g_query = grads, *g_key = g_query + N * L * E, *g_value = g_key + N * S * kd;
    REAL *g_wq = g_value + N * S * vd, *g_wk = g_wq + qd * E, *g_wv = g_wk + kvd * kd, *g_wout = g_wv + kvd * vd;
    REAL *g_bin = g_wout + E * qd, *g_bout = g_bin + qd + 2 * kvd, *g_bias_k = g_bout + E, *g_bias_v = g_bias_k + E;
    memset(grads, 0, (size_t)(g_bias_v + E - grads) * sizeof(REAL));
    /* Output projection. */
    REAL *dcat = ref_alloc(N * L * qd, sizeof(REAL));
    SUFFIX(weight_grad)(dout, z.cat, N * L, E, qd, g_wout);
    SUFFIX(input_grad)(dout, z.w_out, N * L, E, qd, dcat);
    for (int64_t r = 0; a->b_out && r < N * L; r++)
        for (int64_t c = 0; c < E; c++) g_bout[c] += dout[r * E + c];
    /* Attention, per head, and back through the rotation. */
    REAL *doh = ref_alloc(N * H * L * d, sizeof(REAL)), *dqh = ref_alloc(N * H * L * d, sizeof(REAL));
    REAL *dkh = ref_alloc(N * G * S1 * d, sizeof(REAL)), *dvh = ref_alloc(N * G * S1 * d, sizeof(REAL));
    SUFFIX(split_heads)(dcat, doh, N, L, H, d, false);
    BWD_NAME(&z.sd, z.qh, z.kh, z.vh, doh, dqh, dkh, dvh);
    SUFFIX(rope)(a, dqh, N, H, L, d, true);
    SUFFIX(rope)(a, dkh, N, G, S1, d, true);
    REAL *dq = ref_alloc(N * L * qd, sizeof(REAL)), *dk = ref_alloc(N * S1 * kvd, sizeof(REAL));
    REAL *dv = ref_alloc(N * S1 * kvd, sizeof(REAL));
    SUFFIX(split_heads)(dq, dqh, N, L, H, d, true);
    SUFFIX(split_heads)(dk, dkh, N, S1, G, d, true);
    SUFFIX(split_heads)(dv, dvh, N, S1, G, d, true);
    /* Input projections; the appended bias_k/bias_v row, summed over batches. */
    for (int64_t n = 0; n < N; n++) {
        for (int64_t t = 0; a->b_in && t < L; t++)
            for (int64_t c = 0; c < qd; c++) g_bin[c] += dq[(n * L + t) * qd + c];
        for (int64_t t = 0; a->b_in && t < S; t++)
            for (int64_t c = 0; c < kvd; c++) {
                g_bin[qd + c] += dk[(n * S1 + t) * kvd + c];
                g_bin[qd + kvd + c] += dv[(n * S1 + t) * kvd + c];
            }
        for (int64_t c = 0; a->bias_k && c < E; c++) {
            g_bias_k[c] += dk[(n * S1 + S) * E + c];
            g_bias_v[c] += dv[(n * S1 + S) * E + c];
        }
        SUFFIX(weight_grad)(dq + n * L * qd, z.query + n * L * E, L, qd, E, g_wq);
        SUFFIX(weight_grad)(dk + n * S1 * kvd, z.key + n * S * kd, S, kvd, kd, g_wk);
        SUFFIX(weight_grad)(dv + n * S1 * kvd, z.value + n * S * vd, S, kvd, vd, g_wv);
        SUFFIX(input_grad)(dq + n * L * qd, z.w_q, L, qd, E, g_query + n * L * E);
        SUFFIX(input_grad)(dk + n * S1 * kvd, z.w_k, S, kvd, kd, g_key + n * S * kd);
        SUFFIX(input_grad)(dv + n * S1 * kvd, z.w_v, S, kvd, vd, g_value + n * S * vd);
    }
    REAL *owned[] = {dcat, doh, dqh, dkh, dvh, dq, dk, dv};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) free(owned[i]);
    SUFFIX(layer_release)(&z);
}
