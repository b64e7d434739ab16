"""Resume folders (issue 19, items 2, 3, 4 and 7's auto choice): files that do not belong together,
crash-safe ``save_state``, corrupt files, and ``dispatch="auto"``'s choice kept across a resume.

Every save gets an id that its rank files carry, and a manifest (size and SHA-256 of every file,
written last). Each case below is a folder that loaded silently (or with a bare ``KeyError`` / zip
error) before: it must be refused on every rank at once, with an error naming the file and what is
wrong, and nothing of another world size may be read. The crash case: a ``save_state`` that dies while
Accelerate writes the optimizer must leave the previous checkpoint loadable, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import torch.distributed as dist
from accelerate_state import differences, digest, fresh_accelerator

import hiermoe_hf
from hiermoe_hf.checkpoint import manifest, rank_state
from hiermoe_hf.checkpoint.rank_state import RankStateStore, rank_file
from hiermoe_hf.runtime.registry import runtime_of
from hiermoe_hf.tiny_models import build_model, tiny_qwen3_moe_config

W = 2


def _trained(steps: int, cfg=None):
    """A patched tiny model (topology 1x2), AdamW, ``steps`` steps on fixed data."""
    model = build_model(tiny_qwen3_moe_config()).train()
    hiermoe_hf.patch(model, cfg or hiermoe_hf.HierMoEConfig(topology="1x2", dispatch="a2a"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(10 * step + dist.get_rank()))
        model(ids, labels=ids).loss.backward()
        hiermoe_hf.all_reduce_gradients(model)
        opt.step()
        opt.zero_grad()
    return model, opt


def save_job(directory: str, steps: int) -> str:
    model, opt = _trained(steps)
    store = RankStateStore(model, opt)
    path = store.save(directory, {"step": steps})
    store.seal(directory)
    return path


def load_job(directory: str):
    """begin_load on a fresh model: 'loaded', or the error; and how many rank files were read."""
    model, opt = _trained(0)
    reads = []
    original = rank_state.read_rank_file
    rank_state.read_rank_file = lambda path: reads.append(os.path.basename(path)) or original(path)
    try:
        RankStateStore(model, opt).begin_load(directory)
        return "loaded", reads
    except ValueError as err:
        return str(err), reads
    finally:
        rank_state.read_rank_file = original


def _reseal(directory: str, name: str) -> None:
    """Make the manifest agree with the file as it now is (to reach the checks behind the checksum)."""
    path = os.path.join(directory, manifest.MANIFEST)
    with open(path) as f:
        body = json.load(f)
    body["files"][name] = manifest.file_entry(os.path.join(directory, name))
    with open(path, "w") as f:
        json.dump(body, f)


def _refused_everywhere(results, *needles):
    for rank, (msg, _) in enumerate(results):
        assert msg != "loaded", (rank, "the folder loaded")
        for needle in needles:
            assert needle in msg, (rank, needle, msg)


R0, R1 = (os.path.basename(rank_file("", r, W)) for r in range(W))


def test_rank_files_that_do_not_belong_together_are_refused(ranks, tmp_path):
    pool = ranks(W)
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    pool.run(save_job, old, 1)
    pool.run(save_job, new, 2)
    assert [m for m, _ in pool.run(load_job, new)] == ["loaded", "loaded"]

    # Rank 1's file from an older save next to rank 0's newer one.
    mixed = str(tmp_path / "mixed")
    shutil.copytree(new, mixed)
    shutil.copy(os.path.join(old, R1), os.path.join(mixed, R1))
    _refused_everywhere(pool.run(load_job, mixed), R1, "belongs to another save")
    _reseal(mixed, R1)  # even with a manifest that vouches for the file: its save id differs
    _refused_everywhere(pool.run(load_job, mixed), R1, "save_id=")

    # Rank files renamed into each other's slots.
    swapped = str(tmp_path / "swapped")
    shutil.copytree(new, swapped)
    os.rename(os.path.join(swapped, R0), os.path.join(swapped, "tmp"))
    os.rename(os.path.join(swapped, R1), os.path.join(swapped, R0))
    os.rename(os.path.join(swapped, "tmp"), os.path.join(swapped, R1))
    _refused_everywhere(pool.run(load_job, swapped), R0)
    _reseal(swapped, R0)
    _reseal(swapped, R1)
    results = pool.run(load_job, swapped)
    _refused_everywhere(results, "rank=1", "rank=0")  # each rank names the file it holds in the wrong slot

    # A reused folder: stale 2-rank files under a newer 1-rank save; a 2-rank resume reads none of them.
    stale = str(tmp_path / "stale")
    shutil.copytree(new, stale)
    os.remove(os.path.join(stale, manifest.MANIFEST))
    model = hiermoe_hf.patch(build_model(tiny_qwen3_moe_config()), hiermoe_hf.HierMoEConfig(dispatch="a2a"))
    store = RankStateStore(model)  # this (parent) process: world size 1
    store.save(stale)
    store.seal(stale)
    results = pool.run(load_job, stale)
    _refused_everywhere(results, "saved by 1 ranks but this run has 2")
    assert all(reads == [] for _, reads in results)


def corrupt_job(directory: str, how: str):
    """On rank 0 only (a file system edit): corrupt rank 1's file; then every rank loads."""
    path = os.path.join(directory, R1)
    if dist.get_rank() == 0:
        payload = torch.load(path, weights_only=True)
        if how == "flip":  # one byte in the middle of an expert slice's data
            tensor = next(iter(next(iter(payload["layers"].values()))["params"].values())).contiguous()
            data = bytes(tensor.view(torch.uint8).flatten().tolist())
            with open(path, "rb") as f:
                raw = bytearray(f.read())
            at = raw.find(data) + len(data) // 2
            assert at > len(data) // 2
            raw[at] ^= 0x40
            with open(path, "wb") as f:
                f.write(raw)
        elif how == "fields":
            del payload["world_size"]
            torch.save(payload, path)
            _reseal(directory, R1)
        elif how.startswith("truncate"):
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                f.truncate(size // 2)
            if how == "truncate-resealed":
                _reseal(directory, R1)
    dist.barrier()
    return load_job(directory)


def test_corrupt_rank_files_are_refused_naming_the_file_and_the_problem(ranks, tmp_path):
    pool = ranks(W)
    good = str(tmp_path / "good")
    pool.run(save_job, good, 1)
    cases = {
        "flip": "differs from what save",
        "fields": "lacks the fields world_size",
        "truncate": "truncated",
        "truncate-resealed": "cannot be read as a HierMoE rank file: it is truncated or corrupt",
    }
    for how, needle in cases.items():
        folder = str(tmp_path / how)
        shutil.copytree(good, folder)
        _refused_everywhere(pool.run(corrupt_job, folder, how), R1, needle)


def _plugin(seed: int):
    from hiermoe_hf.accelerate import HierMoEPlugin

    acc = fresh_accelerator()
    model = build_model(tiny_qwen3_moe_config(), seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    plugin = HierMoEPlugin(topology="1x2", dispatch="a2a", swap_interval=1, swap_policy="load", swap_pairs=2)
    model, opt = plugin.prepare(acc, model, opt)
    return acc, plugin, model, opt


def _step(acc, model, opt, step: int) -> None:
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(100 * step + dist.get_rank()))
    acc.backward(model(ids, labels=ids).loss)
    opt.step()
    opt.zero_grad()


def crash_job(state_dir: str):
    """save_state (good) at step 2; at step 3 a save into the same folder dies writing the optimizer."""
    import accelerate.checkpointing as ckpt

    acc, plugin, model, opt = _plugin(0)
    for step in range(2):
        _step(acc, model, opt, step)
    acc.save_state(state_dir)
    good = digest(acc.unwrap_model(model), opt.optimizer)
    _step(acc, model, opt, 2)
    original = ckpt.save

    def dying_save(obj, path, *args, **kwargs):
        if "optimizer" in os.path.basename(str(path)):
            raise KeyboardInterrupt("killed while writing the optimizer")  # what a killed rank leaves
        return original(obj, path, *args, **kwargs)

    ckpt.save = dying_save
    try:
        acc.save_state(state_dir)
        died = False
    except KeyboardInterrupt:
        died = True
    finally:
        ckpt.save = original
    dist.barrier()
    acc, plugin, model, opt = _plugin(7)  # fresh weights: everything must come from the folder
    acc.load_state(state_dir)
    loaded = digest(acc.unwrap_model(model), opt.optimizer)
    same = differences(loaded, good) == []
    return died, same, plugin.step


def half_written_job(state_dir: str):
    acc, plugin, model, opt = _plugin(7)
    try:
        acc.load_state(state_dir)
    except ValueError as err:
        return str(err)
    return "loaded"


def test_save_state_cut_short_leaves_the_previous_checkpoint_loadable(ranks, tmp_path):
    pool = ranks(W)
    state_dir = str(tmp_path / "state")
    for died, same, step in pool.run(crash_job, state_dir):
        assert died and same and step == 2, (died, same, step)
    # A folder whose save never reached its manifest (automatic naming writes in place) is refused.
    os.remove(os.path.join(state_dir, manifest.MANIFEST))
    for msg in pool.run(half_written_job, state_dir):
        assert "has no hiermoe_manifest.json" in msg and "did not complete" in msg, msg


def auto_job(directory: str, resume: bool):
    """dispatch="auto" without a cost model on 2x1 (hd1 and hd2 timed): forwards until auto has chosen,
    save; or, resuming, a fresh model loads the folder. Returns the trials' state."""
    cfg = hiermoe_hf.HierMoEConfig(topology="2x1", dispatch="auto")
    model, opt = _trained(0, cfg)
    trials = runtime_of(model).trials
    store = RankStateStore(model, opt)
    if resume:
        store.begin_load(directory)
    else:
        with torch.no_grad():
            while trials.chosen is None:
                model(torch.randint(0, 256, (2, 6)))
        store.save(directory)
        store.seal(directory)
    return trials.chosen, dict(trials.forwards), dict(trials.timed_us)


def test_auto_choice_survives_a_resume(ranks, tmp_path):
    pool = ranks(W)
    folder = str(tmp_path / "auto")
    saved = pool.run(auto_job, folder, False)
    resumed = pool.run(auto_job, folder, True)
    assert saved[0][0] in ("hd1", "hd2") and saved[0] == saved[1]
    assert resumed == saved
