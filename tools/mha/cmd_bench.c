/*
 * cmd_bench.c -- `mha bench`: time the library on one shape, or measure the
 * machine's peak.  Validates nothing itself (the tests do); it warms up,
 * then reports the median, minimum and maximum of --repeat timed calls,
 * GFLOP/s by the formula of docs/PERFORMANCE.md and the percentage of the
 * peak measured in the same process (before and after the timed calls,
 * the larger).
 */
#define _POSIX_C_SOURCE 200809L

#include "cli.h"

#include <math.h>
#include <stdio.h>
#include <sys/resource.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const char *const CMD = "bench";

typedef struct bench_opts {
    const char *op, *dtype, *cache_dtype, *parallel, *copy_timing;
    mha_dtype cache; /* decode: the KV cache's storage, from cache_dtype */
    int64_t batch, seq, kv_seq, embed_dim, num_heads, num_kv_heads, threads, repeat;
    bool causal, json, peak;
    double peak_gflops;
} bench_opts;

static float *random_buffer(int64_t n, float scale)
{
    float *p = malloc((size_t)(n ? n : 1) * sizeof(float));
    uint64_t s = 0x2545f4914f6cdd1du;
    for (int64_t i = 0; p && i < n; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        p[i] = scale * ((float)(s >> 40) * 0x1p-24f * 2.0f - 1.0f);
    }
    return p;
}

/* One benchmark: setup builds the call, run performs it once. */
typedef struct bench_case {
    mha_ctx *ctx;
    mha_layer *layer;
    mha_layer_fwd_args args;
    mha_tensor out, q, k, v, dout, dq, dk, dv;
    mha_attn_stats stats; /* sdpa-backward: the forward's row statistics */
    mha_layer_tape *tape;
    mha_kv_cache *cache; /* decode: K and V, appended once */
    mha_attn_desc desc;
    float *buffers[10];
    double flops;
    double bytes;     /* decode: K and V bytes read per call */
    double copy_gbps; /* decode: the machine's copy bandwidth, same threads */
    /* decode with K and V beyond the last-level cache: copies of
     * copy_bytes timed before each call, their rates in copy_rates */
    char *copy_src, *copy_dst;
    int64_t copy_bytes;
    double *copy_rates;
} bench_case;

/* FLOPs of one call (docs/PERFORMANCE.md): projections 2*N*E*(E + 2*kv + E)
 * per batch, attention 4*N*S*E (QK^T and PV), halved when causal. */
static double attention_flops(const bench_opts *o)
{
    double f = 4.0 * (double)o->batch * (double)o->seq * (double)o->kv_seq * (double)o->embed_dim;
    return o->causal ? f / 2 : f;
}

