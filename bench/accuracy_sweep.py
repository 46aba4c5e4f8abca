#!/usr/bin/env python3
"""accuracy_sweep.py -- how often does libmha miss the tolerance rule where
logits are large?

    python bench/accuracy_sweep.py [--cases 300] [--first 0]

Needs the Python package (`pip install .`) and PyTorch (Debian's 1.13 will
do).  Each random case (python/tests/large_logits.py: head widths 16 to
128, q and k scaled by 1 to 20 so logits reach the thousands, one option
group each) runs mha.torch.scaled_dot_product_attention
forward and backward in float32, and the same attention written plainly
in PyTorch (python/tests/torch_reference.py) in float64 (the oracle) and
float32 (the baseline), all three from the same float32 inputs, and
applies the project's rule
(python/tests/reference.py): output error within 2x, gradient errors
within 3x of the baseline's, plus the floor.  Prints each case that
misses (the ratio error / limit per quantity) and the count.  A
measurement, not a test: it exits 0 either way.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "tests"))
import mha  # noqa: E402
from large_logits import misses  # noqa: E402


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
