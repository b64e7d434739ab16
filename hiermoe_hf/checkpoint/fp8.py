"""Fine-grained FP8 checkpoints (block-scaled e4m3 weights), dequantized while they are read.

Transformers' ``FineGrainedFP8Config`` format (``quant_method: "fp8"``), which DeepSeek-V3.x,
Qwen3 / Qwen3-MoE ``-FP8``, GLM and MiniMax-M2 FP8 releases share, per-expert or fused: a quantized weight
``W.weight`` is ``float8_e4m3fn`` [R, C] and ``W.weight_scale_inv`` is float32
[ceil(R / br), ceil(C / bc)], one scale per block of ``quantization_config.weight_block_size``
[br, bc]; the real weight is ``W.weight.float() * scale_inv[i // br, j // bc]``. This is DeepSeek's
own convention (``inference/kernel.py`` ``weight_dequant``: grid = cdiv(M, BLOCK) x cdiv(N, BLOCK),
output in fp32 then the model dtype), so the last block of a dimension that is not a multiple of the
block is partial (DeepSeek-V3's ``kv_a_proj_with_mqa`` is 576 x 7168 with a 5 x 56 grid).
Transformers 5.24's CPU dequantizer derives the block from the grid (rows // grid rows) instead,
which disagrees on such edges (NOTES.md): not used here.

``Fp8Reader`` wraps a checkpoint reader: it hides the ``*_scale_inv`` keys and hands out, for each
quantized weight, a lazy slice that reads and dequantizes only the rows asked for (a block row at a
time), so the loader's "only this rank's experts / shards" reads stay what they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hiermoe_hf.checkpoint.lazy_slice import DequantizedSlice

SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = (torch.float8_e4m3fn,)
E4M3_NAMES = ("e4m3", "float8_e4m3fn")  # DeepSeek / Qwen write "e4m3"; MiniMax-M2 "float8_e4m3fn"


@dataclass(frozen=True)
class Fp8Format:
    """The block size [rows, cols] of one scale, from ``quantization_config.weight_block_size``."""

    block: tuple[int, int]

    @staticmethod
    def from_quant(quant: dict) -> Fp8Format:
        """The format of an FP8 ``quantization_config`` (a dict); ValueError for what is not block-scaled e4m3."""
        block = quant.get("weight_block_size")
        if quant.get("fmt", "e4m3") not in E4M3_NAMES:
            raise ValueError(
                f"FP8 quantization_config.fmt={quant.get('fmt')!r} is not supported; valid: {', '.join(E4M3_NAMES)}"
            )
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(int(b) > 0 for b in block)):
            raise ValueError(
                f"FP8 quantization_config.weight_block_size must be [rows, cols] of positive ints, got {block!r} "
                "(per-tensor FP8 scales are not supported)"
            )
        return Fp8Format((int(block[0]), int(block[1])))

    def reader(self, raw) -> Fp8Reader:
        return Fp8Reader(raw, self)


def scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """[..., R, C] -> [..., ceil(R / br), ceil(C / bc)] (DeepSeek's ceil-division grid)."""
    *lead, rows, cols = shape
    return (*lead, math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def dequantize(w_RC: torch.Tensor, scale_GC: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 [..., R, C] = ``w_RC.float() * scale`` with one scale per [br, bc] block, partial last blocks.

    w_RC: float8 [..., R, C]; scale_GC: [..., ceil(R/br), ceil(C/bc)]. One block row at a time, so
    the only temporary beyond the output is one block row's scales.
    """
    want = scale_grid(tuple(w_RC.shape), block)
    if tuple(scale_GC.shape) != want:
        raise ValueError(
            f"FP8 weight of shape {list(w_RC.shape)} with block {list(block)} needs scales of shape {list(want)} "
            f"(ceil-division grid), got {list(scale_GC.shape)}"
        )
    br, bc = block
    rows, cols = w_RC.shape[-2:]
    out = torch.empty(w_RC.shape, dtype=torch.float32)
    for i in range(want[-2]):
        lo, hi = i * br, min(rows, (i + 1) * br)
        scale_C = scale_GC[..., i, :].float().repeat_interleave(bc, dim=-1)[..., :cols]
        out[..., lo:hi, :] = w_RC[..., lo:hi, :].float() * scale_C.unsqueeze(-2)
    return out


class _Fp8Slice(DequantizedSlice):
    """A quantized weight as a lazy safetensors-like slice: ``get_shape``, ``get_dtype`` and indexing.

    Indexing reads only the block rows covering the first-dimension range asked for (for a fused
    [E, R, C] tensor the first dimension is the expert), dequantizes them, then applies the rest.
    """

    def __init__(self, weight, scale, block: tuple[int, int], key: str):
        self.weight, self.scale, self.block, self.key = weight, scale, block, key
        self.shape = tuple(weight.get_shape())
        grid = tuple(scale.get_shape())
        if grid != scale_grid(self.shape, block):
            raise ValueError(
                f"{key}: FP8 weight {list(self.shape)} with weight_block_size {list(block)} needs "
                f"{key}{SCALE_SUFFIX} of shape {list(scale_grid(self.shape, block))}, found {list(grid)}"
            )

    def _leading(self, lo: int, hi: int) -> torch.Tensor:
        if len(self.shape) > 2:  # fused experts [E, R, C]: the first dimension is not blocked
            return dequantize(self.weight[lo:hi], self.scale[lo:hi], self.block)
        br = self.block[0]
        first, last = lo // br, max(lo // br, math.ceil(hi / br))
        w = self.weight[first * br : min(self.shape[0], last * br)]
        out = dequantize(w, self.scale[first:last], self.block)
        return out[lo - first * br : hi - first * br]


class Fp8Reader:
    """A checkpoint reader (``keys``, ``slice``, ``close``) whose quantized weights read dequantized."""

    def __init__(self, reader, fmt: Fp8Format):
        self.reader, self.fmt = reader, fmt
        names = set(reader.keys())
        self._keys = dict.fromkeys(
            k for k in reader.keys() if not (k.endswith(SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] in names)
        )

    def keys(self):
        return self._keys.keys()

    def slice(self, key: str):
        raw = self.reader.slice(key)
        if _dtype_name(raw) not in ("F8_E4M3",):
            return raw
        scale_key = key + SCALE_SUFFIX
        if scale_key not in self.reader.keys():
            raise ValueError(f"FP8 checkpoint: {key} is float8 but has no {scale_key}")
        return _Fp8Slice(raw, self.reader.slice(scale_key), self.fmt.block, key)

    def close(self) -> None:
        self.reader.close()


def _dtype_name(raw) -> str:
    return raw.get_dtype() if hasattr(raw, "get_dtype") else ""
