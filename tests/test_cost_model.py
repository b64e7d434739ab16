"""Cost model: hand-computed golden cases, closed forms against sampling, JSON round trip."""

import itertools
import json
import math

import pytest
import torch

from hiermoe_hf.cost import model as cm
from hiermoe_hf.cost import pricing as pr
from hiermoe_hf.cost import routing_models as rm
from hiermoe_hf.exchange import stage_rows as sr
from hiermoe_hf.topology import Topology

T22 = Topology((2, 2))


def _golden_routing():
    """Rank 0 has two tokens: a -> ranks {2, 3}, b -> ranks {1, 2}; the other ranks have none."""
    empty = torch.zeros(0, 2, dtype=torch.int64)
    return [torch.tensor([[2, 3], [1, 2]]), empty, empty, empty]


# counts[stage][rank] = rows that rank sends to each member of its group, worked out by hand.
GOLDEN_COUNTS = {
    "a2a": [[[0, 1, 2, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]],
    "hd1": [[[0, 1, 2, 1], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]],
    # a: one row to node 1 (rank 2); b: one kept on node 0, one to node 1. Then rank 0 forwards
    # b's selection 1 to rank 1; rank 2 splits a into ranks 2 and 3 and keeps b's selection 2.
    "hd2": [[[1, 2], [0, 0], [0, 0], [0, 0]], [[0, 1], [0, 0], [2, 1], [0, 0]]],
    # 2dh: within the node first (a->3 and b->1 go to rank 1), then along the rail.
    "2dh": [[[2, 2], [0, 0], [0, 0], [0, 0]], [[0, 2], [1, 1], [0, 0], [0, 0]]],
}

GOLDEN_MODEL = cm.CostModel(
    "2x2",
    {
        "flat": cm.StageCost(1e-3, 1e-6),
        "inter-node": cm.StageCost(2e-3, 1e-5),
        "intra-node": cm.StageCost(1e-4, 1e-7),
    },
)
# row_bytes 100: a2a 1e-3 + 4*2*100*1e-6; hd2 (2e-3 + 2*2*100*1e-5) + (1e-4 + 2*1*100*1e-7);
# 2dh (1e-4 + 2*2*100*1e-7) + (2e-3 + 2*2*100*1e-5).
GOLDEN_TIMES = {"a2a": 1.8e-3, "hd1": 1.8e-3, "hd2": 6.12e-3, "2dh": 6.14e-3}


@pytest.mark.parametrize("strategy", ["a2a", "hd1", "hd2", "2dh"])
def test_golden_rows_and_time(strategy):
    counts = sr.stage_rows(_golden_routing(), T22, strategy)
    assert [c.tolist() for c in counts] == GOLDEN_COUNTS[strategy]
    t = sum(pr.predict_stage_times(counts, T22, strategy, 100, GOLDEN_MODEL))
    assert t == pytest.approx(GOLDEN_TIMES[strategy], rel=1e-12)


def test_latency_exchange_and_local_terms():
    counts = sr.stage_rows(_golden_routing(), T22, "hd2")
    model = cm.CostModel("2x2", GOLDEN_MODEL.stages, local=cm.StageCost(0.0, 1e-9))
    times = pr.predict_stage_times(counts, T22, "hd2", 100, model, latency_terms=4, exchanges=2, local_units=2)
    # inter-node: 4 alphas + 2 x (2 * 2 rows * 100 B) * beta + 2 x (3 rows packed by rank 0) * 100 B * 1e-9
    assert times[0] == pytest.approx(4 * 2e-3 + 2 * 2 * 2 * 100 * 1e-5 + 2 * 3 * 100 * 1e-9, rel=1e-12)
    # intra-node: rank 2 packs 3 rows (2 kept); the local work counts kept rows too
    assert times[1] == pytest.approx(4 * 1e-4 + 2 * 2 * 1 * 100 * 1e-7 + 2 * 3 * 100 * 1e-9, rel=1e-12)
    assert sr.packed_rows(counts[1]) == 3


def test_contributions_add_up():
    """Per-origin counts (what each rank computes for ``auto``) sum to the global counts."""
    g = torch.Generator().manual_seed(1)
    topo = Topology((2, 2, 2))
    dests = [rm.dest_ranks(rm.sample_uniform(50, 16, 4, g), 16, 8) for _ in range(8)]
    for strategy in topo.strategies():
        whole = sr.stage_rows(dests, topo, strategy)
        parts = [sr.stage_rows(d, topo, strategy, origins=[r]) for r, d in enumerate(dests)]
        for i, c in enumerate(whole):
            assert torch.equal(c, sum(p[i] for p in parts))


def test_size_one_groups_cost_nothing():
    topo = Topology((1, 4))
    model = cm.default_cost_model(topo)
    counts = sr.stage_rows([torch.tensor([[1, 2]])] + [torch.zeros(0, 2, dtype=torch.int64)] * 3, topo, "hd2")
    times = pr.predict_stage_times(counts, topo, "hd2", 1000, model)
    assert times[0] == 0.0 and times[1] > 0.0


def test_links_golden():
    a0, b0, a1, b1 = 5e-5, 1e9, 1e-5, 1e10
    costs = cm.stage_costs_from_links(T22, [cm.Link(a0, b0), cm.Link(a1, b1)])
    # inter-node: both ranks of a node send m to the other node over the node's uplink: 2m / B0 = S*m*beta
    assert costs["inter-node"] == cm.StageCost(a0, 1 / b0)
    assert costs["intra-node"] == cm.StageCost(a1, 1 / (2 * b1))
    assert costs["flat"] == cm.StageCost(a0, max(2 * 2 / (4 * b0), 3 / (4 * b1)))


def test_distinct_groups_closed_form_by_enumeration():
    E, K, R = 8, 3, 4
    combos = list(itertools.combinations(range(E), K))
    mean = sum(len({e // (E // R) for e in c}) for c in combos) / len(combos)
    assert rm.distinct_groups_uniform(E, K, R) == pytest.approx(mean, rel=1e-12)
    assert rm.distinct_groups_uniform(4, 2, 2) == pytest.approx(5 / 3)


# The paper's Table II (arXiv 2508.09591): token duplication rates (%) measured on real routing,
# rows R = 32, 16, 8, 4 expert groups, columns K = 2, 4, 6, 8.
PAPER_TABLE_II = {32: (2, 4, 7, 9), 16: (3, 9, 14, 18), 8: (6, 17, 27, 34), 4: (12, 32, 46, 55)}


def test_duplication_table_reproduces_paper_table_ii():
    """Uniform routing, E=256, closed form within 1.5 percentage points of every printed entry."""
    for R, row in PAPER_TABLE_II.items():
        for K, printed in zip((2, 4, 6, 8), row):
            ours = 100 * rm.duplication_rate_uniform(256, K, R)
            assert abs(ours - printed) <= 1.5, (R, K, ours, printed)


def test_duplication_closed_form_matches_sampling_e256():
    """Table II layout (R in 4..32, K in 2..8), E=256: closed form vs 20k sampled tokens."""
    g = torch.Generator().manual_seed(0)
    for K in (2, 4, 6, 8):
        ids = rm.sample_uniform(20000, 256, K, g)
        for R in (4, 8, 16, 32):
            closed = rm.duplication_rate_uniform(256, K, R)
            assert rm.duplication_rate(ids, 256, R) == pytest.approx(closed, abs=0.005), (R, K)
    # two entries computed by hand: R=4, K=2: 1 - 4(1 - C(192,2)/C(256,2))/2
    assert rm.duplication_rate_uniform(256, 2, 4) == pytest.approx(1 - 2 * (1 - 192 * 191 / (256 * 255)))
    assert rm.duplication_rate_uniform(256, 8, 32) == pytest.approx(1 - 4 * (1 - math.comb(248, 8) / math.comb(256, 8)))


@pytest.mark.parametrize("levels", [(2, 2), (4, 2), (2, 2, 2), (1, 4)])
def test_expected_rows_closed_form_matches_simulation(levels):
    topo = Topology(levels)
    W, E, K, T = topo.world_size, 16, 4, 4000
    g = torch.Generator().manual_seed(2)
    dests = [rm.dest_ranks(rm.sample_uniform(T, E, K, g), E, W) for _ in range(W)]
    for strategy in topo.strategies():
        sim = rm.rows_per_token(sr.stage_rows(dests, topo, strategy), topo, strategy, T * W)
        closed = rm.expected_rows_per_token_uniform(topo, strategy, E, K)
        assert sim == pytest.approx(closed, rel=0.03, abs=0.02), strategy


def test_group_limited_sampler():
    g = torch.Generator().manual_seed(3)
    ids = rm.sample_group_limited(2000, 256, 8, 8, 4, g)
    assert ids.shape == (2000, 8)
    assert all(len(set(r)) == 8 for r in ids.tolist())
    groups = ids // 32
    assert int(torch.zeros(2000, 8, dtype=torch.bool).scatter_(1, groups, True).sum(1).max()) <= 4
    # group limiting packs a token's experts into fewer groups than uniform routing does
    assert rm.duplication_rate(ids, 256, 8) > rm.duplication_rate_uniform(256, 8, 8) + 0.05
    with pytest.raises(ValueError, match="topk_group"):
        rm.sample_group_limited(10, 256, 8, 8, 0, g)


def test_zipf_sampler_is_skewed():
    g = torch.Generator().manual_seed(4)
    ids = rm.sample_group_limited(4000, 64, 4, 1, 1, g, rm.zipf_popularity(64, 1.2, g))
    assert all(len(set(r)) == 4 for r in ids[:200].tolist())
    counts = torch.bincount(ids.flatten(), minlength=64).sort(descending=True).values
    assert counts[0] > 4 * counts[-1]


def test_json_round_trip_and_loading(tmp_path):
    path = tmp_path / "cost.json"
    model = cm.CostModel(
        "2x2",
        {
            "flat": cm.StageCost(1e-4, 2e-9, 0.99),
            "inter-node": cm.StageCost(2e-4, 8e-9, 0.98),
            "intra-node": cm.StageCost(1e-5, 1e-10, 0.97),
        },
        "calibration (gloo, 2x2)",
    )
    model.save(path)
    data = json.loads(path.read_text())
    assert data["topology"] == "2x2" and data["stages"]["inter-node"] == {"alpha": 2e-4, "beta": 8e-9, "r2": 0.98}
    loaded = cm.load_cost_model(path, T22)
    assert loaded.stages == model.stages and not loaded.defaults_used and loaded.local is None
    model.local = cm.StageCost(0.0, 3e-9, 0.9)
    model.save(path)
    assert cm.load_cost_model(path, T22).local == model.local
    with pytest.raises(ValueError, match="calibrated on topology 2x2 but this run's topology is 4x1"):
        cm.load_cost_model(path, Topology((4, 1)))
    del data["stages"]["intra-node"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="lacks constants for stage\\(s\\) intra-node"):
        cm.load_cost_model(path, T22)


def test_defaults_and_presets():
    d = cm.load_cost_model(None, Topology((4, 8)))
    assert d.defaults_used and set(d.stages) == {"flat", "inter-node", "intra-node"}
    p = cm.load_cost_model("hiermoe-paper", Topology((4, 8)))
    assert not p.defaults_used and "Fig. 9" in p.source
    # the paper's Fig. 9 values (ms, ms/byte) in seconds: standard, Inter-level-1, Intra-level-1
    assert (p.stages["flat"].alpha, p.stages["flat"].beta) == pytest.approx((7.22e-4, 5.70e-10), rel=1e-12)
    assert (p.stages["inter-node"].alpha, p.stages["inter-node"].beta) == pytest.approx((4.97e-4, 5.29e-10))
    assert (p.stages["intra-node"].alpha, p.stages["intra-node"].beta) == pytest.approx((5.71e-4, 1.27e-10))
    deep = cm.load_cost_model("hiermoe-paper", Topology((4, 2, 2, 2)))  # hd4: Inter-1, Inter-2, Inter-3, Intra-3
    hd4 = Topology((4, 2, 2, 2)).stages("hd4")
    assert [deep.stage_cost(s).beta for s in hd4] == pytest.approx([5.29e-10, 1.17e-10, 2.06e-11, 1.64e-11])
    hd3_last = Topology((4, 2, 2, 2)).stages("hd3")[-1]  # Intra-level-2
    assert deep.stage_cost(hd3_last).alpha == pytest.approx(1.14e-4)
    with pytest.raises(ValueError, match="2 to 4 levels"):
        cm.load_cost_model("hiermoe-paper", Topology((2, 2, 2, 2, 2)))
    with pytest.raises(ValueError, match="presets: default, hiermoe-paper"):
        cm.load_cost_model("no-such-preset", T22)
    with pytest.raises(ValueError, match="no constants for stage 'level-1'"):
        d.stage_cost(Topology((2, 2, 2)).stages("hd3")[1])


@pytest.mark.parametrize("levels", [(2, 2), (1, 4), (4, 1), (2, 2, 2)], ids=lambda v: "x".join(map(str, v)))
def test_kernel_layouts_pack_what_stage_rows_counts(levels):
    """The dispatcher's layout kernel (``reference.stage_layout``), run on every rank's rows with the
    exchange simulated in one process, packs per stage exactly the [W, S] rows ``stage_rows`` counts."""
    from hiermoe_hf.kernels import reference

    topo = Topology(levels)
    W, K = topo.world_size, 3
    g = torch.Generator().manual_seed(7)
    dests = [torch.randint(-1, W, (int(torch.randint(0, 6, (1,), generator=g)), K), generator=g) for _ in range(W)]
    for strategy in topo.strategies():
        held = [d.clone() for d in dests]  # rows each rank holds: their carried destination ranks
        for stage, want_WS in zip(topo.stages(strategy), sr.stage_rows(dests, topo, strategy)):
            S, div = topo.group_size(stage), topo.stride(stage.hi)
            inbox = [[] for _ in range(W)]
            for r in range(W):
                lay = reference.stage_layout(held[r], div, S, stage.dedup)
                assert lay.send_counts_S.tolist() == want_WS[r].tolist(), (strategy, stage.name, r)
                ids, _ = reference.pack_route(held[r], torch.zeros_like(held[r], dtype=torch.float32),
                                              lay.src_row_P, lay.mask_PK)
                for part, m in zip(ids.split(lay.send_counts_S.tolist()), range(S)):
                    inbox[r + (m - int(topo.member_of(r, stage))) * div].append(part)
            held = [torch.cat(parts) if parts else torch.zeros(0, K, dtype=torch.int64) for parts in inbox]
        assert all(bool((h[h >= 0] == r).all()) for r, h in enumerate(held))  # every selection arrived home
