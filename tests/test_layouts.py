"""Planner layouts (issue 11): the expert-gradient all-reduce term by hand, the layouts offered, the
ranking flipping where the cost model says it should, and the CLI's ``--json`` "layouts" list."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hiermoe_hf.cost import layouts as L
from hiermoe_hf.cost import model as cm
from hiermoe_hf.cost import planner as P
from hiermoe_hf.topology import Topology

SMALL = P.ModelSpec("small", experts=16, topk=2, hidden=64, moe_intermediate=32, moe_layers=2)


def test_expert_grad_bytes_by_hand():
    # 2 layers x 16/8 experts x 3 matrices of 64 x 32 x 2 bytes
    assert L.expert_grad_bytes(SMALL, 8, 2) == 2 * 2 * 3 * 64 * 32 * 2 == 49152
    with pytest.raises(ValueError, match="moe_intermediate_size and num_hidden_layers"):
        L.expert_grad_bytes(dataclasses.replace(SMALL, moe_layers=0), 8, 2)


def test_allreduce_across_nodes_by_hand():
    cluster = Topology((2, 8))
    links = cm.load_cost_model(None, cluster)  # 25 GB/s node uplink, 30 us
    # ep 8: R = 2 replicas (one per node); X = 2 (1/2) 49152 B; the uplink carries min(8, 8) X
    assert L.allreduce_seconds(cluster, links, 8, 49152) == pytest.approx(2 * 30e-6 + 8 * 49152 / 25e9, rel=1e-12)
    # ep 4: R = 4 (2 per node); n = 98304 B, X = 2 (3/4) n; 4 rings leave each node once: 4 X
    assert L.allreduce_seconds(cluster, links, 4, 98304) == pytest.approx(
        6 * 30e-6 + 4 * (1.5 * 98304) / 25e9, rel=1e-12)
    assert L.allreduce_seconds(cluster, links, 16, 1e9) == 0.0  # one group: no replicas
    paper = cm.load_cost_model("hiermoe-paper", Topology((4, 8)))  # Inter-level-1: 0.497 ms, 5.29e-7 ms/B
    # ep 16 on 4x8: R = 2; every rank's ring edge leaves its node: 8 X per uplink, 1/B0 = N beta / (G (N-1))
    assert L.allreduce_seconds(Topology((4, 8)), paper, 16, 1e6) == pytest.approx(
        2 * 0.497e-3 + 8 * 1e6 * 4 * 5.29e-10 / (8 * 3), rel=1e-12)


def test_allreduce_inside_one_node_by_hand():
    cluster = Topology((1, 8))
    links = cm.load_cost_model(None, cluster)  # 100 GB/s per rank, 10 us
    # ep 2: R = 4 replicas in the node; each rank's link carries X = 2 (3/4) n
    assert L.allreduce_seconds(cluster, links, 2, 1e6) == pytest.approx(6 * 10e-6 + 1.5e6 / 100e9, rel=1e-12)


def _compare(spec, cluster, preset="hiermoe-paper", tokens=256, micro_batches=1):
    routing = P.resolve_routing("auto", spec)

    def times(group, model):
        return P.strategy_times(spec, group, model, routing, tokens, 2, 0)

    return L.compare_layouts(spec, Topology(cluster), lambda t: cm.preset_cost_model(preset, t), times, 2,
                             micro_batches)


def test_layouts_offered_and_their_sum():
    layouts = _compare(SMALL, (2, 8))
    assert sorted({r["ep_size"] for r in layouts}) == [1, 2, 4, 8, 16]
    by = {(r["ep_size"], r["strategy"]): r for r in layouts}
    assert by[(16, "hd2")]["group_topology"] == "2x8" and by[(8, "a2a")]["group_topology"] == "1x8"
    assert by[(1, "local")]["exchange_ms"] == 0.0 and by[(16, "a2a")]["expert_grad_allreduce_ms"] == 0.0
    assert all(r["total_ms"] == pytest.approx(r["exchange_ms"] + r["expert_grad_allreduce_ms"]) for r in layouts)
    assert all(r["fits"] for r in layouts) and layouts == sorted(layouts, key=lambda r: (r["total_ms"], r["ep_size"]))
    # a group of 12 on nodes of 8 would straddle a node: not offered; E=24 allows 1, 2, 3, 4, 6, 8, 12, 24
    assert {r["ep_size"] for r in _compare(dataclasses.replace(SMALL, experts=24), (3, 8))} == {1, 2, 4, 8, 24}


def test_ranking_flips_with_expert_size_and_micro_batches():
    """Slow inter-node link (paper constants, 2x8): the in-node group (ep 8) pays the expert-gradient
    all-reduce across nodes, the cross-node group (ep 16) pays cross-node exchanges instead. Small
    experts or many micro-batches per step: in-node EP wins; large experts and one micro-batch:
    de-duplicated cross-node EP (hd2) wins."""
    qwen = dataclasses.replace(P.MODEL_PRESETS["qwen3-30b-a3b"], topk=2)

    def best(spec, mb=1):
        return L.fastest(_compare(spec, (2, 8), tokens=1024, micro_batches=mb))

    small_experts = best(dataclasses.replace(qwen, moe_intermediate=64))
    large_experts = best(qwen)
    assert (small_experts["ep_size"], large_experts["ep_size"], large_experts["strategy"]) == (8, 16, "hd2")
    # the exchange repeats per micro-batch, the all-reduce does not: with 16, a group inside a node wins
    assert best(qwen, mb=16)["group_topology"].startswith("1x")


def test_dedup_gains_over_a2a_grow_with_k_across_nodes():
    qwen = P.MODEL_PRESETS["qwen3-30b-a3b"]

    def ratio(k):
        spec = dataclasses.replace(qwen, topk=k)
        by = {(r["ep_size"], r["strategy"]): r for r in _compare(spec, (2, 8), tokens=1024)}
        return by[(16, "a2a")]["exchange_ms"] / by[(16, "hd2")]["exchange_ms"]

    assert ratio(8) > ratio(2) > 1.0


def test_cli_json_has_layouts(capsys):
    assert P.main(["--model", "qwen3-30b-a3b", "--topology", "2x8", "--cost-model", "hiermoe-paper",
                   "--tokens", "256", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    keys = {"ep_size", "strategy", "exchange_ms", "expert_grad_allreduce_ms", "total_ms", "fits"}
    assert out["layouts"] and all(keys <= set(r) for r in out["layouts"])
    assert out["fastest_layout"] == out["layouts"][0] and "memory" in out["layouts_notes"][0]
    P.main(["--model", "qwen3-30b-a3b", "--topology", "2x8", "--cost-model", "hiermoe-paper", "--tokens", "256"])
    assert "fastest layout: ep_size=" in capsys.readouterr().out


def test_memory_decides_which_layouts_fit(capsys):
    """With --memory a layout fits iff its per-rank memory (experts E/ep_size per rank) fits the GPU;
    the fastest layout is the cheapest that fits. The budget is set between two layouts' totals."""
    import json

    from hiermoe_hf.cost import memory as mem
    from hiermoe_hf.cost import planner

    config = mem.load_config("qwen3-30b-a3b")
    total = {ep: mem.memory_plan(config, 16, ep_size=ep, seq_len=1024)["total_bytes"] for ep in (1, 2, 4, 8, 16)}
    assert mem.memory_plan(config, 16, ep_size=8)["expert_params_bytes"] == 2 * mem.memory_plan(
        config, 16, ep_size=16)["expert_params_bytes"]  # half the group, twice the experts per rank
    budget_gib = (total[8] + total[16]) / 2 / 2**30  # ep_size 16 fits, 8 (more experts per rank) does not
    assert planner.main(["--model", "qwen3-30b-a3b", "--topology", "2x8", "--cost-model", "hiermoe-paper",
                         "--memory", "--seq-len", "1024", "--gpu-memory", str(budget_gib), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {r["ep_size"] for r in out["layouts"]} == {1, 2, 4, 8, 16}
    for r in out["layouts"]:
        assert r["fits"] == (total[r["ep_size"]] <= budget_gib * 2**30), r
    assert out["fastest_layout"] == min((r for r in out["layouts"] if r["fits"]), key=lambda r: r["total_ms"])
    assert out["fastest_layout"]["ep_size"] == 16
