/*
 * _core.c -- the C side of the Python package: libmha's calls on Python
 * buffers (the buffer protocol: numpy arrays, or anything exporting
 * float32 / bool memory), with the GIL released while they compute.
 *
 * Arguments arrive checked and shaped by the Python side (mha/_arrays.py):
 * this file only reads buffers in place, maps a library status to a Python
 * exception carrying the library's sentence, and keeps contexts (thread
 * pools) for reuse.  A context serves one call at a time (mha.h), so
 * concurrent calls from several Python threads each take their own from
 * a small pool; the pool is only touched with the GIL held.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "mha.h"

/* ---- errors --------------------------------------------------------- */

static PyObject *MhaError; /* base of the package's own exceptions */

/* The Python exception for a library status, with mha_last_error()'s
 * sentence (read on the thread that made the call). */
static PyObject *raise_status(mha_status st)
{
    PyObject *type = PyExc_RuntimeError;
    switch (st) {
    case MHA_ERR_INVALID_ARG: type = PyExc_ValueError; break;
    case MHA_ERR_NOMEM: type = PyExc_MemoryError; break;
    case MHA_ERR_IO: type = PyExc_OSError; break;
    case MHA_ERR_CORRUPT: type = PyExc_ValueError; break;
    case MHA_ERR_NOT_FOUND: type = PyExc_KeyError; break;
    case MHA_ERR_UNSUPPORTED: type = PyExc_NotImplementedError; break;
    case MHA_ERR_MISUSE: type = MhaError; break;
    default: break;
    }
    PyErr_SetString(type, mha_last_error());
    return NULL;
}

/* ---- contexts -------------------------------------------------------- */

enum { POOL = 16 };
static struct {
    int threads;
    mha_ctx *ctx;
} pool[POOL];
static int pool_len;

/* A context with `threads` workers (0: all CPUs), from the pool or new;
 * NULL with an exception set.  GIL held. */
static mha_ctx *take_ctx(int threads)
{
    for (int i = pool_len - 1; i >= 0; i--)
        if (pool[i].threads == threads) {
            mha_ctx *ctx = pool[i].ctx;
            pool[i] = pool[--pool_len];
            return ctx;
        }
    mha_ctx *ctx = NULL;
    mha_status st = mha_ctx_create(threads, &ctx);
    if (st != MHA_OK) raise_status(st);
    return ctx;
}

/* Back to the pool (or freed when it is full).  GIL held. */
static void give_ctx(int threads, mha_ctx *ctx)
{
    if (!ctx) return;
    if (pool_len == POOL) {
        mha_ctx_free(ctx);
        return;
    }
    pool[pool_len].threads = threads;
    pool[pool_len++].ctx = ctx;
}

/* ---- buffers --------------------------------------------------------- */

/* The buffers one call holds, released together. */
typedef struct held {
    Py_buffer views[16];
    int n;
} held;

static void release(held *h)
{
    for (int i = 0; i < h->n; i++) PyBuffer_Release(&h->views[i]);
    h->n = 0;
}

/* obj's memory as a view of up to 4 dimensions whose items are `format`
 * (of `itemsize` bytes), padded on the left to 4; strides must be
 * non-negative multiples of the item size.  Python's side guarantees it,
 * so a failure here is a bug there: TypeError naming the argument. */
static Py_buffer *view_of(held *h, PyObject *obj, const char *what, const char *format, Py_ssize_t itemsize,
                          int writable, int64_t shape[4], int64_t stride[4])
{
    Py_buffer *v = &h->views[h->n];
    if (PyObject_GetBuffer(obj, v, writable ? PyBUF_RECORDS : PyBUF_RECORDS_RO) != 0) return NULL;
    h->n++;
    bool ok = v->ndim >= 1 && v->ndim <= 4 && v->itemsize == itemsize && v->format && strcmp(v->format, format) == 0;
    for (int d = 0; ok && d < v->ndim; d++) ok = v->strides[d] >= 0 && v->strides[d] % v->itemsize == 0;
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s: a buffer of up to 4 dimensions with items '%s' was expected, got '%s'", what,
                     format, v->format ? v->format : "?");
        return NULL;
    }
    int pad = 4 - v->ndim;
    for (int d = 0; d < 4; d++) {
        shape[d] = d < pad ? 1 : v->shape[d - pad];
        stride[d] = d < pad ? 0 : v->strides[d - pad] / v->itemsize;
    }
    return v;
}

