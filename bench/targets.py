#!/usr/bin/env python3
"""targets.py -- the fast-kernel issue's targets that need no peer, measured.

    python3 bench/targets.py [--mha build/mha] [--sweeps 3] [--threads 2] [--only TEXT]

Each sweep runs `mha bench --json` once per target shape, in order, and a
shape's share of the float32 peak comes from the peak that call measured
(before and after its timed calls, docs/PERFORMANCE.md).  Sweeps, not
rounds of one shape, so that a busy minute on the shared machine lands
on one sweep's row of shapes rather than on all of one shape's figures.
The rows:

  core N=2048/4096/8192     the attention core, d = 64: >= 85% of the peak
  ... causal                the same % as dense: causal's % over dense's
                            in the same sweep, >= 1
  layer S1-S4, causal       the MHA layer's forward (shapes.py): >= 85%
  fwd+bwd S1-S3             the layer's forward + backward: >= 75%
  int8 step, 32768 tokens   a decode step's time with a float32 cache over
                            its time with an int8 one (E = 512, 8 heads):
                            >= 1.8
  int8 beyond the LLC       the int8 step's K and V bytes a second over the
                            copy bandwidth timed between its calls, with a
                            cache of --far-tokens tokens (570 MB at the
                            default, past the last-level cache of the
                            machines this project runs on): >= 0.90

Prints each sweep's figure, the median over sweeps and whether the median
meets the target.  The targets against peers (ggml, PyTorch) need those
peers: compare_torch.py, and docs/PERFORMANCE.md for ggml.  A
measurement, not a test: it exits 0 either way.
"""
import argparse
import json
import os
import statistics
import subprocess

import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CORE = [2048, 4096, 8192]
CORE_REPEAT = {2048: 5, 4096: 3, 8192: 2}
LAYER_REPEAT = {"S1": 10, "S2": 10, "S3": 5, "S4": 2}
INT8 = ["--op", "decode", "--embed-dim", "512", "--num-heads", "8"]


def percent(args, repeat):
    """A row's measure: the share of the peak of one `mha bench` call."""
    return lambda run: run(args + ["--repeat", str(repeat)])["percent_of_peak"]


def core_rows():
    rows = []
    for n in CORE:
        args = ["--op", "sdpa", "--seq", str(n)]
        rows.append((f"core N={n}", ">= 85%", 85.0, percent(args, CORE_REPEAT[n])))
        rows.append((f"core N={n} causal", ">= dense", None, percent(args + ["--is-causal"], CORE_REPEAT[n])))
    return rows


def layer_rows():
    return [(f"layer {name}", ">= 85%", 85.0, percent(shapes.bench_args(name), LAYER_REPEAT[name[:2]]))
            for name, _, _, _ in shapes.LAYER]


def train_rows():
    return [(f"fwd+bwd {name}", ">= 75%", 75.0,
             percent(["--op", "backward", *shapes.bench_args(name)], LAYER_REPEAT[name] // 2 + 1))
            for name, _, _, causal in shapes.TRAIN if not causal]


def int8_speedup(run):
    f32 = run(INT8 + ["--kv-seq", "32768", "--repeat", "50"])["median_ms"]
    int8 = run(INT8 + ["--kv-seq", "32768", "--repeat", "50", "--cache-dtype", "int8"])["median_ms"]
    return f32 / int8


def int8_far(tokens):
    def measure(run):
        out = run(INT8 + ["--kv-seq", str(tokens), "--repeat", "10", "--cache-dtype", "int8", "--copy-timing",
                          "between"])
        return out["kv_gbps"] / out["copy_gbps"]

    return measure


def rows(far_tokens):
    """Each target as (name, wanted, limit, measure): measure(run) gives a
    sweep's figure, to be at least limit (None: at least the dense row's)."""
    return core_rows() + layer_rows() + train_rows() + [
        ("int8 step, 32768 tokens", ">= 1.8x f32", 1.8, int8_speedup),
        ("int8 beyond the LLC", ">= 0.90 of copy", 0.90, int8_far(far_tokens)),
    ]


def runner(mha, threads):
    def run(args):
        cmd = [mha, "bench", *args, "--threads", str(threads), "--json"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    return run


def dense_of(name):
    return name[:-len(" causal")]


def chosen_rows(all_rows, only):
    """The rows whose name contains `only` (all without it), with the dense
    row of each causal core row chosen, which its figure is taken over."""
    names = {name for name, _, _, _ in all_rows if not only or only in name}
    names |= {dense_of(name) for name, _, limit, _ in all_rows if name in names and limit is None}
    return [r for r in all_rows if r[0] in names]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mha", default=os.path.join(ROOT, "build", "mha"))
    ap.add_argument("--sweeps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--far-tokens", type=int, default=524288)
    ap.add_argument("--only", help="run only the rows whose name contains this (a causal core row brings its dense)")
    a = ap.parse_args()
    run = runner(a.mha, a.threads)
    chosen = chosen_rows(rows(a.far_tokens), a.only)
    got = {name: [] for name, _, _, _ in chosen}
    for _ in range(a.sweeps):
        for name, _, _, measure in chosen:
            got[name].append(measure(run))
    print(f"{'target':<26}{'wanted':>16}  {'sweeps':<30}{'median':>9}  met")
    met = 0
    for name, wanted, limit, _ in chosen:
        values = got[name]
        if limit is None:  # causal: its % over dense's in each sweep
            values = [c / d for c, d in zip(values, got[dense_of(name)])]
        form = "{:.1f}" if limit is not None and limit > 10 else "{:.3g}"  # a % of peak, or a ratio
        shown = "  ".join(form.format(v) for v in values)
        if values:
            middle = statistics.median(values)
            ok = middle >= (1.0 if limit is None else limit)
            met += ok
            print(f"{name:<26}{wanted:>16}  {shown:<30}{form.format(middle):>9}  {'yes' if ok else 'no'}")
    print(f"{met} of {len(chosen)} met ({a.mha}, {a.threads} threads, {a.sweeps} sweeps)")
    return 0


if __name__ == "__main__":
    main()
