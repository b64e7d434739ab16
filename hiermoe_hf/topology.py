"""Topology (level sizes, rank digits) and the stages of every dispatch strategy.

A topology is a tuple of level sizes, outermost first: ``(N, G)`` is N nodes of G ranks. A rank's
digits are its coordinates in that mixed radix (rank = n*G + g). A stage varies a contiguous range
of digits ``[lo, hi)``: its group is the ranks that share every other digit, and a destination
rank is reached through the group member that has the destination's digits in ``[lo, hi)``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence


def parse_levels(spec: str | Sequence[int]) -> tuple[int, ...]:
    """``"2x4"`` or ``[2, 4]`` -> ``(2, 4)``; raises ValueError naming the bad spec."""
    if isinstance(spec, str):
        parts = spec.lower().replace(" ", "").split("x")
        if not all(p.isdigit() for p in parts):
            raise ValueError(f"topology {spec!r} is not of the form 'NxG' or 'AxBxC' (positive integers)")
        levels = tuple(int(p) for p in parts)
    elif isinstance(spec, (list, tuple)) and all(isinstance(s, int) and not isinstance(s, bool) for s in spec):
        levels = tuple(spec)
    else:
        raise ValueError(f"topology {spec!r} must be a string like '2x4' or a list of level sizes like [2, 4]")
    if not levels or any(s < 1 for s in levels):
        raise ValueError(f"topology {spec!r} needs at least one level and every size >= 1")
    return levels


def levels_from_launcher(world_size: int) -> tuple[int, ...]:
    """nodes x LOCAL_WORLD_SIZE from torchrun/accelerate's environment; one node if it is unset."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if local < 1 or world_size % local:
        raise ValueError(f"LOCAL_WORLD_SIZE={local} does not divide the world size {world_size}")
    return (world_size // local, local)


@dataclass(frozen=True)
class Stage:
    """One exchange of a strategy: varies digits [lo, hi); ``dedup`` sends a token once per member."""

    name: str
    lo: int
    hi: int
    dedup: bool


@dataclass(frozen=True)
class Topology:
    levels: tuple[int, ...]

    @classmethod
    def resolve(cls, spec: str | Sequence[int] | None, world_size: int) -> "Topology":
        levels = levels_from_launcher(world_size) if spec is None else parse_levels(spec)
        if math.prod(levels) != world_size:
            shape = "x".join(map(str, levels))
            raise ValueError(
                f"topology {shape} has {math.prod(levels)} ranks but the world size is {world_size}; "
                f"give level sizes whose product is {world_size} (e.g. '1x{world_size}')"
            )
        return cls(levels)

    @property
    def world_size(self) -> int:
        return math.prod(self.levels)

    @property
    def depth(self) -> int:
        return len(self.levels)

    def stride(self, lo: int) -> int:
        """Ranks spanned by one step of digit ``lo - 1`` (product of the sizes from ``lo`` on)."""
        return math.prod(self.levels[lo:])

    def digits(self, rank: int) -> tuple[int, ...]:
        out = []
        for size in reversed(self.levels):
            out.append(rank % size)
            rank //= size
        return tuple(reversed(out))

    def group_size(self, stage: Stage) -> int:
        return math.prod(self.levels[stage.lo : stage.hi])

    def member_of(self, dest_rank, stage: Stage):
        """Index, inside any group of ``stage``, of the member on the way to ``dest_rank``.

        Works elementwise on int tensors (-1 stays meaningless; mask it yourself).
        """
        return (dest_rank // self.stride(stage.hi)) % self.group_size(stage)

    def group_ranks(self, rank: int, stage: Stage) -> list[int]:
        """The ranks of ``rank``'s group in ``stage``, ordered by member index."""
        step = self.stride(stage.hi)
        base = rank - self.member_of(rank, stage) * step
        return [base + m * step for m in range(self.group_size(stage))]

    def all_groups(self, stage: Stage) -> list[list[int]]:
        """Every group of ``stage`` in a fixed order (all ranks must create them in this order)."""
        seen, groups = set(), []
        for r in range(self.world_size):
            g = self.group_ranks(r, stage)
            if g[0] not in seen:
                seen.add(g[0])
                groups.append(g)
        return groups

    def strategies(self) -> list[str]:
        """Strategy names this topology supports, baselines first."""
        names = ["a2a"] + (["2dh"] if self.depth >= 2 else [])
        return names + [f"hd{d}" for d in range(1, self.depth + 1)]

    def stages(self, strategy: str) -> tuple[Stage, ...]:
        """The stages of ``strategy`` (DESIGN.md section 5); raises ValueError for unknown ones."""
        valid = self.strategies()
        if strategy not in valid:
            raise ValueError(
                f"strategy {strategy!r} is not available on topology {'x'.join(map(str, self.levels))}; "
                f"valid: {', '.join(valid)}"
            )
        D = self.depth
        if strategy == "a2a":
            return (Stage(self.stage_name(0, D), 0, D, False),)
        if strategy == "2dh":
            return (Stage(self.stage_name(1, D), 1, D, False), Stage(self.stage_name(0, 1), 0, 1, False))
        depth = int(strategy[2:])
        stages = [Stage(self.stage_name(l, l + 1), l, l + 1, True) for l in range(depth - 1)]
        stages.append(Stage(self.stage_name(depth - 1, D), depth - 1, D, True))
        return tuple(stages)

    def distinct_stages(self) -> list[Stage]:
        """One Stage per distinct digit range over all strategies, in first-use order (process groups,
        calibration and cost-model constants are per digit range)."""
        seen, out = set(), []
        for strategy in self.strategies():
            for st in self.stages(strategy):
                if (st.lo, st.hi) not in seen:
                    seen.add((st.lo, st.hi))
                    out.append(st)
        return out

    def stage_name(self, lo: int, hi: int) -> str:
        if lo == 0 and hi == self.depth:
            return "flat"
        if lo == 0 and hi == 1:
            return "inter-node"
        if lo == 1 and hi == self.depth:
            return "intra-node"
        return f"level-{lo}" if hi == lo + 1 else f"levels-{lo}-{hi - 1}"

    def __str__(self) -> str:
        return "x".join(map(str, self.levels))