static int setup_forward(const bench_opts *o, bench_case *c)
{
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    d.embed_dim = o->embed_dim;
    d.num_heads = o->num_heads;
    d.dtype = strcmp(o->dtype, "bf16") == 0 ? MHA_DTYPE_BF16 : MHA_DTYPE_F32;
    if (mha_layer_create(&d, &c->layer) != MHA_OK) {
        cli_error(CMD, "%s", mha_last_error());
        return CLI_FAIL;
    }
    int64_t E = o->embed_dim, n_x = o->batch * o->seq * E;
    c->buffers[0] = random_buffer(3 * E * E, 1.0f / sqrtf((float)E));
    c->buffers[1] = random_buffer(n_x, 1.0f);
    c->buffers[2] = malloc((size_t)n_x * sizeof(float));
    if (!c->buffers[0] || !c->buffers[1] || !c->buffers[2]) {
        cli_error(CMD, "out of memory");
        return CLI_FAIL;
    }
    mha_layer_set_weight(c->layer, "in_proj_weight", c->buffers[0], 3 * E * E);
    mha_layer_set_weight(c->layer, "out_proj.weight", c->buffers[0], E * E);
    free(c->buffers[0]); /* the layer keeps its own packed copy */
    c->buffers[0] = NULL;
    mha_layer_fwd_args_init(&c->args);
    c->args.query = c->args.key = c->args.value = mha_tensor_3d(c->buffers[1], o->batch, o->seq, E);
    c->args.causal = o->causal ? MHA_CAUSAL_TOP_LEFT : MHA_CAUSAL_NONE;
    c->out = mha_tensor_3d(c->buffers[2], o->batch, o->seq, E);
    c->flops = 2.0 * (double)o->batch * (double)o->seq * (double)E * (4.0 * (double)E) + attention_flops(o);
    if (strcmp(o->op, "backward") != 0) return CLI_OK;
    /* Training: forward on a tape, then backward for a dY into dX. */
    c->buffers[3] = random_buffer(n_x, 1.0f);
    c->buffers[4] = malloc((size_t)n_x * sizeof(float));
    if (!c->buffers[3] || !c->buffers[4]) {
        cli_error(CMD, "out of memory");
        return CLI_FAIL;
    }
    if (mha_layer_train_init(c->layer) != MHA_OK || mha_layer_tape_create(&c->tape) != MHA_OK) {
        cli_error(CMD, "%s", mha_last_error());
        return CLI_FAIL;
    }
    c->args.tape = c->tape;
    c->args.write_input_grads = 1; /* as a framework's step: dX written, not added to */
    c->dout = mha_tensor_3d(c->buffers[3], o->batch, o->seq, E);
    c->dq = mha_tensor_3d(c->buffers[4], o->batch, o->seq, E);
    c->flops *= 3.5; /* forward + backward, the backward counted as 2.5 forwards (docs/PERFORMANCE.md) */
    return CLI_OK;
}

/* The copy bandwidth a decoding step is held against (--copy-timing).
 * "before": the best of ten copies of 64 MB before the calls, the default
 * where K and V fit in the last-level cache (a copy between the calls
 * would push them out).  "between", the default beyond it: one copy (of
 * 64 MB or the cache's size, whichever is larger) before each timed call,
 * and the median reported, as the step's is.  A best case held against a
 * median, taken at another moment, sets the bar where the step never is
 * on a shared machine: five alternating runs of each (int8 cache of
 * 524288 tokens, 2 threads, Zen 4) copied at 33.7-40.0 GB/s best of ten,
 * 29.4-34.9 GB/s by the median between the calls, while the step read at
 * the same 32 GB/s in both. */
static bool setup_copies(const bench_opts *o, bench_case *c)
{
    int64_t llc = mha_last_level_cache_bytes();
    bool between =
        strcmp(o->copy_timing, "auto") == 0 ? c->bytes > (double)llc : strcmp(o->copy_timing, "between") == 0;
    if (!between) {
        if (mha_measure_bandwidth(c->ctx, INT64_C(64) << 20, &c->copy_gbps) == MHA_OK) return true;
        cli_error(CMD, "%s", mha_last_error());
        return false;
    }
    c->copy_bytes = llc > (INT64_C(64) << 20) ? llc : INT64_C(64) << 20;
    c->copy_src = malloc((size_t)c->copy_bytes);
    c->copy_dst = malloc((size_t)c->copy_bytes);
    c->copy_rates = malloc((size_t)o->repeat * sizeof(double));
    if (!c->copy_src || !c->copy_dst || !c->copy_rates) {
        cli_error(CMD, "out of memory");
        return false;
    }
    memset(c->copy_src, 1, (size_t)c->copy_bytes);
    memset(c->copy_dst, 2, (size_t)c->copy_bytes); /* every page faulted in before timing */
    return true;
}

/* Decoding: the new rows attend to a KV cache of --cache-dtype holding
 * the random K and V (appended once, quantised if int8), up to
 * themselves; the copy bandwidth measured beside it (setup_copies). */
