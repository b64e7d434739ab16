"""``patch`` / ``unpatch``: act on one model instance, never on Transformers' classes."""

from __future__ import annotations

import types

import torch
import torch.distributed as dist

from hiermoe_hf import patches
from hiermoe_hf.checkpoint.save import save_pretrained
from hiermoe_hf.config import HierMoEConfig
from hiermoe_hf.cost.calibration import PATCH_CALIBRATION, calibrate_at_patch
from hiermoe_hf.cost.model import load_cost_model
from hiermoe_hf.exchange.comm import StageGroups
from hiermoe_hf.placement import Placement
from hiermoe_hf.runtime.forward import experts_forward
from hiermoe_hf.runtime.registry import LAYER_ATTR, STATE_ATTR, is_patched, moe_layers, runtime_of, unwrap, world
from hiermoe_hf.runtime.state import LayerState, Runtime
from hiermoe_hf.topology import Topology


def _shard(experts: torch.nn.Module, names: tuple[str, ...], local_ids: torch.Tensor) -> None:
    """Keep only this rank's expert slices; the full tensors are released."""
    for name in names:
        full = getattr(experts, name)
        local = full.detach()[local_ids.to(full.device)].clone()
        setattr(experts, name, torch.nn.Parameter(local, requires_grad=full.requires_grad))


def patch(model: torch.nn.Module, config: HierMoEConfig | None = None) -> torch.nn.Module:
    """Shard the routed experts over the default process group and route tokens hierarchically.

    Collective: every rank calls it with the same model and config. Patching twice is a no-op.
    Create the optimizer afterwards (expert parameters are replaced by their local slices).
    """
    return patch_experts(model, config, experts_are_local=False)


def patch_experts(model: torch.nn.Module, config: HierMoEConfig | None, experts_are_local: bool) -> torch.nn.Module:
    """``patch``; ``experts_are_local``: the experts modules already hold only this rank's slots
    (``hiermoe_hf.from_pretrained`` loaded them so), in the contiguous placement."""
    if is_patched(model):
        return model
    config = config or HierMoEConfig()
    if not isinstance(config, HierMoEConfig):
        raise TypeError(f"config must be a hiermoe_hf.HierMoEConfig, got {type(config).__name__}")
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
    runtime = Runtime(config, topology, rank, groups, adapter.MODEL_TYPE, _cost_model(config, topology, groups))
    for name, block in blocks:
        experts = block.experts
        layer = LayerState(name, runtime, Placement.contiguous(num_experts, world_size), adapter.EXPERT_PARAMS)
        if world_size > 1 and not experts_are_local:
            _shard(experts, layer.param_names, layer.local_logical())
        setattr(experts, LAYER_ATTR, layer)
        experts.forward = types.MethodType(experts_forward, experts)
        if _overlaps_side_work(adapter, config, world_size):
            block.forward = types.MethodType(_block_forward(adapter), block)
    setattr(model, STATE_ATTR, runtime)
    model.save_pretrained = types.MethodType(save_pretrained, model)  # collective, logical expert order
    return model


def _cost_model(config: HierMoEConfig, topology: Topology, groups: StageGroups | None):
    """The constants ``auto`` prices with: ``cost_model="calibrate"`` measures this cluster's links
    now (collective; defaults on one rank); else the given file or preset, or the defaults."""
    if config.cost_model == PATCH_CALIBRATION:
        return calibrate_at_patch(topology, groups) if groups is not None else load_cost_model(None, topology)
    return load_cost_model(config.cost_model, topology)


def _overlaps_side_work(adapter, config: HierMoEConfig, world_size: int) -> bool:
    """Blocks with work beside the routed experts (DeepSeek-V3's shared experts) run it while the
    routed tokens travel, when the layer pipelines (``overlap_chunks`` > 1)."""
    return world_size > 1 and config.overlap_chunks > 1 and hasattr(adapter, "forward_with_side")


def _block_forward(adapter):
    def forward(block, hidden_states):
        return adapter.forward_with_side(block, hidden_states)

    return forward


def _gather_full(local: torch.Tensor, placement: Placement) -> torch.Tensor:
    """All ranks' slot tensors [e, ...] -> the full tensor [E, ...] in logical expert order."""
    parts = [torch.empty_like(local) for _ in range(placement.world_size)]
    dist.all_gather(parts, local.contiguous())
    phys = torch.cat(parts)
    return phys[placement.phys_of_E.to(phys.device)]


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Gather the full experts back (collective) and restore Transformers' forward on every block."""
    rt = runtime_of(model)
    for _, block in patches.find_moe_blocks(unwrap(model), patches.ADAPTERS[rt.model_type]):
        block.__dict__.pop("forward", None)  # the side-work forward, if patch installed one
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
    return model
