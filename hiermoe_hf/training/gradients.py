"""Gradient semantics for hand-written loops without DDP (DESIGN.md section 6)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from hiermoe_hf.runtime.registry import runtime_of
from hiermoe_hf.training.expert_dp import expert_parameters, sync_expert_grads

__all__ = ["all_reduce_gradients", "expert_parameters"]


def all_reduce_gradients(model: torch.nn.Module) -> None:
    """Average dense grads over ranks; divide expert grads (already summed over their group's tokens)
    by W and sum them over the replicas of the expert-parallel group (``expert_dp``).

    The result equals single-process training on the global batch with the loss averaged over ranks.
    """
    world = runtime_of(model).global_world_size
    if world == 1:
        return
    expert_ids = {id(p) for p in expert_parameters(model)}
    dense = []
    for p in model.parameters():
        if p.grad is None:
            continue
        if id(p) in expert_ids:
            p.grad.div_(world)
        else:
            dense.append(p.grad)
    for dtype in {g.dtype for g in dense}:
        grads = [g for g in dense if g.dtype == dtype]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(world)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)
    sync_expert_grads(model)
