"""A stage is priced by where its group lives (issue 11, item 4): hand-computed prices.

On a ``1xG`` topology every stage's group lies inside the one node, so a2a's "flat" stage costs the
in-node constants, exactly like 2dh's intra-node stage with the same rows; a flat stage that spans
nodes keeps its own (slowest-link) constants. One rule in ``CostModel.stage_cost``, used by the
pricing of auto, the planner and the swap objective.
"""

from __future__ import annotations

import pytest
import torch

from hiermoe_hf.cost import model as cm
from hiermoe_hf.cost.auto import pick_strategy
from hiermoe_hf.cost.planner import MODEL_PRESETS, plan
from hiermoe_hf.cost.pricing import FORWARD_EXCHANGES as CROSS
from hiermoe_hf.cost.pricing import FORWARD_LATENCIES as LAT
from hiermoe_hf.cost.pricing import forward_exchange_times
from hiermoe_hf.topology import Topology

T18, T28 = Topology((1, 8)), Topology((2, 8))


def _counts(S: int, peer: int, own: int) -> torch.Tensor:
    """[S, S] counts: every rank sends ``peer`` rows to each other member and keeps ``own``."""
    c = torch.full((S, S), peer, dtype=torch.int64)
    c.fill_diagonal_(own)
    return c


def test_flat_stage_inside_one_node_costs_the_paper_intra_constants():
    model = cm.load_cost_model("hiermoe-paper", T18)
    (flat,) = T18.stages("a2a")
    assert model.stage_cost(flat) == model.stages["intra-node"]
    # forward exchange: LAT latencies + rows CROSS times; 8 members x 10 rows x 4096 B; Intra-level-1 constants
    t = forward_exchange_times([_counts(8, 10, 5)], T18, "a2a", 4096, model)
    assert t == [pytest.approx(LAT * 0.571e-3 + CROSS * 8 * 10 * 4096 * 1.27e-10, rel=1e-12)]


def test_flat_stage_spanning_nodes_keeps_its_own_constants():
    model = cm.load_cost_model("hiermoe-paper", T28)
    (flat,) = T28.stages("a2a")
    assert model.stage_cost(flat) == model.stages["flat"]  # the paper's "standard" fit across nodes
    t = forward_exchange_times([_counts(16, 10, 5)], T28, "a2a", 4096, model)
    assert t == [pytest.approx(LAT * 0.722e-3 + CROSS * 16 * 10 * 4096 * 5.70e-10, rel=1e-12)]


def test_link_defaults_on_one_node_use_the_in_node_latency():
    # links: the flat stage on 1x8 would take max(30 us inter-node, 10 us intra-node) latency without the rule
    model = cm.load_cost_model(None, T18)
    (flat,) = T18.stages("a2a")
    assert model.stage_cost(flat).alpha == pytest.approx(10e-6)
    t = forward_exchange_times([_counts(8, 10, 5)], T18, "a2a", 4096, model)
    assert t == [pytest.approx(LAT * 10e-6 + CROSS * 8 * 10 * 4096 * 7 / (8 * 100e9), rel=1e-12)]


def test_levels_of_size_one_are_trimmed_inside_a_deeper_topology():
    topo = Topology((2, 1, 4))
    model = cm.load_cost_model("hiermoe-paper", topo)
    hd2_last = topo.stages("hd2")[1]  # digits [1, 3): the 4 ranks of a node, as hd3's last stage [2, 3)
    assert cm.home_stage(topo, hd2_last) == topo.stages("hd3")[2]
    # Intra-level-2 (the last stage [2, 3) of hd3), not Intra-level-1 (hd2's name for [1, 3))
    assert (model.stage_cost(hd2_last).alpha, model.stage_cost(hd2_last).beta) == pytest.approx((0.114e-3, 2.63e-11))
    assert model.stage_cost(topo.stages("a2a")[0]) == model.stages["flat"]  # spans both nodes: unchanged


def test_auto_and_planner_price_a2a_like_2dh_on_one_node():
    # Same rows (one per (token, remote expert)) in the same in-node group: the same price.
    dest = torch.randint(0, 8, (64, 4), generator=torch.Generator().manual_seed(0))
    model = cm.load_cost_model("hiermoe-paper", T18)
    _, predicted = pick_strategy(T18, T18.strategies(), dest, 4096, model)
    assert predicted["a2a"] == pytest.approx(predicted["2dh"], rel=1e-12)
    assert predicted["hd1"] == pytest.approx(predicted["hd2"], rel=1e-12)
    result = plan(MODEL_PRESETS["qwen3-30b-a3b"], T18, model, tokens=512, max_samples=512)
    ms = {s["name"]: s["predicted_ms"] for s in result["strategies"]}
    assert ms["a2a"] == pytest.approx(ms["2dh"], rel=1e-12)
    # what remains of hd2's advantage on one node is its de-duplication per rank (4.672 vs 7 rows/token)
    assert 1.2 < ms["a2a"] / ms["hd2"] < 1.7
