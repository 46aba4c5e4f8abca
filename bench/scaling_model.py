#!/usr/bin/env python3
"""scaling_model.py -- docs/SCALING.md's model of libmha_mpi's modes: time
per attention core (forward), the smallest block that hides the ring's
transfer, and memory per rank, from a rank's compute rate and the
interconnect's latency and bandwidth.

    bench/scaling_model.py [--rate GFLOPS] [--latency-us A] [--gbit W ...]
                           [--ranks P ...] [--seq N ...] [--heads 12] [--head-dim 64]
    bench/scaling_model.py --check   (this machine's measured figures, P = 2, 3, 4, N = 8192)

Counts (f32, batch 1, E = h d, non-causal; causal halves the FLOPs):
  FLOPs F = 4 N^2 E;  a ring step t_c = F / (P^2 R), its transfer
  t_x = a + 8 (N / P) E_kv / W (K and V of one block);  ring time
  P max(t_c, t_x);  smallest hiding block n* solves 4 n^2 E / R = a + 8 n E_kv / W.
  Ulysses: F / (P R) + 4 [(P - 1) a + 4 (P - 1) N E / (P^2 W)] (four
  all-to-alls, not overlapped), P <= h.
  Head-parallel (its attention part): F / (P R) + 2 (P - 1) [a + 4 N E / (P W)]
  (the ordered sum: all-to-all, then all-gather), P <= h.
  Memory per rank: ring 7 N E 4 / P bytes (q, out, the merged output, two
  K/V blocks); Ulysses 10 N E 4 / P (its blocks, its heads' whole
  sequences, the exchange buffer); head-parallel (3 + 4 / P) N E 4 (the
  whole input, output and sum buffer, its heads' q, k, v, o).
"""
import argparse
import math


def ring(n, p, e, ekv, r, a, w):
    tc = 4 * (n / p) ** 2 * e / r
    tx = a + 8 * (n / p) * ekv / w
    return p * max(tc, tx), tc >= tx


def smallest_block(e, ekv, r, a, w):
    qa, qb, qc = 4 * e / r, -8 * ekv / w, -a
    return (-qb + math.sqrt(qb * qb - 4 * qa * qc)) / (2 * qa)


def ulysses(n, p, e, r, a, w):
    return 4 * n * n * e / (p * r) + 4 * ((p - 1) * a + 4 * (p - 1) * n * e / (p * p * w))


def heads(n, p, e, r, a, w):
    return 4 * n * n * e / (p * r) + 2 * (p - 1) * (a + 4 * n * e / (p * w))


def fmt_time(s):
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s" if s < 100 else f"{s / 60:.1f} min"


def fmt_bytes(b):
    return f"{b / 2**20:.0f} MiB" if b < 2**30 else f"{b / 2**30:.1f} GiB"


def table(a):
    e = a.heads * a.head_dim
    r, lat = a.rate * 1e9, a.latency_us * 1e-6
    print(f"rank rate {a.rate:g} GFLOP/s, latency {a.latency_us:g} us, E = {e} ({a.heads} heads of {a.head_dim})\n")
    for gbit in a.gbit:
        w = gbit * 1e9 / 8
        n_star = smallest_block(e, e, r, lat, w)
        print(f"{gbit:g} Gb/s: the ring hides its transfer for blocks of >= {n_star:.0f} tokens a rank "
              f"({2 * n_star:.0f} causal)")
        print(f"| P | N | ring | hidden | Ulysses | head-parallel | memory/rank ring, Ulysses, heads |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for p in a.ranks:
            for n in a.seq:
                t, hidden = ring(n, p, e, e, r, lat, w)
                u = fmt_time(ulysses(n, p, e, r, lat, w)) if p <= a.heads else "n/a (P > h)"
                h = fmt_time(heads(n, p, e, r, lat, w)) if p <= a.heads else "n/a (P > h)"
                mem = f"{fmt_bytes(7 * n * e * 4 / p)}, " + (
                    f"{fmt_bytes(10 * n * e * 4 / p)}, {fmt_bytes((3 + 4 / p) * n * e * 4)}" if p <= a.heads else "n/a")
                print(f"| {p} | {n} | {fmt_time(t)} | {'yes' if hidden else 'no'} | {u} | {h} | {mem} |")
        print()


def check(a):
    """This machine: 2 cores shared by P ranks, so a rank computes at 2 R1 / P."""
    e, n, r1, lat, w = 768, 8192, a.rate * 1e9, a.latency_us * 1e-6, a.gbit[0] * 1e9 / 8
    for p in (2, 3, 4):
        t, hidden = ring(n, p, e, e, 2 * r1 / p, lat, w)
        print(f"P = {p}: ring predicted {fmt_time(t)} (transfer {'hidden' if hidden else 'exposed'})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=1000.0, help="a rank's attention rate, GFLOP/s")
    ap.add_argument("--latency-us", type=float, default=2.0)
    ap.add_argument("--gbit", type=float, nargs="+", default=[100.0, 400.0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 64, 1024])
    ap.add_argument("--seq", type=int, nargs="+", default=[32768, 262144, 1048576])
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--check", action="store_true", help="predict this machine's P = 2, 3, 4 runs")
    a = ap.parse_args()
    if a.check:
        check(a)
    else:
        table(a)


if __name__ == "__main__":
    main()
