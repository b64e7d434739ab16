"""``patch_experts`` / ``unpatch``: act on one model instance, never on Transformers' classes.

The public ``hiermoe_hf.patch`` (``hiermoe_hf/api.py``) is ``patch_experts`` plus the collective
``save_pretrained`` of ``checkpoint/save.py``, bound on the instance.
"""

from __future__ import annotations

import math
import types

import torch
import torch.distributed as dist

from hiermoe_hf import patches
from hiermoe_hf.config import HierMoEConfig, naming_env
from hiermoe_hf.cost.calibration import PATCH_CALIBRATION, calibrate_at_patch
from hiermoe_hf.cost.model import load_cost_model
from hiermoe_hf.cost.trials import StrategyTrials, chunk_candidates, trial_candidates
from hiermoe_hf.exchange.bounded import resolve_timeout
from hiermoe_hf.exchange.comm import StageGroups
from hiermoe_hf.placement import Placement
from hiermoe_hf.runtime import expert_grads, generate, guards, registry
from hiermoe_hf.runtime.ep_layout import EPLayout, group_topology
from hiermoe_hf.runtime.forward import experts_forward
from hiermoe_hf.runtime.registry import LAYER_ATTR, STATE_ATTR, is_patched, moe_layers, runtime_of, world
from hiermoe_hf.runtime.state import LayerState, Runtime
from hiermoe_hf.topology import Topology, parse_levels


def _shard(experts: torch.nn.Module, names: tuple[str, ...], local_ids: torch.Tensor) -> None:
    """Keep only this rank's expert slices; the full tensors are released."""
    for name in names:
        full = getattr(experts, name)
        local = full.detach()[local_ids.to(full.device)].clone()
        setattr(experts, name, torch.nn.Parameter(local, requires_grad=full.requires_grad))


