/*
 * cli.c -- shared plumbing of the `mha` subcommands (see cli.h).
 */
#define _POSIX_C_SOURCE 200809L

#include "cli.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

/* "mha <cmd>: [rank r of P: ]<message>" on stderr. */
static void report(const char *cmd, bool name_rank, const char *fmt, va_list ap)
{
    fprintf(stderr, "mha %s: ", cmd);
    if (name_rank && cli_ranks() > 1) fprintf(stderr, "rank %d of %d: ", cli_rank(), cli_ranks());
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
}

void cli_error(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    report(cmd, true, fmt, ap);
    va_end(ap);
}

/* The library's sentence names its rank already; under mpirun every rank
 * has the same one, so rank 0 alone prints it. */
static void lib_error(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    report(cmd, false, fmt, ap);
    va_end(ap);
}

void cli_lib_error(const char *cmd, const char *context)
{
    if (cli_rank() != 0) return;
    if (context) lib_error(cmd, "%s: %s", context, mha_last_error());
    else lib_error(cmd, "%s", mha_last_error());
}

static void print_usage(const char *cmd, const char *synopsis, const cli_flag *flags, int n)
{
    printf("usage: mha %s %s\n\n", cmd, synopsis);
    for (int i = 0; i < n; i++) {
        const char *arg = flags[i].kind == FLAG_BOOL ? "" : flags[i].kind == FLAG_STRING ? " S" : " N";
        char left[64];
        snprintf(left, sizeof left, "--%s%s", flags[i].name, arg);
        printf("  %-26s %s\n", left, flags[i].help);
    }
    printf("  %-26s %s\n", "--help", "show this help");
}

const cli_range CLI_COUNT = {1, 16777216, "positive (at most 16777216)"};
const cli_range CLI_LENGTH = {0, 16777216, "in 0..16777216"};
const cli_range CLI_THREADS = {0, 1024, "in 0..1024 (0 = all CPUs)"};
const cli_range CLI_WINDOW = {-1, 1099511627776.0, "-1 (unbounded) or more"};
const cli_range CLI_CAP = {0, INFINITY, "0 (off) or positive"};

/* The value read for f is in its range, or the error says which rule. */
static int check_range(const char *cmd, const cli_flag *f, double v, const char *value)
{
    if (!f->range || (v >= f->range->lo && v <= f->range->hi)) return CLI_OK;
    cli_error(cmd, "--%s must be %s, got %s", f->name, f->range->rule, value);
    return CLI_USAGE;
}

static int set_value(const char *cmd, cli_flag *f, const char *value)
{
    char *end;
    errno = 0;
    switch (f->kind) {
    case FLAG_STRING: *(const char **)f->dst = value; return CLI_OK;
    case FLAG_INT: {
        long long v = strtoll(value, &end, 10);
        if (!*value || *end || errno == ERANGE) {
            cli_error(cmd, "--%s needs an integer, got \"%s\"", f->name, value);
            return CLI_USAGE;
        }
        *(int64_t *)f->dst = v;
        return check_range(cmd, f, (double)v, value);
    }
    case FLAG_DOUBLE: {
        double v = strtod(value, &end);
        if (!*value || *end || errno == ERANGE || !isfinite(v)) {
            cli_error(cmd, "--%s needs a finite number, got \"%s\"", f->name, value);
            return CLI_USAGE;
        }
        *(double *)f->dst = v;
        return check_range(cmd, f, v, value);
    }
    case FLAG_BOOL: break;
    }
    return CLI_USAGE;
}

