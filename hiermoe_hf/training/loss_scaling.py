"""fp16 loss scaling on an expert-parallel model: every rank skips the same steps (DESIGN.md section 6).

``torch.amp.GradScaler`` looks for inf/NaN in this rank's gradients only. Dense gradients are
averaged over the ranks first (DDP or ``all_reduce_gradients``), so a non-finite dense value reaches
every rank; expert slices are rank-local, so a non-finite expert gradient would make only its own
rank skip the step and halve its scale: the ranks' weights and scales would drift apart. Here each
rank turns "my expert grads (and FSDP2 dense shards) are all finite" into a flag that is 0.0 or
NaN, the flags are summed over the ranks, and the sum is added to one element of every gradient:
0.0 changes nothing, NaN makes every rank's scaler see a non-finite gradient. No host read.
"""

from __future__ import annotations

import types

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from hiermoe_hf.runtime.expert_grads import expert_parameters
from hiermoe_hf.runtime.registry import runtime_of

_WRAPPED = "_hiermoe_agrees_on_nonfinite"


def local_grad(g: torch.Tensor) -> torch.Tensor:
    """This rank's part of a gradient: the local shard of an FSDP2 DTensor, else the tensor itself."""
    return g.to_local() if isinstance(g, DTensor) else g


def nonfinite_flag(grads: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """fp32 scalar on ``like``'s device: 0.0 when every element of ``grads`` is finite, NaN otherwise."""
    flag = torch.zeros((), dtype=torch.float32, device=like.device)
    for g in grads:
        if g.numel():
            lo, hi = torch.aminmax(g)  # one read, no copy; a sum could overflow to inf on finite grads
            flag = flag + (lo.float() * 0.0 + hi.float() * 0.0)  # inf * 0 and NaN * 0 are NaN
    return flag


def spread_flag(model: torch.nn.Module, flag: torch.Tensor) -> None:
    """Add the all-reduced ``flag`` to one element of every gradient of ``model`` (no-op when 0.0)."""
    for p in model.parameters():
        g = local_grad(p.grad) if p.grad is not None else None
        if g is not None and g.numel():
            first = g.view(-1)[:1] if g.is_contiguous() else g
            first.add_(flag.to(g.dtype))


def agree_on_nonfinite_grads(model: torch.nn.Module) -> None:
    """Collective (every rank, every optimizer step, before the scaler unscales): if any rank has a
    non-finite expert gradient, make every rank's gradients non-finite, so all ranks skip together."""
    if runtime_of(model).world_size == 1:
        return
    # rank-local gradients: expert slices, and FSDP2's dense shards (reduce-scattered: one owner each)
    experts = {id(p) for p in expert_parameters(model)}
    local = [local_grad(p.grad) for p in model.parameters()
             if p.grad is not None and (id(p) in experts or isinstance(p.grad, DTensor))]
    flag = nonfinite_flag(local, next(model.parameters()))
    dist.all_reduce(flag)
    spread_flag(model, flag)


def agree_before_unscale(scaler, model: torch.nn.Module):
    """Make ``scaler.unscale_`` (called by ``scaler.step`` and by gradient clipping, on every rank)
    run ``agree_on_nonfinite_grads`` first. Acts on this scaler instance only; idempotent."""
    if scaler is None or getattr(scaler, _WRAPPED, False):
        return scaler
    original = scaler.unscale_

    def unscale_(self, optimizer):
        agree_on_nonfinite_grads(model)
        return original(optimizer)

    scaler.unscale_ = types.MethodType(unscale_, scaler)
    setattr(scaler, _WRAPPED, True)
    return scaler
