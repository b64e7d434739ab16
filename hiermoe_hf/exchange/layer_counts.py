"""One count exchange per MoE layer: every stage's split sizes and ``auto``'s choice at once.

Before any row moves, each rank counts the rows its own tokens will make every rank send in every
stage of every candidate strategy (``stage_rows.stage_cells``: rows of different origin tokens are
never merged, so these contributions add up exactly), plus how many of its selections go to each
rank. One ``all_reduce`` of that int64 vector gives every rank the global counts, and ONE host read
brings back the choice and the split sizes of all stages together. Nothing else on the layer's path
reads the device. The choice is one of three (``exchange_chunk_counts``' ``choice``): ``Fixed``;
``cost.auto.Priced`` (``auto`` with a cost model: the candidates priced on the host, from the counts
the read brought, by ``pricing.forward_exchange_seconds``: identical float arithmetic on identical
inputs, ``argmin`` breaking ties towards the earlier candidate); ``cost.trials.LayerTrial`` (``auto`` without
one, or ``overlap_chunks="auto"``: the previous forward's timing rides in extra slots of the same
vector).

Shapes: W ranks, S group members, T tokens, K selections, C candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from hiermoe_hf.exchange import bounded
from hiermoe_hf.exchange.bounded import DEFAULT_TIMEOUT_S
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
    rank's selections per destination rank; predicted_ms: float64 [C] host tensor per candidate
    (None for a fixed strategy), read only by ``stats``.
    """

    strategy: str
    splits: tuple[StageSplits, ...]
    arriving: int
    load_per_rank: torch.Tensor
    candidates: tuple[str, ...]
    predicted_ms: torch.Tensor | None


def contribution(
    topology: Topology, candidates: tuple[str, ...], dest_chunks: list[torch.Tensor], rank: int
) -> torch.Tensor:
    """int64 [C, W + sum over candidates and stages of W*S]: per chunk (C = ``len(dest_chunks)``,
    each int64 [T_c, K]), this rank's selections per destination rank, then its rows' counts [W, S]
    for every stage of every candidate, flattened. One pass over all chunks' selections (chunk c's
    cells are counted in bins offset by c), so the kernels launched do not grow with the chunks; no
    host sync."""
    W, C = topology.world_size, len(dest_chunks)
    dest_parts = [d.detach().to(torch.int64) for d in dest_chunks]
    dest = dest_parts[0] if C == 1 else torch.cat(dest_parts)  # one chunk: no copy
    chunk_T1 = None
    if C > 1:
        chunk_T1 = torch.cat(
            [torch.full((d.shape[0], 1), c, dtype=torch.int64, device=dest.device) for c, d in enumerate(dest_chunks)]
        )

    def per_chunk(cells_TK: torch.Tensor, S: int) -> torch.Tensor:
        """int64 [C, W*S]: ``count_cells`` of each chunk's own selections."""
        if chunk_T1 is not None:
            cells_TK = torch.where(cells_TK >= 0, cells_TK + chunk_T1 * (W * S), -1)
        return count_cells(cells_TK, C * W, S).view(C, W * S)

    origin = torch.full((dest.shape[0],), rank, dtype=torch.int64, device=dest.device)
    parts = [per_chunk(dest, 1)]  # a destination rank is a cell of a one-member "stage"
    for name in candidates:
        for st, cells in zip(topology.stages(name), stage_cells(origin, dest, topology, name)):
            parts.append(per_chunk(cells, topology.group_size(st)))
    return torch.cat(parts, dim=1)


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


@dataclass(frozen=True)
class Counted:
    """One layer's global counts as the count exchange's host read brought them (a priced choice
    prices them on the host: no kernel launches, nothing more to read).

    host_CN: the C chunks' global counts (``contribution``'s layout summed over ranks), flattened.
    """

    topology: Topology
    candidates: tuple[str, ...]
    row_bytes: int
    chunks: int
    host_CN: list[int]

    def summed(self) -> torch.Tensor:
        """int64 [N] host tensor: the counts summed over the chunks (the whole layer's)."""
        return torch.tensor(self.host_CN, dtype=torch.int64).view(self.chunks, -1).sum(0)


