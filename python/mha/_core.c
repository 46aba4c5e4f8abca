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

/* A view's shape and strides (in bytes) of 1 to 4 dimensions as the
 * library's: strides in items, both padded on the left to 4.  False when
 * a stride is negative or not a whole number of items. */
static bool padded_dims(int ndim, const Py_ssize_t *shape, const Py_ssize_t *strides, Py_ssize_t itemsize,
                        int64_t shape4[4], int64_t stride4[4])
{
    if (ndim < 1 || ndim > 4) return false;
    int pad = 4 - ndim;
    for (int d = 0; d < 4; d++) {
        if (d >= pad && (strides[d - pad] < 0 || strides[d - pad] % itemsize != 0)) return false;
        shape4[d] = d < pad ? 1 : shape[d - pad];
        stride4[d] = d < pad ? 0 : strides[d - pad] / itemsize;
    }
    return true;
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
    if (v->itemsize != itemsize || !v->format || strcmp(v->format, format) != 0 ||
        !padded_dims(v->ndim, v->shape, v->strides, itemsize, shape, stride)) {
        PyErr_Format(PyExc_TypeError, "%s: a buffer of up to 4 dimensions with items '%s' was expected, got '%s'", what,
                     format, v->format ? v->format : "?");
        return NULL;
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

static bool plain_buffer(mha_py_held *h, PyObject *obj, mha_tensor *t, int *rank)
{
    Py_buffer *v = &h->views[h->n];
    if (PyObject_GetBuffer(obj, v, PyBUF_RECORDS_RO) != 0) {
        PyErr_Clear();
        return false;
    }
    h->n++;
    *rank = v->ndim;
    t->data = v->buf;
    return v->ndim >= 2 && v->itemsize == 4 && v->format && strcmp(v->format, "f") == 0 &&
           padded_dims(v->ndim, v->shape, v->strides, v->itemsize, t->shape, t->stride);
}

/* ---- torch tensors, read in place ----------------------------------- */

/* What a plain torch tensor is, as mha.torch registers it: its exact types
 * (a subclass may give its memory another meaning through
 * __torch_function__), and the float32 dtype and strided layout objects.
 * Reading data_ptr(), shape and stride() costs the PyTorch drop-in's
 * plain calls a third of what three .numpy() views did (0.73 us each). */
static PyObject *torch_types, *torch_float32, *torch_strided;
static PyObject *name_dtype, *name_layout, *name_is_cpu, *name_is_neg, *name_shape, *name_stride, *name_data_ptr;

static PyObject *py_use_torch(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *types, *float32, *strided;
    if (!PyArg_ParseTuple(args, "O!OO", &PyTuple_Type, &types, &float32, &strided)) return NULL;
    PyObject *old[3] = {torch_types, torch_float32, torch_strided};
    torch_types = Py_NewRef(types);
    torch_float32 = Py_NewRef(float32);
    torch_strided = Py_NewRef(strided);
    for (int i = 0; i < 3; i++) Py_XDECREF(old[i]);
    Py_RETURN_NONE;
}

static bool is_torch_type(PyObject *obj)
{
    if (!torch_types) return false;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(torch_types); i++)
        if ((PyObject *)Py_TYPE(obj) == PyTuple_GET_ITEM(torch_types, i)) return true;
    return false;
}

/* Whether obj.name (or obj.name() with `call`) is `want`. */
static bool attr_is(PyObject *obj, PyObject *name, bool call, PyObject *want)
{
    PyObject *got = call ? PyObject_CallMethodNoArgs(obj, name) : PyObject_GetAttr(obj, name);
    if (!got) PyErr_Clear();
    bool same = got == want;
    Py_XDECREF(got);
    return same;
}

/* A tuple of up to 4 non-negative ints into dims; its length, or -1. */
static int int_tuple(PyObject *tuple, Py_ssize_t dims[4])
{
    if (!tuple || !PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) > 4) return -1;
    int n = (int)PyTuple_GET_SIZE(tuple);
    for (int d = 0; d < n; d++) {
        dims[d] = PyLong_AsSsize_t(PyTuple_GET_ITEM(tuple, d));
        if (dims[d] < 0) {
            PyErr_Clear();
            return -1;
        }
    }
    return n;
}

static bool plain_torch(PyObject *obj, mha_tensor *t, int *rank)
{
    /* The neg bit (torch._neg_view) marks memory to be read negated. */
    if (!attr_is(obj, name_dtype, false, torch_float32) || !attr_is(obj, name_layout, false, torch_strided) ||
        !attr_is(obj, name_is_cpu, false, Py_True) || !attr_is(obj, name_is_neg, true, Py_False))
        return false;
    PyObject *shape = PyObject_GetAttr(obj, name_shape);
    PyObject *stride = shape ? PyObject_CallMethodNoArgs(obj, name_stride) : NULL;
    PyObject *address = stride ? PyObject_CallMethodNoArgs(obj, name_data_ptr) : NULL;
    Py_ssize_t dims[4], strides[4];
    int n = int_tuple(shape, dims);
    bool ok =
        address && n >= 2 && n == int_tuple(stride, strides) && padded_dims(n, dims, strides, 1, t->shape, t->stride);
    t->data = ok ? PyLong_AsVoidPtr(address) : NULL;
    ok = ok && t->data; /* an empty tensor's: the checked path decides */
    *rank = n;
    Py_XDECREF(shape);
    Py_XDECREF(stride);
    Py_XDECREF(address);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return false;
    }
    return ok;
}

bool mha_py_plain_tensor(mha_py_held *h, PyObject *obj, mha_tensor *t, int *rank)
{
    if (is_torch_type(obj)) return plain_torch(obj, t, rank);
    return PyObject_CheckBuffer(obj) && plain_buffer(h, obj, t, rank);
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
    {"use_torch", py_use_torch, METH_VARARGS,
     "register (tensor types), float32 and strided: plain tensors read in place"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT, "mha._core", "libmha's calls on buffers", -1, METHODS, NULL, NULL, NULL, NULL};

/* The attribute names plain_torch reads, interned once. */
static bool intern_names(void)
{
    struct {
        PyObject **name;
        const char *text;
    } names[] = {{&name_dtype, "dtype"},      {&name_layout, "layout"}, {&name_is_cpu, "is_cpu"},
                 {&name_is_neg, "is_neg"},    {&name_shape, "shape"},   {&name_stride, "stride"},
                 {&name_data_ptr, "data_ptr"}};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!*names[i].name && !(*names[i].name = PyUnicode_InternFromString(names[i].text))) return false;
    return true;
}

PyMODINIT_FUNC PyInit__core(void)
{
    if (!intern_names()) return NULL;
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
