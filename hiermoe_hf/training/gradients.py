"""Gradient semantics for hand-written loops without DDP (DESIGN.md section 6)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor

from hiermoe_hf.runtime.registry import moe_layers, runtime_of


def expert_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The rank-local expert parameters of a patched model."""
    params = []
    for experts, layer in moe_layers(model).values():
        params += [getattr(experts, n) for n in layer.param_names]
    return params


def all_reduce_gradients(model: torch.nn.Module) -> None:
    """Average dense grads over ranks; divide expert grads (already summed over all ranks' tokens) by W.

    The result equals single-process training on the global batch with the loss averaged over ranks.
    Dense grads sharded by FSDP2 (``hiermoe_hf.shard_dense``: DTensors) were already reduce-scattered
    and averaged by its backward: they are left alone.
    """
    world = runtime_of(model).world_size
    if world == 1:
        return
    expert_ids = {id(p) for p in expert_parameters(model)}
    dense = []
    for p in model.parameters():
        if p.grad is None:
            continue
        if id(p) in expert_ids:
            p.grad.div_(world)
        elif not isinstance(p.grad, DTensor):
            dense.append(p.grad)
    for dtype in {g.dtype for g in dense}:
        grads = [g for g in dense if g.dtype == dtype]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(world)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)
