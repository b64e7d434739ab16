"""What a Trainer user sees under HierMoECallback on 4 forked CPU/gloo ranks (2x2), issue 20:
the logged ``grad_norm`` is the global norm, the ``hiermoe/*`` metrics reach ``log_history``,
``trainer_state.json`` and the integrations, and training only the routed experts (or them and a
few dense parameters) works and is exact.

Every row of the training set is the same sequence (``SameRow``), so every step sees the same
global batch whatever the sampler does; the oracle is the unpatched model in one process on that
batch (AdamW, the Trainer's linear schedule, ``clip_grad_norm_`` with the same ``max_grad_norm``).
An integration is emulated by a callback placed before HierMoECallback: the Trainer puts its
``report_to`` callbacks before the user's, so they see the logs before any user ``on_log``.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
from ep_oracle import TRAINER_ROW_LEN, SameRow, rel, trainer_row
from transformers import get_linear_schedule_with_warmup

from hiermoe_hf.tiny_models import build_model, tiny_qwen3_moe_config

W, STEPS, PER_DEVICE, LR = 4, 3, 1, 1e-2
EXPERT_KEY = "mlp.experts."  # Qwen3-MoE's routed experts (gate_up_proj, down_proj)
DENSE_TOO = "model.norm.weight"  # "experts + a few dense parameters"


def _model():
    # No aux loss: per-rank aux terms are not what single-process training computes (test_trainer_callback).
    return build_model(tiny_qwen3_moe_config(output_router_logits=False)).train()


def _freeze(model, trainable: str) -> None:
    """trainable: "all", "experts" (only the routed experts) or "experts+norm"."""
    for name, p in model.named_parameters():
        dense_too = trainable == "experts+norm" and name == DENSE_TOO
        p.requires_grad = trainable == "all" or EXPERT_KEY in name or dense_too


def _probe() -> torch.Tensor:
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(9))


def trainer_job(output_dir, trainable, max_grad_norm):
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hiermoe_hf.trainer import HierMoECallback

    class Integration(TrainerCallback):  # what a report_to integration receives
        def __init__(self):
            self.seen = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.seen.append(dict(logs))

    os.environ.update(MASTER_ADDR="127.0.0.1", LOCAL_WORLD_SIZE=str(dist.get_world_size()))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    args = TrainingArguments(
        output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=PER_DEVICE, learning_rate=LR,
        max_grad_norm=max_grad_norm, optim="adamw_torch", lr_scheduler_type="linear", weight_decay=0.0,
        save_strategy="steps", save_steps=STEPS, logging_steps=1, report_to=[], use_cpu=True,
        disable_tqdm=True, dataloader_drop_last=True, seed=0,
    )
    model = _model()
    _freeze(model, trainable)
    integration = Integration()
    callback = HierMoECallback(topology="2x2", dispatch="hd2")
    trainer = Trainer(model=model, args=args, train_dataset=SameRow(), callbacks=[integration, callback])
    trainer.train()
    with torch.no_grad():
        logits = trainer.model.eval()(_probe()).logits
    saved = None
    if dist.get_rank() == 0:
        with open(os.path.join(output_dir, f"checkpoint-{STEPS}", "trainer_state.json")) as f:
            saved = json.load(f)["log_history"]
    return logits, trainer.state.log_history, integration.seen, saved, args.max_grad_norm


def reference(trainable, max_grad_norm):
    """(logits after STEPS steps, per-step losses, per-step pre-clip global grad norms): one process."""
    model = _model()
    _freeze(model, trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, 0, STEPS)
    batch = trainer_row().expand(W * PER_DEVICE, TRAINER_ROW_LEN)
    losses, norms = [], []
    for _ in range(STEPS):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))))
        losses.append(loss.item())
        opt.step()
        sched.step()
        opt.zero_grad()
    with torch.no_grad():
        return model.eval()(_probe()).logits, losses, norms


@pytest.mark.parametrize(
    "trainable,max_grad_norm",
    [("all", 0.1), ("experts", 0.0), ("experts+norm", 0.05)],
    ids=["full-clip", "experts-only-no-clip", "experts-and-norm-clip"],
)
def test_trainer_logs_the_global_grad_norm_and_the_metrics_and_trains_exactly(ranks, trainable, max_grad_norm):
    with tempfile.TemporaryDirectory() as tmp:
        results = ranks(W).run(trainer_job, tmp, trainable, max_grad_norm)
    want_logits, want_losses, want_norms = reference(trainable, max_grad_norm)
    logits, history, seen, saved, trainer_clip = results[0]
    train_logs = [h for h in history if "loss" in h]
    assert [h["step"] for h in train_logs] == list(range(1, STEPS + 1))
    # The logged norm is the single-process (global) one, not rank 0's part of it.
    assert [h["grad_norm"] for h in train_logs] == pytest.approx(want_norms, rel=1e-5)
    assert [h["loss"] for h in train_logs] == pytest.approx(want_losses, rel=1e-5)
    if max_grad_norm:
        assert all(n > max_grad_norm for n in want_norms)  # clipping was active: the global norm mattered
    assert rel(logits, want_logits) < 1e-5, "trained model differs from single-process training"
    for r in range(1, W):
        assert torch.equal(results[r][0], logits)
    # The metrics are in what the Trainer records (log_history, trainer_state.json) and reports.
    for step, (h, s) in enumerate(zip(train_logs, [x for x in seen if "loss" in x]), start=1):
        assert h["hiermoe/step"] == step and h["hiermoe/strategy/hd2"] > 0 and h["hiermoe/inter_node_bytes"] > 0
        assert {k: v for k, v in s.items() if k.startswith("hiermoe/")} == {
            k: v for k, v in h.items() if k.startswith("hiermoe/")
        }
        assert s["grad_norm"] == h["grad_norm"]
    assert trainer_clip == max_grad_norm  # the user's setting is left as given (the Trainer clips, globally)
    assert saved == train_logs  # the checkpoint at the last step: everything logged before the end-of-run summary
