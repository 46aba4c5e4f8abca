/*
 * internal.h -- what every source file of libmha shares: error reporting,
 * checked size arithmetic and the allocator.  Not installed.
 */
#ifndef MHA_INTERNAL_H
#define MHA_INTERNAL_H

#include "mha.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Record a sentence for mha_last_error() and return `status`, so a failing
 * check reads as one line:  return mha__fail(MHA_ERR_INVALID_ARG, "...", x); */
mha_status mha__fail(mha_status status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Like mha__fail, but prefixes the current message: "while X: <old>". */
mha_status mha__wrap(mha_status status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Checked arithmetic on sizes: false on overflow or a negative operand. */
static inline bool mha__mul(int64_t a, int64_t b, int64_t *out)
{
    if (a < 0 || b < 0) return false;
    return !__builtin_mul_overflow(a, b, out);
}

static inline bool mha__add(int64_t a, int64_t b, int64_t *out)
{
    if (a < 0 || b < 0) return false;
    return !__builtin_add_overflow(a, b, out);
}

static inline int64_t mha__max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t mha__min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Product of n non-negative sizes; false on overflow. */
bool mha__product(const int64_t *dims, int n, int64_t *out);

/* How many times mha__alloc has been called in this process (tests). */
int64_t mha__allocations(void);
#ifdef MHA_FAULT_INJECTION
/* Test builds (-DMHA_FAULT_INJECTION=ON): the nth allocation from now
 * fails (0: none); is that failure still to come? */
void mha__inject_alloc_failure(int64_t nth);
bool mha__alloc_failure_pending(void);
#endif
/* 64-byte aligned allocation of count * size bytes, overflow-checked;
 * NULL (with mha_last_error set) on failure.  Zero bytes still gives a
 * unique pointer.  Free with mha__free. */
void *mha__alloc(int64_t count, size_t size);
void *mha__calloc(int64_t count, size_t size);
void mha__free(void *ptr);

/* strdup through the allocator. */
char *mha__strdup(const char *s);

#endif /* MHA_INTERNAL_H */
