"""Issue 12 items 3 and 7: ``trainer.train(resume_from_checkpoint=...)`` with HierMoECallback resumes
exactly (expert slices, their Adam moments, swapped placements, routing window), a checkpoint without
the per-rank files is refused, and the per-rank files load without unpickling code.

Every row of the training set is the same sequence, so each step sees the same global batch; the
oracle is the uninterrupted 2-rank run, itself checked against one process in test_trainer_callback."""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
from ep_oracle import SameRow, needs_cpu_trainer_resume, probe, rel

from hiermoe_hf.tiny_models import build_model, tiny_qwen3_moe_config

STEPS, SAVE_AT, PER_DEVICE, LR = 4, 2, 2, 1e-2


def trainer_job(output_dir, resume=None, seed=0):
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState
    from transformers import Trainer, TrainingArguments

    from hiermoe_hf.runtime.registry import moe_layers
    from hiermoe_hf.trainer import HierMoECallback

    os.environ.update(MASTER_ADDR="127.0.0.1", LOCAL_WORLD_SIZE=str(dist.get_world_size()))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    args = TrainingArguments(
        output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=PER_DEVICE, learning_rate=LR,
        max_grad_norm=0.1, optim="adamw_torch", lr_scheduler_type="linear", weight_decay=0.0,
        save_strategy="steps", save_steps=SAVE_AT, report_to="none", use_cpu=True, disable_tqdm=True,
        dataloader_drop_last=True, seed=0,
    )
    # "load" swaps whenever it evens the load: placements surely change on a toy model
    cb = HierMoECallback(topology="1x2", dispatch="a2a", swap_interval=1, swap_policy="load", swap_pairs=2)
    model = build_model(tiny_qwen3_moe_config(output_router_logits=False), seed=seed).train()
    trainer = Trainer(model=model, args=args, train_dataset=SameRow(), callbacks=[cb])
    try:
        trainer.train(resume_from_checkpoint=resume)
    except ValueError as err:
        return str(err)
    layers = moe_layers(trainer.model)
    placements = [layer.placement.phys_of_E.tolist() for _, layer in layers.values()]
    routing = [layer.routing.state_dict()["ids_NK"] for _, layer in layers.values()]
    with torch.no_grad():
        logits = trainer.model.eval()(probe()).logits
    return logits, placements, routing, cb.step, cb.swaps_done


@needs_cpu_trainer_resume
def test_trainer_resume_from_checkpoint_equals_the_uninterrupted_run(ranks):
    pool = ranks(2)
    with tempfile.TemporaryDirectory() as tmp:
        full = pool.run(trainer_job, os.path.join(tmp, "full"))
        ckpt = os.path.join(tmp, "full", f"checkpoint-{SAVE_AT}")
        assert sorted(f for f in os.listdir(ckpt) if f.startswith("hiermoe_rank")) == [
            "hiermoe_rank00000-of-00002.pt", "hiermoe_rank00001-of-00002.pt"]
        resumed = pool.run(trainer_job, os.path.join(tmp, "resumed"), ckpt, 7)  # other initial weights
        bare = os.path.join(tmp, "bare")
        shutil.copytree(ckpt, bare, ignore=shutil.ignore_patterns("hiermoe_rank*"))
        refused = pool.run(trainer_job, os.path.join(tmp, "refused"), bare, 7)
    assert len(full) == len(resumed) == len(refused) == 2
    for (logits, placements, routing, step, swaps), (r_logits, r_placements, r_routing, r_step, r_swaps) in zip(
        full, resumed
    ):
        assert swaps > 0 and any(p != sorted(p) for p in placements)  # swaps happened, before and after the save
        assert r_placements == placements and (r_step, r_swaps) == (step, swaps)
        assert all(torch.equal(a, b) for a, b in zip(r_routing, routing))
        assert rel(r_logits, logits) < 1e-5
    assert all("is missing" in msg and "hiermoe_rank" in msg for msg in refused)


def save_job(directory):
    from hiermoe_hf.checkpoint.rank_state import RankStateStore

    model = build_model(tiny_qwen3_moe_config())
    import hiermoe_hf

    hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology="1x2", dispatch="a2a"))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 256, (1, 4))).logits.sum().backward()
    opt.step()
    store = RankStateStore(model, opt)
    store.save(directory, {"step": 1})
    store.seal(directory)
    return store.begin_load(directory)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling this creates the marker file


def load_job(directory):
    import hiermoe_hf
    from hiermoe_hf.checkpoint.rank_state import RankStateStore

    model = build_model(tiny_qwen3_moe_config())
    hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology="1x2", dispatch="a2a"))
    try:
        RankStateStore(model).begin_load(directory)
    except ValueError as err:
        return str(err)
    return None


def test_rank_files_load_as_plain_data_and_never_unpickle_code(ranks):
    pool = ranks(2)
    with tempfile.TemporaryDirectory() as tmp:
        assert pool.run(save_job, tmp) == [{"step": 1}, {"step": 1}]
        for f in os.listdir(tmp):  # the format is plain data: weights_only loads it
            if f.startswith("hiermoe_rank"):
                assert torch.load(os.path.join(tmp, f), weights_only=True)["format"] == 2
        os.remove(os.path.join(tmp, "hiermoe_manifest.json"))  # a folder of format-1 files predates manifests
        marker = os.path.join(tmp, "code-ran")
        for r in range(2):
            path = os.path.join(tmp, f"hiermoe_rank{r:05d}-of-00002.pt")
            torch.save({"format": 1, "payload": _RunsCode(marker)}, path)
        msgs = pool.run(load_job, tmp)
        assert not os.path.exists(marker)
    assert all("convert_pickled" in m for m in msgs)
