"""Hierarchical de-duplicated dispatch and its adjoint combine (DESIGN.md sections 4-6).

Each stage is: local layout + pack -> one exchange in the stage's group -> rows on the next rank.
``dispatch`` returns the received rows and a frozen ``DispatchHandle``; ``combine`` takes the expert
outputs and the handle and walks the stages back, summing a token's partial rows at every stage.
Both are compositions of differentiable gathers, scatter-adds and exchanges, so the backward of a
dispatch stage is the reverse exchange with a sum and the backward of a combine stage a copy.

Shapes: T tokens, K selections, H hidden, R rows at a stage's input, P packed rows, S group size.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from hiermoe_hf.exchange.comm import ExchangeRows, ReturnRows, StageGroups, whole_group
from hiermoe_hf.exchange.layer_counts import LayerCounts, exchange_counts
from hiermoe_hf.kernels.reference import StageLayout
from hiermoe_hf.topology import Stage, Topology


@dataclass(frozen=True)
class ExchangePlan:
    """What one layer's exchange needs: the stages of the chosen strategy and their groups, and the
    whole expert-parallel group the count exchange runs in."""

    topology: Topology
    rank: int
    strategy: str
    stages: tuple[Stage, ...]
    groups: tuple[object, ...]
    local_experts: int
    count_group: object = None

    @classmethod
    def build(cls, topology: Topology, groups: StageGroups, strategy: str, local_experts: int) -> "ExchangePlan":
        stages = topology.stages(strategy)
        return cls(
            topology, groups.rank, strategy, stages, tuple(groups.get(s) for s in stages), local_experts,
            whole_group(topology, groups),
        )


@dataclass(frozen=True)
class StageRecord:
    """One stage as it ran: its layout, the row counts per member, and rows at its input."""

    stage: Stage
    group: object
    layout: StageLayout
    send: list[int]
    recv: list[int]
    num_rows_in: int


@dataclass(frozen=True)
class DispatchHandle:
    """Everything ``combine`` needs to reverse ``dispatch``: the stage records, in dispatch order."""

    records: tuple[StageRecord, ...]


def pack_stage(x_RH, ids_RK, w_RK, plan: ExchangePlan, ops: SimpleNamespace, stage: Stage, group, splits):
    """One stage's local half: layout (size known from the count exchange) and pack of rows, ids and
    weights. -> (x_PH, ids_PK, w_PK, StageRecord)."""
    dest_rank = torch.where(ids_RK >= 0, ids_RK // plan.local_experts, -1)
    layout = ops.stage_layout(
        dest_rank, plan.topology.stride(stage.hi), plan.topology.group_size(stage), stage.dedup, sum(splits.send)
    )
    x_P = ops.pack_rows(x_RH, layout.src_row_P)
    ids_P, w_P = ops.pack_route(ids_RK, w_RK, layout.src_row_P, layout.mask_PK)
    return x_P, ids_P, w_P, StageRecord(stage, group, layout, splits.send, splits.recv, x_RH.shape[0])


def dispatch(
    x_TH: torch.Tensor,
    phys_TK: torch.Tensor,
    w_TK: torch.Tensor,
    plan: ExchangePlan,
    ops: SimpleNamespace,
    counts: LayerCounts | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DispatchHandle]:
    """Send every token to the ranks holding its experts, once per destination group per stage.

    Args:
        x_TH: [T, H] hidden states (any float dtype).
        phys_TK: int64 [T, K] physical expert id of each selection (rank = id // local_experts).
        w_TK: [T, K] routing weights; they travel with the rows and receive gradients.
        plan: the strategy's stages and groups.
        ops: kernel namespace (``hiermoe_hf.kernels.select_ops``).
        counts: the layer's count exchange for ``plan.strategy`` (``layer_counts.exchange_counts``);
            None runs it here (one collective, one host read).
    Returns:
        x_RH [R, H], phys_RK int64 [R, K] (-1 for selections a row does not carry; every carried one
        is local), w_RK [R, K] (0 where not carried), and the handle ``combine`` takes.
    """
    if counts is None:
        dest_TK = torch.where(phys_TK >= 0, phys_TK // plan.local_experts, -1)
        counts = exchange_counts(plan.topology, plan.count_group, plan.rank, plan.strategy, dest_TK)
    if counts.strategy != plan.strategy:
        raise ValueError(f"counts are for strategy {counts.strategy!r} but the plan runs {plan.strategy!r}")
    x, ids, w = x_TH, phys_TK, w_TK
    records = []
    for stage, group, splits in zip(plan.stages, plan.groups, counts.splits):
        x_P, ids_P, w_P, rec = pack_stage(x, ids, w, plan, ops, stage, group, splits)
        records.append(rec)
        if group is None:
            x, w, ids = x_P, w_P, ids_P
        else:
            x, w, ids = ExchangeRows.apply(x_P, w_P, ids_P, splits.send, splits.recv, group)
    return x, ids, w, DispatchHandle(tuple(records))


def combine(y_RH: torch.Tensor, handle: DispatchHandle, ops: SimpleNamespace) -> torch.Tensor:
    """Return the rows along the stages in reverse, summing a token's copies at every stage.

    Args:
        y_RH: [R, H] one row per row ``dispatch`` delivered, already weighted and summed over experts.
        handle: from ``dispatch``.
    Returns:
        out_TH [T, H], in the order of dispatch's input.
    """
    y = y_RH
    for rec in reversed(handle.records):
        y_P = y if rec.group is None else ReturnRows.apply(y, rec.recv, rec.send, rec.group)
        y = ops.unpack_sum(y_P, rec.layout.src_row_P, rec.num_rows_in)
    return y


def stage_stats(handle: DispatchHandle, plan: ExchangePlan, row_bytes: int, meta_row_bytes: int) -> list[dict]:
    """Rows and bytes each stage moved to/from *other* ranks (the self split excluded), from real counts."""
    out = []
    for rec in handle.records:
        me = int(plan.topology.member_of(plan.rank, rec.stage))
        sent = sum(rec.send) - rec.send[me]
        received = sum(rec.recv) - rec.recv[me]
        out.append(
            {
                "name": rec.stage.name,
                "group_size": plan.topology.group_size(rec.stage),
                "rows_sent": sent,
                "rows_received": received,
                "bytes_sent": sent * row_bytes,
                "meta_bytes_sent": sent * meta_row_bytes,
                "max_peer_rows": max((c for i, c in enumerate(rec.send) if i != me), default=0),
            }
        )
    return out
