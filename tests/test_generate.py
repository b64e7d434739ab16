"""Issue 12 item 5: ``generate`` on a patched model never hangs when ranks stop at different steps,
and equals the unpatched model's output (greedy, same prompt and length, one process)."""

from __future__ import annotations

import pytest
import torch

import hiermoe_hf
from hiermoe_hf.tiny_models import build_model, tiny_deepseek_v3_config, tiny_qwen3_moe_config


def _config(kind):
    kw = dict(eos_token_id=None, pad_token_id=0)  # lengths are set by max_new_tokens alone
    return tiny_qwen3_moe_config(**kw) if kind == "qwen" else tiny_deepseek_v3_config(**kw)


def _prompt(rank: int) -> torch.Tensor:
    return torch.randint(1, 256, (1, 4 + rank), generator=torch.Generator().manual_seed(40 + rank))


def generate_job(kind):
    import torch.distributed as dist

    W, r = dist.get_world_size(), dist.get_rank()
    model = build_model(_config(kind))
    hiermoe_hf.patch(model, hiermoe_hf.HierMoEConfig(topology=[1, W], dispatch="a2a"))
    with torch.no_grad():
        out = model.generate(_prompt(r), max_new_tokens=2 + 3 * r, do_sample=False)  # rank 0 stops first
    try:
        model.generate(_prompt(r), max_new_tokens=2, do_sample=False, synced_gpus=False)
        refused = None
    except ValueError as err:
        refused = str(err)
    return out, refused


@pytest.mark.parametrize("kind", ["qwen", "deepseek"])
def test_generate_with_different_lengths_per_rank_matches_unpatched(ranks, kind):
    results = ranks(2).run(generate_job, kind, timeout=60)  # before issue 12: rank 1 hung in all_to_all
    assert len(results) == 2  # a pool closed by an earlier timeout answers []
    ref = build_model(_config(kind))
    for r, (out, refused) in enumerate(results):
        with torch.no_grad():
            want = ref.generate(_prompt(r), max_new_tokens=2 + 3 * r, do_sample=False)
        assert out.shape == want.shape and torch.equal(out, want), (r, out, want)
        assert "leave synced_gpus unset" in refused
