/*
 * _layer.c -- the layer, its training tape and the KV cache as capsules,
 * and their calls on buffers (mha/layer.py gives them PyTorch's shapes,
 * masks and names, and a lock per object: a layer or cache serves one
 * call at a time).
 */
#include "_core.h"

#include <string.h>

static const char *const LAYER = "mha.layer", *const TAPE = "mha.tape", *const CACHE = "mha.kv_cache";

/* A layer's capsule holds the array its matrices live in, if moved there
 * (layer_storage with STORE_WEIGHTS), as its context: the layer can read
 * it as long as it lives, whoever else lets the array go. */
static void free_layer(PyObject *cap)
{
    mha_layer_free(PyCapsule_GetPointer(cap, LAYER));
    Py_XDECREF((PyObject *)PyCapsule_GetContext(cap));
}
static void free_tape(PyObject *cap) { mha_layer_tape_free(PyCapsule_GetPointer(cap, TAPE)); }
/* A cache closed before its capsule dies is marked by a non-NULL context. */
static bool closed(PyObject *cap) { return PyCapsule_GetContext(cap) != NULL; }

static void free_cache(PyObject *cap)
{
    if (!closed(cap)) mha_kv_cache_free(PyCapsule_GetPointer(cap, CACHE));
}

/* The object behind a capsule, or NULL with an exception: a closed cache
 * is misuse, named as such. */
static void *object_of(PyObject *cap, const char *kind)
{
    if (!PyCapsule_IsValid(cap, kind)) {
        PyErr_Format(PyExc_TypeError, "expected a %s", kind);
        return NULL;
    }
    if (strcmp(kind, CACHE) == 0 && closed(cap)) {
        PyErr_SetString(mha_py_error, "the KV cache is closed");
        return NULL;
    }
    return PyCapsule_GetPointer(cap, kind);
}

/* layer_create(embed_dim, num_heads, kdim, vdim, bias, add_bias_kv,
 *              add_zero_attn, num_kv_heads, head_dim, out_bias, rope,
 *              rope_theta, rope_dim, window_left, window_right, softcap,
 *              alibi, bf16) -> capsule */
static PyObject *py_layer_create(PyObject *self, PyObject *args)
{
    (void)self;
    mha_layer_desc d;
    mha_layer_desc_init(&d);
    long long E, h, kdim, vdim, g, hd, rope_dim, wl, wr;
    int bias, bias_kv, zero_attn, out_bias, rope, bf16;
    double theta, softcap;
    PyObject *alibi;
    if (!PyArg_ParseTuple(args, "LLLLpppLLiidLLLdOp", &E, &h, &kdim, &vdim, &bias, &bias_kv, &zero_attn, &g, &hd,
                          &out_bias, &rope, &theta, &rope_dim, &wl, &wr, &softcap, &alibi, &bf16))
        return NULL;
    d.embed_dim = E, d.num_heads = h, d.kdim = kdim, d.vdim = vdim, d.bias = bias, d.add_bias_kv = bias_kv;
    d.add_zero_attn = zero_attn, d.num_kv_heads = g, d.head_dim = hd, d.out_bias = out_bias;
    d.rope = (mha_rope){(mha_rope_kind)rope, theta, rope_dim};
    d.window_left = wl, d.window_right = wr, d.softcap = (float)softcap;
    d.dtype = bf16 ? MHA_DTYPE_BF16 : MHA_DTYPE_F32;
    mha_py_held hd_ = {.n = 0};
    mha_tensor slopes;
    if (alibi != Py_None) {
        if (!mha_py_tensor(&hd_, alibi, "alibi_slopes", 0, &slopes)) return mha_py_release(&hd_), NULL;
        d.alibi_slopes = slopes.data; /* copied by mha_layer_create */
    }
    mha_layer *layer = NULL;
    mha_status st = mha_layer_create(&d, &layer);
    mha_py_release(&hd_);
    if (st != MHA_OK) return mha_py_raise(st);
    PyObject *cap = PyCapsule_New(layer, LAYER, free_layer);
    if (!cap) mha_layer_free(layer);
    return cap;
}

