/*
 * cmd_forward.c -- `mha forward`: torch.nn.MultiheadAttention.forward on
 * tensors from safetensors files, with PyTorch's names, layouts and mask
 * conventions (bool True = masked out); and `mha backward`: the same call
 * plus grad_attn_output, giving <name>.grad for every input and weight.
 */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct forward_opts {
    const char *cmd; /* "forward" or "backward" */
    bool backward;
    cli_layer_opts layer;
    const char *inputs, *out;
    const char *dtype, *parallel;
    int64_t threads, position;
    bool batch_first, need_weights, no_average, add_zero_attn, is_causal;
} forward_opts;

/* Sizes of the call, read off query and key. */
typedef struct dims {
    bool batched;
    int64_t N, L, S, E, H, S1;
} dims;

typedef struct inputs {
    cli_tensor query, key, value, attn_mask, key_padding_mask, grad, alibi;
} inputs;

static void inputs_free(inputs *in)
{
    cli_tensor_free(&in->query);
    cli_tensor_free(&in->key);
    cli_tensor_free(&in->value);
    cli_tensor_free(&in->attn_mask);
    cli_tensor_free(&in->key_padding_mask);
    cli_tensor_free(&in->grad);
    cli_tensor_free(&in->alibi);
}

static int load_inputs(const forward_opts *o, mha_st_file *file, const char *path, inputs *in)
{
    const char *CMD = o->cmd;
    if (cli_load(CMD, file, path, "query", true, false, &in->query) ||
        cli_load(CMD, file, path, "key", false, false, &in->key) ||
        cli_load(CMD, file, path, "value", false, false, &in->value) ||
        cli_load(CMD, file, path, "attn_mask", false, true, &in->attn_mask) ||
        cli_load(CMD, file, path, "key_padding_mask", false, true, &in->key_padding_mask) ||
        cli_load(CMD, file, path, "alibi_slopes", false, false, &in->alibi))
        return CLI_FAIL;
    if (in->alibi.present && (in->alibi.rank != 1 || in->alibi.shape[0] != o->layer.num_heads)) {
        cli_error(CMD, "%s: alibi_slopes must have shape [num_heads] = [%lld]", path, (long long)o->layer.num_heads);
        return CLI_FAIL;
    }
    if (in->key.present != in->value.present) {
        cli_error(CMD, "%s has \"%s\" but no \"%s\"; give both, or neither for self-attention", path,
                  in->key.present ? "key" : "value", in->key.present ? "value" : "key");
        return CLI_FAIL;
    }
    if (!o->backward) return CLI_OK;
    if (cli_load(CMD, file, path, "grad_attn_output", true, false, &in->grad)) return CLI_FAIL;
    const cli_tensor *q = &in->query, *g = &in->grad;
    if (g->rank != q->rank || memcmp(g->shape, q->shape, (size_t)q->rank * sizeof q->shape[0]) != 0) {
        char got[96], want[96];
        cli_error(CMD, "%s: grad_attn_output has shape %s; it must match attn_output, which has query's shape %s", path,
                  cli_shape_str(g->shape, g->rank, got, sizeof got),
                  cli_shape_str(q->shape, q->rank, want, sizeof want));
        return CLI_FAIL;
    }
    return CLI_OK;
}

/* Element strides of a [N, T, F] view of a PyTorch tensor in `t`'s layout:
 * unbatched [T, F], [T, N, F], or [N, T, F] with --batch-first. */
static mha_tensor layer_view(float *data, const cli_tensor *t, const dims *d, bool batch_first)
{
    int64_t T = t->shape[d->batched && batch_first ? 1 : 0], F = t->shape[t->rank - 1];
    mha_tensor v = {data, {d->N, T, F, 1}, {0, F, 1, 0}};
    if (d->batched) {
        v.stride[0] = batch_first ? T * F : F;
        v.stride[1] = batch_first ? F : d->N * F;
    }
    return v;
}

