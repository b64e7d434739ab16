"""The Triton implementation namespace that ``select_ops`` hands to the dispatcher.

Same six functions and signatures as ``reference``; ``name`` says which path ran (shown in stats).
"""

from __future__ import annotations

from types import SimpleNamespace

from . import triton_combine, triton_layout, triton_pack
from .triton_util import why_cannot_run

TRITON_OPS = SimpleNamespace(
    name="triton",
    stage_layout=triton_layout.stage_layout,
    pack_rows=triton_pack.pack_rows,
    pack_route=triton_pack.pack_route,
    unpack_sum=triton_combine.unpack_sum,
    expand_layout=triton_layout.expand_layout,
    combine_rows=triton_combine.combine_rows,
)


def ops() -> SimpleNamespace | None:
    """Triton ops if they can launch here (CUDA, or kernels built under TRITON_INTERPRET=1), else None."""
    return TRITON_OPS if why_cannot_run() is None else None
