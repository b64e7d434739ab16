"""Strategy choice for ``dispatch="auto"`` (DESIGN.md sections 5 and 7).

Every rank counts, for each candidate, the rows its own tokens make every rank send in every
stage (rows of different origin tokens are never merged, so these contributions add up exactly to
the global per-stage counts). One ``all_reduce`` of the concatenated int64 counts gives every rank
the same global counts; the cost model turns them into a predicted time per candidate, and the
cheapest wins, ties going to the earlier candidate. Identical inputs and identical float
arithmetic on every rank mean every rank picks the same strategy without another collective.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from hiermoe_hf.cost import model as cm
from hiermoe_hf.cost.pricing import forward_exchange_times
from hiermoe_hf.exchange.stage_rows import stage_rows
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


def local_counts(topology: Topology, candidates: list[str], dest_rank_TK: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's contribution, flattened: for each candidate, each stage, int64 [W, S] row counts."""
    parts = [
        c.reshape(-1)
        for name in candidates
        for c in stage_rows(dest_rank_TK.detach().to(torch.int64), topology, name, origins=[rank])
    ]
    return torch.cat(parts)


def split_counts(topology: Topology, candidates: list[str], flat: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Inverse of ``local_counts``' flattening: candidate -> per-stage int64 [W, S]."""
    W, out, pos = topology.world_size, {}, 0
    for name in candidates:
        out[name] = []
        for st in topology.stages(name):
            S = topology.group_size(st)
            out[name].append(flat[pos : pos + W * S].view(W, S))
            pos += W * S
    return out


def predicted_ms(
    topology: Topology, counts: dict[str, list[torch.Tensor]], row_bytes: int, model: cm.CostModel
) -> dict[str, float]:
    """Predicted ms of one layer's forward exchange (dispatch + combine) per candidate: each stage
    pays the dispatcher's 4 collectives' latencies, its rows twice, and its local pack + unpack."""
    return {name: 1e3 * sum(forward_exchange_times(c, topology, name, row_bytes, model)) for name, c in counts.items()}


def pick_strategy(
    topology: Topology,
    candidates: list[str],
    dest_rank_TK: torch.Tensor,
    row_bytes: int,
    cost_model,
    group=None,
) -> tuple[str, dict[str, float]]:
    """Pick the strategy every rank will use for this layer's exchange. Collective over ``group``
    (the expert-parallel group, whose ranks the topology describes; None = the default group).

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
    rank = dist.get_rank(group) if distributed else 0
    flat = local_counts(topology, candidates, dest_rank_TK, rank)
    if distributed:
        # the counts live on the routing's device: NCCL reduces device tensors, gloo host ones
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat = flat.cpu()
    predicted = predicted_ms(topology, split_counts(topology, candidates, flat), row_bytes, model)
    best = min(range(len(candidates)), key=lambda i: (predicted[candidates[i]], i))
    return candidates[best], predicted
