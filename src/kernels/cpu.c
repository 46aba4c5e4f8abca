/*
 * cpu.c -- which kernels this machine can run, decided once.
 *
 * A feature counts only when the CPU has it (CPUID) and the OS saves its
 * registers across context switches (XGETBV): AVX needs XMM and YMM state,
 * AVX-512 also the opmask and both halves of the ZMM state, AMX the tile
 * configuration and data (and Linux's permission, asked for once).  MHA_ISA
 * caps the choice (generic < avx2 < avx512 < amx) so tests and benchmarks
 * can run every path this machine has.
 */
#define _GNU_SOURCE

#include "kernels/kernels.h"
#include "mha.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

typedef struct cpu_features {
    bool avx2_fma, avx512, avx512_bf16, amx_bf16;
} cpu_features;

/* Linux hands out the AMX tile data state (8 KB per thread) only to a
 * process that asks for it; the request is for the whole process and may
 * be repeated.  Without it the first tile instruction faults.  Asked only
 * when the AMX kernels are about to be chosen: a process capped below them
 * (MHA_ISA) keeps the smaller signal frames. */
static bool amx_permitted(void)
{
#if defined(__linux__) && defined(SYS_arch_prctl)
    enum { ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
#else
    return false;
#endif
}

static cpu_features detect(void)
{
    cpu_features f = {false, false, false, false};
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28);
    if (!osxsave || !avx) return f;
    uint64_t xcr0 = xgetbv0();
    bool ymm_state = (xcr0 & 0x6) == 0x6;          /* SSE and AVX state */
    bool zmm_state = (xcr0 & 0xe6) == 0xe6;        /* plus opmask, ZMM_Hi256, Hi16_ZMM */
    bool tile_state = (xcr0 & 0x60000) == 0x60000; /* XTILECFG and XTILEDATA */
    if (!ymm_state || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return f;
    bool avx2 = b & (1u << 5);
    bool avx512 = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31)); /* F DQ BW VL */
    bool amx = (d & (1u << 22)) && (d & (1u << 24));                                            /* BF16, TILE */
    f.avx2_fma = avx2 && fma;
    f.avx512 = f.avx2_fma && avx512 && zmm_state;
    if (f.avx512 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) f.avx512_bf16 = a & (1u << 5);
    f.amx_bf16 = f.avx512_bf16 && amx && tile_state; /* the permission: amx_usable */
    return f;
}
#else
typedef struct cpu_features {
    bool avx2_fma, avx512, avx512_bf16, amx_bf16;
} cpu_features;

static cpu_features detect(void) { return (cpu_features){false, false, false, false}; }
#endif

/* Each instruction set with its kernels for each dtype the library
 * computes in, best first.  "amx" is avx512 for float32 with AMX tiles for
 * the bf16 products; bf16 uses the AVX512-BF16 dot products only with the
 * avx512 float32 kernels (so MHA_ISA caps both) and where the CPU has them;
 * with avx2, AVX2 cache rows beside the portable tile; the portable bf16
 * kernels everywhere else. */
typedef struct isa_entry {
    const char *name; /* MHA_ISA's values, mha_isa()'s answers */
    const mha__kernels *f32;
    const mha__bf16_kernels *bf16_native; /* NULL: the portable ones */
} isa_entry;

#if defined(__x86_64__) || defined(__i386__)
static const isa_entry candidates[] = {
    {"amx", &mha__kernels_avx512, &mha__bf16_kernels_amx},
    {"avx512", &mha__kernels_avx512, &mha__bf16_kernels_avx512},
    {"avx2", &mha__kernels_avx2, &mha__bf16_kernels_avx2},
    {"generic", &mha__kernels_generic, NULL},
};

static bool f32_here(const mha__kernels *k, cpu_features f)
{
    if (k == &mha__kernels_avx512) return f.avx512;
    if (k == &mha__kernels_avx2) return f.avx2_fma;
    return true;
}

/* The CPU and OS can run AMX, and Linux lets this process. */
static bool amx_usable(cpu_features f) { return f.amx_bf16 && amx_permitted(); }

static bool bf16_native_here(const mha__bf16_kernels *k, cpu_features f)
{
    if (k == &mha__bf16_kernels_amx) return amx_usable(f);
    return k == &mha__bf16_kernels_avx512 ? f.avx512_bf16 : f.avx2_fma;
}

/* An entry that only adds a bf16 path (amx) needs that path; the others
 * need their float32 kernels, their bf16 kernels falling back to the
 * portable ones. */
