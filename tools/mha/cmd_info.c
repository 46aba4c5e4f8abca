/*
 * cmd_info.c -- `mha info`: the sizing questions people ask about an
 * attention configuration.  The numbers come from mha_info_compute();
 * this file only explains them.
 */
#include "cli.h"

#include <stdio.h>

static const char *const CMD = "info";

/* "1, 2, 3, 4, ..." : the head counts that would work, for the error. */
static const char *divisors(int64_t embed_dim, char *buf, size_t size)
{
    size_t used = 0;
    int shown = 0;
    buf[0] = '\0';
    for (int64_t h = 1; h <= embed_dim && shown < 12 && used < size; h++)
        if (embed_dim % h == 0)
            used += (size_t)snprintf(buf + used, size - used, "%s%lld", shown++ ? ", " : "", (long long)h);
    if (shown == 12 && used < size) snprintf(buf + used, size - used, ", ...");
    return buf;
}

/* 12345678 -> "12,345,678" */
static const char *grouped(int64_t v, char *buf, size_t size)
{
    char digits[32];
    int n = snprintf(digits, sizeof digits, "%lld", (long long)v), out = 0;
    for (int i = 0; i < n && (size_t)out + 2 < size; i++) {
        if (i && (n - i) % 3 == 0) buf[out++] = ',';
        buf[out++] = digits[i];
    }
    buf[out] = '\0';
    return buf;
}

static void print_kv_table(int64_t E, int64_t h, int64_t chosen)
{
    mha_info info;
    printf("KV cache per token and layer (K and V, float32; bf16 takes 1/2, int8 (head_dim + 4) / (4 head_dim) with "
           "its scales):\n");
    for (int64_t g = h; g >= 1; g--) {
        /* MHA, MQA, the chosen count, and GQA groups of a power of two. */
        bool pow2_group = (h / g & (h / g - 1)) == 0;
        if (h % g || !(g == h || g == 1 || g == chosen || pow2_group)) continue;
        if (mha_info_compute(E, h, g, 0, &info) != MHA_OK) continue;
        const char *kind = g == h ? "MHA" : g == 1 ? "MQA" : "GQA";
        printf("  %s  %4lld kv heads: %8lld bytes", kind, (long long)g, (long long)info.kv_cache_bytes_per_token);
        if (g == h) printf("  (the baseline)");
        else
            printf("  (%.3gx smaller)",
                   (double)info.kv_cache_bytes_per_token_mha / (double)info.kv_cache_bytes_per_token);
        printf("%s\n", g == chosen ? "  <- this configuration" : "");
    }
}

static void print_info(int64_t E, int64_t h, int64_t g, int64_t seq, const mha_info *in)
{
    char a[40], b[40];
    printf("configuration: embed_dim %lld, %lld heads, %lld key/value heads (%s)\n", (long long)E, (long long)h,
           (long long)(g ? g : h),
           !g || g == h ? "multi-head attention"
           : g == 1     ? "multi-query attention"
                        : "grouped-query attention");
    printf("head dimension: d_k = embed_dim / num_heads = %lld / %lld = %lld\n", (long long)E, (long long)h,
           (long long)in->head_dim);
    printf("parameters: %s (W_q, W_o %lld x %lld; W_k, W_v %lld x %lld; 2 x %lld + 2 x %lld biases)\n",
           grouped(in->params, a, sizeof a), (long long)E, (long long)E, (long long)in->kv_dim, (long long)E,
           (long long)E, (long long)in->kv_dim);
    printf("  one head of width %lld has %s: %s\n", (long long)E, grouped(in->params_single_head, b, sizeof b),
           in->params == in->params_single_head
               ? "the same, since splitting into heads only partitions the projections"
               : "grouping K/V heads is what saves parameters; splitting into heads saves none");
    printf("one forward at seq %lld (batch 1, self-attention, float32):\n", (long long)seq);
    printf("  projections  %10.4g GFLOP\n", in->flops_projections / 1e9);
    printf("  attention    %10.4g GFLOP  (Q K^T and P V; about half with a causal mask)\n", in->flops_attention / 1e9);
    printf("  total        %10.4g GFLOP\n", (in->flops_projections + in->flops_attention) / 1e9);
    printf("  memory       %10.4g MB weights + %.4g MB activations (each written and read once)\n",
           in->bytes_weights / 1e6, in->bytes_activations / 1e6);
    print_kv_table(E, h, g ? g : h);
}

int mha_cmd_info(int argc, char **argv)
{
    int64_t E = 0, h = 0, g = 0, seq = 1024;
    cli_flag flags[] = {
        {"embed-dim", FLAG_INT, &E, "model width E (d_model)", false, &CLI_COUNT},
        {"num-heads", FLAG_INT, &h, "number of query heads h", false, &CLI_COUNT},
        {"num-kv-heads", FLAG_INT, &g, "key/value heads for GQA/MQA (default: h)", false, &CLI_COUNT},
        {"seq", FLAG_INT, &seq, "sequence length for FLOPs and bytes (default 1024)", false, &CLI_COUNT},
    };
    bool help;
    int rc = cli_parse(CMD, "--embed-dim E --num-heads H [--num-kv-heads G] [--seq N]", argc, argv, flags,
                       (int)(sizeof flags / sizeof flags[0]), &help);
    if (rc != CLI_OK || help) return rc;
    if (!flags[0].seen || !flags[1].seen) {
        cli_error(CMD, "%s is required (see mha info --help)", !flags[0].seen ? "--embed-dim" : "--num-heads");
        return CLI_USAGE;
    }
    mha_info info;
    if (mha_info_compute(E, h, g, seq, &info) != MHA_OK) {
        char list[160];
        if (E >= 1 && h >= 1 && E % h)
            cli_error(CMD, "%s; head counts that divide %lld: %s", mha_last_error(), (long long)E,
                      divisors(E, list, sizeof list));
        else cli_error(CMD, "%s", mha_last_error());
        return CLI_FAIL;
    }
    print_info(E, h, g, seq, &info);
    return CLI_OK;
}
