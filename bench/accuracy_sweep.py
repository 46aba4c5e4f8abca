#!/usr/bin/env python3
"""accuracy_sweep.py -- how often does libmha miss the tolerance rule where
logits are large?  (The next performance issue's accuracy point.)

    python bench/accuracy_sweep.py [--cases 300] [--first 0]

Needs the Python package (`pip install .`) and PyTorch (Debian's 1.13 will
do).  Each random case draws shapes (head widths 16, 64, 128; Dv != D in a
third of them), an input scale for Q and K of 1, 5, 10 or 20 (logits into
the thousands), and one option group: causal (top-left or bottom-right),
a window with softcap, a boolean mask, a small custom scale with
bottom-right causal, GQA.  It runs mha.torch.scaled_dot_product_attention
forward and backward in float32, and the same attention written plainly
in PyTorch (python/tests/torch_reference.py) in float64 (the oracle) and
float32 (the baseline), and applies the project's rule
(python/tests/reference.py): output error within 2x, gradient errors
within 3x of the baseline's, plus the floor.  Prints each case that
misses (the ratio error / limit per quantity) and the count.  A
measurement, not a test: it exits 0 either way.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "tests"))
import mha  # noqa: E402
import mha.torch as mt  # noqa: E402
from reference import within_rule  # noqa: E402
from torch_reference import outputs_and_grads, sdpa_reference  # noqa: E402


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
    ref64 = outputs_and_grads(sdpa_reference, base, dout, torch.float64, **ref)
    plain32 = outputs_and_grads(sdpa_reference, base, dout, torch.float32, **ref)
    got = outputs_and_grads(mt.scaled_dot_product_attention, base, dout, torch.float32, **o)
    bad = []
    for name, a, b, c in zip(("output", "dq", "dk", "dv"), got, ref64, plain32):
        ok, err, limit = within_rule(a.double().numpy(), b.numpy(), c.double().numpy(), 2 if name == "output" else 3)
        if not ok:
            bad.append((name, err / limit))
    return bad, shapes, mag, {k: v for k, v in o.items() if k != "attn_mask"}, "attn_mask" in o


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--first", type=int, default=0)
    a = ap.parse_args()
    missed = 0
    for i in range(a.first, a.first + a.cases):
        bad, shapes, mag, opts, masked = misses(i)
        if bad:
            missed += 1
            what = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in bad)
            print(f"case {i}: {what} of the limit; q {shapes[0]}, k {shapes[1]}, v {shapes[2]}, inputs x{mag:g}, "
                  f"{opts}{' + mask' if masked else ''}")
    print(f"{missed} of {a.cases} cases miss the rule (torch {torch.__version__}, libmha {mha.version} on {mha.isa()})")


if __name__ == "__main__":
    main()
