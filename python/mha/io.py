"""safetensors files through libmha's reader and writer, and `mha info`'s
arithmetic."""

import numpy as np

from . import _core

# safetensors dtype <-> numpy dtype; BF16 (which numpy lacks) loads as float32.
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BOOL": np.bool_, "U8": np.uint8,
          "I8": np.int8, "I32": np.int32, "I64": np.int64}
_NAME = {np.dtype(v): k for k, v in _NUMPY.items()}


def load_safetensors(path):
    """{name: numpy array} of every tensor in the file, in its stored dtype
    (BF16 as float32).  Malformed files raise ValueError naming what is
    wrong; sizes in the file are checked against its length first."""
    handle, tensors = _core.st_open(str(path))
    result = {}
    for name, dtype, shape in tensors:
        as_f32 = dtype == "BF16"
        arr = np.empty(shape, dtype=np.float32 if as_f32 else _NUMPY[dtype])
        _core.st_read(handle, name, arr.reshape(-1).view(np.uint8) if arr.size else arr, as_f32)
        result[name] = arr
    return result


def save_safetensors(path, tensors, metadata=None):
    """Writes {name: array} (float64/32/16, bool, uint8, int8, int32, int64) and
    {key: str} metadata to a safetensors file; the file appears whole or
    not at all."""
    items = []
    for name, value in tensors.items():
        arr = np.ascontiguousarray(value)
        if arr.dtype not in _NAME:
            raise TypeError(f"{name}: dtype {arr.dtype} has no safetensors equivalent here; use one of "
                            f"{', '.join(str(np.dtype(d)) for d in _NUMPY.values())}")
        items.append((str(name), _NAME[arr.dtype], tuple(int(d) for d in arr.shape), arr.reshape(-1).view(np.uint8)
                      if arr.size else np.zeros(1, np.uint8)))
    _core.st_save(str(path), items, {str(k): str(v) for k, v in (metadata or {}).items()})


def info(embed_dim, num_heads, num_kv_heads=None, seq=1024):
    """What `mha info` prints, as a dict: head_dim, kv_dim, params,
    params_single_head, flops_projections, flops_attention, bytes_weights,
    bytes_activations, kv_cache_bytes_per_token (and _mha: without GQA)."""
    return _core.info(int(embed_dim), int(num_heads), int(num_kv_heads or 0), int(seq))
