"""Placement: logical expert -> physical slot, the same on every rank.

Physical id ``p = rank * e + slot`` with ``e = E / W`` local slots per rank. Initially contiguous
(``p == logical id``). Swaps permute it; every rank applies the same swaps, so no collective is needed
to keep it consistent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Placement:
    """``phys_of_E[i]``: physical id of logical expert i. ``logical_of_P[p]``: its inverse. Both int64 [E]."""

    phys_of_E: torch.Tensor
    logical_of_P: torch.Tensor
    world_size: int

    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> "Placement":
        if num_experts % world_size:
            raise ValueError(
                f"{num_experts} experts cannot be split evenly over {world_size} ranks; "
                f"use a world size that divides {num_experts}"
            )
        ids = torch.arange(num_experts, dtype=torch.int64)
        return cls(ids.clone(), ids.clone(), world_size)

    @property
    def num_experts(self) -> int:
        return self.phys_of_E.numel()

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.world_size

    def rank_of(self, logical: int) -> int:
        return int(self.phys_of_E[logical]) // self.local_experts

    def slot_of(self, logical: int) -> int:
        return int(self.phys_of_E[logical]) % self.local_experts

    def local_logical(self, rank: int) -> torch.Tensor:
        """Logical ids held by ``rank``, in slot order: int64 [e]."""
        e = self.local_experts
        return self.logical_of_P[rank * e : (rank + 1) * e].clone()

    def swap(self, a: int, b: int) -> None:
        """Exchange the physical slots of logical experts ``a`` and ``b``."""
        pa, pb = int(self.phys_of_E[a]), int(self.phys_of_E[b])
        self.phys_of_E[a], self.phys_of_E[b] = pb, pa
        self.logical_of_P[pa], self.logical_of_P[pb] = b, a

    def to(self, device: torch.device) -> "Placement":
        return Placement(self.phys_of_E.to(device), self.logical_of_P.to(device), self.world_size)

    def state_dict(self) -> dict:
        return {"phys_of_E": self.phys_of_E.cpu().tolist(), "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        phys = torch.tensor(state["phys_of_E"], dtype=torch.int64)
        if phys.numel() != self.num_experts or state["world_size"] != self.world_size:
            raise ValueError(
                f"placement for {phys.numel()} experts on {state['world_size']} ranks does not fit "
                f"{self.num_experts} experts on {self.world_size} ranks"
            )
        if not torch.equal(phys.sort().values, torch.arange(phys.numel())):
            raise ValueError("placement state is not a permutation of the physical slots")
        self.phys_of_E.copy_(phys.to(self.phys_of_E.device))
        self.logical_of_P.copy_(torch.argsort(phys).to(self.logical_of_P.device))
