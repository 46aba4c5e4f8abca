#!/usr/bin/env python3
"""large_logits_cost.py -- what the refined scores and the exact delta
pass (docs/NUMERICS.md, "Large logits") cost where logits are large.

    python bench/large_logits_cost.py [--seq 2048] [--heads 8] [--dim 64] [--repeat 5]

Needs the Python package (`pip install .`).  For q and k scaled by 1, 3
and 10 (random normal inputs), prints the largest logit, the mean of each
row's largest probability, and the median time of the forward (keeping
the row statistics) and of the backward from those statistics.
"""
import argparse
import time

import numpy as np

import mha


def median_ms(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[repeat // 2] * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    r = np.random.default_rng(0)
    shape = (1, a.heads, a.seq, a.dim)
    for size in (1, 3, 10):
        q = (r.standard_normal(shape) * size).astype(np.float32)
        k = (r.standard_normal(shape) * size).astype(np.float32)
        v = r.standard_normal(shape).astype(np.float32)
        out, stats = mha.scaled_dot_product_attention(q, k, v, return_stats=True)
        fwd = median_ms(lambda: mha.scaled_dot_product_attention(q, k, v, return_stats=True), a.repeat)
        bwd = median_ms(lambda: mha.scaled_dot_product_attention_backward(out, q, k, v, output=out, stats=stats),
                        a.repeat)
        print(f"q, k x{size}: max |logit| {np.abs(stats[0]).max():.0f}, mean p_max {(1 / stats[1]).mean():.2f}: "
              f"forward {fwd:.0f} ms, backward {bwd:.0f} ms ({mha.isa()}, {a.seq} x {a.heads} heads x {a.dim})")


if __name__ == "__main__":
    main()