/* layer_weights(layer) -> [(name, shape), ...] in parameters() order. */
static PyObject *py_layer_weights(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *cap;
    if (!PyArg_ParseTuple(args, "O", &cap)) return NULL;
    mha_layer *l = object_of(cap, LAYER);
    if (!l) return NULL;
    const char *names[16];
    int64_t n = mha_layer_weight_names(l, names, 16);
    if (n < 0) return mha_py_raise(MHA_ERR_MISUSE);
    PyObject *list = PyList_New(0);
    for (int64_t i = 0; list && i < n; i++) {
        int rank;
        int64_t shape[3], numel;
        mha_status st = mha_layer_weight_shape(l, names[i], &rank, shape, &numel);
        if (st != MHA_OK) {
            Py_DECREF(list);
            return mha_py_raise(st);
        }
        PyObject *dims = mha_py_shape(rank, shape);
        PyObject *item = dims ? Py_BuildValue("(sN)", names[i], dims) : NULL;
        if (!item || PyList_Append(list, item) < 0) Py_CLEAR(list);
        Py_XDECREF(item);
    }
    return list;
}

/* layer_weight(layer, name, buffer, mode): mode 0 sets the weight from
 * buffer, 1 copies it into buffer, 2 copies its gradient into buffer. */
static PyObject *py_layer_weight(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *cap, *buf;
    const char *name;
    int mode;
    if (!PyArg_ParseTuple(args, "OsOi", &cap, &name, &buf, &mode)) return NULL;
    mha_layer *l = object_of(cap, LAYER);
    mha_py_held h = {.n = 0};
    mha_tensor t;
    if (!l || !mha_py_tensor(&h, buf, name, mode != 0, &t)) return mha_py_release(&h), NULL;
    int64_t n = mha_py_numel(&t);
    mha_status st = mode == 0   ? mha_layer_set_weight(l, name, t.data, n)
                    : mode == 1 ? mha_layer_get_weight(l, name, t.data, n)
                                : mha_layer_get_grad(l, name, t.data, n);
    mha_py_release(&h);
    if (st != MHA_OK) return mha_py_raise(st);
    Py_RETURN_NONE;
}

/* layer_train(layer, zero): the training state (once), and every
 * gradient set to 0: not (zero 0), now (1, mha_layer_zero_grad) or by
 * the next backward, which writes them (2, mha_layer_zero_grad_deferred). */
static PyObject *py_layer_train(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *cap;
    int zero;
    if (!PyArg_ParseTuple(args, "Oi", &cap, &zero)) return NULL;
    mha_layer *l = object_of(cap, LAYER);
    if (!l) return NULL;
    mha_status st = mha_layer_train_init(l);
    if (st != MHA_OK) return mha_py_raise(st);
    if (zero == 1) mha_layer_zero_grad(l);
    if (zero == 2) mha_layer_zero_grad_deferred(l);
    Py_RETURN_NONE;
}

/* Which of a training layer's arrays a storage call is about. */
enum { STORE_GRADS, STORE_WEIGHTS };

/* layer_storage_count(layer, which): the floats of its gradient storage
 * (STORE_GRADS) or of its matrices' weight storage (STORE_WEIGHTS), with
 * the training state, made once. */
static PyObject *py_layer_storage_count(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *cap;
    int which;
    if (!PyArg_ParseTuple(args, "Oi", &cap, &which)) return NULL;
    mha_layer *l = object_of(cap, LAYER);
    if (!l) return NULL;
    int64_t count = 0;
    mha_status st = mha_layer_train_init(l);
    if (st == MHA_OK)
        st = which == STORE_WEIGHTS ? mha_layer_weight_storage_size(l, &count) : mha_layer_grad_storage_size(l, &count);
    if (st != MHA_OK) return mha_py_raise(st);
    return PyLong_FromLongLong(count);
}

/* layer_storage(layer, buffer, which) -> [(name, offset, shape), ...]:
 * the gradients (STORE_GRADS) or the matrices' values (STORE_WEIGHTS)
 * moved into buffer (contiguous float32, layer_storage_count values; the
 * caller keeps it alive while the layer uses it), and where each
 * parameter's is in it, in parameters() order (for the weights, the
 * matrices only: biases stay the layer's). */
