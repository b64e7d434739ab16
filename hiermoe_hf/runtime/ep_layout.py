"""Expert-parallel groups inside the world (``HierMoEConfig.ep_size``, issue 11).

The world of W ranks splits into ``W / ep_size`` replicas of one expert-parallel group of ``ep_size``
ranks. Every token exchange runs inside the rank's group, and the topology describes one group's
levels. Groups are blocks of consecutive global ranks: launchers number ranks node by node
(rank = node * LOCAL_WORLD_SIZE + local rank), so a group of at most one node's ranks stays inside a
node and a larger one spans whole nodes. Replica ``j`` of group rank ``g`` is global rank
``j * ep_size + g``; the ranks that share a group rank hold the same experts and average their
gradients (the "replica group").

Two kinds of rank, never mixed: the *group rank* (0 .. ep_size-1; placements, the topology's digits
and ``Runtime.rank``) and the *global rank* (0 .. W-1; the default process group,
``registry.world()``, ``Runtime.global_rank``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

from hiermoe_hf.topology import Topology, parse_levels


@dataclass(frozen=True)
class EPLayout:
    """Where one rank sits: ``world_size`` ranks as ``replicas`` groups of ``ep_size``."""

    world_size: int
    ep_size: int
    global_rank: int

    @classmethod
    def resolve(cls, ep_size: int | None, world_size: int, global_rank: int, num_experts: int | None = None):
        """Validate ``ep_size`` (None = the world) against the world and the experts per layer."""
        ep = world_size if ep_size is None else ep_size
        valid = [d for d in range(1, world_size + 1) if world_size % d == 0 and (num_experts or d) % d == 0]
        if world_size % ep:
            raise ValueError(
                f"ep_size={ep} does not divide the world size {world_size}; valid ep_size: "
                f"{', '.join(map(str, valid))} (or None = the world)"
            )
        if num_experts is not None and num_experts % ep:
            raise ValueError(
                f"{num_experts} experts per layer cannot be split over an expert-parallel group of ep_size={ep} "
                f"ranks; valid ep_size for {num_experts} experts on {world_size} ranks: {', '.join(map(str, valid))}"
            )
        return cls(world_size, ep, global_rank)

    @property
    def replicas(self) -> int:
        return self.world_size // self.ep_size

    @property
    def replica(self) -> int:
        """Which group this rank is in (0 .. replicas-1)."""
        return self.global_rank // self.ep_size

    @property
    def rank(self) -> int:
        """This rank's rank inside its group (0 .. ep_size-1)."""
        return self.global_rank % self.ep_size

    def to_global(self, group_rank: int, replica: int | None = None) -> int:
        """Global rank of ``group_rank`` in replica ``replica`` (default: this rank's)."""
        return (self.replica if replica is None else replica) * self.ep_size + group_rank

    def group_ranks(self, replica: int) -> list[int]:
        """Global ranks of group ``replica``, in group-rank order."""
        return [replica * self.ep_size + g for g in range(self.ep_size)]

    def replica_ranks(self, group_rank: int) -> list[int]:
        """Global ranks holding the same experts as group rank ``group_rank`` (one per replica)."""
        return [j * self.ep_size + group_rank for j in range(self.replicas)]


def group_topology(spec: str | Sequence[int] | None, layout: EPLayout) -> Topology:
    """The topology of one expert-parallel group: ``spec`` (its product must be ep_size), or, for
    None, the launcher's nodes cut to the group (LOCAL_WORLD_SIZE ranks per node; unset = one node).
    """
    ep = layout.ep_size
    if spec is not None:
        levels = parse_levels(spec)
        if math.prod(levels) != ep:
            shape = "x".join(map(str, levels))
            if layout.ep_size == layout.world_size:
                return Topology.resolve(levels, layout.world_size)  # raises: the world-size message
            raise ValueError(
                f"topology {shape} has {math.prod(levels)} ranks but one expert-parallel group has ep_size={ep}; the "
                f"topology describes one group: give level sizes whose product is {ep} (e.g. '1x{ep}' inside a node, "
                f"'{ep}x1' across nodes)"
            )
        return Topology(levels)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", layout.world_size))
    if per_node < 1 or layout.world_size % per_node:
        raise ValueError(f"LOCAL_WORLD_SIZE={per_node} does not divide the world size {layout.world_size}")
    if ep <= per_node and per_node % ep == 0:
        return Topology((1, ep))
    if ep % per_node == 0:
        return Topology((ep // per_node, per_node))
    raise ValueError(
        f"ep_size={ep} neither divides nor is a multiple of the {per_node} ranks per node (LOCAL_WORLD_SIZE): a group "
        f"would straddle a node boundary; use an ep_size that divides {per_node} or is a multiple of it"
    )