int cli_parse(const char *cmd, const char *synopsis, int argc, char **argv, cli_flag *flags, int n_flags,
              bool *help_shown)
{
    *help_shown = false;
    for (int a = 1; a < argc; a++) {
        const char *arg = argv[a];
        if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            print_usage(cmd, synopsis, flags, n_flags);
            *help_shown = true;
            return CLI_OK;
        }
        if (strncmp(arg, "--", 2) != 0) {
            cli_error(cmd, "unexpected argument \"%s\" (flags start with --; see mha %s --help)", arg, cmd);
            return CLI_USAGE;
        }
        const char *name = arg + 2, *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        cli_flag *f = NULL;
        for (int i = 0; i < n_flags && !f; i++)
            if (strlen(flags[i].name) == len && strncmp(flags[i].name, name, len) == 0) f = &flags[i];
        if (!f) {
            cli_error(cmd, "unknown flag --%.*s (see mha %s --help)", (int)len, name, cmd);
            return CLI_USAGE;
        }
        if (f->seen) {
            cli_error(cmd, "--%s is given twice", f->name);
            return CLI_USAGE;
        }
        f->seen = true;
        if (f->kind == FLAG_BOOL) {
            if (eq) {
                cli_error(cmd, "--%s takes no value", f->name);
                return CLI_USAGE;
            }
            *(bool *)f->dst = true;
            continue;
        }
        const char *value = eq ? eq + 1 : NULL;
        if (!value) {
            if (a + 1 >= argc) {
                cli_error(cmd, "--%s needs a value", f->name);
                return CLI_USAGE;
            }
            value = argv[++a];
        }
        int rc = set_value(cmd, f, value);
        if (rc != CLI_OK) return rc;
    }
    return CLI_OK;
}

const char *cli_shape_str(const int64_t *shape, int rank, char *buf, size_t size)
{
    size_t used = (size_t)snprintf(buf, size, "[");
    for (int d = 0; d < rank && used < size; d++)
        used += (size_t)snprintf(buf + used, size - used, "%s%lld", d ? ", " : "", (long long)shape[d]);
    if (used < size) snprintf(buf + used, size - used, "]");
    return buf;
}

int cli_open(const char *cmd, const char *what, const char *path, mha_st_file **file)
{
    if (mha_st_open(path, file) != MHA_OK) {
        cli_error(cmd, "%s file: %s", what, mha_last_error());
        return CLI_FAIL;
    }
    return CLI_OK;
}

int cli_ctx(const char *cmd, int64_t threads, mha_ctx **ctx)
{
    if (mha_ctx_create((int)threads, ctx) != MHA_OK) {
        cli_error(cmd, "%s", mha_last_error());
        return CLI_FAIL;
    }
    return CLI_OK;
}

int cli_cache_dtype(const char *cmd, const char *name, mha_dtype *dtype)
{
    static const char *const names[] = {"f32", "bf16", "int8"};
    static const mha_dtype dtypes[] = {MHA_DTYPE_F32, MHA_DTYPE_BF16, MHA_DTYPE_I8};
    int at = cli_choice(name, names, 3);
    if (at < 0) {
        cli_error(cmd, "--cache-dtype must be f32, bf16 or int8, got \"%s\"", name);
        return CLI_USAGE;
    }
    *dtype = dtypes[at];
    return CLI_OK;
}

int64_t cli_cache_row_bytes(mha_dtype dtype, int64_t head_dim)
{
    return head_dim * (int64_t)mha_dtype_size(dtype) + (dtype == MHA_DTYPE_I8 ? (int64_t)sizeof(float) : 0);
}

static bool is_float_dtype(mha_dtype d)
{
    return d == MHA_DTYPE_F64 || d == MHA_DTYPE_F32 || d == MHA_DTYPE_F16 || d == MHA_DTYPE_BF16;
}

