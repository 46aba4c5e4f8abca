#!/usr/bin/env python3
"""large_logits_cost.py -- what the refined scores, the exact delta pass
and the exact projections of wide rows (docs/NUMERICS.md, "Large
logits") cost where logits are large.

    python bench/large_logits_cost.py [--seq 2048] [--heads 8] [--dim 64] [--repeat 5] [--layer [--batch 1]]

Needs the Python package (`pip install .`).  For q and k scaled by 1, 3
and 10 (random normal inputs), prints the largest logit, the mean of each
row's largest probability, and the median time of the forward (keeping
the row statistics) and of the backward from those statistics.  With
--layer, the same for an nn.MultiheadAttention layer (E = heads x dim,
weights uniform in +-1/sqrt(E), inputs scaled by 1, 2, 4, 6 and 10): the
shares of rows whose bound scale |q_i| max_j |k_j| passes 16 and 64 (rows
past 64 are wide, and so are rows past 16 of a recorded forward with
fewer than 32 rows, or over at most 96 keys: the layer sums their Q and
their keys' K exactly), the forward's and the forward+backward's
medians.
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


def wide_share(x, w, b, heads, dim, bound):
    """The share of (row, head) pairs whose bound scale |q_i| max_j |k_j|
    (the largest over the row's batch) passes `bound`, from float32
    projections as the layer decides."""
    E = heads * dim
    q = (x @ w[:E].T + b[:E]).reshape(x.shape[0], -1, heads, dim).astype(np.float64)
    k = (x @ w[E:2 * E].T + b[E:2 * E]).reshape(x.shape[0], -1, heads, dim).astype(np.float64)
    qn, kn = np.linalg.norm(q, axis=3), np.linalg.norm(k, axis=3).max(axis=1, keepdims=True)
    return float(np.mean(qn * kn / np.sqrt(dim) > bound))


def layer_costs(a):
    r = np.random.default_rng(0)
    E = a.heads * a.dim
    layer = mha.MultiheadAttention(E, a.heads, batch_first=True)
    bound = 1 / np.sqrt(E)
    w = r.uniform(-bound, bound, (3 * E, E)).astype(np.float32)
    b = r.uniform(-bound, bound, 3 * E).astype(np.float32)
    layer.load_state_dict({"in_proj_weight": w, "in_proj_bias": b,
                           "out_proj.weight": r.uniform(-bound, bound, (E, E)).astype(np.float32),
                           "out_proj.bias": np.zeros(E, np.float32)})
    dy = r.standard_normal((a.batch, a.seq, E)).astype(np.float32)
    for size in (1, 2, 4, 6, 10):
        x = (r.standard_normal((a.batch, a.seq, E)) * size).astype(np.float32)

        def train_step():
            layer.forward(x, x, x, need_weights=False)
            layer.backward(dy)

        layer.training = False
        fwd = median_ms(lambda: layer.forward(x, x, x, need_weights=False), a.repeat)
        layer.training = True
        both = median_ms(train_step, a.repeat)
        shares = [100 * wide_share(x, w, b, a.heads, a.dim, bound) for bound in (16, 64)]
        print(f"layer, inputs x{size}: bound past 16 in {shares[0]:.1f}% of rows, 64 in {shares[1]:.1f}%: "
              f"forward {fwd:.{a.digits}f} ms, forward+backward {both:.{a.digits}f} ms "
              f"({mha.isa()}, {a.batch} x {a.seq} rows, E = {E})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1, help="--layer: sequences of --seq rows")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--digits", type=int, default=0, help="decimals of the times printed")
    ap.add_argument("--layer", action="store_true", help="the layer instead of the attention alone")
    a = ap.parse_args()
    if a.layer:
        layer_costs(a)
        return
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
