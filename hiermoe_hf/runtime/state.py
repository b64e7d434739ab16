"""What a patched model carries: one ``Runtime`` per model, one ``LayerState`` per MoE block, and
the frozen ``ForwardRecord`` each forward leaves for ``stats``, the traffic meter and the swap."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from hiermoe_hf.config import HierMoEConfig
from hiermoe_hf.cost.trials import StrategyTrials
from hiermoe_hf.exchange.bounded import DEFAULT_TIMEOUT_S
from hiermoe_hf.exchange.comm import StageGroups
from hiermoe_hf.placement import Placement
from hiermoe_hf.runtime.ep_layout import EPLayout
from hiermoe_hf.runtime.routing import RoutingStats
from hiermoe_hf.topology import Topology


@dataclass
class Runtime:
    """Shared by all layers of one patched model.

    Ranks are of two kinds (``runtime/ep_layout.py``): ``rank`` and ``world_size`` are the
    expert-parallel group's (group rank, ep_size: placements and the topology use them);
    ``global_rank`` and ``global_world_size`` are the default process group's. They coincide unless
    ``config.ep_size`` is smaller than the world.
    """

    config: HierMoEConfig
    topology: Topology  # one expert-parallel group's levels
    rank: int  # rank inside the expert-parallel group
    groups: StageGroups | None  # None when the group is one rank
    model_type: str
    cost_model: object = None  # cost.model.CostModel, loaded once at patch time
    layout: EPLayout | None = None  # None: one group spanning the world of topology.world_size ranks
    ep_group: object = None  # process group of this rank's expert-parallel group (None: one rank)
    replica_group: object = None  # process group of the ranks holding the same experts (None: no replicas)
    trials: StrategyTrials | None = None  # the timed choice: auto's strategy, overlap_chunks="auto"
    collective_timeout_s: float = DEFAULT_TIMEOUT_S  # config's collective_timeout_s, resolved once at patch

    @property
    def world_size(self) -> int:
        """Ranks in the expert-parallel group (ep_size)."""
        return self.topology.world_size

    @property
    def global_rank(self) -> int:
        return self.rank if self.layout is None else self.layout.global_rank

    @property
    def global_world_size(self) -> int:
        return self.world_size if self.layout is None else self.layout.world_size

    def global_of(self, group_rank: int) -> int:
        """Global rank of ``group_rank`` in this rank's expert-parallel group."""
        return group_rank if self.layout is None else self.layout.to_global(group_rank)

    @property
    def replicas(self) -> int:
        """Copies of the expert-parallel group in the world (W / ep_size)."""
        return 1 if self.layout is None else self.layout.replicas


class Elapsed:
    """Milliseconds summed over (start, end) marks. A mark is the CPU clock on CPU tensors, a device
    timer stamp on CUDA (``kernels.triton_clock``): no host sync in the forward; the sum is read on
    the host only when ``stats`` asks (``ms``) and stays on the device for ``auto``'s trials
    (``microseconds``)."""

    def __init__(self, *spans):
        self.spans = spans

    @staticmethod
    def mark(like: torch.Tensor):
        if like.is_cuda:
            from hiermoe_hf.kernels.triton_clock import stamp  # noqa: PLC0415  (Triton: CUDA only)

            return stamp(like)
        return time.perf_counter()

    def _device_ns(self) -> torch.Tensor:
        return sum(end - start for start, end in self.spans)

    def ms(self) -> float:
        if self.spans and isinstance(self.spans[0][0], float):
            return sum(1e3 * (end - start) for start, end in self.spans)
        return self._device_ns().item() / 1e6 if self.spans else 0.0

    def microseconds(self, device: torch.device) -> torch.Tensor:
        """int64 [1] on ``device``: the total in microseconds, without a host<->device copy or sync."""
        if self.spans and not isinstance(self.spans[0][0], float):
            return torch.div(self._device_ns(), 1000, rounding_mode="floor").to(device=device).view(1)
        return torch.full((1,), round(1e3 * self.ms()), dtype=torch.int64, device=device)


@dataclass(frozen=True)
class ForwardRecord:
    """What one MoE forward on this rank did. Tensors stay on the device until ``stats`` reads them.

    stages: per stage ``{name, group_size, rows_sent, rows_received, bytes_sent, meta_bytes_sent,
    max_peer_rows}`` (rows to/from other ranks); load_per_rank: int64 [W] this rank's selections per
    destination rank; expert_rows: int64 [] rows through the local experts. The exchange fields are
    None at world size 1 (Transformers' own forward ran), where ``stats`` leaves them out.
    recompute: this forward was a gradient-checkpointing recompute (run inside a backward).
    measured_ms_by_strategy: ``dispatch="auto"`` without a cost model only: each candidate's timed
    forward (one pass over the MoE layers, ms) so far (``cost.trials``), else None.
    overlap_chunks: the token chunks this forward ran in; measured_ms_by_chunks: with
    ``overlap_chunks="auto"`` only, chunk count -> its timed forward so far (the strategy kept), else None.
    """

    strategy: str
    tokens: int
    kernels: str
    stages: tuple[dict, ...]
    load_per_rank: torch.Tensor | list
    predicted_ms: float | None = None
    predicted_ms_by_strategy: dict | None = None
    measured_ms: Elapsed | None = None
    measured_ms_by_strategy: dict | None = None
    cost_model: str | None = None
    cost_model_defaults: bool | None = None
    expert_rows: torch.Tensor | None = None
    recompute: bool = False
    overlap_chunks: int | None = None
    measured_ms_by_chunks: dict | None = None

    @property
    def exchanged(self) -> bool:
        return self.measured_ms is not None


@dataclass
class LayerState:
    """One MoE block: where its experts live, what its last forward did, what the swap needs."""

    name: str
    runtime: Runtime
    placement: Placement
    param_names: tuple[str, ...]
    last: ForwardRecord | None = None
    swaps: list = field(default_factory=list)
    routing: RoutingStats = field(default_factory=RoutingStats)  # recent logical top-k ids, for swaps
    record_routing: bool = False  # set by swap_experts: record even with swap_interval=0

    @property
    def local_experts(self) -> int:
        return self.placement.local_experts

    @property
    def records_routing(self) -> bool:
        return self.record_routing or self.runtime.config.swap_interval > 0

    def local_logical(self) -> torch.Tensor:
        return self.placement.local_logical(self.runtime.rank)
