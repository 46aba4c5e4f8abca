/*
 * _io.c -- safetensors files through libmha's reader and writer, and the
 * arithmetic of `mha info` (mha/io.py turns them into dicts of arrays).
 */
#include "_core.h"

#include <string.h>

static const char *const FILE_ = "mha.st_file";

static void free_file(PyObject *cap) { mha_st_close(PyCapsule_GetPointer(cap, FILE_)); }

/* st_open(path) -> (capsule, [(name, dtype name, shape), ...]) */
static PyObject *py_st_open(PyObject *self, PyObject *args)
{
    (void)self;
    const char *path;
    if (!PyArg_ParseTuple(args, "s", &path)) return NULL;
    mha_st_file *f = NULL;
    mha_status st = mha_st_open(path, &f);
    if (st != MHA_OK) return mha_py_raise(st);
    PyObject *cap = PyCapsule_New(f, FILE_, free_file), *list = cap ? PyList_New(0) : NULL;
    if (!cap) mha_st_close(f);
    for (int64_t i = 0; list && i < mha_st_count(f); i++) {
        mha_st_info info;
        if ((st = mha_st_info_at(f, i, &info)) != MHA_OK) {
            Py_CLEAR(list);
            mha_py_raise(st);
            break;
        }
        PyObject *dims = mha_py_shape(info.rank, info.shape);
        PyObject *item = dims ? Py_BuildValue("(ssN)", info.name, mha_dtype_name(info.dtype), dims) : NULL;
        if (!item || PyList_Append(list, item) < 0) Py_CLEAR(list);
        Py_XDECREF(item);
    }
    if (!list) {
        Py_XDECREF(cap);
        return NULL;
    }
    return Py_BuildValue("(NN)", cap, list);
}

/* st_read(file, name, buffer, as_float32): the tensor's values converted
 * to float32, or its bytes as stored, into the buffer. */
static PyObject *py_st_read(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *cap, *buf;
    const char *name;
    int as_f32;
    if (!PyArg_ParseTuple(args, "OsOp", &cap, &name, &buf, &as_f32)) return NULL;
    mha_st_file *f = PyCapsule_GetPointer(cap, FILE_);
    Py_buffer v;
    if (!f || PyObject_GetBuffer(buf, &v, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) != 0) return NULL;
    mha_status st =
        as_f32 ? mha_st_read_f32(f, name, v.buf, (int64_t)(v.len / 4)) : mha_st_read_raw(f, name, v.buf, (size_t)v.len);
    PyBuffer_Release(&v);
    if (st != MHA_OK) return mha_py_raise(st);
    Py_RETURN_NONE;
}

/* The library's dtype for a safetensors dtype name, or COUNT. */
static mha_dtype dtype_named(const char *name)
{
    for (int d = 0; d < MHA_DTYPE_COUNT; d++)
        if (strcmp(mha_dtype_name((mha_dtype)d), name) == 0) return (mha_dtype)d;
    return MHA_DTYPE_COUNT;
}

/* One tensor of st_save's list: (name, dtype name, shape, C-contiguous buffer). */
static mha_status add_tensor(mha_st_writer *w, PyObject *item)
{
    const char *name, *dtype;
    PyObject *shape, *buf;
    if (!PyArg_ParseTuple(item, "ssOO", &name, &dtype, &shape, &buf)) return MHA_ERR_INTERNAL;
    int64_t dims[MHA_ST_MAX_RANK];
    Py_ssize_t rank = PyTuple_Size(shape);
    for (Py_ssize_t r = 0; r < rank && r < MHA_ST_MAX_RANK; r++)
        dims[r] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, r));
    Py_buffer v;
    if (PyErr_Occurred() || PyObject_GetBuffer(buf, &v, PyBUF_C_CONTIGUOUS) != 0) return MHA_ERR_INTERNAL;
    mha_status st = mha_st_writer_add(w, name, dtype_named(dtype), (int)rank, dims, v.buf);
    PyBuffer_Release(&v);
    return st;
}

/* st_save(path, [(name, dtype name, shape, buffer), ...], metadata dict) */
static PyObject *py_st_save(PyObject *self, PyObject *args)
{
    (void)self;
    const char *path;
    PyObject *list, *meta;
    if (!PyArg_ParseTuple(args, "sO!O!", &path, &PyList_Type, &list, &PyDict_Type, &meta)) return NULL;
    mha_st_writer *w = NULL;
    mha_status st = mha_st_writer_create(&w);
    for (Py_ssize_t i = 0; st == MHA_OK && i < PyList_GET_SIZE(list); i++) st = add_tensor(w, PyList_GET_ITEM(list, i));
    PyObject *key, *value;
    for (Py_ssize_t pos = 0; st == MHA_OK && PyDict_Next(meta, &pos, &key, &value);) {
        const char *k = PyUnicode_AsUTF8(key), *v = PyUnicode_AsUTF8(value);
        st = k && v ? mha_st_writer_set_metadata(w, k, v) : MHA_ERR_INTERNAL;
    }
    if (st == MHA_OK) st = mha_st_writer_save(w, path);
    mha_st_writer_free(w);
    if (st == MHA_ERR_INTERNAL && PyErr_Occurred()) return NULL; /* a Python-side conversion failed */
    if (st != MHA_OK) return mha_py_raise(st);
    Py_RETURN_NONE;
}

/* info(embed_dim, num_heads, num_kv_heads, seq) -> dict */
static PyObject *py_info(PyObject *self, PyObject *args)
{
    (void)self;
    long long E, h, g, seq;
    if (!PyArg_ParseTuple(args, "LLLL", &E, &h, &g, &seq)) return NULL;
    mha_info i;
    mha_status st = mha_info_compute(E, h, g, seq, &i);
    if (st != MHA_OK) return mha_py_raise(st);
    return Py_BuildValue("{sLsLsLsLsdsdsdsdsLsL}", "head_dim", (long long)i.head_dim, "kv_dim", (long long)i.kv_dim,
                         "params", (long long)i.params, "params_single_head", (long long)i.params_single_head,
                         "flops_projections", i.flops_projections, "flops_attention", i.flops_attention,
                         "bytes_weights", i.bytes_weights, "bytes_activations", i.bytes_activations,
                         "kv_cache_bytes_per_token", (long long)i.kv_cache_bytes_per_token,
                         "kv_cache_bytes_per_token_mha", (long long)i.kv_cache_bytes_per_token_mha);
}

PyMethodDef mha_py_io_methods[] = {
    {"st_open", py_st_open, METH_VARARGS, "open a safetensors file: its tensors' names, dtypes and shapes"},
    {"st_read", py_st_read, METH_VARARGS, "read one tensor into a buffer"},
    {"st_save", py_st_save, METH_VARARGS, "write tensors and metadata to a safetensors file"},
    {"info", py_info, METH_VARARGS, "mha_info_compute"},
    {NULL, NULL, 0, NULL},
};
