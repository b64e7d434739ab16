"""``swap_experts``: one planning round of the expert swap, and its execution (DESIGN.md section 8).

Per MoE layer, from the routing window of recent steps (``swap_stats``), the configured policy
(``hierd`` or ``load``, ``swap_planner``) picks up to ``swap_pairs`` exchanges of experts between
ranks; ``swap_executor`` moves their weights, gradients and optimizer state and updates the
placement on every rank. The routing windows are gathered to rank 0, which alone plans and
broadcasts its decision: one decision everywhere, and the other ranks spend no time planning.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hiermoe_hf.runtime.guards import check_optimizer_holds_experts
from hiermoe_hf.runtime.registry import moe_layers, runtime_of, unwrap
from hiermoe_hf.swap.executor import execute_swaps, expert_bytes, unwrap_optimizer
from hiermoe_hf.swap.objective import DEFAULT_FLOPS, PlannerCosts, RoutingWindow, move_cost_s, strategy_for
from hiermoe_hf.swap.policies import plan
from hiermoe_hf.swap.window import gather_windows


def _broadcast_plan(rows: list[list[float]], capacity: int, device: torch.device) -> list[list[float]]:
    """Rank 0's decision rows (layer index, a, b, rank a, rank b, saving, move cost) on every rank."""
    buf = torch.full((capacity, 7), float("nan"), dtype=torch.float64, device=device)
    if rows:
        buf[: len(rows)] = torch.tensor(rows, dtype=torch.float64, device=device)
    dist.broadcast(buf, src=0)
    return [r for r in buf.cpu().tolist() if r[0] == r[0]]  # NaN rows are padding


def _fold_replicas(window: RoutingWindow, ep_size: int, replicas: int) -> RoutingWindow:
    """All W ranks' windows as one group's routing: replica j's rank j*ep_size + g is group rank g, and
    one forward of one group carries 1/replicas of the world's tokens (``ep_layout``). One decision
    from every replica's routing, executed alike in every replica, keeps the replicas identical."""
    if replicas == 1:
        return window
    return RoutingWindow(window.ids_NK, window.origin_N % ep_size, window.rows_scale / replicas, window.passes)


def swap_experts(model: torch.nn.Module, optimizer=None) -> list[dict]:
    """Run one swap planning round now and carry it out. Collective over the default process group
    (with ``ep_size`` < W: every replica of the expert-parallel group makes the same swaps; ``ranks``
    below are group ranks).

    Args:
        model: a model patched by ``hiermoe_hf.patch`` (or a DDP/Accelerate wrapper of one).
        optimizer: the torch.optim optimizer (or a wrapper with ``.optimizer``) whose per-element
            state (Adam moments, momentum) must follow the experts; None if there is none yet.
    Returns:
        the swaps made, one dict per exchange: ``layer`` (block name), ``experts`` [a, b] (logical
        ids), ``ranks`` [rank of a, rank of b] before the swap, ``predicted_saving`` (modelled
        seconds saved over the interval), ``move_cost`` (modelled seconds of the move), ``policy``,
        ``strategy`` (the dispatch the model priced). Also appended to ``stats(model)[layer]["swaps"]``.

    Routing is recorded while ``config.swap_interval > 0``; a first call on a model patched with
    ``swap_interval=0`` switches recording on and swaps nothing (there is no routing to plan from).
    The model's function never changes: only where experts live.
    """
    model = unwrap(model)
    opt = unwrap_optimizer(optimizer)
    check_optimizer_holds_experts(model, opt)
    rt = runtime_of(model)
    layers = moe_layers(model)
    names = list(layers)
    records: list[dict] = []
    if not names:
        return records
    for _, layer in layers.values():
        layer.record_routing = True  # later forwards record even with swap_interval=0
    first_experts = layers[names[0]][0]
    device = getattr(first_experts, layers[names[0]][1].param_names[0]).device
    if rt.world_size == 1:
        for _, layer in layers.values():
            layer.routing.end_interval()
        return records
    windows = gather_windows([layer for _, layer in layers.values()], device, dst=0)  # None off rank 0
    windows = [None if w is None else _fold_replicas(w, rt.world_size, rt.replicas) for w in windows]
    cost_model = rt.cost_model
    policy, topo = rt.config.swap_policy, rt.topology
    rows, strategies = [], {}
    for i, name in enumerate(names):
        experts, layer = layers[name]
        strategies[name] = strategy_for(topo, rt.config.dispatch, layer.last.strategy if layer.last else None)
        if windows[i] is None:
            continue
        window = windows[i]
        params = [getattr(experts, p) for p in layer.param_names]
        hidden = getattr(getattr(model, "config", None), "hidden_size", None) or params[0].shape[-1]
        costs = PlannerCosts(
            cost_model,
            row_bytes=hidden * params[0].element_size(),
            # 2 flops per multiply-add over every weight of one expert, per (token, expert) row
            compute_s_per_row=2 * sum(p[0].numel() for p in params) / DEFAULT_FLOPS,
        )
        nbytes = expert_bytes(experts, layer, opt)
        rank_of_E = layer.placement.phys_of_E.to(window.ids_NK.device) // layer.local_experts
        choices = plan(
            policy, window, rank_of_E, topo, strategies[name], costs,
            lambda ra, rb, n=nbytes: move_cost_s(topo, cost_model, ra, rb, n),
            max_pairs=rt.config.swap_pairs,
        )
        rows += [[i, c.a, c.b, c.rank_a, c.rank_b, c.saving_s, c.move_cost_s] for c in choices]
    rows = _broadcast_plan(rows, len(names) * rt.config.swap_pairs, device)
    execute_swaps(model, [(names[int(r[0])], int(r[1]), int(r[2])) for r in rows], opt)
    for i, a, b, ra, rb, saving, cost in rows:
        name = names[int(i)]
        record = {
            "layer": name,
            "experts": [int(a), int(b)],
            "ranks": [int(ra), int(rb)],
            "predicted_saving": saving,
            "move_cost": cost,
            "policy": policy,
            "strategy": strategies[name],
        }
        layers[name][1].swaps.append(record)
        records.append(record)
    for _, layer in layers.values():
        layer.routing.end_interval()
    return records
