"""How the package takes arrays: the one rule every function follows.

- A float32 numpy array is read in place, whatever its layout, as long as
  its strides are not negative: libmha takes strided tensors, so a
  transposed or sliced view costs no copy.
- Any other array of real floating-point numbers (float64, float16, a
  view with negative strides, a list of floats) is converted once, to a
  C-contiguous float32 copy.
- Anything else (integers, booleans where numbers are expected, complex
  numbers, objects) is refused with a TypeError naming the argument.
- Masks: bool arrays (True = the key takes part, as in PyTorch) are read
  in place; float masks (added to the scores) follow the rule above.
- Outputs are C-contiguous float32 arrays nothing else refers to,
  starting on a 64-byte cache line from 4 KiB on: of 1 MiB or more, they
  may take the memory of an earlier output that nothing refers to any
  more (empty, below).
"""

import math
import sys
import threading

import numpy as np

MAX_RANK = 4  # the library's tensors have up to four dimensions

# Outputs as large as SPARE_MIN_BYTES are kept in _spare once made, and
# handed out again once nothing but the list refers to them: a training
# loop asks for the same shapes every step, and a fresh array of that size
# comes from the kernel as pages, each faulted in and cleared when first
# written.  At N = 2048 (four 6.3 MB outputs) that took 13 ms of the
# attention's 135 ms forward + backward step in a loop of them alone
# (docs/PERFORMANCE.md).  At
# most SPARE_COUNT arrays and SPARE_BYTES are kept, the least recently
# used free one let go first.
SPARE_MIN_BYTES = 1 << 20
SPARE_COUNT = 32
SPARE_BYTES = 256 << 20
_spare = []  # 1-D float32 arrays, the least recently handed out first
_spare_lock = threading.Lock()


def _spare_free(i):
    """Whether only the list refers to _spare[i] (getrefcount adds one)."""
    return sys.getrefcount(_spare[i]) <= 2


def _room_for(arr):
    """Whether _spare can take arr within SPARE_COUNT and SPARE_BYTES."""
    return len(_spare) < SPARE_COUNT and sum(a.nbytes for a in _spare) + arr.nbytes <= SPARE_BYTES


def _keep(arr):
    """arr into _spare, letting free ones go (oldest first) to make room;
    not kept when the ones in use already fill it."""
    i = 0
    while not _room_for(arr) and i < len(_spare):
        if _spare_free(i):
            del _spare[i]
        else:
            i += 1
    if _room_for(arr):
        _spare.append(arr)


class _Block(np.ndarray):
    """The allocation behind an aligned array (aligned_empty)."""


LINE = 64  # bytes of a cache line


def aligned_empty(n):
    """n float32 values, undefined, from the start of a cache line.  numpy
    puts a large array 16 bytes into one (after malloc's header), so every
    64-byte row the library's kernels stored split in two: in the layer's
    AMX epilogue, its weight gradients and outputs.  The array is a plain
    view of a larger _Block; views of it refer to it, not to the block
    (numpy points a view at the first array that owns its memory or whose
    base is of another type), so sys.getrefcount on it counts them, as on
    an array of its own."""
    block = np.empty(n + LINE // 4, dtype=np.float32).view(_Block)
    skip = (-block.ctypes.data % LINE) // 4
    return block[skip:skip + n].view(np.ndarray)


# Below this many bytes an output is numpy's own array, 16 bytes into a
# line: at most 64 lines could split, and finding an array's address
# (.ctypes.data) took 1.9 us of the 2.3 us aligned_empty costs, two of
# them in every call (the output and its row statistics) where a
# decoding step through the PyTorch drop-in takes 24 us of Python.
ALIGN_MIN_BYTES = 4096


def empty(shape):
    """A float32 array of `shape` for an output, its values undefined (the
    library writes every one): numpy's own below ALIGN_MIN_BYTES, else
    starting on a cache line (aligned_empty), new or from 1 MiB on the
    memory of an earlier output that nothing refers to any more."""
    n = math.prod(shape)
    if n * 4 < ALIGN_MIN_BYTES:
        return np.empty(shape, dtype=np.float32)
    if n * 4 < SPARE_MIN_BYTES:
        return aligned_empty(n).reshape(shape)
    with _spare_lock:
        for i in range(len(_spare)):
            if _spare[i].size == n and _spare_free(i):
                arr = _spare.pop(i)
                _spare.append(arr)
                return arr.reshape(shape)  # the view refers to arr until it goes
        arr = aligned_empty(n)
        _keep(arr)
        return arr.reshape(shape)


def floats(x, name):
    """x as a float32 array libmha can read, in place when the rule allows."""
    if isinstance(x, np.ndarray) and x.dtype == np.float32 and all(s >= 0 for s in x.strides):
        return x
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must hold real floating-point numbers (float32 is read in place), "
                        f"got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def mask(m, name, shape):
    """A bool or float mask broadcast to `shape` (zero strides, no copy)."""
    arr = np.asarray(m)
    if arr.dtype == np.bool_:
        pass
    elif arr.dtype.kind == "f":
        arr = floats(arr, name)
    else:
        raise TypeError(f"{name} must be bool (True = take part) or float (added to the scores), got {arr.dtype}")
    try:
        return np.broadcast_to(arr, shape)
    except ValueError:
        raise ValueError(f"{name} has shape {tuple(arr.shape)}, which does not broadcast to "
                         f"{tuple(shape)} (batch..., L, S)") from None


def as4d(x, lead):
    """x [*lead, a, b, c] or fewer leading dimensions as [prod(lead), a, b, c]
    (a view when the strides allow, else one copy)."""
    if x.ndim <= MAX_RANK:
        return x.reshape((1,) * (MAX_RANK - x.ndim) + x.shape) if x.ndim < MAX_RANK else x
    return x.reshape((int(np.prod(lead)),) + x.shape[-3:])


def raise_nonfinite(what, named, view="", cause="values too large for float32?"):
    """After libmha found NaN or Inf in `what`: ValueError naming the first
    of the (name, array) inputs that holds one, and where (`view` says in
    what shape the index is), else saying that every input was finite."""
    for name, a in named:
        if a is None:
            continue
        bad = np.argwhere(~np.isfinite(a))
        if len(bad):
            index = tuple(int(i) for i in bad[0])
            raise ValueError(f"{name} holds {a[index]} at index {index}{view}; the {what} would not be finite")
    raise ValueError(f"the {what} is not finite although every input is: {cause}")


def threads(num_threads):
    """num_threads for libmha: None is 0 (MHA_NUM_THREADS, else all CPUs)."""
    if num_threads is None:
        return 0
    n = int(num_threads)
    if n < 0 or n > 1024:
        raise ValueError(f"num_threads must be in 0..1024 (0 = all CPUs), got {num_threads}")
    return n
