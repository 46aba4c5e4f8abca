"""The golden files of tests/data/golden (PyTorch 1.13: float64 results as
the oracle, float32 ones as the baseline of the tolerance rule), replayed
through the Python API: nn.MultiheadAttention forward and backward with
every option the files cover, SDPA and its backward.  Each file says in
its metadata which command and flags produced it; the same flags become
the Python arguments here.  (bf16 cases are the C suite's.)"""

import glob
import json
import os
import struct

import numpy as np
import pytest

import mha
from reference import within_rule

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "data", "golden")


def metadata(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)).get("__metadata__", {})


def flags(args):
    """--name [value] pairs of a golden's args as a dict (True for switches)."""
    out, words = {}, args.split()
    for i, w in enumerate(words):
        if w.startswith("--"):
            nxt = words[i + 1] if i + 1 < len(words) else None
            out[w[2:]] = nxt if nxt is not None and not nxt.startswith("--") else True
    return out


def cases(*prefixes):
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(GOLDEN, "*.safetensors"))
                  if os.path.basename(p).startswith(prefixes))


def check(t, name, got, factor):
    expected = np.nan_to_num(t["expected." + name], nan=0.0)  # a fully masked row: 0, where PyTorch has NaN
    base = np.nan_to_num(t["torch32." + name], nan=0.0)
    ok, err, limit = within_rule(got, expected, base, factor)
    assert ok, f"{name}: error {err:.3g} > limit {limit:.3g}"


def sdpa_options(f):
    o = {}
    if "is-causal" in f:
        o["causal"] = "top_left"  # with or without a mask (PyTorch's is_causal excludes a mask)
    if "causal-bottom-right" in f:
        o["causal"] = "bottom_right"
    if "enable-gqa" in f:
        o["enable_gqa"] = True
    if "scale" in f:
        o["scale"] = float(f["scale"])
    if "softcap" in f:
        o["softcap"] = float(f["softcap"])
    if "window-left" in f or "window-right" in f:
        o["window"] = (int(f.get("window-left", -1)), int(f.get("window-right", -1)))
    return o


@pytest.mark.parametrize("name", cases("sdpa_", "bwd_sdpa_"))
def test_sdpa_golden(name):
    path = os.path.join(GOLDEN, name)
    f, t = flags(metadata(path).get("args", "")), mha.load_safetensors(path)
    o = sdpa_options(f)
    extra = dict(attn_mask=t.get("attn_mask"), alibi_slopes=t.get("alibi_slopes"))
    if name.startswith("bwd_"):
        grads = mha.scaled_dot_product_attention_backward(t["grad_output"], t["query"], t["key"], t["value"], **extra,
                                                          **o)
        for g, n in zip(grads, ("query", "key", "value")):
            check(t, n + ".grad", g, 3)
    else:
        out, lse = mha.scaled_dot_product_attention(t["query"], t["key"], t["value"], return_lse=True, **extra, **o)
        check(t, "output", out, 2)


def layer_for(t, f):
    prefix = f.get("prefix", "")
    w = {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
    E = w["out_proj.weight"].shape[0]
    kdim = w["k_proj_weight"].shape[1] if "k_proj_weight" in w else None
    vdim = w["v_proj_weight"].shape[1] if "v_proj_weight" in w else None
    layer = mha.MultiheadAttention(E, int(f["num-heads"]), bias="in_proj_bias" in w, add_bias_kv="bias_k" in w,
                                   add_zero_attn="add-zero-attn" in f, kdim=kdim, vdim=vdim,
                                   batch_first="batch-first" in f)
    layer.load_state_dict(t, strict=False, prefix=prefix)
    return layer, prefix


@pytest.mark.parametrize("name", [n for n in cases("fwd_", "bwd_fwd_") if "bf16" not in n])
def test_multihead_attention_golden(name):
    path = os.path.join(GOLDEN, name)
    f, t = flags(metadata(path).get("args", "")), mha.load_safetensors(path)
    layer, prefix = layer_for(t, f)
    q = t["query"]
    k, v = t.get("key", q), t.get("value", t.get("key", q))
    backward = name.startswith("bwd_")
    layer.training = backward
    out, weights = layer(q, k, v, key_padding_mask=t.get("key_padding_mask"), attn_mask=t.get("attn_mask"),
                         need_weights="need-weights" in f, average_attn_weights="no-average-attn-weights" not in f,
                         is_causal="is-causal" in f)
    if not backward:
        check(t, "attn_output", out, 2)
        if "need-weights" in f:
            check(t, "attn_output_weights", weights, 2)
        return
    gq, gk, gv = layer.backward(t["grad_attn_output"])
    check(t, "query.grad", gq, 3)
    if "key" in t:
        check(t, "key.grad", gk, 3)
    if "value" in t:
        check(t, "value.grad", gv, 3)
    for pname, g in layer.grads().items():
        check(t, prefix + pname + ".grad", g, 3)