static PyObject *py_layer_storage(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *cap, *buf;
    int which;
    if (!PyArg_ParseTuple(args, "OOi", &cap, &buf, &which)) return NULL;
    mha_layer *l = object_of(cap, LAYER);
    mha_py_held h = {.n = 0};
    mha_tensor t;
    const char *what = which == STORE_WEIGHTS ? "weight storage" : "gradient storage";
    if (!l || !mha_py_tensor(&h, buf, what, 1, &t)) return mha_py_release(&h), NULL;
    if (h.views[0].ndim != 1 || t.stride[3] != 1) {
        mha_py_release(&h);
        return PyErr_Format(PyExc_ValueError, "%s: a contiguous 1-D float32 array was expected", what);
    }
    int64_t count = mha_py_numel(&t);
    mha_status st = which == STORE_WEIGHTS ? mha_layer_set_weight_storage(l, t.data, count)
                                           : mha_layer_set_grad_storage(l, t.data, count);
    mha_py_release(&h);
    if (st != MHA_OK) return mha_py_raise(st);
    if (which == STORE_WEIGHTS) { /* the layer reads buf from now on: its capsule keeps it */
        PyObject *before = PyCapsule_GetContext(cap);
        Py_INCREF(buf);
        if (PyCapsule_SetContext(cap, buf) < 0) {
            Py_DECREF(buf);
            return NULL;
        }
        Py_XDECREF(before);
    }
    mha_param params[8];
    int64_t n = mha_layer_params(l, params, 8);
    PyObject *list = PyList_New(0);
    for (int64_t i = 0; list && i < n; i++) {
        const float *at = which == STORE_WEIGHTS ? params[i].value : params[i].grad;
        if (at < t.data || at >= t.data + count) continue; /* a bias: not in the weight storage */
        PyObject *dims = mha_py_shape(params[i].rank, params[i].shape);
        PyObject *item = dims ? Py_BuildValue("(sLN)", params[i].name, (long long)(at - t.data), dims) : NULL;
        if (!item || PyList_Append(list, item) < 0) Py_CLEAR(list);
        Py_XDECREF(item);
    }
    return list;
}

static PyObject *py_tape_create(PyObject *self, PyObject *noargs)
{
    (void)self, (void)noargs;
    mha_layer_tape *t = NULL;
    mha_status st = mha_layer_tape_create(&t);
    if (st != MHA_OK) return mha_py_raise(st);
    PyObject *cap = PyCapsule_New(t, TAPE, free_tape);
    if (!cap) mha_layer_tape_free(t);
    return cap;
}

/* The forward arguments from (q, k, v, attn_mask, key_padding_mask,
 * causal, average, tape, position). */
static bool fwd_args_of(mha_py_held *h, PyObject *q, PyObject *k, PyObject *v, PyObject *am, PyObject *kpm, int causal,
                        int average, PyObject *tape, long long position, mha_layer_fwd_args *a)
{
    mha_layer_fwd_args_init(a);
    a->causal = (mha_causal)causal;
    a->average_attn_weights = average;
    a->position = position;
    if (tape != Py_None && !(a->tape = object_of(tape, TAPE))) return false;
    return mha_py_tensor3(h, q, "query", 0, &a->query) && mha_py_tensor3(h, k, "key", 0, &a->key) &&
           mha_py_tensor3(h, v, "value", 0, &a->value) && mha_py_mask(h, am, "attn_mask", &a->attn_mask) &&
           mha_py_mask(h, kpm, "key_padding_mask", &a->key_padding_mask);
}

/* One call's layer, arguments and tensors. */
typedef struct layer_call {
    mha_layer *layer;
    mha_kv_cache *cache;
    mha_layer_fwd_args args;
    mha_tensor out, weights, x, grads[3]; /* out: the output, or grad_output for a backward */
    bool want_weights;
} layer_call;

static mha_status forward_job(mha_ctx *ctx, void *arg, bool *finite)
{
    (void)finite;
    layer_call *c = arg;
    return mha_layer_forward(ctx, c->layer, &c->out, c->want_weights ? &c->weights : NULL, &c->args);
}

static mha_status backward_job(mha_ctx *ctx, void *arg, bool *finite)
{
    (void)finite;
    layer_call *c = arg;
    mha_tensor *g[3];
    for (int i = 0; i < 3; i++) g[i] = c->grads[i].data ? &c->grads[i] : NULL;
    return mha_layer_backward(ctx, c->layer, &c->args, &c->out, g[0], g[1], g[2]);
}

