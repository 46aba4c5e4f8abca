/*
 * layer_forward.c -- an nn.MultiheadAttention layer from a safetensors
 * file: the weights by their PyTorch names, one causal self-attention
 * forward pass, and the result against PyTorch's own output stored in the
 * same file.
 *
 *   layer_forward examples/demo.safetensors
 *
 * The file holds in_proj_weight, in_proj_bias, out_proj.weight,
 * out_proj.bias (nn.MultiheadAttention(64, 8)'s state_dict), a query
 * [6, 64] and pytorch.attn_output [6, 64].
 */
#include <mha.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

/* Reads tensor `name` of n floats, or says why not. */
static float *read_tensor(mha_st_file *file, const char *name, int64_t n)
{
    float *data = malloc((size_t)n * sizeof(float));
    if (data && mha_st_read_f32(file, name, data, n) == MHA_OK) return data;
    fprintf(stderr, "layer_forward: %s: %s\n", name, data ? mha_last_error() : "out of memory");
    free(data);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: layer_forward FILE.safetensors\n");
        return 2;
    }
    mha_st_file *file = NULL;
    mha_layer *layer = NULL;
    mha_ctx *ctx = NULL;
    mha_layer_desc hints;
    mha_layer_desc_init(&hints);
    hints.num_heads = 8; /* PyTorch does not store it */
    if (mha_st_open(argv[1], &file) != MHA_OK || mha_layer_load(file, "", MHA_NAMES_AUTO, &hints, &layer) != MHA_OK ||
        mha_ctx_create(0, &ctx) != MHA_OK) {
        fprintf(stderr, "layer_forward: %s\n", mha_last_error());
        return 1;
    }
    enum { L = 6, E = 64 };
    float *query = read_tensor(file, "query", L * E), *expected = read_tensor(file, "pytorch.attn_output", L * E);
    float out[L * E];
    int rc = 1;
    if (query && expected) {
        mha_layer_fwd_args args;
        mha_layer_fwd_args_init(&args);
        args.query = args.key = args.value = mha_tensor_3d(query, 1, L, E); /* a batch of one */
        args.causal = MHA_CAUSAL_TOP_LEFT;
        mha_tensor y = mha_tensor_3d(out, 1, L, E);
        if (mha_layer_forward(ctx, layer, &y, NULL, &args) == MHA_OK) {
            double worst = 0;
            for (int i = 0; i < L * E; i++) worst = fmax(worst, fabs((double)out[i] - expected[i]));
            printf("attn_output[0][0..3] = %.6f %.6f %.6f %.6f\n", out[0], out[1], out[2], out[3]);
            printf("largest difference from PyTorch: %.3g\n", worst);
            rc = worst < 1e-5 ? 0 : 1;
        } else {
            fprintf(stderr, "layer_forward: %s\n", mha_last_error());
        }
    }
    free(query);
    free(expected);
    mha_ctx_free(ctx);
    mha_layer_free(layer);
    mha_st_close(file);
    return rc;
}