int cli_probe(const char *cmd, mha_st_file *file, const char *path, const char *name, bool required, bool allow_bytes,
              cli_tensor *t)
{
    memset(t, 0, sizeof *t);
    t->name = name;
    mha_st_info info;
    mha_status st = mha_st_find(file, name, &info);
    if (st == MHA_ERR_NOT_FOUND && !required) return CLI_OK;
    if (st == MHA_ERR_NOT_FOUND) {
        cli_error(cmd, "%s has no tensor named \"%s\", which is required", path, name);
        return CLI_FAIL;
    }
    if (st != MHA_OK) {
        cli_error(cmd, "%s: %s", path, mha_last_error());
        return CLI_FAIL;
    }
    bool bytes = info.dtype == MHA_DTYPE_BOOL || info.dtype == MHA_DTYPE_U8;
    if (!is_float_dtype(info.dtype) && !(allow_bytes && bytes)) {
        cli_error(cmd, "%s: tensor \"%s\" has dtype %s; it must be %s", path, name, mha_dtype_name(info.dtype),
                  allow_bytes ? "BOOL, U8 or a float dtype (F64, F32, F16, BF16)"
                              : "a float dtype (F64, F32, F16, BF16)");
        return CLI_FAIL;
    }
    t->present = true;
    t->dtype = info.dtype;
    t->rank = info.rank;
    memcpy(t->shape, info.shape, sizeof t->shape);
    t->numel = info.numel;
    return CLI_OK;
}

int cli_load(const char *cmd, mha_st_file *file, const char *path, const char *name, bool required, bool allow_bytes,
             cli_tensor *t)
{
    int rc = cli_probe(cmd, file, path, name, required, allow_bytes, t);
    if (rc != CLI_OK || !t->present) return rc;
    bool bytes = t->dtype == MHA_DTYPE_BOOL || t->dtype == MHA_DTYPE_U8;
    size_t n = (size_t)(t->numel ? t->numel : 1);
    mha_status st;
    if (bytes) {
        t->u8 = malloc(n);
        st = t->u8 ? mha_st_read_raw(file, name, t->u8, n) : MHA_ERR_NOMEM;
    } else {
        t->f32 = n <= SIZE_MAX / sizeof(float) ? malloc(n * sizeof(float)) : NULL;
        st = t->f32 ? mha_st_read_f32(file, name, t->f32, (int64_t)n) : MHA_ERR_NOMEM;
    }
    if (st != MHA_OK) {
        cli_error(cmd, "%s: tensor \"%s\": %s", path, name, st == MHA_ERR_NOMEM ? "out of memory" : mha_last_error());
        cli_tensor_free(t);
        return CLI_FAIL;
    }
    return CLI_OK;
}

void cli_tensor_free(cli_tensor *t)
{
    free(t->f32);
    free(t->u8);
    t->f32 = NULL;
    t->u8 = NULL;
    t->present = false;
}

mha_mask cli_mask(cli_tensor *t, bool true_means_keep, const int64_t stride[4])
{
    mha_mask m = {MHA_MASK_NONE, NULL, {0, 0, 0, 0}};
    if (!t->present) return m;
    memcpy(m.stride, stride, sizeof m.stride);
    if (t->u8) {
        /* The library's byte masks say "keep"; flip PyTorch's "masked out". */
        for (int64_t i = 0; i < t->numel; i++) t->u8[i] = true_means_keep ? t->u8[i] != 0 : t->u8[i] == 0;
        m.kind = MHA_MASK_KEEP;
        m.data = t->u8;
    } else {
        m.kind = MHA_MASK_ADD;
        m.data = t->f32;
    }
    return m;
}

int cli_save(const char *cmd, const char *path, const cli_output *outs, int n)
{
    mha_st_writer *w = NULL;
    mha_status st = mha_st_writer_create(&w);
    for (int i = 0; st == MHA_OK && i < n; i++)
        st = mha_st_writer_add(w, outs[i].name, MHA_DTYPE_F32, outs[i].rank, outs[i].shape, outs[i].data);
    if (st == MHA_OK) st = mha_st_writer_save(w, path);
    mha_st_writer_free(w);
    if (st != MHA_OK) {
        cli_error(cmd, "cannot write --out %s: %s", path, mha_last_error());
        return CLI_FAIL;
    }
    return CLI_OK;
}