static mha_status decode_job(mha_ctx *ctx, void *arg, bool *finite)
{
    (void)finite;
    layer_call *c = arg;
    return mha_layer_decode(ctx, c->layer, c->cache, &c->out, &c->x);
}

/* layer_forward(layer, out, weights, q, k, v, attn_mask, key_padding_mask,
 *               causal, average, tape, position, threads) -> finite */
static PyObject *py_layer_forward(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *cap, *out, *w, *q, *k, *v, *am, *kpm, *tape;
    int causal, average, threads;
    long long position;
    if (!PyArg_ParseTuple(args, "OOOOOOOOipOLi", &cap, &out, &w, &q, &k, &v, &am, &kpm, &causal, &average, &tape,
                          &position, &threads))
        return NULL;
    mha_py_held h = {.n = 0};
    layer_call c = {.layer = object_of(cap, LAYER)};
    bool ok = c.layer && fwd_args_of(&h, q, k, v, am, kpm, causal, average, tape, position, &c.args) &&
              mha_py_tensor3(&h, out, "attn_output", 1, &c.out) &&
              (w == Py_None || mha_py_tensor(&h, w, "attn_weights", 1, &c.weights));
    c.want_weights = w != Py_None;
    mha_tensor *outputs[1] = {&c.out};
    return mha_py_run(&h, ok, threads, forward_job, &c, outputs, 1);
}

/* layer_backward(layer, q, k, v, attn_mask, key_padding_mask, causal,
 *                average, tape, position, grad_out, gq, gk, gv, threads)
 * adds the input gradients into gq, gk, gv (None: not wanted) and the
 * weights' into the layer -> finite */
static PyObject *py_layer_backward(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *cap, *q, *k, *v, *am, *kpm, *tape, *go, *g[3];
    int causal, average, threads, write;
    long long position;
    if (!PyArg_ParseTuple(args, "OOOOOOipOLOOOOip", &cap, &q, &k, &v, &am, &kpm, &causal, &average, &tape, &position,
                          &go, &g[0], &g[1], &g[2], &threads, &write))
        return NULL;
    mha_py_held h = {.n = 0};
    layer_call c = {.layer = object_of(cap, LAYER)};
    static const char *const names[3] = {"grad_query", "grad_key", "grad_value"};
    bool ok = c.layer && fwd_args_of(&h, q, k, v, am, kpm, causal, average, tape, position, &c.args) &&
              mha_py_tensor3(&h, go, "grad_output", 0, &c.out);
    c.args.write_input_grads = write; /* the gradients are new arrays: written, not zeroed and added to */
    mha_tensor *outputs[3] = {NULL, NULL, NULL};
    for (int i = 0; ok && i < 3; i++)
        if (g[i] != Py_None && (ok = mha_py_tensor3(&h, g[i], names[i], 1, &c.grads[i]))) outputs[i] = &c.grads[i];
    return mha_py_run(&h, ok, threads, backward_job, &c, outputs, 3);
}

/* kv_cache(layer, batch, capacity, dtype name "F32" | "BF16" | "I8") -> capsule */
static PyObject *py_kv_cache(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *cap;
    long long batch, capacity;
    const char *name;
    if (!PyArg_ParseTuple(args, "OLLs", &cap, &batch, &capacity, &name)) return NULL;
    mha_layer *l = object_of(cap, LAYER);
    if (!l) return NULL;
    mha_dtype dtype = MHA_DTYPE_COUNT; /* an unknown name: the library names the error */
    for (int d = 0; d < MHA_DTYPE_COUNT; d++)
        if (strcmp(mha_dtype_name((mha_dtype)d), name) == 0) dtype = (mha_dtype)d;
    mha_kv_cache *c = NULL;
    mha_status st = mha_kv_cache_create(l, batch, capacity, dtype, &c);
    if (st != MHA_OK) return mha_py_raise(st);
    PyObject *res = PyCapsule_New(c, CACHE, free_cache);
    if (!res) mha_kv_cache_free(c);
    return res;
}

/* kv_cache_op(cache, op, n): 0 length, 1 capacity, 2 reset, 3 truncate to
 * n, 4 close (free now; later use is an error). */