static int check_shapes(const forward_opts *o, const inputs *in, const mha_layer_desc *ld, dims *d)
{
    const char *CMD = o->cmd;
    char got[96];
    const cli_tensor *q = &in->query;
    const cli_tensor *k = in->key.present ? &in->key : q, *v = in->value.present ? &in->value : q;
    if (q->rank != 2 && q->rank != 3) {
        cli_error(CMD, "%s: query has shape %s; it must be [L, E], [L, N, E] or with --batch-first [N, L, E]",
                  o->inputs, cli_shape_str(q->shape, q->rank, got, sizeof got));
        return CLI_FAIL;
    }
    d->batched = q->rank == 3;
    int batch_dim = o->batch_first ? 0 : 1, seq_dim = d->batched ? 1 - batch_dim : 0;
    d->N = d->batched ? q->shape[batch_dim] : 1;
    d->L = q->shape[seq_dim];
    d->E = ld->embed_dim;
    d->H = ld->num_heads;
    if (q->shape[q->rank - 1] != d->E) {
        cli_error(CMD, "%s: query has %lld features but the weights' embed_dim is %lld", o->inputs,
                  (long long)q->shape[q->rank - 1], (long long)d->E);
        return CLI_FAIL;
    }
    const cli_tensor *kv[2] = {k, v};
    const int64_t feat[2] = {ld->kdim, ld->vdim};
    for (int i = 0; i < 2; i++) {
        const cli_tensor *t = kv[i];
        bool ok = t->rank == q->rank && t->shape[t->rank - 1] == feat[i] &&
                  (!d->batched || t->shape[batch_dim] == d->N) && t->shape[seq_dim] == k->shape[seq_dim];
        if (!ok) {
            cli_error(CMD,
                      "%s: %s has shape %s; expected %s %lld features (the weights' %s), the query's batch "
                      "and layout, and as many rows as key",
                      o->inputs, t->name, cli_shape_str(t->shape, t->rank, got, sizeof got), t->name,
                      (long long)feat[i], i ? "vdim" : "kdim");
            return CLI_FAIL;
        }
    }
    d->S = k->shape[seq_dim];
    d->S1 = d->S + !!ld->add_bias_kv + !!ld->add_zero_attn;
    return CLI_OK;
}

/* attn_mask [L, S] or [N*H, L, S]; key_padding_mask [N, S] ([S] unbatched). */
static int masks(const forward_opts *o, inputs *in, const dims *d, mha_layer_fwd_args *args)
{
    const char *CMD = o->cmd;
    char got[96];
    cli_tensor *am = &in->attn_mask, *kpm = &in->key_padding_mask;
    if (am->present) {
        bool shared = am->rank == 2 && am->shape[0] == d->L && am->shape[1] == d->S;
        bool per_head = am->rank == 3 && am->shape[0] == d->N * d->H && am->shape[1] == d->L && am->shape[2] == d->S;
        if (!shared && !per_head) {
            cli_error(CMD,
                      "%s: attn_mask has shape %s; it must be [L, S] = [%lld, %lld] or [N*num_heads, L, S] = "
                      "[%lld, %lld, %lld]",
                      o->inputs, cli_shape_str(am->shape, am->rank, got, sizeof got), (long long)d->L, (long long)d->S,
                      (long long)(d->N * d->H), (long long)d->L, (long long)d->S);
            return CLI_FAIL;
        }
        int64_t st[4] = {shared ? 0 : d->H * d->L * d->S, shared ? 0 : d->L * d->S, d->S, 1};
        args->attn_mask = cli_mask(am, false, st);
    }
    if (kpm->present) {
        bool ok = d->batched ? kpm->rank == 2 && kpm->shape[0] == d->N && kpm->shape[1] == d->S
                             : kpm->rank == 1 && kpm->shape[0] == d->S;
        if (!ok) {
            cli_error(CMD, "%s: key_padding_mask has shape %s; it must be %s", o->inputs,
                      cli_shape_str(kpm->shape, kpm->rank, got, sizeof got), d->batched ? "[N, S]" : "[S]");
            return CLI_FAIL;
        }
        int64_t st[4] = {d->S, 0, 0, 1};
        args->key_padding_mask = cli_mask(kpm, false, st);
    }
    return CLI_OK;
}

