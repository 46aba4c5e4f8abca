/*
 * status.c -- status names, the thread-local last-error sentence, the
 * version string and the allocator every other file goes through.
 */
#define _DEFAULT_SOURCE /* madvise */
#include "core/internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>

static const char *const status_names[] = {
    [MHA_OK] = "ok",
    [MHA_ERR_INVALID_ARG] = "invalid argument",
    [MHA_ERR_MISUSE] = "library misuse",
    [MHA_ERR_NOMEM] = "out of memory",
    [MHA_ERR_IO] = "input/output error",
    [MHA_ERR_CORRUPT] = "malformed file",
    [MHA_ERR_UNSUPPORTED] = "unsupported",
    [MHA_ERR_NOT_FOUND] = "not found",
    [MHA_ERR_INTERNAL] = "internal error",
};

const char *mha_status_str(mha_status status)
{
    if ((unsigned)status >= sizeof status_names / sizeof status_names[0]) return "unknown status";
    return status_names[status];
}

const char *mha_version(void) { return MHA_VERSION_STRING; }

/* One sentence per thread; long enough for any message we format. */
static _Thread_local char last_error[512];

const char *mha_last_error(void) { return last_error; }

mha_status mha__fail(mha_status status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

mha_status mha__wrap(mha_status status, const char *fmt, ...)
{
    char prefix[256], old[sizeof last_error];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, last_error, sizeof old);
    /* "prefix: old", cut to fit (by hand: truncation is intended here). */
    snprintf(last_error, sizeof last_error, "%s: ", prefix);
    size_t used = strlen(last_error), len = strlen(old);
    if (len > sizeof last_error - 1 - used) len = sizeof last_error - 1 - used;
    memcpy(last_error + used, old, len);
    last_error[used + len] = '\0';
    return status;
}

bool mha__product(const int64_t *dims, int n, int64_t *out)
{
    int64_t p = 1;
    for (int i = 0; i < n; i++)
        if (!mha__mul(p, dims[i], &p)) return false;
    *out = p;
    return true;
}

enum { ALIGNMENT = 64 };

/* Allocations of a huge page or more start on one, take whole ones, and
 * ask the kernel to back them with huge pages (transparent huge pages,
 * "madvise" mode, the default of Debian's kernel): a layer's activations
 * and workspace stream through the TLB many megabytes a call, and with
 * 4 KiB pages a pass over data from memory paid a page walk every 4 KiB
 * (a nested one, in a virtual machine).  Measured on Sapphire Rapids
 * (bench/compare_builds.py, 5 rounds): layer S3 1.036x, S4 1.046x,
 * backward S1-S3 1.025-1.047x, decode 1.034x (docs/PERFORMANCE.md).  The
 * kernel may not honour the advice; nothing depends on it. */
enum { HUGE_PAGE = 2 << 20 };

static void *aligned_block(size_t bytes)
{
#ifdef MADV_HUGEPAGE
    if (bytes >= HUGE_PAGE) {
        size_t whole = (bytes + HUGE_PAGE - 1) / HUGE_PAGE * HUGE_PAGE;
        void *p = aligned_alloc(HUGE_PAGE, whole);
        if (p) (void)madvise(p, whole, MADV_HUGEPAGE);
        return p;
    }
#endif
    return aligned_alloc(ALIGNMENT, bytes);
}

/* Allocations made so far, for tests that check a loop allocates nothing. */
static _Atomic int64_t allocations;

int64_t mha__allocations(void) { return allocations; }

#ifdef MHA_FAULT_INJECTION
/* > 0: the allocation that brings it to 0 fails (test builds only). */
static _Atomic int64_t failure_countdown;

void mha__inject_alloc_failure(int64_t nth) { failure_countdown = nth; }

bool mha__alloc_failure_pending(void) { return failure_countdown > 0; }
#endif

void *mha__alloc(int64_t count, size_t size)
{
    allocations++;
#ifdef MHA_FAULT_INJECTION
    if (failure_countdown > 0 && atomic_fetch_sub(&failure_countdown, 1) == 1) {
        mha__fail(MHA_ERR_NOMEM, "out of memory (an injected allocation failure)");
        return NULL;
    }
#endif
    int64_t bytes;
    if (!mha__mul(count, (int64_t)size, &bytes) || bytes > INT64_MAX - ALIGNMENT) {
        mha__fail(MHA_ERR_NOMEM, "cannot allocate %lld elements of %zu bytes: size overflows", (long long)count, size);
        return NULL;
    }
    /* aligned_alloc wants a multiple of the alignment and a non-zero size. */
    size_t rounded = ((size_t)bytes + ALIGNMENT - 1) / ALIGNMENT * ALIGNMENT;
    if (rounded == 0) rounded = ALIGNMENT;
    void *p = aligned_block(rounded);
    if (!p) mha__fail(MHA_ERR_NOMEM, "out of memory allocating %lld bytes", (long long)bytes);
    return p;
}

void *mha__calloc(int64_t count, size_t size)
{
    void *p = mha__alloc(count, size);
    if (p) memset(p, 0, (size_t)count * size);
    return p;
}

void mha__free(void *ptr) { free(ptr); }

char *mha__strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = mha__alloc((int64_t)n, 1);
    if (p) memcpy(p, s, n);
    return p;
}
