"""``dispatch="auto"`` without a cost model times its candidates on the layer's own exchange and
keeps the fastest (issue 13 item 6, ``cost/trials.py``).

The oracle of the distributed test is a delay the test injects into one kind of stage group: 20 ms
in every ``all_to_all_single`` of the 4-rank group (only ``hd1``'s flat stage has one) or of the
2-rank groups (only ``hd2``'s stages): the strategy without the delay must win, on every rank and
layer, after exactly the announced trial forwards. Default constants (the code before the change)
pick the same strategy whatever the links do, so one of the two cases fails on it.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import hiermoe_hf
from hiermoe_hf.cost.trials import TIMED_ROUNDS, StrategyTrials, trial_candidates
from hiermoe_hf.tiny_models import build_model, tiny_qwen3_moe_config
from hiermoe_hf.topology import Topology


class _Ms:
    def __init__(self, ms: float):
        self._ms = ms

    def ms(self) -> float:
        return self._ms


def _drive(trials: StrategyTrials, summed_us: list[int]) -> list[str]:
    """Pick once per entry of ``summed_us`` (the sum the count exchange brings for the previous forward)."""
    return [trials.pick(None, [us]) for us in summed_us]


def test_candidates_are_the_deduplicating_strategies():
    assert trial_candidates(Topology((2, 2))) == ("hd1", "hd2")
    assert trial_candidates(Topology((2, 2, 2))) == ("hd1", "hd2", "hd3")
    assert trial_candidates(Topology((4,))) == ("hd1",)


def test_schedule_skips_warmup_and_keeps_the_fastest_round():
    assert TIMED_ROUNDS == 2
    t = StrategyTrials(("hd1", "hd2"), world_size=4)
    # times reported at forward f are of forward f-1: f0 none; warm-up hd1, hd2 (hd2's tiny warm-up
    # time must not count); round 1 hd1 400, hd2 600; round 2 hd1 500, hd2 350
    picked = _drive(t, [0, 10**6, 1, 400, 600, 500, 350, 0, 0])
    assert picked == ["hd1", "hd2", "hd1", "hd2", "hd1", "hd2", "hd2", "hd2", "hd2"]
    assert t.chosen == "hd2" and t.counting == ("hd2",)
    assert t.measured_ms() == {"hd1": 400 / 4 / 1e3, "hd2": 350 / 4 / 1e3}
    assert t.extra(torch.device("cpu")).numel() == 0  # no timing travels once chosen
    assert t.source().endswith(": hd2") and "hd1, hd2" in t.source()


def test_ties_go_to_the_earlier_candidate_and_extra_reports_microseconds():
    t = StrategyTrials(("hd1", "hd2", "hd3"), world_size=2)
    assert t.counting == ("hd1", "hd2", "hd3") and t.trial_forwards == 9
    assert t.extra(torch.device("cpu")).tolist() == [0]
    t.ran(_Ms(1.25))
    assert t.extra(torch.device("cpu")).tolist() == [1250]
    picked = _drive(t, [0, 5, 5, 5, 30, 20, 20, 40, 20, 20])
    assert picked[:9] == ["hd1", "hd2", "hd3"] * 3
    assert t.measured_ms() == {"hd1": 0.015, "hd2": 0.01, "hd3": 0.01}
    assert picked[9] == "hd2"  # hd2 and hd3 tie at 20 us: the earlier one


def _run_forwards(slow_group_size: int, topology: str, forwards: int) -> dict:
    """``forwards`` forwards of a patched tiny Qwen3-MoE with ``slow_group_size`` groups delayed."""
    orig = dist.all_to_all_single

    def delayed(out, inp, *args, group=None, **kwargs):
        if group is not None and dist.get_world_size(group) == slow_group_size:
            time.sleep(0.02)
        return orig(out, inp, *args, group=group, **kwargs)

    dist.all_to_all_single = delayed
    try:
        model = build_model(tiny_qwen3_moe_config())
        hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology=topology))
        runs = []
        for i in range(forwards):
            g = torch.Generator().manual_seed(100 * i + dist.get_rank())
            model(torch.randint(0, 256, (2, 6), generator=g))
            runs.append([v["strategy"] for v in hiermoe_hf.stats(model).values()])
        last = hiermoe_hf.stats(model)
        return {
            "runs": runs,
            "sources": [v["cost_model"] for v in last.values()],
            "defaults": [v["cost_model_defaults"] for v in last.values()],
            "measured": [v["measured_ms_by_strategy"] for v in last.values()],
        }
    finally:
        dist.all_to_all_single = orig


@pytest.mark.parametrize("slow_group_size,winner", [(4, "hd2"), (2, "hd1")])
def test_auto_times_hd1_hd2_and_keeps_the_fastest(ranks, slow_group_size, winner):
    trial = 2 * (1 + TIMED_ROUNDS)
    results = ranks(4).run(_run_forwards, slow_group_size, "2x2", trial + 2)
    assert all(r == results[0] for r in results)  # every rank: same strategies, same times, same source
    r = results[0]
    layers = len(r["runs"][0])
    assert r["runs"] == [[s] * layers for s in ["hd1", "hd2"] * (1 + TIMED_ROUNDS) + [winner] * 2]
    loser = "hd1" if winner == "hd2" else "hd2"
    for source, defaults, measured in zip(r["sources"], r["defaults"], r["measured"]):
        assert source.startswith("measured") and source.endswith(f": {winner}") and defaults is False
        # every rank sleeps in at least 2 delayed exchanges (dispatch + combine) of the loser's forward
        assert measured[loser] >= 2 * 20 and measured[winner] < measured[loser], measured


def test_one_level_runs_hd1_without_trials(ranks):
    r = ranks(4).run(_run_forwards, 2, "4", 2)[0]
    assert r["runs"] == [["hd1"] * len(r["runs"][0])] * 2
    assert all("nothing to time" in s for s in r["sources"]) and r["measured"] == [{}] * len(r["sources"])