static int setup_decode(const bench_opts *o, bench_case *c)
{
    mha_layer_desc d; /* the cache's shape: kv heads and head width */
    mha_layer_desc_init(&d);
    d.embed_dim = o->embed_dim;
    d.num_heads = o->num_heads;
    d.num_kv_heads = o->num_kv_heads;
    c->desc.causal = MHA_CAUSAL_BOTTOM_RIGHT;
    int64_t rows = o->batch * o->num_kv_heads * o->kv_seq;
    c->bytes = 2.0 * (double)rows * (double)cli_cache_row_bytes(o->cache, o->embed_dim / o->num_heads);
    bool ok = mha_layer_create(&d, &c->layer) == MHA_OK &&
              mha_kv_cache_create(c->layer, o->batch, o->kv_seq, o->cache, &c->cache) == MHA_OK &&
              mha_kv_cache_append(c->cache, &c->k, &c->v) == MHA_OK;
    if (!ok) cli_error(CMD, "%s", mha_last_error());
    return ok && setup_copies(o, c) ? CLI_OK : CLI_FAIL;
}

static int setup_sdpa(const bench_opts *o, bench_case *c)
{
    int64_t H = o->num_heads, G = o->num_kv_heads, D = o->embed_dim / H;
    int64_t nq = o->batch * H * o->seq * D, nk = o->batch * G * o->kv_seq * D;
    c->buffers[0] = random_buffer(nq, 1.0f);
    c->buffers[1] = random_buffer(nk, 1.0f);
    c->buffers[2] = random_buffer(nk, 1.0f);
    c->buffers[3] = malloc((size_t)nq * sizeof(float));
    if (!c->buffers[0] || !c->buffers[1] || !c->buffers[2] || !c->buffers[3]) {
        cli_error(CMD, "out of memory");
        return CLI_FAIL;
    }
    c->q = mha_tensor_4d(c->buffers[0], o->batch, H, o->seq, D);
    c->k = mha_tensor_4d(c->buffers[1], o->batch, G, o->kv_seq, D);
    c->v = mha_tensor_4d(c->buffers[2], o->batch, G, o->kv_seq, D);
    c->out = mha_tensor_4d(c->buffers[3], o->batch, H, o->seq, D);
    mha_attn_desc_init(&c->desc);
    c->desc.enable_gqa = G != H;
    c->desc.causal = o->causal ? MHA_CAUSAL_BOTTOM_RIGHT : MHA_CAUSAL_NONE;
    c->flops = attention_flops(o);
    if (strcmp(o->op, "decode") == 0) return setup_decode(o, c);
    if (strcmp(o->op, "sdpa-backward") != 0) return CLI_OK;
    /* The backward pass needs the forward's output and row statistics (the
     * fast and exact pair; from lse alone it renormalises first), and a dO. */
    c->buffers[4] = random_buffer(nq, 1.0f);
    c->buffers[5] = malloc((size_t)nq * sizeof(float));
    c->buffers[6] = malloc((size_t)nk * sizeof(float));
    c->buffers[7] = malloc((size_t)nk * sizeof(float));
    c->buffers[8] = c->stats.max = malloc((size_t)(o->batch * H * o->seq) * sizeof(float));
    c->buffers[9] = c->stats.sum = malloc((size_t)(o->batch * H * o->seq) * sizeof(float));
    for (int i = 4; i < 10; i++)
        if (!c->buffers[i]) {
            cli_error(CMD, "out of memory");
            return CLI_FAIL;
        }
    c->dout = mha_tensor_4d(c->buffers[4], o->batch, H, o->seq, D);
    c->dq = mha_tensor_4d(c->buffers[5], o->batch, H, o->seq, D);
    c->dk = mha_tensor_4d(c->buffers[6], o->batch, G, o->kv_seq, D);
    c->dv = mha_tensor_4d(c->buffers[7], o->batch, G, o->kv_seq, D);
    if (mha_attention_with_stats(c->ctx, &c->out, &c->stats, &c->q, &c->k, &c->v, &c->desc) != MHA_OK) {
        cli_error(CMD, "%s", mha_last_error());
        return CLI_FAIL;
    }
    c->flops *= 2.5; /* the convention of docs/PERFORMANCE.md: backward = 2.5 forwards */
    return CLI_OK;
}

