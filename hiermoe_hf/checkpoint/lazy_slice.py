"""A dequantized checkpoint tensor as a lazy safetensors-like slice (FP8 and MXFP4 readers share it).

Loaders index a slice's first dimension (an expert range, or weight rows) and then the rest; a
subclass says how to produce the dequantized rows ``[lo, hi)`` of the first dimension, reading only
what covers them.
"""

from __future__ import annotations

import torch


class DequantizedSlice:
    """``get_shape``, ``get_dtype`` ("F32") and indexing over ``self.shape``; subclasses set ``shape``
    and implement ``_leading(lo, hi)`` -> float32 tensor of rows ``[lo, hi)`` of the first dimension."""

    shape: tuple[int, ...]

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def get_dtype(self) -> str:
        return "F32"

    def __getitem__(self, index):
        first, rest = (index[0], index[1:]) if isinstance(index, tuple) and index else (index, ())
        if first is Ellipsis:
            first, rest = slice(None), (Ellipsis, *rest)
        if not isinstance(first, slice) or first.indices(self.shape[0])[2] != 1:
            return self._leading(0, self.shape[0])[index]
        lo, hi, _ = first.indices(self.shape[0])
        out = self._leading(lo, max(lo, hi))
        return out[(slice(None), *rest)] if rest else out

    def _leading(self, lo: int, hi: int) -> torch.Tensor:
        raise NotImplementedError
