/*
 * _core.c -- the C side of the Python package, mha._core: libmha's calls
 * on Python buffers (the buffer protocol: numpy arrays, or anything
 * exporting float32 / bool memory), with the GIL released while they
 * compute.  This file holds what the others share (_core.h): statuses as
 * exceptions, the context pool, buffers as tensors; _sdpa.c, _layer.c and
 * _io.c hold the calls.
 *
 * Arguments arrive checked and shaped by the Python side (mha/_arrays.py):
 * the C side reads buffers in place and maps a library status to a Python
 * exception carrying the library's sentence.  A context (thread pool)
 * serves one call at a time (mha.h), so concurrent calls from several
 * Python threads each take their own from a small pool, which is only
 * touched with the GIL held.
 */
#include "_core.h"

#include <float.h>
#include <math.h>
#include <string.h>

/* ---- errors --------------------------------------------------------- */

PyObject *mha_py_error;

PyObject *mha_py_raise(mha_status st)
{
    PyObject *type = PyExc_RuntimeError;
    switch (st) {
    case MHA_ERR_INVALID_ARG: type = PyExc_ValueError; break;
    case MHA_ERR_NOMEM: type = PyExc_MemoryError; break;
    case MHA_ERR_IO: type = PyExc_OSError; break;
    case MHA_ERR_CORRUPT: type = PyExc_ValueError; break;
    case MHA_ERR_NOT_FOUND: type = PyExc_KeyError; break;
    case MHA_ERR_UNSUPPORTED: type = PyExc_NotImplementedError; break;
    case MHA_ERR_MISUSE: type = mha_py_error; break;
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

mha_ctx *mha_py_take_ctx(int threads)
{
    for (int i = pool_len - 1; i >= 0; i--)
        if (pool[i].threads == threads) {
            mha_ctx *ctx = pool[i].ctx;
            pool[i] = pool[--pool_len];
            return ctx;
        }
    mha_ctx *ctx = NULL;
    mha_status st = mha_ctx_create(threads, &ctx);
    if (st != MHA_OK) mha_py_raise(st);
    return ctx;
}

/* Back to the pool, or freed when it is full. */
void mha_py_give_ctx(int threads, mha_ctx *ctx)
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

void mha_py_release(mha_py_held *h)
{
    for (int i = 0; i < h->n; i++) PyBuffer_Release(&h->views[i]);
    h->n = 0;
}

/* obj's memory as a view of up to 4 dimensions whose items are `format`
 * (of `itemsize` bytes), padded on the left to 4; strides must be
 * non-negative multiples of the item size.  Python's side guarantees it,
 * so a failure here is a bug there: TypeError naming the argument. */
static Py_buffer *view_of(mha_py_held *h, PyObject *obj, const char *what, const char *format, Py_ssize_t itemsize,
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

bool mha_py_tensor(mha_py_held *h, PyObject *obj, const char *what, int writable, mha_tensor *t)
{
    Py_buffer *v = view_of(h, obj, what, "f", 4, writable, t->shape, t->stride);
    if (v) t->data = v->buf;
    return v != NULL;
}

bool mha_py_tensor3(mha_py_held *h, PyObject *obj, const char *what, int writable, mha_tensor *t)
{
    if (!mha_py_tensor(h, obj, what, writable, t)) return false;
    if (h->views[h->n - 1].ndim != 3) {
        PyErr_Format(PyExc_TypeError, "%s: a buffer of 3 dimensions was expected", what);
        return false;
    }
    for (int d = 0; d < 3; d++) t->shape[d] = t->shape[d + 1], t->stride[d] = t->stride[d + 1];
    t->shape[3] = 1, t->stride[3] = 0; /* the library's rank-3 convention */
    return true;
}

bool mha_py_mask(mha_py_held *h, PyObject *obj, const char *what, mha_mask *m)
{
    memset(m, 0, sizeof *m);
    if (obj == Py_None) return true;
    int64_t shape[4];
    bool is_bool = false;
    Py_buffer probe;
    if (PyObject_GetBuffer(obj, &probe, PyBUF_RECORDS_RO) != 0) return false;
    is_bool = probe.format && strcmp(probe.format, "?") == 0;
    PyBuffer_Release(&probe);
    Py_buffer *v = view_of(h, obj, what, is_bool ? "?" : "f", is_bool ? 1 : 4, 0, shape, m->stride);
    if (!v) return false;
    m->kind = is_bool ? MHA_MASK_KEEP : MHA_MASK_ADD;
    m->data = v->buf;
    return true;
}

/* ---- checking results -------------------------------------------------- */

int64_t mha_py_numel(const mha_tensor *t) { return t->shape[0] * t->shape[1] * t->shape[2] * t->shape[3]; }

/* NaN or Inf in an input that reached a result shows up in the output:
 * reading the output once finds it.  The test is on the bits (exponent
 * all ones), in blocks of a fixed count so that the compiler makes it
 * vector compares and ORs: a scalar loop took 0.4 ms of a 32 ms training
 * step of the layer at N = 512, E = 768 (docs/PERFORMANCE.md). */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
/* Compiled for AVX-512 and AVX2 too, the loader picking what the CPU has:
 * the baseline build's 16-byte compares took 155 us over an S2 output
 * (1.5 MB, much of it in the other core's cache), AVX-512's 87 us.  Two
 * checks a training step (output, then input gradient). */
#define MHA_PY_WIDEST __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MHA_PY_WIDEST
#endif

MHA_PY_WIDEST bool mha_py_nonfinite(const float *p, int64_t n)
{
    enum { BLOCK = 64 };
    const uint32_t exponent = 0x7f800000u;
    uint32_t bad = 0;
    int64_t i = 0;
    for (; i + BLOCK <= n; i += BLOCK) {
        uint32_t u[BLOCK];
        memcpy(u, p + i, sizeof u);
        for (int j = 0; j < BLOCK; j++) bad |= (u[j] & exponent) == exponent;
    }
    for (; i < n; i++) {
        uint32_t u;
        memcpy(&u, p + i, sizeof u);
        bad |= (u & exponent) == exponent;
    }
    return bad != 0;
}

/* Whether outputs[i] is outputs[j] for some j < i: a self-attention
 * call's gradients for query, key and value are one array, read once. */
static bool seen_before(mha_tensor *const *outputs, int i)
{
    for (int j = 0; j < i; j++)
        if (outputs[j] && outputs[j]->data == outputs[i]->data && mha_py_numel(outputs[j]) == mha_py_numel(outputs[i]))
            return true;
    return false;
}

bool mha_py_bad_lse(const float *p, int64_t n, bool masked_rows)
{
    const float lowest = masked_rows ? -INFINITY : -FLT_MAX;
    unsigned bad = 0;
    for (int64_t i = 0; i < n; i++) bad |= !(p[i] < INFINITY && p[i] >= lowest); /* true for NaN */
    return bad != 0;
}

PyObject *mha_py_run(mha_py_held *h, bool ok, int threads, mha_py_job job, void *arg, mha_tensor *const *outputs,
                     int n_outputs)
{
    mha_ctx *ctx = ok ? mha_py_take_ctx(threads) : NULL;
    if (!ctx) {
        mha_py_release(h);
        return NULL;
    }
    PyThreadState *gil = PyEval_SaveThread(); /* compute without the GIL */
    bool finite = true;
    mha_status st = job(ctx, arg, &finite);
    for (int i = 0; i < n_outputs && st == MHA_OK; i++)
        finite = finite && (!outputs[i] || seen_before(outputs, i) ||
                            !mha_py_nonfinite(outputs[i]->data, mha_py_numel(outputs[i])));
    PyEval_RestoreThread(gil);
    mha_py_give_ctx(threads, ctx);
    mha_py_release(h);
    if (st != MHA_OK) return mha_py_raise(st);
    return PyBool_FromLong(finite);
}

PyObject *mha_py_shape(int rank, const int64_t *shape)
{
    PyObject *dims = PyTuple_New(rank);
    for (int r = 0; dims && r < rank; r++) {
        PyObject *d = PyLong_FromLongLong(shape[r]);
        if (!d) {
            Py_CLEAR(dims);
            break;
        }
        PyTuple_SET_ITEM(dims, r, d);
    }
    return dims;
}

static PyObject *py_isa(PyObject *self, PyObject *noargs)
{
    (void)self, (void)noargs;
    return PyUnicode_FromString(mha_isa());
}

static PyMethodDef METHODS[] = {
    {"isa", py_isa, METH_NOARGS, "the kernels this CPU runs: generic, avx2 or avx512"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT, "mha._core", "libmha's calls on buffers", -1, METHODS, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__core(void)
{
    PyObject *m = PyModule_Create(&MODULE);
    if (!m) return NULL;
    mha_py_error = PyErr_NewExceptionWithDoc("mha.MhaError",
                                             "A call libmha refused as misuse (an object used wrongly or too early).",
                                             PyExc_RuntimeError, NULL);
    if (!mha_py_error || PyModule_AddObjectRef(m, "MhaError", mha_py_error) < 0 ||
        PyModule_AddStringConstant(m, "version", mha_version()) < 0 ||
        PyModule_AddFunctions(m, mha_py_sdpa_methods) < 0 || PyModule_AddFunctions(m, mha_py_layer_methods) < 0 ||
        PyModule_AddFunctions(m, mha_py_io_methods) < 0) {
        Py_XDECREF(m);
        return NULL;
    }
    return m;
}
