"""Timed choices without a cost model: time the candidates on the model's own exchanges.

Default constants describe no real cluster, and a calibration of bare ``all_to_all_single`` calls
misses what a real exchange pays besides the link (packing, the CPU or GPU it shares with compute,
other traffic on the node). So ``dispatch="auto"`` with ``cost_model=None`` and
``overlap_chunks="auto"`` (the defaults) run every MoE layer's first forwards under each candidate
(strategy, chunk count) in turn and keep the fastest, in one schedule of two phases:

    a layer's forward f:  0    1    2    3    4    5    6    7 ...
    strategy phase:       hd1  hd2  hd1  hd2  hd1  hd2                (x1: unchunked)
    chunk phase:                                        x4            (the strategy kept)
    then:                                                    the fastest (every layer)
                          \\ warm-up /  \\ round 1 / \\ round 2 /  r1

The strategy phase times the de-duplicating strategies unchunked; the first layer of the pass after
it (f = 6) keeps the fastest. The chunk phase then times that strategy in ``OVERLAP_CHUNKS``
chunks for ``CHUNK_ROUNDS`` pass(es), and the first layer of the pass after it (f = 7) keeps 1 or
``OVERLAP_CHUNKS``, whichever was faster (the unchunked time is the strategy phase's). A phase with
one candidate is skipped: a fixed ``dispatch`` or a cost model (which prices the strategy on every
forward) leaves the chunk phase alone, timing 1 and ``OVERLAP_CHUNKS`` alternately with a warm-up
round (f = 0 .. 5); an explicit ``overlap_chunks`` leaves the strategy phase alone (timed in that
many chunks).

A forward's time is the layer's whole exchange and experts (dispatch to combine, with the side work
of a block that has some: the one span a pipelined layer has) and rides in the count exchange of
the next MoE forward on the rank (the next layer's, or the first layer's of the next pass): each
rank adds its microseconds to one extra slot of the all-reduced vector, so every rank reads the
same sum over ranks with the same host read and makes the same choice, adding no collective and no
host read. One round of a candidate is a whole pass over the model's MoE layers, its time the sum
over those layers (the exchange time of one forward of the model, the quantity a step waits for;
one layer's few milliseconds are too noisy to decide alone). The warm-up round pays each
candidate's one-time costs (process-group connections, allocator growth) and is not counted; a
candidate's time is its fastest timed round (noise from other work only ever adds time). Since each
pass visits every layer before the next pass starts, the first layer of the pass after a phase has
every timing when it decides, for all layers.

The chunk count of a forward must be known before its count exchange (the tokens are counted per
chunk); the one forward that does not know it, the chunk decision (f = 7 above), counts in
``OVERLAP_CHUNKS`` chunks, and if 1 wins it runs unchunked on their sums (counts add up over tokens:
``layer_counts.merged``). A gradient-checkpointing recompute runs the strategy and chunk count of
the forward it recomputes and is neither scheduled nor timed.

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
# After a strategy phase the chunk phase times its one larger count for this many rounds, with no
# warm-up round: the process groups, buffers and kernels it runs are the ones the strategy phase
# warmed. Each of its forwards costs what a step in 4 chunks costs, which on a small model is up to
# twice a step (docs/auto_benchmark.md, 2026-12-03: 3 such steps took 0.88x the throughput of a
# 30-step fine-tune); the kept unchunked time is the fastest of two rounds, so one round errs
# towards 1 chunk, the default before issue 18.
CHUNK_ROUNDS = 1
# The chunk count the chunk phase times against 1: on the wide layer of docs/step_benchmark.md 4
# beat 8 (and 2 gains less), at 200 Mbit/s and 1 Gbit/s; each chunk pays every stage's latency again.
OVERLAP_CHUNKS = 4


def trial_candidates(topology: Topology) -> tuple[str, ...]:
    """The strategies ``auto`` times: ``hd1 .. hdD`` (D = topology depth)."""
    return tuple(name for name in topology.strategies() if name.startswith("hd"))


def chunk_candidates(overlap_chunks: int | str) -> tuple[int, ...]:
    """The chunk counts timed: ``(1, OVERLAP_CHUNKS)`` for ``"auto"``, else the one given. Two
    options, one of them 1: the deciding forward counts in the larger and, when 1 wins, runs on the
    sums; any other pair would need counts its chunks do not refine."""
    return (1, OVERLAP_CHUNKS) if overlap_chunks == "auto" else (overlap_chunks,)


@dataclass
class StrategyTrials:
    """One patched model's trials. Every rank holds an identical copy: it advances on the MoE forwards
    (which every rank runs, in the same order) and on sums every rank reads alike.

    candidates: strategies to time, ``trial_candidates`` (one: the strategy is given: ``chosen``;
    none: a cost model prices it on every forward); world_size: ranks whose microseconds are summed
    (the expert-parallel group); chunk_options: chunk counts to time, ``chunk_candidates`` (one:
    given); forwards: layer name -> its forwards so far (recomputes excluded); current: layer name
    -> (strategy or None when priced, chunks) of its latest forward; pending: (the
    ((strategy, chunks), round) the previous MoE forward timed, or None, and its
    ``runtime.state.Elapsed``), reported at the next count exchange; timed_us: ((strategy, chunks),
    round) -> microseconds summed over layers and ranks; chosen / chosen_chunks: the winners once
    their phase is in.
    """

    candidates: tuple[str, ...]
    world_size: int
    chunk_options: tuple[int, ...] = (1,)
    forwards: dict[str, int] = field(default_factory=dict)
    current: dict[str, tuple] = field(default_factory=dict)
    pending: tuple | None = None
    timed_us: dict[tuple, int] = field(default_factory=dict)
    chosen: str | None = None
    chosen_chunks: int | None = None

    def __post_init__(self) -> None:
        if len(self.candidates) == 1:
            self.chosen = self.candidates[0]
        if len(self.chunk_options) == 1:
            self.chosen_chunks = self.chunk_options[0]

    # ---- the schedule (host ints only; identical on every rank) -------------------------------------

    @property
    def strategy_forwards(self) -> int:
        """Forwards of each layer in the strategy phase (0 when there is one strategy or none)."""
        return len(self.candidates) * (1 + TIMED_ROUNDS) if len(self.candidates) > 1 else 0

    @property
    def chunk_trial(self) -> tuple[int, ...]:
        """The chunk counts the chunk phase runs (the first is timed by the strategy phase, if any)."""
        if len(self.chunk_options) == 1:
            return ()
        return self.chunk_options[1:] if self.strategy_forwards else self.chunk_options

    @property
    def chunk_rounds(self) -> int:
        """Forwards of each chunk count the chunk phase runs: ``CHUNK_ROUNDS`` timed ones after a
        strategy phase, else a warm-up and ``TIMED_ROUNDS`` (1 and the larger count alternating)."""
        return CHUNK_ROUNDS if self.strategy_forwards else 1 + TIMED_ROUNDS

    @property
    def trial_forwards(self) -> int:
        """Forwards of each layer that run under trial (both phases, warm-up and timed rounds)."""
        return self.strategy_forwards + len(self.chunk_trial) * self.chunk_rounds

    @property
    def deciding(self) -> bool:
        """True until both phases are in (while forwards report their timing)."""
        return self.chosen is None and len(self.candidates) > 1 or self.chosen_chunks is None

    def _slot(self, f: int) -> tuple[tuple, int]:
        """((strategy or None, chunks), round) of a layer's forward ``f`` < ``trial_forwards``; the
        strategy of the chunk phase is the one kept (None: priced on the forward)."""
        S = self.strategy_forwards
        if f < S:
            n = len(self.candidates)
            return (self.candidates[f % n], self.chunk_options[0]), f // n
        m = len(self.chunk_trial)
        warmed = 1 if S else 0  # after a strategy phase every chunk-phase round is timed
        return (self.chosen, self.chunk_trial[(f - S) % m]), (f - S) // m + warmed

    def chunks(self, layer: str, recompute: bool = False) -> int:
        """The chunks ``layer``'s next forward counts its tokens in (before its count exchange; does not
        advance): its slot's, the kept one, or ``max(chunk_options)`` at the chunk decision (1, if
        it wins, runs on their sums)."""
        if recompute:
            return self.current.get(layer, (None, self.chosen_chunks or self.chunk_options[0]))[1]
        f = self.forwards.get(layer, 0)
        if self.chosen_chunks is not None:
            return self.chosen_chunks
        if f < self.trial_forwards:
            return self._slot(f)[0][1]
        return max(self.chunk_options)

    def chunks_run(self, layer: str) -> int:
        """The chunks ``layer``'s latest forward runs (after ``pick``)."""
        return self.current[layer][1]

    def layer(self, name: str, recompute: bool = False, base=None) -> "LayerTrial":
        """The choice protocol of ``exchange.layer_counts.exchange_chunk_counts`` for one layer's
        forward; ``base``: the strategy's choice when not timed here (``Fixed``/``Priced``)."""
        return LayerTrial(self, name, recompute, base)

    def extra(self, device: torch.device) -> torch.Tensor:
        """int64 [1] (this rank's microseconds of the previous MoE forward; 0 when it timed nothing)
        while choosing; int64 [0] once chosen."""
        if not self.deciding:
            return torch.zeros(0, dtype=torch.int64, device=device)
        timed = self.pending is not None and self.pending[0] is not None and self.pending[1] is not None
        if timed:  # device-side (no event wait, no host->device copy): runtime.state.Elapsed
            return self.pending[1].microseconds(device)
        return torch.zeros(1, dtype=torch.int64, device=device)  # None: that forward raised before its end

    def pick(self, layer: str, summed_us: list[int], recompute: bool = False) -> str | None:
        """The strategy of ``layer``'s forward (None: a cost model prices it), given the count
        exchange's sum of ``extra``; advances, and sets the forward's chunks (``chunks_run``).

        A gradient-checkpointing recompute (``recompute``) runs the strategy and chunks of the
        layer's forward it recomputes and is neither scheduled nor timed (torch may stop it early,
        and its exchange belongs to the step of that forward)."""
        if self.pending is not None and self.pending[0] is not None:
            key = self.pending[0]
            self.timed_us[key] = self.timed_us.get(key, 0) + summed_us[0]
        self.pending = None
        if recompute:
            fallback = (self.chosen or (self.candidates or (None,))[0], self.chunks(layer, recompute=True))
            self.current.setdefault(layer, fallback)
            return self.current[layer][0]
        f = self.forwards.get(layer, 0)
        self.forwards[layer] = f + 1
        if self.chosen is None and self.candidates and f >= self.strategy_forwards:
            self.chosen = self._fastest([(name, self.chunk_options[0]) for name in self.candidates])[0]
        if self.chosen_chunks is None and f >= self.trial_forwards:
            self.chosen_chunks = self._fastest([(self.chosen, c) for c in self.chunk_options])[1]
        if f < self.trial_forwards:
            pair, rnd = self._slot(f)
            self.pending = (((pair, rnd) if rnd >= 1 else None), None)
        else:
            pair = (self.chosen, self.chosen_chunks)
        self.current[layer] = pair
        return pair[0]

    def _fastest(self, pairs: list[tuple]) -> tuple:
        """The pair with the least kept time (ties and untimed pairs: the earlier)."""
        best = self._kept_ms()
        return min(pairs, key=lambda p: (best.get(p, float("inf")), pairs.index(p)))

    def ran(self, elapsed) -> None:
        """This forward's timing, for the next count exchange (only while choosing)."""
        if self.pending is not None:
            self.pending = (self.pending[0], elapsed)

    def _kept_ms(self) -> dict[tuple, float]:
        """(strategy, chunks) -> its fastest timed round so far: ms of one pass over the MoE layers,
        mean over ranks."""
        out: dict[tuple, float] = {}
        for (pair, _), us in self.timed_us.items():
            out[pair] = min(out.get(pair, float("inf")), us / self.world_size / 1e3)
        return out

    def measured_ms(self) -> dict[str, float]:
        """Strategy -> its kept time in the strategy phase (``stats``' ``measured_ms_by_strategy``;
        empty when that phase is skipped)."""
        if not self.strategy_forwards:
            return {}
        c0 = self.chunk_options[0]
        return {s: ms for (s, c), ms in self._kept_ms().items() if c == c0}

    def measured_ms_by_chunks(self) -> dict[int, float]:
        """Chunk count -> the kept strategy's (or the priced one's) time in that many chunks
        (``stats``' ``measured_ms_by_chunks``); the unchunked time is the strategy phase's."""
        strategy = self.chosen if self.candidates else None
        return {c: ms for (s, c), ms in sorted(self._kept_ms().items(), key=lambda kv: kv[0][1]) if s == strategy}

    def state_text(self) -> str:
        """This object's state as JSON text, for the resume files (``checkpoint/rank_state.py``): a resume
        keeps the strategy and chunk count chosen (or the trials so far) instead of timing again and
        maybe choosing others."""
        pending = None
        if self.pending is not None:
            key, elapsed = self.pending
            pending = [[*key[0], key[1]] if key is not None else None, None if elapsed is None else elapsed.ms()]
        return json.dumps({
            "candidates": list(self.candidates), "chunk_options": list(self.chunk_options),
            "forwards": self.forwards, "current": {k: list(v) for k, v in self.current.items()},
            "timed_us": [[n, c, r, us] for ((n, c), r), us in self.timed_us.items()], "chosen": self.chosen,
            "chosen_chunks": self.chosen_chunks, "pending": pending,
        })

    def load_state_text(self, text: str) -> None:
        """Restore what ``state_text`` wrote (the same candidates and chunk options, else ValueError)."""
        saved = json.loads(text)
        if tuple(saved["candidates"]) != self.candidates:
            raise ValueError(
                f"the checkpoint timed {saved['candidates']}, but this run's candidates are {self.candidates}"
            )
        if tuple(saved.get("chunk_options", [1])) != self.chunk_options:
            raise ValueError(
                f"the checkpoint timed overlap_chunks {saved.get('chunk_options', [1])}, but this run's are "
                f"{list(self.chunk_options)}: resume with the same overlap_chunks setting"
            )
        # files written before issue 18 timed strategies only, unchunked: (strategy, round) keys
        self.forwards = dict(saved["forwards"])
        self.current = {k: tuple(v) if isinstance(v, list) else (v, 1) for k, v in saved["current"].items()}
        rows = [row if len(row) == 4 else [row[0], 1, *row[1:]] for row in saved["timed_us"]]
        self.timed_us = {((n, c), r): us for n, c, r, us in rows}
        self.chosen = saved["chosen"]
        self.chosen_chunks = saved.get("chosen_chunks", self.chunk_options[0])
        key, ms = saved["pending"] if saved["pending"] is not None else (None, None)
        key = key if key is None or len(key) == 3 else [key[0], 1, key[1]]
        self.pending = None if saved["pending"] is None else (
            ((key[0], key[1]), key[2]) if key is not None else None, None if ms is None else MeasuredMs(ms)
        )


    def source(self) -> str:
        """Where the strategy choice comes from, for ``stats``' ``cost_model``."""
        if len(self.candidates) == 1:
            return f"measured: nothing to time, {self.chosen} is the one de-duplicating strategy on one level"
        what = f"measured: each of {', '.join(self.candidates)} timed on the model's MoE exchanges"
        rounds = f"{TIMED_ROUNDS} rounds after a warm-up round, fastest kept"
        if self.chosen is None:
            return f"{what} ({rounds}; in progress)"
        return f"{what} ({rounds}): {self.chosen}"


