/*
 * cmd_sdpa.c -- `mha sdpa`: scaled_dot_product_attention on [B, H, L, D]
 * tensors, with PyTorch's mask convention (bool True = take part) plus
 * bottom-right causal, sliding window, softcap and ALiBi; and
 * `mha sdpa-backward`: the same inputs plus grad_output, giving
 * query.grad, key.grad and value.grad.
 */
#include "cli.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void cli_sdpa_inputs_free(cli_sdpa_inputs *in)
{
    cli_tensor_free(&in->q);
    cli_tensor_free(&in->k);
    cli_tensor_free(&in->v);
    cli_tensor_free(&in->mask);
    cli_tensor_free(&in->alibi);
    cli_tensor_free(&in->grad);
}

static int check_rank4(const char *CMD, const char *path, const cli_tensor *t, const char *layout)
{
    char got[96];
    if (t->rank == 4) return CLI_OK;
    cli_error(CMD, "%s: %s has shape %s; it must be %s", path, t->name,
              cli_shape_str(t->shape, t->rank, got, sizeof got), layout);
    return CLI_FAIL;
}

/* Strides that broadcast attn_mask (rank <= 4, aligned right as in
 * PyTorch) to [B, Hq, L, S]. */
static int mask_strides(const char *CMD, const char *path, const cli_tensor *m, const int64_t full[4],
                        int64_t stride[4])
{
    char got[96];
    if (m->rank > 4) {
        cli_error(CMD, "%s: attn_mask has %d dimensions; at most 4 broadcast to [B, H, L, S]", path, m->rank);
        return CLI_FAIL;
    }
    int64_t step = 1;
    for (int d = 3; d >= 0; d--) {
        int md = m->rank - 4 + d;
        int64_t size = md >= 0 ? m->shape[md] : 1;
        if (size != 1 && size != full[d]) {
            cli_error(CMD, "%s: attn_mask of shape %s does not broadcast to [B, H, L, S] = [%lld, %lld, %lld, %lld]",
                      path, cli_shape_str(m->shape, m->rank, got, sizeof got), (long long)full[0], (long long)full[1],
                      (long long)full[2], (long long)full[3]);
            return CLI_FAIL;
        }
        stride[d] = size == 1 ? 0 : step;
        step *= size;
    }
    return CLI_OK;
}

int cli_sdpa_load(const cli_sdpa_opts *o, mha_st_file *f, cli_sdpa_inputs *in, bool whole)
{
    const char *CMD = o->cmd, *path = o->inputs;
    int (*take)(const char *, mha_st_file *, const char *, const char *, bool, bool, cli_tensor *) =
        whole ? cli_load : cli_probe; /* q, k, v and grad_output: whole, or their shapes */
    if (take(CMD, f, path, "query", true, false, &in->q) || take(CMD, f, path, "key", true, false, &in->k) ||
        take(CMD, f, path, "value", true, false, &in->v) ||
        cli_load(CMD, f, path, "attn_mask", false, true, &in->mask) ||
        cli_load(CMD, f, path, "alibi_slopes", false, false, &in->alibi))
        return CLI_FAIL;
    if (check_rank4(CMD, path, &in->q, "[B, Hq, L, D]") || check_rank4(CMD, path, &in->k, "[B, Hkv, S, D]") ||
        check_rank4(CMD, path, &in->v, "[B, Hkv, S, Dv]"))
        return CLI_FAIL;
    if (o->backward) {
        if (take(CMD, f, path, "grad_output", true, false, &in->grad)) return CLI_FAIL;
        const int64_t *qs = in->q.shape;
        int64_t want[4] = {qs[0], qs[1], qs[2], in->v.shape[3]};
        char got[96], need[96];
        if (in->grad.rank != 4 || memcmp(in->grad.shape, want, sizeof want) != 0) {
            cli_error(CMD, "%s: grad_output has shape %s; it must match the output, %s", path,
                      cli_shape_str(in->grad.shape, in->grad.rank, got, sizeof got),
                      cli_shape_str(want, 4, need, sizeof need));
            return CLI_FAIL;
        }
    }
    if (in->alibi.present && (in->alibi.rank != 1 || in->alibi.shape[0] != in->q.shape[1])) {
        cli_error(CMD, "%s: alibi_slopes must have shape [Hq] = [%lld]", path, (long long)in->q.shape[1]);
        return CLI_FAIL;
    }
    return CLI_OK;
}

static mha_tensor view4(float *data, const int64_t *shape)
{
    return mha_tensor_4d(data, shape[0], shape[1], shape[2], shape[3]);
}

