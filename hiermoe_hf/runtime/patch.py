"""``patch`` / ``unpatch``: act on one model instance, never on Transformers' classes."""

from __future__ import annotations

import types

import torch
import torch.distributed as dist

from hiermoe_hf import patches
from hiermoe_hf.checkpoint.save import save_pretrained
from hiermoe_hf.config import HierMoEConfig
from hiermoe_hf.cost.model import load_cost_model
from hiermoe_hf.exchange.comm import StageGroups
from hiermoe_hf.placement import Placement
from hiermoe_hf.runtime import generate, guards, registry
from hiermoe_hf.runtime.forward import experts_forward
from hiermoe_hf.runtime.registry import LAYER_ATTR, STATE_ATTR, is_patched, moe_layers, runtime_of, world
from hiermoe_hf.runtime.state import LayerState, Runtime
from hiermoe_hf.topology import Topology
from hiermoe_hf.training import ddp


def _shard(experts: torch.nn.Module, names: tuple[str, ...], local_ids: torch.Tensor) -> None:
    """Keep only this rank's expert slices; the full tensors are released."""
    for name in names:
        full = getattr(experts, name)
        local = full.detach()[local_ids.to(full.device)].clone()
        setattr(experts, name, torch.nn.Parameter(local, requires_grad=full.requires_grad))


def patch(model: torch.nn.Module, config: HierMoEConfig | None = None) -> torch.nn.Module:
    """Shard the routed experts over the default process group and route tokens hierarchically.

    Collective: every rank calls it with the same model and config. Patching again with the same
    config (or none) is a no-op; with a different config it raises. Create the optimizer afterwards
    (expert parameters are replaced by their local slices). ``model`` may be a PEFT model (its base
    model is patched, PEFT's own ``save_pretrained`` stays). Wrap the result in DDP afterwards: the
    expert slices are already on DDP's ignore list and their gradients scaled by 1/W (section 6).
    """
    return patch_experts(model, config, experts_are_local=False)


def patch_experts(model: torch.nn.Module, config: HierMoEConfig | None, experts_are_local: bool) -> torch.nn.Module:
    """``patch``; ``experts_are_local``: the experts modules already hold only this rank's slots
    (``hiermoe_hf.from_pretrained`` loaded them so), in the contiguous placement."""
    if config is not None and not isinstance(config, HierMoEConfig):
        raise TypeError(f"config must be a hiermoe_hf.HierMoEConfig, got {type(config).__name__}")
    if is_patched(model):
        current = runtime_of(model).config
        if config is not None and config != current:
            raise ValueError(
                f"this model is already patched with {current}; patching it again with {config} would be ignored. "
                "Call hiermoe_hf.unpatch(model) first to change the configuration"
            )
        return model
    config = config or HierMoEConfig()
    guards.refuse_wrappers(model)
    outer, model = model, guards.patch_target(model)
    adapter = patches.adapter_for(getattr(model, "config", None))
    world_size, rank = world()
    topology = Topology.resolve(config.topology, world_size)
    if config.dispatch != "auto":
        topology.stages(config.dispatch)  # raises for a strategy this topology lacks
    blocks = patches.find_moe_blocks(model, adapter)
    if not blocks:
        raise ValueError(f"no {adapter.BLOCK_CLASS} block found in this {adapter.MODEL_TYPE} model")
    num_experts = adapter.num_experts(model.config)
    if num_experts % world_size:
        raise ValueError(
            f"{num_experts} experts per layer cannot be split over {world_size} ranks; "
            f"use a world size that divides {num_experts}"
        )
    groups = StageGroups(topology, rank) if world_size > 1 else None
    runtime = Runtime(config, topology, rank, groups, adapter.MODEL_TYPE, load_cost_model(config.cost_model, topology))
    for name, block in blocks:
        experts = block.experts
        guards.refuse_adapted_experts(experts, name)
        layer = LayerState(name, runtime, Placement.contiguous(num_experts, world_size), adapter.EXPERT_PARAMS)
        if world_size > 1 and not experts_are_local:
            _shard(experts, layer.param_names, layer.local_logical())
        setattr(experts, LAYER_ATTR, layer)
        experts.forward = types.MethodType(experts_forward, experts)
    setattr(model, STATE_ATTR, runtime)
    model.save_pretrained = types.MethodType(save_pretrained, model)  # collective, logical expert order
    if world_size > 1:
        # Section 6 under any wrapper built later: DDP leaves the slices alone, their grads get 1/W.
        ddp.keep_experts_out_of_ddp(model)
        ddp.divide_expert_grads_by_world(model)
        generate.install_synced_generate(model)
    return outer


def _gather_full(local: torch.Tensor, placement: Placement) -> torch.Tensor:
    """All ranks' slot tensors [e, ...] -> the full tensor [E, ...] in logical expert order."""
    parts = [torch.empty_like(local) for _ in range(placement.world_size)]
    dist.all_gather(parts, local.contiguous())
    phys = torch.cat(parts)
    return phys[placement.phys_of_E.to(phys.device)]


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Gather the full experts back (collective) and restore Transformers' forward on every block.

    The expert parameters are new objects afterwards: an optimizer built on the patched model still
    holds the slices and would silently stop updating the experts; build a new optimizer.
    """
    rt = runtime_of(model)
    outer, model = model, registry.unwrap(model)
    ddp.release(model)
    generate.remove_synced_generate(model)
    for _, (experts, layer) in moe_layers(model).items():
        if rt.world_size > 1:
            for name in layer.param_names:
                local = getattr(experts, name)
                full = _gather_full(local.detach(), layer.placement)
                setattr(experts, name, torch.nn.Parameter(full, requires_grad=local.requires_grad))
        del experts.forward
        delattr(experts, LAYER_ATTR)
    delattr(model, STATE_ATTR)
    model.__dict__.pop("save_pretrained", None)  # back to Transformers' own save
    return outer
