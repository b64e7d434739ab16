"""Triton routing layouts: ``stage_layout`` and ``expand_layout`` (same signatures as ``reference``).

Both are one job: give every row a member per carried selection (``(dest // divisor) % S``), then
list the (member, row[, k]) hits in member-major order. Two passes over row blocks:

1. ``_layout_count_kernel``: per block, how many packed rows each member gets from it.
2. a tiny torch step (``[blocks, S]``): exclusive prefix sums give each (block, member) its start
   in the send buffer; that is the only cross-program dependency.
3. ``_layout_write_kernel``: recomputes the per-row counts, prefix-sums them inside the block and
   writes every packed row's source row, carried-selection mask and/or selection index.

Outputs are integers and equal the reference exactly, order included. No autograd: nothing here
is differentiable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference, triton_util
from .reference import ExpandLayout, StageLayout
from .triton_util import check_tensor, device_guard, interpreting, pow2


@triton.jit
def _member_hits(dest_ptr, rows, row_ok, k, K, divisor, S, s_S):
    """Member of selection k of each row (-1 if none) and its one-hot over the padded members."""
    d = tl.load(dest_ptr + rows.to(tl.int64) * K + k, mask=row_ok, other=-1)
    m = tl.where(d >= 0, (d // divisor) % S, -1)
    # m == -1 never matches a lane, and lanes >= S never match a real member: padding is inert.
    return m, m[:, None] == s_S[None, :]


@triton.jit
def _row_counts(dest_ptr, rows, row_ok, K, divisor, S, s_S, DEDUP: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_S: tl.constexpr):
    """int32 [BLOCK_R, BLOCK_S]: packed rows each row sends to each member (0/1 if DEDUP)."""
    cnt = tl.zeros([BLOCK_R, BLOCK_S], tl.int32)
    for k in range(K):
        _, hit = _member_hits(dest_ptr, rows, row_ok, k, K, divisor, S, s_S)
        if DEDUP:
            cnt = tl.maximum(cnt, hit.to(tl.int32))
        else:
            cnt += hit.to(tl.int32)
    return cnt


@triton.jit(do_not_specialize=["R"])  # data-dependent size: no new variant mid-training
def _layout_count_kernel(dest_ptr, block_cnt_ptr, R, K, divisor, S, DEDUP: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """block_cnt [blocks, BLOCK_S] int32: packed rows per member coming from each block of rows."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    s_S = tl.arange(0, BLOCK_S)
    cnt = _row_counts(dest_ptr, rows, rows < R, K, divisor, S, s_S, DEDUP, BLOCK_R, BLOCK_S)
    tl.store(block_cnt_ptr + pid * BLOCK_S + s_S, tl.sum(cnt, axis=0))


