"""libmha as PyTorch's attention: mha.torch.scaled_dot_product_attention is
torch.nn.functional.scaled_dot_product_attention and
mha.torch.MultiheadAttention is torch.nn.MultiheadAttention (constructor,
parameter names, state_dict, shapes, masks), both with gradients through
libmha's fused backward.  Swap one import and train.

CPU tensors only: float32, and for scaled_dot_product_attention also
bfloat16 (computed as a bfloat16 model computes: inputs, Q, K, V and the
probabilities rounded to bfloat16 where they enter the products, float32
accumulation; its backward computes in float32 from the bfloat16 values and
rounds the gradients to bfloat16).  Anything else raises TypeError: never
a silent fallback to PyTorch's own kernels.
"""

import threading

import torch

from . import _core
from . import functional as _functional
from .layer import MultiheadAttention as _NumpyMHA

__all__ = ["MultiheadAttention", "scaled_dot_product_attention"]

# Tensors of exactly these types, float32, strided and on the CPU, the
# library reads through data_ptr(), shape and stride() (a subclass may
# give its memory another meaning through __torch_function__).
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_core.use_torch(_PLAIN_TYPES, torch.float32, torch.strided)


def _check_tensor(t, name, dtypes=(torch.float32, torch.bfloat16)):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise TypeError(f"{name} is on {t.device}; libmha computes on the CPU (move it with .cpu())")
    if t.dtype not in dtypes:
        allowed = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; libmha takes {allowed}")