static mha_status run_once(const bench_opts *o, bench_case *c)
{
    if (strcmp(o->op, "forward") == 0) return mha_layer_forward(c->ctx, c->layer, &c->out, NULL, &c->args);
    if (strcmp(o->op, "backward") == 0) {
        mha_layer_zero_grad_deferred(c->layer); /* as a framework's step: the backward writes them */
        mha_status st = mha_layer_forward(c->ctx, c->layer, &c->out, NULL, &c->args);
        return st != MHA_OK ? st : mha_layer_backward(c->ctx, c->layer, &c->args, &c->dout, &c->dq, &c->dq, &c->dq);
    }
    if (strcmp(o->op, "decode") == 0) return mha_kv_cache_attention(c->ctx, c->cache, &c->out, &c->q, &c->desc);
    if (strcmp(o->op, "sdpa-backward") == 0)
        return mha_attention_backward_with_stats(c->ctx, &c->dq, &c->dk, &c->dv, &c->q, &c->k, &c->v, &c->out,
                                                 &c->stats, &c->dout, &c->desc);
    return mha_attention(c->ctx, &c->out, NULL, &c->q, &c->k, &c->v, &c->desc);
}

/* Peak resident memory of this process so far, in MB: Linux's VmHWM,
 * which starts afresh at exec (getrusage's ru_maxrss carries over the
 * peak of the process that exec'd us, e.g. a Python script). */
static double peak_rss_mb(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %lf kB", &kb) == 1) break;
    if (f) fclose(f);
    if (kb >= 0) return kb / 1024.0;
    struct rusage ru;
    return getrusage(RUSAGE_SELF, &ru) == 0 ? (double)ru.ru_maxrss / 1024.0 : 0.0;
}

/* The median of x[0 .. n), sorting x. */
static double sorted_median(double *x, int n)
{
    qsort(x, (size_t)n, sizeof *x, cli_cmp_double);
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
}

