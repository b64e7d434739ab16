"""What a patched model carries: one ``Runtime`` per model, one ``LayerState`` per MoE block."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .comm import StageGroups
from .config import HierMoEConfig
from .placement import Placement
from .swap_stats import RoutingStats
from .topology import Topology


@dataclass
class Runtime:
    """Shared by all layers of one patched model."""

    config: HierMoEConfig
    topology: Topology
    rank: int
    groups: StageGroups | None  # None at world size 1
    model_type: str
    cost_model: object = None  # cost_model.CostModel, loaded once at patch time

    @property
    def world_size(self) -> int:
        return self.topology.world_size


@dataclass
class LayerState:
    """One MoE block: where its experts live, and what its last forward did."""

    name: str
    runtime: Runtime
    placement: Placement
    param_names: tuple[str, ...]
    last: dict = field(default_factory=dict)
    swaps: list = field(default_factory=list)
    routing: RoutingStats = field(default_factory=RoutingStats)  # recent logical top-k ids, for swaps

    @property
    def local_experts(self) -> int:
        return self.placement.local_experts

    def local_logical(self) -> torch.Tensor:
        return self.placement.local_logical(self.runtime.rank)
