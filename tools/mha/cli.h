/*
 * cli.h -- what the `mha` subcommands share: flag parsing, error messages,
 * loading tensors from safetensors inputs and writing outputs.  No math:
 * every computation goes through the public API in mha.h.
 */
#ifndef MHA_CLI_H
#define MHA_CLI_H

#include "mha.h"

#include <stdbool.h>
#include <stdint.h>

/* Exit codes. */
enum { CLI_OK = 0, CLI_FAIL = 1, CLI_USAGE = 2 };

/* Entry points: argv[0] is the subcommand's name. */
int mha_cli_main(int argc, char **argv);
int mha_cmd_forward(int argc, char **argv);
int mha_cmd_backward(int argc, char **argv);
int mha_cmd_sdpa(int argc, char **argv);
int mha_cmd_sdpa_backward(int argc, char **argv);
int mha_cmd_decode(int argc, char **argv);
int mha_cmd_lab(int argc, char **argv);
int mha_cmd_lab_model(int argc, char **argv);
int mha_cmd_info(int argc, char **argv);
int mha_cmd_show(int argc, char **argv);
int mha_cmd_bench(int argc, char **argv);

/* `mha bench --parallel MODE` under mpirun (bench_parallel.c, built where
 * MPI is), in a session cli_parallel_begin began: the shape and mode of
 * one benchmark. */
typedef struct cli_bench_shape {
    const char *op, *parallel; /* heads (forward, backward), ring or ulysses (sdpa, sdpa-backward; ring: decode) */
    mha_dtype cache;           /* decode: the shards' storage */
    int64_t batch, seq, kv_seq, embed_dim, num_heads, num_kv_heads, threads, repeat;
    bool causal, backward, json;
} cli_bench_shape;
int cli_bench_parallel(const cli_bench_shape *shape);

/* Print "mha <cmd>: <message>" on stderr. */
void cli_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

typedef enum cli_flag_kind { FLAG_BOOL, FLAG_STRING, FLAG_INT, FLAG_DOUBLE } cli_flag_kind;

/* The values a number flag accepts, lo..hi inclusive, and the rule as
 * the error message words it ("--softcap must be <rule>, got -1"). */
typedef struct cli_range {
    double lo, hi;
    const char *rule;
} cli_range;

/* Ranges several commands share. */
extern const cli_range CLI_COUNT;   /* sizes: 1 .. 2^24 */
extern const cli_range CLI_LENGTH;  /* token counts that may be 0: 0 .. 2^24 */
extern const cli_range CLI_THREADS; /* 0 .. 1024, 0 = all CPUs */
extern const cli_range CLI_WINDOW;  /* -1 (unbounded) .. 2^40 */
extern const cli_range CLI_CAP;     /* 0 (off) or positive */

typedef struct cli_flag {
    const char *name; /* without the leading "--" */
    cli_flag_kind kind;
    void *dst; /* bool, const char *, int64_t or double */
    const char *help;
    bool seen;              /* set by cli_parse */
    const cli_range *range; /* number flags: the values accepted (NULL: any) */
} cli_flag;

/* Parses --name value, --name=value and --help, checking each number
 * against its flag's range as it is read (so every bad value is a usage
 * error naming its flag, before any file is opened).  Returns CLI_OK, or
 * CLI_USAGE after printing the problem; *help_shown is set when --help
 * printed the usage (the caller then exits 0). */
int cli_parse(const char *cmd, const char *synopsis, int argc, char **argv, cli_flag *flags, int n_flags,
              bool *help_shown);

/* One tensor read from an inputs file.  Float dtypes load as float32
 * (f32); BOOL and U8 load as bytes (u8). */
typedef struct cli_tensor {
    const char *name;
    bool present;
    mha_dtype dtype;
    int rank;
    int64_t shape[MHA_ST_MAX_RANK];
    int64_t numel;
    float *f32;
    uint8_t *u8;
} cli_tensor;

/* Load `name` from `file` (opened from `path`).  An absent optional tensor
 * gives present = false; an absent required one is an error.  Masks
 * (allow_bytes) may be BOOL or U8; all other tensors must have a float
 * dtype.  Returns CLI_OK or CLI_FAIL after printing the error. */
int cli_load(const char *cmd, mha_st_file *file, const char *path, const char *name, bool required, bool allow_bytes,
             cli_tensor *t);
void cli_tensor_free(cli_tensor *t);
/* cli_load's checks and t's description, without reading the data (t->f32
 * and t->u8 stay NULL): for readers of a part of the tensor. */
int cli_probe(const char *cmd, mha_st_file *file, const char *path, const char *name, bool required, bool allow_bytes,
              cli_tensor *t);