int cli_out_distinct(const char *cmd, const char *out, const char *const *inputs, int n)
{
    struct stat so;
    if (stat(out, &so) != 0) return CLI_OK; /* a new file cannot be an input */
    for (int i = 0; i < n; i++) {
        struct stat si;
        if (inputs[i] && stat(inputs[i], &si) == 0 && si.st_dev == so.st_dev && si.st_ino == so.st_ino) {
            cli_error(cmd, "--out %s is the input file %s; writing it would destroy what is being read", out,
                      inputs[i]);
            return CLI_USAGE;
        }
    }
    return CLI_OK;
}

int cli_compute_check(const char *cmd, const char *inputs, const char *weights, const char *out, const char *dtype,
                      bool backward, const char *parallel)
{
    if (!inputs || !out) {
        cli_error(cmd, "%s is required (see mha %s --help)", !inputs ? "--inputs" : "--out", cmd);
        return CLI_USAGE;
    }
    const char *read[2] = {inputs, weights};
    int rc = cli_out_distinct(cmd, out, read, 2);
    if (rc != CLI_OK) return rc;
    if (strcmp(dtype, "f32") != 0 && (backward || strcmp(dtype, "bf16") != 0)) {
        cli_error(cmd, "--dtype must be %s, got \"%s\"", backward ? "f32 (gradients are float32 only)" : "f32 or bf16",
                  dtype);
        return CLI_USAGE;
    }
    if (parallel && strcmp(dtype, "f32") != 0) {
        cli_error(cmd, "--parallel computes in f32; --dtype %s runs in one process", dtype);
        return CLI_USAGE;
    }
    return CLI_OK;
}

bool cli_product(const int64_t *dims, int n, int64_t *out)
{
    int64_t p = 1;
    for (int i = 0; i < n; i++)
        if (dims[i] < 0 || __builtin_mul_overflow(p, dims[i], &p) || p > INT64_MAX / 8) return false;
    *out = p;
    return true;
}

float *cli_alloc_floats(const char *cmd, const char *what, const int64_t *dims, int n)
{
    int64_t count;
    if (!cli_product(dims, n, &count)) {
        cli_error(cmd, "%s would have more elements than memory can address", what);
        return NULL;
    }
    float *p = malloc((size_t)(count ? count : 1) * sizeof(float));
    if (!p) cli_error(cmd, "out of memory allocating %s (%lld floats)", what, (long long)count);
    return p;
}

int cli_out_dir(const char *cmd, const char *dir)
{
    if (mkdir(dir, 0777) == 0 || errno == EEXIST) return CLI_OK;
    cli_error(cmd, "cannot create --out %s: %s", dir, strerror(errno));
    return CLI_FAIL;
}

double cli_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e3 * (double)ts.tv_sec + 1e-6 * (double)ts.tv_nsec;
}

int cli_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int cli_choice(const char *value, const char *const *choices, int n)
{
    for (int i = 0; i < n; i++)
        if (strcmp(value, choices[i]) == 0) return i;
    return -1;
}

static const char *const NAME_KINDS[] = {"auto", "torch", "llama", "gpt2", "bert"};
enum { N_NAME_KINDS = sizeof NAME_KINDS / sizeof NAME_KINDS[0] };
static const char *const ROPE_KINDS[] = {"none", "half", "interleaved"};

void cli_layer_opts_init(cli_layer_opts *o)
{
    *o = (cli_layer_opts){.prefix = "", .names = "auto", .rope = "none", .window_left = -1, .window_right = -1};
}

static const cli_range ROPE_THETA = {1 + 0x1p-52, INFINITY, "greater than 1"};
static const cli_range ROPE_DIM = {2, 16777216, "an even count of 2 or more (default: the whole head)"};

