"""How a patched model's expert slices live beside DistributedDataParallel (DESIGN.md section 6).

DDP averages every gradient over the ranks and, at construction, copies rank 0's parameters to all
ranks. Expert slices differ per rank, and their gradients already sum every rank's tokens (the
combine's backward brings them home), so DDP must leave them alone and they must be divided by W
instead of averaged. Dense parameters keep DDP's usual treatment.

``patch`` applies both (the ignore list and the 1/W gradient hooks) itself, so any DDP wrapper built
afterwards is exact: a hand-made ``DistributedDataParallel``, Accelerate's or the Trainer's. Both
steps are idempotent, so the plugin, the callback and ``all_reduce_gradients`` never scale twice.
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from hiermoe_hf.runtime.registry import moe_layers, runtime_of, unwrap

_HOOK_KEY = "_hiermoe_grad_hook"  # on each hooked expert Parameter: its hook handle
_IGNORED_ATTR = "_hiermoe_ddp_ignored"  # the names this library put on DDP's ignore list
# DDP names parameters relative to the module it wraps: the patched model itself, or a PeftModel
# around it (PeftModel.base_model.model is the patched model), or torch.compile's wrapper.
WRAPPER_PREFIXES = ("", "base_model.model.", "_orig_mod.", "_orig_mod.base_model.model.")

def expert_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The rank-local expert parameters of a patched model."""
    params = []
    for experts, layer in moe_layers(model).values():
        params += [getattr(experts, n) for n in layer.param_names]
    return params


def expert_parameter_names(model: torch.nn.Module) -> list[str]:
    """Qualified names (in ``model.named_parameters()``) of the rank-local expert parameters."""
    ids = {id(p) for p in expert_parameters(model)}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def keep_experts_out_of_ddp(model: torch.nn.Module) -> list[str]:
    """Tell a DDP wrapper built later to neither broadcast nor average the expert slices.

    Sets the list on the patched model (a PeftModel or Accelerate wrapper reads it from there through
    attribute forwarding), with each name under every prefix in ``WRAPPER_PREFIXES``; names DDP does
    not find are harmless. Names already on the list (set by the user) are kept. Call before the
    wrapper is built; ``patch`` does. Returns the expert names relative to ``model``.
    """
    names = expert_parameter_names(model)
    inner = unwrap(model)
    present = list(getattr(inner, "_ddp_params_and_buffers_to_ignore", []))
    ours = [p + n for n in expert_parameter_names(inner) for p in WRAPPER_PREFIXES]
    if inner is not model:
        ours += names
    merged = present + [n for n in ours if n not in present]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(inner, merged)
    inner.__dict__.setdefault(_IGNORED_ATTR, set()).update(ours)
    return names


def scale_grad_by_world(p: torch.nn.Parameter, world: int) -> bool:
    """Hook ``p`` so each gradient contribution is divided by ``world`` (once per parameter object).

    A tensor hook scales every backward's contribution before it is accumulated into ``.grad``, so
    gradient accumulation, clipping and logging all see the section 6 value. (A post-accumulate hook
    would rescale the already-accumulated sum on every micro-batch.) A frozen parameter cannot be
    hooked; the patched forward calls this again, so one unfrozen later is hooked before its backward.
    """
    if not p.requires_grad or _HOOK_KEY in p.__dict__:
        return False
    p.__dict__[_HOOK_KEY] = p.register_hook(lambda g, w=world: g / w)
    return True


def divide_expert_grads_by_world(model: torch.nn.Module) -> int:
    """``scale_grad_by_world`` on every expert slice (idempotent). Returns the number of new hooks."""
    world = runtime_of(model).global_world_size  # all W ranks' tokens, whatever ep_size (training/expert_dp.py)
    if world == 1:
        return 0
    return sum(scale_grad_by_world(p, world) for p in expert_parameters(model))


def release(model: torch.nn.Module) -> None:
    """Undo ``keep_experts_out_of_ddp`` and ``divide_expert_grads_by_world`` (for ``unpatch``)."""
    inner = unwrap(model)
    for p in expert_parameters(inner):
        handle = p.__dict__.pop(_HOOK_KEY, None)
        if handle is not None:
            handle.remove()
    ours = inner.__dict__.pop(_IGNORED_ATTR, set())
    if ours and hasattr(inner, "_ddp_params_and_buffers_to_ignore"):
        kept = [n for n in inner._ddp_params_and_buffers_to_ignore if n not in ours]
        for p in expert_parameters(inner):
            p.__dict__.pop("_ddp_ignored", None)
        if kept:
            inner._ddp_params_and_buffers_to_ignore = kept
        else:
            del inner._ddp_params_and_buffers_to_ignore
