/*
 * parallel.h -- the execution context: thread count, the workspace and a
 * fork-join loop over independent work items.
 *
 * Work items are split into contiguous chunks, one per thread, and every
 * item is computed the same way whichever thread runs it, so results do
 * not depend on the thread count.
 */
#ifndef MHA_PARALLEL_H
#define MHA_PARALLEL_H

#include "core/internal.h"

/* ---------------------------------------------------------------- */
/* Workspace: plan, then compute                                      */
/* ---------------------------------------------------------------- */

/* An operation's scratch memory is one buffer in its context.  Before it
 * computes, a public entry point adds up what it and everything it calls
 * will take, each part sized by the same function that later takes it
 * (the plan), and reserves that once: the only allocation, so the only
 * NOMEM, and never inside a compute loop.  Compute then takes pieces in
 * nested scopes, each given back when its function returns
 * (mha__ws_top / mha__ws_release).  A take beyond the reservation is a
 * planning bug (INTERNAL), never a reallocation that would move a buffer
 * still in use. */

/* Adds `bytes`, rounded up to a cache line, to *total; false (with
 * INVALID_ARG's message naming `what`) when the sum overflows. */
bool mha__ws_add(int64_t *total, int64_t bytes, const char *what);
/* The bytes of `floats` floats per thread for every thread of ctx. */
bool mha__ws_add_per_thread(int64_t *total, const mha_ctx *ctx, int64_t floats, const char *what);

/* Makes room for `bytes` more from the current top.  Outside any
 * operation the buffer grows (NOMEM); inside one (a nested public call)
 * the room must be there already (INTERNAL). */
mha_status mha__ws_reserve(mha_ctx *ctx, int64_t bytes);
/* The next `bytes` of the reservation, 64-byte aligned; NULL (INTERNAL)
 * when the plan did not reserve them. */
void *mha__ws_take(mha_ctx *ctx, int64_t bytes);
/* `floats` floats for every thread, each slice 64-byte aligned and
 * *stride bytes apart; NULL as mha__ws_take. */
char *mha__ws_take_per_thread(mha_ctx *ctx, int64_t floats, int64_t *stride);
/* Where the next take starts, and giving back everything taken since. */
int64_t mha__ws_top(const mha_ctx *ctx);
void mha__ws_release(mha_ctx *ctx, int64_t top);

/* Memory kept from call to call for a library built on the core
 * (libmha_mpi), beside the workspace: its blocks in flight and exchange
 * buffers are tens of MB, the same each call, and the nested core calls
 * plan the workspace for themselves.  Freshly allocated, such a buffer
 * page-faults on every call (about 50 ms of system time a rank at N = 8192
 * in ring attention, docs/SCALING.md); kept, once.  Slot `slot` (below
 * MHA__KEPT_SLOTS) grows to `bytes` when smaller, its contents not kept;
 * NULL (NOMEM) when that fails.  One user a slot at a time; freed with the
 * context. */
enum { MHA__KEPT_SLOTS = 2 };
void *mha__kept(mha_ctx *ctx, int slot, int64_t bytes);

/* Calls fn(arg, thread, begin, end) on contiguous chunks covering
 * [0, n_items), one chunk per thread (fewer when there are fewer items);
 * thread numbers are 0 .. n-1 and index per-thread scratch.  Returns when
 * all chunks are done. */
typedef void (*mha__range_fn)(void *arg, int thread, int64_t begin, int64_t end);
void mha__parallel_for(mha_ctx *ctx, int64_t n_items, mha__range_fn fn, void *arg);
/* The same for items that are independent -- an item's result depends
 * neither on the thread that runs it nor on the other items in its chunk
 * -- handed out in shrinking runs as threads come free, so that a thread
 * slowed by other load on its CPU does not hold up the call.  The results
 * are the same bits however the items fall. */
void mha__parallel_items(mha_ctx *ctx, int64_t n_items, mha__range_fn fn, void *arg);
/* mha__parallel_items for items in groups of `group` consecutive ones
 * that share something a thread caches (a head's query blocks share its
 * keys and values, split once per thread): runs of whole groups while
 * more than one group a thread is left, so that two threads start on one
 * group only at the end. */
void mha__parallel_groups(mha_ctx *ctx, int64_t n_items, int64_t group, mha__range_fn fn, void *arg);

/* Bytes rounded up to whole cache lines, so threads never share one. */
int64_t mha__pad_to_line(int64_t bytes);

/* CLOCK_MONOTONIC in nanoseconds: the pool's spin and the timed peak and copy. */
int64_t mha__now_ns(void);

#endif /* MHA_PARALLEL_H */
