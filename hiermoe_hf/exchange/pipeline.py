"""One MoE layer's exchange in chunks, pipelined (``overlap_chunks`` > 1).

The tokens are split into C chunks (``torch.tensor_split``: the same C on every rank, a chunk may
be empty). The first stage's exchange of every chunk is launched at once; then chunk by chunk: wait
for its first stage, run its remaining stages, its experts and its combine back to the first stage,
whose return is launched without waiting; finally wait for the returns. So while chunk c computes,
the first-stage transfers of the later chunks and the returns of the earlier ones are in flight.
For ``hdD`` and ``a2a``/``hd1`` the first stage is the slow one (between nodes / the flat exchange);
for ``2dh`` it is the intra-node stage. DeepSeek-V3's shared experts (``side``) run right after the
launches, while the routed tokens travel. The backward overlaps the same way (``async_comm``).

Every chunk's split sizes come from the layer's one count exchange; each chunk adds only its row
exchanges. Results equal the unchunked exchange up to the experts' GEMM blocking.

Shapes: T tokens, K selections, H hidden, C chunks.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch

from hiermoe_hf.exchange.async_comm import Pending, finish, start
from hiermoe_hf.exchange.dispatcher import DispatchHandle, ExchangePlan, StageRecord, pack_stage
from hiermoe_hf.exchange.layer_counts import LayerCounts


class _Chunk:
    """The rows of one chunk between steps of the schedule (local to ``pipelined_layer``)."""

    def __init__(self, x, ids, w, counts: LayerCounts):
        self.x, self.ids, self.w, self.counts = x, ids, w, counts
        self.records: list[StageRecord] = []
        self.pending: Pending | None = None
        self.views: tuple = ()


def _launch(ch: _Chunk, s: int, plan: ExchangePlan, ops) -> None:
    """Pack stage ``s`` of a chunk and start its exchange (groups of one: nothing to send)."""
    x_P, ids_P, w_P, rec = pack_stage(ch.x, ch.ids, ch.w, plan, ops, plan.stages[s], plan.groups[s],
                                      ch.counts.splits[s])
    ch.records.append(rec)
    if rec.group is None:
        ch.pending, ch.views = None, (x_P, ids_P, w_P)
    else:
        ch.pending = Pending(rec.send, rec.recv, rec.group)
        ch.views = start(ch.pending, x_P, ids_P.to(torch.int32), w_P)


def _land(ch: _Chunk) -> None:
    if ch.pending is None:
        ch.x, ch.ids, ch.w = ch.views
    else:
        x, ids, w = finish(ch.pending, *ch.views)
        ch.x, ch.ids, ch.w = x, ids.to(torch.int64), w


def _return_launch(ch: _Chunk, s: int, y_RH: torch.Tensor):
    rec = ch.records[s]
    if rec.group is None:
        return None, (y_RH,)
    pending = Pending(rec.recv, rec.send, rec.group)
    return pending, start(pending, y_RH)


def _return_land(ch: _Chunk, s: int, pending, views, ops) -> torch.Tensor:
    rec = ch.records[s]
    y_P = views[0] if pending is None else finish(pending, *views)[0]
    return ops.unpack_sum(y_P, rec.layout.src_row_P, rec.num_rows_in)


def pipelined_layer(
    x_TH: torch.Tensor,
    phys_TK: torch.Tensor,
    w_TK: torch.Tensor,
    plan: ExchangePlan,
    ops: SimpleNamespace,
    chunk_counts: list[LayerCounts],
    experts_fn: Callable,
    side: Callable | None = None,
):
    """Dispatch -> experts -> combine for C chunks, overlapped.

    Args:
        x_TH, phys_TK, w_TK: as ``dispatcher.dispatch``; chunk_counts: per chunk, from
            ``layer_counts.exchange_chunk_counts`` on the same ``tensor_split``.
        experts_fn(x_RH, phys_RK, w_RK, arriving) -> y_RH: the local experts on one chunk's rows.
        side: run while the first stage is in flight (DeepSeek-V3's shared experts), or None.
    Returns:
        (out_TH, a DispatchHandle whose records hold every stage's summed split sizes (for
        ``stage_stats``), side's result or None).
    """
    C, S = len(chunk_counts), len(plan.stages)
    parts = zip(torch.tensor_split(x_TH, C), torch.tensor_split(phys_TK, C), torch.tensor_split(w_TK, C))
    chunks = [_Chunk(x, i, w, cc) for (x, i, w), cc in zip(parts, chunk_counts)]
    for ch in chunks:
        _launch(ch, 0, plan, ops)
    side_out = side() if side is not None else None
    returns = []
    for ch in chunks:
        _land(ch)
        for s in range(1, S):
            _launch(ch, s, plan, ops)
            _land(ch)
        y = experts_fn(ch.x, ch.ids, ch.w, ch.counts.arriving)
        for s in range(S - 1, 0, -1):
            y = _return_land(ch, s, *_return_launch(ch, s, y), ops)
        returns.append(_return_launch(ch, 0, y))
    outs = [_return_land(ch, 0, pending, views, ops) for ch, (pending, views) in zip(chunks, returns)]
    out_TH = torch.cat(outs) if outs else x_TH.new_zeros(0, x_TH.shape[1])
    return out_TH, DispatchHandle(_summed_records(chunks)), side_out


def _summed_records(chunks: list[_Chunk]) -> tuple[StageRecord, ...]:
    """Per stage, the chunks' split sizes added up (what ``stage_stats`` reports)."""
    out = []
    for recs in zip(*[ch.records for ch in chunks]):
        send = [sum(v) for v in zip(*[r.send for r in recs])]
        recv = [sum(v) for v in zip(*[r.recv for r in recs])]
        out.append(StageRecord(recs[0].stage, recs[0].group, recs[0].layout, send, recv,
                               sum(r.num_rows_in for r in recs)))
    return tuple(out)
