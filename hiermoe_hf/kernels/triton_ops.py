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


def ops(require: bool) -> SimpleNamespace:
    """Triton ops if they can launch here (CUDA, or kernels built under TRITON_INTERPRET=1).

    require=True raises RuntimeError with the reason when they cannot; require=False then falls back
    to the torch reference (``name="torch"``), which is what ``kernels="auto"`` wants.
    """
    reason = why_cannot_run()
    if reason is None:
        return TRITON_OPS
    if require:
        raise RuntimeError(f"kernels='triton' requested but Triton cannot run: {reason}")
    from . import TORCH_OPS

    return TORCH_OPS
