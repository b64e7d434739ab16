"""Expert-parallel groups smaller than the world (issue 11): checkpoints, resume, DDP + global-norm
clip, metrics, and bad input. 4 gloo ranks as 2 groups of 2 (``ep_size=2``).

Oracles: plain Transformers' ``from_pretrained`` of what a patched model saved, compared bit for bit
with the experts gathered by ``unpatch``; an uninterrupted run for resume (bit for bit); the
single-process model on the global batch with ``torch.nn.utils.clip_grad_norm_`` for DDP (float64,
1e-5); hand counts for the all-reduce bytes.
"""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

import hiermoe_hf
from hiermoe_hf.checkpoint.rank_state import RankStateStore
from hiermoe_hf.runtime.ep_layout import EPLayout, group_topology
from hiermoe_hf.runtime.expert_grads import divide_expert_grads_by_world, keep_experts_out_of_ddp
from hiermoe_hf.runtime.registry import moe_layers, runtime_of
from hiermoe_hf.swap.executor import execute_swaps
from hiermoe_hf.tiny_models import build_model, tiny_deepseek_v3_config, tiny_qwen3_moe_config
from hiermoe_hf.topology import Topology
from hiermoe_hf.training import grad_clip
from hiermoe_hf.training.expert_dp import ExpertGradSync
from hiermoe_hf.training.traffic import TrafficMeter

CONFIGS = {"qwen": tiny_qwen3_moe_config, "deepseek": tiny_deepseek_v3_config}
PER_RANK, SEQ = 2, 6


def _batch(step: int, world: int) -> torch.Tensor:
    return torch.randint(0, 256, (world * PER_RANK, SEQ), generator=torch.Generator().manual_seed(7 + step))


def _slice(step: int) -> torch.Tensor:
    return _batch(step, dist.get_world_size()).split(PER_RANK)[dist.get_rank()]


def _step(model, opt, step: int) -> float:
    x = _slice(step)
    loss = model(x, labels=x).loss
    loss.backward()
    hiermoe_hf.all_reduce_gradients(model)
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


def _patched(kind: str, ep_size: int = 2, topology="2x1"):
    model = build_model(CONFIGS[kind]()).train()
    hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology=topology, dispatch="hd2", ep_size=ep_size))
    return model


# ---- save -> plain Transformers load; from_pretrained per group ------------------------------------------------