/* A float32 tensor view of obj (writable for outputs). */
static bool tensor_of(held *h, PyObject *obj, const char *what, int writable, mha_tensor *t)
{
    Py_buffer *v = view_of(h, obj, what, "f", 4, writable, t->shape, t->stride);
    if (v) t->data = v->buf;
    return v != NULL;
}

/* The mask: None, a bool buffer (True = may attend) or a float32 one
 * (added to the scores), any strides (0 broadcasts). */
static bool mask_of(held *h, PyObject *obj, mha_mask *m)
{
    memset(m, 0, sizeof *m);
    if (obj == Py_None) return true;
    int64_t shape[4];
    bool is_bool = false;
    Py_buffer probe;
    if (PyObject_GetBuffer(obj, &probe, PyBUF_RECORDS_RO) != 0) return false;
    is_bool = probe.format && strcmp(probe.format, "?") == 0;
    PyBuffer_Release(&probe);
    Py_buffer *v = view_of(h, obj, "attn_mask", is_bool ? "?" : "f", is_bool ? 1 : 4, 0, shape, m->stride);
    if (!v) return false;
    m->kind = is_bool ? MHA_MASK_KEEP : MHA_MASK_ADD;
    m->data = v->buf;
    return true;
}

/* ---- checking results -------------------------------------------------- */

static int64_t numel(const mha_tensor *t) { return t->shape[0] * t->shape[1] * t->shape[2] * t->shape[3]; }

/* Does any of the n floats at p (contiguous) fail to be finite?  One pass
 * over an output just written: NaN or Inf in an input that reached a
 * result shows up here, at the cost of reading the output once. */
static bool has_nonfinite(const float *p, int64_t n)
{
    unsigned bad = 0;
    for (int64_t i = 0; i < n; i++) bad |= !(p[i] - p[i] == 0.0f); /* false for NaN and +-Inf */
    return bad != 0;
}

/* ---- the calls -------------------------------------------------------- */

/* The descriptor from the Python side's positional values. */
static bool desc_of(held *h, PyObject *mask, double scale, int causal, long long wl, long long wr, double softcap,
                    PyObject *alibi, int enable_gqa, int bf16, mha_attn_desc *d)
{
    mha_attn_desc_init(d);
    d->scale = scale;
    d->causal = (mha_causal)causal;
    d->window_left = wl;
    d->window_right = wr;
    d->softcap = (float)softcap;
    d->enable_gqa = enable_gqa;
    d->dtype = bf16 ? MHA_DTYPE_BF16 : MHA_DTYPE_F32;
    if (!mask_of(h, mask, &d->mask)) return false;
    if (alibi != Py_None) {
        mha_tensor t;
        if (!tensor_of(h, alibi, "alibi_slopes", 0, &t)) return false;
        d->alibi_slopes = t.data;
    }
    return true;
}

/* attention(out, lse, q, k, v, mask, scale, causal, window_left,
 *           window_right, softcap, alibi, enable_gqa, bf16, threads)
 * -> True when every output value is finite. */
static PyObject *py_attention(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *out, *lse, *q, *k, *v, *mask, *alibi;
    double scale, softcap;
    int causal, gqa, bf16, threads;
    long long wl, wr;
    if (!PyArg_ParseTuple(args, "OOOOOOdiLLdOppi", &out, &lse, &q, &k, &v, &mask, &scale, &causal, &wl, &wr, &softcap,
                          &alibi, &gqa, &bf16, &threads))
        return NULL;
    held h = {.n = 0};
    mha_tensor to, tl, tq, tk, tv;
    mha_attn_desc d;
    bool ok = tensor_of(&h, out, "out", 1, &to) && tensor_of(&h, lse, "lse", 1, &tl) &&
              tensor_of(&h, q, "query", 0, &tq) && tensor_of(&h, k, "key", 0, &tk) &&
              tensor_of(&h, v, "value", 0, &tv) &&
              desc_of(&h, mask, scale, causal, wl, wr, softcap, alibi, gqa, bf16, &d);
    mha_ctx *ctx = ok ? take_ctx(threads) : NULL;
    if (!ctx) {
        release(&h);
        return NULL;
    }
    mha_status st;
    bool finite = true;
    int64_t n_out = numel(&to);
    PyThreadState *gil = PyEval_SaveThread(); /* compute without the GIL */
    st = mha_attention(ctx, &to, tl.data, &tq, &tk, &tv, &d);
    if (st == MHA_OK) finite = !has_nonfinite(to.data, n_out);
    PyEval_RestoreThread(gil);
    give_ctx(threads, ctx);
    release(&h);
    if (st != MHA_OK) return raise_status(st);
    return PyBool_FromLong(finite);
}

