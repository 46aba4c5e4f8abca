/*
 * dtype.c -- the element types of the public API (names as safetensors
 * spells them, sizes) and their conversion to float32.
 */
#include "core/convert.h"

#include <string.h>

static const struct {
    const char *name;
    size_t size;
} dtype_table[MHA_DTYPE_COUNT] = {
    [MHA_DTYPE_F64] = {"F64", 8},   [MHA_DTYPE_F32] = {"F32", 4},   [MHA_DTYPE_F16] = {"F16", 2},
    [MHA_DTYPE_BF16] = {"BF16", 2}, [MHA_DTYPE_BOOL] = {"BOOL", 1}, [MHA_DTYPE_U8] = {"U8", 1},
    [MHA_DTYPE_I32] = {"I32", 4},   [MHA_DTYPE_I64] = {"I64", 8},   [MHA_DTYPE_I8] = {"I8", 1},
};

const char *mha_dtype_name(mha_dtype dtype)
{
    return (unsigned)dtype < MHA_DTYPE_COUNT ? dtype_table[dtype].name : "?";
}

size_t mha_dtype_size(mha_dtype dtype) { return (unsigned)dtype < MHA_DTYPE_COUNT ? dtype_table[dtype].size : 0; }

int mha__dtype_from_name(const char *name)
{
    for (int d = 0; d < MHA_DTYPE_COUNT; d++)
        if (strcmp(name, dtype_table[d].name) == 0) return d;
    return -1;
}

void mha__convert_to_f32(mha_dtype dtype, const void *src, float *dst, int64_t n)
{
    const unsigned char *s = src;
    size_t size = mha_dtype_size(dtype);
    for (int64_t i = 0; i < n; i++, s += size) {
        switch (dtype) {
        case MHA_DTYPE_F32: memcpy(&dst[i], s, 4); break;
        case MHA_DTYPE_F64: {
            double v;
            memcpy(&v, s, 8);
            dst[i] = (float)v;
            break;
        }
        case MHA_DTYPE_F16: {
            uint16_t v;
            memcpy(&v, s, 2);
            dst[i] = mha__f16_to_f32(v);
            break;
        }
        case MHA_DTYPE_BF16: {
            uint16_t v;
            memcpy(&v, s, 2);
            dst[i] = mha__bf16_to_f32(v);
            break;
        }
        case MHA_DTYPE_BOOL: dst[i] = *s ? 1.0f : 0.0f; break;
        case MHA_DTYPE_U8: dst[i] = (float)*s; break;
        case MHA_DTYPE_I8: dst[i] = (float)(int8_t)*s; break;
        case MHA_DTYPE_I32: {
            int32_t v;
            memcpy(&v, s, 4);
            dst[i] = (float)v;
            break;
        }
        case MHA_DTYPE_I64: {
            int64_t v;
            memcpy(&v, s, 8);
            dst[i] = (float)v;
            break;
        }
        default: dst[i] = 0; break;
        }
    }
}
