"""Shared by the issue-12 wrapper tests: per-rank micro-batches of a global batch, and the oracle,
single-process unpatched Transformers on the global batch with the loss averaged over ranks
(what DDP means, DESIGN.md section 6)."""

from __future__ import annotations

import pytest
import torch
import transformers
from packaging.version import Version

B, L, LR = 2, 9, 1e-3


def global_batch(step: int, world: int) -> torch.Tensor:
    return torch.randint(0, 256, (world * B, L), generator=torch.Generator().manual_seed(500 + step))


def micro(step: int, world: int, rank: int) -> torch.Tensor:
    return global_batch(step, world)[rank * B : (rank + 1) * B]


def probe() -> torch.Tensor:
    return torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(77))


def reference_run(model, world: int, steps, lr: float = LR):
    """Train ``model`` (unpatched, one process) on ``steps`` (step indices), AdamW; returns losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in steps:
        total = 0.0
        for r in range(world):
            x = micro(step, world, r)
            loss = model(input_ids=x, labels=x).loss / world
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


TRAINER_ROW_LEN = 12


def trainer_row() -> torch.Tensor:
    """int64 [TRAINER_ROW_LEN]: the one seeded row every Trainer test step sees (input and label)."""
    return torch.randint(0, 256, (TRAINER_ROW_LEN,), generator=torch.Generator().manual_seed(3))


class SameRow(torch.utils.data.Dataset):
    """Every item is ``trainer_row()``: every step sees the same global batch, whatever the sampler does."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        return {"input_ids": trainer_row(), "labels": trainer_row()}


# Transformers before 5.24 loads the Trainer's optimizer state on resume with map_location=args.device,
# which is "cpu:0" on CPU ranks and which torch cannot restore ("don't know how to restore data
# location ... cpu:0"); 5.24 passes plain "cpu" there (its comment says why). GPU ranks (cuda:N) are
# unaffected. Not bisected between 5.17 (fails) and 5.24 (works).
needs_cpu_trainer_resume = pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.24"),
    reason=f"Transformers {transformers.__version__} cannot resume a Trainer on CPU ranks (map_location 'cpu:0')",
)
