"""The local experts' MLP on the rows a rank received: grouped GEMMs over the local slots.

It honours the experts class as Transformers' own implementations do: per-expert biases, no gate
(``up_proj`` + activation), transposed weights, the class's ``_apply_gate`` and a post-expert norm.

Transformers' own experts implementations ("grouped_mm", "batched_mm", ...) take the full routing
of a block and size their offsets by ``num_experts`` (all experts), so none of them can run on a
rank's subset of slots without changing the module. The same kernel they use for "grouped_mm",
``torch.nn.functional.grouped_mm`` / ``torch._grouped_mm``, is called here directly with per-slot
offsets built on the device (no host read). Where it cannot run (old torch, a GPU older than sm80,
unaligned CPU tensors on torch <= 2.10, or a model loaded with ``experts_implementation="eager"``)
the per-slot loop is the fallback; it needs the slot sizes on the host.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F


def up_weight(experts: torch.nn.Module) -> torch.Tensor:
    """The first projection's weights [e, 2I, H] (``gate_up_proj``), or [e, I, H] without a gate
    (``up_proj``: Nemotron-H); [e, H, *] when ``is_transposed``."""
    return experts.gate_up_proj if experts.has_gate else experts.up_proj


def _bias(experts: torch.nn.Module, weight_name: str) -> torch.Tensor | None:
    """The per-expert bias [e, O] of ``weight_name`` when the class has biases (gpt-oss), else None."""
    return getattr(experts, f"{weight_name}_bias") if experts.has_bias else None


def _activate(experts: torch.nn.Module, h_QI: torch.Tensor) -> torch.Tensor:
    """The class's own gate (``_apply_gate``: concatenated, interleaved or clamped SwiGLU) on the
    gate+up output, or its activation alone when it has no gate."""
    return experts._apply_gate(h_QI) if experts.has_gate else experts.act_fn(h_QI)


def _post_norm(experts: torch.nn.Module, y_QH: torch.Tensor) -> torch.Tensor:
    """The class's post-expert norm (a dense module inside the experts: not sharded), when it has one."""
    return experts.post_expert_norm(y_QH) if getattr(experts, "has_post_expert_norm", False) else y_QH


def _up_name(experts: torch.nn.Module) -> str:
    return "gate_up_proj" if experts.has_gate else "up_proj"


_GROUPED_DTYPES = {torch.float32, torch.bfloat16, torch.float16}


