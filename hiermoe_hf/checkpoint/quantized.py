"""Quantized Hub checkpoints that ``from_pretrained`` reads: which formats, each dequantized while read.

A format wraps the checkpoint reader so that quantized tensors read as plain float32 slices (only
the rows asked for are dequantized: a rank's own experts, its FSDP2 chunk); the model is built,
trained and saved unquantized. Any other ``quant_method`` is refused by name.
"""

from __future__ import annotations

from hiermoe_hf.checkpoint.fp8 import Fp8Format
from hiermoe_hf.checkpoint.mxfp4 import Mxfp4Format

QuantizedFormat = Fp8Format | Mxfp4Format
FORMATS = {"fp8": Fp8Format.from_quant, "mxfp4": Mxfp4Format.from_quant}


def take_quantization(config) -> QuantizedFormat | None:
    """The quantized format of ``config`` (its ``quantization_config`` removed, so the model is plain),
    or None for an unquantized config; ValueError naming any other format."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    method = quant.get("quant_method")
    if method not in FORMATS:
        raise ValueError(
            f"quantization_config.quant_method={method!r} is not supported by hiermoe_hf.from_pretrained; it reads "
            "unquantized checkpoints, fine-grained FP8 (quant_method='fp8': e4m3 + weight_scale_inv block scales) "
            "and gpt-oss MXFP4 (quant_method='mxfp4'); dequantize the checkpoint first"
        )
    fmt = FORMATS[method](quant)
    del config.quantization_config
    return fmt
