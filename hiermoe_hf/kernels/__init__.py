"""Dispatch kernels: plain-torch references (``reference``) and Triton versions.

``select_ops(kernels, device)`` returns the namespace the dispatcher calls; every implementation has
the signatures of ``reference``: stage_layout, pack_rows, pack_route, unpack_sum, expand_layout,
combine_rows.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from . import reference

_NAMES = ("stage_layout", "pack_rows", "pack_route", "unpack_sum", "expand_layout", "combine_rows")


def _namespace(module, name: str) -> SimpleNamespace:
    return SimpleNamespace(name=name, **{n: getattr(module, n) for n in _NAMES})


TORCH_OPS = _namespace(reference, "torch")


def select_ops(kernels: str, device: torch.device) -> SimpleNamespace:
    """"torch" -> reference; "triton" -> Triton (error if it cannot run); "auto" -> Triton on CUDA."""
    if kernels == "torch":
        return TORCH_OPS
    if kernels in ("triton", "auto"):
        try:
            from . import triton_ops  # noqa: F401  (written by the kernels issue)
        except ImportError as err:
            if kernels == "triton":
                raise RuntimeError(f"kernels='triton' requested but Triton kernels cannot load: {err}") from err
            return TORCH_OPS
        if kernels == "auto" and device.type != "cuda":
            return TORCH_OPS
        return triton_ops.ops(require=kernels == "triton")
    raise ValueError(f"unknown kernels {kernels!r}; valid: auto, triton, torch")
