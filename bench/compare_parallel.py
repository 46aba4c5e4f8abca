#!/usr/bin/env python3
"""compare_parallel.py -- the libmha_mpi modes against one process, side by
side in one run (docs/SCALING.md).

    bench/compare_parallel.py build/mha [--ranks 2] [--seq 8192 32768] [--rounds 3]

For each sequence length and mode, alternates R rounds of
  one process:  mha bench --op OP --seq N --threads P --json
  P ranks:      mpirun -np P mha bench --op OP --seq N --threads 1 --parallel MODE --json
(OP: sdpa for ring and Ulysses, forward for head parallelism; --causal adds
the causal cases) and prints the medians of the rounds' medians, the
ranks' speed as a fraction of the one process's, and the time the ranks
spent in transfers the compute did not hide.
"""
import argparse
import json
import os
import statistics
import subprocess

MODES = [("ring", "sdpa"), ("ulysses", "sdpa"), ("heads", "forward")]


def run(cmd, env):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mha")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=0, help="timed calls per run (default: by length)")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--modes", nargs="+", default=[m for m, _ in MODES])
    a = ap.parse_args()
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_btl="self,vader")
    print(f"{'case':<34}{'1 x ' + str(a.ranks) + ' thr ms':>14}{str(a.ranks) + ' ranks ms':>12}{'speed':>8}"
          f"{'transfer ms':>13}   (medians of {a.rounds} alternating rounds)")
    for n in a.seq:
        repeat = a.repeat or (5 if n <= 8192 else 1)
        for mode, op in MODES:
            if mode not in a.modes:
                continue
            shape = ["--op", op, "--seq", str(n), "--repeat", str(repeat), "--json"] + (["--is-causal"] if a.causal else [])
            one = [a.mha, "bench", *shape, "--threads", str(a.ranks), "--peak-gflops", "1"]
            par = ["mpirun", "--oversubscribe", "-np", str(a.ranks), a.mha, "bench", *shape, "--threads", "1",
                   "--parallel", mode]
            t1, tp, moved = [], [], []
            for r in range(a.rounds):
                for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                    if which == 0:
                        t1.append(run(one, env)["median_ms"])
                    else:
                        res = run(par, env)
                        tp.append(res["median_ms"])
                        moved.append(res["transfer_ms"])
            m1, mp, mx = statistics.median(t1), statistics.median(tp), statistics.median(moved)
            name = f"{mode} ({op}) N={n}{' causal' if a.causal else ''}"
            print(f"{name:<34}{m1:>14.1f}{mp:>12.1f}{m1 / mp:>7.2f}x{mx:>13.1f}", flush=True)


if __name__ == "__main__":
    main()