void cli_layer_flags(cli_layer_opts *o, cli_flag *flags)
{
    const cli_flag all[CLI_LAYER_FLAGS] = {
        {"weights", FLAG_STRING, &o->weights,
         "safetensors with the block's weights (nn.MultiheadAttention, Llama, GPT-2 or BERT names)", false, NULL},
        {"prefix", FLAG_STRING, &o->prefix, "prefix of the weight names, e.g. \"model.layers.0.self_attn.\"", false,
         NULL},
        {"num-heads", FLAG_INT, &o->num_heads,
         "number of (query) heads; kv heads and head width follow from the weights", false, &CLI_COUNT},
        {"names", FLAG_STRING, &o->names, "weight names: auto (default), torch, llama, gpt2 or bert", false, NULL},
        {"rope", FLAG_STRING, &o->rope,
         "rotary embeddings on Q and K: none (default), half (Llama) or interleaved (GPT-J)", false, NULL},
        {"rope-theta", FLAG_DOUBLE, &o->rope_theta, "rotary base (default 10000)", false, &ROPE_THETA},
        {"rope-dim", FLAG_INT, &o->rope_dim, "rotated dimensions per head, even (default all)", false, &ROPE_DIM},
        {"window-left", FLAG_INT, &o->window_left, "keys visible left of the diagonal (-1 = all)", false, &CLI_WINDOW},
        {"window-right", FLAG_INT, &o->window_right, "keys visible right of the diagonal (-1 = all)", false,
         &CLI_WINDOW},
        {"softcap", FLAG_DOUBLE, &o->softcap, "cap scores at C via C*tanh(s/C) (0 = off)", false, &CLI_CAP},
    };
    memcpy(flags, all, sizeof all);
}

int cli_layer_check(const char *cmd, const cli_layer_opts *o, const cli_flag *flags)
{
    if (!o->weights || !flags[2].seen) {
        cli_error(cmd, "%s is required (see mha %s --help)", !o->weights ? "--weights" : "--num-heads", cmd);
        return CLI_USAGE;
    }
    if (o->rope_dim % 2 != 0) {
        cli_error(cmd, "--rope-dim must be %s, got %lld", ROPE_DIM.rule, (long long)o->rope_dim);
        return CLI_USAGE;
    }
    if (cli_choice(o->names, NAME_KINDS, N_NAME_KINDS) < 0) {
        cli_error(cmd, "--names must be auto, torch, llama, gpt2 or bert, got \"%s\"", o->names);
        return CLI_USAGE;
    }
    if (cli_choice(o->rope, ROPE_KINDS, 3) < 0) {
        cli_error(cmd, "--rope must be none, half or interleaved, got \"%s\"", o->rope);
        return CLI_USAGE;
    }
    return CLI_OK;
}

void cli_layer_hints(const cli_layer_opts *o, mha_layer_desc *hints, mha_weight_names *names)
{
    hints->num_heads = o->num_heads;
    hints->rope = (mha_rope){(mha_rope_kind)cli_choice(o->rope, ROPE_KINDS, 3), o->rope_theta, o->rope_dim};
    hints->window_left = o->window_left;
    hints->window_right = o->window_right;
    hints->softcap = (float)o->softcap;
    *names = (mha_weight_names)cli_choice(o->names, NAME_KINDS, N_NAME_KINDS);
}

int cli_load_layer(const char *cmd, const cli_layer_opts *o, mha_layer_desc *hints, mha_layer **layer)
{
    mha_st_file *wf = NULL;
    int rc = cli_open(cmd, "--weights", o->weights, &wf);
    mha_weight_names names;
    cli_layer_hints(o, hints, &names);
    if (rc == CLI_OK && mha_layer_load(wf, o->prefix, names, hints, layer) != MHA_OK) {
        cli_error(cmd, "--weights %s: %s", o->weights, mha_last_error());
        rc = CLI_FAIL;
    }
    mha_st_close(wf);
    return rc;
}

/* ---------------------------------------------------------------- */
/* The one-process engine                                             */
/* ---------------------------------------------------------------- */

static mha_status single_forward(mha_ctx *ctx, void *layer, mha_tensor *y, mha_tensor *w, const mha_layer_fwd_args *a)
{
    return mha_layer_forward(ctx, layer, y, w, a);
}

static mha_status single_backward(mha_ctx *ctx, void *layer, const mha_layer_fwd_args *a, const mha_tensor *dy,
                                  mha_tensor *dq, mha_tensor *dk, mha_tensor *dv)
{
    return mha_layer_backward(ctx, layer, a, dy, dq, dk, dv);
}

