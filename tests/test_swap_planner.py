"""Swap planner (pure functions): delta rule vs recount, hand-built golden cases, objective pieces.

Oracles: ``cost_model.stage_rows`` (an independent simulation of the dispatcher's packing) recounts
every stage's rows after each exchange; the golden cases are counted by hand below.
"""

from __future__ import annotations

import math

import pytest
import torch

from hiermoe_hf.cost import model as cm
from hiermoe_hf.exchange import stage_rows as sr
from hiermoe_hf.swap import objective as sp
from hiermoe_hf.swap import policies as pol
from hiermoe_hf.topology import Topology

T22 = Topology((2, 2))


def recount(ids_NK, origin_N, rank_of_E, topology, strategy):
    """Rows per cell of every stage, by simulating every origin rank's tokens (flattened [W*S])."""
    W = topology.world_size
    dest = torch.where(ids_NK >= 0, rank_of_E[ids_NK.clamp(min=0)], -1)
    per_origin = [dest[origin_N == o] for o in range(W)]
    return [c.reshape(-1) for c in sr.stage_rows(per_origin, topology, strategy)]


def random_case(levels, E, K, N, seed):
    g = torch.Generator().manual_seed(seed)
    topo = Topology(levels)
    W = topo.world_size
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    ids[torch.rand(N, K, generator=g) < 0.15] = -1  # sentinel / dropped selections
    origin = torch.randint(0, W, (N,), generator=g)
    rank_of_E = torch.randperm(E, generator=g) // (E // W)  # a scrambled placement, as after swaps
    return topo, ids, origin, rank_of_E


@pytest.mark.parametrize("levels", [(2, 2), (1, 4), (4, 1), (2, 2, 2), (4,)], ids=lambda v: "x".join(map(str, v)))
def test_delta_rule_equals_recount_for_every_pair(levels):
    W = math.prod(levels)
    for seed, (E, K) in enumerate([(W, 2), (2 * W, 3)]):
        topo, ids, origin, rank_of_E = random_case(levels, E, K, N=24, seed=seed)
        for strategy in topo.strategies():
            now = sp.stage_counts(ids, origin, rank_of_E, topo, strategy)
            assert all(torch.equal(a, b) for a, b in zip(now, recount(ids, origin, rank_of_E, topo, strategy)))
            pairs = sp.candidate_pairs(rank_of_E)
            assert pairs.shape[0] == sum(int(rank_of_E[a] != rank_of_E[b]) for a in range(E) for b in range(a + 1, E))
            got = sp.pair_stage_counts(sp.summaries(ids, origin, rank_of_E, topo, strategy), rank_of_E, pairs)
            for p, (a, b) in enumerate(pairs.tolist()):
                swapped = rank_of_E.clone()
                swapped[a], swapped[b] = rank_of_E[b], rank_of_E[a]
                for s, want in enumerate(recount(ids, origin, swapped, topo, strategy)):
                    assert torch.equal(got[s][p], want), f"{strategy} stage {s} pair ({a}, {b})"


def test_stage_counts_hand_counted_hd2():
    # 2x2, experts 0..7 contiguous (rank r = 2 * node + local holds 2r, 2r+1). One token from rank 0
    # picks experts 3 (rank 1, node 0) and 7 (rank 3, node 1). hd2's inter-node stage: one row kept
    # for node 0 (cell holder 0, member 0) and one sent to node 1 (holder 0, member 1); then inside
    # the nodes rank 0 -> rank 1 and rank 2 -> rank 3 (cells (0, 1) and (2, 1)).
    ids = torch.tensor([[3, 7]])
    rank_of_E = torch.arange(8) // 2
    inter, intra = sp.stage_counts(ids, torch.tensor([0]), rank_of_E, T22, "hd2")
    assert inter.view(4, 2).tolist() == [[1, 1], [0, 0], [0, 0], [0, 0]]
    assert intra.view(4, 2).tolist() == [[0, 1], [0, 0], [0, 1], [0, 0]]
    (flat,) = sp.stage_counts(ids, torch.tensor([0]), rank_of_E, T22, "a2a")
    assert flat.view(4, 4).tolist() == [[0, 1, 0, 1], [0] * 4, [0] * 4, [0] * 4]  # a2a: one row per expert


