"""Random attention problems with large logits, for the tolerance rule:
shapes with head widths 16, 64 and 128 (Dv != D in a third), q and k
scaled by 1, 5, 10 or 20 (logits into the thousands), and one option group
each: causal (top-left or bottom-right), a window with softcap, a boolean
mask, a small custom scale with bottom-right causal, GQA.  Shared by
test_torch.py and bench/accuracy_sweep.py."""

import numpy as np
import torch

import mha.torch as mt
from reference import within_rule
from torch_reference import outputs_and_grads, sdpa_reference


def draw(i):
    """Case i: (shapes, input scale, mha.torch options, reference options)."""
    r = np.random.default_rng(9000 + i)
    B, Hkv = int(r.integers(1, 3)), int(r.integers(1, 3))
    rep = int(r.choice([1, 2, 4])) if i % 4 == 0 else 1
    L, S = int(r.integers(1, 70)), int(r.integers(1, 70))
    D = int(r.choice([16, 64, 128]))
    Dv = D if i % 3 else int(r.choice([16, 64, 128]))
    mag = float(r.choice([1, 5, 10, 20]))
    o, ref = {}, {}
    kind = i % 6
    if kind == 1:
        o["is_causal"], ref["causal"] = True, "top_left"
        L = min(L, S)
    elif kind == 2:
        o["causal"] = ref["causal"] = "bottom_right"
        S = max(L, S)
    elif kind == 3:
        o["window"] = ref["window"] = (int(r.integers(0, 8)), int(r.integers(0, 8)))
        o["softcap"] = ref["softcap"] = float(r.choice([5.0, 30.0, 50.0]))
        S = max(L, S)
        if r.integers(2):
            o["causal"] = ref["causal"] = "bottom_right"
    elif kind == 4:
        m = torch.from_numpy(r.random((L, S)) > 0.3)
        m[:, 0] = True
        o["attn_mask"] = ref["mask"] = m
    elif kind == 5:
        o["scale"] = ref["scale"] = float(r.choice([0.01, 0.05, 0.3]))
        o["causal"] = ref["causal"] = "bottom_right"
        S = max(L, S)
    if rep > 1:
        o["enable_gqa"], ref["gqa"] = True, True
    shapes = [(B, Hkv * rep, L, D), (B, Hkv, S, D), (B, Hkv, S, Dv)]
    return shapes, mag, o, ref


def misses(i):
    """[(quantity, error / limit)] for the quantities of case i outside the rule."""
    shapes, mag, o, ref = draw(i)
    g = torch.Generator().manual_seed(i)
    base = [torch.randn(s, generator=g, dtype=torch.float64) * (mag if n < 2 else 1.0) for n, s in enumerate(shapes)]
    dout = torch.randn(*shapes[0][:-1], shapes[2][-1], generator=g, dtype=torch.float64)
    # The float64 oracle sees the very float32 inputs the two float32 runs
    # see (as FlashAttention's tests upcast their fp16 inputs): with logits
    # in the thousands, rounding the inputs alone moves the output by more
    # than either computation errs, and would make the rule a coin toss.
    base, dout = [x.float().double() for x in base], dout.float().double()
    ref64 = outputs_and_grads(sdpa_reference, base, dout, torch.float64, **ref)
    plain32 = outputs_and_grads(sdpa_reference, base, dout, torch.float32, **ref)
    got = outputs_and_grads(mt.scaled_dot_product_attention, base, dout, torch.float32, **o)
    bad = []
    for name, a, b, c in zip(("output", "dq", "dk", "dv"), got, ref64, plain32):
        ok, err, limit = within_rule(a.double().numpy(), b.numpy(), c.double().numpy(), 2 if name == "output" else 3)
        if not ok:
            bad.append((name, err / limit))
    return bad, shapes, mag, {k: v for k, v in o.items() if k != "attn_mask"}, "attn_mask" in o
