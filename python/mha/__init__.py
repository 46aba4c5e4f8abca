"""libmha from Python: multi-head attention on CPUs, exact against PyTorch.

    import numpy as np, mha
    q = k = v = np.random.rand(2, 8, 128, 64).astype(np.float32)   # [batch, heads, L, D]
    out = mha.scaled_dot_product_attention(q, k, v, is_causal=True)

Arrays: float32 is read in place; other real floats are converted once;
everything else is refused (mha/_arrays.py says the rule).  The GIL is
released while libmha computes, and calls from several threads at once
are safe.  Errors: ValueError (bad arguments), MemoryError, OSError,
KeyError (a missing tensor), NotImplementedError, and mha.MhaError (an
object used wrongly), each with libmha's sentence.
"""

from ._core import MhaError, isa, version
from .functional import scaled_dot_product_attention, scaled_dot_product_attention_backward
from .io import info, load_safetensors, save_safetensors
from .layer import KVCache, MultiheadAttention

__version__ = version
__all__ = ["KVCache", "MhaError", "MultiheadAttention", "info", "isa", "load_safetensors", "save_safetensors",
           "scaled_dot_product_attention", "scaled_dot_product_attention_backward"]