@dataclass(frozen=True)
class Fixed:
    """Choose ``strategy`` (a fixed ``dispatch``): only its split sizes are counted."""

    strategy: str

    @property
    def counting(self) -> tuple[str, ...]:
        return (self.strategy,)

    def extra(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.int64, device=device)

    def pick(self, summed_extra: list[int], counted: Counted) -> tuple[str, torch.Tensor | None]:
        return self.strategy, None


def summed_splits(chunk_counts: list[LayerCounts]) -> tuple[StageSplits, ...]:
    """Every stage's split sizes summed over the chunks (host ints)."""
    return tuple(
        StageSplits(
            parts[0].stage,
            [sum(col) for col in zip(*(p.send for p in parts))],
            [sum(col) for col in zip(*(p.recv for p in parts))],
        )
        for parts in zip(*(cc.splits for cc in chunk_counts))
    )


def merged(chunk_counts: list[LayerCounts]) -> LayerCounts:
    """One unchunked layer's counts from its chunks' (a timed chunk decision counts in several chunks
    before it knows that 1 wins): rows of different tokens are never merged, so every split size,
    the arriving rows and the load add up over the chunks (host ints and one device add, no read)."""
    first = chunk_counts[0]
    return LayerCounts(
        strategy=first.strategy,
        splits=summed_splits(chunk_counts),
        arriving=sum(cc.arriving for cc in chunk_counts),
        load_per_rank=torch.stack([cc.load_per_rank for cc in chunk_counts]).sum(0),
        candidates=first.candidates,
        predicted_ms=first.predicted_ms,
    )


def exchange_counts(
    topology: Topology,
    group,
    rank: int,
    choice,
    dest_TK: torch.Tensor,
    row_bytes: int = 0,
) -> LayerCounts:
    """The layer's one collective (``all_reduce`` in ``group``, the whole expert-parallel group; None
    for a single rank) and one host read. ``choice``: a strategy name (``Fixed``) or a choice object
    (``cost.auto.Priced``, ``cost.trials``' per-layer view)."""
    choice = Fixed(choice) if isinstance(choice, str) else choice
    return exchange_chunk_counts(topology, group, rank, choice, [dest_TK], row_bytes)[0]


def exchange_chunk_counts(
    topology: Topology,
    group,
    rank: int,
    choice,
    dest_chunks: list[torch.Tensor],
    row_bytes: int = 0,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[LayerCounts]:
    """``exchange_counts`` for a layer whose tokens travel in chunks (``overlap_chunks``): every
    chunk's split sizes still come from one collective and one host read; a priced choice prices the
    whole layer (the chunks' counts summed), so chunking never changes it.

    choice: ``Fixed``, ``Priced`` or ``cost.trials.LayerTrial`` (timed: the strategy, the chunk count
    or both; around a ``Fixed``/``Priced`` base when it times only the chunks): which strategies to count
    (``counting``), this rank's extra int64 slots summed with the counts (``extra``: a trial's
    timing), and the strategy with its predicted ms per candidate or None, from what the host read
    (``pick(summed_extra, Counted)``). ``timeout_s``: how long to wait for the other ranks' counts
    (``exchange/bounded.py``) before raising: the wait blocks no longer than the host read that
    follows it would.
    """
    candidates = choice.counting
    C, W = len(dest_chunks), topology.world_size
    extra_X = choice.extra(dest_chunks[0].device)
    X = extra_X.numel()
    flat_CN = contribution(topology, candidates, dest_chunks, rank)
    load_CW = flat_CN[:, :W].clone()
    flat = torch.cat([extra_X, flat_CN.reshape(-1)])
    if group is not None:
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True)
        bounded.wait(work, timeout_s, "a MoE layer's forward (its count exchange)", flat.device)
    host = flat.tolist()  # the layer's one device-to-host read
    counted = Counted(topology, tuple(candidates), row_bytes, C, host[X:])
    choice_name, predicted = choice.pick(host[:X], counted)
    offset = W
    for name in candidates:
        if name == choice_name:
            break
        offset += sum(W * topology.group_size(st) for st in topology.stages(name))
    N = flat_CN.shape[1]
    return [
        LayerCounts(
            strategy=choice_name,
            splits=_splits(topology, rank, choice_name, host, X + c * N + offset),
            arriving=host[X + c * N + rank],
            load_per_rank=load_CW[c],
            candidates=tuple(candidates),
            predicted_ms=predicted,
        )
        for c in range(C)
    ]
