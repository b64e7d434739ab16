"""The safetensors file layout, for writing a file tensor by tensor instead of from one dict in memory.

A safetensors file is: u64 little-endian header length, a JSON header (``__metadata__`` first, then
each tensor's dtype, shape and [begin, end) byte offsets, in data order), space padding to a
multiple of 8 bytes, then the tensors' raw bytes back to back. The data order is safetensors' own
(by dtype, then name); it is asked of the installed safetensors, so a streamed file is byte for byte
what ``safetensors.torch.save_file`` writes.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import save as safetensors_bytes


def data_order(dtypes: dict[str, torch.dtype]) -> list[tuple[str, str]]:
    """(name, safetensors dtype name) in the order safetensors writes these tensors' data."""
    blob = safetensors_bytes({name: torch.empty(0, dtype=dtype) for name, dtype in dtypes.items()})
    header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
    return [(name, info["dtype"]) for name, info in header.items() if name != "__metadata__"]


def header(tensors: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """The bytes before the data, for ``tensors`` = (name, dtype name, shape, nbytes) in data order."""
    entries: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw
