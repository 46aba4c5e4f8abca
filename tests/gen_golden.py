#!/usr/bin/python3
"""Write the golden test cases in tests/data/golden/ from PyTorch.

Run with Debian's python3-torch:  /usr/bin/python3 tests/gen_golden.py
Tests never need Python; only regenerating does.  Output is deterministic.

Each case is one safetensors file holding everything a test needs:
  - the weights, under their nn.MultiheadAttention state_dict names,
  - the inputs (query, key, value, masks, alibi_slopes) under the CLI's names,
  - "expected.<output>": the float64 result (the oracle),
  - "torch32.<output>": PyTorch's float32 result (the baseline of the
    tolerance rule: our error may be at most twice PyTorch's),
  - "torchbf16.<output>" in cases marked "bf16": PyTorch computing in
    bfloat16, the baseline for `mha forward --dtype bf16`,
  - __metadata__ "command" (forward or sdpa) and "args" (its flags).
The C test runs `mha <command> --weights F --inputs F --out T <args>` and
compares T's tensors with these.

nn.MultiheadAttention goldens come from the module itself.  PyTorch 1.13
has no scaled_dot_product_attention, so SDPA goldens come from sdpa_math()
below, written with torch ops from the definitions (flash-attn's window
and ALiBi, Gemma's softcap), run in float64 and float32.
"""
import math
import os
import sys

import torch

import safetensors_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "data", "golden")

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
          torch.bfloat16: "BF16", torch.bool: "BOOL", torch.uint8: "U8",
          torch.int32: "I32", torch.int64: "I64"}


def tensor_bytes(t):
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: go through int16
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def save(path, tensors, metadata):
    safetensors_file.write(path, {name: (DTYPES[t.dtype], t.shape, tensor_bytes(t)) for name, t in tensors.items()},
                           metadata)


# ---------------------------------------------------------------------------
# nn.MultiheadAttention cases
# ---------------------------------------------------------------------------

def make_module(E, H, bias=True, add_bias_kv=False, add_zero_attn=False, kdim=None, vdim=None,
                batch_first=False):
    m = torch.nn.MultiheadAttention(E, H, bias=bias, add_bias_kv=add_bias_kv,
                                    add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim,
                                    batch_first=batch_first)
    with torch.no_grad():  # PyTorch zero-initialises biases; make every parameter count
        for name, p in m.named_parameters():
            fan_in = p.shape[-1] if p.dim() == 2 else E
            p.uniform_(-1.0, 1.0).mul_(1.0 / math.sqrt(fan_in) if p.dim() == 2 else 0.5)
    return m.eval()


def round_to(t, dtype):
    """Values as a file of `dtype` holds them (so both sides see the same)."""
    return t.to(dtype).to(torch.float32)


