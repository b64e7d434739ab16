"""The README's main command and the examples, run as real launches (subprocesses).

- ``scripts/run_finetune.sh`` (the README's first command, minus the environment setup that the
  test run already has) must really start 4 ranks through ``accelerate launch``, train 3 steps on
  the emulated 2x2 topology and leave a checkpoint that plain ``from_pretrained`` loads.
- ``examples/trainer_finetune.py`` on 2 processes: 3 steps, checkpoint reloads.
- ``examples/finetune.py --dense-sharding fsdp2 --gradient-checkpointing --mixed-precision bf16`` on 2
  processes: 3 steps (the first has learning rate 0: warm-up), bf16 rows, checkpoint reloads trained.
- A ``--model`` that cannot be loaded (no network) fails fast with a clear message.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hiermoe_hf.tiny_models import build_model, qwen3_30b_a3b_mini_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)


def _env(tmp_path) -> dict:
    env = dict(os.environ)
    env.update(
        HIERMOE_SKIP_SETUP="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"), PATH=VENV_BIN + os.pathsep + env.get("PATH", ""),
    )
    for var in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "HIERMOE_TOPOLOGY", "HIERMOE_DISPATCH", "HIERMOE_SWAP_INTERVAL"):
        env.pop(var, None)
    return env


def _run(cmd: list[str], env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


def _assert_trained_checkpoint(path: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(path).eval()  # plain Transformers, one process
    init = build_model(qwen3_30b_a3b_mini_config())
    assert model.config.num_experts == init.config.num_experts
    trained, fresh = dict(model.named_parameters()), dict(init.named_parameters())
    for name, p in fresh.items():
        if name.endswith("experts.gate_up_proj"):
            # every expert (so every rank's shard) is present, in logical order, and was trained
            per_expert_change = (trained[name] - p).flatten(1).abs().amax(1)
            assert (per_expert_change > 0).all(), f"{name}: experts {per_expert_change.eq(0).nonzero().flatten()}"
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("def main():\n    return 0", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and loss < 6.0  # below a uniform guess over 256 bytes (ln 256 = 5.55) + margin


def test_readme_main_command_starts_4_ranks_and_its_checkpoint_reloads(tmp_path):
    out = tmp_path / "finetune"
    cmd = ["bash", "scripts/run_finetune.sh", "--max-steps", "3", "--output-dir", str(out)]
    proc = _run(cmd, _env(tmp_path))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    started = sorted(set(re.findall(r"\[hiermoe\] rank (\d+)/(\d+) pid (\d+)", log)))
    assert [(r, w) for r, w, _ in started] == [("0", "4"), ("1", "4"), ("2", "4"), ("3", "4")], log[-3000:]
    assert len({pid for _, _, pid in started}) == 4, "4 ranks must be 4 processes"
    assert "world size 4, topology 2x2" in log
    assert "HierMoE fine-tune summary" in log and "inter-node dispatch bytes" in log
    summary = json.loads((out / "hiermoe_summary.json").read_text())
    assert summary["steps"] == 3 and summary["world_size"] == 4 and summary["backend"] == "gloo"
    assert summary["a2a_inter_node_bytes"] >= summary["inter_node_bytes"] > 0
    _assert_trained_checkpoint(str(out))


def test_trainer_example_on_2_processes(tmp_path):
    out = tmp_path / "trainer"
    cmd = [os.path.join(VENV_BIN, "accelerate"), "launch", "--config_file",
           "examples/accelerate_configs/cpu_4proc.yaml", "--num_processes", "2",
           "examples/trainer_finetune.py", "--max-steps", "3", "--output-dir", str(out)]
    proc = _run(cmd, _env(tmp_path))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert len(set(re.findall(r"\[hiermoe\] rank (\d)/2", log))) == 2, log[-3000:]
    assert (out / "checkpoint-3" / "trainer_state.json").exists()
    _assert_trained_checkpoint(str(out / "checkpoint-3"))
    _assert_trained_checkpoint(str(out))


@pytest.mark.parametrize("model", ["Qwen/Qwen3-30B-A3B", "/nonexistent/checkpoint"])
def test_a_model_that_cannot_be_loaded_fails_fast_and_clearly(tmp_path, model):
    cmd = [sys.executable, "examples/finetune.py", "--model", model, "--max-steps", "1",
           "--output-dir", str(tmp_path / "out")]
    proc = _run(cmd, _env(tmp_path), timeout=120)
    assert proc.returncode != 0
    assert f"cannot load --model {model!r}" in proc.stderr, proc.stderr[-3000:]


def test_finetune_with_fsdp2_checkpointing_and_bf16_on_2_processes(tmp_path):
    out = tmp_path / "fsdp2"
    cmd = [os.path.join(VENV_BIN, "accelerate"), "launch", "--config_file",
           "examples/accelerate_configs/cpu_4proc.yaml", "--num_processes", "2",
           "examples/finetune.py", "--max-steps", "3", "--output-dir", str(out), "--topology", "2x1",
           "--dense-sharding", "fsdp2", "--gradient-checkpointing", "--mixed-precision", "bf16"]
    proc = _run(cmd, _env(tmp_path))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "dense fsdp2, checkpointing True, precision bf16" in log
    summary = json.loads((out / "hiermoe_summary.json").read_text())
    assert summary["steps"] == 3 and summary["dense_sharding"] == "fsdp2" and summary["mixed_precision"] == "bf16"
    hidden = qwen3_30b_a3b_mini_config().hidden_size
    assert summary["bytes_per_row"] == [hidden * 2]  # bf16 rows on the wire
    _assert_trained_checkpoint(str(out))


def test_finetune_takes_another_family_from_a_local_folder(tmp_path):
    """``--model`` is any MoE family (issue 17): a plain Transformers save of a tiny OLMoE (no tokenizer
    files: Transformers 5.24 then hands back an empty tokenizer, which must not be used) fine-tunes on
    2 processes through ``hiermoe_hf.from_pretrained``, and its checkpoint reloads in plain Transformers."""
    from hiermoe_hf.tiny_families import build_family_model, tiny_family_config

    folder, out = tmp_path / "olmoe", tmp_path / "out"
    build_family_model(tiny_family_config("olmoe"), seed=1).save_pretrained(folder)
    cmd = [os.path.join(VENV_BIN, "accelerate"), "launch", "--config_file",
           "examples/accelerate_configs/cpu_4proc.yaml", "--num_processes", "2",
           "examples/finetune.py", "--model", str(folder), "--max-steps", "2", "--output-dir", str(out),
           "--topology", "2x1"]
    proc = _run(cmd, _env(tmp_path))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "has no tokenizer; using the byte-level one" in log
    summary = json.loads((out / "hiermoe_summary.json").read_text())
    assert summary["steps"] == 2 and summary["model"] == str(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(reloaded).__name__ == "OlmoeForCausalLM"
