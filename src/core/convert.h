/*
 * convert.h -- element conversions between the dtypes safetensors stores
 * and float32 (dtype.c has the out-of-line ones).  Portable C; the host is assumed little-endian like the
 * format (x86-64 and AArch64 both are).
 */
#ifndef MHA_CONVERT_H
#define MHA_CONVERT_H

#include "mha.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float mha__bits_to_f32(uint32_t bits)
{
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint32_t mha__f32_to_bits(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return bits;
}

/* bfloat16 is the top half of a float32: widening is exact. */
static inline float mha__bf16_to_f32(uint16_t h) { return mha__bits_to_f32((uint32_t)h << 16); }

/* Round to nearest even; NaN stays a (quiet) NaN. */
static inline uint16_t mha__f32_to_bf16(float f)
{
    uint32_t bits = mha__f32_to_bits(f);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* IEEE binary16 -> binary32, exact for every input including subnormals,
 * infinities and NaN. */
static inline float mha__f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0x1f) return mha__bits_to_f32(sign | 0x7f800000u | (mant << 13));
    if (exp != 0) return mha__bits_to_f32(sign | ((exp + 112) << 23) | (mant << 13));
    /* Zero or subnormal: mant * 2^-24 is exact in float32. */
    float magnitude = (float)mant * 0x1p-24f;
    return sign ? -magnitude : magnitude;
}

/* Convert n elements of `dtype` at src (any alignment) to float32.
 * Integers convert by value, bools to 0 or 1. */
void mha__convert_to_f32(mha_dtype dtype, const void *src, float *dst, int64_t n);

/* The dtype safetensors names `name` ("F32", "BF16", ...), or -1. */
int mha__dtype_from_name(const char *name);

#endif /* MHA_CONVERT_H */