def patch_experts(model: torch.nn.Module, config: HierMoEConfig | None, experts_are_local: bool) -> torch.nn.Module:
    """``hiermoe_hf.patch`` without the collective save (``hiermoe_hf/api.py`` binds it);
    ``experts_are_local``: the experts modules already hold only this rank's slots
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
    sites = patches.find_experts(model)  # ValueError naming the family for a model it cannot serve
    num_experts = sites[0][0].num_experts
    layout, topology = resolve_layout(config, num_experts)
    world_size, rank = layout.ep_size, layout.rank  # the expert-parallel group's from here on
    ep_group, replica_group = process_groups(layout)
    groups = StageGroups(topology, rank, layout.replica, layout.replicas) if world_size > 1 else None
    runtime = Runtime(
        config, topology, rank, groups, _family(model), _cost_model(config, topology, groups), layout,
        ep_group, replica_group, _trials(config, topology), resolve_timeout(config.collective_timeout_s),
    )
    for site, experts in sites:
        guards.refuse_adapted_experts(experts, site.name, parent=model.get_submodule(site.block_name))
        _check_rows(site, experts, num_experts // world_size if experts_are_local else num_experts)
        layer = LayerState(site.block_name, runtime, Placement.contiguous(num_experts, world_size), site.param_names)
        if world_size > 1 and not experts_are_local:
            _shard(experts, layer.param_names, layer.local_logical())
        setattr(experts, LAYER_ATTR, layer)
        experts.forward = types.MethodType(experts_forward, experts)
        block = model.get_submodule(site.block_name)
        hooks = patches.block_hooks(block)
        if world_size > 1 and max(chunk_candidates(config.overlap_chunks)) > 1 and hooks is not None:
            # work beside the routed experts (shared experts) runs while the routed tokens travel
            block.forward = types.MethodType(_block_forward(hooks), block)
    setattr(model, STATE_ATTR, runtime)
    if layout.world_size > 1:
        # Section 6 under any wrapper built later: DDP leaves the slices alone, their grads get 1/W
        # (W: the whole world; replicas of a smaller expert-parallel group are summed by expert_dp).
        expert_grads.keep_experts_out_of_ddp(model)
        expert_grads.divide_expert_grads_by_world(model)
    if world_size > 1:  # the forward has collectives: every rank must keep calling it in generate
        generate.install_synced_generate(model)
    return outer


def resolve_layout(config: HierMoEConfig, num_experts: int) -> tuple[EPLayout, Topology]:
    """This rank's expert-parallel layout and its group's topology; ValueError for a bad ep_size,
    topology or strategy (before any collective, so every rank fails alike)."""
    world_size, global_rank = world()
    refuse_missing_process_group(config, world_size)
    with naming_env(config, "ep_size"):  # a value from HIERMOE_* is named in the error
        layout = EPLayout.resolve(config.ep_size, world_size, global_rank, num_experts)
    with naming_env(config, "topology", "ep_size"):
        topology = group_topology(config.topology, layout)
    if config.dispatch != "auto":
        with naming_env(config, "dispatch"):
            topology.stages(config.dispatch)  # raises for a strategy this topology lacks
    return layout, topology


def refuse_missing_process_group(config: HierMoEConfig, world_size: int) -> None:
    """ValueError when the config asks for several ranks but no process group exists yet (the usual
    cause of a world of 1): say how to start one, rather than that the sizes differ."""
    if world_size > 1 or (dist.is_available() and dist.is_initialized()):
        return
    levels = parse_levels(config.topology) if config.topology is not None else (1,)
    wanted = max(math.prod(levels), config.ep_size or 1)
    if wanted > 1:
        shape = f"topology {'x'.join(map(str, levels))}" if math.prod(levels) > 1 else f"ep_size={config.ep_size}"
        raise ValueError(
            f"{shape} needs {wanted} ranks but torch.distributed's process group is not initialised (this process "
            f"is alone): start {wanted} processes with `torchrun --nproc-per-node {wanted} script.py` or "
            "`accelerate launch`, and create the group before patching (torch.distributed.init_process_group(), "
            "which Accelerator() and the Trainer also do); or patch for one process with topology '1x1'"
        )


def process_groups(layout: EPLayout) -> tuple[object, object]:
    """(this rank's expert-parallel group, its replica group); None for a group of one rank, the
    default group for one spanning the world. Collective: every rank creates every group in order."""
    def build(all_ranks: list[list[int]], mine: list[int]):
        if len(mine) == 1:
            return None
        if len(mine) == layout.world_size:
            return dist.group.WORLD
        out = None
        for ranks in all_ranks:
            g = dist.new_group(ranks)
            out = g if ranks == mine else out
        return out

    ep = build([layout.group_ranks(j) for j in range(layout.replicas)], layout.group_ranks(layout.replica))
    rep = build([layout.replica_ranks(g) for g in range(layout.ep_size)], layout.replica_ranks(layout.rank))
    return ep, rep


def _trials(config: HierMoEConfig, topology: Topology) -> StrategyTrials | None:
    """The timed choices (``cost/trials.py``): ``dispatch="auto"`` without a cost model times its
    strategies (with one candidate, one level, there is nothing to time), ``overlap_chunks="auto"``
    times 1 against ``trials.OVERLAP_CHUNKS`` chunks; None when neither is timed."""
    timed = config.dispatch == "auto" and config.cost_model is None
    chunks = chunk_candidates(config.overlap_chunks)
    if topology.world_size == 1 or (not timed and len(chunks) == 1):
        return None
    return StrategyTrials(trial_candidates(topology) if timed else (), topology.world_size, chunks)


def _cost_model(config: HierMoEConfig, topology: Topology, groups: StageGroups | None):
    """The constants ``auto`` prices with: ``cost_model="calibrate"`` measures this cluster's links
    now (collective; defaults on one rank); else the given file or preset, or the defaults."""
    if config.cost_model == PATCH_CALIBRATION:
        return calibrate_at_patch(topology, groups) if groups is not None else load_cost_model(None, topology)
    return load_cost_model(config.cost_model, topology)


def _check_rows(site, experts: torch.nn.Module, rows: int) -> None:
    """ValueError unless every per-expert parameter holds ``rows`` experts (E, or E/ep_size when loaded local)."""
    got = {p: getattr(experts, p).shape[0] for p in site.param_names}
    if set(got.values()) != {rows}:
        raise ValueError(
            f"{site.name}: per-expert parameters hold {got} experts, expected {rows} "
            f"(the experts module says num_experts={site.num_experts})"
        )


def _family(model: torch.nn.Module) -> str:
    """The model's ``config.model_type`` (informational: ``Runtime.model_type``), else its class name."""
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def _block_forward(hooks):
    def hiermoe_side_forward(block, hidden_states):
        return hooks.forward_with_side(block, hidden_states)

    return hiermoe_side_forward


def _remove_block_forward(block: torch.nn.Module) -> None:
    """Drop the side-work forward ``patch`` installed on ``block`` (and nothing someone else set)."""
    installed = block.__dict__.get("forward")
    if getattr(getattr(installed, "__func__", None), "__name__", None) == "hiermoe_side_forward":
        del block.forward


def _gather_full(local: torch.Tensor, placement: Placement, group) -> torch.Tensor:
    """All group ranks' slot tensors [e, ...] -> the full tensor [E, ...] in logical expert order."""
    parts = [torch.empty_like(local) for _ in range(placement.world_size)]
    dist.all_gather(parts, local.contiguous(), group=group)
    phys = torch.cat(parts)
    return phys[placement.phys_of_E.to(phys.device)]


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Gather the full experts back (collective) and restore Transformers' forward on every block.

    The expert parameters are new objects afterwards: an optimizer built on the patched model still
    holds the slices and would silently stop updating the experts; build a new optimizer.
    """
    rt = runtime_of(model)
    outer, model = model, registry.unwrap(model)
    expert_grads.release(model)
    generate.remove_synced_generate(model)
    for _, (experts, layer) in moe_layers(model).items():
        _remove_block_forward(model.get_submodule(layer.name))
        if rt.world_size > 1:
            for name in layer.param_names:
                local = getattr(experts, name)
                full = _gather_full(local.detach(), layer.placement, rt.ep_group)
                setattr(experts, name, torch.nn.Parameter(full, requires_grad=local.requires_grad))
        del experts.forward
        delattr(experts, LAYER_ATTR)
    delattr(model, STATE_ATTR)
    model.__dict__.pop("save_pretrained", None)  # back to Transformers' own save
    return outer
