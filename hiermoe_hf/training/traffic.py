"""Inter-node traffic of the strategy in use versus what the flat ``a2a`` baseline would have sent.

``stats`` reports what the last exchange moved per stage, but strategies with one flat stage
(``a2a``, ``hd1``) do not separate the rows that crossed nodes, and nothing reports what ``a2a``
*would* have sent. Both follow exactly from the routing (DESIGN.md section 5), counted by
``exchange.stage_rows``: a2a sends one row per (token, expert) on another node, hd1 one per (token,
remote rank), hdD (D >= 2) one per (token, remote node). ``TrafficMeter`` counts them for every MoE
forward from the experts module's inputs, so gradient accumulation and any number of forwards per
step are covered. A gradient-checkpointing recompute exchanges again: real traffic, counted under
the same names prefixed ``recompute_`` (its tokens are not new tokens).
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist

from hiermoe_hf.exchange.stage_rows import crossing_rows, sent_rows, stage_rows
from hiermoe_hf.runtime.registry import LAYER_ATTR, moe_layers, runtime_of, world
from hiermoe_hf.topology import Topology
from hiermoe_hf.training.expert_dp import allreduce_bytes_per_rank

# Numeric counters of forwards, in the order they travel in the cross-rank sum (recompute ones follow).
FORWARD_FIELDS = (
    "tokens",            # tokens routed (summed over MoE layers)
    "inter_node_rows",   # dispatch rows that crossed nodes with the strategy in use
    "a2a_inter_node_rows",
    "inter_node_bytes",  # the same in bytes (hidden rows only; ids/weights metadata excluded)
    "a2a_inter_node_bytes",
    "rows_sent",         # dispatch rows sent to other ranks over all stages
    "a2a_rows_sent",
)
FIELDS = (
    *FORWARD_FIELDS,
    *(f"recompute_{f}" for f in FORWARD_FIELDS),
    "expert_grad_allreduce_bytes",  # per optimizer step (one pop): expert grads summed over replicas (ep_size < W)
)


def inter_node_rows(
    dest_rank_TK: torch.Tensor, topology: Topology, rank: int, strategy: str, counts: list | None = None
) -> torch.Tensor:
    """int64 [] on the routing's device: rows of ``rank``'s tokens that cross nodes in one dispatch of
    ``strategy`` (any stage), from the destination ranks [T, K] (-1: none), by ``exchange.stage_rows``
    (``counts``: its result, if already computed). A one-level topology is one node (nothing crosses)."""
    if topology.depth < 2 or strategy == "local":
        return torch.zeros((), dtype=torch.int64, device=dest_rank_TK.device)
    counts = counts if counts is not None else stage_rows(dest_rank_TK, topology, strategy, origins=[rank])
    return sum(crossing_rows(c, topology, st) for st, c in zip(topology.stages(strategy), counts))


class TrafficMeter:
    """Counts, per MoE forward on this rank, inter-node rows/bytes of the strategy used and of a2a.

    ``pop()`` returns the counters gathered since the last ``pop`` and resets them; with
    ``reduce=True`` (collective) the numeric counters are summed over ranks.
    """

    def __init__(self, model: torch.nn.Module):
        self.runtime = runtime_of(model)
        layers = list(moe_layers(model).values())
        # always_call: a recompute that torch stops early (non-reentrant checkpointing) has still dispatched.
        self._handles = [e.register_forward_hook(self._after_forward, always_call=True) for e, _ in layers]
        self._counted: dict[int, object] = {}  # experts module -> the last ForwardRecord counted
        # The cross-rank sum must live where the backend can reduce it (CUDA for NCCL): next to the experts.
        self._probe = getattr(layers[0][0], layers[0][1].param_names[0]) if layers else None
        self._grad_allreduce_bytes = allreduce_bytes_per_rank(model)  # fixed by the layout, paid once per step
        self._reset()

    def _reset(self) -> None:
        self.counts = dict.fromkeys(FIELDS, 0)
        self.strategies: Counter[str] = Counter()

    def _after_forward(self, module, args, output) -> None:
        layer = getattr(module, LAYER_ATTR)
        last = layer.last
        if last is None or self._counted.get(id(module)) is last:  # a forward that failed before dispatching
            return
        self._counted[id(module)] = last
        strategy = last.strategy
        hidden_TH, topk_ids_TK = args[0], args[1]
        rt = self.runtime
        counts = {}
        if not last.recompute:
            self.strategies[strategy] += 1
        counts["tokens"] = int(topk_ids_TK.shape[0])
        if rt.world_size > 1:
            self._count_exchange(counts, layer, last, hidden_TH, topk_ids_TK)
        prefix = "recompute_" if last.recompute else ""
        for name, value in counts.items():
            self.counts[prefix + name] += value

    def _count_exchange(self, counts: dict, layer, last, hidden_TH, topk_ids_TK) -> None:
        rt, strategy = self.runtime, last.strategy
        placement = layer.placement
        ids_TK = topk_ids_TK.to(placement.phys_of_E.device)
        valid = (ids_TK >= 0) & (ids_TK < placement.num_experts)  # Transformers may pad with a sentinel id
        phys_TK = placement.phys_of_E[ids_TK.clamp(0, placement.num_experts - 1)]
        dest_TK = torch.where(valid, phys_TK // placement.local_experts, -1)
        row_bytes = hidden_TH.shape[1] * hidden_TH.element_size()
        # Device tensors, summed on the device and read back once per pop: no host sync per layer.
        (flat,) = rt.topology.stages("a2a")
        a2a_counts = stage_rows(dest_TK, rt.topology, "a2a", origins=[rt.rank])
        actual = inter_node_rows(dest_TK, rt.topology, rt.rank, strategy)
        a2a = inter_node_rows(dest_TK, rt.topology, rt.rank, "a2a", a2a_counts)
        counts["inter_node_rows"] = actual
        counts["a2a_inter_node_rows"] = a2a
        counts["inter_node_bytes"] = actual * row_bytes
        counts["a2a_inter_node_bytes"] = a2a * row_bytes
        counts["rows_sent"] = sum(s["rows_sent"] for s in last.stages)
        counts["a2a_rows_sent"] = sent_rows(a2a_counts[0], rt.topology, flat).sum()

    def pop(self, reduce: bool = False) -> dict:
        """Counters since the last pop; call once per optimizer step (the expert-gradient all-reduce
        traffic is counted once per pop)."""
        counts = dict(self.counts)
        counts["expert_grad_allreduce_bytes"] = int(self._grad_allreduce_bytes)
        device = self._probe.device if self._probe is not None else torch.device("cpu")
        t = torch.stack([torch.as_tensor(counts[f], dtype=torch.float64, device=device) for f in FIELDS])
        if reduce and world()[0] > 1:
            dist.all_reduce(t)
        counts = {f: int(v) for f, v in zip(FIELDS, t.tolist())}  # the one host read of the step's counters
        counts["strategies"] = dict(self.strategies)
        self._reset()
        return counts

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def summarize(counts: dict) -> dict:
    """Derived figures for logs and the progress bar: inter-node saving vs a2a in bytes and as a fraction."""
    saved = counts["a2a_inter_node_bytes"] - counts["inter_node_bytes"]
    base = counts["a2a_inter_node_bytes"]
    return {"inter_node_bytes_saved": saved, "inter_node_saved_frac": saved / base if base else 0.0}
