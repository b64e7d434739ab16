"""Triton combine: ``combine_rows`` (weighted segment sum) and ``unpack_sum`` (sum of a row's copies).

Both are ``out[dst[q]] += (w[q] *) y[q]``. Instead of atomics, the rows are first grouped by
destination (a stable sort of the int index, O(Q) small work in torch), then each program owns a
block of output rows and sums their inputs in registers: fp32 accumulation (fp64 for fp64), one
store in the output dtype, no fp32 scratch buffer, and the same summation order as the CPU reference
(ascending q), so results are deterministic.

Backwards: ``unpack_sum`` -> gather (``triton_pack.gather_rows``); ``combine_rows`` -> one kernel
producing grad_y = w * grad_out[dst] and grad_w = <y, grad_out[dst]> in a single pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_pack import gather_rows
from .triton_util import acc_tl, check_tensor, row_blocks, to_dtype


@triton.jit
def _segment_sum_kernel(y_ptr, w_ptr, mask_ptr, order_ptr, start_ptr, out_ptr, num_rows, H,
                        HAS_W: tl.constexpr, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """out [num_rows, H] = sum over q in segment(r) of (w[q] *) (mask[q] *) y[q]; grid (R blocks, H blocks).

    order [Q]: input rows sorted by destination (stable); start [num_rows + 1]: segment bounds.
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    r_ok = r < num_rows
    h_ok = h < H
    lo = tl.load(start_ptr + r, mask=r_ok, other=0)
    hi = tl.load(start_ptr + r + 1, mask=r_ok, other=0)
    acc = tl.zeros([BLOCK_R, BLOCK_H], ACC)
    # Rows of a block have different segment lengths: run to the longest, masking the shorter.
    for j in range(0, tl.max(hi - lo)):
        live = lo + j < hi
        q = tl.load(order_ptr + lo + j, mask=live, other=0).to(tl.int64)
        ok = live[:, None] & h_ok[None, :]
        off = q[:, None] * H + h[None, :]
        # Convert right after the load: fp32 (fp64) accumulation, and bf16-safe in the interpreter.
        y = tl.load(y_ptr + off, mask=ok, other=0).to(ACC)
        if HAS_MASK:
            y = tl.where(tl.load(mask_ptr + off, mask=ok, other=0) != 0, y, 0.0)
        if HAS_W:
            y = y * tl.load(w_ptr + q, mask=live, other=0).to(ACC)[:, None]
        acc += y
    out_off = r.to(tl.int64)[:, None] * H + h[None, :]
    tl.store(out_ptr + out_off, to_dtype(acc, out_ptr.dtype.element_ty), mask=r_ok[:, None] & h_ok[None, :])


@triton.jit
def _combine_bwd_kernel(g_ptr, y_ptr, w_ptr, dst_ptr, gy_ptr, gw_ptr, Q, H,
                        NEED_GY: tl.constexpr, NEED_GW: tl.constexpr, ACC: tl.constexpr,
                        BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr):
    """gy [Q, H] = w[q] * g[dst[q]]; gw [Q] = sum_h y[q, h] * g[dst[q], h]; grid (Q blocks,)."""
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < Q
    dst = tl.load(dst_ptr + q, mask=q_ok, other=0).to(tl.int64)
    w = tl.load(w_ptr + q, mask=q_ok, other=0).to(ACC)
    dot = tl.zeros([BLOCK_Q], ACC)
    # Loop over H so the dot product for grad_w finishes in registers (no atomics, one pass over g).
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        ok = q_ok[:, None] & (h < H)[None, :]
        g = tl.load(g_ptr + dst[:, None] * H + h[None, :], mask=ok, other=0).to(ACC)
        q_off = q.to(tl.int64)[:, None] * H + h[None, :]
        if NEED_GY:
            tl.store(gy_ptr + q_off, to_dtype(g * w[:, None], gy_ptr.dtype.element_ty), mask=ok)
        if NEED_GW:
            y = tl.load(y_ptr + q_off, mask=ok, other=0).to(ACC)
            dot += tl.sum(y * g, axis=1)
    if NEED_GW:
        tl.store(gw_ptr + q, to_dtype(dot, gw_ptr.dtype.element_ty), mask=q_ok)


