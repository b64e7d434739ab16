"""How a patched model's expert slices live beside DistributedDataParallel (DESIGN.md section 6).

DDP averages every gradient over the ranks and, at construction, copies rank 0's parameters to all
ranks. Expert slices differ per rank, and their gradients already sum every rank's tokens (the
combine's backward brings them home), so DDP must leave them alone and they must be divided by W
instead of averaged. Dense parameters keep DDP's usual treatment.
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from hiermoe_hf.runtime.registry import runtime_of
from hiermoe_hf.training.gradients import expert_parameters

_HOOKS_ATTR = "_hiermoe_grad_hooks"


def expert_parameter_names(model: torch.nn.Module) -> list[str]:
    """Qualified names (in ``model.named_parameters()``) of the rank-local expert parameters."""
    ids = {id(p) for p in expert_parameters(model)}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def keep_experts_out_of_ddp(model: torch.nn.Module) -> list[str]:
    """Tell a DDP wrapper built later to neither broadcast nor average the expert slices.

    Call on the unwrapped model, before ``accelerator.prepare`` / ``DistributedDataParallel(model)``.
    Names already on the ignore list (set by the user) are kept.
    """
    names = expert_parameter_names(model)
    present = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    merged = present + [n for n in names if n not in present]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, merged)
    return names


def divide_expert_grads_by_world(model: torch.nn.Module) -> int:
    """Scale each expert gradient contribution by 1/W as it is produced (idempotent per parameter).

    A tensor hook scales every backward's contribution before it is accumulated into ``.grad``, so
    gradient accumulation, clipping and logging all see the section 6 value. (A post-accumulate hook
    would rescale the already-accumulated sum on every micro-batch.) Returns the number of new hooks.
    """
    world = runtime_of(model).global_world_size  # all W ranks' tokens, whatever ep_size (training/expert_dp.py)
    if world == 1:
        return 0
    hooked: dict[int, object] = model.__dict__.setdefault(_HOOKS_ATTR, {})
    added = 0
    for p in expert_parameters(model):
        if id(p) in hooked or not p.requires_grad:
            continue
        hooked[id(p)] = p.register_hook(lambda g, w=world: g / w)
        added += 1
    return added