def save_load_job(kind: str, folder: str) -> dict:
    model = _patched(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    names = list(moe_layers(model))
    _step(model, opt, 0)
    execute_swaps(model, [(names[0], 0, 7), (names[-1], 1, 6)], opt)  # a non-contiguous placement
    _step(model, opt, 1)
    model.save_pretrained(folder)
    hiermoe_hf.unpatch(model)
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = {}
    if dist.get_rank() == 0:
        plain = AutoModelForCausalLM.from_pretrained(folder)
        got = dict(plain.named_parameters())
        out["plain_exact"] = set(got) == set(full) and all(torch.equal(got[n], p) for n, p in full.items())
    dist.barrier()
    cfg = hiermoe_hf.HierMoEConfig(topology="2x1", dispatch="hd2", ep_size=2)
    loaded = hiermoe_hf.from_pretrained(folder, cfg)
    rt = runtime_of(loaded)
    named = dict(loaded.named_parameters())
    exact = True
    for experts, layer in moe_layers(loaded).values():
        for pname in layer.param_names:
            key = next(n for n, p in named.items() if p is getattr(experts, pname))
            exact &= torch.equal(getattr(experts, pname).detach(), full[key][layer.local_logical()])
    out["local_exact"] = exact
    out["ranks"] = (rt.rank, rt.global_rank, rt.replicas)
    return out


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_save_is_plain_checkpoint_and_from_pretrained_loads_the_group_experts(ranks, tmp_path, kind):
    results = ranks(4).run(save_load_job, kind, str(tmp_path / "ckpt"))
    assert results[0]["plain_exact"], "plain Transformers load differs from the gathered model"
    assert all(r["local_exact"] for r in results), results
    assert [r["ranks"] for r in results] == [(0, 0, 2), (1, 1, 2), (0, 2, 2), (1, 3, 2)]


# ---- save_state / load_state ------------------------------------------------------------------------------------


def resume_job(kind: str, folder: str) -> dict:
    """4 steps straight vs 2 steps, save (rank 0's dense state as Accelerate keeps it + per-rank files),
    a fresh model that loads them, 2 more steps: losses and gathered parameters bit for bit."""
    names = None
    model = _patched(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    names = list(moe_layers(model))
    store = RankStateStore(model, opt)
    losses = [_step(model, opt, 0)]
    execute_swaps(model, [(names[0], 0, 7)], opt)
    losses.append(_step(model, opt, 1))
    store.save(folder)
    if dist.get_rank() == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, os.path.join(folder, "rank0.pt"))
    store.seal(folder)  # the manifest, last (issue 19): a resume folder without one is refused
    losses += [_step(model, opt, s) for s in (2, 3)]
    hiermoe_hf.unpatch(model)
    straight = {n: p.detach().clone() for n, p in model.named_parameters()}

    fresh = _patched(kind)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    store2 = RankStateStore(fresh, opt2)
    store2.begin_load(folder)
    rank0 = torch.load(os.path.join(folder, "rank0.pt"), weights_only=False)  # rank 0's experts, as Accelerate has
    fresh.load_state_dict(rank0["model"])
    opt2.load_state_dict(rank0["opt"])
    resumed = [_step(fresh, opt2, s) for s in (2, 3)]
    hiermoe_hf.unpatch(fresh)
    params_exact = all(torch.equal(p, straight[n]) for n, p in fresh.named_parameters())

    other = _patched(kind, ep_size=4, topology="2x2")  # ep_size changed between save and load
    try:
        RankStateStore(other, None).begin_load(folder)
        error = None
    except ValueError as err:
        error = str(err)
    return {"losses": losses[2:], "resumed": resumed, "params_exact": params_exact, "error": error}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_resume_is_exact_and_changed_ep_size_is_refused(ranks, tmp_path, kind):
    results = ranks(4).run(resume_job, kind, str(tmp_path / "state"))
    for r, res in enumerate(results):
        assert res["resumed"] == res["losses"], f"rank {r}: {res['resumed']} vs {res['losses']}"
        assert res["params_exact"], f"rank {r}: parameters differ after resume"
        assert res["error"] and "saved with ep_size=2" in res["error"] and "ep_size=4" in res["error"], res["error"]


# ---- DDP + global-norm clip (the plugin's and callback's path) ------------------------------------------------


def ddp_clip_job(kind: str) -> dict:
    """Dense under DDP, experts out of it, grads /W by hooks, summed over replicas, clipped with the
    global norm; against one process with torch's clip on the global batch (float64)."""
    W = dist.get_world_size()
    ref = build_model(CONFIGS[kind](), dtype=torch.float64).train()
    ref.set_experts_implementation("eager")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    model = build_model(CONFIGS[kind](), dtype=torch.float64).train()
    hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology="1x2", dispatch="a2a", ep_size=2))
    keep_experts_out_of_ddp(model)
    divide_expert_grads_by_world(model)
    sync = ExpertGradSync(model)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt.register_step_pre_hook(lambda *_: sync())  # as HierMoEPlugin does: a no-op after the clip's sync
    norms, ref_norms = [], []
    for step in range(2):
        ids = _batch(step, W)
        # the same micro-batches of one sequence (Qwen3's aux loss is per forward, not linear in the batch)
        (sum(ref(s, labels=s).loss for s in ids.split(1)) / (W * PER_RANK)).backward()
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)))
        ref_opt.step()
        ref_opt.zero_grad()
        micros = _slice(step).split(1)  # two micro-batches: gradient accumulation, DDP syncs on the last
        for i, micro in enumerate(micros):
            with ddp.no_sync() if i < len(micros) - 1 else contextlib.nullcontext():
                (ddp(micro, labels=micro).loss / len(micros)).backward()
        sync()
        norms.append(float(grad_clip.clip_grad_norm_(model.parameters(), 0.05, model=model)))
        opt.step()
        opt.zero_grad()
    sync.remove()
    hiermoe_hf.unpatch(model)
    ref_params = dict(ref.named_parameters())
    err = max(float((p - ref_params[n]).abs().max() / ref_params[n].abs().max()) for n, p in model.named_parameters())
    return {"norms": norms, "ref_norms": ref_norms, "params": err}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_ddp_with_replicas_and_global_norm_clip_equals_single_process(ranks, kind):
    for res in ranks(4).run(ddp_clip_job, kind):
        assert res["norms"] == pytest.approx(res["ref_norms"], rel=1e-5)
        assert res["ref_norms"][0] > 0.05, "the clip must be active for the test to mean something"
        assert res["params"] <= 1e-5, res