def segment_sum(
    y_QH: torch.Tensor,
    dst_row_Q: torch.Tensor,
    num_rows: int,
    w_Q: torch.Tensor | None = None,
    mask_PH: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launcher: out [num_rows, H] in y's dtype, out[dst[q]] += (w[q] *) (mask[q] *) y[q].

    y_QH float [Q, H]; dst_row_Q int [Q] in [0, num_rows); w_Q float [Q] or None; mask_PH bool [Q, H]
    or None (pack_route's backward: only carried selections). fp32 accumulation (fp64 for fp64).
    """
    check_tensor(y_QH)
    y_QH, dst_row_Q = y_QH.contiguous(), dst_row_Q.contiguous()
    Q, H = y_QH.shape
    out_RH = torch.empty(num_rows, H, dtype=y_QH.dtype, device=y_QH.device)
    if num_rows == 0 or H == 0:
        return out_RH
    if Q == 0:
        return out_RH.zero_()  # nothing arrived: no sort, no launch on empty index buffers
    # Group inputs by destination: CSR of dst (stable, so each segment sums in ascending q).
    order_Q = torch.argsort(dst_row_Q, stable=True)
    start_R1 = torch.zeros(num_rows + 1, dtype=torch.int64, device=y_QH.device)
    torch.cumsum(torch.bincount(dst_row_Q, minlength=num_rows)[:num_rows], 0, out=start_R1[1:])
    w_arg = w_Q.contiguous() if w_Q is not None else y_QH
    mask_arg = mask_PH.contiguous().view(torch.uint8) if mask_PH is not None else y_QH
    block_r, block_h = row_blocks(num_rows, H, y_QH.device)
    grid = (triton.cdiv(num_rows, block_r), triton.cdiv(H, block_h))
    _segment_sum_kernel[grid](
        y_QH, w_arg, mask_arg, order_Q, start_R1, out_RH, num_rows, H,
        w_Q is not None, mask_PH is not None, acc_tl(y_QH.dtype), block_r, block_h,
    )
    return out_RH


def combine_backward(
    grad_RH: torch.Tensor, y_QH: torch.Tensor, w_Q: torch.Tensor, dst_row_Q: torch.Tensor,
    need_gy: bool = True, need_gw: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Launcher: (grad_y [Q, H] in y's dtype, grad_w [Q] in w's dtype) of ``combine_rows``."""
    check_tensor(y_QH)
    grad_RH, y_QH, w_Q, dst_row_Q = (t.contiguous() for t in (grad_RH, y_QH, w_Q, dst_row_Q))
    Q, H = y_QH.shape
    grad_y = torch.empty_like(y_QH) if need_gy else None
    grad_w = torch.empty_like(w_Q) if need_gw else None
    if Q and (need_gy or need_gw):
        if H == 0:
            if need_gw:
                grad_w.zero_()
        else:
            block_q, block_h = row_blocks(Q, H, y_QH.device)
            _combine_bwd_kernel[(triton.cdiv(Q, block_q),)](
                grad_RH, y_QH, w_Q, dst_row_Q,
                grad_y if need_gy else y_QH, grad_w if need_gw else w_Q, Q, H,
                need_gy, need_gw, acc_tl(y_QH.dtype), block_q, block_h,
            )
    return grad_y, grad_w


class _UnpackSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_PH, src_row_P, num_rows):
        ctx.save_for_backward(src_row_P)
        return segment_sum(y_PH, src_row_P, num_rows)

    @staticmethod
    def backward(ctx, grad_RH):
        (src_row_P,) = ctx.saved_tensors
        return gather_rows(grad_RH, src_row_P), None, None


def unpack_sum(y_PH: torch.Tensor, src_row_P: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Triton ``reference.unpack_sum``: out [num_rows, H] (y's dtype), out[src_row_P[p]] += y_PH[p].

    fp32 accumulation (fp64 for fp64). Backward: grad_y = grad_out[src_row_P] (``pack_rows``).
    """
    return _UnpackSum.apply(y_PH, src_row_P, num_rows)


class _CombineRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_QH, w_Q, dst_row_Q, num_rows):
        ctx.save_for_backward(y_QH, w_Q, dst_row_Q)
        return segment_sum(y_QH, dst_row_Q, num_rows, w_Q=w_Q)

    @staticmethod
    def backward(ctx, grad_RH):
        y_QH, w_Q, dst_row_Q = ctx.saved_tensors
        need_gy, need_gw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_y, grad_w = combine_backward(grad_RH, y_QH, w_Q, dst_row_Q, need_gy, need_gw)
        return grad_y, grad_w, None, None


def combine_rows(y_QH: torch.Tensor, w_Q: torch.Tensor, dst_row_Q: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Triton ``reference.combine_rows``: out [num_rows, H] (y's dtype) = segment sum of w_Q[q] * y_QH[q].

    y_QH float [Q, H]; w_Q float [Q]; dst_row_Q int64 [Q]. fp32 accumulation (fp64 for fp64).
    Backward: grad_y = w * grad_out[dst] (y's dtype); grad_w = <y, grad_out[dst]> (w's dtype).
    """
    return _CombineRows.apply(y_QH, w_Q, dst_row_Q, num_rows)
