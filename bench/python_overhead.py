"""What the Python package adds to a call: mha.scaled_dot_product_attention
on numpy arrays against `mha bench --op sdpa` (the library called from C)
on the same shape, in alternating rounds on one machine.

    python bench/python_overhead.py --mha BUILD/mha [--rounds 8] [--threads 2]
    python bench/python_overhead.py --lib BUILD/libmha.so [--rounds 20]

Build the CLI with -DCMAKE_BUILD_TYPE=Release, as `pip install .` builds
the extension, so both sides run the same code.  --lib compares in one
process instead: mha_attention called through ctypes on the same arrays
(a few microseconds of ctypes per call) against the package, which takes
away the noise between two processes.  Default shape S1: B=8, N=128,
h=12, d=64.
"""
import argparse
import ctypes
import json
import statistics
import subprocess
import time

import numpy as np

import mha


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mha", help="the mha CLI, built Release")
    ap.add_argument("--lib", help="libmha.so, built Release: compare in one process")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    a = ap.parse_args()
    H, d = 12, 64
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((a.batch, H, a.seq, d)).astype(np.float32) for _ in range(3))

    def python_ms():
        mha.scaled_dot_product_attention(q, k, v, num_threads=a.threads)
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            mha.scaled_dot_product_attention(q, k, v, num_threads=a.threads)
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def lib_caller():
        """mha_attention through ctypes on q, k, v, as a C program calls it."""
        lib = ctypes.CDLL(a.lib)

        class Tensor(ctypes.Structure):
            _fields_ = [("data", ctypes.c_void_p), ("shape", ctypes.c_int64 * 4), ("stride", ctypes.c_int64 * 4)]

        def tensor(x):
            return Tensor(x.ctypes.data, (ctypes.c_int64 * 4)(*x.shape),
                          (ctypes.c_int64 * 4)(*(s // x.itemsize for s in x.strides)))

        ctx, desc, out = ctypes.c_void_p(), ctypes.create_string_buffer(512), np.empty_like(q)
        if lib.mha_ctx_create(a.threads, ctypes.byref(ctx)) != 0:
            raise SystemExit("mha_ctx_create failed")
        lib.mha_attn_desc_init(desc)  # the descriptor's defaults, in a buffer larger than it
        t = [tensor(x) for x in (out, q, k, v)]
        args = (ctx, ctypes.byref(t[0]), None, ctypes.byref(t[1]), ctypes.byref(t[2]), ctypes.byref(t[3]), desc)
        return lambda keep=(out, t): lib.mha_attention(*args)  # keep: the memory the pointers point into

    def lib_ms(call):
        call()
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def cli_ms():
        cmd = [a.mha, "bench", "--op", "sdpa", "--batch", str(a.batch), "--seq", str(a.seq), "--embed-dim",
               str(H * d), "--num-heads", str(H), "--repeat", str(a.repeat), "--threads", str(a.threads),
               "--peak-gflops", "1", "--json"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])["median_ms"]

    if not a.mha and not a.lib:
        raise SystemExit("give --mha (the CLI) or --lib (libmha.so)")
    direct = lib_caller() if a.lib else None
    other = "libmha.so" if a.lib else "mha bench"
    rows = []
    for r in range(a.rounds):
        c = lib_ms(direct) if direct else cli_ms()
        p = python_ms()
        rows.append((c, p))
        print(f"round {r + 1}: {other} {c:.3f} ms, Python {p:.3f} ms, ratio {p / c:.3f}", flush=True)
    c = statistics.median(x[0] for x in rows)
    p = statistics.median(x[1] for x in rows)
    ratios = sorted(x[1] / x[0] for x in rows)
    print(f"B={a.batch} N={a.seq} h={H} d={d}, {a.threads} threads ({mha.isa()}): medians {other} {c:.3f} ms, "
          f"Python {p:.3f} ms, ratio {p / c:.3f} (per-round ratios {ratios[0]:.3f}..{ratios[-1]:.3f})")


if __name__ == "__main__":
    main()