def forward_case(name, E, H, L, S=None, N=2, batched=True, batch_first=False, cross=False,
                 kdim=None, vdim=None, bias=True, add_bias_kv=False, add_zero_attn=False,
                 attn_mask=None, kpm=None, causal=False, need_weights=False, average=True,
                 prefix="", input_dtype=torch.float32, weight_dtype=torch.float32,
                 fully_masked_batch=None, scale_inputs=1.0, bf16=False, backward=False):
    """attn_mask: None, 'bool2', 'float2', 'bool3', 'float3'; kpm: None, 'bool', 'float'.

    backward: a case for `mha backward`: a random grad_attn_output and, from
    autograd in float64 (expected) and float32 (torch32), the gradient of
    every input (self-attention: the one query, summed over its three
    uses) and of every parameter, named <name>.grad."""
    S = L if S is None else S
    m = make_module(E, H, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first)
    if weight_dtype != torch.float32:
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(round_to(p, weight_dtype))
    kd, vd = kdim or E, vdim or E

    def shape(T, F):
        if not batched:
            return (T, F)
        return (N, T, F) if batch_first else (T, N, F)

    q = round_to(torch.randn(shape(L, E)) * scale_inputs, input_dtype)
    k = round_to(torch.randn(shape(S, kd)), input_dtype) if cross else q
    v = round_to(torch.randn(shape(S, vd)), input_dtype) if cross else q
    n = N if batched else 1
    inputs = {"query": q.to(input_dtype)}
    if cross:
        inputs["key"], inputs["value"] = k.to(input_dtype), v.to(input_dtype)

    # Masks in our CLI's form (PyTorch's own conventions) ...
    am = None
    if attn_mask:
        dims = (L, S) if attn_mask.endswith("2") else (n * H, L, S)
        if attn_mask.startswith("bool"):
            am = torch.rand(dims) < 0.3
            am[..., 0] = False  # every row keeps a key: PyTorch gives NaN otherwise
        else:
            am = torch.randn(dims)
        inputs["attn_mask"] = am
    kp = None
    if kpm:
        kp = torch.rand((n, S)) < 0.3
        kp[:, 0] = False  # key 0 stays visible to every row, under every mask and causal
        if fully_masked_batch is not None:
            kp[fully_masked_batch, :] = True
        if kpm == "float":
            kp = torch.where(kp, torch.tensor(-1e9), torch.randn((n, S)))
        inputs["key_padding_mask"] = kp if batched else kp[0]
    causal_mask = torch.ones(L, S).tril().logical_not() if causal else None
    if causal:
        # keep the first key of every row visible under combined masks
        if am is not None and am.dtype == torch.bool:
            am[..., 0] = False

    # ... and one float mask for PyTorch 1.13, which cannot merge every mix.
    def merged(dtype):
        total = torch.zeros((n, H, L, S), dtype=dtype)
        for part in (am, causal_mask):
            if part is None:
                continue
            part = part.reshape((n, H, L, S) if part.dim() == 3 else (1, 1, L, S))
            total = total + (torch.where(part, float("-inf"), 0.0) if part.dtype == torch.bool else part).to(dtype)
        if kp is not None:
            kpf = torch.where(kp, float("-inf"), 0.0) if kp.dtype == torch.bool else kp
            total = total + kpf.to(dtype).reshape(n, 1, 1, S)
        return total.reshape(n * H, L, S)

    def module_and_mask(dtype):
        mm = make_module(E, H, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first)
        mm.load_state_dict(m.state_dict())
        mm = mm.to(dtype)
        mask = merged(dtype) if (am is not None or kp is not None or causal) else None
        if mask is not None and not batched:
            mask = mask.reshape(H, L, S)
        return mm, mask

    def run(dtype):
        mm, mask = module_and_mask(dtype)
        with torch.no_grad():
            out, w = mm(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=mask,
                        need_weights=need_weights, average_attn_weights=average)
        out = out.detach().clone()
        w = w.detach().clone() if w is not None else None
        if fully_masked_batch is not None:
            # Our definition: a row with no visible key attends to nothing
            # (PyTorch gives NaN), so the layer outputs out_proj.bias.
            b = fully_masked_batch
            ob = mm.out_proj.bias.detach() if bias else torch.zeros(E, dtype=dtype)
            sel = (slice(None), b) if not batch_first else (b,)
            out[sel] = ob
            if w is not None:
                w[b] = 0
        return out, w

    def run_grad(dtype, grad):
        mm, mask = module_and_mask(dtype)
        leaves = {"query": q.to(dtype).requires_grad_()}
        if cross:
            leaves["key"] = k.to(dtype).requires_grad_()
            leaves["value"] = v.to(dtype).requires_grad_()
        x = leaves["query"]
        out, _ = mm(x, leaves.get("key", x), leaves.get("value", x), attn_mask=mask, need_weights=False)
        out.backward(grad.to(dtype))
        grads = {f"{name_}.grad": t.grad for name_, t in leaves.items()}
        grads.update({f"{prefix}{name_}.grad": p.grad for name_, p in mm.named_parameters()})
        return grads

    if backward:
        grad = torch.randn(q.shape)
        grads64, grads32 = run_grad(torch.float64, grad), run_grad(torch.float32, grad)
    out64, w64 = run(torch.float64)
    out32, w32 = run(torch.float32)
    if bf16:  # PyTorch computing in bfloat16: the baseline for `mha forward --dtype bf16`
        out16, w16 = run(torch.bfloat16)
    tensors = {prefix + k_: round_to(t, weight_dtype).to(weight_dtype) if weight_dtype != torch.float32 else t
               for k_, t in m.state_dict().items()}
    if prefix:
        tensors["decoy.out_proj.weight"] = torch.zeros(3, 3)  # another block in the same file
    tensors.update(inputs)
    if backward:
        tensors["grad_attn_output"] = grad
        for name_ in grads64:
            tensors["expected." + name_] = grads64[name_]
            tensors["torch32." + name_] = grads32[name_]
        args = ["--num-heads", str(H)] + (["--batch-first"] if batch_first else []) + \
            (["--add-zero-attn"] if add_zero_attn else []) + (["--is-causal"] if causal else []) + \
            (["--prefix", prefix] if prefix else [])
        save(os.path.join(OUT, name + ".safetensors"), tensors, {"command": "backward", "args": " ".join(args)})
        return
    tensors["expected.attn_output"] = out64
    tensors["torch32.attn_output"] = out32
    if need_weights:
        tensors["expected.attn_output_weights"] = w64
        tensors["torch32.attn_output_weights"] = w32
    if bf16:
        tensors["torchbf16.attn_output"] = out16.float()
        if need_weights:
            tensors["torchbf16.attn_output_weights"] = w16.float()
    args = ["--num-heads", str(H)]
    if batch_first:
        args.append("--batch-first")
    if need_weights:
        args.append("--need-weights")
        if not average:
            args.append("--no-average-attn-weights")
    if add_zero_attn:
        args.append("--add-zero-attn")
    if causal:
        args.append("--is-causal")
    if prefix:
        args += ["--prefix", prefix]
    meta = {"command": "forward", "args": " ".join(args)}
    if bf16:
        meta["bf16"] = "yes"
    save(os.path.join(OUT, name + ".safetensors"), tensors, meta)


# ---------------------------------------------------------------------------
# scaled_dot_product_attention cases
# ---------------------------------------------------------------------------

