"""Plain-torch reference of every dispatch kernel (DESIGN.md section 11).

These run on any device, are what the CPU path uses, and are the oracle the Triton kernels are
tested against: same signatures, same outputs (integers exactly). Shapes: R rows in, P packed rows,
Q expanded rows (one per (row, carried selection)), K selections per token, S group members,
H hidden. Floating-point reductions accumulate in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for reductions of ``dtype`` rows."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class StageLayout:
    """Send-buffer layout of one stage.

    src_row_P: int64 [P], the row each packed row copies, in split order (member, then row, then k).
    mask_PK: bool [P, K], the selections each packed row carries onwards.
    send_counts_S: int64 [S], packed rows per group member.
    """

    src_row_P: torch.Tensor
    mask_PK: torch.Tensor
    send_counts_S: torch.Tensor


def _nonzero(mask: torch.Tensor, size: int | None) -> tuple[torch.Tensor, ...]:
    """``mask.nonzero`` as a tuple of index tensors; with ``size`` (the known number of hits) the
    static form, which needs no host sync on a GPU."""
    if size is None:
        return mask.nonzero(as_tuple=True)
    # nonzero_static pads or truncates silently: check the count exchange's size on the device (no sync)
    torch._assert_async(mask.sum() == size, "layout rows differ from the count exchange's size")
    return torch.nonzero_static(mask, size=size).unbind(1)


def count_members(m_P: torch.Tensor, group_size: int) -> torch.Tensor:
    """int64 [S]: hits per member (a scatter-add: unlike ``bincount``, no host sync on a GPU)."""
    counts = torch.zeros(group_size, dtype=torch.int64, device=m_P.device)
    return counts.scatter_add_(0, m_P, torch.ones_like(m_P))


def stage_layout(
    dest_rank_RK: torch.Tensor, divisor: int, group_size: int, dedup: bool, size: int | None = None
) -> StageLayout:
    """Which group members each row must reach, and where its copies go in the send buffer.

    Args:
        dest_rank_RK: int64 [R, K], destination rank of each selection the row carries; -1 if none.
        divisor: ranks per step of the stage's last digit (``Topology.stride(stage.hi)``).
        group_size: S, members of the stage's group (member = (dest // divisor) % S).
        dedup: one packed row per (row, member) if True, else one per carried selection.
        size: P if the caller knows it (the layer's count exchange does): no host sync.
    """
    R, K = dest_rank_RK.shape
    S = group_size
    member_RK = torch.where(dest_rank_RK >= 0, (dest_rank_RK // divisor) % S, S)
    if dedup:
        need_RS = torch.zeros(R, S + 1, dtype=torch.bool, device=dest_rank_RK.device)
        need_RS.scatter_(1, member_RK, True)
        m_P, src_row_P = _nonzero(need_RS[:, :S].t(), size)
        mask_PK = member_RK[src_row_P] == m_P[:, None]
    else:
        hit_SRK = member_RK.unsqueeze(0) == torch.arange(S, device=dest_rank_RK.device).view(S, 1, 1)
        m_P, src_row_P, k_P = _nonzero(hit_SRK, size)
        # one_hot reads min/max on the host on CPU: a comparison is the same mask with no read anywhere
        mask_PK = k_P[:, None] == torch.arange(K, device=k_P.device)
    send_counts_S = count_members(m_P, S)
    return StageLayout(src_row_P, mask_PK.reshape(src_row_P.numel(), K), send_counts_S)


def pack_rows(x_RH: torch.Tensor, src_row_P: torch.Tensor) -> torch.Tensor:
    """Gather rows: ``x_PH[p] = x_RH[src_row_P[p]]``. Backward: ``unpack_sum``."""
    return x_RH.index_select(0, src_row_P)


def pack_route(
    ids_RK: torch.Tensor, w_RK: torch.Tensor, src_row_P: torch.Tensor, mask_PK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and weights that travel with packed rows: -1 and 0 for selections a row does not carry.

    ids_RK: int64 [R, K]; w_RK: float [R, K] -> (ids_PK int64 [P, K], w_PK float [P, K]).
    """
    ids_PK = torch.where(mask_PK, ids_RK.index_select(0, src_row_P), -1)
    w_PK = torch.where(mask_PK, w_RK.index_select(0, src_row_P), 0)
    return ids_PK, w_PK


def unpack_sum(y_PH: torch.Tensor, src_row_P: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Sum each row's copies back into it: ``out[src_row_P[p]] += y_PH[p]``. Backward: ``pack_rows``."""
    acc = torch.zeros(num_rows, y_PH.shape[1], dtype=acc_dtype(y_PH.dtype), device=y_PH.device)
    return acc.index_add(0, src_row_P, y_PH.to(acc.dtype)).to(y_PH.dtype)


@dataclass(frozen=True)
class ExpandLayout:
    """One row per (received row, carried selection), grouped by local expert slot.

    src_row_Q: int64 [Q], received row of each expanded row.
    src_k_Q: int64 [Q], which of the row's K selections it is.
    counts_e: int64 [e], expanded rows per local slot (slot order).
    """

    src_row_Q: torch.Tensor
    src_k_Q: torch.Tensor
    counts_e: torch.Tensor


def expand_layout(phys_RK: torch.Tensor, local_experts: int, size: int | None = None) -> ExpandLayout:
    """Group the selections that arrived on this rank by local slot.

    phys_RK: int64 [R, K], physical expert id of each carried selection (all on this rank), -1 if none.
    size: Q if the caller knows it (the layer's count exchange does): no host sync.
    """
    R, K = phys_RK.shape
    e = local_experts
    slot_RK = torch.where(phys_RK >= 0, phys_RK % e, e)
    hit_eRK = slot_RK.unsqueeze(0) == torch.arange(e, device=phys_RK.device).view(e, 1, 1)
    slot_Q, src_row_Q, src_k_Q = _nonzero(hit_eRK, size)
    return ExpandLayout(src_row_Q, src_k_Q, count_members(slot_Q, e))


def combine_rows(y_QH: torch.Tensor, w_Q: torch.Tensor, dst_row_Q: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Weighted segment sum: ``out[dst_row_Q[q]] += w_Q[q] * y_QH[q]``, accumulated in fp32.

    y_QH: float [Q, H] expert outputs; w_Q: float [Q] routing weights; -> out_RH [num_rows, H] in y's dtype.
    Backward: grad_y = w * grad_out[dst]; grad_w = <y, grad_out[dst]>.
    """
    acc = acc_dtype(y_QH.dtype)
    weighted = y_QH.to(acc) * w_Q.to(acc).unsqueeze(1)
    out = torch.zeros(num_rows, y_QH.shape[1], dtype=acc, device=y_QH.device)
    return out.index_add(0, dst_row_Q, weighted).to(y_QH.dtype)
