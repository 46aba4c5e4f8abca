#!/usr/bin/python3
"""libmha against PyTorch, side by side, in one run.

    /usr/bin/python3 bench/compare_torch.py [--threads 2] [--repeat 10] [--quick] [--training]
    python bench/compare_torch.py --python [--threads 2] [--rounds 3] [--quick | --large | --small] [--training]
                                  [--optimizer]

--python (needs the Python package, `pip install .`, and any PyTorch, 2.x
for its public SDPA) compares in one process, through the same torch
tensors: mha.torch.scaled_dot_product_attention against
torch.nn.functional.scaled_dot_product_attention on [B, 12, N, 64], and
mha.torch.MultiheadAttention (from_torch of the same module) against
torch.nn.MultiheadAttention(768, 12, batch_first=True), forward (no_grad,
need_weights=False) and forward + backward (the input and every parameter
requiring grad), S1-S4 and causal (--training: the layer's forward +
backward alone).  --optimizer adds the layer's forward + backward
followed by a torch.optim.SGD step, as a training loop runs it: the
step changes the parameters in place, so the drop-in takes the new
values and packs them again before its next forward, which PyTorch's
own module does not need.  Rounds alternate PyTorch and libmha; each
prints the median over rounds of per-round medians, and the ratio.
--small times SDPA calls of a few query rows instead (SMALL_SHAPES: one
row against a cache's worth of keys, short prompts), in microseconds a
call, where a call's fixed cost in Python shows.

Without --python:

For each shape of the fast-kernel issue it times PyTorch 1.13 (Debian's
python3-torch, same thread count) and then `build/mha bench` on the same
shape, alternating so that both see the same machine state, and prints
medians, GFLOP/s, percent of the measured peak and the ratio.

  layer  nn.MultiheadAttention(E, h, batch_first=True).eval() under no_grad
         with need_weights=False (PyTorch's fast path); causal rows pass a
         boolean causal attn_mask, as PyTorch needs.
  train  (--training: only these) forward + backward of the layer: PyTorch
         in training mode (dropout 0) with the input requiring grad, the
         gradients dropped before each step, against `mha bench --op
         backward` (the zero deferred, forward on a tape, dX written).
  core   PyTorch 1.13's private F._scaled_dot_product_attention on
         [B*h, N, d] (what nn.MultiheadAttention calls; 1.13 has no public
         SDPA) against `mha bench --op sdpa`.
FLOPs follow docs/PERFORMANCE.md: projections 8*B*N*E^2, attention
4*B*N*S*E, halved when causal; forward + backward counts 3.5 forwards.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import shapes

torch = None  # imported in main(), after the peak is measured on an idle machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MHA = os.path.join(ROOT, "build", "mha")

LAYER_SHAPES = shapes.LAYER  # name, B, N, causal
TRAIN_SHAPES = shapes.TRAIN
CORE_SHAPES = [  # name, N, heads, kv heads, head dim
    ("core N=512", 512, 12, 12, 64), ("core N=2048", 2048, 12, 12, 64), ("core N=8192", 8192, 12, 12, 64),
    ("GQA 32/8 d=128 N=2048", 2048, 32, 8, 128),
]


def median_ms(fn, repeat):
    fn()
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def torch_layer_ms(B, N, E, H, causal, repeat):
    m = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
    x = torch.randn(B, N, E)
    mask = torch.ones(N, N, dtype=torch.bool).triu(1) if causal else None
    with torch.no_grad():
        return median_ms(lambda: m(x, x, x, attn_mask=mask, need_weights=False), repeat)


def torch_train_ms(B, N, E, H, causal, repeat):
    m = torch.nn.MultiheadAttention(E, H, batch_first=True, dropout=0.0).train()
    x = torch.randn(B, N, E, requires_grad=True)
    dy = torch.randn(B, N, E)
    mask = torch.ones(N, N, dtype=torch.bool).triu(1) if causal else None

    def step():
        m.zero_grad(set_to_none=True)
        x.grad = None
        out, _ = m(x, x, x, attn_mask=mask, need_weights=False)
        out.backward(dy)

    return median_ms(step, repeat)


def torch_core_ms(N, H, G, d, repeat):
    q = torch.randn(H, N, d)
    k = torch.randn(G, N, d).repeat_interleave(H // G, dim=0)
    v = torch.randn(G, N, d).repeat_interleave(H // G, dim=0)
    with torch.no_grad():
        return median_ms(lambda: torch.nn.functional._scaled_dot_product_attention(q, k, v), repeat)


def mha_bench(args, threads, repeat, peak):
    # PyTorch's OpenMP threads spin for a while after its last call; let them
    # go to sleep so they do not steal the cores from libmha's run.
    time.sleep(1.0)
    cmd = [MHA, "bench", "--json", "--threads", str(threads), "--repeat", str(repeat), "--peak-gflops", str(peak)]
    out = subprocess.run(cmd + args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def blas_in_use():
    """The BLAS library PyTorch's matmuls went through (Debian picks it with
    update-alternatives: reference BLAS unless OpenBLAS is installed)."""
    torch.randn(64, 64) @ torch.randn(64, 64)
    with open("/proc/self/maps") as maps:
        libs = {line.split()[-1] for line in maps if "blas" in line.lower() and "/" in line}
    return ", ".join(sorted(os.path.realpath(p) for p in libs)) or "unknown"


def py_cases(B, N, causal, E=768, H=12):
    """The five timed calls of one shape, each as (name, torch fn, mha fn)."""
    import mha.torch as mt
    F = torch.nn.functional
    d = E // H
    q, k, v = (torch.randn(B, H, N, d) for _ in range(3))
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    dout = torch.randn(B, H, N, d)

    def sdpa_train(fn):
        def step():
            for t in (qg, kg, vg):
                t.grad = None
            fn(qg, kg, vg, is_causal=causal).backward(dout)
        return step

    ref = torch.nn.MultiheadAttention(E, H, batch_first=True)
    ours = mt.MultiheadAttention.from_torch(ref)
    x = torch.randn(B, N, E)
    xg = x.clone().requires_grad_(True)
    dy = torch.randn(B, N, E)
    mask = torch.ones(N, N, dtype=torch.bool).triu(1) if causal else None

    def layer(m):
        def call():
            with torch.no_grad():
                m(x, x, x, attn_mask=mask, need_weights=False, is_causal=causal)
        return call

    def layer_train(m, optimizer=False):
        # A learning rate too small to move the float32 weights much: every
        # round times the same layer, yet each step writes the parameters.
        sgd = torch.optim.SGD(m.parameters(), lr=1e-9) if optimizer else None

        def step():
            m.zero_grad(set_to_none=True)
            xg.grad = None
            m(xg, xg, xg, attn_mask=mask, need_weights=False, is_causal=causal)[0].backward(dy)
            if sgd:
                sgd.step()
        return step

    def sdpa(fn):
        def call():
            with torch.no_grad():
                fn(q, k, v, is_causal=causal)
        return call

    return [("sdpa fwd", sdpa(F.scaled_dot_product_attention), sdpa(mt.scaled_dot_product_attention)),
            ("sdpa fwd+bwd", sdpa_train(F.scaled_dot_product_attention), sdpa_train(mt.scaled_dot_product_attention)),
            ("layer fwd", layer(ref), layer(ours)), ("layer fwd+bwd", layer_train(ref), layer_train(ours)),
            ("layer fwd+bwd+SGD", layer_train(ref, True), layer_train(ours, True))]


# Calls of a few query rows, as decoding and short prompts make them: name,
# B, query heads, kv heads, query rows, keys, head dim, causal.
SMALL_SHAPES = [
    ("1 head, 1 row x 1 key", 1, 1, 1, 1, 1, 64, False),
    ("12 heads, 16 x 16", 1, 12, 12, 16, 16, 64, False),
    ("12 heads, 128 x 128 causal", 1, 12, 12, 128, 128, 64, True),
    ("12 heads, 1 row x 4096", 1, 12, 12, 1, 4096, 64, False),
    ("12 heads, 16 rows x 4096", 1, 12, 12, 16, 4096, 64, False),
    ("GQA 32/8 d=128, 1 x 512", 1, 32, 8, 1, 512, 128, False),
    ("GQA 32/8 d=128, 1 x 4096", 1, 32, 8, 1, 4096, 128, False),
    ("GQA 32/8 d=128, 6 x 4096", 1, 32, 8, 6, 4096, 128, False),  # speculative decoding's few rows
]


def small_cases():
    """The SMALL_SHAPES' SDPA calls under no_grad, as (name, torch fn, mha
    fn), each fn making as many calls as take about 10 ms: a sample of
    calls of a few microseconds is not one timer reading, and each side's
    threads spin for a while after its last call (PyTorch's OpenMP ones
    for milliseconds), which in samples of a fraction of a millisecond
    took half of the other side's cores for the whole round."""
    import mha.torch as mt
    F = torch.nn.functional
    cases = []
    for name, B, Hq, Hkv, L, S, d, causal in SMALL_SHAPES:
        q, k, v = torch.randn(B, Hq, L, d), torch.randn(B, Hkv, S, d), torch.randn(B, Hkv, S, d)
        opts = dict(is_causal=causal, enable_gqa=Hq != Hkv)

        def batch(fn, q=q, k=k, v=v, opts=opts):
            time.sleep(0.05)  # the other side's threads asleep
            with torch.no_grad():
                fn(q, k, v, **opts)  # the first call is cold
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    fn(q, k, v, **opts)
                    times.append(time.perf_counter() - t0)
                calls = max(1, int(1e-2 / max(min(times), 1e-7)))

            def call():
                with torch.no_grad():
                    for _ in range(calls):
                        fn(q, k, v, **opts)
            call.calls = calls
            return call
        cases.append((name, batch(F.scaled_dot_product_attention), batch(mt.scaled_dot_product_attention)))
    return cases


