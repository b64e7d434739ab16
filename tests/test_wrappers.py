"""Issue 12 item 1 and 6: any DDP wrapper around a patched model is exact, repeated or mistaken
calls raise. Oracle: single-process unpatched Transformers on the global batch (tests/ep_oracle.py)."""

from __future__ import annotations

import os

import pytest
import torch
from ep_oracle import LR, TRAINER_ROW_LEN, SameRow, micro, probe, reference_run, rel, trainer_row

import hiermoe_hf
from hiermoe_hf.tiny_models import build_model, tiny_deepseek_v3_config, tiny_qwen3_moe_config

STEPS = 3


def _config(kind):
    return tiny_qwen3_moe_config() if kind == "qwen" else tiny_deepseek_v3_config()


def wrapped_job(kind, wrapper, also_all_reduce):
    """Patch, wrap by hand (plain DDP or Accelerate's prepare, no plugin), the usual PyTorch loop."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    W, r = dist.get_world_size(), dist.get_rank()
    model = build_model(_config(kind)).train()
    if wrapper == "none":  # experts frozen while patching, unfrozen afterwards: still scaled by 1/W
        for n, p in model.named_parameters():
            p.requires_grad_(".experts." not in n)
    hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology=[1, W], dispatch="a2a"))
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    if wrapper == "none":
        wrapped = model
    elif wrapper == "ddp":
        wrapped = DistributedDataParallel(model)
    else:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState

        os.environ.update(MASTER_ADDR="127.0.0.1", LOCAL_WORLD_SIZE=str(W))
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        acc = Accelerator(cpu=True)
        wrapped, opt = acc.prepare(model, opt)
    losses = []
    for step in range(STEPS):
        x = micro(step, W, r)
        loss = wrapped(input_ids=x, labels=x).loss
        loss.backward()
        if also_all_reduce:  # idempotent next to DDP: no double scaling of dense or expert grads
            hiermoe_hf.all_reduce_gradients(wrapped)
        opt.step()
        opt.zero_grad()
        t = torch.tensor([loss.item()])
        dist.all_reduce(t)
        losses.append(t.item() / W)
    model.eval()
    with torch.no_grad():
        logits = model(probe()).logits
    return losses, logits


@pytest.mark.parametrize(
    "kind,wrapper,also_all_reduce",
    [("qwen", "ddp", False), ("deepseek", "ddp", True), ("qwen", "accelerate", False), ("qwen", "none", True)],
    ids=["qwen-ddp", "deepseek-ddp+all_reduce_gradients", "qwen-accelerate-prepare", "qwen-unfrozen-after-patch"],
)
def test_hand_wrapped_ddp_trains_like_one_process(ranks, kind, wrapper, also_all_reduce):
    results = ranks(2).run(wrapped_job, kind, wrapper, also_all_reduce)
    assert len(results) == 2  # a pool closed by an earlier timeout answers []
    ref = build_model(_config(kind)).train()
    want_losses = reference_run(ref, 2, range(STEPS))
    with torch.no_grad():
        want = ref.eval()(probe()).logits
    for losses, logits in results:
        assert losses == pytest.approx(want_losses, rel=1e-5)
        assert rel(logits, want) < 1e-5


def refusal_job():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    W = dist.get_world_size()
    out = {}
    model = build_model(tiny_qwen3_moe_config())
    try:
        hiermoe_hf.patch(DistributedDataParallel(model))
    except ValueError as err:
        out["ddp_first"] = str(err)
    # issue 19 item 6: the model inside a live DDP, reached as ddp.module or through torch.compile(DDP(model))
    for name, wrap in (("ddp_module", lambda d: d.module), ("compiled_ddp", torch.compile)):
        ddp = DistributedDataParallel(build_model(tiny_qwen3_moe_config()))
        try:
            hiermoe_hf.patch(wrap(ddp), hiermoe_hf.HierMoEConfig(topology=[1, W], dispatch="a2a"))
            out[name] = "accepted"
        except ValueError as err:
            out[name] = str(err)
        del ddp
    # a custom router that returns an id outside [0, E) on every rank
    model = build_model(tiny_qwen3_moe_config())
    hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology=[1, W], dispatch="a2a"))
    for bad in (-1, 8):
        gate = model.model.layers[0].mlp.gate
        original = type(gate).forward

        def bad_router(self, x, bad=bad, original=original):
            logits, weights, ids = original(self, x)
            ids = ids.clone()
            ids[0, 0] = bad
            return logits, weights, ids

        gate.forward = bad_router.__get__(gate)
        try:
            model(torch.randint(0, 256, (1, 4)))
        except RuntimeError as err:
            out[f"id{bad}"] = str(err)
        del gate.forward
    return out


def test_wrong_wrapper_and_bad_expert_ids_raise(ranks):
    for out in ranks(2).run(refusal_job):
        for key in ("ddp_first", "ddp_module", "compiled_ddp"):
            assert "patch(model) first and wrap the patched model afterwards" in out.get(key, ""), (key, out)
        for bad in (-1, 8):
            assert "expert id outside [0, 8)" in out.get(f"id{bad}", ""), out


def fsdp1_after_patch_job(use_orig_params):
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = build_model(tiny_qwen3_moe_config())
    hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology=[1, dist.get_world_size()], dispatch="a2a"))
    wrapped = FullyShardedDataParallel(model, use_orig_params=use_orig_params, device_id=torch.device("cpu"))
    try:
        wrapped(torch.randint(0, 256, (1, 4)))
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.parametrize("use_orig_params", [False, True])
def test_fsdp1_wrapped_after_patch_is_refused_at_the_first_forward(ranks, use_orig_params):
    msgs = ranks(2).run(fsdp1_after_patch_job, use_orig_params)
    assert len(msgs) == 2 and all(m and "FullyShardedDataParallel (FSDP1)" in m for m in msgs), msgs


def stale_optimizer_job():
    import torch.distributed as dist

    from hiermoe_hf.checkpoint.rank_state import RankStateStore

    cfg = hiermoe_hf.HierMoEConfig(topology=[1, dist.get_world_size()], dispatch="a2a")
    model = hiermoe_hf.patch(build_model(tiny_qwen3_moe_config()), cfg)
    stale = torch.optim.AdamW(model.parameters())
    hiermoe_hf.unpatch(model)  # replaces the expert parameters: the optimizer still holds the old slices
    hiermoe_hf.patch(model, cfg)
    msgs = []
    for call in (lambda: hiermoe_hf.swap_experts(model, stale), lambda: RankStateStore(model, stale)):
        try:
            call()
        except ValueError as err:
            msgs.append(str(err))
    hiermoe_hf.swap_experts(model, torch.optim.AdamW(model.parameters()))  # a fresh optimizer is fine
    return msgs


def test_an_optimizer_from_before_unpatch_is_detected(ranks):
    for msgs in ranks(2).run(stale_optimizer_job):
        assert len(msgs) == 2 and all("does not hold" in m and "before unpatch" in m for m in msgs), msgs


def test_patch_again_with_another_config_raises_same_config_is_a_noop():
    model = build_model(tiny_qwen3_moe_config())
    cfg = hiermoe_hf.HierMoEConfig(dispatch="a2a")
    assert hiermoe_hf.patch(model, cfg) is model
    assert hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(dispatch="a2a")) is model  # equal config
    assert hiermoe_hf.patch(model) is model  # no config: keep the one it has
    with pytest.raises(ValueError, match="already patched with .*unpatch"):
        hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(dispatch="a2a", swap_interval=5))
    assert hiermoe_hf.patch(model, cfg) is model


# ---- transformers.Trainer without HierMoECallback ------------------------------------------------------------

TR_L, TR_B, TR_STEPS = TRAINER_ROW_LEN, 2, 3




def trainer_without_callback_job(output_dir, args_kw):
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState
    from transformers import Trainer, TrainingArguments

    W = dist.get_world_size()
    os.environ.update(MASTER_ADDR="127.0.0.1", LOCAL_WORLD_SIZE=str(W))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    args = TrainingArguments(
        output_dir=output_dir, max_steps=TR_STEPS, per_device_train_batch_size=TR_B, learning_rate=LR,
        optim="adamw_torch", lr_scheduler_type="constant", weight_decay=0.0, report_to="none", use_cpu=True,
        disable_tqdm=True, dataloader_drop_last=True, seed=0, **args_kw,
    )
    model = build_model(tiny_qwen3_moe_config(output_router_logits=False)).train()
    hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology=[1, W], dispatch="a2a"))
    trainer = Trainer(model=model, args=args, train_dataset=SameRow())
    try:
        trainer.train()
    except ValueError as err:
        return str(err)
    with torch.no_grad():
        return model.eval()(probe()).logits


def test_trainer_without_callback_is_exact_or_refused(ranks):
    import tempfile

    pool = ranks(2)
    with tempfile.TemporaryDirectory() as tmp:
        exact = pool.run(trainer_without_callback_job, tmp, dict(max_grad_norm=0.0, save_strategy="no"))
        refused = pool.run(trainer_without_callback_job, tmp, {})  # Trainer defaults: clip at 1.0, save
    assert len(exact) == len(refused) == 2
    ref = build_model(tiny_qwen3_moe_config(output_router_logits=False)).train()
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.0)
    batch = trainer_row().expand(2 * TR_B, TR_L)
    for _ in range(TR_STEPS):
        ref(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        want = ref.eval()(probe()).logits
    for logits in exact:
        # after AdamW steps: its first step turns ~4e-7 gradient noise into ~1e-5 (README, 'what holds')
        assert rel(logits, want) < 5e-5
    for msg in refused:
        assert "without HierMoECallback" in msg and "max_grad_norm=1.0" in msg and "save runs on rank 0" in msg, msg