static void report(const bench_opts *o, bench_case *c, double *ms, int n)
{
    double median = sorted_median(ms, n);
    if (c->copy_rates) c->copy_gbps = sorted_median(c->copy_rates, n);
    const char *copy_timing = c->copy_rates ? "between" : "before";
    double gflops = c->flops / (median * 1e6), pct = o->peak_gflops > 0 ? 100.0 * gflops / o->peak_gflops : 0;
    double gbps = c->bytes / (median * 1e6);
    if (c->bytes > 0 && o->json)
        printf(
            "{\"op\":\"decode\",\"batch\":%lld,\"seq\":%lld,\"kv_seq\":%lld,\"num_heads\":%lld,\"num_kv_heads\":%lld,"
            "\"head_dim\":%lld,\"cache_dtype\":\"%s\",\"threads\":%d,\"isa\":\"%s\",\"median_ms\":%.4f,"
            "\"min_ms\":%.4f,\"max_ms\":%.4f,\"kv_bytes\":%.0f,\"kv_gbps\":%.2f,\"copy_gbps\":%.2f,"
            "\"copy_timing\":\"%s\"}\n",
            (long long)o->batch, (long long)o->seq, (long long)o->kv_seq, (long long)o->num_heads,
            (long long)o->num_kv_heads, (long long)(o->embed_dim / o->num_heads), o->cache_dtype,
            mha_ctx_threads(c->ctx), mha_isa(), median, ms[0], ms[n - 1], c->bytes, gbps, c->copy_gbps, copy_timing);
    if (c->bytes > 0 && !o->json)
        printf("decode B=%lld new rows %lld, %s cache %lld, h=%lld kv=%lld d=%lld, %d threads, %s: median %.3f ms (min "
               "%.3f, max %.3f); K and V (%.1f MB) read at %.1f GB/s, the machine copies at %.1f GB/s (2 x bytes / s; "
               "%s)\n",
               (long long)o->batch, (long long)o->seq, o->cache_dtype, (long long)o->kv_seq, (long long)o->num_heads,
               (long long)o->num_kv_heads, (long long)(o->embed_dim / o->num_heads), mha_ctx_threads(c->ctx), mha_isa(),
               median, ms[0], ms[n - 1], c->bytes / 1e6, gbps, c->copy_gbps,
               c->copy_rates ? "the median of copies timed between the calls" : "the best of ten before the calls");
    if (c->bytes > 0) return;
    if (o->json) {
        printf("{\"op\":\"%s\",\"batch\":%lld,\"seq\":%lld,\"kv_seq\":%lld,\"embed_dim\":%lld,\"num_heads\":%lld,"
               "\"num_kv_heads\":%lld,\"causal\":%s,\"threads\":%d,\"isa\":\"%s\",\"dtype\":\"%s\",\"median_ms\":%.4f,"
               "\"min_ms\":%.4f,\"max_ms\":%.4f,\"gflops\":%.2f,\"peak_gflops\":%.2f,\"percent_of_peak\":%.1f,"
               "\"peak_rss_mb\":%.1f}\n",
               o->op, (long long)o->batch, (long long)o->seq, (long long)o->kv_seq, (long long)o->embed_dim,
               (long long)o->num_heads, (long long)o->num_kv_heads, o->causal ? "true" : "false",
               mha_ctx_threads(c->ctx), mha_isa(), o->dtype, median, ms[0], ms[n - 1], gflops, o->peak_gflops, pct,
               peak_rss_mb());
        return;
    }
    printf("%s %s B=%lld N=%lld S=%lld E=%lld h=%lld kv=%lld%s, %d threads, %s: median %.3f ms (min %.3f, max %.3f), "
           "%.1f GFLOP/s = %.1f%% of the %.1f GFLOP/s peak, peak memory %.0f MB\n",
           o->op, o->dtype, (long long)o->batch, (long long)o->seq, (long long)o->kv_seq, (long long)o->embed_dim,
           (long long)o->num_heads, (long long)o->num_kv_heads, o->causal ? " causal" : "", mha_ctx_threads(c->ctx),
           mha_isa(), median, ms[0], ms[n - 1], gflops, pct, o->peak_gflops, peak_rss_mb());
}

static int measure(bench_opts *o)
{
    bench_case c;
    memset(&c, 0, sizeof c);
    int rc = cli_ctx(CMD, o->threads, &c.ctx);
    mha_dtype dt = strcmp(o->dtype, "bf16") == 0 ? MHA_DTYPE_BF16 : MHA_DTYPE_F32;
    bool measured_peak = o->peak_gflops <= 0;
    if (rc == CLI_OK && measured_peak && mha_measure_peak(c.ctx, dt, 0.5, &o->peak_gflops) != MHA_OK) rc = CLI_FAIL;
    bool layer = strcmp(o->op, "forward") == 0 || strcmp(o->op, "backward") == 0;
    if (rc == CLI_OK) rc = layer ? setup_forward(o, &c) : setup_sdpa(o, &c);
    double *ms = malloc((size_t)o->repeat * sizeof(double));
    if (rc == CLI_OK && !ms) rc = CLI_FAIL;
    for (int w = 0; rc == CLI_OK && w < 2; w++) /* warm-up: scratch, caches, page faults */
        if (run_once(o, &c) != MHA_OK) {
            cli_error(CMD, "%s", mha_last_error());
            rc = CLI_FAIL;
        }
    for (int64_t r = 0; rc == CLI_OK && r < o->repeat; r++) {
        if (c.copy_rates) mha_time_copy(c.ctx, c.copy_dst, c.copy_src, c.copy_bytes, &c.copy_rates[r]);
        double t0 = cli_now_ms();
        run_once(o, &c);
        ms[r] = cli_now_ms() - t0;
    }
    /* The peak again after the timed calls, the larger kept: on a shared
     * machine a neighbour busy during the first measurement halved the
     * peak and made a run look 96% efficient. */
    double again = 0;
    if (rc == CLI_OK && measured_peak && mha_measure_peak(c.ctx, dt, 0.5, &again) == MHA_OK && again > o->peak_gflops)
        o->peak_gflops = again;
    if (rc == CLI_OK) report(o, &c, ms, (int)o->repeat);
    free(ms);
    for (int i = 0; i < 10; i++) free(c.buffers[i]);
    free(c.copy_src);
    free(c.copy_dst);
    free(c.copy_rates);
    mha_layer_tape_free(c.tape);
    mha_kv_cache_free(c.cache);
    mha_layer_free(c.layer);
    mha_ctx_free(c.ctx);
    return rc;
}

