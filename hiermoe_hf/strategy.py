"""Strategy choice for ``dispatch="auto"`` (DESIGN.md section 5)."""

from __future__ import annotations

import torch

from .topology import Topology


def pick_strategy(
    topology: Topology,
    candidates: list[str],
    dest_rank_TK: torch.Tensor,
    row_bytes: int,
    cost_model,
    group=None,
) -> tuple[str, dict[str, float]]:
    """Pick the strategy every rank will use for this layer's exchange.

    Args:
        topology: the expert-parallel topology.
        candidates: strategy names to choose from (``topology.strategies()``).
        dest_rank_TK: int64 [T, K], destination rank of each of this rank's selections.
        row_bytes: bytes one row puts on the wire.
        cost_model: the cost model constants, or None.
        group: process group spanning the topology (None = default).
    Returns:
        (name, predicted_ms per candidate). Until the cost model lands: the deepest ``hdD``.
    """
    deepest = [c for c in candidates if c.startswith("hd")][-1]
    return deepest, {}
