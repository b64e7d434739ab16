"""Triton combine: ``combine_rows`` (weighted segment sum) and ``unpack_sum`` (sum of a row's copies).

Both are ``out[dst[q]] += (w[q] *) y[q]``. Instead of atomics, the rows are first grouped by
destination (a stable sort of the int index, O(Q) small work in torch), then each program owns a
block of output rows and sums their inputs in registers: fp32 accumulation (fp64 for fp64), one
store in the output dtype, no fp32 scratch buffer, and the same summation order as the CPU reference
(ascending q), so results are deterministic.

Backwards: ``unpack_sum`` -> gather (``triton_rows.gather_rows``); ``combine_rows`` -> one kernel
producing grad_y = w * grad_out[dst] and grad_w = <y, grad_out[dst]> in a single pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_rows import gather_rows, segment_sum
from .triton_util import acc_tl, check_tensor, device_guard, row_blocks, to_dtype


@triton.jit(do_not_specialize=["Q"])  # data-dependent size: no new variant mid-training
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
            with device_guard(y_QH):
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