static PyObject *py_kv_cache_op(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *cap;
    int op;
    long long n;
    if (!PyArg_ParseTuple(args, "OiL", &cap, &op, &n)) return NULL;
    if (op == 4 && PyCapsule_IsValid(cap, CACHE) && closed(cap)) Py_RETURN_NONE; /* closing twice is harmless */
    mha_kv_cache *c = object_of(cap, CACHE);
    if (!c) return NULL;
    mha_status st = MHA_OK;
    switch (op) {
    case 0: return PyLong_FromLongLong(mha_kv_cache_length(c));
    case 1: return PyLong_FromLongLong(mha_kv_cache_capacity(c));
    case 2: mha_kv_cache_reset(c); break;
    case 3: st = mha_kv_cache_truncate(c, n); break;
    default:
        mha_kv_cache_free(c);
        if (PyCapsule_SetContext(cap, cap) < 0) return NULL; /* closed */
        break;
    }
    if (st != MHA_OK) return mha_py_raise(st);
    Py_RETURN_NONE;
}

/* kv_cache_read(cache, start, k, v): tokens start .. as float32 into k and
 * v [batch, g, n, head_dim]. */
static PyObject *py_kv_cache_read(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *cap, *k, *v;
    long long start;
    if (!PyArg_ParseTuple(args, "OLOO", &cap, &start, &k, &v)) return NULL;
    mha_kv_cache *c = object_of(cap, CACHE);
    mha_py_held h = {.n = 0};
    mha_tensor kt, vt;
    bool ok = c && mha_py_tensor(&h, k, "k", 1, &kt) && mha_py_tensor(&h, v, "v", 1, &vt);
    mha_status st = ok ? mha_kv_cache_read(c, start, &kt, &vt) : MHA_OK;
    mha_py_release(&h);
    if (!ok) return NULL;
    if (st != MHA_OK) return mha_py_raise(st);
    Py_RETURN_NONE;
}

/* layer_decode(layer, cache, out, x, threads) -> finite */
static PyObject *py_layer_decode(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *lcap, *ccap, *out, *x;
    int threads;
    if (!PyArg_ParseTuple(args, "OOOOi", &lcap, &ccap, &out, &x, &threads)) return NULL;
    mha_py_held h = {.n = 0};
    layer_call c = {.layer = object_of(lcap, LAYER)};
    c.cache = c.layer ? object_of(ccap, CACHE) : NULL;
    bool ok = c.cache && mha_py_tensor3(&h, out, "out", 1, &c.out) && mha_py_tensor3(&h, x, "x", 0, &c.x);
    mha_tensor *outputs[1] = {&c.out};
    return mha_py_run(&h, ok, threads, decode_job, &c, outputs, 1);
}

PyMethodDef mha_py_layer_methods[] = {
    {"layer_create", py_layer_create, METH_VARARGS, "mha_layer_create"},
    {"layer_weights", py_layer_weights, METH_VARARGS, "the layer's weight names and shapes"},
    {"layer_weight", py_layer_weight, METH_VARARGS, "set or get a weight, or get its gradient"},
    {"layer_train", py_layer_train, METH_VARARGS, "training state, and zero the gradients"},
    {"layer_storage_count", py_layer_storage_count, METH_VARARGS, "floats of the gradient or weight storage"},
    {"layer_storage", py_layer_storage, METH_VARARGS, "move the gradients or the matrices into a caller's array"},
    {"tape_create", py_tape_create, METH_NOARGS, "mha_layer_tape_create"},
    {"layer_forward", py_layer_forward, METH_VARARGS, "mha_layer_forward on buffers"},
    {"layer_backward", py_layer_backward, METH_VARARGS, "mha_layer_backward on buffers"},
    {"kv_cache", py_kv_cache, METH_VARARGS, "mha_kv_cache_create"},
    {"kv_cache_op", py_kv_cache_op, METH_VARARGS, "length, capacity, reset, truncate, close"},
    {"kv_cache_read", py_kv_cache_read, METH_VARARGS, "mha_kv_cache_read"},
    {"layer_decode", py_layer_decode, METH_VARARGS, "mha_layer_decode on buffers"},
    {NULL, NULL, 0, NULL},
};