def py_small(a):
    """--small: the SMALL_SHAPES, microseconds a call."""
    print(f"{'shape':<30}{'torch us':>10}{'mha us':>10}{'speed-up':>10}")
    for name, t_fn, m_fn in small_cases():
        t_runs, m_runs = [], []
        for _ in range(a.rounds):
            t_runs.append(median_ms(t_fn, a.repeat) * 1e3 / t_fn.calls)
            m_runs.append(median_ms(m_fn, a.repeat) * 1e3 / m_fn.calls)
        t, m = statistics.median(t_runs), statistics.median(m_runs)
        print(f"{name:<30}{t:>10.1f}{m:>10.1f}{t / m:>9.2f}x", flush=True)


def py_main(a):
    import mha
    if not hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        sys.exit(f"--python compares against PyTorch 2.x's public SDPA; this is torch {torch.__version__}")
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__} ({torch.__config__.parallel_info().splitlines()[0]}), mha {mha.__version__} "
          f"({mha.isa()}), {a.threads} threads, {a.rounds} alternating rounds of {a.repeat} calls")
    if a.small:
        return py_small(a)
    print(f"{'shape':<26}{'torch ms':>10}{'mha ms':>10}{'speed-up':>10}")
    for name, B, N, causal in LAYER_SHAPES:
        if (a.quick and N > 4096) or (a.large and N <= 4096):
            continue
        for what, t_fn, m_fn in py_cases(B, N, causal):
            wanted = "layer fwd+bwd+SGD" if a.optimizer else "layer fwd+bwd" if a.training else what
            if what != wanted or (what == "layer fwd+bwd+SGD" and not a.optimizer):
                continue
            t_runs, m_runs = [], []
            for _ in range(a.rounds):
                t_runs.append(median_ms(t_fn, a.repeat))
                m_runs.append(median_ms(m_fn, a.repeat))
            t, m = statistics.median(t_runs), statistics.median(m_runs)
            print(f"{what + ' ' + name:<26}{t:>10.2f}{m:>10.2f}{t / m:>9.2f}x", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", action="store_true", help="in-process: mha.torch against PyTorch's own")
    ap.add_argument("--rounds", type=int, default=3, help="--python: alternating rounds per row")
    ap.add_argument("--large", action="store_true", help="only the N=8192 shapes")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="skip the N=8192 shapes")
    ap.add_argument("--small", action="store_true", help="--python: only SDPA calls of a few query rows (decoding)")
    ap.add_argument("--training", action="store_true", help="only forward + backward of the layer (both modes)")
    ap.add_argument("--optimizer", action="store_true",
                    help="--python: only the layer's forward + backward and an SGD step, as a training loop")
    a = ap.parse_args()
    global torch
    if a.python:
        import torch as imported
        torch = imported
        return py_main(a)
    E, H = 768, 12
    peak_out = subprocess.run([MHA, "bench", "--peak", "--json", "--threads", str(a.threads)], check=True,
                              capture_output=True, text=True).stdout.strip().splitlines()
    peaks = [json.loads(line) for line in peak_out]
    f32_peak = [p for p in peaks if p["dtype"] == "f32" and p["threads"] == a.threads][0]
    peak = f32_peak["gflops"]
    import torch as imported
    torch = imported
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} threads, measured f32 peak {peak:.1f} GFLOP/s "
          f"({f32_peak['isa']}), medians of {a.repeat}")
    print(f"PyTorch's BLAS: {blas_in_use()}")
    print(f"{'shape':<24}{'torch ms':>10}{'mha ms':>10}{'speed-up':>10}{'mha GFLOP/s':>13}{'% peak':>8}"
          f"{'mha MB':>8}")
    for name, B, N, causal in TRAIN_SHAPES if a.training else []:
        t = torch_train_ms(B, N, E, H, causal, a.repeat)
        r = mha_bench(["--op", "backward", "--batch", str(B), "--seq", str(N), "--embed-dim", str(E),
                       "--num-heads", str(H)] + (["--is-causal"] if causal else []), a.threads, a.repeat, peak)
        print(f"{'train ' + name:<24}{t:>10.2f}{r['median_ms']:>10.2f}{t / r['median_ms']:>9.2f}x"
              f"{r['gflops']:>13.1f}{r['percent_of_peak']:>8.1f}{r.get('peak_rss_mb', 0):>8.0f}")
    for name, B, N, causal in [] if a.training else LAYER_SHAPES:
        if a.quick and N > 4096:
            continue
        t = torch_layer_ms(B, N, E, H, causal, a.repeat)
        r = mha_bench(["--op", "forward", "--batch", str(B), "--seq", str(N), "--embed-dim", str(E),
                       "--num-heads", str(H)] + (["--is-causal"] if causal else []), a.threads, a.repeat, peak)
        print(f"{'layer ' + name:<24}{t:>10.2f}{r['median_ms']:>10.2f}{t / r['median_ms']:>9.2f}x"
              f"{r['gflops']:>13.1f}{r['percent_of_peak']:>8.1f}{r.get('peak_rss_mb', 0):>8.0f}")
    for name, N, Hq, G, d in [] if a.training else CORE_SHAPES:
        if a.quick and N > 4096:
            continue
        t = torch_core_ms(N, Hq, G, d, a.repeat)
        r = mha_bench(["--op", "sdpa", "--seq", str(N), "--embed-dim", str(Hq * d), "--num-heads", str(Hq),
                       "--num-kv-heads", str(G)], a.threads, a.repeat, peak)
        print(f"{name:<24}{t:>10.2f}{r['median_ms']:>10.2f}{t / r['median_ms']:>9.2f}x"
              f"{r['gflops']:>13.1f}{r['percent_of_peak']:>8.1f}{r.get('peak_rss_mb', 0):>8.0f}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"PyTorch process peak resident memory: {rss:.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
