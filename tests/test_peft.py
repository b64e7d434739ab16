"""Issue 12 items 2 and 6: PEFT LoRA on a patched model, in either order (``patch`` then
``get_peft_model``, or the reverse), under plain DDP: exact training against single-process PEFT on
the global batch, PEFT's own ``save_pretrained`` writes the adapter, ``merge_and_unload`` then the
collective save gives the full model, an expert swap in between changes nothing; LoRA on the
routed experts (``target_parameters``) is refused."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from ep_oracle import (
    LR,
    TRAINER_ROW_LEN,
    SameRow,
    micro,
    needs_cpu_trainer_resume,
    probe,
    reference_run,
    rel,
    trainer_row,
)

import hiermoe_hf
from hiermoe_hf.tiny_models import build_model, tiny_qwen3_moe_config

peft = pytest.importorskip("peft")
STEPS = 3


def _lora(**kw):
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **kw)


def _peft_model(order: str, world: int):
    """Seeded identically everywhere, so every rank and the oracle start from the same LoRA weights."""
    model = build_model(tiny_qwen3_moe_config()).train()
    cfg = hiermoe_hf.HierMoEConfig(topology=[1, world], dispatch="a2a")
    if order == "patch-first":
        hiermoe_hf.patch(model, cfg)
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, _lora())
    if order == "peft-first":
        assert hiermoe_hf.patch(pm, cfg) is pm
    return pm


def peft_job(order, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from hiermoe_hf.runtime.registry import moe_layers
    from hiermoe_hf.swap.executor import execute_swaps

    W, r = dist.get_world_size(), dist.get_rank()
    pm = _peft_model(order, W)
    ddp = DistributedDataParallel(pm)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        x = micro(step, W, r)
        ddp(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 0:  # a swap moves expert slices across ranks and never changes the function
            execute_swaps(pm, [(name, 0, 7) for name in moe_layers(pm)], opt)
    pm.eval()
    with torch.no_grad():
        logits = pm(probe()).logits
    if r == 0:  # PEFT's save, as a user calls it: the adapter, from the main process
        pm.save_pretrained(os.path.join(out_dir, "adapter"))
    dist.barrier()
    merged = pm.merge_and_unload()
    merged.save_pretrained(os.path.join(out_dir, "merged"))  # the patched model's collective full save
    return logits, [layer.placement.phys_of_E.tolist() for _, layer in moe_layers(merged).values()]


def _reference():
    pm = _peft_model("unpatched", 1)
    reference_run(pm, 2, range(STEPS))
    pm.eval()
    with torch.no_grad():
        logits = pm(probe()).logits
    return pm, logits


@pytest.mark.parametrize("order", ["patch-first", "peft-first"])
def test_lora_under_ddp_trains_saves_and_merges_like_one_process(ranks, order):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    ref, want = _reference()
    with tempfile.TemporaryDirectory() as tmp:
        results = ranks(2).run(peft_job, order, tmp)
        assert len(results) == 2  # a pool closed by an earlier timeout answers []
        adapter = load_file(os.path.join(tmp, "adapter", "adapter_model.safetensors"))
        merged = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "merged")).eval()
    for logits, placements in results:
        assert rel(logits, want) < 1e-5
        assert all(p[0] == 7 and p[7] == 0 for p in placements)  # the swap happened
    want_adapter = peft.get_peft_model_state_dict(ref)
    assert set(adapter) == set(want_adapter) and adapter
    for key, value in want_adapter.items():
        assert rel(adapter[key], value) < 1e-5, key
    with torch.no_grad():
        assert rel(merged(probe()).logits, ref.merge_and_unload()(probe()).logits) < 1e-5


def expert_lora_job():
    import torch.distributed as dist

    W = dist.get_world_size()
    cfg = hiermoe_hf.HierMoEConfig(topology=[1, W], dispatch="a2a")
    lora = _lora(target_modules=[], target_parameters=["mlp.experts.gate_up_proj"])
    msgs = []
    pm = peft.get_peft_model(build_model(tiny_qwen3_moe_config()), lora)
    try:
        hiermoe_hf.patch(pm, cfg)
    except ValueError as err:
        msgs.append(str(err))
    model = hiermoe_hf.patch(build_model(tiny_qwen3_moe_config()), cfg)
    pm = peft.get_peft_model(model, lora)
    try:
        pm(torch.randint(0, 256, (1, 4)))
    except ValueError as err:
        msgs.append(str(err))
    return msgs


def test_lora_on_routed_experts_is_refused_in_either_order(ranks):
    for msgs in ranks(2).run(expert_lora_job):
        assert len(msgs) == 2 and all("target_parameters" in m and "target_modules" in m for m in msgs), msgs


# ---- Trainer + HierMoECallback on a PeftModel ----------------------------------------------------------------

TR_STEPS, TR_B, TR_L = 3, 2, TRAINER_ROW_LEN




def _trainer_peft(lora_seed: int):
    model = build_model(tiny_qwen3_moe_config(output_router_logits=False)).train()
    torch.manual_seed(lora_seed)
    return peft.get_peft_model(model, _lora())


def peft_trainer_job(output_dir, resume=None):
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState
    from transformers import Trainer, TrainingArguments

    from hiermoe_hf.runtime.registry import moe_layers
    from hiermoe_hf.trainer import HierMoECallback

    os.environ.update(MASTER_ADDR="127.0.0.1", LOCAL_WORLD_SIZE=str(dist.get_world_size()))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    args = TrainingArguments(
        output_dir=output_dir, max_steps=TR_STEPS, per_device_train_batch_size=TR_B, learning_rate=LR,
        max_grad_norm=0.0, optim="adamw_torch", lr_scheduler_type="constant", weight_decay=0.0,
        save_strategy="steps", save_steps=1, report_to="none", use_cpu=True, disable_tqdm=True,
        dataloader_drop_last=True, seed=0,
    )
    cb = HierMoECallback(topology="1x2", dispatch="a2a", swap_interval=1, swap_policy="load", swap_pairs=2)
    pm = _trainer_peft(lora_seed=1 if resume is None else 5)  # a resumed run gets its LoRA weights from disk
    trainer = Trainer(model=pm, args=args, train_dataset=SameRow(), callbacks=[cb])
    trainer.train(resume_from_checkpoint=resume)
    with torch.no_grad():
        logits = trainer.model.eval()(probe()).logits
    placements = [layer.placement.phys_of_E.tolist() for _, layer in moe_layers(trainer.model).values()]
    return logits, placements, sorted(os.listdir(os.path.join(output_dir, f"checkpoint-{TR_STEPS}")))


@needs_cpu_trainer_resume
def test_trainer_callback_on_a_peft_model_trains_saves_adapters_and_resumes(ranks):
    with tempfile.TemporaryDirectory() as tmp:
        full = ranks(2).run(peft_trainer_job, os.path.join(tmp, "full"))
        ckpt = os.path.join(tmp, "full", "checkpoint-1")
        resumed = ranks(2).run(peft_trainer_job, os.path.join(tmp, "resumed"), ckpt)
    assert len(full) == len(resumed) == 2
    ref = _trainer_peft(lora_seed=1)
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    batch = trainer_row().expand(2 * TR_B, TR_L)
    for _ in range(TR_STEPS):
        ref(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        want = ref.eval()(probe()).logits
    for (logits, placements, files), (r_logits, r_placements, _) in zip(full, resumed):
        assert "adapter_model.safetensors" in files and "hiermoe_rank00001-of-00002.pt" in files, files
        assert "model.safetensors" not in files  # PEFT's save: the adapter, not the full model
        assert any(p != sorted(p) for p in placements) and r_placements == placements
        assert rel(logits, want) < 1e-5
        assert rel(r_logits, logits) < 1e-5
