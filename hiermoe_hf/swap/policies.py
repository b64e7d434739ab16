"""Swap policies (DESIGN.md section 8): ``hierd`` (de-duplication-aware, greedy over the delta-rule
objective of ``swap_planner``) and ``load`` (SmartMoE/EPLB-style raw load balance), and ``plan``,
which dispatches on the policy name. Pure functions of a routing window and a placement.
"""

from __future__ import annotations

from typing import Callable

import torch

from hiermoe_hf.swap.objective import (
    Objective,
    PlannerCosts,
    RoutingWindow,
    SwapChoice,
    candidate_pairs,
    loads_per_rank,
    selections_per_expert,
    window_incidence,
)
from hiermoe_hf.topology import Topology


def plan_hierd(
    window: RoutingWindow,
    rank_of_E: torch.Tensor,
    topology: Topology,
    strategy: str,
    costs: PlannerCosts,
    move_cost: Callable[[int, int], float],
    max_pairs: int = 1,
) -> list[SwapChoice]:
    """Greedy de-duplication-aware plan: up to ``max_pairs`` exchanges, each the pair with the
    largest modelled saving over the interval, taken only if that saving exceeds its move cost.
    Experts already moved in this round are not moved again. ``rank_of_E`` is not modified."""
    rank_of_E = rank_of_E.clone()
    chosen: list[SwapChoice] = []
    used: set[int] = set()
    inc = sel_E = None
    for _ in range(max_pairs):
        pairs = candidate_pairs(rank_of_E, used)
        if pairs.numel() == 0 or window.ids_NK.numel() == 0:
            break
        if inc is None:  # placement-independent: once per round
            inc = window_incidence(window, rank_of_E.numel(), topology.world_size)
            sel_E = selections_per_expert(window.ids_NK, rank_of_E.numel())
        obj = Objective(window, rank_of_E, topology, strategy, costs, inc, sel_E)
        saving = obj.savings(pairs)
        best = int(torch.argmax(saving))  # the first of equal maxima: lexicographic tie-break
        a, b = int(pairs[best, 0]), int(pairs[best, 1])
        ra, rb = int(rank_of_E[a]), int(rank_of_E[b])
        cost = move_cost(ra, rb)
        if not saving[best].item() > cost:
            break
        chosen.append(SwapChoice(a, b, ra, rb, saving[best].item(), cost))
        rank_of_E[a], rank_of_E[b] = rb, ra
        used |= {a, b}
    return chosen


def plan_load(
    window: RoutingWindow,
    rank_of_E: torch.Tensor,
    topology: Topology,
    strategy: str,
    costs: PlannerCosts,
    move_cost: Callable[[int, int], float],
    max_pairs: int = 1,
) -> list[SwapChoice]:
    """Baseline (SmartMoE/EPLB-style): up to ``max_pairs`` exchanges, each the pair that most lowers
    the largest raw selection count per rank (ties: the lower sum of squared loads, then the
    lexicographically first pair); taken whenever it lowers that maximum, whatever the traffic.
    The records carry hierd's modelled saving of the same pair for comparison."""
    rank_of_E = rank_of_E.clone()
    W = topology.world_size
    sel_E = selections_per_expert(window.ids_NK, rank_of_E.numel())
    chosen: list[SwapChoice] = []
    used: set[int] = set()
    inc = None
    for _ in range(max_pairs):
        pairs = candidate_pairs(rank_of_E, used)
        if pairs.numel() == 0:
            break
        load_W = loads_per_rank(sel_E, rank_of_E, W)
        a_P, b_P = pairs[:, 0], pairs[:, 1]
        moved = (sel_E[a_P] - sel_E[b_P]).view(-1, 1)
        new_PW = load_W.view(1, -1).repeat(pairs.shape[0], 1)
        new_PW.scatter_add_(1, rank_of_E[a_P].view(-1, 1), -moved)
        new_PW.scatter_add_(1, rank_of_E[b_P].view(-1, 1), moved)
        peak_P = new_PW.max(dim=1).values
        sq_P = (new_PW * new_PW).sum(dim=1)
        lowest = peak_P.min()
        if not lowest < load_W.max():
            break
        best = int(torch.argmin(torch.where(peak_P == lowest, sq_P, torch.iinfo(torch.int64).max)))
        a, b = int(a_P[best]), int(b_P[best])
        ra, rb = int(rank_of_E[a]), int(rank_of_E[b])
        if inc is None:
            inc = window_incidence(window, rank_of_E.numel(), W)
        obj = Objective(window, rank_of_E, topology, strategy, costs, inc, sel_E)
        saving = obj.savings(pairs[best : best + 1])[0].item()
        chosen.append(SwapChoice(a, b, ra, rb, saving, move_cost(ra, rb)))
        rank_of_E[a], rank_of_E[b] = rb, ra
        used |= {a, b}
    return chosen


POLICIES = {"hierd": plan_hierd, "load": plan_load}


def plan(policy: str, *args, **kwargs) -> list[SwapChoice]:
    """Dispatch to ``plan_hierd`` or ``plan_load``; ValueError for any other policy."""
    if policy not in POLICIES:
        raise ValueError(f"unknown swap policy {policy!r}; valid: {', '.join(POLICIES)}")
    return POLICIES[policy](*args, **kwargs)