static int measure_peak(const bench_opts *o)
{
    int n_cpus = 0;
    mha_ctx *all = NULL, *one = NULL;
    int rc = cli_ctx(CMD, o->threads, &all);
    if (rc == CLI_OK) rc = cli_ctx(CMD, 1, &one);
    static const struct {
        mha_dtype dtype;
        const char *name, *label;
    } kinds[] = {{MHA_DTYPE_F32, "f32", "float32 FMA"}, {MHA_DTYPE_BF16, "bf16", "bfloat16 dot-product"}};
    for (size_t k = 0; rc == CLI_OK && k < sizeof kinds / sizeof kinds[0]; k++) {
        double g1 = 0, gn = 0;
        if (mha_measure_peak(one, kinds[k].dtype, 1.0, &g1) != MHA_OK ||
            mha_measure_peak(all, kinds[k].dtype, 1.0, &gn) != MHA_OK) {
            cli_error(CMD, "%s", mha_last_error());
            rc = CLI_FAIL;
            break;
        }
        n_cpus = mha_ctx_threads(all);
        if (o->json)
            printf("{\"op\":\"peak\",\"isa\":\"%s\",\"dtype\":\"%s\",\"threads\":1,\"gflops\":%.2f}\n"
                   "{\"op\":\"peak\",\"isa\":\"%s\",\"dtype\":\"%s\",\"threads\":%d,\"gflops\":%.2f}\n",
                   mha_isa(), kinds[k].name, g1, mha_isa(), kinds[k].name, n_cpus, gn);
        else
            printf("%s peak (%s): %.1f GFLOP/s on 1 thread, %.1f GFLOP/s on %d threads\n", kinds[k].label, mha_isa(),
                   g1, gn, n_cpus);
    }
    mha_ctx_free(all);
    mha_ctx_free(one);
    return rc;
}

/* --op and --dtype name something the benchmark can run. */
static int check_op(bench_opts *o)
{
    static const char *const ops[] = {"forward", "backward", "sdpa", "sdpa-backward", "decode"};
    bool known = false;
    for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++) known = known || strcmp(o->op, ops[i]) == 0;
    if (!known) {
        cli_error(CMD, "--op %s is not available; use forward, backward, sdpa, sdpa-backward or decode", o->op);
        return CLI_USAGE;
    }
    if (strcmp(o->dtype, "f32") != 0 && !(strcmp(o->dtype, "bf16") == 0 && strcmp(o->op, "forward") == 0)) {
        cli_error(CMD, "--dtype %s is not available for --op %s; use f32 (or bf16 with forward)", o->dtype, o->op);
        return CLI_USAGE;
    }
    if (strcmp(o->cache_dtype, "f32") != 0 && strcmp(o->op, "decode") != 0) {
        cli_error(CMD, "--cache-dtype applies to --op decode only");
        return CLI_USAGE;
    }
    if (strcmp(o->copy_timing, "auto") != 0 && strcmp(o->op, "decode") != 0) {
        cli_error(CMD, "--copy-timing applies to --op decode only");
        return CLI_USAGE;
    }
    if (strcmp(o->copy_timing, "auto") != 0 && strcmp(o->copy_timing, "before") != 0 &&
        strcmp(o->copy_timing, "between") != 0) {
        cli_error(CMD, "--copy-timing must be auto, before or between, got \"%s\"", o->copy_timing);
        return CLI_USAGE;
    }
    return cli_cache_dtype(CMD, o->cache_dtype, &o->cache);
}

