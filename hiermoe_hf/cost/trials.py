"""``dispatch="auto"`` without a cost model: time the candidates on the model's own exchanges.

Default constants describe no real cluster, and a calibration of bare ``all_to_all_single`` calls
misses what a real exchange pays besides the link (packing, the CPU or GPU it shares with compute,
other traffic on the node). So with ``cost_model=None`` every MoE layer runs its first forwards
under each candidate in turn and the model keeps the fastest:

    a layer's forward f:  0    1    2    3    4    5    6 ...
    runs:                 hd1  hd2  hd1  hd2  hd1  hd2  the fastest, from then on (every layer)
                          \\ warm-up /  \\ round 1 / \\ round 2 /

A forward's time (dispatch + combine wall time, ``ForwardRecord.measured_ms``) rides in the count
exchange of the next MoE forward on the rank (the next layer's, or the first layer's of the next
pass): each rank adds its microseconds to one extra slot of the all-reduced vector, so every rank
reads the same sum over ranks with the same host read and makes the same choice, adding no
collective and no host read. One round of a candidate is a whole pass over the model's MoE layers,
its time the sum over those layers (the exchange time of one forward of the model, the quantity a
step waits for; one layer's few milliseconds are too noisy to decide alone). The warm-up round pays
each strategy's one-time costs (process-group connections, allocator growth) and is not counted; a
candidate's time is its fastest timed round (noise from other work only ever adds time). Since each
pass visits every layer before the next pass starts, the first layer of the pass after the last
timed round has every timing when it decides, for all layers. A gradient-checkpointing recompute
runs the strategy of the forward it recomputes and is neither scheduled nor timed.

Candidates are the de-duplicating strategies ``hd1 .. hdD``: ``a2a`` exchanges over the same single
stage as ``hd1`` and ``2dh`` over the same stages as ``hd2``, each without de-duplication, so they
never send fewer rows per peer and never run fewer collectives; timing them would only spend steps.

Shapes: C candidates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from hiermoe_hf.topology import Topology

TIMED_ROUNDS = 2  # rounds after the warm-up round; the fastest of them is kept


def trial_candidates(topology: Topology) -> tuple[str, ...]:
    """The strategies ``auto`` times: ``hd1 .. hdD`` (D = topology depth)."""
    return tuple(name for name in topology.strategies() if name.startswith("hd"))


@dataclass
class StrategyTrials:
    """One patched model's trials. Every rank holds an identical copy: it advances on the MoE forwards
    (which every rank runs, in the same order) and on sums every rank reads alike.

    candidates: strategies to time, ``trial_candidates``; world_size: ranks whose microseconds are
    summed (the expert-parallel group); forwards: layer name -> its forwards so far (recomputes
    excluded); current: layer name -> the strategy of its latest forward; pending: (the
    round the previous MoE forward timed, or None, and its ``runtime.state.Elapsed``), reported at
    the next count exchange; timed_us: (candidate, round) -> microseconds summed over layers and
    ranks; chosen: the winner once every round is in.
    """

    candidates: tuple[str, ...]
    world_size: int
    forwards: dict[str, int] = field(default_factory=dict)
    current: dict[str, str] = field(default_factory=dict)
    pending: tuple | None = None
    timed_us: dict[tuple[str, int], int] = field(default_factory=dict)
    chosen: str | None = None

    @property
    def trial_forwards(self) -> int:
        """Forwards of each layer that run under trial (warm-up and timed rounds)."""
        return len(self.candidates) * (1 + TIMED_ROUNDS)

    def layer(self, name: str, recompute: bool = False) -> "LayerTrial":
        """The choice protocol of ``exchange.layer_counts.exchange_chunk_counts`` for one layer's forward."""
        return LayerTrial(self, name, recompute)

    def extra(self, device: torch.device) -> torch.Tensor:
        """int64 [1] (this rank's microseconds of the previous MoE forward; 0 when it timed nothing)
        while choosing; int64 [0] once chosen."""
        if self.chosen is not None:
            return torch.zeros(0, dtype=torch.int64, device=device)
        timed = self.pending is not None and self.pending[0] is not None and self.pending[1] is not None
        us = round(1e3 * self.pending[1].ms()) if timed else 0  # None: that forward raised before its end
        return torch.tensor([us], dtype=torch.int64, device=device)

    def pick(self, layer: str, summed_us: list[int], recompute: bool = False) -> str:
        """The strategy of ``layer``'s forward, given the count exchange's sum of ``extra``; advances.

        A gradient-checkpointing recompute (``recompute``) runs the strategy of the layer's forward it
        recomputes and is neither scheduled nor timed (torch may stop it early, and its exchange
        belongs to the step of that forward)."""
        if self.pending is not None and self.pending[0] is not None:
            key = self.pending[0]
            self.timed_us[key] = self.timed_us.get(key, 0) + summed_us[0]
        self.pending = None
        if recompute:
            return self.chosen or self.current.get(layer, self.candidates[0])
        f = self.forwards.get(layer, 0)
        self.forwards[layer] = f + 1
        if self.chosen is None and f < self.trial_forwards:
            name, rnd = self.candidates[f % len(self.candidates)], f // len(self.candidates)
            self.pending = ((name, rnd) if rnd >= 1 else None, None)
            self.current[layer] = name
            return name
        if self.chosen is None:
            best = self.measured_ms()
            self.chosen = min(self.candidates, key=lambda n: (best.get(n, float("inf")), self.candidates.index(n)))
        return self.chosen

    def ran(self, elapsed) -> None:
        """This forward's timing, for the next count exchange (only while choosing)."""
        if self.pending is not None:
            self.pending = (self.pending[0], elapsed)

    def measured_ms(self) -> dict[str, float]:
        """candidate -> its fastest timed round so far: ms of one pass over the MoE layers, mean over ranks."""
        out: dict[str, float] = {}
        for (name, _), us in self.timed_us.items():
            out[name] = min(out.get(name, float("inf")), us / self.world_size / 1e3)
        return out

    def state_text(self) -> str:
        """This object's state as JSON text, for the resume files (``checkpoint/rank_state.py``): a resume
        keeps the strategy chosen (or the trials so far) instead of timing again and maybe choosing another."""
        pending = None
        if self.pending is not None:
            key, elapsed = self.pending
            pending = [list(key) if key is not None else None, None if elapsed is None else elapsed.ms()]
        return json.dumps({
            "candidates": list(self.candidates), "forwards": self.forwards, "current": self.current,
            "timed_us": [[n, r, us] for (n, r), us in self.timed_us.items()], "chosen": self.chosen,
            "pending": pending,
        })

    def load_state_text(self, text: str) -> None:
        """Restore what ``state_text`` wrote (the same candidates, else ValueError)."""
        saved = json.loads(text)
        if tuple(saved["candidates"]) != self.candidates:
            raise ValueError(f"the checkpoint timed {saved['candidates']}, but this run's candidates are {self.candidates}")
        self.forwards = dict(saved["forwards"])
        self.current = dict(saved["current"])
        self.timed_us = {(n, r): us for n, r, us in saved["timed_us"]}
        self.chosen = saved["chosen"]
        key, ms = saved["pending"] if saved["pending"] is not None else (None, None)
        self.pending = None if saved["pending"] is None else (
            tuple(key) if key is not None else None, None if ms is None else MeasuredMs(ms)
        )

    def source(self) -> str:
        """Where the choice comes from, for ``stats``' ``cost_model``."""
        if len(self.candidates) == 1:
            return f"measured: nothing to time, {self.chosen} is the one de-duplicating strategy on one level"
        what = f"measured: each of {', '.join(self.candidates)} timed on the model's MoE exchanges"
        rounds = f"{TIMED_ROUNDS} rounds after a warm-up round, fastest kept"
        if self.chosen is None:
            return f"{what} ({rounds}; in progress)"
        return f"{what} ({rounds}): {self.chosen}"


@dataclass(frozen=True)
class MeasuredMs:
    """A restored forward's time, read like ``runtime.state.Elapsed`` (``ms()``)."""

    value: float

    def ms(self) -> float:
        return self.value


@dataclass(frozen=True)
class LayerTrial:
    """``StrategyTrials`` as one layer's choice (``exchange_chunk_counts``' protocol)."""

    trials: StrategyTrials
    name: str
    recompute: bool = False

    @property
    def counting(self) -> tuple[str, ...]:
        """Every candidate's split sizes until the choice is made (the exchange that brings the last
        timing makes it), then the chosen one's."""
        return (self.trials.chosen,) if self.trials.chosen is not None else self.trials.candidates

    def extra(self, device: torch.device) -> torch.Tensor:
        return self.trials.extra(device)

    def head(self, topology: Topology, global_CN: torch.Tensor, row_bytes: int):
        return None, None  # chosen on the host, from the timings the count exchange brings

    def pick(self, head: int | None, summed_us: list[int]) -> str:
        return self.trials.pick(self.name, summed_us, self.recompute)