def sdpa_math(q, k, v, mask=None, causal=None, scale=None, gqa=False, window=(-1, -1),
              softcap=0.0, alibi=None):
    """Reference SDPA from the definitions, in q's dtype.

    Score order: scale, softcap, ALiBi, mask, then causal/window exclusion.
    A row with no visible key gives output 0 and lse -inf.
    """
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if gqa:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(L).reshape(L, 1)
    j = torch.arange(S).reshape(1, S)
    diag = i + S - L
    if alibi is not None:
        s = s - alibi.to(q.dtype).reshape(1, Hq, 1, 1) * (diag - j).abs().to(q.dtype)
    visible = torch.ones(L, S, dtype=torch.bool)
    if mask is not None:
        if mask.dtype == torch.bool:
            visible = visible & mask
        else:
            s = s + mask.to(q.dtype)
    if causal == "top_left":
        visible = visible & (j <= i)
    if causal == "bottom_right":
        visible = visible & (j <= diag)
    if window[0] >= 0:
        visible = visible & (j >= diag - window[0])
    if window[1] >= 0:
        visible = visible & (j <= diag + window[1])
    s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    empty = m == float("-inf")
    p = torch.exp(s - torch.where(empty, torch.zeros_like(m), m))
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p / torch.where(empty, torch.ones_like(denom), denom), v)
    lse = torch.where(empty, m, m + torch.log(denom)).squeeze(-1)
    return out, lse


def sdpa_case(name, B, Hq, L, S, D, Dv=None, Hkv=None, mask=None, causal=None, scale=None,
              window=(-1, -1), softcap=0.0, alibi=False, fully_masked=False, input_dtype=torch.float32,
              scale_inputs=1.0, backward=False):
    """mask: None, 'bool_LS', 'bool_B1LS', 'bool_1H1S', 'float_BHLS', 'float_LS'.

    backward: a case for `mha sdpa-backward`: a random grad_output, and the
    gradients of query, key and value from autograd in float64 (expected)
    and float32 (torch32)."""
    Dv = D if Dv is None else Dv
    Hkv = Hq if Hkv is None else Hkv
    q = round_to(torch.randn(B, Hq, L, D) * scale_inputs, input_dtype)
    k = round_to(torch.randn(B, Hkv, S, D) * scale_inputs, input_dtype)
    v = round_to(torch.randn(B, Hkv, S, Dv), input_dtype)
    tensors = {"query": q.to(input_dtype), "key": k.to(input_dtype), "value": v.to(input_dtype)}
    m = None
    if mask:
        kind, dims = mask.split("_")
        sizes = {"B": B, "H": Hq, "L": L, "S": S, "1": 1}
        shape = [sizes[c] for c in dims]
        m = torch.rand(shape) < 0.7 if kind == "bool" else torch.randn(shape)
        if fully_masked:
            m[..., 0, :] = False if kind == "bool" else float("-inf")
        tensors["attn_mask"] = m
    slopes = None
    if alibi:
        slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / Hq) for h in range(Hq)])
        tensors["alibi_slopes"] = slopes
    kw = dict(mask=m, causal=causal, scale=scale, gqa=Hkv != Hq, window=window, softcap=softcap, alibi=slopes)
    if backward:
        grad = torch.randn(B, Hq, L, Dv)
        tensors["grad_output"] = grad
        for prefix, dtype in (("expected", torch.float64), ("torch32", torch.float32)):
            leaves = [t.to(dtype).detach().requires_grad_() for t in (q, k, v)]
            out, _ = sdpa_math(*leaves, **kw)
            out.backward(grad.to(dtype))
            for tensor_name, leaf in zip(("query", "key", "value"), leaves):
                tensors[f"{prefix}.{tensor_name}.grad"] = leaf.grad
    else:
        out64, lse64 = sdpa_math(q.double(), k.double(), v.double(), **kw)
        out32, lse32 = sdpa_math(q, k, v, **kw)
        tensors.update({"expected.output": out64, "expected.lse": lse64,
                        "torch32.output": out32, "torch32.lse": lse32})
    args = []
    if causal == "top_left":
        args.append("--is-causal")
    if causal == "bottom_right":
        args.append("--causal-bottom-right")
    if scale is not None:
        args += ["--scale", repr(scale)]
    if Hkv != Hq:
        args.append("--enable-gqa")
    if window[0] >= 0:
        args += ["--window-left", str(window[0])]
    if window[1] >= 0:
        args += ["--window-right", str(window[1])]
    if softcap > 0:
        args += ["--softcap", repr(softcap)]
    save(os.path.join(OUT, name + ".safetensors"), tensors,
         {"command": "sdpa-backward" if backward else "sdpa", "args": " ".join(args)})


# ---------------------------------------------------------------------------
# Attention blocks of published models (Llama, Mistral, GPT-2, GPT-J, Gemma-2)
# ---------------------------------------------------------------------------