/* --parallel: the mode fits --op, and this mha was built with MPI. */
static int measure_parallel(const bench_opts *o)
{
    static const char *const modes[] = {"heads", "ring", "ulysses", NULL};
    int mode = cli_choice(o->parallel, modes, 3);
    bool layer = strcmp(o->op, "forward") == 0 || strcmp(o->op, "backward") == 0;
    bool decode = strcmp(o->op, "decode") == 0;
    if (mode < 0 || (mode == 0) != layer || (decode && mode != 1)) {
        cli_error(CMD,
                  "--parallel %s does not run --op %s: heads runs forward and backward, ulysses sdpa and "
                  "sdpa-backward, ring those and decode",
                  o->parallel, o->op);
        return CLI_USAGE;
    }
    if (strcmp(o->dtype, "f32") != 0 || (!decode && o->kv_seq != o->seq)) {
        cli_error(CMD, "--parallel computes in f32, with as many keys as queries but for decode");
        return CLI_USAGE;
    }
    int rc = cli_parallel_begin(CMD, o->parallel, modes); /* built without MPI: says so */
    if (rc != CLI_OK) return rc;
#ifdef MHA_CLI_MPI
    cli_bench_shape s = {o->op,
                         o->parallel,
                         o->cache,
                         o->batch,
                         o->seq,
                         o->kv_seq,
                         o->embed_dim,
                         o->num_heads,
                         o->num_kv_heads,
                         o->threads,
                         o->repeat,
                         o->causal,
                         strcmp(o->op, "backward") == 0 || strcmp(o->op, "sdpa-backward") == 0,
                         o->json};
    rc = cli_bench_parallel(&s);
#endif
    return cli_parallel_end(rc);
}

static const cli_range GFLOPS = {1e-3, 1e9, "a positive GFLOP/s figure"};

/* The defaults that depend on --op, and a shape the ops can run. */
static int settle_shape(bench_opts *o, const cli_flag *flags, int n_flags)
{
    if (strcmp(o->op, "decode") == 0) { /* one new token against a 4096-token cache unless told */
        bool seq_seen = false;
        for (size_t i = 0; i < (size_t)n_flags; i++) seq_seen |= flags[i].dst == &o->seq && flags[i].seen;
        if (!seq_seen) o->seq = 1;
        if (!o->kv_seq) o->kv_seq = 4096;
    }
    if (!o->kv_seq) o->kv_seq = o->seq;
    if (!o->num_kv_heads) o->num_kv_heads = o->num_heads;
    bool layer_op = strcmp(o->op, "forward") == 0 || strcmp(o->op, "backward") == 0;
    if (layer_op && (o->kv_seq != o->seq || o->num_kv_heads != o->num_heads)) {
        cli_error(CMD, "--op %s is self-attention: --kv-seq and --num-kv-heads apply to sdpa only", o->op);
        return CLI_USAGE;
    }
    if (o->embed_dim % o->num_heads || o->num_heads % o->num_kv_heads) {
        cli_error(CMD, "embed_dim %lld must be divisible by num_heads %lld, and that by num_kv_heads %lld",
                  (long long)o->embed_dim, (long long)o->num_heads, (long long)o->num_kv_heads);
        return CLI_USAGE;
    }
    return CLI_OK;
}

