"""What the patched forward records of its routing for the expert swap: a bounded ring buffer per MoE
layer (``RoutingStats``). ``swap/window.py`` gathers these buffers to plan a swap.

Each rank keeps, per MoE layer, its last ``capacity`` tokens' logical top-k ids on the routing's
device (int32 [capacity, K]; -1 = empty or an invalid/sentinel id), plus counters of the interval
since the last planning round. Recording is one ``index_copy_`` per forward, without a host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_CAPACITY = 4096  # tokens per rank per layer; the window bounds memory and planning time


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