# ---- metrics ------------------------------------------------------------------------------------------------


def metrics_job() -> dict:
    model = _patched("qwen")
    meter = TrafficMeter(model)
    x = _slice(0)
    model(x, labels=x).loss.backward()
    stats = hiermoe_hf.stats(model)
    counts = meter.pop(reduce=True)
    return {"stats": [(s["replicas"], s["expert_grad_allreduce_bytes"]) for s in stats.values()], "meter": counts}


def test_stats_and_traffic_count_the_expert_gradient_allreduce(ranks):
    # tiny Qwen3: per layer gate_up_proj [e, 2*16, 32] + down_proj [e, 32, 16], fp32, e = 8/2 = 4 slots:
    # 4 * (1024 + 512) * 4 B = 24576 B; a ring all-reduce over 2 replicas sends 2 * (1/2) of it per rank.
    results = ranks(4).run(metrics_job)
    for res in results:
        assert res["stats"] == [(2, 24576.0), (2, 24576.0)]
        assert res["meter"]["expert_grad_allreduce_bytes"] == 4 * 2 * 24576  # 4 ranks x 2 layers, one step


# ---- bad input ----------------------------------------------------------------------------------------------


def bad_ep_job() -> list[str]:
    out = []
    for kwargs in ({"ep_size": 3}, {"ep_size": 2, "topology": "2x2"}):
        try:
            hiermoe_hf.patch(build_model(tiny_qwen3_moe_config()), hiermoe_hf.HierMoEConfig(**kwargs))
            out.append("no error")
        except ValueError as err:
            out.append(str(err))
    dist.barrier()  # every rank refused before any collective: nothing hangs
    return out


def test_bad_ep_size_is_refused_on_every_rank(ranks):
    for res in ranks(4).run(bad_ep_job):
        assert "ep_size=3 does not divide the world size 4; valid ep_size: 1, 2, 4" in res[0]
        assert "topology 2x2 has 4 ranks but one expert-parallel group has ep_size=2" in res[1]


def test_ep_layout_validation_and_group_topology(monkeypatch):
    with pytest.raises(ValueError, match="ep_size must be an integer >= 1 or None"):
        hiermoe_hf.HierMoEConfig(ep_size=0)
    with pytest.raises(ValueError, match="ep_size must be an integer"):
        hiermoe_hf.HierMoEConfig(ep_size="2")
    with pytest.raises(ValueError, match=r"6 experts per layer cannot be split over .* ep_size=4 .*: 1, 2"):
        EPLayout.resolve(4, 8, 0, num_experts=6)
    lay = EPLayout.resolve(4, 16, 9)
    assert (lay.replicas, lay.replica, lay.rank) == (4, 2, 1)
    assert lay.group_ranks(2) == [8, 9, 10, 11] and lay.replica_ranks(1) == [1, 5, 9, 13]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert group_topology(None, EPLayout.resolve(8, 16, 0)) == Topology((1, 8))  # a node per group
    assert group_topology(None, EPLayout.resolve(16, 16, 0)) == Topology((2, 8))  # one group, two nodes
    assert group_topology(None, EPLayout.resolve(4, 16, 0)) == Topology((1, 4))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="ep_size=6 neither divides nor is a multiple of the 4 ranks per node"):
        group_topology(None, EPLayout.resolve(6, 12, 0))
    assert math.prod(group_topology("2x4", EPLayout.resolve(8, 16, 0)).levels) == 8