static mha_status single_get_grad(const void *layer, const char *name, float *dst, int64_t numel)
{
    return mha_layer_get_grad(layer, name, dst, numel);
}

static mha_status single_decode(mha_ctx *ctx, void *layer, mha_kv_cache *cache, mha_tensor *y, const mha_tensor *x)
{
    return mha_layer_decode(ctx, layer, cache, y, x);
}

static void single_free(void *layer) { mha_layer_free(layer); }

int cli_engine_single(const char *cmd, const cli_layer_opts *o, mha_layer_desc *hints, cli_engine *e)
{
    memset(e, 0, sizeof *e);
    mha_layer *layer = NULL;
    int rc = cli_load_layer(cmd, o, hints, &layer);
    if (rc != CLI_OK) return rc;
    *e = (cli_engine){.layer = layer,
                      .local = layer,
                      .desc = *mha_layer_get_desc(layer),
                      .writes = true,
                      .forward = single_forward,
                      .backward = single_backward,
                      .get_grad = single_get_grad,
                      .decode = single_decode,
                      .free = single_free};
    const char *names[12];
    int64_t n = mha_layer_weight_names(layer, names, 12);
    for (e->n_weights = 0; e->n_weights < n; e->n_weights++) {
        cli_weight *w = &e->weights[e->n_weights];
        w->name = names[e->n_weights];
        if (mha_layer_weight_shape(layer, w->name, &w->rank, w->shape, &w->numel) != MHA_OK) {
            cli_error(cmd, "%s", mha_last_error());
            cli_engine_free(e);
            return CLI_FAIL;
        }
    }
    return CLI_OK;
}

void cli_engine_free(cli_engine *e)
{
    if (e->free) e->free(e->layer);
    memset(e, 0, sizeof *e);
}

static void print_help(void)
{
    printf("usage: mha COMMAND [flags]   (mha COMMAND --help for its flags)\n\n"
           "commands:\n"
           "  forward   torch.nn.MultiheadAttention forward on safetensors inputs\n"
           "  backward  its gradients: <name>.grad of every input and weight\n"
           "  sdpa      scaled dot-product attention on [B, H, L, D] tensors\n"
           "  sdpa-backward  gradients of sdpa with respect to query, key and value\n"
           "  decode    a prompt, then token-by-token steps with a KV cache, checked against a full forward\n"
           "  lab       train a small transformer on the library and see what its heads learned\n"
           "  info      head dimension, parameters, FLOPs, bytes and KV cache of a configuration\n"
           "  show      list a safetensors file's tensors or print one's values\n"
           "  bench     time the library on one shape, or measure the machine's peak\n\n"
           "  --version print the version;  --help print this help\n");
}

int mha_cli_main(int argc, char **argv)
{
    static const struct {
        const char *name;
        int (*run)(int, char **);
    } commands[] = {{"forward", mha_cmd_forward}, {"backward", mha_cmd_backward},
                    {"sdpa", mha_cmd_sdpa},       {"sdpa-backward", mha_cmd_sdpa_backward},
                    {"decode", mha_cmd_decode},   {"lab", mha_cmd_lab},
                    {"info", mha_cmd_info},       {"show", mha_cmd_show},
                    {"bench", mha_cmd_bench}};
    if (argc < 2) {
        print_help();
        return CLI_USAGE;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        print_help();
        return CLI_OK;
    }
    if (strcmp(cmd, "--version") == 0) {
        printf("mha %s (library %s)\n", MHA_VERSION_STRING, mha_version());
        return CLI_OK;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(cmd, commands[i].name) == 0) {
            int rc = commands[i].run(argc - 1, argv + 1);
            fflush(stdout);
            return rc;
        }
    fprintf(stderr, "mha: unknown command \"%s\" (try mha --help)\n", cmd);
    return CLI_USAGE;
}
