"""Rows per stage for a routing: the one definition of which rows a stage packs (DESIGN.md section 5).

A stage varying digits ``[lo, hi)`` moves every row to the group member on the way to each of its
destinations. A de-duplicated stage packs one row per (row, destination *key*), the key being the
destination's level-``hi`` subtree (``dest // stride(hi)``); a plain stage (``a2a``, ``2dh``) packs
one row per carried selection. A packed row carries on only the selections under its key.

The dispatcher's kernels (``kernels.reference.stage_layout`` and its Triton twin) implement this for
one rank's rows and are tested against it; the cost model, ``dispatch="auto"``, the planner, the swap
objective and the traffic meter all count rows through ``stage_rows`` here.

Shapes: W ranks, S group members, T tokens, K selections, R rows at a stage's input, P packed rows.
Counts ``[W, S]``: rows that holder rank ``r`` sends to member ``m`` of its group (``m ==
member_of(r)``: kept on ``r``).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from hiermoe_hf.topology import Stage, Topology


def key_divisor(topology: Topology, stage: Stage) -> int:
    """Destination ranks per packing key: a level-``hi`` subtree when de-duplicated, else one rank."""
    return topology.stride(stage.hi) if stage.dedup else 1


def _advance(holder_R: torch.Tensor, dest_RK: torch.Tensor, topology: Topology, stage: Stage):
    """Pack rows for one stage. -> (row_P source row, member_P, holder after the stage, dest_PK).

    holder_R: int64 [R] rank holding each row; dest_RK: int64 [R, K] destination rank of every
    selection the row carries (-1: none).
    """
    S, div = topology.group_size(stage), topology.stride(stage.hi)
    R, K = dest_RK.shape
    dev = dest_RK.device  # stays on the routing's device: on a GPU this runs per layer under "auto"
    member_RK = torch.where(dest_RK >= 0, (dest_RK // div) % S, S)
    if stage.dedup:
        need_RS = torch.zeros(R, S + 1, dtype=torch.bool, device=dev).scatter_(1, member_RK, True)[:, :S]
        row_P, m_P = need_RS.nonzero(as_tuple=True)
        dest_PK = torch.where(member_RK[row_P] == m_P[:, None], dest_RK[row_P], -1)
    else:
        row_P, k_P = (dest_RK >= 0).nonzero(as_tuple=True)
        m_P = member_RK[row_P, k_P]
        dest_PK = torch.full((row_P.numel(), K), -1, dtype=torch.int64, device=dev)
        dest_PK[torch.arange(row_P.numel(), device=dev), k_P] = dest_RK[row_P, k_P]
    src_P = holder_R[row_P]
    dst_P = src_P + (m_P - topology.member_of(src_P, stage)) * div
    return row_P, m_P, dst_P, dest_PK


def walk(
    holder_R: torch.Tensor, dest_RK: torch.Tensor, topology: Topology, strategy: str
) -> Iterator[tuple[Stage, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every stage of ``strategy`` in order: (stage, row_P index into the initial rows, src_P holder
    rank, m_P member index) of each packed row."""
    origin_R = torch.arange(holder_R.numel(), device=holder_R.device)
    holder, dest = holder_R, dest_RK
    for stage in topology.stages(strategy):
        row_P, m_P, dst_P, dest = _advance(holder, dest, topology, stage)
        src_P = holder[row_P]
        origin_R = origin_R[row_P]
        yield stage, origin_R, src_P, m_P
        holder = dst_P


