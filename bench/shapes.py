"""shapes.py -- the layer shapes the bench scripts time, in one place.

The fast-kernel issue's shapes (docs/PERFORMANCE.md): E = 768, 12 heads of
64 (`mha bench`'s defaults), batch B and sequence length N as below.
"""

LAYER = [  # name, B, N, causal
    ("S1", 8, 128, False),
    ("S2", 1, 512, False),
    ("S3", 1, 2048, False),
    ("S3 causal", 1, 2048, True),
    ("S4", 1, 8192, False),
    ("S4 causal", 1, 8192, True),
]
# Forward + backward: S4 is left out (a call takes seconds).
TRAIN = [shape for shape in LAYER if not shape[0].startswith("S4")]


def layer(name):
    """The (name, B, N, causal) row of a shape."""
    return next(shape for shape in LAYER if shape[0] == name)


def bench_args(name):
    """`mha bench` arguments (after --op) for a shape."""
    _, batch, seq, causal = layer(name)
    return ["--batch", str(batch), "--seq", str(seq)] + (["--is-causal"] if causal else [])