def _grouped_mm_fn():
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def can_group(experts: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether ``grouped_mm`` can run the local slots of ``experts`` on rows like ``x``."""
    impl = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    if impl == "eager" or _grouped_mm_fn() is None:
        return False
    w = up_weight(experts)
    if not {x.dtype, w.dtype} <= _GROUPED_DTYPES:  # no float64 kernel: the loop runs
        return False
    if w.device.type == "cuda":
        return torch.cuda.get_device_capability(w.device) >= (8, 0)
    if w.device.type == "cpu":
        major, minor = (int(p) for p in torch.__version__.split(".")[:2])
        if (major, minor) <= (2, 8):
            return False  # no CPU kernel
        if (major, minor) <= (2, 10):  # CPU kernel wants 16-byte aligned operands
            return all(t.data_ptr() % 16 == 0 for t in (w, experts.down_proj, x))
    return True


def grouped_linear(x_QI: torch.Tensor, w_eOI: torch.Tensor, offs_e: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Rows of slot s (rows ``offs[s-1]:offs[s]``) times slot s's weight: [Q, I] -> [Q, O].

    w_eOI: [e, O, I] (Transformers' layout; [e, I, O] when ``transposed``); offs_e int32 [e] ends.
    """
    w = w_eOI if transposed else w_eOI.transpose(-2, -1)
    device = x_QI.device.type
    if torch.is_autocast_enabled(device):  # as F.linear under autocast: both operands in its dtype
        dtype = torch.get_autocast_dtype(device)
        return _grouped_mm_fn()(x_QI.to(dtype), w.to(dtype), offs=offs_e)
    return _grouped_mm_fn()(x_QI.to(w.dtype), w, offs=offs_e)


def _mlp_grouped(experts, x_QH: torch.Tensor, counts_e: torch.Tensor) -> torch.Tensor:
    """Grouped GEMMs over the slots; a bias is added per row (``bias[slot of the row]``)."""
    offs = torch.cumsum(counts_e, 0, dtype=torch.int32)
    t = bool(experts.is_transposed)
    slot_Q = None
    if experts.has_bias:  # rows are grouped by slot; output_size: no host read
        slot_Q = torch.repeat_interleave(
            torch.arange(counts_e.shape[0], device=x_QH.device), counts_e, output_size=x_QH.shape[0]
        )

    def linear(x, name):
        y = grouped_linear(x, getattr(experts, name), offs, t)
        bias = _bias(experts, name)
        return y if bias is None else y + bias[slot_Q].to(y.dtype)

    h = _activate(experts, linear(x_QH, _up_name(experts)))
    return _post_norm(experts, linear(h, "down_proj"))


def _mlp_loop(experts, x_QH: torch.Tensor, counts_e: torch.Tensor) -> torch.Tensor:
    outs = []
    t = bool(experts.is_transposed)
    up, down = _up_name(experts), "down_proj"

    def linear(x, name, slot):
        w = getattr(experts, name)[slot]
        bias = _bias(experts, name)
        return F.linear(x, w.t() if t else w, None if bias is None else bias[slot])

    for slot, x_chunk in enumerate(x_QH.split(counts_e.tolist())):  # host read: the fallback only
        outs.append(linear(_activate(experts, linear(x_chunk, up, slot)), down, slot))
    y_QH = torch.cat(outs) if outs else x_QH.new_zeros(0, x_QH.shape[1])
    return _post_norm(experts, y_QH)


def local_experts_forward(
    experts: torch.nn.Module,
    x_RH: torch.Tensor,
    phys_RK: torch.Tensor,
    w_RK: torch.Tensor,
    local_experts: int,
    ops: SimpleNamespace,
    arriving: int | None = None,
    grouped: bool | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every carried selection through its local expert and sum a row's weighted outputs.

    Args:
        experts: the Transformers experts module (``use_experts_implementation``), holding local slots
            only: ``gate_up_proj`` [e, 2I, H] (``up_proj`` [e, I, H] without a gate), ``down_proj``
            [e, H, I] (transposed layouts: [e, H, 2I] / [e, I, H]), optional ``*_bias`` [e, O].
        x_RH: [R, H] received rows; phys_RK: int64 [R, K] physical ids (-1 = not carried);
        w_RK: [R, K] routing weights.
        arriving: Q, the carried selections (from the layer's count exchange; None = count here).
        grouped: force the grouped GEMM (True) or the loop (False); None = ``can_group``.
        out_dtype: dtype of y (default: the experts' output dtype); the weighted sum is in fp32 or wider.
    Returns:
        (y_RH [R, H] = sum_k w_k * expert_k(x), counts_e int64 [e] rows per local slot).

    Dtypes as Transformers' experts: under autocast the GEMMs run in the autocast dtype; otherwise rows
    are cast to the weights' dtype (e.g. bf16 rows from an FSDP2 mixed-precision model, fp32 experts).
    """
    layout = ops.expand_layout(phys_RK, local_experts, arriving)
    x_QH = ops.pack_rows(x_RH, layout.src_row_Q)
    w_Q = w_RK[layout.src_row_Q, layout.src_k_Q]
    if not torch.is_autocast_enabled(x_QH.device.type):
        x_QH = x_QH.to(up_weight(experts).dtype)
    use_grouped = can_group(experts, x_QH) if grouped is None else grouped
    y_QH = (_mlp_grouped if use_grouped else _mlp_loop)(experts, x_QH, layout.counts_e)
    if torch.promote_types(y_QH.dtype, w_Q.dtype).itemsize < 4:
        # Transformers' experts round the weighted output to bf16/fp16 before summing: do the same.
        y_QH, w_Q = y_QH * w_Q.unsqueeze(1), torch.ones_like(w_Q, dtype=torch.float32)
    if out_dtype is not None:
        y_QH = y_QH.to(out_dtype)
    return ops.combine_rows(y_QH, w_Q, layout.src_row_Q, x_RH.shape[0]), layout.counts_e
