"""``dispatch="auto"`` without a cost model: measure the candidates on the layer's own traffic.

Default constants describe no real cluster, and a calibration of bare ``all_to_all_single`` calls
misses what a real exchange pays besides the link (packing, the CPU or GPU it shares with compute,
other traffic on the node). So with ``cost_model=None`` each MoE layer times its own forward
exchange under each candidate for its first forwards and keeps the fastest:

    forward f:   0    1    2    3    4    5    6 ...
    runs:        hd1  hd2  hd1  hd2  hd1  hd2  fastest of the timed rounds, from then on
                 \\ warm-up /  \\ round 1 / \\ round 2 /

A forward's time (dispatch + combine wall time, ``ForwardRecord.measured_ms``) rides in the next
forward's count exchange: each rank adds its microseconds to one extra slot of the all-reduced
vector, so every rank reads the same sum over ranks with the same host read and makes the same
choice, adding no collective and no host read. The warm-up round pays each strategy's one-time
costs (process-group connections, allocator growth) and is not counted; a candidate's time is the
smallest rank-mean over the timed rounds (noise from other work only ever adds time).

Candidates are the de-duplicating strategies ``hd1 .. hdD``: ``a2a`` exchanges over the same single
stage as ``hd1`` and ``2dh`` over the same stages as ``hd2``, each without de-duplication, so they
never send fewer rows per peer and never run fewer collectives; timing them would only spend steps.

Shapes: C candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hiermoe_hf.topology import Topology

TIMED_ROUNDS = 2  # rounds after the warm-up round; the smallest of them is kept


def trial_candidates(topology: Topology) -> tuple[str, ...]:
    """The strategies ``auto`` times: ``hd1 .. hdD`` (D = topology depth)."""
    return tuple(name for name in topology.strategies() if name.startswith("hd"))


@dataclass
class StrategyTrials:
    """One MoE layer's trials. Every rank holds an identical copy: it advances on the layer's forwards
    (which every rank runs, in the same order) and on sums every rank reads alike.

    candidates: strategies to time, ``trial_candidates``; world_size: ranks whose microseconds are
    summed (the expert-parallel group); forwards: forwards of this layer so far; pending_ms: this
    rank's time of the previous forward, reported at the next count exchange; timed_us: candidate ->
    summed microseconds of each timed round; chosen: the winner once every round is in.
    """

    candidates: tuple[str, ...]
    world_size: int
    forwards: int = 0
    pending_ms: object = None  # runtime.state.Elapsed of the previous forward (resolved lazily)
    timed_us: dict[str, list[int]] = field(default_factory=dict)
    chosen: str | None = None

    @property
    def trial_forwards(self) -> int:
        return len(self.candidates) * (1 + TIMED_ROUNDS)

    @property
    def counting(self) -> tuple[str, ...]:
        """Strategies whose split sizes the next count exchange carries: every candidate until the
        choice is made (it is made after the exchange that brings the last timing), then the one."""
        return (self.chosen,) if self.chosen is not None else self.candidates

    def extra(self, device: torch.device) -> torch.Tensor:
        """int64 [1] (this rank's microseconds of the previous forward, 0 at the first) while
        choosing; int64 [0] once chosen."""
        if self.chosen is not None:
            return torch.zeros(0, dtype=torch.int64, device=device)
        us = 0 if self.pending_ms is None else round(1e3 * self.pending_ms.ms())
        return torch.tensor([us], dtype=torch.int64, device=device)

    def head(self, topology: Topology, global_CN: torch.Tensor, row_bytes: int):
        return None, None  # the choice is made on the host, from the timings the count exchange brings

    def pick(self, head: int | None, summed_us: list[int]) -> str:
        """The strategy of this forward, given the count exchange's sum of ``extra``; advances."""
        f = self.forwards
        self.forwards += 1
        if self.chosen is not None:
            return self.chosen
        prev = f - 1
        if prev >= len(self.candidates):  # a timed round's forward (the warm-up round is not counted)
            self.timed_us.setdefault(self.candidates[prev % len(self.candidates)], []).append(summed_us[0])
        if f < self.trial_forwards:
            return self.candidates[f % len(self.candidates)]
        best = {name: min(self.timed_us[name]) for name in self.candidates}
        self.chosen = min(self.candidates, key=lambda name: (best[name], self.candidates.index(name)))
        return self.chosen

    def ran(self, elapsed) -> None:
        """Keep this forward's timing for the next count exchange (only while choosing)."""
        self.pending_ms = elapsed if self.chosen is None else None

    def measured_ms(self) -> dict[str, float]:
        """candidate -> its kept time (ms, mean over ranks) so far; empty before a timed round."""
        return {name: min(us) / self.world_size / 1e3 for name, us in self.timed_us.items()}

    def source(self) -> str:
        """Where the choice comes from, for ``stats``' ``cost_model``."""
        if len(self.candidates) == 1:
            return f"measured: nothing to time, {self.chosen} is the one de-duplicating strategy on one level"
        what = f"measured: each of {', '.join(self.candidates)} timed on this layer's exchange"
        rounds = f"{TIMED_ROUNDS} rounds after a warm-up round, fastest kept"
        if self.chosen is None:
            return f"{what} ({rounds}; trial forward {self.forwards} of {self.trial_forwards})"
        return f"{what} ({rounds}): {self.chosen}"
