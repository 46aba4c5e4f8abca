/*
 * fuzz_cli_inputs.c -- libFuzzer target: the CLI's input handling.  The
 * bytes become an --inputs file for `mha sdpa`, `mha sdpa-backward` and
 * `mha forward` (with a fixed, valid weights file) and for the weights of
 * `mha forward`: every tensor name, dtype, shape and mask the commands
 * read is checked before use, so any input must end in a clean error or a
 * result.  Output goes to a temporary file that is removed.
 */
#define _POSIX_C_SOURCE 200809L

#include "cli.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int run(char **argv, int argc)
{
    FILE *saved = stderr; /* errors are expected; keep the fuzzer's output readable */
    stderr = fopen("/dev/null", "w");
    int rc = mha_cli_main(argc, argv);
    fclose(stderr);
    stderr = saved;
    return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char in[] = "/tmp/mha_fuzz_in_XXXXXX", out[64];
    int fd = mkstemp(in);
    if (fd < 0) return 0;
    if (write(fd, data, size) != (ssize_t)size) {
        close(fd);
        unlink(in);
        return 0;
    }
    close(fd);
    snprintf(out, sizeof out, "%s.out", in);
    const char *weights =
        getenv("MHA_FUZZ_WEIGHTS") ? getenv("MHA_FUZZ_WEIGHTS") : "tests/data/golden/fwd_basic.safetensors";
    char *sdpa[] = {"mha", "sdpa", "--inputs", in, "--out", out, "--threads", "1", "--is-causal"};
    char *bwd[] = {"mha", "sdpa-backward", "--inputs", in, "--out", out, "--threads", "1", "--enable-gqa"};
    char *fwd[] = {"mha", "forward",   "--weights", (char *)weights, "--inputs", in, "--out", out, "--num-heads",
                   "2",   "--threads", "1",         "--need-weights"};
    char *wts[] = {"mha",   "forward", "--weights",   in,  "--inputs",  (char *)weights,
                   "--out", out,       "--num-heads", "2", "--threads", "1"};
    run(sdpa, 9);
    run(bwd, 9);
    run(fwd, 12);
    run(wts, 12);
    unlink(out);
    unlink(in);
    return 0;
}