@triton.jit(do_not_specialize=["R"])
def _layout_write_kernel(dest_ptr, block_base_ptr, src_row_ptr, mask_ptr, src_k_ptr, R, K, divisor, S,
                         DEDUP: tl.constexpr, WRITE_MASK: tl.constexpr, WRITE_K: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """Write src_row [P] (int64), mask [P, K] (uint8, pre-zeroed) and/or src_k [P] (int64)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    s_S = tl.arange(0, BLOCK_S)
    cnt = _row_counts(dest_ptr, rows, row_ok, K, divisor, S, s_S, DEDUP, BLOCK_R, BLOCK_S)
    base_S = tl.load(block_base_ptr + pid * BLOCK_S + s_S)
    # Position of each row's first packed row per member: block start + rows before it in the block.
    pos_RS = base_S[None, :] + (tl.cumsum(cnt, axis=0) - cnt).to(tl.int64)
    rows_RS = tl.zeros([BLOCK_R, BLOCK_S], tl.int64) + rows.to(tl.int64)[:, None]
    if DEDUP:
        tl.store(src_row_ptr + pos_RS, rows_RS, mask=cnt > 0)
    for k in range(K):
        m, hit = _member_hits(dest_ptr, rows, row_ok, k, K, divisor, S, s_S)
        # At most one hit per row: the sum picks this selection's packed row.
        pos = tl.sum(tl.where(hit, pos_RS, 0), axis=1)
        ok = m >= 0
        if WRITE_MASK:
            tl.store(mask_ptr + pos * K + k, tl.full([BLOCK_R], 1, tl.uint8), mask=ok)
        if not DEDUP:
            # One packed row per selection, k-ordered within (member, row): advance that member's slot.
            tl.store(src_row_ptr + pos, rows.to(tl.int64), mask=ok)
            if WRITE_K:
                tl.store(src_k_ptr + pos, tl.full([BLOCK_R], 0, tl.int64) + k, mask=ok)
            pos_RS += hit.to(tl.int64)


# Elements of a layout tile ([BLOCK_R, BLOCK_S] int64 per tensor, 4 warps): 4096 spilled registers
# for S >= 32 on sm_80/sm_90 (GPU_REVIEW.md #11); the AOT compile test (tests/test_triton_aot.py)
# checks that no production variant spills at this size.
LAYOUT_TILE = 2048


def _blocks(rows: int, S: int, device: torch.device) -> tuple[int, int]:
    block_s = pow2(S)
    if triton_util.BLOCK_ROWS_OVERRIDE:
        return triton_util.BLOCK_ROWS_OVERRIDE, block_s
    if device.type == "cuda" and not interpreting():
        return max(4, LAYOUT_TILE // block_s), block_s
    # Interpreter: one program for the whole test-sized input.
    return max(1, min(pow2(rows), max(1, 65536 // block_s))), block_s


def _layout(dest_RK: torch.Tensor, divisor: int, S: int, dedup: bool, write_mask: bool, write_k: bool,
            size: int | None = None):
    """(src_row_P, mask_PK or None, src_k_P or None, counts_S), all in reference order."""
    check_tensor(dest_RK)
    dest_RK = dest_RK.contiguous()
    R, K = dest_RK.shape
    dev = dest_RK.device
    if R == 0 or K == 0 or S == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        mask = torch.zeros(0, K, dtype=torch.bool, device=dev) if write_mask else None
        return empty, mask, empty.clone() if write_k else None, torch.zeros(S, dtype=torch.int64, device=dev)
    if S == 1:  # every row goes to member 0: a compaction, no kernel (its tiles would be 4096 x 1)
        return _one_member(dest_RK, dedup, write_mask, write_k, size)
    block_r, block_s = _blocks(R, S, dev)
    grid = (triton.cdiv(R, block_r),)
    block_cnt = torch.empty(grid[0], block_s, dtype=torch.int32, device=dev)
    with device_guard(dest_RK):
        _layout_count_kernel[grid](dest_RK, block_cnt, R, K, divisor, S, dedup, block_r, block_s)
    # Cross-block prefix sums on a [blocks, S] table: member-major, then block order.
    block_cnt = block_cnt.to(torch.int64)
    counts_S = block_cnt.sum(0)
    member_start_S = torch.cumsum(counts_S, 0) - counts_S
    block_base = member_start_S + torch.cumsum(block_cnt, 0) - block_cnt
    counts_S = counts_S[:S]
    # the buffers' size: known from the layer's count exchange, else a host sync (as nonzero() needs)
    P = int(counts_S.sum()) if size is None else size
    if size is not None:
        # The kernel writes counts_S.sum() rows into buffers of ``size``: a disagreement with the count
        # exchange would write past them on a GPU. Checked on the device, no sync (a device assert).
        torch._assert_async(counts_S.sum() == size, "layout rows differ from the count exchange's size")
    src_row_P = torch.empty(P, dtype=torch.int64, device=dev)
    mask_PK = torch.zeros(P, K, dtype=torch.uint8, device=dev) if write_mask else src_row_P
    src_k_P = torch.empty(P, dtype=torch.int64, device=dev) if write_k else src_row_P
    with device_guard(dest_RK):
        _layout_write_kernel[grid](
            dest_RK, block_base.contiguous(), src_row_P, mask_PK, src_k_P, R, K, divisor, S,
            dedup, write_mask, write_k, block_r, block_s,
        )
    return (
        src_row_P,
        mask_PK.view(torch.bool) if write_mask else None,
        src_k_P if write_k else None,
        counts_S.contiguous(),
    )


def _one_member(dest_RK: torch.Tensor, dedup: bool, write_mask: bool, write_k: bool, size: int | None):
    """``_layout`` for a group of one (S == 1) by the reference's compaction (identical output; with
    ``size`` it is ``nonzero_static``: no host sync)."""
    if write_k:
        lay = reference.expand_layout(dest_RK, 1, size)
        return lay.src_row_Q, None, lay.src_k_Q, lay.counts_e
    lay = reference.stage_layout(dest_RK, 1, 1, dedup, size)
    return lay.src_row_P, lay.mask_PK, None, lay.send_counts_S


def stage_layout(
    dest_rank_RK: torch.Tensor, divisor: int, group_size: int, dedup: bool, size: int | None = None
) -> StageLayout:
    """Triton ``reference.stage_layout``: dest_rank_RK int [R, K] (-1 = none) -> StageLayout.

    src_row_P int64 [P] in split order (member, then row, then k); mask_PK bool [P, K];
    send_counts_S int64 [S].
    """
    src_row_P, mask_PK, _, counts_S = _layout(dest_rank_RK, divisor, group_size, dedup, True, False, size)
    return StageLayout(src_row_P, mask_PK, counts_S)


def expand_layout(phys_RK: torch.Tensor, local_experts: int, size: int | None = None) -> ExpandLayout:
    """Triton ``reference.expand_layout``: phys_RK int [R, K] (-1 = none) -> rows grouped by slot.

    src_row_Q, src_k_Q int64 [Q] ordered (slot, row, k); counts_e int64 [e].
    """
    src_row_Q, _, src_k_Q, counts_e = _layout(phys_RK, 1, local_experts, False, False, True, size)
    return ExpandLayout(src_row_Q, src_k_Q, counts_e)
