"""The patched experts forward of one MoE block: choose a strategy, dispatch, local experts, combine."""

from __future__ import annotations

import torch

from hiermoe_hf.cost.auto import pick_strategy
from hiermoe_hf.exchange.dispatcher import ExchangePlan, combine, dispatch, stage_stats
from hiermoe_hf.exchange.experts import local_experts_forward
from hiermoe_hf.kernels import select_ops
from hiermoe_hf.runtime import guards
from hiermoe_hf.runtime.registry import LAYER_ATTR
from hiermoe_hf.runtime.state import Elapsed, ForwardRecord, LayerState, Runtime


def experts_forward(self, hidden_TH: torch.Tensor, topk_ids_TK: torch.Tensor, topk_w_TK: torch.Tensor):
    """Replaces the experts module's forward on this instance (same signature as Transformers')."""
    layer: LayerState = getattr(self, LAYER_ATTR)
    rt = layer.runtime
    T, K = topk_ids_TK.shape
    if rt.world_size == 1:
        layer.last = ForwardRecord("local", T, "torch", (), [T * K])
        return type(self).forward(self, hidden_TH, topk_ids_TK, topk_w_TK)
    e = layer.local_experts
    placement = layer.placement
    guards.check_forward(self, layer, topk_ids_TK)
    if placement.phys_of_E.device != topk_ids_TK.device:
        layer.placement = placement = placement.to(topk_ids_TK.device)
    phys_TK = placement.phys_of_E[topk_ids_TK]
    ops = select_ops(rt.config.kernels, hidden_TH.device)
    strategy, predicted = _choose(rt, phys_TK // e, hidden_TH)
    plan = ExchangePlan.build(rt.topology, rt.groups, strategy, e)
    t0 = Elapsed.mark(hidden_TH)
    x_RH, phys_RK, w_RK, handle = dispatch(hidden_TH, phys_TK, topk_w_TK, plan, ops)
    t1 = Elapsed.mark(hidden_TH)
    y_RH, counts_e = local_experts_forward(self, x_RH, phys_RK, w_RK, e, ops)
    t2 = Elapsed.mark(hidden_TH)
    out_TH = combine(y_RH, handle, ops)
    t3 = Elapsed.mark(hidden_TH)
    row_bytes = hidden_TH.shape[1] * hidden_TH.element_size()
    meta_bytes = K * (4 + (8 if topk_w_TK.dtype == torch.float64 else 4))
    layer.last = ForwardRecord(
        strategy=strategy,
        tokens=T,
        kernels=ops.name,
        stages=tuple(stage_stats(handle, plan, row_bytes, meta_bytes)),
        load_per_rank=torch.bincount((phys_TK // e).flatten(), minlength=rt.world_size),
        predicted_ms=predicted.get(strategy),
        predicted_ms_by_strategy=predicted,
        measured_ms=Elapsed((t0, t1), (t2, t3)),
        cost_model=rt.cost_model.source,
        cost_model_defaults=bool(rt.cost_model.defaults_used),
        expert_rows=counts_e.sum(),
    )
    if layer.records_routing:
        layer.routing.record(topk_ids_TK, placement.num_experts, hidden_TH.requires_grad)
    return out_TH


def _choose(rt: Runtime, dest_rank_TK: torch.Tensor, hidden_TH: torch.Tensor) -> tuple[str, dict]:
    if rt.config.dispatch != "auto":
        return rt.config.dispatch, {}
    row_bytes = hidden_TH.shape[1] * hidden_TH.element_size()
    return pick_strategy(rt.topology, rt.topology.strategies(), dest_rank_TK, row_bytes, rt.cost_model)
