/*
 * test_golden.c -- every PyTorch golden case through the real CLI.
 *
 * For each .safetensors file in tests/data/golden (see gen_golden.py), run
 *     mha <command> --inputs F [--weights F] --out T <args>
 * in-process, then hold every output tensor to the tolerance rule against
 * the float64 result, with PyTorch's float32 result as the baseline.  The
 * same case is run again with 1 and 3 threads: the bits must not change.
 *
 * Built as test_golden_mpi (MHA_TEST_PARALLEL) and run under mpirun, every
 * layer case runs with --parallel heads and every sdpa case with
 * --parallel ring and ulysses: each rank reads its shards, rank 0 writes,
 * and the outputs are held to the same rule, with the same bits on a
 * second run.  A case with fewer kv heads than ranks must be refused
 * (heads and Ulysses give each rank whole kv heads), naming why.
 */
#define _POSIX_C_SOURCE 200809L

#include "cli.h"
#ifdef MHA_TEST_PARALLEL
#include "mpi_harness.h"
#else
#include "harness.h"
#endif

#include <dirent.h>
#include <stdint.h>
#include <unistd.h>

enum { MAX_ARGS = 32 };

/* --parallel's mode for this run (NULL: one process). */
static const char *parallel_mode = NULL;

typedef struct buffer {
    float *data;
    int64_t n;
} buffer;

static buffer read_f32(mha_st_file *f, const char *name)
{
    buffer b = {NULL, 0};
    mha_st_info info;
    if (mha_st_find(f, name, &info) != MHA_OK) return b;
    b.n = info.numel;
    b.data = malloc((size_t)(b.n ? b.n : 1) * sizeof(float));
    if (mha_st_read_f32(f, name, b.data, b.n) != MHA_OK) b.n = -1;
    return b;
}

static double *read_f64(mha_st_file *f, const char *name, int64_t *n)
{
    mha_st_info info;
    if (mha_st_find(f, name, &info) != MHA_OK || info.dtype != MHA_DTYPE_F64) return NULL;
    double *d = malloc((size_t)(info.numel ? info.numel : 1) * sizeof(double));
    if (mha_st_read_raw(f, name, d, (size_t)info.numel * sizeof(double)) != MHA_OK) {
        free(d);
        return NULL;
    }
    *n = info.numel;
    return d;
}

/* Runs the case's command writing to `out_path` (with --dtype bf16 when
 * `bf16`); returns the exit code. */
static int run_case(const char *path, mha_st_file *cf, const char *out_path, const char *threads, bool bf16)
{
    const char *command = mha_st_metadata(cf, "command");
    const char *args = mha_st_metadata(cf, "args");
    char arg_copy[1024];
    snprintf(arg_copy, sizeof arg_copy, "%s", args ? args : "");
    char *argv[MAX_ARGS];
    int argc = 0;
    argv[argc++] = "mha";
    argv[argc++] = (char *)command;
    argv[argc++] = "--inputs";
    argv[argc++] = (char *)path;
    argv[argc++] = "--out";
    argv[argc++] = (char *)out_path;
    argv[argc++] = "--threads";
    argv[argc++] = (char *)threads;
    if (strcmp(command, "forward") == 0 || strcmp(command, "backward") == 0) {
        argv[argc++] = "--weights";
        argv[argc++] = (char *)path;
    }
    if (bf16) {
        argv[argc++] = "--dtype";
        argv[argc++] = "bf16";
    }
    if (parallel_mode) {
        argv[argc++] = "--parallel";
        argv[argc++] = (char *)parallel_mode;
    }
    for (char *tok = strtok(arg_copy, " "); tok && argc < MAX_ARGS - 1; tok = strtok(NULL, " ")) argv[argc++] = tok;
    argv[argc] = NULL;
    return mha_cli_main(argc, argv);
}

/* Compare every expected.<name> in the case with <name> in the output,
 * against the float32 baseline torch32.<name>, or with `bf16` against
 * PyTorch's bfloat16 result torchbf16.<name> and bf16's floor. */
