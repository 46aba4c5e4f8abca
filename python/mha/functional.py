"""Scaled dot-product attention on numpy arrays, as
torch.nn.functional.scaled_dot_product_attention computes it, and its
backward, on libmha's fused kernels.

Shapes: query [..., Hq, L, D], key [..., Hkv, S, D], value [..., Hkv, S, Dv]
(fewer dimensions are fine: [L, D] or [H, L, D]); the leading dimensions
of the three must be equal; Hkv = Hq unless enable_gqa, where Hkv divides
Hq.  Arrays follow the package's rule (mha/_arrays.py): float32 is read in
place.
"""

import math

import numpy as np

from . import _arrays, _core

_CAUSAL = {None: 0, "top_left": 1, "bottom_right": 2}


def _causal(is_causal, causal):
    if causal not in _CAUSAL:
        raise ValueError(f'causal must be "top_left" or "bottom_right", got {causal!r}')
    if is_causal and causal not in (None, "top_left"):
        raise ValueError('is_causal=True is top-left causal; it contradicts causal="bottom_right"')
    return _CAUSAL["top_left" if is_causal else causal]


def _window(window):
    if window is None:
        return -1, -1
    try:
        left, right = (-1 if w is None else int(w) for w in window)
    except (TypeError, ValueError):
        raise ValueError(f"window must be (left, right), each -1 or None for unbounded, got {window!r}") from None
    return left, right


class _Problem:
    """The arguments of one call, checked and shaped for the library."""

    def __init__(self, query, key, value, attn_mask, is_causal, scale, enable_gqa, causal, window, softcap,
                 alibi_slopes, num_threads):
        q, k, v = (_arrays.floats(a, n) for a, n in ((query, "query"), (key, "key"), (value, "value")))
        if not (q.ndim >= 2 and k.ndim == q.ndim and v.ndim == q.ndim):
            raise ValueError(f"query, key and value must have the same number of dimensions (at least 2: L, D); "
                             f"got shapes {q.shape}, {k.shape}, {v.shape}")
        if q.shape[:-3] != k.shape[:-3] or k.shape[:-3] != v.shape[:-3]:
            raise ValueError(f"query, key and value must share their batch dimensions; got shapes {q.shape}, "
                             f"{k.shape}, {v.shape}")
        if attn_mask is not None and is_causal:
            raise ValueError("attn_mask and is_causal=True exclude each other, as in PyTorch: put the causal mask "
                             "into attn_mask, or use causal=")
        self.shape = q.shape
        self.lead = q.shape[:-3]
        self.q, self.k, self.v = (_arrays.as4d(a, self.lead) for a in (q, k, v))
        L, S = q.shape[-2], k.shape[-2]
        self.mask = None
        if attn_mask is not None:
            full = _arrays.mask(attn_mask, "attn_mask", q.shape[:-2] + (L, S))
            self.mask = _arrays.as4d(full, self.lead)
        self.scale = math.nan if scale is None else float(scale)
        self.causal = _causal(is_causal, causal)
        self.window = _window(window)
        self.softcap = 0.0 if softcap is None else float(softcap)
        self.alibi = None if alibi_slopes is None else _arrays.floats(alibi_slopes, "alibi_slopes").reshape(-1)
        self.gqa = bool(enable_gqa)
        self.threads = _arrays.threads(num_threads)

    def options(self):
        return (self.mask, self.scale, self.causal, self.window[0], self.window[1], self.softcap, self.alibi,
                self.gqa)

    def raise_nonfinite(self, what, extra=()):
        named = [("query", self.q), ("key", self.k), ("value", self.v), ("alibi_slopes", self.alibi), *extra]
        if self.mask is not None and self.mask.dtype != np.bool_:
            named.append(("attn_mask", self.mask))
        _arrays.raise_nonfinite(what, named, view=" (of its 4-D view)")


def _rows(x, name, B, H, L):
    """One float per row, [..., Hq, L] as the forward returned it, as [B, Hq, L]."""
    x = _arrays.floats(x, name)
    if x.size != B * H * L:
        raise ValueError(f"{name} has {x.size} values; the rows are {B} x {H} x {L}")
    return x.reshape(B, H, L)


def plain_attention(query, key, value, is_causal, scale, enable_gqa, num_threads):
    """The output of the common call, no mask or extras, computed straight
    from the inputs' memory when the library can read them as they are:
    float32 of 2 to 4 dimensions, all of one rank, with non-negative
    strides (numpy arrays, or the plain torch tensors mha.torch registers),
    and scale and num_threads None or numbers.  None for any other call,
    or when a score was not finite: the checked path then takes it,
    converting what needs it and naming what is wrong.  This skips that
    path's Python (3.8 of the 8 us a call of one row took); the results
    have the same bits."""
    return _core.attention_plain(_arrays.empty, query, key, value, scale, is_causal, enable_gqa, num_threads)


def scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False, *,
                                 causal=None, window=None, softcap=None, alibi_slopes=None, return_lse=False,
                                 return_stats=False, num_threads=None, compute_dtype="float32",
                                 check_finite="scores"):
    """softmax(query key^T * scale + mask) value, as PyTorch 2.x computes it.

    attn_mask: bool (True = take part) or float (added), broadcast to
    [..., L, S]. is_causal: top-left causal, as PyTorch. Beyond PyTorch:
    causal="bottom_right" (aligned to the last key, as with a KV cache),
    window=(left, right) keys visible around the diagonal (-1: unbounded),
    softcap (scores capped by C tanh(s / C)), alibi_slopes [Hq],
    compute_dtype="bfloat16" (q, k, v and the probabilities rounded to bf16
    where they enter the products). return_lse also returns the
    log-sum-exp of each row [..., Hq, L]. A row whose keys are all masked
    gives 0 and lse -inf (PyTorch: NaN). return_stats also returns the
    rows' softmax statistics, a pair (row_max, row_sum) [..., Hq, L] with
    lse = row_max + log(row_sum): given to the backward as stats=, they
    recompute every probability to the forward's bits with no extra pass
    (from lse, the backward first re-sums each row: a fifth of its time,
    because a float32 lse is off by up to half an ulp of |lse|). Results
    come in the order (out, lse, stats), each only when asked for.

    check_finite: "scores" (default) raises ValueError, naming the input
    that holds it, when NaN or Inf in the query, key, mask or slopes
    reached a score; it reads only the log-sum-exps, at no measurable cost.
    "all" also reads the output once, to catch NaN or Inf in the value
    (about 5% of an S1 call, B=8 N=128 h=12 d=64, on 2 cores). None checks
    nothing: NaN propagates as in PyTorch.
    """
    if compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(f'compute_dtype must be "float32" or "bfloat16", got {compute_dtype!r}')
    if check_finite not in ("scores", "all", None):
        raise ValueError(f'check_finite must be "scores", "all" or None, got {check_finite!r}')
    if (type(query) is np.ndarray and attn_mask is None and causal is None
            and window is None and softcap is None and alibi_slopes is None and not (return_lse or return_stats)
            and compute_dtype == "float32" and check_finite == "scores"):
        out = plain_attention(query, key, value, is_causal, scale, enable_gqa, num_threads)
        if out is not None:
            return out
    p = _Problem(query, key, value, attn_mask, is_causal, scale, enable_gqa, causal, window, softcap, alibi_slopes,
                 num_threads)
    B, H, L, _ = p.q.shape
    out = _arrays.empty((B, H, L, p.v.shape[-1]))
    lse = _arrays.empty((B, H, L))  # the row maxima, with return_stats
    row_sum = _arrays.empty((B, H, L)) if return_stats else None
    finite = _core.attention(out, lse, row_sum, p.q, p.k, p.v, *p.options(), compute_dtype == "bfloat16", p.threads,
                             check_finite == "all")
    if check_finite and not finite:
        p.raise_nonfinite("output")
    results = [out.reshape(p.shape[:-1] + (p.v.shape[-1],))]
    rows = p.shape[:-1]
    if return_stats:
        row_max = lse
        if return_lse:
            with np.errstate(divide="ignore"):  # log(0) = -inf: a row that saw no key
                lse = np.where(row_sum > 0, row_max + np.log(row_sum), np.float32(-np.inf)).astype(np.float32)
    if return_lse:
        results.append(lse.reshape(rows))
    if return_stats:
        results.append((row_max.reshape(rows), row_sum.reshape(rows)))
    return tuple(results) if len(results) > 1 else results[0]


def scaled_dot_product_attention_backward(grad_output, query, key, value, attn_mask=None, is_causal=False,
                                          scale=None, enable_gqa=False, *, output=None, lse=None, stats=None,
                                          causal=None, window=None, softcap=None, alibi_slopes=None,
                                          num_threads=None):
    """The gradients (dquery, dkey, dvalue) of scaled_dot_product_attention
    with respect to its three inputs, given dLoss/doutput; the same options
    as the forward.  output with stats (from return_stats=True, the faster
    and exact pair) or with lse (from return_lse=True) saves recomputing the
    forward; without them it runs first.  Float32 only.
    """
    p = _Problem(query, key, value, attn_mask, is_causal, scale, enable_gqa, causal, window, softcap, alibi_slopes,
                 num_threads)
    B, H, L, _ = p.q.shape
    row_sum = None
    if output is None or (lse is None and stats is None):
        out4 = _arrays.empty((B, H, L, p.v.shape[-1]))
        lse4 = _arrays.empty((B, H, L))  # the row maxima
        row_sum = _arrays.empty((B, H, L))
        if not _core.attention(out4, lse4, row_sum, p.q, p.k, p.v, *p.options(), False, p.threads, False):
            p.raise_nonfinite("output")
    else:
        out4 = _arrays.as4d(_arrays.floats(output, "output"), p.lead)
        if stats is not None:
            if not isinstance(stats, tuple) or len(stats) != 2:
                raise TypeError("stats must be the (row_max, row_sum) pair that return_stats=True gives")
            lse4 = _rows(stats[0], "stats[0] (row_max)", B, H, L)
            row_sum = _rows(stats[1], "stats[1] (row_sum)", B, H, L)
        else:
            lse4 = _rows(lse, "lse", B, H, L)
    go = _arrays.floats(grad_output, "grad_output")
    if go.shape != p.shape[:-1] + (p.v.shape[-1],):
        raise ValueError(f"grad_output has shape {go.shape}; the output's is {p.shape[:-1] + (p.v.shape[-1],)}")
    go = _arrays.as4d(go, p.lead)
    dq = _arrays.empty(p.q.shape)
    dk = _arrays.empty(p.k.shape)
    dv = _arrays.empty(p.v.shape)
    if not _core.attention_backward(dq, dk, dv, p.q, p.k, p.v, out4, lse4, row_sum, go, *p.options(), p.threads):
        p.raise_nonfinite("gradient", [("grad_output", go)])
    return (dq.reshape(np.shape(query)), dk.reshape(np.shape(key)), dv.reshape(np.shape(value)))
