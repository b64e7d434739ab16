"""User-facing configuration: `HierMoEConfig` (DESIGN.md section 2)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Sequence

KERNELS = ("auto", "triton", "torch")
SWAP_POLICIES = ("hierd", "load")
_DISPATCH_RE = re.compile(r"^(auto|a2a|2dh|hd[1-9][0-9]*)$")


@dataclass
class HierMoEConfig:
    """How `hiermoe_hf.patch` shards experts and exchanges tokens.

    Args:
        topology: level sizes outermost first (``[2, 4]``), a string ``"2x4"``, or None for
            nodes x LOCAL_WORLD_SIZE from the launcher.
        dispatch: "auto", "a2a", "2dh" or "hdD" (D = 1 .. number of levels).
        kernels: "auto" (Triton on CUDA tensors when it imports), "triton" or "torch".
        swap_interval: optimizer steps between expert swaps; 0 = never.
        swap_policy: "hierd" (dedup-aware) or "load" (balance raw token counts).
        cost_model: path of a calibration JSON, a preset ("default", "hiermoe-paper"), "calibrate"
            (a short calibration of the links when the model is patched), or None: ``auto`` then
            times its candidates on each layer's first forwards and keeps the fastest
            (``cost/trials.py``); the planner and the swap objective use the default constants.
        swap_pairs: expert pairs exchanged per planning round.
        ep_size: ranks per expert-parallel group; None = the world. The world splits into
            W / ep_size replicas of the group (expert data parallelism); the topology then describes
            one group, and groups are blocks of consecutive ranks (inside a node when they fit).
        overlap_chunks: split each MoE layer's tokens into this many chunks and pipeline them, so
            one chunk's exchange is in flight while another's experts run (and DeepSeek-V3's shared
            experts run while the routed tokens travel); 1 = no overlap.
        collective_timeout_s: seconds a rank waits in the package's own collectives (the layer's
            count exchange, the collective save, the resume checks) for the other ranks before it
            raises an error naming the likely cause (a forward or save called on some ranks only);
            None = ``HIERMOE_COLLECTIVE_TIMEOUT``, else 600 (``exchange/bounded.py``).
    """

    topology: str | Sequence[int] | None = None
    dispatch: str = "auto"
    kernels: str = "auto"
    swap_interval: int = 0
    swap_policy: str = "hierd"
    cost_model: str | None = None
    swap_pairs: int = 1
    overlap_chunks: int = 1
    ep_size: int | None = None
    collective_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dispatch, str) or not _DISPATCH_RE.match(self.dispatch):
            raise ValueError(
                f"unknown dispatch strategy {self.dispatch!r}; valid: 'auto', 'a2a', '2dh', 'hd1' .. 'hdD' "
                "(D up to the number of topology levels)"
            )
        if self.kernels not in KERNELS:
            raise ValueError(f"unknown kernels {self.kernels!r}; valid: {', '.join(KERNELS)}")
        if self.swap_policy not in SWAP_POLICIES:
            raise ValueError(f"unknown swap_policy {self.swap_policy!r}; valid: {', '.join(SWAP_POLICIES)}")
        if isinstance(self.swap_interval, bool) or not isinstance(self.swap_interval, int) or self.swap_interval < 0:
            raise ValueError(f"swap_interval must be an integer >= 0 (0 = never), got {self.swap_interval!r}")
        if isinstance(self.swap_pairs, bool) or not isinstance(self.swap_pairs, int) or self.swap_pairs < 1:
            raise ValueError(f"swap_pairs must be an integer >= 1, got {self.swap_pairs!r}")
        if self.ep_size is not None and (
            isinstance(self.ep_size, bool) or not isinstance(self.ep_size, int) or self.ep_size < 1
        ):
            raise ValueError(f"ep_size must be an integer >= 1 or None (= the world size), got {self.ep_size!r}")
        if (
            isinstance(self.overlap_chunks, bool)
            or not isinstance(self.overlap_chunks, int)
            or not 1 <= self.overlap_chunks <= 64
        ):
            raise ValueError(
                f"overlap_chunks must be an integer from 1 (no overlap) to 64, got {self.overlap_chunks!r}"
            )
        if self.collective_timeout_s is not None:
            from hiermoe_hf.exchange.bounded import parse_timeout

            parse_timeout("collective_timeout_s", self.collective_timeout_s)
        if self.cost_model is not None and not isinstance(self.cost_model, (str, os.PathLike)):
            raise ValueError(f"cost_model must be a path to a calibration JSON or None, got {self.cost_model!r}")
        if self.topology is not None:
            from hiermoe_hf.topology import parse_levels

            parse_levels(self.topology)  # raises on a malformed spec