/* The index of `value` among the n `choices`, or -1. */
int cli_choice(const char *value, const char *const *choices, int n);

/* "[2, 3, 4]" */
const char *cli_shape_str(const int64_t *shape, int rank, char *buf, size_t size);

/* Open a safetensors file or print why not. */
int cli_open(const char *cmd, const char *what, const char *path, mha_st_file **file);

/* The library mask for a loaded BOOL/U8 or float tensor (kind NONE when
 * absent).  Bytes are rewritten in place to the library's "keep" meaning:
 * true_means_keep says which convention the file used (SDPA: True = take
 * part; nn.MultiheadAttention: True = masked out). */
mha_mask cli_mask(cli_tensor *t, bool true_means_keep, const int64_t stride[4]);

/* Output tensors, written atomically as float32 to `path`. */
typedef struct cli_output {
    const char *name;
    int rank;
    const int64_t *shape;
    const float *data;
} cli_output;
int cli_save(const char *cmd, const char *path, const cli_output *outs, int n);

/* CLI_USAGE (printed) when `out` names the same existing file as one of
 * the n input paths (NULL entries skipped): outputs never overwrite an
 * input. */
int cli_out_distinct(const char *cmd, const char *out, const char *const *inputs, int n);

/* The rules the four computing commands (forward, backward, sdpa,
 * sdpa-backward) share, each named when broken: --inputs and --out given,
 * --out neither --inputs nor `weights` (NULL: none), --dtype f32 or, for
 * a forward, bf16, and --parallel (`parallel`, NULL: off) in f32 only.
 * CLI_USAGE (printed) or CLI_OK. */
int cli_compute_check(const char *cmd, const char *inputs, const char *weights, const char *out, const char *dtype,
                      bool backward, const char *parallel);

/* Product of sizes; false when it overflows (or exceeds what float
 * buffers can address). */
bool cli_product(const int64_t *dims, int n, int64_t *out);

/* malloc of the product of dims floats, or NULL after printing why. */
float *cli_alloc_floats(const char *cmd, const char *what, const int64_t *dims, int n);

/* The flags that describe an attention block's weights and what no
 * tensor stores (forward, backward, decode share them). */
typedef struct cli_layer_opts {
    const char *weights, *prefix, *names, *rope;
    int64_t num_heads, rope_dim, window_left, window_right;
    double rope_theta, softcap;
} cli_layer_opts;

enum { CLI_LAYER_FLAGS = 10 };

void cli_layer_opts_init(cli_layer_opts *o);
/* Fills flags[0 .. CLI_LAYER_FLAGS) with the block's flags, bound to o. */
void cli_layer_flags(cli_layer_opts *o, cli_flag *flags);
/* After parsing: CLI_USAGE (printed) for a missing --weights/--num-heads
 * or a bad choice; flags are the ones cli_layer_flags filled. */
int cli_layer_check(const char *cmd, const cli_layer_opts *o, const cli_flag *flags);
/* *hints completed from o (num_heads, rope, window, softcap) and the
 * naming family --names chose. */
void cli_layer_hints(const cli_layer_opts *o, mha_layer_desc *hints, mha_weight_names *names);
/* Opens --weights and loads the block with *hints completed from o
 * (num_heads, rope, window, softcap); CLI_FAIL printed on error. */
int cli_load_layer(const char *cmd, const cli_layer_opts *o, mha_layer_desc *hints, mha_layer **layer);

/* What computes a layer command (forward, backward, decode): this
 * process's whole layer, or under mpirun with --parallel heads this
 * rank's share of the heads (parallel.c).  The commands run either
 * through it alike. */
typedef struct cli_weight {
    const char *name; /* as the file names it, after the prefix */
    int rank;
    int64_t shape[3]; /* as the file stores it */
    int64_t numel;
} cli_weight;

typedef struct cli_engine {
    void *layer;
    mha_layer *local;    /* the layer this process holds: for mha_layer_train_init and KV caches */
    mha_layer_desc desc; /* the whole layer's (kdim, vdim, head_dim, num_kv_heads completed) */
    int n_weights;
    cli_weight weights[12];
    bool writes; /* this process writes the command's outputs (rank 0) */
    mha_status (*forward)(mha_ctx *ctx, void *layer, mha_tensor *y, mha_tensor *w, const mha_layer_fwd_args *a);
    mha_status (*backward)(mha_ctx *ctx, void *layer, const mha_layer_fwd_args *a, const mha_tensor *dy, mha_tensor *dq,
                           mha_tensor *dk, mha_tensor *dv);
    mha_status (*get_grad)(const void *layer, const char *name, float *dst, int64_t numel);
    mha_status (*decode)(mha_ctx *ctx, void *layer, mha_kv_cache *cache, mha_tensor *y, const mha_tensor *x);
    int64_t (*cache_capacity)(int64_t tokens); /* this process's cache for a sequence of `tokens` */
    void (*free)(void *layer);
} cli_engine;

