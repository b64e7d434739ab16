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

from typing import Sequence

import torch

from hiermoe_hf.topology import Stage, Topology


def key_divisor(topology: Topology, stage: Stage) -> int:
    """Destination ranks per packing key: a level-``hi`` subtree when de-duplicated, else one rank."""
    return topology.stride(stage.hi) if stage.dedup else 1


def _digit(rank: torch.Tensor, topology: Topology, level: int) -> torch.Tensor:
    return (rank // topology.stride(level + 1)) % topology.levels[level]


def _first_of_key(key_TK: torch.Tensor, valid_TK: torch.Tensor) -> torch.Tensor:
    """bool [T, K]: valid selections whose key no earlier valid selection of the token has."""
    K = key_TK.shape[1]
    same_TKK = (key_TK[:, :, None] == key_TK[:, None, :]) & valid_TK[:, None, :]
    earlier_KK = torch.ones(K, K, dtype=torch.bool, device=key_TK.device).tril(-1)
    return valid_TK & ~(same_TKK & earlier_KK).any(-1)


def stage_cells(
    origin_T: torch.Tensor, dest_TK: torch.Tensor, topology: Topology, strategy: str
) -> list[torch.Tensor]:
    """Per stage of ``strategy``, int64 [T, K]: the cell ``holder * S + member`` of the packed row
    that selection (t, k) belongs to in that stage, or -1 where (t, k) makes no row of its own.

    Closed form, no compaction (so no host sync on a GPU): before a stage, a token's copy sits on
    the rank that has the destination's digits where earlier stages varied them and the origin's
    elsewhere; it goes to the member with the destination's digits ``[lo, hi)``. A de-duplicated
    stage packs one row per (token, destination key = dest // stride(hi)), a plain stage one per
    selection. origin_T: int64 [T] origin rank; dest_TK: int64 [T, K] destination rank (-1 none).
    """
    valid = dest_TK >= 0
    dest = dest_TK.clamp(min=0)
    origin = origin_T.view(-1, 1)
    covered = [False] * topology.depth
    out = []
    for stage in topology.stages(strategy):
        S, div = topology.group_size(stage), topology.stride(stage.hi)
        holder = torch.zeros_like(dest)
        for lvl in range(topology.depth):
            digit = _digit(dest if covered[lvl] else origin, topology, lvl)
            holder = holder + digit * topology.stride(lvl + 1)
        member = (dest // div) % S
        first = _first_of_key(dest // div, valid) if stage.dedup else valid
        out.append(torch.where(first, holder * S + member, -1))
        for lvl in range(stage.lo, stage.hi):
            covered[lvl] = True
    return out


def count_cells(cells_TK: torch.Tensor, W: int, S: int) -> torch.Tensor:
    """int64 [W, S] rows per cell (scatter-add into a spill bin: no bincount, no host sync)."""
    flat = torch.where(cells_TK >= 0, cells_TK, W * S).reshape(-1)
    counts = torch.zeros(W * S + 1, dtype=torch.int64, device=cells_TK.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return counts[: W * S].view(W, S)


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
    origin = torch.cat(
        [torch.full((d.shape[0],), o, dtype=torch.int64, device=dev) for o, d in zip(origins, dest_rank_TK)]
    )
    return [
        count_cells(c, W, topology.group_size(st))
        for st, c in zip(topology.stages(strategy), stage_cells(origin, dest, topology, strategy))
    ]


def cells(topology: Topology, strategy: str) -> list[torch.Tensor]:
    """Per stage, int64 [W, W]: the cell ``holder * S + member`` where the row of a token that started
    on rank o (row) and selected one expert on rank d (column) is packed."""
    W = topology.world_size
    o_N = torch.arange(W).repeat_interleave(W)
    d_N1 = torch.arange(W).repeat(W).view(-1, 1)
    return [c.view(W, W) for c in stage_cells(o_N, d_N1, topology, strategy)]


def own_member(topology: Topology, stage: Stage, device: torch.device | None = None) -> torch.Tensor:
    """int64 [W] on ``device``: each rank's own member index in its group of ``stage`` (the column
    kept locally). Built where it is used: a host tensor copied to a GPU is a blocking H2D copy."""
    return topology.member_of(torch.arange(topology.world_size, device=device), stage)


def sent_rows(counts_WS: torch.Tensor, topology: Topology, stage: Stage) -> torch.Tensor:
    """int64 [W]: rows each rank puts on the stage's links (its own member's column excluded)."""
    own = own_member(topology, stage, counts_WS.device)
    return counts_WS.sum(1) - counts_WS.gather(1, own[:, None]).squeeze(1)


def crossing_rows(counts_WS: torch.Tensor, topology: Topology, stage: Stage, level: int = 1) -> torch.Tensor:
    """int64 []: rows of the stage whose sender and receiver lie in different level-``level``
    subtrees (level 1: different nodes). No host sync: ``where``, not a boolean-mask index."""
    W, S = counts_WS.shape
    dev = counts_WS.device
    div = topology.stride(stage.hi)
    src_W = torch.arange(W, device=dev)
    own_W1 = own_member(topology, stage, dev).view(W, 1)
    dst_WS = src_W.view(W, 1) + (torch.arange(S, device=dev).view(1, S) - own_W1) * div
    span = topology.stride(level)
    crosses = (src_W.view(W, 1) // span) != (dst_WS // span)
    return torch.where(crosses, counts_WS, torch.zeros((), dtype=counts_WS.dtype, device=dev)).sum()


def peer_rows_max(counts_WS: torch.Tensor, topology: Topology, stage: Stage) -> torch.Tensor:
    """0-d tensor on the counts' device: the largest message (rows) any rank sends to any other
    member in this stage (counts may be scaled floats). No host read."""
    own = own_member(topology, stage, counts_WS.device)
    off = counts_WS.clone()
    off.scatter_(1, own[:, None], 0)
    return off.max() if off.numel() else counts_WS.new_zeros(())


def packed_rows_max(counts_WS: torch.Tensor) -> torch.Tensor:
    """0-d tensor: most rows any rank packs in this stage (kept ones included: they are gathered too)."""
    return counts_WS.sum(1).max() if counts_WS.numel() else counts_WS.new_zeros(())


def max_peer_rows(counts_WS: torch.Tensor, topology: Topology, stage: Stage) -> float:
    """``peer_rows_max`` as a Python number."""
    return peer_rows_max(counts_WS, topology, stage).item()


def packed_rows(counts_WS: torch.Tensor) -> float:
    """``packed_rows_max`` as a Python number."""
    return packed_rows_max(counts_WS).item()
