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


def exchange_counts(send_counts_S: torch.Tensor, group) -> torch.Tensor:
    """All-to-all of per-member row counts: int64 [S] sent -> int64 [S] received."""
    recv = torch.empty_like(send_counts_S)
    dist.all_to_all_single(recv, send_counts_S.contiguous(), group=group)
    return recv


def _a2a(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


def _fresh(t: torch.Tensor) -> torch.Tensor:
    """A copy with standard strides and offset 0, as ``Tensor.view(dtype)`` needs (also when empty)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def _route_to_int(ids_PK: torch.Tensor, w_PK: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
    """Ids and weights as one int32 tensor [P, K + K*c] (weights bit-cast, lossless)."""
    wide = torch.float64 if w_PK.dtype == torch.float64 else torch.float32
    w_bits = _fresh(w_PK.detach().to(wide)).view(torch.int32)
    return torch.cat([ids_PK.to(torch.int32), w_bits], dim=1), wide


class ExchangeRows(torch.autograd.Function):
    """Send packed rows with their ids and weights to the group members; backward sends grads back.

    forward(x_PH, w_PK, ids_PK, send, recv, group) -> (x_RH, w_RK, ids_RK): ``send``/``recv`` are
    per-member row counts (lists of int). Two collectives: rows, and route (ids + bit-cast weights).
    """

    @staticmethod
    def forward(ctx, x_PH, w_PK, ids_PK, send, recv, group):
        ctx.send, ctx.recv, ctx.group, ctx.w_dtype = send, recv, group, w_PK.dtype
        K = ids_PK.shape[1]
        x_RH = _a2a(x_PH, send, recv, group)
        route_P, wide = _route_to_int(ids_PK, w_PK)
        route_R = _a2a(route_P, send, recv, group)
        ids_RK = route_R[:, :K].to(torch.int64)
        w_RK = _fresh(route_R[:, K:]).view(wide).to(w_PK.dtype)
        ctx.mark_non_differentiable(ids_RK)
        return x_RH, w_RK, ids_RK

    @staticmethod
    def backward(ctx, gx_RH, gw_RK, _gids):
        # autograd materialises absent output grads as zeros, so both are tensors
        gx_PH = _a2a(gx_RH, ctx.recv, ctx.send, ctx.group)
        gw_PK = _a2a(gw_RK, ctx.recv, ctx.send, ctx.group)
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
