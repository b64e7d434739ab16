"""DeepSeek-V3 FP8 Hub checkpoints (issue 10, item 4): e4m3 weights + ``weight_scale_inv`` block scales.

The test writes a tiny FP8 DeepSeek-V3 checkpoint in the Hub layout with a block size that leaves
partial blocks on both dimensions (block [16, 24]: kv_a_proj_with_mqa is 24 x 32, experts' down_proj
32 x 16), dequantizes it with its own block loop (DeepSeek's convention: ceil-division grid), and
checks ``hiermoe_hf.from_pretrained(..., dtype=bfloat16)`` on gloo ranks against plain Transformers
loading the test's own dequantized bf16 checkpoint, then patched. ``save_pretrained`` must then
write a plain bf16 checkpoint that Transformers loads without any quantization config.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hiermoe_hf
from hiermoe_hf.checkpoint import fp8 as fp8_module
from hiermoe_hf.checkpoint.fp8 import dequantize
from hiermoe_hf.runtime.registry import moe_layers
from hiermoe_hf.tiny_models import build_model, tiny_deepseek_v3_config

BLOCK = (16, 24)
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _quantized(key: str, t: torch.Tensor) -> bool:
    """DeepSeek-V3 quantizes the decoder's linear weights, not norms, the router, embeddings or the head."""
    return key.startswith("model.layers.") and key.endswith(".weight") and t.ndim == 2 and "norm" not in key \
        and not key.endswith("mlp.gate.weight")


