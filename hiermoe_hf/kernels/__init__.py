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
    if kernels == "torch" or (kernels == "auto" and device.type != "cuda"):
        return TORCH_OPS
    if kernels not in ("triton", "auto"):
        raise ValueError(f"unknown kernels {kernels!r}; valid: auto, triton, torch")
    try:
        from . import triton_ops  # noqa: PLC0415  (Triton is optional: imported only when asked for)
    except ImportError as err:
        if kernels == "triton":
            raise RuntimeError(f"kernels='triton' requested but Triton kernels cannot load: {err}") from err
        return TORCH_OPS
    found = triton_ops.ops()
    if found is None and kernels == "triton":
        from .triton_util import why_cannot_run  # noqa: PLC0415

        raise RuntimeError(f"kernels='triton' requested but Triton cannot run: {why_cannot_run()}")
    return found or TORCH_OPS
