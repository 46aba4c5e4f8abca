/*
 * test_names.c -- the one table of weight names, through the public API:
 *   - each family's names in parameters() order for the shapes that
 *     change them (packed or separate inputs, biases, bias_k/bias_v, GQA);
 *   - a weight set under any family's name reads back exactly, in that
 *     tensor's layout (GPT-2's Conv1D transposed, Q|K|V stacked), and
 *     the same values seen under another family's names are the same
 *     matrices;
 *   - gradients come out in each tensor's layout and agree with
 *     mha_layer_params' views;
 *   - errors: no training state, unknown name, wrong size.
 */
#include "harness.h"
#include "mha.h"

#include <stdlib.h>
#include <string.h>

static float *ramp(int64_t n, float step)
{
    float *x = malloc((size_t)n * sizeof(float));
    for (int64_t i = 0; i < n; i++) x[i] = step * (float)(i % 97) - 1.0f;
    return x;
}

static mha_layer *make(int64_t E, int64_t H, int64_t G, int64_t kdim, int bias, int bias_kv)
{
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    d.embed_dim = E;
    d.num_heads = H;
    d.num_kv_heads = G;
    d.kdim = kdim;
    d.vdim = kdim;
    d.bias = bias;
    d.add_bias_kv = bias_kv;
    mha_layer *l = NULL;
    CHECK_OK(mha_layer_create(&d, &l));
    CHECK_OK(mha_layer_train_init(l));
    return l;
}

/* The names listed, joined by spaces. */
static void listed(const mha_layer *l, char *out, size_t size)
{
    const char *names[12];
    int64_t n = mha_layer_weight_names(l, names, 12);
    out[0] = '\0';
    for (int64_t i = 0; i < n; i++) {
        strncat(out, names[i], size - strlen(out) - 1);
        if (i + 1 < n) strncat(out, " ", size - strlen(out) - 1);
    }
}

