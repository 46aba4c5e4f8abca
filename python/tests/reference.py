"""A plain attention in numpy, for the tests: run in float64 it is the
oracle, in float32 the baseline of the tolerance rule (docs/NUMERICS.md):

    max|ours - ref64| <= factor * max|plain32 - ref64| + 4 eps max(1, max|ref64|)

with factor 2 for outputs and 3 for gradients.
"""

import numpy as np


def _scores(q, k, mask, scale, causal, window, softcap, alibi):
    L, S = q.shape[-2], k.shape[-2]
    rep = q.shape[-3] // k.shape[-3]
    k = np.repeat(k, rep, axis=-3)
    s = np.einsum("...ld,...sd->...ls", q, k) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    i = np.arange(L)[:, None]
    j = np.arange(S)[None, :]
    diag = i + (S - L if causal == "bottom_right" else 0)
    if alibi is not None:
        s = s - alibi.astype(s.dtype)[:, None, None] * np.abs(i + S - L - j)
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == np.bool_ else s + mask.astype(s.dtype)
    keep = np.ones((L, S), dtype=bool)
    if causal:
        keep &= j <= diag
    left, right = window if window else (-1, -1)
    if left >= 0:
        keep &= j >= i + S - L - left
    if right >= 0:
        keep &= j <= i + S - L + right
    return np.where(keep, s, -np.inf), rep


def attention(q, k, v, dtype, mask=None, scale=None, causal=None, window=None, softcap=None, alibi=None):
    """(out, probabilities) in `dtype`; fully masked rows give 0."""
    q, k, v = (np.asarray(a, dtype=dtype) for a in (q, k, v))
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    s, rep = _scores(q, k, mask, dtype(scale), causal, window, softcap, alibi)
    m = np.max(s, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(s - m)
    den = e.sum(-1, keepdims=True)
    p = np.where(den > 0, e / np.where(den > 0, den, 1), 0)
    return np.einsum("...ls,...sd->...ld", p, np.repeat(v, rep, axis=-3)), p


def attention_grads(q, k, v, dout, dtype, mask=None, scale=None, causal=None, window=None, softcap=None,
                    alibi=None):
    """(dq, dk, dv) in `dtype`, by the chain rule through softmax (and the
    softcap's tanh)."""
    q, k, v, dout = (np.asarray(a, dtype=dtype) for a in (q, k, v, dout))
    scale = dtype(1 / np.sqrt(q.shape[-1]) if scale is None else scale)
    rep = q.shape[-3] // k.shape[-3]
    _, p = attention(q, k, v, dtype, mask, scale, causal, window, softcap, alibi)
    kr, vr = np.repeat(k, rep, axis=-3), np.repeat(v, rep, axis=-3)
    dvr = np.einsum("...ls,...ld->...sd", p, dout)
    dp = np.einsum("...ld,...sd->...ls", dout, vr)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    if softcap:
        raw = np.einsum("...ld,...sd->...ls", q, kr) * scale
        ds = ds * (1 - np.tanh(raw / softcap) ** 2)
    ds = ds * scale
    dq = np.einsum("...ls,...sd->...ld", ds, kr)
    dkr = np.einsum("...ls,...ld->...sd", ds, q)
    fold = lambda g: g.reshape(g.shape[:-3] + (k.shape[-3], rep) + g.shape[-2:]).sum(-3)
    return dq, fold(dkr), fold(dvr)


def within_rule(ours, ref64, plain32, factor):
    """(ok, error, limit) of the tolerance rule."""
    ours, ref64, plain32 = (np.asarray(a, dtype=np.float64) for a in (ours, ref64, plain32))
    err = np.max(np.abs(ours - ref64)) if ref64.size else 0.0
    base = np.max(np.abs(plain32 - ref64)) if ref64.size else 0.0
    limit = factor * base + 4 * np.finfo(np.float32).eps * max(1.0, np.max(np.abs(ref64)) if ref64.size else 1.0)
    return err <= limit, err, limit
