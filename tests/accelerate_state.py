"""Shared by the Accelerate tests whose ranks outlive one job: a fresh ``Accelerator`` on the existing
process group, and a bit-for-bit digest of what a rank holds (to compare a state before a save with
the state after a load)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from hiermoe_hf.runtime.registry import moe_layers


def fresh_accelerator(**kwargs):
    """A new ``Accelerator(cpu=True, **kwargs)`` on the existing process group (the pool's ranks run
    many jobs; Accelerate keeps its state in class-level singletons)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    os.environ.update(MASTER_ADDR="127.0.0.1", LOCAL_WORLD_SIZE=str(dist.get_world_size()))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(cpu=True, **kwargs)


def digest(model, opt) -> dict:
    """Every parameter and optimizer-state entry this rank holds (local shards of DTensors), cloned,
    and every MoE layer's expert placement."""

    def local(t):
        return (t.to_local() if isinstance(t, DTensor) else t).detach().clone()

    out = {}
    for name, p in model.named_parameters():
        out[name] = local(p)
        for key, value in opt.state.get(p, {}).items():
            out[f"{name}/{key}"] = local(value) if isinstance(value, torch.Tensor) else value
    out.update({f"{n}/placement": layer.placement.phys_of_E.tolist() for n, (_, layer) in moe_layers(model).items()})
    return out


def differences(got: dict, want: dict) -> list[str]:
    """Keys of two ``digest``s that differ (bit for bit), or are in only one of them."""
    keys = sorted(set(got) | set(want))
    return [k for k in keys if k not in got or k not in want or not _same(got[k], want[k])]


def _same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else a == b