@dataclass(frozen=True)
class MeasuredMs:
    """A restored forward's time, read like ``runtime.state.Elapsed`` (``ms()``, ``microseconds()``)."""

    value: float

    def ms(self) -> float:
        return self.value

    def microseconds(self, device: torch.device) -> torch.Tensor:
        """int64 [1] on ``device`` (built there: no host-to-device copy)."""
        return torch.full((1,), round(1e3 * self.value), dtype=torch.int64, device=device)


@dataclass(frozen=True)
class LayerTrial:
    """``StrategyTrials`` as one layer's choice (``exchange_chunk_counts``' protocol). ``base``
    chooses the strategy when the trials do not time it (a fixed ``dispatch``: ``Fixed``; a cost
    model: ``Priced``), else None."""

    trials: StrategyTrials
    name: str
    recompute: bool = False
    base: object = None

    @property
    def counting(self) -> tuple[str, ...]:
        """Every timed candidate's split sizes until the strategy is chosen (the exchange that brings
        the last timing makes it), then the chosen one's; ``base``'s when it chooses."""
        if self.base is not None:
            return self.base.counting
        return (self.trials.chosen,) if self.trials.chosen is not None else self.trials.candidates

    def extra(self, device: torch.device) -> torch.Tensor:
        return self.trials.extra(device)

    def pick(self, summed_us: list[int], counted) -> tuple[str, torch.Tensor | None]:
        """The trials advance on every forward; ``base`` names the strategy when it chooses."""
        name = self.trials.pick(self.name, summed_us, self.recompute)
        return (name, None) if self.base is None else self.base.pick(summed_us, counted)
