"""One count exchange per MoE layer: every stage's split sizes and ``auto``'s choice at once.

Before any row moves, each rank counts the rows its own tokens will make every rank send in every
stage of every candidate strategy (``stage_rows.stage_cells``: rows of different origin tokens are
never merged, so these contributions add up exactly), plus how many of its selections go to each
rank. One ``all_reduce`` of that int64 vector gives every rank the global counts; ``auto`` prices
the candidates on the device (``pricing.forward_exchange_seconds``, identical float arithmetic on
identical inputs, ``argmin`` breaks ties towards the earlier candidate), and ONE host read brings
back the choice and the split sizes of all stages together. Nothing else on the layer's path reads
the device.

Shapes: W ranks, S group members, T tokens, K selections, C candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from hiermoe_hf.cost.pricing import forward_exchange_seconds
from hiermoe_hf.exchange.stage_rows import count_cells, stage_cells
from hiermoe_hf.topology import Stage, Topology


@dataclass(frozen=True)
class StageSplits:
    """Rows this rank sends to / receives from each member of its group in one stage (host ints)."""

    stage: Stage
    send: list[int]
    recv: list[int]


@dataclass(frozen=True)
class LayerCounts:
    """The outcome of one layer's count exchange on this rank.

    strategy: the strategy every rank runs; splits: its stages' split sizes; arriving: selections
    that reach this rank's experts (expanded rows); load_per_rank: int64 [W] device tensor, this
    rank's selections per destination rank; predicted_ms: float64 [C] device tensor per candidate
    (None for a fixed strategy), read only by ``stats``.
    """

    strategy: str
    splits: tuple[StageSplits, ...]
    arriving: int
    load_per_rank: torch.Tensor
    candidates: tuple[str, ...]
    predicted_ms: torch.Tensor | None


def contribution(topology: Topology, candidates: tuple[str, ...], dest_TK: torch.Tensor, rank: int) -> torch.Tensor:
    """int64 [W + sum over candidates and stages of W*S]: this rank's selections per destination
    rank, then its rows' counts [W, S] for every stage of every candidate, flattened. No host sync."""
    W = topology.world_size
    dest = dest_TK.detach().to(torch.int64)
    origin = torch.full((dest.shape[0],), rank, dtype=torch.int64, device=dest.device)
    parts = [count_cells(dest, W, 1).view(-1)]  # a destination rank is a cell of a one-member "stage"
    for name in candidates:
        for st, cells in zip(topology.stages(name), stage_cells(origin, dest, topology, name)):
            parts.append(count_cells(cells, W, topology.group_size(st)).view(-1))
    return torch.cat(parts)


def split_global(topology: Topology, candidates: tuple[str, ...], flat: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Inverse of ``contribution``'s flattening, load excluded: candidate -> per-stage [W, S]."""
    W, out, pos = topology.world_size, {}, topology.world_size
    for name in candidates:
        out[name] = []
        for st in topology.stages(name):
            S = topology.group_size(st)
            out[name].append(flat[pos : pos + W * S].view(W, S))
            pos += W * S
    return out


def price(topology: Topology, counts: dict[str, list[torch.Tensor]], row_bytes: int, cost_model) -> torch.Tensor:
    """float64 [C]: predicted ms of one layer's forward exchange per candidate, in ``counts``' order."""
    return torch.stack(
        [1e3 * forward_exchange_seconds(c, topology, name, row_bytes, cost_model) for name, c in counts.items()]
    )


def _splits(topology: Topology, rank: int, name: str, host: list[int], offset: int) -> tuple[StageSplits, ...]:
    """Read this rank's send/recv split sizes of every stage of ``name`` out of the host list."""
    W, out, pos = topology.world_size, [], offset
    for st in topology.stages(name):
        S = topology.group_size(st)
        mine = topology.member_of(rank, st)

        def at(r: int, m: int, base=pos, S=S) -> int:
            return host[base + r * S + m]

        send = [at(rank, m) for m in range(S)]
        recv = [at(q, mine) for q in topology.group_ranks(rank, st)]
        out.append(StageSplits(st, send, recv))
        pos += W * S
    return tuple(out)


def exchange_counts(
    topology: Topology,
    group,
    rank: int,
    candidates: tuple[str, ...],
    dest_TK: torch.Tensor,
    row_bytes: int = 0,
    cost_model=None,
) -> LayerCounts:
    """The layer's one collective (``all_reduce`` in ``group``, the whole expert-parallel group; None
    for a single rank) and one host read. With several candidates, ``cost_model`` prices them."""
    return exchange_chunk_counts(topology, group, rank, candidates, [dest_TK], row_bytes, cost_model)[0]


def exchange_chunk_counts(
    topology: Topology,
    group,
    rank: int,
    candidates: tuple[str, ...],
    dest_chunks: list[torch.Tensor],
    row_bytes: int = 0,
    cost_model=None,
) -> list[LayerCounts]:
    """``exchange_counts`` for a layer whose tokens travel in chunks (``overlap_chunks``): every
    chunk's split sizes still come from one collective and one host read; ``auto`` prices the whole
    layer (the chunks' counts summed), so chunking never changes the choice."""
    C, W = len(dest_chunks), topology.world_size
    flat_CN = torch.stack([contribution(topology, candidates, d, rank) for d in dest_chunks])
    load_CW = flat_CN[:, :W].clone()
    if group is not None:
        dist.all_reduce(flat_CN, op=dist.ReduceOp.SUM, group=group)
    predicted = None
    head = torch.zeros(1, dtype=torch.int64, device=flat_CN.device)
    if len(candidates) > 1:
        predicted = price(topology, split_global(topology, candidates, flat_CN.sum(0)), row_bytes, cost_model)
        head = torch.argmin(predicted).view(1)  # first minimum: ties go to the earlier candidate
    host = torch.cat([head, flat_CN.reshape(-1)]).tolist()  # the layer's one device-to-host read
    choice = candidates[host[0]]
    offset = W
    for name in candidates:
        if name == choice:
            break
        offset += sum(W * topology.group_size(st) for st in topology.stages(name))
    N = flat_CN.shape[1]
    return [
        LayerCounts(
            strategy=choice,
            splits=_splits(topology, rank, choice, host, 1 + c * N + offset),
            arriving=host[1 + c * N + rank],
            load_per_rank=load_CW[c],
            candidates=tuple(candidates),
            predicted_ms=predicted,
        )
        for c in range(C)
    ]
