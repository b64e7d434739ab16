"""Issue 12 item 4: with fp16 loss scaling, a non-finite gradient on one rank makes every rank skip
the step and lower the scale identically: a hand-written loop (``all_reduce_gradients``), the
Accelerate plugin and the Trainer callback. An inf is injected into rank 1's gradient at the first
step; the oracle is single-process Transformers that takes only the second step."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from ep_oracle import LR, TRAINER_ROW_LEN, SameRow, micro, probe, reference_run, rel, trainer_row

import hiermoe_hf
from hiermoe_hf.tiny_models import build_model, tiny_qwen3_moe_config

INIT_SCALE = 256.0


def _poison(model, where: str) -> None:
    """Put an inf into this rank's first expert gradient (rank-local) or a dense one (averaged later)."""
    from hiermoe_hf.runtime.expert_grads import expert_parameters

    p = expert_parameters(model)[0] if where == "expert" else model.get_output_embeddings().weight
    p.grad.view(-1)[3] = float("inf")


def hand_loop_job(where):
    import torch.distributed as dist

    W, r = dist.get_world_size(), dist.get_rank()
    model = build_model(tiny_qwen3_moe_config()).train()
    hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology=[1, W], dispatch="a2a"))
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    scales = []
    for step in range(2):
        x = micro(step, W, r)
        scaler.scale(model(input_ids=x, labels=x).loss).backward()
        if step == 0 and r == 1:
            _poison(model, where)
        hiermoe_hf.all_reduce_gradients(model)  # all such a loop needs before scaler.step
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        scales.append(scaler.get_scale())
    with torch.no_grad():
        return scales, model.eval()(probe()).logits


def plugin_job():
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from hiermoe_hf.accelerate import HierMoEPlugin

    W, r = dist.get_world_size(), dist.get_rank()
    os.environ.update(MASTER_ADDR="127.0.0.1", LOCAL_WORLD_SIZE=str(W))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)  # Accelerate makes none on CPU; a GPU run has one
    acc.log = lambda *a, **k: None
    model = build_model(tiny_qwen3_moe_config()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    plugin = HierMoEPlugin(topology=[1, W], dispatch="a2a")
    model, opt = plugin.prepare(acc, model, opt)
    skipped, scales = [], []
    for step in range(2):
        x = micro(step, W, r)
        acc.backward(model(input_ids=x, labels=x).loss)
        if step == 0 and r == 1:
            _poison(acc.unwrap_model(model), "expert")
        opt.step()
        opt.zero_grad()
        skipped.append(opt.step_was_skipped)
        scales.append(acc.scaler.get_scale())
    with torch.no_grad():
        logits = acc.unwrap_model(model).eval()(probe()).logits
    return scales, logits, skipped, plugin.step


def _reference_logits():
    ref = build_model(tiny_qwen3_moe_config()).train()
    reference_run(ref, 2, [1])  # step 0 skipped everywhere
    with torch.no_grad():
        return ref.eval()(probe()).logits


@pytest.mark.parametrize("where", ["expert", "dense"])
def test_hand_loop_grad_scaler_skips_on_every_rank(ranks, where):
    results = ranks(2).run(hand_loop_job, where)
    assert len(results) == 2  # a pool closed by an earlier timeout answers []
    want = _reference_logits()
    for scales, logits in results:
        assert scales == [INIT_SCALE / 2, INIT_SCALE / 2]
        assert rel(logits, want) < 1e-5


def test_plugin_grad_scaler_skips_on_every_rank_without_hanging(ranks):
    results = ranks(2).run(plugin_job, timeout=60)  # before issue 12: the step hook's collective hung
    assert len(results) == 2  # a pool closed by an earlier timeout answers []
    want = _reference_logits()
    for scales, logits, skipped, plugin_steps in results:
        assert scales == [INIT_SCALE / 2, INIT_SCALE / 2] and skipped == [True, False] and plugin_steps == 1
        assert rel(logits, want) < 1e-5


# ---- Trainer + HierMoECallback ----------------------------------------------------------------------------

TR_L, TR_B = TRAINER_ROW_LEN, 2




def trainer_job(output_dir):
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hiermoe_hf.trainer import HierMoECallback

    class Poison(TrainerCallback):  # runs before HierMoECallback's hook: the inf is there when it looks
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0 and dist.get_rank() == 1:
                _poison(model, "expert")

    os.environ.update(MASTER_ADDR="127.0.0.1", LOCAL_WORLD_SIZE=str(dist.get_world_size()))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    args = TrainingArguments(
        output_dir=output_dir, max_steps=2, per_device_train_batch_size=TR_B, learning_rate=LR, max_grad_norm=0.0,
        optim="adamw_torch", lr_scheduler_type="constant", weight_decay=0.0, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, dataloader_drop_last=True, seed=0,
    )
    model = build_model(tiny_qwen3_moe_config(output_router_logits=False)).train()
    cb = HierMoECallback(topology=[1, dist.get_world_size()], dispatch="a2a")
    trainer = Trainer(model=model, args=args, train_dataset=SameRow(), callbacks=[Poison(), cb])
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    trainer.train()
    with torch.no_grad():
        logits = trainer.model.eval()(probe()).logits
    return trainer.accelerator.scaler.get_scale(), logits, cb.step


def test_trainer_callback_grad_scaler_skips_on_every_rank(ranks):
    with tempfile.TemporaryDirectory() as tmp:
        results = ranks(2).run(trainer_job, tmp, timeout=120)
        assert len(results) == 2  # a pool closed by an earlier timeout answers []
    ref = build_model(tiny_qwen3_moe_config(output_router_logits=False)).train()
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.0)
    batch = trainer_row().expand(2 * TR_B, TR_L)
    ref(input_ids=batch, labels=batch).loss.backward()  # the one step that was taken
    opt.step()
    with torch.no_grad():
        want = ref.eval()(probe()).logits
    for scale, logits, steps in results:
        assert scale == INIT_SCALE / 2 and steps == 1
        # after AdamW steps: its first step turns ~4e-7 gradient noise into ~1e-5 (README, 'what holds')
        assert rel(logits, want) < 5e-5
