"""Scaled dot-product attention written plainly in PyTorch, every option of
mha.torch's: the float64 oracle and the plain float32 baseline of the
tolerance rule (test_torch.py, bench/accuracy_sweep.py)."""

import torch


def sdpa_reference(q, k, v, mask=None, causal=None, scale=None, window=None, softcap=None, gqa=False):
    L, S = q.shape[-2], k.shape[-2]
    if gqa:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, -3), v.repeat_interleave(rep, -3)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
    keep = torch.ones(L, S, dtype=torch.bool)
    if causal:
        keep &= j <= i + (S - L if causal == "bottom_right" else 0)
    if window:
        keep &= (j >= i + S - L - window[0]) & (j <= i + S - L + window[1])
    s = s.masked_fill(~keep, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    return torch.softmax(s, -1) @ v


def outputs_and_grads(fn, inputs, dout, dtype, **options):
    """[output, grad of each input] of fn(*inputs, **options) in dtype, the
    gradients those of sum(output * dout), each input a fresh leaf."""
    t = [x.detach().to(dtype).clone().requires_grad_(True) for x in inputs]
    out = fn(*t, **options)
    (out * dout.to(dtype)).sum().backward()
    return [out.detach()] + [x.grad for x in t]
