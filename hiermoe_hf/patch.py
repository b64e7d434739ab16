"""``patch`` / ``unpatch`` / ``stats``: act on one model instance, never on Transformers' classes."""

from __future__ import annotations

import time
import types

import torch
import torch.distributed as dist

from . import patches
from .comm import StageGroups
from .config import HierMoEConfig
from .cost_model import load_cost_model
from .dispatcher import ExchangePlan, combine, dispatch, stage_stats
from .experts import local_experts_forward
from .kernels import select_ops
from .placement import Placement
from .state import LayerState, Runtime
from .strategy import pick_strategy
from .swap_stats import record_routing
from .topology import Topology

_STATE_ATTR = "_hiermoe_runtime"
_LAYER_ATTR = "_hiermoe_layer"


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def is_patched(model: torch.nn.Module) -> bool:
    return hasattr(model, _STATE_ATTR)


def runtime_of(model: torch.nn.Module) -> Runtime:
    if not is_patched(model):
        raise ValueError("this model is not patched by hiermoe_hf; call hiermoe_hf.patch(model) first")
    return getattr(model, _STATE_ATTR)


def moe_layers(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, LayerState]]:
    """Block name -> (experts module, its LayerState), for a patched model."""
    runtime_of(model)
    out = {}
    for _, module in model.named_modules():
        layer = getattr(module, _LAYER_ATTR, None)
        if layer is not None:
            out[layer.name] = (module, layer)
    return out


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
    if is_patched(model):
        return model
    config = config or HierMoEConfig()
    if not isinstance(config, HierMoEConfig):
        raise TypeError(f"config must be a hiermoe_hf.HierMoEConfig, got {type(config).__name__}")
    adapter = patches.adapter_for(getattr(model, "config", None))
    world, rank = _world()
    topology = Topology.resolve(config.topology, world)
    if config.dispatch != "auto":
        topology.stages(config.dispatch)  # raises for a strategy this topology lacks
    blocks = patches.find_moe_blocks(model, adapter)
    if not blocks:
        raise ValueError(f"no {adapter.BLOCK_CLASS} block found in this {adapter.MODEL_TYPE} model")
    num_experts = adapter.num_experts(model.config)
    if num_experts % world:
        raise ValueError(
            f"{num_experts} experts per layer cannot be split over {world} ranks; "
            f"use a world size that divides {num_experts}"
        )
    groups = StageGroups(topology, rank) if world > 1 else None
    runtime = Runtime(config, topology, rank, groups, adapter.MODEL_TYPE, load_cost_model(config.cost_model, topology))
    for name, block in blocks:
        experts = block.experts
        layer = LayerState(name, runtime, Placement.contiguous(num_experts, world), adapter.EXPERT_PARAMS)
        # hiermoe_hf.from_pretrained already loaded only this rank's experts (contiguous placement).
        if world > 1 and not experts.__dict__.pop("_hiermoe_local_experts_loaded", False):
            _shard(experts, layer.param_names, layer.local_logical())
        setattr(experts, _LAYER_ATTR, layer)
        experts.forward = types.MethodType(_experts_forward, experts)
    setattr(model, _STATE_ATTR, runtime)
    from .checkpoint_save import save_pretrained  # noqa: PLC0415  (checkpoint_save imports this module)

    model.save_pretrained = types.MethodType(save_pretrained, model)  # collective, logical expert order
    return model