def test_smooth_max_lies_between_mean_and_max_and_tends_to_max():
    x = torch.tensor([[1.0, 2.0, 7.0, 3.0]])
    values = [sp.smooth_max(x, g, scale=3.25).item() for g in (0.1, 1.0, 10.0, 1000.0)]
    assert all(3.25 - 1e-9 <= v <= 7.0 + 1e-9 for v in values)
    assert values == sorted(values) and abs(values[-1] - 7.0) < 0.05
    assert sp.smooth_max(torch.tensor([[5.0, 5.0]]), 10.0, 5.0).item() == pytest.approx(5.0)


# A link model where rows matter and moves are cheap, so the golden cases hinge on traffic alone.
def flat_costs(topology, row_bytes=1000.0, compute=0.0):
    stages = {}
    for strategy in topology.strategies():
        for st in topology.stages(strategy):
            stages[st.name] = cm.StageCost(alpha=1e-6, beta=1e-9 if st.name == "inter-node" else 1e-10)
    model = cm.CostModel(str(topology), stages, "test")
    return sp.PlannerCosts(model, row_bytes=row_bytes, compute_s_per_row=compute)


def cheap_move(ra, rb):
    return 1e-9


def co_activated_case():
    """Tokens pick experts 0 and 1 together (both on rank 0), from every origin: rank 0 computes
    twice as many rows as the others. Other tokens pick pairs inside one rank's experts."""
    pairs = [[0, 1]] * 8 + [[2, 3], [4, 5], [6, 7], [2, 3]]
    ids = torch.tensor(pairs * 4)
    origin = torch.arange(4).repeat_interleave(len(pairs))
    return sp.RoutingWindow(ids, origin, rows_scale=1.0, passes=10.0), torch.arange(8) // 2


def test_balancing_swap_that_splits_co_activated_experts_taken_by_load_rejected_by_hierd():
    window, rank_of_E = co_activated_case()
    costs = flat_costs(T22)
    load = pol.plan_load(window, rank_of_E, T22, "hd2", costs, cheap_move)
    assert len(load) == 1
    choice = load[0]
    # Selections: experts 0, 1: 32 each; 2, 3: 8; 4..7: 4. Rank loads 64, 16, 8, 8. Exchanging 0 (or 1)
    # with a 4-selection expert of rank 2 or 3 gives 36, 16, 36, 8 (rank 1's 8s would give 40):
    # the lowest peak, all such pairs tie, and the first is (0, 4).
    sel = torch.bincount(window.ids_NK.flatten(), minlength=8)
    assert sel.tolist() == [32, 32, 8, 8, 4, 4, 4, 4]
    assert (choice.a, choice.b, choice.rank_a, choice.rank_b) == (0, 4, 0, 2)
    # ... which splits every {0, 1} token over two ranks: more de-duplicated rows, a modelled loss.
    assert choice.saving_s < 0
    before = recount(window.ids_NK, window.origin_N, rank_of_E, T22, "hd2")
    after_E = rank_of_E.clone()
    after_E[choice.a], after_E[choice.b] = choice.rank_b, choice.rank_a
    after = recount(window.ids_NK, window.origin_N, after_E, T22, "hd2")
    assert sum(int(c.sum()) for c in after) > sum(int(c.sum()) for c in before)
    # hierd sees that and keeps the co-activated pair together: no swap at all.
    assert pol.plan_hierd(window, rank_of_E, T22, "hd2", costs, cheap_move) == []


