/*
 * _sdpa.c -- scaled dot-product attention and its backward on buffers
 * (mha/functional.py shapes the arguments).
 */
#include "_core.h"

#include <math.h>

/* One call's tensors and descriptor.  LSE holds lse, or, with `stats`,
 * each row's maximum score, and SUM the sum of exp(score - max)
 * (mha_attn_stats: the backward needs no renormalising pass). */
enum { Q, K, V, OUT, LSE, SUM, GO, DQ, DK, DV, N_TENSORS };
typedef struct sdpa_call {
    mha_tensor t[N_TENSORS];
    bool stats;
    mha_attn_desc desc;
} sdpa_call;

/* Whether some row may see no key, and so rightly have an lse (or max)
 * of -Inf: a mask, a window, or bottom-right causal can hide every key
 * from a row; top-left causal leaves each row key 0. */
static bool rows_may_be_masked(const sdpa_call *c)
{
    const mha_attn_desc *d = &c->desc;
    return c->t[K].shape[2] == 0 || d->mask.data || d->window_left >= 0 || d->window_right >= 0 ||
           d->causal == MHA_CAUSAL_BOTTOM_RIGHT;
}

/* NaN or Inf in the query, key, a mask or the slopes reaches a score, and
 * so the row's log-sum-exp (or its sum, NaN, and its max, +Inf; -Inf when
 * every score of the row is -Inf, which no row with a key to see has
 * otherwise): checking one float a row finds it at no cost.  NaN in the
 * value reaches only the output: with check_all the output is read once
 * more too. */
static mha_status forward_job(mha_ctx *ctx, void *arg, bool *finite)
{
    sdpa_call *c = arg;
    mha_attn_stats stats = {c->t[LSE].data, c->t[SUM].data};
    int64_t rows = mha_py_numel(&c->t[LSE]);
    bool masked_rows = rows_may_be_masked(c);
    mha_status st = c->stats ? mha_attention_with_stats(ctx, &c->t[OUT], &stats, &c->t[Q], &c->t[K], &c->t[V], &c->desc)
                             : mha_attention(ctx, &c->t[OUT], c->t[LSE].data, &c->t[Q], &c->t[K], &c->t[V], &c->desc);
    if (st == MHA_OK &&
        (mha_py_bad_lse(c->t[LSE].data, rows, masked_rows) || (c->stats && mha_py_bad_lse(stats.sum, rows, true))))
        *finite = false;
    return st;
}

static mha_status backward_job(mha_ctx *ctx, void *arg, bool *finite)
{
    (void)finite;
    sdpa_call *c = arg;
    mha_attn_stats stats = {c->t[LSE].data, c->t[SUM].data};
    if (c->stats)
        return mha_attention_backward_with_stats(ctx, &c->t[DQ], &c->t[DK], &c->t[DV], &c->t[Q], &c->t[K], &c->t[V],
                                                 &c->t[OUT], &stats, &c->t[GO], &c->desc);
    return mha_attention_backward(ctx, &c->t[DQ], &c->t[DK], &c->t[DV], &c->t[Q], &c->t[K], &c->t[V], &c->t[OUT],
                                  c->t[LSE].data, &c->t[GO], &c->desc);
}

/* The row sums, when the call keeps statistics (sum is not None). */
static bool stats_of(mha_py_held *h, PyObject *sum, int writable, sdpa_call *c)
{
    c->stats = sum != Py_None;
    c->t[SUM].data = NULL;
    return !c->stats || mha_py_tensor(h, sum, "row sums", writable, &c->t[SUM]);
}

/* The descriptor from the Python side's positional values. */
static bool desc_of(mha_py_held *h, PyObject *mask, double scale, int causal, long long wl, long long wr,
                    double softcap, PyObject *alibi, int enable_gqa, int bf16, mha_attn_desc *d)
{
    mha_attn_desc_init(d);
    d->scale = scale;
    d->causal = (mha_causal)causal;
    d->window_left = wl;
    d->window_right = wr;
    d->softcap = (float)softcap;
    d->enable_gqa = enable_gqa;
    d->dtype = bf16 ? MHA_DTYPE_BF16 : MHA_DTYPE_F32;
    if (!mha_py_mask(h, mask, "attn_mask", &d->mask)) return false;
    if (alibi != Py_None) {
        mha_tensor t;
        if (!mha_py_tensor(h, alibi, "alibi_slopes", 0, &t)) return false;
        d->alibi_slopes = t.data;
    }
    return true;
}

