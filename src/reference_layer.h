/*
 * reference_layer.h -- the body of the reference nn.MultiheadAttention,
 * compiled for several element types by reference.c (see reference_sdpa.h
 * for the macros; SUFFIX names the file-local helpers per type).  ROUND
 * marks every value a bf16 model stores: weights, inputs, Q, K, V, the
 * probabilities entering P V, and the head outputs.  It follows
 * PyTorch's multi_head_attention_forward step by step.
 */

/* y[r, :] = x[r, :] W^T + b over `rows` rows. */
static void SUFFIX(linear)(const REAL *x, int64_t rows, int64_t in, const REAL *w, const REAL *b, int64_t out,
                           REAL *y)
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

void LAYER_NAME(const mha_ref_layer *a, const REAL *query, const REAL *key, const REAL *value, REAL *out,
                REAL *probs)
{
    int64_t N = a->N, L = a->L, S = a->S, E = a->E, H = a->H, d = E / H;
    int64_t S1 = S + (a->bias_k != NULL) + (a->add_zero_attn != 0);
    /* In a bf16 model the weights and inputs are stored rounded; biases stay. */
    REAL *query_r = SUFFIX(rounded)(query, N * L * E), *key_r = SUFFIX(rounded)(key, N * S * a->kdim);
    REAL *value_r = SUFFIX(rounded)(value, N * S * a->vdim);
    query = query_r, key = key_r, value = value_r;
    REAL *w_q = SUFFIX(copy)(a->w_q, E * E), *w_k = SUFFIX(copy)(a->w_k, E * a->kdim);
    REAL *w_v = SUFFIX(copy)(a->w_v, E * a->vdim), *w_out = SUFFIX(copy)(a->w_out, E * E);
    REAL *b_in = SUFFIX(exact)(a->b_in, 3 * E), *b_out = SUFFIX(exact)(a->b_out, E);
    REAL *q = ref_alloc(N * L * E, sizeof(REAL)), *k = ref_alloc(N * S1 * E, sizeof(REAL));
    REAL *v = ref_alloc(N * S1 * E, sizeof(REAL)), *cat = ref_alloc(N * L * E, sizeof(REAL));
    REAL *qh = ref_alloc(N * H * L * d, sizeof(REAL)), *oh = ref_alloc(N * H * L * d, sizeof(REAL));
    REAL *kh = ref_alloc(N * H * S1 * d, sizeof(REAL)), *vh = ref_alloc(N * H * S1 * d, sizeof(REAL));
    double *add = ref_alloc(N * H * L * S1, sizeof(double));
    for (int64_t n = 0; n < N; n++) {
        SUFFIX(linear)(query + n * L * E, L, E, w_q, b_in, E, q + n * L * E);
        SUFFIX(linear)(key + n * S * a->kdim, S, a->kdim, w_k, b_in ? b_in + E : NULL, E, k + n * S1 * E);
        SUFFIX(linear)(value + n * S * a->vdim, S, a->vdim, w_v, b_in ? b_in + 2 * E : NULL, E, v + n * S1 * E);
        for (int64_t c = 0; a->bias_k && c < E; c++) { /* bias_k/bias_v row; the zero row stays zero */
            k[(n * S1 + S) * E + c] = (REAL)a->bias_k[c];
            v[(n * S1 + S) * E + c] = (REAL)a->bias_v[c];
        }
    }
    /* Split heads: [N, T, h, d] -> [N, h, T, d]. */
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t c = 0; c < d; c++) {
                for (int64_t t = 0; t < L; t++) qh[((n * H + h) * L + t) * d + c] = ROUND(q[(n * L + t) * E + h * d + c]);
                for (int64_t t = 0; t < S1; t++) {
                    kh[((n * H + h) * S1 + t) * d + c] = ROUND(k[(n * S1 + t) * E + h * d + c]);
                    vh[((n * H + h) * S1 + t) * d + c] = ROUND(v[(n * S1 + t) * E + h * d + c]);
                }
            }
    /* The mask over real keys, padded with 0 for the appended ones; causal
     * is -inf above the diagonal. */
    for (int64_t r = 0; r < N * H * L; r++)
        for (int64_t j = 0; j < S; j++) {
            double m = a->add ? a->add[r * S + j] : 0;
            add[r * S1 + j] = a->causal && j > r % L ? -INFINITY : m;
        }
    mha_ref_sdpa sd = {.B = N, .Hq = H, .Hkv = H, .L = L, .S = S1, .D = d, .Dv = d,
                       .scale = 1.0 / sqrt((double)d), .window_left = -1, .window_right = -1, .add = add};
    NAME(&sd, qh, kh, vh, oh, NULL, probs);
    for (int64_t n = 0; n < N; n++)
        for (int64_t h = 0; h < H; h++)
            for (int64_t t = 0; t < L; t++)
                for (int64_t c = 0; c < d; c++) cat[(n * L + t) * E + h * d + c] = ROUND(oh[((n * H + h) * L + t) * d + c]);
    SUFFIX(linear)(cat, N * L, E, w_out, b_out, E, out);
    REAL *owned[] = {w_q, w_k, w_v, w_out, b_in, b_out, q, k, v, cat, qh, oh, kh, vh, query_r, key_r, value_r};
    for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) free(owned[i]);
    free(add);
}
