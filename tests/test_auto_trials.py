"""``dispatch="auto"`` without a cost model times its candidates on the model's own exchanges and
keeps the fastest (issue 13 item 6, ``cost/trials.py``).

The oracle of the distributed test is a delay the test injects into one kind of stage group: 50 ms
in every ``all_to_all_single`` of the 4-rank group (only ``hd1``'s flat stage has one) or of the
2-rank groups (only ``hd2``'s stages): the strategy without the delay must win, on every rank and
layer, after exactly the announced trial forwards. Default constants (the code before the change)
pick the same strategy whatever the links do, so one of the two cases fails on it. The unit tests
drive the schedule by hand.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
import torch.distributed as dist

import hiermoe_hf
from hiermoe_hf.cost.trials import (
    CHUNK_ROUNDS,
    OVERLAP_CHUNKS,
    TIMED_ROUNDS,
    StrategyTrials,
    chunk_candidates,
    trial_candidates,
)
from hiermoe_hf.tiny_models import build_model, tiny_qwen3_moe_config
from hiermoe_hf.topology import Topology


class _Ms:
    def __init__(self, ms: float):
        self._ms = ms

    def ms(self) -> float:
        return self._ms

    def microseconds(self, device: torch.device) -> torch.Tensor:
        return torch.full((1,), round(1e3 * self._ms), dtype=torch.int64, device=device)


def _drive(trials: StrategyTrials, layers: list[str], summed_us: list[list[int]]) -> list[list[str]]:
    """One pass over ``layers`` per row of ``summed_us``; ``summed_us[p][i]``: the sum over ranks of
    layer i's forward time in pass p, which the next MoE forward's count exchange brings."""
    picked, prev = [], 0
    for row in summed_us:
        picks = []
        for layer, us in zip(layers, row):
            picks.append(trials.pick(layer, [prev] if trials.chosen is None else []))
            trials.ran(_Ms(us / 1e3))
            prev = us
        picked.append(picks)
    return picked


def test_candidates_are_the_deduplicating_strategies():
    assert trial_candidates(Topology((2, 2))) == ("hd1", "hd2")
    assert trial_candidates(Topology((2, 2, 2))) == ("hd1", "hd2", "hd3")
    assert trial_candidates(Topology((4,))) == ("hd1",)


def test_model_wide_choice_from_the_fastest_round_summed_over_layers():
    assert TIMED_ROUNDS == 2
    t = StrategyTrials(("hd1", "hd2"), world_size=4)
    # passes: warm-up hd1, hd2 (ignored: hd2's tiny warm-up must not count), round 1 hd1, hd2,
    # round 2 hd1, hd2. Summed over layers: hd1 400, 500 -> 400; hd2 500, 450 -> 450: hd1 wins,
    # though layer a alone would pick hd2 (300/350 vs 100/200). The last timing (layer b, pass 5:
    # 250) arrives at layer a's first forward of pass 6; without it hd2 would win (200 < 400).
    times = [[10**6, 10**6], [1, 1], [300, 100], [100, 400], [350, 150], [200, 250], [9, 9], [9, 9]]
    picked = _drive(t, ["a", "b"], times)
    assert picked == [[s, s] for s in ["hd1", "hd2"] * 3 + ["hd1", "hd1"]]
    assert t.chosen == "hd1" and t.layer("a").counting == ("hd1",)
    assert t.measured_ms() == {"hd1": 400 / 4 / 1e3, "hd2": 450 / 4 / 1e3}
    assert t.extra(torch.device("cpu")).numel() == 0  # no timing travels once chosen
    assert t.source().endswith(": hd1") and "hd1, hd2" in t.source()


def test_ties_go_to_the_earlier_candidate_and_extra_reports_microseconds():
    t = StrategyTrials(("hd1", "hd2", "hd3"), world_size=2)
    assert t.layer("a").counting == ("hd1", "hd2", "hd3") and t.trial_forwards == 9
    assert t.extra(torch.device("cpu")).tolist() == [0]
    t.pick("a", [0])
    assert t.extra(torch.device("cpu")).tolist() == [0]  # the warm-up forward reports nothing
    t.pending = (("hd1", 1), _Ms(1.25))
    assert t.extra(torch.device("cpu")).tolist() == [1250]
    t = StrategyTrials(("hd1", "hd2", "hd3"), world_size=2)
    picked = _drive(t, ["a"], [[5], [5], [5], [30], [20], [20], [40], [20], [20], [0]])
    assert [p[0] for p in picked] == ["hd1", "hd2", "hd3"] * 3 + ["hd2"]  # hd2 and hd3 tie at 20 us
    assert t.measured_ms() == {"hd1": 0.015, "hd2": 0.01, "hd3": 0.01}


def test_recomputes_run_their_forwards_strategy_untimed():
    """Gradient checkpointing: each step is a forward pass (a, b) and a recompute pass (b, a) inside
    the backward; the recomputes follow their forwards and their (huge) times never count."""
    t = StrategyTrials(("hd1", "hd2"), world_size=1)
    fwd = [[10**6, 10**6], [1, 1], [300, 100], [100, 400], [350, 150], [200, 250], [9, 9]]
    prev, runs = 0, []
    for row in fwd:
        step = []
        for layer, us in zip("ab", row):
            step.append(t.pick(layer, [prev] if t.chosen is None else []))
            t.ran(_Ms(us / 1e3))
            prev = us
        for layer in "ba":
            step.append(t.pick(layer, [prev] if t.chosen is None else [], recompute=True))
            t.ran(_Ms(10**9))
            prev = 10**9  # what a recompute's forward would report: must not be counted
        runs.append(step)
    assert runs == [[s] * 4 for s in ["hd1", "hd2"] * 3 + ["hd1"]]
    assert t.forwards == {"a": 7, "b": 7} and t.measured_ms() == {"hd1": 0.4, "hd2": 0.45}


@contextlib.contextmanager
def _delayed_groups(slow_group_size: int):
    """Every ``all_to_all_single`` in a group of ``slow_group_size`` ranks sleeps 50 ms first (the
    timing covers the whole layer since issue 18, experts too: more noise on a loaded machine)."""
    orig = dist.all_to_all_single

    def delayed(out, inp, *args, group=None, **kwargs):
        if group is not None and dist.get_world_size(group) == slow_group_size:
            time.sleep(0.05)
        return orig(out, inp, *args, group=group, **kwargs)

    dist.all_to_all_single = delayed
    try:
        yield
    finally:
        dist.all_to_all_single = orig


def _run_forwards(slow_group_size: int, topology: str, forwards: int) -> dict:
    """``forwards`` forwards of a patched tiny Qwen3-MoE with ``slow_group_size`` groups delayed."""
    with _delayed_groups(slow_group_size):
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
        # every rank sleeps in at least 2 delayed exchanges (dispatch + combine) per layer of the loser's pass
        assert measured[loser] >= 2 * 50 * layers and measured[winner] < measured[loser], measured


def _train_checkpointed(slow_group_size: int, steps: int) -> list[list[str]]:
    """``steps`` training steps under gradient checkpointing; strategies after each backward (the
    recompute's, which must be its forward's)."""
    with _delayed_groups(slow_group_size):
        model = build_model(tiny_qwen3_moe_config())
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology="2x2"))
        runs = []
        for i in range(steps):
            ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(100 * i + dist.get_rank()))
            model(ids, labels=ids).loss.backward()
            runs.append([(v["strategy"], v["recompute"]) for v in hiermoe_hf.stats(model).values()])
        return runs


def test_auto_under_gradient_checkpointing(ranks):
    trial = 2 * (1 + TIMED_ROUNDS)
    results = ranks(4).run(_train_checkpointed, 4, trial + 1)
    assert all(r == results[0] for r in results)
    layers = len(results[0][0])
    expected = ["hd1", "hd2"] * (1 + TIMED_ROUNDS) + ["hd2"]
    assert results[0] == [[(s, True)] * layers for s in expected]


def test_one_level_runs_hd1_without_trials(ranks):
    r = ranks(4).run(_run_forwards, 2, "4", 2)[0]
    assert r["runs"] == [["hd1"] * len(r["runs"][0])] * 2
    assert all("nothing to time" in s for s in r["sources"]) and r["measured"] == [{}] * len(r["sources"])


# ---- overlap_chunks="auto" (issue 18 item 5): the chunk phase after the strategy phase ----------------


def _drive_chunks(trials: StrategyTrials, layers: list[str], summed_us: list[list[int]]) -> list[list[tuple]]:
    """``_drive`` that also records, per forward, the chunks counted before the exchange and the
    chunks run after it: (strategy, counted, run)."""
    picked, prev = [], 0
    for row in summed_us:
        picks = []
        for layer, us in zip(layers, row):
            counted = trials.chunks(layer)
            name = trials.pick(layer, [prev] if trials.deciding else [])
            picks.append((name, counted, trials.chunks_run(layer)))
            trials.ran(_Ms(us / 1e3))
            prev = us
        picked.append(picks)
    return picked


def test_chunk_phase_times_the_kept_strategy_in_4_chunks_after_the_strategy_phase():
    assert chunk_candidates("auto") == (1, OVERLAP_CHUNKS) and chunk_candidates(3) == (3,)
    t = StrategyTrials(("hd1", "hd2"), world_size=2, chunk_options=chunk_candidates("auto"))
    assert CHUNK_ROUNDS == 1
    assert t.trial_forwards == 2 * (1 + TIMED_ROUNDS) + CHUNK_ROUNDS  # x1 against x4 of the kept one
    # strategy phase as above (hd2 wins: 300 < 400 per pass summed over a, b), then hd2 x4 for one
    # timed round (no warm-up: the strategy phase warmed up): 250 < hd2 x1's 300: x4 kept from pass 7.
    times = [[10**6, 10**6], [1, 1], [200, 200], [150, 150], [200, 200], [150, 150],
             [125, 125], [9, 9], [9, 9]]
    picked = _drive_chunks(t, ["a", "b"], times)
    x4 = OVERLAP_CHUNKS
    want = [[(s, 1, 1)] * 2 for s in ["hd1", "hd2"] * 3] + [[("hd2", x4, x4)] * 2] * CHUNK_ROUNDS
    # the chunk decision (layer a, pass 7) counts in 4 chunks before it knows; then every forward runs 4
    want += [[("hd2", x4, x4)] * 2] * 2
    assert picked == want
    assert (t.chosen, t.chosen_chunks, t.deciding) == ("hd2", x4, False)
    assert t.measured_ms() == {"hd1": 0.2, "hd2": 0.15} and t.measured_ms_by_chunks() == {1: 0.15, x4: 0.125}
    assert t.extra(torch.device("cpu")).numel() == 0


def test_chunk_decision_for_1_counts_in_4_and_runs_unchunked():
    """x4 slower: the deciding forward counted in 4 chunks and runs 1 (forward.py merges the counts);
    a recompute of it runs 1 as well, as do the recomputes of the trial forwards their own count."""
    t = StrategyTrials(("hd1", "hd2"), world_size=1, chunk_options=(1, 4))
    times = [[5], [5], [30], [20], [30], [20], [40], [0], [0]]
    picked = _drive_chunks(t, ["a"], times)
    assert [p[0] for p in picked] == [(s, 1, 1) for s in ["hd1", "hd2"] * 3] + [("hd2", 4, 4)] * CHUNK_ROUNDS + [
        ("hd2", 4, 1), ("hd2", 1, 1)]
    assert t.chosen_chunks == 1 and t.measured_ms_by_chunks() == {1: 0.02, 4: 0.04}
    assert t.chunks("a", recompute=True) == 1 and t.pick("a", [], recompute=True) == "hd2"


def test_fixed_strategy_times_1_and_4_alternately():
    """A fixed dispatch (or a cost model) leaves no strategy phase: the chunk phase times x1 and x4
    alternately from the first forward, the strategy comes from the base (pick: None)."""
    t = StrategyTrials((), world_size=1, chunk_options=(1, 4))
    assert t.trial_forwards == 2 * (1 + TIMED_ROUNDS) and t.measured_ms() == {}
    times = [[9], [9], [50], [30], [50], [35], [0]]
    picked = _drive_chunks(t, ["a"], times)
    assert [p[0] for p in picked] == [(None, c, c) for c in (1, 4) * 3] + [(None, 4, 4)]
    assert t.measured_ms_by_chunks() == {1: 0.05, 4: 0.03}


def test_recompute_reuses_its_forwards_chunks():
    t = StrategyTrials((), world_size=1, chunk_options=(1, 4))
    for f, want in enumerate([1, 4, 1, 4]):
        assert t.chunks("a") == want
        t.pick("a", [0])
        t.ran(_Ms(1.0))
        assert t.chunks("a", recompute=True) == want  # in this forward's backward
        t.pick("a", [0], recompute=True)
        assert t.chunks_run("a") == want and t.forwards == {"a": f + 1}


def test_config_accepts_auto_and_integers():
    assert hiermoe_hf.HierMoEConfig().overlap_chunks == "auto"
    assert hiermoe_hf.HierMoEConfig(overlap_chunks=4).overlap_chunks == 4
    for bad in ("AUTO", "4", 0, None):
        with pytest.raises(ValueError, match="overlap_chunks must be 'auto'"):
            hiermoe_hf.HierMoEConfig(overlap_chunks=bad)


@contextlib.contextmanager
def _delayed_chunks(slow: int):
    """Every MoE layer forward run in ``slow`` chunks (1: unchunked ``dispatch``; more: the pipelined
    layer) sleeps 150 ms first: the per-candidate delay of the chunk phase (well above what 4 chunks
    cost a tiny layer over 1 on a loaded 2-core machine, about 20-40 ms)."""
    import hiermoe_hf.runtime.forward as fwd

    name = "dispatch" if slow == 1 else "pipelined_layer"
    orig = getattr(fwd, name)

    def delayed(*args, **kwargs):
        time.sleep(0.15)
        return orig(*args, **kwargs)

    setattr(fwd, name, delayed)
    try:
        yield
    finally:
        setattr(fwd, name, orig)


def _run_chunked_forwards(slow_chunks: int, dispatch: str, forwards: int) -> dict:
    """``forwards`` forwards of a patched tiny Qwen3-MoE at the defaults (``dispatch`` aside), hd1's
    4-rank groups and the ``slow_chunks`` runs delayed; every forward's logits against the unpatched
    model on this rank's own batch (each token's output is its own: an exact oracle)."""
    with _delayed_groups(4), _delayed_chunks(slow_chunks):
        model = build_model(tiny_qwen3_moe_config())
        ref = build_model(tiny_qwen3_moe_config())
        hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology="2x2", dispatch=dispatch))
        runs, worst = [], 0.0
        for i in range(forwards):
            ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(100 * i + dist.get_rank()))
            with torch.no_grad():
                got, want = model(ids).logits, ref(ids).logits
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
            runs.append([(v["strategy"], v["overlap_chunks"]) for v in hiermoe_hf.stats(model).values()])
        return {"runs": runs, "by_chunks": [v["measured_ms_by_chunks"] for v in hiermoe_hf.stats(model).values()],
                "worst_rel": worst}


@pytest.mark.parametrize("dispatch,slow,winner", [("auto", 1, 4), ("auto", 4, 1), ("hd2", 1, 4)])
def test_default_overlap_times_1_and_4_and_keeps_the_faster(ranks, dispatch, slow, winner):
    """The defaults time hd1/hd2 unchunked, then the kept hd2 in 4 chunks, and keep the faster chunk
    count on every rank and layer (a fixed dispatch: 1 and 4 alternately); outputs stay exact
    throughout, the deciding forward (counted in 4 chunks, possibly run in 1) included."""
    strategy_forwards = 2 * (1 + TIMED_ROUNDS) if dispatch == "auto" else 0
    chunk_forwards = CHUNK_ROUNDS if strategy_forwards else 2 * (1 + TIMED_ROUNDS)
    results = ranks(4).run(_run_chunked_forwards, slow, dispatch, strategy_forwards + chunk_forwards + 2)
    assert all(r["runs"] == results[0]["runs"] for r in results)  # every rank: same (strategy, chunks)
    r = results[0]
    layers = len(r["runs"][0])
    x4 = OVERLAP_CHUNKS
    if dispatch == "auto":
        want = [(s, 1) for s in ["hd1", "hd2"] * (1 + TIMED_ROUNDS)] + [("hd2", x4)] * CHUNK_ROUNDS
    else:
        want = [("hd2", c) for c in (1, x4) * (1 + TIMED_ROUNDS)]
    want += [("hd2", winner)] * 2
    assert r["runs"] == [[w] * layers for w in want]
    loser = 1 if winner == x4 else x4
    for by in r["by_chunks"]:
        # every rank sleeps 150 ms per layer in each forward of the loser
        assert set(by) == {1, x4} and by[loser] >= 150 * layers and by[winner] < by[loser], by
    assert max(x["worst_rel"] for x in results) <= 1e-5  # fp32: GEMM blocking over rows may differ


def _train_checkpointed_chunks(slow_chunks: int, steps: int) -> list[list[tuple]]:
    """``_train_checkpointed`` at the defaults with the ``slow_chunks`` runs delayed: (strategy,
    chunks, recompute) of each step's recompute."""
    with _delayed_groups(4), _delayed_chunks(slow_chunks):
        model = build_model(tiny_qwen3_moe_config())
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology="2x2"))
        runs = []
        for i in range(steps):
            ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(100 * i + dist.get_rank()))
            model(ids, labels=ids).loss.backward()
            stats = hiermoe_hf.stats(model).values()
            runs.append([(v["strategy"], v["overlap_chunks"], v["recompute"]) for v in stats])
        return runs


def test_default_overlap_under_gradient_checkpointing(ranks):
    """x4 slower: the step that decides counted in 4 chunks and ran 1; its recompute runs 1 too, and
    every trial step's recompute runs its forward's chunk count."""
    trial = 2 * (1 + TIMED_ROUNDS) + CHUNK_ROUNDS
    results = ranks(4).run(_train_checkpointed_chunks, OVERLAP_CHUNKS, trial + 2)
    assert all(r == results[0] for r in results)
    layers = len(results[0][0])
    want = [(s, 1) for s in ["hd1", "hd2"] * (1 + TIMED_ROUNDS)] + [("hd2", OVERLAP_CHUNKS)] * CHUNK_ROUNDS
    want += [("hd2", 1)] * 2
    assert results[0] == [[(s, c, True)] * layers for s, c in want]
