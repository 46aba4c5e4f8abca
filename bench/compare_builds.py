#!/usr/bin/env python3
"""compare_builds.py -- did a change cost speed?  Two builds of `mha`, side
by side in one run.

    bench/compare_builds.py OLD/mha NEW/mha [--rounds R] [--threads T]

For each case (the layer at S1-S4, the attention core at N = 2048 plain and
causal and at 8192, where K and V stream from L3, the layer's backward at
S1-S3, a decode step against 4096 cached tokens), the two binaries run
alternately, R rounds each, every run a
`mha bench --json` of several timed calls; a build's figure is the median
of its rounds' medians.  Alternating spreads the shared machine's noise
over both builds.  Prints new/old speed (old ms / new ms: above 1 is
faster) per case, with how many rounds the new build won and the middle
half of the rounds' own ratios (each round runs both builds back to back,
so a busy minute on the shared machine moves both); exits 1 when a case
falls below --min-ratio.  Given one build twice it measures the noise
itself: a change whose ratio sits inside that run's spread is not shown.
"""
import argparse
import json
import statistics
import subprocess
import sys

import shapes

CASES = [  # name, mha bench arguments, timed calls per run
    ("layer S1", shapes.bench_args("S1"), 20),
    ("layer S2", shapes.bench_args("S2"), 20),
    ("layer S3", shapes.bench_args("S3"), 5),
    ("layer S3 causal", shapes.bench_args("S3 causal"), 5),
    ("layer S4", shapes.bench_args("S4"), 2),
    ("core N=2048", ["--op", "sdpa", "--seq", "2048"], 5),
    ("core N=2048 causal", ["--op", "sdpa", "--seq", "2048", "--is-causal"], 5),
    ("core N=8192", ["--op", "sdpa", "--seq", "8192"], 2),
    ("core S1", ["--op", "sdpa", *shapes.bench_args("S1")], 20),
    ("core 1 x 4096", ["--op", "sdpa", "--seq", "1", "--kv-seq", "4096"], 50),  # a decoding step over tensors
    ("core 16 x 4096", ["--op", "sdpa", "--seq", "16", "--kv-seq", "4096"], 20),  # a few rows over the tiles
    ("core GQA 1 x 4096", ["--op", "sdpa", "--seq", "1", "--kv-seq", "4096", "--embed-dim", "4096", "--num-heads", "32",
                           "--num-kv-heads", "8"], 20),
    ("backward S1", ["--op", "backward", *shapes.bench_args("S1")], 10),
    ("backward S2", ["--op", "backward", *shapes.bench_args("S2")], 10),
    ("backward S3", ["--op", "backward", *shapes.bench_args("S3")], 3),
    ("decode 1 x 4096", ["--op", "decode", "--kv-seq", "4096"], 50),
    ("layer 8 x 1", ["--op", "forward", "--batch", "8", "--seq", "1"], 200),  # eight sequences' decoding projections
    ("layer 11 x 1", ["--op", "forward", "--batch", "11", "--seq", "1"], 200),
]


def bench(binary, args, repeat, threads, peak):
    cmd = [binary, "bench", *args, "--repeat", str(repeat), "--threads", str(threads), "--json",
           "--peak-gflops", str(peak)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["median_ms"]


def paired(old, new):
    """The rounds' own ratios, each of two runs back to back: how many
    rounds the new build won, and the middle half of their old/new ratios.
    A neighbour's busy minute moves a pair together, so these show whether
    the ratio of the medians is the builds' difference or the machine's."""
    ratios = sorted(o / n for o, n in zip(old, new))
    won = sum(r > 1 for r in ratios)
    if len(ratios) < 4:
        return f"{won} of {len(ratios)}"
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return f"{won} of {len(ratios)}, {q1:.3f}-{q3:.3f}x"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-ratio", type=float, default=0.97)
    ap.add_argument("--only", help="run only the cases whose name contains this")
    a = ap.parse_args()
    peak = 1.0  # percentages are not compared here; skip measuring the peak
    worst = None
    print(f"{'case':<22}{'old ms':>10}{'new ms':>10}{'new/old speed':>15}{'rounds new won, middle half':>30}"
          f"   (medians of {a.rounds} alternating rounds)")
    for name, args, repeat in CASES:
        if a.only and a.only not in name:
            continue
        times = ([], [])  # old's, new's: by position, so a build against itself is an A/A check of the noise
        for r in range(a.rounds):
            for side in ((0, 1) if r % 2 == 0 else (1, 0)):
                times[side].append(bench((a.old, a.new)[side], args, repeat, a.threads, peak))
        old, new = statistics.median(times[0]), statistics.median(times[1])
        ratio = old / new
        worst = ratio if worst is None else min(worst, ratio)
        print(f"{name:<22}{old:>10.3f}{new:>10.3f}{ratio:>14.3f}x{paired(*times):>30}", flush=True)
    if worst is not None and worst < a.min_ratio:
        print(f"compare_builds: slowest case at {worst:.3f}x, below {a.min_ratio}x")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
