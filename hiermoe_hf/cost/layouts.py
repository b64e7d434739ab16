"""Which layout to rent (issue 11): every expert-parallel group size and strategy on an N x G cluster.

A layout is ``ep_size`` (ranks per expert-parallel group; W / ep_size replicas of it) and a dispatch
strategy. Per optimizer step it pays:

- the exchange: one layer's forward exchange (dispatch + combine) priced by
  ``pricing.forward_exchange_times`` on the *group's* topology, times 2 (the backward repeats it),
  times the MoE layers, times the micro-batches per step. A group of ``ep_size <= G`` ranks lives in
  one node (topology ``1 x ep_size``: every stage costs in-node constants, ``CostModel.stage_cost``);
  a larger one spans ``ep_size / G`` whole nodes (``ep_size/G x G``). Groups that would straddle a
  node are not offered (``runtime/ep_layout.py`` groups consecutive ranks).
- the expert-gradient all-reduce across the replicas, once per step: each rank holds
  ``n = moe_layers * E/ep_size * 3 * hidden * moe_intermediate * dtype_bytes`` bytes of expert
  gradients and sends ``X = 2 (R-1)/R * n`` in a ring over its R replicas (``ring_allreduce_bytes``).
  Replicas on different nodes (N > 1): ring ``j*ep_size + g`` leaves each node once, so a node's uplink
  carries ``min(ep_size, G) * X`` bytes; its time per byte is read off the cluster's inter-node stage,
  whose constants price every rank of a node sending ``(N-1)/N`` of its bytes out at once:
  ``t = 2 (R-1) alpha + min(ep_size, G) * X * N beta / (G (N-1))``. All replicas in one node (N = 1):
  each rank's own link, from the in-node stage: ``t = 2 (R-1) alpha + X G beta / (G-1)``.

``fits``: with ``--memory``, whether the layout's per-rank memory (``cost/memory.py``, experts
E/ep_size per rank) fits the GPU; without it, True for every layout (the output says so).
"""

from __future__ import annotations

import os
from typing import Callable

from hiermoe_hf.cost import memory as mem
from hiermoe_hf.cost import model as cm
from hiermoe_hf.cost.pricing import ring_allreduce_bytes
from hiermoe_hf.topology import Stage, Topology

LAYOUT_SAMPLES = 1024  # sampled tokens per rank per layout (rows scaled to --tokens): keeps the planner quick
FITS_NOTE = "fits=True for every layout: memory not checked (add --memory to check each layout's per-rank memory)"


