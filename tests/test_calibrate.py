"""Calibration: the least-squares fit, and a 4-rank gloo run that predicts a held-out size."""

import pytest
import torch.distributed as dist

from hiermoe_hf import HierMoEConfig
from hiermoe_hf.cost import calibration as cal
from hiermoe_hf.cost import model as cm
from hiermoe_hf.exchange.comm import StageGroups
from hiermoe_hf.topology import Topology

FIT_SIZES = (32 << 10, 128 << 10, 512 << 10, 1 << 20, 4 << 20)
HELD_OUT = 2 << 20


def test_fit_recovers_exact_line():
    x = [1e3, 1e4, 1e5, 1e6]
    c = cal.fit_alpha_beta(x, [2e-4 + 3e-9 * n for n in x])
    assert c.alpha == pytest.approx(2e-4, rel=1e-9) and c.beta == pytest.approx(3e-9, rel=1e-9)
    assert c.r2 == pytest.approx(1.0)
    # a negative intercept is not a latency: refit through the origin
    c = cal.fit_alpha_beta([1e3, 1e6], [0.5e-6, 1e-3])
    assert c.alpha == 0.0 and c.beta > 0
    with pytest.raises(ValueError, match="two or more distinct sizes"):
        cal.fit_alpha_beta([1e3, 1e3], [1e-3, 1e-3])


def test_stage_kinds_cover_every_strategy():
    assert [s.name for s in cal.stage_kinds(Topology((2, 2)))] == ["flat", "intra-node", "inter-node"]
    assert [s.name for s in cal.stage_kinds(Topology((1, 4)))] == ["flat", "intra-node"]  # inter-node: groups of one


def _calibrate_and_hold_out(out_path: str, attempts: int) -> dict:
    """On every rank: time 2x2's stages at the fit sizes and a held-out one (interleaved), fit
    without the held-out size, predict it. Retried when the shared CPUs were too noisy."""
    topo = Topology((2, 2))
    kinds = cal.stage_kinds(topo)
    groups = StageGroups(topo, dist.get_rank())
    sizes = FIT_SIZES + (HELD_OUT,)
    for _ in range(attempts):
        samples = cal.measure(topo, sizes, reps=4, trials=5, groups=groups)
        fits, errors = {}, {}
        for st in kinds:
            s = samples[st.name]
            # the fitted x is the bytes one rank sends: group size x per-peer message
            assert [n for n, _ in s] == [topo.group_size(st) * m for m in sizes]
            fits[st.name] = cal.fit_alpha_beta([n for n, _ in s[:-1]], [t for _, t in s[:-1]])
            held_n, measured = s[-1]
            errors[st.name] = abs(fits[st.name].time(held_n) - measured) / measured
        if max(errors.values()) <= 0.30:  # every rank sees the same all-reduced times: same decision
            break
    model = cal.calibrate(topo, FIT_SIZES, reps=2, trials=2, groups=groups, local_rows=(256, 1024, 2048))
    if dist.get_rank() == 0:
        model.save(out_path)
    return {"errors": errors, "r2": {k: v.r2 for k, v in fits.items()}}


def test_calibration_predicts_held_out_size(ranks, tmp_path):
    path = str(tmp_path / "cost_2x2.json")
    results = ranks(4).run(_calibrate_and_hold_out, path, 3)
    errors = results[0]["errors"]
    assert set(errors) == {"flat", "intra-node", "inter-node"}
    assert max(errors.values()) <= 0.30, results[0]
    model = cm.load_cost_model(HierMoEConfig(cost_model=path).cost_model, Topology((2, 2)))
    assert not model.defaults_used and set(model.stages) == {"flat", "intra-node", "inter-node"}
    assert all(c.alpha >= 0 and c.beta > 0 for c in model.stages.values())
    assert model.meta["backend"] == "gloo" and len(model.meta["samples"]["flat"]) == len(FIT_SIZES)
    assert model.local is not None and model.local.beta > 0 and len(model.meta["local_samples"]) == 3


def test_cli_needs_a_launcher(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit, match="launch it with torchrun"):
        cal.main(["--topology", "2x2"])