int mha_cmd_bench(int argc, char **argv)
{
    bench_opts o = {.op = "forward",
                    .dtype = "f32",
                    .cache_dtype = "f32",
                    .copy_timing = "auto",
                    .batch = 1,
                    .seq = 512,
                    .embed_dim = 768,
                    .num_heads = 12,
                    .repeat = 10};
    cli_flag flags[] = {
        {"op", FLAG_STRING, &o.op,
         "forward (the MHA layer), backward (its forward + backward, training), sdpa (attention core), "
         "sdpa-backward (its gradients, from the forward's row statistics) or decode (--seq new rows, default 1, "
         "against a --kv-seq cache, "
         "default 4096); default forward",
         false, NULL},
        {"batch", FLAG_INT, &o.batch, "batch size B (default 1)", false, &CLI_COUNT},
        {"seq", FLAG_INT, &o.seq, "query length N (default 512)", false, &CLI_COUNT},
        {"kv-seq", FLAG_INT, &o.kv_seq, "key length S for sdpa (default N)", false, &CLI_COUNT},
        {"embed-dim", FLAG_INT, &o.embed_dim, "model width E (default 768)", false, &CLI_COUNT},
        {"num-heads", FLAG_INT, &o.num_heads, "heads h (default 12)", false, &CLI_COUNT},
        {"num-kv-heads", FLAG_INT, &o.num_kv_heads, "key/value heads for sdpa (default h)", false, &CLI_COUNT},
        {"is-causal", FLAG_BOOL, &o.causal, "causal masking", false, NULL},
        {"dtype", FLAG_STRING, &o.dtype, "f32 or bf16 (the layer computing in bfloat16; forward only)", false, NULL},
        {"cache-dtype", FLAG_STRING, &o.cache_dtype, "decode: " CLI_CACHE_DTYPE_HELP, false, NULL},
        {"copy-timing", FLAG_STRING, &o.copy_timing,
         "decode: when to time the copy the step's bytes per second are held against: before (the best of ten "
         "before the calls), between (one before each call, the median) or auto (default: between when K and V "
         "exceed the last-level cache)",
         false, NULL},
        {"threads", FLAG_INT, &o.threads, "worker threads (default: all CPUs)", false, &CLI_THREADS},
        {"repeat", FLAG_INT, &o.repeat, "timed calls (default 10)", false, &CLI_COUNT},
        {"peak-gflops", FLAG_DOUBLE, &o.peak_gflops, "use this peak instead of measuring it", false, &GFLOPS},
        {"json", FLAG_BOOL, &o.json, "one JSON object per line", false, NULL},
        {"peak", FLAG_BOOL, &o.peak, "measure the FMA peak on 1 thread and on all", false, NULL},
        {"parallel", FLAG_STRING, &o.parallel,
         "under mpirun: heads (forward, backward), ring or ulysses (sdpa, sdpa-backward; ring also decode, the "
         "cache split by sequence) over the ranks (docs/SCALING.md)",
         false, NULL},
    };
    bool help;
    int rc = cli_parse(CMD,
                       "[--op forward|backward|sdpa|sdpa-backward|decode] [--batch B] [--seq N] [--embed-dim E] "
                       "[--num-heads H] [flags] | --peak",
                       argc, argv, flags, (int)(sizeof flags / sizeof flags[0]), &help);
    if (rc != CLI_OK || help) return rc;
    if (o.peak) return measure_peak(&o);
    if ((rc = check_op(&o)) != CLI_OK) return rc;
    if ((rc = settle_shape(&o, flags, (int)(sizeof flags / sizeof flags[0]))) != CLI_OK) return rc;
    return o.parallel ? measure_parallel(&o) : measure(&o);
}