/* The forward's outputs. */
static int save_forward(const forward_opts *o, const dims *d, const inputs *in, const float *out, const float *weights)
{
    int64_t heads = o->no_average ? d->H : 1;
    /* Weights drop N when unbatched and the head axis when averaged. */
    int64_t wshape[4] = {d->N, heads, d->L, d->S1};
    int skip = !d->batched, wrank = 4 - skip;
    if (!o->no_average) {
        wshape[1] = wshape[0];
        skip++;
        wrank--;
    }
    cli_output outs[2] = {{"attn_output", in->query.rank, in->query.shape, out},
                          {"attn_output_weights", wrank, wshape + skip, weights}};
    return cli_save(o->cmd, o->out, outs, o->need_weights ? 2 : 1);
}

/* The weights' gradients, in the weights file's own names and layout
 * (mha_layer_get_grad: GPT-2's Conv1D tensors come transposed). */
typedef struct weight_grads {
    int n;
    char names[12][300];
    float *data[12];
} weight_grads;

/* Appends "<prefix><name>.grad" for every weight to outs; returns how
 * many, -1 on failure (reported).  g's data is the caller's to free. */
static int weight_grad_outputs(const char *CMD, const cli_engine *e, const char *prefix, weight_grads *g,
                               cli_output *outs)
{
    for (g->n = 0; g->n < e->n_weights; g->n++) {
        int i = g->n;
        const cli_weight *w = &e->weights[i];
        bool ok = (g->data[i] = malloc((size_t)w->numel * sizeof(float))) != NULL;
        if (!ok) cli_error(CMD, "out of memory for the weight gradients");
        if (cli_agree(ok ? CLI_OK : CLI_FAIL) != CLI_OK) {
            g->n += ok;
            return -1;
        }
        if (e->get_grad(e->layer, w->name, g->data[i], w->numel) != MHA_OK) {
            cli_lib_error(CMD, NULL);
            g->n++;
            return -1;
        }
        snprintf(g->names[i], sizeof g->names[i], "%s%s.grad", prefix, w->name);
        outs[i] = (cli_output){g->names[i], w->rank, w->shape, g->data[i]};
    }
    return g->n;
}

/* Buffers for the inputs' gradients, in their layouts (self-attention:
 * one, the sum), as outputs and as the views the backward writes. */
static int input_grad_outputs(const forward_opts *o, const dims *d, inputs *in, float *grads[3], mha_tensor views[3],
                              cli_output *outs)
{
    static const char *const input_names[3] = {"query.grad", "key.grad", "value.grad"};
    bool cross = in->key.present;
    cli_tensor *srcs[3] = {&in->query, cross ? &in->key : NULL, cross ? &in->value : NULL};
    int n = 0;
    for (int i = 0; i < 3; i++) {
        if (!srcs[i]) continue;
        int64_t count;
        if (!cli_product(srcs[i]->shape, srcs[i]->rank, &count) ||
            !(grads[i] = calloc((size_t)(count ? count : 1), sizeof(float)))) {
            cli_error(o->cmd, "out of memory allocating %s", input_names[i]);
            return -1;
        }
        views[i] = layer_view(grads[i], srcs[i], d, o->batch_first);
        outs[n++] = (cli_output){input_names[i], srcs[i]->rank, srcs[i]->shape, grads[i]};
    }
    return n;
}

/* The backward pass after a forward recorded on args->tape: input
 * gradients and one per weight, named as the weights file names it plus
 * ".grad". */
static int run_backward(const forward_opts *o, mha_ctx *ctx, const cli_engine *e, const dims *d, inputs *in,
                        const mha_layer_fwd_args *args)
{
    float *grads[3] = {NULL, NULL, NULL};
    mha_tensor views[3];
    cli_output outs[3 + 12];
    weight_grads wg = {.n = 0};
    int n_in = input_grad_outputs(o, d, in, grads, views, outs), n_w = -1;
    if (cli_agree(n_in >= 0 ? CLI_OK : CLI_FAIL) != CLI_OK) n_in = -1;
    bool cross = in->key.present;
    mha_tensor dy = layer_view(in->grad.f32, &in->grad, d, o->batch_first);
    mha_tensor *gk = cross ? &views[1] : &views[0], *gv = cross ? &views[2] : &views[0];
    if (n_in >= 0 && e->backward(ctx, e->layer, args, &dy, &views[0], gk, gv) != MHA_OK) cli_lib_error(o->cmd, NULL);
    else if (n_in >= 0) n_w = weight_grad_outputs(o->cmd, e, o->layer.prefix, &wg, outs + n_in);
    int rc = n_w < 0 ? CLI_FAIL : e->writes ? cli_save(o->cmd, o->out, outs, n_in + n_w) : CLI_OK;
    for (int i = 0; i < wg.n; i++) free(wg.data[i]);
    for (int i = 0; i < 3; i++) free(grads[i]);
    return rc;
}