def rope_angles(T, position, dim, theta, dtype):
    """cos and sin [T, dim/2] of (position + t) * theta^(-2i/dim), computed in
    `dtype` as the models' own code does (HF computes them in float32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=dtype) / dim))
    freqs = (position + torch.arange(T, dtype=dtype))[:, None] * inv_freq[None, :]
    return freqs.cos(), freqs.sin()


def apply_rope(x, kind, dim, theta, position):
    """x [B, H, T, d]: Llama/GPT-NeoX rotate_half on the first `dim`
    dimensions, or GPT-J's rotate_every_two."""
    cos, sin = rope_angles(x.shape[2], position, dim, theta, x.dtype)
    rot, rest = x[..., :dim], x[..., dim:]
    if kind == "half":
        x1, x2 = rot[..., :dim // 2], rot[..., dim // 2:]
        rot = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([rot, rest], dim=-1)


# Q, K, V and O apart: each family's module names.
SEPARATE_NAMES = {
    "llama": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"},
    "bert": {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "o": "attention.output.dense"},
}


def block_math(x, w, H, G, hd, rope=None, rope_dim=None, theta=10000.0, position=0, window=-1, softcap=0.0,
               alibi=None, causal=True, pad=None):
    """An attention block from its definition, causal (a decoder's) or not
    (an encoder's), in x's dtype: w holds q, k, v, o as [out, in] matrices
    and optional biases; pad [B, T], True where a key is padding."""
    B, T, E = x.shape
    lin = lambda t, name: t @ w[name].T + (w[name + "_b"] if name + "_b" in w else 0)
    q = lin(x, "q").reshape(B, T, H, hd).transpose(1, 2)
    k = lin(x, "k").reshape(B, T, G, hd).transpose(1, 2)
    v = lin(x, "v").reshape(B, T, G, hd).transpose(1, 2)
    if rope:
        q = apply_rope(q, rope, rope_dim or hd, theta, position)
        k = apply_rope(k, rope, rope_dim or hd, theta, position)
    k = k.repeat_interleave(H // G, dim=1)  # Llama's repeat_kv
    v = v.repeat_interleave(H // G, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(T).reshape(T, 1)
    j = torch.arange(T).reshape(1, T)
    if alibi is not None:
        s = s - alibi.to(x.dtype).reshape(1, H, 1, 1) * (i - j).abs().to(x.dtype)
    visible = j <= i if causal else torch.ones(T, T, dtype=torch.bool)
    if pad is not None:
        visible = visible & ~pad.reshape(B, 1, 1, T)
    if window >= 0:
        visible = visible & (j >= i - window)
    p = torch.softmax(s.masked_fill(~visible, float("-inf")), dim=-1)
    out = (p @ v).transpose(1, 2).reshape(B, T, H * hd)
    return lin(out, "o")


def block_grads(family, prefix, wd):
    """The weights' gradients under the names and layouts the family saves
    its weights in (GPT-2: Conv1D, the transposes, Q, K, V in one)."""
    grads = {}
    if family in ("llama", "bert"):
        for part in "qkvo":
            grads[prefix + SEPARATE_NAMES[family][part] + ".weight.grad"] = wd[part].grad
            if part + "_b" in wd:
                grads[prefix + SEPARATE_NAMES[family][part] + ".bias.grad"] = wd[part + "_b"].grad
        return grads
    grads[prefix + "c_attn.weight.grad"] = torch.cat([wd[p].grad for p in "qkv"]).T.contiguous()
    if "q_b" in wd:
        grads[prefix + "c_attn.bias.grad"] = torch.cat([wd[p + "_b"].grad for p in "qkv"])
    grads[prefix + "c_proj.weight.grad"] = wd["o"].grad.T.contiguous()
    if "o_b" in wd:
        grads[prefix + "c_proj.bias.grad"] = wd["o_b"].grad
    return grads


def block_case(name, family, E, H, G, hd, T=9, B=2, bias=False, out_bias=False, rope=None, rope_dim=None,
               theta=10000.0, position=0, window=-1, softcap=0.0, alibi=False, prefix="", backward=False,
               causal=True, pad_last=0):
    """A block's weights under `family`'s names (llama: q_proj.weight ...,
    bert: attention.self.query.weight ..., gpt2: c_attn/c_proj as Conv1D
    [in, out]), a [B, T, E] input, and the block's output (or, with
    backward, every gradient) in float64 and float32.  pad_last > 0: the
    last batch element's last pad_last keys are padding (key_padding_mask),
    as an encoder's batch of sentences of unequal length has."""
    qd, kvd = H * hd, G * hd
    w = {"q": torch.randn(qd, E) / math.sqrt(E), "k": torch.randn(kvd, E) / math.sqrt(E),
         "v": torch.randn(kvd, E) / math.sqrt(E), "o": torch.randn(E, qd) / math.sqrt(qd)}
    if bias:
        w.update({"q_b": torch.randn(qd) * 0.5, "k_b": torch.randn(kvd) * 0.5, "v_b": torch.randn(kvd) * 0.5})
    if bias == "no_k":  # Whisper's attention: q and v biases, none on k
        del w["k_b"]
    if out_bias:
        w["o_b"] = torch.randn(E) * 0.5
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)]) if alibi else None
    x = torch.randn(B, T, E)
    tensors = {}
    if family in ("llama", "bert"):
        for part in "qkvo":
            tensors[prefix + SEPARATE_NAMES[family][part] + ".weight"] = w[part]
            if part + "_b" in w:
                tensors[prefix + SEPARATE_NAMES[family][part] + ".bias"] = w[part + "_b"]
    else:  # GPT-2: one c_attn for Q, K, V, weights stored [in, out]
        tensors[prefix + "c_attn.weight"] = torch.cat([w["q"], w["k"], w["v"]]).T.contiguous()  # (GPT-2 has all three biases)
        if bias:
            tensors[prefix + "c_attn.bias"] = torch.cat([w["q_b"], w["k_b"], w["v_b"]])
        tensors[prefix + "c_proj.weight"] = w["o"].T.contiguous()
        if out_bias:
            tensors[prefix + "c_proj.bias"] = w["o_b"]
    tensors["query"] = x
    if slopes is not None:
        tensors["alibi_slopes"] = slopes
    pad = None
    if pad_last:
        pad = torch.zeros(B, T, dtype=torch.bool)
        pad[B - 1, T - pad_last:] = True
        tensors["key_padding_mask"] = pad
    kw = dict(H=H, G=G, hd=hd, rope=rope, rope_dim=rope_dim, theta=theta, position=position, window=window,
              softcap=softcap, alibi=slopes, causal=causal, pad=pad)
    if backward:
        grad = torch.randn(B, T, E)
        tensors["grad_attn_output"] = grad
        for prefix_, dtype in (("expected", torch.float64), ("torch32", torch.float32)):
            wd = {k_: t.to(dtype).requires_grad_() for k_, t in w.items()}
            xd = x.to(dtype).requires_grad_()
            block_math(xd, wd, **kw).backward(grad.to(dtype))
            tensors[f"{prefix_}.query.grad"] = xd.grad
            tensors.update(block_grads(family, prefix_ + "." + prefix, wd))
    else:
        tensors["expected.attn_output"] = block_math(x.double(), {k_: t.double() for k_, t in w.items()}, **kw)
        tensors["torch32.attn_output"] = block_math(x, w, **kw)
    args = ["--num-heads", str(H), "--batch-first"] + (["--is-causal"] if causal else []) + ["--names", family]
    if rope:
        args += ["--rope", rope, "--rope-theta", repr(theta)]
        if rope_dim:
            args += ["--rope-dim", str(rope_dim)]
        if position:
            args += ["--position", str(position)]
    if window >= 0:
        args += ["--window-left", str(window)]
    if softcap:
        args += ["--softcap", repr(softcap)]
    if prefix:
        args += ["--prefix", prefix]
    save(os.path.join(OUT, name + ".safetensors"), tensors,
         {"command": "backward" if backward else "forward", "args": " ".join(args)})


