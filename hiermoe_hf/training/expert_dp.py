"""Expert data parallelism (``HierMoEConfig.ep_size`` < W, issue 11): expert gradients over replicas.

With W ranks as R = W / ep_size replicas of an expert-parallel group, each expert slice lives on R
ranks (its replica group), and each copy's gradient sums only its own group's tokens. Training equal
to single-process training on the global batch with the loss averaged over the W ranks needs, for
every expert, (1/W) * the sum over all W ranks' tokens: each copy is divided by W (as its tokens are
summed, ``ddp.divide_expert_grads_by_world`` / ``all_reduce_gradients``) and the copies are then
summed over the replica group (``sync_expert_grads``). Dense gradients are averaged over the whole
world as before (DDP, ``all_reduce_gradients``).

The price of the layout is this all-reduce: a ring all-reduce of n bytes over R ranks sends
2 (R-1)/R n bytes per rank (``allreduce_bytes_per_rank``), once per optimizer step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hiermoe_hf.cost.pricing import ring_allreduce_bytes
from hiermoe_hf.runtime.expert_grads import expert_parameters
from hiermoe_hf.runtime.registry import runtime_of, unwrap
from hiermoe_hf.training.buckets import all_reduce_bucketed


def allreduce_bytes_per_rank(model: torch.nn.Module) -> float:
    """Bytes this rank sends per optimizer step averaging its expert gradients over the replicas."""
    rt = runtime_of(model)
    nbytes = sum(p.numel() * p.element_size() for p in expert_parameters(model) if p.requires_grad)
    return ring_allreduce_bytes(nbytes, rt.replicas)


def sync_expert_grads(model: torch.nn.Module) -> None:
    """Sum every expert gradient over the ranks holding the same experts (one per replica).

    Collective over each replica group; a no-op without replicas. Call once per optimizer step,
    after the expert grads were divided by the world size and before clipping and the step. A rank
    without a gradient where a replica has one joins with zeros (and then holds the sum).
    """
    rt = runtime_of(model)
    if rt.replicas == 1 or rt.replica_group is None:
        return
    params = [p for p in expert_parameters(model) if p.requires_grad]
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int64, device=params[0].device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX, group=rt.replica_group)
    grads = []
    for p, h in zip(params, has.tolist()):
        if h and p.grad is None:
            p.grad = torch.zeros_like(p)
        if h:
            grads.append(p.grad)
    for dtype in sorted({g.dtype for g in grads}, key=str):  # same order on every rank
        all_reduce_bucketed([g for g in grads if g.dtype == dtype], group=rt.replica_group)  # bounded memory


class ExpertGradSync:
    """``sync_expert_grads`` at most once per optimizer step, for loops that may clip before stepping.

    Called by the global-norm clip and again before the optimizer step; it syncs only if a forward
    of the model ran since the last sync (a forward pre-hook marks new gradients as pending), so the
    clip and the step see the same, once-summed gradients, also under gradient accumulation.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.pending = False
        replicated = runtime_of(model).replicas > 1
        self._handle = unwrap(model).register_forward_pre_hook(self._on_forward) if replicated else None

    def _on_forward(self, module, args) -> None:
        self.pending = True

    def __call__(self) -> None:
        if self.pending:
            sync_expert_grads(self.model)
            self.pending = False

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