/* The descriptor of the flags and the inputs' ALiBi slopes. */
static void desc_from_opts(const cli_sdpa_opts *o, const cli_sdpa_inputs *in, mha_attn_desc *desc)
{
    mha_attn_desc_init(desc);
    if (!isnan(o->scale)) desc->scale = o->scale;
    desc->causal = o->bottom_right ? MHA_CAUSAL_BOTTOM_RIGHT : o->is_causal ? MHA_CAUSAL_TOP_LEFT : MHA_CAUSAL_NONE;
    desc->window_left = o->window_left;
    desc->window_right = o->window_right;
    desc->softcap = (float)o->softcap;
    desc->enable_gqa = o->enable_gqa;
    desc->alibi_slopes = in->alibi.present ? in->alibi.f32 : NULL;
    desc->dtype = strcmp(o->dtype, "bf16") == 0 ? MHA_DTYPE_BF16 : MHA_DTYPE_F32;
}

/* The three gradients, from the forward's output and row statistics. */
static int run_backward(const cli_sdpa_opts *o, mha_ctx *ctx, const mha_attn_desc *desc, cli_sdpa_inputs *in,
                        float *out, const mha_attn_stats *stats)
{
    float *grads[3] = {cli_alloc_floats(o->cmd, "query.grad", in->q.shape, 4), NULL, NULL};
    if (grads[0]) grads[1] = cli_alloc_floats(o->cmd, "key.grad", in->k.shape, 4);
    if (grads[1]) grads[2] = cli_alloc_floats(o->cmd, "value.grad", in->v.shape, 4);
    int rc = grads[2] ? CLI_OK : CLI_FAIL;
    if (rc == CLI_OK) {
        mha_tensor q = view4(in->q.f32, in->q.shape), k = view4(in->k.f32, in->k.shape);
        mha_tensor v = view4(in->v.f32, in->v.shape), y = view4(out, in->grad.shape),
                   dy = view4(in->grad.f32, in->grad.shape);
        mha_tensor dq = view4(grads[0], in->q.shape), dk = view4(grads[1], in->k.shape),
                   dv = view4(grads[2], in->v.shape);
        if (mha_attention_backward_with_stats(ctx, &dq, &dk, &dv, &q, &k, &v, &y, stats, &dy, desc) != MHA_OK) {
            cli_error(o->cmd, "%s: %s", o->inputs, mha_last_error());
            rc = CLI_FAIL;
        }
    }
    if (rc == CLI_OK) {
        cli_output outs[3] = {{"query.grad", 4, in->q.shape, grads[0]},
                              {"key.grad", 4, in->k.shape, grads[1]},
                              {"value.grad", 4, in->v.shape, grads[2]}};
        rc = cli_save(o->cmd, o->out, outs, 3);
    }
    for (int g = 0; g < 3; g++) free(grads[g]);
    return rc;
}

int cli_sdpa_desc(const cli_sdpa_opts *o, cli_sdpa_inputs *in, mha_attn_desc *desc)
{
    desc_from_opts(o, in, desc);
    const int64_t *qs = in->q.shape;
    if (in->mask.present) {
        int64_t full[4] = {qs[0], qs[1], qs[2], in->k.shape[2]}, stride[4];
        if (mask_strides(o->cmd, o->inputs, &in->mask, full, stride)) return CLI_FAIL;
        desc->mask = cli_mask(&in->mask, true, stride);
    }
    return CLI_OK;
}

static int run(const cli_sdpa_opts *o, cli_sdpa_inputs *in)
{
    const char *CMD = o->cmd;
    mha_attn_desc desc;
    const int64_t *qs = in->q.shape;
    int64_t out_shape[4] = {qs[0], qs[1], qs[2], in->v.shape[3]};
    if (cli_sdpa_desc(o, in, &desc)) return CLI_FAIL;
    /* The forward alone writes lse; for the backward it keeps the row
     * maximum (in lse's buffer) and sum, from which the probabilities come
     * back exactly (mha.h, mha_attn_stats). */
    float *out = cli_alloc_floats(CMD, "output", out_shape, 4);
    float *lse = out ? cli_alloc_floats(CMD, "lse", qs, 3) : NULL;
    float *sum = lse && o->backward ? cli_alloc_floats(CMD, "row sums", qs, 3) : NULL;
    mha_attn_stats stats = {lse, sum};
    mha_ctx *ctx = NULL;
    int rc = out && lse && (sum || !o->backward) ? cli_ctx(CMD, o->threads, &ctx) : CLI_FAIL;
    if (rc == CLI_OK) {
        mha_tensor q = view4(in->q.f32, in->q.shape), k = view4(in->k.f32, in->k.shape);
        mha_tensor v = view4(in->v.f32, in->v.shape), y = view4(out, out_shape);
        mha_status st = o->backward ? mha_attention_with_stats(ctx, &y, &stats, &q, &k, &v, &desc)
                                    : mha_attention(ctx, &y, lse, &q, &k, &v, &desc);
        if (st != MHA_OK) {
            cli_error(CMD, "%s: %s", o->inputs, mha_last_error());
            rc = CLI_FAIL;
        }
    }
    if (rc == CLI_OK && o->backward) {
        rc = run_backward(o, ctx, &desc, in, out, &stats);
    } else if (rc == CLI_OK) {
        cli_output outs[2] = {{"output", 4, out_shape, out}, {"lse", 3, qs, lse}};
        rc = cli_save(CMD, o->out, outs, 2);
    }
    mha_ctx_free(ctx);
    free(out);
    free(lse);
    free(sum);
    return rc;
}