def make_demo(path):
    """The README demo's example: a 64-wide, 8-head self-attention block
    over 6 tokens, with PyTorch's own outputs (causal, need_weights) saved
    beside it so the demo can show both."""
    E, H, L = 64, 8, 6
    m = make_module(E, H)
    x = torch.randn(L, E)
    causal = torch.ones(L, L).tril().logical_not()
    with torch.no_grad():
        out, w = m(x, x, x, attn_mask=causal, need_weights=True)
    tensors = dict(m.state_dict())
    tensors["query"] = x
    tensors["pytorch.attn_output"] = out
    tensors["pytorch.attn_output_weights"] = w
    save(path, tensors, {"about": "nn.MultiheadAttention(64, 8) state_dict, a [6, 64] query, "
                                  "and PyTorch's outputs with a causal mask and need_weights"})


def random_combinations(n_forward, n_sdpa):
    """Options drawn at random, so combinations nobody listed get tested."""
    g = torch.Generator().manual_seed(7)

    def draw(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    for i in range(n_forward):
        H = draw([1, 2, 3, 4, 6])
        E = H * draw([4, 5, 8, 11, 16])
        cross = draw([False, True])
        batched = draw([True, True, False])
        forward_case(f"combo_fwd_{i:02d}", E=E, H=H, L=draw([1, 3, 8, 21, 37]),
                     S=draw([1, 4, 9, 30]) if cross else None, N=draw([1, 2, 3]), batched=batched,
                     batch_first=batched and draw([False, True]), cross=cross,
                     kdim=draw([None, 7]) if cross else None, vdim=draw([None, 5]) if cross else None,
                     bias=draw([True, True, False]), add_bias_kv=draw([False, True]),
                     add_zero_attn=draw([False, True]),
                     attn_mask=draw([None, "bool2", "float2", "bool3", "float3"]),
                     kpm=draw([None, "bool", "float"]), causal=draw([False, True]),
                     need_weights=draw([False, True]), average=draw([True, False]))
    for i in range(n_sdpa):
        Hkv = draw([1, 2])
        L, S = draw([1, 5, 16, 33]), draw([1, 6, 17, 40])
        sdpa_case(f"combo_sdpa_{i:02d}", B=draw([1, 2]), Hq=Hkv * draw([1, 1, 2, 4]), Hkv=Hkv, L=L, S=S,
                  D=draw([8, 12, 32, 48]), Dv=draw([None, 16]),
                  mask=draw([None, "bool_LS", "bool_B1LS", "bool_1H1S", "float_BHLS", "float_LS"]),
                  causal=draw([None, "top_left", "bottom_right"]), scale=draw([None, None, 0.3]),
                  window=(draw([-1, -1, 0, 3, 10]), draw([-1, -1, 0, 2])), softcap=draw([0.0, 0.0, 3.0]),
                  alibi=draw([False, True]))


def main():
    torch.manual_seed(20261122)
    make_demo(os.path.join(HERE, "..", "examples", "demo.safetensors"))
    os.makedirs(OUT, exist_ok=True)
    for f in os.listdir(OUT):
        if f.endswith(".safetensors"):
            os.remove(os.path.join(OUT, f))

    # nn.MultiheadAttention: every option, odd sizes, head dims 8..128.
    forward_case("fwd_basic", E=16, H=2, L=5, bf16=True)
    forward_case("fwd_batch_first", E=24, H=3, L=7, N=3, batch_first=True)
    forward_case("fwd_unbatched", E=20, H=2, L=9, batched=False)
    forward_case("fwd_unbatched_weights", E=20, H=4, L=6, batched=False, need_weights=True, average=False,
                 attn_mask="bool3")
    forward_case("fwd_cross", E=32, H=4, L=6, S=11, cross=True, batch_first=True, bf16=True)
    forward_case("fwd_kdim_vdim", E=24, H=2, L=5, S=8, cross=True, kdim=10, vdim=14, need_weights=True, bf16=True)
    forward_case("fwd_no_bias", E=16, H=4, L=4, bias=False, need_weights=True)
    forward_case("fwd_bias_kv", E=16, H=2, L=5, add_bias_kv=True, need_weights=True, attn_mask="bool2",
                 kpm="bool")
    forward_case("fwd_zero_attn", E=16, H=2, L=5, add_zero_attn=True, need_weights=True, average=False,
                 attn_mask="float3", kpm="bool")
    forward_case("fwd_bias_kv_zero_attn", E=12, H=3, L=4, S=6, cross=True, add_bias_kv=True,
                 add_zero_attn=True, need_weights=True, average=False, kpm="float", batch_first=True)
    forward_case("fwd_mask_bool2", E=16, H=2, L=8, attn_mask="bool2", need_weights=True)
    forward_case("fwd_mask_float2", E=16, H=2, L=8, attn_mask="float2", need_weights=True)
    forward_case("fwd_mask_bool3", E=16, H=2, L=7, S=9, cross=True, attn_mask="bool3", need_weights=True,
                 average=False)
    forward_case("fwd_mask_float3", E=16, H=2, L=7, attn_mask="float3")
    forward_case("fwd_kpm_bool", E=16, H=2, L=10, kpm="bool", need_weights=True)
    forward_case("fwd_kpm_float", E=16, H=2, L=10, kpm="float", batch_first=True)
    forward_case("fwd_masks_mixed", E=16, H=4, L=6, attn_mask="float2", kpm="bool", need_weights=True, bf16=True)
    forward_case("fwd_bf16_wide", E=128, H=2, L=40, N=2, batch_first=True, bf16=True)
    forward_case("fwd_masks_float_both", E=16, H=4, L=6, attn_mask="float3", kpm="float")
    forward_case("fwd_masks_bool_float", E=16, H=2, L=6, attn_mask="bool2", kpm="float")
    forward_case("fwd_causal", E=24, H=3, L=13, causal=True, need_weights=True, average=False, bf16=True)
    forward_case("fwd_causal_mask", E=24, H=3, L=9, causal=True, attn_mask="bool2", kpm="bool",
                 batch_first=True)
    forward_case("fwd_causal_cross", E=16, H=2, L=5, S=9, cross=True, causal=True, need_weights=True)
    forward_case("fwd_fully_masked", E=16, H=2, L=4, N=3, kpm="bool", fully_masked_batch=1,
                 need_weights=True)
    forward_case("fwd_long", E=64, H=2, L=70, S=67, cross=True, N=1, need_weights=True, bf16=True)
    forward_case("fwd_head128", E=128, H=1, L=9, N=1, bf16=True)
    forward_case("fwd_head8x8", E=64, H=8, L=33, N=1, attn_mask="bool2")
    forward_case("fwd_head_odd", E=3 * 13, H=3, L=17, S=23, cross=True, N=2)
    forward_case("fwd_one_token", E=16, H=2, L=1, S=1, cross=True)
    forward_case("fwd_prefix", E=16, H=2, L=5, prefix="encoder.layers.0.self_attn.", batch_first=True)
    forward_case("fwd_bf16_inputs", E=32, H=4, L=8, input_dtype=torch.bfloat16, need_weights=True)
    forward_case("fwd_f16_weights", E=32, H=2, L=8, weight_dtype=torch.float16)
    forward_case("fwd_f64_inputs", E=16, H=2, L=6, input_dtype=torch.float64, weight_dtype=torch.float64)
    forward_case("fwd_large_inputs", E=32, H=4, L=12, scale_inputs=30.0, need_weights=True)

    # scaled_dot_product_attention: every variant, odd sizes.
    sdpa_case("sdpa_basic", B=2, Hq=3, L=5, S=7, D=8)
    sdpa_case("sdpa_dv", B=1, Hq=2, L=9, S=4, D=24, Dv=40)
    sdpa_case("sdpa_causal_square", B=2, Hq=2, L=11, S=11, D=16, causal="top_left")
    sdpa_case("sdpa_causal_tl_wide", B=1, Hq=2, L=5, S=12, D=16, causal="top_left")
    sdpa_case("sdpa_causal_tl_tall", B=1, Hq=2, L=12, S=5, D=16, causal="top_left")
    sdpa_case("sdpa_causal_br_wide", B=1, Hq=2, L=5, S=12, D=16, causal="bottom_right")
    sdpa_case("sdpa_causal_br_tall", B=1, Hq=2, L=12, S=5, D=16, causal="bottom_right")
    sdpa_case("sdpa_scale", B=1, Hq=2, L=6, S=6, D=32, scale=0.37)
    sdpa_case("sdpa_gqa", B=2, Hq=8, Hkv=2, L=9, S=13, D=16, causal="bottom_right")
    sdpa_case("sdpa_mqa", B=1, Hq=6, Hkv=1, L=7, S=7, D=12)
    sdpa_case("sdpa_window_left", B=1, Hq=2, L=20, S=20, D=16, window=(3, -1))
    sdpa_case("sdpa_window_both", B=1, Hq=2, L=9, S=21, D=16, window=(4, 2))
    sdpa_case("sdpa_window_causal", B=1, Hq=2, L=16, S=16, D=16, causal="bottom_right", window=(5, 0))
    sdpa_case("sdpa_window_right", B=1, Hq=1, L=14, S=10, D=8, window=(-1, 1))
    sdpa_case("sdpa_softcap", B=1, Hq=2, L=8, S=8, D=16, softcap=2.5, scale_inputs=4.0)
    sdpa_case("sdpa_alibi", B=1, Hq=4, L=10, S=14, D=16, alibi=True)
    sdpa_case("sdpa_alibi_causal_softcap", B=1, Hq=4, L=10, S=10, D=16, alibi=True, causal="top_left",
              softcap=5.0)
    sdpa_case("sdpa_mask_bool_LS", B=2, Hq=2, L=6, S=9, D=8, mask="bool_LS")
    sdpa_case("sdpa_mask_bool_B1LS", B=2, Hq=3, L=6, S=9, D=8, mask="bool_B1LS")
    sdpa_case("sdpa_mask_bool_1H1S", B=2, Hq=3, L=6, S=9, D=8, mask="bool_1H1S")
    sdpa_case("sdpa_mask_float_BHLS", B=2, Hq=2, L=6, S=9, D=8, mask="float_BHLS")
    sdpa_case("sdpa_mask_float_LS", B=1, Hq=2, L=6, S=9, D=8, mask="float_LS", causal="top_left")
    sdpa_case("sdpa_fully_masked_bool", B=1, Hq=2, L=5, S=6, D=8, mask="bool_BHLS", fully_masked=True)
    sdpa_case("sdpa_fully_masked_float", B=1, Hq=2, L=5, S=6, D=8, mask="float_BHLS", fully_masked=True)
    sdpa_case("sdpa_long", B=1, Hq=2, L=70, S=65, D=64, causal="bottom_right")
    sdpa_case("sdpa_head128", B=1, Hq=1, L=33, S=47, D=128)
    sdpa_case("sdpa_head_odd", B=1, Hq=3, L=17, S=19, D=40, Dv=24, window=(6, 6))
    sdpa_case("sdpa_one_key", B=1, Hq=1, L=3, S=1, D=8)
    sdpa_case("sdpa_f16_inputs", B=1, Hq=2, L=9, S=9, D=16, input_dtype=torch.float16)
    sdpa_case("sdpa_large_logits", B=1, Hq=2, L=8, S=8, D=16, scale_inputs=20.0)

    random_combinations(30, 30)

    # Attention blocks of published models, from their definitions.
    block_case("blk_llama_gqa", "llama", E=32, H=4, G=2, hd=8, rope="half", prefix="model.layers.0.self_attn.")
    block_case("blk_llama_mqa_pos", "llama", E=24, H=4, G=1, hd=6, rope="half", theta=500000.0, position=4000)
    block_case("blk_qwen_bias", "llama", E=32, H=4, G=2, hd=16, bias=True, rope="half")
    block_case("blk_mistral_window", "llama", E=32, H=4, G=1, hd=8, rope="half", window=3, T=12)
    block_case("blk_gemma_softcap", "llama", E=24, H=2, G=1, hd=16, rope="half", softcap=5.0)
    block_case("blk_gptj_interleaved", "llama", E=32, H=4, G=4, hd=8, rope="interleaved", rope_dim=4)
    block_case("blk_neox_partial", "llama", E=32, H=2, G=2, hd=16, rope="half", rope_dim=8, out_bias=True,
               bias=True)
    block_case("blk_bloom_alibi", "llama", E=32, H=4, G=4, hd=8, alibi=True, bias=True, out_bias=True)
    block_case("blk_gpt2", "gpt2", E=32, H=4, G=4, hd=8, bias=True, out_bias=True, prefix="h.0.attn.")
    block_case("blk_gpt2_head64", "gpt2", E=128, H=2, G=2, hd=64, bias=True, out_bias=True, T=20, B=1)
    block_case("blk_whisper_no_k_bias", "llama", E=32, H=4, G=4, hd=8, bias="no_k", out_bias=True)
    block_case("bwd_blk_llama", "llama", E=32, H=4, G=2, hd=8, rope="half", position=5, bias=True, out_bias=True,
               backward=True)
    block_case("bwd_blk_gptj", "llama", E=16, H=2, G=1, hd=8, rope="interleaved", rope_dim=4, window=4,
               backward=True)

    # Gradients of nn.MultiheadAttention: every option the forward has.
    forward_case("bwd_fwd_basic", E=16, H=2, L=5, backward=True)
    forward_case("bwd_fwd_batch_first", E=24, H=3, L=7, N=3, batch_first=True, backward=True)
    forward_case("bwd_fwd_unbatched", E=20, H=2, L=9, batched=False, attn_mask="bool2", backward=True)
    forward_case("bwd_fwd_cross", E=32, H=4, L=6, S=11, cross=True, batch_first=True, backward=True)
    forward_case("bwd_fwd_kdim_vdim", E=24, H=2, L=5, S=8, cross=True, kdim=10, vdim=14, backward=True)
    forward_case("bwd_fwd_no_bias", E=16, H=4, L=4, bias=False, backward=True)
    forward_case("bwd_fwd_bias_kv_zero_attn", E=12, H=3, L=4, S=6, cross=True, add_bias_kv=True,
                 add_zero_attn=True, kpm="float", batch_first=True, backward=True)
    forward_case("bwd_fwd_bias_kv", E=16, H=2, L=5, add_bias_kv=True, attn_mask="bool2", kpm="bool", backward=True)
    forward_case("bwd_fwd_masks", E=16, H=4, L=6, attn_mask="float3", kpm="bool", backward=True)
    forward_case("bwd_fwd_causal", E=24, H=3, L=13, causal=True, backward=True)
    forward_case("bwd_fwd_causal_mask_cross", E=16, H=2, L=5, S=9, cross=True, causal=True, attn_mask="bool2",
                 backward=True)
    forward_case("bwd_fwd_head64", E=64, H=1, L=40, N=1, causal=True, backward=True)
    forward_case("bwd_fwd_prefix", E=16, H=2, L=5, prefix="encoder.layers.0.self_attn.", batch_first=True,
                 backward=True)

    # Gradients of scaled_dot_product_attention: every variant again.
    sdpa_case("bwd_sdpa_basic", B=2, Hq=3, L=5, S=7, D=8, backward=True)
    sdpa_case("bwd_sdpa_dv", B=1, Hq=2, L=9, S=4, D=24, Dv=40, backward=True)
    sdpa_case("bwd_sdpa_causal_tl", B=1, Hq=2, L=12, S=5, D=16, causal="top_left", backward=True)
    sdpa_case("bwd_sdpa_causal_br", B=2, Hq=2, L=5, S=12, D=16, causal="bottom_right", backward=True)
    sdpa_case("bwd_sdpa_gqa", B=2, Hq=8, Hkv=2, L=9, S=13, D=16, causal="bottom_right", backward=True)
    sdpa_case("bwd_sdpa_mqa", B=1, Hq=6, Hkv=1, L=7, S=7, D=12, scale=0.37, backward=True)
    sdpa_case("bwd_sdpa_window", B=1, Hq=2, L=9, S=21, D=16, window=(4, 2), backward=True)
    sdpa_case("bwd_sdpa_softcap", B=1, Hq=2, L=8, S=8, D=16, softcap=2.5, scale_inputs=4.0, backward=True)
    sdpa_case("bwd_sdpa_alibi_causal", B=1, Hq=4, L=10, S=10, D=16, alibi=True, causal="top_left", backward=True)
    sdpa_case("bwd_sdpa_mask_bool", B=2, Hq=3, L=6, S=9, D=8, mask="bool_B1LS", backward=True)
    sdpa_case("bwd_sdpa_mask_float", B=2, Hq=2, L=6, S=9, D=8, mask="float_BHLS", backward=True)
    sdpa_case("bwd_sdpa_fully_masked", B=1, Hq=2, L=5, S=6, D=8, mask="bool_BHLS", fully_masked=True,
              backward=True)
    sdpa_case("bwd_sdpa_long", B=1, Hq=1, L=100, S=97, D=24, causal="bottom_right", backward=True)
    sdpa_case("bwd_sdpa_head128", B=1, Hq=1, L=33, S=47, D=128, backward=True)
    sdpa_case("bwd_sdpa_one_key", B=1, Hq=1, L=3, S=1, D=8, backward=True)
    sdpa_case("bwd_sdpa_large_logits", B=1, Hq=2, L=40, S=40, D=16, scale_inputs=6.0, backward=True)

    # GPT-2 blocks' gradients in Conv1D layout (last, so the cases above keep their random draws).
    block_case("bwd_blk_gpt2", "gpt2", E=32, H=4, G=4, hd=8, bias=True, out_bias=True, prefix="h.3.attn.",
               backward=True)
    block_case("bwd_blk_gpt2_narrow", "gpt2", E=24, H=2, G=2, hd=8, T=7, backward=True)
    # A BERT encoder's self-attention: not causal, a padded sentence in the batch (last: the draws above stay).
    block_case("blk_bert_padded", "bert", E=32, H=4, G=4, hd=8, T=11, B=3, bias=True, out_bias=True,
               prefix="encoder.layer.0.", causal=False, pad_last=4)
    block_case("bwd_blk_bert_padded", "bert", E=24, H=3, G=3, hd=8, T=9, B=2, bias=True, out_bias=True,
               prefix="encoder.layer.5.", causal=False, pad_last=3, backward=True)

    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {len(os.listdir(OUT))} cases, {total / 1e6:.2f} MB, to {OUT}")


if __name__ == "__main__":
    sys.exit(main())