static bool runs_here(const isa_entry *e, cpu_features f)
{
    if (!f32_here(e->f32, f)) return false;
    return e->bf16_native != &mha__bf16_kernels_amx || bf16_native_here(e->bf16_native, f);
}
#else
static const isa_entry candidates[] = {{"generic", &mha__kernels_generic, NULL}};

static bool f32_here(const mha__kernels *k, cpu_features f)
{
    (void)k;
    (void)f;
    return true;
}

static bool bf16_native_here(const mha__bf16_kernels *k, cpu_features f)
{
    (void)k;
    (void)f;
    return false;
}

static bool runs_here(const isa_entry *e, cpu_features f) { return f32_here(e->f32, f); }
#endif

enum { N_CANDIDATES = sizeof candidates / sizeof candidates[0] };

const mha__kernels *mha__kernels_named(const char *name)
{
    cpu_features f = detect();
    for (size_t i = 0; i < N_CANDIDATES; i++)
        if (name && strcmp(candidates[i].f32->name, name) == 0)
            return f32_here(candidates[i].f32, f) ? candidates[i].f32 : NULL;
    return NULL;
}

static mha__isa_kernels chosen;
static const char *chosen_name;
/* The L2 assumed where the system does not say: the smallest of the CPUs
 * measured (Zen 3), so blocking sized by it errs towards staying in cache. */
enum { UNKNOWN_L2 = 1 << 19 };
static int64_t chosen_l2; /* bytes */
static pthread_once_t chosen_once = PTHREAD_ONCE_INIT;

/* mha_last_level_cache_bytes (mha.h), read once, when first asked: only
 * decoding's plans and `mha bench` want it, so loading the library does
 * not open sysfs. */
static int64_t llc; /* bytes */
static pthread_once_t llc_once = PTHREAD_ONCE_INIT;

static void read_llc(void)
{
    int64_t bytes = 0;
    FILE *f = fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r");
    char unit = 'B';
    long long n = 0;
    if (f && fscanf(f, "%lld%c", &n, &unit) >= 1 && n > 0)
        bytes = unit == 'K' ? n << 10 : unit == 'M' ? n << 20 : unit == 'G' ? n << 30 : n;
    if (f) fclose(f);
#if defined(_SC_LEVEL3_CACHE_SIZE)
    if (bytes <= 0) bytes = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    llc = bytes > 0 ? bytes : INT64_C(32) << 20;
}

/* The best instruction set at or below the MHA_ISA cap, with its kernels
 * for every dtype. */
static void choose(void)
{
    cpu_features f = detect();
    const char *cap = getenv("MHA_ISA");
    size_t first = 0;
    for (size_t i = 0; cap && i < N_CANDIDATES; i++)
        if (strcmp(candidates[i].name, cap) == 0) first = i;
    size_t at = N_CANDIDATES - 1; /* generic runs everywhere */
    for (size_t i = N_CANDIDATES; i-- > first;)
        if (runs_here(&candidates[i], f)) at = i;
    const mha__bf16_kernels *native = candidates[at].bf16_native;
    chosen = (mha__isa_kernels){candidates[at].f32,
                                native && bf16_native_here(native, f) ? native : &mha__bf16_kernels_generic};
    chosen_name = candidates[at].name;
    chosen_l2 = UNKNOWN_L2;
#if defined(_SC_LEVEL2_CACHE_SIZE)
    long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE); /* glibc reads it from CPUID */
    if (l2 > 0) chosen_l2 = l2;
#endif
}

const mha__isa_kernels *mha__isa_get(void)
{
    pthread_once(&chosen_once, choose);
    return &chosen;
}

const mha__kernels *mha__kernels_get(void) { return mha__isa_get()->f32; }

const mha__bf16_kernels *mha__bf16_get(void) { return mha__isa_get()->bf16; }

int64_t mha__l2_bytes(void)
{
    mha__isa_get();
    return chosen_l2;
}

int64_t mha_last_level_cache_bytes(void)
{
    pthread_once(&llc_once, read_llc);
    return llc;
}

const char *mha_isa(void)
{
    mha__isa_get();
    return chosen_name;
}

const mha__bf16_kernels *mha__bf16_named(const char *name)
{
    if (name && strcmp(name, "generic") == 0) return &mha__bf16_kernels_generic;
#if defined(__x86_64__) || defined(__i386__)
    if (name && strcmp(name, "amx") == 0 && amx_usable(detect())) return &mha__bf16_kernels_amx;
    if (name && strcmp(name, "avx512_bf16") == 0 && detect().avx512_bf16) return &mha__bf16_kernels_avx512;
    if (name && strcmp(name, "avx2") == 0 && detect().avx2_fma) return &mha__bf16_kernels_avx2;
#endif
    return NULL;
}
