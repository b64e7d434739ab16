"""The local experts' MLP on the rows a rank received (one expert slot after another)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F


def _apply_gate(experts: torch.nn.Module, h_QI2: torch.Tensor) -> torch.Tensor:
    gate = getattr(experts, "_apply_gate", None)
    if gate is not None:
        return gate(h_QI2)
    g, u = h_QI2.chunk(2, dim=-1)  # Transformers' concatenated [gate; up] layout
    return experts.act_fn(g) * u


def local_experts_forward(
    experts: torch.nn.Module,
    x_RH: torch.Tensor,
    phys_RK: torch.Tensor,
    w_RK: torch.Tensor,
    local_experts: int,
    ops: SimpleNamespace,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every carried selection through its local expert and sum a row's weighted outputs.

    Args:
        experts: the Transformers experts module, holding local slots only:
            ``gate_up_proj`` [e, 2I, H], ``down_proj`` [e, H, I].
        x_RH: [R, H] received rows; phys_RK: int64 [R, K] physical ids (-1 = not carried);
        w_RK: [R, K] routing weights.
        out_dtype: dtype of y (default: the experts' output dtype); the weighted sum is in fp32 or wider.
    Returns:
        (y_RH [R, H] = sum_k w_k * expert_k(x), counts_e int64 [e] rows per local slot).

    Dtypes as Transformers' experts: under autocast the GEMMs run in the autocast dtype; otherwise rows
    are cast to the weights' dtype (e.g. bf16 rows from an FSDP2 mixed-precision model, fp32 experts).
    """
    layout = ops.expand_layout(phys_RK, local_experts)
    x_QH = ops.pack_rows(x_RH, layout.src_row_Q)
    w_Q = w_RK[layout.src_row_Q, layout.src_k_Q]
    if not torch.is_autocast_enabled(x_QH.device.type):
        x_QH = x_QH.to(experts.gate_up_proj.dtype)
    outs = []
    for slot, x_chunk in enumerate(x_QH.split(layout.counts_e.tolist())):
        h = _apply_gate(experts, F.linear(x_chunk, experts.gate_up_proj[slot]))
        outs.append(F.linear(h, experts.down_proj[slot]))
    y_QH = torch.cat(outs) if outs else x_QH.new_zeros(0, x_RH.shape[1])
    if torch.promote_types(y_QH.dtype, w_Q.dtype).itemsize < 4:
        # Transformers' experts round the weighted output to bf16/fp16 before summing: do the same.
        y_QH, w_Q = y_QH * w_Q.unsqueeze(1), torch.ones_like(w_Q, dtype=torch.float32)
    if out_dtype is not None:
        y_QH = y_QH.to(out_dtype)
    return ops.combine_rows(y_QH, w_Q, layout.src_row_Q, x_RH.shape[0]), layout.counts_e