def split_pair_case():
    """Tokens from every rank pick experts 0 (rank 0, node 0) and 6 (rank 3, node 1) together:
    each such token sends rows to both nodes. Co-locating them removes inter-node rows."""
    ids = torch.tensor([[0, 6]] * 12 + [[2, 4], [3, 5]])
    origin = torch.arange(14) % 4
    return sp.RoutingWindow(ids, origin, rows_scale=1.0, passes=10.0), torch.arange(8) // 2


def test_hierd_co_locates_experts_used_together_and_predicts_the_saving():
    window, rank_of_E = split_pair_case()
    costs = flat_costs(T22)
    (choice,) = pol.plan_hierd(window, rank_of_E, T22, "hd2", costs, cheap_move)
    after_E = rank_of_E.clone()
    after_E[choice.a], after_E[choice.b] = choice.rank_b, choice.rank_a
    assert after_E[0] == after_E[6], f"0 and 6 should end on one rank, got {after_E.tolist()}"
    before = recount(window.ids_NK, window.origin_N, rank_of_E, T22, "hd2")
    after = recount(window.ids_NK, window.origin_N, after_E, T22, "hd2")
    assert int(after[0].sum()) < int(before[0].sum())  # fewer inter-node rows
    # The saving is the objective difference times the passes, by the planner's own pricing.
    obj = sp.Objective(window, rank_of_E, T22, "hd2", costs)
    want = (obj.now_s - obj.after(torch.tensor([[choice.a, choice.b]]))[0].item()) * window.passes
    assert choice.saving_s == pytest.approx(want) and choice.saving_s > 0


def test_hierd_accepts_only_when_the_saving_over_the_interval_exceeds_the_move_cost():
    window, rank_of_E = split_pair_case()
    costs = flat_costs(T22)
    (choice,) = pol.plan_hierd(window, rank_of_E, T22, "hd2", costs, cheap_move)
    assert pol.plan_hierd(window, rank_of_E, T22, "hd2", costs, lambda ra, rb: choice.saving_s * 1.01) == []
    assert len(pol.plan_hierd(window, rank_of_E, T22, "hd2", costs, lambda ra, rb: choice.saving_s * 0.99)) == 1
    # A shorter interval (fewer passes) shrinks the saving below the same move cost.
    short = sp.RoutingWindow(window.ids_NK, window.origin_N, 1.0, window.passes / 100)
    assert pol.plan_hierd(short, rank_of_E, T22, "hd2", costs, lambda ra, rb: choice.saving_s * 0.5) == []


def test_several_pairs_per_round_move_each_expert_once():
    window, rank_of_E = split_pair_case()
    ids = torch.cat([window.ids_NK, torch.tensor([[1, 7]] * 12)])
    window = sp.RoutingWindow(ids, torch.arange(ids.shape[0]) % 4, 1.0, 10.0)
    chosen = pol.plan_hierd(window, rank_of_E, T22, "hd2", flat_costs(T22), cheap_move, max_pairs=3)
    assert len(chosen) >= 2
    moved = [x for c in chosen for x in (c.a, c.b)]
    assert len(moved) == len(set(moved))


def test_move_cost_uses_the_slowest_link_between_the_two_ranks():
    model = cm.default_cost_model(T22)
    inter = sp.move_cost_s(T22, model, 0, 2, 1e6)  # different nodes
    intra = sp.move_cost_s(T22, model, 0, 1, 1e6)  # same node
    stages = T22.stages("hd2")
    assert inter == pytest.approx(model.collective_time(T22, stages[0], 1e6))
    assert intra == pytest.approx(model.collective_time(T22, stages[1], 1e6))
    assert inter > intra > 0 and sp.move_cost_s(T22, model, 3, 3, 1e6) == 0.0


def test_strategy_for_and_unknown_policy():
    assert sp.strategy_for(T22, "auto") == "hd2"
    assert sp.strategy_for(T22, "auto", "a2a") == "a2a"
    assert sp.strategy_for(T22, "2dh") == "2dh"
    with pytest.raises(ValueError, match="valid: hierd, load"):
        pol.plan("balanced", None, None, T22, "hd2", None, None)
