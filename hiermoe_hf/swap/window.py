"""Routing statistics for the expert swap: a bounded window of recent routing per MoE layer.

The swap planner needs every token's whole set of experts and the rank it started on: de-duplicated
row counts are not additive over experts (a token sends one row per group it hits, however many
of its experts sit there), so per-expert counters cannot price a swap. Each rank therefore keeps,
per MoE layer, its last ``capacity`` tokens' logical top-k ids in a ring buffer on the routing's
device (int32 [capacity, K]; -1 = empty or an invalid/sentinel id), plus counters of the interval
since the last planning round. Recording is one ``index_copy_`` per forward, without a host sync.
At planning time ``gather_windows`` collects every rank's buffer, so all ranks plan on the same
global routing and reach the same decision.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hiermoe_hf.runtime.routing import RoutingStats
from hiermoe_hf.swap.objective import RoutingWindow

_META = ("filled", "tokens", "forwards", "passes", "capacity", "topk")


def _meta_row(stats: RoutingStats) -> list[int]:
    K = 0 if stats.ids_NK is None else stats.ids_NK.shape[1]
    return [stats.filled, stats.tokens, stats.forwards, stats.passes, stats.capacity, K]


def gather_windows(
    layers: list, device: torch.device, group=None, dst: int | None = None
) -> list[RoutingWindow | None]:
    """Every rank's window of each layer. Collective over ``group``.

    layers: LayerStates in the same order on every rank. Returns one RoutingWindow per layer (None
    when no rank recorded any token): ids_NK int64 [N, K] of all ranks' held tokens, origin_N their
    ranks, rows_scale = global tokens per forward / N, passes = the interval's passes. With ``dst``
    (a global rank) only that rank receives the windows (a gather, not an all-gather); the others
    get None for every layer. Two collectives in all: the counters of all layers (all-gathered),
    then the ids of all layers in one buffer (int16 when every id fits, else int32; each rank
    sends the layer's largest filled length, not its capacity).
    """
    distributed = dist.is_available() and dist.is_initialized()
    W = dist.get_world_size(group) if distributed else 1
    meta = torch.tensor([_meta_row(layer.routing) for layer in layers], dtype=torch.int64, device=device)
    meta = meta.view(len(layers), len(_META))
    if distributed and W > 1:
        parts = [torch.empty_like(meta) for _ in range(W)]
        dist.all_gather(parts, meta, group=group)
        meta_RLM = torch.stack(parts).cpu()
    else:
        meta_RLM = meta.cpu().view(1, len(layers), len(_META))
    shapes: list[tuple[int, int] | None] = []  # per layer (rows each rank sends, K), None: nothing held
    for i, layer in enumerate(layers):
        filled_R, k_R = meta_RLM[:, i, 0].tolist(), meta_RLM[:, i, 5].tolist()
        ks = {k for k in k_R if k}
        if len(ks) > 1:
            raise ValueError(f"layer {layer.name}: ranks recorded different top-k sizes {sorted(ks)}")
        shapes.append((max(filled_R), ks.pop()) if ks and sum(filled_R) else None)
    small = all(layer.placement.num_experts <= torch.iinfo(torch.int16).max for layer in layers)
    dtype = torch.int16 if small else torch.int32
    mine = []
    for layer, shape in zip(layers, shapes):
        if shape is None:
            continue
        buf = torch.full(shape, -1, dtype=dtype, device=device)
        held = layer.routing.window()
        if held.numel():
            buf[: held.shape[0]] = held.to(device=device, dtype=dtype)
        mine.append(buf.view(-1))
    if not mine:
        return [None] * len(layers)
    flat = torch.cat(mine).view(torch.uint8)  # as bytes: gloo has no int16 collectives
    me = dist.get_rank() if distributed and W > 1 else 0
    if distributed and W > 1:
        parts = [torch.empty_like(flat) for _ in range(W)] if dst is None or me == dst else None
        if dst is None:
            dist.all_gather(parts, flat, group=group)
        else:
            dist.gather(flat, parts, dst=dst, group=group)
    else:
        parts = [flat]
    if parts is None:
        return [None] * len(layers)
    out: list[RoutingWindow | None] = []
    offset = 0
    for i, shape in enumerate(shapes):
        if shape is None:
            out.append(None)
            continue
        n, K = shape
        filled_R, tokens_R, forwards_R, passes_R = meta_RLM[:, i, :4].T.tolist()
        ids = torch.cat([p.view(dtype)[offset : offset + n * K].view(n, K)[:f] for p, f in zip(parts, filled_R)])
        ids = ids.to(torch.int64)
        offset += n * K
        origin = torch.cat([torch.full((f,), r, dtype=torch.int64, device=device) for r, f in enumerate(filled_R)])
        forwards = max(forwards_R)
        per_forward = sum(tokens_R) / forwards if forwards else float(ids.shape[0])
        out.append(RoutingWindow(ids, origin, per_forward / ids.shape[0], float(max(passes_R))))
    return out
