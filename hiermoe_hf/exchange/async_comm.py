"""Split-phase exchanges for the overlapped pipeline: ``start`` launches, ``finish`` waits.

``StartExchange`` launches ``all_to_all_single(async_op=True)`` of row-aligned parts packed in one
byte buffer and returns views of the receive buffer (not yet filled); ``FinishExchange`` waits and
hands the same tensors on. Work placed between the two on the host overlaps the transfer. The
backward mirrors it: ``FinishExchange.backward`` launches the reverse exchange of the gradients,
``StartExchange.backward`` waits for it, and the autograd engine runs the other chunks' backward
in between. A ``Pending`` object carries the in-flight work from one half to the other; it is
created per exchange and passed explicitly (nothing is kept on a module).

Parts: floating tensors are differentiable (their gradients travel back in one buffer), integer
ones (ids) are not. Works on gloo and NCCL (``Work.wait`` on NCCL only orders the streams).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hiermoe_hf.exchange.comm import pack_bytes, unpack_bytes


class Pending:
    """One exchange in flight: its forward and backward work handles and the buffers they use."""

    def __init__(self, send: list[int], recv: list[int], group):
        self.send, self.recv, self.group = send, recv, group
        self.work = self.grad_work = None
        self.grad_views: tuple = ()
        self.keep: tuple = ()


def _launch(parts: list[torch.Tensor], send: list[int], recv: list[int], group):
    """-> (work, views of the receive buffer per part, buffers to keep alive until the wait)."""
    buf = pack_bytes(parts)
    out = buf.new_empty((sum(recv), buf.shape[1]))
    work = dist.all_to_all_single(out, buf, output_split_sizes=recv, input_split_sizes=send, group=group, async_op=True)
    return work, unpack_bytes(out, [(t.shape[1], t.dtype) for t in parts]), (buf, out)


class StartExchange(torch.autograd.Function):
    """apply(pending, *parts [P, n_i]) -> views [R, n_i] filled once ``FinishExchange`` has waited."""

    @staticmethod
    def forward(ctx, pending: Pending, *parts):
        ctx.pending = pending
        ctx.float_mask = [t.is_floating_point() for t in parts]
        pending.work, views, pending.keep = _launch([t.detach() for t in parts], pending.send, pending.recv,
                                                    pending.group)
        ctx.mark_non_differentiable(*[v for v, f in zip(views, ctx.float_mask) if not f])
        return tuple(views)

    @staticmethod
    def backward(ctx, *_grads):
        # the gradients arrive through FinishExchange.backward, which launched their reverse exchange
        pending = ctx.pending
        pending.grad_work.wait()
        views, pending.grad_views, pending.keep = pending.grad_views, (), ()
        it = iter(views)
        return (None,) + tuple(next(it) if f else None for f in ctx.float_mask)


class FinishExchange(torch.autograd.Function):
    """apply(pending, *views) -> the same tensors, after the transfer is complete."""

    @staticmethod
    def forward(ctx, pending: Pending, *views):
        ctx.pending = pending
        ctx.float_mask = [t.is_floating_point() for t in views]
        pending.work.wait()
        outs = tuple(v.view_as(v) for v in views)
        ctx.mark_non_differentiable(*[o for o, f in zip(outs, ctx.float_mask) if not f])
        return outs

    @staticmethod
    def backward(ctx, *grads):
        # launch the gradients' reverse exchange; StartExchange.backward waits for it. autograd
        # materialises the gradients of unused outputs as zeros, so every one is a tensor.
        pending = ctx.pending
        floats = [g.contiguous() for g, f in zip(grads, ctx.float_mask) if f]
        pending.grad_work, pending.grad_views, pending.keep = _launch(floats, pending.recv, pending.send, pending.group)
        return (None,) + tuple(g if f else None for g, f in zip(grads, ctx.float_mask))


def start(pending: Pending, *parts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return StartExchange.apply(pending, *parts)


def finish(pending: Pending, *views: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return FinishExchange.apply(pending, *views)