static int run(const forward_opts *o, const cli_engine *e, inputs *in)
{
    const char *CMD = o->cmd;
    const mha_layer_desc *ld = &e->desc;
    dims d = {0};
    mha_layer_fwd_args args;
    mha_layer_fwd_args_init(&args);
    if (cli_agree(check_shapes(o, in, ld, &d) || masks(o, in, &d, &args) ? CLI_FAIL : CLI_OK) != CLI_OK)
        return CLI_FAIL; /* on every rank */
    cli_tensor *k = in->key.present ? &in->key : &in->query, *v = in->value.present ? &in->value : &in->query;
    args.query = layer_view(in->query.f32, &in->query, &d, o->batch_first);
    args.key = layer_view(k->f32, k, &d, o->batch_first);
    args.value = layer_view(v->f32, v, &d, o->batch_first);
    args.causal = o->is_causal ? MHA_CAUSAL_TOP_LEFT : MHA_CAUSAL_NONE;
    args.average_attn_weights = !o->no_average;
    args.position = o->position;

    int64_t heads = o->no_average ? d.H : 1, wdims[4] = {d.N, heads, d.L, d.S1};
    float *out = cli_alloc_floats(CMD, "attn_output", in->query.shape, in->query.rank);
    float *weights = out && o->need_weights ? cli_alloc_floats(CMD, "attn_output_weights", wdims, 4) : NULL;
    mha_ctx *ctx = NULL;
    mha_layer_tape *tape = NULL;
    int rc = !out || (o->need_weights && !weights) ? CLI_FAIL : cli_ctx(CMD, o->threads, &ctx);
    if (rc == CLI_OK && o->backward &&
        (mha_layer_train_init(e->local) != MHA_OK || mha_layer_tape_create(&tape) != MHA_OK)) {
        cli_error(CMD, "%s", mha_last_error());
        rc = CLI_FAIL;
    }
    args.tape = tape;
    if ((rc = cli_agree(rc)) == CLI_OK) {
        mha_tensor y = layer_view(out, &in->query, &d, o->batch_first);
        mha_tensor w = mha_tensor_4d(weights, d.N, heads, d.L, d.S1);
        if (e->forward(ctx, e->layer, &y, weights ? &w : NULL, &args) != MHA_OK) {
            cli_lib_error(CMD, NULL);
            rc = CLI_FAIL;
        }
    }
    if (rc == CLI_OK && o->backward) rc = run_backward(o, ctx, e, &d, in, &args);
    else if (rc == CLI_OK && e->writes) rc = save_forward(o, &d, in, out, weights);
    mha_layer_tape_free(tape);
    mha_ctx_free(ctx);
    free(out);
    free(weights);
    return rc;
}

/* The flags' rules, each named when broken. */
static int check_opts(const forward_opts *o, const cli_flag *flags)
{
    const char *CMD = o->cmd;
    int rc = cli_compute_check(CMD, o->inputs, o->layer.weights, o->out, o->dtype, o->backward, o->parallel);
    if (rc == CLI_OK) rc = cli_layer_check(CMD, &o->layer, flags);
    if (rc != CLI_OK) return rc;
    if (o->backward && (o->need_weights || o->no_average)) {
        cli_error(CMD,
                  "--need-weights and --no-average-attn-weights are forward outputs; mha backward writes gradients");
        return CLI_USAGE;
    }
    return CLI_OK;
}

static const cli_range POSITION = {0, 1099511627776.0, "0 or more"};