def test_plugin_reads_hiermoe_ep_size(monkeypatch):
    from hiermoe_hf.accelerate import HierMoEPlugin

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("HIERMOE_EP_SIZE", "2")
    plugin = HierMoEPlugin()
    assert plugin.ep_size == 2 and plugin.config().ep_size == 2
    assert plugin.resolve_topology(8) == Topology((1, 2))  # a group inside a node of 4
    monkeypatch.setenv("HIERMOE_EP_SIZE", "none")
    assert HierMoEPlugin().ep_size is None
    monkeypatch.setenv("HIERMOE_EP_SIZE", "two")
    with pytest.raises(ValueError, match="HIERMOE_EP_SIZE='two' is not an integer"):
        HierMoEPlugin()
    monkeypatch.setenv("HIERMOE_EP_SIZE", "3")
    with pytest.raises(ValueError, match="neither divides nor is a multiple of this launch's 4 processes"):
        HierMoEPlugin().resolve_topology(12)


# ---- HierMoEPlugin end to end (Accelerate, DDP, accumulation, clip, swaps) ----------------------------------


@pytest.mark.parametrize("swapping", [False, True], ids=["no-swaps", "load-swaps"])
def test_plugin_with_two_groups_equals_single_process(ranks, swapping):
    from test_accelerate_plugin import SWAPPING, _assert_close, _rank_mean, reference, train_job

    kw = dict(topology="1x2", dispatch="a2a", ep_size=2, **(SWAPPING if swapping else {}))
    results = ranks(4).run(train_job, "qwen", kw, accum=2)
    want_losses, want_norms = reference("qwen", 4, accum=2)
    _assert_close(_rank_mean(results, 0), want_losses, "loss per step")
    for r, res in enumerate(results):
        _assert_close(res[1], want_norms, f"clip norm on rank {r}")
    assert all(res[2] == results[0][2] for res in results), "placements differ between ranks"
    metrics = results[0][3]
    assert metrics["hiermoe/expert_grad_allreduce_bytes"] == 4 * 2 * 24576  # as in the metrics test
    if swapping:
        assert metrics["hiermoe/swaps_done"] > 0, "no swap happened: the test would prove nothing"


def test_trainer_callback_with_two_groups_equals_single_process(ranks, tmp_path):
    """Trainer + HierMoECallback on 4 ranks as 2 groups of 2 (every rank trains on the same row, so
    the single-process reference is the callback test's own)."""
    from test_trainer_callback import MAX_NORM, _probe, _rel, reference_model, trainer_job

    results = ranks(4).run(trainer_job, str(tmp_path), {"ep_size": 2, "swap_interval": 1, "swap_policy": "load"})
    ref, ref_norm = reference_model()
    with torch.no_grad():
        want = ref(_probe()).logits
    final = AutoModelForCausalLM.from_pretrained(str(tmp_path / "final")).eval()
    with torch.no_grad():
        got_final = final(_probe()).logits
    for logits, grad_norm, metrics, _, placements in results:
        assert _rel(logits, want) < 1e-5 and grad_norm == pytest.approx(ref_norm, rel=1e-5) and ref_norm > MAX_NORM
        assert placements == results[0][4] and metrics["hiermoe/swaps_done"] > 0
    assert _rel(got_final, want) < 1e-5, "the saved model reloaded by plain Transformers differs"