static int compare_outputs(const char *case_name, mha_st_file *cf, mha_st_file *of, bool bf16)
{
    int compared = 0;
    for (int64_t i = 0; i < mha_st_count(cf); i++) {
        mha_st_info info;
        mha_st_info_at(cf, i, &info);
        if (strncmp(info.name, "expected.", 9) != 0) continue;
        const char *out_name = info.name + 9;
        char base_name[256], what[320];
        snprintf(base_name, sizeof base_name, "%s.%s", bf16 ? "torchbf16" : "torch32", out_name);
        snprintf(what, sizeof what, "%s%s: %s", case_name, bf16 ? " (bf16)" : "", out_name);
        mha_st_info got_info;
        CHECK(mha_st_find(of, out_name, &got_info) == MHA_OK, "%s missing from the output", what);
        if (mha_st_find(of, out_name, &got_info) != MHA_OK) continue;
        bool same_shape = got_info.rank == info.rank;
        for (int d = 0; same_shape && d < info.rank; d++) same_shape = got_info.shape[d] == info.shape[d];
        CHECK(same_shape, "%s: shape differs from PyTorch's", what);
        int64_t n = 0;
        double *ref = read_f64(cf, info.name, &n);
        buffer got = read_f32(of, out_name), base = read_f32(cf, base_name);
        CHECK(base.n == n, "%s: no baseline %s", what, base_name);
        /* Gradients get FlashAttention's factor 3, values 2. */
        size_t len = strlen(out_name);
        double factor = len > 5 && strcmp(out_name + len - 5, ".grad") == 0 ? GRAD_FACTOR : 2.0;
        if (same_shape && ref && got.n == n && base.n == n) {
            CHECK_CLOSE_RULE(what, got.data, ref, base.data, n, bf16 ? BF16_FLOOR_EPS : FLT_EPSILON, factor);
            if (getenv("MHA_TEST_VERBOSE")) { /* the figures docs/NUMERICS.md quotes */
                tolerance_report r =
                    tolerance_check_rule(got.data, ref, base.data, n, bf16 ? BF16_FLOOR_EPS : FLT_EPSILON, factor);
                printf("%-60s max error %.3g, baseline %.3g, limit %.3g\n", what, r.err, r.base_err, r.limit);
            }
        }
        compared++;
        free(ref);
        free(got.data);
        free(base.data);
    }
    /* No outputs beyond the expected ones. */
    CHECK(mha_st_count(of) == compared, "%s: output has %lld tensors, expected %d", case_name,
          (long long)mha_st_count(of), compared);
    return compared;
}

/* Whether this process writes outputs (rank 0 under mpirun). */
static bool rank_writes(void)
{
#ifdef MHA_TEST_PARALLEL
    return rank == 0;
#else
    return true;
#endif
}

static bool same_file(const char *a, const char *b)
{
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    bool same = fa && fb;
    while (same) {
        int ca = fgetc(fa), cb = fgetc(fb);
        if (ca != cb) same = false;
        if (ca == EOF) break;
    }
    if (fa) fclose(fa);
    if (fb) fclose(fb);
    return same;
}

#ifdef MHA_TEST_PARALLEL
/* Cases run, and refused for too few kv heads. */
static int parallel_runs = 0, parallel_refused = 0;

