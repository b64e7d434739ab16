"""Triton pack: ``pack_rows`` (row gather) and ``pack_route`` (ids and weights that travel along).

Forward is a gather, so it moves bytes unchanged in the input dtype (no fp32 round trip: fp64 stays
exact). The backward of a gather is a scatter-add, done by ``triton_rows.segment_sum``
(deterministic, fp32 accumulation); ``pack_rows`` and ``unpack_sum`` are each other's backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_rows import gather_rows, segment_sum
from .triton_util import check_tensor, device_guard, pow2, row_blocks


@triton.jit(do_not_specialize=["P"])  # data-dependent size: no new variant mid-training
def _pack_route_kernel(ids_ptr, w_ptr, idx_ptr, mask_ptr, ids_out_ptr, w_out_ptr, P, K,
                       BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """ids_out/w_out [P, K] = ids/w [R, K] rows idx [P] where mask [P, K], else -1 / 0."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    k = tl.arange(0, BLOCK_K)
    ok = (p < P)[:, None] & (k < K)[None, :]
    src = tl.load(idx_ptr + p, mask=p < P, other=0).to(tl.int64)
    out_off = p.to(tl.int64)[:, None] * K + k[None, :]
    carried = ok & (tl.load(mask_ptr + out_off, mask=ok, other=0) != 0)
    in_off = src[:, None] * K + k[None, :]
    # Masked loads supply -1 / 0 directly: no arithmetic on the loaded values (bf16-safe, fp64-exact).
    ids = tl.load(ids_ptr + in_off, mask=carried, other=-1)
    w = tl.load(w_ptr + in_off, mask=carried, other=0)
    tl.store(ids_out_ptr + out_off, ids, mask=ok)
    tl.store(w_out_ptr + out_off, w, mask=ok)


class _PackRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RH, src_row_P):
        ctx.save_for_backward(src_row_P)
        ctx.num_rows = x_RH.shape[0]
        return gather_rows(x_RH, src_row_P)

    @staticmethod
    def backward(ctx, grad_PH):

        (src_row_P,) = ctx.saved_tensors
        return segment_sum(grad_PH, src_row_P, ctx.num_rows), None


def pack_rows(x_RH: torch.Tensor, src_row_P: torch.Tensor) -> torch.Tensor:
    """Triton ``reference.pack_rows``: x_PH [P, H] = x_RH [R, H] rows src_row_P int64 [P].

    Backward: grad_x = unpack_sum(grad, src_row_P, R) (fp32-accumulated scatter-add).
    """
    return _PackRows.apply(x_RH, src_row_P)


class _PackRoute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids_RK, w_RK, src_row_P, mask_PK):
        check_tensor(ids_RK)
        ids_RK, w_RK = ids_RK.contiguous(), w_RK.contiguous()
        src_row_P, mask_u8_PK = src_row_P.contiguous(), mask_PK.contiguous().view(torch.uint8)
        P, K = mask_PK.shape
        ids_PK = torch.empty(P, K, dtype=ids_RK.dtype, device=ids_RK.device)
        w_PK = torch.empty(P, K, dtype=w_RK.dtype, device=w_RK.device)
        if P and K:
            block_p, _ = row_blocks(P, K, ids_RK.device)
            block_k = pow2(K)  # a route row is short: always one program across K
            with device_guard(ids_RK):
                _pack_route_kernel[(triton.cdiv(P, block_p),)](
                    ids_RK, w_RK, src_row_P, mask_u8_PK, ids_PK, w_PK, P, K, block_p, block_k
                )
        ctx.save_for_backward(src_row_P, mask_PK)
        ctx.num_rows = w_RK.shape[0]
        ctx.mark_non_differentiable(ids_PK)
        return ids_PK, w_PK

    @staticmethod
    def backward(ctx, _grad_ids, grad_w_PK):

        src_row_P, mask_PK = ctx.saved_tensors
        return None, segment_sum(grad_w_PK, src_row_P, ctx.num_rows, mask_PH=mask_PK), None, None


def pack_route(
    ids_RK: torch.Tensor, w_RK: torch.Tensor, src_row_P: torch.Tensor, mask_PK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``reference.pack_route``: ids int64 [R, K], w float [R, K] -> ids_PK (-1), w_PK (0).

    Backward (to w only): grad_w_RK[src_row_P[p], k] += grad_w_PK[p, k] where mask_PK[p, k].
    """
    return _PackRoute.apply(ids_RK, w_RK, src_row_P, mask_PK)