/* attention_backward(dq, dk, dv, q, k, v, out, lse, grad_out, mask, scale,
 *                    causal, window_left, window_right, softcap, alibi,
 *                    enable_gqa, threads) -> True when the gradients are
 * finite. */
static PyObject *py_attention_backward(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *dq, *dk, *dv, *q, *k, *v, *out, *lse, *go, *mask, *alibi;
    double scale, softcap;
    int causal, gqa, threads;
    long long wl, wr;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOdiLLdOpi", &dq, &dk, &dv, &q, &k, &v, &out, &lse, &go, &mask, &scale,
                          &causal, &wl, &wr, &softcap, &alibi, &gqa, &threads))
        return NULL;
    held h = {.n = 0};
    mha_tensor tdq, tdk, tdv, tq, tk, tv, to, tl, tg;
    mha_attn_desc d;
    bool ok =
        tensor_of(&h, dq, "dq", 1, &tdq) && tensor_of(&h, dk, "dk", 1, &tdk) && tensor_of(&h, dv, "dv", 1, &tdv) &&
        tensor_of(&h, q, "query", 0, &tq) && tensor_of(&h, k, "key", 0, &tk) && tensor_of(&h, v, "value", 0, &tv) &&
        tensor_of(&h, out, "out", 0, &to) && tensor_of(&h, lse, "lse", 0, &tl) &&
        tensor_of(&h, go, "grad_out", 0, &tg) && desc_of(&h, mask, scale, causal, wl, wr, softcap, alibi, gqa, 0, &d);
    mha_ctx *ctx = ok ? take_ctx(threads) : NULL;
    if (!ctx) {
        release(&h);
        return NULL;
    }
    mha_status st;
    bool finite = true;
    PyThreadState *gil = PyEval_SaveThread(); /* compute without the GIL */
    st = mha_attention_backward(ctx, &tdq, &tdk, &tdv, &tq, &tk, &tv, &to, tl.data, &tg, &d);
    const mha_tensor *grads[3] = {&tdq, &tdk, &tdv};
    for (int i = 0; i < 3 && st == MHA_OK; i++) finite = finite && !has_nonfinite(grads[i]->data, numel(grads[i]));
    PyEval_RestoreThread(gil);
    give_ctx(threads, ctx);
    release(&h);
    if (st != MHA_OK) return raise_status(st);
    return PyBool_FromLong(finite);
}

static PyObject *py_isa(PyObject *self, PyObject *noargs)
{
    (void)self, (void)noargs;
    return PyUnicode_FromString(mha_isa());
}

static PyMethodDef METHODS[] = {
    {"attention", py_attention, METH_VARARGS, "mha_attention on buffers (see mha/functional.py)"},
    {"attention_backward", py_attention_backward, METH_VARARGS, "mha_attention_backward on buffers"},
    {"isa", py_isa, METH_NOARGS, "the kernels this CPU runs: generic, avx2 or avx512"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT, "mha._core", "libmha's calls on buffers", -1, METHODS, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__core(void)
{
    PyObject *m = PyModule_Create(&MODULE);
    if (!m) return NULL;
    MhaError = PyErr_NewExceptionWithDoc("mha.MhaError",
                                         "A call libmha refused as misuse (an object used wrongly or too early).",
                                         PyExc_RuntimeError, NULL);
    if (!MhaError || PyModule_AddObjectRef(m, "MhaError", MhaError) < 0 ||
        PyModule_AddStringConstant(m, "version", mha_version()) < 0) {
        Py_XDECREF(m);
        return NULL;
    }
    return m;
}
