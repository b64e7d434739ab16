"""``dispatch="auto"``: every rank picks the same strategy, the one with the lowest predicted time."""

import pytest
import torch
import torch.distributed as dist

from hiermoe_hf.cost import auto as strategy
from hiermoe_hf.cost import model as cm
from hiermoe_hf.cost import routing_models as rm
from hiermoe_hf.exchange import stage_rows as sr
from hiermoe_hf.topology import Topology

TOPO = Topology((2, 2))
E, K, T = 16, 4, 512

MODELS = {
    "paper": cm.preset_cost_model("hiermoe-paper", TOPO),
    # a fast network between nodes and slow links inside them: de-duplicating across nodes buys
    # nothing, extra intra-node stages cost a lot -> a flat exchange wins
    "slow-intra": cm.CostModel(
        "2x2",
        {
            "flat": cm.StageCost(1e-5, 1e-10),
            "inter-node": cm.StageCost(1e-5, 1e-10),
            "intra-node": cm.StageCost(1e-3, 1e-8),
        },
    ),
    "free": cm.CostModel("2x2", {n: cm.StageCost(0.0, 0.0) for n in ("flat", "inter-node", "intra-node")}),
}


def _routing(seed: int) -> list[torch.Tensor]:
    """Every rank's destination ranks, the same on all ranks: rank 0 keeps all its tokens local
    (so on its own it would see no traffic), the others are Zipf-skewed."""
    g = torch.Generator().manual_seed(seed)
    dests = [torch.zeros(T, 1, dtype=torch.int64).expand(T, K).clone()]
    for _ in range(1, TOPO.world_size):
        ids = rm.sample_group_limited(T, E, K, 1, 1, g, rm.zipf_popularity(E, 1.1, g))  # Zipf, no group limit
        dests.append(rm.dest_ranks(ids, E, TOPO.world_size))
    return dests


def _pick_on_rank(seed: int) -> dict:
    mine = _routing(seed)[dist.get_rank()]
    out = {}
    for name, model in MODELS.items():
        out[name] = strategy.pick_strategy(TOPO, TOPO.strategies(), mine, 2048, model)
    return out


def test_auto_same_choice_on_every_rank_and_cheapest(ranks):
    results = ranks(4).run(_pick_on_rank, 7)
    dests = _routing(7)
    candidates = TOPO.strategies()
    global_counts = {c: sr.stage_rows(dests, TOPO, c) for c in candidates}
    for name, model in MODELS.items():
        choices = {r[name][0] for r in results}
        assert len(choices) == 1, (name, [r[name] for r in results])
        assert all(r[name][1] == results[0][name][1] for r in results)
        expected = strategy.predicted_ms(TOPO, global_counts, 2048, model)
        assert results[0][name][1] == expected
        best = min(expected.values())
        first_best = next(c for c in candidates if expected[c] == best)
        assert results[0][name][0] == first_best
    assert results[0]["paper"][0] == "hd2"
    assert results[0]["slow-intra"][0] in ("a2a", "hd1")
    assert results[0]["free"][0] == "a2a"  # all tied at 0: the first candidate


def test_single_process_and_bad_candidates():
    topo = Topology((1, 1))
    name, pred = strategy.pick_strategy(topo, topo.strategies(), torch.zeros(3, 2, dtype=torch.int64), 8, None)
    assert name == "a2a" and pred == {"a2a": 0.0, "2dh": 0.0, "hd1": 0.0, "hd2": 0.0}
    with pytest.raises(ValueError, match="valid: a2a, 2dh, hd1, hd2"):
        strategy.pick_strategy(TOPO, ["hd3"], torch.zeros(1, 1, dtype=torch.int64), 8, None)
