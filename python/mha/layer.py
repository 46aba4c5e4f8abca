"""torch.nn.MultiheadAttention on numpy arrays, on libmha's layer: the
same constructor arguments, state_dict names (PyTorch's, Llama's,
GPT-2's or BERT's), shapes and masks, its gradients, and decoding with a KV cache.
"""

import math
import sys
import threading

import numpy as np

from . import _arrays, _core

_ROPE = {None: 0, "none": 0, "half": 1, "interleaved": 2}
_CAUSE = "values (or weights) too large?"  # when every input is finite but a result is not
_SPARE_TAPES = 2  # tapes a layer keeps for its next forwards: one step's, and one in flight
# _core.layer_train's zero: the gradients left, zeroed now, or written by the next backward
_ZERO_NOT, _ZERO_NOW, _ZERO_BY_BACKWARD = 0, 1, 2
# _core.layer_storage's which: the gradients, or the matrices' values
_STORE_GRADS, _STORE_WEIGHTS = 0, 1


class MultiheadAttention:
    """nn.MultiheadAttention(embed_dim, num_heads, ...) on libmha.

    Beyond PyTorch's arguments: num_kv_heads (grouped-query attention),
    head_dim, out_bias, rope ("half" as Llama, "interleaved" as GPT-J),
    rope_theta, rope_dim, window=(left, right), softcap, alibi_slopes,
    compute_dtype="bfloat16" (a bfloat16 model; inference only) and
    num_threads.  Weights start unset: load_state_dict gives them (a call
    before that raises mha.MhaError naming the weight).  Set
    `training = True` to record each forward for backward().
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, *, num_kv_heads=None, head_dim=None, out_bias=None,
                 rope=None, rope_theta=None, rope_dim=None, window=None, softcap=None, alibi_slopes=None,
                 compute_dtype="float32", num_threads=None):
        if dropout:
            raise ValueError("dropout is not supported: libmha computes attention exactly (use dropout=0.0)")
        if rope not in _ROPE:
            raise ValueError(f'rope must be None, "half" or "interleaved", got {rope!r}')
        if compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f'compute_dtype must be "float32" or "bfloat16", got {compute_dtype!r}')
        left, right = (-1, -1) if window is None else (int(w) for w in window)
        slopes = None if alibi_slopes is None else _arrays.floats(alibi_slopes, "alibi_slopes").reshape(-1)
        self.embed_dim, self.num_heads, self.batch_first = int(embed_dim), int(num_heads), bool(batch_first)
        self.kdim, self.vdim = int(kdim or embed_dim), int(vdim or embed_dim)
        self.num_kv_heads = int(num_kv_heads or num_heads)
        self.head_dim = int(head_dim or self.embed_dim // max(self.num_heads, 1))
        self._extra_keys = int(bool(add_bias_kv)) + int(bool(add_zero_attn))  # appended after the S keys
        self._layer = _core.layer_create(self.embed_dim, self.num_heads, self.kdim, self.vdim, bool(bias),
                                         bool(add_bias_kv), bool(add_zero_attn), int(num_kv_heads or 0),
                                         int(head_dim or 0), -1 if out_bias is None else int(bool(out_bias)),
                                         _ROPE[rope], float(rope_theta or 0.0), int(rope_dim or 0), left, right,
                                         float(softcap or 0.0), slopes, compute_dtype == "bfloat16")
        self.threads = _arrays.threads(num_threads)
        self.training = False
        self._lock = threading.Lock()  # a layer serves one call at a time
        self._recorded = None
        # The torch path's gradient storage (see _grads_in_free_storage).
        self._grad_count = self._grad_storage = self._grad_layout = self._grad_unused_refs = None
        self._weight_views = None  # see _weights_in_storage
        self._spare_tapes = []  # see _take_tape

    # ---- weights ----------------------------------------------------

    def weight_shapes(self):
        """{name: shape} of the layer's weights, in parameters() order."""
        return dict(_core.layer_weights(self._layer))

    def load_state_dict(self, state_dict, strict=True, prefix=""):
        """Sets every weight named (after `prefix`) in any family:
        nn.MultiheadAttention's (in_proj_weight, ...), Llama's
        (q_proj.weight, ...), GPT-2's (c_attn.weight, ...) or BERT's
        (attention.self.query.weight, ...).  With strict,
        a name that is not one of the layer's raises KeyError (as PyTorch);
        without, it is skipped.  Biases left out stay 0, as PyTorch
        initialises them; matrices left out are refused at the first call."""
        with self._lock:
            for key, value in state_dict.items():
                if not key.startswith(prefix) or (not strict and np.asarray(value).dtype.kind != "f"):
                    continue  # not strict: a mask or other non-weight in the same dict
                arr = np.ascontiguousarray(_arrays.floats(value, key), dtype=np.float32)
                try:
                    _core.layer_weight(self._layer, key[len(prefix):], arr, 0)
                except KeyError:
                    if strict:
                        raise

    def state_dict(self):
        """{name: array} of every weight, in the layer's naming family."""
        return {name: self._get(name, shape, 1) for name, shape in self.weight_shapes().items()}

    def grads(self):
        """{name: array} of every weight's gradient, accumulated over the
        backward() calls since zero_grad()."""
        return {name: self._get(name, shape, 2) for name, shape in self.weight_shapes().items()}

    def zero_grad(self):
        with self._lock:
            _core.layer_train(self._layer, _ZERO_NOW)

    def _grads_in_free_storage(self):
        """Moves the weights' gradients into an array no gradient handed
        out still uses, to be written (not added to) by the next backward
        (mha_layer_zero_grad_deferred: no pass over the array to zero it
        first), and returns {name: view of it} (the
        training state's names: PyTorch's for this family, Llama's for the
        others).  The torch path hands these views to autograd as a step's
        gradients, so they are never copied out.  The array is the last
        one again when nothing refers to it any more (its views let go:
        the usual step, after zero_grad(set_to_none=True)), which saves
        allocating and faulting in 4 E^2 floats a step; else a new one."""
        with self._lock:
            if self._grad_storage is None or self._grad_storage_refs() > self._grad_unused_refs:
                if self._grad_count is None:
                    self._grad_count = _core.layer_storage_count(self._layer, _STORE_GRADS)
                fresh = _arrays.aligned_empty(self._grad_count)
                self._grad_layout = [(name, at, at + math.prod(shape), shape)  # sizes once, not a step
                                     for name, at, shape in _core.layer_storage(self._layer, fresh, _STORE_GRADS)]
                self._grad_storage = fresh  # after the move: the old array is not let go while still in use
                del fresh
                self._grad_unused_refs = self._grad_storage_refs()  # the count with no view: the interpreter's own
            storage = self._grad_storage
            _core.layer_train(self._layer, _ZERO_BY_BACKWARD)
        return {name: storage[at:end].reshape(shape) for name, at, end, shape in self._grad_layout}

    def _weights_in_storage(self, empty=_arrays.aligned_empty):
        """Moves the matrices' values (the training copy an optimizer
        updates; biases stay the layer's) into a float32 array from
        empty(count), by default the package's, and returns {name: view of
        it} (the training state's names).  A framework that makes its
        parameters these views updates the layer's values in place: the
        torch drop-in does, with an array of torch's allocator, and
        set_weight with such a view then copies nothing.  Once: later calls
        give the same views."""
        with self._lock:
            if self._weight_views is None:
                storage = empty(_core.layer_storage_count(self._layer, _STORE_WEIGHTS))
                self._weight_views = {name: storage[at:at + math.prod(shape)].reshape(shape)
                                      for name, at, shape in _core.layer_storage(self._layer, storage, _STORE_WEIGHTS)}
        return self._weight_views

    def _grad_storage_refs(self):
        """References to the gradient storage, counted the same way each
        time: every view of it holds one."""
        return sys.getrefcount(self._grad_storage)

    def _get(self, name, shape, mode):
        out = np.empty(shape, dtype=np.float32)
        with self._lock:
            _core.layer_train(self._layer, _ZERO_NOT)
            _core.layer_weight(self._layer, name, out, mode)
        return out

    # ---- forward and backward ------------------------------------------

    def _as_nle(self, x, name, width):
        """An input as the library's [N, L, features] view (no copy for float32)."""
        x = _arrays.floats(x, name)
        if x.ndim == 2:
            x = x[None]
        elif x.ndim != 3:
            raise ValueError(f"{name} must be [L, N, E], [N, L, E] with batch_first, or unbatched [L, E]; "
                             f"got shape {x.shape}")
        elif not self.batch_first:
            x = x.transpose(1, 0, 2)
        if x.shape[-1] != width:
            raise ValueError(f"{name} has {x.shape[-1]} features; the layer expects {width}")
        return x

    def _out_nle(self, unbatched, N, L, width):
        """A new output in the caller's layout, and its [N, L, width] view."""
        if unbatched:
            out = _arrays.empty((L, width))
            return out, out[None]
        out = _arrays.empty((N, L, width) if self.batch_first else (L, N, width))
        return out, (out if self.batch_first else out.transpose(1, 0, 2))

    def _masks(self, attn_mask, key_padding_mask, N, L, S):
        """PyTorch's masks (bool True = masked out, or float added) as the
        library's over [N, h, L, S] (bool: True = may attend)."""
        h = self.num_heads

        def convert(m, name):
            m = np.asarray(m)
            if m.dtype == np.bool_:
                return ~m
            if m.dtype.kind != "f":
                raise TypeError(f"{name} must be bool (True = masked out) or float (added), got {m.dtype}")
            return _arrays.floats(m, name)

        am = kpm = None
        if attn_mask is not None:
            m = convert(attn_mask, "attn_mask")
            if m.ndim == 3 and m.shape == (N * h, L, S):
                am = m.reshape(N, h, L, S)
            elif m.ndim == 3 and N == 1 and m.shape == (h, L, S):
                am = m[None]
            elif m.shape == (L, S):
                am = np.broadcast_to(m, (N, h, L, S))
            else:
                raise ValueError(f"attn_mask has shape {m.shape}; it must be (L, S) = ({L}, {S}) or "
                                 f"(N*num_heads, L, S) = ({N * h}, {L}, {S})")
        if key_padding_mask is not None:
            m = convert(key_padding_mask, "key_padding_mask")
            if m.shape not in ((N, S), (S,) if N == 1 else ()):
                raise ValueError(f"key_padding_mask has shape {m.shape}; it must be (N, S) = ({N}, {S})")
            kpm = np.broadcast_to(m.reshape(N, 1, 1, S), (N, h, L, S))
        return am, kpm

    def _args(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        unbatched = np.ndim(query) == 2
        q = self._as_nle(query, "query", self.embed_dim)
        k = q if key is query else self._as_nle(key, "key", self.kdim)
        v = k if value is key else self._as_nle(value, "value", self.vdim)
        N, L, S = q.shape[0], q.shape[1], k.shape[1]
        am, kpm = self._masks(attn_mask, key_padding_mask, N, L, S)
        return unbatched, q, k, v, am, kpm, 1 if is_causal else 0

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """(attn_output, attn_output_weights) as nn.MultiheadAttention
        returns them; weights None unless need_weights.  is_causal applies
        the top-left causal mask (with or without attn_mask)."""
        out, weights, record = self._run(query, key, value, key_padding_mask, need_weights, attn_mask,
                                         average_attn_weights, is_causal, self.training)
        dropped, self._recorded = self._recorded, record
        if dropped is not None:  # never differentiated: its tape records a later forward
            with self._lock:
                self._keep_spare(dropped[0])
        return out, weights

    def _take_tape(self):
        """A tape to record a forward into: a spare one, whose buffers
        already have the size of the last call (a new tape's would be
        allocated and faulted in again), or a new one."""
        with self._lock:
            return self._spare_tapes.pop() if self._spare_tapes else _core.tape_create()

    def _keep_spare(self, tape):
        """A tape no call needs any more kept for a later forward (under
        self._lock), up to _SPARE_TAPES."""
        if len(self._spare_tapes) < _SPARE_TAPES:
            self._spare_tapes.append(tape)

    def _run(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal,
             record):
        """forward, and with `record` what backward needs: a tape of its own
        and the arguments (so several recorded calls can be in flight)."""
        unbatched, q, k, v, am, kpm, causal = self._args(query, key, value, key_padding_mask, attn_mask, is_causal)
        N, L = q.shape[0], q.shape[1]
        out, out_nle = self._out_nle(unbatched, N, L, self.embed_dim)
        weights = None
        if need_weights:
            S = k.shape[1] + self._extra_keys
            weights = _arrays.empty((N, 1 if average_attn_weights else self.num_heads, L, S))
        tape = self._take_tape() if record else None
        with self._lock:
            if record:
                _core.layer_train(self._layer, _ZERO_NOT)
            finite = _core.layer_forward(self._layer, out_nle, weights, q, k, v, am, kpm, causal,
                                         bool(average_attn_weights), tape, 0, self.threads)
        if not finite:
            _arrays.raise_nonfinite("attn_output", [("query", q), ("key", k), ("value", v)], cause=_CAUSE)
        if weights is not None:
            weights = weights[:, 0] if average_attn_weights else weights
            weights = weights[0] if unbatched else weights
        saved = (tape, unbatched, q, k, v, am, kpm, causal, bool(average_attn_weights)) if record else None
        return out, weights, saved

    __call__ = forward

    def backward(self, grad_output):
        """Gradients of the last forward (with training = True): returns
        (grad_query, grad_key, grad_value) in the inputs' layout (for
        self-attention, where one array was query, key and value, all three
        are the same array, the sum over its three uses) and adds the
        weights' gradients into grads()."""
        if self._recorded is None:
            raise _core.MhaError("backward() needs a forward() recorded with training = True since the last "
                                 "backward()")
        record, self._recorded = self._recorded, None
        return self._backward(record, grad_output)

    def _backward(self, record, grad_output):
        """The gradients of a recorded call (see backward)."""
        tape, unbatched, q, k, v, am, kpm, causal, average = record
        with self._lock:
            N, L = q.shape[0], q.shape[1]
            go = self._as_nle(grad_output, "grad_output", self.embed_dim)
            if go.shape != (N, L, self.embed_dim):
                raise ValueError(f"grad_output has shape {np.shape(grad_output)}; the output's is "
                                 f"{(L, N, self.embed_dim) if not self.batch_first else (N, L, self.embed_dim)}")
            grads, views = [], []
            for x, width in ((q, self.embed_dim), (k, self.kdim), (v, self.vdim)):
                same = next((i for i, y in enumerate((q, k, v)[:len(grads)]) if y is x), None)
                if same is not None:
                    grads.append(grads[same]), views.append(views[same])
                    continue
                g, g_nle = self._out_nle(unbatched, N, x.shape[1], width)
                grads.append(g), views.append(g_nle)
            # New arrays: the library writes them (write_input_grads), a shared one the sum of its uses.
            finite = _core.layer_backward(self._layer, q, k, v, am, kpm, causal, average, tape, 0, go,
                                          views[0], views[1], views[2], self.threads, True)
            self._keep_spare(tape)  # consumed by the backward: free to record again
        if not finite:
            _arrays.raise_nonfinite("gradient", [("grad_output", go)], cause=_CAUSE)
        return tuple(grads)

    # ---- decoding ---------------------------------------------------------

    def decode(self, x, cache):
        """One decoding step: x [N, n, E] (or [n, E] for one sequence) holds
        the next n tokens of self-attention; their keys and values join the
        cache and out (same shape) attends over everything cached up to
        each token (causal)."""
        x = _arrays.floats(x, "x")
        single = x.ndim == 2
        x3 = x[None] if single else x
        if x3.ndim != 3 or x3.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be [N, n, {self.embed_dim}] or [n, {self.embed_dim}], got {x.shape}")
        out = _arrays.empty(x3.shape)
        with self._lock:
            finite = _core.layer_decode(self._layer, cache._handle(), out, x3, self.threads)
        if not finite:
            _arrays.raise_nonfinite("output", [("x", x3)], cause=_CAUSE)
        return out[0] if single else out


_CACHE_DTYPES = {"float32": "F32", "bfloat16": "BF16", "int8": "I8"}


class KVCache:
    """The keys and values a MultiheadAttention has seen while decoding:
    `capacity` tokens of `batch` sequences, stored as float32, bfloat16
    (half the memory) or int8 (a bit over a quarter: each token's row of
    keys or values per kv head is integers in [-127, 127] times one float
    scale, max |row| / 127, so each element is off by at most
    max |row| / 254).  The attention computes in float32 either way.
    close() frees it at once (or use `with`); any use after that raises
    mha.MhaError."""

    def __init__(self, layer, batch=1, capacity=4096, dtype="float32"):
        if dtype not in _CACHE_DTYPES:
            raise ValueError(f'dtype must be "float32", "bfloat16" or "int8", got {dtype!r}')
        self.dtype, self.batch = dtype, int(batch)
        self._rows = (layer.num_kv_heads, layer.head_dim)
        self._cache = _core.kv_cache(layer._layer, self.batch, int(capacity), _CACHE_DTYPES[dtype])

    def _handle(self):
        return self._cache

    def __len__(self):
        return _core.kv_cache_op(self._cache, 0, 0)

    @property
    def capacity(self):
        return _core.kv_cache_op(self._cache, 1, 0)

    def reset(self):
        _core.kv_cache_op(self._cache, 2, 0)

    def truncate(self, length):
        _core.kv_cache_op(self._cache, 3, int(length))

    def read(self, start=0, stop=None):
        """(keys, values) of tokens start .. stop - 1 (default: all held) as
        float32 arrays [batch, kv_heads, n, head_dim]: what the attention
        reads, after the cache's rounding or quantisation."""
        stop = len(self) if stop is None else int(stop)
        shape = (self.batch, *self._rows[:1], max(stop - int(start), 0), self._rows[1])
        k, v = np.empty(shape, dtype=np.float32), np.empty(shape, dtype=np.float32)
        _core.kv_cache_read(self._cache, int(start), k, v)
        return k, v

    def close(self):
        _core.kv_cache_op(self._cache, 4, 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

