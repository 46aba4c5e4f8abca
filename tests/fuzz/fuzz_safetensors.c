/*
 * fuzz_safetensors.c -- libFuzzer target: the safetensors reader on
 * arbitrary bytes.  Opens the buffer, walks every tensor's info, reads
 * each (as float32 and raw) into a buffer of its stated size when that is
 * small, and the metadata.  Any crash, hang, leak or sanitizer report is a
 * bug; fuzz_replay.c runs the same function over files without libFuzzer.
 */
#include "mha.h"

#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    mha_st_file *f = NULL;
    if (mha_st_open_memory(data, size, &f) != MHA_OK) return 0;
    (void)mha_st_metadata(f, "command");
    for (int64_t i = 0; i < mha_st_count(f); i++) {
        mha_st_info info;
        if (mha_st_info_at(f, i, &info) != MHA_OK) continue;
        if (info.numel > (1 << 20)) continue; /* sizes are validated against the buffer; keep runs fast */
        float *dst = malloc((size_t)(info.numel ? info.numel : 1) * sizeof(float) * 2);
        if (!dst) continue;
        (void)mha_st_read_f32(f, info.name, dst, info.numel);
        (void)mha_st_read_raw(f, info.name, dst, (size_t)(info.numel ? info.numel : 1) * sizeof(float) * 2);
        (void)mha_st_read_f32(f, info.name, dst, info.numel ? info.numel - 1 : 0); /* too small: refused */
        free(dst);
    }
    mha_st_close(f);
    return 0;
}
