/*
 * cmd_show.c -- `mha show`: list a safetensors file's tensors, or print
 * one tensor's values as rows of its last dimension.  For looking at
 * inputs and outputs without Python.
 */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>

static const char *const CMD = "show";

static void list_tensors(mha_st_file *f)
{
    char shape[128];
    for (int64_t i = 0; i < mha_st_count(f); i++) {
        mha_st_info info;
        mha_st_info_at(f, i, &info);
        printf("%-32s %-5s %s\n", info.name, mha_dtype_name(info.dtype),
               cli_shape_str(info.shape, info.rank, shape, sizeof shape));
    }
}

/* Rows of the last dimension, at most max_rows x max_cols of them. */
static void print_values(const cli_tensor *t, int64_t max_rows, int64_t max_cols)
{
    char shape[128];
    int64_t cols = t->rank ? t->shape[t->rank - 1] : 1, rows = cols ? t->numel / cols : 0;
    printf("%s %s %s\n", t->name, mha_dtype_name(t->dtype), cli_shape_str(t->shape, t->rank, shape, sizeof shape));
    for (int64_t r = 0; r < rows && r < max_rows; r++) {
        printf("  ");
        for (int64_t c = 0; c < cols && c < max_cols; c++) {
            double v = t->f32 ? t->f32[r * cols + c] : t->u8[r * cols + c];
            printf("%9.4f", v);
        }
        printf("%s\n", cols > max_cols ? "  ..." : "");
    }
    if (rows > max_rows) printf("  ... (%lld more rows)\n", (long long)(rows - max_rows));
}

int mha_cmd_show(int argc, char **argv)
{
    const char *tensor = NULL;
    int64_t max = 8;
    cli_flag flags[] = {
        {"tensor", FLAG_STRING, &tensor, "print this tensor's values", false, NULL},
        {"max", FLAG_INT, &max, "print at most this many rows and columns (default 8)", false, &CLI_COUNT},
    };
    if (argc < 2 || argv[1][0] == '-') {
        bool help;
        int rc = cli_parse(CMD, "FILE [--tensor NAME] [--max N]", argc, argv, flags, 2, &help);
        if (rc != CLI_OK || help) return rc;
        cli_error(CMD, "a safetensors FILE is required (see mha show --help)");
        return CLI_USAGE;
    }
    const char *path = argv[1];
    bool help;
    int rc = cli_parse(CMD, "FILE [--tensor NAME] [--max N]", argc - 1, argv + 1, flags, 2, &help);
    if (rc != CLI_OK || help) return rc;
    mha_st_file *f = NULL;
    if (cli_open(CMD, "the", path, &f) != CLI_OK) return CLI_FAIL;
    if (!tensor) {
        list_tensors(f);
    } else {
        cli_tensor t;
        rc = cli_load(CMD, f, path, tensor, true, true, &t);
        if (rc == CLI_OK) print_values(&t, max, max);
        cli_tensor_free(&t);
    }
    mha_st_close(f);
    return rc;
}