/* attention(out, lse, sum, q, k, v, mask, scale, causal, window_left,
 *           window_right, softcap, alibi, enable_gqa, bf16, threads,
 *           check_all) -> False when lse (or, with check_all, the output)
 * holds NaN or Inf.  With sum not None, lse receives the row maxima and
 * sum the row sums (mha_attention_with_stats). */
static PyObject *py_attention(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *out, *lse, *sum, *q, *k, *v, *mask, *alibi;
    double scale, softcap;
    int causal, gqa, bf16, threads, check_all;
    long long wl, wr;
    if (!PyArg_ParseTuple(args, "OOOOOOOdiLLdOppip", &out, &lse, &sum, &q, &k, &v, &mask, &scale, &causal, &wl, &wr,
                          &softcap, &alibi, &gqa, &bf16, &threads, &check_all))
        return NULL;
    mha_py_held h = {.n = 0};
    sdpa_call c;
    bool ok = mha_py_tensor(&h, out, "out", 1, &c.t[OUT]) && mha_py_tensor(&h, lse, "lse", 1, &c.t[LSE]) &&
              stats_of(&h, sum, 1, &c) && mha_py_tensor(&h, q, "query", 0, &c.t[Q]) &&
              mha_py_tensor(&h, k, "key", 0, &c.t[K]) && mha_py_tensor(&h, v, "value", 0, &c.t[V]) &&
              desc_of(&h, mask, scale, causal, wl, wr, softcap, alibi, gqa, bf16, &c.desc);
    mha_tensor *outputs[1] = {&c.t[OUT]};
    return mha_py_run(&h, ok, threads, forward_job, &c, outputs, check_all ? 1 : 0);
}

/* A plain call's scale (None: 1/sqrt(D)) and threads (None: all CPUs),
 * when given as the checked path would take them without converting. */
static bool plain_scale(PyObject *obj, double *scale)
{
    if (obj == Py_None) *scale = NAN;
    else if (PyFloat_CheckExact(obj)) *scale = PyFloat_AS_DOUBLE(obj);
    else if (PyLong_CheckExact(obj)) *scale = PyLong_AsDouble(obj);
    else return false;
    if (!PyErr_Occurred()) return true;
    PyErr_Clear(); /* an int too large for a double */
    return false;
}

static bool plain_threads(PyObject *obj, int *threads)
{
    long n = obj == Py_None ? 0 : PyLong_CheckExact(obj) ? PyLong_AsLong(obj) : -1;
    if (PyErr_Occurred()) PyErr_Clear();
    *threads = (int)n;
    return n >= 0 && n <= 1024;
}

/* The inputs of a plain call, each read in place and all of one rank. */
static bool plain_inputs(mha_py_held *h, PyObject *const *qkv, sdpa_call *c, int *rank)
{
    int of[3];
    *rank = 0;
    bool ok = mha_py_plain_tensor(h, qkv[0], &c->t[Q], &of[0]) && mha_py_plain_tensor(h, qkv[1], &c->t[K], &of[1]) &&
              mha_py_plain_tensor(h, qkv[2], &c->t[V], &of[2]) && of[0] == of[1] && of[1] == of[2];
    *rank = of[0];
    return ok;
}

/* The output of a plain call, [*q's shape[:-1], Dv], from `empty` (a
 * function of a shape tuple giving a writable float32 C-contiguous
 * buffer), and as a tensor in t.  Building the shape here saves the
 * PyTorch drop-in 0.5 us of torch.Size arithmetic a call. */
static PyObject *plain_output(PyObject *empty, int rank, const mha_tensor *q, const mha_tensor *v, mha_py_held *h,
                              mha_tensor *t)
{
    int64_t shape[4];
    for (int d = 0; d < rank - 1; d++) shape[d] = q->shape[4 - rank + d];
    shape[rank - 1] = v->shape[3];
    PyObject *dims = mha_py_shape(rank, shape);
    PyObject *out = dims ? PyObject_CallOneArg(empty, dims) : NULL;
    Py_XDECREF(dims);
    if (out && !mha_py_tensor(h, out, "out", 1, t)) Py_CLEAR(out);
    return out;
}

/* attention_plain(empty, q, k, v, scale, is_causal, enable_gqa, threads):
 * the common call with no mask or extras, its inputs read exactly as they
 * are (mha_py_plain_tensor), with no Python between the caller and the
 * library.  The output (made by `empty`, see plain_output) when every
 * score was finite; None when the call is not one this takes, or a score
 * was not finite: the caller then takes the checked path, which converts
 * what needs it and names what is wrong.  The library's own refusals
 * raise, as they would there. */