/* The whole layer from --weights, in this process (cli_load_layer). */
int cli_engine_single(const char *cmd, const cli_layer_opts *o, mha_layer_desc *hints, cli_engine *e);
/* The engine the session runs, with more than one rank: --parallel heads,
 * the heads over the ranks (each reads only its shards of --weights);
 * --parallel ring, the whole layer on every rank decoding over a KV
 * cache split by sequence (an even block of the tokens a rank).  Else
 * cli_engine_single.  Collective. */
int cli_engine_load(const char *cmd, const cli_layer_opts *o, mha_layer_desc *hints, cli_engine *e);
void cli_engine_free(cli_engine *e);

/* --parallel (parallel.c): cli_parallel_begin checks the mode against
 * the command's (NULL-terminated `modes`), initialises MPI where this mha
 * was built with it (CLI_USAGE with the reason otherwise); with one rank
 * (cli_ranks) the command runs as without --parallel.  From
 * then on errors name the rank ("mha forward: rank 1 of 2: ...") and
 * every rank takes part in each step:
 *   cli_agree(rc)       the worst status of all ranks, on every rank
 *                       (before each collective step, so a rank that
 *                       failed alone never leaves the others waiting);
 *   cli_lib_error       a collective call's error (it names its rank
 *                       already): printed once, by rank 0;
 *   cli_parallel_end    the agreed status, and MPI finalised.
 * Outside a session cli_agree returns rc and cli_lib_error prints. */
int cli_parallel_begin(const char *cmd, const char *mode, const char *const *modes);
int cli_parallel_end(int rc);
int cli_agree(int rc);
void cli_lib_error(const char *cmd, const char *context);
/* This process's rank and the session's size (0 and 1 outside one). */
int cli_rank(void);
int cli_ranks(void);

/* `mha sdpa` and `mha sdpa-backward` (cmd_sdpa.c): the flags, and the
 * inputs read whole (cli_sdpa_load with whole) or, for q, k, v and
 * grad_output, only described, for readers of one part of each
 * (--parallel ring|ulysses, parallel_sdpa.c); masks and ALiBi slopes are
 * always read whole.  cli_sdpa_desc: the descriptor of the flags and
 * the inputs (mask strides checked against [B, Hq, L, S]). */
typedef struct cli_sdpa_opts {
    const char *cmd; /* "sdpa" or "sdpa-backward" */
    bool backward;
    const char *inputs, *out;
    const char *dtype, *parallel;
    bool is_causal, bottom_right, enable_gqa;
    double scale, softcap;
    int64_t window_left, window_right, threads;
} cli_sdpa_opts;

typedef struct cli_sdpa_inputs {
    cli_tensor q, k, v, mask, alibi, grad;
} cli_sdpa_inputs;

int cli_sdpa_load(const cli_sdpa_opts *o, mha_st_file *f, cli_sdpa_inputs *in, bool whole);
int cli_sdpa_desc(const cli_sdpa_opts *o, cli_sdpa_inputs *in, mha_attn_desc *desc);
void cli_sdpa_inputs_free(cli_sdpa_inputs *in);
#ifdef MHA_CLI_MPI
/* The command over the ranks of a session of more than one. */
int cli_sdpa_parallel(const cli_sdpa_opts *o);
#endif

/* --out DIR made if it is not there (CLI_FAIL naming it if it cannot be). */
int cli_out_dir(const char *cmd, const char *dir);

/* Monotonic time in milliseconds, and a qsort comparison of doubles. */
double cli_now_ms(void);
int cli_cmp_double(const void *a, const void *b);

/* Context with --threads (0 = default). */
int cli_ctx(const char *cmd, int64_t threads, mha_ctx **ctx);

/* --cache-dtype: the KV cache's storage named f32, bf16 or int8, into
 * *dtype; CLI_USAGE with a message otherwise. */
#define CLI_CACHE_DTYPE_HELP "f32 (default), bf16 or int8 (per token and head, one scale each) storage of K and V"
int cli_cache_dtype(const char *cmd, const char *name, mha_dtype *dtype);
/* Bytes one cached row of head_dim keys (or values) takes in dtype, its
 * scale included. */
int64_t cli_cache_row_bytes(mha_dtype dtype, int64_t head_dim);

#endif /* MHA_CLI_H */