def group_levels(cluster: Topology, ep_size: int) -> tuple[int, int] | None:
    """One group's topology on an N x G cluster: (1, ep) inside a node, (ep/G, G) over whole nodes;
    None when a group of consecutive ranks would straddle a node or the nodes do not split evenly."""
    N, G = cluster.levels
    if ep_size <= G and G % ep_size == 0:
        return (1, ep_size)
    if ep_size % G == 0 and N % (ep_size // G) == 0:
        return (ep_size // G, G)
    return None


def expert_grad_bytes(spec, ep_size: int, dtype_bytes: int) -> float:
    """Bytes of expert gradients one rank holds: its E/ep_size experts of every MoE layer."""
    if not spec.moe_intermediate or not spec.moe_layers:
        raise ValueError(
            f"model {spec.name!r}: layouts need the expert size and the MoE layer count (config keys "
            "moe_intermediate_size and num_hidden_layers); use a preset or a full config.json"
        )
    return spec.moe_layers * (spec.experts // ep_size) * 3 * spec.hidden * spec.moe_intermediate * dtype_bytes


def allreduce_seconds(cluster: Topology, cost_model: cm.CostModel, ep_size: int, nbytes: float) -> float:
    """Seconds of the ring all-reduce of ``nbytes`` per rank over the W / ep_size replicas (module doc)."""
    N, G = cluster.levels
    R = cluster.world_size // ep_size
    if R == 1:
        return 0.0
    X = ring_allreduce_bytes(nbytes, R)
    if N > 1:
        c = cost_model.stage_cost(Stage(cluster.stage_name(0, 1), 0, 1, False))
        return 2 * (R - 1) * c.alpha + min(ep_size, G) * X * N * c.beta / (G * (N - 1))
    c = cost_model.stage_cost(Stage(cluster.stage_name(1, 2), 1, 2, False))
    return 2 * (R - 1) * c.alpha + X * G * c.beta / (G - 1)


def compare_layouts(
    spec,
    cluster: Topology,
    cost_model_for: Callable[[Topology], cm.CostModel],
    strategy_times: Callable,
    dtype_bytes: int = 2,
    micro_batches: int = 1,
    fits: Callable[[int], bool] = lambda ep: True,
) -> list[dict]:
    """Every (ep_size, strategy) that fits the cluster, cheapest step first.

    cost_model_for: topology -> CostModel (the cluster's and each group's; None: none for that group
    shape, the layout is left out); strategy_times: group
    topology, its cost model -> [(strategy, counts, seconds per stage of one layer's forward exchange)]
    (``planner.strategy_times`` with the routing bound). Each entry: ep_size, strategy, group
    topology, exchange_ms, expert_grad_allreduce_ms, total_ms per optimizer step, fits (``fits(ep_size)``).
    """
    if cluster.depth != 2:
        raise ValueError(f"layouts are compared on N x G clusters (two levels); topology {cluster} has {cluster.depth}")
    if micro_batches < 1:
        raise ValueError(f"micro-batches per optimizer step must be >= 1, got {micro_batches}")
    W, cluster_model = cluster.world_size, cost_model_for(cluster)
    out = []
    for ep in (d for d in range(1, W + 1) if W % d == 0 and spec.experts % d == 0):
        levels = group_levels(cluster, ep)
        if levels is None:
            continue
        group = Topology(levels)
        group_model = cost_model_for(group)
        if group_model is None and ep > 1:
            continue  # no constants for this group shape (a calibration of another topology)
        ok = fits(ep)
        allreduce_ms = 1e3 * allreduce_seconds(cluster, cluster_model, ep, expert_grad_bytes(spec, ep, dtype_bytes))
        per_step = 2 * spec.moe_layers * micro_batches  # forward + backward exchange, every MoE layer
        if ep == 1:
            priced = [("local", 0.0)]
        else:
            priced = [(name, sum(t)) for name, _, t in strategy_times(group, group_model)]
        for name, layer_s in priced:
            exchange_ms = 1e3 * layer_s * per_step
            out.append({
                "ep_size": ep, "strategy": name, "group_topology": str(group), "exchange_ms": exchange_ms,
                "expert_grad_allreduce_ms": allreduce_ms, "total_ms": exchange_ms + allreduce_ms, "fits": ok,
            })
    return sorted(out, key=lambda r: (r["total_ms"], r["ep_size"]))


def fastest(layouts: list[dict]) -> dict | None:
    """The cheapest layout that fits (ties: the smaller ep_size, as sorted)."""
    return next((r for r in layouts if r["fits"]), None)


def format_layouts(layouts: list[dict], micro_batches: int, notes: list[str] = (FITS_NOTE,)) -> str:
    lines = [
        f"layouts per optimizer step ({micro_batches} micro-batch(es); forward + backward exchange of every MoE "
        "layer, expert-gradient ring all-reduce over the replicas)",
        f"{'ep_size':>7} {'group':>6} {'strategy':<9}{'exchange ms':>13}{'allreduce ms':>14}{'total ms':>12}  fits",
    ]
    for r in layouts:
        lines.append(
            f"{r['ep_size']:>7} {r['group_topology']:>6} {r['strategy']:<9}{r['exchange_ms']:>13.1f}"
            f"{r['expert_grad_allreduce_ms']:>14.1f}{r['total_ms']:>12.1f}  {r['fits']}"
        )
    best = fastest(layouts)
    if best is not None:
        lines.append(f"fastest layout: ep_size={best['ep_size']} ({best['group_topology']} per group) with "
                     f"{best['strategy']}: {best['total_ms']:.1f} ms per step")
    else:
        lines.append("no layout fits the GPU memory")
    lines += list(notes)
    return "\n".join(lines)


def add_layout_args(parser) -> None:
    parser.add_argument(
        "--micro-batches", type=int, default=1,
        help="micro-batches of --tokens per rank per optimizer step (the exchange repeats, the all-reduce does not)",
    )


def layouts_result(args, spec, cluster: Topology, strategy_times: Callable) -> dict:
    """The planner's "layouts" part for its arguments. ``strategy_times``: ``planner.strategy_times``.
    With ``--memory`` each layout's ``fits`` is the memory planner's verdict for its ep_size."""
    memory = getattr(args, "memory", False)
    notes = [] if memory else [FITS_NOTE]
    if not spec.moe_intermediate or not spec.moe_layers:
        notes.append(f"no layouts: model {spec.name!r} does not give moe_intermediate_size and the layer count")
        return {"layouts": [], "fastest_layout": None, "layouts_notes": notes}
    name = os.fspath(args.cost_model)
    if not os.path.exists(name) and name in cm.PRESETS:
        def cost_model_for(t: Topology) -> cm.CostModel:
            return cm.preset_cost_model(name, t)
    else:
        loaded = cm.load_cost_model(name, cluster)

        def cost_model_for(t: Topology) -> cm.CostModel | None:
            return loaded if t == cluster else None

        notes.append(
            f"the calibration {name} covers topology {cluster} only: layouts whose group has another shape are "
            "left out (calibrate on that shape, or compare with a preset)"
        )
    routing = args.resolved_routing

    def times(group: Topology, model: cm.CostModel):
        return strategy_times(spec, group, model, routing, args.tokens, args.dtype_bytes, args.seed, LAYOUT_SAMPLES)

    fits = mem.fits_from_args(args, cluster.world_size) if memory else (lambda ep: True)
    layouts = compare_layouts(spec, cluster, cost_model_for, times, args.dtype_bytes, args.micro_batches, fits)
    return {"layouts": layouts, "fastest_layout": fastest(layouts), "layouts_notes": notes}
