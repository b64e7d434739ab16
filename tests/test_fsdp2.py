"""FSDP2 on the dense part (issue 10, item 1): ``hiermoe_hf.shard_dense`` on gloo ranks.

Oracle: the unpatched model in one process, fed every rank's micro-batch of each step with the loss
averaged over ranks (DDP's meaning, DESIGN.md section 6), ``torch.nn.utils.clip_grad_norm_`` and
AdamW on the whole model. A hand-written loop on the ranks (patch, shard_dense, AdamW,
all_reduce_gradients, grad_clip.clip_grad_norm_, swap_experts with the "load" policy so swaps surely
happen) must give the same losses, clip norms and parameters within 1e-5 relative; each rank's
parameter and optimizer elements, counted on the rank, must be (dense + experts) / W within 10%;
``save_pretrained`` must write the plain checkpoint Transformers reloads.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

import hiermoe_hf
from hiermoe_hf.runtime.registry import moe_layers
from hiermoe_hf.tiny_models import build_model, tiny_deepseek_v3_config, tiny_qwen3_moe_config
from hiermoe_hf.training import grad_clip

CONFIGS = {"qwen3_moe": tiny_qwen3_moe_config, "deepseek_v3": tiny_deepseek_v3_config}
STEPS, B, L, LR, MAX_NORM = 5, 2, 9, 1e-2, 0.5


def _micro(step: int, world: int, rank: int) -> torch.Tensor:
    ids = torch.randint(0, 256, (world * B, L), generator=torch.Generator().manual_seed(1000 + step))
    return ids[rank * B : (rank + 1) * B]


def _reference(kind: str, world: int):
    """Single process, unpatched: (losses, clip norms, final state dict)."""
    model = build_model(CONFIGS[kind]()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for step in range(STEPS):
        total = 0.0
        for r in range(world):
            x = _micro(step, world, r)
            loss = model(input_ids=x, labels=x).loss / world
            loss.backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, norms, {k: v.detach().clone() for k, v in model.named_parameters()}


def _local_elements(model, opt) -> tuple[int, int]:
    """Parameter and optimizer-state elements this rank holds (DTensors: the local shard only)."""
    def local(t):
        return t.to_local().numel() if isinstance(t, DTensor) else t.numel()

    params = sum(local(p) for p in model.parameters())
    state = sum(local(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim())
    return params, state


def _rank_train(kind, topology, save_dir):
    W, r = dist.get_world_size(), dist.get_rank()
    cfg = hiermoe_hf.HierMoEConfig(topology=topology, dispatch="auto", swap_policy="load", swap_pairs=2)
    model = hiermoe_hf.patch(build_model(CONFIGS[kind]()).train(), cfg)
    assert hiermoe_hf.shard_dense(model) is model
    assert hiermoe_hf.shard_dense(model) is model  # twice: a no-op
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms, swaps = [], [], 0
    for step in range(STEPS):
        x = _micro(step, W, r)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        hiermoe_hf.all_reduce_gradients(model)
        norms.append(float(grad_clip.clip_grad_norm_(model.parameters(), MAX_NORM, model=model)))
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / W)
        swaps += len(hiermoe_hf.swap_experts(model, optimizer=opt))
    params, state = _local_elements(model, opt)
    # The whole trained model on every rank, for the comparison: dense gathered, experts by logical id.
    full = {}
    for name, p in model.named_parameters():
        full[name] = p.detach().full_tensor() if isinstance(p, DTensor) else p.detach()
    for block, (experts, layer) in moe_layers(model).items():
        for pname in layer.param_names:
            local = getattr(experts, pname).detach()
            parts = [torch.empty_like(local) for _ in range(W)]
            dist.all_gather(parts, local.contiguous())
            full[f"{block}.experts.{pname}"] = torch.cat(parts)[layer.placement.phys_of_E]
    model.save_pretrained(save_dir)
    return losses, norms, swaps, params, state, full


def _rel(got, want) -> float:
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("world,topology", [(2, "2x1"), (2, "1x2"), (4, "2x2")])
def test_fsdp2_training_equals_single_process(ranks, tmp_path, kind, world, topology):
    save_dir = str(tmp_path / "ckpt")
    results = ranks(world).run(_rank_train, kind, topology, save_dir)
    want_losses, want_norms, want_state = _reference(kind, world)
    total = sum(v.numel() for k, v in build_model(CONFIGS[kind]()).named_parameters())
    for rank, (losses, norms, swaps, params, state, full) in enumerate(results):
        assert _rel(losses, want_losses) < 1e-5, (rank, losses, want_losses)
        assert _rel(norms, want_norms) < 1e-5, (rank, norms, want_norms)
        assert swaps > 0, "no swap happened: the test would prove nothing"
        assert set(full) == set(want_state)
        for name, want in want_state.items():
            assert _rel(full[name], want) < 1e-5, (rank, name, _rel(full[name], want))
        # Counted on the rank: (dense + experts) / W parameters, twice that in AdamW moments.
        assert abs(params / (total / world) - 1) < 0.10, (rank, params, total / world)
        assert abs(state / (2 * total / world) - 1) < 0.10, (rank, state, 2 * total / world)
    reloaded = AutoModelForCausalLM.from_pretrained(save_dir).state_dict()  # plain Transformers
    full = results[0][5]
    for name, tensor in reloaded.items():
        if name in full:
            assert torch.equal(tensor, full[name]), name
    assert set(full) <= set(reloaded)