def stage_rows(
    dest_rank_TK: Sequence[torch.Tensor] | torch.Tensor,
    topology: Topology,
    strategy: str,
    origins: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Rows every rank sends to every member of its group, per stage of ``strategy``.

    Args:
        dest_rank_TK: per origin rank, int64 [T_r, K] destination rank of each selection (-1 none);
            a single tensor means one origin (give ``origins=[rank]``).
        origins: the rank each tensor's tokens start on (default 0, 1, ...). With every rank's
            routing this is the global count; with one rank's it is that rank's contribution, and
            contributions add up (rows of different origin tokens are never merged).
    Returns:
        one int64 [W, S] per stage: counts[r, m] = rows rank r sends to member m of its group.
    """
    if isinstance(dest_rank_TK, torch.Tensor):
        dest_rank_TK = [dest_rank_TK]
    if origins is None:
        origins = range(len(dest_rank_TK))
    if len(origins) != len(dest_rank_TK):
        raise ValueError(f"{len(dest_rank_TK)} routing tensors but {len(origins)} origins")
    W = topology.world_size
    for o, d in zip(origins, dest_rank_TK):
        if not 0 <= o < W:
            raise ValueError(f"origin rank {o} outside 0..{W - 1} of topology {topology}")
        if d.dim() != 2:
            raise ValueError(f"routing of origin rank {o} must be [T, K], got shape {tuple(d.shape)}")
    dev = dest_rank_TK[0].device
    dest = torch.cat([d.to(dev, torch.int64) for d in dest_rank_TK])
    holder = torch.cat(
        [torch.full((d.shape[0],), o, dtype=torch.int64, device=dev) for o, d in zip(origins, dest_rank_TK)]
    )
    return [
        torch.bincount(src_P * topology.group_size(st) + m_P, minlength=W * topology.group_size(st)).view(W, -1)
        for st, _, src_P, m_P in walk(holder, dest, topology, strategy)
    ]


def cells(topology: Topology, strategy: str) -> list[torch.Tensor]:
    """Per stage, int64 [W, W]: the cell ``holder * S + member`` where the row of a token that started
    on rank o (row) and selected one expert on rank d (column) is packed."""
    W = topology.world_size
    o_N = torch.arange(W).repeat_interleave(W)
    d_N1 = torch.arange(W).repeat(W).view(-1, 1)
    out = []
    for st, row_P, src_P, m_P in walk(o_N, d_N1, topology, strategy):
        cell = torch.empty(W * W, dtype=torch.int64)
        cell[row_P] = src_P * topology.group_size(st) + m_P  # one packed row per single-selection token
        out.append(cell.view(W, W))
    return out


def own_member(topology: Topology, stage: Stage) -> torch.Tensor:
    """int64 [W]: each rank's own member index in its group of ``stage`` (the column kept locally)."""
    return topology.member_of(torch.arange(topology.world_size), stage)


def sent_rows(counts_WS: torch.Tensor, topology: Topology, stage: Stage) -> torch.Tensor:
    """int64 [W]: rows each rank puts on the stage's links (its own member's column excluded)."""
    own = own_member(topology, stage).to(counts_WS.device)
    return counts_WS.sum(1) - counts_WS.gather(1, own[:, None]).squeeze(1)


def crossing_rows(counts_WS: torch.Tensor, topology: Topology, stage: Stage, level: int = 1) -> torch.Tensor:
    """int64 []: rows of the stage whose sender and receiver lie in different level-``level``
    subtrees (level 1: different nodes)."""
    W, S = counts_WS.shape
    div = topology.stride(stage.hi)
    src_W = torch.arange(W, device=counts_WS.device)
    dst_WS = src_W.view(W, 1) + (torch.arange(S, device=counts_WS.device).view(1, S) - own_member(
        topology, stage).to(counts_WS.device).view(W, 1)) * div
    span = topology.stride(level)
    return counts_WS[(src_W.view(W, 1) // span) != (dst_WS // span)].sum()


def max_peer_rows(counts_WS: torch.Tensor, topology: Topology, stage: Stage) -> float:
    """Largest message (rows) any rank sends to any other member in this stage (counts may be scaled floats)."""
    own = own_member(topology, stage).to(counts_WS.device)
    off = counts_WS.clone()
    off.scatter_(1, own[:, None], 0)
    return off.max().item() if off.numel() else 0


def packed_rows(counts_WS: torch.Tensor) -> float:
    """Most rows any rank packs in this stage (kept ones included: they are gathered too)."""
    return counts_WS.sum(1).max().item() if counts_WS.numel() else 0
