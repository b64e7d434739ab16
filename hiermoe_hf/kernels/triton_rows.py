"""The two row primitives the pack and combine kernels are built from, each the other's backward.

``gather_rows`` copies rows by index (bytes unchanged, any float dtype). ``segment_sum`` adds rows
into their destination, ``out[dst[q]] += (w[q] *) (mask[q] *) y[q]``: instead of atomics the rows
are grouped by destination (a stable sort of the int index, O(Q) small work in torch), then each
program owns a block of output rows and sums their inputs in registers: fp32 accumulation (fp64 for
fp64), one store in the output dtype, and the same summation order as the CPU reference (ascending
q), so results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_util import acc_tl, check_tensor, device_guard, row_blocks, to_dtype


@triton.jit(do_not_specialize=["P"])  # data-dependent sizes: no new variant mid-training
def _gather_rows_kernel(x_ptr, idx_ptr, out_ptr, P, H, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr):
    """out [P, H] = x [R, H] rows idx [P]; grid (P blocks, H blocks)."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    p_ok = p < P
    src = tl.load(idx_ptr + p, mask=p_ok, other=0).to(tl.int64)  # int64: P*H can pass 2**31
    ok = p_ok[:, None] & (h < H)[None, :]
    row = tl.load(x_ptr + src[:, None] * H + h[None, :], mask=ok)
    tl.store(out_ptr + p.to(tl.int64)[:, None] * H + h[None, :], row, mask=ok)


@triton.jit(do_not_specialize=["num_rows"])
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


def gather_rows(x_RH: torch.Tensor, idx_P: torch.Tensor) -> torch.Tensor:
    """Launcher: ``x_RH[idx_P]`` -> [P, H] in x's dtype. x any float dtype, idx int [P]."""
    check_tensor(x_RH)
    x_RH, idx_P = x_RH.contiguous(), idx_P.contiguous()
    P, H = idx_P.shape[0], x_RH.shape[1]
    out_PH = torch.empty(P, H, dtype=x_RH.dtype, device=x_RH.device)
    if P == 0 or H == 0:
        return out_PH
    block_p, block_h = row_blocks(P, H, x_RH.device)
    grid = (triton.cdiv(P, block_p), triton.cdiv(H, block_h))
    with device_guard(x_RH):
        _gather_rows_kernel[grid](x_RH, idx_P, out_PH, P, H, block_p, block_h)
    return out_PH


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
    per_row = torch.zeros(num_rows, dtype=torch.int64, device=y_QH.device)  # scatter-add: no host sync
    dst64 = dst_row_Q.to(torch.int64)
    torch.cumsum(per_row.scatter_add_(0, dst64, torch.ones_like(dst64)), 0, out=start_R1[1:])
    w_arg = w_Q.contiguous() if w_Q is not None else y_QH
    mask_arg = mask_PH.contiguous().view(torch.uint8) if mask_PH is not None else y_QH
    block_r, block_h = row_blocks(num_rows, H, y_QH.device)
    grid = (triton.cdiv(num_rows, block_r), triton.cdiv(H, block_h))
    with device_guard(y_QH):
        _segment_sum_kernel[grid](
            y_QH, w_arg, mask_arg, order_Q, start_R1, out_RH, num_rows, H,
            w_Q is not None, mask_PH is not None, acc_tl(y_QH.dtype), block_r, block_h,
        )
    return out_RH