/* The flags' rules, each named when broken. */
static int check_opts(const cli_sdpa_opts *o)
{
    const char *CMD = o->cmd;
    int rc = cli_compute_check(CMD, o->inputs, NULL, o->out, o->dtype, o->backward, o->parallel);
    if (rc != CLI_OK) return rc;
    if (o->is_causal && o->bottom_right) {
        cli_error(CMD, "--is-causal and --causal-bottom-right exclude each other; choose one alignment");
        return CLI_USAGE;
    }
    return CLI_OK;
}

static int sdpa_main(int argc, char **argv, bool backward)
{
    cli_sdpa_opts o = {.cmd = backward ? "sdpa-backward" : "sdpa",
                       .backward = backward,
                       .scale = NAN,
                       .window_left = -1,
                       .window_right = -1,
                       .dtype = "f32"};
    const char *CMD = o.cmd;
    cli_flag flags[] = {
        {"inputs", FLAG_STRING, &o.inputs,
         backward ? "safetensors with query, key, value, grad_output [, attn_mask, alibi_slopes]"
                  : "safetensors with query, key, value [, attn_mask, alibi_slopes]",
         false, NULL},
        {"out", FLAG_STRING, &o.out,
         backward ? "safetensors to write query.grad, key.grad, value.grad to"
                  : "safetensors to write output and lse to",
         false, NULL},
        {"is-causal", FLAG_BOOL, &o.is_causal, "causal mask aligned top-left (PyTorch is_causal)", false, NULL},
        {"causal-bottom-right", FLAG_BOOL, &o.bottom_right, "causal mask aligned bottom-right (KV cache)", false, NULL},
        {"scale", FLAG_DOUBLE, &o.scale, "score scale (default 1/sqrt(D))", false, NULL},
        {"enable-gqa", FLAG_BOOL, &o.enable_gqa, "let Hq be a multiple of Hkv (grouped-query)", false, NULL},
        {"window-left", FLAG_INT, &o.window_left, "keys visible left of the diagonal (-1 = all)", false, &CLI_WINDOW},
        {"window-right", FLAG_INT, &o.window_right, "keys visible right of the diagonal (-1 = all)", false,
         &CLI_WINDOW},
        {"softcap", FLAG_DOUBLE, &o.softcap, "cap scores at C via C*tanh(s/C) (0 = off)", false, &CLI_CAP},
        {"threads", FLAG_INT, &o.threads, "worker threads (default: all CPUs)", false, &CLI_THREADS},
        {"dtype", FLAG_STRING, &o.dtype,
         backward ? "f32 (the only one: gradients are computed in float32)"
                  : "f32 (default) or bf16: round q, k, v, P to bfloat16",
         false, NULL},
        {"parallel", FLAG_STRING, &o.parallel,
         "ring or ulysses: under mpirun -np P, the sequence split over the ranks (each reads its rows)", false, NULL},
    };
    bool help;
    int rc =
        cli_parse(CMD, "--inputs X --out Y [flags]", argc, argv, flags, (int)(sizeof flags / sizeof flags[0]), &help);
    if (rc != CLI_OK || help) return rc;
    if ((rc = check_opts(&o)) != CLI_OK) return rc;
    static const char *const modes[] = {"ring", "ulysses", NULL};
    if (o.parallel && (rc = cli_parallel_begin(CMD, o.parallel, modes)) != CLI_OK) return rc;
#ifdef MHA_CLI_MPI
    if (cli_ranks() > 1) return cli_parallel_end(cli_sdpa_parallel(&o));
#endif
    mha_st_file *f = NULL;
    cli_sdpa_inputs in;
    memset(&in, 0, sizeof in);
    rc = cli_open(CMD, "--inputs", o.inputs, &f);
    if (rc == CLI_OK) rc = cli_sdpa_load(&o, f, &in, true);
    if (rc == CLI_OK) rc = run(&o, &in);
    cli_sdpa_inputs_free(&in);
    mha_st_close(f);
    return o.parallel ? cli_parallel_end(rc) : rc;
}

int mha_cmd_sdpa(int argc, char **argv) { return sdpa_main(argc, argv, false); }

int mha_cmd_sdpa_backward(int argc, char **argv) { return sdpa_main(argc, argv, true); }
