"""examples/sft_finetune.py (TRL SFTTrainer + SFTConfig + HierMoECallback) on 4 forked CPU/gloo
ranks (2x2) against the same SFTTrainer under plain DDP (the unpatched model, the Trainer's own DDP
and clip): the logged losses and grad norms agree, and the HierMoE metrics are in the logs. The data
are padded batches of standard-library docstrings through the byte tokenizer (eos/pad = byte 0)."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("trl", reason="TRL is an optional dependency (pip install -e '.[trl]' or '.[dev]')")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
W, STEPS, MAX_NORM = 4, 3, 0.5


def sft_job(output_dir, hiermoe: bool):
    import datasets
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState

    from hiermoe_hf.tiny_data import builtin_corpus, byte_tokenizer
    from hiermoe_hf.tiny_models import build_model, tiny_qwen3_moe_config
    from hiermoe_hf.trainer import HierMoECallback

    sys.path.insert(0, EXAMPLES)
    import sft_finetune

    os.environ.update(MASTER_ADDR="127.0.0.1", LOCAL_WORLD_SIZE=str(dist.get_world_size()))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    args = sft_finetune.parse_args(["--output-dir", output_dir, "--max-steps", str(STEPS), "--batch-size", "2",
                                    "--seq-len", "48", "--max-grad-norm", str(MAX_NORM), "--lr", "1e-2"])
    # No aux loss: a per-rank aux term is not what single-process training computes (test_trainer_callback).
    # bf16=False: TRL's SFTConfig defaults to bf16, i.e. CPU autocast here; the exactness claim is fp32's
    # (under bf16 both runs differ from each other by bf16 summation order, ~1e-4, docs/mixed_precision.md).
    config = sft_finetune.sft_config(args, logging_steps=1, save_strategy="no", report_to=[], bf16=False,
                                     lr_scheduler_type="linear", warmup_steps=0, router_aux_loss_coef=0.0)
    model = build_model(tiny_qwen3_moe_config(output_router_logits=False)).train()
    dataset = datasets.Dataset.from_dict({"text": builtin_corpus()[:64]})
    callback = HierMoECallback(topology="2x2", dispatch="hd2") if hiermoe else None
    trainer = sft_finetune.build_trainer(model, byte_tokenizer(), dataset, config, callback)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, (callback.last_grad_norm if callback is not None else None)


@pytest.fixture(scope="module")
def runs(ranks, tmp_path_factory):
    """(HierMoE run, plain DDP run): rank 0's training logs and the callback's last global norm."""
    pool = ranks(W)
    tmp = tmp_path_factory.mktemp("sft")
    return pool.run(sft_job, str(tmp / "hiermoe"), True)[0], pool.run(sft_job, str(tmp / "ddp"), False)[0]


def test_sft_trainer_logs_the_hiermoe_metrics_and_the_global_grad_norm(runs):
    (got, last_norm), (want, _) = runs
    assert [h["step"] for h in got] == [h["step"] for h in want] == list(range(1, STEPS + 1))
    for h in got:
        assert h["hiermoe/step"] == h["step"] and h["hiermoe/strategy/hd2"] > 0 and h["hiermoe/tokens"] > 0
    assert not any(k.startswith("hiermoe/") for h in want for k in h)
    assert got[-1]["grad_norm"] == pytest.approx(last_norm, rel=1e-6)  # what the clip used: the global norm


def test_sft_trainer_losses_and_grad_norms_equal_plain_ddp(runs):
    (got, _), (want, _) = runs
    assert [h["loss"] for h in got] == pytest.approx([h["loss"] for h in want], rel=1e-5)
    assert [h["grad_norm"] for h in got] == pytest.approx([h["grad_norm"] for h in want], rel=1e-5)
    assert any(h["grad_norm"] > MAX_NORM for h in want)  # clipping was active: the norm changed the step


def test_byte_tokenizer_has_eos_and_pad_within_256_ids():
    from hiermoe_hf.tiny_data import byte_tokenizer

    tok = byte_tokenizer()
    text = "A docstring, with bytes \u00e9 and \u2603.\n\n"
    assert len(tok) == 256 and tok.eos_token_id == tok.pad_token_id == 0  # NUL: never in text
    assert tok(text, add_special_tokens=False)["input_ids"] == list(text.encode())  # ids are still the bytes
