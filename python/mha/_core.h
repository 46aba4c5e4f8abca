/*
 * _core.h -- what the extension's files share (_core.c): status to
 * exception, the context pool, and reading Python buffers as libmha
 * tensors and masks.  Every function here runs with the GIL held.
 */
#ifndef MHA_PY_CORE_H
#define MHA_PY_CORE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdbool.h>

#include "mha.h"

/* mha.MhaError: a call libmha refused as misuse. */
extern PyObject *mha_py_error;

/* Sets the Python exception for a library status, with mha_last_error()'s
 * sentence (read on the thread that made the call); returns NULL. */
PyObject *mha_py_raise(mha_status st);

/* A context with `threads` workers (0: all CPUs) for one call, and back:
 * concurrent calls never share one (mha.h: a context serves one call at a
 * time).  take returns NULL with an exception set. */
mha_ctx *mha_py_take_ctx(int threads);
void mha_py_give_ctx(int threads, mha_ctx *ctx);

/* The buffers one call holds, released together. */
typedef struct mha_py_held {
    Py_buffer views[24];
    int n;
} mha_py_held;
void mha_py_release(mha_py_held *h);

/* obj as a float32 tensor (up to 4 dimensions, padded on the left; any
 * non-negative strides), writable for outputs.  False with TypeError. */
bool mha_py_tensor(mha_py_held *h, PyObject *obj, const char *what, int writable, mha_tensor *t);
/* The same for a [d0, d1, d2] tensor, as the layer's calls take them
 * (shape[3] = 1, stride[3] = 0). */
bool mha_py_tensor3(mha_py_held *h, PyObject *obj, const char *what, int writable, mha_tensor *t);
/* obj's float32 memory as a tensor of 2 to 4 dimensions (padded on the
 * left as above) when it can be read exactly as it is: a buffer of items
 * 'f' with non-negative strides, or a plain CPU float32 torch tensor
 * (mha.torch registers its types: _core.use_torch).  *rank gets its dimensions.  False, with no
 * exception set, for anything else: the caller then takes the path that
 * converts and checks its arguments. */
bool mha_py_plain_tensor(mha_py_held *h, PyObject *obj, mha_tensor *t, int *rank);
/* obj (None, bool: non-zero = may attend, or float32: added) as a mask
 * over 4 dimensions, any strides (0 broadcasts). */
bool mha_py_mask(mha_py_held *h, PyObject *obj, const char *what, mha_mask *m);

/* One library call: job(ctx, arg) runs on a context from the pool with
 * the GIL released; then the outputs are checked for NaN and Inf, the
 * buffers released, and the status becomes True (finite), False (not) or
 * NULL with the exception.  A job may clear *finite itself after checks of
 * its own.  With ok false (an argument failed to convert,
 * its exception set) nothing runs. */
typedef mha_status (*mha_py_job)(mha_ctx *ctx, void *arg, bool *finite);
PyObject *mha_py_run(mha_py_held *h, bool ok, int threads, mha_py_job job, void *arg, mha_tensor *const *outputs,
                     int n_outputs);

/* (d0, d1, ...) of a shape. */
PyObject *mha_py_shape(int rank, const int64_t *shape);

int64_t mha_py_numel(const mha_tensor *t);
/* Does a contiguous output of n floats hold NaN or Inf?  (One pass.) */
bool mha_py_nonfinite(const float *p, int64_t n);
/* Does a log-sum-exp (or a row maximum) hold NaN or +Inf, or -Inf where
 * no row can be fully masked?  (-Inf is a row that saw no key.) */
bool mha_py_bad_lse(const float *p, int64_t n, bool masked_rows);

/* Each file's functions, added to the module by _core.c. */
extern PyMethodDef mha_py_sdpa_methods[], mha_py_layer_methods[], mha_py_io_methods[];

#endif /* MHA_PY_CORE_H */