def _quantize(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    br, bc = block
    rows, cols = w.shape
    grid = (-(-rows // br), -(-cols // bc))
    q, s = torch.empty(w.shape, dtype=torch.float8_e4m3fn), torch.empty(grid, dtype=torch.float32)
    for i in range(grid[0]):
        for j in range(grid[1]):
            part = w[i * br : (i + 1) * br, j * bc : (j + 1) * bc].float()
            s[i, j] = part.abs().max().clamp_min(1e-12) / FP8_MAX
            q[i * br : (i + 1) * br, j * bc : (j + 1) * bc] = (part / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def _dequantize_by_hand(q: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
    """The test's own oracle: every block times its scale; Python slices stop at the edge (partial blocks)."""
    br, bc = block
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * br, (i + 1) * br), slice(j * bc, (j + 1) * bc)
            out[rows, cols] = q[rows, cols].float() * s[i, j]
    return out


def _write_checkpoints(root: str) -> tuple[str, str]:
    """(FP8 checkpoint folder, the same dequantized by the test as a plain bf16 checkpoint)."""
    plain, fp8_dir, ref_dir = (os.path.join(root, n) for n in ("plain", "fp8", "ref"))
    build_model(tiny_deepseek_v3_config(), seed=3).save_pretrained(plain)
    tensors = load_file(os.path.join(plain, "model.safetensors"))
    quant, ref = {}, {}
    for key, t in tensors.items():
        if _quantized(key, t):
            q, s = _quantize(t, BLOCK)
            quant[key], quant[key + "_scale_inv"] = q, s
            ref[key] = _dequantize_by_hand(q, s, BLOCK).to(torch.bfloat16)
        else:
            quant[key] = ref[key] = t.to(torch.bfloat16)
    config = json.load(open(os.path.join(plain, "config.json")))
    config["dtype"] = "bfloat16"
    for folder, weights, extra in (
        (fp8_dir, quant, {"quantization_config": {
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(BLOCK),
        }}),
        (ref_dir, ref, {}),
    ):
        os.makedirs(folder)
        save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        json.dump({**config, **extra}, open(os.path.join(folder, "config.json"), "w"))
    assert any(k.endswith("kv_a_proj_with_mqa.weight") and quant[k].shape[0] % BLOCK[0] for k in quant)
    return fp8_dir, ref_dir


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return _write_checkpoints(str(tmp_path_factory.mktemp("fp8")))


def test_dequantize_partial_blocks():
    """The library's block-row loop equals the by-hand block loop on uneven edges, 2-D and fused 3-D."""
    w = torch.randn(3, 41, 29)
    qs = [_quantize(w[e], BLOCK) for e in range(3)]
    q, s = torch.stack([a for a, _ in qs]), torch.stack([b for _, b in qs])
    assert s.shape == (3, 3, 2)
    for e in range(3):
        assert torch.equal(dequantize(q[e], s[e], BLOCK), _dequantize_by_hand(q[e], s[e], BLOCK))
    assert torch.equal(dequantize(q, s, BLOCK), torch.stack([_dequantize_by_hand(q[e], s[e], BLOCK) for e in range(3)]))
    with pytest.raises(ValueError, match=r"needs scales of shape \[3, 2\]"):
        dequantize(q[0], s[0, :2], BLOCK)  # a floor-division grid is refused


def test_bad_quantization_config(checkpoints):
    fp8_dir, _ = checkpoints
    config = json.load(open(os.path.join(fp8_dir, "config.json")))
    from transformers import DeepseekV3Config

    bad = DeepseekV3Config(**{**config, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3"}})
    with pytest.raises(ValueError, match="weight_block_size"):
        hiermoe_hf.from_pretrained(fp8_dir, hiermoe_hf.HierMoEConfig(), config=bad)


def _rank_load(fp8_dir, ref_dir, out_dir, topology):
    read = []
    original = fp8_module._Fp8Slice._leading

    def recording(self, lo, hi):
        read.append(self.key)
        return original(self, lo, hi)

    fp8_module._Fp8Slice._leading = recording
    try:
        cfg = hiermoe_hf.HierMoEConfig(topology=topology, dispatch="a2a")
        ours = hiermoe_hf.from_pretrained(fp8_dir, cfg, dtype=torch.bfloat16)
    finally:
        fp8_module._Fp8Slice._leading = original
    ref = hiermoe_hf.patch(AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.bfloat16), cfg)
    mine, theirs = ours.state_dict(), ref.state_dict()
    differ = sorted(k for k in theirs if mine[k].dtype != theirs[k].dtype or not torch.equal(mine[k], theirs[k]))
    world, rank = dist.get_world_size(), dist.get_rank()
    local = [layer.local_logical().tolist() for _, layer in moe_layers(ours).values()]
    experts_read = sorted({int(k.split(".experts.")[1].split(".")[0]) for k in read if ".experts." in k})
    ids = torch.randint(0, 256, (2 * world, 6), generator=torch.Generator().manual_seed(0))[2 * rank : 2 * rank + 2]
    with torch.no_grad():
        same_logits = torch.equal(ours(ids).logits, ref(ids).logits)
    has_quant_config = hasattr(ours.config, "quantization_config")
    ours.save_pretrained(out_dir)
    return differ, experts_read, sorted(set(sum(local, []))), same_logits, has_quant_config


@pytest.mark.parametrize("world,topology", [(2, "2x1"), (2, "1x2"), (4, "2x2")])
def test_fp8_load_and_save(ranks, checkpoints, tmp_path, world, topology):
    fp8_dir, ref_dir = checkpoints
    out_dir = str(tmp_path / "saved")
    results = ranks(world).run(_rank_load, fp8_dir, ref_dir, out_dir, topology)
    for rank, (differ, experts_read, local, same_logits, has_quant_config) in enumerate(results):
        assert differ == [], f"rank {rank}: tensors differ from the by-hand dequantization: {differ[:5]}"
        assert experts_read == local, f"rank {rank} read experts {experts_read}, holds {local}"
        assert same_logits and not has_quant_config
    saved_config = json.load(open(os.path.join(out_dir, "config.json")))
    assert "quantization_config" not in saved_config
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir)  # plain Transformers, no quantizer
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.bfloat16)
    got, want = reloaded.state_dict(), ref.state_dict()
    assert set(got) == set(want)
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    saved = {}
    for name in os.listdir(out_dir):
        if name.endswith(".safetensors"):
            saved.update(load_file(os.path.join(out_dir, name)))
    assert not any(k.endswith("_scale_inv") for k in saved)
    assert {t.dtype for t in saved.values()} <= {torch.bfloat16, torch.float32}


def _rank_load_fsdp2(fp8_dir, ref_dir):
    from torch.distributed.tensor import DTensor

    cfg = hiermoe_hf.HierMoEConfig(topology="2x2", dispatch="a2a")
    ours = hiermoe_hf.from_pretrained(fp8_dir, cfg, dtype=torch.bfloat16, dense_sharding="fsdp2")
    plain = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.bfloat16)
    ref = hiermoe_hf.shard_dense(hiermoe_hf.patch(plain, cfg))
    mine = dict(ours.named_parameters())

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    sharded = sum(isinstance(p, DTensor) for p in mine.values())
    return sharded, sorted(n for n, p in ref.named_parameters() if not torch.equal(local(p), local(mine[n])))


def test_fp8_load_with_dense_shards(ranks, checkpoints):
    """FP8 + dense_sharding="fsdp2": each rank dequantizes only the block rows of its dense chunks."""
    fp8_dir, ref_dir = checkpoints
    for sharded, differ in ranks(4).run(_rank_load_fsdp2, fp8_dir, ref_dir):
        assert sharded > 10 and differ == [], differ[:5]
