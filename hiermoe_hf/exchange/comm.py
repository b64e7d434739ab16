"""Process groups per stage, and the differentiable row exchange of one stage."""

from __future__ import annotations

import torch
import torch.distributed as dist

from hiermoe_hf.topology import Stage, Topology


class StageGroups:
    """One process group per (stage digit range) this rank belongs to, built once and reused.

    Every rank creates every group in the same order (``dist.new_group`` is collective). A group of
    one rank is None: its stage needs no communication. A stage spanning the whole world uses the
    default group.

    ``rank`` is the rank inside the expert-parallel group (the topology's digits). With ``replicas``
    > 1 (``HierMoEConfig.ep_size``) the world holds that many copies of the topology, copy ``j``
    being global ranks ``j * topology.world_size ...``; this rank is in copy ``replica`` and every
    group it gets lies inside its copy.
    """

    def __init__(self, topology: Topology, rank: int, replica: int = 0, replicas: int = 1):
        self.topology = topology
        self.rank = rank
        self.replica, self.replicas = replica, replicas
        self._groups: dict[tuple[int, int], object] = {}
        for stage in topology.distinct_stages():
            self._build(stage)

    def _build(self, stage: Stage) -> None:
        key = (stage.lo, stage.hi)
        size = self.topology.group_size(stage)
        if size == 1:
            self._groups[key] = None
        elif size == self.topology.world_size and self.replicas == 1:
            self._groups[key] = dist.group.WORLD
        else:
            mine, n = None, self.topology.world_size
            for j in range(self.replicas):
                for ranks in self.topology.all_groups(stage):
                    g = dist.new_group([j * n + r for r in ranks])
                    if j == self.replica and self.rank in ranks:
                        mine = g
            self._groups[key] = mine

    def get(self, stage: Stage):
        return self._groups[(stage.lo, stage.hi)]


def whole_group(topology: Topology, groups: "StageGroups | None"):
    """The group of the flat stage (every rank of the topology): the layer's count exchange runs there."""
    return None if groups is None else groups.get(topology.stages("a2a")[0])


def _a2a(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


_ALIGN = 8  # every part starts at a multiple of 8 bytes, so each can be viewed back as its dtype


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def meta_row_bytes(K: int, w_dtype: torch.dtype) -> int:
    """Bytes a dispatched row carries besides its hidden state: int32 ids + weights, each padded."""
    return _padded(4 * K) + _padded(K * torch.empty((), dtype=w_dtype).element_size())


def pack_bytes(parts: list[torch.Tensor]) -> torch.Tensor:
    """[P, n_i] tensors of any dtypes -> one uint8 [P, sum of padded row bytes] buffer (one exchange)."""
    P = parts[0].shape[0]
    widths = [_padded(t.shape[1] * t.element_size()) for t in parts]
    buf = torch.empty(P, sum(widths), dtype=torch.uint8, device=parts[0].device)
    pos = 0
    for t, w in zip(parts, widths):
        n = t.shape[1] * t.element_size()
        if n:
            buf[:, pos : pos + n].view(t.dtype).copy_(t)
        pos += w
    return buf


def unpack_bytes(buf: torch.Tensor, like: list[tuple[int, torch.dtype]]) -> list[torch.Tensor]:
    """Inverse of ``pack_bytes``: ``like`` = (columns, dtype) per part -> strided views [R, n_i]."""
    out, pos = [], 0
    for cols, dtype in like:
        n = cols * torch.empty((), dtype=dtype).element_size()
        if n:
            out.append(buf[:, pos : pos + n].view(dtype))
        else:
            out.append(torch.empty(buf.shape[0], 0, dtype=dtype, device=buf.device))
        pos += _padded(n)
    return out


def _exchange_parts(parts: list[torch.Tensor], send: list[int], recv: list[int], group) -> list[torch.Tensor]:
    """One ``all_to_all_single`` of several row-aligned tensors packed side by side as bytes."""
    like = [(t.shape[1], t.dtype) for t in parts]
    return unpack_bytes(_a2a(pack_bytes(parts), send, recv, group), like)


class ExchangeRows(torch.autograd.Function):
    """Send packed rows with their ids and weights to the group members; backward sends grads back.

    forward(x_PH, w_PK, ids_PK, send, recv, group) -> (x_RH, w_RK, ids_RK): ``send``/``recv`` are
    per-member row counts (lists of int). One collective each way: rows, ids (int32) and weights
    (bit-exact, in their own dtype) share one byte buffer; the backward sends the row gradients and
    the weight gradients in one buffer too.
    """

    @staticmethod
    def forward(ctx, x_PH, w_PK, ids_PK, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        x_RH, ids_RK, w_RK = _exchange_parts([x_PH, ids_PK.to(torch.int32), w_PK.detach()], send, recv, group)
        ids_RK = ids_RK.to(torch.int64)
        ctx.mark_non_differentiable(ids_RK)
        return x_RH, w_RK, ids_RK

    @staticmethod
    def backward(ctx, gx_RH, gw_RK, _gids):
        # autograd materialises absent output grads as zeros, so both are tensors
        gx_PH, gw_PK = _exchange_parts([gx_RH, gw_RK], ctx.recv, ctx.send, ctx.group)
        return gx_PH, gw_PK, None, None, None, None


class ReturnRows(torch.autograd.Function):
    """Send combined rows back along a stage (the reverse of ``ExchangeRows``); backward re-sends."""

    @staticmethod
    def forward(ctx, y_RH, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _a2a(y_RH, send, recv, group)

    @staticmethod
    def backward(ctx, g_PH):
        return _a2a(g_PH, ctx.recv, ctx.send, ctx.group), None, None, None
