"""gpt-oss MXFP4 experts, dequantized while they are read, only the experts asked for.

The Hub layout of openai/gpt-oss-20b / -120b (``quantization_config.quant_method: "mxfp4"``): each
experts parameter ``P`` of the model (``gate_up_proj`` [E, H, 2I], ``down_proj`` [E, I, H]) is
stored as ``P_blocks`` uint8 [E, R, C/32, 16] (two FP4 E2M1 values per byte, low nibble first,
32 values per block) and ``P_scales`` uint8 [E, R, C/32] (one E8M0 exponent per block, bias 127),
where [R, C] is the transposed per-expert matrix ([2I, H] for ``gate_up_proj``). Biases, attention,
router and embeddings stay unquantized. Dequantizing is Transformers' own plain-torch
``convert_moe_packed_tensors`` (a 16-value lookup table and ``ldexp``), applied to rows of dim 0
(experts) only, so a rank reads and dequantizes only its own experts. The values are exact in
float32 (an FP4 value times a power of two), so the model's dtype is reached by one rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from hiermoe_hf.checkpoint.lazy_slice import DequantizedSlice

BLOCKS, SCALES = "_blocks", "_scales"


@dataclass(frozen=True)
class Mxfp4Format:
    """gpt-oss MXFP4 (no settings: the block of 32 values and the E8M0 scales are fixed by the format)."""

    @staticmethod
    def from_quant(quant: dict) -> Mxfp4Format:
        return Mxfp4Format()

    def reader(self, raw) -> Mxfp4Reader:
        return Mxfp4Reader(raw)


class _Mxfp4Slice(DequantizedSlice):
    """``P_blocks`` + ``P_scales`` as a lazy safetensors-like slice of the dequantized ``P`` [E, C, R]:
    ``get_shape``, ``get_dtype``, and indexing that dequantizes only the experts (dim 0) asked for."""

    def __init__(self, blocks, scales, key: str):
        self.blocks, self.scales, self.key = blocks, scales, key
        b, s = tuple(blocks.get_shape()), tuple(scales.get_shape())
        if len(b) != 4 or b[:3] != s:
            raise ValueError(f"{key}: MXFP4 {key}{BLOCKS} {list(b)} and {key}{SCALES} {list(s)} do not match "
                             "([E, R, C/32, 16] and [E, R, C/32])")
        self.shape = (b[0], b[2] * b[3] * 2, b[1])

    def _leading(self, lo: int, hi: int) -> torch.Tensor:
        """float32 [hi - lo, C, R]: experts [lo, hi), dequantized."""
        return convert_moe_packed_tensors(self.blocks[lo:hi], self.scales[lo:hi], dtype=torch.float32)


class Mxfp4Reader:
    """A checkpoint reader (``keys``, ``slice``, ``close``) that shows each ``P_blocks``/``P_scales``
    pair as the dequantized ``P``."""

    def __init__(self, reader):
        self.reader = reader
        names = set(reader.keys())
        packed = {k[: -len(BLOCKS)] for k in names if k.endswith(BLOCKS) and k[: -len(BLOCKS)] + SCALES in names}
        hidden = {p + BLOCKS for p in packed} | {p + SCALES for p in packed}
        self._packed = packed
        self._keys = dict.fromkeys([k for k in reader.keys() if k not in hidden] + sorted(packed))

    def keys(self):
        return self._keys.keys()

    def slice(self, key: str):
        if key in self._packed:
            return _Mxfp4Slice(self.reader.slice(key + BLOCKS), self.reader.slice(key + SCALES), key)
        return self.reader.slice(key)

    def close(self) -> None:
        self.reader.close()
