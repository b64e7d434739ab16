"""The patched experts forward of one MoE block: choose a strategy, dispatch, local experts, combine."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from hiermoe_hf.cost.auto import Priced
from hiermoe_hf.exchange.comm import meta_row_bytes, whole_group
from hiermoe_hf.exchange.dispatcher import ExchangePlan, combine, dispatch, stage_stats
from hiermoe_hf.exchange.experts import local_experts_forward
from hiermoe_hf.exchange.layer_counts import (
    Fixed,
    LayerCounts,
    StageSplits,
    exchange_chunk_counts,
    merged,
    summed_splits,
)
from hiermoe_hf.exchange.pipeline import pipelined_layer
from hiermoe_hf.kernels import select_ops
from hiermoe_hf.runtime import guards
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

    ``side`` (DeepSeek-V3's shared experts, when ``overlap_chunks`` may exceed 1) runs while the
    routed tokens are in flight; unchunked or without an exchange it runs after the experts.
    """
    layer: LayerState = getattr(self, LAYER_ATTR)
    rt = layer.runtime
    T, K = topk_ids_TK.shape
    recompute = _recomputing()
    if recompute and layer.records_routing:
        layer.routing.count_pass()  # one more exchange of routing already recorded (not a new batch)
    if rt.world_size == 1:
        layer.last = ForwardRecord("local", T, "torch", (), [T * K], recompute=recompute)
        out_TH = type(self).forward(self, hidden_TH, topk_ids_TK, topk_w_TK)
        return out_TH, side() if side is not None else None
    e = layer.local_experts
    placement = layer.placement
    guards.check_forward(self, layer, topk_ids_TK)
    if placement.phys_of_E.device != topk_ids_TK.device:
        layer.placement = placement = placement.to(topk_ids_TK.device)
    phys_TK = placement.phys_of_E[topk_ids_TK]
    ops = select_ops(rt.config.kernels, hidden_TH.device)
    # Rows go out in the compute dtype (autocast's, e.g. bf16 for an fp32 model) and come back in the
    # dtype Transformers sums a token's expert outputs in (the wider of the block's and the experts'):
    # they carry partial sums. The block returns its input's dtype, as Transformers' experts do.
    x_TH = hidden_TH.to(_compute_dtype(hidden_TH))
    sum_dtype = torch.promote_types(hidden_TH.dtype, getattr(self, layer.param_names[0]).dtype)
    counted = _chunks(rt, layer.name, recompute)
    chunk_counts = _count(rt, layer, recompute, torch.tensor_split(phys_TK // e, counted), x_TH)  # 1 collective, 1 read
    C = counted if rt.trials is None else rt.trials.chunks_run(layer.name)
    if C != counted:  # a timed chunk decision counted in chunks and 1 won
        chunk_counts = [merged(chunk_counts)]
    first = chunk_counts[0]
    strategy = first.strategy
    plan = ExchangePlan.build(rt.topology, rt.groups, strategy, e)
    row_bytes = x_TH.shape[1] * x_TH.element_size()
    meta_bytes = meta_row_bytes(K, topk_w_TK.dtype)
    predicted = {} if first.predicted_ms is None else dict(zip(first.candidates, first.predicted_ms.unbind()))
    trials = rt.trials
    timed_strategy = trials is not None and bool(trials.candidates)

    def record(handle, spans, expert_rows=None) -> ForwardRecord:
        return ForwardRecord(
            strategy=strategy,
            tokens=T,
            kernels=ops.name,
            stages=tuple(stage_stats(handle, plan, row_bytes, meta_bytes)),
            load_per_rank=sum(cc.load_per_rank for cc in chunk_counts[1:]) + first.load_per_rank,
            predicted_ms=predicted.get(strategy),
            predicted_ms_by_strategy=predicted,
            measured_ms=Elapsed(*spans),
            cost_model=trials.source() if timed_strategy else rt.cost_model.source,
            cost_model_defaults=False if timed_strategy else bool(rt.cost_model.defaults_used),
            measured_ms_by_strategy=trials.measured_ms() if timed_strategy else None,
            overlap_chunks=C,
            measured_ms_by_chunks=trials.measured_ms_by_chunks() if _times_chunks(trials) else None,
            expert_rows=expert_rows,
            recompute=recompute,
        )

    t0 = Elapsed.mark(hidden_TH)
    if C == 1:
        x_RH, phys_RK, w_RK, handle = dispatch(x_TH, phys_TK, topk_w_TK, plan, ops, first)
        t1 = Elapsed.mark(hidden_TH)
        # Recorded once the dispatch is done: a non-reentrant checkpoint recompute may be stopped early
        # (torch's early stop) after it, and its dispatch traffic must still be counted.
        layer.last = record(handle, ((t0, t1),))
        y_RH, counts_e = local_experts_forward(self, x_RH, phys_RK, w_RK, e, ops, first.arriving, out_dtype=sum_dtype)
        t2 = Elapsed.mark(hidden_TH)
        out_TH = combine(y_RH, handle, ops).to(hidden_TH.dtype)
        side_out = side() if side is not None else None
        t3 = Elapsed.mark(hidden_TH)
        layer.last = replace(layer.last, measured_ms=Elapsed((t0, t1), (t2, t3)), expert_rows=counts_e.sum())
        whole = Elapsed((t0, t3))
    else:
        rows = []

        def experts_fn(x_RH, phys_RK, w_RK, arriving):
            y_RH, counts_e = local_experts_forward(self, x_RH, phys_RK, w_RK, e, ops, arriving, out_dtype=sum_dtype)
            rows.append(counts_e.sum())
            return y_RH

        # Recorded before the pipeline, from the split sizes it will use: a non-reentrant checkpoint
        # recompute is stopped early (torch's early stop) inside the pipeline, and its traffic must count.
        layer.last = record(planned_handle(chunk_counts), ((t0, t0),))
        out_TH, handle, side_out = pipelined_layer(x_TH, phys_TK, topk_w_TK, plan, ops, chunk_counts, experts_fn, side)
        out_TH = out_TH.to(hidden_TH.dtype)
        layer.last = record(handle, ((t0, Elapsed.mark(hidden_TH)),), torch.stack(rows).sum())  # experts included
        whole = layer.last.measured_ms
    if trials is not None:  # the whole layer: chunked and unchunked runs compare like with like
        trials.ran(whole)
    if layer.records_routing:
        if not recompute:  # the window holds each routing once; this forward is one exchange pass
            layer.routing.record(topk_ids_TK, placement.num_experts, training=False)
        if out_TH.requires_grad:  # its backward is one more pass, counted when (and each time) it runs
            out_TH.register_hook(layer.routing.count_pass)
    return out_TH, side_out


@dataclass(frozen=True)
class PlannedHandle:
    """What the pipeline's handle will report, as ``dispatcher.stage_stats`` reads a record."""

    records: tuple[StageSplits, ...]


def planned_handle(chunk_counts: list[LayerCounts]) -> PlannedHandle:
    """Every stage's splits summed over the chunks, from the counts (before the pipeline runs)."""
    return PlannedHandle(summed_splits(chunk_counts))


def _compute_dtype(hidden_TH: torch.Tensor) -> torch.dtype:
    """The dtype the experts' GEMMs take their input in: autocast's when it is on, else the rows' own."""
    device = hidden_TH.device.type
    if torch.is_autocast_enabled(device) and hidden_TH.is_floating_point():
        return torch.get_autocast_dtype(device)
    return hidden_TH.dtype


def _recomputing() -> bool:
    """True when this forward runs inside a backward: a gradient-checkpointing recompute (reentrant or not)."""
    return torch._C._current_graph_task_id() != -1


def _chunks(rt: Runtime, name: str, recompute: bool) -> int:
    """The chunks a layer's forward counts its tokens in: the given ``overlap_chunks``, or the timed
    schedule's (``cost/trials.py``; host state, no read)."""
    return rt.config.overlap_chunks if rt.trials is None else rt.trials.chunks(name, recompute)


def _times_chunks(trials) -> bool:
    return trials is not None and len(trials.chunk_options) > 1


def _count(
    rt: Runtime, layer: LayerState, recompute: bool, dest_chunks: tuple[torch.Tensor, ...], x_TH: torch.Tensor
) -> list[LayerCounts]:
    """Split sizes of every stage of every chunk (and, for ``auto``, the choice) from one collective
    and one host read. Timed trials (``rt.trials``) choose the strategy, or only the chunk count
    around a fixed or priced strategy."""
    if rt.config.dispatch != "auto":
        base = Fixed(rt.config.dispatch)
    elif rt.trials is not None and rt.trials.candidates:
        base = None  # the trials time the strategies
    else:
        base = Priced(tuple(rt.topology.strategies()), rt.cost_model)
    choice = base if rt.trials is None else rt.trials.layer(layer.name, recompute, base)
    row_bytes = x_TH.shape[1] * x_TH.element_size()
    return exchange_chunk_counts(
        rt.topology, whole_group(rt.topology, rt.groups), rt.rank, choice, list(dest_chunks), row_bytes,
        rt.collective_timeout_s,
    )
