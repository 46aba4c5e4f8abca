#!/usr/bin/env python3
"""compare_bits.py -- does a change keep the same bits?  Two builds of
`mha`, the same inputs, every output compared to the bit.

    bench/compare_bits.py OLD/mha NEW/mha [--cases N] [--seed S] [--threads T]

A refactor or a speed-up that claims "the same bits" proves it here, as
compare_builds.py proves it lost no speed.  Each case is a random layer
(nn.MultiheadAttention names, or Llama names with grouped K/V heads and
rotary embeddings) with inputs scaled x1, x4, x10 or x20 (x10 and up make
logits in the hundreds: the refined scores and the wide rows' exact
projections), causal or not, self- or cross-attention, sometimes a zero
key or the attention weights, from a few rows to 1030 (512 and more take
the attention's split products where the CPU has AMX; 768 and more, with
every key visible, items of 192 rows).  `mha forward`
and `mha backward` run on both builds, and NEW also on one thread (the
same bits for any thread count).  Every tensor of every output file must
match byte for byte; exits 1 naming the first that does not.

Standard library only: the safetensors files go through
tests/safetensors_file.py.
"""
import argparse
import os
import random
import subprocess
import sys
import tempfile
from array import array

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import safetensors_file  # noqa: E402  (the writer and reader tests/gen_golden.py uses)


def write_safetensors(path, tensors):
    """tensors: {name: (shape, array('f'))}, written as F32."""
    safetensors_file.write(path, {name: ("F32", shape, data.tobytes()) for name, (shape, data) in tensors.items()})


def uniform(rng, n, scale):
    return array("f", (rng.uniform(-scale, scale) for _ in range(n)))


def random_case(rng, index):
    """One layer and its inputs, and the flags both commands take."""
    llama = index % 3 == 2
    d = rng.choice([8, 16, 32, 64])
    heads = rng.choice([1, 2, 4, 6])
    kv_heads = rng.choice([h for h in (1, 2, heads) if heads % h == 0]) if llama else heads
    E = heads * d
    N = rng.choice([1, 2, 3])
    L = rng.choice([1, 5, 17, 40, 130, 520, 600]) if index % 4 else rng.choice([512, 600, 800, 1030])
    S = L if llama or rng.random() < 0.6 else rng.choice([3, 33, 520])
    x_scale = rng.choice([1.0, 4.0, 10.0, 20.0])
    w = 1.0 / E ** 0.5
    if llama:
        weights = {"q_proj.weight": ((E, E), uniform(rng, E * E, w)),
                   "k_proj.weight": ((kv_heads * d, E), uniform(rng, kv_heads * d * E, w)),
                   "v_proj.weight": ((kv_heads * d, E), uniform(rng, kv_heads * d * E, w)),
                   "o_proj.weight": ((E, E), uniform(rng, E * E, w))}
    else:
        weights = {"in_proj_weight": ((3 * E, E), uniform(rng, 3 * E * E, w)),
                   "in_proj_bias": ((3 * E,), uniform(rng, 3 * E, 0.5)),
                   "out_proj.weight": ((E, E), uniform(rng, E * E, w)),
                   "out_proj.bias": ((E,), uniform(rng, E, 0.1))}
    query = uniform(rng, L * N * E, x_scale)
    inputs = {"query": ((L, N, E), query), "grad_attn_output": ((L, N, E), uniform(rng, L * N * E, 1.0))}
    if S != L:
        inputs["key"] = ((S, N, E), uniform(rng, S * N * E, x_scale))
        inputs["value"] = ((S, N, E), uniform(rng, S * N * E, 1.0))
    flags = ["--num-heads", str(heads)]
    if rng.random() < 0.4 and S == L:
        flags.append("--is-causal")
    if llama:
        flags += ["--rope", "half"]
    elif rng.random() < 0.25:
        flags.append("--add-zero-attn")
    need_weights = not llama and rng.random() < 0.25 and L * S <= 40000
    options = " ".join(flags[2:]) + (" --need-weights" if need_weights else "")
    label = f"#{index} {'llama' if llama else 'torch'} N{N} L{L} S{S} E{E} H{heads} G{kv_heads} x{x_scale:g} {options}"

    return label, weights, inputs, flags, need_weights


def run(binary, command, files, flags, threads, out):
    cmd = [binary, command, "--weights", files["weights"], "--inputs", files["inputs"], "--out", out,
           "--threads", str(threads), *flags]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"compare_bits: {' '.join(cmd)} failed: {done.stderr.strip()}")
    return safetensors_file.read(out)[1]


def first_difference(a, b):
    """The first tensor whose dtype, shape or bytes differ, or None."""
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b or a[name] != b[name]:
            return name
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    differ = 0
    with tempfile.TemporaryDirectory() as tmp:
        files = {"weights": os.path.join(tmp, "w.safetensors"), "inputs": os.path.join(tmp, "x.safetensors")}
        for index in range(args.cases):
            label, weights, inputs, flags, need_weights = random_case(rng, index)
            write_safetensors(files["weights"], weights)
            write_safetensors(files["inputs"], inputs)
            outcome = []
            for command in ("forward", "backward"):
                extra = ["--need-weights"] if need_weights and command == "forward" else []
                runs = [run(args.old, command, files, flags + extra, args.threads, os.path.join(tmp, "old")),
                        run(args.new, command, files, flags + extra, args.threads, os.path.join(tmp, "new")),
                        run(args.new, command, files, flags + extra, 1, os.path.join(tmp, "one"))]
                for x, y, what in ((runs[0], runs[1], "new differs from old"),
                                   (runs[1], runs[2], f"new on 1 thread differs from {args.threads}")):
                    name = first_difference(x, y)
                    if name:
                        outcome.append(f"{command}: {what} in {name}")
            differ += bool(outcome)
            print(f"{label}: {'; '.join(outcome) if outcome else 'same bits'}", flush=True)
    print(f"compare_bits: {args.cases - differ} of {args.cases} cases the same to the bit")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
