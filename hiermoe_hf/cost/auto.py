"""Strategy choice for ``dispatch="auto"`` (DESIGN.md sections 5 and 7).

The choice rides on the layer's one count exchange (``exchange.layer_counts``): every rank's
contribution to every candidate's per-stage counts is all-reduced, read with the split sizes and
priced on the host, and the cheapest wins, ties going to the earlier candidate. Identical inputs and
identical float arithmetic on every rank mean every rank picks the same strategy without another
collective. The patched forward calls ``exchange_counts`` directly; ``pick_strategy`` is the same
choice as a function.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hiermoe_hf.cost import model as cm
from hiermoe_hf.cost.pricing import forward_exchange_seconds
from hiermoe_hf.exchange.layer_counts import exchange_counts, split_global
from hiermoe_hf.topology import Topology


def _as_cost_model(cost_model, topology: Topology) -> cm.CostModel:
    """A CostModel, a calibration path or preset name, or None (defaults)."""
    if isinstance(cost_model, cm.CostModel):
        return cost_model
    if cost_model is None or isinstance(cost_model, (str, os.PathLike)):
        return cm.load_cost_model(cost_model, topology)
    raise ValueError(
        f"cost_model must be a CostModel, a calibration JSON path, a preset name or None, got {cost_model!r}"
    )


def predicted_ms(
    topology: Topology, counts: dict[str, list[torch.Tensor]], row_bytes: int, model: cm.CostModel
) -> dict[str, float]:
    """Predicted ms of one layer's forward exchange (dispatch + combine) per candidate, from global
    counts (``price``, the function the patched forward uses)."""
    return dict(zip(counts, price(topology, counts, row_bytes, model).tolist()))


def pick_strategy(
    topology: Topology,
    candidates: list[str],
    dest_rank_TK: torch.Tensor,
    row_bytes: int,
    cost_model,
) -> tuple[str, dict[str, float]]:
    """Pick the strategy every rank will use for this layer's exchange. Collective over the world.

    Args:
        topology: the expert-parallel topology.
        candidates: strategy names to choose from (``topology.strategies()``).
        dest_rank_TK: int64 [T, K], destination rank of each of this rank's selections (-1: none).
        row_bytes: bytes one row puts on the wire.
        cost_model: a ``cost_model.CostModel``, a calibration JSON path or preset name, or None
            (defaults; load it once and pass the object to avoid re-reading per layer).
    Returns:
        (name, predicted ms of the layer's forward exchange per candidate), the same on every rank.
    """
    if not candidates:
        raise ValueError(
            f"no candidate strategies; valid ones for topology {topology}: {', '.join(topology.strategies())}"
        )
    for name in candidates:
        topology.stages(name)  # raises ValueError naming the valid strategies
    model = _as_cost_model(cost_model, topology)
    distributed = dist.is_available() and dist.is_initialized() and topology.world_size > 1
    rank = dist.get_rank() if distributed else 0
    group = dist.group.WORLD if distributed else None
    names = tuple(candidates)
    if len(names) == 1:
        names = names + names  # price even a single candidate (the result reports its time)
    counts = exchange_counts(topology, group, rank, Priced(names, model), dest_rank_TK, row_bytes)
    return counts.strategy, dict(zip(names, counts.predicted_ms.tolist()))


def price(topology: Topology, counts: dict[str, list[torch.Tensor]], row_bytes: int, cost_model) -> torch.Tensor:
    """float64 [C]: predicted ms of one layer's forward exchange per candidate, in ``counts``' order."""
    return torch.stack(
        [1e3 * forward_exchange_seconds(c, topology, name, row_bytes, cost_model) for name, c in counts.items()]
    )


@dataclass(frozen=True)
class Priced:
    """Choose the cheapest of ``candidates`` under ``cost_model`` (``dispatch="auto"`` with constants):
    priced on the host from the global counts, ties to the earlier candidate."""

    candidates: tuple[str, ...]
    cost_model: object

    @property
    def counting(self) -> tuple[str, ...]:
        return self.candidates

    def extra(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.int64, device=device)

    def pick(self, summed_extra: list[int], counted) -> tuple[str, torch.Tensor]:
        """The cheapest candidate and float64 [C] predicted ms (host tensor), priced on the host from
        the layer's global counts summed over its chunks (``layer_counts.Counted``): the count
        exchange's read brings them anyway, so pricing launches no kernel and reads nothing more."""
        counts = split_global(counted.topology, self.candidates, counted.summed())
        predicted = price(counted.topology, counts, counted.row_bytes, self.cost_model)
        return self.candidates[int(torch.argmin(predicted))], predicted  # first minimum: ties to the earlier one
