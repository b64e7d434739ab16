"""Gradient-norm clipping with the global norm on an expert-parallel model.

After DDP (or ``all_reduce_gradients``) every rank holds the same dense gradients but only its own
expert slices. ``torch.nn.utils.clip_grad_norm_`` would then see a different norm on each rank, so
ranks would scale their grads differently and drift apart. Here the dense part of the norm is
computed locally (it is identical everywhere) and the expert part is summed over the ranks, which
gives exactly the norm that a single process holding the whole model would compute. Dense grads
sharded by FSDP2 (``hiermoe_hf.shard_dense``) are partitioned over all W ranks: their local shards
join the summed part. With ``ep_size`` < W the expert slices are replicated W / ep_size times
(``training/expert_dp.py``): each replica adds 1/replicas of its slices' part, so the one all-reduce
over the world counts every expert once and every dense shard once.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from hiermoe_hf.runtime.expert_grads import expert_parameters
from hiermoe_hf.runtime.fsdp import is_sharded, local_view
from hiermoe_hf.runtime.registry import runtime_of


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    norm_type: float = 2.0,
    *,
    model: torch.nn.Module,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """Like ``torch.nn.utils.clip_grad_norm_``, with the norm taken over the whole (sharded) model.

    Collective over the default group (all W ranks): call it on every rank, after the expert grads were
    averaged over replicas (``all_reduce_gradients``; the plugin and callback do it). ``model`` is the patched model
    (wrapped or not); it says which of ``parameters`` are rank-local expert slices. Returns the total
    norm, the same on every rank.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    norm_type = float(norm_type)
    rt = runtime_of(model)
    expert_ids = {id(p) for p in expert_parameters(model)}
    # Replicated dense grads count once; expert slices and FSDP2 shards are summed over the ranks.
    dense = [p.grad for p in params if id(p) not in expert_ids and not is_sharded(p.grad)]
    rank_local = [p for p in params if id(p) in expert_ids or is_sharded(p.grad)]
    # Every rank must join the reduction, also one without grads; NCCL needs the tensor on the GPU.
    device = params[0].grad.device if params else next(model.parameters()).device
    dense_norm = _norm(dense, norm_type, device)
    summed = _summed_part(rank_local, expert_ids, norm_type, rt.replicas, device)
    if norm_type == float("inf"):
        if rt.global_world_size > 1:
            dist.all_reduce(summed, op=dist.ReduceOp.MAX)
        total = torch.maximum(dense_norm, summed)
    else:
        if rt.global_world_size > 1:
            dist.all_reduce(summed)
        total = (dense_norm.pow(norm_type) + summed).pow(1.0 / norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is non-finite ({total.item()}); "
            "pass error_if_nonfinite=False to clip anyway"
        )
    plain = [p for p in params if not is_sharded(p.grad)]
    if plain:
        torch.nn.utils.clip_grads_with_norm_(plain, max_norm, total)
    sharded = [local_view(p.grad) for p in params if is_sharded(p.grad)]
    if sharded:  # the same coefficient as clip_grads_with_norm_, applied to the local shards
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        with torch.no_grad():
            for g in sharded:
                g.mul_(coef.to(g.device))
    return total


def _summed_part(rank_local: list, expert_ids: set, norm_type: float, replicas: int, device) -> torch.Tensor:
    """This rank's share of the part of the norm that is summed over the whole world (one all-reduce):
    the p-th power of the norm of its expert slices and FSDP2 dense shards (for the max norm: their max).

    FSDP2 shards the dense part over all W ranks (each element on one rank), while each expert slice
    lives on ``replicas`` ranks (one per copy of the expert-parallel group, ``ep_size`` < W) holding the
    same replica-summed gradient: its p-th power enters with weight 1/replicas so that the sum over
    the world counts it once. (For the max norm, replicas are equal and a max counts them once anyway.)
    """
    if replicas == 1 or norm_type == float("inf"):  # one norm over all: the same arithmetic as without replicas
        norm = _norm([local_view(p.grad) for p in rank_local], norm_type, device)
        return norm if norm_type == float("inf") else norm.pow(norm_type)
    experts = _norm([p.grad for p in rank_local if id(p) in expert_ids], norm_type, device)
    shards = _norm([local_view(p.grad) for p in rank_local if id(p) not in expert_ids], norm_type, device)
    return experts.pow(norm_type) / replicas + shards.pow(norm_type)


def _norm(grads: list[torch.Tensor], norm_type: float, device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32, device=device)
    norm = torch.nn.utils.get_total_norm(grads, norm_type)
    return norm.to(device=device, dtype=torch.promote_types(norm.dtype, torch.float32))
