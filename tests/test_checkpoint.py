"""Checkpoints (DESIGN.md section 9): patched save_pretrained and hiermoe_hf.from_pretrained.

Oracles are plain Transformers: its own save_pretrained of the unpatched model (byte for byte), its
single-process from_pretrained, and patch(from_pretrained(...)).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

import hiermoe_hf
from hiermoe_hf.checkpoint import save as checkpoint_save
from hiermoe_hf.runtime.registry import moe_layers
from hiermoe_hf.tiny_models import build_model, tiny_deepseek_v3_config, tiny_qwen3_moe_config

CONFIGS = {"qwen3_moe": tiny_qwen3_moe_config, "deepseek_v3": tiny_deepseek_v3_config}
SHARD = "40KB"  # several shard files for these tiny models; also splits a layer's experts across files
# Non-contiguous placement on 4 ranks x 2 slots: experts cross ranks in both directions.
SWAPS = [(0, 5), (1, 6), (3, 7), (2, 4)]


def _batch(world: int) -> torch.Tensor:
    return torch.randint(0, 256, (2 * world, 7), generator=torch.Generator().manual_seed(1))


def _files(folder: str) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def _hand_swap(model, pairs) -> None:
    """Exchange expert slots between ranks as a swap would: weights move, placement updates on every rank."""
    for _, (experts, layer) in moe_layers(model).items():
        full = {}
        for name in layer.param_names:
            local = getattr(experts, name).detach()
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local.contiguous())
            full[name] = torch.cat(parts)[layer.placement.phys_of_E]  # logical order
        for a, b in pairs:
            layer.placement.swap(a, b)
        for name in layer.param_names:
            setattr(experts, name, torch.nn.Parameter(full[name][layer.local_logical()].clone()))


def _rank_save(kind, folder, swaps, original_format, max_shard_size):
    """Patch, swap, check the swapped model still matches the unpatched one, save; return its logits."""
    world, rank = dist.get_world_size(), dist.get_rank()
    model = hiermoe_hf.patch(build_model(CONFIGS[kind]()), hiermoe_hf.HierMoEConfig(dispatch="a2a"))
    _hand_swap(model, swaps)
    placements = [layer.placement.phys_of_E.tolist() for _, layer in moe_layers(model).values()]
    with torch.no_grad():
        logits = model(_batch(world)[2 * rank : 2 * rank + 2]).logits
    model.save_pretrained(folder, max_shard_size=max_shard_size, save_original_format=original_format)
    return logits, placements


def _rank_load(folder, dtype, topology):
    """hiermoe_hf.from_pretrained vs patch(plain from_pretrained): everything a user can observe."""
    cfg = hiermoe_hf.HierMoEConfig(topology=topology, dispatch="a2a")
    kwargs = {} if dtype is None else {"dtype": dtype}
    ours = hiermoe_hf.from_pretrained(folder, cfg, **kwargs)
    ref = hiermoe_hf.patch(AutoModelForCausalLM.from_pretrained(folder, **kwargs), cfg)
    mine, theirs = ours.state_dict(), ref.state_dict()
    differ = sorted(
        k for k in theirs if k not in mine or mine[k].dtype != theirs[k].dtype or not torch.equal(mine[k], theirs[k])
    )
    buffers = dict(ours.named_buffers())  # non-persistent ones (rotary inv_freq) too
    differ += [k for k, b in ref.named_buffers() if not torch.equal(buffers[k], b)]
    world, rank = dist.get_world_size(), dist.get_rank()
    with torch.no_grad():
        ids = _batch(world)[2 * rank : 2 * rank + 2]
        same_logits = torch.equal(ours(ids).logits, ref(ids).logits)
    both = (ours, ref)
    return {
        "differ": differ,
        "extra": sorted(set(mine) - set(theirs)),
        "class": (type(ours), type(ref)),
        "config": (ours.config.to_dict(), ref.config.to_dict()),
        "generation": (ours.generation_config.to_dict(), ref.generation_config.to_dict()),
        "training": (ours.training, ref.training),
        "requires_grad": tuple([p.requires_grad for p in m.parameters()] for m in both),
        "tied": tuple(m.lm_head.weight is m.model.embed_tokens.weight for m in both),
        "conversions": tuple([c.source_patterns for c in m._weight_conversions] for m in both),
        "logits": same_logits,
        "local_experts": [tuple(ex.gate_up_proj.shape) for ex, _ in moe_layers(ours).values()],
    }


@pytest.fixture(scope="module")
def plain_checkpoints(tmp_path_factory):
    """Checkpoints written by plain Transformers: {(kind, original_format, tied): folder}."""
    out = {}
    for kind in CONFIGS:
        for original_format in (True, False):
            for tied in (False, True):
                folder = str(tmp_path_factory.mktemp(f"{kind}-{original_format}-{tied}"))
                model = build_model(CONFIGS[kind](tie_word_embeddings=tied))
                model.save_pretrained(folder, max_shard_size=SHARD, save_original_format=original_format)
                out[kind, original_format, tied] = folder
    return out


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("original_format", [True, False], ids=["per_expert", "fused"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_save_after_swaps_is_plain_save_and_reloads(ranks, tmp_path, kind, original_format, world):
    swaps = SWAPS if world == 4 else [(0, 5), (2, 7)]
    results = ranks(world).run(_rank_save, kind, str(tmp_path / "ours"), swaps, original_format, SHARD)
    placement = results[0][1][0]
    assert placement != sorted(placement)  # the save really saw a non-contiguous placement
    patched_logits = torch.cat([logits for logits, _ in results])

    # Byte for byte what plain Transformers writes for the unpatched model (keys, shards, index, config).
    plain = build_model(CONFIGS[kind]())
    plain.save_pretrained(str(tmp_path / "plain"), max_shard_size=SHARD, save_original_format=original_format)
    ours, theirs = _files(str(tmp_path / "ours")), _files(str(tmp_path / "plain"))
    assert list(ours) == list(theirs)
    assert len([f for f in ours if f.endswith(".safetensors")]) > 1
    assert [f for f in ours if ours[f] != theirs[f]] == []

    # Plain single-process from_pretrained reloads it: the same weights and the patched model's logits.
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"))
    reference = plain.state_dict()
    assert all(torch.equal(t, reference[k]) for k, t in reloaded.state_dict().items())
    with torch.no_grad():
        logits = reloaded(_batch(world)).logits
    torch.testing.assert_close(patched_logits, logits, rtol=1e-5, atol=1e-5 * logits.abs().max().item())


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("original_format", [True, False], ids=["per_expert", "fused"])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_from_pretrained_equals_patch_of_plain_load(ranks, plain_checkpoints, kind, original_format, world):
    folder = plain_checkpoints[kind, original_format, False]
    topology = "2x2" if world == 4 else "1x2"
    for result in ranks(world).run(_rank_load, folder, None, topology):
        _assert_same(result)
        experts = CONFIGS[kind]().num_experts if kind == "qwen3_moe" else CONFIGS[kind]().n_routed_experts
        assert {shape[0] for shape in result["local_experts"]} == {experts // world}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_from_pretrained_dtype_and_tied_embeddings(ranks, plain_checkpoints, kind):
    folder = plain_checkpoints[kind, True, True]
    for result in ranks(4).run(_rank_load, folder, torch.bfloat16, "2x2"):
        _assert_same(result)
        assert result["tied"] == (True, True)
        assert result["config"][0]["dtype"] == "bfloat16"


def _assert_same(result: dict) -> None:
    assert result["differ"] == [] and result["extra"] == []
    for key in ("class", "config", "generation", "training", "requires_grad", "tied", "conversions"):
        ours, theirs = result[key]
        assert ours == theirs, key
    assert result["logits"]


def test_from_pretrained_world_size_one_is_plain(plain_checkpoints):
    """Without a process group: the whole model, bit-identical to plain from_pretrained."""
    for (kind, original_format, tied), folder in plain_checkpoints.items():
        if tied:
            continue
        ours = hiermoe_hf.from_pretrained(folder)
        theirs = AutoModelForCausalLM.from_pretrained(folder)
        mine = ours.state_dict()
        assert all(torch.equal(mine[k], t) for k, t in theirs.state_dict().items()), (kind, original_format)
        assert ours.config.to_dict() == theirs.config.to_dict()


def _rank_failing_save(kind, folder):
    model = hiermoe_hf.patch(build_model(CONFIGS[kind]()), hiermoe_hf.HierMoEConfig(dispatch="a2a"))
    _hand_swap(model, [(0, 7)])
    model.save_pretrained(folder, max_shard_size=SHARD)  # a first, good checkpoint
    calls = {"n": 0}
    header = checkpoint_save._header

    def header_then_fail(ordered):  # rank 0 dies in the middle of the third shard file
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        return header(ordered)

    checkpoint_save._header = header_then_fail
    try:
        with torch.no_grad():  # change the weights, so a partial overwrite would show
            for p in model.parameters():
                p.mul_(2)
        model.save_pretrained(folder, max_shard_size=SHARD)
    except RuntimeError as err:
        return str(err)
    finally:
        checkpoint_save._header = header
    return None


def test_failed_save_leaves_old_checkpoint_intact(ranks, tmp_path):
    folder = str(tmp_path / "ckpt")
    errors = ranks(4).run(_rank_failing_save, "qwen3_moe", folder)
    assert all(e is not None and "disk full (simulated)" in e for e in errors)  # every rank is told
    before = build_model(tiny_qwen3_moe_config()).state_dict()
    after = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # the partial folder is gone


def _rank_save_twice(folder):
    model = hiermoe_hf.patch(build_model(tiny_qwen3_moe_config()), hiermoe_hf.HierMoEConfig(dispatch="a2a"))
    model.save_pretrained(folder, max_shard_size=SHARD)
    if dist.get_rank() == 0:
        with open(os.path.join(folder, "tokenizer.json"), "w") as f:
            f.write("{}")
    dist.barrier()
    model.save_pretrained(folder)  # one file now: the old shards must go, the tokenizer stays
    bound = "save_pretrained" in model.__dict__
    hiermoe_hf.unpatch(model)
    return bound, "save_pretrained" in model.__dict__


def test_resave_replaces_weights_keeps_other_files(ranks, tmp_path):
    folder = str(tmp_path / "ckpt")
    assert ranks(4).run(_rank_save_twice, folder) == [(True, False)] * 4  # unpatch removes the binding
    expected = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert sorted(os.listdir(folder)) == expected
    AutoModelForCausalLM.from_pretrained(folder)


def _rank_hub_name(name):
    start = time.monotonic()
    try:
        hiermoe_hf.from_pretrained(name)
    except OSError as err:
        return str(err), time.monotonic() - start
    return None, time.monotonic() - start


def test_hub_name_offline_fails_fast_on_every_rank(ranks):
    # conftest sets HF_HUB_OFFLINE=1: nothing is in this test's empty HF_HOME cache.
    for message, seconds in ranks(2).run(_rank_hub_name, "hiermoe-test/no-such-model"):
        assert message is not None and "hiermoe-test/no-such-model" in message and "offline" in message
        assert seconds < 10


def test_hub_name_unreachable_fails_fast(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path)}
    code = (
        "import hiermoe_hf\n"
        "try:\n    hiermoe_hf.from_pretrained('hiermoe-test/no-such-model')\n"
        "except OSError as e:\n    print('OSError:', e)\n"
    )
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "OSError: cannot load 'hiermoe-test/no-such-model'" in out.stdout and "unreachable" in out.stdout, out.stderr
    assert time.monotonic() - start < 45  # the interpreter's start-up included


@pytest.mark.parametrize("original_format", [True, False], ids=["per_expert", "fused"])
@pytest.mark.parametrize("config_experts", [4, 16])
def test_expert_count_mismatch_is_value_error(plain_checkpoints, tmp_path, original_format, config_experts):
    folder = plain_checkpoints["qwen3_moe", original_format, False]
    for name in os.listdir(folder):
        os.link(os.path.join(folder, name), tmp_path / name)
    config = AutoConfig.from_pretrained(folder)
    config.num_experts = config_experts
    os.unlink(tmp_path / "config.json")  # a link to the shared checkpoint's file
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"holds 8 experts.*config says {config_experts} experts"):
        hiermoe_hf.from_pretrained(str(tmp_path))


def test_bad_arguments_are_value_errors(plain_checkpoints, tmp_path):
    folder = plain_checkpoints["qwen3_moe", True, False]
    with pytest.raises(ValueError, match="device_map='auto'.*valid"):
        hiermoe_hf.from_pretrained(folder, device_map="auto")
    with pytest.raises(ValueError, match="state_dict"):
        hiermoe_hf.from_pretrained(folder, state_dict={})
    with pytest.raises(ValueError, match="2x2"):  # world size 1 here: before any weight is read
        hiermoe_hf.from_pretrained(folder, hiermoe_hf.HierMoEConfig(topology="2x2"))
    with pytest.raises(ValueError, match="neither a local folder nor a valid Hub repo id"):
        hiermoe_hf.from_pretrained(str(tmp_path / "missing" / "folder"))
    model = hiermoe_hf.patch(build_model(tiny_qwen3_moe_config()))
    with pytest.raises(ValueError, match="safe_serialization=False"):
        model.save_pretrained(str(tmp_path / "x"), safe_serialization=False)


def test_streamed_safetensors_layout_is_save_file_bytes(tmp_path):
    """Header + raw bytes in data order (what the save streams) == safetensors' own save_file."""
    from safetensors.torch import save_file

    from hiermoe_hf.checkpoint import safetensors_layout

    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(3, 5, generator=g), "a.weight": torch.randn(4, generator=g).to(torch.bfloat16),
        "z.mask": torch.tensor([True, False, True]), "m.ids": torch.arange(6).view(2, 3),
        "c.half": torch.randn(2, 2, generator=g).half(), "d.double": torch.randn(1, generator=g).double(),
        "e.empty": torch.zeros(0, 4), "experts.10.w": torch.ones(2), "experts.9.w": torch.ones(2),
    }
    save_file(tensors, tmp_path / "plain.safetensors", metadata={"format": "pt"})
    order = safetensors_layout.data_order({k: t.dtype for k, t in tensors.items()})
    sizes = [(k, dtype, tuple(tensors[k].shape), tensors[k].numel() * tensors[k].element_size()) for k, dtype in order]
    streamed = safetensors_layout.header(sizes, {"format": "pt"}) + b"".join(
        tensors[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for k, _ in order
    )
    assert streamed == (tmp_path / "plain.safetensors").read_bytes()


def test_world_size_one_save_is_plain_save(tmp_path):
    model = hiermoe_hf.patch(build_model(tiny_deepseek_v3_config()))
    model.save_pretrained(str(tmp_path / "ours"), max_shard_size=SHARD, variant="v1")
    build_model(tiny_deepseek_v3_config()).save_pretrained(str(tmp_path / "plain"), max_shard_size=SHARD, variant="v1")
    ours, theirs = _files(str(tmp_path / "ours")), _files(str(tmp_path / "plain"))
    assert list(ours) == list(theirs) and any(".v1." in name for name in ours)
    assert [f for f in ours if ours[f] != theirs[f]] == []
