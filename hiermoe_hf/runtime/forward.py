"""The patched experts forward of one MoE block: choose a strategy, dispatch, local experts, combine."""

from __future__ import annotations

import torch

from hiermoe_hf.exchange.comm import meta_row_bytes, whole_group
from hiermoe_hf.exchange.dispatcher import ExchangePlan, combine, dispatch, stage_stats
from hiermoe_hf.exchange.experts import local_experts_forward
from hiermoe_hf.exchange.layer_counts import LayerCounts, exchange_chunk_counts
from hiermoe_hf.exchange.pipeline import pipelined_layer
from hiermoe_hf.kernels import select_ops
from hiermoe_hf.runtime.registry import LAYER_ATTR
from hiermoe_hf.runtime.state import Elapsed, ForwardRecord, LayerState, Runtime


def experts_forward(self, hidden_TH: torch.Tensor, topk_ids_TK: torch.Tensor, topk_w_TK: torch.Tensor, side=None):
    """Replaces the experts module's forward on this instance (same signature as Transformers').

    ``side``: work to run while the routed tokens travel (a block adapter's ``forward_with_side``
    passes the shared experts); then the result is (out_TH, side()). Called through the module, so
    forward hooks (the traffic meter's) see every layer.
    """
    out_TH, side_out = run_layer(self, hidden_TH, topk_ids_TK, topk_w_TK, side)
    return out_TH if side is None else (out_TH, side_out)


def run_layer(self, hidden_TH: torch.Tensor, topk_ids_TK: torch.Tensor, topk_w_TK: torch.Tensor, side=None):
    """The routed experts of one block over the exchange -> (out_TH, side() or None).

    ``side`` (DeepSeek-V3's shared experts, ``overlap_chunks`` > 1) runs while the routed tokens are
    in flight; without an exchange it runs after the experts.
    """
    layer: LayerState = getattr(self, LAYER_ATTR)
    rt = layer.runtime
    T, K = topk_ids_TK.shape
    if rt.world_size == 1:
        layer.last = ForwardRecord("local", T, "torch", (), [T * K])
        out_TH = type(self).forward(self, hidden_TH, topk_ids_TK, topk_w_TK)
        return out_TH, side() if side is not None else None
    e = layer.local_experts
    placement = layer.placement
    if placement.phys_of_E.device != topk_ids_TK.device:
        layer.placement = placement = placement.to(topk_ids_TK.device)
    phys_TK = placement.phys_of_E[topk_ids_TK]
    ops = select_ops(rt.config.kernels, hidden_TH.device)
    C = rt.config.overlap_chunks
    chunk_counts = _count(rt, torch.tensor_split(phys_TK // e, C), hidden_TH)  # one collective, one read
    strategy = chunk_counts[0].strategy
    plan = ExchangePlan.build(rt.topology, rt.groups, strategy, e)
    t0 = Elapsed.mark(hidden_TH)
    if C == 1:
        x_RH, phys_RK, w_RK, handle = dispatch(hidden_TH, phys_TK, topk_w_TK, plan, ops, chunk_counts[0])
        t1 = Elapsed.mark(hidden_TH)
        y_RH, counts_e = local_experts_forward(self, x_RH, phys_RK, w_RK, e, ops, chunk_counts[0].arriving)
        t2 = Elapsed.mark(hidden_TH)
        out_TH = combine(y_RH, handle, ops)
        side_out = side() if side is not None else None
        t3 = Elapsed.mark(hidden_TH)
        expert_rows, spans = counts_e.sum(), ((t0, t1), (t2, t3))
    else:
        rows = []

        def experts_fn(x_RH, phys_RK, w_RK, arriving):
            y_RH, counts_e = local_experts_forward(self, x_RH, phys_RK, w_RK, e, ops, arriving)
            rows.append(counts_e.sum())
            return y_RH

        out_TH, handle, side_out = pipelined_layer(
            hidden_TH, phys_TK, topk_w_TK, plan, ops, chunk_counts, experts_fn, side
        )
        expert_rows, spans = torch.stack(rows).sum(), ((t0, Elapsed.mark(hidden_TH)),)  # experts included
    row_bytes = hidden_TH.shape[1] * hidden_TH.element_size()
    meta_bytes = meta_row_bytes(K, topk_w_TK.dtype)
    first = chunk_counts[0]
    predicted = {} if first.predicted_ms is None else dict(zip(first.candidates, first.predicted_ms.unbind()))
    layer.last = ForwardRecord(
        strategy=strategy,
        tokens=T,
        kernels=ops.name,
        stages=tuple(stage_stats(handle, plan, row_bytes, meta_bytes)),
        load_per_rank=sum(cc.load_per_rank for cc in chunk_counts[1:]) + first.load_per_rank,
        predicted_ms=predicted.get(strategy),
        predicted_ms_by_strategy=predicted,
        measured_ms=Elapsed(*spans),
        cost_model=rt.cost_model.source,
        cost_model_defaults=bool(rt.cost_model.defaults_used),
        expert_rows=expert_rows,
    )
    if layer.records_routing:
        layer.routing.record(topk_ids_TK, placement.num_experts, hidden_TH.requires_grad)
    return out_TH, side_out


def _count(rt: Runtime, dest_chunks: tuple[torch.Tensor, ...], hidden_TH: torch.Tensor) -> list[LayerCounts]:
    """Split sizes of every stage of every chunk (and, for ``auto``, the choice) from one collective
    and one host read."""
    fixed = rt.config.dispatch != "auto"
    candidates = (rt.config.dispatch,) if fixed else tuple(rt.topology.strategies())
    row_bytes = hidden_TH.shape[1] * hidden_TH.element_size()
    return exchange_chunk_counts(
        rt.topology, whole_group(rt.topology, rt.groups), rt.rank, candidates, list(dest_chunks), row_bytes,
        rt.cost_model,
    )
