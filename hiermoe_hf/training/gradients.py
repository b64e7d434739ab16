"""Gradient semantics for hand-written loops without DDP (DESIGN.md section 6)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from hiermoe_hf.runtime.expert_grads import expert_parameters
from hiermoe_hf.runtime.registry import runtime_of
from hiermoe_hf.training import buckets as buckets_module
from hiermoe_hf.training.buckets import all_reduce_bucketed
from hiermoe_hf.training.expert_dp import sync_expert_grads
from hiermoe_hf.training.loss_scaling import local_grad, nonfinite_flag, spread_flag

__all__ = ["all_reduce_gradients"]


def all_reduce_gradients(model: torch.nn.Module) -> None:
    """Average dense grads over ranks; sum expert grads over the replicas of the expert-parallel group
    (``expert_dp``; none when ``ep_size`` is the world). Collective: every rank, once per optimizer
    step, after backward.

    Expert grads (which already sum their group's tokens) were divided by W as they were produced
    (``patch`` hooks them), so the result equals single-process training on the global batch with the
    loss averaged over ranks. Dense grads sharded by FSDP2 (``hiermoe_hf.shard_dense``: DTensors) were
    already reduce-scattered and averaged by its backward: they are left alone. A non-finite expert
    grad or dense shard on any rank makes every rank's grads non-finite (one extra element in the same
    all-reduce), so a ``torch.amp.GradScaler`` skips the step on all ranks alike. The all-reduces go in
    buckets of at most ``training.buckets.BUCKET_BYTES`` (transient memory bounded, not the model's).
    """
    world = runtime_of(model).global_world_size
    if world == 1:
        return
    expert_grads = {id(p.grad) for p in expert_parameters(model) if p.grad is not None}
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    dense = [g for g in grads if not isinstance(g, DTensor) and id(g) not in expert_grads]
    rank_local = [local_grad(g) for g in grads if isinstance(g, DTensor) or id(g) in expert_grads]
    flag = nonfinite_flag(rank_local, next(model.parameters()))
    dtypes = sorted({g.dtype for g in dense}, key=str)
    if not dtypes:
        dist.all_reduce(flag)
    for dtype in dtypes:
        grads = [g for g in dense if g.dtype == dtype]
        if dtype == dtypes[0]:  # the flag rides in a flattened bucket's all-reduce (no extra collective)
            flag_1 = flag.to(dtype).view(1)
            grads.insert(_first_small(grads), flag_1)
        all_reduce_bucketed(grads, after=lambda buf: buf.div_(world))
        if dtype == dtypes[0]:
            flag = flag_1.float().view(())
    spread_flag(model, flag)
    sync_expert_grads(model)


def _first_small(grads: list[torch.Tensor]) -> int:
    """Index of the first tensor that shares a flattened bucket (else 0): the flag goes before it, so
    it never forces a copy of a gradient larger than a bucket."""
    limit = buckets_module.BUCKET_BYTES
    return next((i for i, g in enumerate(grads) if g.numel() * g.element_size() + 8 <= limit), 0)
