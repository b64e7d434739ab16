"""Where ``patch`` keeps its state on a model instance, and the look-ups every other module uses."""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate.utils import extract_model_from_parallel

from hiermoe_hf.runtime.state import LayerState, Runtime

STATE_ATTR = "_hiermoe_runtime"  # on the model: its Runtime
LAYER_ATTR = "_hiermoe_layer"  # on each patched experts module: its LayerState


def world() -> tuple[int, int]:
    """(world size, rank) of the default process group: *global* ranks; (1, 0) when none is initialised.

    With ``HierMoEConfig.ep_size`` smaller than the world these are not a patched model's expert-parallel
    rank and size: those are ``Runtime.rank`` / ``Runtime.world_size`` (``runtime/ep_layout.py``).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def patched_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The patched model inside any wrapper (DDP, Accelerate, ``torch.compile``: Accelerate's own
    unwrap; then a PEFT model's base model), or None when there is no patched model inside."""
    if hasattr(model, STATE_ATTR):
        return model
    inner = extract_model_from_parallel(model)
    if not hasattr(inner, STATE_ATTR) and hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner if hasattr(inner, STATE_ATTR) else None


def is_patched(model: torch.nn.Module) -> bool:
    return patched_module(model) is not None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The patched model inside ``model`` (see ``patched_module``); ValueError when there is none."""
    inner = patched_module(model)
    if inner is None:
        raise ValueError("this model is not patched by hiermoe_hf; call hiermoe_hf.patch(model) first")
    return inner


def runtime_of(model: torch.nn.Module) -> Runtime:
    return getattr(unwrap(model), STATE_ATTR)


def moe_layers(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, LayerState]]:
    """Block name -> (experts module, its LayerState), for a patched model (or a wrapper of one)."""
    out = {}
    for _, module in unwrap(model).named_modules():
        layer = getattr(module, LAYER_ATTR, None)
        if layer is not None:
            out[layer.name] = (module, layer)
    return out