static int forward_main(int argc, char **argv, bool backward)
{
    forward_opts o = {.cmd = backward ? "backward" : "forward", .backward = backward, .dtype = "f32"};
    const char *CMD = o.cmd;
    cli_layer_opts_init(&o.layer);
    cli_flag flags[CLI_LAYER_FLAGS + 13];
    cli_layer_flags(&o.layer, flags);
    const cli_flag own[] = {
        {"inputs", FLAG_STRING, &o.inputs,
         backward ? "safetensors with query, grad_attn_output [, key, value, attn_mask, key_padding_mask, alibi_slopes]"
                  : "safetensors with query [, key, value, attn_mask, key_padding_mask, alibi_slopes]",
         false, NULL},
        {"out", FLAG_STRING, &o.out,
         backward ? "safetensors to write <name>.grad of every input and weight to"
                  : "safetensors to write attn_output [, attn_output_weights] to",
         false, NULL},
        {"position", FLAG_INT, &o.position, "rotary position of the first query and key row (default 0)", false,
         &POSITION},
        {"batch-first", FLAG_BOOL, &o.batch_first, "inputs are [N, L, E] instead of [L, N, E]", false, NULL},
        {"need-weights", FLAG_BOOL, &o.need_weights, "also write attn_output_weights", false, NULL},
        {"no-average-attn-weights", FLAG_BOOL, &o.no_average, "per-head weights [N, H, L, S] instead of the mean",
         false, NULL},
        {"add-zero-attn", FLAG_BOOL, &o.add_zero_attn, "append a zero key and value, as add_zero_attn=True", false,
         NULL},
        {"is-causal", FLAG_BOOL, &o.is_causal, "mask keys after the query (top-left causal)", false, NULL},
        {"threads", FLAG_INT, &o.threads, "worker threads (default: all CPUs)", false, &CLI_THREADS},
        {"dtype", FLAG_STRING, &o.dtype,
         backward ? "f32 (the only one: gradients are computed in float32)"
                  : "f32 (default) or bf16: compute as a bfloat16 model",
         false, NULL},
        {"parallel", FLAG_STRING, &o.parallel,
         "heads: under mpirun -np P, the heads split over the ranks (each reads its shard of --weights)", false, NULL},
    };
    int n_flags = CLI_LAYER_FLAGS + (int)(sizeof own / sizeof own[0]);
    memcpy(flags + CLI_LAYER_FLAGS, own, sizeof own);
    bool help;
    int rc = cli_parse(CMD, "--weights W --inputs X --out Y --num-heads H [flags]", argc, argv, flags, n_flags, &help);
    if (rc != CLI_OK || help) return rc;
    if ((rc = check_opts(&o, flags)) != CLI_OK) return rc;
    static const char *const modes[] = {"heads", NULL};
    if (o.parallel && (rc = cli_parallel_begin(CMD, o.parallel, modes)) != CLI_OK) return rc;
    mha_st_file *xf = NULL;
    cli_engine engine = {0};
    inputs in;
    memset(&in, 0, sizeof in);
    rc = cli_open(CMD, "--inputs", o.inputs, &xf);
    if (rc == CLI_OK) rc = load_inputs(&o, xf, o.inputs, &in);
    mha_layer_desc hints;
    mha_layer_desc_init(&hints);
    hints.add_zero_attn = o.add_zero_attn;
    hints.dtype = strcmp(o.dtype, "bf16") == 0 ? MHA_DTYPE_BF16 : MHA_DTYPE_F32;
    hints.alibi_slopes = in.alibi.present ? in.alibi.f32 : NULL;
    if ((rc = cli_agree(rc)) == CLI_OK) rc = cli_engine_load(CMD, &o.layer, &hints, &engine);
    if (rc == CLI_OK) rc = run(&o, &engine, &in);
    inputs_free(&in);
    cli_engine_free(&engine);
    mha_st_close(xf);
    return o.parallel ? cli_parallel_end(rc) : rc;
}

int mha_cmd_forward(int argc, char **argv) { return forward_main(argc, argv, false); }

int mha_cmd_backward(int argc, char **argv) { return forward_main(argc, argv, true); }
