"""safetensors_file.py -- the safetensors format in the standard library
alone: one writer and one reader for the scripts that make or compare
files (tests/gen_golden.py, bench/compare_bits.py), so the layout (an
8-byte little-endian header length, the JSON header padded with spaces to
8 bytes, the tensors' bytes back to back) is written down once.
"""
import json
import struct


def write(path, tensors, metadata=None):
    """tensors: {name: (dtype, shape, bytes)}, dtype a safetensors name
    such as "F32"; metadata: {str: str} or None."""
    header = {"__metadata__": metadata} if metadata is not None else {}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, _, data in tensors.values():
            f.write(data)


def read(path):
    """(metadata or {}, {name: (dtype, shape tuple, bytes)})."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
        data = f.read()
    metadata = header.pop("__metadata__", {})
    return metadata, {name: (t["dtype"], tuple(t["shape"]), data[t["data_offsets"][0]:t["data_offsets"][1]])
                      for name, t in header.items()}