def _experts_forward(self, hidden_TH: torch.Tensor, topk_ids_TK: torch.Tensor, topk_w_TK: torch.Tensor):
    """Replaces the experts module's forward on this instance (same signature as Transformers')."""
    layer: LayerState = getattr(self, _LAYER_ATTR)
    rt = layer.runtime
    T, K = topk_ids_TK.shape
    if rt.world_size == 1:
        layer.last = {"strategy": "local", "tokens": T, "kernels": "torch", "stages": [], "load_per_rank": [T * K]}
        return type(self).forward(self, hidden_TH, topk_ids_TK, topk_w_TK)
    e = layer.local_experts
    placement = layer.placement
    if placement.phys_of_E.device != topk_ids_TK.device:
        layer.placement = placement = placement.to(topk_ids_TK.device)
    phys_TK = placement.phys_of_E[topk_ids_TK]
    ops = select_ops(rt.config.kernels, hidden_TH.device)
    strategy, predicted = _choose(rt, phys_TK // e, hidden_TH)
    plan = ExchangePlan.build(rt.topology, rt.groups, strategy, e)
    t0 = _mark(hidden_TH)
    x_RH, phys_RK, w_RK, handle = dispatch(hidden_TH, phys_TK, topk_w_TK, plan, ops)
    t1 = _mark(hidden_TH)
    y_RH, counts_e = local_experts_forward(self, x_RH, phys_RK, w_RK, e, ops)
    t2 = _mark(hidden_TH)
    out_TH = combine(y_RH, handle, ops)
    t3 = _mark(hidden_TH)
    row_bytes = hidden_TH.shape[1] * hidden_TH.element_size()
    meta_bytes = K * (4 + (8 if topk_w_TK.dtype == torch.float64 else 4))
    layer.last = {
        "strategy": strategy,
        "tokens": T,
        "kernels": ops.name,
        "stages": stage_stats(handle, plan, row_bytes, meta_bytes),
        "predicted_ms": predicted.get(strategy),
        "predicted_ms_by_strategy": predicted,
        "measured_ms": _Elapsed((t0, t1), (t2, t3)),
        "cost_model": rt.cost_model.source,
        "cost_model_defaults": bool(rt.cost_model.defaults_used),
        # device tensors: read back in stats(), not here, so the forward adds no host sync
        "expert_rows": counts_e.sum(),
        "load_per_rank": torch.bincount((phys_TK // e).flatten(), minlength=rt.world_size),
    }
    if layer.runtime.config.swap_interval > 0 or getattr(layer, "record_routing", False):
        record_routing(layer, topk_ids_TK, hidden_TH.requires_grad)  # bounded window for swap planning
    return out_TH


def _choose(rt: Runtime, dest_rank_TK: torch.Tensor, hidden_TH: torch.Tensor) -> tuple[str, dict]:
    if rt.config.dispatch != "auto":
        return rt.config.dispatch, {}
    row_bytes = hidden_TH.shape[1] * hidden_TH.element_size()
    return pick_strategy(rt.topology, rt.topology.strategies(), dest_rank_TK, row_bytes, rt.cost_model, None)


def _mark(like: torch.Tensor):
    """A point in time on ``like``'s device: a CUDA event (no host sync) or the CPU clock."""
    if like.is_cuda:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


class _Elapsed:
    """Milliseconds summed over (start, end) mark pairs, resolved only when ``stats`` asks."""

    def __init__(self, *spans):
        self.spans = spans

    def ms(self) -> float:
        total = 0.0
        for start, end in self.spans:
            if isinstance(start, float):
                total += 1e3 * (end - start)
            else:
                end.synchronize()
                total += start.elapsed_time(end)
        return total


def _host(value):
    """A stats value as plain Python: tensors to numbers/lists, timings to milliseconds."""
    if isinstance(value, _Elapsed):
        return value.ms()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return list(value) if isinstance(value, list) else value


def _gather_full(local: torch.Tensor, placement: Placement) -> torch.Tensor:
    """All ranks' slot tensors [e, ...] -> the full tensor [E, ...] in logical expert order."""
    parts = [torch.empty_like(local) for _ in range(placement.world_size)]
    dist.all_gather(parts, local.contiguous())
    phys = torch.cat(parts)
    return phys[placement.phys_of_E.to(phys.device)]


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Gather the full experts back (collective) and restore Transformers' forward on every block."""
    rt = runtime_of(model)
    for _, (experts, layer) in moe_layers(model).items():
        if rt.world_size > 1:
            for name in layer.param_names:
                local = getattr(experts, name)
                full = _gather_full(local.detach(), layer.placement)
                setattr(experts, name, torch.nn.Parameter(full, requires_grad=local.requires_grad))
        del experts.forward
        delattr(experts, _LAYER_ATTR)
    delattr(model, _STATE_ATTR)
    model.__dict__.pop("save_pretrained", None)  # back to Transformers' own save
    return model


def stats(model: torch.nn.Module) -> dict[str, dict]:
    """Per MoE block (keyed by module name): the last forward on this rank and the swaps done.

    Each value: ``strategy``, ``tokens``, ``kernels``, ``stages`` (list of dicts: ``name``,
    ``group_size``, ``rows_sent``, ``rows_received``, ``bytes_sent`` — rows to/from *other* ranks),
    ``load_per_rank`` (this rank's selections per destination rank), ``swaps``, and the cost
    model's view: ``predicted_ms`` (chosen strategy; ``dispatch="auto"`` only, else None),
    ``predicted_ms_by_strategy``, ``measured_ms`` (forward dispatch + combine wall time),
    ``cost_model`` (where its constants came from) and ``cost_model_defaults``.
    """
    out = {}
    for name, (_, layer) in moe_layers(model).items():
        entry = {k: _host(v) for k, v in layer.last.items()}
        entry["stages"] = [dict(s) for s in layer.last.get("stages", [])]
        entry["swaps"] = list(layer.swaps)
        out[name] = entry
    return out
