"""Expert data parallelism with the dense part sharded by FSDP2 (issue 19, item 1): 4 gloo ranks as 2
expert-parallel groups of 2 (``ep_size=2``), the dense part sharded over all 4.

Oracle: the unpatched Transformers model in one process on the global batch (loss averaged over the
4 ranks' micro-batches), ``torch.nn.utils.clip_grad_norm_`` and AdamW. Checked on every rank: every
step's loss and clip norm within 1e-5 relative, and the trained model (written by the collective
``save_pretrained``, reloaded by plain Transformers) within 1e-5 relative (norm over each tensor), for
``hiermoe_hf.from_pretrained(..., dense_sharding="fsdp2")`` with a hand-written loop, and for
``HierMoEPlugin(ep_size=2, dense_sharding="fsdp2")`` with ``save_state`` / ``load_state`` resuming bit
for bit. Before the fix the clip summed the dense shards over the expert-parallel group only (norm
1.53 where one process gets 2.28).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from accelerate_state import differences, digest, fresh_accelerator
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

import hiermoe_hf
from hiermoe_hf.cost.memory import ParamTable, memory_plan, rank0_bytes
from hiermoe_hf.tiny_models import build_model, tiny_qwen3_moe_config
from hiermoe_hf.training import grad_clip

W, EP, STEPS, B, L, LR, MAX_NORM = 4, 2, 4, 2, 9, 1e-2, 0.5


def _micro(step: int, rank: int) -> torch.Tensor:
    ids = torch.randint(0, 256, (W * B, L), generator=torch.Generator().manual_seed(1900 + step))
    return ids[rank * B : (rank + 1) * B]


def _reference():
    """Single process, unpatched: (losses, clip norms, final parameters)."""
    model = build_model(tiny_qwen3_moe_config()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for step in range(STEPS):
        total = 0.0
        for r in range(W):
            x = _micro(step, r)
            loss = model(input_ids=x, labels=x).loss / W
            loss.backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, norms, {k: v.detach().clone() for k, v in model.named_parameters()}


def _rel(got, want) -> float:
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    return float((got - want).norm() / want.norm())


def _mean_loss(loss: torch.Tensor) -> float:
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    return float(mean) / W


def _rank_from_pretrained(folder: str, save_dir: str):
    r = dist.get_rank()
    cfg = hiermoe_hf.HierMoEConfig(topology="1x2", ep_size=EP, dispatch="hd1")
    model = hiermoe_hf.from_pretrained(folder, cfg, dense_sharding="fsdp2").train()
    assert any(isinstance(p, DTensor) for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for step in range(STEPS):
        x = _micro(step, r)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        hiermoe_hf.all_reduce_gradients(model)
        norms.append(float(grad_clip.clip_grad_norm_(model.parameters(), MAX_NORM, model=model)))
        opt.step()
        opt.zero_grad()
        losses.append(_mean_loss(loss))
    model.save_pretrained(save_dir)
    return losses, norms


def _rank_plugin(state_dir: str, save_dir: str | None, resume: bool):
    from hiermoe_hf.accelerate import HierMoEPlugin

    r, save_at = dist.get_rank(), 2
    acc = fresh_accelerator()
    model = build_model(tiny_qwen3_moe_config(), seed=0 if not resume else 7).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    plugin = HierMoEPlugin(topology="2x1", ep_size=EP, dense_sharding="fsdp2", dispatch="hd2",
                           swap_interval=1, swap_policy="load", swap_pairs=2)
    model, opt = plugin.prepare(acc, model, opt)
    inner = acc.unwrap_model(model)
    start, at_save, at_load = 0, None, None
    if resume:
        acc.load_state(state_dir)
        start, at_load = save_at, digest(inner, opt.optimizer)
    losses, norms = [], []
    for step in range(start, STEPS):
        x = _micro(step, r)
        loss = model(input_ids=x, labels=x).loss
        acc.backward(loss)
        norms.append(float(acc.clip_grad_norm_(model.parameters(), MAX_NORM)))
        opt.step()
        opt.zero_grad()
        losses.append(_mean_loss(loss))
        if not resume and step + 1 == save_at:
            acc.save_state(state_dir)
            at_save = digest(inner, opt.optimizer)
    if save_dir is not None:
        inner.save_pretrained(save_dir)
    return losses, norms, plugin.swaps_done, at_save, at_load


def _check_trained(save_dir: str, want_state: dict) -> None:
    reloaded = AutoModelForCausalLM.from_pretrained(save_dir).state_dict()  # plain Transformers
    for name, want in want_state.items():
        assert _rel(reloaded[name], want) < 1e-5, (name, _rel(reloaded[name], want))


@pytest.fixture(scope="module")
def reference():
    return _reference()


def test_from_pretrained_fsdp2_with_ep_groups_equals_single_process(ranks, tmp_path, reference):
    folder, save_dir = str(tmp_path / "start"), str(tmp_path / "trained")
    build_model(tiny_qwen3_moe_config()).save_pretrained(folder)
    want_losses, want_norms, want_state = reference
    for rank, (losses, norms) in enumerate(ranks(W).run(_rank_from_pretrained, folder, save_dir)):
        assert _rel(losses, want_losses) < 1e-5, (rank, losses, want_losses)
        assert _rel(norms, want_norms) < 1e-5, (rank, norms, want_norms)
    _check_trained(save_dir, want_state)


def test_plugin_fsdp2_with_ep_groups_trains_and_resumes_exactly(ranks, tmp_path, reference):
    state_dir, save_dir = str(tmp_path / "state"), str(tmp_path / "trained")
    full = ranks(W).run(_rank_plugin, state_dir, save_dir, False)
    resumed = ranks(W).run(_rank_plugin, state_dir, None, True)
    want_losses, want_norms, want_state = reference
    for rank, ((losses, norms, swaps, at_save, _), (r_losses, r_norms, r_swaps, _, at_load)) in enumerate(
        zip(full, resumed)
    ):
        assert _rel(losses, want_losses) < 1e-5 and _rel(norms, want_norms) < 1e-5, (rank, norms, want_norms)
        assert swaps > 0, "no swap happened: the test would prove nothing"
        assert differences(at_load, at_save) == [], rank  # the state after load_state is the state saved
        assert r_losses == losses[2:] and r_norms == norms[2:] and r_swaps == swaps, rank
    _check_trained(save_dir, want_state)


def test_memory_plan_shards_dense_over_the_world_and_experts_over_the_group():
    """The planner's per-rank bytes for ep_size=2 on 4 ranks with fsdp2: dense / 4, experts / 2."""
    config = tiny_qwen3_moe_config()
    table = ParamTable.of(config)
    plan = memory_plan(config, W, dtype="fp32", dense_sharding="fsdp2", ep_size=EP)
    assert plan["dense_params_bytes"] == rank0_bytes(table.dense, W, True, 4)
    assert plan["expert_params_bytes"] == rank0_bytes(table.experts, EP, False, 4, experts=True)


def test_trainer_callback_fsdp2_with_ep_groups_equals_single_process(ranks, tmp_path):
    """HierMoECallback(ep_size=2, dense_sharding="fsdp2") under transformers.Trainer on 4 ranks, with swaps:
    test_trainer_callback's job and oracle (every row the same sequence, so any world size sees the same
    global batch): final logits and the last clip norm within 1e-5 relative."""
    import test_trainer_callback as tc

    kw = dict(dense_sharding="fsdp2", ep_size=EP, swap_interval=1, swap_policy="load", swap_pairs=2)
    results = ranks(W).run(tc.trainer_job, str(tmp_path), kw)
    ref, want_norm = tc.reference_model()
    with torch.no_grad():
        want = ref(tc._probe()).logits
    for rank, (logits, norm, metrics, _, _) in enumerate(results):
        assert tc._rel(logits, want) < 1e-5 and abs(norm / want_norm - 1) < 1e-5, (rank, norm, want_norm)
        assert metrics["hiermoe/swaps_done"] > 0
