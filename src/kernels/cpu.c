/*
 * cpu.c -- which kernels this machine can run, decided once.
 *
 * A feature counts only when the CPU has it (CPUID) and the OS saves its
 * registers across context switches (XGETBV): AVX needs XMM and YMM state,
 * AVX-512 also the opmask and both halves of the ZMM state.  MHA_ISA caps
 * the choice (generic < avx2 < avx512) so tests and benchmarks can run
 * every path this machine has.
 */
#define _GNU_SOURCE

#include "kernels/kernels.h"
#include "mha.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>

static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

typedef struct cpu_features {
    bool avx2_fma, avx512, avx512_bf16;
} cpu_features;

static cpu_features detect(void)
{
    cpu_features f = {false, false, false};
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28);
    if (!osxsave || !avx) return f;
    uint64_t xcr0 = xgetbv0();
    bool ymm_state = (xcr0 & 0x6) == 0x6;   /* SSE and AVX state */
    bool zmm_state = (xcr0 & 0xe6) == 0xe6; /* plus opmask, ZMM_Hi256, Hi16_ZMM */
    if (!ymm_state || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
    bool avx2 = b & (1u << 5);
    bool avx512 = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31)); /* F DQ BW VL */
    f.avx2_fma = avx2 && fma;
    f.avx512 = f.avx2_fma && avx512 && zmm_state;
    if (f.avx512 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512_bf16 = a & (1u << 5);
    return f;
}
#else
typedef struct cpu_features {
    bool avx2_fma, avx512, avx512_bf16;
} cpu_features;

static cpu_features detect(void) { return (cpu_features){false, false, false}; }
#endif

/* Best first. */
#if defined(__x86_64__) || defined(__i386__)
static const mha__kernels *const candidates[] = {&mha__kernels_avx512, &mha__kernels_avx2, &mha__kernels_generic};

static bool runs_here(const mha__kernels *k, cpu_features f)
{
    if (k == &mha__kernels_avx512) return f.avx512;
    if (k == &mha__kernels_avx2) return f.avx2_fma;
    return true;
}
#else
static const mha__kernels *const candidates[] = {&mha__kernels_generic};

static bool runs_here(const mha__kernels *k, cpu_features f)
{
    (void)k;
    (void)f;
    return true;
}
#endif

const mha__kernels *mha__kernels_named(const char *name)
{
    cpu_features f = detect();
    for (size_t i = 0; i < sizeof candidates / sizeof candidates[0]; i++)
        if (name && strcmp(candidates[i]->name, name) == 0) return runs_here(candidates[i], f) ? candidates[i] : NULL;
    return NULL;
}

static const mha__kernels *chosen;
static pthread_once_t chosen_once = PTHREAD_ONCE_INIT;

/* The best table at or below the MHA_ISA cap. */
static void choose(void)
{
    cpu_features f = detect();
    const char *cap = getenv("MHA_ISA");
    size_t first = 0, n = sizeof candidates / sizeof candidates[0];
    for (size_t i = 0; cap && i < n; i++)
        if (strcmp(candidates[i]->name, cap) == 0) first = i;
    for (size_t i = first; i < n; i++)
        if (runs_here(candidates[i], f)) {
            chosen = candidates[i];
            return;
        }
    chosen = &mha__kernels_generic;
}

const mha__kernels *mha__kernels_get(void)
{
    pthread_once(&chosen_once, choose);
    return chosen;
}

const char *mha_isa(void) { return mha__kernels_get()->name; }

/* bf16: the native dot-product kernels where the CPU has AVX512-BF16 and
 * the float32 choice is avx512 (so MHA_ISA caps both), else the portable
 * ones. */
const mha__bf16_kernels *mha__bf16_named(const char *name)
{
    if (name && strcmp(name, "generic") == 0) return &mha__bf16_kernels_generic;
#if defined(__x86_64__) || defined(__i386__)
    if (name && strcmp(name, "avx512_bf16") == 0 && detect().avx512_bf16) return &mha__bf16_kernels_avx512;
#endif
    return NULL;
}

static const mha__bf16_kernels *chosen_bf16;
static pthread_once_t chosen_bf16_once = PTHREAD_ONCE_INIT;

static void choose_bf16(void)
{
    const mha__bf16_kernels *native = mha__bf16_named("avx512_bf16");
    chosen_bf16 = native && strcmp(mha__kernels_get()->name, "avx512") == 0 ? native : &mha__bf16_kernels_generic;
}

const mha__bf16_kernels *mha__bf16_get(void)
{
    pthread_once(&chosen_bf16_once, choose_bf16);
    return chosen_bf16;
}