static void test_lists(void)
{
    struct {
        int64_t E, H, G, kdim;
        int bias, bias_kv;
        const char *want;
    } cases[] = {
        {16, 2, 2, 0, 1, 0, "in_proj_weight in_proj_bias out_proj.weight out_proj.bias"},
        {16, 2, 2, 0, 1, 1, "in_proj_weight in_proj_bias bias_k bias_v out_proj.weight out_proj.bias"},
        {16, 2, 2, 12, 0, 0, "q_proj_weight k_proj_weight v_proj_weight out_proj.weight"},
        {16, 4, 2, 0, 1, 0,
         "q_proj.weight k_proj.weight v_proj.weight q_proj.bias k_proj.bias v_proj.bias o_proj.weight o_proj.bias"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        mha_layer *l = make(cases[i].E, cases[i].H, cases[i].G, cases[i].kdim, cases[i].bias, cases[i].bias_kv);
        char got[512];
        listed(l, got, sizeof got);
        CHECK(strcmp(got, cases[i].want) == 0, "case %zu: names \"%s\", want \"%s\"", i, got, cases[i].want);
        mha_param params[8];
        int64_t n = mha_layer_params(l, params, 8);
        const char *names[12];
        CHECK(n == mha_layer_weight_names(l, names, 12), "case %zu: params and names disagree in count", i);
        for (int64_t p = 0; p < n; p++)
            CHECK(strcmp(params[p].name, names[p]) == 0, "case %zu: param %s vs name %s", i, params[p].name, names[p]);
        mha_layer_free(l);
    }
}

/* GPT-2's c_attn.weight [E, 3E] is the transpose of in_proj_weight. */
static void test_layouts(void)
{
    enum { E = 8 };
    mha_layer *l = make(E, 2, 2, 0, 1, 0);
    float *c_attn = ramp(E * 3 * E, 0.01f), *in_proj = malloc(3 * E * E * sizeof(float));
    float *back = malloc(3 * E * E * sizeof(float));
    CHECK_OK(mha_layer_set_weight(l, "c_attn.weight", c_attn, E * 3 * E));
    CHECK_OK(mha_layer_get_weight(l, "c_attn.weight", back, E * 3 * E));
    CHECK(memcmp(back, c_attn, E * 3 * E * sizeof(float)) == 0, "c_attn.weight does not read back exactly");
    CHECK_OK(mha_layer_get_weight(l, "in_proj_weight", in_proj, 3 * E * E));
    int64_t wrong = 0;
    for (int64_t r = 0; r < 3 * E; r++)
        for (int64_t c = 0; c < E; c++) wrong += in_proj[r * E + c] != c_attn[c * 3 * E + r];
    CHECK(wrong == 0, "in_proj_weight is not the transpose of c_attn.weight (%lld values)", (long long)wrong);
    CHECK_OK(mha_layer_get_weight(l, "k_proj.weight", back, E * E));
    CHECK(memcmp(back, in_proj + E * E, E * E * sizeof(float)) == 0, "k_proj.weight is not rows E..2E of in_proj");
    int rank = 0;
    int64_t shape[3], numel = 0;
    CHECK_OK(mha_layer_weight_shape(l, "c_proj.weight", &rank, shape, &numel));
    CHECK(rank == 2 && shape[0] == E && shape[1] == E && numel == E * E, "c_proj.weight's shape");
    CHECK_OK(mha_layer_weight_shape(l, "c_attn.weight", &rank, shape, &numel));
    CHECK(rank == 2 && shape[0] == E && shape[1] == 3 * E, "c_attn.weight is [E, 3E]");
    free(c_attn);
    free(in_proj);
    free(back);
    mha_layer_free(l);
}

/* Gradients in each tensor's layout match the params' views. */
static void test_grads(void)
{
    enum { E = 8, L = 5 };
    mha_layer *l = make(E, 2, 2, 0, 1, 0);
    float *w = ramp(3 * E * E, 0.02f), *x = ramp(L * E, 0.05f), *y = malloc(L * E * sizeof(float));
    CHECK_OK(mha_layer_set_weight(l, "in_proj_weight", w, 3 * E * E));
    CHECK_OK(mha_layer_set_weight(l, "out_proj.weight", w, E * E));
    mha_ctx *ctx = NULL;
    CHECK_OK(mha_ctx_create(1, &ctx));
    mha_layer_tape *tape = NULL;
    CHECK_OK(mha_layer_tape_create(&tape));
    mha_layer_fwd_args a;
    mha_layer_fwd_args_init(&a);
    a.query = a.key = a.value = mha_tensor_3d(x, 1, L, E);
    a.tape = tape;
    mha_tensor ty = mha_tensor_3d(y, 1, L, E);
    CHECK_OK(mha_layer_forward(ctx, l, &ty, NULL, &a));
    CHECK_OK(mha_layer_backward(ctx, l, &a, &ty, NULL, NULL, NULL));
    mha_param params[8];
    int64_t n = mha_layer_params(l, params, 8);
    float *g = malloc(3 * E * E * sizeof(float));
    CHECK_OK(mha_layer_get_grad(l, "in_proj_weight", g, 3 * E * E));
    CHECK(n > 0 && memcmp(g, params[0].grad, 3 * E * E * sizeof(float)) == 0, "in_proj_weight.grad vs params");
    CHECK_OK(mha_layer_get_grad(l, "c_attn.weight", g, 3 * E * E));
    int64_t wrong = 0;
    for (int64_t r = 0; r < 3 * E; r++)
        for (int64_t c = 0; c < E; c++) wrong += g[c * 3 * E + r] != params[0].grad[r * E + c];
    CHECK(wrong == 0, "c_attn.weight.grad is not the transpose (%lld values)", (long long)wrong);
    CHECK_OK(mha_layer_get_grad(l, "c_attn.bias", g, 3 * E));
    CHECK(memcmp(g, params[1].grad, 3 * E * sizeof(float)) == 0, "c_attn.bias.grad vs in_proj_bias's");
    free(g);
    free(w);
    free(x);
    free(y);
    mha_layer_tape_free(tape);
    mha_ctx_free(ctx);
    mha_layer_free(l);
}

static void test_errors(void)
{
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    d.embed_dim = 8;
    d.num_heads = 2;
    mha_layer *l = NULL;
    CHECK_OK(mha_layer_create(&d, &l));
    float buf[3 * 64];
    CHECK_FAILS(mha_layer_get_grad(l, "in_proj_weight", buf, 3 * 64), MHA_ERR_MISUSE, "no training state");
    CHECK_OK(mha_layer_train_init(l));
    CHECK_FAILS(mha_layer_get_grad(l, "nonsense", buf, 1), MHA_ERR_NOT_FOUND, "\"nonsense\" is not a weight");
    CHECK_FAILS(mha_layer_get_weight(l, "bias_k", buf, 8), MHA_ERR_NOT_FOUND, "\"bias_k\"");
    CHECK_FAILS(mha_layer_get_weight(l, "in_proj_weight", buf, 10), MHA_ERR_INVALID_ARG, "has 192 values, not 10");
    CHECK_FAILS(mha_layer_get_weight(l, NULL, buf, 10), MHA_ERR_MISUSE, "NULL");
    int rank;
    int64_t shape[3], numel;
    CHECK_FAILS(mha_layer_weight_shape(l, "o_proj.weight", NULL, shape, &numel), MHA_ERR_MISUSE, "NULL");
    CHECK_OK(mha_layer_weight_shape(l, "o_proj.weight", &rank, shape, &numel));
    CHECK(mha_layer_weight_names(NULL, NULL, 0) == -1, "a NULL layer has names");
    CHECK(mha_layer_weight_names(l, NULL, 0) == 4, "names count without room for them");
    mha_layer_free(l);
}

/* BERT's names: the same parts as Llama's, found in a file without being
 * asked for (MHA_NAMES_AUTO), listed under BERT's names. */
static void test_bert(const char *golden)
{
    enum { E = 16 };
    mha_layer *l = make(E, 4, 4, 0, 1, 0);
    float *w = ramp(E * E, 0.01f), back[E * E];
    CHECK_OK(mha_layer_set_weight(l, "attention.self.key.weight", w, E * E));
    CHECK_OK(mha_layer_get_weight(l, "k_proj.weight", back, E * E));
    CHECK(memcmp(back, w, sizeof back) == 0, "attention.self.key.weight does not set W_k");
    mha_layer_free(l);
    free(w);

    char path[1024];
    snprintf(path, sizeof path, "%s/blk_bert_padded.safetensors", golden);
    mha_st_file *f = NULL;
    CHECK_OK(mha_st_open(path, &f));
    mha_layer_desc hints;
    mha_layer_desc_init(&hints);
    hints.num_heads = 4;
    CHECK_OK(mha_layer_load(f, "encoder.layer.0.", MHA_NAMES_AUTO, &hints, &l));
    CHECK(mha_layer_names(l) == MHA_NAMES_BERT, "a BERT block is not recognised as BERT");
    char got[512];
    listed(l, got, sizeof got);
    CHECK(strcmp(got, "attention.self.query.weight attention.self.key.weight attention.self.value.weight "
                      "attention.self.query.bias attention.self.key.bias attention.self.value.bias "
                      "attention.output.dense.weight attention.output.dense.bias") == 0,
          "BERT names \"%s\"", got);
    mha_layer_free(l);
    mha_st_close(f);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test_names GOLDEN_DIR\n");
        return 2;
    }
    test_lists();
    test_layouts();
    test_grads();
    test_errors();
    test_bert(argv[1]);
    return harness_finish("test_names");
}