/* The case under each --parallel mode its command takes. */
static void test_case_parallel(const char *path, const char *file, mha_st_file *cf, const char *out1, const char *out2)
{
    const char *command = mha_st_metadata(cf, "command");
    bool layer = strcmp(command, "forward") == 0 || strcmp(command, "backward") == 0;
    bool sdpa = strcmp(command, "sdpa") == 0 || strcmp(command, "sdpa-backward") == 0;
    const char *const modes[2] = {layer ? "heads" : sdpa ? "ring" : NULL, sdpa ? "ulysses" : NULL};
    for (int m = 0; m < 2 && modes[m]; m++) {
        parallel_mode = modes[m];
        int rc = run_case(path, cf, out1, "1", false);
        if (rc != 0) {
            CHECK(strstr(mha_last_error(), "cannot be split over") != NULL, "%s --parallel %s: mha exited %d (%s)",
                  file, parallel_mode, rc, mha_last_error());
            parallel_refused++;
            continue;
        }
        parallel_runs++;
        mha_st_file *of = NULL;
        char what[300];
        snprintf(what, sizeof what, "%s --parallel %s on %d ranks", file, parallel_mode, size);
        if (rank == 0) CHECK_OK(mha_st_open(out1, &of));
        if (of) CHECK(compare_outputs(what, cf, of, false) > 0, "%s: nothing compared", what);
        mha_st_close(of);
        rc = run_case(path, cf, out2, "1", false);
        if (rank == 0) CHECK(rc == 0 && same_file(out1, out2), "%s: a second run gives other bits", what);
    }
    parallel_mode = NULL;
}
#endif

static void test_case(const char *dir, const char *file, const char *tmpdir)
{
    char path[1024], out1[1024], out3[1024];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    snprintf(out1, sizeof out1, "%s/out1.safetensors", tmpdir);
    snprintf(out3, sizeof out3, "%s/out3.safetensors", tmpdir);
    mha_st_file *cf = NULL, *of = NULL;
    CHECK_OK(mha_st_open(path, &cf));
    if (!cf) return;
#ifdef MHA_TEST_PARALLEL
    test_case_parallel(path, file, cf, out1, out3);
    int runs = 0;
#else
    const char *bf16_meta = mha_st_metadata(cf, "bf16");
    int runs = bf16_meta && strcmp(bf16_meta, "yes") == 0 ? 2 : 1;
#endif
    for (int bf16 = 0; bf16 < runs; bf16++) {
        int rc = run_case(path, cf, out1, "1", bf16);
        CHECK(rc == 0, "%s: mha exited %d", file, rc);
        if (rc != 0) continue;
        CHECK_OK(mha_st_open(out1, &of));
        if (of) CHECK(compare_outputs(file, cf, of, bf16) > 0, "%s: nothing compared", file);
        mha_st_close(of);
        of = NULL;
        rc = run_case(path, cf, out3, "3", bf16);
        CHECK(rc == 0 && same_file(out1, out3), "%s: 3 threads give different bits than 1", file);
    }
    mha_st_close(cf);
    if (rank_writes()) unlink(out1), unlink(out3);
}

int main(int argc, char **argv)
{
    harness_split_all();
    const char *dir = argc > 1 ? argv[1] : "tests/data/golden";
    char tmpdir[] = "/tmp/mha_golden_XXXXXX";
#ifdef MHA_TEST_PARALLEL
    mpi_begin(&argc, &argv);
    if (rank == 0 && !mkdtemp(tmpdir)) MPI_Abort(MPI_COMM_WORLD, 1);
    MPI_Bcast(tmpdir, (int)sizeof tmpdir, MPI_CHAR, 0, MPI_COMM_WORLD); /* rank 0 writes, there */
#else
    if (!mkdtemp(tmpdir)) return 1;
#endif
    DIR *d = opendir(dir);
    CHECK(d != NULL, "cannot open %s", dir);
    int cases = 0;
    for (struct dirent *e; d && (e = readdir(d));) {
        size_t len = strlen(e->d_name);
        if (len < 12 || strcmp(e->d_name + len - 12, ".safetensors") != 0) continue;
        test_case(dir, e->d_name, tmpdir);
        cases++;
    }
    if (d) closedir(d);
    CHECK(cases >= 120, "found only %d golden cases in %s", cases, dir);
#ifdef MHA_TEST_PARALLEL
    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 0) rmdir(tmpdir);
    CHECK(parallel_runs >= 60, "only %d parallel runs (%d refused)", parallel_runs, parallel_refused);
    return mpi_finish("test_golden_mpi");
#else
    rmdir(tmpdir);
    return harness_finish("test_golden");
#endif
}
