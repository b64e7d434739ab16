"""Seconds for a strategy's stages, from their row counts and the cost model's constants (DESIGN.md 7).

``forward_exchange_times`` is the one price of one layer's forward exchange (dispatch + combine)
that ``dispatch="auto"``, the planner and the swap objective all use, so the planner's choice is
``auto``'s choice on the same routing.

Shapes: W ranks, S group members; counts ``[W, S]`` per stage as ``exchange.stage_rows`` gives them.
"""

from __future__ import annotations

from typing import Sequence

import torch

from hiermoe_hf.cost.model import CostModel
from hiermoe_hf.exchange.stage_rows import packed_rows_max, peer_rows_max
from hiermoe_hf.topology import Topology

# One layer's forward exchange per stage: the dispatcher's dispatch (rows with their route metadata
# in one buffer: 1 collective) and combine (rows back: 1), so 2 latencies, the rows' bytes twice, and
# one local pack + unpack of the stage's rows. The layer's one count exchange (all stages' split sizes
# at once, and auto's choice) is paid by every strategy alike, so it does not enter the comparison.
FORWARD_LATENCIES = 2
FORWARD_EXCHANGES = 2
FORWARD_LOCAL_UNITS = 1


def stage_time_tensors(
    counts: Sequence[torch.Tensor],
    topology: Topology,
    strategy: str,
    row_bytes: float,
    cost_model: CostModel,
    latency_terms: float = 1,
    exchanges: float = 1.0,
    local_units: float = 0.0,
) -> list[torch.Tensor]:
    """Seconds per stage as float64 0-d tensors on the counts' device (no host read; ``auto`` passes
    the host tensors its count exchange read).

    latency_terms * alpha + exchanges * S * (largest per-peer rows * row_bytes) * beta (0 for
    groups of one), plus local_units * the local pack+unpack time of the most rows any rank packs.
    Defaults: one exchange of the rows, network only.
    """
    stages = topology.stages(strategy)
    if len(counts) != len(stages):
        raise ValueError(f"{len(counts)} count matrices for the {len(stages)} stages of {strategy!r}")
    out = []
    for st, c in zip(stages, counts):
        t = torch.zeros((), dtype=torch.float64, device=c.device)
        if topology.group_size(st) > 1:
            k = cost_model.stage_cost(st)
            peer = peer_rows_max(c, topology, st).to(torch.float64)
            t = latency_terms * k.alpha + exchanges * topology.group_size(st) * peer * row_bytes * k.beta
        if local_units:
            t = t + local_units * cost_model.local_time(packed_rows_max(c).to(torch.float64) * row_bytes)
        out.append(t)
    return out


def predict_stage_times(
    counts: Sequence[torch.Tensor],
    topology: Topology,
    strategy: str,
    row_bytes: float,
    cost_model: CostModel,
    latency_terms: float = 1,
    exchanges: float = 1.0,
    local_units: float = 0.0,
) -> list[float]:
    """``stage_time_tensors`` as Python floats (planner, benchmarks, swap objective)."""
    times = stage_time_tensors(counts, topology, strategy, row_bytes, cost_model, latency_terms, exchanges, local_units)
    return torch.stack(times).tolist() if times else []


def forward_exchange_seconds(
    counts: Sequence[torch.Tensor], topology: Topology, strategy: str, row_bytes: float, cost_model: CostModel
) -> torch.Tensor:
    """float64 0-d tensor: seconds of one layer's forward exchange of ``strategy`` (``auto``)."""
    times = stage_time_tensors(
        counts, topology, strategy, row_bytes, cost_model, FORWARD_LATENCIES, FORWARD_EXCHANGES, FORWARD_LOCAL_UNITS
    )
    return sum(times, torch.zeros((), dtype=torch.float64, device=counts[0].device if counts else None))


def forward_exchange_times(
    counts: Sequence[torch.Tensor], topology: Topology, strategy: str, row_bytes: float, cost_model: CostModel
) -> list[float]:
    """Seconds per stage of one layer's forward exchange (dispatch + combine) of ``strategy``."""
    return predict_stage_times(
        counts, topology, strategy, row_bytes, cost_model, FORWARD_LATENCIES, FORWARD_EXCHANGES, FORWARD_LOCAL_UNITS
    )


def ring_allreduce_bytes(nbytes: float, ranks: int) -> float:
    """Bytes one rank sends in a ring all-reduce of ``nbytes`` over ``ranks`` ranks: 2 (n-1)/n x nbytes
    (reduce-scatter, then all-gather, of n chunks). The price of expert data parallelism: the expert
    gradients of W / ep_size replicas are summed this way once per optimizer step (issue 11)."""
    return 2.0 * (ranks - 1) / ranks * nbytes if ranks > 1 else 0.0