def _grad_wanted(*tensors):
    """Whether autograd records a call on these tensors: grad mode on and
    one of them requiring grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _np(t):
    """A tensor's values as numpy: float32 memory shared (no copy), bfloat16
    widened to float32 (exact), bool shared; a view with the neg bit (as
    the .imag of a conjugated complex tensor is) negated into a copy."""
    t = t.detach().resolve_neg()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def _sdpa_forward(query, key, value, attn_mask, alibi_slopes, keep, options):
    """The SDPA's output as a tensor, and what its backward needs (the row
    statistics only with `keep`)."""
    bf16 = query.dtype == torch.bfloat16
    q, k, v = _np(query), _np(key), _np(value)
    mask = None if attn_mask is None else _np(attn_mask)
    slopes = None if alibi_slopes is None else _np(alibi_slopes)
    result = _functional.scaled_dot_product_attention(q, k, v, mask, alibi_slopes=slopes, return_stats=keep,
                                                      compute_dtype="bfloat16" if bf16 else "float32", **options)
    out, stats = result if keep else (result, None)
    result = torch.from_numpy(out)
    return result.to(torch.bfloat16) if bf16 else result, (mask, slopes, options, out, stats, bf16)


class _SDPA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, attn_mask, alibi_slopes, options):
        result, ctx.saved = _sdpa_forward(query, key, value, attn_mask, alibi_slopes, True, options)
        ctx.save_for_backward(query, key, value)
        return result

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value = ctx.saved_tensors
        mask, slopes, options, out, stats, bf16 = ctx.saved
        go = _np(grad_output.contiguous())
        q, k, v = _np(query), _np(key), _np(value)
        if bf16:  # the forward's output was computed in bf16 arithmetic; the backward recomputes in float32
            out = stats = None
        dq, dk, dv = _functional.scaled_dot_product_attention_backward(go, q, k, v, mask, alibi_slopes=slopes,
                                                                       output=out, stats=stats, **options)
        dtype = torch.bfloat16 if bf16 else torch.float32
        grads = [torch.from_numpy(g).to(dtype) for g in (dq, dk, dv)]
        return grads[0], grads[1], grads[2], None, None, None


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, causal=None, window=None, softcap=None, alibi_slopes=None,
                                 num_threads=None):
    """torch.nn.functional.scaled_dot_product_attention on libmha, with the
    numpy API's extras (causal="bottom_right", window, softcap,
    alibi_slopes, num_threads); differentiable in query, key and value.
    attn_mask is bool (True = take part) or float (added), never
    differentiated.  A fully masked row gives 0 where PyTorch gives NaN."""
    # The common call, nothing to differentiate, straight to the library:
    # the checks below and the numpy views cost a one-row call 11 of its
    # 16 us, against PyTorch's 4.5 (docs/PERFORMANCE.md).
    if (type(query) in _PLAIN_TYPES and type(key) in _PLAIN_TYPES and type(value) in _PLAIN_TYPES
            and attn_mask is None and not dropout_p and causal is None and window is None and softcap is None
            and alibi_slopes is None and not _grad_wanted(query, key, value)):
        out = _functional.plain_attention(query, key, value, is_causal, scale, enable_gqa, num_threads)
        if out is not None:
            return torch.from_numpy(out)
    if dropout_p:
        raise ValueError("dropout_p must be 0: libmha computes attention exactly")
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        _check_tensor(t, name)
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key and value must share a dtype; got {query.dtype}, {key.dtype}, {value.dtype}")
    if attn_mask is not None:
        _check_tensor(attn_mask, "attn_mask", (torch.bool, torch.float32, torch.bfloat16))
        if attn_mask.requires_grad:
            raise TypeError("attn_mask requires grad; libmha gives no gradient for masks (detach it)")
    if alibi_slopes is not None:
        _check_tensor(alibi_slopes, "alibi_slopes", (torch.float32,))
    options = dict(is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, causal=causal, window=window,
                   softcap=softcap, num_threads=num_threads)
    # Through autograd, with the row statistics kept, only when a gradient
    # can be asked for: keeping them takes the tiled driver, slower than
    # split-K for a few rows, and a Function's bookkeeping cost a
    # decoding step 3 us.  Not from ctx.needs_input_grad, which says what
    # requires grad even under torch.no_grad().
    if not _grad_wanted(query, key, value):
        return _sdpa_forward(query, key, value, attn_mask, alibi_slopes, False, options)[0]
    return _SDPA.apply(query, key, value, attn_mask, alibi_slopes, options)


def _mha_forward(module, args, named, query, key, value):
    """The module's layer on the tensors: (output, attention weights or
    None, what its backward needs or None)."""
    kpm, need_weights, attn_mask, average, is_causal, record = args
    layer = module._sync(named)
    q = _np(query)
    k = q if key is query else _np(key)  # the same array for self-attention: one gradient for all its uses
    v = k if value is key else _np(value)
    out, weights, saved = layer._run(q, k, v, kpm, need_weights, attn_mask, average, is_causal, record)
    return torch.from_numpy(out), None if weights is None else torch.from_numpy(weights), saved


class _MHA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, module, args, named, query, key, value, *params):
        result, w, saved = _mha_forward(module, args, named, query, key, value)
        ctx.module, ctx.saved, ctx.consumed = module, saved, False
        ctx.same = (key is query, value is key)
        ctx.grad_shapes = [(name, p.shape) for name, p in named]  # params' order and shapes
        if w is not None:
            ctx.mark_non_differentiable(w)
        return result, w

    @staticmethod
    def backward(ctx, grad_output, _grad_weights):
        module, saved = ctx.module, ctx.saved
        if saved is None:
            raise RuntimeError("backward through this MultiheadAttention call a second time (libmha's backward "
                               "consumes what the forward saved; retain_graph cannot keep it)" if ctx.consumed else
                               "this forward ran without recording (no input or parameter required grad)")
        ctx.saved, ctx.consumed = None, True  # its tape goes back to the layer for another forward
        layer = module._layer
        with module._backward_lock:  # the weights' gradients: zeroed in an array of their own, then computed
            grads = layer._grads_in_free_storage()
            gq, gk, gv = layer._backward(saved, _np(grad_output.contiguous()))
        key_same, value_same = ctx.same
        gx = [torch.from_numpy(gq), None if key_same else torch.from_numpy(gk),
              None if value_same else torch.from_numpy(gv)]
        # Reshaped by numpy, and only where the library's shape is not the
        # parameter's (bias_k's): a torch reshape is a dispatched operation.
        params = []
        for name, shape in ctx.grad_shapes:
            g = grads[name]
            params.append(torch.from_numpy(g if g.shape == shape else g.reshape(shape)))
        return (None, None, None, *gx, *params)


class MultiheadAttention(torch.nn.Module):
    """torch.nn.MultiheadAttention on libmha: the same constructor arguments,
    parameters (in_proj_weight or q/k/v_proj_weight, in_proj_bias, bias_k,
    bias_v, out_proj.weight, out_proj.bias), state_dict, forward signature
    and results; gradients through libmha's fused backward.  float32 CPU
    only; dropout must be 0.  attn_output_weights is returned but not
    differentiable."""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None):
        super().__init__()
        if dropout:
            raise ValueError("dropout must be 0: libmha computes attention exactly")
        if dtype not in (None, torch.float32) or (device is not None and torch.device(device).type != "cpu"):
            raise TypeError("libmha's MultiheadAttention is float32 on the CPU")
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.head_dim = embed_dim // num_heads
        self.dropout, self.add_zero_attn = 0.0, add_zero_attn
        empty = lambda *shape: torch.nn.Parameter(torch.empty(*shape))  # noqa: E731 - initialised below
        if self._qkv_same_embed_dim:
            self.in_proj_weight = empty(3 * embed_dim, embed_dim)
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                self.register_parameter(name, None)
        else:
            self.q_proj_weight = empty(embed_dim, embed_dim)
            self.k_proj_weight = empty(embed_dim, self.kdim)
            self.v_proj_weight = empty(embed_dim, self.vdim)
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = empty(3 * embed_dim)
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias)
        self.bias_k = empty(1, 1, embed_dim) if add_bias_kv else None
        self.bias_v = empty(1, 1, embed_dim) if add_bias_kv else None
        self._layer = _NumpyMHA(embed_dim, num_heads, bias=bias, add_bias_kv=add_bias_kv,
                                add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first)
        self._versions = None
        self._shared = None  # see _share_weights
        self._backward_lock = threading.Lock()
        self._reset_parameters()

    def _reset_parameters(self):
        """PyTorch's initialisation: Xavier-uniform projections, zero biases,
        Xavier-normal bias_k and bias_v."""
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                torch.nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            torch.nn.init.constant_(self.in_proj_bias, 0.0)
            torch.nn.init.constant_(self.out_proj.bias, 0.0)
        for b in (self.bias_k, self.bias_v):
            if b is not None:
                torch.nn.init.xavier_normal_(b)

    @classmethod
    def from_torch(cls, module):
        """The same layer as a torch.nn.MultiheadAttention, with its weights."""
        m = cls(module.embed_dim, module.num_heads, bias=module.in_proj_bias is not None,
                add_bias_kv=module.bias_k is not None, add_zero_attn=module.add_zero_attn, kdim=module.kdim,
                vdim=module.vdim, batch_first=module.batch_first)
        m.load_state_dict(module.state_dict())
        return m

    def _named_params(self):
        """(library name, parameter) of every parameter, in the order _MHA
        takes them: named_parameters' order (the module's own, then
        out_proj's), read from the two modules' tables, where
        named_parameters' walk of the modules took 12 us a call."""
        own = [(name, p) for name, p in self._parameters.items() if p is not None]
        return own + [("out_proj." + name, p) for name, p in self.out_proj._parameters.items() if p is not None]

    def _sync(self, named=None):
        """The libmha layer with the parameters' current values (packed
        again only when one changed, e.g. after an optimizer step; copied
        too unless the parameter is a view of the layer's own values, see
        _share_weights).  named: _named_params(), if the caller has it."""
        named = self._named_params() if named is None else named
        versions = tuple((id(p), p._version, p.data_ptr()) for _, p in named)
        if versions != self._versions:
            with torch.no_grad():
                self._layer.load_state_dict({name: p.detach().numpy() for name, p in named})
            self._versions = versions
        return self._layer

    def _share_weights(self):
        """Makes the projection matrices' parameters views of the layer's
        own training values, once, when the module first records for a
        backward: an optimizer's step then writes where the layer reads,
        and _sync copies nothing for them (at E = 768 the copy was 9.4 MB
        a step on one thread).  The Parameter objects stay the same (an
        optimizer made before keeps working); only their storage moves,
        with their values."""
        layer = self._sync()
        # torch's allocator, as for the parameters it made: the optimizer
        # writes memory of the kind PyTorch's own parameters live in.  (A
        # NumPy array first looked slower, but so did this one in the same
        # runs: the time went to PyTorch's spinning threads, PERFORMANCE.md.)
        views = layer._weights_in_storage(lambda n: torch.empty(n, dtype=torch.float32).numpy())
        with torch.no_grad():
            for name, p in self._named_params():
                if name in views and tuple(views[name].shape) == tuple(p.shape):
                    p.data = torch.from_numpy(views[name])
        self._shared = True

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        _check_tensor(query, "query", (torch.float32,))
        if key is not query:
            _check_tensor(key, "key", (torch.float32,))
        if value is not key and value is not query:
            _check_tensor(value, "value", (torch.float32,))
        if is_causal and attn_mask is not None and key_padding_mask is None and not need_weights:
            attn_mask = None  # PyTorch's rule: is_causal is a hint that attn_mask is the causal mask
        masks = []
        for m, name in ((key_padding_mask, "key_padding_mask"), (attn_mask, "attn_mask")):
            if m is not None:
                _check_tensor(m, name, (torch.bool, torch.float32))
            masks.append(None if m is None else _np(m))
        # The module's parameters walked once a call, for _sync and the
        # backward too: a training step's Python runs with its caches cold
        # after the library's calls, where each walk took ~50 us (E = 768).
        named = self._named_params()
        params = [p for _, p in named]
        # A tape only for a call that autograd will differentiate: under
        # torch.no_grad() the parameters still require grad, and a tape a
        # call (the activations, 14 MB at S1) cost inference a third of
        # its time in page faults (docs/PERFORMANCE.md).
        record = _grad_wanted(query, key, value, *params)
        if self._shared is None and record and any(p.requires_grad for p in params):
            self._share_weights()
        args = (masks[0], need_weights, masks[1], average_attn_weights, is_causal, record)
        if not record:  # nothing for autograd: a Function's bookkeeping cost a token's call 5 us
            return _mha_forward(self, args, named, query, key, value)[:2]
        out, weights = _MHA.apply(self, args, named, query, key, value, *params)
        return out, weights