static PyObject *py_attention_plain(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 8) {
        PyErr_Format(PyExc_TypeError, "attention_plain takes 8 arguments, got %zd", nargs);
        return NULL;
    }
    sdpa_call c = {.stats = false};
    mha_attn_desc_init(&c.desc);
    int threads, rank, causal = PyObject_IsTrue(args[5]), gqa = PyObject_IsTrue(args[6]);
    if (causal < 0 || gqa < 0) return NULL;
    c.desc.causal = causal ? MHA_CAUSAL_TOP_LEFT : MHA_CAUSAL_NONE;
    c.desc.enable_gqa = gqa;
    mha_py_held h = {.n = 0};
    if (!plain_scale(args[4], &c.desc.scale) || !plain_threads(args[7], &threads) ||
        !plain_inputs(&h, args + 1, &c, &rank)) {
        mha_py_release(&h);
        Py_RETURN_NONE;
    }
    PyObject *out = plain_output(args[0], rank, &c.t[Q], &c.t[V], &h, &c.t[OUT]);
    /* The log-sum-exps, only to find a score that was not finite. */
    int64_t rows = c.t[Q].shape[0] * c.t[Q].shape[1] * c.t[Q].shape[2];
    float *lse = out ? PyMem_RawMalloc((size_t)(rows > 0 ? rows : 1) * sizeof *lse) : NULL;
    if (!lse) {
        mha_py_release(&h);
        Py_XDECREF(out);
        return out ? PyErr_NoMemory() : NULL;
    }
    c.t[LSE] = (mha_tensor){.data = lse, .shape = {1, 1, 1, rows}, .stride = {rows, rows, rows, 1}};
    mha_tensor *outputs[1] = {&c.t[OUT]};
    PyObject *finite = mha_py_run(&h, true, threads, forward_job, &c, outputs, 0);
    PyMem_RawFree(lse);
    if (finite != Py_True) Py_CLEAR(out);
    if (finite == Py_False) out = Py_NewRef(Py_None);
    Py_XDECREF(finite);
    return out;
}

/* attention_backward(dq, dk, dv, q, k, v, out, lse, sum, grad_out, mask,
 *                    scale, causal, window_left, window_right, softcap,
 *                    alibi, enable_gqa, threads) -> True when the gradients
 * are finite.  With sum not None, lse holds the row maxima. */
static PyObject *py_attention_backward(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *dq, *dk, *dv, *q, *k, *v, *out, *lse, *sum, *go, *mask, *alibi;
    double scale, softcap;
    int causal, gqa, threads;
    long long wl, wr;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOdiLLdOpi", &dq, &dk, &dv, &q, &k, &v, &out, &lse, &sum, &go, &mask, &scale,
                          &causal, &wl, &wr, &softcap, &alibi, &gqa, &threads))
        return NULL;
    mha_py_held h = {.n = 0};
    sdpa_call c;
    bool ok = mha_py_tensor(&h, dq, "dq", 1, &c.t[DQ]) && mha_py_tensor(&h, dk, "dk", 1, &c.t[DK]) &&
              mha_py_tensor(&h, dv, "dv", 1, &c.t[DV]) && mha_py_tensor(&h, q, "query", 0, &c.t[Q]) &&
              mha_py_tensor(&h, k, "key", 0, &c.t[K]) && mha_py_tensor(&h, v, "value", 0, &c.t[V]) &&
              mha_py_tensor(&h, out, "out", 0, &c.t[OUT]) && mha_py_tensor(&h, lse, "lse", 0, &c.t[LSE]) &&
              stats_of(&h, sum, 0, &c) && mha_py_tensor(&h, go, "grad_out", 0, &c.t[GO]) &&
              desc_of(&h, mask, scale, causal, wl, wr, softcap, alibi, gqa, 0, &c.desc);
    mha_tensor *outputs[3] = {&c.t[DQ], &c.t[DK], &c.t[DV]};
    return mha_py_run(&h, ok, threads, backward_job, &c, outputs, 3);
}

PyMethodDef mha_py_sdpa_methods[] = {
    {"attention", py_attention, METH_VARARGS, "mha_attention on buffers (see mha/functional.py)"},
    {"attention_plain", (PyCFunction)(void (*)(void))py_attention_plain, METH_FASTCALL,
     "a call with no mask or extras on inputs read as they are (see mha/functional.py)"},
    {"attention_backward", py_attention_backward, METH_VARARGS, "mha_attention_backward on buffers"},
    {NULL, NULL, 0, NULL},
};
