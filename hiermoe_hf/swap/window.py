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

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hiermoe_hf.swap.objective import RoutingWindow

DEFAULT_CAPACITY = 4096  # tokens per rank per layer; the window bounds memory and planning time
_META = ("filled", "tokens", "forwards", "passes", "capacity", "topk")


@dataclass
class RoutingStats:
    """One MoE layer's recent routing on this rank.

    ids_NK: int32 [capacity, K] ring buffer of logical ids (None until the first record);
    tokens / forwards / passes: since the last planning round. ``record`` adds a forward's routing
    (one pass, two with ``training=True``: its backward repeats the exchange); ``count_pass`` adds an
    exchange over routing already recorded (the patched forward counts each backward when it runs
    and each gradient-checkpointing recompute, so a checkpointed step is one forward, three passes).
    """

    capacity: int = DEFAULT_CAPACITY
    ids_NK: torch.Tensor | None = None
    next: int = 0
    filled: int = 0
    tokens: int = 0
    forwards: int = 0
    passes: int = 0

    def record(self, topk_ids_TK: torch.Tensor, num_experts: int, training: bool) -> None:
        """Append one forward's logical top-k ids [T, K] (ids outside 0..E-1 are stored as -1)."""
        T, K = topk_ids_TK.shape
        if self.ids_NK is None or self.ids_NK.shape[1] != K or self.ids_NK.device != topk_ids_TK.device:
            self.ids_NK = torch.full((self.capacity, K), -1, dtype=torch.int32, device=topk_ids_TK.device)
            self.next = self.filled = 0
        ids = topk_ids_TK.detach()
        if T > self.capacity:  # an evenly strided sample keeps the window spread over the batch
            ids = ids[:: math.ceil(T / self.capacity)]
        n = ids.shape[0]
        clean = torch.where((ids >= 0) & (ids < num_experts), ids, -1).to(torch.int32)
        pos = (self.next + torch.arange(n, device=ids.device)) % self.capacity
        self.ids_NK.index_copy_(0, pos, clean)
        self.next = (self.next + n) % self.capacity
        self.filled = min(self.capacity, self.filled + n)
        self.tokens += T
        self.forwards += 1
        self.passes += 2 if training else 1

    def count_pass(self, _grad=None) -> None:
        """One more exchange of recorded routing (also usable as a tensor gradient hook: returns None)."""
        self.passes += 1

    def window(self) -> torch.Tensor:
        """int32 [filled, K]: the tokens held now (oldest first is not guaranteed)."""
        if self.ids_NK is None:
            return torch.zeros(0, 0, dtype=torch.int32)
        return self.ids_NK[: self.filled] if self.filled < self.capacity else self.ids_NK

    def end_interval(self) -> None:
        """Start a new interval: the window stays (it is still recent routing), the counters restart."""
        self.tokens = self.forwards = self.passes = 0

    def state_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "ids_NK": None if self.ids_NK is None else self.ids_NK.cpu(),
            "next": self.next,
            "filled": self.filled,
            "tokens": self.tokens,
            "forwards": self.forwards,
            "passes": self.passes,
        }

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        ids = state["ids_NK"]
        self.capacity = int(state["capacity"])
        self.ids_NK = None if ids is None else ids.to(device=device, dtype=torch.int32)
        for key in ("next", "filled", "tokens", "forwards", "passes"):
            setattr(self, key, int(state[key]))


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
