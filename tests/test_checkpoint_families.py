"""Checkpoints in each family's own Hub layout (issue 17, item 5), on 4 gloo ranks as 2x2.

Families whose Hub layouts differ: Mixtral (per-expert ``block_sparse_moe.experts.N.w1/w2/w3``, and
its dense ``block_sparse_moe.gate`` renamed), Qwen2-MoE and OLMoE (per-expert
``gate_proj/up_proj/down_proj``; Qwen2-MoE with a shared expert), gpt-oss (fused tensors with
biases, no conversion; and its MXFP4 ``*_blocks``/``*_scales`` release), and Qwen3-MoE in
fine-grained FP8 (per-expert e4m3 + ``weight_scale_inv``). Qwen3-MoE and DeepSeek-V3 (bf16 and FP8)
are covered by test_checkpoint.py / test_fp8_checkpoint.py.

Oracles: plain Transformers. ``save_pretrained`` of the patched model after expert swaps must be
byte for byte what plain ``save_pretrained`` of the unpatched model writes, and reload in plain
``from_pretrained`` to the unpatched weights; ``hiermoe_hf.from_pretrained`` must equal
``patch(AutoModelForCausalLM.from_pretrained(...))`` (for MXFP4 / FP8: Transformers' own
dequantization) and read only the rank's own experts (every read of an expert tensor recorded).
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from transformers import Mxfp4Config
from transformers.integrations.mxfp4 import FP4_VALUES

import hiermoe_hf
from hiermoe_hf.checkpoint import load as load_module
from hiermoe_hf.checkpoint.keys import (
    ForwardConversion,
    check_complete,
    conversions,
    experts_to_hub,
    hub_layout,
    hub_views,
)
from hiermoe_hf.runtime.registry import moe_layers
from hiermoe_hf.tiny_families import FAMILY, IMAGE_TEXT, available, build_family_model, model_class, tiny_family_config
from hiermoe_hf.tiny_models import build_model, tiny_qwen3_moe_config

WORLD, TOPOLOGY = 4, "2x2"
SHARD = "40KB"  # several shard files, a layer's experts split across them
SWAPS = [(0, 5), (1, 6), (3, 7), (2, 4)]  # non-contiguous placement: experts cross ranks both ways
# Unlike Hub layouts (per-expert w1/w2/w3 with renamed blocks; per-expert gate/up/down; fused with
# biases; no gate; experts on the decoder layer; an image-text model with transposed fused experts).
KINDS = ["mixtral", "gpt_oss", "qwen2_moe", "olmoe", "nemotron_h", "gemma4_text", "qwen3_vl_moe"]


def _model(kind: str, **overrides):
    return build_family_model(tiny_family_config(kind, **overrides))


def _plain_class(kind: str):
    return model_class(tiny_family_config(kind))


def _hand_swap(model, pairs) -> None:
    """Exchange expert slots between ranks as a swap would: weights move, placement updates on every rank."""
    for experts, layer in moe_layers(model).values():
        full = {}
        for name in layer.param_names:
            local = getattr(experts, name).detach().contiguous()
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local)
            full[name] = torch.cat(parts)[layer.placement.phys_of_E]  # logical order
        for a, b in pairs:
            layer.placement.swap(a, b)
        for name in layer.param_names:
            setattr(experts, name, torch.nn.Parameter(full[name][layer.local_logical()].clone()))


def _rank_save(kind: str, folder: str) -> None:
    model = hiermoe_hf.patch(_model(kind), hiermoe_hf.HierMoEConfig(topology=TOPOLOGY, dispatch="a2a"))
    _hand_swap(model, SWAPS)
    model.save_pretrained(folder, max_shard_size=SHARD)


@pytest.mark.parametrize("kind", KINDS)
def test_save_writes_the_family_hub_layout(ranks, tmp_path, kind):
    ranks(WORLD).run(_rank_save, kind, str(tmp_path / "ours"))
    _model(kind).save_pretrained(tmp_path / "plain", max_shard_size=SHARD)
    names = sorted(os.listdir(tmp_path / "plain"))
    assert sorted(os.listdir(tmp_path / "ours")) == names
    for name in names:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    if kind == "mixtral":  # the family's own names, not the in-memory ones
        index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())["weight_map"]
        assert "model.layers.1.block_sparse_moe.experts.7.w3.weight" in index
        assert "model.layers.1.block_sparse_moe.gate.weight" in index
    reloaded = _plain_class(kind).from_pretrained(tmp_path / "ours").state_dict()
    want = _model(kind).state_dict()
    assert set(reloaded) == set(want)
    assert all(torch.equal(reloaded[k], want[k]) for k in want)


class _Recorded:
    """A safetensors slice whose reads (``[index]``) are recorded as (key, index)."""

    def __init__(self, inner, key: str, log: list):
        self.inner, self.key, self.log = inner, key, log

    def __getitem__(self, index):
        self.log.append((self.key, index))
        return self.inner[index]

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _experts_read(log) -> list[int]:
    """Logical experts whose bytes were read: per-expert keys by their id, stacked tensors by dim-0 rows."""
    out = set()
    for key, index in log:
        match = re.search(r"\.experts\.(\d+)\.", key)
        if match:
            out.add(int(match.group(1)))
        else:
            first = index[0] if isinstance(index, tuple) else index
            assert isinstance(first, slice) and first.step in (None, 1), (key, index)
            out.update(range(first.start, first.stop))
    return sorted(out)


def _rank_load(folder: str, kind: str, reference_kwargs: dict):
    log = []
    original = load_module._ShardReader.slice

    def recording(self, key):
        inner = original(self, key)
        return _Recorded(inner, key, log) if ".experts." in key else inner

    load_module._ShardReader.slice = recording
    try:
        cfg = hiermoe_hf.HierMoEConfig(topology=TOPOLOGY, dispatch="a2a")
        ours = hiermoe_hf.from_pretrained(folder, cfg)
    finally:
        load_module._ShardReader.slice = original
    ref = hiermoe_hf.patch(_plain_class(kind).from_pretrained(folder, **reference_kwargs), cfg)
    mine, theirs = ours.state_dict(), ref.state_dict()
    differ = sorted(k for k in theirs if mine[k].dtype != theirs[k].dtype or not torch.equal(mine[k], theirs[k]))
    local = sorted({e for _, layer in moe_layers(ours).values() for e in layer.local_logical().tolist()})
    conversions = [[c.source_patterns for c in getattr(m, "_weight_conversions", None) or []] for m in (ours, ref)]
    return differ, _experts_read(log), local, conversions, sorted(set(mine) ^ set(theirs))


def _check_load(results, quantized: bool = False) -> None:
    for rank, (differ, read, local, (mine, theirs), extra) in enumerate(results):
        assert differ == [] and extra == [], f"rank {rank}: {differ[:5]} {extra[:5]}"
        assert read == local == [2 * rank, 2 * rank + 1], f"rank {rank} read experts {read}, holds {local}"
        # a plain save_pretrained after our load writes the same Hub layout (Transformers' dequantizing
        # loads keep no conversions at all; ours keep the family's, so our save writes its Hub layout)
        assert mine == theirs or quantized


@pytest.mark.parametrize("kind", KINDS)
def test_from_pretrained_reads_only_local_experts_of_the_hub_layout(ranks, tmp_path, kind):
    _model(kind).save_pretrained(tmp_path, max_shard_size=SHARD)  # plain Transformers: the Hub layout
    _check_load(ranks(WORLD).run(_rank_load, str(tmp_path), kind, {}))


# --- quantized Hub releases: the test writes its own tiny checkpoints in those formats -------------


def _mxfp4(w_ECR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss MXFP4 of a model-layout experts tensor [E, C, R]: blocks uint8 [E, R, C/32, 16] (two FP4
    codes a byte, low nibble first) and E8M0 scales uint8 [E, R, C/32] (exponent + 127), nearest value."""
    lut = torch.tensor(FP4_VALUES)
    t = w_ECR.transpose(1, 2).float()
    groups = t.reshape(*t.shape[:2], t.shape[2] // 32, 32)
    exp = torch.ceil(torch.log2(groups.abs().amax(-1).clamp_min(1e-30) / 6.0)).clamp(-126, 127)
    codes = ((groups / torch.exp2(exp)[..., None])[..., None] - lut).abs().argmin(-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8), (exp + 127).to(torch.uint8)


def _fp8(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-scaled e4m3 of a 2-D weight whose sides the block divides: (e4m3 [R, C], scale_inv [R/br, C/bc])."""
    br, bc = block
    blocks = w.float().reshape(w.shape[0] // br, br, w.shape[1] // bc, bc)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(w.shape)
    return q, scale


def _requantize(plain: str, folder: str, quantize, quant_config: dict) -> None:
    tensors = load_file(os.path.join(plain, "model.safetensors"))
    out = {}
    for key, t in tensors.items():
        out.update(quantize(key, t) or {key: t})
    os.makedirs(folder)
    save_file(out, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config = json.load(open(os.path.join(plain, "config.json")))
    json.dump({**config, "quantization_config": quant_config}, open(os.path.join(folder, "config.json"), "w"))


def test_gpt_oss_mxfp4_experts_dequantized_locally(ranks, tmp_path):
    _model("gpt_oss", hidden_size=64, intermediate_size=32).save_pretrained(tmp_path / "plain")  # 32-value blocks

    def quantize(key, t):
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = _mxfp4(t)
            return {key + "_blocks": blocks, key + "_scales": scales}

    _requantize(str(tmp_path / "plain"), str(tmp_path / "mxfp4"), quantize, {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head",
        ],
    })
    reference = {"quantization_config": Mxfp4Config(dequantize=True)}  # Transformers' own dequantization
    _check_load(ranks(WORLD).run(_rank_load, str(tmp_path / "mxfp4"), "gpt_oss", reference), quantized=True)


def test_qwen3_moe_fp8_per_expert_dequantized_locally(ranks, tmp_path):
    """A non-DeepSeek fine-grained FP8 release (Qwen3-MoE-FP8 layout: per-expert e4m3 keys + scales)."""
    block = (8, 8)  # divides every quantized side, so Transformers' own CPU dequantization is exact
    build_model(tiny_qwen3_moe_config()).save_pretrained(tmp_path / "plain")

    def quantize(key, t):
        if key.startswith("model.layers.") and key.endswith("proj.weight") and t.ndim == 2:
            q, s = _fp8(t, block)
            return {key: q, key + "_scale_inv": s}

    _requantize(str(tmp_path / "plain"), str(tmp_path / "fp8"), quantize, {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block),
    })
    written = load_file(tmp_path / "fp8" / "model.safetensors")
    assert any(re.search(r"experts\.\d+\.down_proj\.weight_scale_inv$", k) for k in written)
    _check_load(ranks(WORLD).run(_rank_load, str(tmp_path / "fp8"), "qwen3_moe", {}), quantized=True)


def test_other_quantization_formats_are_refused(tmp_path):
    build_model(tiny_qwen3_moe_config()).save_pretrained(tmp_path)
    config = json.load(open(tmp_path / "config.json"))
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    json.dump(config, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="quant_method='gptq' is not supported.*'fp8'.*'mxfp4'"):
        hiermoe_hf.from_pretrained(str(tmp_path))


# --- every family: the layout read off Transformers' conversion mapping, one process --------------

# Every tiny family, image-text ones also as the whole image-text model (its own conversion mapping);
# Qwen3-VL-MoE's text config has no causal-LM class of its own.
ALL = sorted((set(FAMILY) | set(IMAGE_TEXT)) - {"qwen3_vl_moe_text"})


@pytest.mark.parametrize("kind", ALL)
def test_layout_is_transformers_own_for_every_family(kind):
    """Per-expert conversion both ways equals Transformers' whole-model conversion: the save's keys, order
    and bytes are what plain ``save_pretrained`` writes, and loading expert by expert gives back each slot."""
    if not available(kind):
        pytest.skip(f"this Transformers has no {kind}")
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import revert_weight_conversion

    model = _model(kind)
    state = model.state_dict()
    experts = {f"{s.name}.{p}": s.num_experts for s, _ in hiermoe_hf.patches.find_experts(model) for p in s.param_names}
    layout = hub_layout(model, {k: (tuple(v.shape), v.dtype) for k, v in state.items()}, experts)
    check_complete(layout, experts)
    plain = revert_weight_conversion(model, dict(state))
    assert [t.key for t in layout] == list(plain)
    conv = conversions(model)
    for t in layout:
        src = state[t.source]
        if t.template is None:
            got = src
        elif t.stacked:
            got = torch.cat([experts_to_hub(conv, t.source, src[g : g + 1])[t.template] for g in range(t.experts)])
        else:
            got = experts_to_hub(conv, t.source, src[t.expert : t.expert + 1])[t.template]
        assert tuple(got.shape) == t.shape and torch.equal(got, plain[t.key]), t.key
    forward = ForwardConversion(get_model_conversion_mapping(model), model)
    for fused, num in experts.items():  # per-expert keys: the loader converts them expert by expert
        tensors = [t for t in layout if t.source == fused and t.expert is not None]
        for g in range(num if tensors else 0):
            got = forward({t.key: plain[t.key] for t in tensors if t.expert == g})
            assert list(got) == [fused] and torch.equal(got[fused], state[fused][g : g + 1]), (fused, g)
            slot = torch.zeros_like(state[fused][:1])  # or, where the reverse conversion only cuts views:
            views = hub_views(conv, fused, slot)
            for t in tensors if views is not None else []:
                if t.expert == g:
                    views[t.template].copy_(plain[t.key])
            assert views is None or torch.equal(slot, state[fused][g : g + 1]), (fused, g)
